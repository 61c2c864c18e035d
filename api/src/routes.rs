//! The HTTP routes.
//!
//! | route                                     | what |
//! |-------------------------------------------|------|
//! | `PUT /v1/events/{event_id}`               | create or reset an event (admin) |
//! | `GET /v1/events/{event_id}`               | stock, remaining, issued, sold out |
//! | `POST /v1/events/{event_id}/issue`        | ask for a coupon → `202 {request_id}` |
//! | `GET /v1/requests/{request_id}`           | pending, or the decision |
//! | `GET /v1/events/{event_id}/requests/{id}` | the same, one store lookup |
//! | `GET /healthz`, `/readyz`, `/metrics`     | liveness, readiness, Prometheus |

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use couponrush_core::producer::ProduceError;
use couponrush_core::store::{Decision, EventSpec, EventState, StoreError};
use couponrush_core::wire::{now_micros, validate_event_id, validate_user_id};
use couponrush_core::IssueRequest;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::AppError;
use crate::readiness::{StoreState, NEW_STORE_WAIT};
use crate::AppState;

/// A JSON body whose rejections are [`AppError`]s (with a JSON body).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
pub struct JsonBody<T>(pub T);

/// Passes when no admin token is configured (loopback only, enforced at
/// start-up) or the request carries `Authorization: Bearer <token>`.
pub struct AdminAuth;

impl FromRequestParts<Arc<AppState>> for AdminAuth {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = state.admin_token.as_deref() else {
            return Ok(AdminAuth);
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time: how long the check takes says nothing about how
        // much of the token a guess got right.
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(AdminAuth)
        } else {
            Err(AppError::Unauthorized)
        }
    }
}

fn event_path(event_id: &str) -> Result<(), AppError> {
    validate_event_id(event_id).map_err(|m| AppError::bad_request("invalid_event_id", m))
}

/// For a store found without its epoch marker: waits while it is new (set
/// up in a moment), else says why it is not ready. A new store is never
/// called lost: it never held state.
async fn store_ready(state: &AppState) -> Result<(), AppError> {
    let why = match state.readiness.wait(NEW_STORE_WAIT).await {
        StoreState::Ready => return Ok(()),
        StoreState::Rebuilding => {
            "the coupon store is being rebuilt from the log after losing its state; retry shortly"
        }
        StoreState::New => "the coupon store is new and still being set up; retry in a second",
        StoreState::Checking => "the coupon store is not ready yet; retry shortly",
    };
    Err(AppError::Unavailable(why.into()))
}

/// Whether the event exists; an unknown event while the store has no epoch
/// is the store not being ready, not a client mistake.
async fn known_event(state: &AppState, event_id: &str) -> Result<bool, AppError> {
    if state
        .events
        .exists(event_id)
        .await
        .map_err(store_unavailable)?
    {
        return Ok(true);
    }
    if state
        .store
        .epoch()
        .await
        .map_err(store_unavailable)?
        .is_some()
    {
        return Ok(false);
    }
    store_ready(state).await?;
    let exists = state
        .store
        .event(event_id)
        .await
        .map_err(store_unavailable)?
        .is_some();
    state.events.remember(event_id, exists);
    Ok(exists)
}

fn store_unavailable(e: StoreError) -> AppError {
    tracing::warn!(error = %e, "store call failed");
    AppError::Unavailable("the coupon store is unavailable; retry shortly".into())
}

pub use couponrush_core::store::definition::{create_event, CreateEventError};

/// Body of `PUT /v1/events/{event_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutEventBody {
    /// Coupons available.
    pub stock: u32,
    /// Coupons one user may hold (default 1).
    #[serde(default = "one")]
    pub per_user_limit: u32,
}

fn one() -> u32 {
    1
}

/// An event as the api shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventView {
    /// The event's id.
    pub event_id: String,
    /// Coupons at the start.
    pub stock: u32,
    /// Coupons one user may hold.
    pub per_user_limit: u32,
    /// Coupons left.
    pub remaining: u32,
    /// Coupons issued.
    pub issued: u32,
    /// True when none are left.
    pub sold_out: bool,
    /// Bumped by every reset.
    pub generation: u64,
}

impl From<EventState> for EventView {
    fn from(s: EventState) -> Self {
        Self {
            issued: s.issued(),
            sold_out: s.sold_out(),
            event_id: s.event_id,
            stock: s.stock,
            per_user_limit: s.per_user_limit,
            remaining: s.remaining,
            generation: s.generation,
        }
    }
}

