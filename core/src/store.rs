//! The store: where a request is decided, exactly once.
//!
//! [`Store`] is the contract; [`redis::RedisStore`] is the production
//! implementation (one Lua script, one round trip per batch) and
//! [`memory::MemoryStore`] the in-process one used by `coupon-loadgen demo`.
//! Both pass the same conformance suite (`core/tests/store_conformance.rs`).
//!
//! ## What a decision guarantees
//! For each request of a batch, in the order given, atomically with respect to
//! every other decision of the same event:
//! 1. a request id decided before (in this generation of the event) gets the
//!    *same* decision back, marked `replay`: redelivery is harmless;
//! 2. a user already holding `per_user_limit` coupons gets `limit_reached`;
//! 3. no stock left gets `sold_out`;
//! 4. otherwise stock is decremented and the coupon recorded with its rank
//!    (the lowest free rank first: one left by a recovery, or returned by a
//!    hold's end).
//!
//! ## What a hold guarantees (events with a claim window)
//! In an event whose `claim_window_us` is not 0, an issued coupon is
//! **held** until `decided_at + claim_window_us` ([`Decision`]'s hold ends
//! there; the outcome carries it as `hold_until`). The batch's hold actions
//! ([`PendingAction`]) are applied first, in the same atomic step as its
//! requests, so a coupon returned by one goes to the requests of the same
//! batch:
//! 1. a **claim** by the holder, while held, with `at` before the deadline
//!    makes it `claimed` (final);
//! 2. a **cancel** by the holder while held makes it `released`; an
//!    **expire** while held and `now ≥ until` makes it `expired`. Both give
//!    the coupon back: `remaining + 1`, `released + 1`, the holder's count of
//!    coupons held − 1 (the per-user limit counts coupons held now), and the
//!    rank joins the event's free ranks, so the next request issued gets it
//!    (ranks stay unique among coupons out);
//! 3. anything else (a hold already ended, another user, an unknown request,
//!    a claim too late, an expiry not yet due) decides nothing; an action
//!    that already moved the hold to the state it asks for restates that end
//!    (`replay`, same `decided_at` and sequence number), so a lost publish is
//!    republished. Releasing twice changes nothing, and of an expiry and a
//!    claim exactly one wins: whichever the store applies first;
//! 4. every hold end takes the event's next decision sequence number: one
//!    order for everything the store decides.
//!
//! Decisions never flip: the returned coupon goes to the **next undecided**
//! request; a request already told `sold_out` stays so (docs/HOLDS.md).
//!
//! The invariant the store keeps, and `GET /v1/events/{e}` shows:
//! `issued_total − released + remaining = stock`, where `issued_total`
//! counts every `issued` decision (re-issues of a returned rank included).
//!
//! An event may split its stock over **buckets** (`stock_buckets` K > 1,
//! [`buckets`]): each bucket is decided as above, on its own, by the
//! requests of the users routed to it; ranks and decision numbers are
//! event-wide and disjoint across buckets, the per-user limit and the dedup
//! stay exact (a user's requests all meet one bucket), and what the store
//! shows of the event (`event`, `ledger`) is its buckets summed. What it
//! gives up: `sold_out` is a bucket's, not the event's.
//!
//! Dedup records live at least the configured retention (the Redis store
//! keeps them up to about twice that: it drops them a retention window at a
//! time), which must be at least the requests topic's retention: a request
//! redelivered after its record expired would be decided again (the
//! per-user limit still stops a second coupon, but a `sold_out` could
//! become `limit_reached`).

pub mod buckets;
pub mod definition;
pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::{DecisionResult, HoldState, HoldVerb};

/// The largest stock an event may have.
pub const MAX_STOCK: u32 = 10_000_000;

/// The longest claim window an event may have: a day, far below the dedup
/// retention the holds' requests are remembered for.
pub const MAX_CLAIM_WINDOW_US: u64 = 24 * 3600 * 1_000_000;

