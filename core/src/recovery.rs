//! Rebuilding a lost store from the log.
//!
//! The store (Redis) is fast but not the source of truth: the log is. Every
//! event definition is on `coupon.events` (compacted) and every decision on
//! `coupon.outcomes`. If the store comes back empty (a restart without
//! persistence, a failover to an empty replica), its epoch marker is gone,
//! every event is unknown, and nothing can be decided. The first process to
//! notice takes the recovery lock and:
//!
//! 1. reads `coupon.events`;
//! 2. marks the store as being rebuilt ([`Store::begin_rebuild`]: nothing is
//!    decided from then on, a copy of the store taken mid-rebuild says so
//!    when it comes back, and on a cluster the slot markers an earlier
//!    recoverer left half written are cleared), a first start (no events:
//!    a fresh deployment) too, whose marker is then simply written;
//!    otherwise it waits out the **fence**: outcomes decided before the
//!    loss may still be
//!    on their way to the log (an issuer publishing a batch it decided just
//!    before). An outcome is enqueued right after its decision, and no
//!    produce request for it can land later than the outcome producer's
//!    delivery bound (message timeout, librdkafka's timeout scan, request
//!    timeout and linger, as configured after every `--kafka-opt`), after
//!    which the issuer decides the batch again rather than republish it. An
//!    issuer refuses to start unless its fence exceeds that bound, so after
//!    the fence no decision taken against the lost state can still appear;
//! 3. reads the latest checkpoint (`coupon.checkpoints`, see
//!    [`crate::checkpoint`]) and the outcomes after it to the end of the log
//!    (decisions and hold ends alike, [`LedgerRecord::parse`]), and
//!    rebuilds, per event and for its latest generation: the coupons out by
//!    rank, the holders, the decided request ids (as logged: they are in the
//!    log), the holds with their deadlines and ends, the free ranks, the
//!    `released` and `claimed` counters, the decision sequence, and the
//!    stock left. Decision numbers, not reading order, say which came first
//!    (a coupon's issue and its hold's end may reach different partitions in
//!    either order). Memory and time are
//!    the coupons sold plus the tail, not the whole ledger, and a ledger
//!    older than the outcomes' retention is still counted;
//! 4. restores each event (its stale dedup records dropped), then writes a
//!    new epoch marker.
//!
//! The reading runs on a blocking thread; an issuer that recovers keeps
//! polling its (paused) consumer meanwhile, so a slow recovery does not
//! cost it its place in the group (`max.poll.interval.ms`).
//!
//! The lock expires ([`LOCK_TTL`]) so a crashed recoverer does not block the
//! others forever; its holder extends it while it works and stops as soon as
//! it cannot. Every restore write and the epoch marker are **fenced** in the
//! store: refused unless, in the same atomic step, the writer holds the lock
//! and the epoch is still missing. So a recoverer whose lock expired (a
//! paused process, a store that stopped answering) never writes over a store
//! another process rebuilt since, nor interleaves its writes with that
//! rebuild: it stops with [`RecoveryError::LockLost`] and waits like the
//! others.
//!
//! Others wait for the marker. Decisions that never reached the log were
//! never shown to anyone (the api shows only logged decisions), and their
//! requests, never committed, are redelivered and decided again.
//!
//! The catch: an issuer frozen (not crashed) for longer than the fence
//! between deciding and enqueueing its outcomes could publish a decision the
//! rebuilt store does not know. Keep the fence above any pause you expect.
//! The issuer bounds its own part: a store answer it held while it
//! completed older batches (retrying a broker or a store), or one that
//! took long to come, is dropped and decided again once it is older than
//! half the margin of the fence over its delivery bound
//! (`issuer/src/worker.rs`, the shelf life).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::checkpoint::{self, CheckpointError, Fold};
use crate::kafka::KafkaSettings;
use crate::store::{EventSnapshot, Store, StoreError};
use crate::wire::{EventRecord, LedgerRecord, Outcome};
use crate::Topics;

/// Default fence: the outcome producers' message timeout plus a margin.
pub const DEFAULT_FENCE: Duration = Duration::from_secs(15);

/// Lifetime of the recovery lock. Its holder extends it every third of it
/// while it recovers, so a crashed recoverer blocks the others this long at
/// most, and a slow one keeps it however long the log takes to read.
pub const LOCK_TTL: Duration = Duration::from_secs(30);

