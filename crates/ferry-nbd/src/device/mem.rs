//! An in-memory [`BlockDevice`], for tests and the fuzz target. Reports runs of
//! all-zero 4 KiB blocks as zero (but never as holes).

use std::io;
use std::sync::RwLock;

use super::{Allocation, BlockDevice, ZeroMode};

const ZERO_SCAN_BYTES: usize = 4096;

/// A device held in a `Vec<u8>`.
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
}

impl MemDevice {
    pub fn new(size: usize) -> MemDevice {
        MemDevice {
            data: RwLock::new(vec![0; size]),
        }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.read_guard().clone()
    }

    fn read_guard(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_guard(&self) -> std::sync::RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn range(offset: u64, length: u64, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = usize::try_from(length).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(start..end)
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.read_guard().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.read_guard();
        let r = range(offset, buf.len() as u64, data.len())?;
        buf.copy_from_slice(&data[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let mut data = self.write_guard();
        let r = range(offset, buf.len() as u64, data.len())?;
        data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, length, ZeroMode::default(), fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        _mode: ZeroMode,
        _fua: bool,
    ) -> io::Result<()> {
        let mut data = self.write_guard();
        let r = range(offset, length, data.len())?;
        data[r].fill(0);
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_runs: usize,
        out: &mut Vec<Allocation>,
    ) -> io::Result<()> {
        let data = self.read_guard();
        let r = range(offset, length, data.len())?;
        let mut runs = 0;
        let mut pos = r.start;
        while pos < r.end && runs < max_runs {
            let block_end = ((pos / ZERO_SCAN_BYTES + 1) * ZERO_SCAN_BYTES).min(r.end);
            let zero = data[pos..block_end].iter().all(|&b| b == 0);
            let len = (block_end - pos) as u64;
            match out.last_mut() {
                Some(last) if runs > 0 && last.zero == zero => last.length += len,
                _ => {
                    out.push(Allocation {
                        length: len,
                        hole: false,
                        zero,
                    });
                    runs += 1;
                }
            }
            pos = block_end;
        }
        Ok(())
    }
}
