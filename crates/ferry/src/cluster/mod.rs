//! The HA cluster manager: runs `ferry_core::cluster::ClusterNode` for each
//! workload under HA (`DATA_DIR/cluster/WORKLOAD.json`) and performs its
//! actions.
//!
//! - One dedicated thread (`cluster-hb`) sends and receives heartbeats (UDP,
//!   every configured path, HMAC-SHA256 with the key made at pairing), talks
//!   to the witness (UDP), ticks the state machines every few milliseconds
//!   and applies the fast part of fencing (freezing the volumes' write gate)
//!   itself. It locks its memory and runs at real-time priority where
//!   allowed (`mlockall`, `SCHED_RR`), as corosync does, so load on the node
//!   cannot starve it into a false failover.
//! - It does no I/O but its sockets, so a slow disk cannot delay it either:
//!   the records, workload definitions, standby flag, peer key and the
//!   volumes' states are read by the `cluster-feed` thread and pushed to it,
//!   and what it decides to keep is written by the `cluster-persist` thread
//!   while that workload's later actions wait (see `feed` and
//!   `Manager::perform`); its log lines are queued to a logger thread.
//! - Slow actions (promotion, demotion, hooks, the virtual IP) run on one
//!   worker thread per workload, in order.
//! - Outdate before going alone is enforced in the write path:
//!   `PrimaryVolume::alone` is required for sync volumes under HA with a
//!   witness and granted from the state machine.
//! - Replays: the state machine counts a heartbeat or a witness reply only
//!   if it is fresh (nonces, incarnations: `ferry_core::cluster::Nonces`).
//!   This module supplies the randomness (a nonce key per workload per
//!   start) and the incarnation, a counter in `DATA_DIR/cluster-incarnation`
//!   incremented and fsynced before the heartbeat thread starts (the thread
//!   itself never touches the disk for it).
//! - The witness keeps one record per (cluster id, workload): the cluster
//!   id is derived from the heartbeat key both nodes got at pairing
//!   ([`cluster_id`]), so it is the same on both and differs between
//!   clusters.

mod feed;
pub mod witness;

mod host;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::cluster::{
    Action, ClusterNode, DataState, Event, Input, PeerMsg, Persisted, Role, Rules, Timing,
};
use ferry_core::split_brain::{SideReport, SplitBrainPolicy, Verdict};
use ferry_core::Name;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::ClusterSettings;
use crate::handover::Node;
use crate::workload::WorkloadSpec;
use feed::{DataReport, NewWorkload, PeerLink, PersistRequest, ToFeed, ToHb};
pub use host::Host;
use witness::{FromWitness, ToWitness, DATAGRAM_BYTES_MAX};

/// A workload under HA on this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HaWorkload {
    pub workload: Name,
    pub preferred: String,
    /// An async workload fails over automatically, losing what had not
    /// reached the replica (`async_failover = "accept-loss"`).
    #[serde(default)]
    pub accept_loss: bool,
    pub state: Persisted,
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster")
}

/// Every HA record here; a damaged one is left out and, given `damaged`,
/// reported there.
pub fn load_all(
    data_dir: &Path,
    damaged: Option<&crate::store::damaged::Damaged>,
) -> Vec<HaWorkload> {
    let Ok(entries) = std::fs::read_dir(dir(data_dir)) else {
        return Vec::new();
    };
    let mut v: Vec<HaWorkload> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            match crate::store::load::<HaWorkload>(&e.path()) {
                Ok(h) => h,
                Err(err) => {
                    let name = e.file_name().to_string_lossy().trim_end_matches(".json").to_string();
                    match damaged {
                        Some(d) => d.report("cluster-record", &name, &e.path(), err.to_string()),
                        None => tracing::error!(path = %e.path().display(), error = %err, "cluster.record_damaged"),
                    }
                    None
                }
            }
        })
        .collect();
    v.sort_by(|a, b| a.workload.cmp(&b.workload));
    v
}

/// `cluster/WORKLOAD.json`: only a checked name becomes a path.
fn record_path(data_dir: &Path, workload: &Name) -> PathBuf {
    dir(data_dir).join(format!("{workload}.json"))
}

pub fn load(data_dir: &Path, workload: &str) -> Option<HaWorkload> {
    crate::store::load(&record_path(data_dir, &Name::parse(workload).ok()?))
        .ok()
        .flatten()
}

/// Serialises changes to the HA records (an operator's `cluster add` and
/// `remove`, the persister's state changes). Held across disk I/O: never
/// taken by the heartbeat thread.
static RECORDS: Mutex<()> = Mutex::new(());

fn records_lock() -> std::sync::MutexGuard<'static, ()> {
    RECORDS.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn save(data_dir: &Path, h: &HaWorkload) -> Result<()> {
    let _g = records_lock();
    save_locked(data_dir, h)
}

fn save_locked(data_dir: &Path, h: &HaWorkload) -> Result<()> {
    std::fs::create_dir_all(dir(data_dir))?;
    Ok(crate::store::save(&record_path(data_dir, &h.workload), h)?)
}

impl crate::store::Record for HaWorkload {
    const KIND: &'static str = "ha";
}

/// The persister's write: the state the state machine keeps, into the
/// workload's record (which must exist and be readable).
fn save_state(data_dir: &Path, workload: &str, state: Persisted) -> Result<()> {
    let _g = records_lock();
    let mut h =
        load(data_dir, workload).ok_or_else(|| anyhow!("its HA record is missing or damaged"))?;
    h.state = state;
    save_locked(data_dir, &h)
}

pub fn remove(data_dir: &Path, workload: &str) -> Result<bool> {
    let _g = records_lock();
    match std::fs::remove_file(record_path(data_dir, &Name::parse(workload)?)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether `volume` belongs to a workload under HA here: such a volume is
/// loaded frozen, and serves only once the cluster holds a lease.
pub fn is_ha_volume(data_dir: &Path, volume: &str) -> bool {
    load_all(data_dir, None).iter().any(|h| {
        crate::workload::load_workload(data_dir, &h.workload)
            .ok()
            .flatten()
            .is_some_and(|s| s.volumes.iter().any(|v| v == volume))
    })
}

fn standby_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster.standby")
}

/// Whether this node is in standby (maintenance: takes no workload over).
pub fn in_standby(data_dir: &Path) -> bool {
    standby_path(data_dir).exists()
}

/// `ferry cluster standby|unstandby` on this node: the flag is written
/// durably first (so no failover lands here meanwhile), then every workload
/// served here is switched over to the peer.
pub fn set_standby<H: Host + ?Sized>(ctx: &Arc<H>, on: bool) -> Result<Value> {
    let path = standby_path(&ctx.cfg().data_dir);
    if on {
        crate::store::write_private(&path, b"standby\n")?;
    } else if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e.into());
        }
    }
    tracing::info!(node = %ctx.identity().node_name, standby = on, "cluster.standby");
    ctx.cluster().refresh_soon();
    let mut moved = Vec::new();
    if on {
        // Let the manager see the flag before anything moves.
        std::thread::sleep(Duration::from_millis(300));
        let served: Vec<String> = ctx
            .cluster()
            .workloads()
            .values()
            .filter(|w| w["primary"] == ctx.identity().node_name.as_str())
            .filter_map(|w| w["workload"].as_str().map(String::from))
            .collect();
        for w in served {
            moved.push(switchover(ctx, &w).map_err(|e| {
                e.context(format!(
                    "node in standby, but workload {w:?} could not be moved"
                ))
            })?);
        }
    }
    Ok(json!({"node": ctx.identity().node_name, "standby": on, "moved": moved}))
}

/// What `ferry cluster status` shows, kept by the manager thread.
#[derive(Debug, Default)]
pub struct ClusterView {
    workloads: Mutex<BTreeMap<String, Value>>,
    pub state: Mutex<String>,
    /// To the manager: (workload, why) — hand the workload over.
    resign: Mutex<Option<mpsc::Sender<(String, String)>>>,
    /// To the manager: workloads an operator (or, `true`, the peer's
    /// split-brain policy) promotes here with `--force`.
    force: Mutex<Option<mpsc::Sender<(String, bool)>>>,
    /// To the manager's feed thread (which reads what the heartbeat thread
    /// needs from disk).
    feed: Mutex<Option<mpsc::Sender<ToFeed>>>,
    /// Workloads handed over by a verified switchover: their demotion keeps
    /// no suspect blocks (both copies were proven equal).
    clean_handover: Mutex<std::collections::HashSet<String>>,
    /// Workloads whose copy here a split-brain policy discarded: their
    /// demotion rebases the history on the new primary's.
    discard_on_demote: Mutex<std::collections::HashSet<String>>,
    /// Volumes of workloads this node asked the witness to promote it for:
    /// their copies must not change until it answers (no inbound resync).
    candidate_volumes: Mutex<std::collections::HashSet<String>>,
    /// When a signed answer of the witness last arrived (Unix ms; 0: none).
    witness_answered_unix_ms: std::sync::atomic::AtomicU64,
}

impl ClusterView {
    /// Whether `volume` belongs to a workload whose promotion this node asked for.
    pub fn is_candidate_volume(&self, volume: &str) -> bool {
        self.candidate_volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(volume)
    }

