//! Live migration of workloads between nodes.
//!
//! A **workload** is a named set of volumes and shares plus hooks (`start`,
//! `stop`, `check`: shell commands run with a timeout, their output captured,
//! with `FERRY_WORKLOAD`, `FERRY_NODE`, `FERRY_ROLE` (`source`, `target`,
//! `test`…), `FERRY_VOLUME_URIS` (the NBD URIs of its volumes on this node)
//! and `FERRY_SHARE_PATHS` (where its shares are used here) in their environment). Its
//! definition is a JSON file in `DATA_DIR/workloads/` on every node that holds
//! it; a migration copies it to the target.
//!
//! A **migration** runs on the source node: its record (`DATA_DIR/migrations/`)
//! holds the phase machine of [`ferry_core::migration`], fed once a second
//! with samples of the workload's links, and survives an agent restart. The
//! **cutover** ([`cutover`]) is orchestrated from the source:
//!
//! ```text
//! stop hook at A → freeze A's volumes and shares (new writes wait) → drain
//!   the links (everything durable on B) → compare Merkle roots (BLAKE3) of
//!   every volume and the digest of every share's tree
//!   → COMMIT: B records itself primary (new generation, durable), exports
//!     the volumes and serves the shares (a sync share: mounted at its path)
//!   → A's held writes fail, A becomes B's replica (replication runs B → A)
//!   → start hook at B → check hook at B passes
//! ```
//!
//! Any failure before the commit point unfreezes A and runs its start hook
//! again; the migration is then `rolled-back` and may be retried. The
//! steps, the aborts and the rule for a lost commit answer are
//! [`ferry_core::handover`]'s machine, run by [`crate::handover::run`] (as a
//! cluster switchover is); this module holds the cutover's side of it
//! (hooks, the takeover, the way back) and its report.

mod host;
pub mod schedule;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::link::{Mode, Phase, ReplicaState};
use ferry_core::migration::{ConvergeConfig, LinkSample, Migration, MigrationPhase};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::handover::Node;
use crate::workload::{load_workload, names, test_export, workload_hook, HookRun, WorkloadSpec};
use ferry_core::Name;
pub use host::Host;

fn migrations_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("migrations")
}

impl crate::store::Record for MigrationRecord {
    const KIND: &'static str = "migration";
}

/// A migration as the source node keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub workload: Name,
    pub source: String,
    pub target: String,
    pub mode: String,
    pub started_unix: u64,
    pub state: Migration,
    /// The last cutover's report.
    pub last_cutover: Option<Value>,
    /// Made by a cutover on its target: replication runs back to the old
    /// source, and cutting over this record is a rollback.
    #[serde(default)]
    pub reverse: bool,
    /// `ferry migrate finalize` ended the reverse replication.
    #[serde(default)]
    pub finalized: bool,
    /// The running test cutover's report (`ferry migrate test`), until `--end`.
    #[serde(default)]
    pub test: Option<Value>,
    /// Cut over as soon as the migration is ready.
    #[serde(default)]
    pub auto_cutover: bool,
    /// Automatic cutovers tried (at most [`AUTO_CUTOVER_ATTEMPTS_MAX`]).
    #[serde(default)]
    pub auto_cutover_attempts: u32,
    /// An automatic cutover is under way (not persisted).
    #[serde(skip)]
    pub auto_cutover_running: bool,
    /// A scheduled cutover (`migrate cutover --at/--window/--deadline`, or
    /// `migrate start --auto-cutover --window`).
    #[serde(default)]
    pub schedule: Option<ferry_core::schedule::Schedule>,
    /// When each phase was first saved, oldest first (the migration
    /// report's timeline; at most [`TIMELINE_MAX`] marks).
    #[serde(default)]
    pub timeline: Vec<PhaseMark>,
}

/// A phase and when a save first saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseMark {
    pub phase: String,
    pub at_unix: u64,
}

/// Most phase marks a migration keeps (the first and the latest).
pub const TIMELINE_MAX: usize = 64;

/// Automatic cutovers tried per migration before it waits for an operator.
pub const AUTO_CUTOVER_ATTEMPTS_MAX: u32 = 3;

impl MigrationRecord {
    /// Adds the current phase to the timeline if it is new there.
    pub fn mark_phase(&mut self, at_unix: u64) {
        let phase = self.state.phase.as_str();
        if self.timeline.last().is_some_and(|m| m.phase == phase) {
            return;
        }
        if self.timeline.len() >= TIMELINE_MAX {
            self.timeline.remove(1);
        }
        self.timeline.push(PhaseMark {
            phase: phase.to_string(),
            at_unix,
        });
    }

    pub fn save(&mut self, data_dir: &Path) -> Result<()> {
        self.mark_phase(unix_now());
        let dir = migrations_dir(data_dir);
        std::fs::create_dir_all(&dir)?;
        Ok(crate::store::save(
            &dir.join(format!("{}.json", self.workload)),
            self,
        )?)
    }
}

/// Loads the migrations recorded in the data dir (after the volumes are
/// loaded). One that was cutting over when the agent stopped is settled by
/// where its volumes are now: still primary here means the commit point was
/// not reached.
pub fn load_migrations<H: Host + ?Sized>(ctx: &H) -> Result<HashMap<String, MigrationRecord>> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(migrations_dir(&ctx.cfg().data_dir)) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let name = e
            .file_name()
            .to_string_lossy()
            .trim_end_matches(".json")
            .to_string();
        if name.starts_with('.') || e.path().extension().is_none_or(|x| x != "json") {
            continue;
        }
        // Each record on its own: a damaged one is set aside and reported.
        match load_migration(ctx, &e.path()) {
            Ok(rec) => {
                out.insert(rec.workload.to_string(), rec);
            }
            Err(err) => ctx
                .damaged()
                .report("migration", &name, &e.path(), format!("{err:#}")),
        }
    }
    Ok(out)
}

