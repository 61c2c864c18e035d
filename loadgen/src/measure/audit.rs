//! The correctness audit: what a first-come drop must never do, counted from
//! two independent sources and cross-checked.
//!
//! Sources: what the load generator was told (`202` with a request id), the
//! outcome stream (every record, replays included), and the store's ledger
//! (the coupons actually held).
//!
//! | figure               | counts |
//! |----------------------|--------|
//! | `oversold`           | coupons beyond stock (outcomes or store, the worse) |
//! | `double_issued`      | a request issued twice, or a user beyond the per-user limit (outcomes or store, the worse) |
//! | `lost`               | accepted requests never decided |
//! | `phantom`            | decisions or coupons for requests never accepted |
//! | `inconsistent_replays` | a redelivery whose decision differs from the first |
//! | `ledger_mismatch`    | requests issued per the outcomes but not in the store, or the reverse |
//!
//! Every figure must be 0; the load generator exits non-zero otherwise.

use std::collections::{BTreeMap, HashMap, HashSet};

use couponrush_core::store::Ledger;
use couponrush_core::{DecisionResult, Outcome};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The audit's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Distinct requests accepted.
    pub accepted: u64,
    /// Distinct requests decided (first decisions).
    pub decided: u64,
    /// Distinct requests issued a coupon, per the outcomes.
    pub issued: u64,
    /// Outcome records that restated an earlier decision.
    pub replays: u64,
    /// First decisions by result.
    pub results: BTreeMap<String, u64>,
    /// Coupons beyond stock.
    pub oversold: u64,
    /// Requests issued twice plus coupons beyond a user's limit.
    pub double_issued: u64,
    /// Accepted, never decided.
    pub lost: u64,
    /// Decided or issued, never accepted.
    pub phantom: u64,
    /// Replays whose decision differs from the first.
    pub inconsistent_replays: u64,
    /// Issued per outcomes but not in the store, or the reverse.
    pub ledger_mismatch: u64,
    /// What the store holds, when it was audited.
    pub store: Option<StoreFigures>,
}

/// The store's side of the audit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreFigures {
    /// Coupons recorded.
    pub coupons: u64,
    /// Stock left.
    pub remaining: u64,
    /// Users holding at least one coupon.
    pub holders: u64,
    /// `coupons + remaining != stock`: the counters disagree with the coupons.
    pub counter_mismatch: bool,
}

impl Audit {
    /// The sum of every figure that must be zero.
    pub fn failures(&self) -> u64 {
        self.oversold
            + self.double_issued
            + self.lost
            + self.phantom
            + self.inconsistent_replays
            + self.ledger_mismatch
            + self
                .store
                .as_ref()
                .map_or(0, |s| u64::from(s.counter_mismatch))
    }
}

/// What the audit needs to know about the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTerms {
    /// Coupons available.
    pub stock: u32,
    /// Coupons one user may hold.
    pub per_user_limit: u32,
}

