//! CLI commands that talk to a running agent over its REST API.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::reply::{self as r, ReplicationStatus};
use ferry_api::request::{self as q, StatusWait};
use ferry_api::{Action, Reply};
use ferry_core::{ByteSize, Name};
use serde::Serialize;

use crate::cli::{
    AgentConn, MigrateCommand, ModeArg, NodeCommand, ReplicateCommand, StateArg, WorkloadCommand,
    WorkloadCreate,
};
use crate::transport::client::ApiClient;

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

/// Asks for a status (built by `status` from the wait) once its `state` is
/// `want`, after at most `cap_ms` and not past `deadline` (the caller
/// redraws and checks its deadline between requests). An agent that answers
/// at once without reaching it (one that does not wait) is asked again only
/// after `idle`, not in a tight loop.
fn get_waiting(
    c: &ApiClient,
    status: impl Fn(StatusWait) -> Action,
    want: &str,
    deadline: Instant,
    cap_ms: u128,
    idle: Duration,
) -> Result<Reply> {
    let wait_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        .min(cap_ms);
    let asked = Instant::now();
    let r = c.send(&status(StatusWait {
        wait_state: Some(want.to_string()),
        wait_ms: Some(wait_ms as u64),
    }))?;
    let state = match &r {
        Reply::Replication(s) => s.state().to_string(),
        Reply::Share(s) => s.state.clone(),
        _ => String::new(),
    };
    if state != want && asked.elapsed().as_millis() < wait_ms.min(20) {
        std::thread::sleep(idle);
    }
    Ok(r)
}

/// A name as the API takes it (checked here, before anything is sent).
pub fn name(s: &str) -> Result<Name> {
    Ok(Name::parse(s)?)
}

/// The reply of the one variant an action answers with.
macro_rules! expect {
    ($reply:expr, $variant:ident) => {
        match $reply {
            Reply::$variant(x) => x,
            other => bail!(
                "unexpected reply: {}",
                serde_json::to_string(&other).unwrap_or_default()
            ),
        }
    };
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
            let v = expect!(
                client(conn, data_dir)?.send(&Action::RotateToken)?,
                TokenRotated
            );
            print(&v, json, |v| {
                println!(
                    "new API token written to {} on {}; the old one no longer works",
                    v.token_file, v.node
                )
            })
        }
        crate::cli::TokenCommand::Create { name, role, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::CreateToken(q::CreateToken {
                    name: name.clone(),
                    role: role.clone(),
                }))?,
                TokenCreated
            );
            print(&v, json, |v| {
                println!("{}", v.token);
                eprintln!(
                    "token {name} ({role}) made on {}: the line above is shown only now; it is valid on this node only",
                    v.node
                );
            })
        }
        crate::cli::TokenCommand::List { conn } => {
            let v = expect!(client(conn, data_dir)?.send(&Action::ListTokens)?, Tokens);
            print(&v, json, |v| {
                for t in v {
                    println!(
                        "{:<24} {:<9} {}",
                        t.name,
                        t.role,
                        t.created_unix
                            .map_or("(the api.token file)".to_string(), |c| format!(
                                "created {c}"
                            ))
                    );
                }
            })
        }
        crate::cli::TokenCommand::Revoke { name: n, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::RevokeToken { name: name(n)? })?,
                TokenRevoked
            );
            print(&v, json, |_| {
                println!("token {n} revoked: it no longer works")
            })
        }
    }
}

