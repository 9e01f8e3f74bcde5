//! A share's stream: file operations as the replica applies them, and the
//! manifest a replica sends so the primary can compare trees. Pure encode /
//! decode; every path a peer sends is checked here ([`SharePath`]) before any
//! code touches a filesystem with it.
//!
//! Encoding: one op per `FileOp` frame payload, little-endian, length-prefixed
//! byte strings (`u32` length). Unknown op codes and trailing bytes are refused.

use crate::frame::{Kind, WireError};

/// Longest path (bytes) a share carries, as Linux's `PATH_MAX`.
pub const SHARE_PATH_BYTES_MAX: usize = 4096;
/// Longest name component, as Linux's `NAME_MAX`.
pub const SHARE_NAME_BYTES_MAX: usize = 255;
/// Longest extended attribute value, as Linux's `XATTR_SIZE_MAX`.
pub const XATTR_VALUE_BYTES_MAX: usize = 65536;

/// A path inside a share, relative to its root: components separated by `/`,
/// none empty, `.` or `..`, no NUL, each at most [`SHARE_NAME_BYTES_MAX`]
/// bytes. Any other byte is allowed (newlines, invalid UTF-8). The root itself
/// is the empty path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SharePath(Vec<u8>);

impl SharePath {
    pub fn root() -> SharePath {
        SharePath(Vec::new())
    }

    /// Checks `bytes` as a share path.
    pub fn new(bytes: Vec<u8>) -> Result<SharePath, String> {
        if bytes.len() > SHARE_PATH_BYTES_MAX {
            return Err(format!(
                "path of {} bytes is above {SHARE_PATH_BYTES_MAX}",
                bytes.len()
            ));
        }
        if bytes.is_empty() {
            return Ok(SharePath(bytes));
        }
        for c in bytes.split(|&b| b == b'/') {
            check_name(c)?;
        }
        Ok(SharePath(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `self/name`; `name` must be one valid component.
    pub fn join(&self, name: &[u8]) -> Result<SharePath, String> {
        check_name(name)?;
        let mut b = Vec::with_capacity(self.0.len() + 1 + name.len());
        b.extend_from_slice(&self.0);
        if !b.is_empty() {
            b.push(b'/');
        }
        b.extend_from_slice(name);
        if b.len() > SHARE_PATH_BYTES_MAX {
            return Err(format!(
                "path of {} bytes is above {SHARE_PATH_BYTES_MAX}",
                b.len()
            ));
        }
        Ok(SharePath(b))
    }

    /// The parent and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(SharePath, &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((SharePath(self.0[..i].to_vec()), &self.0[i + 1..])),
            None => Some((SharePath::root(), &self.0[..])),
        }
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &SharePath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// Printable form for messages and logs (invalid UTF-8 escaped).
    pub fn display(&self) -> String {
        if self.0.is_empty() {
            return "/".to_string();
        }
        self.0.escape_ascii().to_string()
    }
}

fn check_name(c: &[u8]) -> Result<(), String> {
    if c.is_empty() {
        return Err("empty path component".into());
    }
    if c == b"." || c == b".." {
        return Err(format!("path component {:?}", String::from_utf8_lossy(c)));
    }
    if c.contains(&0) || c.contains(&b'/') {
        return Err("NUL or '/' in a name".into());
    }
    if c.len() > SHARE_NAME_BYTES_MAX {
        return Err(format!(
            "name of {} bytes is above {SHARE_NAME_BYTES_MAX}",
            c.len()
        ));
    }
    Ok(())
}

/// Where an op applies: a path in the tree, or an unlinked-but-open file kept
/// aside under its number until its last close.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Path(SharePath),
    Orphan(u64),
}

/// A time to set: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// The modification time an entry has on the primary after an op, so the
/// replica's copy carries the same times (set without following symlinks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub target: Target,
    pub mtime: Time,
}

