//! The recovery fence must outlast every outcome still on its way to the
//! log, whatever `--kafka-opt` says: an issuer whose effective producer
//! configuration lets an outcome land after the fence is refused at
//! start-up, before it decides anything.
//!
//! Nothing listens on the brokers' address: a refused configuration returns
//! at once, an accepted one runs (and is stopped by the test).

use std::sync::Arc;
use std::time::Duration;

use couponrush_core::cli::parse_ignoring_env;
use couponrush_core::store::memory::MemoryStore;
use couponrush_issuer::{run_issuer, Cli, IssuerError};
use tokio_util::sync::CancellationToken;

/// Runs an issuer with `flags`; the start-up error, or None if it was still
/// running after a second.
async fn refusal(flags: &[&str]) -> Option<IssuerError> {
    let mut args = vec!["coupon-issuer", "--brokers", "127.0.0.1:9"];
    args.extend_from_slice(flags);
    let config = parse_ignoring_env::<Cli>(&args).config();
    let shutdown = CancellationToken::new();
    let run = run_issuer(config, Arc::new(MemoryStore::default()), shutdown.clone());
    let result = tokio::time::timeout(Duration::from_secs(1), run).await;
    shutdown.cancel();
    result.ok().and_then(Result::err)
}

async fn assert_refused(flags: &[&str], names: &[&str]) {
    let Some(e) = refusal(flags).await else {
        panic!(
            "{flags:?}: the issuer started, but an outcome could reach the log after the recovery fence"
        );
    };
    let message = e.to_string();
    assert!(
        matches!(e, IssuerError::Fence(_)),
        "{flags:?}: refused for another reason: {message}"
    );
    for name in names.iter().chain(&["--recovery-fence"]) {
        assert!(
            message.contains(name),
            "{flags:?}: the error names {name}: {message}"
        );
    }
}

#[tokio::test]
async fn a_message_timeout_past_the_fence_is_refused_at_start_up() {
    assert_refused(
        &["--kafka-opt", "message.timeout.ms=20000"],
        &["message.timeout.ms"],
    )
    .await;
    assert_refused(
        &["--kafka-opt", "delivery.timeout.ms=20000"],
        &["delivery.timeout.ms"],
    )
    .await;
}

#[tokio::test]
async fn a_request_timeout_that_pushes_the_bound_past_the_fence_is_refused() {
    // message timeout 10 s (under the 15 s fence, as the old check wanted),
    // but a produce request on the wire may still land 8 s later.
    assert_refused(
        &[
            "--kafka-opt",
            "message.timeout.ms=10000",
            "--kafka-opt",
            "request.timeout.ms=8000",
        ],
        &["message.timeout.ms", "request.timeout.ms"],
    )
    .await;
    assert_refused(
        &[
            "--publish-timeout",
            "14s",
            "--kafka-opt",
            "request.timeout.ms=6000",
        ],
        &["request.timeout.ms"],
    )
    .await;
}

#[tokio::test]
async fn a_linger_that_pushes_the_bound_past_the_fence_is_refused() {
    assert_refused(
        &[
            "--kafka-opt",
            "message.timeout.ms=10000",
            "--kafka-opt",
            "request.timeout.ms=4000",
            "--kafka-opt",
            "linger.ms=1500",
        ],
        &["linger.ms"],
    )
    .await;
}

#[tokio::test]
async fn an_unbounded_message_timeout_is_refused() {
    // librdkafka reads 0 as "no timeout": an outcome could land at any time.
    assert_refused(
        &["--kafka-opt", "message.timeout.ms=0"],
        &["message.timeout.ms"],
    )
    .await;
}

#[tokio::test]
async fn the_defaults_and_a_short_fence_with_a_short_publish_timeout_start() {
    for flags in [
        &[][..],
        &["--publish-timeout", "3s", "--recovery-fence", "5s"][..],
        &["--kafka-opt", "request.timeout.ms=2000"][..],
    ] {
        if let Some(e) = refusal(flags).await {
            panic!("{flags:?} was refused: {e}");
        }
    }
}
