//! Cluster roles, leases, outdating and failover of one HA workload, on one
//! node — and the witness's record — as pure state machines.
//!
//! Time is a monotonic millisecond count passed in (`now`); each node's
//! clock may run at a rate off by up to `drift_permille`. Nothing here
//! touches a socket or a clock; the agent delivers messages and performs the
//! [`Action`]s, and the simulation in `tests/cluster_sim.rs` does the same
//! with seeded faults.
//!
//! The rules (DESIGN.md invariant 2):
//! - **Leases.** A primary accepts writes only while it holds a lease from
//!   its peer (who acknowledges its heartbeats) or from the witness (who
//!   renews it on request). The holder counts a lease as ending
//!   `lease_ms × (1 − d)` after it *sent* the request; the grantor promises
//!   nothing else for `lease_ms × (1 + d)` after granting. With every clock
//!   within `d` of true time, the holder's end comes first. A primary whose
//!   lease is about to end fences itself ([`Action::Fence`]: freeze I/O,
//!   drop the VIP, stop the application).
//! - **Promotion** needs quorum: the witness's compare-and-set on its one
//!   record per workload ([`Witness`]), which refuses while another node's
//!   lease is in force, refuses a node recorded outdated, and refuses anything
//!   for one lease after the witness restarts. A candidate stops granting
//!   leases to the old primary first, and asks only once its own last grant
//!   has expired.
//! - **Outdate before going alone.** A sync-mode primary that loses its
//!   replica holds writes ([`Action::HoldWrites`]) until the witness has
//!   recorded the replica outdated; an outdated node is never promoted
//!   automatically, so a later failover cannot drop writes acknowledged
//!   while the link was down.
//! - Without a witness, nothing fails over automatically (the primary goes
//!   on alone; the replica never promotes itself) unless `two_node_unsafe`,
//!   where the replica promotes once the primary's lease from it has
//!   expired and the primary goes on alone: a cut link then gives two
//!   primaries (split brain, found by generations afterwards).
//! - **Replays count for nothing.** Every receiver (each node for its
//!   peer's heartbeats, the witness for requests) picks a random key at
//!   start and derives from it a nonce per lease period ([`Nonces`]). A
//!   heartbeat or request counts only if it echoes the receiver's current
//!   (or previous) nonce, which it learned from the receiver's own
//!   heartbeats or replies, *and* is newer, by (incarnation, sent_at), than
//!   everything the receiver already counted from that sender. Incarnations
//!   are a counter the agent persists and increments at each start, so a
//!   datagram of an earlier run is older than every one of this run. A
//!   captured datagram therefore counts at most once, and never after the
//!   receiver restarted.
//! - **Policies** ([`Rules`], issue 19) are decided here too, from typed
//!   inputs, and performed by the agent: failback ([`Action::Failback`]),
//!   the split-brain policy ([`Action::AskPeerReport`] then
//!   [`Action::SplitBrain`] with [`crate::split_brain::decide`]'s verdict),
//!   resignation on check failures and disk I/O errors ([`Input::Check`],
//!   [`Input::IoErrors`]), and the in-sync verdict ([`Input::Members`],
//!   [`members_in_sync`], [`copy_state`]).

use serde::{Deserialize, Serialize};

use crate::split_brain::{self, SideReport, SplitBrainPolicy, Verdict};

/// Milliseconds on a node's (or the witness's) monotonic clock.
pub type Millis = u64;

/// splitmix64's finalizer: a bijection on u64 that mixes every bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A receiver's nonces: one per `period_ms` since `origin`, derived from a
/// key picked at random at each start (the caller's randomness: this crate
/// has none). Nonces of one key never repeat; 0 means "none" and is never
/// a nonce. A nonce is accepted during its period and the next one, so a
/// sender that learned it at any moment may echo it for at least one full
/// period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonces {
    key: u64,
    origin: Millis,
    period_ms: Millis,
}

impl Nonces {
    pub fn new(key: u64, origin: Millis, period_ms: Millis) -> Nonces {
        Nonces {
            key,
            origin,
            period_ms: period_ms.max(1),
        }
    }

    fn period(&self, now: Millis) -> u64 {
        now.saturating_sub(self.origin) / self.period_ms
    }

    fn at(&self, period: u64) -> u64 {
        mix(self.key ^ mix(period)).max(1)
    }

    /// The nonce senders should echo now.
    pub fn current(&self, now: Millis) -> u64 {
        self.at(self.period(now))
    }

    /// Whether `nonce` is the current or the previous period's.
    pub fn accepts(&self, now: Millis, nonce: u64) -> bool {
        let p = self.period(now);
        nonce != 0 && (nonce == self.at(p) || (p > 0 && nonce == self.at(p - 1)))
    }
}

/// Timing of heartbeats, failure detection and leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    pub heartbeat_interval_ms: u64,
    pub failure_timeout_ms: u64,
    /// How long a lease lasts; at least two heartbeat intervals.
    pub lease_ms: u64,
    /// Bound on clock rate error between any two parties, in ‰.
    pub drift_permille: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat_interval_ms: 250,
            failure_timeout_ms: 2000,
            lease_ms: 2000,
            drift_permille: 50,
        }
    }
}

impl Timing {
    /// Where the holder counts a lease requested at `sent_at` as ending.
    pub fn holder_end(&self, sent_at: Millis) -> Millis {
        sent_at + self.lease_ms * (1000 - self.drift_permille.min(999)) / 1000
    }

    /// Until when a grantor that granted at `at` promises nothing else.
    pub fn grantor_end(&self, at: Millis) -> Millis {
        at + self.lease_ms * (1000 + self.drift_permille) / 1000
    }

    /// Checks the relations the rules rely on.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat_interval_ms must be at least 1".into());
        }
        if self.failure_timeout_ms < 2 * self.heartbeat_interval_ms {
            return Err(format!(
                "failure_timeout_ms ({}) must be at least twice heartbeat_interval_ms ({})",
                self.failure_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        if self.lease_ms < 2 * self.heartbeat_interval_ms {
            return Err(format!(
                "lease_ms ({}) must be at least twice heartbeat_interval_ms ({}), or no renewal arrives in time",
                self.lease_ms, self.heartbeat_interval_ms
            ));
        }
        if self.drift_permille >= 500 {
            return Err("drift_permille must be below 500".into());
        }
        Ok(())
    }

    /// How long before its lease ends a primary fences itself: the time a
    /// freeze needs to take hold, at most half a heartbeat interval.
    fn fence_margin(&self) -> Millis {
        (self.heartbeat_interval_ms / 2).max(1)
    }
}

/// What the cluster may do on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// A witness is configured (leases, quorum, outdate records).
    pub witness: bool,
    /// Without a witness, fail over anyway (risks split brain).
    pub two_node_unsafe: bool,
    /// The workload's replication is synchronous.
    pub sync: bool,
    /// An async workload fails over automatically, accepting the loss of
    /// what had not reached the replica.
    pub async_accept_loss: bool,
}

impl Policy {
    /// Whether the replica may promote itself when the primary is gone.
    pub fn automatic_failover(&self) -> bool {
        (self.witness || self.two_node_unsafe) && (self.sync || self.async_accept_loss)
    }

    /// Whether a primary needs a lease to accept writes.
    fn needs_lease(&self) -> bool {
        self.witness || self.two_node_unsafe
    }
}

/// A node's role for the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Serves the workload (while its lease holds).
    Primary,
    /// Was primary, lost its lease: I/O frozen, VIP dropped, app stopped;
    /// resumes if the witness still names it primary, else demotes.
    Fenced,
    /// Holds the replica.
    Secondary,
}

/// This node's copy of the data, as a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataState {
    UpToDate,
    Outdated,
    Inconsistent,
}

/// Node-to-node heartbeat messages (UDP, every path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Sent by both nodes every interval.
    Heartbeat {
        sent_at: Millis,
        /// The sender's process run (a counter persisted per node): an Ack
        /// echoes it, so an Ack meant for an earlier run (a replay, a late
        /// packet) lends nothing; and (incarnation, sent_at) orders the
        /// sender's heartbeats, so a duplicate or a replay counts for nothing.
        #[serde(default)]
        incarnation: u64,
        /// The sender's current nonce, for the receiver to echo.
        #[serde(default)]
        nonce: u64,
        /// The receiver's nonce as the sender last learned it (0: none yet):
        /// the heartbeat counts only if it is the receiver's current one.
        #[serde(default)]
        echo_nonce: u64,
        role: Role,
        /// The witness epoch at which the sender last knew its role.
        epoch: u64,
        /// The sender resigns (check failed, disk errors, switchover): the
        /// peer may take over at once.
        resigning: bool,
    },
    /// A secondary's answer to a primary's heartbeat: a lease grant.
    Ack {
        echo: Millis,
        #[serde(default)]
        incarnation: u64,
    },
}

/// What a node asks the witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessOp {
    /// The recorded primary renews its lease.
    Renew,
    /// Make me primary (compare-and-set).
    Promote,
    /// The recorded primary records its peer outdated (compare-and-set).
    Outdate,
    /// The recorded primary says its peer is up to date again.
    UpToDate,
    /// The recorded primary gives its lease back (it resigned).
    Release,
    /// An operator's forced promotion: like `Promote`, but also of a node
    /// recorded outdated (its writes since may be lost: split brain).
    /// Still refused while another node's lease is in force.
    ForcePromote,
    /// Asks nothing: a secondary learns the witness's current nonce, so
    /// that a failover's first Promote is not refused for an old one.
    Probe,
}

/// A request to the witness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessRequest {
    pub node: String,
    /// The other node of the cluster (what `Outdate` records).
    pub peer: String,
    pub op: WitnessOp,
    pub sent_at: Millis,
    /// The node's run: a counter persisted and incremented at each start.
    /// (incarnation, sent_at) orders a node's requests across its runs.
    pub incarnation: u64,
    /// The witness's nonce, as the node last learned it from a reply (0:
    /// none yet). A request that does not echo the current one does nothing
    /// and is answered [`Refusal::Nonce`] with the current one.
    #[serde(default)]
    pub nonce: u64,
    /// `UpToDate` applies only if the record's epoch is still this one: a
    /// late `UpToDate` must never undo a newer `Outdate`.
    pub expect_epoch: u64,
}

/// The witness's one record per workload (persisted, small).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Bumped by every change.
    pub epoch: u64,
    pub primary: Option<String>,
    pub outdated: Option<String>,
}

/// Why the witness said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// Restarted less than one lease ago: it may have granted a lease it
    /// no longer knows about.
    Quiet,
    /// Only the recorded primary may do this.
    NotPrimary,
    /// The node is recorded outdated: promoting it could lose writes.
    Outdated,
    /// Another node's lease is still in force.
    LeaseHeld,
    /// The record changed since the request was made (`expect_epoch`),
    /// or the request is not newer than one already handled (a duplicate,
    /// a replay, a late datagram).
    Stale,
    /// The request did not echo the witness's current nonce (the node just
    /// started, the witness restarted, or it is a replay): nothing was
    /// done; the reply carries the nonce to retry with.
    Nonce,
}

/// The witness's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessReply {
    pub echo: Millis,
    /// The request's incarnation, echoed: replies meant for an earlier run
    /// of the node are ignored.
    #[serde(default)]
    pub incarnation: u64,
    pub op: WitnessOp,
    /// `None`: granted.
    pub refused: Option<Refusal>,
    pub record: Record,
    /// The witness's current nonce, to echo in the next request.
    #[serde(default)]
    pub nonce: u64,
}

/// The witness's logic for one workload: the persisted record plus the
/// lease it last granted (volatile: a restart forgets it, hence the quiet
/// period).
#[derive(Debug, Clone)]
pub struct Witness {
    pub record: Record,
    timing: Timing,
    /// (holder, grantor-side end).
    lease: Option<(String, Millis)>,
    quiet_until: Millis,
    /// Per node: the newest (incarnation, `sent_at`) handled. Requests not
    /// newer are answered `Stale` without effect, so a duplicate or a
    /// replay does nothing, and a node's requests take effect in the order
    /// it sent them (UDP may reorder): once its newest Promote was refused,
    /// no older one can still succeed. Volatile: after a restart the nonces
    /// (a new key) refuse everything sent before.
    newest: std::collections::HashMap<String, (u64, Millis)>,
    nonces: Nonces,
}

