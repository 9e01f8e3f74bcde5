//! Deterministic simulation of a two-node HA cluster with a witness: the
//! real `ClusterNode` and `Witness` state machines, driven by a simulated
//! network (delay, loss, partitions), clocks with bounded drift, process
//! pauses, crashes and restarts — thousands of seeded schedules.
//!
//! Checked at every step:
//! - never two nodes accepting writes for the workload;
//! - a node that starts accepting writes holds every acknowledged write
//!   (sync mode: no acknowledged write lost);
//! - after the faults stop: one primary accepting writes and an up-to-date
//!   secondary holding the same data.
//!
//! An adversary records every datagram and, in some schedules, sends old
//! ones again (to the node or witness they were meant for, even across a
//! cut link): replays must change none of the above. A separate test
//! replays a crashed primary's datagrams and checks that the failover still
//! happens within its normal time.
//!
//! A failure prints its seed; replay it with
//! `FERRY_SIM_SEED=N cargo test -p ferry-core --test cluster_sim`.
//! `FERRY_SIM_SEEDS=N` runs more schedules (`FERRY_SIM_FIRST=K`: seeds K..N,
//! to resume a long run).

use std::collections::BTreeSet;

use ferry_core::cluster::{
    Action, ClusterNode, DataState, Input, Member, Millis, PeerMsg, Persisted, Policy, Record,
    Role, Rules, Timing, Witness, WitnessReply, WitnessRequest,
};
use ferry_core::generation::{GenerationHistory, Relation};
use ferry_core::split_brain::{SideReport, SplitBrainPolicy, Verdict};

/// splitmix64: small, seedable, good enough for schedules.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const A: usize = 0;
const B: usize = 1;
const W: usize = 2;
const NAMES: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Payload {
    Peer(PeerMsg),
    ToWitness(WitnessRequest),
    FromWitness(WitnessReply),
}

#[derive(Debug, Clone)]
struct Msg {
    at: Millis,
    from: usize,
    to: usize,
    payload: Payload,
    /// Sent again by the adversary: it reaches its receiver whatever the
    /// links between the original sender and the receiver.
    replay: bool,
}

/// Datagrams the adversary keeps for replaying.
const CAPTURED_MAX: usize = 4096;

/// What survives a crash.
#[derive(Debug, Clone)]
struct Disk {
    saved: Persisted,
    /// The node's run counter, incremented at each start.
    incarnation: u64,
    data_state: DataState,
    data: BTreeSet<u64>,
    /// The copy's generation history (persisted with the volume).
    gen: GenerationHistory,
    /// Writes taken here since the copies were last known equal (the
    /// dirty map, in writes; a changed block is 4 KiB in the reports).
    dirty: u64,
    /// A new generation was started since the replica was last connected
    /// (a primary starts one before its first write acknowledged alone).
    fresh: bool,
}

struct SimNode {
    core: Option<ClusterNode>,
    disk: Disk,
    /// Local clock: offset + t × (1000 + rate) / 1000.
    offset: u64,
    rate: i64,
    paused_until: Millis,
    down_until: Millis,
    tick_phase: u64,
    was_accepting: bool,
}

impl SimNode {
    fn local(&self, t: Millis) -> Millis {
        (self.offset as i64 + t as i64 * (1000 + self.rate) / 1000) as Millis
    }
    fn running(&self, t: Millis) -> bool {
        self.core.is_some() && t >= self.paused_until
    }
}

struct Sim {
    rng: Rng,
    timing: Timing,
    policy: Policy,
    nodes: [SimNode; 2],
    witness: Option<Witness>,
    witness_record: Record,
    witness_down_until: Millis,
    witness_clock_offset: u64,
    witness_rate: i64,
    /// Links cut until: [A-B, A-W, B-W].
    cut_until: [Millis; 3],
    loss_per_mille: u64,
    delay_max: Millis,
    inflight: Vec<Msg>,
    acked: BTreeSet<u64>,
    next_write: u64,
    /// Replication connection: since when (for the resync model).
    connected_since: Option<Millis>,
    resync_ms: Millis,
    log: Vec<String>,
    /// This schedule has an operator forcing promotions now and then.
    operator: bool,
    /// A promotion was forced: losing writes is then allowed (the operator
    /// accepted it), and a split brain may remain for the operator; two
    /// writers at once never are.
    forced: bool,
    /// Every datagram sent (the newest `CAPTURED_MAX`), for replays.
    captured: Vec<Msg>,
    /// Per mille of milliseconds in which one captured datagram is replayed.
    replay_per_mille: u64,
    rules: Rules,
    /// The replication link found the histories split (until resolved).
    split: bool,
    /// Data a split-brain resolution set aside (the discarded copies).
    kept: BTreeSet<u64>,
    /// When each node was last promoted (0: primary from the start).
    promoted_at: [Millis; 2],
    /// Inputs due later: (at, node, input) — answers of the agent's threads.
    pending: Vec<(Millis, usize, Input)>,
    /// The peer's report each node was last sent, for checking verdicts.
    report_sent: [Option<u64>; 2],
    /// A node the split-brain policy wants promoted by force: asked again
    /// every heartbeat until it serves, or until the deadline.
    force_wanted: Option<(usize, Millis)>,
    /// A split-brain policy kept the peer's copy: this node's history is
    /// rebased when it is demoted (memory only: a crash forgets it).
    discard_on_demote: [bool; 2],
    stats: Stats,
    /// The schedule's seed (printed with every failure).
    seed: u64,
}

