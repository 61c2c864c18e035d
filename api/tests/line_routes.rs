//! The waiting room through HTTP (`app().oneshot(..)` over librdkafka's mock
//! cluster and the in-memory coupon store, the line in the shared Redis at
//! `REDIS_URL` or in a mock-cluster topic): the gate refuses an issue
//! request without a valid admission token for that user and event, lets
//! one with a token through, and leaves events without a room as they were;
//! a ticket is shown only to its user; bad input is a 4xx saying what.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use couponrush_api::line::{LineConfig, LineStore};
use couponrush_api::App;
use couponrush_api::{app, Api, Config};
use couponrush_core::line::token::TokenKey;
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{EventSpec, Store};
use couponrush_core::wire::now_micros;
use couponrush_core::Topics;
use couponrush_harness::MockKafka;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use uuid::Uuid;

const KEY: &str = "line-test-key-0123456789";

struct Fixture {
    router: App,
    event: String,
    mock: MockKafka,
    config: Config,
    store: Arc<dyn Store>,
}

/// An api with rooms on `backend`, an event with stock 5 and a room for it
/// (unless `room` is false), plus an event without a room.
async fn fixture(backend: &str, room: bool) -> Fixture {
    fixture_with(backend, room, |_| {}).await
}

/// [`fixture`], with the api's config adjusted by `tune`.
async fn fixture_with(backend: &str, room: bool, tune: impl FnOnce(&mut Config)) -> Fixture {
    let mock = MockKafka::start(1).unwrap();
    for spec in Topics::default().specs(2, 1) {
        mock.create_topic(&spec.name, spec.partitions, spec.replication)
            .unwrap();
    }
    let event = format!("lr-{backend}-{}", Uuid::new_v4().simple());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    for e in [event.as_str(), "open-door"] {
        store
            .put_event(
                e,
                EventSpec {
                    stock: 5,
                    per_user_limit: 1,
                    claim_window_us: 0,
                    stock_buckets: 1,
                },
            )
            .await
            .unwrap();
    }
    let mut config = Config::local(&mock.brokers());
    let backend = match backend {
        "redis" => LineStore::Redis(couponrush_harness::shared_redis_url()),
        _ => {
            mock.create_topic(&format!("t.line.{event}"), 1, 1).unwrap();
            LineStore::Kafka {
                topic_prefix: "t.line".into(),
            }
        }
    };
    config.line = Some(LineConfig {
        backend,
        key: Some(KEY.into()),
        lag_group: None,
    });
    tune(&mut config);
    let api = Api::bind(config.clone(), store.clone(), None)
        .await
        .unwrap();
    let f = Fixture {
        router: app(api.state()),
        event,
        mock,
        config,
        store,
    };
    if room {
        let (s, body) = f
            .call(
                Method::PUT,
                &format!("/v1/events/{}/line", f.event),
                &[],
                json!({"max_active": 2, "rate_per_sec": 50.0, "ticket_ttl_secs": 5}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    f
}

impl Fixture {
    /// Another api process of the same deployment (same brokers, store,
    /// line backend and key), or this one after a restart.
    async fn another_api(&self) -> Fixture {
        let api = Api::bind(self.config.clone(), self.store.clone(), None)
            .await
            .unwrap();
        Fixture {
            router: app(api.state()),
            event: self.event.clone(),
            mock: MockKafka::start(1).unwrap(),
            config: self.config.clone(),
            store: self.store.clone(),
        }
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (StatusCode, Value) {
        let (s, v, _) = self.call_full(method, uri, headers, body).await;
        (s, v)
    }

    async fn call_full(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        )
    }

    async fn issue(&self, user: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut h = vec![];
        if let Some(t) = token {
            h.push(("x-admission-token", t));
        }
        self.call(
            Method::POST,
            &format!("/v1/events/{}/issue", self.event),
            &h,
            json!({ "user_id": user }),
        )
        .await
    }

    async fn join(&self, user: &str, key: Option<&str>) -> (StatusCode, Value) {
        let h: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        self.call(
            Method::POST,
            &format!("/v1/events/{}/line", self.event),
            &h,
            json!({ "user_id": user }),
        )
        .await
    }

    async fn poll(&self, ticket: &str, user: &str) -> (StatusCode, Value) {
        self.call(
            Method::GET,
            &format!("/v1/events/{}/line/{ticket}?user_id={user}", self.event),
            &[],
            Value::Null,
        )
        .await
    }

    /// Polls until admitted (bounded).
    async fn admitted(&self, ticket: &str, user: &str) -> Value {
        let start = Instant::now();
        loop {
            let (s, v) = self.poll(ticket, user).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if v["admitted"] == json!(true) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "not admitted: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn issue_requests_without_a_valid_admission_are_refused(backend: &str) {
    let f = fixture(backend, true).await;
    let (s, v) = f.issue("alice", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "admission_required");
    assert!(
        v["message"].as_str().unwrap().contains("join the line"),
        "{v}"
    );
    let (s, v) = f.issue("alice", Some("not-a-token")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_malformed"))
    );
    // A real token, but bob's: not alice's admission.
    let key = TokenKey::new(KEY.as_bytes().to_vec()).unwrap();
    let far = now_micros() + 60_000_000;
    let bobs = key.sign(&f.event, "bob", Uuid::new_v4(), far);
    let (s, v) = f.issue("alice", Some(&bobs)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_invalid"))
    );
    // Another event's token.
    let elsewhere = key.sign("open-door", "alice", Uuid::new_v4(), far);
    let (s, v) = f.issue("alice", Some(&elsewhere)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_invalid"))
    );
    // Signed with another key (a forgery).
    let forged = TokenKey::random().sign(&f.event, "alice", Uuid::new_v4(), far);
    let (s, v) = f.issue("alice", Some(&forged)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_invalid"))
    );
    let expired = key.sign(&f.event, "alice", Uuid::new_v4(), now_micros() - 1);
    let (s, v) = f.issue("alice", Some(&expired)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_expired"))
    );
    // An event without a room is open as before.
    let (s, v) = f
        .call(
            Method::POST,
            "/v1/events/open-door/issue",
            &[],
            json!({"user_id": "alice"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
}

async fn an_admitted_user_passes_the_gate_and_frees_the_slot(backend: &str) {
    let f = fixture(backend, true).await;
    let key = Uuid::new_v4().to_string();
    let (s, first) = f.join("alice", Some(&key)).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(first["position"], 1);
    assert!(first["poll_after_ms"].as_u64().unwrap() >= 500, "{first}");
    assert!(first["estimated_wait_ms"].is_u64(), "{first}");
    let (s, again) = f.join("alice", Some(&key)).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "a retried join is the same ticket: {again}"
    );
    assert_eq!(again["ticket_id"], first["ticket_id"]);
    let ticket = first["ticket_id"].as_str().unwrap();
    let v = f.admitted(ticket, "alice").await;
    let token = v["admission_token"]
        .as_str()
        .expect("a token once admitted");
    let (s, v) = f.issue("alice", Some(token)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // The token is alice's only.
    let (s, _) = f.issue("mallory", Some(token)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The accepted issue freed the slot (done) before it was answered.
    let (_, v) = f.poll(ticket, "alice").await;
    assert_eq!(v["state"], "done", "{v}");
    let (s, room) = f
        .call(
            Method::GET,
            &format!("/v1/events/{}/line", f.event),
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(room["stats"]["done"], 1, "{room}");
    assert_eq!(room["stats"]["joined"], 1, "{room}");
}

async fn an_admission_token_passes_the_gate_once(backend: &str) {
    let f = fixture(backend, true).await;
    let (_, t) = f.join("alice", None).await;
    let ticket = t["ticket_id"].as_str().unwrap();
    let v = f.admitted(ticket, "alice").await;
    let token = v["admission_token"].as_str().unwrap().to_string();
    let (s, v) = f.issue("alice", Some(&token)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // The slot is free: the same token, well within its deadline, is spent.
    let (s, v) = f.issue("alice", Some(&token)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_used")),
        "{v}"
    );
    // A token of a ticket that left the line is refused too.
    let (_, t) = f.join("bob", None).await;
    let ticket = t["ticket_id"].as_str().unwrap();
    let v = f.admitted(ticket, "bob").await;
    let token = v["admission_token"].as_str().unwrap().to_string();
    let (s, _) = f
        .call(
            Method::DELETE,
            &format!("/v1/events/{}/line/{ticket}?user_id=bob", f.event),
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f.issue("bob", Some(&token)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_left")),
        "{v}"
    );
}

async fn a_ticket_is_shown_to_its_user_only(backend: &str) {
    let f = fixture(backend, true).await;
    let (_, t) = f.join("alice", None).await;
    let ticket = t["ticket_id"].as_str().unwrap();
    let (s, v) = f.poll(ticket, "bob").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = f
        .call(
            Method::DELETE,
            &format!("/v1/events/{}/line/{ticket}?user_id=bob", f.event),
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = f
        .call(
            Method::DELETE,
            &format!("/v1/events/{}/line/{ticket}?user_id=alice", f.event),
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Waiting or already admitted, leaving gives the place up.
    assert_eq!(v["state"], "left", "{v}");
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(#[tokio::test] async fn $name() { super::$name("redis").await })*
        }
        mod kafka {
            $(#[tokio::test] async fn $name() { super::$name("kafka").await })*
        }
    };
}

both!(
    issue_requests_without_a_valid_admission_are_refused,
    an_admitted_user_passes_the_gate_and_frees_the_slot,
    an_admission_token_passes_the_gate_once,
    a_ticket_is_shown_to_its_user_only,
);

/// A Kafka room's policy is in its partition, not in the memory of the api
/// that opened it: another api process (or the same one restarted) keeps
/// the gate closed.
#[tokio::test]
async fn the_kafka_gate_stays_closed_at_an_api_that_did_not_open_the_room() {
    let f = fixture("kafka", true).await;
    let other = f.another_api().await;
    let (s, v) = other.issue("alice", None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_required")),
        "{v}"
    );
    // A token signed elsewhere is not an admission this process knows of.
    let key = TokenKey::new(KEY.as_bytes().to_vec()).unwrap();
    let token = key.sign(&f.event, "alice", Uuid::new_v4(), now_micros() + 60_000_000);
    let (s, v) = other.issue("alice", Some(&token)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // The room is there, with its policy.
    let (s, v) = other
        .call(
            Method::GET,
            &format!("/v1/events/{}/line", f.event),
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["policy"]["max_active"], 2, "{v}");
    // An event without a room stays open.
    let (s, v) = other
        .call(
            Method::POST,
            "/v1/events/open-door/issue",
            &[],
            json!({"user_id": "alice"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
}

/// A room whose partition cannot be read is unavailable (503 with
/// Retry-After), never open.
#[tokio::test]
async fn the_kafka_gate_answers_503_when_the_room_cannot_be_read() {
    let f = fixture("kafka", true).await;
    let other = f.another_api().await;
    f.mock
        .inject(couponrush_harness::Fault::Rtt(
            -1,
            Duration::from_millis(20_000),
        ))
        .unwrap();
    let (s, v, headers) = other
        .call_full(
            Method::POST,
            &format!("/v1/events/{}/issue", f.event),
            &[],
            json!({"user_id": "alice"}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    // The gate said so, before any produce was tried.
    assert!(
        v["message"].as_str().unwrap_or("").contains("waiting room"),
        "{v}"
    );
}

#[tokio::test]
async fn bad_line_input_is_a_4xx_saying_what() {
    let f = fixture("redis", true).await;
    let e = f.event.clone();
    let cases: Vec<(Method, String, Value, u16, &str)> = vec![
        (
            Method::POST,
            format!("/v1/events/{e}/line"),
            json!({}),
            422,
            "",
        ),
        (
            Method::POST,
            format!("/v1/events/{e}/line"),
            json!({"user_id": ""}),
            422,
            "user_id",
        ),
        (
            Method::GET,
            format!("/v1/events/{e}/line/nope?user_id=a"),
            Value::Null,
            400,
            "UUID",
        ),
        (
            Method::GET,
            format!("/v1/events/{e}/line/{}", Uuid::new_v4()),
            Value::Null,
            400,
            "user_id",
        ),
        (
            Method::GET,
            format!("/v1/events/{e}/line/{}?user_id=a", Uuid::new_v4()),
            Value::Null,
            404,
            "no ticket",
        ),
        (
            Method::PUT,
            format!("/v1/events/{e}/line"),
            json!({"ticket_ttl_secs": 5}),
            422,
            "max_active",
        ),
        (
            Method::PUT,
            format!("/v1/events/{e}/line"),
            json!({"rate_per_sec": 5, "ticket_ttl_secs": -1}),
            422,
            "seconds",
        ),
        (
            Method::PUT,
            "/v1/events/nobody-made-this/line".into(),
            json!({"rate_per_sec": 5}),
            404,
            "create it",
        ),
        (
            Method::POST,
            "/v1/events/open-door/line".into(),
            json!({"user_id": "a"}),
            404,
            "no waiting room",
        ),
        (
            Method::POST,
            "/v1/events/bad%20id/line".into(),
            json!({"user_id": "a"}),
            400,
            "event_id",
        ),
    ];
    for (method, uri, body, want, says) in cases {
        let (s, v) = f.call(method.clone(), &uri, &[], body.clone()).await;
        assert_eq!(s.as_u16(), want, "{method} {uri} {body}: {v}");
        assert!(
            v["message"].as_str().unwrap_or("").contains(says),
            "{method} {uri}: {v}"
        );
    }
    let (s, v) = f.join("a", Some("not-a-uuid")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn line_calls_past_the_in_flight_bound_are_a_503_with_retry_after() {
    let f = Arc::new(fixture_with("kafka", true, |c| c.max_in_flight = 1).await);
    // A slow broker holds the one permitted join while a second one comes.
    f.mock
        .inject(couponrush_harness::Fault::Rtt(
            -1,
            Duration::from_millis(1500),
        ))
        .unwrap();
    let slow = {
        let f = f.clone();
        tokio::spawn(async move { f.join("alice", None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, v, headers) = f
        .call_full(
            Method::POST,
            &format!("/v1/events/{}/line", f.event),
            &[],
            json!({"user_id": "bob"}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "overloaded", "{v}");
    assert_eq!(headers["retry-after"], "1");
    let (s, v) = slow.await.unwrap();
    assert_eq!(s, StatusCode::CREATED, "the held join completes: {v}");
}
