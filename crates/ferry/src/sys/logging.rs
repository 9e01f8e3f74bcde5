//! Where log lines go: stderr, written by the thread that logs — except for
//! threads that must never block on it ([`queue_this_thread`]: the HA
//! heartbeat thread). Their lines go through a bounded queue to a logger
//! thread that writes them; a full queue drops the line and counts it (the
//! count is logged with the next line written). stderr is a file or a pipe
//! to journald: under heavy disk load a write to it can wait on the disk
//! (dirty-page throttling, a journald busy syncing), and stderr's lock is
//! held by whichever thread is writing meanwhile.

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;

/// Lines waiting for the logger thread at most.
const QUEUED_LINES_MAX: usize = 1024;

static QUEUE: OnceLock<mpsc::SyncSender<Vec<u8>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static QUEUED: Cell<bool> = const { Cell::new(false) };
}

/// Starts the logger thread (once) and sends this thread's lines through
/// it from now on. Call from the thread itself, first thing.
pub fn queue_this_thread() {
    start();
    QUEUED.with(|q| q.set(true));
}

/// Starts the logger thread, once. Done before a thread that queues its
/// lines starts (it must not spawn threads itself).
pub fn start() {
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUED_LINES_MAX);
        let spawned = std::thread::Builder::new()
            .name("logger".into())
            .spawn(move || {
                for line in rx {
                    let mut err = std::io::stderr().lock();
                    let dropped = DROPPED.swap(0, Ordering::Relaxed);
                    if dropped > 0 {
                        let _ = writeln!(
                            err,
                            "log.dropped: {dropped} line(s) of a real-time thread were dropped (the log output was too slow)"
                        );
                    }
                    let _ = err.write_all(&line);
                }
            });
        if spawned.is_err() {
            // Without its logger the queue fills and lines are dropped
            // (counted): never a blocking write on a real-time thread.
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        tx
    });
}

/// The subscriber's writer: stderr, or the queue on a queued thread.
pub struct MakeWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        if QUEUED.with(|q| q.get()) {
            Line::Queued(Vec::with_capacity(256))
        } else {
            Line::Stderr(std::io::stderr())
        }
    }
}

/// One event's output: written through, or gathered and queued when dropped.
pub enum Line {
    Stderr(std::io::Stderr),
    Queued(Vec<u8>),
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Line::Stderr(s) => s.write(buf),
            Line::Queued(v) => {
                v.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Line::Stderr(s) => s.flush(),
            Line::Queued(_) => Ok(()),
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Line::Queued(v) = self {
            if v.is_empty() {
                return;
            }
            let line = std::mem::take(v);
            let sent = QUEUE.get().is_some_and(|q| q.try_send(line).is_ok());
            if !sent {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter as _;

    #[test]
    fn a_queued_thread_s_lines_go_to_the_queue_and_others_to_stderr() {
        assert!(matches!(MakeWriter.make_writer(), Line::Stderr(_)));
        std::thread::spawn(|| {
            queue_this_thread();
            let mut w = MakeWriter.make_writer();
            assert!(matches!(w, Line::Queued(_)));
            w.write_all(b"queued line\n").unwrap();
        })
        .join()
        .unwrap();
        assert!(matches!(MakeWriter.make_writer(), Line::Stderr(_)));
    }
}
