//! `coupon-lab sweep`: the same drop over partition counts, issuer
//! counts and partitioners, each point on fresh topics and a fresh group, to
//! choose a partition count. Writes a table, JSON and an SVG chart of issued/s
//! and ordering skew against partitions: the seed's trade-off, measured (one
//! partition keeps strict order at one issuer's speed; more partitions buy
//! throughput with soft order).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::FalseyValueParser;
use clap::Args;
use couponrush_core::Partitioner;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::deployment::{
    store_choice, Deployment, DropSpec, KafkaChoice, LivePage, Spec, StoreChoice,
};
use crate::LabError;
use couponrush_harness::TansuStorage;
use couponrush_loadgen::chart::{document, Panel, Series};
use couponrush_loadgen::dashboard::DashboardArgs;
use couponrush_loadgen::measure::audit::EventTerms;

use couponrush_loadgen::{LoadArgs, LoadDefaults, Verdict};

/// `coupon-lab sweep`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Partition counts to try.
    #[arg(
        long,
        env = "SWEEP_PARTITIONS",
        value_delimiter = ',',
        default_value = "1,2,4,8"
    )]
    pub partitions: Vec<i32>,
    /// Issuer counts to try.
    #[arg(
        long,
        env = "SWEEP_ISSUERS",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    pub issuers: Vec<usize>,
    /// Partitioners to try.
    #[arg(
        long = "partitioner",
        env = "SWEEP_PARTITIONERS",
        value_delimiter = ',',
        default_value = "event,spread"
    )]
    pub partitioners: Vec<Partitioner>,
    /// Use these Kafka brokers (default: an embedded mock cluster per point).
    #[arg(long = "brokers", env = "SWEEP_BROKERS")]
    pub brokers: Option<String>,
    /// Use the Redis at this URL as the store: redis://host:port/db for one
    /// server, redis+cluster://host:port,host:port,… for a Redis Cluster
    /// (default: in-memory).
    #[arg(long = "redis", env = "SWEEP_REDIS_URL")]
    pub redis: Option<String>,
    /// Coupons per drop.
    #[arg(long, env = "SWEEP_STOCK", default_value_t = 1000)]
    pub stock: u32,
    /// Runs per point; the point reports the median.
    #[arg(long, env = "SWEEP_REPEAT", default_value_t = 1)]
    pub repeat: usize,
    /// Produce the requests straight to Kafka, as the api would, instead of
    /// through the api over HTTP (no HTTP stage in the measurement).
    #[arg(long, env = "SWEEP_DIRECT", value_parser = FalseyValueParser::new())]
    pub direct: bool,
    /// Start a private tansu (memory) and redis-server on free loopback ports
    /// for every run and stop them after it, so no run inherits the topics,
    /// keys and memory of the runs before it (a shared broker slows down as a
    /// sweep piles topics on it). Needs `redis-server` on PATH and tansu
    /// (`TANSU_BIN`, or the copy `scripts/dev-up` caches).
    #[arg(long, env = "SWEEP_FRESH", value_parser = FalseyValueParser::new(), conflicts_with_all = ["brokers", "redis"])]
    pub fresh: bool,
    /// Directory for sweep.json, sweep.svg and sweep.txt.
    #[arg(long, env = "SWEEP_OUT", default_value = "sweep-out")]
    pub out: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub live: DashboardArgs,
}

/// One measured point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Request partitions.
    pub partitions: i32,
    /// Issuers.
    pub issuers: usize,
    /// Strategy.
    pub partitioner: Partitioner,
    /// Median coupons per second.
    pub issued_per_s: f64,
    /// Median first decisions per second.
    pub decided_per_s: f64,
    /// Median accepted per second.
    pub accepted_per_s: f64,
    /// Median inversion ratio.
    pub inversion_ratio: f64,
    /// Median p99 displacement.
    pub displacement_p99: u64,
    /// Median late winners.
    pub late_winners: u64,
    /// Median end-to-end p99, ms.
    pub e2e_p99_ms: f64,
    /// Sum of correctness failures over the runs (must be 0).
    pub failures: u64,
    /// Runs measured.
    pub runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the sweep.
