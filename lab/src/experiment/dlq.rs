//! Experiment 8, `dlq-redrive`, and the `coupon-lab dlq redrive` command: a
//! DLQ keeps what could not be processed, so it can be processed again once
//! the cause is fixed.
//!
//! The experiment sends requests for an event that does not exist yet
//! (straight to the requests topic, as the api would: the api itself refuses
//! an unknown event): the issuers dead-letter them (`unknown_event`). Then
//! the event is created, and the DLQ is redriven: each dead letter whose
//! reason matches is produced again, with its key, to the partition it came
//! from. Arm A redrives (twice: the second finds nothing new); arm B leaves
//! the DLQ alone, as a pipeline without a redrive would.
//!
//! [`redrive`] is idempotent twice over: it reads the DLQ in its own consumer
//! group and commits what it redrove, so a second run starts after it; and a
//! request redriven twice anyway is a replay in the store (one decision).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use couponrush_core::cli::{KafkaArgs, TopicArgs};
use couponrush_core::kafka::{all_acknowledged, KafkaSettings};
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::definition::create_event;
use couponrush_core::store::EventSpec;
use couponrush_core::wire::{dlq_headers, now_micros};
use couponrush_core::{IssueRequest, Partitioner};
use couponrush_loadgen::measure::audit::{audit, Audit, EventTerms};
use couponrush_loadgen::observe::Observer;
use couponrush_loadgen::Verdict;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Arm, Common, Finding, Name, Size};
use crate::deployment::{Deployment, KafkaChoice, Spec, StoreChoice};
use crate::LabError;

/// The note's sentence.
pub const CLAIM_KO: &str = "오류 메세지를 유실시키지 않고 따로 모아두면, 이후 모니터링이 쉬워지고 오류가 해결된 후 재처리가 가능해짐";
/// In English.
pub const CLAIM: &str =
    "kept in a DLQ instead of lost, failed messages can be processed again once the error is fixed";

/// `coupon-lab dlq`.
#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    /// What to do with the DLQ.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// `coupon-lab dlq …`.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// Put dead letters back on the topic they came from (idempotent).
    Redrive(RedriveArgs),
}

/// `coupon-lab dlq redrive`.
#[derive(Debug, Clone, Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub topics: TopicArgs,
    /// Only dead letters with this reason (x-dlq-reason, e.g. unknown_event);
    /// the others are passed over (and not redriven by a later run either).
    #[arg(long, env = "REDRIVE_REASON")]
    pub reason: Option<String>,
    /// The redriver's consumer group: what it redrove is committed there, so
    /// a second run redrives nothing twice.
    #[arg(long, env = "REDRIVE_GROUP", default_value = "coupon-redrive")]
    pub group: String,
    /// Most dead letters redriven in one run.
    #[arg(long, env = "REDRIVE_MAX", default_value_t = 100_000)]
    pub max: usize,
}

/// What one redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Redriven {
    /// Dead letters read (new since the last run).
    pub read: usize,
    /// Produced again to their original topic.
    pub redriven: usize,
    /// Passed over: another reason, or no original topic.
    pub passed_over: usize,
}

/// `coupon-lab dlq redrive`.
pub async fn dlq(args: DlqArgs) -> Result<Verdict, LabError> {
    match args.command {
        DlqCommand::Redrive(a) => {
            let r = redrive(
                &a.kafka.settings(),
                &a.topics.topics().dlq,
                &a.group,
                a.reason.as_deref(),
                a.max,
            )
            .await?;
            println!(
                "redrive: {} dead letters read, {} redriven, {} passed over",
                r.read, r.redriven, r.passed_over
            );
            Ok(Verdict::Pass)
        }
    }
}

