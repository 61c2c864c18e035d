//! Does the broker support what a transactional issuer would need?
//! InitProducerId with a `transactional.id`, AddPartitionsToTxn (a send in a
//! transaction), AddOffsetsToTxn and TxnOffsetCommit (the consumer's offsets
//! in the transaction), EndTxn (commit and abort), and a `read_committed`
//! reader that sees the committed records and not the aborted ones.
//!
//! A probe, not a guarantee of this project (the issuer is not
//! transactional), so ignored by default:
//! `cargo test -p couponrush-issuer --test transactions_probe -- --ignored --nocapture`

use std::time::Duration;

use couponrush_harness::{MockKafka, Tansu, TansuStorage};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

const T: Duration = Duration::from_secs(15);

/// What each step answered.
fn probe(brokers: &str, topic: &str) -> Vec<(&'static str, Result<String, String>)> {
    let mut steps = Vec::new();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("transactional.id", format!("probe-{topic}"))
        .set("transaction.timeout.ms", "10000")
        .create()
        .expect("a transactional producer");
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", format!("probe-{topic}"))
        .create()
        .expect("a consumer");
    let ok = |r: Result<(), rdkafka::error::KafkaError>| {
        r.map(|()| "ok".to_string()).map_err(|e| e.to_string())
    };
    let init = ok(producer.init_transactions(T));
    let failed = init.is_err();
    steps.push(("InitProducerId (transactional.id)", init));
    if failed {
        return steps;
    }
    for (commit, value) in [(true, "committed"), (false, "aborted")] {
        steps.push(("begin", ok(producer.begin_transaction())));
        let sent = producer
            .send(BaseRecord::to(topic).key(value).payload(value).partition(0))
            .map_err(|(e, _)| e.to_string())
            .map(|()| "enqueued".to_string());
        steps.push(("send in a transaction (AddPartitionsToTxn)", sent));
        let mut offsets = TopicPartitionList::new();
        let _ = offsets.add_partition_offset(topic, 0, Offset::Offset(1));
        let metadata = group.group_metadata().expect("group metadata");
        steps.push((
            "send_offsets_to_transaction (AddOffsetsToTxn, TxnOffsetCommit)",
            ok(producer.send_offsets_to_transaction(&offsets, &metadata, T)),
        ));
        // A BaseProducer serves its delivery reports only when polled.
        let _ = producer.flush(T);
        if commit {
            steps.push(("EndTxn (commit)", ok(producer.commit_transaction(T))));
        } else {
            steps.push(("EndTxn (abort)", ok(producer.abort_transaction(T))));
        }
    }
    for isolation in ["read_committed", "read_uncommitted"] {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("broker.address.family", "v4")
            .set("group.id", format!("reader-{isolation}-{topic}"))
            .set("isolation.level", isolation)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("a reader");
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(topic, 0, Offset::Beginning);
        reader.assign(&tpl).expect("assign");
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(8);
        while std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = reader.poll(Timeout::After(Duration::from_millis(200))) {
                seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string());
            }
        }
        let name = if isolation == "read_committed" {
            "read_committed reader sees"
        } else {
            "read_uncommitted reader sees"
        };
        steps.push((name, Ok(format!("{seen:?}"))));
    }
    let committed = group
        .committed_offsets(
            {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, 0);
                tpl
            },
            T,
        )
        .map(|tpl| format!("{:?}", tpl.elements()[0].offset()))
        .map_err(|e| e.to_string());
    steps.push(("the group's offset after the transactions", committed));
    steps
}

fn show(broker: &str, steps: &[(&str, Result<String, String>)]) {
    for (step, result) in steps {
        match result {
            Ok(v) => eprintln!("{broker}: {step}: {v}"),
            Err(e) => eprintln!("{broker}: {step}: FAILED {e}"),
        }
    }
}

#[test]
#[ignore = "a probe of the broker, see the module doc"]
fn transactions_on_tansu() {
    let tansu = Tansu::start(TansuStorage::Memory, None).expect("tansu");
    let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(admin.create_topics(
        &[rdkafka::admin::NewTopic::new(
            "probe",
            1,
            rdkafka::admin::TopicReplication::Fixed(1),
        )],
        &rdkafka::admin::AdminOptions::new(),
    ))
    .unwrap();
    show("tansu 0.6", &probe(&tansu.brokers(), "probe"));
}

#[test]
#[ignore = "a probe of the broker, see the module doc"]
fn transactions_on_the_mock_cluster() {
    let mock = MockKafka::start(3).expect("mock cluster");
    mock.create_topic("probe", 1, 3).unwrap();
    show("mock cluster", &probe(&mock.brokers(), "probe"));
}