pub async fn sweep(args: SweepArgs, cancel: CancellationToken) -> Result<Verdict, LabError> {
    std::fs::create_dir_all(&args.out).map_err(|source| LabError::Write {
        path: args.out.clone(),
        source,
    })?;
    // Rounds outermost: every point is measured once per round, so slow
    // drift of a shared machine spreads over all points instead of
    // penalising the ones measured last.
    let mut grid = Vec::new();
    for &partitioner in &args.partitioners {
        for &issuers in &args.issuers {
            for &partitions in &args.partitions {
                grid.push((partitioner, issuers, partitions));
            }
        }
    }
    let rounds = args.repeat.max(1);
    // One page follows every point's drop, one after another.
    let live = LivePage::open(&args.live, &cancel).await?;
    let mut runs: Vec<Vec<couponrush_loadgen::report::Report>> =
        grid.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, &(partitioner, issuers, partitions)) in grid.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(LabError::Cancelled);
            }
            let r = point_run(
                &args,
                partitions,
                issuers,
                partitioner,
                live.as_ref(),
                &cancel,
            )
            .await?;
            eprintln!(
                "[round {round}/{rounds}, {}/{}] {partitioner} p={partitions} issuers={issuers}: issued {:.0}/s, decided {:.0}/s, accepted {:.0}/s, inversions {:.4}",
                i + 1,
                grid.len(),
                r.throughput.issued_per_s,
                r.throughput.decided_per_s,
                r.throughput.accepted_per_s,
                r.skew.inversion_ratio
            );
            runs[i].push(r);
        }
    }
    let points: Vec<Point> = grid
        .iter()
        .zip(&runs)
        .map(|(&(partitioner, issuers, partitions), runs)| {
            let med = |f: fn(&couponrush_loadgen::report::Report) -> f64| {
                median(runs.iter().map(f).collect())
            };
            Point {
                partitions,
                issuers,
                partitioner,
                issued_per_s: med(|r| r.throughput.issued_per_s),
                decided_per_s: med(|r| r.throughput.decided_per_s),
                accepted_per_s: med(|r| r.throughput.accepted_per_s),
                inversion_ratio: med(|r| r.skew.inversion_ratio),
                displacement_p99: med(|r| r.skew.displacement_p99 as f64) as u64,
                late_winners: med(|r| r.skew.late_winners as f64) as u64,
                e2e_p99_ms: med(|r| r.latency_ms.e2e.p99),
                failures: runs.iter().map(|r| r.failures()).sum(),
                runs: runs.len(),
            }
        })
        .collect();
    let table = table(&points);
    println!("{table}");
    let json = serde_json::to_vec_pretty(&serde_json::json!({
        "schema": "couponrush.sweep/v1",
        "load": format!("{:?}", args.load),
        "stock": args.stock,
        "entry": if args.direct { "direct to Kafka (no api)" } else { "through the api over HTTP" },
        "kafka": if args.fresh { "a fresh tansu (memory) per run".into() } else { args.brokers.clone().unwrap_or_else(|| "embedded mock cluster (3 brokers)".into()) },
        "store": if args.fresh { "a fresh redis-server per run" } else if args.redis.is_some() { "redis" } else { "memory" },
        "points": points,
    }))
    .expect("a sweep serialises");
    let write = |name: &str, bytes: &[u8]| {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).map_err(|source| LabError::Write { path, source })
    };
    write("sweep.json", &json)?;
    write("sweep.txt", table.as_bytes())?;
    write("sweep.svg", sweep_chart(&points).as_bytes())?;
    println!(
        "wrote sweep.json, sweep.txt and sweep.svg to {}",
        args.out.display()
    );
    if let Some(page) = live {
        page.close(&args.live, &cancel).await;
    }
    Ok(if points.iter().all(|p| p.failures == 0) {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

async fn point_run(
    args: &SweepArgs,
    partitions: i32,
    issuers: usize,
    partitioner: Partitioner,
    live: Option<&LivePage>,
    cancel: &CancellationToken,
) -> Result<couponrush_loadgen::report::Report, LabError> {
    let services = args.out.join(".services");
    let (kafka, store, dir) = if args.fresh {
        (
            KafkaChoice::Tansu(TansuStorage::Memory),
            StoreChoice::PrivateRedis { aof: false },
            Some(services.clone()),
        )
    } else {
        (
            KafkaChoice::brokers_or_embedded(args.brokers.as_deref(), 3),
            store_choice(args.redis.as_deref()),
            None,
        )
    };
    let deployment = Deployment::start(Spec {
        partitioner,
        with_api: !args.direct,
        dir,
        ..Spec::in_process(kafka, store, partitions, issuers)
    })
    .await?;
    // Let the group form before the doors open, so every point measures
    // deciding, not joining.
    if !deployment.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let event = format!("sweep-{}", uuid::Uuid::new_v4().simple());
    let plan = args.load.plan(
        &event,
        LoadDefaults {
            requests: 20_000,
            users: 20_000,
            retry_ratio: 0.0,
        },
    )?;
    let drop = DropSpec {
        plan,
        terms: EventTerms {
            stock: args.stock,
            per_user_limit: 1,
        },
        drain_timeout: args.load.drain_timeout,
        admin_token: None,
        progress: false,
        keep_raw: false,
        config: serde_json::json!({
            "partitions": partitions,
            "issuers": issuers,
            "partitioner": partitioner,
            "entry": if args.direct { "direct" } else { "api" },
        }),
        live: live.cloned(),
        holds: None,
        stock_buckets: 1,
    };
    let report = if args.direct {
        deployment.drop_direct(drop, cancel.clone()).await
    } else {
        deployment.drop_through_api(drop, cancel.clone()).await
    };
    deployment.stop().await;
    // A private broker and store per run: nothing of it outlives the run.
    let _ = std::fs::remove_dir_all(&services);
    report
}

/// The sweep as a text table.
pub fn table(points: &[Point]) -> String {
    let mut s = format!(
        "{:<12} {:>10} {:>7} {:>11} {:>11} {:>11} {:>10} {:>8} {:>8} {:>9} {:>8}\n",
        "partitioner",
        "partitions",
        "issuers",
        "issued/s",
        "decided/s",
        "accepted/s",
        "inversions",
        "disp p99",
        "late win",
        "e2e p99ms",
        "failures"
    );
    for p in points {
        s.push_str(&format!(
            "{:<12} {:>10} {:>7} {:>11.0} {:>11.0} {:>11.0} {:>10.4} {:>8} {:>8} {:>9.1} {:>8}\n",
            p.partitioner.to_string(),
            p.partitions,
            p.issuers,
            p.issued_per_s,
            p.decided_per_s,
            p.accepted_per_s,
            p.inversion_ratio,
            p.displacement_p99,
            p.late_winners,
            p.e2e_p99_ms,
            p.failures
        ));
    }
    s
}

/// Three panels against partitions, one line per partitioner and issuer
/// count: coupons issued per second, requests decided per second, and the
/// inversion ratio.
pub fn sweep_chart(points: &[Point]) -> String {
    let mut keys: Vec<(String, usize)> = points
        .iter()
        .map(|p| (p.partitioner.to_string(), p.issuers))
        .collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    let series = |f: fn(&Point) -> f64| -> Vec<Series> {
        keys.iter()
            .map(|(name, issuers)| Series {
                name: format!(
                    "{name}, {issuers} issuer{}",
                    if *issuers == 1 { "" } else { "s" }
                ),
                points: points
                    .iter()
                    .filter(|p| p.partitioner.to_string() == *name && p.issuers == *issuers)
                    .map(|p| (p.partitions as f64, f(p)))
                    .collect(),
            })
            .collect()
    };
    document(
        &[
            Panel {
                title: "Coupons issued per second (stock / time to sell out)".into(),
                x_label: "partitions of coupon.requests".into(),
                y_label: "issued / s".into(),
                series: series(|p| p.issued_per_s),
                scatter: false,
                x_log2: true,
            },
            Panel {
                title: "Throughput: requests decided per second".into(),
                x_label: "partitions of coupon.requests".into(),
                y_label: "decided / s".into(),
                series: series(|p| p.decided_per_s),
                scatter: false,
                x_log2: true,
            },
            Panel {
                title: "Ordering skew: fraction of request pairs decided out of arrival order"
                    .into(),
                x_label: "partitions of coupon.requests".into(),
                y_label: "inversion ratio".into(),
                series: series(|p| p.inversion_ratio),
                scatter: false,
                x_log2: true,
            },
        ],
        960.0,
        360.0,
    )
}
