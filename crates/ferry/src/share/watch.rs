//! The watcher of an async share: inotify on every directory of a tree used
//! in place (no mount).
//!
//! Events are gathered for `watch_batch_delay_ms` after the first, turned
//! into [`Changes`] (paths to compare, directories whose times changed,
//! renames with both ends inside the share) and handed to the share, whose
//! link compares them with the replica: files by content (deltas), the rest
//! by type, size, mtime, mode and owner.
//!
//! Lost events — the kernel's queue overflowed (`IN_Q_OVERFLOW`) or a batch
//! grew past `watch_pending_paths_max` — become a rescan of the tree in which
//! only files whose ctime is after the last complete batch are compared by
//! content. Directories inotify cannot watch (`fs.inotify.max_user_watches`)
//! are rescanned every `watch_rescan_interval_ms`. Both show in status.
//!
//! An async share is not crash-consistent: the replica follows the tree with
//! a lag, file by file, not in the order the application wrote.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_wire::SharePath;

use super::primary::{now_unix, Changes, PrimaryShare};
use super::settings::ShareSettings;

/// Events inotify reports on a watched directory.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW
    | libc::IN_EXCL_UNLINK;

/// A running watcher; dropping it stops the thread.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts watching `share`'s tree (its root: where the tree was opened).
pub fn start(share: Arc<PrimaryShare>, cfg: ShareSettings) -> std::io::Result<Watcher> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by inotify_init1 and is owned here only.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut w = State {
        fd,
        wds: HashMap::new(),
        unwatched: BTreeSet::new(),
        closed: BTreeSet::new(),
        share,
        cfg,
    };
    w.add_tree(&SharePath::root());
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("share-watch-{}", w.share.name))
            .spawn(move || w.run(&stop))?
    };
    Ok(Watcher {
        stop,
        thread: Some(thread),
    })
}

struct State {
    fd: OwnedFd,
    /// Watch descriptor → the directory it watches.
    wds: HashMap<i32, SharePath>,
    /// Directories that could not be watched (limit reached): rescanned.
    unwatched: BTreeSet<SharePath>,
    /// Directories this agent may not read (EACCES): reported by the
    /// resync; watched, and compared whole, once their mode lets it.
    closed: BTreeSet<SharePath>,
    share: Arc<PrimaryShare>,
    cfg: ShareSettings,
}

/// One batch being gathered.
#[derive(Default)]
struct Batch {
    deep: BTreeSet<SharePath>,
    shallow: BTreeSet<SharePath>,
    renames: Vec<(SharePath, SharePath)>,
    /// MOVED_FROM seen, waiting for its MOVED_TO: cookie → (path, is dir).
    moved_from: HashMap<u32, (SharePath, bool)>,
    overflow: bool,
    first: Option<Instant>,
}

impl Batch {
    fn len(&self) -> usize {
        self.deep.len() + self.shallow.len() + self.renames.len()
    }
}

