//! Offset bookkeeping: which ledger records are handled, and what may be
//! committed.
//!
//! Deliveries run concurrently and finish in any order, but a partition's
//! offset is committed **only up to its lowest record not yet handled**: a
//! record is handled when the endpoint acknowledged it, or it was
//! dead-lettered and the broker acknowledged the dead letter, or it needs
//! no delivery (skipped). So what is committed never passes over a coupon
//! that is still on its way; a crash costs deliveries again, never a lost
//! one. Only the records in flight are remembered (a skipped record is
//! handled at once), so the bookkeeping is bounded by `--max-in-flight`.
//!
//! Each assignment of a partition gets an *epoch* and a cancellation token.
//! A revoke cancels the token (deliveries still in flight are abandoned:
//! their next reader delivers them again) and forgets the partition; a
//! delivery finishing after that, or after the partition came back under a
//! new epoch, changes nothing.
//!
//! The lab's unsafe arm `--unsafe-commit-on-receipt`
//! ([`Offsets::commit_on_receipt`]) commits every record read, handled or
//! not: a crash then loses the coupons in flight. It exists to show that
//! the tests catch exactly that.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// A topic and partition.
pub type Tp = (String, i32);

/// One record being handled: finish it with [`Offsets::finish`] once it
/// is acknowledged or dead-lettered.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Its partition.
    pub tp: Tp,
    /// The assignment it was read under.
    pub epoch: u64,
    /// Its offset.
    pub offset: i64,
    /// Cancelled when the partition is revoked or the notifier gives up
    /// waiting at shutdown: stop, leave the record unhandled.
    pub cancel: CancellationToken,
}

/// Why offsets are committed (the metric's label and what a failure means).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitCause {
    /// Every `--commit-every`, while running.
    Periodic,
    /// Partitions are being revoked.
    Revoke,
    /// The notifier stops.
    Shutdown,
}

impl CommitCause {
    fn label(self) -> &'static str {
        match self {
            CommitCause::Periodic => "periodic",
            CommitCause::Revoke => "revoke",
            CommitCause::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug)]
struct Partition {
    epoch: u64,
    /// Offsets read and not yet handled.
    in_flight: BTreeSet<i64>,
    /// One past the highest offset read.
    next: Option<i64>,
    /// The offset the broker confirmed committed.
    committed: Option<i64>,
    cancel: CancellationToken,
}

