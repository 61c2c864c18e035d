//! The ticket table of one room of the Kafka backend: the same state machine
//! the Redis backend runs in Lua (`line.lua`), held in this process.
//!
//! The order is not here: it is the room's partition. The admitter reads it
//! and calls [`Table::reach`] for each record in offset order; `head` is
//! the next position it will reach, so the tickets ahead of a waiting one
//! are `position - head`.
//!
//! ## Grace after a gap
//! A ticket lapses when it was not polled within `ticket_ttl`, but never
//! for a gap the room caused: a table read back after a restart, or a round
//! that follows a pause longer than the ttl (the process or its broker was
//! away, and the tickets' polls failed too), stamps `resumed_at`, and a
//! ticket lapses only when `now - max(last_seen, resumed_at) > ttl`.
//!
//! ## Bounded
//! Waiting tickets are capped by `MAX_WAITING`; ended ones (done, left,
//! lapsed, admission expired) are forgotten [`Table::keep`] after they
//! ended: a poll then finds no ticket, as it would a day later in Redis.

use std::collections::{BTreeSet, HashMap, VecDeque};

use uuid::Uuid;

use super::{RoomPolicy, RoomStats, TicketState, TicketStatus};

/// One ticket.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Whose.
    pub user_id: String,
    /// Place in line (its join record's offset).
    pub position: u64,
    /// When it joined, µs.
    pub joined_at: u64,
    /// Last poll (or the join), µs.
    pub last_seen: u64,
    /// Where it stands.
    pub state: TicketState,
    /// When admitted, µs.
    pub admitted_at: Option<u64>,
    /// Admission deadline, µs.
    pub deadline: Option<u64>,
}

/// What the admitter found at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// Let in.
    Admitted,
    /// Skipped: not polled within its lifetime.
    Lapsed,
    /// Skipped: it had left (or lapsed on a late poll).
    Gone,
    /// Not this ticket's position: a repeated join's record, or a record
    /// of a run this process does not know. Skipped, nobody's place.
    NotInLine,
}

/// One room's tickets.
#[derive(Debug)]
pub struct Table {
    /// The room's policy.
    pub policy: RoomPolicy,
    tickets: HashMap<Uuid, Entry>,
    /// (deadline, ticket) of admitted tickets.
    active: BTreeSet<(u64, Uuid)>,
    /// Next position the admitter reaches.
    pub head: u64,
    stats: RoomStats,
    /// (when, ticket) of ended tickets, oldest first: forgotten after
    /// [`Table::keep`].
    ended: VecDeque<(u64, Uuid)>,
    /// The last admission round, µs.
    last_round: Option<u64>,
    /// When the room came back from a gap (see the module doc), µs.
    resumed_at: u64,
    /// The rate bucket: admissions saved up, and when it was filled last.
    bucket: f64,
    bucket_at: Option<u64>,
}

impl Table {
    /// An empty room.
    pub fn new(policy: RoomPolicy) -> Self {
        Self {
            policy,
            tickets: HashMap::new(),
            active: BTreeSet::new(),
            head: 1,
            stats: RoomStats::default(),
            ended: VecDeque::new(),
            last_round: None,
            resumed_at: 0,
            bucket: 0.0,
            bucket_at: None,
        }
    }

    /// Admissions the room's rate bucket allows at `now` (unbounded
    /// without a rate); [`Table::spend`] takes the ones made.
    pub fn rate_allows(&mut self, now: u64, rate: Option<f64>) -> u64 {
        let Some(rate) = rate else {
            self.bucket_at = None;
            return u64::MAX;
        };
        let burst = super::burst(rate);
        self.bucket = match self.bucket_at {
            Some(at) => (self.bucket + rate * now.saturating_sub(at) as f64 / 1e6).min(burst),
            None => burst,
        };
        self.bucket_at = Some(self.bucket_at.map_or(now, |at| at.max(now)));
        self.bucket.max(0.0).floor() as u64
    }

