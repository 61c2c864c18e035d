//! The api's contract, route by route, through `app().oneshot(..)` over
//! librdkafka's mock cluster and the in-memory store: every client mistake
//! is a 4xx with a JSON reason, overload is a 503 with `Retry-After`, admin
//! routes need the token, and only logged decisions are shown.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use couponrush_api::{app, request_id, router, Api, App, AppState, Config};
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{
    BatchVerdict, EventBatch, EventSpec, LoggedDecisions, Pending, Store,
};
use couponrush_core::wire::now_micros;
use couponrush_core::wire::IssueRequest;
use couponrush_core::{DecisionResult, Topics};
use couponrush_harness::{Fault, MockKafka};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

struct Fixture {
    router: App,
    state: Arc<AppState>,
    store: Arc<dyn Store>,
    brokers: String,
    mock: MockKafka,
}

async fn fixture(admin_token: Option<&str>) -> Fixture {
    fixture_with(|c| c.admin_token = admin_token.map(str::to_string)).await
}

/// The fixture, its api configured by `tweak`.
async fn fixture_with(tweak: impl FnOnce(&mut Config)) -> Fixture {
    let mock = MockKafka::start(1).unwrap();
    for spec in Topics::default().specs(4, 1) {
        mock.create_topic(&spec.name, spec.partitions, spec.replication)
            .unwrap();
    }
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    store
        .put_event(
            "drop",
            EventSpec {
                stock: 3,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await
        .unwrap();
    let mut config = Config::local(&mock.brokers());
    tweak(&mut config);
    let api = Api::bind(config, store.clone(), None).await.unwrap();
    let state = api.state();
    Fixture {
        router: app(state.clone()),
        state,
        store,
        brokers: mock.brokers(),
        mock,
    }
}

async fn call(
    router: &App,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> (StatusCode, Value, HeaderMap) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = router
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json, headers)
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// method, uri, headers, body, expected status
type Case<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, String, u16);

#[tokio::test]
async fn every_client_mistake_is_a_4xx_with_a_json_reason() {
    let f = fixture(None).await;
    let big = format!("{{\"user_id\":\"{}\"}}", "x".repeat(2000));
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![],
            r#"{"user_id":"a"}"#.into(),
            415,
        ),
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![JSON],
            "{not json".into(),
            400,
        ),
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![JSON],
            r#"{"user_id":1}"#.into(),
            422,
        ),
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![JSON],
            "{}".into(),
            422,
        ),
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![JSON],
            r#"{"user_id":"a","stock":9}"#.into(),
            422,
        ),
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![JSON],
            r#"{"user_id":""}"#.into(),
            422,
        ),
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![JSON],
            "{\"user_id\":\"a\\u0000b\"}".into(),
            422,
        ),
        (Method::POST, "/v1/events/drop/issue", vec![JSON], big, 413),
        (
            Method::POST,
            "/v1/events/a%20b/issue",
            vec![JSON],
            r#"{"user_id":"a"}"#.into(),
            400,
        ),
        (
            Method::POST,
            "/v1/events/%7Bslot%7D/issue",
            vec![JSON],
            r#"{"user_id":"a"}"#.into(),
            400,
        ),
        (
            Method::POST,
            "/v1/events/drop/issue",
            vec![JSON, ("idempotency-key", "not-a-uuid")],
            r#"{"user_id":"a"}"#.into(),
            400,
        ),
        (
            Method::POST,
            "/v1/events/nosuch/issue",
            vec![JSON],
            r#"{"user_id":"a"}"#.into(),
            404,
        ),
        (Method::GET, "/v1/events/nosuch", vec![], String::new(), 404),
        (
            Method::GET,
            "/v1/requests/not-a-uuid",
            vec![],
            String::new(),
            400,
        ),
        (Method::GET, "/v1/nowhere", vec![], String::new(), 404),
        (
            Method::DELETE,
            "/v1/events/drop",
            vec![],
            String::new(),
            405,
        ),
        (
            Method::GET,
            "/v1/events/drop/issue",
            vec![],
            String::new(),
            405,
        ),
        (
            Method::PUT,
            "/v1/events/new",
            vec![JSON],
            r#"{"stock":1,"per_user_limit":0}"#.into(),
            422,
        ),
        (
            Method::PUT,
            "/v1/events/new",
            vec![JSON],
            r#"{"stock":-1}"#.into(),
            422,
        ),
        (
            Method::PUT,
            "/v1/events/new",
            vec![JSON],
            r#"{"stock":99999999999}"#.into(),
            422,
        ),
        (
            Method::PUT,
            "/v1/events/new",
            vec![JSON],
            r#"{"stock":10000001}"#.into(),
            422,
        ),
        (
            Method::PUT,
            "/v1/events/new",
            vec![JSON],
            r#"{"stock":10,"stock_buckets":0}"#.into(),
            422,
        ),
        (
            Method::PUT,
            "/v1/events/new",
            vec![JSON],
            r#"{"stock":10,"stock_buckets":65}"#.into(),
            422,
        ),
    ];
    for (method, uri, headers, body, expected) in cases {
        let (status, json, _) = call(&f.router, method.clone(), uri, &headers, body.clone()).await;
        assert_eq!(
            status.as_u16(),
            expected,
            "{method} {uri} {body:.60}: {json}"
        );
        assert!(
            json["error"].is_string(),
            "{method} {uri}: no error code in {json}"
        );
        assert!(
            json["message"].is_string(),
            "{method} {uri}: no message in {json}"
        );
    }
    // Nothing of the above touched the event.
    assert_eq!(f.store.event("drop").await.unwrap().unwrap().remaining, 3);
    assert!(f.store.event("new").await.unwrap().is_none());
}

