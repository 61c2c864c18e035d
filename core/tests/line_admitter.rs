//! The admitter's pace: it holds the room's rate, slows in proportion when
//! the issuers lag (the lag as a probe measures it), and measures the rate
//! it holds. Rates are checked as upper bounds over measured elapsed time
//! (the token bucket caps them whatever the scheduling) and progress with
//! generous deadlines: a busy machine slows the test, never fails it. The lag of a real consumer group is read from the broker
//! (librdkafka's mock cluster) as high watermark minus committed offset.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use couponrush_core::kafka::{acknowledged, KafkaSettings};
use couponrush_core::line::admitter::{GroupLag, LagProbe};
use couponrush_core::line::redis::RedisLine;
use couponrush_core::line::{Admitter, Line, RoomPolicy};
use couponrush_core::wire::now_micros;
use couponrush_harness::MockKafka;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A lag the test sets.
struct SetLag(AtomicU64);

#[async_trait]
impl LagProbe for SetLag {
    async fn lag(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_slows_in_proportion_to_the_issuer_lag() {
    let line: Arc<dyn Line> = Arc::new(
        RedisLine::connect(&couponrush_harness::shared_redis_url())
            .await
            .expect("the shared redis-server at REDIS_URL is up"),
    );
    let event = format!("la-{}", Uuid::new_v4().simple());
    line.open(
        &event,
        &RoomPolicy {
            max_active: None,
            rate_per_sec: Some(200.0),
            ticket_ttl: Duration::from_secs(60),
            admission_window: Duration::from_secs(60),
            slow_above_lag: Some(1_000),
        },
    )
    .await
    .unwrap();
    for i in 0..3_000 {
        line.join(&event, &format!("u{i}"), Uuid::new_v4(), now_micros())
            .await
            .unwrap();
    }
    // Four times the limit: a quarter of the rate.
    let lag = Arc::new(SetLag(AtomicU64::new(4_000)));
    let admitter = Admitter::new(line.clone(), &event, Some(lag.clone()));
    let gauges = admitter.gauges();
    let stop = CancellationToken::new();
    let task = tokio::spawn(admitter.run(stop.clone()));
    until(|| gauges.snapshot().effective_rate == Some(50.0)).await;
    assert_eq!(gauges.snapshot().lag, Some(4_000));
    let (slowed, secs) = admissions(&*line, &event, 40).await;
    // The bucket bounds admissions from above, whatever the scheduling:
    // at most rate × elapsed plus what it may save up (a fifth of a
    // second's worth) and one.
    assert!(
        slowed as f64 <= 50.0 * secs + 11.0,
        "{slowed} admitted in {secs:.2} s at 50/s"
    );
    lag.0.store(0, Ordering::SeqCst);
    until(|| gauges.snapshot().effective_rate == Some(200.0)).await;
    let (full, secs) = admissions(&*line, &event, 100).await;
    assert!(
        full as f64 <= 200.0 * secs + 41.0,
        "{full} admitted in {secs:.2} s at 200/s"
    );
    // The measured rate: over windows of a second or more, never above the
    // rate plus what the bucket saves up.
    let start = Instant::now();
    let measured = loop {
        let m = line.stats(&event).await.unwrap().measured_rate;
        if m > 0.0 {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never measured");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    task.await.unwrap();
    assert!(measured <= 240.0, "measured {measured}");
}

/// Waits (bounded, generously) until `cond` holds.
async fn until(cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) for at least `n` more admissions; how many were seen
/// and over how long (an upper bound of the time they took).
async fn admissions(line: &dyn Line, event: &str, n: u64) -> (u64, f64) {
    let start = Instant::now();
    let before = line.stats(event).await.unwrap().admitted;
    loop {
        let now = line.stats(event).await.unwrap().admitted;
        if now >= before + n {
            return (now - before, start.elapsed().as_secs_f64());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} of {n} admitted in 30 s",
            now - before
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_lag_is_the_distance_from_the_committed_offsets() {
    let mock = MockKafka::start(1).unwrap();
    mock.create_topic("t.requests", 2, 1).unwrap();
    let kafka = KafkaSettings::new(mock.brokers());
    let producer: FutureProducer = kafka.producer_config("t", 1000).create().unwrap();
    for (partition, n) in [(0, 10), (1, 6)] {
        for i in 0..n {
            let key = format!("{i}");
            acknowledged(
                producer
                    .send_result(
                        FutureRecord::to("t.requests")
                            .partition(partition)
                            .key(&key)
                            .payload("x"),
                    )
                    .unwrap(),
            )
            .await
            .unwrap();
        }
    }
    let probe = GroupLag::new(&kafka, "issuers", "t.requests").unwrap();
    assert_eq!(probe.lag().await, Some(16), "nothing committed: all of it");
    let group: BaseConsumer = kafka
        .client_config("t-group")
        .set("group.id", "issuers")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("t.requests", 0, Offset::Offset(4))
        .unwrap();
    tpl.add_partition_offset("t.requests", 1, Offset::Offset(6))
        .unwrap();
    group.commit(&tpl, CommitMode::Sync).unwrap();
    assert_eq!(probe.lag().await, Some(6));
}
