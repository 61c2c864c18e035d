//! The line mode: a drop behind a waiting room, measured from the clients'
//! side and audited like any drop.
//!
//! Each of `joins` clients (one distinct user each) joins the event's room
//! (as a burst, or at a rate), then, unless it is one of the `abandon`
//! fraction that walks away without another word, polls its ticket at the
//! interval the api advises; once admitted it sends its issue request with
//! the admission token. Every client is a task bounded by the run's
//! deadline; HTTP calls share a bounded pool of keep-alive connections.
//! While it runs, the room's counters are sampled once a second.
//!
//! What it measures ([`LineFigures`]): joins/s and polls/s; the admission
//! rate the room held, per second, against the configured one; admission
//! order against join order (inversions of admission times taken in
//! position order, the drop's Kendall-tau count; 0 when the line is a
//! line), and against the order the join requests were sent; tickets
//! admitted twice (a client saw two admission times) and tickets skipped
//! that did not lapse (a client that kept polling found its ticket lapsed,
//! or was never served); abandoned, lapsed and expired admissions; the
//! estimated wait's error (actual admission time − the estimate given at
//! the join, p50/p99 of its size); and join→coupon time. The issue requests
//! are then audited as a drop ([`crate::report::Report`]): oversold, double
//! issued, lost, phantom.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use couponrush_core::cli::parse_duration;
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::store::Store;
use couponrush_core::wire::now_micros;
use couponrush_core::{DecisionResult, Topics};
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::http::{self, Endpoint, HttpFactory, Pool};
use super::{Acceptance, TargetFactory};
use crate::measure::audit::EventTerms;
use crate::measure::latency::{self, LatencySummary};
use crate::measure::skew::count_inversions;
use crate::observe::Observer;
use crate::report::{group, Facts, Report};
use crate::Error;

/// Tries of one call that met a 503, a timeout or a broken connection.
const TRIES: u32 = 5;

/// The line mode's flags.
#[derive(Debug, Clone, Args)]
pub struct LineArgs {
    /// Clients joining the line (one user each).
    #[arg(long = "joins", env = "LINE_JOINS", default_value_t = 10_000)]
    pub joins: u64,
    /// Joins per second (default: all at once, a burst).
    #[arg(long = "join-rate", env = "LINE_JOIN_RATE")]
    pub join_rate: Option<f64>,
    /// Fraction of clients that walk away after joining (never poll again).
    #[arg(long = "abandon", env = "LINE_ABANDON", default_value_t = 0.2)]
    pub abandon: f64,
    /// Room policy: admissions per second.
    #[arg(long = "admit-rate", env = "LINE_ADMIT_RATE", default_value_t = 2000.0)]
    pub admit_rate: f64,
    /// Room policy: admitted users at most at once (default: no bound).
    #[arg(long = "max-active", env = "LINE_MAX_ACTIVE")]
    pub max_active: Option<u32>,
    /// Room policy: a waiting ticket not polled this long lapses.
    #[arg(long = "ticket-ttl", env = "LINE_TICKET_TTL", default_value = "15s", value_parser = parse_duration)]
    pub ticket_ttl: Duration,
    /// Room policy: an admitted user must issue within this.
    #[arg(long = "admission-window", env = "LINE_ADMISSION_WINDOW", default_value = "10s", value_parser = parse_duration)]
    pub admission_window: Duration,
    /// Room policy: issuer lag (records) above which admission slows.
    #[arg(long = "slow-above-lag", env = "LINE_SLOW_ABOVE_LAG")]
    pub slow_above_lag: Option<u64>,
    /// Keep-alive connections shared by the clients.
    #[arg(
        long = "line-connections",
        env = "LINE_CONNECTIONS",
        default_value_t = 256
    )]
    pub line_connections: usize,
    /// Stop every client after this long, whatever it is doing.
    #[arg(long = "line-duration", env = "LINE_DURATION", default_value = "300s", value_parser = parse_duration)]
    pub line_duration: Duration,
    /// Seed of who abandons.
    #[arg(long = "line-seed", env = "LINE_SEED", default_value_t = 1)]
    pub line_seed: u64,
}

