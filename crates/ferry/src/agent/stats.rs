//! The statistics actions: a series' history (`GET /api/v1/stats`), the
//! list of series (`GET /api/v1/stats/series`) and a migration's report
//! after the fact (`GET /api/v1/migrations/{name}/report`), its rates and
//! bytes read from the history of its workload.

use std::sync::Arc;

use ferry_api::reply as r;
use ferry_api::request::StatsQuery;
use ferry_api::{ActionError, ErrorKind};
use ferry_core::history::{Answer, Metric, Scope, SeriesName};
use ferry_core::Name;

use crate::agent::AgentCtx;
use crate::history::{HistoryError, HistoryStore};

type Res<T> = Result<T, ActionError>;

/// The default time range of a query, s.
pub const SINCE_DEFAULT_S: u64 = 3600;

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn store(ctx: &AgentCtx) -> Res<Arc<HistoryStore>> {
    ctx.history.clone().ok_or_else(|| {
        ActionError::new(
            ErrorKind::Conflict,
            "statistics history is off on this node (history.enabled = false)",
        )
    })
}

fn history_error(e: HistoryError) -> ActionError {
    match e {
        HistoryError::Unknown(_) => ActionError::not_found(e.to_string()),
        HistoryError::Query(_) => ActionError::bad_input(e.to_string()),
        HistoryError::Io { .. } | HistoryError::Full { .. } => {
            ActionError::new(ErrorKind::Internal, e.to_string())
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ActionError::new(ErrorKind::Internal, e.to_string()))?
}

fn points(a: &Answer) -> Vec<r::StatsPoint> {
    a.points
        .iter()
        .map(|p| r::StatsPoint {
            t: p.t,
            mean: p.mean,
            min: p.min,
            max: p.max,
            count: p.count,
        })
        .collect()
}

/// `GET /api/v1/stats`.
pub async fn get(ctx: &Arc<AgentCtx>, q: StatsQuery) -> Res<r::StatsSeries> {
    let st = store(ctx)?;
    let now = unix_now();
    let to = q.to.unwrap_or(now);
    let from = q
        .from
        .unwrap_or_else(|| to.saturating_sub(q.since.unwrap_or(SINCE_DEFAULT_S)));
    let step = q.step.unwrap_or(0);
    let series = q.series.clone();
    let a = blocking(move || {
        st.query(&series, now, from, to, step)
            .map_err(history_error)
    })
    .await?;
    Ok(r::StatsSeries {
        series: q.series.to_string(),
        node: ctx.identity.node_name.clone(),
        from,
        to,
        step_s: a.step_s,
        tier_step_s: ferry_core::history::TIERS[a.tier].step_s,
        points: points(&a),
    })
}

/// `GET /api/v1/stats/series`.
pub async fn list(ctx: &Arc<AgentCtx>) -> Res<r::StatsSeriesList> {
    let node = ctx.identity.node_name.clone();
    let Some(st) = ctx.history.clone() else {
        return Ok(r::StatsSeriesList {
            node,
            series: Vec::new(),
            series_bytes_max: ferry_core::history::SERIES_BYTES_MAX,
            disk_bytes: 0,
            enabled: false,
        });
    };
    let (series, disk_bytes) = blocking(move || {
        Ok((
            st.list().iter().map(|s| s.to_string()).collect(),
            st.disk_bytes(),
        ))
    })
    .await?;
    Ok(r::StatsSeriesList {
        node,
        series,
        series_bytes_max: ferry_core::history::SERIES_BYTES_MAX,
        disk_bytes,
        enabled: true,
    })
}

/// Bytes (the integral), mean and peak of a rate series over `[from, to]`.
fn rate_over(
    st: &HistoryStore,
    s: &SeriesName,
    now: u64,
    from: u64,
    to: u64,
) -> Option<(u64, r::ReportRate)> {
    // A step that keeps the answer within the query bound.
    let step = (to.saturating_sub(from) / 5_000).max(1);
    let a = st.query(s, now, from, to, step).ok()?;
    if a.points.is_empty() {
        return None;
    }
    let bytes: f64 = a.points.iter().map(|p| p.mean * a.step_s as f64).sum();
    let covered = (a.points.len() as u64 * a.step_s).max(1);
    let peak = a.points.iter().map(|p| p.max).fold(0.0, f64::max);
    Some((
        bytes.max(0.0).round() as u64,
        r::ReportRate {
            mean_bytes_per_s: (bytes / covered as f64 * 10.0).round() / 10.0,
            peak_bytes_per_s: peak.round(),
        },
    ))
}

/// `GET /api/v1/migrations/{name}/report`.
pub async fn migration_report(ctx: &Arc<AgentCtx>, name: Name) -> Res<r::MigrationReport> {
    let rec = ctx
        .migrations()
        .get(name.as_str())
        .cloned()
        .ok_or_else(|| ActionError::not_found(format!("no migration of {name} on this node")))?;
    let phase = rec.state.phase;
    let timeline: Vec<r::ReportPhase> = rec
        .timeline
        .iter()
        .map(|m| r::ReportPhase {
            phase: m.phase.clone(),
            at_unix: m.at_unix,
        })
        .collect();
    let ended_unix = phase
        .is_final()
        .then(|| timeline.last().map(|m| m.at_unix))
        .flatten();
    let cutover: Option<r::CutoverReport> = rec
        .last_cutover
        .clone()
        .and_then(|v| serde_json::from_value(v).ok());
    let now = unix_now();
    let (from, to) = (rec.started_unix, ended_unix.unwrap_or(now));
    let (started_by, cut_over_by) = {
        let (ctx, w) = (ctx.clone(), rec.workload.to_string());
        blocking(move || Ok(super::audit::who_did(&ctx, &w))).await?
    };
    let hist = ctx.history.clone();
    let workload = rec.workload.clone();
    let (link, write) = blocking(move || {
        let Some(st) = hist else {
            return Ok((None, None));
        };
        let s = |m| SeriesName::new(Scope::Workload, workload.clone(), m).ok();
        let link = s(Metric::LinkBytesPerS).and_then(|s| rate_over(&st, &s, now, from, to));
        let write = s(Metric::WriteBytesPerS).and_then(|s| rate_over(&st, &s, now, from, to));
        Ok((link, write))
    })
    .await?;
    Ok(r::MigrationReport {
        workload: rec.workload.to_string(),
        source: rec.source.clone(),
        target: rec.target.clone(),
        mode: rec.mode.clone(),
        phase: phase.as_str().to_string(),
        completed: phase == ferry_core::MigrationPhase::Completed,
        started_unix: rec.started_unix,
        ended_unix,
        timeline,
        bytes_moved: link.as_ref().map(|(b, _)| *b),
        link_rate: link.map(|(_, r)| r),
        write_rate: write.map(|(_, r)| r),
        downtime_ms: cutover.as_ref().map(|c| c.downtime_ms),
        outage_ms: cutover.as_ref().and_then(|c| c.outage_ms),
        verified: cutover
            .as_ref()
            .map(|c| c.target_healthy && phase == ferry_core::MigrationPhase::Completed),
        cutover,
        started_by,
        cut_over_by,
        reason: rec.state.reason.clone(),
    })
}