    /// Asks the manager to read its records and flags again now, rather
    /// than at its next periodic look.
    fn refresh_soon(&self) {
        if let Some(tx) = &*self.feed.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(ToFeed::Refresh);
        }
    }

    /// Asks the manager to hand `workload` over (it resigns), saying why.
    fn request_resign(&self, workload: &str, why: String) -> Result<()> {
        let tx = self
            .resign
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| anyhow!("the cluster manager is not running"))?;
        tx.send((workload.to_string(), why))
            .map_err(|_| anyhow!("the cluster manager stopped"))
    }

    /// The per-workload status the manager publishes.
    pub fn workloads(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Value>> {
        self.workloads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One workload's published status; an error names it when it is not under HA here.
    pub fn workload(&self, workload: &str) -> Result<Value> {
        let now = crate::volume::primary::mono_ms();
        self.workloads()
            .get(workload)
            .map(|v| as_of(v.clone(), now))
            .ok_or_else(|| anyhow!("workload {workload:?} is not under HA on this node"))
    }

    /// Remembers `workload` in one of the view's sets.
    fn mark(set: &Mutex<std::collections::HashSet<String>>, workload: &str) {
        set.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(workload.to_string());
    }

    /// `ferry cluster status`: what the manager published, with the copies
    /// split-brain resolutions keep here read now (files: the request's
    /// thread reads them, not the heartbeat thread, and a copy made just
    /// before is listed).
    pub fn json<H: Host + ?Sized>(&self, ctx: &H) -> Value {
        let now = crate::volume::primary::mono_ms();
        let mut w: Vec<Value> = self
            .workloads()
            .values()
            .map(|v| as_of(v.clone(), now))
            .collect();
        for v in &mut w {
            let spec = v["workload"].as_str().and_then(|name| {
                crate::workload::load_workload(&ctx.cfg().data_dir, name)
                    .ok()
                    .flatten()
            });
            // Where its VM is (a live switchover's check waits for
            // `running` at the peer).
            let vms = &ctx.hook_env().vms;
            v["vm"] = match &spec {
                Some(s) if s.vm.is_some() && vms.is_running(&s.name) => {
                    json!(if vms.is_incoming(&s.name) {
                        "incoming"
                    } else {
                        "running"
                    })
                }
                _ => Value::Null,
            };
            v["copies"] = json!(spec.map(|s| kept_copies(ctx, &s)).unwrap_or_default());
        }
        let witness = ctx.cfg().cluster.as_ref().and_then(|c| {
            let addr = c.witness?;
            let at = self
                .witness_answered_unix_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            let lease = c.lease_ms.unwrap_or(c.failure_timeout_ms);
            let now = crate::sys::unix_ms();
            Some(json!({
                "address": addr.to_string(),
                "answered_unix_ms": (at > 0).then_some(at),
                "up": at > 0 && now.saturating_sub(at) <= lease,
            }))
        });
        json!({
            "node": ctx.identity().node_name,
            "standby": in_standby(&ctx.cfg().data_dir),
            "state": self.state.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "configured": ctx.cfg().cluster.is_some(),
            "witness": witness,
            "workloads": w,
            "damaged": ctx.damaged().list(),
        })
    }
}

/// A published status's private field: until when (`mono_ms`) its claim
/// that this node serves holds — the write gate's deadline (the lease less
/// the fence margin). Absent when no lease is needed.
const SERVING_UNTIL: &str = "serving_until_mono_ms";

/// A published status as of `now`: a snapshot published before the manager
/// stalled (a paused process answers requests the moment it resumes, before
/// its first tick) must not say this node serves once its lease is over.
fn as_of(mut v: Value, now: u64) -> Value {
    let until = v
        .as_object_mut()
        .and_then(|o| o.remove(SERVING_UNTIL))
        .and_then(|u| u.as_u64());
    if until.is_some_and(|until| now >= until) {
        v["primary"] = Value::Null;
    }
    v
}

/// Events waiting for the notify hook at most.
const NOTIFY_QUEUE_EVENTS_MAX: usize = 256;
/// Datagrams read per socket per loop (the rest wait for the next turn).
const DATAGRAMS_PER_TURN_MAX: usize = 256;

/// Slow actions, run in order on a workload's worker thread.
#[derive(Debug)]
pub(super) enum Job {
    Fence,
    Resume,
    /// `handed_over`: the peer had resigned (its last heartbeat said so),
    /// so a VM it moved here live may continue.
    Promote {
        force: bool,
        handed_over: bool,
    },
    Demote,
}

/// Something the heartbeat thread holds back until a persist before it is
/// durable (see [`Manager::perform`]).
enum Step {
    /// Waits for persist `seq`.
    Durable(u64),
    /// An action the state machine asked for `at`; `batch` is the persist
    /// of its own batch, if any: if that one fails, the action is dropped.
    Act {
        action: Action,
        batch: Option<u64>,
        at: Instant,
    },
    /// The serving edge's Resume job.
    Resume,
}

struct Slot {
    node: ClusterNode,
    accept_loss: bool,
    preferred: String,
    jobs: mpsc::Sender<Job>,
    events: VecDeque<Value>,
    /// When the peer was last heard, for detection-time reports.
    peer_lost_at: Option<Instant>,
    /// Accepting writes at the last look: the edge to serving sends Resume.
    serving: bool,
    /// The workload's volumes and shares (from its definition when it was
    /// picked up).
    volumes: Vec<String>,
    shares: Vec<String>,
    /// A candidacy at the last look (its volumes refuse inbound resyncs).
    candidate: bool,
    /// The same, for the check thread; and its stop flag.
    serving_flag: Arc<AtomicBool>,
    stop_checks: Arc<AtomicBool>,
    /// The newest sign of life from the replication link already fed.
    link_seen_ms: u64,
    /// How long the peer was silent when the last failover started.
    detection_ms: Option<u64>,
    /// Actions waiting for a persist to be durable, in order.
    held: VecDeque<Step>,
    /// When its status was last published.
    published_at: Instant,
    /// Promotions and demotions sent to the worker (it counts those done
    /// in the data reports: `DataReport::role_changes_done`).
    role_changes_sent: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stop_checks.store(true, Ordering::SeqCst);
    }
}

/// The file holding this node's run counter.
fn incarnation_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster-incarnation")
}

/// This run's incarnation: one more than the last run's, and at least the
/// wall clock in seconds (so a lost or restored counter file still moves
/// forward), written durably before it is used. Heartbeats and witness
/// requests are ordered by (incarnation, sent_at): a datagram of an
/// earlier run is older than every one of this run.
pub fn next_incarnation(data_dir: &Path) -> u64 {
    let path = incarnation_path(data_dir);
    let stored = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let next = stored.saturating_add(1).max(wall);
    if let Err(e) = crate::store::write_private(&path, format!("{next}\n").as_bytes()) {
        // The wall-clock floor still orders runs more than a second apart.
        tracing::error!(path = %path.display(), error = %format!("{e:#}"), "cluster.incarnation_not_saved");
    }
    next
}

/// The cluster id the witness keys its records by: the same on both nodes
/// (derived from the heartbeat key made at pairing, which both hold and a
/// re-pairing keeps), different for every pair of nodes, and revealing
/// nothing of the key (HMAC-SHA256 of a fixed label, 128 bits in hex).
pub fn cluster_id(heartbeat_key_hex: &str) -> Option<String> {
    let key = hmac_key(heartbeat_key_hex)?;
    let tag = ring::hmac::sign(&key, b"ferry cluster id v1");
    Some(
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Starts the manager if `[cluster]` is configured: the heartbeat thread,
/// and the feed and persister threads that do its I/O (`feed`).
pub fn spawn(ctx: Arc<dyn Host>) -> Result<()> {
    let Some(cfg) = ctx.cfg().cluster.clone() else {
        return Ok(());
    };
    if cfg.heartbeat.is_empty() {
        bail!("`cluster.heartbeat` must list at least one address to receive heartbeats on");
    }
    // The witness's key is mandatory: without it anyone who can send UDP
    // could forge leases and promotions.
    let witness = match cfg.witness {
        Some(addr) => {
            let path = cfg.witness_key_file.as_deref().ok_or_else(|| {
                anyhow!(
                    "key `cluster.witness_key_file` is missing: a witness needs the key its `ferry witness --key-file` uses; {}",
                    witness::MAKE_KEY
                )
            })?;
            Some(Arc::new((addr, witness::load_key(path)?)))
        }
        None => None,
    };
    let incarnation = next_incarnation(&ctx.cfg().data_dir);
    let mut socks = Vec::new();
    for a in &cfg.heartbeat {
        let s =
            UdpSocket::bind(a).with_context(|| format!("cannot listen for heartbeats on {a}"))?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    let wsock = UdpSocket::bind(SocketAddr::new(cfg.heartbeat[0].ip(), 0))?;
    wsock.set_nonblocking(true)?;
    // The heartbeat thread's log lines go through the logger thread.
    crate::sys::logging::start();
    let (to_hb, hb_rx) = mpsc::channel();
    let (to_feed, feed_rx) = mpsc::channel();
    let (to_persister, persist_rx) = mpsc::channel();
    let (resign_tx, resign_rx) = mpsc::channel();
    *ctx.cluster()
        .resign
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(resign_tx.clone());
    *ctx.cluster().feed.lock().unwrap_or_else(|p| p.into_inner()) = Some(to_feed.clone());
    let (force_tx, force_rx) = mpsc::channel();
    *ctx.cluster()
        .force
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(force_tx);
    let data_dir = ctx.cfg().data_dir.clone();
    let to_self = to_hb.clone();
    let tx = to_hb.clone();
    std::thread::Builder::new()
        .name("cluster-persist".into())
        .spawn(move || feed::persister(&data_dir, persist_rx, tx))?;
    let f = feed::Feed::new(ctx.clone(), cfg.clone(), to_hb, feed_rx);
    std::thread::Builder::new()
        .name("cluster-feed".into())
        .spawn(move || f.run())?;
    let notify = cfg.notify.clone().and_then(|cmd| {
        // Bounded: a slow hook loses events (logged) rather than memory.
        let (tx, rx) = mpsc::sync_channel::<Value>(NOTIFY_QUEUE_EVENTS_MAX);
        std::thread::Builder::new()
            .name("cluster-notify".into())
            .spawn(move || {
                for ev in rx {
                    let run = crate::workload::run_hook(
                        "notify",
                        &cmd,
                        Duration::from_secs(10),
                        &[("FERRY_EVENT", &ev.to_string())],
                    );
                    if !run.ok {
                        tracing::warn!(output = %run.output, "cluster.notify_failed");
                    }
                }
            })
            .ok()
            .map(|_| tx)
    });
    let m = Manager {
        witness,
        force_rx,
        resign_rx,
        notify,
        timing: cfg.timing(),
        ctx,
        cfg,
        socks,
        wsock,
        slots: HashMap::new(),
        incarnation,
        rx: hb_rx,
        feed: to_feed,
        persister: to_persister,
        to_self,
        next_persist: 0,
        peer: None,
        cluster_id: None,
        standby: false,
    };
    std::thread::Builder::new()
        .name("cluster-hb".into())
        .spawn(move || m.run())?;
    Ok(())
}

/// Locks memory and raises this thread to real-time priority, where allowed.
fn realtime() {
    // SAFETY: mlockall only takes flags; it affects this process's mappings.
    // MCL_CURRENT only: locking future mappings too would lock every volume
    // buffer the agent ever allocates, and fail allocations at the limit.
    if unsafe { libc::mlockall(libc::MCL_CURRENT) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cluster.mlockall_failed: heartbeats may stall under memory pressure");
    }
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0
    // is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cluster.realtime_failed: heartbeats run at normal priority");
    }
}

fn hmac_key(hex: &str) -> Option<ring::hmac::Key> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes?))
}

#[derive(Serialize, Deserialize)]
struct Datagram {
    from: String,
    workload: String,
    msg: PeerMsg,
}

