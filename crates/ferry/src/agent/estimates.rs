//! The migration estimator's runtime (`ferry estimate`): observations of a
//! volume's, workload's, share's or block device's writes, run by one
//! thread (`ferry-estimate`), kept across restarts.
//!
//! - An estimate's record (`DATA_DIR/estimates/NAME.json`: what it
//!   observes, since when, for how long, whether it was stopped) is written
//!   when it starts and when its state changes; its observation
//!   (`NAME.state`: ferry-core's [`Observation`], sketches and totals) every
//!   `estimate.save_interval_ms` and when it ends. At start the agent loads
//!   both and resumes: the time it was down is counted as unobserved, never
//!   as idle.
//! - Sources: a volume's (or each of a workload's volumes') [`WriteTap`] on
//!   the primary's write path; a share's tap on its op stream (files as
//!   keys); a block device's `block:block_rq_issue` tracepoint (the written
//!   sectors, exactly) or, where tracefs cannot be used, `/proc/diskstats`
//!   (bytes and IOs only: W(T) is then an **upper bound**, each write
//!   counted as new blocks).
//! - Every `estimate.tick_interval_ms` the thread drains the taps into the
//!   observations (at the tick's time), closes the seconds that passed, and
//!   gives each closed 10 s interval to the history store
//!   (`estimate/NAME/{write_bytes_per_s,write_iops,read_iops,unique_bytes}`).
//!
//! [`WriteTap`]: crate::estimate::tap::WriteTap

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ferry_api::reply::{EstimateSource, EstimateStatus, ProbeLoad, WorkingSetPoint};
use ferry_api::request::StartEstimate;
use ferry_api::ActionError;
use ferry_core::blockobs::{DevId, DiskstatsObservation};
use ferry_core::estimate::{self as est, KeyKind, Observation};
use ferry_core::history::{Metric, Scope, SeriesName};
use ferry_core::Name;
use serde::{Deserialize, Serialize};

use crate::agent::AgentCtx;
use crate::estimate::device::{DiskstatsReader, TraceConfig, TraceSession, Tracefs};
use crate::estimate::tap::{TapEvent, WriteTap};
use crate::estimate::EstimateSettings;
use crate::sys::unix_ms;

/// What an estimate is (`DATA_DIR/estimates/NAME.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EstimateRecord {
    pub name: String,
    /// `volume`, `workload`, `share` or `device`.
    pub kind: String,
    pub source: String,
    /// The volumes observed (a workload's), or `[source]`.
    pub members: Vec<String>,
    pub started_unix_ms: u64,
    pub duration_s: u64,
    /// `observing`, `stopped` or `done`.
    pub state: String,
    pub ended_unix_ms: Option<u64>,
    /// The replication granularity when it started (blocks), 0 for files.
    pub block_bytes: u64,
}

impl crate::store::Record for EstimateRecord {
    const KIND: &'static str = "estimate";
}

/// An observation as saved (`DATA_DIR/estimates/NAME.state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedObservation {
    observation: Observation,
    events_dropped: u64,
    allocated_bytes: u64,
    size_bytes: u64,
    method: String,
    /// diskstats: the next made-up key (each write counted as new blocks).
    next_key: u64,
}

impl crate::store::Record for SavedObservation {
    const KIND: &'static str = "estimate-observation";
}

/// A block device observed.
struct DeviceObs {
    diskstats: DiskstatsReader,
    /// The tracepoint's writes land here (`None`: diskstats only).
    trace: Option<(TraceSession, Arc<WriteTap>)>,
    last_diskstats: Option<Instant>,
}

