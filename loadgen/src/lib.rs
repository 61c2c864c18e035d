//! # couponrush-loadgen
//!
//! The measuring instrument of couponrush: it offers load to a coupon drop
//! running somewhere else and measures what a first-come drop is judged by,
//! including what no other load tool measures: whether the winners were
//! really the first (ordering skew, fairness), and whether anything was
//! oversold, issued twice, lost or invented (the audit, cross-checked between
//! the outcome stream and the store). It exits non-zero when a correctness
//! figure is not zero. It depends on `couponrush-core` only; what starts a
//! deployment itself lives in `couponrush-lab`.
//!
//! # Layout
//! - [`Cli`]: the subcommands `run` and `merge`; [`main`] dispatches them.
//! - [`run`]: one drop end to end; [`drive`]: the load models and targets
//!   (HTTP, or Kafka directly), the line mode ([`drive::line`]: a drop
//!   behind a waiting room) and the holders ([`drive::holders`]: winners
//!   who claim, cancel or never claim); [`population`]: users and retries;
//!   [`observe`]: the outcome watcher.
//! - [`measure`]: latency histograms, ordering skew, the audit (pure
//!   functions, unit-tested on hand-made data).
//! - [`report`]: figures, text, JSON, merges; [`chart`]: SVG charts.
//! - [`dashboard`]: the live page (`--dashboard`), fed while the drop runs;
//!   [`html`]: the same page as one self-contained report file (`--html`,
//!   `coupon-loadgen html`).

pub mod chart;
pub mod dashboard;
pub mod drive;
mod error;
pub mod html;
pub mod measure;
pub mod observe;
pub mod population;
pub mod report;
pub mod run;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::FalseyValueParser;
use clap::{Args, Parser, Subcommand};
use couponrush_core::cli::{parse_duration, KafkaArgs, LogArgs, TopicArgs};
use couponrush_core::kafka::partition_counts;
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{Store, DEFAULT_DEDUP_RETENTION};
use couponrush_core::Partitioner;
use tokio_util::sync::CancellationToken;

use crate::drive::holders::HoldPlan;
use crate::drive::{LoadModel, LoadPlan};
use crate::measure::audit::EventTerms;
use crate::population::{Population, UserDist};
use crate::report::Report;
use crate::run::{run_drop_with_holds, DropRun, Via};

pub use crate::error::Error;

/// `coupon-loadgen`: load-test a coupon drop and audit it.
#[derive(Debug, Parser)]
#[command(name = "coupon-loadgen", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drive one drop against a running api (or Kafka directly) and audit it.
    Run(Box<RunArgs>),
    /// Merge the JSON reports of several load generators of one drop.
    Merge(MergeArgs),
    /// A drop behind a waiting room: clients join, poll, some walk away,
    /// the admitted issue; the line and the drop are measured and audited.
    Line(Box<LineCmdArgs>),
    /// Write the self-contained HTML report of a JSON report (a merged one too).
    Html(html::HtmlArgs),
}

