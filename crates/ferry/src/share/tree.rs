//! A share's backing directory and the file operations both sides apply to it.
//!
//! The primary's FUSE layer and the replica's stream apply the same
//! [`FileOp`]s through [`Tree::apply`], so both trees change the same way.
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! from the root's descriptor: a symlink inside the tree (or a hostile peer's
//! path) can never reach outside it. Unlinked-but-open files live in a
//! sibling `orphans/` directory under their number.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_nbd::device::DirectWriter;
use ferry_wire::{EntryKind, FileOp, ManifestEntry, SharePath, Stamp, Target, Time};

/// Manifest entries a walk returns at most (bounded memory; a bigger subtree
/// is an error that names this limit).
pub const MANIFEST_ENTRIES_MAX: usize = 10_000_000;

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Where a name-based call goes: a directory descriptor and a name in it, or
/// (for the root itself) a `/proc/self/fd` path.
struct At {
    _dir: Option<OwnedFd>,
    dirfd: RawFd,
    name: CString,
    /// The root: `name` is a magic link to follow.
    follow: bool,
}

impl At {
    fn nofollow_flag(&self) -> libc::c_int {
        if self.follow {
            0
        } else {
            libc::AT_SYMLINK_NOFOLLOW
        }
    }
}

/// One entry of the tree, opened once without following it (`O_PATH |
/// O_NOFOLLOW`, resolved beneath the root without symlinks). Every check is
/// an `fstat` of this descriptor and every change acts on it (`AT_EMPTY_PATH`,
/// or `/proc/self/fd/N` where a call has no descriptor form), so an entry
/// swapped under the same name meanwhile (a symlink put in its place) is
/// never the one changed. Linux 6.1 has no `fchmodat(AT_SYMLINK_NOFOLLOW)`
/// (`fchmodat2` came in 6.6), hence the magic link for chmod; following it
/// lands on this inode itself, even when it is a symlink.
struct Entry {
    fd: OwnedFd,
}

impl Entry {
    fn stat(&self) -> io::Result<libc::stat> {
        // SAFETY: zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out pointer.
        cvt(unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(st)
    }

    /// `/proc/self/fd/N` of this entry.
    fn proc_path(&self) -> CString {
        // Digits only: never contains NUL.
        CString::new(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).unwrap_or_default()
    }

    fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        if uid.is_none() && gid.is_none() {
            return Ok(());
        }
        // SAFETY: valid descriptor, empty NUL-terminated name with
        // AT_EMPTY_PATH (the descriptor itself); -1 leaves an id as is.
        cvt(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c"".as_ptr(),
                uid.unwrap_or(u32::MAX),
                gid.unwrap_or(u32::MAX),
                libc::AT_EMPTY_PATH,
            )
        })?;
        Ok(())
    }

    /// Sets the mode (of this entry; a symlink has none on Linux: nothing).
    fn chmod(&self, mode: u32) -> io::Result<()> {
        if self.stat()?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(());
        }
        let p = self.proc_path();
        // SAFETY: NUL-terminated path; the magic link resolves to this
        // descriptor's inode (checked above not to be a symlink), never by name.
        cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode & 0o7777, 0) })?;
        Ok(())
    }

    fn set_times(&self, atime: Option<Time>, mtime: Option<Time>) -> io::Result<()> {
        let ts = |t: Option<Time>| match t {
            Some(t) => libc::timespec {
                tv_sec: t.secs,
                tv_nsec: i64::from(t.nanos),
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        };
        let times = [ts(atime), ts(mtime)];
        // SAFETY: valid descriptor, empty NUL-terminated name with
        // AT_EMPTY_PATH (Linux 5.8+: the descriptor itself, O_PATH too), two
        // timespecs.
        cvt(unsafe {
            libc::utimensat(
                self.fd.as_raw_fd(),
                c"".as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        })?;
        Ok(())
    }
}

/// A subtree's manifest, and the directories in it that could not be listed.
#[derive(Debug)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
    pub unlisted: Vec<(SharePath, io::Error)>,
}

/// A walk of the tree in progress: the manifest so far, hard-link groups
/// (inode → group id), and optionally the directories it could not list
/// (instead of failing) and every entry's stamps (for the digest cache).
#[derive(Default)]
struct Walk {
    out: Vec<ManifestEntry>,
    links: HashMap<u64, u64>,
    unlisted: Option<Vec<(SharePath, io::Error)>>,
    keys: Option<Vec<FileKey>>,
}

/// One entry of [`Tree::listing`].
#[derive(Debug, Clone)]
pub struct Listed {
    pub entry: ManifestEntry,
    /// Regular files: BLAKE3 of the content.
    pub hash: Option<[u8; 32]>,
    /// When the entry last changed (ns since the epoch).
    pub ctime_ns: i128,
}

/// A file's identity and change stamps: equal stamps, equal content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: i64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    /// Stands for "not cached": no file has size -1.
    const NONE: FileKey = FileKey {
        dev: 0,
        ino: 0,
        size: -1,
        mtime_ns: 0,
        ctime_ns: 0,
    };

    fn of_stat(st: &libc::stat) -> FileKey {
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// The stamps of an open file.
    fn of_file(f: &File) -> io::Result<FileKey> {
        // SAFETY: zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out pointer.
        cvt(unsafe { libc::fstat(f.as_raw_fd(), &mut st) })?;
        Ok(FileKey::of_stat(&st))
    }
}

