//! Offset bookkeeping: which offsets may be committed, and the commit itself.
//!
//! An offset is *done* when every record below it in its partition was
//! decided and its outcome (or dead letter) acknowledged by the broker, and
//! the decisions marked logged in the store. Only done offsets of partitions
//! this member still owns are committed: a partition revoked meanwhile is
//! left to its new owner, which redelivers (replays, harmless). What the
//! broker confirmed committed is remembered, so a revoke or a shutdown
//! commits exactly what is done and not yet committed.
//!
//! The one exception is the lab's unsafe arm `--unsafe-auto-commit`
//! ([`Offsets::leave_commits_to_the_timer`]): then nothing is committed by
//! hand and librdkafka's timer commits what poll handed out, decided or not.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// A topic and partition.
pub type Tp = (String, i32);

/// Why offsets are committed: the mode, the metric's label and what a
/// failure means follow from it.
#[derive(Debug, Clone, Copy)]
pub enum CommitCause {
    /// After a batch, in the configured mode (`--commit`).
    Batch(CommitMode),
    /// Partitions are being revoked: synchronous, before another member
    /// may take them.
    Revoke,
    /// The issuer stops: synchronous, before it leaves the group.
    Shutdown,
}

/// Per partition, what is done and what the broker has committed.
#[derive(Debug, Default)]
pub struct Offsets {
    state: Mutex<State>,
    /// `--unsafe-auto-commit`: librdkafka's timer commits, this never does.
    timer_commits: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Partitions this member owns now.
    assigned: HashSet<Tp>,
    /// Per partition, the next offset to commit: all below is done.
    done: HashMap<Tp, i64>,
    /// Per partition, the offset the broker reported committed.
    committed: HashMap<Tp, i64>,
}

impl Offsets {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// UNSAFE (the lab's `--unsafe-auto-commit`): commit nothing by hand from
    /// now on; the consumer's auto-commit timer commits instead.
    pub fn leave_commits_to_the_timer(&self) {
        self.timer_commits.store(true, Ordering::Relaxed);
    }

    /// Takes ownership of `partitions`; returns how many are owned now.
    pub fn assign(&self, partitions: impl IntoIterator<Item = Tp>) -> usize {
        let mut state = self.state();
        state.assigned.extend(partitions);
        state.assigned.len()
    }

    /// Partitions of `topic` owned now.
    pub fn owned_of(&self, topic: &str) -> usize {
        self.state()
            .assigned
            .iter()
            .filter(|(t, _)| t == topic)
            .count()
    }

    /// Forgets everything about `partitions` (revoked); returns how many
    /// are still owned.
    pub fn revoke(&self, partitions: &HashSet<Tp>) -> usize {
        let mut state = self.state();
        for tp in partitions {
            state.assigned.remove(tp);
            state.done.remove(tp);
            state.committed.remove(tp);
        }
        state.assigned.len()
    }

