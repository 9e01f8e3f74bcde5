//! [`WriteTap`]: what the estimator sees of a volume's or share's writes.
//!
//! Every `PrimaryVolume` and share primary holds one. Off (the usual case)
//! it costs one relaxed atomic load per write. On, each write pushes one
//! 24-byte event into a buffer the estimate thread drains a few times a
//! second; a full buffer (`estimate.tap_events_max`) drops the event and
//! counts it, so the write path never waits on the estimator and never
//! grows without bound (W(T) is then a lower bound, and says so).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// One write the tap saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapEvent {
    /// A volume's write (data, zeroes or trim) of `len` bytes at `offset`.
    Extent { offset: u64, len: u64 },
    /// A share's change of one file (`ferry_core::estimate::file_key`) of
    /// `bytes` bytes (0 for metadata-only changes).
    Key { key: u64, bytes: u64 },
}

/// What one drain took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Reads since the last drain.
    pub reads: u64,
    /// Events dropped since the last drain (the buffer was full).
    pub dropped: u64,
}

#[derive(Debug, Default)]
pub struct WriteTap {
    on: AtomicBool,
    /// Who enabled it (an estimate's name), so a second one is refused.
    owner: Mutex<Option<String>>,
    events_max: AtomicUsize,
    buf: Mutex<Vec<TapEvent>>,
    reads: AtomicU64,
    dropped: AtomicU64,
}

impl WriteTap {
    pub fn new() -> WriteTap {
        WriteTap::default()
    }

    fn push(&self, e: TapEvent) {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= self.events_max.load(Ordering::Relaxed) {
            drop(b);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            b.push(e);
        }
    }

    /// Whether an estimate taps it now (to skip work only the tap needs).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// A volume wrote `len` bytes at `offset`.
    #[inline]
    pub fn write_extent(&self, offset: u64, len: u64) {
        if self.on.load(Ordering::Relaxed) {
            self.push(TapEvent::Extent { offset, len });
        }
    }

    /// A share changed the file `key` by `bytes` bytes.
    #[inline]
    pub fn write_key(&self, key: u64, bytes: u64) {
        if self.on.load(Ordering::Relaxed) {
            self.push(TapEvent::Key { key, bytes });
        }
    }

    /// One read.
    #[inline]
    pub fn read(&self) {
        if self.on.load(Ordering::Relaxed) {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts tapping for `owner`, keeping at most `events_max` events
    /// between drains. Another owner holding it is named in the error.
    pub fn enable(&self, owner: &str, events_max: usize) -> Result<(), String> {
        let mut o = self.owner.lock().unwrap_or_else(|p| p.into_inner());
        match o.as_deref() {
            Some(other) if other != owner => return Err(other.to_string()),
            _ => {}
        }
        *o = Some(owner.to_string());
        self.events_max.store(events_max, Ordering::Relaxed);
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    /// `n` events lost before they reached the tap (a tracepoint's ring
    /// buffer overflowed): counted as dropped.
    pub fn add_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Stops tapping if `owner` holds it; what was buffered is dropped.
    pub fn disable(&self, owner: &str) {
        let mut o = self.owner.lock().unwrap_or_else(|p| p.into_inner());
        if o.as_deref() == Some(owner) {
            *o = None;
            self.on.store(false, Ordering::Release);
            self.buf.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.reads.store(0, Ordering::Relaxed);
            self.dropped.store(0, Ordering::Relaxed);
        }
    }

    /// Who taps it now.
    #[cfg(test)]
    pub fn owner(&self) -> Option<String> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Moves the buffered events into `into` (its old contents are
    /// replaced; the buffers swap, so neither side reallocates).
    pub fn drain(&self, into: &mut Vec<TapEvent>) -> Drained {
        into.clear();
        std::mem::swap(
            &mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()),
            into,
        );
        Drained {
            reads: self.reads.swap(0, Ordering::Relaxed),
            dropped: self.dropped.swap(0, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_it_keeps_nothing_on_it_keeps_up_to_its_bound_and_counts_the_rest() {
        let t = WriteTap::new();
        t.write_extent(0, 4096);
        t.read();
        let mut v = Vec::new();
        assert_eq!(t.drain(&mut v), Drained::default());
        assert!(v.is_empty());
        t.enable("e", 2).unwrap();
        assert_eq!(t.enable("f", 2), Err("e".to_string()));
        t.write_extent(0, 4096);
        t.write_key(7, 10);
        t.write_extent(8192, 4096);
        t.read();
        let d = t.drain(&mut v);
        assert_eq!(
            v,
            vec![
                TapEvent::Extent {
                    offset: 0,
                    len: 4096
                },
                TapEvent::Key { key: 7, bytes: 10 }
            ]
        );
        assert_eq!(
            d,
            Drained {
                reads: 1,
                dropped: 1
            }
        );
        t.disable("f");
        assert_eq!(t.owner().as_deref(), Some("e"));
        t.disable("e");
        t.write_extent(0, 1);
        assert_eq!(t.drain(&mut v), Drained::default());
        assert!(v.is_empty());
        t.enable("f", 1).unwrap();
    }
}
