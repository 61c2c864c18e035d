//! `coupon-lab capacity`: what each stage of a drop costs in CPU, measured
//! from the processes' own accounting, and what that implies at 10k, 100k
//! and 1M requests/s.
//!
//! ## What is measured
//! A deployment of real processes (`coupon-api`, `--issuers` ×
//! `coupon-issuer`, a private tansu with memory storage, a private
//! redis-server with an append-only file synced on every write, as the
//! compose file runs it) takes a drop at a fixed rate (open loop, each of
//! `--rates`) from the load generator in this process. Each process's CPU
//! time (user + system of all its threads, plus the children it waited for:
//! `/proc/<pid>/stat`) is read just before the first request is sent and
//! again once the last decision was observed, so the window holds all the
//! work the drop's requests caused, start to drain. Before each drop the same
//! processes are read over an idle second, so the idle share of the figure
//! is known. Per-process accounting is what makes this usable on a shared
//! machine: another tenant's load slows a process down but does not add to
//! its CPU time (beyond cache effects).
//!
//! ## What follows, and what is extrapolated
//! CPU-seconds per 1,000 requests per stage, and the requests/s one core of
//! each stage carries (1,000 ÷ that), are measured. The plan for the
//! targets (`--targets`) is arithmetic on them, and labelled so in the
//! output: CPU cost is taken as linear in the rate (it falls somewhat as
//! batches grow, so a plan from the highest rate measured errs high), each
//! machine is filled to `--utilisation`, Redis runs commands on one thread
//! (a shard is one core) and one event's keys are one hash slot (one
//! shard), and tansu is not Apache Kafka: the broker column measured here
//! is tansu's, and Kafka's is from a published benchmark on other hardware.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use couponrush_core::cli::parse_duration;
use couponrush_harness::TansuStorage;
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use couponrush_loadgen::Verdict;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::deployment::{Deployment, DropSpec, KafkaChoice, Members, Spec, StoreChoice};
use crate::LabError;

/// `coupon-lab capacity`.
#[derive(Debug, Clone, Args)]
pub struct CapacityArgs {
    /// Fixed request rates to measure at (open loop), requests/s.
    #[arg(
        long,
        env = "CAPACITY_RATES",
        value_delimiter = ',',
        default_value = "1000,3000"
    )]
    pub rates: Vec<f64>,
    /// Seconds of load at each rate.
    #[arg(long, env = "CAPACITY_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Request partitions of the deployment measured.
    #[arg(long, env = "CAPACITY_PARTITIONS", default_value_t = 8)]
    pub partitions: i32,
    /// Issuer processes of the deployment measured.
    #[arg(long, env = "CAPACITY_ISSUERS", default_value_t = 2)]
    pub issuers: usize,
    /// Request rates to plan for, requests/s.
    #[arg(
        long,
        env = "CAPACITY_TARGETS",
        value_delimiter = ',',
        default_value = "10000,100000,1000000"
    )]
    pub targets: Vec<f64>,
    /// Cores of one machine in the plan (an api instance, a broker).
    #[arg(long, env = "CAPACITY_INSTANCE_CORES", default_value_t = 4)]
    pub instance_cores: u32,
    /// Fraction of its cores a planned machine is filled to (headroom for
    /// bursts and a lost member).
    #[arg(long, env = "CAPACITY_UTILISATION", default_value_t = 0.6)]
    pub utilisation: f64,
    /// Directory for CAPACITY.md and capacity.json.
    #[arg(long, env = "CAPACITY_OUT", default_value = "capacity-out")]
    pub out: PathBuf,
}

/// A stage of the pipeline, as the plan counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The load generator (this process: senders, the outcome observer).
    Loadgen,
    /// `coupon-api`.
    Api,
    /// The broker (tansu here).
    Broker,
    /// `coupon-issuer`, all of them.
    Issuer,
    /// redis-server.
    Redis,
}

impl Stage {
    const ALL: [Stage; 5] = [
        Stage::Loadgen,
        Stage::Api,
        Stage::Broker,
        Stage::Issuer,
        Stage::Redis,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::Loadgen => "load generator",
            Stage::Api => "api",
            Stage::Broker => "broker (tansu)",
            Stage::Issuer => "issuer",
            Stage::Redis => "Redis",
        }
    }
}