/// `coupon-loadgen line`.
#[derive(Debug, Clone, Args)]
pub struct LineCmdArgs {
    /// The api's base URL (its --line-backend must not be none).
    #[arg(long, env = "LOADGEN_TARGET", default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Admin token for setting up the event and its room.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Redis URL of the coupon store, to audit it: redis://host:port/db for
    /// one server, redis+cluster://host:port,host:port,… for a Redis Cluster.
    #[arg(long = "redis", env = "LOADGEN_REDIS_URL")]
    pub redis: Option<String>,
    /// Per-request HTTP timeout (a request is cut off after 1 to 1.1 times
    /// this: one timer per connection, re-armed a few times per timeout).
    #[arg(long, env = "LOADGEN_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Wait at most this long after the clients for the last decisions.
    #[arg(long, env = "LOADGEN_DRAIN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub topics: TopicArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub event: EventArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub line: drive::line::LineArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// Runs `coupon-loadgen line`.
pub async fn line(
    args: LineCmdArgs,
    cancel: CancellationToken,
) -> Result<drive::line::LineReport, Error> {
    let store = match &args.redis {
        Some(url) => Some(redis_store(url).await?),
        None => None,
    };
    let event = args.event.event_id();
    let config = serde_json::json!({
        "command": "line",
        "target": args.target,
        "load": args.line.describe(),
        "event": event,
        "stock": args.event.stock,
    });
    let run = drive::line::LineRun {
        endpoint: drive::http::Endpoint::parse(&args.target).await?,
        admin_token: args.admin_token.clone(),
        kafka: args.kafka.settings(),
        topics: args.topics.topics(),
        store,
        event_id: event,
        terms: EventTerms {
            stock: args.event.stock,
            per_user_limit: args.event.per_user_limit,
        },
        line: args.line.clone(),
        timeout: args.request_timeout,
        drain_timeout: args.drain_timeout,
        keep_raw: !args.output.no_raw,
        config,
        progress: !args.output.quiet,
    };
    drive::line::run_line(run, cancel).await
}

impl OutputArgs {
    /// Prints a line run's report and writes its JSON.
    pub fn emit_line(&self, report: &drive::line::LineReport) -> Result<(), Error> {
        println!("{}", report.text());
        if let Some(path) = &self.json {
            let json = serde_json::to_vec_pretty(report).expect("a report serialises");
            std::fs::write(path, json).map_err(|source| Error::File {
                doing: "write",
                path: path.clone(),
                source,
            })?;
            println!("report written to {}", path.display());
        }
        let drop = report.drop_with_line_notes();
        if let Some(path) = &self.chart {
            std::fs::write(path, chart::drop_chart(&drop)).map_err(|source| Error::File {
                doing: "write",
                path: path.clone(),
                source,
            })?;
            println!("chart written to {}", path.display());
        }
        if let Some(path) = &self.html {
            html::write(&drop, path)?;
            println!("HTML report written to {}", path.display());
        }
        Ok(())
    }
}

/// How much load, shaped how.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Open loop: this many requests per second (latency corrected for coordinated omission).
    #[arg(long, env = "LOADGEN_RATE", conflicts_with_all = ["concurrency", "burst"])]
    pub rate: Option<f64>,
    /// Closed loop: this many requests in flight.
    #[arg(long, env = "LOADGEN_CONCURRENCY", conflicts_with = "burst")]
    pub concurrency: Option<usize>,
    /// Release N requests at one instant (the doors open). The default model.
    #[arg(long, env = "LOADGEN_BURST")]
    pub burst: Option<u64>,
    /// Logical requests to send at most (retries not counted).
    #[arg(long, env = "LOADGEN_REQUESTS")]
    pub requests: Option<u64>,
    /// Stop sending after this long, whatever the count.
    #[arg(long, env = "LOADGEN_DURATION", default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Connections (workers) for rate and burst.
    #[arg(long, env = "LOADGEN_CONNECTIONS", default_value_t = 256)]
    pub connections: usize,
    /// Distinct users.
    #[arg(long, env = "LOADGEN_USERS")]
    pub users: Option<u64>,
    /// User distribution: uniform or zipf:S.
    #[arg(long, env = "LOADGEN_USER_DIST", default_value = "uniform")]
    pub user_dist: UserDist,
    /// Fraction of requests re-sent with the same Idempotency-Key (half at once).
    #[arg(long, env = "LOADGEN_RETRY_RATIO")]
    pub retry_ratio: Option<f64>,
    /// Seed of every random choice.
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Wait at most this long after the load for the last decisions.
    #[arg(long, env = "LOADGEN_DRAIN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Defaults a subcommand gives to the optional load flags.
#[derive(Debug, Clone, Copy)]
pub struct LoadDefaults {
    /// Requests.
    pub requests: u64,
    /// Users.
    pub users: u64,
    /// Retry ratio.
    pub retry_ratio: f64,
}

impl LoadArgs {
    /// The load plan for `event`.
    pub fn plan(&self, event_id: &str, d: LoadDefaults) -> Result<LoadPlan, Error> {
        let (model, requests) = match (self.rate, self.concurrency, self.burst) {
            (Some(r), _, _) if !(r > 0.0 && r.is_finite()) => {
                return Err(Error::BadFlag {
                    flag: "--rate",
                    expected: "must be a positive number",
                })
            }
            (Some(r), _, _) => (LoadModel::Rate(r), self.requests.unwrap_or(d.requests)),
            (_, Some(0), _) => {
                return Err(Error::BadFlag {
                    flag: "--concurrency",
                    expected: "must be at least 1",
                })
            }
            (_, Some(c), _) => (
                LoadModel::Concurrency(c),
                self.requests.unwrap_or(d.requests),
            ),
            (_, _, Some(n)) => (LoadModel::Burst, n),
            _ => (LoadModel::Burst, self.requests.unwrap_or(d.requests)),
        };
        let retry = self.retry_ratio.unwrap_or(d.retry_ratio);
        if !(0.0..=1.0).contains(&retry) {
            return Err(Error::BadFlag {
                flag: "--retry-ratio",
                expected: "must be between 0 and 1",
            });
        }
        Ok(LoadPlan {
            event_id: event_id.to_string(),
            model,
            requests,
            duration: self.duration,
            connections: self.connections.max(1),
            population: Population::new(
                self.users.unwrap_or(d.users),
                self.user_dist,
                retry,
                self.seed,
            ),
        })
    }

