//! One conformance suite, run against every store: the Redis store (against a
//! real redis-server at `REDIS_URL`, default `redis://127.0.0.1:6379`, and
//! against a real Redis Cluster of three masters with a replica each, which
//! the tests start) and the in-memory store. Each test uses fresh random event ids, so tests run in
//! parallel against one server without seeing each other. Recovery tests
//! (`fresh_*`) each get a store that never held state (a private
//! redis-server; a memory store without its epoch): they take the global
//! recovery lock and write the epoch, which the shared server's other users
//! must not see.

use std::sync::Arc;
use std::time::Duration;

use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::redis::{RedisStore, MAX_REQUESTS_PER_CALL};
use couponrush_core::store::{
    BatchVerdict, Coupon, Decision, EventBatch, EventSnapshot, EventSpec, EventState,
    LoggedDecisions, Pending, RestoredDecision, Store, StoreError,
};
use couponrush_core::wire::{now_micros, DecisionResult};
use couponrush_harness::{RedisCluster, RedisServer};
use uuid::Uuid;

use DecisionResult::*;

/// A Redis store on a redis-server of its own (stopped and its directory
/// removed when the guard drops). Not the machine's shared server: whose
/// epoch it holds depends on which build last rebuilt it, and a build whose
/// scripts differ finds it lost until a recovery runs.
async fn redis_store(retention: Duration) -> (Arc<dyn Store>, PrivateRedis) {
    let dir = std::env::temp_dir().join(format!("couponrush-conformance-{}", Uuid::new_v4()));
    let server = RedisServer::start(&dir, false).expect("redis-server on the PATH");
    let store = RedisStore::connect(&server.url(), retention)
        .await
        .expect("the private redis-server answers");
    (
        Arc::new(store),
        PrivateRedis {
            server: Some(server),
            dir,
        },
    )
}

async fn memory_store(retention: Duration) -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(retention))
}

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

/// A Redis store that has never held state (no epoch), on a server of its
/// own: recovery tests clear and take the global epoch and recovery lock,
/// which the shared server's other users must never see.
async fn fresh_redis_store() -> (Arc<dyn Store>, PrivateRedis) {
    let dir = std::env::temp_dir().join(format!("couponrush-conformance-{}", Uuid::new_v4()));
    let server = RedisServer::start(&dir, false).expect("redis-server on the PATH");
    let store = RedisStore::connect(&server.url(), Duration::from_secs(3600))
        .await
        .unwrap();
    let guard = PrivateRedis {
        server: Some(server),
        dir,
    };
    (Arc::new(store), guard)
}

/// A Redis store on the shared cluster; keep the cluster while testing.
async fn cluster_store(retention: Duration) -> (Arc<dyn Store>, Arc<RedisCluster>) {
    let cluster = tokio::task::spawn_blocking(RedisCluster::shared)
        .await
        .unwrap()
        .expect("redis-server and redis-cli on the PATH");
    let store = RedisStore::connect(&cluster.url(), retention)
        .await
        .unwrap();
    (Arc::new(store), cluster)
}

/// A Redis store on a cluster of its own that never held state.
async fn fresh_cluster_store() -> (Arc<dyn Store>, RedisCluster) {
    let dir = std::env::temp_dir().join(format!("couponrush-cluster-{}", Uuid::new_v4()));
    let cluster = tokio::task::spawn_blocking(move || RedisCluster::start(&dir))
        .await
        .unwrap()
        .expect("redis-server and redis-cli on the PATH");
    let store = RedisStore::connect(&cluster.url(), Duration::from_secs(3600))
        .await
        .unwrap();
    (Arc::new(store), cluster)
}

/// A memory store that has lost its state (no epoch), like a Redis
/// restarted without persistence.
async fn fresh_memory_store() -> (Arc<dyn Store>, ()) {
    (
        Arc::new(MemoryStore::needing_recovery(Duration::from_secs(3600))),
        (),
    )
}

