//! Deliveries per second from the ledger to the lab's receiver on
//! loopback, through a real broker (the mock cluster): the notifier's
//! ceiling when the endpoint answers at once. A measurement that also
//! checks its run (every final coupon delivered by key, nothing else).
//!
//! `NOTIFIER_BENCH_COUPONS=20000 cargo test --release -p couponrush-notifier
//! --test throughput -- --nocapture` prints the figure; the default size is
//! small so the suite stays quick.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{eventually, ledger, Setup};
use couponrush_lab::receiver::Receiver;
use couponrush_notifier::{run_probed, Probe};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_per_second_to_a_loopback_receiver() {
    let n: usize = std::env::var("NOTIFIER_BENCH_COUPONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let setup = Setup::new();
    let ledger = ledger(&setup.event, n);
    setup.produce(&ledger).await;
    let r = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let probe = Probe::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_probed(
        setup.config(&r.url()),
        stop.clone(),
        probe.clone(),
    ));
    // From the first delivery (the group has formed) to the last.
    assert!(
        eventually(Duration::from_secs(60), || async { r.stats().received > 0 }).await,
        "no delivery in 60 s"
    );
    let started = Instant::now();
    let at_start = r.stats().acknowledged;
    let finals = ledger.final_records() as u64;
    let done = eventually(Duration::from_secs(300), || async {
        r.stats().acknowledged >= finals
    })
    .await;
    let took = started.elapsed();
    stop.cancel();
    let totals = task.await.unwrap().unwrap();
    assert!(done, "not done in 300 s: {:?}", r.stats());
    let expected: HashSet<String> = ledger.expected.keys().cloned().collect();
    assert_eq!(r.counts().into_keys().collect::<HashSet<_>>(), expected);
    let per_s = (finals - at_start) as f64 / took.as_secs_f64().max(1e-6);
    eprintln!(
        "{} ledger records, {finals} deliveries ({} coupons) in {took:?} after the first: \
         {per_s:.0} deliveries/s (max in flight {}); {totals:?}",
        ledger.records.len(),
        expected.len(),
        couponrush_notifier::Config::local("b", "http://x/").max_in_flight
    );
}