fn load_migration<H: Host + ?Sized>(ctx: &H, path: &Path) -> Result<MigrationRecord> {
    {
        let mut rec: MigrationRecord =
            crate::store::load(path)?.ok_or_else(|| anyhow!("{} is gone", path.display()))?;
        if rec.state.phase == MigrationPhase::CuttingOver {
            let spec = load_workload(&ctx.cfg().data_dir, &rec.workload)?;
            let still_here = spec
                .map(|s| {
                    let store = crate::share::ShareStore::new(&ctx.cfg().data_dir);
                    s.volumes.iter().all(|v| ctx.primary(v).is_some())
                        && s.shares
                            .iter()
                            .all(|n| store.load(n).is_ok_and(|r| r.role == "primary"))
                })
                .unwrap_or(false);
            if still_here {
                rec.state.cutover_aborted(
                    "the agent stopped during the cutover, before its commit point",
                );
            } else {
                rec.state.cutover_done();
            }
            rec.save(&ctx.cfg().data_dir)?;
        }
        if let Some(s) = rec.schedule.as_mut() {
            // A scheduled cutover that was running: its end is the phase above.
            if s.state == ferry_core::schedule::ScheduleState::CuttingOver {
                s.restarted();
                if rec.state.phase.is_final() {
                    s.cutover_ended(
                        crate::migration::schedule::now_unix(),
                        Ok("completed before the agent restarted".into()),
                    );
                }
                rec.save(&ctx.cfg().data_dir)?;
            }
        }
        Ok(rec)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How `ferry migrate start` runs a migration.
pub struct StartOptions {
    pub mode: Mode,
    /// The background copy's limit.
    pub max_rate: Option<u64>,
    pub auto_converge: bool,
    /// Cut over once ready…
    pub auto_cutover: bool,
    /// …only inside this window / until this deadline.
    pub window: Option<crate::migration::schedule::ScheduleRequest>,
    /// How each volume's first sync finds what to send (offline seeding,
    /// checksum, or everything).
    pub baseline: crate::volume::Baseline,
}

/// `ferry migrate start`: replicate every volume of `workload` to `to`.
pub fn start<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    to: &str,
    o: StartOptions,
) -> Result<Value> {
    let StartOptions {
        mode,
        max_rate,
        auto_converge,
        auto_cutover,
        window,
        baseline,
    } = o;
    // Checked before anything starts: a bad window or deadline starts nothing.
    let schedule = match &window {
        Some(req) if auto_cutover => Some(crate::migration::schedule::build(ctx, req, true)?),
        Some(_) => bail!("--window and --deadline go with --auto-cutover"),
        None => None,
    };
    let spec = load_workload(&ctx.cfg().data_dir, workload)?.ok_or_else(|| {
        anyhow!(
            "no workload {workload:?} on node {}: create it with `ferry workload create`",
            ctx.identity().node_name
        )
    })?;
    // Shares: each a primary here, replicating to `to` or to no node yet
    // (a share has one peer). Checked before anything starts.
    let shares = crate::handover::members::share_primaries(&**ctx, &spec)?;
    for sh in &shares {
        let peer = sh
            .rec
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .peer
            .clone();
        if let Some(p) = peer.filter(|p| p != to) {
            bail!(
                "share {:?} of workload {workload:?} replicates to {p}; a share has one peer, so the workload cannot migrate to {to}",
                sh.name
            );
        }
    }
    {
        let migs = ctx.migrations();
        if let Some(m) = migs.get(workload) {
            if !m.state.phase.is_final() && m.target != to {
                bail!("workload {workload:?} is already migrating to {}", m.target);
            }
        }
        let active = migs
            .values()
            .filter(|m| !m.state.phase.is_final() && m.workload != workload)
            .count();
        if active >= ctx.cfg().migration.migrations_max {
            bail!(
                "{active} migrations are running (migrations_max {}); wait for one to finish",
                ctx.cfg().migration.migrations_max
            );
        }
    }
    let peer = ctx.peers().get(to).ok_or_else(|| {
        anyhow!("node {to:?} is not registered: run `ferry node add {to} --api HOST:PORT` first")
    })?;
    let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?;
    // Space on the target, checked before anything starts.
    let need: u64 = spec
        .volumes
        .iter()
        .map(|v| {
            ctx.primary(v)
                .map(|p| ferry_nbd::BlockDevice::size(&p.local))
                .ok_or_else(|| {
                    anyhow!(
                        "volume {v:?} of workload {workload:?} is not a primary on node {}",
                        ctx.identity().node_name
                    )
                })
        })
        .sum::<Result<u64>>()?;
    let node = client.get("/api/v1/node")?;
    if let Some(free) = node["free_bytes"].as_u64() {
        let share_bytes: u64 = spec
            .shares
            .iter()
            .filter_map(|s| crate::share::status(ctx, s, true).ok())
            .map(|st| st.bytes)
            .sum();
        let have: u64 = spec
            .volumes
            .iter()
            .filter_map(|v| ctx.primary(v))
            .map(|p| p.allocated_bytes())
            .sum::<u64>()
            + share_bytes;
        if have > free {
            bail!(
                "node {to} has {} free, the workload's volumes and shares hold {} (volumes: {} provisioned): refusing to start",
                ferry_core::ByteSize(free),
                ferry_core::ByteSize(have),
                ferry_core::ByteSize(need)
            );
        }
    }
    client
        .put(
            &format!("/api/v1/workloads/{workload}?forwarded=true"),
            &serde_json::to_value(&spec)?,
        )
        .with_context(|| format!("node {to} could not store the workload definition"))?;
    for v in &spec.volumes {
        ctx.clone()
            .start_replication(v, to, mode, max_rate, &baseline)?;
    }
    for s in &spec.shares {
        crate::share::replicate_to(ctx, s, to)?;
    }
    let mode = if mode == Mode::Sync { "sync" } else { "async" };
    begin_record(ctx, workload, to, mode, auto_converge, false)?;
    set_phase(ctx, workload, |r| {
        r.auto_cutover = auto_cutover;
        r.schedule = schedule;
    });
    sample(ctx, workload);
    status(ctx, workload)
}

/// Feeds the migration of `workload` one sample of its links.
pub fn sample<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) {
    let Some(spec) = load_workload(&ctx.cfg().data_dir, workload).ok().flatten() else {
        return;
    };
    let now_ms = ctx.started().elapsed().as_millis() as u64;
    let mut s = LinkSample {
        now_ms,
        connected: true,
        up_to_date: true,
        ..LinkSample::default()
    };
    let mut throttle_targets = Vec::new();
    for v in &spec.volumes {
        let Some(p) = ctx.primary(v) else {
            s.connected = false;
            s.up_to_date = false;
            continue;
        };
        let l = p.link.lock();
        let st = l.rep.status();
        s.connected &= st.phase == Phase::Streaming || st.phase == Phase::Resyncing;
        s.up_to_date &= st.replica == ReplicaState::UpToDate && st.phase == Phase::Streaming;
        s.seeding |= st.phase == Phase::Resyncing;
        s.bytes_remaining += st.dirty_bytes + st.backlog_bytes;
        s.bytes_sent_total += l.stats.bytes_sent;
        s.bytes_copied_total += l.stats.copy_bytes_sent;
        drop(l);
        s.bytes_written_total += p.bytes_written();
        throttle_targets.push(p);
    }
    let ready_lag = std::time::Duration::from_millis(ctx.cfg().migration.async_share_ready_lag_ms);
    // A share counts like a volume: its link up, its copy up to date with
    // nothing waiting to be sent; what it sends that is not resync is what
    // the workload wrote.
    for name in &spec.shares {
        let Some(sh) = ctx.shares().primary(name) else {
            s.connected = false;
            s.up_to_date = false;
            continue;
        };
        // Caught up, or (an application that keeps writing) close behind;
        // `lag_within` holds whenever `caught_up` does.
        let caught_up = sh.lag_within(ready_lag);
        let l = sh.link();
        s.connected &= l.connected;
        s.up_to_date &= l.connected && l.up_to_date && caught_up;
        s.seeding |= l.connected && !l.up_to_date;
        s.bytes_remaining += l.queued_bytes + l.inflight_bytes;
        drop(l);
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let sent = load(&sh.stats.bytes_sent);
        // Live ops (sync) and the pump's passes (async) carry what the
        // application wrote; resync passes carry what it had.
        let written =
            sent.saturating_sub(load(&sh.stats.resync_bytes)) + load(&sh.stats.pumped_bytes);
        s.bytes_sent_total += sent;
        s.bytes_written_total += written;
        // What drains a share's queue is what it sends.
        s.bytes_copied_total += sent;
    }
    let mut migs = ctx.migrations();
    let Some(rec) = migs.get_mut(workload) else {
        return;
    };
    let before = (
        rec.state.phase,
        rec.state.not_converging,
        rec.state.throttle_pct,
    );
    rec.state.observe(s);
    for p in &throttle_targets {
        p.set_throttle_pct(rec.state.throttle_pct);
    }
    if before
        != (
            rec.state.phase,
            rec.state.not_converging,
            rec.state.throttle_pct,
        )
    {
        tracing::info!(
            workload,
            phase = rec.state.phase.as_str(),
            not_converging = rec.state.not_converging,
            throttle_pct = rec.state.throttle_pct,
            "migration.phase"
        );
        if before.2 != rec.state.throttle_pct {
            ctx.audit().decide(crate::audit::decision(
                "throttle",
                workload,
                serde_json::json!({"throttle_pct": rec.state.throttle_pct, "was_pct": before.2,
                    "phase": rec.state.phase.as_str(), "not_converging": rec.state.not_converging}),
                None,
            ));
        }
        if let Err(e) = rec.save(&ctx.cfg().data_dir) {
            tracing::error!(workload, error = %e, "migration.record.save_failed");
        }
    }
    // With a window, the scheduler cuts over (crate::migration::schedule).
    let auto = rec.auto_cutover
        && rec.schedule.is_none()
        && !rec.reverse
        && !rec.auto_cutover_running
        && rec.test.is_none()
        && rec.state.phase == MigrationPhase::Ready
        && rec.auto_cutover_attempts < AUTO_CUTOVER_ATTEMPTS_MAX;
    if !auto {
        return;
    }
    rec.auto_cutover_attempts += 1;
    rec.auto_cutover_running = true;
    let attempt = rec.auto_cutover_attempts;
    if let Err(e) = rec.save(&ctx.cfg().data_dir) {
        tracing::error!(workload, error = %e, "migration.record.save_failed");
    }
    drop(migs);
    let (c, name) = (ctx.clone(), workload.to_string());
    let op = crate::audit::new_op_id();
    ctx.audit().decide(crate::audit::decision(
        "auto-cutover",
        workload,
        serde_json::json!({"attempt": attempt}),
        Some(&op),
    ));
    let spawned = std::thread::Builder::new()
        .name(format!("auto-cutover-{workload}"))
        .spawn(move || {
            tracing::info!(workload = %name, attempt, "migration.auto_cutover.begin");
            let r = crate::transport::client::with_op(Some(&op), || cutover(&c, &name));
            let outcome = match &r {
                Ok(r) => serde_json::json!({"ok": true, "downtime_ms": r["downtime_ms"]}),
                Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
            };
            c.audit().decide(crate::audit::decision(
                "auto-cutover-result",
                &name,
                outcome,
                Some(&op),
            ));
            match r {
                Ok(r) => tracing::info!(workload = %name, downtime_ms = ?r["downtime_ms"], "migration.auto_cutover.done"),
                Err(e) => tracing::warn!(workload = %name, attempt, error = %format!("{e:#}"), "migration.auto_cutover.failed"),
            }
            set_phase(&c, &name, |r| r.auto_cutover_running = false);
        });
    if let Err(e) = spawned {
        tracing::error!(workload, error = %e, "migration.auto_cutover.spawn_failed");
        set_phase(ctx, workload, |r| r.auto_cutover_running = false);
    }
}

