//! Watching decisions: a consumer of `coupon.outcomes` (and the DLQ), in its
//! own consumer group, positioned at the topics' ends when the run starts, so
//! it sees exactly what this run caused.
//!
//! It runs on a thread of its own and keeps every outcome of the run's event
//! with the time it was observed (for end-to-end latency), every hold's end
//! (`"kind":"hold"` records beside the decisions), plus the DLQ records by
//! reason.
//!
//! For an event with holds it also hands each new winner (an `issued`
//! outcome with a claim window) to the holders ([`crate::drive::holders`])
//! through a bounded channel, and keeps the holds that have not ended, so
//! the run can wait for every hold to end before its audit.
//!
//! It also notes where the requests topic ended when the run started, so
//! that requests left in doubt (sent, never acknowledged) can be settled
//! against the log at the end ([`written_requests`]): one that is there was
//! written and must be decided, like any accepted request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::wire::{dlq_headers, now_micros, outcome_headers, HoldOutcome, LedgerRecord};
use couponrush_core::{DecisionResult, Outcome, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::dashboard::LiveFeed;

/// An outcome and when this process saw it (µs since the epoch).
#[derive(Debug, Clone)]
pub struct Observed {
    /// The outcome record.
    pub outcome: Outcome,
    /// When it was read.
    pub observed_at: u64,
    /// The issuer that published it (its `x-issuer` header), if it said.
    pub issuer: Option<String>,
}

/// A hold's end and when this process saw it.
#[derive(Debug, Clone)]
pub struct ObservedHold {
    /// The record.
    pub hold: HoldOutcome,
    /// When it was read, µs since the epoch.
    pub observed_at: u64,
}

/// What the observer saw.
#[derive(Debug, Default)]
pub struct Observations {
    /// Every outcome of the event, replays included, in read order.
    pub outcomes: Vec<Observed>,
    /// Every hold end of the event, replays included, in read order.
    pub holds: Vec<ObservedHold>,
    /// DLQ records written during the run, by reason.
    pub dlq: BTreeMap<String, u64>,
    /// Outcome records that did not parse.
    pub unparsable: u64,
}

struct Shared {
    stop: AtomicBool,
    decided: Mutex<HashSet<Uuid>>,
    decided_count: AtomicU64,
    holds: Mutex<HoldBook>,
}

/// The holds seen issued, and those seen ended (an end may be read before
/// its issue: they can sit on different partitions).
#[derive(Default)]
struct HoldBook {
    /// Request → its deadline (µs).
    issued: HashMap<Uuid, u64>,
    ended: HashSet<Uuid>,
}

/// What the observer hands on besides keeping the outcomes.
#[derive(Default)]
pub struct Watch {
    /// The live page's feed.
    pub live: Option<Arc<LiveFeed>>,
    /// Where each new winner of a hold goes (its first `issued` outcome
    /// with a claim window). The channel is bounded: when it is full the
    /// observer waits, and so reads no further until the holders catch up.
    pub winners: Option<mpsc::Sender<Outcome>>,
}

/// Distinct requests decided so far, readable while the observer runs.
#[derive(Clone)]
pub struct DecidedCount(Arc<Shared>);

impl DecidedCount {
    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.decided_count.load(Ordering::Relaxed)
    }
}

/// A running observer.
pub struct Observer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Observations>>,
    /// The requests topic's partitions and their ends when the run started.
    requests_from: Vec<(i32, i64)>,
}

impl Observer {
    /// Positions a consumer at the current ends of the outcomes and DLQ
    /// topics and starts reading. Blocking (metadata calls): call it from a
    /// blocking context or before the load starts.
    pub fn start(
        kafka: &KafkaSettings,
        topics: &Topics,
        event_id: &str,
    ) -> Result<Self, KafkaError> {
        Self::start_live(kafka, topics, event_id, None)
    }

    /// [`Observer::start`], also handing every outcome and dead letter to
    /// the live page's feed.
    pub fn start_live(
        kafka: &KafkaSettings,
        topics: &Topics,
        event_id: &str,
        live: Option<Arc<LiveFeed>>,
    ) -> Result<Self, KafkaError> {
        Self::start_watching(
            kafka,
            topics,
            event_id,
            Watch {
                live,
                winners: None,
            },
        )
    }

