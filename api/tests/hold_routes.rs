//! The hold routes, status code by status code, through `app().oneshot(..)`
//! over librdkafka's mock cluster and the in-memory store (as
//! `routes.rs`): a claim or a cancel the store would decide is produced to
//! the compensations topic and answered `202` once acknowledged; everything
//! else is answered from the store's logged state without producing
//! anything: 404 for a request without a coupon, 409 `no_holds` for an
//! event without holds, the same 404 for another user (telling nothing about the
//! hold), 409 `hold_expired` / `hold_released` / `hold_claimed` for a hold
//! that ended otherwise, 200 for a repeat of what already happened, 503
//! with `Retry-After` under overload.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use couponrush_api::App;
use couponrush_api::{app, Api, AppState, Config};
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::{
    BatchVerdict, EventBatch, EventSpec, LoggedDecisions, Pending, PendingAction, Store,
};
use couponrush_core::wire::{now_micros, HoldAction, HoldVerb};
use couponrush_core::Topics;
use couponrush_harness::{MockKafka, TopicReader};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

/// The claim window of the event with holds: a minute.
const WINDOW_MS: u64 = 60_000;

struct Fixture {
    router: App,
    state: Arc<AppState>,
    store: Arc<dyn Store>,
    brokers: String,
    _mock: MockKafka,
}

async fn fixture() -> Fixture {
    let mock = MockKafka::start(1).unwrap();
    for spec in Topics::default().specs(2, 1) {
        mock.create_topic(&spec.name, spec.partitions, spec.replication)
            .unwrap();
    }
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    for (event, window) in [("held", WINDOW_MS * 1000), ("plain", 0)] {
        store
            .put_event(
                event,
                EventSpec {
                    stock: 10,
                    per_user_limit: 5,
                    claim_window_us: window,
                    stock_buckets: 1,
                },
            )
            .await
            .unwrap();
    }
    let api = Api::bind(Config::local(&mock.brokers()), store.clone(), None)
        .await
        .unwrap();
    let state = api.state();
    Fixture {
        router: app(state.clone()),
        state,
        store,
        brokers: mock.brokers(),
        _mock: mock,
    }
}

async fn call(
    router: &App,
    method: Method,
    uri: &str,
    body: &str,
) -> (StatusCode, Value, HeaderMap) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    )
}

/// Asks the store to decide `actions` and `requests` of `event` at `now`,
/// and marks what moved logged (as an issuer does once its outcomes are
/// acknowledged). Returns the request ids.
async fn decide(
    store: &dyn Store,
    event: &str,
    actions: &[PendingAction],
    users: &[&str],
    now: u64,
) -> Vec<Uuid> {
    let requests: Vec<Pending> = users
        .iter()
        .map(|u| Pending {
            request_id: Uuid::now_v7(),
            user_id: u.to_string(),
        })
        .collect();
    let verdicts = store
        .decide(
            &[EventBatch {
                event_id: event.into(),
                requests: requests.clone(),
                actions: actions.to_vec(),
            }],
            now,
        )
        .await
        .unwrap();
    let BatchVerdict::Decided {
        generation,
        decisions,
        holds,
        ..
    } = &verdicts[0]
    else {
        panic!("unknown event")
    };
    let mut logged: Vec<(Uuid, u64)> = requests
        .iter()
        .zip(decisions)
        .map(|(p, d)| (p.request_id, d.seq))
        .collect();
    for (a, h) in actions.iter().zip(holds) {
        let h = h.expect("the action moved its hold");
        logged.push((a.request_id, h.seq));
    }
    store
        .mark_logged(&[LoggedDecisions {
            event_id: event.into(),
            generation: *generation,
            decisions: logged,
        }])
        .await
        .unwrap();
    requests.iter().map(|p| p.request_id).collect()
}

fn action(verb: HoldVerb, id: Uuid, user: &str, at: u64) -> PendingAction {
    PendingAction {
        request_id: id,
        user_id: user.into(),
        verb,
        at,
    }
}

fn uri(event: &str, id: Uuid, verb: &str) -> String {
    format!("/v1/events/{event}/requests/{id}/{verb}")
}

fn body(user: &str) -> String {
    format!("{{\"user_id\":\"{user}\"}}")
}

/// Every action produced to the compensations topic so far (reads for a
/// moment: the acknowledged ones are there).
fn produced(brokers: &str) -> Vec<HoldAction> {
    let reader = TopicReader::new(brokers, &Topics::default().compensations).unwrap();
    let mut all = Vec::new();
    reader.read_until(
        &mut all,
        Duration::from_secs(3),
        |r| HoldAction::parse(&r.payload).expect("actions parse"),
        |_: &[HoldAction]| false,
    );
    all
}

