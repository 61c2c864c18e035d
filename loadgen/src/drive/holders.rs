//! The holders: what the winners of a drop with holds do with their coupon.
//!
//! An event created with a claim window issues each coupon as a hold. The
//! run learns its winners from the outcomes it observes ([`crate::observe`]
//! hands each new one over) and acts for them through the api:
//!
//! - a `--cancel-ratio` fraction cancels (`POST …/requests/{id}/cancel`):
//!   the coupon goes back to stock and its rank to a later request;
//! - a `--no-claim-ratio` fraction never claims: the issuers' expiry sweep
//!   gives the coupon back when the window ends;
//! - the rest claim (`POST …/requests/{id}/claim`): the coupon is placed.
//!
//! Who does what is a pure function of `(seed, user)`, so the same seed
//! gives the same behaviour (a person who cancels cancels every coupon they
//! win), and so is the think time before acting, uniform in
//! `0..=--think-time`. The holders act on every winner the run observes,
//! its own requests or not: of several generators of one drop, give the
//! hold ratios to one.
//!
//! Bounded: one action at most per winning request (so actions ≤ requests),
//! at most [`HoldPlan::connections`] calls in flight, each call bounded by
//! the request timeout and retried at most [`TRIES`] times, 100 ms × the
//! attempt apart: after a broken connection, a timeout or a `503`, and
//! after a `404`. The api answers from the store's *logged* state, which
//! the issuer marks once the outcome is acknowledged, a moment after this
//! run may have read it; a client that learnt of its coupon from the
//! status route would not have asked yet. Every answer is counted per verb
//! by status (`409` by its code: `409 hold_expired`); any other answer is
//! the api's decision and is not retried.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use couponrush_core::Outcome;
use hyper::{Method, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::http::Pool;

/// Attempts per action (the first included).
pub const TRIES: u32 = 4;

/// Winners the observer may be ahead of the holders.
pub const WINNERS_BUFFER: usize = 1024;

/// What the winners of a drop with holds do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HoldPlan {
    /// Each issued coupon is held this long for its claim.
    pub claim_window: Duration,
    /// Fraction of winners who cancel.
    pub cancel_ratio: f64,
    /// Fraction of winners who never claim (their hold expires).
    pub no_claim_ratio: f64,
    /// Longest think time before a winner acts.
    pub think_time: Duration,
    /// How long past its deadline the run waits for a hold to end (the
    /// expiry sweep's period and the ledger's delay), and past which the
    /// audit calls a hold still `held` stuck.
    pub slack: Duration,
    /// Calls in flight at most.
    pub connections: usize,
    /// Seed of the choices.
    pub seed: u64,
}

/// What one winner does with their hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Claims it: the coupon is placed.
    Claim,
    /// Cancels it: the coupon goes back to stock.
    Cancel,
    /// Never claims: the hold expires and the coupon goes back.
    NeverClaim,
}

impl Behaviour {
    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Behaviour::Claim => "claim",
            Behaviour::Cancel => "cancel",
            Behaviour::NeverClaim => "never_claim",
        }
    }
}

impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl HoldPlan {
    /// Checks the ratios and times, saying what is wrong.
    pub fn validate(&self) -> Result<(), &'static str> {
        let ratio = |r: f64| (0.0..=1.0).contains(&r);
        if self.claim_window.is_zero() {
            return Err("--claim-window must be longer than 0s");
        }
        if !ratio(self.cancel_ratio) || !ratio(self.no_claim_ratio) {
            return Err("--cancel-ratio and --no-claim-ratio must be between 0 and 1");
        }
        if self.cancel_ratio + self.no_claim_ratio > 1.0 + 1e-9 {
            return Err("--cancel-ratio plus --no-claim-ratio must be at most 1");
        }
        if self.think_time >= self.claim_window {
            return Err(
                "--think-time must be shorter than --claim-window, or claims come too late",
            );
        }
        Ok(())
    }

    /// The random source of `user`'s choices: a pure function of the seed
    /// and the user.
    fn rng(&self, user: &str, salt: u64) -> SmallRng {
        // FNV-1a: stable across builds, unlike the standard hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self
            .seed
            .to_le_bytes()
            .iter()
            .chain(&salt.to_le_bytes())
            .chain(user.as_bytes())
        {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        SmallRng::seed_from_u64(h)
    }

    /// What `user` does with every hold they win.
    pub fn behaviour(&self, user: &str) -> Behaviour {
        let x: f64 = self.rng(user, 0xc1a1).random();
        if x < self.cancel_ratio {
            Behaviour::Cancel
        } else if x < self.cancel_ratio + self.no_claim_ratio {
            Behaviour::NeverClaim
        } else {
            Behaviour::Claim
        }
    }

    /// How long `user` thinks before acting on request `id`'s hold.
    pub fn think(&self, user: &str, id: Uuid) -> Duration {
        let max = self.think_time.as_micros() as u64;
        let mut rng = self.rng(user, id.as_u128() as u64);
        Duration::from_micros(rng.random_range(0..=max))
    }
}

