//! An issuer that takes over a partition resumes exactly at the committed
//! offset, even on a broker that skips records when a fetch starts in the
//! middle of a producer batch (tansu 0.6.0 does): every accepted request
//! after the commit is decided, none is passed over.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{EventSpec, Store};
use couponrush_core::{IssueRequest, Topics};
use couponrush_harness::{Tansu, TansuStorage};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::read_outcomes;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_passed_over_when_a_partition_resumes_mid_batch() {
    let tansu =
        Tansu::start(TansuStorage::Memory, None).expect("tansu: run scripts/dev-up --install-only");
    let kafka = KafkaSettings::new(tansu.brokers());
    let topics = Topics::default();
    ensure_topics(&kafka, &topics.specs(1, 1), Duration::from_secs(10))
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    store
        .put_event(
            "resume",
            EventSpec {
                stock: 10,
                per_user_limit: 1,
            },
        )
        .await
        .unwrap();

    // Two producer batches of 25 records: offsets 0..25 and 25..50.
    let producer: FutureProducer = kafka.producer_config("t", 10_000).create().unwrap();
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

    // An earlier member decided offsets 0..10 and committed 10: mid-batch.
    let group = format!("resume-{}", Uuid::new_v4().simple());
    let (k, g, t) = (kafka.clone(), group.clone(), topics.requests.clone());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = k
            .client_config("earlier")
            .set("group.id", &g)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Offset(10)).unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();

    let mut config = couponrush_issuer::Config::local(&tansu.brokers());
    config.group_id = group;
    let stop = CancellationToken::new();
    let issuer = tokio::spawn(couponrush_issuer::run_issuer(
        config,
        store.clone(),
        stop.clone(),
    ));
    let reader = common::reader(&tansu.brokers(), &topics.outcomes);
    let mut outcomes = Vec::new();
    read_outcomes(&reader, &mut outcomes, Duration::from_secs(30), |o| {
        o.len() >= 40
    });
    stop.cancel();
    issuer.await.unwrap().unwrap();

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
