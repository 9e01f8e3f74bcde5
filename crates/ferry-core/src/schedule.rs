//! Scheduled cutovers and maintenance windows, sans IO.
//!
//! An operator asks for a cutover at a time (`--at`, RFC 3339), only inside
//! a recurring maintenance window (`--window 'Sat,Sun 02:00-04:00
//! Europe/Paris'`), before a deadline, or any mix of these. The agent keeps
//! a [`Schedule`] in the migration's record (so it survives restarts) and
//! asks it, on every tick, what to do ([`Schedule::decide`]): wait, try a
//! cutover, or give up with the reason. Time comes in as values: Unix
//! seconds, and the wall-clock time in the window's zone
//! ([`LocalTime`]), which the caller converts with its time-zone database —
//! nothing here reads a clock or a file.
//!
//! The rules:
//! - nothing happens before `at`;
//! - with a window, an attempt happens only inside it. A one-off schedule
//!   (`migrate cutover --at/--window`) uses the first window it reaches: when
//!   that occurrence closes before a cutover succeeded, it gives up. A
//!   recurring one (`migrate start --auto-cutover --window`) waits for the
//!   next occurrence instead, until its deadline;
//! - a migration that is not `ready` when an attempt is due is checked
//!   again every `retry_secs` (each check is an attempt, logged with its
//!   outcome); a cutover that aborts is retried likewise, at most
//!   [`CUTOVER_ATTEMPTS_MAX`] times;
//! - past the deadline (explicit, or `at` + the grace a one-off schedule
//!   without window gets), it gives up.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Cutovers a schedule starts (that then abort) before it gives up.
pub const CUTOVER_ATTEMPTS_MAX: u32 = 3;

/// Day of the week, Monday = 0.
pub type Weekday = u8;

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MINUTES_PER_DAY: u16 = 24 * 60;

/// Wall-clock time in a window's zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// Monday = 0 … Sunday = 6.
    pub weekday: Weekday,
    /// Minutes since local midnight, 0..1440.
    pub minute: u16,
}

/// Why a window did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("a window is 'DAYS HH:MM-HH:MM ZONE', e.g. 'Sat,Sun 02:00-04:00 Europe/Paris' or 'Mon-Fri 22:00-02:00 UTC'; got {0:?}")]
    Shape(String),
    #[error(
        "unknown day {0:?}: use Mon, Tue, Wed, Thu, Fri, Sat, Sun, ranges like Mon-Fri, or daily"
    )]
    Day(String),
    #[error("bad time {0:?}: use HH:MM, 00:00 to 24:00")]
    Time(String),
    #[error("the window {0} is empty: its start and end are equal")]
    Empty(String),
}

/// A recurring maintenance window: on `days`, from `start` to `end` (local
/// minutes) in the zone `tz`. An `end` not after `start` runs past
/// midnight, into the next day (the day named is the day it opens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    /// Bit `d` set: the window opens on weekday `d` (Monday = 0).
    days: u8,
    start: u16,
    end: u16,
    tz: String,
}

impl Window {
    /// The IANA zone name (or `UTC`) the window's times are in.
    pub fn tz(&self) -> &str {
        &self.tz
    }

    fn opens_on(&self, d: Weekday) -> bool {
        self.days & (1 << (d % 7)) != 0
    }

