//! An archive store on disk: content-addressed chunks, one manifest per
//! archive, and the lock that keeps a prune from deleting what a running
//! create is about to name.
//!
//! ```text
//! STORE/store.json             {"format": 1} (written once, when the store is made)
//! STORE/lock                   flock(2): a create holds it shared, a prune exclusive
//! STORE/chunks/ab/abcd…        a chunk (header + stored bytes, ferry_core::archive)
//! STORE/archives/NAME.json     a manifest, written last, atomically (a store record)
//! STORE/partial/NAME.json      an interrupted create's progress (resume, and prune keeps
//!                              the chunks it names)
//! STORE/tmp/                   chunks being written (renamed into chunks/ when whole)
//! ```
//!
//! Chunks are written to `tmp/` and renamed into place without an fsync
//! each; [`Store::sync`] (one `syncfs(2)`) makes every one durable before a
//! progress record or a manifest names them. A chunk torn by a crash before
//! that has a bad header or length and is never used ([`Store::has`] says no,
//! [`Store::read`] names it); a create writes it again.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_core::archive::{ChunkError, ChunkHeader, ChunkId, Codec, CHUNK_HEADER_BYTES};
use ferry_core::Name;

use super::manifest::{Manifest, Partial};
use super::ArchiveError;

const STORE_FORMAT: u32 = 1;

/// A file in `archives/` that is not a readable manifest, and why.
pub type Damaged = (PathBuf, String);

/// An open store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