/// Ownership given to a new entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// One mutation of a share, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// Write `data` at `offset` (the file exists).
    Write {
        target: Target,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        target: Target,
        size: u64,
    },
    /// `fallocate(2)` with `mode` (keep-size, punch-hole, zero-range…).
    Fallocate {
        target: Target,
        mode: i32,
        offset: u64,
        length: u64,
    },
    /// A new empty regular file (replaces nothing: the path is free).
    Create {
        path: SharePath,
        mode: u32,
        owner: Owner,
    },
    /// A FIFO, socket or device node.
    Mknod {
        path: SharePath,
        mode: u32,
        rdev: u64,
        owner: Owner,
    },
    Mkdir {
        path: SharePath,
        mode: u32,
        owner: Owner,
    },
    Symlink {
        path: SharePath,
        target: Vec<u8>,
        owner: Owner,
    },
    /// A hard link `new` to the existing `existing`.
    Link {
        existing: SharePath,
        new: SharePath,
    },
    Unlink {
        path: SharePath,
    },
    Rmdir {
        path: SharePath,
    },
    /// `renameat2` with `flags` (RENAME_NOREPLACE / RENAME_EXCHANGE).
    Rename {
        from: SharePath,
        to: SharePath,
        flags: u32,
    },
    /// An open file unlinked: it moves aside as orphan `id` until released.
    Orphan {
        path: SharePath,
        id: u64,
    },
    /// The last close of orphan `id`: it goes.
    DropOrphan {
        id: u64,
    },
    SetAttr {
        target: Target,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Time>,
        mtime: Option<Time>,
    },
    SetXattr {
        target: Target,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        target: Target,
        name: Vec<u8>,
    },
    /// Removes whatever is at `path` (a whole subtree): resync of an entry the
    /// primary no longer has.
    RemoveTree {
        path: SharePath,
    },
    /// Times only (after a resync copied an entry).
    Stamps,
    /// A whole small file in one op (resync): made (replacing whatever is
    /// there), filled, owned, moded and stamped.
    PutFile {
        path: SharePath,
        mode: u32,
        owner: Owner,
        mtime: Time,
        data: Vec<u8>,
    },
    /// Moves `len` bytes of the file from `from` to `to` (a delta reusing
    /// a block the replica already has; `from > to`, applied front to back).
    CopyWithin {
        target: Target,
        from: u64,
        to: u64,
        len: u64,
    },
}

/// An op and the times its entries have afterwards on the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StampedOp {
    pub op: FileOp,
    pub stamps: Vec<Stamp>,
}

impl FileOp {
    /// Bytes of file data it carries (for rates and backlog accounting).
    pub fn data_bytes(&self) -> u64 {
        match self {
            FileOp::Write { data, .. } | FileOp::PutFile { data, .. } => data.len() as u64,
            FileOp::SetXattr { value, .. } => value.len() as u64,
            _ => 0,
        }
    }

    /// Directories whose entries (and so times) this op changes.
    pub fn parents(&self) -> Vec<SharePath> {
        let parent = |p: &SharePath| p.split_last().map(|(d, _)| d);
        match self {
            FileOp::Create { path, .. }
            | FileOp::PutFile { path, .. }
            | FileOp::Mknod { path, .. }
            | FileOp::Mkdir { path, .. }
            | FileOp::Symlink { path, .. }
            | FileOp::Unlink { path }
            | FileOp::Rmdir { path }
            | FileOp::Orphan { path, .. }
            | FileOp::RemoveTree { path }
            | FileOp::Link { new: path, .. } => parent(path).into_iter().collect(),
            FileOp::Rename { from, to, .. } => parent(from).into_iter().chain(parent(to)).collect(),
            _ => vec![],
        }
    }