/// `ferry audit list|verify`.
pub fn audit(cmd: &crate::cli::AuditCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        crate::cli::AuditCommand::List { since, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ListAudit {
                    since: since.clone()
                })?,
                Audit
            );
            print(&v, json, |v| {
                for r in &v.records {
                    let x = &r.record;
                    let s = |k: &str| x.get(k).and_then(|v| v.as_str()).unwrap_or("");
                    let what = match s("kind") {
                        "action" => {
                            let result = match x.get("result") {
                                None => String::new(),
                                Some(r) if r["ok"] == true => " ok".into(),
                                Some(r) => format!(
                                    " failed ({}): {}",
                                    r["error"]["kind"].as_str().unwrap_or(""),
                                    r["error"]["message"].as_str().unwrap_or("")
                                ),
                            };
                            format!(
                                "{} {} by {} from {} op {}{result}",
                                s("action"),
                                s("phase"),
                                s("who"),
                                x.get("from").and_then(|v| v.as_str()).unwrap_or("-"),
                                s("op")
                            )
                        }
                        "decision" => format!(
                            "decision {} {} {}",
                            s("decision"),
                            s("workload"),
                            x.get("detail").map(|d| d.to_string()).unwrap_or_default()
                        ),
                        other => format!("{other} {x}"),
                    };
                    println!("{:>6} {} {what}", r.seq, s("time"));
                }
                if v.omitted > 0 {
                    eprintln!(
                        "{} older records left out (at most 10,000 are listed): use --since",
                        v.omitted
                    );
                }
            })
        }
        crate::cli::AuditCommand::Verify { conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::VerifyAudit)?,
                AuditVerified
            );
            print(&v, json, |v| {
                println!(
                    "{}: {} records ({}..{}), head {}:{}{}",
                    v.node,
                    v.records,
                    v.first_seq,
                    v.head_seq,
                    v.head_seq,
                    v.head_hash,
                    v.checkpoint
                        .as_ref()
                        .map(|c| format!(", checkpoint {c}"))
                        .unwrap_or_default()
                );
                for h in &v.holders {
                    println!(
                        "  {}: {} heads{} — {}",
                        h.holder,
                        h.heads.map_or("no".to_string(), |n| n.to_string()),
                        h.newest
                            .as_ref()
                            .map(|n| format!(", newest {n}"))
                            .unwrap_or_default(),
                        h.note
                    );
                }
                if v.ok {
                    println!(
                        "ok: the chain is whole and matches {} held heads ({} older than the checkpoint)",
                        v.heads_matched, v.heads_pruned
                    );
                }
            })?;
            if !v.ok {
                bail!(
                    "the audit log of {} does not verify: {}{}",
                    v.node,
                    v.problem.as_deref().unwrap_or("?"),
                    v.first_bad_seq
                        .map(|s| format!(" (first bad record: {s})"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

/// `--json`: the reply as is; else `human`.
pub fn print<T: Serialize + ?Sized>(v: &T, json: bool, human: impl FnOnce(&T)) -> Result<()> {
    if json {
        crate::sys::out::print_json(v)
    } else {
        human(v);
        Ok(())
    }
}

/// `ferry api openapi`: the API's OpenAPI 3.1 document (no agent needed).
/// `ferry events [--follow]`: the agent's Server-Sent Events, printed as
/// they come (text: `NAME DATA`; `--json`: `{"event", "data"}` a line).
pub fn events(conn: &AgentConn, data_dir: &Path, follow: bool, json: bool) -> Result<()> {
    use std::io::Write;
    let c = client(conn, data_dir)?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = std::io::stdout().lock();
    let mut ended = None;
    c.follow("/api/v1/events", |name, data| {
        if name == "end" {
            ended = Some(data.to_string());
        }
        let v: serde_json::Value =
            serde_json::from_str(data).unwrap_or_else(|_| serde_json::Value::String(data.into()));
        let line = if json {
            serde_json::json!({"event": name, "data": v}).to_string()
        } else {
            format!("{name} {v}")
        };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return false;
        }
        seen.insert(name.to_string());
        // Without --follow: until the first snapshot of each kind.
        follow
            || !["migrations", "cluster", "nodes"]
                .iter()
                .all(|k| seen.contains(*k))
    })?;
    match ended {
        Some(why) => anyhow::bail!("the agent ended the event stream: {why}"),
        None => Ok(()),
    }
}

pub fn openapi() -> Result<()> {
    crate::sys::out::print_json(&ferry_api::openapi::document())
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
            let v = expect!(
                local.send(&Action::AddNode(q::AddNode {
                    name: name.clone(),
                    api: api.clone(),
                    token: peer_token.trim().to_string(),
                    fingerprint,
                }))?,
                NodeAdded
            );
            print(&v, json, |v| {
                println!(
                    "registered node {} (fingerprint {}) both ways",
                    v.name, v.fingerprint
                )
            })
        }
        NodeCommand::Id => {
            let fp = crate::transport::identity::local_fingerprint(data_dir)?;
            print(&serde_json::json!({"fingerprint": fp}), json, |_| {
                println!("{fp}")
            })
        }
        NodeCommand::Rekey { conn } => {
            let v = expect!(client(conn, data_dir)?.send(&Action::Rekey)?, Rekeyed);
            print(&v, json, |v| {
                println!(
                    "{} has a new certificate {} (was {}); pinned by {}",
                    v.node,
                    v.fingerprint,
                    v.old_fingerprint,
                    serde_json::json!(v.peers)
                );
                if !v.peers_still_accepting_old.is_empty() {
                    println!(
                        "still accepting the old one (run rekey again once they are reachable): {}",
                        serde_json::json!(v.peers_still_accepting_old)
                    );
                }
            })
        }
        NodeCommand::List { conn } => {
            let v = expect!(client(conn, data_dir)?.send(&Action::ListNodes)?, Nodes);
            print(&v, json, |v| {
                for p in v {
                    let up = match p.up {
                        Some(true) => "up",
                        Some(false) => "down",
                        None => "not probed yet",
                    };
                    println!(
                        "{:<16} api {:<22} replication {:<22} {}  {up}{}",
                        p.name,
                        p.api,
                        p.replication,
                        p.fingerprint,
                        p.version
                            .as_deref()
                            .map(|v| format!(", version {v}"))
                            .unwrap_or_default()
                    );
                }
            })
        }
        NodeCommand::Show { conn } => {
            let info = expect!(client(conn, data_dir)?.send(&Action::GetNode)?, Node);
            // The certificate is long and `ferry node id` shows its fingerprint.
            let mut v = serde_json::to_value(&info)?;
            if let Some(o) = v.as_object_mut() {
                o.remove("cert_pem");
            }
            print(&v, json, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            })
        }
    }
}

