//! The replies: what each action answers, field by field, exactly as the
//! JSON on the wire (names, nesting, which fields may be `null` and which
//! may be absent). [`Reply`] holds any of them; [`Reply::decode`] reads
//! the answer to an action of a known kind.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::Role;
use crate::error::ActionError;
use crate::request::WorkloadSpec;
use crate::routes::ActionKind;

/// Every error answer: what went wrong, in words (the status says the kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// A record the agent found damaged and set aside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DamagedObject {
    /// `volume`, `share`, `migration`, …
    pub kind: String,
    pub name: String,
    pub path: String,
    pub error: String,
}

/// `GET /api/v1/node`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeInfo {
    pub node_name: String,
    pub fingerprint: String,
    pub cert_pem: String,
    pub api: String,
    pub replication: String,
    pub nbd: String,
    pub nbd_tls: Option<String>,
    pub heartbeat: Vec<String>,
    pub version: String,
    pub uptime_seconds: u64,
    pub free_bytes: Option<u64>,
    pub damaged: Vec<DamagedObject>,
}

/// A registered peer as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PeerInfo {
    pub name: String,
    pub api: String,
    pub replication: String,
    pub fingerprint: String,
    /// Whether it answered this node's last probe (every
    /// `api.peer_probe_interval_ms`); `null` before the first.
    #[serde(default)]
    pub up: Option<bool>,
    /// Its version, from its last answer.
    #[serde(default)]
    pub version: Option<String>,
    /// Since when `up` has been what it is (Unix ms).
    #[serde(default)]
    pub since_unix_ms: Option<u64>,
    /// Why the last probe failed.
    #[serde(default)]
    pub probe_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Paired {
    pub paired: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Repinned {
    pub repinned: Option<String>,
    pub fingerprint: String,
}

/// `POST /api/v1/node/rekey`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rekeyed {
    pub node: String,
    pub old_fingerprint: String,
    pub fingerprint: String,
    pub peers: Vec<String>,
    pub peers_still_accepting_old: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenRotated {
    pub node: String,
    pub token_file: String,
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    /// `null` for the `api.token` file.
    pub created_unix: Option<u64>,
    /// Where it is valid: `node` (this node only).
    pub scope: String,
}

/// `POST /api/v1/tokens`: the token, shown this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenCreated {
    pub name: String,
    pub role: Role,
    pub token: String,
    pub node: String,
    pub scope: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenRevoked {
    pub revoked: String,
    pub node: String,
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeInfo {
    pub name: String,
    pub id: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub exported: bool,
    pub path: String,
}

/// An image imported as a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImageImported {
    pub path: String,
    pub format: String,
    /// The image's virtual size, rounded up to 512 bytes: the volume's size.
    pub size_bytes: u64,
    pub volume: VolumeInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Deleted {
    pub deleted: String,
}

/// `GET /api/v1/volumes/{name}/hashes`: `hashes`, or with `?warm=1` only
/// how many `leaves` were brought up to date.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BlockHashes {
    pub granularity_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaves: Option<u64>,
}

/// `GET /api/v1/volumes/{name}/generation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Generation {
    pub volume: String,
    /// [current, ancestors…].
    pub ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

/// `POST /api/v1/volumes/{name}/verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeVerify {
    pub volume: String,
    pub peer: String,
    pub equal: bool,
    pub root: String,
    pub peer_root: String,
    pub blocks: u64,
    pub differing: Vec<ByteRange>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VolumePromoted {
    pub promoted: String,
    /// Hex, 16 digits.
    pub generation: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromotedVolume {
    pub name: String,
    pub generation: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TakenOver {
    pub promoted: Vec<PromotedVolume>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Armed {
    pub armed: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MarkedInconsistent {
    pub inconsistent: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReplicaCreated {
    pub replica: String,
}

/// `PUT /api/v1/workloads/{name}`: the definition and where it was saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkloadUpdated {
    #[serde(flatten)]
    pub spec: WorkloadSpec,
    pub updated_on: Vec<String>,
}

/// What a hook did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HookRun {
    pub hook: String,
    pub ok: bool,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub elapsed_ms: u64,
    /// The tail of its stdout and stderr.
    pub output: String,
}

/// `POST /api/v1/workloads/{name}/hooks/{which}`: `null` when there was
/// nothing to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HookResult {
    pub run: Option<HookRun>,
}

/// A share's replica state as a migration's status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MigrationShare {
    pub share: String,
    pub role: String,
    pub state: String,
    pub pending_paths: u64,
    pub last_error: Option<String>,
}

/// A scheduled cutover as `migrate status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleView {
    pub at: Option<String>,
    pub window: Option<String>,
    pub deadline: Option<String>,
    pub recurring: bool,
    /// `pending`, `cutting-over`, `done`, `expired`, …
    pub state: String,
    pub attempts: u32,
    pub cutovers: u32,
    pub last_attempt_at: Option<String>,
    pub last_outcome: Option<String>,
    pub reason: Option<String>,
    pub next_window_opens_at: Option<String>,
}

/// One step of a cutover, in µs from its start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CutoverStep {
    pub step: String,
    pub at_us: u64,
}

