//! The report of one drop: built from raw facts, printed for humans, written
//! as JSON for machines (schema `couponrush.report/v1`, documented in
//! docs/REPORT.md).
//!
//! The same [`Report::build`] serves a fresh run and a merge of several runs,
//! so a merged report is computed exactly like a single one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use couponrush_core::store::Ledger;
use couponrush_core::wire::HoldOutcome;
use couponrush_core::{DecisionResult, Outcome};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::drive::holders::HoldActions;
use crate::drive::Acceptance;
use crate::measure::audit::{audit_with_holds, AuditEnd, EventTerms, HoldAudit, StoreFigures};
use crate::measure::latency::{self, LatencySummary};
use crate::measure::skew::{skew, Ordered, Skew};
use crate::observe::{Observed, ObservedHold};
use crate::Error;

/// The schema name written into every report.
pub const SCHEMA: &str = "couponrush.report/v1";

/// Everything measured in a run, before any figure is computed.
pub struct Facts {
    /// The run's settings, as given.
    pub config: serde_json::Value,
    /// Event id.
    pub event_id: String,
    /// Stock and per-user limit.
    pub terms: EventTerms,
    /// When sending started (µs since the epoch).
    pub started_at: u64,
    /// When sending ended.
    pub load_finished_at: u64,
    /// When draining ended.
    pub finished_at: u64,
    /// Logical requests.
    pub requests: u64,
    /// Sends, retries included.
    pub sends: u64,
    /// Answers by kind.
    pub answers: BTreeMap<String, u64>,
    /// Accepted requests.
    pub accepted: HashMap<Uuid, Acceptance>,
    /// Requests in doubt (sent, the answer lost or `503 unacknowledged`),
    /// none of them accepted.
    pub in_doubt: HashSet<Uuid>,
    /// Those of them found in the requests topic, with their users: they
    /// were written, so they are judged as accepted (undecided is lost).
    pub in_doubt_written: HashMap<Uuid, String>,
    /// Outcomes of the event, in read order.
    pub outcomes: Vec<Observed>,
    /// Hold ends of the event, in read order.
    pub holds: Vec<ObservedHold>,
    /// What the holders did (a drop with holds).
    pub hold_actions: Option<HoldActions>,
    /// How the event stood at the end (for the holds' audit).
    pub end: Option<AuditEnd>,
    /// DLQ records by reason.
    pub dlq: BTreeMap<String, u64>,
    /// The store's ledger of the event, when audited.
    pub ledger: Option<Ledger>,
    /// Accept latency from the intended time.
    pub accept: Histogram<u64>,
    /// Accept latency from the actual send.
    pub accept_uncorrected: Histogram<u64>,
    /// Remarks for the reader.
    pub notes: Vec<String>,
    /// False when outcomes were not watched (load only): nothing is judged.
    pub observed: bool,
}

/// Rates over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Accepted requests per second of load.
    pub accepted_per_s: f64,
    /// First decisions per second, from the start to the last decision.
    pub decided_per_s: f64,
    /// Coupons per second, from the start to the last coupon.
    pub issued_per_s: f64,
    /// Time from the start until the last coupon was observed issued.
    pub sold_out_after_ms: Option<f64>,
    /// Per-second counts.
    pub series: Vec<Second>,
}

/// Counts within one second of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the start.
    pub t: u64,
    /// Requests accepted in this second.
    pub accepted: u64,
    /// Requests first decided (observed) in this second.
    pub decided: u64,
    /// Coupons issued (observed) in this second.
    pub issued: u64,
}

/// Latency summaries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    /// HTTP accept latency, from the intended send time.
    pub accept: LatencySummary,
    /// HTTP accept latency, from the actual send time.
    pub accept_uncorrected: LatencySummary,
    /// Intended send → outcome observed.
    pub e2e: LatencySummary,
}

/// Serialised HDR histograms (V2 + deflate, base64), for exact merges.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histograms {
    /// Accept, corrected.
    pub accept: String,
    /// Accept, uncorrected.
    pub accept_uncorrected: String,
    /// End to end.
    pub e2e: String,
}

/// One accepted request, raw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawAccept {
    /// Request id.
    pub request_id: Uuid,
    /// How it was accepted.
    #[serde(flatten)]
    pub acceptance: Acceptance,
}

/// One outcome record, raw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawOutcome {
    /// The record.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// When it was observed.
    pub observed_at: u64,
    /// The issuer that published it, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// Who decided what: each request's first decision, counted by the issuer
/// that published it and by the partition its record was on. Shows whether
/// the work was spread (`--partitioner spread`) or fell on one partition and
/// one issuer (`--partitioner event`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shares {
    /// First decisions by issuer client id (`unknown` when an outcome did
    /// not say).
    pub by_issuer: BTreeMap<String, u64>,
    /// First decisions by request partition.
    pub by_partition: BTreeMap<i32, u64>,
}

impl Shares {
    /// The largest share one issuer took, 0..=1 (0 when nothing was decided).
    pub fn busiest_issuer(&self) -> f64 {
        let total: u64 = self.by_issuer.values().sum();
        let max = self.by_issuer.values().copied().max().unwrap_or(0);
        if total == 0 {
            0.0
        } else {
            max as f64 / total as f64
        }
    }
}

/// One hold end, raw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawHold {
    /// The record.
    #[serde(flatten)]
    pub hold: HoldOutcome,
    /// When it was observed.
    pub observed_at: u64,
}