/// Default lifetime of a dedup record: the requests topic's default retention.
pub const DEFAULT_DEDUP_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What an admin sets when creating or resetting an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSpec {
    /// Coupons available, `0..=MAX_STOCK`.
    pub stock: u32,
    /// Coupons one user may hold, at least 1.
    pub per_user_limit: u32,
    /// How long an issued coupon is held for its claim, µs; 0: no holds (a
    /// coupon is final when issued). At most [`MAX_CLAIM_WINDOW_US`].
    #[serde(default)]
    pub claim_window_us: u64,
    /// Buckets the stock is split over, `1..=`[`buckets::MAX_STOCK_BUCKETS`]
    /// (1: one slot, as before buckets existed; see [`buckets`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub stock_buckets: u32,
}

fn one() -> u32 {
    1
}

fn is_one(k: &u32) -> bool {
    *k == 1
}

impl EventSpec {
    /// Checks the spec's bounds, saying what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.stock > MAX_STOCK {
            return Err(format!("stock must be at most {MAX_STOCK}"));
        }
        if self.per_user_limit == 0 {
            return Err("per_user_limit must be at least 1".into());
        }
        if self.claim_window_us > MAX_CLAIM_WINDOW_US {
            return Err(format!(
                "the claim window must be at most {} ms (a day)",
                MAX_CLAIM_WINDOW_US / 1000
            ));
        }
        if !(1..=buckets::MAX_STOCK_BUCKETS).contains(&self.stock_buckets) {
            return Err(format!(
                "stock_buckets must be 1 to {} (1: the whole stock on one Redis slot), got {}",
                buckets::MAX_STOCK_BUCKETS,
                self.stock_buckets
            ));
        }
        Ok(())
    }
}

/// An event as the store sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EventState {
    /// The event's id.
    pub event_id: String,
    /// Coupons at the start.
    pub stock: u32,
    /// Coupons one user may hold.
    pub per_user_limit: u32,
    /// Coupons in stock: never issued, or returned by a hold's end.
    pub remaining: u32,
    /// Incremented by every reset; dedup records of older generations are void.
    pub generation: u64,
    /// The claim window, µs (0: no holds).
    #[serde(default)]
    pub claim_window_us: u64,
    /// Coupons returned to stock by a cancel or an expiry.
    #[serde(default)]
    pub released: u32,
    /// Holds claimed (final).
    #[serde(default)]
    pub claimed: u32,
    /// Buckets the stock is split over (0 or 1: one; see [`buckets`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub stock_buckets: u32,
}

impl EventState {
    /// Coupons out now (held, claimed, or final at issue).
    pub fn issued(&self) -> u32 {
        self.stock - self.remaining
    }

    /// Every `issued` decision so far, re-issues of returned coupons
    /// included: `issued_total − released + remaining = stock`.
    pub fn issued_total(&self) -> u32 {
        self.issued() + self.released
    }

    /// Coupons held now, waiting for their claim (0 without holds).
    pub fn held(&self) -> u32 {
        if self.claim_window_us == 0 {
            0
        } else {
            self.issued().saturating_sub(self.claimed)
        }
    }

    /// The definition this state was made from.
    pub fn spec(&self) -> EventSpec {
        EventSpec {
            stock: self.stock,
            per_user_limit: self.per_user_limit,
            claim_window_us: self.claim_window_us,
            stock_buckets: self.buckets(),
        }
    }

    /// Buckets the stock is split over, at least 1.
    pub fn buckets(&self) -> u32 {
        self.stock_buckets.max(1)
    }

    /// True when nothing is left.
    pub fn sold_out(&self) -> bool {
        self.remaining == 0
    }
}

/// What [`Store::define_event`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defined {
    /// The event as it is now: the definition just applied, or the newer
    /// one the store already held.
    pub state: EventState,
    /// True when the definition was applied (its generation was the highest).
    pub applied: bool,
    /// True when it was applied to an event that did not exist.
    pub created: bool,
}

