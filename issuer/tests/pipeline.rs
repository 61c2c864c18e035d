//! The issuer's three stages overlap (the worker's module doc): while the
//! store decides one batch, the previous batch's outcomes are published and
//! marked logged, and the next batch is read. And what the overlap must not
//! change: the store decides one batch at a time, in the order the records
//! were read, so a partition is decided in offset order.
//!
//! On librdkafka's mock cluster and a store that is the in-memory one with
//! each decide slowed down, so an overlap (or a second call sent too early)
//! has time to show.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{
    BatchVerdict, EventBatch, EventSpec, LoggedDecisions, Store, StoreError,
};
use couponrush_core::{IssueRequest, Topics};
use couponrush_harness::MockKafka;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

use common::{Hooked, Hooks};

/// Watches the issuer's store calls.
#[derive(Default)]
struct Watch {
    /// Decide calls running now, and the most seen at once.
    deciding: AtomicUsize,
    most_at_once: AtomicUsize,
    /// Each decide call's request ids, in the order the calls came.
    calls: Mutex<Vec<Vec<Uuid>>>,
    /// Marks of logged decisions made while a decide call was running.
    marks_during_a_decide: AtomicUsize,
    marks: AtomicUsize,
    /// Marks running now, and the most seen at once.
    marking: AtomicUsize,
    most_marks_at_once: AtomicUsize,
    /// Each mark takes this long (ms): a slow last stage.
    mark_ms: AtomicU64,
    /// The first this many decide calls take `slow_ms` instead of 40 ms.
    slow_calls: AtomicUsize,
    slow_ms: AtomicU64,
    /// The first decide fails (as an unreachable store does).
    fail_first: AtomicBool,
    /// The second decide answers that the event is unknown, as a store that
    /// had just lost its state would; it is rebuilt (has its epoch) by the
    /// time the answer is looked at.
    lost_second: AtomicBool,
}

#[async_trait]
impl Hooks for Watch {
    async fn decide(
        &self,
        inner: &MemoryStore,
        b: &[EventBatch],
        now: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError> {
        let now_running = self.deciding.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now_running, Ordering::SeqCst);
        self.calls.lock().unwrap().push(
            b.iter()
                .flat_map(|b| b.requests.iter().map(|p| p.request_id))
                .collect(),
        );
        let slow = self
            .slow_calls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let ms = if slow {
            self.slow_ms.load(Ordering::SeqCst)
        } else {
            40
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let lost =
            self.calls.lock().unwrap().len() == 2 && self.lost_second.swap(false, Ordering::SeqCst);
        let verdicts = if lost {
            Ok(vec![BatchVerdict::UnknownEvent; b.len()])
        } else if self.fail_first.swap(false, Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "injected: the first decide fails".into(),
            ))
        } else {
            inner.decide(b, now).await
        };
        self.deciding.fetch_sub(1, Ordering::SeqCst);
        verdicts
    }

    async fn mark_logged(
        &self,
        inner: &MemoryStore,
        b: &[LoggedDecisions],
    ) -> Result<(), StoreError> {
        self.marks.fetch_add(1, Ordering::SeqCst);
        let now_marking = self.marking.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_marks_at_once
            .fetch_max(now_marking, Ordering::SeqCst);
        // A moment later: the call sent just before may not have started.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if self.deciding.load(Ordering::SeqCst) > 0 {
            self.marks_during_a_decide.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(self.mark_ms.load(Ordering::SeqCst))).await;
        let marked = inner.mark_logged(b).await;
        self.marking.fetch_sub(1, Ordering::SeqCst);
        marked
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    FirstCallFails,
    SecondCallLost,
}

/// 600 requests on one partition, decided by one issuer in batches of 50.
/// Returns the watch and the request ids in offset order.
async fn drop_of_600(fault: Fault) -> (Arc<Hooked<Watch>>, Vec<Uuid>) {
    drop_of_600_with(fault, 4, 0).await
}

/// [`drop_of_600`] with the issuer's `--publish-depth` and each mark of
/// logged decisions taking `mark_ms` (a slow last stage).
async fn drop_of_600_with(
    fault: Fault,
    publish_depth: usize,
    mark_ms: u64,
) -> (Arc<Hooked<Watch>>, Vec<Uuid>) {
    let (store, ids, _) = drop_of_600_tuned(fault, publish_depth, mark_ms, |_, _| {}).await;
    (store, ids)
}