fn no_migration<H: Host + ?Sized>(ctx: &H, workload: &str) -> anyhow::Error {
    ferry_api::ActionError::not_found(format!(
        "no migration of workload {workload:?} on node {}",
        ctx.identity().node_name
    ))
    .into()
}

/// The status document of one migration.
pub fn status<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let migs = ctx.migrations();
    let rec = migs
        .get(workload)
        .ok_or_else(|| no_migration(ctx, workload))?;
    let m = &rec.state;
    // Live from the links and leaf caches of the workload's volumes here.
    let spec = load_workload(&ctx.cfg().data_dir, workload).ok().flatten();
    let vols: Vec<_> = spec
        .as_ref()
        .map(|w| w.volumes.iter().filter_map(|v| ctx.primary(v)).collect())
        .unwrap_or_default();
    // Each share's replica state as its link sees it.
    let shares: Vec<Value> = spec
        .iter()
        .flat_map(|w| &w.shares)
        .filter_map(|s| crate::share::status(ctx, s, false).ok())
        .map(|st| {
            json!({"share": st.name, "role": st.role, "state": st.state,
                "pending_paths": st.pending_paths, "last_error": st.last_error})
        })
        .collect();
    let backlog_bytes: u64 = vols
        .iter()
        .map(|p| p.link.lock().rep.status().backlog_bytes)
        .sum();
    // Blocks whose Merkle leaf a cutover would hash inside its downtime
    // (it re-hashes them before stopping the workload, too).
    let merkle_stale_bytes: u64 = vols
        .iter()
        .map(|p| p.leaves.stale_blocks() * ctx.cfg().replication.granularity_bytes)
        .sum();
    // The copy rate limit (`migrate set`): the same on every volume.
    let max_rate_bytes_per_s = vols
        .iter()
        .filter_map(|p| p.link.lock().max_rate_bytes_per_s)
        .max();
    let lag_seconds =
        (m.send_rate_bytes_per_s > 1.0).then(|| m.bytes_remaining as f64 / m.send_rate_bytes_per_s);
    Ok(json!({
        "workload": rec.workload,
        "source": rec.source,
        "target": rec.target,
        "mode": rec.mode,
        "phase": m.phase.as_str(),
        "bytes_remaining": m.bytes_remaining,
        "backlog_bytes": backlog_bytes,
        "merkle_stale_bytes": merkle_stale_bytes,
        "shares": shares,
        "eta_seconds": m.eta_seconds().map(|s| (s * 10.0).round() / 10.0),
        "bandwidth_bytes_per_s": m.send_rate_bytes_per_s.round() as u64,
        "write_rate_bytes_per_s": m.write_rate_bytes_per_s.round() as u64,
        "dirty_rate_bytes_per_s": m.dirty_rate_bytes_per_s.round() as u64,
        "copy_rate_bytes_per_s": m.copy_rate_bytes_per_s.round() as u64,
        "max_rate_bytes_per_s": max_rate_bytes_per_s,
        "lag_seconds": lag_seconds.map(|s| (s * 100.0).round() / 100.0),
        "not_converging": m.not_converging,
        "advice": m.advice(),
        "auto_converge": m.auto_converge,
        "throttle_pct": m.throttle_pct,
        "reason": m.reason,
        "started_unix": rec.started_unix,
        "last_cutover": rec.last_cutover,
        "reverse": rec.reverse,
        "finalized": rec.finalized,
        "test": rec.test,
        "auto_cutover": rec.auto_cutover,
        "auto_cutover_attempts": rec.auto_cutover_attempts,
        "scheduled_at": rec.schedule.as_ref().and_then(crate::migration::schedule::scheduled_at),
        "schedule": rec.schedule.as_ref().map(crate::migration::schedule::to_json),
        "vm": ctx.hook_env().vms.move_progress(workload),
    }))
}

