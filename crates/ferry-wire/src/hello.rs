//! The link handshake: who I am, which volume, which data history.

use serde::{Deserialize, Serialize};

/// The replication protocol version this ferry speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// Sent by the connecting (primary) side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the sender speaks.
    pub protocol_versions: Vec<u32>,
    pub node_name: String,
    pub volume: String,
    pub volume_id: String,
    pub size_bytes: u64,
    pub granularity_bytes: u64,
    pub generation: u64,
    pub ancestors: Vec<u64>,
    /// "sync" or "async".
    pub mode: String,
    /// The workload whose volumes share this stream (absent: a volume alone).
    #[serde(default)]
    pub group: Option<String>,
    /// Hellos on this connection (one per volume of the stream, in tag order).
    #[serde(default = "one")]
    pub group_size: u16,
}

fn one() -> u16 {
    1
}

/// The replica's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol_version: u32,
    pub node_name: String,
    /// `None` when accepted; otherwise why not, in words an operator can act on.
    pub refused: Option<String>,
    pub generation: u64,
    pub ancestors: Vec<u64>,
    /// Blocks the replica itself knows differ (encoded dirty map), if any.
    #[serde(default)]
    pub dirty_map: Option<Vec<u8>>,
}

impl Hello {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn from_bytes(b: &[u8]) -> Result<Hello, crate::WireError> {
        serde_json::from_slice(b).map_err(|e| crate::WireError::Malformed {
            kind: crate::Kind::Hello,
            reason: e.to_string(),
        })
    }
}

impl HelloReply {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn from_bytes(b: &[u8]) -> Result<HelloReply, crate::WireError> {
        serde_json::from_slice(b).map_err(|e| crate::WireError::Malformed {
            kind: crate::Kind::HelloReply,
            reason: e.to_string(),
        })
    }
}

/// Sent by a share's primary when its link connects (answered with a [`HelloReply`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareHello {
    pub protocol_versions: Vec<u32>,
    pub node_name: String,
    pub share: String,
    pub share_id: String,
    pub generation: u64,
    pub ancestors: Vec<u64>,
    /// "sync" or "async".
    pub mode: String,
    /// Where the share is used on the primary: a replica made by this link
    /// is served at the same path if it is ever promoted (each node has its
    /// own mount namespace).
    #[serde(default)]
    pub path: String,
}

impl ShareHello {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn from_bytes(b: &[u8]) -> Result<ShareHello, crate::WireError> {
        serde_json::from_slice(b).map_err(|e| crate::WireError::Malformed {
            kind: crate::Kind::ShareHello,
            reason: e.to_string(),
        })
    }
}