fn new_event() -> String {
    format!("t-{}", Uuid::new_v4().simple())
}

fn pending(user: &str) -> Pending {
    Pending {
        request_id: Uuid::now_v7(),
        user_id: user.to_string(),
    }
}

async fn decide(store: &dyn Store, event: &str, reqs: &[Pending]) -> Vec<Decision> {
    let batch = EventBatch {
        event_id: event.to_string(),
        requests: reqs.to_vec(),
        actions: Vec::new(),
    };
    match store
        .decide(&[batch], now_micros())
        .await
        .unwrap()
        .remove(0)
    {
        BatchVerdict::Decided { decisions, .. } => decisions,
        BatchVerdict::UnknownEvent => panic!("event {event} unknown"),
    }
}

fn results(ds: &[Decision]) -> Vec<(DecisionResult, Option<u32>)> {
    ds.iter().map(|d| (d.result, d.issued_rank)).collect()
}

/// Restores `snapshot` as a recoverer would: holding the recovery lock of a
/// store without its epoch.
async fn restore_as_recoverer(store: &dyn Store, snapshot: &EventSnapshot) {
    let owner = format!("t-{}", Uuid::new_v4());
    assert!(store
        .try_lock_recovery(&owner, Duration::from_secs(30))
        .await
        .unwrap());
    store
        .restore(snapshot, Duration::from_secs(60), &owner)
        .await
        .unwrap();
    store.unlock_recovery(&owner).await.unwrap();
}

async fn first_delivery_issues_in_arrival_order(store: Arc<dyn Store>) {
    let ev = new_event();
    let (state, created) = store
        .put_event(
            &ev,
            EventSpec {
                stock: 2,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    assert!(created);
    assert_eq!(state.remaining, 2);
    let reqs = [pending("a"), pending("b"), pending("c")];
    let ds = decide(&*store, &ev, &reqs).await;
    assert_eq!(
        results(&ds),
        [(Issued, Some(1)), (Issued, Some(2)), (SoldOut, None)]
    );
    assert!(ds.iter().all(|d| !d.replay));
    let seqs: Vec<u64> = ds.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, [1, 2, 3], "decision order is numbered");
    let more = decide(&*store, &ev, &[pending("d")]).await;
    assert_eq!(more[0].seq, 4, "numbering continues across calls");
    let state = store.event(&ev).await.unwrap().unwrap();
    assert_eq!((state.remaining, state.issued()), (0, 2));
    assert!(state.sold_out());
}

async fn replay_of_every_result_is_the_same_decision(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 1,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let win = pending("a");
    let limit = pending("a");
    let sold = pending("b");
    let first = decide(&*store, &ev, &[win.clone(), limit.clone(), sold.clone()]).await;
    assert_eq!(
        results(&first),
        [(Issued, Some(1)), (LimitReached, None), (SoldOut, None)]
    );
    // Redelivered in another order, later: each gets its own first decision back.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let again = decide(&*store, &ev, &[sold.clone(), win.clone(), limit.clone()]).await;
    assert_eq!(
        results(&again),
        [(SoldOut, None), (Issued, Some(1)), (LimitReached, None)]
    );
    assert!(again.iter().all(|d| d.replay));
    let seqs: Vec<u64> = again.iter().map(|d| d.seq).collect();
    assert_eq!(
        seqs,
        [first[2].seq, first[0].seq, first[1].seq],
        "replays keep their number"
    );
    assert_eq!(again[1].decided_at, first[0].decided_at);
    assert_eq!(again[0].decided_at, first[2].decided_at);
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.coupons.len(), 1);
    assert_eq!(ledger.coupons[0].request_id, win.request_id);
    assert_eq!(ledger.holders, vec![("a".to_string(), 1)]);
}

