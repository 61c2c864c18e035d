//! Ordering skew: how far the order of decisions strays from the order of
//! arrival.
//!
//! Arrival order is the api's accept order (`accepted_at`, ties broken by
//! request id); decision order is the store's decision sequence number
//! (`decision_seq`), which is exact. Over the n decided requests:
//!
//! - **inversion ratio**: the fraction of the n(n-1)/2 pairs decided in the
//!   opposite order of their arrival (the normalised Kendall tau distance),
//!   counted in O(n log n) by merge sort. 0 = perfectly first-come, ~0.5 =
//!   random.
//! - **displacement**: |decision rank − arrival rank| per request; p50, p99, max.
//! - **late winners**: requests issued a coupon that arrived after the
//!   `stock`-th arrival; **early losers**: of the first `stock` arrivals,
//!   those that got `sold_out` (lost for want of stock, not for the per-user
//!   limit). With strict first-come order both are 0.

use couponrush_core::DecisionResult;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One decided request, as the skew sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ordered {
    /// Arrival timestamp (µs).
    pub accepted_at: u64,
    /// Tie-breaker for equal timestamps.
    pub request_id: Uuid,
    /// The store's decision sequence number.
    pub decision_seq: u64,
    /// What was decided.
    pub result: DecisionResult,
}

/// The skew figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Skew {
    /// Decided requests compared.
    pub n: u64,
    /// Pairs compared, n(n-1)/2.
    pub pairs: u64,
    /// Pairs decided out of arrival order.
    pub inversions: u64,
    /// inversions / pairs.
    pub inversion_ratio: f64,
    /// Median |decision rank − arrival rank|.
    pub displacement_p50: u64,
    /// 99th percentile displacement.
    pub displacement_p99: u64,
    /// Largest displacement.
    pub displacement_max: u64,
    /// Winners that arrived after the stock-th request.
    pub late_winners: u64,
    /// Early arrivals that got `sold_out`.
    pub early_losers: u64,
}

/// Computes the skew of `decided` (any order; `duplicate` results and
/// requests without a decision number are ignored) for an event of `stock`.
pub fn skew(decided: &[Ordered], stock: u32) -> Skew {
    let mut by_arrival: Vec<Ordered> = decided
        .iter()
        .copied()
        .filter(|o| o.result != DecisionResult::Duplicate && o.decision_seq > 0)
        .collect();
    by_arrival.sort_by_key(|o| (o.accepted_at, o.request_id));
    let n = by_arrival.len();
    if n == 0 {
        return Skew::default();
    }

    // Decision rank of each request, in arrival order.
    let mut seqs: Vec<u64> = by_arrival.iter().map(|o| o.decision_seq).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    let decision_rank: Vec<usize> = seqs
        .iter()
        .map(|s| sorted.partition_point(|x| x < s))
        .collect();
    let mut displacement: Vec<u64> = decision_rank
        .iter()
        .enumerate()
        .map(|(arrival, decision)| arrival.abs_diff(*decision) as u64)
        .collect();
    displacement.sort_unstable();
    let pct = |p: f64| displacement[(((n - 1) as f64) * p).round() as usize];

    let inversions = count_inversions(&mut seqs);
    let pairs = (n as u64) * (n as u64 - 1) / 2;
    let stock = stock as usize;
    let late_winners = by_arrival
        .iter()
        .skip(stock)
        .filter(|o| o.result == DecisionResult::Issued)
        .count() as u64;
    let early_losers = by_arrival
        .iter()
        .take(stock)
        .filter(|o| o.result == DecisionResult::SoldOut)
        .count() as u64;
    Skew {
        n: n as u64,
        pairs,
        inversions,
        inversion_ratio: if pairs == 0 {
            0.0
        } else {
            inversions as f64 / pairs as f64
        },
        displacement_p50: pct(0.50),
        displacement_p99: pct(0.99),
        displacement_max: *displacement.last().unwrap_or(&0),
        late_winners,
        early_losers,
    }
}

/// Pairs i < j with v[i] > v[j], by merge sort (sorts `v`).
pub fn count_inversions(v: &mut [u64]) -> u64 {
    let mut buf = v.to_vec();
    sort_count(v, &mut buf)
}

