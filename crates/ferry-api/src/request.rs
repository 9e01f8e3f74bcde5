//! The request bodies: what each action takes, field by field. A body that
//! does not fit (unknown field, wrong type, a name outside the grammar) is
//! refused with 400 naming the field.

use ferry_core::Name;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

fn yes() -> bool {
    true
}

fn default_hook_timeout_ms() -> u64 {
    30_000
}

/// `POST /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNode {
    pub name: String,
    pub api: String,
    /// The peer's API token: authorizes this one call, not kept.
    pub token: String,
    /// The certificate fingerprint the operator supplied or confirmed: the
    /// only one pinned.
    pub fingerprint: String,
}

/// `POST /api/v1/nodes/pair`: the calling node, as it asks to be pinned
/// (unknown fields are ignored: a newer node may say more).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PairRequest {
    pub name: String,
    pub api: String,
    pub replication: String,
    pub fingerprint: String,
    pub cert_pem: String,
    /// Dropped: a peer is called with mutual TLS.
    #[serde(default, skip_serializing)]
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_fingerprint: Option<String>,
    #[serde(default)]
    pub heartbeat: Vec<String>,
    #[serde(default)]
    pub heartbeat_key: String,
}

/// `POST /api/v1/nodes/repin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Repin {
    pub cert_pem: String,
    pub fingerprint: String,
    /// The node uses its new certificate now: stop accepting the old one.
    #[serde(default)]
    pub done: bool,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
}

/// `POST /api/v1/volumes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
}

/// `POST /api/v1/images/import`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// The image file on the node: an absolute path, its last part not a
    /// symlink.
    pub path: String,
    /// `raw`, `qcow2`, `vmdk` or `vhdx` (never probed).
    pub format: String,
    /// The new volume.
    #[schemars(with = "String")]
    pub volume: Name,
}

/// `GET /api/v1/volumes/{name}/hashes` (query).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HashesQuery {
    /// Read the whole image rather than the leaf cache.
    pub fresh: bool,
    /// Bring the cache up to date, send no hashes.
    pub warm: bool,
}

/// `POST /api/v1/volumes/{name}/promote`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Promote {
    pub reverse_to: Option<String>,
    /// `sync` or `async`.
    pub mode: Option<String>,
}

/// `POST /api/v1/workloads/{name}/takeover`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Takeover {
    pub volumes: Vec<String>,
    #[serde(default)]
    pub shares: Vec<String>,
    pub reverse_to: Option<String>,
    pub mode: Option<String>,
    /// A live VM move's token (`vm-incoming`'s reply): the VM waiting here
    /// with that move's RAM is the one the workload's start continues.
    /// Without it, a VM waiting here is ended and booted anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_token: Option<String>,
}

/// `POST /api/v1/workloads/{name}/vm-incoming`: a live VM move begins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmIncomingRequest {
    /// The node the VM moves from (the only one its stream is taken from).
    pub source: String,
}

/// `POST /api/v1/volumes/{name}/snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArmSnapshot {
    pub token: u64,
}

/// `POST /api/v1/replicas`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReplica {
    pub volume: String,
    pub volume_id: String,
    pub size_bytes: u64,
    pub primary: String,
}

/// A QEMU VM ferry runs on the node that serves the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Kernel image (direct boot); the path must exist on every node.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    /// Kernel command line.
    pub append: Option<String>,
    pub memory_mib: u64,
    /// QEMU accelerator: `tcg` (default) or `kvm`.
    #[serde(default)]
    pub accel: Option<String>,
    /// More QEMU arguments, as given.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

/// A workload's definition (`POST /api/v1/workloads`, `PUT …/{name}`, and
/// what `GET` answers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    #[schemars(with = "String")]
    pub name: Name,
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub volumes: Vec<Name>,
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub shares: Vec<Name>,
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub stop: Option<String>,
    #[serde(default)]
    pub check: Option<String>,
    /// Each hook is killed after this long and counts as failed.
    #[serde(default = "default_hook_timeout_ms")]
    pub hook_timeout_ms: u64,
    #[serde(default)]
    pub vm: Option<VmSpec>,
    /// `ADDR/PREFIX`, moved with the workload by the HA cluster.
    #[serde(default)]
    pub vip: Option<String>,
    #[serde(default)]
    pub vip_interface: Option<String>,
}

