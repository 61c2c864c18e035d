//! # couponrush-api
//!
//! Accepts coupon requests over HTTP, gives each a UUID, produces it to
//! `coupon.requests` on the partition the chosen [`Partitioner`] picks, and
//! answers `202 Accepted` once the broker has acknowledged the record.
//!
//! ## Guarantees
//! - **Accepted means durable.** `202` is sent only after the idempotent,
//!   `acks=all` producer's acknowledgement; anything else is a 503 telling the
//!   client to retry (with the same `Idempotency-Key`, which makes the retry
//!   the same request: same request id, never a second coupon).
//! - **A key is the client's own.** The request id of an `Idempotency-Key`
//!   is derived from the event, the user and the key ([`request_id`]): another
//!   user reusing the key makes another request, and is never handed, nor
//!   shown the decision of, someone else's.
//! - **Bounded.** In-flight issue requests are capped (`--max-in-flight`) and
//!   librdkafka's queue is capped (`--producer-queue`); past either, a 503
//!   with `Retry-After`. Bodies over [`MAX_BODY_BYTES`] are a 413.
//! - **Bad input is a 4xx** with a JSON body saying what was wrong.
//!
//! # Layout
//! - [`Cli`] (the flags) → [`Config`] (plain settings) → [`Api::bind`] →
//!   [`Api::serve`]; [`run`] is what `coupon-api` does.
//! - [`app`]: the [`router`] behind the [`guard`], shared by `main` and tests.
//! - [`routes`]: the handlers, one per route.
//! - [`guard`]: what every request passes once: the bound on requests in
//!   flight, a panic turned into a 503, the request counter.
//! - [`connections`]: the open connections, closed when idle or stalled
//!   in a request head, drained at shutdown.
//! - [`error`]: the one error type, [`error::AppError`], and its JSON shape.
//! - [`events`]: the cache of known events.
//! - [`readiness`]: whether the store is ready, new, or being rebuilt.
//! - [`request_id`]: the request id an `Idempotency-Key` stands for (kept in
//!   core, re-exported here).
//! - [`line`]: the waiting room's routes and the issue route's gate.
//! - The request producer it answers with is
//!   [`couponrush_core::producer::RequestProducer`], shared with
//!   `coupon-loadgen run --direct`.

pub mod connections;
pub mod error;
pub mod events;
pub mod guard;
pub mod line;
pub mod readiness;
pub use couponrush_core::request_id;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post, put};
use axum::Router;
use clap::Parser;
use couponrush_core::cli::{
    parse_duration, parse_ignoring_env, KafkaArgs, LogArgs, StoreArgs, TopicArgs,
};
use couponrush_core::kafka::{ensure_topics, KafkaSettings, TopicError};
use couponrush_core::producer::RequestProducer;
use couponrush_core::recovery::Recovery;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{Store, StoreError};
use couponrush_core::telemetry::MetricsError;
use couponrush_core::topics::{replication_for, ReplicationError, TopicSpec};
use couponrush_core::{Partitioner, Topics};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::events::EventCache;
use crate::readiness::Readiness;

/// Largest request body accepted; a real one is ~30 bytes.
pub const MAX_BODY_BYTES: usize = 1024;

/// A client must send its request headers within this (the connection is
/// closed otherwise, up to a quarter of it later: [`connections`]), and its
/// body within this once the headers arrived (slow clients, slowloris: 408
/// otherwise). A kept-alive connection idle this long is closed too.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// `coupon-api`: the HTTP front of a coupon drop.
#[derive(Debug, Clone, Parser)]
#[command(name = "coupon-api", version, about)]
pub struct Cli {
    /// Address to listen on. A non-loopback address requires --admin-token.
    #[arg(long, env = "API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub store: StoreArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub topics: TopicArgs,
    /// How requests are keyed and spread over partitions: event (strict order,
    /// one partition), user, spread (even, soft order) or buckets:K.
    #[arg(long, env = "PARTITIONER", default_value = "spread")]
    pub partitioner: Partitioner,
    /// Create the topics with this many request partitions if they are missing.
    #[arg(long, env = "TOPIC_PARTITIONS")]
    pub topic_partitions: Option<i32>,
    /// Replication factor of the topics this process creates. Default: 3, with
    /// min.insync.replicas=2, on a cluster of three brokers or more; 1 on a single
    /// broker; a 2-broker cluster must choose. Less than the cluster allows is
    /// logged as a warning.
    #[arg(long, env = "REPLICATION_FACTOR")]
    pub replication_factor: Option<i32>,
    /// Bearer token for admin routes (PUT /v1/events/..).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Issue requests in flight at once; beyond this, 503 with Retry-After.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// Open connections at most; the next connection waits to be accepted. A connection idle, or stalled in a request head, for 5 s is closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Records librdkafka may queue locally; beyond this, 503 with Retry-After.
    #[arg(long, env = "PRODUCER_QUEUE", default_value_t = 100_000)]
    pub producer_queue: usize,
    /// How long to wait for the broker's acknowledgement before answering 503.
    #[arg(long, env = "PRODUCE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub produce_timeout: Duration,
    /// When the store lost its state: wait this long for in-flight outcomes
    /// before rebuilding it from the log (as the issuers do).
    #[arg(long, env = "RECOVERY_FENCE", default_value = "15s", value_parser = parse_duration)]
    pub recovery_fence: Duration,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub line: crate::line::LineArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,
}