    /// A one-line description of `plan`, for reports.
    pub fn describe(plan: &LoadPlan) -> String {
        let p = &plan.population;
        format!(
            "{} of {} requests from {} {} users, {:.0}% retried with the same key, {} connections, at most {:?}",
            plan.model,
            plan.requests,
            p.users(),
            p.dist(),
            p.retry_ratio() * 100.0,
            plan.connections,
            plan.duration
        )
    }
}

/// Holds: each issued coupon is held for a claim window, and the winners
/// claim, cancel or never claim it.
#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    /// Create the event with holds: each coupon is held this long for its
    /// claim, then expires back to stock (default: no holds, coupons are final).
    #[arg(long, env = "LOADGEN_CLAIM_WINDOW", value_parser = parse_duration)]
    pub claim_window: Option<Duration>,
    /// Fraction of winners who cancel their hold (chosen by seed and user).
    #[arg(
        long,
        env = "LOADGEN_CANCEL_RATIO",
        default_value_t = 0.0,
        requires = "claim_window"
    )]
    pub cancel_ratio: f64,
    /// Fraction of winners who never claim (their hold expires).
    #[arg(
        long,
        env = "LOADGEN_NO_CLAIM_RATIO",
        default_value_t = 0.0,
        requires = "claim_window"
    )]
    pub no_claim_ratio: f64,
    /// Longest think time before a winner claims or cancels (default: a
    /// quarter of the claim window, at most 1s).
    #[arg(long, env = "LOADGEN_THINK_TIME", value_parser = parse_duration, requires = "claim_window")]
    pub think_time: Option<Duration>,
    /// How long past its deadline a hold may take to end (the expiry sweep's
    /// period); the run waits that long at most, and the audit calls a hold
    /// still held after it stuck.
    #[arg(long, env = "LOADGEN_HOLD_SLACK", default_value = "10s", value_parser = parse_duration)]
    pub hold_slack: Duration,
}

impl HoldArgs {
    /// The holders' plan, when `--claim-window` asks for holds.
    pub fn plan(&self, seed: u64, connections: usize) -> Option<HoldPlan> {
        let window = self.claim_window?;
        Some(HoldPlan {
            claim_window: window,
            cancel_ratio: self.cancel_ratio,
            no_claim_ratio: self.no_claim_ratio,
            think_time: self
                .think_time
                .unwrap_or_else(|| (window / 4).min(Duration::from_secs(1))),
            slack: self.hold_slack,
            connections: connections.clamp(1, 64),
            seed,
        })
    }

