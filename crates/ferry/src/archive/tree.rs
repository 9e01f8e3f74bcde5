//! File-level archives: a live tree (a server's root for P2V) captured in
//! passes under an inotify watcher, and restored with `*at` calls.
//!
//! Capture walks from an open directory descriptor: every step is an
//! `openat`/`fstatat` relative to its parent's descriptor with `O_NOFOLLOW`
//! (a symlink is recorded, never followed; a directory swapped for a
//! symlink between the stat and the open fails the open). A watch is added
//! to each directory before it is read (so a file created after the read is
//! an event), and to each directory created during the copy as the walk
//! meets it. After the first pass, the changed paths are copied again
//! (deleted ones removed), pass after pass, until a pass sees no change or
//! [`CaptureOptions::max_passes`]: each file is as of its last copy
//! ([`Consistency::FileLevel`]).
//!
//! Restore parses every manifest path into checked components (no `..`,
//! no leading `/`, no empty part, no NUL) and creates each entry with
//! `mkdirat`/`openat(O_CREAT|O_EXCL|O_NOFOLLOW)`/`symlinkat` under an empty
//! target directory, each chunk checked against its id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_core::archive::ChunkId;
use ferry_core::Name;
use serde::Serialize;

use super::manifest::{CreateStats, Entry, EntryKind, Tree};
use super::{ArchiveError, ArchiveSettings, Consistency, Manifest, Partial, Source, Store};

/// Passes a capture makes at most when the tree keeps changing.
pub const MAX_PASSES_DEFAULT: u32 = 3;

/// How often a capture or a restore reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Bytes read from the inotify descriptor at once.
const INOTIFY_BUF_BYTES: usize = 64 << 10;

/// How a capture walks.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Leaf size of chunk ids (`replication.granularity_bytes`).
    pub leaf_bytes: u64,
    /// Passes at most (the first, full, and the passes over changed paths).
    pub max_passes: u32,
    /// Descend into directories on other filesystems (mount points). Off:
    /// a mount point is kept as an empty directory.
    pub cross_filesystems: bool,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            leaf_bytes: ferry_core::dirty::DEFAULT_GRANULARITY_BYTES,
            max_passes: MAX_PASSES_DEFAULT,
            cross_filesystems: false,
        }
    }
}

/// What a capture did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptureReport {
    pub passes: u32,
    /// The last pass saw no change (else `max_passes` ended it while the
    /// tree was still changing: each file is as of its last copy).
    pub settled: bool,
    /// Paths changed after the last pass began (not copied again).
    pub changed_after_last_pass: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of the captured files.
    pub bytes: u64,
    /// Bytes read over all passes.
    pub read_bytes: u64,
    /// Files copied again after the first pass.
    pub recopied: u64,
    /// Sockets, FIFOs and devices: not archived.
    pub skipped_special: u64,
    /// Names that are not UTF-8: not archived.
    pub skipped_names: u64,
    /// Mount points of other filesystems, kept as empty directories.
    pub skipped_mounts: Vec<String>,
    /// Directories the watcher could not watch (inotify's limit): walked
    /// again in every pass instead.
    pub unwatched_dirs: u64,
    /// Paths given as excluded that were found.
    pub excluded: Vec<String>,
    pub elapsed_ms: u64,
}

/// Progress of a capture or a tree restore.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TreeProgress {
    pub pass: u32,
    pub files: u64,
    pub done_bytes: u64,
    /// An estimate for a capture (the bytes used on the root's filesystem).
    pub total_bytes: u64,
    pub bytes_per_s: f64,
    pub eta_s: Option<f64>,
}

impl TreeProgress {
    fn at(pass: u32, files: u64, done: u64, total: u64, started: Instant) -> TreeProgress {
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        TreeProgress {
            pass,
            files,
            done_bytes: done,
            total_bytes: total,
            bytes_per_s: rate,
            eta_s: (rate > 0.0 && total >= done).then(|| (total - done) as f64 / rate),
        }
    }
}

/// A captured archive and what the capture did.
#[derive(Debug, Clone)]
pub struct Captured {
    pub manifest: Manifest,
    pub report: CaptureReport,
}

fn io_at<'a>(what: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        what,
        path: PathBuf::from(if path.is_empty() { "." } else { path }),
        source,
    }
}

// ---- thin libc wrappers (descriptor-relative) ----

fn cname(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the
    // returned descriptor is owned by the OwnedFd only when valid.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed is a valid `stat`; fstatat writes into it; `name` outlives the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn stat_fd(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed is a valid `stat`; fstat writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The names in a directory (no `.` and `..`), read through a duplicate of `fd`.
fn dir_names(fd: RawFd) -> io::Result<Vec<Vec<u8>>> {
    // SAFETY: dup of a descriptor the caller holds open.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fdopendir takes ownership of `dup` (closed by closedir, or
    // by us when fdopendir fails).
    let d = unsafe { libc::fdopendir(dup) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `dup` is still ours to close.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    // The duplicate shares the offset: start from the beginning.
    // SAFETY: `d` is a valid DIR*.
    unsafe { libc::rewinddir(d) };
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; reset to tell the end from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `d` is a valid DIR*; the entry is read before the next call.
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            let err = io::Error::last_os_error();
            break if err.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(err)
            };
        }
        // SAFETY: d_name is NUL-terminated within the entry readdir returned.
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: `d` is valid and closed once.
    unsafe { libc::closedir(d) };
    result.map(|()| names)
}

fn read_link_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for its length; `name` outlives the call.
    let n = unsafe {
        libc::readlinkat(
            dir,
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn mtime_ns(st: &libc::stat) -> i64 {
    st.st_mtime
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec)
}

/// What tells a copy is still current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatKey {
    ino: u64,
    size: i64,
    mtime_ns: i64,
    ctime_ns: i64,
    mode: u32,
}

