//! Experiment 7, `rebalance`: while the group rebalances, consumers cannot
//! read. The same drop, at a steady rate, with a third issuer joining the
//! group mid-drop and leaving it again. It runs with the eager assignors
//! (`range,roundrobin`: every member gives up every partition, then gets
//! its share back) and with `cooperative-sticky` (only the partitions that
//! move are given up).
//!
//! Measured: how many of the two original members were left owning no
//! partition at all during the join (sampled every 2 ms from the in-process
//! issuers' probes), the longest pause between consecutive decisions
//! within 3 s after the join and after the leave, and the replays.

use std::time::Duration;

use couponrush_core::wire::now_micros;
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use couponrush_loadgen::report::Report;
use tokio_util::sync::CancellationToken;

use super::{Arm, Common, Finding, Name, Size};
use crate::deployment::{Deployment, DropSpec, KafkaChoice, Spec, StoreChoice};
use crate::LabError;

/// The note's sentences.
pub const CLAIM_KO: &str = "중간에 컨슈머가 추가/삭제되거나 새로운 파티션이 추가됐을 때 컨슈머별로 할당된 파티션을 다시 고르게 분배하는 과정 - 이 과정 중에는 컨슈머가 카프카 시스템으로부터 메세지를 읽을 수 없음 (컨슈머와 파티션 간의 연결을 모두 끊고 다시 매칭하기 때문에)";
/// In English.
pub const CLAIM: &str = "when a consumer joins or leaves, partitions are redistributed, and meanwhile consumers cannot read, because every consumer-partition link is cut and matched again";

/// The issuers' session timeout in this experiment.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(3);

/// One arm's measurements.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The assignment strategy.
    pub strategy: &'static str,
    /// The drop's report (raw outcomes kept).
    pub report: Report,
    /// Of the two original issuers, how many owned no partition at some
    /// moment while the third joined.
    pub stopped_at_join: usize,
    /// Longest pause in decisions between the join and the leave, ms.
    pub gap_join_ms: f64,
    /// Longest pause in decisions from the leave to the last decision, ms.
    pub gap_leave_ms: f64,
    /// First decisions per 100 ms from the start of the drop.
    pub per_100ms: Vec<u64>,
    /// When the third issuer joined and left, ms from the start of the drop.
    pub join_leave_ms: (u64, u64),
}

/// Runs both strategies.
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let mut measured = Vec::new();
    for strategy in ["range,roundrobin", "cooperative-sticky"] {
        measured.push(one(common, strategy, cancel.clone()).await?);
    }
    Ok(finding(common, &measured))
}

async fn one(
    common: &Common,
    strategy: &'static str,
    cancel: CancellationToken,
) -> Result<Measured, LabError> {
    let (rate, seconds) = match common.size {
        Size::Small => (400.0, 8.0),
        Size::Full => (1000.0, 10.0),
    };
    let requests = (rate * seconds) as u64;
    let mut d = Deployment::start(Spec {
        start_issuers: false,
        batch_size: 100,
        ..Spec::in_process(KafkaChoice::Embedded(1), StoreChoice::Memory, 8, 2)
    })
    .await?;
    d.tune_issuers(move |c| {
        c.assignment = strategy.to_string();
        // The mock cluster's coordinator held a join for about the session
        // timeout (10 s by default) under either strategy: a short one keeps
        // the experiment short.
        c.session_timeout = SESSION_TIMEOUT;
    });
    d.start_issuers()?;
    if !d.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let drop = d
        .start_drop(
            DropSpec {
                plan: LoadPlan {
                    event_id: format!("exp-rebalance-{}", now_micros()),
                    model: LoadModel::Rate(rate),
                    requests,
                    duration: Duration::from_secs_f64(seconds * 2.0),
                    connections: 64,
                    population: Population::new(requests, UserDist::Uniform, 0.0, common.seed),
                },
                terms: EventTerms {
                    stock: requests as u32,
                    per_user_limit: 1,
                },
                drain_timeout: Duration::from_secs(60),
                admin_token: None,
                progress: false,
                keep_raw: true,
                config: serde_json::json!({ "experiment": "rebalance", "assignment": strategy }),
                live: common.page.clone(),
                holds: None,
                stock_buckets: 1,
            },
            false,
            cancel,
        )
        .await?;
    tokio::time::sleep(Duration::from_secs_f64(seconds * 0.25)).await;
    let joined_at = now_micros();
    d.add_issuer()?;
    // Sample the two original members while the third joins.
    let mut min = [usize::MAX; 2];
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let counts = d.assigned_partitions().await;
        for (m, c) in min.iter_mut().zip(&counts) {
            *m = (*m).min(*c);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds * 0.15)).await;
    let left_at = now_micros();
    d.stop_issuer(2).await;
    let report = drop.await?;
    d.stop().await;
    let report = report?;
    let decided = first_decisions(&report);
    let start = report.started_at;
    let mut per_100ms = Vec::new();
    for t in &decided {
        let slot = (t.saturating_sub(start) / 100_000) as usize;
        if per_100ms.len() <= slot {
            per_100ms.resize(slot + 1, 0);
        }
        per_100ms[slot] += 1;
    }
    Ok(Measured {
        per_100ms,
        join_leave_ms: (
            joined_at.saturating_sub(start) / 1000,
            left_at.saturating_sub(start) / 1000,
        ),
        strategy,
        stopped_at_join: min.iter().filter(|m| **m == 0).count(),
        gap_join_ms: longest_gap(&decided, joined_at, left_at),
        gap_leave_ms: longest_gap(
            &decided,
            left_at,
            decided.last().copied().unwrap_or(left_at),
        ),
        report,
    })
}