/// `PUT /v1/events/{event_id}`: create (201) or reset (200) an event.
pub async fn put_event(
    _admin: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
    JsonBody(body): JsonBody<PutEventBody>,
) -> Result<(StatusCode, Json<EventView>), AppError> {
    event_path(&event_id)?;
    let spec = EventSpec {
        stock: body.stock,
        per_user_limit: body.per_user_limit,
    };
    spec.validate().map_err(AppError::Unprocessable)?;
    if state
        .store
        .epoch()
        .await
        .map_err(store_unavailable)?
        .is_none()
    {
        store_ready(&state).await?;
    }
    let (ev, created) = create_event(
        &*state.store,
        &state.producer,
        &state.events_topic,
        &event_id,
        spec,
    )
    .await
    .map_err(|e| match e {
        CreateEventError::Store(e) => store_unavailable(e),
        CreateEventError::Log(e) => {
            tracing::warn!(error = %e, event_id, "event definition not acknowledged by the broker");
            AppError::Unavailable(
                "the event was not changed: its definition did not reach the log; retry the PUT"
                    .into(),
            )
        }
    })?;
    state.events.remember(&event_id, true);
    tracing::info!(
        event_id,
        stock = spec.stock,
        per_user_limit = spec.per_user_limit,
        created,
        "event put"
    );
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ev.into())))
}

/// `GET /v1/events/{event_id}`.
pub async fn get_event(
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
) -> Result<Json<EventView>, AppError> {
    event_path(&event_id)?;
    match state
        .store
        .event(&event_id)
        .await
        .map_err(store_unavailable)?
    {
        Some(ev) => Ok(Json(ev.into())),
        None => Err(AppError::NotFound(format!("no event {event_id:?}"))),
    }
}

/// Body of `POST /v1/events/{event_id}/issue`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    /// Who asks.
    pub user_id: String,
}

/// The `202` answer to an issue request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    /// The request's id: poll it, or find it on `coupon.outcomes`. With an
    /// `Idempotency-Key` it is derived from the event, the user and the key
    /// ([`crate::request_id::from_key`]), not the key itself.
    pub request_id: Uuid,
    /// When the api accepted it, µs since the epoch (arrival order).
    pub accepted_at: u64,
    /// Where to poll for the decision.
    pub status_url: String,
}

/// The `Idempotency-Key` header, if any.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<Uuid>, AppError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| {
        AppError::bad_request("invalid_idempotency_key", "Idempotency-Key must be ASCII")
    })?;
    Uuid::parse_str(s.trim()).map(Some).map_err(|_| {
        AppError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be a UUID, e.g. 0190d6a0-7c3e-7b2a-9e1f-3c4d5e6f7a8b",
        )
    })
}

/// `POST /v1/events/{event_id}/issue`: accept a request, produce it, answer
/// `202` once the broker acknowledged it.
pub async fn issue(
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<IssueBody>,
) -> Result<Response, AppError> {
    event_path(&event_id)?;
    validate_user_id(&body.user_id).map_err(AppError::Unprocessable)?;
    // A key is scoped by event and user: reused by someone else, it is
    // someone else's request, never this one.
    let request_id = match idempotency_key(&headers)? {
        Some(key) => crate::request_id::from_key(&event_id, &body.user_id, key),
        None => Uuid::now_v7(),
    };
    if !known_event(&state, &event_id).await? {
        return Err(AppError::NotFound(format!(
            "no event {event_id:?}; create it with PUT /v1/events/{event_id}"
        )));
    }
    let Ok(_permit) = state.in_flight.try_acquire() else {
        metrics::counter!("couponrush_api_shed_total", "reason" => "in_flight").increment(1);
        return Err(AppError::Overloaded(format!(
            "more than {} requests in flight; retry after a second",
            state.max_in_flight
        )));
    };
    let req = IssueRequest::new(request_id, event_id, body.user_id, now_micros());
    // librdkafka gives up on the record after message.timeout.ms, which is
    // set to --produce-timeout: the delivery future always resolves in time.
    match state.producer.send(&req).await {
        Ok(p) => {
            tracing::debug!(request_id = %request_id, partition = p.partition, offset = p.offset, "accepted");
            let status_url = format!("/v1/events/{}/requests/{request_id}", req.event_id);
            Ok((
                StatusCode::ACCEPTED,
                Json(Accepted {
                    request_id,
                    accepted_at: req.accepted_at,
                    status_url,
                }),
            )
                .into_response())
        }
        Err(ProduceError::QueueFull) => {
            metrics::counter!("couponrush_api_shed_total", "reason" => "queue_full").increment(1);
            Err(AppError::Overloaded(
                "the producer queue is full; retry after a second".into(),
            ))
        }
        Err(ProduceError::Broker(e)) => {
            tracing::warn!(error = %e, request_id = %request_id, "produce failed");
            Err(AppError::Unavailable(format!(
                "the broker did not acknowledge the request within {:?}; retry with the same Idempotency-Key",
                state.produce_timeout
            )))
        }
    }
}

