//! # couponrush-issuer
//!
//! Reads `coupon.requests` as a member of a consumer group, decides each
//! request in the store, publishes the decision to `coupon.outcomes` (poison to
//! the DLQ) and commits offsets by hand. Scale out by running more issuers:
//! Kafka gives each partition to exactly one member of the group.
//!
//! ## Delivery semantics
//! **At-least-once from Kafka, exactly-once in effect.** Kafka may deliver a
//! request more than once: after a crash (offsets of decided records not yet
//! committed), after a rebalance (a partition moves before its last commit),
//! or when a client retried with the same `Idempotency-Key`. Every delivery is
//! decided by the store's script, which dedups by request id: the first
//! delivery decides, every later one gets the *same* decision back
//! (`replay: true`) and changes nothing. So a redelivery can never issue a
//! second coupon or take a second unit of stock.
//!
//! **Why an offset is committed only after its effect is durable.** The
//! order per batch is decide → publish and await every broker ack → commit.
//! Committing earlier (auto-commit) could skip a record whose decision never
//! reached the store or whose outcome never reached the log: a request
//! accepted with `202` would be lost. Committing later only costs replays.
//!
//! **The catch.** Exactly-once holds while the dedup record exists: the
//! store's dedup retention must cover the requests topic's retention.
//!
//! # Layout
//! - [`Cli`] → [`Config`] → [`run_issuer`] (any [`Store`]) or [`run`] (Redis,
//!   metrics: what `coupon-issuer` does).
//! - [`worker`]: the consume loop: collect, decide, publish, mark logged,
//!   commit; retries with backoff while staying in the group.
//! - [`batch`]: parsing and grouping a batch, mapping verdicts back (pure).
//! - [`publish`]: outcomes and dead letters, acknowledged.
//! - [`offsets`]: what is done and may be committed, and the commit itself.
//! - [`rebalance`]: group membership; on revoke, a synchronous commit of
//!   what is done.
//! - [`experiment`]: the lab's switches: simulated per-record work, and the
//!   unsafe arms (`--unsafe-…`, refused without `--i-know-this-is-unsafe`).
//! - [`broker_quirk`]: a workaround for tansu 0.6, which can resume a fetch
//!   past the committed offset; the issuer rewinds.
//! - [`sweep`]: the expiry sweep: due holds become `expire` actions on the
//!   compensations topic.
//!
//! ## Holds
//! The issuers consume `coupon.compensations` (claim, cancel, expire) in the
//! same group subscription as the requests, and a batch's actions of an
//! event go to the store in the same script call as its requests, actions
//! first ([`batch`]). A hold end is published to `coupon.outcomes` as a
//! [`couponrush_core::wire::HoldOutcome`] with the same discipline as a
//! decision: decide → publish and await every ack → mark logged → commit
//! (the compensations topic's offsets too), so an action is never committed
//! before its end is in the log; a redelivered action restates the end.

pub mod batch;
pub mod broker_quirk;
pub mod experiment;
pub mod offsets;
pub mod publish;
pub mod rebalance;
pub mod sweep;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use couponrush_core::checkpoint::Checkpointer;
use couponrush_core::cli::{
    parse_duration, parse_ignoring_env, KafkaArgs, LogArgs, StoreArgs, TopicArgs,
};
use couponrush_core::kafka::{DeliveryBound, KafkaSettings, UnboundedDelivery};
use couponrush_core::recovery::Recovery;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{Store, StoreError};
use couponrush_core::telemetry::MetricsError;
use couponrush_core::Topics;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::CommitMode;
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::experiment::{Arms, UnsafeRefused};
use crate::publish::Publisher;
use crate::rebalance::create_consumer;
use crate::worker::Worker;

/// How offsets are committed after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CommitArg {
    /// Wait for the broker to store the offsets (slower, exact).
    Sync,
    /// Send and go on; a failed commit only means replays after a crash.
    Async,
}