/// `POST /api/v1/workloads/{name}/hooks/{which}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HookRequest {
    /// `primary` (default) or `test`.
    pub role: Option<String>,
}

/// Which of a workload's hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HookName {
    Start,
    Stop,
    Check,
}

impl HookName {
    pub fn as_str(self) -> &'static str {
        match self {
            HookName::Start => "start",
            HookName::Stop => "stop",
            HookName::Check => "check",
        }
    }
}

/// `POST /api/v1/migrations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    pub workload: String,
    pub to: String,
    pub mode: Option<String>,
    pub max_rate_bytes_per_s: Option<u64>,
    #[serde(default)]
    pub auto_converge: bool,
    #[serde(default)]
    pub auto_cutover: bool,
    /// With `auto_cutover`: only inside this maintenance window…
    pub window: Option<String>,
    /// …and not after this (RFC 3339).
    pub deadline: Option<String>,
    /// Offline seeding: `to` holds this archive of the workload's volumes
    /// (restored with `--replica-of`): send only what changed since its
    /// barrier and whatever block hashes find different.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub seed: Option<Name>,
    /// `to` holds old copies: compare block hashes, send what differs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checksum: bool,
}

/// `PATCH /api/v1/migrations/{name}` and `PATCH /api/v1/replications/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRate {
    pub max_rate_bytes_per_s: Option<u64>,
}

/// `POST /api/v1/migrations/{name}/cutover`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CutoverRequest {
    /// A target whose start/check hook fails hands the workload back.
    #[serde(default = "yes")]
    pub reverse_on_failure: bool,
    /// A VM workload is stopped here and booted at the target (`--cold`),
    /// instead of moving live with its RAM (the default when its VM runs).
    #[serde(default)]
    pub cold: bool,
}

impl Default for CutoverRequest {
    fn default() -> Self {
        CutoverRequest {
            reverse_on_failure: true,
            cold: false,
        }
    }
}

/// `POST /api/v1/migrations/{name}/schedule`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// RFC 3339 with an explicit zone (`Z` or an offset).
    pub at: Option<String>,
    /// `DAYS HH:MM-HH:MM ZONE`.
    pub window: Option<String>,
    /// RFC 3339: gives up after this.
    pub deadline: Option<String>,
}

/// `POST /api/v1/migrations/{name}/reverse`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reverse {
    pub target: String,
    pub mode: Option<String>,
}

/// `POST /api/v1/replications`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartReplication {
    pub volume: String,
    pub to: String,
    pub mode: Option<String>,
    pub max_rate_bytes_per_s: Option<u64>,
    #[serde(default)]
    pub checksum: bool,
}

/// `?wait_state=S&wait_ms=N` on a status: answer once the state is S, or
/// after N ms (at most 5 s) with the status as it is then.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatusWait {
    pub wait_state: Option<String>,
    pub wait_ms: Option<u64>,
}

/// `POST /api/v1/shares`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateShare {
    pub name: String,
    pub path: String,
    /// `sync` or `async`.
    pub mode: String,
    pub to: Option<String>,
}

/// `POST /api/v1/shares/{name}/verify`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShareVerify {
    pub timeout_ms: Option<u64>,
}

/// `POST /api/v1/cluster/workloads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterAdd {
    #[schemars(with = "String")]
    pub workload: Name,
    pub preferred: String,
    #[serde(default)]
    pub accept_loss: bool,
    /// Passed on by the peer (not an operator).
    #[serde(default)]
    pub forwarded: bool,
}

/// `POST /api/v1/cluster/standby`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Standby {
    pub node: String,
    pub standby: bool,
}

/// `POST /api/v1/cluster/workloads/{name}/promote`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForcePromote {
    #[serde(default)]
    pub force: bool,
    /// Asked by the peer's split-brain policy (not an operator).
    #[serde(default)]
    pub by_policy: bool,
}