/// The heartbeat thread. It does no I/O but its UDP sockets: what it needs
/// arrives over `rx` from the feed and persister threads (`feed`), the
/// threads it wants started are started by the feed, and the only locks it
/// takes are held by others for memory operations alone (the volume maps
/// of `AgentCtx` and `Shares`, a volume's `AlonePermit`, the
/// `ClusterView`'s maps) — never across disk I/O. Its log lines are queued
/// to the logger thread (`crate::sys::logging`).
struct Manager {
    ctx: Arc<dyn Host>,
    cfg: ClusterSettings,
    timing: Timing,
    socks: Vec<UdpSocket>,
    wsock: UdpSocket,
    slots: HashMap<String, Slot>,
    incarnation: u64,
    /// (workload, why): the check hook failed `check_fall` times, or an
    /// operator's switchover.
    resign_rx: mpsc::Receiver<(String, String)>,
    /// Events for the notify hook.
    notify: Option<mpsc::SyncSender<Value>>,
    force_rx: mpsc::Receiver<(String, bool)>,
    /// The witness's address and shared key, if configured.
    witness: Option<Arc<(SocketAddr, ring::hmac::Key)>>,
    /// From the feed and the persister.
    rx: mpsc::Receiver<ToHb>,
    /// To the feed: threads to start.
    feed: mpsc::Sender<ToFeed>,
    /// To the persister, numbered from `next_persist`.
    persister: mpsc::Sender<PersistRequest>,
    /// To this thread: the answers of the threads its actions started
    /// (failback, the split-brain policy's steps).
    to_self: mpsc::Sender<ToHb>,
    next_persist: u64,
    /// The peer's heartbeat key and listeners.
    peer: Option<PeerLink>,
    /// This pair of nodes' cluster id (from the peer record's heartbeat
    /// key): what the witness keys the workloads' records by.
    cluster_id: Option<String>,
    /// This node is in standby.
    standby: bool,
}

/// How often the manager publishes its status.
const PUBLISH_INTERVAL_MS: u64 = 20;

impl Manager {
    /// Milliseconds on this process's monotonic clock (the write gate's).
    fn now(&self) -> u64 {
        crate::volume::primary::mono_ms()
    }

