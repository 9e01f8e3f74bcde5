//! The history sampler: a thread (`ferry-history`) that every
//! `history.sample_interval_ms` takes one sample of every series this node
//! has and gives them to the [`HistoryStore`](crate::history::HistoryStore):
//!
//! - per primary volume: `write_bytes_per_s`, `link_bytes_per_s`,
//!   `backlog_bytes` (dirty + queued), `write_iops`, `write_latency_p99_ms`
//!   (the upper bound of the latency histogram bucket holding the 99th
//!   percentile of the interval's writes; no write, no sample),
//!   `resync_percent`;
//! - per primary share: `write_bytes_per_s`, `link_bytes_per_s`,
//!   `backlog_bytes`, `lag_seconds` (age of the oldest change not yet sent);
//! - per workload with a primary volume or share here: the sums, its lag
//!   (backlog / link rate) and its least `resync_percent`, and the median
//!   and 99th percentile of its lag probed ten times per sample
//!   (`lag_p50_seconds`, `lag_p99_seconds`: a burst shorter than the
//!   sample interval shows in them, not in the sample's own lag);
//! - the node: the sums over its primaries.
//!
//! Rates are counter deltas over the monotonic time between two samples;
//! the first sample of a volume or share only sets its counters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_core::history::{Metric, Scope, SeriesName};
use ferry_core::Name;

use crate::agent::AgentCtx;
use crate::volume::primary::LATENCY_BUCKETS_US;

/// Counters of one volume or share at the last sample.
#[derive(Debug, Clone, Default)]
struct Counters {
    written: u64,
    sent: u64,
    writes: u64,
    latency: Vec<u64>,
}

/// One object's values of one sample.
#[derive(Debug, Clone, Copy, Default)]
struct Values {
    write: f64,
    link: f64,
    backlog: f64,
    iops: f64,
}

/// The sampler's memory between samples.
#[derive(Default)]
pub struct Sampler {
    last: HashMap<(Scope, String), (Instant, Counters)>,
    lag: LagProbe,
}

/// Probes of each workload's lag between two samples.
#[derive(Default)]
struct LagProbe {
    /// Each workload's volumes and shares, as of the last sample.
    members: Vec<(String, Vec<String>, Vec<String>)>,
    /// Each primary volume at its last probe.
    vols: HashMap<String, VolProbe>,
    /// The lags probed since the last sample, by workload.
    probes: HashMap<String, Vec<f64>>,
}

/// One volume at its last probe.
struct VolProbe {
    at: Instant,
    sent: u64,
    written: u64,
    backlog: u64,
    /// Whether the last probe saw it.
    seen: bool,
}

/// The `q`-quantile (0..=1) of `v` by the nearest rank (sorts `v`).
pub fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// A workload's lag from its volumes' backlog and link rate and its
/// shares' own lag: what is waiting at the rate it leaves (0 when nothing
/// waits; unknown when something waits and nothing leaves).
fn workload_lag(backlog: f64, link: f64, share_lag: f64) -> Option<f64> {
    let vol = if backlog == 0.0 {
        Some(0.0)
    } else if link > 1.0 {
        Some(backlog / link)
    } else {
        None
    };
    vol.map(|l| l.max(share_lag))
}

