//! Experiment 4, `hot-key`: one key means one partition, so one consumer
//! instance takes the whole drop; spreading keys lets instances share it at
//! the cost of strict order. The same drop with `--partitioner event` (every
//! request of the event under one key) and `spread` (key = request id), with
//! 1, 2 and 4 issuers each paying a simulated cost per record
//! (`--work-per-record`), so the issuers, not the api, are the bottleneck.
//!
//! Measured per run: decided/s, the busiest issuer's share of the decisions
//! (from the `x-issuer` header of each outcome), how many partitions carried
//! requests, and the inversion ratio (pairs decided in the opposite order of
//! their arrival). Writes `hot-key.svg`: decided/s by issuer count.

use std::time::Duration;

use couponrush_core::Partitioner;
use couponrush_issuer::experiment::Arms;
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use couponrush_loadgen::report::Report;
use tokio_util::sync::CancellationToken;

use super::{write, Arm, Common, Finding, Name, Size};
use crate::deployment::{Deployment, DropSpec, KafkaChoice, Spec, StoreChoice};
use crate::LabError;

/// The note's sentence.
pub const CLAIM_KO: &str = "순서보장을 위해 쿠폰 발급 이벤트의 key를 모두 같게 만들면 하나의 파티션에 이벤트가 몰리게 될 것이고, 하나의 파티션에는 하나의 컨슈머만 연결되어있기 때문에 인스턴스 하나에만 트래픽이 순간적으로 몰리게 될 것이다 … key를 같게 두지 않고 여러 파티션에 이벤트를 분산시키는 트릭을 사용한다. 순서 보장이 완벽하게 되지는 않지만 soft하게는 지켜짐";
/// In English.
pub const CLAIM: &str = "one key for the whole drop puts every request on one partition and one instance; spreading keys shares the load, with order kept only softly";

/// Request partitions in every run.
pub const PARTITIONS: i32 = 8;

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Run {
    /// The partitioner.
    pub partitioner: Partitioner,
    /// Issuers in the group.
    pub issuers: usize,
    /// The drop's report.
    pub report: Report,
}

impl Run {
    /// Partitions that carried at least one decided request.
    pub fn partitions_used(&self) -> usize {
        self.report.shares.by_partition.len()
    }

    /// Issuers that decided at least one request.
    pub fn issuers_used(&self) -> usize {
        self.report.shares.by_issuer.len()
    }
}

/// Runs both partitioners over 1, 2 and 4 issuers (1 and 2 at small size).
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let (requests, counts): (u64, &[usize]) = match common.size {
        Size::Small => (600, &[1, 2]),
        Size::Full => (4000, &[1, 2, 4]),
    };
    let work = Duration::from_micros(500);
    let mut runs = Vec::new();
    for partitioner in [Partitioner::Event, Partitioner::Spread] {
        for &issuers in counts {
            let report = one(common, partitioner, issuers, requests, work, cancel.clone()).await?;
            runs.push(Run {
                partitioner,
                issuers,
                report,
            });
        }
    }
    let finding = finding(common, &runs, work);
    write(
        &common.out.join("hot-key.svg"),
        svg(&runs, requests, work).as_bytes(),
    )?;
    Ok(finding)
}

