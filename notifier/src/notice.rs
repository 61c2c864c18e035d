//! What the notifier delivers: a final coupon, read off the ledger.
//!
//! A coupon is **final** when nothing can send it back to stock: an
//! `issued` decision of an event without holds (`hold_until` absent), or a
//! hold record in state `claimed`. Everything else on `coupon.outcomes` is
//! skipped: decisions that issued nothing (`sold_out`, `limit_reached`,
//! `duplicate`), coupons still held (their claim, if it comes, is a record of
//! its own), and holds released or expired (the coupon went back to stock).
//!
//! **One coupon, one key.** [`Notice::idempotency_key`] is
//! `{event_id}:{generation}:{request_id}`: a replayed outcome (`replay:
//! true`, the issuer restating a decision after a redelivery) is the same
//! coupon and gets the same key, so the endpoint can keep the first
//! delivery and acknowledge the rest without acting on them. The generation
//! is part of the key because an event reset starts the ranks again: the
//! same request id in a new generation is a different coupon.

use std::fmt;

use couponrush_core::wire::{HoldState, LedgerRecord};
use couponrush_core::DecisionResult;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How a coupon became final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalState {
    /// Issued by an event without holds: final at once.
    Issued,
    /// Held, then claimed by its holder in time.
    Claimed,
}

impl FinalState {
    /// The snake_case name used in the body and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FinalState::Issued => "issued",
            FinalState::Claimed => "claimed",
        }
    }
}

/// The webhook's body: one final coupon. Zero payload, like the ledger:
/// ids, the rank and when it was decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The drop.
    pub event_id: String,
    /// The request that won the coupon.
    pub request_id: Uuid,
    /// Who holds it.
    pub user_id: String,
    /// Which of the stock it is (1..=stock).
    pub issued_rank: u32,
    /// The event's generation (a reset starts a new one).
    pub generation: u64,
    /// `issued` or `claimed`.
    pub state: FinalState,
    /// When the store made it final, µs since the epoch (the decision, or
    /// the claim).
    pub decided_at: u64,
    /// True when read from a replayed outcome; not sent.
    #[serde(skip)]
    pub replay: bool,
}

impl Notice {
    /// `{event_id}:{generation}:{request_id}`: the same for every record of
    /// one coupon, replays included.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}:{}", self.event_id, self.generation, self.request_id)
    }

    /// The JSON body posted to the webhook.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a notice always serializes")
    }
}

/// Why a ledger record is not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The decision issued nothing (`sold_out`, `limit_reached`, `duplicate`).
    NotIssued,
    /// Issued but held: final only if a `claimed` record follows.
    Held,
    /// Released or expired: the coupon went back to stock.
    Returned,
}

impl Skip {
    /// A short stable code for metric labels.
    pub fn code(self) -> &'static str {
        match self {
            Skip::NotIssued => "not_issued",
            Skip::Held => "held",
            Skip::Returned => "returned",
        }
    }
}

/// What to do with one ledger record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A final coupon: deliver it.
    Deliver(Notice),
    /// Not a final coupon: commit past it.
    Skip(Skip),
    /// Parsed, but cannot be a coupon as it stands (an `issued` decision
    /// without a rank): dead-letter it with this reason.
    Unusable(String),
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Decides whether `record` is a final coupon.
pub fn classify(record: &LedgerRecord) -> Verdict {
    match record {
        LedgerRecord::Decision(o) => match o.result {
            DecisionResult::Issued if o.hold_until.is_some() => Verdict::Skip(Skip::Held),
            DecisionResult::Issued => match o.issued_rank {
                Some(rank) => Verdict::Deliver(Notice {
                    event_id: o.event_id.clone(),
                    request_id: o.request_id,
                    user_id: o.user_id.clone(),
                    issued_rank: rank,
                    generation: o.generation,
                    state: FinalState::Issued,
                    decided_at: o.decided_at,
                    replay: o.replay,
                }),
                None => Verdict::Unusable(format!(
                    "issued decision of request {} without an issued_rank",
                    o.request_id
                )),
            },
            DecisionResult::SoldOut | DecisionResult::LimitReached | DecisionResult::Duplicate => {
                Verdict::Skip(Skip::NotIssued)
            }
        },
        LedgerRecord::Hold(h) => match h.state {
            HoldState::Claimed => Verdict::Deliver(Notice {
                event_id: h.event_id.clone(),
                request_id: h.request_id,
                user_id: h.user_id.clone(),
                issued_rank: h.issued_rank,
                generation: h.generation,
                state: FinalState::Claimed,
                decided_at: h.decided_at,
                replay: h.replay,
            }),
            HoldState::Held => Verdict::Skip(Skip::Held),
            HoldState::Released | HoldState::Expired => Verdict::Skip(Skip::Returned),
        },
    }
}

