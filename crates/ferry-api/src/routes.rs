//! The one route table: every action the API serves, with its method, its
//! path, the least its caller needs ([`Need`]) and the node states it is
//! allowed in ([`States`]). The agent's router is built from this table and
//! nothing else, the CLI's client finds each action's path in it, and the
//! OpenAPI document lists it: they cannot drift apart.

use std::fmt;

use crate::auth::Need;

/// An HTTP method the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// Whether a request of this method carries a JSON body.
    pub fn has_body(self) -> bool {
        matches!(self, Method::Post | Method::Put | Method::Patch)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node is, as far as which actions it takes is concerned (the
/// pre-/post-boot split of Firecracker's API, for ferry's nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// No `[cluster]` table in its config: volumes, shares, migrations.
    Standalone,
    /// A `[cluster]` table: also HA workloads.
    Clustered,
    /// Clustered, and in standby (`ferry cluster standby`): serves nothing
    /// it can move off.
    Standby,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Standalone => "standalone",
            NodeState::Clustered => "clustered",
            NodeState::Standby => "standby",
        }
    }

    fn bit(self) -> u8 {
        match self {
            NodeState::Standalone => 1,
            NodeState::Clustered => 2,
            NodeState::Standby => 4,
        }
    }
}

/// A set of [`NodeState`]s: where an action is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct States(u8);

impl States {
    /// Every node.
    pub const ANY: States = States(1 | 2 | 4);
    /// A node with a `[cluster]` table, in standby or not.
    pub const CLUSTERED: States = States(2 | 4);

    pub fn contains(self, s: NodeState) -> bool {
        self.0 & s.bit() != 0
    }

    /// The states, by name (`standalone`, `clustered`, `standby`).
    pub fn names(self) -> Vec<&'static str> {
        [
            NodeState::Standalone,
            NodeState::Clustered,
            NodeState::Standby,
        ]
        .into_iter()
        .filter(|s| self.contains(*s))
        .map(NodeState::as_str)
        .collect()
    }

    /// What a node must be for an action it refuses (409).
    pub fn needed(self) -> &'static str {
        if self == States::CLUSTERED {
            "a node with a [cluster] table in its config (add one: peer, heartbeat, witness; and restart it)"
        } else {
            "any node"
        }
    }
}

macro_rules! routes {
    ($( $kind:ident : $m:ident $path:literal, $need:ident, $states:ident, $summary:literal; )*) => {
        /// Every action of the API, without its arguments: the key of the
        /// route table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ActionKind { $( $kind, )* }

        /// The route table, in the order `ferry api routes` lists it.
        pub const ROUTES: &[Route] = &[
            $( Route {
                kind: ActionKind::$kind,
                method: Method::$m,
                path: $path,
                need: Need::$need,
                allowed_in: States::$states,
                summary: $summary,
            }, )*
        ];

        impl ActionKind {
            /// Every action, in table order.
            pub const ALL: &'static [ActionKind] = &[ $( ActionKind::$kind, )* ];

            /// Its name (the OpenAPI `operationId`).
            pub fn name(self) -> &'static str {
                match self { $( ActionKind::$kind => stringify!($kind), )* }
            }
        }
    };
}

/// One route: an action's method, path (axum syntax, `{param}`), the least
/// role it needs, and the node states it is allowed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub kind: ActionKind,
    pub method: Method,
    pub path: &'static str,
    pub need: Need,
    pub allowed_in: States,
    pub summary: &'static str,
}

impl Route {
    /// The names of its path parameters, in order.
    pub fn params(&self) -> Vec<&'static str> {
        self.path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect()
    }
}

impl ActionKind {
    /// Its route.
    pub fn route(self) -> &'static Route {
        // Every kind is in the table exactly once (tested).
        ROUTES.iter().find(|r| r.kind == self).unwrap_or(&ROUTES[0])
    }
}

