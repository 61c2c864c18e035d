//! Stock buckets: one hot event split over K Redis Cluster slots.
//!
//! An event with `stock_buckets` K > 1 keeps K independent states, bucket
//! `b` under the hash tag `{E#b}` (bucket 0 keeps the event's own `{E}`, so
//! K = 1 is the unbucketed layout, byte for byte). Every script call still
//! touches one slot: one bucket.
//!
//! - **Routing.** A request, and every action on its hold, goes to bucket
//!   [`bucket_of`]`(user_id, K)`, a stable hash of the user: all of a user's
//!   coupons live in one bucket, so the per-user limit and the dedup stay
//!   exact inside it.
//! - **Stock.** Split as evenly as possible ([`bucket_stock`]): the first
//!   `stock mod K` buckets hold one more.
//! - **Ranks and decision numbers.** Bucket `b` numbers its own 1, 2, 3…
//!   and hands out the event-wide number [`global`]`(n, K, b)` =
//!   `(n − 1)·K + b + 1`: ranks (and sequence numbers) of different buckets
//!   are disjoint, so a rank is never out twice event-wide, and every rank
//!   stays ≤ stock (bucket `b`'s last rank is ≤ stock by construction of the
//!   split). Decision numbers stay exact order *within* a bucket; across
//!   buckets they interleave (the load generator's skew figures then
//!   measure the order the buckets' numbering implies).
//! - **The cost: undersell.** A bucket that runs dry answers `sold_out`
//!   while another may still hold stock. couponrush does not move stock
//!   between buckets; it counts the undersell (the load generator's report,
//!   `undersell`: stock minus the coupons issued by the time the first
//!   `sold_out` was decided).
//!
//! The store reads K from bucket 0's state (the event as defined); a
//! redefinition that changes K is caught in the script's own atomic step
//! (each bucket knows the K it was defined with, and a call routed with
//! another K decides nothing), so a stale cached K never misroutes a
//! decision.

use std::borrow::Cow;

use super::{
    BatchVerdict, Coupon, EventBatch, EventState, Hold, HoldEnd, Ledger, Pending, PendingAction,
};
use crate::store::Decision;

/// The most buckets an event may have.
pub const MAX_STOCK_BUCKETS: u32 = 64;

/// The separator between an event id and its bucket in a hash tag: never
/// in an event id (`[A-Za-z0-9._-]`).
pub const SEPARATOR: char = '#';

/// The bucket of `user_id` among `k`: FNV-1a (64 bits) of its bytes mod
/// `k`. Stable across processes, versions and platforms (pinned by a test):
/// a change would route a user to another bucket mid-drop.
pub fn bucket_of(user_id: &str, k: u32) -> u32 {
    if k <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user_id.as_bytes() {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(k)) as u32
}

/// The stock of bucket `b` of `k` of an event with `stock` coupons.
pub fn bucket_stock(stock: u32, k: u32, b: u32) -> u32 {
    let k = k.max(1);
    stock / k + u32::from(b < stock % k)
}

/// The event-wide number of bucket `b`'s `n`-th rank or decision (n ≥ 1).
pub fn global(n: u64, k: u32, b: u32) -> u64 {
    (n - 1) * u64::from(k.max(1)) + u64::from(b) + 1
}

/// The bucket an event-wide number (rank or decision number, ≥ 1) belongs to.
pub fn owner(number: u64, k: u32) -> u32 {
    (number.saturating_sub(1) % u64::from(k.max(1))) as u32
}

/// The hash tag (the store's name) of bucket `b` of `event_id`: the event's
/// own id for bucket 0, `E#b` for the others.
pub fn tag(event_id: &str, b: u32) -> Cow<'_, str> {
    if b == 0 {
        Cow::Borrowed(event_id)
    } else {
        Cow::Owned(format!("{event_id}{SEPARATOR}{b}"))
    }
}

/// The event a bucket's tag belongs to.
pub fn event_of(tag: &str) -> &str {
    tag.split_once(SEPARATOR).map_or(tag, |(e, _)| e)
}

/// One bucket's share of a batch, and where each of its items came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The bucket.
    pub bucket: u32,
    /// Its actions and requests, in the batch's order.
    pub batch: EventBatch,
    /// Index in the batch of each action of the share.
    pub actions: Vec<usize>,
    /// Index in the batch of each request of the share.
    pub requests: Vec<usize>,
}

