//! The audit log's agent side: what an action's records say (who, from
//! where, the request, the result), `ferry audit list` and `verify`, the
//! heads this node keeps for its peers, and the `audit-heads` thread that
//! sends this node's chain head to its peers and its witness every
//! `audit.head_interval_ms`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use ferry_api::reply as r;
use ferry_api::request::AuditHead;
use ferry_api::{Action, Authority, Reply};
use ferry_core::audit::{self as chain, wire, Head, HeldHead};
use serde_json::{json, Value};

use super::dispatch::Asker;
use super::AgentCtx;
use crate::transport::client::ApiClient;

/// Records one `audit list` answers at most (the newest; `omitted` says
/// how many older ones matched but were left out: ask with `--since`).
pub const AUDIT_LIST_RECORDS_MAX: usize = 10_000;

/// How long a peer or the witness has to answer a head exchange.
const HOLDER_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest witness answer read.
const WITNESS_REPLY_BYTES_MAX: usize = 65_536;

/// Keys whose values never go into the log (a peer's API token in
/// `node add`).
const SECRET_KEYS: &[&str] = &["token", "password", "secret"];

fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if SECRET_KEYS.contains(&k.as_str()) && !x.is_number() {
                    *x = json!("<redacted>");
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// What every record of `action` says: who, from where, what.
pub fn action_record(who: &Asker, action: &Action, op: &str) -> Value {
    let mut body = action.body().unwrap_or(Value::Null);
    redact(&mut body);
    let (token, role, peer) = match &who.authority {
        Authority::Token { name, role } => (Some(name.clone()), Some(role.as_str()), None),
        Authority::Peer { node } => (None, None, Some(node.clone())),
    };
    json!({
        "kind": "action",
        "op": op,
        "action": action.kind().name(),
        "who": who.authority.describe(),
        "token": token,
        "role": role,
        "peer": peer,
        "from": who.addr.map(|a| a.to_string()),
        "request": {"method": action.method().as_str(), "path": action.path(), "body": body},
    })
}

/// A console login (`CreateSession`) or logout (`DeleteSession`) as one
/// result record: the HTTP layer answers them itself (cookies), not
/// [`super::dispatch::execute`], so it records them with this. `who`:
/// `None` for a failed login (no token matched: nobody to name).
pub fn session_record(
    action: ferry_api::ActionKind,
    who: Option<&Authority>,
    from: Option<SocketAddr>,
    result: Value,
) -> Value {
    let (token, role) = match who {
        Some(Authority::Token { name, role }) => (Some(name.clone()), Some(role.as_str())),
        _ => (None, None),
    };
    let route = action.route();
    json!({
        "kind": "action",
        "op": crate::audit::new_op_id(),
        "action": action.name(),
        "who": who.map_or_else(|| "unknown token".to_string(), Authority::describe),
        "token": token,
        "role": role,
        "peer": null,
        "from": from.map(|a| a.to_string()),
        "request": {"method": route.method.as_str(), "path": route.path},
        "phase": "result",
        "result": result,
    })
}

/// How many failed console logins are recorded per minute
/// (`audit.failed_logins_per_minute_max`): anyone who reaches the API can
/// try a login, and the log is pruned by size, so a flood of bad tokens
/// must not push the real records out. The ones over the limit are counted
/// and the count goes into the next failed login recorded.
#[derive(Debug)]
pub struct FailedLogins {
    per_minute_max: u32,
    /// (the minute, failed logins recorded in it, not recorded since the
    /// last one that was).
    state: std::sync::Mutex<(i64, u32, u64)>,
}

impl FailedLogins {
    pub fn new(per_minute_max: u32) -> FailedLogins {
        FailedLogins {
            per_minute_max,
            state: std::sync::Mutex::new((i64::MIN, 0, 0)),
        }
    }

    /// A failed login at `now_ms`: `Some(n)` to record it (`n` failed
    /// logins before it went unrecorded), `None` over the limit.
    pub fn admit(&self, now_ms: i64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let minute = now_ms.div_euclid(60_000);
        if s.0 != minute {
            s.0 = minute;
            s.1 = 0;
        }
        if s.1 < self.per_minute_max {
            s.1 += 1;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

/// `rec` as its `request` or `result` record.
pub fn phase(rec: &Value, phase: &str, result: Option<Value>) -> Value {
    let mut v = rec.clone();
    if let Value::Object(m) = &mut v {
        m.insert("phase".into(), json!(phase));
        if let Some(r) = result {
            m.insert("result".into(), r);
            // The result record names the request; no need to repeat it.
            m.remove("request");
        }
    }
    v
}

/// Appends `v` durably (on the blocking pool).
pub async fn record(ctx: &Arc<AgentCtx>, v: Value) -> Result<(), String> {
    let log = ctx.audit.clone();
    tokio::task::spawn_blocking(move || log.append(v).map(|_| ()).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

/// `since` as Unix milliseconds: RFC 3339, or an age (`90s`, `15m`, `1h`,
/// `7d`) before now.
pub fn since_ms(since: &str) -> Result<i64> {
    let s = since.trim();
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t.as_millisecond());
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| {
        anyhow!("--since {since:?}: an RFC 3339 time or an age such as 90s, 15m, 1h, 7d")
    })?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => anyhow::bail!("--since {since:?}: the age's unit is s, m, h or d"),
    };
    Ok(jiff::Timestamp::now().as_millisecond() - n.saturating_mul(ms))
}

/// `ferry audit list [--since …]`.
pub fn list(ctx: &AgentCtx, since: Option<&str>) -> Result<r::AuditList> {
    let from = since.map(since_ms).transpose()?;
    let p = chain::parse(&ctx.audit.read()?);
    let mut records = Vec::new();
    for f in &p.frames {
        let record: Value = if f.checkpoint {
            let mut v: Value = serde_json::from_slice(&f.payload).unwrap_or(json!({}));
            if let Value::Object(m) = &mut v {
                m.insert("kind".into(), json!("checkpoint"));
            }
            v
        } else {
            serde_json::from_slice(&f.payload)
                .unwrap_or_else(|_| json!({"kind": "unreadable", "bytes": f.payload.len()}))
        };
        if let (Some(from), Some(t)) = (from, record.get("time_ms").and_then(Value::as_i64)) {
            if t < from {
                continue;
            }
        }
        records.push(r::AuditRecord {
            seq: f.seq,
            hash: chain::hex(&f.hash),
            record,
        });
    }
    let omitted = records.len().saturating_sub(AUDIT_LIST_RECORDS_MAX);
    records.drain(..omitted);
    Ok(r::AuditList {
        node: ctx.identity.node_name.clone(),
        head_seq: p.frames.last().map_or(0, |f| f.seq),
        records,
        omitted: omitted as u64,
    })
}

fn wire_head(h: &Head) -> AuditHead {
    AuditHead {
        seq: h.seq,
        hash: chain::hex(&h.hash),
    }
}

fn from_wire(seq: u64, hash: &str) -> Option<Head> {
    Some(Head {
        seq,
        hash: chain::parse_hex(hash)?,
    })
}

/// A peer keeps `h` of its chain (`POST /api/v1/audit/heads`).
pub fn put_head(ctx: &AgentCtx, node: Option<String>, h: AuditHead) -> Result<r::AuditHeadKept> {
    let node = node.ok_or_else(|| anyhow!("only a paired node sends its audit head"))?;
    let head = from_wire(h.seq, &h.hash)
        .ok_or_else(|| ferry_api::ActionError::bad_input("hash: 64 hex digits"))?;
    let held = ctx.audit.held();
    let last = held.get(&node).last().copied();
    let kept = held.put(&node, head)?;
    match last {
        _ if kept => {}
        Some(l) if l == head => {}
        Some(l) if l.seq == head.seq => {
            tracing::error!(%node, held = %l, sent = %head, "audit.head_conflict: the peer sent another hash for a record whose head is held here: its chain was rewritten (ferry audit verify on it shows where)");
        }
        _ => {
            tracing::warn!(%node, head = %head, last = ?last.map(|l| l.to_string()), "audit.head_not_newer: kept the heads held (a chain does not go back)");
        }
    }
    Ok(r::AuditHeadKept {
        holder: ctx.identity.node_name.clone(),
        node,
        kept,
    })
}

/// The heads of the calling node's chain held here.
pub fn held_heads(ctx: &AgentCtx, node: Option<String>) -> Result<r::AuditHeads> {
    let node = node.ok_or_else(|| anyhow!("only a paired node asks for its audit heads"))?;
    Ok(r::AuditHeads {
        holder: ctx.identity.node_name.clone(),
        heads: ctx.audit.held().get(&node).iter().map(wire_head).collect(),
        node,
    })
}

/// The witness, its key and the cluster id, if this node has one.
fn witness(ctx: &AgentCtx) -> Option<(SocketAddr, ring::hmac::Key, String)> {
    let c = ctx.cfg.cluster.as_ref()?;
    let addr = c.witness?;
    let key = crate::cluster::witness::load_key(c.witness_key_file.as_deref()?).ok()?;
    let peer = ctx.peers.get(&c.peer)?;
    let id = crate::cluster::cluster_id(&peer.heartbeat_key)?;
    Some((addr, key, id))
}

/// One exchange with the witness: `put` a head (or none), answer the
/// heads it holds. `Ok(None)`: no answer (a witness of an earlier release
/// does not answer audit messages).
fn witness_exchange(
    ctx: &AgentCtx,
    (addr, key, cluster): &(SocketAddr, ring::hmac::Key, String),
    put: Option<Head>,
) -> Result<Option<wire::Held>> {
    use crate::cluster::witness::{open, seal};
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(HOLDER_TIMEOUT))?;
    let nonce = crate::transport::identity::random_u64();
    let ask = wire::ToWitness {
        audit: wire::Ask {
            cluster: cluster.clone(),
            node: ctx.identity.node_name.clone(),
            put: put.map(|h| wire::WireHead {
                seq: h.seq,
                hash: chain::hex(&h.hash),
            }),
            nonce,
        },
    };
    sock.send_to(&seal(key, serde_json::to_vec(&ask)?), addr)?;
    let mut buf = vec![0u8; WITNESS_REPLY_BYTES_MAX];
    let deadline = std::time::Instant::now() + HOLDER_TIMEOUT;
    while std::time::Instant::now() < deadline {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        if from != *addr {
            continue;
        }
        let Some(body) = open(key, &buf[..n]) else {
            continue;
        };
        if let Ok(m) = serde_json::from_slice::<wire::FromWitness>(body) {
            if m.audit_heads.nonce == nonce && m.audit_heads.node == ctx.identity.node_name {
                return Ok(Some(m.audit_heads));
            }
        }
    }
    Ok(None)
}

/// Every holder of this node's heads: (who, the heads, a note).
fn gather(ctx: &AgentCtx) -> Vec<(String, Option<Vec<Head>>, String)> {
    let mut out = Vec::new();
    for p in ctx.peers.list() {
        let who = format!("peer {}", p.name);
        let got = ApiClient::to_peer(&ctx.identity, &p)
            .map(|c| c.with_timeout(HOLDER_TIMEOUT))
            .and_then(|c| c.send(&Action::GetAuditHeads));
        match got {
            Ok(Reply::AuditHeads(h)) => {
                let heads: Vec<Head> = h
                    .heads
                    .iter()
                    .filter_map(|x| from_wire(x.seq, &x.hash))
                    .collect();
                out.push((who, Some(heads), "holds heads".into()));
            }
            Ok(_) => out.push((who, None, "answered something else".into())),
            Err(e) => {
                let old = e.chain().any(|c| {
                    c.downcast_ref::<ferry_api::ActionError>()
                        .is_some_and(|a| a.kind.status() == 404)
                });
                let note = if old {
                    "keeps no heads (a release before the audit log): nothing to compare with"
                        .to_string()
                } else {
                    format!("could not be asked: {e:#}")
                };
                out.push((who, None, note));
            }
        }
    }
    if let Some(w) = witness(ctx) {
        let who = format!("witness {}", w.0);
        match witness_exchange(ctx, &w, None) {
            Ok(Some(h)) => {
                let heads = h.heads.iter().filter_map(|x| from_wire(x.seq, &x.hash)).collect();
                out.push((who, Some(heads), "holds heads".into()));
            }
            Ok(None) => out.push((
                who,
                None,
                "did not answer: a witness of a release before the audit log keeps no heads (or it is unreachable)".into(),
            )),
            Err(e) => out.push((who, None, format!("could not be asked: {e:#}"))),
        }
    }
    out
}

/// `ferry audit verify`: the local chain, then every head held elsewhere.
pub fn verify(ctx: &AgentCtx) -> Result<r::AuditVerify> {
    let parsed = chain::parse(&ctx.audit.read()?);
    let holders = gather(ctx);
    let mut held = Vec::new();
    for (who, heads, _) in &holders {
        for h in heads.iter().flatten() {
            held.push(HeldHead {
                holder: who.clone(),
                head: *h,
            });
        }
    }
    let last = parsed.frames.last().map(|f| f.head()).unwrap_or_default();
    let holders = holders
        .into_iter()
        .map(|(holder, heads, note)| r::AuditHolder {
            holder,
            newest: heads.as_ref().and_then(|h| h.last()).map(|h| h.to_string()),
            heads: heads.map(|h| h.len() as u64),
            note,
        })
        .collect();
    let node = ctx.identity.node_name.clone();
    Ok(match chain::verify(&parsed, &held) {
        Ok(v) => r::AuditVerify {
            node,
            ok: true,
            records: v.records,
            first_seq: v.first_seq,
            head_seq: v.head.seq,
            head_hash: chain::hex(&v.head.hash),
            checkpoint: v.checkpoint.map(|c| c.to_string()),
            holders,
            heads_matched: v.heads_matched,
            heads_pruned: v.heads_pruned,
            problem: None,
            first_bad_seq: None,
        },
        Err(e) => {
            tracing::error!(problem = %e, "audit.verify_failed");
            r::AuditVerify {
                node,
                ok: false,
                records: parsed.frames.iter().filter(|f| !f.checkpoint).count() as u64,
                first_seq: parsed
                    .frames
                    .iter()
                    .find(|f| !f.checkpoint)
                    .map_or(0, |f| f.seq),
                head_seq: last.seq,
                head_hash: chain::hex(&last.hash),
                checkpoint: parsed
                    .frames
                    .first()
                    .filter(|f| f.checkpoint)
                    .map(|f| f.head().to_string()),
                holders,
                heads_matched: 0,
                heads_pruned: 0,
                first_bad_seq: e.seq(),
                problem: Some(e.to_string()),
            }
        }
    })
}

/// Sends this node's head to every peer and the witness, every
/// `audit.head_interval_ms`, on its own thread (never the heartbeat's).
pub fn spawn_heads(ctx: Arc<AgentCtx>) -> std::io::Result<()> {
    let every = Duration::from_millis(ctx.audit.settings().head_interval_ms);
    std::thread::Builder::new()
        .name("audit-heads".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let head = ctx.audit.head();
                if head.seq == 0 {
                    continue;
                }
                for p in ctx.peers.list() {
                    let sent = ApiClient::to_peer(&ctx.identity, &p)
                        .map(|c| c.with_timeout(HOLDER_TIMEOUT))
                        .and_then(|c| c.send(&Action::PutAuditHead(wire_head(&head))));
                    if let Err(e) = sent {
                        tracing::debug!(peer = %p.name, error = %format!("{e:#}"), "audit.head_not_sent");
                    }
                }
                // Asked each time: the peer (whose pairing gives the
                // cluster id) may be paired after the start.
                if let Some(w) = witness(&ctx) {
                    match witness_exchange(&ctx, &w, Some(head)) {
                        Ok(Some(_)) => {}
                        Ok(None) => tracing::debug!("audit.head_not_kept_by_witness: no answer (a witness before the audit log?)"),
                        Err(e) => tracing::debug!(error = %e, "audit.head_not_sent_to_witness"),
                    }
                }
            }
        })?;
    Ok(())
}

