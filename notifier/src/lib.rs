//! # couponrush-notifier
//!
//! The after-commit hand-off. Reads the outcomes ledger (`coupon.outcomes`)
//! in a consumer group of its own (`couponrush-notifier`), and delivers
//! every **final** coupon (an `issued` decision without a hold, or a
//! `claimed` hold; see [`notice`]) to an HTTP endpoint, `POST --webhook`,
//! with an `Idempotency-Key` of `{event_id}:{generation}:{request_id}`.
//! The decision is committed before anything here happens (it is on the
//! ledger), and the delivery is retried by this consumer, not by the
//! request that won the coupon: a slow or failing endpoint never holds up a
//! drop.
//!
//! ## Delivery semantics
//! **At-least-once to the endpoint, exactly-once in effect.** A ledger
//! offset is committed only once every record up to it is handled: the
//! endpoint answered 2xx, or the record went to the dead-letter topic and
//! the broker acknowledged it there, or it needed no delivery (skipped).
//! So a crash, a kill or a rebalance at any moment costs deliveries again
//! from the last commit on, never a lost one. The same coupon can therefore
//! reach the endpoint more than once: after a restart, after a rebalance
//! that abandoned deliveries in flight, after an attempt that timed out
//! here but was acted on there, and for every replayed outcome on the
//! ledger (replays are delivered again, under the same key). The endpoint
//! makes that harmless by keeping the first delivery per key and answering
//! 2xx to the rest.
//!
//! **Why commit only after the acknowledgement.** Committing on receipt
//! would mark a coupon done while its delivery is still on its way: a kill
//! then loses it for good. `--unsafe-commit-on-receipt` does exactly that,
//! so the tests can show they catch it.
//!
//! **The catch.** Exactly once in effect holds only while the endpoint
//! remembers keys at least as long as a key can come back: the ledger's
//! retention (30 days by default) for a notifier that starts from scratch,
//! else the time between a delivery and the commit after it plus any
//! downtime. A record dead-lettered is out of this guarantee: it is
//! delivered by whoever redrives the dead-letter topic, under the key its
//! `x-idempotency-key` header carries. Deliveries of one partition run
//! concurrently and may reach the endpoint out of ledger order: each is a
//! different coupon, so order carries no meaning there.
//!
//! # Layout
//! - [`Cli`] → [`Config`] → [`run`]: `coupon-notifier`'s flags, the plain
//!   settings, the one entry point (tests call it in-process).
//! - [`notice`]: which ledger records are final coupons, the body and key.
//! - [`webhook`]: the endpoint: one `POST`, and a delivery with retries.
//! - [`retry`]: attempts and capped exponential backoff with jitter.
//! - [`dead_letter`]: the dead-letter topic and its headers.
//! - [`offsets`]: what is in flight, handled and committed.
//! - [`rebalance`]: group membership; on revoke, drain or abandon, then
//!   commit.
//! - [`worker`]: the consume loop.
//! - [`broker_quirk`]: a workaround for tansu 0.6, whose fetch from the
//!   middle of a partition's last batch answers nothing; the notifier
//!   rewinds.

pub mod broker_quirk;
pub mod dead_letter;
pub mod notice;
pub mod offsets;
pub mod rebalance;
pub mod retry;
pub mod webhook;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use couponrush_core::cli::{parse_duration, parse_ignoring_env, KafkaArgs, LogArgs};
use couponrush_core::kafka::{ensure_topics, partition_counts, KafkaSettings, TopicError};
use couponrush_core::telemetry::MetricsError;
use couponrush_core::topics::{replication_for, ReplicationError, TopicSpec, DLQ_RETENTION};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::rebalance::create_consumer;
use crate::retry::RetryPolicy;
use crate::webhook::{Webhook, WebhookError};
use crate::worker::Worker;

/// Default consumer group: one per downstream, never the issuers'.
pub const GROUP: &str = "couponrush-notifier";

/// Default dead-letter topic.
pub const DLQ_TOPIC: &str = "coupon.notifier.dlq";

