//! Experiment 9, `retention`: the broker deletes records once they are
//! older than the topic's retention, whether or not anyone consumed them.
//! Two topics on a private tansu broker (sqlite storage, whose maintenance
//! applies `retention.ms` to topics with `cleanup.policy=delete`; run every
//! second here instead of tansu's default 10 minutes), one with a retention
//! of 2 s and one of 7 days. The same records are produced to both; nobody
//! reads them. After the short retention has passed, a new consumer group
//! reads both topics from the beginning and counts what it finds.
//!
//! The librdkafka mock cluster the other experiments use keeps every record
//! (it implements no retention), so this one needs the local broker: tansu
//! from `scripts/dev-up` (or `TANSU_BIN`).

use std::process::Command;
use std::time::{Duration, Instant};

use couponrush_core::kafka::{all_acknowledged, KafkaSettings};
use couponrush_harness::{free_port, tansu_binary, wait_for_port, Proc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{arm_dir, Arm, Common, Finding, Name, Size};
use crate::LabError;

/// The note's sentences.
pub const CLAIM_KO: &str = "카프카 브로커는 메세지를 한 번 저장하면 컨슈머가 메세지를 소비했는지 여부와 관계없이 일정 기간동안 메세지를 보관한다 … 공간 문제 때문에 메세지를 무한정 보관할수는 없으므로 시간 기반(발행된 지 얼마나 됐는지)이나 크기 기반(토픽의 파티션 크기)으로 삭제를 수행한다";
/// In English.
pub const CLAIM: &str = "the broker keeps a record for a set period whether or not it was consumed, and deletes it after that period (or beyond a size), consumed or not";

/// The short retention.
pub const SHORT: Duration = Duration::from_secs(2);
/// The long retention (Kafka's default, 7 days).
pub const LONG: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the late group found on one topic.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// The topic's retention.
    pub retention: Duration,
    /// Records produced (and acknowledged).
    pub produced: u64,
    /// Records a first new group found right after they were produced.
    pub found_at_once: u64,
    /// Records a new group found reading from the beginning.
    pub found: u64,
    /// The partition's low watermark then (the first offset still kept).
    pub low: i64,
}

/// Runs the experiment.
pub async fn run(common: &Common, cancel: CancellationToken) -> Result<Finding, LabError> {
    let n: u64 = match common.size {
        Size::Small => 200,
        Size::Full => 2000,
    };
    let dir = arm_dir(common, Name::Retention, "tansu");
    std::fs::create_dir_all(&dir).map_err(|source| LabError::Write {
        path: dir.clone(),
        source,
    })?;
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let bin = tansu_binary().map_err(|e| {
        LabError::Experiment(format!(
            "the retention experiment needs the local broker, tansu ({e}): run scripts/dev-up once, or set TANSU_BIN"
        ))
    })?;
    let mut cmd = Command::new(bin);
    // tansu opens the sqlite file relative to its working directory.
    cmd.current_dir(&dir)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args([
            "--storage-engine",
            "sqlite://tansu.db?maintenance_interval=1s",
        ]);
    let _tansu = Proc::spawn("tansu", cmd, Some(&dir.join("tansu.log")))
        .map_err(|e| LabError::Experiment(format!("cannot start tansu: {e}")))?;
    tokio::task::spawn_blocking(move || wait_for_port(port, Duration::from_secs(20)))
        .await?
        .map_err(|e| LabError::Experiment(format!("tansu did not start: {e}")))?;
    let kafka = KafkaSettings::new(format!("127.0.0.1:{port}"));

    let run = Uuid::new_v4().simple().to_string();
    let topics = [
        (format!("exp.retention.short.{run}"), SHORT),
        (format!("exp.retention.long.{run}"), LONG),
    ];
    create_topics(&kafka, &topics).await?;
    let producer: FutureProducer = kafka
        .producer_config("coupon-lab-retention", 100_000)
        .create()?;
    for (topic, _) in &topics {
        let mut pending = Vec::with_capacity(n as usize);
        for i in 0..n {
            let payload = format!("record {i}");
            pending.push(
                producer
                    .send_result(FutureRecord::<(), _>::to(topic).payload(payload.as_bytes()))
                    .map_err(|(e, _)| e)?,
            );
        }
        all_acknowledged(pending).await?;
    }
    drop(producer);
    // Readable at first: a group reads both topics at once (within the short
    // retention, before any maintenance could delete).
    let mut at_once = Vec::new();
    for (topic, _) in &topics {
        let (k, t) = (kafka.clone(), topic.clone());
        at_once.push(
            tokio::task::spawn_blocking(move || late_group(&k, &t, n))
                .await??
                .0,
        );
    }
    // Past the short retention, then a few maintenance runs.
    let wait = SHORT + Duration::from_secs(4);
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = cancel.cancelled() => return Err(LabError::Cancelled),
    }
    let mut measured = Vec::new();
    for ((topic, retention), found_at_once) in topics.into_iter().zip(at_once) {
        let (k, t) = (kafka.clone(), topic.clone());
        let (found, low) = tokio::task::spawn_blocking(move || late_group(&k, &t, n)).await??;
        measured.push(Measured {
            retention,
            produced: n,
            found_at_once,
            found,
            low,
        });
    }
    Ok(finding(common, &measured))
}

