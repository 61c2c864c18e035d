//! A whole deployment in this process: the api and N issuers over a Kafka
//! (librdkafka's embedded mock cluster, or real brokers) and a store. Used by
//! `demo`, `sweep` and `bench-issuer`, so each measured point starts from
//! fresh topics and a fresh consumer group.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use couponrush_api::producer::RequestProducer;
use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::store::Store;
use couponrush_core::{Partitioner, Topics};
use couponrush_harness::MockKafka;
use couponrush_issuer::{Probe, Totals};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::drive::http::Endpoint;
use crate::drive::Plan;
use crate::measure::audit::EventTerms;
use crate::report::Report;
use crate::run::{run_drop, Drop, Via};

/// Which Kafka to use.
pub enum KafkaChoice {
    /// An embedded mock cluster with this many brokers (replication = brokers, at most 3).
    Embedded(i32),
    /// Real brokers.
    External(KafkaSettings),
}

impl KafkaChoice {
    /// `brokers` if given, else an embedded cluster of `embedded` brokers.
    pub fn brokers_or_embedded(brokers: Option<&str>, embedded: i32) -> Self {
        match brokers {
            Some(b) => KafkaChoice::External(KafkaSettings::new(b)),
            None => KafkaChoice::Embedded(embedded),
        }
    }
}

/// What to deploy.
pub struct Spec {
    /// The Kafka.
    pub kafka: KafkaChoice,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Request partitions.
    pub partitions: i32,
    /// Issuer instances.
    pub issuers: usize,
    /// Partitioning strategy of the api.
    pub partitioner: Partitioner,
    /// Records per issuer batch.
    pub batch_size: usize,
    /// Start the api (false for bench-issuer, which produces directly).
    pub with_api: bool,
    /// Start the issuers now (false: call [`Deployment::start_issuers`] later).
    pub start_issuers: bool,
}

/// A drop to run through a deployment.
pub struct DropSpec {
    /// The load.
    pub plan: Plan,
    /// Stock and limit.
    pub terms: EventTerms,
    /// Wait for the last decisions this long.
    pub drain_timeout: Duration,
    /// Show a progress bar.
    pub progress: bool,
    /// Keep raw data in the report.
    pub keep_raw: bool,
    /// Settings for the report.
    pub config: serde_json::Value,
}

/// A running deployment.
pub struct Deployment {
    /// Kafka settings to reach it.
    pub kafka: KafkaSettings,
    /// Its topics (fresh names on external brokers).
    pub topics: Topics,
    /// The api's address, if started.
    pub api: Option<SocketAddr>,
    /// The store.
    pub store: Arc<dyn Store>,
    group: String,
    batch_size: usize,
    issuer_count: usize,
    shutdown: CancellationToken,
    api_task: Option<JoinHandle<std::io::Result<()>>>,
    issuers: Vec<JoinHandle<Result<Totals, couponrush_issuer::IssuerError>>>,
    probes: Vec<Probe>,
    partitions: i32,
    partitioner: Partitioner,
    // Dropped last: the cluster must outlive its clients.
    _mock: Option<MockKafka>,
}

impl Deployment {
    /// Creates the topics and starts the api and the issuers.
    pub async fn start(spec: Spec) -> Result<Self, String> {
        let run = Uuid::new_v4().simple().to_string();
        let (kafka, topics, mock) = match spec.kafka {
            KafkaChoice::Embedded(brokers) => {
                let mock = tokio::task::spawn_blocking(move || MockKafka::start(brokers))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot start the embedded Kafka: {e}"))?;
                let topics = Topics::default();
                for t in topics.specs(spec.partitions, brokers.min(3)) {
                    mock.create_topic(&t.name, t.partitions, t.replication)
                        .map_err(|e| format!("cannot create {}: {e}", t.name))?;
                }
                (KafkaSettings::new(mock.brokers()), topics, Some(mock))
            }
            KafkaChoice::External(kafka) => {
                // Fresh topic names per deployment: a partition count cannot
                // shrink, and deleting topics is slow and racy on some brokers.
                let topics = Topics {
                    requests: format!("coupon.requests.{run}"),
                    outcomes: format!("coupon.outcomes.{run}"),
                    dlq: format!("coupon.requests.dlq.{run}"),
                    events: format!("coupon.events.{run}"),
                };
                ensure_topics(
                    &kafka,
                    &topics.specs(spec.partitions, 1),
                    Duration::from_secs(20),
                )
                .await
                .map_err(|e| e.to_string())?;
                (kafka, topics, None)
            }
        };
        let shutdown = CancellationToken::new();
        let (api, api_task) = if spec.with_api {
            let mut config = couponrush_api::Config::local(&kafka.brokers);
            config.kafka = kafka.clone();
            config.topics = topics.clone();
            config.partitioner = spec.partitioner;
            config.max_in_flight = 50_000;
            let api = couponrush_api::Api::bind(config, spec.store.clone(), None)
                .await
                .map_err(|e| format!("cannot start the api: {e}"))?;
            let addr = api.local_addr();
            (
                Some(addr),
                Some(tokio::spawn(api.serve(shutdown.child_token()))),
            )
        } else {
            (None, None)
        };
        let mut d = Deployment {
            kafka,
            topics,
            api,
            store: spec.store,
            group: format!("coupon-issuer-{run}"),
            batch_size: spec.batch_size,
            issuer_count: spec.issuers,
            shutdown,
            api_task,
            issuers: Vec::new(),
            probes: Vec::new(),
            partitions: spec.partitions,
            partitioner: spec.partitioner,
            _mock: mock,
        };
        if spec.start_issuers {
            d.start_issuers();
        }
        Ok(d)
    }

