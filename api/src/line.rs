//! The waiting room's routes and the issue route's gate.
//!
//! | route                                           | what |
//! |-------------------------------------------------|------|
//! | `PUT /v1/events/{e}/line`                       | open the event's room, or change its policy (admin) |
//! | `GET /v1/events/{e}/line`                       | the room's policy, counters, measured rate and lag |
//! | `POST /v1/events/{e}/line`                      | join → a ticket: position, people ahead, estimated wait, when to poll |
//! | `GET /v1/events/{e}/line/{ticket}?user_id=U`    | poll: position, ahead, estimate; `admitted` with an `admission_token`, or `expired` |
//! | `DELETE /v1/events/{e}/line/{ticket}?user_id=U` | leave the line (or give up an admission) |
//!
//! ## Guarantees
//! - **The gate.** When an event has a room, `POST …/issue` needs the header
//!   `X-Admission-Token` with a token signed for that user and event and not
//!   past its deadline, whose ticket the line still holds as admitted (one
//!   line call); otherwise a 403 that says why and to join the line. A room
//!   that cannot be read is a 503 with `Retry-After`, never open. Events
//!   without a room behave as before. An accepted issue marks the ticket
//!   done before it is answered: the token is spent and the slot goes to
//!   the next in line.
//! - **Idempotent joins.** With an `Idempotency-Key` the ticket id is a UUID
//!   v5 of (event, user, key): a retried join is the same ticket (200, not
//!   201), and another user's reuse of the key is refused.
//! - **Nobody else's ticket.** A poll or leave names the user; a ticket of
//!   another user is a 404, the same as one that does not exist.
//! - **Bounded.** Line calls in flight are capped (as issue requests are);
//!   past that a 503 with `Retry-After`. The room cache holds at most
//!   [`MAX_CACHED_ROOMS`] events and is re-read every [`ROOM_CACHE_TTL`],
//!   so another api process sees a room opened elsewhere within that.
//!
//! With the Redis backend every api process may serve a room; each one that
//! sees a room runs an admitter (rounds are atomic in Redis, so none admits
//! twice or out of order, and `max_active` and the room's rate bucket hold
//! across them: N processes admit at most `rate_per_sec` together). With
//! the Kafka backend one process serves a room;
//! any other reads the room back from its topic, so its gate stays closed
//! (see `couponrush_core::line::kafka`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use clap::{Args, ValueEnum};
use couponrush_core::line::admitter::{AdmitterGauges, GaugeReading, GroupLag, LagProbe};
use couponrush_core::line::kafka::KafkaLine;
use couponrush_core::line::redis::RedisLine;
use couponrush_core::line::token::{TokenError, TokenKey};
use couponrush_core::line::{
    estimated_wait, poll_interval, Admitter, Line, LineError, RoomPolicy, RoomStats, TicketState,
};
use couponrush_core::topics::replication_for;
use couponrush_core::wire::{now_micros, validate_event_id, validate_user_id};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::AppError;
use crate::routes::{AdminAuth, JsonBody};
use crate::{AppState, Config, StartError};

/// The header an admitted client sends its token in.
pub const TOKEN_HEADER: &str = "x-admission-token";

/// How long a room's policy and measured rate are cached.
pub const ROOM_CACHE_TTL: Duration = Duration::from_secs(1);

/// How long an accepted issue waits for its admission to be marked used.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Events whose room (or lack of one) is cached at most.
pub const MAX_CACHED_ROOMS: usize = 10_000;

/// Which backend holds the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineBackend {
    /// No waiting rooms: every event behaves as without one.
    None,
    /// A counter and a sorted set per room in the store's Redis.
    Redis,
    /// One single-partition topic per room.
    Kafka,
}

