//! The webhook receiver: the endpoint `coupon-notifier` delivers to, for
//! tests, the fault suite and demos. It counts deliveries by
//! `Idempotency-Key` (every request at the wire, the keys acknowledged
//! once, the duplicates), keeps the first body of each key, and can be told
//! to fail or to stall:
//!
//! - `POST /webhook`: one delivery. 400 without an `Idempotency-Key` or a
//!   JSON object body; 503 while failing; else 200, also for a key seen
//!   before (a duplicate is acknowledged and counted, never acted on twice:
//!   the dedup a real endpoint must do).
//! - `GET /stats`: the counts, as JSON ([`Stats`]).
//! - `POST /control` `{"fail_for_ms": 10000}`: answer 503 to deliveries for
//!   that long from now (0 ends it); `{"stall_ms": N}`: every delivery waits
//!   N ms before it is answered (0 ends it). Both at once is fine.
//!
//! In-process, [`Receiver::start`] returns a [`ReceiverHandle`] with the
//! same counts and switches. A delivery is counted when it arrives and
//! answered after the stall, so one the client gave up on (its timeout
//! shorter than the stall) was still acted on, as at a real slow endpoint:
//! the client's retry is then a duplicate at the wire. Requests in progress are bounded ([`MAX_CONCURRENT`]); past
//! the bound the answer is 503 at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use couponrush_loadgen::Verdict;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::LabError;

/// Requests handled at once; more are answered 503 at once.
pub const MAX_CONCURRENT: usize = 4096;

/// Largest delivery body accepted.
const MAX_BODY: usize = 64 * 1024;

/// `coupon-lab receiver`.
#[derive(Debug, Clone, Args)]
pub struct ReceiverArgs {
    /// Address to listen on (keep it on loopback).
    #[arg(long, env = "RECEIVER_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
}

/// What the receiver has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Delivery requests at the wire, whatever the answer.
    pub received: u64,
    /// Answered 2xx (duplicates included).
    pub acknowledged: u64,
    /// Distinct keys acknowledged.
    pub unique_keys: u64,
    /// Acknowledged deliveries of a key already acknowledged.
    pub duplicates: u64,
    /// Answered 503 (failing on purpose, or over [`MAX_CONCURRENT`]).
    pub refused: u64,
    /// Answered 400 (no key, or not a JSON object).
    pub rejected: u64,
    /// Milliseconds left of the current failure, 0 if none.
    pub failing_for_ms: u64,
    /// The current stall per request, in milliseconds.
    pub stall_ms: u64,
}

/// A `POST /control` body.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Control {
    /// Answer 503 for this long from now (0: stop failing).
    #[serde(default)]
    pub fail_for_ms: Option<u64>,
    /// Wait this long before answering each delivery (0: no stall).
    #[serde(default)]
    pub stall_ms: Option<u64>,
}

#[derive(Debug)]
struct Seen {
    count: u64,
    body: serde_json::Value,
}

#[derive(Debug)]
struct Shared {
    keys: Mutex<HashMap<String, Seen>>,
    fail_until: Mutex<Option<Instant>>,
    stall_ms: AtomicU64,
    received: AtomicU64,
    refused: AtomicU64,
    rejected: AtomicU64,
    slots: Semaphore,
}

impl Shared {
    fn keys(&self) -> MutexGuard<'_, HashMap<String, Seen>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail_until(&self) -> MutexGuard<'_, Option<Instant>> {
        self.fail_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn failing_for(&self) -> Duration {
        self.fail_until()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    fn apply(&self, c: Control) {
        if let Some(ms) = c.fail_for_ms {
            *self.fail_until() = (ms > 0).then(|| Instant::now() + Duration::from_millis(ms));
        }
        if let Some(ms) = c.stall_ms {
            self.stall_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Counts one delivery and says how to answer it.
    fn decide(&self, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str) {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .filter(|k| !k.is_empty());
        let body = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .filter(serde_json::Value::is_object);
        let (Some(key), Some(body)) = (key, body) else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::BAD_REQUEST,
                "a delivery needs an Idempotency-Key header and a JSON object body\n",
            );
        };
        if !self.failing_for().is_zero() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::SERVICE_UNAVAILABLE, "failing on purpose\n");
        }
        let mut keys = self.keys();
        match keys.get_mut(key) {
            Some(seen) => {
                seen.count += 1;
                (StatusCode::OK, "duplicate: already have it\n")
            }
            None => {
                keys.insert(key.to_string(), Seen { count: 1, body });
                (StatusCode::OK, "ok\n")
            }
        }
    }

