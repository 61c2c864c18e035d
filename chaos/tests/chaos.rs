//! The chaos suite at its small size, one test per scenario, against real
//! processes (tansu or the mock cluster, a private redis-server or Redis
//! Cluster, the `coupon-api` and `coupon-issuer` binaries of this build).
//! They run one at a time: each starts a whole deployment on two cores.

mod common;

use std::path::PathBuf;

use couponrush_chaos::{run_scenario, Scenario, Size};

static ONE_AT_A_TIME: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);

async fn scenario(s: Scenario) {
    let mut built = ONE_AT_A_TIME.lock().await;
    if !*built {
        common::build_binaries();
        *built = true;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos");
    let row = run_scenario(s, 1, Size::Small, &dir)
        .await
        .unwrap_or_else(|e| panic!("{} could not run: {e}", s.name()));
    eprintln!("{}: {row:?}", s.name());
    assert!(row.passed, "{} failed: {}", s.name(), row.notes.join("; "));
    assert_eq!((row.oversold, row.double_issued, row.lost), (0, 0, 0));
}

macro_rules! scenarios {
    ($($name:ident => $s:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                scenario($s).await
            }
        )*
    };
}

scenarios!(
    nothing_lost_or_doubled_when_an_issuer_is_killed_and_restarted => Scenario::Kill9Issuer,
    an_issuer_restarted_at_once_after_a_kill_finishes_the_drop_on_tansu => Scenario::Kill9RestartNow,
    an_issuer_restarted_at_once_after_a_kill_finishes_the_drop_on_the_mock_cluster => Scenario::Kill9RestartNowMock,
    never_oversells_while_issuers_scale_1_4_2 => Scenario::Scale142,
    a_lost_redis_is_rebuilt_from_the_log_without_oversell => Scenario::RedisLost,
    a_redis_back_from_an_older_snapshot_is_rebuilt_without_oversell => Scenario::RedisStale,
    a_cluster_master_failed_over_to_a_replica_behind_is_rebuilt_without_oversell => Scenario::RedisClusterFailover,
    a_reused_key_never_shows_one_user_another_users_decision => Scenario::ReusedKey,
    racing_puts_leave_store_and_log_agreeing_through_a_rebuild => Scenario::RacingPut,
    a_recoverer_frozen_past_its_lock_writes_nothing_over_the_rebuilt_store => Scenario::SlowRecovery,
    nothing_lost_when_the_broker_is_killed_and_restarted => Scenario::BrokerKill,
    nothing_lost_under_injected_broker_faults => Scenario::MockFaults,
    the_dlq_holds_exactly_the_poison_and_deciding_goes_on => Scenario::Poison,
    client_retries_are_the_same_request => Scenario::ClientRetries,
    hostile_requests_get_only_4xx_and_memory_stays_bounded => Scenario::ApiFuzz,
    overload_is_shed_with_503_and_service_returns => Scenario::Overload,
    only_the_admin_token_changes_an_event => Scenario::Admin,
    every_final_coupon_reaches_the_webhook_once_by_key_through_a_notifier_kill => Scenario::HoldsNotifierKill,
    every_final_coupon_reaches_the_webhook_once_by_key_through_a_webhook_outage => Scenario::HoldsWebhookDown,
    compensations_stay_exact_when_an_issuer_is_killed_while_deciding_them => Scenario::HoldsIssuerKill,
    holds_outstanding_survive_a_lost_redis => Scenario::HoldsRedisLost,
);
