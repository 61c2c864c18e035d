//! Direction tests of the lab's experiments (docs/LAB.md): each runs its
//! experiment at the small size and asserts that the unsafe arm shows what
//! the field note says it costs (lost requests, doubles, one hot issuer, an
//! ordering break) and the safe arm shows none of it. They assert
//! correctness and direction, never timing, so an `--unsafe-…` switch that
//! rotted into a no-op fails here.
//!
//! The experiments that kill an issuer run `coupon-api` and `coupon-issuer`
//! processes of this build (`cargo build --workspace`, or
//! `cargo build -p couponrush-api -p couponrush-issuer`, first) and a private
//! redis-server. One experiment at a time: they share two cores with
//! whatever else runs.

use std::process::Command;

use couponrush_lab::deployment::binary;
use couponrush_lab::experiment::{self, hot_key, Common, Size};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn common(name: &str) -> (Common, std::path::PathBuf) {
    let out = std::env::temp_dir().join(format!(
        "couponrush-experiment-test-{name}-{}",
        std::process::id()
    ));
    (
        Common {
            seed: 1,
            size: Size::Small,
            out: out.clone(),
            page: None,
        },
        out,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_dedup_a_redelivered_request_is_issued_twice_and_with_dedup_never() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("no-dedup");
    let f = experiment::no_dedup::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let (safe, unsafe_) = (&f.arms[0], &f.arms[1]);
    assert!(safe.get("replays") > 0.0, "redeliveries happened: {f:?}");
    assert_eq!(safe.get("double"), 0.0, "{}", f.text());
    assert_eq!(safe.get("lost"), 0.0, "{}", f.text());
    assert_eq!(safe.get("inconsistent"), 0.0, "{}", f.text());
    assert!(unsafe_.get("double") > 0.0, "{}", f.text());
    assert!(f.matches, "{}", f.text());
    let _ = std::fs::remove_dir_all(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_commit_loses_the_batch_a_killed_issuer_held_and_manual_commit_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("auto-commit");
    let f = experiment::auto_commit::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let (manual, short, long) = (&f.arms[0], &f.arms[1], &f.arms[2]);
    assert_eq!(manual.get("lost"), 0.0, "{}", f.text());
    assert_eq!(manual.get("double"), 0.0, "{}", f.text());
    assert!(short.get("lost") > 0.0, "{}", f.text());
    assert_eq!(long.get("lost"), 0.0, "{}", f.text());
    assert!(
        long.get("replays") > 0.0,
        "a kill before the timer fired redelivers what was done: {}",
        f.text()
    );
    assert!(f.matches, "{}", f.text());
    let _ = std::fs::remove_dir_all(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_puts_the_drop_on_one_issuer_in_order_and_spread_keys_share_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("hot-key");
    let f = experiment::hot_key::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let event_two = f
        .arms
        .iter()
        .find(|a| a.name == "event × 2 issuer(s)")
        .unwrap();
    let spread_two = f
        .arms
        .iter()
        .find(|a| a.name == "spread × 2 issuer(s)")
        .unwrap();
    assert_eq!(event_two.get("partitions"), 1.0, "{}", f.text());
    assert_eq!(event_two.get("issuers"), 1.0, "{}", f.text());
    assert_eq!(event_two.get("busiest"), 1.0, "{}", f.text());
    assert_eq!(
        spread_two.get("partitions"),
        f64::from(hot_key::PARTITIONS),
        "{}",
        f.text()
    );
    assert_eq!(spread_two.get("issuers"), 2.0, "{}", f.text());
    assert!(spread_two.get("busiest") < 1.0, "{}", f.text());
    assert!(
        event_two.get("inversion") < spread_two.get("inversion"),
        "{}",
        f.text()
    );
    for a in &f.arms {
        assert_eq!(a.get("failures"), 0.0, "{}", f.text());
    }
    assert!(out.join("hot-key.svg").exists(), "the chart is written");
    let _ = std::fs::remove_dir_all(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redriven_dlq_loses_nothing_and_a_second_redrive_changes_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("dlq");
    let f = experiment::dlq::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let (redriven, left) = (&f.arms[0], &f.arms[1]);
    assert_eq!(
        redriven.get("dead"),
        redriven.get("accepted"),
        "{}",
        f.text()
    );
    assert_eq!(
        redriven.get("redriven"),
        redriven.get("accepted"),
        "{}",
        f.text()
    );
    assert_eq!(redriven.get("2nd run"), 0.0, "{}", f.text());
    assert_eq!(
        redriven.get("decided"),
        redriven.get("accepted"),
        "{}",
        f.text()
    );
    assert_eq!(redriven.get("lost"), 0.0, "{}", f.text());
    assert_eq!(redriven.get("double"), 0.0, "{}", f.text());
    assert_eq!(left.get("lost"), left.get("accepted"), "{}", f.text());
    assert!(f.matches, "{}", f.text());
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn the_issuer_refuses_an_unsafe_switch_unless_told_it_is_unsafe() {
    let issuer = binary("coupon-issuer").expect("coupon-issuer is built");
    for switch in [&["--unsafe-no-dedup"][..], &["--unsafe-auto-commit", "1s"]] {
        let out = Command::new(&issuer)
            .args(["--brokers", "127.0.0.1:9", "--redis", "redis://127.0.0.1:9"])
            .args(switch)
            .env_clear()
            .output()
            .unwrap();
        assert!(!out.status.success(), "{switch:?} refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(switch[0]) && stderr.contains("--i-know-this-is-unsafe"),
            "{switch:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_and_async_commits_both_lose_nothing_and_each_commits_the_way_asked() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("commit-mode");
    let f = experiment::commit_mode::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let (sync, async_) = (&f.arms[0], &f.arms[1]);
    for a in [sync, async_] {
        assert_eq!(a.get("lost"), 0.0, "{}", f.text());
        assert_eq!(a.get("double"), 0.0, "{}", f.text());
        // Replays depend on where in a batch the kill lands: shown, not asserted.
    }
    assert!(sync.get("sync commits") > 0.0, "{}", f.text());
    assert_eq!(sync.get("async commits"), 0.0, "{}", f.text());
    assert!(async_.get("async commits") > 0.0, "{}", f.text());
    assert_eq!(async_.get("sync commits"), 0.0, "{}", f.text());
    assert!(f.matches, "{}", f.text());
    let _ = std::fs::remove_dir_all(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eager_rebalance_takes_every_partition_from_every_member_and_a_cooperative_one_does_not()
{
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("rebalance");
    let f = experiment::rebalance::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let (eager, coop) = (&f.arms[0], &f.arms[1]);
    assert_eq!(eager.get("members stopped"), 2.0, "{}", f.text());
    assert_eq!(coop.get("members stopped"), 0.0, "{}", f.text());
    for a in [eager, coop] {
        assert_eq!(a.get("lost"), 0.0, "{}", f.text());
        assert_eq!(a.get("double"), 0.0, "{}", f.text());
    }
    assert!(f.matches, "{}", f.text());
    let _ = std::fs::remove_dir_all(out);
}

/// Needs tansu (`scripts/dev-up` installs it; `TANSU_BIN` points at another):
/// the mock cluster implements no retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_older_than_the_retention_are_gone_for_a_late_group_though_nobody_read_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("retention");
    let f = experiment::retention::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let (short, long) = (&f.arms[0], &f.arms[1]);
    assert_eq!(
        short.get("found at once"),
        short.get("produced"),
        "{}",
        f.text()
    );
    assert!(
        short.get("late group found") < short.get("produced"),
        "{}",
        f.text()
    );
    assert_eq!(
        long.get("late group found"),
        long.get("produced"),
        "{}",
        f.text()
    );
    assert!(f.matches, "{}", f.text());
    let _ = std::fs::remove_dir_all(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_payload_snapshot_is_stale_by_the_time_it_is_decided_and_a_zero_payload_carries_none(
) {
    let _one = ONE_AT_A_TIME.lock().await;
    let (c, out) = common("payload");
    let f = experiment::payload::run(&c, CancellationToken::new())
        .await
        .unwrap();
    println!("{}", f.text());
    let (zero, full) = (&f.arms[0], &f.arms[1]);
    assert_eq!(zero.get("snapshots"), 0.0, "{}", f.text());
    assert!(full.get("snapshots") > 0.0, "{}", f.text());
    assert!(full.get("stale") > 0.0, "{}", f.text());
    assert!(
        full.get("bytes/record") > 4.0 * zero.get("bytes/record"),
        "{}",
        f.text()
    );
    for a in [zero, full] {
        assert_eq!(a.get("failures"), 0.0, "{}", f.text());
    }
    assert!(f.matches, "{}", f.text());
    let _ = std::fs::remove_dir_all(out);
}