    fn wraps(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `t` is inside the window.
    pub fn contains(&self, t: LocalTime) -> bool {
        self.minutes_left(t).is_some()
    }

    /// Minutes until the occurrence that contains `t` closes (`None` when
    /// `t` is outside the window).
    pub fn minutes_left(&self, t: LocalTime) -> Option<u16> {
        if !self.wraps() {
            return (self.opens_on(t.weekday) && t.minute >= self.start && t.minute < self.end)
                .then(|| self.end - t.minute);
        }
        // Past midnight: the part before `end` belongs to yesterday's opening.
        if t.minute >= self.start && self.opens_on(t.weekday) {
            return Some(MINUTES_PER_DAY - t.minute + self.end);
        }
        let yesterday = (t.weekday + 6) % 7;
        (t.minute < self.end && self.opens_on(yesterday)).then(|| self.end - t.minute)
    }

    /// The local (weekday offset from `t`'s day, minute) of the next opening
    /// at or after `t` (offset 0 = today), within the coming week.
    pub fn next_opening(&self, t: LocalTime) -> Option<(u8, u16)> {
        (0..8u8).find_map(|k| {
            let d = (t.weekday + k) % 7;
            (self.opens_on(d) && (k > 0 || t.minute <= self.start)).then_some((k, self.start))
        })
    }
}

fn hhmm(s: &str) -> Result<u16, WindowError> {
    let bad = || WindowError::Time(s.to_string());
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn day(s: &str) -> Result<Weekday, WindowError> {
    DAY_NAMES
        .iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .map(|d| d as Weekday)
        .ok_or_else(|| WindowError::Day(s.to_string()))
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(s: &str) -> Result<Window, WindowError> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [days, times, tz] = parts[..] else {
            return Err(WindowError::Shape(s.to_string()));
        };
        let mut mask = 0u8;
        for item in days.split(',') {
            if item.eq_ignore_ascii_case("daily") || item == "*" {
                mask = 0x7f;
            } else if let Some((a, b)) = item.split_once('-') {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            } else {
                mask |= 1 << day(item)?;
            }
        }
        let (a, b) = times
            .split_once('-')
            .ok_or_else(|| WindowError::Shape(s.to_string()))?;
        let (start, end) = (hhmm(a)?, hhmm(b)?);
        if start == end {
            return Err(WindowError::Empty(s.to_string()));
        }
        if start == MINUTES_PER_DAY {
            return Err(WindowError::Time(a.to_string()));
        }
        // A zone name: letters, digits and `/_+-` only (it becomes a path
        // in the caller's zone database).
        let tz_ok = !tz.is_empty()
            && tz.len() <= 64
            && !tz.starts_with('/')
            && !tz.split('/').any(|c| c.is_empty() || c == "." || c == "..")
            && tz
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
        if !tz_ok {
            return Err(WindowError::Shape(s.to_string()));
        }
        // `24:00` as an end stays 1440: `00:00-24:00` is the whole day.
        Ok(Window {
            days: mask,
            start,
            end,
            tz: tz.to_string(),
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<&str> = (0..7)
            .filter(|&d| self.opens_on(d))
            .map(|d| DAY_NAMES[d as usize])
            .collect();
        let days = if days.len() == 7 {
            "daily".to_string()
        } else {
            days.join(",")
        };
        write!(
            f,
            "{days} {:02}:{:02}-{:02}:{:02} {}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60,
            self.tz
        )
    }
}

impl TryFrom<String> for Window {
    type Error = WindowError;
    fn try_from(s: String) -> Result<Window, WindowError> {
        s.parse()
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

/// Where a schedule is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleState {
    /// Waiting for its time, its window or a ready migration.
    Pending,
    /// A cutover it started is running.
    CuttingOver,
    /// A cutover it started succeeded.
    Done,
    /// It stopped trying; `reason` says why.
    GaveUp,
}

/// A scheduled cutover, as kept in the migration's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Not before this (Unix seconds).
    pub at_unix: Option<i64>,
    /// Only inside this window.
    pub window: Option<Window>,
    /// Gives up after this (Unix seconds).
    pub deadline_unix: Option<i64>,
    /// Any occurrence of the window until the deadline (`--auto-cutover`),
    /// rather than the first one reached.
    pub recurring: bool,
    /// A migration found not ready is checked again this often.
    pub retry_secs: u32,
    pub state: ScheduleState,
    /// Checks made and cutovers started (each logged with its outcome).
    pub attempts: u32,
    /// Cutovers started (that aborted, while `Pending`).
    pub cutovers: u32,
    pub last_attempt_unix: Option<i64>,
    /// What the last attempt found or did.
    pub last_outcome: Option<String>,
    /// Why it gave up.
    pub reason: Option<String>,
    /// The window occurrence it is in, as the Unix second it saw it open
    /// (one-off schedules give up when that occurrence closes).
    pub in_window_since: Option<i64>,
}

/// What the caller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing yet.
    Wait,
    /// The migration is not ready (`why`): record that this check found so
    /// ([`Schedule::checked`]) and log it.
    NotReady,
    /// Start a cutover now, and report its end with
    /// [`Schedule::cutover_ended`].
    Cutover,
    /// Stop trying ([`Schedule::give_up`] has recorded it): `reason`.
    GiveUp(String),
}

impl Schedule {
    /// A schedule: at least one of `at`, `window`; `grace_secs` bounds a
    /// one-off schedule that has neither a window nor a deadline.
    pub fn new(
        at_unix: Option<i64>,
        window: Option<Window>,
        deadline_unix: Option<i64>,
        recurring: bool,
        retry_secs: u32,
        grace_secs: i64,
    ) -> Schedule {
        let deadline_unix = match (deadline_unix, &window, at_unix) {
            (Some(d), _, _) => Some(d),
            (None, None, Some(at)) if !recurring => Some(at.saturating_add(grace_secs)),
            _ => None,
        };
        Schedule {
            at_unix,
            window,
            deadline_unix,
            recurring,
            retry_secs: retry_secs.max(1),
            state: ScheduleState::Pending,
            attempts: 0,
            cutovers: 0,
            last_attempt_unix: None,
            last_outcome: None,
            reason: None,
            in_window_since: None,
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self.state, ScheduleState::Done | ScheduleState::GaveUp)
    }

    /// What to do at `now` (Unix seconds), with `local` the wall-clock time
    /// in the window's zone (ignored without a window), `ready` whether the
    /// migration can be cut over now and `not_ready` what it is instead.
    pub fn decide(
        &mut self,
        now: i64,
        local: Option<LocalTime>,
        ready: bool,
        not_ready: &str,
    ) -> Decision {
        if self.state != ScheduleState::Pending {
            return Decision::Wait;
        }
        if let Some(d) = self.deadline_unix {
            if now >= d {
                let why = format!(
                    "the deadline passed before a cutover succeeded{}",
                    self.last_words()
                );
                self.give_up(why.clone());
                return Decision::GiveUp(why);
            }
        }
        if self.at_unix.is_some_and(|at| now < at) {
            return Decision::Wait;
        }
        if let Some(w) = &self.window {
            let inside = local.is_some_and(|t| w.contains(t));
            match (inside, self.in_window_since) {
                (true, None) => self.in_window_since = Some(now),
                (false, Some(_)) if !self.recurring => {
                    let why = format!(
                        "the window {w} closed before a cutover succeeded{}",
                        self.last_words()
                    );
                    self.give_up(why.clone());
                    return Decision::GiveUp(why);
                }
                (false, Some(_)) => self.in_window_since = None,
                _ => {}
            }
            if !inside {
                return Decision::Wait;
            }
        }
        let due = self
            .last_attempt_unix
            .is_none_or(|t| now >= t.saturating_add(i64::from(self.retry_secs)));
        if !due {
            return Decision::Wait;
        }
        self.attempts += 1;
        self.last_attempt_unix = Some(now);
        if !ready {
            self.last_outcome = Some(format!("not ready: {not_ready}"));
            return Decision::NotReady;
        }
        self.cutovers += 1;
        self.state = ScheduleState::CuttingOver;
        self.last_outcome = Some("cutting over".into());
        Decision::Cutover
    }

    /// The cutover it started ended: `Ok(downtime summary)` or the error.
    pub fn cutover_ended(&mut self, now: i64, outcome: Result<String, String>) {
        self.last_attempt_unix = Some(now);
        match outcome {
            Ok(s) => {
                self.state = ScheduleState::Done;
                self.last_outcome = Some(format!("done: {s}"));
            }
            Err(e) => {
                self.last_outcome = Some(format!("cutover failed: {e}"));
                if self.cutovers >= CUTOVER_ATTEMPTS_MAX {
                    self.give_up(format!("{} cutovers aborted; the last: {e}", self.cutovers));
                } else {
                    self.state = ScheduleState::Pending;
                }
            }
        }
    }

    /// An agent restarted while a cutover it started was running: the
    /// migration's record says how that ended; until then, `Pending`.
    pub fn restarted(&mut self) {
        if self.state == ScheduleState::CuttingOver {
            self.state = ScheduleState::Pending;
        }
    }

    pub fn give_up(&mut self, why: String) {
        self.state = ScheduleState::GaveUp;
        self.reason = Some(why);
    }

    fn last_words(&self) -> String {
        match &self.last_outcome {
            Some(o) => format!(" (last attempt: {o})"),
            None => " (no attempt was due)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Window {
        s.parse().unwrap()
    }
    fn t(weekday: u8, h: u16, m: u16) -> LocalTime {
        LocalTime {
            weekday,
            minute: h * 60 + m,
        }
    }

    #[test]
    fn windows_parse_and_print() {
        assert_eq!(
            w("Sat,Sun 02:00-04:00 Europe/Paris").to_string(),
            "Sat,Sun 02:00-04:00 Europe/Paris"
        );
        assert_eq!(
            w("mon-fri 22:00-02:30 UTC").to_string(),
            "Mon,Tue,Wed,Thu,Fri 22:00-02:30 UTC"
        );
        assert_eq!(
            w("Fri-Mon 00:00-24:00 UTC").to_string(),
            "Mon,Fri,Sat,Sun 00:00-24:00 UTC"
        );
        assert_eq!(
            w("daily 01:00-01:30 America/New_York").to_string(),
            "daily 01:00-01:30 America/New_York"
        );
        for bad in [
            "",
            "Sat 02:00-04:00",
            "Sat 02:00-04:00 Europe/Paris extra",
            "Sab 02:00-04:00 UTC",
            "Sat 2-4 UTC",
            "Sat 02:60-04:00 UTC",
            "Sat 25:00-04:00 UTC",
            "Sat 04:00-04:00 UTC",
            "Sat 24:00-04:00 UTC",
            "Sat 02:00-04:00 ../etc/passwd",
            "Sat 02:00-04:00 /etc/localtime",
            "Sat 02:00-04:00 Europe//Paris",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad:?} parsed");
        }
        let j = serde_json::to_string(&w("Sat 02:00-04:00 UTC")).unwrap();
        assert_eq!(j, "\"Sat 02:00-04:00 UTC\"");
        assert!(serde_json::from_str::<Window>("\"Sat 02:00 UTC\"").is_err());
    }

    #[test]
    fn membership_within_a_day_and_past_midnight() {
        let x = w("Sat,Sun 02:00-04:00 UTC");
        assert!(!x.contains(t(5, 1, 59)));
        assert_eq!(x.minutes_left(t(5, 2, 0)), Some(120));
        assert_eq!(x.minutes_left(t(6, 3, 59)), Some(1));
        assert!(!x.contains(t(6, 4, 0)));
        assert!(!x.contains(t(0, 3, 0)));
        // Fri 22:00 → Sat 02:00.
        let y = w("Fri 22:00-02:00 UTC");
        assert!(y.contains(t(4, 23, 0)));
        assert_eq!(y.minutes_left(t(4, 22, 0)), Some(240));
        assert_eq!(y.minutes_left(t(5, 1, 0)), Some(60));
        assert!(!y.contains(t(5, 2, 0)));
        assert!(
            !y.contains(t(4, 1, 0)),
            "Friday's early hours belong to Thursday's opening"
        );
        let all = w("daily 00:00-24:00 UTC");
        assert!((0..7).all(|d| all.contains(t(d, 0, 0)) && all.contains(t(d, 23, 59))));
        assert_eq!(x.next_opening(t(0, 12, 0)), Some((5, 120)));
        assert_eq!(x.next_opening(t(5, 1, 0)), Some((0, 120)));
        assert_eq!(x.next_opening(t(6, 3, 0)), Some((6, 120)));
    }

    #[test]
    fn an_at_schedule_waits_then_cuts_over_and_retries_not_ready() {
        let mut s = Schedule::new(Some(1000), None, None, false, 5, 3600);
        assert_eq!(s.deadline_unix, Some(4600));
        assert_eq!(s.decide(999, None, true, ""), Decision::Wait);
        assert_eq!(s.decide(1000, None, false, "syncing"), Decision::NotReady);
        assert_eq!(s.last_outcome.as_deref(), Some("not ready: syncing"));
        assert_eq!(
            s.decide(1004, None, true, ""),
            Decision::Wait,
            "retried every 5 s"
        );
        assert_eq!(s.decide(1005, None, true, ""), Decision::Cutover);
        assert_eq!(
            s.decide(1006, None, true, ""),
            Decision::Wait,
            "one at a time"
        );
        s.cutover_ended(1007, Err("drain timed out".into()));
        assert_eq!(s.state, ScheduleState::Pending);
        assert_eq!(s.decide(1012, None, true, ""), Decision::Cutover);
        s.cutover_ended(1013, Ok("downtime 21 ms".into()));
        assert_eq!(s.state, ScheduleState::Done);
        assert_eq!(s.decide(2000, None, true, ""), Decision::Wait);
        assert_eq!(s.attempts, 3);
    }

    #[test]
    fn gives_up_after_the_deadline_or_too_many_aborts() {
        let mut s = Schedule::new(Some(0), None, Some(10), false, 1, 3600);
        assert_eq!(s.decide(0, None, false, "seeding"), Decision::NotReady);
        let Decision::GiveUp(why) = s.decide(10, None, true, "") else {
            panic!()
        };
        assert!(
            why.contains("deadline") && why.contains("not ready: seeding"),
            "{why}"
        );
        assert_eq!(s.reason.as_deref(), Some(why.as_str()));
        let mut s = Schedule::new(Some(0), None, None, false, 1, 3600);
        for i in 0..CUTOVER_ATTEMPTS_MAX {
            assert_eq!(
                s.decide(i64::from(i) * 2, None, true, ""),
                Decision::Cutover
            );
            s.cutover_ended(i64::from(i) * 2, Err("check failed".into()));
        }
        assert_eq!(s.state, ScheduleState::GaveUp);
        assert!(s.reason.as_deref().unwrap().contains("3 cutovers aborted"));
    }

    #[test]
    fn a_one_off_window_gives_up_when_it_closes_a_recurring_one_waits() {
        let x = w("Sat 02:00-04:00 UTC");
        let mut s = Schedule::new(None, Some(x.clone()), None, false, 60, 3600);
        assert_eq!(s.deadline_unix, None);
        assert_eq!(s.decide(0, Some(t(5, 1, 0)), true, ""), Decision::Wait);
        assert_eq!(
            s.decide(10, Some(t(5, 2, 0)), false, "syncing"),
            Decision::NotReady
        );
        assert_eq!(
            s.decide(70, Some(t(5, 2, 1)), false, "syncing"),
            Decision::NotReady
        );
        let Decision::GiveUp(why) = s.decide(80, Some(t(5, 4, 0)), true, "") else {
            panic!()
        };
        assert!(why.contains("window Sat 02:00-04:00 UTC closed"), "{why}");
        let mut r = Schedule::new(None, Some(x), Some(1_000_000), true, 60, 3600);
        assert_eq!(
            r.decide(10, Some(t(5, 2, 0)), false, "syncing"),
            Decision::NotReady
        );
        assert_eq!(r.decide(80, Some(t(5, 4, 0)), true, ""), Decision::Wait);
        assert_eq!(r.decide(90, Some(t(4, 2, 0)), true, ""), Decision::Wait);
        assert_eq!(r.decide(100, Some(t(5, 2, 0)), true, ""), Decision::Cutover);
        r.restarted();
        assert_eq!(r.state, ScheduleState::Pending);
    }

    #[test]
    fn a_window_and_an_at_both_hold() {
        let mut s = Schedule::new(
            Some(500),
            Some(w("daily 00:00-24:00 UTC")),
            None,
            false,
            1,
            3600,
        );
        assert_eq!(s.decide(100, Some(t(0, 1, 0)), true, ""), Decision::Wait);
        assert_eq!(s.decide(500, Some(t(0, 1, 0)), true, ""), Decision::Cutover);
    }
}