/// The waiting room's flags.
#[derive(Debug, Clone, Args)]
pub struct LineArgs {
    /// Where waiting rooms keep their line: redis (the store's Redis; any
    /// number of api processes), kafka (a topic per room; one api process
    /// per room) or none.
    #[arg(long, env = "LINE_BACKEND", value_enum, default_value = "redis")]
    pub line_backend: LineBackend,
    /// Key that signs admission tokens (16 bytes or more). Api processes
    /// of one deployment must share it; without one a random key is used
    /// and tokens are valid only at this process.
    #[arg(long, env = "LINE_KEY", hide_env_values = true)]
    pub line_key: Option<String>,
    /// Consumer group of the issuers, whose lag on the requests topic slows
    /// admission (a room's slow_above_lag); empty: admission ignores lag.
    #[arg(long, env = "LINE_LAG_GROUP", default_value = "coupon-issuer")]
    pub line_lag_group: String,
    /// Prefix of the room topics of the kafka backend (`<prefix>.<event>`).
    #[arg(long, env = "LINE_TOPIC_PREFIX", default_value = "coupon.line")]
    pub line_topic_prefix: String,
}

impl LineArgs {
    /// The settings these flags describe; `redis_url` is the store's.
    pub fn config(&self, redis_url: &str) -> Option<LineConfig> {
        let backend = match self.line_backend {
            LineBackend::None => return None,
            LineBackend::Redis => LineStore::Redis(redis_url.to_string()),
            LineBackend::Kafka => LineStore::Kafka {
                topic_prefix: self.line_topic_prefix.clone(),
            },
        };
        Some(LineConfig {
            backend,
            key: self.line_key.clone().filter(|k| !k.is_empty()),
            lag_group: Some(self.line_lag_group.clone()).filter(|g| !g.is_empty()),
        })
    }
}

/// Where a line lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineStore {
    /// Redis at this URL.
    Redis(String),
    /// The api's Kafka, a topic per room.
    Kafka {
        /// Room topics are `<prefix>.<event>`.
        topic_prefix: String,
    },
}

/// The waiting room's settings.
#[derive(Debug, Clone)]
pub struct LineConfig {
    /// The backend.
    pub backend: LineStore,
    /// Token signing key; `None`: a random one.
    pub key: Option<String>,
    /// Issuer group whose lag slows admission.
    pub lag_group: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct CachedRoom {
    policy: Option<RoomPolicy>,
    rate: f64,
    at: Instant,
}

/// The api's side of the waiting room.
pub struct LineState {
    /// The backend.
    pub line: Arc<dyn Line>,
    key: TokenKey,
    lag: Option<Arc<dyn LagProbe>>,
    in_flight: Semaphore,
    max_in_flight: usize,
    rooms: Mutex<HashMap<String, CachedRoom>>,
    admitters: Mutex<HashMap<String, Arc<AdmitterGauges>>>,
    stop: CancellationToken,
}

impl LineState {
    /// Connects the backend the config names.
    pub async fn start(line: &LineConfig, api: &Config) -> Result<Arc<Self>, StartError> {
        let backend: Arc<dyn Line> = match &line.backend {
            LineStore::Redis(url) => Arc::new(
                RedisLine::connect(url)
                    .await
                    .map_err(|e| StartError::Config(e.to_string()))?,
            ),
            LineStore::Kafka { topic_prefix } => {
                let (kafka, topic) = (api.kafka.clone(), api.topics.requests.clone());
                let brokers =
                    tokio::task::spawn_blocking(move || crate::cluster_brokers(&kafka, &topic))
                        .await
                        .map_err(|e| StartError::Config(e.to_string()))??;
                let replication = replication_for(brokers, api.replication_factor)?.factor;
                Arc::new(
                    KafkaLine::new(&api.kafka, topic_prefix, replication)
                        .map_err(|e| StartError::Config(e.to_string()))?,
                )
            }
        };
        let key = match &line.key {
            Some(k) => TokenKey::new(k.as_bytes().to_vec()).map_err(StartError::Config)?,
            None => {
                tracing::warn!(
                    "no --line-key: admission tokens are signed with a random key and valid \
                     only at this api process"
                );
                TokenKey::random()
            }
        };
        let lag = match &line.lag_group {
            Some(group) => match GroupLag::new(&api.kafka, group, &api.topics.requests) {
                Ok(p) => Some(Arc::new(p) as Arc<dyn LagProbe>),
                Err(e) => return Err(StartError::Config(e)),
            },
            None => None,
        };
        Ok(Self::new(backend, key, lag, api.max_in_flight))
    }

