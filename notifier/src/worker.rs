//! The worker: the consume loop. One thread, one group member; the
//! deliveries themselves run as tasks on the tokio runtime.
//!
//! Each turn: commit what is handled if `--commit-every` has passed, then
//! read one record and hand it on: a final coupon becomes a delivery task
//! (endpoint, then the dead-letter topic if the endpoint never acknowledges
//! it), anything else is handled at once. At most `--max-in-flight`
//! deliveries run; at the limit the loop reads ahead into `carry` (up to
//! [`CARRY`] records) and, once that is full, pauses its partitions, still
//! polling so rebalances are served and the group keeps it; it resumes
//! once the carry has drained to half. Memory is bounded by the carry and
//! librdkafka's prefetch (4 MiB).
//!
//! On shutdown the loop stops reading, gives the deliveries in flight up to
//! `--drain-timeout`, abandons the rest, commits what is handled
//! synchronously and leaves the group.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use couponrush_core::wire::LedgerRecord;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{DeadLetters, Letter};
use crate::notice::{classify, Notice, Verdict};
use crate::offsets::{CommitCause, Ticket};
use crate::rebalance::{NotifierContext, Shared};
use crate::retry::RetryPolicy;
use crate::webhook::{Delivery, Webhook};
use crate::Config;

/// Records read ahead into the carry before reading pauses (ledger records
/// are about 350 bytes: some 3 MiB). Pausing drops librdkafka's prefetch
/// and costs a fetch round trip on resuming, so the carry is large enough
/// to take a whole fetch and pausing happens only when deliveries fall
/// behind for long (an endpoint outage), not at every burst.
const CARRY: usize = 8192;

/// How long a stopping notifier waits for its partitions to be revoked.
const LEAVE_WITHIN: Duration = Duration::from_secs(10);

/// One ledger record as read, with the assignment it was read under.
struct Received {
    topic: String,
    partition: i32,
    offset: i64,
    epoch: u64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// What a delivery task needs, shared by all of them.
struct Outbound {
    webhook: Webhook,
    dead: DeadLetters,
    policy: RetryPolicy,
    shared: Arc<Shared>,
}

/// The consume loop's state.
pub struct Worker {
    consumer: BaseConsumer<NotifierContext>,
    shared: Arc<Shared>,
    outbound: Arc<Outbound>,
    rt: Handle,
    config: Config,
    shutdown: CancellationToken,
    carry: VecDeque<Received>,
}

impl Worker {
    /// A loop over `consumer` delivering through `webhook`.
    pub(crate) fn new(
        consumer: BaseConsumer<NotifierContext>,
        shared: Arc<Shared>,
        webhook: Webhook,
        dead: DeadLetters,
        config: Config,
        shutdown: CancellationToken,
    ) -> Self {
        let outbound = Arc::new(Outbound {
            webhook,
            dead,
            policy: config.retry,
            shared: shared.clone(),
        });
        Self {
            consumer,
            shared,
            outbound,
            rt: Handle::current(),
            config,
            shutdown,
            carry: VecDeque::new(),
        }
    }

    /// Runs until shutdown.
    pub fn run(mut self) -> KafkaResult<()> {
        self.consumer.subscribe(&[&self.config.outcomes_topic])?;
        tracing::info!(group = %self.config.group_id, topic = %self.config.outcomes_topic, webhook = %self.config.webhook, "notifier joined");
        let max = self.config.max_in_flight.max(1);
        let carry_max = CARRY.max(max);
        let mut last_commit = Instant::now();
        while !self.shutdown.is_cancelled() {
            if last_commit.elapsed() >= self.config.commit_every {
                let done = self.shared.offsets.uncommitted(None);
                self.shared
                    .offsets
                    .commit(&self.consumer, &done, CommitCause::Periodic);
                last_commit = Instant::now();
            }
            // Reading pauses while the carry is full and resumes once it
            // has drained to half: pausing drops librdkafka's prefetch, so
            // it is done seldom, not at every delivery.
            if self.carry.len() >= carry_max {
                self.hold_off(true);
            } else if self.carry.len() <= carry_max / 2 {
                self.hold_off(false);
            }
            let in_flight = self.shared.offsets.in_flight();
            metrics::gauge!("couponrush_notifier_in_flight").set(in_flight as f64);
            if in_flight >= max {
                // At the limit: read ahead into the carry (this also serves
                // the group's callbacks), else wait for a delivery to end.
                match self.poll(Duration::ZERO) {
                    Some(r) => self.carry.push_back(r),
                    None => {
                        self.shared
                            .offsets
                            .wait_below(max, Duration::from_millis(20));
                    }
                }
                continue;
            }
            if let Some(r) = self.carry.pop_front() {
                self.handle(r);
                continue;
            }
            // The orphan watch (a tansu quirk) judges others by their
            // commits; a member retrying an endpoint that is down commits
            // nothing either, so it only watches while this one is idle
            // (and so is not in the same trouble).
            if in_flight == 0 {
                self.shared.orphans.watch(&self.consumer);
            } else {
                self.shared.orphans.forget();
            }
            match self.poll(Duration::from_millis(100)) {
                Some(r) => self.handle(r),
                None => self.shared.tail.check(&self.consumer),
            }
        }
        self.stop();
        Ok(())
    }