#[cfg(test)]
mod tests {
    use couponrush_core::wire::{HoldOutcome, HOLD_KIND, WIRE_VERSION};
    use couponrush_core::Outcome;

    use super::*;

    fn decision(result: DecisionResult, hold_until: Option<u64>, replay: bool) -> LedgerRecord {
        LedgerRecord::Decision(Outcome {
            v: WIRE_VERSION,
            request_id: Uuid::from_u128(7),
            event_id: "drop".into(),
            user_id: "u1".into(),
            result,
            issued_rank: (result == DecisionResult::Issued).then_some(3),
            partition: 0,
            offset: 9,
            decided_at: 100,
            replay,
            decision_seq: 4,
            accepted_at: 90,
            generation: 2,
            hold_until,
        })
    }

    fn hold(state: HoldState) -> LedgerRecord {
        LedgerRecord::Hold(HoldOutcome {
            v: WIRE_VERSION,
            kind: HOLD_KIND.into(),
            request_id: Uuid::from_u128(7),
            event_id: "drop".into(),
            user_id: "u1".into(),
            state,
            issued_rank: 3,
            partition: 0,
            offset: 1,
            action_at: 150,
            decided_at: 160,
            replay: false,
            decision_seq: 8,
            generation: 2,
        })
    }

    #[test]
    fn only_final_coupons_are_delivered() {
        let Verdict::Deliver(n) = classify(&decision(DecisionResult::Issued, None, false)) else {
            panic!("an issued coupon without a hold is final");
        };
        assert_eq!(
            (n.state, n.issued_rank, n.decided_at),
            (FinalState::Issued, 3, 100)
        );
        let Verdict::Deliver(n) = classify(&hold(HoldState::Claimed)) else {
            panic!("a claimed hold is final");
        };
        assert_eq!((n.state, n.decided_at), (FinalState::Claimed, 160));
        for (record, why) in [
            (decision(DecisionResult::Issued, Some(5), false), Skip::Held),
            (
                decision(DecisionResult::SoldOut, None, false),
                Skip::NotIssued,
            ),
            (
                decision(DecisionResult::LimitReached, None, false),
                Skip::NotIssued,
            ),
            (
                decision(DecisionResult::Duplicate, None, false),
                Skip::NotIssued,
            ),
            (hold(HoldState::Released), Skip::Returned),
            (hold(HoldState::Expired), Skip::Returned),
            (hold(HoldState::Held), Skip::Held),
        ] {
            assert_eq!(classify(&record), Verdict::Skip(why), "{record:?}");
        }
    }

    #[test]
    fn a_replay_is_the_same_coupon_under_the_same_key() {
        let Verdict::Deliver(first) = classify(&decision(DecisionResult::Issued, None, false))
        else {
            panic!()
        };
        let Verdict::Deliver(again) = classify(&decision(DecisionResult::Issued, None, true))
        else {
            panic!()
        };
        assert!(again.replay && !first.replay);
        assert_eq!(first.idempotency_key(), again.idempotency_key());
        assert_eq!(
            first.to_body(),
            again.to_body(),
            "the body does not say replay"
        );
        assert_eq!(
            first.idempotency_key(),
            "drop:2:00000000-0000-0000-0000-000000000007"
        );
        // A claim of the same request is the same coupon, under the same key.
        let Verdict::Deliver(claimed) = classify(&hold(HoldState::Claimed)) else {
            panic!()
        };
        assert_eq!(claimed.idempotency_key(), first.idempotency_key());
    }

    #[test]
    fn the_body_carries_ids_and_the_state_only() {
        let Verdict::Deliver(n) = classify(&hold(HoldState::Claimed)) else {
            panic!()
        };
        let json: serde_json::Value = serde_json::from_slice(&n.to_body()).unwrap();
        let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "decided_at",
                "event_id",
                "generation",
                "issued_rank",
                "request_id",
                "state",
                "user_id"
            ]
        );
        assert_eq!(json["state"], "claimed");
    }

    #[test]
    fn an_issued_decision_without_a_rank_is_unusable() {
        let LedgerRecord::Decision(mut o) = decision(DecisionResult::Issued, None, false) else {
            unreachable!()
        };
        o.issued_rank = None;
        assert!(matches!(
            classify(&LedgerRecord::Decision(o)),
            Verdict::Unusable(_)
        ));
    }
}
