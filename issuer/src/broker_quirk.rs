//! Broker quirks, worked around here so the loop reads as the loop. Apache
//! Kafka has neither; against it this module never rejoins and decides no
//! record twice, but a partition silent after an assignment or a resume
//! (because it has nothing new) is rewound and re-read, its records skipped:
//! [`REWIND`] records after [`SILENT`], the rewind and the wait doubling for
//! each time the re-read does not come ([`patience`]).
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
//! When the committed offset sits in the middle of the partition's *last*
//! batch, there is no next batch to skip to: tansu answers with nothing
//! until another batch is written, which at the end of a drop never happens
//! (`core/tests/read_log.rs`; the chaos suite's `reused-key` once left one
//! request undecided this way after a rejoin). So a guarded partition that
//! yields no record for [`SILENT`] is rewound too (the notifier's
//! `TailWatch` does the same for its own consumer), and given twice as
//! long for its re-read before it is rewound again, doubling ([`patience`]:
//! a re-read's fetch can wait seconds behind one tansu holds);
//! reading the record just below the committed offset then proves the
//! position sound (the next record is the one at it, in the same batch or
//! at the start of the next). Every record read again restarts the silence,
//! so a slow re-read is not thrown away, and the silence is acted on only
//! after a poll came back empty (mostly: a record waiting behind others is
//! not missing; an empty poll that served a commit's result passes too, and
//! costs a needless re-read at worst). A rewind counts once the fetcher
//! applied its seek; one not applied is tried again at the same offset. A
//! partition rewound to the log's start that goes silent again is sought
//! there again if that re-read gave records, and left to its next record if
//! it gave none (nothing lies below its offset).
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
//! session timeout while this issuer is deciding** (a member that owns
//! nothing waits up to 8 times that after a rejoin that changed nothing,
//! see below). Between batches, an
//! issuer looks at the partitions it does not own; one whose
//! committed offset stood still, with records beyond it, for that long
//! since this issuer's last rebalance has no live owner (a live one commits
//! after every batch, and an owner that is retrying is rare while this
//! issuer is not), so the issuer leaves and rejoins the group: the broker
//! then forms it anew from the live members. A member watches from its
//! first assignment on, an empty one included, until its next revoke: in a
//! rebalance it does not, but a member the broker gave nothing, because it
//! counted the dead one, is the one left to notice (CI's
//! `holds-notifier-kill`: the restarted notifier was assigned `[]` for two
//! minutes while the dead one kept every partition). On a broker
//! that evicts dead members properly, a rejoin at worst moves partitions of
//! a stuck owner, which costs replays, never a decision.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::offsets::Tp;

/// First rewind when a broker resumes past the committed offset; doubled
/// on each further skip.
const REWIND: i64 = 1000;

/// How long a newly assigned or resumed partition may yield no record
/// before it is rewound (see the module doc).
pub const SILENT: Duration = Duration::from_secs(2);

/// How long a partition may yield nothing before it is rewound, `first`
/// before any rewind, doubled by each rewind applied (at most
/// [`PATIENCE_DOUBLINGS`] times: 2, 4, 8, 16 s from [`SILENT`]). A re-read
/// needs a fetch of its own, sent only once the fetch in flight on that
/// broker connection comes back, and tansu 0.6 can hold one for seconds
/// (about 5 s in `spine`, fetching a range of many small batches). A rewind
/// meanwhile throws away what arrives (librdkafka drops a fetch made for
/// an older seek): with [`SILENT`] after every rewind, CI's `spine` rewound
/// its partitions every 5 s for minutes and left 1,552 to 6,132 requests
/// undecided. Doubling, not one long wait, keeps a rewind that must go
/// further (it landed inside a long last batch again) quick.
pub fn patience(first: Duration, rewinds: u32) -> Duration {
    first * 2u32.pow(rewinds.min(PATIENCE_DOUBLINGS))
}

/// How many times [`patience`] doubles.
pub const PATIENCE_DOUBLINGS: u32 = 3;

/// How long a rewind waits for the partition's fetcher to apply its seek.
/// Short: the loop waits meanwhile; an unanswered seek is retried.
const SEEK_WAIT: Duration = Duration::from_millis(500);

