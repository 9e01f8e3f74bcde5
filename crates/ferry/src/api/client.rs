//! A small blocking HTTP/1.1 client for the agent's REST API (the CLI's side,
//! and agent-to-agent calls). One request per connection; JSON in, JSON out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Largest response body read.
const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: String,
    token: String,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(addr: &str, token: &str) -> ApiClient {
        ApiClient {
            addr: addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            token: token.trim().to_string(),
            timeout: Duration::from_secs(120),
        }
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
    pub fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("PATCH", path, Some(body))
    }
    pub fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("PUT", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        self.call("DELETE", path, None)
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut s = TcpStream::connect(&self.addr)
            .with_context(|| format!("cannot reach the ferry agent API at {} (is `ferry agent` running? set --api or FERRY_API)", self.addr))?;
        s.set_read_timeout(Some(self.timeout))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        s.write_all(req.as_bytes())?;
        let mut resp = Vec::new();
        s.take(RESPONSE_BYTES_MAX as u64).read_to_end(&mut resp)?;
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed HTTP response from {}", self.addr))?;
        let head = String::from_utf8_lossy(&resp[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("malformed HTTP status from {}", self.addr))?;
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
            bail!("the agent at {} refused the API token (use FERRY_TOKEN, --token-file, or run on the agent's host with its --data-dir)", self.addr);
        }
        if !(200..300).contains(&status) {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{msg}");
        }
        Ok(value)
    }
}
