//! `coupon-lab`: parse the flags, set up logging, run, and exit 0 (pass),
//! 1 (a correctness figure is not zero) or 2 (could not run).

use std::process::ExitCode;

use clap::Parser;
use couponrush_core::telemetry::{init_tracing_with, shutdown_signal};
use couponrush_lab::{Cli, Command};
use couponrush_loadgen::Verdict;

// Many small allocations per request, from the runtime and librdkafka
// threads at once: mimalloc keeps them thread-local.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The load generator's output is its report; logs stay at warnings
    // unless RUST_LOG asks for more.
    // The experiments dead-letter and redeliver on purpose: the issuers'
    // warning per dead letter or failed commit is the expected result there,
    // shown in the table instead.
    let filter = match cli.command {
        Command::Experiment(_) | Command::Experiments(_) | Command::Dlq(_) => {
            "warn,rdkafka=error,librdkafka=error,couponrush_issuer::worker=error"
        }
        _ => "warn,rdkafka=error,librdkafka=error",
    };
    init_tracing_with(cli.log.log_json, filter);
    match couponrush_lab::main(cli, shutdown_signal()).await {
        Ok(Verdict::Pass) => ExitCode::SUCCESS,
        Ok(Verdict::Fail) => ExitCode::from(1),
        Err(e) => {
            eprintln!("coupon-lab: {e}");
            ExitCode::from(2)
        }
    }
}
