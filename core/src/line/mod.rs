//! The waiting room: a line before an event's door.
//!
//! A client *joins* the room of an event and gets a [`Ticket`]: its place in
//! line (positions strictly increase in join order), how many are ahead and
//! how often to poll. An [`Admitter`] lets tickets in, in join order, at the
//! pace of the room's [`RoomPolicy`] (at most `max_active` admitted at once,
//! at most `rate` per second, slower while the issuers lag); an admitted
//! ticket carries a signed [`token::AdmissionToken`] that the api's issue
//! route requires.
//!
//! ## Guarantees (one contract, two backends, one conformance suite)
//! - **Join order is admission order.** A ticket is admitted only after
//!   every ticket that joined before it was admitted or skipped.
//! - **Skipped only if gone.** A ticket is skipped only when it lapsed (not
//!   polled within `ticket_ttl`) or left; both are counted. The room's own
//!   gaps do not count against it: a round after a pause longer than the
//!   ttl (or a Kafka room read back after a restart) resumes the room, and a
//!   ticket lapses only when `now - max(last poll, resumed) > ttl`.
//! - **At most the rate.** `max_active` and `rate_per_sec` hold across
//!   processes: the backend counts the admitted and keeps the room's rate
//!   bucket, which every admitter's round draws from.
//! - **Admitted at most once.** A ticket's state moves forward only
//!   (`waiting → admitted → done | admission_expired`, or `waiting →
//!   lapsed | left`); an admitted user who does not act within
//!   `admission_window` loses the slot, which goes to the next in line.
//! - **Idempotent joins.** A ticket id is derived from the client's key
//!   (by the api); joining again with it returns the same ticket.
//! - **Nobody else's ticket.** Every call about a ticket names the user; a
//!   ticket of another user is answered as if it did not exist.
//!
//! # Layout
//! - [`Line`]: the contract. [`redis::RedisLine`]: a counter and a sorted
//!   set per room, position by `ZRANK` in O(log n), every transition one Lua
//!   call. [`kafka::KafkaLine`]: one single-partition topic per room,
//!   position = the join record's offset, admission by consuming it in order.
//! - [`admitter`]: the loop that admits, its policy (slots, rate, lag) and
//!   the measured admission rate the estimated wait is computed from.
//! - [`token`]: admission tokens (HMAC-SHA256), what the issue gate checks.
//! - [`table`]: the ticket table of the Kafka backend (the same state
//!   machine the Redis backend runs in Lua).

pub mod admitter;
pub mod kafka;
pub mod redis;
pub mod table;
pub mod token;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use admitter::Admitter;

/// Largest line a room holds; a join beyond it is refused as overload
/// (bounded memory in either backend).
pub const MAX_WAITING: u64 = 5_000_000;

/// How a room admits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoomPolicy {
    /// Admitted users (not yet done, not yet expired) at most at once.
    pub max_active: Option<u32>,
    /// Admissions per second at most.
    pub rate_per_sec: Option<f64>,
    /// A waiting ticket not polled for this long lapses and is skipped.
    #[serde(with = "micros")]
    pub ticket_ttl: Duration,
    /// An admitted user must issue within this, else the slot goes on.
    #[serde(with = "micros")]
    pub admission_window: Duration,
    /// Issuer lag (records) above which admission slows in proportion
    /// (`rate × slow_above_lag / lag`); `None` ignores the lag.
    pub slow_above_lag: Option<u64>,
}

impl RoomPolicy {
    /// Checks the policy; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_active.is_none() && self.rate_per_sec.is_none() {
            return Err("a room needs max_active, rate_per_sec or both; \
                        without either nobody would ever be admitted"
                .into());
        }
        if self.max_active == Some(0) {
            return Err("max_active must be at least 1".into());
        }
        if let Some(r) = self.rate_per_sec {
            if !(r.is_finite() && (0.01..=1_000_000.0).contains(&r)) {
                return Err(format!(
                    "rate_per_sec must be between 0.01 and 1000000, got {r}"
                ));
            }
        }
        if self.ticket_ttl < Duration::from_secs(1) || self.ticket_ttl > Duration::from_secs(3600) {
            return Err("ticket_ttl must be between 1s and 1h".into());
        }
        if self.admission_window < Duration::from_secs(1)
            || self.admission_window > Duration::from_secs(3600)
        {
            return Err("admission_window must be between 1s and 1h".into());
        }
        if self.slow_above_lag == Some(0) {
            return Err("slow_above_lag must be at least 1 record".into());
        }
        Ok(())
    }
}

