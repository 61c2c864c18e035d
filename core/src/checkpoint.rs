//! Checkpoints of the ledger: a lost store is rebuilt from what was **sold**,
//! not from everything that was ever asked, and not from a log that expires.
//!
//! The outcomes topic is the ledger, but it is deleted after its retention
//! (30 days) and cannot be compacted (replays share a request's key), while
//! definitions live forever. Rebuilding from the outcomes alone would, after
//! the retention, restore full stock; and it reads, and holds in memory,
//! every decision ever logged. So the ledger is **folded** ([`Fold`]): per
//! event, its latest generation's coupons (rank, request, user, decision
//! number, time, returned ones included), its holds (deadline, end, the
//! end's decision number) and its highest decision number, and, per outcomes
//! partition, the offset the fold has read up to. A fold is written to the
//! compacted checkpoints topic ([`write`]) by every issuer every
//! `--checkpoint-every`, and a recovery reads the latest checkpoint plus the
//! **tail** of the outcomes log after its offsets ([`read_latest`]).
//!
//! ## What a checkpoint guarantees
//! - **Consistent by construction.** It is a fold of the log up to its
//!   offsets, never a copy of the store: it holds exactly the decisions the
//!   log holds there, and the tail after it holds the rest. Writers may race
//!   (each issuer writes its own): any complete checkpoint is a correct
//!   starting point.
//! - **Complete or ignored.** A checkpoint is its parts (a few thousand
//!   coupons each, well under a broker's record size) then its manifest; the
//!   manifest names the parts, and a reader takes the last manifest whose
//!   parts it finds. The parts of the checkpoint a writer wrote before are
//!   deleted (tombstoned) only after its new manifest is acknowledged.
//! - **Bounded.** Memory is the coupons issued plus the tail: at most the
//!   stock without holds; with holds, every issue is kept, re-issues of
//!   returned coupons included (bounded by the requests, not the stock), and
//!   a part carries its coupons' holds beside them (no cap on a part's size
//!   yet: a drop with very many returns can outgrow `message.max.bytes`).
//!   Time is the checkpoints topic plus the tail, whatever the retention and
//!   however many requests were refused.
//!
//! The cost: decisions that issued nothing (`sold_out`, `limit_reached`)
//! before the checkpoint are not restored as dedup records: after a store
//! loss, a status lookup of such an old request finds no decision (never a
//! different one), and a client retry of it is decided again, against the
//! restored stock and holders.
//!
//! The outcomes between a checkpoint and the log's first retained offset
//! must not have expired: a reader that finds a gap refuses to rebuild
//! ([`CheckpointError::Gap`]) rather than restore a state that is missing
//! sales. With the default interval (a minute) and retention (30 days) the
//! margin is five orders of magnitude.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::kafka::{all_acknowledged, KafkaSettings};
use crate::recovery::read_topic_from;
use crate::store::{buckets, Coupon, Decision, EventSnapshot, EventState, Hold, RestoredDecision};
use crate::wire::{now_micros, EventRecord, HoldState, LedgerRecord, Outcome};
use crate::DecisionResult;

/// Version of the checkpoint records.
pub const CHECKPOINT_VERSION: u32 = 1;

/// Coupons per part record: about 100 bytes each, so a part stays far below
/// the 1 MB a broker accepts by default.
pub const COUPONS_PER_PART: usize = 4000;

/// Default interval between an issuer's checkpoints.
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// Why a checkpoint could not be read, made or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The broker failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// Outcomes after the checkpoint were deleted by the topic's retention
    /// before a checkpoint covered them: a rebuild would miss sales.
    #[error(
        "outcomes partition {partition}: the checkpoint covers offsets below {from}, but the \
         first retained record is at {first}: the outcomes in between expired before a \
         checkpoint covered them. Rebuilding would miss sales, so it is refused: raise the \
         outcomes topic's retention.ms, run issuers with --checkpoint-every, and rebuild this \
         store from a backup of the topic"
    )]
    Gap {
        /// The outcomes partition.
        partition: i32,
        /// Where the checkpoint left off.
        from: i64,
        /// The first record found (or the log's start).
        first: i64,
    },
}

/// One coupon in a fold: `(rank, request id, user id, decision number,
/// decided at µs)`, a tuple so a part stays small.
pub type FoldedCoupon = (u32, Uuid, String, u64, u64);

/// One hold in a fold: `(request id, deadline µs (0 until its issue is
/// read), end state code (0 held, 2 claimed, 3 released, 4 expired), ended
/// at µs, the end's decision number)`.
pub type FoldedHold = (Uuid, u64, u8, u64, u64);

/// One event's share of the ledger, for its latest generation seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFold {
    /// The generation folded.
    pub generation: u64,
    /// The highest decision number seen (hold ends included).
    pub seq: u64,
    /// Every coupon issued in the generation, returned ones included, by
    /// request (the first decision of each; a replay changes nothing).
    pub coupons: BTreeMap<Uuid, FoldedCoupon>,
    /// Holds by request. A hold's end may be read before its issue (they
    /// are published by different issuers): both are kept by request and
    /// put together by [`Fold::snapshots`].
    pub holds: BTreeMap<Uuid, FoldedHold>,
}

