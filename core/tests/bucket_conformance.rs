//! The store's contract for events whose stock is split over buckets
//! (`stock_buckets` K > 1, see `couponrush_core::store::buckets`), run
//! against a private redis-server, a real Redis Cluster (three masters with
//! a replica each) and the in-memory store:
//! - stock sells out exactly, ranks are disjoint across buckets and within
//!   stock, and each coupon sits in the bucket its user routes to;
//! - the per-user limit is exact (a user's requests all meet one bucket);
//! - replays, status lookups, logged marks, holds and the expiry sweep find
//!   a request's bucket and name the event, not the bucket;
//! - a store rebuilt from the log (one snapshot per bucket) holds the same
//!   ledger, and goes on selling without issuing a rank twice;
//! - on the cluster, the buckets' keys are on different slots; a store
//!   handle that routes by a stale bucket count decides nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::recovery::rebuild_ledger;
use couponrush_core::store::buckets::{bucket_of, owner, tag};
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{
    BatchVerdict, Decision, EventBatch, EventSpec, Ledger, LoggedDecisions, Pending, PendingAction,
    Store, StoreError,
};
use couponrush_core::wire::{
    now_micros, DecisionResult, EventRecord, HoldOutcome, HoldState, HoldVerb, LedgerRecord,
    Outcome, HOLD_KIND, WIRE_VERSION,
};
use couponrush_harness::{RedisCluster, RedisServer};
use uuid::Uuid;

use DecisionResult::*;

const K: u32 = 4;

/// A private redis-server, stopped and its directory removed on drop.
struct PrivateRedis {
    server: Option<RedisServer>,
    dir: std::path::PathBuf,
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.server.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn private_redis() -> PrivateRedis {
    let dir = std::env::temp_dir().join(format!("couponrush-buckets-{}", Uuid::new_v4()));
    let server = RedisServer::start(&dir, false).expect("redis-server on the PATH");
    PrivateRedis {
        server: Some(server),
        dir,
    }
}

impl PrivateRedis {
    fn url(&self) -> String {
        self.server.as_ref().expect("running").url()
    }
}

async fn connect(url: &str) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::connect(url, Duration::from_secs(3600))
            .await
            .expect("the store answers"),
    )
}

async fn shared_cluster() -> Arc<RedisCluster> {
    tokio::task::spawn_blocking(RedisCluster::shared)
        .await
        .unwrap()
        .expect("redis-server and redis-cli on the PATH")
}

fn new_event() -> String {
    format!("b-{}", Uuid::new_v4().simple())
}

fn pending(user: &str) -> Pending {
    Pending {
        request_id: Uuid::now_v7(),
        user_id: user.to_string(),
    }
}

fn spec(stock: u32, per_user_limit: u32, claim_window_us: u64) -> EventSpec {
    EventSpec {
        stock,
        per_user_limit,
        claim_window_us,
        stock_buckets: K,
    }
}

async fn decide_all(
    store: &dyn Store,
    event: &str,
    actions: &[PendingAction],
    requests: &[Pending],
) -> (
    u64,
    Vec<Option<couponrush_core::store::HoldEnd>>,
    Vec<Decision>,
) {
    let batch = EventBatch {
        event_id: event.to_string(),
        requests: requests.to_vec(),
        actions: actions.to_vec(),
    };
    match store
        .decide(&[batch], now_micros())
        .await
        .unwrap()
        .remove(0)
    {
        BatchVerdict::Decided {
            generation,
            decisions,
            holds,
            ..
        } => (generation, holds, decisions),
        BatchVerdict::UnknownEvent => panic!("event {event} unknown"),
    }
}

async fn decide(store: &dyn Store, event: &str, requests: &[Pending]) -> Vec<Decision> {
    decide_all(store, event, &[], requests).await.2
}

/// The ledger's own invariants for a bucketed event: every rank at most
/// once and within stock, each coupon in its user's bucket (so no user
/// holds coupons in two buckets), holders as the coupons count them, and
/// `issued − released + remaining = stock` summed.
fn check_ledger(l: &Ledger, stock: u32) {
    let ranks: BTreeSet<u32> = l.coupons.iter().map(|c| c.rank).collect();
    assert_eq!(ranks.len(), l.coupons.len(), "a rank out twice: {l:?}");
    assert!(ranks.iter().all(|r| (1..=stock).contains(r)), "{ranks:?}");
    for c in &l.coupons {
        assert_eq!(
            owner(u64::from(c.rank), K),
            bucket_of(&c.user_id, K),
            "coupon {c:?} is not in its user's bucket"
        );
    }
    let mut counted: HashMap<&str, u32> = HashMap::new();
    for c in &l.coupons {
        *counted.entry(&c.user_id).or_default() += 1;
    }
    let mut counted: Vec<(String, u32)> = counted
        .into_iter()
        .map(|(u, n)| (u.to_string(), n))
        .collect();
    counted.sort();
    assert_eq!(counted, l.holders);
    assert_eq!(l.state.stock, stock);
    assert_eq!(l.state.stock_buckets, K);
    assert_eq!(
        l.state.issued_total() - l.state.released + l.state.remaining,
        stock
    );
}

