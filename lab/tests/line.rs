//! `coupon-lab demo --line` end to end, small, with both line backends (the
//! Kafka line on the demo's mock cluster, the Redis line on the shared
//! redis-server at `REDIS_URL`): clients join as a burst, a fifth walk away
//! and lapse, the rest are admitted in join order and issue; nobody is
//! admitted twice or skipped while polling, and the drop's audit is clean.

use clap::Parser;
use couponrush_lab::demo::line_drop;
use couponrush_lab::{Cli, Command};
use tokio_util::sync::CancellationToken;

async fn line_run(backend: &str) {
    let redis = couponrush_harness::shared_redis_url();
    let cli = Cli::parse_from([
        "coupon-lab",
        "demo",
        "--line",
        "--line-backend",
        backend,
        "--line-redis",
        &redis,
        "--partitions",
        "2",
        "--issuers",
        "1",
        "--stock",
        "300",
        "--joins",
        "3000",
        "--abandon",
        "0.2",
        "--admit-rate",
        "500",
        // Short lifetimes, so that walking away lapses within the run.
        "--ticket-ttl",
        "3s",
        "--admission-window",
        "5s",
        "--line-duration",
        "60s",
        "--quiet",
        "--no-raw",
    ]);
    let Command::Demo(args) = cli.command else {
        panic!("parsed as a demo");
    };
    let report = line_drop(&args, CancellationToken::new())
        .await
        .expect("the line run completes");
    let l = &report.line;
    assert_eq!(l.backend, backend);
    assert_eq!(l.joined, 3000, "{}", report.text());
    assert_eq!(l.order_inversions, 0, "{}", report.text());
    assert_eq!(l.admitted_twice, 0, "{}", report.text());
    assert_eq!(l.skipped_not_lapsed, 0, "{}", report.text());
    assert_eq!(l.unserved, 0, "{}", report.text());
    assert!(l.abandoned > 400, "{}", report.text());
    assert!(l.lapsed > 0, "walking away lapses: {}", report.text());
    assert!(l.wait_error.count > 2000, "{}", report.text());
    assert!(report.drop.passed, "{}", report.text());
    assert_eq!(report.drop.issued, 300, "{}", report.text());
    assert!(report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_on_kafka_admits_in_join_order_and_the_drop_audits_clean() {
    line_run("kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_on_redis_admits_in_join_order_and_the_drop_audits_clean() {
    line_run("redis").await;
}