impl EventFold {
    /// Whether the coupon of `request` went back to stock.
    fn returned(&self, request: &Uuid) -> bool {
        self.holds
            .get(request)
            .is_some_and(|h| h.2 == HOLD_RELEASED || h.2 == HOLD_EXPIRED)
    }

    /// The coupons out now, by rank, and the requests whose rank a later
    /// issue took although their return is not in the log (never expected:
    /// see [`Fold::rank_conflicts`]).
    fn out_now(&self) -> (BTreeMap<u32, &FoldedCoupon>, HashSet<Uuid>) {
        let mut by_rank: BTreeMap<u32, &FoldedCoupon> = BTreeMap::new();
        let mut displaced = HashSet::new();
        for c in self.coupons.values() {
            if self.returned(&c.1) {
                continue;
            }
            match by_rank.get(&c.0) {
                Some(other) if other.3 > c.3 => {
                    displaced.insert(c.1);
                }
                Some(other) => {
                    displaced.insert(other.1);
                    by_rank.insert(c.0, c);
                }
                None => {
                    by_rank.insert(c.0, c);
                }
            }
        }
        (by_rank, displaced)
    }
}

const HOLD_HELD: u8 = 0;
const HOLD_CLAIMED: u8 = 2;
const HOLD_RELEASED: u8 = 3;
const HOLD_EXPIRED: u8 = 4;

fn hold_code(state: HoldState) -> u8 {
    match state {
        HoldState::Held => HOLD_HELD,
        HoldState::Claimed => HOLD_CLAIMED,
        HoldState::Released => HOLD_RELEASED,
        HoldState::Expired => HOLD_EXPIRED,
    }
}

fn hold_state(code: u8) -> HoldState {
    match code {
        HOLD_CLAIMED => HoldState::Claimed,
        HOLD_RELEASED => HoldState::Released,
        HOLD_EXPIRED => HoldState::Expired,
        _ => HoldState::Held,
    }
}

/// The ledger folded up to `offsets`. Pure: [`Fold::apply_record`] each
/// record in each partition's order (partitions in any interleaving: the
/// fold orders by decision number, not by reading order).
///
/// Rebuilding with holds: a coupon is out unless its hold's end (released
/// or expired) is in the log; its rank is free again unless a later issue
/// took it; the per-user counts are the coupons out; `released` and
/// `claimed` count the ends. So a rebuilt store holds the same holds,
/// counters, free ranks and due holds as the lost one, for every end that
/// reached the log (an end that did not is redone: its action was not
/// committed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fold {
    /// Per event.
    pub events: HashMap<String, EventFold>,
    /// Per outcomes partition, the next offset to read.
    pub offsets: BTreeMap<i32, i64>,
}

impl Fold {
    /// The event's fold for `generation`: started over for a newer one,
    /// `None` for an older one.
    fn event_mut(&mut self, event_id: &str, generation: u64) -> Option<&mut EventFold> {
        let e = self.events.entry(event_id.to_string()).or_default();
        if generation < e.generation {
            return None;
        }
        if generation > e.generation {
            *e = EventFold {
                generation,
                ..EventFold::default()
            };
        }
        Some(e)
    }

