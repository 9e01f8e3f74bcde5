//! The one driver of [`ferry_core::handover::Handover`]: a cutover
//! (`migrate::cutover_with`, and the reverse cutover of a rollback or of a
//! failed start), and a cluster switchover (`cluster::switchover`) run the
//! same machine here.
//!
//! The machine decides; this driver only performs its effects, one at a
//! time, on the workload's [`Member`]s (its volumes and shares, in the
//! workload's order) and on the handover's [`Side`] (what is not a member's:
//! hooks, the commit, the check — a cutover's and a switchover's differ), and
//! passes the clock in. Members and sides get everything they need when they
//! are built: neither sees the agent.

pub mod members;
mod node;

pub use node::Node;

use std::time::{Duration, Instant};

use ferry_core::handover::{
    CommitAnswer, Comparison, Effect, Handover, HandoverError, Input, Outcome, Plan, Timeline,
};

/// A volume or a share of the workload being handed over, as the handover
/// sees it (this node serves it; the target holds its replica).
pub trait Member: Send + Sync {
    /// `volume NAME` / `share NAME`, for messages.
    fn label(&self) -> String;
    /// Brings both sides' hashes up to date while the workload runs. Best
    /// effort: logs what fails.
    fn prehash(&self);
    /// Has the replica make durable what it holds, writes still flowing, so
    /// the drain in the freeze has little left. Best effort: logs what fails.
    fn flush(&self, timeout: Duration, why: &str);
    /// New writes wait (returns once none is between its gate and the link).
    fn freeze(&self);
    /// Writes flow again (an abort).
    fn unfreeze(&self);
    /// Waits until the replica holds everything durably.
    fn drain(&self, timeout: Duration) -> Result<(), String>;
    /// Compares the two copies.
    fn compare(&self) -> Comparison;
    /// After a [`Comparison::Differs`]: marks the target inconsistent over
    /// what differs and has it resent.
    fn resend(&self);
    /// The target owns it now: held and new writes fail.
    fn close_gate(&self);
    /// Whether the target serves it now (the commit's answer was lost).
    fn target_serves(&self) -> bool;
    /// Becomes the target's replica here.
    fn demote(&self) -> Result<(), String>;
}

/// What a handover does that is not a member's; a cutover and a switchover
/// each implement it. The machine asks only for what its kind needs (a
/// switchover never runs a stop hook, starts the target or reverses).
pub trait Side {
    /// The workload's stop hook at the source (none defined: `Ok`).
    fn run_stop_hook(&mut self) -> Result<(), String>;
    /// The commit point.
    fn commit(&mut self) -> CommitAnswer;
    /// The target records the way back. Best effort.
    fn record_reverse(&mut self);
    /// The workload's start hook at the target.
    fn start_target(&mut self) -> Result<(), String>;
    /// One attempt of the check.
    fn check(&mut self) -> Result<(), String>;
    /// A reverse cutover from the target.
    fn reverse(&mut self) -> Result<(), String>;
    /// Rollback: the start hook at the source again.
    fn start_source(&mut self);
    /// A live VM move: the VM's RAM to the target until QEMU completes (the
    /// source paused). Only asked when the plan says `live_vm`.
    fn move_vm(&mut self) -> Result<(), String> {
        Err("this handover does not move a VM live".into())
    }
    /// Rollback of a live move: the target's VM ends, the source's goes on.
    fn resume_source_vm(&mut self) {}
    /// After the commit of a live move: the source's paused VM quits.
    fn stop_source_vm(&mut self) {}
}

/// How a handover ended, and when each of its steps was reached.
pub struct Ran {
    pub outcome: Outcome,
    pub timeline: Timeline,
}