/// One request to decide: its id and user (the event is the batch's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The request's id, the dedup key.
    pub request_id: Uuid,
    /// The user the per-user limit applies to.
    pub user_id: String,
}

/// One action on a hold to apply (the event is the batch's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAction {
    /// The request whose coupon is held.
    pub request_id: Uuid,
    /// Who asks: only the holder's actions decide anything.
    pub user_id: String,
    /// Claim, cancel or expire.
    pub verb: HoldVerb,
    /// When it was asked, µs (a claim must be asked before the deadline).
    pub at: u64,
}

/// Hold actions and requests of one event, each in arrival (partition)
/// order: the actions are applied first, in the same atomic step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBatch {
    /// The event all requests belong to.
    pub event_id: String,
    /// The requests, decided in this order.
    pub requests: Vec<Pending>,
    /// Actions on holds, applied in this order before the requests.
    pub actions: Vec<PendingAction>,
}

impl EventBatch {
    /// A batch of requests alone.
    pub fn requests(event_id: impl Into<String>, requests: Vec<Pending>) -> Self {
        Self {
            event_id: event_id.into(),
            requests,
            actions: Vec::new(),
        }
    }
}

/// The store's answer for one [`EventBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchVerdict {
    /// The event does not exist: every request of the batch is poison (or,
    /// if the store lost its state, waits for the recovery).
    UnknownEvent,
    /// One decision per request, in the batch's order.
    Decided {
        /// The event's generation the decisions belong to.
        generation: u64,
        /// The decisions.
        decisions: Vec<Decision>,
        /// One answer per action, in the batch's order: `None` when it
        /// decided nothing (and nothing is published).
        holds: Vec<Option<HoldEnd>>,
        /// The event's claim window, µs (0: no holds): an issued coupon is
        /// held until `decided_at` plus this.
        claim_window_us: u64,
    },
}

/// What a hold action decided: the end of a hold (or a restatement of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldEnd {
    /// `claimed`, `released` or `expired`.
    pub state: HoldState,
    /// The coupon's rank.
    pub rank: u32,
    /// When the store ended the hold, µs.
    pub decided_at: u64,
    /// True when this restates an earlier end (a redelivery or a repeat).
    pub replay: bool,
    /// The event's decision sequence number the end took.
    pub seq: u64,
}

/// One hold, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The request whose coupon it is.
    pub request_id: Uuid,
    /// The holder.
    pub user_id: String,
    /// The coupon's rank.
    pub rank: u32,
    /// The claim deadline, µs.
    pub until: u64,
    /// Where it stands.
    pub state: HoldState,
    /// When it ended, µs (0 while held).
    pub ended_at: u64,
    /// The decision sequence number of its end (0 while held).
    pub end_seq: u64,
}

/// A hold and whether its end is logged (its hold outcome acknowledged on
/// `coupon.outcomes`): an end not yet logged is shown as `held`, as the
/// store would be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldStatus {
    /// The hold.
    pub hold: Hold,
    /// True when its end (if any) is in the log.
    pub end_logged: bool,
}

impl HoldStatus {
    /// The state a client may be shown: an end not yet logged is `held`.
    pub fn shown_state(&self) -> HoldState {
        if self.end_logged {
            self.hold.state
        } else {
            HoldState::Held
        }
    }
}

/// A hold whose deadline passed, for the expiry sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueHold {
    /// Its event.
    pub event_id: String,
    /// Its request.
    pub request_id: Uuid,
    /// The holder (the expiry is written in the holder's name).
    pub user_id: String,
    /// Its deadline, µs.
    pub until: u64,
}