    fn advance_offset(&mut self, partition: i32, offset: i64) {
        let next = self.offsets.entry(partition).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// Folds one decision read at `partition`/`offset`.
    pub fn apply(&mut self, partition: i32, offset: i64, o: &Outcome) {
        self.advance_offset(partition, offset);
        if o.result == DecisionResult::Duplicate {
            return;
        }
        let Some(e) = self.event_mut(&o.event_id, o.generation) else {
            return;
        };
        e.seq = e.seq.max(o.decision_seq);
        if o.result != DecisionResult::Issued || e.coupons.contains_key(&o.request_id) {
            return;
        }
        let Some(rank) = o.issued_rank else { return };
        e.coupons.insert(
            o.request_id,
            (
                rank,
                o.request_id,
                o.user_id.clone(),
                o.decision_seq,
                o.decided_at,
            ),
        );
        if let Some(until) = o.hold_until {
            let h = e
                .holds
                .entry(o.request_id)
                .or_insert((o.request_id, 0, HOLD_HELD, 0, 0));
            h.1 = until;
        }
    }

    /// Folds one record of the outcomes topic (a decision or a hold's end)
    /// read at `partition`/`offset`.
    pub fn apply_record(&mut self, partition: i32, offset: i64, r: &LedgerRecord) {
        match r {
            LedgerRecord::Decision(o) => self.apply(partition, offset, o),
            LedgerRecord::Hold(h) => {
                self.advance_offset(partition, offset);
                if h.state == HoldState::Held {
                    return;
                }
                let Some(e) = self.event_mut(&h.event_id, h.generation) else {
                    return;
                };
                e.seq = e.seq.max(h.decision_seq);
                let f = e
                    .holds
                    .entry(h.request_id)
                    .or_insert((h.request_id, 0, HOLD_HELD, 0, 0));
                if f.2 == HOLD_HELD {
                    f.2 = hold_code(h.state);
                    f.3 = h.decided_at;
                    f.4 = h.decision_seq;
                }
            }
        }
    }

    /// Issued outcomes whose rank another coupon still out holds (never
    /// expected: the store gives a rank out once at a time). The later
    /// issue keeps the rank (it proves the earlier coupon came back); the
    /// earlier one is restored as released.
    pub fn rank_conflicts(&self) -> u64 {
        self.events
            .values()
            .map(|e| e.out_now().1.len() as u64)
            .sum()
    }

    /// Adds an event's folded coupons (from a checkpoint part).
    fn add_part(&mut self, part: Part) {
        let e = self.events.entry(part.event_id).or_default();
        if part.generation > e.generation {
            *e = EventFold {
                generation: part.generation,
                ..EventFold::default()
            };
        }
        for c in part.coupons {
            e.coupons.insert(c.1, c);
        }
        for h in part.holds {
            e.holds.insert(h.0, h);
        }
    }

    /// Each defined event's state: its latest definition, with the folded
    /// coupons and holds if they are of that generation (else full stock),
    /// plus `tail`, decisions read after the checkpoint that issued nothing
    /// (first per request), restored as dedup records. An event with K
    /// stock buckets gives K snapshots, one per bucket (bucket 0 first),
    /// each rebuilt from the outcomes of its users (routed by user as the
    /// store routes them, see [`crate::store::buckets`]). Pure.
    pub fn snapshots(
        &self,
        definitions: &HashMap<String, EventRecord>,
        tail: &[Outcome],
    ) -> Vec<EventSnapshot> {
        let mut tail_by_event: HashMap<&str, Vec<&Outcome>> = HashMap::new();
        for o in tail {
            tail_by_event.entry(&o.event_id).or_default().push(o);
        }
        let mut out: Vec<EventSnapshot> = definitions
            .values()
            .flat_map(|def| {
                let k = def.stock_buckets.max(1);
                (0..k).map(move |b| (def, k, b))
            })
            .map(|(def, k, bucket)| {
                let mine = |user: &str| buckets::bucket_of(user, k) == bucket;
                let empty = EventFold::default();
                let fold = self
                    .events
                    .get(&def.event_id)
                    .filter(|f| f.generation == def.generation)
                    .unwrap_or(&empty);
                let (by_rank, displaced) = fold.out_now();
                if !displaced.is_empty() {
                    tracing::error!(
                        event_id = def.event_id,
                        conflicts = displaced.len(),
                        "the log holds ranks out with two requests; the later issue keeps each"
                    );
                }
                let coupons: Vec<Coupon> = by_rank
                    .values()
                    .filter(|c| mine(&c.2))
                    .map(|(rank, request_id, user_id, _, _)| Coupon {
                        rank: *rank,
                        request_id: *request_id,
                        user_id: user_id.clone(),
                    })
                    .collect();
                let mut holders: BTreeMap<String, u32> = BTreeMap::new();
                for c in &coupons {
                    *holders.entry(c.user_id.clone()).or_default() += 1;
                }
                let max_rank = fold
                    .coupons
                    .values()
                    .filter(|c| mine(&c.2))
                    .map(|c| c.0)
                    .max()
                    .unwrap_or(0);
                let free_ranks: Vec<u32> = (1..=max_rank)
                    .filter(|r| buckets::owner(u64::from(*r), k) == bucket)
                    .filter(|r| !by_rank.contains_key(r))
                    .collect();
                let mut holds: Vec<Hold> = Vec::new();
                let (mut released, mut claimed) = (0u32, 0u32);
                for c in fold.coupons.values().filter(|c| mine(&c.2)) {
                    let h = fold.holds.get(&c.1);
                    let mut state = h.map_or(HoldState::Held, |h| hold_state(h.2));
                    let (mut ended_at, mut end_seq) = h.map_or((0, 0), |h| (h.3, h.4));
                    if displaced.contains(&c.1) && !state.returned() {
                        state = HoldState::Released;
                        (ended_at, end_seq) = (0, 0);
                    }
                    if state.returned() {
                        released += 1;
                    } else if state == HoldState::Claimed {
                        claimed += 1;
                    }
                    if let Some(h) = h.filter(|h| h.1 > 0) {
                        holds.push(Hold {
                            request_id: c.1,
                            user_id: c.2.clone(),
                            rank: c.0,
                            until: h.1,
                            state,
                            ended_at,
                            end_seq,
                        });
                    }
                }
                let mut decided: Vec<RestoredDecision> = fold
                    .coupons
                    .values()
                    .filter(|c| mine(&c.2))
                    .map(|(rank, request_id, user_id, seq, at)| RestoredDecision {
                        request_id: *request_id,
                        user_id: user_id.clone(),
                        decision: Decision {
                            result: DecisionResult::Issued,
                            issued_rank: Some(*rank),
                            decided_at: *at,
                            replay: true,
                            seq: *seq,
                            logged: true,
                        },
                    })
                    .collect();
                let mut seen: HashSet<Uuid> = fold.coupons.keys().copied().collect();
                for o in tail_by_event
                    .get(def.event_id.as_str())
                    .into_iter()
                    .flatten()
                {
                    if o.generation == def.generation
                        && mine(&o.user_id)
                        && o.result != DecisionResult::Issued
                        && o.result != DecisionResult::Duplicate
                        && seen.insert(o.request_id)
                    {
                        decided.push(RestoredDecision {
                            request_id: o.request_id,
                            user_id: o.user_id.clone(),
                            decision: Decision {
                                result: o.result,
                                issued_rank: None,
                                decided_at: o.decided_at,
                                replay: true,
                                seq: o.decision_seq,
                                logged: true,
                            },
                        });
                    }
                }
                let stock = buckets::bucket_stock(def.stock, k, bucket);
                EventSnapshot {
                    state: EventState {
                        event_id: def.event_id.clone(),
                        stock,
                        per_user_limit: def.per_user_limit,
                        remaining: stock.saturating_sub(coupons.len() as u32),
                        generation: def.generation,
                        claim_window_us: def.claim_window_us,
                        released,
                        claimed,
                        stock_buckets: k,
                    },
                    // The bucket's own count: at or above its last number
                    // (numbers of bucket b are (n − 1)·K + b + 1).
                    seq: fold.seq.div_ceil(u64::from(k)),
                    bucket,
                    holders: holders.into_iter().collect(),
                    coupons,
                    decided,
                    free_ranks,
                    holds,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.state.event_id, a.bucket).cmp(&(&b.state.event_id, b.bucket)));
        out
    }

    /// Reads the records after this fold's offsets to the end of the log and
    /// folds them. Decisions that issued nothing are kept in `tail` when
    /// asked for (a recovery restores them), else dropped. Blocking.
    pub fn advance(
        &mut self,
        kafka: &KafkaSettings,
        outcomes_topic: &str,
        mut tail: Option<&mut Vec<Outcome>>,
    ) -> Result<u64, CheckpointError> {
        let from = self.offsets.clone();
        // A partition whose every record after the fold expired reads
        // nothing at all: its log start tells.
        let starts = log_starts(kafka, outcomes_topic)?;
        if let Some(gap) = first_gap(&from, &starts) {
            return Err(gap);
        }
        let mut first_seen: BTreeMap<i32, i64> = BTreeMap::new();
        let read = read_topic_from(
            kafka,
            outcomes_topic,
            |p| from.get(&p).copied().unwrap_or(0),
            |partition, offset, bytes| {
                first_seen.entry(partition).or_insert(offset);
                match LedgerRecord::parse(bytes) {
                    Ok(r) => {
                        if let (Some(t), LedgerRecord::Decision(o)) = (tail.as_deref_mut(), &r) {
                            if o.result != DecisionResult::Issued {
                                t.push(o.clone());
                            }
                        }
                        self.apply_record(partition, offset, &r);
                    }
                    Err(_) => self.advance_offset(partition, offset),
                }
            },
        )?;
        match first_gap(&from, &first_seen) {
            Some(gap) => Err(gap),
            None => Ok(read),
        }
    }
}

/// Each partition's log start offset (its low watermark). Blocking.
fn log_starts(kafka: &KafkaSettings, topic: &str) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let consumer: BaseConsumer = kafka
        .client_config("couponrush-checkpoint")
        .set(
            "group.id",
            format!("couponrush-checkpoint-{}", Uuid::new_v4().simple()),
        )
        .set("session.timeout.ms", "6000")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut starts = BTreeMap::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, _) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            if low > 0 {
                starts.insert(p.id(), low);
            }
        }
    }
    Ok(starts)
}