    /// Pauses (or resumes) every owned partition when the state changes.
    fn hold_off(&self, pause: bool) {
        if self.shared.paused.swap(pause, Ordering::Relaxed) == pause {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if pause {
            let _ = self.consumer.pause(&assignment);
        } else {
            // A resumed fetch may start mid-batch: the quirk guards check it.
            self.shared.resume.on_resume(&self.consumer);
            self.shared.tail.on_resume(&self.consumer);
            let _ = self.consumer.resume(&assignment);
        }
    }

    fn poll(&self, timeout: Duration) -> Option<Received> {
        match self.consumer.poll(timeout)? {
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                metrics::counter!("couponrush_notifier_consumer_errors_total").increment(1);
                None
            }
            Ok(m) => self.admitted(&m),
        }
    }

    /// The record to handle, unless the broker-quirk check skips it or its
    /// partition is not (or no longer) ours.
    fn admitted(&self, m: &BorrowedMessage<'_>) -> Option<Received> {
        self.shared
            .tail
            .seen(&(m.topic().to_string(), m.partition()));
        if !self
            .shared
            .resume
            .admit(&self.consumer, m.topic(), m.partition(), m.offset())
        {
            return None;
        }
        let epoch = self
            .shared
            .offsets
            .epoch(&(m.topic().to_string(), m.partition()))?;
        Some(Received {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            epoch,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        })
    }

    fn handle(&self, r: Received) {
        let tp = (r.topic.clone(), r.partition);
        let Some(ticket) = self.shared.offsets.begin(&tp, r.epoch, r.offset) else {
            return; // revoked since it was read: its next owner reads it again
        };
        let probe = &self.shared.probe;
        probe.add_read();
        let verdict = match LedgerRecord::parse(&r.payload) {
            Ok(record) => classify(&record),
            Err(poison) => Verdict::Unusable(format!("unreadable ledger record: {poison}")),
        };
        match verdict {
            Verdict::Skip(why) => {
                metrics::counter!("couponrush_notifier_skipped_total", "reason" => why.code())
                    .increment(1);
                probe.add_skipped();
                self.shared.offsets.finish(&ticket);
            }
            Verdict::Unusable(detail) => {
                let letter = Letter {
                    reason: "unreadable",
                    detail,
                    attempts: 0,
                    idempotency_key: None,
                    topic: r.topic,
                    partition: r.partition,
                    offset: r.offset,
                    key: r.key,
                    payload: r.payload,
                };
                let out = self.outbound.clone();
                self.rt
                    .spawn(async move { out.dead_letter(letter, ticket).await });
            }
            Verdict::Deliver(notice) => {
                if notice.replay {
                    // The same coupon again: delivered under the same key,
                    // counted, deduplicated by the endpoint.
                    metrics::counter!("couponrush_notifier_replays_total").increment(1);
                    probe.add_replayed();
                }
                let out = self.outbound.clone();
                self.rt
                    .spawn(async move { out.deliver(notice, r, ticket).await });
            }
        }
    }

    /// Stops reading, drains or abandons what is in flight, commits what is
    /// handled, leaves the group.
    fn stop(mut self) {
        self.carry.clear();
        let offsets = &self.shared.offsets;
        if !offsets.wait_idle(None, self.config.drain_timeout) {
            tracing::info!(
                in_flight = offsets.in_flight(),
                "shutdown: abandoning deliveries still in flight; the next notifier delivers them again"
            );
        }
        self.shared.abandon.cancel();
        let done = offsets.uncommitted(None);
        offsets.commit(&self.consumer, &done, CommitCause::Shutdown);
        // Before the drop closes the consumer: see `leave_group` for why.
        couponrush_core::kafka::leave_group(&self.consumer, LEAVE_WITHIN);
        tracing::info!("notifier stopped");
    }
}

impl Outbound {
    /// Delivers one coupon; dead-letters it if the endpoint never takes it.
    async fn deliver(&self, notice: Notice, r: Received, ticket: Ticket) {
        let probe = &self.shared.probe;
        let delivery = self
            .webhook
            .deliver(&notice, &self.policy, &ticket.cancel)
            .await;
        match delivery {
            Delivery::Acknowledged { attempts } => {
                probe.add_attempts(attempts);
                probe.add_delivered();
                metrics::counter!("couponrush_notifier_delivered_total", "state" => notice.state.as_str())
                    .increment(1);
                let lag = couponrush_core::wire::now_micros().saturating_sub(notice.decided_at);
                metrics::histogram!("couponrush_notifier_decision_to_delivery_seconds")
                    .record(lag as f64 / 1e6);
                self.shared.offsets.finish(&ticket);
            }
            Delivery::GaveUp {
                attempts,
                code,
                last,
            } => {
                probe.add_attempts(attempts);
                tracing::warn!(key = %notice.idempotency_key(), attempts, reason = code, last = %last, "the endpoint did not take the coupon; dead-lettering it");
                let letter = Letter {
                    reason: code,
                    detail: format!("last attempt: {last}"),
                    attempts,
                    idempotency_key: Some(notice.idempotency_key()),
                    topic: r.topic,
                    partition: r.partition,
                    offset: r.offset,
                    key: r.key,
                    payload: r.payload,
                };
                self.dead_letter(letter, ticket).await;
            }
            Delivery::Abandoned { attempts } => {
                probe.add_attempts(attempts);
                // Not finished: the offset stays uncommitted.
            }
        }
    }

    /// Writes `letter` to the dead-letter topic; the record is handled once
    /// the broker acknowledged it.
    async fn dead_letter(&self, letter: Letter, ticket: Ticket) {
        if self
            .dead
            .send_until_acknowledged(&letter, &self.policy, &ticket.cancel)
            .await
        {
            metrics::counter!("couponrush_notifier_dead_lettered_total", "reason" => letter.reason)
                .increment(1);
            self.shared.probe.add_dead_lettered();
            self.shared.offsets.finish(&ticket);
        }
    }
}