/// `coupon-notifier`: delivers every final coupon of the ledger to a webhook.
#[derive(Debug, Clone, Parser)]
#[command(name = "coupon-notifier", version, about)]
pub struct Cli {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: KafkaArgs,
    /// The endpoint: every final coupon is POSTed here as JSON, with an
    /// Idempotency-Key header (http:// only).
    #[arg(long, env = "WEBHOOK_URL")]
    pub webhook: String,
    /// The ledger to read.
    #[arg(long, env = "OUTCOMES_TOPIC", default_value = couponrush_core::topics::OUTCOMES)]
    pub outcomes_topic: String,
    /// Where deliveries the endpoint never took go, with their reason
    /// (created with one partition if missing).
    #[arg(long, env = "NOTIFIER_DLQ_TOPIC", default_value = DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Consumer group: one per downstream endpoint, never the issuers'.
    #[arg(long, env = "NOTIFIER_GROUP", default_value = GROUP)]
    pub group_id: String,
    /// How long one attempt may wait for the endpoint's answer.
    #[arg(long, env = "WEBHOOK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Pause cap before the first retry; it doubles with each retry.
    #[arg(long, env = "RETRY_BASE", default_value = "200ms", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// Longest pause between two attempts.
    #[arg(long, env = "RETRY_MAX", default_value = "30s", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// Attempts per coupon (the first included) before it is dead-lettered.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Most deliveries in flight at once; at the limit, reading pauses.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Commit what is handled this often.
    #[arg(long, env = "COMMIT_EVERY", default_value = "1s", value_parser = parse_duration)]
    pub commit_every: Duration,
    /// On a revoke or at shutdown, how long deliveries in flight may take to
    /// finish before they are abandoned (to be delivered again by the next
    /// reader).
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How long the group waits for a silent member before moving its partitions.
    #[arg(long, env = "SESSION_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub session_timeout: Duration,
    /// Partition assignment strategy: range, roundrobin or cooperative-sticky.
    #[arg(long, env = "ASSIGNMENT_STRATEGY", default_value = "range,roundrobin")]
    pub assignment: String,
    /// Serve Prometheus /metrics on this address (keep it on loopback).
    #[arg(long, visible_alias = "metrics-addr", env = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Client id (defaults to coupon-notifier-<host>-<pid>-<random>).
    #[arg(long, env = "NOTIFIER_ID")]
    pub client_id: Option<String>,
    /// UNSAFE, for tests and the lab: commit each record as soon as it is
    /// read, before the endpoint acknowledged it: a kill loses the coupons
    /// in flight. Refused without --i-know-this-is-unsafe.
    #[arg(long)]
    pub unsafe_commit_on_receipt: bool,
    /// Lets an --unsafe-… switch run.
    #[arg(long)]
    pub i_know_this_is_unsafe: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,
}

impl Cli {
    /// The plain settings these flags describe.
    pub fn config(&self) -> Config {
        Config {
            kafka: self.kafka.settings(),
            webhook: self.webhook.clone(),
            outcomes_topic: self.outcomes_topic.clone(),
            dlq_topic: self.dlq_topic.clone(),
            group_id: self.group_id.clone(),
            client_id: self
                .client_id
                .clone()
                .unwrap_or_else(|| couponrush_core::telemetry::instance_id("coupon-notifier")),
            request_timeout: self.request_timeout,
            retry: RetryPolicy {
                base: self.retry_base,
                max: self.retry_max,
                max_attempts: self.max_attempts,
            },
            max_in_flight: self.max_in_flight,
            commit_every: self.commit_every,
            drain_timeout: self.drain_timeout,
            session_timeout: self.session_timeout,
            assignment: self.assignment.clone(),
            metrics_listen: self.metrics_listen,
            unsafe_commit_on_receipt: self.unsafe_commit_on_receipt,
            i_know_this_is_unsafe: self.i_know_this_is_unsafe,
        }
    }
}

/// Everything a notifier needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Kafka cluster.
    pub kafka: KafkaSettings,
    /// The endpoint's URL.
    pub webhook: String,
    /// The ledger topic.
    pub outcomes_topic: String,
    /// The dead-letter topic.
    pub dlq_topic: String,
    /// Consumer group id.
    pub group_id: String,
    /// Client id of this member.
    pub client_id: String,
    /// One attempt's timeout.
    pub request_timeout: Duration,
    /// Attempts and pauses.
    pub retry: RetryPolicy,
    /// Most deliveries in flight.
    pub max_in_flight: usize,
    /// Between periodic commits.
    pub commit_every: Duration,
    /// Grace for deliveries in flight on revoke and shutdown.
    pub drain_timeout: Duration,
    /// `session.timeout.ms`.
    pub session_timeout: Duration,
    /// `partition.assignment.strategy`.
    pub assignment: String,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// UNSAFE: commit on receipt.
    pub unsafe_commit_on_receipt: bool,
    /// Lets the unsafe switch run.
    pub i_know_this_is_unsafe: bool,
}

