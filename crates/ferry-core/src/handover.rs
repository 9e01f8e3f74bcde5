//! The handover, sans IO: the one sequence behind a cutover (`migrate
//! cutover`, and the reverse cutover of a rollback or of a target that
//! failed to start) and a cluster switchover.
//!
//! ```text
//! prehash ─ preflush ─ stop hook ─ flush ─ freeze ─ drain ─ compare ─ COMMIT ─ …
//!   (while the workload still runs)        └──── the downtime starts here
//! … close gates ─ start at the target ─ record the way back ─ check ─ demote ─ (reverse)
//! ```
//!
//! The machine is driven in the raft-rs style: the driver calls [`Handover::start`]
//! once, performs the [`Effect`] it gets, feeds the effect's result back with
//! [`Handover::step`], and so on; while the machine waits (between two
//! attempts of the check) it returns no effect and [`Handover::wake_at`] says
//! when to call [`Handover::tick`]. At most one effect is outstanding at a
//! time: the handover is a sequence, and every step inside the freeze is one
//! local call or one round trip that the downtime pays for, so nothing here
//! adds a wait or a round trip of its own. Time is passed in as microseconds
//! since the driver started ([`Micros`]), and the machine keeps the
//! [`Timeline`] the report is built from.
//!
//! The decisions:
//! - **Aborts before the commit point** ([`Abort`]) undo everything: a
//!   failed stop hook runs the start hook at the source again (nothing was
//!   frozen yet); a drain that fails or times out, a comparison that cannot
//!   be made, a commit the target refuses unfreeze every member asked to
//!   freeze and start the source again; a comparison that finds the copies
//!   unequal first has the member resend what differs (the target is
//!   marked inconsistent there until it has it), then rolls back the same
//!   way. A switchover stopped nothing before its freeze, so its rollback
//!   only unfreezes.
//! - **The lost commit answer**: the commit is one durable record on the
//!   target; when its answer is lost, only the target knows whether it
//!   happened, so the machine asks it, member by member, whether it serves
//!   it now ([`Effect::ProbeCommit`]). None: the record was not written —
//!   abort and roll back. All: committed, go on. Some: the record was
//!   written but not every promotion finished — committed (the target
//!   finishes them when its agent restarts), nothing more is done here but
//!   closing the gates; the source never serves again.
//! - **After the commit point** nothing is undone: held writes fail (gates
//!   closed), the target starts; a start or check that fails leaves the
//!   workload committed but unhealthy, and a cutover asked with
//!   `reverse_on_failure` then hands it back with a reverse cutover (which
//!   is asked without it, so two failing nodes never hand it back and
//!   forth).
//!
//! Every run ends in exactly one [`Outcome`]: rolled back with the source
//! serving, or committed (whole, or partly with the target finishing it) —
//! never both, never neither (checked by an exhaustive walk of every
//! sequence of results in the tests below).

use std::fmt;

/// Microseconds since the driver started the handover (monotonic).
pub type Micros = u64;

/// Which handover this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A cutover (also the reverse cutover of a rollback): stop hook at the
    /// source, commit = the target's durable takeover record, start and
    /// check hooks at the target, the source demoted to its replica.
    Cutover {
        /// A target whose start or check fails hands the workload back by
        /// a reverse cutover.
        reverse_on_failure: bool,
    },
    /// A cluster switchover: no stop hook before the freeze (the cluster
    /// manager runs it when this node resigns); commit = the resignation
    /// (the witness hands the lease to the peer); check = the peer serves.
    /// The cluster manager demotes and starts: none of that is done here.
    Switchover,
}

/// What the machine needs to know before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub kind: Kind,
    /// The workload's volumes and shares, indexed 0..members.
    pub members: usize,
    /// Each member's drain may take this long (the member enforces it).
    pub drain_timeout_ms: u64,
    /// The commit is followed by a check that is retried until it passes
    /// (a cutover: only when the workload has a check hook; a switchover:
    /// always, the peer serving).
    pub check: bool,
    /// How long the check is retried after its first attempt.
    pub check_timeout_ms: u64,
    /// The wait between two attempts of the check.
    pub check_retry_ms: u64,
    /// The workload's VM moves live: its RAM is pre-copied to the target
    /// while it runs, before the freeze ([`Effect::MoveVm`]); a rollback
    /// resumes it at the source ([`Effect::ResumeSourceVm`]), a commit
    /// stops it there ([`Effect::StopSourceVm`]).
    pub live_vm: bool,
}

/// A named point of the handover, stamped in the [`Timeline`] (the names are
/// the cutover report's `steps_us[].step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prehashed,
    Preflushed,
    /// The VM's RAM is at the target; the source's vCPUs are stopped and
    /// its drives flushed and inactive (a live VM move).
    VmMoved,
    Stopped,
    Flushed,
    Frozen,
    Drained,
    Verified,
    Committed,
    TargetStarted,
    Checked,
    /// The source's paused VM was told to quit (a live VM move).
    SourceVmStopped,
    SourceReplica,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Prehashed => "prehashed",
            Step::Preflushed => "preflushed",
            Step::VmMoved => "vm-moved",
            Step::Stopped => "stopped",
            Step::Flushed => "flushed",
            Step::Frozen => "frozen",
            Step::Drained => "drained",
            Step::Verified => "verified",
            Step::Committed => "committed",
            Step::TargetStarted => "target-started",
            Step::Checked => "checked",
            Step::SourceVmStopped => "source-vm-stopped",
            Step::SourceReplica => "source-replica",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When the replicas are asked to flush while writes still flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushWhen {
    BeforeStopHook,
    AfterStopHook,
    BeforeSwitchover,
}

impl FlushWhen {
    /// As the logs say it.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushWhen::BeforeStopHook => "before the stop hook",
            FlushWhen::AfterStopHook => "after the stop hook",
            FlushWhen::BeforeSwitchover => "before a switchover",
        }
    }
}