/// Many users, one request each, in batches: every coupon is sold once
/// the buckets are all asked past their stock, with ranks 1..=stock each
/// once, each in the bucket of its user.
async fn bucketed_stock_sells_out_with_disjoint_ranks(store: Arc<dyn Store>) {
    let ev = new_event();
    let (state, created) = store.put_event(&ev, spec(10, 1, 0)).await.unwrap();
    assert!(created);
    assert_eq!(
        (state.stock, state.remaining, state.stock_buckets),
        (10, 10, K)
    );
    let users: Vec<Pending> = (0..200).map(|i| pending(&format!("u{i}"))).collect();
    let mut decisions = Vec::new();
    for chunk in users.chunks(37) {
        decisions.extend(decide(&*store, &ev, chunk).await);
    }
    let mut ranks: Vec<u32> = decisions.iter().filter_map(|d| d.issued_rank).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, (1..=10).collect::<Vec<u32>>());
    for (p, d) in users.iter().zip(&decisions) {
        if let Some(rank) = d.issued_rank {
            assert_eq!(owner(u64::from(rank), K), bucket_of(&p.user_id, K));
        }
    }
    let seqs: BTreeSet<u64> = decisions.iter().map(|d| d.seq).collect();
    assert_eq!(seqs.len(), decisions.len(), "decision numbers are unique");
    let state = store.event(&ev).await.unwrap().unwrap();
    assert_eq!((state.stock, state.remaining), (10, 0));
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.coupons.len(), 10);
    check_ledger(&ledger, 10);
}