/// Runs the handover `plan` for `members` (as many as `plan.members`) and
/// `side` until it ends.
pub fn run(
    plan: Plan,
    members: &[Box<dyn Member>],
    side: &mut dyn Side,
    workload: &str,
) -> Result<Ran, HandoverError> {
    debug_assert_eq!(plan.members, members.len());
    let t0 = Instant::now();
    let now = || t0.elapsed().as_micros() as u64;
    let mut h = Handover::new(plan);
    let mut next = h.start(now())?;
    loop {
        let Some(effect) = next.take() else {
            match h.wake_at() {
                Some(at) => {
                    let wait = at.saturating_sub(now());
                    std::thread::sleep(Duration::from_micros(wait));
                    next = h.tick(now());
                    continue;
                }
                None => break,
            }
        };
        let input = perform(&effect, members, side, workload);
        next = h.step(now(), input)?;
    }
    let outcome = h
        .outcome()
        .cloned()
        .ok_or_else(|| HandoverError::Unexpected {
            input: "none",
            pending: "the handover stopped without an outcome".into(),
        })?;
    Ok(Ran {
        outcome,
        timeline: h.timeline().clone(),
    })
}

/// Performs one effect; returns its result for the machine.
fn perform(
    effect: &Effect,
    members: &[Box<dyn Member>],
    side: &mut dyn Side,
    workload: &str,
) -> Input {
    let ms = Duration::from_millis;
    match *effect {
        Effect::Prehash { member } => {
            members[member].prehash();
            Input::Done
        }
        Effect::FlushReplicas { when, timeout_ms } => {
            // All at once: each waits for its own replica.
            std::thread::scope(|sc| {
                for m in members {
                    sc.spawn(move || m.flush(ms(timeout_ms), when.as_str()));
                }
            });
            Input::Done
        }
        Effect::MoveVm => {
            // The guest keeps writing while its RAM is copied; the volumes'
            // background leaf refresh keeps their hashes current meanwhile
            // (a re-hash from here would have to be joined inside the
            // pause: measured 30+ ms of it).
            let r = side.move_vm();
            if let Err(why) = &r {
                tracing::warn!(workload, error = %why, "handover.vm_move_failed: the guest goes on at the source");
            }
            Input::VmMoved(r)
        }
        Effect::ResumeSourceVm => {
            side.resume_source_vm();
            Input::Done
        }
        Effect::StopSourceVm => {
            side.stop_source_vm();
            Input::Done
        }
        Effect::RunStopHook => Input::StopHook(side.run_stop_hook()),
        Effect::Freeze { member } => {
            members[member].freeze();
            Input::Done
        }
        Effect::Drain { member, timeout_ms } => {
            let m = &members[member];
            Input::Drained(
                m.drain(ms(timeout_ms))
                    .map_err(|e| format!("{}: {e}", m.label())),
            )
        }
        Effect::Compare { member } => Input::Compared(members[member].compare()),
        Effect::Resend { member } => {
            members[member].resend();
            Input::Done
        }
        Effect::Commit => {
            let answer = side.commit();
            if let CommitAnswer::Lost(why) = &answer {
                tracing::warn!(workload, error = %why, "handover.commit.answer_lost: asking the target what it serves");
            }
            Input::Commit(answer)
        }
        Effect::ProbeCommit { member } => {
            let serves = members[member].target_serves();
            tracing::info!(workload, member = %members[member].label(), serves, "handover.commit.probed");
            Input::Probed(serves)
        }
        Effect::RecordReverse => {
            side.record_reverse();
            Input::Done
        }
        Effect::CloseGate { member } => {
            members[member].close_gate();
            Input::Done
        }
        Effect::StartTarget => Input::Started(side.start_target()),
        Effect::Check => Input::Checked(side.check()),
        Effect::Demote { member } => {
            // After the commit point nothing is undone: a failure is logged.
            let m = &members[member];
            if let Err(e) = m.demote() {
                tracing::error!(workload, member = %m.label(), error = %e, "cutover.demote_failed");
            }
            Input::Done
        }
        Effect::Reverse => Input::Reversed(side.reverse()),
        Effect::Unfreeze { member } => {
            members[member].unfreeze();
            Input::Done
        }
        Effect::StartSource => {
            side.start_source();
            Input::Done
        }
    }
}
