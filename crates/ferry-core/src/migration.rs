//! The migration lifecycle of a workload, sans-IO: phases, convergence and
//! auto-converge, fed with samples of its link(s) by the edge.
//!
//! ```text
//!  seeding ──▶ syncing ──▶ ready ──▶ cutting-over ──▶ completed
//!     │           ▲  │        │            │
//!     │           └──┼────────┘ (fell back) ├──▶ rolled-back (aborted before the commit point)
//!     └──────────────┴─────────────────────┴──▶ failed
//! ```
//!
//! * `seeding`: the initial copy of the volumes is running;
//! * `syncing`: the copy is done but the replica is not up to date (writes
//!   outrun the link, or it reconnected);
//! * `ready`: up to date; a cutover may start;
//! * `cutting-over` → `completed` once the target is serving, or
//!   `rolled-back` when the cutover aborted before the commit point.
//!
//! Convergence: while not ready, the machine keeps the last
//! `not_converging_after_ms` of samples and fits the trend of
//! `bytes_remaining` over them (least squares). The **dirty rate** is what
//! writes add to the bytes still to send (copy rate + that trend), the
//! **copy rate** what the copier sends of them. Once the window is full, a
//! backlog that does not shrink by at least 10% of the copy rate reports
//! `not-converging` (cleared when it shrinks by 25% or more, or at ready).
//! The application's own write rate is not the measure: in sync mode its
//! writes are streamed as they come and never wait in the backlog, and one
//! small write dirties a whole block (the replication granularity) that the
//! copier must send again. With auto-converge, the
//! source's writes are then slowed stepwise (a throttle percentage the edge
//! applies by delaying NBD write replies): 20% first, +10% per step, up to
//! `throttle_pct_max`, and released once ready.

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    Seeding,
    Syncing,
    Ready,
    CuttingOver,
    Completed,
    RolledBack,
    Failed,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Seeding => "seeding",
            MigrationPhase::Syncing => "syncing",
            MigrationPhase::Ready => "ready",
            MigrationPhase::CuttingOver => "cutting-over",
            MigrationPhase::Completed => "completed",
            MigrationPhase::RolledBack => "rolled-back",
            MigrationPhase::Failed => "failed",
        }
    }

    /// No more transitions.
    pub fn is_final(self) -> bool {
        matches!(self, MigrationPhase::Completed | MigrationPhase::Failed)
    }
}

/// Tunables of convergence, each with its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvergeConfig {
    /// The dirty rate must stay above the send rate this long to report it.
    pub not_converging_after_ms: u64,
    /// Auto-converge raises the throttle this often while not converging.
    pub throttle_step_ms: u64,
    pub throttle_initial_pct: u8,
    pub throttle_step_pct: u8,
    pub throttle_pct_max: u8,
}

impl Default for ConvergeConfig {
    fn default() -> Self {
        ConvergeConfig {
            not_converging_after_ms: 5_000,
            throttle_step_ms: 2_000,
            throttle_initial_pct: 20,
            throttle_step_pct: 10,
            throttle_pct_max: 90,
        }
    }
}

/// What the edge observed of the workload's links at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkSample {
    pub now_ms: u64,
    /// Every link is connected.
    pub connected: bool,
    /// Every replica is up to date.
    pub up_to_date: bool,
    /// The initial copy is still running on some volume.
    pub seeding: bool,
    /// Bytes the replicas still lack (dirty + unsent).
    pub bytes_remaining: u64,
    /// Counters since the migration began (monotonic).
    pub bytes_sent_total: u64,
    pub bytes_written_total: u64,
    /// What the copier sent of the dirty blocks (monotonic).
    pub bytes_copied_total: u64,
}

/// Why a cutover cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CutoverRefused {
    #[error("the migration is {0}, not ready: wait until the replica is up to date (`ferry migrate status`)")]
    NotReady(&'static str),
}

