//! ferry-wire: the frames two ferry nodes exchange on a replication link.
//!
//! Every frame is a fixed 32-byte header and a payload:
//!
//! ```text
//!  0       4    5    6        8                16               24      28      32
//!  ┌───────┬────┬────┬────────┬────────────────┬────────────────┬───────┬───────┐
//!  │ magic │ ver│kind│ flags  │ seq            │ offset         │ len   │ hcrc  │
//!  └───────┴────┴────┴────────┴────────────────┴────────────────┴───────┴───────┘
//!  payload (len bytes), then its CRC-32C (4 bytes) when len > 0
//! ```
//!
//! - `hcrc` is the CRC-32C of the first 28 header bytes: a torn or corrupted
//!   header is refused before its length is believed.
//! - `len` is limited by the receiver's `frame_bytes_max`; nothing larger is read.
//! - A corrupted payload is refused; the link drops and the range is resynced
//!   (never a silent wrong byte).
//!
//! **Version rule**: `ver` is the frame-format version (1). The `Hello` handshake
//! (JSON payload) carries the protocol versions each side speaks; both use the
//! highest common one, and a peer with none in common is refused with a message.
//!
//! ```text
//!  primary A                                   replica B
//!   Hello{node, volume id, size, generations} ─▶
//!                                             ◀─ HelloReply{accept | refuse: reason, generations}
//!   Write/Zero/Copy/CopyZero{seq} ...          ─▶  applied in order
//!   Flush{seq}                                 ─▶  fdatasync
//!                                             ◀─ Ack{received = seq N, durable = seq M}
//!   Ping                                       ─▶
//!                                             ◀─ Ack (as a pong)
//! ```

mod crc;
mod fileop;
mod frame;
mod hello;

pub use crc::crc32c;
pub use fileop::{
    decode_manifest, decode_sums, encode_manifest, encode_sums, EntryKind, FileOp, FileSums,
    ManifestEntry, Owner, SharePath, Stamp, StampedOp, Target, Time, SHARE_NAME_BYTES_MAX,
    SHARE_PATH_BYTES_MAX,
};
pub use frame::{
    encode_frame, read_frame, set_frame_seq, split_frame, trailer, FrameHeader, Kind,
    ReadFrameError, WireError, FRAME_FORMAT_VERSION, HEADER_BYTES, TRAILER_BYTES,
};
pub use hello::{Hello, HelloReply, ShareHello, PROTOCOL_VERSION};
