//! An event's definition is in the log before it is in the store, and the
//! two agree whatever happens to a `PUT`: a racing pair, a log write that
//! fails. "Agree" means the store's definition (generation, stock, limit) is
//! both the highest generation on the events topic (what a rebuild takes)
//! and the topic's last record for the event (what compaction keeps).
//!
//! Against librdkafka's mock cluster, with both stores (the Redis one on
//! the shared server at `REDIS_URL`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::producer::RequestProducer;
use couponrush_core::recovery::read_topic;
use couponrush_core::store::definition::{create_event, CreateEventError};
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{
    BatchVerdict, Decision, Defined, EventBatch, EventSnapshot, EventSpec, EventState, Ledger,
    LoggedDecisions, Store, StoreError,
};
use couponrush_core::wire::EventRecord;
use couponrush_core::Partitioner;
use couponrush_harness::{Fault, MockKafka};
use tokio::sync::Notify;
use uuid::Uuid;

const EVENTS: &str = "t.events";

/// A store that holds the first `PUT` right after it claimed its generation
/// (its first store call) until told to go on, so another `PUT` overtakes it.
struct Gated {
    inner: Arc<dyn Store>,
    armed: AtomicBool,
    reached: Notify,
    release: Notify,
}

impl Gated {
    fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            armed: AtomicBool::new(true),
            reached: Notify::new(),
            release: Notify::new(),
        })
    }

    async fn gate(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.release.notified().await;
        }
    }
}

