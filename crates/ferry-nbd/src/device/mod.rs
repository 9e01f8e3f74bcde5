//! The storage side of an export: a [`BlockDevice`] is a fixed-size array of bytes
//! with positioned, thread-safe I/O.
//!
//! The NBD server calls these methods concurrently from its worker threads, so
//! every method takes `&self` and must be safe to call in parallel on disjoint
//! or overlapping ranges (overlap ordering is the caller's business: the NBD
//! protocol gives none between requests in flight). Ranges passed in are always
//! inside `0..size()`: the server checks them before calling.
//!
//! Later layers (replication, snapshots) are `BlockDevice`s that wrap another one,
//! which is why the trait is small and mostly synchronous. The one exception is
//! [`BlockDevice::write_at_deferred`]: a wrapper that must wait for something
//! else (a replica's acknowledgement) before a write is done answers later
//! through a [`Completion`], so the worker that read the request is not parked
//! for the round trip.

use std::io;

mod completion;
mod file;
mod mem;

pub use completion::{Completion, Responder};
pub use file::{DirectWriter, FileDevice};
pub use mem::MemDevice;

/// How a range may be zeroed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The range may be deallocated (punched) rather than written (no `NO_HOLE` flag).
    pub may_punch: bool,
    /// Fail with `EOPNOTSUPP` instead of falling back to writing zero bytes (`FAST_ZERO`).
    pub fast_only: bool,
}

/// One run of equal allocation state, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub length: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Known to read as zeroes.
    pub zero: bool,
}

impl Allocation {
    /// The `base:allocation` status flags of this run.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.hole {
            f |= crate::proto::STATE_HOLE;
        }
        if self.zero {
            f |= crate::proto::STATE_ZERO;
        }
        f
    }
}

/// A fixed-size byte array with positioned I/O, shared by many threads.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes; fixed while the device is exported.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`. `offset + buf.len() <= size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` at `offset`; with `fua`, durable before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Like [`BlockDevice::write_at`], answering through `done`, possibly later
    /// and from another thread. `buf` is only borrowed for the call. The default
    /// answers at once.
    ///
    /// `more_at_hand`: the caller already holds its next request and will call
    /// [`BlockDevice::settle`] before it waits for input, so a device may hold
    /// back work that batches well (frames for a replica) until then. A call
    /// without it does what earlier calls held back, too, whatever the
    /// outcome of this write (the caller then has nothing left to settle).
    fn write_at_deferred(
        &self,
        buf: &[u8],
        offset: u64,
        fua: bool,
        more_at_hand: bool,
        done: Completion,
    ) {
        let _ = more_at_hand;
        done.complete(self.write_at(buf, offset, fua));
    }

    /// Does what [`BlockDevice::write_at_deferred`] held back; until then its
    /// answers may not come.
    fn settle(&self) {}

    /// Makes every write that completed before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// Advises that the range is no longer needed; its contents become unspecified.
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()>;

    /// Makes the range read as zeroes.
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()>;

    /// Appends runs describing `[offset, offset + length)`, in order, at most
    /// `max_runs` of them. The runs may cover less than `length` (but at least one
    /// byte when `length > 0`); they never cover more.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_runs: usize,
        out: &mut Vec<Allocation>,
    ) -> io::Result<()>;

    /// Advises that the range will be read soon.
    fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        (**self).write_at(buf, offset, fua)
    }
    fn write_at_deferred(&self, buf: &[u8], offset: u64, fua: bool, more: bool, done: Completion) {
        (**self).write_at_deferred(buf, offset, fua, more, done)
    }
    fn settle(&self) {
        (**self).settle()
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        (**self).trim(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        (**self).write_zeroes(offset, length, mode, fua)
    }
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_runs: usize,
        out: &mut Vec<Allocation>,
    ) -> io::Result<()> {
        (**self).block_status(offset, length, max_runs, out)
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        (**self).cache(offset, length)
    }
}