#[tokio::test]
async fn the_same_idempotency_key_is_the_same_request() {
    let f = fixture(None).await;
    let key = Uuid::now_v7().to_string();
    let headers = [JSON, ("idempotency-key", key.as_str())];
    let (s1, a, _) = call(
        &f.router,
        Method::POST,
        "/v1/events/drop/issue",
        &headers,
        r#"{"user_id":"u"}"#,
    )
    .await;
    let (s2, b, _) = call(
        &f.router,
        Method::POST,
        "/v1/events/drop/issue",
        &headers,
        r#"{"user_id":"u"}"#,
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    let id = request_id::from_key("drop", "u", key.parse().unwrap()).to_string();
    assert_eq!(a["request_id"], id.as_str(), "scoped by event and user");
    assert_eq!(b["request_id"], id.as_str());
    assert!(a["accepted_at"].as_u64().unwrap() > 0);
    // Without a key, every request is new and gets a time-ordered UUID v7.
    let (_, c, _) = call(
        &f.router,
        Method::POST,
        "/v1/events/drop/issue",
        &[JSON],
        r#"{"user_id":"u"}"#,
    )
    .await;
    let id = Uuid::parse_str(c["request_id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);
}

#[tokio::test]
async fn admin_routes_need_the_token_and_a_refusal_changes_nothing() {
    let f = fixture(Some("s3cret")).await;
    let body = r#"{"stock":100,"per_user_limit":5}"#;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Bearer s3cre"),
    ] {
        let mut headers = vec![JSON];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let (status, json, h) =
            call(&f.router, Method::PUT, "/v1/events/drop", &headers, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {json}");
        assert_eq!(h["www-authenticate"], "Bearer");
    }
    let ev = f.store.event("drop").await.unwrap().unwrap();
    assert_eq!(
        (ev.stock, ev.remaining, ev.generation),
        (3, 3, 1),
        "unchanged"
    );
    let (status, json, _) = call(
        &f.router,
        Method::PUT,
        "/v1/events/drop",
        &[JSON, ("authorization", "Bearer s3cret")],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "a reset: {json}");
    assert_eq!(json["stock"], 100);
    assert_eq!(json["generation"], 2);
    let (status, _, _) = call(
        &f.router,
        Method::PUT,
        "/v1/events/fresh",
        &[JSON, ("authorization", "Bearer s3cret")],
        r#"{"stock":1}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn listening_beyond_loopback_without_a_token_is_refused() {
    let mock = MockKafka::start(1).unwrap();
    let mut config = Config::local(&mock.brokers());
    config.listen = "0.0.0.0:0".parse().unwrap();
    let err = Api::bind(config, Arc::new(MemoryStore::default()), None)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("ADMIN_TOKEN"), "{err}");
}

/// The served api's header-read timeout (the slowloris guard, kept by
/// `connections`' reaper for every connection): a kept-alive connection whose
/// requests come further apart in all than the timeout, each within it, is
/// served throughout; one that sends half a head and stalls is closed, not
/// before the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_spares_a_kept_alive_connection_and_closes_a_stalled_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockKafka::start(1).unwrap();
    for spec in Topics::default().specs(4, 1) {
        mock.create_topic(&spec.name, spec.partitions, spec.replication)
            .unwrap();
    }
    let api = Api::bind(
        Config::local(&mock.brokers()),
        Arc::new(MemoryStore::default()),
        None,
    )
    .await
    .unwrap();
    let addr = api.local_addr();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(api.serve(shutdown.clone()));
    let timeout = couponrush_api::CLIENT_TIMEOUT;

    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(timeout * 6 / 10).await;
        }
        kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = kept.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head:?}");
    }
    assert!(started.elapsed() > timeout, "the requests span the timeout");

    // Before connecting: the server's clock starts at its accept.
    let started = std::time::Instant::now();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nho")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(timeout * 3, stalled.read(&mut buf)).await;
    let waited = started.elapsed();
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the stalled connection is closed within 3 timeouts"
    );
    assert!(
        waited >= timeout,
        "closed after {waited:?}, before the timeout"
    );
    shutdown.cancel();
    let _ = served.await;
}