/// What a schedule went through (the suite checks each kind was covered).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    split_brains: u64,
    kept_by_younger_primary: u64,
    kept_by_least_changes: u64,
    kept_by_operator: u64,
    failbacks: u64,
    async_promotions: u64,
    forced: u64,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        self.split_brains += o.split_brains;
        self.kept_by_younger_primary += o.kept_by_younger_primary;
        self.kept_by_least_changes += o.kept_by_least_changes;
        self.kept_by_operator += o.kept_by_operator;
        self.failbacks += o.failbacks;
        self.async_promotions += o.async_promotions;
        self.forced += o.forced;
    }
}

fn link(a: usize, b: usize) -> usize {
    match (a.min(b), a.max(b)) {
        (A, B) => 0,
        (A, W) => 1,
        _ => 2,
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let presets = [
            Timing {
                heartbeat_interval_ms: 50,
                failure_timeout_ms: 250,
                lease_ms: 250,
                drift_permille: 50,
            },
            Timing {
                heartbeat_interval_ms: 100,
                failure_timeout_ms: 600,
                lease_ms: 500,
                drift_permille: 30,
            },
        ];
        let timing = presets[rng.below(2) as usize];
        // A quarter of the schedules replicate asynchronously and fail
        // over accepting the loss (`async_failover = "accept-loss"`).
        let sync = (seed / 12) % 4 != 0;
        let policy = Policy {
            witness: true,
            two_node_unsafe: false,
            sync,
            async_accept_loss: !sync,
        };
        let rules = Rules {
            // Half fail back to a, the preferred node.
            failback_delay_ms: ((seed / 48) % 2 == 0).then_some(1000),
            preferred: Some("a".into()),
            split_brain: [
                SplitBrainPolicy::Manual,
                SplitBrainPolicy::DiscardYoungerPrimary,
                SplitBrainPolicy::DiscardLeastChanges,
            ][((seed / 4) % 3) as usize],
            check_rise: 2,
            check_fall: 3,
        };
        let drift = timing.drift_permille as i64 - 1;
        let mk = |rng: &mut Rng, role: Role| SimNode {
            core: None,
            disk: Disk {
                saved: Persisted {
                    role,
                    epoch: 1,
                    candidate: false,
                },
                incarnation: 0,
                data_state: DataState::UpToDate,
                data: BTreeSet::new(),
                gen: GenerationHistory::with_current(1),
                dirty: 0,
                fresh: false,
            },
            offset: rng.below(1_000_000),
            rate: rng.below(2 * drift as u64 + 1) as i64 - drift,
            paused_until: 0,
            down_until: 0,
            tick_phase: rng.below(5),
            was_accepting: false,
        };
        let na = mk(&mut rng, Role::Primary);
        let nb = mk(&mut rng, Role::Secondary);
        let record = Record {
            epoch: 1,
            primary: Some("a".into()),
            outdated: None,
        };
        let witness_clock_offset = rng.below(1_000_000);
        let witness_rate = rng.below(2 * drift as u64 + 1) as i64 - drift;
        let mut sim = Sim {
            rng,
            timing,
            policy,
            nodes: [na, nb],
            witness: None,
            witness_record: record.clone(),
            witness_down_until: 0,
            witness_clock_offset,
            witness_rate,
            cut_until: [0; 3],
            loss_per_mille: 0,
            delay_max: 5,
            inflight: Vec::new(),
            acked: BTreeSet::new(),
            next_write: 1,
            connected_since: None,
            resync_ms: 100,
            log: Vec::new(),
            operator: seed % 4 == 3,
            forced: false,
            captured: Vec::new(),
            replay_per_mille: if seed % 3 == 1 { 200 } else { 0 },
            rules,
            split: false,
            kept: BTreeSet::new(),
            promoted_at: [0; 2],
            pending: Vec::new(),
            report_sent: [None; 2],
            force_wanted: None,
            discard_on_demote: [false; 2],
            stats: Stats::default(),
            seed,
        };
        let key = sim.rng.next();
        sim.witness = Some(Witness::start(record, timing, sim.witness_local(0), key));
        for i in [A, B] {
            sim.start_node(i, 0);
        }
        sim
    }

    fn witness_local(&self, t: Millis) -> Millis {
        (self.witness_clock_offset as i64 + t as i64 * (1000 + self.witness_rate) / 1000) as Millis
    }

    fn start_node(&mut self, i: usize, t: Millis) {
        let nonce_key = self.rng.next();
        self.nodes[i].disk.incarnation += 1;
        let n = &self.nodes[i];
        let now = n.local(t);
        let core = ClusterNode::start(
            NAMES[i],
            NAMES[1 - i],
            n.disk.incarnation,
            nonce_key,
            n.disk.saved,
            n.disk.data_state,
            self.timing,
            self.policy,
            now,
        );
        let mut core = core;
        core.set_rules(self.rules.clone());
        self.nodes[i].core = Some(core);
        self.nodes[i].was_accepting = false;
    }

    fn send(&mut self, t: Millis, from: usize, to: usize, payload: Payload) {
        if self.rng.chance(self.loss_per_mille) {
            return;
        }
        let at = t + 1 + self.rng.below(self.delay_max);
        let m = Msg {
            at,
            from,
            to,
            payload,
            replay: false,
        };
        if self.captured.len() < CAPTURED_MAX {
            self.captured.push(m.clone());
        } else {
            let k = self.rng.below(CAPTURED_MAX as u64) as usize;
            self.captured[k] = m.clone();
        }
        self.inflight.push(m);
    }

    /// The adversary sends one captured datagram again, now.
    fn replay(&mut self, t: Millis) {
        if self.captured.is_empty() || !self.rng.chance(self.replay_per_mille) {
            return;
        }
        let k = self.rng.below(self.captured.len() as u64) as usize;
        let mut m = self.captured[k].clone();
        m.at = t;
        m.replay = true;
        self.inflight.push(m);
    }

    fn perform(&mut self, t: Millis, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::SendPeer(m) => self.send(t, i, 1 - i, Payload::Peer(m)),
                Action::SendWitness(r) => self.send(t, i, W, Payload::ToWitness(r)),
                Action::Persist(p) => self.nodes[i].disk.saved = p,
                Action::Promote => {
                    // A new data history starts with every promotion.
                    let id = self.rng.next() | 1;
                    let d = &mut self.nodes[i].disk;
                    d.gen.bump(id);
                    d.fresh = true;
                    self.promoted_at[i] = t;
                    if !self.policy.sync {
                        self.stats.async_promotions += 1;
                    }
                    self.log
                        .push(format!("t={t} {} promoted ({id:x})", NAMES[i]));
                }
                Action::Demote => {
                    if std::mem::take(&mut self.discard_on_demote[i]) {
                        self.rebase(t, i);
                    }
                    self.nodes[i].disk.data_state = DataState::Inconsistent;
                    self.log.push(format!("t={t} {} demoted", NAMES[i]));
                }
                Action::Fence => self.log.push(format!("t={t} {} fenced", NAMES[i])),
                Action::Resume => {
                    // Serving again (the resignation was abandoned): the
                    // copy set aside lacks what is written from now on, so
                    // a later demotion must not discard it (as the agent's
                    // resume job does: the split brain stays and the
                    // policy runs again, setting a new copy aside).
                    self.discard_on_demote[i] = false;
                    self.log.push(format!("t={t} {} resumed", NAMES[i]))
                }
                Action::HoldWrites | Action::ReleaseWrites => {}
                Action::Failback => {
                    // A switchover to the peer: this node resigns; the
                    // outcome is reported once the takeover had its chance.
                    self.stats.failbacks += 1;
                    self.log.push(format!("t={t} {} FAILBACK", NAMES[i]));
                    self.input(
                        t,
                        i,
                        Input::Resign {
                            why: "failback".into(),
                        },
                    );
                    let done = t + 4 * self.timing.failure_timeout_ms;
                    self.pending
                        .push((done, i, Input::FailbackDone { ok: true }));
                }
                Action::AskPeerReport => {
                    // Over the API: answered if the peer runs and is
                    // reachable, else an error (never "no changes").
                    let o = 1 - i;
                    let at = t + 1 + self.rng.below(self.delay_max);
                    let report = if self.nodes[o].running(t) && self.link_up(t, i, o) {
                        self.report_sent[i] = Some(self.nodes[o].disk.dirty * 4096);
                        Ok(SideReport {
                            node: NAMES[o].into(),
                            changed_bytes: self.nodes[o].disk.dirty * 4096,
                        })
                    } else {
                        Err(format!("{} does not answer", NAMES[o]))
                    };
                    self.pending.push((at, i, Input::PeerReport(report)));
                }
                Action::SplitBrain { policy, verdict } => {
                    self.log
                        .push(format!("t={t} {} {policy} {verdict:?}", NAMES[i]));
                    if let Verdict::Keep { node, .. } = verdict {
                        let keep = if node == NAMES[i] { i } else { 1 - i };
                        self.check_verdict(t, i, keep, policy);
                        let ok = self.resolve(t, keep, i);
                        self.pending.push((t + 1, i, Input::SplitBrainDone { ok }));
                    }
                }
                Action::Event(e) => self.log.push(format!("t={t} {} {e:?}", NAMES[i])),
            }
        }
    }

    fn input(&mut self, t: Millis, i: usize, input: Input) {
        let now = self.nodes[i].local(t);
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let actions = core.on_input(now, input);
        self.perform(t, i, actions);
    }

    /// The verdict `serving` reached keeps `keep`'s copy: right by its rule?
    fn check_verdict(&mut self, t: Millis, serving: usize, keep: usize, policy: SplitBrainPolicy) {
        let mine = self.nodes[serving]
            .core
            .as_ref()
            .map_or(0, |c| c.changed_bytes());
        let theirs = self.report_sent[serving].expect("a verdict without a report");
        match policy {
            SplitBrainPolicy::DiscardYoungerPrimary => {
                self.stats.kept_by_younger_primary += 1;
                assert!(
                    keep != serving && self.promoted_at[keep] <= self.promoted_at[serving],
                    "t={t}: discard-younger-primary kept {} (promoted at {:?})\n{}",
                    NAMES[keep],
                    self.promoted_at,
                    self.tail()
                );
            }
            SplitBrainPolicy::DiscardLeastChanges => {
                self.stats.kept_by_least_changes += 1;
                let (k, d) = if keep == serving {
                    (mine, theirs)
                } else {
                    (theirs, mine)
                };
                assert!(
                    k >= d && (keep == serving || k > d),
                    "t={t}: discard-least-changes kept {} with {k} bytes changed against {d}\n{}",
                    NAMES[keep],
                    self.tail()
                );
            }
            SplitBrainPolicy::Manual => panic!("manual decided: {}", self.tail()),
        }
    }

    /// Resolves the split brain keeping `keep`'s copy (decided on
    /// `serving`), as the agent does: the discarded copy is set aside
    /// first. Keeping the serving copy, the peer (a replica) is rebased on
    /// the newest generation both share and resynced; keeping the peer's,
    /// the serving node resigns, the peer is promoted by force, and the
    /// serving node's history is rebased when it is demoted (if it resumes
    /// instead, the split brain stays and the policy runs again).
    /// `false`: nothing done (the peer is not a replica yet).
    fn resolve(&mut self, t: Millis, keep: usize, serving: usize) -> bool {
        let discard = 1 - keep;
        let discard_role = self.nodes[discard].core.as_ref().map(|c| c.role());
        if keep == serving && discard_role != Some(Role::Secondary) {
            self.log.push(format!(
                "t={t} RESOLVE refused: {} is not a replica",
                NAMES[discard]
            ));
            return false;
        }
        self.log.push(format!(
            "t={t} RESOLVE keep {} (decided on {})",
            NAMES[keep], NAMES[serving]
        ));
        let copy = self.nodes[discard].disk.data.clone();
        self.kept.extend(copy);
        if keep == serving {
            self.rebase(t, discard);
            self.input(t, discard, Input::DataState(DataState::Inconsistent));
        } else {
            self.discard_on_demote[serving] = true;
            self.input(
                t,
                serving,
                Input::Resign {
                    why: "split brain: keeping the peer's data".into(),
                },
            );
            self.force_wanted = Some((keep, t + 30_000));
        }
        true
    }

    /// The discarded side's history restarts at the newest generation it
    /// shares with the kept side's (blank without one: a full resync).
    fn rebase(&mut self, t: Millis, discard: usize) {
        let theirs: Vec<u64> = {
            let g = &self.nodes[1 - discard].disk.gen;
            std::iter::once(g.current()).chain(g.ancestors()).collect()
        };
        let d = &mut self.nodes[discard].disk;
        let mine: Vec<u64> = std::iter::once(d.gen.current())
            .chain(d.gen.ancestors())
            .collect();
        d.gen = match mine.iter().position(|id| *id != 0 && theirs.contains(id)) {
            Some(k) => GenerationHistory::from_parts(mine[k], mine[k + 1..].to_vec(), 16),
            None => GenerationHistory::blank(),
        };
        d.data_state = DataState::Inconsistent;
        self.split = false;
        self.log.push(format!("t={t} {} rebased", NAMES[discard]));
    }

    /// The agent's threads answer; the policy's forced promotion is asked
    /// again until it takes.
    fn pending(&mut self, t: Millis) {
        let mut due = Vec::new();
        self.pending.retain(|(at, i, input)| {
            if *at <= t {
                due.push((*i, input.clone()));
                false
            } else {
                true
            }
        });
        for (i, input) in due {
            self.input(t, i, input);
        }
        if let Some((k, until)) = self.force_wanted {
            let role = self.nodes[k]
                .core
                .as_ref()
                .map(|c| (c.role(), c.is_candidate()));
            if t > until || role.is_some_and(|(r, _)| r == Role::Primary) {
                self.force_wanted = None;
            } else if t % (2 * self.timing.heartbeat_interval_ms) == 0
                && role == Some((Role::Secondary, false))
            {
                self.input(t, k, Input::ForcePromote { by_policy: true });
            }
        }
    }

    fn link_up(&self, t: Millis, a: usize, b: usize) -> bool {
        t >= self.cut_until[link(a, b)]
    }

    fn deliver(&mut self, t: Millis) {
        let mut due = Vec::new();
        let mut keep = Vec::new();
        for m in self.inflight.drain(..) {
            if m.at > t {
                keep.push(m);
                continue;
            }
            // A paused receiver finds its messages when it resumes.
            let paused =
                m.to != W && self.nodes[m.to].core.is_some() && t < self.nodes[m.to].paused_until;
            if paused {
                keep.push(m);
            } else {
                due.push(m);
            }
        }
        self.inflight = keep;
        for m in due {
            if !m.replay && !self.link_up(t, m.from, m.to) {
                continue;
            }
            match m.payload {
                Payload::Peer(p) => self.input(t, m.to, Input::Peer(p)),
                Payload::FromWitness(r) => {
                    if std::env::var("FERRY_SIM_TRACE").is_ok() {
                        self.log.push(format!(
                            "t={t} {} gets witness {:?} echo {} refused {:?} replay {} (role {:?} cand {:?})",
                            NAMES[m.to], r.op, r.echo, r.refused, m.replay,
                            self.nodes[m.to].core.as_ref().map(|c| c.role()),
                            self.nodes[m.to].core.as_ref().map(|c| c.is_candidate()),
                        ));
                    }
                    self.input(t, m.to, Input::Witness(r))
                }
                Payload::ToWitness(req) => {
                    let now = self.witness_local(t);
                    let Some(w) = self.witness.as_mut() else {
                        continue;
                    };
                    let (reply, changed) = w.handle(now, &req);
                    if std::env::var("FERRY_SIM_TRACE").is_ok() {
                        self.log.push(format!(
                            "t={t} witness {:?} from {} sent {} replay {} -> {:?}",
                            req.op, req.node, req.sent_at, m.replay, reply.refused
                        ));
                    }
                    if changed {
                        self.witness_record = w.record.clone();
                        self.log
                            .push(format!("t={t} witness record {:?}", self.witness_record));
                    }
                    self.send(t, W, m.from, Payload::FromWitness(reply));
                }
            }
        }
    }

    fn accepting(&self, t: Millis, i: usize) -> bool {
        let n = &self.nodes[i];
        n.running(t)
            && n.core
                .as_ref()
                .is_some_and(|c| c.accepting_writes(n.local(t)))
    }

    fn replication_connected(&self, t: Millis, p: usize) -> bool {
        let s = 1 - p;
        self.nodes[p].running(t)
            && self.nodes[s].running(t)
            && self.link_up(t, p, s)
            && self.nodes[p]
                .core
                .as_ref()
                .is_some_and(|c| c.role() == Role::Primary)
            && self.nodes[s]
                .core
                .as_ref()
                .is_some_and(|c| c.role() == Role::Secondary && !c.is_candidate())
    }

    /// A client write at whichever node accepts it.
    fn write(&mut self, t: Millis) {
        for p in [A, B] {
            if !self.accepting(t, p) {
                continue;
            }
            let w = self.next_write;
            self.next_write += 1;
            let replicated = self.replication_connected(t, p) && self.connected_since.is_some();
            let alone_ok = self.nodes[p]
                .core
                .as_ref()
                .is_some_and(|c| c.may_write_alone());
            let d = &mut self.nodes[p].disk;
            if !replicated && alone_ok && !d.fresh {
                // Before the first write acknowledged alone: a new history.
                d.gen.bump(self.rng.next() | 1);
                d.fresh = true;
            }
            d.data.insert(w);
            if !replicated {
                d.dirty += 1;
            }
            if replicated {
                self.nodes[1 - p].disk.data.insert(w);
            }
            if replicated || alone_ok {
                self.acked.insert(w);
            }
        }
    }

    /// The resync model: a secondary connected to the primary for
    /// `resync_ms` becomes an up-to-date copy of it.
    fn resync(&mut self, t: Millis) {
        let p = [A, B]
            .into_iter()
            .find(|&p| self.replication_connected(t, p));
        match (p, self.connected_since) {
            (None, None) => {}
            (None, Some(_)) => {
                self.connected_since = None;
                for i in [A, B] {
                    self.report_members(t, i);
                }
            }
            (Some(p), None) => {
                let s = 1 - p;
                // The handshake compares generations: the primary is the
                // source only of an older (or equal) history; diverged
                // histories are a split brain, refused and reported.
                match self.nodes[p].disk.gen.relate(&self.nodes[s].disk.gen) {
                    Relation::SplitBrain => {
                        if !self.split {
                            self.split = true;
                            self.stats.split_brains += 1;
                            self.log.push(format!("t={t} SPLIT BRAIN found"));
                        }
                    }
                    Relation::Behind | Relation::SelfBlank => {}
                    Relation::InSync | Relation::Ahead | Relation::PeerBlank => {
                        // Every (re)connection resyncs (maybe nothing) and
                        // ends with the replica up to date, as the link
                        // announces it.
                        self.connected_since = Some(t);
                        self.nodes[p].disk.fresh = false;
                        self.nodes[s].disk.data_state = DataState::Inconsistent;
                        self.input(t, s, Input::DataState(DataState::Inconsistent));
                    }
                }
            }
            (Some(p), Some(since)) => {
                let s = 1 - p;
                if t >= since + self.resync_ms
                    && self.nodes[s].disk.data_state != DataState::UpToDate
                {
                    // What the target held that the source lacks is
                    // overwritten: an acknowledged write among it must
                    // have been set aside by a split-brain resolution.
                    let lost = self.nodes[s]
                        .disk
                        .data
                        .difference(&self.nodes[p].disk.data)
                        .find(|w| self.acked.contains(w) && !self.kept.contains(w))
                        .copied();
                    assert!(
                        lost.is_none(),
                        "t={t}: resync {} -> {} overwrites acknowledged write {lost:?} (generations {:?} / {:?})\n{}",
                        NAMES[p],
                        NAMES[s],
                        self.nodes[p].disk.gen,
                        self.nodes[s].disk.gen,
                        self.tail()
                    );
                    let src = self.nodes[p].disk.clone();
                    let d = &mut self.nodes[s].disk;
                    d.data = src.data;
                    d.gen.adopt(&src.gen);
                    d.data_state = DataState::UpToDate;
                    d.dirty = 0;
                    self.nodes[p].disk.dirty = 0;
                    self.input(t, s, Input::DataState(DataState::UpToDate));
                    self.report_members(t, p);
                }
            }
        }
    }

    /// What the agent's feed reports every 20 ms: the workload's one
    /// volume as this node's link sees it, and whether its copy is split.
    fn report_members(&mut self, t: Millis, i: usize) {
        let Some(c) = self.nodes[i].core.as_ref() else {
            return;
        };
        let primary_here = c.role() == Role::Primary;
        let in_sync = primary_here
            && self.connected_since.is_some()
            && self.replication_connected(t, i)
            && self.nodes[1 - i].disk.data_state == DataState::UpToDate;
        let m = Member {
            primary_here,
            streaming: in_sync,
            peer_up_to_date: in_sync,
            usable_here: primary_here || self.nodes[i].disk.data_state == DataState::UpToDate,
        };
        self.input(t, i, Input::Members(vec![m]));
        let changed_bytes = self.nodes[i].disk.dirty * 4096;
        let split_brain = self.split;
        self.input(
            t,
            i,
            Input::Diverged {
                split_brain,
                changed_bytes,
            },
        );
    }

    fn check(&mut self, t: Millis, seed: u64) {
        let acc = [self.accepting(t, A), self.accepting(t, B)];
        assert!(
            !(acc[0] && acc[1]),
            "seed {seed}: two nodes accept writes at t={t}\n{}",
            self.tail()
        );
        for i in [A, B] {
            if acc[i] && !self.nodes[i].was_accepting && !self.forced && self.policy.sync {
                let missing = self
                    .acked
                    .difference(&self.nodes[i].disk.data)
                    .next()
                    .copied();
                assert!(
                    missing.is_none(),
                    "seed {seed}: {} accepts writes at t={t} without acknowledged write {missing:?}\n{}",
                    NAMES[i],
                    self.tail()
                );
            }
            self.nodes[i].was_accepting = acc[i];
        }
    }

    fn tail(&self) -> String {
        let n = self.log.len();
        let keep = std::env::var("FERRY_SIM_LOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        let mut s = format!("seed {}\n", self.seed);
        s += &self.log[n.saturating_sub(keep)..].join("\n");
        for i in [A, B] {
            let c = self.nodes[i].core.as_ref();
            s += &format!(
                "\n{}: role {:?} data {:?} disk {:?}/{:?}",
                NAMES[i],
                c.map(|c| c.role()),
                c.map(|c| c.data_state()),
                self.nodes[i].disk.saved,
                self.nodes[i].disk.data_state
            );
            s += &format!(" gen {:?}", self.nodes[i].disk.gen);
            if std::env::var("FERRY_SIM_TRACE").is_ok() {
                s += &format!("\n{c:#?}");
            }
        }
        s += &format!(
            "\nrecord {:?}\npolicy {:?} rules {:?} split {}",
            self.witness_record, self.policy, self.rules, self.split
        );
        s
    }

    /// One random fault (or none) at time t.
    fn fault(&mut self, t: Millis) {
        let lease = self.timing.lease_ms;
        match self.rng.below(1000) {
            0..=1 => {
                let i = self.rng.below(2) as usize;
                if self.nodes[i].core.is_some() {
                    self.nodes[i].core = None;
                    self.discard_on_demote[i] = false;
                    self.nodes[i].down_until = t + 200 + self.rng.below(4 * lease);
                    self.log.push(format!("t={t} CRASH {}", NAMES[i]));
                }
            }
            2..=3 => {
                let i = self.rng.below(2) as usize;
                self.nodes[i].paused_until = t + self.rng.below(3 * lease);
                self.log.push(format!(
                    "t={t} PAUSE {} until {}",
                    NAMES[i], self.nodes[i].paused_until
                ));
            }
            4 if self.witness.is_some() => {
                self.witness = None;
                self.witness_down_until = t + self.rng.below(4 * lease);
                self.log.push(format!("t={t} CRASH witness"));
            }
            5..=7 => {
                let l = self.rng.below(3) as usize;
                self.cut_until[l] = t + self.rng.below(6 * lease);
                self.log
                    .push(format!("t={t} CUT link {l} until {}", self.cut_until[l]));
            }
            9 if self.operator => {
                let i = self.rng.below(2) as usize;
                if self.nodes[i]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.role() == Role::Secondary)
                {
                    self.forced = true;
                    self.stats.forced += 1;
                    self.log
                        .push(format!("t={t} OPERATOR force-promotes {}", NAMES[i]));
                    self.input(t, i, Input::ForcePromote { by_policy: false });
                }
            }
            8 => {
                self.loss_per_mille = self.rng.below(300);
                self.delay_max = 1 + self.rng.below(lease);
                self.log.push(format!(
                    "t={t} NET loss {} delay {}",
                    self.loss_per_mille, self.delay_max
                ));
            }
            _ => {}
        }
    }

    fn restarts(&mut self, t: Millis) {
        for i in [A, B] {
            if self.nodes[i].core.is_none() && t >= self.nodes[i].down_until {
                self.log.push(format!("t={t} RESTART {}", NAMES[i]));
                self.start_node(i, t);
            }
        }
        if self.witness.is_none() && t >= self.witness_down_until {
            self.log.push(format!("t={t} RESTART witness"));
            let key = self.rng.next();
            self.witness = Some(Witness::start(
                self.witness_record.clone(),
                self.timing,
                self.witness_local(t),
                key,
            ));
        }
    }

    fn step(&mut self, t: Millis, seed: u64) {
        self.restarts(t);
        self.replay(t);
        self.deliver(t);
        self.pending(t);
        for i in [A, B] {
            if self.nodes[i].running(t) && t % 20 == self.nodes[i].tick_phase {
                self.report_members(t, i);
            }
        }
        for i in [A, B] {
            if self.nodes[i].running(t) && t % 5 == self.nodes[i].tick_phase {
                let now = self.nodes[i].local(t);
                let actions = self.nodes[i].core.as_mut().expect("running").tick(now);
                self.perform(t, i, actions);
            }
        }
        self.resync(t);
        if t % 3 == 0 {
            self.write(t);
        }
        self.check(t, seed);
    }

    fn heal(&mut self, t: Millis) {
        self.cut_until = [t; 3];
        self.loss_per_mille = 0;
        self.delay_max = 5;
        for i in [A, B] {
            self.nodes[i].paused_until = self.nodes[i].paused_until.min(t);
            self.nodes[i].down_until = self.nodes[i].down_until.min(t);
        }
        self.witness_down_until = self.witness_down_until.min(t);
        self.log.push(format!("t={t} HEAL"));
    }
}