impl StatKey {
    fn of(st: &libc::stat) -> StatKey {
        StatKey {
            ino: st.st_ino,
            size: st.st_size,
            mtime_ns: mtime_ns(st),
            ctime_ns: st
                .st_ctime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_ctime_nsec),
            mode: st.st_mode,
        }
    }
}

fn entry_of(path: &str, kind: EntryKind, st: &libc::stat) -> Entry {
    Entry {
        path: path.to_string(),
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_unix_ns: mtime_ns(st),
        size_bytes: 0,
        target: None,
        chunks: Vec::new(),
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// The inotify watcher.
struct Watcher {
    fd: OwnedFd,
    wds: HashMap<i32, String>,
}

const WATCH_MASK: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ONLYDIR;
// No IN_DONT_FOLLOW: the watch is added through the /proc/self/fd magic
// link, which must be followed to the directory open (not a path lookup).

impl Watcher {
    fn new() -> io::Result<Watcher> {
        // SAFETY: no memory is passed; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Watcher {
            fd,
            wds: HashMap::new(),
        })
    }

    /// Watches the directory open at `dir` (through /proc/self/fd: the
    /// object open, not a path that could have been swapped).
    fn add(&mut self, dir: RawFd, rel: &str) -> io::Result<()> {
        let p = CString::new(format!("/proc/self/fd/{dir}")).expect("no NUL in a number");
        // SAFETY: `p` outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), p.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.wds.insert(wd, rel.to_string());
        Ok(())
    }

    /// Reads the pending events into `changed` (path → walk it whole).
    /// Returns whether the queue overflowed (events were lost).
    fn drain(&mut self, changed: &mut BTreeMap<String, bool>) -> bool {
        let mut overflow = false;
        let mut buf = vec![0u8; INOTIFY_BUF_BYTES];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n <= 0 {
                return overflow;
            }
            let n = n as usize;
            let head = std::mem::size_of::<libc::inotify_event>();
            let mut at = 0;
            while at + head <= n {
                // SAFETY: the kernel wrote whole events; read_unaligned
                // copes with any alignment of `buf`.
                let ev: libc::inotify_event = unsafe {
                    std::ptr::read_unaligned(buf[at..].as_ptr() as *const libc::inotify_event)
                };
                let len = ev.len as usize;
                let name_bytes = &buf[(at + head).min(n)..(at + head + len).min(n)];
                at += head + len;
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    overflow = true;
                    continue;
                }
                if ev.mask & libc::IN_IGNORED != 0 {
                    self.wds.remove(&ev.wd);
                    continue;
                }
                let Some(dir) = self.wds.get(&ev.wd) else {
                    continue;
                };
                let name_end = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len());
                let name = &name_bytes[..name_end];
                if name.is_empty() {
                    // The directory itself (its attributes, or it went away).
                    if !dir.is_empty() {
                        changed.entry(dir.clone()).or_insert(false);
                    }
                    continue;
                }
                let Ok(name) = std::str::from_utf8(name) else {
                    continue; // not archived anyway
                };
                let path = join(dir, name);
                let whole = ev.mask & libc::IN_ISDIR != 0
                    && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
                *changed.entry(path).or_insert(false) |= whole;
                // The parent's mtime changed with its entries.
                if !dir.is_empty() {
                    changed.entry(dir.clone()).or_insert(false);
                }
            }
        }
    }
}

struct Capture<'a> {
    store: &'a Store,
    settings: &'a ArchiveSettings,
    opts: &'a CaptureOptions,
    stop: &'a AtomicBool,
    progress: &'a mut dyn FnMut(TreeProgress),
    root: OwnedFd,
    root_dev: u64,
    excludes: Vec<String>,
    entries: BTreeMap<String, Entry>,
    keys: HashMap<String, StatKey>,
    watcher: Watcher,
    changed: BTreeMap<String, bool>,
    overflow: bool,
    unwatched: BTreeSet<String>,
    special: BTreeSet<String>,
    mounts: BTreeSet<String>,
    excluded: BTreeSet<String>,
    chunk_ids: BTreeSet<ChunkId>,
    partial: Partial,
    since_checkpoint: u64,
    stats: CreateStats,
    report: CaptureReport,
    pass: u32,
    pass_changes: u64,
    started: Instant,
    last_report: Instant,
    total_estimate: u64,
    buf: Vec<u8>,
}

