//! Test cutovers on the replica's node: a copy-before-write **snapshot** of a
//! replica taken at a flush barrier of its stream, and a disposable writable
//! **overlay** of that snapshot, exported over NBD as `VOLUME@test`.
//!
//! The primary arms the snapshot, then (its volumes frozen for an instant so
//! the cut is the same on every volume of the workload) sends a Flush frame
//! flagged [`super::link::FLAG_SNAPSHOT`] on each link; the apply thread takes
//! the snapshot when it reaches that flush, with every frame before it applied
//! and none after. From then on, before the stream overwrites a block for the
//! first time, the block's old contents are copied to `snapshot.cow` next to
//! the image, so the snapshot never sees a torn image and replication goes on.
//!
//! Neither survives an agent restart: both files are removed when the volume
//! loads. The block arithmetic is [`ferry_core::snapshot`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_core::snapshot::{CowMap, OverlayMap, Source};
use ferry_nbd::device::{Allocation, BlockDevice, FileDevice, ZeroMode};

use super::replica::ReplicaVolume;

/// File of a replica's snapshot (saved blocks, sparse).
pub const SNAPSHOT_FILE: &str = "snapshot.cow";
/// File of a test overlay (written blocks, sparse).
pub const OVERLAY_FILE: &str = "test-overlay.raw";
/// Block size of overlays: the smallest write that does not need a fill.
pub const OVERLAY_BLOCK_BYTES: u64 = 4096;

/// Why a snapshot could not be armed or taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("volume {0:?} already has a snapshot (a test cutover runs): end it first")]
    Exists(String),
    #[error("the replica of {0:?} is inconsistent (resyncing): a snapshot now would be torn; try again once it is up to date")]
    Inconsistent(String),
    #[error("no flush barrier reached the replica of {volume:?} within {waited_ms} ms (is the link up?)")]
    NoBarrier { volume: String, waited_ms: u64 },
    #[error("the snapshot of {0:?} was not armed")]
    NotArmed(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

enum State {
    Off,
    /// The flagged flush carrying this token takes it.
    Armed(u64),
    Active(Active),
}

struct Active {
    file: File,
    map: CowMap,
    /// Saving a block failed (say, the disk is full): the snapshot is no
    /// longer whole, reads fail, and replication goes on without it.
    broken: Option<String>,
}

impl Active {
    /// Saves the blocks of `[offset, offset + length)` not saved yet; holes
    /// (which read as zeroes) are only marked.
    fn save_before(&mut self, dev: &FileDevice, offset: u64, length: u64) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut runs = Vec::new();
        let end = offset.saturating_add(length);
        let mut at = offset;
        while let Some(b) = self.map.next_unsaved(at, end.saturating_sub(at)) {
            runs.clear();
            dev.block_status(b.offset, b.length, 1, &mut runs)?;
            let hole = runs.first().is_some_and(|r| r.hole && r.length >= b.length);
            if !hole {
                buf.resize(b.length as usize, 0);
                dev.read_at(&mut buf, b.offset)?;
                self.file.write_all_at(&buf, b.offset)?;
            }
            self.map.mark_saved(b);
            at = b.offset + b.length;
        }
        Ok(())
    }
}

/// A replica's snapshot slot. Its lock is held across every write the stream
/// applies, so a snapshot read never sees a block between its save and its
/// overwrite.
pub struct Snapshot {
    state: Mutex<State>,
    taken: Condvar,
    /// A snapshot is active: the primary's writes check this first (one
    /// atomic load when none is).
    on: std::sync::atomic::AtomicBool,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            state: Mutex::new(State::Off),
            taken: Condvar::new(),
            on: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

/// The stream may write the range once this is dropped.
pub struct WriteGuard<'a>(#[allow(dead_code)] MutexGuard<'a, State>);

