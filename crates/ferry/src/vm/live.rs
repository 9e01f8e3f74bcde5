//! A live VM move, the source's side: the guest's RAM goes to the target
//! while it runs, over ferry's mutual-TLS transport, and QEMU's migration
//! completes with the source paused (`postmigrate`: vCPUs stopped, drives
//! flushed and inactive) and the target paused with the whole device state.
//! The handover machine decides what follows ([`ferry_core::handover`]):
//! the freeze, the Merkle comparison and the commit, then the target's VM
//! continues ([`super::Vms::start`] there) and this one quits
//! ([`LiveMove::stop_source`]); any failure before the commit ends the
//! target's VM and continues this one ([`LiveMove::resume_source`]).
//!
//! ```text
//!  source QEMU ── migrate unix:vms/W/outgoing.sock ──▶ source agent
//!      ══ mutual TLS (replication listener, first frame VmStream{W, token}) ══▶
//!  target agent ──▶ unix:vms/W/incoming.sock ──▶ target QEMU (-S -incoming defer)
//! ```
//!
//! QEMU's own `tls-creds-x509` would need a CA-issued chain; the nodes'
//! identities are pinned self-signed certificates, so the stream rides
//! ferry's transport between two local Unix sockets instead: never plain TCP
//! between nodes.
//!
//! QEMU's migration is never committed at `pre-switchover`: a migration
//! that failed while device state was still being sent restarts the guest
//! at the source on its own, which after a commit would run it on a disk
//! that is a replica. Only `completed` goes on to the commit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_api::reply::{QemuMigrationStats, VmMoveProgress, VmMoveReport};
use serde_json::{json, Value};

use super::qmp::{Qmp, QmpError};
use super::{connect_qmp, vm_dir, VmSettings, Vms};
use crate::transport::client::ApiClient;
use crate::transport::dial::Dialer;
use crate::transport::vmstream::{Outgoing, TunnelLimits};

/// Why a live move did not complete.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("the VM of {workload:?} does not run on this node: nothing to move live (`--cold` boots it at the target)")]
    NotRunning { workload: String },
    #[error("the VM of {workload:?} was started by an older ferry without a QMP socket: restart it (`ferry workload stop/start`) or cut over with `--cold`")]
    NoQmp { workload: String },
    #[error("QMP of the VM of {workload:?}: {source}")]
    Qmp {
        workload: String,
        #[source]
        source: QmpError,
    },
    #[error("{target} could not start the VM waiting for the move: {why} (a node of a previous release? cut over with --cold)")]
    Prepare { target: String, why: String },
    #[error("the RAM stream to {target}: {why}")]
    Stream { target: String, why: String },
    #[error("QEMU's migration to {target} {status}: {why}")]
    Migration {
        target: String,
        status: String,
        why: String,
    },
    #[error("the RAM of {workload:?} did not converge in {ms} ms ({remaining} bytes left, {dirty_pages_rate} pages/s dirtied); the move was cancelled and the guest goes on here: raise vm.precopy_timeout_ms or vm.downtime_limit_ms, or quiet the guest")]
    NotConverged {
        workload: String,
        ms: u64,
        remaining: u64,
        dirty_pages_rate: u64,
    },
    #[error("{0}")]
    Other(String),
}

/// A live move's progress, shared with `migrate status` (by workload).
pub type SharedProgress = Arc<Mutex<Option<VmMoveProgress>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// How often QEMU's progress is read while the RAM is copied (a status
/// change, `completed` above all, is read at once: QEMU's MIGRATION event).
const POLL: Duration = Duration::from_millis(100);
/// QEMU's `max-bandwidth` for "no limit" (it refuses values above about
/// SIZE_MAX / 1000).
const UNLIMITED_BYTES_PER_S: u64 = 1 << 40;

