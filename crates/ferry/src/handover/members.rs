//! The handover's [`Member`]s: a volume (the primary here and its replica on
//! the target, reached through the target's API) and a share. Each is built
//! with everything it needs — the engine's handle, a client for the target,
//! its settings, and the demotion the node performs — so the handover never
//! needs the agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use ferry_core::handover::Comparison;
use serde_json::json;

use super::{Member, Node};
use crate::share::primary::PrimaryShare;
use crate::share::tree::DigestCache;
use crate::transport::client::ApiClient;
use crate::volume::primary::PrimaryVolume;

/// The node's demotion of one member to the target's replica (it changes
/// the node's registries, so the node performs it).
pub type Demote = Box<dyn Fn() -> anyhow::Result<()> + Send + Sync>;

/// A volume this node serves, replicating to the handover's target.
pub struct VolumeMember {
    vol: Arc<PrimaryVolume>,
    client: ApiClient,
    target: String,
    /// Bytes per Merkle leaf (the dirty map's block).
    granularity: u64,
    demote: Option<Demote>,
    /// The blocks the last comparison found different.
    differing: std::sync::Mutex<Vec<u64>>,
}

impl VolumeMember {
    pub fn new(
        vol: Arc<PrimaryVolume>,
        client: ApiClient,
        target: &str,
        granularity: u64,
        demote: Option<Demote>,
    ) -> VolumeMember {
        VolumeMember {
            vol,
            client,
            target: target.to_string(),
            granularity,
            demote,
            differing: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl Member for VolumeMember {
    fn label(&self) -> String {
        format!("volume {}", self.vol.name)
    }

    /// Both sides' leaf hashes, at once: right after seeding the
    /// background hasher may still be behind by gigabytes.
    fn prehash(&self) {
        let v = &self.vol;
        std::thread::scope(|sc| {
            let remote = sc.spawn(|| {
                self.client
                    .get(&format!("/api/v1/volumes/{}/hashes?warm=1", v.name))
            });
            if let Err(e) = v.leaves.current(&v.local) {
                tracing::warn!(volume = %v.name, error = %e, "cutover.prehash_failed");
            }
            let _ = remote.join();
        });
    }

    fn flush(&self, timeout: Duration, why: &str) {
        let v = &self.vol;
        match v.flush_link(timeout) {
            Ok(Some(took)) => {
                tracing::debug!(volume = %v.name, why, ms = took.as_millis() as u64, "replication.link.flushed")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(volume = %v.name, why, error = %e, "replication.link.flush_failed")
            }
        }
    }

    fn freeze(&self) {
        self.vol.freeze();
    }

    fn unfreeze(&self) {
        self.vol.unfreeze();
    }

    fn drain(&self, timeout: Duration) -> Result<(), String> {
        self.vol.drain(timeout)
    }

    /// Both sides' Merkle leaves, hashed at the same time.
    fn compare(&self) -> Comparison {
        let v = &self.vol;
        let g = self.granularity;
        let (local, remote) = std::thread::scope(|sc| {
            let remote = sc.spawn(|| {
                self.client
                    .get(&format!("/api/v1/volumes/{}/hashes", v.name))
            });
            let local = v.leaves.current(&v.local);
            (
                local,
                remote
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("hash fetch panicked"))),
            )
        });
        let local = match local {
            Ok(l) => l,
            Err(e) => return Comparison::Failed(format!("reading volume {}: {e:#}", v.name)),
        };
        let remote = match remote {
            Ok(r) => r,
            Err(e) => {
                return Comparison::Failed(format!(
                    "{} did not send its hashes of {}: {e:#}",
                    self.target, v.name
                ))
            }
        };
        let remote: Vec<&str> = remote["hashes"]
            .as_array()
            .map(|a| a.iter().filter_map(|h| h.as_str()).collect())
            .unwrap_or_default();
        let differing: Vec<u64> = local
            .iter()
            .enumerate()
            .filter(|(i, h)| remote.get(*i).is_none_or(|r| *r != h.to_hex().as_str()))
            .map(|(i, _)| i as u64)
            .collect();
        if differing.is_empty() && remote.len() == local.len() {
            return Comparison::Equal;
        }
        let why = format!(
            "Merkle roots of {} differ in {} blocks (first at byte {:?}): the target is not equal; those blocks are being resent",
            v.name,
            differing.len(),
            differing.first().map(|b| b * g)
        );
        *self.differing.lock().unwrap_or_else(|p| p.into_inner()) = differing;
        Comparison::Differs(why)
    }

    /// The target is inconsistent over the differing blocks until they are
    /// resent; the link resends them like any dirty range.
    fn resend(&self) {
        let v = &self.vol;
        let g = self.granularity;
        let differing =
            std::mem::take(&mut *self.differing.lock().unwrap_or_else(|p| p.into_inner()));
        if let Err(e) = self.client.post(
            &format!("/api/v1/volumes/{}/inconsistent", v.name),
            &json!({}),
        ) {
            tracing::warn!(volume = %v.name, error = %format!("{e:#}"), "handover.mark_inconsistent_failed");
        }
        {
            let size = ferry_nbd::BlockDevice::size(&v.local);
            let mut l = v.link.lock();
            // Up to date again only after a new announcement.
            l.announced_up_to_date = false;
            for b in &differing {
                let offset = b * g;
                if offset < size {
                    l.rep.resync_extent(ferry_core::Extent {
                        offset,
                        length: g.min(size - offset),
                    });
                }
            }
        }
        v.link.copier.notify_all();
    }

    fn close_gate(&self) {
        self.vol.close_gate();
    }

    fn target_serves(&self) -> bool {
        self.client
            .get(&format!("/api/v1/replications/{}", self.vol.name))
            .is_ok_and(|s| s["role"] == "primary")
    }

    fn demote(&self) -> Result<(), String> {
        let d = self
            .demote
            .as_ref()
            .ok_or_else(|| format!("{} is not demoted by this handover", self.label()))?;
        d().map_err(|e| format!("{e:#}"))
    }
}

/// A share this node serves, replicating to the handover's target.
pub struct ShareMember {
    share: Arc<PrimaryShare>,
    client: ApiClient,
    target: String,
    /// The share's file hashes, kept between digests.
    cache: Arc<DigestCache>,
    /// An async share's watcher batches changes this long
    /// (`shares.watch_batch_delay_ms`).
    watch_batch_delay_ms: u64,
    /// `cutover` / `switchover`, for the record of a distrusted replica.
    occasion: &'static str,
    demote: Option<Demote>,
}

impl ShareMember {
    pub fn new(
        share: Arc<PrimaryShare>,
        client: ApiClient,
        target: &str,
        cache: Arc<DigestCache>,
        watch_batch_delay_ms: u64,
        occasion: &'static str,
        demote: Option<Demote>,
    ) -> ShareMember {
        ShareMember {
            share,
            client,
            target: target.to_string(),
            cache,
            watch_batch_delay_ms,
            occasion,
            demote,
        }
    }

