//! Watching decisions: a consumer of `coupon.outcomes` (and the DLQ), in its
//! own consumer group, positioned at the topics' ends when the run starts, so
//! it sees exactly what this run caused.
//!
//! It runs on a thread of its own and keeps every outcome of the run's event
//! with the time it was observed (for end-to-end latency), plus the DLQ
//! records by reason.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::wire::{dlq_headers, now_micros};
use couponrush_core::{Outcome, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

/// An outcome and when this process saw it (µs since the epoch).
#[derive(Debug, Clone)]
pub struct Observed {
    /// The outcome record.
    pub outcome: Outcome,
    /// When it was read.
    pub observed_at: u64,
}

/// What the observer saw.
#[derive(Debug, Default)]
pub struct Observations {
    /// Every outcome of the event, replays included, in read order.
    pub outcomes: Vec<Observed>,
    /// DLQ records written during the run, by reason.
    pub dlq: BTreeMap<String, u64>,
    /// Outcome records that did not parse.
    pub unparsable: u64,
}

struct Shared {
    stop: AtomicBool,
    decided: Mutex<HashSet<Uuid>>,
    decided_count: AtomicU64,
}

/// Distinct requests decided so far, readable while the observer runs.
#[derive(Clone)]
pub struct DecidedCount(Arc<Shared>);

impl DecidedCount {
    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.decided_count.load(Ordering::Relaxed)
    }
}

/// A running observer.
pub struct Observer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Observations>>,
}

impl Observer {
    /// Positions a consumer at the current ends of the outcomes and DLQ
    /// topics and starts reading. Blocking (metadata calls): call it from a
    /// blocking context or before the load starts.
    pub fn start(
        kafka: &KafkaSettings,
        topics: &Topics,
        event_id: &str,
    ) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = kafka
            .client_config("coupon-loadgen-observer")
            .set(
                "group.id",
                format!("coupon-loadgen-{}", Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in [&topics.outcomes, &topics.dlq] {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for t in md.topics() {
                for p in t.partitions() {
                    let (_, high) =
                        consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                    tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
                }
            }
        }
        consumer.assign(&tpl)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            decided: Mutex::new(HashSet::new()),
            decided_count: AtomicU64::new(0),
        });
        let (event, outcomes_topic, me) = (
            event_id.to_string(),
            topics.outcomes.clone(),
            shared.clone(),
        );
        // Some brokers report a stale end offset (tansu 0.6.0 reports the last
        // batch's), so the reader may start a little before the run: DLQ
        // records written before it (less a second of clock skew) are not ours.
        let since_ms = (now_micros() / 1000).saturating_sub(1000) as i64;
        let thread = std::thread::Builder::new()
            .name("observer".into())
            .spawn(move || read(consumer, &event, &outcomes_topic, since_ms, &me))
            .map_err(|_| KafkaError::Canceled)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Distinct requests of the event decided so far.
    pub fn decided(&self) -> u64 {
        self.decided_count().get()
    }

    /// A handle on [`Observer::decided`] for a task that must not own the
    /// observer (a progress display): the observer stays owned by the run,
    /// so [`Observer::finish`] never waits for, or races with, its readers.
    pub fn decided_count(&self) -> DecidedCount {
        DecidedCount(self.shared.clone())
    }

    /// Waits until every id in `ids` is decided or `timeout` passes; returns
    /// how many are still undecided.
    pub async fn wait_for(&self, ids: &HashSet<Uuid>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = {
                let decided = self
                    .shared
                    .decided
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                ids.iter().filter(|id| !decided.contains(id)).count()
            };
            if missing == 0 || Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops reading and returns everything seen.
    pub fn finish(mut self) -> Observations {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn read(
    consumer: BaseConsumer,
    event: &str,
    outcomes_topic: &str,
    since_ms: i64,
    shared: &Shared,
) -> Observations {
    let mut obs = Observations::default();
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        if m.topic() == outcomes_topic {
            match Outcome::parse(m.payload().unwrap_or_default()) {
                Ok(o) if o.event_id == event => {
                    let fresh = shared
                        .decided
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(o.request_id);
                    if fresh {
                        shared.decided_count.fetch_add(1, Ordering::Relaxed);
                    }
                    obs.outcomes.push(Observed {
                        outcome: o,
                        observed_at: now_micros(),
                    });
                }
                Ok(_) => {}
                Err(_) => obs.unparsable += 1,
            }
        } else if m.timestamp().to_millis().is_none_or(|t| t >= since_ms) {
            let reason = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == dlq_headers::REASON)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_else(|| "unknown".into());
            *obs.dlq.entry(reason).or_default() += 1;
        }
    }
    obs
}