/// Why the store could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// This process lost the recovery lock while recovering (it expired:
    /// a pause, or a store that did not answer): it stopped without writing
    /// anything more, and another process may be rebuilding the store.
    #[error("lost the recovery lock while recovering, so stopped without writing: {0}")]
    LockLost(String),
    /// The log could not be read.
    #[error("cannot read the log: {0}")]
    Kafka(#[from] KafkaError),
    /// Someone else is recovering and did not finish in time.
    #[error("the store is still being recovered by another process after {0:?}")]
    Timeout(Duration),
    /// The ledger cannot be rebuilt from the checkpoint and the log.
    #[error(transparent)]
    Checkpoint(CheckpointError),
}

impl From<CheckpointError> for RecoveryError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::Kafka(k) => RecoveryError::Kafka(k),
            other => RecoveryError::Checkpoint(other),
        }
    }
}

impl From<StoreError> for RecoveryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced(why) => RecoveryError::LockLost(why),
            other => RecoveryError::Store(other),
        }
    }
}

/// What a recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Events restored.
    pub events: usize,
    /// Outcome records read (the tail after the checkpoint).
    pub outcomes_read: u64,
    /// The checkpoint the tail was read after, if there was one.
    pub checkpoint: Option<Uuid>,
    /// Decisions restored.
    pub decisions: usize,
    /// Coupons restored.
    pub coupons: usize,
    /// Whether the fence was waited out.
    pub fenced: bool,
    /// How long it took.
    pub took: Duration,
}

/// Makes a store ready to decide, recovering it from the log if it lost its
/// state.
pub struct Recovery {
    /// The log.
    pub kafka: KafkaSettings,
    /// Its topics.
    pub topics: Topics,
    /// The store.
    pub store: Arc<dyn Store>,
    /// How long to wait for in-flight outcomes.
    pub fence: Duration,
    /// Dedup retention of restored records.
    pub retention: Duration,
    /// Who is asking (for the lock).
    pub owner: String,
}

