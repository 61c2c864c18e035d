//! The expiry sweep: a hold not claimed in time is expired through the log.
//!
//! Every `--sweep-every` each issuer asks the store for holds whose deadline
//! passed ([`Store::due_holds`], at most [`SWEEP_LIMIT`] a round) and
//! produces, for each, an `expire` [`HoldAction`] in the holder's name to
//! the compensations topic, acknowledged by the broker. The expiry itself is
//! decided like any action, by the issuer that consumes it, in the same
//! store step as that batch's requests: only if the hold is still held and
//! due then. So a claim applied first wins, and several issuers sweeping the
//! same hold are harmless (the later expiry restates the first or decides
//! nothing). A hold this sweeper produced an expiry for is not produced
//! again for [`RESWEEP_AFTER`] (a consumer behind would get a copy every
//! round); after that it is, so an expiry lost before the broker's ack is
//! produced again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use couponrush_core::kafka::{all_acknowledged, KafkaSettings};
use couponrush_core::store::{Store, StoreError};
use couponrush_core::wire::{now_micros, HoldAction, HoldVerb};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Due holds turned into expiries per round, at most.
pub const SWEEP_LIMIT: usize = 1000;

/// A hold swept is not swept again by the same sweeper for this long.
pub const RESWEEP_AFTER: Duration = Duration::from_secs(5);

/// Holds remembered as swept, at most (cleared when full: a few duplicate
/// expiries, never memory).
const REMEMBERED: usize = 100_000;

/// Why a sweep round failed; the next round tries again.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The store could not list the due holds.
    #[error("the store could not list due holds: {0}")]
    Store(#[from] StoreError),
    /// The broker did not acknowledge the expiries.
    #[error("the expiries were not acknowledged: {0}")]
    Kafka(#[from] KafkaError),
}

/// One issuer's expiry sweep.
pub struct Sweeper {
    store: Arc<dyn Store>,
    producer: FutureProducer,
    topic: String,
    swept: HashMap<Uuid, Instant>,
}

impl Sweeper {
    /// A sweeper producing to `topic` (the compensations topic).
    pub fn new(
        kafka: &KafkaSettings,
        client_id: &str,
        topic: &str,
        store: Arc<dyn Store>,
    ) -> Result<Self, KafkaError> {
        let producer = kafka
            .producer_config(&format!("{client_id}-sweep"), 10_000)
            .create()?;
        Ok(Self {
            store,
            producer,
            topic: topic.to_string(),
            swept: HashMap::new(),
        })
    }

    /// Runs a round every `every` until `shutdown`.
    pub async fn run(mut self, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.round(now_micros()).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics::counter!("couponrush_issuer_expiries_produced_total")
                        .increment(n as u64);
                    tracing::debug!(expiries = n, "due holds swept");
                }
                Err(e) => {
                    metrics::counter!("couponrush_issuer_sweep_errors_total").increment(1);
                    tracing::warn!(error = %e, "expiry sweep failed; the next round tries again");
                }
            }
        }
    }

    /// One round at `now` (µs): produces an expiry for every due hold not
    /// swept in the last [`RESWEEP_AFTER`] and waits for the broker's acks.
    /// Returns how many were produced.
    pub async fn round(&mut self, now: u64) -> Result<usize, SweepError> {
        self.swept.retain(|_, at| at.elapsed() < RESWEEP_AFTER);
        if self.swept.len() >= REMEMBERED {
            self.swept.clear();
        }
        // Asked for as many more as it remembers: due holds already swept
        // (their expiries not decided yet, say on a partition whose owner
        // is gone) must not fill every round and starve the others.
        let due = self
            .store
            .due_holds(now, SWEEP_LIMIT + self.swept.len())
            .await?;
        let fresh = Instant::now();
        let mut pending = Vec::new();
        let mut sent = Vec::new();
        for d in due {
            if self.swept.contains_key(&d.request_id) {
                continue;
            }
            let action =
                HoldAction::new(HoldVerb::Expire, d.request_id, d.event_id, d.user_id, now);
            let key = action.request_id.to_string();
            let payload = action.to_bytes();
            let delivery = self
                .producer
                .send_result(
                    FutureRecord::to(&self.topic)
                        .key(key.as_bytes())
                        .payload(payload.as_slice()),
                )
                .map_err(|(e, _)| e)?;
            pending.push(delivery);
            sent.push(action.request_id);
        }
        all_acknowledged(pending).await?;
        let n = sent.len();
        for id in sent {
            self.swept.insert(id, fresh);
        }
        Ok(n)
    }
}