/// The decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// What was decided.
    pub result: DecisionResult,
    /// 1..=stock when issued.
    pub issued_rank: Option<u32>,
    /// When it was first decided, µs since the epoch.
    pub decided_at: u64,
    /// True when this restates an earlier decision of the same request.
    pub replay: bool,
    /// The event's decision sequence number (1, 2, 3... in the order the
    /// store decided; 0 for a `duplicate`). Exact decision order, for the
    /// load generator's ordering-skew figures.
    pub seq: u64,
    /// True once the decision is *logged*: its outcome is acknowledged on
    /// `coupon.outcomes`, the log a lost store is rebuilt from (see
    /// [`Store::mark_logged`]). Only logged decisions are shown to clients,
    /// because only they survive the loss of the store. Serialised as
    /// `confirmed`, its earlier name.
    #[serde(default, rename = "confirmed")]
    pub logged: bool,
}

/// Decisions of one event and generation whose outcomes the broker
/// acknowledged: to be marked logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedDecisions {
    /// The event.
    pub event_id: String,
    /// The generation the decisions were made in (their verdict's). Marks
    /// of a generation the event no longer has are ignored: a batch
    /// acknowledged after an admin reset must not mark the new generation's
    /// decisions, whose numbers restarted, as logged.
    pub generation: u64,
    /// Each decision's request id and decision sequence number.
    pub decisions: Vec<(Uuid, u64)>,
}

/// The longest run of sequence numbers one range of logged decisions
/// covers, so a lookup only has to look this far back.
pub const MAX_LOGGED_RANGE: u64 = 512;

/// Compresses sequence numbers into inclusive ranges of at most
/// [`MAX_LOGGED_RANGE`] numbers (zeros, which number nothing, are skipped).
pub fn seq_ranges(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    seq_ranges_by(seqs, 1)
}

/// [`seq_ranges`] of the numbers of one bucket of an event with `stride`
/// buckets: numbers `stride` apart are consecutive (a range `lo-hi` then
/// holds `lo, lo + stride, … hi`, the only numbers of its bucket between
/// them).
pub fn seq_ranges_by(seqs: impl IntoIterator<Item = u64>, stride: u64) -> Vec<(u64, u64)> {
    let mut seqs: Vec<u64> = seqs.into_iter().filter(|s| *s > 0).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match ranges.last_mut() {
            Some((lo, hi)) if *hi + stride == s && s - *lo < MAX_LOGGED_RANGE => *hi = s,
            _ => ranges.push((s, s)),
        }
    }
    ranges
}

/// One decision to restore, rebuilt from the outcomes log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDecision {
    /// The request.
    pub request_id: Uuid,
    /// Its user.
    pub user_id: String,
    /// The decision (restored as logged: it is in the log).
    pub decision: Decision,
}

/// An event's whole state, rebuilt from the events and outcomes topics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventSnapshot {
    /// Counters (remaining = stock − coupons).
    pub state: EventState,
    /// The last decision sequence number used.
    pub seq: u64,
    /// Coupons held per user.
    pub holders: Vec<(String, u32)>,
    /// Coupons by rank.
    pub coupons: Vec<Coupon>,
    /// Every decision of the generation.
    pub decided: Vec<RestoredDecision>,
    /// Ranks below the highest issued that no coupon out holds: returned by
    /// a hold's end, or their decisions were lost with the store. Given out
    /// first (lowest first), so a rank is never out twice.
    pub free_ranks: Vec<u32>,
    /// Every hold of the generation (ended ones included).
    pub holds: Vec<Hold>,
    /// The bucket this snapshot is of (0 for an unbucketed event): its
    /// state holds the bucket's stock and counters, `seq` its own count.
    pub bucket: u32,
}

/// One issued coupon, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coupon {
    /// 1..=stock, in issue order.
    pub rank: u32,
    /// The request that won it.
    pub request_id: Uuid,
    /// The user who holds it.
    pub user_id: String,
}

/// Everything the store holds about an event, for audits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The event's counters.
    pub state: EventState,
    /// Every coupon out now (issued and not returned), by rank.
    pub coupons: Vec<Coupon>,
    /// Coupons held per user, as the limit check sees them.
    pub holders: Vec<(String, u32)>,
    /// Free ranks below the highest issued, lowest first.
    #[serde(default)]
    pub free_ranks: Vec<u32>,
    /// Every hold of the generation, by request id.
    #[serde(default)]
    pub holds: Vec<Hold>,
}