    /// A waiting room over `line`, signing with `key`, slowed by `lag`.
    pub fn new(
        line: Arc<dyn Line>,
        key: TokenKey,
        lag: Option<Arc<dyn LagProbe>>,
        max_in_flight: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            line,
            key,
            lag,
            in_flight: Semaphore::new(max_in_flight.max(1)),
            max_in_flight: max_in_flight.max(1),
            rooms: Mutex::new(HashMap::new()),
            admitters: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        })
    }

    /// Stops the admitters.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The event's room (policy and measured rate), cached briefly.
    async fn room(&self, event_id: &str) -> Result<CachedRoom, AppError> {
        if let Some(c) = self.rooms.lock().expect("not poisoned").get(event_id) {
            if c.at.elapsed() < ROOM_CACHE_TTL {
                return Ok(*c);
            }
        }
        let policy = self.line.policy(event_id).await.map_err(line_error)?;
        let rate = match policy {
            Some(_) => {
                self.line
                    .stats(event_id)
                    .await
                    .map_err(line_error)?
                    .measured_rate
            }
            None => 0.0,
        };
        let room = CachedRoom {
            policy,
            rate,
            at: Instant::now(),
        };
        let mut rooms = self.rooms.lock().expect("not poisoned");
        if rooms.len() >= MAX_CACHED_ROOMS {
            rooms.clear();
        }
        rooms.insert(event_id.to_string(), room);
        Ok(room)
    }

    /// Runs an admitter for the room at this process, once.
    fn ensure_admitter(&self, event_id: &str) -> Arc<AdmitterGauges> {
        let mut admitters = self.admitters.lock().expect("not poisoned");
        if let Some(g) = admitters.get(event_id) {
            return g.clone();
        }
        let admitter = Admitter::new(self.line.clone(), event_id, self.lag.clone());
        let gauges = admitter.gauges();
        tokio::spawn(admitter.run(self.stop.child_token()));
        admitters.insert(event_id.to_string(), gauges.clone());
        tracing::info!(event_id, backend = self.line.kind(), "admitter started");
        gauges
    }

    fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AppError> {
        self.in_flight.try_acquire().map_err(|_| {
            metrics::counter!("couponrush_api_shed_total", "reason" => "line_in_flight")
                .increment(1);
            AppError::Overloaded(format!(
                "more than {} line calls in flight; retry after a second",
                self.max_in_flight
            ))
        })
    }

    /// After an accepted issue: the user's slot goes to the next in line
    /// (and the token is spent). Part of the request, bounded by
    /// [`FINISH_TIMEOUT`]; if it fails, the slot frees itself at the
    /// admission deadline.
    pub async fn finished(&self, event_id: &str, user_id: &str, ticket: Uuid) {
        let call = self.line.finish(event_id, user_id, ticket, now_micros());
        match tokio::time::timeout(FINISH_TIMEOUT, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(event_id, error = %e, "cannot free an admission slot")
            }
            Err(_) => tracing::warn!(event_id, "freeing an admission slot timed out"),
        }
    }
}

fn line_error(e: LineError) -> AppError {
    match e {
        LineError::NoRoom(_) => AppError::NotFound(e.to_string()),
        LineError::Full(_) => AppError::Overloaded(e.to_string()),
        LineError::Invalid(m) => AppError::Unprocessable(m),
        LineError::Unavailable { .. } => {
            tracing::warn!(error = %e, "line call failed");
            AppError::Unavailable("the waiting room is unavailable; retry shortly".into())
        }
    }
}

fn enabled(state: &AppState) -> Result<&Arc<LineState>, AppError> {
    state.line.as_ref().ok_or_else(|| {
        AppError::NotFound(
            "waiting rooms are off at this api (--line-backend none); \
             the event's issue route is open to everyone"
                .into(),
        )
    })
}

fn event_path(event_id: &str) -> Result<(), AppError> {
    validate_event_id(event_id).map_err(|m| AppError::bad_request("invalid_event_id", m))
}

/// A 403 from the gate: `code` says why, the message what to do.
fn refused(code: &'static str, message: String) -> Response {
    let body = Json(serde_json::json!({ "error": code, "message": message }));
    let mut r = (StatusCode::FORBIDDEN, body).into_response();
    r.headers_mut()
        .insert("x-line", HeaderValue::from_static("join"));
    r
}