impl LineArgs {
    /// Checks the flags.
    pub fn validate(&self) -> Result<(), Error> {
        if self.joins == 0 || self.joins > 10_000_000 {
            return Err(Error::BadFlag {
                flag: "--joins",
                expected: "must be between 1 and 10000000",
            });
        }
        if !(0.0..=1.0).contains(&self.abandon) {
            return Err(Error::BadFlag {
                flag: "--abandon",
                expected: "must be a fraction between 0 and 1",
            });
        }
        if self.join_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(Error::BadFlag {
                flag: "--join-rate",
                expected: "must be a positive number of joins per second",
            });
        }
        if self.line_connections == 0 {
            return Err(Error::BadFlag {
                flag: "--line-connections",
                expected: "must be at least 1",
            });
        }
        Ok(())
    }

    /// The body of `PUT /v1/events/{e}/line`.
    pub fn policy_body(&self) -> serde_json::Value {
        serde_json::json!({
            "max_active": self.max_active,
            "rate_per_sec": self.admit_rate,
            "ticket_ttl_secs": self.ticket_ttl.as_secs_f64(),
            "admission_window_secs": self.admission_window.as_secs_f64(),
            "slow_above_lag": self.slow_above_lag,
        })
    }

    /// Whether client `i` abandons (a seeded hash, so runs repeat).
    pub fn abandons(&self, i: u64) -> bool {
        let mut x = i
            .wrapping_add(self.line_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(1);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        (x as f64 / u64::MAX as f64) < self.abandon
    }

    /// One line describing the load.
    pub fn describe(&self) -> String {
        let joins = match self.join_rate {
            Some(r) => format!("{} joins at {r}/s", group(self.joins)),
            None => format!("burst of {} joins", group(self.joins)),
        };
        format!(
            "{joins}, {:.0}% abandoning; room admits {}/s{}, ticket ttl {:?}, window {:?}",
            self.abandon * 100.0,
            self.admit_rate,
            self.max_active
                .map(|m| format!(", at most {m} at once"))
                .unwrap_or_default(),
            self.ticket_ttl,
            self.admission_window
        )
    }
}

/// One line run.
pub struct LineRun {
    /// The api.
    pub endpoint: Endpoint,
    /// Admin token for the event and room setup.
    pub admin_token: Option<String>,
    /// Kafka, to watch outcomes.
    pub kafka: KafkaSettings,
    /// Topic names.
    pub topics: Topics,
    /// The coupon store, for the audit.
    pub store: Option<Arc<dyn Store>>,
    /// The event.
    pub event_id: String,
    /// Stock and limit.
    pub terms: EventTerms,
    /// The load and the room's policy.
    pub line: LineArgs,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Wait this long for the last decisions.
    pub drain_timeout: Duration,
    /// Keep raw data in the drop report.
    pub keep_raw: bool,
    /// Settings for the report.
    pub config: serde_json::Value,
    /// Print a line of progress every few seconds.
    pub progress: bool,
}

/// A line run's report: the drop's, and the line's own figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LineReport {
    /// The issue requests, audited as a drop.
    pub drop: Report,
    /// The line.
    pub line: LineFigures,
    /// True when the drop passed and the line kept its order and skipped
    /// nobody who stayed.
    pub passed: bool,
}

/// Sizes of the estimated wait's error, ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaitError {
    /// Admitted tickets whose estimate was compared.
    pub count: u64,
    /// Median |actual − estimate|.
    pub abs_p50_ms: f64,
    /// 99th percentile |actual − estimate|.
    pub abs_p99_ms: f64,
    /// Largest |actual − estimate|.
    pub abs_max_ms: f64,
    /// Median of actual − estimate (positive: waited longer than told).
    pub signed_p50_ms: f64,
    /// Median actual wait.
    pub actual_p50_ms: f64,
}

/// The line's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LineFigures {
    /// `redis` or `kafka`, as the room said.
    pub backend: String,
    /// Clients.
    pub clients: u64,
    /// Joins answered with a ticket.
    pub joined: u64,
    /// Joins per second, from the first to the last ticket.
    pub joins_per_s: f64,
    /// Polls sent.
    pub polls: u64,
    /// Polls per second over the run.
    pub polls_per_s: f64,
    /// Failed calls by kind (`join_503`, `poll_timeout`...).
    pub failures: BTreeMap<String, u64>,
    /// Configured admissions per second.
    pub configured_rate: f64,
    /// Admissions per second the room held: median over the seconds people
    /// were waiting.
    pub held_rate_p50: f64,
    /// ... and the busiest such second.
    pub held_rate_max: f64,
    /// Issuer lag the admitter measured, largest sample.
    pub lag_max: Option<u64>,
    /// Tickets the room admitted (its counter).
    pub admitted: u64,
    /// Admissions clients saw.
    pub admitted_seen: u64,
    /// Pairs of seen admissions compared in position order.
    pub order_pairs: u64,
    /// Of those, admitted in the opposite order of their positions.
    pub order_inversions: u64,
    /// Inversion ratio of positions against the order the join requests
    /// were sent (how the burst was serialised; not a fault).
    pub join_send_inversion_ratio: f64,
    /// Tickets a client saw admitted at two different times.
    pub admitted_twice: u64,
    /// Clients that kept polling within the ticket's lifetime and found
    /// their ticket lapsed.
    pub skipped_not_lapsed: u64,
    /// Staying clients never admitted by the end of the run.
    pub unserved: u64,
    /// Clients that walked away.
    pub abandoned: u64,
    /// Tickets the room let lapse.
    pub lapsed: u64,
    /// Admissions that ran out unused.
    pub admission_expired: u64,
    /// Admitted users that issued.
    pub done: u64,
    /// Admitted and neither done nor expired when the report was taken.
    pub still_active: u64,
    /// The estimated wait's error.
    pub wait_error: WaitError,
    /// Join sent → coupon issued (decided), ms, of issued users.
    pub join_to_coupon_ms: LatencySummary,
    /// Admission seen → issue request accepted, ms.
    pub admitted_to_accepted_ms: LatencySummary,
}

