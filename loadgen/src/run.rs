//! One drop, start to finish: set up the event, start watching outcomes,
//! offer the load, wait for the last decisions, audit the store, report.
//!
//! A drop with holds ([`run_drop_with_holds`]) also creates the event with
//! its claim window, acts for the winners as they are observed
//! ([`crate::drive::holders`]), and after the last decision waits for every
//! hold to end (its deadline plus the slack, bounded) before it reads the
//! event's `remaining` and audits: every coupon claimed or back in stock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::{EventSpec, Ledger, Store};
use couponrush_core::wire::now_micros;
use couponrush_core::Topics;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::dashboard::{Dashboard, RunInfo};
use crate::drive::direct::DirectFactory;
use crate::drive::holders::{HoldPlan, Holders, WINNERS_BUFFER};
use crate::drive::http::{self, Endpoint, EventSetup, HttpFactory, Pool};
use crate::drive::{drive, Driven, LoadPlan, Progress};
use crate::measure::audit::{AuditEnd, EventTerms};
use crate::observe::{DecidedCount, Observer, Watch};
use crate::report::{Facts, Report};
use crate::Error;

/// How requests reach the system.
pub enum Via {
    /// Over HTTP to the api.
    Http {
        /// The api.
        endpoint: Endpoint,
        /// Admin token for the event setup.
        admin_token: Option<String>,
        /// Per-request timeout.
        timeout: Duration,
    },
    /// Produced straight to the requests topic.
    Direct {
        /// The producer (with its partitioner).
        producer: Arc<RequestProducer>,
    },
}

/// One drop to run.
pub struct DropRun {
    /// Where requests go.
    pub via: Via,
    /// Kafka, for watching outcomes.
    pub kafka: KafkaSettings,
    /// Topic names.
    pub topics: Topics,
    /// The store, for the audit (and the setup with `Via::Direct`).
    pub store: Option<Arc<dyn Store>>,
    /// Create or reset the event first (false: it exists; several generators).
    pub setup: bool,
    /// With `setup`: buckets the event's stock is split over (1: none).
    pub stock_buckets: u32,
    /// Stock and limit to set up.
    pub terms: EventTerms,
    /// The load.
    pub plan: LoadPlan,
    /// How long to wait for the last decisions after the load.
    pub drain_timeout: Duration,
    /// Show a progress bar.
    pub progress: bool,
    /// Keep raw data in the report.
    pub keep_raw: bool,
    /// The settings, for the report.
    pub config: serde_json::Value,
    /// Watch outcomes and audit (false: offer load only, judge nothing).
    pub observe: bool,
}

/// Runs `drop` and reports; `cancel` stops the load early (the drain and
/// audit still run).
pub async fn run_drop(drop: DropRun, cancel: CancellationToken) -> Result<Report, Error> {
    run_drop_live(drop, None, cancel).await
}

/// [`run_drop`], shown live on `dashboard` when given: the page follows
/// the drop as it runs and shows the report's figures at the end.
pub async fn run_drop_live(
    drop: DropRun,
    dashboard: Option<&Dashboard>,
    cancel: CancellationToken,
) -> Result<Report, Error> {
    run_drop_with_holds(drop, None, dashboard, cancel).await
}