    /// The paths whose content or entry this op changes (for the journal of
    /// changed paths kept while the replica cannot be told).
    pub fn touched(&self) -> Vec<&SharePath> {
        fn t(t: &Target) -> Option<&SharePath> {
            match t {
                Target::Path(p) => Some(p),
                Target::Orphan(_) => None,
            }
        }
        match self {
            FileOp::Write { target, .. }
            | FileOp::Truncate { target, .. }
            | FileOp::Fallocate { target, .. }
            | FileOp::SetAttr { target, .. }
            | FileOp::SetXattr { target, .. }
            | FileOp::RemoveXattr { target, .. }
            | FileOp::CopyWithin { target, .. } => t(target).into_iter().collect(),
            FileOp::Create { path, .. }
            | FileOp::PutFile { path, .. }
            | FileOp::Mknod { path, .. }
            | FileOp::Mkdir { path, .. }
            | FileOp::Symlink { path, .. }
            | FileOp::Unlink { path }
            | FileOp::Rmdir { path }
            | FileOp::Orphan { path, .. }
            | FileOp::RemoveTree { path } => vec![path],
            FileOp::Link { existing, new } => vec![existing, new],
            FileOp::Rename { from, to, .. } => vec![from, to],
            FileOp::DropOrphan { .. } | FileOp::Stamps => vec![],
        }
    }
}

// ---- encoding ----

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        // Lengths are bounded by frame_bytes_max (u32) long before this.
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn path(&mut self, p: &SharePath) {
        self.bytes(&p.0);
    }
    fn target(&mut self, t: &Target) {
        match t {
            Target::Path(p) => {
                self.u8(0);
                self.path(p);
            }
            Target::Orphan(id) => {
                self.u8(1);
                self.u64(*id);
            }
        }
    }
    fn time(&mut self, t: Time) {
        self.i64(t.secs);
        self.u32(t.nanos);
    }
    fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u32(v);
            }
            None => self.u8(0),
        }
    }
    fn opt_time(&mut self, v: Option<Time>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.time(v);
            }
            None => self.u8(0),
        }
    }
    fn owner(&mut self, o: Owner) {
        self.u32(o.uid);
        self.u32(o.gid);
    }
}

struct Dec<'a> {
    b: &'a [u8],
    kind: Kind,
}

impl<'a> Dec<'a> {
    fn bad(&self, reason: impl Into<String>) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            reason: reason.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(self.bad("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn path(&mut self) -> Result<SharePath, WireError> {
        let b = self.bytes()?.to_vec();
        SharePath::new(b).map_err(|e| self.bad(e))
    }
    fn name(&mut self, max: usize, what: &str) -> Result<Vec<u8>, WireError> {
        let b = self.bytes()?;
        if b.len() > max {
            return Err(self.bad(format!("{what} of {} bytes is above {max}", b.len())));
        }
        Ok(b.to_vec())
    }
    fn target(&mut self) -> Result<Target, WireError> {
        match self.u8()? {
            0 => Ok(Target::Path(self.path()?)),
            1 => Ok(Target::Orphan(self.u64()?)),
            t => Err(self.bad(format!("unknown target kind {t}"))),
        }
    }
    fn time(&mut self) -> Result<Time, WireError> {
        let secs = self.i64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(self.bad("nanoseconds above 999999999"));
        }
        Ok(Time { secs, nanos })
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u32()?)),
            _ => Err(self.bad("bad option tag")),
        }
    }
    fn opt_time(&mut self) -> Result<Option<Time>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.time()?)),
            _ => Err(self.bad("bad option tag")),
        }
    }
    fn owner(&mut self) -> Result<Owner, WireError> {
        Ok(Owner {
            uid: self.u32()?,
            gid: self.u32()?,
        })
    }
}

