//! `coupon-notifier` processes SIGKILLed mid-run and restarted, against a
//! real broker (the mock cluster, reached over loopback) and the lab's
//! receiver: no coupon is lost, the duplicates at the wire are reported,
//! and the planted fault (`--unsafe-commit-on-receipt`, committing before
//! the endpoint acknowledged) is caught losing coupons across the kill.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, ledger, Setup};
use couponrush_harness::Proc;
use couponrush_lab::receiver::{Receiver, ReceiverHandle};

/// Each test runs a broker, a receiver and notifier processes: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn notifier(setup: &Setup, webhook: &str, n: u32, extra: &[&str], dir: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coupon-notifier"));
    cmd.env_clear()
        .env("RUST_LOG", couponrush_harness::child_log())
        .args(["--brokers", &setup.brokers, "--webhook", webhook])
        .args(["--outcomes-topic", &setup.outcomes])
        .args(["--dlq-topic", &setup.dlq])
        .args(["--group-id", &setup.group])
        .args(["--session-timeout", "6s", "--commit-every", "200ms"])
        .args(["--retry-base", "20ms", "--retry-max", "200ms"])
        .args(["--max-attempts", "1000"])
        .args(extra);
    let log = dir.join(format!("notifier-{n}.log"));
    Proc::spawn(&format!("notifier-{n}"), cmd, Some(&log)).expect("coupon-notifier starts")
}

/// `GET /metrics` of a notifier (empty if it does not answer).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn keys(r: &ReceiverHandle) -> HashSet<String> {
    r.counts().into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_final_coupon_survives_a_notifier_kill() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = dir("notifier-kill");
    kill_mid_run(Setup::new(), &dir).await;
}

/// The same on tansu, whose 0.6 coordinator keeps a dead member's
/// partitions assigned and can resume a fetch past the committed offset
/// (the issuer's broker quirks, which the notifier shares).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_final_coupon_survives_a_notifier_kill_on_tansu() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = dir("notifier-kill-tansu");
    let setup = Setup::on_tansu(&dir.join("tansu.log")).await;
    kill_mid_run(setup, &dir).await;
}

/// A notifier SIGKILLed a third of the way through the ledger, another
/// started: every final coupon at the endpoint, nothing else.
async fn kill_mid_run(setup: Setup, dir: &Path) {
    let dir = dir.to_path_buf();
    let ledger = ledger(&setup.event, 800);
    setup.produce(&ledger).await;
    let r = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Slow enough that the kill lands mid-run: a few in flight, 5 ms each.
    r.stall(Duration::from_millis(5));
    let expected: HashSet<String> = ledger.expected.keys().cloned().collect();
    let mut first = notifier(&setup, &r.url(), 1, &["--max-in-flight", "4"], &dir);
    let third = expected.len() as u64 / 3;
    assert!(
        eventually(Duration::from_secs(60), || async {
            r.stats().unique_keys >= third
        })
        .await,
        "the first notifier delivered nothing in 60 s (log in {})",
        dir.display()
    );
    first.kill();
    let at_kill = r.stats();
    assert!(
        at_kill.unique_keys < expected.len() as u64,
        "killed mid-run"
    );
    r.stall(Duration::ZERO);
    let metrics = format!("127.0.0.1:{}", couponrush_harness::free_port());
    let mut second = notifier(
        &setup,
        &r.url(),
        2,
        &["--max-in-flight", "4", "--metrics-addr", &metrics],
        &dir,
    );
    let complete = eventually(Duration::from_secs(90), || async {
        r.stats().unique_keys >= expected.len() as u64
            // At or past the end: tansu 0.6 answers the watermark request
            // with a high offset below what was committed (as the issuer's
            // restart test also allows), so there this only checks the
            // commits were made.
            && setup.behind().await.iter().all(|b| *b <= 0)
    })
    .await;
    // The lag gauge comes from librdkafka's statistics, every 2 s.
    let mut scraped = String::new();
    let lag_seen = eventually(Duration::from_secs(10), || {
        let m = scrape(&metrics);
        let seen = m.contains("couponrush_notifier_consumer_lag{");
        scraped = m;
        async move { seen }
    })
    .await;
    assert_eq!(second.terminate(Duration::from_secs(20)), Some(0));
    assert!(lag_seen, "no lag gauge in /metrics:\n{scraped}");
    for name in [
        "couponrush_notifier_delivered_total{state=\"issued\"}",
        "couponrush_notifier_delivered_total{state=\"claimed\"}",
        "couponrush_notifier_skipped_total{reason=\"held\"}",
        "couponrush_notifier_skipped_total{reason=\"not_issued\"}",
        "couponrush_notifier_skipped_total{reason=\"returned\"}",
        "couponrush_notifier_delivery_seconds_bucket",
        "couponrush_notifier_commits_total",
    ] {
        assert!(
            scraped.contains(name),
            "{name} missing from /metrics:\n{scraped}"
        );
    }
    let stats = r.stats();
    assert!(
        complete,
        "90 s after the restart: {stats:?}, committed short of the end by {:?} (logs in {})",
        setup.behind().await,
        dir.display()
    );
    assert_eq!(keys(&r), expected, "0 lost, nothing but final coupons");
    eprintln!(
        "killed at {} of {} coupons; at the end {stats:?}: {} duplicates at the wire \
         ({} from replays on the ledger, the rest delivered again after the kill)",
        at_kill.unique_keys,
        expected.len(),
        stats.duplicates,
        ledger.replays
    );
}