/// Files changed less than this long before they are hashed are hashed
/// again next time (ctime ticks are coarse: a change in the same tick would
/// leave the stamps equal).
pub const DIGEST_SETTLED_MS: u64 = 2_000;
/// The same for trees applications write in place (async shares): writes
/// through a shared mapping move the ctime only when a clean page is first
/// written, so a file is settled once dirty pages were written back
/// (vm.dirty_expire_centisecs, 30 s by default) and a few seconds more.
pub const DIGEST_SETTLED_ASYNC_MS: u64 = 35_000;

/// (device, inode) → the stamps a file had when hashed, and its hash.
type CachedHashes = HashMap<(u64, u64), (FileKey, [u8; 32])>;

/// Content hashes of a tree's files from its last digest, keyed by device
/// and inode and valid while size, mtime and ctime are unchanged (a change
/// to the content moves the ctime, which no program can set; see the
/// settling times for the exceptions). A cutover digests each tree once
/// while the workload runs, so the digest inside the downtime reads only
/// files changed since. At most `files_max` entries
/// (`shares.digest_cache_files_max`, ~100 bytes each).
#[derive(Debug)]
pub struct DigestCache {
    files: Mutex<CachedHashes>,
    files_max: usize,
    /// Files changed within this long before a digest are not kept.
    settled_ms: std::sync::atomic::AtomicU64,
}

impl DigestCache {
    /// At most `files_max` hashes, of files unchanged for `settled_ms`.
    pub fn new(files_max: usize, settled_ms: u64) -> DigestCache {
        DigestCache {
            files: Mutex::new(HashMap::new()),
            files_max,
            settled_ms: std::sync::atomic::AtomicU64::new(settled_ms),
        }
    }

