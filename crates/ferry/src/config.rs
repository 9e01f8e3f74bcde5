//! `ferry agent --config FILE`: the node's TOML configuration.
//!
//! ```toml
//! node_name = "a"
//! data_dir = "/var/lib/ferry"
//! api_listen = "127.0.0.1:7360"
//! replication_listen = "127.0.0.1:7361"
//! nbd_listen = "198.18.0.1:10809"     # optional: NBD over TCP, TLS with client certificates required
//!
//! [replication]                        # all optional; defaults shown
//! granularity_bytes = 65536
//! backlog_bytes_max = 67108864
//! peer_ack_timeout_ms = 5000
//! frame_bytes_max = 8388608
//! copies_in_flight_max = 32
//! reconnect_backoff_max_ms = 5000
//! al_extents_max = 256
//! link_flush_interval_ms = 30000
//! link_flush_bytes = 4294967296        # of distinct unconfirmed blocks
//! link_unconfirmed_blocks_max = 131072 # a link flush is sent at half of it
//! replica_writeback_bytes = 4194304    # the replica starts writeback this often (bytes; 0 = off)…
//! replica_writeback_interval_ms = 500  # …and this long after a write (keeps a cutover's last flush short)
//! leaf_refresh_bytes_per_s = 1073741824 # background Merkle-leaf hashing of written blocks
//! leaf_scrub_bytes_per_s = 33554432    # background read-back of clean leaves
//!
//! [migration]                          # all optional; defaults shown
//! migrations_max = 4                   # workloads migrating at once
//! cutover_drain_timeout_ms = 30000     # a cutover aborts if the links do not drain by then
//! async_share_ready_lag_ms = 1000      # async share changes this recent still count as caught up
//! scheduled_cutover_retry_ms = 5000    # a scheduled cutover finding the migration not ready looks again after
//! scheduled_cutover_grace_ms = 3600000 # `--at` alone: gives up this long after the time
//!
//! [history]                            # all optional; defaults shown
//! enabled = true                       # record statistics history (DATA_DIR/history)
//! sample_interval_ms = 10000           # one sample of every series this often (100-10000)
//! fsync_interval_ms = 60000            # written series files are fdatasync'ed this often
//! series_max = 4096                    # series files kept, each at most 1,454,400 bytes
//!
//! [nbd]                                # all optional; defaults shown
//! socket_path = "DATA_DIR/run/nbd.sock" # always served; its directory only the agent's user may enter
//! tls_names = []                       # more names/addresses in the TLS server certificate
//! max_connections = 64
//! max_in_flight_per_connection = 64
//! max_request_bytes = 33554432
//! handshake_timeout_ms = 10000
//! inline_write_bytes_max = 65536      # writes run on the reading thread, batched to a replica
//! ```
//!
//! Unknown keys are errors (a typo must not silently fall back to a default),
//! and every error names the file, line and key.

pub use crate::history::HistorySettings;
pub use crate::share::settings::ShareSettings;
pub use crate::transport::settings::ReplicationSettings;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub node_name: String,
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub replication_listen: SocketAddr,
    /// NBD over TCP (`HOST:PORT`), TLS with a client certificate of the
    /// node's NBD CA required. Without it, NBD is served on the Unix socket
    /// (`nbd.socket_path`) only.
    #[serde(default)]
    pub nbd_listen: Option<String>,
    #[serde(default)]
    pub replication: ReplicationSettings,
    #[serde(default)]
    pub nbd: NbdSettings,
    #[serde(default)]
    pub migration: MigrationSettings,
    #[serde(default)]
    pub shares: ShareSettings,
    #[serde(default)]
    pub api: ApiSettings,
    /// `[audit]`: the audit log's retention and head exchange.
    #[serde(default)]
    pub audit: crate::audit::AuditSettings,
    /// `[history]`: statistics history (series files under DATA_DIR/history).
    #[serde(default)]
    pub history: HistorySettings,
    /// `[estimate]`: the migration estimator's limits (`ferry estimate`).
    #[serde(default)]
    pub estimate: crate::estimate::EstimateSettings,
    /// `[archive]`: the image archive's chunking, compression and threads
    /// (archives the agent takes: live volumes, workloads, shares).
    #[serde(default)]
    pub archive: crate::archive::ArchiveSettings,
    /// `[vm]`: how a VM workload moves live (QEMU's downtime limit,
    /// auto-converge, the RAM stream's rate, timeouts).
    #[serde(default)]
    pub vm: crate::vm::VmSettings,
    /// High availability: the peer, heartbeat paths, the witness.
    #[serde(default)]
    pub cluster: Option<ClusterSettings>,
}

