//! The live page: a drop watched in a browser while it runs
//! (`--dashboard 127.0.0.1:PORT`).
//!
//! The process serves the page itself: hand-written HTML, JS and CSS
//! embedded with `include_str!` (no CDN, no build step), and a feed of
//! server-sent events, [`TICK`] apart (4 a second), each a whole
//! [`Snapshot`] in JSON, so a tab that (re)connects needs nothing older.
//!
//! Bounded by construction, so the page never slows the load:
//! - the driver's workers and the observer hand their raw facts to a
//!   [`LiveFeed`] (one slot per worker, a lock nobody else takes but the
//!   ticker four times a second); nothing is computed on the hot path;
//! - one task turns them into a snapshot per tick; the heavy figure (the
//!   ordering skew, O(n log n)) at most once a second, less often as n grows;
//! - each browser tab gets a channel of [`SUBSCRIBER_BUFFER`] snapshots; a
//!   tab that falls that far behind is dropped (its `EventSource`
//!   reconnects and starts from the latest snapshot), never buffered
//!   without bound; at most [`MAX_SUBSCRIBERS`] tabs at once.
//!
//! At the end the page shows the final [`Report`]'s figures, built by
//! [`Snapshot::from_report`], which the self-contained HTML report
//! ([`crate::html`]) embeds too: the live page's last state and the report
//! file show the same numbers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Args;
use couponrush_core::cli::parse_duration;
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::wire::now_micros;
use couponrush_core::DecisionResult;
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::drive::Sent;
use crate::measure::audit::EventTerms;
use crate::measure::latency::{self, LatencySummary};
use crate::measure::skew::{skew, Ordered};
use crate::observe::{Observed, ObservedHold};
use crate::report::Report;
use crate::Error;

/// Time between two snapshots (4 a second: the low end of what a live
/// view needs, since every update costs the browser a frame, taken from
/// the cores that run the drop when the tab is on the same machine).
pub const TICK: Duration = Duration::from_millis(250);
/// Snapshots a tab may be behind before it is dropped.
pub const SUBSCRIBER_BUFFER: usize = 8;
/// Tabs served at once; more get a 503.
pub const MAX_SUBSCRIBERS: usize = 32;
/// The sliding window of the "now" latencies, in ticks (2 s).
const WINDOW_TICKS: usize = 8;
/// Points of the arrival-vs-decision scatter sent per snapshot at most
/// (sampled evenly from all of them).
const SCATTER_POINTS: usize = 1500;
/// Per-second points of the rate series sent per snapshot at most.
const SERIES_POINTS: usize = 300;

const PAGE_HTML: &str = include_str!("../assets/dashboard.html");
const PAGE_JS: &str = include_str!("../assets/dashboard.js");
const PAGE_CSS: &str = include_str!("../assets/dashboard.css");

/// The page's flags, shared by `coupon-loadgen run` and the lab's demo.
#[derive(Debug, Clone, Args)]
pub struct DashboardArgs {
    /// Serve a live page of the drop at this address (e.g. 127.0.0.1:8090;
    /// port 0 picks one); its URL is printed at start. Loopback only: the
    /// page has no login.
    #[arg(long, env = "LOADGEN_DASHBOARD")]
    pub dashboard: Option<SocketAddr>,
    /// With --dashboard: keep serving the final page this long after the
    /// drop (Ctrl-C ends it sooner; 0s exits at once).
    #[arg(long, env = "LOADGEN_DASHBOARD_LINGER", default_value = "2m", value_parser = parse_duration)]
    pub dashboard_linger: Duration,
    /// With --dashboard: before the drop starts, wait until a browser tab
    /// has the page open, at most this long (0s: start at once). For a demo
    /// whose audience should see the doors open, and for measuring what the
    /// page costs the load once it is open rather than while it opens.
    #[arg(long, env = "LOADGEN_DASHBOARD_WAIT", default_value = "0s", value_parser = parse_duration)]
    pub dashboard_wait: Duration,
}

impl DashboardArgs {
    /// Binds the page if `--dashboard` asks for it, prints its URL, and waits
    /// for a tab as `--dashboard-wait` asks (or until `cancel`).
    pub async fn start(&self, cancel: &CancellationToken) -> Result<Option<Dashboard>, Error> {
        let Some(addr) = self.dashboard else {
            return Ok(None);
        };
        let d = Dashboard::bind(addr).await?;
        println!("live page: {}", d.url());
        if !self.dashboard_wait.is_zero() {
            println!(
                "waiting up to {} for a browser tab to open it",
                humantime_short(self.dashboard_wait)
            );
            if !d.wait_for_tab(self.dashboard_wait, cancel).await && !cancel.is_cancelled() {
                println!("no tab opened the page; starting anyway");
            }
        }
        Ok(Some(d))
    }
}

// ---------------------------------------------------------------------------
// The feed: what the driver and the observer hand over, raw.

#[derive(Default)]
struct SlotData {
    accept_us: Vec<u64>,
    accepted_count: u64,
    accepted: Vec<(Uuid, u64)>,
    r503: u64,
    r4xx: u64,
    other: u64,
}

/// One driver worker's hand-over point: the worker locks it once per
/// answer, the ticker four times a second to take what is there.
#[derive(Default)]
pub struct LoadSlot {
    data: Mutex<SlotData>,
    /// Keep accepted ids (for the end-to-end latency): only when outcomes
    /// are watched, else they would only cost.
    ids: bool,
}

