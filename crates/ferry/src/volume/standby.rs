//! A standby export: a replica served over NBD to the VM waiting for a live
//! move at the target (`qemu -S -incoming`), which becomes its primary in
//! place at the commit point.
//!
//! The export is advertised **writable**: QEMU opens a read-only export
//! read-only for good (its default `auto-read-only=on`), and the guest's
//! writes would fail once it runs here. Until the commit every write is
//! refused with EPERM (the VM is paused, so it sends none; anything else is
//! a bug that must not touch the replica). Reads come from the replica's
//! own file (what the stream applied so far). [`StandbyDevice::promote`]
//! hands the device over to the primary that the promotion built on the
//! same file: from then on every request goes to it, and the NBD
//! connection the VM opened at the start survives the promotion.

use std::io;
use std::sync::{Arc, OnceLock};

use ferry_nbd::{Allocation, BlockDevice, Completion, ZeroMode};

use super::replica::ReplicaVolume;

/// See the module documentation.
pub struct StandbyDevice {
    replica: Arc<ReplicaVolume>,
    primary: OnceLock<Arc<dyn BlockDevice>>,
}

impl std::fmt::Debug for StandbyDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandbyDevice")
            .field("volume", &self.replica.name)
            .field("promoted", &self.is_promoted())
            .finish()
    }
}

fn refused() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl StandbyDevice {
    pub fn new(replica: Arc<ReplicaVolume>) -> StandbyDevice {
        StandbyDevice {
            replica,
            primary: OnceLock::new(),
        }
    }

    /// From now on every request goes to `primary` (the same volume,
    /// promoted). Only the first call counts.
    pub fn promote(&self, primary: Arc<dyn BlockDevice>) {
        let _ = self.primary.set(primary);
    }

    pub fn is_promoted(&self) -> bool {
        self.primary.get().is_some()
    }
}

impl BlockDevice for StandbyDevice {
    fn size(&self) -> u64 {
        self.replica.dev.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.primary.get() {
            Some(p) => p.read_at(buf, offset),
            None => self.replica.dev.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        match self.primary.get() {
            Some(p) => p.write_at(buf, offset, fua),
            None => Err(refused()),
        }
    }

    fn write_at_deferred(&self, buf: &[u8], offset: u64, fua: bool, more: bool, done: Completion) {
        match self.primary.get() {
            Some(p) => p.write_at_deferred(buf, offset, fua, more, done),
            None => done.complete(Err(refused())),
        }
    }

    fn settle(&self) {
        if let Some(p) = self.primary.get() {
            p.settle()
        }
    }

    /// Before the commit nothing was written here: nothing to make durable.
    fn flush(&self) -> io::Result<()> {
        match self.primary.get() {
            Some(p) => p.flush(),
            None => Ok(()),
        }
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        match self.primary.get() {
            Some(p) => p.trim(offset, length, fua),
            None => Err(refused()),
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        match self.primary.get() {
            Some(p) => p.write_zeroes(offset, length, mode, fua),
            None => Err(refused()),
        }
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_runs: usize,
        out: &mut Vec<Allocation>,
    ) -> io::Result<()> {
        match self.primary.get() {
            Some(p) => p.block_status(offset, length, max_runs, out),
            None => self.replica.dev.block_status(offset, length, max_runs, out),
        }
    }
}