/// The endpoint is down; a notifier has read every record and is retrying
/// them when it is SIGKILLed; the endpoint comes back and a safe notifier
/// takes over. Returns (coupons delivered, coupons expected).
async fn kill_while_the_endpoint_is_down(unsafe_arm: bool, name: &str) -> (usize, usize) {
    let dir = dir(name);
    let setup = Setup::new();
    let ledger = ledger(&setup.event, 80);
    setup.produce(&ledger).await;
    let r = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    r.fail_for(Duration::from_secs(3600));
    let mut extra = vec!["--max-in-flight", "1000"];
    if unsafe_arm {
        extra.extend(["--unsafe-commit-on-receipt", "--i-know-this-is-unsafe"]);
    }
    let mut first = notifier(&setup, &r.url(), 1, &extra, &dir);
    let finals = ledger.final_records() as u64;
    assert!(
        eventually(Duration::from_secs(60), || async {
            r.stats().refused >= finals
        })
        .await,
        "every coupon was tried once (log in {})",
        dir.display()
    );
    // Give the periodic commit time to commit whatever it will.
    tokio::time::sleep(Duration::from_millis(600)).await;
    first.kill();
    r.fail_for(Duration::ZERO);
    let mut second = notifier(&setup, &r.url(), 2, &["--max-in-flight", "64"], &dir);
    let expected = ledger.expected.len();
    // Done when the group has committed the whole ledger: whatever was
    // going to be delivered has been.
    let settled = eventually(Duration::from_secs(90), || async {
        setup.behind().await.iter().all(|b| *b == 0)
            && (unsafe_arm || r.stats().unique_keys >= expected as u64)
    })
    .await;
    assert_eq!(second.terminate(Duration::from_secs(20)), Some(0));
    assert!(
        settled,
        "{name}: not settled in 90 s (logs in {})",
        dir.display()
    );
    let got = keys(&r);
    assert!(got.iter().all(|k| ledger.expected.contains_key(k)));
    (got.len(), expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_the_endpoint_is_down_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (delivered, expected) = kill_while_the_endpoint_is_down(false, "kill-while-down").await;
    assert_eq!(delivered, expected, "0 lost");
}

/// The planted fault: the same run with offsets committed on receipt. The
/// killed notifier had committed coupons the endpoint never acknowledged,
/// so its successor never reads them: lost. This is what the test above
/// (and `every_final_coupon_survives_a_notifier_kill`) would catch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committing_on_receipt_loses_coupons_across_a_kill() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (delivered, expected) =
        kill_while_the_endpoint_is_down(true, "kill-while-down-unsafe").await;
    assert!(
        delivered < expected,
        "the planted fault must lose coupons: {delivered} of {expected} delivered"
    );
    eprintln!("commit on receipt: {delivered} of {expected} coupons delivered after the kill");
}
