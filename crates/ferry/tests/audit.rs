//! The audit log, for real: two agents (a cluster pair with a witness, on
//! 127.0.0.1), actions by a named token and a migration with its cutover;
//! `ferry audit list` shows them with the token's name and both nodes'
//! records of the cutover share its operation id; `ferry audit verify`
//! passes, fails after one byte of the log changed on disk, and fails
//! after the chain was rewritten consistently (every hash recomputed) —
//! revealed by the heads the peer and the witness hold.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::agent::{free_port, pair, wait_until, Agent};
use common::ferry_bin;
use ferry_core::audit as chain;
use serde_json::Value;

/// The witness process, killed (by PID) and reaped on drop.
struct Witness(Child);

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_witness(root: &Path, port: u16, key: &Path) -> Witness {
    let dir = root.join("w");
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(root.join("w.log")).unwrap();
    let mut child = Command::new(ferry_bin())
        .args(["witness", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--key-file")
        .arg(key)
        .env("FERRY_DATA_DIR", &dir)
        .env("FERRY_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("witness"), "witness did not start: {line}");
    Witness(child)
}

fn cluster_toml(peer: &str, witness: u16, key: &Path) -> String {
    format!(
        "\n[cluster]\npeer = \"{peer}\"\nheartbeat = [\"127.0.0.1:{}\"]\nwitness = \"127.0.0.1:{witness}\"\nwitness_key_file = \"{}\"\n\n[audit]\nhead_interval_ms = 200\n",
        free_port(),
        key.display()
    )
}

/// `ferry --json audit verify` at `a`: (exit ok, the report, stderr).
fn verify(a: &Agent) -> (bool, Value, String) {
    let out = a
        .cli()
        .args(["--json", "audit", "verify"])
        .output()
        .unwrap();
    // The report, then (on failure) `{"error": …}` on a line of its own.
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = stdout
        .lines()
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn records(a: &Agent, env_token: Option<&str>) -> Vec<Value> {
    let mut c = a.cli();
    if let Some(t) = env_token {
        c.env("FERRY_TOKEN", t);
    }
    let out = c.args(["--json", "audit", "list"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["records"].as_array().unwrap().clone()
}

fn log_path(a: &Agent) -> PathBuf {
    a.dir.join("audit").join("audit.log")
}

#[test]
fn the_audit_log_records_who_did_what_and_reveals_a_rewrite() {
    let root = tempfile::Builder::new()
        .prefix("ferry-audit-")
        .tempdir()
        .unwrap();
    let key = root.path().join("witness.key");
    std::fs::write(&key, "audit-test-witness-key-0123456789\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wport = free_port();
    let _witness = start_witness(root.path(), wport, &key);
    let mut a = Agent::configure(root.path(), "a", "", &cluster_toml("b", wport, &key), &[]);
    a.spawn();
    let mut b = Agent::configure(root.path(), "b", "", &cluster_toml("a", wport, &key), &[]);
    b.spawn();
    pair(&a, &b);

    // Actions by a named admin token: one that works, one refused.
    let alice = a.ok(&["token", "create", "alice", "--role", "admin"]);
    let alice = alice.trim().to_string();
    let as_alice = |args: &[&str]| {
        let out = a
            .cli()
            .env("FERRY_TOKEN", &alice)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert!(as_alice(&["token", "create", "bob", "--role", "viewer"]).0);
    let (ok, err) = as_alice(&["token", "revoke", "nobody"]);
    assert!(!ok, "{err}");

    // A migration and its cutover: both nodes record the cutover's peer
    // calls under one operation id.
    a.ok(&["volume", "create", "app", "--size", "16MiB"]);
    a.ok(&["workload", "create", "web", "--volume", "app"]);
    a.ok(&["migrate", "start", "web", "--to", "b"]);
    wait_until(60, "migration ready", || {
        a.json(&["migrate", "status", "web"])["phase"] == "ready"
    });
    let report = a.json(&["migrate", "cutover", "web"]);
    assert_eq!(report["to"], "b", "{report}");

    // `audit list` (as a viewer: bob may read it) shows who did what.
    let bob = a.ok(&["token", "create", "bob2", "--role", "viewer"]);
    let recs = records(&a, Some(bob.trim()));
    let find = |action: &str, phase: &str| -> Vec<&Value> {
        recs.iter()
            .map(|r| &r["record"])
            .filter(|r| r["action"] == action && r["phase"] == phase)
            .collect()
    };
    let created = find("CreateToken", "request");
    let by_alice = created
        .iter()
        .find(|r| r["token"] == "alice")
        .unwrap_or_else(|| panic!("no CreateToken by alice: {recs:#?}"));
    assert_eq!(by_alice["role"], "admin");
    assert_eq!(by_alice["request"]["body"]["name"], "bob");
    assert!(by_alice["from"].as_str().unwrap().starts_with("127.0.0.1:"));
    let op = by_alice["op"].as_str().unwrap();
    let result = find("CreateToken", "result")
        .into_iter()
        .find(|r| r["op"] == op)
        .expect("the result record of alice's CreateToken");
    assert_eq!(result["result"]["ok"], true);
    let refused = find("RevokeToken", "result")
        .into_iter()
        .find(|r| r["token"] == "alice")
        .expect("alice's refused revoke");
    assert_eq!(refused["result"]["ok"], false);
    assert_eq!(refused["result"]["error"]["kind"], "not-found");
    // The secret a `node add` carried is not in the log.
    let added = find("AddNode", "request");
    assert_eq!(
        added[0]["request"]["body"]["token"], "<redacted>",
        "{recs:#?}"
    );
    // The cutover at a, and its takeover at b, share the operation id.
    let cut = find("Cutover", "request");
    let cut_op = cut[0]["op"].as_str().unwrap();
    let b_recs = records(&b, None);
    let takeover = b_recs
        .iter()
        .map(|r| &r["record"])
        .find(|r| r["action"] == "Takeover" && r["phase"] == "request")
        .unwrap_or_else(|| panic!("no takeover at b: {b_recs:#?}"));
    assert_eq!(takeover["op"], cut_op, "{takeover}");
    assert_eq!(takeover["peer"], "a");

    // --since: an age, or a time.
    let since = |s: &str| {
        a.json(&["audit", "list", "--since", s])["records"]
            .as_array()
            .unwrap()
            .len()
    };
    assert!(since("1h") >= recs.len());
    assert_eq!(since("2999-01-01T00:00:00Z"), 0);

    // The heads reach the peer and the witness, and verify passes.
    let head = recs.last().unwrap()["seq"].as_u64().unwrap();
    wait_until(20, "heads at the peer and the witness", || {
        let (ok, v, err) = verify(&a);
        assert!(ok, "{v} {err}");
        let holders = v["holders"].as_array().unwrap();
        holders.len() == 2
            && holders.iter().all(|h| {
                h["newest"]
                    .as_str()
                    .and_then(|n| n.split(':').next())
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s >= head)
            })
    });
    let out = a.ok(&["audit", "verify"]);
    assert!(out.contains("ok: the chain is whole"), "{out}");

    // One byte changed on disk: verify fails naming that record.
    let path = log_path(&a);
    let original = std::fs::read(&path).unwrap();
    let p = chain::parse(&original);
    let f = p
        .frames
        .iter()
        .find(|f| String::from_utf8_lossy(&f.payload).contains("\"bob\""))
        .unwrap();
    let at = f.offset as usize
        + chain::HEADER_BYTES
        + String::from_utf8_lossy(&f.payload).find("\"bob\"").unwrap()
        + 1;
    let mut changed = original.clone();
    changed[at] = b'r';
    std::fs::write(&path, &changed).unwrap();
    let (ok, v, err) = verify(&a);
    assert!(!ok, "a changed byte passed: {v}");
    assert_eq!(v["first_bad_seq"], f.seq, "{v} {err}");
    assert!(err.contains("was changed"), "{err}");
    std::fs::write(&path, &original).unwrap();
    assert!(verify(&a).0, "restored");

    // A consistent rewrite: the local chain is whole, but the heads held
    // by the peer and the witness do not match it.
    let seq = common::audit_chain::rewrite_consistently(&path, "\"bob\"", "\"eve\"");
    let (ok, v, err) = verify(&a);
    assert!(!ok, "a consistent rewrite passed: {v}");
    assert!(err.contains("rewritten"), "{err}");
    let bad = v["first_bad_seq"].as_u64().unwrap();
    assert!(bad >= seq, "{v}");
    // With the peer down, the witness alone reveals it.
    b.stop();
    let (ok, v, err) = verify(&a);
    assert!(!ok, "{v}");
    assert!(err.contains("witness 127.0.0.1"), "{err}");
    let _ = &mut b;
}

/// An action whose record cannot be written is refused, and not done: the
/// agent runs in a mount namespace of its own (`unshare --mount`: the mount
/// ends with it) with DATA_DIR/audit on a 64 KiB tmpfs left almost full.
#[test]
fn an_action_the_log_cannot_record_is_refused_and_not_done() {
    common::require("unshare");
    let root = tempfile::Builder::new()
        .prefix("ferry-audit-full-")
        .tempdir()
        .unwrap();
    let audit = root.path().join("a").join("audit");
    let script = format!(
        "mkdir -p {d} && mount -t tmpfs -o size=64k,mode=0700 ferry-audit-test {d} && dd if=/dev/zero of={d}/filler bs=4096 count=14 2>/dev/null && exec \"$@\"",
        d = audit.display()
    );
    let a = Agent::start_wrapped(
        root.path(),
        "a",
        "",
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ],
    );
    let mut refused = None;
    for i in 0..200 {
        let name = format!("t{i}");
        let out = a
            .cli()
            .args(["token", "create", &name, "--role", "viewer"])
            .output()
            .unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            if err.contains("nothing was done") {
                refused = Some((name, err));
                break;
            }
            // The request was recorded but not its result: done, and said.
            assert!(err.contains("its result could not be recorded"), "{err}");
        }
    }
    let (name, err) = refused.expect("the full log refused an action");
    assert!(err.contains("audit log"), "{err}");
    let tokens = a.json(&["token", "list"]);
    assert!(
        !tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == name.as_str()),
        "a refused action was done: {tokens}"
    );
    // Space again (in the agent's own mount namespace): the next action
    // reopens the log, cuts what the failed append left, says so, and the
    // chain verifies.
    let out = std::process::Command::new("nsenter")
        .args(["-t", &a.pid().to_string(), "-m", "rm", "-f"])
        .arg(audit.join("filler"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.ok(&["token", "create", "after", "--role", "viewer"]);
    let list = a.json(&["audit", "list"]);
    let records = list["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["record"]["kind"] == "write-failed"),
        "no write-failed record: {list}"
    );
    let v = a.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
}

/// An append a crash interrupted (half a frame at the end of the log) is
/// cut at the next start and a record says so: never a silent gap.
#[test]
fn a_torn_tail_is_cut_at_start_and_recorded() {
    let root = tempfile::Builder::new()
        .prefix("ferry-audit-torn-")
        .tempdir()
        .unwrap();
    let mut a = Agent::start(root.path(), "a", "");
    a.ok(&["token", "create", "ops", "--role", "operator"]);
    a.stop();
    let path = log_path(&a);
    let bytes = std::fs::read(&path).unwrap();
    let p = chain::parse(&bytes);
    let last = p.frames.last().unwrap().head();
    let (frame, _) = chain::encode_record(last.seq + 1, &last.hash, b"{\"kind\":\"lost\"}");
    let mut torn = bytes.clone();
    torn.extend_from_slice(&frame[..frame.len() - 4]);
    std::fs::write(&path, &torn).unwrap();
    a.spawn();
    let recs = records(&a, None);
    let note = &recs.last().unwrap()["record"];
    assert_eq!(note["kind"], "torn-tail", "{recs:#?}");
    assert_eq!(note["offset"], bytes.len() as u64);
    assert_eq!(note["bytes"], (frame.len() - 4) as u64);
    assert_eq!(recs.last().unwrap()["seq"], last.seq + 1);
    assert!(a.log_text().contains("audit.torn_tail"));
    let out = a.ok(&["audit", "verify"]);
    assert!(out.contains("ok: the chain is whole"), "{out}");
}

/// One curl call with a cookie jar (the console's way: the login's cookie,
/// then its CSRF header): (status, body).
fn curl_with_jar(
    api: &str,
    jar: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    csrf: Option<&str>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-k", "-m", "30", "-w", "\n%{http_code}", "-X", method])
        .arg("-c")
        .arg(jar)
        .arg("-b")
        .arg(jar);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    if let Some(t) = csrf {
        c.args(["-H", &format!("X-Ferry-CSRF: {t}")]);
    }
    let out = c.arg(format!("https://{api}{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Console logins are in the audit log: a login (the token's name and
/// role, the client's address), a logout, and failed logins (a bad token:
/// nobody to name, the address) — these at most
/// `audit.failed_logins_per_minute_max` a minute.
#[test]
fn console_logins_logouts_and_failed_logins_are_recorded() {
    common::require("curl");
    let root = tempfile::Builder::new()
        .prefix("ferry-audit-login-")
        .tempdir()
        .unwrap();
    let a = Agent::start(
        root.path(),
        "a",
        "\n[audit]\nfailed_logins_per_minute_max = 2\n",
    );
    let alice = a.ok(&["token", "create", "alice", "--role", "operator"]);
    let jar = root.path().join("cookies");
    let body = serde_json::json!({"token": alice.trim()}).to_string();
    let (code, reply) = curl_with_jar(&a.api, &jar, "POST", "/api/v1/session", Some(&body), None);
    assert_eq!(code, 200, "{reply}");
    let csrf = serde_json::from_str::<Value>(&reply).unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, reply) = curl_with_jar(&a.api, &jar, "DELETE", "/api/v1/session", None, Some(&csrf));
    assert_eq!(code, 200, "{reply}");
    let bad = serde_json::json!({"token": "not-a-token"}).to_string();
    for _ in 0..5 {
        let (code, _) = curl_with_jar(&a.api, &jar, "POST", "/api/v1/session", Some(&bad), None);
        assert_eq!(code, 401);
    }
    let recs: Vec<Value> = records(&a, None)
        .into_iter()
        .map(|r| r["record"].clone())
        .collect();
    let login = recs
        .iter()
        .find(|r| r["action"] == "CreateSession" && r["result"]["ok"] == true)
        .unwrap_or_else(|| panic!("no login recorded: {recs:?}"));
    assert_eq!(login["token"], "alice", "{login}");
    assert_eq!(login["role"], "operator", "{login}");
    assert!(
        login["from"]
            .as_str()
            .is_some_and(|f| f.starts_with("127.0.0.1:")),
        "{login}"
    );
    assert!(login["time_ms"].as_i64().is_some(), "{login}");
    let logout = recs
        .iter()
        .find(|r| r["action"] == "DeleteSession")
        .unwrap_or_else(|| panic!("no logout recorded: {recs:?}"));
    assert_eq!(logout["token"], "alice", "{logout}");
    assert_eq!(logout["result"]["ended"], true, "{logout}");
    let failed: Vec<&Value> = recs
        .iter()
        .filter(|r| r["action"] == "CreateSession" && r["result"]["ok"] == false)
        .collect();
    // Two a minute: 2, or up to 4 if a minute began during the five.
    assert!(
        (2..=4).contains(&failed.len()),
        "{} failed logins recorded: {failed:?}",
        failed.len()
    );
    for f in &failed {
        assert_eq!(f["who"], "unknown token", "{f}");
        assert_eq!(f["result"]["error"]["status"], 401, "{f}");
        assert!(
            f["from"]
                .as_str()
                .is_some_and(|x| x.starts_with("127.0.0.1:")),
            "{f}"
        );
    }
    // The chain still verifies with them in it.
    let (ok, v, err) = verify(&a);
    assert!(ok, "{v} {err}");
}
