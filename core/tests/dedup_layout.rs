//! The Redis store's dedup records (two hashes per event, turned over a
//! retention at a time; see `core/src/store/redis.rs`): a record lives at
//! least the retention across a turnover, and records an earlier version
//! kept as one string key each are still read. Each test runs on a
//! redis-server of its own (the layout is Redis's alone; the behaviour both
//! stores share is in `store_conformance.rs`).

use std::time::Duration;

use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{
    BatchVerdict, Decision, EventBatch, EventSpec, Pending, Store, StoreError,
};
use couponrush_core::wire::{now_micros, DecisionResult};
use couponrush_harness::RedisServer;
use uuid::Uuid;

/// A private redis-server, stopped and its directory removed on drop.
struct PrivateRedis {
    server: Option<RedisServer>,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("couponrush-dedup-{}", Uuid::new_v4()));
        let server = RedisServer::start(&dir, false).expect("redis-server on the PATH");
        Self {
            server: Some(server),
            dir,
        }
    }

    fn url(&self) -> String {
        self.server.as_ref().expect("running").url()
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.server.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pending(user: &str) -> Pending {
    Pending {
        request_id: Uuid::now_v7(),
        user_id: user.to_string(),
    }
}

async fn event(store: &RedisStore) -> String {
    let ev = format!("t-{}", Uuid::new_v4().simple());
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 100,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    ev
}

async fn try_decide(store: &RedisStore, ev: &str, r: &Pending) -> Result<Decision, StoreError> {
    let verdict = store
        .decide(&[EventBatch::requests(ev, vec![r.clone()])], now_micros())
        .await?;
    match &verdict[..] {
        [BatchVerdict::Decided { decisions, .. }] => Ok(decisions[0]),
        other => panic!("event {ev}: {other:?}"),
    }
}

async fn decide(store: &RedisStore, ev: &str, r: &Pending) -> Decision {
    try_decide(store, ev, r).await.unwrap()
}

/// A record written just before the window turns over is still found after
/// it (it is younger than the retention), and is gone once twice the
/// retention has passed.
#[tokio::test]
async fn a_record_outlives_the_turnover_of_its_window() {
    // A retention of 4 s; the sleeps leave seconds of slack for a busy
    // machine (b's redelivery must come within one retention of b).
    let redis = PrivateRedis::start();
    let store = RedisStore::connect(&redis.url(), Duration::from_secs(4))
        .await
        .unwrap();
    let ev = event(&store).await;
    decide(&store, &ev, &pending("a")).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let b = pending("b");
    let b_first = decide(&store, &ev, &b).await;
    // 4.4 s after the window started: this call turns it over.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    decide(&store, &ev, &pending("c")).await;
    let mut conn = redis.conn().await;
    let turned: i64 = redis::cmd("EXISTS")
        .arg(format!("cr:{{{ev}}}:dedup:old"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(turned, 1, "the window was turned over into the old hash");
    let b_again = decide(&store, &ev, &b).await;
    assert!(b_again.replay, "b is 1.4 s old: kept across the turnover");
    assert_eq!(b_again.issued_rank, b_first.issued_rank);
    assert_eq!(b_again.seq, b_first.seq);
    let found = store.decision(&ev, b.request_id).await.unwrap();
    assert_eq!(
        found.map(|d| d.seq),
        Some(b_first.seq),
        "the status lookup reads the old window"
    );
    // a is past the retention: it may be gone or not; b is gone once its
    // hash's lifetime (the retention after its last write) is over.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert!(store.decision(&ev, b.request_id).await.unwrap().is_none());
}

/// An event defined by an earlier version keeps a record as a string key:
/// it is read (a redelivery is a replay), new records go to the hashes, and
/// the next definition gives the event the new layout.
#[tokio::test]
async fn records_an_earlier_version_kept_as_keys_are_still_read() {
    let redis = PrivateRedis::start();
    let store = RedisStore::connect(&redis.url(), Duration::from_secs(3600))
        .await
        .unwrap();
    let ev = event(&store).await;
    let a = pending("a");
    let first = decide(&store, &ev, &a).await;
    // As an earlier version left it: a's record a key of its own, the
    // event without the layout mark.
    let mut conn = redis.conn().await;
    let id = a.request_id.to_string();
    let record: String = redis::cmd("HGET")
        .arg(format!("cr:{{{ev}}}:dedup"))
        .arg(&id)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::pipe()
        .cmd("HDEL")
        .arg(format!("cr:{{{ev}}}:dedup"))
        .arg(&id)
        .ignore()
        .cmd("SET")
        .arg(format!("cr:{{{ev}}}:req:{id}"))
        .arg(&record)
        .ignore()
        .cmd("HDEL")
        .arg(format!("cr:{{{ev}}}:event"))
        .arg("layout")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();

    // This store believed the event had the new layout: the call decides
    // nothing and says to retry; the retry passes the old keys.
    let err = try_decide(&store, &ev, &a).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let again = decide(&store, &ev, &a).await;
    assert!(again.replay, "the old key's record is read");
    assert_eq!(
        (again.result, again.issued_rank, again.seq),
        (DecisionResult::Issued, first.issued_rank, first.seq)
    );
    assert_eq!(
        store
            .decision(&ev, a.request_id)
            .await
            .unwrap()
            .map(|d| d.seq),
        Some(first.seq)
    );
    // A store that never saw the event reads it too.
    let other = RedisStore::connect(&redis.url(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(decide(&other, &ev, &a).await.replay);
    let b = pending("b");
    assert_eq!(decide(&other, &ev, &b).await.issued_rank, Some(2));
    let in_hash: bool = redis::cmd("HEXISTS")
        .arg(format!("cr:{{{ev}}}:dedup"))
        .arg(b.request_id.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(in_hash, "new records go to the hash");

    // The next definition: the new layout, the old key no longer needed.
    store
        .put_event(
            &ev,
            EventSpec {
                stock: 100,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let layout: Option<String> = redis::cmd("HGET")
        .arg(format!("cr:{{{ev}}}:event"))
        .arg("layout")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(layout.as_deref(), Some("2"));
    let fresh = decide(&store, &ev, &a).await;
    assert!(!fresh.replay, "a new generation decides it anew");
}
