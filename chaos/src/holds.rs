//! The fault rows of the drop's second half: holds and the after-commit
//! hand-off. Each scenario runs a drop whose winners hold their coupon for
//! a claim window (20 % cancel, 10 % never claim, the rest claim through
//! the api), with a `coupon-notifier` process handing every final coupon
//! (a claimed hold) to the lab's webhook receiver, and breaks one part:
//!
//! | scenario | fault |
//! |---|---|
//! | `holds-notifier-kill` | the notifier SIGKILLed mid-drop with deliveries in flight (the webhook refusing them from 1 s before the kill to 1 s after), a new one started 1 s later |
//! | `holds-webhook-down` | the webhook answers 503 for 10 s mid-drop, then comes back |
//! | `holds-issuer-kill` | an issuer SIGKILLed while winners' cancels and expiries are being decided, restarted |
//! | `holds-redis-lost` | Redis lost with holds outstanding: rebuilt from the log (decisions and hold ends) |
//!
//! What every row checks: the drop's audit with holds (nothing oversold,
//! doubled or lost; issued − returned + remaining = stock; no rank held by
//! two requests; no hold both claimed and returned; every hold ended, so
//! every coupon is claimed or back in stock), and at the receiver every
//! final coupon exactly once by key (`event:generation:request`), nothing
//! else; duplicates at the wire are counted, the receiver dedups them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use couponrush_core::wire::{now_micros, HoldState};
use couponrush_lab::deployment::{Deployment, DropSpec};
use couponrush_lab::receiver::{Receiver, ReceiverHandle};
use couponrush_loadgen::drive::holders::HoldPlan;
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use couponrush_loadgen::report::Report;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::rig::BrokerKind;
use crate::{fraction, lose_redis, rig, sleep_until_load, spec, ChaosError, Dims, Row, Scenario};

/// Which part of the second half breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldFault {
    /// The notifier SIGKILLed, a new one started.
    NotifierKill,
    /// The webhook down for 10 s.
    WebhookDown,
    /// An issuer SIGKILLed while compensations are decided.
    IssuerKill,
    /// Redis lost with holds outstanding.
    RedisLost,
}

/// How long a winner's hold lasts: short, so that holds end (and their
/// coupons return and are issued again) while the load still runs.
const CLAIM_WINDOW: Duration = Duration::from_secs(2);

/// How long after the drop the receiver may take to see every final coupon.
const DELIVERY_WAIT: Duration = Duration::from_secs(90);