#[tokio::test]
async fn a_claim_and_a_cancel_by_the_holder_are_produced_and_answered_202() {
    let f = fixture().await;
    let now = now_micros();
    let ids = decide(&*f.store, "held", &[], &["ann", "bob"], now).await;
    let (status, json, _) = call(
        &f.router,
        Method::POST,
        &uri("held", ids[0], "claim"),
        &body("ann"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert_eq!(json["action"], "claim");
    assert_eq!(
        json["status_url"],
        format!("/v1/events/held/requests/{}", ids[0])
    );
    let (status, _, _) = call(
        &f.router,
        Method::POST,
        &uri("held", ids[1], "cancel"),
        &body("bob"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let actions = produced(&f.brokers);
    let mut got: Vec<(HoldVerb, Uuid, &str)> = actions
        .iter()
        .map(|a| (a.action, a.request_id, a.user_id.as_str()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (HoldVerb::Claim, ids[0], "ann"),
            (HoldVerb::Cancel, ids[1], "bob")
        ]
    );
    assert!(actions.iter().all(|a| a.at >= now && a.event_id == "held"));
    // The status shows the hold, still held until an issuer applies it.
    let (status, json, _) = call(
        &f.router,
        Method::GET,
        &format!("/v1/events/held/requests/{}", ids[0]),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["hold"]["state"], "held");
    assert_eq!(json["hold"]["until"], now + WINDOW_MS * 1000);
}

#[tokio::test]
async fn a_repeat_of_what_happened_is_200_and_what_cannot_happen_is_409_saying_why() {
    let f = fixture().await;
    let now = now_micros();
    let ids = decide(&*f.store, "held", &[], &["ann", "bob", "cat"], now).await;
    let (ann, bob, cat) = (ids[0], ids[1], ids[2]);
    decide(
        &*f.store,
        "held",
        &[
            action(HoldVerb::Claim, ann, "ann", now + 1),
            action(HoldVerb::Cancel, bob, "bob", now + 1),
        ],
        &[],
        now + 1,
    )
    .await;
    let expired_at = now + WINDOW_MS * 1000;
    decide(
        &*f.store,
        "held",
        &[action(HoldVerb::Expire, cat, "cat", expired_at)],
        &[],
        expired_at,
    )
    .await;
    let cases = [
        (ann, "ann", "claim", 200, Some("claimed"), None),
        (ann, "ann", "cancel", 409, None, Some("hold_claimed")),
        (bob, "bob", "cancel", 200, Some("released"), None),
        (bob, "bob", "claim", 409, None, Some("hold_released")),
        (cat, "cat", "claim", 409, None, Some("hold_expired")),
        (cat, "cat", "cancel", 409, None, Some("hold_expired")),
    ];
    for (id, user, verb, want, state, code) in cases {
        let (status, json, _) =
            call(&f.router, Method::POST, &uri("held", id, verb), &body(user)).await;
        assert_eq!(status.as_u16(), want, "{user} {verb}: {json}");
        if let Some(state) = state {
            assert_eq!(json["hold"]["state"], state, "{user} {verb}");
        }
        if let Some(code) = code {
            assert_eq!(json["error"], code, "{user} {verb}");
            assert!(json["message"].as_str().unwrap().len() > 10);
        }
    }
    assert!(produced(&f.brokers).is_empty(), "nothing was produced");
    let (_, json, _) = call(&f.router, Method::GET, &format!("/v1/requests/{bob}"), "").await;
    assert_eq!(json["hold"]["state"], "released");
    let (_, json, _) = call(&f.router, Method::GET, "/v1/events/held", "").await;
    assert_eq!(
        (
            &json["issued_total"],
            &json["released"],
            &json["claimed"],
            &json["remaining"],
            &json["held"],
            &json["claim_window_ms"]
        ),
        (
            &Value::from(3),
            &Value::from(2),
            &Value::from(1),
            &Value::from(9),
            &Value::from(0),
            &Value::from(WINDOW_MS)
        ),
        "issued_total − released + remaining = stock: {json}"
    );
}

#[tokio::test]
async fn a_claim_at_the_deadline_is_409_hold_expired_even_before_the_sweep() {
    let f = fixture().await;
    let long_ago = now_micros() - WINDOW_MS * 1000 - 1;
    let ids = decide(&*f.store, "held", &[], &["ann"], long_ago).await;
    let (status, json, _) = call(
        &f.router,
        Method::POST,
        &uri("held", ids[0], "claim"),
        &body("ann"),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(json["error"], "hold_expired");
    // A cancel of a hold still held past its deadline gives it back: the
    // store decides it, nothing is lost either way.
    let (status, _, _) = call(
        &f.router,
        Method::POST,
        &uri("held", ids[0], "cancel"),
        &body("ann"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn another_users_action_is_answered_as_if_nothing_was_won() {
    let f = fixture().await;
    let ids = decide(&*f.store, "held", &[], &["ann-the-holder"], now_micros()).await;
    for verb in ["claim", "cancel"] {
        let (status, json, _) = call(
            &f.router,
            Method::POST,
            &uri("held", ids[0], verb),
            &body("eve"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{verb}");
        // Word for word what a request that won nothing gets.
        let (_, nothing, _) = call(
            &f.router,
            Method::POST,
            &uri("held", Uuid::now_v7(), verb),
            &body("eve"),
        )
        .await;
        assert_eq!(
            json["error"], nothing["error"],
            "{verb}: {json} vs {nothing}"
        );
        let text = json.to_string();
        assert!(
            !text.contains("ann-the-holder") && !text.contains("held\""),
            "nothing about the hold is told: {text}"
        );
    }
    assert!(produced(&f.brokers).is_empty());
}

#[tokio::test]
async fn a_request_without_a_coupon_is_404_and_an_event_without_holds_409() {
    let f = fixture().await;
    let now = now_micros();
    // plain: issued, but final at once.
    let plain = decide(&*f.store, "plain", &[], &["ann"], now).await;
    let (status, json, _) = call(
        &f.router,
        Method::POST,
        &uri("plain", plain[0], "claim"),
        &body("ann"),
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::CONFLICT, Some("no_holds"))
    );
    let (_, json, _) = call(
        &f.router,
        Method::GET,
        &format!("/v1/events/plain/requests/{}", plain[0]),
        "",
    )
    .await;
    assert_eq!(json["decision"]["result"], "issued");
    assert!(
        json.get("hold").is_none(),
        "no hold in an event without holds: {json}"
    );
    // held: a request never seen, one decided but not logged, one not issued.
    let unlogged = Uuid::now_v7();
    f.store
        .decide(
            &[EventBatch::requests(
                "held",
                vec![Pending {
                    request_id: unlogged,
                    user_id: "bob".into(),
                }],
            )],
            now,
        )
        .await
        .unwrap();
    let limited = decide(&*f.store, "held", &[], &["cat"; 6], now).await[5];
    for (id, user) in [(Uuid::now_v7(), "ann"), (unlogged, "bob"), (limited, "cat")] {
        let (status, json, _) = call(
            &f.router,
            Method::POST,
            &uri("held", id, "claim"),
            &body(user),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{user}: {json}");
    }
    let (status, _, _) = call(
        &f.router,
        Method::POST,
        &uri("nosuch", Uuid::now_v7(), "claim"),
        &body("ann"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(produced(&f.brokers).is_empty());
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_and_overload_a_503_with_retry_after() {
    let f = fixture().await;
    let ids = decide(&*f.store, "held", &[], &["ann"], now_micros()).await;
    let good = uri("held", ids[0], "claim");
    let cases: Vec<(String, &str, u16)> = vec![
        (
            "/v1/events/held/requests/not-a-uuid/claim".into(),
            r#"{"user_id":"ann"}"#,
            400,
        ),
        (
            format!("/v1/events/a%20b/requests/{}/claim", ids[0]),
            r#"{"user_id":"ann"}"#,
            400,
        ),
        (good.clone(), r#"{"user_id":""}"#, 422),
        (good.clone(), r#"{"user":"ann"}"#, 422),
        (good.clone(), r#"{"user_id":"ann","extra":1}"#, 422),
        (good.clone(), "{not json", 400),
    ];
    for (u, b, want) in cases {
        let (status, json, _) = call(&f.router, Method::POST, &u, b).await;
        assert_eq!(status.as_u16(), want, "{u} {b}: {json}");
        assert!(
            json["error"].is_string() && json["message"].is_string(),
            "{json}"
        );
    }
    let (status, _, _) = call(&f.router, Method::GET, &good, "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // Every permit taken: shed, nothing produced.
    let permits = f
        .state
        .in_flight
        .acquire_many(f.state.max_in_flight as u32)
        .await
        .unwrap();
    let (status, json, headers) = call(&f.router, Method::POST, &good, &body("ann")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(headers["retry-after"], "1");
    drop(permits);
    assert!(produced(&f.brokers).is_empty());
    let (status, _, _) = call(&f.router, Method::POST, &good, &body("ann")).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "served again once the load drops"
    );
}

#[tokio::test]
async fn an_event_is_put_with_its_claim_window_and_a_window_over_a_day_is_refused() {
    let f = fixture().await;
    let (status, json, _) = call(
        &f.router,
        Method::PUT,
        "/v1/events/fresh",
        r#"{"stock":4,"claim_window_ms":90000}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    assert_eq!(json["claim_window_ms"], 90_000);
    assert_eq!(
        f.store
            .event("fresh")
            .await
            .unwrap()
            .unwrap()
            .claim_window_us,
        90_000_000
    );
    let (status, json, _) = call(
        &f.router,
        Method::PUT,
        "/v1/events/fresh",
        r#"{"stock":4,"claim_window_ms":86400001}"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    let (_, json, _) = call(&f.router, Method::GET, "/v1/events/fresh", "").await;
    assert_eq!(
        json["claim_window_ms"], 90_000,
        "a refused PUT changes nothing"
    );
}
