//! Generations: which of two copies of a volume holds the newer data history.
//!
//! A generation is a random 64-bit id naming a data history. A node records a
//! new one (and keeps the old as an ancestor) when it is promoted, and before the
//! first write it acknowledges while its peer is disconnected. When two nodes
//! connect they compare:
//!
//! ```text
//!  mine.current == theirs.current          → in sync: only dirty blocks move
//!  theirs.current ∈ mine.ancestors         → I am ahead: I am the sync source
//!  mine.current ∈ theirs.ancestors         → they are ahead: I am the target
//!  theirs is blank (never held data)       → I am the source of a full sync
//!  neither holds the other's id            → split brain: refuse, report
//! ```
//!
//! History is bounded (`history_max` ancestors); ids older than that are
//! forgotten, and two copies that far apart compare as split brain — the safe
//! answer, since nothing is then resynced without an operator.

use std::collections::VecDeque;

/// The id of a copy that never held data (a fresh replica).
pub const BLANK: u64 = 0;
/// Default number of ancestors remembered.
pub const DEFAULT_HISTORY_MAX: usize = 16;

/// A copy's current generation and its recent ancestors (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationHistory {
    current: u64,
    ancestors: VecDeque<u64>,
    history_max: usize,
}

/// How two copies relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Same history: resync only what either side marked dirty.
    InSync,
    /// This copy is newer: it is the sync source.
    Ahead,
    /// The peer's copy is newer: this one is the sync target.
    Behind,
    /// This copy holds data and the peer's is blank: full sync from here.
    PeerBlank,
    /// This copy is blank: full sync from the peer.
    SelfBlank,
    /// Histories diverged: neither may overwrite the other automatically.
    SplitBrain,
}

impl GenerationHistory {
    /// A blank copy.
    pub fn blank() -> GenerationHistory {
        GenerationHistory::with_current(BLANK)
    }

    /// A copy whose history starts at `current`.
    pub fn with_current(current: u64) -> GenerationHistory {
        GenerationHistory {
            current,
            ancestors: VecDeque::new(),
            history_max: DEFAULT_HISTORY_MAX,
        }
    }

    /// Rebuilds a persisted history.
    pub fn from_parts(current: u64, ancestors: Vec<u64>, history_max: usize) -> GenerationHistory {
        let history_max = history_max.max(1);
        let mut ancestors: VecDeque<u64> = ancestors.into_iter().filter(|&a| a != BLANK).collect();
        ancestors.truncate(history_max);
        GenerationHistory {
            current,
            ancestors,
            history_max,
        }
    }

    pub fn current(&self) -> u64 {
        self.current
    }

    pub fn ancestors(&self) -> impl Iterator<Item = u64> + '_ {
        self.ancestors.iter().copied()
    }

    pub fn is_blank(&self) -> bool {
        self.current == BLANK
    }

    /// Starts a new history `new_id` (random, never [`BLANK`]); the current one
    /// becomes the newest ancestor.
    pub fn bump(&mut self, new_id: u64) {
        debug_assert_ne!(new_id, BLANK);
        if self.current != BLANK {
            self.ancestors.push_front(self.current);
            self.ancestors.truncate(self.history_max);
        }
        self.current = new_id;
    }

    /// Adopts the peer's history after a completed sync from it.
    pub fn adopt(&mut self, source: &GenerationHistory) {
        self.current = source.current;
        self.ancestors = source.ancestors.clone();
        self.ancestors.truncate(self.history_max);
    }

    fn holds_ancestor(&self, id: u64) -> bool {
        id != BLANK && self.ancestors.contains(&id)
    }

    /// How this copy relates to the peer's.
    pub fn relate(&self, peer: &GenerationHistory) -> Relation {
        match (self.is_blank(), peer.is_blank()) {
            (true, true) => return Relation::InSync,
            (false, true) => return Relation::PeerBlank,
            (true, false) => return Relation::SelfBlank,
            (false, false) => {}
        }
        if self.current == peer.current {
            Relation::InSync
        } else if self.holds_ancestor(peer.current) {
            Relation::Ahead
        } else if peer.holds_ancestor(self.current) {
            Relation::Behind
        } else {
            Relation::SplitBrain
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_table_in_the_module_doc() {
        let mut a = GenerationHistory::with_current(10);
        let mut b = GenerationHistory::blank();
        assert_eq!(a.relate(&b), Relation::PeerBlank);
        assert_eq!(b.relate(&a), Relation::SelfBlank);
        b.adopt(&a);
        assert_eq!(a.relate(&b), Relation::InSync);
        // A loses B and acknowledges writes alone: it bumps first.
        a.bump(11);
        assert_eq!(a.relate(&b), Relation::Ahead);
        assert_eq!(b.relate(&a), Relation::Behind);
        // B is promoted too while A goes on: split brain.
        b.bump(12);
        assert_eq!(a.relate(&b), Relation::SplitBrain);
        assert_eq!(b.relate(&a), Relation::SplitBrain);
    }

    #[test]
    fn history_is_bounded() {
        let mut a = GenerationHistory::from_parts(1, vec![], 3);
        let old = a.clone();
        for id in 2..10 {
            a.bump(id);
        }
        assert_eq!(a.ancestors().count(), 3);
        // Too far apart to tell: the safe answer.
        assert_eq!(a.relate(&old), Relation::SplitBrain);
    }

    proptest! {
        /// Relations are symmetric: if I am ahead, the peer is behind, and so on.
        #[test]
        fn relations_are_symmetric(steps in proptest::collection::vec((any::<bool>(), 1u64..1000), 0..30)) {
            let mut a = GenerationHistory::with_current(1);
            let mut b = GenerationHistory::with_current(1);
            let mut next = 1000;
            for (which, _) in steps {
                next += 1;
                if which { a.bump(next) } else { b.bump(next) }
                let ab = a.relate(&b);
                let ba = b.relate(&a);
                let mirrored = match ab {
                    Relation::Ahead => Relation::Behind,
                    Relation::Behind => Relation::Ahead,
                    other => other,
                };
                prop_assert_eq!(ba, mirrored);
            }
        }
    }
}