/// `coupon-issuer`: decides coupon requests, one consumer-group member.
#[derive(Debug, Clone, Parser)]
#[command(name = "coupon-issuer", version, about)]
pub struct Cli {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub store: StoreArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub topics: TopicArgs,
    /// Consumer group; every issuer of one deployment uses the same.
    #[arg(long, env = "ISSUER_GROUP", default_value = "coupon-issuer")]
    pub group_id: String,
    /// Most records decided per batch (one store round trip per batch).
    #[arg(long, env = "BATCH_SIZE", default_value_t = 2000)]
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first record arrived.
    #[arg(long, env = "BATCH_LINGER", default_value = "5ms", value_parser = parse_duration)]
    pub batch_linger: Duration,
    /// How many earlier batches may still await the broker's acks when a
    /// batch has just been decided (so up to this + 1 at once), while the
    /// next batches are read and decided; a batch's offsets are still
    /// committed only after its acks, in order. More overlaps a slow
    /// broker's acks; each holds one batch in memory. 1 is the pipeline of
    /// earlier versions.
    #[arg(long, env = "PUBLISH_DEPTH", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publish_depth: u16,
    /// Offset commit after each batch: sync or async (revoke and shutdown always commit sync).
    #[arg(long, env = "COMMIT_MODE", value_enum, default_value = "sync")]
    pub commit: CommitArg,
    /// Partition assignment strategy: range, roundrobin or cooperative-sticky.
    #[arg(long, env = "ASSIGNMENT_STRATEGY", default_value = "range,roundrobin")]
    pub assignment: String,
    /// How long the group waits for a silent member before moving its partitions.
    #[arg(long, env = "SESSION_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub session_timeout: Duration,
    /// Longest pause between retries of a failing store or broker.
    #[arg(long, env = "MAX_BACKOFF", default_value = "2s", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// How long an outcome may take to reach the log: librdkafka's timeouts
    /// are derived from it, so an outcome not acknowledged by then never
    /// lands, and the batch is decided again (as replays).
    #[arg(long, env = "PUBLISH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub publish_timeout: Duration,
    /// When the store lost its state: wait this long for in-flight outcomes
    /// before rebuilding it from the log. Must exceed --publish-timeout, and
    /// the timeouts --kafka-opt sets, by 0.5s or more (checked at start-up):
    /// half that margin is how long a store answer may wait to be published.
    #[arg(long, env = "RECOVERY_FENCE", default_value = "15s", value_parser = parse_duration)]
    pub recovery_fence: Duration,
    /// Sweep for holds whose claim window passed this often (0s: never),
    /// producing an expire action for each to the compensations topic.
    #[arg(long, env = "SWEEP_EVERY", default_value = "500ms", value_parser = parse_duration)]
    pub sweep_every: Duration,
    /// Checkpoint the ledger this often (0s: never): a store rebuild then
    /// reads the latest checkpoint and the outcomes after it, instead of
    /// the whole ledger, and survives the outcomes' retention.
    #[arg(long, env = "CHECKPOINT_EVERY", default_value = "60s", value_parser = parse_duration)]
    pub checkpoint_every: Duration,
    /// Serve Prometheus /metrics on this address.
    #[arg(long, env = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Client id (defaults to coupon-issuer-<host>-<pid>-<random>).
    #[arg(long, env = "ISSUER_ID")]
    pub client_id: Option<String>,
    /// Static group membership (group.instance.id), unique per issuer: an
    /// issuer restarted with the same id gets its predecessor's partitions
    /// back. A stopped static member does not leave the group: its partitions
    /// wait for it up to the session timeout. Not with tansu 0.6, whose
    /// coordinator never settles a group of static members.
    #[arg(long, env = "ISSUER_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Simulated processing cost per record (e.g. 200us), slept before each
    /// batch is decided: for experiments where the issuer, not the api, is
    /// the bottleneck (docs/LAB.md).
    #[arg(long, env = "WORK_PER_RECORD", default_value = "0s", value_parser = parse_duration)]
    pub work_per_record: Duration,
    /// UNSAFE, for the lab's experiments: decide every delivery under a new
    /// request id, so redeliveries and client retries are issued again.
    /// Refused without --i-know-this-is-unsafe. No environment variable, on
    /// purpose: it must be asked for on the command line.
    #[arg(long)]
    pub unsafe_no_dedup: bool,
    /// UNSAFE, for the lab's experiments: auto-commit, at this interval, the
    /// offsets stored when records are polled, instead of committing decided
    /// batches by hand: a crash loses requests. Refused without
    /// --i-know-this-is-unsafe.
    #[arg(long, value_parser = parse_duration, value_name = "INTERVAL")]
    pub unsafe_auto_commit: Option<Duration>,
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
            topics: self.topics.topics(),
            group_id: self.group_id.clone(),
            instance_id: self.instance_id.clone(),
            client_id: self
                .client_id
                .clone()
                .unwrap_or_else(|| couponrush_core::telemetry::instance_id("coupon-issuer")),
            batch_size: self.batch_size.max(1),
            batch_linger: self.batch_linger,
            publish_depth: usize::from(self.publish_depth),
            commit: match self.commit {
                CommitArg::Sync => CommitMode::Sync,
                CommitArg::Async => CommitMode::Async,
            },
            assignment: self.assignment.clone(),
            session_timeout: self.session_timeout,
            max_backoff: self.max_backoff,
            publish_timeout: self.publish_timeout,
            recovery_fence: self.recovery_fence,
            checkpoint_every: self.checkpoint_every,
            sweep_every: self.sweep_every,
            dedup_retention: self.store.dedup_retention,
            arms: self.arms(),
        }
    }

    /// The experiment switches these flags ask for (see [`experiment`]).
    pub fn arms(&self) -> Arms {
        Arms {
            work_per_record: self.work_per_record,
            unsafe_no_dedup: self.unsafe_no_dedup,
            unsafe_auto_commit: self.unsafe_auto_commit,
        }
    }
}

