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
//! Convergence: while not ready, the foreground dirty rate is compared with
//! what the link sends; if it stays above for `not_converging_after_ms`, the
//! migration reports `not-converging` with both rates. With auto-converge, the
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
    pub bytes_remaining: u64,
    /// Why it failed or rolled back.
    pub reason: Option<String>,
    #[serde(skip)]
    last: Option<LinkSample>,
    #[serde(skip)]
    outrun_since_ms: Option<u64>,
    #[serde(skip)]
    last_step_ms: u64,
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
            outrun_since_ms: None,
            last_step_ms: 0,
        }
    }

    /// Seconds until ready at the current rates, if it converges.
    pub fn eta_seconds(&self) -> Option<f64> {
        if self.phase == MigrationPhase::Ready || self.bytes_remaining == 0 {
            return Some(0.0);
        }
        let net = self.send_rate_bytes_per_s - self.write_rate_bytes_per_s;
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
        self.phase = if s.connected && s.up_to_date {
            MigrationPhase::Ready
        } else if s.seeding && self.phase == MigrationPhase::Seeding {
            MigrationPhase::Seeding
        } else if self.phase == MigrationPhase::RolledBack && !s.connected {
            MigrationPhase::RolledBack
        } else {
            MigrationPhase::Syncing
        };
        if self.phase == MigrationPhase::Ready {
            self.outrun_since_ms = None;
            self.not_converging = false;
            self.throttle_pct = 0;
            return;
        }
        // Convergence: does the backlog shrink?
        let outrun = s.connected
            && self.write_rate_bytes_per_s > 0.0
            && self.write_rate_bytes_per_s >= 0.95 * self.send_rate_bytes_per_s;
        if !outrun {
            self.outrun_since_ms = None;
            self.not_converging = false;
            return;
        }
        let since = *self.outrun_since_ms.get_or_insert(s.now_ms);
        if s.now_ms.saturating_sub(since) < self.converge.not_converging_after_ms {
            return;
        }
        self.not_converging = true;
        if self.auto_converge
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
}