/// The raw facts, so merges can recompute every figure exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Raw {
    /// Accepted requests.
    pub accepted: Vec<RawAccept>,
    /// Requests in doubt, never accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_doubt: Vec<Uuid>,
    /// Those found written in the requests topic, with their users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_doubt_written: Vec<(Uuid, String)>,
    /// Outcome records.
    pub outcomes: Vec<RawOutcome>,
    /// Hold end records (a drop with holds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<RawHold>,
    /// How the event stood at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<AuditEnd>,
    /// The store's coupons, when audited.
    pub ledger: Option<Ledger>,
}

/// The report of one drop (or a merge of several).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// The settings of the run.
    pub config: serde_json::Value,
    /// Event id.
    pub event_id: String,
    /// Coupons available.
    pub stock: u32,
    /// Coupons per user.
    pub per_user_limit: u32,
    /// Start, µs since the epoch.
    pub started_at: u64,
    /// Seconds of load.
    pub load_seconds: f64,
    /// Seconds spent waiting for the last decisions.
    pub drain_seconds: f64,
    /// Logical requests.
    pub requests: u64,
    /// Sends (retries included).
    pub sends: u64,
    /// Answers by kind.
    pub answers: BTreeMap<String, u64>,
    /// Distinct requests accepted.
    pub accepted: u64,
    /// Distinct requests decided.
    pub decided: u64,
    /// Distinct requests issued a coupon.
    pub issued: u64,
    /// Outcome records restating an earlier decision.
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
    /// Requests in doubt: sent, and the answer lost or `503
    /// unacknowledged` (the broker may have written them); never accepted
    /// by a retry. Not a fault: the client was told it does not know.
    #[serde(default)]
    pub in_doubt: u64,
    /// Of those, decided after all (they had been written).
    #[serde(default)]
    pub in_doubt_decided: u64,
    /// Requests in doubt found in the requests topic at the end: written,
    /// so judged as accepted (counted in `accepted`; undecided, in `lost`).
    #[serde(default)]
    pub in_doubt_written: u64,
    /// Replays that disagree with the first decision.
    pub inconsistent_replays: u64,
    /// Outcomes and store disagree on who holds a coupon.
    pub ledger_mismatch: u64,
    /// An event with stock buckets: coupons whose rank is not of their
    /// user's bucket.
    #[serde(default)]
    pub misrouted: u64,
    /// Stock minus the coupons out when the first `sold_out` was decided
    /// (by `decided_at`): the undersell stock buckets cost (0 unbucketed).
    /// Reported, not judged.
    #[serde(default)]
    pub undersell: u64,
    /// Buckets the event's stock is split over, as its ledger said (1
    /// when unbucketed or not audited).
    #[serde(default = "one")]
    pub stock_buckets: u32,
    /// DLQ records during the run.
    pub dlq: u64,
    /// DLQ records by reason.
    pub dlq_reasons: BTreeMap<String, u64>,
    /// The store's figures, when audited.
    pub store: Option<StoreFigures>,
    /// A drop with holds: issued, claimed, cancelled, expired, re-issued,
    /// the invariant and the holds' faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holds: Option<HoldAudit>,
    /// A drop with holds: what the winners chose and how the api answered
    /// their claims and cancels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_actions: Option<HoldActions>,
    /// First decisions by issuer and by partition.
    #[serde(default)]
    pub shares: Shares,
    /// Rates.
    pub throughput: Throughput,
    /// Latencies in milliseconds.
    pub latency_ms: Latencies,
    /// Ordering skew.
    pub skew: Skew,
    /// False when the skew could not be recomputed exactly (a merge without raw data).
    pub skew_exact: bool,
    /// The histograms, serialised.
    pub histograms: Histograms,
    /// True when every correctness figure is zero (or nothing was judged).
    pub passed: bool,
    /// False for a load-only run (`--no-observe`): correctness not judged.
    #[serde(default = "yes")]
    pub observed: bool,
    /// Remarks.
    pub notes: Vec<String>,
    /// Raw facts (absent with --no-raw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Raw>,
}

