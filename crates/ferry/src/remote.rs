//! CLI commands that talk to a running agent over its REST API.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::ByteSize;
use serde_json::{json, Value};

use crate::api::client::ApiClient;
use crate::cli::{
    AgentConn, MigrateCommand, ModeArg, NodeCommand, ReplicateCommand, StateArg, WorkloadCommand,
    WorkloadCreate,
};

/// The API token: FERRY_TOKEN, else `token_file`, else DATA_DIR/api.token.
fn token(token_file: Option<&Path>, data_dir: &Path) -> Result<String> {
    if let Ok(t) = std::env::var("FERRY_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let path = token_file
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::transport::identity::token_path(data_dir));
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .with_context(|| {
            format!(
                "cannot read the API token from {} (set FERRY_TOKEN or --token-file)",
                path.display()
            )
        })
}

/// GET `path` (ending in `?` or `&`), asking the agent to answer once the
/// status' `state` is `want`, after at most `cap_ms` and not past `deadline`
/// (the caller redraws and checks its deadline between requests). An agent
/// that answers at once without reaching it (one that does not wait) is
/// asked again only after `idle`, not in a tight loop.
fn get_waiting(
    c: &ApiClient,
    path: &str,
    want: &str,
    deadline: Instant,
    cap_ms: u128,
    idle: Duration,
) -> Result<Value> {
    let wait_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        .min(cap_ms);
    let asked = Instant::now();
    let v = c.get(&format!("{path}wait_state={want}&wait_ms={wait_ms}"))?;
    if v["state"] != want && asked.elapsed().as_millis() < wait_ms.min(20) {
        std::thread::sleep(idle);
    }
    Ok(v)
}

pub fn client(conn: &AgentConn, data_dir: &Path) -> Result<ApiClient> {
    let api = conn
        .api
        .clone()
        .ok_or_else(|| anyhow!("which agent? pass --api HOST:PORT or set FERRY_API"))?;
    let fingerprint = match &conn.api_fingerprint {
        Some(f) if !f.trim().is_empty() => f.trim().to_string(),
        _ => crate::transport::identity::local_fingerprint(data_dir).with_context(|| {
            format!("cannot tell which certificate the agent at {api} must present: pass --api-fingerprint (or FERRY_API_FINGERPRINT) as `ferry node id` prints it on that node")
        })?,
    };
    ApiClient::operator(
        &api,
        &token(conn.token_file.as_deref(), data_dir)?,
        &fingerprint,
    )
}

/// `ferry token …`.
pub fn token_cmd(cmd: &crate::cli::TokenCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        crate::cli::TokenCommand::Rotate { conn } => {
            let v = client(conn, data_dir)?.post("/api/v1/token/rotate", &json!({}))?;
            print(&v, json, |v| {
                println!(
                    "new API token written to {} on {}; the old one no longer works",
                    v["token_file"].as_str().unwrap_or(""),
                    v["node"].as_str().unwrap_or("")
                )
            })
        }
        crate::cli::TokenCommand::Create { name, role, conn } => {
            let v = client(conn, data_dir)?
                .post("/api/v1/tokens", &json!({"name": name, "role": role}))?;
            print(&v, json, |v| {
                println!("{}", v["token"].as_str().unwrap_or(""));
                eprintln!(
                    "token {name} ({role}) made on {}: the line above is shown only now; it is valid on this node only",
                    v["node"].as_str().unwrap_or("?")
                );
            })
        }
        crate::cli::TokenCommand::List { conn } => {
            let v = client(conn, data_dir)?.get("/api/v1/tokens")?;
            print(&v, json, |v| {
                for t in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<9} {}",
                        t["name"].as_str().unwrap_or("?"),
                        t["role"].as_str().unwrap_or("?"),
                        t["created_unix"]
                            .as_u64()
                            .map_or("(the api.token file)".to_string(), |c| format!(
                                "created {c}"
                            ))
                    );
                }
            })
        }
        crate::cli::TokenCommand::Revoke { name, conn } => {
            let v = client(conn, data_dir)?.delete(&format!("/api/v1/tokens/{name}"))?;
            print(&v, json, |_| {
                println!("token {name} revoked: it no longer works")
            })
        }
    }
}

fn print(v: &Value, json: bool, human: impl FnOnce(&Value)) -> Result<()> {
    if json {
        crate::sys::out::print_json(v)
    } else {
        human(v);
        Ok(())
    }
}

