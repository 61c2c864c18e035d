//! The load generator as users run it (`coupon-loadgen run`, a child
//! process) against the real pipeline (tansu, a redis-server, the api and two
//! issuers as processes): a clean drop audits clean and exits 0; a coupon
//! planted in the store, or an outcome forged on the topic, is caught and
//! the exit status is 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use couponrush_chaos::rig::{self, binary, BrokerKind, RigSpec, StoreChoice};
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::wire::{now_micros, WIRE_VERSION};
use couponrush_core::{DecisionResult, Outcome};
use couponrush_lab::deployment::Deployment;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

static ONE_AT_A_TIME: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);

/// One deployment at a time (each is a whole pipeline on two cores); the
/// guard is held for the test.
async fn rig(name: &str) -> (Deployment, tokio::sync::MutexGuard<'static, bool>) {
    let mut built = ONE_AT_A_TIME.lock().await;
    if !*built {
        common::build_binaries();
        *built = true;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = RigSpec {
        broker: BrokerKind::TansuMemory,
        partitions: 4,
        issuers: 2,
        api_args: Vec::new(),
        store: StoreChoice::PrivateRedis { aof: false },
        kafka_opts: Vec::new(),
    };
    let rig = rig::start(&spec, &dir).await.expect("the pipeline starts");
    tokio::time::sleep(Duration::from_secs(3)).await;
    (rig, built)
}

/// The report's headline figures, for assertion messages.
fn figures(r: &serde_json::Value) -> String {
    [
        "accepted",
        "decided",
        "issued",
        "oversold",
        "double_issued",
        "lost",
        "phantom",
        "ledger_mismatch",
        "passed",
    ]
    .iter()
    .map(|k| format!("{k}={}", r[k]))
    .collect::<Vec<_>>()
    .join(" ")
}

/// Runs `coupon-loadgen run` against `rig` (3 s of load); returns the exit
/// code and report.
fn loadgen(rig: &Deployment, event: &str, json: &Path) -> (i32, serde_json::Value) {
    let loadgen = binary("coupon-loadgen").expect("coupon-loadgen is built");
    let out = Command::new(loadgen)
        .args([
            "run",
            "--target",
            &rig.api_url(),
            "--brokers",
            &rig.kafka.brokers,
        ])
        .args([
            "--redis",
            &rig.redis_url().expect("a redis"),
            "--event",
            event,
        ])
        .args([
            "--rate",
            "1000",
            "--requests",
            "3000",
            "--users",
            "2500",
            "--stock",
            "500",
        ])
        .args(["--retry-ratio", "0.05"])
        .args(["--drain-timeout", "60s", "--quiet", "--json"])
        .arg(json)
        .output()
        .expect("coupon-loadgen runs");
    let report =
        serde_json::from_slice(&std::fs::read(json).unwrap_or_default()).unwrap_or_default();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    (out.status.code().unwrap_or(-1), report)
}

/// [`loadgen`] off the async runtime (a tampering task runs beside it), then
/// stops the pipeline.
async fn loadgen_then_stop(rig: Deployment, event: &'static str) -> (i32, serde_json::Value) {
    tokio::task::spawn_blocking(move || {
        let json = rig.dir.join("report.json");
        let out = loadgen(&rig, event, &json);
        drop(rig);
        out
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_drop_audits_clean_and_exits_zero() {
    let (rig, _turn) = rig("clean").await;
    let json = rig.dir.join("report.json");
    let (code, r) = loadgen(&rig, "clean-drop", &json);
    assert_eq!(code, 0, "{}", figures(&r));
    assert_eq!(r["passed"], true);
    assert_eq!(r["accepted"], 3000);
    assert_eq!(r["decided"], 3000);
    assert_eq!(r["issued"], 500);
    for figure in [
        "oversold",
        "double_issued",
        "lost",
        "phantom",
        "ledger_mismatch",
    ] {
        assert_eq!(r[figure], 0, "{figure}");
    }
    assert_eq!(r["store"]["coupons"], 500);
    assert!(
        r["replays"].as_u64().unwrap() > 0,
        "the 5% retries were decided as replays"
    );
    assert!(r["skew"]["pairs"].as_u64().unwrap() > 0);
    assert!(r["latency_ms"]["e2e"]["p50"].as_f64().unwrap() > 0.0);

    // Both processes expose the series an operator needs.
    let api = scrape(&format!("{}/metrics", rig.api_url())).await;
    for series in [
        "couponrush_api_requests_total{route=\"/v1/events/{event_id}/issue\",status=\"202\"}",
        "couponrush_api_produce_seconds_bucket",
        "couponrush_api_in_flight",
        "couponrush_api_producer_queue",
    ] {
        assert!(api.contains(series), "api /metrics lacks {series}");
    }
    let mut issuers = String::new();
    for addr in &rig.issuer_metrics {
        issuers.push_str(&scrape(&format!("http://{addr}/metrics")).await);
    }
    for series in [
        "couponrush_issuer_batches_total",
        "couponrush_issuer_batch_size_bucket",
        "couponrush_issuer_store_seconds_bucket",
        "couponrush_issuer_decisions_total{result=\"issued\",replay=\"false\"}",
        "couponrush_issuer_consumer_lag{",
        "couponrush_issuer_rebalances_total",
        "couponrush_issuer_commits_total{mode=\"sync\"}",
        "couponrush_issuer_assigned_partitions",
    ] {
        assert!(issuers.contains(series), "issuer /metrics lacks {series}");
    }
}

/// GETs a URL on loopback with curl-like simplicity.
async fn scrape(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", url])
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "GET {url} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_planted_in_the_store_fails_the_audit() {
    let (rig, _turn) = rig("planted").await;
    let event = "planted-drop";
    let url = rig.redis_url().expect("a redis");
    // Once the drop is under way, someone writes a coupon by hand.
    let planter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let forged = format!("{}intruder", Uuid::now_v7());
        let ok = Command::new("redis-cli")
            .args([
                "-u",
                &url,
                "HSET",
                &format!("cr:{{{event}}}:coupons"),
                "9999",
                &forged,
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "redis-cli HSET");
    });
    let (code, r) = loadgen_then_stop(rig, event).await;
    planter.await.unwrap();
    assert_eq!(code, 1, "a correctness failure exits 1: {}", figures(&r));
    assert_eq!(r["passed"], false);
    assert!(r["oversold"].as_u64().unwrap() >= 1, "{}", figures(&r));
    assert!(
        r["phantom"].as_u64().unwrap() >= 1,
        "a coupon for a request never accepted"
    );
    assert_eq!(r["store"]["counter_mismatch"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_forged_on_the_topic_fails_the_audit() {
    let (rig, _turn) = rig("forged").await;
    let event = "forged-drop";
    let brokers = rig.kafka.brokers.clone();
    let outcomes = rig.topics.outcomes.clone();
    // Someone publishes a decision nobody made: a win for an unknown request.
    let forger = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let producer: FutureProducer = KafkaSettings::new(brokers)
            .producer_config("forger", 10)
            .create()
            .unwrap();
        let forged = Outcome {
            v: WIRE_VERSION,
            request_id: Uuid::now_v7(),
            event_id: event.into(),
            user_id: "mallory".into(),
            result: DecisionResult::Issued,
            issued_rank: Some(1),
            partition: 0,
            offset: 0,
            decided_at: now_micros(),
            replay: false,
            decision_seq: 1,
            accepted_at: now_micros(),
            generation: 1,
            hold_until: None,
        };
        let bytes = forged.to_bytes();
        producer
            .send(
                FutureRecord::<(), [u8]>::to(&outcomes).payload(bytes.as_slice()),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    });
    let (code, r) = loadgen_then_stop(rig, event).await;
    forger.await.unwrap();
    assert_eq!(code, 1, "a correctness failure exits 1: {}", figures(&r));
    assert!(r["phantom"].as_u64().unwrap() >= 1, "{}", figures(&r));
    assert!(
        r["ledger_mismatch"].as_u64().unwrap() >= 1,
        "the store holds no such coupon"
    );
}