/// The issue route's gate: `Ok(None)` when the event has no room (or rooms
/// are off), `Ok(Some(ticket))` when the request carries a valid admission,
/// else the answer to send (403, or 503 when the room cannot be read).
pub async fn gate(
    state: &AppState,
    event_id: &str,
    user_id: &str,
    token: Option<&HeaderValue>,
) -> Result<Option<Uuid>, Response> {
    let Some(line) = &state.line else {
        return Ok(None);
    };
    let room = line
        .room(event_id)
        .await
        .map_err(IntoResponse::into_response)?;
    if room.policy.is_none() {
        return Ok(None);
    }
    let join = format!(
        "event {event_id:?} has a waiting room: join the line with POST /v1/events/{event_id}/line, \
         poll your ticket until it is admitted, then send its admission_token in the \
         X-Admission-Token header"
    );
    let Some(token) = token.and_then(|v| v.to_str().ok()) else {
        metrics::counter!("couponrush_api_gate_refused_total", "reason" => "missing").increment(1);
        return Err(refused("admission_required", join));
    };
    let ticket = match line.key.verify(token, event_id, user_id, now_micros()) {
        Ok(ticket) => ticket,
        Err(e) => {
            let code = match e {
                TokenError::Malformed => "admission_malformed",
                TokenError::Invalid => "admission_invalid",
                TokenError::Expired => "admission_expired",
            };
            metrics::counter!("couponrush_api_gate_refused_total", "reason" => code).increment(1);
            return Err(refused(code, format!("{e}. {join}")));
        }
    };
    // A signature says who was admitted, not that they still are: one
    // call asks the line (the slot may be freed by an issue, a leave or
    // the deadline).
    let status = line
        .line
        .poll(event_id, user_id, ticket, now_micros())
        .await
        .map_err(|e| line_error(e).into_response())?;
    let (code, why) = match status.map(|s| s.state) {
        Some(TicketState::Admitted) => return Ok(Some(ticket)),
        Some(TicketState::Done) => (
            "admission_used",
            "this admission was used by an accepted issue request already",
        ),
        Some(TicketState::Left) => ("admission_left", "this ticket left the line"),
        Some(TicketState::AdmissionExpired) => (
            "admission_expired",
            "this admission ran out before it was used",
        ),
        Some(TicketState::Waiting) => (
            "admission_pending",
            "this ticket is not admitted (yet) at this api process",
        ),
        Some(TicketState::Lapsed) | None => (
            "admission_unknown",
            "the line has no admitted ticket of this user for this token",
        ),
    };
    metrics::counter!("couponrush_api_gate_refused_total", "reason" => code).increment(1);
    Err(refused(code, format!("{why}. {join}")))
}

/// Body of `PUT /v1/events/{e}/line`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenBody {
    /// Admitted users at most at once.
    #[serde(default)]
    pub max_active: Option<u32>,
    /// Admissions per second at most.
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
    /// Seconds a waiting ticket lives without a poll (default 30).
    #[serde(default)]
    pub ticket_ttl_secs: Option<f64>,
    /// Seconds an admitted user has to issue (default 60).
    #[serde(default)]
    pub admission_window_secs: Option<f64>,
    /// Issuer lag (records) above which admission slows.
    #[serde(default)]
    pub slow_above_lag: Option<u64>,
}

fn secs(v: Option<f64>, default: f64, what: &str) -> Result<Duration, AppError> {
    let v = v.unwrap_or(default);
    Duration::try_from_secs_f64(v)
        .map_err(|_| AppError::Unprocessable(format!("{what} must be a number of seconds")))
}

/// A room as the api shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoomView {
    /// The event.
    pub event_id: String,
    /// `redis` or `kafka`.
    pub backend: String,
    /// The policy.
    pub policy: RoomPolicy,
    /// Counters.
    #[serde(default)]
    pub stats: Option<RoomStats>,
    /// What this process's admitter measured.
    #[serde(default)]
    pub admitter: Option<GaugeReading>,
}

