//! The slow side of the cluster manager. The heartbeat thread (`cluster-hb`,
//! [`super::Manager`]) does no I/O but its UDP sockets: everything it needs
//! is read here, by normal threads that may wait on the disk or on a
//! volume's locks, and pushed to it over a channel ([`ToHb`]):
//!
//! - the **feed** thread (`cluster-feed`) reads the HA records
//!   (`DATA_DIR/cluster/W.json`), the workloads' definitions, the standby
//!   flag and the peer's heartbeat key and addresses every 250 ms (at once
//!   when poked: [`super::ClusterView::refresh_soon`]), starts each new
//!   workload's worker and check threads before handing it over
//!   ([`ToHb::Add`]), and every 20 ms reports each workload's data and link
//!   states ([`ToHb::Data`]); it also starts the threads the heartbeat
//!   thread asks for ([`ToFeed::Spawn`]: failback, split-brain policies);
//! - the **persister** thread (`cluster-persist`) writes the state the
//!   machine asks to keep ([`ferry_core::cluster::Action::Persist`]) into
//!   the workload's HA record, durably, in the order asked, and answers
//!   [`ToHb::Persisted`]; the heartbeat thread holds back that workload's
//!   actions after the persist until then.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferry_core::cluster::{
    copy_state, members_in_sync, DataState, Input, Member, Persisted, Policy,
};
use ferry_core::link::ReplicaState;

use super::Host;
use super::{HaWorkload, Job};
use crate::config::ClusterSettings;
use crate::handover::Node;
use crate::workload::WorkloadSpec;

/// How often the feed reads the records again (unless poked).
const REFRESH_INTERVAL_MS: u64 = 250;
/// How often the feed reports the workloads' data and link states.
const DATA_INTERVAL_MS: u64 = 20;

/// What the heartbeat thread is told. It never reads a file: all it knows
/// of the node arrives here.
pub(super) enum ToHb {
    /// The peer's heartbeat key and addresses changed (`None`: the peer is
    /// not registered).
    Peer(Option<PeerLink>),
    /// This node entered or left standby.
    Standby(bool),
    /// A workload put under HA here (its threads already run).
    Add(Box<NewWorkload>),
    /// A workload's HA record is gone: it leaves HA.
    Remove(String),
    /// A workload's data and link states, every [`DATA_INTERVAL_MS`].
    Data(String, DataReport),
    /// The persist `seq` of `workload` is durable (`ok`), or failed.
    Persisted {
        workload: String,
        seq: u64,
        ok: bool,
    },
    /// An input for a workload's state machine from a thread doing its
    /// I/O: a check hook's result, the peer's split-brain report, the end
    /// of a failback or of a split-brain resolution.
    Input(String, Input),
}

/// What the heartbeat thread needs of the peer's record.
pub(super) struct PeerLink {
    /// The heartbeat key (`None`: the record's key is not valid hex).
    pub key: Option<ring::hmac::Key>,
    /// The peer's heartbeat listeners, by index (`None`: not an address).
    pub addrs: Vec<Option<SocketAddr>>,
    /// The cluster id derived from the key.
    pub cluster_id: Option<String>,
}

/// A workload newly under HA, with everything its state machine starts from.
pub(super) struct NewWorkload {
    pub record: HaWorkload,
    pub policy: Policy,
    pub data: DataState,
    pub volumes: Vec<String>,
    pub shares: Vec<String>,
    /// The state machine's nonce key (randomness is drawn here).
    pub nonce_key: u64,
    /// The workload's worker thread.
    pub jobs: mpsc::Sender<Job>,
    /// Read by the check thread.
    pub serving_flag: Arc<AtomicBool>,
    pub stop_checks: Arc<AtomicBool>,
    /// Disk I/O errors of its volumes so far.
    pub io_errors_seen: u64,
}

/// A workload's data and link states.
pub(super) struct DataReport {
    /// The worker's promotions and demotions done before this was sampled.
    pub role_changes_done: u64,
    /// This node's copy as a replica ([`copy_state`] of the members).
    pub data: DataState,
    /// Every volume and share, as its link here reports it: the state
    /// machine takes the in-sync verdict from it ([`members_in_sync`]).
    pub members: Vec<Member>,
    /// The newest sign of life on the replication connections ([`mono_ms`]).
    ///
    /// [`mono_ms`]: crate::volume::primary::mono_ms
    pub link_seen_ms: Option<u64>,
    /// Disk I/O errors of its primary volumes so far.
    pub io_errors: u64,
    /// A volume refuses, or is refused, as split brain.
    pub split_brain: bool,
    /// Bytes this copy may hold that the peer's does not (status).
    pub changed_bytes: u64,
}

