//! Recovery reads whole topics back; it must see every acknowledged record,
//! including the ones acknowledged just before it started reading.

use std::time::Duration;

use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::recovery::read_topic;
use couponrush_core::topics::TopicSpec;
use couponrush_harness::{Tansu, TansuStorage, TANSU_HEADER_INDEX};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A producer whose batches close on `n` records (or a 5 s linger), so a
/// test lays out the producer batches it means however busy the machine.
fn batches_of(kafka: &KafkaSettings, n: usize) -> FutureProducer {
    kafka
        .producer_config("t", 100_000)
        .set("linger.ms", "5000")
        .set("batch.num.messages", n.to_string())
        .create()
        .unwrap()
}

/// A fresh tansu with one topic of `partitions` partitions.
async fn broker_with(topic: &str, partitions: i32) -> (Tansu, KafkaSettings) {
    let tansu =
        Tansu::start(TansuStorage::Memory, None).expect("tansu: run scripts/dev-up --install-only");
    let kafka = KafkaSettings::new(tansu.brokers());
    ensure_topics(
        &kafka,
        &[TopicSpec {
            name: topic.into(),
            partitions,
            replication: 1,
            configs: vec![],
        }],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    (tansu, kafka)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_topic_sees_every_acknowledged_record() {
    let topic = "read-back";
    let (_tansu, kafka) = broker_with(topic, 8).await;
    let producer: FutureProducer = kafka.producer_config("t", 100_000).create().unwrap();
    for round in 0..5u32 {
        let payloads: Vec<String> = (0..400u32).map(|i| format!("{round}-{i}")).collect();
        let futures: Vec<_> = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| {
                producer
                    .send_result(
                        FutureRecord::<(), str>::to(topic)
                            .payload(payload.as_str())
                            .partition((i % 8) as i32),
                    )
                    .map_err(|(e, _)| e)
                    .expect("queued")
            })
            .collect();
        for f in futures {
            f.await.unwrap().unwrap();
        }
        let expected = u64::from(400 * (round + 1));
        let (k, t) = (kafka.clone(), topic.to_string());
        let seen = tokio::task::spawn_blocking(move || read_topic(&k, &t, |_| {}))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            seen, expected,
            "round {round}: every acknowledged record is read back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_topic_after_a_stream_of_pipelined_batches_sees_them_all() {
    let topic = "read-back-stream";
    let (_tansu, kafka) = broker_with(topic, 8).await;
    let producer: FutureProducer = kafka.producer_config("t", 100_000).create().unwrap();
    let mut pending = Vec::new();
    let mut sent = 0u64;
    for batch in 0..40u32 {
        for i in 0..500u32 {
            let payload = format!("{batch}-{i}");
            let key = format!("k{batch}-{i}");
            pending.push(
                producer
                    .send_result(
                        FutureRecord::to(topic)
                            .key(key.as_str())
                            .payload(payload.as_str()),
                    )
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for f in pending {
        f.await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (k, t) = (kafka.clone(), topic.to_string());
    let read = tokio::task::spawn_blocking(move || read_topic(&k, &t, |_| {}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, sent);
}

/// A fresh tansu whose one-partition `topic` holds `batches` producer
/// batches of 20 records (offsets 0..20, 20..40, ...).
async fn batches_of_20(topic: &str, batches: usize) -> (Tansu, KafkaSettings) {
    let (tansu, kafka) = broker_with(topic, 1).await;
    let producer = batches_of(&kafka, 20);
    for round in 0..batches {
        let payloads: Vec<String> = (0..20).map(|i| format!("{round}-{i}")).collect();
        let fs: Vec<_> = payloads
            .iter()
            .map(|p| {
                producer
                    .send_result(
                        FutureRecord::<(), str>::to(topic)
                            .payload(p.as_str())
                            .partition(0),
                    )
                    .map_err(|(e, _)| e)
                    .expect("queued")
            })
            .collect();
        for f in fs {
            f.await.unwrap().unwrap();
        }
    }
    (tansu, kafka)
}

/// The offsets a consumer assigned at `offset` of `topic` reads until it has
/// `enough` of them or `within` passes.
async fn read_from(
    kafka: &KafkaSettings,
    topic: &str,
    offset: i64,
    enough: usize,
    within: Duration,
) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let (k, topic) = (kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = k
            .client_config("t")
            .set("group.id", format!("read-{topic}"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(offset))
            .unwrap();
        c.assign(&tpl).unwrap();
        let start = std::time::Instant::now();
        let mut read = Vec::new();
        while read.len() < enough && start.elapsed() < within {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                read.push(m.offset());
            }
        }
        read
    })
    .await
    .unwrap()
}

/// Pins a fault of the pinned broker that the issuer works around
/// (`issuer/src/broker_quirk.rs`): tansu 0.6.0, asked to fetch from an
/// offset in the middle of a producer batch, answers with the *next* batch,
/// passing over the rest of that one. If this test fails, tansu fixed it: good news, and
/// the rewind becomes dead weight on tansu too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_resuming_mid_batch_skips_to_the_next_batch() {
    let (_tansu, kafka) = batches_of_20("mid-batch", 2).await;
    let read = read_from(&kafka, "mid-batch", 10, 1, Duration::from_secs(60)).await;
    assert_eq!(read, vec![20], "offsets 10..20 are passed over");
}

/// The same fault's other face: asked to fetch from the middle of the
/// partition's *last* batch, tansu 0.6.0 has no next batch to skip to and
/// answers with nothing, until another batch is written (at the end of a
/// drop: never). The notifier (`TailWatch`) and the issuer (`ResumeGuard`'s
/// rewind of a silent partition) work around it (docs/RELIABILITY.md, broker
/// quirk 2). If this test fails, tansu fixed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_resuming_mid_way_into_the_last_batch_returns_nothing() {
    let (_tansu, kafka) = batches_of_20("mid-last-batch", 1).await;
    let read = read_from(&kafka, "mid-last-batch", 10, 1, Duration::from_secs(4)).await;
    assert_eq!(read, Vec::<i64>::new(), "offsets 10..20 are never returned");
}

/// What the issuer's rewind relies on: a consumer idle at the end of the
/// log, sought back to an offset inside the log, reads on from there (from
/// the next batch's start when the offset is mid-batch, the quirk above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_a_consumer_sought_back_reads_on_from_there() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let (_tansu, kafka) = batches_of_20("seek-back", 5).await;
    let firsts = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = kafka
            .client_config("t")
            .set("group.id", "seek-back")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("seek-back", 0, Offset::Offset(100))
            .unwrap();
        c.assign(&tpl).unwrap();
        let mut firsts = Vec::new();
        for target in [40, 50] {
            // Idle at the end of the log first, as a silent partition is.
            let idle = std::time::Instant::now();
            while idle.elapsed() < Duration::from_secs(2) {
                let _ = c.poll(Duration::from_millis(100));
            }
            // Applied once the partition's fetch has started.
            let asked = std::time::Instant::now();
            let seek = || {
                c.seek(
                    "seek-back",
                    0,
                    Offset::Offset(target),
                    Duration::from_secs(2),
                )
            };
            let mut sought = seek();
            while sought.is_err() && asked.elapsed() < Duration::from_secs(10) {
                let _ = c.poll(Duration::from_millis(100));
                sought = seek();
            }
            let start = std::time::Instant::now();
            let mut first = None;
            while first.is_none() && start.elapsed() < Duration::from_secs(10) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    first = Some(m.offset());
                }
            }
            firsts.push((target, sought.is_ok(), first));
            // Back to the end for the next round.
            while let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
                if m.offset() == 99 {
                    break;
                }
            }
        }
        firsts
    })
    .await
    .unwrap();
    assert_eq!(
        firsts,
        vec![(40, true, Some(40)), (50, true, Some(60))],
        "(target, seek applied, first record read)"
    );
}

