//! A small blocking HTTPS client for the agent's REST API (the CLI's side,
//! and agent-to-agent calls). One request per connection; JSON in, JSON out.
//!
//! Every call is TLS 1.3 and pins the agent's certificate by fingerprint:
//! - an operator ([`ApiClient::operator`]) pins the fingerprint given
//!   (`FERRY_API_FINGERPRINT`, or the node's own certificate when the CLI
//!   runs on the agent's host) and sends the API token;
//! - a node calling its peer ([`ApiClient::to_peer`]) pins the peer's
//!   registered certificate and presents its own (mutual TLS): the peer
//!   knows it by that certificate, and no token travels.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::transport::identity::Identity;
use crate::transport::peers::Peer;

/// Largest response body read.
const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;
/// How long a connection (TCP and TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    static OP: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The header that carries an operation id to a peer: the records both
/// nodes write of one handover (cutover, switchover) share it. A peer of
/// an earlier release ignores it.
pub const OP_HEADER: &str = "x-ferry-op";

/// Runs `f` with every request this thread sends carrying operation id
/// `op` (an audit id: hex digits only).
pub fn with_op<T>(op: Option<&str>, f: impl FnOnce() -> T) -> T {
    let op = op.filter(|o| {
        !o.is_empty() && o.len() <= 64 && o.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    let before = OP.with(|c| c.replace(op.map(str::to_string)));
    let r = f();
    OP.with(|c| *c.borrow_mut() = before);
    r
}

/// The operation id this thread's requests carry, if any.
pub fn current_op() -> Option<String> {
    OP.with(|c| c.borrow().clone())
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: String,
    token: Option<String>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

fn strip(addr: &str) -> String {
    addr.trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

impl ApiClient {
    /// An operator's client: the agent at `addr` must present the
    /// certificate with `fingerprint`; `token` authenticates each call.
    pub fn operator(addr: &str, token: &str, fingerprint: &str) -> Result<ApiClient> {
        Ok(ApiClient {
            addr: strip(addr),
            token: Some(token.trim().to_string()),
            tls: crate::transport::tls::cli_client_config(fingerprint.trim().to_string())?,
            timeout: Duration::from_secs(120),
        })
    }

    /// A node's client for its registered peer: mutual TLS, both pinned.
    pub fn to_peer(me: &Identity, peer: &Peer) -> Result<ApiClient> {
        Ok(ApiClient {
            addr: strip(&peer.api),
            token: None,
            tls: crate::transport::tls::client_config(me, peer.fingerprint.clone())?,
            timeout: Duration::from_secs(120),
        })
    }

    /// Pairing: mutual TLS with a node not registered yet, whose
    /// certificate must have `fingerprint`, authorized by its API token.
    pub fn pairing(me: &Identity, addr: &str, fingerprint: &str, token: &str) -> Result<ApiClient> {
        Ok(ApiClient {
            addr: strip(addr),
            token: Some(token.trim().to_string()),
            tls: crate::transport::tls::client_config(me, fingerprint.trim().to_string())?,
            timeout: Duration::from_secs(120),
        })
    }

    /// The fingerprint of the certificate the agent at `addr` presents,
    /// learned from a TLS handshake alone (nothing is sent): for an
    /// operator to compare with `ferry node id` on that node.
    pub fn probe_fingerprint(addr: &str) -> Result<String> {
        let addr = strip(addr);
        let seen = Arc::new(std::sync::Mutex::new(None));
        let cfg = crate::transport::tls::probe_config(seen.clone())?;
        let mut tcp = connect(&addr)?;
        let mut conn = rustls::ClientConnection::new(cfg, crate::transport::tls::server_name())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .with_context(|| format!("TLS handshake with {addr} failed"))?;
        }
        let fp = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        fp.ok_or_else(|| anyhow!("{addr} presented no certificate"))
    }

    /// The same client, waiting up to `timeout` for an answer (120 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("POST", path, Some(body))
    }
    pub fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("PUT", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        self.call("DELETE", path, None)
    }

    /// Sends `action` (its method and path from the route table) and reads
    /// the typed reply. A failure keeps the agent's kind of error
    /// ([`ferry_api::ActionError`]).
    pub fn send(&self, action: &ferry_api::Action) -> Result<ferry_api::Reply> {
        let route = action.route();
        let v = self.call_route(
            route.method.as_str(),
            &action.path(),
            action.body().as_ref(),
            Some(route.path),
        )?;
        Ok(ferry_api::Reply::decode(route.kind, v)?)
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        self.call_route(method, path, body, None)
    }

    /// A Server-Sent Events stream at `path`: `on_event(name, data)` for
    /// each event until it returns false or the agent ends the stream (an
    /// `end` event is passed on, then the stream closes: its token was
    /// revoked). A refusal (401, 403, 429) is an error.
    pub fn follow(&self, path: &str, mut on_event: impl FnMut(&str, &str) -> bool) -> Result<()> {
        use std::io::BufRead;
        let mut tcp = connect(&self.addr)?;
        let mut conn =
            rustls::ClientConnection::new(self.tls.clone(), crate::transport::tls::server_name())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| {
                anyhow!("TLS handshake with the agent at {} failed: {e}", self.addr)
            })?;
        }
        // The agent sends a comment at least every EVENTS_KEEPALIVE_MS.
        tcp.set_read_timeout(Some(self.timeout))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Accept: text/event-stream\r\nConnection: close\r\n\r\n",
            self.addr
        );
        s.write_all(req.as_bytes())?;
        s.flush()?;
        let mut r = std::io::BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                bail!(
                    "the agent at {} closed the stream before its headers",
                    self.addr
                );
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
            if head.len() > 64 * 1024 {
                bail!("the headers of {} are too long", self.addr);
            }
        }
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("malformed HTTP status from {}", self.addr))?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let mut body = Vec::new();
        let mut pending = Vec::new();
        loop {
            // One chunk (or, unchunked, what is there) into `pending`.
            let mut buf = vec![0u8; 16 * 1024];
            if chunked {
                let mut size = String::new();
                if r.read_line(&mut size)? == 0 {
                    break;
                }
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| anyhow!("malformed chunk from {}", self.addr))?;
                if n == 0 {
                    break;
                }
                if n > RESPONSE_BYTES_MAX {
                    bail!("a chunk of {n} bytes from {}", self.addr);
                }
                buf.resize(n + 2, 0);
                r.read_exact(&mut buf)?;
                buf.truncate(n);
            } else {
                let n = match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                };
                buf.truncate(n);
            }
            if status != 200 {
                body.extend_from_slice(&buf);
                if body.len() > RESPONSE_BYTES_MAX {
                    break;
                }
                continue;
            }
            pending.extend_from_slice(&buf);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = pending.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&frame);
                let mut name = "message";
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v;
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                if !on_event(name, &data) || name == "end" {
                    return Ok(());
                }
            }
            if pending.len() > RESPONSE_BYTES_MAX {
                bail!(
                    "an event of more than {RESPONSE_BYTES_MAX} bytes from {}",
                    self.addr
                );
            }
        }
        if status != 200 {
            let mut resp = format!("HTTP/1.1 {status} x\r\n\r\n").into_bytes();
            resp.extend_from_slice(&body);
            parse_response(&self.addr, &resp)?;
            bail!("the agent at {} answered {status}", self.addr);
        }
        Ok(())
    }

    fn call_route(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        route: Option<&str>,
    ) -> Result<Value> {
        let mut tcp = connect(&self.addr)?;
        let mut conn =
            rustls::ClientConnection::new(self.tls.clone(), crate::transport::tls::server_name())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| {
                anyhow!(
                    "TLS handshake with the agent at {} failed: {e} (if its certificate is not the one pinned: compare the fingerprint `ferry node id` prints on that node with the one given)",
                    self.addr
                )
            })?;
        }
        tcp.set_read_timeout(Some(self.timeout))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let auth = match current_op() {
            Some(op) => format!("{auth}{OP_HEADER}: {op}\r\n"),
            None => auth,
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes())?;
        s.flush()?;
        let mut resp = Vec::new();
        match (&mut s)
            .take(RESPONSE_BYTES_MAX as u64)
            .read_to_end(&mut resp)
        {
            Ok(_) => {}
            // A peer that closes without close_notify after a whole answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => {}
            Err(e) => {
                return Err(e).with_context(|| format!("reading the answer of {}", self.addr))
            }
        }
        log_reply(method, path, route, &resp);
        parse_response(&self.addr, &resp)
    }
}

