//! PLACEHOLDER (replaced by the tunnel branch's client at merge): the
//! interface the live move is written against.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {command} had no answer in {ms} ms")]
    Timeout { command: String, ms: u64 },
    #[error("QMP connection closed")]
    Closed,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    pub at_unix_us: u64,
}

pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<QmpEvent>,
    pub timeout: Duration,
}

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        s.set_read_timeout(Some(timeout))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
            events: Vec::new(),
            timeout,
        };
        q.line()?;
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, QmpError> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&l).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut m = json!({ "execute": command });
        if !arguments.is_null() {
            m["arguments"] = arguments;
        }
        writeln!(self.w, "{m}")?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if Instant::now() > deadline {
                return Err(QmpError::Timeout {
                    command: command.into(),
                    ms: self.timeout.as_millis() as u64,
                });
            }
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("").into(),
                    desc: e["desc"].as_str().unwrap_or("").into(),
                });
            }
            if let Some(name) = v["event"].as_str() {
                self.events.push(QmpEvent {
                    name: name.into(),
                    data: v["data"].clone(),
                    at_unix_us: v["timestamp"]["seconds"].as_u64().unwrap_or(0) * 1_000_000
                        + v["timestamp"]["microseconds"].as_u64().unwrap_or(0),
                });
            }
        }
    }

    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<QmpEvent>, QmpError> {
        let _ = (name, timeout);
        Ok(None)
    }

    pub fn poll_events(&mut self, wait: Duration) {
        let _ = wait;
    }
}
