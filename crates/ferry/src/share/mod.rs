//! Shares: directories replicated file by file.
//!
//! On disk, `DATA_DIR/shares/NAME/` holds `share.json` (the record),
//! `data/` (the tree itself: the primary's FUSE mount is backed by it, a
//! replica's stream is applied to it), `orphans/` (unlinked files still open)
//! and `journal` (paths changed while the replica could not be told).
//!
//! A sync share is served by a FUSE mount at its `path` on the primary
//! ([`fuse`]): every mutating call is applied to `data/`, sequenced on the
//! share's stream ([`primary::PrimaryShare`]) and answered once the replica
//! has it; `fsync` once both sides made it durable. The link ([`link`])
//! first brings the replica level (a manifest comparison of the whole tree,
//! or only of the journal's paths), then streams.

pub mod fuse;
pub mod inbox;
pub mod link;
pub mod primary;
pub mod settings;
pub mod tree;
pub mod watch;

use ferry_core::Name;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A share's persistent record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareRecord {
    pub name: Name,
    /// Identity (random, made at creation): a replica of another share of
    /// the same name is refused.
    pub id: String,
    /// "sync" (FUSE mount) or "async" (watcher).
    pub mode: String,
    /// Where applications use it on this node (the mount point).
    pub path: PathBuf,
    /// "primary" or "replica".
    pub role: String,
    /// The node holding the other copy.
    pub peer: Option<String>,
    /// Primary: the history id of its tree; changes when the journal of
    /// changed paths cannot be trusted (an unclean stop). Replica: the
    /// primary's generation it is an up-to-date copy of (0: not up to date).
    pub generation: u64,
    /// Primary: stopped cleanly (its journal is complete).
    pub clean: bool,
    /// Primary: unix seconds when the replica was last known level with the
    /// tree. A file whose ctime is later may differ even with equal size and
    /// mtime (tar, rsync and `cp -p` restore mtimes): it is compared by content.
    #[serde(default)]
    pub level_at: i64,
    /// Primary: unix seconds before which everything was received by the
    /// replica (applied there, maybe not yet durable).
    #[serde(default)]
    pub received_at: i64,
    /// Replica that was primary before (demoted after a failover): files it
    /// changed at or after this unix second are compared by content until
    /// the new primary declares it up to date.
    #[serde(default)]
    pub suspect_since: Option<i64>,
    /// Primary: the replica was exactly level at `level_at` (promoted by a
    /// verified cutover: both trees frozen and their digests equal), so the
    /// first resync compares by content only what the journal says changed
    /// since, not every file with a recent ctime. Cleared once that resync
    /// ends, or when the journal cannot be trusted.
    #[serde(default)]
    pub level_exact: bool,
    /// Async primary promoted here from a replica: its tree is `data/`
    /// (under the root-only data dir), bind-mounted at `path` while it is
    /// served, so applications keep using the share's path.
    #[serde(default)]
    pub bind_data: bool,
}