impl Witness {
    /// A witness (re)started at `now` with its persisted `record`;
    /// `nonce_key` is random, picked at each start of the witness.
    pub fn start(record: Record, timing: Timing, now: Millis, nonce_key: u64) -> Witness {
        Witness {
            record,
            timing,
            lease: None,
            quiet_until: timing.grantor_end(now),
            newest: std::collections::HashMap::new(),
            nonces: Nonces::new(nonce_key, now, timing.lease_ms),
        }
    }

    /// The nonce requests must echo now.
    pub fn nonce(&self, now: Millis) -> u64 {
        self.nonces.current(now)
    }

    /// New lease settings from the nodes. A lease already granted keeps the
    /// end it was granted with.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
    }

    /// Answers one request. `changed` says the record must be persisted
    /// before the reply is sent.
    pub fn handle(&mut self, now: Millis, req: &WitnessRequest) -> (WitnessReply, bool) {
        let before = self.record.clone();
        let stale = self
            .newest
            .get(&req.node)
            .is_some_and(|&newest| (req.incarnation, req.sent_at) <= newest);
        let refused = if !self.nonces.accepts(now, req.nonce) {
            Some(Refusal::Nonce)
        } else if stale {
            Some(Refusal::Stale)
        } else {
            self.newest
                .insert(req.node.clone(), (req.incarnation, req.sent_at));
            self.decide(now, req)
        };
        // Every granted Outdate is a new epoch, even when the record already
        // said so, so an UpToDate sent before it can no longer apply.
        let changed = self.record != before || (req.op == WitnessOp::Outdate && refused.is_none());
        if changed {
            self.record.epoch += 1;
        }
        let reply = WitnessReply {
            echo: req.sent_at,
            incarnation: req.incarnation,
            op: req.op,
            refused,
            record: self.record.clone(),
            nonce: self.nonces.current(now),
        };
        (reply, changed)
    }

    fn lease_held_by_other(&self, now: Millis, node: &str) -> bool {
        matches!(&self.lease, Some((holder, end)) if holder != node && now < *end)
    }

    fn grant(&mut self, now: Millis, node: &str) {
        self.lease = Some((node.to_string(), self.timing.grantor_end(now)));
    }

    fn decide(&mut self, now: Millis, req: &WitnessRequest) -> Option<Refusal> {
        let node = req.node.as_str();
        let is_primary = self.record.primary.as_deref() == Some(node);
        match req.op {
            WitnessOp::Renew => {
                if self.record.primary.is_none() {
                    // A workload just put under HA: its primary claims the
                    // empty record — unless that could conflict.
                    if self.record.outdated.as_deref() == Some(node) {
                        return Some(Refusal::Outdated);
                    }
                    if now < self.quiet_until {
                        return Some(Refusal::Quiet);
                    }
                    if self.lease_held_by_other(now, node) {
                        return Some(Refusal::LeaseHeld);
                    }
                    self.record.primary = Some(node.to_string());
                }
                if self.record.primary.as_deref() != Some(node) {
                    return Some(Refusal::NotPrimary);
                }
                // Renewing the recorded primary's lease cannot conflict with
                // a lease granted before a restart: that was the same node's.
                self.grant(now, node);
                None
            }
            WitnessOp::Promote | WitnessOp::ForcePromote => {
                if is_primary {
                    self.grant(now, node);
                    return None;
                }
                if req.op == WitnessOp::Promote && self.record.outdated.as_deref() == Some(node) {
                    return Some(Refusal::Outdated);
                }
                if now < self.quiet_until {
                    return Some(Refusal::Quiet);
                }
                if self.lease_held_by_other(now, node) {
                    return Some(Refusal::LeaseHeld);
                }
                // The old primary's data may hold writes the new one never
                // saw: it is outdated until resynced.
                self.record.outdated = self.record.primary.take();
                self.record.primary = Some(node.to_string());
                self.grant(now, node);
                None
            }
            WitnessOp::Outdate => {
                if !is_primary {
                    return Some(Refusal::NotPrimary);
                }
                self.record.outdated = Some(req.peer.clone());
                self.grant(now, node);
                None
            }
            WitnessOp::UpToDate => {
                if !is_primary {
                    return Some(Refusal::NotPrimary);
                }
                if self.record.epoch != req.expect_epoch {
                    return Some(Refusal::Stale);
                }
                self.record.outdated = None;
                self.grant(now, node);
                None
            }
            WitnessOp::Probe => None,
            WitnessOp::Release => {
                if !is_primary {
                    return Some(Refusal::NotPrimary);
                }
                if matches!(&self.lease, Some((holder, _)) if holder == node) {
                    self.lease = None;
                }
                None
            }
        }
    }
}

/// Something to tell the operator (logged, counted, passed to the notify hook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    PeerLost,
    PeerBack,
    /// A sync primary is holding writes until its peer is recorded outdated.
    WritesHeld,
    PeerOutdated,
    PeerUpToDate,
    Fenced {
        why: String,
    },
    Resumed,
    FailoverStarted {
        silent_ms: u64,
    },
    Promoted {
        epoch: u64,
    },
    Demoted {
        primary: Option<String>,
    },
    /// A failover this node would do is not allowed; says why (once per outage).
    NotPromoting {
        why: String,
    },
    Resigned {
        why: String,
    },
    /// A resignation nobody took up within four failure timeouts was undone.
    ResignAbandoned,
}

/// What a node must keep across restarts (written durably when an
/// [`Action::Persist`] says so, before the actions after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub role: Role,
    /// The witness epoch at which the role was last confirmed.
    pub epoch: u64,
    /// A failover was asked of the witness: until its answer, this node
    /// grants no lease (the witness may already have promoted it).
    pub candidate: bool,
}

/// What the agent must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this durably before performing the actions that follow.
    Persist(Persisted),
    SendPeer(PeerMsg),
    SendWitness(WitnessRequest),
    /// Sync writes wait (outdate before going alone).
    HoldWrites,
    ReleaseWrites,
    /// Freeze I/O, drop the VIP, run the stop hook — in that order.
    Fence,
    /// Undo a fence: the witness still names this node primary.
    Resume,
    /// Become primary: promote the volumes (new generation), add the VIP,
    /// run the start hook.
    Promote,
    /// Become secondary: a newer primary exists; resync from it.
    Demote,
    /// Failback: hand the workload to its preferred node (the peer) by a
    /// verified switchover; answer [`Input::FailbackDone`].
    Failback,
    /// Ask the peer for its typed report of the split brain
    /// ([`SideReport`]); answer [`Input::PeerReport`].
    AskPeerReport,
    /// The split-brain policy's verdict. `Keep`: keep that node's copy (the
    /// other is set aside and resynced from it), answer
    /// [`Input::SplitBrainDone`]; `Manual`: log it, an operator resolves.
    SplitBrain {
        policy: SplitBrainPolicy,
        verdict: Verdict,
    },
    Event(Event),
}

/// What the cluster decides beyond failover, from the workload's
/// configuration (`[cluster]` and its HA record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// `failback_delay_ms` when `failback = true`: a workload served here
    /// whose preferred node is the peer moves back once the peer has been
    /// in sync this long. `None`: no failback.
    pub failback_delay_ms: Option<Millis>,
    /// The workload's preferred node.
    pub preferred: Option<String>,
    /// `split_brain`: which copy a split brain keeps.
    pub split_brain: SplitBrainPolicy,
    /// `check_rise`: passes in a row before the application counts as up.
    pub check_rise: u32,
    /// `check_fall`: failures in a row, once up, that hand it over.
    pub check_fall: u32,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            failback_delay_ms: None,
            preferred: None,
            split_brain: SplitBrainPolicy::Manual,
            check_rise: 2,
            check_fall: 3,
        }
    }
}

/// A failed failback is tried again this long after (each attempt freezes
/// writes for a moment: do not hammer).
pub const FAILBACK_RETRY_MS: Millis = 30_000;
/// The split-brain policy looks again this long after a verdict left to an
/// operator (the peer could not be asked) or a resolution that ended.
pub const SPLIT_BRAIN_RETRY_MS: Millis = 250;
/// A node the peer's split-brain policy had promoted runs no policy of its
/// own for this long: the peer is still rebasing, and one decision must
/// not be answered by another.
pub const POLICY_PROMOTED_QUIET_MS: Millis = 60_000;

/// One volume or share of a workload, as this node's copy and its
/// replication link report it: what the in-sync verdict and the copy's
/// state are decided from ([`members_in_sync`], [`copy_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Served here: a primary volume or share on this node.
    pub primary_here: bool,
    /// As primary: the link is caught up and streams every write (not
    /// disconnected, resyncing or split).
    pub streaming: bool,
    /// As primary: the link reports the peer's copy up to date.
    pub peer_up_to_date: bool,
    /// This node's copy is usable: served here, or a consistent replica.
    pub usable_here: bool,
}

/// The in-sync verdict: the peer's replica counts as in sync (up to date)
/// when every volume and share of the workload is served here, its link
/// streams, and the link reports the peer's copy up to date. A workload
/// with no member is never in sync.
pub fn members_in_sync(members: &[Member]) -> bool {
    !members.is_empty()
        && members
            .iter()
            .all(|m| m.primary_here && m.streaming && m.peer_up_to_date)
}

/// This node's copy as a replica: up to date when every member is usable
/// here (served here or a consistent replica), else inconsistent.
pub fn copy_state(members: &[Member]) -> DataState {
    if members.iter().all(|m| m.primary_here || m.usable_here) {
        DataState::UpToDate
    } else {
        DataState::Inconsistent
    }
}

/// Inputs from the rest of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Peer(PeerMsg),
    Witness(WitnessReply),
    /// This node's copy (as a replica) changed state.
    DataState(DataState),
    /// The peer's replica is up to date again (primary side).
    PeerUpToDate,
    /// The replication link to the peer dropped, or a resync started.
    PeerNotUpToDate,
    /// The application's check failed `fall` times, or a volume hit an
    /// I/O error: hand the workload over.
    Resign {
        why: String,
    },
    /// The peer showed a sign of life at `at` on another path (the
    /// replication connection): it counts for liveness, not for leases.
    PeerSeen {
        at: Millis,
    },
    /// An operator promotes this secondary by hand (`--force`: even if its
    /// copy is outdated or inconsistent). Still only once no lease of the
    /// old primary can be in force. `by_policy`: asked by the peer's
    /// split-brain policy (this node then runs no policy of its own for
    /// [`POLICY_PROMOTED_QUIET_MS`]).
    ForcePromote {
        by_policy: bool,
    },
    /// The workload's volumes and shares as this node's links report them
    /// (every few tens of ms): the in-sync verdict is taken from it
    /// ([`members_in_sync`]), and each change is handled as
    /// [`Input::PeerUpToDate`] or [`Input::PeerNotUpToDate`].
    Members(Vec<Member>),
    /// One run of the application's check hook while this node serves.
    Check {
        ok: bool,
        output: String,
    },
    /// Disk I/O errors of the workload's volumes here so far (a counter):
    /// the first report is the baseline, a rise while serving resigns.
    IoErrors {
        total: u64,
    },
    /// This node's copy was found written separately from the peer's
    /// (split brain), and how many bytes it changed since.
    Diverged {
        split_brain: bool,
        changed_bytes: u64,
    },
    /// The peer's answer to [`Action::AskPeerReport`]; `Err` says why
    /// there is none (never taken as "no changes").
    PeerReport(Result<SideReport, String>),
    /// The resolution a [`Action::SplitBrain`] `Keep` verdict started ended.
    SplitBrainDone {
        ok: bool,
    },
    /// The switchover an [`Action::Failback`] started ended.
    FailbackDone {
        ok: bool,
    },
}

