//! The expiry sweep never starves: due holds it already swept (their
//! expiries produced but not decided yet, say on a partition whose owner
//! is gone) do not fill its next round, so the other due holds still get
//! their expiries. The mock cluster takes the expiries; nobody decides
//! them, as when their partition has no live owner.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{EventBatch, EventSpec, Pending, Store};
use couponrush_core::wire::now_micros;
use couponrush_core::Topics;
use couponrush_harness::MockKafka;
use couponrush_issuer::sweep::{Sweeper, SWEEP_LIMIT};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_holds_already_swept_do_not_starve_the_others() {
    let mock = MockKafka::start(1).unwrap();
    let topics = Topics::default();
    mock.create_topic(&topics.compensations, 2, 1).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let held = SWEEP_LIMIT + SWEEP_LIMIT / 2;
    store
        .put_event(
            "drop",
            EventSpec {
                stock: held as u32,
                per_user_limit: 1,
                claim_window_us: 1,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let requests = (0..held)
        .map(|i| Pending {
            request_id: Uuid::now_v7(),
            user_id: format!("u{i}"),
        })
        .collect();
    store
        .decide(&[EventBatch::requests("drop", requests)], now_micros())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let kafka = KafkaSettings::new(mock.brokers());
    let mut sweeper = Sweeper::new(&kafka, "test", &topics.compensations, store.clone()).unwrap();
    let first = sweeper.round(now_micros()).await.unwrap();
    let second = sweeper.round(now_micros()).await.unwrap();
    assert_eq!(first, SWEEP_LIMIT, "a round sweeps at most its limit");
    assert_eq!(
        first + second,
        held,
        "the second round swept the due holds the first left, not the same ones again"
    );
    let due: HashSet<Uuid> = store
        .due_holds(now_micros(), usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.request_id)
        .collect();
    assert_eq!(due.len(), held, "nothing decided them: all still due");
}