/// [`run_drop_live`] of an event with holds when `holds` is given: the
/// winners claim, cancel or never claim as `holds` says.
pub async fn run_drop_with_holds(
    drop: DropRun,
    holds: Option<HoldPlan>,
    dashboard: Option<&Dashboard>,
    cancel: CancellationToken,
) -> Result<Report, Error> {
    let event = drop.plan.event_id.clone();
    if let Some(plan) = &holds {
        plan.validate().map_err(|expected| Error::BadFlag {
            flag: "--claim-window",
            expected,
        })?;
        if matches!(drop.via, Via::Direct { .. }) {
            return Err(Error::BadFlag {
                flag: "--claim-window",
                expected: "needs the api: claims and cancels are its routes (leave out --direct)",
            });
        }
        if !drop.observe {
            return Err(Error::BadFlag {
                flag: "--claim-window",
                expected: "needs the outcomes watched: the winners are learned from them (leave out --no-observe)",
            });
        }
    }
    let terms = setup(&drop, holds.as_ref()).await?;
    let live = dashboard.map(|d| {
        d.begin(RunInfo {
            config: drop.config.clone(),
            event_id: event.clone(),
            terms,
            kafka: drop
                .observe
                .then(|| (drop.kafka.clone(), drop.topics.requests.clone())),
        })
    });

    let (winners, holders_rx) = match holds {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::channel(WINNERS_BUFFER);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let observer = if drop.observe {
        let (kafka, topics, event) = (drop.kafka.clone(), drop.topics.clone(), event.clone());
        let watch = Watch {
            live: live.clone(),
            winners,
        };
        let observer = tokio::task::spawn_blocking(move || {
            Observer::start_watching(&kafka, &topics, &event, watch)
        })
        .await?
        .map_err(|source| Error::Kafka {
            doing: "watch the outcomes",
            brokers: drop.kafka.brokers.clone(),
            source,
        })?;
        Some(observer)
    } else {
        None
    };

    let holders = match (holds, holders_rx, &drop.via) {
        (
            Some(plan),
            Some(rx),
            Via::Http {
                endpoint, timeout, ..
            },
        ) => {
            let pool = Arc::new(Pool::new(
                HttpFactory {
                    endpoint: endpoint.clone(),
                    timeout: *timeout,
                },
                plan.connections,
            ));
            Some(Holders::start(
                plan,
                pool,
                event.clone(),
                rx,
                cancel.clone(),
            ))
        }
        _ => None,
    };
    let progress = Arc::new(Progress {
        live,
        ..Progress::default()
    });
    let display = drop.progress.then(|| {
        ProgressDisplay::start(
            progress.clone(),
            observer.as_ref().map(Observer::decided_count),
            drop.plan.requests,
        )
    });
    let driven: Driven = match &drop.via {
        Via::Http {
            endpoint, timeout, ..
        } => {
            let factory = Arc::new(HttpFactory {
                endpoint: endpoint.clone(),
                timeout: *timeout,
            });
            drive(factory, drop.plan.clone(), progress.clone(), cancel.clone()).await
        }
        Via::Direct { producer } => {
            let factory = Arc::new(DirectFactory {
                producer: producer.clone(),
            });
            drive(factory, drop.plan.clone(), progress.clone(), cancel.clone()).await
        }
    };
    let load_finished_at = driven.finished_at;
    if let Some(live) = &progress.live {
        live.load_finished();
    }
    let mut undecided = 0;
    let mut open_holds = 0;
    if let Some(observer) = &observer {
        let ids: HashSet<_> = driven.accepted.keys().copied().collect();
        undecided = observer.wait_for(&ids, drop.drain_timeout).await;
        if let Some(plan) = &holds {
            // Every hold ends by its deadline (claimed, cancelled or swept):
            // wait for the last one, and a bounded while more at most.
            open_holds = observer
                .wait_for_holds(plan.slack, plan.claim_window + plan.slack * 2)
                .await;
        }
        // A little longer, so late replays of the last batches are seen too.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(display) = display {
        display.finish().await;
    }
    let finished_at = now_micros();
    let requests_from = observer.as_ref().map(Observer::requests_from);
    // The observer's end closes the winners' channel: the holders finish.
    let observations = observer.map(Observer::finish).unwrap_or_default();
    let hold_actions = match holders {
        Some(h) => Some(h.finish().await),
        None => None,
    };

    let mut notes = Vec::new();
    let mut end = None;
    if let (Some(plan), Via::Http { endpoint, .. }) = (&holds, &drop.via) {
        if open_holds > 0 {
            notes.push(format!(
                "{open_holds} holds had not ended {:?} past their deadline",
                plan.slack
            ));
        }
        let issued_any = observations
            .outcomes
            .iter()
            .any(|o| o.outcome.result == couponrush_core::DecisionResult::Issued);
        if issued_any
            && observations
                .outcomes
                .iter()
                .all(|o| o.outcome.hold_until.is_none())
        {
            notes.push(
                "coupons were issued without a claim window: does the api know claim_window_ms?"
                    .into(),
            );
        }
        let info = http::get_event(endpoint, &event).await?;
        if info.remaining.is_none() {
            notes.push(
                "the api did not show remaining: the invariant is checked against the store".into(),
            );
        }
        end = Some(AuditEnd {
            at: now_micros(),
            remaining: info.remaining.map(u64::from),
            slack_us: plan.slack.as_micros() as u64,
        });
    }
    if undecided > 0 {
        notes.push(format!(
            "{undecided} accepted requests were still undecided after the {:?} drain (counted as lost)",
            drop.drain_timeout
        ));
    }
    if observations.unparsable > 0 {
        notes.push(format!(
            "{} outcome records did not parse",
            observations.unparsable
        ));
    }
    let ledger = match &drop.store {
        Some(store) if drop.observe => audit_ledger(&**store, &event).await?,
        _ => None,
    };
    // Requests in doubt settled against the log: one that was written must
    // be decided, like any accepted request.
    let mut in_doubt_written = HashMap::new();
    if let (Some(from), false) = (requests_from, driven.in_doubt.is_empty()) {
        let (kafka, topic, ids) = (
            drop.kafka.clone(),
            drop.topics.requests.clone(),
            driven.in_doubt.clone(),
        );
        match tokio::task::spawn_blocking(move || {
            crate::observe::written_requests(&kafka, &topic, &from, &ids, Duration::from_secs(30))
        })
        .await?
        {
            Ok(found) => in_doubt_written = found,
            Err(e) => notes.push(format!(
                "the {} requests in doubt could not be settled against the requests topic ({e}): \
                 those never decided are not judged",
                driven.in_doubt.len()
            )),
        }
    }
    let facts = Facts {
        config: drop.config,
        event_id: event,
        terms,
        started_at: driven.started_at,
        load_finished_at,
        finished_at,
        requests: driven.requests,
        sends: driven.sends,
        answers: driven.answers,
        accepted: driven.accepted,
        in_doubt: driven.in_doubt,
        in_doubt_written,
        outcomes: observations.outcomes,
        holds: observations.holds,
        hold_actions,
        end,
        dlq: observations.dlq,
        ledger,
        accept: driven.accept,
        accept_uncorrected: driven.accept_uncorrected,
        notes,
        observed: drop.observe,
    };
    let report = Report::build(facts, drop.keep_raw);
    if let Some(d) = dashboard {
        d.finish(&report).await;
    }
    Ok(report)
}

/// Reads the event's ledger, retrying a store that is reconnecting (a
/// restarted Redis breaks the first call on the old connection).
pub(crate) async fn audit_ledger(store: &dyn Store, event: &str) -> Result<Option<Ledger>, Error> {
    let mut attempt = 0;
    loop {
        match store.ledger(event).await {
            Ok(l) => return Ok(l),
            Err(e) if e.is_transient() && attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(source) => {
                return Err(Error::Store {
                    doing: "auditing the event",
                    source,
                })
            }
        }
    }
}

async fn setup(drop: &DropRun, holds: Option<&HoldPlan>) -> Result<EventTerms, Error> {
    let event = &drop.plan.event_id;
    let spec = EventSpec {
        stock: drop.terms.stock,
        per_user_limit: drop.terms.per_user_limit,
        claim_window_us: 0,
        stock_buckets: drop.stock_buckets,
    };
    match (&drop.via, drop.setup, &drop.store) {
        (
            Via::Http {
                endpoint,
                admin_token,
                ..
            },
            true,
            _,
        ) => {
            let e = http::define_event(
                endpoint,
                event,
                EventSetup {
                    stock: spec.stock,
                    per_user_limit: spec.per_user_limit,
                    claim_window: holds.map(|h| h.claim_window),
                    stock_buckets: spec.stock_buckets,
                },
                admin_token.as_deref(),
            )
            .await?;
            Ok(EventTerms {
                stock: e.stock,
                per_user_limit: e.per_user_limit,
            })
        }
        (Via::Http { endpoint, .. }, false, _) => {
            let e = http::get_event(endpoint, event).await?;
            Ok(EventTerms {
                stock: e.stock,
                per_user_limit: e.per_user_limit,
            })
        }
        (Via::Direct { .. }, true, Some(store)) => {
            store
                .put_event(event, spec)
                .await
                .map_err(|source| Error::Store {
                    doing: "setting up the event",
                    source,
                })?;
            Ok(drop.terms)
        }
        (Via::Direct { .. }, false, Some(store)) => {
            let e = store
                .event(event)
                .await
                .map_err(|source| Error::Store {
                    doing: "reading the event",
                    source,
                })?
                .ok_or_else(|| Error::NoSuchEvent(event.clone()))?;
            Ok(EventTerms {
                stock: e.stock,
                per_user_limit: e.per_user_limit,
            })
        }
        (Via::Direct { .. }, _, None) => Err(Error::DirectNeedsStore),
    }
}

/// The progress bar and the task that redraws it. The task holds only
/// counters, never the observer, and [`ProgressDisplay::finish`] waits for it
/// to end: nothing of the run is still borrowed by a task when the run's
/// results are collected.
struct ProgressDisplay {
    bar: ProgressBar,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Stops the redraws if the run is dropped before [`Self::finish`].
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl ProgressDisplay {
    fn start(progress: Arc<Progress>, decided: Option<DecidedCount>, total: u64) -> Self {
        let bar = if total == u64::MAX {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::new(total)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let (b, stop) = (bar.clone(), CancellationToken::new());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut last_acc, mut last_dec) = (0u64, 0u64);
            let tick = Duration::from_millis(500);
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
                let acc = progress.accepted.load(Ordering::Relaxed);
                let dec = decided.as_ref().map_or(0, DecidedCount::get);
                b.set_position(progress.sent.load(Ordering::Relaxed).min(total));
                b.set_message(format!(
                    "accepted {acc} ({:.0}/s), decided {dec} ({:.0}/s)",
                    acc.saturating_sub(last_acc) as f64 / tick.as_secs_f64(),
                    dec.saturating_sub(last_dec) as f64 / tick.as_secs_f64()
                ));
                (last_acc, last_dec) = (acc, dec);
            }
        });
        Self {
            bar,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            task,
        }
    }

    /// Stops the redraws, waits for the task to end, clears the bar.
    async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
        self.bar.finish_and_clear();
    }
}
