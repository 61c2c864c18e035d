//! Broker quirks, worked around here so the loop reads as the loop. Apache
//! Kafka has neither; against it this module only ever admits records and
//! never rejoins.
//!
//! ## tansu 0.6 can resume a fetch past the committed offset
//! When a fetch starts in the middle of a producer batch, tansu 0.6.0
//! returns the *next* batch, silently skipping the records between the
//! committed offset and that batch's start (`core/tests/read_log.rs` shows
//! it). [`ResumeGuard`] keeps: no record at or beyond a newly assigned
//! partition's committed offset is passed over. The first record read from
//! such a partition must sit at the committed offset; records below it were
//! decided and committed already (skipped); a first record *beyond* it means
//! the broker skipped, and the partition is rewound further and further back
//! until the committed offset comes back (records read again below it are
//! skipped as above). Resuming a paused partition (the loop pauses while
//! the store is failing or being rebuilt) is the same fetch from a position
//! that may sit mid-batch, so it is guarded the same way, from the
//! application's position.
//!
//! ## tansu 0.6 leaves a dead member's partitions assigned
//! A member that dies without leaving (SIGKILL) is dropped from the group
//! when a live member's heartbeat finds its session expired, but the group
//! stays *formed*: the live members are told to rejoin, get their old
//! assignment back, and the dead member's partitions are read by no one
//! until some new member joins. If the new member joined *before* the dead
//! one expired (a supervisor restarting a crashed issuer at once), the last
//! assignment already counted the dead member, and nothing ever joins
//! again: the drop stalls for good. [`OrphanWatch`] keeps: **a partition
//! with records to decide is never left unread for longer than twice the
//! session timeout while this issuer is deciding.** Between batches, an
//! issuer that owns partitions looks at those it does not own; one whose
//! committed offset stood still, with records beyond it, for that long
//! since this issuer's last rebalance has no live owner (a live one commits
//! after every batch, and an owner that is retrying is rare while this
//! issuer is not), so the issuer leaves and rejoins the group: the broker
//! then forms it anew from the live members. An issuer that owns nothing is
//! in a rebalance (or one too many) and leaves the watching to the others. On a broker
//! that evicts dead members properly, a rejoin at worst moves partitions of
//! a stuck owner, which costs replays, never a decision.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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

    /// On resuming paused partitions: librdkafka dropped what it had fetched
    /// for them and fetches again from the application's position, which can
    /// sit in the middle of a producer batch, where tansu 0.6 skips to the
    /// next batch. So the first record read from each of them must be at
    /// that position, exactly as after an assignment.
    pub fn on_resume<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let Ok(positions) = consumer.position() else {
            return;
        };
        for e in positions.elements() {
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
        // The rewind grows only once a seek to it succeeded: a failed seek
        // retries the same target on the next record, so the guard never
        // gives up on records it did not read.
        let next = if r.rewind == 0 { REWIND } else { r.rewind * 2 };
        let target = (r.expect - next).max(0);
        metrics::counter!("couponrush_issuer_broker_skips_total").increment(1);
        tracing::warn!(
            partition,
            expected = r.expect,
            got = offset,
            rewind_to = target,
            "the broker resumed past the committed offset; rewinding so no record is passed over"
        );
        drop(resume);
        match consumer.seek(
            topic,
            partition,
            Offset::Offset(target),
            Duration::from_secs(5),
        ) {
            Ok(()) => {
                if let Some(r) = self.resume().get_mut(&tp) {
                    r.rewind = next;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, partition, "rewind failed; retrying on the next record")
            }
        }
        false
    }
}

/// Timeout of the broker requests the watch makes from the loop's thread.
const WATCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Partitions with records to decide whose committed offset stands still.
#[derive(Debug, Default)]
struct Stalls {
    /// Per partition, its committed offset and since when it has not moved.
    still: HashMap<i32, (i64, Instant)>,
}

impl Stalls {
    /// Records what `partition` looked like at `now`; true when it has had
    /// records beyond its committed offset, and that offset has not moved,
    /// for `limit`.
    fn stalled(
        &mut self,
        partition: i32,
        committed: i64,
        end: i64,
        now: Instant,
        limit: Duration,
    ) -> bool {
        if end <= committed {
            self.still.remove(&partition);
            return false;
        }
        let (at, since) = self.still.entry(partition).or_insert((committed, now));
        if *at != committed {
            (*at, *since) = (committed, now);
        }
        now.duration_since(*since) >= limit
    }

    /// Forgets everything (after a rejoin, or while this issuer cannot tell).
    fn clear(&mut self) {
        self.still.clear();
    }
}

/// Rejoins the group when a partition with records to decide has no live
/// owner (the second quirk above).
#[derive(Debug)]
pub struct OrphanWatch {
    /// Every topic the member subscribes to, all watched, all subscribed
    /// to again by a rejoin (a rejoin that left one out would leave its
    /// partitions, the issuers' hold actions say, read by no one).
    topics: Vec<String>,
    /// How long a partition may stand still with records to decide.
    limit: Duration,
    state: Mutex<(HashMap<String, Stalls>, Option<Instant>)>,
}

impl OrphanWatch {
    /// Watches the partitions of `topics` (the member's whole
    /// subscription); `session_timeout` is the group's.
    pub fn new(topics: &[&str], session_timeout: Duration) -> Self {
        Self {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            limit: session_timeout * 2,
            state: Mutex::new((HashMap::new(), None)),
        }
    }