/// Why a share operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share {0}")]
    BadName(String),
    #[error("share {0:?} already exists")]
    Exists(String),
    #[error("share {0:?} does not exist")]
    NotFound(String),
    #[error("mode {0:?} is not valid: use sync or async")]
    BadMode(String),
    #[error("path {0:?} must be absolute")]
    RelativePath(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share record {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ShareError + 'a {
    move |source| ShareError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Parses a share name (the one grammar of [`Name`]).
pub fn check_name(name: &str) -> Result<Name, ShareError> {
    Name::parse(name).map_err(|e| ShareError::BadName(e.to_string()))
}

/// `DATA_DIR/shares`.
#[derive(Debug, Clone)]
pub struct ShareStore {
    root: PathBuf,
}

impl ShareStore {
    pub fn new(data_dir: &Path) -> ShareStore {
        ShareStore {
            root: data_dir.join("shares"),
        }
    }

    /// `DATA_DIR/shares`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `shares/NAME`: only a checked [`Name`] becomes a path.
    pub fn dir(&self, name: &Name) -> PathBuf {
        self.root.join(name)
    }

    /// Makes `shares/` (mode 0700), or tightens an existing one to 0700: a
    /// replica's tree, a sync share's backing tree and a promoted async
    /// share's tree live below it, and a local user writing them directly
    /// would bypass replication (and the permission checks of the mount).
    pub fn prepare(&self) -> Result<(), ShareError> {
        private_dir(&self.root).map_err(io_err("cannot create", &self.root))
    }

    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("share.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            // Not a creation in progress (`.NAME.new`).
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        names
    }

    pub fn load(&self, name: &str) -> Result<ShareRecord, ShareError> {
        let p = self.dir(&check_name(name)?).join("share.json");
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ShareError::NotFound(name.to_string()))
            }
            Err(e) => return Err(io_err("cannot read", &p)(e)),
        };
        let d =
            crate::store::decode::<ShareRecord>(&p, &text).map_err(|e| ShareError::Damaged {
                path: p.clone(),
                reason: e.to_string(),
            })?;
        if d.upgraded_from.is_some() {
            // Written before records had an envelope: rewritten in it now
            // (if that fails, e.g. on a full disk, the next save does it).
            match write_durably(&p, &d.record) {
                Ok(()) => tracing::info!(path = %p.display(), "store.upgraded"),
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "store.upgrade_failed"),
            }
        }
        Ok(d.record)
    }

    /// Writes the record durably (temp file, fsync, rename, fsync dir).
    pub fn save(&self, rec: &ShareRecord) -> Result<(), ShareError> {
        let dir = self.dir(&check_name(&rec.name)?);
        std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        write_durably(&dir.join("share.json"), rec)
    }

    /// [`Self::save`] without taking space (a full disk): `rec` overwrites
    /// the record where it is, padded with spaces to its length, when it is
    /// no longer than it.
    pub fn save_in_place(&self, rec: &ShareRecord) -> Result<(), ShareError> {
        let p = self.dir(&check_name(&rec.name)?).join("share.json");
        let mut body = crate::store::encode(rec)
            .map_err(|e| io_err("cannot encode", &p)(std::io::Error::other(e)))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err("cannot write", &p))?;
        let len = f.metadata().map_err(io_err("cannot write", &p))?.len() as usize;
        if body.len() > len {
            return Err(io_err("cannot write in place", &p)(
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        body.resize(len, b' ');
        std::os::unix::fs::FileExt::write_all_at(&f, &body, 0)
            .and_then(|_| f.sync_all())
            .map_err(io_err("cannot write", &p))
    }

    /// Makes a new share's directories and record, all or nothing: they are
    /// built in a hidden directory beside (`.NAME.new`, a name no share can
    /// have) and renamed into place; on any error (a full disk) nothing is
    /// left behind. A directory of the share's name without a record, left
    /// by an earlier version's failed creation (only empty `data/` and
    /// `orphans/` and a `share.json.tmp`), is cleared first.
    pub fn create(&self, rec: &ShareRecord) -> Result<(), ShareError> {
        let name = check_name(&rec.name)?;
        if rec.mode != "sync" && rec.mode != "async" {
            return Err(ShareError::BadMode(rec.mode.clone()));
        }
        if !rec.path.is_absolute() {
            return Err(ShareError::RelativePath(rec.path.clone()));
        }
        self.prepare()?;
        let dir = self.dir(&name);
        if dir.join("share.json").exists() {
            return Err(ShareError::Exists(rec.name.to_string()));
        }
        if dir.exists() {
            if !failed_creation(&dir) {
                return Err(io_err(
                    "a directory without a share record is in the way",
                    &dir,
                )(std::io::Error::from_raw_os_error(
                    libc::EEXIST,
                )));
            }
            std::fs::remove_dir_all(&dir).map_err(io_err("cannot remove", &dir))?;
        }
        let tmp = self.root.join(format!(".{}.new", rec.name));
        // A creation interrupted before (a crash) left it.
        let _ = std::fs::remove_dir_all(&tmp);
        let built = (|| -> Result<(), ShareError> {
            std::fs::create_dir(&tmp).map_err(io_err("cannot create", &tmp))?;
            for sub in ["data", "orphans"] {
                let d = tmp.join(sub);
                std::fs::create_dir(&d).map_err(io_err("cannot create", &d))?;
            }
            write_durably(&tmp.join("share.json"), rec)?;
            std::fs::rename(&tmp, &dir).map_err(io_err("cannot rename", &dir))?;
            std::fs::File::open(&self.root)
                .and_then(|d| d.sync_all())
                .map_err(io_err("cannot sync", &self.root))
        })();
        if built.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        built
    }

    pub fn data_dir(&self, name: &Name) -> PathBuf {
        self.dir(name).join("data")
    }

    pub fn orphans_dir(&self, name: &Name) -> PathBuf {
        self.dir(name).join("orphans")
    }

    pub fn journal_path(&self, name: &Name) -> PathBuf {
        self.dir(name).join("journal")
    }
}

impl crate::store::Record for ShareRecord {
    const KIND: &'static str = "share";
}

/// Writes `rec` to `p` durably: a temp file beside it (removed again if
/// the write fails, e.g. on a full disk), fsync, rename, fsync of the
/// directory.
fn write_durably(p: &Path, rec: &ShareRecord) -> Result<(), ShareError> {
    let dir = p.parent().unwrap_or(Path::new("."));
    let tmp = p.with_extension("json.tmp");
    let body = crate::store::encode(rec)
        .map_err(|e| io_err("cannot encode", p)(std::io::Error::other(e)))?;
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&body).and_then(|_| f.sync_all()))
        .map_err(io_err("cannot write", &tmp))
        .and_then(|_| std::fs::rename(&tmp, p).map_err(io_err("cannot rename", p)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync", dir))
}

/// `dir` holds only what a share creation that failed before this version
/// left: empty `data/` and `orphans/`, and `share.json.tmp`.
fn failed_creation(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().all(|e| {
        let name = e.file_name();
        match name.to_str() {
            Some("data") | Some("orphans") => std::fs::read_dir(e.path())
                .map(|mut d| d.next().is_none())
                .unwrap_or(false),
            Some("share.json.tmp") => true,
            _ => false,
        }
    })
}

/// Makes directory `dir` with mode 0700 (its parents as usual), or sets an
/// existing one's mode to 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::metadata(dir)?;
    if !m.is_dir() {
        return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    if m.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A fresh random id (hex) or generation.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShareStore::new(dir.path());
        let rec = ShareRecord {
            name: Name::parse("app").unwrap(),
            id: "x".into(),
            mode: "sync".into(),
            path: "/srv/app".into(),
            role: "primary".into(),
            peer: None,
            generation: 7,
            clean: true,
            level_at: 0,
            received_at: 0,
            suspect_since: None,
            level_exact: false,
            bind_data: false,
        };
        store.create(&rec).unwrap();
        assert_eq!(store.load("app").unwrap(), rec);
        assert!(matches!(store.create(&rec), Err(ShareError::Exists(_))));
        assert_eq!(store.list(), vec!["app".to_string()]);
        for bad in ["", ".x", "a/b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let mut r2 = rec.clone();
        r2.name = Name::parse("b").unwrap();
        r2.mode = "fast".into();
        assert!(matches!(store.create(&r2), Err(ShareError::BadMode(_))));
        r2.mode = "sync".into();
        r2.path = "rel".into();
        assert!(matches!(
            store.create(&r2),
            Err(ShareError::RelativePath(_))
        ));
        std::fs::write(
            store.dir(&Name::parse("app").unwrap()).join("share.json"),
            b"{",
        )
        .unwrap();
        assert!(matches!(store.load("app"), Err(ShareError::Damaged { .. })));
    }
}

/// What a replica share shows in status (set by its inbound link).
#[derive(Debug, Clone, Default)]
pub struct ReplicaView {
    pub up_to_date: bool,
    pub last_error: Option<String>,
    pub applied_bytes: u64,
    pub linked: bool,
}

/// A primary share running on this node.
#[derive(Debug)]
pub struct Running {
    pub share: std::sync::Arc<primary::PrimaryShare>,
    pub mount: Option<fuse::Mount>,
    pub watcher: Option<watch::Watcher>,
    /// An async share served from `data/`: its bind mount at the path.
    pub bind: Option<BindMount>,
}

/// `data/` bind-mounted at a share's path (an async share promoted here),
/// `nosuid,nodev`; detached when dropped (lazily: a process with a file
/// open there keeps it, but no new path lookup reaches `data/`).
#[derive(Debug)]
pub struct BindMount {
    pub path: PathBuf,
}

impl BindMount {
    /// Bind-mounts `data` at `path` (made if missing). A bind of `data` left
    /// there by an earlier run that did not stop cleanly is detached first.
    pub fn mount(data: &Path, path: &Path) -> std::io::Result<BindMount> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        std::fs::create_dir_all(path)?;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let cdata = std::ffi::CString::new(data.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let same = || -> bool {
            match (std::fs::metadata(data), std::fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            }
        };
        for _ in 0..16 {
            if !same() {
                break;
            }
            // SAFETY: NUL-terminated path; a failure ends the loop below.
            if unsafe { libc::umount2(cpath.as_ptr(), libc::MNT_DETACH) } < 0 {
                break;
            }
        }
        let flags = libc::MS_BIND;
        // SAFETY: NUL-terminated paths; no filesystem type or data for a bind.
        let r = unsafe {
            libc::mount(
                cdata.as_ptr(),
                cpath.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let m = BindMount {
            path: path.to_path_buf(),
        };
        // A bind takes its flags from a remount.
        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
        // SAFETY: NUL-terminated path; remounting the bind made above.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                cpath.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if r < 0 {
            // `m` is dropped: the bind goes.
            return Err(std::io::Error::last_os_error());
        }
        Ok(m)
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        if let Ok(c) = std::ffi::CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } < 0 {
                tracing::warn!(path = %self.path.display(), error = %std::io::Error::last_os_error(),
                    "share.bind.unmount_failed");
            }
        }
    }
}

