//! The notifier in-process against a real broker (librdkafka's mock
//! cluster) and a real HTTP endpoint on loopback (the lab's receiver):
//! every final coupon reaches the endpoint under its key, nothing else
//! does, through an outage, and a coupon the endpoint never takes is
//! dead-lettered with its reason while the rest go on.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{eventually, ledger, Setup};
use couponrush_core::wire::dlq_headers;
use couponrush_harness::TopicReader;
use couponrush_lab::receiver::{Receiver, ReceiverHandle};
use couponrush_notifier::dead_letter::headers;
use couponrush_notifier::{run_probed, Config, Probe, Totals};
use tokio_util::sync::CancellationToken;

async fn receiver() -> ReceiverHandle {
    Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("the receiver listens")
}

/// A notifier running in this process.
struct Running {
    probe: Probe,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<Totals, couponrush_notifier::NotifierError>>,
}

impl Running {
    fn start(config: Config) -> Self {
        let probe = Probe::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_probed(config, stop.clone(), probe.clone()));
        Self { probe, stop, task }
    }

    async fn stop(self) -> Totals {
        self.stop.cancel();
        self.task
            .await
            .expect("the notifier task")
            .expect("the notifier ran")
    }
}

/// Keys the receiver acknowledged.
fn keys(r: &ReceiverHandle) -> HashSet<String> {
    r.counts().into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_final_coupon_is_delivered_once_by_key_and_nothing_else() {
    let setup = Setup::new();
    let ledger = ledger(&setup.event, 400);
    setup.produce(&ledger).await;
    let r = receiver().await;
    let n = Running::start(setup.config(&r.url()));
    let total = ledger.records.len() as u64;
    let all_read = eventually(Duration::from_secs(60), || async {
        let t = n.probe.totals();
        t.read >= total && t.delivered + t.skipped >= total
    })
    .await;
    let totals = n.stop().await;
    assert!(all_read, "not everything was handled in 60 s: {totals:?}");

    let expected: HashSet<String> = ledger.expected.keys().cloned().collect();
    let got = keys(&r);
    let missing: Vec<_> = expected.difference(&got).collect();
    let extra: Vec<_> = got.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, not final but delivered {extra:?}"
    );
    assert!(ledger.never.iter().all(|k| r.body(k).is_none()));
    for (key, state) in &ledger.expected {
        assert_eq!(r.body(key).unwrap()["state"], *state, "{key}");
    }
    let stats = r.stats();
    // Replays are delivered again under the same key: duplicates at the
    // wire, one coupon at the endpoint.
    assert_eq!(stats.unique_keys, expected.len() as u64);
    assert_eq!(stats.duplicates, ledger.replays as u64, "{stats:?}");
    assert_eq!(totals.skipped, ledger.skipped as u64, "{totals:?}");
    assert_eq!(totals.delivered, ledger.final_records() as u64);
    assert_eq!(totals.replayed, ledger.replays as u64);
    assert_eq!(totals.dead_lettered, 0);
    assert!(
        eventually(Duration::from_secs(10), || async {
            setup.behind().await.iter().all(|b| *b == 0)
        })
        .await,
        "everything handled is committed at shutdown: {:?}",
        setup.behind().await
    );
    eprintln!(
        "{} records, {} final coupons, {} skipped: {stats:?}",
        total,
        expected.len(),
        totals.skipped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_outage_loses_nothing_and_counts_the_duplicates() {
    let setup = Setup::new();
    let ledger = ledger(&setup.event, 240);
    setup.produce(&ledger).await;
    let r = receiver().await;
    // First slow (each answer after the notifier gave up: acted on, then
    // retried), then down, then back.
    r.stall(Duration::from_millis(300));
    let mut config = setup.config(&r.url());
    config.request_timeout = Duration::from_millis(100);
    let n = Running::start(config);
    assert!(
        eventually(Duration::from_secs(30), || async { r.stats().received > 0 }).await,
        "the notifier reached the endpoint"
    );
    r.fail_for(Duration::from_secs(3));
    r.stall(Duration::ZERO);
    let expected: HashSet<String> = ledger.expected.keys().cloned().collect();
    let complete = eventually(Duration::from_secs(60), || async {
        r.stats().unique_keys >= expected.len() as u64
    })
    .await;
    let totals = n.stop().await;
    let stats = r.stats();
    assert!(complete, "60 s after the outage: {stats:?} {totals:?}");
    assert_eq!(keys(&r), expected, "0 lost, nothing but final coupons");
    assert!(stats.refused > 0, "the outage was seen: {stats:?}");
    assert!(
        stats.duplicates > ledger.replays as u64,
        "answers the notifier gave up on come back as duplicates at the wire: {stats:?}"
    );
    assert_eq!(totals.dead_lettered, 0);
    eprintln!("outage: {stats:?}, {totals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_the_endpoint_never_takes_is_dead_lettered_with_its_reason_and_the_rest_go_on() {
    let setup = Setup::new();
    let first = ledger(&setup.event, 40);
    setup.produce(&first).await;
    let r = receiver().await;
    r.fail_for(Duration::from_secs(3600));
    let mut config = setup.config(&r.url());
    config.retry.max_attempts = 3;
    let n = Running::start(config);
    let finals = first.final_records() as u64;
    assert!(
        eventually(Duration::from_secs(60), || async {
            n.probe.totals().dead_lettered >= finals
        })
        .await,
        "every delivery gave up after 3 attempts: {:?}",
        n.probe.totals()
    );
    // The endpoint comes back: the notifier went on past the dead letters
    // and delivers what comes next; the dead-lettered are not retried.
    r.fail_for(Duration::ZERO);
    let event2 = format!("{}-next", setup.event);
    let second = ledger(&event2, 40);
    setup.produce(&second).await;
    let expected: HashSet<String> = second.expected.keys().cloned().collect();
    assert!(
        eventually(Duration::from_secs(60), || async { keys(&r) == expected }).await,
        "after the dead letters, the next coupons are delivered: {:?}",
        r.stats()
    );
    let totals = n.stop().await;
    assert_eq!(totals.dead_lettered, finals, "{totals:?}");
    assert_eq!(r.stats().refused, 3 * finals, "3 attempts each");

    let reader = TopicReader::new(&setup.brokers, &setup.dlq).unwrap();
    let mut letters = Vec::new();
    reader.read_until(
        &mut letters,
        Duration::from_secs(20),
        |raw| (raw.headers.clone(), raw.payload.clone()),
        |all| all.len() as u64 >= finals,
    );
    assert_eq!(letters.len() as u64, finals);
    let mut dead_keys = HashMap::new();
    for (h, payload) in &letters {
        assert_eq!(h[dlq_headers::REASON], "exhausted");
        assert_eq!(h[dlq_headers::DETAIL], "last attempt: HTTP 503");
        assert_eq!(h[headers::ATTEMPTS], "3");
        assert_eq!(h[dlq_headers::ORIGINAL_TOPIC], setup.outcomes);
        assert!(h[dlq_headers::ORIGINAL_OFFSET].parse::<i64>().is_ok());
        assert!(h[dlq_headers::ORIGINAL_PARTITION].parse::<i32>().is_ok());
        // The record as it was read, so it can be redriven.
        assert!(couponrush_core::wire::LedgerRecord::parse(payload).is_ok());
        *dead_keys
            .entry(h[headers::IDEMPOTENCY_KEY].clone())
            .or_insert(0) += 1;
    }
    let first_keys: HashSet<String> = first.expected.keys().cloned().collect();
    assert_eq!(
        dead_keys.keys().cloned().collect::<HashSet<_>>(),
        first_keys
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_dead_lettered_at_once_without_retries() {
    let setup = Setup::new();
    let ledger = ledger(&setup.event, 8);
    setup.produce(&ledger).await;
    let r = receiver().await;
    // A path the receiver does not serve: 404, which no retry will change.
    let url = format!("http://{}/nowhere", r.addr());
    let n = Running::start(setup.config(&url));
    let finals = ledger.final_records() as u64;
    let done = eventually(Duration::from_secs(30), || async {
        n.probe.totals().dead_lettered >= finals
    })
    .await;
    let totals = n.stop().await;
    assert!(done, "{totals:?}");
    assert_eq!(totals.attempts, finals, "one attempt each: {totals:?}");
    let reader = TopicReader::new(&setup.brokers, &setup.dlq).unwrap();
    let mut letters = Vec::new();
    reader.read_until(
        &mut letters,
        Duration::from_secs(20),
        |raw| raw.headers.clone(),
        |all| all.len() as u64 >= finals,
    );
    assert!(letters
        .iter()
        .all(|h| h[dlq_headers::REASON] == "refused" && h[dlq_headers::DETAIL].contains("404")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_mid_run_drains_or_abandons_and_loses_nothing() {
    let setup = Setup::new();
    let ledger = ledger(&setup.event, 800);
    setup.produce(&ledger).await;
    let r = receiver().await;
    // Slow answers (about 80 a second), so deliveries are still in flight
    // when the group changes a few seconds in.
    r.stall(Duration::from_millis(50));
    let mut config = setup.config(&r.url());
    config.max_in_flight = 4;
    config.drain_timeout = Duration::from_millis(10);
    let a = Running::start(config.clone());
    let expected: HashSet<String> = ledger.expected.keys().cloned().collect();
    assert!(
        eventually(Duration::from_secs(60), || async {
            r.stats().unique_keys >= 20
        })
        .await,
        "the first notifier delivers"
    );
    // A second member joins: the first gives up partitions mid-delivery.
    let b = Running::start(config);
    let both = eventually(Duration::from_secs(60), || async {
        a.probe.assigned() > 0 && b.probe.assigned() > 0
    })
    .await;
    r.stall(Duration::ZERO);
    let complete = eventually(Duration::from_secs(60), || async {
        r.stats().unique_keys >= expected.len() as u64
            && setup.behind().await.iter().all(|x| *x == 0)
    })
    .await;
    let (ta, tb) = (a.stop().await, b.stop().await);
    assert!(both, "the group split the partitions: {ta:?} {tb:?}");
    assert!(complete, "{:?} {ta:?} {tb:?}", r.stats());
    assert_eq!(keys(&r), expected, "0 lost, nothing but final coupons");
    assert!(tb.delivered > 0, "the new member delivered its share");
    eprintln!(
        "rebalance: first {ta:?}, second {tb:?}, receiver {:?}",
        r.stats()
    );
}