/// Everything an issuer needs besides its store.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Kafka cluster.
    pub kafka: KafkaSettings,
    /// Topic names.
    pub topics: Topics,
    /// Consumer group id.
    pub group_id: String,
    /// `group.instance.id` (static membership), if any.
    pub instance_id: Option<String>,
    /// Client id of this member.
    pub client_id: String,
    /// Most records per batch.
    pub batch_size: usize,
    /// Batch fill wait.
    pub batch_linger: Duration,
    /// Earlier batches that may still await their acks when a batch has
    /// just been decided (at least 1; see `--publish-depth`).
    pub publish_depth: usize,
    /// Commit mode after each batch.
    pub commit: CommitMode,
    /// `partition.assignment.strategy`.
    pub assignment: String,
    /// `session.timeout.ms`.
    pub session_timeout: Duration,
    /// Longest retry pause.
    pub max_backoff: Duration,
    /// How long an outcome may take to reach the log (librdkafka's
    /// timeouts are derived from it, see [`Publisher::config`]): after it, a
    /// publish fails and the batch is decided again (as replays).
    pub publish_timeout: Duration,
    /// Wait before rebuilding a lost store (see `couponrush_core::recovery`);
    /// must exceed the outcome producer's delivery bound
    /// ([`Config::outcome_producer`]).
    pub recovery_fence: Duration,
    /// Between checkpoints of the ledger (zero: none; see
    /// `couponrush_core::checkpoint`).
    pub checkpoint_every: Duration,
    /// Between expiry sweeps (zero: none; see [`sweep`]).
    pub sweep_every: Duration,
    /// Lifetime of dedup records restored by a recovery.
    pub dedup_retention: Duration,
    /// The lab's experiment switches; the default changes nothing.
    pub arms: Arms,
}

impl Config {
    /// Defaults for a broker at `brokers`, for tests and in-process
    /// deployments: the environment is ignored.
    pub fn local(brokers: &str) -> Self {
        parse_ignoring_env::<Cli>(&["coupon-issuer", "--brokers", brokers]).config()
    }

    /// The outcome producer's configuration, exactly as it will be created
    /// (after every `--kafka-opt`), once its delivery bound is known to be
    /// under the recovery fence: the fence then outlasts every outcome
    /// still on its way, whatever the flags say.
    pub fn outcome_producer(&self) -> Result<(ClientConfig, DeliveryBound), FenceError> {
        let cfg = Publisher::config(&self.kafka, &self.client_id, self.publish_timeout);
        let bound = DeliveryBound::of(&cfg)?;
        let least = bound.total() + MIN_SHELF_LIFE * 2;
        if self.recovery_fence < least {
            return Err(FenceError::TooShort {
                fence: self.recovery_fence,
                bound,
                suggest: Duration::from_secs(least.as_secs_f64().ceil() as u64),
            });
        }
        Ok((cfg, bound))
    }

    /// How long a store answer may wait before its batch's outcomes are
    /// enqueued: half the margin the recovery fence leaves over the outcome
    /// producer's delivery `bound`. A decision's outcome then reaches the
    /// log within the fence of the decision even if the store was lost at
    /// that very moment, which is what a recovery waiting out the fence
    /// counts on ([`couponrush_core::recovery`]); an older answer is
    /// decided again.
    pub fn answer_shelf_life(&self, bound: &DeliveryBound) -> Duration {
        self.recovery_fence.saturating_sub(bound.total()) / 2
    }
}