impl Config {
    /// Defaults for a broker at `brokers` and an endpoint at `webhook`, for
    /// tests and in-process deployments: the environment is ignored.
    pub fn local(brokers: &str, webhook: &str) -> Self {
        parse_ignoring_env::<Cli>(&[
            "coupon-notifier",
            "--brokers",
            brokers,
            "--webhook",
            webhook,
        ])
        .config()
    }

    fn check(&self) -> Result<(), NotifierError> {
        if self.retry.max_attempts == 0 {
            return Err(NotifierError::Config(
                "--max-attempts must be at least 1".into(),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(NotifierError::Config(
                "--max-in-flight must be at least 1".into(),
            ));
        }
        if self.retry.base > self.retry.max {
            return Err(NotifierError::Config(format!(
                "--retry-base {:?} exceeds --retry-max {:?}; lower the base or raise the max",
                self.retry.base, self.retry.max
            )));
        }
        if self.unsafe_commit_on_receipt && !self.i_know_this_is_unsafe {
            return Err(NotifierError::Unsafe("--unsafe-commit-on-receipt"));
        }
        Ok(())
    }
}

/// A live view of a running notifier (tests, embedded deployments).
#[derive(Debug, Clone, Default)]
pub struct Probe(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    assigned: AtomicUsize,
    read: AtomicU64,
    delivered: AtomicU64,
    replayed: AtomicU64,
    attempts: AtomicU64,
    skipped: AtomicU64,
    dead_lettered: AtomicU64,
    abandoned: AtomicU64,
}

/// What a notifier did, as counted by its [`Probe`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Ledger records read (replays and records read again included).
    pub read: u64,
    /// Deliveries the endpoint acknowledged (duplicates included).
    pub delivered: u64,
    /// Records read that were replays of a final coupon.
    pub replayed: u64,
    /// POSTs made (retries included).
    pub attempts: u64,
    /// Records that needed no delivery.
    pub skipped: u64,
    /// Records written to the dead-letter topic.
    pub dead_lettered: u64,
    /// Deliveries abandoned on a revoke.
    pub abandoned: u64,
}

impl Probe {
    /// Partitions owned right now.
    pub fn assigned(&self) -> usize {
        self.0.assigned.load(Ordering::Relaxed)
    }

    /// The counts so far.
    pub fn totals(&self) -> Totals {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            read: get(&c.read),
            delivered: get(&c.delivered),
            replayed: get(&c.replayed),
            attempts: get(&c.attempts),
            skipped: get(&c.skipped),
            dead_lettered: get(&c.dead_lettered),
            abandoned: get(&c.abandoned),
        }
    }

