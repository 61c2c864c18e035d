//! Publishing a batch's results: each decision to `coupon.outcomes`, each
//! poison record to the DLQ (its original key and bytes, with headers saying
//! why and where it came from).
//!
//! [`Publisher::publish`] returns only when the broker has acknowledged every
//! record of the batch (idempotent producer, `acks=all`), or with the first
//! error; the caller commits offsets only after an `Ok`.

use std::time::Duration;

use couponrush_core::kafka::{all_acknowledged, KafkaSettings};
use couponrush_core::wire::dlq_headers;
use couponrush_core::Topics;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::batch::{Disposition, Received};

/// Records librdkafka may queue locally for one issuer.
pub const QUEUE_MESSAGES: usize = 200_000;

/// Counts of what one batch published.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Outcomes written.
    pub outcomes: usize,
    /// DLQ records written.
    pub dead: usize,
}

/// Writes outcomes and dead letters.
pub struct Publisher {
    producer: FutureProducer,
    topics: Topics,
}

impl Publisher {
    /// An idempotent `acks=all` producer. `message_timeout` bounds how long
    /// an outcome may take to reach the log after its decision.
    pub fn new(
        kafka: &KafkaSettings,
        topics: Topics,
        client_id: &str,
        message_timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let cfg = kafka.producer_config_with(client_id, QUEUE_MESSAGES, |cfg| {
            cfg.set(
                "message.timeout.ms",
                message_timeout.as_millis().to_string(),
            );
        });
        Ok(Self {
            producer: cfg.create()?,
            topics,
        })
    }

    /// Publishes one disposition per record and waits for every ack.
    pub async fn publish(
        &self,
        records: &[Received],
        dispositions: &[Disposition],
    ) -> Result<Published, KafkaError> {
        let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(records.len());
        let mut counts = Published::default();
        for (rec, disp) in records.iter().zip(dispositions) {
            let future = match disp {
                Disposition::Decided(outcome) => {
                    counts.outcomes += 1;
                    let key = outcome.request_id.to_string();
                    let payload = outcome.to_bytes();
                    self.send(
                        FutureRecord::to(&self.topics.outcomes)
                            .key(key.as_bytes())
                            .payload(payload.as_slice()),
                        &mut pending,
                    )
                    .await?
                }
                Disposition::Dead(reason) => {
                    counts.dead += 1;
                    let partition = rec.partition.to_string();
                    let offset = rec.offset.to_string();
                    let detail = reason.to_string();
                    let headers = OwnedHeaders::new()
                        .insert(Header {
                            key: dlq_headers::REASON,
                            value: Some(reason.code()),
                        })
                        .insert(Header {
                            key: dlq_headers::DETAIL,
                            value: Some(&detail),
                        })
                        .insert(Header {
                            key: dlq_headers::ORIGINAL_TOPIC,
                            value: Some(&rec.topic),
                        })
                        .insert(Header {
                            key: dlq_headers::ORIGINAL_PARTITION,
                            value: Some(&partition),
                        })
                        .insert(Header {
                            key: dlq_headers::ORIGINAL_OFFSET,
                            value: Some(&offset),
                        });
                    let mut record = FutureRecord::to(&self.topics.dlq)
                        .payload(rec.payload.as_slice())
                        .headers(headers);
                    if let Some(k) = &rec.key {
                        record = record.key(k.as_slice());
                    }
                    self.send(record, &mut pending).await?
                }
            };
            pending.push(future);
        }
        all_acknowledged(pending).await?;
        Ok(counts)
    }

    /// Enqueues one record; when librdkafka's queue is full, waits for what
    /// is already in flight instead of growing memory.
    async fn send(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
        pending: &mut Vec<DeliveryFuture>,
    ) -> Result<DeliveryFuture, KafkaError> {
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    if pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        all_acknowledged(pending.drain(..)).await?;
                    }
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits for every queued record (at shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