fn run(seed: u64) -> Stats {
    let mut sim = Sim::new(seed);
    let fault_ms: Millis = 8_000;
    let settle_ms: Millis = 40 * sim.timing.failure_timeout_ms;
    for t in 0..fault_ms {
        sim.fault(t);
        sim.step(t, seed);
    }
    sim.heal(fault_ms);
    let end = fault_ms + settle_ms;
    for t in fault_ms..end {
        sim.step(t, seed);
        // A split brain the policy leaves to an operator (`manual`): one
        // resolves it, keeping the serving node's copy, once things settled.
        if sim.split && t >= fault_ms + settle_ms / 4 && t % 500 == 0 {
            if let Some(keep) = [A, B].into_iter().find(|&i| sim.accepting(t, i)) {
                if sim.resolve(t, keep, keep) {
                    sim.stats.kept_by_operator += 1;
                }
            }
        }
    }
    // One primary accepting writes, one up-to-date secondary, same data.
    let acc: Vec<usize> = [A, B]
        .into_iter()
        .filter(|&i| sim.accepting(end, i))
        .collect();
    assert_eq!(
        acc.len(),
        1,
        "seed {seed}: after healing, primaries accepting writes: {acc:?}\n{}",
        sim.tail()
    );
    let p = acc[0];
    let s = 1 - p;
    let sc = sim.nodes[s].core.as_ref().expect("running");
    assert_eq!(sc.role(), Role::Secondary, "seed {seed}\n{}", sim.tail());
    assert_eq!(
        sc.data_state(),
        DataState::UpToDate,
        "seed {seed}\n{}",
        sim.tail()
    );
    assert_eq!(
        sim.witness_record.outdated,
        None,
        "seed {seed}: the witness still records a replica outdated\n{}",
        sim.tail()
    );
    assert!(
        !sim.split,
        "seed {seed}: a split brain is left\n{}",
        sim.tail()
    );
    // Every acknowledged write is served, or — when an operator forced a
    // promotion, or an async workload failed over accepting the loss — in
    // the copy a split-brain resolution set aside: diverged data is never
    // silently discarded.
    let missing = sim
        .acked
        .iter()
        .find(|w| !sim.nodes[p].disk.data.contains(w) && !sim.kept.contains(w));
    assert_eq!(
        missing,
        None,
        "seed {seed}: acknowledged write gone\n{}",
        sim.tail()
    );
    if !sim.forced && sim.policy.sync {
        assert!(sim.acked.is_subset(&sim.nodes[p].disk.data), "seed {seed}");
    }
    assert_eq!(
        sim.nodes[s].disk.data, sim.nodes[p].disk.data,
        "seed {seed}"
    );
    assert_eq!(
        sim.nodes[s].disk.gen,
        sim.nodes[p].disk.gen,
        "seed {seed}: the replica's history is not the primary's\n{}",
        sim.tail()
    );
    if sim.rules.failback_delay_ms.is_some() {
        assert_eq!(
            p,
            A,
            "seed {seed}: failback left the workload on b\n{}",
            sim.tail()
        );
    }
    sim.stats
}

