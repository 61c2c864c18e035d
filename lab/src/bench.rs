//! Benchmark helpers (results in docs/BENCHMARKS.md).
//!
//! - `bare`: an HTTP server that answers the api's routes the way the api
//!   does, but does nothing else: the ceiling a real handler is compared to,
//!   and the fastest endpoint to compare load generators against.
//! - `bare --produce`: the api's contract and nothing else: the issue body
//!   parsed, the request produced to the requests topic by the api's own
//!   producer ([`couponrush_api::request_producer`], same configuration),
//!   `202` only after the broker's acknowledgement, `503` when it does not
//!   come. The api's real ceiling: what it adds beyond this is its own cost.
//! - `bench-issuer`: pre-fills a requests topic, then starts the issuers and
//!   times how fast they decide it.
//! - `bench-store`: the issuer's ceiling: the same batches `bench-issuer`'s
//!   issuer sends to the store (same size, stock, users, request ids), made
//!   beforehand and sent straight to Redis, no Kafka in the way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{post, put, MethodRouter};
use axum::{Json, Router};
use clap::Args;
use couponrush_api::routes::{Accepted, IssueBody};
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::buckets::owner;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{
    BatchVerdict, EventBatch, EventSpec, Pending, Store, DEFAULT_DEDUP_RETENTION,
};
use couponrush_core::wire::{now_micros, DecisionResult};
use couponrush_core::{IssueRequest, Partitioner};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::deployment::{store_choice, Broker, Deployment, KafkaChoice, Spec};
use crate::LabError;
use couponrush_loadgen::drive::direct::DirectFactory;
use couponrush_loadgen::drive::{drive, LoadModel, LoadPlan, Progress};
use couponrush_loadgen::measure::skew::{skew, Ordered, Skew};
use couponrush_loadgen::population::{Population, UserDist};
use couponrush_loadgen::Verdict;

/// `coupon-lab bare`.
#[derive(Debug, Clone, Args)]
pub struct BareArgs {
    /// Address to listen on.
    #[arg(long, env = "BARE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Produce each issue request to the requests topic with the api's
    /// producer and answer 202 only after the broker's ack (503 without it),
    /// as the api does, and nothing else.
    #[arg(long, env = "BARE_PRODUCE")]
    pub produce: bool,
    /// Kafka bootstrap servers (with --produce); the requests topic must exist.
    #[arg(long, env = "BARE_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic to produce to (with --produce).
    #[arg(long, env = "BARE_REQUESTS_TOPIC", default_value = "coupon.requests")]
    pub requests_topic: String,
    /// How long to wait for the broker's ack before answering 503 (with
    /// --produce); default: the api's.
    #[arg(long, env = "BARE_PRODUCE_TIMEOUT", value_parser = couponrush_core::cli::parse_duration)]
    pub produce_timeout: Option<Duration>,
}

/// The bare router: 202 with a request id for every issue request.
pub fn bare_router() -> Router {
    with_issue_route(post(|Path(event_id): Path<String>| async move {
        let id = Uuid::now_v7();
        (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "request_id": id,
                "accepted_at": now_micros(),
                "status_url": format!("/v1/events/{event_id}/requests/{id}"),
            })),
        )
    }))
}

/// The api's issue route answered by `issue`, and a `PUT` of an event that
/// answers `201` (so a load generator can set its event up) and keeps nothing.
fn with_issue_route(issue: MethodRouter) -> Router {
    Router::new()
        .route("/v1/events/{event_id}/issue", issue)
        .route(
            "/v1/events/{event_id}",
            put(|Path(event_id): Path<String>| async move {
                (
                    StatusCode::CREATED,
                    Json(serde_json::json!({ "event_id": event_id, "stock": 0, "per_user_limit": 1 })),
                )
            }),
        )
}