fn sort_count(v: &mut [u64], buf: &mut [u64]) -> u64 {
    let n = v.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut count = {
        let (l, r) = v.split_at_mut(mid);
        let (bl, br) = buf.split_at_mut(mid);
        sort_count(l, bl) + sort_count(r, br)
    };
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < mid && j < n {
        if v[i] <= v[j] {
            buf[k] = v[i];
            i += 1;
        } else {
            buf[k] = v[j];
            count += (mid - i) as u64;
            j += 1;
        }
        k += 1;
    }
    buf[k..k + (mid - i)].copy_from_slice(&v[i..mid]);
    k += mid - i;
    buf[k..k + (n - j)].copy_from_slice(&v[j..n]);
    v.copy_from_slice(&buf[..n]);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use DecisionResult::*;

    fn brute_inversions(v: &[u64]) -> u64 {
        let mut c = 0;
        for i in 0..v.len() {
            for j in i + 1..v.len() {
                if v[i] > v[j] {
                    c += 1;
                }
            }
        }
        c
    }

    /// Requests arriving at t = 0, 1, 2... decided in the order `seq_by_arrival`.
    fn run(seq_by_arrival: &[u64], results: &[DecisionResult], stock: u32) -> Skew {
        let ordered: Vec<Ordered> = seq_by_arrival
            .iter()
            .zip(results)
            .enumerate()
            .map(|(t, (s, r))| Ordered {
                accepted_at: t as u64,
                request_id: Uuid::from_u128(t as u128),
                decision_seq: *s,
                result: *r,
            })
            .collect();
        skew(&ordered, stock)
    }

    #[test]
    fn inversions_match_brute_force_on_random_permutations() {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for n in [0usize, 1, 2, 3, 10, 257] {
            let mut v: Vec<u64> = (0..n as u64).collect();
            v.shuffle(&mut rng);
            let expected = brute_inversions(&v);
            let mut w = v.clone();
            assert_eq!(count_inversions(&mut w), expected, "n={n}");
            assert!(w.windows(2).all(|p| p[0] <= p[1]));
        }
    }

    #[test]
    fn perfect_order_has_no_skew() {
        let s = run(&[1, 2, 3, 4], &[Issued, Issued, SoldOut, SoldOut], 2);
        assert_eq!(s.inversions, 0);
        assert_eq!(s.inversion_ratio, 0.0);
        assert_eq!(s.displacement_max, 0);
        assert_eq!((s.late_winners, s.early_losers), (0, 0));
        assert_eq!(s.pairs, 6);
    }

    #[test]
    fn reversed_order_inverts_every_pair() {
        let s = run(&[4, 3, 2, 1], &[SoldOut, SoldOut, Issued, Issued], 2);
        assert_eq!(s.inversions, 6);
        assert_eq!(s.inversion_ratio, 1.0);
        assert_eq!(s.displacement_max, 3);
        // Arrivals 2 and 3 won; arrivals 0 and 1 (within stock) lost for stock.
        assert_eq!((s.late_winners, s.early_losers), (2, 2));
    }

    #[test]
    fn a_known_permutation_gives_its_known_figures() {
        // Decision order 2,1,4,3,5 by arrival: inversions (2,1) and (4,3).
        let s = run(
            &[2, 1, 4, 3, 5],
            &[Issued, Issued, LimitReached, SoldOut, SoldOut],
            3,
        );
        assert_eq!(s.inversions, 2);
        assert_eq!(s.pairs, 10);
        assert!((s.inversion_ratio - 0.2).abs() < 1e-12);
        assert_eq!(s.displacement_max, 1);
        assert_eq!(s.displacement_p50, 1);
        // Arrival 2 is within stock but lost to the per-user limit: not an early loser.
        assert_eq!((s.late_winners, s.early_losers), (0, 0));
    }

    #[test]
    fn ties_in_arrival_are_broken_by_request_id_and_duplicates_ignored() {
        let ordered = vec![
            Ordered {
                accepted_at: 5,
                request_id: Uuid::from_u128(2),
                decision_seq: 1,
                result: Issued,
            },
            Ordered {
                accepted_at: 5,
                request_id: Uuid::from_u128(1),
                decision_seq: 2,
                result: Issued,
            },
            Ordered {
                accepted_at: 1,
                request_id: Uuid::from_u128(9),
                decision_seq: 0,
                result: Duplicate,
            },
        ];
        let s = skew(&ordered, 2);
        assert_eq!(s.n, 2);
        assert_eq!(
            s.inversions, 1,
            "id 1 arrived first by tie-break, decided second"
        );
    }
}