/// One workload's migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub phase: MigrationPhase,
    pub auto_converge: bool,
    pub converge: ConvergeConfig,
    /// Reported while the dirty rate outruns the link.
    pub not_converging: bool,
    /// Percent of the source's write rate held back (auto-converge).
    pub throttle_pct: u8,
    /// Smoothed rates, bytes/s.
    pub send_rate_bytes_per_s: f64,
    pub write_rate_bytes_per_s: f64,
    /// Over the convergence window: what writes add to the bytes still to
    /// send, and what the copier sends of them (bytes/s).
    #[serde(default)]
    pub dirty_rate_bytes_per_s: f64,
    #[serde(default)]
    pub copy_rate_bytes_per_s: f64,
    pub bytes_remaining: u64,
    /// Why it failed or rolled back.
    pub reason: Option<String>,
    #[serde(skip)]
    last: Option<LinkSample>,
    #[serde(skip)]
    last_step_ms: u64,
    /// The last `not_converging_after_ms` of (now_ms, bytes_remaining,
    /// bytes_copied_total).
    #[serde(skip)]
    window: std::collections::VecDeque<(u64, u64, u64)>,
}

/// The backlog must shrink by this share of the copy rate to count as
/// converging…
pub const CONVERGING_SHRINK: f64 = 0.10;
/// …and by this share to clear a `not_converging` already reported.
const CONVERGED_SHRINK: f64 = 0.25;

/// Least-squares slope of `(ms, bytes)` points, in bytes/s.
fn slope_bytes_per_s(points: &std::collections::VecDeque<(u64, u64, u64)>) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let t0 = points[0].0;
    let (mut st, mut sy) = (0.0, 0.0);
    for &(t, y, _) in points {
        st += (t - t0) as f64 / 1000.0;
        sy += y as f64;
    }
    let (mt, my) = (st / n, sy / n);
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, y, _) in points {
        let dt = (t - t0) as f64 / 1000.0 - mt;
        num += dt * (y as f64 - my);
        den += dt * dt;
    }
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// Weight of a new rate sample (exponential smoothing).
const RATE_ALPHA: f64 = 0.3;

impl Migration {
    pub fn new(auto_converge: bool, converge: ConvergeConfig) -> Migration {
        Migration {
            phase: MigrationPhase::Seeding,
            auto_converge,
            converge,
            not_converging: false,
            throttle_pct: 0,
            send_rate_bytes_per_s: 0.0,
            write_rate_bytes_per_s: 0.0,
            bytes_remaining: 0,
            reason: None,
            last: None,
            last_step_ms: 0,
            dirty_rate_bytes_per_s: 0.0,
            copy_rate_bytes_per_s: 0.0,
            window: std::collections::VecDeque::new(),
        }
    }

    /// Seconds until ready at the current rates, if it converges (`None`
    /// while `not_converging`: a backlog that does not shrink has no ETA).
    pub fn eta_seconds(&self) -> Option<f64> {
        if self.phase == MigrationPhase::Ready || self.bytes_remaining == 0 {
            return Some(0.0);
        }
        if self.not_converging {
            return None;
        }
        let net = self.copy_rate_bytes_per_s - self.dirty_rate_bytes_per_s;
        (net > 1.0).then(|| self.bytes_remaining as f64 / net)
    }

