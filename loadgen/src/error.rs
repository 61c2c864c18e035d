//! What can stop the instrument before it has a report, each saying what
//! to do. A drop that oversold or lost something is not an error: it is a
//! report whose verdict is FAIL (exit 1); these are exit 2. Per-request
//! failures during the load are not errors either: they are counted by kind
//! in the report.

use std::path::PathBuf;

use couponrush_core::kafka::TopicError;
use couponrush_core::store::StoreError;
use rdkafka::error::KafkaError;

/// Why a run, a merge or a setup could not go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value cannot work.
    #[error("{flag} {expected}")]
    BadFlag {
        /// The flag.
        flag: &'static str,
        /// What it needs.
        expected: &'static str,
    },
    /// The target is not the api's base URL.
    #[error("--target {url:?}: {problem}; give the api's base URL, e.g. http://127.0.0.1:8080 (for https, put a TLS proxy in front)")]
    BadTarget {
        /// What was given.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The api did not answer.
    #[error("cannot reach the api at {authority} ({kind}): is coupon-api running there?")]
    ApiUnreachable {
        /// Where.
        authority: String,
        /// How the call failed (connect, io, timeout).
        kind: String,
    },
    /// The api answered the event setup with an error.
    #[error("{what} failed: {status} {body}{hint}")]
    ApiRefused {
        /// The call.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The api's answer.
        body: String,
        /// What to do, when known.
        hint: &'static str,
    },
    /// The api answered with something that is not an event.
    #[error("the api answered {what} with an unexpected body ({problem}): is --target the couponrush api?")]
    ApiBody {
        /// The call.
        what: String,
        /// The parse error.
        problem: String,
    },
    /// `--no-setup` on an event that does not exist.
    #[error("event {0} does not exist: run without --no-setup to create it")]
    NoSuchEvent(String),
    /// `--claim-window` against an api that made the event without holds.
    #[error("the api set up event {0} without a claim window: it has no holds (run an api with the claim and cancel routes, or leave out --claim-window)")]
    NoHolds(String),
    /// `--direct` without a store to set up the event in.
    #[error("--direct needs --redis to set up and audit the event")]
    DirectNeedsStore,
    /// The store could not be opened.
    #[error("cannot reach the store at {url}: {source}; is Redis running there?")]
    StoreUnreachable {
        /// Its URL.
        url: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A store call failed.
    #[error("the store failed while {doing}: {source}")]
    Store {
        /// What the instrument was doing.
        doing: &'static str,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Kafka could not be used.
    #[error("cannot {doing} on Kafka at {brokers}: {source}; are the brokers up and the topics created?")]
    Kafka {
        /// What the instrument was doing.
        doing: &'static str,
        /// The bootstrap servers.
        brokers: String,
        /// Why.
        #[source]
        source: KafkaError,
    },
    /// A topic could not be inspected.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// A file could not be read or written.
    #[error("cannot {doing} {path}: {source}")]
    File {
        /// read or write.
        doing: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A report file is not one this version reads.
    #[error("{path} is not a couponrush report: {problem}")]
    NotAReport {
        /// Which file.
        path: PathBuf,
        /// Why.
        problem: String,
    },
    /// The live page could not be served there.
    #[error("cannot serve the live page at {addr}: {problem}")]
    Dashboard {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why, and what to do.
        problem: String,
    },
    /// Reports that are not of one drop, or lack what a merge needs.
    #[error("cannot merge: {0}")]
    Merge(String),
    /// A helper task died (a bug: please report it).
    #[error("an internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