/// A held store lock (shared: a create; exclusive: a prune). Released when
/// dropped, or when its process dies.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// What writing a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    /// It was not in the store yet.
    pub new: bool,
    /// Bytes its file holds (header included).
    pub stored_bytes: u64,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Opens the store at `root`; `create` makes it (mode 0700) if missing.
    pub fn open(root: &Path, create: bool) -> Result<Store, ArchiveError> {
        let marker = root.join("store.json");
        if !marker.exists() {
            if !create {
                return Err(ArchiveError::NoStore(root.to_path_buf()));
            }
            if root.exists()
                && fs::read_dir(root)
                    .map_err(io_err("cannot read", root))?
                    .next()
                    .is_some()
            {
                return Err(ArchiveError::NotAStore(root.to_path_buf()));
            }
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io_err("cannot create the store", root))?;
            for d in ["chunks", "archives", "partial", "tmp"] {
                let p = root.join(d);
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&p)
                    .or_else(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(io_err("cannot create", &p))?;
            }
            crate::store::write_atomic_private(
                &marker,
                format!("{{\"format\": {STORE_FORMAT}}}\n").as_bytes(),
            )
            .map_err(io_err("cannot write", &marker))?;
        } else {
            let text = fs::read_to_string(&marker).map_err(io_err("cannot read", &marker))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ArchiveError::Damaged {
                    path: marker.clone(),
                    why: e.to_string(),
                })?;
            let f = v["format"].as_u64().unwrap_or(0);
            if f != STORE_FORMAT as u64 {
                return Err(ArchiveError::Damaged {
                    path: marker,
                    why: format!("store format {f}; this ferry reads format {STORE_FORMAT}"),
                });
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock_file(&self) -> Result<File, ArchiveError> {
        let p = self.root.join("lock");
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(io_err("cannot open the lock", &p))
    }

    /// The lock a create holds for its whole run (many may).
    pub fn lock_shared(&self) -> Result<StoreLock, ArchiveError> {
        self.lock(libc::LOCK_SH, true)
    }

    /// The lock a prune holds: `wait` blocks until no create runs; else a
    /// running create is an error.
    pub fn lock_exclusive(&self, wait: bool) -> Result<StoreLock, ArchiveError> {
        self.lock(libc::LOCK_EX, wait)
    }

    fn lock(&self, how: libc::c_int, wait: bool) -> Result<StoreLock, ArchiveError> {
        let f = self.lock_file()?;
        let op = if wait { how } else { how | libc::LOCK_NB };
        loop {
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(StoreLock { _file: f });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Err(ArchiveError::Busy(self.root.clone())),
                _ => return Err(io_err("cannot lock", &self.root.join("lock"))(e)),
            }
        }
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let (dir, file) = id.path_parts();
        self.root.join("chunks").join(dir).join(file)
    }

    /// Is the chunk in the store, whole (its header and length agree)?
    pub fn has(&self, id: &ChunkId) -> bool {
        let p = self.chunk_path(id);
        let Ok(f) = File::open(&p) else { return false };
        let Ok(meta) = f.metadata() else { return false };
        let mut head = [0u8; CHUNK_HEADER_BYTES];
        if f.read_exact_at(&mut head, 0).is_err() {
            return false;
        }
        ChunkHeader::decode(&head, meta.len()).is_ok()
    }

    /// Stores `raw` (whose id is `id`) unless it is there already:
    /// compressed at `zstd_level` when that makes it smaller.
    pub fn put(&self, id: &ChunkId, raw: &[u8], zstd_level: i32) -> Result<Put, ArchiveError> {
        let path = self.chunk_path(id);
        if self.has(id) {
            let stored_bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            return Ok(Put {
                new: false,
                stored_bytes,
            });
        }
        let packed = zstd::bulk::compress(raw, zstd_level)
            .map_err(io_err("cannot compress a chunk for", &path))?;
        let (codec, body) = if packed.len() < raw.len() {
            (Codec::Zstd, &packed[..])
        } else {
            (Codec::Raw, raw)
        };
        let header = ChunkHeader {
            codec,
            raw_len: raw.len() as u32,
            stored_len: body.len() as u32,
        };
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            id,
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err("cannot write", &tmp))?;
        let head = header.encode();
        f.write_all_at(&head, 0)
            .map_err(io_err("cannot write", &tmp))?;
        f.write_all_at(body, CHUNK_HEADER_BYTES as u64)
            .map_err(io_err("cannot write", &tmp))?;
        // Start writing it out now (no wait), so the create's syncs find
        // little left to do.
        // SAFETY: sync_file_range on a descriptor this function owns; no
        // memory is passed. Its failure only leaves the writeback to syncfs.
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
        drop(f);
        let dir = path.parent().expect("a chunk path has a directory");
        if let Err(e) = fs::rename(&tmp, &path) {
            if e.kind() != io::ErrorKind::NotFound {
                let _ = fs::remove_file(&tmp);
                return Err(io_err("cannot place", &path)(e));
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io_err("cannot create", dir))?;
            fs::rename(&tmp, &path).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_err("cannot place", &path)(e)
            })?;
        }
        Ok(Put {
            new: true,
            stored_bytes: (CHUNK_HEADER_BYTES + body.len()) as u64,
        })
    }

    /// The chunk's bytes, checked: its header, its length, its content
    /// against its name (`leaf_bytes`: the leaves its id is made of).
    /// `leaves` receives the leaves' hashes.
    pub fn read(
        &self,
        id: &ChunkId,
        leaf_bytes: u64,
        leaves: &mut Vec<blake3::Hash>,
    ) -> Result<Vec<u8>, ArchiveError> {
        let path = self.chunk_path(id);
        let bad = |why: ChunkError| ArchiveError::BadChunk {
            id: *id,
            path: path.clone(),
            why: why.to_string(),
        };
        let mut f = File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ArchiveError::BadChunk {
                    id: *id,
                    path: path.clone(),
                    why: "missing".into(),
                }
            } else {
                io_err("cannot read", &path)(e)
            }
        })?;
        let len = f.metadata().map_err(io_err("cannot read", &path))?.len();
        // The header, then the body read straight into its own buffer (a
        // raw chunk's body is returned as it is: no copy).
        let mut head = [0u8; CHUNK_HEADER_BYTES];
        if len < CHUNK_HEADER_BYTES as u64 {
            return Err(bad(ChunkError::Short(len)));
        }
        f.read_exact(&mut head)
            .map_err(io_err("cannot read", &path))?;
        let header = ChunkHeader::decode(&head, len).map_err(bad)?;
        let mut body = Vec::with_capacity((len as usize).saturating_sub(CHUNK_HEADER_BYTES));
        f.read_to_end(&mut body)
            .map_err(io_err("cannot read", &path))?;
        let raw = match header.codec {
            Codec::Raw => body,
            Codec::Zstd => zstd::bulk::decompress(&body, header.raw_len as usize).map_err(|e| {
                ArchiveError::BadChunk {
                    id: *id,
                    path: path.clone(),
                    why: format!("does not decompress: {e}"),
                }
            })?,
        };
        if raw.len() as u64 != header.raw_len as u64 {
            return Err(bad(ChunkError::RawLength {
                have: raw.len() as u64,
                want: header.raw_len as u64,
            }));
        }
        leaves.clear();
        ferry_core::merkle::leaves_of(&raw, leaf_bytes as usize, leaves);
        let have = ChunkId::of_leaves(raw.len() as u64, leaves);
        if have != *id {
            return Err(bad(ChunkError::Id {
                have: have.to_string(),
            }));
        }
        Ok(raw)
    }

    /// Bytes the chunk's file holds (0 if missing).
    pub fn stored_bytes(&self, id: &ChunkId) -> u64 {
        fs::metadata(self.chunk_path(id))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Makes every chunk written so far durable (one `syncfs(2)`).
    pub fn sync(&self) -> Result<(), ArchiveError> {
        let d = File::open(&self.root).map_err(io_err("cannot open", &self.root))?;
        // SAFETY: syncfs on a descriptor this function owns.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io_err("cannot sync", &self.root)(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Every chunk file's id (files whose name is not an id are skipped).
    pub fn chunks(&self) -> Result<Vec<ChunkId>, ArchiveError> {
        let base = self.root.join("chunks");
        let mut out = Vec::new();
        for d in fs::read_dir(&base).map_err(io_err("cannot list", &base))? {
            let d = d.map_err(io_err("cannot list", &base))?;
            if !d.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let p = d.path();
            for f in fs::read_dir(&p).map_err(io_err("cannot list", &p))? {
                let f = f.map_err(io_err("cannot list", &p))?;
                if let Some(id) = f
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<ChunkId>().ok())
                {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes a chunk (prune, under the exclusive lock).
    pub fn remove(&self, id: &ChunkId) -> Result<u64, ArchiveError> {
        let p = self.chunk_path(id);
        let n = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(&p) {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("cannot delete", &p)(e)),
        }
    }

    /// Removes temporary files of writers that are gone: chunks in `tmp/`,
    /// cut-short record writes in `partial/` and `archives/` (prune, under
    /// the exclusive lock: no create runs).
    pub fn clear_tmp(&self) -> Result<u64, ArchiveError> {
        let base = self.root.join("tmp");
        let mut n = 0;
        for f in fs::read_dir(&base).map_err(io_err("cannot list", &base))? {
            let f = f.map_err(io_err("cannot list", &base))?;
            if fs::remove_file(f.path()).is_ok() {
                n += 1;
            }
        }
        // Record writes a crash cut short (`crate::store::save`'s NAME.tmp).
        for d in ["partial", "archives"] {
            let base = self.root.join(d);
            let Ok(rd) = fs::read_dir(&base) else {
                continue;
            };
            for f in rd.filter_map(|e| e.ok()) {
                let p = f.path();
                if p.extension().is_some_and(|x| x == "tmp") && fs::remove_file(&p).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn manifest_path(&self, name: &Name) -> PathBuf {
        self.root
            .join("archives")
            .join(format!("{}.json", name.as_str()))
    }

    fn partial_path(&self, name: &Name) -> PathBuf {
        self.root
            .join("partial")
            .join(format!("{}.json", name.as_str()))
    }

    pub fn exists(&self, name: &Name) -> bool {
        self.manifest_path(name).exists()
    }

    /// Writes a manifest (atomically; call [`Store::sync`] first).
    pub fn save_manifest(&self, m: &Manifest) -> Result<(), ArchiveError> {
        let p = self.manifest_path(&m.name);
        crate::store::save(&p, m).map_err(ArchiveError::Store)
    }

    pub fn manifest(&self, name: &Name) -> Result<Manifest, ArchiveError> {
        let p = self.manifest_path(name);
        crate::store::load::<Manifest>(&p)
            .map_err(ArchiveError::Store)?
            .ok_or_else(|| ArchiveError::NoArchive {
                name: name.as_str().to_string(),
                store: self.root.clone(),
            })
    }

    /// Every manifest, and the files that are not one (damaged: named,
    /// never guessed at).
    pub fn manifests(&self) -> Result<(Vec<Manifest>, Vec<Damaged>), ArchiveError> {
        let base = self.root.join("archives");
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let mut paths: Vec<PathBuf> = fs::read_dir(&base)
            .map_err(io_err("cannot list", &base))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            match crate::store::load::<Manifest>(&p) {
                Ok(Some(m)) => ok.push(m),
                Ok(None) => {}
                Err(e) => bad.push((p, e.to_string())),
            }
        }
        Ok((ok, bad))
    }

    /// Deletes an archive's manifest (its chunks go at the next prune).
    pub fn delete_manifest(&self, name: &Name) -> Result<(), ArchiveError> {
        let p = self.manifest_path(name);
        fs::remove_file(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ArchiveError::NoArchive {
                    name: name.as_str().to_string(),
                    store: self.root.clone(),
                }
            } else {
                io_err("cannot delete", &p)(e)
            }
        })?;
        if let Ok(d) = File::open(self.root.join("archives")) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub fn save_partial(&self, p: &Partial) -> Result<(), ArchiveError> {
        crate::store::save(&self.partial_path(&p.name), p).map_err(ArchiveError::Store)
    }

    /// An interrupted create's progress (a damaged one is treated as none:
    /// the create starts over, dedup keeps what was written).
    pub fn partial(&self, name: &Name) -> Option<Partial> {
        crate::store::load::<Partial>(&self.partial_path(name))
            .ok()
            .flatten()
    }

    pub fn remove_partial(&self, name: &Name) {
        let _ = fs::remove_file(self.partial_path(name));
    }

    /// Every progress record (prune keeps the chunks they name).
    pub fn partials(&self) -> Vec<Partial> {
        let base = self.root.join("partial");
        let Ok(rd) = fs::read_dir(&base) else {
            return Vec::new();
        };
        // Only NAME.json: a NAME.tmp is a record write a crash cut short
        // (or finished but never renamed): it names nothing.
        rd.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| crate::store::load::<Partial>(&p).ok().flatten())
            .collect()
    }

    /// Every chunk any manifest or progress record names.
    pub fn referenced(&self) -> Result<BTreeSet<ChunkId>, ArchiveError> {
        let (ms, bad) = self.manifests()?;
        if let Some((p, why)) = bad.into_iter().next() {
            // A damaged manifest's chunks are unknown: deleting anything
            // could destroy an archive.
            return Err(ArchiveError::Damaged { path: p, why });
        }
        let mut out = BTreeSet::new();
        for m in &ms {
            out.extend(m.chunk_ids());
        }
        for p in self.partials() {
            out.extend(p.chunk_ids());
        }
        Ok(out)
    }
}
