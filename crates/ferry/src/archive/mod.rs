//! The image archive: content-addressed, deduplicated, compressed copies of
//! disks (volumes, images, devices) and file trees (shares, a captured
//! root), each described by a manifest; restore to a volume or to an image
//! of any format `qemu-img` writes; verify; prune.
//!
//! Layer 2½: above the volume engine (it shares its Merkle leaves,
//! `ferry_core::merkle`), below shares. It names no node: live sources
//! (a volume at a flush barrier, a share's tree) are given to it by the
//! agent as a [`DiskSource`] or a directory.
//!
//! - [`store`]: the store's layout, chunks, locks, manifests;
//! - [`manifest`]: the records;
//! - this file: [`create_disks`], [`restore_disk`], [`verify`], [`prune`] and
//!   the progress every long command reports.

pub mod manifest;
pub mod qemu;
pub mod store;
pub mod tree;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_core::archive::ChunkId;
use ferry_core::Name;
use serde::{Deserialize, Serialize};

pub use manifest::{Consistency, Disk, Manifest, Partial, Source, SourceKind};
pub use store::Store;

/// `[archive]`: the archive's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveSettings {
    /// Bytes per chunk: the unit of dedup (a multiple of the leaf size).
    pub chunk_bytes: u64,
    /// zstd level of stored chunks (1 fastest … 19).
    pub zstd_level: i32,
    /// Threads hashing, compressing and writing chunks (0: one per CPU).
    pub threads: usize,
    /// A create syncs the store and records its progress every this many
    /// bytes of the source (what an interrupted create resumes from).
    pub checkpoint_bytes: u64,
    /// Offline seeding: archives per volume whose written blocks since
    /// their barrier the volume keeps tracking (the oldest goes first).
    pub seed_maps_max: usize,
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            chunk_bytes: 1 << 20,
            zstd_level: 3,
            threads: 0,
            checkpoint_bytes: 256 << 20,
            seed_maps_max: 4,
        }
    }
}

impl ArchiveSettings {
    pub fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }
    }

    /// Checks the settings against the leaf size replication uses.
    pub fn check(&self, leaf_bytes: u64) -> Result<(), ArchiveError> {
        if leaf_bytes == 0
            || self.chunk_bytes < leaf_bytes
            || self.chunk_bytes % leaf_bytes != 0
            || self.chunk_bytes > ferry_core::archive::CHUNK_BYTES_MAX
        {
            return Err(ArchiveError::Settings(format!(
                "archive.chunk_bytes = {} must be a multiple of the leaf size ({leaf_bytes} B, replication.granularity_bytes) and at most {} B",
                self.chunk_bytes,
                ferry_core::archive::CHUNK_BYTES_MAX
            )));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(ArchiveError::Settings(format!(
                "archive.zstd_level = {} must be 1 to 22",
                self.zstd_level
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no archive store at {0} (ferry archive create … --to {0} makes one)")]
    NoStore(PathBuf),
    #[error("{0} is not empty and not an archive store (no store.json): choose an empty or new directory")]
    NotAStore(PathBuf),
    #[error("{path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("no archive {name:?} in {store} (ferry archive list --store {store})")]
    NoArchive { name: String, store: PathBuf },
    #[error("archive {name:?} already exists in {store}: choose another name, or delete it first")]
    Exists { name: String, store: PathBuf },
    #[error("a create is running in {0} (it holds the store's lock): try again when it is done, or pass --wait")]
    Busy(PathBuf),
    #[error("chunk {id} ({path}) is bad: {why}")]
    BadChunk {
        id: ChunkId,
        path: PathBuf,
        why: String,
    },
    #[error("disk {disk:?} of archive {archive:?}: its chunks give Merkle root {have}, the manifest says {want}")]
    Root {
        archive: String,
        disk: String,
        have: String,
        want: String,
    },
    #[error("{0}")]
    Settings(String),
    #[error("reading the source at byte {offset}: {source}")]
    Source { offset: u64, source: io::Error },
    #[error("{0}")]
    Store(crate::store::StoreError),
    #[error("interrupted")]
    Interrupted,
    #[error("{what} {path}: {stderr}")]
    Qemu {
        what: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("refusing the image {path}: {why}")]
    UnsafeImage { path: PathBuf, why: String },
}

/// A disk an archive reads: an image file, a block device, a volume's
/// snapshot at a barrier.
pub trait DiskSource: Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Does `[offset, offset + len)` read as zeroes without being read (a hole)?
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
}

/// An image file or block device, read-only.
#[derive(Debug)]
pub struct FileSource {
    file: std::fs::File,
    size: u64,
    regular: bool,
}

impl FileSource {
    /// Opens `path` read-only (no symlink is followed at its last part).
    pub fn open(path: &Path) -> Result<FileSource, ArchiveError> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ArchiveError::Io {
                what: "cannot open",
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| ArchiveError::Io {
            what: "cannot stat",
            path: path.to_path_buf(),
            source,
        })?;
        let (size, regular) = if meta.file_type().is_block_device() {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which outlives the call.
            let rc = unsafe {
                libc::ioctl(
                    std::os::unix::io::AsRawFd::as_raw_fd(&file),
                    BLKGETSIZE64,
                    &mut size,
                )
            };
            if rc != 0 {
                return Err(ArchiveError::Io {
                    what: "cannot read the size of",
                    path: path.to_path_buf(),
                    source: io::Error::last_os_error(),
                });
            }
            (size, false)
        } else if meta.file_type().is_file() {
            (meta.len(), true)
        } else {
            return Err(ArchiveError::Settings(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        Ok(FileSource {
            file,
            size,
            regular,
        })
    }

    /// A block device (not a regular file)?
    pub fn is_device(&self) -> bool {
        !self.regular
    }

    /// What identifies this file unchanged (resume): device, inode, size, mtime.
    pub fn key(&self, path: &Path) -> String {
        use std::os::unix::fs::MetadataExt;
        match self.file.metadata() {
            Ok(m) => format!(
                "{}|{}:{}|{}|{}.{}",
                path.display(),
                m.dev(),
                m.ino(),
                self.size,
                m.mtime(),
                m.mtime_nsec()
            ),
            Err(_) => format!("{}|{}", path.display(), self.size),
        }
    }
}

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl DiskSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.regular {
            return Ok(false);
        }
        use std::os::unix::io::AsRawFd;
        // SAFETY: lseek on a descriptor this struct owns; no memory is passed.
        let data = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after offset.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(true)
            } else {
                Ok(false)
            };
        }
        Ok(data as u64 >= offset + len)
    }
}

/// Progress of a long command: bytes done of a total, its rate and ETA.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_s: f64,
    pub eta_s: Option<f64>,
}