/// Ten users, five requests each, shuffled over batches, limit 2: each
/// gets exactly two coupons whatever bucket it routes to.
async fn per_user_limit_is_exact_with_buckets(store: Arc<dyn Store>) {
    let ev = new_event();
    store.put_event(&ev, spec(1000, 2, 0)).await.unwrap();
    let mut all: Vec<Pending> = (0..50)
        .map(|i| pending(&format!("user-{}", i % 10)))
        .collect();
    all.reverse();
    let mut issued: HashMap<String, u32> = HashMap::new();
    for chunk in all.chunks(7) {
        for (p, d) in chunk.iter().zip(decide(&*store, &ev, chunk).await) {
            match d.result {
                Issued => *issued.entry(p.user_id.clone()).or_default() += 1,
                LimitReached => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(issued.len(), 10);
    assert!(issued.values().all(|n| *n == 2), "{issued:?}");
    check_ledger(&store.ledger(&ev).await.unwrap().unwrap(), 1000);
}

/// A redelivered request gets its decision back from its bucket; a status
/// lookup finds it without knowing the user; logged marks land in each
/// decision's bucket; a lookup by request id alone names the event.
async fn replays_lookups_and_marks_find_the_bucket(store: Arc<dyn Store>) {
    let ev = new_event();
    store.put_event(&ev, spec(6, 1, 0)).await.unwrap();
    let reqs: Vec<Pending> = (0..12).map(|i| pending(&format!("p{i}"))).collect();
    let first = decide(&*store, &ev, &reqs).await;
    let again = decide(&*store, &ev, &reqs).await;
    for (a, b) in first.iter().zip(&again) {
        assert!(b.replay);
        assert_eq!(
            (a.result, a.issued_rank, a.seq),
            (b.result, b.issued_rank, b.seq)
        );
    }
    let generation = store.event(&ev).await.unwrap().unwrap().generation;
    let logged: Vec<(Uuid, u64)> = reqs
        .iter()
        .zip(&first)
        .step_by(2)
        .map(|(p, d)| (p.request_id, d.seq))
        .collect();
    store
        .mark_logged(&[LoggedDecisions {
            event_id: ev.clone(),
            generation,
            decisions: logged.clone(),
        }])
        .await
        .unwrap();
    for (i, (p, d)) in reqs.iter().zip(&first).enumerate() {
        let found = store.decision(&ev, p.request_id).await.unwrap().unwrap();
        assert_eq!(
            (found.result, found.issued_rank, found.seq),
            (d.result, d.issued_rank, d.seq)
        );
        assert_eq!(found.logged, i % 2 == 0, "request {i}");
        let (event, by_id) = store.find_decision(p.request_id).await.unwrap().unwrap();
        assert_eq!(event, ev, "the event, not the bucket's tag");
        assert_eq!(by_id.seq, d.seq);
    }
    assert_eq!(store.decision(&ev, Uuid::now_v7()).await.unwrap(), None);
}

/// Holds of a bucketed event: an action goes to its user's bucket, so the
/// holder's cancel returns the coupon (to that bucket's free ranks, issued
/// next to a user of the same bucket), another user's cancel decides
/// nothing, and the expiry sweep names the event.
async fn holds_route_to_the_holders_bucket(store: Arc<dyn Store>) {
    let ev = new_event();
    let window = 3_600_000_000;
    store.put_event(&ev, spec(8, 1, window)).await.unwrap();
    let reqs: Vec<Pending> = (0..8).map(|i| pending(&format!("h{i}"))).collect();
    let ds = decide(&*store, &ev, &reqs).await;
    let (i, winner) = ds
        .iter()
        .enumerate()
        .find(|(_, d)| d.result == Issued)
        .expect("something issued");
    let held = &reqs[i];
    let stranger = (0..)
        .map(|n| format!("s{n}"))
        .find(|u| bucket_of(u, K) != bucket_of(&held.user_id, K))
        .unwrap();
    let act = |user: &str| PendingAction {
        request_id: held.request_id,
        user_id: user.to_string(),
        verb: HoldVerb::Cancel,
        at: now_micros(),
    };
    let (_, ends, _) = decide_all(&*store, &ev, &[act(&stranger), act(&held.user_id)], &[]).await;
    assert_eq!(ends[0], None, "another user's cancel decides nothing");
    let end = ends[1].expect("the holder's cancel ends the hold");
    assert_eq!(
        (end.state, Some(end.rank)),
        (HoldState::Released, winner.issued_rank)
    );
    assert_eq!(owner(end.seq, K), bucket_of(&held.user_id, K));
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert!(ledger.free_ranks.contains(&end.rank));
    check_ledger(&ledger, 8);
    let hold = store.hold(&ev, held.request_id).await.unwrap().unwrap();
    assert_eq!(hold.hold.state, HoldState::Released);
    let neighbour = (0..)
        .map(|n| format!("n{n}"))
        .find(|u| bucket_of(u, K) == bucket_of(&held.user_id, K))
        .unwrap();
    let again = decide(&*store, &ev, &[pending(&neighbour)]).await;
    assert_eq!(
        again[0].issued_rank,
        Some(end.rank),
        "the returned rank goes first"
    );
    let due = store.due_holds(u64::MAX, 100).await.unwrap();
    let mine: Vec<_> = due.iter().filter(|d| d.event_id == ev).collect();
    assert_eq!(
        mine.len(),
        ledger.coupons.len() + 1,
        "every coupon held is due"
    );
    assert!(due.iter().all(|d| !d.event_id.contains('#')));
}

/// The issuer's records of what a store decided.
fn records(
    ev: &str,
    generation: u64,
    actions: &[PendingAction],
    requests: &[Pending],
    ends: &[Option<couponrush_core::store::HoldEnd>],
    decisions: &[Decision],
    window: u64,
) -> Vec<LedgerRecord> {
    let mut out = Vec::new();
    for (a, end) in actions.iter().zip(ends) {
        if let Some(e) = end {
            out.push(LedgerRecord::Hold(HoldOutcome {
                v: WIRE_VERSION,
                kind: HOLD_KIND.into(),
                request_id: a.request_id,
                event_id: ev.into(),
                user_id: a.user_id.clone(),
                state: e.state,
                issued_rank: e.rank,
                partition: 0,
                offset: 0,
                action_at: a.at,
                decided_at: e.decided_at,
                replay: e.replay,
                decision_seq: e.seq,
                generation,
            }));
        }
    }
    for (p, d) in requests.iter().zip(decisions) {
        out.push(LedgerRecord::Decision(Outcome {
            v: WIRE_VERSION,
            request_id: p.request_id,
            event_id: ev.into(),
            user_id: p.user_id.clone(),
            result: d.result,
            issued_rank: d.issued_rank,
            partition: 0,
            offset: 0,
            decided_at: d.decided_at,
            replay: d.replay,
            decision_seq: d.seq,
            accepted_at: d.decided_at,
            generation,
            hold_until: (d.result == Issued && window > 0).then_some(d.decided_at + window),
        }));
    }
    out
}

/// A bucketed event decided on `live`, its log folded (one snapshot per
/// bucket) and restored into `fresh`: the same ledger; then both go on
/// alike, and the rebuilt one never issues a rank twice.
async fn a_store_rebuilt_from_the_log_holds_the_same_buckets(
    live: Arc<dyn Store>,
    fresh: Arc<dyn Store>,
) {
    let ev = new_event();
    let window = 3_600_000_000;
    let (state, _) = live.put_event(&ev, spec(30, 2, window)).await.unwrap();
    let mut log = Vec::new();
    let reqs: Vec<Pending> = (0..40).map(|i| pending(&format!("r{}", i % 13))).collect();
    for chunk in reqs.chunks(9) {
        let (g, ends, ds) = decide_all(&*live, &ev, &[], chunk).await;
        log.extend(records(&ev, g, &[], chunk, &ends, &ds, window));
    }
    // Two holders cancel: their ranks go back to their buckets.
    let ledger = live.ledger(&ev).await.unwrap().unwrap();
    let cancels: Vec<PendingAction> = ledger
        .coupons
        .iter()
        .take(2)
        .map(|c| PendingAction {
            request_id: c.request_id,
            user_id: c.user_id.clone(),
            verb: HoldVerb::Cancel,
            at: now_micros(),
        })
        .collect();
    let (g, ends, ds) = decide_all(&*live, &ev, &cancels, &[]).await;
    assert!(ends.iter().all(Option::is_some));
    log.extend(records(&ev, g, &cancels, &[], &ends, &ds, window));

    let definitions = HashMap::from([(
        ev.clone(),
        EventRecord {
            v: WIRE_VERSION,
            event_id: ev.clone(),
            stock: 30,
            per_user_limit: 2,
            generation: state.generation,
            written_at: 0,
            claim_window_us: window,
            stock_buckets: K,
        },
    )]);
    let snapshots = rebuild_ledger(&definitions, &log);
    assert_eq!(snapshots.len(), K as usize, "one snapshot per bucket");
    let owner_id = format!("t-{}", Uuid::new_v4());
    assert!(fresh
        .try_lock_recovery(&owner_id, Duration::from_secs(30))
        .await
        .unwrap());
    fresh.begin_rebuild(&owner_id).await.unwrap();
    for s in &snapshots {
        fresh
            .restore(s, Duration::from_secs(3600), &owner_id)
            .await
            .unwrap();
    }
    fresh
        .set_epoch(&Uuid::now_v7().to_string(), &owner_id)
        .await
        .unwrap();
    fresh.unlock_recovery(&owner_id).await.unwrap();

    let (a, b) = (
        live.ledger(&ev).await.unwrap().unwrap(),
        fresh.ledger(&ev).await.unwrap().unwrap(),
    );
    assert_eq!(a.coupons, b.coupons);
    assert_eq!(a.holders, b.holders);
    assert_eq!(a.free_ranks, b.free_ranks);
    assert_eq!(
        (
            a.state.stock,
            a.state.remaining,
            a.state.released,
            a.state.generation
        ),
        (
            b.state.stock,
            b.state.remaining,
            b.state.released,
            b.state.generation
        )
    );
    assert_eq!(a.holds.len(), b.holds.len());
    check_ledger(&b, 30);
    for p in &reqs {
        assert_eq!(
            live.decision(&ev, p.request_id)
                .await
                .unwrap()
                .map(|d| (d.result, d.issued_rank)),
            fresh
                .decision(&ev, p.request_id)
                .await
                .unwrap()
                .map(|d| (d.result, d.issued_rank)),
        );
    }
    // Both sell the rest the same way, the rebuilt one never a rank twice.
    let more: Vec<Pending> = (0..60).map(|i| pending(&format!("m{i}"))).collect();
    let x = decide(&*live, &ev, &more).await;
    let y = decide(&*fresh, &ev, &more).await;
    let res = |ds: &[Decision]| {
        ds.iter()
            .map(|d| (d.result, d.issued_rank))
            .collect::<Vec<_>>()
    };
    assert_eq!(res(&x), res(&y));
    let after = fresh.ledger(&ev).await.unwrap().unwrap();
    check_ledger(&after, 30);
    assert_eq!(after.state.remaining, 0);
}

macro_rules! buckets_conformance {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = super::private_redis().await;
                    super::$name(super::connect(&server.url()).await).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    let cluster = super::shared_cluster().await;
                    super::$name(super::connect(&cluster.url()).await).await
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(std::sync::Arc::new(
                        couponrush_core::store::memory::MemoryStore::default(),
                    ))
                    .await
                }
            )*
        }
    };
}