    /// [`Observer::start`], handing on what `watch` asks for.
    pub fn start_watching(
        kafka: &KafkaSettings,
        topics: &Topics,
        event_id: &str,
        watch: Watch,
    ) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = kafka
            .client_config("coupon-loadgen-observer")
            .set(
                "group.id",
                format!("coupon-loadgen-{}", Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in [&topics.outcomes, &topics.dlq] {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for t in md.topics() {
                for p in t.partitions() {
                    let (_, high) =
                        consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                    tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
                }
            }
        }
        let mut requests_from = Vec::new();
        let md = consumer.fetch_metadata(Some(&topics.requests), Duration::from_secs(10))?;
        for t in md.topics() {
            for p in t.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(&topics.requests, p.id(), Duration::from_secs(10))?;
                requests_from.push((p.id(), high));
            }
        }
        consumer.assign(&tpl)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            decided: Mutex::new(HashSet::new()),
            decided_count: AtomicU64::new(0),
            holds: Mutex::new(HoldBook::default()),
        });
        let (event, outcomes_topic, me) = (
            event_id.to_string(),
            topics.outcomes.clone(),
            shared.clone(),
        );
        // Some brokers report a stale end offset (tansu 0.6.0 reports the last
        // batch's), so the reader may start a little before the run: DLQ
        // records written before it (less a second of clock skew) are not ours.
        let since_ms = (now_micros() / 1000).saturating_sub(1000) as i64;
        let thread = std::thread::Builder::new()
            .name("observer".into())
            .spawn(move || read(consumer, &event, &outcomes_topic, since_ms, &me, watch))
            .map_err(|_| KafkaError::Canceled)?;
        Ok(Self {
            shared,
            thread: Some(thread),
            requests_from,
        })
    }

    /// The requests topic's partitions and where each ended when the run
    /// started (from where [`written_requests`] reads).
    pub fn requests_from(&self) -> Vec<(i32, i64)> {
        self.requests_from.clone()
    }

    /// Distinct requests of the event decided so far.
    pub fn decided(&self) -> u64 {
        self.decided_count().get()
    }

    /// A handle on [`Observer::decided`] for a task that must not own the
    /// observer (a progress display): the observer stays owned by the run,
    /// so [`Observer::finish`] never waits for, or races with, its readers.
    pub fn decided_count(&self) -> DecidedCount {
        DecidedCount(self.shared.clone())
    }

    /// Waits until every id in `ids` is decided or `timeout` passes; returns
    /// how many are still undecided.
    pub async fn wait_for(&self, ids: &HashSet<Uuid>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = {
                let decided = self
                    .shared
                    .decided
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                ids.iter().filter(|id| !decided.contains(id)).count()
            };
            if missing == 0 || Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Holds seen issued and not seen ended.
    pub fn open_holds(&self) -> usize {
        let book = self.shared.holds.lock().unwrap_or_else(|e| e.into_inner());
        book.issued
            .keys()
            .filter(|id| !book.ended.contains(id))
            .count()
    }

    /// Waits until every hold seen issued has ended, or the latest deadline
    /// of those still open is `slack` behind, or `cap` passes (the bound
    /// whatever the deadlines say); returns how many are still open.
    pub async fn wait_for_holds(&self, slack: Duration, cap: Duration) -> usize {
        let give_up = Instant::now() + cap;
        let slack = slack.as_micros() as u64;
        loop {
            let (open, latest) = {
                let book = self.shared.holds.lock().unwrap_or_else(|e| e.into_inner());
                let open: Vec<u64> = book
                    .issued
                    .iter()
                    .filter(|(id, _)| !book.ended.contains(*id))
                    .map(|(_, until)| *until)
                    .collect();
                (open.len(), open.into_iter().max().unwrap_or(0))
            };
            if open == 0 || now_micros() > latest.saturating_add(slack) || Instant::now() >= give_up
            {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops reading and returns everything seen.
    pub fn finish(mut self) -> Observations {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn read(
    consumer: BaseConsumer,
    event: &str,
    outcomes_topic: &str,
    since_ms: i64,
    shared: &Shared,
    watch: Watch,
) -> Observations {
    let Watch { live, winners } = watch;
    let mut obs = Observations::default();
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        if m.topic() == outcomes_topic {
            match LedgerRecord::parse(m.payload().unwrap_or_default()) {
                Ok(LedgerRecord::Decision(o)) if o.event_id == event => {
                    let fresh = shared
                        .decided
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(o.request_id);
                    if fresh {
                        shared.decided_count.fetch_add(1, Ordering::Relaxed);
                    }
                    let new_hold = match o.hold_until {
                        Some(until) if o.result == DecisionResult::Issued => shared
                            .holds
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .issued
                            .insert(o.request_id, until)
                            .is_none(),
                        _ => false,
                    };
                    if let (true, Some(w)) = (new_hold, &winners) {
                        hand_on(w, o.clone(), &shared.stop);
                    }
                    let seen = Observed {
                        outcome: o,
                        observed_at: now_micros(),
                        issuer: header(&m, outcome_headers::ISSUER),
                    };
                    if let Some(live) = &live {
                        live.decision(&seen);
                    }
                    obs.outcomes.push(seen);
                }
                Ok(LedgerRecord::Hold(h)) if h.event_id == event => {
                    shared
                        .holds
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .ended
                        .insert(h.request_id);
                    let seen = ObservedHold {
                        hold: h,
                        observed_at: now_micros(),
                    };
                    if let Some(live) = &live {
                        live.hold_end(&seen);
                    }
                    obs.holds.push(seen);
                }
                Ok(_) => {}
                Err(_) => obs.unparsable += 1,
            }
        } else if m.timestamp().to_millis().is_none_or(|t| t >= since_ms) {
            let reason = header(&m, dlq_headers::REASON).unwrap_or_else(|| "unknown".into());
            *obs.dlq.entry(reason).or_default() += 1;
            if let Some(live) = &live {
                live.dead_letter();
            }
        }
    }
    obs
}

/// Hands a winner to the holders, waiting while their channel is full
/// (bounded: the observer reads no further meanwhile), giving up when they
/// are gone or the observer is stopped.
fn hand_on(to: &mpsc::Sender<Outcome>, winner: Outcome, stop: &AtomicBool) {
    let mut winner = winner;
    loop {
        match to.try_send(winner) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(back)) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                winner = back;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// A header's value as text, if the record has it.
fn header(m: &impl Message, key: &str) -> Option<String> {
    m.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Which of `ids` are in the requests topic `topic` since `from` (each
/// partition's offset when the run started), with their users: a request in
/// doubt that is there was written, so it must be decided (else it is lost);
/// one that is not was never written. Reads to each partition's end as of
/// the call, then one idle second more (a broker may report an end that is
/// a batch short: tansu 0.6.0), within `within` at most. Blocking.
pub fn written_requests(
    kafka: &KafkaSettings,
    topic: &str,
    from: &[(i32, i64)],
    ids: &HashSet<Uuid>,
    within: Duration,
) -> Result<HashMap<Uuid, String>, KafkaError> {
    let mut found = HashMap::new();
    if ids.is_empty() || from.is_empty() {
        return Ok(found);
    }
    let consumer: BaseConsumer = kafka
        .client_config("coupon-loadgen-settle")
        .set(
            "group.id",
            format!("coupon-loadgen-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for &(p, start) in from {
        tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + within;
    let mut idle_since: Option<Instant> = None;
    let mut at: HashMap<i32, i64> = from.iter().copied().collect();
    while Instant::now() < deadline && found.len() < ids.len() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_since = None;
                at.insert(m.partition(), m.offset() + 1);
                if let Some(req) = m
                    .payload()
                    .and_then(|b| couponrush_core::IssueRequest::parse(b).ok())
                {
                    if ids.contains(&req.request_id) {
                        found.insert(req.request_id, req.user_id);
                    }
                }
            }
            Some(Err(e)) => return Err(e),
            None => {
                let caught_up = ends
                    .iter()
                    .all(|(p, end)| at.get(p).copied().unwrap_or(0) >= *end);
                let idle = *idle_since.get_or_insert_with(Instant::now);
                if caught_up && idle.elapsed() >= Duration::from_secs(1) {
                    break;
                }
            }
        }
    }
    Ok(found)
}