impl Progress {
    fn at(done: u64, total: u64, started: Instant) -> Progress {
        let s = started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / s;
        Progress {
            done_bytes: done,
            total_bytes: total,
            bytes_per_s: rate,
            eta_s: (rate > 0.0).then(|| (total.saturating_sub(done)) as f64 / rate),
        }
    }
}

/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// One disk to archive.
pub struct DiskInput<'a> {
    pub name: String,
    pub volume_id: Option<String>,
    pub generation: Option<u64>,
    pub source: &'a dyn DiskSource,
}

impl std::fmt::Debug for DiskInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskInput")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a create is asked to make.
#[derive(Debug)]
pub struct CreateSpec<'a> {
    pub name: Name,
    pub source: Source,
    pub consistency: Consistency,
    /// Identifies the source unchanged, for resuming (see [`Partial`]).
    pub source_key: String,
    pub disks: Vec<DiskInput<'a>>,
    pub workload: Option<serde_json::Value>,
    pub leaf_bytes: u64,
}

/// Archives `spec`'s disks into `store`: chunks first (synced), then the
/// manifest, last and atomically. Holds the store's shared lock throughout
/// (a prune waits). Resumes an interrupted create of the same name and
/// source. `stop` ends it early (the progress so far is kept).
pub fn create_disks(
    store: &Store,
    spec: CreateSpec<'_>,
    settings: &ArchiveSettings,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest, ArchiveError> {
    settings.check(spec.leaf_bytes)?;
    let _lock = store.lock_shared()?;
    if store.exists(&spec.name) {
        return Err(ArchiveError::Exists {
            name: spec.name.as_str().to_string(),
            store: store.root().to_path_buf(),
        });
    }
    let started = Instant::now();
    let cb = settings.chunk_bytes;
    let total: u64 = spec.disks.iter().map(|d| d.source.size()).sum();
    // Resume: the same source, the same geometry.
    let mut partial = match store.partial(&spec.name) {
        Some(p)
            if p.source_key == spec.source_key
                && p.chunk_bytes == cb
                && p.leaf_bytes == spec.leaf_bytes
                && p.disks.len() <= spec.disks.len() =>
        {
            tracing::info!(archive = %spec.name.as_str(), done_chunks = p.disks.iter().map(|d| d.len()).sum::<usize>(), "archive.create.resume");
            p
        }
        _ => Partial {
            name: spec.name.clone(),
            source_key: spec.source_key.clone(),
            chunk_bytes: cb,
            leaf_bytes: spec.leaf_bytes,
            disks: Vec::new(),
            files: Vec::new(),
            updated_unix_ms: crate::sys::unix_ms(),
        },
    };
    let mut stats = manifest::CreateStats::default();
    let mut disks = Vec::new();
    let mut done_before = 0u64;
    for (di, d) in spec.disks.iter().enumerate() {
        if partial.disks.len() <= di {
            partial.disks.push(Vec::new());
        }
        let (chunks, root) = create_one(
            store,
            d.source,
            di,
            &mut partial,
            settings,
            spec.leaf_bytes,
            stop,
            &mut stats,
            &mut |done| progress(Progress::at(done_before + done, total, started)),
        )?;
        done_before += d.source.size();
        disks.push(Disk {
            name: d.name.clone(),
            volume_id: d.volume_id.clone(),
            size_bytes: d.source.size(),
            merkle_root: root.to_hex().to_string(),
            generation: d.generation.map(|g| format!("{g:016x}")),
            chunks,
        });
    }
    store.sync()?;
    stats.elapsed_ms = started.elapsed().as_millis() as u64;
    let m = Manifest {
        name: spec.name.clone(),
        created_unix_ms: crate::sys::unix_ms(),
        source: spec.source,
        consistency: spec.consistency,
        chunk_bytes: cb,
        leaf_bytes: spec.leaf_bytes,
        disks,
        trees: Vec::new(),
        workload: spec.workload,
        stats,
    };
    store.save_manifest(&m)?;
    store.remove_partial(&spec.name);
    progress(Progress::at(total, total, started));
    Ok(m)
}

/// A chunk's outcome in a create.
struct Done {
    id: Option<ChunkId>,
    leaves: Vec<blake3::Hash>,
    read: u64,
    new: Option<(u64, u64)>,
}

#[allow(clippy::too_many_arguments)]
fn create_one(
    store: &Store,
    src: &dyn DiskSource,
    di: usize,
    partial: &mut Partial,
    settings: &ArchiveSettings,
    leaf_bytes: u64,
    stop: &AtomicBool,
    stats: &mut manifest::CreateStats,
    progress: &mut dyn FnMut(u64),
) -> Result<(Vec<Option<ChunkId>>, blake3::Hash), ArchiveError> {
    let size = src.size();
    let cb = settings.chunk_bytes;
    let n = size.div_ceil(cb) as usize;
    let resumed: Vec<Option<ChunkId>> = partial.disks[di].iter().take(n).copied().collect();
    let slots: Mutex<Vec<Option<Result<Done, ArchiveError>>>> =
        Mutex::new((0..n).map(|_| None).collect());
    let ready = Condvar::new();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let chunk_len = |i: usize| ((size - i as u64 * cb).min(cb)) as usize;
    let active = AtomicUsize::new(0);
    let work = |_: usize| {
        let mut buf = vec![0u8; cb as usize];
        loop {
            // Checked before taking an index: an index taken is always filled.
            if failed.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                break;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let len = chunk_len(i);
            let off = i as u64 * cb;
            let r = (|| -> Result<Done, ArchiveError> {
                let mut leaves = Vec::with_capacity(len.div_ceil(leaf_bytes as usize));
                if let Some(Some(id)) = resumed.get(i) {
                    // Done before the interruption: its leaves from the store
                    // (which also checks it is still whole).
                    if store.read(id, leaf_bytes, &mut leaves).is_ok() {
                        return Ok(Done {
                            id: Some(*id),
                            leaves,
                            read: 0,
                            new: None,
                        });
                    }
                } else if let Some(None) = resumed.get(i) {
                    return Ok(Done {
                        id: None,
                        leaves: zero_leaves(len, leaf_bytes),
                        read: 0,
                        new: None,
                    });
                }
                if src.is_hole(off, len as u64).unwrap_or(false) {
                    return Ok(Done {
                        id: None,
                        leaves: zero_leaves(len, leaf_bytes),
                        read: 0,
                        new: None,
                    });
                }
                let b = &mut buf[..len];
                src.read_at(b, off).map_err(|source| ArchiveError::Source {
                    offset: off,
                    source,
                })?;
                ferry_core::merkle::leaves_of(b, leaf_bytes as usize, &mut leaves);
                if b.iter().all(|&x| x == 0) {
                    return Ok(Done {
                        id: None,
                        leaves,
                        read: len as u64,
                        new: None,
                    });
                }
                let id = ChunkId::of_leaves(len as u64, &leaves);
                let put = store.put(&id, b, settings.zstd_level)?;
                Ok(Done {
                    id: Some(id),
                    leaves,
                    read: len as u64,
                    new: put.new.then_some((put.stored_bytes, len as u64)),
                })
            })();
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            ready.notify_all();
        }
        active.fetch_sub(1, Ordering::AcqRel);
        ready.notify_all();
    };
    let mut ids: Vec<Option<ChunkId>> = Vec::with_capacity(n);
    let mut leaves: Vec<blake3::Hash> = Vec::with_capacity(size.div_ceil(leaf_bytes) as usize);
    let threads = settings.threads().max(1);
    let mut result: Result<(), ArchiveError> = Ok(());
    std::thread::scope(|s| {
        active.store(threads, Ordering::Release);
        for t in 0..threads {
            let work = &work;
            std::thread::Builder::new()
                .name(format!("ferry-archive-{t}"))
                .spawn_scoped(s, move || work(t))
                .expect("spawning an archive thread");
        }
        // The collector: takes results in order, checkpoints, reports.
        let mut since_checkpoint = 0u64;
        let mut last_report = Instant::now();
        let mut i = 0;
        while i < n {
            let mut g = slots.lock().unwrap_or_else(|p| p.into_inner());
            while g[i].is_none() {
                if active.load(Ordering::Acquire) == 0 {
                    // Every worker ended and this slot is empty: stopped, or
                    // a worker failed (its error is in a later slot).
                    result = Err(g
                        .iter_mut()
                        .find_map(|s| match s.take() {
                            Some(Err(e)) => Some(e),
                            _ => None,
                        })
                        .unwrap_or(ArchiveError::Interrupted));
                    return;
                }
                g = ready
                    .wait_timeout(g, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let d = match g[i].take().expect("checked above") {
                Ok(d) => d,
                Err(e) => {
                    result = Err(e);
                    return;
                }
            };
            drop(g);
            stats.chunks += 1;
            stats.read_bytes += d.read;
            if d.id.is_none() {
                stats.zero_chunks += 1;
            }
            if let Some((stored, raw)) = d.new {
                stats.new_chunks += 1;
                stats.new_stored_bytes += stored;
                stats.new_raw_bytes += raw;
            }
            ids.push(d.id);
            leaves.extend(d.leaves);
            since_checkpoint += chunk_len(i) as u64;
            i += 1;
            if since_checkpoint >= settings.checkpoint_bytes && i < n {
                since_checkpoint = 0;
                let r = store.sync().and_then(|()| {
                    partial.disks[di] = ids.clone();
                    partial.updated_unix_ms = crate::sys::unix_ms();
                    store.save_partial(partial)
                });
                if let Err(e) = r {
                    result = Err(e);
                    return;
                }
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                progress((i as u64 * cb).min(size));
            }
        }
    });
    if let Err(e) = result {
        // Keep what is done for a resume (the chunks named are synced first).
        if !ids.is_empty() && store.sync().is_ok() {
            partial.disks[di] = ids;
            partial.updated_unix_ms = crate::sys::unix_ms();
            let _ = store.save_partial(partial);
        }
        return Err(e);
    }
    partial.disks[di] = ids.clone();
    Ok((ids, ferry_core::merkle::merkle_root(&leaves)))
}

fn zero_leaves(len: usize, leaf_bytes: u64) -> Vec<blake3::Hash> {
    let lb = leaf_bytes as usize;
    let full = ferry_core::merkle::zero_leaf(lb);
    let mut v = vec![full; len / lb];
    if len % lb != 0 {
        v.push(ferry_core::merkle::zero_leaf(len % lb));
    }
    v
}

/// Where a restored disk goes.
pub trait DiskTarget: Sync {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeroes. A fresh sparse file
    /// already does (`fresh`): nothing is written.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A raw file as a restore target (a new sparse file, or an existing image
/// that must be overwritten: zero ranges punched).
#[derive(Debug)]
pub struct FileTarget {
    pub file: std::fs::File,
    pub fresh: bool,
}

impl DiskTarget for FileTarget {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)?;
        // Start writing it out now (no wait): the disk works while the next
        // chunks are read and checked, and the final fsync has less left.
        use std::os::unix::io::AsRawFd;
        // SAFETY: sync_file_range on a descriptor this struct owns; no
        // memory is passed. Its failure only leaves the writeback to fsync.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                buf.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.fresh {
            return Ok(());
        }
        use std::os::unix::io::AsRawFd;
        // SAFETY: fallocate on a descriptor this struct owns; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // No hole punching here (a block device): write zeroes.
        let z = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(z.len() as u64) as usize;
            self.write_at(&z[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Writes disk `disk` of `m` into `target`, checking every chunk against
/// its id and the whole against the manifest's Merkle root.
pub fn restore_disk(
    store: &Store,
    m: &Manifest,
    disk: &Disk,
    target: &dyn DiskTarget,
    settings: &ArchiveSettings,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ArchiveError> {
    let started = Instant::now();
    let cb = m.chunk_bytes;
    let n = disk.chunks.len();
    let size = disk.size_bytes;
    let per_chunk: Mutex<Vec<Vec<blake3::Hash>>> = Mutex::new(vec![Vec::new(); n]);
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let err: Mutex<Option<ArchiveError>> = Mutex::new(None);
    let work = || {
        let mut leaves = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n
                || stop.load(Ordering::Relaxed)
                || err.lock().unwrap_or_else(|p| p.into_inner()).is_some()
            {
                return;
            }
            let off = i as u64 * cb;
            let len = (size - off).min(cb);
            let r = match &disk.chunks[i] {
                None => target
                    .zero(off, len)
                    .map(|()| zero_leaves(len as usize, m.leaf_bytes))
                    .map_err(|source| ArchiveError::Io {
                        what: "cannot write the restored disk",
                        path: PathBuf::from(&disk.name),
                        source,
                    }),
                Some(id) => store.read(id, m.leaf_bytes, &mut leaves).and_then(|raw| {
                    if raw.len() as u64 != len {
                        return Err(ArchiveError::BadChunk {
                            id: *id,
                            path: store.root().to_path_buf(),
                            why: format!("{} bytes where the manifest has {len}", raw.len()),
                        });
                    }
                    target
                        .write_at(&raw, off)
                        .map_err(|source| ArchiveError::Io {
                            what: "cannot write the restored disk",
                            path: PathBuf::from(&disk.name),
                            source,
                        })?;
                    Ok(std::mem::take(&mut leaves))
                }),
            };
            match r {
                Ok(l) => {
                    per_chunk.lock().unwrap_or_else(|p| p.into_inner())[i] = l;
                    done.fetch_add(len, Ordering::Relaxed);
                }
                Err(e) => {
                    err.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    return;
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..settings.threads().max(1) {
            s.spawn(work);
        }
        let mut last = Instant::now();
        while next.load(Ordering::Relaxed) < n
            && err.lock().unwrap_or_else(|p| p.into_inner()).is_none()
            && !stop.load(Ordering::Relaxed)
        {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                progress(Progress::at(done.load(Ordering::Relaxed), size, started));
            }
        }
    });
    if let Some(e) = err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if stop.load(Ordering::Relaxed) {
        return Err(ArchiveError::Interrupted);
    }
    let leaves: Vec<blake3::Hash> = per_chunk
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect();
    let root = ferry_core::merkle::merkle_root(&leaves)
        .to_hex()
        .to_string();
    if root != disk.merkle_root {
        return Err(ArchiveError::Root {
            archive: m.name.as_str().to_string(),
            disk: disk.name.clone(),
            have: root,
            want: disk.merkle_root.clone(),
        });
    }
    progress(Progress::at(size, size, started));
    Ok(())
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub archives: Vec<String>,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Bad or missing chunks, each with what it is and who uses it.
    pub bad_chunks: Vec<BadChunk>,
    /// Disks whose chunks do not give the manifest's root.
    pub bad_roots: Vec<String>,
    /// Manifests that could not be read.
    pub damaged_manifests: Vec<String>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub id: String,
    pub why: String,
    /// `ARCHIVE:DISK@OFFSET` or `ARCHIVE:PATH` of each use.
    pub used_by: Vec<String>,
}

/// Re-reads every chunk of `names` (all archives if empty): each is
/// decompressed and checked against its id; each disk's leaves against its
/// manifest's Merkle root.
pub fn verify(
    store: &Store,
    names: &[Name],
    settings: &ArchiveSettings,
    progress: &mut dyn FnMut(Progress),
) -> Result<VerifyReport, ArchiveError> {
    let started = Instant::now();
    let mut report = VerifyReport::default();
    let ms: Vec<Manifest> = if names.is_empty() {
        let (ms, bad) = store.manifests()?;
        report.damaged_manifests = bad
            .into_iter()
            .map(|(p, why)| format!("{}: {why}", p.display()))
            .collect();
        ms
    } else {
        names
            .iter()
            .map(|n| store.manifest(n))
            .collect::<Result<_, _>>()?
    };
    // Each distinct chunk once, with its leaf size.
    let mut uses: BTreeMap<(ChunkId, u64), Vec<String>> = BTreeMap::new();
    for m in &ms {
        report.archives.push(m.name.as_str().to_string());
        for d in &m.disks {
            for (i, c) in d.chunks.iter().enumerate() {
                if let Some(c) = c {
                    uses.entry((*c, m.leaf_bytes)).or_default().push(format!(
                        "{}:{}@{}",
                        m.name.as_str(),
                        d.name,
                        i as u64 * m.chunk_bytes
                    ));
                }
            }
        }
        for t in &m.trees {
            for e in &t.entries {
                for c in e.chunks.iter().flatten() {
                    uses.entry((*c, m.leaf_bytes)).or_default().push(format!(
                        "{}:{}/{}",
                        m.name.as_str(),
                        t.name,
                        e.path
                    ));
                }
            }
        }
    }
    let todo: Vec<(ChunkId, u64)> = uses.keys().copied().collect();
    let total: u64 = todo.iter().map(|(c, _)| store.stored_bytes(c)).sum();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    type Found = BTreeMap<(ChunkId, u64), Result<Vec<blake3::Hash>, String>>;
    let found: Mutex<Found> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..settings.threads().max(1) {
            s.spawn(|| {
                let mut leaves = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(id, lb)) = todo.get(i) else { return };
                    let r = store
                        .read(&id, lb, &mut leaves)
                        .map(|_| std::mem::take(&mut leaves))
                        .map_err(|e| match e {
                            ArchiveError::BadChunk { why, .. } => why,
                            e => e.to_string(),
                        });
                    done.fetch_add(store.stored_bytes(&id), Ordering::Relaxed);
                    found
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((id, lb), r);
                }
            });
        }
        let mut last = Instant::now();
        while next.load(Ordering::Relaxed) < todo.len() {
            std::thread::sleep(Duration::from_millis(100));
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                progress(Progress::at(done.load(Ordering::Relaxed), total, started));
            }
        }
    });
    let found = found.into_inner().unwrap_or_else(|p| p.into_inner());
    report.chunks_checked = found.len() as u64;
    report.bytes_checked = done.load(Ordering::Relaxed);
    for (k, r) in &found {
        if let Err(why) = r {
            report.bad_chunks.push(BadChunk {
                id: k.0.to_string(),
                why: why.clone(),
                used_by: uses.get(k).cloned().unwrap_or_default(),
            });
        }
    }
    for m in &ms {
        for d in &m.disks {
            let mut leaves = Vec::new();
            let mut whole = true;
            for (i, c) in d.chunks.iter().enumerate() {
                let len = (d.size_bytes - i as u64 * m.chunk_bytes).min(m.chunk_bytes) as usize;
                match c {
                    None => leaves.extend(zero_leaves(len, m.leaf_bytes)),
                    Some(c) => match found.get(&(*c, m.leaf_bytes)) {
                        Some(Ok(l)) => leaves.extend_from_slice(l),
                        _ => whole = false,
                    },
                }
            }
            if whole && ferry_core::merkle::merkle_root(&leaves).to_hex().as_str() != d.merkle_root
            {
                report
                    .bad_roots
                    .push(format!("{}:{}", m.name.as_str(), d.name));
            }
        }
    }
    report.ok = report.bad_chunks.is_empty()
        && report.bad_roots.is_empty()
        && report.damaged_manifests.is_empty();
    progress(Progress::at(total, total, started));
    Ok(report)
}

/// What `prune` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub chunks_before: u64,
    pub chunks_deleted: u64,
    pub bytes_freed: u64,
    pub chunks_kept: u64,
    pub tmp_files_removed: u64,
}

