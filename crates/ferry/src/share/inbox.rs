//! A replica share's inbox: what its receive thread took off the link (and
//! acknowledged as received) waiting for its apply thread, in stream order.
//!
//! Receiving and applying on two threads lets the replica acknowledge a sync
//! write as soon as it has it (invariant 1 asks for receipt) while earlier
//! writes are still being written into its tree. The inbox is bounded by
//! `shares.replica_apply_queue_bytes_max` (the receive thread waits, and TCP
//! holds the primary back); a promotion closes it and waits until everything
//! received is applied (a replica applies everything it received before it
//! may be promoted).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_wire::{FrameHeader, StampedOp};

/// One received frame for the apply thread.
#[derive(Debug)]
pub enum Work {
    /// A file operation.
    Op { seq: u64, op: StampedOp },
    /// A flush, manifest request or sums request (answered by the apply
    /// thread: they see every op before them applied).
    Frame { hdr: FrameHeader, payload: Vec<u8> },
}

#[derive(Debug, Default)]
struct State {
    /// (work, frame bytes, file data bytes).
    work: VecDeque<(Work, u64, u64)>,
    /// Bytes of the queued frames.
    bytes: u64,
    /// File data of the queued ops (not yet taking space on the replica).
    data_bytes: u64,
    /// The apply thread holds an item it took (its frame and data bytes).
    busy: bool,
    taken: (u64, u64),
    /// No more work will come (the receive side ended): the apply thread
    /// drains what is queued and stops.
    ended: bool,
    /// Why new work is refused (a promotion, or the apply thread failed).
    closed: Option<String>,
}

#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<State>,
    cv: Condvar,
    bytes_max: u64,
}