async fn create_topics(
    kafka: &KafkaSettings,
    topics: &[(String, Duration)],
) -> Result<(), LabError> {
    let admin: AdminClient<DefaultClientContext> =
        kafka.client_config("coupon-lab-retention").create()?;
    let retention: Vec<String> = topics
        .iter()
        .map(|(_, r)| r.as_millis().to_string())
        .collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&retention)
        .map(|((name, _), ms)| {
            NewTopic::new(name, 1, TopicReplication::Fixed(1))
                .set("retention.ms", ms)
                .set("cleanup.policy", "delete")
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics(&new, &opts).await? {
        r.map_err(|(topic, code)| {
            LabError::Experiment(format!("the broker refused to create {topic}: {code}"))
        })?;
    }
    Ok(())
}

/// A consumer group that never read `topic` reads it from the beginning:
/// the records it finds (at most `n`, for at most 10 s, stopping after 2 s
/// without one) and the low watermark.
fn late_group(
    kafka: &KafkaSettings,
    topic: &str,
    n: u64,
) -> Result<(u64, i64), rdkafka::error::KafkaError> {
    let consumer: BaseConsumer = kafka
        .client_config("coupon-lab-late-group")
        .set("group.id", format!("late-{}", Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let (low, _) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let (mut found, deadline) = (0u64, Instant::now() + Duration::from_secs(10));
    let mut last = Instant::now();
    while found < n && Instant::now() < deadline && last.elapsed() < Duration::from_secs(2) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            found += 1;
            last = Instant::now();
        }
    }
    Ok((found, low))
}

/// The table and verdict: the short retention first.
pub fn finding(common: &Common, measured: &[Measured]) -> Finding {
    let arms = measured
        .iter()
        .map(|m| {
            Arm::new(
                format!("retention.ms {}", m.retention.as_millis()),
                &[
                    ("produced", m.produced as f64),
                    ("found at once", m.found_at_once as f64),
                    ("late group found", m.found as f64),
                    ("low watermark", m.low as f64),
                ],
            )
        })
        .collect();
    let (short, long) = (&measured[0], &measured[1]);
    let matches = short.found_at_once == short.produced
        && short.found < short.produced
        && long.found == long.produced;
    Finding {
        experiment: Name::Retention,
        rule: 9,
        claim_ko: CLAIM_KO,
        claim: CLAIM,
        seed: common.seed,
        size: common.size,
        arms,
        matches,
        verdict: format!(
            "no group committed anything on either topic; {} s after producing, a new group found {} of {} records under a {} s retention (all {} were there at first) and {} of {} under 7 days",
            (SHORT + Duration::from_secs(4)).as_secs(),
            short.found,
            short.produced,
            SHORT.as_secs(),
            short.found_at_once,
            long.found,
            long.produced
        ),
        notes: vec![
            "tansu 0.6 with sqlite storage, maintenance every second (a storage URL parameter, default 10 minutes); librdkafka's mock cluster implements no retention; tansu keeps reporting low watermark 0 after deleting".into(),
            "the rule couponrush keeps because of this: a request is deduplicated only while its dedup record lives (--dedup-retention, 7 days by default), so the requests topic's retention must not be longer, or a late redelivery would be decided again".into(),
        ],
        extra: serde_json::Value::Null,
    }
}