fn human_status(s: &ReplicationStatus) -> String {
    let bytes = |b: u64| ByteSize(b).to_string();
    let p = match s {
        ReplicationStatus::Replica(r) => {
            return format!(
                "{:<16} secondary  peer {:<10} {:<13} applied {}",
                r.volume,
                r.peer.as_deref().unwrap_or("-"),
                r.state,
                bytes(r.bytes_applied)
            )
        }
        ReplicationStatus::Primary(p) => p,
    };
    let eta = match p.eta_seconds {
        Some(s) => format!("{s}s"),
        None => "-".into(),
    };
    let mut line = format!(
        "{:<16} primary → {:<10} {:<5} {:<12} {:<13} {:>5.1}%  dirty {:>10}  backlog {:>10}  {:>10}/s  ETA {}",
        p.volume,
        p.peer.as_deref().unwrap_or("-"),
        p.mode,
        p.link,
        p.state,
        p.synced_percent,
        bytes(p.dirty_bytes),
        bytes(p.backlog_bytes),
        bytes(p.rate_bytes_per_s),
        eta
    );
    if let Some(e) = &p.last_error {
        line.push_str(&format!("\n    last error: {e}"));
    }
    line
}

fn progress_bar(s: &ReplicationStatus) -> String {
    let (pct, rate, eta) = match s {
        ReplicationStatus::Primary(p) => (p.synced_percent, p.rate_bytes_per_s, p.eta_seconds),
        ReplicationStatus::Replica(_) => (0.0, 0, None),
    };
    let filled = ((pct / 100.0) * 30.0).round() as usize;
    format!(
        "\r{} [{}{}] {:>5.1}% {} {:>10}/s ETA {}   ",
        s.volume(),
        "#".repeat(filled.min(30)),
        "-".repeat(30 - filled.min(30)),
        pct,
        s.state(),
        ByteSize(rate).to_string(),
        eta.map(|s| format!("{s}s")).unwrap_or_else(|| "-".into())
    )
}

fn mode_str(m: &ModeArg) -> String {
    if *m == ModeArg::Sync { "sync" } else { "async" }.to_string()
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
            let v = expect!(
                client(conn, data_dir)?.send(&Action::StartReplication(q::StartReplication {
                    volume: name.clone(),
                    to: to.clone(),
                    mode: Some(mode_str(mode)),
                    max_rate_bytes_per_s: max_rate.map(|r| r.0),
                    checksum: *checksum,
                }))?,
                ReplicationStarted
            );
            print(&v, json, |v| {
                println!("replicating {name} to {to}: link up\n{}", human_status(v))
            })
        }
        ReplicateCommand::Wait {
            name: n,
            state,
            timeout,
            conn,
        } => {
            let c = client(conn, data_dir)?;
            let volume = name(n)?;
            let want = match state {
                StateArg::UpToDate => "up-to-date",
                StateArg::Inconsistent => "inconsistent",
                StateArg::Outdated => "outdated",
            };
            let deadline = Instant::now() + timeout.0;
            let tty = std::io::stderr().is_terminal() && !json;
            loop {
                // At most 0.5 s at a time on a terminal: the progress bar.
                let v = expect!(
                    get_waiting(
                        &c,
                        |wait| Action::GetReplication {
                            name: volume.clone(),
                            wait
                        },
                        want,
                        deadline,
                        if tty { 500 } else { 2_000 },
                        Duration::from_millis(20),
                    )?,
                    Replication
                );
                if tty {
                    eprint!("{}", progress_bar(&v));
                }
                if v.state() == want {
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
                        "{n} is {} after {:?}, not {want}{}",
                        v.state(),
                        timeout.0,
                        v.last_error()
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        ReplicateCommand::Status {
            name: n,
            watch,
            conn,
        } => {
            let c = client(conn, data_dir)?;
            match n {
                Some(n) if *watch && std::io::stdout().is_terminal() => {
                    let get = Action::GetReplication {
                        name: name(n)?,
                        wait: StatusWait::default(),
                    };
                    loop {
                        let v = expect!(c.send(&get)?, Replication);
                        print!("{}", progress_bar(&v));
                        crate::sys::out::flush_stdout();
                        if v.state() == "up-to-date" {
                            println!();
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                Some(n) => {
                    let v = expect!(
                        c.send(&Action::GetReplication {
                            name: name(n)?,
                            wait: StatusWait::default(),
                        })?,
                        Replication
                    );
                    print(&v, json, |v| println!("{}", human_status(v)))
                }
                None => {
                    let v = expect!(c.send(&Action::ListReplications)?, Replications);
                    print(&v, json, |list| {
                        if list.is_empty() {
                            println!("no replications (start one with `ferry replicate start NAME --to NODE`)");
                        }
                        for s in list {
                            println!("{}", human_status(s));
                        }
                    })
                }
            }
        }
        ReplicateCommand::Set {
            name: n,
            max_rate,
            conn,
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::SetReplication {
                    name: name(n)?,
                    req: q::SetRate {
                        max_rate_bytes_per_s: Some(max_rate.0),
                    },
                })?,
                ReplicationSet
            );
            print(&v, json, |v| println!("{}", human_status(v)))
        }
        ReplicateCommand::Stop { name: n, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::StopReplication { name: name(n)? })?,
                ReplicationStopped
            );
            print(&v, json, |_| {
                println!("stopped replicating {n}; writes are tracked for the next start")
            })
        }
    }
}

/// `ferry volume create` through the agent (`FERRY_API` set).
pub fn create_volume(
    conn: &AgentConn,
    data_dir: &Path,
    n: &str,
    size_bytes: u64,
    json: bool,
) -> Result<()> {
    let v = expect!(
        client(conn, data_dir)?.send(&Action::CreateVolume(q::CreateVolume {
            name: n.to_string(),
            size_bytes,
        }))?,
        VolumeCreated
    );
    print(&v, json, |_| {
        println!(
            "created volume {n} ({}) through the agent at {}",
            ByteSize(size_bytes),
            conn.api.clone().unwrap_or_default()
        )
    })
}

