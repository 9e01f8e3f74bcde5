//! Frame headers: encode, parse, verify. Pure functions over byte slices.

use crate::crc::crc32c;

pub const MAGIC: u32 = 0x4652_5946; // "FRYF"
pub const FRAME_FORMAT_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 32;
/// Bytes of the payload checksum that follows a non-empty payload.
pub const TRAILER_BYTES: usize = 4;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake from the connecting side (JSON [`crate::Hello`]).
    Hello = 1,
    /// Handshake answer (JSON [`crate::HelloReply`]).
    HelloReply = 2,
    /// A client write: `offset`, payload = data.
    Write = 3,
    /// Zeroes (WRITE_ZEROES/TRIM effect, or a hole while copying): `offset`, length in payload (u64).
    Zero = 4,
    /// A flush barrier: everything before it must be durable before it is acknowledged.
    Flush = 5,
    /// A block from the background copier: `offset`, payload = data.
    Copy = 6,
    /// Replica → primary: `seq` = received (applied in order) up to, `offset` = durable up to.
    Ack = 7,
    /// Keep-alive; answered with an `Ack`.
    Ping = 8,
    /// A fatal error, payload = UTF-8 message; the link closes after it.
    Error = 9,
    /// A share's file operation ([`crate::StampedOp`]), sequenced like a write.
    FileOp = 10,
    /// Handshake of a share's link (JSON [`crate::ShareHello`]).
    ShareHello = 11,
    /// Primary → replica: send your manifest of the subtree at the path in the
    /// payload (answered in stream order, after every op before it).
    ManifestRequest = 12,
    /// Replica → primary: `seq` = the request's, payload = [`crate::encode_manifest`]
    /// entries; flag 1 = more frames follow.
    Manifest = 13,
    /// Primary → replica: send the block sums of the file at the path
    /// (payload: block size u32, then the path), in stream order.
    SumsRequest = 14,
    /// Replica → primary: `seq` = the request's, payload = [`crate::encode_sums`];
    /// flag 1 = more frames follow.
    Sums = 15,
    /// Replica → primary: an op it could not apply while not held to every
    /// op (resyncing, or an async share); payload = the path, compared again.
    Failed = 16,
    /// A link probe (`ferry estimate probe`): the dialing side's first
    /// frame (empty); the listener answers with a `Probe` whose `offset` is
    /// its `frame_bytes_max`, or an `Error`. Then `Copy` frames are data to
    /// discard, `Ping{seq}` is answered at once by `Ping{seq, offset = bytes
    /// received}`, and the listener sends `Ack{offset = bytes received}`
    /// as the data arrives.
    Probe = 17,
    /// A VM's live-migration stream tunnelled between two nodes' agents
    /// (QEMU's migration socket at each end). The dialing side's first
    /// frame carries JSON `{workload, token}`; the listener answers with a
    /// `VmStream` frame carrying JSON `{refused: null | reason}`. Then
    /// `VmStream` frames carry the stream's bytes both ways; an empty one
    /// ends its direction, and the tunnel closes.
    VmStream = 18,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloReply,
            3 => Kind::Write,
            4 => Kind::Zero,
            5 => Kind::Flush,
            6 => Kind::Copy,
            7 => Kind::Ack,
            8 => Kind::Ping,
            9 => Kind::Error,
            10 => Kind::FileOp,
            11 => Kind::ShareHello,
            12 => Kind::ManifestRequest,
            13 => Kind::Manifest,
            14 => Kind::SumsRequest,
            15 => Kind::Sums,
            16 => Kind::Failed,
            17 => Kind::Probe,
            18 => Kind::VmStream,
            _ => return None,
        })
    }
}

/// A refused frame. Any of these ends the link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}: not a ferry replication peer")]
    BadMagic(u32),
    #[error("frame format version {0} not supported (this ferry speaks {FRAME_FORMAT_VERSION})")]
    BadVersion(u8),
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {len} bytes is above frame_bytes_max {max}")]
    TooLong { len: u32, max: u32 },
    #[error("frame payload checksum mismatch (seq {seq})")]
    PayloadChecksum { seq: u64 },
    #[error("malformed {kind:?} frame: {reason}")]
    Malformed { kind: Kind, reason: String },
}

