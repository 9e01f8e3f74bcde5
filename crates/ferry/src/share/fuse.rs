//! The sync share's FUSE mount: a passthrough to the share's `data/`
//! directory in which every mutation is also sequenced on the share's stream
//! and answered once the replica has it ([`PrimaryShare`]).
//!
//! - No kernel writeback cache (it would reorder data and renames), no
//!   atomic O_TRUNC (a truncating open arrives as its own, replicated,
//!   `setattr`); `O_APPEND` and `O_DIRECT` are not passed to the backing file
//!   (the kernel gives every write its offset; O_DIRECT opens get
//!   `FOPEN_DIRECT_IO`), so both sides write the same bytes at the same place.
//! - `fsync`/`fdatasync`/`fsyncdir` and writes through O_SYNC/O_DSYNC handles
//!   return once everything before them is durable here and on the replica;
//!   `close` (FLUSH) waits for nothing more.
//! - An unlinked file that is still open moves to `orphans/ID` on both sides
//!   until its last close.
//! - The kernel checks permissions (`default_permissions`); new entries get
//!   the caller's uid/gid.
//! - A read-only open of a file nobody may write (no write permission bit)
//!   uses kernel passthrough where the kernel allows it (`FUSE_PASSTHROUGH`,
//!   root; `shares.passthrough_read_only_files`): reads and mmap go straight
//!   to the backing file. The kernel requires every open of an inode that
//!   has a backing file to pass through — writes too, which would bypass
//!   replication — so a writable open of it fails with ETXTBSY until those
//!   readers close; a read-only open while a writable handle is open is
//!   served here as usual.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_wire::{FileOp, Owner, SharePath, Stamp, StampedOp, Target, Time};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::primary::PrimaryShare;
use super::tree::{FileCache, Tree};

const TTL: Duration = Duration::from_secs(1);
/// How long a writable open waits for read-only passthrough handles of the
/// file that were closed to be released, before it fails with ETXTBSY (at
/// most `FUSE_THREADS - 1` such opens wait at once; more fail at once).
const PASSTHROUGH_RELEASE_WAIT: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Answers an empty reply with an outcome.
fn answer(reply: ReplyEmpty) -> impl FnOnce(io::Result<()>) + Send {
    move |r| match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

#[derive(Debug)]
struct Node {
    /// Names this inode is known by: (parent inode, name).
    links: Vec<(u64, Vec<u8>)>,
    lookups: u64,
    backing: u64,
    orphan: Option<u64>,
    opens: u32,
    /// Open handles in the kernel's cached io mode, and in passthrough
    /// mode (which share one backing id); the kernel refuses mixing them.
    cached_opens: u32,
    passthrough_opens: u32,
    backing_id: Option<fuser::BackingId>,
}

impl Node {
    /// Looked up once, not open.
    fn new(links: Vec<(u64, Vec<u8>)>, backing: u64) -> Node {
        Node {
            links,
            lookups: 1,
            backing,
            orphan: None,
            opens: 0,
            cached_opens: 0,
            passthrough_opens: 0,
            backing_id: None,
        }
    }
}

/// How the kernel does a handle's io.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoMode {
    /// Through this daemon, with the kernel's page cache (write-through).
    Cached,
    /// Through this daemon, no page cache (O_DIRECT).
    Direct,
    /// Reads straight from the backing file (read-only opens).
    Passthrough,
}

#[derive(Debug, Default)]
struct Inodes {
    nodes: HashMap<u64, Node>,
    /// FUSE workers waiting in a writable open for passthrough handles
    /// to be released.
    release_waiters: usize,
    by_backing: HashMap<u64, u64>,
    next: u64,
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    file: Arc<File>,
    /// O_SYNC / O_DSYNC: every write is a durable barrier on both sides.
    sync_writes: SyncWrites,
    mode: IoMode,
}

/// What each write through a handle makes durable on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncWrites {
    No,
    /// O_DSYNC: the data (an fdatasync).
    Data,
    /// O_SYNC: data and metadata (an fsync).
    All,
}

/// A directory's entries as served to readdir: (inode, type, name).
type Listing = Vec<(u64, FileType, Vec<u8>)>;

pub struct ShareFs {
    share: Arc<PrimaryShare>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Held from "is this file open?" to the orphan being marked (unlink,
    /// rename over), and by the last close: a close racing an unlink either
    /// sees the orphan or happens before the unlink looks.
    orphan_lock: Mutex<()>,
    /// Open directories: the listing taken at the first read (and again
    /// at a rewind), served by offset — a 100k-entry directory is read
    /// once per pass, not once per buffer.
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    /// Passthrough wanted (`shares.passthrough_read_only_files`), the
    /// kernel accepted `FUSE_PASSTHROUGH`, and backing files can be
    /// registered (cleared at the first refusal, e.g. without root).
    passthrough: std::sync::atomic::AtomicBool,
    passthrough_wanted: bool,
    /// Notified when a passthrough handle is released.
    released: std::sync::Condvar,
}

impl std::fmt::Debug for ShareFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareFs")
            .field("share", &self.share.name)
            .finish_non_exhaustive()
    }
}