/// The first partition whose first record read (`first_seen`) lies past
/// where the fold stood (`from`, 0 when absent): records in between expired.
fn first_gap(
    from: &BTreeMap<i32, i64>,
    first_seen: &BTreeMap<i32, i64>,
) -> Option<CheckpointError> {
    first_seen.iter().find_map(|(&partition, &first)| {
        let from = from.get(&partition).copied().unwrap_or(0);
        (first > from).then_some(CheckpointError::Gap {
            partition,
            from,
            first,
        })
    })
}

/// The last record of a checkpoint: what it covers and where its parts are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Record version.
    pub v: u32,
    /// This checkpoint.
    pub id: Uuid,
    /// Who wrote it (an issuer's member id), for the logs.
    pub writer: String,
    /// When, µs since the epoch.
    pub written_at: u64,
    /// Per outcomes partition, the next offset not covered (pairs, not a
    /// map: integer map keys do not survive serde's tagged enums).
    pub offsets: Vec<(i32, i64)>,
    /// Per event: its generation, highest decision number and part count.
    pub events: Vec<ManifestEvent>,
}

/// One event in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEvent {
    /// The event.
    pub event_id: String,
    /// Its generation folded.
    pub generation: u64,
    /// Its highest decision number.
    pub seq: u64,
    /// How many part records hold its coupons.
    pub parts: u32,
}