/// The bare-produce router: an issue request is produced by the api's
/// request producer, and answered `202` (the api's body) once the broker
/// acknowledged it, `503` with `Retry-After` otherwise.
pub fn bare_produce_router(producer: Arc<RequestProducer>) -> Router {
    with_issue_route(
        post(
            |State(producer): State<Arc<RequestProducer>>,
             Path(event_id): Path<String>,
             Json(body): Json<IssueBody>| async move {
                let request_id = Uuid::now_v7();
                let req = IssueRequest::new(request_id, event_id, body.user_id, now_micros());
                match producer.send(&req).await {
                    Ok(_) => (
                        StatusCode::ACCEPTED,
                        Json(Accepted {
                            request_id,
                            accepted_at: req.accepted_at,
                            status_url: format!(
                                "/v1/events/{}/requests/{request_id}",
                                req.event_id
                            ),
                        }),
                    )
                        .into_response(),
                    Err(e) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1")],
                        Json(serde_json::json!({
                            "error": "unavailable",
                            "message": format!("{e}; retry"),
                        })),
                    )
                        .into_response(),
                }
            },
        )
        .with_state(producer),
    )
}

/// The router `args` ask for: [`bare_produce_router`] over the api's own
/// request producer with `--produce`, else [`bare_router`].
pub async fn bare_app(args: &BareArgs) -> Result<Router, LabError> {
    if !args.produce {
        return Ok(bare_router());
    }
    // The api's defaults, then the few settings bare takes.
    let mut config = couponrush_api::Config::local(&args.brokers);
    config.topics.requests = args.requests_topic.clone();
    if let Some(t) = args.produce_timeout {
        config.produce_timeout = t;
    }
    let producer = couponrush_api::request_producer(&config)
        .await
        .map_err(|e| LabError::Bare(format!("cannot produce to {}: {e}", args.requests_topic)))?;
    Ok(bare_produce_router(Arc::new(producer)))
}

/// Serves [`bare_app`] until `cancel`.
pub async fn bare(args: BareArgs, cancel: CancellationToken) -> Result<(), LabError> {
    let listen_err = |source| LabError::Listen {
        addr: args.listen.to_string(),
        source,
    };
    let app = bare_app(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(listen_err)?;
    println!(
        "bare server on http://{}{}",
        args.listen,
        if args.produce {
            format!(
                " (202 after the ack of {} at {})",
                args.requests_topic, args.brokers
            )
        } else {
            String::new()
        }
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .map_err(listen_err)
}

/// `coupon-lab bench-issuer`.
#[derive(Debug, Clone, Args)]
pub struct BenchIssuerArgs {
    /// Kafka brokers (default: an embedded mock cluster).
    #[arg(long = "brokers", env = "BENCH_BROKERS")]
    pub brokers: Option<String>,
    /// Redis URL of the store (default: in-memory).
    #[arg(long = "redis", env = "BENCH_REDIS_URL")]
    pub redis: Option<String>,
    /// Requests to pre-fill.
    #[arg(long, env = "BENCH_REQUESTS", default_value_t = 200_000)]
    pub requests: u64,
    /// Request partitions.
    #[arg(long, env = "BENCH_PARTITIONS", default_value_t = 8)]
    pub partitions: i32,
    /// Issuers.
    #[arg(long, env = "BENCH_ISSUERS", default_value_t = 1)]
    pub issuers: usize,
    /// Records per issuer batch.
    #[arg(long, env = "BENCH_BATCH_SIZE", default_value_t = 2000)]
    pub batch_size: usize,
    /// Stock of the event (default: a tenth of the requests).
    #[arg(long, env = "BENCH_STOCK")]
    pub stock: Option<u32>,
    /// The issuers' `--publish-depth`: earlier batches that may still await
    /// their acks when a batch has just been decided.
    #[arg(long, env = "BENCH_PUBLISH_DEPTH", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publish_depth: u16,
    /// With the embedded broker only: the broker leading the outcomes
    /// answers this much later once the requests are in (what a remote
    /// cluster's round trip and `acks=all` replication add to each ack), so
    /// a deeper `--publish-depth` has acks to overlap.
    #[arg(long, env = "BENCH_BROKER_RTT", value_parser = couponrush_core::cli::parse_duration)]
    pub broker_rtt: Option<Duration>,
    /// Other processes whose CPU time to read over the deciding phase, as
    /// NAME=PID (repeatable; for example the broker and redis-server). This
    /// process (the issuers) is always read.
    #[arg(long = "cpu-of", value_parser = parse_named_pid)]
    pub cpu_of: Vec<(String, u32)>,
}

fn parse_named_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PID, for example tansu=1234"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{s:?}: {pid:?} is not a process id"))?;
    Ok((name.to_string(), pid))
}

