//! A drop with holds, through the api, against real components: an
//! in-process deployment (librdkafka's mock cluster, the in-memory store,
//! the api, an issuer with its expiry sweep). The "done when", small
//! enough for CI: 20 % of the winners cancel, 10 % never claim, the rest
//! claim; every coupon ends claimed or back in stock, the ranks that came
//! back were issued again while the load lasted, and the invariant audits
//! clean. Then the same ledger with one hold end taken out fails the audit,
//! so the test can fail. Last, the same drop through the `coupon-loadgen`
//! binary and its flags, judged by its exit code and its JSON report.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use couponrush_lab::deployment::{Deployment, KafkaChoice, Spec, StoreChoice};
use couponrush_loadgen::drive::holders::{Behaviour, HoldPlan};
use couponrush_loadgen::drive::http::Endpoint;
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::{audit_with_holds, EventTerms};
use couponrush_loadgen::population::{Population, UserDist};
use couponrush_loadgen::report::Report;
use couponrush_loadgen::run::{run_drop_with_holds, DropRun, Via};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const STOCK: u32 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_coupon_of_a_drop_with_holds_ends_claimed_or_back_in_stock() {
    let deployment = Deployment::start(Spec {
        batch_size: 200,
        ..Spec::in_process(KafkaChoice::Embedded(1), StoreChoice::Memory, 2, 1)
    })
    .await
    .expect("an in-process deployment starts");
    // Not `wait_assigned`: it expects the request partitions alone, and an
    // issuer now also holds the compensations topic's. One issuer gets
    // every partition of both topics in one assignment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while deployment.assigned_partitions().await.iter().sum::<usize>() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the issuer got no partitions in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let terms = EventTerms {
        stock: STOCK,
        per_user_limit: 1,
    };
    let run = DropRun {
        via: Via::Http {
            endpoint: Endpoint::parse(&deployment.api_url()).await.unwrap(),
            admin_token: None,
            timeout: Duration::from_secs(10),
        },
        kafka: deployment.kafka.clone(),
        topics: deployment.topics.clone(),
        store: Some(deployment.store.clone()),
        setup: true,
        terms,
        // 400 requests over 4 s: the stock goes in the first half second,
        // and what comes back goes to the requests still arriving.
        plan: LoadPlan {
            event_id: "holds-e2e".into(),
            model: LoadModel::Rate(100.0),
            requests: 400,
            duration: Duration::from_secs(20),
            connections: 16,
            population: Population::new(400, UserDist::Uniform, 0.0, 7),
        },
        drain_timeout: Duration::from_secs(20),
        progress: false,
        keep_raw: true,
        config: serde_json::json!({}),
        observe: true,
        stock_buckets: 1,
    };
    let holds = HoldPlan {
        claim_window: Duration::from_secs(1),
        cancel_ratio: 0.2,
        no_claim_ratio: 0.1,
        think_time: Duration::from_millis(200),
        slack: Duration::from_secs(5),
        connections: 16,
        seed: 7,
    };
    let report = run_drop_with_holds(run, Some(holds), None, CancellationToken::new()).await;
    let by_cli = drop_by_cli(&deployment).await;
    deployment.stop().await;
    let report = report.expect("a drop with holds reports");
    let text = report.text();
    println!("{text}");
    assert!(report.passed, "{text}");
    let h = report
        .holds
        .clone()
        .expect("a drop with holds has hold figures");
    let acts = report.hold_actions.clone().expect("the holders' counts");

    // Every winner acted as chosen, and every choice happened.
    for b in [Behaviour::Claim, Behaviour::Cancel, Behaviour::NeverClaim] {
        assert!(
            acts.chosen.get(&b).copied().unwrap_or(0) > 0,
            "nobody chose {b}\n{text}"
        );
    }
    assert_eq!((acts.gave_up, acts.skipped), (0, 0), "{text}");
    assert!(h.cancelled > 0 && h.expired > 0 && h.claimed > 0, "{text}");
    assert!(
        h.reissued > 0,
        "returned ranks went to later requests\n{text}"
    );
    assert!(h.release_to_reissue_ms.count > 0, "{text}");

    // Every coupon claimed or back in stock; the invariant holds.
    let remaining = h.remaining.expect("the api shows remaining");
    assert_eq!((h.open, h.stuck), (0, 0), "{text}");
    assert_eq!(h.claimed + remaining, u64::from(STOCK), "{text}");
    assert_eq!(
        h.issued_total - h.returned + remaining,
        u64::from(STOCK),
        "{text}"
    );
    assert_eq!(h.invariant_off, 0, "{text}");
    assert_eq!(
        (report.oversold, report.double_issued, report.lost),
        (0, 0, 0),
        "a rank given back and issued again is neither oversold nor doubled\n{text}"
    );

    // The same ledger with one cancellation taken out fails the audit: the
    // api's remaining counts a coupon the ledger never gave back.
    let raw = report.raw.expect("raw data kept");
    let accepted: HashMap<Uuid, String> = raw
        .accepted
        .iter()
        .map(|a| (a.request_id, a.acceptance.user_id.clone()))
        .collect();
    let outcomes: Vec<_> = raw.outcomes.iter().map(|o| o.outcome.clone()).collect();
    let mut ends: Vec<_> = raw.holds.iter().map(|h| h.hold.clone()).collect();
    let cancelled = ends
        .iter()
        .position(|e| e.state == couponrush_core::wire::HoldState::Released)
        .expect("a cancellation");
    let dropped = ends[cancelled].request_id;
    ends.retain(|e| e.request_id != dropped);
    let planted = audit_with_holds(
        terms,
        &accepted,
        &HashSet::new(),
        &outcomes,
        &ends,
        raw.ledger.as_ref(),
        raw.end.as_ref(),
    );
    let ph = planted.holds.clone().expect("hold figures");
    assert!(ph.invariant_off >= 1, "{ph:?}");
    assert!(planted.failures() >= 1);

    // The binary, by its flags: exit 0, and the same figures in its JSON.
    let (code, cli, out) = by_cli;
    assert_eq!(code, Some(0), "{out}");
    let h = cli.holds.expect("hold figures in the JSON report");
    assert!(
        cli.passed && h.cancelled > 0 && h.expired > 0 && h.reissued > 0,
        "{out}"
    );
    assert_eq!(
        h.claimed + h.remaining.unwrap_or(u64::MAX),
        u64::from(STOCK),
        "{out}"
    );
    assert!(out.contains("holds        "), "{out}");
}

