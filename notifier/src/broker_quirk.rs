//! A broker quirk, worked around here so
//! the loop reads as the loop. Apache Kafka does not have it; against it
//! this only ever forgets partitions that delivered their first record.
//!
//! ## tansu 0.6 answers a fetch from the middle of the last batch with nothing
//! Asked to fetch from an offset in the middle of a producer batch, tansu
//! 0.6.0 answers with the *next* batch (`core/tests/read_log.rs` pins it).
//! The issuer's [`ResumeGuard`] catches that when the next batch's first
//! record arrives beyond the committed offset, and rewinds. But when the
//! batch is the partition's **last**, there is no next batch: the fetch
//! returns nothing, no record ever arrives to be checked, and the records
//! between the committed offset and the end wait until something new is
//! written to that partition: at the end of a drop, never. The last coupons
//! of a partition would stay undelivered after a restart. (The issuer's
//! guard now rewinds a silent partition too, since CI's `reused-key` lost a
//! request that way.)
//!
//! [`TailWatch`] keeps: **a partition from which no record at all has
//! arrived within [`QUIET`] of its assignment (or resumption) is rewound**,
//! by 1000 records from where it starts (doubling while it stays silent),
//! so the fetch starts at or before a batch's first record. The records
//! below the starting offset that come back are skipped by the
//! [`ResumeGuard`], which is still waiting for the starting offset itself.
//! tansu 0.6's high watermark cannot tell whether anything is there (it
//! answers 1 for a partition of 20 records in one batch), so the watch does
//! not ask: on a partition that is simply idle, the rewind costs one re-read
//! of up to 1000 records, all skipped, and the first of them ends the watch.
//!
//! [`ResumeGuard`]: couponrush_issuer::broker_quirk::ResumeGuard

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use couponrush_issuer::broker_quirk::patience;

use crate::offsets::Tp;

/// How long a partition may wait for its first record before it is checked.
pub const QUIET: Duration = Duration::from_secs(2);

/// First rewind; doubled on each further stall of the same partition.
const REWIND: i64 = 1000;

/// Timeout of the broker requests a check makes from the loop's thread.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
struct Waiting {
    /// Where the first record must come from (the committed offset or the
    /// position it resumed at); `None` if not known yet.
    from: Option<i64>,
    /// Since when (or since the last rewind) it has waited.
    since: Instant,
    /// How far back the last rewind went (0: none yet).
    rewind: i64,
    /// How many rewinds were applied.
    rewinds: u32,
}

/// Partitions waiting for their first record.
#[derive(Debug, Default)]
pub struct TailWatch {
    waiting: Mutex<HashMap<Tp, Waiting>>,
}

impl TailWatch {
    fn waiting(&self) -> MutexGuard<'_, HashMap<Tp, Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `partitions` were just assigned: their starting offset is the
    /// committed one (looked up when checked).
    pub fn on_assign(&self, partitions: impl IntoIterator<Item = Tp>) {
        let now = Instant::now();
        let mut waiting = self.waiting();
        for tp in partitions {
            waiting.insert(
                tp,
                Waiting {
                    from: None,
                    since: now,
                    rewind: 0,
                    rewinds: 0,
                },
            );
        }
    }

    /// Paused partitions were resumed: each starts again from the
    /// application's position.
    pub fn on_resume<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let Ok(positions) = consumer.position() else {
            return;
        };
        let now = Instant::now();
        let mut waiting = self.waiting();
        for e in positions.elements() {
            if let Offset::Offset(o) = e.offset() {
                waiting.insert(
                    (e.topic().to_string(), e.partition()),
                    Waiting {
                        from: Some(o),
                        since: now,
                        rewind: 0,
                        rewinds: 0,
                    },
                );
            }
        }
    }

    /// A record of `tp` arrived (admitted or skipped by the
    /// `ResumeGuard`): its fetch works.
    pub fn seen(&self, tp: &Tp) {
        let mut waiting = self.waiting();
        if !waiting.is_empty() {
            waiting.remove(tp);
        }
    }

    /// `partitions` were revoked.
    pub fn forget(&self, partitions: &HashSet<Tp>) {
        let mut waiting = self.waiting();
        for tp in partitions {
            waiting.remove(tp);
        }
    }

    /// Rewinds every partition that has waited [`QUIET`] without a record
    /// (doubled by each rewind applied, see `patience`: its re-read waits for
    /// the fetch in flight, which tansu may hold for seconds, and a rewind
    /// meanwhile throws it away). Call it from the loop's thread when a
    /// poll came back empty.
    pub fn check<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let now = Instant::now();
        let patience = |w: &Waiting| patience(QUIET, w.rewinds);
        let due: Vec<(Tp, Waiting)> = self
            .waiting()
            .iter()
            .filter(|(_, w)| now.duration_since(w.since) >= patience(w))
            .map(|(tp, w)| (tp.clone(), *w))
            .collect();
        for (tp, w) in due {
            let from = w.from.or_else(|| committed(consumer, &tp));
            let (topic, partition) = (&tp.0, tp.1);
            let mut waiting = self.waiting();
            let Some(entry) = waiting.get_mut(&tp) else {
                continue; // seen or revoked meanwhile
            };
            // No committed offset (the fetch starts at the log's start, a
            // batch boundary) or nothing below it: nothing to rewind to.
            let Some(from) = from.filter(|f| *f > 0) else {
                waiting.remove(&tp);
                continue;
            };
            entry.from = Some(from);
            entry.since = now;
            let next = if entry.rewind == 0 {
                REWIND
            } else {
                entry.rewind * 2
            };
            let target = (from - next).max(0);
            drop(waiting);
            metrics::counter!("couponrush_notifier_broker_stalls_total").increment(1);
            tracing::info!(
                partition,
                from,
                rewind_to = target,
                waited = ?patience(&w),
                "no record since the partition was assigned, resumed or rewound; rewinding \
                 in case the broker is tansu 0.6, which answers a fetch from the middle of its \
                 last batch with nothing"
            );
            match consumer.seek(topic, partition, Offset::Offset(target), REQUEST_TIMEOUT) {
                Ok(()) => {
                    if let Some(entry) = self.waiting().get_mut(&tp) {
                        entry.rewind = next;
                        entry.rewinds += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, partition, "rewind failed; retrying when it has been silent again")
                }
            }
        }
    }
}

/// The group's committed offset of `tp`, if there is one.
fn committed<C: ConsumerContext>(consumer: &BaseConsumer<C>, tp: &Tp) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let committed = consumer.committed_offsets(tpl, REQUEST_TIMEOUT).ok()?;
    let e = committed.find_partition(&tp.0, tp.1)?;
    match e.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_leaves_the_watch_with_its_first_record_or_its_revoke() {
        let w = TailWatch::default();
        let tp = |p| ("t".to_string(), p);
        w.on_assign([tp(0), tp(1), tp(2)]);
        w.seen(&tp(0));
        w.forget(&HashSet::from([tp(1)]));
        let left: Vec<Tp> = w.waiting().keys().cloned().collect();
        assert_eq!(left, [tp(2)]);
    }
}