/// One live move of a workload's VM from this node to `target`.
pub struct LiveMove {
    vms: Arc<Vms>,
    data_dir: PathBuf,
    client: ApiClient,
    dialer: Dialer,
    workload: String,
    target: String,
    settings: VmSettings,
    progress: SharedProgress,
    qmp: Option<Qmp>,
    tunnel: Option<Outgoing>,
    /// Asked the target to start its VM (a rollback ends it).
    prepared: bool,
    started: Instant,
    precopy_ms: Option<f64>,
    /// QEMU's `STOP` of the source's vCPUs (its wall clock, µs).
    stop_at_unix_us: Option<u64>,
    stats: QemuMigrationStats,
    stream_bytes: u64,
    /// This node's clock when `run` returned the move completed (the
    /// handover's `vm-moved` step), to place the timeline's steps.
    moved_unix_us: Option<u64>,
    /// The move's token (the target's `vm-incoming` reply); the commit
    /// names it so the target continues this move's VM and no other.
    token: Option<String>,
}

impl LiveMove {
    pub fn new(
        vms: Arc<Vms>,
        data_dir: PathBuf,
        client: ApiClient,
        dialer: Dialer,
        workload: &str,
        target: &str,
        settings: VmSettings,
    ) -> LiveMove {
        let progress = vms.move_progress_slot(workload);
        LiveMove {
            vms,
            data_dir,
            client,
            dialer,
            workload: workload.to_string(),
            target: target.to_string(),
            settings,
            progress,
            qmp: None,
            tunnel: None,
            prepared: false,
            started: Instant::now(),
            precopy_ms: None,
            stop_at_unix_us: None,
            stats: QemuMigrationStats::default(),
            stream_bytes: 0,
            token: None,
            moved_unix_us: None,
        }
    }

    /// Whether a live move is possible: the VM runs here with a QMP socket.
    pub fn check(vms: &Vms, workload: &str) -> Result<(), LiveError> {
        let path = vms
            .qmp_path(workload)
            .ok_or_else(|| LiveError::NotRunning {
                workload: workload.to_string(),
            })?;
        if !path.exists() {
            return Err(LiveError::NoQmp {
                workload: workload.to_string(),
            });
        }
        Ok(())
    }

    fn qmp_err(&self, source: QmpError) -> LiveError {
        LiveError::Qmp {
            workload: self.workload.clone(),
            source,
        }
    }

    fn set_progress(&self, p: VmMoveProgress) {
        *lock(&self.progress) = Some(p);
    }