pub fn statuses<H: Host + ?Sized>(ctx: &Arc<H>) -> Result<Value> {
    let mut names: Vec<String> = ctx.migrations().keys().cloned().collect();
    names.sort();
    Ok(Value::Array(
        names
            .iter()
            .map(|n| status(ctx, n))
            .collect::<Result<Vec<_>>>()?,
    ))
}

fn set_phase<H: Host + ?Sized>(ctx: &H, workload: &str, f: impl FnOnce(&mut MigrationRecord)) {
    let mut migs = ctx.migrations();
    if let Some(rec) = migs.get_mut(workload) {
        f(rec);
        if let Err(e) = rec.save(&ctx.cfg().data_dir) {
            tracing::error!(workload, error = %e, "migration.record.save_failed");
        }
    }
}

/// `ferry migrate cutover`: see the module documentation. Blocks until it
/// ends; returns the report (downtime, outage, each step's time).
pub fn cutover<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    cutover_with(ctx, workload, true, false)
}

/// A cutover; with `reverse_on_failure`, a target whose start/check hook
/// fails hands the workload back (a reverse cutover never does, so two nodes
/// that both fail to start it do not hand it back and forth). The steps,
/// aborts and the lost-commit rule are the handover machine's
/// ([`ferry_core::handover`]), run by [`crate::handover::run`]; this is the
/// cutover's side of it ([`CutoverSide`]) and its report.
pub fn cutover_with<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    reverse_on_failure: bool,
    cold: bool,
) -> Result<Value> {
    use ferry_core::handover::{Kind, Outcome, Plan};
    let _one = ctx.cutover_lock().lock().unwrap_or_else(|p| p.into_inner());
    let spec = load_workload(&ctx.cfg().data_dir, workload)?.ok_or_else(|| {
        ferry_api::ActionError::not_found(format!("no workload {workload:?} here"))
    })?;
    sample(ctx, workload);
    let (target, mode) = {
        let mut migs = ctx.migrations();
        let rec = migs.get_mut(workload).ok_or_else(|| {
            ferry_api::ActionError::not_found(format!(
                "workload {workload:?} is not migrating from node {}",
                ctx.identity().node_name
            ))
        })?;
        if rec.test.is_some() {
            bail!(
                "cutover refused: a test instance of {workload} runs on {}; end it with `ferry migrate test {workload} --end`",
                rec.target
            );
        }
        rec.state
            .begin_cutover()
            .map_err(|e| ferry_api::ActionError::conflict(format!("cutover refused: {e}")))?;
        rec.save(&ctx.cfg().data_dir)?;
        (
            rec.target.clone(),
            if rec.mode == "async" {
                Mode::Async
            } else {
                Mode::Sync
            },
        )
    };
    // A VM workload whose VM runs here moves live unless `--cold`; one
    // started without a QMP socket (an older ferry) is refused rather than
    // stopped behind the operator's back.
    let vms = ctx.hook_env().vms.clone();
    let live = spec.vm.is_some() && !cold && vms.is_running(workload) && !vms.is_incoming(workload);
    if live {
        if let Err(e) = crate::vm::live::LiveMove::check(&vms, workload) {
            set_phase(ctx, workload, |r| r.state.cutover_aborted(e.to_string()));
            return Err(ferry_api::ActionError::conflict(format!("cutover refused: {e}")).into());
        }
    }
    tracing::info!(workload, %target, live, "cutover.begin");
    let me = ctx.identity().node_name.clone();
    // Nothing was frozen or stopped yet: a cutover that cannot begin is
    // aborted.
    let begun = (|| {
        let peer = ctx
            .peers()
            .get(&target)
            .ok_or_else(|| anyhow!("node {target:?} is not registered"))?;
        let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?;
        let members = crate::handover::members::handover_members(
            ctx, &spec, &client, &target, "cutover", true,
        )?;
        anyhow::Ok((client, members))
    })();
    let (client, members) = match begun {
        Ok(b) => b,
        Err(e) => {
            set_phase(ctx, workload, |r| r.state.cutover_aborted(format!("{e:#}")));
            return Err(e);
        }
    };
    let plan = Plan {
        kind: Kind::Cutover { reverse_on_failure },
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
        check: spec.check.is_some(),
        check_timeout_ms: spec.hook_timeout_ms,
        check_retry_ms: CHECK_RETRY_MS,
        live_vm: live,
    };
    let live_move = live.then(|| {
        crate::vm::live::LiveMove::new(
            vms.clone(),
            ctx.cfg().data_dir.clone(),
            client.clone(),
            ctx.dialer(),
            workload,
            &target,
            ctx.cfg().vm.clone(),
        )
    });
    let mut side = CutoverSide {
        ctx,
        spec: &spec,
        client: &client,
        workload,
        target: &target,
        me: &me,
        mode: if mode == Mode::Sync { "sync" } else { "async" },
        hooks: Vec::new(),
        last_check: None,
        original: None,
        reverse_report: None,
        live: live_move,
        shell_stopped: false,
        continued_unix_us: None,
    };
    let ran = crate::handover::run(plan, &members, &mut side, workload)
        .map_err(|e| anyhow!("cutover of {workload}: {e}"))?;
    drop(members);
    let vm_report = match &side.live {
        Some(l) => Some(l.report(side.continued_unix_us, &ran.timeline)),
        None => spec.vm.as_ref().map(|_| ferry_api::reply::VmMoveReport {
            mode: "cold".into(),
            downtime_ms: None,
            precopy_ms: 0.0,
            freeze_ms: None,
            drain_ms: None,
            verify_ms: None,
            commit_ms: None,
            qemu: Default::default(),
            stream_bytes: 0,
        }),
    };
    let CutoverSide {
        mut hooks,
        last_check,
        original,
        reverse_report,
        ..
    } = side;
    match ran.outcome {
        Outcome::RolledBack(abort) => {
            let why = cutover_abort_why(&abort, &target);
            tracing::warn!(workload, reason = %why, "cutover.aborted: the source resumes");
            set_phase(ctx, workload, |r| r.state.cutover_aborted(why.clone()));
            Err(anyhow!(
                "cutover aborted before its commit point, {me} serves again: {why}"
            ))
        }
        Outcome::CommittedPartly { why, .. } => {
            // Past the commit point: there is no going back.
            set_phase(ctx, workload, |r| {
                r.state.fail(format!(
                    "{target} committed the takeover but did not promote every volume: {why}"
                ))
            });
            bail!("cutover failed after its commit point: {target} took over some volumes or shares but not all ({why}); it finishes the takeover when its agent restarts");
        }
        Outcome::Committed {
            unhealthy,
            reversed,
        } => {
            hooks.extend(last_check);
            let check_ok = unhealthy.is_none();
            let mut report =
                cutover_report(workload, &me, &target, &ran.timeline, &hooks, check_ok);
            // A live move: the downtime is the guest's pause.
            if let Some(d) = vm_report.as_ref().and_then(|v| v.downtime_ms) {
                report.downtime_ms = d;
            }
            report.vm = vm_report.map(Box::new);
            let report = serde_json::to_value(report)?;
            if let Some(back) = reversed {
                // The workload did not come up at the target: a reverse
                // verified cutover returned it here (or tried to).
                let mut report = report;
                report["reverse_cutover"] = match reverse_report {
                    Some(Ok(r)) => r,
                    Some(Err(e)) => json!({ "error": e }),
                    None => Value::Null,
                };
                if let Some(mut rec) = original {
                    rec.last_cutover = Some(report.clone());
                    match &back {
                        Ok(()) => rec.state.cutover_aborted(format!(
                            "the workload did not start at {target} (see last_cutover.hooks); a reverse cutover returned it to {me}"
                        )),
                        Err(e) => rec.state.fail(format!(
                            "{target} serves the volumes but its start/check hook failed, and the reverse cutover failed too: {e}"
                        )),
                    }
                    rec.save(&ctx.cfg().data_dir)?;
                    ctx.migrations().insert(workload.to_string(), rec);
                }
                tracing::warn!(
                    workload,
                    reversed = back.is_ok(),
                    "cutover.target_unhealthy"
                );
                return Ok(report);
            }
            set_phase(ctx, workload, |r| {
                if check_ok {
                    r.state.cutover_done();
                } else {
                    r.state.fail(format!("{target} serves the volumes but its start/check hook failed: see last_cutover.hooks"));
                }
                r.last_cutover = Some(report.clone());
            });
            tracing::info!(
                workload,
                downtime_ms = ?report["downtime_ms"],
                outage_ms = ?report["outage_ms"],
                healthy = check_ok,
                "cutover.done"
            );
            Ok(report)
        }
    }
}

