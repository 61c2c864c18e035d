//! Helpers shared by the notifier's integration tests: a ledger of mixed
//! outcomes written to a real broker (librdkafka's mock cluster), and
//! waiting with a deadline.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use couponrush_core::kafka::ensure_topics;
use couponrush_core::kafka::{all_acknowledged, KafkaSettings};
use couponrush_core::topics::TopicSpec;
use couponrush_core::wire::{HoldOutcome, HoldState, HOLD_KIND, WIRE_VERSION};
use couponrush_core::{DecisionResult, Outcome};
use couponrush_harness::{MockKafka, Tansu, TansuStorage};
use couponrush_notifier::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

/// Partitions of the test ledger.
pub const PARTITIONS: i32 = 3;

/// A private deployment of the ledger: a mock cluster, a ledger topic, a
/// dead-letter topic and a group of their own.
pub struct Setup {
    pub mock: Option<MockKafka>,
    pub tansu: Option<Tansu>,
    pub brokers: String,
    pub outcomes: String,
    pub dlq: String,
    pub group: String,
    pub event: String,
}

impl Setup {
    /// On a mock cluster of one broker.
    pub fn new() -> Self {
        let mock = MockKafka::start(1).expect("the mock cluster starts");
        let brokers = mock.brokers();
        let setup = Self::named(brokers, Some(mock), None);
        for (topic, partitions) in [(&setup.outcomes, PARTITIONS), (&setup.dlq, 1)] {
            let mock = setup.mock.as_ref().expect("a mock cluster");
            mock.create_topic(topic, partitions, 1).unwrap();
        }
        setup
    }

    /// On a private tansu broker (in memory), its log in `log`.
    pub async fn on_tansu(log: &std::path::Path) -> Self {
        let tansu = Tansu::start(TansuStorage::Memory, Some(log.to_path_buf()))
            .expect("tansu: run scripts/dev-up --install-only");
        let brokers = tansu.brokers();
        let setup = Self::named(brokers, None, Some(tansu));
        let specs: Vec<TopicSpec> = [(&setup.outcomes, PARTITIONS), (&setup.dlq, 1)]
            .into_iter()
            .map(|(name, partitions)| TopicSpec {
                name: name.clone(),
                partitions,
                replication: 1,
                configs: Vec::new(),
            })
            .collect();
        ensure_topics(&setup.kafka(), &specs, Duration::from_secs(10))
            .await
            .expect("topics on tansu");
        setup
    }

    fn named(brokers: String, mock: Option<MockKafka>, tansu: Option<Tansu>) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        Self {
            mock,
            tansu,
            brokers,
            outcomes: format!("coupon.outcomes.{id}"),
            dlq: format!("coupon.notifier.dlq.{id}"),
            group: format!("notifier-{id}"),
            event: format!("drop-{}", &id[..8]),
        }
    }

    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings::new(&self.brokers)
    }

    /// A notifier's settings for this setup, with short pauses.
    pub fn config(&self, webhook: &str) -> Config {
        let mut c = Config::local(&self.brokers, webhook);
        c.outcomes_topic = self.outcomes.clone();
        c.dlq_topic = self.dlq.clone();
        c.group_id = self.group.clone();
        c.retry.base = Duration::from_millis(20);
        c.retry.max = Duration::from_millis(200);
        c.retry.max_attempts = 1000;
        c.commit_every = Duration::from_millis(200);
        c.session_timeout = Duration::from_secs(6);
        c
    }

    /// Writes `ledger` to the ledger topic and waits for every ack.
    pub async fn produce(&self, ledger: &Ledger) {
        let producer: FutureProducer = self
            .kafka()
            .producer_config("ledger-writer", 100_000)
            .create()
            .unwrap();
        let mut pending = Vec::new();
        for (key, payload) in &ledger.records {
            let record = FutureRecord::to(&self.outcomes)
                .key(key.as_bytes())
                .payload(payload.as_slice());
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        all_acknowledged(pending)
            .await
            .expect("the ledger is written");
    }

    /// Writes `prefix` sold-out decisions to the head of every partition,
    /// then `ledger` (each request to partition `i % PARTITIONS`), lingering
    /// so that each partition gets one producer batch; then commits
    /// `prefix` for the group, as a notifier that handled the prefix would
    /// have: the committed offset sits in the middle of the partition's
    /// only batch.
    pub async fn produce_one_batch_and_commit(&self, ledger: &Ledger, prefix: usize) {
        let producer: FutureProducer = self
            .kafka()
            .producer_config_with("ledger-writer", 100_000, |cfg| {
                cfg.set("linger.ms", "500");
            })
            .create()
            .unwrap();
        let mut records = Vec::new();
        for p in 0..PARTITIONS {
            for n in 0..prefix {
                let i = 1_000_000 + n * PARTITIONS as usize + p as usize;
                let o = decision(&self.event, i, DecisionResult::SoldOut, false, false);
                records.push((p, o.request_id.to_string(), o.to_bytes()));
            }
        }
        for (key, payload) in &ledger.records {
            let i = Uuid::parse_str(key).unwrap().as_u128() - 1;
            records.push((
                (i % PARTITIONS as u128) as i32,
                key.clone(),
                payload.clone(),
            ));
        }
        let mut pending = Vec::new();
        for (p, key, payload) in &records {
            let record = FutureRecord::to(&self.outcomes)
                .key(key.as_bytes())
                .payload(payload.as_slice())
                .partition(*p);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        all_acknowledged(pending)
            .await
            .expect("the ledger is written");
        let (kafka, group, topic) = (self.kafka(), self.group.clone(), self.outcomes.clone());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = kafka
                .client_config("committer")
                .set("group.id", &group)
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(&topic, p, Offset::Offset(prefix as i64))
                    .unwrap();
            }
            c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
                .expect("the prefix is committed");
        })
        .await
        .unwrap();
    }

    /// Per partition, how far the group's committed offset is short of the
    /// ledger's end.
    pub async fn behind(&self) -> Vec<i64> {
        let (kafka, group, topic) = (self.kafka(), self.group.clone(), self.outcomes.clone());
        tokio::task::spawn_blocking(move || behind(&kafka, &group, &topic))
            .await
            .unwrap()
    }
}