/// Where the split-brain policy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitBrainStep {
    /// Looks again from then on.
    Idle { not_before: Millis },
    /// Waits for the peer's report.
    Asking,
    /// A `Keep` verdict is being carried out.
    Resolving,
}

/// The check hook's recent results while serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct CheckCount {
    passes: u32,
    fails: u32,
    /// `check_rise` passes in a row were seen: failures now count.
    up: bool,
}

/// A failover in progress on a secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidacy {
    /// Promote requests wait until this node's last grant expired.
    not_before: Millis,
    /// The newest Promote sent: only its answer can end the candidacy.
    sent: Option<Millis>,
    /// An operator's `--force`: promote whatever this copy's state.
    forced: bool,
    /// The wait before asking again after a refusal while the primary
    /// resigns (doubles per refusal, up to the heartbeat interval).
    retry_ms: Millis,
}

/// One node's view of one HA workload.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub me: String,
    pub peer: String,
    incarnation: u64,
    timing: Timing,
    policy: Policy,
    role: Role,
    epoch: u64,
    data: DataState,
    /// Leases held as primary (holder-side ends).
    peer_lease_end: Millis,
    witness_lease_end: Millis,
    /// Peer liveness.
    peer_last_heard: Option<Millis>,
    peer_role: Option<Role>,
    peer_epoch: u64,
    peer_resigning: bool,
    peer_lost: bool,
    /// As primary: the witness recorded the peer outdated (or, with no
    /// witness, we decided so): writes may be acknowledged alone.
    peer_outdated: bool,
    writes_held: bool,
    /// The peer's replica is up to date and the witness should hear so.
    peer_up_to_date_pending: bool,
    /// When the last UpToDate was sent: only an Outdate sent after it may
    /// let writes go on alone.
    last_up_to_date_sent: Option<Millis>,
    /// The newest record epoch seen in any witness reply.
    record_epoch: u64,
    /// The witness refused to promote this node as outdated: no new
    /// candidacy before this time (the record changes only when the
    /// primary says the copy is up to date again).
    refused_outdated_until: Millis,
    /// The primary's link reports the peer's replica in sync.
    peer_in_sync: bool,
    /// Since when the link has said the replica is not in sync (the link
    /// dropped or is resyncing while heartbeats may still arrive).
    peer_unsynced_since: Option<Millis>,
    /// When this node resigned (a resignation nobody takes up is undone).
    resigned_at: Option<Millis>,
    /// When this node last resigned: grants answering a heartbeat or
    /// request sent before (or a Release) lend no lease — it gave them
    /// back, and the peer may take over at once.
    lease_floor: Option<Millis>,
    /// As secondary: grantor-side end of the last lease granted.
    granted_until: Millis,
    candidacy: Option<Candidacy>,
    told_not_promoting: bool,
    /// Maintenance: this node takes no workload over.
    standby: bool,
    /// The last promotion was an operator's `--force`.
    promoted_forced: bool,
    resigning: bool,
    started_at: Millis,
    next_heartbeat: Millis,
    next_witness: Millis,
    /// This node's nonces for its peer's heartbeats.
    nonces: Nonces,
    /// The newest (incarnation, sent_at) of the peer's heartbeats seen:
    /// anything not newer is a duplicate or a replay and counts for nothing.
    peer_newest: Option<(u64, Millis)>,
    /// The peer's nonce from its newest heartbeat, echoed in ours.
    peer_nonce: u64,
    /// The newest heartbeat (`sent_at`) of this run the peer acknowledged:
    /// an Ack not newer (a duplicate, a replay) says nothing of the peer.
    newest_ack: Option<Millis>,
    /// The witness's nonce from its newest reply, echoed in requests.
    witness_nonce: u64,
    /// The newest request (`sent_at`) a witness reply answered: an older
    /// reply (late, or replayed) is ignored.
    newest_reply: Option<Millis>,
    /// The newest request sent to the witness.
    last_witness_sent: Option<Millis>,
    /// The newest witness reply's record names this node primary.
    witness_names_me: bool,
    /// A secondary probes the witness for its nonce from then on.
    next_probe: Millis,
    rules: Rules,
    /// The in-sync verdict of the newest members report (`None`: none yet).
    members_in_sync: Option<bool>,
    /// Failback: since when it has been due.
    failback_since: Option<Millis>,
    /// Failback: none started before this (`Millis::MAX`: one runs).
    failback_blocked_until: Millis,
    check: CheckCount,
    /// Disk I/O errors already acted on (`None`: no report yet).
    io_errors_seen: Option<u64>,
    /// From the newest [`Input::Diverged`].
    split_brain_found: bool,
    changed_bytes: u64,
    split_brain_step: SplitBrainStep,
    /// Promoted by the peer's split-brain policy: no policy here until then.
    split_brain_quiet_until: Millis,
}