/// A parsed, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: Kind,
    pub flags: u16,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

impl FrameHeader {
    pub fn new(kind: Kind, seq: u64, offset: u64, len: u32) -> FrameHeader {
        FrameHeader {
            kind,
            flags: 0,
            seq,
            offset,
            len,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4] = FRAME_FORMAT_VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        let crc = crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Parses and checks a header; `frame_bytes_max` bounds the payload.
    pub fn parse(b: &[u8; HEADER_BYTES], frame_bytes_max: u32) -> Result<FrameHeader, WireError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let crc = u32::from_be_bytes([b[28], b[29], b[30], b[31]]);
        if crc32c(&b[..28]) != crc {
            return Err(WireError::HeaderChecksum);
        }
        if b[4] != FRAME_FORMAT_VERSION {
            return Err(WireError::BadVersion(b[4]));
        }
        let kind = Kind::from_u8(b[5]).ok_or(WireError::UnknownKind(b[5]))?;
        let mut u = [0u8; 8];
        u.copy_from_slice(&b[8..16]);
        let seq = u64::from_be_bytes(u);
        u.copy_from_slice(&b[16..24]);
        let offset = u64::from_be_bytes(u);
        let len = u32::from_be_bytes([b[24], b[25], b[26], b[27]]);
        if len > frame_bytes_max {
            return Err(WireError::TooLong {
                len,
                max: frame_bytes_max,
            });
        }
        Ok(FrameHeader {
            kind,
            flags: u16::from_be_bytes([b[6], b[7]]),
            seq,
            offset,
            len,
        })
    }

    /// Bytes that follow the header on the wire.
    pub fn body_bytes(&self) -> usize {
        if self.len == 0 {
            0
        } else {
            self.len as usize + TRAILER_BYTES
        }
    }

    /// Checks `body` (payload + trailer) and returns the payload.
    pub fn verify<'a>(&self, body: &'a [u8]) -> Result<&'a [u8], WireError> {
        if self.len == 0 {
            return Ok(&[]);
        }
        let n = self.len as usize;
        if body.len() != n + TRAILER_BYTES {
            return Err(WireError::Malformed {
                kind: self.kind,
                reason: "short body".into(),
            });
        }
        let crc = u32::from_be_bytes([body[n], body[n + 1], body[n + 2], body[n + 3]]);
        if crc32c(&body[..n]) != crc {
            return Err(WireError::PayloadChecksum { seq: self.seq });
        }
        Ok(&body[..n])
    }
}

/// A whole frame found in a buffer: header, checked payload, bytes it takes.
pub type SplitFrame<'a> = (FrameHeader, &'a [u8], usize);

/// The first whole frame at the start of `buf`, if it holds one: its header,
/// its checked payload, and the bytes it takes. `Ok(None)` means "read more".
pub fn split_frame(buf: &[u8], frame_bytes_max: u32) -> Result<Option<SplitFrame<'_>>, WireError> {
    let Some(h) = buf.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let hdr = FrameHeader::parse(h, frame_bytes_max)?;
    let total = HEADER_BYTES + hdr.body_bytes();
    if buf.len() < total {
        return Ok(None);
    }
    let payload = hdr.verify(&buf[HEADER_BYTES..total])?;
    Ok(Some((hdr, payload, total)))
}

/// Reads one whole frame from a blocking reader; the payload is `body[..hdr.len]`.
pub fn read_frame<R: std::io::Read>(
    r: &mut R,
    frame_bytes_max: u32,
    body: &mut Vec<u8>,
) -> Result<FrameHeader, ReadFrameError> {
    let mut h = [0u8; HEADER_BYTES];
    r.read_exact(&mut h)?;
    let hdr = FrameHeader::parse(&h, frame_bytes_max)?;
    body.resize(hdr.body_bytes(), 0);
    r.read_exact(body)?;
    hdr.verify(body)?;
    Ok(hdr)
}