impl Cli {
    /// The plain settings these flags describe.
    pub fn config(&self) -> Config {
        Config {
            listen: self.listen,
            kafka: self.kafka.settings(),
            topics: self.topics.topics(),
            partitioner: self.partitioner,
            topic_partitions: self.topic_partitions,
            replication_factor: self.replication_factor,
            admin_token: self.admin_token.clone().filter(|t| !t.is_empty()),
            max_in_flight: self.max_in_flight.max(1),
            max_connections: self.max_connections.max(1),
            producer_queue: self.producer_queue.max(1),
            produce_timeout: self.produce_timeout,
            recovery_fence: self.recovery_fence,
            dedup_retention: self.store.dedup_retention,
            line: self.line.config(&self.store.redis_url),
        }
    }
}

/// Everything the api needs besides its store.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The Kafka cluster.
    pub kafka: KafkaSettings,
    /// Topic names.
    pub topics: Topics,
    /// Partitioning strategy.
    pub partitioner: Partitioner,
    /// Create missing topics with this many request partitions.
    pub topic_partitions: Option<i32>,
    /// Replication factor of created topics; `None` lets the cluster's size
    /// decide ([`couponrush_core::topics::replication_for`]).
    pub replication_factor: Option<i32>,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// In-flight issue requests.
    pub max_in_flight: usize,
    /// Open connections.
    pub max_connections: usize,
    /// librdkafka queue bound.
    pub producer_queue: usize,
    /// Broker acknowledgement timeout.
    pub produce_timeout: Duration,
    /// Wait before rebuilding a lost store (see `couponrush_core::recovery`).
    pub recovery_fence: Duration,
    /// Lifetime of dedup records restored by a recovery.
    pub dedup_retention: Duration,
    /// The waiting room, `None` when off.
    pub line: Option<crate::line::LineConfig>,
}

impl Config {
    /// Defaults for a broker at `brokers`, listening on a free loopback port,
    /// for tests and in-process deployments: the environment is ignored.
    /// Waiting rooms are off: an in-process api may have no Redis.
    pub fn local(brokers: &str) -> Self {
        parse_ignoring_env::<Cli>(&[
            "coupon-api",
            "--brokers",
            brokers,
            "--listen",
            "127.0.0.1:0",
            "--line-backend",
            "none",
        ])
        .config()
    }
}

