//! An in-process store with the same semantics as the Redis one, for the
//! embedded demo and for tests that must not need a server. One mutex guards
//! everything, which gives the same per-batch atomicity as a Lua script.
//! The epoch marker and the recovery lock behave as the Redis store's do, so
//! recovery can be tested without a server.
//!
//! A bucketed event keeps its buckets as the Redis store does, one state
//! per bucket under the bucket's tag (`E`, `E#1`, …), routed by user and
//! numbering ranks and decisions event-wide ([`super::buckets`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;

use super::buckets;
use super::{
    BatchVerdict, Coupon, Decision, Defined, DueHold, EventBatch, EventSnapshot, EventSpec,
    EventState, Hold, HoldEnd, HoldStatus, Ledger, LoggedDecisions, PendingAction, Store,
    StoreError,
};
use crate::wire::{DecisionResult, HoldState, HoldVerb};

#[derive(Debug)]
struct DedupRecord {
    generation: u64,
    user_id: String,
    decision: Decision,
    expires_at: u64,
}

#[derive(Debug, Default)]
struct MemEvent {
    state: Option<EventState>,
    holders: HashMap<String, u32>,
    coupons: BTreeMap<u32, (Uuid, String)>,
    decided: HashMap<Uuid, DedupRecord>,
    decided_since_sweep: usize,
    seq: u64,
    free_ranks: BTreeSet<u32>,
    /// Holds by request, with whether their end is logged.
    holds: HashMap<Uuid, (Hold, bool)>,
    /// The highest generation claimed for a definition.
    claimed: u64,
    /// Which bucket of its event this is (0 unbucketed).
    bucket: u32,
}

impl MemEvent {
    fn claim(&mut self) -> u64 {
        let held = self.state.as_ref().map_or(0, |s| s.generation);
        self.claimed = self.claimed.max(held) + 1;
        self.claimed
    }

    /// Defines bucket `bucket` of the event (`spec` the whole event's).
    fn define(&mut self, event_id: &str, spec: EventSpec, generation: u64, bucket: u32) -> Defined {
        let created = self.state.is_none();
        let held = self.state.as_ref().map_or(0, |s| s.generation);
        if generation <= held {
            let state = self.state.clone().expect("a generation is held");
            return Defined {
                state,
                applied: false,
                created: false,
            };
        }
        let stock = buckets::bucket_stock(spec.stock, spec.stock_buckets, bucket);
        let state = EventState {
            event_id: event_id.to_string(),
            stock,
            per_user_limit: spec.per_user_limit,
            remaining: stock,
            generation,
            claim_window_us: spec.claim_window_us,
            released: 0,
            claimed: 0,
            stock_buckets: spec.stock_buckets,
        };
        self.bucket = bucket;
        self.state = Some(state.clone());
        self.holders.clear();
        self.coupons.clear();
        self.seq = 0;
        self.free_ranks.clear();
        self.holds.clear();
        Defined {
            state,
            applied: true,
            created,
        }
    }
}

impl MemEvent {
    /// The event-wide number of this bucket's `n`-th rank or decision.
    fn wide(&self, n: u64) -> u64 {
        let k = self.state.as_ref().map_or(1, EventState::buckets);
        buckets::global(n, k, self.bucket)
    }

    /// Applies one action on a hold (see the store's module doc): the end
    /// it made or restated, `None` when it decided nothing.
    fn act(&mut self, a: &PendingAction, now: u64) -> Option<HoldEnd> {
        self.state.as_ref()?;
        let (hold, _) = self.holds.get(&a.request_id)?;
        if hold.user_id != a.user_id {
            return None;
        }
        let target = match a.verb {
            HoldVerb::Claim => HoldState::Claimed,
            HoldVerb::Cancel => HoldState::Released,
            HoldVerb::Expire => HoldState::Expired,
        };
        if hold.state != HoldState::Held {
            return (hold.state == target).then_some(HoldEnd {
                state: target,
                rank: hold.rank,
                decided_at: hold.ended_at,
                replay: true,
                seq: hold.end_seq,
            });
        }
        let allowed = match a.verb {
            HoldVerb::Claim => a.at < hold.until,
            HoldVerb::Cancel => true,
            HoldVerb::Expire => now >= hold.until,
        };
        if !allowed {
            return None;
        }
        self.seq += 1;
        let seq = self.wide(self.seq);
        let state = self.state.as_mut()?;
        let (hold, logged) = self.holds.get_mut(&a.request_id)?;
        if target == HoldState::Claimed {
            state.claimed += 1;
        } else {
            state.remaining += 1;
            state.released += 1;
            if let Some(n) = self.holders.get_mut(&hold.user_id) {
                *n -= 1;
                if *n == 0 {
                    self.holders.remove(&hold.user_id);
                }
            }
            self.coupons.remove(&hold.rank);
            self.free_ranks.insert(hold.rank);
        }
        hold.state = target;
        hold.ended_at = now;
        hold.end_seq = seq;
        *logged = false;
        Some(HoldEnd {
            state: target,
            rank: hold.rank,
            decided_at: now,
            replay: false,
            seq,
        })
    }

