//! The worker: the consume loop itself. One thread, one group member,
//! batches decided in partition order.
//!
//! A batch goes through three stages: read (up to `batch_size` records, or
//! what arrives within `batch_linger`) and parsed; decided in the store (one
//! round trip); its outcomes and dead letters published and every ack
//! awaited, its decisions marked logged in the store, its offsets committed
//! (`--commit sync|async`). One batch is in the store, one is being read,
//! and the batch just decided plus up to `--publish-depth` (4) earlier ones
//! are on their way to the broker (a batch's outcomes are enqueued right
//! after its decision: the recovery fence counts on it), so this thread,
//! the store and the broker work at the same time: while the store decides
//! batch N, the acks of batches N−1, N−2, … arrive and the thread reads and
//! parses batch N+1. A batch's acks and its mark are awaited by a task of
//! its own, so a mark queued in the store behind batch N does not hold up
//! the thread; the thread completes batches in order (the oldest when it is
//! acknowledged, or waiting for it when more than depth + 1 are on their
//! way or nothing new was read). Memory is bounded by (depth + 3) batches.
//!
//! The guarantees, kept here:
//! - **nothing is committed that is not decided *and* published**, so a
//!   crash or a rebalance costs replays, never a lost request; batches
//!   complete (mark logged, commit) in the order they were read;
//! - **the store decides batches in the order they were read**, so each
//!   partition is decided in offset order: a batch's store call is sent only
//!   once the previous batch's call has answered (retries included), so one
//!   call of this issuer is in the store at a time. A batch whose outcomes
//!   failed to publish is decided again after the batches that followed it
//!   (up to depth + 1 of them, once the one in the store answered): its own
//!   earlier decisions come back as replays, so the order holds unless the
//!   store lost them meanwhile;
//! - **an answer held in hand is published only while it is fresh**: a
//!   batch's answer that waited (while the thread completed older batches)
//!   longer than its shelf life, half the margin the recovery fence leaves
//!   over the outcome producer's delivery bound, counted from when its call
//!   was sent, is dropped and the batch decided again, so such a decision
//!   does not reach the log later than a recovery that waited out the fence
//!   expects ([`couponrush_core::recovery`]). The same holds for a store
//!   call the thread itself waits for (a retry, a decision again): an answer
//!   that took longer than the shelf life is decided again after a backoff
//!   (a store slower than that on every call stalls the issuer rather than
//!   publish an answer the fence does not cover).
//!
//! A failing store or broker is retried with backoff while the partitions are
//! paused and the loop keeps polling, so the issuer stays in its group and
//! keeps answering rebalances ([`crate::rebalance`]); a retry re-decides the
//! whole batch, which the store turns into replays of the same decisions.
//!
//! On shutdown the batches in hand are finished, oldest first, offsets are committed
//! synchronously ([`crate::offsets`]), and closing the consumer leaves the
//! group.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use couponrush_core::recovery::{Recovery, RecoveryError};
use couponrush_core::store::{BatchVerdict, Store, StoreError};
use couponrush_core::wire::now_micros;
use couponrush_core::DecisionResult;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::batch::{logged_decisions, next_offsets, Disposition, Plan, Received};
use crate::offsets::CommitCause;
use crate::publish::{Published, Publisher};
use crate::rebalance::{IssuerContext, Shared};
use crate::{Config, Totals};

/// Late answers in a row for one batch before it is said as a warning.
const STALE_WARN_AFTER: u32 = 3;

/// How long a stopping issuer waits for its partitions to be revoked.
const LEAVE_WITHIN: Duration = Duration::from_secs(10);

/// A batch on its way: every record acknowledged by the broker, then the
/// first attempt to mark its decisions logged.
struct Acked {
    published: Published,
    marked: Result<(), StoreError>,
}

type PublishTask = tokio::task::JoinHandle<Result<Acked, KafkaError>>;
type StoreCall = tokio::task::JoinHandle<Result<Vec<BatchVerdict>, StoreError>>;

/// A batch read and parsed, not sent to the store yet.
pub struct Read {
    batch: Vec<Received>,
    plan: Arc<Plan>,
}