/// (De)serializes a duration as whole microseconds.
mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// Where a ticket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketState {
    /// In line.
    Waiting,
    /// Let in; may issue until the admission deadline.
    Admitted,
    /// Admitted and issued (its slot is free again).
    Done,
    /// Not polled within the ticket's lifetime: skipped.
    Lapsed,
    /// Admitted but did not issue within the admission window.
    AdmissionExpired,
    /// Left the line (or gave up its admission).
    Left,
}

impl TicketState {
    /// The state's name on the wire and in the Redis scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            TicketState::Waiting => "waiting",
            TicketState::Admitted => "admitted",
            TicketState::Done => "done",
            TicketState::Lapsed => "lapsed",
            TicketState::AdmissionExpired => "admission_expired",
            TicketState::Left => "left",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => TicketState::Waiting,
            "admitted" => TicketState::Admitted,
            "done" => TicketState::Done,
            "lapsed" => TicketState::Lapsed,
            "admission_expired" => TicketState::AdmissionExpired,
            "left" => TicketState::Left,
            _ => return None,
        })
    }
}

/// What a join answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The ticket.
    pub ticket_id: Uuid,
    /// Place in line, from 1, strictly increasing in join order.
    pub position: u64,
    /// Tickets ahead of it not yet admitted nor skipped (the Kafka backend
    /// counts ones that left or lapsed until the admitter passes them).
    pub ahead: u64,
    /// When it joined, µs since the epoch.
    pub joined_at: u64,
    /// False when this join repeated an earlier one (same ticket id).
    pub created: bool,
}

/// What a poll answers about one's own ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketStatus {
    /// The ticket.
    pub ticket_id: Uuid,
    /// Its place in line.
    pub position: u64,
    /// Where it stands.
    pub state: TicketState,
    /// Tickets ahead (while waiting).
    pub ahead: u64,
    /// When it was admitted, µs since the epoch.
    pub admitted_at: Option<u64>,
    /// Until when the admission holds, µs since the epoch.
    pub admit_deadline: Option<u64>,
}

/// One admitted ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The ticket.
    pub ticket_id: Uuid,
    /// Its place in line.
    pub position: u64,
}

/// What one admission round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmitRound {
    /// Let in, in join order.
    pub admitted: Vec<Admission>,
    /// Skipped because they lapsed.
    pub lapsed: u64,
    /// Skipped because they had left.
    pub left: u64,
    /// Admissions that ran out this round (slots freed).
    pub expired: u64,
    /// Admitted and not yet done or expired, after the round.
    pub active: u64,
}

/// A room's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoomStats {
    /// Tickets created.
    pub joined: u64,
    /// Tickets admitted.
    pub admitted: u64,
    /// Admitted tickets that issued.
    pub done: u64,
    /// Waiting tickets skipped because they lapsed.
    pub lapsed: u64,
    /// Tickets that left.
    pub left: u64,
    /// Admissions that ran out unused.
    pub admission_expired: u64,
    /// Admitted and not yet done or expired.
    pub active: u64,
    /// Waiting (including lapsed ones the admitter has not reached).
    pub waiting: u64,
    /// The admission rate the admitter measured last, per second.
    pub measured_rate: f64,
}

/// Why a line call failed.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The event has no room.
    #[error("event {0:?} has no waiting room; open one with PUT /v1/events/{0}/line")]
    NoRoom(String),
    /// The room is full.
    #[error("the line of event {0:?} is full ({MAX_WAITING} waiting); retry later")]
    Full(String),
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// The backend is unreachable or failed.
    #[error("the line backend ({backend}) is unavailable: {detail}; retry shortly")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// What failed.
        detail: String,
    },
}

