//! The demo as a new user meets it: with its progress bar on, and with the
//! environment of someone who followed the compose instructions.
//!
//! - The progress bar's task once held the observer while the run collected
//!   it (`Arc::try_unwrap` after `abort()`, which does not wait for the task
//!   to be dropped): 4 runs in 6 ended in "observer still shared". On a
//!   current-thread runtime the aborted task cannot run before the next
//!   await, so the old code failed here every time.
//! - An exported `ADMIN_TOKEN` reached the in-process api (its config was
//!   parsed with environment fallbacks) but not the demo's own client: every
//!   demo ended in "401 Unauthorized".

use std::process::Command;
use std::time::Duration;

use couponrush_lab::deployment::{Deployment, DropSpec, KafkaChoice, Spec, StoreChoice};
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "current_thread")]
async fn a_drop_with_its_progress_bar_on_reports() {
    let deployment = Deployment::start(Spec {
        batch_size: 200,
        ..Spec::in_process(KafkaChoice::Embedded(1), StoreChoice::Memory, 2, 1)
    })
    .await
    .expect("an in-process deployment starts");
    assert!(deployment.wait_assigned(Duration::from_secs(60)).await);
    let report = deployment
        .drop_through_api(
            DropSpec {
                plan: LoadPlan {
                    event_id: "progress-on".into(),
                    model: LoadModel::Burst,
                    requests: 300,
                    duration: Duration::from_secs(30),
                    connections: 8,
                    population: Population::new(300, UserDist::Uniform, 0.0, 1),
                },
                terms: EventTerms {
                    stock: 50,
                    per_user_limit: 1,
                },
                drain_timeout: Duration::from_secs(30),
                admin_token: None,
                progress: true,
                keep_raw: false,
                config: serde_json::json!({}),
                live: None,
                holds: None,
                stock_buckets: 1,
            },
            CancellationToken::new(),
        )
        .await;
    deployment.stop().await;
    let report = report.expect("a drop with a progress bar reports");
    assert!(report.passed, "{}", report.text());
}

#[test]
fn the_demo_ignores_an_exported_admin_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_coupon-lab"))
        .args([
            "demo",
            "--requests",
            "600",
            "--users",
            "600",
            "--stock",
            "60",
        ])
        .args(["--partitions", "2", "--issuers", "1", "--quiet"])
        .args([
            "--chart",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/demo-env.svg"),
        ])
        .env("ADMIN_TOKEN", "exported-for-the-compose-cluster")
        .env("KAFKA_OPTS", "client.id=the-users-own")
        .output()
        .expect("coupon-lab runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status.code()
    );
    assert!(stdout.contains("verdict      PASS"), "{stdout}");
}