impl LoadSlot {
    /// One answer: its accept latency from the intended send time (µs,
    /// corrected for coordinated omission as the report's), and, if
    /// accepted, the request id with its intended send time (for the
    /// end-to-end latency).
    pub fn record(&self, accept_us: u64, sent: &Sent, intended_at: u64) {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        d.accept_us.push(accept_us);
        match sent {
            Sent::Accepted { request_id, .. } => {
                d.accepted_count += 1;
                if self.ids {
                    d.accepted.push((*request_id, intended_at));
                }
            }
            Sent::Failed(kind) | Sent::InDoubt { kind, .. } if kind == "503" => d.r503 += 1,
            Sent::Failed(kind) if kind.starts_with('4') => d.r4xx += 1,
            Sent::Failed(_) | Sent::InDoubt { .. } => d.other += 1,
        }
    }
}

#[derive(Default)]
struct DecisionData {
    outcomes: Vec<Observed>,
    holds: Vec<ObservedHold>,
    dlq: u64,
}

/// Where a run's facts reach the page while it runs. Given to the driver
/// (through [`crate::drive::Progress::live`]) and to the observer.
#[derive(Default)]
pub struct LiveFeed {
    /// Outcomes are watched: slots keep accepted ids.
    observed: bool,
    opened_at: AtomicU64,
    load_done: AtomicBool,
    slots: Mutex<Vec<Arc<LoadSlot>>>,
    decisions: Mutex<DecisionData>,
}

impl LiveFeed {
    /// The doors opened (the driver started) at `micros` since the epoch.
    pub fn opened(&self, micros: u64) {
        self.opened_at.store(micros, Ordering::Relaxed);
    }

    /// The load is over; the last decisions are awaited.
    pub fn load_finished(&self) {
        self.load_done.store(true, Ordering::Relaxed);
    }

    /// A new slot for one driver worker.
    pub fn slot(&self) -> Arc<LoadSlot> {
        let slot = Arc::new(LoadSlot {
            data: Mutex::default(),
            ids: self.observed,
        });
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot.clone());
        slot
    }

    /// An outcome of the event, as the observer read it.
    pub fn decision(&self, o: &Observed) {
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .outcomes
            .push(o.clone());
    }

    /// A hold's end, as the observer read it.
    pub fn hold_end(&self, h: &ObservedHold) {
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holds
            .push(h.clone());
    }

    /// A dead-lettered request record.
    pub fn dead_letter(&self) {
        self.decisions.lock().unwrap_or_else(|e| e.into_inner()).dlq += 1;
    }

    fn take(&self) -> (SlotData, DecisionData) {
        let mut load = SlotData::default();
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for s in slots {
            let mut d = s.data.lock().unwrap_or_else(|e| e.into_inner());
            load.accept_us.append(&mut d.accept_us);
            load.accepted_count += std::mem::take(&mut d.accepted_count);
            load.accepted.append(&mut d.accepted);
            load.r503 += std::mem::take(&mut d.r503);
            load.r4xx += std::mem::take(&mut d.r4xx);
            load.other += std::mem::take(&mut d.other);
        }
        let decisions =
            std::mem::take(&mut *self.decisions.lock().unwrap_or_else(|e| e.into_inner()));
        (load, decisions)
    }
}

// ---------------------------------------------------------------------------
// The snapshot: what one server-sent event carries (and the HTML report).

/// Counts since the doors opened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Sends answered (retries included).
    pub sent: u64,
    /// Requests accepted (`202`).
    pub accepted: u64,
    /// Distinct requests decided.
    pub decided: u64,
    /// Distinct requests issued a coupon.
    pub issued: u64,
    /// `503` answers.
    pub r503: u64,
    /// `4xx` answers.
    pub r4xx: u64,
    /// Other failures (timeouts, connection errors, 5xx but 503).
    pub other_failed: u64,
}

/// Counts within one second of the run (rates).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Point {
    /// Seconds since the doors opened.
    pub t: u64,
    /// Accepted in that second.
    pub accepted: u64,
    /// First decisions observed in that second.
    pub decided: u64,
    /// Coupons observed issued in that second.
    pub issued: u64,
    /// `503`s in that second (live only: the report keeps totals).
    pub r503: Option<u64>,
    /// `4xx`s in that second (live only).
    pub r4xx: Option<u64>,
}

/// Accept and end-to-end latency percentiles, in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencyPair {
    /// Accept latency from the intended send time.
    pub accept: LatencySummary,
    /// Intended send time to the outcome observed.
    pub e2e: LatencySummary,
}

/// One request partition.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionRow {
    /// The partition.
    pub partition: i32,
    /// First decisions of its records.
    pub decided: u64,
    /// Records on it not yet decided (its high watermark past the newest
    /// decided offset); `None` when unknown (no Kafka, or the report).
    pub lag: Option<i64>,
}

/// The ordering skew so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SkewNow {
    /// Decided requests compared.
    pub n: u64,
    /// Fraction of pairs decided out of arrival order.
    pub inversion_ratio: f64,
    /// Winners that arrived after the stock-th request.
    pub late_winners: u64,
    /// Early arrivals that got `sold_out`.
    pub early_losers: u64,
}