/// A frame could not be read: the stream failed or the frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The trailer for `payload`.
pub fn trailer(payload: &[u8]) -> [u8; TRAILER_BYTES] {
    crc32c(payload).to_be_bytes()
}

/// Encodes a whole frame (header, payload, trailer) into a new buffer.
/// Sets the seq in the header of an encoded frame (its header CRC anew).
/// A frame shorter than a header is left alone.
pub fn set_frame_seq(frame: &mut [u8], seq: u64) {
    if frame.len() < HEADER_BYTES {
        return;
    }
    frame[8..16].copy_from_slice(&seq.to_be_bytes());
    let crc = crc32c(&frame[..28]);
    frame[28..32].copy_from_slice(&crc.to_be_bytes());
}

pub fn encode_frame(kind: Kind, seq: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(HEADER_BYTES + payload.len() + TRAILER_BYTES);
    v.extend_from_slice(&FrameHeader::new(kind, seq, offset, len).encode());
    if !payload.is_empty() {
        v.extend_from_slice(payload);
        v.extend_from_slice(&trailer(payload));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_corruption() {
        let f = encode_frame(Kind::Write, 7, 4096, b"hello");
        let h: [u8; HEADER_BYTES] = f[..HEADER_BYTES].try_into().unwrap();
        let hdr = FrameHeader::parse(&h, 1 << 20).unwrap();
        assert_eq!(
            (hdr.kind, hdr.seq, hdr.offset, hdr.len),
            (Kind::Write, 7, 4096, 5)
        );
        assert_eq!(hdr.verify(&f[HEADER_BYTES..]).unwrap(), b"hello");
        let mut bad = f.clone();
        bad[HEADER_BYTES + 1] ^= 0x20;
        assert_eq!(
            hdr.verify(&bad[HEADER_BYTES..]),
            Err(WireError::PayloadChecksum { seq: 7 })
        );
        assert!(matches!(
            FrameHeader::parse(&h, 4),
            Err(WireError::TooLong { len: 5, max: 4 })
        ));
        let mut h2 = h;
        h2[17] ^= 1;
        assert_eq!(
            FrameHeader::parse(&h2, 1 << 20),
            Err(WireError::HeaderChecksum)
        );
    }

    #[test]
    fn vm_stream_kind_round_trips() {
        let f = encode_frame(Kind::VmStream, 0, 0, b"{}");
        let h: [u8; HEADER_BYTES] = f[..HEADER_BYTES].try_into().unwrap();
        assert_eq!(f[5], 18);
        assert_eq!(
            FrameHeader::parse(&h, 1 << 20).unwrap().kind,
            Kind::VmStream
        );
    }

    #[test]
    fn split_frame_waits_for_whole_frames() {
        let mut buf = encode_frame(Kind::Write, 1, 0, b"abc");
        buf.extend_from_slice(&encode_frame(Kind::Flush, 2, 0, b""));
        let first_len = HEADER_BYTES + 3 + TRAILER_BYTES;
        assert_eq!(split_frame(&buf[..first_len - 1], 1 << 20), Ok(None));
        let (h, payload, used) = split_frame(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!((h.seq, payload, used), (1, &b"abc"[..], first_len));
        let (h, _, used) = split_frame(&buf[first_len..], 1 << 20).unwrap().unwrap();
        assert_eq!((h.kind, used), (Kind::Flush, HEADER_BYTES));
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_caught(payload in proptest::collection::vec(any::<u8>(), 1..64), bit in 0usize..(8 * 100)) {
            let f = encode_frame(Kind::Copy, 1, 0, &payload);
            let bit = bit % (f.len() * 8);
            let mut g = f.clone();
            g[bit / 8] ^= 1 << (bit % 8);
            let h: [u8; HEADER_BYTES] = g[..HEADER_BYTES].try_into().unwrap();
            let ok = FrameHeader::parse(&h, 1 << 20).and_then(|hdr| hdr.verify(&g[HEADER_BYTES..]).map(|_| ()));
            prop_assert!(ok.is_err());
        }

        #[test]
        fn parse_never_panics(b in proptest::array::uniform32(any::<u8>()), max: u32) {
            let _ = FrameHeader::parse(&b, max);
        }
    }
}
