//! Reading a whole topic back from its beginning (no group, no commits),
//! for tests that check what reached the log: outcomes, dead letters.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// One record of a topic, as read back.
pub struct Raw {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its value.
    pub payload: Vec<u8>,
    /// Its headers, values as (lossy) text.
    pub headers: HashMap<String, String>,
}

/// A reader of every partition of one topic from the beginning.
pub struct TopicReader {
    consumer: BaseConsumer,
}

impl TopicReader {
    /// Assigns every partition of `topic` on `brokers` from the beginning.
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", "test-reader")
            .set("group.id", format!("reader-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = md
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len() as i32);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(Self { consumer })
    }

    /// Reads what arrives within `wait`.
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
                                    let value = h.value.unwrap_or_default();
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(value).into_owned(),
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

    /// Reads records into `all` (each turned into a `T` by `parse`) until
    /// `done` says so or `timeout` passes.
    pub fn read_until<T>(
        &self,
        all: &mut Vec<T>,
        timeout: Duration,
        parse: impl Fn(&Raw) -> T,
        done: impl Fn(&[T]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done(all) && Instant::now() < deadline {
            all.extend(self.poll_for(Duration::from_millis(200)).iter().map(&parse));
        }
    }
}