    fn run(mut self) {
        crate::sys::logging::queue_this_thread();
        realtime();
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 64];
        loop {
            self.take_messages();
            self.receive(&mut buf);
            while let Ok((w, by_policy)) = self.force_rx.try_recv() {
                let now = self.now();
                if let Some(slot) = self.slots.get_mut(&w) {
                    tracing::warn!(workload = %w, by_policy, "cluster.force_promote: asked by an operator");
                    let actions = slot.node.on_input(now, Input::ForcePromote { by_policy });
                    self.perform(&w, actions);
                }
            }
            while let Ok((w, why)) = self.resign_rx.try_recv() {
                let now = self.now();
                if let Some(slot) = self.slots.get_mut(&w) {
                    let actions = slot.node.on_input(now, Input::Resign { why });
                    self.perform(&w, actions);
                }
            }
            let now = self.now();
            let names: Vec<String> = self.slots.keys().cloned().collect();
            for w in &names {
                let Some(slot) = self.slots.get_mut(w) else {
                    continue;
                };
                let actions = slot.node.tick(now);
                // The write gate enforces the lease itself: push its deadline.
                let deadline = slot.node.write_deadline(now).unwrap_or(u64::MAX);
                for v in &slot.volumes {
                    if let Some(p) = self.ctx.primary(v) {
                        p.lease_until_ms.store(deadline, Ordering::SeqCst);
                    }
                }
                if slot.node.is_candidate() != slot.candidate {
                    slot.candidate = slot.node.is_candidate();
                    let mut c = self
                        .ctx
                        .cluster()
                        .candidate_volumes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    for v in &slot.volumes {
                        if slot.candidate {
                            c.insert(v.clone());
                        } else {
                            c.remove(v);
                        }
                    }
                }
                let serving = slot.node.accepting_writes(now);
                let edge = serving && !slot.serving;
                slot.serving = serving;
                slot.serving_flag.store(serving, Ordering::SeqCst);
                self.perform(w, actions);
                if edge {
                    // Holding a lease now (first one after start, or back
                    // after a fence): writes flow, VIP and app up.
                    self.resume(w);
                }
            }
            // Published with each data report, and at least this often
            // should the feed be slow.
            for w in &names {
                let due = self.slots.get(w).is_some_and(|s| {
                    s.published_at.elapsed() >= Duration::from_millis(PUBLISH_INTERVAL_MS)
                });
                if due {
                    self.publish(w);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Everything the feed and the persister sent since the last turn.
    fn take_messages(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                ToHb::Peer(p) => {
                    if let Some(id) = p.as_ref().and_then(|p| p.cluster_id.clone()) {
                        self.cluster_id = Some(id);
                    }
                    self.peer = p;
                }
                ToHb::Standby(on) => {
                    self.standby = on;
                    for slot in self.slots.values_mut() {
                        if slot.node.standby() != on {
                            slot.node.set_standby(on);
                        }
                    }
                }
                ToHb::Add(n) => self.add(*n),
                ToHb::Remove(w) => {
                    self.slots.remove(&w);
                    self.ctx.cluster().workloads().remove(&w);
                    tracing::info!(workload = %w, "cluster.workload.unmanaged");
                }
                ToHb::Data(w, r) => self.on_data(&w, r),
                ToHb::Persisted { workload, seq, ok } => self.persisted(&workload, seq, ok),
                ToHb::Input(w, input) => {
                    let now = self.now();
                    if let Some(slot) = self.slots.get_mut(&w) {
                        let actions = slot.node.on_input(now, input);
                        self.perform(&w, actions);
                    }
                }
            }
        }
    }

    /// Takes a workload under HA, as the feed found it.
    fn add(&mut self, n: NewWorkload) {
        let w = n.record.workload.to_string();
        if self.slots.contains_key(&w) {
            return;
        }
        let mut node = ClusterNode::start(
            &self.ctx.identity().node_name,
            &self.cfg.peer,
            self.incarnation,
            n.nonce_key,
            n.record.state,
            n.data,
            self.timing,
            n.policy,
            self.now(),
        );
        node.set_standby(self.standby);
        node.set_rules(Rules {
            failback_delay_ms: self.cfg.failback.then_some(self.cfg.failback_delay_ms),
            preferred: Some(n.record.preferred.clone()),
            // Validated with the config: an unknown name never gets here.
            split_brain: self
                .cfg
                .split_brain
                .parse()
                .unwrap_or(SplitBrainPolicy::Manual),
            check_rise: self.cfg.check_rise,
            check_fall: self.cfg.check_fall,
        });
        // Errors counted before the workload came under HA here: a baseline.
        let mut baseline = node.on_input(
            self.now(),
            Input::IoErrors {
                total: n.io_errors_seen,
            },
        );
        tracing::info!(workload = %w, role = ?n.record.state.role, policy = ?n.policy, "cluster.workload.managed");
        // Stopped between recording its demotion and carrying it out (a
        // switchover, then at once a restart: an upgrade): the record says
        // secondary, a volume is still loaded as primary (frozen, as every
        // HA primary at start). Carry the demotion out now, or the two
        // nodes refuse each other's links for ever.
        if n.record.state.role == Role::Secondary {
            let stale: Vec<&String> = n
                .volumes
                .iter()
                .filter(|v| self.ctx.primary(v).is_some())
                .collect();
            if !stale.is_empty() {
                tracing::warn!(workload = %w, volumes = ?stale, "cluster.reconcile: secondary here but its volumes are still primary: demoting them");
                baseline.push(Action::Demote);
            }
        }
        self.slots.insert(
            w.clone(),
            Slot {
                node,
                accept_loss: n.record.accept_loss,
                preferred: n.record.preferred,
                jobs: n.jobs,
                events: VecDeque::new(),
                peer_lost_at: None,
                serving: false,
                volumes: n.volumes,
                shares: n.shares,
                candidate: false,
                serving_flag: n.serving_flag,
                stop_checks: n.stop_checks,
                link_seen_ms: 0,
                detection_ms: None,
                held: VecDeque::new(),
                published_at: Instant::now(),
                role_changes_sent: 0,
            },
        );
        self.perform(&w, baseline);
    }

    /// A workload's data and link states, from the feed: fed to its state
    /// machine.
    fn on_data(&mut self, w: &str, r: DataReport) {
        let now = self.now();
        let Some(slot) = self.slots.get_mut(w) else {
            return;
        };
        let mut actions = Vec::new();
        // The copy's state counts only from a report sampled after every
        // promotion and demotion asked for was done: before, the volumes
        // still have their old role (a primary volume counts as up to
        // date), and a demotion's own mark would be undone.
        let role_changing = slot.held.iter().any(|s| {
            matches!(
                s,
                Step::Act {
                    action: Action::Promote | Action::Demote,
                    ..
                }
            )
        });
        let settled = r.role_changes_done >= slot.role_changes_sent && !role_changing;
        // Compared with the state machine's own view: a demotion marks its
        // copy inconsistent without asking us.
        if settled && slot.node.data_state() != r.data {
            actions.extend(slot.node.on_input(now, Input::DataState(r.data)));
        }
        actions.extend(slot.node.on_input(now, Input::Members(r.members)));
        // The replication connection is one more heartbeat path.
        if let Some(at) = r.link_seen_ms {
            if slot.link_seen_ms < at {
                slot.link_seen_ms = at;
                actions.extend(slot.node.on_input(now, Input::PeerSeen { at }));
            }
        }
        actions.extend(
            slot.node
                .on_input(now, Input::IoErrors { total: r.io_errors }),
        );
        actions.extend(slot.node.on_input(
            now,
            Input::Diverged {
                split_brain: r.split_brain,
                changed_bytes: r.changed_bytes,
            },
        ));
        self.perform(w, actions);
        self.set_permits(w);
        self.publish(w);
    }

    fn publish(&mut self, w: &str) {
        let Some(slot) = self.slots.get_mut(w) else {
            return;
        };
        slot.published_at = Instant::now();
        let Some(slot) = self.slots.get(w) else {
            return;
        };
        let now = self.now();
        let n = &slot.node;
        let me = &self.ctx.identity().node_name;
        let primary = match n.role() {
            Role::Primary if n.accepting_writes(now) => Some(me.clone()),
            Role::Secondary if n.peer_alive(now) && n.peer_role() == Some(Role::Primary) => {
                Some(self.cfg.peer.clone())
            }
            _ => None,
        };
        let replica_state = match (n.role(), n.members_in_sync()) {
            (Role::Secondary, _) => Some(json!({
                "node": me,
                "state": data_state_str(n.data_state()),
            })),
            (_, Some(true)) => Some(json!({"node": self.cfg.peer, "state": "up-to-date"})),
            (_, _) if n.may_write_alone() && n.policy().sync => {
                Some(json!({"node": self.cfg.peer, "state": "outdated"}))
            }
            _ => Some(json!({"node": self.cfg.peer, "state": "inconsistent"})),
        };
        let mut v = json!({
            "workload": w,
            "preferred": slot.preferred,
            "role": role_str(n.role()),
            "primary": primary,
            "epoch": n.epoch(),
            "peer": self.cfg.peer,
            "peer_alive": n.peer_alive(now),
            "writes_held": n.writes_held(),
            "candidate": n.is_candidate(),
            "accept_loss": slot.accept_loss,
            "split_brain": n.split_brain_found(),
            "changed_bytes": n.changed_bytes(),
            // Read when the status is asked for (`ClusterView::json`).
            "copies": [],
            "replicas": replica_state.into_iter().collect::<Vec<_>>(),
            "events": slot.events.iter().cloned().collect::<Vec<_>>(),
        });
        if v["primary"] == me.as_str() {
            if let Some(until) = n.write_deadline(now) {
                v[SERVING_UNTIL] = json!(until);
            }
        }
        self.ctx.cluster().workloads().insert(w.to_string(), v);
    }

    fn receive(&mut self, buf: &mut [u8]) {
        for i in 0..self.socks.len() {
            let mut turn = 0;
            while let Ok((n, from)) = self.socks[i].recv_from(buf) {
                // The clock at receipt: a grant is dated when it is made.
                let now = self.now();
                turn += 1;
                if turn > DATAGRAMS_PER_TURN_MAX {
                    break;
                }
                let Some(d) = self.verify(&buf[..n]) else {
                    tracing::debug!(%from, "cluster.heartbeat_refused: bad length or signature");
                    continue;
                };
                if d.from != self.cfg.peer {
                    continue;
                }
                if let Some(slot) = self.slots.get_mut(&d.workload) {
                    let actions = slot.node.on_input(now, Input::Peer(d.msg));
                    self.perform(&d.workload, actions);
                }
            }
        }
        let Some(w) = self.witness.clone() else {
            return;
        };
        let (waddr, wkey) = &*w;
        for _ in 0..DATAGRAMS_PER_TURN_MAX {
            let now = self.now();
            let n = match self.wsock.recv_from(buf) {
                Ok((n, from)) if from == *waddr => n,
                Ok(_) => continue,
                Err(_) => break,
            };
            let Some(body) = witness::open(wkey, &buf[..n]) else {
                tracing::warn!("cluster.witness_reply_refused: bad signature");
                continue;
            };
            let Ok(r) = serde_json::from_slice::<FromWitness>(body) else {
                continue;
            };
            if self.cluster_id.as_deref() != Some(r.cluster.as_str()) {
                continue;
            }
            self.ctx
                .cluster()
                .witness_answered_unix_ms
                .store(crate::sys::unix_ms(), std::sync::atomic::Ordering::Relaxed);
            if let Some(slot) = self.slots.get_mut(&r.workload) {
                let actions = slot.node.on_input(now, Input::Witness(r.reply));
                self.perform(&r.workload, actions);
            }
        }
    }

    fn verify(&self, b: &[u8]) -> Option<Datagram> {
        if b.len() < 32 || b.len() > DATAGRAM_BYTES_MAX {
            return None;
        }
        let key = self.peer.as_ref()?.key.as_ref()?;
        ring::hmac::verify(key, &b[32..], &b[..32]).ok()?;
        serde_json::from_slice(&b[32..]).ok()
    }

    fn send_peer(&self, workload: &str, msg: PeerMsg) {
        let Some(peer) = &self.peer else {
            return;
        };
        let Some(key) = &peer.key else {
            return;
        };
        let body = match serde_json::to_vec(&Datagram {
            from: self.ctx.identity().node_name.clone(),
            workload: workload.to_string(),
            msg,
        }) {
            Ok(b) => b,
            Err(_) => return,
        };
        let tag = ring::hmac::sign(key, &body);
        let mut d = tag.as_ref().to_vec();
        d.extend_from_slice(&body);
        // Every path: listener i of the peer from our socket i (or the last).
        for (i, addr) in peer.addrs.iter().enumerate() {
            let Some(addr) = addr else {
                continue;
            };
            let s = &self.socks[i.min(self.socks.len() - 1)];
            let _ = s.send_to(&d, *addr);
        }
    }

    /// Performs the state machine's actions, in order. A `Persist` is handed
    /// to the persister thread, and everything after it for this workload —
    /// this batch's actions and later ones, heartbeats included — waits
    /// until the persister says it is durable (`persisted`): nothing is
    /// sent, asked or done that relies on a state not yet on disk (a
    /// Promote request only once the candidacy is recorded, a promotion
    /// only once the role is). Only what restricts cannot wait: a fence
    /// freezes the volumes' gate at once (its job waits its turn), and the
    /// permit to write alone is withheld while anything waits
    /// (`set_permits`). Other workloads are not held up.
    fn perform(&mut self, w: &str, actions: Vec<Action>) {
        let mut batch = None;
        for a in actions {
            if let Action::Persist(state) = a {
                let seq = self.next_persist;
                self.next_persist += 1;
                let req = PersistRequest {
                    workload: w.to_string(),
                    seq,
                    state,
                };
                if self.persister.send(req).is_err() {
                    // What follows must not happen unrecorded: drop the
                    // rest of the batch.
                    tracing::error!(
                        workload = w,
                        "cluster.persist_failed: the persister thread stopped; not acting on it"
                    );
                    return;
                }
                batch = Some(seq);
                if let Some(slot) = self.slots.get_mut(w) {
                    slot.held.push_back(Step::Durable(seq));
                }
                continue;
            }
            let waiting = self.slots.get(w).is_some_and(|s| !s.held.is_empty());
            if !waiting {
                self.act(w, a, Instant::now());
                continue;
            }
            if a == Action::Fence {
                self.freeze(w);
            }
            if let Some(slot) = self.slots.get_mut(w) {
                slot.held.push_back(Step::Act {
                    action: a,
                    batch,
                    at: Instant::now(),
                });
            }
        }
        if batch.is_some() {
            self.set_permits(w);
        }
    }

    /// The persister wrote (or failed to write) persist `seq` of `w`: what
    /// waited for it runs now, up to the next persist still pending — or,
    /// if it failed, the actions of its own batch are dropped (what follows
    /// a Promote request or a promotion must not happen unrecorded; the
    /// state machine asks again on a later tick).
    fn persisted(&mut self, w: &str, seq: u64, ok: bool) {
        let Some(slot) = self.slots.get_mut(w) else {
            return;
        };
        match slot.held.front() {
            Some(Step::Durable(s)) if *s == seq => {
                slot.held.pop_front();
            }
            _ => {
                tracing::error!(
                    workload = w,
                    seq,
                    "cluster.persist_unexpected: not the persist waited for"
                );
                return;
            }
        }
        if !ok {
            slot.held
                .retain(|s| !matches!(s, Step::Act { batch: Some(b), .. } if *b == seq));
        }
        loop {
            let Some(slot) = self.slots.get_mut(w) else {
                return;
            };
            match slot.held.front() {
                None | Some(Step::Durable(_)) => break,
                Some(_) => {}
            }
            match slot.held.pop_front() {
                Some(Step::Act { action, at, .. }) => self.act(w, action, at),
                Some(Step::Resume) => self.job(w, Job::Resume),
                _ => {}
            }
        }
        self.set_permits(w);
    }

    /// Serving begins: the Resume job, after anything held before it.
    fn resume(&mut self, w: &str) {
        let Some(slot) = self.slots.get_mut(w) else {
            return;
        };
        if slot.held.is_empty() {
            self.job(w, Job::Resume);
        } else {
            slot.held.push_back(Step::Resume);
        }
    }

    /// One action, now (`at`: when the state machine asked for it).
    fn act(&mut self, w: &str, a: Action, at: Instant) {
        match a {
            Action::SendPeer(m) => self.send_peer(w, m),
            Action::SendWitness(req) => {
                if req.op == ferry_core::cluster::WitnessOp::UpToDate {
                    // Going alone needs a new outdate from now on: take
                    // the permit back before the request can land.
                    self.set_permits(w);
                }
                let (Some(witness), Some(cluster)) = (&self.witness, &self.cluster_id) else {
                    return;
                };
                let (addr, key) = &**witness;
                let msg = ToWitness {
                    cluster: cluster.clone(),
                    workload: w.to_string(),
                    lease_ms: self.timing.lease_ms,
                    drift_permille: self.timing.drift_permille,
                    req,
                };
                if let Ok(b) = serde_json::to_vec(&msg) {
                    let _ = self.wsock.send_to(&witness::seal(key, b), *addr);
                }
            }
            // Handed to the persister in `perform`.
            Action::Persist(_) => {}
            Action::HoldWrites | Action::ReleaseWrites => {
                // Enforced in the write path through the permit.
                self.set_permits(w);
            }
            Action::Fence => {
                // Stop I/O now, on this thread; the rest on the worker.
                self.freeze(w);
                self.job(w, Job::Fence);
            }
            // Serving resumes on the edge of `accepting_writes` (run).
            Action::Resume => {}
            Action::Promote => {
                let force = self.slots.get(w).is_some_and(|s| s.node.promoted_forced());
                let handed_over = self.slots.get(w).is_some_and(|s| s.node.peer_resigning());
                self.job(w, Job::Promote { force, handed_over })
            }
            Action::Demote => self.job(w, Job::Demote),
            Action::Failback => self.failback(w),
            Action::AskPeerReport => {
                let (ctx, name, tx) = (self.ctx.clone(), w.to_string(), self.to_self.clone());
                self.spawn("split-brain", tx, name.clone(), move || {
                    Input::PeerReport(peer_report(&ctx, &name))
                });
            }
            Action::SplitBrain { policy, verdict } => self.split_brain(w, policy, verdict),
            Action::Event(e) => self.event(w, e, at),
        }
    }

    /// The split-brain policy's verdict: recorded, then carried out (or
    /// left to the operator).
    fn split_brain(&mut self, w: &str, policy: SplitBrainPolicy, verdict: Verdict) {
        self.ctx.audit().decide(crate::audit::decision(
            "split-brain-verdict",
            w,
            json!({"policy": policy.to_string(), "verdict": format!("{verdict:?}")}),
            None,
        ));
        match verdict {
            Verdict::Manual { why } => {
                tracing::warn!(workload = w, %policy, why = %why, "cluster.split_brain.left_to_operator");
            }
            Verdict::Keep { node, why } => {
                tracing::warn!(workload = w, %policy, keep = %node, why = %why, "cluster.split_brain.policy_decided");
                let (ctx, name, tx) = (self.ctx.clone(), w.to_string(), self.to_self.clone());
                self.spawn("split-brain", tx, name.clone(), move || {
                        let r = keep_by_policy(&ctx, &name, policy, &node);
                        if let Err(e) = &r {
                            tracing::error!(workload = %name, error = %format!("{e:#}"), "cluster.split_brain.policy_failed: resolve by hand");
                        }
                        Input::SplitBrainDone { ok: r.is_ok() }
                    });
            }
        }
    }

    /// Runs `f` on a thread of its own (started by the feed: this thread
    /// starts none) and feeds the input it returns to `workload`'s state
    /// machine.
    fn spawn(
        &self,
        name: &'static str,
        tx: mpsc::Sender<ToHb>,
        workload: String,
        f: impl FnOnce() -> Input + Send + 'static,
    ) {
        let run = Box::new(move || {
            let input = f();
            let _ = tx.send(ToHb::Input(workload, input));
        });
        if self.feed.send(ToFeed::Spawn(name, run)).is_err() {
            tracing::error!(
                thread = name,
                "cluster.spawn_failed: the feed thread stopped"
            );
        }
    }

    /// Failback, as the state machine decided: a verified switchover to
    /// the preferred node (the peer); the outcome goes back to it.
    fn failback(&self, w: &str) {
        let (ctx, name, tx) = (self.ctx.clone(), w.to_string(), self.to_self.clone());
        self.spawn("failback", tx, name.clone(), move || {
            let r = switchover(&ctx, &name);
            match &r {
                Ok(v) => tracing::info!(workload = %name, result = %v, "cluster.failback.done"),
                Err(e) => tracing::warn!(workload = %name, error = %format!("{e:#}"), "cluster.failback.failed: trying again in 30 s"),
            }
            Input::FailbackDone { ok: r.is_ok() }
        });
    }

    /// Fencing's fast part: the volumes' gate freezes (new writes wait).
    fn freeze(&self, w: &str) {
        for v in self
            .slots
            .get(w)
            .map(|s| s.volumes.as_slice())
            .unwrap_or(&[])
        {
            if let Some(p) = self.ctx.primary(v) {
                p.freeze_nowait();
            }
        }
    }

    /// The permit to acknowledge writes the peer did not confirm, for the
    /// workload's volumes and shares, from the state machine — withheld
    /// while a persist is pending (a grant counts once its state is durable).
    fn set_permits(&self, w: &str) {
        let Some(slot) = self.slots.get(w) else {
            return;
        };
        let required = slot.node.policy().witness && slot.node.policy().sync;
        let granted = slot.node.may_write_alone() && slot.held.is_empty();
        for v in &slot.volumes {
            if let Some(p) = self.ctx.primary(v) {
                p.alone.set(required, granted);
            }
        }
        for s in &slot.shares {
            if let Some(p) = self.ctx.shares().primary(s) {
                p.alone.set(required, granted);
            }
        }
    }

    fn job(&mut self, w: &str, j: Job) {
        if let Some(s) = self.slots.get_mut(w) {
            if matches!(j, Job::Promote { .. } | Job::Demote) {
                s.role_changes_sent += 1;
            }
            let _ = s.jobs.send(j);
        }
    }

    fn event(&mut self, w: &str, e: Event, at: Instant) {
        let Some(slot) = self.slots.get_mut(w) else {
            return;
        };
        let mut v = serde_json::to_value(&e).unwrap_or(Value::Null);
        match &e {
            Event::PeerLost => slot.peer_lost_at = Some(at),
            Event::PeerBack => slot.peer_lost_at = None,
            Event::FailoverStarted { silent_ms } => slot.detection_ms = Some(*silent_ms),
            Event::Promoted { .. } => {
                // Detection (silence until the peer was declared lost) and
                // the total from the last sign of life to the promotion;
                // the promotion itself (volumes, VIP, start hook) is logged
                // by `cluster.action.done job=Promote`.
                if let Some(t) = slot.peer_lost_at {
                    let since = at.saturating_duration_since(t).as_millis() as u64;
                    v["since_peer_lost_ms"] = json!(since);
                    if let Some(d) = slot.detection_ms {
                        v["detection_ms"] = json!(d);
                        v["failover_ms"] = json!(d + since);
                    }
                }
            }
            _ => {}
        }
        v["workload"] = json!(w);
        v["node"] = json!(self.ctx.identity().node_name);
        let wall = std::time::SystemTime::now()
            .checked_sub(at.elapsed())
            .unwrap_or_else(std::time::SystemTime::now);
        v["at_unix_ms"] = json!(wall
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
        tracing::info!(workload = w, event = %v, "cluster.event");
        // Into the audit log's queue: this thread never waits for the disk.
        let what = v["event"].as_str().unwrap_or("event").to_string();
        self.ctx
            .audit()
            .decide(crate::audit::decision(&what, w, v.clone(), None));
        if let Some(tx) = &self.notify {
            if tx.try_send(v.clone()).is_err() {
                tracing::warn!(workload = w, "cluster.notify_dropped: NOTIFY_QUEUE_EVENTS_MAX events already wait for the hook");
            }
        }
        slot.events.push_back(v);
        while slot.events.len() > 32 {
            slot.events.pop_front();
        }
    }
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Fenced => "fenced",
        Role::Secondary => "secondary",
    }
}

fn data_state_str(d: DataState) -> &'static str {
    match d {
        DataState::UpToDate => "up-to-date",
        DataState::Outdated => "outdated",
        DataState::Inconsistent => "inconsistent",
    }
}

