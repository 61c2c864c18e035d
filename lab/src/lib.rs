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
//! - [`bench`]: the issuer stage from a pre-filled topic, and a bare HTTP
//!   server (the ceiling the api is compared with).
//! - [`LabError`]: what stops a command, saying what to do.

pub mod bench;
pub mod demo;
pub mod deployment;
mod error;
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
    /// A bare HTTP server answering like the api but doing nothing (a benchmark ceiling).
    Bare(bench::BareArgs),
}

/// Dispatches a parsed command line; the exit verdict or a message for the user.
pub async fn main(cli: Cli, cancel: CancellationToken) -> Result<Verdict, LabError> {
    match cli.command {
        Command::Demo(args) => demo::demo(args, cancel).await,
        Command::Sweep(args) => sweep::sweep(args, cancel).await,
        Command::BenchIssuer(args) => bench::bench_issuer(args, cancel).await,
        Command::Bare(args) => bench::bare(args, cancel).await.map(|_| Verdict::Pass),
    }
}
