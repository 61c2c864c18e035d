//! Topic names and the settings each topic is created with.
//!
//! Retention is explicit, never the broker default: the requests topic keeps
//! records long enough to replay a drop after an issuer bug (and no longer than
//! the store keeps its dedup records, see `dedup_retention`); the outcomes topic
//! is the durable ledger the store can be rebuilt from, so it keeps decisions
//! at least as long; the DLQ keeps poison long enough for a human to look.
//! The events topic is compacted: it keeps the latest definition of every
//! event forever, and is the other half of what a lost store is rebuilt from.
//!
//! Replication is explicit too: on a cluster of three or more brokers every
//! topic gets [`REPLICATION`] replicas and `min.insync.replicas` =
//! [`MIN_INSYNC_REPLICAS`], so an `acks=all` acknowledgement means two copies
//! and one broker can be lost without losing an acknowledged record or
//! stopping writes ([`replication_for`] chooses, [`TopicSpec::min_insync_replicas`]
//! follows from the choice). A single local broker gets one replica.

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
/// Default name of the ledger checkpoints topic (compacted).
pub const CHECKPOINTS: &str = "coupon.checkpoints";
/// Default name of the hold actions topic (claim, cancel, expire).
pub const COMPENSATIONS: &str = "coupon.compensations";

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
    /// Where issuers write checkpoints of the ledger (compacted), so a
    /// rebuild reads a checkpoint and the outcomes after it, not the whole
    /// ledger (see [`crate::checkpoint`]).
    pub checkpoints: String,
    /// Where the api (claim, cancel) and the issuers' expiry sweep write
    /// actions on holds (key: the request id, so one hold's actions are in
    /// log order); the issuers consume it beside the requests.
    pub compensations: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            requests: REQUESTS.into(),
            outcomes: OUTCOMES.into(),
            dlq: DLQ.into(),
            events: EVENTS.into(),
            checkpoints: CHECKPOINTS.into(),
            compensations: COMPENSATIONS.into(),
        }
    }
}

impl Topics {
    /// The default names with `.{suffix}` appended: a deployment of its own
    /// on a shared broker.
    pub fn suffixed(suffix: &str) -> Self {
        let d = Self::default();
        Self {
            requests: format!("{}.{suffix}", d.requests),
            outcomes: format!("{}.{suffix}", d.outcomes),
            dlq: format!("{}.{suffix}", d.dlq),
            events: format!("{}.{suffix}", d.events),
            checkpoints: format!("{}.{suffix}", d.checkpoints),
            compensations: format!("{}.{suffix}", d.compensations),
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

impl TopicSpec {
    /// The `min.insync.replicas` the topic is created with:
    /// [`MIN_INSYNC_REPLICAS`] once it has that many replicas, so that an
    /// acknowledged record is on two of them; `None` (one replica, nothing
    /// to wait for) below.
    pub fn min_insync_replicas(&self) -> Option<i32> {
        (self.replication >= MIN_INSYNC_REPLICAS).then_some(MIN_INSYNC_REPLICAS)
    }
}

/// Replicas per partition on a real cluster.
pub const REPLICATION: i32 = 3;

/// Replicas that must have a record before the broker acknowledges it to an
/// `acks=all` producer, on a replicated topic.
pub const MIN_INSYNC_REPLICAS: i32 = 2;

/// The replication factor chosen for a cluster, and what the operator must
/// hear about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// Replicas per partition.
    pub factor: i32,
    /// Set when the choice is less durable than the cluster allows: say it
    /// loudly at start-up.
    pub warning: Option<String>,
}

/// Why topics cannot be created with the replication asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// A replication factor below 1.
    #[error("--replication-factor must be at least 1, got {0}")]
    Invalid(i32),
    /// More replicas than brokers.
    #[error(
        "cannot create topics with {requested} replicas on a cluster of {brokers} broker(s); \
         pass --replication-factor {brokers} or less"
    )]
    MoreThanBrokers {
        /// Replicas asked for.
        requested: i32,
        /// Brokers in the cluster.
        brokers: usize,
    },
    /// Two brokers: too few for the default, and no default is safe.
    #[error(
        "the cluster has {brokers} brokers: too few for {REPLICATION} replicas with \
         min.insync.replicas={MIN_INSYNC_REPLICAS}; pass --replication-factor 2 (both brokers \
         hold every record; writes stop while one is down) or --replication-factor 1 (no \
         copy: an acknowledged record is lost with its broker), or add a broker"
    )]
    TooFewBrokers {
        /// Brokers in the cluster.
        brokers: usize,
    },
}

