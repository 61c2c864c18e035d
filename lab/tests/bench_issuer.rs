//! `coupon-lab bench-issuer`, the issuer's side of `scripts/bench issuer`:
//! every pre-filled request is counted decided (progress is read from the
//! group's committed offsets, not from the outcomes), the run passes only
//! then, and the CPU of each process it was told to watch is reported per
//! decision. On the embedded mock cluster and the in-memory store.

use std::process::Command;

#[test]
fn every_request_is_counted_decided_and_each_watched_process_has_its_cpu() {
    let me = std::process::id().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_coupon-lab"))
        .args([
            "bench-issuer",
            "--requests",
            "20000",
            "--partitions",
            "4",
            "--batch-size",
            "500",
            "--cpu-of",
            &format!("test={me}"),
        ])
        .env_remove("BENCH_BROKERS")
        .env_remove("BENCH_REDIS_URL")
        .env_remove("BENCH_ISSUERS")
        .env_remove("BENCH_STOCK")
        .output()
        .expect("coupon-lab runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench-issuer passes: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("one JSON line of results");
    let r: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(r["prefilled"], 20000, "{r}");
    assert_eq!(r["decided"], 20000, "every pre-filled request decided: {r}");
    assert_eq!(r["replays"], 0);
    assert!(r["decided_per_s"].as_f64().unwrap() > 0.0);
    let cpu = r["cpu_us_per_decision"]
        .as_object()
        .expect("CPU per decision");
    for name in ["issuer", "test"] {
        let v = cpu[name].as_f64().expect(name);
        assert!(v >= 0.0, "{name}: {v}");
    }
    assert!(
        cpu["issuer"].as_f64().unwrap() > 0.0,
        "deciding takes the issuer's process some CPU: {r}"
    );
}

#[test]
fn a_process_to_watch_is_named_and_numbered() {
    let out = Command::new(env!("CARGO_BIN_EXE_coupon-lab"))
        .args(["bench-issuer", "--cpu-of", "tansu"])
        .output()
        .expect("coupon-lab runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected NAME=PID"), "{err}");
}