/// `POST /api/v1/migrations/{name}/cutover`: how the cutover went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CutoverReport {
    pub workload: String,
    pub from: String,
    pub to: String,
    /// Freeze → the target serving, ms (0.1 ms resolution).
    pub downtime_ms: f64,
    /// Stop hook → check passing, ms.
    pub outage_ms: Option<f64>,
    pub steps_us: Vec<CutoverStep>,
    pub hooks: Vec<HookRun>,
    pub target_healthy: bool,
    /// A VM workload: how its VM moved (live or cold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Box<VmMoveReport>>,
    /// The target did not come up: the reverse cutover that returned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_cutover: Option<Box<ReverseOutcome>>,
}

/// A reverse cutover after a failed start: its report, or why it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ReverseOutcome {
    Done(Box<CutoverReport>),
    Failed(ErrorBody),
}

/// One workload of `POST /api/v1/migrations-cutover-all`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum CutoverOutcome {
    Skipped(CutoverSkipped),
    Done(Box<CutoverReport>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CutoverSkipped {
    pub workload: String,
    pub skipped: String,
}

/// A test instance (`POST /api/v1/migrations/{name}/test`, and on the
/// target `POST /api/v1/workloads/{name}/test`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TestReport {
    pub workload: String,
    pub node: String,
    pub exports: Vec<String>,
    pub started: bool,
    pub check_ok: bool,
    pub start_to_check_ms: u64,
    pub hooks: Vec<HookRun>,
    pub started_unix: u64,
    /// On the source: how long its volumes were frozen for the barrier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_frozen_us: Option<u64>,
    /// On the source: where the instance runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The end of a test instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TestEnded {
    pub workload: String,
    pub node: String,
    pub ended: bool,
    pub overlay_bytes_discarded: u64,
    pub snapshot_bytes_saved: u64,
    pub hooks: Vec<HookRun>,
}

/// The status of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MigrationStatus {
    pub workload: String,
    pub source: String,
    pub target: String,
    pub mode: String,
    /// `syncing`, `ready`, `cutting-over`, `completed`, `failed`, `rolled-back`, …
    pub phase: String,
    pub bytes_remaining: u64,
    pub backlog_bytes: u64,
    pub merkle_stale_bytes: u64,
    pub shares: Vec<MigrationShare>,
    pub eta_seconds: Option<f64>,
    pub bandwidth_bytes_per_s: u64,
    pub write_rate_bytes_per_s: u64,
    /// Over the convergence window: what writes add to the bytes still to
    /// send (re-dirtied blocks, a growing backlog), and what the copier
    /// sends of them; `not_converging` compares the two.
    #[serde(default)]
    pub dirty_rate_bytes_per_s: u64,
    #[serde(default)]
    pub copy_rate_bytes_per_s: u64,
    /// The copy rate limit (`migrate start/set --max-rate`); `null`: none.
    #[serde(default)]
    pub max_rate_bytes_per_s: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub not_converging: bool,
    /// While `not_converging`: what to do about it.
    #[serde(default)]
    pub advice: Option<String>,
    pub auto_converge: bool,
    pub throttle_pct: u64,
    pub reason: Option<String>,
    pub started_unix: u64,
    pub last_cutover: Option<CutoverReport>,
    pub reverse: bool,
    pub finalized: bool,
    pub test: Option<TestReport>,
    pub auto_cutover: bool,
    pub auto_cutover_attempts: u32,
    pub scheduled_at: Option<String>,
    pub schedule: Option<ScheduleView>,
    /// A live VM move under way (its RAM pre-copy): QEMU's figures.
    #[serde(default)]
    pub vm: Option<VmMoveProgress>,
}

/// A live VM move's RAM pre-copy, from QEMU's `query-migrate` on the
/// source (the disks' side is the migration's own `bytes_remaining`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmMoveProgress {
    /// `preparing` (the target's VM starting), then QEMU's migration
    /// status: `setup`, `active`, `device`, `completed`, `failed`, …
    pub state: String,
    pub ram_total_bytes: u64,
    pub ram_transferred_bytes: u64,
    pub ram_remaining_bytes: u64,
    /// Pages the guest dirties per second (QEMU's `dirty-pages-rate`).
    pub dirty_pages_rate: u64,
    /// RAM passes so far (QEMU's `dirty-sync-count`).
    pub dirty_sync_count: u64,
    /// QEMU's estimate of the pause if it stopped the guest now.
    pub expected_downtime_ms: Option<u64>,
    /// auto-converge's vCPU throttle, percent.
    pub cpu_throttle_percent: u64,
    /// Bytes the stream carried to the target (ferry's tunnel).
    pub stream_bytes: u64,
    pub elapsed_ms: u64,
}