/// A batch whose store call has been sent: its answer is awaited by
/// [`Worker::settle`], or earlier by [`Worker::hold_the_store`].
pub struct Deciding {
    batch: Vec<Received>,
    plan: Arc<Plan>,
    /// When the call was sent: an answer older than the worker's
    /// `shelf_life` when it is first looked at for use is not used.
    sent: Instant,
    /// Whether [`Worker::expire`] looked at it already (once only, so the
    /// loop and [`Worker::settle`] never judge the same answer differently).
    aged: bool,
    call: Option<StoreCall>,
    answer: Option<Result<Vec<BatchVerdict>, StoreError>>,
}

impl Deciding {
    /// True when the answer needs no further store call: verdicts, none of
    /// them an unknown event (which [`Worker::settle`] checks against the
    /// store's epoch, and may decide again).
    fn answer_is_final(&self) -> bool {
        matches!(&self.answer, Some(Ok(verdicts))
            if !verdicts.iter().any(|v| matches!(v, BatchVerdict::UnknownEvent)))
    }
}

/// A decided batch whose outcomes are on their way to the broker (shared
/// with the publishing task, not copied for it).
pub struct InFlight {
    batch: Arc<Vec<Received>>,
    plan: Arc<Plan>,
    dispositions: Arc<Vec<Disposition>>,
    publish: PublishTask,
    attempt: u32,
}

/// The consume loop's state.
pub struct Worker {
    pub(crate) consumer: BaseConsumer<IssuerContext>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) recovery: Arc<Recovery>,
    pub(crate) rt: Handle,
    pub(crate) config: Config,
    pub(crate) shutdown: CancellationToken,
    /// Records read while retrying (from partitions assigned mid-retry),
    /// processed first in the next batch. Bounded by librdkafka's prefetch.
    pub(crate) carry: Vec<Received>,
    pub(crate) totals: Totals,
    /// The batch in the store (the middle stage), if any.
    pub(crate) deciding: Option<Deciding>,
    /// How long a store answer may wait before its outcomes are enqueued:
    /// half the margin the recovery fence leaves over the outcome
    /// producer's delivery bound ([`crate::Config::answer_shelf_life`]).
    pub(crate) shelf_life: Duration,
}