/// The waiting room's contract; see the module doc for its guarantees.
#[async_trait]
pub trait Line: Send + Sync + 'static {
    /// `redis` or `kafka`.
    fn kind(&self) -> &'static str;

    /// Opens the event's room, or changes its policy (idempotent).
    async fn open(&self, event_id: &str, policy: &RoomPolicy) -> Result<(), LineError>;

    /// The room's policy, `None` when the event has no room.
    async fn policy(&self, event_id: &str) -> Result<Option<RoomPolicy>, LineError>;

    /// Puts `ticket_id` of `user_id` in line at `now` (µs), or returns the
    /// ticket it already is (then `created` is false).
    async fn join(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Ticket, LineError>;

    /// The ticket's status; a poll keeps a waiting ticket alive. `None`
    /// when there is no such ticket *of this user*.
    async fn poll(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError>;

    /// Leaves the line (or gives up an admission, freeing the slot).
    /// `None` when there is no such ticket of this user.
    async fn leave(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError>;

    /// The admitted user acted: the slot is free for the next. True when
    /// this call moved the ticket from admitted to done.
    async fn finish(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<bool, LineError>;

    /// One admission round at `now`: frees slots of admissions that ran
    /// out, then admits up to `max` tickets (fewer if the room's
    /// `max_active` is reached), in join order, skipping lapsed and left
    /// ones. With a `rate` (per second), fewer still: the room's own
    /// bucket, kept by the backend and shared by every caller (every api
    /// process's admitter), fills at `rate` and saves up at most
    /// [`burst`]`(rate)`, so the room admits at most `rate` a second however
    /// many admitters run.
    async fn admit(
        &self,
        event_id: &str,
        now: u64,
        max: u32,
        rate: Option<f64>,
    ) -> Result<AdmitRound, LineError>;

    /// Records the admission rate the admitter measured (the estimated
    /// wait is computed from it).
    async fn record_rate(&self, event_id: &str, per_sec: f64) -> Result<(), LineError>;

    /// The room's counters.
    async fn stats(&self, event_id: &str) -> Result<RoomStats, LineError>;
}

/// Admissions a room's rate bucket saves up at most: a fifth of a second's
/// worth (at least one), so a pause does not turn into a burst.
pub fn burst(rate: f64) -> f64 {
    (rate * 0.2).max(1.0)
}

/// Estimated wait for a ticket with `ahead` tickets before it, at the
/// measured rate (or, before anything was measured, the configured one).
/// `None` when neither is known.
pub fn estimated_wait(ahead: u64, measured_rate: f64, policy: &RoomPolicy) -> Option<Duration> {
    let rate = if measured_rate > 0.0 {
        measured_rate
    } else {
        policy.rate_per_sec?
    };
    Some(Duration::from_secs_f64((ahead + 1) as f64 / rate))
}

/// How often a waiting client should poll: far back in line, rarely (a
/// quarter of its estimated wait), near the front every second; never so
/// rarely that one late poll lapses the ticket (a third of its ttl). The
/// poll load then grows with the admission rate, not with the line's
/// length.
pub fn poll_interval(estimate: Option<Duration>, policy: &RoomPolicy) -> Duration {
    let floor = Duration::from_secs(1).min(policy.ticket_ttl / 3);
    let ceiling = (policy.ticket_ttl / 3)
        .min(Duration::from_secs(10))
        .max(floor);
    estimate
        .map(|e| e / 4)
        .unwrap_or(Duration::from_secs(1))
        .clamp(floor, ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoomPolicy {
        RoomPolicy {
            max_active: Some(100),
            rate_per_sec: Some(50.0),
            ticket_ttl: Duration::from_secs(30),
            admission_window: Duration::from_secs(60),
            slow_above_lag: None,
        }
    }

    #[test]
    fn a_policy_without_slots_or_rate_is_refused() {
        let p = RoomPolicy {
            max_active: None,
            rate_per_sec: None,
            ..policy()
        };
        assert!(p.validate().unwrap_err().contains("nobody would ever"));
        assert!(policy().validate().is_ok());
    }

    #[test]
    fn the_estimate_uses_the_measured_rate_once_there_is_one() {
        assert_eq!(
            estimated_wait(99, 0.0, &policy()),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            estimated_wait(99, 100.0, &policy()),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn the_poll_interval_never_risks_a_lapse() {
        let p = policy();
        let far = poll_interval(Some(Duration::from_secs(3600)), &p);
        assert!(far * 3 <= p.ticket_ttl, "{far:?}");
        assert_eq!(
            poll_interval(Some(Duration::from_millis(10)), &p),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_policy_round_trips_through_json() {
        let p = policy();
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<RoomPolicy>(&s).unwrap(), p);
    }
}