/// How a VM moved in a cutover or a switchover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmMoveReport {
    /// `live` (RAM and disks together, the guest paused) or `cold` (stopped
    /// here, booted at the target).
    pub mode: String,
    /// The guest's pause: QEMU's `STOP` of the source's vCPUs to the
    /// target's answer that its VM continued, on the source's clock.
    pub downtime_ms: Option<f64>,
    /// From the move's start to QEMU's `completed` (the RAM pre-copy).
    pub precopy_ms: f64,
    /// ferry's steps inside the pause, ms after the vCPUs stopped.
    pub freeze_ms: Option<f64>,
    pub drain_ms: Option<f64>,
    pub verify_ms: Option<f64>,
    pub commit_ms: Option<f64>,
    /// QEMU's own statistics at completion (`query-migrate`).
    pub qemu: QemuMigrationStats,
    /// Bytes ferry's tunnel carried to the target.
    pub stream_bytes: u64,
}

/// QEMU's `query-migrate` at completion, as reported by the source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QemuMigrationStats {
    /// QEMU's measured downtime (its last stop-and-copy), ms.
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub transferred_bytes: Option<u64>,
    pub ram_total_bytes: Option<u64>,
    pub dirty_sync_count: Option<u64>,
    /// Mbit/s, as QEMU says it.
    pub mbps: Option<f64>,
}

/// `POST /api/v1/workloads/{name}/vm-incoming`: the target's VM waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmIncoming {
    pub workload: String,
    /// The one-time token the source's stream presents.
    pub token: String,
    /// The standby exports the VM opened (the replicas, writable after the
    /// commit).
    pub exports: Vec<String>,
}

/// `DELETE /api/v1/workloads/{name}/vm-incoming`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmIncomingCancelled {
    pub workload: String,
    /// A waiting VM was ended.
    pub vm_ended: bool,
    pub exports_removed: Vec<String>,
}

/// `POST /api/v1/migrations/{name}/schedule`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleSet {
    pub workload: String,
    pub scheduled_at: Option<String>,
    pub schedule: ScheduleView,
}

/// `DELETE /api/v1/migrations/{name}/schedule`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleCancelled {
    pub workload: String,
    pub cancelled: bool,
    pub was: ScheduleView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Reversed {
    pub reverse: String,
}

/// `POST /api/v1/migrations/{name}/finalize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Finalized {
    pub workload: String,
    pub finalized: bool,
    pub old_source: String,
    pub note: String,
}

/// A volume's replication, as its primary sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PrimaryReplication {
    pub volume: String,
    /// `primary`.
    pub role: String,
    pub peer: Option<String>,
    pub stream: Option<String>,
    /// `sync` or `async`.
    pub mode: String,
    /// `disconnected`, `resyncing`, `connected`, `split-brain`.
    pub link: String,
    /// The replica's state: `up-to-date`, `outdated`, `inconsistent`.
    pub state: String,
    pub synced_percent: f64,
    pub dirty_bytes: u64,
    pub backlog_bytes: u64,
    pub behind: bool,
    pub bytes_sent: u64,
    pub copy_bytes_sent: u64,
    pub write_bytes_sent: u64,
    pub rate_bytes_per_s: u64,
    pub eta_seconds: Option<u64>,
    pub max_rate_bytes_per_s: Option<u64>,
    pub merkle_stale_blocks: u64,
    pub last_error: Option<String>,
}

/// A volume's replication, as its replica sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaReplication {
    pub volume: String,
    /// `secondary`.
    pub role: String,
    pub peer: Option<String>,
    /// `up-to-date` or `inconsistent`.
    pub state: String,
    pub received_seq: u64,
    pub bytes_applied: u64,
    pub merkle_stale_blocks: u64,
    pub last_error: Option<String>,
}

/// The status of one volume's replication (docs/status.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ReplicationStatus {
    Primary(PrimaryReplication),
    Replica(ReplicaReplication),
}

impl ReplicationStatus {
    pub fn volume(&self) -> &str {
        match self {
            ReplicationStatus::Primary(p) => &p.volume,
            ReplicationStatus::Replica(r) => &r.volume,
        }
    }
    pub fn state(&self) -> &str {
        match self {
            ReplicationStatus::Primary(p) => &p.state,
            ReplicationStatus::Replica(r) => &r.state,
        }
    }
    pub fn last_error(&self) -> Option<&str> {
        match self {
            ReplicationStatus::Primary(p) => p.last_error.as_deref(),
            ReplicationStatus::Replica(r) => r.last_error.as_deref(),
        }
    }
}