/// [`drop_of_600_with`], the issuer's configuration and the store's watch
/// tuned by `tune` last; also returns the outcomes read.
async fn drop_of_600_tuned(
    fault: Fault,
    publish_depth: usize,
    mark_ms: u64,
    tune: impl FnOnce(&mut couponrush_issuer::Config, &Watch),
) -> (Arc<Hooked<Watch>>, Vec<Uuid>, Vec<couponrush_core::Outcome>) {
    let mock = MockKafka::start(1).unwrap();
    let topics = Topics::default();
    for spec in topics.specs(1, 1) {
        mock.create_topic(&spec.name, spec.partitions, spec.replication)
            .unwrap();
    }
    let store = Arc::new(Hooked::new(Watch::default()));
    store
        .hooks
        .fail_first
        .store(fault == Fault::FirstCallFails, Ordering::SeqCst);
    store
        .hooks
        .lost_second
        .store(fault == Fault::SecondCallLost, Ordering::SeqCst);
    store.hooks.mark_ms.store(mark_ms, Ordering::SeqCst);
    store
        .put_event(
            "pipe",
            EventSpec {
                stock: 100,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let producer: FutureProducer = couponrush_core::kafka::KafkaSettings::new(mock.brokers())
        .producer_config("t", 10_000)
        .create()
        .unwrap();
    let requests: Vec<IssueRequest> = (0..600)
        .map(|i| IssueRequest::new(Uuid::now_v7(), "pipe".into(), format!("u{i}"), 1))
        .collect();
    // One at a time: the partition holds them in this order.
    for r in &requests {
        producer
            .send(
                FutureRecord::<(), [u8]>::to(&topics.requests)
                    .payload(&r.to_bytes())
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let mut config = couponrush_issuer::Config::local(&mock.brokers());
    config.batch_size = 50;
    config.publish_depth = publish_depth;
    tune(&mut config, &store.hooks);
    let outcomes = common::issue_until(
        config,
        &mock.brokers(),
        store.clone(),
        Duration::from_secs(60),
        common::decided_at_least(requests.len()),
    )
    .await;
    let decided: HashSet<Uuid> = outcomes.iter().map(|o| o.request_id).collect();
    assert_eq!(decided.len(), requests.len(), "every request is decided");
    (
        store,
        requests.iter().map(|r| r.request_id).collect(),
        outcomes,
    )
}

/// The ids in the order the store first saw each.
fn first_seen(calls: &[Vec<Uuid>]) -> Vec<Uuid> {
    let mut seen = HashSet::new();
    calls
        .iter()
        .flatten()
        .copied()
        .filter(|id| seen.insert(*id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_published_while_the_next_is_in_the_store_one_call_at_a_time_in_order() {
    let (store, ids) = drop_of_600(Fault::None).await;
    let w = &store.hooks;
    assert_eq!(
        w.most_at_once.load(Ordering::SeqCst),
        1,
        "the store decides one batch at a time: a batch's call is sent only once the previous one answered"
    );
    assert_eq!(
        first_seen(&w.calls.lock().unwrap()),
        ids,
        "the store decides the requests in offset order"
    );
    let (during, marks) = (
        w.marks_during_a_decide.load(Ordering::SeqCst),
        w.marks.load(Ordering::SeqCst),
    );
    assert!(
        during > 0,
        "a batch's outcomes are published and marked logged while the next batch is in the store \
         ({during} of {marks} marks were)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_call_is_retried_before_the_next_batch_is_sent() {
    let (store, ids) = drop_of_600(Fault::FirstCallFails).await;
    let w = &store.hooks;
    assert_eq!(w.most_at_once.load(Ordering::SeqCst), 1);
    let calls = w.calls.lock().unwrap();
    assert!(calls.len() >= 2);
    assert_eq!(
        calls[1], calls[0],
        "the failed batch is decided again before the next one is sent"
    );
    assert_eq!(
        first_seen(&calls),
        ids,
        "offset order holds across the retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_answer_is_judged_on_a_fresh_call_not_an_old_answer() {
    // The second batch's answer says "unknown event" (the store had lost its
    // state); by the time it is looked at, the store has its epoch again.
    // Judged on that old answer, the batch would be dead-lettered as poison
    // and its requests never decided (drop_of_600 waits for every one).
    let (store, ids) = drop_of_600(Fault::SecondCallLost).await;
    let calls = store.hooks.calls.lock().unwrap();
    assert_eq!(calls[2], calls[1], "the batch is decided again at once");
    assert_eq!(first_seen(&calls), ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_batches_finish_at_once_up_to_one_more_than_the_publish_depth() {
    // Each batch's last stage (acks, then its mark; the mark is what is
    // watched) takes 400 ms, the store 40 ms: with a depth of 4 the thread
    // goes on reading and deciding while several batches finish, at most
    // the one just decided and 4 earlier ones (before, it marked each batch
    // itself, one at a time: at most 1 at once; with the queue unbounded,
    // 10); with a depth of 1, at most 2.
    for (depth, most) in [(4, 3..=5), (1, 1..=2)] {
        let (store, ids) = drop_of_600_with(Fault::None, depth, 400).await;
        let w = &store.hooks;
        let at_once = w.most_marks_at_once.load(Ordering::SeqCst);
        assert!(
            most.contains(&at_once),
            "publish depth {depth}: {at_once} batches finished at once, expected {most:?}"
        );
        assert_eq!(
            w.most_at_once.load(Ordering::SeqCst),
            1,
            "one decide at a time"
        );
        assert_eq!(first_seen(&w.calls.lock().unwrap()), ids, "offset order");
    }
}

/// Sets the recovery fence `margin` over the outcome producer's delivery
/// bound: the issuer's shelf life for a store answer is half of it.
fn fence_over_bound(margin: Duration) -> impl FnOnce(&mut couponrush_issuer::Config, &Watch) {
    move |c, _| {
        let (_, bound) = c.outcome_producer().unwrap();
        c.recovery_fence = bound.total() + margin;
    }
}

/// The batches decided twice in a row: a call with the same requests as
/// the one before it.
fn decided_again(calls: &[Vec<Uuid>]) -> usize {
    calls.windows(2).filter(|w| w[0] == w[1]).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_held_past_its_shelf_life_is_not_published_but_decided_again() {
    // Each batch's last stage takes 1 s and the publish depth is 1, so every
    // other batch's answer (40 ms in the store) sits in hand for most of a
    // second while the thread waits for the batch before. The recovery
    // fence counts on a decision's outcomes being enqueued at once: with a
    // fence 600 ms over the outcome producer's delivery bound the shelf
    // life is 300 ms, and such an answer is dropped and its batch decided
    // again: what is published is then the second call's answer, replays
    // of the first (the store kept it). With a shelf life of 30 s the same
    // drop decides every batch once.
    let (store, ids, outcomes) = drop_of_600_tuned(
        Fault::None,
        1,
        1000,
        fence_over_bound(Duration::from_millis(600)),
    )
    .await;
    let calls = store.hooks.calls.lock().unwrap().clone();
    assert!(
        decided_again(&calls) >= 3,
        "answers held ~1 s past a 300 ms shelf life are decided again: {} of {} calls repeat the one before",
        decided_again(&calls),
        calls.len()
    );
    let again: HashSet<Uuid> = calls
        .windows(2)
        .filter(|w| w[0] == w[1])
        .flat_map(|w| w[1].iter().copied())
        .collect();
    let first_answers: Vec<_> = outcomes
        .iter()
        .filter(|o| again.contains(&o.request_id) && !o.replay)
        .map(|o| o.request_id)
        .collect();
    assert!(
        first_answers.is_empty(),
        "a batch decided again publishes the second answer (replays), never the stale first one: \
         {} outcomes of the first answer published",
        first_answers.len()
    );
    assert!(
        outcomes.iter().any(|o| !o.replay),
        "batches used at once publish their first answer"
    );
    assert_eq!(first_seen(&calls), ids, "offset order holds");
    assert_eq!(store.hooks.most_at_once.load(Ordering::SeqCst), 1);

    let (store, ids, _) = drop_of_600_tuned(
        Fault::None,
        1,
        1000,
        fence_over_bound(Duration::from_secs(60)),
    )
    .await;
    let calls = store.hooks.calls.lock().unwrap().clone();
    assert_eq!(
        decided_again(&calls),
        0,
        "within a 30 s shelf life every answer is used"
    );
    assert_eq!(first_seen(&calls), ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_answer_that_came_past_its_shelf_life_is_not_used() {
    // The first two decide calls take 1.2 s against a 600 ms shelf life:
    // the first (sent ahead by the loop) is dropped when looked at, the
    // second (the thread's own call, deciding the batch again) is dropped
    // as it comes, and a quick one (40 ms) is used. The first batch is
    // therefore decided at least three times in a row (twice without the
    // check on the thread's own calls), and everything once, in order.
    let (store, ids, _) = drop_of_600_tuned(Fault::None, 4, 0, |c, w| {
        fence_over_bound(Duration::from_millis(1200))(c, w);
        w.slow_ms.store(1200, Ordering::SeqCst);
        w.slow_calls.store(2, Ordering::SeqCst);
    })
    .await;
    let calls = store.hooks.calls.lock().unwrap().clone();
    let first_batch_calls = calls.iter().take_while(|c| **c == calls[0]).count();
    assert!(
        first_batch_calls >= 3,
        "the first batch is decided until an answer comes within its shelf life: \
         {first_batch_calls} calls in a row"
    );
    assert_eq!(first_seen(&calls), ids, "offset order holds");
    assert_eq!(store.hooks.most_at_once.load(Ordering::SeqCst), 1);
}
