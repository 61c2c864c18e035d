//! The request producer: places each request on a partition by the chosen
//! [`Partitioner`] and waits for the broker's acknowledgement. The api
//! produces through it, and so does `coupon-loadgen run --direct` (which
//! stands in for the api), so both place requests the same way.
//!
//! The api answers `202` only after this acknowledgement (idempotent producer,
//! `acks=all`), so an accepted request is on every in-sync replica and cannot
//! be lost. librdkafka's local queue is bounded; when it is full the request is
//! refused at once (a 503) instead of queueing without limit.
//!
//! A record handed to the broker and not acknowledged in time is *in doubt*
//! ([`ProduceError::Unacknowledged`]), never "refused": the broker may have
//! written it before the connection broke or the timeout struck (a broker
//! killed between its write and its answer does exactly that), and then it
//! is decided like any other. The caller must say so to its client.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use crate::kafka::{acknowledged, KafkaSettings};
use crate::wire::{EventRecord, HoldAction};
use crate::{IssueRequest, Partitioner};

/// Why a request was not produced.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The local queue is full: the broker is slower than the offered load.
    #[error("the producer queue is full")]
    QueueFull,
    /// librdkafka refused the record before sending it (unknown topic or
    /// partition, record too large...): it was not written.
    #[error("the record was not sent: {0}")]
    NotSent(KafkaError),
    /// Sent, and not acknowledged within the timeout (or failed after it
    /// was sent): it may have been written, and then it will be decided.
    /// Only a retry under the same request id settles which, exactly once.
    #[error("the broker did not acknowledge the record; it may have been written: {0}")]
    Unacknowledged(KafkaError),
}

/// Where an accepted request landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Partition of the requests topic.
    pub partition: i32,
    /// Offset within it.
    pub offset: i64,
}

/// Produces requests to the requests topic.
pub struct RequestProducer {
    producer: FutureProducer,
    topic: String,
    partitioner: Partitioner,
    seq: AtomicU64,
    partitions: Arc<AtomicI32>,
    /// `couponrush_api_produce_seconds`, looked up once: `histogram!` looks
    /// its key up in the recorder's registry on every call.
    produce_seconds: metrics::Histogram,
}

impl RequestProducer {
    /// Creates the producer. `partitions` is the requests topic's current
    /// partition count; [`RequestProducer::watch_partitions`] keeps it fresh.
    pub fn new(
        kafka: &KafkaSettings,
        topic: String,
        partitioner: Partitioner,
        partitions: i32,
        queue_messages: usize,
    ) -> Result<Self, KafkaError> {
        Self::with_message_timeout(kafka, topic, partitioner, partitions, queue_messages, None)
    }

    /// [`RequestProducer::new`], giving up on a record after
    /// `message_timeout` (librdkafka's `message.timeout.ms`) when given: the
    /// api sets it to how long a client waits for its answer.
    pub fn with_message_timeout(
        kafka: &KafkaSettings,
        topic: String,
        partitioner: Partitioner,
        partitions: i32,
        queue_messages: usize,
        message_timeout: Option<Duration>,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = kafka
            .producer_config_with("coupon-api", queue_messages, |cfg| {
                if let Some(t) = message_timeout {
                    cfg.set("message.timeout.ms", t.as_millis().to_string());
                }
            })
            .create()?;
        Ok(Self {
            producer,
            topic,
            partitioner,
            seq: AtomicU64::new(0),
            partitions: Arc::new(AtomicI32::new(partitions.max(1))),
            produce_seconds: metrics::histogram!("couponrush_api_produce_seconds"),
        })
    }

    /// The partitioning strategy.
    pub fn partitioner(&self) -> Partitioner {
        self.partitioner
    }

    /// The partition count requests are spread over.
    pub fn partitions(&self) -> i32 {
        self.partitions.load(Ordering::Relaxed)
    }

    /// Records waiting in librdkafka's queue or in flight to the broker.
    pub fn queue_depth(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Produces `req` and waits for the broker's acknowledgement.
    pub async fn send(&self, req: &IssueRequest) -> Result<Placement, ProduceError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let key = self.partitioner.key(req, seq);
        let partition = self.partitioner.partition(req, seq, self.partitions());
        let payload = req.to_bytes();
        let record = FutureRecord::to(&self.topic)
            .key(&key)
            .payload(&payload)
            .partition(partition);
        let started = Instant::now();
        let delivery = self.enqueue(record)?;
        let result = acknowledged(delivery)
            .await
            .map(|d| Placement {
                partition: d.partition,
                offset: d.offset,
            })
            .map_err(ProduceError::Unacknowledged);
        self.produce_seconds.record(started.elapsed());
        result
    }

    /// Checks the broker answers a metadata request for the requests topic,
    /// and refreshes the partition count from it. Blocking.
    pub fn probe(&self, timeout: Duration) -> Result<i32, KafkaError> {
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .unwrap_or(0);
        if n > 0 {
            self.partitions.store(n, Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Refreshes the partition count every `every` until `shutdown`, so a
    /// topic grown with `kafka-topics --alter` is used without a restart.
    pub async fn watch_partitions(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.probe(Duration::from_secs(2))).await;
            metrics::gauge!("couponrush_api_producer_queue").set(self.queue_depth() as f64);
        }
    }

    /// Writes an event definition to the events topic (key: the event id)
    /// and waits for the acknowledgement.
    pub async fn publish_event(
        &self,
        topic: &str,
        record: &EventRecord,
    ) -> Result<(), ProduceError> {
        let payload = record.to_bytes();
        let rec = FutureRecord::to(topic)
            .key(record.event_id.as_bytes())
            .payload(payload.as_slice());
        let delivery = self.enqueue(rec)?;
        acknowledged(delivery)
            .await
            .map(drop)
            .map_err(ProduceError::Unacknowledged)
    }

    /// Writes an action on a hold to the compensations topic (key: the
    /// request id, so the actions on one hold stay in log order) and waits
    /// for the acknowledgement.
    pub async fn publish_action(
        &self,
        topic: &str,
        action: &HoldAction,
    ) -> Result<(), ProduceError> {
        let payload = action.to_bytes();
        let key = action.request_id.to_string();
        let rec = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_slice());
        let delivery = self.enqueue(rec)?;
        acknowledged(delivery)
            .await
            .map(drop)
            .map_err(ProduceError::Unacknowledged)
    }

    /// Hands `record` to librdkafka; a full local queue is refused at once.
    fn enqueue<K, P>(&self, record: FutureRecord<'_, K, P>) -> Result<DeliveryFuture, ProduceError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        match self.producer.send_result(record) {
            Ok(delivery) => Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(ProduceError::QueueFull)
            }
            Err((e, _)) => Err(ProduceError::NotSent(e)),
        }
    }

    /// Waits up to `timeout` for every queued record to be acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