    /// `n` admissions were made: the bucket pays for them.
    pub fn spend(&mut self, n: u64) {
        if self.bucket_at.is_some() {
            self.bucket -= n as f64;
        }
    }

    /// The room came back at `now` (read back after a restart): nobody
    /// lapses for the time before.
    pub fn resume(&mut self, now: u64) {
        self.resumed_at = self.resumed_at.max(now);
    }

    /// An admission round starts at `now`: one that follows a gap longer
    /// than the ttl resumes the room, and ended tickets past
    /// [`Table::keep`] are forgotten.
    pub fn round(&mut self, now: u64) {
        let ttl = self.policy.ticket_ttl.as_micros() as u64;
        if let Some(last) = self.last_round {
            if now.saturating_sub(last) > ttl {
                self.resume(now);
            }
        }
        self.last_round = Some(self.last_round.map_or(now, |l| l.max(now)));
        let keep = self.keep().as_micros() as u64;
        while let Some(&(at, ticket)) = self.ended.front() {
            if now.saturating_sub(at) <= keep {
                break;
            }
            self.ended.pop_front();
            self.tickets.remove(&ticket);
        }
    }

    /// How long an ended ticket is still shown: the longer of the ttl and
    /// the admission window.
    pub fn keep(&self) -> std::time::Duration {
        self.policy.ticket_ttl.max(self.policy.admission_window)
    }

    fn end(&mut self, ticket: Uuid, now: u64) {
        self.ended.push_back((now, ticket));
    }

    /// The ticket, if it exists.
    pub fn get(&self, ticket: &Uuid) -> Option<&Entry> {
        self.tickets.get(ticket)
    }

