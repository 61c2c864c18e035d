//! Recovery is fenced: a recoverer whose lock expired (a slow log, a paused
//! process) must not write over a store someone else has rebuilt since, and
//! on which decisions have been made. Runs against librdkafka's mock cluster
//! and a private redis-server (the test clears and takes the global epoch
//! and recovery lock, which the shared server's other users must not see).

use std::sync::Arc;
use std::time::{Duration, Instant};

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::recovery::Recovery;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{BatchVerdict, EventBatch, Pending, Store};
use couponrush_core::wire::{now_micros, EventRecord, Outcome, WIRE_VERSION};
use couponrush_core::{DecisionResult, Topics};
use couponrush_harness::{MockKafka, RedisServer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

/// A private redis-server, stopped and its directory removed on drop.
struct PrivateRedis {
    server: Option<RedisServer>,
    dir: std::path::PathBuf,
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.server.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn private_redis() -> PrivateRedis {
    let dir = std::env::temp_dir().join(format!("couponrush-fence-{}", Uuid::new_v4()));
    let server = RedisServer::start(&dir, false).expect("redis-server on the PATH");
    PrivateRedis {
        server: Some(server),
        dir,
    }
}

fn topics() -> Topics {
    Topics {
        requests: "t.requests".into(),
        outcomes: "t.outcomes".into(),
        dlq: "t.dlq".into(),
        events: "t.events".into(),
        checkpoints: "t.checkpoints".into(),
        compensations: "t.compensations".into(),
    }
}

async fn produce(kafka: &KafkaSettings, topic: &str, key: &str, payload: &[u8]) {
    let producer: FutureProducer = kafka.producer_config("t", 100).create().unwrap();
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

fn recovery(
    kafka: &KafkaSettings,
    store: Arc<dyn Store>,
    owner: &str,
    fence: Duration,
) -> Recovery {
    Recovery {
        kafka: kafka.clone(),
        topics: topics(),
        store,
        fence,
        retention: Duration::from_secs(3600),
        owner: owner.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recoverer_whose_lock_expired_does_not_overwrite_later_decisions() {
    let mock = MockKafka::start(1).unwrap();
    let t = topics();
    for topic in [&t.events, &t.outcomes] {
        mock.create_topic(topic, 1, 1).unwrap();
    }
    let kafka = KafkaSettings::new(mock.brokers());
    let redis = private_redis();
    let url = redis.server.as_ref().unwrap().url();
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&url, Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // The log: event "e" (stock 5), one coupon issued before the loss.
    let event = EventRecord {
        v: WIRE_VERSION,
        event_id: "e".into(),
        stock: 5,
        per_user_limit: 1,
        generation: 1,
        written_at: now_micros(),
        claim_window_us: 0,
        stock_buckets: 1,
    };
    produce(&kafka, &t.events, "e", &event.to_bytes()).await;
    let first_coupon = Outcome {
        v: WIRE_VERSION,
        request_id: Uuid::now_v7(),
        event_id: "e".into(),
        user_id: "a".into(),
        result: DecisionResult::Issued,
        issued_rank: Some(1),
        partition: 0,
        offset: 0,
        decided_at: now_micros(),
        replay: false,
        decision_seq: 1,
        accepted_at: now_micros(),
        generation: 1,
        hold_until: None,
    };
    produce(&kafka, &t.outcomes, "e", &first_coupon.to_bytes()).await;

    // The first recoverer takes the lock, then waits out a long fence...
    let first = recovery(&kafka, store.clone(), "first", Duration::from_secs(8));
    let first = tokio::spawn(async move { first.ensure_ready(Duration::from_secs(60)).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let holder: Option<String> = redis::cmd("GET")
            .arg("cr:recovery")
            .query_async(&mut raw)
            .await
            .unwrap();
        if holder.as_deref() == Some("first") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first recoverer took no lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...during which its lock expires (a pause, a log slower than the lock).
    let _: () = redis::cmd("PEXPIRE")
        .arg("cr:recovery")
        .arg(1)
        .query_async(&mut raw)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // A second recoverer takes over and rebuilds the store...
    let second = recovery(&kafka, store.clone(), "second", Duration::ZERO);
    let done = second.ensure_ready(Duration::from_secs(30)).await.unwrap();
    assert!(done.is_some(), "the second recoverer rebuilt the store");
    // ...on which decisions are made.
    let batch = EventBatch {
        event_id: "e".into(),
        requests: ["b", "c"]
            .iter()
            .map(|u| Pending {
                request_id: Uuid::now_v7(),
                user_id: u.to_string(),
            })
            .collect(),
        actions: Vec::new(),
    };
    let verdict = store.decide(&[batch], now_micros()).await.unwrap();
    let BatchVerdict::Decided { decisions, .. } = &verdict[0] else {
        panic!("the rebuilt store does not know the event");
    };
    let ranks: Vec<Option<u32>> = decisions.iter().map(|d| d.issued_rank).collect();
    assert_eq!(ranks, [Some(2), Some(3)]);
    let epoch = store.epoch().await.unwrap();

    // The first recoverer wakes up: it must not restore what it read.
    let outcome = first.await.unwrap();
    let ledger = store.ledger("e").await.unwrap().unwrap();
    assert_eq!(
        (ledger.coupons.len(), ledger.state.remaining),
        (3, 2),
        "the decisions made after the second recovery survive (first recoverer: {outcome:?})"
    );
    assert_eq!(
        store.epoch().await.unwrap(),
        epoch,
        "the epoch is the second recovery's"
    );
    assert!(
        matches!(outcome, Ok(None)),
        "the first recoverer did not recover: {outcome:?}"
    );
}
