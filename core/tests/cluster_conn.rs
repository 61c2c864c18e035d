//! The Redis Cluster connection across a failover, on a real local cluster.
//!
//! Invariant: a connection that sends only transactions (as the api's
//! status lookups do) reaches its slot's new master after a failover, not
//! the refusals (`MOVED`) of the old one for ever.

use couponrush_core::redis_conn::RedisConn;
use couponrush_harness::RedisCluster;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_reaches_the_new_master_of_its_slot_after_a_failover() {
    let dir = std::env::temp_dir().join(format!("couponrush-cluster-conn-{}", Uuid::new_v4()));
    let mut cluster = tokio::task::spawn_blocking(move || RedisCluster::start(&dir))
        .await
        .unwrap()
        .expect("redis-server and redis-cli on the PATH");
    let conn = RedisConn::connect(&cluster.url()).await.unwrap();
    let key = format!("cr:{{tx-{}}}:event", Uuid::new_v4().simple());
    let mut write = redis::pipe();
    write
        .atomic()
        .cmd("HSET")
        .arg(&key)
        .arg("stock")
        .arg(5)
        .ignore()
        .cmd("HGET")
        .arg(&key)
        .arg("stock");
    let (stock,): (u32,) = write.query_async(&mut conn.clone()).await.unwrap();
    assert_eq!(stock, 5);

    // The key's master dies; its replica, with the write, takes over.
    let master = cluster.master_of(&key).unwrap();
    let replica = cluster.replica_of(master).unwrap();
    cluster.wait_replicated(master).unwrap();
    cluster.kill(master);
    let cluster = tokio::task::spawn_blocking(move || cluster.take_over(replica).map(|()| cluster))
        .await
        .unwrap()
        .unwrap();

    // Only transactions from now on: the first may meet the dead master's
    // connection (an I/O error, retried by the caller); none is refused
    // with MOVED.
    let mut read = redis::pipe();
    read.atomic().cmd("HGET").arg(&key).arg("stock");
    let mut answers = Vec::new();
    for _ in 0..5 {
        let r: Result<(Option<u32>,), _> = read.query_async(&mut conn.clone()).await;
        answers.push(r.map(|(s,)| s).map_err(|e| e.to_string()));
    }
    assert!(
        answers
            .iter()
            .all(|a| !a.as_ref().is_err_and(|e| e.contains("Moved"))),
        "a transaction refused with MOVED after the failover: {answers:?}"
    );
    assert_eq!(
        answers.last().unwrap(),
        &Ok(Some(5)),
        "the new master answers: {answers:?}"
    );
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}