async fn one(
    common: &Common,
    partitioner: Partitioner,
    issuers: usize,
    requests: u64,
    work: Duration,
    cancel: CancellationToken,
) -> Result<Report, LabError> {
    let mut d = Deployment::start(Spec {
        partitioner,
        start_issuers: false,
        batch_size: 200,
        ..Spec::in_process(
            KafkaChoice::Embedded(1),
            StoreChoice::Memory,
            PARTITIONS,
            issuers,
        )
    })
    .await?;
    d.set_issuer_arms(Arms {
        work_per_record: work,
        ..Arms::default()
    });
    d.start_issuers()?;
    if !d.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let report = d
        .drop_through_api(
            DropSpec {
                plan: LoadPlan {
                    event_id: format!(
                        "exp-hot-key-{partitioner}-{issuers}-{}",
                        couponrush_core::wire::now_micros()
                    ),
                    model: LoadModel::Burst,
                    requests,
                    duration: Duration::from_secs(60),
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
                keep_raw: false,
                config: serde_json::json!({
                    "experiment": "hot-key",
                    "partitioner": partitioner,
                    "issuers": issuers,
                    "work_per_record_us": work.as_micros() as u64,
                }),
                live: common.page.clone(),
                holds: None,
                stock_buckets: 1,
            },
            cancel,
        )
        .await;
    d.stop().await;
    report
}

/// The table and verdict.
pub fn finding(common: &Common, runs: &[Run], work: Duration) -> Finding {
    let arms = runs
        .iter()
        .map(|r| {
            Arm::new(
                format!("{} × {} issuer(s)", r.partitioner, r.issuers),
                &[
                    ("decided/s", r.report.throughput.decided_per_s),
                    ("partitions", r.partitions_used() as f64),
                    ("issuers", r.issuers_used() as f64),
                    ("busiest", r.report.shares.busiest_issuer()),
                    ("inversion", r.report.skew.inversion_ratio),
                    ("failures", r.report.failures() as f64),
                ],
            )
        })
        .collect();
    let (structure, why) = direction(runs);
    let most = runs.iter().map(|r| r.issuers).max().unwrap_or(1);
    let rate = |p: Partitioner| {
        runs.iter()
            .find(|r| r.partitioner == p && r.issuers == most)
            .map_or(0.0, |r| r.report.throughput.decided_per_s)
    };
    let (event_rate, spread_rate) = (rate(Partitioner::Event), rate(Partitioner::Spread));
    let faster = spread_rate > event_rate;
    // A few hundred records take a fraction of a second to decide: at the
    // small size the rates are noise, so only the full size judges them.
    let judged = common.size == Size::Full;
    Finding {
        experiment: Name::HotKey,
        rule: 4,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms,
        matches: structure && (faster || !judged),
        verdict: format!(
            "{why}; with {most} issuers, event decides {event_rate:.0}/s and spread {spread_rate:.0}/s{}",
            if judged { "" } else { " (rates not judged at the small size)" }
        ),
        notes: vec![
            format!(
                "{PARTITIONS} partitions, {} µs of simulated work per record, a burst through the api; 'busiest' is the largest share of decisions one issuer made",
                work.as_micros()
            ),
            "peak consumer lag per partition is not measured here (the issuers' couponrush_issuer_consumer_lag gauge shows it on a live deployment)".into(),
        ],
        extra: serde_json::Value::Null,
    }
}

/// The direction the note claims, without timing: with `event` one
/// partition and one issuer decide everything, in arrival order (fewer
/// inversions than `spread`); with `spread` and more than one issuer, the
/// work is shared. True when so, and what was seen.
pub fn direction(runs: &[Run]) -> (bool, String) {
    let event: Vec<&Run> = runs
        .iter()
        .filter(|r| r.partitioner == Partitioner::Event)
        .collect();
    let spread: Vec<&Run> = runs
        .iter()
        .filter(|r| r.partitioner == Partitioner::Spread)
        .collect();
    let one_hot = event
        .iter()
        .all(|r| r.partitions_used() == 1 && r.issuers_used() == 1);
    let shared = spread
        .iter()
        .filter(|r| r.issuers > 1)
        .all(|r| r.issuers_used() == r.issuers && r.partitions_used() > 1);
    let max_inv = |rs: &[&Run]| {
        rs.iter()
            .map(|r| r.report.skew.inversion_ratio)
            .fold(0.0, f64::max)
    };
    let min_inv = |rs: &[&Run]| {
        rs.iter()
            .map(|r| r.report.skew.inversion_ratio)
            .fold(f64::INFINITY, f64::min)
    };
    let (event_inv, spread_inv) = (max_inv(&event), min_inv(&spread));
    let ordered = event_inv < spread_inv;
    let clean = runs.iter().all(|r| r.report.failures() == 0);
    (
        one_hot && shared && ordered && clean,
        format!(
            "event: {} on one partition and one issuer; spread: {} shared by every issuer; inversion ratio at most {event_inv:.4} (event) vs at least {spread_inv:.4} (spread)",
            if one_hot { "every run" } else { "NOT every run" },
            if shared { "every multi-issuer run" } else { "NOT every multi-issuer run" },
        ),
    )
}

/// Decided/s by issuer count, one line per partitioner.
fn svg(runs: &[Run], requests: u64, work: Duration) -> String {
    let (w, h, left, bottom, top) = (560.0, 340.0, 60.0, 40.0, 40.0);
    let max_rate = runs
        .iter()
        .map(|r| r.report.throughput.decided_per_s)
        .fold(1.0, f64::max)
        * 1.1;
    let max_issuers = runs.iter().map(|r| r.issuers).max().unwrap_or(1) as f64;
    let x = |n: usize| left + (n as f64 - 1.0) / (max_issuers - 1.0).max(1.0) * (w - left - 40.0);
    let y = |v: f64| h - bottom - v / max_rate * (h - bottom - top);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">decided/s by issuers: {requests} requests, {} µs work per record, {PARTITIONS} partitions</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        work.as_micros(),
        h - bottom,
        w - 30.0,
        h - bottom,
        h - bottom
    );
    for n in runs
        .iter()
        .map(|r| r.issuers)
        .collect::<std::collections::BTreeSet<_>>()
    {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>\n",
            x(n),
            h - bottom + 16.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">issuers</text>\n<text x=\"8\" y=\"{}\">{:.0}/s</text>\n",
        w / 2.0,
        h - 6.0,
        y(max_rate / 1.1) + 4.0,
        max_rate / 1.1
    ));
    for (p, color) in [
        (Partitioner::Event, "#d62728"),
        (Partitioner::Spread, "#1f77b4"),
    ] {
        let points: Vec<String> = runs
            .iter()
            .filter(|r| r.partitioner == p)
            .map(|r| {
                format!(
                    "{:.1},{:.1}",
                    x(r.issuers),
                    y(r.report.throughput.decided_per_s)
                )
            })
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        ));
        for r in runs.iter().filter(|r| r.partitioner == p) {
            s.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/>\n",
                x(r.issuers),
                y(r.report.throughput.decided_per_s)
            ));
        }
        let last = runs.iter().rfind(|r| r.partitioner == p);
        if let Some(r) = last {
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{p}</text>\n",
                x(r.issuers) - 40.0,
                y(r.report.throughput.decided_per_s) - 8.0
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}