    /// Starts the issuers (once).
    pub fn start_issuers(&mut self) {
        if !self.issuers.is_empty() {
            return;
        }
        for i in 0..self.issuer_count {
            let mut config = couponrush_issuer::Config::local(&self.kafka.brokers);
            config.kafka = self.kafka.clone();
            config.topics = self.topics.clone();
            config.group_id = self.group.clone();
            config.client_id = format!("{}-{i}", self.group);
            config.batch_size = self.batch_size;
            let probe = Probe::default();
            self.probes.push(probe.clone());
            self.issuers
                .push(tokio::spawn(couponrush_issuer::run_issuer_probed(
                    config,
                    self.store.clone(),
                    self.shutdown.child_token(),
                    probe,
                )));
        }
    }

    /// Waits until the issuers' group owns every request partition and, when
    /// there are at least as many partitions as issuers, every issuer owns
    /// one (so a measurement starts with deciding, not with a rebalance when
    /// the last member joins). False on timeout.
    pub async fn wait_assigned(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let counts: Vec<usize> = self.probes.iter().map(Probe::assigned).collect();
            let total: usize = counts.iter().sum();
            let each = self.partitions as usize >= counts.len();
            if total == self.partitions as usize && (!each || counts.iter().all(|&c| c > 0)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs an audited drop through this deployment's api: the event is set
    /// up with the drop's terms and the store is audited.
    pub async fn drop_through_api(
        &self,
        d: DropSpec,
        cancel: CancellationToken,
    ) -> Result<Report, String> {
        let api = self.api.ok_or("the api did not start")?;
        let via = Via::Http {
            endpoint: Endpoint::parse(&format!("http://{api}")).await?,
            admin_token: None,
            timeout: Duration::from_secs(30),
        };
        self.drop_via(via, d, cancel).await
    }

    /// Runs an audited drop produced straight to the requests topic with the
    /// deployment's partitioner, as the api would: measures Kafka, the issuers
    /// and the store without the HTTP stage.
    pub async fn drop_direct(
        &self,
        d: DropSpec,
        cancel: CancellationToken,
    ) -> Result<Report, String> {
        let producer = RequestProducer::new(
            &self.kafka,
            self.topics.requests.clone(),
            self.partitioner,
            self.partitions,
            1_000_000,
        )
        .map_err(|e| e.to_string())?;
        let via = Via::Direct {
            producer: Arc::new(producer),
        };
        self.drop_via(via, d, cancel).await
    }

    async fn drop_via(
        &self,
        via: Via,
        d: DropSpec,
        cancel: CancellationToken,
    ) -> Result<Report, String> {
        let DropSpec {
            plan,
            terms,
            drain_timeout,
            progress,
            keep_raw,
            config,
        } = d;
        let drop = Drop {
            via,
            kafka: self.kafka.clone(),
            topics: self.topics.clone(),
            store: Some(self.store.clone()),
            setup: true,
            terms,
            plan,
            drain_timeout,
            progress,
            keep_raw,
            config,
            observe: true,
        };
        run_drop(drop, cancel).await
    }

    /// Stops everything cleanly and returns what each issuer did.
    pub async fn stop(self) -> Vec<Totals> {
        self.shutdown.cancel();
        let mut totals = Vec::new();
        for t in self.issuers {
            if let Ok(Ok(x)) = t.await {
                totals.push(x);
            }
        }
        if let Some(t) = self.api_task {
            let _ = t.await;
        }
        totals
    }
}