/// `ferry volume delete` through the agent (`FERRY_API` set).
pub fn delete_volume(conn: &AgentConn, data_dir: &Path, n: &str, json: bool) -> Result<()> {
    let v = expect!(
        client(conn, data_dir)?.send(&Action::DeleteVolume { name: name(n)? })?,
        VolumeDeleted
    );
    print(&v, json, |_| {
        println!("deleted volume {n} through the agent")
    })
}

pub fn verify(n: &str, conn: &AgentConn, data_dir: &Path, json: bool) -> Result<()> {
    let v = expect!(
        client(conn, data_dir)?.send(&Action::VerifyVolume { name: name(n)? })?,
        VolumeVerify
    );
    print(&v, json, |v| {
        if v.equal {
            println!(
                "{n}: equal on {} ({} blocks, Merkle root {})",
                v.peer, v.blocks, v.root
            );
        } else {
            println!("{n}: DIFFERENT from {}", v.peer);
            for d in &v.differing {
                println!("  offset {} length {}", d.offset, d.length);
            }
        }
    })?;
    if !v.equal {
        bail!("volume {n} differs from its replica");
    }
    Ok(())
}

pub fn workload(cmd: &WorkloadCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        WorkloadCommand::Create(c) => {
            let WorkloadCreate {
                name: n,
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
                from_archive,
                store,
                run,
                conn,
            } = &**c;
            let vm = (vm_kernel.is_some() || !vm_args.is_empty()).then(|| q::VmSpec {
                kernel: vm_kernel.as_ref().map(|p| p.to_string_lossy().into_owned()),
                initrd: vm_initrd.as_ref().map(|p| p.to_string_lossy().into_owned()),
                append: vm_append.clone(),
                memory_mib: vm_memory.bytes() >> 20,
                accel: Some(vm_accel.clone()),
                extra_args: vm_args.clone(),
            });
            if let (Some(archive), Some(store)) = (from_archive, store) {
                return crate::cli::archive_remote::restore_workload(
                    archive, store, n, vm, *run, conn, data_dir, json,
                );
            }
            let spec = q::WorkloadSpec {
                name: name(n)?,
                volumes: volumes.iter().map(|v| name(v)).collect::<Result<_>>()?,
                shares: shares.iter().map(|s| name(s)).collect::<Result<_>>()?,
                start: start.clone(),
                stop: stop.clone(),
                check: check.clone(),
                hook_timeout_ms: hook_timeout.0.as_millis() as u64,
                vm,
                vip: vip.clone(),
                vip_interface: vip_interface.clone(),
            };
            let v = expect!(
                client(conn, data_dir)?.send(&Action::CreateWorkload(spec))?,
                WorkloadCreated
            );
            print(&v, json, |_| {
                let parts: Vec<&str> = volumes.iter().chain(shares).map(String::as_str).collect();
                println!("created workload {n} ({})", parts.join(", "))
            })
        }
        WorkloadCommand::Update(u) => {
            let c = client(&u.conn, data_dir)?;
            let wname = name(&u.name)?;
            let mut spec = expect!(
                c.send(&Action::GetWorkload {
                    name: wname.clone()
                })?,
                Workload
            );
            let hook = |v: &String| (!v.is_empty()).then(|| v.clone());
            if let Some(s) = &u.start {
                spec.start = hook(s);
            }
            if let Some(s) = &u.stop {
                spec.stop = hook(s);
            }
            if let Some(s) = &u.check {
                spec.check = hook(s);
            }
            if let Some(t) = &u.hook_timeout {
                spec.hook_timeout_ms = t.0.as_millis() as u64;
            }
            if let Some(v) = &u.vip {
                spec.vip = Some(v.clone());
            }
            if let Some(v) = &u.vip_interface {
                spec.vip_interface = Some(v.clone());
            }
            if u.no_vip {
                spec.vip = None;
                spec.vip_interface = None;
            }
            let v = expect!(
                c.send(&Action::PutWorkload {
                    name: wname,
                    forwarded: false,
                    spec,
                })?,
                WorkloadUpdated
            );
            print(&v, json, |v| {
                println!("updated workload {} on {}", u.name, v.updated_on.join(", "))
            })
        }
        WorkloadCommand::List { conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ListWorkloads)?,
                Workloads
            );
            print(&v, json, |v| {
                for w in v {
                    let vols: Vec<&str> = w.volumes.iter().map(|x| x.as_str()).collect();
                    println!("{:<20} volumes: {}", w.name, vols.join(", "));
                }
            })
        }
        WorkloadCommand::Show { name: n, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::GetWorkload { name: name(n)? })?,
                Workload
            );
            print(&v, json, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            })
        }
        WorkloadCommand::Start { name: n, conn } | WorkloadCommand::Stop { name: n, conn } => {
            let which = if matches!(cmd, WorkloadCommand::Start { .. }) {
                q::HookName::Start
            } else {
                q::HookName::Stop
            };
            let v = expect!(
                client(conn, data_dir)?.send(&Action::RunHook {
                    name: name(n)?,
                    which,
                    req: q::HookRequest {
                        role: Some("primary".into()),
                    },
                })?,
                Hook
            );
            let which = which.as_str();
            if let Some(run) = v.run.as_ref().filter(|r| !r.ok) {
                bail!("{which} of workload {n} failed: {}", run.output.trim());
            }
            print(&v, json, |v| {
                println!(
                    "{which} of workload {n}: {}",
                    v.run
                        .as_ref()
                        .map_or("nothing to run", |r| r.output.as_str())
                        .trim()
                )
            })
        }
        WorkloadCommand::Delete { name: n, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::DeleteWorkload { name: name(n)? })?,
                WorkloadDeleted
            );
            print(&v, json, |_| println!("deleted workload {n}"))
        }
    }
}

