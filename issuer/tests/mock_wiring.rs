//! The api and an issuer wired through librdkafka's in-process mock cluster
//! (3 brokers, replication factor 3) and the in-memory store: no service
//! needed. Proves the wiring; the invariants under load and crashes are
//! proven against real services in `spine_tansu.rs`.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use couponrush_api::{app, Api};
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{EventSpec, Store};
use couponrush_core::{DecisionResult, Topics};
use couponrush_harness::MockKafka;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use common::read_outcomes;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_from_http_to_outcomes_through_the_mock_cluster() {
    let mock = MockKafka::start(3).unwrap();
    let topics = Topics::default();
    for spec in topics.specs(4, 3) {
        mock.create_topic(&spec.name, spec.partitions, spec.replication)
            .unwrap();
    }
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    store
        .put_event(
            "mock-drop",
            EventSpec {
                stock: 5,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();

    let api = Api::bind(
        couponrush_api::Config::local(&mock.brokers()),
        store.clone(),
        None,
    )
    .await
    .unwrap();
    let router = app(api.state());
    let shutdown = CancellationToken::new();
    let issuer = tokio::spawn(couponrush_issuer::run_issuer(
        couponrush_issuer::Config::local(&mock.brokers()),
        store.clone(),
        shutdown.clone(),
    ));

    let mut accepted = HashSet::new();
    for i in 0..20 {
        let user = format!("user-{}", i % 15);
        let req = Request::post("/v1/events/mock-drop/issue")
            .header("content-type", "application/json")
            .body(Body::from(format!("{{\"user_id\":\"{user}\"}}")))
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        accepted.insert(v["request_id"].as_str().unwrap().to_string());
    }

    let reader = common::reader(&mock.brokers(), &topics.outcomes);
    let mut outcomes = Vec::new();
    read_outcomes(&reader, &mut outcomes, Duration::from_secs(60), |o| {
        o.iter()
            .map(|o| o.request_id.to_string())
            .collect::<HashSet<_>>()
            .len()
            >= 20
    });
    shutdown.cancel();
    let totals = issuer.await.unwrap().unwrap();

    let decided: HashSet<String> = outcomes.iter().map(|o| o.request_id.to_string()).collect();
    assert_eq!(decided, accepted, "every accepted request is decided");
    let issued: Vec<_> = outcomes
        .iter()
        .filter(|o| o.result == DecisionResult::Issued && !o.replay)
        .collect();
    assert_eq!(issued.len(), 5);
    let mut ranks: Vec<u32> = issued.iter().map(|o| o.issued_rank.unwrap()).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [1, 2, 3, 4, 5]);
    assert_eq!(
        store.event("mock-drop").await.unwrap().unwrap().remaining,
        0
    );
    assert!(totals.decided >= 20);
    assert_eq!(totals.dead, 0);
}
