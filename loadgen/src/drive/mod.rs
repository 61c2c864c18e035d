//! Offering load: the three load models over any [`Target`].
//!
//! - **rate** (open loop): request i is *intended* at `start + i / R`; a
//!   worker that is late sends at once, and latency is measured from the
//!   intended time, so a stalled server cannot hide its stall by slowing the
//!   generator down (coordinated omission). The uncorrected figure, from the
//!   actual send, is kept beside it.
//! - **concurrency** (closed loop): C workers, each sending as soon as its
//!   previous request is answered.
//! - **burst**: every request is intended at the same instant, the doors
//!   opening; `connections` workers push them through as fast as they can.
//!
//! Every run is bounded by a request count and a duration and stops by itself
//! (or on the cancellation token). Workers keep their own counts and merge
//! them at the end; they record latencies into at most [`TIMING_SHARDS`]
//! sets of histograms, a worker always the same set, and share nothing else
//! on the hot path but the next request's index and two atomic counters for
//! the progress bar.

pub mod direct;
pub mod holders;
pub mod http;
pub mod line;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use couponrush_core::wire::now_micros;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::measure::latency;
use crate::population::{Population, Retry};

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "model", content = "value")]
pub enum LoadModel {
    /// Open loop at this many requests per second.
    Rate(f64),
    /// Closed loop with this many requests in flight.
    Concurrency(usize),
    /// All requests released at one instant.
    Burst,
}

impl fmt::Display for LoadModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadModel::Rate(r) => write!(f, "rate {r}/s"),
            LoadModel::Concurrency(c) => write!(f, "concurrency {c}"),
            LoadModel::Burst => f.write_str("burst"),
        }
    }
}

/// The answer to one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Accepted (`202`), with the api's accept timestamp.
    Accepted {
        /// µs since the epoch.
        accepted_at: u64,
        /// The request id the system decides it under (the api's answer is
        /// authoritative: it scopes the client's key by event and user).
        request_id: Uuid,
    },
    /// In doubt: the request may have been written, and then it will be
    /// decided (the api's `503 unacknowledged`, which names the request; an
    /// answer lost to a timeout or a broken connection after the request
    /// was sent, whose id the key gives). Neither accepted nor refused: the
    /// audit does not count it lost if undecided, nor phantom if decided.
    InDoubt {
        /// The kind of answer (`503`, `timeout`, `io`...), counted as for
        /// `Failed`.
        kind: String,
        /// The request it may have become.
        request_id: Uuid,
    },
    /// Not accepted; the kind (`503`, `timeout`, `connect`...) is counted.
    Failed(String),
}

/// Something requests can be sent to: one connection's worth.
pub trait Target: Send + 'static {
    /// Sends one issue request for `user` with id `key` to `event`.
    fn send(
        &mut self,
        event: &str,
        user: &str,
        key: Uuid,
    ) -> impl std::future::Future<Output = Sent> + Send;
}

/// Makes targets, one per worker (and one more per worker for concurrent retries).
pub trait TargetFactory: Send + Sync + 'static {
    /// The target type.
    type T: Target;
    /// A new target.
    fn make(&self) -> Self::T;
}

/// What to offer.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// The event.
    pub event_id: String,
    /// The load model.
    pub model: LoadModel,
    /// Logical requests to send at most (retries not counted).
    pub requests: u64,
    /// Stop sending after this long.
    pub duration: Duration,
    /// Workers for rate and burst (for concurrency, the concurrency).
    pub connections: usize,
    /// Users and retries.
    pub population: Population,
}

/// One accepted request, as the load generator saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptance {
    /// Its user.
    pub user_id: String,
    /// The api's accept time of the first `202` (arrival order).
    pub accepted_at: u64,
    /// When the load generator intended to send it (µs since the epoch).
    pub intended_at: u64,
}

