//! The HTTP routes.
//!
//! | route                                     | what |
//! |-------------------------------------------|------|
//! | `PUT /v1/events/{event_id}`               | create or reset an event (admin) |
//! | `GET /v1/events/{event_id}`               | stock, remaining, issued, sold out |
//! | `POST /v1/events/{event_id}/issue`        | ask for a coupon → `202 {request_id}` |
//! | `GET /v1/requests/{request_id}`           | pending, or the decision |
//! | `GET /v1/events/{event_id}/requests/{id}` | the same, one store lookup (with the hold, in an event with holds) |
//! | `POST /v1/events/{event_id}/requests/{id}/claim`  | the holder makes a held coupon final → `202` |
//! | `POST /v1/events/{event_id}/requests/{id}/cancel` | the holder gives a held coupon back → `202` |
//! | `GET /healthz`, `/readyz`, `/metrics`     | liveness, readiness, Prometheus |
//! | `…/{event_id}/line…`                      | the waiting room, see [`crate::line`] |

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use couponrush_core::producer::ProduceError;
use couponrush_core::store::{Decision, EventSpec, EventState, HoldStatus, StoreError};
use couponrush_core::wire::{
    now_micros, validate_event_id, validate_user_id, HoldAction, HoldState, HoldVerb,
};
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
pub(crate) async fn known_event(state: &AppState, event_id: &str) -> Result<bool, AppError> {
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
    if matches!(e, StoreError::Lost(_)) {
        return AppError::Unavailable(
            "the coupon store is being rebuilt from its log (it came back behind it, or is being set up); nothing was changed; retry shortly".into(),
        );
    }
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
    /// Holds: an issued coupon is held this long for its claim, ms
    /// (default 0: no holds, a coupon is final when issued).
    #[serde(default)]
    pub claim_window_ms: u64,
    /// Buckets the stock is split over, 1 to 64 (default 1: the whole
    /// stock on one Redis slot). More buckets spread one hot event over
    /// several Redis Cluster slots, at the cost of undersell (a bucket may
    /// answer `sold_out` while another still holds stock).
    #[serde(default = "one")]
    pub stock_buckets: u32,
}

fn one() -> u32 {
    1
}

fn is_one(k: &u32) -> bool {
    *k == 1
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
    /// Coupons left in stock (never issued, or returned by a hold's end).
    pub remaining: u32,
    /// Coupons out now (held, claimed, or final at issue).
    pub issued: u32,
    /// True when none are left.
    pub sold_out: bool,
    /// Bumped by every reset.
    pub generation: u64,
    /// The claim window, ms (0: no holds).
    #[serde(default)]
    pub claim_window_ms: u64,
    /// Every `issued` decision, re-issues included:
    /// `issued_total − released + remaining = stock`.
    #[serde(default)]
    pub issued_total: u32,
    /// Coupons returned by a cancel or an expiry.
    #[serde(default)]
    pub released: u32,
    /// Holds claimed.
    #[serde(default)]
    pub claimed: u32,
    /// Holds waiting for their claim.
    #[serde(default)]
    pub held: u32,
    /// Buckets the stock is split over (shown when more than 1; the
    /// counters above are the buckets' summed).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub stock_buckets: u32,
}