/// One estimate in memory.
struct Running {
    rec: EstimateRecord,
    obs: Observation,
    /// `waiting` or `failed`, with why (while observing).
    trouble: Option<(&'static str, String)>,
    method: String,
    allocated_bytes: u64,
    size_bytes: u64,
    events_dropped: u64,
    next_key: u64,
    /// The volumes (or share) whose taps this estimate holds.
    taps: Vec<Weak<dyn Tapped>>,
    device: Option<DeviceObs>,
    buf: Vec<TapEvent>,
    last_save: Instant,
    last_alloc: Option<Instant>,
    /// The last 10 s interval given to the history store.
    last_sampled_s: u64,
}

/// A thing with a tap: a primary volume or share.
trait Tapped: Send + Sync {
    fn tap(&self) -> &WriteTap;
}

impl Tapped for crate::volume::primary::PrimaryVolume {
    fn tap(&self) -> &WriteTap {
        &self.tap
    }
}

impl Tapped for crate::share::primary::PrimaryShare {
    fn tap(&self) -> &WriteTap {
        &self.tap
    }
}

/// The estimates of this node.
pub struct Estimates {
    dir: PathBuf,
    settings: EstimateSettings,
    map: Mutex<BTreeMap<String, Arc<Mutex<Running>>>>,
}

impl std::fmt::Debug for Estimates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Estimates").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Estimates {
    /// The estimates saved under `data_dir` (loaded, not yet resumed: the
    /// thread does that on its first tick).
    pub fn load(data_dir: &Path, settings: EstimateSettings) -> Estimates {
        let dir = data_dir.join("estimates");
        let e = Estimates {
            dir: dir.clone(),
            settings,
            map: Mutex::new(BTreeMap::new()),
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return e;
        };
        let now = unix_ms();
        for f in rd.flatten() {
            let p = f.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let rec: EstimateRecord = match crate::store::load(&p) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(err) => {
                    tracing::warn!(path = %p.display(), error = %err, "estimate.record_unreadable");
                    continue;
                }
            };
            if Name::parse(&rec.name).is_err() {
                continue;
            }
            let saved: Option<SavedObservation> = match crate::store::load(
                &dir.join(format!("{}.state", rec.name)),
            ) {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(estimate = %rec.name, error = %err, "estimate.observation_unreadable: starting it again");
                    None
                }
            };
            let mut r = new_running(rec, saved, now);
            if r.rec.state == "observing" {
                r.obs.resume(now);
            }
            lock(&e.map).insert(r.rec.name.clone(), Arc::new(Mutex::new(r)));
        }
        e
    }

    fn get(&self, name: &str) -> Result<Arc<Mutex<Running>>, ActionError> {
        lock(&self.map).get(name).cloned().ok_or_else(|| {
            ActionError::not_found(format!(
                "no estimate {name} on this node (ferry estimate list)"
            ))
        })
    }

    /// The write rates of the estimates observing now (a probe's load).
    pub fn current_load(&self) -> Vec<ProbeLoad> {
        let all: Vec<_> = lock(&self.map).values().cloned().collect();
        all.iter()
            .filter_map(|r| {
                let r = lock(r);
                (r.rec.state == "observing").then(|| ProbeLoad {
                    estimate: r.rec.name.clone(),
                    // The last 10 s interval, or before one closed, the
                    // mean so far.
                    write_bytes_per_s: match r.obs.last_totals() {
                        Some(t) => t.bytes_written as f64 / est::TOTALS_STEP_S as f64,
                        None => {
                            let (obs_s, _) = r.obs.observed_unobserved_s();
                            let (bytes, _, _) = r.obs.counts();
                            if obs_s >= 1.0 {
                                bytes as f64 / obs_s
                            } else {
                                0.0
                            }
                        }
                    },
                })
            })
            .collect()
    }

    fn save(&self, r: &mut Running) {
        let _ = std::fs::create_dir_all(&self.dir);
        if let Err(e) = crate::store::save(&self.dir.join(format!("{}.json", r.rec.name)), &r.rec) {
            tracing::warn!(estimate = %r.rec.name, error = %e, "estimate.save_failed");
        }
        let saved = SavedObservation {
            observation: r.obs.clone(),
            events_dropped: r.events_dropped,
            allocated_bytes: r.allocated_bytes,
            size_bytes: r.size_bytes,
            method: r.method.clone(),
            next_key: r.next_key,
        };
        if let Err(e) = crate::store::save(&self.dir.join(format!("{}.state", r.rec.name)), &saved)
        {
            tracing::warn!(estimate = %r.rec.name, error = %e, "estimate.save_failed");
        }
        r.last_save = Instant::now();
    }
}

fn new_running(rec: EstimateRecord, saved: Option<SavedObservation>, now: u64) -> Running {
    let kind = if rec.block_bytes == 0 {
        KeyKind::Files
    } else {
        KeyKind::Blocks {
            block_bytes: rec.block_bytes,
        }
    };
    let method = match rec.kind.as_str() {
        "share" => "watcher",
        "device" => "diskstats",
        _ => "filter",
    }
    .to_string();
    let (obs, dropped, alloc, size, method, next_key) = match saved {
        Some(s) if s.observation.kind() == kind => (
            s.observation,
            s.events_dropped,
            s.allocated_bytes,
            s.size_bytes,
            s.method,
            s.next_key,
        ),
        _ => (Observation::new(kind, now), 0, 0, 0, method, 0),
    };
    Running {
        rec,
        obs,
        trouble: None,
        method,
        allocated_bytes: alloc,
        size_bytes: size,
        events_dropped: dropped,
        next_key,
        taps: Vec::new(),
        device: None,
        buf: Vec::new(),
        last_save: Instant::now(),
        last_alloc: None,
        last_sampled_s: 0,
    }
}

/// A file's allocated bytes (its blocks: holes not counted) and size, from
/// one stat(2).
fn allocated_and_size(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or((0, 0), |m| (m.blocks() * 512, m.len()))
}

// ----------------------------------------------------------------- actions