/// The status of one share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShareStatus {
    pub name: String,
    /// `sync` or `async`.
    pub mode: String,
    /// `primary` or `replica`.
    pub role: String,
    pub serving: bool,
    pub path: String,
    pub peer: Option<String>,
    pub state: String,
    pub files: u64,
    pub bytes: u64,
    pub pending_paths: u64,
    pub ops_sent: u64,
    pub bytes_sent: u64,
    pub resync_files: u64,
    pub resync_bytes: u64,
    pub delta_reused_bytes: u64,
    pub unreadable_files: u64,
    pub crash_consistent: bool,
    pub lag_ms: u64,
    pub lag_p50_ms: u64,
    pub lag_p99_ms: u64,
    pub watched_dirs: u64,
    pub unwatched_dirs: u64,
    pub overflows: u64,
    pub rescans: u64,
    pub passthrough_opens: u64,
    pub fuse_read_bytes: u64,
    pub last_error: Option<String>,
}

/// `GET /api/v1/shares/{name}/digest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShareDigest {
    pub share: String,
    pub digest: String,
    pub files: u64,
    pub bytes: u64,
}

/// One entry of a share's copy (hex-encoded path and record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShareEntry {
    pub p: String,
    pub r: String,
    pub h: Option<String>,
    /// ctime, ns, as a decimal string.
    pub c: String,
}

/// `GET /api/v1/shares/{name}/files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShareFiles {
    pub share: String,
    pub entries: Vec<ShareEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShareDifference {
    pub path: String,
    pub why: String,
}

/// `POST /api/v1/shares/{name}/verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShareVerifyReport {
    pub share: String,
    pub peer: String,
    pub equal: bool,
    pub entries: u64,
    pub files: u64,
    pub differing_count: u64,
    pub differing: Vec<ShareDifference>,
    pub changed_during_verify: u64,
    pub elapsed_ms: u64,
}

/// A replica of an HA workload and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HaReplica {
    pub node: String,
    pub state: String,
}

/// Something the cluster told the operator (`event` names it; the other
/// fields depend on it: `why`, `silent_ms`, `epoch`, `primary`,
/// `failover_ms`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterEvent {
    pub event: String,
    pub workload: String,
    pub node: String,
    pub at_unix_ms: u64,
    #[serde(flatten)]
    pub detail: BTreeMap<String, Value>,
}

/// One HA workload as this node's cluster manager sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HaWorkloadStatus {
    pub workload: String,
    pub preferred: String,
    /// This node's role: `primary` or `secondary`.
    pub role: String,
    /// Who serves it, if anyone does now.
    pub primary: Option<String>,
    pub epoch: u64,
    pub peer: String,
    pub peer_alive: bool,
    pub writes_held: bool,
    pub candidate: bool,
    pub accept_loss: bool,
    pub split_brain: bool,
    pub changed_bytes: u64,
    /// Copies split-brain resolutions kept here.
    pub copies: Vec<String>,
    pub replicas: Vec<HaReplica>,
    pub events: Vec<ClusterEvent>,
    /// The workload's VM on this node: `running`, or `incoming` (paused:
    /// waiting for, or holding, a live move's RAM); `null`: none runs here.
    #[serde(default)]
    pub vm: Option<String>,
}

/// `GET /api/v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterStatus {
    pub node: String,
    pub standby: bool,
    pub state: String,
    pub configured: bool,
    /// The witness this node asks (`null`: none configured).
    #[serde(default)]
    pub witness: Option<WitnessState>,
    pub workloads: Vec<HaWorkloadStatus>,
    pub damaged: Vec<DamagedObject>,
}

/// The witness as this node hears it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WitnessState {
    pub address: String,
    /// When a signed answer of it last arrived (Unix ms; `null`: none since
    /// this agent started — it is asked only while a workload is under HA).
    pub answered_unix_ms: Option<u64>,
    /// Whether it answered within the lease length (`cluster.lease_ms`).
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterAdded {
    pub workload: String,
    pub preferred: String,
    /// This node's role in it.
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterRemoved {
    pub workload: String,
    pub removed: bool,
}

/// `POST /api/v1/cluster/workloads/{name}/switchover`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SwitchoverReport {
    pub workload: String,
    pub from: String,
    pub to: String,
    /// Freeze → both copies proven equal.
    pub verified_ms: u64,
    /// Freeze → the peer serving. A VM that moved live: the guest's pause
    /// (QEMU stopped its vCPUs here → the peer's VM runs), as `vm.downtime_ms`.
    pub downtime_ms: u64,
    /// A VM workload whose VM ran here: how it moved (live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmMoveReport>,
}

