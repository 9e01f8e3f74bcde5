//! Dialing a paired node's replication listener with this node's identity.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::identity::Identity;
use super::peers::{Peer, Peers};

/// A TLS client stream to a peer's replication listener, handshake done.
pub type PeerStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// This node's identity and the nodes it is paired with: all an engine
/// needs to reach a peer.
#[derive(Clone)]
pub struct Dialer {
    pub identity: Arc<Identity>,
    pub peers: Arc<Peers>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("node", &self.identity.node_name)
            .finish_non_exhaustive()
    }
}

impl Dialer {
    pub fn node_name(&self) -> &str {
        &self.identity.node_name
    }

    /// Connects to registered node `peer_name`'s replication listener and
    /// completes the mutually authenticated TLS handshake (its pinned
    /// certificate).
    pub fn connect(&self, peer_name: &str) -> Result<(Peer, PeerStream)> {
        let peer = self
            .peers
            .get(peer_name)
            .ok_or_else(|| anyhow!("node {peer_name:?} is not registered (ferry node add)"))?;
        let addr = peer
            .replication
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                anyhow!(
                    "bad replication address {:?} for {}",
                    peer.replication,
                    peer.name
                )
            })?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to {} at {}", peer.name, peer.replication))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let tls_cfg = super::tls::client_config(&self.identity, peer.fingerprint.clone())?;
        let conn = rustls::ClientConnection::new(tls_cfg, super::tls::server_name())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .with_context(|| format!("TLS handshake with {} failed", peer.name))?;
        }
        Ok((peer, tls))
    }
}
