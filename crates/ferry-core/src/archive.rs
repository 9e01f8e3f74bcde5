//! The image archive's pure parts: how a chunk is named, how it is framed
//! on disk, and which chunks a prune may delete.
//!
//! A chunk is `chunk_bytes` of a disk (the last one may be short), cut on
//! the same leaf boundaries replication hashes ([`crate::merkle`]). Its id is
//! BLAKE3 (derive-key mode, its own context) over its length and its
//! leaves' hashes, so hashing a chunk once gives both its name in the store
//! and the leaves of the disk's Merkle root. Chunks are content-addressed:
//! the same bytes anywhere in any archive of a store are stored once.
//!
//! On disk a chunk file is a 24-byte header then the stored bytes:
//!
//! ```text
//! "FRYCHNK1" | codec u8 | 0 0 0 | raw_len u32 LE | stored_len u32 LE | 0 u32
//! ```
//!
//! A file whose length is not `24 + stored_len`, or whose header is not
//! this, is torn (an interrupted write): it is never used, and a create
//! writes it again.

use std::collections::BTreeSet;
use std::fmt;

/// Chunk file magic.
pub const CHUNK_MAGIC: &[u8; 8] = b"FRYCHNK1";
/// Header bytes before a chunk's stored bytes.
pub const CHUNK_HEADER_BYTES: usize = 24;
/// Largest chunk (its length must fit the header's u32, with room).
pub const CHUNK_BYTES_MAX: u64 = 64 << 20;
/// The BLAKE3 derive-key context of chunk ids.
const CHUNK_ID_CONTEXT: &str = "ferry archive chunk v1";

/// How a chunk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// As they are (compression did not make them smaller).
    Raw,
    /// One zstd frame.
    Zstd,
}

/// A chunk file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub codec: Codec,
    pub raw_len: u32,
    pub stored_len: u32,
}

/// Why a chunk file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("not a chunk file (bad magic): torn or overwritten")]
    Magic,
    #[error("unknown codec {0}")]
    Codec(u8),
    #[error("{have} bytes, the header says {want}: truncated or torn")]
    Length { have: u64, want: u64 },
    #[error("{0} bytes: shorter than a chunk header")]
    Short(u64),
    #[error("it decodes to {have} bytes, the header says {want}")]
    RawLength { have: u64, want: u64 },
    #[error("its content hashes to {have}, not to its name")]
    Id { have: String },
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_BYTES] {
        let mut b = [0u8; CHUNK_HEADER_BYTES];
        b[..8].copy_from_slice(CHUNK_MAGIC);
        b[8] = match self.codec {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        };
        b[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.stored_len.to_le_bytes());
        b
    }

    /// The header of a chunk file of `file_len` bytes whose first bytes are
    /// `head`; checks the length against it.
    pub fn decode(head: &[u8], file_len: u64) -> Result<ChunkHeader, ChunkError> {
        if head.len() < CHUNK_HEADER_BYTES || file_len < CHUNK_HEADER_BYTES as u64 {
            return Err(ChunkError::Short(file_len.min(head.len() as u64)));
        }
        if &head[..8] != CHUNK_MAGIC {
            return Err(ChunkError::Magic);
        }
        let codec = match head[8] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            c => return Err(ChunkError::Codec(c)),
        };
        let word =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let h = ChunkHeader {
            codec,
            raw_len: word(12),
            stored_len: word(16),
        };
        let want = CHUNK_HEADER_BYTES as u64 + h.stored_len as u64;
        if file_len != want {
            return Err(ChunkError::Length {
                have: file_len,
                want,
            });
        }
        if h.codec == Codec::Raw && h.stored_len != h.raw_len {
            return Err(ChunkError::RawLength {
                have: h.stored_len as u64,
                want: h.raw_len as u64,
            });
        }
        Ok(h)
    }
}

/// A chunk's id: 32 bytes, written as 64 lowercase hex digits. Parsing is
/// the only way to make one from text, so a chunk path built from it can
/// hold nothing but hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId([u8; 32]);

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why text is not a chunk id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a chunk id (64 lowercase hex digits)")]
pub struct ChunkIdError(pub String);

