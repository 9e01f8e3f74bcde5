//! ferry-nbd: an NBD server written for ferry's IO filter.
//!
//! - [`proto`]: wire constants and fixed-size encodings (pure);
//! - [`handshake`]: fixed-newstyle option negotiation (sans I/O);
//! - [`transmission`]: request validation, the one gate before the device (sans I/O);
//! - [`connection`]: one connection's handshake and worker pool, generic over `Read`/`Write`;
//! - [`tls`]: `NBD_OPT_STARTTLS`, one rustls session shared by a connection's reader and writers;
//! - [`server`]: TCP and Unix listeners, TLS-required listeners, connection limits,
//!   the handshake deadline, shutdown;
//! - [`device`]: the [`BlockDevice`] trait, a sparse-file and an in-memory device.

pub mod client;
pub mod connection;
pub mod device;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmission;

pub use connection::{Buffered, ConnectionLimits};
pub use device::{Allocation, BlockDevice, Completion, FileDevice, MemDevice, Responder, ZeroMode};
pub use handshake::{ExportInfo, NegotiationLimits, TlsMode};
pub use server::{Export, ListenAddr, Listener, Server, ServerError, ServerLimits};
