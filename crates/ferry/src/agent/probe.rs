//! `ferry estimate probe`: the replication link's throughput and round
//! trip to a peer, measured over the real mutual-TLS replication transport
//! ([`crate::transport::probe`]) while the workloads keep running. Each
//! node's last result is kept in `DATA_DIR/estimates/probes/NODE.json`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::reply::{ProbeLimited, ProbeLoad, ProbeResult};
use ferry_api::request::ProbeLink;
use ferry_api::{ActionError, ErrorKind};
use ferry_core::Name;
use serde::{Deserialize, Serialize};

use crate::agent::AgentCtx;
use crate::transport::probe::{self as wire, ProbeError};

/// A probe's result as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedProbe {
    result: ProbeResult,
}

impl crate::store::Record for SavedProbe {
    const KIND: &'static str = "probe";
}

fn dir(ctx: &AgentCtx) -> PathBuf {
    ctx.cfg.data_dir.join("estimates").join("probes")
}

/// Runs a probe to `req.to` (blocking: call it off the async runtime).
pub fn run(
    ctx: &Arc<AgentCtx>,
    req: ProbeLink,
    under_load: Vec<ProbeLoad>,
) -> Result<ProbeResult, ActionError> {
    let settings = &ctx.cfg.estimate;
    let to = Name::parse(&req.to)
        .map_err(|e| ActionError::bad_input(format!("node name {:?}: {e}", req.to)))?;
    let to = to.into_string();
    if to == ctx.identity.node_name {
        return Err(ActionError::bad_input(format!(
            "{to} is this node: probe the link to another node"
        )));
    }
    let seconds = req.seconds.unwrap_or(settings.probe_seconds_default);
    if seconds == 0 || seconds > settings.probe_seconds_max {
        return Err(ActionError::bad_input(format!(
            "seconds must be 1 to {} (estimate.probe_seconds_max), not {seconds}",
            settings.probe_seconds_max
        )));
    }
    if req.max_rate_bytes_per_s == Some(0) {
        return Err(ActionError::bad_input(
            "max_rate_bytes_per_s must be above 0 (leave it out for no limit)",
        ));
    }
    if ctx.peers.get(&to).is_none() {
        return Err(ActionError::not_found(format!(
            "node {to} is not paired with {} (see `ferry node list`)",
            ctx.identity.node_name
        )));
    }
    let plan = wire::Plan {
        seconds: Duration::from_secs(seconds),
        max_rate_bytes_per_s: req.max_rate_bytes_per_s,
        frame_bytes_max: ctx.cfg.replication.frame_bytes_max,
    };
    let at_unix_ms = crate::sys::unix_ms();
    let m = wire::measure(&ctx.dialer(), &to, &plan).map_err(|e| {
        let kind = match e {
            ProbeError::Refused { .. } => ErrorKind::Conflict,
            ProbeError::Unreachable { .. } | ProbeError::Failed { .. } => ErrorKind::Unavailable,
        };
        ActionError::new(kind, e.to_string())
    })?;
    let mut loaded = m.unlimited.rtt_ms.clone();
    let result = ProbeResult {
        node: ctx.identity.node_name.clone(),
        to: to.clone(),
        at_unix_ms,
        seconds: seconds as f64,
        bytes: m.unlimited.bytes,
        throughput_bytes_per_s: m.unlimited.throughput_bytes_per_s(),
        limited: m.limited.as_ref().and_then(|l| {
            Some(ProbeLimited {
                max_rate_bytes_per_s: req.max_rate_bytes_per_s?,
                bytes: l.bytes,
                throughput_bytes_per_s: l.throughput_bytes_per_s(),
            })
        }),
        rtt_ms_idle: m.rtt_ms_idle,
        rtt_ms_p50: wire::percentile(&mut loaded, 50.0),
        rtt_ms_p99: wire::percentile(&mut loaded, 99.0),
        under_load,
    };
    tracing::info!(to = %to, bytes = result.bytes, throughput = result.throughput_bytes_per_s,
        rtt_ms_idle = result.rtt_ms_idle, rtt_ms_p50 = result.rtt_ms_p50,
        rtt_ms_p99 = result.rtt_ms_p99, "probe.done");
    let d = dir(ctx);
    let saved = std::fs::create_dir_all(&d)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            crate::store::save(
                &d.join(format!("{to}.json")),
                &SavedProbe {
                    result: result.clone(),
                },
            )
            .map_err(|e| e.to_string())
        });
    if let Err(e) = saved {
        // The measurement stands; only its keeping failed.
        tracing::warn!(to = %to, error = %e, "probe.save_failed");
    }
    Ok(result)
}

/// The last probe to each node (kept in DATA_DIR/estimates/probes/).
pub fn list(ctx: &Arc<AgentCtx>) -> Vec<ProbeResult> {
    let Ok(rd) = std::fs::read_dir(dir(ctx)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in rd.flatten() {
        let p = f.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if Name::parse(stem).is_err() {
            continue;
        }
        match crate::store::load::<SavedProbe>(&p) {
            Ok(Some(s)) if s.result.to == stem => out.push(s.result),
            Ok(_) => {}
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "probe.record_unreadable"),
        }
    }
    out.sort_by(|a, b| a.to.cmp(&b.to));
    out
}

/// The last probe to `node`, if any.
pub fn last(ctx: &Arc<AgentCtx>, node: &str) -> Option<ProbeResult> {
    let node = Name::parse(node).ok()?.into_string();
    let p = dir(ctx).join(format!("{node}.json"));
    match crate::store::load::<SavedProbe>(&p) {
        Ok(Some(s)) if s.result.to == node => Some(s.result),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "probe.record_unreadable");
            None
        }
    }
}
