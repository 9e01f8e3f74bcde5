//! The Merkle tree every copy of a volume is compared by: BLAKE3 leaves of
//! `granularity` bytes (the dirty map's block; the last one may be short),
//! folded pairwise into a binary root (an odd node is carried up as is).
//!
//! Replication's verify and cutover compare two live copies by it, and an
//! archive's manifest records the root of what it holds, so a restored
//! volume is compared with its source without reading both.

/// The binary Merkle root over `leaves` (an odd node is carried up as is;
/// no leaves: the hash of nothing).
pub fn merkle_root(leaves: &[blake3::Hash]) -> blake3::Hash {
    if leaves.is_empty() {
        return blake3::hash(b"");
    }
    let mut level: Vec<blake3::Hash> = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|c| match c {
                [a, b] => {
                    let mut h = blake3::Hasher::new();
                    h.update(a.as_bytes());
                    h.update(b.as_bytes());
                    h.finalize()
                }
                [a] => *a,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    level[0]
}

/// The leaves of `data` (which starts on a leaf boundary), `granularity`
/// bytes each, appended to `out`.
pub fn leaves_of(data: &[u8], granularity: usize, out: &mut Vec<blake3::Hash>) {
    for piece in data.chunks(granularity.max(1)) {
        out.push(blake3::hash(piece));
    }
}

/// The leaf of `len` zero bytes (what a hole hashes to).
pub fn zero_leaf(len: usize) -> blake3::Hash {
    // Hashed in pieces: no buffer of `len` bytes.
    const Z: [u8; 4096] = [0; 4096];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(Z.len());
        h.update(&Z[..n]);
        left -= n;
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_of_one_leaf_is_the_leaf_and_odd_nodes_carry_up() {
        let a = blake3::hash(b"a");
        let b = blake3::hash(b"b");
        let c = blake3::hash(b"c");
        assert_eq!(merkle_root(&[a]), a);
        let mut h = blake3::Hasher::new();
        h.update(a.as_bytes());
        h.update(b.as_bytes());
        let ab = h.finalize();
        assert_eq!(merkle_root(&[a, b]), ab);
        let mut h = blake3::Hasher::new();
        h.update(ab.as_bytes());
        h.update(c.as_bytes());
        assert_eq!(merkle_root(&[a, b, c]), h.finalize());
        assert_eq!(merkle_root(&[]), blake3::hash(b""));
    }

    #[test]
    fn zero_leaf_is_the_hash_of_zeroes() {
        for n in [0, 1, 4095, 4096, 65536, 70000] {
            assert_eq!(zero_leaf(n), blake3::hash(&vec![0u8; n]), "{n}");
        }
        let mut v = Vec::new();
        leaves_of(&[1u8; 10], 4, &mut v);
        assert_eq!(
            v,
            vec![
                blake3::hash(&[1; 4]),
                blake3::hash(&[1; 4]),
                blake3::hash(&[1; 2])
            ]
        );
    }
}