    /// What to do while it does not converge (`advice` in the status; the
    /// CLI and the console show it), `None` while it does.
    pub fn advice(&self) -> Option<&'static str> {
        if !self.not_converging {
            return None;
        }
        Some(if self.auto_converge {
            "writes outrun the link: auto-converge is slowing them until it converges; \
             raise the rate limit if one is set (ferry migrate set NAME --max-rate 0)"
        } else {
            "writes outrun the link: raise or remove the rate limit (ferry migrate set NAME \
             --max-rate 0), slow the application's writes, or start the migration again with \
             --auto-converge"
        })
    }

    /// Feeds one observation; moves between seeding, syncing and ready.
    pub fn observe(&mut self, s: LinkSample) {
        if matches!(
            self.phase,
            MigrationPhase::CuttingOver | MigrationPhase::Completed | MigrationPhase::Failed
        ) {
            self.last = Some(s);
            return;
        }
        if let Some(prev) = self.last {
            let dt = s.now_ms.saturating_sub(prev.now_ms);
            if dt > 0 {
                let sec = dt as f64 / 1000.0;
                let sent = s.bytes_sent_total.saturating_sub(prev.bytes_sent_total) as f64 / sec;
                let written = s
                    .bytes_written_total
                    .saturating_sub(prev.bytes_written_total) as f64
                    / sec;
                self.send_rate_bytes_per_s =
                    RATE_ALPHA * sent + (1.0 - RATE_ALPHA) * self.send_rate_bytes_per_s;
                self.write_rate_bytes_per_s =
                    RATE_ALPHA * written + (1.0 - RATE_ALPHA) * self.write_rate_bytes_per_s;
            }
        }
        self.last = Some(s);
        self.bytes_remaining = s.bytes_remaining;
        // The convergence window: the last `not_converging_after_ms`.
        let span = self.converge.not_converging_after_ms;
        self.window
            .push_back((s.now_ms, s.bytes_remaining, s.bytes_copied_total));
        while self.window.len() > 2 && s.now_ms.saturating_sub(self.window[1].0) >= span {
            self.window.pop_front();
        }
        let (t0, _, c0) = self.window[0];
        let full = s.now_ms.saturating_sub(t0) >= span && self.window.len() >= 3;
        let trend = slope_bytes_per_s(&self.window);
        if s.now_ms > t0 {
            let sec = (s.now_ms - t0) as f64 / 1000.0;
            self.copy_rate_bytes_per_s = s.bytes_copied_total.saturating_sub(c0) as f64 / sec;
            self.dirty_rate_bytes_per_s = (self.copy_rate_bytes_per_s + trend).max(0.0);
        }
        self.phase = if s.connected && s.up_to_date {
            MigrationPhase::Ready
        } else if s.seeding && self.phase == MigrationPhase::Seeding {
            MigrationPhase::Seeding
        } else if self.phase == MigrationPhase::RolledBack && !s.connected {
            MigrationPhase::RolledBack
        } else {
            MigrationPhase::Syncing
        };
        if self.phase == MigrationPhase::Ready || !s.connected {
            if self.phase == MigrationPhase::Ready {
                self.throttle_pct = 0;
            }
            self.window.clear();
            self.not_converging = false;
            return;
        }
        if !full {
            return;
        }
        // Convergence: does the backlog shrink, relative to what is copied?
        let copy = self.copy_rate_bytes_per_s;
        let outrun = s.bytes_remaining > 0 && trend > -CONVERGING_SHRINK * copy;
        if outrun {
            self.not_converging = true;
        } else if trend <= -CONVERGED_SHRINK * copy {
            self.not_converging = false;
        }
        if outrun
            && self.auto_converge
            && s.now_ms.saturating_sub(self.last_step_ms) >= self.converge.throttle_step_ms
        {
            self.last_step_ms = s.now_ms;
            self.throttle_pct = if self.throttle_pct == 0 {
                self.converge.throttle_initial_pct
            } else {
                self.throttle_pct
                    .saturating_add(self.converge.throttle_step_pct)
                    .min(self.converge.throttle_pct_max)
            };
        }
    }

    /// A cutover starts: only from `ready`.
    pub fn begin_cutover(&mut self) -> Result<(), CutoverRefused> {
        if self.phase != MigrationPhase::Ready {
            return Err(CutoverRefused::NotReady(self.phase.as_str()));
        }
        self.phase = MigrationPhase::CuttingOver;
        self.throttle_pct = 0;
        Ok(())
    }

    /// The cutover aborted before the commit point: the source serves again.
    pub fn cutover_aborted(&mut self, why: impl Into<String>) {
        self.phase = MigrationPhase::RolledBack;
        self.reason = Some(why.into());
    }

    /// The target is serving.
    pub fn cutover_done(&mut self) {
        self.phase = MigrationPhase::Completed;
        self.reason = None;
    }

    pub fn fail(&mut self, why: impl Into<String>) {
        self.phase = MigrationPhase::Failed;
        self.reason = Some(why.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(now_ms: u64, sent: u64, written: u64, remaining: u64) -> LinkSample {
        LinkSample {
            now_ms,
            connected: true,
            up_to_date: remaining == 0,
            seeding: false,
            bytes_remaining: remaining,
            bytes_sent_total: sent,
            bytes_written_total: written,
            bytes_copied_total: sent,
        }
    }

    #[test]
    fn phases_follow_the_links_and_cutover_needs_ready() {
        let mut m = Migration::new(false, ConvergeConfig::default());
        m.observe(LinkSample {
            seeding: true,
            connected: true,
            bytes_remaining: 100,
            ..LinkSample::default()
        });
        assert_eq!(m.phase, MigrationPhase::Seeding);
        assert_eq!(m.begin_cutover(), Err(CutoverRefused::NotReady("seeding")));
        m.observe(sample(1000, 100, 0, 10));
        assert_eq!(m.phase, MigrationPhase::Syncing);
        m.observe(sample(2000, 110, 0, 0));
        assert_eq!(m.phase, MigrationPhase::Ready);
        assert_eq!(m.eta_seconds(), Some(0.0));
        // A burst of writes: back to syncing, never back to seeding.
        m.observe(LinkSample {
            seeding: true,
            ..sample(3000, 120, 50, 40)
        });
        assert_eq!(m.phase, MigrationPhase::Syncing);
        m.observe(sample(4000, 160, 50, 0));
        m.begin_cutover().unwrap();
        assert_eq!(m.phase, MigrationPhase::CuttingOver);
        // Samples during a cutover do not move the phase.
        m.observe(sample(5000, 160, 50, 30));
        assert_eq!(m.phase, MigrationPhase::CuttingOver);
        m.cutover_aborted("target died");
        assert_eq!(m.phase, MigrationPhase::RolledBack);
        m.observe(sample(6000, 160, 50, 0));
        assert_eq!(
            m.phase,
            MigrationPhase::Ready,
            "a rolled-back migration can try again"
        );
        m.begin_cutover().unwrap();
        m.cutover_done();
        assert!(m.phase.is_final());
    }

    #[test]
    fn outrunning_writes_report_not_converging_and_auto_converge_steps_up() {
        let cfg = ConvergeConfig::default();
        let mut m = Migration::new(true, cfg);
        let mib = 1 << 20;
        let (mut sent, mut written, mut remaining) = (0u64, 0u64, 500 * mib);
        let mut throttles = Vec::new();
        // The link sends 50 MiB/s; the workload writes 80 MiB/s (less the throttle).
        for sec in 0..30u64 {
            let w = 80.0 * (1.0 - f64::from(m.throttle_pct) / 100.0);
            sent += 50 * mib;
            written += (w * mib as f64) as u64;
            remaining = (remaining + (w * mib as f64) as u64).saturating_sub(50 * mib);
            m.observe(sample(sec * 1000, sent, written, remaining.max(1)));
            throttles.push(m.throttle_pct);
            // The advice goes with not_converging, and says auto-converge acts.
            match m.advice() {
                Some(a) => assert!(m.not_converging && a.contains("auto-converge is slowing")),
                None => assert!(!m.not_converging),
            }
        }
        assert!(m.not_converging || m.throttle_pct >= 40, "{m:?}");
        // Reported only after not_converging_after_ms, then 20%, +10% per step.
        assert_eq!(throttles[3], 0);
        let first = throttles.iter().position(|&t| t > 0).unwrap();
        assert_eq!(throttles[first], 20);
        assert!(throttles
            .windows(2)
            .all(|w| w[1] >= w[0] && w[1] - w[0] <= 20));
        // 80 × (1 − t) < 50 once t > 37.5%: the throttle stops climbing there.
        let last = *throttles.last().unwrap();
        assert!((40..=60).contains(&last), "{throttles:?}");
        // Ready releases the throttle.
        m.observe(sample(31_000, sent + 50 * mib, written, 0));
        assert_eq!(
            (m.phase, m.throttle_pct, m.not_converging),
            (MigrationPhase::Ready, 0, false)
        );
        assert_eq!(m.advice(), None);
    }

    #[test]
    fn without_auto_converge_it_only_reports() {
        let mut m = Migration::new(false, ConvergeConfig::default());
        for sec in 0..20u64 {
            m.observe(sample(sec * 1000, sec * 10, sec * 30, 1000 + sec * 20));
        }
        assert!(m.not_converging);
        assert!(m.advice().unwrap().contains("--auto-converge"), "{m:?}");
        assert_eq!(m.throttle_pct, 0);
        assert_eq!(m.eta_seconds(), None, "no ETA while it does not converge");
    }

    /// What a real sync-mode migration looked like (fio writing 2 MiB/s of
    /// 4 KiB blocks at random over 8 MiB, the copy limited to 1 MiB/s): the
    /// live writes are streamed as they come, so the link sends more than
    /// the application writes, while the backlog (re-dirtied blocks) stays
    /// where it is, jumping by a copy run at a time. Comparing the write
    /// rate with the send rate never saw it; the backlog's trend does.
    fn real_trace(m: &mut Migration, secs: u64, shrink_per_s: i64) -> Option<u64> {
        let mib = 1u64 << 20;
        let mut first = None;
        for sec in 0..secs {
            // The copier sends 1 MiB/s; ±1.5 MiB of step noise on the backlog.
            let noise = [0i64, 15, -10, 5, -15, 10, -5][(sec % 7) as usize] * (mib as i64) / 10;
            let remaining = (5 * mib as i64 - shrink_per_s * sec as i64 + noise).max(1) as u64;
            m.observe(LinkSample {
                now_ms: sec * 1000,
                connected: true,
                up_to_date: false,
                seeding: true,
                bytes_remaining: remaining,
                bytes_sent_total: sec * 3 * mib,
                bytes_written_total: sec * 2 * mib,
                bytes_copied_total: sec * mib,
            });
            if m.not_converging && first.is_none() {
                first = Some(sec);
            }
        }
        first
    }

    #[test]
    fn a_backlog_that_does_not_shrink_is_not_converging_whatever_the_app_write_rate() {
        let cfg = ConvergeConfig::default();
        let mut m = Migration::new(false, cfg);
        let first = real_trace(&mut m, 30, 0).expect("reported");
        // As soon as the window (not_converging_after_ms) is full.
        assert!(
            first * 1000 <= cfg.not_converging_after_ms + 1000,
            "{first}"
        );
        assert!(m.not_converging, "stays reported: {m:?}");
        assert!(m.advice().is_some());
        let mib = (1u64 << 20) as f64;
        assert!((m.copy_rate_bytes_per_s - mib).abs() < 0.05 * mib, "{m:?}");
        assert!(m.dirty_rate_bytes_per_s > 0.5 * mib, "{m:?}");
        assert_eq!(m.eta_seconds(), None, "{m:?}");
    }

    #[test]
    fn a_backlog_shrinking_by_a_third_of_the_copy_rate_converges() {
        let mut m = Migration::new(false, ConvergeConfig::default());
        // 5 MiB shrinking 0.33 MiB/s with the same noise: never reported.
        assert_eq!(real_trace(&mut m, 14, (1 << 20) / 3), None, "{m:?}");
        assert!(m.eta_seconds().is_some(), "{m:?}");
    }
}