/// CPU-seconds of each named process (this one as "issuer").
fn cpu_now(others: &[(String, u32)]) -> Result<Vec<f64>, LabError> {
    std::iter::once(std::process::id())
        .chain(others.iter().map(|(_, pid)| *pid))
        .map(|pid| {
            crate::capacity::cpu_seconds(pid).map_err(|e| {
                LabError::Capacity(format!("cannot read the CPU time of process {pid}: {e}"))
            })
        })
        .collect()
}

/// Pre-fills, then times the issuers. Prints one JSON line of results.
pub async fn bench_issuer(
    args: BenchIssuerArgs,
    cancel: CancellationToken,
) -> Result<Verdict, LabError> {
    if args.broker_rtt.is_some() && args.brokers.is_some() {
        return Err(LabError::BrokerRtt(
            "it slows the embedded broker only: leave out --brokers".into(),
        ));
    }
    // A slowed broker (`--broker-rtt`) leads the outcomes only: two brokers.
    let embedded = if args.broker_rtt.is_some() { 2 } else { 1 };
    let kafka = KafkaChoice::brokers_or_embedded(args.brokers.as_deref(), embedded);
    let mut deployment = Deployment::start(Spec {
        partitioner: Partitioner::Spread,
        batch_size: args.batch_size,
        with_api: false,
        start_issuers: false,
        ..Spec::in_process(
            kafka,
            store_choice(args.redis.as_deref()),
            args.partitions,
            args.issuers,
        )
    })
    .await?;
    let depth = usize::from(args.publish_depth);
    deployment.tune_issuers(move |c| c.publish_depth = depth);
    let store = deployment.store.clone();
    let event = format!("bench-{}", Uuid::new_v4().simple());
    let stock = args.stock.unwrap_or((args.requests / 10) as u32);
    store
        .put_event(
            &event,
            EventSpec {
                stock,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: 1,
            },
        )
        .await?;

    let producer = Arc::new(RequestProducer::new(
        &deployment.kafka,
        deployment.topics.requests.clone(),
        Partitioner::Spread,
        args.partitions,
        1_000_000,
    )?);
    couponrush_core::store::definition::create_event(
        &*store,
        &producer,
        &deployment.topics.events,
        &event,
        EventSpec {
            stock,
            per_user_limit: 1,
            claim_window_us: 0,
            stock_buckets: 1,
        },
    )
    .await?;
    let fill_started = Instant::now();
    let filled = drive(
        Arc::new(DirectFactory { producer }),
        LoadPlan {
            event_id: event.clone(),
            model: LoadModel::Concurrency(4096),
            requests: args.requests,
            duration: Duration::from_secs(600),
            connections: 1,
            population: Population::new(args.requests, UserDist::Uniform, 0.0, 7),
        },
        Arc::new(Progress::default()),
        cancel.clone(),
    )
    .await;
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let accepted = filled.accepted.len() as u64;

    // Progress is read from the offsets the issuers' group has committed on
    // the requests topic (a record is committed once decided and its
    // outcome acknowledged), not by reading the outcomes back: a reader would
    // spend this machine's CPU (and the broker's) on the benchmark's own
    // bookkeeping, which the ceiling does not carry. (The outcomes topic's
    // end offsets would do too, but tansu 0.6 answers them short of the last
    // batch.) The rate runs from the first commit to the last.
    let committed = Committed::new(
        &deployment.kafka,
        deployment.group_id(),
        &deployment.topics.requests,
    )?;
    // Slowed after the fill, and only the broker that leads the outcomes:
    // the issuers' acks wait, their fetches do not (the embedded broker
    // answers a fetch with one record batch per partition, so a slowed
    // fetch would be the limit instead).
    if let (Some(rtt), Broker::Mock(mock)) = (args.broker_rtt, &deployment.broker) {
        let inject = |f| {
            mock.inject(f)
                .map_err(|e| LabError::BrokerRtt(format!("cannot slow the embedded broker: {e}")))
        };
        let topics = &deployment.topics;
        for spec in topics.specs(args.partitions, 1) {
            let broker = match &spec.name {
                n if *n == topics.outcomes => 2,
                n if *n == topics.requests => 1,
                _ => continue,
            };
            for partition in 0..spec.partitions {
                inject(couponrush_harness::Fault::Leader {
                    topic: spec.name.clone(),
                    partition,
                    broker,
                })?;
            }
        }
        // The group's commits go to the fast broker too.
        inject(couponrush_harness::Fault::GroupCoordinator(
            deployment.group_id().to_string(),
            1,
        ))?;
        inject(couponrush_harness::Fault::Rtt(2, rtt))?;
    }
    let started = Instant::now();
    deployment.start_issuers()?;
    let mut first: Option<Instant> = None;
    let mut cpu_first = None;
    let deadline = started + Duration::from_secs(600);
    let mut done_count = 0;
    let mut at_first = 0;
    while done_count < accepted && Instant::now() < deadline && !cancel.is_cancelled() {
        // A failed look (a coordinator still loading, say) is looked again.
        match committed.sum().await {
            Ok(n) => done_count = n,
            Err(e) => eprintln!("reading the committed offsets failed ({e}); looking again"),
        }
        if first.is_none() && done_count > 0 {
            first = Some(Instant::now());
            at_first = done_count;
            cpu_first = Some(cpu_now(&args.cpu_of)?);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = Instant::now();
    let cpu_done = cpu_now(&args.cpu_of)?;
    let totals = deployment.stop().await;
    let replays: u64 = totals.iter().map(|t| t.replays).sum();
    let decided = totals
        .iter()
        .map(|t| t.decided)
        .sum::<u64>()
        .saturating_sub(replays);
    let timed = done_count.saturating_sub(at_first);
    let first = first.unwrap_or(started);
    let decide_secs = done.duration_since(first).as_secs_f64().max(1e-6);
    // µs of CPU per decision of each process over the deciding phase (from
    // the first decision seen to the last), and the rate the machine's cores
    // would allow if that CPU were all that limited it.
    let cpu_us_per_decision = cpu_first.map(|before| {
        let n = timed.max(1) as f64;
        let names = std::iter::once("issuer").chain(args.cpu_of.iter().map(|(n, _)| n.as_str()));
        names
            .zip(cpu_done.iter().zip(&before))
            .map(|(name, (after, before))| {
                (
                    name.to_string(),
                    serde_json::json!((after - before) * 1e6 / n),
                )
            })
            .collect::<serde_json::Map<String, serde_json::Value>>()
    });
    let result = serde_json::json!({
        "requests": args.requests,
        "prefilled": accepted,
        "prefill_per_s": accepted as f64 / fill_secs,
        "decided": decided,
        "replays": replays,
        "decided_per_s": timed as f64 / decide_secs,
        "join_seconds": first.duration_since(started).as_secs_f64(),
        "decide_seconds": decide_secs,
        "issuers": args.issuers,
        "partitions": args.partitions,
        "batch_size": args.batch_size,
        "store": store.kind(),
        "batches": totals.iter().map(|t| t.batches).sum::<u64>(),
        "cpu_us_per_decision": cpu_us_per_decision,
    });
    println!("{result}");
    Ok(if decided >= accepted {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

/// `coupon-lab bench-store`.
#[derive(Debug, Clone, Args)]
pub struct BenchStoreArgs {
    /// Redis URL of the store. Use a server of its own: the benchmark's
    /// events are left behind. With redis+cluster://, list every master:
    /// each one's CPU is read before and after each run.
    #[arg(long = "redis", env = "BENCH_REDIS_URL")]
    pub redis: String,
    /// Requests to decide per run.
    #[arg(long, env = "BENCH_REQUESTS", default_value_t = 200_000)]
    pub requests: u64,
    /// Requests per batch (an issuer batch: `bench-issuer --batch-size`).
    #[arg(long, env = "BENCH_BATCH_SIZE", default_value_t = 2000)]
    pub batch_size: usize,
    /// Batches in flight at once, each a pipelined store call.
    #[arg(long, env = "BENCH_IN_FLIGHT", default_value_t = 2)]
    pub in_flight: usize,
    /// Stock of the event (default: a tenth of the requests).
    #[arg(long, env = "BENCH_STOCK")]
    pub stock: Option<u32>,
    /// Stock bucket counts to compare, comma-separated (e.g. 1,4): each run
    /// decides the same load once per count, side by side, on a fresh event.
    #[arg(long, env = "BENCH_STOCK_BUCKETS", value_delimiter = ',', default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub stock_buckets: Vec<u32>,
    /// Runs (medians reported when more than one).
    #[arg(long, env = "BENCH_RUNS", default_value_t = 1)]
    pub runs: usize,
}

/// The batches `bench-issuer` decides, made up front: `requests` requests
/// of uniform users (the same population and seed as its pre-fill), fresh
/// UUID v7 ids, in batches of `batch_size` of one event.
pub fn issuer_batches(event: &str, requests: u64, batch_size: usize) -> Vec<EventBatch> {
    let population = Population::new(requests, UserDist::Uniform, 0.0, 7);
    let all: Vec<Pending> = (0..requests)
        .map(|i| Pending {
            request_id: Uuid::now_v7(),
            user_id: population.user(i),
        })
        .collect();
    all.chunks(batch_size.max(1))
        .map(|c| EventBatch::requests(event, c.to_vec()))
        .collect()
}

/// Decides the pre-made batches as fast as the store takes them, once per
/// bucket count per run. Prints one JSON line per run and count, then (with
/// several) one of medians per count; FAIL unless every request was
/// decided once and exactly the stock was issued.
pub async fn bench_store(
    args: BenchStoreArgs,
    cancel: CancellationToken,
) -> Result<Verdict, LabError> {
    let store = Arc::new(RedisStore::connect(&args.redis, DEFAULT_DEDUP_RETENTION).await?);
    let masters = Masters::of(&args.redis).await?;
    let stock = args.stock.unwrap_or((args.requests / 10) as u32);
    let mut verdict = Verdict::Pass;
    let mut all: Vec<StoreRun> = Vec::new();
    for run in 0..args.runs.max(1) {
        for &k in &args.stock_buckets {
            let r = store_run(&store, &masters, &args, stock, k, &cancel).await?;
            let mut line = serde_json::to_value(&r).expect("a run serialises");
            line["run"] = serde_json::json!(run + 1);
            println!("{line}");
            let expected_issued = u64::from(stock).min(args.requests);
            if r.decided != args.requests || r.replays != 0 || r.issued != expected_issued {
                verdict = Verdict::Fail;
            }
            all.push(r);
        }
    }
    if args.runs > 1 {
        for &k in &args.stock_buckets {
            let runs: Vec<&StoreRun> = all.iter().filter(|r| r.stock_buckets == k).collect();
            let median = |f: &dyn Fn(&StoreRun) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let cpu: Vec<f64> = (0..masters.len())
                .map(|m| median(&|r: &StoreRun| r.master_cpu_s.get(m).copied().unwrap_or(0.0)))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "median_of": runs.len(),
                    "stock_buckets": k,
                    "decided_per_s": median(&|r| r.decided_per_s),
                    "undersell": median(&|r| r.undersell as f64),
                    "inversion_ratio": median(&|r| r.skew.inversion_ratio),
                    "late_winners": median(&|r| r.skew.late_winners as f64),
                    "early_losers": median(&|r| r.skew.early_losers as f64),
                    "master_cpu_s": cpu,
                })
            );
        }
    }
    Ok(verdict)
}

/// One run of `bench-store` for one bucket count.
#[derive(Debug, Clone, serde::Serialize)]
struct StoreRun {
    stock_buckets: u32,
    requests: u64,
    decided: u64,
    decided_per_s: f64,
    decide_seconds: f64,
    issued: u64,
    replays: u64,
    remaining: Option<u32>,
    stock: u32,
    batch_size: usize,
    in_flight: usize,
    store: &'static str,
    /// Stock minus coupons issued when the first `sold_out` was decided, as
    /// the load generator's report counts it (its bucket in the store's
    /// order, the others by the batches' `decided_at`).
    undersell: u64,
    /// Arrival order = the requests' order in the pre-made batches.
    skew: Skew,
    /// CPU seconds (user + system) each master spent during the run, in
    /// the order of the URL's hosts (masters only).
    master_cpu_s: Vec<f64>,
}

async fn store_run(
    store: &Arc<RedisStore>,
    masters: &Masters,
    args: &BenchStoreArgs,
    stock: u32,
    k: u32,
    cancel: &CancellationToken,
) -> Result<StoreRun, LabError> {
    let event = format!("bench-store-{k}-{}", Uuid::new_v4().simple());
    store
        .put_event(
            &event,
            EventSpec {
                stock,
                per_user_limit: 1,
                claim_window_us: 0,
                stock_buckets: k,
            },
        )
        .await?;
    let batches = Arc::new(issuer_batches(&event, args.requests, args.batch_size));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu_before = masters.cpu().await?;
    let started = Instant::now();
    let workers: Vec<_> = (0..args.in_flight.max(1))
        .map(|_| {
            let (store, batches, next, cancel) =
                (store.clone(), batches.clone(), next.clone(), cancel.clone());
            tokio::spawn(async move {
                // (batch, decided_at, decisions) of every call.
                let mut seen = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(batch) = batches.get(i) else { break };
                    if cancel.is_cancelled() {
                        return Err(LabError::Cancelled);
                    }
                    let at = now_micros();
                    let verdict = store.decide(std::slice::from_ref(batch), at).await?;
                    if let [BatchVerdict::Decided { decisions, .. }] = &verdict[..] {
                        seen.push((i, at, decisions.clone()));
                    }
                }
                Ok(seen)
            })
        })
        .collect();
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await??);
    }
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    let cpu_after = masters.cpu().await?;
    let mut ordered = Vec::new();
    let (mut issued, mut replays) = (0u64, 0u64);
    let mut first_sold_out: Option<(u64, u64)> = None;
    for (i, at, decisions) in &seen {
        for (j, d) in decisions.iter().enumerate() {
            issued += u64::from(d.issued_rank.is_some());
            replays += u64::from(d.replay);
            if d.result == DecisionResult::SoldOut {
                let this = (*at, d.seq);
                first_sold_out = Some(first_sold_out.map_or(this, |f| f.min(this)));
            }
            ordered.push(Ordered {
                accepted_at: (i * args.batch_size + j) as u64,
                request_id: batches[*i].requests[j].request_id,
                decision_seq: d.seq,
                result: d.result,
            });
        }
    }
    // As the load generator's audit counts it: the first sold_out's own
    // bucket in its exact order, the others by the batches' decided_at.
    let issued_by_then = first_sold_out.map(|(t, s)| {
        let bucket = owner(s, k);
        seen.iter()
            .flat_map(|(_, at, ds)| ds.iter().map(move |d| (*at, d)))
            .filter(|(at, d)| {
                d.issued_rank.is_some()
                    && if owner(d.seq, k) == bucket {
                        d.seq < s
                    } else {
                        *at <= t
                    }
            })
            .count() as u64
    });
    Ok(StoreRun {
        stock_buckets: k,
        requests: args.requests,
        decided: ordered.len() as u64,
        decided_per_s: ordered.len() as f64 / secs,
        decide_seconds: secs,
        issued,
        replays,
        remaining: store.event(&event).await?.map(|e| e.remaining),
        stock,
        batch_size: args.batch_size,
        in_flight: args.in_flight,
        store: store.kind(),
        undersell: issued_by_then.map_or(0, |n| u64::from(stock).saturating_sub(n)),
        skew: skew(&ordered, stock),
        master_cpu_s: cpu_after
            .iter()
            .zip(&cpu_before)
            .map(|(a, b)| a - b)
            .collect(),
    })
}

