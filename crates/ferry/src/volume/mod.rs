//! The volume engine: raw sparse images and their continuous block
//! replication between two nodes.
//!
//! - this file: volumes on this node (`VolumeStore`), raw sparse images under
//!   `DATA_DIR/volumes/NAME/`;
//! - [`primary`]: the replicated `BlockDevice` the NBD export serves, and its copier;
//! - [`link`]: the primary's network side (frames out, acks in, reconnect);
//! - [`replica`]: the replica's side (accept, apply in order, acknowledge);
//! - [`meta`]: per-volume metadata (role, generations, activity log) and the saved dirty map;
//! - [`snapshot`]: test-cutover snapshots; [`verify`]: Merkle comparison.
//!
//! Volumes on this node: raw sparse images under `DATA_DIR/volumes/NAME/`.
//!
//! ```text
//! DATA_DIR/volumes/NAME/volume.json   metadata: name, id, size (written atomically)
//! DATA_DIR/volumes/NAME/data.raw      the image, sparse
//! DATA_DIR/volumes/NAME/lock          flock(2) held by whoever exports or changes it
//! ```
//!
//! A volume is created in a hidden temporary directory and renamed into place,
//! so a crash never leaves half a volume. The lock makes "resize refused while
//! exported" hold across processes, and dies with its holder.

pub mod link;
pub mod meta;
pub mod primary;
pub mod replica;
pub mod seeds;
pub mod snapshot;
pub mod standby;
pub mod verify;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use ferry_core::ByteSize;
use ferry_core::Name;
use serde::{Deserialize, Serialize};

/// How a new replica's first sync finds what to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Baseline {
    /// Everything allocated (the peer's copy is blank or unknown).
    Full,
    /// The peer holds an old copy: send the blocks whose hashes differ.
    Checksum,
    /// Offline seeding: the peer's copy was restored from this archive of
    /// this volume; send the blocks written since its barrier and those
    /// whose hashes differ.
    Seed(Name),
}

/// Largest volume: what `off_t` can address.
const VOLUME_BYTES_MAX: u64 = i64::MAX as u64;
/// Volume sizes are whole sectors, as every block client expects.
const SECTOR_BYTES: u64 = 512;
const METADATA_BYTES_MAX: u64 = 64 * 1024;

