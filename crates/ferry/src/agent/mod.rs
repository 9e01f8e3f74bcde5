//! `ferry agent`: the long-running node process.
//!
//! It owns this node's volumes: it exports the ones it is primary for over NBD
//! (through the replicating IO filter), accepts replication links for the ones
//! it holds replicas of, runs the REST API the CLI talks to, and serves
//! Prometheus metrics. SIGTERM or SIGINT stops it cleanly: exports close, links
//! drop, dirty maps are saved and every volume is marked cleanly stopped, so a
//! restart resumes without a full resync.

pub mod archives;
pub mod audit;
pub mod dispatch;
pub mod estimates;
mod hosts;
pub mod import;
pub mod nbd_tls;
mod peerwatch;
pub mod probe;
mod sampler;
pub mod stats;
pub mod tokens;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::link::Mode;
use ferry_core::DirtyMap;
use ferry_nbd::{Export, FileDevice, ListenAddr, Listener, Server};

use crate::config::AgentConfig;
use crate::store::damaged;
use crate::transport::{conns, identity, peers, tls};
use crate::volume::meta::{self, MetaFile, MetaState, Role, AL_EXTENT_SHIFT};
use crate::volume::primary::PrimaryVolume;
use crate::volume::replica::{self, ReplicaVolume};
use crate::volume::{VolumeLock, VolumeStore};
use identity::Identity;
use peers::Peers;

/// The commit point of a takeover (`DATA_DIR/commits/WORKLOAD.json`): this
/// node takes these volumes and shares over; an agent that restarts with
/// one finishes the promotions first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CommitRecord {
    pub workload: String,
    pub volumes: Vec<String>,
    /// (Records before shares moved with workloads have none.)
    #[serde(default)]
    pub shares: Vec<String>,
    /// The node replication runs back to once promoted.
    #[serde(default)]
    pub reverse_to: Option<String>,
    /// `sync` or `async`.
    pub mode: String,
}

impl crate::store::Record for CommitRecord {
    const KIND: &'static str = "commit";
}

/// Shared state of a running agent.
pub struct AgentCtx {
    /// What each paired node last answered (version, up).
    pub peer_watch: peerwatch::PeerWatch,
    /// The audit log (`DATA_DIR/audit/`): actions and automatic decisions.
    pub audit: Arc<crate::audit::AuditLog>,
    /// Records found damaged and set aside (served: everything else).
    pub damaged: damaged::Damaged,
    /// Connection caps of the API and replication listeners.
    pub api_conns: Arc<conns::ConnTable>,
    pub repl_conns: Arc<conns::ConnTable>,
    pub cfg: AgentConfig,
    pub identity: Arc<Identity>,
    /// Named API tokens with roles (`DATA_DIR/tokens.json`).
    pub tokens: tokens::Tokens,
    pub peers: Arc<Peers>,
    pub store: VolumeStore,
    pub tls_server: Arc<rustls::ServerConfig>,
    pub nbd: Server,
    /// The NBD Unix socket: what this node's VMs, hooks and test instances
    /// use (`nbd+unix://` URIs).
    pub nbd_uri_base: ListenAddr,
    /// The NBD TCP listener (`nbd_listen`), TLS required.
    pub nbd_tls_listen: Option<std::net::SocketAddr>,
    primaries: Mutex<HashMap<String, Arc<PrimaryVolume>>>,
    replicas: replica::Replicas,
    locks: Mutex<HashMap<String, VolumeLock>>,
    pub started: Instant,
    /// Serialises volume creation and role changes.
    admin: Mutex<()>,
    /// Migrations this node is the source of, by workload.
    migrations: Mutex<HashMap<String, crate::migration::MigrationRecord>>,
    /// One cutover at a time on this node (`--one-by-one` is the natural order).
    pub cutover_lock: Mutex<()>,
    /// Workload VMs running on this node.
    pub vms: Arc<crate::vm::Vms>,
    /// Test instances (`ferry migrate test`) running on this node, by workload.
    tests: Mutex<HashMap<String, crate::migration::TestRun>>,
    /// Serialises starting and regrouping links.
    link_spawn: Mutex<()>,
    /// Volumes are being loaded at start-up (links start after).
    starting: std::sync::atomic::AtomicBool,
    /// Volumes being promoted together: their links start once all are.
    deferred_links: Mutex<std::collections::HashSet<String>>,
    /// The HA cluster manager's view, for `ferry cluster status`.
    pub cluster: crate::cluster::ClusterView,
    /// Replicas an operator promotes with `--force` (inconsistent or
    /// outdated copies allowed).
    pub forced_promotions: Mutex<std::collections::HashSet<String>>,
    /// Shares (file-level replication) of this node.
    pub shares: crate::share::Shares,
    /// Statistics history (`None`: `history.enabled = false`).
    pub history: Option<Arc<crate::history::HistoryStore>>,
    /// The migration estimator's observations (`ferry estimate`).
    pub estimates: estimates::Estimates,
    /// Archive creates and restores (`ferry archive`).
    pub archive_jobs: archives::ArchiveJobs,
    /// VM live moves this node is the target of: workload → (session
    /// token, the local socket of QEMU's incoming migration), for the
    /// tunnelled migration stream ([`AgentCtx::incoming_vm_socket`]).
    pub incoming_vms: Mutex<HashMap<String, (String, std::path::PathBuf)>>,
}

impl std::fmt::Debug for AgentCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCtx")
            .field("node", &self.identity.node_name)
            .finish_non_exhaustive()
    }
}

impl AgentCtx {
    /// The URI of `export` on this node's NBD Unix socket.
    pub fn nbd_uri(&self, export: &str) -> String {
        self.nbd_uri_base.uri(export)
    }

    /// The `nbds://` URI of `export` on the TCP listener, if there is one.
    pub fn nbd_tls_uri(&self, export: &str) -> Option<String> {
        self.nbd_tls_listen.map(|a| match a {
            std::net::SocketAddr::V4(a) => format!("nbds://{}:{}/{export}", a.ip(), a.port()),
            std::net::SocketAddr::V6(a) => format!("nbds://[{}]:{}/{export}", a.ip(), a.port()),
        })
    }

