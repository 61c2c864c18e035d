//! `coupon-lab demo`: the main job on a fresh machine. A whole drop with
//! nothing installed but Rust: librdkafka's mock cluster (3 brokers,
//! replication factor 3) in this process, the api and the issuers as tasks,
//! and a store (Redis with `--redis`, else the in-memory store, which passes
//! the same conformance suite). Prints the report and writes a chart.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use couponrush_core::Partitioner;
use tokio_util::sync::CancellationToken;

use crate::deployment::{store_choice, Deployment, DropSpec, KafkaChoice, Spec};
use crate::LabError;
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::{LoadArgs, LoadDefaults, OutputArgs, Verdict};

/// `coupon-lab demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Use the Redis at this URL as the store (default: in-memory).
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
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// Runs the demo.
pub async fn demo(mut args: DemoArgs, cancel: CancellationToken) -> Result<Verdict, LabError> {
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
    });
    let report = deployment
        .drop_through_api(
            DropSpec {
                plan,
                terms: EventTerms {
                    stock: args.stock,
                    per_user_limit: 1,
                },
                drain_timeout: args.load.drain_timeout,
                admin_token: None,
                progress: !args.output.quiet,
                keep_raw: !args.output.no_raw,
                config,
            },
            cancel,
        )
        .await;
    deployment.stop().await;
    let report = report?;
    args.output.emit(&report)?;
    Ok(if report.passed {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}