/// One stage's cost in one drop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageCost {
    /// Which.
    pub stage: Stage,
    /// Processes counted.
    pub processes: usize,
    /// CPU-seconds over the drop's window.
    pub cpu_seconds: f64,
    /// CPU-seconds per second while idle, just before the drop.
    pub idle_cpu_per_second: f64,
    /// CPU-seconds per 1,000 requests decided.
    pub cpu_seconds_per_1000: f64,
    /// Requests/s one core of this stage carries (1,000 ÷ the above).
    pub per_core_ceiling: f64,
}

/// One drop at a fixed rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateRun {
    /// Offered rate, requests/s.
    pub rate: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests accepted (202).
    pub accepted: u64,
    /// Requests decided (on the outcomes topic).
    pub decided: u64,
    /// Seconds of load.
    pub load_seconds: f64,
    /// Seconds of the window the CPU was read over (load and drain).
    pub window_seconds: f64,
    /// Each stage's cost.
    pub stages: Vec<StageCost>,
    /// CPU-seconds of every stage together.
    pub total_cpu_seconds: f64,
    /// The audit's verdict (nothing oversold, doubled or lost).
    pub passed: bool,
}

/// What one target rate needs, from one measured drop's costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRow {
    /// Requests/s planned for.
    pub target: f64,
    /// Cores each stage needs at 100 % (the raw arithmetic).
    pub cores: BTreeMap<Stage, f64>,
    /// `coupon-api` machines.
    pub api_instances: u64,
    /// `coupon-issuer` processes (one core each: its loop is one thread).
    pub issuers: u64,
    /// Request partitions (twice the issuers, so they can double without
    /// repartitioning, which would move keys).
    pub partitions: u64,
    /// Broker machines at tansu's measured cost.
    pub brokers_tansu: u64,
    /// Kafka brokers from the published figure (at least 3, for RF 3).
    pub brokers_kafka: u64,
    /// Redis shards for the load spread over many events.
    pub redis_shards: u64,
    /// Whether one event (one hash slot, one shard) can take the target.
    pub one_event_fits: bool,
    /// Load generator cores to drive it.
    pub loadgen_cores: f64,
    /// The stage with the least headroom in this plan, for one event.
    pub first_to_saturate: String,
}

/// The whole result: measurements, then the plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capacity {
    /// Cores of this machine.
    pub cores: usize,
    /// When, µs since the epoch.
    pub measured_at: u64,
    /// The deployment measured.
    pub deployment: serde_json::Value,
    /// The drops, one per rate.
    pub runs: Vec<RateRun>,
    /// The rate whose costs the plan uses (the highest that passed).
    pub basis_rate: f64,
    /// Cores of a planned machine.
    pub instance_cores: u32,
    /// Fill of a planned machine.
    pub utilisation: f64,
    /// The published figure the Kafka column uses, records/s for a cluster
    /// of 3 brokers with acks=all.
    pub kafka_published_records_per_s: f64,
    /// The plan.
    pub plan: Vec<PlanRow>,
}

/// Kafka's published figure the plan's Kafka column scales: 421,823
/// records/s of 100 bytes from one producer thread to 3 brokers with 3×
/// synchronous replication (acks=all), 6-core 2.5 GHz Xeons, 2014 (J. Kreps,
/// "Benchmarking Apache Kafka: 2 Million Writes Per Second (On Three Cheap
/// Machines)", LinkedIn engineering blog). Not measured here.
pub const KAFKA_PUBLISHED_ACKS_ALL: f64 = 421_823.0;