/// The shortest shelf life of a store answer the issuer starts with: a
/// few round trips of a full batch. Shorter, a store call would outlive it
/// as a rule and the batch be decided again and again.
pub const MIN_SHELF_LIFE: Duration = Duration::from_millis(250);

/// A recovery fence that an outcome could outlast: refused at start-up.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The fence does not exceed the outcome producer's delivery bound.
    #[error(
        "--recovery-fence {fence:?} must exceed the latest an outcome can still reach the log, \
         {bound}, as --publish-timeout and --kafka-opt set it, by at least twice the shortest \
         shelf life of a store answer (250ms): pass --recovery-fence {suggest:?} or more, or a \
         shorter --publish-timeout, or smaller values for those --kafka-opt properties"
    )]
    TooShort {
        /// The fence asked for.
        fence: Duration,
        /// The outcome producer's bound.
        bound: DeliveryBound,
        /// The shortest whole-second fence that would do.
        suggest: Duration,
    },
    /// The outcome producer never gives up on a record.
    #[error("no --recovery-fence can outlast the outcome producer: {0}")]
    Unbounded(#[from] UnboundedDelivery),
}

/// What one issuer did before it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Batches completed.
    pub batches: u64,
    /// Outcomes published (replays included).
    pub decided: u64,
    /// Outcomes that restated an earlier decision.
    pub replays: u64,
    /// First-time `issued` decisions.
    pub issued: u64,
    /// Records sent to the DLQ.
    pub dead: u64,
    /// Holds ended (claimed, released, expired), first time.
    pub hold_ends: u64,
    /// Hold actions that decided nothing.
    pub actions_ignored: u64,
}