impl Running {
    /// Stops serving: the gate closes (calls waiting at a frozen gate fail,
    /// so the unmount cannot hang on them), the link ends, the watcher and
    /// the mount go, the journal is closed cleanly.
    fn stop(self, why: &str) {
        self.share.close_gate();
        self.share.stop_link(why);
        drop(self.watcher);
        drop(self.mount);
        drop(self.bind);
        self.share.close_clean();
    }
}

/// What the share engine needs from the node it runs in (the agent
/// implements it): its name and data directory, its settings, the shares
/// running here, a way to dial peers and to ask a peer's API.
pub trait Host: Send + Sync + 'static {
    fn node_name(&self) -> &str;
    fn data_dir(&self) -> &std::path::Path;
    fn share_settings(&self) -> &settings::ShareSettings;
    /// The link limits shares share with volumes (`[replication]`).
    fn link_settings(&self) -> &crate::transport::settings::ReplicationSettings;
    fn shares(&self) -> &Shares;
    fn dialer(&self) -> crate::transport::dial::Dialer;
    /// GET `path` from paired node `peer`'s API, as this node.
    fn peer_get(
        &self,
        peer: &str,
        path: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<serde_json::Value>;
}

impl<T: Host + ?Sized> Host for std::sync::Arc<T> {
    crate::sys::forward_to_arc! {
        node_name(&self) -> &str;
        data_dir(&self) -> &std::path::Path;
        share_settings(&self) -> &settings::ShareSettings;
        link_settings(&self) -> &crate::transport::settings::ReplicationSettings;
        shares(&self) -> &Shares;
        dialer(&self) -> crate::transport::dial::Dialer;
        peer_get(&self, peer: &str, path: &str, timeout: std::time::Duration) -> anyhow::Result<serde_json::Value>;
    }
}

/// The shares of this agent.
#[derive(Debug, Default)]
pub struct Shares {
    primaries: std::sync::Mutex<std::collections::HashMap<String, Running>>,
    replicas: std::sync::Mutex<std::collections::HashMap<String, ReplicaView>>,
    /// Each linked replica's inbox (received, not yet applied).
    inboxes: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<inbox::Inbox>>>,
    /// Each share's digest cache, whatever its role (it survives a role
    /// change: the cache checks every file's stamps).
    digests: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tree::DigestCache>>>,
}

/// Held while an inbound link applies to a replica share.
#[derive(Debug)]
pub struct ReplicaClaim<'a> {
    shares: &'a Shares,
    name: String,
}

impl Drop for ReplicaClaim<'_> {
    fn drop(&mut self) {
        if let Some(v) = self.shares.replicas().get_mut(&self.name) {
            v.linked = false;
        }
    }
}

