//! Several drops at once on a real Redis Cluster, through the whole
//! pipeline: the lab's in-process deployment (librdkafka's mock cluster, the
//! api, two issuers) with its store on a local cluster of three masters,
//! and events chosen so that their `{E}` hash tags land on every master.
//! The drops run at the same time, so an issuer's batch spans events on
//! different masters: one pipelined call split per slot.
//!
//! Invariant, per event, by the loadgen's audit of the outcome stream
//! against the store: 0 oversold, 0 double issued, 0 lost.

use std::collections::BTreeSet;
use std::time::Duration;

use couponrush_harness::RedisCluster;
use couponrush_lab::deployment::{Deployment, DropSpec, KafkaChoice, Spec, StoreChoice};
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EVENTS: usize = 4;
const REQUESTS: u64 = 400;
const STOCK: u32 = 60;

/// `EVENTS` event ids whose slots are served by every master between them.
fn events_on_every_master(cluster: &RedisCluster) -> Vec<String> {
    let mut events = Vec::new();
    let mut masters = BTreeSet::new();
    for i in 0..1_000 {
        let ev = format!("multi-{i}-{}", Uuid::new_v4().simple());
        let master = cluster.master_of(&format!("cr:{{{ev}}}:event")).unwrap();
        // Each new master first, then fill up with any.
        if masters.insert(master) || (masters.len() == 3 && events.len() < EVENTS) {
            events.push(ev);
        }
        if events.len() == EVENTS && masters.len() == 3 {
            return events;
        }
    }
    panic!("no {EVENTS} events over 3 masters in 1,000 tries: {masters:?}");
}

fn drop_of(event_id: &str) -> DropSpec {
    DropSpec {
        plan: LoadPlan {
            event_id: event_id.into(),
            model: LoadModel::Burst,
            requests: REQUESTS,
            duration: Duration::from_secs(30),
            connections: 8,
            population: Population::new(REQUESTS * 3 / 4, UserDist::Uniform, 0.05, 1),
        },
        terms: EventTerms {
            stock: STOCK,
            per_user_limit: 1,
        },
        drain_timeout: Duration::from_secs(60),
        admin_token: None,
        progress: false,
        keep_raw: false,
        config: serde_json::json!({}),
        live: None,
        holds: None,
        stock_buckets: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_of_events_on_different_masters_at_once_oversell_nothing_issue_nothing_twice_lose_nothing(
) {
    let dir = std::env::temp_dir().join(format!("couponrush-lab-cluster-{}", Uuid::new_v4()));
    let cluster = tokio::task::spawn_blocking(move || RedisCluster::start(&dir))
        .await
        .unwrap()
        .expect("redis-server and redis-cli on the PATH");
    let events = events_on_every_master(&cluster);

    let deployment = Deployment::start(Spec {
        batch_size: 200,
        ..Spec::in_process(
            KafkaChoice::Embedded(1),
            StoreChoice::Redis(cluster.url()),
            4,
            2,
        )
    })
    .await
    .expect("an in-process deployment on the cluster starts");
    assert!(deployment.wait_assigned(Duration::from_secs(60)).await);

    let cancel = CancellationToken::new();
    let mut runs = Vec::new();
    for ev in &events {
        runs.push(
            deployment
                .start_drop(drop_of(ev), false, cancel.clone())
                .await
                .expect("a drop starts"),
        );
    }
    let mut reports = Vec::new();
    for run in runs {
        reports.push(run.await.unwrap().expect("the drop reports"));
    }
    deployment.stop().await;

    for (ev, report) in events.iter().zip(&reports) {
        assert_eq!(
            (report.oversold, report.double_issued, report.lost),
            (0, 0, 0),
            "event {ev}: {}",
            report.text()
        );
        assert!(report.passed, "event {ev}: {}", report.text());
        let store = report.store.as_ref().expect("the store was audited");
        assert_eq!(
            (store.coupons, store.remaining),
            (STOCK as u64, 0),
            "event {ev}: the store's figures"
        );
        assert_eq!(
            report.issued,
            STOCK as u64,
            "event {ev} sold out: {}",
            report.text()
        );
    }
}