fn time_of(secs: i64, nanos: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

fn wire_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Time { secs, nanos }
        }
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr_of(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time_of(st.st_atime, st.st_atime_nsec),
        mtime: time_of(st.st_mtime, st.st_mtime_nsec),
        ctime: time_of(st.st_ctime, st.st_ctime_nsec),
        crtime: time_of(st.st_ctime, st.st_ctime_nsec),
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn fstat(f: &File) -> io::Result<libc::stat> {
    // SAFETY: zeroed `stat` is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    if unsafe { libc::fstat(f.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn stamp_from(target: Target, st: &libc::stat) -> Stamp {
    Stamp {
        target,
        mtime: Time {
            secs: st.st_mtime,
            nanos: st.st_mtime_nsec as u32,
        },
    }
}

impl ShareFs {
    pub fn new(share: Arc<PrimaryShare>, passthrough: bool) -> io::Result<ShareFs> {
        let st = share.tree.lstat(&Target::Path(SharePath::root()))?;
        let mut inodes = Inodes {
            next: 2,
            ..Default::default()
        };
        inodes.nodes.insert(1, Node::new(vec![], st.st_ino));
        inodes.by_backing.insert(st.st_ino, 1);
        Ok(ShareFs {
            share,
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            orphan_lock: Mutex::new(()),
            dirs: Mutex::new(HashMap::new()),
            passthrough: std::sync::atomic::AtomicBool::new(false),
            passthrough_wanted: passthrough,
            released: std::sync::Condvar::new(),
        })
    }

    fn path_in(inodes: &Inodes, ino: u64) -> Result<SharePath, Errno> {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == 1 {
                let mut p = SharePath::root();
                for n in names.iter().rev() {
                    p = p.join(n).map_err(|_| Errno::ENAMETOOLONG)?;
                }
                return Ok(p);
            }
            let node = inodes.nodes.get(&cur).ok_or(Errno::ESTALE)?;
            if node.orphan.is_some() {
                return Err(Errno::ENOENT);
            }
            let (parent, name) = node.links.first().ok_or(Errno::ESTALE)?;
            names.push(name);
            cur = *parent;
        }
        Err(Errno::ELOOP)
    }

    fn target(&self, ino: u64) -> Result<Target, Errno> {
        let inodes = lock(&self.inodes);
        if let Some(id) = inodes.nodes.get(&ino).and_then(|n| n.orphan) {
            return Ok(Target::Orphan(id));
        }
        Self::path_in(&inodes, ino).map(Target::Path)
    }

    fn path(&self, ino: u64) -> Result<SharePath, Errno> {
        Self::path_in(&lock(&self.inodes), ino)
    }

    /// The attributes of `ino` (`st`: its backing entry's). An unlinked file
    /// still open lives on as `orphans/ID` with one link there; it has none
    /// left in the share (POSIX: fstat after unlink reports 0).
    fn attr(&self, ino: u64, st: &libc::stat) -> FileAttr {
        let mut a = attr_of(ino, st);
        if lock(&self.inodes)
            .nodes
            .get(&ino)
            .is_some_and(|n| n.orphan.is_some())
        {
            a.nlink = 0;
        }
        a
    }

    /// The backing inode number `ino` stands for.
    fn backing_of(&self, ino: u64) -> Option<u64> {
        lock(&self.inodes).nodes.get(&ino).map(|n| n.backing)
    }

    /// `lstat` of `ino`'s entry, checked to be that inode: its attributes
    /// are what the kernel checks permissions against, so a rename between
    /// resolving and looking must not give it another entry's. Resolved
    /// without the order lock first; a mismatch looks again under it.
    fn checked_lstat(&self, ino: u64) -> Result<libc::stat, Errno> {
        let look = || -> Result<libc::stat, Errno> {
            let t = self.target(ino)?;
            self.share.tree.lstat(&t).map_err(|e| errno(&e))
        };
        let st = look()?;
        if self.backing_of(ino).is_none_or(|b| b == st.st_ino) {
            return Ok(st);
        }
        let _o = self.share.order();
        let st = look()?;
        if self.backing_of(ino).is_none_or(|b| b == st.st_ino) {
            Ok(st)
        } else {
            Err(Errno::ESTALE)
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<SharePath, Errno> {
        let p = self.path(parent)?;
        p.join(name.as_bytes()).map_err(|_| {
            if name.len() > ferry_wire::SHARE_NAME_BYTES_MAX {
                Errno::ENAMETOOLONG
            } else {
                Errno::EINVAL
            }
        })
    }

    /// Registers (or finds) the inode for `st` reached as `parent/name`.
    fn remember(&self, parent: u64, name: &[u8], st: &libc::stat) -> u64 {
        let mut inodes = lock(&self.inodes);
        if let Some(&ino) = inodes.by_backing.get(&st.st_ino) {
            if let Some(n) = inodes.nodes.get_mut(&ino) {
                n.lookups += 1;
                if !n.links.iter().any(|(p, nm)| *p == parent && nm == name) {
                    n.links.push((parent, name.to_vec()));
                }
                return ino;
            }
        }
        let ino = inodes.next;
        inodes.next += 1;
        inodes
            .nodes
            .insert(ino, Node::new(vec![(parent, name.to_vec())], st.st_ino));
        inodes.by_backing.insert(st.st_ino, ino);
        ino
    }

    fn forget_link(&self, parent: u64, name: &[u8]) {
        let mut inodes = lock(&self.inodes);
        for n in inodes.nodes.values_mut() {
            n.links.retain(|(p, nm)| !(*p == parent && nm == name));
        }
    }

    fn entry(&self, parent: u64, name: &[u8], path: &SharePath, reply: ReplyEntry) {
        match self.share.tree.lstat(&Target::Path(path.clone())) {
            Ok(st) => {
                let ino = self.remember(parent, name, &st);
                reply.entry(&TTL, &attr_of(ino, &st), Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Makes the op (`make`: the op and the targets to stamp), applies it
    /// here (`local`, or the tree's own apply), sequences it with the stamps
    /// taken afterwards, and answers via `done` once the replica has it.
    /// `make` runs under the order lock: inodes are resolved to paths there,
    /// where renames are applied and the inode table follows them, so a
    /// rename cannot redirect an op to another entry between the two.
    fn commit<R: Send + 'static>(
        &self,
        make: impl FnOnce() -> Result<(FileOp, Vec<Target>), Errno>,
        local: impl FnOnce(&FileOp) -> io::Result<R>,
        done: impl FnOnce(io::Result<R>) + Send + 'static,
    ) {
        self.commit_if(
            || make().map(Some),
            local,
            move |r| {
                done(r.and_then(|r| r.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))))
            },
        )
    }

    /// [`Self::commit`] of an op `make` may find there is no need for
    /// (`None`: answered `Ok(None)` at once).
    fn commit_if<R: Send + 'static>(
        &self,
        make: impl FnOnce() -> Result<Option<(FileOp, Vec<Target>)>, Errno>,
        local: impl FnOnce(&FileOp) -> io::Result<R>,
        done: impl FnOnce(io::Result<Option<R>>) + Send + 'static,
    ) {
        if let Err(e) = self.share.wait_open() {
            return done(Err(e));
        }
        let mut o = self.share.order();
        let (op, stamp) = match make() {
            Ok(Some(m)) => m,
            Ok(None) => {
                drop(o);
                return done(Ok(None));
            }
            Err(e) => {
                drop(o);
                return done(Err(io::Error::from_raw_os_error(e.code())));
            }
        };
        let r = match local(&op) {
            Ok(r) => r,
            Err(e) => {
                drop(o);
                return done(Err(e));
            }
        };
        let stamps = stamp
            .iter()
            .filter_map(|t| self.share.tree.stamp_of(t).ok())
            .collect();
        let seq = self.share.push(&mut o, op, stamps);
        drop(o);
        self.share.send_queued();
        self.share
            .wait_received(seq, Box::new(move |res| done(res.map(|()| Some(r)))));
    }

    /// [`Self::commit`], waiting for the answer (for calls that need the
    /// outcome before they go on).
    fn commit_wait<R: Send + 'static>(
        &self,
        make: impl FnOnce() -> Result<(FileOp, Vec<Target>), Errno>,
        local: impl FnOnce(&FileOp) -> io::Result<R>,
    ) -> io::Result<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commit(make, local, move |r| {
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::EIO)))
    }

    fn apply_tree(&self, op: &FileOp) -> io::Result<()> {
        self.share.tree.apply(op, &mut FileCache::default())
    }

    /// A durable barrier on both sides (after the local sync `local`).
    /// The flush goes to the replica first, so its sync and the local one
    /// (`local`) overlap.
    /// `data_only`: an fdatasync (the replica syncs file data, not times).
    fn barrier(&self, data_only: bool, local: impl FnOnce() -> io::Result<()>, reply: ReplyEmpty) {
        if let Err(e) = self.share.wait_open() {
            return reply.error(errno(&e));
        }
        let seq = {
            let mut o = self.share.order();
            self.share.push_flush_of(&mut o, false, data_only)
        };
        self.share.send_queued();
        if let Err(e) = local() {
            return reply.error(errno(&e));
        }
        self.share.wait_durable(seq, Box::new(answer(reply)));
    }

    fn parent_target(path: &SharePath) -> Target {
        Target::Path(path.split_last().map(|(p, _)| p).unwrap_or_default())
    }

    fn handle_file(&self, fh: u64) -> Option<(Arc<File>, u64, SyncWrites)> {
        lock(&self.handles)
            .get(&fh)
            .map(|h| (h.file.clone(), h.ino, h.sync_writes))
    }

    /// Opens `target` for a new handle. With `passthrough` (a read-only
    /// `open`'s reply), the handle passes through when the inode's io mode
    /// allows it; the caller then answers with the node's backing id.
    fn open_handle(
        &self,
        ino: u64,
        target: &Target,
        flags: i32,
        passthrough: Option<&ReplyOpen>,
    ) -> io::Result<(u64, FopenFlags, IoMode)> {
        let f = self.open_backing(target, flags)?;
        self.add_handle(ino, f, flags, passthrough)
    }

    /// The backing file of `target`, opened for a handle with `flags`.
    fn open_backing(&self, target: &Target, flags: i32) -> io::Result<File> {
        let acc = flags & libc::O_ACCMODE;
        let keep = flags & (libc::O_NOATIME | libc::O_NONBLOCK);
        self.share.tree.open_file(target, acc | keep, 0)
    }

    /// [`Self::open_handle`] of a file already opened.
    fn add_handle(
        &self,
        ino: u64,
        f: File,
        flags: i32,
        passthrough: Option<&ReplyOpen>,
    ) -> io::Result<(u64, FopenFlags, IoMode)> {
        let acc = flags & libc::O_ACCMODE;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // O_SYNC holds the O_DSYNC bit too.
        let sync_writes = if flags & libc::O_SYNC == libc::O_SYNC {
            SyncWrites::All
        } else if flags & libc::O_DSYNC != 0 {
            SyncWrites::Data
        } else {
            SyncWrites::No
        };
        let mut inodes = lock(&self.inodes);
        if acc != libc::O_RDONLY {
            // The kernel would pass this handle's writes straight to the
            // backing file, unreplicated, while the inode passes through.
            // A reader that just closed is released asynchronously: its
            // RELEASE may still be on its way, so wait for it a little.
            // At most all workers but one wait, so one is left to take the
            // RELEASE they wait for.
            let deadline = std::time::Instant::now() + PASSTHROUGH_RELEASE_WAIT;
            let mut waiting = false;
            let busy = loop {
                if inodes
                    .nodes
                    .get(&ino)
                    .is_none_or(|n| n.passthrough_opens == 0)
                {
                    break false;
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || !waiting && inodes.release_waiters + 1 >= FUSE_THREADS {
                    break true;
                }
                if !waiting {
                    waiting = true;
                    inodes.release_waiters += 1;
                }
                inodes = self
                    .released
                    .wait_timeout(inodes, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            };
            if waiting {
                inodes.release_waiters -= 1;
            }
            if busy {
                return Err(io::Error::from_raw_os_error(libc::ETXTBSY));
            }
        }
        let mode = match inodes.nodes.get_mut(&ino) {
            Some(n) => {
                let read_only_file = || fstat(&f).is_ok_and(|st| st.st_mode & 0o222 == 0);
                let mode = if n.passthrough_opens > 0 && passthrough.is_some() {
                    // A read-only open of an inode that passes through
                    // already: the kernel allows nothing else.
                    IoMode::Passthrough
                } else if flags & libc::O_DIRECT != 0 {
                    IoMode::Direct
                } else if let Some(reply) = passthrough
                    .filter(|_| acc == libc::O_RDONLY && n.cached_opens == 0)
                    .filter(|_| self.passthrough.load(Ordering::Relaxed))
                    .filter(|_| read_only_file())
                {
                    if n.backing_id.is_none() {
                        match reply.open_backing(&f) {
                            Ok(b) => n.backing_id = Some(b),
                            Err(e) => {
                                self.passthrough.store(false, Ordering::Relaxed);
                                tracing::warn!(share = %self.share.name, error = %e,
                                    "share.fuse.passthrough_off: read-only opens are served by the daemon");
                            }
                        }
                    }
                    if n.backing_id.is_some() {
                        IoMode::Passthrough
                    } else {
                        IoMode::Cached
                    }
                } else {
                    IoMode::Cached
                };
                n.opens += 1;
                match mode {
                    IoMode::Cached => n.cached_opens += 1,
                    IoMode::Passthrough => n.passthrough_opens += 1,
                    IoMode::Direct => {}
                }
                mode
            }
            None if flags & libc::O_DIRECT != 0 => IoMode::Direct,
            None => IoMode::Cached,
        };
        drop(inodes);
        lock(&self.handles).insert(
            fh,
            Handle {
                ino,
                file: Arc::new(f),
                sync_writes,
                mode,
            },
        );
        if mode == IoMode::Passthrough {
            self.share
                .stats
                .passthrough_opens
                .fetch_add(1, Ordering::Relaxed);
        }
        let fl = if mode == IoMode::Direct {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        Ok((fh, fl, mode))
    }

    /// A handle is gone (released, or never given to the kernel): the
    /// inode's open counts drop. Returns the orphan to drop when it was the
    /// last handle of an unlinked file.
    fn forget_handle(&self, ino: u64, fh: u64) -> Option<u64> {
        let mode = lock(&self.handles).remove(&fh).map(|h| h.mode);
        let mut inodes = lock(&self.inodes);
        let n = inodes.nodes.get_mut(&ino)?;
        match mode {
            Some(IoMode::Cached) => n.cached_opens = n.cached_opens.saturating_sub(1),
            Some(IoMode::Passthrough) => {
                n.passthrough_opens = n.passthrough_opens.saturating_sub(1);
                if n.passthrough_opens == 0 {
                    // Unregistered once no handle uses it.
                    n.backing_id = None;
                    self.released.notify_all();
                }
            }
            _ => {}
        }
        n.opens = n.opens.saturating_sub(1);
        if n.opens == 0 {
            n.orphan.take()
        } else {
            None
        }
    }

    /// Is `path` an open file about to lose its last name? Then it moves to
    /// the orphans first (returns the op), so its open handles keep working.
    fn orphan_if_open(&self, path: &SharePath) -> Option<(u64, FileOp)> {
        let st = self.share.tree.lstat(&Target::Path(path.clone())).ok()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink > 1 {
            return None;
        }
        let inodes = lock(&self.inodes);
        let ino = *inodes.by_backing.get(&st.st_ino)?;
        if inodes.nodes.get(&ino)?.opens == 0 {
            return None;
        }
        let id = self.share.next_orphan.fetch_add(1, Ordering::Relaxed);
        Some((
            ino,
            FileOp::Orphan {
                path: path.clone(),
                id,
            },
        ))
    }
}

impl Filesystem for ShareFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // Backing files on a plain filesystem (depth 1); registering them
        // needs CAP_SYS_ADMIN, checked at the first read-only open.
        if self.passthrough_wanted
            && config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // Resolved, looked at and remembered under the order lock: a rename
        // of a directory above cannot map this name to another entry.
        let _o = self.share.order();
        match self.child(parent.0, name) {
            Ok(p) => self.entry(parent.0, name.as_bytes(), &p, reply),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut inodes = lock(&self.inodes);
        let gone = match inodes.nodes.get_mut(&ino.0) {
            Some(n) => {
                n.lookups = n.lookups.saturating_sub(nlookup);
                n.lookups == 0 && n.opens == 0
            }
            None => false,
        };
        if gone {
            if let Some(n) = inodes.nodes.remove(&ino.0) {
                if inodes.by_backing.get(&n.backing) == Some(&ino.0) {
                    inodes.by_backing.remove(&n.backing);
                }
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some((f, _, _)) = fh.and_then(|fh| self.handle_file(fh.0)) {
            return match fstat(&f) {
                Ok(st) => reply.attr(&TTL, &self.attr(ino.0, &st)),
                Err(e) => reply.error(errno(&e)),
            };
        }
        match self.checked_lstat(ino.0) {
            Ok(st) => reply.attr(&TTL, &self.attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let now = SystemTime::now();
        let resolve = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::SpecificTime(t) => wire_time(t),
                TimeOrNow::Now => wire_time(now),
            })
        };
        let (atime, mtime) = (resolve(atime), resolve(mtime));
        let handle = fh.and_then(|fh| self.handle_file(fh.0));
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<libc::stat>>();
        // Truncate first (it changes mtime), then the attributes asked for.
        let mut ops: Vec<Box<dyn FnOnce(Target) -> FileOp>> = Vec::new();
        if let Some(size) = size {
            ops.push(Box::new(move |target| FileOp::Truncate { target, size }));
        }
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            ops.push(Box::new(move |target| FileOp::SetAttr {
                target,
                mode,
                uid,
                gid,
                atime,
                mtime,
            }));
        }
        let n = ops.len();
        for make_op in ops {
            let tx = tx.clone();
            let handle = handle.clone();
            // Resolved under the order lock (see `commit`); the attributes
            // answered are the entry's right after the change, there too.
            self.commit(
                || {
                    let target = self.target(ino.0)?;
                    Ok((make_op(target.clone()), vec![target]))
                },
                |op| {
                    match (op, &handle) {
                        (FileOp::Truncate { size, .. }, Some((f, _, _))) => f.set_len(*size)?,
                        _ => self.apply_tree(op)?,
                    }
                    match (&handle, op) {
                        (Some((f, _, _)), _) => fstat(f),
                        (
                            None,
                            FileOp::Truncate { target, .. } | FileOp::SetAttr { target, .. },
                        ) => self.share.tree.lstat(target),
                        (None, _) => Err(io::Error::from_raw_os_error(libc::EINVAL)),
                    }
                },
                move |r| {
                    let _ = tx.send(r);
                },
            );
        }
        drop(tx);
        let mut last = None;
        for _ in 0..n {
            match rx.recv() {
                Ok(Ok(st)) => last = Some(st),
                Ok(Err(e)) => return reply.error(errno(&e)),
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        let st = match last {
            Some(st) => Ok(st),
            // Nothing to change: the attributes as they are.
            None => self
                .target(ino.0)
                .map_err(|e| io::Error::from_raw_os_error(e.code()))
                .and_then(|t| self.share.tree.lstat(&t)),
        };
        match st {
            Ok(st) => reply.attr(&TTL, &self.attr(ino.0, &st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.path(ino.0) {
            Ok(p) => match self.share.tree.read_link(&p) {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let owner = Owner {
            uid: req.uid(),
            gid: req.gid(),
        };
        let perm = mode & !umask & 0o7777;
        let make = move |path| {
            Ok(
                if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
                    FileOp::Create {
                        path,
                        mode: perm,
                        owner,
                    }
                } else {
                    FileOp::Mknod {
                        path,
                        mode: (mode & libc::S_IFMT) | perm,
                        rdev: u64::from(rdev),
                        owner,
                    }
                },
            )
        };
        self.namespace_op(parent.0, name, make, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let owner = Owner {
            uid: req.uid(),
            gid: req.gid(),
        };
        let make = move |path| {
            Ok(FileOp::Mkdir {
                path,
                mode: mode & !umask & 0o7777,
                owner,
            })
        };
        self.namespace_op(parent.0, name, make, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _orphans = lock(&self.orphan_lock);
        let orphan_ino = std::cell::Cell::new(None);
        let name = name.as_bytes().to_vec();
        // The inode table follows under the order lock, right after the local
        // change: no other call sees the name gone here and still mapped.
        self.commit(
            || {
                let path = self.child(parent.0, OsStr::from_bytes(&name))?;
                let stamps = vec![Self::parent_target(&path)];
                Ok(match self.orphan_if_open(&path) {
                    Some((ino, op)) => {
                        orphan_ino.set(Some(ino));
                        (op, stamps)
                    }
                    None => (FileOp::Unlink { path }, stamps),
                })
            },
            |op| {
                let orphan_ino = orphan_ino.get();
                self.apply_tree(op)?;
                self.forget_link(parent.0, &name);
                if let (Some(ino), FileOp::Orphan { id, .. }) = (orphan_ino, op) {
                    if let Some(n) = lock(&self.inodes).nodes.get_mut(&ino) {
                        n.orphan = Some(*id);
                    }
                }
                Ok(())
            },
            answer(reply),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.commit(
            || {
                let path = self.child(parent.0, name)?;
                let stamps = vec![Self::parent_target(&path)];
                Ok((FileOp::Rmdir { path }, stamps))
            },
            |op| {
                self.apply_tree(op)?;
                self.forget_link(parent.0, name.as_bytes());
                Ok(())
            },
            answer(reply),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let owner = Owner {
            uid: req.uid(),
            gid: req.gid(),
        };
        let target = target.as_os_str().as_bytes().to_vec();
        let make = move |path| {
            Ok(FileOp::Symlink {
                path,
                target,
                owner,
            })
        };
        self.namespace_op(parent.0, link_name, make, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let exchange = flags.bits() & libc::RENAME_EXCHANGE != 0;
        // A replaced file that is still open keeps working as an orphan.
        if !exchange {
            let _orphans = lock(&self.orphan_lock);
            let orphan_ino = std::cell::Cell::new(None);
            let (tx, rx) = std::sync::mpsc::channel();
            self.commit_if(
                || {
                    let to = self.child(newparent.0, newname)?;
                    Ok(self.orphan_if_open(&to).map(|(ino, op)| {
                        orphan_ino.set(Some(ino));
                        (op, vec![])
                    }))
                },
                |op| {
                    self.apply_tree(op)?;
                    if let (Some(ino), FileOp::Orphan { id, .. }) = (orphan_ino.get(), op) {
                        if let Some(n) = lock(&self.inodes).nodes.get_mut(&ino) {
                            n.orphan = Some(*id);
                        }
                    }
                    self.forget_link(newparent.0, newname.as_bytes());
                    Ok(())
                },
                move |r| {
                    let _ = tx.send(r);
                },
            );
            match rx.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return reply.error(errno(&e)),
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        // The inode table follows under the order lock, right after the
        // local rename (before the replica is waited for): no other call
        // can resolve an inode to a name that moved.
        let r = self.commit_wait(
            || {
                let from = self.child(parent.0, name)?;
                let to = self.child(newparent.0, newname)?;
                let stamps = vec![Self::parent_target(&from), Self::parent_target(&to)];
                let op = FileOp::Rename {
                    from,
                    to,
                    flags: flags.bits(),
                };
                Ok((op, stamps))
            },
            |op| {
                let FileOp::Rename { from, to, .. } = op else {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                };
                let from_st = self.share.tree.lstat(&Target::Path(from.clone())).ok();
                let to_st = self.share.tree.lstat(&Target::Path(to.clone())).ok();
                self.apply_tree(op)?;
                let mut inodes = lock(&self.inodes);
                let a = from_st.and_then(|st| inodes.by_backing.get(&st.st_ino).copied());
                let b = to_st.and_then(|st| inodes.by_backing.get(&st.st_ino).copied());
                let (old, new) = (
                    (parent.0, name.as_bytes().to_vec()),
                    (newparent.0, newname.as_bytes().to_vec()),
                );
                if let Some(b) = b {
                    if let Some(n) = inodes.nodes.get_mut(&b) {
                        n.links.retain(|l| *l != new);
                        if exchange {
                            n.links.insert(0, old.clone());
                        }
                    }
                }
                if let Some(a) = a {
                    if let Some(n) = inodes.nodes.get_mut(&a) {
                        n.links.retain(|l| *l != old);
                        n.links.insert(0, new);
                    }
                }
                Ok(())
            },
        );
        answer(reply)(r)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let make = |new| {
            Ok(FileOp::Link {
                existing: self.path(ino.0)?,
                new,
            })
        };
        self.namespace_op(newparent.0, newname, make, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let flags = flags.0;
        // Resolved and opened under the order lock (see `commit`): the file
        // opened is the inode the kernel checked the caller against.
        let opened = {
            let _o = self.share.order();
            self.target(ino.0)
                .map_err(|e| io::Error::from_raw_os_error(e.code()))
                .and_then(|t| self.open_backing(&t, flags))
        };
        // Opened first: a writable open refused (ETXTBSY) truncates nothing.
        let (fh, fl, mode) =
            match opened.and_then(|f| self.add_handle(ino.0, f, flags, Some(&reply))) {
                Ok(h) => h,
                Err(e) => return reply.error(errno(&e)),
            };
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            // Not negotiated as atomic, but be safe: a replicated truncate,
            // of the file opened.
            let file = self.handle_file(fh).map(|(f, _, _)| f);
            let r = self.commit_wait(
                || {
                    let target = self.target(ino.0)?;
                    let op = FileOp::Truncate {
                        target: target.clone(),
                        size: 0,
                    };
                    Ok((op, vec![target]))
                },
                |_| match &file {
                    Some(f) => f.set_len(0),
                    None => Err(io::Error::from_raw_os_error(libc::EBADF)),
                },
            );
            if let Err(e) = r {
                // The kernel never sees this handle: no RELEASE will come.
                self.forget_handle(ino.0, fh);
                return reply.error(errno(&e));
            }
        }
        if mode == IoMode::Passthrough {
            let inodes = lock(&self.inodes);
            if let Some(b) = inodes.nodes.get(&ino.0).and_then(|n| n.backing_id.as_ref()) {
                return reply.opened_passthrough(FileHandle(fh), fl, b);
            }
            drop(inodes);
            self.forget_handle(ino.0, fh);
            return reply.error(Errno::EIO);
        }
        reply.opened(FileHandle(fh), fl)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let owner = Owner {
            uid: req.uid(),
            gid: req.gid(),
        };
        let make = move |path| {
            Ok(FileOp::Create {
                path,
                mode: mode & !umask & 0o7777,
                owner,
            })
        };
        // Opened under the order lock too, right after it was made.
        let r = self.make_entry(parent.0, name, make, |ino, target| {
            self.open_handle(ino, target, flags & !libc::O_TRUNC, None)
        });
        match r {
            Ok((ino, st, (fh, fl, _))) => {
                reply.created(&TTL, &attr_of(ino, &st), Generation(0), FileHandle(fh), fl)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((f, _, _)) = self.handle_file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        self.share
            .stats
            .fuse_read_bytes
            .fetch_add(got as u64, Ordering::Relaxed);
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some((f, _, sync_writes)) = self.handle_file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        // Resolved again under the order lock (a rename may come between);
        // this one only names the early frame encoded before it.
        let pre = match self.target(ino.0) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        let len = data.len() as u32;
        // Written and stamped from the handle (no path walk per write).
        if let Err(e) = self.share.wait_open() {
            return reply.error(errno(&e));
        }
        if self.share.replica_space_short(data.len() as u64) {
            // Failing here keeps the copies equal (the replica would fail it).
            return reply.error(Errno::ENOSPC);
        }
        // A large write goes on the stream first and the link's sender
        // sends it while it is written here (its times follow in a Stamps
        // op) — unless this filesystem is short of room, where a failure
        // here after sending is likely.
        let early =
            data.len() >= EARLY_SEND_BYTES_MIN
                && offset.saturating_add(data.len() as u64) <= EARLY_SEND_END_MAX
                && self.share.tree.free_bytes().is_some_and(|free| {
                    free > data.len() as u64 + self.share.replica_free_bytes_min
                });
        // Encoded before the order lock (its seq is set when it is pushed).
        let early_frame = early.then(|| StampedOp::encode_write_frame(&pre, offset, data, &[]));
        let mut o = self.share.order();
        let target = match self.target(ino.0) {
            Ok(t) => t,
            Err(e) => {
                drop(o);
                return reply.error(e);
            }
        };
        // The data goes straight into the frame (no copy in an op first).
        let op = FileOp::Write {
            target: target.clone(),
            offset,
            data: Vec::new(),
        };
        if let Some(frame) = early_frame {
            // Renamed since: encoded again with the path it has now.
            let frame = if pre == target {
                frame
            } else {
                StampedOp::encode_write_frame(&target, offset, data, &[])
            };
            self.share.push_write(&mut o, &op, frame, true);
        }
        if let Err(e) = f.write_all_at(data, offset) {
            if early {
                // The replica may apply what failed here.
                self.share
                    .diverged(&op, &format!("a write failed here after it was sent: {e}"));
            }
            drop(o);
            return reply.error(errno(&e));
        }
        let stamps = fstat(&f)
            .map(|st| vec![stamp_from(target.clone(), &st)])
            .unwrap_or_default();
        let seq = if early {
            self.share.push(&mut o, FileOp::Stamps, stamps)
        } else {
            let frame = StampedOp::encode_write_frame(&target, offset, data, &stamps);
            self.share.push_write(&mut o, &op, frame, false)
        };
        drop(o);
        if sync_writes != SyncWrites::No {
            // The replica's flush first: its sync and the local one overlap
            // (of data alone for O_DSYNC, as the local fdatasync).
            let data_only = sync_writes == SyncWrites::Data;
            let fseq = {
                let mut o = self.share.order();
                self.share.push_flush_of(&mut o, false, data_only)
            };
            self.share.send_queued();
            let local = if data_only {
                f.sync_data()
            } else {
                f.sync_all()
            };
            if let Err(e) = local {
                return reply.error(errno(&e));
            }
            let _ = seq;
            return self.share.wait_durable(
                fseq,
                Box::new(move |r| match r {
                    Ok(()) => reply.written(len),
                    Err(e) => reply.error(errno(&e)),
                }),
            );
        }
        self.share.send_queued();
        self.share.wait_received(
            seq,
            Box::new(move |r| match r {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every write was answered only once the replica had it.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _orphans = lock(&self.orphan_lock);
        match self.forget_handle(ino.0, fh.0) {
            Some(id) => self.commit(
                || Ok((FileOp::DropOrphan { id }, vec![])),
                |op| self.apply_tree(op),
                answer(reply),
            ),
            None => reply.ok(),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some((f, _, _)) = self.handle_file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        self.barrier(
            datasync,
            || {
                if datasync {
                    f.sync_data()
                } else {
                    f.sync_all()
                }
            },
            reply,
        );
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let cached = if offset == 0 {
            None
        } else {
            lock(&self.dirs).get(&fh.0).cloned()
        };
        let entries = match cached {
            Some(e) => e,
            None => {
                // Listed from the directory opened under the order lock (a
                // rename cannot make it another one).
                let dir = {
                    let _o = self.share.order();
                    self.path(ino.0)
                        .and_then(|p| self.share.tree.open_dir_listing(&p).map_err(|e| errno(&e)))
                };
                let listed = dir.and_then(|d| Tree::dir_entries(&d).map_err(|e| errno(&e)));
                let mut names = match listed {
                    Ok(n) => n,
                    Err(e) => return reply.error(e),
                };
                names.sort();
                let mut entries: Listing = vec![
                    (ino.0, FileType::Directory, b".".to_vec()),
                    (1, FileType::Directory, b"..".to_vec()),
                ];
                entries.extend(
                    names
                        .into_iter()
                        .map(|(name, eino, fmt)| (eino, kind_of(fmt), name)),
                );
                let entries = Arc::new(entries);
                lock(&self.dirs).insert(fh.0, entries.clone());
                entries
            }
        };
        for (i, (eino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(*eino),
                (i + 1) as u64,
                *kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let local = || {
            self.target(ino.0)
                .map_err(|e| io::Error::from_raw_os_error(e.code()))
                .and_then(|t| {
                    self.share
                        .tree
                        .open_file(&t, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                })
                .and_then(|d| d.sync_all())
        };
        self.barrier(false, local, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let p = std::ffi::CString::new(self.share.tree.root_path.as_os_str().as_bytes())
            .unwrap_or_default();
        // SAFETY: zeroed statvfs is a valid out-parameter.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: NUL-terminated path and valid out pointer.
        if unsafe { libc::statvfs(p.as_ptr(), &mut s) } < 0 {
            return reply.error(errno(&io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let make = || {
            let op = FileOp::SetXattr {
                target: self.target(ino.0)?,
                name: name.as_bytes().to_vec(),
                value: value.to_vec(),
                flags,
            };
            Ok((op, vec![]))
        };
        self.commit(make, |op| self.apply_tree(op), answer(reply));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let target = match self.target(ino.0) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        match self
            .share
            .tree
            .get_xattr(&target, name.as_bytes(), size as usize)
        {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let target = match self.target(ino.0) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        match self.share.tree.list_xattr(&target, size as usize) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let make = || {
            let op = FileOp::RemoveXattr {
                target: self.target(ino.0)?,
                name: name.as_bytes().to_vec(),
            };
            Ok((op, vec![]))
        };
        self.commit(make, |op| self.apply_tree(op), answer(reply));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok(); // default_permissions: the kernel checks
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some((f, _, _)) = self.handle_file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        // Allocating (not punching or collapsing) takes space on the replica too.
        let allocates = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE) == 0;
        if allocates && self.share.replica_space_short(length) {
            return reply.error(Errno::ENOSPC);
        }
        self.commit(
            || {
                let target = self.target(ino.0)?;
                let op = FileOp::Fallocate {
                    target: target.clone(),
                    mode,
                    offset,
                    length,
                };
                Ok((op, vec![target]))
            },
            |_| {
                let (off, len) = (offset as i64, length as i64);
                // SAFETY: valid descriptor; the kernel checks the range.
                if unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) } < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            },
            answer(reply),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some((f, _, _)) = self.handle_file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        // SAFETY: valid descriptor; lseek only computes an offset.
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
        if r < 0 {
            reply.error(errno(&io::Error::last_os_error()));
        } else {
            reply.offset(r);
        }
    }
}

impl ShareFs {
    /// A namespace op that makes `parent/name` (`make`: the op, given that
    /// path): applied, stamped (parent and the new entry), replicated,
    /// answered with the new entry.
    fn namespace_op(
        &self,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(SharePath) -> Result<FileOp, Errno>,
        reply: ReplyEntry,
    ) {
        match self.make_entry(parent, name, make, |_, _| Ok(())) {
            Ok((ino, st, ())) => reply.entry(&TTL, &attr_of(ino, &st), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Makes an entry (the op `make` returns for its path, resolved under
    /// the order lock) and remembers it in the inode table there, right
    /// after it was made, then runs `then` there too: a later call on its
    /// name finds it mapped. Once made it must reach the replica, so a
    /// failing stat or `then` is answered, not returned from the local step
    /// (which would leave the op off the stream).
    fn make_entry<R: Send + 'static>(
        &self,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(SharePath) -> Result<FileOp, Errno>,
        then: impl FnOnce(u64, &Target) -> io::Result<R>,
    ) -> io::Result<(u64, libc::stat, R)> {
        let name_b = name.as_bytes().to_vec();
        let made = std::cell::RefCell::new(None);
        self.commit_wait(
            || {
                let path = self.child(parent, name)?;
                let stamps = vec![Self::parent_target(&path), Target::Path(path.clone())];
                *made.borrow_mut() = Some(Target::Path(path.clone()));
                let mut op = make(path.clone())?;
                self.inherit_group(&Self::parent_target(&path), &mut op);
                Ok((op, stamps))
            },
            |op| {
                self.apply_tree(op)?;
                let target = made
                    .borrow_mut()
                    .take()
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
                Ok(self.share.tree.lstat(&target).and_then(|st| {
                    let ino = self.remember(parent, &name_b, &st);
                    Ok((ino, st, then(ino, &target)?))
                }))
            },
        )
        .and_then(|made| made)
    }
}

impl ShareFs {
    /// A new entry in a set-group-ID directory takes the directory's group
    /// (not the caller's), and a new directory its set-group-ID bit too, as
    /// on any Linux filesystem (the op carries both, so the replica agrees).
    fn inherit_group(&self, parent: &Target, op: &mut FileOp) {
        let Ok(pst) = self.share.tree.lstat(parent) else {
            return;
        };
        if pst.st_mode & libc::S_ISGID == 0 {
            return;
        }
        match op {
            FileOp::Create { owner, .. }
            | FileOp::Mknod { owner, .. }
            | FileOp::Symlink { owner, .. } => owner.gid = pst.st_gid,
            FileOp::Mkdir { owner, mode, .. } => {
                owner.gid = pst.st_gid;
                *mode |= libc::S_ISGID;
            }
            _ => {}
        }
    }
}

/// A mounted sync share (unmounted when dropped).
pub struct Mount {
    _session: fuser::BackgroundSession,
    pub path: std::path::PathBuf,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("path", &self.path).finish()
    }
}

/// FUSE worker threads per mount (each blocks only for local I/O; replies
/// that wait for the replica are answered from the link's threads).
pub const FUSE_THREADS: usize = 4;

/// Writes at least this large are sent to the replica while they are
/// written here (the sealing and sending overlap the local write).
const EARLY_SEND_BYTES_MIN: usize = 256 * 1024;

/// ...and end below this offset (far below any filesystem's file size
/// limit: a write refused with EFBIG would end the link each time).
const EARLY_SEND_END_MAX: u64 = 1 << 40;

/// Mounts `share` at `path` (made if missing; a stale mount left by a crash
/// is detached first).
pub fn mount(
    share: Arc<PrimaryShare>,
    path: &std::path::Path,
    passthrough: bool,
) -> io::Result<Mount> {
    std::fs::create_dir_all(path).or_else(|e| {
        // ENOTCONN: a dead FUSE mount of an earlier run.
        if e.raw_os_error() == Some(libc::ENOTCONN) || e.kind() == io::ErrorKind::AlreadyExists {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    if std::fs::metadata(path).is_err() {
        // SAFETY: NUL-terminated path; a failure is harmless here.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let name = share.name.clone();
    let fs = ShareFs::new(share, passthrough)?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(format!("ferry:{name}")),
        fuser::MountOption::Subtype("ferry".into()),
        fuser::MountOption::DefaultPermissions,
        // A set-user-ID file or a device node made in the share (by anyone
        // who may write it, on either node) grants nothing through the mount.
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    // allow_other: applications run as any user (the kernel checks their
    // permissions: default_permissions).
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(FUSE_THREADS);
    cfg.clone_fd = true;
    let session = fuser::spawn_mount(fs, path, &cfg)?;
    Ok(Mount {
        _session: session,
        path: path.to_path_buf(),
    })
}