/// `PUT /v1/events/{e}/line`: opens the room (admin).
pub async fn open(
    _admin: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
    JsonBody(body): JsonBody<OpenBody>,
) -> Result<Json<RoomView>, AppError> {
    event_path(&event_id)?;
    let line = enabled(&state)?;
    let policy = RoomPolicy {
        max_active: body.max_active,
        rate_per_sec: body.rate_per_sec,
        ticket_ttl: secs(body.ticket_ttl_secs, 30.0, "ticket_ttl_secs")?,
        admission_window: secs(body.admission_window_secs, 60.0, "admission_window_secs")?,
        slow_above_lag: body.slow_above_lag,
    };
    policy.validate().map_err(AppError::Unprocessable)?;
    if !crate::routes::known_event(&state, &event_id).await? {
        return Err(AppError::NotFound(format!(
            "no event {event_id:?}; create it with PUT /v1/events/{event_id} before its room"
        )));
    }
    line.line
        .open(&event_id, &policy)
        .await
        .map_err(line_error)?;
    line.rooms.lock().expect("not poisoned").remove(&event_id);
    line.ensure_admitter(&event_id);
    tracing::info!(event_id, ?policy, backend = line.line.kind(), "room opened");
    Ok(Json(RoomView {
        event_id,
        backend: line.line.kind().into(),
        policy,
        stats: None,
        admitter: None,
    }))
}

/// `GET /v1/events/{e}/line`: the room's policy and counters.
pub async fn room(
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
) -> Result<Json<RoomView>, AppError> {
    event_path(&event_id)?;
    let line = enabled(&state)?;
    let Some(policy) = line.line.policy(&event_id).await.map_err(line_error)? else {
        return Err(AppError::NotFound(format!(
            "event {event_id:?} has no waiting room"
        )));
    };
    let stats = line.line.stats(&event_id).await.map_err(line_error)?;
    let admitter = line
        .admitters
        .lock()
        .expect("not poisoned")
        .get(&event_id)
        .map(|g| g.snapshot());
    Ok(Json(RoomView {
        event_id,
        backend: line.line.kind().into(),
        policy,
        stats: Some(stats),
        admitter,
    }))
}

/// Body of a join.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// Who joins.
    pub user_id: String,
}

/// A ticket as the api shows it, after a join or a poll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketView {
    /// The ticket.
    pub ticket_id: Uuid,
    /// The event.
    pub event_id: String,
    /// `waiting`, `admitted`, `done`, `lapsed`, `admission_expired`, `left`.
    pub state: TicketState,
    /// Place in line (from 1, in join order).
    pub position: u64,
    /// People ahead, while waiting.
    pub ahead: u64,
    /// Estimated wait from the measured admission rate, while waiting.
    #[serde(default)]
    pub estimated_wait_ms: Option<u64>,
    /// Poll again after this long (absent once nothing will change).
    #[serde(default)]
    pub poll_after_ms: Option<u64>,
    /// True once admitted (until done or expired).
    pub admitted: bool,
    /// True when the ticket lapsed or its admission ran out: join again.
    pub expired: bool,
    /// Send this in `X-Admission-Token` with the issue request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission_token: Option<String>,
    /// Until when the admission holds, µs since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admit_deadline: Option<u64>,
    /// When it was admitted, µs since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_at: Option<u64>,
    /// When it joined, µs since the epoch (joins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_at: Option<u64>,
    /// Where to poll.
    pub ticket_url: String,
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<Uuid>, AppError> {
    let Some(v) = headers.get(crate::routes::IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
        .map(Some)
        .ok_or_else(|| {
            AppError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be a UUID, e.g. 0190d6a0-7c3e-7b2a-9e1f-3c4d5e6f7a8b",
            )
        })
}

