//! The notifier's dead-letter topic (`coupon.notifier.dlq`): where a
//! ledger record goes when the endpoint never acknowledged it, refused it,
//! or the record cannot be read. The record is written as it was read (key
//! and bytes), with headers saying why and where it came from, so a human
//! (or a redrive) can deliver it later; then the notifier moves on.
//!
//! A dead letter counts as handled only once the broker acknowledged it
//! (idempotent producer, `acks=all`): until then its ledger offset is not
//! committed. A broker that refuses it is retried with the same backoff as
//! the endpoint, for as long as the partition is this notifier's.

use std::time::Duration;

use couponrush_core::kafka::{acknowledged, KafkaSettings};
use couponrush_core::wire::dlq_headers;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::retry::RetryPolicy;

/// Header names this topic adds to the shared ones of
/// [`couponrush_core::wire::dlq_headers`].
pub mod headers {
    /// Attempts made at the endpoint (0 for an unreadable record).
    pub const ATTEMPTS: &str = "x-dlq-attempts";
    /// The delivery's `Idempotency-Key`, when the record was a coupon.
    pub const IDEMPOTENCY_KEY: &str = "x-idempotency-key";
}

/// Records librdkafka may queue locally for the dead letters.
const QUEUE_MESSAGES: usize = 10_000;

/// One record to dead-letter.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Stable code: `exhausted`, `refused` or `unreadable`.
    pub reason: &'static str,
    /// Human-readable detail (the last status or error).
    pub detail: String,
    /// Attempts made at the endpoint.
    pub attempts: u32,
    /// The delivery's key, when there was one.
    pub idempotency_key: Option<String>,
    /// Where the record was read.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its bytes.
    pub payload: Vec<u8>,
}

/// The dead-letter producer.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    /// A producer for `topic`.
    pub fn new(kafka: &KafkaSettings, client_id: &str, topic: &str) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: kafka
                .producer_config_with(client_id, QUEUE_MESSAGES, |cfg| {
                    cfg.set("message.timeout.ms", "10000")
                        .set("request.timeout.ms", "5000");
                })
                .create()?,
            topic: topic.to_string(),
        })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes `letter` once and waits for the broker's acknowledgement.
    pub async fn send(&self, letter: &Letter) -> Result<(), KafkaError> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let attempts = letter.attempts.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: dlq_headers::REASON,
                value: Some(letter.reason),
            })
            .insert(Header {
                key: dlq_headers::DETAIL,
                value: Some(&letter.detail),
            })
            .insert(Header {
                key: dlq_headers::ORIGINAL_TOPIC,
                value: Some(&letter.topic),
            })
            .insert(Header {
                key: dlq_headers::ORIGINAL_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: dlq_headers::ORIGINAL_OFFSET,
                value: Some(&offset),
            })
            .insert(Header {
                key: headers::ATTEMPTS,
                value: Some(&attempts),
            });
        if let Some(k) = &letter.idempotency_key {
            headers = headers.insert(Header {
                key: headers::IDEMPOTENCY_KEY,
                value: Some(k),
            });
        }
        let mut record = FutureRecord::to(&self.topic)
            .payload(letter.payload.as_slice())
            .headers(headers);
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _record)| e)?;
        acknowledged(delivery).await.map(drop)
    }

    /// Writes `letter` until the broker acknowledges it (true) or `cancel`
    /// fires (false: not written, as far as anyone knows).
    pub async fn send_until_acknowledged(
        &self,
        letter: &Letter,
        policy: &RetryPolicy,
        cancel: &CancellationToken,
    ) -> bool {
        let mut failures = 0;
        loop {
            let result = tokio::select! {
                biased;
                _ = cancel.cancelled() => return false,
                r = self.send(letter) => r,
            };
            match result {
                Ok(()) => return true,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, topic = %self.topic, partition = letter.partition, offset = letter.offset, "the dead-letter topic did not take the record; retrying");
                    let pause = policy
                        .pause(failures, None, &mut rand::rng())
                        .max(Duration::from_millis(50));
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}
