//! The cluster starter makes a real, healthy Redis Cluster, and a replica
//! it cuts off and promotes really is behind its master.

use couponrush_harness::RedisCluster;

#[test]
fn a_cut_off_replica_takes_over_behind_its_master() {
    let dir = std::env::temp_dir().join(format!("couponrush-cluster-{}", std::process::id()));
    let mut cluster = RedisCluster::start(&dir).expect("redis-server and redis-cli on the PATH");
    let nodes = cluster.nodes().unwrap();
    assert_eq!(nodes.iter().filter(|n| !n.slots.is_empty()).count(), 3);
    assert_eq!(nodes.iter().filter(|n| n.master_id.is_some()).count(), 3);
    let master = cluster.master_of("{k}").unwrap();
    let replica = cluster.replica_of(master).unwrap();
    cluster.cli(master, &["set", "{k}:a", "before"]).unwrap();
    cluster.wait_replicated(master).unwrap();
    cluster.cut_replica(replica, master).unwrap();
    cluster.cli(master, &["set", "{k}:b", "after"]).unwrap();
    cluster.kill(master);
    cluster.take_over(replica).unwrap();
    assert_eq!(cluster.master_of("{k}").unwrap(), replica);
    assert_eq!(
        cluster.cli(replica, &["get", "{k}:a"]).unwrap().trim(),
        "before"
    );
    assert_eq!(
        cluster.cli(replica, &["get", "{k}:b"]).unwrap().trim(),
        "",
        "the write after the cut never reached the replica"
    );
}

/// `WAIT` from a fresh connection proves nothing about a replica: it waits
/// for that connection's own writes (none), so it counts a frozen replica
/// that never got the last write. `wait_replicated` compares the replica's
/// acknowledged offset with the master's, so it waits for it (a test that
/// relied on `WAIT` promoted a replica without the event it was about).
#[test]
fn waiting_for_replication_waits_for_the_replica_not_for_wait() {
    let dir = std::env::temp_dir().join(format!("couponrush-cluster-wait-{}", std::process::id()));
    let cluster = RedisCluster::start(&dir).expect("redis-server and redis-cli on the PATH");
    let master = cluster.master_of("{w}").unwrap();
    let replica = cluster.replica_of(master).unwrap();
    cluster.wait_replicated(master).unwrap();
    cluster.freeze(replica).unwrap();
    cluster
        .cli(master, &["set", "{w}:a", "not replicated"])
        .unwrap();
    assert_eq!(
        cluster.cli(master, &["wait", "1", "200"]).unwrap().trim(),
        "1",
        "WAIT from another connection counts the frozen replica"
    );
    let err = cluster
        .wait_replicated_within(master, std::time::Duration::from_secs(3))
        .expect_err("the frozen replica has not acknowledged the write");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    cluster.thaw(replica).unwrap();
    cluster.wait_replicated(master).unwrap();
}