/// Asked of the feed thread.
pub(super) enum ToFeed {
    /// Start a thread running this (the heartbeat thread starts none).
    Spawn(&'static str, Box<dyn FnOnce() + Send>),
    /// Read the records now (something changed).
    Refresh,
}

/// A persist asked by the heartbeat thread.
pub(super) struct PersistRequest {
    pub workload: String,
    pub seq: u64,
    pub state: Persisted,
}

/// A workload the feed handed to the heartbeat thread.
struct Known {
    spec: Option<WorkloadSpec>,
    /// Counted by its worker thread.
    role_changes_done: Arc<AtomicU64>,
}

pub(super) struct Feed {
    ctx: Arc<dyn Host>,
    cfg: ClusterSettings,
    tx: mpsc::Sender<ToHb>,
    rx: mpsc::Receiver<ToFeed>,
    known: BTreeMap<String, Known>,
    /// The peer's (heartbeat key, listeners) last sent.
    peer_sent: Option<Option<(String, Vec<String>)>>,
    standby_sent: Option<bool>,
}

impl Feed {
    pub(super) fn new(
        ctx: Arc<dyn Host>,
        cfg: ClusterSettings,
        tx: mpsc::Sender<ToHb>,
        rx: mpsc::Receiver<ToFeed>,
    ) -> Feed {
        Feed {
            ctx,
            cfg,
            tx,
            rx,
            known: BTreeMap::new(),
            peer_sent: None,
            standby_sent: None,
        }
    }

    /// Runs until the heartbeat thread is gone.
    pub(super) fn run(mut self) {
        let mut last_refresh = None::<Instant>;
        let mut refresh = true;
        loop {
            if refresh
                || last_refresh
                    .is_none_or(|t| t.elapsed() >= Duration::from_millis(REFRESH_INTERVAL_MS))
            {
                refresh = false;
                last_refresh = Some(Instant::now());
                if !self.refresh() {
                    return;
                }
            }
            if !self.report() {
                return;
            }
            let until = Instant::now() + Duration::from_millis(DATA_INTERVAL_MS);
            loop {
                let left = until.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(ToFeed::Spawn(name, f)) => {
                        if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
                            tracing::error!(thread = name, error = %e, "cluster.spawn_failed");
                        }
                    }
                    Ok(ToFeed::Refresh) => refresh = true,
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    fn set_state(&self, s: &str) {
        let mut st = self
            .ctx
            .cluster()
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *st != s {
            *st = s.to_string();
            drop(st);
            tracing::info!(state = s, peer = %self.cfg.peer, "cluster.state");
        }
    }

    fn send(&self, m: ToHb) -> bool {
        self.tx.send(m).is_ok()
    }

    /// Reads the peer, the standby flag and the records; hands new
    /// workloads over and takes removed ones back. `false`: the heartbeat
    /// thread is gone.
    fn refresh(&mut self) -> bool {
        let data_dir = self.ctx.cfg().data_dir.clone();
        let Some(peer) = self.ctx.peers().get(&self.cfg.peer) else {
            self.set_state("waiting-for-peer");
            if self.peer_sent != Some(None) {
                self.peer_sent = Some(None);
                return self.send(ToHb::Peer(None));
            }
            return true;
        };
        self.set_state("running");
        let seen = Some((peer.heartbeat_key.clone(), peer.heartbeat.clone()));
        if self.peer_sent.as_ref() != Some(&seen) {
            self.peer_sent = Some(seen);
            let link = PeerLink {
                key: super::hmac_key(&peer.heartbeat_key),
                addrs: peer.heartbeat.iter().map(|a| a.parse().ok()).collect(),
                cluster_id: super::cluster_id(&peer.heartbeat_key),
            };
            if !self.send(ToHb::Peer(Some(link))) {
                return false;
            }
        }
        let standby = super::in_standby(&data_dir);
        if self.standby_sent != Some(standby) {
            self.standby_sent = Some(standby);
            if !self.send(ToHb::Standby(standby)) {
                return false;
            }
        }
        // A workload leaves HA only when its record file is gone: a read
        // error or a damaged record must not drop it (heartbeats and
        // fencing would stop while its volumes stay open).
        let Ok(entries) = std::fs::read_dir(super::dir(&data_dir)) else {
            return true;
        };
        let names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(String::from)
            })
            .collect();
        let all = super::load_all(&data_dir, Some(self.ctx.damaged()));
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|w| !names.contains(w))
            .cloned()
            .collect();
        for w in gone {
            self.known.remove(&w);
            if !self.send(ToHb::Remove(w)) {
                return false;
            }
        }
        for h in all {
            let spec = crate::workload::load_workload(&data_dir, &h.workload)
                .ok()
                .flatten();
            if let Some(k) = self.known.get_mut(h.workload.as_str()) {
                k.spec = spec;
                continue;
            }
            let Some(spec) = spec else {
                tracing::warn!(workload = %h.workload, "cluster.workload_missing: no workload definition here yet");
                continue;
            };
            let role_changes_done = Arc::new(AtomicU64::new(0));
            let Some(new) = self.start_workload(&h, &spec, &role_changes_done) else {
                continue;
            };
            self.known.insert(
                h.workload.to_string(),
                Known {
                    spec: Some(spec),
                    role_changes_done,
                },
            );
            if !self.send(ToHb::Add(Box::new(new))) {
                return false;
            }
        }
        true
    }