impl Worker {
    /// Runs until shutdown; returns what it did.
    pub fn run(mut self) -> KafkaResult<Totals> {
        // Hold actions in the same subscription as the requests: a batch's
        // actions and requests of one event are one store step.
        // The orphan watch's rejoins subscribe to this same list.
        self.consumer.subscribe(&self.shared.subscription())?;
        tracing::info!(group = %self.config.group_id, topic = %self.config.topics.requests, actions = %self.config.topics.compensations, "issuer joined");
        // The three stages (module doc): `self.deciding` is in the store,
        // `publishing` on their way to the broker, oldest first.
        let depth = self.config.publish_depth.max(1);
        let mut publishing: VecDeque<InFlight> = VecDeque::with_capacity(depth + 1);
        'run: while !self.shutdown.is_cancelled() {
            // While a batch is in the store or on its way to the broker, an
            // idle poll does not wait: finishing it would wait for the poll.
            let (batch, drained) = self.collect(self.deciding.is_some() || !publishing.is_empty());
            let read_nothing = batch.is_empty();
            let mut next = (!read_nothing).then(|| self.read(batch));
            let decided = match self.deciding.take() {
                None => None,
                Some(mut d) => {
                    self.answer_of(&mut d);
                    self.expire(&mut d);
                    // Only now, with the previous call answered, the next
                    // is sent: at once when that answer is final (the
                    // store is not called again for it), before its
                    // verdicts are mapped back, so the store waits less.
                    if d.answer_is_final() {
                        self.deciding = next.take().map(|r| self.send(r));
                    }
                    match self.settle(d) {
                        Some(decided) => Some(decided),
                        // Shutdown while retrying: the batch and the one
                        // read after it stay uncommitted and will be
                        // redelivered (not finished at shutdown, even if
                        // sent early: it must not commit past this one).
                        None => {
                            self.deciding = None;
                            break 'run;
                        }
                    }
                }
            };
            if let Some(r) = next {
                self.deciding = Some(self.send(r));
            }
            // Between batches (with one in the store): the broker quirk's
            // check, which may ask the broker a few things.
            self.shared.watch_orphans(&self.consumer, drained);
            publishing.extend(decided);
            // Oldest first: every batch already acknowledged completes; the
            // oldest is waited for when more than `publish_depth` are on
            // their way, or when nothing new was read (nothing else to do).
            let mut wait = read_nothing;
            while let Some(oldest) = publishing.front() {
                let must = wait || publishing.len() > depth;
                if !must && !oldest.publish.is_finished() {
                    break;
                }
                wait = false;
                let oldest = publishing.pop_front().expect("looked at above");
                if !self.complete(oldest) {
                    // Shutdown while retrying: nothing after it completes.
                    self.deciding = None;
                    publishing.clear();
                    break 'run;
                }
            }
        }
        // Finish the batches in hand, oldest first, unless shutdown came
        // while retrying one of them.
        let mut finished = true;
        while let Some(f) = publishing.pop_front() {
            if !self.complete(f) {
                finished = false;
                break;
            }
        }
        if let Some(d) = self.deciding.take().filter(|_| finished) {
            if let Some(last) = self.settle(d) {
                self.complete(last);
            }
        }
        // Everything done is committed synchronously, then the member
        // leaves the group (so partitions move at once) before the drop
        // closes the consumer: see `leave_group` for why in that order.
        let done = self.shared.offsets.uncommitted(None);
        self.shared
            .offsets
            .commit(&self.consumer, &done, CommitCause::Shutdown);
        if let Err(e) = self.publisher.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "flush at shutdown failed");
        }
        couponrush_core::kafka::leave_group(&self.consumer, LEAVE_WITHIN);
        tracing::info!(
            decided = self.totals.decided,
            dead = self.totals.dead,
            "issuer stopped"
        );
        Ok(self.totals)
    }

    /// Reads a batch. With `quick`, returns at once when nothing is there.
    /// Also says whether it stopped on an empty queue (not on a full batch
    /// or the linger).
    fn collect(&mut self, quick: bool) -> (Vec<Received>, bool) {
        let max = self.config.batch_size;
        let idle = if quick {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        let mut batch = std::mem::take(&mut self.carry);
        let mut deadline = (!batch.is_empty()).then(|| Instant::now() + self.config.batch_linger);
        let mut drained = false;
        while batch.len() < max {
            // What is already fetched is taken without reading the clock;
            // only an empty queue waits (for the linger left, or idle).
            let polled = match self.consumer.poll(Duration::ZERO) {
                Some(m) => Some(m),
                None => {
                    let timeout = match deadline {
                        None => idle,
                        Some(d) => d.saturating_duration_since(Instant::now()),
                    };
                    if timeout.is_zero() {
                        None
                    } else {
                        self.consumer.poll(timeout)
                    }
                }
            };
            match polled {
                None => {
                    drained = true;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    metrics::counter!("couponrush_issuer_consumer_errors_total").increment(1);
                    if deadline.is_none() {
                        break;
                    }
                }
                Some(Ok(m)) => {
                    let Some(record) = self.admitted(&m) else {
                        continue;
                    };
                    batch.push(record);
                    if deadline.is_none() {
                        deadline = Some(Instant::now() + self.config.batch_linger);
                    }
                }
            }
            // While records keep coming, the linger is checked every 64.
            if batch.len() % 64 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        (batch, drained)
    }

    /// The record to decide, unless the broker-quirk check skips it (see
    /// [`crate::broker_quirk`]).
    fn admitted(&self, m: &BorrowedMessage<'_>) -> Option<Received> {
        self.shared
            .resume
            .admit(&self.consumer, m.topic(), m.partition(), m.offset())
            .then(|| Received {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            })
    }

    /// Parses a batch into its store calls.
    fn read(&self, batch: Vec<Received>) -> Read {
        self.config.arms.simulate_work(batch.len());
        let plan = Plan::with_arms(&batch, &self.config.arms, &self.config.topics.compensations);
        Read {
            batch,
            plan: Arc::new(plan),
        }
    }

    /// Sends a batch's store call (one round trip for the whole batch).
    fn send(&self, read: Read) -> Deciding {
        let (store, plan) = (self.store.clone(), read.plan.clone());
        let call = self.rt.spawn(async move {
            if plan.batches.is_empty() {
                return Ok(Vec::new());
            }
            let started = Instant::now();
            let verdicts = store.decide(&plan.batches, now_micros()).await;
            if verdicts.is_ok() {
                metrics::histogram!("couponrush_issuer_store_seconds").record(started.elapsed());
            }
            verdicts
        });
        Deciding {
            batch: read.batch,
            plan: read.plan,
            sent: Instant::now(),
            aged: false,
            call: Some(call),
            answer: None,
        }
    }

    /// Waits for the answer of the batch in the store, if any, and keeps it
    /// for [`Worker::settle`]: a batch decided again (its outcomes failed to
    /// publish) then never runs in the store beside it.
    fn hold_the_store(&mut self) {
        if let Some(mut d) = self.deciding.take() {
            self.answer_of(&mut d);
            self.deciding = Some(d);
        }
    }

    /// Drops an answer past its shelf life, the first time it is looked at
    /// for use. The recovery fence counts on a decision's outcomes being
    /// enqueued right after it was made. An answer that waited (the thread
    /// was completing an older batch through retries, the broker or the
    /// store failing) may have been made against a store that has been lost
    /// and rebuilt from the log since, without these decisions: published,
    /// they would contradict it (a rank issued twice). Such a batch is
    /// decided again (replays, or new decisions of the rebuilt store), and
    /// the next batch is not sent before it.
    fn expire(&self, d: &mut Deciding) {
        // Only verdicts are judged (an error is retried anyway, with its
        // backoff), and each answer once.
        if d.aged || !matches!(d.answer, Some(Ok(_))) {
            return;
        }
        d.aged = true;
        let held = d.sent.elapsed();
        if held > self.shelf_life {
            d.answer = None;
            self.stale(held, 0);
        }
    }

    /// True, after the backoff (the store is slow), when the thread's own
    /// call sent at `started` has outlived its shelf life: its answer is as
    /// old as one held that long (see `expire`) and the batch is decided
    /// again. An answer passed in (`started` None) was judged by `expire`.
    fn came_late(&mut self, started: Option<Instant>, attempt: &mut u32) -> bool {
        let Some(held) = started.map(|t| t.elapsed()) else {
            return false;
        };
        if held <= self.shelf_life {
            return false;
        }
        self.stale(held, *attempt);
        self.backoff(attempt);
        true
    }

    /// Counts and logs an answer past its shelf life (`held` since its call
    /// was sent), on the batch's `attempt`. Late again and again, the store
    /// is slower than the shelf life: said as a warning, with what to do.
    fn stale(&self, held: Duration, attempt: u32) {
        metrics::counter!("couponrush_issuer_stale_answers_total").increment(1);
        if attempt >= STALE_WARN_AFTER {
            tracing::warn!(
                ?held,
                shelf_life = ?self.shelf_life,
                attempt,
                "the store answers slower than the shelf life, so the batch is decided again until an \
                 answer comes in time; raise --recovery-fence (the shelf life is half its margin over \
                 the outcome producer's delivery bound) or lower --batch-size"
            );
        } else {
            tracing::info!(
                ?held,
                shelf_life = ?self.shelf_life,
                "a store answer came past its shelf life; deciding the batch again"
            );
        }
    }

    fn answer_of(&self, d: &mut Deciding) {
        if let Some(call) = d.call.take() {
            d.answer = Some(self.rt.block_on(call).unwrap_or_else(|e| {
                Err(StoreError::Unavailable(format!(
                    "the store call did not finish ({e}); retrying"
                )))
            }));
        }
    }

    /// Waits for a batch's store call (retrying a failing or recovering
    /// store) and enqueues its outcomes at once. None if shutdown came first.
    fn settle(&mut self, deciding: Deciding) -> Option<InFlight> {
        let mut deciding = deciding;
        self.answer_of(&mut deciding);
        self.expire(&mut deciding);
        let Deciding {
            batch,
            plan,
            answer,
            ..
        } = deciding;
        // An event unknown to the store is judged (poison, or a store that
        // lost its state) by asking the store's epoch right after a call
        // of its own: this answer may be old (it waited while the previous
        // batch completed, perhaps through retries, and the store may have
        // been rebuilt since), so such a batch is decided again first.
        let answer = answer.filter(|a| {
            !a.as_ref().is_ok_and(|verdicts| {
                verdicts
                    .iter()
                    .any(|v| matches!(v, BatchVerdict::UnknownEvent))
            })
        });
        let mut attempt: u32 = 0;
        let dispositions = Arc::new(self.decide_plan(&plan, &batch, &mut attempt, answer)?);
        let batch = Arc::new(batch);
        let publish = self.enqueue(&batch, &dispositions);
        Some(InFlight {
            batch,
            plan,
            dispositions,
            publish,
            attempt,
        })
    }

    /// The store's verdicts for the whole batch: `answer` if it is one, else
    /// one store round trip, retried until it answers.
    fn decide_plan(
        &mut self,
        plan: &Plan,
        batch: &[Received],
        attempt: &mut u32,
        mut answer: Option<Result<Vec<BatchVerdict>, StoreError>>,
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
            // An answer passed in was judged by `expire`; one of the
            // thread's own calls is judged by `came_late`.
            let (result, started) = match answer.take() {
                Some(answer) => (answer, None),
                None => {
                    let started = Instant::now();
                    let result = self
                        .rt
                        .block_on(self.store.decide(&plan.batches, now_micros()));
                    if result.is_ok() {
                        metrics::histogram!("couponrush_issuer_store_seconds")
                            .record(started.elapsed());
                    }
                    (result, Some(started))
                }
            };
            if result.is_ok() && self.came_late(started, attempt) {
                continue;
            }
            match result {
                Ok(verdicts) => {
                    if verdicts
                        .iter()
                        .any(|v| matches!(v, BatchVerdict::UnknownEvent))
                    {
                        if self.store_lost(attempt) {
                            continue;
                        }
                        // Judged poison after one more store round trip:
                        // the other verdicts must still be fresh.
                        if self.came_late(started, attempt) {
                            continue;
                        }
                    }
                    return Some(plan.resolve(batch, &verdicts));
                }
                Err(StoreError::Lost(why)) => {
                    tracing::error!(%why, "the store is being rebuilt from the log (it came back behind it, or is being set up); nothing decided");
                    self.store_lost(attempt);
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
    /// resolves when the broker acknowledged them all and, after that, a
    /// first attempt to mark its decisions logged answered (in the task, so
    /// the mark, queued in the store behind the batch being decided, does
    /// not hold up this thread; [`Worker::complete`] retries a failed one).
    fn enqueue(
        &self,
        batch: &Arc<Vec<Received>>,
        dispositions: &Arc<Vec<Disposition>>,
    ) -> PublishTask {
        let (publisher, store, batch, dispositions) = (
            self.publisher.clone(),
            self.store.clone(),
            batch.clone(),
            dispositions.clone(),
        );
        self.rt.spawn(async move {
            let published = publisher.publish(&batch, &dispositions).await?;
            let logged = logged_decisions(&dispositions);
            let marked = if logged.is_empty() {
                Ok(())
            } else {
                store.mark_logged(&logged).await
            };
            Ok(Acked { published, marked })
        })
    }

    /// Waits for a batch's outcomes and its task's mark of them as logged;
    /// on a publish failure decides it again (replays: the same decisions)
    /// and republishes until acknowledged; a failed mark is made again.
    /// Then commits. False if shutdown came first.
    fn complete(&mut self, mut f: InFlight) -> bool {
        loop {
            let result = self
                .rt
                .block_on(&mut f.publish)
                .unwrap_or(Err(KafkaError::Canceled));
            match result {
                Ok(Acked { published, marked }) => {
                    // A first mark that failed is made again here, with
                    // the store's retries (the mark is idempotent).
                    if let Err(e) = marked {
                        tracing::warn!(error = %e, "marking decisions logged failed; retrying");
                        if !self.mark_logged(&f.dispositions, &mut f.attempt) {
                            return false;
                        }
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
                    self.hold_the_store();
                    self.backoff(&mut f.attempt);
                    let Some(dispositions) =
                        self.decide_plan(&f.plan, &f.batch, &mut f.attempt, None)
                    else {
                        return false;
                    };
                    let dispositions = Arc::new(dispositions);
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
                match self.recover_polling() {
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

    /// Makes the store ready (recovering it, or waiting for whoever does)
    /// while polling the paused consumer: a recovery may take longer than
    /// `max.poll.interval.ms`, and a member that stops polling that long is
    /// put out of its group, its partitions moved mid-recovery.
    fn recover_polling(
        &mut self,
    ) -> Result<Option<couponrush_core::recovery::Recovered>, RecoveryError> {
        let recovery = self.recovery.clone();
        let task = self
            .rt
            .spawn(async move { recovery.ensure_ready(Duration::from_secs(3600)).await });
        while !task.is_finished() {
            if self.shutdown.is_cancelled() {
                task.abort();
                return Err(RecoveryError::Timeout(Duration::ZERO));
            }
            self.poll_paused(Duration::from_millis(100));
        }
        self.rt
            .block_on(task)
            .unwrap_or(Err(RecoveryError::Timeout(Duration::ZERO)))
    }

    /// One poll of the paused consumer: keeps the member in its group. A
    /// record from a partition assigned meanwhile (not paused yet) is
    /// carried to the next batch, and that partition paused too.
    fn poll_paused(&mut self, timeout: Duration) {
        if let Some(Ok(m)) = self.consumer.poll(timeout) {
            let Some(record) = self.admitted(&m) else {
                return;
            };
            self.carry.push(record);
            if let Ok(a) = self.consumer.assignment() {
                let _ = self.consumer.pause(&a);
            }
        }
    }

    /// Marks the batch's decisions logged in the store (their outcomes are
    /// in the log, so the status route may show them), retrying a failing
    /// store. False if shutdown came first.
    fn mark_logged(&mut self, dispositions: &[Disposition], attempt: &mut u32) -> bool {
        let logged = logged_decisions(dispositions);
        if logged.is_empty() {
            return true;
        }
        loop {
            match self.rt.block_on(self.store.mark_logged(&logged)) {
                Ok(()) => return true,
                // The rebuild restores these decisions as logged (their
                // outcomes are acknowledged, so in the log it reads); the
                // mark is then repeated, harmlessly.
                Err(StoreError::Lost(why)) => {
                    tracing::error!(%why, "the store came back behind the log while marking decisions logged");
                    if self.shutdown.is_cancelled() {
                        return false;
                    }
                    self.store_lost(attempt);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "marking decisions logged failed; retrying");
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
        // Counted per batch, then one increment per label set: a labelled
        // counter looked up per record costs more than the record's parse.
        let mut decisions: Vec<((&'static str, bool), u64)> = Vec::new();
        let mut hold_ends: Vec<((&'static str, bool), u64)> = Vec::new();
        let bump = |counts: &mut Vec<((&'static str, bool), u64)>, key| match counts
            .iter_mut()
            .find(|(k, _)| *k == key)
        {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        };
        for d in dispositions {
            match d {
                Disposition::Decided(o) => {
                    bump(&mut decisions, (o.result.as_str(), o.replay));
                    self.totals.decided += 1;
                    if o.result == DecisionResult::Issued && !o.replay {
                        self.totals.issued += 1;
                    }
                    if o.replay {
                        self.totals.replays += 1;
                    }
                }
                Disposition::Hold(h) => {
                    bump(&mut hold_ends, (h.state.as_str(), h.replay));
                    if !h.replay {
                        self.totals.hold_ends += 1;
                    }
                }
                Disposition::Nothing => {
                    metrics::counter!("couponrush_issuer_hold_actions_ignored_total").increment(1);
                    self.totals.actions_ignored += 1;
                }
                Disposition::Dead(p) => {
                    metrics::counter!("couponrush_issuer_dlq_total", "reason" => p.code())
                        .increment(1);
                    tracing::warn!(reason = p.code(), detail = %p, "record sent to the DLQ");
                }
            }
        }
        let flag = |replay: bool| if replay { "true" } else { "false" };
        for ((result, replay), n) in decisions {
            metrics::counter!("couponrush_issuer_decisions_total", "result" => result, "replay" => flag(replay)).increment(n);
        }
        for ((state, replay), n) in hold_ends {
            metrics::counter!("couponrush_issuer_hold_ends_total", "state" => state, "replay" => flag(replay)).increment(n);
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
            self.poll_paused(Duration::from_millis(20));
        }
    }

    fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::Relaxed);
        if let Ok(a) = self.consumer.assignment() {
            if paused {
                let _ = self.consumer.pause(&a);
            } else {
                self.shared.resume.on_resume(&self.consumer);
                let _ = self.consumer.resume(&a);
            }
        }
    }

    /// Commits a completed batch's offsets (`--commit sync|async`).
    fn commit(&mut self, batch: &[Received]) {
        let done = self.shared.offsets.finish(next_offsets(batch));
        self.shared.offsets.commit(
            &self.consumer,
            &done,
            CommitCause::Batch(self.config.commit),
        );
    }
}