/// What the driver must do next; each is answered by one [`Input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Bring the member's hashes (both sides) up to date while the workload
    /// runs, so the comparison in the freeze reads only what is written
    /// from here on. Best effort. → [`Input::Done`]
    Prehash { member: usize },
    /// Every member's replica makes what it holds durable, all at once
    /// (each waits at most `timeout_ms`). Best effort: the drain decides.
    /// → [`Input::Done`]
    FlushReplicas { when: FlushWhen, timeout_ms: u64 },
    /// A live VM move: start the VM paused at the target on its replicas,
    /// pre-copy its RAM while it runs here, and return once QEMU's
    /// migration completed (the source's vCPUs stopped, its drives flushed
    /// and inactive; the target paused with the whole device state). It
    /// must not resume the source on its own. → [`Input::VmMoved`]
    MoveVm,
    /// The workload's stop hook at the source (none defined: Ok).
    /// → [`Input::StopHook`]
    RunStopHook,
    /// New writes of the member wait. → [`Input::Done`]
    Freeze { member: usize },
    /// Wait until the member's replica holds everything durably.
    /// → [`Input::Drained`]
    Drain { member: usize, timeout_ms: u64 },
    /// Compare the member's two copies. → [`Input::Compared`]
    Compare { member: usize },
    /// The member compared unequal: mark the target inconsistent over what
    /// differs and have it resent. → [`Input::Done`]
    Resend { member: usize },
    /// The commit point. → [`Input::Commit`]
    Commit,
    /// The commit's answer was lost: does the target serve the member now?
    /// → [`Input::Probed`]
    ProbeCommit { member: usize },
    /// Have the target record the way back (a reverse migration). Best
    /// effort. → [`Input::Done`]
    RecordReverse,
    /// The member belongs to the target now: held and new writes fail.
    /// → [`Input::Done`]
    CloseGate { member: usize },
    /// The workload's start hook at the target. → [`Input::Started`]
    StartTarget,
    /// One attempt of the check. → [`Input::Checked`]
    Check,
    /// The member becomes the target's replica here. → [`Input::Done`]
    Demote { member: usize },
    /// The target failed to start or check: hand the workload back by a
    /// reverse cutover. → [`Input::Reversed`]
    Reverse,
    /// Rollback: the member's writes flow again. → [`Input::Done`]
    Unfreeze { member: usize },
    /// Rollback: the workload's start hook at the source again.
    /// → [`Input::Done`]
    StartSource,
    /// Rollback of a live VM move: the target's VM quits, the source's
    /// continues (QEMU reactivates its drives). Last, after every member
    /// was unfrozen. → [`Input::Done`]
    ResumeSourceVm,
    /// After the commit of a live VM move: the source's paused VM quits; it
    /// never runs again here (its disks are the target's now).
    /// → [`Input::Done`]
    StopSourceVm,
}

/// A member's comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    Equal,
    /// Unequal; the text says how (what will be resent).
    Differs(String),
    /// Could not compare (a read failed, the target did not answer).
    Failed(String),
}

/// The answer to [`Effect::Commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitAnswer {
    /// The target recorded itself primary.
    Committed,
    /// The target said no (nothing was recorded), or the commit could not
    /// even be asked.
    Refused(String),
    /// No answer: the record may or may not exist.
    Lost(String),
}

/// The result of the pending effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An effect whose result decides nothing finished.
    Done,
    VmMoved(Result<(), String>),
    StopHook(Result<(), String>),
    Drained(Result<(), String>),
    Compared(Comparison),
    Commit(CommitAnswer),
    /// Whether the target serves the probed member.
    Probed(bool),
    Started(Result<(), String>),
    Checked(Result<(), String>),
    Reversed(Result<(), String>),
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::Done => "done",
            Input::VmMoved(_) => "vm-moved",
            Input::StopHook(_) => "stop-hook",
            Input::Drained(_) => "drained",
            Input::Compared(_) => "compared",
            Input::Commit(_) => "commit",
            Input::Probed(_) => "probed",
            Input::Started(_) => "started",
            Input::Checked(_) => "checked",
            Input::Reversed(_) => "reversed",
        }
    }
}

/// Why a handover stopped before its commit point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Abort {
    /// The VM's live move failed before it completed (QEMU's migration
    /// failed, the target's VM died, the link broke).
    VmMove(String),
    StopHook(String),
    /// A member's drain failed or timed out.
    Drain {
        member: usize,
        why: String,
    },
    /// A member could not be compared.
    Compare {
        member: usize,
        why: String,
    },
    /// A member's copies differ; what differs is being resent.
    Differs {
        member: usize,
        why: String,
    },
    CommitRefused(String),
    /// The commit's answer was lost and the target serves none of the
    /// members: it did not commit.
    NotTakenOver(String),
}

impl Abort {
    /// The reason, as the member or the side said it.
    pub fn why(&self) -> &str {
        match self {
            Abort::StopHook(w)
            | Abort::VmMove(w)
            | Abort::CommitRefused(w)
            | Abort::NotTakenOver(w)
            | Abort::Drain { why: w, .. }
            | Abort::Compare { why: w, .. }
            | Abort::Differs { why: w, .. } => w,
        }
    }
}

/// How a handover ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped before the commit point; everything undone, the source
    /// serves.
    RolledBack(Abort),
    /// The target committed and took every member over.
    Committed {
        /// Why the target is not healthy (its start or check failed).
        unhealthy: Option<String>,
        /// The reverse cutover that followed an unhealthy start, if asked.
        reversed: Option<Result<(), String>>,
    },
    /// The commit's answer was lost and the target serves only some
    /// members: it committed (it finishes the rest when its agent
    /// restarts); the source's gates are closed, nothing more is done.
    CommittedPartly {
        serving: usize,
        members: usize,
        why: String,
    },
}

impl Outcome {
    /// Whether the target committed (the source never serves again).
    pub fn committed(&self) -> bool {
        !matches!(self, Outcome::RolledBack(_))
    }
}

/// When each step was reached, and the instants the report's figures come
/// from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    pub steps: Vec<(Step, Micros)>,
    /// The stop hook was asked for (the application-visible outage starts).
    pub stop_at: Option<Micros>,
    /// The first member was asked to freeze (the downtime starts).
    pub frozen_at: Option<Micros>,
    /// The target serves (a cutover: its start hook returned; a switchover:
    /// the peer reports serving).
    pub serving_at: Option<Micros>,
    /// The check passed at the target (the outage ends).
    pub healthy_at: Option<Micros>,
}

impl Timeline {
    /// From the freeze until the target serves.
    pub fn downtime_us(&self) -> Option<Micros> {
        Some(self.serving_at?.saturating_sub(self.frozen_at?))
    }

    /// From the stop hook until the check passed at the target.
    pub fn outage_us(&self) -> Option<Micros> {
        Some(self.healthy_at?.saturating_sub(self.stop_at?))
    }

    /// When `step` was reached.
    pub fn at(&self, step: Step) -> Option<Micros> {
        self.steps.iter().find(|(s, _)| *s == step).map(|(_, t)| *t)
    }
}

/// An input that does not answer the pending effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error("handover input {input:?} does not answer the pending effect ({pending})")]
    Unexpected {
        input: &'static str,
        pending: String,
    },
    #[error("the handover was started twice")]
    StartedTwice,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    Prehash(usize),
    Preflush,
    MoveVm,
    StopHook,
    Flush,
    Freeze(usize),
    Drain(usize),
    Compare(usize),
    Commit,
    Probe {
        member: usize,
        serving: usize,
        why: String,
    },
    RecordReverse,
    CloseGate(usize),
    StartTarget,
    Check,
    CheckWait(Micros),
    Demote(usize),
    Reverse,
    Resend(usize),
    Unfreeze(usize),
    StartSource,
    ResumeSourceVm,
    StopSourceVm,
    Done,
}

/// One handover's state machine (see the module documentation).
#[derive(Debug, Clone)]
pub struct Handover {
    plan: Plan,
    state: State,
    /// Members asked to freeze (a rollback unfreezes them).
    frozen: usize,
    abort: Option<Abort>,
    /// Committed, partly: (members the target serves, why the answer was lost).
    partly: Option<(usize, String)>,
    committed: bool,
    check_deadline: Micros,
    unhealthy: Option<String>,
    reversed: Option<Result<(), String>>,
    /// The VM's move was asked for: a rollback resumes it at the source.
    vm_moving: bool,
    /// Where the handover goes once the source's VM was stopped.
    after_vm_stop: Option<Box<State>>,
    /// Where a cutover goes once the way back was recorded.
    after_record: Option<Box<State>>,
    timeline: Timeline,
    outcome: Option<Outcome>,
}

