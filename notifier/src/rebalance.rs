//! Group membership: the consumer's settings and librdkafka's callbacks,
//! which run on the loop's thread inside `poll`.
//!
//! The guarantee kept on a rebalance: **before partitions are revoked,
//! their deliveries in flight get up to `--drain-timeout` to finish, the
//! rest are abandoned, and what is handled is committed synchronously.** The
//! member that takes them over resumes right after the last handled record
//! and delivers the abandoned ones again (duplicates at the wire, one
//! coupon at the endpoint). Waiting here blocks `poll`, not the deliveries:
//! they run on the tokio runtime.
//!
//! The tansu 0.6 quirks the issuer works around (a fetch resumed past the
//! committed offset, a dead member's partitions left unread) apply to any
//! group consumer of a tansu broker; the notifier uses the issuer's guards
//! ([`couponrush_issuer::broker_quirk`]) as they are, and one of its own
//! ([`crate::broker_quirk`]) for a fetch that stalls in the last batch.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use couponrush_issuer::broker_quirk::{OrphanWatch, ResumeGuard};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::broker_quirk::TailWatch;
use crate::offsets::{CommitCause, Offsets, Tp};
use crate::{Config, Probe};

/// State shared between the loop, the deliveries and librdkafka's callbacks.
#[derive(Debug)]
pub struct Shared {
    /// What is in flight, handled and committed, per owned partition.
    pub offsets: Offsets,
    /// Where newly assigned (or resumed) partitions must resume (a broker
    /// quirk).
    pub resume: ResumeGuard,
    /// Set while the loop holds off reading (too many in flight):
    /// partitions assigned meanwhile are paused too.
    pub paused: AtomicBool,
    /// Partitions left without a live owner (a broker quirk).
    pub orphans: OrphanWatch,
    /// Partitions whose fetch may have stalled mid-batch (a broker quirk).
    pub tail: TailWatch,
    /// Parent of every partition's token: cancelled when the notifier
    /// stops waiting for its deliveries.
    pub abandon: CancellationToken,
    /// How long revoked partitions' deliveries may take to finish.
    pub drain_timeout: Duration,
    /// Live counts.
    pub probe: Probe,
}

/// librdkafka callbacks of the notifier.
pub struct NotifierContext {
    shared: Arc<Shared>,
}

fn partitions(tpl: &TopicPartitionList) -> HashSet<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for NotifierContext {
    fn stats(&self, stats: Statistics) {
        couponrush_core::kafka::record_consumer_lag(&stats, "couponrush_notifier_consumer_lag");
    }
}

impl ConsumerContext for NotifierContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = partitions(tpl);
                let offsets = &self.shared.offsets;
                // At shutdown the deliveries were given their time already
                // (and abandoned): no second wait.
                let drain = if self.shared.abandon.is_cancelled() {
                    Duration::ZERO
                } else {
                    self.shared.drain_timeout
                };
                if !offsets.wait_idle(Some(&revoked), drain) {
                    tracing::info!(
                        drain_timeout = ?self.shared.drain_timeout,
                        "deliveries of revoked partitions still in flight; abandoning them to the next owner"
                    );
                }
                let done = offsets.uncommitted(Some(&revoked));
                offsets.commit(consumer, &done, CommitCause::Revoke);
                let (owned, abandoned) = offsets.revoke(&revoked);
                if abandoned > 0 {
                    metrics::counter!("couponrush_notifier_abandoned_total")
                        .increment(abandoned as u64);
                    self.shared.probe.add_abandoned(abandoned as u64);
                }
                self.shared.resume.on_revoke(&revoked);
                self.shared.tail.forget(&revoked);
                self.shared.orphans.on_revoke();
                self.shared.probe.set_assigned(owned);
                tracing::info!(revoked = revoked.len(), abandoned, "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            metrics::counter!("couponrush_notifier_rebalances_total").increment(1);
            let owned = self
                .shared
                .offsets
                .assign(partitions(tpl), &self.shared.abandon);
            self.shared.probe.set_assigned(owned);
            self.shared.resume.on_assign(consumer, tpl);
            self.shared.tail.on_assign(partitions(tpl));
            self.shared.orphans.on_assign(tpl.count());
            let mut assigned: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            assigned.sort_unstable();
            tracing::info!(partitions = ?assigned, "partitions assigned");
            // librdkafka keeps a partition's pause across a revoke and a new
            // assignment: every assignment states it explicitly.
            if self.shared.paused.load(Ordering::Relaxed) {
                let _ = consumer.pause(tpl);
            } else {
                let _ = consumer.resume(tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_ok() {
            self.shared.offsets.mark_committed(offsets);
        }
    }
}

/// Creates the group consumer: manual commits only, from the earliest
/// record when the group has no committed offset (a new notifier delivers
/// the whole ledger it can still read).
pub fn create_consumer(
    config: &Config,
    probe: Probe,
) -> KafkaResult<(BaseConsumer<NotifierContext>, Arc<Shared>)> {
    let cfg = config.kafka.client_config_with(&config.client_id, |cfg| {
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
            // Prefetch stays small: records wait here, not in memory.
            .set("queued.max.messages.kbytes", "4096")
            .set("statistics.interval.ms", "2000");
    });
    // Its questions on a client of its own: see `OrphanWatch::with_looker`.
    let orphans =
        OrphanWatch::new(&[&config.outcomes_topic], config.session_timeout).with_looker(&cfg)?;
    let shared = Arc::new(Shared {
        offsets: if config.unsafe_commit_on_receipt {
            Offsets::commit_on_receipt()
        } else {
            Offsets::default()
        },
        resume: ResumeGuard::default(),
        paused: AtomicBool::new(false),
        orphans,
        tail: TailWatch::default(),
        abandon: CancellationToken::new(),
        drain_timeout: config.drain_timeout,
        probe,
    });
    let consumer = cfg.create_with_context(NotifierContext {
        shared: shared.clone(),
    })?;
    Ok((consumer, shared))
}