/// `POST /api/v1/cluster/standby`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StandbySet {
    pub node: String,
    pub standby: bool,
    /// The workloads switched over to the peer.
    pub moved: Vec<SwitchoverReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForcePromoted {
    pub workload: String,
    pub primary: String,
    pub forced: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SplitBrainResolved {
    pub workload: String,
    pub kept: String,
    pub discarded: String,
    /// Where the discarded node keeps its diverged copies.
    pub copies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CopiesDropped {
    pub workload: String,
    pub node: String,
    pub dropped: Vec<String>,
}

/// One audit record: its place in the chain and what it says (an
/// action's request or result, an automatic decision, a checkpoint note).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditRecord {
    pub seq: u64,
    /// BLAKE3 of (seq, the previous record's hash, this record), hex.
    pub hash: String,
    pub record: Value,
}

/// `GET /api/v1/config`: the agent's effective config, as its file's
/// tables and keys (`[api] body_bytes_max` is `config.api.body_bytes_max`),
/// every default filled in. Changed only in the file, read at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EffectiveConfig {
    pub node: String,
    pub config: Value,
}

/// `ferry audit list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditList {
    pub node: String,
    /// The chain's head: its last record.
    pub head_seq: u64,
    pub records: Vec<AuditRecord>,
    /// Older records that matched but were left out (at most 10,000 are
    /// answered, the newest): ask again with a later `since`.
    pub omitted: u64,
}

/// Who holds heads of this node's chain, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditHolder {
    /// `peer b`, `witness 127.0.0.1:7790`.
    pub holder: String,
    /// Heads it holds (`null`: none could be asked for, see `note`).
    pub heads: Option<u64>,
    /// The newest head it holds (`SEQ:HASH`).
    pub newest: Option<String>,
    pub note: String,
}

/// `ferry audit verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditVerify {
    pub node: String,
    /// The chain is whole and matches every head held elsewhere.
    pub ok: bool,
    pub records: u64,
    pub first_seq: u64,
    pub head_seq: u64,
    pub head_hash: String,
    /// The pruned prefix's head (`SEQ:HASH`), if the log was pruned.
    pub checkpoint: Option<String>,
    pub holders: Vec<AuditHolder>,
    pub heads_matched: u64,
    /// Held heads older than the checkpoint (their records were pruned).
    pub heads_pruned: u64,
    /// What is wrong (the first problem found).
    pub problem: Option<String>,
    /// The first bad record's sequence number, where known.
    pub first_bad_seq: Option<u64>,
}

/// The answer to a node's `POST /api/v1/audit/heads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditHeadKept {
    pub holder: String,
    pub node: String,
    /// False: not newer than the last head held (kept as it was).
    pub kept: bool,
}

/// The heads of a node's chain another node holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditHeads {
    pub holder: String,
    pub node: String,
    /// Oldest first.
    pub heads: Vec<crate::request::AuditHead>,
}

/// A console session (`POST`/`GET /api/v1/session`). Its cookie is not in
/// the reply (HttpOnly: no script reads it); `csrf` goes back in the
/// `X-Ferry-CSRF` header of every state-changing request the cookie
/// authenticates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionInfo {
    /// The token's name.
    pub name: String,
    pub role: crate::auth::Role,
    pub expires_unix: u64,
    pub csrf: String,
}

/// `DELETE /api/v1/session`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionEnded {
    pub ended: bool,
}

/// One point of a series: the samples of one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatsPoint {
    /// Start of the interval, Unix s.
    pub t: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Samples aggregated.
    pub count: u32,
}

/// `GET /api/v1/stats`: a series' history. Intervals without samples
/// (the agent was down, the object did not exist) are absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatsSeries {
    pub series: String,
    pub node: String,
    pub from: u64,
    pub to: u64,
    /// The step of the points, s.
    pub step_s: u64,
    /// The step of the tier read (10, 60 or 3600 s).
    pub tier_step_s: u64,
    pub points: Vec<StatsPoint>,
}

/// `GET /api/v1/stats/series`: the series this node records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatsSeriesList {
    pub node: String,
    pub series: Vec<String>,
    /// The most one series takes on disk.
    pub series_bytes_max: u64,
    /// What the series files take on disk now (allocated blocks).
    pub disk_bytes: u64,
    /// `history.enabled`.
    pub enabled: bool,
}

/// A phase of a migration and when it began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReportPhase {
    pub phase: String,
    pub at_unix: u64,
}

/// Mean and peak of a rate over a migration, from the statistics history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReportRate {
    pub mean_bytes_per_s: f64,
    pub peak_bytes_per_s: f64,
}

/// `GET /api/v1/migrations/{name}/report`: a migration after the fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MigrationReport {
    pub workload: String,
    pub source: String,
    pub target: String,
    pub mode: String,
    /// Its phase now (`completed` once cut over).
    pub phase: String,
    pub completed: bool,
    pub started_unix: u64,
    /// When it reached its final phase (the last mark of the timeline).
    pub ended_unix: Option<u64>,
    /// Each phase and when it began, oldest first.
    pub timeline: Vec<ReportPhase>,
    /// Bytes sent on the links over the migration (the integral of the
    /// workload's `link_bytes_per_s` history; `null` without history).
    pub bytes_moved: Option<u64>,
    pub link_rate: Option<ReportRate>,
    pub write_rate: Option<ReportRate>,
    /// The cutover: freeze → target serving, and stop hook → check passing.
    pub downtime_ms: Option<f64>,
    pub outage_ms: Option<f64>,
    /// The verified cutover passed: the target's data compared equal and
    /// it came up healthy.
    pub verified: Option<bool>,
    pub cutover: Option<CutoverReport>,
    /// Who started it and who cut it over, from the source node's audit
    /// log (`token NAME (ROLE)`, `auto-cutover`, `scheduled cutover`;
    /// `null` when the log has no record of it).
    pub started_by: Option<String>,
    pub cut_over_by: Option<String>,
    pub reason: Option<String>,
}