/// `ferry estimate start`.
pub fn start(ctx: &Arc<AgentCtx>, req: StartEstimate) -> Result<EstimateStatus, ActionError> {
    let es = &ctx.estimates;
    let given = [
        req.volume.is_some(),
        req.workload.is_some(),
        req.share.is_some(),
        req.device.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        return Err(ActionError::bad_input(
            "name exactly one source: --volume V, --workload W, --share S or --device /dev/X",
        ));
    }
    let duration_s = req.duration_s.unwrap_or(es.settings.duration_s_default);
    if duration_s == 0 || duration_s > es.settings.duration_s_max {
        return Err(ActionError::bad_input(format!(
            "--duration {duration_s}s: from 1 s to estimate.duration_s_max ({} s)",
            es.settings.duration_s_max
        )));
    }
    let name = req.name.as_str().to_string();
    let g = ctx.cfg.replication.granularity_bytes;
    let (kind, source, members, block_bytes) = if let Some(v) = &req.volume {
        if ctx.primary(v.as_str()).is_none() {
            return Err(ActionError::conflict(format!(
                "volume {v} is not served here as a primary: observe it on the node that serves it"
            )));
        }
        ("volume", v.to_string(), vec![v.to_string()], g)
    } else if let Some(w) = &req.workload {
        let spec = crate::workload::load_workload(&ctx.cfg.data_dir, w.as_str())
            .map_err(|e| ActionError::bad_input(format!("{e:#}")))?
            .ok_or_else(|| {
                ActionError::not_found(format!("no workload {w} (ferry workload list)"))
            })?;
        if spec.volumes.is_empty() {
            return Err(ActionError::conflict(format!(
                "workload {w} has no volumes: observe its shares with --share"
            )));
        }
        let members: Vec<String> = spec.volumes.iter().map(|v| v.to_string()).collect();
        if let Some(m) = members.iter().find(|m| ctx.primary(m).is_none()) {
            return Err(ActionError::conflict(format!(
                "workload {w}'s volume {m} is not served here as a primary: observe it on the node that serves it"
            )));
        }
        ("workload", w.to_string(), members, g)
    } else if let Some(s) = &req.share {
        if ctx.shares.primary(s.as_str()).is_none() {
            return Err(ActionError::conflict(format!(
                "share {s} is not served here as a primary: observe it on the node that serves it"
            )));
        }
        ("share", s.to_string(), vec![s.to_string()], 0)
    } else {
        let d = req.device.clone().unwrap_or_default();
        let p = Path::new(&d);
        if !p.is_absolute() || d.contains('\0') {
            return Err(ActionError::bad_input(format!(
                "--device {d:?}: the absolute path of a block device (/dev/sdb)"
            )));
        }
        crate::estimate::device::resolve_device(p)
            .map_err(|e| ActionError::bad_input(e.to_string()))?;
        ("device", d.clone(), vec![d], g)
    };
    let mut map = lock(&es.map);
    if map.contains_key(&name) {
        return Err(ActionError::conflict(format!(
            "an estimate {name} exists: ferry estimate status {name}, or delete it first"
        )));
    }
    if map.len() >= es.settings.estimates_max {
        return Err(ActionError::conflict(format!(
            "this node keeps {} estimates (estimate.estimates_max): delete one first",
            map.len()
        )));
    }
    // One observer per volume, share or device.
    for other in map.values() {
        let o = lock(other);
        if o.rec.state != "observing" {
            continue;
        }
        let same_kind = |k: &str| {
            if k == "share" {
                "share"
            } else if k == "device" {
                "device"
            } else {
                "volume"
            }
        };
        if same_kind(&o.rec.kind) == same_kind(kind) {
            if let Some(m) = members.iter().find(|m| o.rec.members.contains(m)) {
                return Err(ActionError::conflict(format!(
                    "{m} is observed by estimate {} already: stop it first (ferry estimate stop {})",
                    o.rec.name, o.rec.name
                )));
            }
        }
    }
    let now = unix_ms();
    let rec = EstimateRecord {
        name: name.clone(),
        kind: kind.to_string(),
        source,
        members,
        started_unix_ms: now,
        duration_s,
        state: "observing".into(),
        ended_unix_ms: None,
        block_bytes,
    };
    let mut r = new_running(rec, None, now);
    // The taps go on now, so the first writes after the answer count.
    tick_one(ctx, &mut r, now);
    es.save(&mut r);
    tracing::info!(estimate = %name, kind = %r.rec.kind, source = %r.rec.source, duration_s, "estimate.started");
    let st = status_of(ctx, &r);
    map.insert(name, Arc::new(Mutex::new(r)));
    Ok(st)
}

pub fn list(ctx: &Arc<AgentCtx>) -> Vec<EstimateStatus> {
    let all: Vec<_> = lock(&ctx.estimates.map).values().cloned().collect();
    all.iter().map(|r| status_of(ctx, &lock(r))).collect()
}

pub fn get(ctx: &Arc<AgentCtx>, name: &Name) -> Result<EstimateStatus, ActionError> {
    let r = ctx.estimates.get(name.as_str())?;
    let r = lock(&r);
    Ok(status_of(ctx, &r))
}

