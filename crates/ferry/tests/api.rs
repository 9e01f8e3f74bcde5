//! Issue 19, one typed API: the OpenAPI 3.1 document the agent serves is
//! valid for a real validator (`openapi-spec-validator` from PyPI), and the
//! replies the agent gives fit their schemas — checked by a real JSON Schema
//! validator (`scripts/check-api-replies`, the check `scripts/test` runs on
//! every reply of the whole suite), which fails on a reply that does not.
//!
//! The validators live in the venv `scripts/install-deps` makes
//! (`/opt/ferry-venv`, or `FERRY_VENV`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::agent::Agent;
use serde_json::Value;

/// The venv with the validators; a clear failure when it is missing.
fn venv() -> PathBuf {
    let v = PathBuf::from(std::env::var("FERRY_VENV").unwrap_or_else(|_| "/opt/ferry-venv".into()));
    assert!(
        v.join("bin/openapi-spec-validator").exists() && v.join("bin/python").exists(),
        "{} has no openapi-spec-validator: run scripts/install-deps (it makes the venv with openapi-spec-validator and jsonschema)",
        v.display()
    );
    v
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the OpenAPI validator on `doc`: (success, output).
fn validate_document(doc: &Value, dir: &Path) -> (bool, String) {
    let file = dir.join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = Command::new(venv().join("bin/openapi-spec-validator"))
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Runs the reply check on `log` against `doc`: (success, output).
fn check_replies(doc: &Path, log: &Path) -> (bool, String) {
    let out = Command::new(venv().join("bin/python"))
        .arg(repo().join("scripts/check-api-replies"))
        .arg(doc)
        .arg(log)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_served_openapi_document_is_valid_openapi_3_1() {
    common::require("curl");
    let root = tempfile::Builder::new()
        .prefix("ferry-oapi")
        .tempdir()
        .unwrap();
    let a = Agent::start(root.path(), "a", "");
    // Needs a token like every route but /metrics.
    let (code, _) = common::https(&a.api, "/api/v1/openapi.json", None);
    assert_eq!(code, 401);
    let (code, body) = common::https(&a.api, "/api/v1/openapi.json", Some(&a.token()));
    assert_eq!(code, 200, "{body}");
    let served: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["openapi"], "3.1.0");
    // The CLI prints the same document without an agent.
    let printed: Value = serde_json::from_str(&a.ok(&["api", "openapi"])).unwrap();
    assert_eq!(printed, served);
    // Every route of the table is in it, with its need.
    let routes = a.json(&["api", "routes"]);
    for r in routes.as_array().unwrap() {
        let op = &served["paths"][r["path"].as_str().unwrap()]
            [r["method"].as_str().unwrap().to_ascii_lowercase()];
        assert_eq!(op["x-ferry-need"], r["need"], "{r}");
    }
    let (ok, out) = validate_document(&served, root.path());
    assert!(ok, "openapi-spec-validator refused the document: {out}");
    // Each action states the node states it is allowed in: an HA action on
    // a node without a [cluster] table is 409 naming what it needs.
    assert_eq!(
        served["paths"]["/api/v1/cluster/workloads/{name}/switchover"]["post"]
            ["x-ferry-allowed-in"],
        serde_json::json!(["clustered", "standby"])
    );
    let (code, body) = common::https_request(
        &a.api,
        "POST",
        "/api/v1/cluster/workloads/w/switchover",
        Some(&a.token()),
        Some("{}"),
    );
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("needs a node with a [cluster] table") && body.contains("standalone"),
        "{body}"
    );
    // The validator is real: a path parameter the operation does not
    // declare, or a schema of an unknown type, is refused.
    let mut broken = served.clone();
    broken["paths"]["/api/v1/volumes/{name}"]["delete"]
        .as_object_mut()
        .unwrap()
        .remove("parameters");
    let (ok, out) = validate_document(&broken, root.path());
    assert!(!ok, "an undeclared path parameter passed: {out}");
    let mut broken = served;
    broken["components"]["schemas"]["CutoverReport"]["properties"]["downtime_ms"]["type"] =
        "float".into();
    let (ok, out) = validate_document(&broken, root.path());
    assert!(!ok, "a schema of type float passed: {out}");
}

#[test]
fn replies_fit_their_schemas_and_the_check_catches_one_that_does_not() {
    common::require("curl");
    venv();
    let (root, a, b) = common::agent::two_agents("ferry-replies-", "");
    let log = root.path().join("replies.jsonl");
    let run = |agent: &Agent, args: &[&str]| {
        let out = agent
            .cli()
            .env("FERRY_API_REPLY_LOG", &log)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A spread of actions: nodes, tokens, volumes, replication (both ends),
    // workloads, hooks, errors.
    run(&a, &["node", "show"]);
    run(&a, &["node", "list"]);
    run(&a, &["token", "create", "ops", "--role", "operator"]);
    run(&a, &["token", "list"]);
    run(&a, &["volume", "create", "v", "--size", "4MiB"]);
    run(&a, &["replicate", "start", "v", "--to", "b"]);
    run(&a, &["replicate", "wait", "v", "--timeout", "30s"]);
    run(&a, &["replicate", "status"]);
    run(&b, &["replicate", "status", "v"]);
    run(&a, &["volume", "verify", "v"]);
    run(
        &a,
        &[
            "workload", "create", "w", "--volume", "v", "--start", "true",
        ],
    );
    run(&a, &["workload", "list"]);
    run(&a, &["workload", "start", "w"]);
    run(&a, &["workload", "update", "w", "--stop", "true"]);
    run(&a, &["cluster", "status"]);
    run(&a, &["share", "status"]);
    let failed = a
        .cli()
        .env("FERRY_API_REPLY_LOG", &log)
        .args(["migrate", "status", "nosuch"])
        .output()
        .unwrap();
    assert!(!failed.status.success());

    let doc = root.path().join("openapi.json");
    std::fs::write(&doc, a.ok(&["api", "openapi"])).unwrap();
    let (ok, out) = check_replies(&doc, &log);
    assert!(ok, "{out}");
    assert!(out.contains("checked "), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() >= 17, "{text}");
    assert!(
        text.contains("\"status\":404"),
        "the error was logged too: {text}"
    );

    // One reply with a field of the wrong type: the check fails, naming it.
    let tokens: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["route"] == "/api/v1/tokens" && l["method"] == "GET")
        .expect("the token list was logged");
    let mut bad = tokens.clone();
    bad["body"][0]["created_unix"] = "yesterday".into();
    let bad_log = root.path().join("bad.jsonl");
    std::fs::write(&bad_log, format!("{text}{bad}\n")).unwrap();
    let (ok, out) = check_replies(&doc, &bad_log);
    assert!(!ok, "a reply with a wrong type passed: {out}");
    assert!(
        out.contains("/api/v1/tokens") && out.contains("created_unix"),
        "{out}"
    );
    // And a reply missing a field.
    let mut bad = tokens;
    bad["body"][0].as_object_mut().unwrap().remove("scope");
    std::fs::write(&bad_log, format!("{bad}\n")).unwrap();
    let (ok, out) = check_replies(&doc, &bad_log);
    assert!(!ok && out.contains("scope"), "{out}");
}