/// What an estimate observes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EstimateSource {
    /// `volume`, `workload`, `share` or `device`.
    pub kind: String,
    /// The volume's, workload's or share's name, or the device's path.
    pub name: String,
    /// A workload's volumes (its shares are not observed); else `[name]`.
    pub members: Vec<String>,
}

/// W(T) at one window length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkingSetPoint {
    pub window_s: u64,
    /// The most distinct blocks (files, for a share) written within one
    /// window of this length.
    pub max_keys: u64,
    pub mean_keys: f64,
    /// `max_keys` × the block size (for files: × the mean bytes per write).
    pub max_bytes: u64,
    /// Windows measured.
    pub windows: u64,
}

/// `GET /api/v1/estimates/{name}`: one observation (`ferry estimate status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EstimateStatus {
    pub name: String,
    pub node: String,
    pub source: EstimateSource,
    /// `observing`, `waiting` (the source is not here or not primary: not
    /// counted as observed), `done` (its duration is over), `stopped`,
    /// `failed`.
    pub state: String,
    /// Why it waits or failed.
    pub error: Option<String>,
    /// `filter` (ferry's own write path), `watcher` (a share's op stream),
    /// `tracepoint` (block:block_rq_issue: the written sectors) or
    /// `diskstats` (bytes only).
    pub method: String,
    pub started_unix_ms: u64,
    pub duration_s: u64,
    pub ends_unix_ms: u64,
    /// Time observed (gaps and agent restarts not counted), s.
    pub observed_s: f64,
    /// Time not observed since the start (agent down, source away), s.
    pub unobserved_s: f64,
    /// observed / duration, 0 to 1.
    pub progress: f64,
    pub bytes_written: u64,
    pub write_ios: u64,
    pub read_ios: u64,
    /// Over the last full 10 s interval.
    pub write_bytes_per_s: f64,
    pub write_iops: f64,
    pub read_iops: f64,
    /// Bytes the data takes (holes not counted): what an initial sync
    /// copies. For a share: the files' bytes. For a device: its size
    /// (a device's holes are not known).
    pub allocated_bytes: u64,
    pub size_bytes: u64,
    /// `blocks` or `files`.
    pub key_kind: String,
    /// The replication granularity (blocks), or `null` (files).
    pub block_bytes: Option<u64>,
    pub working_set: Vec<WorkingSetPoint>,
    /// diskstats only: unique bytes are not known, W(T) is not measured;
    /// `bytes_written` bounds them from above.
    pub unique_bytes_upper_bound: bool,
    /// Write events the observer could not keep up with (its buffer,
    /// `estimate.tap_events_max`, was full): W(T) is then a lower bound.
    pub events_dropped: u64,
    /// What the observation holds in memory, and its bound.
    pub memory_bytes: u64,
    pub memory_bound_bytes: u64,
}

/// One disk of an archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ArchiveDisk {
    pub name: String,
    pub size_bytes: u64,
    /// Merkle root (hex) of its bytes, as replication's verify computes it.
    pub merkle_root: String,
    /// The generation minted at the barrier (hex): offline seeding's key.
    pub generation: Option<String>,
    pub volume_id: Option<String>,
}

/// An archive create or restore the agent runs (`ferry archive create
/// volume/V …`, `ferry archive restore … --volume V`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ArchiveJob {
    /// The job: the archive's name (create) or `restore-VOLUME`.
    pub name: String,
    /// `create` or `restore`.
    pub kind: String,
    pub archive: String,
    pub store: String,
    /// `volume/NAME`, `workload/NAME`, `share/NAME` (create) or the volume
    /// restored into.
    pub source: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    pub started_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_s: f64,
    pub eta_s: Option<f64>,
    pub error: Option<String>,
    /// `flush-barrier`, `file-level`, …
    pub consistency: Option<String>,
    pub disks: Vec<ArchiveDisk>,
    /// Chunks the archive names, those it added to the store, and their
    /// bytes on disk (compressed).
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
}

