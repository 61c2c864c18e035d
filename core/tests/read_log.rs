//! Recovery reads whole topics back; it must see every acknowledged record,
//! including the ones acknowledged just before it started reading.

use std::time::Duration;

use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::recovery::read_topic;
use couponrush_core::topics::TopicSpec;
use couponrush_harness::{Tansu, TansuStorage};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_topic_sees_every_acknowledged_record() {
    let tansu =
        Tansu::start(TansuStorage::Memory, None).expect("tansu: run scripts/dev-up --install-only");
    let kafka = KafkaSettings::new(tansu.brokers());
    let topic = "read-back";
    ensure_topics(
        &kafka,
        &[TopicSpec {
            name: topic.into(),
            partitions: 8,
            replication: 1,
            configs: vec![],
        }],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let producer: FutureProducer = kafka.producer_config("t", 100_000).create().unwrap();
    for round in 0..5u32 {
        let payloads: Vec<String> = (0..400u32).map(|i| format!("{round}-{i}")).collect();
        let futures: Vec<_> = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| {
                producer
                    .send_result(
                        FutureRecord::<(), str>::to(topic)
                            .payload(payload.as_str())
                            .partition((i % 8) as i32),
                    )
                    .map_err(|(e, _)| e)
                    .expect("queued")
            })
            .collect();
        for f in futures {
            f.await.unwrap().unwrap();
        }
        let expected = u64::from(400 * (round + 1));
        let (k, t) = (kafka.clone(), topic.to_string());
        let mut seen = 0u64;
        let read = tokio::task::spawn_blocking(move || read_topic(&k, &t, |_| {}))
            .await
            .unwrap()
            .unwrap();
        seen += read;
        assert_eq!(
            seen, expected,
            "round {round}: every acknowledged record is read back"
        );
    }
}