/// `POST /api/v1/cluster/workloads/{name}/resolve-split-brain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    pub keep: String,
    /// From the kept node to the discarded one: each volume's generation
    /// ids, newest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histories: Option<std::collections::BTreeMap<String, Vec<u64>>>,
}

/// `POST /api/v1/cluster/workloads/{name}/drop-copy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DropCopy {
    pub node: String,
}

/// `POST /api/v1/audit/heads`: the calling node's audit chain head (its
/// last record's sequence number and BLAKE3 hash, hex). Unknown fields are
/// ignored: a newer node may say more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
}

/// `POST /api/v1/session`: a console login with a named token
/// (`NAME.SECRET`).
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    pub token: String,
}

impl std::fmt::Debug for CreateSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, in a log line or a panic.
        f.debug_struct("CreateSession").finish_non_exhaustive()
    }
}

/// `GET /api/v1/stats`: which series, over which time, every how long.
/// Query: `series`, and any of `from`, `to` (Unix s; `to` defaults to now),
/// `since` (s before `to`, when `from` is not given; default 3600) and
/// `step` (s; default 0: the finest step kept for that range).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// `SCOPE/NAME/METRIC` (README, "Statistics history").
    #[schemars(with = "String")]
    pub series: ferry_core::history::SeriesName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
}

/// `POST /api/v1/estimates`: observe a workload's writes (`ferry estimate
/// start`). Exactly one of `volume`, `workload`, `share`, `device`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartEstimate {
    #[schemars(with = "String")]
    pub name: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub volume: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub workload: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub share: Option<Name>,
    /// A Linux block device ferry does not serve (`/dev/sdb`, `/dev/loop3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// How long to observe (default `estimate.duration_s_default`, 24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u64>,
}

/// `GET /api/v1/estimates/{name}/report`: the forecast's link and options
/// (query parameters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EstimateReportQuery {
    /// Use the last probe of the link to this node (`ferry estimate probe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Or a bandwidth given, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// The migration's `--max-rate`, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_bytes_per_s: Option<u64>,
    /// Offline seeding: days a shipped disk takes to arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ship_days: Option<f64>,
    /// Other estimates whose migrations share the link.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub with: Vec<Name>,
    /// `max` (default: the worst window observed) or `mean`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<String>,
}

/// `POST /api/v1/archives`: archive a live source of this node
/// (`ferry archive create SOURCE --to STORE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArchive {
    /// `volume/NAME`, `workload/NAME` or `share/NAME`.
    pub source: String,
    /// The store: an absolute directory path on this node (made if new).
    pub store: String,
    /// The archive's name (default: the source's name and the UTC time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub name: Option<Name>,
}

/// `POST /api/v1/archives/restore`: a new volume from an archive
/// (`ferry archive restore NAME --store STORE --volume V`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreArchive {
    /// The store: an absolute directory path on this node.
    pub store: String,
    #[schemars(with = "String")]
    pub archive: Name,
    /// The new volume (it must not exist). Exactly one of `volume` and
    /// `workload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub volume: Option<Name>,
    /// I2V: a new workload from the archive: every disk a new volume named
    /// like it, and the workload's definition (hooks, VM) as archived
    /// (`ferry workload create W --from-archive NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub workload: Option<Name>,
    /// Which disk of the archive (default: the only one, or the one named
    /// like `volume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Offline seeding: restore as the replica of that node's volume (its
    /// id and the generation of the archive's barrier kept), for `ferry
    /// migrate start … --seed ARCHIVE` there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub replica_of: Option<Name>,
}

/// `POST /api/v1/probes`: measure the replication link to a node
/// (`ferry estimate probe`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeLink {
    pub to: String,
    /// Seconds of each measurement (default 10; at most
    /// `estimate.probe_seconds_max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    /// Also measure at this rate limit, bytes/s (as `--max-rate` would).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_bytes_per_s: Option<u64>,
}