/// Runs the drop again through `coupon-loadgen run` against the
/// deployment; its exit code, JSON report and printed summary.
async fn drop_by_cli(deployment: &Deployment) -> (Option<i32>, Report, String) {
    let event = format!("holds-cli-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{event}.json"));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_coupon-loadgen"));
    cmd.arg("run")
        .args(["--target", &deployment.api_url()])
        .args(["--brokers", &deployment.kafka.brokers])
        .args(["--event", &event, "--stock", &STOCK.to_string()])
        .args(["--rate", "100", "--requests", "400", "--users", "400"])
        .args([
            "--connections",
            "16",
            "--seed",
            "7",
            "--drain-timeout",
            "20s",
        ])
        .args(["--claim-window", "1s", "--cancel-ratio", "0.2"])
        .args(["--no-claim-ratio", "0.1", "--think-time", "200ms"])
        .args(["--hold-slack", "5s", "--quiet"])
        .arg("--json")
        .arg(&json)
        .env_remove("ADMIN_TOKEN");
    for (k, v) in &deployment.kafka.extra {
        cmd.args(["--kafka-opt", &format!("{k}={v}")]);
    }
    let out = cmd.output().await.expect("coupon-loadgen runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no JSON report at {}:\n{text}", json.display()));
    (out.status.code(), report, text)
}