/// A workload's slow actions, in order. `role_changes_done` counts the
/// promotions and demotions finished (the volumes' roles changed).
fn worker<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    peer: &str,
    rx: mpsc::Receiver<Job>,
    role_changes_done: &AtomicU64,
) {
    // Whether this node runs the application (as far as the hooks went).
    let mut serving = false;
    for job in rx {
        let started = Instant::now();
        let r = match job {
            Job::Fence => {
                serving = false;
                fence(ctx, workload)
            }
            Job::Resume => {
                // Serving again (a resignation nobody took up was
                // abandoned): a copy a split-brain policy set aside lacks
                // what is written from now on, so a later demotion must
                // not discard this one (the split brain stays; the policy
                // runs again and sets a new copy aside).
                ctx.cluster()
                    .discard_on_demote
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(workload);
                let r = resume(ctx, workload, !serving);
                serving = true;
                r
            }
            Job::Promote { force, handed_over } => {
                serving = true;
                // Not a hand-over (a failover, a forced promotion): a VM
                // waiting here for the peer's RAM holds a state the peer
                // may have left behind since (it served again after a
                // resignation nobody took up, its cancel lost): it never
                // continues; the start boots the VM anew from the disks.
                let vms = &ctx.hook_env().vms;
                if !handed_over && vms.is_incoming(workload) {
                    tracing::warn!(workload, "cluster.promote.stale_waiting_vm: ended, not continued (the peer did not hand the workload over)");
                    vms.kill(workload);
                } else if handed_over {
                    // The peer resigned after its VM's RAM came here: the
                    // start continues it.
                    vms.arm_incoming(workload);
                }
                // The witness already names this node primary: a transient
                // failure (a busy lock) must not leave the workload unserved.
                let mut r = promote(ctx, workload, peer, force);
                for _ in 0..3 {
                    let Err(e) = &r else {
                        break;
                    };
                    tracing::warn!(workload, error = %format!("{e:#}"), "cluster.promote.retry");
                    std::thread::sleep(Duration::from_millis(200));
                    r = promote(ctx, workload, peer, force);
                }
                r
            }
            Job::Demote => {
                serving = false;
                demote(ctx, workload, peer)
            }
        };
        if matches!(job, Job::Promote { .. } | Job::Demote) {
            role_changes_done.fetch_add(1, Ordering::SeqCst);
        }
        match r {
            Ok(()) => tracing::info!(
                workload,
                ?job,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "cluster.action.done"
            ),
            Err(e) => {
                tracing::error!(workload, ?job, error = %format!("{e:#}"), "cluster.action.failed")
            }
        }
    }
}

/// Runs the workload's check hook every `check_interval_ms` while this node
/// serves it and hands each result to the state machine, which decides
/// (`check_rise` passes in a row and the application counts as up; once up,
/// `check_fall` failures in a row hand the workload over).
fn checker<H: Host + ?Sized>(
    ctx: &H,
    cfg: &ClusterSettings,
    workload: &str,
    serving: &AtomicBool,
    stop: &AtomicBool,
    to_hb: &mpsc::Sender<ToHb>,
) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(cfg.check_interval_ms));
        if !serving.load(Ordering::SeqCst) {
            continue;
        }
        let Ok(spec) = spec(ctx, workload) else {
            continue;
        };
        let Some(run) = crate::workload::workload_hook(&ctx.hook_env(), &spec, "check", "primary")
        else {
            continue;
        };
        if !run.ok {
            tracing::warn!(workload, output = %run.output, "cluster.check.failed");
        }
        let input = Input::Check {
            ok: run.ok,
            output: run.output,
        };
        if to_hb
            .send(ToHb::Input(workload.to_string(), input))
            .is_err()
        {
            return;
        }
    }
}

fn spec<H: Host + ?Sized>(ctx: &H, workload: &str) -> Result<WorkloadSpec> {
    crate::workload::load_workload(&ctx.cfg().data_dir, workload)?
        .ok_or_else(|| anyhow!("workload {workload:?} is not defined on this node"))
}

/// Freeze (again: a Resume queued before may have reopened), drop the VIP,
/// kill the VM, stop the application.
fn fence<H: Host + ?Sized>(ctx: &H, workload: &str) -> Result<()> {
    let spec = spec(ctx, workload)?;
    for v in &spec.volumes {
        if let Some(p) = ctx.primary(v) {
            p.freeze_nowait();
        }
    }
    for s in &spec.shares {
        crate::share::set_frozen(ctx, s, true);
    }
    vip(&spec, false)?;
    // A VM is killed at once: its disks are frozen now, so QEMU's orderly
    // exit (SIGTERM) would wait on its frozen writes until the hook timeout,
    // holding up this worker (and the demotion after it) meanwhile. Its RAM
    // is lost either way, and every write its guest saw acknowledged is
    // already on both copies.
    if spec.vm.is_some() {
        if let Err(e) = ctx.hook_env().vms.stop(&spec.name, Duration::ZERO) {
            tracing::warn!(workload, error = %format!("{e:#}"), "cluster.vm_kill_failed");
        }
    }
    if let Some(run) = crate::workload::workload_hook(&ctx.hook_env(), &spec, "stop", "fenced") {
        if !run.ok {
            tracing::warn!(workload, output = %run.output, "cluster.stop_hook_failed");
        }
    }
    Ok(())
}