impl Shares {
    fn replicas(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, ReplicaView>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn primaries(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Running>> {
        self.primaries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The digest cache of share `name` (made on first use; the caller
    /// sets its settling time, which follows the share's role).
    pub fn digest_cache(&self, name: &str, files_max: usize) -> std::sync::Arc<tree::DigestCache> {
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| {
                std::sync::Arc::new(tree::DigestCache::new(files_max, tree::DIGEST_SETTLED_MS))
            })
            .clone()
    }

    pub fn primary(&self, name: &str) -> Option<std::sync::Arc<primary::PrimaryShare>> {
        self.primaries().get(name).map(|r| r.share.clone())
    }

    /// One inbound link per replica share; none for a share primary here.
    pub fn claim_replica(&self, name: &str) -> Option<ReplicaClaim<'_>> {
        if self.primaries().contains_key(name) {
            return None;
        }
        let mut r = self.replicas();
        let v = r.entry(name.to_string()).or_default();
        if v.linked {
            return None;
        }
        v.linked = true;
        Some(ReplicaClaim {
            shares: self,
            name: name.to_string(),
        })
    }

    /// Registers the inbox of `name`'s inbound link (replacing an old one).
    pub fn set_inbox(&self, name: &str, inbox: Option<std::sync::Arc<inbox::Inbox>>) {
        let mut m = self.inboxes.lock().unwrap_or_else(|p| p.into_inner());
        match inbox {
            Some(i) => {
                m.insert(name.to_string(), i);
            }
            None => {
                m.remove(name);
            }
        }
    }

    /// Before `name` is promoted here: its inbound link takes nothing more,
    /// and what it received is applied (at most `wait`). `false` when
    /// something was still being applied after `wait`.
    pub fn drain_replica(&self, name: &str, wait: std::time::Duration) -> bool {
        let inbox = self
            .inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        match inbox {
            Some(i) => {
                i.close("the share was promoted here: the old primary's stream ends");
                i.wait_drained(wait)
            }
            None => true,
        }
    }

    pub fn set_replica_state(&self, name: &str, up_to_date: bool, error: Option<String>) {
        let mut r = self.replicas();
        let v = r.entry(name.to_string()).or_default();
        v.up_to_date = up_to_date;
        if error.is_some() || up_to_date {
            v.last_error = error;
        }
    }

    pub fn add_applied(&self, name: &str, bytes: u64) {
        if let Some(v) = self.replicas().get_mut(name) {
            v.applied_bytes += bytes;
        }
    }

    pub fn replica_view(&self, name: &str) -> ReplicaView {
        self.replicas().get(name).cloned().unwrap_or_default()
    }

    /// Stops every primary share: links down, mounts gone, journals closed cleanly.
    pub fn shutdown(&self) {
        let all: Vec<Running> = self.primaries().drain().map(|(_, r)| r).collect();
        for r in all {
            r.stop("agent stopping");
        }
    }
}

/// Starts a primary share on this agent: opens it, mounts it (sync mode) and
/// starts its link when it has a peer.
pub fn start_primary<H: Host + ?Sized>(
    ctx: &std::sync::Arc<H>,
    rec: ShareRecord,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let store = ShareStore::new(ctx.data_dir());
    let share = primary::PrimaryShare::open(
        store,
        rec.clone(),
        ctx.link_settings().backlog_bytes_max,
        ctx.share_settings().replica_free_bytes_min,
    )
    .with_context(|| format!("cannot open share {:?}", rec.name))?;
    let (mount, watcher) = if rec.mode == "sync" {
        let passthrough = ctx.share_settings().passthrough_read_only_files;
        let m = fuse::mount(share.clone(), &rec.path, passthrough).with_context(|| {
            format!(
                "cannot mount share {:?} at {}",
                rec.name,
                rec.path.display()
            )
        })?;
        (Some(m), None)
    } else {
        let w = watch::start(share.clone(), *ctx.share_settings())
            .with_context(|| format!("cannot watch {}", rec.path.display()))?;
        (None, Some(w))
    };
    let bind = if rec.mode == "async" && rec.bind_data {
        let data = ShareStore::new(ctx.data_dir()).data_dir(&rec.name);
        let b = BindMount::mount(&data, &rec.path).with_context(|| {
            format!(
                "cannot bind-mount share {:?} at {}",
                rec.name,
                rec.path.display()
            )
        })?;
        Some(b)
    } else {
        None
    };
    // A share this replaces is stopped (unmounted) after the map's lock is
    // released: the HA heartbeat thread looks shares up in it.
    let _replaced = ctx.shares().primaries().insert(
        rec.name.to_string(),
        Running {
            share: share.clone(),
            mount,
            watcher,
            bind,
        },
    );
    if let Some(peer) = rec.peer.clone() {
        spawn_link(ctx, share, peer)?;
    }
    tracing::info!(share = %rec.name, mode = %rec.mode, path = %rec.path.display(), "share.started");
    Ok(())
}

/// Failover or switchover: this node's replica of `name` becomes the
/// primary — served at its path (a sync share: the FUSE mount; an async
/// one: its copy in place), replicating back to `reverse_to`. Refused for a
/// copy that is not up to date unless `force`.
pub fn promote<H: Host + ?Sized>(
    ctx: &std::sync::Arc<H>,
    name: &str,
    reverse_to: Option<&str>,
    force: bool,
) -> anyhow::Result<()> {
    match promote_record(ctx, name, reverse_to, force, false)? {
        Some(rec) => start_primary(ctx, rec),
        None => Ok(()),
    }
}

/// Refuses a replica here that may not be promoted: not an up-to-date copy
/// (unless `force`).
pub fn check_promotable<S: Host + ?Sized>(
    ctx: &S,
    name: &str,
    force: bool,
) -> anyhow::Result<ShareRecord> {
    let rec = ShareStore::new(ctx.data_dir()).load(name)?;
    if rec.role != "primary" && rec.generation == 0 && !force {
        anyhow::bail!(
            "share {name:?} on node {} is not an up-to-date replica: refusing to promote it \
             (a forced promotion takes it as it is)",
            ctx.node_name()
        );
    }
    Ok(rec)
}

/// [`promote`]'s durable part: the record says primary (a new generation).
/// `None` when it already did. The caller starts it ([`start_primary`]), or
/// the agent does when it is starting up. `clean`: a verified cutover (the
/// old primary's copy is exactly this one; see `level_exact`).
pub fn promote_record<S: Host + ?Sized>(
    ctx: &S,
    name: &str,
    reverse_to: Option<&str>,
    force: bool,
    clean: bool,
) -> anyhow::Result<Option<ShareRecord>> {
    let store = ShareStore::new(ctx.data_dir());
    if check_promotable(ctx, name, force)?.role == "primary" {
        return Ok(None);
    }
    // A replica applies everything it received before it may be promoted
    // (an apply that fails marks it not up to date: checked again below).
    let wait = std::time::Duration::from_millis(ctx.share_settings().promote_apply_wait_ms);
    if !ctx.shares().drain_replica(name, wait) {
        anyhow::bail!(
            "share {name:?} on node {} is still applying what it received after {} ms \
             (shares.promote_apply_wait_ms): refusing to promote it",
            ctx.node_name(),
            wait.as_millis()
        );
    }
    let mut rec = check_promotable(ctx, name, force)?;
    if rec.role == "primary" {
        return Ok(None);
    }
    rec.role = "primary".into();
    rec.peer = reverse_to.map(String::from);
    // A new history: the old primary's copy is compared whole when it returns.
    rec.generation = random_u64();
    rec.clean = true;
    rec.level_at = primary::now_unix();
    rec.received_at = rec.level_at;
    rec.suspect_since = None;
    rec.level_exact = clean;
    // An async replica's copy is data/ (under the root-only data dir): it
    // is served there and bind-mounted at the share's path.
    rec.bind_data = rec.mode == "async";
    store.save(&rec)?;
    tracing::warn!(share = %name, reverse_to = ?reverse_to, force, "share.promoted");
    Ok(Some(rec))
}

/// A newer primary exists elsewhere: stop serving `name` here and become
/// its replica. Files this copy changed since it was last known level are
/// compared by content when the new primary resyncs it — unless the handover
/// was `clean` (frozen, drained and the two trees' digests compared equal),
/// when nothing here can differ.
pub fn demote<H: Host + ?Sized>(
    ctx: &std::sync::Arc<H>,
    name: &str,
    new_primary: &str,
    clean: bool,
) -> anyhow::Result<()> {
    let store = ShareStore::new(ctx.data_dir());
    let running = ctx.shares().primaries().remove(name);
    if let Some(r) = running {
        r.stop("demoted: another node is primary");
    }
    let mut rec = store.load(name)?;
    if rec.role == "replica" {
        return Ok(());
    }
    if !clean {
        // What this copy acknowledged that the new primary never received
        // goes aside before anything can overwrite it (DESIGN invariant 7).
        if let Some(kept) = keep_diverged(&store, &rec)? {
            tracing::warn!(share = %name, copy = %kept.display(), "share.split_brain.kept: files changed here that the new primary never received are kept until drop-copy");
        }
    }
    rec.role = "replica".into();
    rec.peer = Some(new_primary.to_string());
    rec.generation = 0;
    // What the new primary may lack: changes made here after the replica
    // last confirmed receiving everything.
    rec.suspect_since = (!clean).then(|| rec.level_at.max(rec.received_at) - 2);
    store.save(&rec)?;
    tracing::warn!(share = %name, new_primary, clean, "share.demoted");
    Ok(())
}

/// Where the diverged files of share `name` are kept (see [`keep_diverged`]).
pub fn copy_dir(data_dir: &Path, name: &Name) -> PathBuf {
    ShareStore::new(data_dir).dir(name).join("split-brain-copy")
}

/// The kept copy of share `name`'s diverged files on this node, if any
/// (for `cluster status`'s `copies`).
pub fn kept_copy(data_dir: &Path, name: &str) -> Option<PathBuf> {
    let name = check_name(name).ok()?;
    Some(copy_dir(data_dir, &name)).filter(|p| p.exists())
}

/// Deletes the kept copy of share `name` (`cluster drop-copy`): its path
/// when there was one.
pub fn drop_copy(data_dir: &Path, name: &str) -> Result<Option<PathBuf>, ShareError> {
    let p = copy_dir(data_dir, &check_name(name)?);
    match std::fs::remove_dir_all(&p) {
        Ok(()) => Ok(Some(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot delete", &p)(e)),
    }
}

/// A primary share that lost its role without a verified handover (a
/// failover, a split brain): the subtrees its journal says changed here
/// without the replica being told — writes acknowledged while alone, an
/// async share's unsent changes — are copied to `split-brain-copy/` under
/// their paths (files with their mode, owner and mtime; symlinks; not
/// special files) before the new primary's resync overwrites or removes
/// them. Built in `split-brain-copy.tmp` and renamed, so the copy is whole
/// or absent. Refused while an earlier copy is kept (`drop-copy` it). `None`
/// when nothing diverged.
pub fn keep_diverged(store: &ShareStore, rec: &ShareRecord) -> Result<Option<PathBuf>, ShareError> {
    use std::os::unix::ffi::OsStrExt;
    let paths = primary::untold_paths(&store.journal_path(&rec.name));
    if paths.is_empty() {
        return Ok(None);
    }
    let dir = store.dir(&rec.name);
    let copy = dir.join("split-brain-copy");
    if copy.exists() {
        return Err(io_err(
            "an earlier split-brain copy is kept here: `ferry cluster drop-copy` it first",
            &copy,
        )(std::io::Error::from_raw_os_error(libc::EEXIST)));
    }
    let root = if rec.mode == "sync" || rec.bind_data {
        store.data_dir(&rec.name)
    } else {
        rec.path.clone()
    };
    let tree = tree::Tree::open(&root, &store.orphans_dir(&rec.name))
        .map_err(io_err("cannot open", &root))?;
    let tmp = dir.join("split-brain-copy.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    private_dir(&tmp).map_err(io_err("cannot create", &tmp))?;
    let copied = (|| -> std::io::Result<u64> {
        let mut files = 0u64;
        for sub in &paths {
            let entries = match tree.manifest(sub) {
                Ok(e) => e,
                // Gone since (removed here later): nothing to keep.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let to = tmp.join(std::ffi::OsStr::from_bytes(e.path.as_bytes()));
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let target = ferry_wire::Target::Path(e.path.clone());
                match &e.kind {
                    ferry_wire::EntryKind::Dir => {
                        std::fs::create_dir_all(&to)?;
                    }
                    ferry_wire::EntryKind::Symlink { target } => {
                        let _ = std::fs::remove_file(&to);
                        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &to)?;
                        continue;
                    }
                    ferry_wire::EntryKind::File { .. } => {
                        let mut from = tree.open_file(&target, libc::O_RDONLY, 0)?;
                        let mut out = std::fs::File::create(&to)?;
                        std::io::copy(&mut from, &mut out)?;
                        out.sync_all()?;
                        files += 1;
                    }
                    ferry_wire::EntryKind::Special { .. } => continue,
                }
                std::os::unix::fs::lchown(&to, Some(e.uid), Some(e.gid))?;
                std::fs::set_permissions(
                    &to,
                    std::os::unix::fs::PermissionsExt::from_mode(e.mode & 0o7777),
                )?;
                let mtime = std::time::UNIX_EPOCH
                    + std::time::Duration::new(e.mtime.secs.max(0) as u64, e.mtime.nanos);
                std::fs::File::open(&to)?.set_modified(mtime)?;
            }
        }
        Ok(files)
    })();
    let files = match copied {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io_err("cannot keep the diverged files in", &tmp)(e));
        }
    };
    let renamed = std::fs::rename(&tmp, &copy).and_then(|_| std::fs::File::open(&dir)?.sync_all());
    if let Err(e) = renamed {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io_err("cannot rename", &copy)(e));
    }
    tracing::warn!(share = %rec.name, paths = paths.len(), files, "share.diverged.kept");
    Ok(Some(copy))
}

/// Starts replicating primary share `name` to `to` (a migration). `false`
/// when it already does; refused when it replicates to another node (a
/// share has one peer).
pub fn replicate_to<H: Host + ?Sized>(
    ctx: &std::sync::Arc<H>,
    name: &str,
    to: &str,
) -> anyhow::Result<bool> {
    let share = primary_here(ctx, name)?;
    let peer = share
        .rec
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .peer
        .clone();
    match peer.as_deref() {
        // Replicating there already (a link runs: it retries forever).
        Some(p) if p == to && share.link().threads > 0 => return Ok(false),
        Some(p) if p != to => anyhow::bail!(
            "share {name:?} replicates to {p}; a share has one peer, so it cannot also go to {to}"
        ),
        _ => {}
    }
    // A link stopped earlier may still be winding down: it must be gone
    // before a new one may run (both would stream the share).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        {
            let mut l = share.link();
            if l.threads == 0 {
                l.stop = false;
                break;
            }
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the earlier link of share {name:?} did not stop within 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    spawn_link(ctx, share.clone(), to.to_string())?;
    // Recorded once its link runs (a failure above leaves no peer behind).
    let saved = {
        let mut rec = share.rec.lock().unwrap_or_else(|p| p.into_inner());
        rec.peer = Some(to.to_string());
        share.store.save(&rec)
    };
    if let Err(e) = saved {
        share.stop_link("its record could not be saved");
        return Err(e.into());
    }
    tracing::info!(share = %name, peer = %to, "share.replication.started");
    Ok(true)
}

/// Share `name` served here as primary.
pub fn primary_here<S: Host + ?Sized>(
    ctx: &S,
    name: &str,
) -> anyhow::Result<std::sync::Arc<primary::PrimaryShare>> {
    ctx.shares().primary(name).ok_or_else(|| {
        anyhow::anyhow!(
            "share {name:?} is not a primary on node {}",
            ctx.node_name()
        )
    })
}

/// Stops replicating primary share `name` (a finalized migration): the link
/// ends and the record forgets its peer; the peer's copy stays as it is.
pub fn stop_replicating<S: Host + ?Sized>(ctx: &S, name: &str) -> anyhow::Result<()> {
    let share = primary_here(ctx, name)?;
    {
        let mut rec = share.rec.lock().unwrap_or_else(|p| p.into_inner());
        rec.peer = None;
        share.store.save(&rec)?;
    }
    share.stop_link("replication stopped");
    tracing::info!(share = %name, "share.replication.stopped");
    Ok(())
}

/// The digest of this node's copy of `name` (see [`tree::Tree::digest`]):
/// `{"digest", "files", "bytes"}` (`bytes`: what had to be read).
pub fn digest<S: Host + ?Sized>(ctx: &S, name: &str) -> anyhow::Result<serde_json::Value> {
    let cache = digest_cache(ctx, name)?;
    let (h, files, bytes) = with_copy(ctx, name, |t| t.digest(&cache))??;
    Ok(
        serde_json::json!({"share": name, "digest": h.to_hex().as_str(), "files": files, "bytes": bytes}),
    )
}

/// Runs `f` on this node's copy of `name`: the primary's tree, or the
/// replica's `data/`.
fn with_copy<R, S: Host + ?Sized>(
    ctx: &S,
    name: &str,
    f: impl FnOnce(&tree::Tree) -> R,
) -> anyhow::Result<R> {
    Ok(match ctx.shares().primary(name) {
        Some(p) => f(&p.tree),
        None => {
            let store = ShareStore::new(ctx.data_dir());
            let rec = store.load(name)?;
            f(&tree::Tree::open(
                &store.data_dir(&rec.name),
                &store.orphans_dir(&rec.name),
            )?)
        }
    })
}

/// The digest cache of `name`. The primary of an async share is used in
/// place: an application's writes through a shared mapping move the ctime
/// only when a clean page is first written, so its files count as settled
/// only after the kernel has written dirty pages back (30 s by default),
/// not 2 s. Elsewhere only ferry writes the tree, with write calls.
pub(crate) fn digest_cache<S: Host + ?Sized>(
    ctx: &S,
    name: &str,
) -> anyhow::Result<std::sync::Arc<tree::DigestCache>> {
    let rec = ShareStore::new(ctx.data_dir()).load(name)?;
    let settled_ms = if rec.mode == "async" && ctx.shares().primary(name).is_some() {
        tree::DIGEST_SETTLED_ASYNC_MS
    } else {
        tree::DIGEST_SETTLED_MS
    };
    let cache = ctx
        .shares()
        .digest_cache(name, ctx.share_settings().digest_cache_files_max);
    cache.set_settled_ms(settled_ms);
    Ok(cache)
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// This node's copy of `name`, entry by entry, every file read whole (an
/// audit, for [`verify`]): `{"entries": [{"p": path, "r": manifest record,
/// "h": content hash or null, "c": ctime ns}]}`, bytes as hex.
pub fn files<S: Host + ?Sized>(ctx: &S, name: &str) -> anyhow::Result<serde_json::Value> {
    let audit = tree::DigestCache::new(0, 0);
    let (list, _) = with_copy(ctx, name, |t| t.listing(&audit))??;
    let entries: Vec<serde_json::Value> = list
        .iter()
        .map(|l| {
            serde_json::json!({
                "p": hex(l.entry.path.as_bytes()),
                "r": hex(&ferry_wire::encode_manifest(std::slice::from_ref(&l.entry))),
                "h": l.hash.map(|h| hex(&h)),
                "c": l.ctime_ns.to_string(),
            })
        })
        .collect();
    Ok(serde_json::json!({"share": name, "entries": entries}))
}

/// Differences listed by `share verify`, at most.
const VERIFY_DIFFERENCES_SHOWN: usize = 100;

/// `ferry share verify`: once the replica is level (up to date, nothing
/// pending, a flush durable there), compares both trees entry by entry and
/// every file by content, read whole on both nodes (so it also sees changes
/// made behind ferry's back). The application may keep writing: entries
/// that changed here after the verify began are counted apart
/// (`changed_during_verify`), not reported as differences.
pub fn verify<H: Host + ?Sized>(
    ctx: &std::sync::Arc<H>,
    name: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<serde_json::Value> {
    let share = primary_here(ctx, name)?;
    use anyhow::{anyhow, bail};
    let started = std::time::Instant::now();
    let started_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let peer_name = share
        .rec
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .peer
        .clone()
        .ok_or_else(|| anyhow!("share {name:?} is not replicated"))?;
    // Level: up to date, nothing waiting, and a flush durable on the peer.
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            bail!(
                "the replica of {name} on {peer_name} was not level within {} s (state: {})",
                timeout.as_secs(),
                status(ctx, name, false)
                    .map(|s| s.state)
                    .unwrap_or_default()
            );
        }
        if share.link().up_to_date && share.caught_up() {
            let seq = {
                let mut o = share.order();
                share.push_flush(&mut o, false)
            };
            share.send_queued();
            if let Some(seq) = seq {
                let (tx, rx) = std::sync::mpsc::channel();
                share.wait_durable(
                    Some(seq),
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                );
                if matches!(rx.recv_timeout(left), Ok(Ok(()))) {
                    break;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Both copies are read whole: as long as the verify may take.
    let (local, remote) = std::thread::scope(|sc| {
        let remote =
            sc.spawn(|| ctx.peer_get(&peer_name, &format!("/api/v1/shares/{name}/files"), timeout));
        let local = files(ctx, name);
        (
            local,
            remote
                .join()
                .unwrap_or_else(|_| Err(anyhow!("listing fetch panicked"))),
        )
    });
    let (local, remote) = (local?, remote?);
    let index =
        |v: &serde_json::Value| -> std::collections::BTreeMap<String, (String, String, i128)> {
            v["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        e["p"].as_str().unwrap_or_default().to_string(),
                        (
                            e["r"].as_str().unwrap_or_default().to_string(),
                            e["h"].as_str().unwrap_or_default().to_string(),
                            e["c"].as_str().and_then(|c| c.parse().ok()).unwrap_or(0),
                        ),
                    )
                })
                .collect()
        };
    let (mine, theirs) = (index(&local), index(&remote));
    // Paths come hex-encoded (any bytes); a peer's malformed pair is dropped.
    let unhex = |p: &str| -> Vec<u8> {
        p.as_bytes()
            .chunks(2)
            .filter_map(|c| std::str::from_utf8(c).ok())
            .filter_map(|c| u8::from_str_radix(c, 16).ok())
            .collect()
    };
    let show = |p: &str| String::from_utf8_lossy(&unhex(p)).into_owned();
    // Removing an entry changes its directory's ctime: an entry only the
    // replica has, whose directory here changed during the verify, was
    // probably removed meanwhile.
    let parent_changed = |p: &str| {
        let bytes = unhex(p);
        let parent = match bytes.iter().rposition(|&b| b == b'/') {
            Some(i) => hex(&bytes[..i]),
            None => hex(ferry_wire::SharePath::root().as_bytes()),
        };
        mine.get(&parent).is_some_and(|m| m.2 >= started_ns)
    };
    let (mut differing, mut in_flux, mut count) = (Vec::new(), 0u64, 0u64);
    let mut files_n = 0u64;
    for (p, m) in &mine {
        if !m.1.is_empty() {
            files_n += 1;
        }
        let why = match theirs.get(p) {
            None => Some("missing on the replica"),
            Some(t) if t.0 != m.0 => {
                Some("entry differs (type, size, mode, owner, mtime or links)")
            }
            Some(t) if t.1 != m.1 => Some("content differs"),
            Some(_) => None,
        };
        if let Some(why) = why {
            if m.2 >= started_ns {
                in_flux += 1;
            } else {
                count += 1;
                if differing.len() < VERIFY_DIFFERENCES_SHOWN {
                    differing.push(serde_json::json!({"path": show(p), "why": why}));
                }
            }
        }
    }
    for p in theirs.keys().filter(|p| !mine.contains_key(*p)) {
        if parent_changed(p) {
            in_flux += 1;
            continue;
        }
        count += 1;
        if differing.len() < VERIFY_DIFFERENCES_SHOWN {
            differing.push(serde_json::json!({"path": show(p), "why": "only on the replica"}));
        }
    }
    let equal = count == 0;
    tracing::info!(share = name, peer = %peer_name, equal, differing = count, in_flux, "share.verify");
    Ok(serde_json::json!({
        "share": name,
        "peer": peer_name,
        "equal": equal,
        "entries": mine.len(),
        "files": files_n,
        "differing_count": count,
        "differing": differing,
        "changed_during_verify": in_flux,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }))
}

/// Fencing: mutating calls on the share wait (`freeze`) or flow again.
pub fn set_frozen<S: Host + ?Sized>(ctx: &S, name: &str, frozen: bool) {
    if let Some(p) = ctx.shares().primary(name) {
        if frozen {
            p.freeze();
        } else {
            p.unfreeze();
        }
    }
}

/// This node's copy is usable as the workload's data: primary here, or an
/// up-to-date replica.
pub fn usable_here<S: Host + ?Sized>(ctx: &S, name: &str) -> bool {
    if ctx.shares().primary(name).is_some() {
        return true;
    }
    ShareStore::new(ctx.data_dir())
        .load(name)
        .is_ok_and(|r| r.role == "replica" && r.generation != 0)
}

pub fn spawn_link<H: Host + ?Sized>(
    ctx: &std::sync::Arc<H>,
    share: std::sync::Arc<primary::PrimaryShare>,
    peer: String,
) -> anyhow::Result<()> {
    /// Counts a link thread until it ends, however it ends.
    struct LinkThread(std::sync::Arc<primary::PrimaryShare>);
    impl Drop for LinkThread {
        fn drop(&mut self) {
            self.0.link().threads -= 1;
        }
    }
    let ctx = ctx.clone();
    share.link().threads += 1;
    let counted = LinkThread(share.clone());
    let name = format!("share-link-{}", share.name);
    std::thread::Builder::new().name(name).spawn(move || {
        let _counted = counted;
        link::run(share, ctx, peer);
    })?;
    Ok(())
}

/// Status of one share (JSON: see docs/status.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareStatus {
    pub name: String,
    pub mode: String,
    pub role: String,
    /// Primary and served here now (mounted or watched).
    pub serving: bool,
    pub path: PathBuf,
    pub peer: Option<String>,
    /// Replica state as the primary sees it, or this replica's own:
    /// `up-to-date`, `resyncing`, `disconnected`.
    pub state: String,
    pub files: u64,
    pub bytes: u64,
    /// Primary: paths changed while the replica could not be told.
    pub pending_paths: u64,
    pub ops_sent: u64,
    pub bytes_sent: u64,
    pub resync_files: u64,
    pub resync_bytes: u64,
    /// Bytes of changed files found on the replica already (deltas).
    pub delta_reused_bytes: u64,
    /// Files the primary could not read (skipped; see last_error).
    pub unreadable_files: u64,
    /// Sync shares are crash-consistent (the replica follows the order of
    /// operations); async shares are not (file by file, with a lag).
    pub crash_consistent: bool,
    /// Async: how long the oldest change not yet on the replica has waited
    /// (0 when none), and the change-to-replica time of recent batches.
    pub lag_ms: u64,
    pub lag_p50_ms: u64,
    pub lag_p99_ms: u64,
    /// Async watcher: directories watched, directories over the inotify
    /// watch limit (rescanned periodically), kernel queue overflows, rescans.
    pub watched_dirs: u64,
    pub unwatched_dirs: u64,
    pub overflows: u64,
    pub rescans: u64,
    /// Sync mount: read-only opens served by kernel passthrough (reads go
    /// straight to the backing file), and bytes of reads served by ferry.
    pub passthrough_opens: u64,
    pub fuse_read_bytes: u64,
    pub last_error: Option<String>,
}

/// `counts`: walk the tree for `files` and `bytes` (0 otherwise: pollers
/// such as `share wait` need only the state).
pub fn status<S: Host + ?Sized>(
    ctx: &S,
    name: &str,
    counts: bool,
) -> Result<ShareStatus, ShareError> {
    use std::sync::atomic::Ordering::Relaxed;
    let store = ShareStore::new(ctx.data_dir());
    let rec = store.load(name)?;
    let (mut files, mut bytes) = (0u64, 0u64);
    if counts {
        // An async primary is used in place; everything else lives in data/.
        let root = if rec.role == "primary" && rec.mode == "async" && !rec.bind_data {
            rec.path.clone()
        } else {
            store.data_dir(&rec.name)
        };
        for e in walkdir_count(&root) {
            files += 1;
            bytes += e;
        }
    }
    let mut st = ShareStatus {
        name: rec.name.to_string(),
        mode: rec.mode.clone(),
        role: rec.role.clone(),
        serving: ctx.shares().primary(name).is_some(),
        path: rec.path.clone(),
        peer: rec.peer.clone(),
        state: "disconnected".into(),
        files,
        bytes,
        pending_paths: 0,
        ops_sent: 0,
        bytes_sent: 0,
        resync_files: 0,
        resync_bytes: 0,
        delta_reused_bytes: 0,
        unreadable_files: 0,
        crash_consistent: rec.mode == "sync",
        lag_ms: 0,
        lag_p50_ms: 0,
        lag_p99_ms: 0,
        watched_dirs: 0,
        unwatched_dirs: 0,
        overflows: 0,
        rescans: 0,
        passthrough_opens: 0,
        fuse_read_bytes: 0,
        last_error: None,
    };
    if let Some(p) = ctx.shares().primary(name) {
        st.pending_paths = p.pending_paths();
        let behind = !p.caught_up();
        let l = p.link();
        st.state = if l.up_to_date && behind {
            "catching-up"
        } else if l.up_to_date {
            "up-to-date"
        } else if l.connected {
            "resyncing"
        } else {
            "disconnected"
        }
        .into();
        st.last_error = l.last_error.clone();
        st.lag_ms = l
            .pending_since
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0);
        let mut lags: Vec<u64> = l.lags_ms.iter().copied().collect();
        drop(l);
        lags.sort_unstable();
        let pct = |q: usize| lags.get((lags.len() * q / 100).min(lags.len().saturating_sub(1)));
        st.lag_p50_ms = pct(50).copied().unwrap_or(0);
        st.lag_p99_ms = pct(99).copied().unwrap_or(0);
        st.delta_reused_bytes = p.stats.delta_reused_bytes.load(Relaxed);
        st.unreadable_files = p.stats.unreadable.load(Relaxed);
        st.watched_dirs = p.stats.watched_dirs.load(Relaxed);
        st.unwatched_dirs = p.stats.unwatched_dirs.load(Relaxed);
        st.overflows = p.stats.overflows.load(Relaxed);
        st.rescans = p.stats.rescans.load(Relaxed);
        st.ops_sent = p.stats.ops_sent.load(Relaxed);
        st.bytes_sent = p.stats.bytes_sent.load(Relaxed);
        st.resync_files = p.stats.resync_files.load(Relaxed);
        st.resync_bytes = p.stats.resync_bytes.load(Relaxed);
        st.passthrough_opens = p.stats.passthrough_opens.load(Relaxed);
        st.fuse_read_bytes = p.stats.fuse_read_bytes.load(Relaxed);
    } else {
        let v = ctx.shares().replica_view(name);
        st.state = if rec.generation != 0 || v.up_to_date {
            "up-to-date"
        } else if v.linked {
            "resyncing"
        } else {
            "disconnected"
        }
        .into();
        st.last_error = v.last_error;
        st.bytes_sent = v.applied_bytes;
    }
    Ok(st)
}

/// Sizes of the regular files below `dir` (not following symlinks).
fn walkdir_count(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.metadata().map(|m| m.len()).unwrap_or(0)),
                Ok(_) => out.push(0),
                Err(_) => {}
            }
        }
    }
    out
}