    /// Changes the settling time (a share's role changed).
    pub fn set_settled_ms(&self, ms: u64) {
        self.settled_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CachedHashes> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Tree {
    root: OwnedFd,
    pub root_path: PathBuf,
    orphans: OwnedFd,
    /// A replica's tree: an entry in the way of a create is replaced (a
    /// replayed or resynced stream); the primary's tree refuses (EEXIST).
    lenient: bool,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("root", &self.root_path)
            .finish_non_exhaustive()
    }
}

fn open_dir_path(p: &Path) -> io::Result<OwnedFd> {
    let c = cstr(p.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated string; the result is checked.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tree {
    pub fn open(root: &Path, orphans: &Path) -> io::Result<Tree> {
        std::fs::create_dir_all(root)?;
        std::fs::create_dir_all(orphans)?;
        Ok(Tree {
            root: open_dir_path(root)?,
            root_path: root.to_path_buf(),
            orphans: open_dir_path(orphans)?,
            lenient: false,
        })
    }

    /// This tree is a replica's (see `lenient`).
    pub fn for_replica(mut self) -> Tree {
        self.lenient = true;
        self
    }

    /// Opens `rel` (a path below `dirfd`) without following any symlink and
    /// without leaving `dirfd`.
    fn open_beneath(
        dirfd: RawFd,
        rel: &[u8],
        flags: libc::c_int,
        mode: u32,
    ) -> io::Result<OwnedFd> {
        let c = cstr(if rel.is_empty() { b"." } else { rel })?;
        // SAFETY: `open_how` is plain data; all-zero is its "nothing set" value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.mode = u64::from(mode);
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
        // SAFETY: valid descriptor, NUL-terminated path and an `open_how` of
        // the size passed; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn orphan_name(id: u64) -> CString {
        // Digits only: never contains NUL.
        CString::new(id.to_string()).unwrap_or_default()
    }

    fn at_path(&self, p: &SharePath) -> io::Result<At> {
        match p.split_last() {
            None => Ok(At {
                _dir: None,
                dirfd: libc::AT_FDCWD,
                name: cstr(format!("/proc/self/fd/{}", self.root.as_raw_fd()).as_bytes())?,
                follow: true,
            }),
            Some((parent, name)) => {
                let dir = Self::open_beneath(
                    self.root.as_raw_fd(),
                    parent.as_bytes(),
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )?;
                Ok(At {
                    dirfd: dir.as_raw_fd(),
                    _dir: Some(dir),
                    name: cstr(name)?,
                    follow: false,
                })
            }
        }
    }

    fn at(&self, t: &Target) -> io::Result<At> {
        match t {
            Target::Path(p) => self.at_path(p),
            Target::Orphan(id) => Ok(At {
                _dir: None,
                dirfd: self.orphans.as_raw_fd(),
                name: Self::orphan_name(*id),
                follow: false,
            }),
        }
    }

    /// Directory `path` itself (`O_PATH`), resolved beneath the root
    /// without following any symlink.
    pub fn open_dir(&self, path: &SharePath) -> io::Result<OwnedFd> {
        Self::open_beneath(
            self.root.as_raw_fd(),
            path.as_bytes(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
    }

    /// Opens a target (never following a symlink).
    pub fn open_file(&self, t: &Target, flags: libc::c_int, mode: u32) -> io::Result<File> {
        let fd = match t {
            Target::Path(p) => Self::open_beneath(
                self.root.as_raw_fd(),
                p.as_bytes(),
                flags | libc::O_NOFOLLOW,
                mode,
            )?,
            Target::Orphan(id) => Self::open_beneath(
                self.orphans.as_raw_fd(),
                Self::orphan_name(*id).as_bytes(),
                flags | libc::O_NOFOLLOW,
                mode,
            )?,
        };
        Ok(File::from(fd))
    }

    /// `lstat` of a target.
    pub fn lstat(&self, t: &Target) -> io::Result<libc::stat> {
        let at = self.at(t)?;
        // SAFETY: zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, NUL-terminated name, valid out pointer.
        cvt(unsafe { libc::fstatat(at.dirfd, at.name.as_ptr(), &mut st, at.nofollow_flag()) })?;
        Ok(st)
    }

    /// The stamp (mtime) a target has now.
    pub fn stamp_of(&self, t: &Target) -> io::Result<Stamp> {
        let st = self.lstat(t)?;
        Ok(Stamp {
            target: t.clone(),
            mtime: Time {
                secs: st.st_mtime,
                nanos: st.st_mtime_nsec as u32,
            },
        })
    }

    pub fn set_stamp(&self, s: &Stamp) -> io::Result<()> {
        self.entry(&s.target)?.set_times(None, Some(s.mtime))
    }

    /// Opens the entry at `t` itself (a symlink is not followed) for checks
    /// and changes through one descriptor ([`Entry`]).
    fn entry(&self, t: &Target) -> io::Result<Entry> {
        let flags = libc::O_PATH | libc::O_NOFOLLOW;
        let fd = match t {
            Target::Path(p) => Self::open_beneath(self.root.as_raw_fd(), p.as_bytes(), flags, 0)?,
            Target::Orphan(id) => Self::open_beneath(
                self.orphans.as_raw_fd(),
                Self::orphan_name(*id).as_bytes(),
                flags,
                0,
            )?,
        };
        Ok(Entry { fd })
    }

    pub fn set_xattr(&self, t: &Target, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
        let p = self.entry(t)?;
        let n = cstr(name)?;
        // SAFETY: NUL-terminated path and name; value pointer/length from a
        // slice. The magic link is followed to the entry's own inode.
        cvt(unsafe {
            libc::setxattr(
                p.proc_path().as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })?;
        Ok(())
    }

    pub fn remove_xattr(&self, t: &Target, name: &[u8]) -> io::Result<()> {
        let p = self.entry(t)?;
        let n = cstr(name)?;
        // SAFETY: NUL-terminated path and name (the entry's own inode).
        cvt(unsafe { libc::removexattr(p.proc_path().as_ptr(), n.as_ptr()) })?;
        Ok(())
    }

    /// `getxattr` of a target (`size` 0: the size it needs).
    pub fn get_xattr(&self, t: &Target, name: &[u8], size: usize) -> io::Result<Vec<u8>> {
        let p = self.entry(t)?;
        let n = cstr(name)?;
        let mut buf = vec![0u8; size];
        // SAFETY: NUL-terminated path and name; buffer pointer/length from a Vec.
        let r = unsafe {
            libc::getxattr(
                p.proc_path().as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            // Only the size was asked for.
            return Ok(vec![0; r as usize]);
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    pub fn list_xattr(&self, t: &Target, size: usize) -> io::Result<Vec<u8>> {
        let p = self.entry(t)?;
        let mut buf = vec![0u8; size];
        // SAFETY: NUL-terminated path; buffer pointer/length from a Vec.
        let r =
            unsafe { libc::listxattr(p.proc_path().as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(vec![0; r as usize]);
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    /// The entry just made at `path` (by this op), checked to be of the
    /// type made (`fmt`: `S_IFMT` bits): what is changed next is what was made.
    fn made_entry(&self, path: &SharePath, fmt: u32) -> io::Result<Entry> {
        let e = self.entry(&Target::Path(path.clone()))?;
        if e.stat()?.st_mode & libc::S_IFMT != fmt {
            // Replaced behind this process's back: change nothing.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(e)
    }

    /// Applies one op. `files` caches descriptors opened for writes (cleared
    /// by any op that changes names).
    pub fn apply(&self, op: &FileOp, files: &mut FileCache) -> io::Result<()> {
        match op {
            FileOp::Write {
                target,
                offset,
                data,
            } => files.write(self, target, data, *offset),
            FileOp::Truncate { target, size } => {
                let f = files.get(self, target)?;
                f.set_len(*size)
            }
            FileOp::CopyWithin {
                target,
                from,
                to,
                len,
            } => {
                if from <= to {
                    // Front-to-back copying is only safe moving data backwards.
                    return Err(einval());
                }
                let f = files.get(self, target)?;
                let mut buf = vec![0u8; (*len).min(1 << 20) as usize];
                let mut done = 0u64;
                while done < *len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    f.read_exact_at(&mut buf[..n], from + done)?;
                    f.write_all_at(&buf[..n], to + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            FileOp::Fallocate {
                target,
                mode,
                offset,
                length,
            } => {
                let f = files.get(self, target)?;
                let off = i64::try_from(*offset).map_err(|_| einval())?;
                let len = i64::try_from(*length).map_err(|_| einval())?;
                // SAFETY: valid descriptor; the kernel checks the range.
                cvt(unsafe { libc::fallocate(f.as_raw_fd(), *mode, off, len) })?;
                Ok(())
            }
            FileOp::Create { path, mode, owner } => {
                files.clear();
                self.create_file(path, *mode, *owner).map(drop)
            }
            FileOp::PutFile {
                path,
                mode,
                owner,
                mtime,
                data,
            } => {
                files.clear();
                let f = self.create_file(path, *mode, *owner)?;
                f.write_all_at(data, 0)?;
                let times = [
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    libc::timespec {
                        tv_sec: mtime.secs,
                        tv_nsec: i64::from(mtime.nanos),
                    },
                ];
                // SAFETY: valid descriptor and a two-element timespec array.
                cvt(unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) })?;
                Ok(())
            }
            FileOp::Mknod {
                path,
                mode,
                rdev,
                owner,
            } => {
                files.clear();
                let at = self.at_path(path)?;
                // SAFETY: valid descriptor and NUL-terminated name.
                cvt(unsafe { libc::mknodat(at.dirfd, at.name.as_ptr(), *mode, *rdev) })?;
                let e = self.made_entry(path, *mode & libc::S_IFMT)?;
                e.chown(Some(owner.uid), Some(owner.gid))?;
                e.chmod(*mode)
            }
            FileOp::Mkdir { path, mode, owner } => {
                files.clear();
                let at = self.at_path(path)?;
                // SAFETY: valid descriptor and NUL-terminated name.
                let r = unsafe { libc::mkdirat(at.dirfd, at.name.as_ptr(), mode & 0o7777) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) || !self.lenient {
                        return Err(e);
                    }
                    let st = self.lstat(&Target::Path(path.clone()))?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                        self.remove_tree(path)?;
                        // SAFETY: as above.
                        cvt(unsafe { libc::mkdirat(at.dirfd, at.name.as_ptr(), mode & 0o7777) })?;
                    }
                }
                let e = self.made_entry(path, libc::S_IFDIR)?;
                e.chown(Some(owner.uid), Some(owner.gid))?;
                e.chmod(*mode)
            }
            FileOp::Symlink {
                path,
                target,
                owner,
            } => {
                files.clear();
                let at = self.at_path(path)?;
                let t = cstr(target)?;
                // SAFETY: NUL-terminated strings, valid descriptor.
                let r = unsafe { libc::symlinkat(t.as_ptr(), at.dirfd, at.name.as_ptr()) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) || !self.lenient {
                        return Err(e);
                    }
                    self.remove_tree(path)?;
                    // SAFETY: as above.
                    cvt(unsafe { libc::symlinkat(t.as_ptr(), at.dirfd, at.name.as_ptr()) })?;
                }
                self.made_entry(path, libc::S_IFLNK)?
                    .chown(Some(owner.uid), Some(owner.gid))
            }
            FileOp::Link { existing, new } => {
                files.clear();
                let a = self.at_path(existing)?;
                let b = self.at_path(new)?;
                // SAFETY: valid descriptors and NUL-terminated names.
                cvt(unsafe {
                    libc::linkat(a.dirfd, a.name.as_ptr(), b.dirfd, b.name.as_ptr(), 0)
                })?;
                Ok(())
            }
            FileOp::Unlink { path } => {
                files.clear();
                let at = self.at_path(path)?;
                // SAFETY: valid descriptor and NUL-terminated name.
                cvt(unsafe { libc::unlinkat(at.dirfd, at.name.as_ptr(), 0) })?;
                Ok(())
            }
            FileOp::Rmdir { path } => {
                files.clear();
                let at = self.at_path(path)?;
                // SAFETY: valid descriptor and NUL-terminated name.
                cvt(unsafe { libc::unlinkat(at.dirfd, at.name.as_ptr(), libc::AT_REMOVEDIR) })?;
                Ok(())
            }
            FileOp::Rename { from, to, flags } => {
                files.clear();
                let a = self.at_path(from)?;
                let b = self.at_path(to)?;
                // SAFETY: valid descriptors and NUL-terminated names.
                cvt(unsafe {
                    libc::renameat2(a.dirfd, a.name.as_ptr(), b.dirfd, b.name.as_ptr(), *flags)
                })?;
                Ok(())
            }
            FileOp::Orphan { path, id } => {
                files.clear();
                let a = self.at_path(path)?;
                let n = Self::orphan_name(*id);
                // SAFETY: valid descriptors and NUL-terminated names.
                cvt(unsafe {
                    libc::renameat2(
                        a.dirfd,
                        a.name.as_ptr(),
                        self.orphans.as_raw_fd(),
                        n.as_ptr(),
                        0,
                    )
                })?;
                Ok(())
            }
            FileOp::DropOrphan { id } => {
                files.clear();
                let n = Self::orphan_name(*id);
                // SAFETY: valid descriptor and NUL-terminated name.
                let r = unsafe { libc::unlinkat(self.orphans.as_raw_fd(), n.as_ptr(), 0) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        return Err(e);
                    }
                }
                Ok(())
            }
            FileOp::SetAttr {
                target,
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => {
                // One descriptor for every change: the entry checked is
                // the entry changed.
                let e = self.entry(target)?;
                e.chown(*uid, *gid)?;
                if let Some(m) = mode {
                    e.chmod(*m)?;
                }
                if atime.is_some() || mtime.is_some() {
                    e.set_times(*atime, *mtime)?;
                }
                Ok(())
            }
            FileOp::SetXattr {
                target,
                name,
                value,
                flags,
            } => self.set_xattr(target, name, value, *flags),
            FileOp::RemoveXattr { target, name } => self.remove_xattr(target, name),
            FileOp::RemoveTree { path } => {
                files.clear();
                self.remove_tree(path)
            }
            FileOp::Stamps => Ok(()),
        }
    }

    /// Removes whatever is at `path` (recursively); absent is fine.
    pub fn remove_tree(&self, path: &SharePath) -> io::Result<()> {
        if path.is_root() {
            return Err(einval());
        }
        let st = match self.lstat(&Target::Path(path.clone())) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            for name in self.read_dir_names(path)? {
                self.remove_tree(&path.join(&name).map_err(|_| einval())?)?;
            }
            let at = self.at_path(path)?;
            // SAFETY: valid descriptor and NUL-terminated name.
            cvt(unsafe { libc::unlinkat(at.dirfd, at.name.as_ptr(), libc::AT_REMOVEDIR) })?;
        } else {
            let at = self.at_path(path)?;
            // SAFETY: valid descriptor and NUL-terminated name.
            cvt(unsafe { libc::unlinkat(at.dirfd, at.name.as_ptr(), 0) })?;
        }
        Ok(())
    }

    /// Directory `path`, opened beneath the root (no symlinks), to list.
    pub fn open_dir_listing(&self, path: &SharePath) -> io::Result<OwnedFd> {
        Self::open_beneath(
            self.root.as_raw_fd(),
            path.as_bytes(),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
    }

    /// Directory `path`, opened beneath the root, as an iterator of entries.
    fn read_dir(&self, path: &SharePath) -> io::Result<std::fs::ReadDir> {
        Self::read_dir_fd(&self.open_dir_listing(path)?)
    }

    fn read_dir_fd(fd: &OwnedFd) -> io::Result<std::fs::ReadDir> {
        // read_dir opens its own descriptor of the same directory.
        std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// Names in directory `path` (without `.` and `..`).
    pub fn read_dir_names(&self, path: &SharePath) -> io::Result<Vec<Vec<u8>>> {
        let mut names = Vec::new();
        for e in self.read_dir(path)? {
            names.push(e?.file_name().as_bytes().to_vec());
        }
        Ok(names)
    }

    /// Entries of directory `dir` (without `.` and `..`): name, inode
    /// number and the type bits (`S_IFMT`) from the directory itself, with
    /// an `lstat` only where the filesystem does not say.
    pub fn dir_entries(dir: &OwnedFd) -> io::Result<Vec<(Vec<u8>, u64, u32)>> {
        use std::os::unix::fs::{DirEntryExt, FileTypeExt};
        let mut out = Vec::new();
        for e in Self::read_dir_fd(dir)? {
            let e = e?;
            let t = e.file_type()?;
            let fmt = if t.is_dir() {
                libc::S_IFDIR
            } else if t.is_file() {
                libc::S_IFREG
            } else if t.is_symlink() {
                libc::S_IFLNK
            } else if t.is_fifo() {
                libc::S_IFIFO
            } else if t.is_socket() {
                libc::S_IFSOCK
            } else if t.is_block_device() {
                libc::S_IFBLK
            } else {
                libc::S_IFCHR
            };
            out.push((e.file_name().as_bytes().to_vec(), e.ino(), fmt));
        }
        Ok(out)
    }

    /// The entries of subtree `sub` (itself included), parents before children.
    pub fn manifest(&self, sub: &SharePath) -> io::Result<Vec<ManifestEntry>> {
        let mut w = Walk::default();
        self.walk_one(sub, &mut w, true)?;
        Ok(w.out)
    }

    /// Like [`Tree::manifest`], but a directory this process may not list
    /// (EACCES: an agent without CAP_DAC_READ_SEARCH, a mode-000 directory)
    /// does not end the walk: its entry is in the manifest, its contents are
    /// not, and it is returned with the error.
    pub fn manifest_lenient(&self, sub: &SharePath) -> io::Result<Manifest> {
        let mut w = Walk {
            unlisted: Some(Vec::new()),
            ..Walk::default()
        };
        self.walk_one(sub, &mut w, true)?;
        Ok(Manifest {
            entries: w.out,
            unlisted: w.unlisted.unwrap_or_default(),
        })
    }

    /// The entry at `path` alone (no children).
    pub fn manifest_entry(&self, path: &SharePath) -> io::Result<ManifestEntry> {
        let mut w = Walk::default();
        self.walk_one(path, &mut w, false)?;
        w.out
            .pop()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// Appends `path`'s entry (and, `deep`, its subtree's) to the walk.
    fn walk_one(&self, path: &SharePath, w: &mut Walk, deep: bool) -> io::Result<()> {
        let st = match self.lstat(&Target::Path(path.clone())) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !path.is_root() => return Ok(()),
            Err(e) => return Err(e),
        };
        self.walk_stat(path, &st, w, deep)
    }

    /// [`Self::walk_one`] of an entry already stat'ed. A directory's
    /// children are stat'ed through one descriptor of it (by name: one
    /// component, symlinks not followed), not resolved from the root each.
    fn walk_stat(
        &self,
        path: &SharePath,
        st: &libc::stat,
        w: &mut Walk,
        deep: bool,
    ) -> io::Result<()> {
        if w.out.len() >= MANIFEST_ENTRIES_MAX {
            return Err(io::Error::other(format!(
                "more than MANIFEST_ENTRIES_MAX ({MANIFEST_ENTRIES_MAX}) entries"
            )));
        }
        let fmt = st.st_mode & libc::S_IFMT;
        let kind = match fmt {
            libc::S_IFREG => EntryKind::File {
                size: st.st_size as u64,
            },
            libc::S_IFDIR => EntryKind::Dir,
            libc::S_IFLNK => EntryKind::Symlink {
                target: self.read_link(path)?,
            },
            _ => EntryKind::Special { rdev: st.st_rdev },
        };
        let link_id = if fmt != libc::S_IFDIR && st.st_nlink > 1 {
            let n = w.links.len() as u64 + 1;
            *w.links.entry(st.st_ino).or_insert(n)
        } else {
            0
        };
        w.out.push(ManifestEntry {
            path: path.clone(),
            kind,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: Time {
                secs: st.st_mtime,
                nanos: st.st_mtime_nsec as u32,
            },
            link_id,
        });
        if let Some(k) = w.keys.as_mut() {
            k.push(FileKey::of_stat(st));
        }
        if fmt == libc::S_IFDIR && deep {
            let listed = Self::open_beneath(
                self.root.as_raw_fd(),
                path.as_bytes(),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .and_then(|fd| {
                let names = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
                    .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
                    .collect::<io::Result<Vec<_>>>()?;
                Ok((fd, names))
            });
            let (dir, mut names) = match (listed, w.unlisted.as_mut()) {
                (Ok(l), _) => l,
                (Err(e), Some(u)) if e.raw_os_error() == Some(libc::EACCES) => {
                    u.push((path.clone(), e));
                    return Ok(());
                }
                (Err(e), _) => return Err(e),
            };
            names.sort();
            for n in names {
                let Ok(child) = path.join(&n) else {
                    tracing::warn!(path = %path.display(), "share.manifest.name_skipped");
                    continue;
                };
                let name = cstr(&n)?;
                // SAFETY: zeroed `stat` is a valid out-parameter.
                let mut cst: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: valid descriptor, NUL-terminated single-component
                // name, valid out pointer.
                let r = unsafe {
                    libc::fstatat(
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        &mut cst,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                match cvt(r) {
                    Ok(_) => {}
                    // Removed since it was listed.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                }
                self.walk_stat(&child, &cst, w, true)?;
            }
        }
        Ok(())
    }

    /// Every entry of the tree in path order, and each regular file's
    /// content hash — from `cache` when its inode, size, mtime and ctime
    /// are unchanged since it was last hashed (the file is not even
    /// opened), else read (see [`DigestCache`]). Also returns the bytes read.
    pub fn listing(&self, cache: &DigestCache) -> io::Result<(Vec<Listed>, u64)> {
        let mut w = Walk {
            keys: Some(Vec::new()),
            ..Walk::default()
        };
        self.walk_one(&SharePath::root(), &mut w, true)?;
        let (entries, keys) = (w.out, w.keys.unwrap_or_default());
        let mut bytes = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        // Looked up entry by entry (a concurrent digest sees the cache too);
        // replaced at the end by what this walk found.
        let mut kept = HashMap::new();
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let settled_ns =
            cache.settled_ms.load(std::sync::atomic::Ordering::Relaxed) as i128 * 1_000_000;
        let mut out = Vec::with_capacity(entries.len());
        for (entry, listed) in entries.into_iter().zip(keys) {
            let mut hash = None;
            if let EntryKind::File { .. } = entry.kind {
                let cached = cache
                    .lock()
                    .get(&(listed.dev, listed.ino))
                    .filter(|c| c.0 == listed)
                    .copied();
                let (key, h, fresh) = match cached {
                    Some(c) => (c.0, c.1, false),
                    None => {
                        let f =
                            self.open_file(&Target::Path(entry.path.clone()), libc::O_RDONLY, 0)?;
                        let mut fh = blake3::Hasher::new();
                        let mut off = 0u64;
                        loop {
                            let n = f.read_at(&mut buf, off)?;
                            if n == 0 {
                                break;
                            }
                            fh.update(&buf[..n]);
                            off += n as u64;
                        }
                        bytes += off;
                        // Cached under the stamps of what was read (if it
                        // changed since it was listed, under none).
                        let key = FileKey::of_file(&f)?;
                        let key = if key == listed { key } else { FileKey::NONE };
                        (key, *fh.finalize().as_bytes(), true)
                    }
                };
                // A fresh hash is kept only if the file's last change is
                // old enough that any later change must move its ctime (a
                // change in the same clock tick as the hashing would not);
                // a hit was settled when it was hashed and is kept.
                if key != FileKey::NONE
                    && (!fresh || now_ns - key.ctime_ns > settled_ns)
                    && kept.len() < cache.files_max
                {
                    kept.insert((key.dev, key.ino), (key, h));
                }
                hash = Some(h);
            }
            out.push(Listed {
                entry,
                hash,
                ctime_ns: listed.ctime_ns,
            });
        }
        *cache.lock() = kept;
        Ok((out, bytes))
    }

    /// A digest of the whole tree: every entry's manifest record (type,
    /// size, mode, owner, mtime, hard-link group, in path order) and every
    /// regular file's content hash ([`Self::listing`]). Equal digests: equal
    /// trees (a cutover's or switchover's verification). Returns the
    /// digest, files, and bytes read.
    pub fn digest(&self, cache: &DigestCache) -> io::Result<(blake3::Hash, u64, u64)> {
        let (list, bytes) = self.listing(cache)?;
        let mut h = blake3::Hasher::new();
        let mut files = 0u64;
        for l in &list {
            h.update(&ferry_wire::encode_manifest(std::slice::from_ref(&l.entry)));
            if let Some(x) = &l.hash {
                h.update(x);
                files += 1;
            }
        }
        Ok((h.finalize(), files, bytes))
    }

    /// A new empty regular file at `path`, owned and moded as asked (a
    /// replica replaces whatever is there: a resync or a replayed stream).
    fn create_file(
        &self,
        path: &SharePath,
        mode: u32,
        owner: ferry_wire::Owner,
    ) -> io::Result<File> {
        let target = Target::Path(path.clone());
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
        let f = match self.open_file(&target, flags, mode & 0o7777) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && self.lenient => {
                self.remove_tree(path)?;
                self.open_file(&target, flags, mode & 0o7777)?
            }
            r => r?,
        };
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fchown(f.as_raw_fd(), owner.uid, owner.gid) })?;
        // SAFETY: valid descriptor (umask may have cut the mode).
        cvt(unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) })?;
        Ok(f)
    }

    /// The block sums of the regular file at `path` (`None`: no regular
    /// file there), for a delta against the primary's content.
    pub fn sums(
        &self,
        path: &SharePath,
        block: u32,
    ) -> io::Result<Option<(u64, Vec<ferry_core::delta::BlockSum>)>> {
        let target = Target::Path(path.clone());
        match self.lstat(&target) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {}
            Ok(_) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        let f = self.open_file(&target, libc::O_RDONLY, 0)?;
        let size = f.metadata()?.len();
        let block = block.max(1) as usize;
        let mut sums = Vec::with_capacity((size / block as u64) as usize);
        let mut buf = vec![0u8; block * 64];
        let mut off = 0u64;
        loop {
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], off + got as u64)? {
                    0 => break,
                    n => got += n,
                }
            }
            sums.extend(ferry_core::delta::sums(&buf[..got], block, strong_hash));
            off += got as u64;
            if got < buf.len() {
                break;
            }
        }
        Ok(Some((size, sums)))
    }

    pub fn read_link(&self, path: &SharePath) -> io::Result<Vec<u8>> {
        let at = self.at_path(path)?;
        let mut buf = vec![0u8; ferry_wire::SHARE_PATH_BYTES_MAX + 1];
        // SAFETY: valid descriptor, NUL-terminated name, buffer from a Vec.
        let r = unsafe {
            libc::readlinkat(
                at.dirfd,
                at.name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    /// Free bytes (for unprivileged use) of the tree's filesystem.
    pub fn free_bytes(&self) -> Option<u64> {
        // SAFETY: zeroed statvfs is a valid out-parameter.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out pointer.
        if unsafe { libc::fstatvfs(self.root.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_bavail * st.f_frsize)
    }

    /// Makes everything written to the tree's filesystem durable.
    pub fn sync(&self) -> io::Result<()> {
        // The root this tree holds, not whatever its path names now.
        let f = File::from(Self::open_beneath(
            self.root.as_raw_fd(),
            b"",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?);
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::syncfs(f.as_raw_fd()) })?;
        Ok(())
    }
}

/// The strong hash of a delta block: BLAKE3, truncated.
pub fn strong_hash(d: &[u8]) -> [u8; ferry_core::delta::STRONG_BYTES] {
    let mut o = [0u8; ferry_core::delta::STRONG_BYTES];
    o.copy_from_slice(&blake3::hash(d).as_bytes()[..ferry_core::delta::STRONG_BYTES]);
    o
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Descriptors the replica keeps open for writes (a small cache: opening by
/// path per write would cost a path walk each).
#[derive(Debug, Default)]
pub struct FileCache {
    /// Each with its writer past the page cache (large aligned writes).
    files: HashMap<Target, (File, DirectWriter)>,
}

/// Descriptors cached at most.
const FILE_CACHE_MAX: usize = 64;

impl FileCache {
    pub fn get(&mut self, tree: &Tree, t: &Target) -> io::Result<&File> {
        self.entry(tree, t).map(|(f, _)| f)
    }

    fn entry(&mut self, tree: &Tree, t: &Target) -> io::Result<&(File, DirectWriter)> {
        if !self.files.contains_key(t) {
            if self.files.len() >= FILE_CACHE_MAX {
                self.files.clear();
            }
            // Read too: a delta's CopyWithin reads blocks it moves.
            let f = tree.open_file(t, libc::O_RDWR, 0)?;
            self.files.insert(t.clone(), (f, DirectWriter::default()));
        }
        self.files.get(t).ok_or_else(einval)
    }

    /// Writes `data` at `offset`, past the page cache when it is large and
    /// aligned ([`DirectWriter`]): what a replica writes nobody there reads
    /// until a promotion, so caching it costs memory and a second copy. The
    /// replica applies after acknowledging receipt, so the device wait of a
    /// direct write delays no reply.
    pub fn write(&mut self, tree: &Tree, t: &Target, data: &[u8], offset: u64) -> io::Result<()> {
        let (f, direct) = self.entry(tree, t)?;
        direct.write(f, &[data], offset)
    }

    /// Whether `t`'s cached descriptor writes large writes past the page cache.
    #[cfg(test)]
    pub fn is_direct(&self, t: &Target) -> bool {
        self.files.get(t).is_some_and(|(_, d)| d.is_direct())
    }

    pub fn clear(&mut self) {
        self.files.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::Owner;

    fn p(s: &str) -> SharePath {
        SharePath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn the_digest_cache_skips_unchanged_files_and_sees_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let tree = Tree::open(&data, &dir.path().join("orphans")).unwrap();
        for i in 0..20 {
            std::fs::write(data.join(format!("f{i}")), vec![i as u8; 50_000]).unwrap();
        }
        let plain = DigestCache::new(0, 0);
        // Settled after 50 ms here (ctime ticks are a few ms).
        let cache = DigestCache::new(1000, 50);
        let tick = || std::thread::sleep(std::time::Duration::from_millis(60));
        tick();
        let (d0, files, read) = tree.digest(&cache).unwrap();
        assert_eq!((files, read), (20, 1_000_000));
        let (d1, _, read) = tree.digest(&cache).unwrap();
        assert_eq!((d1, read), (d0, 0), "unchanged files are not read again");
        // Same size, same mtime (restored): the ctime still moves.
        let f = data.join("f3");
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, vec![99u8; 50_000]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let (d2, _, read) = tree.digest(&cache).unwrap();
        assert_ne!(d2, d0);
        assert_eq!(read, 50_000, "only the changed file is read");
        assert_eq!(tree.digest(&plain).unwrap().0, d2);
        // Replaced by another file (another inode), and removed.
        std::fs::write(data.join("new"), vec![1u8; 50_000]).unwrap();
        std::fs::rename(data.join("new"), data.join("f4")).unwrap();
        std::fs::remove_file(data.join("f5")).unwrap();
        let (d3, files, _) = tree.digest(&cache).unwrap();
        assert_eq!(files, 19);
        assert_eq!(tree.digest(&plain).unwrap().0, d3);
        // Changed within the settling time of its last hashing: read again.
        tick();
        tree.digest(&cache).unwrap();
        std::fs::write(data.join("f6"), vec![7u8; 50_000]).unwrap();
        let (_, _, read) = tree.digest(&cache).unwrap();
        assert_eq!(read, 50_000);
        let (_, _, read) = tree.digest(&cache).unwrap();
        assert_eq!(read, 50_000, "a file changed moments ago is not cached");
    }

    #[test]
    fn ops_never_leave_the_tree_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let tree = Tree::open(&dir.path().join("data"), &dir.path().join("orphans"))
            .unwrap()
            .for_replica();
        let mut files = FileCache::default();
        // A symlink inside the tree pointing out of it (a peer may create one).
        tree.apply(
            &FileOp::Symlink {
                path: p("esc"),
                target: outside.as_os_str().as_bytes().to_vec(),
                owner: Owner::default(),
            },
            &mut files,
        )
        .unwrap();
        let through = [
            FileOp::Create {
                path: p("esc/planted"),
                mode: 0o644,
                owner: Owner::default(),
            },
            FileOp::Mkdir {
                path: p("esc/d"),
                mode: 0o755,
                owner: Owner::default(),
            },
            FileOp::Write {
                target: Target::Path(p("esc")),
                offset: 0,
                data: b"x".to_vec(),
            },
        ];
        for op in &through {
            assert!(
                tree.apply(op, &mut files).is_err(),
                "{op:?} went through the symlink"
            );
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // The symlink itself can go.
        tree.apply(&FileOp::Unlink { path: p("esc") }, &mut files)
            .unwrap();
    }

    #[test]
    fn large_aligned_replica_writes_go_past_the_page_cache_and_read_back_whole() {
        // /var/tmp: a disk filesystem (a tmpfs /tmp would stay buffered).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let tree = Tree::open(&dir.path().join("d"), &dir.path().join("o"))
            .unwrap()
            .for_replica();
        let mut files = FileCache::default();
        tree.apply(
            &FileOp::Create {
                path: p("f"),
                mode: 0o600,
                owner: Owner::default(),
            },
            &mut files,
        )
        .unwrap();
        let t = Target::Path(p("f"));
        let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut want = vec![0u8; (2 << 20) + 10];
        // A small write first (buffered, dirty in the cache), then a large
        // aligned one over it, then an unaligned tail.
        for (offset, data) in [
            (4096u64, vec![7u8; 100]),
            (0, big.clone()),
            (1 << 20, big.clone()),
            ((2 << 20) - 6, vec![9u8; 16]),
        ] {
            want[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            tree.apply(
                &FileOp::Write {
                    target: t.clone(),
                    offset,
                    data,
                },
                &mut files,
            )
            .unwrap();
        }
        let statx_says_direct = files.is_direct(&t);
        files.clear();
        assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), want);
        // Where the filesystem does direct I/O (statx reports an alignment),
        // the large writes went past the cache.
        let st = nix_statx_dio(&dir.path().join("d/f"));
        assert_eq!(
            statx_says_direct, st,
            "direct writes where the filesystem has them"
        );
    }

    /// Whether statx reports a direct-I/O alignment for `path`.
    fn nix_statx_dio(path: &std::path::Path) -> bool {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: zeroed statx is a valid out-parameter.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: NUL-terminated path, valid out pointer.
        let r = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                0,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_mem_align > 0
    }

    #[test]
    fn primary_tree_refuses_to_replace_and_replica_tree_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let prim = Tree::open(&dir.path().join("a"), &dir.path().join("ao")).unwrap();
        let repl = Tree::open(&dir.path().join("b"), &dir.path().join("bo"))
            .unwrap()
            .for_replica();
        let mut files = FileCache::default();
        let mk = FileOp::Mkdir {
            path: p("x"),
            mode: 0o755,
            owner: Owner::default(),
        };
        let create = FileOp::Create {
            path: p("x"),
            mode: 0o600,
            owner: Owner::default(),
        };
        for t in [&prim, &repl] {
            t.apply(&mk, &mut files).unwrap();
        }
        let e = prim.apply(&create, &mut files).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        repl.apply(&create, &mut files).unwrap();
        let st = repl.lstat(&Target::Path(p("x"))).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFREG);
        assert_eq!(st.st_mode & 0o7777, 0o600);
        // Manifests list parents before children, with sizes and link groups.
        repl.apply(
            &FileOp::Write {
                target: Target::Path(p("x")),
                offset: 10,
                data: b"abc".to_vec(),
            },
            &mut files,
        )
        .unwrap();
        repl.apply(
            &FileOp::Link {
                existing: p("x"),
                new: p("y"),
            },
            &mut files,
        )
        .unwrap();
        let m = repl.manifest(&SharePath::root()).unwrap();
        assert_eq!(m[0].path, SharePath::root());
        let x = m.iter().find(|e| e.path == p("x")).unwrap();
        let y = m.iter().find(|e| e.path == p("y")).unwrap();
        assert_eq!(x.kind, EntryKind::File { size: 13 });
        assert!(x.link_id != 0 && x.link_id == y.link_id);
    }
}