/// A lease is held: writes flow; and unless the application already runs
/// here, the VIP returns and the application starts.
fn resume<H: Host + ?Sized>(ctx: &H, workload: &str, start: bool) -> Result<()> {
    let spec = spec(ctx, workload)?;
    for v in &spec.volumes {
        if let Some(p) = ctx.primary(v) {
            p.unfreeze();
        }
    }
    for s in &spec.shares {
        crate::share::set_frozen(ctx, s, false);
    }
    if start {
        vip(&spec, true)?;
        end_peer_waiting_vm(ctx, &spec);
        start_app(ctx, &spec);
    }
    Ok(())
}

/// Before this node starts the VM of `spec` anew (not a live move's VM
/// continued: a resignation nobody took up, a failover): a VM the peer
/// holds waiting for this workload's RAM is older than the disks this one
/// will write (the source's VM quit at the switchover's commit), so a later
/// promotion there must never continue it. The peer ends it (best effort,
/// on a thread; it refuses if it serves the workload, and the promotion it
/// would need cannot happen while this node holds the lease).
fn end_peer_waiting_vm<H: Host + ?Sized>(ctx: &H, spec: &WorkloadSpec) {
    if spec.vm.is_none() || ctx.hook_env().vms.is_incoming(&spec.name) {
        return;
    }
    let Some(cfg) = ctx.cfg().cluster.as_ref() else {
        return;
    };
    let Some(peer) = ctx.peers().get(&cfg.peer) else {
        return;
    };
    let (Ok(client), Ok(name)) = (
        crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer),
        ferry_core::Name::parse(&spec.name),
    ) else {
        return;
    };
    let workload = spec.name.to_string();
    std::thread::spawn(
        move || match client.send(&ferry_api::Action::CancelVmIncoming { name }) {
            Ok(ferry_api::Reply::VmIncomingCancelled(r)) if r.vm_ended => {
                tracing::warn!(workload = %workload, "cluster.peer_waiting_vm_ended: the peer held this workload's VM waiting for a live move's RAM; it is stale now")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(workload = %workload, error = %format!("{e:#}"), "cluster.peer_waiting_vm.unknown")
            }
        },
    );
}

fn start_app<H: Host + ?Sized>(ctx: &H, spec: &WorkloadSpec) {
    if let Some(run) = crate::workload::workload_hook(&ctx.hook_env(), spec, "start", "primary") {
        if !run.ok {
            tracing::warn!(workload = %spec.name, output = %run.output, "cluster.start_hook_failed");
        }
    }
}

/// Failover: every volume promoted at once (one durable commit record),
/// replicating back to the old primary when it returns; VIP; start.
fn promote<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str, peer: &str, force: bool) -> Result<()> {
    let spec = spec(ctx, workload)?;
    if force {
        tracing::warn!(
            workload,
            "cluster.promote.forced: this copy may be outdated or inconsistent"
        );
    }
    while_marked(
        ctx.forced_promotions(),
        &names(&spec.volumes),
        force,
        || promote_volumes(ctx, workload, peer, &spec, force),
    )
}

fn promote_volumes<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    peer: &str,
    spec: &WorkloadSpec,
    force: bool,
) -> Result<()> {
    let replicas: Vec<String> = spec
        .volumes
        .iter()
        .filter(|v| ctx.replica(v).is_some())
        .map(|v| v.to_string())
        .collect();
    if !replicas.is_empty() {
        let mode = ctx
            .replica(&replicas[0])
            .map(|s| {
                s.meta
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .state()
                    .mode
            })
            .unwrap_or(ferry_core::link::Mode::Sync);
        ctx.clone()
            .commit_takeover(workload, &replicas, &[], Some(peer), mode)?;
    }
    for s in &spec.shares {
        crate::share::promote(ctx, s, Some(peer), force)?;
    }
    for v in &spec.volumes {
        if let Some(p) = ctx.primary(v) {
            p.unfreeze();
        }
    }
    vip(spec, true)?;
    end_peer_waiting_vm(ctx.as_ref(), spec);
    start_app(ctx, spec);
    Ok(())
}

/// A newer primary exists: stop here and become its replica, keeping the
/// ranges this copy may hold that the new primary never saw.
fn demote<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str, peer: &str) -> Result<()> {
    let spec = spec(ctx, workload)?;
    vip(&spec, false)?;
    if let Some(run) = crate::workload::workload_hook(&ctx.hook_env(), &spec, "stop", "demoted") {
        if !run.ok {
            tracing::warn!(workload, output = %run.output, "cluster.stop_hook_failed");
        }
    }
    let clean = ctx
        .cluster()
        .clean_handover
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(workload);
    let discard = ctx
        .cluster()
        .discard_on_demote
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(workload);
    // With `discard`, no inbound link may meet these copies between the
    // demotion and the rebase (it would see the old history: a split brain).
    while_marked(
        &ctx.cluster().candidate_volumes,
        &names(&spec.volumes),
        discard,
        || demote_and_rebase(ctx, &spec, peer, clean, discard),
    )
}

/// Runs `f` with `volumes` in `set` when `on`, taking them out after.
fn while_marked<T>(
    set: &Mutex<std::collections::HashSet<String>>,
    volumes: &[String],
    on: bool,
    f: impl FnOnce() -> T,
) -> T {
    let lock = || set.lock().unwrap_or_else(|p| p.into_inner());
    if on {
        lock().extend(volumes.iter().cloned());
    }
    let r = f();
    if on {
        let mut s = lock();
        for v in volumes {
            s.remove(v);
        }
    }
    r
}

fn demote_and_rebase<H: Host + ?Sized>(
    ctx: &Arc<H>,
    spec: &WorkloadSpec,
    peer: &str,
    clean: bool,
    discard: bool,
) -> Result<()> {
    for v in &spec.volumes {
        if ctx.primary(v).is_some() {
            ctx.clone().demote_after_failover(v, peer, clean)?;
        }
    }
    for s in &spec.shares {
        crate::share::demote(ctx, s, peer, clean)?;
    }
    if discard {
        // Our copy was discarded by the split-brain policy (kept aside):
        // restart its history at the generation shared with the new primary.
        let p = ctx
            .peers()
            .get(peer)
            .ok_or_else(|| anyhow!("peer {peer} is not registered"))?;
        let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &p)?;
        for v in &spec.volumes {
            let theirs: Vec<u64> = client.get(&format!("/api/v1/volumes/{v}/generation"))?["ids"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default();
            if let Some(sec) = ctx.replica(v) {
                let common = rebase(ctx, &sec, &theirs)?;
                tracing::warn!(volume = %v, common = ?common.map(|c| format!("{c:016x}")), "cluster.split_brain.discarded_here: the diverged image is kept as a copy");
            }
        }
    }
    Ok(())
}

/// How long a switchover waits for the cluster's view of the replica to
/// catch up with its links before it refuses a replica not up to date.
const SWITCHOVER_SETTLE_MS: u64 = 500;