/// The audit counters; `None` until the figure can be known (lost and
/// phantom need the end of the run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditNow {
    /// Coupons beyond stock.
    pub oversold: Option<u64>,
    /// Requests issued twice plus coupons beyond a user's limit.
    pub double_issued: Option<u64>,
    /// Accepted, never decided.
    pub lost: Option<u64>,
    /// Decided, never accepted.
    pub phantom: Option<u64>,
    /// Replays disagreeing with the first decision.
    pub inconsistent_replays: Option<u64>,
    /// Outcomes and store disagree on who holds a coupon.
    pub ledger_mismatch: Option<u64>,
    /// Dead-lettered records.
    pub dlq: Option<u64>,
    /// With holds, at the end: ranks issued while held by another request.
    pub rank_conflicts: Option<u64>,
    /// With holds, at the end: requests both claimed and given back.
    pub claimed_and_returned: Option<u64>,
    /// With holds, at the end: hold ends with no hold to end.
    pub orphan_ends: Option<u64>,
    /// With holds, at the end: claims after the deadline, expiries before.
    pub out_of_time: Option<u64>,
    /// With holds, at the end: holds still held past deadline + slack.
    pub stuck: Option<u64>,
    /// With holds, at the end: how far issued − returned + remaining is
    /// from stock.
    pub invariant_off: Option<u64>,
}

/// The holds of an event with a claim window, so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HoldsNow {
    /// Coupons issued as holds.
    pub issued: u64,
    /// Holds not ended yet.
    pub held: u64,
    /// Claimed: placed for good.
    pub claimed: u64,
    /// Cancelled: back in stock.
    pub cancelled: u64,
    /// Expired: back in stock.
    pub expired: u64,
    /// Issues of a rank that had come back.
    pub reissued: u64,
    /// At the end: every coupon issued, the returned ones and what was
    /// left, which must add up to the stock (`issued − returned +
    /// remaining = stock`).
    pub invariant: Option<InvariantNow>,
}

/// The invariant's terms at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InvariantNow {
    /// Every coupon issued.
    pub issued_total: u64,
    /// Cancelled plus expired.
    pub returned: u64,
    /// Stock left.
    pub remaining: u64,
}

/// Everything the page shows at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// `waiting`, `running`, `draining` or `done`.
    pub phase: &'static str,
    /// The run's settings.
    pub config: serde_json::Value,
    /// The event.
    pub event_id: String,
    /// Coupons in the drop.
    pub stock: u32,
    /// Coupons per user.
    pub per_user_limit: u32,
    /// Seconds since the doors opened.
    pub elapsed_s: f64,
    /// Coupons left (the store's figure at the end when audited).
    pub stock_left: u64,
    /// When the last coupon went, ms after the doors opened.
    pub sold_out_after_ms: Option<f64>,
    /// Counts so far.
    pub totals: Totals,
    /// Per-second counts.
    pub series: Vec<Point>,
    /// Latencies over the last [`Snapshot::window_s`] seconds (live only).
    pub window: Option<LatencyPair>,
    /// Length of the latency window.
    pub window_s: f64,
    /// Latencies since the doors opened.
    pub cumulative: LatencyPair,
    /// Per request partition.
    pub partitions: Vec<PartitionRow>,
    /// First decisions by issuer.
    pub issuers: BTreeMap<String, u64>,
    /// Ordering skew so far.
    pub skew: SkewNow,
    /// Arrival vs decision: `[accepted ms, decided ms, 1 if issued]`, after
    /// the doors opened; a sample of at most [`SCATTER_POINTS`].
    pub scatter: Vec<[f64; 3]>,
    /// Of how many points the scatter is a sample.
    pub scatter_of: u64,
    /// The audit.
    pub audit: AuditNow,
    /// The holds (an event with a claim window).
    pub holds: Option<HoldsNow>,
    /// The verdict, at the end.
    pub passed: Option<bool>,
    /// Remarks (the report's notes).
    pub notes: Vec<String>,
    /// Tabs dropped so far for falling behind.
    pub dropped_tabs: u64,
    /// Tabs watching now.
    pub tabs: u64,
}