fn human_migration(v: &r::MigrationStatus) -> String {
    let eta = v
        .eta_seconds
        .map_or("unknown".to_string(), |s| format!("{s:.0} s"));
    let mut line = format!(
        "{} {} → {}: {}, {} left (backlog {}), lag {}, link {}/s, writes {}/s, ETA {}",
        v.workload,
        v.source,
        v.target,
        v.phase,
        ByteSize(v.bytes_remaining),
        ByteSize(v.backlog_bytes),
        v.lag_seconds
            .map_or("-".to_string(), |s| format!("{s:.2} s")),
        ByteSize(v.bandwidth_bytes_per_s),
        ByteSize(v.write_rate_bytes_per_s),
        eta
    );
    if v.not_converging {
        line.push_str(", NOT CONVERGING");
        if let Some(a) = &v.advice {
            line.push_str(&format!(" ({a})"));
        }
    }
    if v.throttle_pct > 0 {
        line.push_str(&format!(", writes throttled {}%", v.throttle_pct));
    }
    for sh in &v.shares {
        line.push_str(&format!(
            "\n  share {}: {}, {} paths pending",
            sh.share, sh.state, sh.pending_paths
        ));
        if let Some(e) = &sh.last_error {
            line.push_str(&format!(" (last error: {e})"));
        }
    }
    if let Some(vm) = &v.vm {
        line.push_str(&format!(
            "\n  VM moving live: {}, RAM {} of {} sent, {} left, {} pages/s dirtied, pass {}, expected pause {} ms{}, disks {} left",
            vm.state,
            ByteSize(vm.ram_transferred_bytes),
            ByteSize(vm.ram_total_bytes),
            ByteSize(vm.ram_remaining_bytes),
            vm.dirty_pages_rate,
            vm.dirty_sync_count,
            num(vm.expected_downtime_ms),
            if vm.cpu_throttle_percent > 0 {
                format!(", vCPUs throttled {}%", vm.cpu_throttle_percent)
            } else {
                String::new()
            },
            ByteSize(v.bytes_remaining),
        ));
    }
    if let Some(r) = &v.reason {
        line.push_str(&format!("\n  reason: {r}"));
    }
    if let Some(s) = &v.schedule {
        line.push_str(&format!("\n  scheduled cutover: {}", s.state));
        if let Some(at) = &v.scheduled_at {
            line.push_str(&format!(" at {at}"));
        }
        if let Some(w) = &s.window {
            line.push_str(&format!(", inside {w}"));
        }
        if let Some(d) = &s.deadline {
            line.push_str(&format!(", until {d}"));
        }
        if let Some(o) = &s.last_outcome {
            line.push_str(&format!("; last attempt: {o}"));
        }
        if let Some(r) = &s.reason {
            line.push_str(&format!("; gave up: {r}"));
        }
    }
    line
}