/// Why the api could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Refused configuration.
    #[error("{0}")]
    Config(String),
    /// The store is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Topic setup failed.
    #[error(transparent)]
    Topics(#[from] TopicError),
    /// The cluster cannot hold the replication asked for (or, with two
    /// brokers, the default).
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The producer could not be created.
    #[error("cannot create the Kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Shared state of the handlers.
pub struct AppState {
    /// Where decisions live (read-only here, but for admin writes).
    pub store: Arc<dyn Store>,
    /// Known events.
    pub events: EventCache,
    /// Whether the store is ready to decide (and if not, why).
    pub readiness: Arc<Readiness>,
    /// The request producer.
    pub producer: Arc<RequestProducer>,
    /// Admin token, if any.
    pub admin_token: Option<String>,
    /// Permits for issue requests in flight.
    pub in_flight: Semaphore,
    /// Size of `in_flight`.
    pub max_in_flight: usize,
    /// Broker acknowledgement timeout.
    pub produce_timeout: Duration,
    /// Where event definitions are written.
    pub events_topic: String,
    /// Where claim and cancel actions are written.
    pub compensations_topic: String,
    /// The Prometheus handle, when this process's recorder is ours.
    pub metrics: Option<PrometheusHandle>,
    /// The waiting room, when on.
    pub line: Option<Arc<crate::line::LineState>>,
}

/// The api's service: [`router`] behind the [`guard::GuardLayer`] (the
/// bound on requests in flight across every route, the body's limit and
/// deadline, the panic guard and the request counter).
pub type App = guard::GuardService<Router>;

/// [`router`] behind the guard: what `serve` answers with, and tests call.
pub fn app(state: Arc<AppState>) -> App {
    // Beyond the issue path's own in-flight bound, every route together may
    // hold at most this many requests; the rest are shed with a 503.
    let max_concurrent = state.max_in_flight.saturating_mul(2).max(64);
    // Around the whole router, not given to `Router::layer`, which would
    // wrap every route in a boxed service of its own.
    tower::Layer::layer(&guard::GuardLayer::new(max_concurrent), router(state))
}

/// Every route, unguarded.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/v1/events/{event_id}",
            get(routes::get_event).merge(put(routes::put_event)),
        )
        .route(
            "/v1/events/{event_id}/line",
            post(line::join)
                .merge(put(line::open))
                .merge(get(line::room)),
        )
        .route(
            "/v1/events/{event_id}/line/{ticket_id}",
            get(line::poll).delete(line::leave),
        )
        .route("/v1/events/{event_id}/issue", post(routes::issue))
        .route(
            "/v1/events/{event_id}/requests/{request_id}",
            get(routes::event_request_status),
        )
        .route(
            "/v1/events/{event_id}/requests/{request_id}/claim",
            post(routes::claim),
        )
        .route(
            "/v1/events/{event_id}/requests/{request_id}/cancel",
            post(routes::cancel),
        )
        .route("/v1/requests/{request_id}", get(routes::request_status))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state)
}

/// The topics this api creates when they are missing, replicated as the
/// cluster allows: its brokers are counted from the metadata, and the choice
/// is [`replication_for`]'s (a warning is logged when it is less durable than
/// the cluster allows).
pub async fn topic_specs(
    config: &Config,
    request_partitions: i32,
) -> Result<Vec<TopicSpec>, StartError> {
    let (kafka, topic) = (config.kafka.clone(), config.topics.requests.clone());
    let brokers = tokio::task::spawn_blocking(move || cluster_brokers(&kafka, &topic))
        .await
        .map_err(|e| StartError::Config(e.to_string()))??;
    let replication = replication_for(brokers, config.replication_factor)?;
    if let Some(warning) = &replication.warning {
        tracing::warn!(brokers, replication = replication.factor, "{warning}");
    }
    Ok(config.topics.specs(request_partitions, replication.factor))
}

/// Brokers in the cluster, from one metadata request. Blocking.
pub(crate) fn cluster_brokers(kafka: &KafkaSettings, topic: &str) -> Result<usize, TopicError> {
    let admin_err = |source| TopicError::Admin {
        brokers: kafka.brokers.clone(),
        source,
    };
    let client: BaseConsumer = kafka
        .client_config("couponrush-metadata")
        .create()
        .map_err(admin_err)?;
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(admin_err)?;
    Ok(md.brokers().len())
}

/// The request producer the api answers with, as `config` sets it up: the
/// requests topic's partition count read from the broker (the topic must
/// exist), librdkafka's queue bounded by `producer_queue`, and a record
/// given up after `produce_timeout` (when the client gives up on its HTTP
/// answer). `coupon-lab bare --produce` uses this too, so the baseline the
/// api is measured against produces exactly as the api does.
pub async fn request_producer(config: &Config) -> Result<RequestProducer, StartError> {
    let kafka = config.kafka.clone();
    let topic = config.topics.requests.clone();
    let partitions = tokio::task::spawn_blocking(move || {
        couponrush_core::kafka::partition_counts(&kafka, &[&topic], Duration::from_secs(10))
    })
    .await
    .map_err(|e| StartError::Config(e.to_string()))??[&config.topics.requests];
    let message_timeout = config.produce_timeout.max(Duration::from_secs(1));
    Ok(RequestProducer::with_message_timeout(
        &config.kafka,
        config.topics.requests.clone(),
        config.partitioner,
        partitions,
        config.producer_queue,
        Some(message_timeout),
    )?)
}

/// A bound, ready-to-serve api.
pub struct Api {
    listener: TcpListener,
    state: Arc<AppState>,
    max_connections: usize,
}

