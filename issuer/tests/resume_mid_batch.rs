//! An issuer resumes a partition exactly where it must, even on a broker
//! that skips records when a fetch starts in the middle of a producer batch
//! (tansu 0.6.0 does): when it takes a partition over (at the committed
//! offset) and when it resumes partitions it paused while the store was
//! failing (at its own position). Every accepted request is decided, none is
//! passed over.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{BatchVerdict, EventBatch, EventSpec, Store, StoreError};
use couponrush_core::{IssueRequest, Topics};
use couponrush_harness::{Tansu, TansuStorage};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

use common::{Hooked, Hooks};

/// A private tansu whose one request partition holds two producer batches
/// of 25 requests for event `resume` (stock 10, set up in `store`): offsets
/// 0..25 and 25..50. Returns the broker and the request ids in offset order.
async fn two_producer_batches(store: &dyn Store) -> (Tansu, KafkaSettings, Topics, Vec<Uuid>) {
    let tansu =
        Tansu::start(TansuStorage::Memory, None).expect("tansu: run scripts/dev-up --install-only");
    let kafka = KafkaSettings::new(tansu.brokers());
    let topics = Topics::default();
    ensure_topics(&kafka, &topics.specs(1, 1), Duration::from_secs(10))
        .await
        .unwrap();
    store
        .put_event(
            "resume",
            EventSpec {
                stock: 10,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    // Batches close on 25 records (not on the linger), however busy the
    // machine: the tests rely on where the batches start.
    let producer: FutureProducer = kafka
        .producer_config("t", 10_000)
        .set("linger.ms", "5000")
        .set("batch.num.messages", "25")
        .create()
        .unwrap();
    let mut ids = Vec::new();
    for chunk in 0..2 {
        let reqs: Vec<IssueRequest> = (0..25)
            .map(|i| IssueRequest::new(Uuid::now_v7(), "resume".into(), format!("u{chunk}-{i}"), 1))
            .collect();
        let payloads: Vec<Vec<u8>> = reqs.iter().map(IssueRequest::to_bytes).collect();
        let futures: Vec<_> = payloads
            .iter()
            .map(|p| {
                producer
                    .send_result(
                        FutureRecord::<(), [u8]>::to(&topics.requests)
                            .payload(p.as_slice())
                            .partition(0),
                    )
                    .map_err(|(e, _)| e)
                    .expect("queued")
            })
            .collect();
        for f in futures {
            f.await.unwrap().unwrap();
        }
        ids.extend(reqs.iter().map(|r| r.request_id));
    }

    (tansu, kafka, topics, ids)
}

/// A new group whose earlier member committed `offset` on the requests
/// partition; returns its id.
async fn committed_by_an_earlier_member(
    kafka: &KafkaSettings,
    topics: &Topics,
    offset: i64,
) -> String {
    let group = format!("resume-{}", Uuid::new_v4().simple());
    let (k, g, t) = (kafka.clone(), group.clone(), topics.requests.clone());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = k
            .client_config("earlier")
            .set("group.id", &g)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Offset(offset))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();
    group
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_left_unread_when_a_partition_resumes_mid_way_into_its_last_batch() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let (tansu, kafka, topics, ids) = two_producer_batches(&*store).await;
    // Committed 35: in the middle of the last batch (25..50), where tansu
    // answers a fetch with nothing, not even later (no batch follows).
    let mut config = couponrush_issuer::Config::local(&tansu.brokers());
    config.group_id = committed_by_an_earlier_member(&kafka, &topics, 35).await;
    let outcomes = common::issue_until(
        config,
        &tansu.brokers(),
        store.clone(),
        Duration::from_secs(30),
        |o| o.len() >= 15,
    )
    .await;
    let decided: HashSet<Uuid> = outcomes.iter().map(|o| o.request_id).collect();
    let expected: HashSet<Uuid> = ids[35..].iter().copied().collect();
    assert_eq!(
        decided, expected,
        "every request from the committed offset on is decided, and nothing below it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_passed_over_when_a_partition_resumes_mid_batch() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let (tansu, kafka, topics, ids) = two_producer_batches(&*store).await;

    // An earlier member decided offsets 0..10 and committed 10: mid-batch.
    let group = committed_by_an_earlier_member(&kafka, &topics, 10).await;

    let mut config = couponrush_issuer::Config::local(&tansu.brokers());
    config.group_id = group;
    let outcomes = common::issue_until(
        config,
        &tansu.brokers(),
        store.clone(),
        Duration::from_secs(30),
        |o| o.len() >= 40,
    )
    .await;

    let decided: HashSet<Uuid> = outcomes.iter().map(|o| o.request_id).collect();
    let expected: HashSet<Uuid> = ids[10..].iter().copied().collect();
    let passed_over = expected.difference(&decided).count();
    assert_eq!(
        passed_over, 0,
        "{passed_over} requests after the committed offset were passed over"
    );
    assert!(
        decided.is_subset(&expected),
        "nothing below the committed offset is decided again"
    );
    assert_eq!(outcomes.iter().filter(|o| o.offset < 10).count(), 0);
}

/// A store whose first `decide` fails as an unreachable store does: the
/// issuer pauses its partitions, backs off and decides the batch again.
#[derive(Default)]
struct FailsOnce {
    failed: AtomicBool,
}

#[async_trait]
impl Hooks for FailsOnce {
    async fn decide(
        &self,
        inner: &MemoryStore,
        b: &[EventBatch],
        now: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected: the first decide fails".into(),
            ));
        }
        inner.decide(b, now).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_passed_over_when_paused_partitions_resume_mid_batch() {
    let store = Arc::new(Hooked::new(FailsOnce::default()));
    let (tansu, _, _, ids) = two_producer_batches(&*store).await;

    // Batches of 10: the first (offsets 0..10) fails once, so the issuer
    // pauses with its position at 10, in the middle of the first producer
    // batch, and resumes there once the retry succeeded.
    let mut config = couponrush_issuer::Config::local(&tansu.brokers());
    config.group_id = format!("pause-{}", Uuid::new_v4().simple());
    config.batch_size = 10;
    let outcomes = common::issue_until(
        config,
        &tansu.brokers(),
        store.clone(),
        Duration::from_secs(30),
        common::decided_at_least(ids.len()),
    )
    .await;
    assert!(
        store.hooks.failed.load(Ordering::SeqCst),
        "the store failed once"
    );
    let decided: HashSet<Uuid> = outcomes.iter().map(|o| o.request_id).collect();
    let passed_over: Vec<usize> = (0..ids.len())
        .filter(|i| !decided.contains(&ids[*i]))
        .collect();
    assert!(
        passed_over.is_empty(),
        "{} requests were passed over after the resume (offsets {passed_over:?})",
        passed_over.len()
    );
}