/// `ferry estimate stop`: what was observed stays (reports still work).
pub fn stop(ctx: &Arc<AgentCtx>, name: &Name) -> Result<EstimateStatus, ActionError> {
    let r = ctx.estimates.get(name.as_str())?;
    let mut r = lock(&r);
    if r.rec.state == "observing" {
        let now = unix_ms();
        tick_one(ctx, &mut r, now);
        end(&mut r, "stopped", now);
        ctx.estimates.save(&mut r);
        tracing::info!(estimate = %name, "estimate.stopped");
    }
    Ok(status_of(ctx, &r))
}

/// `ferry estimate delete`.
pub fn delete(ctx: &Arc<AgentCtx>, name: &Name) -> Result<(), ActionError> {
    let es = &ctx.estimates;
    let r = lock(&es.map).remove(name.as_str()).ok_or_else(|| {
        ActionError::not_found(format!(
            "no estimate {name} on this node (ferry estimate list)"
        ))
    })?;
    let mut r = lock(&r);
    end(&mut r, "stopped", unix_ms());
    for ext in ["json", "state"] {
        let p = es.dir.join(format!("{name}.{ext}"));
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(ActionError::new(
                    ferry_api::ErrorKind::Internal,
                    format!("cannot remove {}: {e}", p.display()),
                ));
            }
        }
    }
    tracing::info!(estimate = %name, "estimate.deleted");
    Ok(())
}

/// Ends the observation: taps released, the device's trace stopped.
fn end(r: &mut Running, state: &str, now: u64) {
    let owner = r.rec.name.clone();
    for t in r.taps.drain(..) {
        if let Some(t) = t.upgrade() {
            t.tap().disable(&owner);
        }
    }
    if let Some(d) = r.device.take() {
        if let Some((s, _)) = d.trace {
            if let Err(e) = s.stop() {
                tracing::warn!(estimate = %owner, error = %e, "estimate.trace_stop_failed");
            }
        }
    }
    r.obs.advance(now);
    r.rec.state = state.to_string();
    r.rec.ended_unix_ms = Some(now);
    r.trouble = None;
}

// ------------------------------------------------------------ observation

/// The thread: ticks every estimate, saves them now and then.
pub fn spawn(ctx: Arc<AgentCtx>) -> std::io::Result<()> {
    let every = Duration::from_millis(ctx.estimates.settings.tick_interval_ms.max(10));
    let save_every = Duration::from_millis(ctx.estimates.settings.save_interval_ms.max(1000));
    // The first tick now, before the agent says it is up: the taps of
    // resumed observations are on before clients come back.
    tick_all(&ctx, save_every);
    std::thread::Builder::new()
        .name("ferry-estimate".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            tick_all(&ctx, save_every);
        })?;
    Ok(())
}

fn tick_all(ctx: &Arc<AgentCtx>, save_every: Duration) {
    let all: Vec<_> = lock(&ctx.estimates.map).values().cloned().collect();
    for r in all {
        let mut r = lock(&r);
        if r.rec.state != "observing" {
            continue;
        }
        let now = unix_ms();
        if now
            >= r.rec
                .started_unix_ms
                .saturating_add(r.rec.duration_s * 1000)
        {
            tick_one(ctx, &mut r, now);
            end(&mut r, "done", now);
            ctx.estimates.save(&mut r);
            tracing::info!(estimate = %r.rec.name, "estimate.done");
            continue;
        }
        tick_one(ctx, &mut r, now);
        sample_history(ctx, &mut r);
        if r.last_save.elapsed() >= save_every {
            ctx.estimates.save(&mut r);
        }
    }
}

/// Saves every observing estimate and ends its device traces (the agent
/// is stopping; they resume when it starts again).
pub fn save_all(ctx: &AgentCtx) {
    let all: Vec<_> = lock(&ctx.estimates.map).values().cloned().collect();
    for r in all {
        let mut r = lock(&r);
        if r.rec.state == "observing" {
            let now = unix_ms();
            tick_one(ctx, &mut r, now);
            ctx.estimates.save(&mut r);
            r.device = None;
        }
    }
}

/// The closed 10 s intervals since the last tick, to the history store.
fn sample_history(ctx: &AgentCtx, r: &mut Running) {
    let (Some(h), Some(t)) = (ctx.history.as_ref(), r.obs.last_totals()) else {
        return;
    };
    if t.start_s <= r.last_sampled_s {
        return;
    }
    r.last_sampled_s = t.start_s;
    let Ok(name) = Name::parse(&r.rec.name) else {
        return;
    };
    let step = est::TOTALS_STEP_S as f64;
    let key_bytes = key_bytes(r.rec.block_bytes, t.bytes_written, t.write_ios);
    let mut samples = Vec::new();
    for (m, v) in [
        (Metric::WriteBytesPerS, t.bytes_written as f64 / step),
        (Metric::WriteIops, t.write_ios as f64 / step),
        (Metric::ReadIops, t.read_ios as f64 / step),
        (Metric::UniqueBytes, t.keys as f64 * key_bytes),
    ] {
        if let Ok(s) = SeriesName::new(Scope::Estimate, name.clone(), m) {
            samples.push((s, v));
        }
    }
    h.record(t.start_s + est::TOTALS_STEP_S / 2, &samples);
}