    fn set_assigned(&self, n: usize) {
        self.0.assigned.store(n, Ordering::Relaxed);
        metrics::gauge!("couponrush_notifier_assigned_partitions").set(n as f64);
    }
    fn add_read(&self) {
        self.0.read.fetch_add(1, Ordering::Relaxed);
    }
    fn add_delivered(&self) {
        self.0.delivered.fetch_add(1, Ordering::Relaxed);
    }
    fn add_replayed(&self) {
        self.0.replayed.fetch_add(1, Ordering::Relaxed);
    }
    fn add_attempts(&self, n: u32) {
        self.0.attempts.fetch_add(u64::from(n), Ordering::Relaxed);
    }
    fn add_skipped(&self) {
        self.0.skipped.fetch_add(1, Ordering::Relaxed);
    }
    fn add_dead_lettered(&self) {
        self.0.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
    fn add_abandoned(&self, n: u64) {
        self.0.abandoned.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why a notifier could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    /// A flag out of range.
    #[error("{0}")]
    Config(String),
    /// An unsafe switch without --i-know-this-is-unsafe.
    #[error(
        "{0} breaks the notifier's delivery guarantee on purpose (a kill loses coupons in flight; \
         it exists to show the tests catch that): add --i-know-this-is-unsafe if you really mean \
         it, or drop {0}"
    )]
    Unsafe(&'static str),
    /// The webhook URL cannot be used.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The dead-letter topic is missing and could not be created.
    #[error("the dead-letter topic: {0}")]
    Topic(#[from] TopicError),
    /// The dead-letter topic's replication cannot be chosen for this cluster.
    #[error("cannot create the dead-letter topic: {0}; create it yourself (one partition)")]
    Replication(#[from] ReplicationError),
    /// Metrics could not be served.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The consume thread died.
    #[error("the consume loop panicked")]
    Panicked,
}

/// Runs one notifier until `shutdown`; returns what it did.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Totals, NotifierError> {
    run_probed(config, shutdown, Probe::default()).await
}

/// [`run`], reporting through `probe` while it runs.
pub async fn run_probed(
    config: Config,
    shutdown: CancellationToken,
    probe: Probe,
) -> Result<Totals, NotifierError> {
    config.check()?;
    if config.unsafe_commit_on_receipt {
        tracing::warn!("UNSAFE: --unsafe-commit-on-receipt: a kill loses the coupons in flight");
    }
    if config.metrics_listen.is_some() {
        couponrush_core::telemetry::install_metrics(config.metrics_listen)?;
    }
    let webhook = Webhook::new(
        &config.webhook,
        config.request_timeout,
        config.max_in_flight,
    )?;
    ensure_dead_letter_topic(&config.kafka, &config.dlq_topic).await?;
    let dead = dead_letter::DeadLetters::new(&config.kafka, &config.client_id, &config.dlq_topic)?;
    let (consumer, shared) = create_consumer(&config, probe.clone())?;
    let worker = Worker::new(consumer, shared, webhook, dead, config, shutdown);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("notifier-consume".into())
        .spawn(move || {
            let _ = tx.send(worker.run());
        })
        .map_err(|_| NotifierError::Panicked)?;
    match rx.await {
        Ok(result) => result?,
        Err(_) => return Err(NotifierError::Panicked),
    }
    Ok(probe.totals())
}

/// Creates the dead-letter topic (one partition) if it is missing, with the
/// replication the cluster allows.
async fn ensure_dead_letter_topic(kafka: &KafkaSettings, topic: &str) -> Result<(), NotifierError> {
    let (k, t) = (kafka.clone(), topic.to_string());
    let found =
        tokio::task::spawn_blocking(move || partition_counts(&k, &[&t], Duration::from_secs(10)))
            .await
            .map_err(|_| NotifierError::Panicked)?;
    match found {
        Ok(_) => return Ok(()),
        Err(TopicError::Missing(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let k = kafka.clone();
    let brokers = tokio::task::spawn_blocking(move || cluster_brokers(&k))
        .await
        .map_err(|_| NotifierError::Panicked)??;
    let replication = replication_for(brokers, None)?;
    let spec = TopicSpec {
        name: topic.to_string(),
        partitions: 1,
        replication: replication.factor,
        configs: vec![
            (
                "retention.ms".into(),
                DLQ_RETENTION.time.as_millis().to_string(),
            ),
            ("cleanup.policy".into(), "delete".into()),
        ],
    };
    let created = ensure_topics(kafka, &[spec], Duration::from_secs(10)).await?;
    if !created.is_empty() {
        tracing::info!(topic, "created the dead-letter topic");
    }
    Ok(())
}

/// Brokers in the cluster, from one metadata request. Blocking.
fn cluster_brokers(kafka: &KafkaSettings) -> Result<usize, TopicError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let admin_err = |source| TopicError::Admin {
        brokers: kafka.brokers.clone(),
        source,
    };
    let client: BaseConsumer = kafka
        .client_config("couponrush-metadata")
        .create()
        .map_err(admin_err)?;
    let md = client
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(admin_err)?;
    Ok(md.brokers().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_work_on_a_laptop() {
        let c = Config::local("127.0.0.1:9092", "http://127.0.0.1:9000/hook");
        assert_eq!(c.group_id, GROUP);
        assert_eq!(c.dlq_topic, DLQ_TOPIC);
        assert_eq!(c.outcomes_topic, couponrush_core::topics::OUTCOMES);
        assert_eq!(c.retry.max_attempts, 8);
        c.check().unwrap();
    }

    #[test]
    fn the_unsafe_arm_is_refused_unless_insisted_on() {
        let mut c = Config::local("b", "http://127.0.0.1:9/");
        c.unsafe_commit_on_receipt = true;
        let e = c.check().unwrap_err();
        assert!(e.to_string().contains("--i-know-this-is-unsafe"), "{e}");
        c.i_know_this_is_unsafe = true;
        c.check().unwrap();
    }

    #[test]
    fn nonsense_limits_are_refused_with_the_flag_to_fix() {
        let mut c = Config::local("b", "http://127.0.0.1:9/");
        c.retry.max_attempts = 0;
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .contains("--max-attempts"));
        let mut c = Config::local("b", "http://127.0.0.1:9/");
        c.max_in_flight = 0;
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .contains("--max-in-flight"));
        let mut c = Config::local("b", "http://127.0.0.1:9/");
        c.retry.base = Duration::from_secs(60);
        assert!(c.check().unwrap_err().to_string().contains("--retry-base"));
    }
}