    /// Decides one batch of this bucket.
    fn decide(&mut self, batch: &EventBatch, now: u64, retention_micros: u64) -> BatchVerdict {
        let holds: Vec<Option<HoldEnd>> = batch.actions.iter().map(|a| self.act(a, now)).collect();
        let mut decisions = Vec::with_capacity(batch.requests.len());
        for p in &batch.requests {
            let state = self.state.as_mut().expect("filtered above");
            let earlier = self
                .decided
                .get(&p.request_id)
                .filter(|r| r.generation == state.generation && r.expires_at > now);
            if let Some(r) = earlier {
                decisions.push(if r.user_id == p.user_id {
                    Decision {
                        replay: true,
                        ..r.decision
                    }
                } else {
                    Decision {
                        result: DecisionResult::Duplicate,
                        issued_rank: None,
                        decided_at: now,
                        replay: false,
                        seq: 0,
                        logged: false,
                    }
                });
                continue;
            }
            let held = self.holders.get(&p.user_id).copied().unwrap_or(0);
            let (result, issued_rank) = if held >= state.per_user_limit {
                (DecisionResult::LimitReached, None)
            } else if state.remaining == 0 {
                (DecisionResult::SoldOut, None)
            } else {
                state.remaining -= 1;
                let fresh = buckets::global(
                    u64::from(state.stock - state.remaining),
                    state.buckets(),
                    self.bucket,
                ) as u32;
                let rank = self.free_ranks.pop_first().unwrap_or(fresh);
                *self.holders.entry(p.user_id.clone()).or_default() += 1;
                self.coupons.insert(rank, (p.request_id, p.user_id.clone()));
                if state.claim_window_us > 0 {
                    let hold = Hold {
                        request_id: p.request_id,
                        user_id: p.user_id.clone(),
                        rank,
                        until: now + state.claim_window_us,
                        state: HoldState::Held,
                        ended_at: 0,
                        end_seq: 0,
                    };
                    self.holds.insert(p.request_id, (hold, true));
                }
                (DecisionResult::Issued, Some(rank))
            };
            self.seq += 1;
            let seq = buckets::global(self.seq, state.buckets(), self.bucket);
            let decision = Decision {
                result,
                issued_rank,
                decided_at: now,
                replay: false,
                seq,
                logged: false,
            };
            let generation = state.generation;
            self.decided.insert(
                p.request_id,
                DedupRecord {
                    generation,
                    user_id: p.user_id.clone(),
                    decision,
                    expires_at: now.saturating_add(retention_micros),
                },
            );
            self.sweep(now);
            decisions.push(decision);
        }
        let state = self.state.as_ref().expect("defined");
        BatchVerdict::Decided {
            generation: state.generation,
            decisions,
            holds,
            claim_window_us: state.claim_window_us,
        }
    }

    /// Drops expired dedup records once the map has doubled since the last
    /// sweep, so memory stays proportional to what the retention keeps.
    fn sweep(&mut self, now: u64) {
        self.decided_since_sweep += 1;
        if self.decided_since_sweep > self.decided.len().max(1024) {
            self.decided.retain(|_, r| r.expires_at > now);
            self.decided_since_sweep = 0;
        }
    }
}