/// One tick: the taps drained into the observation at `now`.
fn tick_one(ctx: &AgentCtx, r: &mut Running, now: u64) {
    // A volume's allocation is one stat(2) away; a share's is a walk of
    // its tree.
    let every = if r.rec.kind == "share" { 60 } else { 2 };
    let refresh_alloc = r
        .last_alloc
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(every));
    match r.rec.kind.as_str() {
        "volume" | "workload" => tick_volumes(ctx, r, now, refresh_alloc),
        "share" => tick_share(ctx, r, now, refresh_alloc),
        _ => tick_device(ctx, r, now),
    }
    r.obs.advance(now);
}

fn take_tap(r: &mut Running, t: Arc<dyn Tapped>, events_max: usize) -> Result<(), String> {
    let owner = r.rec.name.clone();
    if r.taps
        .iter()
        .any(|w| w.upgrade().is_some_and(|x| Arc::ptr_eq(&x, &t)))
    {
        return Ok(());
    }
    t.tap()
        .enable(&owner, events_max)
        .map_err(|other| format!("estimate {other} observes it already"))?;
    r.taps.push(Arc::downgrade(&t));
    Ok(())
}

fn tick_volumes(ctx: &AgentCtx, r: &mut Running, now: u64, refresh_alloc: bool) {
    let events_max = ctx.estimates.settings.tap_events_max;
    let members = r.rec.members.clone();
    let mut missing = Vec::new();
    let (mut alloc, mut size) = (0u64, 0u64);
    r.taps.retain(|w| w.strong_count() > 0);
    for (i, m) in members.iter().enumerate() {
        let Some(v) = ctx.primary(m) else {
            missing.push(m.clone());
            continue;
        };
        if let Err(e) = take_tap(r, v.clone(), events_max) {
            r.trouble = Some(("failed", format!("volume {m}: {e}")));
            continue;
        }
        let mut buf = std::mem::take(&mut r.buf);
        let d = v.tap.drain(&mut buf);
        // Each volume's blocks in a space of their own (2^48 bytes apart).
        let base = (i as u64) << 48;
        for e in &buf {
            if let TapEvent::Extent { offset, len } = *e {
                r.obs.record_write_extent(now, base + offset, len);
            }
        }
        r.buf = buf;
        if d.reads > 0 {
            r.obs.record_reads(now, d.reads);
        }
        r.events_dropped += d.dropped;
        if refresh_alloc {
            if let Ok(n) = crate::volume::validate_name(m) {
                let (a, z) = allocated_and_size(&ctx.store.dir(&n).join("data.raw"));
                alloc += a;
                size += z;
            }
        }
    }
    if refresh_alloc && missing.is_empty() {
        r.allocated_bytes = alloc;
        r.size_bytes = size;
        r.last_alloc = Some(Instant::now());
    }
    if !missing.is_empty() {
        // Not observed: the time is a gap, not idle.
        r.obs.resume(now);
        r.trouble = Some((
            "waiting",
            format!(
                "{} not served here as a primary now (moved, or the node is a replica): the time is not counted",
                missing.join(", ")
            ),
        ));
    } else if r.trouble.as_ref().is_some_and(|t| t.0 == "waiting") {
        r.trouble = None;
    }
}

fn tick_share(ctx: &AgentCtx, r: &mut Running, now: u64, refresh_alloc: bool) {
    let events_max = ctx.estimates.settings.tap_events_max;
    let name = r.rec.source.clone();
    r.taps.retain(|w| w.strong_count() > 0);
    let Some(s) = ctx.shares.primary(&name) else {
        r.obs.resume(now);
        r.trouble = Some((
            "waiting",
            format!("share {name} is not served here as a primary now: the time is not counted"),
        ));
        return;
    };
    if let Err(e) = take_tap(r, s.clone(), events_max) {
        r.trouble = Some(("failed", format!("share {name}: {e}")));
        return;
    }
    if r.trouble.as_ref().is_some_and(|t| t.0 == "waiting") {
        r.trouble = None;
    }
    let mut buf = std::mem::take(&mut r.buf);
    let d = s.tap.drain(&mut buf);
    for e in &buf {
        if let TapEvent::Key { key, bytes } = *e {
            r.obs.record_write_key(now, key, bytes);
        }
    }
    r.buf = buf;
    r.events_dropped += d.dropped;
    if refresh_alloc {
        if let Ok(st) = crate::share::status(ctx, &name, true) {
            r.allocated_bytes = st.bytes;
            r.size_bytes = st.bytes;
        }
        r.last_alloc = Some(Instant::now());
    }
}

/// Where this agent mounts tracefs when the system has not.
fn tracefs_dir(ctx: &AgentCtx) -> PathBuf {
    ctx.cfg.data_dir.join("run").join("tracefs")
}