buckets_conformance!(
    bucketed_stock_sells_out_with_disjoint_ranks,
    per_user_limit_is_exact_with_buckets,
    replays_lookups_and_marks_find_the_bucket,
    holds_route_to_the_holders_bucket,
);

mod rebuilt {
    use super::*;

    #[tokio::test]
    async fn redis() {
        let (a, b) = (private_redis().await, private_redis().await);
        a_store_rebuilt_from_the_log_holds_the_same_buckets(
            connect(&a.url()).await,
            connect(&b.url()).await,
        )
        .await;
    }

    #[tokio::test]
    async fn cluster() {
        let live = shared_cluster().await;
        let dir = std::env::temp_dir().join(format!("couponrush-cluster-{}", Uuid::new_v4()));
        let fresh = tokio::task::spawn_blocking(move || RedisCluster::start(&dir))
            .await
            .unwrap()
            .expect("redis-server and redis-cli on the PATH");
        a_store_rebuilt_from_the_log_holds_the_same_buckets(
            connect(&live.url()).await,
            connect(&fresh.url()).await,
        )
        .await;
    }

    #[tokio::test]
    async fn memory() {
        a_store_rebuilt_from_the_log_holds_the_same_buckets(
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryStore::needing_recovery(Duration::from_secs(3600))),
        )
        .await;
    }
}