impl StampedOp {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(64 + self.op.data_bytes() as usize));
        match &self.op {
            FileOp::Write {
                target,
                offset,
                data,
            } => {
                e.u8(1);
                e.target(target);
                e.u64(*offset);
                e.bytes(data);
            }
            FileOp::Truncate { target, size } => {
                e.u8(2);
                e.target(target);
                e.u64(*size);
            }
            FileOp::Fallocate {
                target,
                mode,
                offset,
                length,
            } => {
                e.u8(3);
                e.target(target);
                e.i32(*mode);
                e.u64(*offset);
                e.u64(*length);
            }
            FileOp::Create { path, mode, owner } => {
                e.u8(4);
                e.path(path);
                e.u32(*mode);
                e.owner(*owner);
            }
            FileOp::Mknod {
                path,
                mode,
                rdev,
                owner,
            } => {
                e.u8(5);
                e.path(path);
                e.u32(*mode);
                e.u64(*rdev);
                e.owner(*owner);
            }
            FileOp::Mkdir { path, mode, owner } => {
                e.u8(6);
                e.path(path);
                e.u32(*mode);
                e.owner(*owner);
            }
            FileOp::Symlink {
                path,
                target,
                owner,
            } => {
                e.u8(7);
                e.path(path);
                e.bytes(target);
                e.owner(*owner);
            }
            FileOp::Link { existing, new } => {
                e.u8(8);
                e.path(existing);
                e.path(new);
            }
            FileOp::Unlink { path } => {
                e.u8(9);
                e.path(path);
            }
            FileOp::Rmdir { path } => {
                e.u8(10);
                e.path(path);
            }
            FileOp::Rename { from, to, flags } => {
                e.u8(11);
                e.path(from);
                e.path(to);
                e.u32(*flags);
            }
            FileOp::Orphan { path, id } => {
                e.u8(12);
                e.path(path);
                e.u64(*id);
            }
            FileOp::DropOrphan { id } => {
                e.u8(13);
                e.u64(*id);
            }
            FileOp::SetAttr {
                target,
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => {
                e.u8(14);
                e.target(target);
                e.opt_u32(*mode);
                e.opt_u32(*uid);
                e.opt_u32(*gid);
                e.opt_time(*atime);
                e.opt_time(*mtime);
            }
            FileOp::SetXattr {
                target,
                name,
                value,
                flags,
            } => {
                e.u8(15);
                e.target(target);
                e.bytes(name);
                e.bytes(value);
                e.i32(*flags);
            }
            FileOp::RemoveXattr { target, name } => {
                e.u8(16);
                e.target(target);
                e.bytes(name);
            }
            FileOp::RemoveTree { path } => {
                e.u8(17);
                e.path(path);
            }
            FileOp::Stamps => e.u8(18),
            FileOp::PutFile {
                path,
                mode,
                owner,
                mtime,
                data,
            } => {
                e.u8(20);
                e.path(path);
                e.u32(*mode);
                e.owner(*owner);
                e.time(*mtime);
                e.bytes(data);
            }
            FileOp::CopyWithin {
                target,
                from,
                to,
                len,
            } => {
                e.u8(19);
                e.target(target);
                e.u64(*from);
                e.u64(*to);
                e.u64(*len);
            }
        }
        encode_stamps(&mut e, &self.stamps);
        e.0
    }

    /// The whole `FileOp` frame of a [`FileOp::Write`] of `data` with
    /// `stamps`, its payload as [`Self::encode`] makes it, the data copied
    /// once (no op holding a copy of it first). Its seq is 0: see
    /// [`crate::set_frame_seq`].
    pub fn encode_write_frame(
        target: &Target,
        offset: u64,
        data: &[u8],
        stamps: &[Stamp],
    ) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(
            crate::HEADER_BYTES + 128 + data.len() + crate::frame::TRAILER_BYTES,
        ));
        e.0.resize(crate::HEADER_BYTES, 0);
        e.u8(1);
        e.target(target);
        e.u64(offset);
        e.bytes(data);
        encode_stamps(&mut e, stamps);
        let mut v = e.0;
        let payload = &v[crate::HEADER_BYTES..];
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let trailer = crate::trailer(payload);
        let hdr = crate::FrameHeader::new(Kind::FileOp, 0, 0, len).encode();
        v[..crate::HEADER_BYTES].copy_from_slice(&hdr);
        v.extend_from_slice(&trailer);
        v
    }
}

fn encode_stamps(e: &mut Enc, stamps: &[Stamp]) {
    e.u32(u32::try_from(stamps.len()).unwrap_or(u32::MAX));
    for s in stamps {
        e.target(&s.target);
        e.time(s.mtime);
    }
}