fn open_device(ctx: &AgentCtx, r: &mut Running) -> Result<DeviceObs, String> {
    let path = PathBuf::from(&r.rec.source);
    let dev: DevId = crate::estimate::device::resolve_device(&path).map_err(|e| e.to_string())?;
    let mut diskstats = DiskstatsReader::new(dev);
    let _ = diskstats.sample();
    let tap = Arc::new(WriteTap::new());
    let _ = tap.enable(&r.rec.name, ctx.estimates.settings.tap_events_max);
    let tracefs = if !ctx.estimates.settings.use_tracepoint {
        Err("estimate.use_tracepoint = false".to_string())
    } else {
        Tracefs::locate().or_else(|_| {
            let d = tracefs_dir(ctx);
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            Tracefs::mount_at(&d).map_err(|e| e.to_string())
        })
    };
    let sink_tap = tap.clone();
    let trace = match tracefs {
        Ok(t) => match TraceSession::start(
            &t,
            dev,
            TraceConfig {
                buffer_size_kb: ctx.estimates.settings.trace_buffer_kb,
                ..TraceConfig::default()
            },
            move |ev| match ev {
                crate::estimate::device::TraceEvent::Write(w) => sink_tap.write_extent(
                    w.sector.saturating_mul(512),
                    w.nr_sectors.saturating_mul(512),
                ),
                crate::estimate::device::TraceEvent::Lost(n) => sink_tap.add_dropped(n),
            },
        ) {
            Ok(s) => Some((s, tap)),
            Err(e) => {
                tracing::warn!(estimate = %r.rec.name, error = %e, "estimate.tracepoint_unusable: diskstats only (an upper bound)");
                None
            }
        },
        Err(e) => {
            tracing::warn!(estimate = %r.rec.name, error = %e, "estimate.tracefs_unusable: diskstats only (an upper bound)");
            None
        }
    };
    r.method = if trace.is_some() {
        "tracepoint"
    } else {
        "diskstats"
    }
    .to_string();
    r.size_bytes = device_size(&path);
    r.allocated_bytes = r.size_bytes;
    Ok(DeviceObs {
        diskstats,
        trace,
        last_diskstats: Some(Instant::now()),
    })
}

/// A block device's size (BLKGETSIZE64).
fn device_size(path: &Path) -> u64 {
    use std::os::unix::io::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return 0;
    };
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: `f` is an open descriptor for the call's duration, and the
    // ioctl writes one u64 into `size`, which lives across the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc == 0 {
        size
    } else {
        0
    }
}

fn tick_device(ctx: &AgentCtx, r: &mut Running, now: u64) {
    if r.device.is_none() {
        match open_device(ctx, r) {
            Ok(d) => {
                r.device = Some(d);
                r.trouble = None;
            }
            Err(e) => {
                r.obs.resume(now);
                r.trouble = Some(("waiting", format!("{}: {e}", r.rec.source)));
                return;
            }
        }
    }
    let block = r.rec.block_bytes.max(1);
    let size_blocks = r.size_bytes.div_ceil(block).max(1);
    let mut d = r.device.take().expect("set above");
    if let Some((_, tap)) = &d.trace {
        let mut buf = std::mem::take(&mut r.buf);
        let dr = tap.drain(&mut buf);
        for e in &buf {
            if let TapEvent::Extent { offset, len } = *e {
                r.obs.record_write_extent(now, offset, len);
            }
        }
        r.buf = buf;
        r.events_dropped += dr.dropped;
    }
    if d.last_diskstats
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    {
        d.last_diskstats = Some(Instant::now());
        match d.diskstats.sample() {
            Ok(DiskstatsObservation::Interval(iv)) => {
                if iv.reads_completed > 0 {
                    r.obs.record_reads(now, iv.reads_completed);
                }
                if d.trace.is_none() && iv.writes_completed > 0 {
                    // No addresses: count every write as new blocks (an
                    // upper bound on what a copy must send again).
                    let bytes = iv.written_bytes_upper_bound;
                    let ios = iv.writes_completed;
                    r.obs.record_write_totals(now, bytes, ios);
                    let per_io = (bytes / ios).div_ceil(block) + 1;
                    let keys = ios.saturating_mul(per_io).min(size_blocks);
                    for _ in 0..keys {
                        r.next_key = r.next_key.wrapping_add(1);
                        r.obs.record_key(now, est::mix64(r.next_key));
                    }
                }
            }
            Ok(DiskstatsObservation::Baseline) => {}
            Ok(DiskstatsObservation::Gone) => {
                r.obs.resume(now);
                r.trouble = Some(("waiting", format!("{} is gone", r.rec.source)));
                r.device = None;
                return;
            }
            Err(e) => {
                r.trouble = Some(("waiting", e.to_string()));
            }
        }
    }
    r.device = Some(d);
}