impl LineFigures {
    /// The failures the line may not have.
    pub fn failures_count(&self) -> u64 {
        self.order_inversions + self.admitted_twice + self.skipped_not_lapsed + self.unserved
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientOut {
    join_sent_at: u64,
    position: Option<u64>,
    joined_at: u64,
    estimate_ms: Option<u64>,
    abandoned: bool,
    admitted_at: Option<u64>,
    admitted_twice: bool,
    admission_seen_at: Option<u64>,
    final_state: Option<String>,
    max_poll_gap: u64,
    polls: u64,
    issued: Option<(Uuid, Acceptance)>,
    /// The issue request, when every try went unanswered or unacknowledged:
    /// it may have been written (all tries carried one key).
    in_doubt: Option<Uuid>,
    /// A try of the last call may have been written (see `call_retried`).
    maybe_written: bool,
    issue_sends: u64,
    failures: Vec<String>,
}

impl Pool {
    /// A call retried after a 503, a timeout or a broken connection, up to
    /// [`TRIES`] times, never past `deadline`; failures are counted in `out`.
    /// `out.maybe_written` is set when a try may have been written although
    /// it was not answered with a decision: a `503 unacknowledged`, or an
    /// answer lost after the request was sent.
    #[allow(clippy::too_many_arguments)]
    async fn call_retried(
        &self,
        what: &str,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        deadline: Instant,
        out: &mut ClientOut,
    ) -> Option<(StatusCode, Bytes)> {
        for _ in 0..TRIES {
            match self.call(method.clone(), path, headers, body.clone()).await {
                Ok((s, b)) if s != StatusCode::SERVICE_UNAVAILABLE => return Some((s, b)),
                Ok((s, b)) => {
                    out.maybe_written |= super::http::in_doubt(&b);
                    out.failures.push(format!("{what}_{}", s.as_u16()))
                }
                Err(kind) => {
                    out.maybe_written |= kind != "connect";
                    out.failures.push(format!("{what}_{kind}"))
                }
            }
            if Instant::now() + Duration::from_secs(1) >= deadline {
                return None;
            }
            // Retry-After is one second at this api.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        None
    }
}

/// A ticket as the api shows it (the fields the clients read).
#[derive(Debug, Deserialize)]
struct TicketView {
    ticket_id: Uuid,
    state: String,
    position: u64,
    #[serde(default)]
    estimated_wait_ms: Option<u64>,
    #[serde(default)]
    poll_after_ms: Option<u64>,
    #[serde(default)]
    admission_token: Option<String>,
    #[serde(default)]
    admitted_at: Option<u64>,
    #[serde(default)]
    joined_at: Option<u64>,
}

struct Ctx {
    pool: Pool,
    event: String,
    line: LineArgs,
    start: Instant,
    deadline: Instant,
    polls: AtomicU64,
    done: AtomicU64,
}

async fn client(i: u64, ctx: Arc<Ctx>) -> ClientOut {
    let mut out = ClientOut {
        abandoned: ctx.line.abandons(i),
        ..ClientOut::default()
    };
    let at = match ctx.line.join_rate {
        Some(r) => ctx.start + Duration::from_secs_f64(i as f64 / r),
        None => ctx.start,
    };
    if at >= ctx.deadline {
        return out;
    }
    tokio::time::sleep_until(at).await;
    let user = format!("line-user-{i}");
    let key = Uuid::new_v4().to_string();
    let body = Bytes::from(serde_json::json!({ "user_id": user }).to_string());
    out.join_sent_at = now_micros();
    let join_path = format!("/v1/events/{}/line", ctx.event);
    let headers = [("idempotency-key", key)];
    let Some((status, body)) = ctx
        .pool
        .call_retried(
            "join",
            Method::POST,
            &join_path,
            &headers,
            body,
            ctx.deadline,
            &mut out,
        )
        .await
    else {
        return out;
    };
    if !status.is_success() {
        out.failures.push(format!("join_{}", status.as_u16()));
        return out;
    }
    let Ok(ticket) = serde_json::from_slice::<TicketView>(&body) else {
        out.failures.push("join_unparsable".into());
        return out;
    };
    out.position = Some(ticket.position);
    out.joined_at = ticket.joined_at.unwrap_or(out.join_sent_at);
    out.estimate_ms = ticket.estimated_wait_ms;
    if out.abandoned {
        return out;
    }
    let poll_path = format!(
        "/v1/events/{}/line/{}?user_id={user}",
        ctx.event, ticket.ticket_id
    );
    let mut wait = Duration::from_millis(ticket.poll_after_ms.unwrap_or(1000));
    let mut last_contact = now_micros();
    loop {
        if Instant::now() + wait >= ctx.deadline {
            out.final_state = Some("unfinished".into());
            return out;
        }
        tokio::time::sleep(wait).await;
        let sent = now_micros();
        out.max_poll_gap = out.max_poll_gap.max(sent.saturating_sub(last_contact));
        out.polls += 1;
        ctx.polls.fetch_add(1, Ordering::Relaxed);
        let Some((status, body)) = ctx
            .pool
            .call_retried(
                "poll",
                Method::GET,
                &poll_path,
                &[],
                Bytes::new(),
                ctx.deadline,
                &mut out,
            )
            .await
        else {
            out.final_state = Some("unfinished".into());
            return out;
        };
        last_contact = sent;
        let view = match (status, serde_json::from_slice::<TicketView>(&body)) {
            (StatusCode::OK, Ok(v)) => v,
            (s, _) => {
                out.failures.push(format!("poll_{}", s.as_u16()));
                out.final_state = Some(format!("poll_{}", s.as_u16()));
                return out;
            }
        };
        match view.state.as_str() {
            "waiting" => {
                wait = Duration::from_millis(view.poll_after_ms.unwrap_or(1000));
            }
            "admitted" => {
                if let (Some(prev), Some(now)) = (out.admitted_at, view.admitted_at) {
                    out.admitted_twice |= prev != now;
                }
                out.admitted_at = view.admitted_at.or(out.admitted_at);
                out.admission_seen_at = Some(now_micros());
                let Some(token) = view.admission_token else {
                    out.failures.push("admitted_without_token".into());
                    return out;
                };
                issue(&ctx, &user, token, &mut out).await;
                out.final_state = Some("issued".into());
                ctx.done.fetch_add(1, Ordering::Relaxed);
                return out;
            }
            other => {
                out.final_state = Some(other.to_string());
                return out;
            }
        }
    }
}

async fn issue(ctx: &Ctx, user: &str, token: String, out: &mut ClientOut) {
    let intended = now_micros();
    let key = Uuid::new_v4();
    let path = format!("/v1/events/{}/issue", ctx.event);
    let body = Bytes::from(serde_json::json!({ "user_id": user }).to_string());
    let headers = [
        ("idempotency-key", key.to_string()),
        ("x-admission-token", token),
    ];
    out.issue_sends += 1;
    out.maybe_written = false;
    let Some((status, body)) = ctx
        .pool
        .call_retried(
            "issue",
            Method::POST,
            &path,
            &headers,
            body,
            ctx.deadline,
            out,
        )
        .await
    else {
        // Given up: in doubt only if a try may have been written (a 503
        // that is not `unacknowledged` promised nothing was accepted).
        if out.maybe_written {
            out.in_doubt = Some(couponrush_core::request_id::from_key(&ctx.event, user, key));
        }
        return;
    };
    #[derive(Deserialize)]
    struct Accepted {
        request_id: Uuid,
        accepted_at: u64,
    }
    match (status, serde_json::from_slice::<Accepted>(&body)) {
        (StatusCode::ACCEPTED, Ok(a)) => {
            out.issued = Some((
                a.request_id,
                Acceptance {
                    user_id: user.to_string(),
                    accepted_at: a.accepted_at,
                    intended_at: intended,
                },
            ))
        }
        (s, _) => out.failures.push(format!("issue_{}", s.as_u16())),
    }
}

/// A sample of the room's counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u64,
    admitted: u64,
    waiting: u64,
    lag: Option<u64>,
}

async fn room_stats(pool: &Pool, event: &str) -> Option<(String, serde_json::Value)> {
    let (s, body) = pool
        .call(
            Method::GET,
            &format!("/v1/events/{event}/line"),
            &[],
            Bytes::new(),
        )
        .await
        .ok()?;
    if s != StatusCode::OK {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some((v["backend"].as_str().unwrap_or("").to_string(), v))
}

/// Sets up the event and its room through the api.
async fn setup(run: &LineRun) -> Result<(), Error> {
    http::put_event(
        &run.endpoint,
        &run.event_id,
        run.terms.stock,
        run.terms.per_user_limit,
        run.admin_token.as_deref(),
    )
    .await?;
    let mut t = HttpFactory {
        endpoint: run.endpoint.clone(),
        timeout: Duration::from_secs(10),
    }
    .make();
    let mut headers = Vec::new();
    if let Some(token) = &run.admin_token {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    let (status, body) = t
        .call(
            Method::PUT,
            &format!("/v1/events/{}/line", run.event_id),
            &headers,
            Bytes::from(run.line.policy_body().to_string()),
        )
        .await
        .map_err(|kind| Error::ApiUnreachable {
            authority: run.endpoint.authority.clone(),
            kind,
        })?;
    if !status.is_success() {
        return Err(Error::ApiRefused {
            what: format!("opening the room of {}", run.event_id),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
            hint: " (is the api's --line-backend none?)",
        });
    }
    Ok(())
}

/// Runs the line mode end to end; `cancel` stops the clients early (the
/// drain and audit still run).
pub async fn run_line(run: LineRun, cancel: CancellationToken) -> Result<LineReport, Error> {
    run.line.validate()?;
    setup(&run).await?;
    let observer = {
        let (kafka, topics, event) = (run.kafka.clone(), run.topics.clone(), run.event_id.clone());
        tokio::task::spawn_blocking(move || Observer::start(&kafka, &topics, &event))
            .await?
            .map_err(|source| Error::Kafka {
                doing: "watch the outcomes",
                brokers: run.kafka.brokers.clone(),
                source,
            })?
    };
    let start = Instant::now();
    let started_at = now_micros();
    let ctx = Arc::new(Ctx {
        pool: Pool::new(
            HttpFactory {
                endpoint: run.endpoint.clone(),
                timeout: run.timeout,
            },
            run.line.line_connections,
        ),
        event: run.event_id.clone(),
        line: run.line.clone(),
        start,
        deadline: start + run.line.line_duration,
        polls: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    // The room's counters, once a second, until the clients are done.
    let sampling = CancellationToken::new();
    let sampler = {
        let (ctx, stop) = (ctx.clone(), sampling.clone());
        let progress = run.progress;
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut backend = String::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Some((b, v)) = room_stats(&ctx.pool, &ctx.event).await {
                    backend = b;
                    let s = Sample {
                        at: now_micros(),
                        admitted: v["stats"]["admitted"].as_u64().unwrap_or(0),
                        waiting: v["stats"]["waiting"].as_u64().unwrap_or(0),
                        lag: v["admitter"]["lag"].as_u64(),
                    };
                    if progress && samples.len() % 5 == 0 {
                        eprintln!(
                            "  line: {}s admitted {} waiting {} polls {} issued {}",
                            samples.len(),
                            s.admitted,
                            s.waiting,
                            ctx.polls.load(Ordering::Relaxed),
                            ctx.done.load(Ordering::Relaxed)
                        );
                    }
                    samples.push(s);
                }
            }
            (backend, samples)
        })
    };
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..run.line.joins {
        clients.spawn(client(i, ctx.clone()));
    }
    let mut outs = Vec::with_capacity(run.line.joins as usize);
    loop {
        tokio::select! {
            next = clients.join_next() => match next {
                Some(Ok(o)) => outs.push(o),
                Some(Err(_)) => {}
                None => break,
            },
            _ = cancel.cancelled() => {
                clients.abort_all();
            }
        }
    }
    let load_finished_at = now_micros();
    sampling.cancel();
    let (backend, samples) = sampler.await.unwrap_or_default();
    // Admissions nobody used run out one window after they were given:
    // wait for them (bounded), so every walk-away is counted as a lapse or
    // an expired admission.
    let settle = Instant::now() + run.line.admission_window + Duration::from_secs(2);
    let final_stats = loop {
        let stats = room_stats(&ctx.pool, &run.event_id).await.map(|(_, v)| v);
        let active = stats
            .as_ref()
            .and_then(|v| v["stats"]["active"].as_u64())
            .unwrap_or(0);
        if active == 0 || Instant::now() >= settle || cancel.is_cancelled() {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let mut accepted = HashMap::new();
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let (mut accept, mut accept_uncorrected) = (latency::histogram(), latency::histogram());
    let mut sends = 0;
    for o in &outs {
        if let Some((id, a)) = &o.issued {
            accepted.insert(*id, a.clone());
            *answers.entry("202".into()).or_default() += 1;
            let us = a.accepted_at.saturating_sub(a.intended_at);
            latency::record(&mut accept, us);
            latency::record(&mut accept_uncorrected, us);
        }
        sends += o.issue_sends;
        for f in o.failures.iter().filter(|f| f.starts_with("issue_")) {
            *answers
                .entry(f.trim_start_matches("issue_").into())
                .or_default() += 1;
        }
    }
    let in_doubt: HashSet<Uuid> = outs.iter().filter_map(|o| o.in_doubt).collect();
    let ids: HashSet<Uuid> = accepted.keys().copied().collect();
    let undecided = observer.wait_for(&ids, run.drain_timeout).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests_from = observer.requests_from();
    let observations = observer.finish();
    let finished_at = now_micros();
    // Requests in doubt settled against the log (see `run::drop`).
    let mut in_doubt_written = HashMap::new();
    let mut settle_note = None;
    if !in_doubt.is_empty() {
        let (kafka, topic, ids) = (
            run.kafka.clone(),
            run.topics.requests.clone(),
            in_doubt.clone(),
        );
        match tokio::task::spawn_blocking(move || {
            crate::observe::written_requests(
                &kafka,
                &topic,
                &requests_from,
                &ids,
                Duration::from_secs(30),
            )
        })
        .await?
        {
            Ok(found) => in_doubt_written = found,
            Err(e) => {
                settle_note = Some(format!(
                    "the {} requests in doubt could not be settled against the requests topic \
                     ({e}): those never decided are not judged",
                    in_doubt.len()
                ))
            }
        }
    }
    let decided: HashMap<Uuid, (DecisionResult, u64)> = observations
        .outcomes
        .iter()
        .filter(|o| !o.outcome.replay)
        .map(|o| {
            (
                o.outcome.request_id,
                (o.outcome.result, o.outcome.decided_at),
            )
        })
        .collect();
    let ledger = match &run.store {
        Some(store) => crate::run::audit_ledger(&**store, &run.event_id).await?,
        None => None,
    };
    let mut notes: Vec<String> = settle_note.into_iter().collect();
    if undecided > 0 {
        notes.push(format!(
            "{undecided} accepted requests were still undecided after the {:?} drain (counted as lost)",
            run.drain_timeout
        ));
    }
    let facts = Facts {
        config: run.config.clone(),
        event_id: run.event_id.clone(),
        terms: run.terms,
        started_at,
        load_finished_at,
        finished_at,
        requests: outs.iter().filter(|o| o.issue_sends > 0).count() as u64,
        sends,
        answers,
        accepted,
        in_doubt,
        in_doubt_written,
        outcomes: observations.outcomes,
        holds: observations.holds,
        hold_actions: None,
        end: None,
        dlq: observations.dlq,
        ledger,
        accept,
        accept_uncorrected,
        notes,
        observed: run.store.is_some(),
    };
    let drop = Report::build(facts, run.keep_raw);
    let line = figures(
        &run.line,
        backend,
        &outs,
        &samples,
        final_stats.as_ref(),
        &decided,
        started_at,
        load_finished_at,
    );
    let passed = drop.passed && line.failures_count() == 0;
    Ok(LineReport { drop, line, passed })
}

fn summary_ms(values: impl IntoIterator<Item = u64>) -> LatencySummary {
    let mut h = latency::histogram();
    for v in values {
        latency::record(&mut h, v);
    }
    latency::summary(&h)
}

#[allow(clippy::too_many_arguments)]
fn figures(
    args: &LineArgs,
    backend: String,
    outs: &[ClientOut],
    samples: &[Sample],
    last: Option<&serde_json::Value>,
    decided: &HashMap<Uuid, (DecisionResult, u64)>,
    started_at: u64,
    finished_at: u64,
) -> LineFigures {
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for f in outs.iter().flat_map(|o| &o.failures) {
        *failures.entry(f.clone()).or_default() += 1;
    }
    let joined: Vec<&ClientOut> = outs.iter().filter(|o| o.position.is_some()).collect();
    let joins_span = joined
        .iter()
        .map(|o| o.joined_at)
        .max()
        .unwrap_or(started_at)
        .saturating_sub(
            joined
                .iter()
                .map(|o| o.joined_at)
                .min()
                .unwrap_or(started_at),
        )
        .max(1);
    let polls: u64 = outs.iter().map(|o| o.polls).sum();
    let seconds = (finished_at.saturating_sub(started_at)).max(1) as f64 / 1e6;

    // Admission order: admission times in position order; any pair out of
    // order is a ticket admitted before one that joined ahead of it.
    let mut seen: Vec<(u64, u64)> = joined
        .iter()
        .filter_map(|o| Some((o.position?, o.admitted_at?)))
        .collect();
    seen.sort_unstable();
    let n = seen.len() as u64;
    let mut times: Vec<u64> = seen.iter().map(|&(_, at)| at).collect();
    let order_inversions = count_inversions(&mut times);
    // Positions in the order the joins were sent.
    let mut by_send: Vec<(u64, u64)> = joined
        .iter()
        .filter_map(|o| Some((o.join_sent_at, o.position?)))
        .collect();
    by_send.sort_unstable();
    let mut positions: Vec<u64> = by_send.iter().map(|&(_, p)| p).collect();
    let m = positions.len() as u64;
    let send_inversions = count_inversions(&mut positions);

    let ttl = args.ticket_ttl.as_micros() as u64;
    let stayed: Vec<&&ClientOut> = joined.iter().filter(|o| !o.abandoned).collect();
    let skipped_not_lapsed = stayed
        .iter()
        .filter(|o| o.final_state.as_deref() == Some("lapsed") && o.max_poll_gap <= ttl)
        .count() as u64;
    let unserved = stayed
        .iter()
        .filter(|o| o.admitted_at.is_none() && o.final_state.as_deref() != Some("lapsed"))
        .count() as u64;

    // Held rate: admissions per second while people were waiting.
    let mut per_second: Vec<f64> = samples
        .windows(2)
        .filter(|w| w[0].waiting > 0 && w[1].waiting > 0)
        .map(|w| {
            (w[1].admitted.saturating_sub(w[0].admitted)) as f64
                / ((w[1].at.saturating_sub(w[0].at)).max(1) as f64 / 1e6)
        })
        .collect();
    per_second.sort_by(f64::total_cmp);
    let held_rate_p50 = per_second.get(per_second.len() / 2).copied().unwrap_or(0.0);
    let held_rate_max = per_second.last().copied().unwrap_or(0.0);

    let mut abs = latency::histogram();
    let mut signed: Vec<i64> = Vec::new();
    let mut actual = Vec::new();
    for o in &joined {
        if let (Some(est), Some(at)) = (o.estimate_ms, o.admitted_at) {
            let waited = at.saturating_sub(o.joined_at);
            let err = waited as i64 - (est * 1000) as i64;
            latency::record(&mut abs, err.unsigned_abs());
            signed.push(err);
            actual.push(waited);
        }
    }
    signed.sort_unstable();
    let abs_s = latency::summary(&abs);
    let wait_error = WaitError {
        count: abs_s.count,
        abs_p50_ms: abs_s.p50,
        abs_p99_ms: abs_s.p99,
        abs_max_ms: abs_s.max,
        signed_p50_ms: signed.get(signed.len() / 2).copied().unwrap_or(0) as f64 / 1000.0,
        actual_p50_ms: summary_ms(actual).p50,
    };
    let join_to_coupon = summary_ms(outs.iter().filter_map(|o| {
        let (id, _) = o.issued.as_ref()?;
        match decided.get(id)? {
            (DecisionResult::Issued, at) => Some(at.saturating_sub(o.join_sent_at)),
            _ => None,
        }
    }));
    let admitted_to_accepted = summary_ms(outs.iter().filter_map(|o| {
        let (_, a) = o.issued.as_ref()?;
        Some(a.accepted_at.saturating_sub(o.admission_seen_at?))
    }));
    let stat = |k: &str| {
        last.and_then(|v| v["stats"][k].as_u64())
            .unwrap_or_default()
    };
    LineFigures {
        backend,
        clients: outs.len() as u64,
        joined: joined.len() as u64,
        joins_per_s: joined.len() as f64 / (joins_span as f64 / 1e6),
        polls,
        polls_per_s: polls as f64 / seconds,
        failures,
        configured_rate: args.admit_rate,
        held_rate_p50,
        held_rate_max,
        lag_max: samples.iter().filter_map(|s| s.lag).max(),
        admitted: stat("admitted"),
        admitted_seen: n,
        order_pairs: n * n.saturating_sub(1) / 2,
        order_inversions,
        join_send_inversion_ratio: if m > 1 {
            send_inversions as f64 / (m * (m - 1) / 2) as f64
        } else {
            0.0
        },
        admitted_twice: outs.iter().filter(|o| o.admitted_twice).count() as u64,
        skipped_not_lapsed,
        unserved,
        abandoned: joined.iter().filter(|o| o.abandoned).count() as u64,
        lapsed: stat("lapsed"),
        admission_expired: stat("admission_expired"),
        done: stat("done"),
        still_active: stat("active"),
        wait_error,
        join_to_coupon_ms: join_to_coupon,
        admitted_to_accepted_ms: admitted_to_accepted,
    }
}

impl LineReport {
    /// The drop's report, then the line's figures.
    pub fn text(&self) -> String {
        let mut s = self.drop.text();
        s.push_str(&self.line_text());
        s
    }

    /// The drop's report with the line's figures added as its notes: what
    /// `--chart` and `--html` draw for a line run (the HTML report's panels
    /// are the drop's; the line's figures are listed with its notes).
    pub fn drop_with_line_notes(&self) -> Report {
        let mut drop = self.drop.clone();
        drop.notes.extend(
            self.line_text()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
        drop
    }

    /// The line's part of [`LineReport::text`].
    fn line_text(&self) -> String {
        let l = &self.line;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\ncouponrush line report: backend {}, {} clients",
            l.backend,
            group(l.clients)
        );
        let _ = writeln!(
            s,
            "  joins        {} joined ({:.0}/s); polls {} ({:.0}/s)",
            group(l.joined),
            l.joins_per_s,
            group(l.polls),
            l.polls_per_s
        );
        if !l.failures.is_empty() {
            let _ = writeln!(s, "  failed calls {:?}", l.failures);
        }
        let _ = writeln!(
            s,
            "  admission    configured {:.0}/s, held p50 {:.0}/s, max {:.0}/s; admitted {} (seen by clients {}){}",
            l.configured_rate,
            l.held_rate_p50,
            l.held_rate_max,
            group(l.admitted),
            group(l.admitted_seen),
            l.lag_max.map(|g| format!("; issuer lag max {g}")).unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "  order        {} of {} pairs admitted out of join order; join requests vs positions {:.3}% inverted",
            group(l.order_inversions),
            group(l.order_pairs),
            l.join_send_inversion_ratio * 100.0
        );
        let _ = writeln!(
            s,
            "  abandonment  abandoned {}: lapsed {}, admissions expired {} (still admitted {}); issued after admission {}",
            group(l.abandoned),
            group(l.lapsed),
            group(l.admission_expired),
            group(l.still_active),
            group(l.done)
        );
        let w = &l.wait_error;
        let _ = writeln!(
            s,
            "  wait estimate error |actual - estimate| p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (median signed {:+.0} ms, actual wait p50 {:.0} ms, n {})",
            w.abs_p50_ms, w.abs_p99_ms, w.abs_max_ms, w.signed_p50_ms, w.actual_p50_ms, group(w.count)
        );
        let _ = writeln!(
            s,
            "  join->coupon p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n {}); admitted->accepted p50 {:.0} ms, p99 {:.0} ms",
            l.join_to_coupon_ms.p50,
            l.join_to_coupon_ms.p99,
            l.join_to_coupon_ms.max,
            group(l.join_to_coupon_ms.count),
            l.admitted_to_accepted_ms.p50,
            l.admitted_to_accepted_ms.p99
        );
        let _ = writeln!(
            s,
            "  line checks  admitted twice {}, skipped without lapsing {}, unserved {}, out of order {}",
            l.admitted_twice, l.skipped_not_lapsed, l.unserved, l.order_inversions
        );
        let _ = writeln!(
            s,
            "  verdict      {}",
            if self.passed { "PASS" } else { "FAIL" }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> LineArgs {
        LineArgs {
            joins: 10,
            join_rate: None,
            abandon: 0.2,
            admit_rate: 100.0,
            max_active: None,
            ticket_ttl: Duration::from_secs(10),
            admission_window: Duration::from_secs(10),
            slow_above_lag: None,
            line_connections: 4,
            line_duration: Duration::from_secs(60),
            line_seed: 1,
        }
    }

    fn client(position: u64, admitted_at: Option<u64>, state: &str) -> ClientOut {
        ClientOut {
            join_sent_at: position,
            position: Some(position),
            joined_at: 0,
            estimate_ms: Some(position),
            admitted_at,
            final_state: Some(state.into()),
            max_poll_gap: 1_000_000,
            ..ClientOut::default()
        }
    }

    #[test]
    fn about_the_asked_fraction_abandons() {
        let a = LineArgs {
            joins: 100_000,
            ..args()
        };
        let n = (0..a.joins).filter(|&i| a.abandons(i)).count();
        assert!((19_000..21_000).contains(&n), "{n}");
    }

    #[test]
    fn the_figures_see_a_planted_reorder_a_double_admission_and_a_skip() {
        let mut outs = vec![
            client(1, Some(10), "issued"),
            client(2, Some(30), "issued"),
            client(3, Some(20), "issued"),
            client(4, None, "lapsed"),
        ];
        outs[1].admitted_twice = true;
        let f = figures(&args(), "x".into(), &outs, &[], None, &HashMap::new(), 0, 1);
        assert_eq!(f.order_inversions, 1, "position 3 admitted before 2");
        assert_eq!(f.admitted_twice, 1);
        assert_eq!(f.skipped_not_lapsed, 1, "4 kept polling, yet lapsed");
        assert!(f.failures_count() >= 3);
        let clean = vec![
            client(1, Some(10), "issued"),
            client(2, Some(10), "issued"),
            client(3, Some(20), "issued"),
        ];
        let f = figures(
            &args(),
            "x".into(),
            &clean,
            &[],
            None,
            &HashMap::new(),
            0,
            1,
        );
        assert_eq!(f.failures_count(), 0, "{f:?}");
    }
}
