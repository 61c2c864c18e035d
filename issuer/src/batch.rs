//! Turning a consumer batch into store calls and back: pure functions, tested
//! on hand-made data.
//!
//! [`Plan::new`] parses every record, sets poison aside, and groups the valid
//! requests by event *in the order they were read*, so each partition's
//! records reach the store in offset order. [`Plan::resolve`] maps the store's
//! verdicts back onto the records, one [`Disposition`] each.

use std::collections::HashMap;

use couponrush_core::store::{BatchVerdict, EventBatch, LoggedDecisions, Pending};
use couponrush_core::wire::{Outcome, Poison, WIRE_VERSION};
use couponrush_core::IssueRequest;

/// One record read from the requests topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, kept for the DLQ copy.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Vec<u8>,
}

/// What happens to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Decided: publish this outcome.
    Decided(Outcome),
    /// Cannot be decided: copy it to the DLQ with this reason.
    Dead(Poison),
}

enum Slot {
    Poison(Poison),
    Pending {
        batch: usize,
        position: usize,
        request: IssueRequest,
    },
}

/// The store calls for one consumer batch, and how to map their answers back.
pub struct Plan {
    /// One batch per event, requests in read order.
    pub batches: Vec<EventBatch>,
    slots: Vec<Slot>,
}

impl Plan {
    /// Parses `records` and groups the valid ones by event.
    pub fn new(records: &[Received]) -> Self {
        let mut batches: Vec<EventBatch> = Vec::new();
        let mut by_event: HashMap<String, usize> = HashMap::new();
        let slots = records
            .iter()
            .map(|r| match IssueRequest::parse(&r.payload) {
                Err(p) => Slot::Poison(p),
                Ok(request) => {
                    let batch = *by_event.entry(request.event_id.clone()).or_insert_with(|| {
                        batches.push(EventBatch {
                            event_id: request.event_id.clone(),
                            requests: Vec::new(),
                        });
                        batches.len() - 1
                    });
                    let position = batches[batch].requests.len();
                    batches[batch].requests.push(Pending {
                        request_id: request.request_id,
                        user_id: request.user_id.clone(),
                    });
                    Slot::Pending {
                        batch,
                        position,
                        request,
                    }
                }
            })
            .collect();
        Plan { batches, slots }
    }

    /// Number of records that reach the store.
    pub fn pending(&self) -> usize {
        self.batches.iter().map(|b| b.requests.len()).sum()
    }

    /// One disposition per record, in record order. `verdicts` must be the
    /// store's answer to [`Plan::batches`].
    pub fn resolve(&self, records: &[Received], verdicts: &[BatchVerdict]) -> Vec<Disposition> {
        assert_eq!(verdicts.len(), self.batches.len(), "one verdict per batch");
        self.slots
            .iter()
            .zip(records)
            .map(|(slot, rec)| match slot {
                Slot::Poison(p) => Disposition::Dead(p.clone()),
                Slot::Pending {
                    batch,
                    position,
                    request,
                } => match &verdicts[*batch] {
                    BatchVerdict::UnknownEvent => {
                        Disposition::Dead(Poison::UnknownEvent(request.event_id.clone()))
                    }
                    BatchVerdict::Decided {
                        generation,
                        decisions,
                    } => {
                        let d = decisions[*position];
                        Disposition::Decided(Outcome {
                            v: WIRE_VERSION,
                            request_id: request.request_id,
                            event_id: request.event_id.clone(),
                            user_id: request.user_id.clone(),
                            result: d.result,
                            issued_rank: d.issued_rank,
                            partition: rec.partition,
                            offset: rec.offset,
                            decided_at: d.decided_at,
                            replay: d.replay,
                            decision_seq: d.seq,
                            accepted_at: request.accepted_at,
                            generation: *generation,
                        })
                    }
                },
            })
            .collect()
    }
}