/// `[cluster]`: this node's half of a two-node HA cluster.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// The other node (registered with `ferry node add`; until it is, the
    /// cluster reports `waiting-for-peer`).
    pub peer: String,
    /// This node's heartbeat listeners (UDP), one per network path; the
    /// peer learns them at registration.
    #[serde(default)]
    pub heartbeat: Vec<SocketAddr>,
    /// The witness (`ferry witness`), UDP.
    #[serde(default)]
    pub witness: Option<SocketAddr>,
    /// The witness's shared key (its `--key-file`): requests are signed and
    /// only signed replies believed. Mandatory with `witness` (anyone who
    /// can send UDP to the nodes or the witness could otherwise forge leases
    /// and promotions); the file must be readable by its owner only.
    #[serde(default)]
    pub witness_key_file: Option<PathBuf>,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// How long a lease lasts; default: `failure_timeout_ms`.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// Bound on clock rate error between nodes and witness, in ‰.
    #[serde(default = "default_drift_permille")]
    pub drift_permille: u64,
    /// Without a witness, fail over anyway: a cut link then gives two
    /// primaries (split brain). Off by default.
    #[serde(default)]
    pub two_node_unsafe: bool,
    /// Shell command run with each cluster event, as JSON in `FERRY_EVENT`.
    #[serde(default)]
    pub notify: Option<String>,
    /// How often the serving node runs a workload's check hook.
    #[serde(default = "default_check_interval_ms")]
    pub check_interval_ms: u64,
    /// Consecutive passes before the application counts as up.
    #[serde(default = "default_check_rise")]
    pub check_rise: u32,
    /// Consecutive failures (once up) that hand the workload over.
    #[serde(default = "default_check_fall")]
    pub check_fall: u32,
    /// Move a workload back to its preferred node (verified switchover)
    /// once that node has been up to date for `failback_delay_ms`. Off by
    /// default: no flapping.
    #[serde(default)]
    pub failback: bool,
    #[serde(default = "default_failback_delay_ms")]
    pub failback_delay_ms: u64,
    /// What to do when the two copies were written separately: `manual`
    /// (report, wait for `resolve-split-brain`), `discard-younger-primary`
    /// (keep the copy of the node that was primary first, by the witness's
    /// record), `discard-least-changes` (keep the copy with more changed
    /// bytes since the split). The discarded copy is always kept aside.
    #[serde(default = "default_split_brain")]
    pub split_brain: String,
}

fn default_split_brain() -> String {
    "manual".into()
}

fn default_failback_delay_ms() -> u64 {
    10_000
}

fn default_check_interval_ms() -> u64 {
    2000
}
fn default_check_rise() -> u32 {
    2
}
fn default_check_fall() -> u32 {
    3
}

fn default_heartbeat_interval_ms() -> u64 {
    250
}
fn default_failure_timeout_ms() -> u64 {
    2000
}
fn default_drift_permille() -> u64 {
    50
}

impl ClusterSettings {
    pub fn timing(&self) -> ferry_core::cluster::Timing {
        ferry_core::cluster::Timing {
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            failure_timeout_ms: self.failure_timeout_ms,
            lease_ms: self.lease_ms.unwrap_or(self.failure_timeout_ms),
            drift_permille: self.drift_permille,
        }
    }
}