/// Splits `batch` of an event with `k` buckets by user: one share per
/// bucket with anything to do, in bucket order, each keeping the batch's
/// order (the event id of each share is the event's, not the tag).
pub fn split(batch: &EventBatch, k: u32) -> Vec<Share> {
    let mut shares: Vec<Share> = (0..k.max(1))
        .map(|bucket| Share {
            bucket,
            batch: EventBatch {
                event_id: batch.event_id.clone(),
                requests: Vec::new(),
                actions: Vec::new(),
            },
            actions: Vec::new(),
            requests: Vec::new(),
        })
        .collect();
    for (i, a) in batch.actions.iter().enumerate() {
        let s = &mut shares[bucket_of(&a.user_id, k) as usize];
        s.batch.actions.push(PendingAction::clone(a));
        s.actions.push(i);
    }
    for (i, p) in batch.requests.iter().enumerate() {
        let s = &mut shares[bucket_of(&p.user_id, k) as usize];
        s.batch.requests.push(Pending::clone(p));
        s.requests.push(i);
    }
    shares.retain(|s| !(s.batch.actions.is_empty() && s.batch.requests.is_empty()));
    shares
}

/// Why the shares' verdicts cannot be merged into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeError {
    /// The buckets answered with different generations: a definition is
    /// being applied to them one by one. Retrying after it is done works.
    Generations(u64, u64),
    /// Some buckets know the event and some do not: a definition is being
    /// applied (or failed half-way). The known buckets' decisions stand in
    /// the store (a retry replays them); the batch must be retried, never
    /// dead-lettered, or a coupon the store holds would never reach the log.
    Partial,
}

impl std::fmt::Display for MergeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MergeError::Generations(a, b) => write!(
                f,
                "the buckets hold generations {a} and {b}: a definition is being applied to them"
            ),
            MergeError::Partial => f.write_str(
                "some buckets of the event are defined and some are not: a definition is being \
                 applied to them",
            ),
        }
    }
}

/// Merges the verdicts of `shares` (one each, same order) back into the
/// verdict of a batch of `actions` actions and `requests` requests. Unknown
/// in every bucket is unknown for the batch; unknown in some is
/// [`MergeError::Partial`] (retry), since the others decided.
pub fn merge(
    shares: &[Share],
    verdicts: Vec<BatchVerdict>,
    actions: usize,
    requests: usize,
) -> Result<BatchVerdict, MergeError> {
    let mut decisions: Vec<Option<Decision>> = vec![None; requests];
    let mut holds: Vec<Option<HoldEnd>> = vec![None; actions];
    let mut at: Option<(u64, u64)> = None;
    let unknown = verdicts
        .iter()
        .filter(|v| matches!(v, BatchVerdict::UnknownEvent))
        .count();
    if unknown > 0 {
        return if unknown == verdicts.len() {
            Ok(BatchVerdict::UnknownEvent)
        } else {
            Err(MergeError::Partial)
        };
    }
    for (share, verdict) in shares.iter().zip(verdicts) {
        let BatchVerdict::Decided {
            generation,
            decisions: d,
            holds: h,
            claim_window_us,
        } = verdict
        else {
            unreachable!("unknown verdicts were handled above");
        };
        match at {
            Some((g, _)) if g != generation => return Err(MergeError::Generations(g, generation)),
            _ => at = Some((generation, claim_window_us)),
        }
        for (i, d) in share.requests.iter().zip(d) {
            decisions[*i] = Some(d);
        }
        for (i, e) in share.actions.iter().zip(h) {
            holds[*i] = e;
        }
    }
    let (generation, claim_window_us) = at.unwrap_or((0, 0));
    Ok(BatchVerdict::Decided {
        generation,
        decisions: decisions
            .into_iter()
            .map(|d| d.expect("every request went to one share"))
            .collect(),
        holds,
        claim_window_us,
    })
}

/// The event as a whole from its buckets' states (bucket 0 first): counters
/// summed; generation, limit and window as bucket 0 holds them.
pub fn sum_states(mut buckets: Vec<EventState>) -> Option<EventState> {
    let mut rest = buckets.split_off(1.min(buckets.len()));
    let mut whole = buckets.pop()?;
    for s in rest.drain(..) {
        whole.stock += s.stock;
        whole.remaining += s.remaining;
        whole.released += s.released;
        whole.claimed += s.claimed;
    }
    Some(whole)
}