/// Runs one scenario of the second half.
pub(crate) async fn run(
    scenario: Scenario,
    fault: HoldFault,
    seed: u64,
    dims: Dims,
    fault_at: f64,
    dir: &std::path::Path,
) -> Result<Row, ChaosError> {
    let dims = Dims {
        seconds: dims.hold_seconds,
        ..dims
    };
    let mut rig = rig(spec(BrokerKind::TansuMemory, 2), dir).await?;
    let receiver = Receiver::start(([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| format!("the webhook receiver did not start: {e}"))?;
    let notifier_args: Vec<String> = [
        // A killed notifier's partitions move after this long.
        "--session-timeout",
        "3s",
        // Retries while the webhook is down come back often.
        "--retry-max",
        "1s",
        // An outage of 10 s is retried, never dead-lettered.
        "--max-attempts",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    rig.start_notifier(&receiver.url(), &notifier_args)?;
    let (drop, started) = start_drop_with_holds(&rig, dims, seed).await?;
    if fault == HoldFault::NotifierKill {
        // Deliveries are in flight when the kill comes: the endpoint
        // refuses them from a second before it until a second after.
        sleep_until_load(started, (fault_at - 1.0).max(0.0)).await;
        receiver.fail_for(Duration::from_secs(2));
    }
    sleep_until_load(started, fault_at).await;
    let fault_us = now_micros();
    let mut notes = Vec::new();
    match fault {
        HoldFault::NotifierKill => {
            rig.kill_notifier(0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            rig.start_notifier(&receiver.url(), &notifier_args)?;
        }
        HoldFault::WebhookDown => receiver.fail_for(Duration::from_secs(10)),
        HoldFault::IssuerKill => {
            rig.kill_issuer(0);
            // tansu evicts a dead member only when another joins after its
            // session expired (docs/RELIABILITY.md): restart after that.
            tokio::time::sleep(Duration::from_secs(7)).await;
            rig.add_issuer()?;
        }
        HoldFault::RedisLost => {
            let held = held_now(&rig, &drop.1).await;
            notes.push(format!("{held} coupons held when Redis was lost"));
            lose_redis(&mut rig).await?;
        }
    }
    let report = drop.0.await.map_err(|e| e.to_string())??;
    let mut row = Row::from_report(scenario, seed, &report, dir);
    row.fault_at_s = Some(fault_at);
    row.recover_s = crate::longest_wait(&report, fault_us);
    row.notes.extend(notes);
    check_holds(&mut row, &report);
    check_deliveries(&mut row, &report, &receiver).await;
    receiver.stop().await;
    rig.stop().await;
    Ok(row)
}

/// Starts the drop with holds; returns its task and event, and the moment
/// the load starts (µs).
async fn start_drop_with_holds(
    rig: &Deployment,
    dims: Dims,
    seed: u64,
) -> Result<
    (
        (
            tokio::task::JoinHandle<Result<Report, couponrush_loadgen::Error>>,
            String,
        ),
        u64,
    ),
    ChaosError,
> {
    let event = format!("chaos-holds-{}", Uuid::new_v4().simple());
    // Fewer coupons than the plain drop: every winner also claims or
    // cancels through the api, and the returned ones are issued again.
    let stock = dims.stock / 2;
    let spec = DropSpec {
        plan: LoadPlan {
            event_id: event.clone(),
            model: LoadModel::Rate(dims.rate),
            requests: (dims.rate * dims.seconds) as u64,
            duration: Duration::from_secs_f64(dims.seconds * 3.0),
            connections: 256,
            population: Population::new(dims.users, UserDist::Uniform, 0.02, seed),
        },
        terms: EventTerms {
            stock,
            per_user_limit: 1,
        },
        drain_timeout: Duration::from_secs(120),
        admin_token: None,
        progress: false,
        keep_raw: true,
        config: serde_json::json!({ "chaos": true, "holds": true }),
        live: None,
        holds: Some(HoldPlan {
            claim_window: CLAIM_WINDOW,
            cancel_ratio: 0.2,
            no_claim_ratio: 0.1,
            think_time: Duration::from_millis(500),
            // A rebuild or a restarted issuer may hold up the ends.
            slack: Duration::from_secs(30),
            connections: 64,
            seed: seed ^ 0x5eed,
        }),
        stock_buckets: 1,
    };
    let started = now_micros();
    let handle = rig
        .start_drop(spec, false, CancellationToken::new())
        .await?;
    Ok(((handle, event), started))
}

/// Coupons held now (issued, not yet claimed or returned), by the store.
async fn held_now(rig: &Deployment, event: &str) -> u64 {
    match rig.store.event(event).await {
        Ok(Some(state)) => u64::from(state.held()),
        _ => 0,
    }
}

/// The holds' audit, spelled out in the row.
fn check_holds(row: &mut Row, report: &Report) {
    let Some(h) = report.holds.as_ref() else {
        row.check(false, "the drop has hold figures");
        return;
    };
    // Restated ends: every issuer's sweep writes its own expire for a due
    // hold (the second is a replay), so only restated claims and cancels
    // show actions decided again after a fault.
    let (mut restated, mut expiries) = (0, 0);
    for h in report.raw.iter().flat_map(|r| &r.holds) {
        match (h.hold.replay, h.hold.state) {
            (true, HoldState::Expired) => expiries += 1,
            (true, _) => restated += 1,
            _ => {}
        }
    }
    row.notes.push(format!(
        "holds: {} issued, {} claimed, {} cancelled, {} expired, {} ranks re-issued; \
         {} claims and cancels restated after redelivery, {} expiries restated (a second \
         sweep); issued − returned + remaining = {} − {} + {} (stock {})",
        h.issued,
        h.claimed,
        h.cancelled,
        h.expired,
        h.reissued,
        restated,
        expiries,
        h.issued_total,
        h.returned,
        h.remaining.map_or("?".into(), |r| r.to_string()),
        report.stock
    ));
    row.check(h.failures() == 0, "the holds' audit is clean");
    row.check(
        h.open == 0 && h.stuck == 0,
        "every hold ended: each coupon claimed or back in stock",
    );
    row.check(
        h.claimed > 0 && h.cancelled > 0 && h.expired > 0,
        "winners claimed, cancelled and let holds expire",
    );
}

/// Every final coupon at the receiver exactly once by key, nothing else.
async fn check_deliveries(row: &mut Row, report: &Report, receiver: &ReceiverHandle) {
    let expected: HashSet<String> = report
        .raw
        .as_ref()
        .map(|r| {
            r.holds
                .iter()
                .filter(|h| h.hold.state == HoldState::Claimed)
                .map(|h| {
                    format!(
                        "{}:{}:{}",
                        h.hold.event_id, h.hold.generation, h.hold.request_id
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let deadline = Instant::now() + DELIVERY_WAIT;
    let delivered = loop {
        let counts = receiver.counts();
        let got: HashSet<String> = counts.keys().cloned().collect();
        if expected.is_subset(&got) || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let keys: HashSet<&String> = delivered.keys().collect();
    let missing = expected.iter().filter(|k| !keys.contains(k)).count();
    let extra = keys.iter().filter(|k| !expected.contains(**k)).count();
    let stats = receiver.stats();
    row.notes.push(format!(
        "notifier: {} final coupons, {} delivered (unique keys), {} duplicates at the wire \
         (deduplicated by the receiver), {} refused while down",
        expected.len(),
        stats.unique_keys,
        stats.duplicates,
        stats.refused
    ));
    row.check(!expected.is_empty(), "some coupons were final");
    row.check(
        missing == 0,
        format!("every final coupon delivered ({missing} missing)"),
    );
    row.check(
        extra == 0,
        format!("nothing but final coupons delivered ({extra} others)"),
    );
}

/// Where in the load a hold scenario's fault lands: after the first holds
/// have ended (a claim window and a think time in), before the load ends.
pub(crate) fn fault_at(seed: u64, dims: Dims) -> f64 {
    let dims = Dims {
        seconds: dims.hold_seconds,
        ..dims
    };
    let earliest = (CLAIM_WINDOW.as_secs_f64() + 1.0).min(dims.seconds * 0.5);
    earliest + (dims.seconds * 0.6 - earliest).max(0.5) * fraction(seed)
}
