//! The dirty map: one bit per block of a replica, set while the block is not
//! known to be equal on the peer.
//!
//! A block is `granularity_bytes` long (a power of two, default 64 KiB); the last
//! block may be short. Marking a byte range marks every block it touches.
//! The map is the unit of resync: after a link outage or a restart only dirty
//! blocks move (DESIGN invariant 4), so it is persisted — [`DirtyMap::encode`]
//! and [`DirtyMap::decode`] give its on-disk form (magic, version, geometry,
//! bits, CRC-32C), refusing anything torn, foreign or of another geometry.

use crate::extent::Extent;

/// Default block size of a dirty map.
pub const DEFAULT_GRANULARITY_BYTES: u64 = 64 * 1024;
/// Smallest block size accepted.
pub const MIN_GRANULARITY_BYTES: u64 = 4096;
/// Largest block size accepted.
pub const MAX_GRANULARITY_BYTES: u64 = 64 * 1024 * 1024;

const MAGIC: [u8; 8] = *b"FERRYDM1";
const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 8;

/// Why a dirty map could not be made or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyMapError {
    #[error("granularity {0} B must be a power of two between 4 KiB and 64 MiB")]
    BadGranularity(u64),
    #[error("dirty map too short ({0} bytes)")]
    Truncated(usize),
    #[error("not a ferry dirty map (bad magic)")]
    BadMagic,
    #[error(
        "dirty map format version {0} is not supported (this ferry reads version {FORMAT_VERSION})"
    )]
    BadVersion(u32),
    #[error("dirty map checksum mismatch: the file is damaged")]
    BadChecksum,
    #[error("dirty map is for {found_size} B at {found_granularity} B blocks, the volume is {size} B at {granularity} B")]
    GeometryMismatch {
        found_size: u64,
        found_granularity: u64,
        size: u64,
        granularity: u64,
    },
}

/// A bitmap of blocks not known equal on the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    size_bytes: u64,
    granularity_bytes: u64,
    shift: u32,
    blocks: u64,
    words: Vec<u64>,
    dirty: u64,
}

impl DirtyMap {
    /// An all-clean map for a device of `size_bytes`.
    pub fn new(size_bytes: u64, granularity_bytes: u64) -> Result<DirtyMap, DirtyMapError> {
        if !granularity_bytes.is_power_of_two()
            || !(MIN_GRANULARITY_BYTES..=MAX_GRANULARITY_BYTES).contains(&granularity_bytes)
        {
            return Err(DirtyMapError::BadGranularity(granularity_bytes));
        }
        let blocks = size_bytes.div_ceil(granularity_bytes);
        Ok(DirtyMap {
            size_bytes,
            granularity_bytes,
            shift: granularity_bytes.trailing_zeros(),
            blocks,
            words: vec![0; blocks.div_ceil(64) as usize],
            dirty: 0,
        })
    }

    /// An all-dirty map: a replica that must be fully synced.
    pub fn all_dirty(size_bytes: u64, granularity_bytes: u64) -> Result<DirtyMap, DirtyMapError> {
        let mut m = DirtyMap::new(size_bytes, granularity_bytes)?;
        m.mark(0, size_bytes);
        Ok(m)
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// Number of dirty blocks.
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty
    }
    pub fn is_clean(&self) -> bool {
        self.dirty == 0
    }

    /// Bytes covered by dirty blocks (the short last block counted by its real length).
    pub fn dirty_bytes(&self) -> u64 {
        if self.dirty == 0 {
            return 0;
        }
        let mut bytes = self.dirty * self.granularity_bytes;
        let last = self.blocks - 1;
        if self.is_dirty(last) {
            bytes -= self.granularity_bytes - self.block_extent(last).length;
        }
        bytes
    }

    /// The byte range of block `idx` (clipped to the device).
    pub fn block_extent(&self, idx: u64) -> Extent {
        let offset = idx << self.shift;
        let end = (offset + self.granularity_bytes).min(self.size_bytes);
        Extent {
            offset,
            length: end.saturating_sub(offset),
        }
    }