/// Part of a checkpoint: some of one event's coupons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Part {
    v: u32,
    checkpoint: Uuid,
    event_id: String,
    generation: u64,
    index: u32,
    coupons: Vec<FoldedCoupon>,
    /// The holds of these coupons (the first part also carries holds whose
    /// issue is not folded yet). Absent in checkpoints written before holds.
    #[serde(default)]
    holds: Vec<FoldedHold>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    Manifest(Manifest),
    Part(Part),
}

const MANIFEST_KEY: &str = "manifest";

fn part_key(checkpoint: Uuid, event_id: &str, index: u32) -> String {
    format!("part/{checkpoint}/{event_id}/{index}")
}

/// The latest complete checkpoint on `topic` and its fold, if any. Blocking;
/// reads the (compacted) topic twice: for the last manifest, then for its
/// parts, so only one checkpoint's coupons are ever held.
pub fn read_latest(
    kafka: &KafkaSettings,
    topic: &str,
) -> Result<Option<(Manifest, Fold)>, CheckpointError> {
    let mut manifests: Vec<Manifest> = Vec::new();
    read_topic_from(
        kafka,
        topic,
        |_| 0,
        |_, _, bytes| {
            // Cheap test first: parts are large and skipped unparsed.
            if bytes.starts_with(br#"{"kind":"manifest""#) {
                if let Ok(Record::Manifest(m)) = serde_json::from_slice(bytes) {
                    manifests.push(m);
                }
            }
        },
    )?;
    // Newest first: an incomplete one (its writer died mid-way, or its parts
    // were deleted since) gives way to the one before.
    for manifest in manifests.into_iter().rev() {
        let wanted: HashMap<&str, &ManifestEvent> = manifest
            .events
            .iter()
            .map(|e| (e.event_id.as_str(), e))
            .collect();
        let mut fold = Fold {
            offsets: manifest.offsets.iter().copied().collect(),
            ..Fold::default()
        };
        let mut found: HashSet<(String, u32)> = HashSet::new();
        read_topic_from(
            kafka,
            topic,
            |_| 0,
            |_, _, bytes| {
                if !bytes.starts_with(br#"{"kind":"part""#) {
                    return;
                }
                let Ok(Record::Part(part)) = serde_json::from_slice(bytes) else {
                    return;
                };
                let ours = part.checkpoint == manifest.id
                    && wanted
                        .get(part.event_id.as_str())
                        .is_some_and(|e| e.generation == part.generation && part.index < e.parts);
                if ours && found.insert((part.event_id.clone(), part.index)) {
                    fold.add_part(part);
                }
            },
        )?;
        let complete = manifest
            .events
            .iter()
            .all(|e| (0..e.parts).all(|i| found.contains(&(e.event_id.clone(), i))));
        if complete {
            for e in &manifest.events {
                let f = fold.events.entry(e.event_id.clone()).or_default();
                f.generation = e.generation;
                f.seq = e.seq;
            }
            return Ok(Some((manifest, fold)));
        }
        tracing::warn!(checkpoint = %manifest.id, "a checkpoint misses parts; trying the one before");
    }
    Ok(None)
}

/// An event's fold as checkpoint parts: its coupons (returned ones
/// included) in chunks of [`COUPONS_PER_PART`], each with the holds of its
/// coupons; the first also carries the holds whose issue is not folded yet.
fn parts_of(checkpoint: Uuid, event_id: &str, e: &EventFold) -> Vec<Part> {
    let coupons: Vec<&FoldedCoupon> = e.coupons.values().collect();
    let mut chunks: Vec<&[&FoldedCoupon]> = coupons.chunks(COUPONS_PER_PART).collect();
    let orphans: Vec<FoldedHold> = e
        .holds
        .values()
        .filter(|h| !e.coupons.contains_key(&h.0))
        .cloned()
        .collect();
    if chunks.is_empty() && !orphans.is_empty() {
        chunks.push(&[]);
    }
    chunks
        .iter()
        .enumerate()
        .map(|(index, chunk)| {
            let mut holds: Vec<FoldedHold> = chunk
                .iter()
                .filter_map(|c| e.holds.get(&c.1).cloned())
                .collect();
            if index == 0 {
                holds.extend(orphans.iter().cloned());
            }
            Part {
                v: CHECKPOINT_VERSION,
                checkpoint,
                event_id: event_id.to_string(),
                generation: e.generation,
                index: index as u32,
                coupons: chunk.iter().map(|c| (*c).clone()).collect(),
                holds,
            }
        })
        .collect()
}

/// Writes checkpoints of folds; remembers its last one, to delete its parts
/// once a newer one is acknowledged.
pub struct CheckpointWriter {
    producer: FutureProducer,
    topic: String,
    writer: String,
    previous: Vec<String>,
}