/// A store failure. Business outcomes are never errors; these are.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or failed transiently; retrying may help.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something this build does not understand.
    #[error("unexpected store reply: {0}")]
    Protocol(String),
    /// The request was invalid (a caller bug, not a transient state).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// A recovery write was refused: the caller no longer holds the recovery
    /// lock (it expired; another process may be rebuilding the store), or
    /// the store already has its epoch (someone finished a rebuild). Nothing
    /// was written; the caller must stop recovering.
    #[error("recovery write refused: {0}")]
    Fenced(String),
    /// The store's server is not the one whose state was last vouched for:
    /// it restarted (perhaps from an older snapshot) or a replica was
    /// promoted (perhaps before it caught up). Its state may be behind the
    /// log, so nothing was decided: it is marked lost and rebuilt from the
    /// log (see [`crate::recovery`]) before it decides again.
    #[error("the store's server restarted or failed over, so its state may be behind the log; nothing was decided, and it is being rebuilt from the log: {0}")]
    Lost(String),
}

impl StoreError {
    /// True when the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Where coupons are decided. Implementations must be safe to call from many
/// processes at once: all atomicity lives in the store, none in the caller.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and reports (`redis`, `memory`).
    fn kind(&self) -> &'static str;

    /// Checks the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Creates the event, or resets it (new generation, full stock, no
    /// holders), in the store alone, with a newly claimed generation: for
    /// set-ups without a log (tests, benchmarks). A deployment defines
    /// events log first, with [`definition::create_event`]. Returns the new
    /// state and whether it was created.
    async fn put_event(
        &self,
        event_id: &str,
        spec: EventSpec,
    ) -> Result<(EventState, bool), StoreError>;

    /// Claims the generation the next definition of `event_id` carries:
    /// above every generation held or claimed before, so never handed out
    /// twice. The first step of [`definition::create_event`], which writes
    /// the definition with it to the log, then applies it with
    /// [`Store::define_event`].
    async fn claim_generation(&self, event_id: &str) -> Result<u64, StoreError>;

    /// Applies a definition that is in the log: the event gets `generation`,
    /// full stock, no holders and its decision numbering restarted, **only
    /// if** `generation` is higher than the one it holds; otherwise nothing
    /// changes (a newer definition is live). Atomic.
    async fn define_event(
        &self,
        event_id: &str,
        spec: EventSpec,
        generation: u64,
    ) -> Result<Defined, StoreError>;

    /// The event's state, if it exists.
    async fn event(&self, event_id: &str) -> Result<Option<EventState>, StoreError>;