/// Where a newly assigned partition must resume.
#[derive(Debug, Clone, Copy)]
struct Resume {
    /// The committed offset: the first record expected.
    expect: i64,
    /// How far back the last rewind went (0: none yet).
    rewind: i64,
    /// How many rewinds were applied.
    rewinds: u32,
    /// Since when no record came: the expectation was set or last rewound.
    since: Instant,
    /// Whether a record below `expect` was read since the last applied seek.
    reread: bool,
}

impl Resume {
    /// How long it may yield nothing before it is (again) rewound.
    fn patience(&self) -> Duration {
        patience(SILENT, self.rewinds)
    }
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
        let committed = match consumer.committed_offsets(assigned.clone(), Duration::from_secs(5)) {
            Ok(committed) => committed,
            Err(e) => {
                // Unguarded: a fetch that starts mid-batch may pass records
                // over unseen. Rare (the coordinator did not answer in 5 s)
                // and loud, so a run that lost requests can be traced here.
                metrics::counter!("couponrush_issuer_unguarded_assignments_total").increment(1);
                tracing::error!(error = %e, partitions = assigned.count(), "the committed offsets of newly assigned partitions could not be read; their resume is not checked");
                return;
            }
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
    /// An expectation already held (a resume in the middle of a rewind's
    /// re-read, whose position is below it) is kept: records between the
    /// two were decided already.
    fn expect(&self, tp: Tp, offset: i64) {
        let mut resume = self.resume();
        let now = Instant::now();
        match resume.get_mut(&tp) {
            // Held, with its rewinds: the patience it earned stays (a
            // resume drops what was fetched, and the fetch starts again).
            Some(r) if r.expect >= offset => r.since = now,
            _ => {
                resume.insert(
                    tp,
                    Resume {
                        expect: offset,
                        rewind: 0,
                        rewinds: 0,
                        since: now,
                        reread: false,
                    },
                );
            }
        }
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
            // Read again below it after a rewind (librdkafka hands out
            // nothing below the offset it fetches from, so only after one).
            // The record just below proves the position sound: the next is
            // the one at it.
            // (librdkafka drops a batch cut short by the response size
            // whole, so a record read is never the last of a cut batch.)
            // Any record read again is progress: the silence restarts.
            if r.rewind > 0 && offset == r.expect - 1 {
                resume.remove(&tp);
            } else {
                r.since = Instant::now();
                r.reread = true;
            }
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
        metrics::counter!("couponrush_issuer_broker_skips_total").increment(1);
        drop(resume);
        self.rewind(consumer, tp, Some(offset));
        false
    }

    /// Between batches, not while paused, and only when the batch just read
    /// emptied librdkafka's queue (`drained`: a record of a partition that
    /// waits behind others is not silence): rewinds each guarded partition
    /// that yielded no record for its [`patience`] since its expectation
    /// was set, it was last rewound or it last gave a record (the committed offset
    /// may sit in the log's last batch). One rewound to the log's start
    /// already is sought there again only if that re-read gave records and
    /// then stopped short; one whose seek to the start gave nothing has
    /// nothing below its offset (never written, or deleted by retention) and
    /// is left to its next record.
    pub fn rewind_silent<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, drained: bool) {
        if !drained {
            return;
        }
        let silent: Vec<(Tp, Resume)> = self
            .resume()
            .iter()
            .filter(|(_, r)| r.since.elapsed() >= r.patience())
            .filter(|(_, r)| r.rewind < r.expect || r.reread)
            .map(|(tp, r)| (tp.clone(), *r))
            .collect();
        for (tp, r) in silent {
            // Usually a partition with nothing new, so not a warning.
            metrics::counter!("couponrush_issuer_broker_silent_total").increment(1);
            tracing::info!(
                partition = tp.1,
                expected = r.expect,
                silent_for = ?r.patience(),
                "no record came from the committed offset; rewinding, in case the broker holds it in the middle of its last batch"
            );
            self.rewind(consumer, tp, None);
        }
    }