    /// Tickets in the table.
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    /// True when no ticket joined.
    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }

    /// Records a join at `position`; false when the ticket already exists.
    pub fn insert(&mut self, ticket: Uuid, user_id: &str, position: u64, now: u64) -> bool {
        self.insert_seen(ticket, user_id, position, now, now)
    }

    /// Records a join of `joined_at` last seen at `seen` (a line read back:
    /// its tickets get a fresh lifetime).
    pub fn insert_seen(
        &mut self,
        ticket: Uuid,
        user_id: &str,
        position: u64,
        joined_at: u64,
        seen: u64,
    ) -> bool {
        if self.tickets.contains_key(&ticket) {
            return false;
        }
        self.tickets.insert(
            ticket,
            Entry {
                user_id: user_id.to_string(),
                position,
                joined_at,
                last_seen: seen,
                state: TicketState::Waiting,
                admitted_at: None,
                deadline: None,
            },
        );
        self.stats.joined += 1;
        self.stats.waiting += 1;
        true
    }

    fn lapsed(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.last_seen.max(self.resumed_at))
            > self.policy.ticket_ttl.as_micros() as u64
    }

    /// The status of `user_id`'s `ticket`, keeping it alive; `None` when it
    /// is not theirs.
    pub fn poll(&mut self, user_id: &str, ticket: Uuid, now: u64) -> Option<TicketStatus> {
        self.expire(now);
        let lapsed = self
            .tickets
            .get(&ticket)
            .filter(|e| e.user_id == user_id)
            .map(|e| self.lapsed(e, now))?;
        let e = self.tickets.get_mut(&ticket).expect("looked up above");
        if e.state == TicketState::Waiting {
            if lapsed {
                // Polled too late: it lapsed already, whether or not the
                // admitter reached it.
                e.state = TicketState::Lapsed;
                self.stats.lapsed += 1;
                self.stats.waiting -= 1;
                self.end(ticket, now);
            } else {
                e.last_seen = e.last_seen.max(now);
            }
        }
        let e = &self.tickets[&ticket];
        Some(self.status(ticket, e))
    }

    fn status(&self, ticket: Uuid, e: &Entry) -> TicketStatus {
        TicketStatus {
            ticket_id: ticket,
            position: e.position,
            state: e.state,
            ahead: if e.state == TicketState::Waiting {
                e.position.saturating_sub(self.head)
            } else {
                0
            },
            admitted_at: e.admitted_at,
            admit_deadline: e.deadline,
        }
    }

    /// Leaves the line, or gives up an admission.
    pub fn leave(&mut self, user_id: &str, ticket: Uuid, now: u64) -> Option<TicketStatus> {
        // A ticket that lapsed before it left counts as lapsed, as a poll
        // would find it.
        self.poll(user_id, ticket, now)?;
        let e = self
            .tickets
            .get_mut(&ticket)
            .filter(|e| e.user_id == user_id)?;
        match e.state {
            TicketState::Waiting => {
                e.state = TicketState::Left;
                self.stats.left += 1;
                self.stats.waiting -= 1;
                self.end(ticket, now);
            }
            TicketState::Admitted => {
                e.state = TicketState::Left;
                self.stats.left += 1;
                self.stats.active -= 1;
                self.active.remove(&(e.deadline.unwrap_or(0), ticket));
                self.end(ticket, now);
            }
            _ => {}
        }
        let e = &self.tickets[&ticket];
        Some(self.status(ticket, e))
    }

    /// The admitted user acted at `now`; true when this freed the slot.
    pub fn finish(&mut self, user_id: &str, ticket: Uuid, now: u64) -> bool {
        let Some(e) = self
            .tickets
            .get_mut(&ticket)
            .filter(|e| e.user_id == user_id)
        else {
            return false;
        };
        if e.state != TicketState::Admitted {
            return false;
        }
        e.state = TicketState::Done;
        self.stats.done += 1;
        self.stats.active -= 1;
        self.active.remove(&(e.deadline.unwrap_or(0), ticket));
        self.end(ticket, now);
        true
    }

    /// Frees the slots of admissions past their deadline; how many.
    pub fn expire(&mut self, now: u64) -> u64 {
        let mut n = 0;
        while let Some(&(deadline, ticket)) = self.active.first() {
            if deadline > now {
                break;
            }
            self.active.pop_first();
            if let Some(e) = self.tickets.get_mut(&ticket) {
                e.state = TicketState::AdmissionExpired;
                self.end(ticket, now);
            }
            self.stats.admission_expired += 1;
            self.stats.active -= 1;
            n += 1;
        }
        n
    }

    /// Slots free under `max_active` (unbounded without one).
    pub fn free_slots(&self) -> u64 {
        self.policy
            .max_active
            .map_or(u64::MAX, |m| (m as u64).saturating_sub(self.stats.active))
    }

    /// The admitter reached the record of `ticket` at `position`: admit it,
    /// or skip it and say why. Positions must come in increasing order.
    pub fn reach(&mut self, ticket: Uuid, position: u64, now: u64) -> Reached {
        self.head = self.head.max(position + 1);
        let lapsed = match self.tickets.get(&ticket) {
            Some(e) if e.position == position => self.lapsed(e, now),
            _ => return Reached::NotInLine,
        };
        let window = self.policy.admission_window.as_micros() as u64;
        let e = self.tickets.get_mut(&ticket).expect("looked up above");
        if e.state != TicketState::Waiting {
            return Reached::Gone;
        }
        self.stats.waiting -= 1;
        if lapsed {
            e.state = TicketState::Lapsed;
            self.stats.lapsed += 1;
            self.end(ticket, now);
            return Reached::Lapsed;
        }
        e.state = TicketState::Admitted;
        e.admitted_at = Some(now);
        e.deadline = Some(now + window);
        self.active.insert((now + window, ticket));
        self.stats.admitted += 1;
        self.stats.active += 1;
        Reached::Admitted
    }

    /// Admitted and not yet done or expired.
    pub fn active(&self) -> u64 {
        self.stats.active
    }

    /// The counters, with the rate measured last.
    pub fn stats(&self, measured_rate: f64) -> RoomStats {
        RoomStats {
            measured_rate,
            ..self.stats.clone()
        }
    }
}
