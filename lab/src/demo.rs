//! `coupon-lab demo`: the main job on a fresh machine. A whole drop with
//! nothing installed but Rust: librdkafka's mock cluster (3 brokers,
//! replication factor 3) in this process, the api and the issuers as tasks,
//! and a store (Redis with `--redis`, else the in-memory store, which passes
//! the same conformance suite). Prints the report and writes a chart.
//!
//! With `--line`, the drop runs behind a waiting room (the line in a
//! mock-cluster topic, or in Redis with `--line-backend redis`): clients
//! join, poll, a fraction walks away, the admitted issue; the report adds
//! the line's figures (`couponrush_loadgen::drive::line`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use couponrush_api::line::{LineBackend, LineConfig, LineStore};
use couponrush_core::Partitioner;
use couponrush_loadgen::drive::line::{run_line, LineArgs, LineReport, LineRun};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::deployment::{
    store_choice, Broker, Deployment, DeploymentError, DropSpec, KafkaChoice, LivePage, Spec,
};
use crate::LabError;
use couponrush_loadgen::dashboard::DashboardArgs;
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::{LoadArgs, LoadDefaults, OutputArgs, Verdict};

/// `coupon-lab demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Use the Redis at this URL as the store: redis://host:port/db for one
    /// server, redis+cluster://host:port,host:port,… for a Redis Cluster
    /// (default: in-memory).
    #[arg(long = "redis", env = "DEMO_REDIS_URL")]
    pub redis: Option<String>,
    /// Request partitions.
    #[arg(long, env = "DEMO_PARTITIONS", default_value_t = 8)]
    pub partitions: i32,
    /// Issuer instances.
    #[arg(long, env = "DEMO_ISSUERS", default_value_t = 2)]
    pub issuers: usize,
    /// Partitioning strategy: event, user, spread or buckets:K.
    #[arg(long, env = "PARTITIONER", default_value = "spread")]
    pub partitioner: Partitioner,
    /// Coupons in the drop.
    #[arg(long, env = "DEMO_STOCK", default_value_t = 1000)]
    pub stock: u32,
    /// Split the drop's stock over this many buckets, each on its own Redis
    /// slot (1 to 64; 1: one slot). The report counts the undersell it costs.
    #[arg(long, env = "DEMO_STOCK_BUCKETS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub stock_buckets: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    /// Run the drop behind a waiting room (the line's own flags: --joins,
    /// --abandon, --admit-rate, ...).
    #[arg(long = "line", env = "DEMO_LINE")]
    pub line: bool,
    /// With --line: where the line lives, kafka (a mock-cluster topic per
    /// room) or redis (--line-redis).
    #[arg(
        long = "line-backend",
        env = "DEMO_LINE_BACKEND",
        value_enum,
        default_value = "kafka"
    )]
    pub line_backend: LineBackend,
    /// With --line-backend redis: that Redis.
    #[arg(
        long = "line-redis",
        env = "DEMO_LINE_REDIS",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub line_redis: String,
    /// With --line: run on a private tansu broker (installed by
    /// scripts/dev-up --install-only) instead of the mock cluster.
    #[arg(long = "line-tansu", env = "DEMO_LINE_TANSU")]
    pub line_tansu: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub line_load: LineArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub live: DashboardArgs,
}