async fn the_same_request_twice_in_one_batch_is_decided_once(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 5,
                per_user_limit: 3,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let r = pending("a");
    let ds = decide(&*store, &ev, &[r.clone(), r.clone(), r]).await;
    assert_eq!(
        results(&ds),
        [(Issued, Some(1)), (Issued, Some(1)), (Issued, Some(1))]
    );
    assert_eq!(
        (ds[0].replay, ds[1].replay, ds[2].replay),
        (false, true, true)
    );
    assert_eq!(store.event(&ev).await.unwrap().unwrap().remaining, 4);
}

async fn per_user_limit_counts_coupons_held(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 10,
                per_user_limit: 2,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let ds = decide(
        &*store,
        &ev,
        &[pending("a"), pending("a"), pending("b"), pending("a")],
    )
    .await;
    assert_eq!(
        results(&ds),
        [
            (Issued, Some(1)),
            (Issued, Some(2)),
            (Issued, Some(3)),
            (LimitReached, None)
        ]
    );
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(
        ledger.holders,
        vec![("a".to_string(), 2), ("b".to_string(), 1)]
    );
}

async fn limit_is_checked_before_stock(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 1,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let ds = decide(&*store, &ev, &[pending("a"), pending("a")]).await;
    assert_eq!(results(&ds), [(Issued, Some(1)), (LimitReached, None)]);
}

async fn zero_stock_sells_nothing(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 0,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let ds = decide(&*store, &ev, &[pending("a")]).await;
    assert_eq!(results(&ds), [(SoldOut, None)]);
}

async fn last_unit_goes_to_exactly_one_of_concurrent_batches(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 1,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let ev = ev.clone();
            tokio::spawn(async move {
                let reqs: Vec<Pending> = (0..8).map(|j| pending(&format!("u{i}-{j}"))).collect();
                decide(&*store, &ev, &reqs).await
            })
        })
        .collect();
    let mut issued = 0;
    for t in tasks {
        issued += t
            .await
            .unwrap()
            .iter()
            .filter(|d| d.result == Issued)
            .count();
    }
    assert_eq!(issued, 1);
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.coupons.len(), 1);
    assert_eq!(ledger.state.remaining, 0);
}

