//! Every command, flag and environment variable of the `ferry` binary, in one place.

pub mod archive;
pub mod archive_remote;
pub mod demo;
pub mod estimate;
pub mod export;
pub mod p2v;
pub mod p2v_remote;
pub mod remote;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_core::ByteSize;
use ferry_nbd::ListenAddr;

/// ferry keeps a server's volumes replicated to another server, so its workload
/// can be live-migrated or failed over. Exit codes: 0 ok, 1 failed, 2 usage.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Where volumes and state live.
    #[arg(
        long,
        global = true,
        env = "FERRY_DATA_DIR",
        default_value = "/var/lib/ferry"
    )]
    pub data_dir: PathBuf,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "info")]
    pub log_level: tracing::Level,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Serve a volume over NBD until interrupted (SIGINT or SIGTERM).
    Export(ExportArgs),
    /// The main job on an embedded default: two agents on 127.0.0.1, a volume
    /// written by a checking writer, migrated live and cut over; every
    /// acknowledged record verified on the target; the downtime printed.
    Demo(DemoArgs),
    /// Run the node agent (volumes, exports, replication, REST API) until SIGTERM.
    Agent {
        /// The agent's TOML config (node_name, data_dir, api_listen, replication_listen, nbd_listen).
        #[arg(long, default_value = "/etc/ferry/ferry.toml")]
        config: PathBuf,
    },
    /// Register peer nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// NBD over TCP: client certificates of this node's NBD CA.
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// Replicate volumes to another node.
    #[command(subcommand)]
    Replicate(ReplicateCommand),
    /// Define workloads: a set of volumes plus start/stop/check hooks.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Live-migrate workloads to another node with a verified cutover.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// High availability: put workloads under automatic failover.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Shares: directories replicated file by file (sync: a FUSE mount).
    #[command(subcommand)]
    Share(ShareCommand),
    /// The REST API itself.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Statistics history: a series' points (or, without one, the series).
    Stats(StatsArgs),
    /// The migration estimator: observe a workload's writes, probe the
    /// link, forecast its migration.
    #[command(subcommand)]
    Estimate(estimate::EstimateCommand),
    /// The image archive: deduplicated, compressed copies of volumes,
    /// workloads, shares, images and devices in a store directory; restore
    /// to a volume or an image (raw, qcow2, vmdk, vhdx); import an image as
    /// a volume.
    #[command(subcommand)]
    Archive(archive::ArchiveCommand),
    /// Physical to virtual: capture a live Linux root tree into an archive,
    /// build a bootable disk image from it.
    #[command(subcommand)]
    P2v(p2v::P2vCommand),
    /// The agent's API token.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log: every action that changed something, and every
    /// automatic decision, hash-chained.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Run a witness: the third voter of two-node clusters (one small record
    /// per workload, leases; no data) until SIGTERM. Its records live in
    /// --data-dir.
    Witness {
        /// UDP address to answer on, e.g. 198.18.0.3:7380.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// A file holding the shared key (any text of at least 16 characters,
        /// mode 0600), mandatory: every request must be signed with it
        /// (HMAC-SHA256) and every reply is. The nodes name the same key
        /// with `cluster.witness_key_file`.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// The agent's live updates (`GET /api/v1/events`, Server-Sent Events):
    /// `migrations`, `cluster`, `nodes` snapshots when they change (looked
    /// at once per second, and every 200 ms for 2 s after an action here)
    /// and each cluster `event`. Without --follow: the
    /// first snapshots, then exit. With --json: one JSON object a line,
    /// `{"event": NAME, "data": …}`.
    Events {
        /// Keep printing until interrupted (or the token is revoked).
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The node's audit records, oldest first: who (token and role, or the
    /// peer node), from where, when, the request and its result; automatic
    /// decisions (failover, fence, resignation, cutovers, split brain,
    /// throttle).
    List {
        /// Only records from then on: RFC 3339, or an age (90s, 15m, 1h, 7d).
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Check the chain (every hash, link, sequence number, the checkpoint of
    /// a pruned log) and the heads the peers and the witness hold of it.
    /// Exit 1 with the first bad record if a record was changed, removed or
    /// reordered, also when the whole chain was rewritten consistently.
    Verify {
        #[command(flatten)]
        conn: AgentConn,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Replace the agent's API token (DATA_DIR/api.token, 0600); the old
    /// one stops working at once. Node-to-node calls do not use it.
    Rotate {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Make a named token for this node: viewer reads; operator also runs
    /// migrations, cutovers, switchovers; admin also changes hooks, VM specs,
    /// workloads, nodes, tokens and may delete, force or resolve. Printed
    /// once (keep it in a 0600 file for --token-file); the node keeps only
    /// its hash. Valid on this node only.
    Create {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// The node's tokens: name, role, created (never the secret).
    List {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Revoke a named token: it stops working at once.
    Revoke {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
}

#[derive(Debug, Subcommand)]
pub enum NbdCommand {
    /// Issue a client certificate signed by this node's NBD CA
    /// (DATA_DIR/tls/nbd-ca.{key,crt}, made if missing): writes
    /// ca-cert.pem, client-cert.pem and client-key.pem (0600) into --out, the
    /// layout of QEMU's `tls-creds-x509,dir=` and libnbd's
    /// `tls-certificates=`. Runs on the node, as the agent's user.
    ClientCert {
        /// The client's name (its certificate's common name).
        name: String,
        /// Directory to write the three files to (made 0700); default ./NAME.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Every route the agent serves (method and path), from the router's own
    /// table. Every one needs a token; only `GET /metrics` and the console's
    /// static files (`/`, `/console/…`: no data) are served without.
    Routes,
    /// The API's OpenAPI 3.1 document (what `GET /api/v1/openapi.json`
    /// serves), generated from its types; no agent needed.
    Openapi,
}

#[derive(Debug, Subcommand)]
pub enum ShareCommand {
    /// Create a share on the agent and serve it at --path (sync mode: a FUSE
    /// mount backed by DATA_DIR/shares/NAME/data; every change reaches the
    /// replica before it is answered, fsync is durable on both nodes).
    Create {
        name: String,
        /// Where applications use the share on this node (absolute).
        #[arg(long)]
        path: PathBuf,
        #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
        mode: String,
        /// Replicate it to this registered node (its copy is made there).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Files, bytes, replica state, pending paths and the last error of one
    /// share or all.
    Status {
        name: Option<String>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Compare a share with its replica once it is level: every entry and
    /// every file's content, read whole on both nodes (exit 0 only when
    /// equal; entries changed while it runs are counted apart).
    Verify {
        name: String,
        /// Longest wait for the replica to be level plus the reading of
        /// both trees.
        #[arg(long, default_value = "10m")]
        timeout: DurationArg,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Wait until a share's replica is up to date (exit 1 on timeout).
    Wait {
        name: String,
        #[arg(long, default_value = "60s")]
        timeout: DurationArg,
        #[command(flatten)]
        conn: AgentConn,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Put a workload under HA (keeps its current primary; adopts its
    /// replication to the cluster peer, or starts it in sync mode).
    Add {
        workload: String,
        /// The node the workload prefers to run on.
        #[arg(long)]
        preferred: String,
        /// What an async workload does when its primary dies: `refuse` to
        /// fail over (default) or `accept-loss` (lose what had not reached
        /// the replica).
        #[arg(long, default_value = "refuse", value_parser = ["refuse", "accept-loss"])]
        async_failover: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Per workload: the primary and each replica's state.
    Status {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Planned move to the peer with no write lost, verified like a
    /// cutover (freeze, drain, equal Merkle leaves); asked of the node
    /// serving the workload.
    Switchover {
        workload: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Maintenance: move every workload off NODE (verified switchovers) and
    /// let none fail over to it until `unstandby`.
    Standby {
        node: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// End maintenance of NODE.
    Unstandby {
        node: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Promote the replica here by hand (`--force` required: its copy may be
    /// outdated or inconsistent, so writes may be lost and a split brain
    /// follow). Refused while the peer serves the workload.
    Promote {
        workload: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// After a split brain: keep NODE's data (the node serving the
    /// workload); the other node's diverged images are copied aside and
    /// resynced from NODE (only the blocks either side changed).
    ResolveSplitBrain {
        workload: String,
        #[arg(long)]
        keep: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Delete the copies a split-brain resolution kept on NODE.
    DropCopy {
        workload: String,
        #[arg(long)]
        node: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Take a workload out of HA on both nodes (data and replication stay).
    Remove {
        workload: String,
        #[command(flatten)]
        conn: AgentConn,
    },
}

/// `ferry workload create`.
#[derive(Debug, Args)]
pub struct WorkloadCreate {
    pub name: String,
    /// A volume of the workload (repeat for more).
    #[arg(long = "volume", required_unless_present_any = ["shares", "from_archive"])]
    pub volumes: Vec<String>,
    /// A share of the workload (repeat for more): moved and failed over
    /// with its volumes.
    #[arg(long = "share")]
    pub shares: Vec<String>,
    /// Shell command that starts the application (run where it should run).
    #[arg(long)]
    pub start: Option<String>,
    /// Shell command that stops it (run on the source at cutover).
    #[arg(long)]
    pub stop: Option<String>,
    /// Shell command that exits 0 when the application serves.
    #[arg(long)]
    pub check: Option<String>,
    /// Each hook is killed after this long and counts as failed.
    #[arg(long, default_value = "30s")]
    pub hook_timeout: DurationArg,
    /// Run a QEMU VM (qemu-system-x86_64) with the volumes as virtio disks:
    /// its kernel (the path must exist on every node).
    #[arg(long)]
    pub vm_kernel: Option<PathBuf>,
    #[arg(long)]
    pub vm_initrd: Option<PathBuf>,
    /// The VM's kernel command line.
    #[arg(long)]
    pub vm_append: Option<String>,
    #[arg(long, default_value = "256MiB")]
    pub vm_memory: ByteSize,
    /// QEMU accelerator: tcg (works everywhere) or kvm.
    #[arg(long, default_value = "tcg")]
    pub vm_accel: String,
    /// More QEMU arguments (repeat), e.g. --vm-arg=-smp --vm-arg=2.
    #[arg(long = "vm-arg", allow_hyphen_values = true)]
    pub vm_args: Vec<String>,
    /// The workload's virtual IP, ADDR/PREFIX (moved with it by the HA cluster).
    #[arg(long, requires = "vip_interface")]
    pub vip: Option<String>,
    /// The interface the virtual IP is added to on whichever node serves.
    #[arg(long)]
    pub vip_interface: Option<String>,
    /// I2V: the workload from this archive (`ferry archive create
    /// workload/W …`): every disk restored as a volume of its own name (each
    /// checked against its Merkle root), and the definition as archived —
    /// hooks and VM; --vm-* flags given here replace the archived VM.
    #[arg(long, requires = "store", conflicts_with_all = ["volumes", "shares"])]
    pub from_archive: Option<String>,
    /// The archive store (a directory on the agent's node) of --from-archive.
    #[arg(long, env = "FERRY_ARCHIVE_STORE")]
    pub store: Option<PathBuf>,
    /// With --from-archive: start the workload (its VM) once restored.
    #[arg(long, requires = "from_archive")]
    pub run: bool,
    #[command(flatten)]
    pub conn: AgentConn,
}

/// `ferry workload update`: only the flags given change.
#[derive(Debug, Args)]
pub struct WorkloadUpdate {
    pub name: String,
    #[arg(long)]
    pub start: Option<String>,
    #[arg(long)]
    pub stop: Option<String>,
    #[arg(long)]
    pub check: Option<String>,
    #[arg(long)]
    pub hook_timeout: Option<DurationArg>,
    #[arg(long, conflicts_with = "no_vip")]
    pub vip: Option<String>,
    #[arg(long, conflicts_with = "no_vip")]
    pub vip_interface: Option<String>,
    /// Remove the virtual IP.
    #[arg(long)]
    pub no_vip: bool,
    #[command(flatten)]
    pub conn: AgentConn,
}

#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Define a workload on the local agent (its volumes must be primaries there).
    Create(Box<WorkloadCreate>),
    /// Change a workload's hooks or virtual IP, on this node and every peer
    /// that holds it (empty string: remove a hook).
    Update(Box<WorkloadUpdate>),
    /// Start the workload on this node (start hook, then its VM).
    Start {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Stop the workload on this node (its VM, then the stop hook).
    Stop {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// List workloads.
    List {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Show one workload's definition.
    Show {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Delete a workload's definition (its volumes stay).
    Delete {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Replicate the workload's volumes to NODE; phases seeding → syncing → ready.
    Start {
        name: String,
        #[arg(long)]
        to: String,
        #[arg(long, value_enum, default_value = "sync")]
        mode: ModeArg,
        /// Limit of the background copy, e.g. 200MiB/s.
        #[arg(long)]
        max_rate: Option<Rate>,
        /// Slow the workload's writes stepwise while the link cannot keep up.
        #[arg(long)]
        auto_converge: bool,
        /// Cut over as soon as the migration is ready (verified, like
        /// `migrate cutover`; retried up to 3 times if it aborts).
        #[arg(long)]
        auto_cutover: bool,
        /// With --auto-cutover: only inside this maintenance window, e.g.
        /// 'Sat,Sun 02:00-04:00 Europe/Paris' (days Mon…Sun, ranges like
        /// Mon-Fri, or daily; an end before the start runs past midnight; an
        /// IANA time zone or UTC). Not ready in one window: waits for the next.
        #[arg(long, requires = "auto_cutover")]
        window: Option<String>,
        /// With --auto-cutover: give up after this time (RFC 3339 with its
        /// zone, e.g. 2026-12-31T23:00:00Z).
        #[arg(long, requires = "auto_cutover")]
        deadline: Option<String>,
        /// Offline seeding: NODE holds this archive of the workload's
        /// volumes (`ferry archive restore ARCHIVE --volume V --replica-of
        /// THIS-NODE` there); send only the blocks written since its barrier
        /// and those whose hashes differ.
        #[arg(long, conflicts_with = "checksum")]
        seed: Option<String>,
        /// NODE holds old copies of the volumes: compare block hashes
        /// (BLAKE3) and send only the blocks that differ.
        #[arg(long)]
        checksum: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Phase, bytes remaining, rates, ETA of one or all migrations.
    Status {
        name: Option<String>,
        /// Refresh until the migration is ready (or ends).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Stop at the source, freeze, drain, verify, switch, start at the target.
    /// A VM workload whose VM runs here moves live (its RAM pre-copied while
    /// it runs; the guest pauses, it does not reboot). Blocks until done;
    /// prints the downtime.
    Cutover {
        /// The workload (or --all).
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// Every ready migration of this node…
        #[arg(long, requires = "one_by_one", conflicts_with = "name")]
        all: bool,
        /// …one after another, each after the previous target's check passed.
        #[arg(long, requires = "all")]
        one_by_one: bool,
        /// Schedule it instead: at this time (RFC 3339 with its zone, e.g.
        /// 2026-12-24T02:00:00Z or 2026-12-24T03:00:00+01:00). Returns at once;
        /// `migrate status` shows it (scheduled_at, schedule). A migration not
        /// ready then is looked at again every 5 s until the window or the
        /// deadline ends (without either, for an hour), then it gives up.
        #[arg(long, conflicts_with = "all")]
        at: Option<String>,
        /// Schedule it only inside this maintenance window (its first
        /// occurrence at or after --at), e.g. 'Sat,Sun 02:00-04:00 Europe/Paris'.
        #[arg(long, conflicts_with = "all")]
        window: Option<String>,
        /// A scheduled cutover gives up after this time (RFC 3339); alone:
        /// try from now until then.
        #[arg(long, conflicts_with = "all")]
        deadline: Option<String>,
        /// Cancel the scheduled cutover.
        #[arg(long, conflicts_with_all = ["all", "at", "window", "deadline"])]
        cancel: bool,
        /// A VM workload: stop its VM here and boot it at the target, instead
        /// of moving it live with its RAM.
        #[arg(long, conflicts_with_all = ["all", "at", "window", "deadline", "cancel"])]
        cold: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Change the copy rate limit of every volume of the workload, live (0 = unlimited).
    Set {
        name: String,
        #[arg(long)]
        max_rate: Rate,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// After a cutover: move the workload back with the same verified cutover.
    Rollback {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Test cutover while production runs: snapshot the target's replicas at one
    /// flush barrier, start a disposable instance on writable overlays there
    /// (exports VOLUME@test), run its check. `--end` discards it all.
    Test {
        name: String,
        /// Stop the test instance and discard its overlays and snapshots.
        #[arg(long)]
        end: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// After a cutover: stop replicating back to the old source (no rollback after this).
    Finalize {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// A migration after the fact: timeline of phases, bytes moved, rates,
    /// downtime, outage, verification (JSON with --json, a printable page
    /// with --html).
    Report {
        name: String,
        /// Print the report as a printable HTML page.
        #[arg(long)]
        html: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
}

/// `ferry stats`: a series' history from the agent's statistics store.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// SCOPE/NAME/METRIC, e.g. volume/disk0/write_bytes_per_s (README,
    /// "Statistics history"). Without it: the list of series.
    pub series: Option<String>,
    /// How far back: 90s, 30m, 1h, 7d (default 1h).
    #[arg(long, value_parser = parse_seconds, default_value = "1h")]
    pub since: u64,
    /// Seconds between points (10s, 1m, 1h; default: the finest kept).
    #[arg(long, value_parser = parse_seconds)]
    pub step: Option<u64>,
    /// Print CSV (t,mean,min,max,count) instead of text.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    #[command(flatten)]
    pub conn: AgentConn,
}

/// A duration in seconds: `90`, `90s`, `30m`, `1h`, `7d`.
pub fn parse_seconds(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: a number with s, m, h or d (e.g. 1h)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// How to reach the local agent's REST API.
#[derive(Debug, Args, Clone)]
pub struct AgentConn {
    /// The agent's API address, HOST:PORT (HTTPS).
    #[arg(long, env = "FERRY_API")]
    pub api: Option<String>,
    /// A file holding the agent's API token (else FERRY_TOKEN, else DATA_DIR/api.token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The fingerprint of the agent's certificate (`ferry node id` on that
    /// node prints it); default: the certificate in --data-dir, i.e. the
    /// agent on this host.
    #[arg(long, env = "FERRY_API_FINGERPRINT")]
    pub api_fingerprint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Register the peer NAME both ways (pins both certificates). The local agent
    /// is FERRY_API (token: FERRY_TOKEN or DATA_DIR/api.token).
    Add {
        name: String,
        /// The peer's API address, HOST:PORT.
        #[arg(long)]
        api: String,
        /// A file holding the peer's API token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The peer's certificate fingerprint (sha256:…, as `ferry node id`
        /// prints it on the peer): the only certificate pinned. Without it,
        /// the fingerprint the peer presents is shown and must be confirmed
        /// at the terminal.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Print this node's certificate fingerprint (read from --data-dir; no
    /// agent needed): what `ferry node add --fingerprint` on a peer pins.
    Id,
    /// A new key and certificate for this node: pinned by every registered
    /// peer over the old trust first, then used for every new connection.
    Rekey {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// List registered peers.
    List {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Show this node (name, fingerprint, addresses).
    Show {
        #[command(flatten)]
        conn: AgentConn,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Sync,
    Async,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    UpToDate,
    Inconsistent,
    Outdated,
}

#[derive(Debug, Subcommand)]
pub enum ReplicateCommand {
    /// Create the replica on NODE if needed and bring the link up.
    Start {
        name: String,
        #[arg(long)]
        to: String,
        #[arg(long, value_enum, default_value = "sync")]
        mode: ModeArg,
        /// Limit of the background copy, e.g. 200MiB/s.
        #[arg(long)]
        max_rate: Option<Rate>,
        /// The peer already holds an old copy: compare block hashes (BLAKE3)
        /// and send only the blocks that differ.
        #[arg(long)]
        checksum: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Wait until the replica reaches a state.
    Wait {
        name: String,
        #[arg(long, value_enum, default_value = "up-to-date")]
        state: StateArg,
        /// Give up after this long (e.g. 60s, 5m).
        #[arg(long, default_value = "60s")]
        timeout: DurationArg,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// State, % synced, backlog, rate and ETA of one or all replications.
    Status {
        name: Option<String>,
        /// Refresh with a progress bar until the replica is up to date.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Change the background copy's rate limit live (0 = unlimited).
    Set {
        name: String,
        #[arg(long)]
        max_rate: Rate,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Stop replicating (writes keep being tracked; start again resyncs only changes).
    Stop {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
}

/// A transfer rate: a size per second, e.g. `200MiB/s` (the `/s` is optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().trim_end_matches("/s");
        t.parse::<ByteSize>()
            .map(|b| Rate(b.0))
            .map_err(|e| e.to_string())
    }
}

/// A duration such as `500ms`, `60s`, `5m`, `1h` (a bare number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationArg(pub std::time::Duration);

impl std::str::FromStr for DurationArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("`{s}` is not a duration: use e.g. 500ms, 60s, 5m"))?;
        let ms = match unit {
            "ms" => n,
            "" | "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            _ => return Err(format!("unknown unit in `{s}`: use ms, s, m or h")),
        };
        Ok(DurationArg(std::time::Duration::from_millis(ms)))
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a sparse volume.
    Create {
        name: String,
        /// Size, e.g. 10GiB, 512MiB or 1073741824 (a multiple of 512 bytes).
        #[arg(long)]
        size: ByteSize,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Change a volume's size (refused while it is exported).
    Resize {
        name: String,
        #[arg(long)]
        size: ByteSize,
        /// Allow a smaller size; the bytes past the new end are lost.
        #[arg(long)]
        shrink: bool,
    },
    /// Compare a replicated volume with its replica (Merkle trees of BLAKE3
    /// block hashes) after draining the link; exit 0 only when equal.
    Verify {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Delete a volume and its data (refused while it is exported).
    Delete {
        name: String,
        /// Confirm that the volume's data is to be destroyed.
        #[arg(long)]
        yes: bool,
    },
}

/// Limits of an NBD export; each is enforced by the server.
#[derive(Debug, Args, Clone)]
pub struct ExportLimitArgs {
    /// Largest single read or write (also the advertised maximum block size).
    #[arg(long, default_value = "32MiB")]
    pub max_request_bytes: ByteSize,
    /// Requests served at once on one connection.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight_per_connection: usize,
    /// Connections open at once; when full, a new one takes the slot of the
    /// oldest still negotiating without a certificate, else it is closed.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// A client must finish the handshake (TLS included) within this many
    /// milliseconds of connecting.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The volume to serve; the NBD export name is the volume name.
    pub name: String,
    /// unix:PATH (its directory must be enterable by this user only) or
    /// HOST:PORT (port 0 picks a free one), which requires TLS with a client
    /// certificate of DATA_DIR's NBD CA (`ferry nbd client-cert`). May be
    /// repeated. Default: unix:DATA_DIR/run/NAME.sock.
    #[arg(long)]
    pub listen: Vec<ListenAddr>,
    /// More DNS names or IP addresses for the TLS server certificate of the
    /// HOST:PORT listeners (the listener's address is always in it).
    #[arg(long)]
    pub tls_name: Vec<String>,
    /// Refuse writes (the export is advertised read-only).
    #[arg(long)]
    pub read_only: bool,
    #[command(flatten)]
    pub limits: ExportLimitArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the demo volume.
    #[arg(long, default_value = "256MiB")]
    pub size: ByteSize,
}
