//! Experiment 1, `auto-commit`: auto-commit loses messages. The same drop,
//! an issuer SIGKILLed while it works through a batch, with three ways of
//! committing:
//!
//! - manual (safe, what couponrush does): a batch's offsets are committed
//!   only after its decisions are in the store and its outcomes acknowledged;
//! - `--unsafe-auto-commit 20ms`: librdkafka commits, every 20 ms, the
//!   offsets it stored when poll handed the records out, decided or not: the
//!   killed issuer's batch in hand is committed and never decided (lost);
//! - `--unsafe-auto-commit 60s`: the timer has not fired when the issuer
//!   dies after processing: everything it decided is delivered again
//!   (replays, harmless only because the store dedups: experiment 3).

use std::time::Duration;

use couponrush_issuer::experiment::Arms;
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::report::Report;
use tokio_util::sync::CancellationToken;

use super::{audit_figures, killed_drop, Arm, Common, Finding, Kill, KilledDrop, Name, Size};
use crate::LabError;

/// The note's sentences.
pub const CLAIM_KO: &str = "컨슈머가 메세지를 읽었지만 아직 처리하지 못했는데 주기 때문에 커밋이 발생한 다음 장애가 발생하면? → 누락되는 메세지 발생 / 메세지 처리가 완료된 후 커밋을 하지 못했는데 장애가 발생하면? → 중복 처리되는 메세지 발생";
/// In English.
pub const CLAIM: &str = "with auto-commit, a crash after a timed commit of records read but not processed loses them; a crash after processing but before the timed commit processes them twice";

/// Runs the three arms.
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let (requests, work, batch) = match common.size {
        // Slower to decide than to accept, so at the kill a backlog waits
        // and the killed issuer holds a full batch.
        Size::Small => (800, Duration::from_millis(4), 50),
        Size::Full => (3000, Duration::from_millis(2), 100),
    };
    let arm = |auto: Option<Duration>| KilledDrop {
        arms: Arms {
            // A batch takes (batch × work) to process: the kill lands inside one.
            work_per_record: work,
            unsafe_no_dedup: false,
            unsafe_auto_commit: auto,
        },
        requests,
        users: requests,
        retry_ratio: 0.0,
        terms: EventTerms {
            stock: requests as u32,
            per_user_limit: requests as u32,
        },
        // One issuer: the group's commits and the store's decisions are
        // then that issuer's, and the kill waits until the issuer, frozen,
        // is found with the first ahead of the second (never, with manual
        // commits: then the kill comes after `wait`).
        issuers: 1,
        issuer_args: Vec::new(),
        kill: Kill::CommitAhead {
            issued: (requests / 4) as u32,
            wait: Duration::from_secs(1),
        },
        batch_size: batch,
        // Lost requests are never decided: the drop waits this long for them.
        drain: Duration::from_secs(30),
    };
    let arms = [
        ("manual commit after the work (safe)", arm(None)),
        (
            "--unsafe-auto-commit 20ms",
            arm(Some(Duration::from_millis(20))),
        ),
        (
            "--unsafe-auto-commit 60s",
            arm(Some(Duration::from_secs(60))),
        ),
    ];
    let mut measured = Vec::new();
    for (i, (name, k)) in arms.into_iter().enumerate() {
        let run = killed_drop(
            common,
            Name::AutoCommit,
            &format!("arm{i}"),
            k,
            cancel.clone(),
        )
        .await?;
        measured.push((name, run.report, run.condition));
    }
    Ok(finding(common, &measured))
}

/// The table and verdict: manual first, the short timer second, the long
/// timer third.
pub fn finding(common: &Common, measured: &[(&str, Report, bool)]) -> Finding {
    let arms = measured
        .iter()
        .map(|(name, r, _)| Arm::new(*name, &audit_figures(r)))
        .collect();
    let (manual, short, long) = (&measured[0].1, &measured[1].1, &measured[2].1);
    let matches = manual.lost == 0
        && manual.failures() == 0
        && !measured[0].2
        && short.lost > 0
        && long.lost == 0;
    let mut notes = vec![
        "one issuer, SIGKILLed once a quarter of the coupons were issued and, frozen (SIGSTOP), it was found with the group's committed offsets ahead of the store's decisions (the 20 ms timer), or 1 s later without (manual commits, the 60 s timer); a new issuer started 0.5 s after; every record costs simulated work, so a batch is in hand".to_string(),
    ];
    if !measured[1].2 {
        notes.push(
            "the 20 ms timer was never found committed ahead of the decisions within 1 s".into(),
        );
    }
    if measured[0].2 {
        notes.push(
            "BUG: with manual commits the committed offsets ran ahead of the decisions".into(),
        );
    }
    Finding {
        experiment: Name::AutoCommit,
        rule: 1,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms,
        matches,
        verdict: format!(
            "lost {} with manual commits, {} when the timer committed what poll handed out; replays {} (manual) vs {} when the issuer died before a 60 s timer fired",
            manual.lost, short.lost, manual.replays, long.replays
        ),
        notes,
        extra: serde_json::Value::Null,
    }
}