/// The wait between two attempts of the target's check hook.
const CHECK_RETRY_MS: u64 = 100;

/// Why a cutover stopped before its commit point, as the operator reads it.
fn cutover_abort_why(abort: &ferry_core::handover::Abort, target: &str) -> String {
    use ferry_core::handover::Abort;
    match abort {
        Abort::Differs { why, .. } | Abort::Compare { why, .. } => {
            format!("{why}; cut over again once it is ready")
        }
        Abort::NotTakenOver(why) => format!("{target} did not take the workload over: {why}"),
        Abort::StopHook(why) | Abort::Drain { why, .. } | Abort::CommitRefused(why) => why.clone(),
        Abort::VmMove(why) => format!("the VM's live move failed ({why}); the guest goes on here"),
    }
}

/// The cutover report (`migrate cutover`, `last_cutover` in the status):
/// the downtime (freeze → the target's start hook returned), the outage
/// (stop hook → the check passed), each step's time since the cutover
/// began, the hooks' runs.
fn cutover_report(
    workload: &str,
    from: &str,
    to: &str,
    t: &ferry_core::handover::Timeline,
    hooks: &[HookRun],
    healthy: bool,
) -> ferry_api::reply::CutoverReport {
    let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    ferry_api::reply::CutoverReport {
        workload: workload.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        downtime_ms: ms(t.downtime_us().unwrap_or(0)),
        outage_ms: t.outage_us().map(ms),
        steps_us: t
            .steps
            .iter()
            .map(|(n, at)| ferry_api::reply::CutoverStep {
                step: n.as_str().to_string(),
                at_us: *at,
            })
            .collect(),
        hooks: hooks.to_vec(),
        target_healthy: healthy,
        vm: None,
        reverse_cutover: None,
    }
}

/// What a cutover does that is not a member's: the hooks, the commit (one
/// durable takeover record on the target), the way back, the reverse.
struct CutoverSide<'a, H: Host + ?Sized> {
    ctx: &'a Arc<H>,
    spec: &'a WorkloadSpec,
    client: &'a crate::transport::client::ApiClient,
    workload: &'a str,
    target: &'a str,
    me: &'a str,
    mode: &'static str,
    hooks: Vec<HookRun>,
    /// The check's last attempt (the report keeps that one).
    last_check: Option<HookRun>,
    /// The migration record as it was before a reverse cutover.
    original: Option<MigrationRecord>,
    /// The reverse cutover's report, or why it failed.
    reverse_report: Option<std::result::Result<Value, String>>,
    /// The VM moves live (the plan's `live_vm`).
    live: Option<crate::vm::live::LiveMove>,
    /// The shell stop hook ran (a rollback runs the start hook again).
    shell_stopped: bool,
    /// This node's clock when the target's VM continued (µs since the epoch).
    continued_unix_us: Option<u64>,
}

