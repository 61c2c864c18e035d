//! The correctness audit: what a first-come drop must never do, counted from
//! two independent sources and cross-checked.
//!
//! Sources: what the load generator was told (`202` with a request id), the
//! outcome stream (every record, replays included: the drop's decisions and,
//! for an event with holds, every hold's end), the store's ledger (the
//! coupons actually held) and the event's `remaining` at the end.
//!
//! | figure               | counts |
//! |----------------------|--------|
//! | `oversold`           | coupons held beyond stock at any point of the ledger (outcomes or store, the worse) |
//! | `double_issued`      | a request issued twice, or a user beyond the per-user limit (outcomes or store, the worse) |
//! | `lost`               | accepted requests never decided |
//! | `phantom`            | decisions or coupons for requests never accepted (nor in doubt) |
//! | `inconsistent_replays` | a redelivery whose decision differs from the first |
//! | `ledger_mismatch`    | requests holding a coupon per the outcomes but not in the store, or the reverse; with holds, a hold whose state the store and the outcomes disagree on |
//! | `misrouted`          | an event with stock buckets (K from the store's ledger): a coupon whose rank is not of its user's bucket (outcomes or store, the worse), e.g. one user issued in two buckets |
//!
//! ## Stock buckets
//!
//! An event split over buckets is audited whole: ranks are event-wide (a
//! rank held twice is a conflict whichever buckets issued it), the per-user
//! limit counts a user's coupons in every bucket, and the store's ledger is
//! the buckets' merged. Its cost is reported, not judged:
//!
//! | figure      | counts |
//! |-------------|--------|
//! | `undersell` | stock minus the coupons out (issued, less those given back) when the first `sold_out` (the earliest by `decided_at`) was decided: coupons still in some bucket while a requester heard `sold_out`. Its own bucket is counted in the store's exact order (decision numbers); the other buckets by `decided_at`, the deciding issuers' clocks, as there is no order across buckets (K is read from the store's ledger; without it, one bucket is assumed). 0 when nothing was answered `sold_out`; 0 for an unbucketed event, exactly (its `sold_out` comes only once nothing is left), which checks the figure |
//!
//! ## Holds
//!
//! With holds an issued coupon can come back (cancelled or expired) and its
//! rank go to a later request, so "issued" alone no longer says what is
//! held. The audit replays the ledger per event in `decision_seq` order (one
//! order for decisions and hold ends: the store's) and checks at every step,
//! in [`HoldAudit`]:
//!
//! | figure                 | counts |
//! |------------------------|--------|
//! | `rank_conflicts`       | a rank issued while another request still held it |
//! | `claimed_and_returned` | a request both claimed and given back |
//! | `orphan_ends`          | a hold end with no hold to end: never issued, not a hold, another rank, or already ended |
//! | `out_of_time`          | a claim accepted after the deadline, or an expiry before it |
//! | `stuck`                | at the end, a hold still `held` past its deadline + slack |
//! | `invariant_off`        | how far `issued_total − returned + remaining` is from `stock` at the end |
//!
//! A released-then-reissued rank is not a double issue, nor is stock
//! counted twice: only coupons held at the same moment are. Replays
//! (identical records, at-least-once delivery) count once.
//!
//! Every figure must be 0; the load generator exits non-zero otherwise.
//!
//! ## In doubt
//!
//! A request sent whose answer never came, or came as the api's `503
//! unacknowledged` (the broker may have written it), is neither accepted nor
//! refused: it is *in doubt*, and the client was told so. The run first
//! settles it against the requests topic ([`crate::observe::written_requests`]):
//! found there, it was written and is audited as accepted (undecided: lost).
//! What stays in doubt (not found, or not settled) is, decided, not a
//! phantom (`in_doubt_decided`), and undecided, not lost. Only ids the load
//! generator itself sent can be in doubt, so a decision for a request no one
//! sent is still a phantom.

use std::collections::{BTreeMap, HashMap, HashSet};

use couponrush_core::store::buckets::{bucket_of, owner};
use couponrush_core::store::Ledger;
use couponrush_core::wire::{HoldOutcome, HoldState};
use couponrush_core::{DecisionResult, Outcome};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::measure::latency::{self, LatencySummary};

/// The audit's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Audit {
    /// Distinct requests accepted.
    pub accepted: u64,
    /// Distinct requests decided (first decisions).
    pub decided: u64,
    /// Distinct requests issued a coupon, per the outcomes (a rank given
    /// back and issued again counts for each request that got it).
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
    /// Decided or issued, never accepted (nor in doubt).
    pub phantom: u64,
    /// Requests in doubt (sent, no acknowledgement), never accepted.
    #[serde(default)]
    pub in_doubt: u64,
    /// Of those, decided: written after all.
    #[serde(default)]
    pub in_doubt_decided: u64,
    /// Replays whose decision differs from the first.
    pub inconsistent_replays: u64,
    /// Holding a coupon per outcomes but not in the store, or the reverse
    /// (with holds, also a hold whose state they disagree on).
    pub ledger_mismatch: u64,
    /// What the store holds, when it was audited.
    pub store: Option<StoreFigures>,
    /// The holds' figures, for an event with holds (or hold records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holds: Option<HoldAudit>,
    /// Coupons whose rank is not of their user's bucket (an event with
    /// stock buckets).
    #[serde(default)]
    pub misrouted: u64,
    /// Stock still out of reach when the first `sold_out` was decided (see
    /// the module doc). Not a fault: the cost of stock buckets.
    #[serde(default)]
    pub undersell: u64,
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

