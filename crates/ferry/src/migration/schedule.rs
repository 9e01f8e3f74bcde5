//! Scheduled cutovers at the edge: RFC 3339 times and maintenance windows
//! turned into the values [`ferry_core::schedule`] decides on (Unix seconds,
//! wall-clock time in the window's zone from the system's time-zone
//! database), the schedule kept in the migration's record, and the agent's
//! scheduler thread that acts on its decisions.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::migration::MigrationPhase;
use ferry_core::schedule::{Decision, LocalTime, Schedule, Window};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Host;
use crate::handover::Node;

/// How often the scheduler looks at the schedules (a cutover starts at most
/// this late).
const TICK: Duration = Duration::from_millis(100);

/// What `POST /api/v1/migrations/{name}/schedule` takes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// RFC 3339 with an explicit zone (`Z` or an offset).
    pub at: Option<String>,
    /// `DAYS HH:MM-HH:MM ZONE`.
    pub window: Option<String>,
    /// RFC 3339: gives up after this.
    pub deadline: Option<String>,
}

pub fn now_unix() -> i64 {
    Timestamp::now().as_second()
}

/// An RFC 3339 time with its zone, to Unix seconds (a fraction rounds up:
/// never before the time asked for).
pub fn parse_time(what: &str, s: &str) -> Result<i64> {
    let ts: Timestamp = s.trim().parse().map_err(|e| {
        anyhow!(
            "{what} {s:?} is not an RFC 3339 time with its zone, like 2026-12-24T02:00:00Z or 2026-12-24T03:00:00+01:00 ({e})"
        )
    })?;
    let secs = ts.as_second();
    Ok(if ts.subsec_nanosecond() > 0 {
        secs + 1
    } else {
        secs
    })
}

pub fn rfc3339(unix: i64) -> String {
    Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| unix.to_string())
}

/// A window, parsed and its zone found in the system's database.
pub fn parse_window(s: &str) -> Result<Window> {
    let w: Window = s.parse().map_err(|e| anyhow!("--window: {e}"))?;
    zone(&w)?;
    Ok(w)
}

fn zone(w: &Window) -> Result<TimeZone> {
    TimeZone::get(w.tz()).map_err(|e| {
        anyhow!(
            "unknown time zone {:?} in the window {w}: use an IANA name such as Europe/Paris or UTC (the system's /usr/share/zoneinfo, Debian package tzdata): {e}",
            w.tz()
        )
    })
}

/// The wall-clock time at `unix` in the window's zone.
fn local(w: &Window, unix: i64) -> Result<LocalTime> {
    let tz = zone(w)?;
    let z = Timestamp::from_second(unix)?.to_zoned(tz);
    Ok(LocalTime {
        weekday: z.weekday().to_monday_zero_offset() as u8,
        minute: z.hour() as u16 * 60 + z.minute() as u16,
    })
}

/// When the window next opens at or after `unix` (now, if it is open).
pub fn next_opening(w: &Window, unix: i64) -> Option<i64> {
    let l = local(w, unix).ok()?;
    if w.contains(l) {
        return Some(unix);
    }
    let tz = zone(w).ok()?;
    let (days, minute) = w.next_opening(l)?;
    let today = Timestamp::from_second(unix)
        .ok()?
        .to_zoned(tz.clone())
        .date();
    let date = today
        .checked_add(jiff::Span::new().days(i64::from(days)))
        .ok()?;
    let dt = date.at((minute / 60) as i8, (minute % 60) as i8, 0, 0);
    // A start that falls in a DST gap opens at the first instant after it.
    Some(dt.to_zoned(tz).ok()?.timestamp().as_second())
}

/// A schedule from what the operator asked for.
pub fn build<H: Host + ?Sized>(
    ctx: &H,
    req: &ScheduleRequest,
    recurring: bool,
) -> Result<Schedule> {
    let now = now_unix();
    let at = req
        .at
        .as_deref()
        .map(|s| parse_time("--at", s))
        .transpose()?;
    let window = req.window.as_deref().map(parse_window).transpose()?;
    let deadline = req
        .deadline
        .as_deref()
        .map(|s| parse_time("--deadline", s))
        .transpose()?;
    if let Some(at) = at {
        if at < now - 1 {
            bail!(
                "--at {} is in the past (it is {} now): give a later time, or cut over now without --at",
                rfc3339(at),
                rfc3339(now)
            );
        }
    }
    if let Some(d) = deadline {
        if d <= now {
            bail!("--deadline {} is in the past", rfc3339(d));
        }
        if at.is_some_and(|a| d <= a) {
            bail!("--deadline must come after --at");
        }
    }
    if at.is_none() && window.is_none() && deadline.is_none() {
        bail!("a scheduled cutover needs --at, --window or --deadline");
    }
    // Only a deadline: from now until then.
    let at = at.or((window.is_none()).then_some(now));
    let m = &ctx.cfg().migration;
    Ok(Schedule::new(
        at,
        window,
        deadline,
        recurring,
        (m.scheduled_cutover_retry_ms / 1000).max(1) as u32,
        (m.scheduled_cutover_grace_ms / 1000) as i64,
    ))
}