routes! {
    GetNode: Get "/api/v1/node", VIEWER, ANY, "This node: name, fingerprint, addresses, version, damaged records.";
    ListNodes: Get "/api/v1/nodes", VIEWER, ANY, "Registered peers.";
    AddNode: Post "/api/v1/nodes", ADMIN, ANY, "`ferry node add`: pair with a node both ways, pinned to the fingerprint given.";
    Pair: Post "/api/v1/nodes/pair", ADMIN, ANY, "(node to node) The other half of `node add`: pin the calling node's certificate.";
    Repin: Post "/api/v1/nodes/repin", PEER, ANY, "(peer-internal) A peer's `node rekey`: pin its new certificate.";
    Rekey: Post "/api/v1/node/rekey", ADMIN, ANY, "`ferry node rekey`: a new key and certificate, pinned by every peer first.";
    RotateToken: Post "/api/v1/token/rotate", ADMIN, ANY, "`ferry token rotate`: a new DATA_DIR/api.token.";
    ListTokens: Get "/api/v1/tokens", ADMIN, ANY, "`ferry token list`: named tokens (never their secrets).";
    CreateToken: Post "/api/v1/tokens", ADMIN, ANY, "`ferry token create`: a named token with a role, shown this once.";
    RevokeToken: Delete "/api/v1/tokens/{name}", ADMIN, ANY, "`ferry token revoke`.";
    ListVolumes: Get "/api/v1/volumes", VIEWER, ANY, "Volumes of this node.";
    CreateVolume: Post "/api/v1/volumes", OPERATOR, ANY, "Create a volume.";
    ImportImage: Post "/api/v1/images/import", ADMIN, ANY, "`ferry archive import`: a qcow2, vmdk, vhdx or raw image file on this node as a new volume (refused if it names another file: backing file, data file, extent).";
    DeleteVolume: Delete "/api/v1/volumes/{name}", ADMIN, ANY, "Delete a volume and its data.";
    VolumeHashes: Get "/api/v1/volumes/{name}/hashes", VIEWER, ANY, "BLAKE3 per block (`?fresh=1`: read the image; `?warm=1`: only bring the cache up to date).";
    VolumeGeneration: Get "/api/v1/volumes/{name}/generation", VIEWER, ANY, "A volume's data history: [current, ancestors…].";
    VerifyVolume: Post "/api/v1/volumes/{name}/verify", OPERATOR, ANY, "Drain the link, compare with the replica block by block.";
    PromoteVolume: Post "/api/v1/volumes/{name}/promote", PEER, ANY, "(peer-internal) Make this replica the primary.";
    ArmSnapshot: Post "/api/v1/volumes/{name}/snapshot", PEER, ANY, "(peer-internal) Test cutover: arm a replica's snapshot.";
    Takeover: Post "/api/v1/workloads/{name}/takeover", PEER, ANY, "(peer-internal) A cutover's commit point on its target.";
    MarkInconsistent: Post "/api/v1/volumes/{name}/inconsistent", PEER, ANY, "(peer-internal) A comparison found this replica different.";
    CreateReplica: Post "/api/v1/replicas", PEER, ANY, "(peer-internal) Hold a replica of a peer's volume.";
    ListWorkloads: Get "/api/v1/workloads", VIEWER, ANY, "Workload definitions.";
    CreateWorkload: Post "/api/v1/workloads", ADMIN, ANY, "Define a workload (its hooks run as root).";
    GetWorkload: Get "/api/v1/workloads/{name}", VIEWER, ANY, "One workload's definition.";
    PutWorkload: Put "/api/v1/workloads/{name}", ADMIN, ANY, "Change a workload's definition, on every node that holds it (`?forwarded=true`: from a peer).";
    DeleteWorkload: Delete "/api/v1/workloads/{name}", ADMIN, ANY, "Delete a workload's definition.";
    PrepareVmIncoming: Post "/api/v1/workloads/{name}/vm-incoming", PEER, ANY, "(peer-internal) A live VM move, on the target: start the VM paused on standby exports of the replicas, waiting for its RAM (a one-time stream token in the reply).";
    CancelVmIncoming: Delete "/api/v1/workloads/{name}/vm-incoming", PEER, ANY, "(peer-internal) A live VM move rolled back, on the target: its waiting VM quits, the standby exports go.";
    StartTestHere: Post "/api/v1/workloads/{name}/test", PEER, ANY, "(peer-internal) Test cutover, on the target: start the test instance.";
    EndTestHere: Delete "/api/v1/workloads/{name}/test", PEER, ANY, "(peer-internal) Test cutover, on the target: end it.";
    RunHook: Post "/api/v1/workloads/{name}/hooks/{which}", OPERATOR, ANY, "Run a workload's start, stop or check here.";
    ListMigrations: Get "/api/v1/migrations", VIEWER, ANY, "Status of every migration.";
    StartMigration: Post "/api/v1/migrations", OPERATOR, ANY, "`ferry migrate start`.";
    GetMigration: Get "/api/v1/migrations/{name}", VIEWER, ANY, "One migration's status.";
    SetMigration: Patch "/api/v1/migrations/{name}", OPERATOR, ANY, "`ferry migrate set`: the copy rate limit.";
    CutoverAll: Post "/api/v1/migrations-cutover-all", OPERATOR, ANY, "Cut over every ready migration, one by one.";
    Cutover: Post "/api/v1/migrations/{name}/cutover", OPERATOR, ANY, "`ferry migrate cutover`: the verified cutover (409 unless ready).";
    ScheduleCutover: Post "/api/v1/migrations/{name}/schedule", OPERATOR, ANY, "Schedule a cutover (`--at`, `--window`, `--deadline`).";
    CancelCutover: Delete "/api/v1/migrations/{name}/schedule", OPERATOR, ANY, "Cancel a scheduled cutover.";
    ReverseMigration: Post "/api/v1/migrations/{name}/reverse", PEER, ANY, "(peer-internal) Record the migration back after a cutover.";
    Rollback: Post "/api/v1/migrations/{name}/rollback", OPERATOR, ANY, "`ferry migrate rollback`.";
    Finalize: Post "/api/v1/migrations/{name}/finalize", OPERATOR, ANY, "`ferry migrate finalize`: stop replicating back.";
    StartTest: Post "/api/v1/migrations/{name}/test", OPERATOR, ANY, "`ferry migrate test`: a disposable instance on snapshots at the target.";
    EndTest: Delete "/api/v1/migrations/{name}/test", OPERATOR, ANY, "`ferry migrate test --end`.";
    ListReplications: Get "/api/v1/replications", VIEWER, ANY, "Status of every replication.";
    StartReplication: Post "/api/v1/replications", OPERATOR, ANY, "`ferry replicate start`.";
    GetReplication: Get "/api/v1/replications/{name}", VIEWER, ANY, "One volume's status (`?wait_state=S&wait_ms=N`: once the state is S, at the latest after N ms).";
    SetReplication: Patch "/api/v1/replications/{name}", OPERATOR, ANY, "`ferry replicate set`: the rate limit.";
    StopReplication: Delete "/api/v1/replications/{name}", OPERATOR, ANY, "`ferry replicate stop`.";
    ListShares: Get "/api/v1/shares", VIEWER, ANY, "Status of every share.";
    CreateShare: Post "/api/v1/shares", ADMIN, ANY, "`ferry share create` (mounts over a path as root).";
    GetShare: Get "/api/v1/shares/{name}", VIEWER, ANY, "One share's status (`?counts=0`: without walking the tree; `wait_state`, `wait_ms` as for replications).";
    ShareDigest: Get "/api/v1/shares/{name}/digest", VIEWER, ANY, "The digest of this node's copy.";
    ShareFiles: Get "/api/v1/shares/{name}/files", PEER, ANY, "(peer-internal) This node's copy entry by entry, files read whole.";
    VerifyShare: Post "/api/v1/shares/{name}/verify", OPERATOR, ANY, "`ferry share verify`: compare with the replica.";
    ClusterStatus: Get "/api/v1/cluster", VIEWER, ANY, "`ferry cluster status`.";
    ClusterAdd: Post "/api/v1/cluster/workloads", ADMIN, CLUSTERED, "`ferry cluster add`: put a workload under HA on both nodes.";
    ClusterRemove: Delete "/api/v1/cluster/workloads/{name}", ADMIN, CLUSTERED, "`ferry cluster remove` (`?forwarded=true`: from the peer).";
    ClusterStandby: Post "/api/v1/cluster/standby", OPERATOR, CLUSTERED, "`ferry cluster standby|unstandby`.";
    ClusterPromote: Post "/api/v1/cluster/workloads/{name}/promote", ADMIN, CLUSTERED, "`ferry cluster promote --force`.";
    ClusterResolve: Post "/api/v1/cluster/workloads/{name}/resolve-split-brain", ADMIN, CLUSTERED, "`ferry cluster resolve-split-brain`.";
    ClusterDropCopy: Post "/api/v1/cluster/workloads/{name}/drop-copy", ADMIN, CLUSTERED, "`ferry cluster drop-copy`.";
    ClusterSwitchover: Post "/api/v1/cluster/workloads/{name}/switchover", OPERATOR, CLUSTERED, "`ferry cluster switchover`: the verified planned move.";
    OpenApi: Get "/api/v1/openapi.json", VIEWER, ANY, "This document (OpenAPI 3.1).";
    ListAudit: Get "/api/v1/audit", VIEWER, ANY, "`ferry audit list`: the audit log's records (`?since=`: RFC 3339, or an age such as `1h`).";
    VerifyAudit: Get "/api/v1/audit/verify", VIEWER, ANY, "`ferry audit verify`: the chain checked, and the heads the peers and the witness hold of it.";
    PutAuditHead: Post "/api/v1/audit/heads", PEER, ANY, "(peer-internal) Keep the calling node's audit chain head.";
    GetAuditHeads: Get "/api/v1/audit/heads", PEER, ANY, "(peer-internal) The heads of the calling node's audit chain this node holds.";
    CreateSession: Post "/api/v1/session", VIEWER, ANY, "Console login: the named token in the body; a `ferry_session` cookie (HttpOnly, Secure, SameSite=Strict) and its CSRF value.";
    GetSession: Get "/api/v1/session", VIEWER, ANY, "The console session the cookie holds: who, role, expiry.";
    DeleteSession: Delete "/api/v1/session", VIEWER, ANY, "Console logout: the session ends.";
    Events: Get "/api/v1/events", VIEWER, ANY, "Server-Sent Events: `migrations`, `cluster`, `nodes` snapshots when they change (looked at once per second, and every 200 ms for 2 s after an action on this node) and each cluster `event`.";
    GetStats: Get "/api/v1/stats", VIEWER, ANY, "`ferry stats`: a series' history (`series`, `from`, `to`, `since`, `step`).";
    ListStats: Get "/api/v1/stats/series", VIEWER, ANY, "The statistics series this node records.";
    MigrationReport: Get "/api/v1/migrations/{name}/report", VIEWER, ANY, "`ferry migrate report`: a migration after the fact (timeline, bytes, rates, downtime).";
    GetConfig: Get "/api/v1/config", VIEWER, ANY, "The agent's effective config (its file with every default filled in; it holds no secrets, only paths to them).";
    ListEstimates: Get "/api/v1/estimates", VIEWER, ANY, "`ferry estimate list`: every observation of this node.";
    StartEstimate: Post "/api/v1/estimates", OPERATOR, ANY, "`ferry estimate start`: observe a volume's, workload's, share's or block device's writes.";
    GetEstimate: Get "/api/v1/estimates/{name}", VIEWER, ANY, "`ferry estimate status`: one observation, with its working-set curve W(T).";
    StopEstimate: Post "/api/v1/estimates/{name}/stop", OPERATOR, ANY, "`ferry estimate stop`: stop observing; what was observed stays for reports.";
    DeleteEstimate: Delete "/api/v1/estimates/{name}", OPERATOR, ANY, "`ferry estimate delete`: stop and forget an observation.";
    EstimateReport: Get "/api/v1/estimates/{name}/report", VIEWER, ANY, "`ferry estimate report`: the forecast of its migration (`to`: the last probe to that node, or `bandwidth_bytes_per_s`; `max_rate_bytes_per_s`, `ship_days`, `with`, `stat`).";
    ProbeLink: Post "/api/v1/probes", OPERATOR, ANY, "`ferry estimate probe`: throughput and round trip of the replication link to a node, under the load running now.";
    ListProbes: Get "/api/v1/probes", VIEWER, ANY, "The last probe to each node.";
    CreateArchive: Post "/api/v1/archives", ADMIN, ANY, "`ferry archive create volume/V|workload/W|share/S --to STORE`: archive a live source at a flush barrier into a store directory on this node (a job; admin: it writes a path on the node).";
    RestoreArchive: Post "/api/v1/archives/restore", ADMIN, ANY, "`ferry archive restore NAME --volume V`: a new volume from an archive in a store directory on this node (`replica_of`: as the replica of that node's volume, for offline seeding).";
    ListArchiveJobs: Get "/api/v1/archive-jobs", VIEWER, ANY, "Archive creates and restores this agent ran since it started, with progress.";
    GetArchiveJob: Get "/api/v1/archive-jobs/{name}", VIEWER, ANY, "One archive job: state, progress, ETA, and the archive it made.";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_exactly_one_route_and_routes_are_unique() {
        assert_eq!(ActionKind::ALL.len(), ROUTES.len());
        for k in ActionKind::ALL {
            assert_eq!(ROUTES.iter().filter(|r| r.kind == *k).count(), 1, "{k:?}");
            assert_eq!(k.route().kind, *k);
        }
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "{} {} twice",
                    a.method,
                    a.path
                );
            }
        }
    }
}
