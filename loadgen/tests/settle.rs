//! Requests in doubt settled against the log, on librdkafka's mock cluster:
//! a request in the requests topic was written (and must be decided), one
//! that is not never was.

use std::collections::HashSet;
use std::time::Duration;

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::IssueRequest;
use couponrush_loadgen::observe::written_requests;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use uuid::Uuid;

#[tokio::test]
async fn a_request_in_doubt_is_written_only_if_the_log_holds_it() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("req", 2, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let kafka = KafkaSettings::new(brokers.clone());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let send = |id: u128, user: &str, partition: i32| {
        let req = IssueRequest::new(Uuid::from_u128(id), "e".into(), user.into(), 1);
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to("req")
                        .payload(&req.to_bytes())
                        .partition(partition),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
        }
    };
    // Before the run: not this run's.
    send(3, "early", 0).await;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let from: Vec<(i32, i64)> = (0..2)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks("req", p, Duration::from_secs(5))
                .unwrap();
            (p, high)
        })
        .collect();
    send(1, "alice", 0).await;
    send(2, "bob", 1).await;
    send(3, "early", 1).await;
    producer
        .send(
            FutureRecord::<(), _>::to("req")
                .payload("poison")
                .partition(0),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let ids: HashSet<Uuid> = [1, 3, 99].into_iter().map(Uuid::from_u128).collect();
    let found = tokio::task::spawn_blocking(move || {
        written_requests(&kafka, "req", &from, &ids, Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[&Uuid::from_u128(1)], "alice");
    assert_eq!(
        found[&Uuid::from_u128(3)],
        "early",
        "written again during the run"
    );
    assert!(!found.contains_key(&Uuid::from_u128(2)), "not in doubt");
    assert!(!found.contains_key(&Uuid::from_u128(99)), "never written");
}