    /// Records a finished batch (`next`: one past its highest offset per
    /// partition) and returns the offsets to commit for it: those of
    /// partitions still owned.
    pub fn finish(&self, next: HashMap<Tp, i64>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let mut state = self.state();
        let State { assigned, done, .. } = &mut *state;
        for (tp, offset) in next {
            if !assigned.contains(&tp) {
                continue; // revoked meanwhile: its new owner redelivers (replays)
            }
            let e = done.entry(tp.clone()).or_insert(offset);
            *e = (*e).max(offset);
            let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(*e));
        }
        tpl
    }

    /// Offsets done but not yet committed (of `only`, if given).
    pub fn uncommitted(&self, only: Option<&HashSet<Tp>>) -> TopicPartitionList {
        let state = self.state();
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in &state.done {
            let committed = state.committed.get(tp).is_some_and(|c| c >= offset);
            if !committed && only.is_none_or(|o| o.contains(tp)) {
                let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(*offset));
            }
        }
        tpl
    }

    /// Records offsets the broker reported committed.
    pub fn mark_committed(&self, tpl: &TopicPartitionList) {
        let mut state = self.state();
        for e in tpl.elements() {
            if let Offset::Offset(o) = e.offset() {
                let c = state
                    .committed
                    .entry((e.topic().to_string(), e.partition()))
                    .or_insert(o);
                *c = (*c).max(o);
            }
        }
    }

    /// Commits `tpl` (nothing if it is empty) and records what the broker
    /// confirmed. A failed commit is logged, never fatal: it only means
    /// those records are redelivered and decided as replays.
    pub fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
        cause: CommitCause,
    ) {
        if tpl.count() == 0 || self.timer_commits.load(Ordering::Relaxed) {
            return;
        }
        let mode = match cause {
            CommitCause::Batch(mode) => mode,
            CommitCause::Revoke | CommitCause::Shutdown => CommitMode::Sync,
        };
        match consumer.commit(tpl, mode) {
            Ok(()) => {
                if matches!(mode, CommitMode::Sync) {
                    self.mark_committed(tpl);
                }
                let label = match cause {
                    CommitCause::Batch(CommitMode::Sync) => Some("sync"),
                    CommitCause::Batch(CommitMode::Async) => Some("async"),
                    CommitCause::Revoke => Some("revoke"),
                    CommitCause::Shutdown => None,
                };
                if let Some(label) = label {
                    metrics::counter!("couponrush_issuer_commits_total", "mode" => label)
                        .increment(1);
                }
            }
            Err(e) => match cause {
                CommitCause::Batch(_) => {
                    metrics::counter!("couponrush_issuer_commit_failures_total").increment(1);
                    tracing::warn!(error = %e, "commit failed; the records will be redelivered and decided as replays");
                }
                CommitCause::Revoke => {
                    metrics::counter!("couponrush_issuer_commit_failures_total").increment(1);
                    tracing::warn!(error = %e, "commit on revoke failed; the new owner will redeliver (decided as replays)");
                }
                CommitCause::Shutdown => {
                    tracing::warn!(error = %e, "final commit failed; those records will be redelivered (as replays)");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_string(), p)
    }

    fn offsets(tpl: &TopicPartitionList) -> Vec<(i32, Offset)> {
        let mut v: Vec<_> = tpl
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }

    #[test]
    fn only_owned_partitions_are_committed_and_never_backwards() {
        let o = Offsets::default();
        assert_eq!(o.assign([tp(0), tp(1)]), 2);
        let tpl = o.finish(HashMap::from([(tp(0), 10), (tp(2), 5)]));
        assert_eq!(
            offsets(&tpl),
            [(0, Offset::Offset(10))],
            "partition 2 is not ours"
        );
        let tpl = o.finish(HashMap::from([(tp(0), 7), (tp(1), 3)]));
        assert_eq!(
            offsets(&tpl),
            [(0, Offset::Offset(10)), (1, Offset::Offset(3))],
            "a lower offset never moves a partition back"
        );
    }

    #[test]
    fn what_is_committed_is_not_committed_again_and_a_revoke_forgets() {
        let o = Offsets::default();
        o.assign([tp(0), tp(1)]);
        let tpl = o.finish(HashMap::from([(tp(0), 10), (tp(1), 4)]));
        assert_eq!(o.uncommitted(None).count(), 2);
        o.mark_committed(&tpl);
        assert_eq!(o.uncommitted(None).count(), 0);
        o.finish(HashMap::from([(tp(1), 6)]));
        assert_eq!(offsets(&o.uncommitted(None)), [(1, Offset::Offset(6))]);
        let only_0 = HashSet::from([tp(0)]);
        assert_eq!(o.uncommitted(Some(&only_0)).count(), 0);
        assert_eq!(o.revoke(&HashSet::from([tp(1)])), 1);
        assert_eq!(
            o.uncommitted(None).count(),
            0,
            "a revoked partition is forgotten"
        );
    }
}