/// The tags of every bucket of `event_id` (bucket 0's state says how
/// many), bucket 0 first.
fn tags(events: &HashMap<String, MemEvent>, event_id: &str) -> Vec<String> {
    let k = events
        .get(event_id)
        .and_then(|e| e.state.as_ref())
        .map_or(1, EventState::buckets);
    (0..k)
        .map(|b| buckets::tag(event_id, b).into_owned())
        .collect()
}

/// Defines every bucket of the event with `generation` (claimed on bucket
/// 0): the event as it is now, applied and created as bucket 0 says.
fn define_all(
    events: &mut HashMap<String, MemEvent>,
    event_id: &str,
    spec: EventSpec,
    generation: u64,
) -> Defined {
    let mut first = None;
    for b in 0..spec.stock_buckets.max(1) {
        let d = events
            .entry(buckets::tag(event_id, b).into_owned())
            .or_default()
            .define(event_id, spec, generation, b);
        first.get_or_insert(d);
    }
    let first = first.expect("at least one bucket");
    let state = buckets::sum_states(
        tags(events, event_id)
            .iter()
            .filter_map(|t| events.get(t).and_then(|e| e.state.clone()))
            .collect(),
    )
    .unwrap_or(first.state);
    Defined {
        state,
        applied: first.applied,
        created: first.created,
    }
}

/// The epoch marker and the recovery lock.
#[derive(Debug, Default)]
struct Marker {
    epoch: Option<String>,
    lock: Option<(String, Instant)>,
}

impl Marker {
    fn held_by(&self, owner: &str) -> bool {
        self.lock
            .as_ref()
            .is_some_and(|(o, until)| o == owner && *until > Instant::now())
    }

    /// The same check as the Redis store's fenced writes.
    fn fence(&self, owner: &str) -> Result<(), StoreError> {
        if !self.held_by(owner) {
            return Err(StoreError::Fenced(format!(
                "{owner} no longer holds the recovery lock"
            )));
        }
        if self.epoch.is_some() {
            return Err(StoreError::Fenced(
                "the store already has its epoch: another process finished the rebuild".into(),
            ));
        }
        Ok(())
    }
}

/// A [`Store`] held in this process's memory.
#[derive(Debug)]
pub struct MemoryStore {
    events: Mutex<HashMap<String, MemEvent>>,
    marker: Mutex<Marker>,
    retention_micros: u64,
}

impl MemoryStore {
    /// An empty store whose dedup records live for `dedup_retention`. It
    /// has its epoch: an in-process store cannot lose its state and live on.
    pub fn new(dedup_retention: Duration) -> Self {
        let store = Self::needing_recovery(dedup_retention);
        store.marker().epoch = Some("memory".into());
        store
    }