impl<H: Host + ?Sized> crate::handover::Side for CutoverSide<'_, H> {
    /// The application-visible outage starts here.
    fn run_stop_hook(&mut self) -> std::result::Result<(), String> {
        // A live move: the VM is paused, its RAM at the target; only the
        // shell hook is left to run.
        let run = if self.live.is_some() {
            crate::workload::workload_shell_hook(&self.ctx.hook_env(), self.spec, "stop", "source")
        } else {
            workload_hook(&self.ctx.hook_env(), self.spec, "stop", "source")
        };
        let Some(h) = run else {
            return Ok(());
        };
        self.shell_stopped = true;
        let ok = h.ok;
        let why = format!(
            "stop hook failed (exit {:?}, timed out {}): {}",
            h.exit_code,
            h.timed_out,
            h.output.trim()
        );
        self.hooks.push(h);
        if ok {
            Ok(())
        } else {
            Err(why)
        }
    }

    /// One call for all members: the target records the takeover durably
    /// (the commit), then promotes each, finishing after a crash. Any error
    /// may have lost the answer: the machine asks the target what it serves.
    fn commit(&mut self) -> ferry_core::handover::CommitAnswer {
        use ferry_core::handover::CommitAnswer;
        let mut body = json!({
            "volumes": self.spec.volumes,
            "shares": self.spec.shares,
            "reverse_to": self.me,
            "mode": self.mode,
        });
        // Only when there is one: a previous release's target refuses
        // fields it does not know (a rolling upgrade moves cold).
        if let Some(t) = self.live.as_ref().and_then(|l| l.token()) {
            body["vm_token"] = json!(t);
        }
        match self.client.post(
            &format!("/api/v1/workloads/{}/takeover", self.workload),
            &body,
        ) {
            Ok(_) => CommitAnswer::Committed,
            Err(e) => CommitAnswer::Lost(format!("{e:#}")),
        }
    }

    /// The target keeps a record of the way back (`migrate rollback`).
    fn record_reverse(&mut self) {
        if let Err(e) = self.client.post(
            &format!("/api/v1/migrations/{}/reverse", self.workload),
            &json!({"target": self.me, "mode": self.mode}),
        ) {
            tracing::warn!(workload = self.workload, error = %format!("{e:#}"), "cutover.reverse_record_failed");
        }
    }

    fn start_target(&mut self) -> std::result::Result<(), String> {
        let r = self.client.post(
            &format!("/api/v1/workloads/{}/hooks/start", self.workload),
            &json!({"role": "target"}),
        );
        match r {
            Ok(v) => {
                let run: Option<HookRun> = serde_json::from_value(v["run"].clone()).ok();
                let failed = run.as_ref().is_some_and(|h| !h.ok);
                if !failed {
                    self.continued_unix_us = Some(crate::vm::live::now_unix_us());
                }
                self.hooks.extend(run);
                if failed {
                    Err(format!("the start hook failed at {}", self.target))
                } else {
                    Ok(())
                }
            }
            Err(e) => {
                tracing::error!(workload = self.workload, error = %format!("{e:#}"), "cutover.target_start_failed");
                Err(format!("{e:#}"))
            }
        }
    }

    fn check(&mut self) -> std::result::Result<(), String> {
        let r = self.client.post(
            &format!("/api/v1/workloads/{}/hooks/check", self.workload),
            &json!({"role": "target"}),
        );
        let run: Option<HookRun> = r
            .ok()
            .and_then(|v| serde_json::from_value(v["run"].clone()).ok());
        let ok = run.as_ref().is_some_and(|h| h.ok);
        self.last_check = run;
        if ok {
            Ok(())
        } else {
            Err(format!("the check hook did not pass at {}", self.target))
        }
    }

    fn reverse(&mut self) -> std::result::Result<(), String> {
        self.original = self.ctx.migrations().get(self.workload).cloned();
        let back = reverse_after_failed_start(self.ctx, self.workload, self.client, self.target)
            .map_err(|e| format!("{e:#}"));
        let r = back.as_ref().map(|_| ()).map_err(|e| e.clone());
        self.reverse_report = Some(back);
        r
    }

    fn start_source(&mut self) {
        let run = if self.live.is_some() {
            // The VM goes on by itself (resume_source_vm); the shell start
            // hook runs again only if its stop hook ran.
            if !self.shell_stopped {
                return;
            }
            crate::workload::workload_shell_hook(&self.ctx.hook_env(), self.spec, "start", "source")
        } else {
            workload_hook(&self.ctx.hook_env(), self.spec, "start", "source")
        };
        if let Some(h) = run {
            self.hooks.push(h);
        }
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
}

/// Waits until the target's way back is ready, then has it cut over back
/// here. Gives up at once if the target does not answer.
fn reverse_after_failed_start<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    client: &crate::transport::client::ApiClient,
    target: &str,
) -> Result<Value> {
    let deadline =
        Instant::now() + Duration::from_millis(ctx.cfg().migration.cutover_drain_timeout_ms);
    loop {
        let st = client
            .get(&format!("/api/v1/migrations/{workload}"))
            .with_context(|| format!("{target} does not answer"))?;
        if st["phase"] == "ready" {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the replication back from {target} was not ready in time (phase {})",
                st["phase"]
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    client.post(
        &format!("/api/v1/migrations/{workload}/cutover"),
        &json!({"reverse_on_failure": false}),
    )
}

/// On the target of a committed cutover: the migration back to `target`
/// (the old source), which replication towards it already carries.
pub fn record_reverse<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    target: &str,
    mode: &str,
) -> Result<()> {
    begin_record(ctx, workload, target, mode, false, true)
}

/// Records (durably) and registers a new migration of `workload` from this
/// node to `target`.
fn begin_record<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    target: &str,
    mode: &str,
    auto_converge: bool,
    reverse: bool,
) -> Result<()> {
    let mut rec = MigrationRecord {
        workload: Name::parse(workload)?,
        source: ctx.identity().node_name.clone(),
        target: target.to_string(),
        mode: mode.to_string(),
        started_unix: unix_now(),
        state: Migration::new(auto_converge, ConvergeConfig::default()),
        last_cutover: None,
        reverse,
        finalized: false,
        test: None,
        auto_cutover: false,
        auto_cutover_attempts: 0,
        auto_cutover_running: false,
        schedule: None,
        timeline: Vec::new(),
    };
    rec.save(&ctx.cfg().data_dir)?;
    ctx.migrations().insert(workload.to_string(), rec);
    Ok(())
}

/// Where the other end of a finished migration is, and a client for it.
fn other_end<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
) -> Result<(String, crate::transport::client::ApiClient)> {
    let peer_name = ctx
        .migrations()
        .get(workload)
        .map(|r| r.target.clone())
        .ok_or_else(|| no_migration(ctx, workload))?;
    let peer = ctx
        .peers()
        .get(&peer_name)
        .ok_or_else(|| anyhow!("node {peer_name:?} is not registered"))?;
    Ok((
        peer_name,
        crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?,
    ))
}