impl StampedOp {
    pub fn decode(b: &[u8]) -> Result<StampedOp, WireError> {
        let mut d = Dec {
            b,
            kind: Kind::FileOp,
        };
        let op = match d.u8()? {
            1 => FileOp::Write {
                target: d.target()?,
                offset: d.u64()?,
                data: d.bytes()?.to_vec(),
            },
            2 => FileOp::Truncate {
                target: d.target()?,
                size: d.u64()?,
            },
            3 => FileOp::Fallocate {
                target: d.target()?,
                mode: d.i32()?,
                offset: d.u64()?,
                length: d.u64()?,
            },
            4 => FileOp::Create {
                path: d.path()?,
                mode: d.u32()?,
                owner: d.owner()?,
            },
            5 => FileOp::Mknod {
                path: d.path()?,
                mode: d.u32()?,
                rdev: d.u64()?,
                owner: d.owner()?,
            },
            6 => FileOp::Mkdir {
                path: d.path()?,
                mode: d.u32()?,
                owner: d.owner()?,
            },
            7 => FileOp::Symlink {
                path: d.path()?,
                target: d.name(SHARE_PATH_BYTES_MAX, "symlink target")?,
                owner: d.owner()?,
            },
            8 => FileOp::Link {
                existing: d.path()?,
                new: d.path()?,
            },
            9 => FileOp::Unlink { path: d.path()? },
            10 => FileOp::Rmdir { path: d.path()? },
            11 => FileOp::Rename {
                from: d.path()?,
                to: d.path()?,
                flags: d.u32()?,
            },
            12 => FileOp::Orphan {
                path: d.path()?,
                id: d.u64()?,
            },
            13 => FileOp::DropOrphan { id: d.u64()? },
            14 => FileOp::SetAttr {
                target: d.target()?,
                mode: d.opt_u32()?,
                uid: d.opt_u32()?,
                gid: d.opt_u32()?,
                atime: d.opt_time()?,
                mtime: d.opt_time()?,
            },
            15 => FileOp::SetXattr {
                target: d.target()?,
                name: d.name(SHARE_NAME_BYTES_MAX, "xattr name")?,
                value: d.name(XATTR_VALUE_BYTES_MAX, "xattr value")?,
                flags: d.i32()?,
            },
            16 => FileOp::RemoveXattr {
                target: d.target()?,
                name: d.name(SHARE_NAME_BYTES_MAX, "xattr name")?,
            },
            17 => FileOp::RemoveTree { path: d.path()? },
            18 => FileOp::Stamps,
            20 => FileOp::PutFile {
                path: d.path()?,
                mode: d.u32()?,
                owner: d.owner()?,
                mtime: d.time()?,
                data: d.bytes()?.to_vec(),
            },
            19 => FileOp::CopyWithin {
                target: d.target()?,
                from: d.u64()?,
                to: d.u64()?,
                len: d.u64()?,
            },
            c => return Err(d.bad(format!("unknown file op {c}"))),
        };
        let n = d.u32()? as usize;
        // Each stamp is at least 13 bytes: bound the allocation by what is there.
        if n > d.b.len() / 13 {
            return Err(d.bad("more stamps than bytes"));
        }
        let mut stamps = Vec::with_capacity(n);
        for _ in 0..n {
            stamps.push(Stamp {
                target: d.target()?,
                mtime: d.time()?,
            });
        }
        if !d.b.is_empty() {
            return Err(d.bad(format!("{} trailing bytes", d.b.len())));
        }
        Ok(StampedOp { op, stamps })
    }
}

/// What an entry is, in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File {
        size: u64,
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    /// FIFO, socket or device node (`mode` has the type bits).
    Special {
        rdev: u64,
    },
}

/// One entry of a tree as a replica has it: enough to tell whether the
/// primary's entry differs (type, size, times, ownership, mode, inode change
/// time is local and not compared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub path: SharePath,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    /// Hard links to this inode within the manifest share one `link_id` (0 = none).
    pub link_id: u64,
}

