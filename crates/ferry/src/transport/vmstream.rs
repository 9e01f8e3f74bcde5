//! PLACEHOLDER (replaced by the tunnel branch at merge): the interface.

use std::path::{Path, PathBuf};

use super::dial::Dialer;
use super::inbound::Inbound;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("tunnel: {0}")]
    Other(String),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelLimits {
    pub accept_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone)]
pub struct VmStreamHello {
    pub workload: String,
    pub token: String,
}

#[derive(Debug, Clone, Default)]
pub struct TunnelStats {
    pub bytes_out: u64,
    pub bytes_in: u64,
}

pub struct Outgoing;

impl Outgoing {
    pub fn open(
        _dialer: &Dialer,
        _peer: &str,
        _workload: &str,
        _token: &str,
        _listen_path: &Path,
        _limits: TunnelLimits,
    ) -> Result<Outgoing, TunnelError> {
        Err(TunnelError::Other("placeholder".into()))
    }
    pub fn bytes_out(&self) -> u64 {
        0
    }
    pub fn bytes_in(&self) -> u64 {
        0
    }
    pub fn is_done(&self) -> bool {
        true
    }
    pub fn finish(self, _t: std::time::Duration) -> Result<TunnelStats, TunnelError> {
        Ok(TunnelStats::default())
    }
    pub fn abort(&self) {}
}

pub fn serve(
    _inbound: Inbound,
    _resolve: impl FnOnce(&VmStreamHello) -> Result<PathBuf, String>,
    _limits: TunnelLimits,
) -> Result<TunnelStats, TunnelError> {
    Err(TunnelError::Other("placeholder".into()))
}
