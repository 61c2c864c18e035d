//! The live page follows every drop of a sweep (and, the same way, every
//! arm of an experiment): one page, each drop from its start, through the
//! deployment's one way to run a drop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clap::Parser;
use couponrush_lab::Cli;
use couponrush_loadgen::Verdict;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The page's latest snapshot, from `GET /state`.
fn state(port: u16) -> Option<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /state HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let json = body.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(json).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeps_page_follows_every_points_drop_to_its_end() {
    let out = std::env::temp_dir().join(format!(
        "couponrush-live-sweep-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let port = couponrush_harness::free_port();
    let argv = [
        "coupon-lab",
        "sweep",
        "--partitions",
        "1,2",
        "--issuers",
        "1",
        "--partitioner",
        "spread",
        "--stock",
        "100",
        "--requests",
        "600",
        "--dashboard",
        &format!("127.0.0.1:{port}"),
        // Long enough for the last point's end to be seen.
        "--dashboard-linger",
        "2s",
        "--out",
        &out.display().to_string(),
    ];
    let cancel = CancellationToken::new();
    let sweep = tokio::spawn(couponrush_lab::main(Cli::parse_from(argv), cancel.clone()));
    // Every event the page showed, with its partitions and the last phase
    // and figures seen.
    let mut seen: BTreeMap<String, Value> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !sweep.is_finished() {
        assert!(Instant::now() < deadline, "the sweep did not end");
        if let Some(s) = tokio::task::spawn_blocking(move || state(port))
            .await
            .unwrap()
        {
            if let Some(e) = s["event_id"].as_str().filter(|e| !e.is_empty()) {
                seen.insert(e.to_string(), s.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let verdict = sweep.await.unwrap().expect("the sweep runs");
    assert_eq!(verdict, Verdict::Pass);
    let partitions: BTreeSet<u64> = seen
        .values()
        .filter_map(|s| s["config"]["partitions"].as_u64())
        .collect();
    assert_eq!(seen.len(), 2, "one drop per point on the page: {seen:?}");
    assert_eq!(partitions, BTreeSet::from([1, 2]), "{seen:?}");
    for (event, s) in &seen {
        // Each point's drop stayed on the page until the next one began, so
        // its end (sold out, audit clean) was shown.
        assert_eq!(s["phase"], "done", "{event}: {s}");
        assert_eq!(s["stock_left"], 0, "{event}: {s}");
        assert_eq!(s["passed"], true, "{event}: {s}");
    }
    let _ = std::fs::remove_dir_all(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_while_the_demo_waits_for_a_tab_ends_it_before_any_drop() {
    let port = couponrush_harness::free_port();
    let page = format!("127.0.0.1:{port}");
    let argv = [
        "coupon-lab",
        "demo",
        "--dashboard",
        &page,
        "--dashboard-wait",
        "2m",
    ];
    let cancel = CancellationToken::new();
    let demo = tokio::spawn(couponrush_lab::main(Cli::parse_from(argv), cancel.clone()));
    // The page is served and nobody opens it: the demo is waiting.
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(port).is_none() {
        assert!(Instant::now() < deadline, "the page is served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state(port).unwrap()["phase"], "waiting");
    cancel.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), demo)
        .await
        .expect("Ctrl-C ends the wait and the demo at once")
        .unwrap();
    assert!(
        matches!(ended, Err(couponrush_lab::LabError::Cancelled)),
        "cancelled, no drop run: {ended:?}"
    );
}
