//! Workloads and their live migration between nodes.
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

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::link::{Mode, Phase, ReplicaState};
use ferry_core::migration::{ConvergeConfig, LinkSample, Migration, MigrationPhase};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agent::AgentCtx;
use ferry_core::Name;

/// Longest hook output kept (its tail).
const HOOK_OUTPUT_BYTES_MAX: usize = 16 * 1024;

/// A workload's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: Name,
    #[serde(default)]
    pub volumes: Vec<Name>,
    /// Shares the workload uses (replicated, moved and failed over with
    /// its volumes).
    #[serde(default)]
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
    /// A QEMU VM ferry runs on the node that serves the workload.
    #[serde(default)]
    pub vm: Option<crate::vm::VmSpec>,
    /// The address clients reach the workload at, `ADDR/PREFIX` (moved with
    /// it by the HA cluster).
    #[serde(default)]
    pub vip: Option<String>,
    /// The interface the virtual IP is added to.
    #[serde(default)]
    pub vip_interface: Option<String>,
}

impl WorkloadSpec {
    /// Refuses a definition that cannot work, saying why.
    pub fn validate(&self) -> Result<()> {
        if self.volumes.is_empty() && self.shares.is_empty() {
            bail!(
                "workload {:?} needs at least one volume or share (--volume NAME, --share NAME)",
                self.name
            );
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if self.volumes[..i].contains(v) {
                bail!("workload {:?} names volume {v:?} twice", self.name);
            }
        }
        for (i, s) in self.shares.iter().enumerate() {
            if self.shares[..i].contains(s) {
                bail!("workload {:?} names share {s:?} twice", self.name);
            }
        }
        if let Some(vip) = &self.vip {
            let (addr, prefix) = vip.split_once('/').ok_or_else(|| {
                anyhow!("virtual IP {vip:?} must be ADDR/PREFIX, e.g. 198.18.0.10/24")
            })?;
            let addr: std::net::IpAddr = addr
                .parse()
                .map_err(|_| anyhow!("virtual IP {vip:?}: {addr:?} is not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            match prefix.parse::<u8>() {
                Ok(p) if p <= max => {}
                _ => bail!("virtual IP {vip:?}: the prefix must be 0 to {max}"),
            }
            match &self.vip_interface {
                None => bail!("virtual IP {vip:?} needs --vip-interface IFACE (where to add it)"),
                Some(i)
                    if i.is_empty()
                        || i.len() > 15
                        || !i
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b)) =>
                {
                    bail!("--vip-interface {i:?} is not an interface name")
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Names as plain strings, for code that keys maps or JSON by them.
pub fn names(n: &[Name]) -> Vec<String> {
    n.iter().map(|n| n.to_string()).collect()
}

fn default_hook_timeout_ms() -> u64 {
    30_000
}

fn workloads_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("workloads")
}

fn migrations_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("migrations")
}

/// Saves a workload definition (atomically).
pub fn save_workload(data_dir: &Path, spec: &WorkloadSpec) -> Result<()> {
    if spec.volumes.is_empty() && spec.shares.is_empty() {
        bail!("a workload needs at least one volume or share (--volume NAME, --share NAME)");
    }
    let dir = workloads_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    Ok(crate::store::save(
        &dir.join(format!("{}.json", spec.name)),
        spec,
    )?)
}

impl crate::store::Record for WorkloadSpec {
    const KIND: &'static str = "workload";
}

impl crate::store::Record for MigrationRecord {
    const KIND: &'static str = "migration";
}

pub fn load_workload(data_dir: &Path, name: &str) -> Result<Option<WorkloadSpec>> {
    crate::volume::validate_name(name)
        .map_err(|_| anyhow!("{name:?} is not a valid workload name"))?;
    let path = workloads_dir(data_dir).join(format!("{name}.json"));
    Ok(crate::store::load(&path)?)
}

pub fn list_workloads(data_dir: &Path) -> Result<Vec<WorkloadSpec>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(workloads_dir(data_dir)) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if let Some(name) = n.strip_suffix(".json") {
            // One damaged definition must not hide the others.
            match load_workload(data_dir, name) {
                Ok(Some(w)) => out.push(w),
                Ok(None) => {}
                Err(e) => tracing::error!(workload = name, error = %format!("{e:#}"),
                    "workload.damaged: left out; repair or delete its file"),
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn delete_workload(data_dir: &Path, name: &str) -> Result<bool> {
    crate::volume::validate_name(name)
        .map_err(|_| anyhow!("{name:?} is not a valid workload name"))?;
    match std::fs::remove_file(workloads_dir(data_dir).join(format!("{name}.json"))) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What a hook did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookRun {
    pub hook: String,
    pub ok: bool,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub elapsed_ms: u64,
    /// The tail of its stdout and stderr.
    pub output: String,
}

/// Runs `cmd` with `sh -c` in its own process group, killed (the whole
/// group) after `timeout`.
pub fn run_hook(hook: &str, cmd: &str, timeout: Duration, env: &[(&str, &str)]) -> HookRun {
    use std::os::unix::process::CommandExt;
    let started = Instant::now();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    let failed = |why: String| HookRun {
        hook: hook.to_string(),
        ok: false,
        exit_code: None,
        timed_out: false,
        elapsed_ms: started.elapsed().as_millis() as u64,
        output: why,
    };
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => return failed(format!("cannot run sh: {e}")),
    };
    // Collect output on threads, so a chatty hook never blocks on a full pipe.
    let collect = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 2 * HOOK_OUTPUT_BYTES_MAX {
                        buf.drain(..buf.len() - HOOK_OUTPUT_BYTES_MAX);
                    }
                }
            }
            buf
        })
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = started + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                // SAFETY: kill(2) with a negative pid signals the hook's own
                // process group (made by process_group(0) above); no memory is
                // touched.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    let mut output = out.join().unwrap_or_default();
    output.extend(err.join().unwrap_or_default());
    if output.len() > HOOK_OUTPUT_BYTES_MAX {
        output.drain(..output.len() - HOOK_OUTPUT_BYTES_MAX);
    }
    let exit_code = status.and_then(|s| s.code());
    HookRun {
        hook: hook.to_string(),
        ok: !timed_out && exit_code == Some(0),
        exit_code,
        timed_out,
        elapsed_ms: started.elapsed().as_millis() as u64,
        output: String::from_utf8_lossy(&output).into_owned(),
    }
}

