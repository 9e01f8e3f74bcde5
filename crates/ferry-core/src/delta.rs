//! Deltas of a changed file against the copy a peer already holds (the
//! rsync algorithm, in-place variant).
//!
//! The holder of the old copy sends one [`BlockSum`] per full block: a weak
//! rolling checksum and a strong hash. The holder of the new content slides a
//! window over it; where the window's weak sum and strong hash match an old
//! block, that block is reused, otherwise bytes go as literal data.
//!
//! The result is applied **in place** (the file keeps its inode, hard links
//! and extended attributes), front to back. So a block is only reused from an
//! old offset at or after the offset it lands at: everything a later piece
//! reads lies at or after where it writes, which nothing written before it
//! has touched. Blocks found at their own offset cost nothing; moved blocks
//! become [`Piece::Copy`]; the rest is [`Piece::Data`].
//!
//! Sans-IO: the new content comes through [`std::io::Read`], the strong hash
//! is passed in (the caller uses BLAKE3), the pieces go to a callback.

use std::collections::HashMap;

/// Bytes of the strong hash kept per block.
pub const STRONG_BYTES: usize = 16;

/// One full block of the old copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSum {
    pub weak: u32,
    pub strong: [u8; STRONG_BYTES],
}

/// What the new file is made of, in destination order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes `from..from+len` of the old copy go to `to..to+len` (`from > to`:
    /// in-place safe; identical offsets are not emitted).
    Copy { from: u64, to: u64, len: u64 },
    /// Literal bytes at `to`.
    Data { to: u64, data: Vec<u8> },
}

/// Block size for a file of `size` bytes: about its square root, rounded to
/// KiB, between 2 KiB and 128 KiB (rsync's rule of thumb: sums stay small,
/// blocks stay fine-grained).
pub fn block_size_for(size: u64) -> u32 {
    let root = (size as f64).sqrt() as u64;
    let rounded = root.div_ceil(1024) * 1024;
    rounded.clamp(2048, 128 * 1024) as u32
}

const MOD: u32 = 1 << 16;

/// rsync's weak checksum: `a` = sum of bytes, `b` = sum of the running `a`s,
/// each modulo 2^16; rolls in O(1).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rolling {
    a: u32,
    b: u32,
    len: u32,
}

impl Rolling {
    pub fn new(data: &[u8]) -> Rolling {
        let mut a = 0u32;
        let mut b = 0u32;
        for &x in data {
            a = (a + u32::from(x)) % MOD;
            b = (b + a) % MOD;
        }
        Rolling {
            a,
            b,
            len: data.len() as u32,
        }
    }

    pub fn value(&self) -> u32 {
        (self.b << 16) | self.a
    }

    /// Slides the window one byte: `out` leaves at the front, `inn` enters at the back.
    pub fn roll(&mut self, out: u8, inn: u8) {
        let out = u32::from(out);
        self.a = (self.a + MOD - out + u32::from(inn)) % MOD;
        // b lost `len` copies of `out` and gained the new a.
        let lost = (self.len.wrapping_mul(out)) % MOD;
        self.b = (self.b + MOD - lost + self.a) % MOD;
    }
}

/// The sums of `old`'s full blocks (a trailing partial block is not reused).
pub fn sums(
    old: &[u8],
    block: usize,
    strong: impl Fn(&[u8]) -> [u8; STRONG_BYTES],
) -> Vec<BlockSum> {
    old.chunks_exact(block.max(1))
        .map(|c| BlockSum {
            weak: Rolling::new(c).value(),
            strong: strong(c),
        })
        .collect()
}

/// Counters of one diff.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Size of the new content.
    pub size: u64,
    /// Bytes sent as literal data.
    pub literal_bytes: u64,
    /// Bytes reused at their own offset (nothing sent).
    pub kept_bytes: u64,
    /// Bytes reused from another offset.
    pub moved_bytes: u64,
}

/// Why a diff stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiffError<E> {
    #[error("reading the new content: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Emit(E),
}