/// `POST /api/v1/probes`: one measurement of the replication link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProbeResult {
    /// From this node…
    pub node: String,
    /// …to this one.
    pub to: String,
    pub at_unix_ms: u64,
    /// Each measurement's length, s.
    pub seconds: f64,
    /// Bytes acknowledged by the peer over the real (mutual TLS)
    /// replication transport, unlimited.
    pub bytes: u64,
    pub throughput_bytes_per_s: f64,
    /// At the `--max-rate` asked for, if any.
    pub limited: Option<ProbeLimited>,
    /// Round trip of a small frame before the measurement (idle link).
    pub rtt_ms_idle: f64,
    /// Round trips of small frames during the measurement (loaded link):
    /// median and 99th percentile.
    pub rtt_ms_p50: f64,
    pub rtt_ms_p99: f64,
    /// The estimates observing on this node during the probe and their
    /// write rate: the load the probe ran under (a probe on an idle
    /// machine overstates what a migration will get).
    pub under_load: Vec<ProbeLoad>,
}

/// A probe's measurement at a rate limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProbeLimited {
    pub max_rate_bytes_per_s: u64,
    pub bytes: u64,
    pub throughput_bytes_per_s: f64,
}

/// An estimate's write rate while a probe ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProbeLoad {
    pub estimate: String,
    pub write_bytes_per_s: f64,
}

/// The link a forecast assumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReportLink {
    pub bandwidth_bytes_per_s: f64,
    pub max_rate_bytes_per_s: Option<f64>,
    /// `probe` (the last `ferry estimate probe --to NODE`) or `given`
    /// (`--bandwidth`).
    pub from: String,
    pub probe: Option<ProbeResult>,
}

/// `GET /api/v1/estimates/{name}/report`: the forecast of a migration of
/// what the estimate observed, every figure with its formula and inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EstimateReport {
    pub name: String,
    pub node: String,
    pub source: EstimateSource,
    pub generated_unix_ms: u64,
    pub observed_s: f64,
    /// `max` or `mean`: the statistic of W(T) used.
    pub stat: String,
    pub link: ReportLink,
    pub allocated_bytes: u64,
    pub size_bytes: u64,
    /// The observation's state when the report was made (`status` fields).
    pub status: EstimateStatus,
    /// What to keep in mind reading it (short observation, bounds).
    pub warnings: Vec<String>,
    pub forecast: ferry_core::estimate::Report,
    /// With `with`: the migrations sharing the link, in the order that
    /// finishes soonest.
    pub shared_link: Option<ferry_core::estimate::SharedLinkPlan>,
}

macro_rules! replies {
    ($( $kind:ident => $variant:ident($ty:ty); )*) => {
        /// Any action's reply. Encoded as the inner value (no tag): the
        /// action it answers says which it is.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(untagged)]
        pub enum Reply { $( $variant($ty), )* }

        impl Reply {
            /// Reads the answer to an action of `kind`.
            pub fn decode(kind: ActionKind, v: Value) -> Result<Reply, ActionError> {
                match kind {
                    $( ActionKind::$kind => serde_json::from_value::<$ty>(v)
                        .map(Reply::$variant)
                        .map_err(|e| ActionError::new(
                            crate::error::ErrorKind::Internal,
                            format!("the answer to {} does not fit its type: {e}", kind.name()),
                        )), )*
                }
            }

            /// The JSON Schema of the reply to `kind`, from `generator`.
            pub fn schema_for(
                kind: ActionKind,
                generator: &mut schemars::SchemaGenerator,
            ) -> schemars::Schema {
                match kind {
                    $( ActionKind::$kind => generator.subschema_for::<$ty>(), )*
                }
            }
        }
    };
}

