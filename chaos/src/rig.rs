//! The deployment the fault suite breaks: the lab's [`Deployment`] with
//! `coupon-api` and `coupon-issuer` as child processes (killed, restarted,
//! scaled), a private redis-server (or a Redis Cluster the scenario started
//! and faults itself), and a broker the scenario can fault (tansu, or
//! librdkafka's mock cluster in this process, reached over TCP).

use std::path::Path;

use couponrush_core::Partitioner;
use couponrush_harness::TansuStorage;
use couponrush_lab::deployment::{Deployment, DeploymentError, KafkaChoice, Members, Spec};

pub use couponrush_lab::deployment::{binary, Broker, StoreChoice};

/// Which broker a scenario faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// tansu, in memory.
    TansuMemory,
    /// tansu on sqlite: survives SIGKILL.
    TansuSqlite,
    /// librdkafka's mock cluster (3 brokers), for injected faults.
    Mock,
}

/// What a scenario starts.
#[derive(Debug, Clone)]
pub struct RigSpec {
    /// The broker.
    pub broker: BrokerKind,
    /// Request partitions.
    pub partitions: i32,
    /// Issuers started at once.
    pub issuers: usize,
    /// Extra flags for the api.
    pub api_args: Vec<String>,
    /// The store: a private redis-server (`StoreChoice::PrivateRedis`), or
    /// a Redis the scenario runs itself by URL (`StoreChoice::Redis`, for
    /// example a `harness::RedisCluster`'s `redis+cluster://` URL).
    pub store: StoreChoice,
    /// Extra librdkafka properties for the api and the issuers.
    pub kafka_opts: Vec<(String, String)>,
}

/// Issuer flags that keep fault recovery quick in a test: a short session
/// (a dead member is noticed in seconds) and a short fence.
const ISSUER_ARGS: [&str; 6] = [
    "--session-timeout",
    "6s",
    "--publish-timeout",
    "3s",
    "--recovery-fence",
    "5s",
];

/// Batches small enough that a fault lands with several in flight.
const BATCH_SIZE: usize = 500;

/// Starts `spec` with its logs and data in `dir` and waits until the api answers.
pub async fn start(spec: &RigSpec, dir: &Path) -> Result<Deployment, DeploymentError> {
    let kafka = match spec.broker {
        BrokerKind::TansuMemory => KafkaChoice::Tansu(TansuStorage::Memory),
        BrokerKind::TansuSqlite => KafkaChoice::Tansu(TansuStorage::Sqlite(dir.join("tansu.db"))),
        BrokerKind::Mock => KafkaChoice::Embedded(3),
    };
    let mut api_args = vec!["--recovery-fence".to_string(), "5s".to_string()];
    api_args.extend(spec.api_args.iter().cloned());
    Deployment::start(Spec {
        kafka,
        store: spec.store.clone(),
        members: Members::Processes {
            api_args,
            issuer_args: ISSUER_ARGS.iter().map(|s| s.to_string()).collect(),
        },
        dir: Some(dir.to_path_buf()),
        partitions: spec.partitions,
        issuers: spec.issuers,
        partitioner: Partitioner::Spread,
        batch_size: BATCH_SIZE,
        kafka_opts: spec.kafka_opts.clone(),
        with_api: true,
        start_issuers: true,
    })
    .await
}