/// Runs one of a workload's actions on this node: `start` runs the start
/// hook, then starts the VM; `stop` stops the VM, then runs the stop hook;
/// `check` runs the check hook. `None` when there is nothing to run.
pub fn workload_hook(
    ctx: &AgentCtx,
    spec: &WorkloadSpec,
    which: &str,
    role: &str,
) -> Option<HookRun> {
    let cmd = match which {
        "start" => spec.start.as_deref(),
        "stop" => spec.stop.as_deref(),
        "check" => spec.check.as_deref(),
        _ => None,
    };
    let timeout = Duration::from_millis(spec.hook_timeout_ms);
    // A test instance runs on the test overlays, under its own VM name.
    let (instance, exports): (String, Vec<String>) = if role == "test" {
        (
            test_export(&spec.name),
            spec.volumes.iter().map(|v| test_export(v)).collect(),
        )
    } else {
        (spec.name.to_string(), names(&spec.volumes))
    };
    let uris: Vec<String> = exports.iter().map(|e| ctx.nbd_uri_base.uri(e)).collect();
    let uris = uris.join(" ");
    // Where the workload's shares are used on this node (their records'
    // paths: a sync share's mount point).
    let store = crate::share::ShareStore::new(&ctx.cfg.data_dir);
    let share_paths: Vec<String> = spec
        .shares
        .iter()
        .filter_map(|s| store.load(s).ok())
        .map(|r| r.path.to_string_lossy().into_owned())
        .collect();
    let share_paths = share_paths.join(" ");
    let vm = |what: &str| -> Option<HookRun> {
        let vm = spec.vm.as_ref()?;
        let started = Instant::now();
        let r = match what {
            "start" => ctx
                .vms
                .start(
                    &ctx.cfg.data_dir,
                    &ctx.nbd_uri_base,
                    &instance,
                    &exports,
                    vm,
                )
                .map(|()| "VM started".to_string()),
            _ => ctx
                .vms
                .stop(&instance, timeout)
                .map(|ran| if ran { "VM stopped" } else { "no VM ran here" }.to_string()),
        };
        Some(HookRun {
            hook: format!("vm-{what}"),
            ok: r.is_ok(),
            exit_code: None,
            timed_out: false,
            elapsed_ms: started.elapsed().as_millis() as u64,
            output: r.unwrap_or_else(|e| format!("{e:#}")),
        })
    };
    let hook = |cmd: Option<&str>| -> Option<HookRun> {
        let run = run_hook(
            which,
            cmd?,
            timeout,
            &[
                ("FERRY_WORKLOAD", &spec.name),
                ("FERRY_NODE", &ctx.identity.node_name),
                ("FERRY_ROLE", role),
                ("FERRY_VOLUME_URIS", &uris),
                ("FERRY_SHARE_PATHS", &share_paths),
            ],
        );
        tracing::info!(workload = %spec.name, hook = which, ok = run.ok, exit_code = ?run.exit_code,
            timed_out = run.timed_out, elapsed_ms = run.elapsed_ms, "workload.hook");
        Some(run)
    };
    let (first, second) = match which {
        "start" => {
            let h = hook(cmd);
            if h.as_ref().is_some_and(|h| !h.ok) {
                return h;
            }
            (h, vm("start"))
        }
        "stop" => {
            let v = vm("stop");
            (v, hook(cmd))
        }
        _ => (hook(cmd), None),
    };
    match (first, second) {
        (Some(a), Some(b)) => Some(HookRun {
            hook: format!("{}+{}", a.hook, b.hook),
            ok: a.ok && b.ok,
            exit_code: b.exit_code.or(a.exit_code),
            timed_out: a.timed_out || b.timed_out,
            elapsed_ms: a.elapsed_ms + b.elapsed_ms,
            output: format!("{}\n{}", a.output, b.output),
        }),
        (a, b) => a.or(b),
    }
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
}