/// `ferry cluster switchover WORKLOAD`, on the node serving it: a planned
/// move to the peer with no write lost, verified like a cutover — writes
/// freeze, the link drains (everything durable on the peer), both nodes'
/// Merkle leaves must match; then this node resigns (VIP dropped, stop
/// hook), the witness hands the lease to the peer, which promotes, takes
/// the VIP and starts the application. Any failure before the resignation
/// unfreezes and leaves the workload here.
pub fn switchover<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let cfg = ctx
        .cfg()
        .cluster
        .clone()
        .ok_or_else(|| anyhow!("this node has no [cluster] table in its config"))?;
    let mut status = ctx.cluster().workload(workload)?;
    if status["role"] != "primary" || status["primary"] != ctx.identity().node_name.as_str() {
        bail!(
            "workload {workload:?} is served by {}, not by this node: ask that node",
            status["primary"].as_str().unwrap_or("no node")
        );
    }
    // The cluster's view follows the links every 20 ms: a replica that
    // `replicate wait` / `share wait` just saw up to date is given that long.
    let settle = Instant::now() + Duration::from_millis(SWITCHOVER_SETTLE_MS);
    while status["replicas"][0]["state"] != "up-to-date" && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
        status = ctx.cluster().workload(workload)?;
    }
    if status["replicas"][0]["state"] != "up-to-date" {
        bail!(
            "the replica on {} is {}: wait until it is up to date",
            cfg.peer,
            status["replicas"][0]["state"].as_str().unwrap_or("unknown")
        );
    }
    let peer = ctx
        .peers()
        .get(&cfg.peer)
        .ok_or_else(|| anyhow!("peer {} is not registered", cfg.peer))?;
    let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?;
    let peer_status = client
        .get("/api/v1/cluster")
        .map_err(|e| e.context(format!("cannot ask {} whether it can take over", cfg.peer)))?;
    if peer_status["standby"] == true {
        bail!(
            "{} is in standby: `ferry cluster unstandby {}` first",
            cfg.peer,
            cfg.peer
        );
    }
    let spec = spec(ctx, workload)?;
    if !spec.volumes.iter().all(|v| ctx.primary(v).is_some()) {
        bail!("not every volume of {workload:?} is a primary here");
    }
    if !spec
        .shares
        .iter()
        .all(|s| ctx.shares().primary(s).is_some())
    {
        bail!("not every share of {workload:?} is a primary here");
    }
    // The cluster manager demotes this node when it resigns: the handover
    // does not.
    let members = crate::handover::members::handover_members(
        ctx,
        &spec,
        &client,
        &cfg.peer,
        "switchover",
        false,
    )?;
    // A VM that runs here moves live: the peer continues it when it
    // takes over (its start finds the VM waiting with its RAM).
    let vms = ctx.hook_env().vms.clone();
    let live = spec.vm.is_some() && vms.is_running(workload) && !vms.is_incoming(workload);
    if live {
        crate::vm::live::LiveMove::check(&vms, workload)
            .map_err(|e| anyhow!("switchover refused: {e}"))?;
    }
    let plan = ferry_core::handover::Plan {
        kind: ferry_core::handover::Kind::Switchover,
        members: members.len(),
        // A live move drains with the guest paused: it gives up sooner.
        drain_timeout_ms: if live {
            ctx.cfg()
                .vm
                .drain_timeout_ms
                .min(ctx.cfg().migration.cutover_drain_timeout_ms)
        } else {
            ctx.cfg().migration.cutover_drain_timeout_ms
        },
        check: true,
        check_timeout_ms: SWITCHOVER_TAKEOVER_MS,
        check_retry_ms: 20,
        live_vm: live,
    };
    let mut side = SwitchoverSide {
        ctx,
        client: &client,
        workload,
        peer: &cfg.peer,
        live: live.then(|| {
            crate::vm::live::LiveMove::new(
                vms.clone(),
                ctx.cfg().data_dir.clone(),
                client.clone(),
                ctx.dialer(),
                workload,
                &cfg.peer,
                ctx.cfg().vm.clone(),
            )
        }),
        continued_unix_us: None,
    };
    let ran = crate::handover::run(plan, &members, &mut side, workload)
        .map_err(|e| anyhow!("switchover of {workload}: {e}"))?;
    drop(members);
    let t = &ran.timeline;
    match ran.outcome {
        ferry_core::handover::Outcome::RolledBack(abort) => {
            use ferry_core::handover::Abort;
            let why = match &abort {
                Abort::Differs { why, .. } | Abort::Compare { why, .. } => {
                    format!("{why}: not switching over")
                }
                Abort::VmMove(why) => {
                    format!("the VM's live move failed ({why}); the guest goes on here")
                }
                a => a.why().to_string(),
            };
            Err(anyhow!(why).context("switchover aborted; the workload stays here"))
        }
        ferry_core::handover::Outcome::Committed {
            unhealthy: None, ..
        } => {
            let since_freeze = |at: Option<u64>| {
                at.zip(t.frozen_at)
                    .map_or(0, |(a, f)| a.saturating_sub(f) / 1000)
            };
            let verified_ms = since_freeze(t.at(ferry_core::handover::Step::Verified));
            let vm = side
                .live
                .as_ref()
                .map(|l| l.report(side.continued_unix_us, t));
            // A live move: the downtime is the guest's pause.
            let downtime_ms = match vm.as_ref().and_then(|v| v.downtime_ms) {
                Some(d) => d.round() as u64,
                None => t.downtime_us().unwrap_or(0) / 1000,
            };
            tracing::info!(workload, to = %cfg.peer, downtime_ms, verified_ms, live, "cluster.switchover.done");
            let mut reply = json!({
                "workload": workload,
                "from": ctx.identity().node_name,
                "to": cfg.peer,
                "verified_ms": verified_ms,
                "downtime_ms": downtime_ms,
            });
            // Only a VM that moved has a `vm` report (the reply's type
            // omits it otherwise: a `null` would not survive the typing).
            if let Some(vm) = vm {
                reply["vm"] = serde_json::to_value(vm)?;
            }
            Ok(reply)
        }
        // The peer never reported serving (a switchover never commits
        // partly: its commit is this node's resignation).
        ferry_core::handover::Outcome::Committed { .. }
        | ferry_core::handover::Outcome::CommittedPartly { .. } => {
            ctx.cluster()
                .clean_handover
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(workload);
            bail!("{} did not take {workload:?} over within 30 s after this node resigned (the resignation is undone after four failure timeouts); see `ferry cluster status` on both nodes", cfg.peer)
        }
    }
}

/// How long a switchover waits for the peer to serve after this node
/// resigned.
const SWITCHOVER_TAKEOVER_MS: u64 = 30_000;

/// What a switchover does that is not a member's: its commit is this
/// node's resignation (the cluster manager fences — VIP, stop hook — and
/// gives the witness lease back; the peer promotes), its check that the
/// peer serves.
struct SwitchoverSide<'a, H: Host + ?Sized> {
    ctx: &'a Arc<H>,
    client: &'a crate::transport::client::ApiClient,
    workload: &'a str,
    peer: &'a str,
    /// The VM moves live (the plan's `live_vm`).
    live: Option<crate::vm::live::LiveMove>,
    /// When the check first saw the peer's VM running (continued).
    continued_unix_us: Option<u64>,
}