impl Recovery {
    /// Returns once the store has an epoch: at once if it has one, after
    /// recovering it if this caller gets the lock, or after someone else's
    /// recovery. `Ok(Some(_))` when this caller recovered.
    ///
    /// A caller that loses the lock while recovering stops (its writes are
    /// refused by the store anyway, see [`Store::restore`]) and waits for
    /// the epoch like any other.
    pub async fn ensure_ready(
        &self,
        timeout: Duration,
    ) -> Result<Option<Recovered>, RecoveryError> {
        let started = Instant::now();
        loop {
            if self.store.epoch().await?.is_some() {
                return Ok(None);
            }
            if self.store.try_lock_recovery(&self.owner, LOCK_TTL).await? {
                let result = self.recover_holding_lock().await;
                let _ = self.store.unlock_recovery(&self.owner).await;
                match result {
                    Err(RecoveryError::LockLost(why)) => {
                        tracing::warn!(
                            owner = %self.owner,
                            %why,
                            "lost the recovery lock while recovering; stopped without writing, waiting for the store's epoch"
                        );
                    }
                    other => return other.map(Some),
                }
            }
            if started.elapsed() > timeout {
                return Err(RecoveryError::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Recovers while extending the lock; stops as soon as the lock is lost.
    async fn recover_holding_lock(&self) -> Result<Recovered, RecoveryError> {
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_lock(
            self.store.clone(),
            self.owner.clone(),
            LOCK_TTL,
            lost.clone(),
        ));
        let result = tokio::select! {
            biased;
            _ = lost.cancelled() => Err(RecoveryError::LockLost(format!(
                "{} could not extend the recovery lock: another process holds it, or it expired",
                self.owner
            ))),
            r = self.recover() => r,
        };
        keeper.abort();
        // A recovery that failed otherwise may have lost the lock as well:
        // a process frozen past the lock's lifetime finds, once thawed, its
        // broker connections broken too, and the read can fail before the
        // keeper notices (the chaos suite's `slow-recovery` saw it). The
        // lost lock is what decides what this process may do next: wait for
        // the store's epoch, not retry the rebuild.
        match result {
            Err(e) if !matches!(e, RecoveryError::LockLost(_)) => {
                match self.store.extend_recovery_lock(&self.owner, LOCK_TTL).await {
                    Ok(false) => Err(RecoveryError::LockLost(format!(
                        "{} no longer holds the recovery lock; the recovery had failed: {e}",
                        self.owner
                    ))),
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    async fn recover(&self) -> Result<Recovered, RecoveryError> {
        let started = Instant::now();
        let (kafka, topic) = (self.kafka.clone(), self.topics.events.clone());
        let events = tokio::task::spawn_blocking(move || read_events(&kafka, &topic))
            .await
            .map_err(|_| KafkaError::Canceled)??;
        let mut report = Recovered::default();
        // Marked even on a first start: a recoverer that died (or failed)
        // while writing its epoch leaves it in some of a cluster's slot
        // markers, which refuse every later epoch until a rebuild marks
        // them lost again (the CI's cluster spine once waited forever on
        // one).
        self.store.begin_rebuild(&self.owner).await?;
        if !events.is_empty() {
            tracing::warn!(
                events = events.len(),
                fence = ?self.fence,
                "the store lost its state; waiting out the fence, then rebuilding it from the log"
            );
            tokio::time::sleep(self.fence).await;
            report.fenced = true;
            let (kafka, topics) = (self.kafka.clone(), self.topics.clone());
            let (fold, tail, read, checkpoint) = tokio::task::spawn_blocking(move || {
                let (checkpoint, mut fold) =
                    match checkpoint::read_latest(&kafka, &topics.checkpoints)? {
                        Some((manifest, fold)) => (Some(manifest.id), fold),
                        None => (None, Fold::default()),
                    };
                let mut tail = Vec::new();
                let read = fold.advance(&kafka, &topics.outcomes, Some(&mut tail))?;
                Ok::<_, CheckpointError>((fold, tail, read, checkpoint))
            })
            .await
            .map_err(|_| KafkaError::Canceled)??;
            report.outcomes_read = read;
            report.checkpoint = checkpoint;
            if fold.rank_conflicts() > 0 {
                tracing::error!(
                    conflicts = fold.rank_conflicts(),
                    "the log holds ranks out with two requests at once; the later issue of each keeps it"
                );
            }
            for snapshot in fold.snapshots(&events, &tail) {
                report.events += 1;
                report.decisions += snapshot.decided.len();
                report.coupons += snapshot.coupons.len();
                self.store
                    .restore(&snapshot, self.retention, &self.owner)
                    .await?;
            }
        }
        self.store
            .set_epoch(&Uuid::now_v7().to_string(), &self.owner)
            .await?;
        report.took = started.elapsed();
        tracing::warn!(
            events = report.events,
            decisions = report.decisions,
            coupons = report.coupons,
            took = ?report.took,
            "store recovered from the log"
        );
        Ok(report)
    }
}

/// Extends `owner`'s recovery lock every third of `ttl`; cancels
/// `lost` (and returns) once it no longer holds it. A store that does not
/// answer is retried until the lock would have expired.
async fn keep_lock(store: Arc<dyn Store>, owner: String, ttl: Duration, lost: CancellationToken) {
    let mut extended = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match store.extend_recovery_lock(&owner, ttl).await {
            Ok(true) => extended = Instant::now(),
            Ok(false) => break,
            Err(e) if extended.elapsed() < ttl => {
                tracing::warn!(error = %e, "extending the recovery lock failed; retrying");
            }
            Err(_) => break,
        }
    }
    lost.cancel();
}

/// Rebuilds each event's state from its latest definition and the outcomes
/// of that generation, read from the beginning (one partition, in order):
/// [`Fold`] without a checkpoint. Pure.
pub fn rebuild(events: &HashMap<String, EventRecord>, outcomes: &[Outcome]) -> Vec<EventSnapshot> {
    let records: Vec<LedgerRecord> = outcomes
        .iter()
        .cloned()
        .map(LedgerRecord::Decision)
        .collect();
    rebuild_ledger(events, &records)
}

/// [`rebuild`] from every record of the outcomes topic, hold ends
/// included, in any order of partitions: the fold orders by decision
/// number. Pure.
pub fn rebuild_ledger(
    events: &HashMap<String, EventRecord>,
    records: &[LedgerRecord],
) -> Vec<EventSnapshot> {
    let mut fold = Fold::default();
    let mut tail = Vec::new();
    for (i, r) in records.iter().enumerate() {
        fold.apply_record(0, i as i64, r);
        if let LedgerRecord::Decision(o) = r {
            tail.push(o.clone());
        }
    }
    fold.snapshots(events, &tail)
}

/// The default client context, except that the end of an empty partition
/// (which librdkafka reports as a "global error" when nothing was fetched
/// from it) is not logged as an error: reading to the end is the point.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!(%reason, "end of an empty partition");
        } else {
            tracing::error!(error = %error, %reason, "librdkafka");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Reads every record of `topic` from the beginning to its end. Blocking.
pub fn read_topic(
    kafka: &KafkaSettings,
    topic: &str,
    mut each: impl FnMut(&[u8]),
) -> Result<u64, KafkaError> {
    read_topic_from(kafka, topic, |_| 0, |_, _, bytes| each(bytes))
}

/// Reads `topic` from `from(partition)` (an offset; below the log's start
/// means its start) to its end, handing each record's partition, offset and
/// payload (empty for a tombstone) to `each`. Blocking.
///
/// The end is where the broker's fetches say each partition ends
/// (partition EOF), then a quiet second with nothing more: brokers' offset
/// listings are not trusted (tansu 0.6.0 reports the last *batch* as the end,
/// which would cut a read short; `core/tests/read_log.rs`). Recovery reads
/// after the fence, when nothing new is being written.
pub fn read_topic_from(
    kafka: &KafkaSettings,
    topic: &str,
    from: impl Fn(i32) -> i64,
    mut each: impl FnMut(i32, i64, &[u8]),
) -> Result<u64, KafkaError> {
    let consumer: BaseConsumer<QuietEof> = kafka
        .client_config("couponrush-recovery")
        .set(
            "group.id",
            format!("couponrush-recovery-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // It assigns, never joins; a short session timeout only keeps
        // librdkafka from refusing a user's short max.poll.interval.ms.
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "100")
        .create_with_context(QuietEof)?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut open: std::collections::HashSet<i32> = std::collections::HashSet::new();
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            open.insert(p.id());
            let offset = match from(p.id()) {
                o if o <= 0 => Offset::Beginning,
                o => Offset::Offset(o),
            };
            tpl.add_partition_offset(topic, p.id(), offset)?;
        }
    }
    if open.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl)?;
    let mut read = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let quiet = Duration::from_secs(1);
    let mut last_news = Instant::now();
    loop {
        if Instant::now() > deadline {
            return Err(KafkaError::Canceled);
        }
        if open.is_empty() && last_news.elapsed() >= quiet {
            return Ok(read);
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                read += 1;
                last_news = Instant::now();
                each(m.partition(), m.offset(), m.payload().unwrap_or_default());
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => tracing::warn!(error = %e, topic, "reading the log"),
            None => {}
        }
    }
}

/// The latest definition of every event on the events topic.
pub fn read_events(
    kafka: &KafkaSettings,
    topic: &str,
) -> Result<HashMap<String, EventRecord>, KafkaError> {
    let mut records = Vec::new();
    read_topic(kafka, topic, |bytes| {
        if let Ok(e) = EventRecord::parse(bytes) {
            records.push(e);
        }
    })?;
    Ok(latest_definitions(records))
}

/// The definition of every event that a rebuild restores, from the events
/// topic's records in log order: the **highest generation**, not the last
/// record (a racing `PUT`'s older definition may land after the newer one;
/// see [`crate::store::definition`]). Between two records of one generation
/// (a restatement, or a store that came back behind the log and claimed a
/// generation again), the later one, which is the one the store applied
/// last. Pure.
pub fn latest_definitions(
    records: impl IntoIterator<Item = EventRecord>,
) -> HashMap<String, EventRecord> {
    let mut events: HashMap<String, EventRecord> = HashMap::new();
    for e in records {
        match events.get(&e.event_id) {
            Some(old) if old.generation > e.generation => {}
            _ => {
                events.insert(e.event_id.clone(), e);
            }
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WIRE_VERSION;
    use crate::DecisionResult;

    fn event(id: &str, stock: u32, generation: u64) -> EventRecord {
        EventRecord {
            v: WIRE_VERSION,
            event_id: id.into(),
            stock,
            per_user_limit: 1,
            generation,
            written_at: 0,
            claim_window_us: 0,
            stock_buckets: 1,
        }
    }

    fn outcome(
        event: &str,
        generation: u64,
        id: u128,
        user: &str,
        result: DecisionResult,
        rank: Option<u32>,
        seq: u64,
    ) -> Outcome {
        Outcome {
            v: WIRE_VERSION,
            request_id: Uuid::from_u128(id),
            event_id: event.into(),
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

    #[test]
    fn rebuilds_the_latest_generation_from_first_decisions() {
        use DecisionResult::*;
        let events: HashMap<String, EventRecord> =
            [("e".to_string(), event("e", 3, 2))].into_iter().collect();
        let mut replay = outcome("e", 2, 1, "a", Issued, Some(1), 1);
        replay.replay = true;
        let outcomes = vec![
            outcome("e", 1, 9, "z", Issued, Some(1), 1), // an older generation
            outcome("e", 2, 1, "a", Issued, Some(1), 1),
            outcome("e", 2, 2, "a", LimitReached, None, 2),
            replay,
            outcome("e", 2, 3, "b", Issued, Some(2), 3),
            outcome("e", 2, 4, "c", Duplicate, None, 0),
            outcome("other", 1, 5, "d", Issued, Some(1), 1), // no definition
        ];
        let snaps = rebuild(&events, &outcomes);
        assert_eq!(snaps.len(), 1);
        let s = &snaps[0];
        assert_eq!(s.state.generation, 2);
        assert_eq!(s.state.remaining, 1);
        assert_eq!(s.seq, 3);
        assert_eq!(s.coupons.iter().map(|c| c.rank).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.holders, vec![("a".into(), 1), ("b".into(), 1)]);
        assert_eq!(s.decided.len(), 3, "first decisions only, no duplicate");
        assert!(s.decided.iter().all(|d| d.decision.logged));
    }

    #[test]
    fn a_rebuild_takes_the_highest_generation_not_the_last_record() {
        // A racing PUT pair: generation 3 acknowledged first, the older
        // generation 2 landing after it.
        let mut newer = event("e", 20, 3);
        newer.written_at = 1;
        let mut older = event("e", 10, 2);
        older.written_at = 2;
        let defs = latest_definitions([event("e", 5, 1), newer.clone(), older, event("f", 7, 1)]);
        assert_eq!(defs["e"], newer);
        assert_eq!(defs["f"].stock, 7);
        let outcomes = vec![
            outcome("e", 3, 1, "a", DecisionResult::Issued, Some(1), 1),
            outcome("e", 2, 2, "b", DecisionResult::Issued, Some(1), 1),
        ];
        let snaps = rebuild(&defs, &outcomes);
        let e = snaps.iter().find(|s| s.state.event_id == "e").unwrap();
        assert_eq!(
            (e.state.generation, e.state.stock, e.state.remaining),
            (3, 20, 19),
            "the live generation's outcomes are kept, its stock not sold again"
        );
    }

    #[test]
    fn of_two_records_of_one_generation_the_later_one_is_the_definition() {
        let mut first = event("e", 10, 4);
        first.written_at = 1;
        let mut second = event("e", 30, 4);
        second.written_at = 2;
        let defs = latest_definitions([first, second.clone()]);
        assert_eq!(defs["e"], second);
    }

    #[test]
    fn ranks_lost_with_the_store_are_left_free() {
        use DecisionResult::*;
        let events: HashMap<String, EventRecord> =
            [("e".to_string(), event("e", 10, 1))].into_iter().collect();
        // Rank 2's decision never reached the log (its issuer died before
        // publishing); rank 3's did.
        let outcomes = vec![
            outcome("e", 1, 1, "a", Issued, Some(1), 1),
            outcome("e", 1, 3, "c", Issued, Some(3), 3),
        ];
        let s = &rebuild(&events, &outcomes)[0];
        assert_eq!(s.free_ranks, vec![2]);
        assert_eq!(s.state.remaining, 8);
    }

    #[tokio::test]
    async fn a_slow_recoverer_keeps_its_lock_and_learns_when_it_lost_it() {
        use crate::store::memory::MemoryStore;
        let store: Arc<dyn Store> =
            Arc::new(MemoryStore::needing_recovery(Duration::from_secs(60)));
        let ttl = Duration::from_millis(300);
        assert!(store.try_lock_recovery("slow", ttl).await.unwrap());
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_lock(store.clone(), "slow".into(), ttl, lost.clone()));
        // Three lifetimes later the lock is still its holder's...
        tokio::time::sleep(ttl * 3).await;
        assert!(!store.try_lock_recovery("other", ttl).await.unwrap());
        assert!(!lost.is_cancelled());
        // ...until someone else holds it (here: the holder's store paused
        // past the lifetime, and another process took over).
        store.unlock_recovery("slow").await.unwrap();
        assert!(store.try_lock_recovery("other", ttl * 10).await.unwrap());
        tokio::time::timeout(ttl, lost.cancelled())
            .await
            .expect("the keeper tells the recoverer it lost the lock");
        keeper.await.unwrap();
    }

    #[test]
    fn an_event_without_outcomes_is_restored_full() {
        let events: HashMap<String, EventRecord> =
            [("e".to_string(), event("e", 5, 1))].into_iter().collect();
        let snaps = rebuild(&events, &[]);
        assert_eq!(snaps[0].state.remaining, 5);
        assert!(snaps[0].coupons.is_empty());
    }
}