/// Audits one event. `accepted` maps each accepted request id to its user;
/// `outcomes` holds every outcome record of the event, in observed order.
pub fn audit(
    terms: EventTerms,
    accepted: &HashMap<Uuid, String>,
    outcomes: &[Outcome],
    ledger: Option<&Ledger>,
) -> Audit {
    let mut a = Audit {
        accepted: accepted.len() as u64,
        ..Audit::default()
    };
    let limit = u64::from(terms.per_user_limit);
    let stock = u64::from(terms.stock);

    // Outcome side.
    let mut first: HashMap<Uuid, &Outcome> = HashMap::new();
    let mut issued_ranks: HashMap<Uuid, HashSet<u32>> = HashMap::new();
    for o in outcomes {
        if o.result == DecisionResult::Issued {
            issued_ranks
                .entry(o.request_id)
                .or_default()
                .insert(o.issued_rank.unwrap_or(0));
        }
        match first.get(&o.request_id) {
            None => {
                first.insert(o.request_id, o);
            }
            Some(f) => {
                a.replays += 1;
                if (f.result, f.issued_rank) != (o.result, o.issued_rank) {
                    a.inconsistent_replays += 1;
                }
            }
        }
    }
    a.decided = first.len() as u64;
    for o in first.values() {
        *a.results.entry(o.result.as_str().to_string()).or_default() += 1;
    }
    a.issued = issued_ranks.len() as u64;
    let mut double_outcomes: u64 = issued_ranks
        .values()
        .map(|ranks| ranks.len() as u64 - 1)
        .sum();
    let mut per_user: HashMap<&str, u64> = HashMap::new();
    for id in issued_ranks.keys() {
        if let Some(o) = first.get(id) {
            *per_user.entry(o.user_id.as_str()).or_default() += 1;
        }
    }
    double_outcomes += per_user
        .values()
        .map(|n| n.saturating_sub(limit))
        .sum::<u64>();
    let mut distinct_ranks: HashSet<u32> = HashSet::new();
    let mut rank_reuse = 0u64;
    for ranks in issued_ranks.values() {
        for r in ranks {
            if !distinct_ranks.insert(*r) {
                rank_reuse += 1;
            }
        }
    }
    let beyond_stock = distinct_ranks
        .iter()
        .filter(|r| u64::from(**r) > stock)
        .count() as u64;
    let oversold_outcomes = (a.issued.saturating_sub(stock)).max(beyond_stock) + rank_reuse;

    let decided: HashSet<Uuid> = first.keys().copied().collect();
    let accepted_ids: HashSet<Uuid> = accepted.keys().copied().collect();
    a.lost = accepted_ids.difference(&decided).count() as u64;
    let mut phantom: HashSet<Uuid> = decided.difference(&accepted_ids).copied().collect();

    // Store side, cross-checked.
    let (mut oversold_store, mut double_store) = (0, 0);
    if let Some(ledger) = ledger {
        let coupons = ledger.coupons.len() as u64;
        oversold_store = coupons.saturating_sub(stock);
        let mut by_user: HashMap<&str, u64> = HashMap::new();
        let mut ids: HashSet<Uuid> = HashSet::new();
        for c in &ledger.coupons {
            *by_user.entry(c.user_id.as_str()).or_default() += 1;
            if !ids.insert(c.request_id) {
                double_store += 1;
            }
            if !accepted_ids.contains(&c.request_id) {
                phantom.insert(c.request_id);
            }
        }
        double_store += by_user
            .values()
            .map(|n| n.saturating_sub(limit))
            .sum::<u64>();
        let issued_ids: HashSet<Uuid> = issued_ranks.keys().copied().collect();
        a.ledger_mismatch = issued_ids.symmetric_difference(&ids).count() as u64;
        a.store = Some(StoreFigures {
            coupons,
            remaining: u64::from(ledger.state.remaining),
            holders: ledger.holders.iter().filter(|(_, n)| *n > 0).count() as u64,
            counter_mismatch: coupons + u64::from(ledger.state.remaining)
                != u64::from(ledger.state.stock),
        });
    }
    a.oversold = oversold_outcomes.max(oversold_store);
    a.double_issued = double_outcomes.max(double_store);
    a.phantom = phantom.len() as u64;
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use couponrush_core::store::{Coupon, EventState};
    use couponrush_core::wire::WIRE_VERSION;

    const TERMS: EventTerms = EventTerms {
        stock: 2,
        per_user_limit: 1,
    };

    fn outcome(id: u128, user: &str, result: DecisionResult, rank: Option<u32>) -> Outcome {
        Outcome {
            v: WIRE_VERSION,
            request_id: Uuid::from_u128(id),
            event_id: "e".into(),
            user_id: user.into(),
            result,
            issued_rank: rank,
            partition: 0,
            offset: id as i64,
            decided_at: 1,
            replay: false,
            decision_seq: id as u64,
            accepted_at: 1,
            generation: 1,
        }
    }

    fn ledger(coupons: &[(u32, u128, &str)], remaining: u32) -> Ledger {
        let mut holders: HashMap<String, u32> = HashMap::new();
        for (_, _, u) in coupons {
            *holders.entry(u.to_string()).or_default() += 1;
        }
        Ledger {
            state: EventState {
                event_id: "e".into(),
                stock: 2,
                per_user_limit: 1,
                remaining,
                generation: 1,
            },
            coupons: coupons
                .iter()
                .map(|(rank, id, user)| Coupon {
                    rank: *rank,
                    request_id: Uuid::from_u128(*id),
                    user_id: user.to_string(),
                })
                .collect(),
            holders: holders.into_iter().collect(),
        }
    }

    /// A clean drop: requests 1..=3 from users a, b, c; 1 and 2 win.
    fn clean() -> (HashMap<Uuid, String>, Vec<Outcome>, Ledger) {
        let accepted = [(1, "a"), (2, "b"), (3, "c")]
            .into_iter()
            .map(|(i, u)| (Uuid::from_u128(i), u.to_string()))
            .collect();
        let outcomes = vec![
            outcome(1, "a", DecisionResult::Issued, Some(1)),
            outcome(2, "b", DecisionResult::Issued, Some(2)),
            outcome(3, "c", DecisionResult::SoldOut, None),
        ];
        (accepted, outcomes, ledger(&[(1, 1, "a"), (2, 2, "b")], 0))
    }

    #[test]
    fn a_clean_drop_audits_clean_and_replays_are_not_faults() {
        let (accepted, mut outcomes, ledger) = clean();
        let mut replay = outcomes[0].clone();
        replay.replay = true;
        outcomes.push(replay);
        let a = audit(TERMS, &accepted, &outcomes, Some(&ledger));
        assert_eq!(a.failures(), 0, "{a:?}");
        assert_eq!((a.accepted, a.decided, a.issued, a.replays), (3, 3, 2, 1));
        assert_eq!(a.results["issued"], 2);
        assert_eq!(a.store.unwrap().holders, 2);
    }

    #[test]
    fn a_planted_extra_coupon_in_the_store_is_oversold() {
        let (accepted, outcomes, _) = clean();
        let bad = ledger(&[(1, 1, "a"), (2, 2, "b"), (3, 3, "c")], 0);
        let a = audit(TERMS, &accepted, &outcomes, Some(&bad));
        assert_eq!(a.oversold, 1);
        assert_eq!(
            a.ledger_mismatch, 1,
            "request 3 holds a coupon it was never told of"
        );
        assert!(a.store.unwrap().counter_mismatch);
    }

    #[test]
    fn a_user_issued_twice_is_double_issued() {
        let (mut accepted, mut outcomes, _) = clean();
        accepted.insert(Uuid::from_u128(3), "a".into());
        outcomes[2] = outcome(3, "a", DecisionResult::Issued, Some(3));
        let a = audit(TERMS, &accepted, &outcomes, None);
        assert_eq!(a.double_issued, 1);
        assert_eq!(a.oversold, 1, "rank 3 of a stock of 2");
    }

    #[test]
    fn one_request_issued_with_two_ranks_is_double_issued_and_inconsistent() {
        let (accepted, mut outcomes, ledger) = clean();
        let mut again = outcome(1, "a", DecisionResult::Issued, Some(2));
        again.replay = true;
        outcomes.push(again);
        let a = audit(TERMS, &accepted, &outcomes, Some(&ledger));
        assert_eq!(a.double_issued, 1);
        assert_eq!(a.inconsistent_replays, 1);
        assert!(a.oversold >= 1, "rank 2 handed out twice");
    }

    #[test]
    fn an_accepted_request_never_decided_is_lost() {
        let (mut accepted, outcomes, ledger) = clean();
        accepted.insert(Uuid::from_u128(4), "d".into());
        let a = audit(TERMS, &accepted, &outcomes, Some(&ledger));
        assert_eq!(a.lost, 1);
        assert_eq!(a.failures(), 1);
    }

    #[test]
    fn a_forged_outcome_is_a_phantom_and_a_ledger_mismatch() {
        let (accepted, mut outcomes, ledger) = clean();
        outcomes.push(outcome(99, "z", DecisionResult::Issued, Some(2)));
        let a = audit(TERMS, &accepted, &outcomes, Some(&ledger));
        assert_eq!(a.phantom, 1);
        assert_eq!(a.ledger_mismatch, 1);
        assert!(a.oversold >= 1);
    }

    #[test]
    fn without_a_store_the_outcomes_alone_are_audited() {
        let (accepted, outcomes, _) = clean();
        let a = audit(TERMS, &accepted, &outcomes, None);
        assert_eq!(a.failures(), 0);
        assert!(a.store.is_none());
    }
}