    /// A workload newly under HA: its worker and check threads started,
    /// and what its state machine starts from.
    fn start_workload(
        &self,
        h: &HaWorkload,
        spec: &WorkloadSpec,
        role_changes_done: &Arc<AtomicU64>,
    ) -> Option<NewWorkload> {
        let ctx = &self.ctx;
        let sync = spec.volumes.iter().all(|v| volume_mode_sync(ctx, v))
            && spec.shares.iter().all(|n| share_mode_sync(ctx, n));
        let policy = Policy {
            witness: self.cfg.witness.is_some(),
            two_node_unsafe: self.cfg.two_node_unsafe,
            sync,
            async_accept_loss: h.accept_loss,
        };
        let (jobs, rx) = mpsc::channel();
        let (c, name, peer) = (ctx.clone(), h.workload.to_string(), self.cfg.peer.clone());
        let done = role_changes_done.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(format!("cluster-{name}"))
            .spawn(move || super::worker(&c, &name, &peer, rx, &done))
        {
            tracing::error!(workload = %h.workload, error = %e, "cluster.worker_failed");
            return None;
        }
        let serving_flag = Arc::new(AtomicBool::new(false));
        let stop_checks = Arc::new(AtomicBool::new(false));
        if spec.check.is_some() {
            let (c, name) = (ctx.clone(), h.workload.to_string());
            let (serving, stop) = (serving_flag.clone(), stop_checks.clone());
            let (tx, cfg) = (self.tx.clone(), self.cfg.clone());
            let _ = std::thread::Builder::new()
                .name(format!("check-{name}"))
                .spawn(move || super::checker(&c, &cfg, &name, &serving, &stop, &tx));
        }
        Some(NewWorkload {
            record: h.clone(),
            policy,
            data: copy_state(&members(ctx, spec)),
            volumes: crate::workload::names(&spec.volumes),
            shares: crate::workload::names(&spec.shares),
            nonce_key: crate::transport::identity::random_u64(),
            jobs,
            serving_flag,
            stop_checks,
            io_errors_seen: spec
                .volumes
                .iter()
                .filter_map(|v| ctx.primary(v))
                .map(|p| p.io_errors.load(Ordering::Relaxed))
                .sum(),
        })
    }

    /// Reports every workload's data and link states, and answers the
    /// writes its volumes parked once they may be. `false`: the heartbeat
    /// thread is gone.
    fn report(&self) -> bool {
        for (w, k) in &self.known {
            let Some(spec) = &k.spec else {
                continue;
            };
            let r = data_report(&self.ctx, spec, &k.role_changes_done);
            if !self.send(ToHb::Data(w.clone(), r)) {
                return false;
            }
        }
        true
    }
}

/// One workload's data and link states. Also feeds the volumes the link's
/// view and answers parked writes that may be answered: the permit itself
/// is set by the heartbeat thread, from its state machine.
fn data_report<H: Host + ?Sized>(ctx: &H, spec: &WorkloadSpec, done: &AtomicU64) -> DataReport {
    // Read first: what follows saw at least these role changes done.
    let role_changes_done = done.load(Ordering::SeqCst);
    let members = members(ctx, spec);
    let data = copy_state(&members);
    let prims: Vec<_> = spec.volumes.iter().filter_map(|v| ctx.primary(v)).collect();
    let share_prims: Vec<_> = spec
        .shares
        .iter()
        .filter_map(|n| ctx.shares().primary(n))
        .collect();
    // The same verdict the state machine takes from the same report.
    let in_sync = members_in_sync(&members);
    // The replication connection is one more heartbeat path.
    let now = crate::volume::primary::mono_ms();
    let link_seen_ms = spec
        .volumes
        .iter()
        .filter_map(|v| {
            if let Some(p) = ctx.primary(v) {
                return p.link.lock().stats.last_rx;
            }
            ctx.replica(v)
                .and_then(|s| *s.last_rx.lock().unwrap_or_else(|p| p.into_inner()))
        })
        .max()
        .map(|t| now.saturating_sub(t.elapsed().as_millis() as u64));
    for p in &prims {
        p.alone.set_peer_in_sync(in_sync);
        p.release_parked(in_sync);
    }
    for p in &share_prims {
        p.release_parked(in_sync);
    }
    DataReport {
        role_changes_done,
        data,
        members,
        link_seen_ms,
        io_errors: prims
            .iter()
            .map(|p| p.io_errors.load(Ordering::Relaxed))
            .sum(),
        split_brain: split_brain(ctx, spec),
        changed_bytes: changed_bytes(ctx, spec),
    }
}

