//! The topics the api creates: replicated three ways with two in sync on a
//! real cluster, one replica on a single local broker, both without flags;
//! a cluster too small for what is asked is refused at start-up, saying what
//! to pass.

use std::sync::Arc;
use std::time::Duration;

use couponrush_api::{topic_specs, Api, Config};
use couponrush_core::store::memory::MemoryStore;
use couponrush_harness::{MockKafka, Tansu, TansuStorage};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

#[tokio::test]
async fn on_three_brokers_topics_get_three_replicas_without_flags() {
    let mock = MockKafka::start(3).unwrap();
    let config = Config::local(&mock.brokers());
    let specs = topic_specs(&config, 4).await.unwrap();
    assert_eq!(
        specs.len(),
        6,
        "requests, outcomes, DLQ, events, checkpoints, compensations"
    );
    for spec in &specs {
        assert_eq!(
            spec.replication, 3,
            "{} would be created with replication {} on a cluster of 3 brokers",
            spec.name, spec.replication
        );
        assert_eq!(spec.min_insync_replicas(), Some(2), "{}", spec.name);
    }
    // Asked for less: done, with a warning.
    let mut less = config.clone();
    less.replication_factor = Some(1);
    for spec in topic_specs(&less, 4).await.unwrap() {
        assert_eq!((spec.replication, spec.min_insync_replicas()), (1, None));
    }
}

#[tokio::test]
async fn on_one_broker_topics_get_one_replica_and_too_small_a_cluster_is_refused() {
    let one = MockKafka::start(1).unwrap();
    for spec in topic_specs(&Config::local(&one.brokers()), 4)
        .await
        .unwrap()
    {
        assert_eq!((spec.replication, spec.min_insync_replicas()), (1, None));
    }
    let mut three = Config::local(&one.brokers());
    three.replication_factor = Some(3);
    let two = MockKafka::start(2).unwrap();
    for config in [three, Config::local(&two.brokers())] {
        let err = topic_specs(&config, 4).await.unwrap_err().to_string();
        assert!(err.contains("pass --replication-factor"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_local_broker_gets_its_topics_without_flags() {
    let tansu = Tansu::start(TansuStorage::Memory, None)
        .expect("tansu must be installed: run scripts/dev-up --install-only");
    let mut config = Config::local(&tansu.brokers());
    config.topic_partitions = Some(2);
    let topics = config.topics.clone();
    Api::bind(config, Arc::new(MemoryStore::default()), None)
        .await
        .expect("the api starts on one broker and creates its topics");
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .create()
        .unwrap();
    for topic in [
        &topics.requests,
        &topics.outcomes,
        &topics.dlq,
        &topics.events,
        &topics.compensations,
    ] {
        let md = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let t = &md.topics()[0];
        assert!(t.error().is_none() && !t.partitions().is_empty(), "{topic}");
        for p in t.partitions() {
            assert_eq!(p.replicas().len(), 1, "{topic}/{}", p.id());
        }
    }
}
