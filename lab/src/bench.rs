//! Benchmark helpers (results in docs/BENCHMARKS.md).
//!
//! - `bare`: an HTTP server that answers the api's routes the way the api
//!   does, but does nothing else: the ceiling a real handler is compared to,
//!   and the fastest endpoint to compare load generators against.
//! - `bench-issuer`: pre-fills a requests topic, then starts the issuers and
//!   times how fast they decide it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{post, put};
use axum::{Json, Router};
use clap::Args;
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::EventSpec;
use couponrush_core::wire::now_micros;
use couponrush_core::Partitioner;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::deployment::{store_choice, Deployment, KafkaChoice, Spec};
use crate::LabError;
use couponrush_loadgen::drive::direct::DirectFactory;
use couponrush_loadgen::drive::{drive, LoadModel, LoadPlan, Progress};
use couponrush_loadgen::observe::Observer;
use couponrush_loadgen::population::{Population, UserDist};
use couponrush_loadgen::Verdict;

/// `coupon-lab bare`.
#[derive(Debug, Clone, Args)]
pub struct BareArgs {
    /// Address to listen on.
    #[arg(long, env = "BARE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
}

/// The bare router: 202 with a request id for every issue request.
pub fn bare_router() -> Router {
    Router::new()
        .route(
            "/v1/events/{event_id}/issue",
            post(|Path(event_id): Path<String>| async move {
                let id = Uuid::now_v7();
                (
                    StatusCode::ACCEPTED,
                    Json(serde_json::json!({
                        "request_id": id,
                        "accepted_at": now_micros(),
                        "status_url": format!("/v1/events/{event_id}/requests/{id}"),
                    })),
                )
            }),
        )
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

/// Serves [`bare_router`] until `cancel`.
pub async fn bare(args: BareArgs, cancel: CancellationToken) -> Result<(), LabError> {
    let listen_err = |source| LabError::Listen {
        addr: args.listen.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(listen_err)?;
    println!("bare server on http://{}", args.listen);
    axum::serve(listener, bare_router())
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
}

/// Pre-fills, then times the issuers. Prints one JSON line of results.
pub async fn bench_issuer(
    args: BenchIssuerArgs,
    cancel: CancellationToken,
) -> Result<Verdict, LabError> {
    let kafka = KafkaChoice::brokers_or_embedded(args.brokers.as_deref(), 1);
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
    let store = deployment.store.clone();
    let event = format!("bench-{}", Uuid::new_v4().simple());
    let stock = args.stock.unwrap_or((args.requests / 10) as u32);
    store
        .put_event(
            &event,
            EventSpec {
                stock,
                per_user_limit: 1,
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

    let observer = {
        let (k, t, e) = (
            deployment.kafka.clone(),
            deployment.topics.clone(),
            event.clone(),
        );
        tokio::task::spawn_blocking(move || Observer::start(&k, &t, &e)).await??
    };
    let started = Instant::now();
    deployment.start_issuers()?;
    // First decision: the group has formed; from then on, pure deciding.
    let mut first: Option<Instant> = None;
    let deadline = started + Duration::from_secs(600);
    while observer.decided() < accepted && Instant::now() < deadline && !cancel.is_cancelled() {
        if first.is_none() && observer.decided() > 0 {
            first = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = Instant::now();
    let decided = observer.decided();
    drop(observer.finish());
    let totals = deployment.stop().await;
    let first = first.unwrap_or(started);
    let decide_secs = done.duration_since(first).as_secs_f64().max(1e-6);
    let result = serde_json::json!({
        "requests": args.requests,
        "prefilled": accepted,
        "prefill_per_s": accepted as f64 / fill_secs,
        "decided": decided,
        "decided_per_s": decided as f64 / decide_secs,
        "join_seconds": first.duration_since(started).as_secs_f64(),
        "decide_seconds": decide_secs,
        "issuers": args.issuers,
        "partitions": args.partitions,
        "batch_size": args.batch_size,
        "store": store.kind(),
        "batches": totals.iter().map(|t| t.batches).sum::<u64>(),
    });
    println!("{result}");
    Ok(if decided >= accepted {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}
