//! Checkpoints of the ledger against a broker (librdkafka's mock cluster):
//! a rebuild reads the latest checkpoint and the outcomes after it, so what
//! was sold before the checkpoint still counts when the log no longer holds
//! it, and what a rebuild reads is the tail, not the whole ledger.

use std::sync::Arc;
use std::time::Duration;

use couponrush_core::checkpoint::{read_latest, CheckpointWriter, Checkpointer};
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::partitioner::Partitioner;
use couponrush_core::producer::RequestProducer;
use couponrush_core::recovery::Recovery;
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::Store;
use couponrush_core::wire::{EventRecord, Outcome, WIRE_VERSION};
use couponrush_core::{DecisionResult, Topics};
use couponrush_harness::MockKafka;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

fn outcome(event: &str, n: u128, rank: Option<u32>, seq: u64) -> Outcome {
    Outcome {
        v: WIRE_VERSION,
        request_id: Uuid::from_u128(n),
        event_id: event.into(),
        user_id: format!("u{n}"),
        result: if rank.is_some() {
            DecisionResult::Issued
        } else {
            DecisionResult::SoldOut
        },
        issued_rank: rank,
        partition: 0,
        offset: 0,
        decided_at: 1000 + seq,
        replay: false,
        decision_seq: seq,
        accepted_at: 1,
        generation: 1,
        hold_until: None,
    }
}

async fn append(kafka: &KafkaSettings, topic: &str, outcomes: &[Outcome]) {
    let producer: FutureProducer = kafka.producer_config("t", 1000).create().unwrap();
    for o in outcomes {
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&o.request_id.to_string())
                    .payload(&o.to_bytes())
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .expect("appended");
    }
}

struct Setup {
    mock: MockKafka,
    kafka: KafkaSettings,
    topics: Topics,
}