impl Snapshot {
    /// The page of a finished run, from its report (a merged one too).
    pub fn from_report(r: &Report) -> Snapshot {
        let started = r.started_at;
        let ms = |t: u64| t.saturating_sub(started) as f64 / 1000.0;
        let mut scatter = Vec::new();
        if let Some(raw) = &r.raw {
            let mut seen = HashSet::new();
            for o in &raw.outcomes {
                let o = &o.outcome;
                if o.result != DecisionResult::Duplicate && seen.insert(o.request_id) {
                    scatter.push([
                        ms(o.accepted_at),
                        ms(o.decided_at),
                        f64::from(u8::from(o.result == DecisionResult::Issued)),
                    ]);
                }
            }
        }
        let scatter_of = scatter.len() as u64;
        let failures = |pred: &dyn Fn(&str) -> bool| {
            r.answers
                .iter()
                .filter(|(k, _)| pred(k))
                .map(|(_, v)| v)
                .sum::<u64>()
        };
        let judged = |x: u64| r.observed.then_some(x);
        Snapshot {
            phase: "done",
            config: r.config.clone(),
            event_id: r.event_id.clone(),
            stock: r.stock,
            per_user_limit: r.per_user_limit,
            elapsed_s: r.load_seconds + r.drain_seconds,
            stock_left: match (r.holds.as_ref().and_then(|h| h.remaining), &r.store) {
                (Some(left), _) => left,
                (None, Some(s)) => s.remaining,
                (None, None) => (u64::from(r.stock) + r.holds.as_ref().map_or(0, |h| h.returned))
                    .saturating_sub(r.issued),
            },
            sold_out_after_ms: r.throughput.sold_out_after_ms,
            totals: Totals {
                sent: r.sends,
                accepted: r.accepted,
                decided: r.decided,
                issued: r.issued,
                r503: failures(&|k| k == "503"),
                r4xx: failures(&|k| k.starts_with('4')),
                other_failed: failures(&|k| k != "202" && k != "503" && !k.starts_with('4')),
            },
            series: r
                .throughput
                .series
                .iter()
                .map(|s| Point {
                    t: s.t,
                    accepted: s.accepted,
                    decided: s.decided,
                    issued: s.issued,
                    r503: None,
                    r4xx: None,
                })
                .collect(),
            window: None,
            window_s: 0.0,
            cumulative: LatencyPair {
                accept: r.latency_ms.accept.clone(),
                e2e: r.latency_ms.e2e.clone(),
            },
            partitions: r
                .shares
                .by_partition
                .iter()
                .map(|(p, n)| PartitionRow {
                    partition: *p,
                    decided: *n,
                    lag: None,
                })
                .collect(),
            issuers: r.shares.by_issuer.clone(),
            skew: SkewNow {
                n: r.skew.n,
                inversion_ratio: r.skew.inversion_ratio,
                late_winners: r.skew.late_winners,
                early_losers: r.skew.early_losers,
            },
            scatter: sample(&scatter, SCATTER_POINTS),
            scatter_of,
            audit: AuditNow {
                oversold: judged(r.oversold),
                double_issued: judged(r.double_issued),
                lost: judged(r.lost),
                phantom: judged(r.phantom),
                inconsistent_replays: judged(r.inconsistent_replays),
                ledger_mismatch: judged(r.ledger_mismatch),
                dlq: Some(r.dlq),
                rank_conflicts: r.holds.as_ref().map(|h| h.rank_conflicts),
                claimed_and_returned: r.holds.as_ref().map(|h| h.claimed_and_returned),
                orphan_ends: r.holds.as_ref().map(|h| h.orphan_ends),
                out_of_time: r.holds.as_ref().map(|h| h.out_of_time),
                stuck: r.holds.as_ref().map(|h| h.stuck),
                invariant_off: r.holds.as_ref().map(|h| h.invariant_off),
            },
            holds: r.holds.as_ref().map(|h| HoldsNow {
                issued: h.issued,
                held: h.open + h.stuck,
                claimed: h.claimed,
                cancelled: h.cancelled,
                expired: h.expired,
                reissued: h.reissued,
                invariant: h.remaining.map(|remaining| InvariantNow {
                    issued_total: h.issued_total,
                    returned: h.returned,
                    remaining,
                }),
            }),
            passed: Some(r.passed),
            notes: r.notes.clone(),
            dropped_tabs: 0,
            tabs: 0,
        }
    }

    fn to_json(&self) -> Arc<str> {
        serde_json::to_string(self)
            .expect("a snapshot serialises")
            .into()
    }
}

/// At most `n` of `points`, evenly spaced, the first and last kept.
fn sample<T: Copy>(points: &[T], n: usize) -> Vec<T> {
    if points.len() <= n || n < 2 {
        return points.to_vec();
    }
    let step = (points.len() - 1) as f64 / (n - 1) as f64;
    (0..n)
        .map(|i| points[((i as f64 * step).round() as usize).min(points.len() - 1)])
        .collect()
}

// ---------------------------------------------------------------------------
// The hub: the latest snapshot and the tabs subscribed to the feed.

#[derive(Default)]
struct Hub {
    latest: Mutex<Arc<str>>,
    tabs: Mutex<Vec<mpsc::Sender<Arc<str>>>>,
    dropped: AtomicU64,
    closed: AtomicBool,
}