/// Encodes manifest entries (one Manifest frame's payload).
pub fn encode_manifest(entries: &[ManifestEntry]) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(entries.len() * 64));
    e.u32(u32::try_from(entries.len()).unwrap_or(u32::MAX));
    for m in entries {
        e.path(&m.path);
        match &m.kind {
            EntryKind::File { size } => {
                e.u8(0);
                e.u64(*size);
            }
            EntryKind::Dir => e.u8(1),
            EntryKind::Symlink { target } => {
                e.u8(2);
                e.bytes(target);
            }
            EntryKind::Special { rdev } => {
                e.u8(3);
                e.u64(*rdev);
            }
        }
        e.u32(m.mode);
        e.u32(m.uid);
        e.u32(m.gid);
        e.time(m.mtime);
        e.u64(m.link_id);
    }
    e.0
}

pub fn decode_manifest(b: &[u8]) -> Result<Vec<ManifestEntry>, WireError> {
    let mut d = Dec {
        b,
        kind: Kind::Manifest,
    };
    let n = d.u32()? as usize;
    // Each entry is at least 37 bytes.
    if n > d.b.len() / 37 {
        return Err(d.bad("more entries than bytes"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let path = d.path()?;
        let kind = match d.u8()? {
            0 => EntryKind::File { size: d.u64()? },
            1 => EntryKind::Dir,
            2 => EntryKind::Symlink {
                target: d.name(SHARE_PATH_BYTES_MAX, "symlink target")?,
            },
            3 => EntryKind::Special { rdev: d.u64()? },
            k => return Err(d.bad(format!("unknown entry kind {k}"))),
        };
        out.push(ManifestEntry {
            path,
            kind,
            mode: d.u32()?,
            uid: d.u32()?,
            gid: d.u32()?,
            mtime: d.time()?,
            link_id: d.u64()?,
        });
    }
    if !d.b.is_empty() {
        return Err(d.bad(format!("{} trailing bytes", d.b.len())));
    }
    Ok(out)
}

/// A replica's block sums of one file (the answer to a sums request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSums {
    /// The replica's size of the file; `None`: no regular file there.
    pub size: Option<u64>,
    pub block: u32,
    pub sums: Vec<ferry_core::delta::BlockSum>,
}

/// Encodes `sums` (one frame's share of them; `size` and `block` repeat).
pub fn encode_sums(size: Option<u64>, block: u32, sums: &[ferry_core::delta::BlockSum]) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(17 + sums.len() * 20));
    e.u64(size.unwrap_or(u64::MAX));
    e.u32(block);
    e.u32(u32::try_from(sums.len()).unwrap_or(u32::MAX));
    for s in sums {
        e.u32(s.weak);
        e.0.extend_from_slice(&s.strong);
    }
    e.0
}