struct Letter {
    topic: String,
    partition: Option<i32>,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// Redrives the dead letters of `dlq` not yet redriven by `group` (those
/// with `reason`, if given): each is produced, with its key and bytes, to its
/// original topic and partition; once every one is acknowledged, the group
/// commits past them. At most `max` per run.
pub async fn redrive(
    kafka: &KafkaSettings,
    dlq: &str,
    group: &str,
    reason: Option<&str>,
    max: usize,
) -> Result<Redriven, LabError> {
    let (kafka2, dlq2, group2, reason2) = (
        kafka.clone(),
        dlq.to_string(),
        group.to_string(),
        reason.map(str::to_string),
    );
    let (consumer, letters, positions, mut counts) = tokio::task::spawn_blocking(move || {
        read_new(&kafka2, &dlq2, &group2, reason2.as_deref(), max)
    })
    .await??;
    let producer: FutureProducer = kafka.producer_config("coupon-redrive", 100_000).create()?;
    let mut pending = Vec::with_capacity(letters.len());
    for l in &letters {
        let mut record = FutureRecord::to(&l.topic).payload(l.payload.as_slice());
        if let Some(k) = &l.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = l.partition {
            record = record.partition(p);
        }
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    all_acknowledged(pending).await?;
    counts.redriven = letters.len();
    if positions.count() > 0 {
        tokio::task::spawn_blocking(move || consumer.commit(&positions, CommitMode::Sync))
            .await??;
    }
    Ok(counts)
}

type ReadNew = (BaseConsumer, Vec<Letter>, TopicPartitionList, Redriven);

/// Reads the DLQ from the group's committed offsets up to the ends it had
/// when the read started (bounded), keeping the letters to redrive.
fn read_new(
    kafka: &KafkaSettings,
    dlq: &str,
    group: &str,
    reason: Option<&str>,
    max: usize,
) -> Result<ReadNew, KafkaError> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = kafka
        .client_config("coupon-redrive")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let md = consumer.fetch_metadata(Some(dlq), timeout)?;
    let mut all = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            all.add_partition(dlq, p.id());
        }
    }
    let committed = consumer.committed_offsets(all, timeout)?;
    let mut start = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut positions = TopicPartitionList::new();
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(dlq, e.partition(), timeout)?;
        let from = match e.offset() {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        if from < high {
            start.add_partition_offset(dlq, e.partition(), Offset::Offset(from))?;
            ends.insert(e.partition(), high);
        }
    }
    let mut letters = Vec::new();
    let mut counts = Redriven::default();
    if start.count() == 0 {
        return Ok((consumer, letters, positions, counts));
    }
    consumer.assign(&start)?;
    let mut next: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts.read < max
        && Instant::now() < deadline
        && ends
            .iter()
            .any(|(p, end)| next.get(p).copied().unwrap_or(0) < *end)
    {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        if ends
            .get(&m.partition())
            .is_none_or(|end| m.offset() >= *end)
        {
            continue;
        }
        next.insert(m.partition(), m.offset() + 1);
        counts.read += 1;
        let header = |key: &str| {
            m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == key)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let topic = header(dlq_headers::ORIGINAL_TOPIC);
        let wanted = reason.is_none_or(|r| header(dlq_headers::REASON).as_deref() == Some(r));
        match topic {
            Some(topic) if wanted => letters.push(Letter {
                topic,
                partition: header(dlq_headers::ORIGINAL_PARTITION).and_then(|p| p.parse().ok()),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
            }),
            _ => counts.passed_over += 1,
        }
    }
    for (p, o) in next {
        positions.add_partition_offset(dlq, p, Offset::Offset(o))?;
    }
    Ok((consumer, letters, positions, counts))
}

/// One arm's result.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The audit of every request sent, after the arm's steps.
    pub audit: Audit,
    /// Dead letters in the DLQ before the event was created.
    pub dead_letters: u64,
    /// The first redrive (None in the arm without one).
    pub first: Option<Redriven>,
    /// The second redrive.
    pub second: Option<Redriven>,
}

/// Runs both arms.
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let requests = match common.size {
        Size::Small => 200,
        Size::Full => 2000,
    };
    let with = one(common, requests, true, cancel.clone()).await?;
    let without = one(common, requests, false, cancel).await?;
    Ok(finding(common, &with, &without))
}