impl From<ferry_core::NameError> for VolumeError {
    fn from(e: ferry_core::NameError) -> Self {
        VolumeError::InvalidName(e)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// (Not a `source`: its text is the whole message, printed once.)
    #[error("volume: {0}")]
    InvalidName(ferry_core::NameError),
    #[error("volume {name:?} already exists")]
    Exists { name: String },
    #[error(transparent)]
    Record(#[from] crate::store::StoreError),
    #[error("no volume named {name:?} in {dir} (see `ferry volume list`)")]
    NotFound { name: String, dir: PathBuf },
    #[error("invalid size {size}: {reason}")]
    InvalidSize { size: u64, reason: &'static str },
    #[error("volume {name:?} is in use (exported by pid {holder}); stop that export first")]
    Busy { name: String, holder: String },
    #[error("volume {name:?} is {current} and the new size is smaller: pass --shrink to cut off the end (its data is lost)")]
    ShrinkRefused { name: String, current: ByteSize },
    #[error("refusing to delete volume {name:?} without --yes: its data would be destroyed")]
    DeleteUnconfirmed { name: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: bad volume metadata: {source}")]
    BadMetadata {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl crate::store::Record for VolumeMeta {
    const KIND: &'static str = "volume";
}

/// What `volume.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMeta {
    pub name: String,
    /// Random identity, stable for the volume's life (128 bits, hex).
    pub id: String,
    pub size_bytes: u64,
    pub created_unix: u64,
}

/// A volume as listed.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub exported: bool,
    pub path: PathBuf,
}

/// The volumes of one data dir.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    root: PathBuf,
}

/// A volume directory that does not load, and why.
#[derive(Debug, Clone)]
pub struct BadVolume {
    pub name: String,
    pub path: PathBuf,
    pub error: String,
}

/// An exclusive hold on a volume; released on drop (or when the process dies).
#[derive(Debug)]
pub struct VolumeLock {
    _file: File,
}

/// Parses a volume name (the one grammar of [`Name`]).
pub fn validate_name(name: &str) -> Result<Name, VolumeError> {
    Ok(Name::parse(name)?)
}

fn validate_size(size: u64) -> Result<(), VolumeError> {
    let reason = if size == 0 {
        "a volume needs at least one sector (512 bytes)"
    } else if size % SECTOR_BYTES != 0 {
        "must be a multiple of 512 bytes"
    } else if size > VOLUME_BYTES_MAX {
        "larger than 2^63 - 1 bytes"
    } else {
        return Ok(());
    };
    Err(VolumeError::InvalidSize { size, reason })
}

fn random_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), VolumeError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

impl VolumeStore {
    /// The store under `data_dir`, created if missing.
    pub fn open(data_dir: &Path) -> Result<VolumeStore, VolumeError> {
        let root = data_dir.join("volumes");
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(VolumeStore { root })
    }

    /// The data dir this store lives in.
    pub fn data_dir(&self) -> &Path {
        self.root.parent().unwrap_or(&self.root)
    }

    /// `volumes/NAME`: only a checked [`Name`] becomes a path.
    pub fn dir(&self, name: &Name) -> PathBuf {
        self.root.join(name)
    }

    pub fn image_path(&self, name: &Name) -> PathBuf {
        self.dir(name).join("data.raw")
    }

    pub fn create(&self, name: &str, size: u64) -> Result<VolumeMeta, VolumeError> {
        let id = random_id().map_err(io_err(Path::new("/dev/urandom")))?;
        self.create_with_id(name, size, &id)
    }

    /// Creates a volume with a given identity (a replica of another node's volume).
    pub fn create_with_id(
        &self,
        name: &str,
        size: u64,
        id: &str,
    ) -> Result<VolumeMeta, VolumeError> {
        let name = &validate_name(name)?;
        validate_size(size)?;
        let dir = self.dir(name);
        if dir.exists() {
            return Err(VolumeError::Exists {
                name: name.to_string(),
            });
        }
        let tmp = self
            .root
            .join(format!(".{name}.creating-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let result = (|| {
            let image = tmp.join("data.raw");
            ferry_nbd::FileDevice::create(&image, size).map_err(io_err(&image))?;
            let meta = VolumeMeta {
                name: name.to_string(),
                id: id.to_string(),
                size_bytes: size,
                created_unix: now_unix(),
            };
            let json = crate::store::encode(&meta).map_err(|source| VolumeError::BadMetadata {
                path: tmp.join("volume.json"),
                source,
            })?;
            write_atomic(&tmp.join("volume.json"), &json)?;
            // rename(2) fails if the target appeared meanwhile: no volume is clobbered.
            fs::rename(&tmp, &dir).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
                    VolumeError::Exists {
                        name: name.to_string(),
                    }
                }
                _ => VolumeError::Io {
                    path: dir.clone(),
                    source: e,
                },
            })?;
            File::open(&self.root)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.root))?;
            Ok(meta)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    pub fn meta(&self, name: &str) -> Result<VolumeMeta, VolumeError> {
        let name = &validate_name(name)?;
        let path = self.dir(name).join("volume.json");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound {
                    name: name.to_string(),
                    dir: self.root.clone(),
                })
            }
            Err(e) => return Err(VolumeError::Io { path, source: e }),
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(file, METADATA_BYTES_MAX), &mut bytes)
            .map_err(io_err(&path))?;
        let d = crate::store::decode::<VolumeMeta>(&path, &bytes)?;
        if d.upgraded_from.is_some() {
            // Written before records had an envelope: rewritten in it now.
            match self.write_meta(&d.record) {
                Ok(()) => tracing::info!(path = %path.display(), "store.upgraded"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "store.upgrade_failed")
                }
            }
        }
        Ok(d.record)
    }

    fn write_meta(&self, meta: &VolumeMeta) -> Result<(), VolumeError> {
        let path = self.dir(&validate_name(&meta.name)?).join("volume.json");
        let json = crate::store::encode(meta).map_err(|source| VolumeError::BadMetadata {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json)
    }

    /// Takes the volume's exclusive lock, or says who holds it.
    pub fn lock(&self, name: &str) -> Result<VolumeLock, VolumeError> {
        self.meta(name)?;
        let name = &validate_name(name)?;
        let path = self.dir(name).join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                return Err(VolumeError::Busy {
                    name: name.to_string(),
                    holder: holder.trim().to_string(),
                });
            }
            return Err(VolumeError::Io { path, source: err });
        }
        // The holder's PID, padded to a fixed width and written in place:
        // rewriting the existing bytes needs no new space (a full disk at
        // restart must not keep a volume from being served).
        let pid = format!("{:<20}", std::process::id());
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len != pid.len() as u64 {
            file.set_len(0).map_err(io_err(&path))?;
        }
        std::os::unix::fs::FileExt::write_all_at(&file, pid.as_bytes(), 0)
            .map_err(io_err(&path))?;
        Ok(VolumeLock { _file: file })
    }

    fn is_locked(&self, name: &str) -> bool {
        matches!(self.lock(name), Err(VolumeError::Busy { .. }))
    }

    pub fn info(&self, name: &str) -> Result<VolumeInfo, VolumeError> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.meta(name)?;
        let image = self.image_path(&validate_name(name)?);
        let stat = fs::metadata(&image).map_err(io_err(&image))?;
        Ok(VolumeInfo {
            exported: self.is_locked(name),
            name: meta.name,
            id: meta.id,
            size_bytes: stat.len(),
            allocated_bytes: stat.blocks() * 512,
            path: image,
        })
    }

    /// The volumes that load; damaged ones are left out (see [`Self::scan`]).
    pub fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        Ok(self.scan()?.0)
    }

    /// Every volume directory, each read on its own: the ones that load,
    /// and the ones that do not (a name outside the grammar, a missing or
    /// damaged `volume.json`, an unreadable image) with the reason.
    /// Hidden entries (a create or delete in progress) are skipped.
    pub fn scan(&self) -> Result<(Vec<VolumeInfo>, Vec<BadVolume>), VolumeError> {
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match self.info(&name) {
                Ok(i) => good.push(i),
                Err(e) => bad.push(BadVolume {
                    name,
                    path: entry.path(),
                    error: e.to_string(),
                }),
            }
        }
        good.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((good, bad))
    }

    pub fn resize(&self, name: &str, size: u64, shrink: bool) -> Result<VolumeMeta, VolumeError> {
        validate_size(size)?;
        let _lock = self.lock(name)?;
        let mut meta = self.meta(name)?;
        if size < meta.size_bytes && !shrink {
            return Err(VolumeError::ShrinkRefused {
                name: name.to_string(),
                current: ByteSize(meta.size_bytes),
            });
        }
        let image = self.image_path(&validate_name(name)?);
        let f = OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(io_err(&image))?;
        f.set_len(size).map_err(io_err(&image))?;
        f.sync_all().map_err(io_err(&image))?;
        meta.size_bytes = size;
        self.write_meta(&meta)?;
        Ok(meta)
    }

    pub fn delete(&self, name: &str, confirmed: bool) -> Result<(), VolumeError> {
        let _lock = self.lock(name)?;
        if !confirmed {
            return Err(VolumeError::DeleteUnconfirmed {
                name: name.to_string(),
            });
        }
        let name = &validate_name(name)?;
        let dir = self.dir(name);
        let doomed = self
            .root
            .join(format!(".{name}.deleting-{}", std::process::id()));
        fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "vm-disk.0", "a_b", &"x".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "..",
            "a b",
            &"x".repeat(65),
            "é",
            "A_b",
            "disk0@test",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lifecycle_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        store.create("v", 1 << 20).unwrap();
        assert!(matches!(
            store.create("v", 1 << 20),
            Err(VolumeError::Exists { .. })
        ));
        assert!(matches!(
            store.create("w", 1000),
            Err(VolumeError::InvalidSize { .. })
        ));
        let info = store.info("v").unwrap();
        assert_eq!((info.size_bytes, info.exported), (1 << 20, false));
        {
            let _held = store.lock("v").unwrap();
            assert!(matches!(
                store.resize("v", 2 << 20, false),
                Err(VolumeError::Busy { .. })
            ));
            assert!(store.info("v").unwrap().exported);
        }
        assert_eq!(
            store.resize("v", 2 << 20, false).unwrap().size_bytes,
            2 << 20
        );
        assert!(matches!(
            store.resize("v", 1 << 20, false),
            Err(VolumeError::ShrinkRefused { .. })
        ));
        assert!(matches!(
            store.delete("v", false),
            Err(VolumeError::DeleteUnconfirmed { .. })
        ));
        store.delete("v", true).unwrap();
        assert!(store.list().unwrap().is_empty());
    }
}