impl std::str::FromStr for ChunkId {
    type Err = ChunkIdError;
    fn from_str(s: &str) -> Result<ChunkId, ChunkIdError> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(ChunkIdError(s.chars().take(80).collect()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            let d = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (d(pair[0]), d(pair[1])) {
                (Some(h), Some(l)) => out[i] = h << 4 | l,
                _ => return Err(ChunkIdError(s.chars().take(80).collect())),
            }
        }
        Ok(ChunkId(out))
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl ChunkId {
    /// The id of a chunk of `raw_len` bytes whose leaves are `leaves`.
    pub fn of_leaves(raw_len: u64, leaves: &[blake3::Hash]) -> ChunkId {
        let mut h = blake3::Hasher::new_derive_key(CHUNK_ID_CONTEXT);
        h.update(&raw_len.to_le_bytes());
        for l in leaves {
            h.update(l.as_bytes());
        }
        ChunkId(*h.finalize().as_bytes())
    }

    /// The id of `data` cut into `leaf_bytes` leaves.
    pub fn of_data(data: &[u8], leaf_bytes: usize) -> ChunkId {
        let mut leaves = Vec::new();
        crate::merkle::leaves_of(data, leaf_bytes, &mut leaves);
        ChunkId::of_leaves(data.len() as u64, &leaves)
    }

    /// The fan-out directory (its first two hex digits) and the file name.
    pub fn path_parts(&self) -> (String, String) {
        let s = self.to_string();
        (s[..2].to_string(), s)
    }
}

/// The chunks a prune deletes: those present and named by no manifest and
/// by no interrupted create's progress record (a resumed create relies on
/// them).
pub fn prune_set(
    present: impl IntoIterator<Item = ChunkId>,
    referenced: &BTreeSet<ChunkId>,
) -> Vec<ChunkId> {
    present
        .into_iter()
        .filter(|c| !referenced.contains(c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_a_torn_file_is_named() {
        let h = ChunkHeader {
            codec: Codec::Zstd,
            raw_len: 1 << 20,
            stored_len: 1000,
        };
        let b = h.encode();
        assert_eq!(ChunkHeader::decode(&b, 1024), Ok(h));
        assert_eq!(
            ChunkHeader::decode(&b, 1000),
            Err(ChunkError::Length {
                have: 1000,
                want: 1024
            })
        );
        assert_eq!(
            ChunkHeader::decode(&[0u8; 24], 1024),
            Err(ChunkError::Magic)
        );
        assert_eq!(
            ChunkHeader::decode(&b[..10], 10),
            Err(ChunkError::Short(10))
        );
        let raw = ChunkHeader {
            codec: Codec::Raw,
            raw_len: 10,
            stored_len: 9,
        };
        assert!(ChunkHeader::decode(&raw.encode(), 33).is_err());
    }

    #[test]
    fn ids_parse_only_from_hex_and_depend_on_content_and_length() {
        let a = ChunkId::of_data(&[1u8; 100], 64);
        let b = ChunkId::of_data(&[1u8; 101], 64);
        assert_ne!(a, b);
        assert_eq!(a, a.to_string().parse().unwrap());
        for bad in [
            "",
            "../x",
            &"g".repeat(64),
            &"A".repeat(64),
            &format!("{}/", &a.to_string()[..63]),
        ] {
            assert!(bad.parse::<ChunkId>().is_err(), "{bad:?}");
        }
        let (dir, file) = a.path_parts();
        assert_eq!(dir.len(), 2);
        assert!(file.starts_with(&dir));
        // The leaves are replication's: the id of the data equals the id of
        // its leaves.
        let mut leaves = Vec::new();
        crate::merkle::leaves_of(&[7u8; 200], 64, &mut leaves);
        assert_eq!(
            ChunkId::of_data(&[7u8; 200], 64),
            ChunkId::of_leaves(200, &leaves)
        );
    }

    #[test]
    fn prune_keeps_what_anything_names() {
        let ids: Vec<ChunkId> = (0..4u8).map(|i| ChunkId::of_data(&[i; 8], 8)).collect();
        let referenced: BTreeSet<ChunkId> = [ids[1], ids[3]].into_iter().collect();
        assert_eq!(prune_set(ids.clone(), &referenced), vec![ids[0], ids[2]]);
    }
}
