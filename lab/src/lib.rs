//! # couponrush-lab
//!
//! Everything that starts a deployment itself, so a user can see a drop with
//! nothing installed, compare designs, or measure one stage alone. Each
//! command builds its deployment from one [`deployment::Deployment`] type
//! and measures it with the instrument (`couponrush-loadgen`), so what the
//! lab reports is what `coupon-loadgen run` would report against the same
//! deployment.
//!
//! # Layout
//! - [`Cli`]: the subcommands; [`main`] dispatches them.
//! - [`deployment`]: the api and N issuers over an embedded or real Kafka
//!   and a store, started and stopped as one.
//! - [`demo`]: the main job on a fresh machine.
//! - [`sweep`]: the same drop over partition counts, issuer counts and
//!   partitioners, with medians, a table and a chart.
//! - [`experiment`]: the field note's rules, each run both ways (the safe
//!   arm and its `--unsafe-…` twin), with a verdict; `dlq redrive`.
//! - [`bench`]: the issuer stage from a pre-filled topic, the store alone
//!   with the same batches (the ceiling the issuer is compared with), and a
//!   bare HTTP server (the ceiling the api is compared with), bare or
//!   producing as the api does (its real ceiling).
//! - [`capacity`]: CPU-seconds per 1,000 requests per stage, from the
//!   processes' own accounting during drops at fixed rates, and the plan
//!   they imply (`docs/CAPACITY.md`).
//! - [`receiver`]: the webhook endpoint `coupon-notifier` delivers to,
//!   counting deliveries by key; it can be told to fail or stall.
//! - [`LabError`]: what stops a command, saying what to do.

pub mod bench;
pub mod capacity;
pub mod demo;
pub mod deployment;
mod error;
pub mod experiment;
pub mod receiver;
pub mod sweep;

pub use error::LabError;

use clap::{Parser, Subcommand};
use couponrush_core::cli::LogArgs;
use couponrush_loadgen::Verdict;
use tokio_util::sync::CancellationToken;

/// `coupon-lab`: a deployment of its own, driven and audited.
#[derive(Debug, Parser)]
#[command(name = "coupon-lab", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A whole drop with nothing installed: embedded Kafka, api, issuers, store.
    Demo(demo::DemoArgs),
    /// Run the same drop over partition counts, issuer counts and partitioners.
    Sweep(sweep::SweepArgs),
    /// Measure issuer throughput from a pre-filled requests topic.
    BenchIssuer(bench::BenchIssuerArgs),
    /// The issuer's ceiling: bench-issuer's batches sent straight to Redis, no Kafka.
    BenchStore(bench::BenchStoreArgs),
    /// A bare HTTP server answering like the api but doing nothing, or (--produce) only producing as it does (benchmark ceilings).
    Bare(bench::BareArgs),
    /// CPU-seconds per 1,000 requests per stage, measured during drops at fixed rates, and what that implies at 10k, 100k and 1M requests/s.
    Capacity(capacity::CapacityArgs),
    /// One rule of the Kafka field note, run both ways (safe and unsafe), with a verdict.
    Experiment(experiment::ExperimentArgs),
    /// Every experiment built, one after the other.
    Experiments(experiment::ExperimentsArgs),
    /// The dead-letter topic: redrive its records once their cause is fixed.
    Dlq(experiment::dlq::DlqArgs),
    /// A webhook endpoint for coupon-notifier that counts deliveries by key and can fail or stall.
    Receiver(receiver::ReceiverArgs),
}

/// Dispatches a parsed command line; the exit verdict or a message for the user.
pub async fn main(cli: Cli, cancel: CancellationToken) -> Result<Verdict, LabError> {
    match cli.command {
        Command::Demo(args) => demo::demo(args, cancel).await,
        Command::Sweep(args) => sweep::sweep(args, cancel).await,
        Command::BenchIssuer(args) => bench::bench_issuer(args, cancel).await,
        Command::BenchStore(args) => bench::bench_store(args, cancel).await,
        Command::Bare(args) => bench::bare(args, cancel).await.map(|_| Verdict::Pass),
        Command::Capacity(args) => capacity::capacity(args, cancel).await,
        Command::Experiment(args) => experiment::experiment(args, cancel).await,
        Command::Experiments(args) => experiment::experiments(args, cancel).await,
        Command::Dlq(args) => experiment::dlq::dlq(args).await,
        Command::Receiver(args) => receiver::receiver(args, cancel).await,
    }
}
