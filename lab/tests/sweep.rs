//! `coupon-lab sweep` end to end at a tiny size, on a private tansu and
//! redis-server per run (`--fresh`): every point is measured once per round,
//! the medians land in sweep.json/txt/svg, the audit of every run is clean,
//! and the strict-order partitioner keeps arrival order (up to requests sent
//! at the same instant).

use clap::Parser;
use couponrush_lab::{sweep, Cli, Command};
use couponrush_loadgen::Verdict;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_sweep_measures_every_point_every_round() {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sweep-fresh");
    let _ = std::fs::remove_dir_all(&out);
    let cli = Cli::try_parse_from([
        "coupon-lab",
        "sweep",
        "--fresh",
        "--direct",
        "--partitions",
        "1,2",
        "--issuers",
        "1",
        "--partitioner",
        "event,spread",
        "--burst",
        "600",
        "--users",
        "600",
        "--stock",
        "100",
        "--repeat",
        "2",
        "--drain-timeout",
        "30s",
        "--out",
        out.to_str().unwrap(),
    ])
    .expect("the sweep flags parse");
    let Command::Sweep(args) = cli.command else {
        panic!("not a sweep");
    };
    let verdict = sweep::sweep(args, CancellationToken::new())
        .await
        .expect("the sweep runs");
    assert_eq!(verdict, Verdict::Pass);

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    let points = json["points"].as_array().expect("points");
    assert_eq!(points.len(), 4, "2 partitioners x 2 partition counts");
    for p in points {
        assert_eq!(p["runs"], 2, "every point measured in every round: {p}");
        assert_eq!(p["failures"], 0, "{p}");
        assert!(p["decided_per_s"].as_f64().unwrap() > 0.0, "{p}");
        if p["partitioner"] == "event" {
            // One key: one partition, decided in log order. Arrival is the
            // time stamped before the send, so only requests sent at the same
            // moment can swap (stamped A, B; B reached the log first).
            assert!(p["inversion_ratio"].as_f64().unwrap() < 0.01, "{p}");
            assert!(p["displacement_p99"].as_u64().unwrap() <= 2, "{p}");
        }
    }
    assert!(json["kafka"].as_str().unwrap().contains("fresh tansu"));
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg") || svg.contains("<svg"));
    assert!(std::fs::read_to_string(out.join("sweep.txt"))
        .unwrap()
        .contains("spread"));
    // The private services are gone with their directory.
    assert!(!out.join(".services").exists());
}