impl From<EventState> for EventView {
    fn from(s: EventState) -> Self {
        Self {
            issued: s.issued(),
            sold_out: s.sold_out(),
            claim_window_ms: s.claim_window_us / 1000,
            issued_total: s.issued_total(),
            released: s.released,
            claimed: s.claimed,
            held: s.held(),
            stock_buckets: s.buckets(),
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
        claim_window_us: body.claim_window_ms.saturating_mul(1000),
        stock_buckets: body.stock_buckets,
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
        claim_window_us = spec.claim_window_us,
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

/// The two headers the issue route reads, taken without copying the rest
/// of the request's headers: the `HeaderMap` extractor clones the whole map,
/// a few allocations and a rehash on every request (seen in a profile of the
/// issue route under load).
pub struct IssueHeaders {
    /// `Idempotency-Key`, unparsed.
    pub idempotency_key: Option<HeaderValue>,
    /// `X-Admission-Token`, unparsed.
    pub admission_token: Option<HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for IssueHeaders {
    type Rejection = std::convert::Infallible;

    /// One pass over the headers: a lookup by name hashes the name, and
    /// both are usually absent (two lookups showed in a profile of the
    /// issue route). The first of a repeated header is taken, as a lookup
    /// would.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut headers = Self {
            idempotency_key: None,
            admission_token: None,
        };
        for (name, value) in &parts.headers {
            let slot = if *name == IDEMPOTENCY_KEY {
                &mut headers.idempotency_key
            } else if *name == ADMISSION_TOKEN {
                &mut headers.admission_token
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(value.clone());
            }
        }
        Ok(headers)
    }
}

/// The `Idempotency-Key` header's name. Headers are looked up by
/// `HeaderName` constants: a `&str` name is parsed and validated on every
/// lookup.
pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The `X-Admission-Token` header's name.
const ADMISSION_TOKEN: HeaderName = HeaderName::from_static(crate::line::TOKEN_HEADER);

/// The `Idempotency-Key` header, if any.
fn idempotency_key(header: Option<&HeaderValue>) -> Result<Option<Uuid>, AppError> {
    let Some(v) = header else {
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
    headers: IssueHeaders,
    JsonBody(body): JsonBody<IssueBody>,
) -> Result<Response, AppError> {
    event_path(&event_id)?;
    validate_user_id(&body.user_id).map_err(AppError::Unprocessable)?;
    // An event with a waiting room admits only those the line let in.
    let token = headers.admission_token.as_ref();
    let admission = match crate::line::gate(&state, &event_id, &body.user_id, token).await {
        Ok(a) => a,
        Err(refused) => return Ok(refused),
    };
    // A key is scoped by event and user: reused by someone else, it is
    // someone else's request, never this one.
    let request_id = match idempotency_key(headers.idempotency_key.as_ref())? {
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
            if let (Some(ticket), Some(line)) = (admission, &state.line) {
                line.finished(&req.event_id, &req.user_id, ticket).await;
            }
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
        Err(ProduceError::NotSent(e)) => {
            tracing::warn!(error = %e, request_id = %request_id, "produce refused before sending");
            Err(AppError::Unavailable(
                "the broker cannot take the request now; nothing was accepted, retry shortly"
                    .into(),
            ))
        }
        Err(ProduceError::Unacknowledged(e)) => {
            tracing::warn!(error = %e, request_id = %request_id, "produce unacknowledged: in doubt");
            metrics::counter!("couponrush_api_in_doubt_total").increment(1);
            Err(AppError::InDoubt {
                request_id,
                status_url: format!("/v1/events/{}/requests/{request_id}", req.event_id),
                message: format!(
                    "the broker did not acknowledge the request within {:?}; it may still be decided: \
                     retry with the same Idempotency-Key (the same request, decided at most once) \
                     or poll status_url",
                    state.produce_timeout
                ),
            })
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
    /// For a coupon of an event with holds: where its hold stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldView>,
}

/// A hold as the api shows it to its holder.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct HoldView {
    /// `held`, `claimed`, `released` or `expired` (an end is shown once it
    /// is in the log).
    pub state: HoldState,
    /// The claim deadline, µs since the epoch.
    pub until: u64,
}

impl From<&HoldStatus> for HoldView {
    fn from(h: &HoldStatus) -> Self {
        Self {
            state: h.shown_state(),
            until: h.hold.until,
        }
    }
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
fn status_view(
    request_id: Uuid,
    found: Option<(String, Decision)>,
    hold: Option<HoldView>,
) -> Json<RequestStatus> {
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
            hold,
        },
        None => RequestStatus {
            request_id,
            status: "pending".into(),
            event_id: None,
            decision: None,
            hold: None,
        },
    })
}

/// The hold of a logged `issued` decision, if its event has holds.
async fn hold_of(
    state: &AppState,
    request_id: Uuid,
    found: &Option<(String, Decision)>,
) -> Result<Option<HoldView>, AppError> {
    match found {
        Some((event_id, d)) if d.logged && d.result == couponrush_core::DecisionResult::Issued => {
            Ok(state
                .store
                .hold(event_id, request_id)
                .await
                .map_err(store_unavailable)?
                .as_ref()
                .map(HoldView::from))
        }
        _ => Ok(None),
    }
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
    not_found_while_rebuilding(&state, &found).await?;
    let hold = hold_of(&state, request_id, &found).await?;
    Ok(status_view(request_id, found, hold))
}

/// A decision not found in a store without its epoch (lost, or being
/// rebuilt) may be one the rebuild restores: "pending" would take back
/// what a client was already told, so the answer is "retry shortly".
async fn not_found_while_rebuilding<T>(
    state: &AppState,
    found: &Option<T>,
) -> Result<(), AppError> {
    if found.is_none()
        && state
            .store
            .epoch()
            .await
            .map_err(store_unavailable)?
            .is_none()
    {
        return Err(AppError::Unavailable(
            "the coupon store is being rebuilt from the log; this request's decision may be restored; retry shortly".into(),
        ));
    }
    Ok(())
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
    not_found_while_rebuilding(&state, &found).await?;
    let hold = hold_of(&state, request_id, &found).await?;
    Ok(status_view(request_id, found, hold))
}

/// Body of `POST …/requests/{id}/claim` and `…/cancel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    /// Who asks: must be the holder.
    pub user_id: String,
}

/// The `202` answer to a claim or a cancel.
#[derive(Debug, Serialize, Deserialize)]
pub struct HoldAccepted {
    /// The request whose coupon it is.
    pub request_id: Uuid,
    /// What was asked.
    pub action: HoldVerb,
    /// When the api accepted it, µs since the epoch (a claim accepted
    /// before the deadline is in time, unless the expiry was applied first).
    pub accepted_at: u64,
    /// Where to poll for the hold's state.
    pub status_url: String,
}

/// The `200` answer to an action that already happened.
#[derive(Debug, Serialize, Deserialize)]
pub struct HoldDone {
    /// The request whose coupon it is.
    pub request_id: Uuid,
    /// Where its hold stands.
    pub hold: HoldView,
}

/// `POST /v1/events/{event_id}/requests/{request_id}/claim`.
pub async fn claim(
    State(state): State<Arc<AppState>>,
    Path((event_id, request_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<HoldBody>,
) -> Result<Response, AppError> {
    hold_action(&state, event_id, request_id, body, HoldVerb::Claim).await
}

/// `POST /v1/events/{event_id}/requests/{request_id}/cancel`.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path((event_id, request_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<HoldBody>,
) -> Result<Response, AppError> {
    hold_action(&state, event_id, request_id, body, HoldVerb::Cancel).await
}

/// Checks a claim or a cancel against the store (its logged state), then
/// produces the action and answers `202` once the broker acknowledged it.
/// The store decides it again when an issuer applies it: the checks here
/// answer the client early, the store's are the ones that count.
async fn hold_action(
    state: &AppState,
    event_id: String,
    request_id: String,
    body: HoldBody,
    verb: HoldVerb,
) -> Result<Response, AppError> {
    event_path(&event_id)?;
    let request_id = parse_request_id(&request_id)?;
    validate_user_id(&body.user_id).map_err(AppError::Unprocessable)?;
    // The in-flight bound covers the store's checks too.
    let Ok(_permit) = state.in_flight.try_acquire() else {
        metrics::counter!("couponrush_api_shed_total", "reason" => "in_flight").increment(1);
        return Err(AppError::Overloaded(format!(
            "more than {} requests in flight; retry after a second",
            state.max_in_flight
        )));
    };
    let no_event = || AppError::NotFound(format!("no event {event_id:?}"));
    if !known_event(state, &event_id).await? {
        return Err(no_event());
    }
    let ev = state
        .store
        .event(&event_id)
        .await
        .map_err(store_unavailable)?
        .ok_or_else(no_event)?;
    if ev.claim_window_us == 0 {
        return Err(AppError::Conflict {
            code: "no_holds",
            message: format!("event {event_id:?} has no holds: its coupons are final when issued"),
        });
    }
    // The same answer for a request that won nothing and for another
    // user's coupon: a caller learns nothing about a request not its own.
    let not_issued = || {
        AppError::NotFound(format!(
            "no coupon of this user was issued to request {request_id} of event {event_id:?} \
             (or its decision is not out yet)"
        ))
    };
    let found = state
        .store
        .decision(&event_id, request_id)
        .await
        .map_err(store_unavailable)?
        .filter(|d| d.logged);
    not_found_while_rebuilding(state, &found).await?;
    if found.is_none_or(|d| d.result != couponrush_core::DecisionResult::Issued) {
        return Err(not_issued());
    }
    let status = state
        .store
        .hold(&event_id, request_id)
        .await
        .map_err(store_unavailable)?
        .ok_or_else(not_issued)?;
    if status.hold.user_id != body.user_id {
        // Nothing about the hold (that there is one, whose, which state).
        return Err(not_issued());
    }
    let view = HoldView::from(&status);
    let now = now_micros();
    let conflict = |code, message: &str| {
        Err(AppError::Conflict {
            code,
            message: message.to_string(),
        })
    };
    match (verb, view.state) {
        (HoldVerb::Claim, HoldState::Claimed) | (HoldVerb::Cancel, HoldState::Released) => {
            return Ok((
                StatusCode::OK,
                Json(HoldDone {
                    request_id,
                    hold: view,
                }),
            )
                .into_response());
        }
        (HoldVerb::Claim, HoldState::Held) if now >= view.until => {
            return conflict(
                "hold_expired",
                "the claim window has ended: the coupon goes back to stock",
            )
        }
        (_, HoldState::Expired) => {
            return conflict(
                "hold_expired",
                "the claim window ended without a claim: the coupon went back to stock",
            )
        }
        (HoldVerb::Claim, HoldState::Released) => {
            return conflict(
                "hold_released",
                "the coupon was cancelled and went back to stock",
            )
        }
        (HoldVerb::Cancel, HoldState::Claimed) => {
            return conflict(
                "hold_claimed",
                "the coupon was claimed: a claimed coupon is final",
            )
        }
        _ => {}
    }
    let action = HoldAction::new(verb, request_id, event_id, body.user_id, now);
    match state
        .producer
        .publish_action(&state.compensations_topic, &action)
        .await
    {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            Json(HoldAccepted {
                request_id,
                action: verb,
                accepted_at: now,
                status_url: format!("/v1/events/{}/requests/{request_id}", action.event_id),
            }),
        )
            .into_response()),
        Err(ProduceError::QueueFull) => {
            metrics::counter!("couponrush_api_shed_total", "reason" => "queue_full").increment(1);
            Err(AppError::Overloaded(
                "the producer queue is full; retry after a second".into(),
            ))
        }
        Err(ProduceError::NotSent(e)) => {
            tracing::warn!(error = %e, request_id = %request_id, "hold action refused before sending");
            Err(AppError::Unavailable(format!(
                "the broker cannot take the {} now; nothing was recorded, retry shortly",
                verb.as_str()
            )))
        }
        Err(ProduceError::Unacknowledged(e)) => {
            tracing::warn!(error = %e, request_id = %request_id, "hold action unacknowledged: in doubt");
            Err(AppError::InDoubt {
                request_id,
                status_url: format!("/v1/events/{}/requests/{request_id}", action.event_id),
                message: format!(
                    "the broker did not acknowledge the {} within {:?}; it may still take effect: \
                     retry (repeating it is harmless) or poll status_url",
                    verb.as_str(),
                    state.produce_timeout
                ),
            })
        }
    }
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