/// Why an issuer stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The store is unreachable at start-up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Metrics could not be served.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The consume thread panicked.
    #[error("the consume loop panicked")]
    Panicked,
    /// The store could not be made ready.
    #[error(transparent)]
    Recovery(#[from] couponrush_core::recovery::RecoveryError),
    /// A recovery fence an outcome could outlast.
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// An unsafe experiment switch without --i-know-this-is-unsafe.
    #[error(transparent)]
    Unsafe(#[from] UnsafeRefused),
}

/// A live view of a running issuer (for embedded deployments and tests).
#[derive(Debug, Clone, Default)]
pub struct Probe {
    assigned: Arc<AtomicUsize>,
}

impl Probe {
    /// Partitions of the requests topic assigned to the issuer right now
    /// (the hold actions' partitions are not counted: a group is formed when
    /// every request partition has an owner).
    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    fn set_assigned(&self, n: usize) {
        self.assigned.store(n, Ordering::Relaxed);
        metrics::gauge!("couponrush_issuer_assigned_partitions").set(n as f64);
    }
}

/// Runs one issuer over `store` until `shutdown`. The loop runs on its own
/// thread (librdkafka callbacks block); store and broker calls run on the
/// current tokio runtime.
pub async fn run_issuer(
    config: Config,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<Totals, IssuerError> {
    run_issuer_probed(config, store, shutdown, Probe::default()).await
}

/// [`run_issuer`], reporting through `probe`.
pub async fn run_issuer_probed(
    config: Config,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    probe: Probe,
) -> Result<Totals, IssuerError> {
    let (producer, bound) = config.outcome_producer()?;
    tracing::debug!(%bound, fence = ?config.recovery_fence, "outcomes reach the log within the fence");
    let recovery = Recovery {
        kafka: config.kafka.clone(),
        topics: config.topics.clone(),
        store: store.clone(),
        fence: config.recovery_fence,
        retention: config.dedup_retention,
        owner: config.client_id.clone(),
    };
    // A store without its epoch is recovered (or initialised) before any decision.
    recovery.ensure_ready(Duration::from_secs(3600)).await?;
    let unsafe_flags = config.arms.unsafe_flags();
    if !unsafe_flags.is_empty() {
        tracing::warn!(switches = ?unsafe_flags, "UNSAFE experiment switches on: this issuer breaks its delivery guarantee on purpose");
    }
    // The arms' consumer properties go last, over the issuer's own.
    let mut consumer_config = config.clone();
    consumer_config
        .kafka
        .extra
        .extend(config.arms.consumer_props());
    let (consumer, shared) = create_consumer(&consumer_config, probe)?;
    if config.arms.unsafe_auto_commit.is_some() {
        shared.offsets.leave_commits_to_the_timer();
    }
    let publisher = Arc::new(Publisher::from_config(&producer, config.topics.clone())?);
    let shelf_life = config.answer_shelf_life(&bound);
    let worker = Worker {
        consumer,
        shared,
        store,
        publisher,
        recovery: Arc::new(recovery),
        rt: tokio::runtime::Handle::current(),
        config,
        shutdown,
        carry: Vec::new(),
        totals: Totals::default(),
        deciding: None,
        shelf_life,
    };
    if !worker.config.checkpoint_every.is_zero() {
        let checkpointer = Checkpointer {
            kafka: worker.config.kafka.clone(),
            outcomes: worker.config.topics.outcomes.clone(),
            checkpoints: worker.config.topics.checkpoints.clone(),
            writer: worker.config.client_id.clone(),
            every: worker.config.checkpoint_every,
        };
        tokio::spawn(checkpointer.run(worker.shutdown.clone()));
    }
    if !worker.config.sweep_every.is_zero() {
        let sweeper = sweep::Sweeper::new(
            &worker.config.kafka,
            &worker.config.client_id,
            &worker.config.topics.compensations,
            worker.store.clone(),
        )?;
        tokio::spawn(sweeper.run(worker.config.sweep_every, worker.shutdown.clone()));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("issuer-consume".into())
        .spawn(move || {
            let _ = tx.send(worker.run());
        })
        .map_err(|_| IssuerError::Panicked)?;
    match rx.await {
        Ok(result) => Ok(result?),
        Err(_) => Err(IssuerError::Panicked),
    }
}

/// Runs the issuer as `coupon-issuer` does: Redis store, metrics.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<Totals, IssuerError> {
    cli.arms().check(cli.i_know_this_is_unsafe)?;
    if cli.metrics_listen.is_some() {
        couponrush_core::telemetry::install_metrics(cli.metrics_listen)?;
    }
    let store = RedisStore::connect(&cli.store.redis_url, cli.store.dedup_retention).await?;
    run_issuer(cli.config(), Arc::new(store), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(flags: &[&str]) -> Config {
        let mut args = vec!["coupon-issuer"];
        args.extend_from_slice(flags);
        parse_ignoring_env::<Cli>(&args).config()
    }

    #[test]
    fn a_store_answer_keeps_for_seconds_with_the_default_fence() {
        let c = config(&[]);
        let (_, bound) = c.outcome_producer().unwrap();
        let life = c.answer_shelf_life(&bound);
        assert!(
            life >= Duration::from_secs(1) && life < c.recovery_fence - bound.total(),
            "{life:?} (fence {:?}, bound {bound})",
            c.recovery_fence
        );
    }

    #[test]
    fn a_fence_leaving_a_store_answer_less_than_its_shortest_shelf_life_is_refused() {
        let mut c = config(&[]);
        let (_, bound) = c.outcome_producer().unwrap();
        c.recovery_fence = bound.total() + MIN_SHELF_LIFE * 2 - Duration::from_millis(1);
        assert!(matches!(
            c.outcome_producer(),
            Err(FenceError::TooShort { .. })
        ));
        c.recovery_fence = bound.total() + MIN_SHELF_LIFE * 2;
        let (_, bound) = c.outcome_producer().unwrap();
        assert_eq!(c.answer_shelf_life(&bound), MIN_SHELF_LIFE);
    }

    #[test]
    fn the_default_fence_outlasts_the_default_outcome_producer() {
        let (cfg, bound) = config(&[]).outcome_producer().unwrap();
        assert!(bound.total() <= Duration::from_secs(10), "{bound}");
        assert_eq!(cfg.get("acks"), Some("all"));
    }

    #[test]
    fn the_fence_is_checked_against_what_the_kafka_opts_make_of_the_producer() {
        let e = config(&["--kafka-opt", "message.timeout.ms=20000"])
            .outcome_producer()
            .unwrap_err();
        let FenceError::TooShort { suggest, .. } = &e else {
            panic!("{e}");
        };
        // 20 s + 1.1 s scan + 2.5 s request + 2 ms linger, and twice the
        // shortest shelf life (0.5 s): 24.102 s, rounded up.
        assert_eq!(*suggest, Duration::from_secs(25), "{e}");
        assert!(e.to_string().contains("--recovery-fence 25s"), "{e}");
        config(&[
            "--kafka-opt",
            "message.timeout.ms=20000",
            "--recovery-fence",
            "25s",
        ])
        .outcome_producer()
        .unwrap();
        assert!(matches!(
            config(&["--kafka-opt", "message.timeout.ms=0"]).outcome_producer(),
            Err(FenceError::Unbounded(_))
        ));
    }
}