impl Report {
    /// Computes every figure from `facts`; keeps the raw facts if `keep_raw`.
    pub fn build(mut facts: Facts, keep_raw: bool) -> Report {
        let outcomes: Vec<Outcome> = facts.outcomes.iter().map(|o| o.outcome.clone()).collect();
        let holds: Vec<HoldOutcome> = facts.holds.iter().map(|h| h.hold.clone()).collect();
        let mut users: HashMap<Uuid, String> = facts
            .accepted
            .iter()
            .map(|(id, a)| (*id, a.user_id.clone()))
            .collect();
        // A request in doubt found in the log was written: judged as accepted.
        let mut doubt = facts.in_doubt.clone();
        let mut written = 0;
        for (id, user) in &facts.in_doubt_written {
            if doubt.remove(id) {
                users.entry(*id).or_insert_with(|| user.clone());
                written += 1;
            }
        }
        let mut a = audit_with_holds(
            facts.terms,
            &users,
            &doubt,
            &outcomes,
            &holds,
            facts.ledger.as_ref(),
            facts.end.as_ref(),
        );
        if !facts.observed {
            // Load only: nothing was watched, so nothing can be judged.
            a.lost = 0;
            facts.notes.push(
                "load only (--no-observe): decisions not watched, correctness not judged".into(),
            );
        }

        // First decision per request, with when it was observed.
        let mut first: HashMap<Uuid, &Observed> = HashMap::new();
        for o in &facts.outcomes {
            first.entry(o.outcome.request_id).or_insert(o);
        }
        let mut e2e = latency::histogram();
        let mut ordered = Vec::with_capacity(first.len());
        for (id, o) in &first {
            if let Some(acc) = facts.accepted.get(id) {
                latency::record(&mut e2e, o.observed_at.saturating_sub(acc.intended_at));
                ordered.push(Ordered {
                    accepted_at: acc.accepted_at,
                    request_id: *id,
                    decision_seq: o.outcome.decision_seq,
                    result: o.outcome.result,
                });
            }
        }
        let skew = skew(&ordered, facts.terms.stock);
        let mut shares = Shares::default();
        for o in first.values() {
            let issuer = o.issuer.clone().unwrap_or_else(|| "unknown".into());
            *shares.by_issuer.entry(issuer).or_default() += 1;
            *shares.by_partition.entry(o.outcome.partition).or_default() += 1;
        }

        let secs = |t: u64| t.saturating_sub(facts.started_at) as f64 / 1e6;
        let load_seconds = secs(facts.load_finished_at).max(1e-6);
        let last_decided = first.values().map(|o| o.observed_at).max();
        let last_issued = first
            .values()
            .filter(|o| o.outcome.result == DecisionResult::Issued)
            .map(|o| o.observed_at)
            .max();
        let per_s = |n: u64, until: Option<u64>| match until {
            Some(t) if secs(t) > 0.0 => n as f64 / secs(t),
            _ => 0.0,
        };
        let mut series: BTreeMap<u64, Second> = BTreeMap::new();
        let mut bump = |t: u64, f: fn(&mut Second)| {
            let s = t.saturating_sub(facts.started_at) / 1_000_000;
            f(series.entry(s).or_insert_with(|| Second {
                t: s,
                ..Second::default()
            }));
        };
        for acc in facts.accepted.values() {
            bump(acc.accepted_at, |s| s.accepted += 1);
        }
        for o in first.values() {
            bump(o.observed_at, |s| s.decided += 1);
            if o.outcome.result == DecisionResult::Issued {
                bump(o.observed_at, |s| s.issued += 1);
            }
        }
        let throughput = Throughput {
            accepted_per_s: a.accepted as f64 / load_seconds,
            decided_per_s: per_s(a.decided, last_decided),
            issued_per_s: per_s(a.issued, last_issued),
            sold_out_after_ms: (a.issued >= u64::from(facts.terms.stock) && a.issued > 0)
                .then(|| last_issued.map(|t| secs(t) * 1000.0))
                .flatten(),
            series: series.into_values().collect(),
        };

        let passed = a.failures() == 0;
        let raw = keep_raw.then(|| Raw {
            accepted: facts
                .accepted
                .iter()
                .map(|(id, acc)| RawAccept {
                    request_id: *id,
                    acceptance: acc.clone(),
                })
                .collect(),
            in_doubt: facts.in_doubt.iter().copied().collect(),
            in_doubt_written: facts
                .in_doubt_written
                .iter()
                .map(|(id, u)| (*id, u.clone()))
                .collect(),
            outcomes: facts
                .outcomes
                .iter()
                .map(|o| RawOutcome {
                    outcome: o.outcome.clone(),
                    observed_at: o.observed_at,
                    issuer: o.issuer.clone(),
                })
                .collect(),
            holds: facts
                .holds
                .iter()
                .map(|h| RawHold {
                    hold: h.hold.clone(),
                    observed_at: h.observed_at,
                })
                .collect(),
            end: facts.end,
            ledger: facts.ledger.clone(),
        });
        Report {
            schema: SCHEMA.into(),
            config: facts.config,
            event_id: facts.event_id,
            stock: facts.terms.stock,
            per_user_limit: facts.terms.per_user_limit,
            started_at: facts.started_at,
            load_seconds,
            drain_seconds: facts.finished_at.saturating_sub(facts.load_finished_at) as f64 / 1e6,
            requests: facts.requests,
            sends: facts.sends,
            answers: facts.answers,
            accepted: a.accepted,
            decided: a.decided,
            issued: a.issued,
            replays: a.replays,
            results: a.results.clone(),
            oversold: a.oversold,
            double_issued: a.double_issued,
            lost: a.lost,
            phantom: a.phantom,
            in_doubt: a.in_doubt,
            in_doubt_decided: a.in_doubt_decided,
            in_doubt_written: written,
            inconsistent_replays: a.inconsistent_replays,
            ledger_mismatch: a.ledger_mismatch,
            misrouted: a.misrouted,
            undersell: a.undersell,
            stock_buckets: facts.ledger.as_ref().map_or(1, |l| l.state.buckets()),
            dlq: facts.dlq.values().sum(),
            dlq_reasons: facts.dlq,
            store: a.store.clone(),
            holds: a.holds.clone(),
            hold_actions: facts.hold_actions,
            shares,
            throughput,
            latency_ms: Latencies {
                accept: latency::summary(&facts.accept),
                accept_uncorrected: latency::summary(&facts.accept_uncorrected),
                e2e: latency::summary(&e2e),
            },
            skew,
            skew_exact: true,
            histograms: Histograms {
                accept: latency::encode(&facts.accept),
                accept_uncorrected: latency::encode(&facts.accept_uncorrected),
                e2e: latency::encode(&e2e),
            },
            passed,
            observed: facts.observed,
            notes: facts.notes,
            raw,
        }
    }

    /// Sum of the figures that must be zero (the DLQ is reported, not judged:
    /// poison may be deliberate).
    pub fn failures(&self) -> u64 {
        self.oversold
            + self.double_issued
            + self.lost
            + self.phantom
            + self.misrouted
            + self.inconsistent_replays
            + self.ledger_mismatch
            + self
                .store
                .as_ref()
                .map_or(0, |s| u64::from(s.counter_mismatch))
            + self.holds.as_ref().map_or(0, HoldAudit::failures)
    }

