//! The link probe (issue 21, `ferry estimate probe`, `POST /api/v1/probes`):
//! two real agents on 127.0.0.1, paired; the probe runs over the real
//! mutual-TLS replication listener (the same one volume links use).
//! Checks the figures are measured (bytes acknowledged, round trips), that
//! the paced phase holds its rate (±25 %), that results are kept and
//! listed, a second concurrent probe to the same node is refused (409),
//! and the errors: bad `seconds` 400, unknown node 404, stopped peer 503.

mod common;

use std::time::{Duration, Instant};

use common::https_request;
use ferry_wire::{FrameHeader, Kind};
use serde_json::Value;

const MIB: f64 = 1024.0 * 1024.0;

fn post_probe(a: &common::agent::Agent, body: &str) -> (u16, Value) {
    let (code, text) = https_request(
        &a.api,
        "POST",
        "/api/v1/probes",
        Some(&a.token()),
        Some(body),
    );
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v)
}

#[test]
fn probe_measures_the_replication_link() {
    let (_root, a, mut b) = common::agent::two_agents("ferry-probe-", "");
    let rate = 20u64 * 1024 * 1024;

    let (code, r) = post_probe(
        &a,
        &format!(r#"{{"to": "b", "seconds": 3, "max_rate_bytes_per_s": {rate}}}"#),
    );
    assert_eq!(code, 200, "probe failed: {r}\n{}", a.log_text());
    println!("probe a → b: {r:#}");
    assert_eq!(r["node"], "a");
    assert_eq!(r["to"], "b");
    let bytes = r["bytes"].as_u64().unwrap();
    let thr = r["throughput_bytes_per_s"].as_f64().unwrap();
    assert!(bytes >= 16 << 20, "only {bytes} bytes acknowledged in 3 s");
    // Throughput is acknowledged bytes over about the 3 s asked for.
    let implied = bytes as f64 / thr;
    assert!(
        (2.9..4.5).contains(&implied),
        "bytes / throughput = {implied} s, not about 3 s"
    );
    // Over loopback with TLS, and it should be well above the paced rate.
    assert!(
        thr > 2.0 * rate as f64,
        "unlimited throughput {:.1} MiB/s",
        thr / MIB
    );
    for f in ["rtt_ms_idle", "rtt_ms_p50", "rtt_ms_p99"] {
        let v = r[f].as_f64().unwrap();
        assert!(v > 0.0 && v < 5000.0, "{f} = {v}");
    }
    assert!(r["rtt_ms_p99"].as_f64() >= r["rtt_ms_p50"].as_f64());
    let lim = &r["limited"];
    assert_eq!(lim["max_rate_bytes_per_s"].as_u64(), Some(rate));
    let lthr = lim["throughput_bytes_per_s"].as_f64().unwrap();
    let ratio = lthr / rate as f64;
    assert!(
        (0.75..=1.25).contains(&ratio),
        "paced throughput {:.2} MiB/s at --max-rate 20 MiB/s ({ratio:.3}×)",
        lthr / MIB
    );
    assert!(lim["bytes"].as_u64().unwrap() > 0);
    assert!(r["under_load"].is_array());

    // Kept and listed.
    let (code, text) = common::https(&a.api, "/api/v1/probes", Some(&a.token()));
    assert_eq!(code, 200, "{text}");
    let list: Value = serde_json::from_str(&text).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{text}");
    assert_eq!(list[0], r);
    assert!(a.dir.join("estimates/probes/b.json").exists());

    // Without --max-rate: no limited phase.
    let (code, r2) = post_probe(&a, r#"{"to": "b", "seconds": 1}"#);
    assert_eq!(code, 200, "{r2}");
    assert!(r2["limited"].is_null(), "{r2}");

    // Through the CLI, with an estimate observing on a: the probe names its
    // load, and a report --to b takes the probe's figure at the same rate
    // limit.
    a.ok(&["volume", "create", "v", "--size", "16MiB"]);
    a.ok(&[
        "estimate",
        "start",
        "e",
        "--volume",
        "v",
        "--duration",
        "1h",
    ]);
    let p = a.json(&[
        "estimate",
        "probe",
        "--to",
        "b",
        "--seconds",
        "1",
        "--max-rate",
        "20MiB/s",
    ]);
    let loads = p["under_load"].as_array().unwrap();
    assert_eq!(loads.len(), 1, "{p}");
    assert_eq!(loads[0]["estimate"], "e", "{p}");
    let text = a.ok(&["estimate", "probe", "--to", "b", "--seconds", "1"]);
    assert!(
        text.contains("link a → b") && text.contains("under load: estimate e"),
        "{text}"
    );
    let rep = a.json(&["estimate", "report", "e", "--to", "b", "--json"]);
    assert_eq!(rep["link"]["from"], "probe", "{rep}");
    assert_eq!(rep["link"]["probe"]["to"], "b", "{rep}");
    assert!(
        rep["link"]["probe"]["limited"].is_null(),
        "the last probe: {rep}"
    );
    a.ok(&[
        "estimate",
        "probe",
        "--to",
        "b",
        "--seconds",
        "1",
        "--max-rate",
        "20MiB/s",
    ]);
    let rep = a.json(&[
        "estimate",
        "report",
        "e",
        "--to",
        "b",
        "--max-rate",
        "20MiB/s",
    ]);
    // --max-rate paces the copier only: the link is the unlimited figure,
    // the copy gets what the probe measured at that limit (at most it).
    assert_eq!(
        rep["link"]["bandwidth_bytes_per_s"], rep["link"]["probe"]["throughput_bytes_per_s"],
        "{rep}"
    );
    let paced = rep["link"]["probe"]["limited"]["throughput_bytes_per_s"]
        .as_f64()
        .unwrap()
        .min(20.0 * MIB);
    assert_eq!(
        rep["link"]["max_rate_bytes_per_s"].as_f64(),
        Some(paced),
        "at the probed rate limit: {rep}"
    );
    a.ok(&["estimate", "delete", "e"]);

    // One probe per peer at a time on the receiver: the second is refused.
    let a_api = a.api.clone();
    let tok = a.token();
    let first = std::thread::spawn(move || {
        https_request(
            &a_api,
            "POST",
            "/api/v1/probes",
            Some(&tok),
            Some(r#"{"to": "b", "seconds": 3}"#),
        )
    });
    let started = |b: &common::agent::Agent| b.log_text().matches("probe.inbound.start").count();
    let before = started(&b);
    common::agent::wait_until(20, "b answering the first probe", || started(&b) > before);
    let (code, busy) = post_probe(&a, r#"{"to": "b", "seconds": 1}"#);
    assert_eq!(code, 409, "{busy}");
    assert!(busy.to_string().contains("already running"), "{busy}");
    assert_eq!(first.join().unwrap().0, 200);

    // Hostile input on the receiver (a's own certificate, raw frames via
    // openssl): answered, then refused with an Error, and b carries on.
    let frames = hostile_probe(&a, &b);
    let kinds: Vec<_> = frames.iter().map(|f| f.0.kind).collect();
    assert_eq!(
        kinds,
        [Kind::Probe, Kind::Ping, Kind::Error],
        "{frames:?}\n{}",
        b.log_text()
    );
    assert_eq!(frames[1].0.seq, 7);
    assert!(frames[2].1.contains("frame_bytes_max"), "{frames:?}");
    assert!(b.is_running());
    let (code, r3) = post_probe(&a, r#"{"to": "b", "seconds": 1}"#);
    assert_eq!(code, 200, "after the hostile probe: {r3}");

    // Refusals.
    for bad in [
        r#"{"to": "b", "seconds": 0}"#,
        r#"{"to": "b", "seconds": 301}"#,
    ] {
        let (code, e) = post_probe(&a, bad);
        assert_eq!(code, 400, "{bad}: {e}");
        assert!(e.to_string().contains("300"), "the limit is named: {e}");
    }
    let (code, e) = post_probe(&a, r#"{"to": "nosuch", "seconds": 1}"#);
    assert_eq!(code, 404, "{e}");
    assert!(e.to_string().contains("ferry node list"), "{e}");

    // A stopped peer: 503, at once.
    b.stop();
    let t = Instant::now();
    let (code, e) = post_probe(&a, r#"{"to": "b", "seconds": 1}"#);
    assert_eq!(code, 503, "{e}");
    assert!(e.to_string().contains("cannot reach b"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    // The last good result is still listed.
    let (code, text) = common::https(&a.api, "/api/v1/probes", Some(&a.token()));
    assert_eq!(code, 200);
    assert!(text.contains(r#""to":"b""#), "{text}");
}

/// Opens a probe to `b` as `a` with openssl and sends: the Probe frame, a
/// ping, then a header announcing a payload above any frame_bytes_max.
/// Returns the frames b answered (header, payload as text) until it closed.
fn hostile_probe(a: &common::agent::Agent, b: &common::agent::Agent) -> Vec<(FrameHeader, String)> {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &b.replication, "-cert"])
        .arg(a.dir.join("tls/node.crt"))
        .arg("-key")
        .arg(a.dir.join("tls/node.key"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = FrameHeader::new(Kind::Probe, 0, 0, 0).encode().to_vec();
    input.extend_from_slice(&FrameHeader::new(Kind::Ping, 7, 0, 0).encode());
    input.extend_from_slice(&FrameHeader::new(Kind::Copy, 0, 0, u32::MAX).encode());
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    let buf = rx.recv_timeout(Duration::from_secs(20));
    if buf.is_err() {
        // SAFETY: kill(2) on the PID of our own unreaped child.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let _ = child.wait();
    let buf = buf.expect("b did not close the hostile probe within 20 s");
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(Some((h, payload, used))) = ferry_wire::split_frame(&buf[at..], 1 << 20) {
        frames.push((h, String::from_utf8_lossy(payload).into_owned()));
        at += used;
    }
    frames
}