#[tokio::test]
async fn overload_is_a_503_with_retry_after_and_nothing_accepted() {
    let f = fixture(None).await;
    // Hold every in-flight permit, as a stalled broker would.
    let held = f
        .state
        .in_flight
        .acquire_many(f.state.max_in_flight as u32)
        .await
        .unwrap();
    let (status, json, headers) = call(
        &f.router,
        Method::POST,
        "/v1/events/drop/issue",
        &[JSON],
        r#"{"user_id":"u"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(json["error"], "overloaded");
    assert_eq!(headers["retry-after"], "1");
    drop(held);
    let (status, _, _) = call(
        &f.router,
        Method::POST,
        "/v1/events/drop/issue",
        &[JSON],
        r#"{"user_id":"u"}"#,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "full service once the load drops"
    );
}

#[tokio::test]
async fn status_shows_a_decision_only_once_it_is_logged() {
    let f = fixture(None).await;
    let id = Uuid::now_v7();
    let uri = format!("/v1/events/drop/requests/{id}");
    let (_, json, _) = call(&f.router, Method::GET, &uri, &[], Body::empty()).await;
    assert_eq!(json["status"], "pending");
    let verdicts = f
        .store
        .decide(
            &[EventBatch {
                event_id: "drop".into(),
                requests: vec![Pending {
                    request_id: id,
                    user_id: "u".into(),
                }],
                actions: Vec::new(),
            }],
            now_micros(),
        )
        .await
        .unwrap();
    let BatchVerdict::Decided {
        generation,
        decisions,
        ..
    } = &verdicts[0]
    else {
        panic!("unknown event")
    };
    let (_, json, _) = call(&f.router, Method::GET, &uri, &[], Body::empty()).await;
    assert_eq!(
        json["status"], "pending",
        "decided but its outcome is not in the log yet"
    );
    f.store
        .mark_logged(&[LoggedDecisions {
            event_id: "drop".into(),
            generation: *generation,
            decisions: vec![(id, decisions[0].seq)],
        }])
        .await
        .unwrap();
    for uri in [uri.clone(), format!("/v1/requests/{id}")] {
        let (status, json, _) = call(&f.router, Method::GET, &uri, &[], Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["status"], "decided", "{uri}");
        assert_eq!(json["decision"]["result"], "issued");
        assert_eq!(json["decision"]["issued_rank"], 1);
    }
}

#[tokio::test]
async fn events_read_back_with_their_counters_and_probes_answer() {
    let f = fixture(None).await;
    let (status, json, _) = call(
        &f.router,
        Method::GET,
        "/v1/events/drop",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["remaining"], 3);
    assert_eq!(json["sold_out"], false);
    assert!(
        json.get("stock_buckets").is_none(),
        "one bucket is not shown"
    );
    // A bucketed event reads back whole: its buckets' counters summed.
    let (status, json, _) = call(
        &f.router,
        Method::PUT,
        "/v1/events/hot",
        &[JSON],
        r#"{"stock":10,"stock_buckets":4}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let (status, json, _) =
        call(&f.router, Method::GET, "/v1/events/hot", &[], Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&json["stock"], &json["remaining"], &json["stock_buckets"]),
        (&10.into(), &10.into(), &4.into()),
        "{json}"
    );
    let (status, _, _) = call(&f.router, Method::GET, "/healthz", &[], Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, json, _) = call(&f.router, Method::GET, "/readyz", &[], Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["broker"], "ok");
}

/// POSTs an issue request for `user` with `key`; returns the 202 body.
async fn issue_with_key(router: &App, user: &str, key: &str) -> Value {
    let (status, json, _) = call(
        router,
        Method::POST,
        "/v1/events/drop/issue",
        &[JSON, ("idempotency-key", key)],
        format!("{{\"user_id\":\"{user}\"}}"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    json
}

#[tokio::test]
async fn a_reused_idempotency_key_never_shows_one_user_another_users_decision() {
    let f = fixture(None).await;
    let key = Uuid::new_v4().to_string();
    // Alice asks, and retries with the same key; Bob reuses her key.
    let alice = issue_with_key(&f.router, "alice", &key).await;
    let alice_retry = issue_with_key(&f.router, "alice", &key).await;
    let bob = issue_with_key(&f.router, "bob", &key).await;

    // Decide what the api produced, as an issuer would, and log it.
    let reader =
        couponrush_harness::TopicReader::new(&f.brokers, &Topics::default().requests).unwrap();
    let mut records = Vec::new();
    reader.read_until(
        &mut records,
        Duration::from_secs(10),
        |r| IssueRequest::parse(&r.payload).unwrap(),
        |r| r.len() >= 3,
    );
    assert_eq!(records.len(), 3, "every 202 is a record");
    records.sort_by_key(|r| r.accepted_at);
    let verdicts = f
        .store
        .decide(
            &[EventBatch {
                event_id: "drop".into(),
                requests: records
                    .iter()
                    .map(|r| Pending {
                        request_id: r.request_id,
                        user_id: r.user_id.clone(),
                    })
                    .collect(),
                actions: Vec::new(),
            }],
            now_micros(),
        )
        .await
        .unwrap();
    let BatchVerdict::Decided {
        generation,
        decisions,
        ..
    } = &verdicts[0]
    else {
        panic!("unknown event")
    };
    f.store
        .mark_logged(&[LoggedDecisions {
            event_id: "drop".into(),
            generation: *generation,
            decisions: records
                .iter()
                .zip(decisions)
                .map(|(r, d)| (r.request_id, d.seq))
                .collect(),
        }])
        .await
        .unwrap();
    let decided_for = |user: &str| {
        let i = records.iter().position(|r| r.user_id == user).unwrap();
        (decisions[i].result, decisions[i].issued_rank)
    };

    // Each status_url shows its own user's decision, and only that.
    for (user, accepted) in [("alice", &alice), ("alice", &alice_retry), ("bob", &bob)] {
        let url = accepted["status_url"].as_str().unwrap();
        assert!(
            url.ends_with(accepted["request_id"].as_str().unwrap()),
            "{user}'s status_url is for its request id: {accepted}"
        );
        let (status, shown, _) = call(&f.router, Method::GET, url, &[], Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(shown["status"], "decided", "{user}: {shown}");
        let shown_decision = (
            serde_json::from_value(shown["decision"]["result"].clone()).unwrap(),
            shown["decision"]["issued_rank"].as_u64().map(|r| r as u32),
        );
        assert_eq!(
            shown_decision,
            decided_for(user),
            "{user}'s status_url {url} shows {shown}, not {user}'s own decision"
        );
    }
    assert_eq!(
        alice["request_id"], alice_retry["request_id"],
        "a retry with the same key is the same request"
    );
    assert_ne!(
        bob["request_id"], alice["request_id"],
        "bob, reusing alice's Idempotency-Key, was handed alice's request id"
    );
    assert_eq!(decided_for("alice"), (DecisionResult::Issued, Some(1)));
    assert_eq!(
        decided_for("bob"),
        (DecisionResult::Issued, Some(2)),
        "bob's request is his own, decided on its own"
    );
}

#[tokio::test]
async fn a_body_that_stalls_is_a_408_and_the_route_serves_on() {
    let f = fixture(None).await;
    // Headers sent, the body never comes (a slow client, slowloris).
    let stalled = Body::from_stream(futures::stream::pending::<
        Result<axum::body::Bytes, std::io::Error>,
    >());
    let (status, json, _) = tokio::time::timeout(
        Duration::from_secs(30),
        call(
            &f.router,
            Method::POST,
            "/v1/events/drop/issue",
            &[JSON],
            stalled,
        ),
    )
    .await
    .expect("a stalled body is answered, not held forever");
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{json}");
    assert_eq!(json["error"], "request_timeout");
    let (status, json, _) = call(
        &f.router,
        Method::POST,
        "/v1/events/drop/issue",
        &[JSON],
        r#"{"user_id":"u"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
}

/// A request the broker did not acknowledge in time may still have been
/// written: the api says so (`503 unacknowledged` with the client's own
/// request id and status URL), never "refused", and a retry with the same
/// key is the same request.
#[tokio::test]
async fn an_unacknowledged_request_is_in_doubt_with_its_own_id_and_a_retry_is_the_same_request() {
    let f = fixture_with(|c| c.produce_timeout = Duration::from_secs(1)).await;
    let (mock, router) = (&f.mock, &f.router);
    let key = "0191e4d2-7a57-7000-8000-000000000042";
    let mine = request_id::from_key("drop", "alice", key.parse().unwrap());
    let headers = [JSON, ("idempotency-key", key)];
    let send = || {
        call(
            router,
            Method::POST,
            "/v1/events/drop/issue",
            &headers,
            r#"{"user_id":"alice"}"#,
        )
    };
    mock.inject(Fault::BrokerDown(1)).unwrap();
    let (status, json, headers) = send().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(json["error"], "unacknowledged", "{json}");
    assert_eq!(json["request_id"], mine.to_string(), "the client's own id");
    assert_eq!(
        json["status_url"],
        format!("/v1/events/drop/requests/{mine}")
    );
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{json}"
    );
    assert_eq!(headers["retry-after"], "1");
    mock.inject(Fault::BrokerUp(1)).unwrap();
    let mut answer = send().await;
    for _ in 0..20 {
        if answer.0 == StatusCode::ACCEPTED {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        answer = send().await;
    }
    let (status, json, _) = answer;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert_eq!(json["request_id"], mine.to_string(), "the same request");
}

/// The guard labels a request by matching its path itself (it wraps the
/// whole router, where axum's `MatchedPath` is not yet known): for a path
/// made from each pattern the guard knows, near misses and paths no route
/// matches, its label is the pattern axum's router matched, or "unmatched"
/// where it matched none. A matcher that strays from axum's, or a pattern
/// the router does not have, fails here. axum cannot list its routes: a
/// route added to the router needs its pattern added to the guard's list
/// (and a path here for any new shape of path).
#[tokio::test]
async fn the_guard_labels_every_request_with_the_route_axum_matched() {
    use axum::extract::MatchedPath;
    let f = fixture(None).await;
    let seen = router(f.state.clone()).layer(axum::middleware::from_fn(
        |req: axum::extract::Request, next: axum::middleware::Next| async move {
            let matched = req
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched".to_string(), |m| m.as_str().to_string());
            let mut resp = next.run(req).await;
            resp.headers_mut()
                .insert("x-matched", matched.parse().unwrap());
            resp
        },
    ));
    let id = Uuid::now_v7();
    // One path per pattern, its parameters filled in.
    let mut paths: Vec<String> = couponrush_api::guard::route_patterns()
        .iter()
        .map(|p| {
            p.split('/')
                .map(|s| if s.starts_with('{') { "p1" } else { s })
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    paths.extend([
        "/v1/events/drop".to_string(),
        format!("/v1/events/drop/line/{id}"),
        format!("/v1/events/drop/requests/{id}/claim"),
        format!("/v1/requests/{id}?x=1"),
        "/v1/events/a%2Fb/issue".to_string(),
        // Near misses and strangers.
        "/".to_string(),
        "/v1/events".to_string(),
        "/v1/events/".to_string(),
        "/v1/events//issue".to_string(),
        "/v1/events//".to_string(),
        "/v1/events/drop/".to_string(),
        "/v1/events/drop/issue/".to_string(),
        "/v1/events/drop/issue/more".to_string(),
        "/v1/events/drop/requests".to_string(),
        format!("/v1/events/drop/requests/{id}/claim/x"),
        "/v1/requests/".to_string(),
        "/healthz/".to_string(),
        "/HEALTHZ".to_string(),
        "/nope".to_string(),
    ]);
    let mut routes = std::collections::BTreeSet::new();
    for path in &paths {
        for method in [Method::GET, Method::DELETE] {
            let resp = seen
                .clone()
                .oneshot(
                    Request::builder()
                        .method(method.clone())
                        .uri(path.as_str())
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let matched = resp.headers()["x-matched"].to_str().unwrap().to_string();
            let path_only = path.split('?').next().unwrap();
            assert_eq!(
                couponrush_api::guard::route_label(path_only),
                matched,
                "{method} {path}"
            );
            routes.insert(matched);
        }
    }
    assert_eq!(routes.len(), 12, "every route and unmatched: {routes:?}");
}
