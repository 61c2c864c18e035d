//! Helpers shared by the issuer's integration tests: reading whole topics
//! back, and a small HTTP client for the api.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::Outcome;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

/// One record of a topic, as read back.
pub struct Raw {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// A reader of a whole topic from the beginning (no group, no commits).
pub struct TopicReader {
    consumer: BaseConsumer,
}

impl TopicReader {
    pub fn new(brokers: &str, topic: &str) -> Self {
        let kafka = KafkaSettings::new(brokers);
        let consumer: BaseConsumer = kafka
            .client_config("test-reader")
            .set("group.id", format!("reader-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let partitions = md.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Self { consumer }
    }

    /// Reads what arrives within `wait` (returns early when `wait` passes
    /// with nothing new).
    pub fn poll_for(&self, wait: Duration) -> Vec<Raw> {
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => out.push(Raw {
                    partition: m.partition(),
                    offset: m.offset(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                Some(Err(e)) => eprintln!("reader: {e}"),
                None => {}
            }
        }
        out
    }
}

/// Reads outcomes until `done` says so or `timeout` passes.
pub fn read_outcomes(
    reader: &TopicReader,
    all: &mut Vec<Outcome>,
    timeout: Duration,
    done: impl Fn(&[Outcome]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(all) && Instant::now() < deadline {
        for r in reader.poll_for(Duration::from_millis(200)) {
            all.push(Outcome::parse(&r.payload).expect("outcomes parse"));
        }
    }
}