/// A number as JSON shows it (`12.5`, `null`): the CLI's text keeps the
/// reply's own rendering.
fn num<T: Serialize>(v: T) -> String {
    serde_json::to_string(&v).unwrap_or_default()
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
            seed,
            checksum,
            conn,
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::StartMigration(q::StartMigration {
                    workload: name.clone(),
                    to: to.clone(),
                    mode: Some(mode_str(mode)),
                    max_rate_bytes_per_s: max_rate.map(|r| r.0),
                    auto_converge: *auto_converge,
                    auto_cutover: *auto_cutover,
                    window: window.clone(),
                    deadline: deadline.clone(),
                    seed: seed.as_deref().map(crate::cli::remote::name).transpose()?,
                    checksum: *checksum,
                }))?,
                MigrationStarted
            );
            print(&v, json, |v| println!("migrating {}", human_migration(v)))
        }
        MigrateCommand::Status {
            name: n,
            watch,
            conn,
        } => {
            let c = client(conn, data_dir)?;
            let ask = match n {
                Some(n) => Action::GetMigration { name: name(n)? },
                None => Action::ListMigrations,
            };
            let get = || -> Result<Vec<r::MigrationStatus>> {
                Ok(match c.send(&ask)? {
                    Reply::Migration(m) => vec![m],
                    Reply::Migrations(all) => all,
                    other => bail!(
                        "unexpected reply: {}",
                        serde_json::to_string(&other).unwrap_or_default()
                    ),
                })
            };
            if !*watch || json {
                let all = get()?;
                if json {
                    return match n {
                        Some(_) => crate::sys::out::print_json(&all[0]),
                        None => crate::sys::out::print_json(&all),
                    };
                }
                if all.is_empty() {
                    println!("no migrations");
                }
                for m in &all {
                    println!("{}", human_migration(m));
                }
                return Ok(());
            }
            let tty = std::io::stdout().is_terminal();
            loop {
                let all = get()?;
                let lines: Vec<String> = all.iter().map(human_migration).collect();
                if tty {
                    print!("\x1b[2K\r{}", lines.join(" | "));
                } else {
                    println!("{}", lines.join(" | "));
                }
                crate::sys::out::flush_stdout();
                let done = all.iter().all(|m| {
                    matches!(
                        m.phase.as_str(),
                        "ready" | "completed" | "failed" | "rolled-back"
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
        MigrateCommand::Test { name: n, end, conn } => {
            let c = client(conn, data_dir)?;
            let wname = name(n)?;
            if *end {
                let v = expect!(c.send(&Action::EndTest { name: wname })?, TestEnded);
                return print(&v, json, |v| {
                    println!(
                        "test of {n} ended on {}: overlays ({}) and snapshots ({}) discarded",
                        v.node,
                        ByteSize(v.overlay_bytes_discarded),
                        ByteSize(v.snapshot_bytes_saved),
                    )
                });
            }
            let v = expect!(c.send(&Action::StartTest { name: wname })?, TestStarted);
            print(&v, json, |v| {
                println!(
                    "test instance of {n} on {}: {} (source paused {} µs for the snapshot barrier)",
                    v.node,
                    if v.check_ok {
                        "check passed"
                    } else if !v.started {
                        "start FAILED"
                    } else {
                        "check FAILED"
                    },
                    num(v.source_frozen_us)
                );
                for e in &v.exports {
                    println!("  {e}");
                }
                for h in v.hooks.iter().filter(|h| !h.ok) {
                    println!("  {} hook output: {}", h.hook, h.output.trim());
                }
                println!(
                    "production keeps running; discard the test with: ferry migrate test {n} --end"
                );
            })?;
            if !v.check_ok {
                bail!("the test instance of {n} did not pass its check; it is still running for inspection (end it with: ferry migrate test {n} --end)");
            }
            Ok(())
        }
        MigrateCommand::Report {
            name: n,
            html,
            conn,
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::MigrationReport { name: name(n)? })?,
                MigrationReport
            );
            if *html {
                print!("{}", crate::api::report_html::render(&v));
                return Ok(());
            }
            print(&v, json, |v| {
                println!(
                    "migration of {} from {} to {}: {}",
                    v.workload, v.source, v.target, v.phase
                );
                for p in &v.timeline {
                    println!("  {}  {}", crate::api::report_html::utc(p.at_unix), p.phase);
                }
                if let Some(b) = v.bytes_moved {
                    println!("  bytes moved: {}", ByteSize(b));
                }
                if let Some(d) = v.downtime_ms {
                    println!("  downtime: {d} ms, outage: {} ms", num(v.outage_ms));
                }
                if let Some(ok) = v.verified {
                    println!("  verified: {}", if ok { "yes" } else { "no" });
                }
            })
        }
        MigrateCommand::Finalize { name: n, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::Finalize { name: name(n)? })?,
                Finalized
            );
            print(&v, json, |v| println!("finalized {n}: {}", v.note))
        }
        MigrateCommand::Set {
            name: n,
            max_rate,
            conn,
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::SetMigration {
                    name: name(n)?,
                    req: q::SetRate {
                        max_rate_bytes_per_s: Some(max_rate.0),
                    },
                })?,
                MigrationSet
            );
            print(&v, json, |v| println!("{}", human_migration(v)))
        }
        MigrateCommand::Cutover {
            name: Some(n),
            cancel: true,
            conn,
            ..
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::CancelCutover { name: name(n)? })?,
                ScheduleCancelled
            );
            print(&v, json, |_| {
                println!("the scheduled cutover of {n} is cancelled")
            })
        }
        MigrateCommand::Cutover {
            name: Some(n),
            at,
            window,
            deadline,
            conn,
            ..
        } if at.is_some() || window.is_some() || deadline.is_some() => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ScheduleCutover {
                    name: name(n)?,
                    req: q::ScheduleRequest {
                        at: at.clone(),
                        window: window.clone(),
                        deadline: deadline.clone(),
                    },
                })?,
                ScheduleSet
            );
            print(&v, json, |v| {
                let s = &v.schedule;
                let mut line = format!(
                    "cutover of {n} scheduled at {}",
                    v.scheduled_at.as_deref().unwrap_or("?")
                );
                if let Some(w) = &s.window {
                    line += &format!(", inside {w}");
                }
                if let Some(d) = &s.deadline {
                    line += &format!(", giving up after {d}");
                }
                println!("{line}; `ferry migrate status {n}` follows it, `ferry migrate cutover {n} --cancel` cancels it");
            })
        }
        MigrateCommand::Cutover {
            name: None, conn, ..
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::CutoverAll)?,
                CutoverAll
            );
            print(&v, json, |v| {
                for r in v {
                    match r {
                        r::CutoverOutcome::Skipped(s) => {
                            println!("{}: skipped, {}", s.workload, s.skipped)
                        }
                        r::CutoverOutcome::Done(r) => println!(
                            "{}: cut over to {}, downtime {} ms",
                            r.workload,
                            r.to,
                            num(r.downtime_ms)
                        ),
                    }
                }
            })
        }
        MigrateCommand::Cutover {
            name: Some(n),
            conn,
            cold,
            ..
        } => {
            let c = client(conn, data_dir)?;
            let v = expect!(
                c.send(&Action::Cutover {
                    name: name(n)?,
                    req: q::CutoverRequest {
                        reverse_on_failure: true,
                        cold: *cold,
                    },
                })?,
                Cutover
            );
            print(&v, json, |v| print_cutover(n, v))
        }
        MigrateCommand::Rollback { name: n, conn } => {
            let c = client(conn, data_dir)?;
            let v = expect!(c.send(&Action::Rollback { name: name(n)? })?, RolledBack);
            print(&v, json, |v| print_cutover(n, v))
        }
    }
}