/// On the cluster, the buckets' keys hash to different slots (the point of
/// buckets), and each bucket's state is where its tag says.
#[tokio::test]
async fn buckets_of_one_event_live_on_different_slots() {
    let cluster = shared_cluster().await;
    let store = connect(&cluster.url()).await;
    let ev = new_event();
    store.put_event(&ev, spec(40, 1, 0)).await.unwrap();
    let c = cluster.clone();
    let e = ev.clone();
    let slots: Vec<u16> = tokio::task::spawn_blocking(move || {
        (0..K)
            .map(|b| c.slot_of(&format!("cr:{{{}}}:event", tag(&e, b))).unwrap())
            .collect()
    })
    .await
    .unwrap();
    let distinct: BTreeSet<u16> = slots.iter().copied().collect();
    assert!(distinct.len() > 1, "all {K} buckets on slot {slots:?}");
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.state.stock, 40);
}

/// A handle that learnt the event's bucket count before a redefinition
/// changed it routes by the old one: its call decides nothing (the script
/// checks the count in the same atomic step) and the retry routes right.
async fn a_stale_bucket_count_decides_nothing(url: String) {
    let (a, b) = (connect(&url).await, connect(&url).await);
    let ev = new_event();
    a.put_event(&ev, spec(100, 1, 0)).await.unwrap();
    assert_eq!(decide(&*a, &ev, &[pending("warm")]).await[0].result, Issued);
    b.put_event(
        &ev,
        EventSpec {
            stock_buckets: 7,
            ..spec(100, 1, 0)
        },
    )
    .await
    .unwrap();
    let reqs: Vec<Pending> = (0..30).map(|i| pending(&format!("v{i}"))).collect();
    let batch = EventBatch::requests(ev.clone(), reqs.clone());
    match a.decide(&[batch], now_micros()).await {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("bucket count"), "{why}"),
        other => panic!("a stale bucket count decided: {other:?}"),
    }
    let ds = decide(&*a, &ev, &reqs).await;
    assert!(ds.iter().all(|d| d.result == Issued));
    let ledger = b.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.state.stock_buckets, 7);
    for c in &ledger.coupons {
        assert_eq!(owner(u64::from(c.rank), 7), bucket_of(&c.user_id, 7));
    }
}

