//! `coupon-api`: parse the flags, set up logging, run until ctrl-c or SIGTERM.

use clap::Parser;
use couponrush_api::Cli;
use couponrush_core::telemetry::{init_tracing, shutdown_signal};

// Many small allocations per request, from the runtime and librdkafka
// threads at once: mimalloc keeps them thread-local.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log.log_json);
    couponrush_api::run(cli, shutdown_signal()).await?;
    Ok(())
}