impl State {
    /// Watches `dir` and every directory below it (not following symlinks).
    fn add_tree(&mut self, dir: &SharePath) {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            // Opened beneath the root without following symlinks, then
            // watched and listed through that descriptor: a directory swapped
            // for a symlink meanwhile cannot lead the watch out of the tree.
            let dir = match self.share.tree.open_dir(&d) {
                Ok(fd) => fd,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EACCES) {
                        self.closed.insert(d);
                    }
                    continue;
                }
            };
            let abs = format!("/proc/self/fd/{}", dir.as_raw_fd());
            let Ok(c) = CString::new(abs.as_bytes()) else {
                continue;
            };
            // SAFETY: valid inotify descriptor and NUL-terminated path. The
            // magic link is followed to the directory opened above.
            let wd = unsafe {
                libc::inotify_add_watch(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    MASK & !libc::IN_DONT_FOLLOW,
                )
            };
            if wd < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    tracing::warn!(share = %self.share.name, dir = %d.display(),
                        "share.watch.limit: fs.inotify.max_user_watches reached; rescanning this subtree periodically");
                    self.unwatched.insert(d);
                } else if e.raw_os_error() == Some(libc::EACCES) {
                    self.closed.insert(d);
                }
                // ENOENT / ENOTDIR: gone or replaced meanwhile; its event covers it.
                continue;
            }
            self.unwatched.remove(&d);
            self.closed.remove(&d);
            self.wds.insert(wd, d.clone());
            let Ok(rd) = std::fs::read_dir(&abs) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    if let Ok(child) = d.join(e.file_name().as_bytes()) {
                        stack.push(child);
                    }
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let s = &self.share.stats;
        s.watched_dirs
            .store(self.wds.len() as u64, Ordering::Relaxed);
        s.unwatched_dirs
            .store(self.unwatched.len() as u64, Ordering::Relaxed);
    }

    /// A watched directory moved from `from` to `to`: its watches' paths follow.
    fn moved(&mut self, from: &SharePath, to: &SharePath) {
        let follow = |p: &SharePath| -> Option<SharePath> {
            let rest = &p.as_bytes()[from.as_bytes().len()..];
            let mut b = to.as_bytes().to_vec();
            b.extend_from_slice(rest);
            SharePath::new(b).ok()
        };
        for p in self.wds.values_mut() {
            if p.starts_with(from) {
                if let Some(n) = follow(p) {
                    *p = n;
                }
            }
        }
        self.closed = std::mem::take(&mut self.closed)
            .into_iter()
            .map(|p| match p.starts_with(from) {
                true => follow(&p).unwrap_or(p),
                false => p,
            })
            .collect();
    }

    /// A directory left the tree: stop watching it and what is below.
    fn forget(&mut self, gone: &SharePath) {
        let wds: Vec<i32> = self
            .wds
            .iter()
            .filter(|(_, p)| p.starts_with(gone))
            .map(|(w, _)| *w)
            .collect();
        for wd in wds {
            // SAFETY: valid inotify descriptor; a stale wd only fails.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            self.wds.remove(&wd);
        }
        self.closed.retain(|p| !p.starts_with(gone));
        self.publish();
    }

    fn run(mut self, stop: &AtomicBool) {
        let delay = Duration::from_millis(self.cfg.watch_batch_delay_ms);
        let rescan_every = Duration::from_millis(self.cfg.watch_rescan_interval_ms.max(100));
        let mut batch = Batch::default();
        let mut buf = vec![0u8; 64 * 1024];
        // Changes before this moment are all on their way (or were when a
        // batch was last handed over without loss).
        let mut sound_since = now_unix();
        let mut last_rescan = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let timeout_ms = match batch.first {
                Some(t) => delay.saturating_sub(t.elapsed()).as_millis() as i32,
                None => 200,
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            self.read_events(&mut buf, &mut batch);
            if batch.len() > self.cfg.watch_pending_paths_max {
                tracing::warn!(share = %self.share.name, paths = batch.len(),
                    limit = self.cfg.watch_pending_paths_max, "share.watch.batch_over_limit: rescanning");
                batch.overflow = true;
            }
            if !self.unwatched.is_empty() && last_rescan.elapsed() >= rescan_every {
                last_rescan = Instant::now();
                let dirs: Vec<SharePath> = self.unwatched.iter().cloned().collect();
                for d in dirs {
                    self.add_tree(&d);
                    batch.deep.insert(d);
                }
                self.share.stats.rescans.fetch_add(1, Ordering::Relaxed);
                batch.first.get_or_insert_with(Instant::now);
            }
            let due = batch.first.is_some_and(|t| t.elapsed() >= delay) || batch.overflow;
            if !due {
                continue;
            }
            let now = now_unix();
            let mut changes = Changes::default();
            if batch.overflow {
                self.share.stats.overflows.fetch_add(1, Ordering::Relaxed);
                self.share.stats.rescans.fetch_add(1, Ordering::Relaxed);
                // New directories may have come unseen: watch them.
                self.add_tree(&SharePath::root());
                changes.unsure_since = Some(sound_since);
                changes.deep.push(SharePath::root());
            } else {
                for (_, (from, is_dir)) in batch.moved_from.drain() {
                    // Moved out of the share: gone.
                    if is_dir {
                        self.forget(&from);
                    }
                    batch.deep.insert(from);
                }
                changes.deep = std::mem::take(&mut batch.deep).into_iter().collect();
                changes.shallow = std::mem::take(&mut batch.shallow).into_iter().collect();
                changes.renames = std::mem::take(&mut batch.renames);
            }
            batch = Batch::default();
            sound_since = now;
            self.share.note_changes(changes);
        }
    }

    /// Reads every queued event into `batch`.
    fn read_events(&mut self, buf: &mut [u8], batch: &mut Batch) {
        loop {
            // SAFETY: valid descriptor; `buf` is writable for its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n <= 0 {
                return; // EAGAIN: drained
            }
            let n = n as usize;
            let mut off = 0;
            let hdr = std::mem::size_of::<libc::inotify_event>();
            while off + hdr <= n {
                // SAFETY: the kernel wrote a whole inotify_event at `off`
                // (events are never split across reads); read unaligned.
                let ev: libc::inotify_event = unsafe {
                    std::ptr::read_unaligned(buf[off..].as_ptr().cast::<libc::inotify_event>())
                };
                let len = ev.len as usize;
                let name_bytes = &buf[(off + hdr).min(n)..(off + hdr + len).min(n)];
                let name_end = name_bytes.iter().position(|&b| b == 0).unwrap_or(len);
                let name = name_bytes[..name_end.min(name_bytes.len())].to_vec();
                off += hdr + len;
                self.share
                    .stats
                    .watch_events
                    .fetch_add(1, Ordering::Relaxed);
                self.event(&ev, &name, batch);
            }
        }
    }

    fn event(&mut self, ev: &libc::inotify_event, name: &[u8], batch: &mut Batch) {
        let m = ev.mask;
        if m & libc::IN_Q_OVERFLOW != 0 {
            tracing::warn!(share = %self.share.name, "share.watch.overflow: the kernel dropped events; rescanning");
            batch.overflow = true;
            batch.first.get_or_insert_with(Instant::now);
            return;
        }
        if m & libc::IN_IGNORED != 0 {
            self.wds.remove(&ev.wd);
            self.publish();
            return;
        }
        let Some(dir) = self.wds.get(&ev.wd).cloned() else {
            return;
        };
        batch.first.get_or_insert_with(Instant::now);
        if name.is_empty() {
            // The directory itself (its attributes).
            if m & libc::IN_ATTRIB != 0 {
                batch.shallow.insert(dir);
            }
            return;
        }
        let Ok(p) = dir.join(name) else {
            return;
        };
        let is_dir = m & libc::IN_ISDIR != 0;
        if m & libc::IN_MOVED_FROM != 0 {
            batch.moved_from.insert(ev.cookie, (p, is_dir));
            batch.shallow.insert(dir);
        } else if m & libc::IN_MOVED_TO != 0 {
            batch.shallow.insert(dir);
            match batch.moved_from.remove(&ev.cookie) {
                Some((from, _)) => {
                    if is_dir {
                        self.moved(&from, &p);
                    }
                    batch.renames.push((from, p));
                }
                None => {
                    if is_dir {
                        self.add_tree(&p);
                    }
                    batch.deep.insert(p);
                }
            }
        } else if m & libc::IN_CREATE != 0 {
            if is_dir {
                self.add_tree(&p);
            }
            batch.deep.insert(p);
            batch.shallow.insert(dir);
        } else if m & libc::IN_DELETE != 0 {
            batch.deep.insert(p);
            batch.shallow.insert(dir);
        } else if is_dir && self.closed.contains(&p) {
            // A directory that was closed to us changed its mode: if it can
            // be watched now, its whole subtree is new to the replica.
            self.add_tree(&p);
            if self.closed.contains(&p) {
                batch.shallow.insert(p);
            } else {
                batch.deep.insert(p);
            }
        } else if is_dir {
            // A subdirectory's attributes (its own watch reports them too).
            batch.shallow.insert(p);
        } else {
            batch.deep.insert(p);
        }
    }
}