async fn one(
    common: &Common,
    requests: u64,
    redrive_it: bool,
    cancel: CancellationToken,
) -> Result<Measured, LabError> {
    let d = Deployment::start(Spec {
        with_api: false,
        ..Spec::in_process(KafkaChoice::Embedded(1), StoreChoice::Memory, 4, 2)
    })
    .await?;
    if !d.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let event = format!("exp-dlq-{}-{}", common.seed, now_micros());
    let (kafka, topics) = (d.kafka.clone(), d.topics.clone());
    let observer = {
        let (k, t, e) = (kafka.clone(), topics.clone(), event.clone());
        tokio::task::spawn_blocking(move || Observer::start(&k, &t, &e)).await??
    };
    let producer = Arc::new(RequestProducer::new(
        &kafka,
        topics.requests.clone(),
        Partitioner::Spread,
        4,
        100_000,
    )?);
    // Requests for an event nobody created yet: the issuers dead-letter them.
    let mut accepted: HashMap<Uuid, String> = HashMap::new();
    for i in 0..requests {
        let user = format!("u{}-{i}", common.seed);
        let req = IssueRequest::new(Uuid::now_v7(), event.clone(), user.clone(), now_micros());
        producer
            .send(&req)
            .await
            .map_err(|e| LabError::Experiment(format!("cannot produce a request: {e}")))?;
        accepted.insert(req.request_id, user);
    }
    let dead_letters = wait_dead_letters(&kafka, &topics.dlq, requests, &cancel).await?;
    // The fix: the event now exists.
    let terms = EventTerms {
        stock: requests as u32,
        per_user_limit: 1,
    };
    create_event(
        d.store.as_ref(),
        &producer,
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
    let group = format!("coupon-redrive-{}", now_micros());
    let (mut first, mut second) = (None, None);
    if redrive_it {
        first = Some(redrive(&kafka, &topics.dlq, &group, Some("unknown_event"), 100_000).await?);
        let ids = accepted.keys().copied().collect();
        observer.wait_for(&ids, Duration::from_secs(60)).await;
        second = Some(redrive(&kafka, &topics.dlq, &group, Some("unknown_event"), 100_000).await?);
    }
    // What a redrive would have brought has had time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = tokio::task::spawn_blocking(move || observer.finish()).await?;
    let outcomes: Vec<_> = seen.outcomes.into_iter().map(|o| o.outcome).collect();
    let ledger = d.store.ledger(&event).await?;
    // Our clients go before the cluster they talk to.
    drop(producer);
    d.stop().await;
    Ok(Measured {
        audit: audit(terms, &accepted, &outcomes, ledger.as_ref()),
        dead_letters,
        first,
        second,
    })
}

/// Waits until the DLQ holds at least `n` records.
async fn wait_dead_letters(
    kafka: &KafkaSettings,
    dlq: &str,
    n: u64,
    cancel: &CancellationToken,
) -> Result<u64, LabError> {
    let consumer: BaseConsumer = kafka.client_config("coupon-lab-dlq-count").create()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let md = consumer.fetch_metadata(Some(dlq), Duration::from_secs(10))?;
        let mut total = 0u64;
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) =
                    consumer.fetch_watermarks(dlq, p.id(), Duration::from_secs(10))?;
                total += (high - low).max(0) as u64;
            }
        }
        if total >= n {
            return Ok(total);
        }
        if cancel.is_cancelled() {
            return Err(LabError::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(LabError::Experiment(format!(
                "only {total} of {n} requests reached the DLQ within 60 s: are the issuers running?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The table and verdict.
pub fn finding(common: &Common, with: &Measured, without: &Measured) -> Finding {
    let row = |name: &str, m: &Measured| {
        Arm::new(
            name,
            &[
                ("accepted", m.audit.accepted as f64),
                ("dead", m.dead_letters as f64),
                ("redriven", m.first.map_or(f64::NAN, |r| r.redriven as f64)),
                ("2nd run", m.second.map_or(f64::NAN, |r| r.redriven as f64)),
                ("decided", m.audit.decided as f64),
                ("issued", m.audit.issued as f64),
                ("lost", m.audit.lost as f64),
                ("double", m.audit.double_issued as f64),
            ],
        )
    };
    let matches = with.audit.lost == 0
        && with.audit.failures() == 0
        && with.second.is_some_and(|r| r.redriven == 0)
        && without.audit.lost > 0;
    Finding {
        experiment: Name::DlqRedrive,
        rule: 8,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms: vec![
            row("DLQ, event created, redriven twice", with),
            row("DLQ, event created, never redriven", without),
        ],
        matches,
        verdict: format!(
            "lost {} after the redrive ({} decided, each once; the second redrive found {} new), {} without it",
            with.audit.lost,
            with.audit.decided,
            with.second.map_or(0, |r| r.redriven),
            without.audit.lost
        ),
        notes: vec![
            "requests produced straight to the requests topic before the event existed (the api refuses an unknown event); the issuers dead-letter them as unknown_event".into(),
            "the redrive commits what it redrove in its own consumer group; a request redriven twice anyway would be a replay in the store".into(),
        ],
        extra: serde_json::Value::Null,
    }
}