/// The masters of the store's URL, each asked for its own CPU accounting
/// (`INFO cpu`): one server, or every listed node of a cluster that is a
/// master.
struct Masters(Vec<redis::aio::MultiplexedConnection>);

impl Masters {
    async fn of(url: &str) -> Result<Self, LabError> {
        let urls = match couponrush_core::redis_conn::cluster_seeds(url) {
            Some(seeds) => seeds.map_err(LabError::BenchStore)?,
            None => vec![url.to_string()],
        };
        let mut masters = Vec::new();
        for u in urls {
            let client = redis::Client::open(u.as_str())
                .map_err(|e| LabError::BenchStore(format!("{u}: {e}")))?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| LabError::BenchStore(format!("{u}: {e}")))?;
            let role: Vec<redis::Value> = redis::cmd("ROLE")
                .query_async(&mut conn)
                .await
                .map_err(|e| LabError::BenchStore(format!("{u}: ROLE: {e}")))?;
            let is_master =
                matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master");
            if is_master {
                masters.push(conn);
            }
        }
        Ok(Self(masters))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Each master's `used_cpu_user + used_cpu_sys`, seconds.
    async fn cpu(&self) -> Result<Vec<f64>, LabError> {
        let mut out = Vec::with_capacity(self.0.len());
        for conn in &self.0 {
            let mut conn = conn.clone();
            let info: String = redis::cmd("INFO")
                .arg("cpu")
                .query_async(&mut conn)
                .await
                .map_err(|e| LabError::BenchStore(format!("INFO cpu: {e}")))?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            out.push(field("used_cpu_user:") + field("used_cpu_sys:"));
        }
        Ok(out)
    }
}

/// The offsets a consumer group has committed on a topic, summed: how many
/// records it has finished (from offset 0). One request for all partitions.
struct Committed {
    consumer: Arc<rdkafka::consumer::BaseConsumer>,
    partitions: rdkafka::TopicPartitionList,
}

impl Committed {
    fn new(
        kafka: &couponrush_core::kafka::KafkaSettings,
        group: &str,
        topic: &str,
    ) -> Result<Self, LabError> {
        use rdkafka::consumer::Consumer;
        // The group's id, to read its offsets; this client never joins it.
        let consumer: rdkafka::consumer::BaseConsumer = kafka
            .client_config("bench-committed")
            .set("group.id", group)
            .create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut partitions = rdkafka::TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                partitions.add_partition(topic, p.id());
            }
        }
        Ok(Self {
            consumer: Arc::new(consumer),
            partitions,
        })
    }

    async fn sum(&self) -> Result<u64, LabError> {
        let (consumer, tpl) = (self.consumer.clone(), self.partitions.clone());
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer;
            let offsets = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
            Ok::<u64, LabError>(
                offsets
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        rdkafka::Offset::Offset(o) => u64::try_from(o).ok(),
                        _ => None,
                    })
                    .sum(),
            )
        })
        .await?
    }
}
