//! `ferry estimate …`: the migration estimator (observations, the link
//! probe, the forecast), through the agent's API.

use std::path::Path;

use anyhow::{bail, Result};
use clap::Subcommand;
use ferry_api::reply as r;
use ferry_api::request as q;
use ferry_api::{Action, Reply};
use ferry_core::estimate::{Verdict, Why};
use ferry_core::ByteSize;

use crate::cli::remote::{client, name, print};
use crate::cli::{parse_seconds, AgentConn, Rate};

#[derive(Debug, Subcommand)]
pub enum EstimateCommand {
    /// Observe the writes of a volume, a workload's volumes, a share or a
    /// block device ferry does not serve yet, for --duration (default 24h):
    /// bytes and IOPS, allocated bytes, and the working-set curve W(T).
    /// Runs in the agent (survives its restarts); `report` forecasts a
    /// migration from it.
    Start {
        /// The estimate's name.
        name: String,
        #[arg(long, group = "source")]
        volume: Option<String>,
        #[arg(long, group = "source")]
        workload: Option<String>,
        #[arg(long, group = "source")]
        share: Option<String>,
        /// A Linux block device, e.g. /dev/sdb: its written sectors from the
        /// block_rq_issue tracepoint, or only /proc/diskstats (an upper
        /// bound) where tracefs cannot be used.
        #[arg(long, group = "source")]
        device: Option<String>,
        /// How long to observe: 90s, 30m, 24h, 7d.
        #[arg(long, value_parser = parse_seconds)]
        duration: Option<u64>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// One estimate (or, without a name, all): state, rates, W(T).
    Status {
        name: Option<String>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Every estimate of the agent, one line each.
    List {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Stop observing; what was observed stays for `report`.
    Stop {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Stop and forget an estimate.
    Delete {
        name: String,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Measure the replication link to NODE over the real TLS transport:
    /// throughput (and at --max-rate), and round trips idle and under load.
    /// Run it while the workload runs: an idle machine overstates what a
    /// migration gets.
    Probe {
        #[arg(long)]
        to: String,
        /// Seconds of each measurement (default 10).
        #[arg(long)]
        seconds: Option<u64>,
        /// Also measure at this rate limit, e.g. 50MiB/s.
        #[arg(long)]
        max_rate: Option<Rate>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Forecast the migration of what NAME observed: initial sync, time to
    /// ready (sync and async), the throttle it needs, steady lag, cutover
    /// downtime, the best cutover hours, offline seeding; every figure with
    /// its formula and inputs. Several names: they share the link (total
    /// time and the order that finishes soonest).
    Report {
        #[arg(required = true)]
        names: Vec<String>,
        /// The link: the last probe to this node (`estimate probe --to`)…
        #[arg(long, group = "link")]
        to: Option<String>,
        /// …or a bandwidth, e.g. 100MiB/s.
        #[arg(long, group = "link")]
        bandwidth: Option<Rate>,
        /// The migration's --max-rate.
        #[arg(long)]
        max_rate: Option<Rate>,
        /// Compare with shipping a disk that takes this many days.
        #[arg(long)]
        ship_days: Option<f64>,
        /// The statistic of W(T): max (the worst window seen; default) or mean.
        #[arg(long, value_parser = ["max", "mean"])]
        stat: Option<String>,
        #[command(flatten)]
        conn: AgentConn,
    },
}

fn bytes(n: f64) -> String {
    if !n.is_finite() || n < 0.0 {
        return "—".into();
    }
    ByteSize(n.round() as u64).to_string()
}

fn rate(n: f64) -> String {
    format!("{}/s", bytes(n))
}

/// `1h 02m 03s`, `4m 05s`, `2.3 s`.
pub fn dur(s: f64) -> String {
    if !s.is_finite() {
        return "never".into();
    }
    if s < 60.0 {
        return format!("{s:.1} s");
    }
    let t = s.round() as u64;
    let (d, h, m, sec) = (t / 86_400, t / 3600 % 24, t / 60 % 60, t % 60);
    if d > 0 {
        format!("{d}d {h:02}h {m:02}m")
    } else if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else {
        format!("{m}m {sec:02}s")
    }
}

fn print_status(s: &r::EstimateStatus) {
    let why = s
        .error
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    println!(
        "estimate {}: {}{} — {} {} via {}; observed {} of {} ({:.0}%){}",
        s.name,
        s.state,
        why,
        s.source.kind,
        s.source.name,
        s.method,
        dur(s.observed_s),
        dur(s.duration_s as f64),
        s.progress * 100.0,
        if s.unobserved_s >= 1.0 {
            format!(", {} not observed", dur(s.unobserved_s))
        } else {
            String::new()
        }
    );
    println!(
        "  written {}{} ({} now), {:.0} write IOPS, {:.0} read IOPS; allocated {} of {}",
        bytes(s.bytes_written as f64),
        if s.unique_bytes_upper_bound {
            " (an upper bound on unique bytes: diskstats)"
        } else {
            ""
        },
        rate(s.write_bytes_per_s),
        s.write_iops,
        s.read_iops,
        bytes(s.allocated_bytes as f64),
        bytes(s.size_bytes as f64),
    );
    if s.working_set.is_empty() {
        println!("  working set W(T): no full window yet");
    } else {
        let unit = match s.block_bytes {
            Some(b) => format!("{} blocks", bytes(b as f64)),
            None => "files".into(),
        };
        println!("  working set W(T), distinct {unit} written within T (max / mean):");
        for p in &s.working_set {
            println!(
                "    {:>8}  {:>10} {:>10}  {:>10.0}  ({} windows)",
                dur(p.window_s as f64),
                p.max_keys,
                bytes(p.max_bytes as f64),
                p.mean_keys,
                p.windows
            );
        }
    }
    if s.events_dropped > 0 {
        println!(
            "  {} write events dropped (estimate.tap_events_max): W(T) is a lower bound",
            s.events_dropped
        );
    }
    println!(
        "  memory {} (bound {})",
        bytes(s.memory_bytes as f64),
        bytes(s.memory_bound_bytes as f64)
    );
}

fn print_probe(p: &r::ProbeResult) {
    println!(
        "link {} → {}: {} over {} (TLS replication transport), round trip {:.2} ms idle, {:.2} ms p50 / {:.2} ms p99 under load",
        p.node,
        p.to,
        rate(p.throughput_bytes_per_s),
        dur(p.seconds),
        p.rtt_ms_idle,
        p.rtt_ms_p50,
        p.rtt_ms_p99
    );
    if let Some(l) = &p.limited {
        println!(
            "  at --max-rate {}: {}",
            rate(l.max_rate_bytes_per_s as f64),
            rate(l.throughput_bytes_per_s)
        );
    }
    if p.under_load.is_empty() {
        println!(
            "  no estimate was observing: an idle machine may overstate what a migration gets"
        );
    } else {
        for l in &p.under_load {
            println!(
                "  under load: estimate {} writing {}",
                l.estimate,
                rate(l.write_bytes_per_s)
            );
        }
    }
}

fn print_why(w: &Why) {
    let inputs: Vec<String> = w
        .inputs
        .iter()
        .map(|i| {
            let v = match i.unit.as_str() {
                "B" => bytes(i.value),
                "B/s" => rate(i.value),
                "s" => dur(i.value),
                "" => format!("{}", (i.value * 1000.0).round() / 1000.0),
                u => format!("{} {u}", (i.value * 1000.0).round() / 1000.0),
            };
            format!("{} = {v}", i.name)
        })
        .collect();
    println!("      why: {} — {}", w.formula, w.explanation);
    if !inputs.is_empty() {
        println!("      inputs: {}", inputs.join(", "));
    }
}

fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Converges { seconds, passes } => {
            format!("ready in {} ({passes} passes)", dur(*seconds))
        }
        Verdict::Diverges {
            dirty_rate,
            bandwidth,
            ..
        } => format!(
            "does not converge: writes dirty {} against {} of link",
            rate(*dirty_rate),
            rate(*bandwidth)
        ),
        Verdict::Stalls { pass_s } => format!(
            "does not converge: the passes shrink towards {} and stay there",
            dur(*pass_s)
        ),
    }
}

fn print_report(v: &r::EstimateReport) {
    let f = &v.forecast;
    println!(
        "forecast for estimate {} ({} {}; observed {}; W(T) statistic: {})",
        v.name,
        v.source.kind,
        v.source.name,
        dur(v.observed_s),
        v.stat
    );
    let link = match &v.link.probe {
        Some(p) => format!(
            "{} (probe to {}, {:.2} ms p50 round trip under load)",
            rate(v.link.bandwidth_bytes_per_s),
            p.to,
            p.rtt_ms_p50
        ),
        None => format!("{} (given)", rate(v.link.bandwidth_bytes_per_s)),
    };
    println!(
        "  link {link}{}",
        v.link
            .max_rate_bytes_per_s
            .map(|m| format!(", --max-rate {}", rate(m)))
            .unwrap_or_default()
    );
    println!("  initial sync:      {}", dur(f.initial_sync.seconds));
    print_why(&f.initial_sync.why);
    println!("  time to ready, sync:  {}", verdict(&f.ready_sync.verdict));
    print_why(&f.ready_sync.why);
    println!(
        "  time to ready, async: {}",
        verdict(&f.ready_async.verdict)
    );
    print_why(&f.ready_async.why);
    for t in [&f.throttle_sync, &f.throttle_async] {
        let what = match (t.throttle_pct, t.write_rate_bytes_per_s) {
            (Some(0), _) => "converges without throttling".to_string(),
            (Some(p), Some(w)) => format!(
                "converges with writes held back {p}% (to {}){}",
                rate(w),
                if t.within_auto_converge {
                    ": --auto-converge reaches it"
                } else {
                    ": beyond --auto-converge; lower the write load or raise the bandwidth"
                }
            ),
            (Some(p), None) => format!("converges with writes held back {p}%"),
            (None, _) => "does not converge at any throttle".into(),
        };
        println!("  throttle, {}: {what}", t.mode);
        print_why(&t.why);
    }
    if let Some(l) = &f.lag {
        println!(
            "  steady lag (async): max {}, mean {}{}{}",
            dur(l.max_lag_s),
            dur(l.mean_lag_s),
            if l.overflows > 0 {
                format!(
                    "; the backlog passed backlog_bytes_max {} times (a resync)",
                    l.overflows
                )
            } else {
                String::new()
            },
            if l.unbounded {
                "; unbounded: writes reach the link's rate"
            } else {
                ""
            }
        );
        print_why(&l.why);
    }
    let c = &f.cutover;
    println!(
        "  cutover downtime:  {} (drain {} + re-hash {} + commit {} + start hook {})",
        dur(c.seconds),
        dur(c.drain_s),
        dur(c.rehash_s),
        dur(c.commit_s),
        dur(c.start_hook_s)
    );
    print_why(&c.why);
    if f.best_hours.hours.is_empty() {
        println!("  best cutover hours: no whole hour observed yet");
    } else {
        let hs: Vec<String> = f
            .best_hours
            .hours
            .iter()
            .map(|h| {
                let t = jiff::Timestamp::from_second(h.start_s as i64)
                    .map(|t| t.strftime("%Y-%m-%d %H:00 UTC").to_string())
                    .unwrap_or_else(|_| h.start_s.to_string());
                format!(
                    "{t} ({} distinct, {} written)",
                    h.keys,
                    bytes(h.bytes_written as f64)
                )
            })
            .collect();
        println!("  best cutover hours: {}", hs.join("; "));
    }
    print_why(&f.best_hours.why);
    if let Some(s) = &f.seeding {
        println!(
            "  offline seeding: ship in {} then catch up {} ({}), total {}; over the link: {}; faster: {:?}",
            dur(s.ship_s),
            bytes(s.catch_up_bytes),
            verdict(&s.catch_up),
            s.shipment_total_s.map(dur).unwrap_or_else(|| "never".into()),
            verdict(&s.network.verdict),
            s.faster
        );
        print_why(&s.why);
    }
    if let Some(p) = &v.shared_link {
        println!(
            "  sharing the link: order {} — total {}",
            p.order.join(" → "),
            p.total_s.map(dur).unwrap_or_else(|| "never".into())
        );
        print_why(&p.why);
    }
    for w in &v.warnings {
        println!("  note: {w}");
    }
}

pub fn run(cmd: &EstimateCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        EstimateCommand::Start {
            name: n,
            volume,
            workload,
            share,
            device,
            duration,
            conn,
        } => {
            let req = q::StartEstimate {
                name: name(n)?,
                volume: volume.as_deref().map(name).transpose()?,
                workload: workload.as_deref().map(name).transpose()?,
                share: share.as_deref().map(name).transpose()?,
                device: device.clone(),
                duration_s: *duration,
            };
            match client(conn, data_dir)?.send(&Action::StartEstimate(req))? {
                Reply::EstimateStarted(s) => print(&s, json, |s| {
                    println!(
                        "observing {} {} as estimate {} for {} (ferry estimate status {})",
                        s.source.kind,
                        s.source.name,
                        s.name,
                        dur(s.duration_s as f64),
                        s.name
                    )
                }),
                other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
            }
        }
        EstimateCommand::Status { name: n, conn } => {
            let c = client(conn, data_dir)?;
            let list = match n {
                Some(n) => match c.send(&Action::GetEstimate { name: name(n)? })? {
                    Reply::Estimate(s) => return print(&s, json, print_status),
                    other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
                },
                None => match c.send(&Action::ListEstimates)? {
                    Reply::Estimates(v) => v,
                    other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
                },
            };
            print(&list, json, |v| {
                if v.is_empty() {
                    println!("no estimates (ferry estimate start)");
                }
                for s in v {
                    print_status(s);
                }
            })
        }
        EstimateCommand::List { conn } => {
            match client(conn, data_dir)?.send(&Action::ListEstimates)? {
                Reply::Estimates(v) => print(&v, json, |v| {
                    if v.is_empty() {
                        println!("no estimates (ferry estimate start)");
                    }
                    for s in v {
                        println!(
                            "{:<16} {:<10} {:<8} {:<20} observed {:>10} of {:<10} {}",
                            s.name,
                            s.state,
                            s.source.kind,
                            s.source.name,
                            dur(s.observed_s),
                            dur(s.duration_s as f64),
                            rate(s.write_bytes_per_s)
                        );
                    }
                }),
                other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
            }
        }
        EstimateCommand::Stop { name: n, conn } => {
            match client(conn, data_dir)?.send(&Action::StopEstimate { name: name(n)? })? {
                Reply::EstimateStopped(s) => print(&s, json, |s| {
                    println!(
                        "estimate {} {} after {} observed (ferry estimate report {} --to NODE)",
                        s.name,
                        s.state,
                        dur(s.observed_s),
                        s.name
                    )
                }),
                other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
            }
        }
        EstimateCommand::Delete { name: n, conn } => {
            match client(conn, data_dir)?.send(&Action::DeleteEstimate { name: name(n)? })? {
                Reply::EstimateDeleted(d) => {
                    print(&d, json, |d| println!("estimate {} deleted", d.deleted))
                }
                other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
            }
        }
        EstimateCommand::Probe {
            to,
            seconds,
            max_rate,
            conn,
        } => {
            let c = client(conn, data_dir)?;
            if !json {
                let s = seconds.unwrap_or(10);
                eprintln!(
                    "probing the link to {to} for {s} s{}…",
                    if max_rate.is_some() {
                        format!(", then {s} s at the rate limit")
                    } else {
                        String::new()
                    }
                );
            }
            match c.send(&Action::ProbeLink(q::ProbeLink {
                to: to.clone(),
                seconds: *seconds,
                max_rate_bytes_per_s: max_rate.map(|m| m.0),
            }))? {
                Reply::Probe(p) => print(&p, json, print_probe),
                other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
            }
        }
        EstimateCommand::Report {
            names,
            to,
            bandwidth,
            max_rate,
            ship_days,
            stat,
            conn,
        } => {
            let first = name(&names[0])?;
            let with = names[1..]
                .iter()
                .map(|n| name(n))
                .collect::<Result<Vec<_>>>()?;
            if to.is_none() && bandwidth.is_none() {
                bail!("which link? --to NODE (its last probe: ferry estimate probe --to NODE) or --bandwidth RATE (e.g. 100MiB/s)");
            }
            let c = client(conn, data_dir)?;
            match c.send(&Action::EstimateReport {
                name: first,
                query: q::EstimateReportQuery {
                    to: to.clone(),
                    bandwidth_bytes_per_s: bandwidth.map(|b| b.0),
                    max_rate_bytes_per_s: max_rate.map(|m| m.0),
                    ship_days: *ship_days,
                    with,
                    stat: stat.clone(),
                },
            })? {
                Reply::EstimateReport(v) => print(&*v, json, print_report),
                other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
            }
        }
    }
}
