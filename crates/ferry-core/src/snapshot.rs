//! Copy-before-write snapshots of a replica and writable overlays on top of
//! them: the block arithmetic, with no I/O.
//!
//! A **snapshot** freezes a replica's image at a flush barrier while
//! replication keeps writing into it: before the stream overwrites a block for
//! the first time, the block's old contents are saved aside
//! ([`CowMap::to_save`]); a snapshot read takes saved blocks from the side
//! store and every other block from the live image ([`CowMap::read_plan`]).
//!
//! An **overlay** makes a snapshot writable without touching it: writes land
//! in a side store, block by block; a block written only in part is first
//! filled from the snapshot ([`OverlayMap::partial_fill`]); reads take
//! overlay blocks from the overlay and the rest from the snapshot.

use crate::dirty::{DirtyMap, DirtyMapError};
use crate::extent::Extent;

/// Where a piece of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The side store: a snapshot's saved blocks, or an overlay's written ones.
    Side,
    /// What lies below: the live replica for a snapshot, the snapshot for an overlay.
    Below,
}

/// Splits `[offset, offset + length)` (clipped to the map) into maximal runs
/// of blocks that are all set (`Side`) or all unset (`Below`) in `map`.
fn runs(map: &DirtyMap, offset: u64, length: u64) -> Vec<(Extent, Source)> {
    let mut out: Vec<(Extent, Source)> = Vec::new();
    let Some((first, last)) = map.blocks_of(offset, length) else {
        return out;
    };
    let end = (offset + length).min(map.size_bytes());
    for idx in first..=last {
        let b = map.block_extent(idx);
        let from = b.offset.max(offset);
        let to = (b.offset + b.length).min(end);
        let src = if map.is_dirty(idx) {
            Source::Side
        } else {
            Source::Below
        };
        match out.last_mut() {
            Some((e, s)) if *s == src && e.offset + e.length == from => e.length = to - e.offset,
            _ => out.push((
                Extent {
                    offset: from,
                    length: to - from,
                },
                src,
            )),
        }
    }
    out
}

/// Which blocks of a replica a snapshot has saved aside.
#[derive(Debug, Clone)]
pub struct CowMap {
    saved: DirtyMap,
}

impl CowMap {
    /// A snapshot of a `size_bytes` image taken now: nothing saved yet.
    pub fn new(size_bytes: u64, granularity_bytes: u64) -> Result<CowMap, DirtyMapError> {
        Ok(CowMap {
            saved: DirtyMap::new(size_bytes, granularity_bytes)?,
        })
    }

    /// The first whole block a write of `[offset, offset + length)` to the
    /// live image would overwrite for the first time since the snapshot: save
    /// it (then [`CowMap::mark_saved`]) before the write, and ask again.
    pub fn next_unsaved(&self, offset: u64, length: u64) -> Option<Extent> {
        let (first, last) = self.saved.blocks_of(offset, length)?;
        (first..=last)
            .find(|&i| !self.saved.is_dirty(i))
            .map(|i| self.saved.block_extent(i))
    }

    /// Records that `block` (an extent [`CowMap::to_save`] returned) is saved.
    pub fn mark_saved(&mut self, block: Extent) {
        self.saved.mark(block.offset, block.length);
    }

    /// How to read `[offset, offset + length)` of the snapshot.
    pub fn read_plan(&self, offset: u64, length: u64) -> Vec<(Extent, Source)> {
        runs(&self.saved, offset, length)
    }

    /// Bytes saved aside so far.
    pub fn saved_bytes(&self) -> u64 {
        self.saved.dirty_bytes()
    }
}

/// Which blocks of an overlay were written.
#[derive(Debug, Clone)]
pub struct OverlayMap {
    written: DirtyMap,
}

impl OverlayMap {
    pub fn new(size_bytes: u64, block_bytes: u64) -> Result<OverlayMap, DirtyMapError> {
        Ok(OverlayMap {
            written: DirtyMap::new(size_bytes, block_bytes)?,
        })
    }

    /// The blocks a write of `[offset, offset + length)` covers only in part
    /// and that are not in the overlay yet: copy each from below into the
    /// overlay before the write, so the rest of the block keeps its contents.
    pub fn partial_fill(&self, offset: u64, length: u64) -> Vec<Extent> {
        let Some((first, last)) = self.written.blocks_of(offset, length) else {
            return Vec::new();
        };
        let end = offset + length;
        let mut out = Vec::new();
        for idx in [first, last] {
            let b = self.written.block_extent(idx);
            let whole = offset <= b.offset && b.offset + b.length <= end;
            if !whole && !self.written.is_dirty(idx) && out.last() != Some(&b) {
                out.push(b);
            }
        }
        out
    }

    /// Records a write (after [`OverlayMap::partial_fill`] was done).
    pub fn mark_written(&mut self, offset: u64, length: u64) {
        self.written.mark(offset, length);
    }

    /// How to read `[offset, offset + length)` of the overlay.
    pub fn read_plan(&self, offset: u64, length: u64) -> Vec<(Extent, Source)> {
        runs(&self.written, offset, length)
    }