/// `ferry migrate rollback`: move the workload back with the same verified
/// cutover. On the node that serves it now (a reverse record) this is a
/// cutover; on the old source it asks the node serving it.
pub fn rollback<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let (reverse, phase, finalized) = {
        let migs = ctx.migrations();
        let r = migs
            .get(workload)
            .ok_or_else(|| no_migration(ctx, workload))?;
        (r.reverse, r.state.phase, r.finalized)
    };
    if finalized {
        bail!("the migration of {workload:?} was finalized: replication back was stopped, so there is nothing to roll back to");
    }
    if reverse {
        return cutover(ctx, workload);
    }
    if phase != MigrationPhase::Completed {
        bail!(
            "workload {workload:?} has not been cut over (phase {}); nothing to roll back",
            phase.as_str()
        );
    }
    let (peer, client) = other_end(ctx, workload)?;
    client
        .post(
            &format!("/api/v1/migrations/{workload}/rollback"),
            &json!({}),
        )
        .with_context(|| format!("{peer} could not roll {workload:?} back"))
}

/// `ferry migrate finalize`: stop replicating back to the old source; its
/// copy stays as it is (delete it there when no longer wanted).
pub fn finalize<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let (reverse, target) = {
        let migs = ctx.migrations();
        let r = migs
            .get(workload)
            .ok_or_else(|| no_migration(ctx, workload))?;
        (r.reverse, r.target.clone())
    };
    if !reverse {
        let (peer, client) = other_end(ctx, workload)?;
        let v = client
            .post(
                &format!("/api/v1/migrations/{workload}/finalize"),
                &json!({}),
            )
            .with_context(|| format!("{peer} could not finalize {workload:?}"))?;
        set_phase(ctx, workload, |r| r.finalized = true);
        return Ok(v);
    }
    let spec = load_workload(&ctx.cfg().data_dir, workload)?.ok_or_else(|| {
        ferry_api::ActionError::not_found(format!("no workload {workload:?} here"))
    })?;
    for v in &spec.volumes {
        ctx.stop_replication(v)?;
    }
    for s in &spec.shares {
        crate::share::stop_replicating(ctx, s)?;
    }
    set_phase(ctx, workload, |r| {
        r.finalized = true;
        r.state.cutover_done();
    });
    tracing::info!(workload, old_source = %target, "migration.finalized");
    Ok(
        json!({"workload": workload, "finalized": true, "old_source": target,
        "note": format!("replication to {target} stopped; its copy is kept")}),
    )
}

/// `ferry migrate cutover --all --one-by-one`: cuts over every ready
/// migration of this node, one after another, each only after the previous
/// one's target passed its check. Stops at the first that fails.
pub fn cutover_all<H: Host + ?Sized>(ctx: &Arc<H>) -> Result<Value> {
    let mut names: Vec<String> = ctx
        .migrations()
        .values()
        .filter(|m| !m.reverse && !m.state.phase.is_final())
        .map(|m| m.workload.to_string())
        .collect();
    names.sort();
    let mut reports = Vec::new();
    for w in names {
        sample(ctx, &w);
        let phase = ctx.migrations().get(&w).map(|m| m.state.phase);
        if phase != Some(MigrationPhase::Ready) {
            reports.push(json!({"workload": w, "skipped": format!("not ready ({})", phase.map_or("gone", |p| p.as_str()))}));
            continue;
        }
        match cutover(ctx, &w) {
            Ok(r) => {
                let healthy = r["target_healthy"] == true;
                reports.push(r);
                if !healthy {
                    bail!(
                        "stopped after {w}: its target's start/check hook failed; done so far: {}",
                        Value::Array(reports)
                    );
                }
            }
            Err(e) => bail!(
                "stopped at {w}: {e:#}; done so far: {}",
                Value::Array(reports)
            ),
        }
    }
    Ok(Value::Array(reports))
}

/// `ferry migrate set`: change the copy rate limit of every volume live.
pub fn set_rate<H: Host + ?Sized>(
    ctx: &Arc<H>,
    workload: &str,
    max_rate: Option<u64>,
) -> Result<Value> {
    let spec = load_workload(&ctx.cfg().data_dir, workload)?.ok_or_else(|| {
        ferry_api::ActionError::not_found(format!("no workload {workload:?} here"))
    })?;
    for v in &spec.volumes {
        let p = ctx.primary(v).ok_or_else(|| {
            anyhow!(
                "volume {v:?} is not a primary on node {}",
                ctx.identity().node_name
            )
        })?;
        p.link.lock().max_rate_bytes_per_s = max_rate.filter(|&r| r > 0);
    }
    status(ctx, workload)
}

/// How long the target waits for the flagged flush that takes its snapshots.
const TEST_BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// A test instance running on this node (the migration's target).
pub struct TestRun {
    pub overlays: Vec<(String, Arc<crate::volume::snapshot::Overlay>)>,
}

/// `ferry migrate test WORKLOAD`, on the source: a snapshot of every replica
/// of the workload at one flush barrier (the source's volumes are frozen only
/// while the barrier frames are queued), then a disposable instance on
/// writable overlays of it at the target, and its check. Production keeps
/// running and replicating throughout.
pub fn test_start<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let _one = ctx.cutover_lock().lock().unwrap_or_else(|p| p.into_inner());
    let spec = load_workload(&ctx.cfg().data_dir, workload)?.ok_or_else(|| {
        ferry_api::ActionError::not_found(format!("no workload {workload:?} here"))
    })?;
    if !spec.shares.is_empty() {
        // A test instance runs on snapshots of the replicas; a share's
        // replica is a directory tree with no snapshot to run a copy on.
        bail!(
            "workload {workload:?} has shares ({}): a test cutover runs on snapshots of volumes, and shares have none; cut over (and roll back if needed) instead",
            spec.shares.join(", ")
        );
    }
    let target = {
        let migs = ctx.migrations();
        let rec = migs
            .get(workload)
            .ok_or_else(|| no_migration(ctx, workload))?;
        if !matches!(
            rec.state.phase,
            MigrationPhase::Syncing | MigrationPhase::Ready
        ) {
            bail!(
                "a test cutover needs the migration syncing or ready; {workload} is {}",
                rec.state.phase.as_str()
            );
        }
        if rec.test.is_some() {
            bail!(
                "a test instance of {workload} already runs on {}: end it with `ferry migrate test {workload} --end`",
                rec.target
            );
        }
        rec.target.clone()
    };
    let vols = crate::handover::members::primaries(&**ctx, &spec)?;
    let peer = ctx
        .peers()
        .get(&target)
        .ok_or_else(|| anyhow!("node {target:?} is not registered"))?;
    let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?;
    let cleanup = |why: anyhow::Error| -> anyhow::Error {
        if let Err(e) = client.delete(&format!("/api/v1/workloads/{workload}/test")) {
            tracing::warn!(workload, error = %format!("{e:#}"), "migration.test.cleanup_failed");
        }
        why
    };
    // Only the barriers of this attempt take the snapshots.
    let token = crate::transport::identity::random_u64();
    for v in &vols {
        client
            .post(
                &format!("/api/v1/volumes/{}/snapshot", v.name),
                &json!({ "token": token }),
            )
            .map_err(|e| cleanup(e.context(format!("{target} cannot snapshot {}", v.name))))?;
    }
    // One cut for all volumes: no write runs while the barriers are queued.
    let frozen = Instant::now();
    for v in &vols {
        v.freeze();
    }
    let barriers: std::result::Result<(), String> =
        vols.iter().try_for_each(|v| v.snapshot_barrier(token));
    for v in &vols {
        v.unfreeze();
    }
    let frozen_us = frozen.elapsed().as_micros() as u64;
    for v in &vols {
        v.link.pump();
    }
    barriers.map_err(|e| cleanup(anyhow!("no snapshot barrier: {e}")))?;
    let report = client
        .post(&format!("/api/v1/workloads/{workload}/test"), &json!({}))
        .map_err(|e| cleanup(e.context(format!("the test instance on {target} did not start"))))?;
    let mut report = report;
    report["source_frozen_us"] = json!(frozen_us);
    report["target"] = json!(target);
    set_phase(ctx, workload, |r| r.test = Some(report.clone()));
    tracing::info!(workload, %target, frozen_us, check_ok = ?report["check_ok"], "migration.test.started");
    Ok(report)
}

