//! The consume loop: one thread, one group member, batches decided in
//! partition order.
//!
//! Each turn of the loop: read a batch (up to `batch_size` records, or what
//! arrives within `batch_linger`), decide it in the store (one round trip),
//! publish its outcomes and dead letters and wait for every ack, then commit
//! the batch's offsets (`--commit sync|async`). Nothing is committed that is
//! not decided *and* published.
//!
//! A failing store or broker is retried with backoff while the partitions are
//! paused and the loop keeps polling, so the issuer stays in its group and
//! keeps answering rebalances; a retry re-decides the whole batch, which the
//! store turns into replays of the same decisions.
//!
//! On revoke (a rebalance) the offsets of everything already done for the
//! revoked partitions are committed synchronously before another member can
//! take them. On shutdown the current batch is finished, offsets are committed
//! synchronously, and closing the consumer leaves the group.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use couponrush_core::recovery::Recovery;
use couponrush_core::store::{BatchVerdict, Store};
use couponrush_core::wire::now_micros;
use couponrush_core::DecisionResult;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::batch::{confirmations, next_offsets, Disposition, Plan, Received};
use crate::publish::Publisher;
use crate::{Config, Totals};

type Tp = (String, i32);

/// State shared between the loop and librdkafka's callbacks (which run on
/// the loop's thread, inside `poll`).
#[derive(Default)]
pub struct Shared {
    assigned: Mutex<HashSet<Tp>>,
    /// Per partition, the next offset to commit: all below is done.
    done: Mutex<HashMap<Tp, i64>>,
    /// Per partition, the offset the broker confirmed committed.
    committed: Mutex<HashMap<Tp, i64>>,
    /// Set while retrying: partitions assigned meanwhile are paused too.
    paused: AtomicBool,
    probe: crate::Probe,
    /// Per newly assigned partition, the committed offset its first record
    /// must have (see [`Worker::admit`]).
    resume: Mutex<HashMap<Tp, Resume>>,
}

/// Where a newly assigned partition must resume.
#[derive(Debug, Clone, Copy)]
struct Resume {
    /// The committed offset: the first record expected.
    expect: i64,
    /// How far back the last rewind went (0: none yet).
    rewind: i64,
}

/// First rewind when a broker resumes past the committed offset; doubled
/// on each further skip.
const REWIND: i64 = 1000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Offsets done but not yet confirmed committed (of `only`, if given).
    fn uncommitted(&self, only: Option<&HashSet<Tp>>) -> TopicPartitionList {
        let done = lock(&self.done);
        let committed = lock(&self.committed);
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in done.iter() {
            let confirmed = committed.get(tp).is_some_and(|c| c >= offset);
            if !confirmed && only.is_none_or(|o| o.contains(tp)) {
                let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(*offset));
            }
        }
        tpl
    }

    /// Records offsets the broker confirmed.
    fn confirm(&self, tpl: &TopicPartitionList) {
        let mut committed = lock(&self.committed);
        for e in tpl.elements() {
            if let Offset::Offset(o) = e.offset() {
                let c = committed
                    .entry((e.topic().to_string(), e.partition()))
                    .or_insert(o);
                *c = (*c).max(o);
            }
        }
    }
}

/// librdkafka callbacks of an issuer.
pub struct IssuerContext {
    shared: Arc<Shared>,
}