impl LagProbe {
    /// One probe of every workload's lag; `full`: read every volume's link
    /// (else an idle one — nothing written since a probe that found nothing
    /// waiting — counts as 0 without its lock; a resync that starts without
    /// a write shows at the next full probe, one per sample).
    fn probe(&mut self, ctx: &AgentCtx, full: bool) {
        let now = Instant::now();
        let mut vols: HashMap<String, (f64, Option<f64>)> = HashMap::new();
        for p in self.vols.values_mut() {
            p.seen = false;
        }
        for v in ctx.primaries() {
            let written = v.bytes_written();
            if let Some(p) = self.vols.get_mut(&v.name) {
                p.seen = true;
                // Nothing written since a probe that found nothing waiting:
                // nothing waits now (no lock taken: most volumes are idle).
                if !full && p.written == written && p.backlog == 0 {
                    vols.insert(v.name.clone(), (0.0, Some(0.0)));
                    continue;
                }
            }
            let (backlog, sent) = {
                let l = v.link.lock();
                let st = l.rep.status();
                (st.dirty_bytes + st.backlog_bytes, l.stats.bytes_sent)
            };
            let probe = VolProbe {
                at: now,
                sent,
                written,
                backlog,
                seen: true,
            };
            let rate = match self.vols.insert(v.name.clone(), probe) {
                Some(before) => {
                    let dt = now.duration_since(before.at).as_secs_f64();
                    (dt > 0.0).then(|| sent.saturating_sub(before.sent) as f64 / dt)
                }
                None => None,
            };
            vols.insert(v.name.clone(), (backlog as f64, rate));
        }
        self.vols.retain(|_, p| p.seen);
        let shares = ctx.shares.primaries();
        for (w, volumes, share_names) in &self.members {
            let (mut backlog, mut link, mut known) = (0.0, 0.0, true);
            for v in volumes {
                if let Some((b, r)) = vols.get(v) {
                    backlog += b;
                    match r {
                        Some(r) => link += r,
                        None => known = false,
                    }
                }
            }
            let mut share_lag: f64 = 0.0;
            for s in share_names {
                if let Some(r) = shares.get(s) {
                    let l = r.share.link();
                    let lag = [l.pending_since, l.pass_since]
                        .iter()
                        .flatten()
                        .map(|t| t.elapsed().as_secs_f64())
                        .fold(0.0, f64::max);
                    share_lag = share_lag.max(lag);
                }
            }
            if !known {
                continue;
            }
            if let Some(l) = workload_lag(backlog, link, share_lag) {
                self.probes.entry(w.clone()).or_default().push(l);
            }
        }
    }

    /// The probes' (p50, p99) of `workload` since the last sample.
    fn take(&mut self, workload: &str) -> Option<(f64, f64)> {
        let mut v = self.probes.remove(workload)?;
        Some((quantile(&mut v, 0.5)?, quantile(&mut v, 0.99)?))
    }
}

fn series(scope: Scope, name: &str, metric: Metric) -> Option<SeriesName> {
    SeriesName::new(scope, Name::parse(name).ok()?, metric).ok()
}

/// The upper bound (ms) of the bucket holding the 99th percentile of the
/// counts in `delta` (per bucket; the last is above the last bound).
pub fn p99_ms(delta: &[u64]) -> Option<f64> {
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let want = total - total / 100; // at least 99% at or below
    let mut cum = 0;
    for (i, n) in delta.iter().enumerate() {
        cum += n;
        if cum >= want {
            // Above the last bound: report the last bound (a lower bound).
            let us = LATENCY_BUCKETS_US
                .get(i)
                .or(LATENCY_BUCKETS_US.last())
                .copied()
                .unwrap_or(0);
            return Some(us as f64 / 1000.0);
        }
    }
    None
}

