//! One hot event split over stock buckets, through the whole pipeline: the
//! lab's in-process deployment (librdkafka's mock cluster, the api, two
//! issuers) with its store on a real Redis Cluster, the event created
//! through the api with `stock_buckets`.
//!
//! Invariant, by the loadgen's audit of the outcome stream against the
//! store: 0 oversold, 0 double issued, 0 lost, 0 misrouted, bucketed or
//! not; the stock sells out; the report carries the undersell, which is 0
//! for the unbucketed drop (the check of the figure).

use std::time::Duration;

use couponrush_harness::RedisCluster;
use couponrush_lab::deployment::{Deployment, DropSpec, KafkaChoice, Spec, StoreChoice};
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const REQUESTS: u64 = 600;
const STOCK: u32 = 80;

fn drop_of(event_id: &str, stock_buckets: u32) -> DropSpec {
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
        stock_buckets,
        drain_timeout: Duration::from_secs(60),
        admin_token: None,
        progress: false,
        keep_raw: false,
        config: serde_json::json!({ "stock_buckets": stock_buckets }),
        live: None,
        holds: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucketed_drop_on_the_cluster_is_audited_clean_and_reports_its_undersell() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::shared)
        .await
        .unwrap()
        .expect("redis-server and redis-cli on the PATH");
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

    let mut reports = Vec::new();
    for k in [1, 4] {
        let ev = format!("hot-{k}-{}", Uuid::new_v4().simple());
        let report = deployment
            .drop_through_api(drop_of(&ev, k), CancellationToken::new())
            .await
            .expect("the drop reports");
        reports.push((k, report));
    }
    deployment.stop().await;

    for (k, report) in &reports {
        let text = report.text();
        println!("{text}");
        assert_eq!(
            (
                report.oversold,
                report.double_issued,
                report.lost,
                report.misrouted
            ),
            (0, 0, 0, 0),
            "{k} buckets: {text}"
        );
        assert!(report.passed, "{k} buckets: {text}");
        assert_eq!(report.stock_buckets, *k);
        let store = report.store.as_ref().expect("the store was audited");
        assert_eq!(
            (store.coupons, store.remaining, report.issued),
            (u64::from(STOCK), 0, u64::from(STOCK)),
            "{k} buckets sold out: {text}"
        );
        assert!(report.undersell <= u64::from(STOCK));
    }
    assert_eq!(
        reports[0].1.undersell, 0,
        "one bucket answers sold_out only once nothing is left"
    );
    assert!(
        reports[1].1.text().contains("undersell"),
        "the bucketed drop's report shows its undersell"
    );
}