/// The schedule as `migrate status` shows it.
pub fn to_json(s: &Schedule) -> Value {
    let now = now_unix();
    let next_window = s.window.as_ref().and_then(|w| {
        let from = s.at_unix.map_or(now, |a| a.max(now));
        next_opening(w, from)
    });
    json!({
        "at": s.at_unix.map(rfc3339),
        "window": s.window.as_ref().map(|w| w.to_string()),
        "deadline": s.deadline_unix.map(rfc3339),
        "recurring": s.recurring,
        "state": s.state,
        "attempts": s.attempts,
        "cutovers": s.cutovers,
        "last_attempt_at": s.last_attempt_unix.map(rfc3339),
        "last_outcome": s.last_outcome,
        "reason": s.reason,
        "next_window_opens_at": next_window.map(rfc3339),
    })
}

/// When the cutover is due as far as the clock and window say (`at`, or
/// the window's next opening after it); `None` once it is no longer waiting.
pub fn scheduled_at(s: &Schedule) -> Option<String> {
    if s.is_final() {
        return None;
    }
    let now = now_unix();
    match (&s.window, s.at_unix) {
        (Some(w), at) => next_opening(w, at.map_or(now, |a| a.max(now))).map(rfc3339),
        (None, Some(at)) => Some(rfc3339(at)),
        (None, None) => None,
    }
}

/// `ferry migrate cutover NAME --at/--window/--deadline`.
pub fn set<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str, req: &ScheduleRequest) -> Result<Value> {
    let sched = build(ctx, req, false)?;
    let mut migs = ctx.migrations();
    let rec = migs.get_mut(workload).ok_or_else(|| {
        anyhow!(
            "workload {workload:?} is not migrating from node {}: `ferry migrate start` first",
            ctx.identity().node_name
        )
    })?;
    if rec.state.phase.is_final() {
        bail!(
            "the migration of {workload} is {}: nothing to cut over",
            rec.state.phase.as_str()
        );
    }
    if rec
        .schedule
        .as_ref()
        .is_some_and(|s| s.state == ferry_core::schedule::ScheduleState::CuttingOver)
    {
        bail!("a scheduled cutover of {workload} is running now");
    }
    rec.schedule = Some(sched.clone());
    rec.save(&ctx.cfg().data_dir)?;
    drop(migs);
    let at = scheduled_at(&sched);
    tracing::info!(workload, at = ?at, window = ?sched.window.as_ref().map(|w| w.to_string()),
        deadline = ?sched.deadline_unix.map(rfc3339), "migration.schedule.set");
    Ok(json!({"workload": workload, "scheduled_at": at, "schedule": to_json(&sched)}))
}

/// `ferry migrate cutover NAME --cancel`.
pub fn cancel<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) -> Result<Value> {
    let mut migs = ctx.migrations();
    let rec = migs.get_mut(workload).ok_or_else(|| {
        anyhow!(
            "workload {workload:?} is not migrating from node {}",
            ctx.identity().node_name
        )
    })?;
    let Some(s) = rec.schedule.take() else {
        bail!("no cutover of {workload} is scheduled");
    };
    let running = s.state == ferry_core::schedule::ScheduleState::CuttingOver;
    if running {
        // Too late: keep it, so its outcome is recorded.
        rec.schedule = Some(s);
        bail!("the scheduled cutover of {workload} is running now and cannot be cancelled; `ferry migrate status {workload}` shows how it ends");
    }
    rec.save(&ctx.cfg().data_dir)?;
    tracing::info!(workload, "migration.schedule.cancelled");
    Ok(json!({"workload": workload, "cancelled": true, "was": to_json(&s)}))
}