impl Capture<'_> {
    fn is_excluded(&self, rel: &str) -> bool {
        self.excludes.iter().any(|e| {
            rel == e || (rel.starts_with(e.as_str()) && rel.as_bytes().get(e.len()) == Some(&b'/'))
        })
    }

    fn check_stop(&self) -> Result<(), ArchiveError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(ArchiveError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn tick(&mut self) {
        if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            let files = self
                .entries
                .values()
                .filter(|e| e.kind == EntryKind::File)
                .count() as u64;
            (self.progress)(TreeProgress::at(
                self.pass,
                files,
                self.stats.read_bytes,
                self.total_estimate.max(self.stats.read_bytes),
                self.started,
            ));
        }
    }

    /// Removes `rel` and everything under it.
    fn remove(&mut self, rel: &str) {
        let mut gone: Vec<String> = Vec::new();
        if self.entries.contains_key(rel) {
            gone.push(rel.to_string());
        }
        let prefix = format!("{rel}/");
        gone.extend(
            self.entries
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone()),
        );
        if !gone.is_empty() {
            self.pass_changes += 1;
        }
        for k in gone {
            self.entries.remove(&k);
            self.keys.remove(&k);
        }
        self.special.remove(rel);
    }

    /// Records `rel` (not a regular file): returns whether it changed.
    fn record(&mut self, rel: &str, e: Entry, key: StatKey) -> bool {
        if self.entries.get(rel).map(|o| o.kind) != Some(e.kind) {
            // A kind change: what was under it (or it) goes.
            self.remove(rel);
        }
        let changed = self.keys.get(rel) != Some(&key) || self.entries.get(rel) != Some(&e);
        if changed {
            self.pass_changes += 1;
        }
        self.entries.insert(rel.to_string(), e);
        self.keys.insert(rel.to_string(), key);
        changed
    }

    /// Walks the directory open at `dir` (`rel` in the tree): watch first,
    /// then its names; names gone since the last walk are removed.
    fn walk(&mut self, dir: &OwnedFd, rel: &str) -> Result<(), ArchiveError> {
        self.check_stop()?;
        if let Err(e) = self.watcher.add(dir.as_raw_fd(), rel) {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                self.unwatched.insert(rel.to_string());
            } else {
                return Err(io_at("cannot watch", rel)(e));
            }
        }
        let names = dir_names(dir.as_raw_fd()).map_err(io_at("cannot read the directory", rel))?;
        let mut present = BTreeSet::new();
        for name in names {
            let Ok(name) = String::from_utf8(name) else {
                self.report.skipped_names += 1;
                continue;
            };
            present.insert(name.clone());
            self.visit(dir, rel, &name, true)?;
        }
        // Direct children recorded before and gone now.
        let prefix = if rel.is_empty() {
            String::new()
        } else {
            format!("{rel}/")
        };
        let stale: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| {
                let rest = &k[prefix.len()..];
                !rest.contains('/') && !present.contains(rest)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.remove(&k);
        }
        self.overflow |= self.watcher.drain(&mut self.changed);
        Ok(())
    }

    /// Copies one name of the directory open at `dir`.
    fn visit(
        &mut self,
        dir: &OwnedFd,
        parent: &str,
        name: &str,
        whole: bool,
    ) -> Result<(), ArchiveError> {
        let rel = join(parent, name);
        let c = cname(name).map_err(io_at("bad name", &rel))?;
        let st = match stat_at(dir.as_raw_fd(), &c) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.remove(&rel);
                return Ok(());
            }
            Err(e) => return Err(io_at("cannot stat", &rel)(e)),
        };
        let fmt = st.st_mode & libc::S_IFMT;
        if self.is_excluded(&rel) {
            // An excluded directory stays as an empty one (a mount point:
            // /proc, /sys, /dev); anything else is left out.
            self.excluded.insert(rel.clone());
            if fmt == libc::S_IFDIR {
                self.record(&rel, entry_of(&rel, EntryKind::Dir, &st), StatKey::of(&st));
            }
            return Ok(());
        }
        match fmt {
            libc::S_IFDIR => {
                let e = entry_of(&rel, EntryKind::Dir, &st);
                if st.st_dev != self.root_dev && !self.opts.cross_filesystems {
                    self.mounts.insert(rel.clone());
                    self.record(&rel, e, StatKey::of(&st));
                    return Ok(());
                }
                let was_dir = self.entries.get(&rel).map(|e| e.kind) == Some(EntryKind::Dir);
                let fd = match open_at(
                    dir.as_raw_fd(),
                    &c,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                ) {
                    Ok(fd) => fd,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
                        ) =>
                    {
                        // Replaced between the stat and the open: next pass.
                        self.changed.insert(rel.clone(), true);
                        return Ok(());
                    }
                    Err(e) => return Err(io_at("cannot open", &rel)(e)),
                };
                let st = stat_fd(fd.as_raw_fd()).map_err(io_at("cannot stat", &rel))?;
                self.record(&rel, entry_of(&rel, EntryKind::Dir, &st), StatKey::of(&st));
                if whole || !was_dir {
                    self.walk(&fd, &rel)?;
                }
                Ok(())
            }
            libc::S_IFREG => self.copy_file(dir, &c, &rel, &st),
            libc::S_IFLNK => {
                let target = match read_link_at(dir.as_raw_fd(), &c) {
                    Ok(t) => t,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        self.remove(&rel);
                        return Ok(());
                    }
                    Err(e) => return Err(io_at("cannot read the link", &rel)(e)),
                };
                let Ok(target) = String::from_utf8(target) else {
                    self.report.skipped_names += 1;
                    return Ok(());
                };
                let mut e = entry_of(&rel, EntryKind::Symlink, &st);
                e.size_bytes = 0;
                e.target = Some(target);
                self.record(&rel, e, StatKey::of(&st));
                Ok(())
            }
            _ => {
                self.remove(&rel);
                self.special.insert(rel);
                Ok(())
            }
        }
    }

    fn copy_file(
        &mut self,
        dir: &OwnedFd,
        c: &CStr,
        rel: &str,
        st: &libc::stat,
    ) -> Result<(), ArchiveError> {
        let key = StatKey::of(st);
        if self.keys.get(rel) == Some(&key)
            && self.entries.get(rel).map(|e| e.kind) == Some(EntryKind::File)
        {
            return Ok(()); // unchanged since its copy
        }
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
        let fd = match open_at(dir.as_raw_fd(), c, flags | libc::O_NOATIME, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                open_at(dir.as_raw_fd(), c, flags, 0)
            }
            r => r,
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => {
                self.changed.insert(rel.to_string(), false);
                return Ok(());
            }
            Err(e) => return Err(io_at("cannot open", rel)(e)),
        };
        let st = stat_fd(fd.as_raw_fd()).map_err(io_at("cannot stat", rel))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            // Swapped for something else between the stat and the open.
            self.changed.insert(rel.to_string(), false);
            return Ok(());
        }
        if self.keys.contains_key(rel) {
            self.report.recopied += 1;
        }
        let file = std::fs::File::from(fd);
        let cb = self.settings.chunk_bytes as usize;
        let lb = self.opts.leaf_bytes;
        let size = st.st_size.max(0) as u64;
        let mut chunks = Vec::with_capacity(size.div_ceil(cb as u64) as usize);
        let mut off = 0u64;
        let mut leaves = Vec::new();
        self.buf.resize(cb, 0);
        while off < size {
            self.check_stop()?;
            let want = (size - off).min(cb as u64) as usize;
            let mut got = 0;
            while got < want {
                match std::os::unix::fs::FileExt::read_at(
                    &file,
                    &mut self.buf[got..want],
                    off + got as u64,
                ) {
                    Ok(0) => break, // truncated meanwhile
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_at("cannot read", rel)(e)),
                }
            }
            if got == 0 {
                break;
            }
            let b = &self.buf[..got];
            self.stats.read_bytes += got as u64;
            self.report.read_bytes += got as u64;
            self.stats.chunks += 1;
            if b.iter().all(|&x| x == 0) {
                self.stats.zero_chunks += 1;
                chunks.push(None);
            } else {
                leaves.clear();
                ferry_core::merkle::leaves_of(b, lb as usize, &mut leaves);
                let id = ChunkId::of_leaves(got as u64, &leaves);
                let put = self.store.put(&id, b, self.settings.zstd_level)?;
                if put.new {
                    self.stats.new_chunks += 1;
                    self.stats.new_stored_bytes += put.stored_bytes;
                    self.stats.new_raw_bytes += got as u64;
                }
                self.chunk_ids.insert(id);
                chunks.push(Some(id));
            }
            off += got as u64;
            self.since_checkpoint += got as u64;
            if self.since_checkpoint >= self.settings.checkpoint_bytes {
                self.checkpoint()?;
            }
            self.tick();
            if got < want {
                break;
            }
        }
        // Changed while read: copied again in the next pass (the watcher
        // says so too; this also covers unwatched directories).
        let after = stat_fd(file.as_raw_fd()).map_err(io_at("cannot stat", rel))?;
        if StatKey::of(&after) != StatKey::of(&st) {
            self.changed.insert(rel.to_string(), false);
        }
        let mut e = entry_of(rel, EntryKind::File, &st);
        e.size_bytes = off;
        e.chunks = chunks;
        self.record(rel, e, StatKey::of(&st));
        self.pass_changes += 1;
        Ok(())
    }

    /// Makes the chunks so far durable and names them in the progress
    /// record (a prune keeps them).
    fn checkpoint(&mut self) -> Result<(), ArchiveError> {
        self.since_checkpoint = 0;
        self.store.sync()?;
        self.partial.files = self.chunk_ids.iter().copied().collect();
        self.partial.updated_unix_ms = crate::sys::unix_ms();
        self.store.save_partial(&self.partial)
    }

    /// Copies `rel` again: its parent opened component by component from
    /// the root, never through a symlink.
    fn revisit(&mut self, rel: &str, whole: bool) -> Result<(), ArchiveError> {
        self.check_stop()?;
        let parts: Vec<&str> = rel.split('/').collect();
        let (name, dirs) = parts.split_last().expect("split gives one part at least");
        let mut fd: Option<OwnedFd> = None;
        for d in dirs {
            let c = cname(d).map_err(io_at("bad name", rel))?;
            let at = fd.as_ref().map_or(self.root.as_raw_fd(), |f| f.as_raw_fd());
            match open_at(
                at,
                &c,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            ) {
                Ok(f) => fd = Some(f),
                Err(_) => {
                    // A parent is gone or is no directory now: so is `rel`
                    // (the parent's own event handles the parent).
                    self.remove(rel);
                    return Ok(());
                }
            }
        }
        let parent = dirs.join("/");
        if self.is_excluded(&parent) || (!parent.is_empty() && !self.entries.contains_key(&parent))
        {
            return Ok(()); // under an excluded directory or a mount point
        }
        if self.mounts.contains(&parent) {
            return Ok(());
        }
        let dirfd = match fd {
            Some(f) => f,
            None => open_at(
                self.root.as_raw_fd(),
                c".",
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .map_err(io_at("cannot open", ""))?,
        };
        self.visit(&dirfd, &parent, name, whole)
    }
}