/// Limits of the API listener (HTTPS), each with its unit in its name.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Connections open at once. When full, the oldest connection that has
    /// not yet made an authenticated request (a valid token or a registered
    /// peer's certificate) is closed for the new one; if all are
    /// authenticated, the new one is closed.
    pub connections_max: usize,
    /// The TLS handshake and a request's headers must arrive within this
    /// (one deadline for the whole handshake: a byte every few seconds does
    /// not keep a connection).
    pub handshake_timeout_ms: u64,
    /// A request body over this is refused (413) before it is read whole.
    pub body_bytes_max: usize,
    /// A console session (`POST /api/v1/session`) ends this long after its
    /// login (its cookie's `Max-Age`). Sessions live in memory: a restart
    /// logs everyone out.
    pub session_ttl_ms: u64,
    /// `GET /api/v1/events` streams open at once; one more is refused (429).
    pub event_streams_max: usize,
    /// How often each paired node is asked for its version and whether it
    /// is up (what node lists and the console's overview show).
    pub peer_probe_interval_ms: u64,
    /// An operator-supplied certificate for browsers (PEM, the chain, leaf
    /// first), with `tls_key_file` (PEM, mode 0600: a key others can read
    /// is refused). Served to clients that do not ask for ferry's internal
    /// name (`ferry-node`, which peers and the CLI use with a pinned
    /// fingerprint); without it, browsers get the node's self-signed one.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            connections_max: 256,
            handshake_timeout_ms: 10_000,
            body_bytes_max: 1024 * 1024,
            session_ttl_ms: 8 * 3600 * 1000,
            event_streams_max: 32,
            peer_probe_interval_ms: 5000,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// Limits of migrations, each with its unit in its name.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSettings {
    /// Workloads migrating at once (a cutover is not counted twice).
    pub migrations_max: usize,
    /// A cutover whose links have not drained (everything durable on the
    /// target) this long after the freeze aborts, and the source resumes.
    pub cutover_drain_timeout_ms: u64,
    /// An async share counts as caught up for a migration's readiness while
    /// every change not yet on the replica was seen less than this long ago
    /// (an application that keeps writing never leaves nothing pending; the
    /// cutover sends the rest once its stop hook has run).
    pub async_share_ready_lag_ms: u64,
    /// A scheduled cutover that finds the migration not ready (or whose
    /// cutover aborted) tries again this long after.
    pub scheduled_cutover_retry_ms: u64,
    /// A cutover scheduled `--at` a time, with neither `--window` nor
    /// `--deadline`, gives up this long after that time.
    pub scheduled_cutover_grace_ms: u64,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            migrations_max: 4,
            cutover_drain_timeout_ms: 30_000,
            async_share_ready_lag_ms: 1_000,
            scheduled_cutover_retry_ms: 5_000,
            scheduled_cutover_grace_ms: 3_600_000,
        }
    }
}

/// The node's NBD server: where it listens locally, and its limits, each
/// with its unit in its name.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdSettings {
    /// The Unix socket local clients (VMs, hooks, qemu-io on the node) use,
    /// always served; default `DATA_DIR/run/nbd.sock`. Its directory must be
    /// enterable by the agent's user only (the default one is made 0700).
    pub socket_path: Option<PathBuf>,
    /// Extra DNS names or IP addresses in the TLS server certificate of
    /// `nbd_listen` (besides the node name and the listener's address),
    /// e.g. a workload's virtual IP.
    pub tls_names: Vec<String>,
    /// Connections open at once; when full, a new one takes the slot of the
    /// oldest still negotiating without a certificate, else it is closed.
    pub max_connections: usize,
    /// Requests read and not yet answered on one connection (writes waiting
    /// for a replica's acknowledgement included).
    pub max_in_flight_per_connection: usize,
    /// Largest single read or write (also the advertised maximum block size).
    pub max_request_bytes: u32,
    /// A client must pick an export within this time after connecting, TLS
    /// handshake included.
    pub handshake_timeout_ms: u64,
    /// WRITEs up to this size run on the thread that read them (and a
    /// replicated volume sends a burst of them in one frame batch); 0 hands
    /// every request to a worker.
    pub inline_write_bytes_max: u32,
}

impl Default for NbdSettings {
    fn default() -> Self {
        let d = ferry_nbd::ServerLimits::default();
        NbdSettings {
            socket_path: None,
            tls_names: Vec::new(),
            max_connections: d.max_connections,
            max_in_flight_per_connection: d.connection.max_in_flight_per_connection,
            max_request_bytes: d.connection.max_request_bytes,
            handshake_timeout_ms: d.handshake_timeout_ms,
            inline_write_bytes_max: d.connection.inline_write_bytes_max,
        }
    }
}

impl NbdSettings {
    pub fn to_limits(&self) -> ferry_nbd::ServerLimits {
        let d = ferry_nbd::ServerLimits::default();
        ferry_nbd::ServerLimits {
            max_connections: self.max_connections,
            handshake_timeout_ms: self.handshake_timeout_ms,
            connection: ferry_nbd::ConnectionLimits {
                max_in_flight_per_connection: self.max_in_flight_per_connection,
                max_request_bytes: self.max_request_bytes,
                inline_write_bytes_max: self.inline_write_bytes_max,
                ..d.connection
            },
        }
    }
}