async fn unknown_event_is_reported_not_decided(store: Arc<dyn Store>) {
    let known = new_event();
    store
        .put_event(
            &known,
            EventSpec {
                stock: 1,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let batches = [
        EventBatch {
            event_id: new_event(),
            requests: vec![pending("a")],
            actions: Vec::new(),
        },
        EventBatch {
            event_id: known.clone(),
            requests: vec![pending("a")],
            actions: Vec::new(),
        },
    ];
    let verdicts = store.decide(&batches, now_micros()).await.unwrap();
    assert_eq!(verdicts[0], BatchVerdict::UnknownEvent);
    assert!(
        matches!(&verdicts[1], BatchVerdict::Decided { generation: 1, decisions, .. } if decisions[0].result == Issued)
    );
    assert!(store.event(&batches[0].event_id).await.unwrap().is_none());
}

async fn a_request_id_reused_by_another_user_is_a_duplicate(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 5,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let original = pending("a");
    let forged = Pending {
        request_id: original.request_id,
        user_id: "mallory".into(),
    };
    let ds = decide(&*store, &ev, &[original.clone(), forged]).await;
    assert_eq!(results(&ds), [(Issued, Some(1)), (Duplicate, None)]);
    assert_eq!(ds[1].seq, 0, "a duplicate decides nothing");
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.coupons.len(), 1);
    // The original's decision stands and is what a status lookup sees.
    let d = store
        .decision(&ev, original.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((d.result, d.issued_rank), (Issued, Some(1)));
}

async fn reset_voids_earlier_decisions(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 1,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let r = pending("a");
    decide(&*store, &ev, std::slice::from_ref(&r)).await;
    let (state, created) = store
        .put_event(
            &ev,
            EventSpec {
                stock: 3,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    assert!(!created);
    assert_eq!((state.remaining, state.stock), (3, 3));
    assert!(store.decision(&ev, r.request_id).await.unwrap().is_none());
    let ds = decide(&*store, &ev, &[r]).await;
    assert_eq!(results(&ds), [(Issued, Some(1))]);
    assert!(!ds[0].replay);
    assert_eq!(ds[0].seq, 1, "a reset restarts the numbering");
    assert_eq!(store.ledger(&ev).await.unwrap().unwrap().coupons.len(), 1);
}

async fn a_definition_is_applied_only_if_newer(store: Arc<dyn Store>) {
    let ev = new_event();
    let spec = |stock| EventSpec {
        stock,
        per_user_limit: 1,
        claim_window_us: 0,
        stock_buckets: 1,
    };
    // Two PUTs claim their generations, then apply them in the other order.
    let older = store.claim_generation(&ev).await.unwrap();
    let newer = store.claim_generation(&ev).await.unwrap();
    assert!(newer > older);
    let d = store.define_event(&ev, spec(20), newer).await.unwrap();
    assert!(d.applied && d.created);
    assert_eq!((d.state.generation, d.state.stock), (newer, 20));
    decide(&*store, &ev, &[pending("a")]).await;
    let d = store.define_event(&ev, spec(10), older).await.unwrap();
    assert!(!d.applied && !d.created, "an older definition is refused");
    assert_eq!(
        (d.state.generation, d.state.stock, d.state.remaining),
        (newer, 20, 19),
        "and the live one is untouched"
    );
    assert!(
        !store
            .define_event(&ev, spec(10), newer)
            .await
            .unwrap()
            .applied
    );
    // A store-only reset claims past every generation claimed so far.
    let skipped = store.claim_generation(&ev).await.unwrap();
    let (state, created) = store.put_event(&ev, spec(5)).await.unwrap();
    assert!(!created);
    assert_eq!((state.generation, state.remaining), (skipped + 1, 5));
    assert_eq!(store.event(&ev).await.unwrap(), Some(state));
}

async fn status_lookup_sees_decisions_only(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 1,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let a = pending("a");
    assert!(store.decision(&ev, a.request_id).await.unwrap().is_none());
    decide(&*store, &ev, &[a.clone(), pending("b")]).await;
    let d = store.decision(&ev, a.request_id).await.unwrap().unwrap();
    assert_eq!((d.result, d.issued_rank), (Issued, Some(1)));
    assert!(store
        .decision(&new_event(), a.request_id)
        .await
        .unwrap()
        .is_none());
    let (found_in, d) = store.find_decision(a.request_id).await.unwrap().unwrap();
    assert_eq!((found_in.as_str(), d.result), (ev.as_str(), Issued));
    assert!(store.find_decision(Uuid::now_v7()).await.unwrap().is_none());
}

async fn batches_larger_than_one_script_call_stay_in_order(store: Arc<dyn Store>) {
    let ev = new_event();
    let n = MAX_REQUESTS_PER_CALL * 2 + 37;
    let stock = MAX_REQUESTS_PER_CALL as u32 + 5;
    store
        .put_event(
            &ev,
            EventSpec {
                stock,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let reqs: Vec<Pending> = (0..n).map(|i| pending(&format!("u{i}"))).collect();
    let ds = decide(&*store, &ev, &reqs).await;
    assert_eq!(ds.len(), n);
    for (i, d) in ds.iter().enumerate() {
        if i < stock as usize {
            assert_eq!((d.result, d.issued_rank), (Issued, Some(i as u32 + 1)));
        } else {
            assert_eq!(d.result, SoldOut, "request {i}");
        }
    }
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.coupons.len(), stock as usize);
    assert!(ledger
        .coupons
        .iter()
        .zip(&reqs)
        .all(|(c, r)| c.request_id == r.request_id && c.user_id == r.user_id));
}

async fn dedup_records_expire_after_retention(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 5,
                per_user_limit: 5,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let r = pending("a");
    decide(&*store, &ev, std::slice::from_ref(&r)).await;
    assert!(decide(&*store, &ev, std::slice::from_ref(&r)).await[0].replay);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(store.decision(&ev, r.request_id).await.unwrap().is_none());
    let ds = decide(&*store, &ev, &[r]).await;
    assert_eq!(results(&ds), [(Issued, Some(2))]);
    assert!(!ds[0].replay);
}

async fn invalid_specs_are_refused(store: Arc<dyn Store>) {
    let ev = new_event();
    assert!(store
        .put_event(
            &ev,
            EventSpec {
                stock: 1,
                per_user_limit: 0,
                claim_window_us: 0,
                stock_buckets: 1,
            }
        )
        .await
        .is_err());
    assert!(store.event(&ev).await.unwrap().is_none());
}

async fn user_ids_with_separators_round_trip(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 2,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let odd = pending("a|b|c 김 {x}");
    let ds = decide(&*store, &ev, std::slice::from_ref(&odd)).await;
    assert_eq!(results(&ds), [(Issued, Some(1))]);
    let again = decide(&*store, &ev, std::slice::from_ref(&odd)).await;
    assert!(again[0].replay, "a '|' in the user id must not break dedup");
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.coupons[0].user_id, odd.user_id);
}

async fn only_logged_decisions_are_marked_logged(store: Arc<dyn Store>) {
    let ev = new_event();
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 2,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let (a, b) = (pending("a"), pending("b"));
    let ds = decide(&*store, &ev, &[a.clone(), b.clone()]).await;
    assert!(
        !store
            .decision(&ev, a.request_id)
            .await
            .unwrap()
            .unwrap()
            .logged
    );
    store
        .mark_logged(&[LoggedDecisions {
            event_id: ev.clone(),
            generation: 1,
            decisions: vec![(a.request_id, ds[0].seq), (Uuid::now_v7(), 99)],
        }])
        .await
        .unwrap();
    assert!(
        store
            .decision(&ev, a.request_id)
            .await
            .unwrap()
            .unwrap()
            .logged
    );
    assert!(
        !store
            .decision(&ev, b.request_id)
            .await
            .unwrap()
            .unwrap()
            .logged
    );
    // Marking twice changes nothing; a replay of a logged decision stays one.
    store
        .mark_logged(&[LoggedDecisions {
            event_id: ev.clone(),
            generation: 1,
            decisions: vec![(a.request_id, ds[0].seq)],
        }])
        .await
        .unwrap();
    let again = decide(&*store, &ev, std::slice::from_ref(&a)).await;
    assert_eq!(
        (again[0].result, again[0].issued_rank, again[0].replay),
        (Issued, Some(1), true)
    );
    assert_eq!(store.event(&ev).await.unwrap().unwrap().remaining, 0);
}

async fn a_batch_acknowledged_after_a_reset_marks_nothing_of_the_new_generation(
    store: Arc<dyn Store>,
) {
    let ev = new_event();
    let spec = EventSpec {
        stock: 5,
        per_user_limit: 1,
        claim_window_us: 0,
        stock_buckets: 1,
    };
    store.put_event(&ev, spec).await.unwrap();
    let (r, a, b) = (pending("r"), pending("a"), pending("b"));
    // Generation 1 decides r and a; their outcomes are on their way to the log.
    let old = decide(&*store, &ev, &[r.clone(), a.clone()]).await;
    // An admin resets the event; r is redelivered and decided again, with b.
    store.put_event(&ev, spec).await.unwrap();
    let new = decide(&*store, &ev, &[r.clone(), b.clone()]).await;
    assert_eq!(
        (new[0].seq, new[1].seq),
        (old[0].seq, old[1].seq),
        "the numbering restarted"
    );
    // Only now is generation 1's batch acknowledged.
    store
        .mark_logged(&[LoggedDecisions {
            event_id: ev.clone(),
            generation: 1,
            decisions: vec![(r.request_id, old[0].seq), (a.request_id, old[1].seq)],
        }])
        .await
        .unwrap();
    for p in [&r, &b] {
        let d = store.decision(&ev, p.request_id).await.unwrap().unwrap();
        assert!(
            !d.logged,
            "{}'s generation-2 decision is not in the log yet",
            p.user_id
        );
    }
    // Generation 2's own batch marks them.
    store
        .mark_logged(&[LoggedDecisions {
            event_id: ev.clone(),
            generation: 2,
            decisions: vec![(r.request_id, new[0].seq), (b.request_id, new[1].seq)],
        }])
        .await
        .unwrap();
    for p in [&r, &b] {
        assert!(
            store
                .decision(&ev, p.request_id)
                .await
                .unwrap()
                .unwrap()
                .logged
        );
    }
}

async fn a_restored_event_continues_where_the_ledger_left_off(store: Arc<dyn Store>) {
    let ev = new_event();
    let winner = pending("a");
    let loser = pending("b");
    let decided_at = now_micros();
    let issued = Decision {
        result: Issued,
        issued_rank: Some(1),
        decided_at,
        replay: true,
        seq: 1,
        logged: true,
    };
    let snapshot = EventSnapshot {
        state: EventState {
            event_id: ev.clone(),
            stock: 2,
            per_user_limit: 1,
            remaining: 1,
            generation: 7,
            claim_window_us: 0,
            released: 0,
            claimed: 0,
            stock_buckets: 1,
        },
        seq: 2,
        free_ranks: vec![],
        holds: vec![],
        holders: vec![("a".into(), 1)],
        coupons: vec![Coupon {
            rank: 1,
            request_id: winner.request_id,
            user_id: "a".into(),
        }],
        decided: vec![
            RestoredDecision {
                request_id: winner.request_id,
                user_id: "a".into(),
                decision: issued,
            },
            RestoredDecision {
                request_id: loser.request_id,
                user_id: "b".into(),
                decision: Decision {
                    result: LimitReached,
                    issued_rank: None,
                    seq: 2,
                    ..issued
                },
            },
        ],
        bucket: 0,
    };
    restore_as_recoverer(&*store, &snapshot).await;
    assert_eq!(
        store.decision(&ev, winner.request_id).await.unwrap(),
        Some(issued)
    );
    let ds = decide(
        &*store,
        &ev,
        &[
            winner.clone(),
            loser,
            pending("a"),
            pending("c"),
            pending("d"),
        ],
    )
    .await;
    assert_eq!(
        results(&ds),
        [
            (Issued, Some(1)),
            (LimitReached, None),
            (LimitReached, None),
            (Issued, Some(2)),
            (SoldOut, None)
        ]
    );
    assert_eq!(
        ds[0].decided_at, decided_at,
        "the restored decision is replayed as it was"
    );
    assert_eq!(
        ds[3].seq, 4,
        "numbering continues after the restored sequence"
    );
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(ledger.state.generation, 7);
    assert_eq!(ledger.coupons.len(), 2);
}

async fn ranks_left_free_by_a_recovery_are_issued_first_and_never_twice(store: Arc<dyn Store>) {
    let ev = new_event();
    let (r1, r3) = (pending("a"), pending("c"));
    let coupon = |rank, p: &Pending| Coupon {
        rank,
        request_id: p.request_id,
        user_id: p.user_id.clone(),
    };
    let snapshot = EventSnapshot {
        state: EventState {
            event_id: ev.clone(),
            stock: 5,
            per_user_limit: 1,
            remaining: 3,
            generation: 1,
            claim_window_us: 0,
            released: 0,
            claimed: 0,
            stock_buckets: 1,
        },
        seq: 3,
        holders: vec![("a".into(), 1), ("c".into(), 1)],
        coupons: vec![coupon(1, &r1), coupon(3, &r3)],
        decided: vec![],
        free_ranks: vec![2],
        holds: Vec::new(),
        bucket: 0,
    };
    restore_as_recoverer(&*store, &snapshot).await;
    let ds = decide(
        &*store,
        &ev,
        &[pending("x"), pending("y"), pending("z"), pending("w")],
    )
    .await;
    assert_eq!(
        results(&ds),
        [
            (Issued, Some(2)),
            (Issued, Some(4)),
            (Issued, Some(5)),
            (SoldOut, None)
        ]
    );
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    let ranks: Vec<u32> = ledger.coupons.iter().map(|c| c.rank).collect();
    assert_eq!(ranks, [1, 2, 3, 4, 5]);
}

async fn the_recovery_lock_has_one_holder(store: Arc<dyn Store>) {
    let owner = format!("t-{}", Uuid::new_v4());
    assert!(store
        .try_lock_recovery(&owner, Duration::from_secs(5))
        .await
        .unwrap());
    assert!(!store
        .try_lock_recovery("someone-else", Duration::from_secs(5))
        .await
        .unwrap());
    store.unlock_recovery("someone-else").await.unwrap();
    assert!(!store
        .try_lock_recovery("someone-else", Duration::from_secs(5))
        .await
        .unwrap());
    store.unlock_recovery(&owner).await.unwrap();
    assert!(store
        .try_lock_recovery("someone-else", Duration::from_millis(50))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        !store
            .extend_recovery_lock("someone-else", Duration::from_secs(5))
            .await
            .unwrap(),
        "an expired lock cannot be extended"
    );
    assert!(
        store
            .try_lock_recovery(&owner, Duration::from_millis(200))
            .await
            .unwrap(),
        "locks expire"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(store
        .extend_recovery_lock(&owner, Duration::from_millis(300))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !store
            .try_lock_recovery("someone-else", Duration::from_secs(5))
            .await
            .unwrap(),
        "its holder extended it"
    );
    assert!(!store
        .extend_recovery_lock("someone-else", Duration::from_secs(5))
        .await
        .unwrap());
}

async fn a_recoverer_that_lost_the_lock_cannot_overwrite_later_decisions(store: Arc<dyn Store>) {
    let ev = new_event();
    let a = pending("a");
    let issued = Decision {
        result: Issued,
        issued_rank: Some(1),
        decided_at: now_micros(),
        replay: true,
        seq: 1,
        logged: true,
    };
    // What both recoverers read from the log: one coupon of five issued.
    let snapshot = EventSnapshot {
        state: EventState {
            event_id: ev.clone(),
            stock: 5,
            per_user_limit: 1,
            remaining: 4,
            generation: 1,
            claim_window_us: 0,
            released: 0,
            claimed: 0,
            stock_buckets: 1,
        },
        seq: 1,
        holders: vec![("a".into(), 1)],
        coupons: vec![Coupon {
            rank: 1,
            request_id: a.request_id,
            user_id: "a".into(),
        }],
        decided: vec![RestoredDecision {
            request_id: a.request_id,
            user_id: "a".into(),
            decision: issued,
        }],
        free_ranks: vec![],
        holds: Vec::new(),
        bucket: 0,
    };
    let retention = Duration::from_secs(60);
    // The first recoverer's lock expires while it still reads the log...
    assert!(store
        .try_lock_recovery("first", Duration::from_millis(100))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    // ...a second one takes over, rebuilds the store and finishes...
    assert!(store
        .try_lock_recovery("second", Duration::from_secs(30))
        .await
        .unwrap());
    // (The first one's writes are refused while the second one rebuilds.)
    assert!(matches!(
        store.restore(&snapshot, retention, "first").await,
        Err(StoreError::Fenced(_))
    ));
    store.restore(&snapshot, retention, "second").await.unwrap();
    store.set_epoch("second", "second").await.unwrap();
    store.unlock_recovery("second").await.unwrap();
    // ...and decisions are made on the rebuilt store.
    let (b, c) = (pending("b"), pending("c"));
    let later = decide(&*store, &ev, &[b.clone(), c.clone()]).await;
    assert_eq!(results(&later), [(Issued, Some(2)), (Issued, Some(3))]);
    // Then the first one, done reading, tries to restore what it read.
    let refused = store.restore(&snapshot, retention, "first").await;
    assert!(
        matches!(refused, Err(StoreError::Fenced(_))),
        "a recoverer that lost the lock must not write: {refused:?}"
    );
    assert!(matches!(
        store.set_epoch("first", "first").await,
        Err(StoreError::Fenced(_))
    ));
    // Even holding the lock again, nobody restores a store that has its
    // epoch: the rebuild is over.
    assert!(store
        .try_lock_recovery("first", Duration::from_secs(30))
        .await
        .unwrap());
    assert!(matches!(
        store.restore(&snapshot, retention, "first").await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store.set_epoch("first", "first").await,
        Err(StoreError::Fenced(_))
    ));
    store.unlock_recovery("first").await.unwrap();
    assert_eq!(store.epoch().await.unwrap().as_deref(), Some("second"));
    let ledger = store.ledger(&ev).await.unwrap().unwrap();
    assert_eq!(
        (ledger.coupons.len(), ledger.state.remaining),
        (3, 2),
        "the decisions made after the second recovery survive"
    );
    let d = store.decision(&ev, b.request_id).await.unwrap().unwrap();
    assert_eq!(d.issued_rank, Some(2));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _server) = super::redis_store(super::retention(stringify!($name))).await;
                    super::$name(store).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _cluster) =
                        super::cluster_store(super::retention(stringify!($name))).await;
                    super::$name(store).await
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::memory_store(super::retention(stringify!($name))).await).await
                }
            )*
        }
    };
}

