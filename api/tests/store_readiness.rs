//! What the api says while its store has no epoch marker, over a private
//! redis-server and librdkafka's mock cluster: a new deployment on an empty
//! Redis is set up in a moment and is never told it lost state it never
//! held; a store that did lose its state (the log holds definitions) says so.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use couponrush_api::App;
use couponrush_api::{app, Api, AppState, Config};
use couponrush_core::store::redis::RedisStore;
use couponrush_core::wire::{now_micros, EventRecord, WIRE_VERSION};
use couponrush_core::Topics;
use couponrush_harness::{MockKafka, RedisServer};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

const LOST: &str = "after losing its state";

struct Deployment {
    router: App,
    state: Arc<AppState>,
    api: Option<Api>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    shutdown: CancellationToken,
    _redis: RedisServer,
    _mock: MockKafka,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `test` on a runtime of its own and shuts that down without waiting
/// for blocking reads still in flight (a recovery reading the log), then
/// stops the deployment: its broker must outlive those reads' runtime, or a
/// read looking for the end of a topic that went away would hold the test.
fn run<F: Future<Output = Deployment>>(test: impl FnOnce() -> F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let deployment = rt.block_on(test());
    rt.shutdown_timeout(Duration::from_millis(100));
    drop(deployment);
}

/// An api over an empty redis-server and a mock cluster with its topics,
/// bound but not serving yet.
async fn on_an_empty_redis(fence: Duration) -> Deployment {
    let mock = MockKafka::start(1).unwrap();
    for spec in Topics::default().specs(2, 1) {
        mock.create_topic(&spec.name, spec.partitions, spec.replication)
            .unwrap();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("readiness-{}", Uuid::new_v4().simple()));
    let redis = RedisServer::start(&dir, false).expect("redis-server must be installed");
    let store = RedisStore::connect(&redis.url(), Duration::from_secs(3600))
        .await
        .unwrap();
    let mut config = Config::local(&mock.brokers());
    config.recovery_fence = fence;
    let api = Api::bind(config, Arc::new(store), None).await.unwrap();
    let state = api.state();
    Deployment {
        router: app(state.clone()),
        state,
        api: Some(api),
        serving: None,
        shutdown: CancellationToken::new(),
        _redis: redis,
        _mock: mock,
    }
}

impl Deployment {
    fn serve(&mut self) {
        let api = self.api.take().expect("served once");
        self.serving = Some(tokio::spawn(api.serve(self.shutdown.clone())));
    }

    /// Stops serving while the broker is still up (the api flushes its
    /// producer on the way out).
    async fn stop(mut self) -> Self {
        self.shutdown.cancel();
        if let Some(serving) = self.serving.take() {
            serving.await.unwrap().unwrap();
        }
        self
    }

    async fn call(&self, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[test]
fn a_new_deployment_on_an_empty_redis_is_never_told_it_lost_its_state() {
    run(a_new_deployment)
}

async fn a_new_deployment() -> Deployment {
    let mut d = on_an_empty_redis(Duration::from_secs(60)).await;
    d.serve();
    // The operator's first steps, at once: ask for a coupon of an event
    // that does not exist yet, create it, ask again.
    let (status, json) = d
        .call(
            Method::POST,
            "/v1/events/spring/issue",
            r#"{"user_id":"a"}"#,
        )
        .await;
    assert!(
        !json["message"].as_str().unwrap_or("").contains(LOST),
        "a new store is not a lost one: {status} {json}"
    );
    assert_eq!(status, StatusCode::NOT_FOUND, "no such event yet: {json}");
    let (status, json) = d
        .call(Method::PUT, "/v1/events/spring", r#"{"stock":10}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "the first PUT: {json}");
    let (status, json) = d
        .call(
            Method::POST,
            "/v1/events/spring/issue",
            r#"{"user_id":"a"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    d.stop().await
}

#[test]
fn a_store_that_lost_its_state_says_it_is_being_rebuilt() {
    run(a_lost_store)
}

async fn a_lost_store() -> Deployment {
    let mut d = on_an_empty_redis(Duration::from_secs(60)).await;
    // An earlier life of this deployment defined an event; the store that
    // held it is gone.
    let record = EventRecord {
        v: WIRE_VERSION,
        event_id: "spring".into(),
        stock: 10,
        per_user_limit: 1,
        generation: 1,
        written_at: now_micros(),
        claim_window_us: 0,
        stock_buckets: 1,
    };
    d.state
        .producer
        .publish_event(&d.state.events_topic, &record)
        .await
        .unwrap();
    d.serve();
    for (method, uri, body) in [
        (Method::PUT, "/v1/events/spring", r#"{"stock":10}"#),
        (
            Method::POST,
            "/v1/events/spring/issue",
            r#"{"user_id":"a"}"#,
        ),
    ] {
        let (status, json) = d.call(method, uri, body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {json}");
        assert!(
            json["message"].as_str().unwrap().contains(LOST),
            "{uri}: {json}"
        );
    }
    // A status lookup finds nothing yet: that is not "pending" (the rebuild
    // may restore a decision the client was already shown), but "retry".
    for uri in [
        format!("/v1/events/spring/requests/{}", Uuid::now_v7()),
        format!("/v1/requests/{}", Uuid::now_v7()),
    ] {
        let (status, json) = d.call(Method::GET, &uri, "").await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "a status lookup mid-rebuild, {uri}: {json}"
        );
        assert!(
            json["message"].as_str().unwrap().contains("being rebuilt"),
            "{json}"
        );
    }
    d.stop().await
}