    /// The digests here and on the target, taken at the same time.
    fn digests(&self) -> (anyhow::Result<String>, anyhow::Result<serde_json::Value>) {
        let name = &self.share.name;
        std::thread::scope(|sc| {
            let remote = sc.spawn(|| self.client.get(&format!("/api/v1/shares/{name}/digest")));
            let local = self
                .share
                .tree
                .digest(&self.cache)
                .map(|(h, _, _)| h.to_hex().to_string())
                .map_err(anyhow::Error::from);
            (
                local,
                remote
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("digest fetch panicked"))),
            )
        })
    }
}

impl Member for ShareMember {
    fn label(&self) -> String {
        format!("share {}", self.share.name)
    }

    /// Both trees' file hashes: inside the downtime the digest reads only
    /// files changed from here on.
    fn prehash(&self) {
        if let (Err(e), _) | (_, Err(e)) = self.digests() {
            tracing::warn!(share = %self.share.name, error = %format!("{e:#}"), "cutover.prehash_failed");
        }
    }

    /// A share's replica makes each operation durable as it applies it
    /// (sync) or is drained whole (async): nothing to do early.
    fn flush(&self, _timeout: Duration, _why: &str) {}

    fn freeze(&self) {
        self.share.freeze();
    }

    fn unfreeze(&self) {
        self.share.unfreeze();
    }