/// tansu 0.6.0's `header_fetch.sql` (tansu-storage, `src/sql`), the query
/// its sqlite engine runs for the headers of each record it fetches.
const TANSU_HEADER_FETCH: &str = "select h.k, h.v from header h \
     join record r on h.topition = r.topition and h.offset_id = r.offset_id \
     join topition tp on tp.id = r.topition join topic t on tp.topic = t.id \
     join cluster c on t.cluster = c.id \
     where c.name = ?1 and t.name = ?2 and tp.partition = ?3 and r.offset_id = ?4";

/// How sqlite runs that query on tansu's file: one line per step.
fn header_fetch_plan(db: &std::path::Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut plan = c
        .prepare(&format!("EXPLAIN QUERY PLAN {TANSU_HEADER_FETCH}"))
        .unwrap();
    let steps: Vec<String> = plan
        .query_map(("tansu_cluster", "headers", 0, 0), |row| row.get(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    steps.join("; ")
}

/// Pins the sqlite quirk the harness works around (docs/RELIABILITY.md,
/// broker quirk 6): tansu 0.6.0's `header` table has no index, so each
/// record fetched scans every header ever written (outcomes carry one:
/// reading them was quadratic, and `broker-kill` at full size stalled).
/// The harness indexes the table on every start of a sqlite tansu; the
/// records and their headers still read back, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_sqlite_looks_up_headers_through_the_harness_index() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let dir = std::env::temp_dir().join(format!("couponrush-headers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = dir.join("tansu.db");
    let mut tansu = Tansu::start(TansuStorage::Sqlite(db.clone()), None)
        .expect("tansu: run scripts/dev-up --install-only");
    let kafka = KafkaSettings::new(tansu.brokers());
    ensure_topics(
        &kafka,
        &[TopicSpec {
            name: "headers".into(),
            partitions: 1,
            replication: 1,
            configs: vec![],
        }],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // Not idempotent: tansu 0.6.0's sqlite engine can wedge on an
    // idempotent producer (the chaos suite's `broker-kill` does the same).
    let producer: FutureProducer = kafka
        .producer_config("t", 100_000)
        .set("enable.idempotence", "false")
        .create()
        .unwrap();
    let sends: Vec<_> = (0..30)
        .map(|i| {
            let value = format!("issuer-{i}");
            producer.send(
                FutureRecord::<(), str>::to("headers").payload("x").headers(
                    OwnedHeaders::new().insert(Header {
                        key: "x-issuer",
                        value: Some(&value),
                    }),
                ),
                Duration::from_secs(10),
            )
        })
        .collect();
    for s in sends {
        s.await.map_err(|(e, _)| e).unwrap();
    }
    let read_headers = |kafka: KafkaSettings| {
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = kafka
                .client_config("t")
                .set("group.id", "headers")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset("headers", 0, Offset::Beginning)
                .unwrap();
            c.assign(&tpl).unwrap();
            let start = std::time::Instant::now();
            let mut values = Vec::new();
            while values.len() < 30 && start.elapsed() < Duration::from_secs(30) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                    let h = m.headers().and_then(|h| h.iter().next());
                    values.push(h.and_then(|h| h.value).map(|v| v.to_vec()));
                }
            }
            values
        })
    };
    let expected: Vec<_> = (0..30)
        .map(|i| Some(format!("issuer-{i}").into_bytes()))
        .collect();
    assert_eq!(read_headers(kafka.clone()).await.unwrap(), expected);
    let plan = header_fetch_plan(&db);
    assert!(
        plan.contains(TANSU_HEADER_INDEX) && !plan.contains("SCAN h"),
        "the header lookup uses the harness's index: {plan}"
    );
    // Planted: without the index, the lookup scans the table whole.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch(&format!("DROP INDEX {TANSU_HEADER_INDEX}"))
        .unwrap();
    let plan = header_fetch_plan(&db);
    assert!(plan.contains("SCAN h"), "tansu's own schema scans: {plan}");
    // A restart on the same file indexes it again; everything reads back.
    tansu.restart().unwrap();
    let plan = header_fetch_plan(&db);
    assert!(
        plan.contains(TANSU_HEADER_INDEX),
        "indexed again on restart: {plan}"
    );
    assert_eq!(read_headers(kafka).await.unwrap(), expected);
    drop(tansu);
    let _ = std::fs::remove_dir_all(&dir);
}