/// A cutover's report, in words.
fn print_cutover(n: &str, v: &ferry_api::reply::CutoverReport) {
    let warn = if !v.target_healthy {
        "; WARNING: the target's start/check hook failed"
    } else {
        ""
    };
    match &v.vm {
        Some(vm) if vm.mode == "live" => {
            println!(
                "moved {n} live from {} to {}: guest paused {} ms (vCPUs stopped at {} → running at {}), RAM pre-copied in {} ms{warn}",
                v.from,
                v.to,
                num(v.downtime_ms),
                v.from,
                v.to,
                num(vm.precopy_ms),
            );
            let q = &vm.qemu;
            println!(
                "  inside the pause (ms after the vCPUs stopped): frozen {}, drained {}, verified {}, committed {}; QEMU: downtime {} ms, {} bytes sent in {} passes",
                num(vm.freeze_ms),
                num(vm.drain_ms),
                num(vm.verify_ms),
                num(vm.commit_ms),
                num(q.downtime_ms),
                num(q.transferred_bytes),
                num(q.dirty_sync_count),
            );
        }
        _ => println!(
            "cut over {n} from {} to {}: downtime {} ms (freeze → {} serving), app outage {} ms (stop → check passing){warn}",
            v.from,
            v.to,
            num(v.downtime_ms),
            v.to,
            num(v.outage_ms),
        ),
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
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterAdd(q::ClusterAdd {
                    workload: name(workload)?,
                    preferred: preferred.clone(),
                    accept_loss: async_failover == "accept-loss",
                    forwarded: false,
                }))?,
                ClusterAdded
            );
            print(&v, json, |v| {
                println!(
                    "workload {workload} is under HA (preferred node {preferred}; primary here: {})",
                    v.role == "primary"
                )
            })
        }
        ClusterCommand::Status { conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterStatus)?,
                Cluster
            );
            print(&v, json, |v| {
                if !v.configured {
                    println!("node {} has no [cluster] table in its config", v.node);
                    return;
                }
                println!("node {} — cluster {}", v.node, v.state);
                if v.workloads.is_empty() {
                    println!("no workloads under HA (add one with `ferry cluster add WORKLOAD --preferred NODE`)");
                }
                for w in &v.workloads {
                    let replicas: Vec<String> = w
                        .replicas
                        .iter()
                        .map(|r| format!("{} {}", r.node, r.state))
                        .collect();
                    println!(
                        "{:<20} primary {:<10} this node {:<10} replica {}{}",
                        w.workload,
                        w.primary.as_deref().unwrap_or("none"),
                        w.role,
                        replicas.join(", "),
                        if w.writes_held {
                            "  (writes held: outdating the peer)"
                        } else {
                            ""
                        }
                    );
                }
            })
        }
        ClusterCommand::Switchover { workload, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterSwitchover {
                    name: name(workload)?
                })?,
                Switchover
            );
            print(&v, json, |v| {
                println!(
                    "workload {workload} moved from {} to {}: verified in {} ms, served again after {} ms",
                    v.from, v.to, v.verified_ms, v.downtime_ms
                )
            })
        }
        ClusterCommand::Standby { node, conn } | ClusterCommand::Unstandby { node, conn } => {
            let on = matches!(cmd, ClusterCommand::Standby { .. });
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterStandby(q::Standby {
                    node: node.clone(),
                    standby: on,
                }))?,
                Standby
            );
            print(&v, json, |v| {
                if on {
                    println!(
                        "node {node} is in standby; {} workload(s) moved off it",
                        v.moved.len()
                    );
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
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterPromote {
                    name: name(workload)?,
                    req: q::ForcePromote {
                        force: *force,
                        by_policy: false,
                    },
                })?,
                ForcePromoted
            );
            print(&v, json, |v| {
                println!(
                    "workload {workload} is now served by {} (forced)",
                    v.primary
                )
            })
        }
        ClusterCommand::ResolveSplitBrain {
            workload,
            keep,
            conn,
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterResolve {
                    name: name(workload)?,
                    req: q::Resolve {
                        keep: keep.clone(),
                        histories: None,
                    },
                })?,
                SplitBrainResolved
            );
            print(&v, json, |v| {
                println!(
                    "kept {keep}'s data; {}'s diverged copies are kept in: {}",
                    v.discarded,
                    v.copies.join(", ")
                )
            })
        }
        ClusterCommand::DropCopy {
            workload,
            node,
            conn,
        } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterDropCopy {
                    name: name(workload)?,
                    req: q::DropCopy { node: node.clone() },
                })?,
                CopiesDropped
            );
            print(&v, json, |v| {
                println!("dropped {} copies on {node}", v.dropped.len())
            })
        }
        ClusterCommand::Remove { workload, conn } => {
            let v = expect!(
                client(conn, data_dir)?.send(&Action::ClusterRemove {
                    name: name(workload)?,
                    forwarded: false,
                })?,
                ClusterRemoved
            );
            print(&v, json, |_| {
                println!("workload {workload} is no longer under HA")
            })
        }
    }
}