/// One look at every schedule: acts on what [`Schedule::decide`] says.
pub fn tick<H: Host + ?Sized>(ctx: &Arc<H>) {
    let now = now_unix();
    let mut start: Vec<String> = Vec::new();
    let mut migs = ctx.migrations();
    for rec in migs.values_mut() {
        let Some(s) = rec.schedule.as_mut() else {
            continue;
        };
        if s.is_final() {
            continue;
        }
        let workload = rec.workload.to_string();
        let phase = rec.state.phase;
        if phase.is_final() && s.state == ferry_core::schedule::ScheduleState::Pending {
            let why = format!("the migration is {} without it", phase.as_str());
            tracing::info!(workload, reason = %why, "migration.schedule.ended");
            s.give_up(why);
            if let Err(e) = rec.save(&ctx.cfg().data_dir) {
                tracing::error!(workload, error = %e, "migration.record.save_failed");
            }
            continue;
        }
        let local = match s.window.as_ref().map(|w| local(w, now)).transpose() {
            Ok(l) => l,
            Err(e) => {
                // The zone vanished from the system since it was accepted.
                let why = format!("{e:#}");
                tracing::error!(workload, reason = %why, "migration.schedule.gave_up");
                s.give_up(why);
                let _ = rec.save(&ctx.cfg().data_dir);
                continue;
            }
        };
        let ready =
            phase == MigrationPhase::Ready && rec.test.is_none() && !rec.auto_cutover_running;
        let not_ready = if rec.test.is_some() {
            "a test instance runs on the target (`ferry migrate test --end` it)".to_string()
        } else if rec.auto_cutover_running {
            "a cutover is running".to_string()
        } else {
            match &rec.state.reason {
                Some(r) => format!("phase {}: {r}", phase.as_str()),
                None => format!("phase {}", phase.as_str()),
            }
        };
        let before = s.clone();
        let decided = s.decide(now, local, ready, &not_ready);
        let attempt = |what: &str, detail: serde_json::Value| {
            ctx.audit()
                .decide(crate::audit::decision(what, &workload, detail, None))
        };
        match &decided {
            Decision::Wait => {}
            Decision::NotReady => attempt(
                "scheduled-cutover-not-ready",
                serde_json::json!({"attempt": s.attempts, "reason": not_ready}),
            ),
            Decision::Cutover => attempt(
                "scheduled-cutover",
                serde_json::json!({"attempt": s.attempts, "cutover": s.cutovers}),
            ),
            Decision::GiveUp(why) => attempt(
                "scheduled-cutover-gave-up",
                serde_json::json!({"reason": why}),
            ),
        }
        match decided {
            Decision::Wait => {}
            Decision::NotReady => {
                tracing::info!(workload, attempt = s.attempts, outcome = "not-ready", reason = %not_ready,
                    "migration.schedule.attempt");
            }
            Decision::Cutover => {
                tracing::info!(
                    workload,
                    attempt = s.attempts,
                    cutover = s.cutovers,
                    outcome = "cutting-over",
                    "migration.schedule.attempt"
                );
                rec.auto_cutover_running = true;
                start.push(workload.clone());
            }
            Decision::GiveUp(why) => {
                tracing::warn!(workload, reason = %why, "migration.schedule.gave_up");
            }
        }
        // Whatever decide changed is kept (it changes on attempts and at
        // window edges only, not every tick).
        if *s != before {
            if let Err(e) = rec.save(&ctx.cfg().data_dir) {
                tracing::error!(workload, error = %e, "migration.record.save_failed");
            }
        }
    }
    drop(migs);
    for workload in start {
        let c = ctx.clone();
        let name = workload.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("sched-cutover-{workload}"))
            .spawn(move || run_cutover(&c, &name));
        if let Err(e) = spawned {
            tracing::error!(workload, error = %e, "migration.schedule.spawn_failed");
            finish(ctx, &workload, Err(format!("cannot start a thread: {e}")));
        }
    }
}

fn run_cutover<H: Host + ?Sized>(ctx: &Arc<H>, workload: &str) {
    let op = crate::audit::new_op_id();
    let outcome =
        crate::transport::client::with_op(Some(&op), || crate::migration::cutover(ctx, workload))
            .map(|r| {
                format!(
                    "downtime {} ms, outage {} ms",
                    r["downtime_ms"], r["outage_ms"]
                )
            })
            .map_err(|e| format!("{e:#}"));
    ctx.audit().decide(crate::audit::decision(
        "scheduled-cutover-result",
        workload,
        match &outcome {
            Ok(s) => serde_json::json!({"ok": true, "outcome": s}),
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        },
        Some(&op),
    ));
    match &outcome {
        Ok(s) => tracing::info!(workload, outcome = %s, "migration.schedule.cutover_done"),
        Err(e) => tracing::warn!(workload, error = %e, "migration.schedule.cutover_failed"),
    }
    finish(ctx, workload, outcome);
}

fn finish<H: Host + ?Sized>(ctx: &H, workload: &str, outcome: Result<String, String>) {
    let mut migs = ctx.migrations();
    let Some(rec) = migs.get_mut(workload) else {
        return;
    };
    rec.auto_cutover_running = false;
    if let Some(s) = rec.schedule.as_mut() {
        s.cutover_ended(now_unix(), outcome);
        if let (ferry_core::schedule::ScheduleState::GaveUp, Some(why)) = (&s.state, &s.reason) {
            tracing::warn!(workload, reason = %why, "migration.schedule.gave_up");
        }
    }
    if let Err(e) = rec.save(&ctx.cfg().data_dir) {
        tracing::error!(workload, error = %e, "migration.record.save_failed");
    }
}

/// The agent's scheduler: looks at every schedule each [`TICK`].
pub fn spawn<H: Host + ?Sized>(ctx: Arc<H>) -> Result<()> {
    std::thread::Builder::new()
        .name("cutover-scheduler".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            tick(&ctx);
        })
        .context("cannot start the cutover scheduler")?;
    Ok(())
}
