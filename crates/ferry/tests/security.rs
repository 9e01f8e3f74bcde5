//! Issue 17's findings, each as a test that fails if the hole comes back:
//! every API route needs a token, names cannot climb out of the data dir,
//! secrets are refused when others can read them.

mod common;

use std::process::Command;

use common::agent::Agent;
use serde_json::Value;

/// The HTTP status of `method path` on `api`, with `token` (or none).
fn status(api: &str, method: &str, path: &str, token: Option<&str>) -> u16 {
    let body = (method != "GET" && method != "DELETE").then_some("{}");
    common::https_request(api, method, path, token, body).0
}

/// The route table the agent is built from (`ferry api routes --json`):
/// method, path and the least the route needs.
fn routes(a: &Agent) -> Vec<(String, String, String)> {
    let v: Value = a.json(&["api", "routes"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
                r["need"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Finding 1: share and cluster routes answered without a token. Walk the
/// router's own table: every method and path refuses a missing or wrong
/// token with 401; only `GET /metrics` and the console's static files
/// (`/`, `/console/{file}`: no data in them) are open.
#[test]
fn every_route_needs_a_token() {
    common::require("curl");
    let root = tempfile::Builder::new()
        .prefix("ferry-sec")
        .tempdir()
        .unwrap();
    let a = Agent::start(root.path(), "a", "");
    a.ok(&["volume", "create", "v0", "--size", "1MiB"]);
    let table = routes(&a);
    assert!(table.len() > 30, "{table:?}");
    for needed in [
        "/api/v1/shares",
        "/api/v1/cluster/workloads/{name}/drop-copy",
    ] {
        assert!(
            table.iter().any(|(_, p, _)| p == needed),
            "{needed} not in the table"
        );
    }
    for (method, path, _) in &table {
        let path = path.replace("{name}", "v0").replace("{which}", "start");
        for token in [None, Some("wrong"), Some("")] {
            assert_eq!(
                status(&a.api, method, &path, token),
                401,
                "{method} {path} with token {token:?}"
            );
        }
    }
    // The right token gets past the check (any answer but 401).
    let token = a.token();
    assert_ne!(status(&a.api, "GET", "/api/v1/shares", Some(&token)), 401);
    assert_eq!(status(&a.api, "GET", "/metrics", None), 200);
    // The console's static shell: served without a token, and without any
    // of the node's data (its volume's name appears nowhere in it).
    for path in ["/", "/console/app.js", "/console/app.css"] {
        let (code, body) = common::https(&a.api, path, None);
        assert_eq!(code, 200, "{path}");
        assert!(!body.contains("v0"), "{path} carries data: {body}");
    }
    assert_eq!(status(&a.api, "GET", "/console/secrets", None), 404);
    // The login without a token in its body, and a cookie that names no
    // session, are refused like a missing token.
    assert_eq!(status(&a.api, "POST", "/api/v1/session", None), 401);
}

/// `method path` on `a`'s API with its token and a JSON body (none if
/// empty): (status, body).
fn call(a: &Agent, method: &str, path: &str, body: &str) -> (u16, String) {
    let body = (!body.is_empty()).then_some(body);
    common::https_request(&a.api, method, path, Some(&a.token()), body)
}

/// Finding 2: names became paths unchecked. `..%2F..%2Fprecious` deleted a
/// `.json` file outside the data dir; a workload naming volume `../../q`
/// let `drop-copy` delete a file outside. Every name now passes one grammar
/// before it can become a path, and these are refused with 400.
#[test]
fn names_cannot_climb_out_of_the_data_dir() {
    common::require("curl");
    let root = tempfile::Builder::new()
        .prefix("ferry-sec")
        .tempdir()
        .unwrap();
    let a = Agent::start(root.path(), "a", "");
    // Targets the old code reached: DATA_DIR/cluster/../../precious.json and
    // DATA_DIR/volumes/../../q/split-brain-copy.raw.
    let precious = root.path().join("precious.json");
    std::fs::write(&precious, "{}").unwrap();
    std::fs::create_dir_all(root.path().join("q")).unwrap();
    let copy = root.path().join("q/split-brain-copy.raw");
    std::fs::write(&copy, "keep me").unwrap();

    let (code, body) = call(
        &a,
        "DELETE",
        "/api/v1/cluster/workloads/..%2F..%2Fprecious?forwarded=true",
        "",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid name"), "{body}");
    assert!(precious.exists(), "a file outside the data dir was deleted");

    for (method, path, body) in [
        (
            "POST",
            "/api/v1/workloads",
            r#"{"name":"w","volumes":["../../q"]}"#,
        ),
        (
            "POST",
            "/api/v1/workloads",
            r#"{"name":"../w","volumes":["v"]}"#,
        ),
        (
            "PUT",
            "/api/v1/workloads/w",
            r#"{"name":"w","volumes":["../../q"]}"#,
        ),
        (
            "POST",
            "/api/v1/volumes",
            r#"{"name":"../../q","size_bytes":1048576}"#,
        ),
        (
            "POST",
            "/api/v1/volumes",
            r#"{"name":"disk0@test","size_bytes":1048576}"#,
        ),
        (
            "POST",
            "/api/v1/shares",
            r#"{"name":"../../q","mode":"async","path":"/tmp/x"}"#,
        ),
        (
            "POST",
            "/api/v1/cluster/workloads/..%2F..%2Fq/drop-copy",
            "{}",
        ),
        ("DELETE", "/api/v1/volumes/..%2F..%2Fq", ""),
        ("GET", "/api/v1/shares/..%2F..%2Fq", ""),
    ] {
        let (code, text) = call(&a, method, path, body);
        assert!(
            (400..500).contains(&code) && code != 401,
            "{method} {path} {body}: {code} {text}"
        );
    }
    assert!(copy.exists(), "a file outside the data dir was deleted");
    assert!(!root.path().join("q/data.raw").exists());
    // The agent still answers.
    assert_eq!(call(&a, "GET", "/api/v1/volumes", "").0, 200);
}

/// Findings 9 and 14: one damaged record took the node down (a truncated
/// `volume.json` or `peers.json` made the agent exit 1; a damaged
/// `share.json` failed `GET /shares` for every share). Each object is now
/// loaded on its own: the damaged ones are listed under `damaged`, the rest
/// is served.
#[test]
fn one_damaged_record_does_not_take_the_node_down() {
    let root = tempfile::Builder::new()
        .prefix("ferry-sec")
        .tempdir()
        .unwrap();
    let mut a = Agent::start(root.path(), "a", "");
    a.ok(&["volume", "create", "good", "--size", "1MiB"]);
    a.ok(&["volume", "create", "bad", "--size", "1MiB"]);
    for s in ["s1", "s2"] {
        let p = root.path().join(s);
        std::fs::create_dir_all(&p).unwrap();
        a.ok(&[
            "share",
            "create",
            s,
            "--path",
            p.to_str().unwrap(),
            "--mode",
            "async",
        ]);
    }
    a.stop();
    let vjson = a.dir.join("volumes/bad/volume.json");
    let text = std::fs::read(&vjson).unwrap();
    std::fs::write(&vjson, &text[..text.len() / 2]).unwrap();
    std::fs::write(a.dir.join("shares/s2/share.json"), b"{\"name\":").unwrap();
    let peers = a.dir.join("peers.json");
    std::fs::write(&peers, b"[{\"name\":\"b\",").unwrap();
    std::fs::set_permissions(&peers, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    a.spawn();

    let node: Value = serde_json::from_str(&call(&a, "GET", "/api/v1/node", "").1).unwrap();
    let damaged = node["damaged"].as_array().unwrap();
    let has = |kind: &str, name: &str| {
        damaged.iter().any(|d| {
            d["kind"] == kind && d["name"] == name && !d["error"].as_str().unwrap().is_empty()
        })
    };
    assert!(has("volume", "bad"), "{damaged:?}");
    assert!(has("peers", "peers.json"), "{damaged:?}");
    assert!(a.dir.join("peers.json.damaged").exists());
    // The good volume is exported and the good share listed.
    common::qemu_io(&a.uri("good"), &["write -P 0x11 0 4k", "read -P 0x11 0 4k"]);
    let (code, shares) = call(&a, "GET", "/api/v1/shares", "");
    assert_eq!(code, 200, "{shares}");
    let shares: Value = serde_json::from_str(&shares).unwrap();
    assert_eq!(shares.as_array().unwrap().len(), 1, "{shares}");
    assert_eq!(shares[0]["name"], "s1");
    let node: Value = serde_json::from_str(&call(&a, "GET", "/api/v1/node", "").1).unwrap();
    assert!(
        node["damaged"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["kind"] == "share" && d["name"] == "s2"),
        "{node}"
    );
    let cluster = a.json(&["cluster", "status"]);
    assert!(
        cluster["damaged"].as_array().unwrap().len() >= 3,
        "{cluster}"
    );
}

/// Finding 14: an empty API token was accepted, and secrets others can read
/// were used. The agent now refuses to start, saying what to do.
#[test]
fn secrets_others_can_read_or_empty_tokens_are_refused() {
    let root = tempfile::Builder::new()
        .prefix("ferry-sec")
        .tempdir()
        .unwrap();
    let mut a = Agent::start(root.path(), "a", "");
    a.stop();
    let token = a.dir.join("api.token");
    let key = a.dir.join("tls/node.key");
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    let refused = |why: &str| {
        let out = Command::new(common::ferry_bin())
            .args(["agent", "--config", a.config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{why}: the agent started");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains(why), "{why}: {err}");
    };
    mode(&token, 0o644);
    refused("chmod 600");
    mode(&token, 0o600);
    mode(&key, 0o640);
    refused("chmod 600");
    mode(&key, 0o600);
    let saved = std::fs::read(&token).unwrap();
    std::fs::write(&token, b"\n").unwrap();
    refused("empty");
    std::fs::write(&token, b"short\n").unwrap();
    refused("shorter than 16");
    std::fs::write(&token, &saved).unwrap();
    a.spawn();
    assert_eq!(call(&a, "GET", "/api/v1/volumes", "").0, 200);
}

/// Finding 10: with a full disk at restart a start-time metadata write
/// failed with ENOSPC and the volume was not exported although its data was
/// intact. It is served now (data written before reads back; new writes
/// that need no new space succeed).
#[test]
fn a_full_disk_at_restart_still_serves_the_volume() {
    let root = tempfile::Builder::new()
        .prefix("ferry-sec")
        .tempdir()
        .unwrap();
    let _m = common::Mount::tmpfs(&root.path().join("a"), "24m");
    let mut a = Agent::start(root.path(), "a", "");
    a.ok(&["volume", "create", "v", "--size", "4MiB"]);
    common::qemu_io(&a.uri("v"), &["write -P 0x42 0 4M", "flush"]);
    a.stop();
    // Fill the disk to the last block.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", a.dir.join("filler").display()))
        .output()
        .unwrap();
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=512"])
        .arg(format!("of={}", a.dir.join("filler2").display()))
        .output()
        .unwrap();
    a.spawn();
    let node: Value = serde_json::from_str(&call(&a, "GET", "/api/v1/node", "").1).unwrap();
    assert!(node["damaged"].as_array().unwrap().is_empty(), "{node}");
    common::qemu_io(
        &a.uri("v"),
        &[
            "read -P 0x42 0 4M",
            "write -P 0x43 0 64k",
            "read -P 0x43 0 64k",
        ],
    );
}

/// Keeps `count` connections to `addr` open until `stop`: half idle, half
/// "slow" (a byte every second), reopening whatever the server closes —
/// as a client exhausting descriptors and threads would.
fn flood(
    addr: String,
    count: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    /// A TCP or (`unix:PATH`) Unix stream.
    enum Conn {
        Tcp(std::net::TcpStream),
        Unix(std::os::unix::net::UnixStream),
    }
    impl Conn {
        fn open(addr: &str) -> Option<Conn> {
            match addr.strip_prefix("unix:") {
                Some(p) => {
                    let s = std::os::unix::net::UnixStream::connect(p).ok()?;
                    s.set_nonblocking(true).ok()?;
                    Some(Conn::Unix(s))
                }
                None => {
                    let s = std::net::TcpStream::connect(addr).ok()?;
                    s.set_nonblocking(true).ok()?;
                    Some(Conn::Tcp(s))
                }
            }
        }
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            match self {
                Conn::Tcp(s) => s.write(b),
                Conn::Unix(s) => s.write(b),
            }
        }
    }
    std::thread::spawn(move || {
        let mut conns: Vec<Option<Conn>> = (0..count).map(|_| None).collect();
        let mut opened = 0usize;
        while !stop.load(Ordering::SeqCst) {
            for (i, c) in conns.iter_mut().enumerate() {
                if c.is_none() {
                    if let Some(s) = Conn::open(&addr) {
                        *c = Some(s);
                        opened += 1;
                    }
                } else if i % 2 == 1 {
                    let s = c.as_mut().unwrap();
                    if s.write(&[0x16]).is_err() {
                        *c = None;
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        opened
    })
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Finding 4: 700 idle connections to the replication port used up the
/// agent's descriptors (a thread each, no cap, a per-read timeout): the API
/// stopped answering and NBD accepts failed. Now every listener has a cap
/// that evicts unauthenticated connections first and a whole-handshake
/// deadline. Under 2,000 idle and slow connections to each listener, the
/// agent answers its API, serves NBD and keeps its (sync) link.
#[test]
fn thousands_of_idle_and_slow_connections_do_not_stop_the_agent() {
    use std::sync::atomic::{AtomicBool, Ordering};
    raise_nofile();
    let (_root, a, b) = common::agent::two_agents("ferry-flood", "");
    a.ok(&["volume", "create", "vol", "--size", "16MiB"]);
    a.ok(&["replicate", "start", "vol", "--to", "b", "--mode", "sync"]);
    a.ok(&["replicate", "wait", "vol", "--timeout", "60s"]);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let floods: Vec<_> = [
        a.api.clone(),
        b.replication.clone(),
        a.nbd.clone(),
        b.api.clone(),
    ]
    .into_iter()
    .map(|addr| flood(addr, 2000, stop.clone()))
    .collect();
    // Longer than every handshake deadline (10 s), so the flood has filled
    // and refilled every table.
    let t = std::time::Instant::now();
    let mut rounds = 0;
    while t.elapsed() < std::time::Duration::from_secs(14) {
        let asked = std::time::Instant::now();
        let st = a.status("vol");
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(5),
            "the API took {:?} under the flood",
            asked.elapsed()
        );
        assert_eq!(st["link"], "connected", "{st}");
        common::qemu_io(
            &a.uri("vol"),
            &[&format!("write -P 0x{:x} 0 64k", 0x20 + rounds), "flush"],
        );
        rounds += 1;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    stop.store(true, Ordering::SeqCst);
    let opened: usize = floods.into_iter().map(|f| f.join().unwrap()).sum();
    assert!(opened >= 8000, "the flood opened only {opened} connections");
    // Every write went through the sync link: b has the last one.
    a.ok(&["replicate", "wait", "vol", "--timeout", "30s"]);
    let st = a.json(&["volume", "verify", "vol"]);
    assert_eq!(st["equal"], true, "{st}");
    let metrics = common::https(&a.api, "/metrics", None).1;
    assert!(
        metrics.contains("ferry_listener_evicted_total{listener=\"api\"}"),
        "{metrics}"
    );
}

/// A TCP relay `listen → to` recording every byte both ways (what a man in
/// the middle on the path sees).
fn recording_relay(to: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let Ok(up) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            for (mut from, mut into) in [(c.try_clone().unwrap(), up.try_clone().unwrap()), (up, c)]
            {
                let seen = s2.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = into.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (addr, seen)
}

/// Finding 5: `node add` sent the API token and the heartbeat key in clear,
/// and pinned whatever certificate came over that same plain connection.
/// Now the API is HTTPS only, pairing pins only the fingerprint the
/// operator gives, and neither secret crosses the wire readable.
#[test]
fn pairing_sends_no_secret_in_clear_and_pins_only_the_given_fingerprint() {
    let root = tempfile::Builder::new()
        .prefix("ferry-sec")
        .tempdir()
        .unwrap();
    let a = Agent::start(root.path(), "a", "");
    let b = Agent::start(root.path(), "b", "");
    // Plain HTTP gets no HTTP answer.
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/api/v1/node", a.api))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000");

    let (relay, seen) = recording_relay(b.api.clone());
    let tok = a.dir.join("peer-token");
    std::fs::write(&tok, b.token()).unwrap();
    let add = |fp: &str| {
        a.cli()
            .args(["node", "add", "b", "--api", &relay, "--token-file"])
            .arg(&tok)
            .args(["--fingerprint", fp])
            .output()
            .unwrap()
    };
    // A wrong fingerprint (a man in the middle's certificate): refused,
    // nothing registered on either side.
    let out = add(&a.fingerprint());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a pinned one"),
        "{out:?}"
    );
    assert_eq!(a.json(&["node", "list"]).as_array().unwrap().len(), 0);
    assert_eq!(b.json(&["node", "list"]).as_array().unwrap().len(), 0);
    // Without --fingerprint and no terminal: told what to check, nothing pinned.
    let out = a
        .cli()
        .args(["node", "add", "b", "--api", &relay, "--token-file"])
        .arg(&tok)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains(&b.fingerprint()) && err.contains("ferry node id"),
        "{err}"
    );

    let out = add(&b.fingerprint());
    assert!(out.status.success(), "{out:?}");
    let listed = b.json(&["node", "list"]);
    assert_eq!(
        listed[0]["fingerprint"],
        a.fingerprint().as_str(),
        "{listed}"
    );
    let bytes = seen.lock().unwrap().clone();
    assert!(bytes.len() > 1000, "the relay saw {} bytes", bytes.len());
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        !contains(&b.token()),
        "b's API token crossed the wire in clear"
    );
    assert!(
        !contains(&a.token()),
        "a's API token crossed the wire in clear"
    );
    let peers = std::fs::read_to_string(a.dir.join("peers.json")).unwrap();
    let key = serde_json::from_str::<Value>(&peers).unwrap()["body"][0]["heartbeat_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !key.is_empty() && !contains(&key),
        "the heartbeat key crossed the wire in clear"
    );
    assert!(!contains("BEGIN CERTIFICATE") && !contains("\"heartbeat_key\""));
    // The peer's token is not stored.
    assert!(!peers.contains(&b.token()), "{peers}");
}

/// `ferry token rotate` and `ferry node rekey`: the old token stops working
/// at once; after a rekey the peer pins the new certificate and the link
/// and peer calls go on with it.
#[test]
fn token_rotation_and_rekey_take_effect_at_once() {
    let (_root, a, b) = common::agent::two_agents("ferry-rekey", "");
    let old_token = a.token();
    a.ok(&["token", "rotate"]);
    assert_ne!(a.token(), old_token);
    assert_eq!(
        common::https(&a.api, "/api/v1/volumes", Some(&old_token)).0,
        401
    );
    assert_eq!(
        common::https(&a.api, "/api/v1/volumes", Some(&a.token())).0,
        200
    );

    a.ok(&["volume", "create", "vol", "--size", "8MiB"]);
    a.ok(&["replicate", "start", "vol", "--to", "b"]);
    a.ok(&["replicate", "wait", "vol", "--timeout", "60s"]);
    let old_fp = a.fingerprint();
    let r = a.json(&["node", "rekey"]);
    let new_fp = a.fingerprint();
    assert_ne!(old_fp, new_fp);
    assert_eq!(r["fingerprint"], new_fp.as_str(), "{r}");
    assert_eq!(
        r["peers_still_accepting_old"].as_array().unwrap().len(),
        0,
        "{r}"
    );
    let peers = std::fs::read_to_string(b.dir.join("peers.json")).unwrap();
    assert!(
        peers.contains(&new_fp) && !peers.contains(&old_fp),
        "{peers}"
    );
    // New connections use the new key: a restart of a reconnects the link.
    let mut a = a;
    a.stop();
    a.spawn();
    common::qemu_io(&a.uri("vol"), &["write -P 0x5c 0 1M", "flush"]);
    a.ok(&["replicate", "wait", "vol", "--timeout", "60s"]);
    assert_eq!(a.json(&["volume", "verify", "vol"])["equal"], true);
}

/// `method path` with `token` and, unless GET/DELETE, a malformed JSON body
/// (so that an allowed call stops at its body, before it acts): the status.
/// The status of `GET /api/v1/events` with `token`, read within 3 s (the
/// stream itself does not end).
fn event_stream_status(api: &str, token: &str) -> u16 {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-k",
            "-m",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("https://{api}/api/v1/events"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn status_malformed(api: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let body = (method != "GET" && method != "DELETE").then_some("{");
    common::https_request(api, method, path, token, body)
}

/// Issue 19: named tokens with roles. Walk the route table: every route
/// states the least role it needs; a token below it gets 403 naming both,
/// a token with exactly it gets past the check; peer-internal routes refuse
/// every token, even an admin's, and take a paired node's certificate.
#[test]
fn every_route_enforces_the_least_role_it_states() {
    common::require("curl");
    let (_root, a, b) = common::agent::two_agents("ferry-roles-", "");
    let rank = |r: &str| ["viewer", "operator", "admin"].iter().position(|x| *x == r);
    let mut tokens = Vec::new();
    for role in ["viewer", "operator", "admin"] {
        let name = format!("t-{role}");
        let out = a.ok(&["token", "create", &name, "--role", role]);
        let token = out.trim().to_string();
        assert!(token.starts_with(&format!("{name}.")), "{out}");
        tokens.push((role, token));
    }
    // Shown once: the list and the file hold no secret.
    let list = a.json(&["token", "list"]);
    let text = list.to_string() + &std::fs::read_to_string(a.dir.join("tokens.json")).unwrap();
    for (_, t) in &tokens {
        assert!(!text.contains(t.rsplit_once('.').unwrap().1), "{text}");
    }
    assert_eq!(list[0]["name"], "api.token", "{list}");
    assert_eq!(list[1]["role"], "viewer", "{list}");

    // A paired node's certificate passes a peer-internal route; tokens do not.
    let peer_route = "/api/v1/volumes/nosuch/inconsistent";
    let (code, body) =
        common::https_request_as(&b.api, "POST", peer_route, Some(&a.dir), None, Some("{"));
    assert!(code != 401 && code != 403, "{code} {body}");
    let (code, body) = status_malformed(&b.api, "POST", peer_route, Some(&b.token()));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("peer-internal"), "{body}");

    let table = routes(&a);
    assert!(table.len() > 40, "{table:?}");
    let mut checked = 0;
    for (method, path, need) in &table {
        let path = path.replace("{name}", "nosuch").replace("{which}", "start");
        assert_eq!(
            status_malformed(&a.api, method, &path, None).0,
            401,
            "{method} {path}"
        );
        for (role, token) in &tokens {
            let (code, body) = if path == "/api/v1/events" {
                // A stream that stays open: its status, then hang up.
                (event_stream_status(&a.api, token), String::new())
            } else {
                status_malformed(&a.api, method, &path, Some(token))
            };
            match rank(need) {
                None => {
                    assert_eq!(need, "peer", "{method} {path}: unknown need");
                    assert_eq!(code, 403, "{method} {path} with {role}: {body}");
                }
                Some(n) if rank(role).unwrap() < n => {
                    assert_eq!(code, 403, "{method} {path} ({need}) with {role}: {body}");
                    assert!(
                        body.contains(&format!("is {role}; this needs {need}")),
                        "{body}"
                    );
                }
                Some(n) if rank(role).unwrap() == n => {
                    assert!(
                        code != 401 && code != 403,
                        "{method} {path} ({need}) with {role}: {code} {body}"
                    );
                    checked += 1;
                }
                Some(_) => {}
            }
        }
    }
    assert!(checked > 30, "{checked}");
    // The actions that can lose data or run code as root are admin's, and
    // the handover's inner steps are a peer's.
    let need_of = |m: &str, p: &str| {
        table
            .iter()
            .find(|(mm, pp, _)| mm == m && pp == p)
            .map(|r| r.2.clone())
            .unwrap_or_else(|| panic!("{m} {p} not in the table"))
    };
    for (m, p) in [
        ("POST", "/api/v1/cluster/workloads/{name}/promote"),
        (
            "POST",
            "/api/v1/cluster/workloads/{name}/resolve-split-brain",
        ),
        ("POST", "/api/v1/cluster/workloads/{name}/drop-copy"),
        ("DELETE", "/api/v1/volumes/{name}"),
        ("POST", "/api/v1/shares"),
        ("PUT", "/api/v1/workloads/{name}"),
        ("POST", "/api/v1/tokens"),
        ("POST", "/api/v1/nodes"),
    ] {
        assert_eq!(need_of(m, p), "admin", "{m} {p}");
    }
    for (m, p) in [
        ("POST", "/api/v1/volumes/{name}/promote"),
        ("POST", "/api/v1/workloads/{name}/takeover"),
        ("POST", "/api/v1/volumes/{name}/inconsistent"),
        ("POST", "/api/v1/volumes/{name}/snapshot"),
        ("POST", "/api/v1/replicas"),
    ] {
        assert_eq!(need_of(m, p), "peer", "{m} {p}");
    }
    assert_eq!(
        need_of("POST", "/api/v1/migrations/{name}/cutover"),
        "operator"
    );
    assert_eq!(need_of("GET", "/api/v1/migrations"), "viewer");

    // Revoked, a token stops working at once; a viewer cannot make tokens.
    let viewer = &tokens[0].1;
    let (code, _) = common::https_request(
        &a.api,
        "POST",
        "/api/v1/tokens",
        Some(viewer),
        Some(r#"{"name":"x","role":"admin"}"#),
    );
    assert_eq!(code, 403);
    assert_eq!(
        status_malformed(&a.api, "GET", "/api/v1/volumes", Some(viewer)).0,
        200
    );
    a.ok(&["token", "revoke", "t-viewer"]);
    assert_eq!(
        status_malformed(&a.api, "GET", "/api/v1/volumes", Some(viewer)).0,
        401
    );
    let out = a
        .cli()
        .args(["token", "revoke", "api.token"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("ferry token rotate"));
    let out = a
        .cli()
        .args(["token", "create", "../x", "--role", "admin"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Issue 19, bad input: each answer's status says what is wrong — a body
/// that does not fit the request (unknown field, wrong type) 400 naming the
/// field, a name outside the grammar 400 naming the rule, a body over
/// `api.body_bytes_max` 413, an unknown name 404, the wrong state 409 saying
/// which state it needs, a peer that does not answer 503 — and nothing is
/// touched.
#[test]
fn bad_requests_get_the_status_that_says_why() {
    common::require("curl");
    let (_root, a, mut b) = common::agent::two_agents("ferry-badreq-", "");
    let t = a.token();
    let post =
        |path: &str, body: &str| common::https_request(&a.api, "POST", path, Some(&t), Some(body));
    let (code, body) = post(
        "/api/v1/volumes",
        r#"{"name":"v","size_bytes":1048576,"colour":1}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown field `colour`"), "{body}");
    let (code, body) = post("/api/v1/volumes", r#"{"name":5,"size_bytes":1048576}"#);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("name") && body.contains("invalid type"),
        "{body}"
    );
    let (code, body) = post("/api/v1/volumes", r#"{"name":"../x","size_bytes":1048576}"#);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("must start with a-z or 0-9"),
        "the rule is named: {body}"
    );
    assert_eq!(body.matches("invalid name").count(), 1, "said once: {body}");
    let big = format!(
        r#"{{"name":"v","size_bytes":1048576,"pad":"{}"}}"#,
        "x".repeat(1100 * 1024)
    );
    let big_file = a.dir.join("..").join("big.json");
    std::fs::write(&big_file, &big).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
        ])
        .args(["-H", &format!("Authorization: Bearer {t}")])
        // No `Expect: 100-continue`: curl would report the interim 100.
        .args([
            "-H",
            "Expect:",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", big_file.display()))
        .arg(format!("https://{}/api/v1/volumes", a.api))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413");
    assert!(a.json(&["volume", "list"]).as_array().unwrap().is_empty());

    a.ok(&["volume", "create", "v", "--size", "64MiB"]);
    let (code, body) = post("/api/v1/volumes", r#"{"name":"v","size_bytes":1048576}"#);
    assert_eq!(code, 409, "{body}");
    let (code, body) = post("/api/v1/migrations/nosuch/cutover", "{}");
    assert_eq!(code, 404, "{body}");
    // Seeding at 1 MiB/s: a cutover needs `ready`.
    common::qemu_io(&a.uri("v"), &["write -P 0x33 0 32M"]);
    a.ok(&["workload", "create", "w", "--volume", "v"]);
    a.ok(&["migrate", "start", "w", "--to", "b", "--max-rate", "1MiB/s"]);
    let (code, body) = post("/api/v1/migrations/w/cutover", "{}");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not ready"), "{body}");
    // The peer is gone: what needs it answers 503.
    b.stop();
    a.ok(&["volume", "create", "v2", "--size", "1MiB"]);
    a.ok(&["workload", "create", "w2", "--volume", "v2"]);
    let (code, body) = post("/api/v1/migrations", r#"{"workload":"w2","to":"b"}"#);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot reach"), "{body}");
}

/// Every record file under `dir` (the agent's data dir), recursively.
fn record_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() && !p.ends_with("data") && !p.ends_with("orphans") {
            out.extend(record_files(&p));
        } else if ft.is_file() && p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
    out
}

/// Issue 19: records are typed, versioned and checksummed. A data directory
/// in the format before (each record bare JSON, as the previous release
/// wrote it) is read and upgraded at first start; a record whose body no
/// longer matches its checksum, or of a newer format, is reported damaged
/// naming the file, and left exactly as it is.
#[test]
fn records_of_the_previous_format_upgrade_and_damaged_ones_are_left_alone() {
    require_tools();
    let (_root, mut a, b) = common::agent::two_agents("ferry-store-", "");
    a.ok(&["volume", "create", "v", "--size", "4MiB"]);
    common::qemu_io(&a.uri("v"), &["write -P 0x5c 0 1M"]);
    a.ok(&["workload", "create", "w", "--volume", "v"]);
    a.ok(&["migrate", "start", "w", "--to", "b"]);
    common::agent::wait_until(60, "ready", || {
        a.json(&["migrate", "status", "w"])["phase"] == "ready"
    });
    let logs = a.dir.join("..").join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("f"), b"hello").unwrap();
    a.ok(&[
        "share",
        "create",
        "logs",
        "--path",
        logs.to_str().unwrap(),
        "--mode",
        "async",
        "--to",
        "b",
    ]);
    a.ok(&["token", "create", "ops", "--role", "operator"]);
    a.stop();
    // Back to the previous release's format: every record bare.
    let files = record_files(&a.dir);
    let kinds: Vec<String> = files
        .iter()
        .map(|p| {
            let v: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            let kind = v["ferry_record"]
                .as_str()
                .unwrap_or_else(|| panic!("{} has no envelope", p.display()))
                .to_string();
            std::fs::write(p, serde_json::to_vec_pretty(&v["body"]).unwrap()).unwrap();
            kind
        })
        .collect();
    for k in [
        "volume",
        "workload",
        "migration",
        "share",
        "peers",
        "tokens",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} record in {kinds:?}");
    }
    a.spawn();
    let node = a.json(&["node", "show"]);
    assert_eq!(node["damaged"], serde_json::json!([]), "{node}");
    assert_eq!(a.json(&["migrate", "status", "w"])["target"], "b");
    assert_eq!(a.json(&["share", "status", "logs"])["role"], "primary");
    common::qemu_io(&a.uri("v"), &["read -P 0x5c 0 1M"]);
    for p in &files {
        let v: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        assert!(
            v["ferry_record"].is_string() && v["blake3"].is_string(),
            "{} not upgraded: {v}",
            p.display()
        );
    }
    // Damage: a changed body, a newer format. Both left as they are.
    a.stop();
    let mig = a.dir.join("migrations/w.json");
    let changed = std::fs::read_to_string(&mig)
        .unwrap()
        .replacen("\"b\"", "\"c\"", 1);
    std::fs::write(&mig, &changed).unwrap();
    let vol = a.dir.join("volumes/v/volume.json");
    let newer = std::fs::read_to_string(&vol)
        .unwrap()
        .replace("\"version\": 1", "\"version\": 99");
    std::fs::write(&vol, &newer).unwrap();
    a.spawn();
    let damaged = a.json(&["node", "show"])["damaged"].clone();
    let says = |kind: &str, what: &str| {
        damaged
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["kind"] == kind && d["error"].as_str().unwrap().contains(what))
    };
    assert!(says("migration", "checksum does not match"), "{damaged}");
    assert!(says("volume", "newer than this ferry reads"), "{damaged}");
    assert!(
        says("volume", "volume.json"),
        "the file is named: {damaged}"
    );
    assert_eq!(std::fs::read_to_string(&mig).unwrap(), changed);
    assert_eq!(std::fs::read_to_string(&vol).unwrap(), newer);
    drop(b);
}

fn require_tools() {
    common::require("qemu-io");
}