/// Who started the migration of `workload` and who cut it over, from this
/// node's audit log (the last successful `StartMigration` and cutover of
/// it): a token (`NAME (ROLE)`) or a decision (`auto-cutover`,
/// `scheduled cutover`). `None` where the log has no such record (pruned,
/// or the migration predates the log).
pub fn who_did(ctx: &AgentCtx, workload: &str) -> (Option<String>, Option<String>) {
    let Ok(bytes) = ctx.audit.read() else {
        return (None, None);
    };
    let p = chain::parse(&bytes);
    let cutover_path = format!("/api/v1/migrations/{workload}/cutover");
    // Requests by operation id: what each was (the result record does not
    // repeat the request).
    let mut asked: std::collections::HashMap<String, (&'static str, String)> = Default::default();
    let (mut started, mut cut) = (None, None);
    for f in p.frames.iter().filter(|f| !f.checkpoint) {
        let Ok(v) = serde_json::from_slice::<Value>(&f.payload) else {
            continue;
        };
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
        let ok = v
            .get("result")
            .or_else(|| v.get("detail"))
            .and_then(|r| r.get("ok"))
            .and_then(Value::as_bool)
            == Some(true);
        match (s("kind"), s("phase")) {
            ("action", "request") => {
                let req = v.get("request").cloned().unwrap_or(Value::Null);
                let what = match s("action") {
                    "StartMigration" if req["body"]["workload"].as_str() == Some(workload) => {
                        Some("start")
                    }
                    "Cutover" if req["path"].as_str() == Some(cutover_path.as_str()) => {
                        Some("cutover")
                    }
                    _ => None,
                };
                if let Some(what) = what {
                    asked.insert(s("op").to_string(), (what, s("who").to_string()));
                }
            }
            ("action", "result") if ok => match asked.get(s("op")) {
                Some(("start", who)) => started = Some(who.clone()),
                Some(("cutover", who)) => cut = Some(who.clone()),
                _ => {}
            },
            ("decision", _) if ok && s("workload") == workload => match s("decision") {
                "auto-cutover-result" => cut = Some("auto-cutover".to_string()),
                "scheduled-cutover-result" => cut = Some("scheduled cutover".to_string()),
                _ => {}
            },
            _ => {}
        }
    }
    (started, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_an_age_and_secrets_are_redacted() {
        let now = jiff::Timestamp::now().as_millisecond();
        let h = since_ms("1h").unwrap();
        assert!((now - 3_600_000 - h).abs() < 5_000, "{h}");
        assert_eq!(since_ms("2026-12-07T10:00:00Z").unwrap(), 1_796_637_600_000);
        assert!(since_ms("1y").is_err() && since_ms("soon").is_err());
        let mut v = json!({"name": "b", "token": "s3cret", "nested": [{"password": "x"}], "req": {"token": 7}});
        redact(&mut v);
        assert_eq!(v["token"], "<redacted>");
        assert_eq!(v["nested"][0]["password"], "<redacted>");
        assert_eq!(
            v["req"]["token"], 7,
            "a snapshot's number token is not a secret"
        );
        assert_eq!(v["name"], "b");
    }

    #[test]
    fn failed_logins_are_recorded_up_to_the_limit_per_minute_and_the_rest_counted() {
        let f = FailedLogins::new(2);
        let t = 10 * 60_000;
        assert_eq!(f.admit(t), Some(0));
        assert_eq!(f.admit(t + 1), Some(0));
        assert_eq!(f.admit(t + 2), None);
        assert_eq!(f.admit(t + 59_999), None);
        // The next minute: recorded again, with the two left out counted.
        assert_eq!(f.admit(t + 60_000), Some(2));
        assert_eq!(f.admit(t + 60_001), Some(0));
        assert_eq!(f.admit(t + 60_002), None);
    }

    #[test]
    fn a_session_record_names_who_from_where_and_the_result() {
        let who = Authority::Token {
            name: "alice".into(),
            role: ferry_api::Role::Admin,
        };
        let from: SocketAddr = "198.18.0.4:5000".parse().unwrap();
        let v = session_record(
            ferry_api::ActionKind::CreateSession,
            Some(&who),
            Some(from),
            json!({"ok": true}),
        );
        assert_eq!(v["action"], "CreateSession");
        assert_eq!(v["token"], "alice");
        assert_eq!(v["role"], "admin");
        assert_eq!(v["from"], "198.18.0.4:5000");
        assert_eq!(v["phase"], "result");
        let v = session_record(
            ferry_api::ActionKind::CreateSession,
            None,
            None,
            json!({"ok": false}),
        );
        assert_eq!(v["who"], "unknown token");
        assert_eq!(v["token"], Value::Null);
    }
}