impl Handover {
    pub fn new(plan: Plan) -> Handover {
        Handover {
            plan,
            state: State::Idle,
            frozen: 0,
            abort: None,
            partly: None,
            committed: false,
            check_deadline: 0,
            unhealthy: None,
            reversed: None,
            vm_moving: false,
            after_vm_stop: None,
            after_record: None,
            timeline: Timeline::default(),
            outcome: None,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The first effect.
    pub fn start(&mut self, now: Micros) -> Result<Option<Effect>, HandoverError> {
        if self.state != State::Idle {
            return Err(HandoverError::StartedTwice);
        }
        Ok(self.enter(now, State::Prehash(0)))
    }

    /// The pending effect's result; returns the next effect (none: the
    /// machine waits for [`Handover::wake_at`], or it is finished).
    pub fn step(&mut self, now: Micros, input: Input) -> Result<Option<Effect>, HandoverError> {
        let n = self.plan.members;
        let next = match (&self.state, input) {
            (State::Prehash(i), Input::Done) => State::Prehash(i + 1),
            (State::Preflush, Input::Done) => {
                self.mark(Step::Preflushed, now);
                if self.plan.live_vm {
                    State::MoveVm
                } else {
                    self.before_freeze()
                }
            }
            (State::MoveVm, Input::VmMoved(Ok(()))) => {
                self.mark(Step::VmMoved, now);
                self.before_freeze()
            }
            (State::MoveVm, Input::VmMoved(Err(why))) => self.abort(Abort::VmMove(why)),
            (State::StopHook, Input::StopHook(Ok(()))) => {
                self.mark(Step::Stopped, now);
                State::Flush
            }
            (State::StopHook, Input::StopHook(Err(why))) => self.abort(Abort::StopHook(why)),
            (State::Flush, Input::Done) => {
                self.mark(Step::Flushed, now);
                State::Freeze(0)
            }
            (State::Freeze(i), Input::Done) => State::Freeze(i + 1),
            (State::Drain(i), Input::Drained(Ok(()))) => State::Drain(i + 1),
            (&State::Drain(member), Input::Drained(Err(why))) => {
                self.abort(Abort::Drain { member, why })
            }
            (State::Compare(i), Input::Compared(Comparison::Equal)) => State::Compare(i + 1),
            (&State::Compare(member), Input::Compared(Comparison::Differs(why))) => {
                self.abort(Abort::Differs { member, why })
            }
            (&State::Compare(member), Input::Compared(Comparison::Failed(why))) => {
                self.abort(Abort::Compare { member, why })
            }
            (State::Commit, Input::Commit(CommitAnswer::Committed)) => self.committed(now),
            (State::Commit, Input::Commit(CommitAnswer::Refused(why))) => {
                self.abort(Abort::CommitRefused(why))
            }
            (State::Commit, Input::Commit(CommitAnswer::Lost(why))) => State::Probe {
                member: 0,
                serving: 0,
                why,
            },
            (
                State::Probe {
                    member,
                    serving,
                    why,
                },
                Input::Probed(serves),
            ) => State::Probe {
                member: member + 1,
                serving: serving + usize::from(serves),
                why: why.clone(),
            },
            (State::RecordReverse, Input::Done) => {
                self.after_record.take().map_or(State::Done, |s| *s)
            }
            (State::CloseGate(i), Input::Done) => State::CloseGate(i + 1),
            (State::StartTarget, Input::Started(r)) => {
                self.timeline.serving_at = Some(now);
                self.mark(Step::TargetStarted, now);
                let next = match r {
                    Ok(()) if self.plan.check => {
                        self.check_deadline = now + self.plan.check_timeout_ms * 1000;
                        State::Check
                    }
                    Ok(()) => self.healthy(now),
                    Err(why) => self.unhealthy(now, why),
                };
                // The way back is recorded once the target serves (it is
                // best effort, and no part of the downtime).
                self.after_record = Some(Box::new(next));
                self.stop_source_vm_then(State::RecordReverse)
            }
            (State::StopSourceVm, Input::Done) => {
                self.mark(Step::SourceVmStopped, now);
                self.after_vm_stop.take().map_or(State::Done, |s| *s)
            }
            (State::ResumeSourceVm, Input::Done) => State::Done,
            (State::Check, Input::Checked(Ok(()))) => {
                if self.plan.kind == Kind::Switchover {
                    self.timeline.serving_at = Some(now);
                }
                self.healthy(now)
            }
            (State::Check, Input::Checked(Err(why))) => {
                if now > self.check_deadline {
                    self.unhealthy(now, why)
                } else {
                    State::CheckWait(now + self.plan.check_retry_ms * 1000)
                }
            }
            (State::Demote(i), Input::Done) => State::Demote(i + 1),
            (State::Reverse, Input::Reversed(r)) => {
                self.reversed = Some(r);
                State::Done
            }
            (State::Resend(_), Input::Done) => State::Unfreeze(0),
            (State::Unfreeze(i), Input::Done) => State::Unfreeze(i + 1),
            (State::StartSource, Input::Done) => self.resume_source_vm_then(State::Done),
            (_, input) => {
                return Err(HandoverError::Unexpected {
                    input: input.name(),
                    pending: self.pending(),
                })
            }
        };
        debug_assert!(n == self.plan.members);
        Ok(self.enter(now, next))
    }

    /// Time passes: the check is attempted again once its wait is over.
    pub fn tick(&mut self, now: Micros) -> Option<Effect> {
        match self.state {
            State::CheckWait(at) if now >= at => self.enter(now, State::Check),
            _ => None,
        }
    }

    /// When [`Handover::tick`] has something to do (the machine waits).
    pub fn wake_at(&self) -> Option<Micros> {
        match self.state {
            State::CheckWait(at) => Some(at),
            _ => None,
        }
    }

    /// How it ended; `None` while running.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Whether the commit point has been passed (the source may no longer
    /// resume).
    pub fn is_committed(&self) -> bool {
        self.committed
    }

    /// The pending effect, for error messages.
    fn pending(&self) -> String {
        format!("{:?}", self.state)
    }

    fn mark(&mut self, step: Step, now: Micros) {
        self.timeline.steps.push((step, now));
    }

    fn abort(&mut self, a: Abort) -> State {
        let next = match a {
            Abort::Differs { member, .. } => State::Resend(member),
            _ => State::Unfreeze(0),
        };
        self.abort = Some(a);
        next
    }

    fn committed(&mut self, now: Micros) -> State {
        self.committed = true;
        self.mark(Step::Committed, now);
        match self.plan.kind {
            Kind::Cutover { .. } => State::CloseGate(0),
            Kind::Switchover => {
                self.check_deadline = now + self.plan.check_timeout_ms * 1000;
                // The peer continues the VM when it takes over: the paused
                // one here quits at once.
                self.stop_source_vm_then(State::Check)
            }
        }
    }

    /// After the stop hook's place (a live move: after the VM moved): a
    /// cutover runs the stop hook, a switchover freezes.
    fn before_freeze(&self) -> State {
        match self.plan.kind {
            Kind::Cutover { .. } => State::StopHook,
            Kind::Switchover => State::Freeze(0),
        }
    }

    /// Past the commit point: a moved VM's paused source quits before `next`.
    fn stop_source_vm_then(&mut self, next: State) -> State {
        if self.vm_moving {
            self.after_vm_stop = Some(Box::new(next));
            State::StopSourceVm
        } else {
            next
        }
    }

    /// The end of a rollback: a VM whose move was asked for continues at
    /// the source (whatever the move did), then `next`.
    fn resume_source_vm_then(&mut self, next: State) -> State {
        if self.vm_moving {
            State::ResumeSourceVm
        } else {
            next
        }
    }

    fn healthy(&mut self, now: Micros) -> State {
        self.timeline.healthy_at = Some(now);
        self.after_check(now)
    }

    fn unhealthy(&mut self, now: Micros, why: String) -> State {
        self.unhealthy = Some(why);
        self.after_check(now)
    }

    fn after_check(&mut self, now: Micros) -> State {
        self.mark(Step::Checked, now);
        match self.plan.kind {
            Kind::Cutover { .. } => State::Demote(0),
            Kind::Switchover => State::Done,
        }
    }

    /// Enters `s`, passing through the states that have nothing to do, and
    /// returns the effect of the one that has.
    fn enter(&mut self, now: Micros, mut s: State) -> Option<Effect> {
        let n = self.plan.members;
        let cutover = matches!(self.plan.kind, Kind::Cutover { .. });
        loop {
            let effect = match s {
                State::Idle => None,
                State::Prehash(i) if i >= n => {
                    self.mark(Step::Prehashed, now);
                    s = State::Preflush;
                    continue;
                }
                State::Prehash(member) => Some(Effect::Prehash { member }),
                State::Preflush => Some(Effect::FlushReplicas {
                    when: if cutover {
                        FlushWhen::BeforeStopHook
                    } else {
                        FlushWhen::BeforeSwitchover
                    },
                    timeout_ms: self.plan.drain_timeout_ms,
                }),
                State::MoveVm => {
                    self.vm_moving = true;
                    Some(Effect::MoveVm)
                }
                State::StopHook => {
                    self.timeline.stop_at = Some(now);
                    Some(Effect::RunStopHook)
                }
                State::Flush => Some(Effect::FlushReplicas {
                    when: FlushWhen::AfterStopHook,
                    timeout_ms: self.plan.drain_timeout_ms,
                }),
                State::Freeze(i) => {
                    if i == 0 {
                        self.timeline.frozen_at = Some(now);
                    }
                    if i >= n {
                        self.mark(Step::Frozen, now);
                        s = State::Drain(0);
                        continue;
                    }
                    self.frozen = i + 1;
                    Some(Effect::Freeze { member: i })
                }
                State::Drain(i) if i >= n => {
                    self.mark(Step::Drained, now);
                    s = State::Compare(0);
                    continue;
                }
                State::Drain(member) => Some(Effect::Drain {
                    member,
                    timeout_ms: self.plan.drain_timeout_ms,
                }),
                State::Compare(i) if i >= n => {
                    self.mark(Step::Verified, now);
                    s = State::Commit;
                    continue;
                }
                State::Compare(member) => Some(Effect::Compare { member }),
                State::Commit => Some(Effect::Commit),
                State::Probe {
                    member,
                    serving,
                    ref why,
                } if member >= n => {
                    // The lost-commit rule: the target's answer settles it.
                    if serving == 0 {
                        s = self.abort(Abort::NotTakenOver(why.clone()));
                    } else if serving == n {
                        s = self.committed(now);
                    } else {
                        self.committed = true;
                        self.partly = Some((serving, why.clone()));
                        s = State::CloseGate(0);
                    }
                    continue;
                }
                State::Probe { member, .. } => Some(Effect::ProbeCommit { member }),
                State::RecordReverse => Some(Effect::RecordReverse),
                State::CloseGate(i) if i >= n => {
                    s = if self.partly.is_some() {
                        self.stop_source_vm_then(State::Done)
                    } else {
                        State::StartTarget
                    };
                    continue;
                }
                State::CloseGate(member) => Some(Effect::CloseGate { member }),
                State::StartTarget => Some(Effect::StartTarget),
                State::Check => Some(Effect::Check),
                State::CheckWait(_) => None,
                State::Demote(i) if i >= n => {
                    self.mark(Step::SourceReplica, now);
                    let reverse = matches!(
                        self.plan.kind,
                        Kind::Cutover {
                            reverse_on_failure: true
                        }
                    );
                    s = if reverse && self.unhealthy.is_some() {
                        State::Reverse
                    } else {
                        State::Done
                    };
                    continue;
                }
                State::Demote(member) => Some(Effect::Demote { member }),
                State::Reverse => Some(Effect::Reverse),
                State::Resend(member) => Some(Effect::Resend { member }),
                State::Unfreeze(i) if i >= self.frozen => {
                    s = if cutover {
                        State::StartSource
                    } else {
                        self.resume_source_vm_then(State::Done)
                    };
                    continue;
                }
                State::Unfreeze(member) => Some(Effect::Unfreeze { member }),
                State::StartSource => Some(Effect::StartSource),
                State::ResumeSourceVm => Some(Effect::ResumeSourceVm),
                State::StopSourceVm => Some(Effect::StopSourceVm),
                State::Done => {
                    self.finish();
                    None
                }
            };
            self.state = s;
            return effect;
        }
    }

    fn finish(&mut self) {
        self.outcome = Some(if let Some(a) = &self.abort {
            Outcome::RolledBack(a.clone())
        } else if let Some((serving, why)) = &self.partly {
            Outcome::CommittedPartly {
                serving: *serving,
                members: self.plan.members,
                why: why.clone(),
            }
        } else {
            Outcome::Committed {
                unhealthy: self.unhealthy.clone(),
                reversed: self.reversed.clone(),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: Kind, members: usize, check: bool) -> Plan {
        Plan {
            kind,
            members,
            drain_timeout_ms: 10_000,
            check,
            check_timeout_ms: 300,
            check_retry_ms: 100,
            live_vm: false,
        }
    }

    fn live(mut p: Plan) -> Plan {
        p.live_vm = true;
        p
    }

    fn cutover(members: usize, check: bool) -> Plan {
        plan(
            Kind::Cutover {
                reverse_on_failure: true,
            },
            members,
            check,
        )
    }

    /// The answer that lets the handover go on.
    fn ok(e: &Effect) -> Input {
        match e {
            Effect::MoveVm => Input::VmMoved(Ok(())),
            Effect::RunStopHook => Input::StopHook(Ok(())),
            Effect::Drain { .. } => Input::Drained(Ok(())),
            Effect::Compare { .. } => Input::Compared(Comparison::Equal),
            Effect::Commit => Input::Commit(CommitAnswer::Committed),
            Effect::ProbeCommit { .. } => Input::Probed(true),
            Effect::StartTarget => Input::Started(Ok(())),
            Effect::Check => Input::Checked(Ok(())),
            Effect::Reverse => Input::Reversed(Ok(())),
            _ => Input::Done,
        }
    }

    /// Runs `h`, answering with `answer` (None: the answer that goes on),
    /// one millisecond per effect; returns every effect asked for.
    fn run(h: &mut Handover, mut answer: impl FnMut(&Effect) -> Option<Input>) -> Vec<Effect> {
        let mut now = 0;
        let mut seen = Vec::new();
        let mut e = h.start(now).unwrap();
        for _ in 0..10_000 {
            now += 1000;
            let Some(effect) = e.take() else {
                match h.wake_at() {
                    Some(at) => {
                        now = now.max(at);
                        e = h.tick(now);
                        continue;
                    }
                    None => return seen,
                }
            };
            let input = answer(&effect).unwrap_or_else(|| ok(&effect));
            seen.push(effect);
            e = h.step(now, input).unwrap();
        }
        panic!("the handover did not end: {seen:?}");
    }

    fn names(h: &Handover) -> Vec<&'static str> {
        h.timeline().steps.iter().map(|(s, _)| s.as_str()).collect()
    }

    #[test]
    fn a_cutover_runs_every_step_in_order_and_reports_them_by_name() {
        let mut h = Handover::new(cutover(2, true));
        let seen = run(&mut h, |_| None);
        use Effect::*;
        assert_eq!(
            seen,
            vec![
                Prehash { member: 0 },
                Prehash { member: 1 },
                FlushReplicas {
                    when: FlushWhen::BeforeStopHook,
                    timeout_ms: 10_000
                },
                RunStopHook,
                FlushReplicas {
                    when: FlushWhen::AfterStopHook,
                    timeout_ms: 10_000
                },
                Freeze { member: 0 },
                Freeze { member: 1 },
                Drain {
                    member: 0,
                    timeout_ms: 10_000
                },
                Drain {
                    member: 1,
                    timeout_ms: 10_000
                },
                Compare { member: 0 },
                Compare { member: 1 },
                Commit,
                CloseGate { member: 0 },
                CloseGate { member: 1 },
                StartTarget,
                RecordReverse,
                Check,
                Demote { member: 0 },
                Demote { member: 1 },
            ]
        );
        assert_eq!(
            names(&h),
            [
                "prehashed",
                "preflushed",
                "stopped",
                "flushed",
                "frozen",
                "drained",
                "verified",
                "committed",
                "target-started",
                "checked",
                "source-replica"
            ]
        );
        assert_eq!(
            h.outcome(),
            Some(&Outcome::Committed {
                unhealthy: None,
                reversed: None
            })
        );
        let t = h.timeline();
        // Frozen when the first freeze was asked (after "flushed"); serving
        // when the start hook returned.
        assert_eq!(t.frozen_at, t.at(Step::Flushed));
        assert_eq!(t.serving_at, t.at(Step::TargetStarted));
        assert_eq!(
            t.downtime_us(),
            Some(t.at(Step::TargetStarted).unwrap() - t.at(Step::Flushed).unwrap())
        );
        assert_eq!(t.stop_at, t.at(Step::Preflushed));
        assert_eq!(
            t.outage_us(),
            Some(t.at(Step::Checked).unwrap() - t.at(Step::Preflushed).unwrap())
        );
    }

    #[test]
    fn a_switchover_has_no_stop_hook_commits_by_resigning_and_checks_the_peer_serves() {
        let mut h = Handover::new(plan(Kind::Switchover, 1, true));
        let seen = run(&mut h, |_| None);
        use Effect::*;
        assert_eq!(
            seen,
            vec![
                Prehash { member: 0 },
                FlushReplicas {
                    when: FlushWhen::BeforeSwitchover,
                    timeout_ms: 10_000
                },
                Freeze { member: 0 },
                Drain {
                    member: 0,
                    timeout_ms: 10_000
                },
                Compare { member: 0 },
                Commit,
                Check,
            ]
        );
        let t = h.timeline();
        assert_eq!(t.stop_at, None);
        assert_eq!(t.frozen_at, t.at(Step::Preflushed));
        assert_eq!(t.serving_at, t.at(Step::Checked));
        assert!(h.outcome().unwrap().committed());
    }

    #[test]
    fn a_failed_stop_hook_starts_the_source_again_without_unfreezing_anything() {
        let mut h = Handover::new(cutover(2, false));
        let seen = run(&mut h, |e| {
            (*e == Effect::RunStopHook).then(|| Input::StopHook(Err("exit 3".into())))
        });
        assert_eq!(seen.last(), Some(&Effect::StartSource));
        assert!(!seen
            .iter()
            .any(|e| matches!(e, Effect::Freeze { .. } | Effect::Unfreeze { .. })));
        assert_eq!(
            h.outcome(),
            Some(&Outcome::RolledBack(Abort::StopHook("exit 3".into())))
        );
        assert!(!h.is_committed());
    }

    #[test]
    fn a_drain_timeout_unfreezes_every_member_and_starts_the_source_again() {
        let mut h = Handover::new(cutover(3, false));
        let seen = run(&mut h, |e| {
            matches!(e, Effect::Drain { member: 1, .. })
                .then(|| Input::Drained(Err("the replica did not catch up in time".into())))
        });
        let tail: Vec<_> = seen
            .iter()
            .skip_while(|e| **e != Effect::Unfreeze { member: 0 })
            .collect();
        assert_eq!(
            tail,
            [
                &Effect::Unfreeze { member: 0 },
                &Effect::Unfreeze { member: 1 },
                &Effect::Unfreeze { member: 2 },
                &Effect::StartSource
            ]
        );
        assert!(!seen
            .iter()
            .any(|e| matches!(e, Effect::Drain { member: 2, .. } | Effect::Compare { .. })));
        assert_eq!(
            h.outcome(),
            Some(&Outcome::RolledBack(Abort::Drain {
                member: 1,
                why: "the replica did not catch up in time".into()
            }))
        );
    }

    #[test]
    fn a_mismatch_resends_what_differs_then_rolls_back() {
        let mut h = Handover::new(cutover(2, false));
        let seen = run(&mut h, |e| {
            (*e == Effect::Compare { member: 1 })
                .then(|| Input::Compared(Comparison::Differs("1 block".into())))
        });
        let i = seen
            .iter()
            .position(|e| *e == Effect::Resend { member: 1 })
            .unwrap();
        assert_eq!(
            seen[i..],
            [
                Effect::Resend { member: 1 },
                Effect::Unfreeze { member: 0 },
                Effect::Unfreeze { member: 1 },
                Effect::StartSource
            ]
        );
        assert!(!seen.contains(&Effect::Commit));
        assert!(matches!(
            h.outcome(),
            Some(Outcome::RolledBack(Abort::Differs { member: 1, .. }))
        ));
    }

    #[test]
    fn a_comparison_that_cannot_be_made_resends_nothing() {
        let mut h = Handover::new(cutover(1, false));
        let seen = run(&mut h, |e| {
            matches!(e, Effect::Compare { .. })
                .then(|| Input::Compared(Comparison::Failed("no answer".into())))
        });
        assert!(!seen.iter().any(|e| matches!(e, Effect::Resend { .. })));
        assert_eq!(
            seen[seen.len() - 2..],
            [Effect::Unfreeze { member: 0 }, Effect::StartSource]
        );
        assert!(matches!(
            h.outcome(),
            Some(Outcome::RolledBack(Abort::Compare { .. }))
        ));
    }

    #[test]
    fn a_switchover_that_aborts_only_unfreezes() {
        let mut h = Handover::new(plan(Kind::Switchover, 2, true));
        let seen = run(&mut h, |e| {
            (*e == Effect::Commit)
                .then(|| Input::Commit(CommitAnswer::Refused("no manager".into())))
        });
        assert_eq!(
            seen[seen.len() - 2..],
            [
                Effect::Unfreeze { member: 0 },
                Effect::Unfreeze { member: 1 }
            ]
        );
        assert_eq!(
            h.outcome(),
            Some(&Outcome::RolledBack(Abort::CommitRefused(
                "no manager".into()
            )))
        );
    }

    #[test]
    fn a_refused_commit_rolls_back() {
        let mut h = Handover::new(cutover(1, true));
        let seen = run(&mut h, |e| {
            (*e == Effect::Commit).then(|| Input::Commit(CommitAnswer::Refused("409".into())))
        });
        assert_eq!(
            seen[seen.len() - 3..],
            [
                Effect::Commit,
                Effect::Unfreeze { member: 0 },
                Effect::StartSource
            ]
        );
        assert!(!h.outcome().unwrap().committed());
    }

    fn lost_commit(serving: &[bool]) -> (Handover, Vec<Effect>) {
        let mut h = Handover::new(cutover(serving.len(), false));
        let s = serving.to_vec();
        let seen = run(&mut h, move |e| match e {
            Effect::Commit => Some(Input::Commit(CommitAnswer::Lost("timed out".into()))),
            Effect::ProbeCommit { member } => Some(Input::Probed(s[*member])),
            _ => None,
        });
        (h, seen)
    }

    #[test]
    fn a_lost_commit_answer_with_nothing_taken_over_rolls_back() {
        let (h, seen) = lost_commit(&[false, false]);
        let i = seen.iter().position(|e| *e == Effect::Commit).unwrap();
        assert_eq!(
            seen[i + 1..],
            [
                Effect::ProbeCommit { member: 0 },
                Effect::ProbeCommit { member: 1 },
                Effect::Unfreeze { member: 0 },
                Effect::Unfreeze { member: 1 },
                Effect::StartSource
            ]
        );
        assert_eq!(
            h.outcome(),
            Some(&Outcome::RolledBack(Abort::NotTakenOver(
                "timed out".into()
            )))
        );
    }

    #[test]
    fn a_lost_commit_answer_with_everything_taken_over_goes_on() {
        let (h, seen) = lost_commit(&[true, true]);
        assert!(seen.contains(&Effect::StartTarget));
        assert!(!seen
            .iter()
            .any(|e| matches!(e, Effect::Unfreeze { .. } | Effect::StartSource)));
        assert_eq!(
            h.outcome(),
            Some(&Outcome::Committed {
                unhealthy: None,
                reversed: None
            })
        );
        assert!(h.timeline().at(Step::Committed).is_some());
    }

    #[test]
    fn a_lost_commit_answer_with_some_taken_over_is_committed_and_goes_no_further() {
        let (h, seen) = lost_commit(&[true, false, true]);
        let i = seen
            .iter()
            .position(|e| *e == Effect::ProbeCommit { member: 2 })
            .unwrap();
        assert_eq!(
            seen[i + 1..],
            [
                Effect::CloseGate { member: 0 },
                Effect::CloseGate { member: 1 },
                Effect::CloseGate { member: 2 }
            ]
        );
        assert_eq!(
            h.outcome(),
            Some(&Outcome::CommittedPartly {
                serving: 2,
                members: 3,
                why: "timed out".into()
            })
        );
        assert!(h.is_committed());
    }

    #[test]
    fn a_failed_start_skips_the_check_demotes_and_reverses() {
        let mut h = Handover::new(cutover(1, true));
        let seen = run(&mut h, |e| {
            (*e == Effect::StartTarget).then(|| Input::Started(Err("exit 1".into())))
        });
        assert_eq!(
            seen[seen.len() - 4..],
            [
                Effect::StartTarget,
                Effect::RecordReverse,
                Effect::Demote { member: 0 },
                Effect::Reverse
            ]
        );
        assert_eq!(
            h.outcome(),
            Some(&Outcome::Committed {
                unhealthy: Some("exit 1".into()),
                reversed: Some(Ok(()))
            })
        );
        assert_eq!(h.timeline().outage_us(), None);
        assert!(h.timeline().downtime_us().is_some());
    }

    #[test]
    fn a_reverse_cutover_never_reverses_again() {
        let mut h = Handover::new(plan(
            Kind::Cutover {
                reverse_on_failure: false,
            },
            1,
            true,
        ));
        let seen = run(&mut h, |e| {
            (*e == Effect::StartTarget).then(|| Input::Started(Err("exit 1".into())))
        });
        assert!(!seen.contains(&Effect::Reverse));
        assert_eq!(
            h.outcome(),
            Some(&Outcome::Committed {
                unhealthy: Some("exit 1".into()),
                reversed: None
            })
        );
    }

    #[test]
    fn a_failing_check_is_retried_until_its_deadline_then_reversed() {
        let mut h = Handover::new(cutover(1, true));
        let seen = run(&mut h, |e| {
            (*e == Effect::Check).then(|| Input::Checked(Err("down".into())))
        });
        // Asked at 0 ms, then every 100 ms until 300 ms have passed.
        let checks = seen.iter().filter(|e| **e == Effect::Check).count();
        assert!((3..=5).contains(&checks), "{checks} checks: {seen:?}");
        assert_eq!(seen.last(), Some(&Effect::Reverse));
        assert_eq!(
            h.outcome(),
            Some(&Outcome::Committed {
                unhealthy: Some("down".into()),
                reversed: Some(Ok(()))
            })
        );
    }

    #[test]
    fn a_check_that_passes_on_a_later_attempt_is_healthy_and_ends_the_outage_then() {
        let mut h = Handover::new(cutover(1, true));
        let mut n = 0;
        let seen = run(&mut h, |e| {
            (*e == Effect::Check).then(|| {
                n += 1;
                Input::Checked(if n < 2 {
                    Err("starting".into())
                } else {
                    Ok(())
                })
            })
        });
        assert!(!seen.contains(&Effect::Reverse));
        let t = h.timeline();
        assert!(t.healthy_at.unwrap() >= t.serving_at.unwrap() + 100_000);
        assert!(matches!(
            h.outcome(),
            Some(Outcome::Committed {
                unhealthy: None,
                ..
            })
        ));
    }

    #[test]
    fn a_switchover_whose_peer_never_serves_stays_committed_with_nothing_undone() {
        let mut h = Handover::new(plan(Kind::Switchover, 1, true));
        let seen = run(&mut h, |e| {
            (*e == Effect::Check).then(|| Input::Checked(Err("not serving".into())))
        });
        assert!(!seen.iter().any(|e| matches!(
            e,
            Effect::Unfreeze { .. } | Effect::Demote { .. } | Effect::Reverse
        )));
        assert_eq!(
            h.outcome(),
            Some(&Outcome::Committed {
                unhealthy: Some("not serving".into()),
                reversed: None
            })
        );
        assert_eq!(h.timeline().serving_at, None);
    }

    #[test]
    fn an_input_that_does_not_answer_the_pending_effect_is_refused() {
        let mut h = Handover::new(cutover(1, false));
        assert_eq!(h.start(0).unwrap(), Some(Effect::Prehash { member: 0 }));
        assert!(matches!(
            h.step(1, Input::Commit(CommitAnswer::Committed)),
            Err(HandoverError::Unexpected {
                input: "commit",
                ..
            })
        ));
        // Unchanged: the right answer still works.
        assert!(matches!(
            h.step(2, Input::Done),
            Ok(Some(Effect::FlushReplicas { .. }))
        ));
        assert_eq!(h.start(3), Err(HandoverError::StartedTwice));
    }

    #[test]
    fn a_workload_without_members_still_runs_its_hooks() {
        let mut h = Handover::new(cutover(0, false));
        let seen = run(&mut h, |_| None);
        assert!(seen.contains(&Effect::RunStopHook) && seen.contains(&Effect::StartTarget));
        assert!(h.outcome().unwrap().committed());
    }

    #[test]
    fn a_live_vm_move_precopies_before_the_stop_hook_and_stops_the_source_vm_after_the_target_continues(
    ) {
        let mut h = Handover::new(live(cutover(1, true)));
        let seen = run(&mut h, |_| None);
        use Effect::*;
        assert_eq!(
            seen,
            vec![
                Prehash { member: 0 },
                FlushReplicas {
                    when: FlushWhen::BeforeStopHook,
                    timeout_ms: 10_000
                },
                MoveVm,
                RunStopHook,
                FlushReplicas {
                    when: FlushWhen::AfterStopHook,
                    timeout_ms: 10_000
                },
                Freeze { member: 0 },
                Drain {
                    member: 0,
                    timeout_ms: 10_000
                },
                Compare { member: 0 },
                Commit,
                CloseGate { member: 0 },
                StartTarget,
                StopSourceVm,
                RecordReverse,
                Check,
                Demote { member: 0 },
            ]
        );
        assert_eq!(
            names(&h),
            [
                "prehashed",
                "preflushed",
                "vm-moved",
                "stopped",
                "flushed",
                "frozen",
                "drained",
                "verified",
                "committed",
                "target-started",
                "source-vm-stopped",
                "checked",
                "source-replica"
            ]
        );
    }

    #[test]
    fn a_failed_vm_move_resumes_the_source_vm_and_freezes_nothing() {
        let mut h = Handover::new(live(cutover(2, false)));
        let seen = run(&mut h, |e| {
            (*e == Effect::MoveVm).then(|| Input::VmMoved(Err("the target QEMU died".into())))
        });
        assert_eq!(
            &seen[seen.len() - 3..],
            [Effect::MoveVm, Effect::StartSource, Effect::ResumeSourceVm]
        );
        assert_eq!(
            h.outcome(),
            Some(&Outcome::RolledBack(Abort::VmMove(
                "the target QEMU died".into()
            )))
        );
    }

    #[test]
    fn a_mismatch_after_the_vm_moved_unfreezes_then_resumes_the_source_vm() {
        let mut h = Handover::new(live(cutover(1, false)));
        let seen = run(&mut h, |e| {
            matches!(e, Effect::Compare { .. })
                .then(|| Input::Compared(Comparison::Differs("block 7".into())))
        });
        let tail = &seen[seen.len() - 4..];
        assert_eq!(
            tail,
            [
                Effect::Resend { member: 0 },
                Effect::Unfreeze { member: 0 },
                Effect::StartSource,
                Effect::ResumeSourceVm
            ]
        );
        assert!(!seen.contains(&Effect::StopSourceVm));
    }

    #[test]
    fn a_live_switchover_stops_the_source_vm_right_after_resigning() {
        let mut h = Handover::new(live(plan(Kind::Switchover, 1, true)));
        let seen = run(&mut h, |_| None);
        let commit = seen.iter().position(|e| *e == Effect::Commit).unwrap();
        assert_eq!(
            &seen[commit..],
            [Effect::Commit, Effect::StopSourceVm, Effect::Check]
        );
        let mut h = Handover::new(live(plan(Kind::Switchover, 1, true)));
        let seen = run(&mut h, |e| {
            (*e == Effect::Commit).then(|| Input::Commit(CommitAnswer::Refused("no".into())))
        });
        assert_eq!(seen.last(), Some(&Effect::ResumeSourceVm));
    }

    /// Every answer an effect can get in the walk.
    fn answers(e: &Effect) -> Vec<Input> {
        let err = || Err("failed".to_string());
        match e {
            Effect::MoveVm => vec![Input::VmMoved(Ok(())), Input::VmMoved(err())],
            Effect::RunStopHook => vec![Input::StopHook(Ok(())), Input::StopHook(err())],
            Effect::Drain { .. } => vec![Input::Drained(Ok(())), Input::Drained(err())],
            Effect::Compare { .. } => vec![
                Input::Compared(Comparison::Equal),
                Input::Compared(Comparison::Differs("d".into())),
                Input::Compared(Comparison::Failed("f".into())),
            ],
            Effect::Commit => vec![
                Input::Commit(CommitAnswer::Committed),
                Input::Commit(CommitAnswer::Refused("r".into())),
                Input::Commit(CommitAnswer::Lost("l".into())),
            ],
            Effect::ProbeCommit { .. } => vec![Input::Probed(true), Input::Probed(false)],
            Effect::StartTarget => vec![Input::Started(Ok(())), Input::Started(err())],
            Effect::Check => vec![Input::Checked(Ok(())), Input::Checked(err())],
            Effect::Reverse => vec![Input::Reversed(Ok(())), Input::Reversed(err())],
            _ => vec![Input::Done],
        }
    }

    /// What a walk saw, checked at its end.
    fn check_end(plan: &Plan, h: &Handover, seen: &[Effect]) {
        let n = plan.members;
        let outcome = h.outcome().expect("ended without an outcome");
        let count = |f: &dyn Fn(&Effect) -> bool| seen.iter().filter(|e| f(e)).count();
        let commit_at = seen.iter().position(|e| *e == Effect::Commit);
        let cutover = matches!(plan.kind, Kind::Cutover { .. });
        match outcome {
            Outcome::RolledBack(abort) => {
                // The source serves: every member asked to freeze is
                // unfrozen, once, and (a cutover) its start hook runs once,
                // last; nothing of the target's side happened.
                let frozen = count(&|e| matches!(e, Effect::Freeze { .. }));
                for m in 0..frozen {
                    assert_eq!(count(&|e| *e == Effect::Unfreeze { member: m }), 1);
                }
                assert_eq!(count(&|e| matches!(e, Effect::Unfreeze { .. })), frozen);
                assert_eq!(
                    count(&|e| *e == Effect::StartSource),
                    usize::from(cutover),
                    "{seen:?}"
                );
                if cutover {
                    // Last, or just before a live move's resume.
                    let start_at = seen.iter().rposition(|e| *e == Effect::StartSource);
                    assert_eq!(start_at, Some(seen.len() - 1 - usize::from(plan.live_vm)));
                }
                assert_eq!(
                    count(&|e| matches!(
                        e,
                        Effect::CloseGate { .. }
                            | Effect::StartTarget
                            | Effect::Demote { .. }
                            | Effect::Reverse
                            | Effect::RecordReverse
                            | Effect::Check
                    )),
                    0
                );
                assert!(!h.is_committed());
                assert_eq!(
                    count(&|e| matches!(e, Effect::Resend { .. })),
                    usize::from(matches!(abort, Abort::Differs { .. }))
                );
            }
            Outcome::Committed { .. } | Outcome::CommittedPartly { .. } => {
                // Committed: nothing undone, and (a cutover) every gate
                // closed.
                assert!(h.is_committed());
                assert_eq!(
                    count(&|e| matches!(e, Effect::Unfreeze { .. } | Effect::StartSource)),
                    0,
                    "{seen:?}"
                );
                assert_eq!(count(&|e| matches!(e, Effect::Resend { .. })), 0);
                if cutover {
                    for m in 0..n {
                        assert_eq!(count(&|e| *e == Effect::CloseGate { member: m }), 1);
                    }
                }
                let commit_at = commit_at.expect("committed without a commit");
                // Nothing of the target's side before the commit.
                assert!(!seen[..commit_at].iter().any(|e| matches!(
                    e,
                    Effect::CloseGate { .. }
                        | Effect::StartTarget
                        | Effect::Demote { .. }
                        | Effect::Check
                )));
                if let Outcome::CommittedPartly { serving, .. } = outcome {
                    assert!(*serving > 0 && *serving < n);
                    assert_eq!(count(&|e| *e == Effect::StartTarget), 0);
                }
            }
        }
        // Every member frozen before any drain, every drain before any
        // compare, the stop hook (if any) before the freeze.
        let first = |f: &dyn Fn(&Effect) -> bool| seen.iter().position(f);
        let last = |f: &dyn Fn(&Effect) -> bool| seen.iter().rposition(f);
        if let (Some(a), Some(b)) = (
            last(&|e| matches!(e, Effect::Freeze { .. })),
            first(&|e| matches!(e, Effect::Drain { .. })),
        ) {
            assert!(a < b);
        }
        if let (Some(a), Some(b)) = (
            first(&|e| *e == Effect::RunStopHook),
            first(&|e| matches!(e, Effect::Freeze { .. })),
        ) {
            assert!(a < b);
        }
        if !cutover {
            assert_eq!(count(&|e| *e == Effect::RunStopHook), 0);
        }
        // A live VM move: the move first, before the stop hook and the
        // freeze; a rollback resumes the VM at the source once, last; a
        // commit stops it there once, after the commit (a cutover: after
        // the target started), and never resumes it.
        let moved = count(&|e| *e == Effect::MoveVm);
        let resumed = count(&|e| *e == Effect::ResumeSourceVm);
        let stopped = count(&|e| *e == Effect::StopSourceVm);
        if !plan.live_vm {
            assert_eq!((moved, resumed, stopped), (0, 0, 0), "{seen:?}");
            return;
        }
        assert_eq!(moved, 1, "{seen:?}");
        let moved_at = first(&|e| *e == Effect::MoveVm).unwrap();
        assert!(!seen[..moved_at].iter().any(|e| matches!(
            e,
            Effect::RunStopHook | Effect::Freeze { .. } | Effect::Commit
        )));
        if outcome.committed() {
            assert_eq!((resumed, stopped), (0, 1), "{seen:?}");
            let stop_at = first(&|e| *e == Effect::StopSourceVm).unwrap();
            assert!(stop_at > commit_at.unwrap());
            if let Some(started) = first(&|e| *e == Effect::StartTarget) {
                assert!(started < stop_at, "{seen:?}");
            }
        } else {
            assert_eq!((resumed, stopped), (1, 0), "{seen:?}");
            assert_eq!(seen.last(), Some(&Effect::ResumeSourceVm));
        }
    }

    /// Walks every sequence of answers (and, at each wait, time passing).
    fn walk(
        plan: &Plan,
        h: Handover,
        now: Micros,
        e: Option<Effect>,
        seen: &mut Vec<Effect>,
        ends: &mut std::collections::BTreeMap<String, usize>,
    ) {
        let Some(effect) = e else {
            if let Some(at) = h.wake_at() {
                let mut h = h;
                let e = h.tick(at);
                assert!(e.is_some(), "a tick at wake_at did nothing");
                return walk(plan, h, at, e, seen, ends);
            }
            check_end(plan, &h, seen);
            // The outcome's shape: its variant and, for an abort, which.
            let shape = match h.outcome().unwrap() {
                Outcome::RolledBack(a) => format!("{a:?}")
                    .split([' ', '('])
                    .next()
                    .unwrap()
                    .to_string(),
                Outcome::Committed {
                    unhealthy,
                    reversed,
                } => {
                    format!("committed/{}/{}", unhealthy.is_some(), reversed.is_some())
                }
                Outcome::CommittedPartly { .. } => "partly".into(),
            };
            *ends.entry(shape).or_default() += 1;
            return;
        };
        assert!(h.outcome().is_none(), "an effect after the end: {effect:?}");
        assert!(seen.len() < 200, "too long: {seen:?}");
        for input in answers(&effect) {
            let mut h = h.clone();
            let now = now + 50_000;
            let next = h.step(now, input).unwrap();
            seen.push(effect.clone());
            walk(plan, h, now, next, seen, ends);
            seen.pop();
        }
    }

    #[test]
    fn every_sequence_of_failures_ends_either_committed_or_rolled_back_with_the_source_serving() {
        let mut ends = std::collections::BTreeMap::new();
        for members in 0..=3 {
            for kind in [
                Kind::Cutover {
                    reverse_on_failure: true,
                },
                Kind::Cutover {
                    reverse_on_failure: false,
                },
                Kind::Switchover,
            ] {
                for check in [false, true] {
                    for live_vm in [false, true] {
                        let mut p = plan(kind, members, check);
                        p.live_vm = live_vm;
                        let mut h = Handover::new(p.clone());
                        let e = h.start(0).unwrap();
                        walk(&p, h, 0, e, &mut Vec::new(), &mut ends);
                    }
                }
            }
        }
        // Not a tautology: the walk reached every kind of ending.
        let shapes: Vec<&str> = ends.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            shapes,
            [
                "CommitRefused",
                "Compare",
                "Differs",
                "Drain",
                "NotTakenOver",
                "StopHook",
                "VmMove",
                "committed/false/false",
                "committed/true/false",
                "committed/true/true",
                "partly"
            ],
            "{ends:?}"
        );
    }
}