/// A request's status.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestStatus {
    /// The request.
    pub request_id: Uuid,
    /// `pending` or `decided`.
    pub status: String,
    /// The event, once decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The decision, once decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionView>,
}

/// A decision as the status endpoint shows it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecisionView {
    /// What was decided.
    pub result: couponrush_core::DecisionResult,
    /// 1..=stock when issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_rank: Option<u32>,
    /// When, µs since the epoch.
    pub decided_at: u64,
}

/// Only logged decisions are shown: one not yet logged is not in the log
/// and would not survive the loss of the store.
fn status_view(request_id: Uuid, found: Option<(String, Decision)>) -> Json<RequestStatus> {
    Json(match found.filter(|(_, d)| d.logged) {
        Some((event_id, decision)) => RequestStatus {
            request_id,
            status: "decided".into(),
            event_id: Some(event_id),
            decision: Some(DecisionView {
                result: decision.result,
                issued_rank: decision.issued_rank,
                decided_at: decision.decided_at,
            }),
        },
        None => RequestStatus {
            request_id,
            status: "pending".into(),
            event_id: None,
            decision: None,
        },
    })
}

fn parse_request_id(s: &str) -> Result<Uuid, AppError> {
    Uuid::parse_str(s)
        .map_err(|_| AppError::bad_request("invalid_request_id", "request_id must be a UUID"))
}

/// `GET /v1/requests/{request_id}`.
pub async fn request_status(
    State(state): State<Arc<AppState>>,
    Path(request_id): Path<String>,
) -> Result<Json<RequestStatus>, AppError> {
    let request_id = parse_request_id(&request_id)?;
    let found = state
        .store
        .find_decision(request_id)
        .await
        .map_err(store_unavailable)?;
    Ok(status_view(request_id, found))
}

/// `GET /v1/events/{event_id}/requests/{request_id}`.
pub async fn event_request_status(
    State(state): State<Arc<AppState>>,
    Path((event_id, request_id)): Path<(String, String)>,
) -> Result<Json<RequestStatus>, AppError> {
    event_path(&event_id)?;
    let request_id = parse_request_id(&request_id)?;
    let found = state
        .store
        .decision(&event_id, request_id)
        .await
        .map_err(store_unavailable)?
        .map(|d| (event_id, d));
    Ok(status_view(request_id, found))
}

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: the broker and the store both answer.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let store = state.store.ping().await.map_err(|e| e.to_string());
    let producer = state.producer.clone();
    let broker = tokio::task::spawn_blocking(move || producer.probe(Duration::from_secs(1)))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .and_then(|n| {
            if n > 0 {
                Ok(())
            } else {
                Err("the requests topic does not exist".to_string())
            }
        });
    let ok = store.is_ok() && broker.is_ok();
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    let body = Json(serde_json::json!({
        "status": if ok { "ready" } else { "not_ready" },
        "store": show(&store),
        "broker": show(&broker),
    }));
    if ok {
        (StatusCode::OK, body).into_response()
    } else {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        r.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(crate::error::RETRY_AFTER_SECS),
        );
        r
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    metrics::gauge!("couponrush_api_producer_queue").set(state.producer.queue_depth() as f64);
    metrics::gauge!("couponrush_api_in_flight")
        .set((state.max_in_flight - state.in_flight.available_permits()) as f64);
    match &state.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => {
            AppError::NotFound("metrics are served by another component of this process".into())
                .into_response()
        }
    }
}

/// Unknown routes.
pub async fn not_found() -> AppError {
    AppError::NotFound("no such route; see the README for the api".into())
}

/// Known routes with the wrong method.
pub async fn method_not_allowed() -> Response {
    let body = Json(serde_json::json!({
        "error": "method_not_allowed",
        "message": "this route does not accept that method; see the README for the api",
    }));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}
