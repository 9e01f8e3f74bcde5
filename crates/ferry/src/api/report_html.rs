//! A migration report as a printable HTML page: plain HTML, no script, no
//! inline style (the console's Content-Security-Policy forbids both); its
//! look is `/console/print.css` (`crates/ferry/console/print.css`). Every
//! value from the report is escaped. `ferry migrate report NAME --html`
//! prints it; the API serves it at
//! `GET /api/v1/migrations/{name}/report?format=html` (`server.rs`).

use std::fmt::Write as _;

use ferry_api::reply::MigrationReport;
use ferry_core::ByteSize;

/// `t` (Unix s) as RFC 3339 UTC.
pub fn utc(t: u64) -> String {
    match jiff::Timestamp::from_second(t as i64) {
        Ok(ts) => ts.to_string(),
        Err(_) => t.to_string(),
    }
}

/// Text as HTML (element content and attribute values).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn span(s: u64) -> String {
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    if h > 0 {
        format!("{h} h {m:02} min")
    } else if m > 0 {
        format!("{m} min {sec:02} s")
    } else {
        format!("{sec} s")
    }
}

fn rate(r: &Option<ferry_api::reply::ReportRate>) -> String {
    match r {
        Some(r) => format!(
            "{}/s mean, {}/s peak",
            ByteSize(r.mean_bytes_per_s as u64),
            ByteSize(r.peak_bytes_per_s as u64)
        ),
        None => "not recorded".into(),
    }
}

/// The page.
pub fn render(r: &MigrationReport) -> String {
    let mut h = String::new();
    let w = escape(&r.workload);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Migration report: {w}</title>\n\
         <link rel=\"stylesheet\" href=\"/console/print.css\">\n</head>\n<body>\n<main class=\"report\">\n\
         <h1>Migration of {w}</h1>\n<p class=\"summary\">From <strong>{}</strong> to <strong>{}</strong> ({} replication): <span class=\"phase\">{}</span></p>\n",
        escape(&r.source),
        escape(&r.target),
        escape(&r.mode),
        escape(&r.phase),
    );
    let opt = |v: &Option<String>| v.as_deref().map(escape).unwrap_or_else(|| "—".into());
    let ms = |v: Option<f64>| v.map(|x| format!("{x} ms")).unwrap_or_else(|| "—".into());
    let rows: Vec<(&str, String)> = vec![
        ("Started", utc(r.started_unix)),
        (
            "Ended",
            r.ended_unix.map(utc).unwrap_or_else(|| "not yet".into()),
        ),
        (
            "Duration",
            span(
                r.ended_unix
                    .unwrap_or(r.started_unix)
                    .saturating_sub(r.started_unix),
            ),
        ),
        (
            "Bytes moved",
            r.bytes_moved
                .map(|b| format!("{} ({b} bytes)", ByteSize(b)))
                .unwrap_or_else(|| "not recorded".into()),
        ),
        ("Link rate", rate(&r.link_rate)),
        ("Write rate", rate(&r.write_rate)),
        ("Downtime", ms(r.downtime_ms)),
        ("Outage", ms(r.outage_ms)),
        (
            "Verification",
            match r.verified {
                Some(true) => "passed: data compared equal, target healthy".into(),
                Some(false) => "failed".into(),
                None => "no cutover yet".into(),
            },
        ),
        ("Started by", opt(&r.started_by)),
        ("Cut over by", opt(&r.cut_over_by)),
        ("Reason", opt(&r.reason)),
    ];
    h.push_str("<table class=\"facts\">\n");
    for (k, v) in rows {
        let _ = writeln!(h, "<tr><th scope=\"row\">{k}</th><td>{v}</td></tr>");
    }
    h.push_str("</table>\n<h2>Timeline</h2>\n<table class=\"timeline\">\n<thead><tr><th scope=\"col\">Phase</th><th scope=\"col\">Began (UTC)</th><th scope=\"col\">Lasted</th></tr></thead>\n<tbody>\n");
    for (i, p) in r.timeline.iter().enumerate() {
        let lasted = match r.timeline.get(i + 1) {
            Some(n) => span(n.at_unix.saturating_sub(p.at_unix)),
            None => "—".into(),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{lasted}</td></tr>",
            escape(&p.phase),
            utc(p.at_unix)
        );
    }
    h.push_str("</tbody>\n</table>\n");
    if let Some(c) = &r.cutover {
        h.push_str("<h2>Cutover steps</h2>\n<table class=\"steps\">\n<thead><tr><th scope=\"col\">Step</th><th scope=\"col\">At (ms from its start)</th></tr></thead>\n<tbody>\n");
        for s in &c.steps_us {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{:.1}</td></tr>",
                escape(&s.step),
                s.at_us as f64 / 1000.0
            );
        }
        h.push_str("</tbody>\n</table>\n");
    }
    let _ = write!(
        h,
        "<footer>ferry {}</footer>\n</main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::reply::{ReportPhase, ReportRate};

    fn report() -> MigrationReport {
        MigrationReport {
            workload: "db".into(),
            source: "a".into(),
            target: "b".into(),
            mode: "sync".into(),
            phase: "completed".into(),
            completed: true,
            started_unix: 1_800_000_000,
            ended_unix: Some(1_800_000_600),
            timeline: vec![
                ReportPhase {
                    phase: "seeding".into(),
                    at_unix: 1_800_000_000,
                },
                ReportPhase {
                    phase: "completed".into(),
                    at_unix: 1_800_000_600,
                },
            ],
            bytes_moved: Some(1 << 30),
            link_rate: Some(ReportRate {
                mean_bytes_per_s: 1e6,
                peak_bytes_per_s: 2e6,
            }),
            write_rate: None,
            downtime_ms: Some(12.5),
            outage_ms: None,
            verified: Some(true),
            cutover: None,
            started_by: Some("<script>alert(1)</script>".into()),
            cut_over_by: None,
            reason: Some("a \"quoted\" & <b>bold</b> reason".into()),
        }
    }

    #[test]
    fn the_page_is_plain_escaped_html_with_the_print_stylesheet() {
        let h = render(&report());
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(h.contains("<link rel=\"stylesheet\" href=\"/console/print.css\">"));
        assert!(!h.to_ascii_lowercase().contains("<script"), "{h}");
        assert!(!h.contains("style="), "no inline style");
        assert!(!h.contains("<b>"));
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(h.contains("a &quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt; reason"));
        assert!(h.contains("12.5 ms"));
        assert!(h.contains("2027-01-15T08:00:00Z"), "{h}");
        assert!(h.contains("<td>10 min 00 s</td>"));
    }
}