/// Measures, plans, and writes `CAPACITY.md` and `capacity.json` to `--out`.
pub async fn capacity(args: CapacityArgs, cancel: CancellationToken) -> Result<Verdict, LabError> {
    let cap = measure(&args, cancel).await?;
    std::fs::create_dir_all(&args.out).map_err(|source| LabError::Write {
        path: args.out.clone(),
        source,
    })?;
    let write = |name: &str, bytes: &[u8]| {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).map_err(|source| LabError::Write { path, source })
    };
    write(
        "capacity.json",
        &serde_json::to_vec_pretty(&cap).expect("the capacity serialises"),
    )?;
    let md = markdown(&cap, &args);
    write("CAPACITY.md", md.as_bytes())?;
    println!("{md}");
    println!(
        "wrote CAPACITY.md and capacity.json to {}",
        args.out.display()
    );
    Ok(if cap.runs.iter().all(|r| r.passed) {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

/// Runs the drops and computes the plan.
pub async fn measure(args: &CapacityArgs, cancel: CancellationToken) -> Result<Capacity, LabError> {
    if args.rates.is_empty() || args.rates.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
        return Err(LabError::Capacity(
            "--rates must be positive numbers of requests/s, e.g. 1000,3000".into(),
        ));
    }
    if !(args.utilisation > 0.0 && args.utilisation <= 1.0) {
        return Err(LabError::Capacity(
            "--utilisation must be in (0, 1], e.g. 0.6".into(),
        ));
    }
    if args.instance_cores == 0 || args.issuers == 0 || args.partitions < 1 {
        return Err(LabError::Capacity(
            "--instance-cores, --issuers and --partitions must be at least 1".into(),
        ));
    }
    let dir = std::env::temp_dir().join(format!(
        "couponrush-capacity-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let result = measure_in(args, &dir, cancel).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure_in(
    args: &CapacityArgs,
    dir: &std::path::Path,
    cancel: CancellationToken,
) -> Result<Capacity, LabError> {
    let deployment = Deployment::start(Spec {
        members: Members::Processes {
            api_args: Vec::new(),
            issuer_args: Vec::new(),
        },
        dir: Some(dir.to_path_buf()),
        ..Spec::in_process(
            KafkaChoice::Tansu(TansuStorage::Memory),
            StoreChoice::PrivateRedis { aof: true },
            args.partitions,
            args.issuers,
        )
    })
    .await?;
    if !deployment.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let pids = deployment.pids();
    let stages: Vec<(Stage, Vec<u32>)> = vec![
        (Stage::Loadgen, vec![std::process::id()]),
        (Stage::Api, pids.api.into_iter().collect()),
        (Stage::Broker, pids.broker.into_iter().collect()),
        (Stage::Issuer, pids.issuers.clone()),
        (Stage::Redis, pids.redis.into_iter().collect()),
    ];
    if let Some((stage, _)) = stages.iter().find(|(_, p)| p.is_empty()) {
        return Err(LabError::Capacity(format!(
            "the deployment has no {} process to measure",
            stage.name()
        )));
    }
    let mut runs = Vec::new();
    for &rate in &args.rates {
        if cancel.is_cancelled() {
            return Err(LabError::Cancelled);
        }
        runs.push(one_rate(&deployment, &stages, args, rate, &cancel).await?);
    }
    deployment.stop().await;
    let basis = runs
        .iter()
        .filter(|r| r.passed)
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .ok_or_else(|| {
            LabError::Capacity(
                "no drop passed its audit (see above): there is nothing sound to plan from".into(),
            )
        })?;
    let plan = args
        .targets
        .iter()
        .map(|&t| plan_row(basis, t, args.instance_cores, args.utilisation))
        .collect();
    Ok(Capacity {
        cores: cores(),
        measured_at: couponrush_core::wire::now_micros(),
        deployment: serde_json::json!({
            "api": 1,
            "issuers": args.issuers,
            "partitions": args.partitions,
            "broker": "tansu 0.6, memory storage, one broker",
            "redis": "redis-server, appendonly yes, appendfsync always",
            "load": "open loop, 256 connections, uniform users, no retries, stock a tenth of the requests",
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        }),
        basis_rate: basis.rate,
        runs,
        instance_cores: args.instance_cores,
        utilisation: args.utilisation,
        kafka_published_records_per_s: KAFKA_PUBLISHED_ACKS_ALL,
        plan,
    })
}

/// Cores this process may run on.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU-seconds `pids` have used, together.
fn cpu_of(pids: &[u32]) -> Result<f64, LabError> {
    pids.iter()
        .map(|&pid| {
            cpu_seconds(pid).map_err(|e| {
                LabError::Capacity(format!("cannot read the CPU time of process {pid}: {e}"))
            })
        })
        .sum()
}

/// Linux reports `/proc` times in USER_HZ ticks, fixed at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU-seconds process `pid` has used: user and system time of all its
/// threads, plus those of the children it waited for (`/proc/<pid>/stat`
/// fields 14 to 17).
pub fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {stat:?}"),
        )
    })
}