    /// An async share first waits until the watcher's last changes are sent
    /// (a stop hook may have written just before); then both modes wait for
    /// a flush durable on the replica with nothing after it.
    fn drain(&self, timeout: Duration) -> Result<(), String> {
        let s = &self.share;
        let deadline = Instant::now() + timeout;
        if !s.mode_sync() {
            // Events still in the watcher's batch window.
            std::thread::sleep(Duration::from_millis(self.watch_batch_delay_ms * 2));
            while !s.caught_up() {
                if Instant::now() > deadline {
                    return Err(format!(
                        "the watcher's changes were not all sent within {timeout:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        s.drain(deadline.saturating_duration_since(Instant::now()))
    }

    /// Every entry and every file's content, both sides at once.
    fn compare(&self) -> Comparison {
        let name = &self.share.name;
        let (local, remote) = self.digests();
        let local = match local {
            Ok(l) => l,
            Err(e) => return Comparison::Failed(format!("reading share {name}: {e:#}")),
        };
        let remote = match remote {
            Ok(r) => r,
            Err(e) => {
                return Comparison::Failed(format!(
                    "{} did not send the digest of share {name}: {e:#}",
                    self.target
                ))
            }
        };
        if remote["digest"].as_str() == Some(local.as_str()) {
            return Comparison::Equal;
        }
        Comparison::Differs(format!(
            "the tree of share {name} differs on {}: it is being compared again whole",
            self.target
        ))
    }

    /// Nothing says where the trees differ: the whole tree is compared
    /// again, every file by content.
    fn resend(&self) {
        self.share.distrust_replica(&format!(
            "the tree's digest differed from the replica's at a {}: comparing the whole tree by content",
            self.occasion
        ));
    }

    fn close_gate(&self) {
        self.share.close_gate();
    }

    fn target_serves(&self) -> bool {
        self.client
            .get(&format!("/api/v1/shares/{}?counts=0", self.share.name))
            .is_ok_and(|st| st["serving"] == true)
    }

    fn demote(&self) -> Result<(), String> {
        let d = self
            .demote
            .as_ref()
            .ok_or_else(|| format!("{} is not demoted by this handover", self.label()))?;
        d().map_err(|e| format!("{e:#}"))
    }
}

/// The handover members of `spec` (its volumes, then its shares; each a
/// primary here) towards `target`, which `client` reaches. `demote`: the
/// handover demotes them to the target's replicas (a cutover; a
/// switchover's demotion is the cluster manager's).
pub fn handover_members<H: Node + ?Sized>(
    ctx: &Arc<H>,
    spec: &crate::workload::WorkloadSpec,
    client: &crate::transport::client::ApiClient,
    target: &str,
    occasion: &'static str,
    demote: bool,
) -> Result<Vec<Box<dyn Member>>> {
    let mut members: Vec<Box<dyn Member>> = Vec::new();
    let volumes = primaries(&**ctx, spec)?;
    let shares = share_primaries(&**ctx, spec)?;
    for v in volumes {
        let d: Option<Demote> = demote.then(|| {
            let (c, n, t) = (ctx.clone(), v.name.clone(), target.to_string());
            Box::new(move || c.clone().demote_volume(&n, &t)) as Demote
        });
        members.push(Box::new(VolumeMember::new(
            v,
            client.clone(),
            target,
            ctx.cfg().replication.granularity_bytes,
            d,
        )));
    }
    for s in shares {
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
            ctx.cfg().shares.watch_batch_delay_ms,
            occasion,
            d,
        )));
    }
    Ok(members)
}

/// The workload's volumes, each a primary on this node.
pub fn primaries<H: Node + ?Sized>(
    ctx: &H,
    spec: &crate::workload::WorkloadSpec,
) -> Result<Vec<Arc<PrimaryVolume>>> {
    spec.volumes
        .iter()
        .map(|v| {
            ctx.primary(v)
                .ok_or_else(|| anyhow!("volume {v:?} is not a primary here"))
        })
        .collect()
}

/// The workload's shares, each a primary on this node.
pub fn share_primaries<H: Node + ?Sized>(
    ctx: &H,
    spec: &crate::workload::WorkloadSpec,
) -> Result<Vec<Arc<PrimaryShare>>> {
    spec.shares
        .iter()
        .map(|s| crate::share::primary_here(ctx, s))
        .collect()
}