impl Snapshot {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes what an earlier run left (snapshots do not survive a restart).
    pub fn clear_leftovers(dir: &Path) {
        for f in [SNAPSHOT_FILE, OVERLAY_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }

    /// The Flush frame flagged for a snapshot and carrying `token` takes it
    /// (a late barrier of an earlier attempt does not).
    pub fn arm(&self, vol: &str, consistent: bool, token: u64) -> Result<(), SnapshotError> {
        let mut st = self.lock();
        match *st {
            State::Active(_) => return Err(SnapshotError::Exists(vol.to_string())),
            _ if !consistent => return Err(SnapshotError::Inconsistent(vol.to_string())),
            _ => *st = State::Armed(token),
        }
        Ok(())
    }

    /// Called by the apply thread at a flagged flush, every frame before it
    /// applied: takes the snapshot if it is armed.
    pub fn take_if_armed(
        &self,
        path: &Path,
        size_bytes: u64,
        granularity_bytes: u64,
        token: u64,
    ) -> Result<bool, SnapshotError> {
        let mut st = self.lock();
        if !matches!(*st, State::Armed(t) if t == token) {
            return Ok(false);
        }
        let io_err = |what, source| SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io_err("cannot create the snapshot file", e))?;
        file.set_len(size_bytes)
            .map_err(|e| io_err("cannot size the snapshot file", e))?;
        // Anonymous from here on (see [`Overlay::create`]).
        std::fs::remove_file(path).map_err(|e| io_err("cannot unlink the snapshot file", e))?;
        let map = CowMap::new(size_bytes, granularity_bytes).map_err(|e| {
            io_err(
                "bad snapshot geometry for",
                io::Error::new(io::ErrorKind::InvalidInput, e),
            )
        })?;
        *st = State::Active(Active {
            file,
            map,
            broken: None,
        });
        self.on.store(true, std::sync::atomic::Ordering::SeqCst);
        self.taken.notify_all();
        Ok(true)
    }

    /// Waits until an armed snapshot is taken.
    pub fn wait_taken(&self, vol: &str, timeout: Duration) -> Result<(), SnapshotError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            match *st {
                State::Active(_) => return Ok(()),
                State::Off => return Err(SnapshotError::NotArmed(vol.to_string())),
                State::Armed(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                *st = State::Off;
                return Err(SnapshotError::NoBarrier {
                    volume: vol.to_string(),
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            st = self
                .taken
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(*self.lock(), State::Active(_))
    }

    /// Bytes saved aside so far (`None` without a snapshot).
    pub fn saved_bytes(&self) -> Option<u64> {
        match &*self.lock() {
            State::Active(a) => Some(a.map.saved_bytes()),
            _ => None,
        }
    }

    /// Drops the snapshot (its file was unlinked when it was taken).
    pub fn end(&self) {
        let mut st = self.lock();
        *st = State::Off;
        self.on.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// [`Snapshot::before_write`] for writers that run concurrently (the
    /// primary's): nothing, not even the lock, unless a snapshot is active.
    /// A snapshot is taken only with the volume frozen (no write inside),
    /// so a write that saw it off finished before it was taken.
    pub fn before_write_if_on(
        &self,
        dev: &FileDevice,
        offset: u64,
        length: u64,
    ) -> Option<WriteGuard<'_>> {
        if !self.on.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        Some(self.before_write(dev, offset, length))
    }

    /// Does the snapshot read `[offset, offset + length)` as zeroes without
    /// reading it (nothing saved there, and a hole in the live image)?
    pub fn is_hole(&self, dev: &FileDevice, offset: u64, length: u64) -> io::Result<bool> {
        let st = self.lock();
        let State::Active(a) = &*st else {
            return Err(io::Error::other("the snapshot was ended"));
        };
        if a.map
            .read_plan(offset, length)
            .iter()
            .any(|(_, s)| *s == Source::Side)
        {
            return Ok(false);
        }
        let mut runs = Vec::new();
        dev.block_status(offset, length, 1, &mut runs)?;
        Ok(runs
            .first()
            .is_some_and(|r| r.hole && r.zero && r.length >= length))
    }

    /// Before the stream writes `[offset, offset + length)` of the replica:
    /// saves the blocks the snapshot still needs. Hold the guard across the write.
    pub fn before_write(&self, dev: &FileDevice, offset: u64, length: u64) -> WriteGuard<'_> {
        let mut st = self.lock();
        if let State::Active(a) = &mut *st {
            if a.broken.is_none() {
                if let Err(e) = a.save_before(dev, offset, length) {
                    // Replication must not stop for a test copy.
                    tracing::error!(error = %e, "replication.snapshot.broken: the test copy is no longer whole");
                    a.broken = Some(e.to_string());
                }
            }
        }
        WriteGuard(st)
    }

    /// Reads the snapshot (the live image where nothing was saved).
    pub fn read(&self, dev: &FileDevice, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        let State::Active(a) = &*st else {
            return Err(io::Error::other("the snapshot was ended"));
        };
        if let Some(why) = &a.broken {
            return Err(io::Error::other(format!(
                "the snapshot is broken (saving a block failed: {why})"
            )));
        }
        for (e, src) in a.map.read_plan(offset, buf.len() as u64) {
            let piece =
                &mut buf[(e.offset - offset) as usize..(e.offset - offset + e.length) as usize];
            match src {
                Source::Side => a.file.read_exact_at(piece, e.offset)?,
                Source::Below => dev.read_at(piece, e.offset)?,
            }
        }
        Ok(())
    }
}

/// A writable, disposable view of a replica's snapshot: what a test instance
/// runs on. Writes stay in its own sparse file, unlinked at creation (gone
/// with the last reference). Nothing written here is kept, so FLUSH and FUA
/// do not sync.
pub struct Overlay {
    vol: Arc<ReplicaVolume>,
    file: File,
    map: Mutex<OverlayMap>,
    size: u64,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("volume", &self.vol.name)
            .finish_non_exhaustive()
    }
}

impl Overlay {
    pub fn create(vol: Arc<ReplicaVolume>, path: &Path) -> io::Result<Overlay> {
        let size = vol.dev.size();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        // Anonymous from here on: nothing to clean up after an agent crash,
        // and a later overlay never shares its file.
        std::fs::remove_file(path)?;
        let map = OverlayMap::new(size, OVERLAY_BLOCK_BYTES)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Overlay {
            vol,
            file,
            map: Mutex::new(map),
            size,
        })
    }