impl ClientContext for IssuerContext {
    fn stats(&self, stats: Statistics) {
        for topic in stats.topics.values() {
            for p in topic.partitions.values() {
                if p.partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(
                        "couponrush_issuer_consumer_lag",
                        "topic" => topic.topic.clone(),
                        "partition" => p.partition.to_string()
                    )
                    .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for IssuerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked: HashSet<Tp> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let commit = self.shared.uncommitted(Some(&revoked));
                if commit.count() > 0 {
                    match consumer.commit(&commit, CommitMode::Sync) {
                        Ok(()) => {
                            self.shared.confirm(&commit);
                            metrics::counter!("couponrush_issuer_commits_total", "mode" => "revoke")
                                .increment(1)
                        }
                        Err(e) => {
                            metrics::counter!("couponrush_issuer_commit_failures_total")
                                .increment(1);
                            tracing::warn!(error = %e, "commit on revoke failed; the new owner will redeliver (decided as replays)");
                        }
                    }
                }
                let mut assigned = lock(&self.shared.assigned);
                let mut done = lock(&self.shared.done);
                let mut committed = lock(&self.shared.committed);
                let mut resume = lock(&self.shared.resume);
                for tp in &revoked {
                    assigned.remove(tp);
                    done.remove(tp);
                    committed.remove(tp);
                    resume.remove(tp);
                }
                self.shared.probe.set_assigned(assigned.len());
                tracing::info!(revoked = revoked.len(), "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            metrics::counter!("couponrush_issuer_rebalances_total").increment(1);
            let mut assigned = lock(&self.shared.assigned);
            for e in tpl.elements() {
                assigned.insert((e.topic().to_string(), e.partition()));
            }
            self.shared.probe.set_assigned(assigned.len());
            drop(assigned);
            // Remember where each partition must resume, to catch a broker
            // that skips records there.
            if let Ok(committed) =
                consumer.committed_offsets((*tpl).clone(), Duration::from_secs(5))
            {
                let mut resume = lock(&self.shared.resume);
                for e in committed.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        resume.insert(
                            (e.topic().to_string(), e.partition()),
                            Resume {
                                expect: o,
                                rewind: 0,
                            },
                        );
                    }
                }
            }
            let mut partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            partitions.sort_unstable();
            tracing::info!(?partitions, "partitions assigned");
            if self.shared.paused.load(Ordering::Relaxed) {
                let _ = consumer.pause(tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.shared.confirm(offsets),
            Err(e) => {
                metrics::counter!("couponrush_issuer_commit_failures_total").increment(1);
                tracing::debug!(error = %e, "commit failed");
            }
        }
    }
}

/// Creates the group consumer.
pub fn create_consumer(
    config: &Config,
    probe: crate::Probe,
) -> KafkaResult<(BaseConsumer<IssuerContext>, Arc<Shared>)> {
    let shared = Arc::new(Shared {
        probe,
        ..Shared::default()
    });
    let mut cfg = config.kafka.client_config(&config.client_id);
    cfg.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (config.session_timeout.as_millis() / 4)
                .max(100)
                .to_string(),
        )
        .set("partition.assignment.strategy", &config.assignment)
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "2000");
    for (k, v) in &config.kafka.extra {
        cfg.set(k, v);
    }
    let consumer = cfg.create_with_context(IssuerContext {
        shared: shared.clone(),
    })?;
    Ok((consumer, shared))
}

type PublishTask =
    tokio::task::JoinHandle<Result<crate::publish::Published, rdkafka::error::KafkaError>>;

/// A decided batch whose outcomes are on their way to the broker.
pub struct InFlight {
    batch: Vec<Received>,
    plan: Plan,
    dispositions: Vec<Disposition>,
    publish: PublishTask,
    attempt: u32,
}

/// The consume loop's state.
pub struct Worker {
    pub(crate) consumer: BaseConsumer<IssuerContext>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) recovery: Recovery,
    pub(crate) rt: Handle,
    pub(crate) config: Config,
    pub(crate) shutdown: CancellationToken,
    /// Records read while retrying (from partitions assigned mid-retry),
    /// processed first in the next batch. Bounded by librdkafka's prefetch.
    pub(crate) carry: Vec<Received>,
    pub(crate) totals: Totals,
}