/// Bytes a key stands for: a block, or (files) the mean bytes per write,
/// at least 1 — as ferry-core's `Profile::key_bytes`.
fn key_bytes(block_bytes: u64, bytes: u64, writes: u64) -> f64 {
    if block_bytes > 0 {
        block_bytes as f64
    } else if writes > 0 {
        (bytes as f64 / writes as f64).max(1.0)
    } else {
        1.0
    }
}

/// An estimate's status.
fn status_of(ctx: &AgentCtx, r: &Running) -> EstimateStatus {
    let (observed_s, unobserved_s) = r.obs.observed_unobserved_s();
    let (bytes, wios, rios) = r.obs.counts();
    let last = r.obs.last_totals();
    let step = est::TOTALS_STEP_S as f64;
    let key_bytes = key_bytes(r.rec.block_bytes, bytes, wios);
    let (state, error) = match (&r.trouble, r.rec.state.as_str()) {
        (Some((s, why)), "observing") => (s.to_string(), Some(why.clone())),
        (_, s) => (s.to_string(), None),
    };
    EstimateStatus {
        name: r.rec.name.clone(),
        node: ctx.identity.node_name.clone(),
        source: EstimateSource {
            kind: r.rec.kind.clone(),
            name: r.rec.source.clone(),
            members: r.rec.members.clone(),
        },
        state,
        error,
        method: r.method.clone(),
        started_unix_ms: r.rec.started_unix_ms,
        duration_s: r.rec.duration_s,
        ends_unix_ms: r.rec.started_unix_ms + r.rec.duration_s * 1000,
        observed_s,
        unobserved_s,
        progress: (observed_s / r.rec.duration_s.max(1) as f64).clamp(0.0, 1.0),
        bytes_written: bytes,
        write_ios: wios,
        read_ios: rios,
        write_bytes_per_s: last.map_or(0.0, |t| t.bytes_written as f64 / step),
        write_iops: last.map_or(0.0, |t| t.write_ios as f64 / step),
        read_iops: last.map_or(0.0, |t| t.read_ios as f64 / step),
        allocated_bytes: r.allocated_bytes,
        size_bytes: r.size_bytes,
        key_kind: if r.rec.block_bytes > 0 {
            "blocks"
        } else {
            "files"
        }
        .into(),
        block_bytes: (r.rec.block_bytes > 0).then_some(r.rec.block_bytes),
        working_set: r
            .obs
            .working_set()
            .points
            .iter()
            .map(|p| WorkingSetPoint {
                window_s: p.window_s,
                max_keys: p.max_keys,
                mean_keys: p.mean_keys,
                max_bytes: (p.max_keys as f64 * key_bytes) as u64,
                windows: p.windows,
            })
            .collect(),
        unique_bytes_upper_bound: r.method == "diskstats",
        events_dropped: r.events_dropped,
        memory_bytes: r.obs.memory_bytes() as u64,
        memory_bound_bytes: est::MEMORY_BOUND_BYTES as u64,
    }
}

/// The profile and status of an estimate (for its report).
pub fn profile(
    ctx: &Arc<AgentCtx>,
    name: &str,
) -> Result<(est::Profile, EstimateStatus), ActionError> {
    let r = ctx.estimates.get(name)?;
    let r = lock(&r);
    Ok((r.obs.profile(), status_of(ctx, &r)))
}

// ------------------------------------------------------------------ report