/// The replication factor for topics created on a cluster of `brokers`
/// brokers (as its metadata lists them): `requested` if given, else
/// [`REPLICATION`] on three brokers or more and 1 on a single broker (a local
/// development broker). Two brokers have no safe default: the caller must
/// choose. Less than the cluster allows is accepted with a warning.
pub fn replication_for(
    brokers: usize,
    requested: Option<i32>,
) -> Result<Replication, ReplicationError> {
    let factor = match requested {
        Some(n) if n < 1 => return Err(ReplicationError::Invalid(n)),
        Some(n) if n as usize > brokers => {
            return Err(ReplicationError::MoreThanBrokers {
                requested: n,
                brokers,
            })
        }
        Some(n) => n,
        None if brokers >= REPLICATION as usize => REPLICATION,
        None if brokers == 1 => 1,
        None => return Err(ReplicationError::TooFewBrokers { brokers }),
    };
    let possible = brokers.min(REPLICATION as usize) as i32;
    let warning = (factor < possible).then(|| {
        format!(
            "topics get {factor} replica(s) on a cluster of {brokers} brokers: {}; \
             the default there is {REPLICATION} replicas with min.insync.replicas={MIN_INSYNC_REPLICAS}",
            if factor == 1 {
                "an acknowledged record is lost with its broker".to_string()
            } else {
                format!("writes stop while {} broker(s) are down", factor - 1)
            }
        )
    });
    Ok(Replication { factor, warning })
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
            TopicSpec {
                name: self.checkpoints.clone(),
                partitions: 1,
                replication,
                configs: vec![
                    ("cleanup.policy".into(), "compact".into()),
                    ("retention.ms".into(), "-1".into()),
                    // A checkpoint's parts are written in one go, and
                    // replaced (tombstoned) by the next: compact soon.
                    ("min.cleanable.dirty.ratio".into(), "0.1".into()),
                    ("delete.retention.ms".into(), "3600000".into()),
                ],
            },
            // Actions are redelivered until decided, like requests, and
            // are few (one per hold at most a couple).
            TopicSpec {
                name: self.compensations.clone(),
                partitions: outcome_partitions,
                replication,
                configs: REQUESTS_RETENTION.configs(),
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
        assert_eq!(specs.len(), 6);
        assert_eq!(specs[5].name, COMPENSATIONS);
        assert!(specs[5]
            .configs
            .contains(&("cleanup.policy".into(), "delete".into())));
        assert_eq!(specs[0].partitions, 8);
        for compacted in &specs[3..5] {
            assert_eq!(
                compacted.configs[0],
                ("cleanup.policy".into(), "compact".into()),
                "{}",
                compacted.name
            );
        }
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

    #[test]
    fn a_real_cluster_gets_three_replicas_two_in_sync_and_a_local_broker_one() {
        let on = |brokers, requested| replication_for(brokers, requested);
        assert_eq!(on(3, None).unwrap().factor, 3);
        assert_eq!(on(5, None).unwrap().factor, 3);
        assert_eq!(
            on(1, None).unwrap(),
            Replication {
                factor: 1,
                warning: None
            }
        );
        for spec in Topics::default().specs(8, 3) {
            assert_eq!(spec.min_insync_replicas(), Some(2), "{}", spec.name);
        }
        for spec in Topics::default().specs(8, 1) {
            assert_eq!(spec.min_insync_replicas(), None, "{}", spec.name);
        }
        // Less than the cluster allows: accepted, loudly.
        let less = on(3, Some(1)).unwrap();
        assert_eq!(less.factor, 1);
        assert!(less.warning.unwrap().contains("lost with its broker"));
        assert!(on(4, Some(2)).unwrap().warning.is_some());
        assert!(on(3, Some(3)).unwrap().warning.is_none());
        // Refused, saying what to pass.
        for (brokers, requested) in [(2, None), (1, Some(3)), (3, Some(0))] {
            let err = on(brokers, requested).unwrap_err().to_string();
            assert!(err.contains("--replication-factor"), "{err}");
        }
        assert!(
            on(2, Some(2)).unwrap().warning.is_none(),
            "all the cluster allows"
        );
    }
}