    /// Seeks `tp` further back than the last time (to the log's start at
    /// most, and there again). The rewind grows only once a seek to it was
    /// applied: a seek that failed or was not answered in [`SEEK_WAIT`] is
    /// retried at the same target next time, so the guard never counts a
    /// re-read that did not happen (nor, at the log's start, takes a record
    /// beyond the committed offset for proof that the records below it are
    /// gone). `skipped_to`: the record that showed the broker skipped.
    fn rewind<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tp: Tp,
        skipped_to: Option<i64>,
    ) {
        let Some(r) = self.resume().get(&tp).copied() else {
            return;
        };
        let next = match r.rewind {
            0 => REWIND,
            n if n >= r.expect => n,
            n => n * 2,
        };
        let target = (r.expect - next).max(0);
        let (topic, partition) = (&tp.0, tp.1);
        if let Some(got) = skipped_to {
            tracing::warn!(
                partition,
                expected = r.expect,
                got,
                rewind_to = target,
                "the broker resumed past the committed offset; rewinding so no record is passed over"
            );
        }
        // Waited for, briefly: the partition's fetcher answers whether the
        // seek was applied (records fetched before it are then dropped by
        // librdkafka, never handed out). A seek queued without waiting can
        // fail later unseen (a partition whose fetch has not started yet),
        // and the guard would count a rewind that never happened.
        let seek = consumer.seek(topic, partition, Offset::Offset(target), SEEK_WAIT);
        if let Some(r) = self.resume().get_mut(&tp) {
            r.since = Instant::now();
            match seek {
                Ok(()) => {
                    (r.rewind, r.reread) = (next, false);
                    r.rewinds += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, partition, rewind_to = target, "rewind not applied; retrying")
                }
            }
        }
    }
}

/// How many times a member that owns nothing doubles its wait after a
/// rejoin (1, 2, 4, then 8 limits).
const IDLE_DOUBLINGS: u32 = 3;

/// Timeout of the broker requests the watch makes from the loop's thread.
const WATCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Partitions with records to decide whose committed offset stands still.
#[derive(Debug, Default)]
struct Stalls {
    /// Per partition, its committed offset and since when it has not moved.
    still: HashMap<i32, (i64, Instant)>,
    /// A committed offset seen before moved since [`Stalls::take_moved`].
    moved: bool,
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
            self.moved = true;
        }
        now.duration_since(*since) >= limit
    }

    /// Whether an owner was seen committing since the last call.
    fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.moved)
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
    state: Mutex<WatchState>,
    /// A client of its own for the watch's questions (metadata, committed
    /// offsets, watermarks), when given: on the member's own connection
    /// they queue behind its fetch, which tansu 0.6 can hold for seconds,
    /// and the loop that asks waits that long (CI's `holds-redis-lost`: 15
    /// to 20 s without a decision after each store recovery).
    looker: Option<Looker>,
}

/// The watch's own client.
struct Looker(BaseConsumer);

impl std::fmt::Debug for Looker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Looker")
    }
}

#[derive(Debug, Default)]
struct WatchState {
    /// Per topic, the partitions not owned here and how long they stood still.
    stalls: HashMap<String, Stalls>,
    /// No look at the group before this.
    next: Option<Instant>,
    /// Assigned (possibly nothing) and not revoked since: not in a rebalance.
    settled: bool,
    /// Rejoins made while owning nothing since this member last owned
    /// partitions or saw an owner commit: each doubles the wait after the
    /// next such rejoin.
    idle_rejoins: u32,
}

impl WatchState {
    /// An owner seen committing since the last look: whatever kept them
    /// all stuck is over, and the next idle rejoin waits one limit again.
    fn note_owner_commits(&mut self) {
        // Every topic's mark taken (not `any`, which would stop at the
        // first and leave another's to reset the next look again).
        let moved = self
            .stalls
            .values_mut()
            .fold(false, |moved, s| s.take_moved() | moved);
        if moved {
            self.idle_rejoins = 0;
        }
    }

    /// The wait after a rejoin before the next look: one `limit`, doubled
    /// for each rejoin made while owning nothing since the member last
    /// owned partitions or saw an owner commit (1, 2, 4, then 8 limits).
    fn wait_after_rejoin(&mut self, owns_nothing: bool, limit: Duration) -> Duration {
        let doublings = if owns_nothing {
            let d = self.idle_rejoins.min(IDLE_DOUBLINGS);
            self.idle_rejoins = self.idle_rejoins.saturating_add(1);
            d
        } else {
            0
        };
        limit * 2u32.pow(doublings)
    }
}

impl OrphanWatch {
    /// Watches the partitions of `topics` (the member's whole
    /// subscription); `session_timeout` is the group's.
    pub fn new(topics: &[&str], session_timeout: Duration) -> Self {
        Self {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            limit: session_timeout * 2,
            state: Mutex::new(WatchState::default()),
            looker: None,
        }
    }