    /// A one-line description of `plan`, for reports.
    pub fn describe(plan: &HoldPlan) -> String {
        format!(
            "claim window {:?}; {:.0}% of winners cancel, {:.0}% never claim, the rest claim, after up to {:?}",
            plan.claim_window,
            plan.cancel_ratio * 100.0,
            plan.no_claim_ratio * 100.0,
            plan.think_time
        )
    }
}

/// The event to drop.
#[derive(Debug, Clone, Args)]
pub struct EventArgs {
    /// Event id (default: drop-<unix ms>, a fresh one per run).
    #[arg(long, env = "LOADGEN_EVENT")]
    pub event: Option<String>,
    /// Coupons available.
    #[arg(long, env = "LOADGEN_STOCK", default_value_t = 1000)]
    pub stock: u32,
    /// Coupons one user may hold.
    #[arg(long, env = "LOADGEN_PER_USER_LIMIT", default_value_t = 1)]
    pub per_user_limit: u32,
    /// Split the event's stock over this many buckets, each on its own
    /// Redis slot (1 to 64; 1: one slot). Spreads one hot event over a
    /// Redis Cluster; costs undersell (a bucket answers sold_out while
    /// another still holds stock), which the report counts.
    #[arg(long, env = "LOADGEN_STOCK_BUCKETS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub stock_buckets: u32,
    /// Do not create or reset the event (it exists; e.g. the second of several generators).
    #[arg(long, env = "LOADGEN_NO_SETUP", value_parser = FalseyValueParser::new())]
    pub no_setup: bool,
}

impl EventArgs {
    /// The event id to use.
    pub fn event_id(&self) -> String {
        self.event
            .clone()
            .unwrap_or_else(|| format!("drop-{}", couponrush_core::wire::now_micros() / 1000))
    }
}

/// Where the report goes.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Write the JSON report here.
    #[arg(long, env = "LOADGEN_JSON")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart here.
    #[arg(long, env = "LOADGEN_CHART")]
    pub chart: Option<PathBuf>,
    /// Write the self-contained HTML report here (one file, opens offline).
    #[arg(long, env = "LOADGEN_HTML")]
    pub html: Option<PathBuf>,
    /// Leave the raw per-request data out of the JSON (smaller; merges become approximate).
    #[arg(long, env = "LOADGEN_NO_RAW", value_parser = FalseyValueParser::new())]
    pub no_raw: bool,
    /// No progress bar.
    #[arg(long, env = "LOADGEN_QUIET", value_parser = FalseyValueParser::new())]
    pub quiet: bool,
}

impl OutputArgs {
    /// Prints the summary and writes the files.
    pub fn emit(&self, report: &Report) -> Result<(), Error> {
        let write = |path: &PathBuf, bytes: &[u8]| {
            std::fs::write(path, bytes).map_err(|source| Error::File {
                doing: "write",
                path: path.clone(),
                source,
            })
        };
        println!("{}", report.text());
        if let Some(path) = &self.json {
            let json = serde_json::to_vec_pretty(report).expect("a report serialises");
            write(path, &json)?;
            println!("report written to {}", path.display());
        }
        if let Some(path) = &self.chart {
            write(path, chart::drop_chart(report).as_bytes())?;
            println!("chart written to {}", path.display());
        }
        if let Some(path) = &self.html {
            html::write(report, path)?;
            println!("HTML report written to {}", path.display());
        }
        Ok(())
    }
}

