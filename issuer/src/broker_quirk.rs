//! A broker quirk, worked around here so the loop reads as the loop:
//! **tansu 0.6 can resume a fetch past the committed offset.** When a fetch
//! starts in the middle of a producer batch, tansu 0.6.0 returns the *next*
//! batch, silently skipping the records between the committed offset and
//! that batch's start (`core/tests/read_log.rs` shows it). Apache Kafka never
//! does this; against it this module only ever admits records.
//!
//! The guarantee kept: no record at or beyond a newly assigned partition's
//! committed offset is passed over. The first record read from such a
//! partition must sit at the committed offset; records below it were
//! decided and committed already (skipped); a first record *beyond* it means
//! the broker skipped, and the partition is rewound further and further back
//! until the committed offset comes back (records read again below it are
//! skipped as above).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::offsets::Tp;

/// First rewind when a broker resumes past the committed offset; doubled
/// on each further skip.
const REWIND: i64 = 1000;

/// Where a newly assigned partition must resume.
#[derive(Debug, Clone, Copy)]
struct Resume {
    /// The committed offset: the first record expected.
    expect: i64,
    /// How far back the last rewind went (0: none yet).
    rewind: i64,
}

/// Per newly assigned partition, the offset its first record must have.
#[derive(Debug, Default)]
pub struct ResumeGuard {
    resume: Mutex<HashMap<Tp, Resume>>,
}

impl ResumeGuard {
    fn resume(&self) -> MutexGuard<'_, HashMap<Tp, Resume>> {
        self.resume.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On assignment: remembers where each partition of `assigned` must
    /// resume (its committed offset, asked of the group coordinator).
    pub fn on_assign<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        assigned: &TopicPartitionList,
    ) {
        let Ok(committed) = consumer.committed_offsets(assigned.clone(), Duration::from_secs(5))
        else {
            return;
        };
        for e in committed.elements() {
            if let Offset::Offset(o) = e.offset() {
                self.expect((e.topic().to_string(), e.partition()), o);
            }
        }
    }

    /// The first record read from `tp` must be at `offset`.
    fn expect(&self, tp: Tp, offset: i64) {
        self.resume().insert(
            tp,
            Resume {
                expect: offset,
                rewind: 0,
            },
        );
    }

    /// On revoke: forgets `revoked`.
    pub fn on_revoke(&self, revoked: &HashSet<Tp>) {
        let mut resume = self.resume();
        for tp in revoked {
            resume.remove(tp);
        }
    }

    /// Whether a record just read may be decided; false means skip it (it is
    /// below the committed offset, or the partition was just rewound because
    /// the broker skipped records).
    pub fn admit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> bool {
        let tp = (topic.to_string(), partition);
        let mut resume = self.resume();
        let Some(r) = resume.get_mut(&tp) else {
            return true;
        };
        if offset < r.expect {
            return false;
        }
        if offset == r.expect || r.rewind >= r.expect {
            if offset > r.expect {
                tracing::error!(
                    partition,
                    expected = r.expect,
                    got = offset,
                    "records below the committed offset are gone from the log even from its start"
                );
            }
            resume.remove(&tp);
            return true;
        }
        r.rewind = if r.rewind == 0 { REWIND } else { r.rewind * 2 };
        let target = (r.expect - r.rewind).max(0);
        metrics::counter!("couponrush_issuer_broker_skips_total").increment(1);
        tracing::warn!(
            partition,
            expected = r.expect,
            got = offset,
            rewind_to = target,
            "the broker resumed past the committed offset; rewinding so no record is passed over"
        );
        drop(resume);
        if let Err(e) = consumer.seek(
            topic,
            partition,
            Offset::Offset(target),
            Duration::from_secs(5),
        ) {
            tracing::warn!(error = %e, partition, "rewind failed; retrying on the next record");
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::config::ClientConfig;

    use super::*;

    #[test]
    fn a_partition_resumes_exactly_at_its_committed_offset() {
        // Never connects: only the rewind's seek touches it, and fails.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("group.id", "quirk")
            .create()
            .unwrap();
        let guard = ResumeGuard::default();
        assert!(
            guard.admit(&consumer, "t", 0, 5),
            "no expectation: admitted"
        );

        guard.expect(("t".into(), 0), 3000);
        assert!(
            !guard.admit(&consumer, "t", 0, 2999),
            "below: decided already"
        );
        assert!(
            !guard.admit(&consumer, "t", 0, 3005),
            "beyond: the broker skipped; rewound"
        );
        assert!(!guard.admit(&consumer, "t", 0, 2500), "read again below");
        assert!(
            guard.admit(&consumer, "t", 0, 3000),
            "back at the committed offset"
        );
        assert!(guard.admit(&consumer, "t", 0, 3001), "then every record");

        guard.expect(("t".into(), 1), 800);
        assert!(!guard.admit(&consumer, "t", 1, 900), "rewound to the start");
        assert!(
            guard.admit(&consumer, "t", 1, 900),
            "skipped even from the log's start: nothing older exists, admitted"
        );

        guard.expect(("t".into(), 2), 10);
        guard.on_revoke(&HashSet::from([("t".to_string(), 2)]));
        assert!(
            guard.admit(&consumer, "t", 2, 50),
            "a revoked partition is forgotten"
        );
    }
}
