//! `coupon-api`: parse the flags, set up logging, run until ctrl-c or SIGTERM.

use clap::Parser;
use couponrush_api::Cli;
use couponrush_core::telemetry::{init_tracing, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log.log_json);
    couponrush_api::run(cli, shutdown_signal()).await?;
    Ok(())
}
