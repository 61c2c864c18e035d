//! An issuer SIGKILLed and restarted at once (as a supervisor would) must
//! not stall its group: every record of the requests topic is handled and
//! committed. `coupon-issuer` processes, against a private tansu (whose
//! group coordinator, 0.6, keeps a dead member's partitions assigned: see
//! `issuer/src/broker_quirk.rs`) with dynamic members, and against the mock
//! cluster with static ones (`--instance-id`): a group of static members
//! never settles on tansu 0.6 (nothing at all was committed in 90 s).
//!
//! The records name an event the store does not know, so each goes to the
//! DLQ: this is about group membership, not about deciding.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::{IssueRequest, Topics};
use couponrush_harness::{MockKafka, Proc, RedisServer, Tansu, TansuStorage};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

const PARTITIONS: i32 = 8;

/// Each test starts a broker, a store and three issuers: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn issuer(n: &str, brokers: &str, redis: &str, group: &str, extra: &[&str], dir: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coupon-issuer"));
    cmd.env_clear()
        .env("RUST_LOG", couponrush_harness::child_log())
        .args(["--brokers", brokers, "--redis", redis, "--group-id", group])
        .args(["--client-id", &format!("{group}-{n}")])
        .args(["--session-timeout", "6s", "--publish-timeout", "3s"])
        .args(["--recovery-fence", "5s", "--batch-size", "200"])
        .args(extra);
    let log = dir.join(format!("issuer-{n}.log"));
    Proc::spawn(&format!("issuer-{n}"), cmd, Some(&log)).expect("coupon-issuer starts")
}

/// Per partition, how far the group has committed short of the end.
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

/// Two issuers; records produced for 4 s; the first issuer SIGKILLed 1.5 s
/// in and restarted half a second later with the same flags. Returns how
/// long after the last record the group had committed everything.
/// Which broker the group lives on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Tansu,
    Mock,
}

async fn kill_and_restart_at_once(on: On, extra: [&[&str]; 2], name: &str) -> Duration {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let topics = Topics::default();
    let (_tansu, _mock, brokers) = match on {
        On::Tansu => {
            let tansu = Tansu::start(TansuStorage::Memory, Some(dir.join("tansu.log")))
                .expect("tansu: run scripts/dev-up --install-only");
            let brokers = tansu.brokers();
            ensure_topics(
                &KafkaSettings::new(&brokers),
                &topics.specs(PARTITIONS, 1),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            (Some(tansu), None, brokers)
        }
        On::Mock => {
            let mock = MockKafka::start(3).expect("the mock cluster");
            for t in topics.specs(PARTITIONS, 3) {
                mock.create_topic(&t.name, t.partitions, t.replication)
                    .unwrap();
            }
            let brokers = mock.brokers();
            (None, Some(mock), brokers)
        }
    };
    let kafka = KafkaSettings::new(&brokers);
    let redis = RedisServer::start(&dir.join("redis"), false).expect("redis-server");
    let group = format!("restart-{}", Uuid::new_v4().simple());
    let url = redis.url();
    let mut first = issuer("a", &brokers, &url, &group, extra[0], &dir);
    let _second = issuer("b", &brokers, &url, &group, extra[1], &dir);
    tokio::time::sleep(Duration::from_secs(6)).await;

    let producer: FutureProducer = kafka.producer_config("t", 10_000).create().unwrap();
    let started = Instant::now();
    let mut restarted = None;
    for i in 0..4000u32 {
        let request = IssueRequest::new(Uuid::now_v7(), "nobody".into(), format!("u{i}"), 1);
        producer
            .send(
                FutureRecord::<(), [u8]>::to(&topics.requests)
                    .payload(&request.to_bytes())
                    .partition(i as i32 % PARTITIONS),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if restarted.is_none() && started.elapsed() > Duration::from_millis(1500) {
            first.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            restarted = Some(issuer("a", &brokers, &url, &group, extra[0], &dir));
        }
    }
    let produced = Instant::now();
    let deadline = produced + Duration::from_secs(90);
    loop {
        let (k, g, t) = (kafka.clone(), group.clone(), topics.requests.clone());
        let left = tokio::task::spawn_blocking(move || behind(&k, &g, &t))
            .await
            .unwrap();
        if left.iter().all(|l| *l <= 0) {
            return produced.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: 90 s after the last record the group is still behind by {left:?} \
             records per partition (logs in {})",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarted_at_once_takes_its_predecessors_place_on_the_mock_cluster() {
    let took = kill_and_restart_at_once(
        On::Mock,
        [
            &["--instance-id", "issuer-a"],
            &["--instance-id", "issuer-b"],
        ],
        "restart-static-mock",
    )
    .await;
    eprintln!(
        "static membership, mock cluster: everything committed {took:?} after the last record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_member_restarted_at_once_does_not_stall_the_group_on_tansu() {
    let took = kill_and_restart_at_once(On::Tansu, [&[], &[]], "restart-dynamic").await;
    eprintln!("dynamic membership, tansu: everything committed {took:?} after the last record");
}
