//! Experiment 5, `payload`: zero payload (a record carries ids and
//! timestamps; the consumer looks the state up) against full payload (the
//! record also carries a snapshot of the entity as the producer saw it). The
//! same drop is produced straight to the requests topic, once as couponrush
//! writes it (about 150 bytes) and once with a snapshot of the event
//! attached: remaining stock, stock, per-user limit, when it was read, and
//! padding to [`PAD_BYTES`] (a product page's worth of detail). The issuers
//! ignore the snapshot (unknown fields), so both arms decide alike.
//!
//! Measured: bytes per record, accepted/s (all records acknowledged by the
//! broker), end-to-end p99 (send to decision seen), and for the full arm how
//! many snapshots were already stale when their request was decided: the
//! stock they showed differed from the stock at the moment of the decision.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use couponrush_core::kafka::all_acknowledged;
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::definition::create_event;
use couponrush_core::store::EventSpec;
use couponrush_core::wire::now_micros;
use couponrush_core::{DecisionResult, IssueRequest, Partitioner};
use couponrush_loadgen::measure::audit::{audit, Audit, EventTerms};
use couponrush_loadgen::observe::Observer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Arm, Common, Finding, Name, Size};
use crate::deployment::{Deployment, KafkaChoice, Spec, StoreChoice};
use crate::LabError;

/// The note's sentences.
pub const CLAIM_KO: &str = "보통 zero payload를 많이 사용함 → 업데이트되었다는 메세지를 전달받는 사이에 또 업데이트가 일어날수도 있기 때문에 - 더해서, 대용량 트래픽 환경에서는 메세지 하나의 크기가 전체 시스템 성능에 영향을 끼칠수도 있음 - zero payload에서는 ID를 통해 추가적인 조회를 수행해야함";
/// In English.
pub const CLAIM: &str = "zero payload is the usual choice: the entity may change again while the message is on its way, and under heavy traffic the size of each message weighs on the whole system; the price is a lookup by id";

/// Padding of the full payload's snapshot, bytes.
pub const PAD_BYTES: usize = 2048;

const PARTITIONS: i32 = 8;

/// One arm's figures.
#[derive(Debug, Clone)]
pub struct Measured {
    /// `zero` or `full`.
    pub payload: &'static str,
    /// Mean record value size, bytes.
    pub bytes_per_record: f64,
    /// Records acknowledged per second while producing.
    pub accepted_per_s: f64,
    /// Send to first decision seen, p99, ms.
    pub e2e_p99_ms: f64,
    /// Snapshots whose stock differed from the stock when decided (full only).
    pub stale: u64,
    /// Snapshots carried (0 for zero payload).
    pub snapshots: u64,
    /// The audit.
    pub audit: Audit,
}

/// Runs both arms.
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let requests: u64 = match common.size {
        Size::Small => 1000,
        Size::Full => 10_000,
    };
    let zero = one(common, requests, false, cancel.clone()).await?;
    let full = one(common, requests, true, cancel).await?;
    Ok(finding(common, &zero, &full))
}