impl Worker {
    /// Runs until shutdown; returns what it did.
    pub fn run(mut self) -> KafkaResult<Totals> {
        self.consumer.subscribe(&[&self.config.topics.requests])?;
        tracing::info!(group = %self.config.group_id, topic = %self.config.topics.requests, "issuer joined");
        // Two batches at most are in flight: while one batch's outcomes are on
        // their way to the broker, the next is read and decided, and its
        // outcomes enqueued at once. Batches complete (confirm, commit) in
        // order, so a commit never covers a batch that is not done.
        let mut in_flight: Option<InFlight> = None;
        while !self.shutdown.is_cancelled() {
            let batch = self.collect();
            if batch.is_empty() {
                if let Some(prev) = in_flight.take() {
                    if !self.complete(prev) {
                        break;
                    }
                }
                continue;
            }
            let Some(decided) = self.decide(batch) else {
                break;
            };
            if let Some(prev) = in_flight.replace(decided) {
                if !self.complete(prev) {
                    in_flight = None;
                    break;
                }
            }
        }
        if let Some(last) = in_flight.take() {
            // Finish the batch in hand, unless shutdown came while retrying.
            self.complete(last);
        }
        // Everything done is committed synchronously, then closing the
        // consumer (on drop) leaves the group so partitions move at once.
        let commit = self.shared.uncommitted(None);
        if commit.count() > 0 {
            match self.consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => self.shared.confirm(&commit),
                Err(e) => {
                    tracing::warn!(error = %e, "final commit failed; those records will be redelivered (as replays)")
                }
            }
        }
        if let Err(e) = self.publisher.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "flush at shutdown failed");
        }
        self.consumer.unsubscribe();
        tracing::info!(
            decided = self.totals.decided,
            dead = self.totals.dead,
            "issuer stopped"
        );
        Ok(self.totals)
    }

    fn collect(&mut self) -> Vec<Received> {
        let max = self.config.batch_size;
        let mut batch = std::mem::take(&mut self.carry);
        let mut deadline = (!batch.is_empty()).then(|| Instant::now() + self.config.batch_linger);
        while batch.len() < max {
            let timeout = match deadline {
                None => Duration::from_millis(100),
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            match self.consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    metrics::counter!("couponrush_issuer_consumer_errors_total").increment(1);
                    if deadline.is_none() {
                        break;
                    }
                }
                Some(Ok(m)) => {
                    if !self.admit(m.topic(), m.partition(), m.offset()) {
                        continue;
                    }
                    batch.push(Received {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    });
                    if deadline.is_none() {
                        deadline = Some(Instant::now() + self.config.batch_linger);
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        batch
    }

    /// Whether a record read right after a partition was assigned may be
    /// decided. The first record must sit at the committed offset; records
    /// below it were decided and committed already (skipped). A first record
    /// *beyond* it means the broker skipped records: tansu 0.6.0 does this
    /// when a fetch starts in the middle of a producer batch (it returns the
    /// next batch; `core/tests/read_log.rs`). The partition is then rewound
    /// further and further until the committed offset comes back, so nothing
    /// accepted is ever passed over. Apache Kafka never triggers this.
    fn admit(&self, topic: &str, partition: i32, offset: i64) -> bool {
        let tp = (topic.to_string(), partition);
        let mut resume = lock(&self.shared.resume);
        let Some(r) = resume.get_mut(&tp) else {
            return true;
        };
        if offset < r.expect {
            return false;
        }
        if offset == r.expect || r.rewind >= r.expect {
            if offset > r.expect {
                tracing::error!(
                    partition,
                    expected = r.expect,
                    got = offset,
                    "records below the committed offset are gone from the log even from its start"
                );
            }
            resume.remove(&tp);
            return true;
        }
        r.rewind = if r.rewind == 0 { REWIND } else { r.rewind * 2 };
        let target = (r.expect - r.rewind).max(0);
        metrics::counter!("couponrush_issuer_broker_skips_total").increment(1);
        tracing::warn!(
            partition,
            expected = r.expect,
            got = offset,
            rewind_to = target,
            "the broker resumed past the committed offset; rewinding so no record is passed over"
        );
        drop(resume);
        if let Err(e) = self.consumer.seek(
            topic,
            partition,
            Offset::Offset(target),
            Duration::from_secs(5),
        ) {
            tracing::warn!(error = %e, partition, "rewind failed; retrying on the next record");
        }
        false
    }

    /// Decides `batch` (retrying a failing or recovering store) and enqueues
    /// its outcomes at once. None if shutdown came first.
    fn decide(&mut self, batch: Vec<Received>) -> Option<InFlight> {
        let plan = Plan::new(&batch);
        let mut attempt: u32 = 0;
        let dispositions = self.decide_plan(&plan, &batch, &mut attempt)?;
        let publish = self.enqueue(&batch, &dispositions);
        Some(InFlight {
            batch,
            plan,
            dispositions,
            publish,
            attempt,
        })
    }

    /// One store round trip for the whole batch, retried until it answers.
    fn decide_plan(
        &mut self,
        plan: &Plan,
        batch: &[Received],
        attempt: &mut u32,
    ) -> Option<Vec<Disposition>> {
        loop {
            if *attempt > 0 && self.shutdown.is_cancelled() {
                tracing::info!(
                    "shutdown while retrying; the batch stays uncommitted and will be redelivered"
                );
                return None;
            }
            if plan.batches.is_empty() {
                return Some(plan.resolve(batch, &[]));
            }
            let started = Instant::now();
            match self
                .rt
                .block_on(self.store.decide(&plan.batches, now_micros()))
            {
                Ok(verdicts) => {
                    metrics::histogram!("couponrush_issuer_store_seconds")
                        .record(started.elapsed());
                    if verdicts
                        .iter()
                        .any(|v| matches!(v, BatchVerdict::UnknownEvent))
                        && self.store_lost(attempt)
                    {
                        continue;
                    }
                    return Some(plan.resolve(batch, &verdicts));
                }
                Err(e) => {
                    metrics::counter!("couponrush_issuer_store_errors_total").increment(1);
                    tracing::warn!(error = %e, attempt = *attempt, "store failed; pausing and retrying");
                    self.backoff(attempt);
                }
            }
        }
    }

    /// Enqueues a batch's outcomes and dead letters; the returned task
    /// resolves when the broker acknowledged them all.
    fn enqueue(&self, batch: &[Received], dispositions: &[Disposition]) -> PublishTask {
        let (publisher, batch, dispositions) = (
            self.publisher.clone(),
            batch.to_vec(),
            dispositions.to_vec(),
        );
        self.rt
            .spawn(async move { publisher.publish(&batch, &dispositions).await })
    }

    /// Waits for a batch's outcomes; on failure decides it again (replays:
    /// the same decisions) and republishes until acknowledged. Then marks
    /// the decisions confirmed and commits. False if shutdown came first.
    fn complete(&mut self, mut f: InFlight) -> bool {
        loop {
            let result = self
                .rt
                .block_on(&mut f.publish)
                .unwrap_or(Err(rdkafka::error::KafkaError::Canceled));
            match result {
                Ok(published) => {
                    if !self.confirm(&f.dispositions, &mut f.attempt) {
                        return false;
                    }
                    if f.attempt > 0 {
                        self.set_paused(false);
                        tracing::info!(attempt = f.attempt, "recovered");
                    }
                    self.account(&f.batch, &f.dispositions, published.dead);
                    self.commit(&f.batch);
                    return true;
                }
                Err(e) => {
                    metrics::counter!("couponrush_issuer_publish_errors_total").increment(1);
                    tracing::warn!(error = %e, attempt = f.attempt, "publishing failed; pausing, then deciding again (replays) and republishing");
                    self.backoff(&mut f.attempt);
                    let Some(dispositions) = self.decide_plan(&f.plan, &f.batch, &mut f.attempt)
                    else {
                        return false;
                    };
                    f.publish = self.enqueue(&f.batch, &dispositions);
                    f.dispositions = dispositions;
                }
            }
        }
    }

    /// An event was unknown: a real unknown event (poison) if the store has
    /// its epoch, else the store lost its state and is recovered from the
    /// log first. True when the batch must be decided again.
    fn store_lost(&mut self, attempt: &mut u32) -> bool {
        match self.rt.block_on(self.store.epoch()) {
            Ok(Some(_)) => false,
            Ok(None) => {
                metrics::counter!("couponrush_issuer_store_losses_total").increment(1);
                tracing::warn!(
                    "the store has no epoch: it lost its state; recovering before deciding"
                );
                self.set_paused(true);
                match self
                    .rt
                    .block_on(self.recovery.ensure_ready(Duration::from_secs(3600)))
                {
                    Ok(Some(r)) => tracing::warn!(
                        events = r.events,
                        decisions = r.decisions,
                        "this issuer recovered the store"
                    ),
                    Ok(None) => tracing::info!("the store was recovered by another process"),
                    Err(e) => {
                        tracing::warn!(error = %e, "recovery failed; retrying");
                        self.backoff(attempt);
                    }
                }
                *attempt = (*attempt).max(1);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "store failed; pausing and retrying");
                self.backoff(attempt);
                true
            }
        }
    }

    /// Marks the batch's decisions confirmed (their outcomes are in the log),
    /// retrying a failing store. False if shutdown came first.
    fn confirm(&mut self, dispositions: &[Disposition], attempt: &mut u32) -> bool {
        let confirm = confirmations(dispositions);
        if confirm.is_empty() {
            return true;
        }
        loop {
            match self.rt.block_on(self.store.confirm(&confirm)) {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "confirming decisions failed; retrying");
                    if self.shutdown.is_cancelled() {
                        return false;
                    }
                    self.backoff(attempt);
                }
            }
        }
    }

    fn account(&mut self, batch: &[Received], dispositions: &[Disposition], dead: usize) {
        metrics::counter!("couponrush_issuer_batches_total").increment(1);
        metrics::histogram!("couponrush_issuer_batch_size").record(batch.len() as f64);
        for d in dispositions {
            match d {
                Disposition::Decided(o) => {
                    let result = o.result.as_str();
                    let replay = if o.replay { "true" } else { "false" };
                    metrics::counter!("couponrush_issuer_decisions_total", "result" => result, "replay" => replay).increment(1);
                    self.totals.decided += 1;
                    if o.result == DecisionResult::Issued && !o.replay {
                        self.totals.issued += 1;
                    }
                    if o.replay {
                        self.totals.replays += 1;
                    }
                }
                Disposition::Dead(p) => {
                    metrics::counter!("couponrush_issuer_dlq_total", "reason" => p.code())
                        .increment(1);
                    tracing::warn!(reason = p.code(), detail = %p, "record sent to the DLQ");
                }
            }
        }
        self.totals.dead += dead as u64;
        self.totals.batches += 1;
    }

    /// Pauses every assigned partition and waits, polling so rebalances are
    /// still served. Records that arrive anyway are carried to the next batch.
    fn backoff(&mut self, attempt: &mut u32) {
        self.set_paused(true);
        let wait =
            Duration::from_millis(50 * 2u64.pow((*attempt).min(5))).min(self.config.max_backoff);
        *attempt += 1;
        let until = Instant::now() + wait;
        while Instant::now() < until && !self.shutdown.is_cancelled() {
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(20)) {
                if !self.admit(m.topic(), m.partition(), m.offset()) {
                    continue;
                }
                self.carry.push(Received {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
                if let Ok(a) = self.consumer.assignment() {
                    let _ = self.consumer.pause(&a);
                }
            }
        }
    }

    fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::Relaxed);
        if let Ok(a) = self.consumer.assignment() {
            let _ = if paused {
                self.consumer.pause(&a)
            } else {
                self.consumer.resume(&a)
            };
        }
    }

    fn commit(&mut self, batch: &[Received]) {
        let next = next_offsets(batch);
        let mut tpl = TopicPartitionList::new();
        {
            let assigned = lock(&self.shared.assigned);
            let mut done = lock(&self.shared.done);
            for (tp, offset) in next {
                if !assigned.contains(&tp) {
                    continue; // revoked meanwhile: its new owner redelivers (replays)
                }
                let e = done.entry(tp.clone()).or_insert(offset);
                *e = (*e).max(offset);
                let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(*e));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let mode = self.config.commit;
        match self.consumer.commit(&tpl, mode) {
            Ok(()) => {
                if matches!(mode, CommitMode::Sync) {
                    self.shared.confirm(&tpl);
                }
                let label = if matches!(mode, CommitMode::Sync) {
                    "sync"
                } else {
                    "async"
                };
                metrics::counter!("couponrush_issuer_commits_total", "mode" => label).increment(1);
            }
            Err(e) => {
                metrics::counter!("couponrush_issuer_commit_failures_total").increment(1);
                tracing::warn!(error = %e, "commit failed; the records will be redelivered and decided as replays");
            }
        }
    }
}
