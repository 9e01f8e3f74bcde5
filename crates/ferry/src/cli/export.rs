//! `ferry export`: serve one volume over NBD until SIGINT or SIGTERM: on a
//! Unix socket in a directory only this user may enter (default
//! `DATA_DIR/run/NAME.sock`), and on TCP only with TLS and a client
//! certificate of the data dir's NBD CA.

use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_core::ByteSize;
use ferry_nbd::{ConnectionLimits, Export, FileDevice, ListenAddr, Listener, Server, ServerLimits};
use serde::Serialize;

use crate::agent::nbd_tls;
use crate::cli::{ExportArgs, ExportLimitArgs};
use crate::sys::signals;
use crate::volume::VolumeStore;

impl ExportLimitArgs {
    pub fn to_limits(&self) -> Result<ServerLimits> {
        let max_request_bytes = u32::try_from(self.max_request_bytes.bytes())
            .ok()
            .filter(|&b| (512..=1 << 30).contains(&b))
            .context("--max-request-bytes must be between 512 B and 1 GiB")?;
        Ok(ServerLimits {
            max_connections: self.max_connections,
            handshake_timeout_ms: self.handshake_timeout_ms,
            connection: ConnectionLimits {
                max_request_bytes,
                max_in_flight_per_connection: self.max_in_flight_per_connection,
                ..ConnectionLimits::default()
            },
        })
    }
}

/// What `ferry export --json` prints once it is listening.
#[derive(Debug, Serialize)]
pub struct Listening {
    pub volume: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub uris: Vec<String>,
    pub listen: Vec<String>,
    /// The NBD CA clients of a TCP listener verify the server with, and
    /// whose client certificates it takes (`ferry nbd client-cert`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// A running export: the server, its bound addresses, the lock on the volume.
pub struct Running {
    pub server: Server,
    pub listening: Listening,
    threads: Vec<std::thread::JoinHandle<()>>,
    _lock: crate::volume::VolumeLock,
}

pub fn start(
    store: &VolumeStore,
    name: &str,
    listen: &[ListenAddr],
    tls_names: &[String],
    read_only: bool,
    limits: ServerLimits,
) -> Result<Running> {
    let lock = store.lock(name)?;
    let image = store.image_path(&crate::volume::validate_name(name)?);
    let device = FileDevice::open(&image, read_only).with_context(|| {
        format!(
            "cannot open the image of volume {name:?} at {}",
            image.display()
        )
    })?;
    let size = ferry_nbd::BlockDevice::size(&device);
    let export = Export {
        name: name.to_string(),
        description: format!("ferry volume {name}"),
        read_only,
        device: Arc::new(device),
    };
    let server = Server::new(vec![export], limits)?;
    let default_socket = store.data_dir().join("run").join(format!("{name}.sock"));
    let listen = if listen.is_empty() {
        vec![ListenAddr::Unix(default_socket.clone())]
    } else {
        listen.to_vec()
    };
    let mut threads = Vec::new();
    let mut uris = Vec::new();
    let mut bound = Vec::new();
    let mut tls_ca = None;
    for addr in &listen {
        let listener = match addr {
            ListenAddr::Unix(path) => nbd_tls::bind_private_socket(path, *path == default_socket)?,
            ListenAddr::Tcp(tcp) => {
                let ca = nbd_tls::NbdCa::load_or_create(store.data_dir())?;
                let host = if tcp.ip().is_unspecified() {
                    "localhost".to_string()
                } else {
                    tcp.ip().to_string()
                };
                let names = nbd_tls::server_names(&host, tcp, tls_names);
                tls_ca = Some(nbd_tls::ca_paths(store.data_dir()).1);
                Listener::bind(addr)?.require_tls(ca.server_config(&names)?)
            }
        };
        uris.push(listener.uri(name));
        bound.push(listener.local_addr().to_string());
        threads.push(server.serve(listener)?);
    }
    Ok(Running {
        server,
        listening: Listening {
            volume: name.to_string(),
            size_bytes: size,
            read_only,
            uris,
            listen: bound,
            tls_ca,
        },
        threads,
        _lock: lock,
    })
}

impl Running {
    pub fn stop(self) {
        self.server.shutdown();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub fn run(store: &VolumeStore, args: &ExportArgs, json: bool) -> Result<()> {
    let signals = signals::Signals::block()?;
    let limits = args.limits.to_limits()?;
    let running = start(
        store,
        &args.name,
        &args.listen,
        &args.tls_name,
        args.read_only,
        limits,
    )?;
    let l = &running.listening;
    if json {
        crate::sys::out::print_json(l)?;
    } else {
        println!(
            "exporting volume {} ({}{}) — stop with Ctrl-C",
            l.volume,
            ByteSize(l.size_bytes),
            if l.read_only { ", read-only" } else { "" }
        );
        for uri in &l.uris {
            println!("{uri}");
        }
    }
    crate::sys::out::flush_stdout();
    let sig = signals.wait()?;
    tracing::info!(signal = sig, "export.stop");
    running.stop();
    Ok(())
}
