//! Turning a consumer batch into store calls and back: pure functions, tested
//! on hand-made data.
//!
//! [`Plan::new`] parses every record, sets poison aside, and groups the valid
//! requests and hold actions (records of the compensations topic) by event
//! *in the order they were read*, so each partition's records reach the
//! store in offset order; an event's actions and requests go to the store
//! in one step, actions first. [`Plan::resolve`] maps the store's verdicts
//! back onto the records, one [`Disposition`] each: an action that moved a
//! hold (or restates its end) is a [`HoldOutcome`] to publish, one that
//! decided nothing publishes nothing.

use std::collections::HashMap;

use couponrush_core::store::{BatchVerdict, EventBatch, LoggedDecisions, Pending, PendingAction};
use couponrush_core::wire::{HoldAction, HoldOutcome, Outcome, Poison, HOLD_KIND, WIRE_VERSION};
use couponrush_core::{topics, DecisionResult, IssueRequest};

use crate::experiment::Arms;

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
    /// A hold action that ended a hold (or restates its end): publish it.
    Hold(HoldOutcome),
    /// A hold action that decided nothing: nothing to publish.
    Nothing,
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
    Action {
        batch: usize,
        position: usize,
        action: HoldAction,
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
        Self::with_arms(records, &Arms::default(), topics::COMPENSATIONS)
    }

    /// [`Plan::new`], with the store ids an experiment's [`Arms`] choose
    /// (a fresh id per delivery with `--unsafe-no-dedup`; the outcomes keep
    /// the request's own id, so the audit sees the second decision).
    /// Records read from `actions_topic` are hold actions, the others
    /// requests.
    pub fn with_arms(records: &[Received], arms: &Arms, actions_topic: &str) -> Self {
        let mut batches: Vec<EventBatch> = Vec::new();
        let mut by_event: HashMap<String, usize> = HashMap::new();
        let mut batch_of = |event_id: &str| {
            *by_event.entry(event_id.to_string()).or_insert_with(|| {
                batches.push(EventBatch::requests(event_id, Vec::new()));
                batches.len() - 1
            })
        };
        let mut slots = Vec::with_capacity(records.len());
        let mut actions: Vec<(usize, PendingAction)> = Vec::new();
        let mut requests: Vec<(usize, Pending)> = Vec::new();
        // Per batch: actions and requests so far.
        let mut counts: HashMap<usize, (usize, usize)> = HashMap::new();
        for r in records {
            if r.topic == actions_topic {
                slots.push(match HoldAction::parse(&r.payload) {
                    Err(p) => Slot::Poison(p),
                    Ok(action) => {
                        let batch = batch_of(&action.event_id);
                        let c = counts.entry(batch).or_default();
                        let position = c.0;
                        c.0 += 1;
                        actions.push((
                            batch,
                            PendingAction {
                                request_id: action.request_id,
                                user_id: action.user_id.clone(),
                                verb: action.action,
                                at: action.at,
                            },
                        ));
                        Slot::Action {
                            batch,
                            position,
                            action,
                        }
                    }
                });
                continue;
            }
            slots.push(match IssueRequest::parse(&r.payload) {
                Err(p) => Slot::Poison(p),
                Ok(request) => {
                    let batch = batch_of(&request.event_id);
                    let c = counts.entry(batch).or_default();
                    let position = c.1;
                    c.1 += 1;
                    requests.push((
                        batch,
                        Pending {
                            request_id: arms.store_id(request.request_id),
                            user_id: request.user_id.clone(),
                        },
                    ));
                    Slot::Pending {
                        batch,
                        position,
                        request,
                    }
                }
            });
        }
        for (batch, a) in actions {
            batches[batch].actions.push(a);
        }
        for (batch, p) in requests {
            batches[batch].requests.push(p);
        }
        Plan { batches, slots }
    }

    /// Number of records that reach the store.
    pub fn pending(&self) -> usize {
        self.batches
            .iter()
            .map(|b| b.requests.len() + b.actions.len())
            .sum()
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
                        claim_window_us,
                        ..
                    } => {
                        let d = decisions[*position];
                        let held = d.result == DecisionResult::Issued && *claim_window_us > 0;
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
                            hold_until: held.then(|| d.decided_at + claim_window_us),
                        })
                    }
                },
                Slot::Action {
                    batch,
                    position,
                    action,
                } => match &verdicts[*batch] {
                    BatchVerdict::UnknownEvent => {
                        Disposition::Dead(Poison::UnknownEvent(action.event_id.clone()))
                    }
                    BatchVerdict::Decided {
                        generation, holds, ..
                    } => match holds[*position] {
                        None => Disposition::Nothing,
                        Some(end) => Disposition::Hold(HoldOutcome {
                            v: WIRE_VERSION,
                            kind: HOLD_KIND.into(),
                            request_id: action.request_id,
                            event_id: action.event_id.clone(),
                            user_id: action.user_id.clone(),
                            state: end.state,
                            issued_rank: end.rank,
                            partition: rec.partition,
                            offset: rec.offset,
                            action_at: action.at,
                            decided_at: end.decided_at,
                            replay: end.replay,
                            decision_seq: end.seq,
                            generation: *generation,
                        }),
                    },
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
        match d {
            Disposition::Decided(o) if o.result != DecisionResult::Duplicate => by_event
                .entry((&o.event_id, o.generation))
                .or_default()
                .push((o.request_id, o.decision_seq)),
            Disposition::Hold(h) => by_event
                .entry((&h.event_id, h.generation))
                .or_default()
                .push((h.request_id, h.decision_seq)),
            _ => {}
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
                holds: vec![],
                claim_window_us: 0,
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
    fn without_dedup_each_delivery_reaches_the_store_under_a_new_id_and_the_outcome_keeps_its_own()
    {
        let r = req("a", "u1");
        let records = vec![rec(0, 1, &r.to_bytes()), rec(0, 2, &r.to_bytes())];
        let safe = Plan::new(&records);
        assert_eq!(safe.batches[0].requests[0].request_id, r.request_id);
        assert_eq!(safe.batches[0].requests[1].request_id, r.request_id);
        let arms = Arms {
            unsafe_no_dedup: true,
            ..Arms::default()
        };
        let plan = Plan::with_arms(&records, &arms, "t.compensations");
        let ids: Vec<Uuid> = plan.batches[0]
            .requests
            .iter()
            .map(|p| p.request_id)
            .collect();
        assert!(ids[0] != ids[1] && !ids.contains(&r.request_id), "{ids:?}");
        let verdicts = [BatchVerdict::Decided {
            generation: 1,
            decisions: vec![
                decided(DecisionResult::Issued, Some(1)),
                decided(DecisionResult::Issued, Some(2)),
            ],
            holds: vec![],
            claim_window_us: 0,
        }];
        for d in plan.resolve(&records, &verdicts) {
            let Disposition::Decided(o) = d else {
                panic!("{d:?}")
            };
            assert_eq!(
                o.request_id, r.request_id,
                "the audit sees the same request twice"
            );
        }
    }

    #[test]
    fn an_events_actions_and_requests_go_to_the_store_together_actions_first() {
        use couponrush_core::store::HoldEnd;
        use couponrush_core::wire::{HoldAction, HoldState, HoldVerb};
        let topic = "t.compensations";
        let action = |verb, id, user: &str| {
            HoldAction::new(verb, id, "a".into(), user.into(), 50).to_bytes()
        };
        let (held, other) = (Uuid::now_v7(), Uuid::now_v7());
        let r = req("a", "u9");
        let mut records = vec![
            rec(0, 1, &r.to_bytes()),
            rec(0, 2, &action(HoldVerb::Cancel, held, "u1")),
            rec(1, 3, &action(HoldVerb::Claim, other, "u2")),
            rec(1, 4, b"not an action"),
        ];
        for r in &mut records[1..] {
            r.topic = topic.into();
        }
        let plan = Plan::with_arms(&records, &Arms::default(), topic);
        assert_eq!(plan.batches.len(), 1, "one store step for the event");
        let b = &plan.batches[0];
        assert_eq!(b.requests.len(), 1);
        let verbs: Vec<(Uuid, HoldVerb, u64)> = b
            .actions
            .iter()
            .map(|a| (a.request_id, a.verb, a.at))
            .collect();
        assert_eq!(
            verbs,
            [(held, HoldVerb::Cancel, 50), (other, HoldVerb::Claim, 50)]
        );
        let end = HoldEnd {
            state: HoldState::Released,
            rank: 4,
            decided_at: 60,
            replay: false,
            seq: 7,
        };
        let verdicts = [BatchVerdict::Decided {
            generation: 2,
            decisions: vec![Decision {
                seq: 8,
                ..decided(DecisionResult::Issued, Some(4))
            }],
            holds: vec![Some(end), None],
            claim_window_us: 1000,
        }];
        let out = plan.resolve(&records, &verdicts);
        let Disposition::Decided(o) = &out[0] else {
            panic!("{:?}", out[0])
        };
        assert_eq!(
            o.hold_until,
            Some(99 + 1000),
            "held until decided_at + window"
        );
        let Disposition::Hold(h) = &out[1] else {
            panic!("{:?}", out[1])
        };
        assert_eq!(
            (
                h.request_id,
                h.state,
                h.issued_rank,
                h.decision_seq,
                h.generation
            ),
            (held, HoldState::Released, 4, 7, 2)
        );
        assert_eq!(
            (h.kind.as_str(), h.user_id.as_str(), h.action_at),
            ("hold", "u1", 50)
        );
        assert_eq!((h.partition, h.offset), (0, 2));
        assert_eq!(
            out[2],
            Disposition::Nothing,
            "decided nothing, publishes nothing"
        );
        assert!(matches!(out[3], Disposition::Dead(Poison::Malformed(_))));
        let logged = logged_decisions(&out);
        let mut seqs: Vec<(Uuid, u64)> = logged[0].decisions.clone();
        seqs.sort_by_key(|(_, s)| *s);
        assert_eq!(
            seqs,
            [(held, 7), (r.request_id, 8)],
            "hold ends are marked logged too"
        );
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
