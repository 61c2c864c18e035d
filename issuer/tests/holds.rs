//! Holds end to end through an issuer: one in-process issuer on
//! librdkafka's mock cluster and a private redis-server (its expiry sweep
//! must not see other tests' events). Requests go to the requests topic and
//! actions to the compensations topic as the api writes them; what the
//! issuer decided is read back from the outcomes topic.
//!
//! Checked: winners who cancel give their coupons back, the outcomes topic
//! holds their `released` records and the re-issues of their ranks, and the
//! store's counters keep `issued_total − released + remaining = stock`; a
//! redelivered action restates its end (`replay`, same number and time)
//! and changes nothing, an action by someone else publishes nothing; the
//! sweep expires a hold nobody claimed, and the coupon is issued again.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::cli::parse_ignoring_env;
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{EventSpec, Store};
use couponrush_core::wire::{
    now_micros, HoldAction, HoldOutcome, HoldState, HoldVerb, LedgerRecord,
};
use couponrush_core::{DecisionResult, IssueRequest, Outcome, Topics};
use couponrush_harness::{MockKafka, RedisServer, TopicReader};
use couponrush_issuer::{run_issuer, Cli, Totals};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Rig {
    mock: MockKafka,
    store: Arc<dyn Store>,
    producer: FutureProducer,
    topics: Topics,
    shutdown: CancellationToken,
    issuer: Option<JoinHandle<Result<Totals, couponrush_issuer::IssuerError>>>,
    redis: Option<RedisServer>,
    dir: std::path::PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.redis.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An issuer sweeping every `sweep`, over event `drop` with `stock`
/// coupons held for `window_us`.
async fn rig(stock: u32, window_us: u64, sweep: &str) -> Rig {
    let mock = MockKafka::start(1).unwrap();
    let topics = Topics::default();
    for spec in topics.specs(2, 1) {
        mock.create_topic(&spec.name, spec.partitions, 1).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("couponrush-holds-{}", Uuid::new_v4()));
    let redis = RedisServer::start(&dir, false).expect("redis-server on the PATH");
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&redis.url(), Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    store
        .put_event(
            "drop",
            EventSpec {
                stock,
                per_user_limit: 1,
                claim_window_us: window_us,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let config = parse_ignoring_env::<Cli>(&[
        "coupon-issuer",
        "--brokers",
        &mock.brokers(),
        "--sweep-every",
        sweep,
        "--checkpoint-every",
        "0s",
    ])
    .config();
    let shutdown = CancellationToken::new();
    let issuer = tokio::spawn(run_issuer(config, store.clone(), shutdown.clone()));
    let producer = KafkaSettings::new(mock.brokers())
        .producer_config("test", 1000)
        .create()
        .unwrap();
    Rig {
        mock,
        store,
        producer,
        topics,
        shutdown,
        issuer: Some(issuer),
        redis: Some(redis),
        dir,
    }
}

impl Rig {
    async fn send(&self, topic: &str, key: Uuid, payload: Vec<u8>) {
        let key = key.to_string();
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key(key.as_bytes())
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    async fn request(&self, user: &str) -> Uuid {
        let r = IssueRequest::new(Uuid::now_v7(), "drop".into(), user.into(), now_micros());
        self.send(&self.topics.requests, r.request_id, r.to_bytes())
            .await;
        r.request_id
    }

    async fn act(&self, verb: HoldVerb, id: Uuid, user: &str) -> HoldAction {
        let a = HoldAction::new(verb, id, "drop".into(), user.into(), now_micros());
        self.send(&self.topics.compensations, id, a.to_bytes())
            .await;
        a
    }

    async fn stop(mut self) -> Totals {
        self.shutdown.cancel();
        let issuer = self.issuer.take().expect("stopped once");
        issuer.await.unwrap().unwrap()
    }
}

/// Everything on the outcomes topic so far, until `done` says so (60 s at
/// most).
fn ledger(
    reader: &TopicReader,
    all: &mut Vec<LedgerRecord>,
    done: impl Fn(&[LedgerRecord]) -> bool,
) {
    reader.read_until(
        all,
        Duration::from_secs(60),
        |r| LedgerRecord::parse(&r.payload).expect("ledger records parse"),
        done,
    );
}

fn decisions(all: &[LedgerRecord]) -> HashMap<Uuid, Outcome> {
    all.iter()
        .filter_map(|r| match r {
            LedgerRecord::Decision(o) if !o.replay => Some((o.request_id, o.clone())),
            _ => None,
        })
        .collect()
}

fn ends(all: &[LedgerRecord]) -> Vec<HoldOutcome> {
    all.iter()
        .filter_map(|r| match r {
            LedgerRecord::Hold(h) => Some(h.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn winners_who_cancel_give_their_coupons_to_the_next_requests_through_the_log() {
    let rig = rig(3, 3_600_000_000, "0s").await;
    let reader = TopicReader::new(&rig.mock.brokers(), &rig.topics.outcomes).unwrap();
    let mut all = Vec::new();
    let mut first = Vec::new();
    for user in ["a", "b", "c"] {
        first.push(rig.request(user).await);
    }
    ledger(&reader, &mut all, |l| decisions(l).len() >= 3);
    let d = decisions(&all);
    for id in &first {
        assert_eq!(d[id].result, DecisionResult::Issued);
        assert!(
            d[id].hold_until.unwrap() > d[id].decided_at,
            "an issued coupon of an event with holds says until when it is held"
        );
    }
    // a and b cancel; mallory tries to cancel c's coupon.
    let cancel_a = rig.act(HoldVerb::Cancel, first[0], "a").await;
    rig.act(HoldVerb::Cancel, first[1], "b").await;
    rig.act(HoldVerb::Cancel, first[2], "mallory").await;
    ledger(&reader, &mut all, |l| ends(l).len() >= 2);
    let released = ends(&all);
    assert!(released
        .iter()
        .all(|h| h.state == HoldState::Released && !h.replay));
    let returned: Vec<u32> = {
        let mut r: Vec<u32> = released.iter().map(|h| h.issued_rank).collect();
        r.sort_unstable();
        r
    };
    // The three requests may be decided in any order (they can sit on
    // different partitions), so a's and b's ranks are compared as a set.
    let mut cancelled = [
        d[&first[0]].issued_rank.unwrap(),
        d[&first[1]].issued_rank.unwrap(),
    ];
    cancelled.sort_unstable();
    assert_eq!(returned, cancelled);
    // Three more requests: two get the returned ranks, the third is sold out.
    let mut more = Vec::new();
    for user in ["d", "e", "f"] {
        more.push(rig.request(user).await);
    }
    ledger(&reader, &mut all, |l| decisions(l).len() >= 6);
    let d = decisions(&all);
    let mut reissued: Vec<u32> = more.iter().filter_map(|id| d[id].issued_rank).collect();
    reissued.sort_unstable();
    assert_eq!(reissued, returned, "the returned ranks are issued again");
    assert_eq!(
        more.iter()
            .filter(|id| d[*id].result == DecisionResult::SoldOut)
            .count(),
        1
    );
    let seq_of_release = released.iter().map(|h| h.decision_seq).max().unwrap();
    assert!(
        more.iter().all(|id| d[id].decision_seq > seq_of_release),
        "one order for everything the store decided"
    );
    let state = rig.store.event("drop").await.unwrap().unwrap();
    assert_eq!(
        (
            state.issued_total(),
            state.released,
            state.remaining,
            state.stock
        ),
        (5, 2, 0, 3)
    );
    // a's cancel redelivered: restated, nothing changes.
    let before = rig.store.ledger("drop").await.unwrap().unwrap();
    rig.send(&rig.topics.compensations, first[0], cancel_a.to_bytes())
        .await;
    ledger(&reader, &mut all, |l| ends(l).iter().any(|h| h.replay));
    let original = released.iter().find(|h| h.request_id == first[0]).unwrap();
    let replay = ends(&all).into_iter().find(|h| h.replay).unwrap();
    assert_eq!(
        (
            replay.request_id,
            replay.decision_seq,
            replay.decided_at,
            replay.state
        ),
        (
            original.request_id,
            original.decision_seq,
            original.decided_at,
            HoldState::Released
        )
    );
    assert_eq!(rig.store.ledger("drop").await.unwrap().unwrap(), before);
    assert!(
        ends(&all).iter().all(|h| h.user_id != "mallory"),
        "someone else's action publishes nothing"
    );
    let totals = rig.stop().await;
    assert_eq!(totals.hold_ends, 2);
    assert!(totals.actions_ignored >= 1, "{totals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_expires_a_hold_nobody_claimed_and_its_coupon_is_issued_again() {
    // A claim window of half a second, swept every 100 ms.
    let rig = rig(1, 500_000, "100ms").await;
    let reader = TopicReader::new(&rig.mock.brokers(), &rig.topics.outcomes).unwrap();
    let mut all = Vec::new();
    let a = rig.request("a").await;
    ledger(&reader, &mut all, |l| {
        ends(l).iter().any(|h| h.state == HoldState::Expired)
    });
    let expired: Vec<HoldOutcome> = ends(&all)
        .into_iter()
        .filter(|h| h.state == HoldState::Expired && !h.replay)
        .collect();
    assert_eq!(expired.len(), 1, "{all:?}");
    assert_eq!(
        (expired[0].request_id, expired[0].user_id.as_str()),
        (a, "a")
    );
    let issued = &decisions(&all)[&a];
    assert!(
        expired[0].decided_at >= issued.hold_until.unwrap(),
        "expired only once due"
    );
    assert!(rig.store.due_holds(u64::MAX, 10).await.unwrap().is_empty());
    // The coupon went back: the next request gets rank 1 again.
    let b = rig.request("b").await;
    ledger(&reader, &mut all, |l| decisions(l).contains_key(&b));
    assert_eq!(decisions(&all)[&b].issued_rank, Some(1));
    let state = rig.store.event("drop").await.unwrap().unwrap();
    assert_eq!(state.issued_total(), 2);
    assert!(
        (1..=2).contains(&state.released),
        "a's expiry, and b's if it came due meanwhile: {state:?}"
    );
    rig.stop().await;
}
