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