    /// Bytes written to the overlay so far (whole blocks).
    pub fn written_bytes(&self) -> u64 {
        self.written.dirty_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: u64 = 4096;

    fn read(
        plan: &[(Extent, Source)],
        side: &[u8],
        below: &[u8],
        offset: u64,
        length: u64,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = offset;
        for (e, s) in plan {
            assert_eq!(e.offset, at, "plan pieces are contiguous");
            let r = e.offset as usize..(e.offset + e.length) as usize;
            out.extend_from_slice(match s {
                Source::Side => &side[r],
                Source::Below => &below[r],
            });
            at += e.length;
        }
        assert_eq!(at, offset + length, "the plan covers the whole read");
        out
    }

    #[test]
    fn runs_merge_neighbours_and_clip() {
        let mut m = OverlayMap::new(10 * G + 100, G).unwrap();
        m.mark_written(G, 2 * G);
        let plan = m.read_plan(100, 5 * G);
        assert_eq!(
            plan,
            vec![
                (
                    Extent {
                        offset: 100,
                        length: G - 100
                    },
                    Source::Below
                ),
                (
                    Extent {
                        offset: G,
                        length: 2 * G
                    },
                    Source::Side
                ),
                (
                    Extent {
                        offset: 3 * G,
                        length: 2 * G + 100
                    },
                    Source::Below
                ),
            ]
        );
        // The short last block.
        assert_eq!(
            m.read_plan(10 * G, 100),
            vec![(
                Extent {
                    offset: 10 * G,
                    length: 100
                },
                Source::Below
            )]
        );
    }

    #[test]
    fn partial_fill_is_only_for_unwritten_edge_blocks() {
        let mut m = OverlayMap::new(8 * G, G).unwrap();
        assert!(m.partial_fill(G, 2 * G).is_empty(), "whole blocks");
        assert_eq!(m.partial_fill(G + 1, 10).len(), 1, "one block, in part");
        assert_eq!(m.partial_fill(G + 1, 2 * G).len(), 2, "two edges");
        m.mark_written(G, G);
        assert_eq!(
            m.partial_fill(G + 1, 2 * G).len(),
            1,
            "one edge already written"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Replication writes the live image.
        Live(u64, u64, u8),
        /// The test instance writes the overlay.
        Overlay(u64, u64, u8),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let range = (0..size).prop_flat_map(move |o| (Just(o), 1..=(size - o).min(3 * G)));
        prop_oneof![
            (range.clone(), any::<u8>()).prop_map(|((o, l), b)| Op::Live(o, l, b)),
            (range, any::<u8>()).prop_map(|((o, l), b)| Op::Overlay(o, l, b)),
        ]
    }

    proptest! {
        /// Whatever replication writes after the snapshot, the snapshot reads
        /// exactly the image of the moment it was taken, and the overlay reads
        /// that image with the instance's own writes on top.
        #[test]
        fn snapshot_and_overlay_match_a_model(
            ops in proptest::collection::vec(op(6 * G + 123), 1..40),
            reads in proptest::collection::vec((0u64..6 * G + 123, 1u64..3 * G), 1..10),
        ) {
            let size = 6 * G + 123;
            let taken: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut live = taken.clone();
            let mut saved = vec![0u8; size as usize];
            let mut cow = CowMap::new(size, G).unwrap();
            let mut over = vec![0u8; size as usize];
            let mut omap = OverlayMap::new(size, G).unwrap();
            let mut model = taken.clone();
            let snap_read = |cow: &CowMap, saved: &[u8], live: &[u8], o: u64, l: u64| {
                read(&cow.read_plan(o, l), saved, live, o, l)
            };
            for op in ops {
                match op {
                    Op::Live(o, l, b) => {
                        while let Some(e) = cow.next_unsaved(o, l) {
                            let r = e.offset as usize..(e.offset + e.length) as usize;
                            saved[r.clone()].copy_from_slice(&live[r]);
                            cow.mark_saved(e);
                        }
                        live[o as usize..(o + l) as usize].fill(b);
                    }
                    Op::Overlay(o, l, b) => {
                        for e in omap.partial_fill(o, l) {
                            let fill = snap_read(&cow, &saved, &live, e.offset, e.length);
                            over[e.offset as usize..(e.offset + e.length) as usize]
                                .copy_from_slice(&fill);
                        }
                        over[o as usize..(o + l) as usize].fill(b);
                        omap.mark_written(o, l);
                        model[o as usize..(o + l) as usize].fill(b);
                    }
                }
            }
            for (o, l) in reads {
                let l = l.min(size - o);
                prop_assert_eq!(
                    snap_read(&cow, &saved, &live, o, l),
                    taken[o as usize..(o + l) as usize].to_vec()
                );
                let plan = omap.read_plan(o, l);
                let mut got = Vec::new();
                for (e, s) in plan {
                    match s {
                        Source::Side => got.extend_from_slice(
                            &over[e.offset as usize..(e.offset + e.length) as usize],
                        ),
                        Source::Below => {
                            got.extend(snap_read(&cow, &saved, &live, e.offset, e.length))
                        }
                    }
                }
                prop_assert_eq!(got, model[o as usize..(o + l) as usize].to_vec());
            }
        }
    }
}
