//! Experiment 3, `no-dedup`: at-least-once delivery needs an idempotent
//! consumer. The same drop, 10 % of requests retried by the client with the
//! same `Idempotency-Key` and one issuer SIGKILLed mid-drop (its uncommitted
//! records are redelivered), decided by a store that dedups by request id
//! (safe) and by one that gets a fresh id for every delivery
//! (`--unsafe-no-dedup`): every redelivery is then issued again, the note's
//! "add 100" applied twice where "set to 1100" would not be.
//!
//! The per-user limit is set above one, so it does not hide the doubles: a
//! limit of one is itself a state rule ("a user holds at most one"), the
//! note's second road to idempotency, and the full run shows that arm too.

use std::time::Duration;

use couponrush_issuer::experiment::Arms;
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::report::Report;
use tokio_util::sync::CancellationToken;

use super::{audit_figures, killed_drop, Arm, Common, Finding, Kill, KilledDrop, Name, Size};
use crate::LabError;

/// The note's sentence.
pub const CLAIM_KO: &str = "카프카는 메세지를 최소 한번을 보장하지만, 정확히 한번을 보장하지는 않음 … 멱등성을 확보하기 위해서는 메세지마다 유니크한 ID (UUID)를 부여하고, 컨슈머는 이 ID를 기준으로 이미 처리된 메세지인지 확인하여 중복 처리를 방지할 수 있음";
/// In English.
pub const CLAIM: &str = "Kafka delivers at least once, not exactly once: without dedup by a unique id, a redelivered request is processed twice";

/// One arm's drop and whether the kill landed mid-drop.
pub struct Measured {
    /// The drop's report.
    pub report: Report,
    /// The kill happened before the drop ended.
    pub killed_mid_drop: bool,
}

/// Runs the safe and the unsafe arm (and, at full size, the unsafe arm
/// under a per-user limit of one).
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let (requests, work) = match common.size {
        Size::Small => (600, Duration::from_micros(600)),
        Size::Full => (3000, Duration::from_micros(300)),
    };
    let arm = |no_dedup: bool, per_user_limit: u32| KilledDrop {
        arms: Arms {
            // Slow enough that the kill lands while records are in flight.
            work_per_record: work,
            unsafe_no_dedup: no_dedup,
            unsafe_auto_commit: None,
        },
        requests,
        users: requests,
        retry_ratio: 0.1,
        // Stock for every delivery: a double is never hidden by a sell-out.
        terms: EventTerms {
            stock: (requests * 2) as u32,
            per_user_limit,
        },
        issuers: 2,
        issuer_args: Vec::new(),
        kill: Kill::AfterIssued((requests / 3) as u32),
        batch_size: 200,
        drain: Duration::from_secs(60),
    };
    let mut arms = vec![
        ("dedup by request id (safe)", arm(false, 5)),
        ("--unsafe-no-dedup", arm(true, 5)),
    ];
    if common.size == Size::Full {
        arms.push(("--unsafe-no-dedup, limit 1", arm(true, 1)));
    }
    let mut measured = Vec::new();
    for (i, (name, k)) in arms.into_iter().enumerate() {
        let run = killed_drop(common, Name::NoDedup, &format!("arm{i}"), k, cancel.clone()).await?;
        measured.push((
            name,
            Measured {
                report: run.report,
                killed_mid_drop: run.condition,
            },
        ));
    }
    Ok(finding(common, &measured))
}

/// The table and verdict from measured arms (safe first, unsafe second).
pub fn finding(common: &Common, measured: &[(&str, Measured)]) -> Finding {
    let arms: Vec<Arm> = measured
        .iter()
        .map(|(name, m)| {
            let r = &m.report;
            let mut f = audit_figures(r);
            f.push(("inconsistent", r.inconsistent_replays as f64));
            f.push(("limit", f64::from(r.per_user_limit)));
            Arm::new(*name, &f)
        })
        .collect();
    let (safe, unsafe_) = (&measured[0].1.report, &measured[1].1.report);
    let matches = safe.double_issued == 0 && safe.failures() == 0 && unsafe_.double_issued > 0;
    let mut notes = vec![
        "10% client retries with the same Idempotency-Key, one issuer SIGKILLed mid-drop and replaced; per-user limit 5, stock for every delivery".to_string(),
        "with --unsafe-no-dedup the store's ledger holds coupons under ids no client sent (counted as phantom and ledger mismatch by the audit)".to_string(),
    ];
    if measured.iter().any(|(_, m)| !m.killed_mid_drop) {
        notes.push(
            "in some arm the drop ended before the kill: only client retries were redelivered"
                .into(),
        );
    }
    if let Some((_, m)) = measured.get(2) {
        notes.push(format!(
            "under a per-user limit of 1 the limit itself refuses the second coupon (double {}), but {} redeliveries got a different answer than the first (inconsistent replays): the state rule keeps the stock, not the answer",
            m.report.double_issued, m.report.inconsistent_replays
        ));
    }
    Finding {
        experiment: Name::NoDedup,
        rule: 3,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms,
        matches,
        verdict: format!(
            "double issued {} with dedup, {} without ({} redeliveries seen with dedup, each answered with the first decision)",
            safe.double_issued, unsafe_.double_issued, safe.replays
        ),
        notes,
        extra: serde_json::Value::Null,
    }
}