impl CheckpointWriter {
    /// A writer to `topic`, named `writer` in the manifests.
    pub fn new(kafka: &KafkaSettings, topic: &str, writer: &str) -> Result<Self, KafkaError> {
        let producer: FutureProducer = kafka
            .producer_config_with("couponrush-checkpoint", 10_000, |cfg| {
                cfg.set("compression.type", "lz4")
                    .set("message.max.bytes", "1000000");
            })
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            writer: writer.to_string(),
            previous: Vec::new(),
        })
    }

    /// Writes `fold` as a checkpoint: its parts, then (once every part is
    /// acknowledged) its manifest, then (once that is) tombstones for this
    /// writer's previous checkpoint's parts.
    pub async fn write(&mut self, fold: &Fold) -> Result<Manifest, KafkaError> {
        let id = Uuid::now_v7();
        let mut keys = Vec::new();
        let mut pending = Vec::new();
        let mut events = Vec::new();
        let mut names: Vec<&String> = fold.events.keys().collect();
        names.sort();
        for name in names {
            let e = &fold.events[name];
            let parts = parts_of(id, name, e);
            for part in &parts {
                let key = part_key(id, name, part.index);
                let bytes =
                    serde_json::to_vec(&Record::Part(part.clone())).expect("a part serializes");
                pending.push(self.send(&key, Some(&bytes))?);
                keys.push(key);
            }
            events.push(ManifestEvent {
                event_id: name.clone(),
                generation: e.generation,
                seq: e.seq,
                parts: parts.len() as u32,
            });
        }
        all_acknowledged(pending).await?;
        let manifest = Manifest {
            v: CHECKPOINT_VERSION,
            id,
            writer: self.writer.clone(),
            written_at: now_micros(),
            offsets: fold.offsets.iter().map(|(p, o)| (*p, *o)).collect(),
            events,
        };
        let bytes =
            serde_json::to_vec(&Record::Manifest(manifest.clone())).expect("a manifest serializes");
        all_acknowledged([self.send(MANIFEST_KEY, Some(&bytes))?]).await?;
        let old = std::mem::replace(&mut self.previous, keys);
        let tombstones = old
            .iter()
            .map(|k| self.send(k, None))
            .collect::<Result<Vec<_>, _>>()?;
        all_acknowledged(tombstones).await?;
        Ok(manifest)
    }

    fn send(
        &self,
        key: &str,
        payload: Option<&[u8]>,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic).key(key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Waits for anything still queued.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

/// Checkpoints the ledger every `every` (each issuer runs one): folds the
/// outcomes written since its last round into the fold it keeps, and writes
/// it when anything was read.
pub struct Checkpointer {
    /// The log.
    pub kafka: KafkaSettings,
    /// The outcomes topic to fold.
    pub outcomes: String,
    /// The checkpoints topic.
    pub checkpoints: String,
    /// Named in the manifests.
    pub writer: String,
    /// Between rounds.
    pub every: Duration,
}

impl Checkpointer {
    /// Runs rounds until `shutdown`. A failed round is logged and the next
    /// one starts again from the latest checkpoint on the topic.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut writer = match CheckpointWriter::new(&self.kafka, &self.checkpoints, &self.writer) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the checkpoint producer; no checkpoints");
                return;
            }
        };
        let mut fold = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
            match self.round(fold.take(), &mut writer).await {
                Ok((f, written)) => {
                    if let Some(m) = written {
                        metrics::counter!("couponrush_checkpoints_total").increment(1);
                        tracing::info!(checkpoint = %m.id, events = m.events.len(), "ledger checkpointed");
                    }
                    fold = Some(f);
                }
                Err(e) => {
                    metrics::counter!("couponrush_checkpoint_errors_total").increment(1);
                    tracing::warn!(error = %e, "checkpoint round failed; the next starts over");
                }
            }
        }
    }

    /// One round: `fold` (or the latest checkpoint on the topic) advanced to
    /// the end of the outcomes log, and written if it moved.
    pub async fn round(
        &self,
        fold: Option<Fold>,
        writer: &mut CheckpointWriter,
    ) -> Result<(Fold, Option<Manifest>), CheckpointError> {
        let (kafka, outcomes, checkpoints) = (
            self.kafka.clone(),
            self.outcomes.clone(),
            self.checkpoints.clone(),
        );
        let (fold, read) = tokio::task::spawn_blocking(move || {
            let mut fold = match fold {
                Some(f) => f,
                None => read_latest(&kafka, &checkpoints)?
                    .map(|(_, f)| f)
                    .unwrap_or_default(),
            };
            let read = fold.advance(&kafka, &outcomes, None)?;
            Ok::<_, CheckpointError>((fold, read))
        })
        .await
        .map_err(|_| KafkaError::Canceled)??;
        if read == 0 {
            return Ok((fold, None));
        }
        let manifest = writer.write(&fold).await?;
        Ok((fold, Some(manifest)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WIRE_VERSION;

    fn outcome(
        id: u128,
        user: &str,
        result: DecisionResult,
        rank: Option<u32>,
        seq: u64,
        generation: u64,
    ) -> Outcome {
        Outcome {
            v: WIRE_VERSION,
            request_id: Uuid::from_u128(id),
            event_id: "e".into(),
            user_id: user.into(),
            result,
            issued_rank: rank,
            partition: 0,
            offset: 0,
            decided_at: 100 + seq,
            replay: false,
            decision_seq: seq,
            accepted_at: 1,
            generation,
            hold_until: None,
        }
    }

    fn definition(stock: u32, generation: u64) -> HashMap<String, EventRecord> {
        [(
            "e".to_string(),
            EventRecord {
                v: WIRE_VERSION,
                event_id: "e".into(),
                stock,
                per_user_limit: 1,
                generation,
                written_at: 0,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )]
        .into_iter()
        .collect()
    }

    #[test]
    fn a_fold_then_its_tail_rebuilds_what_the_whole_log_does() {
        use DecisionResult::*;
        let log = [
            outcome(1, "a", Issued, Some(1), 1, 1),
            outcome(2, "b", SoldOut, None, 2, 1),
            outcome(3, "c", Issued, Some(3), 3, 1),
            {
                // a redelivery restating request 1: changes nothing
                let mut r = outcome(1, "a", Issued, Some(1), 1, 1);
                r.replay = true;
                r
            },
            outcome(4, "d", LimitReached, None, 4, 1),
            outcome(5, "e", Issued, Some(4), 5, 1),
        ];
        let mut whole = Fold::default();
        for (i, o) in log.iter().enumerate() {
            whole.apply(0, i as i64, o);
        }
        let mut split = Fold::default();
        for (i, o) in log[..3].iter().enumerate() {
            split.apply(0, i as i64, o);
        }
        // The checkpoint keeps coupons only: what it cannot keep must not
        // matter to the state.
        let mut restarted = Fold {
            offsets: split.offsets.clone(),
            ..Fold::default()
        };
        for e in split.events.values() {
            restarted.add_part(Part {
                v: 1,
                checkpoint: Uuid::nil(),
                event_id: "e".into(),
                generation: e.generation,
                index: 0,
                coupons: e.coupons.values().cloned().collect(),
                holds: Vec::new(),
            });
            restarted.events.get_mut("e").unwrap().seq = e.seq;
        }
        for (i, o) in log.iter().enumerate().skip(3) {
            restarted.apply(0, i as i64, o);
        }
        let defs = definition(10, 1);
        let a = &whole.snapshots(&defs, &[])[0];
        let b = &restarted.snapshots(&defs, &[])[0];
        assert_eq!(
            (&a.state, a.seq, &a.coupons, &a.holders, &a.free_ranks),
            (&b.state, b.seq, &b.coupons, &b.holders, &b.free_ranks)
        );
        assert_eq!(a.state.remaining, 7);
        assert_eq!(a.free_ranks, [2]);
        assert_eq!(restarted.offsets[&0], 6);
    }

    /// A fold with holds written as checkpoint parts (through their JSON)
    /// and read back is the same fold, and a hold's end read before its
    /// issue (another issuer published it first) survives the checkpoint.
    #[test]
    fn holds_survive_a_checkpoint_and_an_end_may_come_before_its_issue() {
        use crate::wire::{HoldOutcome, HOLD_KIND};
        use DecisionResult::*;
        let held = |mut o: Outcome| {
            o.hold_until = Some(o.decided_at + 1000);
            LedgerRecord::Decision(o)
        };
        let end = |id: u128, user: &str, state: HoldState, rank: u32, seq: u64| {
            LedgerRecord::Hold(HoldOutcome {
                v: WIRE_VERSION,
                kind: HOLD_KIND.into(),
                request_id: Uuid::from_u128(id),
                event_id: "e".into(),
                user_id: user.into(),
                state,
                issued_rank: rank,
                partition: 0,
                offset: 0,
                action_at: 1,
                decided_at: 500 + seq,
                replay: false,
                decision_seq: seq,
                generation: 1,
            })
        };
        let log = [
            held(outcome(1, "a", Issued, Some(1), 1, 1)),
            held(outcome(2, "b", Issued, Some(2), 2, 1)),
            end(1, "a", HoldState::Released, 1, 3),
            // request 4's end before its issue: published by another issuer.
            end(4, "d", HoldState::Claimed, 3, 6),
            held(outcome(3, "c", Issued, Some(1), 4, 1)),
            held(outcome(4, "d", Issued, Some(3), 5, 1)),
        ];
        let mut whole = Fold::default();
        for (i, r) in log.iter().enumerate() {
            whole.apply_record(0, i as i64, r);
        }
        // Checkpointed after the 4th record, the rest read as the tail.
        let mut split = Fold::default();
        for (i, r) in log[..4].iter().enumerate() {
            split.apply_record(0, i as i64, r);
        }
        let mut restarted = Fold {
            offsets: split.offsets.clone(),
            ..Fold::default()
        };
        for part in parts_of(Uuid::nil(), "e", &split.events["e"]) {
            let bytes = serde_json::to_vec(&Record::Part(part)).unwrap();
            let Ok(Record::Part(part)) = serde_json::from_slice(&bytes) else {
                panic!("a part reads back")
            };
            restarted.add_part(part);
        }
        restarted.events.get_mut("e").unwrap().seq = split.events["e"].seq;
        for (i, r) in log.iter().enumerate().skip(4) {
            restarted.apply_record(0, i as i64, r);
        }
        assert_eq!(restarted.events["e"], whole.events["e"]);
        let mut defs = definition(5, 1);
        defs.get_mut("e").unwrap().claim_window_us = 1000;
        let s = &whole.snapshots(&defs, &[])[0];
        let out: Vec<(u32, Uuid)> = s.coupons.iter().map(|c| (c.rank, c.request_id)).collect();
        assert_eq!(
            out,
            [
                (1, Uuid::from_u128(3)),
                (2, Uuid::from_u128(2)),
                (3, Uuid::from_u128(4))
            ]
        );
        assert_eq!(
            (s.state.remaining, s.state.released, s.state.claimed, s.seq),
            (2, 1, 1, 6)
        );
        assert_eq!(
            s.state.issued_total() - s.state.released + s.state.remaining,
            5
        );
        assert!(s.free_ranks.is_empty());
        let states: Vec<(Uuid, HoldState)> =
            s.holds.iter().map(|h| (h.request_id, h.state)).collect();
        assert_eq!(
            states,
            [
                (Uuid::from_u128(1), HoldState::Released),
                (Uuid::from_u128(2), HoldState::Held),
                (Uuid::from_u128(3), HoldState::Held),
                (Uuid::from_u128(4), HoldState::Claimed),
            ]
        );
        assert_eq!(
            s.decided.len(),
            4,
            "every issue stays a decision, returned or not"
        );
    }

    #[test]
    fn a_new_generation_starts_the_event_over_and_an_older_one_is_ignored() {
        use DecisionResult::*;
        let mut f = Fold::default();
        f.apply(0, 0, &outcome(1, "a", Issued, Some(1), 1, 1));
        f.apply(0, 1, &outcome(2, "b", Issued, Some(1), 1, 2));
        f.apply(0, 2, &outcome(3, "c", Issued, Some(2), 2, 1)); // late, old generation
        let s = &f.snapshots(&definition(5, 2), &[])[0];
        assert_eq!(s.coupons.len(), 1);
        assert_eq!(s.coupons[0].request_id, Uuid::from_u128(2));
        // A definition newer than the fold: full stock.
        let s = &f.snapshots(&definition(5, 3), &[])[0];
        assert_eq!(s.state.remaining, 5);
    }

    #[test]
    fn a_rank_out_with_two_requests_is_counted_and_the_later_issue_keeps_it() {
        use DecisionResult::*;
        let mut f = Fold::default();
        f.apply(0, 0, &outcome(1, "a", Issued, Some(1), 1, 1));
        f.apply(0, 1, &outcome(2, "b", Issued, Some(1), 2, 1));
        assert_eq!(f.rank_conflicts(), 1);
        let s = &f.snapshots(&definition(5, 1), &[])[0];
        assert_eq!(s.coupons.len(), 1);
        assert_eq!(
            s.coupons[0].request_id,
            Uuid::from_u128(2),
            "the later issue keeps the rank"
        );
        assert_eq!(
            s.state.issued_total() - s.state.released + s.state.remaining,
            5
        );
    }

    #[test]
    fn outcomes_that_expired_before_a_checkpoint_covered_them_are_a_gap() {
        let from: BTreeMap<i32, i64> = [(0, 10), (1, 5)].into_iter().collect();
        let contiguous: BTreeMap<i32, i64> = [(0, 10), (1, 5)].into_iter().collect();
        assert!(first_gap(&from, &contiguous).is_none());
        let expired: BTreeMap<i32, i64> = [(0, 10), (1, 7)].into_iter().collect();
        let gap = first_gap(&from, &expired).expect("a gap");
        assert!(gap.to_string().contains("partition 1"), "{gap}");
        // No checkpoint at all, and the log no longer starts at 0.
        let truncated: BTreeMap<i32, i64> = [(2, 40)].into_iter().collect();
        assert!(first_gap(&BTreeMap::new(), &truncated).is_some());
    }

    #[test]
    fn records_are_tagged_so_a_reader_can_skip_parts_unparsed() {
        let m = Record::Manifest(Manifest {
            v: 1,
            id: Uuid::nil(),
            writer: "w".into(),
            written_at: 1,
            offsets: vec![(0, 12), (3, 4)],
            events: vec![],
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(bytes.starts_with(br#"{"kind":"manifest""#));
        let back: Record = serde_json::from_slice(&bytes).expect("a manifest reads back");
        assert!(matches!(back, Record::Manifest(m) if m.offsets == [(0, 12), (3, 4)]));
        let p = Record::Part(Part {
            v: 1,
            checkpoint: Uuid::nil(),
            event_id: "e".into(),
            generation: 1,
            index: 0,
            coupons: vec![(1, Uuid::nil(), "u".into(), 1, 1)],
            holds: vec![],
        });
        assert!(serde_json::to_vec(&p)
            .unwrap()
            .starts_with(br#"{"kind":"part""#));
    }
}