/// With `FERRY_API_REPLY_LOG=FILE` (set by `scripts/test`): appends every
/// answer this process receives — method, route, path, status, body — as
/// one JSON line, for the check of every reply against the OpenAPI
/// document (`scripts/check-api-replies`).
fn log_reply(method: &str, path: &str, route: Option<&str>, resp: &[u8]) {
    let Some(file) = std::env::var_os("FERRY_API_REPLY_LOG") else {
        return;
    };
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return;
    };
    let head = String::from_utf8_lossy(&resp[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body: Value = serde_json::from_slice(&resp[split + 4..]).unwrap_or(Value::Null);
    let line = serde_json::json!({"method": method, "route": route, "path": path,
        "status": status, "body": body});
    let mut text = line.to_string();
    text.push('\n');
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        // One write of one line: appends from many processes do not mix.
        let _ = f.write_all(text.as_bytes());
    }
}

fn connect(addr: &str) -> Result<TcpStream> {
    let hint = || {
        format!("cannot reach the ferry agent API at {addr} (is `ferry agent` running? set --api or FERRY_API)")
    };
    // Unreachable: 503 when a node passes it on (ActionError).
    let unavailable = || ferry_api::ActionError::unavailable(hint());
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| anyhow::Error::new(unavailable()).context(e))?
        .next()
        .ok_or_else(unavailable)?;
    let tcp = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT).map_err(|e| {
        anyhow::Error::new(ferry_api::ActionError::unavailable(format!(
            "{}: {e}",
            hint()
        )))
    })?;
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    tcp.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

fn parse_response(addr: &str, resp: &[u8]) -> Result<Value> {
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    let head = String::from_utf8_lossy(&resp[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status from {addr}"))?;
    let mut payload = &resp[split + 4..];
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked responses are not supported");
    }
    if payload.is_empty() {
        payload = b"null";
    }
    let value: Value = serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
    if status == 401 {
        bail!("the agent at {addr} refused the API token (use FERRY_TOKEN, --token-file, or run on the agent's host with its --data-dir)");
    }
    if !(200..300).contains(&status) {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        // The agent's kind of failure travels on (a node passing on its
        // peer's 409 answers 409).
        use ferry_api::ErrorKind as K;
        let kind = match status {
            400 => K::BadInput,
            403 => K::Forbidden,
            404 => K::NotFound,
            409 => K::Conflict,
            413 => K::TooLarge,
            503 => K::Unavailable,
            _ => K::Internal,
        };
        return Err(ferry_api::ActionError::new(kind, msg).into());
    }
    Ok(value)
}
