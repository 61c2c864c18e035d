//! What can stop a lab command before it has a verdict, each saying what to
//! do. A drop that oversold or lost something is not an error: it is a
//! report whose verdict is FAIL (exit 1); these are exit 2.

use std::path::PathBuf;
use std::time::Duration;

use crate::deployment::DeploymentError;

/// Why a lab command could not go on.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The deployment did not start.
    #[error(transparent)]
    Deployment(#[from] DeploymentError),
    /// The instrument could not run the drop.
    #[error(transparent)]
    Instrument(#[from] couponrush_loadgen::Error),
    /// The consumer group did not form.
    #[error("the issuers did not get every partition within {0:?}: is the broker overloaded or unreachable?")]
    NotAssigned(Duration),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bare server could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The capacity model could not be measured; the message says why.
    #[error("{0}")]
    Capacity(String),
    /// The bare-produce baseline could not set up its producer.
    #[error(
        "{0}; start the broker and create the topic first (e.g. coupon-api --topic-partitions 8)"
    )]
    Bare(String),
    /// The store refused the benchmark's event.
    #[error("the store refused the benchmark's event: {0}")]
    Store(#[from] couponrush_core::store::StoreError),
    /// The benchmark's event could not be written to the log.
    #[error("cannot set up the benchmark's event: {0}")]
    BenchEvent(#[from] couponrush_core::store::definition::CreateEventError),
    /// A Kafka client could not be created.
    #[error("cannot create a Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A drop through the api of a deployment that runs none.
    #[error("this deployment runs no api (it was started without one)")]
    NoApi,
    /// An experiment could not go on; the message says why and what to check.
    #[error("{0}")]
    Experiment(String),
    /// A store benchmark could not reach a server it was given.
    #[error(
        "{0}: check the Redis URL (for a cluster, list its masters: redis+cluster://host:port,…)"
    )]
    BenchStore(String),
    /// `--broker-rtt` could not slow the broker; the message says why.
    #[error("--broker-rtt: {0}")]
    BrokerRtt(String),
    /// Ctrl-C.
    #[error("cancelled")]
    Cancelled,
    /// A helper task died (a bug: please report it).
    #[error("an internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