/// What the holders did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldActions {
    /// Winners by what they chose to do.
    pub chosen: BTreeMap<Behaviour, u64>,
    /// Answers per verb (`claim`, `cancel`) by status (`202`, `200`,
    /// `409 hold_expired`, `timeout`…); a retried action counts each answer.
    pub answers: BTreeMap<String, BTreeMap<String, u64>>,
    /// Actions given up after [`TRIES`] attempts without a decision (no
    /// answer, `503` or `404` every time).
    pub gave_up: u64,
    /// Winners not acted on because the run was cancelled.
    pub skipped: u64,
}

impl HoldActions {
    pub(crate) fn absorb(&mut self, other: HoldActions) {
        for (k, v) in other.chosen {
            *self.chosen.entry(k).or_default() += v;
        }
        for (verb, by) in other.answers {
            let e = self.answers.entry(verb).or_default();
            for (k, v) in by {
                *e.entry(k).or_default() += v;
            }
        }
        self.gave_up += other.gave_up;
        self.skipped += other.skipped;
    }
}

/// The holders at work; [`Holders::finish`] collects what they did.
pub struct Holders {
    task: tokio::task::JoinHandle<HoldActions>,
}

impl Holders {
    /// Acts for every winner received on `winners` until the channel closes
    /// (the observer finished); `cancel` stops new actions (winners still
    /// arriving are counted as skipped).
    pub fn start(
        plan: HoldPlan,
        pool: Arc<Pool>,
        event: String,
        winners: mpsc::Receiver<Outcome>,
        cancel: CancellationToken,
    ) -> Holders {
        Holders {
            task: tokio::spawn(act(plan, pool, event, winners, cancel)),
        }
    }

    /// Waits for the last actions (the channel must be closed: finish the
    /// observer first) and returns the counts.
    pub async fn finish(self) -> HoldActions {
        self.task.await.unwrap_or_default()
    }
}

async fn act(
    plan: HoldPlan,
    pool: Arc<Pool>,
    event: String,
    mut winners: mpsc::Receiver<Outcome>,
    cancel: CancellationToken,
) -> HoldActions {
    let mut done = HoldActions::default();
    let mut acting: JoinSet<HoldActions> = JoinSet::new();
    let event: Arc<str> = event.into();
    while let Some(w) = winners.recv().await {
        while let Some(Ok(d)) = acting.try_join_next() {
            done.absorb(d);
        }
        if cancel.is_cancelled() {
            done.skipped += 1;
            continue;
        }
        let behaviour = plan.behaviour(&w.user_id);
        *done.chosen.entry(behaviour).or_default() += 1;
        let verb = match behaviour {
            Behaviour::NeverClaim => continue,
            Behaviour::Claim => "claim",
            Behaviour::Cancel => "cancel",
        };
        let think = plan.think(&w.user_id, w.request_id);
        let (pool, event, cancel) = (pool.clone(), event.clone(), cancel.clone());
        acting.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(think) => {}
                _ = cancel.cancelled() => return HoldActions { skipped: 1, ..HoldActions::default() },
            }
            one_action(&pool, &event, verb, &w).await
        });
    }
    while let Some(r) = acting.join_next().await {
        if let Ok(d) = r {
            done.absorb(d);
        }
    }
    done
}