#[async_trait]
impl Store for Gated {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn put_event(
        &self,
        event_id: &str,
        spec: EventSpec,
    ) -> Result<(EventState, bool), StoreError> {
        let r = self.inner.put_event(event_id, spec).await;
        self.gate().await;
        r
    }
    async fn claim_generation(&self, event_id: &str) -> Result<u64, StoreError> {
        let r = self.inner.claim_generation(event_id).await;
        self.gate().await;
        r
    }
    async fn define_event(
        &self,
        event_id: &str,
        spec: EventSpec,
        generation: u64,
    ) -> Result<Defined, StoreError> {
        self.inner.define_event(event_id, spec, generation).await
    }
    async fn event(&self, event_id: &str) -> Result<Option<EventState>, StoreError> {
        self.inner.event(event_id).await
    }
    async fn decide(
        &self,
        batches: &[EventBatch],
        now_micros: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError> {
        self.inner.decide(batches, now_micros).await
    }
    async fn decision(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<Decision>, StoreError> {
        self.inner.decision(event_id, request_id).await
    }
    async fn find_decision(
        &self,
        request_id: Uuid,
    ) -> Result<Option<(String, Decision)>, StoreError> {
        self.inner.find_decision(request_id).await
    }
    async fn ledger(&self, event_id: &str) -> Result<Option<Ledger>, StoreError> {
        self.inner.ledger(event_id).await
    }
    async fn hold(
        &self,
        event_id: &str,
        id: Uuid,
    ) -> Result<Option<couponrush_core::store::HoldStatus>, StoreError> {
        self.inner.hold(event_id, id).await
    }
    async fn due_holds(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<couponrush_core::store::DueHold>, StoreError> {
        self.inner.due_holds(now, limit).await
    }
    async fn mark_logged(&self, batches: &[LoggedDecisions]) -> Result<(), StoreError> {
        self.inner.mark_logged(batches).await
    }
    async fn epoch(&self) -> Result<Option<String>, StoreError> {
        self.inner.epoch().await
    }
    async fn begin_rebuild(&self, owner: &str) -> Result<(), StoreError> {
        self.inner.begin_rebuild(owner).await
    }
    async fn set_epoch(&self, epoch: &str, owner: &str) -> Result<(), StoreError> {
        self.inner.set_epoch(epoch, owner).await
    }
    async fn try_lock_recovery(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.try_lock_recovery(owner, ttl).await
    }
    async fn extend_recovery_lock(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.extend_recovery_lock(owner, ttl).await
    }
    async fn unlock_recovery(&self, owner: &str) -> Result<(), StoreError> {
        self.inner.unlock_recovery(owner).await
    }
    async fn restore(
        &self,
        snapshot: &EventSnapshot,
        retention: Duration,
        owner: &str,
    ) -> Result<(), StoreError> {
        self.inner.restore(snapshot, retention, owner).await
    }
}

fn spec(stock: u32) -> EventSpec {
    EventSpec {
        stock,
        per_user_limit: 1,
        claim_window_us: 0,
        stock_buckets: 1,
    }
}

fn new_event() -> String {
    format!("t-{}", Uuid::new_v4().simple())
}

struct Log {
    mock: MockKafka,
    kafka: KafkaSettings,
    producer: RequestProducer,
}

/// A mock cluster of one broker with the events topic, and the api's
/// producer on it (giving up on a record after 2 s).
fn log() -> Log {
    let mock = MockKafka::start(1).unwrap();
    mock.create_topic(EVENTS, 1, 1).unwrap();
    let kafka = KafkaSettings::new(mock.brokers());
    let producer = RequestProducer::with_message_timeout(
        &kafka,
        "t.requests".into(),
        Partitioner::Spread,
        1,
        1000,
        Some(Duration::from_secs(2)),
    )
    .unwrap();
    Log {
        mock,
        kafka,
        producer,
    }
}

/// Every definition of `event` on the events topic, in log order.
async fn definitions(kafka: &KafkaSettings, event: &str) -> Vec<EventRecord> {
    let (kafka, event) = (kafka.clone(), event.to_string());
    tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        read_topic(&kafka, EVENTS, |bytes| {
            if let Ok(r) = EventRecord::parse(bytes) {
                if r.event_id == event {
                    records.push(r);
                }
            }
        })
        .unwrap();
        records
    })
    .await
    .unwrap()
}

/// The store's definition of `event` is the log's highest generation and
/// its last record.
async fn assert_store_and_log_agree(store: &dyn Store, kafka: &KafkaSettings, event: &str) {
    let state = store.event(event).await.unwrap().expect("the event exists");
    let records = definitions(kafka, event).await;
    let def = |r: &EventRecord| (r.generation, r.stock, r.per_user_limit);
    let highest = records.iter().max_by_key(|r| r.generation).map(def);
    let last = records.last().map(def);
    let stored = Some((state.generation, state.stock, state.per_user_limit));
    assert_eq!(
        highest, stored,
        "the store holds the highest generation of the log (log: {records:?})"
    );
    assert_eq!(
        last, stored,
        "the log's last record, what compaction keeps, is the store's definition (log: {records:?})"
    );
}

async fn racing_puts_leave_store_and_log_on_the_same_definition(store: Arc<dyn Store>) {
    let log = log();
    let event = new_event();
    let gated = Gated::new(store.clone());
    // The first PUT claims its generation, then stalls...
    let first = {
        let (gated, event) = (gated.clone(), event.clone());
        let producer = RequestProducer::with_message_timeout(
            &log.kafka,
            "t.requests".into(),
            Partitioner::Spread,
            1,
            1000,
            Some(Duration::from_secs(2)),
        )
        .unwrap();
        tokio::spawn(async move {
            create_event(&*gated, &producer, EVENTS, &event, spec(10))
                .await
                .map(|(state, _)| state)
        })
    };
    gated.reached.notified().await;
    // ...while the second one runs from start to end...
    let (second, _) = create_event(&*gated, &log.producer, EVENTS, &event, spec(20))
        .await
        .unwrap();
    // ...then the first one finishes.
    gated.release.notify_one();
    first.await.unwrap().unwrap();
    let state = store.event(&event).await.unwrap().unwrap();
    assert_eq!(
        (state.generation, state.stock),
        (second.generation, 20),
        "the PUT that claimed its generation last wins"
    );
    assert_store_and_log_agree(&*store, &log.kafka, &event).await;
}

async fn a_put_whose_definition_did_not_reach_the_log_changes_nothing(store: Arc<dyn Store>) {
    let log = log();
    let event = new_event();
    let (before, created) = create_event(&*store, &log.producer, EVENTS, &event, spec(10))
        .await
        .unwrap();
    assert!(created);
    log.mock.inject(Fault::BrokerDown(1)).unwrap();
    let failed = create_event(&*store, &log.producer, EVENTS, &event, spec(20)).await;
    assert!(
        matches!(failed, Err(CreateEventError::Log(_))),
        "{failed:?}"
    );
    log.mock.inject(Fault::BrokerUp(1)).unwrap();
    assert_eq!(
        store.event(&event).await.unwrap(),
        Some(before.clone()),
        "the store is unchanged"
    );
    assert_store_and_log_agree(&*store, &log.kafka, &event).await;
    // Retried (as the api's answer says) until the producer is reconnected,
    // the PUT goes through, past every generation the failed ones claimed.
    let mut tries = 0;
    let (after, created) = loop {
        tries += 1;
        match create_event(&*store, &log.producer, EVENTS, &event, spec(20)).await {
            Ok(done) => break done,
            Err(CreateEventError::Log(e)) if tries < 10 => eprintln!("retrying the PUT: {e}"),
            Err(e) => panic!("{e}"),
        }
    };
    assert!(!created);
    assert_eq!(
        (after.generation, after.stock),
        (before.generation + 1 + tries, 20)
    );
    assert_store_and_log_agree(&*store, &log.kafka, &event).await;
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    // A server of its own: the shared one's epoch belongs to
                    // whichever build last rebuilt it (a build whose scripts
                    // differ finds it lost until a recovery runs).
                    let dir = std::env::temp_dir()
                        .join(format!("couponrush-definitions-{}", super::Uuid::new_v4()));
                    let server = couponrush_harness::RedisServer::start(&dir, false)
                        .expect("redis-server on the PATH");
                    let store = super::RedisStore::connect(&server.url(), super::Duration::from_secs(3600))
                        .await
                        .expect("the private redis-server answers");
                    super::$name(std::sync::Arc::new(store)).await;
                    drop(server);
                    let _ = std::fs::remove_dir_all(&dir);
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(std::sync::Arc::new(super::MemoryStore::default())).await
                }
            )*
        }
    };
}

both_stores!(
    racing_puts_leave_store_and_log_on_the_same_definition,
    a_put_whose_definition_did_not_reach_the_log_changes_nothing,
);