async fn setup() -> Setup {
    let mock = MockKafka::start(1).unwrap();
    let topics = Topics::default();
    for spec in topics.specs(1, 1) {
        mock.create_topic(&spec.name, 1, 1).unwrap();
    }
    let kafka = KafkaSettings::new(mock.brokers());
    let producer =
        RequestProducer::new(&kafka, topics.requests.clone(), Partitioner::Spread, 1, 100).unwrap();
    producer
        .publish_event(
            &topics.events,
            &EventRecord {
                v: WIRE_VERSION,
                event_id: "e".into(),
                stock: 10,
                per_user_limit: 1,
                generation: 1,
                written_at: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    Setup {
        mock,
        kafka,
        topics,
    }
}

fn checkpointer(s: &Setup, outcomes: &str) -> Checkpointer {
    Checkpointer {
        kafka: s.kafka.clone(),
        outcomes: outcomes.into(),
        checkpoints: s.topics.checkpoints.clone(),
        writer: "test".into(),
        every: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_counts_what_was_sold_before_the_checkpoint_when_the_log_no_longer_holds_it() {
    let s = setup().await;
    // Three coupons sold, then checkpointed.
    append(
        &s.kafka,
        &s.topics.outcomes,
        &[
            outcome("e", 1, Some(1), 1),
            outcome("e", 2, Some(2), 2),
            outcome("e", 3, Some(3), 3),
        ],
    )
    .await;
    let mut writer = CheckpointWriter::new(&s.kafka, &s.topics.checkpoints, "test").unwrap();
    let (_, manifest) = checkpointer(&s, &s.topics.outcomes)
        .round(None, &mut writer)
        .await
        .unwrap();
    let manifest = manifest.expect("a checkpoint was written");
    assert_eq!(manifest.offsets, [(0, 3)]);

    // The ledger those sales were on is gone (retention): the log a
    // rebuild reads now holds, below the checkpoint's offset, records of no
    // event, and after it two more decisions.
    let expired = "coupon.outcomes.after-retention";
    s.mock.create_topic(expired, 1, 1).unwrap();
    append(
        &s.kafka,
        expired,
        &[
            outcome("gone", 7, None, 1),
            outcome("gone", 8, None, 2),
            outcome("gone", 9, None, 3),
            outcome("e", 4, Some(4), 4),
            outcome("e", 5, None, 5),
        ],
    )
    .await;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::needing_recovery(Duration::from_secs(60)));
    let recovery = Recovery {
        kafka: s.kafka.clone(),
        topics: Topics {
            outcomes: expired.into(),
            ..s.topics.clone()
        },
        store: store.clone(),
        fence: Duration::from_millis(10),
        retention: Duration::from_secs(60),
        owner: "t".into(),
    };
    let recovered = recovery
        .ensure_ready(Duration::from_secs(60))
        .await
        .unwrap()
        .expect("this caller recovered");
    assert_eq!(recovered.checkpoint, Some(manifest.id));
    assert_eq!(recovered.outcomes_read, 2, "only the tail is read");
    let ledger = store.ledger("e").await.unwrap().unwrap();
    assert_eq!(
        (ledger.coupons.len(), ledger.state.remaining),
        (4, 6),
        "the three coupons sold before the checkpoint are not sold again"
    );
    let sold_out = store.decision("e", Uuid::from_u128(5)).await.unwrap();
    assert_eq!(
        sold_out.map(|d| d.result),
        Some(DecisionResult::SoldOut),
        "the tail's other decisions are restored"
    );
    let first = store
        .decision("e", Uuid::from_u128(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.issued_rank, first.seq, first.logged),
        (Some(1), 1, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_checkpoints_what_is_new_and_the_latest_checkpoint_is_whole() {
    let s = setup().await;
    let c = checkpointer(&s, &s.topics.outcomes);
    let mut writer = CheckpointWriter::new(&s.kafka, &s.topics.checkpoints, "test").unwrap();
    // Enough coupons for several parts.
    let first: Vec<Outcome> = (1..=9000u128)
        .map(|n| outcome("e", n, Some(n as u32), n as u64))
        .collect();
    append(&s.kafka, &s.topics.outcomes, &first).await;
    let (fold, written) = c.round(None, &mut writer).await.unwrap();
    let one = written.expect("first checkpoint");
    assert_eq!(one.events[0].parts, 3);
    // Nothing new: no checkpoint.
    let (fold, written) = c.round(Some(fold), &mut writer).await.unwrap();
    assert!(written.is_none());
    append(
        &s.kafka,
        &s.topics.outcomes,
        &[outcome("e", 9001, Some(9001), 9001)],
    )
    .await;
    let (_, written) = c.round(Some(fold), &mut writer).await.unwrap();
    let two = written.expect("second checkpoint");
    let (kafka, topic) = (s.kafka.clone(), s.topics.checkpoints.clone());
    let (latest, fold) = tokio::task::spawn_blocking(move || read_latest(&kafka, &topic))
        .await
        .unwrap()
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(latest.id, two.id);
    assert_eq!(fold.events["e"].coupons.len(), 9001);
    assert_eq!(fold.events["e"].seq, 9001);
    assert_eq!(fold.offsets[&0], 9001);
    // A fresh checkpointer starts from it.
    let (resumed, _) = c.round(None, &mut writer).await.unwrap();
    assert_eq!(resumed.events["e"].coupons.len(), 9001);
}

/// A store lost with holds outstanding is rebuilt through the real reading
/// path (events topic, latest checkpoint, the outcomes after it, decisions
/// and hold ends alike): a released coupon's rank went to a later request
/// before the checkpoint, a claim came after it; the rebuilt store holds
/// the same holds and counters, and a hold still held expires after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_restores_holds_across_a_checkpoint_and_an_expiry_still_happens() {
    use couponrush_core::store::{BatchVerdict, EventBatch, PendingAction};
    use couponrush_core::wire::{HoldOutcome, HoldState, HoldVerb, HOLD_KIND};
    let s = setup().await;
    let window = 60_000_000;
    let producer = RequestProducer::new(
        &s.kafka,
        s.topics.requests.clone(),
        Partitioner::Spread,
        1,
        100,
    )
    .unwrap();
    producer
        .publish_event(
            &s.topics.events,
            &EventRecord {
                v: WIRE_VERSION,
                event_id: "h".into(),
                stock: 10,
                per_user_limit: 1,
                generation: 1,
                written_at: 1,
                claim_window_us: window,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let held = |n: u128, rank: u32, seq: u64| {
        let mut o = outcome("h", n, Some(rank), seq);
        o.hold_until = Some(o.decided_at + window);
        o.to_bytes()
    };
    let end = |n: u128, state: HoldState, rank: u32, seq: u64| {
        HoldOutcome {
            v: WIRE_VERSION,
            kind: HOLD_KIND.into(),
            request_id: Uuid::from_u128(n),
            event_id: "h".into(),
            user_id: format!("u{n}"),
            state,
            issued_rank: rank,
            partition: 0,
            offset: 0,
            action_at: 1,
            decided_at: 2000 + seq,
            replay: false,
            decision_seq: seq,
            generation: 1,
        }
        .to_bytes()
    };
    let append_bytes = |records: Vec<(u128, Vec<u8>)>| {
        let kafka = s.kafka.clone();
        let topic = s.topics.outcomes.clone();
        async move {
            let producer: FutureProducer = kafka.producer_config("t", 1000).create().unwrap();
            for (n, bytes) in records {
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&Uuid::from_u128(n).to_string())
                            .payload(&bytes)
                            .partition(0),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("appended");
            }
        }
    };
    append_bytes(vec![
        (1, held(1, 1, 1)),
        (2, held(2, 2, 2)),
        (1, end(1, HoldState::Released, 1, 3)),
        (3, held(3, 1, 4)),
    ])
    .await;
    let mut writer = CheckpointWriter::new(&s.kafka, &s.topics.checkpoints, "test").unwrap();
    let (_, manifest) = checkpointer(&s, &s.topics.outcomes)
        .round(None, &mut writer)
        .await
        .unwrap();
    assert!(manifest.is_some());
    append_bytes(vec![(2, end(2, HoldState::Claimed, 2, 5))]).await;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::needing_recovery(Duration::from_secs(60)));
    let recovery = Recovery {
        kafka: s.kafka.clone(),
        topics: s.topics.clone(),
        store: store.clone(),
        fence: Duration::from_millis(10),
        retention: Duration::from_secs(60),
        owner: "t".into(),
    };
    let recovered = recovery
        .ensure_ready(Duration::from_secs(60))
        .await
        .unwrap()
        .expect("this caller recovered");
    assert_eq!(recovered.outcomes_read, 1, "only the tail is read");
    let ledger = store.ledger("h").await.unwrap().unwrap();
    let out: Vec<(u32, Uuid)> = ledger
        .coupons
        .iter()
        .map(|c| (c.rank, c.request_id))
        .collect();
    assert_eq!(out, [(1, Uuid::from_u128(3)), (2, Uuid::from_u128(2))]);
    let st = &ledger.state;
    assert_eq!(
        (st.remaining, st.released, st.claimed, st.claim_window_us),
        (8, 1, 1, window)
    );
    let states: Vec<(u128, HoldState)> = ledger
        .holds
        .iter()
        .map(|h| (h.request_id.as_u128(), h.state))
        .collect();
    assert_eq!(
        states,
        [
            (1, HoldState::Released),
            (2, HoldState::Claimed),
            (3, HoldState::Held)
        ]
    );
    // Request 3's hold (issued at 1004) expires after the rebuild, with the
    // next decision number.
    let due = 1004 + window;
    assert_eq!(store.due_holds(due, 10).await.unwrap().len(), 1);
    let verdict = store
        .decide(
            &[EventBatch {
                event_id: "h".into(),
                requests: vec![],
                actions: vec![PendingAction {
                    request_id: Uuid::from_u128(3),
                    user_id: "u3".into(),
                    verb: HoldVerb::Expire,
                    at: due,
                }],
            }],
            due,
        )
        .await
        .unwrap();
    let BatchVerdict::Decided { holds, .. } = &verdict[0] else {
        panic!("the event is known")
    };
    let e = holds[0].expect("the hold expires");
    assert_eq!((e.state, e.rank, e.seq), (HoldState::Expired, 1, 6));
    assert_eq!(store.event("h").await.unwrap().unwrap().remaining, 9);
}