    /// Decides every batch, atomically per batch, in one round trip.
    async fn decide(
        &self,
        batches: &[EventBatch],
        now_micros: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError>;

    /// The decision recorded for a request, if any.
    async fn decision(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<Decision>, StoreError>;

    /// The decision recorded for a request whose event is not known to the
    /// caller: looks through every event (there are few).
    async fn find_decision(
        &self,
        request_id: Uuid,
    ) -> Result<Option<(String, Decision)>, StoreError>;

    /// The full ledger of an event, for audits.
    async fn ledger(&self, event_id: &str) -> Result<Option<Ledger>, StoreError>;

    /// The hold of a request of an event with holds, if it was issued one,
    /// with whether its end is logged.
    async fn hold(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<HoldStatus>, StoreError>;

    /// Holds still `held` whose deadline is at or before `now`, at most
    /// `limit`, across every event with holds (earliest first within an
    /// event): what the expiry sweep turns into `expire` actions.
    async fn due_holds(&self, now: u64, limit: usize) -> Result<Vec<DueHold>, StoreError>;

    /// Marks decisions (and hold ends, by their sequence numbers) logged:
    /// their outcomes are acknowledged by the broker, so the status route
    /// may show them. Only marks of the event's
    /// current generation count (atomically checked); the others are
    /// ignored. Idempotent; one round trip for the whole batch.
    async fn mark_logged(&self, batches: &[LoggedDecisions]) -> Result<(), StoreError>;

    /// The store's epoch marker: `None` means the store lost its state (or
    /// never had any) and must be recovered before anything is decided.
    async fn epoch(&self) -> Result<Option<String>, StoreError>;

    /// Marks the store as being rebuilt (the first write of every recovery,
    /// a first start's included), fenced like
    /// [`Store::restore`]: from then on nothing is decided or defined until
    /// [`Store::set_epoch`], and a copy of the store taken mid-rebuild (a
    /// snapshot, a replica) says so when it comes back. A store with
    /// nothing to be stale about (in memory) needs no mark. (No default:
    /// a wrapper that forgot to forward it would silently skip the mark.)
    async fn begin_rebuild(&self, owner: &str) -> Result<(), StoreError>;

    /// Writes the epoch marker (the last step of a recovery), fenced like
    /// [`Store::restore`]: refused ([`StoreError::Fenced`]) unless `owner`
    /// holds the recovery lock and the store has no epoch yet.
    async fn set_epoch(&self, epoch: &str, owner: &str) -> Result<(), StoreError>;

    /// Takes the recovery lock for `owner` for at most `ttl`; false if
    /// someone else holds it.
    async fn try_lock_recovery(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Extends the recovery lock to `ttl` from now if `owner` still holds
    /// it; false if it lost it.
    async fn extend_recovery_lock(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Releases the recovery lock if `owner` holds it.
    async fn unlock_recovery(&self, owner: &str) -> Result<(), StoreError>;

    /// Replaces an event's whole state with `snapshot`: every dedup record
    /// the store held for the event is dropped (a store that came back
    /// behind may hold decisions the log does not) and the snapshot's are
    /// written, with `retention` to live.
    ///
    /// Fenced: every write is refused ([`StoreError::Fenced`]) unless, in
    /// the same atomic step, `owner` holds the recovery lock and the store
    /// has no epoch. A recoverer whose lock expired while it read the log
    /// can therefore never write over a store someone else rebuilt since.
    async fn restore(
        &self,
        snapshot: &EventSnapshot,
        retention: Duration,
        owner: &str,
    ) -> Result<(), StoreError>;
}

/// Hold state codes shared by the Lua script and the Rust side.
pub(crate) fn hold_state_from_code(code: i64) -> Option<HoldState> {
    match code {
        1 => Some(HoldState::Held),
        2 => Some(HoldState::Claimed),
        3 => Some(HoldState::Released),
        4 => Some(HoldState::Expired),
        _ => None,
    }
}

/// The code of a hold state, see [`hold_state_from_code`].
pub(crate) fn hold_state_code(state: HoldState) -> i64 {
    match state {
        HoldState::Held => 1,
        HoldState::Claimed => 2,
        HoldState::Released => 3,
        HoldState::Expired => 4,
    }
}

/// The code of a verb in the script's arguments.
pub(crate) fn verb_code(verb: HoldVerb) -> i64 {
    match verb {
        HoldVerb::Claim => 1,
        HoldVerb::Cancel => 2,
        HoldVerb::Expire => 3,
    }
}

/// Result codes shared by the Lua script and the Rust side.
pub(crate) fn result_from_code(code: i64) -> Option<DecisionResult> {
    match code {
        1 => Some(DecisionResult::Issued),
        2 => Some(DecisionResult::SoldOut),
        3 => Some(DecisionResult::LimitReached),
        4 => Some(DecisionResult::Duplicate),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_compress_into_bounded_ranges() {
        assert_eq!(seq_ranges([5, 3, 4, 9, 0, 10, 4]), vec![(3, 5), (9, 10)]);
        assert_eq!(seq_ranges([]), vec![]);
        let long = seq_ranges(1..=1200);
        assert_eq!(long, vec![(1, 512), (513, 1024), (1025, 1200)]);
    }
}
