//! `coupon-notifier`: parse the flags, set up logging, run until ctrl-c or SIGTERM.

use clap::Parser;
use couponrush_core::telemetry::{init_tracing, shutdown_signal};
use couponrush_notifier::Cli;

// Deliveries allocate small buffers on many runtime threads at once.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log.log_json);
    couponrush_notifier::run(cli.config(), shutdown_signal()).await?;
    Ok(())
}