/// The holds of an event, replayed from the ledger in `decision_seq` order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldAudit {
    /// Coupons issued as holds (each issue of a rank counts).
    pub issued: u64,
    /// Holds claimed: coupons finally placed.
    pub claimed: u64,
    /// Holds cancelled by their holder (`released`): back in stock.
    pub cancelled: u64,
    /// Holds not claimed in time: back in stock.
    pub expired: u64,
    /// Issues of a rank that had come back to stock before.
    pub reissued: u64,
    /// Holds with no end when the audit looked, deadline not yet passed
    /// (plus the slack): not a fault, but not a placed coupon either.
    pub open: u64,
    /// Every coupon issued, holds or not (`issued_total` of the invariant).
    pub issued_total: u64,
    /// Coupons that came back (`cancelled + expired`).
    pub returned: u64,
    /// Stock left at the end, as the event said (the api, else the store);
    /// `None` when it was not asked.
    pub remaining: Option<u64>,
    /// Time from a coupon coming back (the store's hold end) to its rank's
    /// next issue, ms: 0 when the store hands it on in the same step.
    pub release_to_reissue_ms: LatencySummary,
    /// Time from the action that gave it back (a cancel accepted by the
    /// api, an expiry found due by the sweep) to its rank's next issue, ms.
    #[serde(default)]
    pub action_to_reissue_ms: LatencySummary,
    /// A rank issued while another request held it.
    pub rank_conflicts: u64,
    /// A request both claimed and given back.
    pub claimed_and_returned: u64,
    /// Hold ends with no hold to end.
    pub orphan_ends: u64,
    /// Claims after the deadline, expiries before it.
    pub out_of_time: u64,
    /// Holds still `held` past their deadline + slack at the end.
    pub stuck: u64,
    /// `|issued_total − returned + remaining − stock|` (0 when `remaining`
    /// is unknown).
    pub invariant_off: u64,
}

impl HoldAudit {
    /// The sum of the holds' figures that must be zero.
    pub fn failures(&self) -> u64 {
        self.rank_conflicts
            + self.claimed_and_returned
            + self.orphan_ends
            + self.out_of_time
            + self.stuck
            + self.invariant_off
    }
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
            + self.misrouted
            + self
                .store
                .as_ref()
                .map_or(0, |s| u64::from(s.counter_mismatch))
            + self.holds.as_ref().map_or(0, HoldAudit::failures)
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

/// How the event stood when the audit looked (for the holds' checks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEnd {
    /// When, µs since the epoch.
    pub at: u64,
    /// Stock left then, as the api (or the store) said.
    pub remaining: Option<u64>,
    /// How long past its deadline a hold may still be open before it is
    /// `stuck` (the expiry sweep's period and the ledger's delay), µs.
    pub slack_us: u64,
}

/// Audits one event. `accepted` maps each accepted request id to its user;
/// `outcomes` holds every outcome record of the event, in observed order.
pub fn audit(
    terms: EventTerms,
    accepted: &HashMap<Uuid, String>,
    outcomes: &[Outcome],
    ledger: Option<&Ledger>,
) -> Audit {
    audit_with_holds(
        terms,
        accepted,
        &HashSet::new(),
        outcomes,
        &[],
        ledger,
        None,
    )
}

/// One step of the ledger, in the store's order.
enum Step<'a> {
    Issue(&'a Outcome, u32),
    End(&'a HoldOutcome),
}

/// Where a request's coupon stands in the replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Issued with no claim window: final at once.
    Final,
    /// A hold: `held`, `claimed`, `released` or `expired`.
    Hold(HoldState),
}

