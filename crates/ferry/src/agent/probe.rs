//! `ferry estimate probe`: the replication link's throughput and round
//! trip to a peer, measured over the real mutual-TLS replication transport
//! while the workloads keep running. (Being built: see issue 21.)

use std::sync::Arc;

use ferry_api::reply::{ProbeLoad, ProbeResult};
use ferry_api::request::ProbeLink;
use ferry_api::ActionError;

use crate::agent::AgentCtx;

/// Runs a probe to `req.to` (blocking: call it off the async runtime).
pub fn run(
    ctx: &Arc<AgentCtx>,
    req: ProbeLink,
    under_load: Vec<ProbeLoad>,
) -> Result<ProbeResult, ActionError> {
    let _ = (ctx, under_load);
    Err(ActionError::new(
        ferry_api::ErrorKind::Conflict,
        format!("the link probe to {} is not built yet", req.to),
    ))
}

/// The last probe to each node (kept in DATA_DIR/estimates/probes/).
pub fn list(ctx: &Arc<AgentCtx>) -> Vec<ProbeResult> {
    let _ = ctx;
    Vec::new()
}

/// The last probe to `node`, if any.
pub fn last(ctx: &Arc<AgentCtx>, node: &str) -> Option<ProbeResult> {
    list(ctx).into_iter().find(|p| p.to == node)
}
