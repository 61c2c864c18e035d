//! Publishing a batch's results: each decision and each hold end to
//! `coupon.outcomes` (key: the request id, so a coupon's issue and the end
//! of its hold share a partition), each poison record to the DLQ (its original key and bytes, with headers saying
//! why and where it came from).
//!
//! [`Publisher::publish`] returns only when the broker has acknowledged every
//! record of the batch (idempotent producer, `acks=all`), or with the first
//! error; the caller commits offsets only after an `Ok`.
//!
//! Each outcome carries its issuer's client id in the `x-issuer` header
//! (for the report's per-issuer share); the record itself is unchanged.
//!
//! The guarantee the recovery fence rests on: **an outcome not acknowledged
//! within the publish timeout never reaches the log.** librdkafka's message
//! and request timeouts are derived from it ([`Publisher::config`]), so the
//! producer's [`DeliveryBound`] is the publish timeout unless `--kafka-opt`
//! says otherwise; the issuer checks the bound of the configuration it
//! actually creates against the fence at start-up.
//!
//! [`DeliveryBound`]: couponrush_core::kafka::DeliveryBound

use std::time::Duration;

use couponrush_core::kafka::{all_acknowledged, KafkaSettings, TIMEOUT_SCAN_SLACK};
use couponrush_core::wire::{dlq_headers, outcome_headers};
use couponrush_core::Topics;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::batch::{Disposition, Received};

/// Records librdkafka may queue locally for one issuer.
pub const QUEUE_MESSAGES: usize = 200_000;

/// The broker's answer gets this part of the publish timeout.
const REQUEST_SHARE: u32 = 4;

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
    /// This issuer's client id, sent with every outcome (header `x-issuer`).
    issuer: String,
}

impl Publisher {
    /// The outcome producer's configuration: idempotent, `acks=all`, and
    /// timeouts derived from `publish_timeout` so that its
    /// [`DeliveryBound`](couponrush_core::kafka::DeliveryBound) is at most `publish_timeout`: a quarter of it for
    /// the broker's answer (`request.timeout.ms`), the rest, less linger and
    /// librdkafka's timeout scan, for the message timeout. The extras
    /// (`--kafka-opt`) come last and may change any of it: check the bound
    /// of what this returns, not of the flags.
    pub fn config(
        kafka: &KafkaSettings,
        client_id: &str,
        publish_timeout: Duration,
    ) -> ClientConfig {
        kafka.producer_config_with(client_id, QUEUE_MESSAGES, |cfg| {
            let linger = cfg
                .get("linger.ms")
                .and_then(|ms| ms.parse::<f64>().ok())
                .map_or(Duration::from_millis(5), |ms| {
                    Duration::from_secs_f64(ms / 1000.0)
                });
            let request = (publish_timeout / REQUEST_SHARE).max(Duration::from_millis(1));
            // librdkafka wants the message timeout above linger.
            let message = publish_timeout
                .saturating_sub(request + TIMEOUT_SCAN_SLACK + linger)
                .max(linger + Duration::from_millis(1));
            cfg.set("request.timeout.ms", request.as_millis().to_string())
                .set("message.timeout.ms", message.as_millis().to_string());
        })
    }

    /// A publisher with `cfg` (see [`Publisher::config`]).
    pub fn from_config(cfg: &ClientConfig, topics: Topics) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: cfg.create()?,
            topics,
            issuer: cfg.get("client.id").unwrap_or_default().to_string(),
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
                // A decision and a hold's end go to the ledger alike, keyed
                // by the request.
                Disposition::Decided(_) | Disposition::Hold(_) => {
                    let (request_id, payload) = match disp {
                        Disposition::Decided(o) => (o.request_id, o.to_bytes()),
                        Disposition::Hold(h) => (h.request_id, h.to_bytes()),
                        _ => unreachable!("matched above"),
                    };
                    counts.outcomes += 1;
                    let key = request_id.to_string();
                    let headers = OwnedHeaders::new().insert(Header {
                        key: outcome_headers::ISSUER,
                        value: Some(&self.issuer),
                    });
                    self.send(
                        FutureRecord::to(&self.topics.outcomes)
                            .key(key.as_bytes())
                            .payload(payload.as_slice())
                            .headers(headers),
                        &mut pending,
                    )
                    .await?
                }
                Disposition::Nothing => continue,
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

#[cfg(test)]
mod tests {
    use couponrush_core::kafka::DeliveryBound;

    use super::*;

    #[test]
    fn the_outcome_producer_is_bounded_by_the_publish_timeout() {
        let kafka = KafkaSettings::new("127.0.0.1:9");
        for secs in [2, 3, 5, 10, 30, 120] {
            let publish = Duration::from_secs(secs);
            let bound = DeliveryBound::of(&Publisher::config(&kafka, "t", publish)).unwrap();
            assert!(bound.total() <= publish, "{publish:?}: {bound}");
            assert!(
                bound.total() + Duration::from_millis(2) >= publish,
                "{publish:?}: the whole timeout is used: {bound}"
            );
        }
        let tiny =
            DeliveryBound::of(&Publisher::config(&kafka, "t", Duration::from_millis(100))).unwrap();
        assert!(
            tiny.message_timeout.1 > tiny.linger.1,
            "librdkafka wants the message timeout above linger: {tiny}"
        );
    }
}