async fn one(
    common: &Common,
    requests: u64,
    full: bool,
    cancel: CancellationToken,
) -> Result<Measured, LabError> {
    let d = Deployment::start(Spec {
        with_api: false,
        ..Spec::in_process(KafkaChoice::Embedded(1), StoreChoice::Memory, PARTITIONS, 2)
    })
    .await?;
    if !d.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let (kafka, topics) = (d.kafka.clone(), d.topics.clone());
    let event = format!("exp-payload-{}", now_micros());
    let terms = EventTerms {
        stock: (requests / 2) as u32,
        per_user_limit: 1,
    };
    let definer = RequestProducer::new(
        &kafka,
        topics.requests.clone(),
        Partitioner::Spread,
        PARTITIONS,
        1000,
    )?;
    create_event(
        d.store.as_ref(),
        &definer,
        &topics.events,
        &event,
        EventSpec {
            stock: terms.stock,
            per_user_limit: terms.per_user_limit,
            claim_window_us: 0,
            stock_buckets: 1,
        },
    )
    .await?;
    drop(definer);
    let observer = {
        let (k, t, e) = (kafka.clone(), topics.clone(), event.clone());
        tokio::task::spawn_blocking(move || Observer::start(&k, &t, &e)).await??
    };
    // What a full-payload producer attaches: the event as it last read it,
    // refreshed every 20 ms (a cache, as a busy producer would keep).
    let remaining = Arc::new(AtomicU32::new(terms.stock));
    let refresher = {
        let (store, event, remaining, stop) = (
            d.store.clone(),
            event.clone(),
            remaining.clone(),
            cancel.child_token(),
        );
        let guard = stop.clone().drop_guard();
        let task = tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(Some(state)) = store.event(&event).await {
                    remaining.store(state.remaining, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        (task, guard)
    };
    let producer: FutureProducer = kafka
        .producer_config("coupon-lab-payload", 100_000)
        .create()?;
    let pad = "x".repeat(PAD_BYTES);
    let mut accepted: HashMap<Uuid, String> = HashMap::new();
    let mut sent_at: HashMap<Uuid, u64> = HashMap::new();
    let mut shown: HashMap<Uuid, u32> = HashMap::new();
    let mut bytes = 0u64;
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..requests {
        if cancel.is_cancelled() {
            return Err(LabError::Cancelled);
        }
        let user = format!("u{}-{i}", common.seed);
        let req = IssueRequest::new(Uuid::now_v7(), event.clone(), user.clone(), now_micros());
        let mut value = serde_json::to_value(&req).expect("a request serializes");
        if full {
            let r = remaining.load(Ordering::Relaxed);
            shown.insert(req.request_id, r);
            value["snapshot"] = serde_json::json!({
                "remaining": r,
                "stock": terms.stock,
                "per_user_limit": terms.per_user_limit,
                "read_at": now_micros(),
                "detail": pad,
            });
        }
        let payload = serde_json::to_vec(&value).expect("json serializes");
        bytes += payload.len() as u64;
        let key = req.request_id.to_string();
        let partition = (i % PARTITIONS as u64) as i32;
        pending.push(
            producer
                .send_result(
                    FutureRecord::to(&topics.requests)
                        .key(key.as_bytes())
                        .payload(payload.as_slice())
                        .partition(partition),
                )
                .map_err(|(e, _)| e)?,
        );
        accepted.insert(req.request_id, user);
        sent_at.insert(req.request_id, req.accepted_at);
        // Bounded in flight: wait for a window of acks before going on.
        if pending.len() >= 500 {
            all_acknowledged(std::mem::take(&mut pending)).await?;
        }
    }
    all_acknowledged(pending).await?;
    let produce_s = started.elapsed().as_secs_f64().max(1e-6);
    let ids: HashSet<Uuid> = accepted.keys().copied().collect();
    observer.wait_for(&ids, Duration::from_secs(60)).await;
    drop(refresher);
    let seen = tokio::task::spawn_blocking(move || observer.finish()).await?;
    let ledger = d.store.ledger(&event).await?;
    drop(producer);
    d.stop().await;

    // First decision per request, and the stock left just before it.
    let mut first: HashMap<Uuid, (u64, u64)> = HashMap::new(); // id -> (seq, observed_at)
    let mut issued_seqs: Vec<u64> = Vec::new();
    for o in &seen.outcomes {
        if first.contains_key(&o.outcome.request_id) {
            continue;
        }
        first.insert(
            o.outcome.request_id,
            (o.outcome.decision_seq, o.observed_at),
        );
        if o.outcome.result == DecisionResult::Issued {
            issued_seqs.push(o.outcome.decision_seq);
        }
    }
    issued_seqs.sort_unstable();
    let mut e2e: Vec<u64> = Vec::new();
    let mut stale = 0u64;
    for (id, (seq, observed_at)) in &first {
        if let Some(sent) = sent_at.get(id) {
            e2e.push(observed_at.saturating_sub(*sent));
        }
        if let Some(shown) = shown.get(id) {
            let issued_before = issued_seqs.partition_point(|s| s < seq) as u32;
            if *shown != terms.stock.saturating_sub(issued_before) {
                stale += 1;
            }
        }
    }
    e2e.sort_unstable();
    let p99 = e2e
        .get(((e2e.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0);
    let outcomes: Vec<_> = seen.outcomes.into_iter().map(|o| o.outcome).collect();
    Ok(Measured {
        payload: if full { "full" } else { "zero" },
        bytes_per_record: bytes as f64 / requests.max(1) as f64,
        accepted_per_s: requests as f64 / produce_s,
        e2e_p99_ms: p99 as f64 / 1000.0,
        stale,
        snapshots: shown.len() as u64,
        audit: audit(terms, &accepted, &outcomes, ledger.as_ref()),
    })
}

/// The table and verdict: zero first.
pub fn finding(common: &Common, zero: &Measured, full: &Measured) -> Finding {
    let row = |m: &Measured| {
        Arm::new(
            format!("{} payload", m.payload),
            &[
                ("bytes/record", m.bytes_per_record),
                ("accepted/s", m.accepted_per_s),
                ("e2e p99 ms", m.e2e_p99_ms),
                ("snapshots", m.snapshots as f64),
                ("stale", m.stale as f64),
                ("lost", m.audit.lost as f64),
                ("failures", m.audit.failures() as f64),
            ],
        )
    };
    let clean = zero.audit.failures() == 0 && full.audit.failures() == 0;
    let matches = clean
        && full.stale > 0
        && zero.snapshots == 0
        && full.bytes_per_record > 4.0 * zero.bytes_per_record;
    Finding {
        experiment: Name::Payload,
        rule: 5,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms: vec![row(zero), row(full)],
        matches,
        verdict: format!(
            "{} of {} snapshots were stale when their request was decided; records {:.0} vs {:.0} bytes; accepted {:.0}/s vs {:.0}/s, end-to-end p99 {:.0} vs {:.0} ms (zero vs full)",
            full.stale,
            full.snapshots,
            zero.bytes_per_record,
            full.bytes_per_record,
            zero.accepted_per_s,
            full.accepted_per_s,
            zero.e2e_p99_ms,
            full.e2e_p99_ms
        ),
        notes: vec![
            format!("produced straight to the requests topic (8 partitions, 500 records in flight at most) on the mock cluster, 2 in-process issuers, stock half the requests; the snapshot is the event as last read (refreshed every 20 ms) padded with {PAD_BYTES} bytes of detail; the issuers ignore it"),
            "a snapshot is stale when the stock it shows differs from the stock left just before its request was decided".into(),
        ],
        extra: serde_json::Value::Null,
    }
}