/// Runs the demo.
pub async fn demo(mut args: DemoArgs, cancel: CancellationToken) -> Result<Verdict, LabError> {
    if args.line {
        return demo_line(args, cancel).await;
    }
    // The page's URL comes first, so a browser can be opened before the
    // doors do.
    let dashboard = LivePage::open(&args.live, &cancel).await?;
    let deployment = Deployment::start(Spec {
        partitioner: args.partitioner,
        ..Spec::in_process(
            KafkaChoice::Embedded(3),
            store_choice(args.redis.as_deref()),
            args.partitions,
            args.issuers,
        )
    })
    .await?;
    let store_kind = deployment.store.kind();
    println!(
        "couponrush demo: embedded Kafka (mock cluster, 3 brokers, replication 3), {} partitions, \
         {} issuers, partitioner {}, {store_kind} store",
        args.partitions, args.issuers, args.partitioner
    );
    if !deployment.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let event = format!("demo-{}", couponrush_core::wire::now_micros() / 1000);
    let plan = args.load.plan(
        &event,
        LoadDefaults {
            requests: 20_000,
            users: 15_000,
            retry_ratio: 0.05,
        },
    )?;
    if args.output.chart.is_none() {
        args.output.chart = Some(PathBuf::from("couponrush-demo.svg"));
    }
    let config = serde_json::json!({
        "command": "demo",
        "kafka": "embedded mock cluster, 3 brokers, replication 3",
        "store": store_kind,
        "partitions": args.partitions,
        "issuers": args.issuers,
        "partitioner": args.partitioner,
        "load": couponrush_loadgen::LoadArgs::describe(&plan),
        "stock": args.stock,
        "stock_buckets": args.stock_buckets,
    });
    let terms = EventTerms {
        stock: args.stock,
        per_user_limit: 1,
    };
    let report = deployment
        .drop_through_api(
            DropSpec {
                plan,
                terms,
                stock_buckets: args.stock_buckets,
                drain_timeout: args.load.drain_timeout,
                admin_token: None,
                progress: !args.output.quiet,
                keep_raw: !args.output.no_raw,
                config,
                live: dashboard.clone(),
                holds: None,
            },
            cancel.clone(),
        )
        .await;
    deployment.stop().await;
    let report = report?;
    args.output.emit(&report)?;
    if let Some(page) = dashboard {
        page.close(&args.live, &cancel).await;
    }
    Ok(if report.passed {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

/// The issuers' consumer group (the deployment names it per run), whose lag
/// slows the room's admission; `None` when the broker does not list groups.
fn issuer_group(kafka: &couponrush_core::kafka::KafkaSettings) -> Option<String> {
    let client: BaseConsumer = kafka
        .client_config("couponrush-demo-groups")
        .create()
        .ok()?;
    let groups = client.fetch_group_list(None, Duration::from_secs(5)).ok()?;
    let name = groups
        .groups()
        .iter()
        .map(|g| g.name().to_string())
        .find(|n| n.starts_with("coupon-issuer"));
    name
}

/// `coupon-lab demo --line`: the drop behind a waiting room, printed.
async fn demo_line(args: DemoArgs, cancel: CancellationToken) -> Result<Verdict, LabError> {
    let report = line_drop(&args, cancel).await?;
    args.output.emit_line(&report)?;
    Ok(if report.passed {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

/// Runs the drop behind a waiting room that `demo --line` runs, on a
/// deployment of its own, and returns its report.
pub async fn line_drop(args: &DemoArgs, cancel: CancellationToken) -> Result<LineReport, LabError> {
    let backend = match args.line_backend {
        LineBackend::Kafka => LineStore::Kafka {
            topic_prefix: "coupon.line".into(),
        },
        LineBackend::Redis => LineStore::Redis(args.line_redis.clone()),
        LineBackend::None => {
            return Err(DeploymentError::Spec("--line needs --line-backend kafka or redis").into())
        }
    };
    // The api is this command's own: the same as the deployment's, with a
    // waiting room.
    let (kafka_choice, dir, kafka_name) = if args.line_tansu {
        let dir = std::env::temp_dir().join(format!("couponrush-line-{}", uuid::Uuid::new_v4()));
        (
            KafkaChoice::Tansu(couponrush_harness::TansuStorage::Memory),
            Some(dir),
            "a private tansu 0.6 broker",
        )
    } else {
        (
            KafkaChoice::Embedded(3),
            None,
            "embedded Kafka (mock cluster, 3 brokers, replication 3)",
        )
    };
    let deployment = Deployment::start(Spec {
        partitioner: args.partitioner,
        with_api: false,
        dir: dir.clone(),
        ..Spec::in_process(
            kafka_choice,
            store_choice(args.redis.as_deref()),
            args.partitions,
            args.issuers,
        )
    })
    .await?;
    if !deployment.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let event = format!("demo-line-{}", couponrush_core::wire::now_micros() / 1000);
    if let (LineStore::Kafka { topic_prefix }, Broker::Mock(mock)) = (&backend, &deployment.broker)
    {
        // The mock cluster cannot create topics through the protocol.
        mock.create_topic(&format!("{topic_prefix}.{event}"), 1, 3)
            .map_err(|e| DeploymentError::Start(format!("cannot create the room's topic: {e}")))?;
    }
    let kafka = deployment.kafka.clone();
    let lag_group = tokio::task::spawn_blocking(move || issuer_group(&kafka)).await?;
    let mut config = couponrush_api::Config::local(&deployment.kafka.brokers);
    config.kafka = deployment.kafka.clone();
    config.topics = deployment.topics.clone();
    config.partitioner = args.partitioner;
    config.max_in_flight = 50_000;
    config.line = Some(LineConfig {
        backend,
        key: None,
        lag_group: lag_group.clone(),
    });
    let api = couponrush_api::Api::bind(config, deployment.store.clone(), None)
        .await
        .map_err(|e| DeploymentError::Start(format!("cannot start the api: {e}")))?;
    let addr = api.local_addr();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(api.serve(stop.clone()));
    println!(
        "couponrush demo --line: {kafka_name}, {} partitions, \
         {} issuers, {} store, line backend {:?}; {}; issuer lag from {}",
        args.partitions,
        args.issuers,
        deployment.store.kind(),
        args.line_backend,
        args.line_load.describe(),
        lag_group
            .as_deref()
            .unwrap_or("nowhere (the broker lists no groups)")
    );
    let run = LineRun {
        endpoint: couponrush_loadgen::drive::http::Endpoint::parse(&format!("http://{addr}"))
            .await?,
        admin_token: None,
        kafka: deployment.kafka.clone(),
        topics: deployment.topics.clone(),
        store: Some(deployment.store.clone()),
        event_id: event,
        terms: EventTerms {
            stock: args.stock,
            per_user_limit: 1,
        },
        line: args.line_load.clone(),
        timeout: Duration::from_secs(30),
        drain_timeout: args.load.drain_timeout,
        keep_raw: !args.output.no_raw,
        config: serde_json::json!({
            "command": "demo --line",
            "kafka": kafka_name,
            "store": deployment.store.kind(),
            "line_backend": args.line_backend,
            "partitions": args.partitions,
            "issuers": args.issuers,
            "load": args.line_load.describe(),
            "stock": args.stock,
        }),
        progress: !args.output.quiet,
    };
    let report = run_line(run, cancel).await;
    stop.cancel();
    let _ = serving.await;
    deployment.stop().await;
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(report?)
}