/// Claims or cancels `w`'s hold, retried after no answer, a `503` or a
/// `404` (not logged yet).
async fn one_action(pool: &Pool, event: &str, verb: &'static str, w: &Outcome) -> HoldActions {
    let mut out = HoldActions::default();
    let path = format!("/v1/events/{event}/requests/{}/{verb}", w.request_id);
    let body = Bytes::from(serde_json::json!({ "user_id": w.user_id }).to_string());
    let answers = out.answers.entry(verb.to_string()).or_default();
    for attempt in 1..=TRIES {
        let answer = pool.call(Method::POST, &path, &[], body.clone()).await;
        let (key, again) = match &answer {
            Ok((status, body)) => (
                status_key(*status, body),
                matches!(
                    *status,
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::NOT_FOUND
                ),
            ),
            Err(kind) => (kind.clone(), true),
        };
        *answers.entry(key).or_default() += 1;
        if !again {
            return out;
        }
        if attempt < TRIES {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
    }
    out.gave_up += 1;
    out
}

/// `202`, `200`, or for a 4xx the api's code too (its errors are
/// `{"error": "<code>", "message": …}`): `409 hold_expired`.
fn status_key(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Coded {
        error: Option<serde_json::Value>,
    }
    let code = status
        .is_client_error()
        .then(|| serde_json::from_slice::<Coded>(body).ok())
        .flatten()
        .and_then(|c| c.error)
        .and_then(|e| e.as_str().map(str::to_string));
    match code {
        Some(c) => format!("{} {c}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(cancel: f64, no_claim: f64, seed: u64) -> HoldPlan {
        HoldPlan {
            claim_window: Duration::from_secs(2),
            cancel_ratio: cancel,
            no_claim_ratio: no_claim,
            think_time: Duration::from_millis(300),
            slack: Duration::from_secs(5),
            connections: 8,
            seed,
        }
    }

    #[test]
    fn the_same_seed_makes_the_same_winners_cancel_and_the_ratios_hold() {
        let p = plan(0.2, 0.1, 7);
        let mut counts: BTreeMap<Behaviour, u32> = BTreeMap::new();
        for i in 0..10_000 {
            let user = format!("user-{i}");
            let b = p.behaviour(&user);
            assert_eq!(b, plan(0.2, 0.1, 7).behaviour(&user), "reproducible");
            *counts.entry(b).or_default() += 1;
        }
        assert!(
            (1_800..2_200).contains(&counts[&Behaviour::Cancel]),
            "{counts:?}"
        );
        assert!(
            (850..1_150).contains(&counts[&Behaviour::NeverClaim]),
            "{counts:?}"
        );
        // Another seed chooses other people.
        let other = plan(0.2, 0.1, 8);
        let differ = (0..1000)
            .filter(|i| {
                let u = format!("user-{i}");
                p.behaviour(&u) != other.behaviour(&u)
            })
            .count();
        assert!(differ > 100, "{differ}");
        assert!(plan(0.0, 0.0, 1).behaviour("x") == Behaviour::Claim);
        assert!(plan(1.0, 0.0, 1).behaviour("x") == Behaviour::Cancel);
    }

    #[test]
    fn think_times_are_bounded_and_reproducible() {
        let p = plan(0.2, 0.1, 7);
        for i in 0..1000u128 {
            let t = p.think("u", Uuid::from_u128(i));
            assert!(t <= p.think_time);
            assert_eq!(t, p.think("u", Uuid::from_u128(i)));
        }
    }

    #[test]
    fn plans_that_cannot_work_are_refused() {
        assert!(plan(0.2, 0.1, 1).validate().is_ok());
        assert!(plan(0.7, 0.4, 1).validate().is_err());
        assert!(plan(-0.1, 0.1, 1).validate().is_err());
        let mut p = plan(0.2, 0.1, 1);
        p.think_time = p.claim_window;
        assert!(p.validate().is_err());
    }

    #[test]
    fn a_conflict_is_counted_by_its_code() {
        assert_eq!(
            status_key(
                StatusCode::CONFLICT,
                br#"{"error":"hold_expired","message":"the hold expired"}"#
            ),
            "409 hold_expired"
        );
        assert_eq!(status_key(StatusCode::ACCEPTED, b"{}"), "202");
        assert_eq!(status_key(StatusCode::NOT_FOUND, b"not json"), "404");
    }
}