/// The same, each test on a store that has never held state (see
/// [`fresh_redis_store`]).
macro_rules! conformance_fresh {
    ($($name:ident),* $(,)?) => {
        mod fresh_redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _server) = super::fresh_redis_store().await;
                    super::$name(store).await
                }
            )*
        }
        mod fresh_cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _cluster) = super::fresh_cluster_store().await;
                    super::$name(store).await
                }
            )*
        }
        mod fresh_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _server) = super::fresh_memory_store().await;
                    super::$name(store).await
                }
            )*
        }
    };
}

fn retention(test: &str) -> Duration {
    if test == "dedup_records_expire_after_retention" {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3600)
    }
}

conformance!(
    first_delivery_issues_in_arrival_order,
    replay_of_every_result_is_the_same_decision,
    the_same_request_twice_in_one_batch_is_decided_once,
    per_user_limit_counts_coupons_held,
    limit_is_checked_before_stock,
    zero_stock_sells_nothing,
    last_unit_goes_to_exactly_one_of_concurrent_batches,
    unknown_event_is_reported_not_decided,
    a_request_id_reused_by_another_user_is_a_duplicate,
    reset_voids_earlier_decisions,
    a_definition_is_applied_only_if_newer,
    a_batch_acknowledged_after_a_reset_marks_nothing_of_the_new_generation,
    status_lookup_sees_decisions_only,
    batches_larger_than_one_script_call_stay_in_order,
    dedup_records_expire_after_retention,
    invalid_specs_are_refused,
    user_ids_with_separators_round_trip,
    only_logged_decisions_are_marked_logged,
);

conformance_fresh!(
    a_restored_event_continues_where_the_ledger_left_off,
    ranks_left_free_by_a_recovery_are_issued_first_and_never_twice,
    the_recovery_lock_has_one_holder,
    a_recoverer_that_lost_the_lock_cannot_overwrite_later_decisions,
);
