//! Which copy a split brain keeps, by the configured policy (sans IO).
//!
//! Both nodes of a workload wrote while apart (a forced promotion, or
//! `two_node_unsafe`). The node serving under the witness's current record
//! decides, from typed reports of both sides, and says why; a report it
//! does not have is never taken as "no changes".

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `cluster.split_brain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// An operator decides (`ferry cluster resolve-split-brain`).
    Manual,
    /// Keep the copy of the primary promoted first: the one serving under
    /// the witness's current record is the younger, and gives way.
    DiscardYoungerPrimary,
    /// Keep the copy that changed more since the split.
    DiscardLeastChanges,
}

impl SplitBrainPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SplitBrainPolicy::Manual => "manual",
            SplitBrainPolicy::DiscardYoungerPrimary => "discard-younger-primary",
            SplitBrainPolicy::DiscardLeastChanges => "discard-least-changes",
        }
    }
}

impl fmt::Display for SplitBrainPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not one of manual, discard-younger-primary, discard-least-changes")]
pub struct UnknownPolicy(pub String);

impl FromStr for SplitBrainPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        [
            SplitBrainPolicy::Manual,
            SplitBrainPolicy::DiscardYoungerPrimary,
            SplitBrainPolicy::DiscardLeastChanges,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}

/// One side of a split brain as it reports itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideReport {
    pub node: String,
    /// Bytes of the workload's volumes written since the split (its dirty map).
    pub changed_bytes: u64,
}

/// What the policy says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep `node`'s copy; the other is set aside and resynced from it.
    Keep { node: String, why: String },
    /// Leave it to an operator.
    Manual { why: String },
}

/// The verdict of `policy`, decided on the node serving under the witness's
/// current record (`serving`) with the peer's report if it has one.
pub fn decide(
    policy: SplitBrainPolicy,
    serving: &SideReport,
    peer: Result<&SideReport, String>,
) -> Verdict {
    match policy {
        SplitBrainPolicy::Manual => Verdict::Manual {
            why: "cluster.split_brain = manual: `ferry cluster resolve-split-brain WORKLOAD --keep NODE`".into(),
        },
        SplitBrainPolicy::DiscardYoungerPrimary => match peer {
            Ok(p) => Verdict::Keep {
                node: p.node.clone(),
                why: format!(
                    "{} became primary after {} (the witness's record names it primary now)",
                    serving.node, p.node
                ),
            },
            Err(e) => Verdict::Manual {
                why: format!("the other node cannot be asked ({e}): resolve by hand"),
            },
        },
        SplitBrainPolicy::DiscardLeastChanges => match peer {
            Err(e) => Verdict::Manual {
                why: format!(
                    "the other node's changes since the split are unknown ({e}): resolve by hand"
                ),
            },
            // A tie keeps the serving copy: no handover for nothing.
            Ok(p) if serving.changed_bytes >= p.changed_bytes => Verdict::Keep {
                node: serving.node.clone(),
                why: format!(
                    "{} changed {} bytes since the split, {} {}",
                    serving.node, serving.changed_bytes, p.node, p.changed_bytes
                ),
            },
            Ok(p) => Verdict::Keep {
                node: p.node.clone(),
                why: format!(
                    "{} changed {} bytes since the split, {} {}",
                    p.node, p.changed_bytes, serving.node, serving.changed_bytes
                ),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(node: &str, changed_bytes: u64) -> SideReport {
        SideReport {
            node: node.into(),
            changed_bytes,
        }
    }

    fn kept(v: &Verdict) -> Option<&str> {
        match v {
            Verdict::Keep { node, .. } => Some(node),
            Verdict::Manual { .. } => None,
        }
    }

    #[test]
    fn least_changes_keeps_the_copy_that_changed_more_and_never_guesses() {
        let p = SplitBrainPolicy::DiscardLeastChanges;
        assert_eq!(
            kept(&decide(p, &side("a", 10), Ok(&side("b", 5)))),
            Some("a")
        );
        assert_eq!(
            kept(&decide(p, &side("a", 5), Ok(&side("b", 10)))),
            Some("b")
        );
        assert_eq!(
            kept(&decide(p, &side("a", 7), Ok(&side("b", 7)))),
            Some("a"),
            "a tie keeps the serving copy"
        );
        // Before, a peer whose report lacked the figure counted as 0.
        let v = decide(
            p,
            &side("a", 0),
            Err("no changed_bytes in its report".into()),
        );
        assert!(
            matches!(&v, Verdict::Manual { why } if why.contains("unknown")),
            "{v:?}"
        );
        let Verdict::Keep { why, .. } = decide(p, &side("a", 5), Ok(&side("b", 10))) else {
            panic!()
        };
        assert_eq!(why, "b changed 10 bytes since the split, a 5");
    }

    #[test]
    fn younger_primary_gives_way_and_manual_waits() {
        let p = SplitBrainPolicy::DiscardYoungerPrimary;
        assert_eq!(
            kept(&decide(p, &side("a", 99), Ok(&side("b", 0)))),
            Some("b")
        );
        assert!(matches!(
            decide(p, &side("a", 1), Err("down".into())),
            Verdict::Manual { .. }
        ));
        assert!(matches!(
            decide(SplitBrainPolicy::Manual, &side("a", 1), Ok(&side("b", 0))),
            Verdict::Manual { .. }
        ));
        for s in ["manual", "discard-younger-primary", "discard-least-changes"] {
            assert_eq!(s.parse::<SplitBrainPolicy>().unwrap().as_str(), s);
        }
        assert!("discard-both".parse::<SplitBrainPolicy>().is_err());
    }
}