fn behind(kafka: &KafkaSettings, group: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = kafka
        .client_config("watcher")
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(5))
        .unwrap_or_default();
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .unwrap_or((0, i64::MAX));
            let at = committed
                .find_partition(topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0);
            high - at
        })
        .collect()
}

/// A ledger of mixed outcomes and what a notifier must make of it.
pub struct Ledger {
    /// (key, bytes) in ledger order.
    pub records: Vec<(String, Vec<u8>)>,
    /// The final coupons: key → `issued` or `claimed`.
    pub expected: HashMap<String, &'static str>,
    /// Keys of requests whose coupon is not final (never to be delivered).
    pub never: HashSet<String>,
    /// Records that are replays of a final coupon.
    pub replays: usize,
    /// Records that need no delivery.
    pub skipped: usize,
}

impl Ledger {
    /// Records that deliver a final coupon (replays included).
    pub fn final_records(&self) -> usize {
        self.records.len() - self.skipped
    }
}

fn decision(event: &str, i: usize, result: DecisionResult, hold: bool, replay: bool) -> Outcome {
    Outcome {
        v: WIRE_VERSION,
        request_id: Uuid::from_u128(i as u128 + 1),
        event_id: event.to_string(),
        user_id: format!("user-{i}"),
        result,
        issued_rank: (result == DecisionResult::Issued).then_some(i as u32 + 1),
        partition: 0,
        offset: i as i64,
        decided_at: 1_700_000_000_000_000 + i as u64,
        replay,
        decision_seq: i as u64 + 1,
        accepted_at: 1_700_000_000_000_000,
        generation: 1,
        hold_until: hold.then_some(1_800_000_000_000_000),
    }
}

fn hold(event: &str, i: usize, state: HoldState, replay: bool) -> HoldOutcome {
    HoldOutcome {
        v: WIRE_VERSION,
        kind: HOLD_KIND.into(),
        request_id: Uuid::from_u128(i as u128 + 1),
        event_id: event.to_string(),
        user_id: format!("user-{i}"),
        state,
        issued_rank: i as u32 + 1,
        partition: 0,
        offset: i as i64,
        action_at: 1_700_000_000_100_000,
        decided_at: 1_700_000_000_200_000 + i as u64,
        replay,
        decision_seq: 1_000_000 + i as u64,
        generation: 1,
    }
}

/// `n` requests of `event`, one of eight kinds each: issued without a hold
/// (two kinds, every third replayed), held then claimed (every third claim
/// replayed), held then released, held then expired, still held, sold out,
/// limit reached.
pub fn ledger(event: &str, n: usize) -> Ledger {
    let mut l = Ledger {
        records: Vec::new(),
        expected: HashMap::new(),
        never: HashSet::new(),
        replays: 0,
        skipped: 0,
    };
    for i in 0..n {
        let key = format!("{event}:1:{}", Uuid::from_u128(i as u128 + 1));
        let rk = Uuid::from_u128(i as u128 + 1).to_string();
        let mut push = |bytes: Vec<u8>| l.records.push((rk.clone(), bytes));
        match i % 8 {
            0 | 1 => {
                push(decision(event, i, DecisionResult::Issued, false, false).to_bytes());
                l.expected.insert(key, "issued");
                if i % 3 == 0 {
                    push(decision(event, i, DecisionResult::Issued, false, true).to_bytes());
                    l.replays += 1;
                }
            }
            2 => {
                push(decision(event, i, DecisionResult::Issued, true, false).to_bytes());
                push(hold(event, i, HoldState::Claimed, false).to_bytes());
                l.skipped += 1;
                l.expected.insert(key, "claimed");
                if i % 3 == 0 {
                    push(hold(event, i, HoldState::Claimed, true).to_bytes());
                    l.replays += 1;
                }
            }
            3 | 4 => {
                let end = if i % 8 == 3 {
                    HoldState::Released
                } else {
                    HoldState::Expired
                };
                push(decision(event, i, DecisionResult::Issued, true, false).to_bytes());
                push(hold(event, i, end, false).to_bytes());
                l.skipped += 2;
                l.never.insert(key);
            }
            5 => {
                push(decision(event, i, DecisionResult::Issued, true, false).to_bytes());
                l.skipped += 1;
                l.never.insert(key);
            }
            6 => {
                push(decision(event, i, DecisionResult::SoldOut, false, false).to_bytes());
                l.skipped += 1;
                l.never.insert(key);
            }
            _ => {
                push(decision(event, i, DecisionResult::LimitReached, false, false).to_bytes());
                l.skipped += 1;
                l.never.insert(key);
            }
        }
    }
    l
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; true if it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
