//! A store rebuild can take longer than `max.poll.interval.ms` (the fence,
//! then reading the log). A member that stops polling that long is put out
//! of its group by its own client, and its partitions move mid-recovery; so
//! an issuer that recovers keeps polling its paused consumer meanwhile.
//!
//! One in-process issuer on the mock cluster, a private redis-server whose
//! state is flushed mid-run, a fence of 9 s against a poll interval of 6 s:
//! the issuer must keep its partitions throughout, and decide again after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use couponrush_core::cli::parse_ignoring_env;
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::partitioner::Partitioner;
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::definition::create_event;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{EventSpec, Store};
use couponrush_core::{IssueRequest, Topics};
use couponrush_harness::{MockKafka, RedisServer};
use couponrush_issuer::{run_issuer_probed, Cli, Probe};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_recovering_longer_than_its_poll_interval_keeps_its_partitions() {
    let mock = MockKafka::start(1).unwrap();
    let topics = Topics::default();
    for spec in topics.specs(2, 1) {
        mock.create_topic(&spec.name, spec.partitions, 1).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("couponrush-polls-{}", Uuid::new_v4()));
    let redis = RedisServer::start(&dir, false).expect("redis-server on the PATH");
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&redis.url(), Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    let kafka = KafkaSettings::new(mock.brokers());
    let producer = RequestProducer::new(
        &kafka,
        topics.requests.clone(),
        Partitioner::Spread,
        2,
        1000,
    )
    .unwrap();

    let config = parse_ignoring_env::<Cli>(&[
        "coupon-issuer",
        "--brokers",
        &mock.brokers(),
        "--publish-timeout",
        "2s",
        "--recovery-fence",
        "9s",
        "--session-timeout",
        "3s",
        "--kafka-opt",
        "max.poll.interval.ms=6000",
    ])
    .config();
    let probe = Probe::default();
    let shutdown = CancellationToken::new();
    let issuer = tokio::spawn(run_issuer_probed(
        config,
        store.clone(),
        shutdown.clone(),
        probe.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe.assigned() == 0 {
        if issuer.is_finished() {
            panic!("the issuer stopped: {:?}", issuer.await);
        }
        assert!(Instant::now() < deadline, "the issuer never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spec = EventSpec {
        stock: 100,
        per_user_limit: 1,
        claim_window_us: 0,
        stock_buckets: 1,
    };
    create_event(&*store, &producer, &topics.events, "polls", spec)
        .await
        .unwrap();
    let send = |user: &str| IssueRequest::new(Uuid::now_v7(), "polls".into(), user.into(), 1);
    producer.send(&send("a")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.event("polls").await.unwrap().unwrap().remaining == 100 {
        assert!(
            Instant::now() < deadline,
            "the first request was never decided"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The store loses its state; the next request sends the issuer into a
    // recovery that waits out a fence longer than its poll interval.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    producer.send(&send("b")).await.unwrap();
    let started = Instant::now();
    let mut lowest = usize::MAX;
    let mut decided_again = false;
    while started.elapsed() < Duration::from_secs(25) {
        lowest = lowest.min(probe.assigned());
        if started.elapsed() > Duration::from_secs(15)
            && store
                .event("polls")
                .await
                .ok()
                .flatten()
                .is_some_and(|e| e.remaining == 98)
        {
            decided_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    let _ = issuer.await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        lowest > 0,
        "the issuer lost its partitions while it recovered (assigned fell to {lowest})"
    );
    assert!(
        decided_again,
        "after the rebuild, both requests are decided (one restored from the log)"
    );
}