    /// The human summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let n = |x: u64| group(x);
        let _ = writeln!(
            s,
            "couponrush drop report: event {}, stock {}, per-user limit {}",
            self.event_id,
            n(u64::from(self.stock)),
            self.per_user_limit
        );
        if let Some(load) = self.config.get("load").and_then(|v| v.as_str()) {
            let _ = writeln!(s, "  load         {load}");
        }
        let failed: u64 = self
            .answers
            .iter()
            .filter(|(k, _)| k.as_str() != "202")
            .map(|(_, v)| v)
            .sum();
        let _ = writeln!(
            s,
            "  requests     {} sent as {} sends; accepted {}, not accepted {}{}",
            n(self.requests),
            n(self.sends),
            n(self.accepted),
            n(failed),
            if failed > 0 {
                format!(
                    " {:?}",
                    self.answers
                        .iter()
                        .filter(|(k, _)| k.as_str() != "202")
                        .collect::<Vec<_>>()
                )
            } else {
                String::new()
            }
        );
        let results: Vec<String> = self
            .results
            .iter()
            .map(|(k, v)| format!("{k} {}", n(*v)))
            .collect();
        let _ = writeln!(
            s,
            "  decided      {} ({}); replays {}",
            n(self.decided),
            results.join(", "),
            n(self.replays)
        );
        let sold = self
            .throughput
            .sold_out_after_ms
            .map(|ms| format!("; sold out after {ms:.0} ms"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  throughput   accepted {:.0}/s, decided {:.0}/s, issued {:.0}/s{sold}",
            self.throughput.accepted_per_s,
            self.throughput.decided_per_s,
            self.throughput.issued_per_s
        );
        let _ = writeln!(
            s,
            "  latency ms       {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "p99.99", "max"
        );
        for (name, l) in [
            ("accept", &self.latency_ms.accept),
            ("  uncorrected", &self.latency_ms.accept_uncorrected),
            ("end-to-end", &self.latency_ms.e2e),
        ] {
            let _ = writeln!(
                s,
                "    {name:<13}{:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                l.p50, l.p90, l.p99, l.p999, l.p9999, l.max
            );
        }
        let k = &self.skew;
        let _ = writeln!(
            s,
            "  ordering     {:.3}% of {} pairs inverted; displacement p50 {}, p99 {}, max {}{}",
            k.inversion_ratio * 100.0,
            n(k.pairs),
            n(k.displacement_p50),
            n(k.displacement_p99),
            n(k.displacement_max),
            if self.skew_exact {
                ""
            } else {
                " (approximate: merged without raw data)"
            }
        );
        let _ = writeln!(
            s,
            "  fairness     late winners {}, early losers {}",
            n(k.late_winners),
            n(k.early_losers)
        );
        let _ = writeln!(
            s,
            "  correctness  oversold {}, double issued {}, lost {}, phantom {}, inconsistent replays {}, ledger mismatch {}",
            self.oversold, self.double_issued, self.lost, self.phantom, self.inconsistent_replays, self.ledger_mismatch
        );
        if self.stock_buckets > 1 || self.undersell > 0 || self.misrouted > 0 {
            let _ = writeln!(
                s,
                "  buckets      {} stock buckets: undersell {} (stock left when the first sold_out was decided), misrouted {}",
                self.stock_buckets,
                n(self.undersell),
                self.misrouted
            );
        }
        if self.in_doubt + self.in_doubt_written > 0 {
            let _ = writeln!(
                s,
                "  in doubt     {} sent without an acknowledgement (told so, not refused): {} found in the log (judged as accepted), {} not ({} of those decided)",
                n(self.in_doubt + self.in_doubt_written),
                n(self.in_doubt_written),
                n(self.in_doubt),
                n(self.in_doubt_decided)
            );
        }
        if let Some(h) = &self.holds {
            self.holds_text(&mut s, h);
        }
        let _ = writeln!(s, "  DLQ          {} {:?}", self.dlq, self.dlq_reasons);
        match &self.store {
            Some(st) => {
                let _ = writeln!(
                    s,
                    "  store        {} coupons, {} remaining, {} holders{}",
                    n(st.coupons),
                    n(st.remaining),
                    n(st.holders),
                    if st.counter_mismatch {
                        " (COUNTERS DISAGREE)"
                    } else {
                        ""
                    }
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  store        not audited (pass --redis to audit the store)"
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(s, "  note         {note}");
        }
        let _ = writeln!(
            s,
            "  verdict      {}",
            if self.passed {
                "PASS"
            } else {
                "FAIL: a correctness figure is not zero"
            }
        );
        s
    }
}

impl Report {
    /// The holds' lines of the human summary.
    fn holds_text(&self, s: &mut String, h: &HoldAudit) {
        let n = |x: u64| group(x);
        let _ = writeln!(
            s,
            "  holds        {} issued: {} claimed (placed), {} cancelled, {} expired, {} re-issued{}",
            n(h.issued),
            n(h.claimed),
            n(h.cancelled),
            n(h.expired),
            n(h.reissued),
            if h.open > 0 {
                format!(", {} still within their window", n(h.open))
            } else {
                String::new()
            }
        );
        let (r, a) = (&h.release_to_reissue_ms, &h.action_to_reissue_ms);
        if r.count > 0 {
            let _ = writeln!(
                s,
                "  re-issue     {} ranks; back in stock to issued again p50 {:.1} / p90 {:.1} / max {:.1} ms; \
                 from the cancel or expiry asked p50 {:.1} / p90 {:.1} / max {:.1} ms",
                n(r.count),
                r.p50,
                r.p90,
                r.max,
                a.p50,
                a.p90,
                a.max
            );
        }
        let invariant = match h.remaining {
            Some(left) => format!(
                "issued {} - returned {} + remaining {} = {} (stock {}){}",
                n(h.issued_total),
                n(h.returned),
                n(left),
                n((h.issued_total + left).saturating_sub(h.returned)),
                n(u64::from(self.stock)),
                if h.invariant_off == 0 { "" } else { " BROKEN" }
            ),
            None => "remaining unknown (not checked)".into(),
        };
        let _ = writeln!(s, "  invariant    {invariant}");
        let _ = writeln!(
            s,
            "  hold faults  rank conflicts {}, claimed and returned {}, orphan ends {}, out of time {}, stuck {}",
            h.rank_conflicts, h.claimed_and_returned, h.orphan_ends, h.out_of_time, h.stuck
        );
        if let Some(acts) = &self.hold_actions {
            let chosen: Vec<String> = acts
                .chosen
                .iter()
                .map(|(b, v)| format!("{b} {}", n(*v)))
                .collect();
            let answers: Vec<String> = acts
                .answers
                .iter()
                .map(|(verb, by)| {
                    let by: Vec<String> =
                        by.iter().map(|(k, v)| format!("{k}: {}", n(*v))).collect();
                    format!("{verb} [{}]", by.join(", "))
                })
                .collect();
            let _ = writeln!(
                s,
                "  winners      chose {}; answered {}{}",
                chosen.join(", "),
                if answers.is_empty() {
                    "nothing".to_string()
                } else {
                    answers.join(", ")
                },
                if acts.gave_up + acts.skipped > 0 {
                    format!("; gave up {}, skipped {}", acts.gave_up, acts.skipped)
                } else {
                    String::new()
                }
            );
        }
    }
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// `12345` → `12,345`.
pub fn group(x: u64) -> String {
    let digits = x.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn merge_err(e: impl std::fmt::Display) -> Error {
    Error::Merge(e.to_string())
}

/// Rebuilds the facts of several reports that carry raw data, so they can be
/// merged exactly. Outcomes seen by several load generators (the same record,
/// same partition and offset) count once.
pub fn merge_facts(reports: &[Report]) -> Result<Facts, Error> {
    let first = reports
        .first()
        .ok_or_else(|| Error::Merge("no reports".into()))?;
    let mut accepted: HashMap<Uuid, Acceptance> = HashMap::new();
    let mut in_doubt: HashSet<Uuid> = HashSet::new();
    let mut in_doubt_written: HashMap<Uuid, String> = HashMap::new();
    let mut outcomes: Vec<Observed> = Vec::new();
    let mut seen: HashSet<(i32, i64, Uuid, bool)> = HashSet::new();
    let mut holds: Vec<ObservedHold> = Vec::new();
    let mut seen_holds: HashSet<(i32, i64, Uuid, bool)> = HashSet::new();
    let mut hold_actions: Option<HoldActions> = None;
    let mut looked: Option<AuditEnd> = None;
    let mut ledger: Option<Ledger> = None;
    let mut ledger_at = 0u64;
    let mut accept = latency::histogram();
    let mut accept_uncorrected = latency::histogram();
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut dlq: BTreeMap<String, u64> = BTreeMap::new();
    let (mut requests, mut sends) = (0, 0);
    let (mut started, mut load_end, mut end) = (u64::MAX, 0, 0);
    for r in reports {
        if r.event_id != first.event_id || r.stock != first.stock {
            return Err(Error::Merge(format!(
                "{} (stock {}) and {} (stock {}) are different drops",
                first.event_id, first.stock, r.event_id, r.stock
            )));
        }
        let raw = r.raw.as_ref().ok_or_else(|| {
            Error::Merge(format!(
                "the report of {} has no raw data (it was written with --no-raw)",
                r.event_id
            ))
        })?;
        for a in &raw.accepted {
            accepted
                .entry(a.request_id)
                .and_modify(|e| e.accepted_at = e.accepted_at.min(a.acceptance.accepted_at))
                .or_insert_with(|| a.acceptance.clone());
        }
        in_doubt.extend(raw.in_doubt.iter().copied());
        in_doubt_written.extend(raw.in_doubt_written.iter().cloned());
        for o in &raw.outcomes {
            let key = (
                o.outcome.partition,
                o.outcome.offset,
                o.outcome.request_id,
                o.outcome.replay,
            );
            if seen.insert(key) {
                outcomes.push(Observed {
                    outcome: o.outcome.clone(),
                    observed_at: o.observed_at,
                    issuer: o.issuer.clone(),
                });
            }
        }
        for h in &raw.holds {
            let key = (
                h.hold.partition,
                h.hold.offset,
                h.hold.request_id,
                h.hold.replay,
            );
            if seen_holds.insert(key) {
                holds.push(ObservedHold {
                    hold: h.hold.clone(),
                    observed_at: h.observed_at,
                });
            }
        }
        // The latest look at the event is the most complete.
        if let Some(e) = raw.end {
            if looked.is_none_or(|old| e.at >= old.at) {
                looked = Some(e);
            }
        }
        if let Some(acts) = &r.hold_actions {
            hold_actions
                .get_or_insert_with(HoldActions::default)
                .absorb(acts.clone());
        }
        // The latest audit of the store is the most complete.
        let audited_at = r.started_at + ((r.load_seconds + r.drain_seconds) * 1e6) as u64;
        if raw.ledger.is_some() && audited_at >= ledger_at {
            ledger = raw.ledger.clone();
            ledger_at = audited_at;
        }
        accept
            .add(latency::decode(&r.histograms.accept).map_err(Error::Merge)?)
            .map_err(merge_err)?;
        accept_uncorrected
            .add(latency::decode(&r.histograms.accept_uncorrected).map_err(Error::Merge)?)
            .map_err(merge_err)?;
        for (k, v) in &r.answers {
            *answers.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.dlq_reasons {
            let e = dlq.entry(k.clone()).or_default();
            *e = (*e).max(*v); // every generator sees the same DLQ
        }
        requests += r.requests;
        sends += r.sends;
        started = started.min(r.started_at);
        load_end = load_end.max(r.started_at + (r.load_seconds * 1e6) as u64);
        end = end.max(r.started_at + ((r.load_seconds + r.drain_seconds) * 1e6) as u64);
    }
    outcomes.sort_by_key(|o| o.observed_at);
    holds.sort_by_key(|h| h.observed_at);
    in_doubt.retain(|id| !accepted.contains_key(id));
    Ok(Facts {
        config: serde_json::json!({ "merged": reports.iter().map(|r| r.config.clone()).collect::<Vec<_>>() }),
        event_id: first.event_id.clone(),
        terms: EventTerms {
            stock: first.stock,
            per_user_limit: first.per_user_limit,
        },
        started_at: started,
        load_finished_at: load_end,
        finished_at: end,
        requests,
        sends,
        answers,
        accepted,
        in_doubt,
        in_doubt_written,
        outcomes,
        holds,
        hold_actions,
        end: looked,
        dlq,
        ledger,
        accept,
        accept_uncorrected,
        notes: vec![format!(
            "merged from {} reports, exactly (raw data)",
            reports.len()
        )],
        observed: reports.iter().all(|r| r.observed),
    })
}

/// Merges reports without raw data. Exact: histograms, sends, answers,
/// accepted and lost (each generator's own requests). Event-wide figures
/// (decided, issued, oversold, double issued...) are seen alike by every
/// generator and taken as the largest. Not recomputable: the skew, and
/// `phantom`, since each generator counts the others' requests as phantom;
/// the smallest value is reported, an upper bound. The notes say so.
pub fn merge_summaries(reports: &[Report]) -> Result<Report, Error> {
    let mut merged = reports
        .first()
        .ok_or_else(|| Error::Merge("no reports".into()))?
        .clone();
    let mut accept = latency::decode(&merged.histograms.accept).map_err(Error::Merge)?;
    let mut uncorrected =
        latency::decode(&merged.histograms.accept_uncorrected).map_err(Error::Merge)?;
    let mut e2e = latency::decode(&merged.histograms.e2e).map_err(Error::Merge)?;
    for r in &reports[1..] {
        if r.event_id != merged.event_id || r.stock != merged.stock {
            return Err(Error::Merge(format!(
                "{} and {} are different drops",
                merged.event_id, r.event_id
            )));
        }
        accept
            .add(latency::decode(&r.histograms.accept).map_err(Error::Merge)?)
            .map_err(merge_err)?;
        uncorrected
            .add(latency::decode(&r.histograms.accept_uncorrected).map_err(Error::Merge)?)
            .map_err(merge_err)?;
        e2e.add(latency::decode(&r.histograms.e2e).map_err(Error::Merge)?)
            .map_err(merge_err)?;
        merged.requests += r.requests;
        merged.sends += r.sends;
        merged.accepted += r.accepted;
        merged.lost += r.lost;
        merged.in_doubt += r.in_doubt;
        merged.in_doubt_decided += r.in_doubt_decided;
        merged.in_doubt_written += r.in_doubt_written;
        for (k, v) in &r.answers {
            *merged.answers.entry(k.clone()).or_default() += v;
        }
        merged.throughput.accepted_per_s += r.throughput.accepted_per_s;
        merged.load_seconds = merged.load_seconds.max(r.load_seconds);
        merged.decided = merged.decided.max(r.decided);
        merged.issued = merged.issued.max(r.issued);
        merged.replays = merged.replays.max(r.replays);
        merged.oversold = merged.oversold.max(r.oversold);
        merged.double_issued = merged.double_issued.max(r.double_issued);
        merged.inconsistent_replays = merged.inconsistent_replays.max(r.inconsistent_replays);
        merged.ledger_mismatch = merged.ledger_mismatch.max(r.ledger_mismatch);
        merged.misrouted = merged.misrouted.max(r.misrouted);
        merged.undersell = merged.undersell.max(r.undersell);
        merged.stock_buckets = merged.stock_buckets.max(r.stock_buckets);
        merged.dlq = merged.dlq.max(r.dlq);
        if let Some(acts) = &r.hold_actions {
            merged
                .hold_actions
                .get_or_insert_with(HoldActions::default)
                .absorb(acts.clone());
        }
        merged.phantom = merged.phantom.min(r.phantom);
    }
    merged.latency_ms = Latencies {
        accept: latency::summary(&accept),
        accept_uncorrected: latency::summary(&uncorrected),
        e2e: latency::summary(&e2e),
    };
    merged.histograms = Histograms {
        accept: latency::encode(&accept),
        accept_uncorrected: latency::encode(&uncorrected),
        e2e: latency::encode(&e2e),
    };
    merged.skew_exact = false;
    merged.raw = None;
    merged.config = serde_json::json!({ "merged": reports.iter().map(|r| r.config.clone()).collect::<Vec<_>>() });
    merged.notes.push(format!(
        "merged from {} reports without raw data: latencies, sends, accepted and lost are exact; \
         the skew is the first report's; phantom is an upper bound",
        reports.len()
    ));
    merged.passed = merged.failures() == 0;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    use couponrush_core::wire::WIRE_VERSION;

    /// A synthetic drop of `n` requests (stock `stock`), decided in order by
    /// two generators: even requests were sent by generator 0, odd by 1.
    /// Every generator observed every outcome.
    fn facts(n: u64, stock: u32, generator: Option<u64>) -> Facts {
        let mut accepted = HashMap::new();
        let mut outcomes = Vec::new();
        let mut accept = latency::histogram();
        for i in 0..n {
            let id = Uuid::from_u128(u128::from(i) + 1);
            let issued = i < u64::from(stock);
            if generator.is_none_or(|g| i % 2 == g) {
                accepted.insert(
                    id,
                    Acceptance {
                        user_id: format!("u{i}"),
                        accepted_at: 1_000 + i,
                        intended_at: 900 + i,
                    },
                );
                latency::record(&mut accept, 100 + i);
            }
            outcomes.push(Observed {
                outcome: Outcome {
                    v: WIRE_VERSION,
                    request_id: id,
                    event_id: "e".into(),
                    user_id: format!("u{i}"),
                    result: if issued {
                        DecisionResult::Issued
                    } else {
                        DecisionResult::SoldOut
                    },
                    issued_rank: issued.then_some(i as u32 + 1),
                    partition: 0,
                    offset: i as i64,
                    decided_at: 2_000 + i,
                    replay: false,
                    // Pairs decided out of order: (1,0), (3,2)...
                    decision_seq: if i % 2 == 0 { i + 2 } else { i },
                    accepted_at: 1_000 + i,
                    generation: 1,
                    hold_until: None,
                },
                observed_at: 3_000 + i,
                issuer: Some(format!("issuer-{}", i % 2)),
            });
        }
        Facts {
            config: serde_json::json!({}),
            event_id: "e".into(),
            terms: EventTerms {
                stock,
                per_user_limit: 1,
            },
            started_at: 900,
            load_finished_at: 2_000,
            finished_at: 4_000,
            requests: accepted.len() as u64,
            sends: accepted.len() as u64,
            answers: [("202".to_string(), accepted.len() as u64)]
                .into_iter()
                .collect(),
            accepted,
            in_doubt: HashSet::new(),
            in_doubt_written: HashMap::new(),
            outcomes,
            holds: Vec::new(),
            hold_actions: None,
            end: None,
            dlq: BTreeMap::new(),
            ledger: None,
            accept_uncorrected: accept.clone(),
            accept,
            notes: vec![],
            observed: true,
        }
    }

    #[test]
    fn a_request_in_doubt_found_in_the_log_is_judged_as_accepted() {
        // Ten requests, all decided; two more in doubt: 100 was written (the
        // log holds it) and never decided, 101 was never written.
        let (written, never) = (Uuid::from_u128(100), Uuid::from_u128(101));
        let mut f = facts(10, 5, None);
        f.in_doubt = [written, never].into_iter().collect();
        let r = Report::build(f, false);
        let mut f = facts(10, 5, None);
        f.in_doubt = [written, never].into_iter().collect();
        assert!(r.passed, "unsettled doubt is not judged: {}", r.failures());
        assert_eq!((r.in_doubt, r.in_doubt_written, r.lost), (2, 0, 0));
        f.in_doubt_written = [(written, "u100".to_string())].into_iter().collect();
        let r = Report::build(f, true);
        assert_eq!((r.in_doubt, r.in_doubt_written, r.lost), (1, 1, 1));
        assert_eq!(r.accepted, 11, "written, so accepted");
        assert!(!r.passed, "a written request never decided is lost");
        // A merge keeps it.
        let merged = Report::build(merge_facts(&[r]).unwrap(), false);
        assert_eq!((merged.in_doubt_written, merged.lost), (1, 1));
    }

    #[test]
    fn a_merge_of_two_generators_equals_the_report_of_the_whole_drop() {
        let whole = Report::build(facts(400, 100, None), true);
        let a = Report::build(facts(400, 100, Some(0)), true);
        let b = Report::build(facts(400, 100, Some(1)), true);
        // Alone, each generator sees the other's decisions as phantoms.
        assert_eq!(a.phantom, 200);
        let merged = Report::build(merge_facts(&[a.clone(), b.clone()]).unwrap(), true);
        assert!(merged.passed, "{:?}", merged.notes);
        for (m, w) in [
            (merged.accepted, whole.accepted),
            (merged.decided, whole.decided),
            (merged.issued, whole.issued),
            (merged.phantom, whole.phantom),
            (merged.lost, whole.lost),
            (merged.sends, whole.sends),
        ] {
            assert_eq!(m, w);
        }
        assert_eq!(merged.skew, whole.skew, "the skew is recomputed exactly");
        assert_eq!(merged.shares, whole.shares, "shares are recomputed exactly");
        assert_eq!(
            whole.shares.by_issuer.values().copied().collect::<Vec<_>>(),
            [200, 200],
            "each request counted once, for the issuer that published it"
        );
        assert_eq!(whole.shares.busiest_issuer(), 0.5);
        assert_eq!(whole.skew.inversions, 200, "each adjacent pair swapped");
        assert_eq!(
            merged.latency_ms, whole.latency_ms,
            "histograms merged exactly"
        );
        assert!(merged.skew_exact);

        // Without raw data: counts and histograms still exact, phantom an
        // upper bound, and the report says so.
        let (mut a, mut b) = (a, b);
        a.raw = None;
        b.raw = None;
        let approx = merge_summaries(&[a, b]).unwrap();
        assert_eq!(approx.accepted, whole.accepted);
        assert_eq!(approx.latency_ms.accept, whole.latency_ms.accept);
        assert!(!approx.skew_exact);
        assert!(approx.phantom >= whole.phantom);
        assert!(approx.notes.iter().any(|n| n.contains("upper bound")));
    }

    #[test]
    fn reports_of_different_drops_do_not_merge() {
        let a = Report::build(facts(10, 5, Some(0)), true);
        let mut b = Report::build(facts(10, 5, Some(1)), true);
        b.event_id = "other".into();
        assert!(merge_facts(&[a.clone(), b.clone()]).is_err());
        assert!(merge_summaries(&[a, b]).is_err());
    }

    /// [`facts`] of 40 requests and a stock of 10, with holds: request 1
    /// cancels, its rank goes to request 41, every other winner claims.
    fn hold_facts(generator: Option<u64>) -> Facts {
        use couponrush_core::wire::{HoldState, HOLD_KIND};
        let mut f = facts(40, 10, generator);
        for o in &mut f.outcomes {
            if o.outcome.result == DecisionResult::Issued {
                o.outcome.hold_until = Some(o.outcome.decided_at + 1_000);
            }
        }
        let id = |i: u128| Uuid::from_u128(i);
        let late = Outcome {
            request_id: id(41),
            user_id: "u40".into(),
            issued_rank: Some(1),
            offset: 40,
            decision_seq: 51,
            decided_at: 2_500,
            hold_until: Some(3_500),
            ..f.outcomes[0].outcome.clone()
        };
        if generator.is_none_or(|g| g == 0) {
            f.accepted.insert(
                id(41),
                Acceptance {
                    user_id: "u40".into(),
                    accepted_at: 1_040,
                    intended_at: 940,
                },
            );
        }
        f.outcomes.push(Observed {
            outcome: late,
            observed_at: 3_040,
            issuer: None,
        });
        let end = |i: u128, rank: u32, state: HoldState, seq: u64| ObservedHold {
            hold: HoldOutcome {
                v: WIRE_VERSION,
                kind: HOLD_KIND.into(),
                request_id: id(i),
                event_id: "e".into(),
                user_id: format!("u{}", i - 1),
                state,
                issued_rank: rank,
                partition: 1,
                offset: seq as i64,
                action_at: 2_400,
                decided_at: 2_401,
                replay: false,
                decision_seq: seq,
                generation: 1,
            },
            observed_at: 3_500 + seq,
        };
        f.holds.push(end(1, 1, HoldState::Released, 50));
        for i in 2..=10u128 {
            f.holds
                .push(end(i, i as u32, HoldState::Claimed, 50 + i as u64));
        }
        f.holds.push(end(41, 1, HoldState::Claimed, 61));
        f.end = Some(AuditEnd {
            at: 10_000,
            remaining: Some(0),
            slack_us: 1_000,
        });
        let mut acts = HoldActions::default();
        acts.answers
            .entry("claim".into())
            .or_default()
            .insert("202".into(), if generator.is_some() { 5 } else { 10 });
        f.hold_actions = Some(acts);
        f
    }

    #[test]
    fn a_drop_with_holds_reports_and_merges_its_holds_exactly() {
        let whole = Report::build(hold_facts(None), true);
        assert!(whole.passed, "{}", whole.text());
        let h = whole.holds.clone().expect("hold figures");
        assert_eq!(
            (h.issued, h.claimed, h.cancelled, h.reissued, h.returned),
            (11, 10, 1, 1, 1)
        );
        assert_eq!((h.invariant_off, h.remaining), (0, Some(0)));
        let text = whole.text();
        for line in [
            "holds        11 issued",
            "invariant    issued 11 - returned 1",
            "claim [202: 10]",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        let snap = crate::dashboard::Snapshot::from_report(&whole);
        assert_eq!(snap.holds.as_ref().map(|h| h.reissued), Some(1));
        assert_eq!(snap.audit.invariant_off, Some(0));

        let a = Report::build(hold_facts(Some(0)), true);
        let b = Report::build(hold_facts(Some(1)), true);
        let merged = Report::build(merge_facts(&[a.clone(), b.clone()]).unwrap(), true);
        assert_eq!(merged.holds, whole.holds, "hold figures merge exactly");
        assert_eq!(merged.hold_actions, whole.hold_actions, "actions add up");
        let back: Report = serde_json::from_slice(&serde_json::to_vec(&whole).unwrap()).unwrap();
        assert_eq!(back.holds, whole.holds);
        assert_eq!(back.raw.unwrap().holds.len(), 11);

        // The invariant broken in the report fails it.
        let mut f = hold_facts(None);
        f.end = Some(AuditEnd {
            remaining: Some(1),
            ..f.end.unwrap()
        });
        let broken = Report::build(f, false);
        assert!(!broken.passed);
        assert!(broken.text().contains("BROKEN"), "{}", broken.text());
    }

    #[test]
    fn a_report_round_trips_through_json() {
        let r = Report::build(facts(50, 10, None), true);
        let json = serde_json::to_vec(&r).unwrap();
        let back: Report = serde_json::from_slice(&json).unwrap();
        // Floats may differ in the last digit after a round trip; the rest is exact.
        assert!(
            serde_json::to_vec(&back).unwrap() == json || back.raw == r.raw,
            "round trip"
        );
        assert_eq!(
            (back.accepted, back.skew.inversions),
            (r.accepted, r.skew.inversions)
        );
        assert!(r.text().contains("verdict      PASS"));
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }
}