    /// An empty store without its epoch, like a Redis that lost its state:
    /// it must be recovered from the log before anything is decided. For
    /// tests of recovery.
    pub fn needing_recovery(dedup_retention: Duration) -> Self {
        Self {
            events: Mutex::new(HashMap::new()),
            marker: Mutex::new(Marker::default()),
            retention_micros: dedup_retention.as_micros() as u64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemEvent>> {
        // A panic while holding the lock cannot leave a half-made decision:
        // every mutation below is a handful of infallible map writes.
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Taken before [`MemoryStore::lock`] when both are needed.
    fn marker(&self) -> std::sync::MutexGuard<'_, Marker> {
        self.marker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(super::DEFAULT_DEDUP_RETENTION)
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn put_event(
        &self,
        event_id: &str,
        spec: EventSpec,
    ) -> Result<(EventState, bool), StoreError> {
        spec.validate().map_err(StoreError::Invalid)?;
        let mut events = self.lock();
        let generation = events.entry(event_id.to_string()).or_default().claim();
        let d = define_all(&mut events, event_id, spec, generation);
        Ok((d.state, d.created))
    }

    async fn claim_generation(&self, event_id: &str) -> Result<u64, StoreError> {
        Ok(self.lock().entry(event_id.to_string()).or_default().claim())
    }

    async fn define_event(
        &self,
        event_id: &str,
        spec: EventSpec,
        generation: u64,
    ) -> Result<Defined, StoreError> {
        spec.validate().map_err(StoreError::Invalid)?;
        let mut events = self.lock();
        Ok(define_all(&mut events, event_id, spec, generation))
    }

    async fn event(&self, event_id: &str) -> Result<Option<EventState>, StoreError> {
        let events = self.lock();
        Ok(buckets::sum_states(
            tags(&events, event_id)
                .iter()
                .filter_map(|t| events.get(t).and_then(|e| e.state.clone()))
                .collect(),
        ))
    }

    async fn decide(
        &self,
        batches: &[EventBatch],
        now: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError> {
        let mut events = self.lock();
        let mut verdicts = Vec::with_capacity(batches.len());
        for batch in batches {
            let k = events
                .get(&batch.event_id)
                .and_then(|e| e.state.as_ref())
                .map_or(1, EventState::buckets);
            let shares = if k == 1 {
                vec![buckets::Share {
                    bucket: 0,
                    batch: batch.clone(),
                    actions: (0..batch.actions.len()).collect(),
                    requests: (0..batch.requests.len()).collect(),
                }]
            } else {
                buckets::split(batch, k)
            };
            let mut parts = Vec::with_capacity(shares.len());
            for share in &shares {
                let tag = buckets::tag(&batch.event_id, share.bucket);
                parts.push(
                    match events.get_mut(tag.as_ref()).filter(|e| e.state.is_some()) {
                        None => BatchVerdict::UnknownEvent,
                        Some(ev) => ev.decide(&share.batch, now, self.retention_micros),
                    },
                );
            }
            verdicts.push(
                buckets::merge(&shares, parts, batch.actions.len(), batch.requests.len()).map_err(
                    |e| StoreError::Unavailable(format!("event {}: {e}; retry", batch.event_id)),
                )?,
            );
        }
        Ok(verdicts)
    }

    async fn decision(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<Decision>, StoreError> {
        let now = crate::wire::now_micros();
        let events = self.lock();
        // The request's user, and so its bucket, is not known: each is asked.
        Ok(tags(&events, event_id).iter().find_map(|t| {
            let ev = events.get(t)?;
            let generation = ev.state.as_ref().map_or(0, |s| s.generation);
            ev.decided
                .get(&request_id)
                .filter(|r| r.generation == generation && r.expires_at > now)
                .map(|r| Decision {
                    replay: true,
                    ..r.decision
                })
        }))
    }

    async fn find_decision(
        &self,
        request_id: Uuid,
    ) -> Result<Option<(String, Decision)>, StoreError> {
        let ids: Vec<String> = self
            .lock()
            .keys()
            .filter(|t| buckets::event_of(t) == t.as_str())
            .cloned()
            .collect();
        for id in ids {
            if let Some(d) = self.decision(&id, request_id).await? {
                return Ok(Some((id, d)));
            }
        }
        Ok(None)
    }

    async fn mark_logged(&self, batches: &[LoggedDecisions]) -> Result<(), StoreError> {
        let mut events = self.lock();
        for b in batches {
            let k = events
                .get(&b.event_id)
                .and_then(|e| e.state.as_ref())
                .map_or(1, EventState::buckets);
            for (id, seq) in &b.decisions {
                let tag = buckets::tag(&b.event_id, buckets::owner(*seq, k));
                let Some(ev) = events.get_mut(tag.as_ref()).filter(|e| {
                    e.state
                        .as_ref()
                        .is_some_and(|s| s.generation == b.generation)
                }) else {
                    continue;
                };
                if let Some(r) = ev
                    .decided
                    .get_mut(id)
                    .filter(|r| r.generation == b.generation && r.decision.seq == *seq)
                {
                    r.decision.logged = true;
                }
                if let Some((_, logged)) = ev
                    .holds
                    .get_mut(id)
                    .filter(|(h, _)| h.end_seq == *seq && *seq > 0)
                {
                    *logged = true;
                }
            }
        }
        Ok(())
    }

    async fn epoch(&self) -> Result<Option<String>, StoreError> {
        Ok(self.marker().epoch.clone())
    }

    /// Nothing to mark: a store in memory never comes back stale.
    async fn begin_rebuild(&self, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn set_epoch(&self, epoch: &str, owner: &str) -> Result<(), StoreError> {
        let mut marker = self.marker();
        marker.fence(owner)?;
        marker.epoch = Some(epoch.to_string());
        Ok(())
    }

    async fn try_lock_recovery(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut marker = self.marker();
        let now = Instant::now();
        if marker.lock.as_ref().is_some_and(|(_, until)| *until > now) {
            return Ok(false);
        }
        marker.lock = Some((owner.to_string(), now + ttl));
        Ok(true)
    }

    async fn extend_recovery_lock(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut marker = self.marker();
        if !marker.held_by(owner) {
            return Ok(false);
        }
        marker.lock = Some((owner.to_string(), Instant::now() + ttl));
        Ok(true)
    }

    async fn unlock_recovery(&self, owner: &str) -> Result<(), StoreError> {
        let mut marker = self.marker();
        if marker.lock.as_ref().is_some_and(|(o, _)| o == owner) {
            marker.lock = None;
        }
        Ok(())
    }

    async fn restore(
        &self,
        snap: &EventSnapshot,
        retention: Duration,
        owner: &str,
    ) -> Result<(), StoreError> {
        let now = crate::wire::now_micros();
        let expires_at = now.saturating_add(retention.as_micros() as u64);
        // The fence is held while writing: the check and the writes are one step.
        let marker = self.marker();
        marker.fence(owner)?;
        let mut events = self.lock();
        let ev = events
            .entry(buckets::tag(&snap.state.event_id, snap.bucket).into_owned())
            .or_default();
        ev.bucket = snap.bucket;
        ev.state = Some(snap.state.clone());
        ev.seq = snap.seq;
        ev.free_ranks = snap.free_ranks.iter().copied().collect();
        ev.holds = snap
            .holds
            .iter()
            .map(|h| (h.request_id, (h.clone(), true)))
            .collect();
        ev.holders = snap.holders.iter().cloned().collect();
        ev.coupons = snap
            .coupons
            .iter()
            .map(|c| (c.rank, (c.request_id, c.user_id.clone())))
            .collect();
        ev.decided = snap
            .decided
            .iter()
            .map(|d| {
                (
                    d.request_id,
                    DedupRecord {
                        generation: snap.state.generation,
                        user_id: d.user_id.clone(),
                        decision: d.decision,
                        expires_at,
                    },
                )
            })
            .collect();
        Ok(())
    }

    async fn ledger(&self, event_id: &str) -> Result<Option<Ledger>, StoreError> {
        let events = self.lock();
        let ledgers = tags(&events, event_id)
            .iter()
            .filter_map(|t| events.get(t))
            .filter_map(|ev| {
                let state = ev.state.clone()?;
                let mut holders: Vec<(String, u32)> =
                    ev.holders.iter().map(|(u, n)| (u.clone(), *n)).collect();
                holders.sort();
                Some(Ledger {
                    state,
                    coupons: ev
                        .coupons
                        .iter()
                        .map(|(rank, (request_id, user_id))| Coupon {
                            rank: *rank,
                            request_id: *request_id,
                            user_id: user_id.clone(),
                        })
                        .collect(),
                    holders,
                    free_ranks: ev.free_ranks.iter().copied().collect(),
                    holds: {
                        let mut holds: Vec<Hold> =
                            ev.holds.values().map(|(h, _)| h.clone()).collect();
                        holds.sort_by_key(|h| h.request_id);
                        holds
                    },
                })
            })
            .collect();
        Ok(buckets::merge_ledgers(ledgers))
    }

    async fn hold(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<HoldStatus>, StoreError> {
        let events = self.lock();
        Ok(tags(&events, event_id)
            .iter()
            .filter_map(|t| events.get(t))
            .find_map(|e| e.holds.get(&request_id))
            .map(|(hold, logged)| HoldStatus {
                hold: hold.clone(),
                end_logged: *logged,
            }))
    }

    async fn due_holds(&self, now: u64, limit: usize) -> Result<Vec<DueHold>, StoreError> {
        let events = self.lock();
        let mut due: Vec<DueHold> = events
            .iter()
            .flat_map(|(event_id, e)| {
                e.holds
                    .values()
                    .filter(|(h, _)| h.state == HoldState::Held && h.until <= now)
                    .map(|(h, _)| DueHold {
                        event_id: buckets::event_of(event_id).to_string(),
                        request_id: h.request_id,
                        user_id: h.user_id.clone(),
                        until: h.until,
                    })
            })
            .collect();
        due.sort_by_key(|d| (d.until, d.request_id));
        due.truncate(limit);
        Ok(due)
    }
}