/// A smaller K leaves buckets behind: a caller still routing by the old K
/// must be refused there, not decide in a bucket no one reads any more.
async fn buckets_a_smaller_count_leaves_behind_decide_nothing(url: String) {
    let (a, b) = (connect(&url).await, connect(&url).await);
    let ev = new_event();
    let four = EventSpec {
        stock_buckets: 4,
        ..spec(100, 1, 0)
    };
    a.put_event(&ev, four).await.unwrap();
    assert_eq!(decide(&*a, &ev, &[pending("warm")]).await[0].result, Issued);
    b.put_event(
        &ev,
        EventSpec {
            stock_buckets: 2,
            ..spec(100, 1, 0)
        },
    )
    .await
    .unwrap();
    // Users only the old buckets 2 and 3 would take.
    let reqs: Vec<Pending> = (0..400)
        .map(|i| format!("w{i}"))
        .filter(|u| bucket_of(u, 4) >= 2)
        .take(20)
        .map(|u| pending(&u))
        .collect();
    let batch = EventBatch::requests(ev.clone(), reqs.clone());
    match a.decide(&[batch], now_micros()).await {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("bucket count"), "{why}"),
        other => panic!("a request went to a bucket left behind: {other:?}"),
    }
    let ds = decide(&*a, &ev, &reqs).await;
    assert!(ds.iter().all(|d| d.result == Issued));
    let ledger = b.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.state.stock_buckets, 2);
    assert_eq!(
        ledger.coupons.len(),
        reqs.len(),
        "the new generation holds them all"
    );
    for c in &ledger.coupons {
        assert_eq!(owner(u64::from(c.rank), 2), bucket_of(&c.user_id, 2));
    }
}

/// A reader that remembered fewer buckets than the event now has (it was
/// redefined through another process) finds a decision in a bucket it did
/// not know of by the next lookup, not never.
#[tokio::test]
async fn a_reader_that_remembered_fewer_buckets_finds_the_decision() {
    let server = private_redis().await;
    let (a, b) = (connect(&server.url()).await, connect(&server.url()).await);
    let ev = new_event();
    let one = EventSpec {
        stock_buckets: 1,
        ..spec(100, 1, 0)
    };
    a.put_event(&ev, one).await.unwrap();
    assert_eq!(decide(&*a, &ev, &[pending("warm")]).await[0].result, Issued);
    b.put_event(&ev, spec(100, 1, 0)).await.unwrap();
    let p = (0..400)
        .map(|i| pending(&format!("x{i}")))
        .find(|p| bucket_of(&p.user_id, K) != 0)
        .unwrap();
    decide(&*b, &ev, std::slice::from_ref(&p)).await;
    let mut seen = None;
    for _ in 0..2 {
        seen = a.decision(&ev, p.request_id).await.unwrap();
        if seen.is_some() {
            break;
        }
    }
    assert_eq!(
        seen.map(|d| d.result),
        Some(Issued),
        "found by the second lookup"
    );
}

mod shrunk_count {
    #[tokio::test]
    async fn redis() {
        let server = super::private_redis().await;
        super::buckets_a_smaller_count_leaves_behind_decide_nothing(server.url()).await;
    }

    #[tokio::test]
    async fn cluster() {
        let cluster = super::shared_cluster().await;
        super::buckets_a_smaller_count_leaves_behind_decide_nothing(cluster.url()).await;
    }
}

mod stale_count {
    #[tokio::test]
    async fn redis() {
        let server = super::private_redis().await;
        super::a_stale_bucket_count_decides_nothing(server.url()).await;
    }

    #[tokio::test]
    async fn cluster() {
        let cluster = super::shared_cluster().await;
        super::a_stale_bucket_count_decides_nothing(cluster.url()).await;
    }
}

/// K = 1 is the layout before buckets, byte for byte: no bucket fields in
/// the event's hash, and no bucket field in its definition record.
#[tokio::test]
async fn one_bucket_keeps_the_unbucketed_layout() {
    let server = private_redis().await;
    let store = connect(&server.url()).await;
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock_buckets: 1,
                ..spec(5, 1, 0)
            },
        )
        .await
        .unwrap();
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let fields: Vec<String> = ::redis::cmd("HKEYS")
        .arg(format!("cr:{{{ev}}}:event"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !fields.iter().any(|f| f.starts_with("bucket")),
        "{fields:?}"
    );
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("cr:{{{ev}#*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    let record = EventRecord {
        v: WIRE_VERSION,
        event_id: ev,
        stock: 5,
        per_user_limit: 1,
        generation: 1,
        written_at: 0,
        claim_window_us: 0,
        stock_buckets: 1,
    };
    let json = String::from_utf8(record.to_bytes()).unwrap();
    assert!(!json.contains("stock_buckets"), "{json}");
    let old = json.clone();
    assert_eq!(EventRecord::parse(old.as_bytes()).unwrap().stock_buckets, 1);
}