impl Hub {
    /// Sends `json` to every tab; a tab whose buffer is full is dropped.
    fn publish(&self, json: Arc<str>) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = json.clone();
        self.tabs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|tab| match tab.try_send(json.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    /// A new tab's receiver, primed with the latest snapshot; `None` when
    /// [`MAX_SUBSCRIBERS`] are connected or the page is closing.
    fn subscribe(&self) -> Option<mpsc::Receiver<Arc<str>>> {
        let mut tabs = self.tabs.lock().unwrap_or_else(|e| e.into_inner());
        tabs.retain(|t| !t.is_closed());
        if tabs.len() >= MAX_SUBSCRIBERS || self.closed.load(Ordering::Relaxed) {
            return None;
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let _ = tx.try_send(latest);
        tabs.push(tx);
        Some(rx)
    }

    /// Tabs subscribed now.
    fn watching(&self) -> usize {
        let mut tabs = self.tabs.lock().unwrap_or_else(|e| e.into_inner());
        tabs.retain(|t| !t.is_closed());
        tabs.len()
    }

    /// Ends every tab's stream (a server-sent stream never ends by itself,
    /// and the server's graceful shutdown waits for its connections).
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.tabs.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

// ---------------------------------------------------------------------------
// The server.

/// A running live page.
pub struct Dashboard {
    addr: SocketAddr,
    hub: Arc<Hub>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    board: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

/// What the page needs to know of a run when it starts.
pub struct RunInfo {
    /// The run's settings (shown as they are).
    pub config: serde_json::Value,
    /// The event.
    pub event_id: String,
    /// Its terms.
    pub terms: EventTerms,
    /// Kafka, for the requests topic's watermarks (the partitions' lag);
    /// `None` when outcomes are not watched.
    pub kafka: Option<(KafkaSettings, String)>,
}

impl Dashboard {
    /// Serves the page at `addr` (loopback only: the page has no login).
    pub async fn bind(addr: SocketAddr) -> Result<Dashboard, Error> {
        if !addr.ip().is_loopback() {
            return Err(Error::Dashboard {
                addr,
                problem: "the page has no login, so it is served on loopback only; \
                          use 127.0.0.1:PORT and, from another machine, ssh -L PORT:127.0.0.1:PORT"
                    .into(),
            });
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Dashboard {
                addr,
                problem: format!("{e}; choose another port (0 picks a free one)"),
            })?;
        let addr = listener.local_addr().map_err(|e| Error::Dashboard {
            addr,
            problem: e.to_string(),
        })?;
        let hub = Arc::new(Hub::default());
        hub.publish(
            Snapshot {
                phase: "waiting",
                ..Snapshot::default()
            }
            .to_json(),
        );
        let stop = CancellationToken::new();
        let app = router(hub.clone());
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(Dashboard {
            addr,
            hub,
            stop,
            server,
            board: Mutex::new(None),
        })
    }

    /// Waits until at least one tab is subscribed to the feed, at most
    /// `max` (or until `cancel`); true if one is.
    pub async fn wait_for_tab(&self, max: Duration, cancel: &CancellationToken) -> bool {
        let until = tokio::time::Instant::now() + max;
        loop {
            if self.hub.watching() > 0 {
                return true;
            }
            if cancel.is_cancelled() || tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// The page's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Starts showing a run: returns the feed to hand the driver and the
    /// observer; the page shows it from now on, a snapshot per [`TICK`].
    pub fn begin(&self, run: RunInfo) -> Arc<LiveFeed> {
        let feed = Arc::new(LiveFeed {
            observed: run.kafka.is_some(),
            ..LiveFeed::default()
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(board(run, feed.clone(), self.hub.clone(), stop.clone()));
        if let Some((old, _)) = self
            .board
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((stop, task))
        {
            old.cancel();
        }
        feed
    }

    /// The run ended: the page shows the report's figures from now on.
    pub async fn finish(&self, report: &Report) {
        let board = self.board.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((stop, task)) = board {
            stop.cancel();
            let _ = task.await;
        }
        let mut last = Snapshot::from_report(report);
        last.dropped_tabs = self.hub.dropped.load(Ordering::Relaxed);
        self.hub.publish(last.to_json());
    }

    /// Keeps serving the final page for `linger`, or until `cancel`.
    pub async fn linger(&self, linger: Duration, cancel: &CancellationToken) {
        if linger.is_zero() || cancel.is_cancelled() {
            return;
        }
        println!(
            "the live page stays at {} for {} (Ctrl-C ends it; --dashboard-linger 0s exits at once)",
            self.url(),
            humantime_short(linger)
        );
        tokio::select! {
            _ = tokio::time::sleep(linger) => {}
            _ = cancel.cancelled() => {}
        }
    }

    /// Stops serving: every tab's stream ends, then the server.
    pub async fn stop(self) {
        if let Some((stop, task)) = self.board.lock().unwrap_or_else(|e| e.into_inner()).take() {
            stop.cancel();
            task.abort();
        }
        self.hub.close();
        self.stop.cancel();
        let _ = self.server.await;
    }
}

fn humantime_short(d: Duration) -> String {
    if d.as_secs() >= 60 && d.as_secs() % 60 == 0 {
        format!("{} min", d.as_secs() / 60)
    } else {
        format!("{:?}", d)
    }
}

fn router(hub: Arc<Hub>) -> Router {
    let asset = |body: &'static str, mime: &'static str| {
        move || async move { ([(header::CONTENT_TYPE, mime)], body) }
    };
    Router::new()
        .route("/", get(asset(PAGE_HTML, "text/html; charset=utf-8")))
        .route(
            "/dashboard.js",
            get(asset(PAGE_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/dashboard.css",
            get(asset(PAGE_CSS, "text/css; charset=utf-8")),
        )
        .route("/state", get(state))
        .route("/events", get(events))
        .with_state(hub)
}

async fn state(State(hub): State<Arc<Hub>>) -> Response {
    let latest = hub.latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (
        [(header::CONTENT_TYPE, "application/json")],
        latest.to_string(),
    )
        .into_response()
}

async fn events(State(hub): State<Arc<Hub>>) -> Response {
    let Some(rx) = hub.subscribe() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "too many tabs are watching; close one",
        )
            .into_response();
    };
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|json| (Ok::<_, Infallible>(Event::default().data(&*json)), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

// ---------------------------------------------------------------------------
// The board: raw facts in, a snapshot per tick out.

/// The ticker's state: every figure the page shows, kept up to date from
/// what the feed hands over.
struct Board {
    run: RunInfo,
    opened_at: u64,
    totals: Totals,
    seconds: BTreeMap<u64, Point>,
    accept_cum: Histogram<u64>,
    e2e_cum: Histogram<u64>,
    /// The last [`WINDOW_TICKS`] ticks' histograms, and their sum (kept by
    /// adding the newest and subtracting the one that leaves, so a tick
    /// merges two histograms, not twenty).
    window: VecDeque<(Histogram<u64>, Histogram<u64>)>,
    window_sum: (Histogram<u64>, Histogram<u64>),
    intended: HashMap<Uuid, u64>,
    /// First decisions whose intended send time is not known yet (the
    /// outcome was read before the driver's slot was emptied).
    waiting_e2e: Vec<(Uuid, u64)>,
    first: HashSet<Uuid>,
    ranks: HashMap<Uuid, u32>,
    holders: HashMap<String, u32>,
    issued_twice: u64,
    by_partition: BTreeMap<i32, (u64, i64)>,
    issuers: BTreeMap<String, u64>,
    ordered: Vec<Ordered>,
    skew: SkewNow,
    skew_at: Option<(Instant, usize)>,
    scatter: Vec<[f64; 3]>,
    last_issued_at: Option<u64>,
    dlq: u64,
    holds: LiveHolds,
}

/// The holds as the page follows them: in read order, not the store's,
/// so a figure may lag a record or two behind the ledger.
#[derive(Default)]
struct LiveHolds {
    any: bool,
    /// Request → (rank, user) of each hold issued.
    issued: HashMap<Uuid, (u32, String)>,
    /// Requests whose hold ended.
    ended: HashSet<Uuid>,
    /// Ranks back in stock, not issued again yet.
    back: HashSet<u32>,
    counts: HoldsNow,
}

async fn board(run: RunInfo, feed: Arc<LiveFeed>, hub: Arc<Hub>, stop: CancellationToken) {
    let watermarks = run
        .kafka
        .clone()
        .map(|(kafka, topic)| Watermarks::start(kafka, topic, stop.clone()));
    let mut b = Board {
        run,
        opened_at: 0,
        totals: Totals::default(),
        seconds: BTreeMap::new(),
        accept_cum: latency::histogram(),
        e2e_cum: latency::histogram(),
        window: VecDeque::with_capacity(WINDOW_TICKS + 1),
        window_sum: (latency::histogram(), latency::histogram()),
        intended: HashMap::new(),
        waiting_e2e: Vec::new(),
        first: HashSet::new(),
        ranks: HashMap::new(),
        holders: HashMap::new(),
        issued_twice: 0,
        by_partition: BTreeMap::new(),
        issuers: BTreeMap::new(),
        ordered: Vec::new(),
        skew: SkewNow::default(),
        skew_at: None,
        scatter: Vec::new(),
        last_issued_at: None,
        dlq: 0,
        holds: LiveHolds::default(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (load, decisions) = feed.take();
        b.opened_at = feed.opened_at.load(Ordering::Relaxed);
        b.absorb(load, decisions);
        let lag = watermarks.as_ref().map(Watermarks::get);
        let mut snap = b.snapshot(lag.as_ref());
        if snap.phase == "running" && feed.load_done.load(Ordering::Relaxed) {
            snap.phase = "draining";
        }
        snap.dropped_tabs = hub.dropped.load(Ordering::Relaxed);
        snap.tabs = hub.tabs.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        hub.publish(snap.to_json());
    }
}

impl Board {
    fn second(&mut self, at: u64) -> &mut Point {
        let t = at.saturating_sub(self.opened_at) / 1_000_000;
        self.seconds.entry(t).or_insert_with(|| Point {
            t,
            r503: Some(0),
            r4xx: Some(0),
            ..Point::default()
        })
    }

    fn absorb(&mut self, load: SlotData, decisions: DecisionData) {
        let now = now_micros();
        let (mut accept, mut e2e) = (latency::histogram(), latency::histogram());
        for us in &load.accept_us {
            latency::record(&mut accept, *us);
        }
        self.totals.sent += load.accept_us.len() as u64;
        self.totals.r503 += load.r503;
        self.totals.r4xx += load.r4xx;
        self.totals.other_failed += load.other;
        if self.opened_at > 0 {
            let accepted = load.accepted_count;
            let p = self.second(now);
            p.accepted += accepted;
            *p.r503.get_or_insert(0) += load.r503;
            *p.r4xx.get_or_insert(0) += load.r4xx;
        }
        if self.run.kafka.is_some() {
            self.intended.extend(load.accepted);
            // Distinct requests, as the report counts them: a retry with
            // the same key is the same request.
            self.totals.accepted = self.intended.len() as u64;
        } else {
            self.totals.accepted += load.accepted_count;
        }

        self.dlq += decisions.dlq;
        let stock = self.run.terms.stock;
        for o in decisions.outcomes {
            let oc = &o.outcome;
            if oc.result == DecisionResult::Issued {
                if let Some(rank) = oc.issued_rank {
                    if let Some(prev) = self.ranks.insert(oc.request_id, rank) {
                        if prev != rank {
                            self.issued_twice += 1;
                        }
                    }
                }
            }
            if !self.first.insert(oc.request_id) {
                continue;
            }
            self.totals.decided += 1;
            let issued = oc.result == DecisionResult::Issued;
            {
                let p = self.second(o.observed_at);
                p.decided += 1;
                if issued {
                    p.issued += 1;
                }
            }
            if issued {
                self.totals.issued += 1;
                *self.holders.entry(oc.user_id.clone()).or_default() += 1;
                self.last_issued_at = Some(o.observed_at);
                if let (Some(_), Some(rank)) = (oc.hold_until, oc.issued_rank) {
                    let h = &mut self.holds;
                    h.any = true;
                    h.counts.issued += 1;
                    if h.back.remove(&rank) {
                        h.counts.reissued += 1;
                    }
                    h.issued.insert(oc.request_id, (rank, oc.user_id.clone()));
                }
            }
            let part = self.by_partition.entry(oc.partition).or_insert((0, -1));
            part.0 += 1;
            part.1 = part.1.max(oc.offset);
            *self
                .issuers
                .entry(o.issuer.clone().unwrap_or_else(|| "unknown".into()))
                .or_default() += 1;
            if oc.result != DecisionResult::Duplicate {
                self.ordered.push(Ordered {
                    accepted_at: oc.accepted_at,
                    request_id: oc.request_id,
                    decision_seq: oc.decision_seq,
                    result: oc.result,
                });
                let opened = self.opened_at;
                let ms = move |t: u64| t.saturating_sub(opened) as f64 / 1000.0;
                self.scatter.push([
                    ms(oc.accepted_at),
                    ms(oc.decided_at),
                    f64::from(u8::from(issued)),
                ]);
            }
            self.waiting_e2e.push((oc.request_id, o.observed_at));
        }
        for e in decisions.holds {
            let e = e.hold;
            let h = &mut self.holds;
            h.any = true;
            if !h.ended.insert(e.request_id) {
                continue;
            }
            match e.state {
                couponrush_core::wire::HoldState::Claimed => h.counts.claimed += 1,
                couponrush_core::wire::HoldState::Released => h.counts.cancelled += 1,
                couponrush_core::wire::HoldState::Expired => h.counts.expired += 1,
                couponrush_core::wire::HoldState::Held => {}
            }
            if e.state.returned() {
                h.back.insert(e.issued_rank);
                if let Some(n) = self.holders.get_mut(&e.user_id) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        // End to end needs the intended send time, which the driver hands
        // over at its own pace: match what can be matched, keep the rest.
        let intended = &self.intended;
        self.waiting_e2e
            .retain(|(id, observed_at)| match intended.get(id) {
                Some(i) => {
                    latency::record(&mut e2e, observed_at.saturating_sub(*i));
                    false
                }
                None => true,
            });
        let _ = self.accept_cum.add(&accept);
        let _ = self.e2e_cum.add(&e2e);
        let _ = self.window_sum.0.add(&accept);
        let _ = self.window_sum.1.add(&e2e);
        self.window.push_back((accept, e2e));
        while self.window.len() > WINDOW_TICKS {
            if let Some((a, e)) = self.window.pop_front() {
                let _ = self.window_sum.0.subtract(&a);
                let _ = self.window_sum.1.subtract(&e);
            }
        }
        // The skew is O(n log n): at most once a second, and less often as
        // the drop grows, so it never takes the load's CPU.
        let n = self.ordered.len();
        let due = self.skew_at.is_none_or(|(at, m)| {
            m != n && at.elapsed() >= Duration::from_secs(1) + Duration::from_micros(n as u64 * 5)
        });
        if due {
            let s = skew(&self.ordered, stock);
            self.skew = SkewNow {
                n: s.n,
                inversion_ratio: s.inversion_ratio,
                late_winners: s.late_winners,
                early_losers: s.early_losers,
            };
            self.skew_at = Some((Instant::now(), n));
        }
    }

    fn snapshot(&self, watermarks: Option<&BTreeMap<i32, (i64, i64)>>) -> Snapshot {
        let terms = self.run.terms;
        let now = now_micros();
        let mut partitions: BTreeMap<i32, PartitionRow> = BTreeMap::new();
        for (p, (decided, _)) in &self.by_partition {
            partitions.insert(
                *p,
                PartitionRow {
                    partition: *p,
                    decided: *decided,
                    lag: None,
                },
            );
        }
        if let Some(w) = watermarks {
            for (p, (start, high)) in w {
                let newest = self.by_partition.get(p).map_or(-1, |x| x.1);
                let row = partitions.entry(*p).or_insert(PartitionRow {
                    partition: *p,
                    ..PartitionRow::default()
                });
                row.lag = Some((high - (newest + 1).max(*start)).max(0));
            }
        }
        let stock = u64::from(terms.stock);
        let returned = self.holds.counts.cancelled + self.holds.counts.expired;
        let held_now = self.totals.issued.saturating_sub(returned);
        let over_limit: u64 = self
            .holders
            .values()
            .map(|n| u64::from(n.saturating_sub(terms.per_user_limit)))
            .sum();
        let over_stock = held_now.saturating_sub(stock).max(
            self.ranks
                .values()
                .filter(|r| u64::from(**r) > stock)
                .count() as u64,
        );
        let sold_out = held_now >= stock && stock > 0;
        let series: Vec<Point> = self.seconds.values().cloned().collect();
        Snapshot {
            phase: if self.opened_at == 0 {
                "waiting"
            } else {
                "running"
            },
            config: self.run.config.clone(),
            event_id: self.run.event_id.clone(),
            stock: terms.stock,
            per_user_limit: terms.per_user_limit,
            elapsed_s: if self.opened_at == 0 {
                0.0
            } else {
                now.saturating_sub(self.opened_at) as f64 / 1e6
            },
            stock_left: stock.saturating_sub(held_now),
            sold_out_after_ms: sold_out
                .then(|| {
                    self.last_issued_at
                        .map(|t| t.saturating_sub(self.opened_at) as f64 / 1000.0)
                })
                .flatten(),
            totals: self.totals.clone(),
            series: series[series.len().saturating_sub(SERIES_POINTS)..].to_vec(),
            window: Some(LatencyPair {
                accept: latency::summary(&self.window_sum.0),
                e2e: latency::summary(&self.window_sum.1),
            }),
            window_s: (WINDOW_TICKS as u32 * TICK).as_secs_f64(),
            cumulative: LatencyPair {
                accept: latency::summary(&self.accept_cum),
                e2e: latency::summary(&self.e2e_cum),
            },
            partitions: partitions.into_values().collect(),
            issuers: self.issuers.clone(),
            skew: self.skew.clone(),
            scatter: sample(&self.scatter, SCATTER_POINTS),
            scatter_of: self.scatter.len() as u64,
            audit: AuditNow {
                oversold: Some(over_stock),
                double_issued: Some(self.issued_twice + over_limit),
                lost: None,
                phantom: None,
                inconsistent_replays: None,
                ledger_mismatch: None,
                dlq: Some(self.dlq),
                ..AuditNow::default()
            },
            holds: self.holds.any.then(|| {
                let ended = self
                    .holds
                    .issued
                    .keys()
                    .filter(|id| self.holds.ended.contains(*id))
                    .count() as u64;
                HoldsNow {
                    held: self.holds.counts.issued.saturating_sub(ended),
                    ..self.holds.counts.clone()
                }
            }),
            passed: None,
            notes: Vec::new(),
            dropped_tabs: 0,
            tabs: 0,
        }
    }
}

/// The requests topic's high watermarks, read every half second on a
/// thread of its own (blocking metadata calls), with the ones at the start.
struct Watermarks(Arc<Mutex<BTreeMap<i32, (i64, i64)>>>);

impl Watermarks {
    fn start(kafka: KafkaSettings, topic: String, stop: CancellationToken) -> Watermarks {
        let marks = Arc::new(Mutex::new(BTreeMap::new()));
        let out = marks.clone();
        let _ = std::thread::Builder::new()
            .name("dashboard-lag".into())
            .spawn(move || {
                let Ok(client) = kafka
                    .client_config("coupon-loadgen-dashboard")
                    .create::<BaseConsumer>()
                else {
                    return;
                };
                let timeout = Duration::from_secs(2);
                let Ok(md) = client.fetch_metadata(Some(&topic), timeout) else {
                    return;
                };
                let parts: Vec<i32> = md
                    .topics()
                    .iter()
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect();
                while !stop.is_cancelled() {
                    for p in &parts {
                        if let Ok((_, high)) = client.fetch_watermarks(&topic, *p, timeout) {
                            out.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(*p)
                                .and_modify(|e: &mut (i64, i64)| e.1 = high)
                                .or_insert((high, high));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            });
        Watermarks(marks)
    }

    fn get(&self) -> BTreeMap<i32, (i64, i64)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_drop_waits_for_a_tab_and_no_longer_than_it_was_told() {
        let d = Dashboard::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        // Nobody opens the page: the wait ends at its bound, saying so.
        assert!(!d.wait_for_tab(Duration::from_millis(150), &cancel).await);
        // A tab that comes and goes before the wait does not count.
        drop(d.hub.subscribe());
        assert!(!d.wait_for_tab(Duration::from_millis(150), &cancel).await);
        // A tab that opens the page while the drop waits ends the wait.
        let d = Arc::new(d);
        let waiting = {
            let (d, cancel) = (d.clone(), cancel.clone());
            tokio::spawn(async move { d.wait_for_tab(Duration::from_secs(60), &cancel).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "no tab yet: still waiting");
        let _tab = d.hub.subscribe().expect("room for a tab");
        let opened = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the wait ends once a tab is watching")
            .unwrap();
        assert!(opened);
    }

    #[tokio::test]
    async fn a_tab_that_stops_reading_is_dropped_not_buffered() {
        let hub = Hub::default();
        let mut reading = hub.subscribe().expect("room for a tab");
        let _stuck = hub.subscribe().expect("room for a tab");
        for i in 0..(SUBSCRIBER_BUFFER * 4) {
            hub.publish(format!("{{\"n\":{i}}}").into());
            // The reading tab keeps up.
            while reading.try_recv().is_ok() {}
        }
        assert_eq!(
            hub.tabs.lock().unwrap().len(),
            1,
            "the stuck tab is gone, the reading one stays"
        );
        assert_eq!(hub.dropped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn tabs_are_bounded() {
        let hub = Hub::default();
        let tabs: Vec<_> = (0..MAX_SUBSCRIBERS).map(|_| hub.subscribe()).collect();
        assert!(tabs.iter().all(Option::is_some));
        assert!(hub.subscribe().is_none(), "one tab too many is refused");
        drop(tabs);
        assert!(hub.subscribe().is_some(), "closed tabs free their place");
    }

    #[test]
    fn a_slow_tick_leaves_the_window_when_it_ages_out() {
        // The window's sum is kept by subtraction: its max must fall back
        // when the tick that held the slow answer leaves.
        let (mut sum, mut slow, mut fast) = (
            latency::histogram(),
            latency::histogram(),
            latency::histogram(),
        );
        latency::record(&mut slow, 900_000);
        latency::record(&mut fast, 1_000);
        sum.add(&slow).unwrap();
        sum.add(&fast).unwrap();
        assert_eq!(latency::summary(&sum).max.round(), 900.0);
        sum.subtract(&slow).unwrap();
        let s = latency::summary(&sum);
        assert_eq!((s.count, s.max.round()), (1, 1.0), "{s:?}");
    }

    #[test]
    fn a_sample_keeps_the_ends_and_its_size() {
        let v: Vec<u32> = (0..10_000).collect();
        let s = sample(&v, 100);
        assert_eq!(s.len(), 100);
        assert_eq!((s[0], s[99]), (0, 9_999));
        assert_eq!(sample(&v[..5], 100), v[..5]);
    }
}
