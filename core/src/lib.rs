//! # couponrush-core
//!
//! Everything that crosses a process boundary in couponrush, so the api, the
//! issuers and the load generator cannot disagree about it.
//!
//! # Layout
//! - [`wire`]: the request and outcome records (versioned JSON, zero payload)
//!   and the reasons a record is poison.
//! - [`topics`]: topic names and their retention.
//! - [`partitioner`]: the `event | user | spread | buckets:K` strategies.
//! - [`store`]: the [`store::Store`] trait, where requests are decided; its
//!   Redis implementation (one Lua script) and an in-memory one.
//! - [`kafka`]: shared client settings (idempotent, `acks=all`) and topic
//!   administration.
//! - [`cli`]: flags every binary shares (`--brokers`, `--redis`, topics).
//! - [`recovery`]: rebuilding a lost store from the events and outcomes topics.
//! - [`telemetry`]: logs, Prometheus metrics and the shutdown signal.

pub mod cli;
pub mod kafka;
pub mod partitioner;
pub mod recovery;
pub mod store;
pub mod telemetry;
pub mod topics;
pub mod wire;

pub use partitioner::Partitioner;
pub use store::{Store, StoreError};
pub use topics::Topics;
pub use wire::{DecisionResult, IssueRequest, Outcome};