impl Partition {
    /// The offset that may be committed: the lowest not handled, else one
    /// past the highest read.
    fn committable(&self, on_receipt: bool) -> Option<i64> {
        if on_receipt {
            return self.next;
        }
        self.in_flight.first().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
struct State {
    parts: HashMap<Tp, Partition>,
    epochs: u64,
    in_flight: usize,
}

/// Per owned partition, what is in flight, handled and committed.
#[derive(Debug, Default)]
pub struct Offsets {
    state: Mutex<State>,
    changed: Condvar,
    on_receipt: bool,
}

impl Offsets {
    /// UNSAFE (the lab's `--unsafe-commit-on-receipt`): offsets that commit
    /// every record read, handled or not.
    pub fn commit_on_receipt() -> Self {
        Self {
            on_receipt: true,
            ..Self::default()
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes ownership of `partitions`, each under a new epoch and a token
    /// that is a child of `parent`; returns how many are owned now.
    pub fn assign(
        &self,
        partitions: impl IntoIterator<Item = Tp>,
        parent: &CancellationToken,
    ) -> usize {
        let mut state = self.state();
        for tp in partitions {
            state.epochs += 1;
            let epoch = state.epochs;
            if let Some(old) = state.parts.insert(
                tp,
                Partition {
                    epoch,
                    in_flight: BTreeSet::new(),
                    next: None,
                    committed: None,
                    cancel: parent.child_token(),
                },
            ) {
                // Assigned twice without a revoke: the old epoch's
                // deliveries no longer count.
                old.cancel.cancel();
                state.in_flight -= old.in_flight.len();
            }
        }
        state.parts.len()
    }

    /// Abandons what is in flight on `partitions` and forgets them; returns
    /// how many partitions are still owned and how many records were
    /// abandoned.
    pub fn revoke(&self, partitions: &HashSet<Tp>) -> (usize, usize) {
        let mut state = self.state();
        let mut abandoned = 0;
        for tp in partitions {
            if let Some(p) = state.parts.remove(tp) {
                p.cancel.cancel();
                abandoned += p.in_flight.len();
            }
        }
        state.in_flight -= abandoned;
        let owned = state.parts.len();
        drop(state);
        self.changed.notify_all();
        (owned, abandoned)
    }

    /// The epoch `tp` is owned under, if it is owned.
    pub fn epoch(&self, tp: &Tp) -> Option<u64> {
        self.state().parts.get(tp).map(|p| p.epoch)
    }

    /// Starts handling the record at `offset`, read under `epoch`; `None`
    /// if the partition is no longer owned under that epoch (drop the
    /// record: its next reader reads it again).
    pub fn begin(&self, tp: &Tp, epoch: u64, offset: i64) -> Option<Ticket> {
        let mut state = self.state();
        let p = state.parts.get_mut(tp).filter(|p| p.epoch == epoch)?;
        let cancel = p.cancel.clone();
        if p.in_flight.insert(offset) {
            p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
            state.in_flight += 1;
        }
        Some(Ticket {
            tp: tp.clone(),
            epoch,
            offset,
            cancel,
        })
    }

    /// The record of `ticket` is handled.
    pub fn finish(&self, ticket: &Ticket) {
        let mut state = self.state();
        let removed = state
            .parts
            .get_mut(&ticket.tp)
            .filter(|p| p.epoch == ticket.epoch)
            .is_some_and(|p| p.in_flight.remove(&ticket.offset));
        if removed {
            state.in_flight -= 1;
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Records in flight on every owned partition.
    pub fn in_flight(&self) -> usize {
        self.state().in_flight
    }

    /// Waits up to `timeout` until fewer than `limit` records are in flight;
    /// true if they are.
    pub fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let state = self.state();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.in_flight >= limit)
            .unwrap_or_else(PoisonError::into_inner);
        state.in_flight < limit
    }

    /// Waits up to `timeout` until nothing is in flight on `only` (every
    /// owned partition if `None`); true if so.
    pub fn wait_idle(&self, only: Option<&HashSet<Tp>>, timeout: Duration) -> bool {
        let busy = |s: &mut State| {
            s.parts
                .iter()
                .any(|(tp, p)| only.is_none_or(|o| o.contains(tp)) && !p.in_flight.is_empty())
        };
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while busy(&mut state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Offsets handled but not yet committed (of `only`, if given).
    pub fn uncommitted(&self, only: Option<&HashSet<Tp>>) -> TopicPartitionList {
        let state = self.state();
        let mut tpl = TopicPartitionList::new();
        for (tp, p) in &state.parts {
            if only.is_some_and(|o| !o.contains(tp)) {
                continue;
            }
            if let Some(offset) = p.committable(self.on_receipt) {
                if p.committed.is_none_or(|c| c < offset) {
                    let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset));
                }
            }
        }
        tpl
    }

    /// Records offsets the broker confirmed committed.
    pub fn mark_committed(&self, tpl: &TopicPartitionList) {
        let mut state = self.state();
        for e in tpl.elements() {
            if let Offset::Offset(o) = e.offset() {
                if let Some(p) = state.parts.get_mut(&(e.topic().to_string(), e.partition())) {
                    p.committed = Some(p.committed.map_or(o, |c| c.max(o)));
                }
            }
        }
    }

    /// Commits `tpl` synchronously (nothing if empty) and records what the
    /// broker confirmed. A failed commit is logged, never fatal: those
    /// records are delivered again after a restart or a rebalance, and the
    /// endpoint's dedup makes that harmless.
    pub fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
        cause: CommitCause,
    ) {
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(tpl, CommitMode::Sync) {
            Ok(()) => {
                self.mark_committed(tpl);
                metrics::counter!("couponrush_notifier_commits_total", "cause" => cause.label())
                    .increment(1);
            }
            Err(e) => {
                metrics::counter!("couponrush_notifier_commit_failures_total", "cause" => cause.label())
                    .increment(1);
                tracing::warn!(error = %e, cause = cause.label(), "commit failed; those records will be delivered again (the endpoint dedups them by key)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("outcomes".to_string(), p)
    }

    fn committable(o: &Offsets) -> Vec<(i32, i64)> {
        let mut v: Vec<_> = o
            .uncommitted(None)
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(x) => Some((e.partition(), x)),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_commit_stops_at_the_lowest_record_in_flight() {
        let root = CancellationToken::new();
        let o = Offsets::default();
        o.assign([tp(0)], &root);
        let e = o.epoch(&tp(0)).unwrap();
        let tickets: Vec<Ticket> = (10..15)
            .map(|off| o.begin(&tp(0), e, off).unwrap())
            .collect();
        assert_eq!(committable(&o), [(0, 10)], "nothing handled yet");
        // Later records finish first: the commit must not pass offset 10.
        for t in &tickets[1..] {
            o.finish(t);
        }
        assert_eq!(committable(&o), [(0, 10)]);
        o.finish(&tickets[0]);
        assert_eq!(committable(&o), [(0, 15)]);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn on_receipt_commits_what_is_still_in_flight() {
        let root = CancellationToken::new();
        let o = Offsets::commit_on_receipt();
        o.assign([tp(0)], &root);
        let e = o.epoch(&tp(0)).unwrap();
        let _t = o.begin(&tp(0), e, 3).unwrap();
        assert_eq!(committable(&o), [(0, 4)], "the unsafe arm passes over it");
    }

    #[test]
    fn what_is_committed_is_not_committed_again() {
        let root = CancellationToken::new();
        let o = Offsets::default();
        o.assign([tp(0), tp(1)], &root);
        let t = o.begin(&tp(0), o.epoch(&tp(0)).unwrap(), 5).unwrap();
        o.finish(&t);
        let tpl = o.uncommitted(None);
        assert_eq!(committable(&o), [(0, 6)]);
        o.mark_committed(&tpl);
        assert!(committable(&o).is_empty());
    }

    #[test]
    fn a_revoke_abandons_its_deliveries_and_a_late_finish_changes_nothing() {
        let root = CancellationToken::new();
        let o = Offsets::default();
        o.assign([tp(0), tp(1)], &root);
        let e0 = o.epoch(&tp(0)).unwrap();
        let t0 = o.begin(&tp(0), e0, 1).unwrap();
        let t1 = o.begin(&tp(1), o.epoch(&tp(1)).unwrap(), 1).unwrap();
        assert_eq!(o.in_flight(), 2);
        assert!(!o.wait_idle(Some(&HashSet::from([tp(0)])), Duration::from_millis(10)));
        assert_eq!(o.revoke(&HashSet::from([tp(0)])), (1, 1));
        assert!(t0.cancel.is_cancelled() && !t1.cancel.is_cancelled());
        assert_eq!(o.in_flight(), 1);
        // The partition comes back under a new epoch: the old ticket is void.
        o.assign([tp(0)], &root);
        assert_ne!(o.epoch(&tp(0)), Some(e0));
        assert!(o.begin(&tp(0), e0, 2).is_none(), "read under the old epoch");
        o.finish(&t0);
        assert_eq!(o.in_flight(), 1);
        assert!(committable(&o).iter().all(|(p, _)| *p != 0));
        o.finish(&t1);
        assert!(o.wait_idle(None, Duration::from_millis(10)));
        assert!(o.wait_below(1, Duration::from_millis(10)));
    }

    #[test]
    fn shutdown_cancels_every_partition() {
        let root = CancellationToken::new();
        let o = Offsets::default();
        o.assign([tp(0)], &root);
        let t = o.begin(&tp(0), o.epoch(&tp(0)).unwrap(), 0).unwrap();
        root.cancel();
        assert!(t.cancel.is_cancelled());
    }
}
