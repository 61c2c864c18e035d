//! Experiment 2, `commit-mode`: manual commits, synchronous or asynchronous
//! (`--commit sync|async`). Both commit only what is decided and published,
//! so neither loses anything. The difference is what the issuer waits for: a
//! synchronous commit waits for the broker after every batch, and an
//! asynchronous one goes on at once and learns later whether the commit
//! failed (the note's "extra error handling"). couponrush handles that by
//! treating a failed or late commit as replays, and by committing
//! synchronously on revoke and at shutdown.
//!
//! Each arm runs twice over two issuer processes with small batches (so
//! there are many commits): once undisturbed, for decided/s, and once with
//! an issuer SIGKILLed mid-drop, for the replays.

use std::time::Duration;

use couponrush_issuer::experiment::Arms;
use couponrush_loadgen::measure::audit::EventTerms;
use tokio_util::sync::CancellationToken;

use super::{killed_drop, Arm, Common, Finding, Kill, KilledDrop, KilledRun, Name, Size};
use crate::LabError;

/// The note's sentence.
pub const CLAIM_KO: &str = "Munual Commit - 개발자가 코드 내에서 직접 오프셋을 커밋하는 방식 (실전에서 사용) - 동기 방식과 비동기 방식이 있는데, 비동기 방식에서는 커밋 실패에 대한 추가적인 오류 처리가 필요할 수 있음";
/// In English.
pub const CLAIM: &str = "manual commits (what is used in practice) are synchronous or asynchronous; the asynchronous way may need extra handling of failed commits";

/// One arm: the undisturbed run and the killed run.
pub struct Measured {
    /// `sync` or `async`.
    pub mode: &'static str,
    /// Without a kill.
    pub calm: KilledRun,
    /// With issuer 0 SIGKILLed once a third of the coupons were issued.
    pub killed: KilledRun,
}

/// Runs both arms.
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let requests = match common.size {
        Size::Small => 800,
        Size::Full => 4000,
    };
    let drop = |mode: &str, kill: Kill| KilledDrop {
        arms: Arms::default(),
        requests,
        users: requests,
        retry_ratio: 0.0,
        terms: EventTerms {
            stock: requests as u32,
            per_user_limit: requests as u32,
        },
        issuers: 2,
        issuer_args: vec!["--commit".into(), mode.into()],
        kill,
        // Small batches: one commit per 20 records.
        batch_size: 20,
        drain: Duration::from_secs(60),
    };
    let mut measured = Vec::new();
    for mode in ["sync", "async"] {
        let calm = killed_drop(
            common,
            Name::CommitMode,
            &format!("{mode}-calm"),
            drop(mode, Kill::Never),
            cancel.clone(),
        )
        .await?;
        let killed = killed_drop(
            common,
            Name::CommitMode,
            &format!("{mode}-killed"),
            drop(mode, Kill::AfterIssued((requests / 3) as u32)),
            cancel.clone(),
        )
        .await?;
        measured.push(Measured { mode, calm, killed });
    }
    Ok(finding(common, &measured))
}

/// The table and verdict: sync first, async second.
pub fn finding(common: &Common, measured: &[Measured]) -> Finding {
    let arms = measured
        .iter()
        .map(|m| {
            Arm::new(
                format!("--commit {}", m.mode),
                &[
                    ("decided/s", m.calm.report.throughput.decided_per_s),
                    ("replays", m.killed.report.replays as f64),
                    ("lost", (m.calm.report.lost + m.killed.report.lost) as f64),
                    (
                        "double",
                        (m.calm.report.double_issued + m.killed.report.double_issued) as f64,
                    ),
                    ("sync commits", m.calm.commits["sync"]),
                    ("async commits", m.calm.commits["async"]),
                ],
            )
        })
        .collect();
    let (sync, async_) = (&measured[0], &measured[1]);
    let clean = measured
        .iter()
        .all(|m| m.calm.report.failures() == 0 && m.killed.report.failures() == 0);
    let switched = sync.calm.commits["sync"] > 0.0
        && sync.calm.commits["async"] == 0.0
        && async_.calm.commits["async"] > 0.0
        && async_.calm.commits["sync"] == 0.0;
    let mut notes = vec![
        "two issuer processes, batches of 20; decided/s from the undisturbed run, replays from a second run with one issuer SIGKILLed once a third of the coupons were issued; commit counts from the issuers' couponrush_issuer_commits_total".to_string(),
    ];
    if measured.iter().any(|m| !m.killed.condition) {
        notes.push("in some arm the drop ended before the kill".into());
    }
    Finding {
        experiment: Name::CommitMode,
        rule: 2,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms,
        matches: clean && switched,
        verdict: format!(
            "both lose nothing (an async commit that fails or lags costs replays: {} after the kill vs {} with sync); decided/s {:.0} (sync) vs {:.0} (async){}",
            async_.killed.report.replays,
            sync.killed.report.replays,
            sync.calm.report.throughput.decided_per_s,
            async_.calm.report.throughput.decided_per_s,
            if switched { "" } else { "; the commit counters do not show the mode asked for" }
        ),
        notes,
        extra: serde_json::Value::Null,
    }
}