/// What the driver measured.
#[derive(Debug)]
pub struct Driven {
    /// When sending started, µs since the epoch.
    pub started_at: u64,
    /// When the last answer came, µs since the epoch.
    pub finished_at: u64,
    /// Sends, retries included.
    pub sends: u64,
    /// Logical requests started.
    pub requests: u64,
    /// Accepted requests by id.
    pub accepted: HashMap<Uuid, Acceptance>,
    /// Answers by kind (`202`, `503`, `timeout`...).
    pub answers: BTreeMap<String, u64>,
    /// Requests in doubt ([`Sent::InDoubt`]) that no later send of the
    /// same request had accepted.
    pub in_doubt: HashSet<Uuid>,
    /// Accept latency from the intended send time (corrected).
    pub accept: Histogram<u64>,
    /// Accept latency from the actual send time (uncorrected).
    pub accept_uncorrected: Histogram<u64>,
}

/// Live counters for the progress bar.
#[derive(Default)]
pub struct Progress {
    /// Sends completed.
    pub sent: AtomicU64,
    /// `202`s received.
    pub accepted: AtomicU64,
    /// The live page's feed, when one watches (`--dashboard`): each worker
    /// hands it every answer through a slot of its own.
    pub live: Option<Arc<crate::dashboard::LiveFeed>>,
}

/// Sets of latency histograms a run's workers record into, at most: worker
/// `i` records into set `i % TIMING_SHARDS` (with 1,024 workers, 64 share
/// a set), holding its lock for one record and never across an `.await`.
///
/// A histogram of the full range (1 µs to 1 h, 3 significant digits) is
/// about 190 KB, zeroed. One set per worker made 1,024 workers allocate
/// 577 MB at their first poll: about 0.5 s of CPU at the very start of a
/// run, during which the generator sent nothing, then sent what it owed as
/// one burst (the `overload` scenario's half-load phase shed that burst
/// with 503s; docs/RELIABILITY.md).
pub const TIMING_SHARDS: usize = 16;

/// One set of latency histograms.
struct Timings {
    accept: Histogram<u64>,
    /// The uncorrected latency is recorded only where it differs from the
    /// corrected one: a closed loop sends when it intends to, so it records
    /// one value per answer instead of two on its hot path (an open loop,
    /// whose sends are late more often than not, records three). Here the
    /// uncorrected values that differ, and in `corrected_differing` the
    /// corrected values they stand for. See [`Timings::uncorrected`].
    uncorrected_differing: Histogram<u64>,
    corrected_differing: Histogram<u64>,
}

impl Timings {
    fn new() -> Self {
        Self {
            accept: latency::histogram(),
            uncorrected_differing: latency::histogram(),
            corrected_differing: latency::histogram(),
        }
    }

    /// Records one answer: `accept_us` from the intended send,
    /// `uncorrected_us` from the actual one.
    fn record(&mut self, accept_us: u64, uncorrected_us: u64) {
        latency::record(&mut self.accept, accept_us);
        if uncorrected_us != accept_us {
            latency::record(&mut self.corrected_differing, accept_us);
            latency::record(&mut self.uncorrected_differing, uncorrected_us);
        }
    }

    /// The uncorrected latencies: the corrected ones, with the values that
    /// differ replaced.
    fn uncorrected(&self) -> Histogram<u64> {
        // Cannot fail: `corrected_differing` holds a part of `accept`'s
        // values, recorded the same way, and all three share their bounds.
        let mut u = self.accept.clone();
        let subtracted = u.subtract(&self.corrected_differing);
        debug_assert!(subtracted.is_ok(), "{subtracted:?}");
        let added = u.add(&self.uncorrected_differing);
        debug_assert!(added.is_ok(), "{added:?}");
        u
    }
}

/// The sets of histograms a run's workers share ([`TIMING_SHARDS`]).
struct SharedTimings(Vec<Mutex<Timings>>);

impl SharedTimings {
    fn new(workers: usize) -> Self {
        Self(
            (0..workers.clamp(1, TIMING_SHARDS))
                .map(|_| Mutex::new(Timings::new()))
                .collect(),
        )
    }

