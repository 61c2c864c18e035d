//! `redis-cluster-failover`: the drop of `redis-stale`, with the store on a
//! private Redis Cluster (three masters with a replica each, the api and
//! the issuers given its `redis+cluster://` URL), and the store coming back
//! behind the way it does on a cluster: a master dies and its replica,
//! which missed its last writes, takes its slots.
//!
//! To make "behind" certain rather than a race with replication, the
//! replica of the drop event's master is first brought up to date (`WAIT`),
//! then cut off (frozen, its link dropped); two seconds of decisions reach
//! the master only; the master is SIGKILLed and the replica promoted
//! (`CLUSTER FAILOVER TAKEOVER`). The promoted replica holds the epoch but
//! not the scripts bound to it (Redis neither replicates nor persists its
//! script cache), so the first decide call on its slot decides nothing,
//! marks the store lost, and the issuers rebuild it from the log behind
//! the fence. What must hold: the drop's audit clean (0 oversold, 0 double
//! issued, 0 lost), every client the status endpoint told `issued` holds
//! its coupon (the probe event lives on the same master), an issuer
//! rebuilt the store, and the replica really was behind (this scenario's
//! premise, checked, not assumed).

use std::path::Path;
use std::time::{Duration, Instant};

use couponrush_core::wire::now_micros;
use couponrush_harness::RedisCluster;
use couponrush_loadgen::drive::http::{put_event, Endpoint};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    behind_dims, check_probe, issuer_logs, longest_wait, plain_offer, probe_statuses,
    rebuilds_since, rig, sleep_until_load, spec, start_drop, ChaosError, Dims, Offer, Row,
    Scenario,
};
use crate::rig::{BrokerKind, StoreChoice};

/// What an issuer logs when a call finds the promoted replica without the
/// epoch's scripts (`core/src/store/redis.rs`).
const SCRIPTS_GONE: &str = "lost the scripts of its epoch";
/// What it logs when a slot holds no epoch marker at all (the replica
/// never had the marker).
const MARKER_GONE: &str = "holds no epoch marker";

/// The key of `event`'s state, whose slot is the event's.
fn event_key(event: &str) -> String {
    format!("cr:{{{event}}}:event")
}

/// Runs the scenario once.
pub(crate) async fn redis_cluster_failover(
    seed: u64,
    dims: Dims,
    dir: &Path,
) -> Result<Row, ChaosError> {
    let (dims, fault_at) = behind_dims(dims, seed);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let cluster_dir = dir.join("cluster");
    let cluster = blocking(move || RedisCluster::start(&cluster_dir)).await?;
    let mut s = spec(BrokerKind::TansuMemory, 2);
    s.store = StoreChoice::Redis(cluster.url());
    let rig = rig(s, dir).await?;

    // The drop's event and the probe's on one master: the one that fails.
    let event = format!("chaos-{}", Uuid::new_v4().simple());
    let master = cluster
        .master_of(&event_key(&event))
        .map_err(cluster_step)?;
    let replica = cluster.replica_of(master).map_err(cluster_step)?;
    let slot = cluster.slot_of(&event_key(&event)).map_err(cluster_step)?;
    let probe_event = on_master(&cluster, master, "probe")?;

    let endpoint = Endpoint::parse(&rig.api_url()).await?;
    put_event(&endpoint, &probe_event, 1_000_000, 1, None).await?;
    let offer = Offer {
        event_id: Some(event.clone()),
        ..plain_offer(seed)
    };
    let (drop, started) = start_drop(&rig, dims, offer).await?;
    let stop = CancellationToken::new();
    let probe = tokio::spawn(probe_statuses(
        endpoint.clone(),
        probe_event.clone(),
        stop.clone(),
    ));

    sleep_until_load(started, fault_at).await;
    let fault = now_micros();
    // The replica holds everything so far (the event, the first decisions),
    // then is cut off: what follows reaches the master only.
    let mut cluster = blocking(move || {
        cluster.wait_replicated(master)?;
        cluster.cut_replica(replica, master)?;
        Ok(cluster)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key = event_key(&event);
    let (cluster, failover) = blocking(move || {
        let on_master = seq(&cluster, master, &key);
        cluster.kill(master);
        let t = Instant::now();
        cluster.take_over(replica)?;
        let took = t.elapsed();
        let on_replica = seq(&cluster, replica, &key);
        Ok((cluster, (on_master, on_replica, took)))
    })
    .await?;
    let (on_master, on_replica, took) = failover;

    let report = drop.await.map_err(|e| e.to_string())??;
    stop.cancel();
    let told = probe.await.map_err(|e| e.to_string())?;
    let mut row = Row::from_report(Scenario::RedisClusterFailover, seed, &report, dir);
    row.fault_at_s = Some(fault_at);
    row.recover_s = longest_wait(&report, fault);
    row.notes.push(format!(
        "slot {slot}: master {master} SIGKILLed 2 s after its replica {replica} was cut off; \
         the replica took over in {:.1}s at decision {} of the event, the master had reached {}",
        took.as_secs_f64(),
        on_replica.map_or("?".into(), |n| n.to_string()),
        on_master.map_or("?".into(), |n| n.to_string()),
    ));
    row.check(
        matches!((on_master, on_replica), (Some(m), Some(r)) if m > r),
        "the promoted replica was behind its master (the scenario's premise)",
    );
    check_probe(&mut row, &cluster.url(), &probe_event, &told).await?;

    let logs = issuer_logs(dir);
    let count = |what: &str| logs.iter().map(|l| l.matches(what).count()).sum::<usize>();
    let rebuilds = rebuilds_since(dir, fault);
    let (scripts_gone, marker_gone) = (count(SCRIPTS_GONE), count(MARKER_GONE));
    row.notes.push(format!(
        "detected: {scripts_gone}× the promoted node without the epoch's scripts, \
         {marker_gone}× a slot without an epoch marker; rebuilt from the log: {}",
        if rebuilds.is_empty() {
            "never".to_string()
        } else {
            rebuilds.join(" / ")
        }
    ));
    row.check(
        scripts_gone + marker_gone >= 1,
        "an issuer detected the store behind",
    );
    row.check(
        !rebuilds.is_empty(),
        "an issuer rebuilt the store from the log after the fault",
    );
    drop_in_order(rig, cluster).await;
    Ok(row)
}

/// A fresh event id named `prefix-…` whose slot `master` serves.
fn on_master(cluster: &RedisCluster, master: u16, prefix: &str) -> Result<String, ChaosError> {
    for _ in 0..200 {
        let ev = format!("{prefix}-{}", Uuid::new_v4().simple());
        if cluster.master_of(&event_key(&ev)).map_err(cluster_step)? == master {
            return Ok(ev);
        }
    }
    Err(format!("no {prefix} event on master {master} in 200 tries").into())
}

/// The event's decision number on the node at `port` (`seq` of its state).
fn seq(cluster: &RedisCluster, port: u16, key: &str) -> Option<u64> {
    cluster
        .cli(port, &["hget", key, "seq"])
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The deployment stopped before the cluster it stores in.
async fn drop_in_order(rig: couponrush_lab::deployment::Deployment, cluster: RedisCluster) {
    rig.stop().await;
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
}

/// Runs the cluster's blocking calls (`redis-cli`, waits) off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ChaosError> {
    tokio::task::spawn_blocking(f).await?.map_err(cluster_step)
}

/// A failed step on the Redis Cluster, saying so.
fn cluster_step(e: std::io::Error) -> ChaosError {
    ChaosError::Step(format!("the Redis Cluster: {e}"))
}