replies! {
    GetNode => Node(NodeInfo);
    ListNodes => Nodes(Vec<PeerInfo>);
    AddNode => NodeAdded(PeerInfo);
    Pair => Paired(Paired);
    Repin => Repinned(Repinned);
    Rekey => Rekeyed(Rekeyed);
    RotateToken => TokenRotated(TokenRotated);
    ListTokens => Tokens(Vec<TokenInfo>);
    CreateToken => TokenCreated(TokenCreated);
    RevokeToken => TokenRevoked(TokenRevoked);
    ListVolumes => Volumes(Vec<VolumeInfo>);
    CreateVolume => VolumeCreated(VolumeInfo);
    ImportImage => ImageImported(ImageImported);
    DeleteVolume => VolumeDeleted(Deleted);
    VolumeHashes => Hashes(BlockHashes);
    VolumeGeneration => Generation(Generation);
    VerifyVolume => VolumeVerify(VolumeVerify);
    PromoteVolume => VolumePromoted(VolumePromoted);
    ArmSnapshot => Armed(Armed);
    Takeover => TakenOver(TakenOver);
    MarkInconsistent => MarkedInconsistent(MarkedInconsistent);
    CreateReplica => ReplicaCreated(ReplicaCreated);
    ListWorkloads => Workloads(Vec<WorkloadSpec>);
    CreateWorkload => WorkloadCreated(WorkloadSpec);
    GetWorkload => Workload(WorkloadSpec);
    PutWorkload => WorkloadUpdated(WorkloadUpdated);
    DeleteWorkload => WorkloadDeleted(Deleted);
    PrepareVmIncoming => VmIncomingReady(VmIncoming);
    CancelVmIncoming => VmIncomingCancelled(VmIncomingCancelled);
    StartTestHere => TestStartedHere(TestReport);
    EndTestHere => TestEndedHere(TestEnded);
    RunHook => Hook(HookResult);
    ListMigrations => Migrations(Vec<MigrationStatus>);
    StartMigration => MigrationStarted(MigrationStatus);
    GetMigration => Migration(MigrationStatus);
    SetMigration => MigrationSet(MigrationStatus);
    CutoverAll => CutoverAll(Vec<CutoverOutcome>);
    Cutover => Cutover(CutoverReport);
    ScheduleCutover => ScheduleSet(ScheduleSet);
    CancelCutover => ScheduleCancelled(ScheduleCancelled);
    ReverseMigration => Reversed(Reversed);
    Rollback => RolledBack(CutoverReport);
    Finalize => Finalized(Finalized);
    StartTest => TestStarted(TestReport);
    EndTest => TestEnded(TestEnded);
    ListReplications => Replications(Vec<ReplicationStatus>);
    StartReplication => ReplicationStarted(ReplicationStatus);
    GetReplication => Replication(ReplicationStatus);
    SetReplication => ReplicationSet(ReplicationStatus);
    StopReplication => ReplicationStopped(ReplicationStatus);
    ListShares => Shares(Vec<ShareStatus>);
    CreateShare => ShareCreated(ShareStatus);
    GetShare => Share(ShareStatus);
    ShareDigest => ShareDigest(ShareDigest);
    ShareFiles => ShareFiles(ShareFiles);
    VerifyShare => ShareVerify(ShareVerifyReport);
    ClusterStatus => Cluster(ClusterStatus);
    ClusterAdd => ClusterAdded(ClusterAdded);
    ClusterRemove => ClusterRemoved(ClusterRemoved);
    ClusterStandby => Standby(StandbySet);
    ClusterPromote => ForcePromoted(ForcePromoted);
    ClusterResolve => SplitBrainResolved(SplitBrainResolved);
    ClusterDropCopy => CopiesDropped(CopiesDropped);
    ClusterSwitchover => Switchover(SwitchoverReport);
    OpenApi => OpenApi(Value);
    ListAudit => Audit(AuditList);
    VerifyAudit => AuditVerified(AuditVerify);
    PutAuditHead => AuditHeadKept(AuditHeadKept);
    GetAuditHeads => AuditHeads(AuditHeads);
    CreateSession => SessionCreated(SessionInfo);
    GetSession => Session(SessionInfo);
    DeleteSession => SessionEnded(SessionEnded);
    Events => Events(Value);
    GetStats => Stats(StatsSeries);
    ListStats => StatsSeriesList(StatsSeriesList);
    MigrationReport => MigrationReport(MigrationReport);
    GetConfig => Config(EffectiveConfig);
    ListEstimates => Estimates(Vec<EstimateStatus>);
    StartEstimate => EstimateStarted(EstimateStatus);
    GetEstimate => Estimate(EstimateStatus);
    StopEstimate => EstimateStopped(EstimateStatus);
    DeleteEstimate => EstimateDeleted(Deleted);
    EstimateReport => EstimateReport(Box<EstimateReport>);
    ProbeLink => Probe(ProbeResult);
    ListProbes => Probes(Vec<ProbeResult>);
    CreateArchive => ArchiveJobStarted(ArchiveJob);
    RestoreArchive => RestoreJobStarted(ArchiveJob);
    ListArchiveJobs => ArchiveJobs(Vec<ArchiveJob>);
    GetArchiveJob => ArchiveJob(ArchiveJob);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_their_wire_shape() {
        // A replica's status is not read as a primary's, and back.
        let v = serde_json::json!({"volume": "v", "role": "secondary", "peer": "a",
            "state": "up-to-date", "received_seq": 3, "bytes_applied": 4,
            "merkle_stale_blocks": 0, "last_error": null});
        let r = Reply::decode(ActionKind::GetReplication, v.clone()).unwrap();
        assert!(matches!(
            r,
            Reply::Replication(ReplicationStatus::Replica(_))
        ));
        assert_eq!(serde_json::to_value(&r).unwrap(), v);
        // A skipped cutover is not a report, and a wrong type is refused.
        let v = serde_json::json!([{"workload": "w", "skipped": "not ready (syncing)"}]);
        let r = Reply::decode(ActionKind::CutoverAll, v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap(), v);
        let bad = serde_json::json!([{"name": "v", "id": "i", "size_bytes": "big",
            "allocated_bytes": 0, "exported": true, "path": "/x"}]);
        assert!(Reply::decode(ActionKind::ListVolumes, bad).is_err());
    }
}