pub fn node(cmd: &NodeCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        NodeCommand::Add {
            name,
            api,
            token_file,
            fingerprint,
        } => {
            let local = client(
                &AgentConn {
                    api: std::env::var("FERRY_API").ok(),
                    token_file: None,
                    api_fingerprint: std::env::var("FERRY_API_FINGERPRINT").ok(),
                },
                data_dir,
            )?;
            let fingerprint = match fingerprint {
                Some(f) => f.trim().to_string(),
                None => {
                    let seen = ApiClient::probe_fingerprint(api)?;
                    if !std::io::stdin().is_terminal() {
                        bail!("the node at {api} presents certificate {seen}; compare it with `ferry node id` on {name} and pass --fingerprint {seen} if it matches");
                    }
                    eprint!("the node at {api} presents certificate\n  {seen}\ncompare it with `ferry node id` on {name}. Pin it? [y/N] ");
                    let mut answer = String::new();
                    std::io::stdin().read_line(&mut answer)?;
                    if !answer.trim().eq_ignore_ascii_case("y") {
                        bail!("not pinned: nothing registered");
                    }
                    seen
                }
            };
            let peer_token = match token_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                None => std::env::var("FERRY_PEER_TOKEN")
                    .map_err(|_| anyhow!("pass the peer's token with --token-file"))?,
            };
            let v = local.post(
                "/api/v1/nodes",
                &json!({"name": name, "api": api, "token": peer_token.trim(), "fingerprint": fingerprint}),
            )?;
            print(&v, json, |v| {
                println!(
                    "registered node {} (fingerprint {}) both ways",
                    v["name"].as_str().unwrap_or(""),
                    v["fingerprint"].as_str().unwrap_or("")
                )
            })
        }
        NodeCommand::Id => {
            let fp = crate::transport::identity::local_fingerprint(data_dir)?;
            print(&json!({"fingerprint": fp}), json, |_| println!("{fp}"))
        }
        NodeCommand::Rekey { conn } => {
            let v = client(conn, data_dir)?.post("/api/v1/node/rekey", &json!({}))?;
            print(&v, json, |v| {
                println!(
                    "{} has a new certificate {} (was {}); pinned by {}",
                    v["node"].as_str().unwrap_or(""),
                    v["fingerprint"].as_str().unwrap_or(""),
                    v["old_fingerprint"].as_str().unwrap_or(""),
                    v["peers"]
                );
                if v["peers_still_accepting_old"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                {
                    println!(
                        "still accepting the old one (run rekey again once they are reachable): {}",
                        v["peers_still_accepting_old"]
                    );
                }
            })
        }
        NodeCommand::List { conn } => {
            let v = client(conn, data_dir)?.get("/api/v1/nodes")?;
            print(&v, json, |v| {
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} api {:<22} replication {:<22} {}",
                        p["name"].as_str().unwrap_or(""),
                        p["api"].as_str().unwrap_or(""),
                        p["replication"].as_str().unwrap_or(""),
                        p["fingerprint"].as_str().unwrap_or("")
                    );
                }
            })
        }
        NodeCommand::Show { conn } => {
            let mut v = client(conn, data_dir)?.get("/api/v1/node")?;
            if let Some(o) = v.as_object_mut() {
                o.remove("cert_pem");
            }
            print(&v, json, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            })
        }
    }
}

fn human_status(v: &Value) -> String {
    let g = |k: &str| v[k].clone();
    let bytes = |k: &str| ByteSize(v[k].as_u64().unwrap_or(0)).to_string();
    if g("role") == "secondary" {
        return format!(
            "{:<16} secondary  peer {:<10} {:<13} applied {}",
            g("volume").as_str().unwrap_or(""),
            g("peer").as_str().unwrap_or("-"),
            g("state").as_str().unwrap_or(""),
            bytes("bytes_applied")
        );
    }
    let eta = match g("eta_seconds").as_u64() {
        Some(s) => format!("{s}s"),
        None => "-".into(),
    };
    let mut line = format!(
        "{:<16} primary → {:<10} {:<5} {:<12} {:<13} {:>5.1}%  dirty {:>10}  backlog {:>10}  {:>10}/s  ETA {}",
        g("volume").as_str().unwrap_or(""),
        g("peer").as_str().unwrap_or("-"),
        g("mode").as_str().unwrap_or(""),
        g("link").as_str().unwrap_or(""),
        g("state").as_str().unwrap_or(""),
        g("synced_percent").as_f64().unwrap_or(0.0),
        bytes("dirty_bytes"),
        bytes("backlog_bytes"),
        bytes("rate_bytes_per_s"),
        eta
    );
    if let Some(e) = g("last_error").as_str() {
        line.push_str(&format!("\n    last error: {e}"));
    }
    line
}