impl<H: Host + ?Sized> crate::handover::Side for SwitchoverSide<'_, H> {
    /// A switchover stops nothing before its freeze (the manager runs the
    /// stop hook when it resigns).
    fn run_stop_hook(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Both copies were proven equal: the demotion keeps no suspect blocks.
    fn commit(&mut self) -> ferry_core::handover::CommitAnswer {
        ClusterView::mark(&self.ctx.cluster().clean_handover, self.workload);
        match self
            .ctx
            .cluster()
            .request_resign(self.workload, "switchover".to_string())
        {
            Ok(()) => ferry_core::handover::CommitAnswer::Committed,
            Err(e) => {
                self.ctx
                    .cluster()
                    .clean_handover
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(self.workload);
                ferry_core::handover::CommitAnswer::Refused(format!("{e:#}"))
            }
        }
    }

    fn record_reverse(&mut self) {}

    fn start_target(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn move_vm(&mut self) -> std::result::Result<(), String> {
        self.live
            .as_mut()
            .ok_or_else(|| "no live move was planned".to_string())?
            .run()
            .map_err(|e| e.to_string())
    }

    fn resume_source_vm(&mut self) {
        if let Some(l) = self.live.as_mut() {
            l.resume_source();
        }
    }

    fn stop_source_vm(&mut self) {
        if let Some(l) = self.live.as_mut() {
            l.stop_source();
        }
    }

    /// Whether the peer serves the workload now (a VM that moved live:
    /// and its VM runs there, continued by the peer's promotion).
    fn check(&mut self) -> std::result::Result<(), String> {
        let v = self.client.get("/api/v1/cluster").unwrap_or(Value::Null);
        let serving = v["workloads"].as_array().into_iter().flatten().any(|w| {
            w["workload"] == self.workload
                && w["primary"] == self.peer
                && (self.live.is_none() || w["vm"] == "running")
        });
        if serving {
            if self.live.is_some() {
                self.continued_unix_us = Some(crate::vm::live::now_unix_us());
            }
            Ok(())
        } else {
            Err(format!(
                "{} does not serve {} yet",
                self.peer, self.workload
            ))
        }
    }

    fn reverse(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn start_source(&mut self) {}
}

/// Adds or removes the workload's virtual IP (`ip addr`), with gratuitous
/// ARP on add so neighbours learn the new owner at once.
fn vip(spec: &WorkloadSpec, up: bool) -> Result<()> {
    let (Some(vip), Some(iface)) = (&spec.vip, &spec.vip_interface) else {
        return Ok(());
    };
    let ip = |args: &[&str]| -> Result<std::process::Output> {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .context("cannot run `ip` (iproute2)")
    };
    if up {
        let out = ip(&["addr", "replace", vip, "dev", iface])?;
        if !out.status.success() {
            bail!(
                "ip addr replace {vip} dev {iface}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let addr = vip.split('/').next().unwrap_or(vip);
        // Best effort: arping (iputils-arping) may be missing.
        let _ = std::process::Command::new("arping")
            .args(["-U", "-c", "1", "-w", "1", "-I", iface, addr])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(|mut c| std::thread::spawn(move || c.wait()));
        tracing::info!(vip, iface, "cluster.vip.added");
    } else {
        let out = ip(&["addr", "del", vip, "dev", iface])?;
        if out.status.success() {
            tracing::info!(vip, iface, "cluster.vip.removed");
        }
    }
    Ok(())
}

/// The file a split-brain resolution keeps the discarded copy of a volume in.
use crate::workload::names;

fn copy_path<H: Host + ?Sized>(ctx: &H, volume: &ferry_core::Name) -> PathBuf {
    ctx.store().dir(volume).join("split-brain-copy.raw")
}

/// The discarded copies kept on this node for the workload's volumes, and
/// the diverged files kept for its shares (`share::keep_diverged`).
fn kept_copies<H: Host + ?Sized>(ctx: &H, spec: &WorkloadSpec) -> Vec<String> {
    spec.volumes
        .iter()
        .map(|v| copy_path(ctx, v))
        .filter(|p| p.exists())
        .chain(
            spec.shares
                .iter()
                .filter_map(|s| crate::share::kept_copy(&ctx.cfg().data_dir, s)),
        )
        .map(|p| p.display().to_string())
        .collect()
}

/// `ferry cluster promote WORKLOAD --force`, on a replica: promote it by
/// hand, even outdated or inconsistent — still never while the old
/// primary's lease may run (the witness decides), and never while the peer
/// serves (use a switchover).
pub fn force_promote<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    by_policy: bool,
) -> Result<Value> {
    let status = ctx.cluster().workload(workload)?;
    if status["role"] != "secondary" {
        bail!("workload {workload:?} is already served by this node");
    }
    if status["peer_alive"] == true && status["primary"].is_string() {
        bail!(
            "{} serves workload {workload:?}: use `ferry cluster switchover {workload}` there",
            status["primary"].as_str().unwrap_or("?")
        );
    }
    let tx = ctx
        .cluster()
        .force
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| anyhow!("the cluster manager is not running"))?;
    let _ = tx.send((workload.to_string(), by_policy));
    let me = ctx.identity().node_name.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let serving = ctx
            .cluster()
            .workloads()
            .get(workload)
            .is_some_and(|w| w["primary"] == me.as_str());
        if serving
            && spec(ctx, workload)?
                .volumes
                .iter()
                .all(|v| ctx.primary(v).is_some())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("not promoted within 30 s: see the events in `ferry cluster status` (the witness may still see the old primary's lease)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(workload, node = %me, "cluster.promoted_by_force");
    Ok(json!({"workload": workload, "primary": me, "forced": true}))
}

/// `ferry cluster resolve-split-brain WORKLOAD --keep NODE`. The kept node
/// must be the one serving the workload. On the other node, each volume's
/// diverged image is first copied aside (`split-brain-copy.raw`, kept until
/// `drop-copy`), then its history is rebased on the newest generation both
/// share, so the link resends only the blocks either side changed since
/// (the kept node's dirty map plus the discarded side's suspect blocks;
/// everything when nothing is known).
pub fn resolve_split_brain<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    keep: &str,
    histories: Option<&Value>,
) -> Result<Value> {
    let cfg = ctx
        .cfg()
        .cluster
        .clone()
        .ok_or_else(|| anyhow!("this node has no [cluster] table in its config"))?;
    let me = ctx.identity().node_name.clone();
    if keep != me && keep != cfg.peer {
        bail!("--keep must be {me} or {}", cfg.peer);
    }
    let spec = spec(ctx, workload)?;
    let peer = ctx
        .peers()
        .get(&cfg.peer)
        .ok_or_else(|| anyhow!("peer {} is not registered", cfg.peer))?;
    let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?;
    if keep == me {
        // The winner: must serve the workload; tells the loser its histories.
        if !spec.volumes.iter().all(|v| ctx.primary(v).is_some()) {
            bail!("--keep {me}: this node does not serve {workload:?}; keep the node that serves it (after `ferry cluster promote {workload} --force` there if need be)");
        }
        let hist: serde_json::Map<String, Value> = spec
            .volumes
            .iter()
            .filter_map(|v| {
                ctx.primary(v)
                    .map(|p| (v.to_string(), p.meta_state().generation))
            })
            .map(|(v, g)| {
                let mut ids = vec![g.current()];
                ids.extend(g.ancestors());
                (v, json!(ids))
            })
            .collect();
        let r = client.post(
            &format!("/api/v1/cluster/workloads/{workload}/resolve-split-brain"),
            &json!({"keep": me, "histories": hist}),
        )?;
        for v in &spec.volumes {
            if let Some(p) = ctx.primary(v) {
                p.link.lock().stats.split_brain = false;
            }
        }
        tracing::warn!(workload, keep = %me, discarded = %cfg.peer, "cluster.split_brain.resolved");
        return Ok(
            json!({"workload": workload, "kept": me, "discarded": cfg.peer, "copies": r["copies"]}),
        );
    }
    let Some(histories) = histories else {
        // Asked on the losing side: the winner drives it.
        return client.post(
            &format!("/api/v1/cluster/workloads/{workload}/resolve-split-brain"),
            &json!({"keep": keep}),
        );
    };
    let mut copies = Vec::new();
    for v in &spec.volumes {
        let sec = ctx.replica(v).ok_or_else(|| {
            anyhow!("volume {v:?} is not a replica on {me}: this node still serves it; it cannot be the discarded side")
        })?;
        let copy = keep_copy(ctx, v)?;
        copies.push(copy.display().to_string());
        let theirs: Vec<u64> = histories[v.as_str()]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        let common = rebase(ctx, &sec, &theirs)?;
        tracing::warn!(volume = %v, kept = keep, copy = %copy.display(), common = ?common.map(|c| format!("{c:016x}")), "cluster.split_brain.discarded_here: the diverged image is kept as a copy");
    }
    Ok(json!({"workload": workload, "kept": keep, "discarded": me, "copies": copies}))
}

/// The discarded side of a split brain: this replica's history restarts at
/// the newest generation it shares with `theirs` (the kept side's ids), so
/// the link resends only what either side changed since — this side's
/// changes being its suspect map (all blocks when there is none). Without a
/// shared generation, a full resync. Returns the shared generation.
fn rebase<H: Host + ?Sized>(
    ctx: &H,
    sec: &crate::volume::replica::ReplicaVolume,
    theirs: &[u64],
) -> Result<Option<u64>> {
    let mut m = sec.meta.lock().unwrap_or_else(|p| p.into_inner());
    let mine = m.state().generation.clone();
    let mut ids = vec![mine.current()];
    ids.extend(mine.ancestors());
    let common = ids.iter().position(|id| *id != 0 && theirs.contains(id));
    match common {
        Some(i) => {
            let g = ferry_core::GenerationHistory::from_parts(ids[i], ids[i + 1..].to_vec(), 16);
            m.update(|s| {
                s.generation = g;
                s.consistent = false;
            })?;
            if crate::volume::meta::load_suspect_map(&sec.dir).is_none() {
                // Nothing says which blocks this side changed: all of them.
                let size = ferry_nbd::BlockDevice::size(&sec.dev);
                let all =
                    ferry_core::DirtyMap::all_dirty(size, ctx.cfg().replication.granularity_bytes)?;
                crate::volume::meta::save_suspect_map(&sec.dir, &all)?;
            }
        }
        None => {
            // No shared history left: a full resync.
            m.update(|s| {
                s.generation = ferry_core::GenerationHistory::blank();
                s.consistent = false;
            })?;
        }
    }
    drop(m);
    *sec.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    Ok(common.map(|i| ids[i]))
}

/// Copies a volume's image aside before a split-brain resolution discards it.
fn keep_copy<H: Host + ?Sized>(ctx: &H, v: &ferry_core::Name) -> Result<PathBuf> {
    let copy = copy_path(ctx, v);
    if copy.exists() {
        bail!(
            "{} already holds a discarded copy: `ferry cluster drop-copy` it first",
            copy.display()
        );
    }
    let image = ctx.store().image_path(v);
    let tmp = copy.with_extension("tmp");
    std::fs::copy(&image, &tmp)
        .with_context(|| format!("cannot copy {} aside", image.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &copy)?;
    Ok(copy)
}

/// The peer's own report of a split workload, typed (for the split-brain
/// policy, `Action::AskPeerReport`): a missing figure is unknown, never 0.
fn peer_report<H: Host + ?Sized>(
    ctx: &H,
    workload: &str,
) -> std::result::Result<SideReport, String> {
    let cfg = ctx
        .cfg()
        .cluster
        .clone()
        .ok_or_else(|| "no [cluster] table".to_string())?;
    let peer = ctx
        .peers()
        .get(&cfg.peer)
        .ok_or_else(|| format!("peer {} is not registered", cfg.peer))?;
    let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)
        .map_err(|e| format!("{e:#}"))?;
    #[derive(serde::Deserialize)]
    struct PeerWorkload {
        workload: String,
        changed_bytes: u64,
    }
    #[derive(serde::Deserialize)]
    struct PeerCluster {
        workloads: Vec<serde_json::Value>,
    }
    client
        .get("/api/v1/cluster")
        .map_err(|e| format!("{e:#}"))
        .and_then(|v| serde_json::from_value::<PeerCluster>(v).map_err(|e| e.to_string()))
        .and_then(|c| {
            c.workloads
                .into_iter()
                .filter_map(|w| serde_json::from_value::<PeerWorkload>(w).ok())
                .find(|w| w.workload == workload)
                .ok_or_else(|| format!("{} reports no changed_bytes for {workload:?}", cfg.peer))
        })
        .map(|w| SideReport {
            node: cfg.peer.clone(),
            changed_bytes: w.changed_bytes,
        })
}

/// Carries out a split-brain policy's verdict (decided by the state
/// machine: `Action::SplitBrain`) on the node serving the workload: keep
/// this node's data (the other side is resynced from it), or the peer's
/// (this node copies its images aside, resigns, the peer is promoted by
/// force, and this node comes back as its replica rebased on their shared
/// history).
fn keep_by_policy<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    policy: SplitBrainPolicy,
    keep: &str,
) -> Result<()> {
    let cfg = ctx
        .cfg()
        .cluster
        .clone()
        .ok_or_else(|| anyhow!("no [cluster] table"))?;
    let me = ctx.identity().node_name.clone();
    if keep == me {
        resolve_split_brain(ctx, workload, &me, None)?;
        return Ok(());
    }
    let peer = ctx
        .peers()
        .get(&cfg.peer)
        .ok_or_else(|| anyhow!("peer {} is not registered", cfg.peer))?;
    let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?;
    let spec = spec(ctx, workload)?;
    // Keep the peer's data: this node's copy goes aside — writes frozen
    // first, so the copy is whole and nothing written after it is lost —
    // then it steps down.
    let prims: Vec<_> = spec.volumes.iter().filter_map(|v| ctx.primary(v)).collect();
    for p in &prims {
        p.freeze();
    }
    if let Err(e) = spec
        .volumes
        .iter()
        .try_for_each(|v| keep_copy(ctx, v).map(|_| ()))
    {
        for p in &prims {
            p.unfreeze();
        }
        return Err(e);
    }
    ClusterView::mark(&ctx.cluster().discard_on_demote, workload);
    ctx.cluster().request_resign(
        workload,
        format!("split brain ({policy}): keeping {keep}'s data"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.post(
            &format!("/api/v1/cluster/workloads/{workload}/promote"),
            &json!({"force": true, "by_policy": true}),
        ) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %format!("{e:#}"), "cluster.split_brain.peer_promote_retry");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.context(format!("{} did not take the workload over", cfg.peer))),
        }
    }
    tracing::warn!(workload, kept = %keep, "cluster.split_brain.resolved");
    Ok(())
}

/// `ferry cluster drop-copy WORKLOAD --node NODE`: deletes the copies a
/// split-brain resolution kept on NODE.
pub fn drop_copies<H: Host + ?Sized>(ctx: &H, workload: &str) -> Result<Value> {
    let spec = spec(ctx, workload)?;
    let mut dropped = Vec::new();
    for v in &spec.volumes {
        let p = copy_path(ctx, v);
        match std::fs::remove_file(&p) {
            Ok(()) => dropped.push(p.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot delete {}", p.display())),
        }
    }
    for s in &spec.shares {
        if let Some(p) = crate::share::drop_copy(&ctx.cfg().data_dir, s)? {
            dropped.push(p.display().to_string());
        }
    }
    tracing::warn!(workload, dropped = ?dropped, "cluster.split_brain.copies_dropped");
    Ok(json!({"workload": workload, "node": ctx.identity().node_name, "dropped": dropped}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnations_grow_at_every_start_and_survive_a_lost_counter() {
        let dir = tempfile::tempdir().unwrap();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let first = next_incarnation(dir.path());
        assert!(first >= wall);
        let second = next_incarnation(dir.path());
        assert_eq!(second, first + 1);
        let saved = std::fs::read_to_string(incarnation_path(dir.path())).unwrap();
        assert_eq!(saved.trim(), second.to_string());
        // A counter restored from an old backup, or lost: the wall clock.
        std::fs::write(incarnation_path(dir.path()), "5\n").unwrap();
        assert!(next_incarnation(dir.path()) >= wall);
        std::fs::remove_file(incarnation_path(dir.path())).unwrap();
        assert!(next_incarnation(dir.path()) >= wall);
    }

    #[test]
    fn the_cluster_id_is_the_same_for_both_nodes_and_differs_between_pairs() {
        let k1 = "11".repeat(32);
        let k2 = "22".repeat(32);
        let id = cluster_id(&k1).unwrap();
        assert!(witness::valid_cluster_id(&id), "{id}");
        assert_eq!(cluster_id(&k1), Some(id.clone()));
        assert_ne!(cluster_id(&k2), Some(id.clone()));
        assert!(!k1.contains(&id), "the id is not the key");
        assert_eq!(cluster_id("not hex"), None);
    }
}