    /// Asks its questions through a client of its own, made from the
    /// member's `config` (the same brokers and group, never joining it).
    pub fn with_looker(mut self, config: &ClientConfig) -> KafkaResult<Self> {
        let mut config = config.clone();
        // A static member's id belongs to the member alone; its statistics
        // are the member's to report.
        // The member's debug contexts, if any, are for the member.
        let client_id = format!("{}-looker", config.get("client.id").unwrap_or("couponrush"));
        config
            .remove("group.instance.id")
            .remove("statistics.interval.ms")
            .remove("debug")
            .set("client.id", client_id);
        self.looker = Some(Looker(config.create()?));
        Ok(self)
    }

    fn state(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks (a few times a limit) at the partitions this member does not
    /// own; rejoins the group if one has stood still for the limit with
    /// records to decide. Call it between batches, from the loop's thread,
    /// only while deciding: a retrying issuer cannot tell a dead owner from
    /// its own trouble. True when it rejoined.
    pub fn watch<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        if !state.settled {
            // In a rebalance: what stands still now says nothing.
            state.stalls.clear();
            return false;
        }
        if state.next.is_some_and(|n| now < n) {
            return false;
        }
        let orphans = self.orphans(consumer, &mut state.stalls, now);
        state.note_owner_commits();
        // The next look is an interval after this one ended, however long
        // it took: the loop gets that time to decide.
        state.next = Some(Instant::now() + (self.limit / 4).max(Duration::from_millis(500)));
        let (orphans, owns_nothing) = match orphans {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(error = %e, "the orphan watch could not look at the group");
                return false;
            }
        };
        if orphans.is_empty() {
            return false;
        }
        metrics::counter!("couponrush_issuer_orphan_rejoins_total").increment(1);
        tracing::warn!(
            partitions = ?orphans,
            still_for = ?self.limit,
            "partitions with records to decide have not moved and are not ours: their owner is \
             gone without the group noticing (tansu 0.6); rejoining the group so it is formed anew"
        );
        state.stalls.clear();
        // Give the new group a whole limit to settle before looking again.
        // A member that owns nothing also watches owners that are stuck
        // for a reason of their own (a store or a webhook down for all):
        // rejoin after rejoin that gives it nothing again, it waits longer
        // (up to 8 limits), so an outage is not met with a rebalance per
        // limit.
        state.next = Some(Instant::now() + state.wait_after_rejoin(owns_nothing, self.limit));
        // The rebalance callbacks (served later, in poll) take the lock.
        drop(state);
        consumer.unsubscribe();
        if let Err(e) = consumer.subscribe(&self.topics()) {
            tracing::error!(error = %e, "rejoining the group failed");
        }
        true
    }

    /// The member was just assigned `count` partitions (none, possibly):
    /// it watches from now on. Call it from the assign callback.
    pub fn on_assign(&self, count: usize) {
        let mut state = self.state();
        state.stalls.clear();
        state.settled = true;
        if count > 0 {
            state.idle_rejoins = 0;
        }
    }

    /// The member's partitions are being revoked: a rebalance, it stops
    /// watching until its next assignment. Call it from the revoke callback.
    pub fn on_revoke(&self) {
        let mut state = self.state();
        state.stalls.clear();
        state.settled = false;
    }

    /// The member's whole subscription, as its loop and every rejoin
    /// subscribe to it: one list, so a rejoin cannot leave a topic out.
    pub fn topics(&self) -> Vec<&str> {
        self.topics.iter().map(String::as_str).collect()
    }

    /// Forgets what it saw: time spent not deciding, or before this
    /// member's last rebalance, does not count.
    pub fn forget(&self) {
        self.state().stalls.clear();
    }

    /// Partitions of every watched topic not owned here that have stood
    /// still for the limit.
    fn orphans<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        stalls: &mut HashMap<String, Stalls>,
        now: Instant,
    ) -> KafkaResult<(Vec<(String, i32)>, bool)> {
        // Possibly empty: a member given nothing watches every partition.
        let assignment = consumer.assignment()?;
        let owns_nothing = assignment.count() == 0;
        let orphans = match &self.looker {
            Some(Looker(looker)) => {
                // It joins nothing and reads nothing: what waits in its
                // queue is logs and errors. A poll with a timeout serves
                // what comes within it (one with none stops at the first
                // log line); only errors come back, and they are rare.
                while let Some(r) = looker.poll(Duration::from_millis(1)) {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "the orphan watch's client");
                    }
                }
                self.stalled(looker, &assignment, stalls, now)
            }
            None => self.stalled(consumer, &assignment, stalls, now),
        }?;
        Ok((orphans, owns_nothing))
    }

    /// Partitions of every watched topic not in `assignment` that have
    /// stood still for the limit, asked through `consumer`.
    fn stalled<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        assignment: &TopicPartitionList,
        stalls: &mut HashMap<String, Stalls>,
        now: Instant,
    ) -> KafkaResult<Vec<(String, i32)>> {
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

    /// A consumer of librdkafka's mock cluster with `t` 0..4 assigned and
    /// fetching, so its seeks are applied (the mock is returned to keep it up).
    fn assigned_consumer() -> (couponrush_harness::MockKafka, BaseConsumer) {
        let mock = couponrush_harness::MockKafka::start(1).unwrap();
        mock.create_topic("t", 4, 1).unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.brokers())
            .set("group.id", "quirk-silent")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..4 {
            tpl.add_partition_offset("t", p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        for p in 0..4 {
            while consumer.seek("t", p, Offset::Offset(0), SEEK_WAIT).is_err() {
                assert!(
                    Instant::now() < until,
                    "the mock's partitions never fetched"
                );
                let _ = consumer.poll(Duration::from_millis(100));
            }
        }
        (mock, consumer)
    }

    #[test]
    fn a_seek_not_applied_does_not_count_as_a_rewind() {
        // Assigned from the group's committed offset, which the coordinator
        // keeps refusing to look up: the partition is known but its fetch
        // never starts, so its fetcher refuses the seek. The rewind does
        // not grow and is retried at the same offset, never taken for a
        // re-read (a seek queued without waiting returns Ok here).
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let mock = couponrush_harness::MockKafka::start(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        mock.inject(couponrush_harness::Fault::RequestErrors(
            RDKafkaApiKey::OffsetFetch,
            vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 1000],
        ))
        .unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.brokers())
            .set("group.id", "quirk-unapplied")
            .create()
            .unwrap();
        consumer
            .fetch_metadata(Some("t"), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Stored).unwrap();
        consumer.assign(&tpl).unwrap();
        let guard = ResumeGuard::default();
        let tp = ("t".to_string(), 0);
        guard.expect(tp.clone(), 800);
        for _ in 0..3 {
            let _ = consumer.poll(Duration::from_millis(100));
            silent_for_long(&guard, tp.clone());
            guard.rewind_silent(&consumer, true);
            assert_eq!(guard.resume()[&tp].rewind, 0, "not applied: not counted");
        }
        assert!(
            !guard.admit(&consumer, "t", 0, 900),
            "beyond the offset with no re-read: refused, never taken for records gone"
        );
    }

    /// Backdates `tp`'s silence by its patience.
    fn silent_for_long(guard: &ResumeGuard, tp: Tp) {
        let mut resume = guard.resume();
        let r = resume.get_mut(&tp).unwrap();
        r.since -= r.patience();
    }

    #[test]
    fn a_silent_partition_is_rewound_until_the_record_below_its_offset_comes() {
        let (_mock, consumer) = assigned_consumer();
        let guard = ResumeGuard::default();
        let tp = ("t".to_string(), 0);
        guard.expect(tp.clone(), 3000);
        guard.rewind_silent(&consumer, true);
        assert_eq!(guard.resume()[&tp].rewind, 0, "not silent for long yet");
        assert!(
            !guard.admit(&consumer, "t", 0, 2999),
            "below, with no rewind yet: refused, and proves nothing"
        );
        assert!(guard.resume().contains_key(&tp));

        silent_for_long(&guard, tp.clone());
        guard.rewind_silent(&consumer, false);
        assert_eq!(
            guard.resume()[&tp].rewind,
            0,
            "records still queued behind others: not silence"
        );
        guard.rewind_silent(&consumer, true);
        assert_eq!(guard.resume()[&tp].rewind, REWIND, "silent: rewound");
        // Its re-read waits for the fetch in flight, which tansu may hold
        // for seconds: a second rewind after SILENT would throw it away.
        guard.resume().get_mut(&tp).unwrap().since -= SILENT;
        guard.rewind_silent(&consumer, true);
        assert_eq!(
            guard.resume()[&tp].rewind,
            REWIND,
            "rewound once: the re-read is given twice SILENT"
        );
        assert_eq!(guard.resume()[&tp].patience(), 2 * SILENT);
        assert!(!guard.admit(&consumer, "t", 0, 2000), "read again below");
        assert!(
            !guard.admit(&consumer, "t", 0, 2999),
            "the record just below: decided already"
        );
        assert!(
            guard.admit(&consumer, "t", 0, 3000),
            "the one at the committed offset follows"
        );
        assert!(guard.admit(&consumer, "t", 0, 3001));
        assert!(guard.resume().is_empty());

        // A slow re-read is progress, not silence.
        let tp = ("t".to_string(), 2);
        guard.expect(tp.clone(), 5000);
        silent_for_long(&guard, tp.clone());
        guard.rewind_silent(&consumer, true);
        silent_for_long(&guard, tp.clone());
        assert!(!guard.admit(&consumer, "t", 2, 4100), "read again below");
        guard.rewind_silent(&consumer, true);
        assert_eq!(
            guard.resume()[&tp].rewind,
            REWIND,
            "a record read again restarts the silence: no second rewind"
        );

        // A resume in the middle of the re-read, from a position below the
        // committed offset, keeps the committed offset.
        guard.expect(tp.clone(), 4200);
        assert_eq!(guard.resume()[&tp].expect, 5000);
        let held = guard.resume()[&tp];
        assert_eq!(
            (held.rewind, held.rewinds),
            (REWIND, 1),
            "and the rewinds it made, with the patience they earned"
        );
        assert!(
            !guard.admit(&consumer, "t", 2, 4300),
            "still below: refused"
        );

        // Silent again and again: the rewind doubles until the log's start.
        // A re-read from the start that gave nothing means nothing lies
        // below: no more seeking. One that gave records and stopped short is
        // sought at the start again.
        let tp = ("t".to_string(), 1);
        guard.expect(tp.clone(), 1500);
        for rewind in [REWIND, 2 * REWIND] {
            silent_for_long(&guard, tp.clone());
            guard.rewind_silent(&consumer, true);
            assert_eq!(guard.resume()[&tp].rewind, rewind);
            assert!(
                !guard.resume()[&tp].reread,
                "an applied seek awaits its re-read"
            );
        }
        silent_for_long(&guard, tp.clone());
        let before = guard.resume()[&tp].since;
        guard.rewind_silent(&consumer, true);
        assert_eq!(
            guard.resume()[&tp].since,
            before,
            "the start gave nothing: not sought again"
        );
        assert!(
            !guard.admit(&consumer, "t", 1, 700),
            "a record below after all"
        );
        silent_for_long(&guard, tp.clone());
        let before = guard.resume()[&tp].since;
        guard.rewind_silent(&consumer, true);
        let after = guard.resume()[&tp];
        assert!(
            after.since > before && !after.reread,
            "a re-read that stopped short: sought at the start again, and applied"
        );

        // Nothing below offset 0: never sought.
        let tp = ("t".to_string(), 3);
        guard.expect(tp.clone(), 0);
        silent_for_long(&guard, tp.clone());
        let before = guard.resume()[&tp].since;
        guard.rewind_silent(&consumer, true);
        assert_eq!(guard.resume()[&tp].since, before);
        assert!(!guard.admit(&consumer, "t", 1, 20), "below: refused");
        assert!(guard.admit(&consumer, "t", 1, 1500), "at it: admitted");
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
    /// A member that calls the watch's hooks from its rebalance callbacks,
    /// as the issuer's and the notifier's contexts do.
    struct Watched(std::sync::Arc<OrphanWatch>);

    impl rdkafka::ClientContext for Watched {}

    impl ConsumerContext for Watched {
        fn pre_rebalance(
            &self,
            _: &BaseConsumer<Self>,
            rebalance: &rdkafka::consumer::Rebalance<'_>,
        ) {
            if let rdkafka::consumer::Rebalance::Revoke(_) = rebalance {
                self.0.on_revoke();
            }
        }

        fn post_rebalance(
            &self,
            _: &BaseConsumer<Self>,
            rebalance: &rdkafka::consumer::Rebalance<'_>,
        ) {
            if let rdkafka::consumer::Rebalance::Assign(tpl) = rebalance {
                self.0.on_assign(tpl.count());
            }
        }
    }

    #[test]
    fn a_member_that_owns_nothing_backs_off_rejoin_after_rejoin_until_it_owns_or_sees_a_commit() {
        let limit = Duration::from_secs(1);
        let watch = OrphanWatch::new(&["t"], limit);
        let waits = |n: usize, owns_nothing: bool| -> Vec<u32> {
            let mut state = watch.state();
            (0..n)
                .map(|_| (state.wait_after_rejoin(owns_nothing, limit).as_secs()) as u32)
                .collect()
        };
        assert_eq!(
            waits(5, true),
            [1, 2, 4, 8, 8],
            "doubling, capped at 8 limits"
        );
        // An empty assignment keeps the count; one with partitions resets it.
        watch.on_assign(0);
        assert_eq!(waits(1, true), [8]);
        watch.on_assign(3);
        assert_eq!(waits(2, true), [1, 2]);
        // A member that owns partitions waits one limit and keeps no count.
        assert_eq!(waits(2, false), [1, 1]);
        assert_eq!(waits(1, true), [4]);
        // An owner seen committing (a partition's committed offset moved
        // between two looks) resets it; standing still does not.
        let now = Instant::now();
        {
            let mut state = watch.state();
            let stalls = state.stalls.entry("t".into()).or_default();
            stalls.stalled(0, 5, 10, now, limit);
            stalls.stalled(0, 5, 10, now, limit);
            state.note_owner_commits();
        }
        assert_eq!(waits(1, true), [8], "standing still is no commit");
        {
            let mut state = watch.state();
            let stalls = state.stalls.entry("t".into()).or_default();
            stalls.stalled(0, 6, 10, now, limit);
            state.note_owner_commits();
        }
        assert_eq!(waits(1, true), [1], "an owner committed");
    }

    #[test]
    fn a_member_given_nothing_rejoins_when_the_partitions_owner_stands_still() {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let mock = couponrush_harness::MockKafka::start(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", mock.brokers())
            .set("group.id", "quirk-orphan")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
        let member = |watch: std::sync::Arc<OrphanWatch>| -> BaseConsumer<Watched> {
            let consumer: BaseConsumer<Watched> = cfg.create_with_context(Watched(watch)).unwrap();
            consumer.subscribe(&["t"]).unwrap();
            consumer
        };
        // Two members asking through clients of their own, as the issuer
        // and the notifier do; the group's one partition goes to one of
        // them (the range assignor orders members by id), the other is
        // given nothing. The owner reads and never commits, as a dead
        // member that tansu keeps in the group looks to the others.
        let watch = || {
            std::sync::Arc::new(
                OrphanWatch::new(&["t"], Duration::from_secs(1))
                    .with_looker(&cfg)
                    .unwrap(),
            )
        };
        let (wa, wb) = (watch(), watch());
        let (a, b) = (member(wa.clone()), member(wb.clone()));
        let until = Instant::now() + Duration::from_secs(30);
        let count = |c: &BaseConsumer<Watched>| c.assignment().unwrap().count();
        while !(wa.state().settled && wb.state().settled && count(&a) + count(&b) == 1) {
            assert!(Instant::now() < until, "the group never settled");
            let _ = a.poll(Duration::from_millis(50));
            let _ = b.poll(Duration::from_millis(50));
        }
        let (owner, idle, watch) = if count(&a) == 1 {
            (a, b, wb)
        } else {
            (b, a, wa)
        };
        assert_eq!(count(&idle), 0, "given nothing");
        // A watch that was never told of an assignment (in a rebalance, as
        // far as it knows) does not look.
        let unsettled = OrphanWatch::new(&["t"], Duration::from_secs(1));
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", mock.brokers())
            .create()
            .unwrap();
        for i in 0..10 {
            producer
                .send(BaseRecord::<str, str>::to("t").payload(&i.to_string()))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();

        // Records to read, an owner that commits nothing: the idle member
        // sees the partition stand still for the limit (2 s) and rejoins.
        let until = Instant::now() + Duration::from_secs(20);
        let rejoined = loop {
            let _ = owner.poll(Duration::from_millis(50));
            let _ = idle.poll(Duration::from_millis(50));
            assert!(!unsettled.watch(&idle), "in a rebalance: no rejoin");
            if watch.watch(&idle) {
                break true;
            }
            if Instant::now() > until {
                break false;
            }
        };
        // Left as the loops leave (librdkafka asserts on a consumer dropped
        // right after subscribing).
        for c in [&idle, &owner] {
            couponrush_core::kafka::leave_group(c, Duration::from_secs(10));
        }
        assert!(
            rejoined,
            "a member given nothing never looked at the partition standing still"
        );
    }
}