/// Deletes every chunk no manifest and no interrupted create names, under
/// the store's exclusive lock (`wait`: until running creates end; else a
/// running create is [`ArchiveError::Busy`]).
pub fn prune(store: &Store, wait: bool) -> Result<PruneReport, ArchiveError> {
    let _lock = store.lock_exclusive(wait)?;
    let referenced = store.referenced()?;
    let present = store.chunks()?;
    let mut r = PruneReport {
        chunks_before: present.len() as u64,
        ..Default::default()
    };
    for id in ferry_core::archive::prune_set(present, &referenced) {
        r.bytes_freed += store.remove(&id)?;
        r.chunks_deleted += 1;
    }
    r.chunks_kept = r.chunks_before - r.chunks_deleted;
    r.tmp_files_removed = store.clear_tmp()?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn settings() -> ArchiveSettings {
        ArchiveSettings {
            chunk_bytes: 256 << 10,
            threads: 3,
            checkpoint_bytes: 512 << 10,
            ..Default::default()
        }
    }

    fn spec<'a>(name: &str, src: &'a FileSource, key: &str) -> CreateSpec<'a> {
        CreateSpec {
            name: Name::parse(name).unwrap(),
            source: Source {
                kind: SourceKind::Image,
                name: "img".into(),
                node: "test".into(),
            },
            consistency: Consistency::CrashConsistentIfIdle,
            source_key: key.into(),
            disks: vec![DiskInput {
                name: "img".into(),
                volume_id: None,
                generation: None,
                source: src,
            }],
            workload: None,
            leaf_bytes: 64 << 10,
        }
    }

    /// A target slow enough that a restore lasts ~2 s.
    struct Slow(FileTarget);
    impl DiskTarget for Slow {
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            std::thread::sleep(Duration::from_millis(40));
            self.0.write_at(buf, offset)
        }
        fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
            self.0.zero(offset, len)
        }
    }

    #[test]
    fn progress_is_reported_every_half_second() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.raw");
        let n = 96u64;
        let data: Vec<u8> = (0..n * (64 << 10)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let store = Store::open(&dir.path().join("store"), true).unwrap();
        let src = FileSource::open(&img).unwrap();
        let stop = AtomicBool::new(false);
        let mut s = settings();
        s.chunk_bytes = 64 << 10;
        s.threads = 2;
        let m = create_disks(&store, spec("p", &src, "k"), &s, &stop, &mut |_| {}).unwrap();
        let out = dir.path().join("out.raw");
        let of = std::fs::File::create_new(&out).unwrap();
        of.set_len(data.len() as u64).unwrap();
        let started = Instant::now();
        let mut calls = 0u32;
        restore_disk(
            &store,
            &m,
            &m.disks[0],
            &Slow(FileTarget {
                file: of,
                fresh: true,
            }),
            &s,
            &stop,
            &mut |_| calls += 1,
        )
        .unwrap();
        let took = started.elapsed().as_secs_f64();
        assert!(took > 1.5, "{took}");
        assert!(
            calls as f64 <= took * 2.0 + 2.0,
            "{calls} progress reports in {took:.2} s"
        );
        assert!(calls >= 2, "{calls}");
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }

    #[test]
    fn a_cut_short_progress_record_names_nothing() {
        // kill -9 between a record's write and its rename leaves NAME.tmp,
        // whole: prune must neither keep its chunks nor leave it there.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.raw");
        std::fs::write(&img, vec![7u8; 256 << 10]).unwrap();
        let store = Store::open(&dir.path().join("store"), true).unwrap();
        let src = FileSource::open(&img).unwrap();
        let stop = AtomicBool::new(false);
        let m = create_disks(
            &store,
            spec("t", &src, "k"),
            &settings(),
            &stop,
            &mut |_| {},
        )
        .unwrap();
        let p = Partial {
            name: Name::parse("gone").unwrap(),
            source_key: "k".into(),
            chunk_bytes: m.chunk_bytes,
            leaf_bytes: m.leaf_bytes,
            disks: vec![m.disks[0].chunks.clone()],
            files: Vec::new(),
            updated_unix_ms: 0,
        };
        store.save_partial(&p).unwrap();
        let rec = dir.path().join("store/partial/gone.json");
        let tmp = dir.path().join("store/partial/gone.tmp");
        std::fs::rename(&rec, &tmp).unwrap();
        store.delete_manifest(&m.name).unwrap();
        assert!(store.partials().is_empty());
        let r = prune(&store, false).unwrap();
        assert_eq!(r.chunks_deleted, 1, "{r:?}");
        assert!(!tmp.exists());
    }

    #[test]
    fn create_restore_verify_prune_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.raw");
        let f = std::fs::File::create(&img).unwrap();
        let size = 3 * (256 << 10) + 4096 * 3; // a short last chunk
        f.set_len(size).unwrap();
        let mut x = 1u64;
        let data: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all_at(&data, 0).unwrap(); // chunk 0 and part of 1
        f.write_all_at(&data[..5000], size - 5000).unwrap(); // the short last one
        drop(f);
        let store = Store::open(&dir.path().join("store"), true).unwrap();
        let src = FileSource::open(&img).unwrap();
        let stop = AtomicBool::new(false);
        let m = create_disks(
            &store,
            spec("a1", &src, "k"),
            &settings(),
            &stop,
            &mut |_| {},
        )
        .unwrap();
        let d = &m.disks[0];
        assert_eq!(d.chunks.len(), 4);
        assert!(d.chunks[2].is_none(), "a hole is not stored");
        assert_eq!(m.stats.new_chunks, 3);
        // Its root is replication's root of the same bytes.
        let all = std::fs::read(&img).unwrap();
        let mut leaves = Vec::new();
        ferry_core::merkle::leaves_of(&all, 64 << 10, &mut leaves);
        assert_eq!(
            d.merkle_root,
            ferry_core::merkle::merkle_root(&leaves).to_hex().as_str()
        );
        // A second archive of the same bytes adds nothing.
        let m2 = create_disks(
            &store,
            spec("a2", &src, "k"),
            &settings(),
            &stop,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(m2.stats.new_chunks, 0);
        // Restore: byte for byte.
        let out = dir.path().join("out.raw");
        let of = std::fs::File::create_new(&out).unwrap();
        of.set_len(d.size_bytes).unwrap();
        restore_disk(
            &store,
            &m,
            d,
            &FileTarget {
                file: of,
                fresh: true,
            },
            &settings(),
            &stop,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), all);
        assert!(verify(&store, &[], &settings(), &mut |_| {}).unwrap().ok);
        // A truncated chunk is named, by id and by its users.
        let bad = d.chunks[1].unwrap();
        let (fan, file) = bad.path_parts();
        let p = dir.path().join("store/chunks").join(fan).join(file);
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let r = verify(&store, &[], &settings(), &mut |_| {}).unwrap();
        assert!(!r.ok);
        assert_eq!(r.bad_chunks.len(), 1);
        assert_eq!(r.bad_chunks[0].id, bad.to_string());
        assert_eq!(r.bad_chunks[0].used_by.len(), 2, "{:?}", r.bad_chunks);
        let of = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        assert!(matches!(
            restore_disk(
                &store,
                &m,
                d,
                &FileTarget {
                    file: of,
                    fresh: false
                },
                &settings(),
                &stop,
                &mut |_| {}
            ),
            Err(ArchiveError::BadChunk { .. })
        ));
        // A create writes a torn chunk again (it is never trusted).
        let m3 = create_disks(
            &store,
            spec("a3", &src, "k"),
            &settings(),
            &stop,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(m3.stats.new_chunks, 1);
        assert!(verify(&store, &[], &settings(), &mut |_| {}).unwrap().ok);
        // Prune: nothing while every archive names its chunks; after the
        // archives are deleted, everything.
        assert_eq!(prune(&store, false).unwrap().chunks_deleted, 0);
        for n in ["a1", "a2", "a3"] {
            store.delete_manifest(&Name::parse(n).unwrap()).unwrap();
        }
        let r = prune(&store, false).unwrap();
        assert_eq!((r.chunks_before, r.chunks_deleted), (3, 3));
        // A running create (its shared lock) makes a prune wait or refuse.
        let held = store.lock_shared().unwrap();
        assert!(matches!(prune(&store, false), Err(ArchiveError::Busy(_))));
        drop(held);
        assert!(prune(&store, false).is_ok());
    }
}
