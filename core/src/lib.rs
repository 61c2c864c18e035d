//! # couponrush-core
//!
//! Everything that crosses a process boundary in couponrush, so the api, the
//! issuers and the load generator cannot disagree about it.
//!
//! ## Guarantees
//! - **One definition.** The wire format, topic names, partitioners, the
//!   store's contract and its script exist once, here; a process that
//!   decides, produces or audits uses these, never a copy.
//! - **Decided exactly once in effect.** A [`Store`] decides each request
//!   atomically per event and dedups by request id: a redelivery gets the
//!   same decision back and changes nothing.
//! - **Acknowledged means on every in-sync replica.** Producers are
//!   idempotent with `acks=all`, and [`kafka::acknowledged`] is the one
//!   reading of a broker's answer.
//!
//! # Layout
//! - [`wire`]: the request and outcome records (versioned JSON, zero payload)
//!   and the reasons a record is poison.
//! - [`topics`]: topic names and their retention.
//! - [`partitioner`]: the `event | user | spread | buckets:K` strategies.
//! - [`producer`]: the request producer (the api's, and `coupon-loadgen run
//!   --direct`'s): placed by a partitioner, answered after the broker's ack.
//! - [`store`]: the [`store::Store`] trait, where requests are decided; its
//!   Redis implementation (one Lua script) and an in-memory one.
//! - [`kafka`]: client settings (idempotent, `acks=all`; the user's extras
//!   applied last, in one place), the delivery helper and topic
//!   administration.
//! - [`cli`]: flags every binary shares (`--brokers`, `--redis`, topics).
//! - [`recovery`]: rebuilding a lost store from the events and outcomes topics.
//! - [`redis_conn`]: one connection to Redis, a single server or a Redis
//!   Cluster (`redis+cluster://…`), for the store and the line.
//! - [`request_id`]: the request id an `Idempotency-Key` stands for (scoped
//!   by event and user): the api derives it, a load generator that lost an
//!   answer can too.
//! - [`checkpoint`]: the ledger folded and checkpointed to a compacted topic,
//!   so a rebuild reads a checkpoint and the tail, bounded by what was sold.
//! - [`line`]: the waiting room before an event's door (a [`line::Line`]
//!   in Redis or in one Kafka partition per room), its admitter and the
//!   admission tokens the issue route checks.
//! - [`telemetry`]: logs, Prometheus metrics and the shutdown signal.

pub mod checkpoint;
pub mod cli;
pub mod kafka;
pub mod line;
pub mod partitioner;
pub mod producer;
pub mod recovery;
pub mod redis_conn;
pub mod request_id;
pub mod store;
pub mod telemetry;
pub mod topics;
pub mod wire;

pub use partitioner::Partitioner;
pub use store::{Store, StoreError};
pub use topics::Topics;
pub use wire::{DecisionResult, IssueRequest, Outcome};