    pub fn migrations(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, crate::migration::MigrationRecord>> {
        self.migrations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serialises creation and role changes (volumes, shares).
    pub fn admin(&self) -> std::sync::MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tests(&self) -> std::sync::MutexGuard<'_, HashMap<String, crate::migration::TestRun>> {
        self.tests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the engines dial peers with.
    pub fn dialer(&self) -> crate::transport::dial::Dialer {
        crate::transport::dial::Dialer {
            identity: self.identity.clone(),
            peers: self.peers.clone(),
        }
    }

    pub fn replica(&self, name: &str) -> Option<Arc<ReplicaVolume>> {
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn primary(&self, name: &str) -> Option<Arc<PrimaryVolume>> {
        self.primaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn primaries(&self) -> Vec<Arc<PrimaryVolume>> {
        let mut v: Vec<_> = self
            .primaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn replicas(&self) -> Vec<Arc<ReplicaVolume>> {
        let mut v: Vec<_> = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Opens a volume of the store in its recorded role.
    pub fn load_volume(self: &Arc<Self>, name: &str) -> Result<()> {
        if self.primary(name).is_some() || self.replica(name).is_some() {
            return Ok(());
        }
        let lock = self.lock_volume(name)?;
        let info = self.store.meta(name)?;
        let checked = crate::volume::validate_name(name)?;
        let dir = self.store.dir(&checked);
        let mut m = MetaFile::open_or_create(&dir.join("meta.bin"), MetaState::new_primary())?;
        let image = self.store.image_path(&checked);
        match m.state().role {
            Role::Secondary => {
                let dev = FileDevice::open(&image, false)
                    .with_context(|| format!("cannot open {}", image.display()))?;
                m.update(|s| s.clean = false)?;
                let v = Arc::new(ReplicaVolume::new(
                    name.to_string(),
                    info.id,
                    dir.clone(),
                    dev,
                    m,
                    self.cfg.replication.granularity_bytes,
                ));
                self.replicas
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), v);
                tracing::info!(volume = name, role = "secondary", "volume.loaded");
            }
            Role::Primary => {
                let dev = FileDevice::open(&image, false)
                    .with_context(|| format!("cannot open {}", image.display()))?;
                let size = ferry_nbd::BlockDevice::size(&dev);
                let g = self.cfg.replication.granularity_bytes;
                let st = m.state().clone();
                let mut dirty = match meta::load_dirty_map(&dir, size, g)? {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(volume = name, error = %e, "volume.dirty_map.unreadable: resyncing everything");
                        DirtyMap::all_dirty(size, g)?
                    }
                    None if st.peer.is_some() => DirtyMap::all_dirty(size, g)?,
                    None => DirtyMap::new(size, g)?,
                };
                if !st.clean {
                    for x in &st.al_extents {
                        dirty.mark(x << AL_EXTENT_SHIFT, 1 << AL_EXTENT_SHIFT);
                    }
                    tracing::warn!(
                        volume = name,
                        al_extents = st.al_extents.len(),
                        "volume.unclean_stop: activity-log extents count as dirty"
                    );
                }
                m.update(|s| s.clean = false)?;
                let vol = Arc::new(PrimaryVolume::new(
                    name.to_string(),
                    info.id,
                    dir,
                    dev,
                    m,
                    dirty,
                    self.cfg.replication,
                ));
                vol.seeds.load(
                    &vol.dir,
                    size,
                    g,
                    (!st.clean).then_some((&st.al_extents[..], AL_EXTENT_SHIFT)),
                );
                match vol.save_dirty_map(true) {
                    Ok(()) => {}
                    // A full disk: the map on disk and the activity log in
                    // meta.bin (clean = false, written in place above) still
                    // give this same map after a crash; serve, save later.
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        tracing::warn!(volume = name, "volume.dirty_map.save_deferred: the disk is full; served, the map is saved once there is room")
                    }
                    Err(e) => return Err(e).context("cannot save the dirty map"),
                }
                if crate::cluster::is_ha_volume(&self.cfg.data_dir, name) {
                    // Under HA, a primary serves only once the cluster holds
                    // a lease (a restarted old primary may have been replaced).
                    vol.lease_until_ms
                        .store(0, std::sync::atomic::Ordering::SeqCst);
                    vol.freeze_nowait();
                }
                self.nbd.add_export(Export {
                    name: name.to_string(),
                    description: format!("ferry volume {name}"),
                    read_only: false,
                    device: vol.clone(),
                })?;
                self.primaries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), vol.clone());
                tracing::info!(volume = name, role = "primary", peer = ?st.peer, "volume.loaded");
                // At start-up the links start once every volume is loaded,
                // so a workload's stream forms at once.
                let deferred = self
                    .deferred_links
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(name);
                if st.peer.is_some()
                    && !deferred
                    && !self.starting.load(std::sync::atomic::Ordering::SeqCst)
                {
                    self.spawn_link(&vol);
                }
            }
        }
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), lock);
        Ok(())
    }

    /// The volume's lock. A lock this very process held a moment ago may
    /// still be held for a few milliseconds by a child being spawned (hooks,
    /// `ip`): its copy of the descriptor lives until it execs. Wait for that
    /// instead of failing a promotion.
    fn lock_volume(&self, name: &str) -> Result<VolumeLock> {
        let me = std::process::id().to_string();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match self.store.lock(name) {
                Err(crate::volume::VolumeError::Busy { holder, .. })
                    if holder == me && Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                r => return Ok(r?),
            }
        }
    }

    /// Loads a volume created in the data dir while the agent ran (by `ferry volume create`).
    pub fn adopt_volume(self: &Arc<Self>, name: &str) {
        if self.primary(name).is_some() || self.replica(name).is_some() {
            return;
        }
        // A promotion, demotion or deletion holds `admin` while the volume
        // is out of service between two states: loading it then would bring
        // it back as what its metadata still says (a demoted primary as a
        // primary) or take its lock from under the transition, which then
        // fails. The transition loads it itself; a status asked meanwhile
        // does without (and never waits for it on an API thread).
        let _admin = match self.admin.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if self.primary(name).is_none()
            && self.replica(name).is_none()
            && self.store.meta(name).is_ok()
        {
            if let Err(e) = self.load_volume(name) {
                tracing::warn!(volume = name, error = %format!("{e:#}"), "volume.adopt_failed");
            }
        }
    }

    /// The volumes `vol` replicates with as one ordered stream: those of a
    /// workload defined here that holds it, when every one of them is a
    /// primary here replicating to the same peer; else `vol` alone.
    fn link_group(&self, vol: &Arc<PrimaryVolume>) -> (String, Vec<Arc<PrimaryVolume>>) {
        let peer = vol.link.lock().peer.clone();
        let workloads = crate::workload::list_workloads(&self.cfg.data_dir).unwrap_or_default();
        for w in workloads {
            if w.volumes.len() < 2
                || w.volumes.len() > crate::volume::link::GROUP_VOLUMES_MAX
                || !w.volumes.iter().any(|n| *n == vol.name)
            {
                continue;
            }
            let members: Option<Vec<_>> = w
                .volumes
                .iter()
                .map(|n| {
                    self.primary(n).filter(|p| {
                        let l = p.link.lock();
                        l.peer == peer && !l.stop
                    })
                })
                .collect();
            if let Some(members) = members {
                return (w.name.into_string(), members);
            }
        }
        (vol.name.clone(), vec![vol.clone()])
    }

    /// Starts the link of `vol` — as a member of its workload's stream when
    /// the whole workload replicates to the same peer (a member already
    /// linked alone or in another group is moved over: its link reconnects).
    pub fn spawn_link(self: &Arc<Self>, vol: &Arc<PrimaryVolume>) {
        let _one = self.link_spawn.lock().unwrap_or_else(|p| p.into_inner());
        let (name, members) = self.link_group(vol);
        let same = |m: &Arc<PrimaryVolume>| {
            let l = m.link.lock();
            l.task_running && l.link_group.as_deref() == Some(name.as_str())
        };
        if members.iter().all(same) {
            return;
        }
        let moving: Vec<_> = members
            .iter()
            .filter(|m| m.link.lock().task_running)
            .cloned()
            .collect();
        for m in &moving {
            m.link.lock().regroup = true;
        }
        // A link ends within its connect and handshake timeouts (5 + 10 s).
        let deadline = Instant::now() + Duration::from_secs(20);
        while moving.iter().any(|m| m.link.lock().task_running) {
            if Instant::now() > deadline {
                tracing::error!(group = %name, "replication.link.regroup_timeout: each volume keeps a link of its own");
                for m in &members {
                    let alone = {
                        let mut l = m.link.lock();
                        l.regroup = false;
                        !l.task_running
                    };
                    if alone {
                        self.start_stream(m.name.clone(), vec![m.clone()]);
                    }
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for m in &members {
            m.link.lock().regroup = false;
        }
        self.start_stream(name, members);
    }

    /// Starts the link thread of one stream (no grouping decisions).
    fn start_stream(self: &Arc<Self>, name: String, members: Vec<Arc<PrimaryVolume>>) {
        for m in &members {
            let mut l = m.link.lock();
            l.task_running = true;
            l.link_group = Some(name.clone());
        }
        if members.len() > 1 {
            tracing::info!(group = %name, volumes = members.len(), "replication.link.group: one ordered stream");
        }
        let ctx = self.clone();
        let members_left = members.clone();
        let group = crate::volume::primary::Group::new(name.clone(), members);
        let spawned = std::thread::Builder::new()
            .name(format!("link-{name}"))
            .spawn(move || {
                crate::volume::link::run(group.clone(), ctx.dialer());
                // Members that left (stopped, or now replicating elsewhere)
                // are done; one being moved to another group is the mover's;
                // the others go on, in whatever grouping now applies.
                let mut again = Vec::new();
                for m in &group.members {
                    let mut l = m.link.lock();
                    l.task_running = false;
                    l.link_group = None;
                    if !l.regroup && !l.stop && l.peer.is_some() {
                        again.push(m.clone());
                    }
                }
                for m in again {
                    ctx.spawn_link(&m);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "replication.link.spawn_failed");
            for m in &members_left {
                let mut l = m.link.lock();
                l.task_running = false;
                l.link_group = None;
            }
        }
    }

    /// Takes a volume out of service on this node, keeping its files: the
    /// export is closed (clients are disconnected), a primary's link stopped and
    /// its dirty map saved, a replica's inbound link closed, the lock released.
    pub fn unload_volume(&self, name: &str) -> Result<()> {
        // Taken out of the maps in statements of their own: a guard in the
        // `if let` would stay locked through the saves below, and the HA
        // heartbeat thread looks volumes up in these maps.
        let primary = self
            .primaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let secondary = match primary {
            Some(_) => None,
            None => self
                .replicas
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name),
        };
        if let Some(v) = primary {
            self.nbd.remove_export(name);
            v.link.lock().stop = true;
            v.link.copier.notify_all();
            v.link_down(None);
            // Let the link thread finish its own last save before ours.
            let deadline = Instant::now() + std::time::Duration::from_secs(3);
            while v.link.lock().task_running && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            v.save_dirty_map(true)?;
            v.meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .update(|s| s.clean = true)?;
        } else if let Some(v) = secondary {
            v.close_link();
            // A test copy of it goes with it.
            self.nbd.remove_export(&crate::workload::test_export(name));
            v.snapshot.end();
        } else {
            bail!("no volume {name:?} on node {}", self.identity.node_name);
        }
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        tracing::info!(volume = name, "volume.unloaded");
        Ok(())
    }

    /// A replica here that may become primary: consistent, and no test
    /// instance running on a snapshot of it.
    fn promotable(&self, name: &str) -> Result<Arc<ReplicaVolume>> {
        let node = &self.identity.node_name;
        let sec = self
            .replica(name)
            .ok_or_else(|| anyhow!("volume {name:?} is not a replica on node {node}"))?;
        let forced = self
            .forced_promotions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name);
        if !forced
            && !sec
                .meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state()
                .consistent
        {
            bail!("the replica of {name:?} on node {node} is inconsistent; refusing to promote it");
        }
        if sec.snapshot.is_active() {
            bail!("a test instance runs on a snapshot of {name:?} on node {node}: end it first (ferry migrate test WORKLOAD --end)");
        }
        Ok(sec)
    }

    /// Cutover, **the commit point** on the target, for all of a workload's
    /// volumes at once: once every volume is checked promotable, one record
    /// (`DATA_DIR/commits/WORKLOAD.json`, synced with its directory) says this
    /// node takes the workload over — that write is the commit — then each
    /// volume is promoted. A crash in between is finished at start-up
    /// ([`AgentCtx::finish_takeovers`]), so the workload is never left half here.
    pub fn commit_takeover(
        self: &Arc<Self>,
        workload: &str,
        volumes: &[String],
        shares: &[String],
        reverse_to: Option<&str>,
        mode: Mode,
    ) -> Result<Vec<(String, u64)>> {
        let checked = crate::volume::validate_name(workload)?;
        for name in volumes {
            self.promotable(name)?;
        }
        for name in shares {
            crate::share::check_name(name)?;
            crate::share::check_promotable(self, name, false)?;
        }
        let dir = self.cfg.data_dir.join("commits");
        std::fs::create_dir_all(&dir)?;
        let record = CommitRecord {
            workload: workload.to_string(),
            volumes: volumes.to_vec(),
            shares: shares.to_vec(),
            reverse_to: reverse_to.map(str::to_string),
            mode: if mode == Mode::Sync { "sync" } else { "async" }.to_string(),
        };
        crate::store::save(&dir.join(format!("{checked}.json")), &record)?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
        tracing::info!(
            workload,
            volumes = volumes.len(),
            shares = shares.len(),
            "cutover.commit: this node takes the workload over"
        );
        self.finish_takeover(workload)
    }

    /// Promotes every volume and share a commit record names that is still
    /// a replica here, then removes the record. Shares are promoted after the
    /// volumes; while the agent starts up only their records change (the
    /// start-up then serves them with the other primary shares).
    fn finish_takeover(self: &Arc<Self>, workload: &str) -> Result<Vec<(String, u64)>> {
        let path = self
            .cfg
            .data_dir
            .join("commits")
            .join(format!("{}.json", crate::volume::validate_name(workload)?));
        let record: CommitRecord =
            crate::store::load(&path)?.ok_or_else(|| anyhow!("{} is gone", path.display()))?;
        let mode = if record.mode == "async" {
            Mode::Async
        } else {
            Mode::Sync
        };
        let reverse_to = record.reverse_to.as_deref();
        let names: Vec<String> = record.volumes.clone();
        // The links back start once every volume is promoted, as one stream.
        self.deferred_links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(names.iter().cloned());
        let mut promoted = Vec::new();
        let mut result = Ok(());
        for name in &names {
            if self.replica(name).is_some() {
                match self.promote_volume(name, reverse_to, mode) {
                    Ok(g) => promoted.push((name.clone(), g)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        {
            let mut d = self
                .deferred_links
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for n in &names {
                d.remove(n);
            }
        }
        if !self.starting.load(std::sync::atomic::Ordering::SeqCst) {
            for (name, _) in &promoted {
                if let Some(v) = self.primary(name) {
                    if v.link.lock().peer.is_some() {
                        self.spawn_link(&v);
                    }
                }
            }
        }
        result?;
        let shares = record.shares.iter().map(String::as_str);
        let starting = self.starting.load(std::sync::atomic::Ordering::SeqCst);
        for name in shares {
            // A cutover commits only after both trees compared equal.
            let rec = match crate::share::promote_record(self, name, reverse_to, false, true)? {
                Some(rec) => {
                    promoted.push((name.to_string(), rec.generation));
                    rec
                }
                // Promoted by an earlier try whose start failed: start it.
                None => crate::share::ShareStore::new(&self.cfg.data_dir).load(name)?,
            };
            if !starting && self.shares.primary(name).is_none() {
                crate::share::start_primary(self, rec)?;
            }
        }
        std::fs::remove_file(&path)?;
        Ok(promoted)
    }

    /// At start-up: finishes takeovers a crash interrupted after their commit.
    pub fn finish_takeovers(self: &Arc<Self>) {
        let dir = self.cfg.data_dir.join("commits");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(workload) = name.strip_suffix(".json") else {
                continue;
            };
            match self.finish_takeover(workload) {
                Ok(p) => tracing::warn!(
                    workload,
                    promoted = p.len(),
                    "cutover.commit.finished_after_restart"
                ),
                Err(e) => {
                    tracing::error!(workload, error = %format!("{e:#}"), "cutover.commit.unfinished: promote the remaining volumes by hand")
                }
            }
        }
    }

    /// Cutover, commit point on the target: this replica durably records
    /// itself primary under a new generation, is exported here, and (with
    /// `reverse_to`) replicates back to the old primary. The caller checked
    /// that both copies are equal, so the reverse link starts with an empty
    /// dirty map.
    pub fn promote_volume(
        self: &Arc<Self>,
        name: &str,
        reverse_to: Option<&str>,
        mode: Mode,
    ) -> Result<u64> {
        let _g = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let sec = self.promotable(name)?;
        let size = ferry_nbd::BlockDevice::size(&sec.dev);
        if !sec.close_link_and_wait(std::time::Duration::from_secs(10)) {
            bail!("the replication stream into {name:?} did not stop within 10 s; not promoting");
        }
        drop(sec);
        self.unload_volume(name)?;
        let dir = self.store.dir(&crate::volume::validate_name(name)?);
        let g = self.cfg.replication.granularity_bytes;
        // Blocks this copy may hold that the peer does not (it was a
        // demoted old primary, promoted by force): dirty for the peer.
        let dirty = meta::load_suspect_map(&dir)
            .and_then(|b| DirtyMap::decode(&b, size, g).ok())
            .unwrap_or(DirtyMap::new(size, g)?);
        meta::save_dirty_map(&dir, &dirty)?;
        meta::clear_suspect_map(&dir);
        let generation = identity::random_u64();
        {
            let mut m = MetaFile::open_or_create(&dir.join("meta.bin"), MetaState::new_primary())?;
            m.update(|s| {
                s.role = Role::Primary;
                s.consistent = true;
                s.clean = true;
                s.mode = mode;
                s.al_extents.clear();
                s.peer = reverse_to.map(str::to_string);
                s.generation.bump(generation);
            })?;
        }
        tracing::info!(
            volume = name,
            generation = format!("{generation:016x}"),
            "cutover.commit: this node is now primary"
        );
        self.load_volume(name)?;
        Ok(generation)
    }

    /// Cutover, after the commit point, on the old primary: held and new
    /// writes fail, the export closes, and the volume becomes the replica of
    /// `new_primary` (which replicates back to it).
    pub fn demote_volume(self: &Arc<Self>, name: &str, new_primary: &str) -> Result<()> {
        self.demote(name, new_primary, None)?;
        tracing::info!(
            volume = name,
            primary = new_primary,
            "cutover.demoted: this node now holds the replica"
        );
        Ok(())
    }

    /// HA, after a failover elsewhere: this old primary becomes the replica
    /// of `new_primary`. Everything it may hold that the new primary never
    /// saw — its dirty map and activity-log extents — is kept in
    /// `suspect.map` and sent in the handshake, so the new primary resends
    /// those blocks along with its own changes.
    pub fn demote_after_failover(
        self: &Arc<Self>,
        name: &str,
        new_primary: &str,
        proven_equal: bool,
    ) -> Result<()> {
        let suspect_bytes = self.demote(name, new_primary, Some(proven_equal))?;
        tracing::info!(
            volume = name,
            primary = new_primary,
            suspect_bytes,
            "cluster.demoted: this node now holds the replica; blocks it may hold alone will be resent"
        );
        Ok(())
    }

    /// Makes the primary `name` the replica of `new_primary`. `failover`:
    /// `None` for a cutover (copies proven equal, nothing suspect, the copy
    /// stays consistent); `Some(proven_equal)` for HA, which writes the
    /// suspect map (empty when proven equal) and marks the copy
    /// inconsistent until resynced. Returns the suspect bytes.
    fn demote(
        self: &Arc<Self>,
        name: &str,
        new_primary: &str,
        failover: Option<bool>,
    ) -> Result<u64> {
        let _g = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let vol = self.primary(name).ok_or_else(|| {
            anyhow!(
                "volume {name:?} is not a primary on node {}",
                self.identity.node_name
            )
        })?;
        vol.close_gate();
        let suspect = failover.map(|proven_equal| {
            let mut suspect = vol.link.lock().rep.dirty_map().clone();
            if proven_equal {
                // A verified switchover: both copies were equal when it resigned.
                suspect.clear_all();
            } else {
                for x in &vol.meta_state().al_extents {
                    suspect.mark(x << AL_EXTENT_SHIFT, 1 << AL_EXTENT_SHIFT);
                }
            }
            suspect
        });
        drop(vol);
        self.unload_volume(name)?;
        let dir = self.store.dir(&crate::volume::validate_name(name)?);
        if let Some(suspect) = &suspect {
            meta::save_suspect_map(&dir, suspect)?;
        }
        let mut m =
            MetaFile::open_or_create(&dir.join("meta.bin"), MetaState::new_secondary(new_primary))?;
        m.update(|s| {
            s.role = Role::Secondary;
            s.peer = Some(new_primary.to_string());
            s.al_extents.clear();
            if suspect.is_some() {
                s.consistent = false;
            }
        })?;
        drop(m);
        let _ = std::fs::remove_file(dir.join("dirty.map"));
        self.load_volume(name)?;
        Ok(suspect.map_or(0, |m| m.dirty_bytes()))
    }

    /// `ferry volume delete` through the agent. A primary that still
    /// replicates must be stopped first (its replica would be orphaned).
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let _g = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = self.primary(name) {
            if let Some(peer) = v.link.lock().peer.clone() {
                bail!(
                    "volume {name:?} replicates to {peer}; run `ferry replicate stop {name}` first"
                );
            }
        }
        if self.primary(name).is_some() || self.replica(name).is_some() {
            self.unload_volume(name)?;
        }
        self.store.delete(name, true)?;
        tracing::info!(volume = name, "volume.deleted");
        Ok(())
    }

    pub fn create_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<()> {
        let _g = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        self.store.create(name, size)?;
        self.load_volume(name)
    }

    /// A primary asks this node to hold a replica of its volume.
    pub fn create_replica(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        size: u64,
        primary: &str,
    ) -> Result<()> {
        let _g = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        if self.peers.get(primary).is_none() {
            bail!("node {primary:?} is not registered here");
        }
        if let Some(p) = self.primary(name) {
            bail!(
                "volume {name:?} is a primary on node {} (id {}); refusing to make it a replica",
                self.identity.node_name,
                p.id
            );
        }
        if let Some(s) = self.replica(name) {
            let size_here = ferry_nbd::BlockDevice::size(&s.dev);
            if s.id != id || size_here != size {
                bail!("volume {name:?} here has id {} and {size_here} bytes, the primary's has id {id} and {size} bytes: delete the old one first", s.id);
            }
            return Ok(());
        }
        match self.store.meta(name) {
            Ok(m) if m.id != id => bail!(
                "a different volume named {name:?} (id {}) exists on node {}",
                m.id,
                self.identity.node_name
            ),
            Ok(_) => {}
            Err(crate::volume::VolumeError::NotFound { .. }) => {
                let free = free_bytes(&self.cfg.data_dir).unwrap_or(u64::MAX);
                if free < size / 100 {
                    tracing::warn!(
                        volume = name,
                        free,
                        size,
                        "replica.create: little free space; a sparse image may fill the disk"
                    );
                }
                self.store.create_with_id(name, size, id)?;
            }
            Err(e) => return Err(e.into()),
        }
        let dir = self.store.dir(&crate::volume::validate_name(name)?);
        let meta_path = dir.join("meta.bin");
        if !meta_path.exists() {
            MetaFile::open_or_create(&meta_path, MetaState::new_secondary(primary))?;
        }
        self.load_volume(name)?;
        if self.replica(name).is_none() {
            bail!("volume {name:?} exists here as a primary");
        }
        Ok(())
    }

    /// `ferry replicate start`: make `to` hold a replica and bring the link up.
    pub fn start_replication(
        self: &Arc<Self>,
        name: &str,
        to: &str,
        mode: Mode,
        max_rate: Option<u64>,
        baseline: &crate::volume::Baseline,
    ) -> Result<()> {
        let vol = self.primary(name).ok_or_else(|| {
            anyhow!(
                "volume {name:?} is not a primary on node {}",
                self.identity.node_name
            )
        })?;
        let peer = self.peers.get(to).ok_or_else(|| {
            anyhow!(
                "node {to:?} is not registered: run `ferry node add {to} --api HOST:PORT` first"
            )
        })?;
        if to == self.identity.node_name {
            bail!("a volume cannot be replicated to its own node");
        }
        {
            let l = vol.link.lock();
            if let Some(p) = &l.peer {
                if p != to {
                    bail!("volume {name:?} already replicates to {p}; stop that first");
                }
            }
        }
        let size = ferry_nbd::BlockDevice::size(&vol.local);
        let client = crate::transport::client::ApiClient::to_peer(&self.identity, &peer)?;
        client
            .post(
                "/api/v1/replicas",
                &serde_json::json!({"volume": name, "volume_id": vol.id, "size_bytes": size, "primary": self.identity.node_name}),
            )
            .with_context(|| format!("node {to} could not create the replica"))?;
        if vol.link.lock().rep.phase() == ferry_core::link::Phase::Disconnected {
            match baseline {
                crate::volume::Baseline::Full => {}
                crate::volume::Baseline::Checksum => self.checksum_baseline(&vol, &client, None)?,
                crate::volume::Baseline::Seed(archive) => {
                    let seed =
                        archives::seed_check(&vol, &client, to, archive, &self.identity.node_name)?;
                    self.checksum_baseline(&vol, &client, Some(&seed))?;
                }
            }
        }
        {
            let mut meta = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
            meta.update(|s| {
                s.peer = Some(to.to_string());
                s.mode = mode;
                if s.generation.is_blank() {
                    s.generation.bump(identity::random_u64());
                }
            })?;
            let mut l = vol.link.lock();
            l.peer = Some(to.to_string());
            l.rep.set_mode(mode);
            l.max_rate_bytes_per_s = max_rate;
            l.bumped_while_down = true;
        }
        self.spawn_link(&vol);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            {
                let l = vol.link.lock();
                if l.stats.connected_since.is_some() {
                    return Ok(());
                }
                if l.stats.split_brain {
                    bail!(
                        "{}",
                        l.stats
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "split brain".into())
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "the link to {to} did not come up within 15 s: {}",
                        l.stats
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "no answer".into())
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Checksum resync: compare BLAKE3 block hashes with the peer's existing
    /// copy and mark only the blocks that differ.
    fn checksum_baseline(
        &self,
        vol: &Arc<PrimaryVolume>,
        peer: &crate::transport::client::ApiClient,
        seed: Option<&DirtyMap>,
    ) -> Result<()> {
        let g = self.cfg.replication.granularity_bytes;
        // Writes from now on are marked dirty by the replicator itself.
        if let Some(d) = vol.link.lock().rep.dirty_map_mut() {
            d.clear_all();
        }
        let remote = peer.get(&format!("/api/v1/volumes/{}/hashes?fresh=1", vol.name))?;
        let remote: Vec<&str> = remote["hashes"]
            .as_array()
            .ok_or_else(|| anyhow!("the peer sent no block hashes"))?
            .iter()
            .filter_map(|h| h.as_str())
            .collect();
        let local = crate::volume::verify::leaf_hashes(&**vol, g)?;
        if remote.len() != local.len() {
            bail!(
                "the peer's copy has {} blocks, this one {}",
                remote.len(),
                local.len()
            );
        }
        let mut l = vol.link.lock();
        let d = l
            .rep
            .dirty_map_mut()
            .ok_or_else(|| anyhow!("the link came up during the checksum comparison"))?;
        let mut differing = 0u64;
        for (i, (a, b)) in local.iter().zip(&remote).enumerate() {
            if a.to_hex().as_str() != *b {
                d.mark_block(i as u64);
                differing += 1;
            }
        }
        // Offline seeding: also every block written since the archive's
        // barrier (the hashes already found most of them; the map is what
        // the source knows it changed).
        let seeded = seed.map(|m| {
            d.merge(m);
            m.dirty_blocks()
        });
        let resend = d.dirty_bytes();
        l.checksum_baseline = true;
        tracing::info!(volume = %vol.name, blocks = local.len(), differing, seed_blocks = ?seeded, resend_bytes = resend, "replication.checksum.compared");
        Ok(())
    }

    pub fn stop_replication(&self, name: &str) -> Result<()> {
        let vol = self
            .primary(name)
            .ok_or_else(|| anyhow!("volume {name:?} is not a primary here"))?;
        vol.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(|s| s.peer = None)?;
        vol.link.lock().peer = None;
        Ok(())
    }

    /// Clean shutdown: close exports, drop links, save dirty maps, mark clean.
    pub fn shutdown(&self) {
        // VMs first, while their disks are still served (QEMU flushes on SIGTERM).
        for w in crate::workload::list_workloads(&self.cfg.data_dir).unwrap_or_default() {
            if let Err(e) = self
                .vms
                .stop(&w.name, Duration::from_millis(w.hook_timeout_ms))
            {
                tracing::warn!(workload = %w.name, error = %format!("{e:#}"), "vm.stop_failed");
            }
        }
        self.nbd.shutdown();
        self.shares.shutdown();
        if let Some(h) = &self.history {
            h.sync();
        }
        for v in self.primaries() {
            v.link.lock().stop = true;
            v.link.copier.notify_all();
            v.link_down(None);
            if let Err(e) = v.save_dirty_map(true) {
                tracing::error!(volume = %v.name, error = %e, "volume.dirty_map.save_failed");
            }
            if let Err(e) = v.seeds.save() {
                tracing::error!(volume = %v.name, error = %e, "volume.seeds.save_failed");
            }
            let r = v
                .meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .update(|s| s.clean = true);
            if let Err(e) = r {
                tracing::error!(volume = %v.name, error = %e, "volume.meta.save_failed");
            }
        }
        for s in self.replicas() {
            let _ = ferry_nbd::BlockDevice::flush(&s.dev);
            let _ = s
                .meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .update(|m| m.clean = true);
        }
    }
}

pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is a plain C struct that statvfs(3) fills; all-zero is a valid start value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Runs the agent until SIGINT/SIGTERM.
/// glibc returns freed heap memory to the kernel once this much is free at the
/// top, and serves allocations at least [`MALLOC_MMAP_THRESHOLD_BYTES`] with a
/// fresh mmap. With its defaults (128 KiB, dynamic) every batch the copier or a
/// link frees was handed back and faulted in again, zeroed: a third of the
/// copier's CPU went to page faults. A heap still shrinks past 64 MiB free —
/// per glibc arena (one per thread that allocates, up to 8 × cores).
const MALLOC_TRIM_THRESHOLD_BYTES: i32 = 64 << 20;
const MALLOC_MMAP_THRESHOLD_BYTES: i32 = 4 << 20;

fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes glibc's allocator parameters; it is called
    // before the agent starts its threads.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES);
    }
}

/// The REST server, given by the crate root (the API sits above the agent).
pub type ServeApi = fn(
    std::net::TcpListener,
    Arc<AgentCtx>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

pub fn run(config_path: &Path, serve_api: ServeApi) -> Result<()> {
    tune_allocator();
    let signals = crate::sys::signals::Signals::block()?;
    let cfg = AgentConfig::load(config_path)?;
    // Root only (0700), also when it exists: shares' backing trees, keys and
    // tokens live below it.
    crate::share::private_dir(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    crate::share::ShareStore::new(&cfg.data_dir).prepare()?;
    crate::transport::conns::raise_nofile_limit();
    let identity = Arc::new(Identity::load_or_create(&cfg.data_dir, &cfg.node_name)?);
    let tokens = tokens::Tokens::load(&cfg.data_dir)?;
    let audit = crate::audit::AuditLog::open(&cfg.data_dir, &cfg.node_name, cfg.audit)?;
    audit.spawn_writer()?;
    let damaged = damaged::Damaged::default();
    let (peers, bad_peers) = Peers::load(&cfg.data_dir)?;
    for e in bad_peers {
        damaged.report("peers", "peers.json", &cfg.data_dir.join("peers.json"), e);
    }
    let peers = Arc::new(peers);
    let store = VolumeStore::open(&cfg.data_dir)?;
    let tls_server = tls::server_config(&identity, peers.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ferry-rt")
        .build()?;
    let nbd = Server::new(vec![], cfg.nbd.to_limits())?;
    let socket = cfg.nbd_socket_path();
    let nbd_listener = nbd_tls::bind_private_socket(&socket, cfg.nbd.socket_path.is_none())
        .with_context(|| format!("cannot serve NBD on {}", socket.display()))?;
    let nbd_uri_base = nbd_listener.local_addr().clone();
    nbd.serve(nbd_listener)?;
    let nbd_tls_listen = match &cfg.nbd_listen {
        None => None,
        Some(addr) => {
            let addr: ListenAddr = addr.parse()?;
            let ListenAddr::Tcp(tcp) = addr else {
                bail!("nbd_listen takes HOST:PORT");
            };
            let ca = nbd_tls::NbdCa::load_or_create(&cfg.data_dir)?;
            let names = nbd_tls::server_names(&cfg.node_name, &tcp, &cfg.nbd.tls_names);
            let listener = Listener::bind(&addr)?.require_tls(ca.server_config(&names)?);
            let ListenAddr::Tcp(bound) = listener.local_addr().clone() else {
                bail!("nbd_listen takes HOST:PORT");
            };
            tracing::info!(listen = %bound, names = ?names, "nbd.tls.listen: client certificates of the node's NBD CA required");
            nbd.serve(listener)?;
            Some(bound)
        }
    };
    let repl_listener = std::net::TcpListener::bind(cfg.replication_listen).with_context(|| {
        format!(
            "cannot listen for replication on {}",
            cfg.replication_listen
        )
    })?;
    let api_listener = std::net::TcpListener::bind(cfg.api_listen)
        .with_context(|| format!("cannot listen for the API on {}", cfg.api_listen))?;
    api_listener.set_nonblocking(true)?;
    let api_conns = conns::ConnTable::new("api", cfg.api.connections_max, cfg.api.connections_max);
    api_conns.spawn_reaper(Duration::from_millis(cfg.api.handshake_timeout_ms))?;
    let r = &cfg.replication;
    let repl_conns = conns::ConnTable::new("replication", r.connections_max, r.handshakes_max);
    repl_conns.spawn_reaper(Duration::from_millis(r.handshake_timeout_ms))?;
    let history = cfg.history.enabled.then(|| {
        Arc::new(crate::history::HistoryStore::new(
            &cfg.data_dir,
            cfg.history.clone(),
        ))
    });
    let estimates = estimates::Estimates::load(&cfg.data_dir, cfg.estimate);
    let ctx = Arc::new(AgentCtx {
        audit,
        tokens,
        cfg,
        identity,
        peers,
        store,
        tls_server,
        nbd,
        nbd_uri_base,
        nbd_tls_listen,
        primaries: Mutex::new(HashMap::new()),
        replicas: Mutex::new(HashMap::new()),
        locks: Mutex::new(HashMap::new()),
        migrations: Mutex::new(HashMap::new()),
        cutover_lock: Mutex::new(()),
        vms: Arc::new(crate::vm::Vms::default()),
        tests: Mutex::new(HashMap::new()),
        link_spawn: Mutex::new(()),
        peer_watch: Default::default(),
        starting: std::sync::atomic::AtomicBool::new(true),
        deferred_links: Mutex::new(std::collections::HashSet::new()),
        cluster: crate::cluster::ClusterView::default(),
        forced_promotions: Mutex::new(std::collections::HashSet::new()),
        shares: Default::default(),
        estimates,
        archive_jobs: archives::ArchiveJobs::default(),
        incoming_vms: Mutex::new(HashMap::new()),
        history,
        started: Instant::now(),
        admin: Mutex::new(()),
        damaged,
        api_conns,
        repl_conns,
    });
    let (volumes, bad) = ctx.store.scan()?;
    for b in bad {
        ctx.damaged.report("volume", &b.name, &b.path, b.error);
    }
    for v in volumes {
        if let Err(e) = ctx.load_volume(&v.name) {
            ctx.damaged.report(
                "volume",
                &v.name,
                &ctx.store.dir(&crate::volume::validate_name(&v.name)?),
                format!("{e:#}"),
            );
        }
    }
    ctx.finish_takeovers();
    ctx.starting
        .store(false, std::sync::atomic::Ordering::SeqCst);
    for v in ctx.primaries() {
        if v.link.lock().peer.is_some() {
            ctx.spawn_link(&v);
        }
    }
    let share_store = crate::share::ShareStore::new(&ctx.cfg.data_dir);
    for name in share_store.list() {
        match share_store.load(&name) {
            Ok(rec) if rec.role == "primary" => {
                if let Err(e) = crate::share::start_primary(&ctx, rec) {
                    tracing::error!(share = %name, error = %format!("{e:#}"), "share.start_failed");
                }
            }
            Ok(_) => {}
            Err(e) => ctx.damaged.report(
                "share",
                &name,
                &ctx.cfg.data_dir.join("shares").join(&name),
                e.to_string(),
            ),
        }
    }
    let migrations = crate::migration::load_migrations(&ctx)?;
    *ctx.migrations() = migrations;
    {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name("repl-accept".into())
            .spawn(move || {
                let l = crate::transport::inbound::Listener {
                    conns: ctx.repl_conns.clone(),
                    tls_server: ctx.tls_server.clone(),
                    peers: ctx.peers.clone(),
                    frame_bytes_max: ctx.cfg.replication.frame_bytes_max,
                };
                let route = ctx.clone();
                crate::transport::inbound::serve(
                    repl_listener,
                    l,
                    Arc::new(move |inbound| route.route_inbound(inbound)),
                )
            })?;
    }
    {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name("leaf-hasher".into())
            .spawn(move || leaf_hasher(&ctx))?;
    }
    audit::spawn_heads(ctx.clone())?;
    crate::cluster::spawn(ctx.clone())?;
    crate::migration::schedule::spawn(ctx.clone())?;
    sampler::spawn(ctx.clone())?;
    estimates::spawn(ctx.clone())?;
    peerwatch::spawn(ctx.clone())?;
    rt.spawn(serve_api(api_listener, ctx.clone()));
    rt.spawn(housekeeping(ctx.clone()));
    tracing::info!(node = %ctx.identity.node_name, fingerprint = %ctx.identity.fingerprint(),
        api = %ctx.cfg.api_listen, replication = %ctx.cfg.replication_listen, nbd = %ctx.nbd_uri_base,
        "agent.started");
    println!(
        "{}",
        serde_json::json!({
            "node_name": ctx.identity.node_name,
            "api": ctx.cfg.api_listen.to_string(),
            "replication": ctx.cfg.replication_listen.to_string(),
            "nbd": ctx.nbd_uri(""),
            "nbd_tls": ctx.nbd_tls_uri(""),
            "fingerprint": ctx.identity.fingerprint(),
        })
    );
    crate::sys::out::flush_stdout();
    let sig = signals.wait()?;
    tracing::info!(signal = sig, "agent.stopping");
    estimates::save_all(&ctx);
    ctx.shutdown();
    rt.shutdown_timeout(Duration::from_secs(2));
    tracing::info!("agent.stopped");
    Ok(())
}

/// Once a second: transfer rates, and the dirty maps saved when they changed.
/// Keeps the Merkle leaves of workload volumes current in the background (at
/// most `leaf_refresh_bytes_per_s`) and reads back clean ones
/// (`leaf_scrub_bytes_per_s`).
fn leaf_hasher(ctx: &Arc<AgentCtx>) {
    const TICK: Duration = Duration::from_millis(100);
    let rate = ctx.cfg.replication.leaf_refresh_bytes_per_s;
    let scrub_rate = ctx.cfg.replication.leaf_scrub_bytes_per_s;
    if rate == 0 && scrub_rate == 0 {
        return;
    }
    // Leaves are kept only for volumes of the workloads defined on this node
    // (what a cutover compares); `volume verify` reads images whole anyway.
    let mut hot = std::collections::HashSet::new();
    let mut tick = 0u64;
    loop {
        std::thread::sleep(TICK);
        if tick % 10 == 0 {
            hot = crate::workload::list_workloads(&ctx.cfg.data_dir)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|w| w.volumes)
                .collect();
        }
        tick += 1;
        let mut budget = rate / 10;
        let mut scrub = scrub_rate / 10;
        let primaries: Vec<_> = ctx
            .primaries()
            .into_iter()
            .filter(|p| hot.contains(p.name.as_str()))
            .collect();
        let replicas: Vec<_> = ctx
            .replicas()
            .into_iter()
            .filter(|s| hot.contains(s.name.as_str()))
            .collect();
        let all: Vec<(
            &str,
            &crate::volume::verify::LeafCache,
            &dyn ferry_nbd::BlockDevice,
        )> = primaries
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    &p.leaves,
                    &p.local as &dyn ferry_nbd::BlockDevice,
                )
            })
            .chain(replicas.iter().map(|s| {
                (
                    s.name.as_str(),
                    &s.leaves,
                    &s.dev as &dyn ferry_nbd::BlockDevice,
                )
            }))
            .collect();
        for (name, leaves, dev) in all {
            match leaves.refresh(dev, budget) {
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) => tracing::warn!(volume = %name, error = %e, "merkle.refresh_failed"),
            }
            if scrub > 0 && leaves.stale_blocks() == 0 {
                match leaves.scrub(dev, scrub) {
                    Ok((n, changed)) => {
                        scrub = scrub.saturating_sub(n);
                        if changed > 0 {
                            tracing::warn!(volume = %name, blocks = changed,
                                "merkle.scrub.changed: blocks changed without a write through ferry; their leaves are corrected");
                        }
                    }
                    Err(e) => tracing::warn!(volume = %name, error = %e, "merkle.scrub_failed"),
                }
            }
        }
    }
}

async fn housekeeping(ctx: Arc<AgentCtx>) {
    let mut tick = 0u64;
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        let active: Vec<String> = ctx
            .migrations()
            .values()
            .filter(|m| !m.state.phase.is_final())
            .map(|m| m.workload.to_string())
            .collect();
        for w in active {
            let c = ctx.clone();
            let _ = tokio::task::spawn_blocking(move || crate::migration::sample(&c, &w)).await;
        }
        for v in ctx.primaries() {
            let (sent, dirty) = {
                let l = v.link.lock();
                (
                    l.stats.copy_bytes_sent + l.stats.write_bytes_sent,
                    l.rep.dirty_map().dirty_blocks(),
                )
            };
            let prev = last.insert(v.name.clone(), (sent, dirty));
            if let Some((p, _)) = prev {
                let inst = sent.saturating_sub(p) as f64;
                let mut l = v.link.lock();
                l.stats.rate_bytes_per_s = 0.5 * l.stats.rate_bytes_per_s + 0.5 * inst;
            }
            if tick % 5 == 0 && prev.is_some_and(|(_, d)| d != dirty) {
                let v = v.clone();
                let _ = tokio::task::spawn_blocking(move || v.save_dirty_map(true)).await;
            }
            if tick % 5 == 0 {
                let v = v.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = v.seeds.save() {
                        tracing::warn!(volume = %v.name, error = %e, "volume.seeds.save_failed: retried in 5 s; a crash until then recovers the blocks from the activity log");
                    }
                })
                .await;
            }
        }
    }
}
