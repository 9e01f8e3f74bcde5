//! Who may do what.
//!
//! An operator calls the API with a named token holding one [`Role`]:
//! `viewer` reads, `operator` also runs migrations, cutovers and
//! switchovers, `admin` also changes what runs as root or can lose data
//! (hooks, VM specs, nodes, tokens, deletes, forced promotion, split-brain
//! resolution, share creation). A paired node calls with its certificate
//! ([`Authority::Peer`]): it acts with the node's own authority — it
//! forwards an operator's action only after checking that operator's role
//! itself — and only it may make the **peer-internal** calls (promote,
//! takeover, mark inconsistent, snapshot arm, re-pin, …): a token, even an
//! admin's, calling a volume's promote directly would skip the handover
//! and make two primaries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a named token may do; each includes the ones before it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads status, lists, reports.
    Viewer,
    /// Also starts and steers migrations, cutovers, switchovers,
    /// replication, standby, workload start/stop.
    Operator,
    /// Also hooks, VM specs, workloads, nodes, tokens, deletes, forced
    /// promotion, split-brain resolution, drop-copy, share creation.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: use viewer, operator or admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Need {
    /// A token with at least this role, or a paired node.
    Role(Role),
    /// A paired node's certificate; no token.
    Peer,
}

impl Need {
    pub const VIEWER: Need = Need::Role(Role::Viewer);
    pub const OPERATOR: Need = Need::Role(Role::Operator);
    pub const ADMIN: Need = Need::Role(Role::Admin);
    pub const PEER: Need = Need::Peer;

    pub fn as_str(self) -> &'static str {
        match self {
            Need::Role(r) => r.as_str(),
            Need::Peer => "peer",
        }
    }

    /// Whether `who` may call a route that needs this.
    pub fn check(self, who: &Authority) -> Result<(), Denied> {
        match (self, who) {
            (_, Authority::Peer { .. }) => Ok(()),
            (Need::Peer, Authority::Token { .. }) => Err(Denied::PeerOnly),
            (Need::Role(need), Authority::Token { name, role }) if *role < need => {
                Err(Denied::Role {
                    token: name.clone(),
                    has: *role,
                    needs: need,
                })
            }
            (Need::Role(_), Authority::Token { .. }) => Ok(()),
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling, as authentication established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// A paired node, by its certificate.
    Peer { node: String },
    /// An operator, by a named token.
    Token { name: String, role: Role },
}

impl Authority {
    /// Who, for logs and the audit trail: `node b`, `token ops (operator)`.
    pub fn describe(&self) -> String {
        match self {
            Authority::Peer { node } => format!("node {node}"),
            Authority::Token { name, role } => format!("token {name} ({role})"),
        }
    }
}

/// Why a caller may not (HTTP 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this is a peer-internal call: only a paired node's certificate may make it, never a token (an operator's call would skip the handover)")]
    PeerOnly,
    #[error("token {token:?} is {has}; this needs {needs} (`ferry token create NAME --role {needs}` on an admin's behalf)")]
    Role {
        token: String,
        has: Role,
        needs: Role,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(role: Role) -> Authority {
        Authority::Token {
            name: "t".into(),
            role,
        }
    }

    #[test]
    fn roles_include_the_ones_below_and_peers_pass_everything() {
        for need in Role::ALL {
            for has in Role::ALL {
                assert_eq!(Need::Role(need).check(&token(has)).is_ok(), has >= need);
            }
            assert!(Need::Peer.check(&token(need)) == Err(Denied::PeerOnly));
        }
        let peer = Authority::Peer { node: "b".into() };
        for need in [Need::VIEWER, Need::OPERATOR, Need::ADMIN, Need::Peer] {
            assert!(need.check(&peer).is_ok());
        }
        let e = Need::ADMIN.check(&token(Role::Operator)).unwrap_err();
        assert!(
            e.to_string().contains("is operator; this needs admin"),
            "{e}"
        );
    }

    #[test]
    fn role_names_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        assert!("root"
            .parse::<Role>()
            .unwrap_err()
            .to_string()
            .contains("viewer, operator or admin"));
    }
}
