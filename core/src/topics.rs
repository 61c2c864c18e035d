//! Topic names and the settings each topic is created with.
//!
//! Retention is explicit, never the broker default: the requests topic keeps
//! records long enough to replay a drop after an issuer bug (and no longer than
//! the store keeps its dedup records, see `dedup_retention`); the outcomes topic
//! is the durable ledger the store can be rebuilt from, so it keeps decisions
//! at least as long; the DLQ keeps poison long enough for a human to look.
//! The events topic is compacted: it keeps the latest definition of every
//! event forever, and is the other half of what a lost store is rebuilt from.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default name of the requests topic.
pub const REQUESTS: &str = "coupon.requests";
/// Default name of the outcomes topic.
pub const OUTCOMES: &str = "coupon.outcomes";
/// Default name of the dead-letter topic.
pub const DLQ: &str = "coupon.requests.dlq";
/// Default name of the event definitions topic (compacted: latest per event).
pub const EVENTS: &str = "coupon.events";

/// The topic names one deployment uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topics {
    /// Where the api writes requests.
    pub requests: String,
    /// Where issuers write decisions.
    pub outcomes: String,
    /// Where issuers write records they cannot decide.
    pub dlq: String,
    /// Where the api writes event definitions (stock, limit, generation), so
    /// a lost store can be rebuilt together with the outcomes.
    pub events: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            requests: REQUESTS.into(),
            outcomes: OUTCOMES.into(),
            dlq: DLQ.into(),
            events: EVENTS.into(),
        }
    }
}

/// How a topic is created when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Replicas per partition (3 on a real cluster, 1 on a dev broker).
    pub replication: i32,
    /// Topic-level configs (`retention.ms`, `retention.bytes`, ...).
    pub configs: Vec<(String, String)>,
}

/// Retention of each topic, by time and by size per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Delete records older than this.
    pub time: Duration,
    /// Delete the oldest segments of a partition beyond this many bytes
    /// (`None` = unbounded by size).
    pub bytes_per_partition: Option<u64>,
}

impl Retention {
    fn configs(&self) -> Vec<(String, String)> {
        let bytes = self
            .bytes_per_partition
            .map(|b| b.to_string())
            .unwrap_or_else(|| "-1".into());
        vec![
            ("retention.ms".into(), self.time.as_millis().to_string()),
            ("retention.bytes".into(), bytes),
            ("cleanup.policy".into(), "delete".into()),
        ]
    }
}

/// Default retention of the requests topic: 7 days or 1 GiB per partition.
pub const REQUESTS_RETENTION: Retention = Retention {
    time: Duration::from_secs(7 * 24 * 3600),
    bytes_per_partition: Some(1 << 30),
};

/// Default retention of the outcomes ledger: 30 days, unbounded by size, so
/// the store can always be rebuilt from it.
pub const OUTCOMES_RETENTION: Retention = Retention {
    time: Duration::from_secs(30 * 24 * 3600),
    bytes_per_partition: None,
};

/// Default retention of the DLQ: 14 days or 256 MiB per partition.
pub const DLQ_RETENTION: Retention = Retention {
    time: Duration::from_secs(14 * 24 * 3600),
    bytes_per_partition: Some(256 << 20),
};

impl Topics {
    /// The specs to create all three topics: `request_partitions` for the
    /// requests topic (the knob the sweep turns), fewer for the others.
    pub fn specs(&self, request_partitions: i32, replication: i32) -> Vec<TopicSpec> {
        let outcome_partitions = request_partitions.clamp(1, 16);
        vec![
            TopicSpec {
                name: self.requests.clone(),
                partitions: request_partitions,
                replication,
                configs: REQUESTS_RETENTION.configs(),
            },
            TopicSpec {
                name: self.outcomes.clone(),
                partitions: outcome_partitions,
                replication,
                configs: OUTCOMES_RETENTION.configs(),
            },
            TopicSpec {
                name: self.dlq.clone(),
                partitions: 1,
                replication,
                configs: DLQ_RETENTION.configs(),
            },
            TopicSpec {
                name: self.events.clone(),
                partitions: 1,
                replication,
                configs: vec![
                    ("cleanup.policy".into(), "compact".into()),
                    ("retention.ms".into(), "-1".into()),
                ],
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_gets_explicit_retention() {
        let specs = Topics::default().specs(8, 3);
        assert_eq!(specs.len(), 4);
        assert_eq!(specs[0].partitions, 8);
        assert_eq!(
            specs[3].configs[0],
            ("cleanup.policy".into(), "compact".into())
        );
        for spec in &specs[..3] {
            assert_eq!(spec.replication, 3);
            let keys: Vec<&str> = spec.configs.iter().map(|(k, _)| k.as_str()).collect();
            assert!(keys.contains(&"retention.ms"), "{}", spec.name);
            assert!(keys.contains(&"retention.bytes"), "{}", spec.name);
        }
        assert_eq!(
            specs[1].configs[1].1, "-1",
            "the ledger is never cut by size"
        );
    }
}
