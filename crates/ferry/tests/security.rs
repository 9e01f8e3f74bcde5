//! Issue 17's findings, each as a test that fails if the hole comes back:
//! every API route needs a token, names cannot climb out of the data dir,
//! secrets are refused when others can read them.

mod common;

use std::process::Command;

use common::agent::Agent;
use serde_json::Value;

/// The HTTP status of `method path` on `api`, with `token` (or none).
fn status(api: &str, method: &str, path: &str, token: Option<&str>) -> u16 {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"])
        .args(["-X", method, "-H", "Content-Type: application/json"]);
    if method != "GET" && method != "DELETE" {
        c.args(["--data", "{}"]);
    }
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(format!("http://{api}{path}")).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The route table the agent is built from (`ferry api routes --json`).
fn routes(a: &Agent) -> Vec<(String, String)> {
    let v: Value = a.json(&["api", "routes"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Finding 1: share and cluster routes answered without a token. Walk the
/// router's own table: every method and path refuses a missing or wrong
/// token with 401; only `GET /metrics` is open.
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
            table.iter().any(|(_, p)| p == needed),
            "{needed} not in the table"
        );
    }
    for (method, path) in &table {
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
}

/// `method path` on `api` with the agent's token and a JSON body: (status, body).
fn call(a: &Agent, method: &str, path: &str, body: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "30", "-w", "\n%{http_code}", "-X", method])
        .args(["-H", "Content-Type: application/json"])
        .args(["-H", &format!("Authorization: Bearer {}", a.token())])
        .args(["--data", body])
        .arg(format!("http://{}{path}", a.api))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Finding 2: names became paths unchecked. `..%2F..%2Fprecious` deleted a
/// `.json` file outside the data dir; a workload naming volume `../../q`
/// let `drop-copy` delete a file outside. Every name now passes one grammar
/// before it can become a path, and these are refused with 400.
#[test]
fn names_cannot_climb_out_of_the_data_dir() {
    common::require("curl");
    let root = tempfile::Builder::new().prefix("ferry-sec").tempdir().unwrap();
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
        ("POST", "/api/v1/workloads", r#"{"name":"w","volumes":["../../q"]}"#),
        ("POST", "/api/v1/workloads", r#"{"name":"../w","volumes":["v"]}"#),
        ("PUT", "/api/v1/workloads/w", r#"{"name":"w","volumes":["../../q"]}"#),
        ("POST", "/api/v1/volumes", r#"{"name":"../../q","size_bytes":1048576}"#),
        ("POST", "/api/v1/volumes", r#"{"name":"disk0@test","size_bytes":1048576}"#),
        ("POST", "/api/v1/shares", r#"{"name":"../../q","mode":"async","path":"/tmp/x"}"#),
        ("POST", "/api/v1/cluster/workloads/..%2F..%2Fq/drop-copy", "{}"),
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