/// `ferry migrate test WORKLOAD --end`, on the source: the target stops the
/// test instance and discards its overlays and snapshots.
pub fn test_end<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    // Not while a test (or a cutover) is starting.
    let _one = ctx.cutover_lock().lock().unwrap_or_else(|p| p.into_inner());
    let target = ctx
        .migrations()
        .get(workload)
        .ok_or_else(|| no_migration(ctx, workload))?
        .target
        .clone();
    let peer = ctx
        .peers()
        .get(&target)
        .ok_or_else(|| anyhow!("node {target:?} is not registered"))?;
    let client = crate::transport::client::ApiClient::to_peer(ctx.identity(), &peer)?;
    let v = client.delete(&format!("/api/v1/workloads/{workload}/test"))?;
    set_phase(ctx, workload, |r| r.test = None);
    tracing::info!(workload, %target, "migration.test.ended");
    Ok(v)
}

/// On the target: arms volume `volume`'s snapshot for the next flagged flush.
pub fn test_arm_here<H: Host + ?Sized>(ctx: &H, volume: &str, token: u64) -> Result<()> {
    let v = ctx.replica(volume).ok_or_else(|| {
        anyhow!(
            "volume {volume:?} is not a replica on node {}",
            ctx.identity().node_name
        )
    })?;
    let consistent = v
        .meta
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .state()
        .consistent;
    v.snapshot.arm(volume, consistent, token)?;
    Ok(())
}

/// On the target: waits for the workload's snapshots, exports a writable
/// overlay of each as `VOLUME@test`, starts the test instance (role `test`)
/// and runs its check.
pub fn test_start_here<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let spec = load_workload(&ctx.cfg().data_dir, workload)?.ok_or_else(|| {
        anyhow!(
            "no workload {workload:?} on node {}",
            ctx.identity().node_name
        )
    })?;
    if ctx.tests().contains_key(workload) {
        bail!("a test instance of {workload} already runs here");
    }
    let mut overlays = Vec::new();
    for name in &spec.volumes {
        let v = ctx
            .replica(name)
            .ok_or_else(|| anyhow!("volume {name:?} is not a replica here"))?;
        v.snapshot.wait_taken(name, TEST_BARRIER_TIMEOUT)?;
        let path = v.dir.join(crate::volume::snapshot::OVERLAY_FILE);
        let o = crate::volume::snapshot::Overlay::create(v.clone(), &path)
            .with_context(|| format!("cannot create the overlay {}", path.display()))?;
        overlays.push((name.to_string(), Arc::new(o)));
    }
    for (name, o) in &overlays {
        ctx.nbd().add_export(ferry_nbd::Export {
            name: test_export(name),
            description: format!("ferry test overlay of {name} (disposable)"),
            read_only: false,
            device: o.clone(),
        })?;
    }
    let started_unix = unix_now();
    ctx.tests()
        .insert(workload.to_string(), TestRun { overlays });
    let t0 = Instant::now();
    let start = workload_hook(&ctx.hook_env(), &spec, "start", "test");
    let started = start.as_ref().is_none_or(|h| h.ok);
    let check = if started {
        workload_hook(&ctx.hook_env(), &spec, "check", "test")
    } else {
        None
    };
    let check_ok = started && check.as_ref().is_none_or(|h| h.ok);
    let exports: Vec<String> = spec
        .volumes
        .iter()
        .map(|v| ctx.nbd_uri_base().uri(&test_export(v)))
        .collect();
    let hooks: Vec<HookRun> = [start, check].into_iter().flatten().collect();
    Ok(json!({
        "workload": workload,
        "node": ctx.identity().node_name,
        "exports": exports,
        "started": started,
        "check_ok": check_ok,
        "start_to_check_ms": t0.elapsed().as_millis() as u64,
        "hooks": hooks,
        "started_unix": started_unix,
    }))
}

/// On the target: stops the test instance and discards its overlays and the
/// snapshots under them. Nothing of the test reaches the replicas.
pub fn test_end_here<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let spec = load_workload(&ctx.cfg().data_dir, workload)?;
    // Also after an agent restart (which forgot the test): a test instance
    // its hooks started may still run.
    let stop = spec
        .as_ref()
        .and_then(|spec| workload_hook(&ctx.hook_env(), spec, "stop", "test"));
    let run = ctx.tests().remove(workload);
    let mut written = 0;
    let mut names: Vec<String> = spec.map(|s| self::names(&s.volumes)).unwrap_or_default();
    if let Some(run) = &run {
        for (name, o) in &run.overlays {
            written += o.written_bytes();
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    drop(run);
    let mut saved = 0;
    for name in &names {
        ctx.nbd().remove_export(&test_export(name));
        if let Some(v) = ctx.replica(name) {
            saved += v.snapshot.saved_bytes().unwrap_or(0);
            v.snapshot.end();
        }
    }
    Ok(json!({
        "workload": workload,
        "node": ctx.identity().node_name,
        "ended": true,
        "overlay_bytes_discarded": written,
        "snapshot_bytes_saved": saved,
        "hooks": stop.into_iter().collect::<Vec<_>>(),
    }))
}