impl AgentConfig {
    /// The Unix socket of the NBD server.
    pub fn nbd_socket_path(&self) -> PathBuf {
        self.nbd
            .socket_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("run").join("nbd.sock"))
    }

    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: describe(&text, &e),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        crate::volume::validate_name(&self.node_name).map_err(|_| {
            format!(
                "key `node_name`: {:?} is not a valid node name",
                self.node_name
            )
        })?;
        self.audit.validate()?;
        self.archive
            .check(self.replication.granularity_bytes)
            .map_err(|e| e.to_string())?;
        if let Some(l) = &self.nbd_listen {
            match l.parse::<ferry_nbd::ListenAddr>() {
                Ok(ferry_nbd::ListenAddr::Tcp(_)) => {}
                Ok(ferry_nbd::ListenAddr::Unix(_)) => {
                    return Err(
                        "key `nbd_listen`: takes HOST:PORT (NBD over TCP with TLS); the Unix socket is `nbd.socket_path`"
                            .into(),
                    )
                }
                Err(e) => return Err(format!("key `nbd_listen`: {e}")),
            }
        }
        if let Some(p) = &self.nbd.socket_path {
            if !p.is_absolute() || p.parent().is_none() {
                return Err("key `nbd.socket_path`: must be an absolute path".into());
            }
        }
        for n in &self.nbd.tls_names {
            if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
                return Err(format!(
                    "key `nbd.tls_names`: {n:?} is not a DNS name or an IP address"
                ));
            }
        }
        let r = &self.replication;
        ferry_core::DirtyMap::new(0, r.granularity_bytes)
            .map_err(|e| format!("key `replication.granularity_bytes`: {e}"))?;
        if r.frame_bytes_max < 1024 * 1024 {
            return Err("key `replication.frame_bytes_max`: must be at least 1 MiB".into());
        }
        if r.connections_max == 0 || r.handshakes_max == 0 || r.handshakes_max > r.connections_max {
            return Err("keys `replication.connections_max` and `replication.handshakes_max`: both at least 1, handshakes_max at most connections_max".into());
        }
        if self.api.connections_max == 0 {
            return Err("key `api.connections_max` must be at least 1".into());
        }
        if self.api.session_ttl_ms == 0
            || self.api.event_streams_max == 0
            || self.api.peer_probe_interval_ms == 0
        {
            return Err(
                "keys `api.session_ttl_ms`, `api.event_streams_max` and `api.peer_probe_interval_ms` must be at least 1".into(),
            );
        }
        match (&self.api.tls_cert_file, &self.api.tls_key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) => crate::transport::tls::check_operator_cert(cert, key)?,
            _ => {
                return Err(
                    "keys `api.tls_cert_file` and `api.tls_key_file`: give both or neither".into(),
                )
            }
        }
        if self.migration.migrations_max == 0 {
            return Err("key `migration.migrations_max` must be at least 1".into());
        }
        self.history.validate().map_err(|e| format!("key `{e}`"))?;
        let n = &self.nbd;
        if n.max_connections == 0 || n.max_in_flight_per_connection == 0 {
            return Err(
                "keys `nbd.max_connections` and `nbd.max_in_flight_per_connection` must be at least 1"
                    .into(),
            );
        }
        if !(4096..=(1 << 30)).contains(&n.max_request_bytes) {
            return Err("key `nbd.max_request_bytes`: must be between 4 KiB and 1 GiB".into());
        }
        if let Some(c) = &self.cluster {
            c.timing()
                .validate()
                .map_err(|e| format!("table `cluster`: {e}"))?;
            if !["manual", "discard-younger-primary", "discard-least-changes"]
                .contains(&c.split_brain.as_str())
            {
                return Err(format!(
                    "key `cluster.split_brain`: {:?} is not one of manual, discard-younger-primary, discard-least-changes",
                    c.split_brain
                ));
            }
            if c.check_interval_ms == 0 || c.check_rise == 0 || c.check_fall == 0 {
                return Err(
                    "keys `cluster.check_interval_ms`, `check_rise` and `check_fall` must be at least 1"
                        .into(),
                );
            }
            if c.peer == self.node_name {
                return Err("key `cluster.peer`: a node cannot be its own peer".into());
            }
            if c.witness.is_some() && c.witness_key_file.is_none() {
                return Err(format!(
                    "key `cluster.witness_key_file` is missing: a witness needs the key its `ferry witness --key-file` uses; {}",
                    MAKE_KEY
                ));
            }
        }
        if r.copies_in_flight_max == 0 || r.al_extents_max == 0 {
            return Err(
                "keys `replication.copies_in_flight_max` and `al_extents_max` must be at least 1"
                    .into(),
            );
        }
        if r.link_unconfirmed_blocks_max < 2 {
            return Err("key `replication.link_unconfirmed_blocks_max` must be at least 2".into());
        }
        Ok(())
    }
}

