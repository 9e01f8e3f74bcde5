//! What this node last heard from each paired node: asked every
//! `api.peer_probe_interval_ms` (`GET /api/v1/node` over the pinned mutual
//! TLS), on its own thread, so that listing nodes (the console's overview,
//! each event stream once a second) never waits for a peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::{Action, Reply};

use super::AgentCtx;
use crate::transport::client::ApiClient;

/// A probe's answer must come within this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The last probe of one peer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// Whether the last probe was answered.
    pub up: bool,
    /// Its version, from the last answered probe.
    pub version: Option<String>,
    /// Since when `up` has been what it is (Unix ms): a node list changes
    /// only when a peer comes, goes or is upgraded, so the console's event
    /// stream sends nothing new on every probe.
    pub since_unix_ms: u64,
    /// Why the last probe failed.
    pub error: Option<String>,
}

/// Every peer's last probe, by name.
#[derive(Debug, Default)]
pub struct PeerWatch(Mutex<HashMap<String, Seen>>);

impl PeerWatch {
    pub fn get(&self, peer: &str) -> Option<Seen> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }

    fn answered(&self, peer: &str, version: String, now_ms: u64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(peer.to_string()).or_default();
        if !s.up || s.since_unix_ms == 0 {
            s.since_unix_ms = now_ms;
        }
        s.up = true;
        s.version = Some(version);
        s.error = None;
    }

    fn failed(&self, peer: &str, error: String, now_ms: u64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(peer.to_string()).or_default();
        if s.up || s.since_unix_ms == 0 {
            s.since_unix_ms = now_ms;
        }
        s.up = false;
        s.error = Some(error);
    }
}

/// One round: every registered peer asked once.
pub fn probe_all(ctx: &AgentCtx) {
    for p in ctx.peers.list() {
        let answer = ApiClient::to_peer(&ctx.identity, &p)
            .map(|c| c.with_timeout(PROBE_TIMEOUT))
            .and_then(|c| c.send(&Action::GetNode));
        let now = crate::sys::unix_ms();
        match answer {
            Ok(Reply::Node(n)) => ctx.peer_watch.answered(&p.name, n.version, now),
            Ok(_) => ctx
                .peer_watch
                .failed(&p.name, "an answer that is not a node's".into(), now),
            Err(e) => ctx.peer_watch.failed(&p.name, format!("{e:#}"), now),
        }
    }
}

/// Probes the peers every `api.peer_probe_interval_ms`, on thread `peer-watch`.
pub fn spawn(ctx: Arc<AgentCtx>) -> std::io::Result<()> {
    let every = Duration::from_millis(ctx.cfg.api.peer_probe_interval_ms);
    std::thread::Builder::new()
        .name("peer-watch".into())
        .spawn(move || loop {
            probe_all(&ctx);
            std::thread::sleep(every);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_probe_keeps_the_last_version_and_says_why_and_since_when() {
        let w = PeerWatch::default();
        assert_eq!(w.get("b"), None);
        w.answered("b", "0.1.0".into(), 1000);
        w.answered("b", "0.1.0".into(), 6000);
        assert_eq!(
            w.get("b").unwrap().since_unix_ms,
            1000,
            "still up: unchanged"
        );
        w.failed("b", "connection refused".into(), 11000);
        w.failed("b", "connection refused".into(), 16000);
        let s = w.get("b").unwrap();
        assert!(!s.up);
        assert_eq!(s.version.as_deref(), Some("0.1.0"));
        assert_eq!(s.since_unix_ms, 11000, "down since the first failure");
        assert_eq!(s.error.as_deref(), Some("connection refused"));
        w.answered("b", "0.2.0".into(), 21000);
        let s = w.get("b").unwrap();
        assert_eq!((s.up, s.since_unix_ms, s.error), (true, 21000, None));
    }
}
