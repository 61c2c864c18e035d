//! `coupon-chaos`: parse the flags, set up logging, run the scenarios, and
//! exit 0 (every scenario passed), 1 (one failed) or 2 (could not run).

use std::process::ExitCode;

use clap::Parser;
use couponrush_chaos::Cli;
use couponrush_core::telemetry::init_tracing_with;
use couponrush_loadgen::Verdict;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing_with(cli.log.log_json, "warn,rdkafka=error,librdkafka=error");
    match couponrush_chaos::chaos(cli.chaos).await {
        Ok(Verdict::Pass) => ExitCode::SUCCESS,
        Ok(Verdict::Fail) => ExitCode::from(1),
        Err(e) => {
            eprintln!("coupon-chaos: {e}");
            ExitCode::from(2)
        }
    }
}