/// Automatic cutovers tried per migration before it waits for an operator.
pub const AUTO_CUTOVER_ATTEMPTS_MAX: u32 = 3;

impl MigrationRecord {
    pub fn save(&self, data_dir: &Path) -> Result<()> {
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
pub fn load_migrations(ctx: &AgentCtx) -> Result<HashMap<String, MigrationRecord>> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(migrations_dir(&ctx.cfg.data_dir)) else {
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
                .damaged
                .report("migration", &name, &e.path(), format!("{err:#}")),
        }
    }
    Ok(out)
}

fn load_migration(ctx: &AgentCtx, path: &Path) -> Result<MigrationRecord> {
    {
        let mut rec: MigrationRecord =
            crate::store::load(path)?.ok_or_else(|| anyhow!("{} is gone", path.display()))?;
        if rec.state.phase == MigrationPhase::CuttingOver {
            let spec = load_workload(&ctx.cfg.data_dir, &rec.workload)?;
            let still_here = spec
                .map(|s| {
                    let store = crate::share::ShareStore::new(&ctx.cfg.data_dir);
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
            rec.save(&ctx.cfg.data_dir)?;
        }
        if let Some(s) = rec.schedule.as_mut() {
            // A scheduled cutover that was running: its end is the phase above.
            if s.state == ferry_core::schedule::ScheduleState::CuttingOver {
                s.restarted();
                if rec.state.phase.is_final() {
                    s.cutover_ended(
                        crate::schedule::now_unix(),
                        Ok("completed before the agent restarted".into()),
                    );
                }
                rec.save(&ctx.cfg.data_dir)?;
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
    pub window: Option<crate::schedule::ScheduleRequest>,
}

/// `ferry migrate start`: replicate every volume of `workload` to `to`.
pub fn start(ctx: &Arc<AgentCtx>, workload: &str, to: &str, o: StartOptions) -> Result<Value> {
    let StartOptions {
        mode,
        max_rate,
        auto_converge,
        auto_cutover,
        window,
    } = o;
    // Checked before anything starts: a bad window or deadline starts nothing.
    let schedule = match &window {
        Some(req) if auto_cutover => Some(crate::schedule::build(ctx, req, true)?),
        Some(_) => bail!("--window and --deadline go with --auto-cutover"),
        None => None,
    };
    let spec = load_workload(&ctx.cfg.data_dir, workload)?.ok_or_else(|| {
        anyhow!(
            "no workload {workload:?} on node {}: create it with `ferry workload create`",
            ctx.identity.node_name
        )
    })?;
    // Shares: each a primary here, replicating to `to` or to no node yet
    // (a share has one peer). Checked before anything starts.
    let shares = share_primaries(ctx, &spec)?;
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
        if active >= ctx.cfg.migration.migrations_max {
            bail!(
                "{active} migrations are running (migrations_max {}); wait for one to finish",
                ctx.cfg.migration.migrations_max
            );
        }
    }
    let peer = ctx.peers.get(to).ok_or_else(|| {
        anyhow!("node {to:?} is not registered: run `ferry node add {to} --api HOST:PORT` first")
    })?;
    let client = crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?;
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
                        ctx.identity.node_name
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
        ctx.start_replication(v, to, mode, max_rate, false)?;
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
pub fn sample(ctx: &Arc<AgentCtx>, workload: &str) {
    let Some(spec) = load_workload(&ctx.cfg.data_dir, workload).ok().flatten() else {
        return;
    };
    let now_ms = ctx.started.elapsed().as_millis() as u64;
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
        drop(l);
        s.bytes_written_total += p.bytes_written();
        throttle_targets.push(p);
    }
    let ready_lag = std::time::Duration::from_millis(ctx.cfg.migration.async_share_ready_lag_ms);
    // A share counts like a volume: its link up, its copy up to date with
    // nothing waiting to be sent; what it sends that is not resync is what
    // the workload wrote.
    for name in &spec.shares {
        let Some(sh) = ctx.shares.primary(name) else {
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
        if let Err(e) = rec.save(&ctx.cfg.data_dir) {
            tracing::error!(workload, error = %e, "migration.record.save_failed");
        }
    }
    // With a window, the scheduler cuts over (crate::schedule).
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
    if let Err(e) = rec.save(&ctx.cfg.data_dir) {
        tracing::error!(workload, error = %e, "migration.record.save_failed");
    }
    drop(migs);
    let (c, name) = (ctx.clone(), workload.to_string());
    let spawned = std::thread::Builder::new()
        .name(format!("auto-cutover-{workload}"))
        .spawn(move || {
            tracing::info!(workload = %name, attempt, "migration.auto_cutover.begin");
            match cutover(&c, &name) {
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

/// The workload's volumes, each a primary on this node.
fn primaries(
    ctx: &AgentCtx,
    spec: &WorkloadSpec,
) -> Result<Vec<Arc<crate::volume::primary::PrimaryVolume>>> {
    spec.volumes
        .iter()
        .map(|v| {
            ctx.primary(v)
                .ok_or_else(|| anyhow!("volume {v:?} is not a primary here"))
        })
        .collect()
}

/// The handover members of `spec` (its volumes, then its shares; each a
/// primary here) towards `target`, which `client` reaches. `demote`: the
/// handover demotes them to the target's replicas (a cutover; a
/// switchover's demotion is the cluster manager's).
pub(crate) fn handover_members(
    ctx: &Arc<AgentCtx>,
    spec: &WorkloadSpec,
    client: &crate::api::client::ApiClient,
    target: &str,
    occasion: &'static str,
    demote: bool,
) -> Result<Vec<Box<dyn crate::handover::Member>>> {
    use crate::handover::members::{Demote, ShareMember, VolumeMember};
    let mut members: Vec<Box<dyn crate::handover::Member>> = Vec::new();
    for v in primaries(ctx, spec)? {
        let d: Option<Demote> = demote.then(|| {
            let (c, n, t) = (ctx.clone(), v.name.clone(), target.to_string());
            Box::new(move || c.demote_volume(&n, &t)) as Demote
        });
        members.push(Box::new(VolumeMember::new(
            v,
            client.clone(),
            target,
            ctx.cfg.replication.granularity_bytes,
            d,
        )));
    }
    for s in share_primaries(ctx, spec)? {
        // The trees compared equal with the share frozen: nothing here is
        // suspect, so the way back compares metadata only.
        let d: Option<Demote> = demote.then(|| {
            let (c, n, t) = (ctx.clone(), s.name.clone(), target.to_string());
            Box::new(move || crate::share::demote(&c, &n, &t, true)) as Demote
        });
        let cache = crate::share::digest_cache(ctx, &s.name)?;
        members.push(Box::new(ShareMember::new(
            s,
            client.clone(),
            target,
            cache,
            ctx.cfg.shares.watch_batch_delay_ms,
            occasion,
            d,
        )));
    }
    Ok(members)
}

/// The workload's shares, each a primary on this node.
fn share_primaries(
    ctx: &AgentCtx,
    spec: &WorkloadSpec,
) -> Result<Vec<Arc<crate::share::primary::PrimaryShare>>> {
    spec.shares
        .iter()
        .map(|s| crate::share::primary_here(ctx, s))
        .collect()
}

fn no_migration(ctx: &AgentCtx, workload: &str) -> anyhow::Error {
    ferry_api::ActionError::not_found(format!(
        "no migration of workload {workload:?} on node {}",
        ctx.identity.node_name
    ))
    .into()
}

/// The status document of one migration.
pub fn status(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
    let migs = ctx.migrations();
    let rec = migs
        .get(workload)
        .ok_or_else(|| no_migration(ctx, workload))?;
    let m = &rec.state;
    // Live from the links and leaf caches of the workload's volumes here.
    let spec = load_workload(&ctx.cfg.data_dir, workload).ok().flatten();
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
        .map(|p| p.leaves.stale_blocks() * ctx.cfg.replication.granularity_bytes)
        .sum();
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
        "lag_seconds": lag_seconds.map(|s| (s * 100.0).round() / 100.0),
        "not_converging": m.not_converging,
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
        "scheduled_at": rec.schedule.as_ref().and_then(crate::schedule::scheduled_at),
        "schedule": rec.schedule.as_ref().map(crate::schedule::to_json),
    }))
}

pub fn statuses(ctx: &Arc<AgentCtx>) -> Result<Value> {
    let mut names: Vec<String> = ctx.migrations().keys().cloned().collect();
    names.sort();
    Ok(Value::Array(
        names
            .iter()
            .map(|n| status(ctx, n))
            .collect::<Result<Vec<_>>>()?,
    ))
}

fn set_phase(ctx: &AgentCtx, workload: &str, f: impl FnOnce(&mut MigrationRecord)) {
    let mut migs = ctx.migrations();
    if let Some(rec) = migs.get_mut(workload) {
        f(rec);
        if let Err(e) = rec.save(&ctx.cfg.data_dir) {
            tracing::error!(workload, error = %e, "migration.record.save_failed");
        }
    }
}

/// `ferry migrate cutover`: see the module documentation. Blocks until it
/// ends; returns the report (downtime, outage, each step's time).
pub fn cutover(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
    cutover_with(ctx, workload, true)
}

/// A cutover; with `reverse_on_failure`, a target whose start/check hook
/// fails hands the workload back (a reverse cutover never does, so two nodes
/// that both fail to start it do not hand it back and forth). The steps,
/// aborts and the lost-commit rule are the handover machine's
/// ([`ferry_core::handover`]), run by [`crate::handover::run`]; this is the
/// cutover's side of it ([`CutoverSide`]) and its report.
pub fn cutover_with(
    ctx: &Arc<AgentCtx>,
    workload: &str,
    reverse_on_failure: bool,
) -> Result<Value> {
    use ferry_core::handover::{Kind, Outcome, Plan};
    let _one = ctx.cutover_lock.lock().unwrap_or_else(|p| p.into_inner());
    let spec = load_workload(&ctx.cfg.data_dir, workload)?.ok_or_else(|| {
        ferry_api::ActionError::not_found(format!("no workload {workload:?} here"))
    })?;
    sample(ctx, workload);
    let (target, mode) = {
        let mut migs = ctx.migrations();
        let rec = migs.get_mut(workload).ok_or_else(|| {
            ferry_api::ActionError::not_found(format!(
                "workload {workload:?} is not migrating from node {}",
                ctx.identity.node_name
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
        rec.save(&ctx.cfg.data_dir)?;
        (
            rec.target.clone(),
            if rec.mode == "async" {
                Mode::Async
            } else {
                Mode::Sync
            },
        )
    };
    tracing::info!(workload, %target, "cutover.begin");
    let me = ctx.identity.node_name.clone();
    // Nothing was frozen or stopped yet: a cutover that cannot begin is
    // aborted.
    let begun = (|| {
        let peer = ctx
            .peers
            .get(&target)
            .ok_or_else(|| anyhow!("node {target:?} is not registered"))?;
        let client = crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?;
        let members = handover_members(ctx, &spec, &client, &target, "cutover", true)?;
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
        drain_timeout_ms: ctx.cfg.migration.cutover_drain_timeout_ms,
        check: spec.check.is_some(),
        check_timeout_ms: spec.hook_timeout_ms,
        check_retry_ms: CHECK_RETRY_MS,
    };
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
    };
    let ran = crate::handover::run(plan, &members, &mut side, workload)
        .map_err(|e| anyhow!("cutover of {workload}: {e}"))?;
    drop(members);
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
            let report = cutover_report(workload, &me, &target, &ran.timeline, &hooks, check_ok);
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
                    rec.save(&ctx.cfg.data_dir)?;
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
) -> Value {
    let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    json!({
        "workload": workload,
        "from": from,
        "to": to,
        "downtime_ms": ms(t.downtime_us().unwrap_or(0)),
        "outage_ms": t.outage_us().map(ms),
        "steps_us": t.steps.iter().map(|(n, at)| json!({"step": n.as_str(), "at_us": at})).collect::<Vec<_>>(),
        "hooks": hooks,
        "target_healthy": healthy,
    })
}

/// What a cutover does that is not a member's: the hooks, the commit (one
/// durable takeover record on the target), the way back, the reverse.
struct CutoverSide<'a> {
    ctx: &'a Arc<AgentCtx>,
    spec: &'a WorkloadSpec,
    client: &'a crate::api::client::ApiClient,
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
}

impl crate::handover::Side for CutoverSide<'_> {
    /// The application-visible outage starts here.
    fn run_stop_hook(&mut self) -> std::result::Result<(), String> {
        let Some(h) = workload_hook(self.ctx, self.spec, "stop", "source") else {
            return Ok(());
        };
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
        match self.client.post(
            &format!("/api/v1/workloads/{}/takeover", self.workload),
            &json!({
                "volumes": self.spec.volumes,
                "shares": self.spec.shares,
                "reverse_to": self.me,
                "mode": self.mode,
            }),
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
        if let Some(h) = workload_hook(self.ctx, self.spec, "start", "source") {
            self.hooks.push(h);
        }
    }
}

/// Waits until the target's way back is ready, then has it cut over back
/// here. Gives up at once if the target does not answer.
fn reverse_after_failed_start(
    ctx: &Arc<AgentCtx>,
    workload: &str,
    client: &crate::api::client::ApiClient,
    target: &str,
) -> Result<Value> {
    let deadline =
        Instant::now() + Duration::from_millis(ctx.cfg.migration.cutover_drain_timeout_ms);
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
pub fn record_reverse(ctx: &Arc<AgentCtx>, workload: &str, target: &str, mode: &str) -> Result<()> {
    begin_record(ctx, workload, target, mode, false, true)
}

/// Records (durably) and registers a new migration of `workload` from this
/// node to `target`.
fn begin_record(
    ctx: &Arc<AgentCtx>,
    workload: &str,
    target: &str,
    mode: &str,
    auto_converge: bool,
    reverse: bool,
) -> Result<()> {
    let rec = MigrationRecord {
        workload: Name::parse(workload)?,
        source: ctx.identity.node_name.clone(),
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
    };
    rec.save(&ctx.cfg.data_dir)?;
    ctx.migrations().insert(workload.to_string(), rec);
    Ok(())
}

/// Where the other end of a finished migration is, and a client for it.
fn other_end(
    ctx: &Arc<AgentCtx>,
    workload: &str,
) -> Result<(String, crate::api::client::ApiClient)> {
    let peer_name = ctx
        .migrations()
        .get(workload)
        .map(|r| r.target.clone())
        .ok_or_else(|| no_migration(ctx, workload))?;
    let peer = ctx
        .peers
        .get(&peer_name)
        .ok_or_else(|| anyhow!("node {peer_name:?} is not registered"))?;
    Ok((
        peer_name,
        crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?,
    ))
}

/// `ferry migrate rollback`: move the workload back with the same verified
/// cutover. On the node that serves it now (a reverse record) this is a
/// cutover; on the old source it asks the node serving it.
pub fn rollback(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
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
pub fn finalize(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
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
    let spec = load_workload(&ctx.cfg.data_dir, workload)?.ok_or_else(|| {
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
pub fn cutover_all(ctx: &Arc<AgentCtx>) -> Result<Value> {
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
pub fn set_rate(ctx: &Arc<AgentCtx>, workload: &str, max_rate: Option<u64>) -> Result<Value> {
    let spec = load_workload(&ctx.cfg.data_dir, workload)?.ok_or_else(|| {
        ferry_api::ActionError::not_found(format!("no workload {workload:?} here"))
    })?;
    for v in &spec.volumes {
        let p = ctx.primary(v).ok_or_else(|| {
            anyhow!(
                "volume {v:?} is not a primary on node {}",
                ctx.identity.node_name
            )
        })?;
        p.link.lock().max_rate_bytes_per_s = max_rate.filter(|&r| r > 0);
    }
    status(ctx, workload)
}

/// How long the target waits for the flagged flush that takes its snapshots.
const TEST_BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// The export name of a volume's test overlay.
pub fn test_export(volume: &str) -> String {
    format!("{volume}@test")
}

/// A test instance running on this node (the migration's target).
pub struct TestRun {
    pub overlays: Vec<(String, Arc<crate::volume::snapshot::Overlay>)>,
}

/// `ferry migrate test WORKLOAD`, on the source: a snapshot of every replica
/// of the workload at one flush barrier (the source's volumes are frozen only
/// while the barrier frames are queued), then a disposable instance on
/// writable overlays of it at the target, and its check. Production keeps
/// running and replicating throughout.
pub fn test_start(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
    let _one = ctx.cutover_lock.lock().unwrap_or_else(|p| p.into_inner());
    let spec = load_workload(&ctx.cfg.data_dir, workload)?.ok_or_else(|| {
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
    let vols = primaries(ctx, &spec)?;
    let peer = ctx
        .peers
        .get(&target)
        .ok_or_else(|| anyhow!("node {target:?} is not registered"))?;
    let client = crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?;
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
pub fn test_end(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
    // Not while a test (or a cutover) is starting.
    let _one = ctx.cutover_lock.lock().unwrap_or_else(|p| p.into_inner());
    let target = ctx
        .migrations()
        .get(workload)
        .ok_or_else(|| no_migration(ctx, workload))?
        .target
        .clone();
    let peer = ctx
        .peers
        .get(&target)
        .ok_or_else(|| anyhow!("node {target:?} is not registered"))?;
    let client = crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?;
    let v = client.delete(&format!("/api/v1/workloads/{workload}/test"))?;
    set_phase(ctx, workload, |r| r.test = None);
    tracing::info!(workload, %target, "migration.test.ended");
    Ok(v)
}

/// On the target: arms volume `volume`'s snapshot for the next flagged flush.
pub fn test_arm_here(ctx: &AgentCtx, volume: &str, token: u64) -> Result<()> {
    let v = ctx.replica(volume).ok_or_else(|| {
        anyhow!(
            "volume {volume:?} is not a replica on node {}",
            ctx.identity.node_name
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
pub fn test_start_here(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
    let spec = load_workload(&ctx.cfg.data_dir, workload)?.ok_or_else(|| {
        anyhow!(
            "no workload {workload:?} on node {}",
            ctx.identity.node_name
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
        ctx.nbd.add_export(ferry_nbd::Export {
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
    let start = workload_hook(ctx, &spec, "start", "test");
    let started = start.as_ref().is_none_or(|h| h.ok);
    let check = if started {
        workload_hook(ctx, &spec, "check", "test")
    } else {
        None
    };
    let check_ok = started && check.as_ref().is_none_or(|h| h.ok);
    let exports: Vec<String> = spec
        .volumes
        .iter()
        .map(|v| ctx.nbd_uri_base.uri(&test_export(v)))
        .collect();
    let hooks: Vec<HookRun> = [start, check].into_iter().flatten().collect();
    Ok(json!({
        "workload": workload,
        "node": ctx.identity.node_name,
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
pub fn test_end_here(ctx: &Arc<AgentCtx>, workload: &str) -> Result<Value> {
    let spec = load_workload(&ctx.cfg.data_dir, workload)?;
    // Also after an agent restart (which forgot the test): a test instance
    // its hooks started may still run.
    let stop = spec
        .as_ref()
        .and_then(|spec| workload_hook(ctx, spec, "stop", "test"));
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
        ctx.nbd.remove_export(&test_export(name));
        if let Some(v) = ctx.replica(name) {
            saved += v.snapshot.saved_bytes().unwrap_or(0);
            v.snapshot.end();
        }
    }
    Ok(json!({
        "workload": workload,
        "node": ctx.identity.node_name,
        "ended": true,
        "overlay_bytes_discarded": written,
        "snapshot_bytes_saved": saved,
        "hooks": stop.into_iter().collect::<Vec<_>>(),
    }))
}