fn progress_bar(v: &Value) -> String {
    let pct = v["synced_percent"].as_f64().unwrap_or(0.0);
    let filled = ((pct / 100.0) * 30.0).round() as usize;
    format!(
        "\r{} [{}{}] {:>5.1}% {} {:>10}/s ETA {}   ",
        v["volume"].as_str().unwrap_or(""),
        "#".repeat(filled.min(30)),
        "-".repeat(30 - filled.min(30)),
        pct,
        v["state"].as_str().unwrap_or(""),
        ByteSize(v["rate_bytes_per_s"].as_u64().unwrap_or(0)).to_string(),
        v["eta_seconds"]
            .as_u64()
            .map(|s| format!("{s}s"))
            .unwrap_or_else(|| "-".into())
    )
}

pub fn replicate(cmd: &ReplicateCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        ReplicateCommand::Start {
            name,
            to,
            mode,
            max_rate,
            checksum,
            conn,
        } => {
            let v = client(conn, data_dir)?.post(
                "/api/v1/replications",
                &json!({
                    "volume": name,
                    "to": to,
                    "mode": if *mode == ModeArg::Sync { "sync" } else { "async" },
                    "max_rate_bytes_per_s": max_rate.map(|r| r.0),
                    "checksum": checksum,
                }),
            )?;
            print(&v, json, |v| {
                println!("replicating {name} to {to}: link up\n{}", human_status(v))
            })
        }
        ReplicateCommand::Wait {
            name,
            state,
            timeout,
            conn,
        } => {
            let c = client(conn, data_dir)?;
            let want = match state {
                StateArg::UpToDate => "up-to-date",
                StateArg::Inconsistent => "inconsistent",
                StateArg::Outdated => "outdated",
            };
            let deadline = Instant::now() + timeout.0;
            let tty = std::io::stderr().is_terminal() && !json;
            loop {
                // At most 0.5 s at a time on a terminal: the progress bar.
                let v = get_waiting(
                    &c,
                    &format!("/api/v1/replications/{name}?"),
                    want,
                    deadline,
                    if tty { 500 } else { 2_000 },
                    Duration::from_millis(20),
                )?;
                if tty {
                    eprint!("{}", progress_bar(&v));
                }
                if v["state"] == want {
                    if tty {
                        eprintln!();
                    }
                    return print(&v, json, |v| println!("{}", human_status(v)));
                }
                if Instant::now() > deadline {
                    if tty {
                        eprintln!();
                    }
                    bail!(
                        "{name} is {} after {:?}, not {want}{}",
                        v["state"].as_str().unwrap_or("?"),
                        timeout.0,
                        v["last_error"]
                            .as_str()
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        ReplicateCommand::Status { name, watch, conn } => {
            let c = client(conn, data_dir)?;
            match name {
                Some(n) if *watch && std::io::stdout().is_terminal() => loop {
                    let v = c.get(&format!("/api/v1/replications/{n}"))?;
                    print!("{}", progress_bar(&v));
                    crate::sys::out::flush_stdout();
                    if v["state"] == "up-to-date" {
                        println!();
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                },
                Some(n) => {
                    let v = c.get(&format!("/api/v1/replications/{n}"))?;
                    print(&v, json, |v| println!("{}", human_status(v)))
                }
                None => {
                    let v = c.get("/api/v1/replications")?;
                    print(&v, json, |v| {
                        let list = v.as_array().cloned().unwrap_or_default();
                        if list.is_empty() {
                            println!("no replications (start one with `ferry replicate start NAME --to NODE`)");
                        }
                        for s in list {
                            println!("{}", human_status(&s));
                        }
                    })
                }
            }
        }
        ReplicateCommand::Set {
            name,
            max_rate,
            conn,
        } => {
            let v = client(conn, data_dir)?.patch(
                &format!("/api/v1/replications/{name}"),
                &json!({"max_rate_bytes_per_s": max_rate.0}),
            )?;
            print(&v, json, |v| println!("{}", human_status(v)))
        }
        ReplicateCommand::Stop { name, conn } => {
            let v = client(conn, data_dir)?.delete(&format!("/api/v1/replications/{name}"))?;
            print(&v, json, |_| {
                println!("stopped replicating {name}; writes are tracked for the next start")
            })
        }
    }
}

pub fn verify(name: &str, conn: &AgentConn, data_dir: &Path, json: bool) -> Result<()> {
    let v = client(conn, data_dir)?.post(&format!("/api/v1/volumes/{name}/verify"), &json!({}))?;
    let equal = v["equal"].as_bool().unwrap_or(false);
    print(&v, json, |v| {
        if equal {
            println!(
                "{name}: equal on {} ({} blocks, Merkle root {})",
                v["peer"].as_str().unwrap_or(""),
                v["blocks"],
                v["root"].as_str().unwrap_or("")
            );
        } else {
            println!(
                "{name}: DIFFERENT from {}",
                v["peer"].as_str().unwrap_or("")
            );
            for d in v["differing"].as_array().into_iter().flatten() {
                println!("  offset {} length {}", d["offset"], d["length"]);
            }
        }
    })?;
    if !equal {
        bail!("volume {name} differs from its replica");
    }
    Ok(())
}

pub fn workload(cmd: &WorkloadCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        WorkloadCommand::Create(c) => {
            let WorkloadCreate {
                name,
                volumes,
                shares,
                start,
                stop,
                check,
                hook_timeout,
                vm_kernel,
                vm_initrd,
                vm_append,
                vm_memory,
                vm_accel,
                vm_args,
                vip,
                vip_interface,
                conn,
            } = &**c;
            let vm = (vm_kernel.is_some() || !vm_args.is_empty()).then(|| {
                json!({
                    "kernel": vm_kernel, "initrd": vm_initrd, "append": vm_append,
                    "memory_mib": vm_memory.bytes() >> 20, "extra_args": vm_args,
                    "accel": vm_accel,
                })
            });
            let v = client(conn, data_dir)?.post(
                "/api/v1/workloads",
                &json!({
                    "name": name, "volumes": volumes, "shares": shares, "start": start, "stop": stop,
                    "check": check, "hook_timeout_ms": hook_timeout.0.as_millis() as u64,
                    "vm": vm, "vip": vip, "vip_interface": vip_interface,
                }),
            )?;
            print(&v, json, |_| {
                let parts: Vec<&str> = volumes.iter().chain(shares).map(String::as_str).collect();
                println!("created workload {name} ({})", parts.join(", "))
            })
        }
        WorkloadCommand::Update(u) => {
            let c = client(&u.conn, data_dir)?;
            let mut spec = c.get(&format!("/api/v1/workloads/{}", u.name))?;
            let hook = |v: &String| if v.is_empty() { Value::Null } else { json!(v) };
            if let Some(s) = &u.start {
                spec["start"] = hook(s);
            }
            if let Some(s) = &u.stop {
                spec["stop"] = hook(s);
            }
            if let Some(s) = &u.check {
                spec["check"] = hook(s);
            }
            if let Some(t) = &u.hook_timeout {
                spec["hook_timeout_ms"] = json!(t.0.as_millis() as u64);
            }
            if let Some(v) = &u.vip {
                spec["vip"] = json!(v);
            }
            if let Some(v) = &u.vip_interface {
                spec["vip_interface"] = json!(v);
            }
            if u.no_vip {
                spec["vip"] = Value::Null;
                spec["vip_interface"] = Value::Null;
            }
            let v = c.put(&format!("/api/v1/workloads/{}", u.name), &spec)?;
            print(&v, json, |v| {
                let on: Vec<&str> = v["updated_on"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str())
                    .collect();
                println!("updated workload {} on {}", u.name, on.join(", "))
            })
        }
        WorkloadCommand::List { conn } => {
            let v = client(conn, data_dir)?.get("/api/v1/workloads")?;
            print(&v, json, |v| {
                for w in v.as_array().into_iter().flatten() {
                    let vols: Vec<&str> = w["volumes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str())
                        .collect();
                    println!(
                        "{:<20} volumes: {}",
                        w["name"].as_str().unwrap_or("?"),
                        vols.join(", ")
                    );
                }
            })
        }
        WorkloadCommand::Show { name, conn } => {
            let v = client(conn, data_dir)?.get(&format!("/api/v1/workloads/{name}"))?;
            print(&v, json, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            })
        }
        WorkloadCommand::Start { name, conn } | WorkloadCommand::Stop { name, conn } => {
            let which = if matches!(cmd, WorkloadCommand::Start { .. }) {
                "start"
            } else {
                "stop"
            };
            let v = client(conn, data_dir)?.post(
                &format!("/api/v1/workloads/{name}/hooks/{which}"),
                &json!({"role": "primary"}),
            )?;
            let run = &v["run"];
            if run["ok"] == false {
                bail!(
                    "{which} of workload {name} failed: {}",
                    run["output"].as_str().unwrap_or("").trim()
                );
            }
            print(&v, json, |v| {
                println!(
                    "{which} of workload {name}: {}",
                    v["run"]["output"]
                        .as_str()
                        .unwrap_or("nothing to run")
                        .trim()
                )
            })
        }
        WorkloadCommand::Delete { name, conn } => {
            let v = client(conn, data_dir)?.delete(&format!("/api/v1/workloads/{name}"))?;
            print(&v, json, |_| println!("deleted workload {name}"))
        }
    }
}

fn human_migration(v: &Value) -> String {
    let eta = v["eta_seconds"]
        .as_f64()
        .map_or("unknown".to_string(), |s| format!("{s:.0} s"));
    let mut line = format!(
        "{} {} → {}: {}, {} left (backlog {}), lag {}, link {}/s, writes {}/s, ETA {}",
        v["workload"].as_str().unwrap_or("?"),
        v["source"].as_str().unwrap_or("?"),
        v["target"].as_str().unwrap_or("?"),
        v["phase"].as_str().unwrap_or("?"),
        ByteSize(v["bytes_remaining"].as_u64().unwrap_or(0)),
        ByteSize(v["backlog_bytes"].as_u64().unwrap_or(0)),
        v["lag_seconds"]
            .as_f64()
            .map_or("-".to_string(), |s| format!("{s:.2} s")),
        ByteSize(v["bandwidth_bytes_per_s"].as_u64().unwrap_or(0)),
        ByteSize(v["write_rate_bytes_per_s"].as_u64().unwrap_or(0)),
        eta
    );
    if v["not_converging"].as_bool() == Some(true) {
        line.push_str(", NOT CONVERGING (writes outrun the link");
        line.push_str(if v["auto_converge"].as_bool() == Some(true) {
            "; auto-converge is slowing them"
        } else {
            "; try --auto-converge or --max-rate"
        });
        line.push(')');
    }
    if let Some(t) = v["throttle_pct"].as_u64().filter(|&t| t > 0) {
        line.push_str(&format!(", writes throttled {t}%"));
    }
    for sh in v["shares"].as_array().into_iter().flatten() {
        line.push_str(&format!(
            "\n  share {}: {}, {} paths pending",
            sh["share"].as_str().unwrap_or("?"),
            sh["state"].as_str().unwrap_or("?"),
            sh["pending_paths"].as_u64().unwrap_or(0)
        ));
        if let Some(e) = sh["last_error"].as_str() {
            line.push_str(&format!(" (last error: {e})"));
        }
    }
    if let Some(r) = v["reason"].as_str() {
        line.push_str(&format!("\n  reason: {r}"));
    }
    let s = &v["schedule"];
    if s.is_object() {
        line.push_str(&format!(
            "\n  scheduled cutover: {}",
            s["state"].as_str().unwrap_or("?")
        ));
        if let Some(at) = v["scheduled_at"].as_str() {
            line.push_str(&format!(" at {at}"));
        }
        if let Some(w) = s["window"].as_str() {
            line.push_str(&format!(", inside {w}"));
        }
        if let Some(d) = s["deadline"].as_str() {
            line.push_str(&format!(", until {d}"));
        }
        if let Some(o) = s["last_outcome"].as_str() {
            line.push_str(&format!("; last attempt: {o}"));
        }
        if let Some(r) = s["reason"].as_str() {
            line.push_str(&format!("; gave up: {r}"));
        }
    }
    line
}

pub fn migrate(cmd: &MigrateCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        MigrateCommand::Start {
            name,
            to,
            mode,
            max_rate,
            auto_converge,
            auto_cutover,
            window,
            deadline,
            conn,
        } => {
            let v = client(conn, data_dir)?.post(
                "/api/v1/migrations",
                &json!({
                    "workload": name,
                    "to": to,
                    "mode": if *mode == ModeArg::Sync { "sync" } else { "async" },
                    "max_rate_bytes_per_s": max_rate.map(|r| r.0),
                    "auto_converge": auto_converge,
                    "auto_cutover": auto_cutover,
                    "window": window,
                    "deadline": deadline,
                }),
            )?;
            print(&v, json, |v| println!("migrating {}", human_migration(v)))
        }
        MigrateCommand::Status { name, watch, conn } => {
            let c = client(conn, data_dir)?;
            let path = name.as_ref().map_or("/api/v1/migrations".to_string(), |n| {
                format!("/api/v1/migrations/{n}")
            });
            if !*watch || json {
                let v = c.get(&path)?;
                return print(&v, json, |v| match v.as_array() {
                    Some(a) if a.is_empty() => println!("no migrations"),
                    Some(a) => a.iter().for_each(|m| println!("{}", human_migration(m))),
                    None => println!("{}", human_migration(v)),
                });
            }
            let tty = std::io::stdout().is_terminal();
            loop {
                let v = c.get(&path)?;
                let all: Vec<Value> = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
                let lines: Vec<String> = all.iter().map(human_migration).collect();
                if tty {
                    print!("\x1b[2K\r{}", lines.join(" | "));
                } else {
                    println!("{}", lines.join(" | "));
                }
                crate::sys::out::flush_stdout();
                let done = all.iter().all(|m| {
                    matches!(
                        m["phase"].as_str(),
                        Some("ready" | "completed" | "failed" | "rolled-back")
                    )
                });
                if done {
                    if tty {
                        println!();
                    }
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        MigrateCommand::Test { name, end, conn } => {
            let c = client(conn, data_dir)?;
            let path = format!("/api/v1/migrations/{name}/test");
            if *end {
                let v = c.delete(&path)?;
                return print(&v, json, |v| {
                    println!(
                        "test of {name} ended on {}: overlays ({}) and snapshots ({}) discarded",
                        v["node"].as_str().unwrap_or("?"),
                        ferry_core::ByteSize(v["overlay_bytes_discarded"].as_u64().unwrap_or(0)),
                        ferry_core::ByteSize(v["snapshot_bytes_saved"].as_u64().unwrap_or(0)),
                    )
                });
            }
            let v = c.post(&path, &json!({}))?;
            print(&v, json, |v| {
                let node = v["node"].as_str().unwrap_or("?");
                println!(
                    "test instance of {name} on {node}: {} (source paused {} µs for the snapshot barrier)",
                    if v["check_ok"] == true {
                        "check passed"
                    } else if v["started"] == false {
                        "start FAILED"
                    } else {
                        "check FAILED"
                    },
                    v["source_frozen_us"]
                );
                for e in v["exports"].as_array().into_iter().flatten() {
                    println!("  {}", e.as_str().unwrap_or("?"));
                }
                for h in v["hooks"].as_array().into_iter().flatten() {
                    if h["ok"] != true {
                        println!(
                            "  {} hook output: {}",
                            h["hook"].as_str().unwrap_or("?"),
                            h["output"].as_str().unwrap_or("").trim()
                        );
                    }
                }
                println!("production keeps running; discard the test with: ferry migrate test {name} --end");
            })?;
            if v["check_ok"] != true {
                bail!("the test instance of {name} did not pass its check; it is still running for inspection (end it with: ferry migrate test {name} --end)");
            }
            Ok(())
        }
        MigrateCommand::Finalize { name, conn } => {
            let v = client(conn, data_dir)?
                .post(&format!("/api/v1/migrations/{name}/finalize"), &json!({}))?;
            print(&v, json, |v| {
                println!(
                    "finalized {name}: {}",
                    v["note"].as_str().unwrap_or("replication back stopped")
                )
            })
        }
        MigrateCommand::Set {
            name,
            max_rate,
            conn,
        } => {
            let v = client(conn, data_dir)?.patch(
                &format!("/api/v1/migrations/{name}"),
                &json!({"max_rate_bytes_per_s": max_rate.0}),
            )?;
            print(&v, json, |v| println!("{}", human_migration(v)))
        }
        MigrateCommand::Cutover {
            name: Some(name),
            cancel: true,
            conn,
            ..
        } => {
            let v =
                client(conn, data_dir)?.delete(&format!("/api/v1/migrations/{name}/schedule"))?;
            print(&v, json, |_| {
                println!("the scheduled cutover of {name} is cancelled")
            })
        }
        MigrateCommand::Cutover {
            name: Some(name),
            at,
            window,
            deadline,
            conn,
            ..
        } if at.is_some() || window.is_some() || deadline.is_some() => {
            let v = client(conn, data_dir)?.post(
                &format!("/api/v1/migrations/{name}/schedule"),
                &json!({"at": at, "window": window, "deadline": deadline}),
            )?;
            print(&v, json, |v| {
                let s = &v["schedule"];
                let mut line = format!(
                    "cutover of {name} scheduled at {}",
                    v["scheduled_at"].as_str().unwrap_or("?")
                );
                if let Some(w) = s["window"].as_str() {
                    line += &format!(", inside {w}");
                }
                if let Some(d) = s["deadline"].as_str() {
                    line += &format!(", giving up after {d}");
                }
                println!("{line}; `ferry migrate status {name}` follows it, `ferry migrate cutover {name} --cancel` cancels it");
            })
        }
        MigrateCommand::Cutover {
            name: None, conn, ..
        } => {
            let v = client(conn, data_dir)?.post("/api/v1/migrations-cutover-all", &json!({}))?;
            print(&v, json, |v| {
                for r in v.as_array().into_iter().flatten() {
                    match r.get("skipped") {
                        Some(why) => println!(
                            "{}: skipped, {}",
                            r["workload"].as_str().unwrap_or("?"),
                            why.as_str().unwrap_or("")
                        ),
                        None => println!(
                            "{}: cut over to {}, downtime {} ms",
                            r["workload"].as_str().unwrap_or("?"),
                            r["to"].as_str().unwrap_or("?"),
                            r["downtime_ms"]
                        ),
                    }
                }
            })
        }
        MigrateCommand::Cutover {
            name: Some(name),
            conn,
            ..
        }
        | MigrateCommand::Rollback { name, conn } => {
            let what = if matches!(cmd, MigrateCommand::Rollback { .. }) {
                "rollback"
            } else {
                "cutover"
            };
            let v = client(conn, data_dir)?
                .post(&format!("/api/v1/migrations/{name}/{what}"), &json!({}))?;
            print(&v, json, |v| {
                println!(
                    "cut over {name} from {} to {}: downtime {} ms (freeze → {} serving), app outage {} ms (stop → check passing){}",
                    v["from"].as_str().unwrap_or("?"),
                    v["to"].as_str().unwrap_or("?"),
                    v["downtime_ms"],
                    v["to"].as_str().unwrap_or("?"),
                    v["outage_ms"],
                    if v["target_healthy"].as_bool() == Some(false) { "; WARNING: the target's start/check hook failed" } else { "" }
                )
            })
        }
    }
}

/// `ferry cluster …`.
pub fn cluster(cmd: &crate::cli::ClusterCommand, data_dir: &Path, json: bool) -> Result<()> {
    use crate::cli::ClusterCommand;
    match cmd {
        ClusterCommand::Add {
            workload,
            preferred,
            async_failover,
            conn,
        } => {
            let v = client(conn, data_dir)?.post(
                "/api/v1/cluster/workloads",
                &json!({"workload": workload, "preferred": preferred,
                        "accept_loss": async_failover == "accept-loss"}),
            )?;
            print(&v, json, |v| {
                println!(
                    "workload {workload} is under HA (preferred node {preferred}; primary here: {})",
                    v["role"] == "primary"
                )
            })
        }
        ClusterCommand::Status { conn } => {
            let v = client(conn, data_dir)?.get("/api/v1/cluster")?;
            print(&v, json, |v| {
                if v["configured"] != true {
                    println!(
                        "node {} has no [cluster] table in its config",
                        v["node"].as_str().unwrap_or("?")
                    );
                    return;
                }
                println!(
                    "node {} — cluster {}",
                    v["node"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?")
                );
                let list = v["workloads"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("no workloads under HA (add one with `ferry cluster add WORKLOAD --preferred NODE`)");
                }
                for w in list {
                    let replicas: Vec<String> = w["replicas"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            format!(
                                "{} {}",
                                r["node"].as_str().unwrap_or("?"),
                                r["state"].as_str().unwrap_or("?")
                            )
                        })
                        .collect();
                    println!(
                        "{:<20} primary {:<10} this node {:<10} replica {}{}",
                        w["workload"].as_str().unwrap_or("?"),
                        w["primary"].as_str().unwrap_or("none"),
                        w["role"].as_str().unwrap_or("?"),
                        replicas.join(", "),
                        if w["writes_held"] == true {
                            "  (writes held: outdating the peer)"
                        } else {
                            ""
                        }
                    );
                }
            })
        }
        ClusterCommand::Switchover { workload, conn } => {
            let v = client(conn, data_dir)?.post(
                &format!("/api/v1/cluster/workloads/{workload}/switchover"),
                &json!({}),
            )?;
            print(&v, json, |v| {
                println!(
                    "workload {workload} moved from {} to {}: verified in {} ms, served again after {} ms",
                    v["from"].as_str().unwrap_or("?"),
                    v["to"].as_str().unwrap_or("?"),
                    v["verified_ms"],
                    v["downtime_ms"]
                )
            })
        }
        ClusterCommand::Standby { node, conn } | ClusterCommand::Unstandby { node, conn } => {
            let on = matches!(cmd, ClusterCommand::Standby { .. });
            let v = client(conn, data_dir)?.post(
                "/api/v1/cluster/standby",
                &json!({"node": node, "standby": on}),
            )?;
            print(&v, json, |v| {
                if on {
                    let moved = v["moved"].as_array().map(|a| a.len()).unwrap_or(0);
                    println!("node {node} is in standby; {moved} workload(s) moved off it");
                } else {
                    println!("node {node} takes workloads over again");
                }
            })
        }
        ClusterCommand::Promote {
            workload,
            force,
            conn,
        } => {
            let v = client(conn, data_dir)?.post(
                &format!("/api/v1/cluster/workloads/{workload}/promote"),
                &json!({"force": force}),
            )?;
            print(&v, json, |v| {
                println!(
                    "workload {workload} is now served by {} (forced)",
                    v["primary"].as_str().unwrap_or("?")
                )
            })
        }
        ClusterCommand::ResolveSplitBrain {
            workload,
            keep,
            conn,
        } => {
            let v = client(conn, data_dir)?.post(
                &format!("/api/v1/cluster/workloads/{workload}/resolve-split-brain"),
                &json!({"keep": keep}),
            )?;
            print(&v, json, |v| {
                println!(
                    "kept {keep}'s data; {}'s diverged copies are kept in: {}",
                    v["discarded"].as_str().unwrap_or("?"),
                    v["copies"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|c| c.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                )
            })
        }
        ClusterCommand::DropCopy {
            workload,
            node,
            conn,
        } => {
            let v = client(conn, data_dir)?.post(
                &format!("/api/v1/cluster/workloads/{workload}/drop-copy"),
                &json!({"node": node}),
            )?;
            print(&v, json, |v| {
                println!(
                    "dropped {} copies on {node}",
                    v["dropped"].as_array().map(|a| a.len()).unwrap_or(0)
                )
            })
        }
        ClusterCommand::Remove { workload, conn } => {
            let v =
                client(conn, data_dir)?.delete(&format!("/api/v1/cluster/workloads/{workload}"))?;
            print(&v, json, |_| {
                println!("workload {workload} is no longer under HA")
            })
        }
    }
}

fn print_share(v: &Value) {
    println!(
        "share {} ({}, {}) at {} — replica {}{}: {} files, {} bytes, {} paths pending",
        v["name"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("?"),
        v["role"].as_str().unwrap_or("?"),
        v["path"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        v["peer"]
            .as_str()
            .map(|p| format!(" on {p}"))
            .unwrap_or_default(),
        v["files"],
        v["bytes"],
        v["pending_paths"],
    );
    if v["mode"] == "async" && v["role"] == "primary" {
        println!(
            "  async (not crash-consistent): lag {} ms now, p50 {} ms, p99 {} ms; \
             {} directories watched, {} over the watch limit, {} overflows, {} rescans",
            v["lag_ms"],
            v["lag_p50_ms"],
            v["lag_p99_ms"],
            v["watched_dirs"],
            v["unwatched_dirs"],
            v["overflows"],
            v["rescans"],
        );
    }
    if let Some(e) = v["last_error"].as_str() {
        println!("  last error: {e}");
    }
}

pub fn share(cmd: &crate::cli::ShareCommand, data_dir: &Path, json: bool) -> Result<()> {
    use crate::cli::ShareCommand;
    match cmd {
        ShareCommand::Create {
            name,
            path,
            mode,
            to,
            conn,
        } => {
            let v = client(conn, data_dir)?.post(
                "/api/v1/shares",
                &json!({"name": name, "path": path, "mode": mode, "to": to}),
            )?;
            print(&v, json, print_share)
        }
        ShareCommand::Status { name, conn } => {
            let c = client(conn, data_dir)?;
            let v = match name {
                Some(n) => c.get(&format!("/api/v1/shares/{n}"))?,
                None => c.get("/api/v1/shares")?,
            };
            print(&v, json, |v| match v.as_array() {
                Some(list) if list.is_empty() => {
                    println!("no shares (create one with `ferry share create NAME --path DIR`)")
                }
                Some(list) => list.iter().for_each(print_share),
                None => print_share(v),
            })
        }
        ShareCommand::Verify {
            name,
            timeout,
            conn,
        } => {
            let v = client(conn, data_dir)?
                .with_timeout(timeout.0 + Duration::from_secs(30))
                .post(
                    &format!("/api/v1/shares/{name}/verify"),
                    &json!({"timeout_ms": timeout.0.as_millis() as u64}),
                )?;
            let equal = v["equal"].as_bool().unwrap_or(false);
            print(&v, json, |v| {
                let flux = match v["changed_during_verify"].as_u64().unwrap_or(0) {
                    0 => String::new(),
                    n => format!("; {n} entries changed while it ran (not compared)"),
                };
                if equal {
                    println!(
                        "{name}: equal on {} ({} entries, {} files read on both nodes){flux}",
                        v["peer"].as_str().unwrap_or(""),
                        v["entries"],
                        v["files"]
                    );
                } else {
                    println!(
                        "{name}: DIFFERENT from {} in {} entries{flux}",
                        v["peer"].as_str().unwrap_or(""),
                        v["differing_count"]
                    );
                    for d in v["differing"].as_array().into_iter().flatten() {
                        println!(
                            "  {}: {}",
                            d["path"].as_str().unwrap_or("?"),
                            d["why"].as_str().unwrap_or("?")
                        );
                    }
                }
            })?;
            if !equal {
                bail!("share {name} differs from its replica");
            }
            Ok(())
        }
        ShareCommand::Wait {
            name,
            timeout,
            conn,
        } => {
            let c = client(conn, data_dir)?;
            let deadline = Instant::now() + timeout.0;
            loop {
                let v = get_waiting(
                    &c,
                    &format!("/api/v1/shares/{name}?counts=0&"),
                    "up-to-date",
                    deadline,
                    2_000,
                    Duration::from_millis(100),
                )?;
                if v["state"] == "up-to-date" {
                    let v = c.get(&format!("/api/v1/shares/{name}"))?;
                    return print(&v, json, print_share);
                }
                if Instant::now() > deadline {
                    bail!(
                        "share {name} is {} after {:?}{}",
                        v["state"].as_str().unwrap_or("?"),
                        timeout.0,
                        v["last_error"]
                            .as_str()
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
}
