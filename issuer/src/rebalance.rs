//! Group membership: the consumer's group settings and librdkafka's
//! callbacks, which run on the loop's thread inside `poll`.
//!
//! The guarantee kept on a rebalance: **before partitions are revoked,
//! everything already done for them is committed synchronously**, so the
//! member that takes them over resumes right after the last decided and
//! published record, and redelivers (as replays) at most what was in flight.
//! On assignment the partitions are counted, paused if the loop is retrying,
//! and their committed offsets handed to the [`broker_quirk`] check. Between
//! batches the loop asks [`Shared::watch_orphans`] whether a partition has
//! been left without a live owner (another broker quirk) and rejoins if so.
//!
//! [`broker_quirk`]: crate::broker_quirk

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;

use crate::broker_quirk::{OrphanWatch, ResumeGuard};
use crate::offsets::{CommitCause, Offsets, Tp};
use crate::{Config, Probe};

/// State shared between the loop and librdkafka's callbacks.
#[derive(Debug)]
pub struct Shared {
    /// What is done and what is committed, per owned partition.
    pub offsets: Offsets,
    /// Where newly assigned partitions must resume (a broker quirk).
    pub resume: ResumeGuard,
    /// Set while retrying: partitions assigned meanwhile are paused too.
    pub paused: AtomicBool,
    /// Partitions left without a live owner (a broker quirk).
    orphans: OrphanWatch,
    probe: Probe,
    /// The requests topic: the probe counts its partitions (those of the
    /// drop; the hold actions' come with them).
    requests: String,
}

impl Shared {
    /// Between batches: rejoins the group if a partition with records to
    /// decide has been left without a live owner, and rewinds a newly
    /// assigned or resumed partition that stays silent (both broker quirks).
    /// Not while retrying: this issuer's own trouble would look like
    /// everyone else's, and its paused partitions are silent. `drained`:
    /// the batch just read emptied librdkafka's queue.
    pub fn watch_orphans<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, drained: bool) {
        if self.paused.load(Ordering::Relaxed) {
            self.orphans.forget();
        } else {
            self.orphans.watch(consumer);
            // A paused partition is silent by design; a running one that
            // is silent from its committed offset may be held mid-batch.
            self.resume.rewind_silent(consumer, drained);
        }
    }

    /// The topics the issuer subscribes to (the requests and the hold
    /// actions), the same list every rejoin subscribes to again.
    pub fn subscription(&self) -> Vec<&str> {
        self.orphans.topics()
    }
}

/// librdkafka callbacks of an issuer.
pub struct IssuerContext {
    shared: Arc<Shared>,
}

impl ClientContext for IssuerContext {
    fn stats(&self, stats: Statistics) {
        couponrush_core::kafka::record_consumer_lag(&stats, "couponrush_issuer_consumer_lag");
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
                let offsets = &self.shared.offsets;
                let done = offsets.uncommitted(Some(&revoked));
                offsets.commit(consumer, &done, CommitCause::Revoke);
                offsets.revoke(&revoked);
                self.shared.resume.on_revoke(&revoked);
                self.shared.orphans.on_revoke();
                self.shared
                    .probe
                    .set_assigned(offsets.owned_of(&self.shared.requests));
                tracing::info!(revoked = revoked.len(), "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            metrics::counter!("couponrush_issuer_rebalances_total").increment(1);
            self.shared.offsets.assign(
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition())),
            );
            self.shared
                .probe
                .set_assigned(self.shared.offsets.owned_of(&self.shared.requests));
            self.shared.resume.on_assign(consumer, tpl);
            self.shared.orphans.on_assign(tpl.count());
            let mut partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            partitions.sort_unstable();
            tracing::info!(?partitions, "partitions assigned");
            // librdkafka keeps a partition's pause across a revoke and a
            // new assignment: one paused during a retry, revoked before the
            // retry ended (so never resumed), would come back paused and
            // never be read again. Every assignment states it explicitly.
            if self.shared.paused.load(Ordering::Relaxed) {
                let _ = consumer.pause(tpl);
            } else {
                let _ = consumer.resume(tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.shared.offsets.mark_committed(offsets),
            Err(e) => {
                metrics::counter!("couponrush_issuer_commit_failures_total").increment(1);
                // Rare outside a rebalance; after a broker restart a run
                // of these is how a group that commits nothing shows.
                tracing::warn!(error = %e, partitions = offsets.count(), "commit failed; those records will be redelivered (as replays) unless a later commit lands");
            }
        }
    }
}

/// Creates the group consumer: manual commits only, from the earliest
/// record when the group has no committed offset.
pub fn create_consumer(
    config: &Config,
    probe: Probe,
) -> KafkaResult<(BaseConsumer<IssuerContext>, Arc<Shared>)> {
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
            .set("queued.max.messages.kbytes", "16384")
            .set("statistics.interval.ms", "2000");
        if let Some(id) = &config.instance_id {
            cfg.set("group.instance.id", id);
        }
    });
    // Its questions on a client of its own: see `OrphanWatch::with_looker`.
    let orphans = OrphanWatch::new(
        &[&config.topics.requests, &config.topics.compensations],
        config.session_timeout,
    )
    .with_looker(&cfg)?;
    let shared = Arc::new(Shared {
        offsets: Offsets::default(),
        resume: ResumeGuard::default(),
        paused: AtomicBool::new(false),
        orphans,
        probe,
        requests: config.topics.requests.clone(),
    });
    let consumer = cfg.create_with_context(IssuerContext {
        shared: shared.clone(),
    })?;
    Ok((consumer, shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_and_every_rejoin_subscribe_to_the_requests_and_the_hold_actions() {
        // Creating the consumer does not connect.
        let config = crate::Config::local("127.0.0.1:9");
        let (_consumer, shared) = create_consumer(&config, crate::Probe::default()).unwrap();
        assert_eq!(
            shared.subscription(),
            [
                config.topics.requests.as_str(),
                config.topics.compensations.as_str()
            ]
        );
    }
}