    /// Looks (a few times a limit) at the partitions this member does not
    /// own; rejoins the group if one has stood still for the limit with
    /// records to decide. Call it between batches, from the loop's thread,
    /// only while deciding: a retrying issuer cannot tell a dead owner from
    /// its own trouble.
    pub fn watch<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (stalls, next) = &mut *state;
        if next.is_some_and(|n| now < n) {
            return;
        }
        *next = Some(now + (self.limit / 4).max(Duration::from_millis(500)));
        let orphans = match self.orphans(consumer, stalls, now) {
            Ok(orphans) => orphans,
            Err(e) => {
                tracing::debug!(error = %e, "the orphan watch could not look at the group");
                return;
            }
        };
        if orphans.is_empty() {
            return;
        }
        metrics::counter!("couponrush_issuer_orphan_rejoins_total").increment(1);
        tracing::warn!(
            partitions = ?orphans,
            still_for = ?self.limit,
            "partitions with records to decide have not moved and are not ours: their owner is \
             gone without the group noticing (tansu 0.6); rejoining the group so it is formed anew"
        );
        stalls.clear();
        // Give the new group a whole limit to settle before looking again.
        *next = Some(now + self.limit);
        // The rebalance callbacks (served later, in poll) take the lock.
        drop(state);
        consumer.unsubscribe();
        if let Err(e) = consumer.subscribe(&self.topics()) {
            tracing::error!(error = %e, "rejoining the group failed");
        }
    }

    /// The member's whole subscription, as its loop and every rejoin
    /// subscribe to it: one list, so a rejoin cannot leave a topic out.
    pub fn topics(&self) -> Vec<&str> {
        self.topics.iter().map(String::as_str).collect()
    }

    /// Forgets what it saw: time spent not deciding, or before this
    /// member's last rebalance, does not count.
    pub fn forget(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0.clear();
    }

    /// Partitions of every watched topic not owned here that have stood
    /// still for the limit.
    fn orphans<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        stalls: &mut HashMap<String, Stalls>,
        now: Instant,
    ) -> rdkafka::error::KafkaResult<Vec<(String, i32)>> {
        let assignment = consumer.assignment()?;
        if assignment.count() == 0 {
            // In a rebalance, or more issuers than partitions: the members
            // that own partitions watch.
            stalls.clear();
            return Ok(Vec::new());
        }
        let mut orphans = Vec::new();
        for topic in &self.topics {
            let stalls = stalls.entry(topic.clone()).or_default();
            let owned: HashSet<i32> = assignment
                .elements_for_topic(topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            let metadata = consumer.fetch_metadata(Some(topic), WATCH_REQUEST_TIMEOUT)?;
            let mut others = TopicPartitionList::new();
            for t in metadata.topics().iter().filter(|t| t.name() == topic) {
                for p in t.partitions() {
                    if !owned.contains(&p.id()) {
                        others.add_partition(topic, p.id());
                    }
                }
            }
            if others.count() == 0 {
                stalls.clear();
                continue;
            }
            let committed = consumer.committed_offsets(others, WATCH_REQUEST_TIMEOUT)?;
            for e in committed.elements() {
                let partition = e.partition();
                let (low, high) =
                    consumer.fetch_watermarks(topic, partition, WATCH_REQUEST_TIMEOUT)?;
                let committed = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => low,
                };
                if stalls.stalled(partition, committed, high, now, self.limit) {
                    orphans.push((topic.clone(), partition));
                }
            }
        }
        Ok(orphans)
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

        // The seek fails here (no broker): the rewind does not grow, and the
        // guard keeps refusing rather than admit past records it never read.
        guard.expect(("t".into(), 1), 800);
        for _ in 0..20 {
            assert!(
                !guard.admit(&consumer, "t", 1, 900),
                "a failed rewind is retried, never given up"
            );
        }

        guard.expect(("t".into(), 2), 10);
        guard.on_revoke(&HashSet::from([("t".to_string(), 2)]));
        assert!(
            guard.admit(&consumer, "t", 2, 50),
            "a revoked partition is forgotten"
        );
    }

    #[test]
    fn a_partition_is_an_orphan_once_it_stood_still_with_records_for_the_limit() {
        let limit = Duration::from_secs(12);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut stalls = Stalls::default();
        assert!(!stalls.stalled(3, 100, 800, at(0), limit), "seen once");
        assert!(!stalls.stalled(3, 100, 900, at(11), limit), "not yet");
        assert!(
            stalls.stalled(3, 100, 900, at(12), limit),
            "still for the limit"
        );

        assert!(!stalls.stalled(4, 100, 900, at(0), limit));
        assert!(
            !stalls.stalled(4, 150, 900, at(10), limit),
            "moved: a live owner"
        );
        assert!(
            !stalls.stalled(4, 150, 900, at(21), limit),
            "still since 10 s only"
        );
        assert!(stalls.stalled(4, 150, 900, at(22), limit));

        assert!(
            !stalls.stalled(5, 900, 900, at(0), limit),
            "nothing to decide"
        );
        assert!(
            !stalls.stalled(5, 900, 900, at(30), limit),
            "never an orphan"
        );
        assert!(
            !stalls.stalled(5, 900, 950, at(31), limit),
            "records again: the clock restarts"
        );

        stalls.clear();
        assert!(
            !stalls.stalled(3, 100, 900, at(40), limit),
            "forgotten after a rejoin"
        );
    }
}