impl Inbox {
    pub fn new(bytes_max: u64) -> Inbox {
        Inbox {
            bytes_max: bytes_max.max(1),
            ..Inbox::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `work` of `bytes` (frame size) carrying `data_bytes` of file
    /// data, waiting while the inbox is full (an item larger than the limit
    /// goes in alone). `Err` with the reason once the inbox is closed.
    pub fn push(&self, work: Work, bytes: u64, data_bytes: u64) -> Result<(), String> {
        let mut s = self.lock();
        loop {
            if let Some(why) = &s.closed {
                return Err(why.clone());
            }
            if (s.work.is_empty() && !s.busy) || s.bytes + bytes <= self.bytes_max {
                break;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.bytes += bytes;
        s.data_bytes += data_bytes;
        s.work.push_back((work, bytes, data_bytes));
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// The next item for the apply thread, waiting for one; `None` once the
    /// receive side ended and everything is applied. Call
    /// [`Self::applied`] when done with it.
    pub fn pop(&self) -> Option<Work> {
        let mut s = self.lock();
        loop {
            if let Some((w, b, d)) = s.work.pop_front() {
                s.busy = true;
                s.taken = (b, d);
                return Some(w);
            }
            if s.ended {
                return None;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Like [`Self::pop`] but without waiting: `None` when nothing is queued.
    pub fn try_pop(&self) -> Option<Work> {
        let mut s = self.lock();
        let (w, b, d) = s.work.pop_front()?;
        s.busy = true;
        s.taken = (b, d);
        Some(w)
    }

    /// Claims the apply side for one item of the caller's own when nothing
    /// is queued or being applied (the receive thread applies it then,
    /// still in order); call [`Self::applied`] when done. `false` otherwise.
    pub fn claim_idle(&self) -> bool {
        let mut s = self.lock();
        if !s.work.is_empty() || s.busy || s.closed.is_some() {
            return false;
        }
        s.busy = true;
        s.taken = (0, 0);
        true
    }

    /// Nothing is queued or being applied.
    pub fn is_idle(&self) -> bool {
        let s = self.lock();
        s.work.is_empty() && !s.busy
    }

    /// The item taken last is applied (or failed).
    pub fn applied(&self) {
        let mut s = self.lock();
        let (b, d) = std::mem::take(&mut s.taken);
        s.busy = false;
        s.bytes -= b;
        s.data_bytes -= d;
        drop(s);
        self.cv.notify_all();
    }

    /// File data received and not yet written (the replica's free space
    /// report leaves it out).
    pub fn pending_data_bytes(&self) -> u64 {
        self.lock().data_bytes
    }

    /// No more work comes; the apply thread stops once it applied the rest.
    pub fn end(&self) {
        self.lock().ended = true;
        self.cv.notify_all();
    }

    /// Refuses further work (the first reason stays).
    pub fn close(&self, why: &str) {
        let mut s = self.lock();
        if s.closed.is_none() {
            s.closed = Some(why.to_string());
        }
        drop(s);
        self.cv.notify_all();
    }

    /// The apply thread stops (it failed): new work is refused and what is
    /// queued is dropped (this copy is no longer up to date).
    pub fn discard(&self, why: &str) {
        let mut s = self.lock();
        if s.closed.is_none() {
            s.closed = Some(why.to_string());
        }
        s.work.clear();
        s.bytes = 0;
        s.data_bytes = 0;
        drop(s);
        self.cv.notify_all();
    }

    /// Waits until everything queued is applied, at most `timeout`; `false`
    /// if it was not.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if s.work.is_empty() && !s.busy {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn op(seq: u64) -> Work {
        Work::Op {
            seq,
            op: StampedOp {
                op: ferry_wire::FileOp::Stamps,
                stamps: vec![],
            },
        }
    }

    fn seq_of(w: &Work) -> u64 {
        match w {
            Work::Op { seq, .. } => *seq,
            Work::Frame { hdr, .. } => hdr.seq,
        }
    }

    #[test]
    fn keeps_order_and_counts_pending_data() {
        let q = Inbox::new(1000);
        q.push(op(1), 100, 60).unwrap();
        q.push(op(2), 100, 0).unwrap();
        assert_eq!(q.pending_data_bytes(), 60);
        assert_eq!(seq_of(&q.try_pop().unwrap()), 1);
        // Taken but not yet applied: still pending, not drained.
        assert_eq!(q.pending_data_bytes(), 60);
        assert!(!q.wait_drained(Duration::from_millis(1)));
        q.applied();
        assert_eq!(q.pending_data_bytes(), 0);
        assert_eq!(seq_of(&q.try_pop().unwrap()), 2);
        q.applied();
        assert!(q.try_pop().is_none());
        assert!(q.wait_drained(Duration::ZERO));
    }

    #[test]
    fn a_full_inbox_holds_the_receiver_until_the_applier_catches_up() {
        let q = Arc::new(Inbox::new(250));
        q.push(op(1), 100, 100).unwrap();
        q.push(op(2), 100, 100).unwrap();
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || q.push(op(3), 100, 100))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished(), "a third 100 bytes exceeds 250");
        assert_eq!(seq_of(&q.pop().unwrap()), 1);
        q.applied();
        pusher.join().unwrap().unwrap();
        assert_eq!(q.pending_data_bytes(), 200);
    }

    #[test]
    fn the_receiver_applies_itself_only_when_nothing_is_queued_or_applying() {
        let q = Inbox::new(1000);
        assert!(q.claim_idle());
        // Claimed: not idle, a second claim fails, a promotion waits.
        assert!(!q.is_idle() && !q.claim_idle());
        assert!(!q.wait_drained(Duration::from_millis(1)));
        q.applied();
        assert!(q.is_idle());
        q.push(op(1), 10, 0).unwrap();
        assert!(!q.claim_idle(), "an earlier op is queued");
        q.try_pop().unwrap();
        assert!(!q.claim_idle(), "an earlier op is being applied");
        q.applied();
        q.close("promoted here");
        assert!(!q.claim_idle(), "closed");
    }

    #[test]
    fn an_item_larger_than_the_limit_goes_in_alone() {
        let q = Inbox::new(10);
        q.push(op(1), 1 << 20, 0).unwrap();
        assert_eq!(seq_of(&q.try_pop().unwrap()), 1);
    }

    #[test]
    fn close_refuses_new_work_but_what_was_queued_is_applied() {
        let q = Arc::new(Inbox::new(1000));
        q.push(op(1), 10, 0).unwrap();
        q.close("promoted here");
        assert_eq!(q.push(op(2), 10, 0).unwrap_err(), "promoted here");
        let applier = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut seen = vec![];
                while let Some(w) = q.pop() {
                    std::thread::sleep(Duration::from_millis(20));
                    seen.push(seq_of(&w));
                    q.applied();
                }
                seen
            })
        };
        assert!(q.wait_drained(Duration::from_secs(5)));
        q.end();
        assert_eq!(applier.join().unwrap(), vec![1]);
    }

    #[test]
    fn a_closed_inbox_wakes_a_waiting_receiver() {
        let q = Arc::new(Inbox::new(10));
        q.push(op(1), 10, 0).unwrap();
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || q.push(op(2), 10, 0))
        };
        std::thread::sleep(Duration::from_millis(20));
        q.close("the apply thread failed");
        assert_eq!(
            pusher.join().unwrap().unwrap_err(),
            "the apply thread failed"
        );
    }
}