impl Api {
    /// Checks the configuration, creates missing topics, connects the
    /// producer and binds the listener.
    pub async fn bind(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, StartError> {
        if config.admin_token.is_none() && !config.listen.ip().is_loopback() {
            return Err(StartError::Config(format!(
                "refusing to listen on {} without an admin token: anyone could reset events; \
                 set ADMIN_TOKEN or --admin-token, or listen on 127.0.0.1",
                config.listen
            )));
        }
        if let Some(n) = config.topic_partitions {
            if n < 1 {
                return Err(StartError::Config(
                    "--topic-partitions must be at least 1".into(),
                ));
            }
            let specs = topic_specs(&config, n).await?;
            let created = ensure_topics(&config.kafka, &specs, Duration::from_secs(10)).await?;
            if !created.is_empty() {
                tracing::info!(topics = ?created, partitions = n, "created topics");
            }
        }
        let producer = Arc::new(request_producer(&config).await?);
        let partitions = producer.partitions();
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        tracing::info!(
            listen = %listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?,
            partitioner = %config.partitioner,
            partitions,
            store = store.kind(),
            "api ready"
        );
        let line = match &config.line {
            Some(l) => Some(crate::line::LineState::start(l, &config).await?),
            None => None,
        };
        let recovery = Recovery {
            kafka: config.kafka.clone(),
            topics: config.topics.clone(),
            store: store.clone(),
            fence: config.recovery_fence,
            retention: config.dedup_retention,
            owner: couponrush_core::telemetry::instance_id("coupon-api"),
        };
        let state = Arc::new(AppState {
            events: EventCache::new(store.clone()),
            readiness: Readiness::new(recovery),
            store,
            producer,
            admin_token: config.admin_token,
            in_flight: Semaphore::new(config.max_in_flight),
            max_in_flight: config.max_in_flight,
            produce_timeout: config.produce_timeout,
            events_topic: config.topics.events.clone(),
            compensations_topic: config.topics.compensations.clone(),
            metrics,
            line,
        });
        Ok(Api {
            listener,
            state,
            max_connections: config.max_connections,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The handlers' state (tests inspect it).
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown`, then drains open requests and flushes the
    /// producer so every `202` already sent stays true.
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        // Accepting requests needs only the broker; admin writes wait for a
        // store with an epoch (set up when new, rebuilt from the log when lost).
        self.state.readiness.start();
        let producer = self.state.producer.clone();
        tokio::spawn(
            producer
                .clone()
                .watch_partitions(Duration::from_secs(10), shutdown.child_token()),
        );
        // Accept only with a connection permit in hand: backpressure by
        // construction, a bounded number of connections whatever the clients do.
        let permits = Arc::new(Semaphore::new(self.max_connections));
        // Idle and stalled connections are closed after CLIENT_TIMEOUT (the
        // wait for a request head, and between kept-alive requests), by
        // one reaper rather than a timer per request.
        let connections = connections::Connections::new(CLIENT_TIMEOUT);
        let line = self.state.line.clone();
        let router = app(self.state);
        let mut http = hyper::server::conn::http1::Builder::new();
        // A client may close its sending side once its request is out and
        // still expect the answer. hyper's own header-read timeout is off:
        // `connections` keeps it.
        http.half_close(true)
            .keep_alive(true)
            .header_read_timeout(None);
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = shutdown.cancelled() => break,
            };
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let tracked = connections.open();
            let service = tracked.count(hyper_util::service::TowerToHyperService::new(
                router.clone(),
            ));
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let conn = tracked.serve(conn);
            tokio::spawn(async move {
                conn.await;
                drop(permit);
            });
        }
        drop(self.listener);
        if let Some(line) = line {
            line.stop();
        }
        if !connections.drain(Duration::from_secs(10)).await {
            tracing::warn!("connections still open after 10s; closed them");
        }
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("producer flush at shutdown did not complete");
        }
        tracing::info!("api stopped");
        Ok(())
    }
}

/// Runs the api as `coupon-api` does: Redis store, metrics, until `shutdown`.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<(), StartError> {
    let metrics = couponrush_core::telemetry::install_metrics(None)?;
    let store = RedisStore::connect(&cli.store.redis_url, cli.store.dedup_retention).await?;
    let api = Api::bind(cli.config(), Arc::new(store), metrics).await?;
    let addr = api.local_addr();
    api.serve(shutdown)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}