pub fn decode_sums(b: &[u8]) -> Result<FileSums, WireError> {
    let mut d = Dec {
        b,
        kind: Kind::Sums,
    };
    let size = d.u64()?;
    let block = d.u32()?;
    let n = d.u32()? as usize;
    if n > d.b.len() / 20 {
        return Err(d.bad("more sums than bytes"));
    }
    let mut sums = Vec::with_capacity(n);
    for _ in 0..n {
        sums.push(ferry_core::delta::BlockSum {
            weak: d.u32()?,
            strong: d.arr()?,
        });
    }
    if !d.b.is_empty() {
        return Err(d.bad(format!("{} trailing bytes", d.b.len())));
    }
    Ok(FileSums {
        size: (size != u64::MAX).then_some(size),
        block,
        sums,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> SharePath {
        SharePath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn paths_are_checked() {
        assert!(SharePath::new(b"a/b/c".to_vec()).is_ok());
        assert!(SharePath::new(b"we\nird/\xff\xfe".to_vec()).is_ok());
        for bad in [
            &b"/abs"[..],
            b"a//b",
            b"a/",
            b"..",
            b"a/../b",
            b"./a",
            b"a\0b",
        ] {
            assert!(SharePath::new(bad.to_vec()).is_err(), "{bad:?}");
        }
        assert!(SharePath::new(vec![b'x'; 255]).is_ok());
        assert!(SharePath::new(vec![b'x'; 256]).is_err());
        let deep: Vec<u8> = std::iter::repeat_n(&b"abcdefg/"[..], 600)
            .flatten()
            .copied()
            .collect();
        assert!(SharePath::new(deep).is_err());
    }

    #[test]
    fn path_helpers() {
        assert_eq!(p("a/b").split_last(), Some((p("a"), &b"b"[..])));
        assert_eq!(p("a").split_last(), Some((SharePath::root(), &b"a"[..])));
        assert!(p("a/b").starts_with(&p("a")));
        assert!(!p("ab").starts_with(&p("a")));
        assert!(p("ab").starts_with(&SharePath::root()));
        assert_eq!(SharePath::root().join(b"x").unwrap(), p("x"));
        assert!(p("x").join(b"..").is_err());
    }

    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            any::<u8>().prop_filter("no / or NUL", |b| *b != 0 && *b != b'/'),
            1..20,
        )
        .prop_filter("not . or ..", |v| v != b"." && v != b"..")
    }
    fn arb_path() -> impl Strategy<Value = SharePath> {
        proptest::collection::vec(arb_name(), 0..4).prop_map(|names| {
            let mut p = SharePath::root();
            for n in names {
                p = p.join(&n).unwrap();
            }
            p
        })
    }
    fn arb_target() -> impl Strategy<Value = Target> {
        prop_oneof![
            arb_path().prop_map(Target::Path),
            any::<u64>().prop_map(Target::Orphan)
        ]
    }
    fn arb_time() -> impl Strategy<Value = Time> {
        (any::<i64>(), 0u32..1_000_000_000).prop_map(|(secs, nanos)| Time { secs, nanos })
    }
    fn arb_owner() -> impl Strategy<Value = Owner> {
        (any::<u32>(), any::<u32>()).prop_map(|(uid, gid)| Owner { uid, gid })
    }
    fn arb_op() -> impl Strategy<Value = FileOp> {
        prop_oneof![
            (
                arb_target(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(target, offset, data)| FileOp::Write {
                    target,
                    offset,
                    data
                }),
            (arb_target(), any::<u64>())
                .prop_map(|(target, size)| FileOp::Truncate { target, size }),
            (arb_target(), any::<i32>(), any::<u64>(), any::<u64>()).prop_map(
                |(target, mode, offset, length)| FileOp::Fallocate {
                    target,
                    mode,
                    offset,
                    length
                }
            ),
            (arb_path(), any::<u32>(), arb_owner())
                .prop_map(|(path, mode, owner)| FileOp::Create { path, mode, owner }),
            (arb_path(), any::<u32>(), any::<u64>(), arb_owner()).prop_map(
                |(path, mode, rdev, owner)| FileOp::Mknod {
                    path,
                    mode,
                    rdev,
                    owner
                }
            ),
            (arb_path(), any::<u32>(), arb_owner()).prop_map(|(path, mode, owner)| FileOp::Mkdir {
                path,
                mode,
                owner
            }),
            (arb_path(), arb_name(), arb_owner()).prop_map(|(path, target, owner)| {
                FileOp::Symlink {
                    path,
                    target,
                    owner,
                }
            }),
            (arb_path(), arb_path()).prop_map(|(existing, new)| FileOp::Link { existing, new }),
            arb_path().prop_map(|path| FileOp::Unlink { path }),
            arb_path().prop_map(|path| FileOp::Rmdir { path }),
            (arb_path(), arb_path(), any::<u32>()).prop_map(|(from, to, flags)| FileOp::Rename {
                from,
                to,
                flags
            }),
            (arb_path(), any::<u64>()).prop_map(|(path, id)| FileOp::Orphan { path, id }),
            any::<u64>().prop_map(|id| FileOp::DropOrphan { id }),
            (
                arb_target(),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(arb_time()),
                proptest::option::of(arb_time())
            )
                .prop_map(|(target, mode, uid, gid, atime, mtime)| FileOp::SetAttr {
                    target,
                    mode,
                    uid,
                    gid,
                    atime,
                    mtime
                }),
            (
                arb_target(),
                arb_name(),
                proptest::collection::vec(any::<u8>(), 0..32),
                any::<i32>()
            )
                .prop_map(|(target, name, value, flags)| FileOp::SetXattr {
                    target,
                    name,
                    value,
                    flags
                }),
            (arb_target(), arb_name())
                .prop_map(|(target, name)| FileOp::RemoveXattr { target, name }),
            arb_path().prop_map(|path| FileOp::RemoveTree { path }),
            Just(FileOp::Stamps),
            (arb_target(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(target, from, to, len)| FileOp::CopyWithin {
                    target,
                    from,
                    to,
                    len
                }
            ),
            (
                arb_path(),
                any::<u32>(),
                arb_owner(),
                arb_time(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(path, mode, owner, mtime, data)| FileOp::PutFile {
                    path,
                    mode,
                    owner,
                    mtime,
                    data
                }),
        ]
    }

    #[test]
    fn sums_round_trip_and_refuse_short_input() {
        let sums = vec![
            ferry_core::delta::BlockSum {
                weak: 7,
                strong: [1; 16],
            },
            ferry_core::delta::BlockSum {
                weak: 9,
                strong: [2; 16],
            },
        ];
        let b = encode_sums(Some(8192), 4096, &sums);
        let got = decode_sums(&b).unwrap();
        assert_eq!((got.size, got.block, got.sums), (Some(8192), 4096, sums));
        assert_eq!(
            decode_sums(&encode_sums(None, 2048, &[])).unwrap().size,
            None
        );
        for cut in 0..b.len() {
            assert!(decode_sums(&b[..cut]).is_err());
        }
    }

    proptest! {
        #[test]
        fn ops_round_trip(op in arb_op(), stamps in proptest::collection::vec((arb_target(), arb_time()), 0..3)) {
            let s = StampedOp {
                op,
                stamps: stamps.into_iter().map(|(target, mtime)| Stamp { target, mtime }).collect(),
            };
            let b = s.encode();
            prop_assert_eq!(StampedOp::decode(&b).unwrap(), s.clone());
            // Every strict prefix is refused, never misread.
            for cut in 0..b.len() {
                prop_assert!(StampedOp::decode(&b[..cut]).is_err());
            }
        }

        #[test]
        fn a_write_frame_is_the_frame_of_its_op(
            target in arb_target(),
            offset in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..300),
            stamps in proptest::collection::vec((arb_target(), arb_time()), 0..3),
            seq in 1u64..,
        ) {
            let stamps: Vec<Stamp> = stamps.into_iter().map(|(target, mtime)| Stamp { target, mtime }).collect();
            let mut f = StampedOp::encode_write_frame(&target, offset, &data, &stamps);
            crate::set_frame_seq(&mut f, seq);
            let op = StampedOp { op: FileOp::Write { target, offset, data }, stamps };
            prop_assert_eq!(f, crate::encode_frame(Kind::FileOp, seq, 0, &op.encode()));
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = StampedOp::decode(&b);
            let _ = decode_manifest(&b);
        }

        #[test]
        fn manifests_round_trip(entries in proptest::collection::vec(
            (arb_path(), 0u8..4, any::<u64>(), arb_name(), any::<u32>(), arb_time()), 0..5)) {
            let entries: Vec<ManifestEntry> = entries
                .into_iter()
                .map(|(path, k, n, t, mode, mtime)| ManifestEntry {
                    path,
                    kind: match k {
                        0 => EntryKind::File { size: n },
                        1 => EntryKind::Dir,
                        2 => EntryKind::Symlink { target: t },
                        _ => EntryKind::Special { rdev: n },
                    },
                    mode,
                    uid: mode ^ 1,
                    gid: mode ^ 2,
                    mtime,
                    link_id: n,
                })
                .collect();
            let b = encode_manifest(&entries);
            prop_assert_eq!(decode_manifest(&b).unwrap(), entries);
        }
    }

    #[test]
    fn hostile_paths_in_ops_are_refused() {
        let mut b = StampedOp {
            op: FileOp::Unlink { path: p("aa/bb") },
            stamps: vec![],
        }
        .encode();
        // Turn "aa/bb" into "../bb".
        let i = b.windows(5).position(|w| w == b"aa/bb").unwrap();
        b[i..i + 2].copy_from_slice(b"..");
        assert!(StampedOp::decode(&b).is_err());
    }
}