/// The CPU-seconds in a `/proc/<pid>/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses itself, so the
/// fields are counted from the last `)`.
fn parse_stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, so utime (14) is the 12th here.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / TICKS_PER_SECOND)
}

async fn one_rate(
    deployment: &Deployment,
    stages: &[(Stage, Vec<u32>)],
    args: &CapacityArgs,
    rate: f64,
    cancel: &CancellationToken,
) -> Result<RateRun, LabError> {
    let requests = ((rate * args.duration.as_secs_f64()).round() as u64).max(1);
    // Idle: what the processes burn doing nothing, for a second.
    let idle_before = read_all(stages)?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_after = read_all(stages)?;
    let idle_secs = idle_started.elapsed().as_secs_f64();

    let event = format!("capacity-{}", uuid::Uuid::new_v4().simple());
    let drop = DropSpec {
        plan: LoadPlan {
            event_id: event,
            model: LoadModel::Rate(rate),
            requests,
            // The count ends the load, not the clock (with room for a
            // rate the deployment cannot keep: it is then measured as slower).
            duration: args.duration * 3 + Duration::from_secs(5),
            connections: 256,
            population: Population::new(requests, UserDist::Uniform, 0.0, 1),
        },
        terms: EventTerms {
            stock: (requests / 10).max(1) as u32,
            per_user_limit: 1,
        },
        drain_timeout: Duration::from_secs(60),
        admin_token: None,
        progress: false,
        keep_raw: false,
        config: serde_json::json!({ "rate": rate, "requests": requests }),
        live: None,
        holds: None,
        stock_buckets: 1,
    };
    let before = read_all(stages)?;
    let started = Instant::now();
    let report = deployment.drop_through_api(drop, cancel.clone()).await?;
    let after = read_all(stages)?;
    let window = started.elapsed().as_secs_f64();
    let decided = report.decided.max(1) as f64;
    let costs: Vec<StageCost> = stages
        .iter()
        .enumerate()
        .map(|(i, (stage, pids))| {
            let cpu = (after[i] - before[i]).max(0.0);
            let per_1000 = cpu * 1000.0 / decided;
            StageCost {
                stage: *stage,
                processes: pids.len(),
                cpu_seconds: cpu,
                idle_cpu_per_second: (idle_after[i] - idle_before[i]).max(0.0) / idle_secs,
                cpu_seconds_per_1000: per_1000,
                per_core_ceiling: if per_1000 > 0.0 {
                    1000.0 / per_1000
                } else {
                    f64::INFINITY
                },
            }
        })
        .collect();
    let passed =
        report.passed && report.decided == report.accepted && report.accepted == report.requests;
    let run = RateRun {
        rate,
        sent: report.requests,
        accepted: report.accepted,
        decided: report.decided,
        load_seconds: report.load_seconds,
        window_seconds: window,
        total_cpu_seconds: costs.iter().map(|c| c.cpu_seconds).sum(),
        stages: costs,
        passed,
    };
    eprintln!(
        "rate {rate}/s: {} sent, {} accepted, {} decided in {:.1} s; CPU {:.2} s ({})",
        run.sent,
        run.accepted,
        run.decided,
        run.window_seconds,
        run.total_cpu_seconds,
        run.stages
            .iter()
            .map(|c| format!("{} {:.2}", c.stage.name(), c.cpu_seconds))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(run)
}

fn read_all(stages: &[(Stage, Vec<u32>)]) -> Result<Vec<f64>, LabError> {
    stages.iter().map(|(_, pids)| cpu_of(pids)).collect()
}

/// The plan for `target` requests/s from `basis`'s costs.
pub fn plan_row(basis: &RateRun, target: f64, instance_cores: u32, utilisation: f64) -> PlanRow {
    let per_1000 = |s: Stage| {
        basis
            .stages
            .iter()
            .find(|c| c.stage == s)
            .map_or(0.0, |c| c.cpu_seconds_per_1000)
    };
    let cores: BTreeMap<Stage, f64> = Stage::ALL
        .iter()
        .map(|&s| (s, target * per_1000(s) / 1000.0))
        .collect();
    let machine = f64::from(instance_cores) * utilisation;
    let count = |c: f64, per: f64| ((c / per).ceil() as u64).max(1);
    let api_instances = count(cores[&Stage::Api], machine);
    let issuers = count(cores[&Stage::Issuer], utilisation);
    let brokers_tansu = count(cores[&Stage::Broker], machine);
    // Two records written per request (the request, its outcome), acks=all.
    let brokers_kafka = 3 * count(2.0 * target, KAFKA_PUBLISHED_ACKS_ALL * utilisation);
    let redis_shards = count(cores[&Stage::Redis], utilisation);
    let one_event_fits = cores[&Stage::Redis] <= utilisation;
    // Requests/s each stage of this plan carries at full use, for one
    // event (its Redis is one shard whatever the shard count).
    let carries = |s: Stage, machines: f64, cores_each: f64| {
        let p = per_1000(s);
        if p > 0.0 {
            machines * cores_each * 1000.0 / p
        } else {
            f64::INFINITY
        }
    };
    let ceilings = [
        (
            "api",
            carries(Stage::Api, api_instances as f64, f64::from(instance_cores)),
        ),
        ("issuer", carries(Stage::Issuer, issuers as f64, 1.0)),
        (
            "broker (tansu)",
            carries(
                Stage::Broker,
                brokers_tansu as f64,
                f64::from(instance_cores),
            ),
        ),
        (
            "Redis (one event: one shard)",
            carries(Stage::Redis, 1.0, 1.0),
        ),
    ];
    let (first, ceiling) = ceilings
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .copied()
        .expect("four stages");
    PlanRow {
        target,
        api_instances,
        issuers,
        partitions: 2 * issuers,
        brokers_tansu,
        brokers_kafka,
        redis_shards,
        one_event_fits,
        loadgen_cores: cores[&Stage::Loadgen],
        cores,
        first_to_saturate: format!("{first} at {}", human(ceiling)),
    }
}

/// 12,345 or 1.2M.
fn human(v: f64) -> String {
    if !v.is_finite() {
        return "∞".into();
    }
    if v >= 1e6 {
        format!("{:.1}M/s", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k/s", v / 1e3)
    } else {
        format!("{}/s", thousands(v))
    }
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The document: measured tables first, then the plan, each labelled.
pub fn markdown(cap: &Capacity, args: &CapacityArgs) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let rates = cap
        .runs
        .iter()
        .map(|r| format!("{}", r.rate))
        .collect::<Vec<_>>()
        .join(",");
    let _ = writeln!(md, "# Capacity\n");
    let _ = writeln!(
        md,
        "Generated by `coupon-lab capacity --rates {rates} --duration {} --partitions {} --issuers {} --instance-cores {} --utilisation {} --out {}` \
         ({} build, {} cores). Rewrite it with the same command; `capacity.json` beside it has every figure.\n",
        humantime_secs(args.duration),
        args.partitions,
        args.issuers,
        cap.instance_cores,
        cap.utilisation,
        args.out.display(),
        cap.deployment["build"].as_str().unwrap_or("?"),
        cap.cores,
    );
    let _ = writeln!(md, "## Measured on this machine\n");
    let _ = writeln!(
        md,
        "One `coupon-api`, {} `coupon-issuer` processes, {} partitions, one tansu (memory storage), one redis-server \
         (AOF, `appendfsync always`), and the load generator (`coupon-lab` itself: the senders and the outcome observer), \
         all on the same {} cores over loopback. Each drop is open loop at a fixed rate; each process's CPU time \
         (user + system, all threads, `/proc/<pid>/stat`) is read just before the first request and once the last \
         decision was observed, so the window holds all the work the drop caused (load and drain). \
         Idle CPU is read over one second before each drop. The machine is shared and noisy: CPU time per \
         process is much steadier than a rate, but cache and scheduler contention still move it.\n",
        args.issuers, args.partitions, cap.cores
    );
    for r in &cap.runs {
        let _ = writeln!(
            md,
            "### {} requests/s{}\n\n{} sent, {} accepted, {} decided; {:.1} s of load, a {:.1} s window; \
             every stage together {:.2} CPU-s of at most {:.1} (window × cores).\n",
            thousands(r.rate),
            if r.rate == cap.basis_rate { " (the plan's basis)" } else { "" },
            thousands(r.sent as f64),
            thousands(r.accepted as f64),
            thousands(r.decided as f64),
            r.load_seconds,
            r.window_seconds,
            r.total_cpu_seconds,
            r.window_seconds * cap.cores as f64,
        );
        let _ = writeln!(
            md,
            "| stage | processes | CPU-s | CPU-s per 1,000 requests | requests/s per core | idle CPU-s per s |\n|---|---|---|---|---|---|"
        );
        for c in &r.stages {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.4} | {} | {:.3} |",
                c.stage.name(),
                c.processes,
                c.cpu_seconds,
                c.cpu_seconds_per_1000,
                thousands(c.per_core_ceiling),
                c.idle_cpu_per_second
            );
        }
        if !r.passed {
            let _ = writeln!(md, "\n**This drop did not pass its audit, or not every request was accepted and decided: its figures are not used.**");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## The plan (extrapolated)\n");
    let _ = writeln!(
        md,
        "Arithmetic on the {} requests/s drop's costs, not a measurement: cores = target × CPU-s per 1,000 ÷ 1,000, \
         taken as linear in the rate (per-request cost falls as batches grow, so this errs high). A machine has {} cores \
         filled to {:.0} %; an issuer is one core (its decide loop is one thread), partitions are twice the issuers \
         (so the issuers can double without adding partitions, which would move keys); a Redis shard is one core \
         (commands run on one thread). **One event's keys are one hash slot, so one event is one shard**: the Redis \
         shards column is for load spread over many events, and a drop of one event faster than one shard's ceiling \
         needs its stock split over buckets (see \"When to bucket one event\" below).\n",
        thousands(cap.basis_rate),
        cap.instance_cores,
        cap.utilisation * 100.0
    );
    let _ = writeln!(
        md,
        "| requests/s | api instances | issuers | partitions | brokers at tansu's cost | Kafka brokers (published figure) | Redis shards (many events) | one event fits one shard | load generator cores | first to saturate (one event) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &cap.plan {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            human(p.target),
            p.api_instances,
            p.issuers,
            p.partitions,
            p.brokers_tansu,
            p.brokers_kafka,
            p.redis_shards,
            if p.one_event_fits { "yes" } else { "**no**" },
            p.loadgen_cores,
            p.first_to_saturate
        );
    }
    let _ = writeln!(
        md,
        "\nWhat comes from where:\n\n\
         - **Measured here**: every CPU-s figure above, and the per-core ceilings (1,000 ÷ CPU-s per 1,000).\n\
         - **Extrapolated**: the whole plan. Nothing here ran at 10k requests/s or more end to end; the counts assume \
         the costs stay linear and the stages scale out (api, issuers and brokers do; one event's Redis does only when \
         its stock is split over buckets).\n\
         - **Broker**: tansu is not Apache Kafka. The \"brokers at tansu's cost\" column is tansu's measured CPU; \
         the Kafka column is not measured at all: it scales a published figure, {} records/s of 100 bytes from one \
         producer thread to 3 brokers with acks=all (3× synchronous replication) on 6-core 2.5 GHz Xeons \
         (J. Kreps, *Benchmarking Apache Kafka: 2 Million Writes Per Second (On Three Cheap Machines)*, LinkedIn, 2014), \
         counting two records written per request (the request and its outcome), in multiples of 3 brokers, \
         filled to {:.0} %. Consumer reads, compression and today's hardware are not in it: read it as an order of magnitude.\n\
         - **Load generator**: the cores it took here to offer and observe the load; a real drop's clients are not yours to plan, \
         but a test of the target needs this many generator cores (`coupon-loadgen merge` joins several).\n\n## When to bucket one event\n\n\
         Bucket an event (`\"stock_buckets\": K` on `PUT /v1/events/{{e}}`, `--stock-buckets K` on the load tools) only when \
         its own decisions per second would outrun one Redis core (the Redis row above, per core) or when one event would \
         keep one master hot while the others idle. K buckets put its stock on K slots, so up to K masters (a random \
         event's K slots fall on fewer masters than K when K is small: pick K at least twice the masters). What it \
         costs: each issuer batch becomes one script call per bucket (more Redis CPU per decision when batches are \
         small), and **undersell**: a bucket that runs dry answers `sold_out` while another still holds stock, which the \
         load generator's report counts (`undersell`). Below one core's ceiling, or for a drop where one `sold_out` too \
         early matters more than throughput, keep K = 1: many events already spread over the masters by themselves. \
         Measured side by side: docs/BENCHMARKS.md, \"One hot event over stock buckets\".\n",
        thousands(KAFKA_PUBLISHED_ACKS_ALL),
        cap.utilisation * 100.0
    );
    md
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime ...
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 4 0 10 0 0";
        assert_eq!(parse_stat_cpu(stat), Some(3.1));
        assert_eq!(parse_stat_cpu("42 (x) S 1"), None);
        // This process has used some CPU to get here.
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

    fn run(costs: [(Stage, f64); 5]) -> RateRun {
        RateRun {
            rate: 1000.0,
            sent: 1000,
            accepted: 1000,
            decided: 1000,
            load_seconds: 1.0,
            window_seconds: 1.0,
            total_cpu_seconds: 0.0,
            stages: costs
                .iter()
                .map(|&(stage, p)| StageCost {
                    stage,
                    processes: 1,
                    cpu_seconds: p,
                    idle_cpu_per_second: 0.0,
                    cpu_seconds_per_1000: p,
                    per_core_ceiling: 1000.0 / p,
                })
                .collect(),
            passed: true,
        }
    }

    #[test]
    fn the_plan_scales_each_stage_by_its_own_cost_and_names_the_tightest() {
        // Per 1,000 requests: api 0.1 CPU-s (10k/s a core), issuer 0.02,
        // broker 0.05, Redis 0.01 (100k/s on its one thread).
        let basis = run([
            (Stage::Loadgen, 0.08),
            (Stage::Api, 0.1),
            (Stage::Broker, 0.05),
            (Stage::Issuer, 0.02),
            (Stage::Redis, 0.01),
        ]);
        let p = plan_row(&basis, 100_000.0, 4, 0.5);
        // 10 api cores / (4 × 0.5) = 5 machines; 2 issuer cores / 0.5 = 4.
        assert_eq!((p.api_instances, p.issuers, p.partitions), (5, 4, 8));
        assert_eq!(p.brokers_tansu, 3);
        // 1 Redis core at a 0.5 fill: 2 shards, and one event does not fit.
        assert_eq!(p.redis_shards, 2);
        assert!(!p.one_event_fits);
        assert!(
            p.first_to_saturate.starts_with("Redis"),
            "{}",
            p.first_to_saturate
        );
        // Ten times the target, ten times the cores.
        let q = plan_row(&basis, 1_000_000.0, 4, 0.5);
        assert!((q.cores[&Stage::Api] - 10.0 * p.cores[&Stage::Api]).abs() < 1e-9);
        assert_eq!(q.api_instances, 50);
        assert!(q.brokers_kafka >= p.brokers_kafka && q.brokers_kafka % 3 == 0);
        // A small target fits everywhere, one machine each.
        let s = plan_row(&basis, 1_000.0, 4, 0.5);
        assert_eq!(
            (s.api_instances, s.issuers, s.redis_shards, s.brokers_kafka),
            (1, 1, 1, 3)
        );
        assert!(s.one_event_fits);
    }
}