/// The decisions to mark logged once their outcomes are acknowledged:
/// every decided request but `duplicate`s (whose id belongs to another
/// request, whose own outcome marks it), by event and by the generation
/// they were decided in (so a batch acknowledged after a reset marks
/// nothing of the new generation).
pub fn logged_decisions(dispositions: &[Disposition]) -> Vec<LoggedDecisions> {
    let mut by_event: HashMap<(&str, u64), Vec<(uuid::Uuid, u64)>> = HashMap::new();
    for d in dispositions {
        if let Disposition::Decided(o) = d {
            if o.result != couponrush_core::DecisionResult::Duplicate {
                by_event
                    .entry((&o.event_id, o.generation))
                    .or_default()
                    .push((o.request_id, o.decision_seq));
            }
        }
    }
    by_event
        .into_iter()
        .map(|((event_id, generation), decisions)| LoggedDecisions {
            event_id: event_id.to_string(),
            generation,
            decisions,
        })
        .collect()
}

/// The offset to commit per partition: one past the highest offset seen.
pub fn next_offsets(records: &[Received]) -> HashMap<(String, i32), i64> {
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    for r in records {
        let e = next.entry((r.topic.clone(), r.partition)).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use couponrush_core::store::Decision;
    use couponrush_core::DecisionResult;
    use uuid::Uuid;

    fn rec(partition: i32, offset: i64, payload: &[u8]) -> Received {
        Received {
            topic: "t".into(),
            partition,
            offset,
            key: None,
            payload: payload.to_vec(),
        }
    }

    fn req(event: &str, user: &str) -> IssueRequest {
        IssueRequest::new(Uuid::now_v7(), event.into(), user.into(), 10)
    }

    fn decided(result: DecisionResult, rank: Option<u32>) -> Decision {
        Decision {
            result,
            issued_rank: rank,
            decided_at: 99,
            replay: false,
            seq: 1,
            logged: false,
        }
    }

    #[test]
    fn groups_by_event_in_read_order_and_maps_back() {
        let (a1, b1, a2) = (req("a", "u1"), req("b", "u2"), req("a", "u3"));
        let records = vec![
            rec(0, 5, &a1.to_bytes()),
            rec(1, 7, &b1.to_bytes()),
            rec(0, 6, b"garbage"),
            rec(2, 1, &a2.to_bytes()),
        ];
        let plan = Plan::new(&records);
        assert_eq!(plan.batches.len(), 2);
        assert_eq!(plan.batches[0].event_id, "a");
        let ids: Vec<Uuid> = plan.batches[0]
            .requests
            .iter()
            .map(|p| p.request_id)
            .collect();
        assert_eq!(ids, [a1.request_id, a2.request_id]);
        assert_eq!(plan.pending(), 3);

        let verdicts = [
            BatchVerdict::Decided {
                generation: 3,
                decisions: vec![
                    decided(DecisionResult::Issued, Some(1)),
                    decided(DecisionResult::SoldOut, None),
                ],
            },
            BatchVerdict::UnknownEvent,
        ];
        let out = plan.resolve(&records, &verdicts);
        match &out[0] {
            Disposition::Decided(o) => {
                assert_eq!(o.request_id, a1.request_id);
                assert_eq!((o.partition, o.offset), (0, 5));
                assert_eq!(o.issued_rank, Some(1));
                assert_eq!(o.accepted_at, 10);
                assert_eq!(o.generation, 3);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[1], Disposition::Dead(Poison::UnknownEvent("b".into())));
        let logged = logged_decisions(&out);
        assert_eq!(logged.len(), 1);
        assert_eq!(
            logged[0].generation, 3,
            "marked in the verdict's generation"
        );
        assert_eq!(
            logged[0].decisions,
            [(a1.request_id, 1), (a2.request_id, 1)]
        );
        assert!(matches!(out[2], Disposition::Dead(Poison::Malformed(_))));
        match &out[3] {
            Disposition::Decided(o) => {
                assert_eq!(o.request_id, a2.request_id);
                assert_eq!(o.result, DecisionResult::SoldOut);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commits_one_past_the_highest_offset_per_partition() {
        let records = vec![
            rec(0, 5, b""),
            rec(1, 2, b""),
            rec(0, 9, b""),
            rec(0, 7, b""),
        ];
        let next = next_offsets(&records);
        assert_eq!(next[&("t".to_string(), 0)], 10);
        assert_eq!(next[&("t".to_string(), 1)], 3);
    }
}