/// `coupon-loadgen run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The api's base URL.
    #[arg(long, env = "LOADGEN_TARGET", default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Produce requests straight to Kafka (as the api would), bypassing HTTP.
    #[arg(long, env = "LOADGEN_DIRECT", value_parser = FalseyValueParser::new())]
    pub direct: bool,
    /// With --direct: the partitioning strategy.
    #[arg(long, env = "PARTITIONER", default_value = "spread")]
    pub partitioner: Partitioner,
    /// Admin token for setting up the event.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Redis URL of the store, to audit it (and to set up the event with
    /// --direct): redis://host:port/db for one server,
    /// redis+cluster://host:port,host:port,… for a Redis Cluster.
    #[arg(long = "redis", env = "LOADGEN_REDIS_URL")]
    pub redis: Option<String>,
    /// Per-request HTTP timeout (a request is cut off after 1 to 1.1 times
    /// this: one timer per connection, re-armed a few times per timeout).
    #[arg(long, env = "LOADGEN_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Offer load only: do not watch outcomes or audit (for pure HTTP benchmarks).
    #[arg(long, env = "LOADGEN_NO_OBSERVE", value_parser = FalseyValueParser::new())]
    pub no_observe: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub topics: TopicArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub event: EventArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub holds: HoldArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub live: dashboard::DashboardArgs,
}

/// `coupon-loadgen merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// JSON reports of one drop, from several load generators.
    #[arg(required = true, num_args = 2..)]
    pub reports: Vec<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// How a subcommand ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every correctness figure is zero (or nothing was judged).
    Pass,
    /// A correctness figure is not zero.
    Fail,
}

/// Opens the Redis store at `url`.
pub async fn redis_store(url: &str) -> Result<Arc<dyn Store>, Error> {
    Ok(Arc::new(
        RedisStore::connect(url, DEFAULT_DEDUP_RETENTION)
            .await
            .map_err(|source| Error::StoreUnreachable {
                url: url.to_string(),
                source,
            })?,
    ))
}

/// Runs `coupon-loadgen run`.
pub async fn run(args: RunArgs, cancel: CancellationToken) -> Result<Report, Error> {
    run_live(args, None, cancel).await
}

/// Runs `coupon-loadgen run`, shown on `dashboard` when given.
pub async fn run_live(
    args: RunArgs,
    dashboard: Option<&dashboard::Dashboard>,
    cancel: CancellationToken,
) -> Result<Report, Error> {
    let event = args.event.event_id();
    let plan = args.load.plan(
        &event,
        LoadDefaults {
            requests: 10_000,
            users: 10_000,
            retry_ratio: 0.0,
        },
    )?;
    let store = match &args.redis {
        Some(url) => Some(redis_store(url).await?),
        None => None,
    };
    let kafka = args.kafka.settings();
    let topics = args.topics.topics();
    let via = if args.direct {
        let (k, t) = (kafka.clone(), topics.requests.clone());
        let partitions = tokio::task::spawn_blocking(move || {
            partition_counts(&k, &[&t], Duration::from_secs(10))
        })
        .await??[&topics.requests];
        Via::Direct {
            producer: Arc::new(
                RequestProducer::new(
                    &kafka,
                    topics.requests.clone(),
                    args.partitioner,
                    partitions,
                    500_000,
                )
                .map_err(|source| Error::Kafka {
                    doing: "create a producer",
                    brokers: kafka.brokers.clone(),
                    source,
                })?,
            ),
        }
    } else {
        Via::Http {
            endpoint: drive::http::Endpoint::parse(&args.target).await?,
            admin_token: args.admin_token.clone(),
            timeout: args.request_timeout,
        }
    };
    let holds = args.holds.plan(args.load.seed, args.load.connections);
    let mut config = serde_json::json!({
        "command": "run",
        "target": if args.direct { format!("kafka {} (direct, {})", kafka.brokers, args.partitioner) } else { args.target.clone() },
        "load": LoadArgs::describe(&plan),
        "event": event,
        "stock": args.event.stock,
        "per_user_limit": args.event.per_user_limit,
        "stock_buckets": args.event.stock_buckets,
        "topics": topics,
        "seed": args.load.seed,
    });
    if let Some(h) = &holds {
        config["holds"] = HoldArgs::describe(h).into();
    }
    let drop = DropRun {
        via,
        kafka,
        topics,
        store,
        setup: !args.event.no_setup,
        stock_buckets: args.event.stock_buckets,
        terms: EventTerms {
            stock: args.event.stock,
            per_user_limit: args.event.per_user_limit,
        },
        plan,
        drain_timeout: args.load.drain_timeout,
        progress: !args.output.quiet,
        keep_raw: !args.output.no_raw,
        config,
        observe: !args.no_observe,
    };
    run_drop_with_holds(drop, holds, dashboard, cancel).await
}