/// The event's ledger from its buckets' ledgers (bucket 0 first).
pub fn merge_ledgers(ledgers: Vec<Ledger>) -> Option<Ledger> {
    let state = sum_states(ledgers.iter().map(|l| l.state.clone()).collect())?;
    let mut coupons: Vec<Coupon> = Vec::new();
    let mut holders: Vec<(String, u32)> = Vec::new();
    let mut free_ranks: Vec<u32> = Vec::new();
    let mut holds: Vec<Hold> = Vec::new();
    for l in ledgers {
        coupons.extend(l.coupons);
        holders.extend(l.holders);
        free_ranks.extend(l.free_ranks);
        holds.extend(l.holds);
    }
    coupons.sort_by_key(|c| c.rank);
    holders.sort();
    free_ranks.sort_unstable();
    holds.sort_by_key(|h| h.request_id);
    Some(Ledger {
        state,
        coupons,
        holders,
        free_ranks,
        holds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn the_user_hash_is_pinned() {
        // FNV-1a 64 of "u1" and "alice": a change here reroutes users.
        assert_eq!(bucket_of("u1", 1), 0);
        assert_eq!(
            bucket_of("u1", 1_000_003),
            (0x08c4_7b07_b567_47f3_u64 % 1_000_003) as u32
        );
        assert_eq!(
            bucket_of("alice", 64),
            (0x508b_2abb_65a0_3907_u64 % 64) as u32
        );
    }

    #[test]
    fn stock_splits_evenly_and_ranks_are_disjoint_and_within_stock() {
        for stock in [0u32, 1, 5, 10, 97, 1000] {
            for k in [1u32, 2, 3, 7, 64] {
                let stocks: Vec<u32> = (0..k).map(|b| bucket_stock(stock, k, b)).collect();
                assert_eq!(stocks.iter().sum::<u32>(), stock);
                assert!(stocks.iter().max().unwrap() - stocks.iter().min().unwrap() <= 1);
                let mut ranks: Vec<u64> = (0..k)
                    .flat_map(|b| (1..=u64::from(stocks[b as usize])).map(move |n| global(n, k, b)))
                    .collect();
                ranks.sort_unstable();
                let expected: Vec<u64> = (1..=u64::from(stock)).collect();
                assert_eq!(ranks, expected, "stock {stock}, {k} buckets");
                for r in ranks {
                    let b = owner(r, k);
                    assert_eq!(global((r - 1) / u64::from(k) + 1, k, b), r);
                }
            }
        }
    }

    #[test]
    fn a_split_batch_merges_back_in_order() {
        let batch = EventBatch::requests(
            "e",
            (0..50)
                .map(|i| Pending {
                    request_id: Uuid::from_u128(i),
                    user_id: format!("u{i}"),
                })
                .collect(),
        );
        let shares = split(&batch, 4);
        assert!(shares.len() > 1, "fifty users spread over four buckets");
        for s in &shares {
            assert!(s
                .batch
                .requests
                .iter()
                .all(|p| bucket_of(&p.user_id, 4) == s.bucket));
        }
        let verdicts = shares
            .iter()
            .map(|s| BatchVerdict::Decided {
                generation: 3,
                decisions: s
                    .requests
                    .iter()
                    .map(|i| Decision {
                        result: crate::wire::DecisionResult::SoldOut,
                        issued_rank: None,
                        decided_at: *i as u64,
                        replay: false,
                        seq: 0,
                        logged: false,
                    })
                    .collect(),
                holds: Vec::new(),
                claim_window_us: 0,
            })
            .collect();
        let BatchVerdict::Decided { decisions, .. } = merge(&shares, verdicts, 0, 50).unwrap()
        else {
            panic!("decided");
        };
        let order: Vec<u64> = decisions.iter().map(|d| d.decided_at).collect();
        assert_eq!(order, (0..50).collect::<Vec<u64>>());
    }

    #[test]
    fn a_batch_some_buckets_do_not_know_is_retried_and_one_none_know_is_unknown() {
        let batch = EventBatch::requests(
            "e",
            (0..50)
                .map(|i| Pending {
                    request_id: Uuid::from_u128(i),
                    user_id: format!("u{i}"),
                })
                .collect(),
        );
        let shares = split(&batch, 4);
        let decided = |s: &Share| BatchVerdict::Decided {
            generation: 1,
            decisions: vec![
                Decision {
                    result: crate::wire::DecisionResult::SoldOut,
                    issued_rank: None,
                    decided_at: 0,
                    replay: false,
                    seq: 0,
                    logged: false,
                };
                s.requests.len()
            ],
            holds: Vec::new(),
            claim_window_us: 0,
        };
        // Bucket 0 defined, another not yet: the decided share's coupons
        // are in the store, so the batch must never become "unknown event"
        // (dead-lettered, its coupons never logged).
        let mut verdicts: Vec<BatchVerdict> = shares.iter().map(decided).collect();
        verdicts[1] = BatchVerdict::UnknownEvent;
        assert_eq!(merge(&shares, verdicts, 0, 50), Err(MergeError::Partial));
        let none = shares.iter().map(|_| BatchVerdict::UnknownEvent).collect();
        assert_eq!(merge(&shares, none, 0, 50), Ok(BatchVerdict::UnknownEvent));
    }

    #[test]
    fn tags_name_their_event() {
        assert_eq!(tag("e", 0), "e");
        assert_eq!(tag("e", 3), "e#3");
        assert_eq!(event_of("e#3"), "e");
        assert_eq!(event_of("e"), "e");
    }
}