/// Whether a volume of the workload refuses, or is refused, as split brain.
fn split_brain<H: Host + ?Sized>(ctx: &H, spec: &WorkloadSpec) -> bool {
    spec.volumes.iter().any(|v| {
        if let Some(p) = ctx.primary(v) {
            return p.link.lock().stats.split_brain;
        }
        ctx.replica(v).is_some_and(|s| {
            s.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                .is_some_and(|e| e.starts_with("split brain"))
        })
    })
}

/// Bytes this node's copy may hold that the peer's does not: the dirty
/// maps of its primaries, or the suspect maps of its replicas.
fn changed_bytes<H: Host + ?Sized>(ctx: &H, spec: &WorkloadSpec) -> u64 {
    let g = ctx.cfg().replication.granularity_bytes;
    spec.volumes
        .iter()
        .map(|v| {
            if let Some(p) = ctx.primary(v) {
                return p.link.lock().rep.dirty_map().dirty_bytes();
            }
            ctx.replica(v)
                .and_then(|s| {
                    let size = ferry_nbd::BlockDevice::size(&s.dev);
                    crate::volume::meta::load_suspect_map(&s.dir)
                        .and_then(|b| ferry_core::DirtyMap::decode(&b, size, g).ok())
                })
                .map_or(0, |m| m.dirty_bytes())
        })
        .sum()
}

fn volume_mode_sync<H: Host + ?Sized>(ctx: &H, v: &str) -> bool {
    let mode = if let Some(p) = ctx.primary(v) {
        p.meta_state().mode
    } else if let Some(s) = ctx.replica(v) {
        s.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state()
            .mode
    } else {
        return true;
    };
    mode == ferry_core::link::Mode::Sync
}

fn share_mode_sync<H: Host + ?Sized>(ctx: &H, name: &str) -> bool {
    crate::share::ShareStore::new(&ctx.cfg().data_dir)
        .load(name)
        .map(|r| r.mode == "sync")
        .unwrap_or(true)
}

/// The workload's volumes and shares as this node's copies and links
/// report them (the verdicts are ferry-core's: [`members_in_sync`],
/// [`copy_state`]).
fn members<H: Host + ?Sized>(ctx: &H, spec: &WorkloadSpec) -> Vec<Member> {
    let volumes = spec.volumes.iter().map(|v| {
        if let Some(p) = ctx.primary(v) {
            let l = p.link.lock();
            return Member {
                primary_here: true,
                streaming: l.rep.phase() == ferry_core::link::Phase::Streaming,
                peer_up_to_date: l.rep.replica_state() == ReplicaState::UpToDate,
                usable_here: true,
            };
        }
        Member {
            primary_here: false,
            streaming: false,
            peer_up_to_date: false,
            usable_here: ctx.replica(v).is_some_and(|s| {
                s.meta
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .state()
                    .consistent
            }),
        }
    });
    let shares = spec.shares.iter().map(|n| match ctx.shares().primary(n) {
        // A share's link has no phase of its own: up to date is streaming.
        Some(p) => {
            let up = p.link().up_to_date;
            Member {
                primary_here: true,
                streaming: up,
                peer_up_to_date: up,
                usable_here: true,
            }
        }
        None => Member {
            primary_here: false,
            streaming: false,
            peer_up_to_date: false,
            usable_here: crate::share::usable_here(ctx, n),
        },
    });
    volumes.chain(shares).collect()
}

/// The persister thread: writes each state asked for into the workload's
/// HA record (atomically, file and directory synced), in the order asked,
/// and says when it is durable.
pub(super) fn persister(
    data_dir: &Path,
    rx: mpsc::Receiver<PersistRequest>,
    tx: mpsc::Sender<ToHb>,
) {
    for r in rx {
        let ok = match super::save_state(data_dir, &r.workload, r.state) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(workload = %r.workload, error = %format!("{e:#}"), "cluster.persist_failed: not acting on it");
                false
            }
        };
        let done = ToHb::Persisted {
            workload: r.workload,
            seq: r.seq,
            ok,
        };
        if tx.send(done).is_err() {
            return;
        }
    }
}
