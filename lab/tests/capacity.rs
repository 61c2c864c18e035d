//! `coupon-lab capacity` at a tiny size, against real processes (a private
//! tansu and redis-server, the `coupon-api` and `coupon-issuer` binaries of
//! this build): every request sent is accepted and decided, every stage
//! used CPU, the stages together used no more than the machine had in the
//! window, and the plan grows with the target. Figures, never timings.

use std::time::Duration;

use couponrush_lab::capacity::{markdown, measure, CapacityArgs, Stage};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_is_charged_and_the_stages_fit_in_the_machine() {
    couponrush_harness::build_workspace_binaries();
    let args = CapacityArgs {
        rates: vec![300.0],
        duration: Duration::from_secs(3),
        partitions: 2,
        issuers: 1,
        targets: vec![10_000.0, 100_000.0, 1_000_000.0],
        instance_cores: 4,
        utilisation: 0.6,
        out: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("capacity"),
    };
    let cap = measure(&args, CancellationToken::new())
        .await
        .expect("the capacity drop runs");
    assert_eq!(cap.runs.len(), 1);
    let run = &cap.runs[0];
    eprintln!("{run:#?}");
    assert!(run.passed);
    assert_eq!(run.sent, 900);
    assert_eq!((run.accepted, run.decided), (run.sent, run.sent));

    let stages: Vec<Stage> = run.stages.iter().map(|c| c.stage).collect();
    assert_eq!(
        stages,
        [
            Stage::Loadgen,
            Stage::Api,
            Stage::Broker,
            Stage::Issuer,
            Stage::Redis
        ]
    );
    for c in &run.stages {
        assert!(c.cpu_seconds > 0.0, "{:?} used no CPU: {c:?}", c.stage);
        assert!(
            (c.cpu_seconds_per_1000 - c.cpu_seconds * 1000.0 / run.decided as f64).abs() < 1e-9,
            "{c:?}"
        );
        assert!((c.per_core_ceiling * c.cpu_seconds_per_1000 - 1000.0).abs() < 1e-6);
        assert!(c.idle_cpu_per_second >= 0.0);
    }
    assert_eq!(run.stages[3].processes, 1);
    // Together the stages cannot have used more CPU than the machine had
    // over the window (each of ten reads may be up to a tick, 10 ms, off).
    let total: f64 = run.stages.iter().map(|c| c.cpu_seconds).sum();
    assert!((total - run.total_cpu_seconds).abs() < 1e-9);
    assert!(
        total <= run.window_seconds * cap.cores as f64 + 0.1,
        "{total} CPU-s in {} s on {} cores",
        run.window_seconds,
        cap.cores
    );

    // The plan: three targets, each needing at least what the one before did.
    assert_eq!(cap.basis_rate, 300.0);
    assert_eq!(cap.plan.len(), 3);
    for w in cap.plan.windows(2) {
        assert!(w[1].api_instances >= w[0].api_instances);
        assert!(w[1].issuers >= w[0].issuers);
        assert!(w[1].brokers_kafka >= w[0].brokers_kafka);
        assert!(w[1].redis_shards >= w[0].redis_shards);
        assert!(w[1].cores[&Stage::Api] > w[0].cores[&Stage::Api]);
    }
    for p in &cap.plan {
        assert_eq!(p.partitions, 2 * p.issuers);
        assert!(p.brokers_kafka >= 3 && p.brokers_kafka % 3 == 0);
    }
    let md = markdown(&cap, &args);
    assert!(md.contains("## Measured on this machine"));
    assert!(md.contains("## The plan (extrapolated)"));
    assert!(md.contains("tansu is not Apache Kafka"));
}