/// `POST /v1/events/{e}/line`: join.
pub async fn join(
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<JoinBody>,
) -> Result<Response, AppError> {
    event_path(&event_id)?;
    validate_user_id(&body.user_id).map_err(AppError::Unprocessable)?;
    let line = enabled(&state)?;
    // Scoped like a request id, in the line's own name space: a key reused
    // by another user is another ticket.
    let ticket_id = match idempotency_key(&headers)? {
        Some(key) => crate::request_id::from_key(&format!("line/{event_id}"), &body.user_id, key),
        None => Uuid::now_v7(),
    };
    let _permit = line.permit()?;
    let room = line.room(&event_id).await?;
    let Some(policy) = room.policy else {
        return Err(AppError::NotFound(format!(
            "event {event_id:?} has no waiting room; issue directly with POST /v1/events/{event_id}/issue"
        )));
    };
    let t = line
        .line
        .join(&event_id, &body.user_id, ticket_id, now_micros())
        .await
        .map_err(line_error)?;
    line.ensure_admitter(&event_id);
    let estimate = estimated_wait(t.ahead, room.rate, &policy);
    let view = TicketView {
        ticket_url: format!("/v1/events/{event_id}/line/{}", t.ticket_id),
        ticket_id: t.ticket_id,
        event_id,
        state: TicketState::Waiting,
        position: t.position,
        ahead: t.ahead,
        estimated_wait_ms: estimate.map(|d| d.as_millis() as u64),
        poll_after_ms: Some(poll_interval(estimate, &policy).as_millis() as u64),
        admitted: false,
        expired: false,
        admission_token: None,
        admit_deadline: None,
        admitted_at: None,
        joined_at: Some(t.joined_at),
    };
    let status = if t.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// The caller of a poll or leave.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    /// Whose ticket it is.
    pub user_id: String,
}

async fn ticket(
    state: &AppState,
    event_id: String,
    ticket: String,
    caller: Caller,
    leave: bool,
) -> Result<Json<TicketView>, AppError> {
    event_path(&event_id)?;
    validate_user_id(&caller.user_id).map_err(AppError::Unprocessable)?;
    let ticket_id = Uuid::parse_str(&ticket)
        .map_err(|_| AppError::bad_request("invalid_ticket_id", "ticket_id must be a UUID"))?;
    let line = enabled(state)?;
    let _permit = line.permit()?;
    let room = line.room(&event_id).await?;
    let Some(policy) = room.policy else {
        return Err(AppError::NotFound(format!(
            "event {event_id:?} has no waiting room"
        )));
    };
    let now = now_micros();
    let call = if leave {
        line.line
            .leave(&event_id, &caller.user_id, ticket_id, now)
            .await
    } else {
        line.line
            .poll(&event_id, &caller.user_id, ticket_id, now)
            .await
    };
    // Someone else's ticket is answered as a missing one: nothing about it
    // is told to anyone but its user.
    let Some(s) = call.map_err(line_error)? else {
        return Err(AppError::NotFound(format!(
            "no ticket {ticket_id} of this user in the line of {event_id:?}; join with POST /v1/events/{event_id}/line"
        )));
    };
    let waiting = s.state == TicketState::Waiting;
    let estimate = waiting
        .then(|| estimated_wait(s.ahead, room.rate, &policy))
        .flatten();
    let admitted = s.state == TicketState::Admitted;
    let admission_token = admitted
        .then(|| {
            s.admit_deadline
                .map(|d| line.key.sign(&event_id, &caller.user_id, ticket_id, d))
        })
        .flatten();
    Ok(Json(TicketView {
        ticket_url: format!("/v1/events/{event_id}/line/{ticket_id}"),
        ticket_id,
        event_id,
        state: s.state,
        position: s.position,
        ahead: s.ahead,
        estimated_wait_ms: estimate.map(|d| d.as_millis() as u64),
        poll_after_ms: waiting.then(|| poll_interval(estimate, &policy).as_millis() as u64),
        admitted,
        expired: matches!(s.state, TicketState::Lapsed | TicketState::AdmissionExpired),
        admission_token,
        admit_deadline: s.admit_deadline,
        admitted_at: s.admitted_at,
        joined_at: None,
    }))
}

/// A query string whose rejections are [`AppError`]s (with a JSON body).
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(AppError))]
pub struct QueryArgs<T>(pub T);

/// `GET /v1/events/{e}/line/{ticket}?user_id=U`: poll.
pub async fn poll(
    State(state): State<Arc<AppState>>,
    Path((event_id, ticket_id)): Path<(String, String)>,
    QueryArgs(caller): QueryArgs<Caller>,
) -> Result<Json<TicketView>, AppError> {
    ticket(&state, event_id, ticket_id, caller, false).await
}

/// `DELETE /v1/events/{e}/line/{ticket}?user_id=U`: leave.
pub async fn leave(
    State(state): State<Arc<AppState>>,
    Path((event_id, ticket_id)): Path<(String, String)>,
    QueryArgs(caller): QueryArgs<Caller>,
) -> Result<Json<TicketView>, AppError> {
    ticket(&state, event_id, ticket_id, caller, true).await
}