/// [`audit`], with the requests in doubt (sent, never acknowledged: see the
/// module's notes), the event's hold ends (`holds`, every record, replays
/// included) and how the event stood at the end (`end`), which the holds'
/// invariant and deadline checks need.
pub fn audit_with_holds(
    terms: EventTerms,
    accepted: &HashMap<Uuid, String>,
    in_doubt: &HashSet<Uuid>,
    outcomes: &[Outcome],
    holds: &[HoldOutcome],
    ledger: Option<&Ledger>,
    end: Option<&AuditEnd>,
) -> Audit {
    let mut a = Audit {
        accepted: accepted.len() as u64,
        ..Audit::default()
    };
    let limit = u64::from(terms.per_user_limit);
    let stock = u64::from(terms.stock);

    // Outcome side: first decisions, replays, ranks per request.
    let mut first: HashMap<Uuid, &Outcome> = HashMap::new();
    let mut issued_ranks: HashMap<Uuid, HashSet<u32>> = HashMap::new();
    let mut steps: Vec<(u64, u64, Step<'_>)> = Vec::new();
    for o in outcomes {
        if o.result == DecisionResult::Issued {
            let rank = o.issued_rank.unwrap_or(0);
            if issued_ranks.entry(o.request_id).or_default().insert(rank) {
                steps.push((o.generation, o.decision_seq, Step::Issue(o, rank)));
            }
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
    // A hold end delivered twice is one end.
    let mut seen_ends: HashSet<(Uuid, HoldState, u64)> = HashSet::new();
    for h in holds {
        if seen_ends.insert((h.request_id, h.state, h.decision_seq)) {
            steps.push((h.generation, h.decision_seq, Step::End(h)));
        }
    }
    // The store's order; within one sequence number (a replayed decision
    // that changed its rank) an issue before an end.
    steps.sort_by_key(|(g, seq, s)| (*g, *seq, matches!(s, Step::End(_))));

    let replay = replay(terms, &steps, end);
    double_outcomes += replay.over_limit;
    let beyond_stock = issued_ranks
        .values()
        .flatten()
        .filter(|r| u64::from(**r) > stock)
        .count() as u64;
    let oversold_outcomes = replay.peak_over.max(beyond_stock) + replay.holds.rank_conflicts;

    let decided: HashSet<Uuid> = first.keys().copied().collect();
    let accepted_ids: HashSet<Uuid> = accepted.keys().copied().collect();
    a.lost = accepted_ids.difference(&decided).count() as u64;
    let in_doubt: HashSet<Uuid> = in_doubt.difference(&accepted_ids).copied().collect();
    a.in_doubt = in_doubt.len() as u64;
    a.in_doubt_decided = in_doubt.intersection(&decided).count() as u64;
    let unknown = |id: &Uuid| !accepted_ids.contains(id) && !in_doubt.contains(id);
    let mut phantom: HashSet<Uuid> = decided.iter().copied().filter(|id| unknown(id)).collect();

    // Store side, cross-checked.
    let (mut oversold_store, mut double_store) = (0, 0);
    let mut remaining = end.and_then(|e| e.remaining);
    a.undersell = undersell(
        stock,
        &first,
        holds,
        ledger.map_or(1, |l| l.state.buckets()),
    );
    if let Some(ledger) = ledger {
        a.misrouted = misrouted(ledger, outcomes);
        let coupons = ledger.coupons.len() as u64;
        oversold_store = coupons.saturating_sub(stock);
        let mut by_user: HashMap<&str, u64> = HashMap::new();
        let mut ids: HashSet<Uuid> = HashSet::new();
        for c in &ledger.coupons {
            *by_user.entry(c.user_id.as_str()).or_default() += 1;
            if !ids.insert(c.request_id) {
                double_store += 1;
            }
            if unknown(&c.request_id) {
                phantom.insert(c.request_id);
            }
        }
        double_store += by_user
            .values()
            .map(|n| n.saturating_sub(limit))
            .sum::<u64>();
        a.ledger_mismatch = replay.holding.symmetric_difference(&ids).count() as u64;
        if ledger.state.claim_window_us > 0 || !ledger.holds.is_empty() {
            // Every hold as the store keeps it, against the ledger's replay.
            let mut in_store: HashSet<Uuid> = HashSet::new();
            for sh in &ledger.holds {
                in_store.insert(sh.request_id);
                if replay.hold_states.get(&sh.request_id) != Some(&sh.state) {
                    a.ledger_mismatch += 1;
                }
            }
            a.ledger_mismatch += replay
                .hold_states
                .keys()
                .filter(|id| !in_store.contains(*id))
                .count() as u64;
        }
        a.store = Some(StoreFigures {
            coupons,
            remaining: u64::from(ledger.state.remaining),
            holders: ledger.holders.iter().filter(|(_, n)| *n > 0).count() as u64,
            counter_mismatch: coupons + u64::from(ledger.state.remaining)
                != u64::from(ledger.state.stock),
        });
        remaining = remaining.or(Some(u64::from(ledger.state.remaining)));
    }
    a.oversold = oversold_outcomes.max(oversold_store);
    a.double_issued = double_outcomes.max(double_store);
    a.phantom = phantom.len() as u64;
    if replay.any_hold || !holds.is_empty() {
        let mut h = replay.holds;
        h.remaining = remaining;
        h.invariant_off = remaining.map_or(0, |left| {
            (h.issued_total + left).abs_diff(h.returned + stock)
        });
        a.holds = Some(h);
    }
    a
}

/// Stock minus the coupons out when the first `sold_out` was decided (see
/// the module doc). The first `sold_out` is the earliest by `decided_at`;
/// its own bucket is counted in the store's exact order (its decision
/// numbers), the other buckets by `decided_at` (the deciding issuers'
/// clocks: there is no order across buckets). `k` is the event's bucket
/// count (1 when unknown); with one bucket the figure is exact, and 0.
fn undersell(stock: u64, first: &HashMap<Uuid, &Outcome>, holds: &[HoldOutcome], k: u32) -> u64 {
    let Some(sold_out) = first
        .values()
        .filter(|o| o.result == DecisionResult::SoldOut && o.decision_seq > 0)
        .min_by_key(|o| (o.decided_at, o.decision_seq))
    else {
        return 0;
    };
    let bucket = owner(sold_out.decision_seq, k);
    let before = |seq: u64, decided_at: u64| {
        if owner(seq, k) == bucket {
            seq < sold_out.decision_seq
        } else {
            decided_at <= sold_out.decided_at
        }
    };
    let issued = first
        .values()
        .filter(|o| o.result == DecisionResult::Issued && before(o.decision_seq, o.decided_at))
        .count() as u64;
    let returned: HashSet<Uuid> = holds
        .iter()
        .filter(|h| h.state.returned() && before(h.decision_seq, h.decided_at))
        .map(|h| h.request_id)
        .collect();
    stock.saturating_sub(issued.saturating_sub(returned.len() as u64))
}

/// Coupons whose rank belongs to another bucket than their user's, in the
/// store's ledger or the outcomes (the worse); 0 for an unbucketed event.
fn misrouted(ledger: &Ledger, outcomes: &[Outcome]) -> u64 {
    let k = ledger.state.buckets();
    if k == 1 {
        return 0;
    }
    let wrong = |rank: u32, user: &str| owner(u64::from(rank), k) != bucket_of(user, k);
    let in_store = ledger
        .coupons
        .iter()
        .filter(|c| wrong(c.rank, &c.user_id))
        .count() as u64;
    let in_outcomes: HashSet<(Uuid, u32)> = outcomes
        .iter()
        .filter_map(|o| o.issued_rank.map(|r| (o, r)))
        .filter(|(o, r)| o.result == DecisionResult::Issued && wrong(*r, &o.user_id))
        .map(|(o, r)| (o.request_id, r))
        .collect();
    in_store.max(in_outcomes.len() as u64)
}

/// What replaying the ledger in the store's order found.
struct Replayed {
    holds: HoldAudit,
    /// Requests holding a coupon at the end (issued, not given back).
    holding: HashSet<Uuid>,
    /// Where each hold stands at the end.
    hold_states: HashMap<Uuid, HoldState>,
    /// The most coupons held beyond stock at one moment.
    peak_over: u64,
    /// Issues that took a user beyond the per-user limit of coupons held.
    over_limit: u64,
    /// Some coupon was issued as a hold.
    any_hold: bool,
}

fn replay(terms: EventTerms, steps: &[(u64, u64, Step<'_>)], end: Option<&AuditEnd>) -> Replayed {
    let stock = u64::from(terms.stock);
    let mut h = HoldAudit::default();
    let mut standing: HashMap<Uuid, (u32, Standing, Option<u64>, &str)> = HashMap::new();
    let mut holder_of: HashMap<(u64, u32), Uuid> = HashMap::new();
    // Rank → (when the store gave it back, when it was asked to).
    let mut came_back_at: HashMap<(u64, u32), (u64, u64)> = HashMap::new();
    let mut per_user: HashMap<&str, u64> = HashMap::new();
    let (mut gaps, mut from_action) = (latency::histogram(), latency::histogram());
    let (mut live, mut peak_over, mut over_limit, mut any_hold) = (0u64, 0u64, 0u64, false);
    for (generation, _, step) in steps {
        match step {
            Step::Issue(o, rank) => {
                let key = (*generation, *rank);
                if holder_of.insert(key, o.request_id).is_some() {
                    h.rank_conflicts += 1;
                }
                if standing.contains_key(&o.request_id) {
                    // A second rank for one request: a double issue,
                    // counted from the ranks; one request holds one coupon.
                    continue;
                }
                h.issued_total += 1;
                if let Some((back, asked)) = came_back_at.remove(&key) {
                    h.reissued += 1;
                    latency::record(&mut gaps, o.decided_at.saturating_sub(back));
                    latency::record(&mut from_action, o.decided_at.saturating_sub(asked));
                }
                let s = match o.hold_until {
                    Some(_) => {
                        any_hold = true;
                        h.issued += 1;
                        Standing::Hold(HoldState::Held)
                    }
                    None => Standing::Final,
                };
                standing.insert(o.request_id, (*rank, s, o.hold_until, o.user_id.as_str()));
                live += 1;
                peak_over = peak_over.max(live.saturating_sub(stock));
                let n = per_user.entry(o.user_id.as_str()).or_default();
                *n += 1;
                if *n > u64::from(terms.per_user_limit) {
                    over_limit += 1;
                }
            }
            Step::End(e) => {
                let Some((rank, s, until, user)) = standing.get_mut(&e.request_id) else {
                    h.orphan_ends += 1;
                    continue;
                };
                if *rank != e.issued_rank {
                    h.orphan_ends += 1;
                    continue;
                }
                match (*s, e.state) {
                    (Standing::Hold(HoldState::Held), to) if to != HoldState::Held => {
                        *s = Standing::Hold(to);
                        let deadline = until.unwrap_or(u64::MAX);
                        match to {
                            HoldState::Claimed => {
                                h.claimed += 1;
                                if e.action_at > deadline {
                                    h.out_of_time += 1;
                                }
                            }
                            HoldState::Released => h.cancelled += 1,
                            HoldState::Expired => {
                                h.expired += 1;
                                if e.action_at < deadline {
                                    h.out_of_time += 1;
                                }
                            }
                            HoldState::Held => {}
                        }
                        if to.returned() {
                            h.returned += 1;
                            live = live.saturating_sub(1);
                            if let Some(n) = per_user.get_mut(&**user) {
                                *n = n.saturating_sub(1);
                            }
                            let key = (*generation, *rank);
                            if holder_of.get(&key) == Some(&e.request_id) {
                                holder_of.remove(&key);
                            }
                            came_back_at.insert(key, (e.decided_at, e.action_at));
                        }
                    }
                    (Standing::Hold(HoldState::Claimed), to) if to.returned() => {
                        h.claimed_and_returned += 1;
                    }
                    (Standing::Hold(from), HoldState::Claimed) if from.returned() => {
                        h.claimed_and_returned += 1;
                    }
                    _ => h.orphan_ends += 1,
                }
            }
        }
    }
    let mut holding = HashSet::new();
    let mut hold_states = HashMap::new();
    for (id, (_, s, until, _)) in &standing {
        if let Standing::Hold(state) = s {
            hold_states.insert(*id, *state);
        }
        match s {
            Standing::Final | Standing::Hold(HoldState::Claimed) => {
                holding.insert(*id);
            }
            Standing::Hold(HoldState::Held) => {
                holding.insert(*id);
                let due = until
                    .unwrap_or(0)
                    .saturating_add(end.map_or(0, |e| e.slack_us));
                match end {
                    Some(e) if e.at > due => h.stuck += 1,
                    _ => h.open += 1,
                }
            }
            Standing::Hold(_) => {}
        }
    }
    h.release_to_reissue_ms = latency::summary(&gaps);
    h.action_to_reissue_ms = latency::summary(&from_action);
    Replayed {
        holds: h,
        holding,
        hold_states,
        peak_over,
        over_limit,
        any_hold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use couponrush_core::store::{Coupon, EventState, Hold};
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
            hold_until: None,
        }
    }

    /// Users of bucket `b` of `k` (FNV routing), for bucketed fixtures.
    fn users_of(b: u32, k: u32, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("u{i}"))
            .filter(|u| bucket_of(u, k) == b)
            .take(n)
            .collect()
    }

    /// A clean bucketed drop (stock 4 over 2 buckets: ranks 1, 3 in bucket
    /// 0 and 2, 4 in bucket 1), then the same with one user issued in both
    /// buckets: the double issue is caught (per-user limit, across
    /// buckets) and so is the misrouting.
    #[test]
    fn one_user_issued_in_two_buckets_is_a_double_issue() {
        let terms = EventTerms {
            stock: 4,
            per_user_limit: 1,
        };
        let (b0, b1) = (users_of(0, 2, 2), users_of(1, 2, 2));
        let coupons = [
            (1, 1, b0[0].as_str()),
            (3, 2, b0[1].as_str()),
            (2, 3, b1[0].as_str()),
            (4, 4, b1[1].as_str()),
        ];
        let run = |coupons: &[(u32, u128, &str)]| {
            let outcomes: Vec<Outcome> = coupons
                .iter()
                .map(|(rank, id, user)| outcome(*id, user, DecisionResult::Issued, Some(*rank)))
                .collect();
            let accepted: HashMap<Uuid, String> = coupons
                .iter()
                .map(|(_, id, user)| (Uuid::from_u128(*id), user.to_string()))
                .collect();
            let mut l = ledger(coupons, 0);
            l.state.stock = 4;
            l.state.stock_buckets = 2;
            audit(terms, &accepted, &outcomes, Some(&l))
        };
        let clean = run(&coupons);
        assert_eq!(clean.failures(), 0, "{clean:?}");
        // The planted fault: bucket 1's second coupon goes to a user of
        // bucket 0 who already holds one.
        let mut planted = coupons;
        planted[3].2 = b0[0].as_str();
        let caught = run(&planted);
        assert_eq!(caught.double_issued, 1, "{caught:?}");
        assert_eq!(caught.misrouted, 1, "{caught:?}");
        assert!(caught.failures() > 0);
    }

    #[test]
    fn undersell_is_the_stock_left_when_the_first_sold_out_was_decided() {
        let terms = EventTerms {
            stock: 4,
            per_user_limit: 1,
        };
        // (request and decision number, user, result, rank, decided_at)
        let of = |rows: &[(u128, &str, DecisionResult, Option<u32>, u64)]| -> Vec<Outcome> {
            rows.iter()
                .map(|(id, user, result, rank, at)| {
                    let mut o = outcome(*id, user, *result, *rank);
                    o.decided_at = *at;
                    o
                })
                .collect()
        };
        let accepted = |os: &[Outcome]| -> HashMap<Uuid, String> {
            os.iter()
                .map(|o| (o.request_id, o.user_id.clone()))
                .collect()
        };
        let with_buckets = |k: u32| {
            let mut l = ledger(&[], 0);
            (l.state.stock, l.state.stock_buckets) = (4, k);
            l
        };
        use DecisionResult::{Issued, SoldOut};
        // Two buckets (odd decision numbers bucket 0, even bucket 1):
        // bucket 0 sells ranks 1 and 3, then runs dry (number 5, at 12)
        // while bucket 1 still holds ranks 2 and 4, sold at 13 and 14.
        let split = of(&[
            (1, "a", Issued, Some(1), 10),
            (3, "b", Issued, Some(3), 11),
            (5, "c", SoldOut, None, 12),
            (2, "d", Issued, Some(2), 13),
            (4, "e", Issued, Some(4), 14),
            (7, "f", SoldOut, None, 15),
        ]);
        let a = audit(terms, &accepted(&split), &split, Some(&with_buckets(2)));
        assert_eq!(a.undersell, 2);
        // One bucket, the sold_out stamped by an issuer whose clock (or
        // whose call) lagged: by decided_at it comes first, but in the
        // store's order every coupon was out: exactly 0.
        let lagging = of(&[
            (1, "a", Issued, Some(1), 20),
            (2, "b", Issued, Some(2), 21),
            (3, "c", Issued, Some(3), 22),
            (4, "d", Issued, Some(4), 23),
            (5, "e", SoldOut, None, 19),
        ]);
        let a = audit(terms, &accepted(&lagging), &lagging, Some(&with_buckets(1)));
        assert_eq!(a.undersell, 0);
        // Nothing answered sold_out: nothing undersold.
        let none: Vec<Outcome> = split
            .iter()
            .filter(|o| o.result == Issued)
            .cloned()
            .collect();
        assert_eq!(audit(terms, &accepted(&none), &none, None).undersell, 0);
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
                claim_window_us: 0,
                released: 0,
                claimed: 0,
                stock_buckets: 1,
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
            free_ranks: Vec::new(),
            holds: Vec::new(),
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
    fn a_request_in_doubt_is_neither_lost_nor_phantom_and_nothing_else_is_excused() {
        let (accepted, mut outcomes, _) = clean();
        // 4 was sent and its answer lost, and it was written: decided, issued.
        // 5 was sent and its answer lost, and never written.
        let doubt: HashSet<Uuid> = [4, 5].into_iter().map(Uuid::from_u128).collect();
        outcomes.push(outcome(4, "d", DecisionResult::Issued, Some(3)));
        let mut ledger = ledger(&[(1, 1, "a"), (2, 2, "b"), (3, 4, "d")], 0);
        ledger.state.stock = 3;
        let terms = EventTerms { stock: 3, ..TERMS };
        let a = audit_with_holds(
            terms,
            &accepted,
            &doubt,
            &outcomes,
            &[],
            Some(&ledger),
            None,
        );
        assert_eq!(a.failures(), 0, "{a:?}");
        assert_eq!((a.in_doubt, a.in_doubt_decided, a.lost), (2, 1, 0));
        // The planted fault: a decision for a request no one sent is still
        // a phantom beside the ones in doubt.
        outcomes.push(outcome(99, "z", DecisionResult::SoldOut, None));
        let a = audit_with_holds(
            terms,
            &accepted,
            &doubt,
            &outcomes,
            &[],
            Some(&ledger),
            None,
        );
        assert_eq!(a.phantom, 1, "{a:?}");
        // And without the doubt, request 4 is a phantom too.
        let a = audit(terms, &accepted, &outcomes, Some(&ledger));
        assert_eq!(a.phantom, 2, "{a:?}");
    }

    #[test]
    fn without_a_store_the_outcomes_alone_are_audited() {
        let (accepted, outcomes, _) = clean();
        let a = audit(TERMS, &accepted, &outcomes, None);
        assert_eq!(a.failures(), 0);
        assert!(a.store.is_none());
    }

    // ---- holds ----------------------------------------------------------

    /// An issue of `rank` to request `id` at sequence `seq`, decided at
    /// `decided_at`, held until `decided_at + 100`.
    fn held(id: u128, user: &str, rank: u32, seq: u64, decided_at: u64) -> Outcome {
        Outcome {
            decision_seq: seq,
            decided_at,
            hold_until: Some(decided_at + 100),
            ..outcome(id, user, DecisionResult::Issued, Some(rank))
        }
    }

    fn end(id: u128, user: &str, rank: u32, state: HoldState, seq: u64, at: u64) -> HoldOutcome {
        HoldOutcome {
            v: WIRE_VERSION,
            kind: couponrush_core::wire::HOLD_KIND.into(),
            request_id: Uuid::from_u128(id),
            event_id: "e".into(),
            user_id: user.into(),
            state,
            issued_rank: rank,
            partition: 0,
            offset: seq as i64,
            action_at: at,
            decided_at: at + 1,
            replay: false,
            decision_seq: seq,
            generation: 1,
        }
    }

    /// A drop with holds, stock 2: a and b win; d is sold out; b cancels and
    /// rank 2 goes to c; a claims; c never claims and expires. At the end a
    /// holds rank 1 and rank 2 is back in stock.
    struct HoldDrop {
        accepted: HashMap<Uuid, String>,
        outcomes: Vec<Outcome>,
        holds: Vec<HoldOutcome>,
        ledger: Ledger,
        end: AuditEnd,
    }

    fn hold_drop() -> HoldDrop {
        let accepted = [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
            .into_iter()
            .map(|(i, u)| (Uuid::from_u128(i), u.to_string()))
            .collect();
        let sold_out = Outcome {
            decision_seq: 3,
            ..outcome(4, "d", DecisionResult::SoldOut, None)
        };
        HoldDrop {
            accepted,
            outcomes: vec![
                held(1, "a", 1, 1, 10),
                held(2, "b", 2, 2, 20),
                sold_out,
                held(3, "c", 2, 5, 70),
            ],
            holds: vec![
                end(2, "b", 2, HoldState::Released, 4, 49),
                end(1, "a", 1, HoldState::Claimed, 6, 60),
                end(3, "c", 2, HoldState::Expired, 7, 171),
            ],
            ledger: ledger(&[(1, 1, "a")], 1),
            end: AuditEnd {
                at: 1_000,
                remaining: Some(1),
                slack_us: 100,
            },
        }
    }

    impl HoldDrop {
        fn audit(&self) -> Audit {
            audit_with_holds(
                TERMS,
                &self.accepted,
                &HashSet::new(),
                &self.outcomes,
                &self.holds,
                Some(&self.ledger),
                Some(&self.end),
            )
        }
    }

    #[test]
    fn a_drop_whose_coupons_come_back_and_go_again_audits_clean() {
        let d = hold_drop();
        let a = d.audit();
        assert_eq!(a.failures(), 0, "{a:?}");
        let h = a.holds.expect("an event with holds has hold figures");
        assert_eq!(
            (
                h.issued,
                h.claimed,
                h.cancelled,
                h.expired,
                h.reissued,
                h.open
            ),
            (3, 1, 1, 1, 1, 0)
        );
        assert_eq!((h.issued_total, h.returned, h.remaining), (3, 2, Some(1)));
        assert_eq!(h.release_to_reissue_ms.count, 1);
        assert!(h.release_to_reissue_ms.max > 0.0);
        // Three requests were issued for a stock of two: neither oversold
        // nor a double issue, since never more than two were held at once.
        assert_eq!((a.issued, a.oversold, a.double_issued), (3, 0, 0));
    }

    #[test]
    fn hold_records_delivered_twice_or_out_of_order_audit_clean() {
        let mut d = hold_drop();
        let mut again = d.holds[0].clone();
        again.replay = true;
        d.holds.push(again);
        d.holds.reverse();
        d.outcomes.reverse();
        assert_eq!(d.audit().failures(), 0, "{:?}", d.audit());
    }

    #[test]
    fn a_remaining_that_does_not_add_up_breaks_the_invariant() {
        let mut d = hold_drop();
        d.end.remaining = Some(2);
        let a = d.audit();
        assert_eq!(a.holds.as_ref().unwrap().invariant_off, 1);
        assert_eq!(a.failures(), 1);
        // A return the ledger never recorded is caught the same way.
        let mut d = hold_drop();
        d.holds.pop();
        let h = d.audit().holds.unwrap();
        assert_eq!(h.invariant_off, 1, "{h:?}");
    }

    #[test]
    fn a_rank_issued_while_still_held_is_a_rank_conflict_and_oversold() {
        let mut d = hold_drop();
        // c gets rank 2 before b gave it back.
        d.outcomes[3].decision_seq = 3;
        d.outcomes[2].decision_seq = 8;
        let a = d.audit();
        assert_eq!(a.holds.as_ref().unwrap().rank_conflicts, 1, "{a:?}");
        assert!(a.oversold >= 1, "three coupons held at once of two");
    }

    #[test]
    fn a_claimed_coupon_given_back_is_claimed_and_returned() {
        let mut d = hold_drop();
        d.holds.push(end(1, "a", 1, HoldState::Expired, 8, 200));
        let h = d.audit().holds.unwrap();
        assert_eq!(h.claimed_and_returned, 1, "{h:?}");
        // And the other way round: a claim after the cancel.
        let mut d = hold_drop();
        d.holds.push(end(2, "b", 2, HoldState::Claimed, 8, 50));
        assert_eq!(d.audit().holds.unwrap().claimed_and_returned, 1);
    }

    #[test]
    fn a_hold_end_without_an_issue_is_an_orphan() {
        for planted in [
            end(9, "z", 2, HoldState::Released, 8, 80), // never issued
            end(2, "b", 1, HoldState::Released, 8, 80), // another rank
            end(2, "b", 2, HoldState::Expired, 8, 130), // already given back
        ] {
            let mut d = hold_drop();
            d.holds.push(planted.clone());
            let a = d.audit();
            assert_eq!(a.holds.as_ref().unwrap().orphan_ends, 1, "{planted:?}");
            assert!(a.failures() >= 1);
        }
        // A hold end before its issue (in the store's order) has nothing
        // to end either.
        let mut d = hold_drop();
        d.holds[0].decision_seq = 1;
        d.outcomes[1].decision_seq = 2;
        d.outcomes[0].decision_seq = 0;
        assert!(d.audit().holds.unwrap().orphan_ends >= 1);
    }

    #[test]
    fn a_hold_still_held_past_its_deadline_is_stuck_but_not_before() {
        let mut d = hold_drop();
        d.holds.pop(); // c's expiry never came
        d.end.remaining = Some(0);
        d.ledger = ledger(&[(1, 1, "a"), (2, 3, "c")], 0);
        let a = d.audit();
        let h = a.holds.as_ref().unwrap();
        assert_eq!((h.stuck, h.open), (1, 0), "{h:?}");
        assert_eq!(a.failures(), 1);
        // Within its window (plus the slack) it is open, not a fault.
        d.end.at = 170 + 100;
        let a = d.audit();
        assert_eq!((a.holds.as_ref().unwrap().open, a.failures()), (1, 0));
    }

    #[test]
    fn a_claim_after_the_deadline_or_an_expiry_before_it_is_out_of_time() {
        let mut d = hold_drop();
        d.holds[1].action_at = 111; // a's hold ran to 110
        assert_eq!(d.audit().holds.unwrap().out_of_time, 1);
        let mut d = hold_drop();
        d.holds[2].action_at = 150; // c's hold ran to 170
        assert_eq!(d.audit().holds.unwrap().out_of_time, 1);
    }

    #[test]
    fn with_holds_oversold_double_and_mismatch_are_still_caught() {
        // A third coupon while two are held.
        let mut d = hold_drop();
        d.accepted.insert(Uuid::from_u128(5), "e".into());
        d.outcomes.push(held(5, "e", 3, 3, 30));
        assert!(d.audit().oversold >= 1);
        // b wins again while holding: beyond the per-user limit...
        let mut d = hold_drop();
        d.accepted.insert(Uuid::from_u128(5), "b".into());
        d.outcomes.push(held(5, "b", 1, 3, 30));
        assert!(d.audit().double_issued >= 1);
        // ...but after giving the first back it is not a double issue.
        let mut d = hold_drop();
        d.accepted.insert(Uuid::from_u128(3), "b".into());
        d.outcomes[3].user_id = "b".into();
        d.holds[2].user_id = "b".into();
        let a = d.audit();
        assert_eq!(a.double_issued, 0, "{a:?}");
        // A store that still lists a coupon given back disagrees.
        let mut d = hold_drop();
        d.ledger = ledger(&[(1, 1, "a"), (2, 2, "b")], 1);
        let a = d.audit();
        assert_eq!(a.ledger_mismatch, 1);
        assert!(a.store.unwrap().counter_mismatch);
    }

    #[test]
    fn a_store_whose_holds_disagree_with_the_ledger_is_a_ledger_mismatch() {
        let store_hold = |id: u128, user: &str, rank: u32, state: HoldState| Hold {
            request_id: Uuid::from_u128(id),
            user_id: user.into(),
            rank,
            until: 0,
            state,
            ended_at: 0,
            end_seq: 0,
        };
        let mut d = hold_drop();
        d.ledger.state.claim_window_us = 100;
        d.ledger.holds = vec![
            store_hold(1, "a", 1, HoldState::Claimed),
            store_hold(2, "b", 2, HoldState::Released),
            store_hold(3, "c", 2, HoldState::Expired),
        ];
        let a = d.audit();
        assert_eq!(a.failures(), 0, "{a:?}");
        // The store says a's hold is still held; the ledger says claimed.
        d.ledger.holds[0].state = HoldState::Held;
        assert_eq!(d.audit().ledger_mismatch, 1);
        // The store lost c's hold.
        d.ledger.holds[0].state = HoldState::Claimed;
        d.ledger.holds.pop();
        assert_eq!(d.audit().ledger_mismatch, 1);
    }

    #[test]
    fn a_drop_without_holds_has_no_hold_figures() {
        let (accepted, outcomes, ledger) = clean();
        let a = audit_with_holds(
            TERMS,
            &accepted,
            &HashSet::new(),
            &outcomes,
            &[],
            Some(&ledger),
            Some(&AuditEnd {
                at: 1,
                remaining: Some(0),
                slack_us: 0,
            }),
        );
        assert!(a.holds.is_none());
        assert_eq!(a.failures(), 0);
    }
}