/// toml's message with the line number spelled out.
fn describe(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

/// How to make the witness key, for the errors that need one.
pub const MAKE_KEY: &str = "make one with `(umask 077; head -c 32 /dev/urandom | base64 > /etc/ferry/witness.key)` and give the same file to the witness (`--key-file`) and to both nodes (`cluster.witness_key_file`)";

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ferry.toml");
        std::fs::write(&p, text).unwrap();
        AgentConfig::load(&p)
    }

    const GOOD: &str = "node_name = \"a\"\ndata_dir = \"/tmp/a\"\napi_listen = \"127.0.0.1:7360\"\nreplication_listen = \"127.0.0.1:7361\"\n";

    #[test]
    fn loads_and_refuses_with_line_and_key() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.replication.granularity_bytes, 65536);
        assert_eq!(c.nbd_listen, None, "NBD over TCP only when configured");
        assert_eq!(c.nbd_socket_path(), Path::new("/tmp/a/run/nbd.sock"));
        let e = load(&format!("{GOOD}nbd_listen = \"unix:/tmp/x.sock\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.socket_path"), "{e}");
        let c = load(&format!("{GOOD}nbd_listen = \"127.0.0.1:10809\"\n[nbd]\ntls_names = [\"vip.example\", \"198.18.0.9\"]\n")).unwrap();
        assert_eq!(c.nbd.tls_names.len(), 2);
        let e = load(&format!("{GOOD}[replication]\ngranularity_bytes = 5000\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("replication.granularity_bytes"), "{e}");
        let e = load(&format!("{GOOD}typo_key = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 5") && e.contains("typo_key"), "{e}");
        let e = load("node_name = \"a\"\n").unwrap_err().to_string();
        assert!(e.contains("data_dir"), "{e}");
    }

    #[test]
    fn history_keys_load_and_are_checked() {
        let c = load(GOOD).unwrap();
        assert!(c.history.enabled);
        assert_eq!(c.history.sample_interval_ms, 10_000);
        let c = load(&format!(
            "{GOOD}[history]\nenabled = false\nsample_interval_ms = 500\nfsync_interval_ms = 1000\nseries_max = 10\n"
        ))
        .unwrap();
        assert!(!c.history.enabled);
        assert_eq!(
            (c.history.series_max, c.history.fsync_interval_ms),
            (10, 1000)
        );
        for bad in [
            "sample_interval_ms = 50",
            "sample_interval_ms = 60000",
            "series_max = 0",
            "fsync_interval_ms = 0",
            "colour = 1",
        ] {
            let e = load(&format!("{GOOD}[history]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("history") || e.contains("colour"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_witness_without_its_key_is_refused() {
        let cluster = "[cluster]\npeer = \"b\"\nheartbeat = [\"127.0.0.1:7370\"]\nwitness = \"127.0.0.1:7380\"\n";
        let e = load(&format!("{GOOD}{cluster}")).unwrap_err().to_string();
        assert!(
            e.contains("cluster.witness_key_file") && e.contains("urandom"),
            "{e}"
        );
        load(&format!(
            "{GOOD}{cluster}witness_key_file = \"/etc/ferry/witness.key\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn console_keys_have_defaults_and_the_certificate_needs_its_key() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.api.session_ttl_ms, 8 * 3600 * 1000);
        assert_eq!(c.api.event_streams_max, 32);
        assert!(c.api.tls_cert_file.is_none());
        let e = load(&format!(
            "{GOOD}[api]\ntls_cert_file = \"/nonexistent.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("give both or neither"), "{e}");
        let e = load(&format!(
            "{GOOD}[api]\ntls_cert_file = \"/nonexistent.pem\"\ntls_key_file = \"/nonexistent.key\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("api.tls_cert_file"), "{e}");
        let e = load(&format!("{GOOD}[api]\nevent_streams_max = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("api.event_streams_max"), "{e}");
    }
}