    fn lock(&self) -> MutexGuard<'_, OverlayMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes the test instance wrote (whole overlay blocks).
    pub fn written_bytes(&self) -> u64 {
        self.lock().written_bytes()
    }

    fn check(&self, offset: u64, length: u64) -> io::Result<()> {
        ferry_core::Extent::within(offset, length, self.size)
            .map(|_| ())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let map = self.lock();
        for (e, src) in map.read_plan(offset, buf.len() as u64) {
            let piece =
                &mut buf[(e.offset - offset) as usize..(e.offset - offset + e.length) as usize];
            match src {
                Source::Side => self.file.read_exact_at(piece, e.offset)?,
                Source::Below => self.vol.snapshot.read(&self.vol.dev, piece, e.offset)?,
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut map = self.lock();
        let mut fill = Vec::new();
        for b in map.partial_fill(offset, buf.len() as u64) {
            fill.resize(b.length as usize, 0);
            self.vol.snapshot.read(&self.vol.dev, &mut fill, b.offset)?;
            self.file.write_all_at(&fill, b.offset)?;
            map.mark_written(b.offset, b.length);
        }
        self.file.write_all_at(buf, offset)?;
        map.mark_written(offset, buf.len() as u64);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> io::Result<()> {
        // Contents of a trimmed range are unspecified: keeping them is allowed.
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, _mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.check(offset, length)?;
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(length) as usize];
        let mut at = offset;
        while at < offset + length {
            let n = CHUNK.min(offset + length - at);
            self.write_at(&zeroes[..n as usize], at, fua)?;
            at += n;
        }
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        _max_runs: usize,
        out: &mut Vec<Allocation>,
    ) -> io::Result<()> {
        self.check(offset, length)?;
        out.push(Allocation {
            length,
            hole: false,
            zero: false,
        });
        Ok(())
    }
}
