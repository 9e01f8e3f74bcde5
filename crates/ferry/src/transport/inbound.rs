//! The one inbound replication listener: accepts connections under the
//! listener's caps, completes mutual TLS, recognises the paired peer by its
//! certificate, reads the first frame, and hands the link to whoever the
//! agent routes it to (a volume stream or a share link).

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_wire::{FrameHeader, HelloReply, Kind, PROTOCOL_VERSION};

use super::conns::ConnTable;
use super::peers::{Peer, Peers};

/// A TLS server stream of an inbound link.
pub type InboundTls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// An inbound link from a paired node, authenticated, its first frame read.
#[derive(Debug)]
pub struct Inbound {
    pub peer: Peer,
    /// The TLS stream, buffered; what follows the first frame may be buffered.
    pub reader: BufReader<InboundTls>,
    /// A clone of the socket, to end the link from another thread.
    pub control: TcpStream,
    pub first: FrameHeader,
    /// The first frame's payload (`first.len` bytes).
    pub first_body: Vec<u8>,
}

/// What the listener needs: its caps, this node's TLS server configuration
/// and the paired nodes.
#[derive(Clone)]
pub struct Listener {
    pub conns: Arc<ConnTable>,
    pub tls_server: Arc<rustls::ServerConfig>,
    pub peers: Arc<Peers>,
    /// Largest frame payload accepted from a peer.
    pub frame_bytes_max: u32,
}

/// Routes an authenticated link; its error is logged and the link closed.
pub type Route = Arc<dyn Fn(Inbound) -> Result<()> + Send + Sync>;

/// Accepts replication links on `listener` until the process ends. Each
/// connection takes a place in `l.conns` (`replication.connections_max`;
/// at most `replication.handshakes_max` not yet authenticated, the oldest
/// closed for a newcomer; closed if not authenticated within
/// `replication.handshake_timeout_ms`).
pub fn serve(listener: TcpListener, l: Listener, route: Route) {
    for conn in listener.incoming() {
        let tcp = match conn {
            Ok(t) => t,
            Err(e) => {
                // Out of descriptors, most likely: let others finish.
                tracing::warn!(error = %e, "replication.accept_failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(closer) = tcp.try_clone() else {
            continue;
        };
        let Some(slot) = l.conns.admit(Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        })) else {
            continue;
        };
        let (l, route) = (l.clone(), route.clone());
        let _ = std::thread::Builder::new()
            .name("repl-in".into())
            .spawn(move || {
                let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let result = handshake(tcp, &l, &slot).and_then(|inbound| route(inbound));
                if let Err(e) = result {
                    tracing::warn!(%peer, error = %format!("{e:#}"), "replication.inbound.closed");
                }
            });
    }
}

fn handshake(tcp: TcpStream, l: &Listener, slot: &super::conns::ConnSlot) -> Result<Inbound> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let control = tcp.try_clone()?;
    let conn = rustls::ServerConnection::new(l.tls_server.clone())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Drive the handshake now, so an unregistered client is refused here.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .context("TLS handshake")?;
    }
    let cert = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("peer presented no certificate"))?;
    let fp = super::identity::fingerprint(cert);
    let peer = l
        .peers
        .by_fingerprint(&fp)
        .ok_or_else(|| anyhow!("unregistered certificate {fp}"))?;
    // A registered peer: kept when the listener is full.
    slot.authenticated();
    let mut reader = BufReader::with_capacity(1 << 20, tls);
    let mut first_body = Vec::new();
    let first = ferry_wire::read_frame(&mut reader, l.frame_bytes_max, &mut first_body)?;
    Ok(Inbound {
        peer,
        reader,
        control,
        first,
        first_body,
    })
}

/// Answers a Hello with a refusal (`why`, in words an operator can act on).
pub fn refuse<W: Write>(w: &mut W, me: &str, why: String) -> Result<()> {
    let reply = HelloReply {
        protocol_version: PROTOCOL_VERSION,
        node_name: me.to_string(),
        refused: Some(why.clone()),
        generation: 0,
        ancestors: vec![],
        dirty_map: None,
    };
    w.write_all(&ferry_wire::encode_frame(
        Kind::HelloReply,
        0,
        0,
        &reply.to_bytes(),
    ))?;
    w.flush()?;
    bail!("refused: {why}")
}