    /// Worker `worker`'s set. A worker that panicked while holding it left
    /// whole values behind (a record is two plain additions): use them.
    fn of(&self, worker: usize) -> MutexGuard<'_, Timings> {
        self.0[worker % self.0.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

struct WorkerOut {
    sends: u64,
    accepted_count: u64,
    requests: u64,
    /// In fixed-size chunks: growing one vector would copy it at every
    /// doubling, on the hot path.
    accepted: Vec<Vec<(Uuid, Acceptance)>>,
    answers: BTreeMap<String, u64>,
    in_doubt: Vec<Uuid>,
}

/// Drives `plan` against targets from `factory` until done, `plan.duration`
/// passes, or `cancel`.
pub async fn drive<F: TargetFactory>(
    factory: Arc<F>,
    plan: LoadPlan,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Driven {
    let workers = match plan.model {
        LoadModel::Concurrency(c) => c,
        LoadModel::Rate(_) | LoadModel::Burst => plan.connections,
    }
    .clamp(1, plan.requests.max(1) as usize);
    let next = Arc::new(AtomicU64::new(0));
    // Made before the clock starts: nothing is owed while they are made.
    let timings = Arc::new(SharedTimings::new(workers));
    let start = Instant::now();
    let start_micros = now_micros();
    if let Some(live) = &progress.live {
        live.opened(start_micros);
    }
    let plan = Arc::new(plan);
    let mut tasks = Vec::with_capacity(workers);
    for worker_index in 0..workers {
        let timings = timings.clone();
        let factory = factory.clone();
        let plan = plan.clone();
        let next = next.clone();
        let progress = progress.clone();
        let cancel = cancel.clone();
        tasks.push(tokio::spawn(async move {
            worker(
                &*factory,
                &plan,
                (&timings, worker_index),
                &next,
                (start, start_micros),
                &progress,
                &cancel,
            )
            .await
        }));
    }
    let mut driven = Driven {
        started_at: start_micros,
        finished_at: start_micros,
        sends: 0,
        requests: 0,
        accepted: HashMap::new(),
        answers: BTreeMap::new(),
        in_doubt: HashSet::new(),
        accept: latency::histogram(),
        accept_uncorrected: latency::histogram(),
    };
    let mut outs = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(out) = t.await {
            outs.push(out);
        }
    }
    // The load ended with the last worker; merging what they recorded is
    // bookkeeping and must not count as load time.
    driven.finished_at = now_micros();
    for set in &timings.0 {
        let set = set.lock().unwrap_or_else(|e| e.into_inner());
        let _ = driven.accept.add(&set.accept);
        let _ = driven.accept_uncorrected.add(set.uncorrected());
    }
    for out in outs {
        driven.sends += out.sends;
        driven.requests += out.requests;
        for (k, v) in out.answers {
            *driven.answers.entry(k).or_default() += v;
        }
        driven
            .accepted
            .reserve(out.accepted.iter().map(Vec::len).sum());
        for (id, a) in out.accepted.into_iter().flatten() {
            driven
                .accepted
                .entry(id)
                .and_modify(|e| e.accepted_at = e.accepted_at.min(a.accepted_at))
                .or_insert(a);
        }
        driven.in_doubt.extend(out.in_doubt);
    }
    // A retry that was accepted settles the doubt.
    let accepted = &driven.accepted;
    driven.in_doubt.retain(|id| !accepted.contains_key(id));
    driven
}

/// Acceptances per chunk of a worker's record.
const ACCEPTED_CHUNK: usize = 4096;

/// How many sends a worker makes between updates of the shared progress.
const PROGRESS_EVERY: u64 = 64;

async fn worker<F: TargetFactory>(
    factory: &F,
    plan: &LoadPlan,
    (timings, worker_index): (&SharedTimings, usize),
    next: &AtomicU64,
    // The run's start, by the monotonic clock and in µs since the epoch.
    (start, start_micros): (Instant, u64),
    progress: &Progress,
    cancel: &CancellationToken,
) -> WorkerOut {
    let mut out = WorkerOut {
        sends: 0,
        accepted_count: 0,
        requests: 0,
        accepted: Vec::new(),
        answers: BTreeMap::new(),
        in_doubt: Vec::new(),
    };
    let live = progress.live.as_ref().map(|l| l.slot());
    let mut target = factory.make();
    let mut twin: Option<F::T> = None;
    let mut reported = (0u64, 0u64);
    let deadline = start + plan.duration;
    // The last answer's time: the clock is read three times per send (its
    // start, the timeout's, its answer), not once more per check.
    let mut now = Instant::now();
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= plan.requests || now >= deadline || cancel.is_cancelled() {
            break;
        }
        // A closed loop sends as soon as it can: its intended time is the
        // first send's own.
        let planned = match plan.model {
            LoadModel::Rate(r) => Some(start + Duration::from_secs_f64(index as f64 / r)),
            LoadModel::Burst => Some(start),
            LoadModel::Concurrency(_) => None,
        };
        if let Some(planned) = planned {
            if planned > deadline {
                break;
            }
            if planned > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(planned) => {}
                    _ = cancel.cancelled() => break,
                }
            }
        }
        let user = plan.population.user(index);
        let key = Uuid::now_v7();
        out.requests += 1;
        let record =
            |out: &mut WorkerOut, sent: Sent, intended: Instant, t: Timed, user: String| {
                out.sends += 1;
                let intended_at = start_micros + intended.duration_since(start).as_micros() as u64;
                let accept_us = t.done.duration_since(intended).as_micros() as u64;
                let uncorrected_us = t.done.duration_since(t.sent_at).as_micros() as u64;
                timings.of(worker_index).record(accept_us, uncorrected_us);
                if let Some(slot) = &live {
                    slot.record(accept_us, &sent, intended_at);
                }
                match sent {
                    Sent::Accepted {
                        accepted_at,
                        request_id,
                    } => {
                        out.accepted_count += 1;
                        if out.accepted.last().is_none_or(|c| c.len() == c.capacity()) {
                            out.accepted.push(Vec::with_capacity(ACCEPTED_CHUNK));
                        }
                        let chunk = out.accepted.last_mut().expect("pushed above");
                        chunk.push((
                            request_id,
                            Acceptance {
                                user_id: user,
                                accepted_at,
                                intended_at,
                            },
                        ));
                    }
                    Sent::InDoubt { kind, request_id } => {
                        out.in_doubt.push(request_id);
                        *out.answers.entry(kind).or_default() += 1;
                    }
                    Sent::Failed(kind) => *out.answers.entry(kind).or_default() += 1,
                }
            };
        match plan.population.retry(index) {
            Retry::None => {
                let (sent, t) = timed(&mut target, &plan.event_id, &user, key).await;
                record(&mut out, sent, planned.unwrap_or(t.sent_at), t, user);
                now = t.done;
            }
            Retry::Sequential => {
                let (a, at) = timed(&mut target, &plan.event_id, &user, key).await;
                let (b, bt) = timed(&mut target, &plan.event_id, &user, key).await;
                let intended = planned.unwrap_or(at.sent_at);
                record(&mut out, a, intended, at, user.clone());
                record(&mut out, b, intended, bt, user);
                now = bt.done;
            }
            Retry::Concurrent => {
                let t2 = twin.get_or_insert_with(|| factory.make());
                let ((a, at), (b, bt)) = tokio::join!(
                    timed(&mut target, &plan.event_id, &user, key),
                    timed(t2, &plan.event_id, &user, key)
                );
                let intended = planned.unwrap_or(at.sent_at.min(bt.sent_at));
                record(&mut out, a, intended, at, user.clone());
                record(&mut out, b, intended, bt, user);
                now = at.done.max(bt.done);
            }
        }
        // The progress bar's counters are shared between workers: touch
        // them every few sends, not on every one.
        if out.sends - reported.0 >= PROGRESS_EVERY {
            reported = report_progress(progress, &out, reported);
        }
    }
    report_progress(progress, &out, reported);
    if out.accepted_count > 0 {
        out.answers.insert("202".into(), out.accepted_count);
    }
    out
}