#[test]
fn seeded_schedules_keep_one_primary_and_every_acknowledged_write() {
    if let Ok(seed) = std::env::var("FERRY_SIM_SEED") {
        run(seed.parse().expect("FERRY_SIM_SEED is a number"));
        return;
    }
    let seeds: u64 = std::env::var("FERRY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut stats = Stats::default();
    // `FERRY_SIM_FIRST`: resume a long run from this seed.
    let first: u64 = std::env::var("FERRY_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in first..seeds {
        stats.add(run(seed));
    }
    eprintln!("{seeds} schedules: {stats:?}");
    // The schedules reach what they are meant to check.
    if seeds >= 1000 {
        assert!(stats.split_brains > 0 && stats.forced > 0, "{stats:?}");
        assert!(stats.kept_by_younger_primary > 0, "{stats:?}");
        assert!(stats.kept_by_least_changes > 0, "{stats:?}");
        assert!(stats.kept_by_operator > 0, "{stats:?}");
        assert!(
            stats.failbacks > 0 && stats.async_promotions > 0,
            "{stats:?}"
        );
    }
}

/// The primary `a` crashes at 3 s (and the witness restarts 100 ms later
/// when `witness_restart`); then, when `replay`, the adversary plays a's
/// datagrams (heartbeats to b, requests to the witness) captured in the last
/// two lease periods again, in a loop at their original pace, and a's last
/// heartbeat and last witness request every millisecond. Returns how long
/// b took to accept writes.
fn failover_ms(seed: u64, replay: bool, witness_restart: bool) -> Millis {
    let mut sim = Sim::new(seed);
    sim.replay_per_mille = 0;
    sim.operator = false;
    sim.rules.failback_delay_ms = None;
    for n in sim.nodes.iter_mut() {
        if let Some(c) = n.core.as_mut() {
            c.set_rules(sim.rules.clone());
        }
    }
    let crash_at: Millis = 3000;
    for t in 0..crash_at {
        sim.step(t, seed);
    }
    assert!(
        sim.accepting(crash_at - 1, A),
        "seed {seed}\n{}",
        sim.tail()
    );
    sim.captured.retain(|m| m.from == A);
    assert!(
        sim.captured
            .iter()
            .any(|m| matches!(m.payload, Payload::Peer(_)))
            && sim
                .captured
                .iter()
                .any(|m| matches!(m.payload, Payload::ToWitness(_))),
        "seed {seed}: nothing captured"
    );
    sim.nodes[A].core = None;
    sim.nodes[A].down_until = Millis::MAX;
    sim.log.push(format!("t={crash_at} CRASH a for good"));
    if witness_restart {
        sim.witness = None;
        sim.witness_down_until = crash_at + 100;
    }
    let since = crash_at - 2 * sim.timing.lease_ms;
    let mut tape: Vec<Msg> = sim
        .captured
        .iter()
        .filter(|m| m.at >= since)
        .cloned()
        .collect();
    tape.sort_by_key(|m| m.at);
    let tape_start = tape[0].at;
    let tape_ms = tape[tape.len() - 1].at - tape_start + 1;
    let last = |peer: bool| {
        tape.iter()
            .rev()
            .find(|m| matches!(m.payload, Payload::Peer(_)) == peer)
            .cloned()
            .expect("captured")
    };
    let newest = [last(true), last(false)];
    for t in crash_at..crash_at + 30_000 {
        if replay {
            for m in &newest {
                let mut m = m.clone();
                m.at = t;
                m.replay = true;
                sim.inflight.push(m);
            }
            let offset = (t - crash_at) % tape_ms;
            for m in tape.iter().filter(|m| m.at - tape_start == offset) {
                let mut m = m.clone();
                m.at = t;
                m.replay = true;
                sim.inflight.push(m);
            }
        }
        sim.step(t, seed);
        if sim.accepting(t, B) {
            return t - crash_at;
        }
    }
    panic!(
        "seed {seed}: b never took over (replay {replay})\n{}",
        sim.tail()
    );
}

#[test]
fn replaying_a_crashed_primary_s_datagrams_does_not_delay_the_failover() {
    for seed in 0..40 {
        let timing = Sim::new(seed).timing;
        for witness_restart in [false, true] {
            let normal = failover_ms(seed, false, witness_restart);
            let replayed = failover_ms(seed, true, witness_restart);
            // Detection, then the old lease's grantor-side end (measured on
            // clocks up to drift apart), the witness's quiet period after
            // its restart, a few heartbeat intervals of retries and delays.
            let lease = timing.lease_ms * (1000 + 2 * timing.drift_permille) / 1000;
            let bound = timing.failure_timeout_ms.max(lease)
                + if witness_restart { 100 + lease } else { 0 }
                + 3 * timing.heartbeat_interval_ms;
            assert!(
                normal <= bound && replayed <= bound,
                "seed {seed} (witness restart {witness_restart}): failover took {normal} ms \
                 without replays and {replayed} ms with them; bound {bound} ms"
            );
        }
    }
}