/// When each request was first seen decided, in order (µs since the epoch).
fn first_decisions(r: &Report) -> Vec<u64> {
    let mut seen = std::collections::HashMap::new();
    for o in r.raw.iter().flat_map(|raw| &raw.outcomes) {
        seen.entry(o.outcome.request_id)
            .and_modify(|t: &mut u64| *t = (*t).min(o.observed_at))
            .or_insert(o.observed_at);
    }
    let mut times: Vec<u64> = seen.into_values().collect();
    times.sort_unstable();
    times
}

/// The longest pause in `[from, to]` between consecutive decisions, the
/// bounds counted as decisions (a pause running past `to` counts up to it),
/// in ms.
fn longest_gap(times: &[u64], from: u64, to: u64) -> f64 {
    let mut prev = from;
    let mut gap = 0;
    for &t in times.iter().filter(|t| **t > from && **t <= to) {
        gap = gap.max(t - prev);
        prev = t;
    }
    gap = gap.max(to.saturating_sub(prev));
    gap as f64 / 1000.0
}

/// The table and verdict: eager first, cooperative second.
pub fn finding(common: &Common, measured: &[Measured]) -> Finding {
    let arms = measured
        .iter()
        .map(|m| {
            Arm::new(
                m.strategy,
                &[
                    ("members stopped", m.stopped_at_join as f64),
                    ("gap join ms", m.gap_join_ms),
                    ("gap leave ms", m.gap_leave_ms),
                    ("replays", m.report.replays as f64),
                    ("lost", m.report.lost as f64),
                    ("double", m.report.double_issued as f64),
                ],
            )
        })
        .collect();
    let (eager, coop) = (&measured[0], &measured[1]);
    let clean = measured.iter().all(|m| m.report.failures() == 0);
    let matches = clean && eager.stopped_at_join == 2 && coop.stopped_at_join == 0;
    Finding {
        experiment: Name::Rebalance,
        rule: 7,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms,
        matches,
        verdict: format!(
            "at the join, {} of 2 members held no partition with range,roundrobin (stop the world) and {} with cooperative-sticky; longest pause in decisions {:.0} vs {:.0} ms (join), {:.0} vs {:.0} ms (leave); nothing lost either way",
            eager.stopped_at_join,
            coop.stopped_at_join,
            eager.gap_join_ms,
            coop.gap_join_ms,
            eager.gap_leave_ms,
            coop.gap_leave_ms
        ),
        notes: vec![
            "8 partitions, two in-process issuers at a steady rate through the api; a third joins at a quarter of the drop and leaves (a clean stop: commit, then leave the group) about 3.5 s later; mock cluster".into(),
            "'members stopped' is sampled every 2 ms; the pauses are timing, shown here but not asserted by the test; the mock cluster hands records out in about 500 ms lumps at this rate, so pauses under 500 ms are noise".into(),
            format!("issuers' session timeout {SESSION_TIMEOUT:?}: on the mock cluster the pause after a join grew with it (about 9 s with the default 10 s)"),
        ],
        extra: serde_json::json!(measured
            .iter()
            .map(|m| serde_json::json!({
                "assignment": m.strategy,
                "joined_ms": m.join_leave_ms.0,
                "left_ms": m.join_leave_ms.1,
                "decided_per_100ms": m.per_100ms,
            }))
            .collect::<Vec<_>>()),
    }
}