/// Adds what `out` did since `reported` (sends, acceptances) to the shared
/// progress; returns the new mark.
fn report_progress(progress: &Progress, out: &WorkerOut, reported: (u64, u64)) -> (u64, u64) {
    progress
        .sent
        .fetch_add(out.sends - reported.0, Ordering::Relaxed);
    progress
        .accepted
        .fetch_add(out.accepted_count - reported.1, Ordering::Relaxed);
    (out.sends, out.accepted_count)
}

/// When one send started and when its answer came.
#[derive(Debug, Clone, Copy)]
struct Timed {
    sent_at: Instant,
    done: Instant,
}

async fn timed<T: Target>(target: &mut T, event: &str, user: &str, key: Uuid) -> (Sent, Timed) {
    let sent_at = Instant::now();
    let sent = target.send(event, user, key).await;
    let done = Instant::now();
    (sent, Timed { sent_at, done })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::population::UserDist;
    use std::sync::Mutex;

    /// Accepts everything after `delay`, recording the keys it saw.
    struct Fake {
        delay: Duration,
        seen: Arc<Mutex<Vec<Uuid>>>,
    }
    impl Target for Fake {
        async fn send(&mut self, _event: &str, _user: &str, key: Uuid) -> Sent {
            tokio::time::sleep(self.delay).await;
            self.seen.lock().unwrap().push(key);
            Sent::Accepted {
                accepted_at: now_micros(),
                request_id: key,
            }
        }
    }
    struct FakeFactory(Duration, Arc<Mutex<Vec<Uuid>>>);
    impl TargetFactory for FakeFactory {
        type T = Fake;
        fn make(&self) -> Fake {
            Fake {
                delay: self.0,
                seen: self.1.clone(),
            }
        }
    }

    /// The first send of each key goes unanswered (in doubt); a second is
    /// accepted.
    struct Doubtful(Arc<Mutex<HashSet<Uuid>>>);
    impl Target for Doubtful {
        async fn send(&mut self, _event: &str, _user: &str, key: Uuid) -> Sent {
            if self.0.lock().unwrap().insert(key) {
                return Sent::InDoubt {
                    kind: "timeout".into(),
                    request_id: key,
                };
            }
            Sent::Accepted {
                accepted_at: now_micros(),
                request_id: key,
            }
        }
    }
    impl TargetFactory for Doubtful {
        type T = Doubtful;
        fn make(&self) -> Doubtful {
            Doubtful(self.0.clone())
        }
    }

    #[tokio::test]
    async fn a_request_in_doubt_stays_so_until_a_retry_is_accepted() {
        let d = drive(
            Arc::new(Doubtful(Arc::default())),
            plan(LoadModel::Concurrency(4), 200, 0.5),
            Arc::default(),
            CancellationToken::new(),
        )
        .await;
        assert!(!d.accepted.is_empty() && !d.in_doubt.is_empty(), "{d:?}");
        assert_eq!(d.accepted.len() + d.in_doubt.len(), 200);
        assert!(d.in_doubt.iter().all(|id| !d.accepted.contains_key(id)));
        assert_eq!(d.answers["timeout"], 200, "every first send");
    }

    fn plan(model: LoadModel, requests: u64, retry: f64) -> LoadPlan {
        LoadPlan {
            event_id: "e".into(),
            model,
            requests,
            duration: Duration::from_secs(30),
            connections: 8,
            population: Population::new(50, UserDist::Uniform, retry, 9),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_workers_share_a_few_histogram_sets_and_every_answer_is_counted() {
        assert_eq!(SharedTimings::new(1000).0.len(), TIMING_SHARDS);
        assert_eq!(SharedTimings::new(3).0.len(), 3);
        let factory = Arc::new(FakeFactory(Duration::from_millis(5), Arc::default()));
        let d = drive(
            factory,
            LoadPlan {
                connections: 1000,
                ..plan(LoadModel::Rate(2000.0), 3000, 0.0)
            },
            Arc::default(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(d.sends, 3000);
        // Every set is merged: each worker's answers are in the figures.
        assert_eq!(d.accept.len(), 3000);
        assert_eq!(d.accept_uncorrected.len(), 3000);
        assert!(
            d.accept_uncorrected.min() >= 5000,
            "{}",
            d.accept_uncorrected.min()
        );
    }

    #[tokio::test]
    async fn sends_exactly_the_planned_requests_and_retries_reuse_the_key() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let factory = Arc::new(FakeFactory(Duration::from_millis(1), seen.clone()));
        let d = drive(
            factory,
            plan(LoadModel::Concurrency(4), 200, 0.5),
            Arc::default(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(d.requests, 200);
        assert_eq!(d.accepted.len(), 200, "retries are the same request");
        assert!(d.sends > 250 && d.sends < 350, "{} sends", d.sends);
        assert_eq!(seen.lock().unwrap().len() as u64, d.sends);
        assert_eq!(d.answers["202"], d.sends);
        assert_eq!(d.accept.len(), d.sends);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_latency_is_measured_from_the_intended_time() {
        // 100/s for 1 s, but each answer takes 50 ms on 1 worker: the worker
        // falls behind and the corrected latency grows, the uncorrected does not.
        let factory = Arc::new(FakeFactory(Duration::from_millis(50), Arc::default()));
        let mut p = plan(LoadModel::Rate(100.0), 100, 0.0);
        p.connections = 1;
        let d = drive(factory, p, Arc::default(), CancellationToken::new()).await;
        assert_eq!(d.requests, 100);
        let corrected = latency::summary(&d.accept);
        let uncorrected = latency::summary(&d.accept_uncorrected);
        assert!(uncorrected.max < 60.0, "{uncorrected:?}");
        assert!(uncorrected.p50 >= 50.0, "{uncorrected:?}");
        assert!(corrected.max > 4000.0, "{corrected:?}");
        assert_eq!(d.accept_uncorrected.len(), d.accept.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_loop_sends_when_intended_and_each_send_is_timed_alone() {
        // Every request sent twice, one after the other or at once, each
        // send answered in 50 ms: a send's own latency is 50 ms (the first
        // of two in a row is not charged for the second), and the request's,
        // from the first send, 50 or 100 ms.
        let factory = Arc::new(FakeFactory(Duration::from_millis(50), Arc::default()));
        let d = drive(
            factory,
            plan(LoadModel::Concurrency(2), 40, 1.0),
            Arc::default(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(d.sends, 80);
        assert_eq!(d.accept_uncorrected.len(), 80);
        assert_eq!(d.accept.len(), 80);
        let own = latency::summary(&d.accept_uncorrected);
        assert!(own.p50 >= 50.0 && own.max < 55.0, "{own:?}");
        let corrected = latency::summary(&d.accept);
        assert!(
            corrected.max >= 100.0 && corrected.max < 105.0,
            "{corrected:?}"
        );

        // Without retries a closed loop's corrected and uncorrected
        // latencies are the same figures.
        let factory = Arc::new(FakeFactory(Duration::from_millis(5), Arc::default()));
        let d = drive(
            factory,
            plan(LoadModel::Concurrency(2), 40, 0.0),
            Arc::default(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(d.accept, d.accept_uncorrected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_stops_at_its_duration() {
        let factory = Arc::new(FakeFactory(Duration::from_millis(10), Arc::default()));
        let mut p = plan(LoadModel::Concurrency(1), u64::MAX, 0.0);
        p.duration = Duration::from_secs(1);
        let d = drive(factory, p, Arc::default(), CancellationToken::new()).await;
        assert!(d.requests <= 101 && d.requests >= 90, "{}", d.requests);
    }
}