    /// The move: the target's VM waits on its standby exports, the stream
    /// is up, QEMU pre-copies the RAM while the guest runs, and this returns
    /// once QEMU says `completed` (the source is `postmigrate`). Never
    /// resumes the source itself: a failure leaves that to
    /// [`LiveMove::resume_source`].
    pub fn run(&mut self) -> Result<(), LiveError> {
        self.started = Instant::now();
        self.set_progress(VmMoveProgress {
            state: "preparing".into(),
            ..Default::default()
        });
        Self::check(&self.vms, &self.workload)?;
        let qmp_path = self
            .vms
            .qmp_path(&self.workload)
            .ok_or_else(|| LiveError::NotRunning {
                workload: self.workload.clone(),
            })?;
        let mut q = connect_qmp(&qmp_path, &self.settings)
            .map_err(|e| LiveError::Other(format!("QMP of the VM of {}: {e:#}", self.workload)))?;
        let st = q
            .execute("query-status", Value::Null)
            .map_err(|e| self.qmp_err(e))?;
        if st["status"] != "running" {
            return Err(LiveError::Other(format!(
                "the VM of {:?} is {} here, not running: nothing to move live",
                self.workload, st["status"]
            )));
        }
        // The target's VM, paused, on standby exports of its replicas.
        self.prepared = true;
        let ready = self
            .client
            .send(&ferry_api::Action::PrepareVmIncoming {
                name: ferry_core::Name::parse(&self.workload)
                    .map_err(|e| LiveError::Other(e.to_string()))?,
                req: ferry_api::request::VmIncomingRequest {
                    source: self.dialer.node_name().to_string(),
                },
            })
            .map_err(|e| LiveError::Prepare {
                target: self.target.clone(),
                why: format!("{e:#}"),
            })?;
        let token = match ready {
            ferry_api::Reply::VmIncomingReady(r) => {
                self.token = Some(r.token.clone());
                r.token
            }
            other => {
                return Err(LiveError::Prepare {
                    target: self.target.clone(),
                    why: format!("unexpected reply {other:?}"),
                })
            }
        };
        // The stream: dialled and accepted by the target before QEMU is
        // told to migrate, so a refusal is an error here.
        let dir = vm_dir(&self.data_dir, &self.workload)
            .map_err(|e| LiveError::Other(format!("{e:#}")))?;
        let sock = dir.join("outgoing.sock");
        let limits = TunnelLimits {
            accept_timeout_ms: self.settings.incoming_timeout_ms,
            connect_timeout_ms: self.settings.incoming_timeout_ms,
            idle_timeout_ms: self.settings.stream_idle_timeout_ms,
            ..TunnelLimits::default()
        };
        let tunnel = Outgoing::open(
            &self.dialer,
            &self.target,
            &self.workload,
            &token,
            &sock,
            limits,
        )
        .map_err(|e| LiveError::Stream {
            target: self.target.clone(),
            why: e.to_string(),
        })?;
        self.tunnel = Some(tunnel);
        let bw = match self.settings.max_bandwidth_bytes_per_s {
            0 => UNLIMITED_BYTES_PER_S,
            n => n,
        };
        q.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "auto-converge", "state": self.settings.auto_converge},
                {"capability": "events", "state": true},
                {"capability": "pause-before-switchover", "state": false},
            ]}),
        )
        .map_err(|e| self.qmp_err(e))?;
        q.execute(
            "migrate-set-parameters",
            json!({
                "downtime-limit": self.settings.downtime_limit_ms,
                "max-bandwidth": bw,
            }),
        )
        .map_err(|e| self.qmp_err(e))?;
        q.take_events();
        q.execute(
            "migrate",
            json!({"uri": format!("unix:{}", sock.display())}),
        )
        .map_err(|e| self.qmp_err(e))?;
        tracing::info!(workload = %self.workload, target = %self.target, "vm.live.precopy");
        let deadline = self.started + Duration::from_millis(self.settings.precopy_timeout_ms);
        let result = loop {
            let m = match q.execute("query-migrate", Value::Null) {
                Ok(m) => m,
                Err(e) => break Err(self.qmp_err(e)),
            };
            let status = m["status"].as_str().unwrap_or("").to_string();
            let ram = &m["ram"];
            let p = VmMoveProgress {
                state: status.clone(),
                ram_total_bytes: ram["total"].as_u64().unwrap_or(0),
                ram_transferred_bytes: ram["transferred"].as_u64().unwrap_or(0),
                ram_remaining_bytes: ram["remaining"].as_u64().unwrap_or(0),
                dirty_pages_rate: ram["dirty-pages-rate"].as_u64().unwrap_or(0),
                dirty_sync_count: ram["dirty-sync-count"].as_u64().unwrap_or(0),
                expected_downtime_ms: m["expected-downtime"].as_u64(),
                cpu_throttle_percent: m["cpu-throttle-percentage"].as_u64().unwrap_or(0),
                stream_bytes: self.tunnel.as_ref().map_or(0, |t| t.bytes_out()),
                elapsed_ms: self.started.elapsed().as_millis() as u64,
            };
            match status.as_str() {
                "completed" => {
                    self.stats = QemuMigrationStats {
                        downtime_ms: m["downtime"].as_u64(),
                        total_time_ms: m["total-time"].as_u64(),
                        setup_time_ms: m["setup-time"].as_u64(),
                        transferred_bytes: ram["transferred"].as_u64(),
                        ram_total_bytes: ram["total"].as_u64(),
                        dirty_sync_count: ram["dirty-sync-count"].as_u64(),
                        mbps: ram["mbps"].as_f64(),
                    };
                    self.set_progress(p);
                    break Ok(());
                }
                "failed" | "cancelled" | "cancelling" => {
                    self.set_progress(p);
                    break Err(LiveError::Migration {
                        target: self.target.clone(),
                        status,
                        why: m["error-desc"]
                            .as_str()
                            .unwrap_or("QEMU gave no reason (the target's VM or the stream ended?)")
                            .to_string(),
                    });
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = q.execute("migrate_cancel", Value::Null);
                break Err(LiveError::NotConverged {
                    workload: self.workload.clone(),
                    ms: self.settings.precopy_timeout_ms,
                    remaining: p.ram_remaining_bytes,
                    dirty_pages_rate: p.dirty_pages_rate,
                });
            }
            self.set_progress(p);
            // Until the next look, or at once when QEMU's migration status
            // changes (`events` capability): `completed` is acted on within
            // a QMP round trip, not a poll interval, since the guest is
            // paused from then on.
            if let Err(e) = q.wait_event("MIGRATION", POLL) {
                break Err(self.qmp_err(e));
            }
        };
        // The vCPUs' stop, as QEMU stamped it.
        self.stop_at_unix_us = q
            .take_events()
            .into_iter()
            .filter(|e| e.name == "STOP")
            .map(|e| e.at_unix_us)
            .next_back();
        self.qmp = Some(q);
        result?;
        self.precopy_ms = Some(self.started.elapsed().as_secs_f64() * 1000.0);
        // `completed` with the source paused: anything else is not a
        // finished move.
        // QEMU says `completed` a moment before its run state leaves
        // `finish-migrate` for `postmigrate`.
        let q = self.qmp.as_mut().expect("set above");
        let settle = Instant::now() + Duration::from_millis(self.settings.qmp_timeout_ms);
        loop {
            let st = q
                .execute("query-status", Value::Null)
                .map_err(|e| LiveError::Qmp {
                    workload: self.workload.clone(),
                    source: e,
                })?;
            match st["status"].as_str() {
                Some("postmigrate") => break,
                Some("finish-migrate") if Instant::now() < settle => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                _ => {
                    return Err(LiveError::Migration {
                        target: self.target.clone(),
                        status: "completed".into(),
                        why: format!("the source VM is {} instead of postmigrate", st["status"]),
                    })
                }
            }
        }
        if self.stop_at_unix_us.is_none() {
            // QEMU sent no STOP event (older QEMU): the completion is the
            // latest it can have been.
            self.stop_at_unix_us = Some(unix_us());
        }
        // The stream ends on its own now (QEMU closed it); its end is
        // awaited after the pause ([`LiveMove::end_stream`]), not inside it.
        self.stream_bytes = self.tunnel.as_ref().map_or(0, |t| t.bytes_out());
        tracing::info!(workload = %self.workload, target = %self.target,
            precopy_ms = ?self.precopy_ms, qemu_downtime_ms = ?self.stats.downtime_ms,
            "vm.live.completed: the source is paused, the target holds the RAM");
        self.moved_unix_us = Some(unix_us());
        Ok(())
    }

    /// Rollback (before the commit): the target's waiting VM ends, this one
    /// continues (QEMU reactivates its drives at `cont`). Best effort, each
    /// step logged; the guest runs here again whatever the target says.
    pub fn resume_source(&mut self) {
        if let Some(t) = self.tunnel.take() {
            t.abort();
        }
        if self.prepared {
            let name = ferry_core::Name::parse(&self.workload);
            if let Ok(name) = name {
                if let Err(e) = self
                    .client
                    .send(&ferry_api::Action::CancelVmIncoming { name })
                {
                    tracing::warn!(workload = %self.workload, target = %self.target, error = %format!("{e:#}"),
                        "vm.live.cancel_failed: the target's waiting VM may still run there (it never continues without the commit)");
                }
            }
        }
        let resumed = (|| -> Result<String, String> {
            let q = match self.qmp.as_mut() {
                Some(q) => q,
                None => {
                    let path = self
                        .vms
                        .qmp_path(&self.workload)
                        .ok_or_else(|| "the VM no longer runs here".to_string())?;
                    self.qmp =
                        Some(connect_qmp(&path, &self.settings).map_err(|e| format!("{e:#}"))?);
                    self.qmp.as_mut().expect("set above")
                }
            };
            let m = q
                .execute("query-migrate", Value::Null)
                .map_err(|e| e.to_string())?;
            if matches!(
                m["status"].as_str(),
                Some("setup" | "active" | "pre-switchover" | "device")
            ) {
                q.execute("migrate_cancel", Value::Null)
                    .map_err(|e| e.to_string())?;
            }
            let deadline = Instant::now() + Duration::from_millis(self.settings.qmp_timeout_ms);
            loop {
                let st = q
                    .execute("query-status", Value::Null)
                    .map_err(|e| e.to_string())?;
                let status = st["status"].as_str().unwrap_or("").to_string();
                match status.as_str() {
                    "running" => return Ok(status),
                    "postmigrate" | "paused" => {
                        q.execute("cont", Value::Null).map_err(|e| e.to_string())?;
                        return Ok(status);
                    }
                    // A cancel under way: wait for QEMU to settle.
                    _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    _ => return Err(format!("the VM stays {status}")),
                }
            }
        })();
        match resumed {
            Ok(was) => {
                tracing::info!(workload = %self.workload, was = %was, "vm.live.resumed: the guest goes on here")
            }
            Err(e) => {
                tracing::error!(workload = %self.workload, error = %e, "vm.live.resume_failed")
            }
        }
        *lock(&self.progress) = None;
    }

    /// The move's token, once the target's VM waits for it.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Waits (briefly) for the RAM stream's end, once the pause is over.
    fn end_stream(&mut self) {
        if let Some(t) = self.tunnel.take() {
            match t.finish(Duration::from_secs(5)) {
                Ok(s) => self.stream_bytes = s.bytes_out,
                Err(e) => {
                    tracing::warn!(workload = %self.workload, error = %e, "vm.live.stream_end")
                }
            }
        }
    }

    /// After the commit: the paused source VM quits (its disks belong to
    /// the target now; it never runs here again).
    pub fn stop_source(&mut self) {
        self.end_stream();
        if let Some(q) = self.qmp.as_mut() {
            if let Err(e) = q.execute("quit", Value::Null) {
                tracing::debug!(workload = %self.workload, error = %e, "vm.live.quit");
            }
        }
        self.qmp = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vms.is_running(&self.workload) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.vms.is_running(&self.workload) {
            let _ = self.vms.kill(&self.workload);
        }
        *lock(&self.progress) = None;
        tracing::info!(workload = %self.workload, "vm.live.source_stopped");
    }

    /// The report, once the target's VM continued at `continued_unix_us`
    /// (this node's clock); `t`: the handover's timeline, which says when
    /// ferry's freeze, drain, verification and commit ended.
    pub fn report(
        &self,
        continued_unix_us: Option<u64>,
        t: &ferry_core::handover::Timeline,
    ) -> VmMoveReport {
        let steps_unix_us = steps_unix_us(t, self.moved_unix_us);
        let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
        let since_stop = |at: Option<u64>| Some(ms(at?.saturating_sub(self.stop_at_unix_us?)));
        VmMoveReport {
            mode: "live".into(),
            downtime_ms: since_stop(continued_unix_us),
            precopy_ms: self.precopy_ms.map_or(0.0, |v| (v * 10.0).round() / 10.0),
            freeze_ms: since_stop(steps_unix_us[0]),
            drain_ms: since_stop(steps_unix_us[1]),
            verify_ms: since_stop(steps_unix_us[2]),
            commit_ms: since_stop(steps_unix_us[3]),
            qemu: self.stats.clone(),
            stream_bytes: self.stream_bytes,
        }
    }
}

/// When the freeze, the drain, the verification and the commit ended, on
/// this node's clock (µs since the epoch), from the machine's timeline and
/// the moment the VM's move completed.
fn steps_unix_us(
    t: &ferry_core::handover::Timeline,
    moved_unix_us: Option<u64>,
) -> [Option<u64>; 4] {
    use ferry_core::handover::Step;
    let base = moved_unix_us.zip(t.at(Step::VmMoved));
    let at = |s: Step| {
        let (unix, rel) = base?;
        Some(unix + t.at(s)?.saturating_sub(rel))
    };
    [
        at(Step::Frozen),
        at(Step::Drained),
        at(Step::Verified),
        at(Step::Committed),
    ]
}

/// This node's clock now, µs since the epoch (for [`LiveMove::report`]).
pub fn now_unix_us() -> u64 {
    unix_us()
}