impl Sampler {
    /// Rates since the last sample of `key` (None on its first).
    fn rates(
        &mut self,
        key: (Scope, String),
        now: Instant,
        c: Counters,
    ) -> Option<(Values, Vec<u64>)> {
        let prev = self.last.insert(key, (now, c.clone()));
        let (t, p) = prev?;
        let dt = now.duration_since(t).as_secs_f64();
        if dt <= 0.0 {
            return None;
        }
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        let lat = c
            .latency
            .iter()
            .zip(p.latency.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        Some((
            Values {
                write: d(c.written, p.written),
                link: d(c.sent, p.sent),
                backlog: 0.0,
                iops: d(c.writes, p.writes),
            },
            lat,
        ))
    }

    /// One sample of every series of this node.
    pub fn sample(&mut self, ctx: &AgentCtx) -> Vec<(SeriesName, f64)> {
        let now = Instant::now();
        let mut out: Vec<(SeriesName, f64)> = Vec::new();
        let mut push = |scope: Scope, name: &str, m: Metric, v: f64| {
            if let Some(s) = series(scope, name, m) {
                out.push((s, v));
            }
        };
        let mut by_volume: HashMap<String, (Values, f64)> = HashMap::new();
        let mut by_share: HashMap<String, Values> = HashMap::new();
        let mut share_lag: HashMap<String, f64> = HashMap::new();
        let mut node = Values::default();
        for v in ctx.primaries() {
            let (backlog, sent, resync_pct) = {
                let l = v.link.lock();
                let st = l.rep.status();
                let total = l.stats.resync_total_bytes.max(st.dirty_bytes);
                let pct = if total == 0 {
                    100.0
                } else {
                    100.0 * (total - st.dirty_bytes.min(total)) as f64 / total as f64
                };
                (st.dirty_bytes + st.backlog_bytes, l.stats.bytes_sent, pct)
            };
            let latency: Vec<u64> = v
                .write_latency
                .buckets
                .iter()
                .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
                .collect();
            let c = Counters {
                written: v.bytes_written(),
                sent,
                writes: latency.iter().sum(),
                latency,
            };
            let name = v.name.clone();
            push(Scope::Volume, &name, Metric::BacklogBytes, backlog as f64);
            push(Scope::Volume, &name, Metric::ResyncPercent, resync_pct);
            node.backlog += backlog as f64;
            let Some((mut vals, lat)) = self.rates((Scope::Volume, name.clone()), now, c) else {
                continue;
            };
            vals.backlog = backlog as f64;
            push(Scope::Volume, &name, Metric::WriteBytesPerS, vals.write);
            push(Scope::Volume, &name, Metric::LinkBytesPerS, vals.link);
            push(Scope::Volume, &name, Metric::WriteIops, vals.iops);
            if let Some(p99) = p99_ms(&lat) {
                push(Scope::Volume, &name, Metric::WriteLatencyP99Ms, p99);
            }
            node.write += vals.write;
            node.link += vals.link;
            node.iops += vals.iops;
            by_volume.insert(name, (vals, resync_pct));
        }
        let shares: Vec<(String, Arc<crate::share::primary::PrimaryShare>)> = ctx
            .shares
            .primaries()
            .iter()
            .map(|(n, r)| (n.clone(), r.share.clone()))
            .collect();
        for (name, sh) in shares {
            let load =
                |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            let sent = load(&sh.stats.bytes_sent);
            let written =
                sent.saturating_sub(load(&sh.stats.resync_bytes)) + load(&sh.stats.pumped_bytes);
            let (backlog, lag) = {
                let l = sh.link();
                let lag = [l.pending_since, l.pass_since]
                    .iter()
                    .flatten()
                    .map(|t| t.elapsed().as_secs_f64())
                    .fold(0.0, f64::max);
                (l.queued_bytes + l.inflight_bytes, lag)
            };
            push(Scope::Share, &name, Metric::BacklogBytes, backlog as f64);
            push(Scope::Share, &name, Metric::LagSeconds, lag);
            share_lag.insert(name.clone(), lag);
            node.backlog += backlog as f64;
            let c = Counters {
                written,
                sent,
                ..Counters::default()
            };
            let Some((mut vals, _)) = self.rates((Scope::Share, name.clone()), now, c) else {
                continue;
            };
            vals.backlog = backlog as f64;
            push(Scope::Share, &name, Metric::WriteBytesPerS, vals.write);
            push(Scope::Share, &name, Metric::LinkBytesPerS, vals.link);
            node.write += vals.write;
            node.link += vals.link;
            by_share.insert(name, vals);
        }
        let workloads = crate::workload::list_workloads(&ctx.cfg.data_dir).unwrap_or_default();
        let mut members = Vec::with_capacity(workloads.len());
        for w in workloads {
            members.push((
                w.name.to_string(),
                w.volumes.iter().map(|v| v.to_string()).collect(),
                w.shares.iter().map(|s| s.to_string()).collect(),
            ));
            if let Some((p50, p99)) = self.lag.take(w.name.as_str()) {
                push(Scope::Workload, w.name.as_str(), Metric::LagP50Seconds, p50);
                push(Scope::Workload, w.name.as_str(), Metric::LagP99Seconds, p99);
            }
            let mut sum = Values::default();
            let mut resync: Option<f64> = None;
            let mut lag: f64 = 0.0;
            let mut any = false;
            for v in &w.volumes {
                if let Some((vals, pct)) = by_volume.get(v.as_str()) {
                    any = true;
                    sum.write += vals.write;
                    sum.link += vals.link;
                    sum.backlog += vals.backlog;
                    sum.iops += vals.iops;
                    resync = Some(resync.map_or(*pct, |r: f64| r.min(*pct)));
                }
            }
            for s in &w.shares {
                if let Some(vals) = by_share.get(s.as_str()) {
                    any = true;
                    sum.write += vals.write;
                    sum.link += vals.link;
                    sum.backlog += vals.backlog;
                }
                lag = lag.max(share_lag.get(s.as_str()).copied().unwrap_or(0.0));
            }
            if !any {
                continue;
            }
            let name = w.name.as_str();
            push(Scope::Workload, name, Metric::WriteBytesPerS, sum.write);
            push(Scope::Workload, name, Metric::LinkBytesPerS, sum.link);
            push(Scope::Workload, name, Metric::BacklogBytes, sum.backlog);
            push(Scope::Workload, name, Metric::WriteIops, sum.iops);
            if let Some(r) = resync {
                push(Scope::Workload, name, Metric::ResyncPercent, r);
            }
            if let Some(l) = workload_lag(sum.backlog, sum.link, lag) {
                push(Scope::Workload, name, Metric::LagSeconds, l);
            }
        }
        self.lag.members = members;
        self.lag.probes.clear();
        let me = ctx.identity.node_name.clone();
        push(Scope::Node, &me, Metric::WriteBytesPerS, node.write);
        push(Scope::Node, &me, Metric::LinkBytesPerS, node.link);
        push(Scope::Node, &me, Metric::BacklogBytes, node.backlog);
        push(Scope::Node, &me, Metric::WriteIops, node.iops);
        // Forget objects that are gone.
        let live: std::collections::HashSet<(Scope, String)> = out
            .iter()
            .map(|(s, _)| (s.scope, s.name.as_str().to_string()))
            .collect();
        self.last.retain(|k, _| live.contains(k));
        out
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Starts the sampler thread (`ferry-history`), if history is enabled.
pub fn spawn(ctx: Arc<AgentCtx>) -> std::io::Result<()> {
    let Some(store) = ctx.history.clone() else {
        return Ok(());
    };
    let interval = Duration::from_millis(store.settings().sample_interval_ms);
    std::thread::Builder::new()
        .name("ferry-history".into())
        .spawn(move || {
            let mut s = Sampler::default();
            let mut next = Instant::now();
            // Ten lag probes per sample, the last one just before it.
            let probe_every = interval / 10;
            loop {
                next += interval;
                for i in (0..10u32).rev() {
                    let at = next - probe_every * i;
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    s.lag.probe(&ctx, i == 0);
                }
                let samples = s.sample(&ctx);
                let r = store.record(unix_now(), &samples);
                if r.dropped > 0 {
                    tracing::debug!(dropped = r.dropped, "history.samples_dropped");
                }
                let now = Instant::now();
                if next + interval / 2 < now {
                    // Late (a stalled disk): skip the missed ticks.
                    next = now;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        assert_eq!(quantile(&mut [], 0.5), None);
        let mut v = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 9.0, 7.0, 8.0];
        assert_eq!(quantile(&mut v, 0.5), Some(5.0));
        assert_eq!(quantile(&mut v, 0.99), Some(10.0));
        assert_eq!(quantile(&mut [0.25], 0.99), Some(0.25));
    }

    #[test]
    fn a_workload_lags_by_its_backlog_over_its_link_rate() {
        assert_eq!(workload_lag(0.0, 0.0, 0.0), Some(0.0));
        assert_eq!(workload_lag(1000.0, 500.0, 0.0), Some(2.0));
        assert_eq!(workload_lag(1000.0, 500.0, 3.5), Some(3.5));
        assert_eq!(workload_lag(1000.0, 0.0, 0.0), None, "nothing leaves");
    }

    #[test]
    fn p99_is_the_bucket_of_the_99th_percentile() {
        let mut d = vec![0u64; LATENCY_BUCKETS_US.len() + 1];
        assert_eq!(p99_ms(&d), None);
        d[0] = 990; // ≤ 50 µs
        d[7] = 10; // ≤ 10 ms
        assert_eq!(p99_ms(&d), Some(0.05));
        d[7] = 11;
        assert_eq!(p99_ms(&d), Some(10.0));
        d[12] = 1000; // above 1 s
        assert_eq!(p99_ms(&d), Some(1000.0));
    }
}