impl ClusterNode {
    /// A node (re)started at `now` with its persisted role and data state.
    /// A restarted primary serves only once it holds a lease again.
    /// `incarnation` grows with every start of the node (persisted);
    /// `nonce_key` is random, picked at each start.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        me: &str,
        peer: &str,
        incarnation: u64,
        nonce_key: u64,
        saved: Persisted,
        data: DataState,
        timing: Timing,
        policy: Policy,
        now: Millis,
    ) -> ClusterNode {
        let Persisted {
            role,
            epoch,
            candidate,
        } = saved;
        ClusterNode {
            me: me.to_string(),
            peer: peer.to_string(),
            incarnation,
            timing,
            policy,
            role: if role == Role::Fenced {
                Role::Primary
            } else {
                role
            },
            epoch,
            data,
            peer_lease_end: 0,
            witness_lease_end: 0,
            peer_last_heard: None,
            peer_role: None,
            peer_epoch: 0,
            peer_resigning: false,
            peer_lost: false,
            peer_outdated: false,
            writes_held: false,
            peer_up_to_date_pending: false,
            last_up_to_date_sent: None,
            record_epoch: epoch,
            refused_outdated_until: 0,
            peer_in_sync: false,
            peer_unsynced_since: None,
            resigned_at: None,
            lease_floor: None,
            // A restarted secondary may have granted a lease just before
            // it went down: it promises nothing for one lease.
            granted_until: timing.grantor_end(now),
            candidacy: candidate.then_some(Candidacy {
                not_before: timing.grantor_end(now),
                sent: None,
                forced: false,
                retry_ms: 0,
            }),
            told_not_promoting: false,
            standby: false,
            promoted_forced: false,
            resigning: false,
            started_at: now,
            next_heartbeat: now,
            next_witness: now,
            nonces: Nonces::new(nonce_key, now, timing.lease_ms),
            peer_newest: None,
            peer_nonce: 0,
            newest_ack: None,
            witness_nonce: 0,
            newest_reply: None,
            last_witness_sent: None,
            witness_names_me: false,
            next_probe: now,
            rules: Rules::default(),
            members_in_sync: None,
            failback_since: None,
            failback_blocked_until: 0,
            check: CheckCount::default(),
            io_errors_seen: None,
            split_brain_found: false,
            changed_bytes: 0,
            split_brain_step: SplitBrainStep::Idle { not_before: now },
            split_brain_quiet_until: 0,
        }
    }

    /// Sets the policies beyond failover (failback, split brain, checks).
    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The in-sync verdict of the newest members report (`None`: none yet).
    pub fn members_in_sync(&self) -> Option<bool> {
        self.members_in_sync
    }

    /// Whether this node's copy was last reported split from the peer's.
    pub fn split_brain_found(&self) -> bool {
        self.split_brain_found
    }

    /// Bytes this copy changed since the split, as last reported.
    pub fn changed_bytes(&self) -> u64 {
        self.changed_bytes
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The nonce the peer's heartbeats must echo now.
    pub fn nonce(&self, now: Millis) -> u64 {
        self.nonces.current(now)
    }

    /// This node's copy as a replica: outdated once the witness said so.
    pub fn data_state(&self) -> DataState {
        self.data
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The peer's role as its last heartbeat said.
    pub fn peer_role(&self) -> Option<Role> {
        self.peer_role
    }

    /// Maintenance mode: a node in standby never takes a workload over.
    pub fn set_standby(&mut self, on: bool) {
        self.standby = on;
        self.told_not_promoting = false;
    }

    pub fn standby(&self) -> bool {
        self.standby
    }

    /// Whether the last promotion was forced (its copy may be outdated or
    /// inconsistent: the agent promotes it regardless).
    pub fn promoted_forced(&self) -> bool {
        self.promoted_forced
    }

    /// What must survive a restart.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            role: match self.role {
                Role::Fenced => Role::Primary,
                r => r,
            },
            epoch: self.epoch,
            candidate: self.candidacy.is_some(),
        }
    }

    /// A failover was asked of the witness and not yet answered: this
    /// node's copy must not change (no inbound resync) until it is.
    pub fn is_candidate(&self) -> bool {
        self.candidacy.is_some()
    }

    pub fn writes_held(&self) -> bool {
        self.writes_held
    }

    /// The holder-side end of this node's lease (0: none).
    pub fn lease_end(&self) -> Millis {
        self.peer_lease_end.max(self.witness_lease_end)
    }

    /// Whether the peer's last heartbeat said it resigns (it hands the
    /// workload over: a switchover, a failed check).
    pub fn peer_resigning(&self) -> bool {
        self.peer_resigning
    }

    /// Whether the peer was heard within the failure timeout.
    pub fn peer_alive(&self, now: Millis) -> bool {
        self.peer_last_heard
            .is_some_and(|t| now.saturating_sub(t) < self.timing.failure_timeout_ms)
    }

    /// Whether this node may acknowledge a write right now: primary, not
    /// fenced, inside its lease (when it needs one).
    pub fn accepting_writes(&self, now: Millis) -> bool {
        self.role == Role::Primary
            && !self.resigning
            && if self.policy.needs_lease() {
                now < self.lease_end()
            } else {
                // No lease: a restarted primary first listens for the peer
                // for a failure timeout (it may have been replaced by hand).
                self.peer_last_heard.is_some()
                    || now.saturating_sub(self.started_at) >= self.timing.failure_timeout_ms
            }
    }

    /// Until when writes may enter (holder-side lease end less the fence
    /// margin): `None` when no lease is needed and the node is primary,
    /// `Some(0)` when it may not accept writes at all.
    pub fn write_deadline(&self, now: Millis) -> Option<Millis> {
        if !self.accepting_writes(now) {
            return Some(0);
        }
        if !self.policy.needs_lease() {
            return None;
        }
        Some(self.lease_end().saturating_sub(self.timing.fence_margin()))
    }

    /// Whether a write not confirmed by the peer may be acknowledged.
    pub fn may_write_alone(&self) -> bool {
        !self.policy.sync || self.peer_outdated
    }

    /// Feeds one input; returns what to do.
    pub fn on_input(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let before = self.persisted();
        let mut out = self.handle(now, input);
        out.extend(self.timers(now));
        self.persist_first(before, &mut out);
        out
    }

    /// Timers: heartbeats, witness requests, failure detection, fencing,
    /// failover. Call at least every few milliseconds.
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        let before = self.persisted();
        let mut out = self.timers(now);
        self.persist_first(before, &mut out);
        out
    }

    /// Anything that must survive a restart is written before the rest is
    /// done (a Promote request is sent only once its intent is on disk).
    fn persist_first(&self, before: Persisted, out: &mut Vec<Action>) {
        let after = self.persisted();
        if after != before {
            out.insert(0, Action::Persist(after));
        }
    }

    fn handle(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Peer(PeerMsg::Heartbeat {
                sent_at,
                incarnation,
                nonce,
                echo_nonce,
                role,
                epoch,
                resigning,
            }) => {
                // A duplicate (another path), a late datagram or a replay.
                if self
                    .peer_newest
                    .is_some_and(|newest| (incarnation, sent_at) <= newest)
                {
                    return out;
                }
                self.peer_newest = Some((incarnation, sent_at));
                self.peer_nonce = nonce;
                // Sent before the peer had heard this run's current nonce
                // (either side just started): it teaches the peer's nonce,
                // and proves nothing else.
                if !self.nonces.accepts(now, echo_nonce) {
                    return out;
                }
                self.peer_last_heard = Some(now);
                self.peer_role = Some(role);
                self.peer_epoch = epoch;
                self.peer_resigning = resigning;
                if self.peer_lost {
                    self.peer_lost = false;
                    out.push(Action::Event(Event::PeerBack));
                }
                let hb = (sent_at, incarnation);
                self.on_peer_heartbeat(now, hb, role, epoch, resigning, &mut out);
            }
            Input::Peer(PeerMsg::Ack { echo, incarnation })
                if echo > now
                    || incarnation != self.incarnation
                    || self.newest_ack.is_some_and(|newest| echo <= newest) => {}
            Input::Peer(PeerMsg::Ack { echo, .. }) => {
                self.newest_ack = Some(echo);
                self.peer_last_heard = Some(now);
                if matches!(self.role, Role::Primary | Role::Fenced)
                    && !self.resigning
                    && self.lease_floor.is_none_or(|f| echo > f)
                {
                    self.peer_lease_end = self.peer_lease_end.max(self.timing.holder_end(echo));
                    if self.role == Role::Fenced
                        && now + self.timing.fence_margin() < self.lease_end()
                    {
                        // The peer promises again not to promote: serve again.
                        self.role = Role::Primary;
                        out.push(Action::Resume);
                        out.push(Action::Event(Event::Resumed));
                    }
                }
            }
            // Not an answer to a request of this run: it proves nothing.
            Input::Witness(reply) if reply.echo > now || reply.incarnation != self.incarnation => {}
            Input::Witness(reply) => self.on_witness(now, reply, &mut out),
            Input::DataState(d) => {
                self.data = d;
                if d == DataState::UpToDate {
                    self.told_not_promoting = false;
                    self.refused_outdated_until = 0;
                }
            }
            Input::PeerNotUpToDate => {
                self.peer_in_sync = false;
                self.peer_unsynced_since.get_or_insert(now);
                self.peer_up_to_date_pending = false;
            }
            Input::PeerUpToDate => {
                self.peer_in_sync = true;
                self.peer_unsynced_since = None;
                if self.role == Role::Primary {
                    if self.policy.witness {
                        // Tell the witness; until it is told, the record
                        // still says outdated (safe: it only blocks promotion).
                        self.peer_up_to_date_pending = true;
                        self.next_witness = now;
                    } else {
                        self.peer_outdated = false;
                    }
                    if self.writes_held {
                        // The peer has everything again: writes replicate.
                        self.writes_held = false;
                        out.push(Action::ReleaseWrites);
                    }
                    out.push(Action::Event(Event::PeerUpToDate));
                }
            }
            Input::PeerSeen { at } => {
                if at <= now && self.peer_last_heard.is_none_or(|t| at > t) {
                    self.peer_last_heard = Some(at);
                    if self.peer_lost && self.peer_alive(now) {
                        self.peer_lost = false;
                        out.push(Action::Event(Event::PeerBack));
                    }
                }
            }
            Input::ForcePromote { by_policy } => {
                if by_policy {
                    self.split_brain_quiet_until = now + POLICY_PROMOTED_QUIET_MS;
                }
                if self.role == Role::Secondary {
                    if self.peer_alive(now) && self.peer_role == Some(Role::Primary) {
                        out.push(Action::Event(Event::NotPromoting {
                            why: format!("{} serves the workload: use a switchover", self.peer),
                        }));
                    } else {
                        self.candidacy = Some(Candidacy {
                            not_before: self.granted_until,
                            sent: None,
                            forced: true,
                            retry_ms: 0,
                        });
                        self.next_witness = now;
                        out.push(Action::Event(Event::FailoverStarted {
                            silent_ms: self.peer_last_heard.map_or(0, |t| now.saturating_sub(t)),
                        }));
                    }
                }
            }
            Input::Resign { why } => self.resign(now, why, &mut out),
            Input::Members(members) => {
                let in_sync = members_in_sync(&members);
                if self.members_in_sync != Some(in_sync) {
                    self.members_in_sync = Some(in_sync);
                    let input = if in_sync {
                        Input::PeerUpToDate
                    } else {
                        Input::PeerNotUpToDate
                    };
                    out.extend(self.handle(now, input));
                }
            }
            Input::Check { ok, output } => {
                // A result that arrives after serving ended counts for
                // nothing (the counts start again when serving does).
                if !self.accepting_writes(now) {
                    self.check = CheckCount::default();
                    return out;
                }
                let c = &mut self.check;
                if ok {
                    c.passes += 1;
                    c.fails = 0;
                    if !c.up && c.passes >= self.rules.check_rise {
                        c.up = true;
                    }
                } else {
                    c.fails += 1;
                    c.passes = 0;
                    if c.up && c.fails >= self.rules.check_fall {
                        c.up = false;
                        let why = format!(
                            "the check hook failed {} times in a row: {}",
                            c.fails,
                            output.lines().last().unwrap_or("").trim()
                        );
                        self.resign(now, why, &mut out);
                    }
                }
            }
            Input::IoErrors { total } => match self.io_errors_seen {
                None => self.io_errors_seen = Some(total),
                Some(seen) if total > seen => {
                    self.io_errors_seen = Some(total);
                    if self.accepting_writes(now) {
                        let why =
                            format!("{total} disk I/O error(s) on the workload's volumes here");
                        self.resign(now, why, &mut out);
                    }
                }
                Some(_) => {}
            },
            Input::Diverged {
                split_brain,
                changed_bytes,
            } => {
                self.split_brain_found = split_brain;
                self.changed_bytes = changed_bytes;
            }
            Input::PeerReport(report) => {
                if self.split_brain_step != SplitBrainStep::Asking {
                    return out;
                }
                // Decided only while this node still serves a split copy.
                if !(self.accepting_writes(now) && self.split_brain_found) {
                    self.split_brain_step = SplitBrainStep::Idle { not_before: now };
                    return out;
                }
                let policy = self.rules.split_brain;
                let mine = SideReport {
                    node: self.me.clone(),
                    changed_bytes: self.changed_bytes,
                };
                let verdict =
                    split_brain::decide(policy, &mine, report.as_ref().map_err(Clone::clone));
                self.split_brain_step = match verdict {
                    Verdict::Keep { .. } => SplitBrainStep::Resolving,
                    Verdict::Manual { .. } => SplitBrainStep::Idle {
                        not_before: now + SPLIT_BRAIN_RETRY_MS,
                    },
                };
                out.push(Action::SplitBrain { policy, verdict });
            }
            Input::SplitBrainDone { .. } => {
                if self.split_brain_step == SplitBrainStep::Resolving {
                    self.split_brain_step = SplitBrainStep::Idle {
                        not_before: now + SPLIT_BRAIN_RETRY_MS,
                    };
                }
            }
            Input::FailbackDone { ok } => {
                self.failback_blocked_until = if ok { 0 } else { now + FAILBACK_RETRY_MS };
            }
        }
        out
    }

    /// Hands the workload over: stop serving, give the lease back, say why
    /// (the check failed, disk errors, a switchover, a split-brain verdict).
    fn resign(&mut self, now: Millis, why: String, out: &mut Vec<Action>) {
        if self.role == Role::Primary && !self.resigning {
            self.resigning = true;
            self.resigned_at = Some(now);
            self.lease_floor = Some(now);
            // Stop serving first; then give the lease back so the
            // peer need not wait for it to run out.
            self.peer_lease_end = 0;
            self.witness_lease_end = 0;
            out.push(Action::Fence);
            out.push(Action::Event(Event::Resigned { why }));
            self.role = Role::Fenced;
            self.next_heartbeat = now;
            self.next_witness = now;
        }
    }

    /// Failback: a workload served here whose preferred node is the peer
    /// moves back once the peer has been in sync for the delay (not from a
    /// node in standby; a failed attempt waits [`FAILBACK_RETRY_MS`]).
    fn failback(&mut self, now: Millis, out: &mut Vec<Action>) {
        let Some(delay) = self.rules.failback_delay_ms else {
            return;
        };
        if self.standby {
            return;
        }
        let due = self.accepting_writes(now)
            && self.rules.preferred.as_deref() == Some(self.peer.as_str())
            && self.peer_in_sync;
        if !due {
            self.failback_since = None;
            return;
        }
        let since = *self.failback_since.get_or_insert(now);
        if now.saturating_sub(since) < delay || now < self.failback_blocked_until {
            return;
        }
        self.failback_blocked_until = Millis::MAX;
        out.push(Action::Failback);
    }

    /// The split-brain policy (unless `manual`): the node serving a copy
    /// found split from its live peer's asks for the peer's report, then
    /// decides ([`Input::PeerReport`]).
    fn split_brain_policy(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.rules.split_brain == SplitBrainPolicy::Manual {
            return;
        }
        let SplitBrainStep::Idle { not_before } = self.split_brain_step else {
            return;
        };
        if now >= not_before
            && now >= self.split_brain_quiet_until
            && self.split_brain_found
            && self.accepting_writes(now)
            && self.peer_alive(now)
        {
            self.split_brain_step = SplitBrainStep::Asking;
            out.push(Action::AskPeerReport);
        }
    }

    fn on_peer_heartbeat(
        &mut self,
        now: Millis,
        (sent_at, peer_incarnation): (Millis, u64),
        role: Role,
        epoch: u64,
        resigning: bool,
        out: &mut Vec<Action>,
    ) {
        match (self.role, role) {
            (Role::Secondary, Role::Primary | Role::Fenced) if !resigning => {
                if self.candidacy.is_some() {
                    // A failover is under way: no new grant until it ends.
                    return;
                }
                self.granted_until = self.granted_until.max(self.timing.grantor_end(now));
                out.push(Action::SendPeer(PeerMsg::Ack {
                    echo: sent_at,
                    incarnation: peer_incarnation,
                }));
                self.told_not_promoting = false;
            }
            (Role::Primary | Role::Fenced, Role::Primary) if epoch > self.epoch => {
                // The peer became primary after us: we were superseded.
                self.demote(Some(None), out);
            }
            _ => {}
        }
    }

    fn demote(&mut self, primary: Option<Option<String>>, out: &mut Vec<Action>) {
        if self.role == Role::Primary {
            out.push(Action::Fence);
        }
        self.role = Role::Secondary;
        self.resigning = false;
        self.peer_lease_end = 0;
        self.witness_lease_end = 0;
        self.writes_held = false;
        self.peer_outdated = false;
        // Writes this node took that never reached the new primary: resync.
        self.data = DataState::Inconsistent;
        out.push(Action::Demote);
        out.push(Action::Event(Event::Demoted {
            primary: primary.flatten(),
        }));
    }

    fn on_witness(&mut self, now: Millis, reply: WitnessReply, out: &mut Vec<Action>) {
        // Replies answer requests in the order they were sent (the witness
        // handles each node's requests in that order): an older one is late
        // or replayed, and must not undo what a newer one said.
        if self.newest_reply.is_some_and(|newest| reply.echo <= newest) {
            return;
        }
        // `Stale` answers a request the witness found no newer than one it
        // had already handled: a UDP duplicate, a replay of this node's own
        // datagram, a late one. The answer that counts went out for that
        // one, and may still be on its way (a grant, say). This one decides
        // nothing: it must neither end a candidacy nor, counted as the
        // answer to its echo, hide the real one (a granted Promote dropped
        // that way left the record naming this node primary while it
        // stayed a replica: cluster_sim seed 24,910). Only `UpToDate` is
        // refused `Stale` on its merits (the record's epoch moved on): its
        // record is learned below.
        if reply.refused == Some(Refusal::Stale) && reply.op != WitnessOp::UpToDate {
            return;
        }
        self.newest_reply = Some(reply.echo);
        self.witness_nonce = reply.nonce;
        self.witness_names_me = reply.record.primary.as_deref() == Some(self.me.as_str());
        self.record_epoch = self.record_epoch.max(reply.record.epoch);
        if reply.op == WitnessOp::Probe {
            return;
        }
        if reply.refused == Some(Refusal::Nonce) {
            // Nothing was done: ask again at once with the nonce just
            // learned (one round trip after a start of either side).
            if self.last_witness_sent == Some(reply.echo) {
                self.next_witness = now;
                if let Some(c) = self.candidacy.as_mut() {
                    if c.sent == Some(reply.echo) {
                        c.sent = None;
                    }
                }
            }
            return;
        }
        let record = &reply.record;
        let me_primary = record.primary.as_deref() == Some(self.me.as_str());
        match (reply.op, reply.refused) {
            (WitnessOp::Promote | WitnessOp::ForcePromote, None)
                if self.role == Role::Secondary && self.candidacy.is_some() =>
            {
                self.promoted_forced = self.candidacy.is_some_and(|c| c.forced);
                self.candidacy = None;
                self.role = Role::Primary;
                self.epoch = record.epoch;
                self.witness_lease_end = self.timing.holder_end(reply.echo);
                // The old primary is recorded outdated by the promotion.
                self.peer_outdated = true;
                out.push(Action::Promote);
                out.push(Action::Event(Event::Promoted {
                    epoch: record.epoch,
                }));
            }
            // Only the answer to the newest request counts: an older one
            // refused says nothing about a newer one still on its way.
            (WitnessOp::Promote | WitnessOp::ForcePromote, Some(why))
                if self.candidacy.is_some_and(|c| c.sent == Some(reply.echo)) =>
            {
                match why {
                    Refusal::Outdated => {
                        self.candidacy = None;
                        self.refused_outdated_until = now + self.timing.failure_timeout_ms;
                        if !self.told_not_promoting {
                            self.told_not_promoting = true;
                            out.push(Action::Event(Event::NotPromoting {
                                why: "the witness records this node outdated: the primary acknowledged writes it never received; promote by hand with --force only if losing them is acceptable".into(),
                            }));
                        }
                    }
                    // Handled above.
                    Refusal::Nonce | Refusal::Stale => {}
                    Refusal::LeaseHeld | Refusal::Quiet | Refusal::NotPrimary => {
                        if self.peer_alive(now) && !self.peer_resigning {
                            // The primary still renews (the link alone was
                            // cut): step back.
                            self.candidacy = None;
                        } else if let Some(c) = self.candidacy.as_mut() {
                            // Answered, so nothing is outstanding: ask again
                            // (the old lease may end any moment), not a
                            // failure timeout later. A resigning primary's
                            // release is on its way to the witness: ask
                            // again soon, doubling the wait each time (from
                            // 4 ms up to the heartbeat interval), instead of
                            // dropping the candidacy and starting a new one
                            // at once (which asked, and logged a failover,
                            // every witness round trip).
                            c.sent = None;
                            if self.peer_resigning {
                                c.retry_ms = (c.retry_ms * 2)
                                    .clamp(4, self.timing.heartbeat_interval_ms.max(4));
                                c.not_before = now + c.retry_ms;
                                self.next_witness = c.not_before;
                            }
                        }
                    }
                }
            }
            (op, None) if me_primary => {
                if record.outdated.as_deref() == Some(self.peer.as_str()) && self.peer_in_sync {
                    // A late Outdate landed after the peer was back in sync:
                    // say so again (the epoch check keeps this safe).
                    self.peer_up_to_date_pending = true;
                }
                if self.role == Role::Primary || self.role == Role::Fenced {
                    // A granted Release dropped the lease at the witness;
                    // and while resigning, or for a request sent before the
                    // resignation, nothing is lent either: resumed on such
                    // a lease once the resignation was abandoned, this node
                    // served while the witness had promoted the peer.
                    let lends = op != WitnessOp::Release
                        && !self.resigning
                        && self.lease_floor.is_none_or(|f| reply.echo > f);
                    if lends {
                        self.witness_lease_end = self
                            .witness_lease_end
                            .max(self.timing.holder_end(reply.echo));
                    }
                    self.epoch = self.epoch.max(record.epoch);
                }
                match op {
                    WitnessOp::Outdate
                        if self.role == Role::Primary
                            && self.last_up_to_date_sent.is_none_or(|u| reply.echo > u) =>
                    {
                        if !self.peer_outdated {
                            self.peer_outdated = true;
                            out.push(Action::Event(Event::PeerOutdated));
                        }
                        if self.writes_held {
                            self.writes_held = false;
                            out.push(Action::ReleaseWrites);
                        }
                    }
                    WitnessOp::UpToDate if self.last_up_to_date_sent == Some(reply.echo) => {
                        self.peer_up_to_date_pending = false;
                    }
                    _ => {}
                }
                if self.role == Role::Fenced
                    && !self.resigning
                    && now + self.timing.fence_margin() < self.lease_end()
                {
                    self.role = Role::Primary;
                    out.push(Action::Resume);
                    out.push(Action::Event(Event::Resumed));
                }
            }
            (_, Some(Refusal::NotPrimary))
                if matches!(self.role, Role::Primary | Role::Fenced)
                    && record.primary.as_deref().is_some_and(|p| p != self.me) =>
            {
                // Someone else was promoted: we are the old primary.
                self.demote(Some(record.primary.clone()), out);
            }
            _ => {}
        }
    }

    fn timers(&mut self, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        let t = self.timing;
        let alive = self.peer_alive(now);
        if !alive && !self.peer_lost && self.peer_last_heard.is_some() {
            self.peer_lost = true;
            out.push(Action::Event(Event::PeerLost));
        }
        // A never-heard peer counts as lost once a failure timeout passed.
        if self.peer_last_heard.is_none()
            && !self.peer_lost
            && now.saturating_sub(self.started_at) >= t.failure_timeout_ms
        {
            self.peer_lost = true;
        }

        if self.role == Role::Fenced
            && self.resigning
            && self
                .resigned_at
                .is_some_and(|r| now.saturating_sub(r) >= 4 * t.failure_timeout_ms)
        {
            // Nobody took the workload over (the peer is not up to date, in
            // standby, or gone): stop resigning; this node resumes if the
            // witness (or the peer) still lends it a lease.
            self.resigning = false;
            self.resigned_at = None;
            out.push(Action::Event(Event::ResignAbandoned));
        }
        match self.role {
            Role::Primary => self.tick_primary(now, &mut out),
            Role::Fenced => {}
            Role::Secondary => self.tick_secondary(now, &mut out),
        }
        if !self.accepting_writes(now) {
            self.check = CheckCount::default();
        }
        self.failback(now, &mut out);
        self.split_brain_policy(now, &mut out);

        if now >= self.next_heartbeat {
            self.next_heartbeat = now + t.heartbeat_interval_ms;
            out.push(Action::SendPeer(PeerMsg::Heartbeat {
                sent_at: now,
                incarnation: self.incarnation,
                nonce: self.nonces.current(now),
                echo_nonce: self.peer_nonce,
                role: self.role,
                epoch: self.epoch,
                resigning: self.resigning,
            }));
        }
        if self.policy.witness && now >= self.next_witness {
            if let Some(op) = self.witness_op(now) {
                self.next_witness = now + t.heartbeat_interval_ms;
                if op == WitnessOp::UpToDate {
                    // From this request on, going alone needs a new Outdate.
                    self.peer_outdated = false;
                    self.last_up_to_date_sent = Some(now);
                }
                // A forced one too: only the newest request's answer may
                // end a candidacy (before, a refused --force was never
                // matched and asked again forever, the replica held off).
                if let (WitnessOp::Promote | WitnessOp::ForcePromote, Some(c)) =
                    (op, self.candidacy.as_mut())
                {
                    c.sent = Some(now);
                }
                if op == WitnessOp::Probe {
                    self.next_probe = now + (t.lease_ms / 4).max(1);
                }
                self.last_witness_sent = Some(now);
                out.push(Action::SendWitness(WitnessRequest {
                    node: self.me.clone(),
                    peer: self.peer.clone(),
                    op,
                    sent_at: now,
                    incarnation: self.incarnation,
                    nonce: self.witness_nonce,
                    expect_epoch: self.record_epoch,
                }));
            }
        }
        out
    }

    fn witness_op(&self, now: Millis) -> Option<WitnessOp> {
        match self.role {
            // Outdate and UpToDate need the record to name this node
            // primary: a Renew claims a record that names nobody yet (a
            // workload just put under HA) or finds out who replaced it.
            Role::Primary if !self.witness_names_me => Some(WitnessOp::Renew),
            Role::Primary if self.writes_held => Some(WitnessOp::Outdate),
            // Only while the link says the replica is in sync and its
            // heartbeats arrive; a link loss cancels it (PeerNotUpToDate).
            Role::Primary
                if self.peer_up_to_date_pending && self.peer_in_sync && !self.peer_lost =>
            {
                Some(WitnessOp::UpToDate)
            }
            Role::Primary => Some(WitnessOp::Renew),
            Role::Fenced if self.resigning => Some(WitnessOp::Release),
            Role::Fenced => Some(WitnessOp::Renew),
            Role::Secondary => match self.candidacy {
                // One outstanding request at a time; resent (as a newer one)
                // if unanswered for a failure timeout.
                Some(c)
                    if now >= c.not_before
                        && c.sent
                            .is_none_or(|s| now >= s + self.timing.failure_timeout_ms) =>
                {
                    Some(if c.forced {
                        WitnessOp::ForcePromote
                    } else {
                        WitnessOp::Promote
                    })
                }
                Some(_) => None,
                // Keeps the witness's nonce fresh (it changes every lease
                // period), so a failover's first Promote counts.
                None if now >= self.next_probe => Some(WitnessOp::Probe),
                None => None,
            },
        }
    }

    fn tick_primary(&mut self, now: Millis, out: &mut Vec<Action>) {
        let t = self.timing;
        // The replica is gone for writes when its heartbeats stop, or when
        // the link has not been in sync for a failure timeout although they
        // go on (a dropped or stalled connection): either way writes would
        // wait for it forever, so outdate it first, then go on alone.
        let replica_gone = self.peer_lost
            || self
                .peer_unsynced_since
                .is_some_and(|s| now.saturating_sub(s) >= t.failure_timeout_ms);
        if replica_gone && !self.peer_outdated {
            if self.policy.sync && self.policy.witness {
                if !self.writes_held {
                    self.writes_held = true;
                    self.next_witness = now;
                    out.push(Action::HoldWrites);
                    out.push(Action::Event(Event::WritesHeld));
                }
            } else {
                // No witness to record it at: the replica can never promote
                // itself (safe mode), or split brain is accepted (unsafe).
                self.peer_outdated = true;
                out.push(Action::Event(Event::PeerOutdated));
            }
        }
        // A primary that just started has not had a round trip to get its
        // first lease yet: give it two intervals before fencing (it is not
        // accepting writes meanwhile: `accepting_writes` checks the lease).
        let starting = self.lease_end() == 0 && now < self.started_at + 2 * t.heartbeat_interval_ms;
        if self.policy.needs_lease() && !starting && now + t.fence_margin() >= self.lease_end() {
            // Without a witness (unsafe mode) a lone primary goes on without
            // its peer's lease: that is the risk the operator accepted.
            if !self.policy.witness && self.peer_lost {
                return;
            }
            self.role = Role::Fenced;
            self.writes_held = false;
            out.push(Action::Fence);
            out.push(Action::Event(Event::Fenced {
                why: if self.policy.witness {
                    "lease expired: neither the peer nor the witness renewed it".into()
                } else {
                    "lease expired: the peer did not renew it".into()
                },
            }));
        }
    }

    fn tick_secondary(&mut self, now: Millis, out: &mut Vec<Action>) {
        let peer_serving = self.peer_alive(now)
            && matches!(self.peer_role, Some(Role::Primary | Role::Fenced))
            && !self.peer_resigning;
        if let Some(c) = self.candidacy {
            if !self.policy.witness && now >= c.not_before {
                // Unsafe two-node mode: promote on our own, newer than any
                // epoch seen (the peer's too), so the older one demotes.
                self.promoted_forced = c.forced;
                self.candidacy = None;
                self.role = Role::Primary;
                self.epoch = self.epoch.max(self.peer_epoch) + 1;
                self.peer_outdated = true;
                out.push(Action::Promote);
                out.push(Action::Event(Event::Promoted { epoch: self.epoch }));
            }
            // With a witness, only its answer ends a candidacy: it may
            // already have promoted us, so granting the old primary a lease
            // again could let it serve while the record names us (and the
            // record, not the old primary, would then be believed).
            return;
        }
        if peer_serving || !self.peer_lost && self.peer_role.is_none() {
            return;
        }
        // The primary is silent, resigning, or the peer is a secondary too.
        let why_not = if self.standby {
            Some("this node is in standby (ferry cluster unstandby NODE)".to_string())
        } else if !self.policy.automatic_failover() {
            Some(if !self.policy.witness && !self.policy.two_node_unsafe {
                "no witness is configured and two_node_unsafe is off: fail over by hand".to_string()
            } else {
                "async workload without async_failover = \"accept-loss\": the replica may miss acknowledged writes".to_string()
            })
        } else if now < self.refused_outdated_until {
            Some("the witness records this node outdated: the primary acknowledged writes it never received".to_string())
        } else if self.data != DataState::UpToDate {
            Some(format!(
                "this node's copy is {}: promote by hand with --force only if losing writes is acceptable",
                match self.data {
                    DataState::Outdated => "outdated (the primary acknowledged writes it never received)",
                    DataState::Inconsistent => "inconsistent (a resync had not finished)",
                    DataState::UpToDate => "up-to-date",
                }
            ))
        } else {
            None
        };
        if let Some(why) = why_not {
            if !self.told_not_promoting && self.peer_lost {
                self.told_not_promoting = true;
                out.push(Action::Event(Event::NotPromoting { why }));
            }
            return;
        }
        // Stop granting; ask once our last grant has run out (a resigning
        // primary stopped writing before it said so).
        let not_before = if self.peer_resigning {
            now
        } else {
            self.granted_until
        };
        self.candidacy = Some(Candidacy {
            not_before,
            sent: None,
            forced: false,
            retry_ms: 0,
        });
        self.next_witness = now;
        out.push(Action::Event(Event::FailoverStarted {
            silent_ms: self
                .peer_last_heard
                .map_or(now.saturating_sub(self.started_at), |t| {
                    now.saturating_sub(t)
                }),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            heartbeat_interval_ms: 100,
            failure_timeout_ms: 500,
            lease_ms: 500,
            drift_permille: 50,
        }
    }

    /// Node `me` of a sync workload under a witness, started at 0 in
    /// `role` at epoch 1 with an up-to-date copy.
    fn witnessed_node(me: &str, peer: &str, role: Role) -> ClusterNode {
        let p = Policy {
            witness: true,
            two_node_unsafe: false,
            sync: true,
            async_accept_loss: false,
        };
        let saved = Persisted {
            role,
            epoch: 1,
            candidate: false,
        };
        ClusterNode::start(me, peer, 1, 7, saved, DataState::UpToDate, timing(), p, 0)
    }

    fn req(node: &str, op: WitnessOp, at: Millis) -> WitnessRequest {
        WitnessRequest {
            node: node.into(),
            peer: if node == "a" { "b".into() } else { "a".into() },
            op,
            sent_at: at,
            incarnation: 1,
            nonce: 0,
            expect_epoch: 0,
        }
    }

    /// `node` asks `op` at `at`, echoing the witness's current nonce.
    fn ask(w: &mut Witness, node: &str, op: WitnessOp, at: Millis) -> (WitnessReply, bool) {
        let mut r = req(node, op, at);
        r.nonce = w.nonce(at);
        w.handle(at, &r)
    }

    #[test]
    fn witness_refuses_promotion_while_the_primary_holds_a_lease() {
        let rec = Record {
            epoch: 1,
            primary: Some("a".into()),
            outdated: None,
        };
        let mut w = Witness::start(rec, timing(), 0, 99);
        // Quiet after a start.
        let (r, _) = ask(&mut w, "b", WitnessOp::Promote, 10);
        assert_eq!(r.refused, Some(Refusal::Quiet));
        let (r, _) = ask(&mut w, "a", WitnessOp::Renew, 600);
        assert_eq!(r.refused, None);
        let (r, _) = ask(&mut w, "b", WitnessOp::Promote, 1000);
        assert_eq!(r.refused, Some(Refusal::LeaseHeld));
        // 600 + 525 = 1125: the lease has run out.
        let (r, changed) = ask(&mut w, "b", WitnessOp::Promote, 1126);
        assert_eq!(r.refused, None);
        assert!(changed);
        assert_eq!(r.record.primary.as_deref(), Some("b"));
        assert_eq!(r.record.outdated.as_deref(), Some("a"));
        // The old primary is refused from now on.
        let (r, _) = ask(&mut w, "a", WitnessOp::Renew, 1200);
        assert_eq!(r.refused, Some(Refusal::NotPrimary));
    }

    #[test]
    fn outdate_and_promote_cannot_both_succeed() {
        let rec = Record {
            epoch: 1,
            primary: Some("a".into()),
            outdated: None,
        };
        let mut w = Witness::start(rec, timing(), 0, 99);
        let (r, _) = ask(&mut w, "a", WitnessOp::Outdate, 2000);
        assert_eq!(r.refused, None);
        let (r, _) = ask(&mut w, "b", WitnessOp::Promote, 9000);
        assert_eq!(r.refused, Some(Refusal::Outdated));
    }

    #[test]
    fn a_primary_fences_itself_before_its_lease_ends() {
        let mut a = witnessed_node("a", "b", Role::Primary);
        let _ = a.tick(0);
        let _ = a.on_input(
            5,
            Input::Witness(WitnessReply {
                echo: 0,
                incarnation: 1,
                op: WitnessOp::Renew,
                refused: None,
                record: Record {
                    epoch: 1,
                    primary: Some("a".into()),
                    outdated: None,
                },
                nonce: 5,
            }),
        );
        assert!(a.accepting_writes(10));
        let mut fenced_at = None;
        for now in (10..1000).step_by(5) {
            if a.tick(now).contains(&Action::Fence) {
                fenced_at = Some(now);
                break;
            }
        }
        let at = fenced_at.expect("fenced");
        assert!(at < timing().holder_end(0), "fenced at {at}");
        assert!(!a.accepting_writes(at));
    }

    #[test]
    fn a_refused_promotion_while_the_primary_resigns_is_asked_again_with_backoff() {
        let mut b = witnessed_node("b", "a", Role::Secondary);
        let record = Record {
            epoch: 1,
            primary: Some("a".into()),
            outdated: None,
        };
        let mut failovers = 0;
        let mut promotes = Vec::new();
        let mut pending: Option<Millis> = None;
        let mut promoted = false;
        // The primary resigns (a switchover) and keeps sending heartbeats;
        // its release reaches the witness only at 300 ms, so every Promote
        // before that is refused one millisecond after it was sent.
        for now in 0..400 {
            let mut out = Vec::new();
            if now % 100 == 0 {
                out.extend(b.on_input(
                    now,
                    Input::Peer(PeerMsg::Heartbeat {
                        sent_at: now,
                        incarnation: 7,
                        nonce: 3,
                        echo_nonce: b.nonce(now),
                        role: Role::Fenced,
                        epoch: 1,
                        resigning: true,
                    }),
                ));
            }
            if let Some(echo) = pending.filter(|&e| now > e) {
                pending = None;
                out.extend(b.on_input(
                    now,
                    Input::Witness(WitnessReply {
                        echo,
                        incarnation: 1,
                        op: WitnessOp::Promote,
                        refused: (now < 300).then_some(Refusal::LeaseHeld),
                        record: record.clone(),
                        nonce: 5,
                    }),
                ));
            }
            out.extend(b.tick(now));
            for a in out {
                match a {
                    Action::Event(Event::FailoverStarted { .. }) => failovers += 1,
                    Action::SendWitness(r) if r.op == WitnessOp::Promote => {
                        promotes.push(now);
                        pending = Some(r.sent_at);
                    }
                    Action::Promote => promoted = true,
                    _ => {}
                }
            }
        }
        assert!(promoted, "promoted once the witness granted it");
        assert_eq!(failovers, 1, "one failover, however often it asks");
        // 4, 8, 16, 32, 64, 100, 100 ms apart: not once per round trip.
        assert!((5..=12).contains(&promotes.len()), "asked at {promotes:?}");
        assert!(promotes[1] - promotes[0] >= 4, "asked at {promotes:?}");
    }

    fn heartbeat(sent_at: Millis, incarnation: u64, echo_nonce: u64) -> Input {
        Input::Peer(PeerMsg::Heartbeat {
            sent_at,
            incarnation,
            nonce: 11,
            echo_nonce,
            role: Role::Primary,
            epoch: 1,
            resigning: false,
        })
    }

    fn acks(out: &[Action]) -> usize {
        out.iter()
            .filter(|a| matches!(a, Action::SendPeer(PeerMsg::Ack { .. })))
            .count()
    }

    #[test]
    fn a_heartbeat_counts_once_and_only_if_it_echoes_the_receiver_s_current_nonce() {
        let mut b = witnessed_node("b", "a", Role::Secondary);
        let _ = b.tick(0);
        // Before a heard b's nonce: it teaches a's nonce, proves nothing.
        let out = b.on_input(10, heartbeat(10, 5, 0));
        assert_eq!(acks(&out), 0);
        assert!(!b.peer_alive(10));
        // b's next heartbeat echoes a's nonce.
        let out = b.tick(100);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::SendPeer(PeerMsg::Heartbeat { echo_nonce: 11, .. })
        )));
        let hb = heartbeat(110, 5, b.nonce(110));
        let out = b.on_input(111, hb.clone());
        assert_eq!(acks(&out), 1, "a fresh heartbeat earns a lease grant");
        assert!(b.peer_alive(111));
        // The same datagram again (another path, or a replay): nothing.
        let out = b.on_input(112, hb.clone());
        assert_eq!(acks(&out), 0);
        // An earlier run's heartbeat echoing the current nonce: nothing.
        assert_eq!(acks(&b.on_input(113, heartbeat(900, 4, b.nonce(113)))), 0);
        // Replayed for longer than the failure timeout, it keeps nobody alive.
        let mut lost = false;
        for now in (120..1000).step_by(10) {
            let mut out = b.on_input(now, hb.clone());
            out.extend(b.tick(now));
            lost |= out.contains(&Action::Event(Event::PeerLost));
        }
        assert!(lost && !b.peer_alive(1000));
        // A restarted receiver has other nonces: old echoes count for nothing.
        let mut b2 = witnessed_node("b", "a", Role::Secondary);
        b2.nonces = Nonces::new(8, 0, timing().lease_ms);
        let out = b2.on_input(120, heartbeat(130, 5, b.nonce(120)));
        assert_eq!(acks(&out), 0);
        assert!(!b2.peer_alive(120));
    }

    #[test]
    fn a_replayed_ack_keeps_no_peer_alive() {
        let mut a = witnessed_node("a", "b", Role::Primary);
        let _ = a.tick(0);
        let ack = Input::Peer(PeerMsg::Ack {
            echo: 0,
            incarnation: 1,
        });
        let _ = a.on_input(5, ack.clone());
        assert!(a.peer_alive(5) && a.lease_end() > 0);
        for now in (10..1000).step_by(10) {
            let _ = a.on_input(now, ack.clone());
            let _ = a.tick(now);
        }
        assert!(!a.peer_alive(1000), "a replayed Ack is not a sign of life");
    }

    #[test]
    fn a_request_with_an_old_nonce_is_sent_again_at_once_with_the_new_one() {
        let mut a = witnessed_node("a", "b", Role::Primary);
        let sent = |out: &[Action]| {
            out.iter()
                .find_map(|x| match x {
                    Action::SendWitness(r) => Some(r.clone()),
                    _ => None,
                })
                .expect("a witness request")
        };
        let first = sent(&a.tick(0));
        assert_eq!((first.op, first.nonce), (WitnessOp::Renew, 0));
        let out = a.on_input(
            3,
            Input::Witness(WitnessReply {
                echo: first.sent_at,
                incarnation: 1,
                op: WitnessOp::Renew,
                refused: Some(Refusal::Nonce),
                record: Record {
                    epoch: 1,
                    primary: Some("a".into()),
                    outdated: None,
                },
                nonce: 42,
            }),
        );
        let again = sent(&out);
        assert_eq!(
            (again.op, again.nonce, again.sent_at),
            (WitnessOp::Renew, 42, 3)
        );
    }

    #[test]
    fn a_secondary_keeps_the_witness_nonce_fresh() {
        let mut b = witnessed_node("b", "a", Role::Secondary);
        // Until the (silent) primary counts as lost at 500 ms.
        let probes: Vec<Millis> = (0..450)
            .filter(|&now| {
                b.tick(now)
                    .iter()
                    .any(|x| matches!(x, Action::SendWitness(r) if r.op == WitnessOp::Probe))
            })
            .collect();
        // Every lease / 4 (125 ms; at most every heartbeat interval).
        assert_eq!(probes, [0, 125, 250, 375]);
    }

    // ---- Policies as inputs and outputs (issue 19) ----

    const SYNCED: Member = Member {
        primary_here: true,
        streaming: true,
        peer_up_to_date: true,
        usable_here: true,
    };

    /// One step of a primary kept serving: its witness lease renewed and
    /// its peer heard (on the replication connection) at `now`.
    fn serve(n: &mut ClusterNode, now: Millis) -> Vec<Action> {
        let mut out = n.tick(now);
        out.extend(n.on_input(
            now,
            Input::Witness(WitnessReply {
                echo: now,
                incarnation: 1,
                op: WitnessOp::Renew,
                refused: None,
                record: Record {
                    epoch: 1,
                    primary: Some(n.me.clone()),
                    outdated: None,
                },
                nonce: 5,
            }),
        ));
        out.extend(n.on_input(now, Input::PeerSeen { at: now }));
        out
    }

    /// `a`, serving, with `rules`.
    fn serving_node(rules: Rules) -> ClusterNode {
        let mut a = witnessed_node("a", "b", Role::Primary);
        a.set_rules(rules);
        let _ = serve(&mut a, 1);
        assert!(a.accepting_writes(1));
        a
    }

    /// Serves from `from` to `to` every 50 ms; the times `pick` matched.
    fn serve_until(
        n: &mut ClusterNode,
        from: Millis,
        to: Millis,
        pick: impl Fn(&Action) -> bool,
    ) -> Vec<Millis> {
        let mut at = Vec::new();
        for now in (from..to).step_by(50) {
            if serve(n, now).iter().any(&pick) {
                at.push(now);
            }
        }
        at
    }

    #[test]
    fn the_in_sync_verdict_needs_every_member_served_here_streaming_and_up_to_date() {
        assert!(members_in_sync(&[SYNCED, SYNCED]));
        assert!(!members_in_sync(&[]), "a workload with no member");
        for broken in [
            Member {
                primary_here: false,
                ..SYNCED
            },
            Member {
                streaming: false,
                ..SYNCED
            },
            Member {
                peer_up_to_date: false,
                ..SYNCED
            },
        ] {
            assert!(!members_in_sync(&[SYNCED, broken]), "{broken:?}");
        }
        let replica = |usable_here| Member {
            primary_here: false,
            streaming: false,
            peer_up_to_date: false,
            usable_here,
        };
        assert_eq!(copy_state(&[SYNCED, replica(true)]), DataState::UpToDate);
        assert_eq!(
            copy_state(&[replica(true), replica(false)]),
            DataState::Inconsistent
        );
    }

    #[test]
    fn members_reports_feed_the_peer_s_state_on_each_change_only() {
        let mut a = serving_node(Rules::default());
        assert_eq!(a.members_in_sync(), None);
        // The first report counts even when not in sync: the replica has
        // been unsynced since (it is outdated after a failure timeout).
        let _ = a.on_input(
            10,
            Input::Members(vec![
                SYNCED,
                Member {
                    streaming: false,
                    ..SYNCED
                },
            ]),
        );
        assert_eq!(a.members_in_sync(), Some(false));
        assert_eq!(a.peer_unsynced_since, Some(10));
        let up = |out: &[Action]| out.contains(&Action::Event(Event::PeerUpToDate));
        assert!(up(&a.on_input(20, Input::Members(vec![SYNCED, SYNCED]))));
        assert!(
            !up(&a.on_input(30, Input::Members(vec![SYNCED, SYNCED]))),
            "no change"
        );
        assert_eq!(a.members_in_sync(), Some(true));
        let _ = a.on_input(40, Input::Members(vec![]));
        assert_eq!(a.members_in_sync(), Some(false));
        assert!(!a.peer_in_sync);
    }

    fn failback_rules() -> Rules {
        Rules {
            failback_delay_ms: Some(500),
            preferred: Some("b".into()),
            ..Rules::default()
        }
    }

    #[test]
    fn failback_starts_once_the_preferred_peer_was_in_sync_for_the_delay() {
        let is_failback = |a: &Action| *a == Action::Failback;
        let mut a = serving_node(failback_rules());
        // Not in sync yet: nothing.
        assert!(serve_until(&mut a, 50, 1000, is_failback).is_empty());
        let _ = a.on_input(1000, Input::Members(vec![SYNCED]));
        let at = serve_until(&mut a, 1000, 3000, is_failback);
        // Due from the first look after 1000, then 500 ms; once only while
        // the switchover runs.
        assert_eq!(at, [1500]);
        // It failed: again only FAILBACK_RETRY_MS later.
        let _ = a.on_input(2000, Input::FailbackDone { ok: false });
        let at = serve_until(&mut a, 3000, 40_000, is_failback);
        assert_eq!(at, [2000 + FAILBACK_RETRY_MS]);
        // Done (here: still serving, as if the peer gave it back): the next
        // one may start at once.
        let out = a.on_input(40_000, Input::FailbackDone { ok: true });
        assert!(out.contains(&Action::Failback));
    }

    #[test]
    fn failback_waits_for_an_unbroken_delay_and_never_without_its_conditions() {
        let is_failback = |a: &Action| *a == Action::Failback;
        // Out of sync in between: the delay starts again.
        let mut a = serving_node(failback_rules());
        let _ = a.on_input(0, Input::Members(vec![SYNCED]));
        assert!(serve_until(&mut a, 50, 400, is_failback).is_empty());
        let _ = a.on_input(400, Input::Members(vec![]));
        assert!(serve_until(&mut a, 400, 600, is_failback).is_empty());
        let _ = a.on_input(600, Input::Members(vec![SYNCED]));
        assert_eq!(serve_until(&mut a, 600, 1500, is_failback), [1100]);
        // Off, preferred here, or in standby: never.
        for rules in [
            Rules {
                failback_delay_ms: None,
                ..failback_rules()
            },
            Rules {
                preferred: Some("a".into()),
                ..failback_rules()
            },
            Rules {
                preferred: None,
                ..failback_rules()
            },
        ] {
            let mut a = serving_node(rules.clone());
            let _ = a.on_input(0, Input::Members(vec![SYNCED]));
            assert!(
                serve_until(&mut a, 50, 3000, is_failback).is_empty(),
                "{rules:?}"
            );
        }
        let mut a = serving_node(failback_rules());
        a.set_standby(true);
        let _ = a.on_input(0, Input::Members(vec![SYNCED]));
        assert!(
            serve_until(&mut a, 50, 3000, is_failback).is_empty(),
            "standby"
        );
        // A secondary (or a primary not serving) never fails back.
        let mut b = witnessed_node("b", "a", Role::Secondary);
        b.set_rules(Rules {
            preferred: Some("a".into()),
            ..failback_rules()
        });
        let _ = b.on_input(0, Input::Members(vec![SYNCED]));
        assert!((0..3000).all(|now| !b.tick(now).contains(&Action::Failback)));
    }

    fn resigned(out: &[Action]) -> Option<String> {
        out.iter().find_map(|a| match a {
            Action::Event(Event::Resigned { why }) => Some(why.clone()),
            _ => None,
        })
    }

    fn check(n: &mut ClusterNode, now: Millis, ok: bool) -> Option<String> {
        let _ = serve(n, now);
        resigned(&n.on_input(
            now,
            Input::Check {
                ok,
                output: "starting\napp down ".into(),
            },
        ))
    }

    #[test]
    fn a_failing_check_resigns_only_after_rise_passes_then_fall_failures() {
        let rules = Rules {
            check_rise: 2,
            check_fall: 3,
            ..Rules::default()
        };
        let mut a = serving_node(rules.clone());
        // Failures before the application was ever up: nothing.
        for now in [100, 200, 300, 400] {
            assert_eq!(check(&mut a, now, false), None);
        }
        // Up after two passes; two failures, a pass (resets), two failures.
        for (now, ok) in [
            (500, true),
            (600, true),
            (700, false),
            (800, false),
            (900, true),
            (1000, false),
            (1100, false),
        ] {
            assert_eq!(check(&mut a, now, ok), None, "at {now}");
        }
        let why = check(&mut a, 1200, false).expect("third failure in a row resigns");
        assert_eq!(why, "the check hook failed 3 times in a row: app down");
        assert_eq!(a.role(), Role::Fenced);
        assert!(!a.accepting_writes(1200));

        // A result arriving when not serving counts for nothing, and
        // serving again starts the counts over.
        let mut a = serving_node(rules);
        for now in [100, 200] {
            assert_eq!(check(&mut a, now, true), None);
        }
        assert_eq!(check(&mut a, 300, false), None);
        assert_eq!(check(&mut a, 400, false), None);
        // The lease runs out (no renewal): fenced; results are ignored.
        let out: Vec<Action> = (450..1000)
            .step_by(10)
            .flat_map(|now| a.tick(now))
            .collect();
        assert!(out.contains(&Action::Fence));
        assert_eq!(
            resigned(&a.on_input(
                1000,
                Input::Check {
                    ok: false,
                    output: String::new()
                }
            )),
            None
        );
        assert_eq!(a.check, CheckCount::default());
    }

    #[test]
    fn disk_errors_resign_a_serving_node_and_the_first_count_is_a_baseline() {
        let mut a = serving_node(Rules::default());
        // Errors counted before this node took the workload: a baseline.
        assert_eq!(
            resigned(&a.on_input(10, Input::IoErrors { total: 4 })),
            None
        );
        assert_eq!(
            resigned(&a.on_input(20, Input::IoErrors { total: 4 })),
            None
        );
        let why = resigned(&a.on_input(30, Input::IoErrors { total: 5 })).expect("resigned");
        assert_eq!(why, "5 disk I/O error(s) on the workload's volumes here");
        assert_eq!(a.role(), Role::Fenced);
        // A secondary counts them but hands nothing over.
        let mut b = witnessed_node("b", "a", Role::Secondary);
        let _ = b.on_input(10, Input::IoErrors { total: 0 });
        assert_eq!(
            resigned(&b.on_input(20, Input::IoErrors { total: 9 })),
            None
        );
        assert_eq!(b.io_errors_seen, Some(9));
    }

    fn split_rules(policy: SplitBrainPolicy) -> Rules {
        Rules {
            split_brain: policy,
            ..Rules::default()
        }
    }

    fn verdict(out: &[Action]) -> Option<Verdict> {
        out.iter().find_map(|a| match a {
            Action::SplitBrain { verdict, .. } => Some(verdict.clone()),
            _ => None,
        })
    }

    fn asks(out: &[Action]) -> bool {
        out.contains(&Action::AskPeerReport)
    }

    /// Reports the copy split; whether that asked the peer at once.
    fn diverged(n: &mut ClusterNode, now: Millis, changed_bytes: u64) -> bool {
        asks(&n.on_input(
            now,
            Input::Diverged {
                split_brain: true,
                changed_bytes,
            },
        ))
    }

    fn report(node: &str, changed_bytes: u64) -> Input {
        Input::PeerReport(Ok(SideReport {
            node: node.into(),
            changed_bytes,
        }))
    }

    #[test]
    fn the_split_brain_policy_asks_the_peer_then_keeps_the_copy_its_rule_names() {
        // discard-younger-primary: the serving node is the younger one.
        let mut a = serving_node(split_rules(SplitBrainPolicy::DiscardYoungerPrimary));
        assert!(!asks(&serve(&mut a, 50)), "nothing found split yet");
        assert!(diverged(&mut a, 60, 100), "asked at once");
        assert!(!asks(&serve(&mut a, 100)), "one question at a time");
        let v = verdict(&a.on_input(160, report("b", 5))).expect("a verdict");
        assert!(
            matches!(&v, Verdict::Keep { node, .. } if node == "b"),
            "{v:?}"
        );
        assert!(
            serve_until(&mut a, 200, 2000, |x| asks(std::slice::from_ref(x))).is_empty(),
            "resolving"
        );
        let _ = a.on_input(2000, Input::SplitBrainDone { ok: false });
        assert_eq!(
            serve_until(&mut a, 2000, 2400, |x| asks(std::slice::from_ref(x))),
            [2250]
        );

        // discard-least-changes, both ways, from the typed reports.
        for (mine, theirs, keep) in [(10, 5, "a"), (5, 10, "b"), (7, 7, "a")] {
            let mut a = serving_node(split_rules(SplitBrainPolicy::DiscardLeastChanges));
            assert!(diverged(&mut a, 10, mine));
            let v = verdict(&a.on_input(60, report("b", theirs))).expect("a verdict");
            assert!(
                matches!(&v, Verdict::Keep { node, .. } if node == keep),
                "{mine} {theirs}: {v:?}"
            );
        }
    }

    #[test]
    fn the_split_brain_policy_never_guesses_and_stays_quiet_where_it_must() {
        // The peer could not be asked: left to an operator, asked again later.
        let mut a = serving_node(split_rules(SplitBrainPolicy::DiscardLeastChanges));
        assert!(diverged(&mut a, 10, 10));
        let v = verdict(&a.on_input(60, Input::PeerReport(Err("connection refused".into()))));
        assert!(
            matches!(&v, Some(Verdict::Manual { why }) if why.contains("connection refused")),
            "{v:?}"
        );
        assert_eq!(
            serve_until(&mut a, 100, 400, |x| asks(std::slice::from_ref(x))),
            [60 + SPLIT_BRAIN_RETRY_MS + 40]
        );
        // A report arriving after serving ended decides nothing.
        let mut a = serving_node(split_rules(SplitBrainPolicy::DiscardYoungerPrimary));
        assert!(diverged(&mut a, 10, 10));
        let _ = a.on_input(
            60,
            Input::Resign {
                why: "switchover".into(),
            },
        );
        assert_eq!(verdict(&a.on_input(70, report("b", 0))), None);
        // A report nobody asked for decides nothing either.
        let mut a = serving_node(split_rules(SplitBrainPolicy::DiscardYoungerPrimary));
        assert_eq!(verdict(&a.on_input(20, report("b", 0))), None);
        // manual: never asks.
        let mut a = serving_node(split_rules(SplitBrainPolicy::Manual));
        assert!(!diverged(&mut a, 10, 10));
        assert!(serve_until(&mut a, 50, 2000, |x| asks(std::slice::from_ref(x))).is_empty());
        // Not while the peer is silent (it cannot be rebased).
        let mut a = serving_node(split_rules(SplitBrainPolicy::DiscardYoungerPrimary));
        a.peer_last_heard = None;
        assert!(!diverged(&mut a, 10, 10));
        assert!(!asks(&a.tick(50)));
        // Promoted by the peer's policy: quiet for POLICY_PROMOTED_QUIET_MS.
        let mut b = witnessed_node("b", "a", Role::Secondary);
        b.set_rules(split_rules(SplitBrainPolicy::DiscardYoungerPrimary));
        let _ = b.on_input(0, Input::ForcePromote { by_policy: true });
        assert_eq!(b.split_brain_quiet_until, POLICY_PROMOTED_QUIET_MS);
        b.role = Role::Primary;
        assert!(!diverged(&mut b, 10, 10));
        let at = serve_until(&mut b, 50, POLICY_PROMOTED_QUIET_MS + 100, |x| {
            asks(std::slice::from_ref(x))
        });
        assert_eq!(at, [POLICY_PROMOTED_QUIET_MS], "{at:?}");
    }

    #[test]
    fn a_forced_promotion_refused_while_the_primary_serves_ends_its_candidacy() {
        let mut b = witnessed_node("b", "a", Role::Secondary);
        // a is silent: the operator's --force is taken.
        let out = b.on_input(0, Input::ForcePromote { by_policy: false });
        assert!(out.contains(&Action::Event(Event::FailoverStarted { silent_ms: 0 })));
        // a comes back and renews at the witness, which refuses b.
        let _ = b.on_input(
            10,
            Input::Peer(PeerMsg::Heartbeat {
                sent_at: 10,
                incarnation: 3,
                nonce: 11,
                echo_nonce: b.nonce(10),
                role: Role::Primary,
                epoch: 1,
                resigning: false,
            }),
        );
        let mut sent = None;
        for now in 10..1000 {
            for a in b.tick(now) {
                if let Action::SendWitness(r) = a {
                    if r.op == WitnessOp::ForcePromote {
                        sent = Some(r.sent_at);
                    }
                }
            }
            if sent.is_some() {
                break;
            }
        }
        let echo = sent.expect("asked the witness");
        // a still renews, and its heartbeats arrive.
        let _ = b.on_input(
            echo,
            Input::Peer(PeerMsg::Heartbeat {
                sent_at: echo,
                incarnation: 3,
                nonce: 11,
                echo_nonce: b.nonce(echo),
                role: Role::Primary,
                epoch: 1,
                resigning: false,
            }),
        );
        let _ = b.on_input(
            echo + 1,
            Input::Witness(WitnessReply {
                echo,
                incarnation: 1,
                op: WitnessOp::ForcePromote,
                refused: Some(Refusal::LeaseHeld),
                record: Record {
                    epoch: 1,
                    primary: Some("a".into()),
                    outdated: None,
                },
                nonce: 5,
            }),
        );
        assert!(
            !b.is_candidate(),
            "a refused --force while a serves ends it"
        );
    }

    /// cluster_sim seed 24,910: the witness grants b's Promote; a copy of
    /// that request (a UDP duplicate, or an adversary's replay) reaches the
    /// witness after it and is answered `Stale`; that answer reaches b
    /// first, just after a (back from a crash, unaware it was replaced)
    /// was heard again. b took the `Stale` for a refusal: it ended its
    /// candidacy (the primary is alive) and, the echo counted as answered,
    /// dropped the grant when it came. The record named b primary and a
    /// outdated — a demoted itself on it — and nobody served.
    #[test]
    fn a_duplicate_s_stale_answer_neither_ends_a_candidacy_nor_hides_its_grant() {
        let rec = Record {
            epoch: 1,
            primary: Some("a".into()),
            outdated: None,
        };
        let mut w = Witness::start(rec, timing(), 0, 99);
        let mut b = witnessed_node("b", "a", Role::Secondary);
        // Replies due at b: (at, order, reply).
        let mut to_b: Vec<(Millis, u8, WitnessReply)> = Vec::new();
        let mut heartbeat_at: Option<Millis> = None;
        let mut duplicated = false;
        let mut promoted = false;
        for now in 0..2000 {
            let mut out = Vec::new();
            // a's heartbeats, from then on (it still renews nowhere but
            // with b: it is cut from the witness).
            if heartbeat_at.is_some_and(|at| now >= at && (now - at) % 100 == 0) {
                out.extend(b.on_input(
                    now,
                    Input::Peer(PeerMsg::Heartbeat {
                        sent_at: now,
                        incarnation: 3,
                        nonce: 11,
                        echo_nonce: b.nonce(now),
                        role: Role::Primary,
                        epoch: 1,
                        resigning: false,
                    }),
                ));
            }
            to_b.sort_by_key(|(at, order, _)| (*at, *order));
            while to_b.first().is_some_and(|(at, _, _)| *at <= now) {
                let (_, _, reply) = to_b.remove(0);
                out.extend(b.on_input(now, Input::Witness(reply)));
            }
            out.extend(b.tick(now));
            for a in out {
                match a {
                    Action::SendWitness(req) => {
                        let (reply, _) = w.handle(now, &req);
                        let granted_promote =
                            req.op == WitnessOp::Promote && reply.refused.is_none();
                        if granted_promote && !duplicated {
                            duplicated = true;
                            // The copy's answer, then a's heartbeat, reach
                            // b before the grant does.
                            let (stale, changed) = w.handle(now + 1, &req);
                            assert_eq!(stale.refused, Some(Refusal::Stale));
                            assert!(!changed);
                            assert_eq!(stale.record.primary.as_deref(), Some("b"));
                            heartbeat_at = Some(now + 2);
                            to_b.push((now + 3, 0, stale));
                            to_b.push((now + 5, 1, reply));
                        } else {
                            to_b.push((now + 1, 0, reply));
                        }
                    }
                    Action::Promote => promoted = true,
                    _ => {}
                }
            }
            if promoted {
                break;
            }
        }
        assert!(duplicated, "the witness granted b's Promote");
        assert_eq!(w.record.primary.as_deref(), Some("b"));
        assert!(promoted, "the record names b primary: b must serve");
        assert_eq!(b.role(), Role::Primary);
    }

    /// cluster_sim seed (async, operator, discard-least-changes): a
    /// resigned (its split-brain policy kept b's copy); b did not take
    /// over within four failure timeouts, so a abandoned the resignation.
    /// Meanwhile the witness, which a's Release had made drop a's lease,
    /// promoted b by force. The answer to a's last Release, late, was taken
    /// as a lease: a resumed serving while the record named b.
    #[test]
    fn a_released_lease_is_not_served_on_after_the_resignation_is_abandoned() {
        let rec = Record {
            epoch: 1,
            primary: Some("a".into()),
            outdated: None,
        };
        let mut w = Witness::start(rec, timing(), 0, 99);
        let mut a = witnessed_node("a", "b", Role::Primary);
        let resign_at: Millis = 1000;
        let abandon_at = resign_at + 4 * timing().failure_timeout_ms;
        let mut to_a: Vec<(Millis, WitnessReply)> = Vec::new();
        let mut held: Option<WitnessReply> = None;
        let mut served_after_resign = Vec::new();
        for now in 0..abandon_at + 1000 {
            let mut out = Vec::new();
            if now == resign_at {
                assert!(a.accepting_writes(now), "a serves before it resigns");
                out.extend(a.on_input(now, Input::Resign { why: "test".into() }));
            }
            if now == abandon_at + 1 {
                let reply = held.take().expect("a Release was held back");
                out.extend(a.on_input(now, Input::Witness(reply)));
            }
            to_a.sort_by_key(|(at, _)| *at);
            while to_a.first().is_some_and(|(at, _)| *at <= now) {
                let (_, reply) = to_a.remove(0);
                out.extend(a.on_input(now, Input::Witness(reply)));
            }
            out.extend(a.tick(now));
            for x in out {
                if let Action::SendWitness(req) = x {
                    let (reply, _) = w.handle(now, &req);
                    let last_release = req.op == WitnessOp::Release
                        && reply.refused.is_none()
                        && now + timing().heartbeat_interval_ms >= abandon_at;
                    if last_release && held.is_none() {
                        // The witness holds no lease of a's now: b is
                        // promoted by force (the policy's, an operator's).
                        let (r, _) = ask(&mut w, "b", WitnessOp::ForcePromote, now + 1);
                        assert_eq!(r.refused, None);
                        held = Some(reply);
                    } else {
                        to_a.push((now + 5, reply));
                    }
                }
            }
            if now > resign_at && a.accepting_writes(now) {
                served_after_resign.push(now);
            }
        }
        assert_eq!(w.record.primary.as_deref(), Some("b"));
        assert!(
            served_after_resign.is_empty(),
            "a served at {:?} while the witness named b",
            served_after_resign.first()
        );
        assert_eq!(a.role(), Role::Secondary, "a learns it was replaced");
    }
}