fn print_share(v: &r::ShareStatus) {
    println!(
        "share {} ({}, {}) at {} — replica {}{}: {} files, {} bytes, {} paths pending",
        v.name,
        v.mode,
        v.role,
        v.path,
        v.state,
        v.peer
            .as_deref()
            .map(|p| format!(" on {p}"))
            .unwrap_or_default(),
        v.files,
        v.bytes,
        v.pending_paths,
    );
    if v.mode == "async" && v.role == "primary" {
        println!(
            "  async (not crash-consistent): lag {} ms now, p50 {} ms, p99 {} ms; \
             {} directories watched, {} over the watch limit, {} overflows, {} rescans",
            v.lag_ms,
            v.lag_p50_ms,
            v.lag_p99_ms,
            v.watched_dirs,
            v.unwatched_dirs,
            v.overflows,
            v.rescans,
        );
    }
    if let Some(e) = &v.last_error {
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
            let v = expect!(
                client(conn, data_dir)?.send(&Action::CreateShare(q::CreateShare {
                    name: name.clone(),
                    path: path.to_string_lossy().into_owned(),
                    mode: mode.clone(),
                    to: to.clone(),
                }))?,
                ShareCreated
            );
            print(&v, json, print_share)
        }
        ShareCommand::Status { name: n, conn } => {
            let c = client(conn, data_dir)?;
            match n {
                Some(n) => {
                    let v = expect!(
                        c.send(&Action::GetShare {
                            name: name(n)?,
                            counts: true,
                            wait: StatusWait::default(),
                        })?,
                        Share
                    );
                    print(&v, json, print_share)
                }
                None => {
                    let v = expect!(c.send(&Action::ListShares)?, Shares);
                    print(&v, json, |list| {
                        if list.is_empty() {
                            println!(
                                "no shares (create one with `ferry share create NAME --path DIR`)"
                            )
                        }
                        list.iter().for_each(print_share)
                    })
                }
            }
        }
        ShareCommand::Verify {
            name: n,
            timeout,
            conn,
        } => {
            let v = expect!(
                client(conn, data_dir)?
                    .with_timeout(timeout.0 + Duration::from_secs(30))
                    .send(&Action::VerifyShare {
                        name: name(n)?,
                        req: q::ShareVerify {
                            timeout_ms: Some(timeout.0.as_millis() as u64),
                        },
                    })?,
                ShareVerify
            );
            print(&v, json, |v| {
                let flux = match v.changed_during_verify {
                    0 => String::new(),
                    k => format!("; {k} entries changed while it ran (not compared)"),
                };
                if v.equal {
                    println!(
                        "{n}: equal on {} ({} entries, {} files read on both nodes){flux}",
                        v.peer, v.entries, v.files
                    );
                } else {
                    println!(
                        "{n}: DIFFERENT from {} in {} entries{flux}",
                        v.peer, v.differing_count
                    );
                    for d in &v.differing {
                        println!("  {}: {}", d.path, d.why);
                    }
                }
            })?;
            if !v.equal {
                bail!("share {n} differs from its replica");
            }
            Ok(())
        }
        ShareCommand::Wait {
            name: n,
            timeout,
            conn,
        } => {
            let c = client(conn, data_dir)?;
            let share = name(n)?;
            let deadline = Instant::now() + timeout.0;
            loop {
                let v = expect!(
                    get_waiting(
                        &c,
                        |wait| Action::GetShare {
                            name: share.clone(),
                            counts: false,
                            wait
                        },
                        "up-to-date",
                        deadline,
                        2_000,
                        Duration::from_millis(100),
                    )?,
                    Share
                );
                if v.state == "up-to-date" {
                    let v = expect!(
                        c.send(&Action::GetShare {
                            name: share.clone(),
                            counts: true,
                            wait: StatusWait::default(),
                        })?,
                        Share
                    );
                    return print(&v, json, print_share);
                }
                if Instant::now() > deadline {
                    bail!(
                        "share {n} is {} after {:?}{}",
                        v.state,
                        timeout.0,
                        v.last_error
                            .as_deref()
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
}

/// `ferry stats`.
pub fn stats(args: &crate::cli::StatsArgs, data_dir: &Path, json: bool) -> Result<()> {
    let c = client(&args.conn, data_dir)?;
    let Some(series) = &args.series else {
        let v = expect!(c.send(&Action::ListStats)?, StatsSeriesList);
        return print(&v, json, |v| {
            for s in &v.series {
                println!("{s}");
            }
        });
    };
    let series = ferry_core::history::SeriesName::parse(series)?;
    let v = expect!(
        c.send(&Action::GetStats(q::StatsQuery {
            series,
            from: None,
            to: None,
            since: Some(args.since),
            step: args.step,
        }))?,
        Stats
    );
    if args.csv {
        println!("t,mean,min,max,count");
        for p in &v.points {
            println!("{},{},{},{},{}", p.t, p.mean, p.min, p.max, p.count);
        }
        return Ok(());
    }
    print(&v, json, |v| {
        println!(
            "{} on {}: {} points, every {} s",
            v.series,
            v.node,
            v.points.len(),
            v.step_s
        );
        for p in &v.points {
            println!(
                "{}  mean {}  min {}  max {}",
                crate::api::report_html::utc(p.t),
                p.mean,
                p.min,
                p.max
            );
        }
    })
}