    fn stats(&self) -> Stats {
        let (acknowledged, unique_keys) = {
            let keys = self.keys();
            (
                keys.values().map(|s| s.count).sum::<u64>(),
                keys.len() as u64,
            )
        };
        Stats {
            received: self.received.load(Ordering::Relaxed),
            acknowledged,
            unique_keys,
            duplicates: acknowledged - unique_keys,
            refused: self.refused.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failing_for_ms: self.failing_for().as_millis() as u64,
            stall_ms: self.stall_ms.load(Ordering::Relaxed),
        }
    }
}

/// The receiver's routes over fresh counts.
fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/webhook", post(deliver))
        .route("/stats", get(stats))
        .route("/control", post(control))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

async fn deliver(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    shared.received.fetch_add(1, Ordering::Relaxed);
    let Ok(_slot) = shared.slots.try_acquire() else {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "overloaded\n");
    };
    // Decided (and counted) on arrival, answered after the stall: a slow
    // endpoint has acted on the delivery even if the client gives up.
    let answer = shared.decide(&headers, &body);
    let stall = shared.stall_ms.load(Ordering::Relaxed);
    if stall > 0 {
        tokio::time::sleep(Duration::from_millis(stall)).await;
    }
    answer
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(shared.stats())
}

/// Takes the body as JSON whatever its `Content-Type` (`curl -d` sends a
/// form type).
async fn control(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Stats>, (StatusCode, String)> {
    let c: Control = serde_json::from_slice(&body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("expected {{\"fail_for_ms\": N}} and/or {{\"stall_ms\": N}}: {e}\n"),
        )
    })?;
    shared.apply(c);
    Ok(Json(shared.stats()))
}

/// The receiver, started in-process.
pub struct Receiver;

impl Receiver {
    /// Listens on `addr` (port 0 picks a free one) and serves until the
    /// handle is stopped or dropped.
    pub async fn start(addr: SocketAddr) -> std::io::Result<ReceiverHandle> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            keys: Mutex::new(HashMap::new()),
            fail_until: Mutex::new(None),
            stall_ms: AtomicU64::new(0),
            received: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            slots: Semaphore::new(MAX_CONCURRENT),
        });
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let router = app(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(ReceiverHandle {
            addr,
            shared,
            cancel,
            task: Some(task),
        })
    }
}

/// A running receiver: its address, counts and switches.
pub struct ReceiverHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ReceiverHandle {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to pass as `--webhook`.
    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// The counts so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Per key acknowledged, how many times it was (1 = exactly once).
    pub fn counts(&self) -> HashMap<String, u64> {
        self.shared
            .keys()
            .iter()
            .map(|(k, s)| (k.clone(), s.count))
            .collect()
    }

    /// The first body acknowledged under `key`.
    pub fn body(&self, key: &str) -> Option<serde_json::Value> {
        self.shared.keys().get(key).map(|s| s.body.clone())
    }

    /// Answers 503 to deliveries for `d` from now (zero: stop failing).
    pub fn fail_for(&self, d: Duration) {
        self.shared.apply(Control {
            fail_for_ms: Some(d.as_millis() as u64),
            stall_ms: None,
        });
    }

    /// Makes every delivery wait `d` before its answer (zero: no stall).
    pub fn stall(&self, d: Duration) {
        self.shared.apply(Control {
            fail_for_ms: None,
            stall_ms: Some(d.as_millis() as u64),
        });
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(mut self) -> Stats {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.shared.stats()
    }
}

impl Drop for ReceiverHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `coupon-lab receiver`: serves until ctrl-c, then prints the counts as JSON.
pub async fn receiver(args: ReceiverArgs, cancel: CancellationToken) -> Result<Verdict, LabError> {
    let handle = Receiver::start(args.listen)
        .await
        .map_err(|source| LabError::Listen {
            addr: args.listen.to_string(),
            source,
        })?;
    println!(
        "receiver on {}  (GET /stats, POST /control {{\"fail_for_ms\":N}} or {{\"stall_ms\":N}})",
        handle.url()
    );
    cancel.cancelled().await;
    let stats = handle.stop().await;
    println!(
        "{}",
        serde_json::to_string(&stats).expect("stats always serialize")
    );
    Ok(Verdict::Pass)
}