/// `ferry estimate report`: the forecast over what was observed.
pub fn report(
    ctx: &Arc<AgentCtx>,
    name: &Name,
    q: ferry_api::request::EstimateReportQuery,
) -> Result<ferry_api::reply::EstimateReport, ActionError> {
    use ferry_api::reply::{EstimateReport, ReportLink};
    let s = ctx.estimates.settings;
    let (prof, status) = profile(ctx, name.as_str())?;
    let (bw, from, probe, paced) = match (&q.to, q.bandwidth_bytes_per_s) {
        (Some(_), Some(_)) => {
            return Err(ActionError::bad_input(
                "give --to NODE (the last probe of that link) or --bandwidth, not both",
            ))
        }
        (None, None) => {
            return Err(ActionError::bad_input(
                "give --to NODE (the last probe of that link: ferry estimate probe --to NODE) or --bandwidth RATE",
            ))
        }
        (None, Some(b)) => (b as f64, "given", None, None),
        (Some(to), None) => {
            let p = crate::agent::probe::last(ctx, to).ok_or_else(|| {
                ActionError::conflict(format!(
                    "no probe of the link to {to} yet: run ferry estimate probe --to {to} (while the workload runs)"
                ))
            })?;
            // `--max-rate` paces the copier only (streamed writes are not
            // paced): the link is the unlimited probe's figure, and the
            // probe at the same rate limit, if it measured one, is what
            // the copier really gets at that limit.
            let paced = match (&p.limited, q.max_rate_bytes_per_s) {
                (Some(l), Some(m)) if l.max_rate_bytes_per_s == m => {
                    Some(l.throughput_bytes_per_s.min(m as f64))
                }
                _ => None,
            };
            (p.throughput_bytes_per_s, "probe", Some(p), paced)
        }
    };
    if !(bw.is_finite() && bw > 0.0) {
        return Err(ActionError::conflict(
            "the link's bandwidth is 0: probe it again (ferry estimate probe) or give --bandwidth",
        ));
    }
    let max_rate = paced.or(q.max_rate_bytes_per_s.map(|m| m as f64));
    let stat = match q.stat.as_deref() {
        Some("mean") => est::Stat::Mean,
        _ => est::Stat::Max,
    };
    // `ferry migrate start`'s default mode.
    let mode = ferry_core::link::Mode::Sync;
    let start_hook_s = start_hook_s(ctx, &status);
    let inputs = est::ForecastInputs {
        target: est::Target {
            allocated_bytes: status.allocated_bytes,
            size_bytes: status.size_bytes.max(status.allocated_bytes).max(1),
        },
        link: est::Link {
            bandwidth_bytes_per_s: bw,
            max_rate_bytes_per_s: max_rate,
        },
        cutover: est::CutoverInputs {
            mode,
            drain_window_s: s.drain_window_ms as f64 / 1000.0,
            rehash_window_s: s.rehash_window_ms as f64 / 1000.0,
            hash_bytes_per_s: s.hash_bytes_per_s.max(1) as f64,
            commit_s: s.commit_ms as f64 / 1000.0,
            start_hook_s,
        },
        backlog_bytes_max: ctx.cfg.replication.backlog_bytes_max,
        throttle_pct_max: ferry_core::migration::ConvergeConfig::default().throttle_pct_max,
        ship_days: q.ship_days,
        best_hours: 3,
        stat,
    };
    let forecast = est::report(&prof, &inputs)
        .map_err(|e| ActionError::conflict(format!("no forecast yet: {e}")))?;
    let mut warnings = Vec::new();
    if status.observed_s < 600.0 {
        warnings.push(format!(
            "observed for {:.0} s only: W(T) is known up to {} s; longer windows are extrapolated (observe for hours, ideally a whole day, before relying on it)",
            status.observed_s,
            forecast.curve.longest_s()
        ));
    }
    if status.unique_bytes_upper_bound {
        warnings.push("diskstats only (no tracepoint): every write is counted as new blocks, so W(T) and the times are upper bounds".into());
    }
    if status.events_dropped > 0 {
        warnings.push(format!(
            "{} write events were dropped (estimate.tap_events_max): W(T) is a lower bound",
            status.events_dropped
        ));
    }
    if status.key_kind == "files" {
        warnings.push("a share: keys are files, each counted at the mean bytes per change; a file rewritten whole counts more".into());
    }
    if let Some(p) = &probe {
        if p.under_load.is_empty() {
            warnings.push(format!(
                "the probe to {} ran with no estimate observing: it may overstate what a migration gets under load",
                p.to
            ));
        }
    }
    let mut shared_link = None;
    if !q.with.is_empty() {
        let mut jobs = vec![est::Job {
            name: name.to_string(),
            alone_s: forecast.ready_async.seconds(),
        }];
        for w in &q.with {
            let (p2, st2) = profile(ctx, w.as_str())?;
            let i2 = est::ForecastInputs {
                target: est::Target {
                    allocated_bytes: st2.allocated_bytes,
                    size_bytes: st2.size_bytes.max(st2.allocated_bytes).max(1),
                },
                ..inputs
            };
            let r = est::time_to_ready(
                &p2,
                &i2.target,
                &i2.link,
                ferry_core::link::Mode::Async,
                stat,
            )
            .map_err(|e| ActionError::conflict(format!("estimate {w}: {e}")))?;
            jobs.push(est::Job {
                name: w.to_string(),
                alone_s: r.seconds(),
            });
        }
        shared_link = Some(est::shared_link(&jobs));
    }
    Ok(EstimateReport {
        name: name.to_string(),
        node: ctx.identity.node_name.clone(),
        source: status.source.clone(),
        generated_unix_ms: unix_ms(),
        observed_s: status.observed_s,
        stat: if stat == est::Stat::Mean {
            "mean"
        } else {
            "max"
        }
        .into(),
        link: ReportLink {
            bandwidth_bytes_per_s: bw,
            max_rate_bytes_per_s: max_rate,
            from: from.into(),
            probe,
        },
        allocated_bytes: status.allocated_bytes,
        size_bytes: status.size_bytes,
        status,
        warnings,
        forecast,
        shared_link,
    })
}

/// The start hook's time from the running test cutover of the workload,
/// if any (`start_to_check_ms`).
fn start_hook_s(ctx: &Arc<AgentCtx>, st: &EstimateStatus) -> Option<f64> {
    if st.source.kind != "workload" {
        return None;
    }
    let m = ctx.migrations();
    let t = m.get(&st.source.name)?.test.as_ref()?;
    t.get("start_to_check_ms")
        .and_then(|v| v.as_u64())
        .map(|ms| ms as f64 / 1000.0)
}