/// Runs `coupon-loadgen merge`.
pub fn merge(args: &MergeArgs) -> Result<Report, Error> {
    let reports: Vec<Report> = args
        .reports
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(|source| Error::File {
                doing: "read",
                path: p.clone(),
                source,
            })?;
            let not_a_report = |problem: String| Error::NotAReport {
                path: p.clone(),
                problem,
            };
            let r: Report =
                serde_json::from_slice(&bytes).map_err(|e| not_a_report(e.to_string()))?;
            if r.schema != report::SCHEMA {
                return Err(not_a_report(format!(
                    "its schema is {}, this version reads {}",
                    r.schema,
                    report::SCHEMA
                )));
            }
            Ok(r)
        })
        .collect::<Result<_, Error>>()?;
    if reports.iter().all(|r| r.raw.is_some()) {
        Ok(Report::build(report::merge_facts(&reports)?, true))
    } else {
        report::merge_summaries(&reports)
    }
}

/// Dispatches a parsed command line; the exit verdict or a message for the user.
pub async fn main(cli: Cli, cancel: CancellationToken) -> Result<Verdict, Error> {
    let judged = |r: &Report| {
        if r.passed {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    };
    match cli.command {
        Command::Run(args) => {
            let output = args.output.clone();
            let live = args.live.clone();
            let dashboard = live.start(&cancel).await?;
            let report = run_live(*args, dashboard.as_ref(), cancel.clone()).await?;
            output.emit(&report)?;
            if let Some(d) = dashboard {
                d.linger(live.dashboard_linger, &cancel).await;
                d.stop().await;
            }
            Ok(judged(&report))
        }
        Command::Html(args) => {
            html::html(&args)?;
            Ok(Verdict::Pass)
        }
        Command::Merge(args) => {
            let report = merge(&args)?;
            args.output.emit(&report)?;
            Ok(judged(&report))
        }
        Command::Line(args) => {
            let output = args.output.clone();
            let report = line(*args, cancel).await?;
            output.emit_line(&report)?;
            Ok(if report.passed {
                Verdict::Pass
            } else {
                Verdict::Fail
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["coupon-loadgen", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(args) => Ok(*args),
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn hold_flags_make_a_plan_and_the_ratios_need_a_claim_window() {
        let a = run_args(&[
            "--claim-window",
            "2s",
            "--cancel-ratio",
            "0.2",
            "--no-claim-ratio",
            "0.1",
            "--seed",
            "9",
            "--connections",
            "500",
        ])
        .unwrap();
        let plan = a.holds.plan(a.load.seed, a.load.connections).unwrap();
        assert_eq!(plan.claim_window, Duration::from_secs(2));
        assert_eq!(plan.think_time, Duration::from_millis(500), "a quarter");
        assert_eq!((plan.cancel_ratio, plan.no_claim_ratio), (0.2, 0.1));
        assert_eq!((plan.seed, plan.connections), (9, 64));
        assert!(plan.validate().is_ok());
        // Without a window: no holds, and ratios alone are refused.
        let plain = run_args(&[]).unwrap();
        assert!(plain.holds.plan(1, 8).is_none());
        assert!(run_args(&["--cancel-ratio", "0.2"]).is_err());
        assert!(run_args(&["--claim-window", "nonsense"]).is_err());
    }
}