/// Captures the tree at `root_dir` into `store` as archive `name`: passes
/// under a watcher until one sees no change or `opts.max_passes`.
/// `excludes` are paths within the tree (`/proc` or `proc`). Holds the
/// store's shared lock; the manifest is written last, after a sync.
#[allow(clippy::too_many_arguments)]
pub fn capture(
    store: &Store,
    root_dir: &Path,
    excludes: &[PathBuf],
    name: &Name,
    source: Source,
    settings: &ArchiveSettings,
    opts: &CaptureOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(TreeProgress),
) -> Result<Captured, ArchiveError> {
    capture_with(
        store,
        root_dir,
        excludes,
        name,
        source,
        settings,
        opts,
        stop,
        progress,
        &mut || {},
    )
}

/// [`capture`], with `after_first_pass` run between the first pass and the
/// next (tests change the tree there).
#[allow(clippy::too_many_arguments)]
fn capture_with(
    store: &Store,
    root_dir: &Path,
    excludes: &[PathBuf],
    name: &Name,
    source: Source,
    settings: &ArchiveSettings,
    opts: &CaptureOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(TreeProgress),
    after_first_pass: &mut dyn FnMut(),
) -> Result<Captured, ArchiveError> {
    settings.check(opts.leaf_bytes)?;
    if opts.max_passes == 0 {
        return Err(ArchiveError::Settings(
            "max_passes must be 1 or more".into(),
        ));
    }
    let _lock = store.lock_shared()?;
    if store.exists(name) {
        return Err(ArchiveError::Exists {
            name: name.as_str().to_string(),
            store: store.root().to_path_buf(),
        });
    }
    let started = Instant::now();
    let rootc = CString::new(root_dir.as_os_str().as_bytes())
        .map_err(|_| ArchiveError::Settings(format!("{} has a NUL byte", root_dir.display())))?;
    let root = open_at(
        libc::AT_FDCWD,
        &rootc,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|source| ArchiveError::Io {
        what: "cannot open the root",
        path: root_dir.to_path_buf(),
        source,
    })?;
    let rst = stat_fd(root.as_raw_fd()).map_err(|source| ArchiveError::Io {
        what: "cannot stat",
        path: root_dir.to_path_buf(),
        source,
    })?;
    // SAFETY: zeroed is a valid statvfs; fstatvfs writes into it.
    let total_estimate = unsafe {
        let mut sv: libc::statvfs = std::mem::zeroed();
        if libc::fstatvfs(root.as_raw_fd(), &mut sv) == 0 {
            (sv.f_blocks.saturating_sub(sv.f_bfree)).saturating_mul(sv.f_frsize)
        } else {
            0
        }
    };
    let excludes: Vec<String> = excludes
        .iter()
        .map(|p| {
            p.to_string_lossy()
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect::<Vec<_>>()
                .join("/")
        })
        .filter(|p| !p.is_empty())
        .collect();
    let watcher = Watcher::new().map_err(|source| ArchiveError::Io {
        what: "cannot start the inotify watcher for",
        path: root_dir.to_path_buf(),
        source,
    })?;
    let mut c = Capture {
        store,
        settings,
        opts,
        stop,
        progress,
        root,
        root_dev: rst.st_dev,
        excludes,
        entries: BTreeMap::new(),
        keys: HashMap::new(),
        watcher,
        changed: BTreeMap::new(),
        overflow: false,
        unwatched: BTreeSet::new(),
        special: BTreeSet::new(),
        mounts: BTreeSet::new(),
        excluded: BTreeSet::new(),
        chunk_ids: BTreeSet::new(),
        partial: Partial {
            name: name.clone(),
            source_key: format!("tree|{}", root_dir.display()),
            chunk_bytes: settings.chunk_bytes,
            leaf_bytes: opts.leaf_bytes,
            disks: Vec::new(),
            files: Vec::new(),
            updated_unix_ms: crate::sys::unix_ms(),
        },
        since_checkpoint: 0,
        stats: CreateStats::default(),
        report: CaptureReport::default(),
        pass: 1,
        pass_changes: 0,
        started,
        last_report: Instant::now(),
        total_estimate,
        buf: Vec::new(),
    };
    let result = (|| -> Result<(), ArchiveError> {
        let root = c.root.try_clone().map_err(io_at("cannot open", ""))?;
        c.walk(&root, "")?;
        tracing::info!(archive = %name.as_str(), files = c.entries.len(), "p2v.capture.pass_done");
        after_first_pass();
        loop {
            c.overflow |= c.watcher.drain(&mut c.changed);
            let pending = !c.changed.is_empty()
                || c.overflow
                || (!c.unwatched.is_empty() && (c.pass == 1 || c.pass_changes > 0));
            if !pending {
                c.report.settled = true;
                break;
            }
            if c.pass >= c.opts.max_passes {
                c.report.changed_after_last_pass = c.changed.len() as u64;
                break;
            }
            c.pass += 1;
            c.pass_changes = 0;
            if std::mem::take(&mut c.overflow) {
                c.changed.clear();
                c.walk(&root, "")?;
            }
            for (p, whole) in std::mem::take(&mut c.changed) {
                c.revisit(&p, whole)?;
            }
            for d in c.unwatched.clone() {
                if d.is_empty() {
                    c.walk(&root, "")?;
                } else {
                    c.revisit(&d, true)?;
                }
            }
            tracing::info!(archive = %name.as_str(), pass = c.pass, changes = c.pass_changes, "p2v.capture.pass_done");
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Keep the chunks named so far (a prune keeps them).
        if !c.chunk_ids.is_empty() {
            let _ = c.checkpoint();
        }
        return Err(e);
    }
    let mut report = std::mem::take(&mut c.report);
    report.passes = c.pass;
    report.skipped_special = c.special.len() as u64;
    report.skipped_mounts = c.mounts.iter().cloned().collect();
    report.unwatched_dirs = c.unwatched.len() as u64;
    report.excluded = c.excluded.iter().cloned().collect();
    let entries: Vec<Entry> = std::mem::take(&mut c.entries).into_values().collect();
    for e in &entries {
        match e.kind {
            EntryKind::File => {
                report.files += 1;
                report.bytes += e.size_bytes;
            }
            EntryKind::Dir => report.dirs += 1,
            EntryKind::Symlink => report.symlinks += 1,
        }
    }
    store.sync()?;
    let mut stats = std::mem::take(&mut c.stats);
    stats.elapsed_ms = started.elapsed().as_millis() as u64;
    report.elapsed_ms = stats.elapsed_ms;
    let m = Manifest {
        name: name.clone(),
        created_unix_ms: crate::sys::unix_ms(),
        source,
        consistency: Consistency::FileLevel,
        chunk_bytes: settings.chunk_bytes,
        leaf_bytes: opts.leaf_bytes,
        disks: Vec::new(),
        trees: vec![Tree {
            name: "root".into(),
            entries,
        }],
        workload: None,
        stats,
    };
    store.save_manifest(&m)?;
    store.remove_partial(name);
    (c.progress)(TreeProgress::at(
        c.pass,
        report.files,
        report.read_bytes,
        report.read_bytes,
        started,
    ));
    Ok(Captured {
        manifest: m,
        report,
    })
}

/// A manifest path as checked components: relative, `/`-separated, no
/// empty, `.` or `..` part, no NUL.
pub fn path_components(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.starts_with('/') {
        return Err("the path is absolute".into());
    }
    if path.contains('\0') {
        return Err("the path has a NUL byte".into());
    }
    let parts: Vec<&str> = path.split('/').collect();
    for p in &parts {
        match *p {
            "" => return Err("the path has an empty part".into()),
            "." | ".." => return Err(format!("the path has a {p:?} part")),
            _ => {}
        }
    }
    Ok(parts)
}

/// What a tree restore did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreTreeReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Ownership set (only as root).
    pub owners_set: bool,
}

fn damaged(m: &Manifest, why: String) -> ArchiveError {
    ArchiveError::Damaged {
        path: PathBuf::from(format!("archive {}", m.name.as_str())),
        why,
    }
}

/// Opens the directory `parts` under `base`, component by component, never
/// through a symlink.
fn open_dir_at(base: RawFd, parts: &[&str]) -> io::Result<OwnedFd> {
    let mut fd = open_at(base, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    for p in parts {
        let c = cname(p)?;
        fd = open_at(
            fd.as_raw_fd(),
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
    }
    Ok(fd)
}

fn times(mtime_ns: i64) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
    };
    [ts, ts]
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets ownership (as root), mode and mtime of an open file or directory.
fn set_meta(fd: RawFd, e: &Entry, as_root: bool) -> io::Result<()> {
    if as_root {
        // SAFETY: a descriptor the caller holds; no memory is passed.
        cvt(unsafe { libc::fchown(fd, e.uid, e.gid) })?;
    }
    // After the chown (which clears setuid/setgid).
    // SAFETY: as above.
    cvt(unsafe { libc::fchmod(fd, e.mode & 0o7777) })?;
    let t = times(e.mtime_unix_ns);
    // SAFETY: `t` is two valid timespecs that outlive the call.
    cvt(unsafe { libc::futimens(fd, t.as_ptr()) })
}

/// Recreates `tree` of `m` under `target_dir` (new, or an empty directory),
/// every chunk checked against its id.
pub fn restore_tree(
    store: &Store,
    m: &Manifest,
    tree: &Tree,
    target_dir: &Path,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(TreeProgress),
) -> Result<RestoreTreeReport, ArchiveError> {
    let started = Instant::now();
    let tio = |what: &'static str| {
        move |source| ArchiveError::Io {
            what,
            path: target_dir.to_path_buf(),
            source,
        }
    };
    // Check every path before anything is written.
    let mut order: Vec<(&Entry, Vec<&str>)> = Vec::with_capacity(tree.entries.len());
    for e in &tree.entries {
        let parts = path_components(&e.path)
            .map_err(|why| damaged(m, format!("entry {:?}: {why}", e.path)))?;
        order.push((e, parts));
    }
    order.sort_by(|a, b| a.1.cmp(&b.1));
    let tc = CString::new(target_dir.as_os_str().as_bytes())
        .map_err(|_| ArchiveError::Settings(format!("{} has a NUL byte", target_dir.display())))?;
    // SAFETY: `tc` outlives the call.
    let rc = unsafe { libc::mkdir(tc.as_ptr(), 0o755) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(tio("cannot create")(e));
        }
    }
    let root = open_at(
        libc::AT_FDCWD,
        &tc,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .map_err(tio("cannot open"))?;
    if !dir_names(root.as_raw_fd())
        .map_err(tio("cannot read"))?
        .is_empty()
    {
        return Err(ArchiveError::Settings(format!(
            "{} is not empty: a tree is restored into an empty or new directory",
            target_dir.display()
        )));
    }
    // SAFETY: no memory is passed.
    let as_root = unsafe { libc::geteuid() } == 0;
    let total: u64 = tree.entries.iter().map(|e| e.size_bytes).sum();
    let mut report = RestoreTreeReport {
        owners_set: as_root,
        ..Default::default()
    };
    let mut parent: Option<(Vec<&str>, OwnedFd)> = None;
    let mut dirs: Vec<(&Entry, &Vec<&str>)> = Vec::new();
    let mut leaves = Vec::new();
    let mut last = Instant::now();
    for (e, parts) in &order {
        if stop.load(Ordering::Relaxed) {
            return Err(ArchiveError::Interrupted);
        }
        let (name, dir) = parts.split_last().expect("checked: not empty");
        if parent.as_ref().map(|(p, _)| p.as_slice()) != Some(dir) {
            let fd = open_dir_at(root.as_raw_fd(), dir).map_err(|source| ArchiveError::Io {
                what: "cannot open",
                path: target_dir.join(dir.join("/")),
                source,
            })?;
            parent = Some((dir.to_vec(), fd));
        }
        let pfd = parent.as_ref().expect("set above").1.as_raw_fd();
        let out = target_dir.join(&e.path);
        let oio = |what: &'static str| {
            let out = out.clone();
            move |source| ArchiveError::Io {
                what,
                path: out,
                source,
            }
        };
        let c = cname(name).map_err(oio("bad name"))?;
        match e.kind {
            EntryKind::Dir => {
                // SAFETY: `c` outlives the call.
                cvt(unsafe { libc::mkdirat(pfd, c.as_ptr(), 0o700) })
                    .map_err(oio("cannot create"))?;
                dirs.push((e, parts));
                report.dirs += 1;
            }
            EntryKind::Symlink => {
                let t = e.target.as_deref().unwrap_or("");
                let tc = CString::new(t).map_err(|_| {
                    damaged(m, format!("entry {:?}: its target has a NUL byte", e.path))
                })?;
                // SAFETY: both strings outlive the call.
                cvt(unsafe { libc::symlinkat(tc.as_ptr(), pfd, c.as_ptr()) })
                    .map_err(oio("cannot create"))?;
                if as_root {
                    // SAFETY: as above; the link itself, never its target.
                    cvt(unsafe {
                        libc::fchownat(pfd, c.as_ptr(), e.uid, e.gid, libc::AT_SYMLINK_NOFOLLOW)
                    })
                    .map_err(oio("cannot chown"))?;
                }
                let tm = times(e.mtime_unix_ns);
                // SAFETY: as above.
                cvt(unsafe {
                    libc::utimensat(pfd, c.as_ptr(), tm.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                })
                .map_err(oio("cannot set the time of"))?;
                report.symlinks += 1;
            }
            EntryKind::File => {
                let fd = open_at(
                    pfd,
                    &c,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(oio("cannot create"))?;
                let f = std::fs::File::from(fd);
                let mut off = 0u64;
                for id in &e.chunks {
                    let len = (e.size_bytes.saturating_sub(off)).min(m.chunk_bytes);
                    if len == 0 {
                        return Err(damaged(
                            m,
                            format!("entry {:?}: more chunks than its size", e.path),
                        ));
                    }
                    if let Some(id) = id {
                        let raw = store.read(id, m.leaf_bytes, &mut leaves)?;
                        if raw.len() as u64 != len {
                            return Err(ArchiveError::BadChunk {
                                id: *id,
                                path: store.root().to_path_buf(),
                                why: format!("{} bytes where {:?} has {len}", raw.len(), e.path),
                            });
                        }
                        std::os::unix::fs::FileExt::write_all_at(&f, &raw, off)
                            .map_err(oio("cannot write"))?;
                    }
                    off += len;
                }
                if off != e.size_bytes {
                    return Err(damaged(
                        m,
                        format!(
                            "entry {:?}: its chunks hold {off} of {} bytes",
                            e.path, e.size_bytes
                        ),
                    ));
                }
                f.set_len(e.size_bytes).map_err(oio("cannot write"))?;
                set_meta(f.as_raw_fd(), e, as_root)
                    .map_err(oio("cannot set the owner, mode or time of"))?;
                report.files += 1;
                report.bytes += e.size_bytes;
                if last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    progress(TreeProgress::at(
                        1,
                        report.files,
                        report.bytes,
                        total,
                        started,
                    ));
                }
            }
        }
    }
    drop(parent);
    // Directories last, deepest first (their entries changed their mtime).
    for (e, parts) in dirs.iter().rev() {
        let fd = open_dir_at(root.as_raw_fd(), parts).map_err(|source| ArchiveError::Io {
            what: "cannot open",
            path: target_dir.join(&e.path),
            source,
        })?;
        set_meta(fd.as_raw_fd(), e, as_root).map_err(|source| ArchiveError::Io {
            what: "cannot set the owner, mode or time of",
            path: target_dir.join(&e.path),
            source,
        })?;
    }
    progress(TreeProgress::at(
        1,
        report.files,
        report.bytes,
        total,
        started,
    ));
    Ok(report)
}

/// The bytes of file entry `e`, chunks checked.
pub fn read_entry(
    store: &Store,
    m: &Manifest,
    e: &Entry,
    out: &mut dyn io::Write,
) -> Result<u64, ArchiveError> {
    let mut leaves = Vec::new();
    let mut off = 0u64;
    let zeros = vec![0u8; m.chunk_bytes as usize];
    for id in &e.chunks {
        let len = (e.size_bytes.saturating_sub(off)).min(m.chunk_bytes);
        let w = match id {
            Some(id) => {
                let raw = store.read(id, m.leaf_bytes, &mut leaves)?;
                if raw.len() as u64 != len {
                    return Err(damaged(
                        m,
                        format!(
                            "entry {:?}: a chunk of {} bytes where {len} belong",
                            e.path,
                            raw.len()
                        ),
                    ));
                }
                out.write_all(&raw)
            }
            None => out.write_all(&zeros[..len as usize]),
        };
        w.map_err(|source| ArchiveError::Io {
            what: "cannot write",
            path: PathBuf::from(&e.path),
            source,
        })?;
        off += len;
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::SourceKind;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn settings() -> ArchiveSettings {
        ArchiveSettings {
            chunk_bytes: 128 << 10,
            checkpoint_bytes: 256 << 10,
            threads: 1,
            ..Default::default()
        }
    }

    fn src() -> Source {
        Source {
            kind: SourceKind::Tree,
            name: "t".into(),
            node: "test".into(),
        }
    }

    #[test]
    fn capture_and_restore_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("tree");
        std::fs::create_dir_all(t.join("etc/sub")).unwrap();
        std::fs::create_dir_all(t.join("proc/1")).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(t.join("etc/big"), &big).unwrap();
        let mut holey = vec![0u8; 400 << 10];
        holey[399 << 10] = 1;
        std::fs::write(t.join("etc/holey"), &holey).unwrap();
        std::fs::write(t.join("etc/sub/x"), b"x").unwrap();
        std::fs::set_permissions(t.join("etc/sub/x"), std::fs::Permissions::from_mode(0o4751))
            .unwrap();
        std::os::unix::fs::symlink("../etc/big", t.join("etc/sub/link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", t.join("dangling")).unwrap();
        std::fs::write(t.join("proc/1/status"), b"excluded").unwrap();
        let fifo = CString::new(t.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let store = Store::open(&dir.path().join("store"), true).unwrap();
        let stop = AtomicBool::new(false);
        let name = Name::parse("t1").unwrap();
        let c = capture(
            &store,
            &t,
            &[PathBuf::from("/proc")],
            &name,
            src(),
            &settings(),
            &CaptureOptions::default(),
            &stop,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(c.report.passes, 1, "{:?}", c.report);
        assert!(c.report.settled);
        assert_eq!(c.report.skipped_special, 1);
        assert_eq!(c.report.files, 3);
        assert_eq!(c.report.excluded, vec!["proc".to_string()]);
        let m = store.manifest(&name).unwrap();
        assert_eq!(m.consistency, Consistency::FileLevel);
        let holey_e = m.trees[0]
            .entries
            .iter()
            .find(|e| e.path == "etc/holey")
            .unwrap();
        assert_eq!(holey_e.chunks.iter().filter(|c| c.is_none()).count(), 3);
        let out = dir.path().join("out");
        restore_tree(&store, &m, &m.trees[0], &out, &stop, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(out.join("etc/big")).unwrap(), big);
        assert_eq!(std::fs::read(out.join("etc/holey")).unwrap(), holey);
        assert_eq!(
            std::fs::read_link(out.join("etc/sub/link")).unwrap(),
            Path::new("../etc/big")
        );
        assert_eq!(
            std::fs::read_link(out.join("dangling")).unwrap(),
            Path::new("/nonexistent")
        );
        assert_eq!(
            std::fs::metadata(out.join("etc/sub/x")).unwrap().mode() & 0o7777,
            0o4751
        );
        assert_eq!(
            std::fs::metadata(out.join("etc/big")).unwrap().mtime(),
            std::fs::metadata(t.join("etc/big")).unwrap().mtime()
        );
        assert!(out.join("proc").is_dir());
        assert!(!out.join("proc/1").exists());
        assert!(!out.join("fifo").exists());
        // Not into a non-empty directory.
        let e = restore_tree(&store, &m, &m.trees[0], &out, &stop, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
    }

    #[test]
    fn changes_after_the_first_pass_are_copied_in_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("tree");
        std::fs::create_dir_all(t.join("a/deep")).unwrap();
        for i in 0..5 {
            std::fs::write(t.join(format!("a/f{i}")), vec![i as u8 + 1; 70_000]).unwrap();
        }
        std::fs::write(t.join("gone"), b"soon deleted").unwrap();
        std::fs::write(t.join("a/deep/old"), b"old").unwrap();
        let store = Store::open(&dir.path().join("store"), true).unwrap();
        let stop = AtomicBool::new(false);
        let t2 = t.clone();
        let name = Name::parse("t2").unwrap();
        let c = capture_with(
            &store,
            &t,
            &[],
            &name,
            src(),
            &settings(),
            &CaptureOptions::default(),
            &stop,
            &mut |_| {},
            &mut || {
                std::fs::write(t2.join("a/f0"), b"changed").unwrap();
                std::fs::create_dir(t2.join("newdir")).unwrap();
                std::fs::write(t2.join("newdir/n"), b"new").unwrap();
                std::fs::remove_file(t2.join("gone")).unwrap();
                std::fs::remove_file(t2.join("a/deep/old")).unwrap();
                std::fs::write(t2.join("a/deep/new"), b"deep new").unwrap();
            },
        )
        .unwrap();
        assert_eq!(c.report.passes, 2, "{:?}", c.report);
        assert!(c.report.settled);
        assert_eq!(
            c.report.recopied, 1,
            "only a/f0 is read again: {:?}",
            c.report
        );
        let out = dir.path().join("out");
        let m = store.manifest(&name).unwrap();
        restore_tree(&store, &m, &m.trees[0], &out, &stop, &mut |_| {}).unwrap();
        let paths: Vec<&str> = m.trees[0].entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "a",
                "a/deep",
                "a/deep/new",
                "a/f0",
                "a/f1",
                "a/f2",
                "a/f3",
                "a/f4",
                "newdir",
                "newdir/n"
            ]
        );
        assert_eq!(std::fs::read(out.join("a/f0")).unwrap(), b"changed");
        assert_eq!(std::fs::read(out.join("newdir/n")).unwrap(), b"new");
        assert_eq!(std::fs::read(out.join("a/deep/new")).unwrap(), b"deep new");
    }

    #[test]
    fn restore_refuses_unsafe_paths() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "a/..",
            "",
            "a/\0b",
            "a/",
        ] {
            assert!(path_components(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            path_components("a/b.c/..d").unwrap(),
            vec!["a", "b.c", "..d"]
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), true).unwrap();
        let e = Entry {
            path: "../escape".into(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_unix_ns: 0,
            size_bytes: 0,
            target: None,
            chunks: Vec::new(),
        };
        let m = Manifest {
            name: Name::parse("bad").unwrap(),
            created_unix_ms: 0,
            source: src(),
            consistency: Consistency::FileLevel,
            chunk_bytes: 1 << 20,
            leaf_bytes: 64 << 10,
            disks: Vec::new(),
            trees: vec![Tree {
                name: "root".into(),
                entries: vec![e],
            }],
            workload: None,
            stats: CreateStats::default(),
        };
        let out = dir.path().join("out");
        let err = restore_tree(
            &store,
            &m,
            &m.trees[0],
            &out,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
        assert!(!dir.path().join("escape").exists());
        // A symlinked parent is never followed: "d" a link to outside, "d/x" refused at open.
        let m2 = Manifest {
            trees: vec![Tree {
                name: "root".into(),
                entries: vec![
                    Entry {
                        path: "d".into(),
                        kind: EntryKind::Symlink,
                        target: Some(dir.path().to_string_lossy().into_owned()),
                        ..m.trees[0].entries[0].clone()
                    },
                    Entry {
                        path: "d/x".into(),
                        kind: EntryKind::Dir,
                        ..m.trees[0].entries[0].clone()
                    },
                ],
            }],
            ..m.clone()
        };
        let out2 = dir.path().join("out2");
        assert!(restore_tree(
            &store,
            &m2,
            &m2.trees[0],
            &out2,
            &AtomicBool::new(false),
            &mut |_| {}
        )
        .is_err());
        assert!(!dir.path().join("x").exists());
    }
}
