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