    /// The blocks `[first, last]` touched by a byte range; `None` when empty or outside.
    pub fn blocks_of(&self, offset: u64, length: u64) -> Option<(u64, u64)> {
        if length == 0 || offset >= self.size_bytes {
            return None;
        }
        let end = offset.saturating_add(length).min(self.size_bytes);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    pub fn is_dirty(&self, idx: u64) -> bool {
        idx < self.blocks && self.words[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }

    /// Marks one block; returns whether it was clean before.
    pub fn mark_block(&mut self, idx: u64) -> bool {
        if idx >= self.blocks {
            return false;
        }
        let (w, bit) = ((idx / 64) as usize, 1u64 << (idx % 64));
        let was_clean = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.dirty += u64::from(was_clean);
        was_clean
    }

    /// Clears one block; returns whether it was dirty before.
    pub fn clear_block(&mut self, idx: u64) -> bool {
        if idx >= self.blocks {
            return false;
        }
        let (w, bit) = ((idx / 64) as usize, 1u64 << (idx % 64));
        let was_dirty = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        self.dirty -= u64::from(was_dirty);
        was_dirty
    }

    /// Marks every block touched by `[offset, offset + length)`.
    pub fn mark(&mut self, offset: u64, length: u64) {
        if let Some((first, last)) = self.blocks_of(offset, length) {
            for idx in first..=last {
                self.mark_block(idx);
            }
        }
    }

    /// Marks every block dirty in `other` (same geometry) here too.
    pub fn merge(&mut self, other: &DirtyMap) {
        debug_assert_eq!(
            (self.size_bytes, self.granularity_bytes),
            (other.size_bytes, other.granularity_bytes)
        );
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.dirty = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.dirty = 0;
    }

    /// The first dirty block at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let idx = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (idx < self.blocks).then_some(idx);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// Iterates the dirty blocks in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.next_dirty(0);
        std::iter::from_fn(move || {
            let cur = next?;
            next = self.next_dirty(cur + 1);
            Some(cur)
        })
    }

    /// The on-disk form: header, bits (little-endian words), CRC-32C of all before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES + self.words.len() * 8 + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&self.size_bytes.to_le_bytes());
        b.extend_from_slice(&self.granularity_bytes.to_le_bytes());
        b.extend_from_slice(&self.dirty.to_le_bytes());
        for w in &self.words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crate::crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Loads an encoded map, requiring the expected geometry.
    pub fn decode(
        bytes: &[u8],
        size_bytes: u64,
        granularity_bytes: u64,
    ) -> Result<DirtyMap, DirtyMapError> {
        if bytes.len() < HEADER_BYTES + 4 {
            return Err(DirtyMapError::Truncated(bytes.len()));
        }
        if bytes[..8] != MAGIC {
            return Err(DirtyMapError::BadMagic);
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != FORMAT_VERSION {
            return Err(DirtyMapError::BadVersion(version));
        }
        let (found_size, found_granularity) = (u64_at(12), u64_at(20));
        if (found_size, found_granularity) != (size_bytes, granularity_bytes) {
            return Err(DirtyMapError::GeometryMismatch {
                found_size,
                found_granularity,
                size: size_bytes,
                granularity: granularity_bytes,
            });
        }
        let mut map = DirtyMap::new(size_bytes, granularity_bytes)?;
        let expected = HEADER_BYTES + map.words.len() * 8 + 4;
        if bytes.len() != expected {
            return Err(DirtyMapError::Truncated(bytes.len()));
        }
        let body = &bytes[..expected - 4];
        let crc = u32::from_le_bytes([
            bytes[expected - 4],
            bytes[expected - 3],
            bytes[expected - 2],
            bytes[expected - 1],
        ]);
        if crate::crc32c::crc32c(body) != crc {
            return Err(DirtyMapError::BadChecksum);
        }
        for (i, w) in map.words.iter_mut().enumerate() {
            *w = u64_at(HEADER_BYTES + i * 8);
        }
        // Bits past the last block are never set by this code; drop any that are.
        let tail = map.blocks % 64;
        if tail != 0 {
            if let Some(last) = map.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        map.dirty = map.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn geometry() {
        let m = DirtyMap::new(1_000_000, 65536).unwrap();
        assert_eq!(m.blocks(), 16);
        assert_eq!(
            m.block_extent(15),
            Extent {
                offset: 983040,
                length: 16960
            }
        );
        assert!(DirtyMap::new(1 << 20, 5000).is_err());
        assert!(DirtyMap::new(1 << 20, 2048).is_err());
        let all = DirtyMap::all_dirty(1_000_000, 65536).unwrap();
        assert_eq!(all.dirty_bytes(), 1_000_000);
        assert_eq!(all.iter().count(), 16);
    }

    #[test]
    fn mark_touches_every_block_of_a_range() {
        let mut m = DirtyMap::new(1 << 20, 65536).unwrap();
        m.mark(65535, 2);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 1]);
        m.mark(1 << 20, 4096); // outside: ignored
        m.mark(0, 0);
        assert_eq!(m.dirty_blocks(), 2);
    }

    #[test]
    fn encoding_refuses_damage() {
        let mut m = DirtyMap::new(10 << 20, 65536).unwrap();
        m.mark(3 << 20, 100);
        let mut b = m.encode();
        assert_eq!(DirtyMap::decode(&b, 10 << 20, 65536).unwrap(), m);
        assert!(matches!(
            DirtyMap::decode(&b, 20 << 20, 65536),
            Err(DirtyMapError::GeometryMismatch { .. })
        ));
        assert!(matches!(
            DirtyMap::decode(&b[..b.len() - 1], 10 << 20, 65536),
            Err(DirtyMapError::Truncated(_))
        ));
        let n = b.len();
        b[n - 10] ^= 1;
        assert_eq!(
            DirtyMap::decode(&b, 10 << 20, 65536),
            Err(DirtyMapError::BadChecksum)
        );
        b[0] = b'X';
        assert_eq!(
            DirtyMap::decode(&b, 10 << 20, 65536),
            Err(DirtyMapError::BadMagic)
        );
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0u64..200), 0..300)) {
            let mut m = DirtyMap::new(200 * 4096 - 100, 4096).unwrap();
            let mut model = std::collections::BTreeSet::new();
            for (set, idx) in ops {
                if idx >= m.blocks() { continue; }
                if set {
                    prop_assert_eq!(m.mark_block(idx), model.insert(idx));
                } else {
                    prop_assert_eq!(m.clear_block(idx), model.remove(&idx));
                }
            }
            prop_assert_eq!(m.dirty_blocks(), model.len() as u64);
            prop_assert_eq!(m.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            let back = DirtyMap::decode(&m.encode(), m.size_bytes(), 4096).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DirtyMap::decode(&bytes, 4096 * 10, 4096);
        }
    }
}