/// Compares `new` with the old copy described by `sums` (blocks of `block`
/// bytes) and calls `emit` with the pieces, in destination order. Literal
/// runs are cut at `literal_max` bytes. The caller truncates to
/// `DiffStats::size` afterwards.
pub fn diff<R: std::io::Read, E>(
    sums: &[BlockSum],
    block: usize,
    mut new: R,
    strong: impl Fn(&[u8]) -> [u8; STRONG_BYTES],
    literal_max: usize,
    mut emit: impl FnMut(Piece) -> Result<(), E>,
) -> Result<DiffStats, DiffError<E>> {
    let block = block.max(1);
    let literal_max = literal_max.max(1);
    // weak -> old block indices; a 64 Ki-bit filter answers most misses first.
    let mut by_weak: HashMap<u32, Vec<u32>> = HashMap::with_capacity(sums.len());
    let mut filter = vec![0u64; 1024];
    let tag = |w: u32| ((w ^ (w >> 16)) & 0xffff) as usize;
    for (i, s) in sums.iter().enumerate() {
        by_weak.entry(s.weak).or_default().push(i as u32);
        let t = tag(s.weak);
        filter[t / 64] |= 1 << (t % 64);
    }
    let mut st = DiffStats::default();
    if sums.is_empty() {
        // Nothing to reuse: all literal.
        let mut chunk = vec![0u8; literal_max.min(1 << 20)];
        loop {
            let n = match new.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            emit(Piece::Data {
                to: st.size,
                data: chunk[..n].to_vec(),
            })
            .map_err(DiffError::Emit)?;
            st.size += n as u64;
            st.literal_bytes += n as u64;
        }
        return Ok(st);
    }
    // buf[0] is at file offset `base`; the window starts at `w`; literal data
    // not yet emitted starts at `lit`.
    let mut buf: Vec<u8> = Vec::with_capacity(4 * block + literal_max);
    let mut base = 0u64;
    let mut w = 0usize;
    let mut lit = 0usize;
    let mut eof = false;
    let mut roll: Option<Rolling> = None;
    // A pending copy, merged with the next when contiguous.
    let mut copy: Option<(u64, u64, u64)> = None;

    let flush_copy = |copy: &mut Option<(u64, u64, u64)>,
                      emit: &mut dyn FnMut(Piece) -> Result<(), E>|
     -> Result<(), DiffError<E>> {
        if let Some((from, to, len)) = copy.take() {
            emit(Piece::Copy { from, to, len }).map_err(DiffError::Emit)?;
        }
        Ok(())
    };

    loop {
        // Keep at least one window (and some literal room) in the buffer.
        if !eof && buf.len() - w < block + 1 {
            // Drop what is emitted and behind the window.
            let keep = lit.min(w);
            if keep > 0 {
                buf.drain(..keep);
                base += keep as u64;
                w -= keep;
                lit -= keep;
            }
            let want = (4 * block).max(64 * 1024);
            let start = buf.len();
            buf.resize(start + want, 0);
            let mut got = 0;
            while got < want {
                match new.read(&mut buf[start + got..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            buf.truncate(start + got);
            continue;
        }
        if buf.len() - w < block {
            // The end: no full window left; the rest is literal.
            w = buf.len();
            break;
        }
        let r = match roll {
            Some(r) => r,
            None => Rolling::new(&buf[w..w + block]),
        };
        let dest = base + w as u64;
        let weak = r.value();
        let mut found: Option<u64> = None;
        let t = tag(weak);
        if filter[t / 64] & (1 << (t % 64)) != 0 {
            if let Some(cands) = by_weak.get(&weak) {
                let h = strong(&buf[w..w + block]);
                // Prefer the block at its own offset, then the nearest one after.
                let mut best: Option<u64> = None;
                for &c in cands {
                    let from = u64::from(c) * block as u64;
                    if from < dest || sums[c as usize].strong != h {
                        continue;
                    }
                    if best.is_none_or(|b| from < b) {
                        best = Some(from);
                    }
                }
                found = best;
            }
        }
        match found {
            Some(from) => {
                if lit < w {
                    flush_copy(&mut copy, &mut emit)?;
                    emit_literal(&buf, base, &mut lit, w, usize::MAX, &mut st, &mut emit)?;
                }
                let len = block as u64;
                if from == dest {
                    flush_copy(&mut copy, &mut emit)?;
                    st.kept_bytes += len;
                } else {
                    st.moved_bytes += len;
                    copy = match copy {
                        Some((f, t, l)) if f + l == from && t + l == dest => Some((f, t, l + len)),
                        other => {
                            let mut c = other;
                            flush_copy(&mut c, &mut emit)?;
                            Some((from, dest, len))
                        }
                    };
                }
                w += block;
                lit = w;
                roll = None;
            }
            None => {
                if w + block < buf.len() {
                    let mut r = r;
                    r.roll(buf[w], buf[w + block]);
                    roll = Some(r);
                } else {
                    roll = None;
                }
                w += 1;
                if w - lit >= literal_max {
                    flush_copy(&mut copy, &mut emit)?;
                    emit_literal(&buf, base, &mut lit, w, literal_max, &mut st, &mut emit)?;
                }
            }
        }
    }
    flush_copy(&mut copy, &mut emit)?;
    if lit < w {
        emit_literal(&buf, base, &mut lit, w, literal_max, &mut st, &mut emit)?;
    }
    st.size = base + buf.len() as u64;
    Ok(st)
}

fn emit_literal<E>(
    buf: &[u8],
    base: u64,
    lit: &mut usize,
    end: usize,
    max: usize,
    st: &mut DiffStats,
    emit: &mut dyn FnMut(Piece) -> Result<(), E>,
) -> Result<(), DiffError<E>> {
    while *lit < end {
        let n = (end - *lit).min(max);
        st.literal_bytes += n as u64;
        emit(Piece::Data {
            to: base + *lit as u64,
            data: buf[*lit..*lit + n].to_vec(),
        })
        .map_err(DiffError::Emit)?;
        *lit += n;
    }
    Ok(())
}

/// Applies `pieces` in order to `old` in place, then sets the size (what a
/// replica does with the file; here on memory, for tests and simulation).
pub fn apply_in_place(old: &mut Vec<u8>, pieces: &[Piece], size: u64) {
    for p in pieces {
        match p {
            Piece::Copy { from, to, len } => {
                let (from, to, len) = (*from as usize, *to as usize, *len as usize);
                if old.len() < to + len {
                    old.resize(to + len, 0);
                }
                old.copy_within(from..from + len, to);
            }
            Piece::Data { to, data } => {
                let to = *to as usize;
                if old.len() < to + data.len() {
                    old.resize(to + data.len(), 0);
                }
                old[to..to + data.len()].copy_from_slice(data);
            }
        }
    }
    old.resize(size as usize, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A test-only strong hash (FNV-1a, widened): the real one is BLAKE3.
    fn strong(d: &[u8]) -> [u8; STRONG_BYTES] {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut g: u64 = 0x8422_2325_cbf2_9ce4;
        for &x in d {
            h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
            g = (g ^ u64::from(x))
                .wrapping_mul(0x100_0000_01b3)
                .rotate_left(5);
        }
        let mut o = [0u8; STRONG_BYTES];
        o[..8].copy_from_slice(&h.to_le_bytes());
        o[8..].copy_from_slice(&g.to_le_bytes());
        o
    }

    fn run(old: &[u8], new: &[u8], block: usize, lit: usize) -> (Vec<Piece>, DiffStats) {
        let s = sums(old, block, strong);
        let mut pieces = Vec::new();
        let st = diff::<_, ()>(&s, block, new, strong, lit, |p| {
            pieces.push(p);
            Ok(())
        })
        .unwrap();
        (pieces, st)
    }

    fn check(old: &[u8], new: &[u8], block: usize, lit: usize) -> DiffStats {
        let (pieces, st) = run(old, new, block, lit);
        let mut got = old.to_vec();
        apply_in_place(&mut got, &pieces, st.size);
        assert_eq!(got, new, "pieces {pieces:?}");
        for p in &pieces {
            if let Piece::Copy { from, to, .. } = p {
                assert!(from > to, "copies only move data backwards");
            }
        }
        st
    }

    #[test]
    fn rolling_matches_fresh_sums() {
        let d: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut r = Rolling::new(&d[0..700]);
        for i in 1..4000 {
            r.roll(d[i - 1], d[i + 699]);
            assert_eq!(r.value(), Rolling::new(&d[i..i + 700]).value(), "at {i}");
        }
    }

    #[test]
    fn unchanged_file_sends_nothing() {
        let d: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let st = check(&d, &d, 2048, 1 << 20);
        assert_eq!(st.literal_bytes, (100_000 % 2048) as u64);
        assert_eq!(st.moved_bytes, 0);
    }

    #[test]
    fn one_changed_block_sends_about_one_block() {
        let old: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut new = old.clone();
        new[500_000] ^= 0xff;
        let st = check(&old, &new, 4096, 1 << 20);
        assert!(st.literal_bytes <= 2 * 4096 + 1_000_000 % 4096, "{st:?}");
    }

    #[test]
    fn a_deleted_prefix_moves_blocks_back() {
        let old: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let new = old[1000..].to_vec();
        let st = check(&old, &new, 2048, 1 << 20);
        assert!(st.moved_bytes >= 190_000, "{st:?}");
        assert!(st.literal_bytes < 6000, "{st:?}");
    }

    #[test]
    fn appends_keep_the_old_part() {
        let old: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(40503) >> 3) as u8)
            .collect();
        let mut new = old.clone();
        new.extend((0..50_000u32).map(|i| i as u8));
        let st = check(&old, &new, 4096, 1 << 20);
        assert!(st.kept_bytes >= 290_000, "{st:?}");
    }

    proptest! {
        #[test]
        fn applying_the_pieces_gives_the_new_content(
            old in proptest::collection::vec(any::<u8>(), 0..20_000),
            edits in proptest::collection::vec((0usize..20_000, 0usize..600, any::<u8>(), 0u8..3), 0..6),
            block in 1usize..700,
            lit in 1usize..5000,
        ) {
            let mut new = old.clone();
            for (at, len, b, kind) in edits {
                let at = at.min(new.len());
                match kind {
                    0 => { let end = (at + len).min(new.len()); new.drain(at..end); }
                    1 => { new.splice(at..at, std::iter::repeat_n(b, len)); }
                    _ => { let end = (at + len).min(new.len()); for x in &mut new[at..end] { *x ^= b | 1; } }
                }
            }
            check(&old, &new, block, lit);
        }

        #[test]
        fn repetitive_content_applies_too(
            unit in proptest::collection::vec(0u8..3, 1..8),
            n_old in 0usize..3000, n_new in 0usize..3000, block in 1usize..64,
        ) {
            let old: Vec<u8> = unit.iter().cycle().take(n_old).copied().collect();
            let new: Vec<u8> = unit.iter().cycle().skip(1).take(n_new).copied().collect();
            check(&old, &new, block, 100);
        }
    }
}
