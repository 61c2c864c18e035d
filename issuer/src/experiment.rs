//! Switches for the lab's experiments (`coupon-lab experiment …`, see
//! docs/LAB.md): a simulated per-record cost, and the **unsafe arms** that
//! break one of the issuer's guarantees on purpose, so the lab can measure
//! what the guarantee is worth.
//!
//! Every unsafe arm is off by default and named `--unsafe-…`; `coupon-issuer`
//! refuses to start with one unless `--i-know-this-is-unsafe` is given too
//! ([`Arms::check`]). The lab sets them on [`crate::Config`] directly (it is
//! the one insisting). A running issuer with an unsafe arm says so at start,
//! at warn level.
//!
//! - `--unsafe-no-dedup`: the store gets a fresh request id for every
//!   delivery, so a redelivered or client-retried request is decided again
//!   (the seed's "add 100" instead of "set to 1100").
//! - `--unsafe-auto-commit <interval>`: librdkafka commits on a timer the
//!   offsets it stored when it handed records out (`enable.auto.commit`,
//!   `enable.auto.offset.store`), and the issuer commits nothing by hand: a
//!   crash after a timed commit and before the decisions loses requests.

use std::time::Duration;

use uuid::Uuid;

/// What an experiment changes in an issuer. The default changes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Arms {
    /// Simulated work per record (the consumer's own processing), slept on
    /// the consume thread before each batch is decided, so the issuer and
    /// not the api or the broker is the bottleneck.
    pub work_per_record: Duration,
    /// UNSAFE: a fresh request id per delivery, so the store cannot dedup.
    pub unsafe_no_dedup: bool,
    /// UNSAFE: librdkafka's timed auto-commit of offsets stored at poll,
    /// with this interval, instead of committing decided batches by hand.
    pub unsafe_auto_commit: Option<Duration>,
}

/// An unsafe arm asked for without saying so twice.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} breaks the issuer's delivery guarantee on purpose (it exists for the lab's experiments, \
     see docs/LAB.md): add --i-know-this-is-unsafe if you really mean it, or drop {0}"
)]
pub struct UnsafeRefused(pub &'static str);

impl Arms {
    /// The unsafe arms switched on, by flag name.
    pub fn unsafe_flags(&self) -> Vec<&'static str> {
        let mut on = Vec::new();
        if self.unsafe_no_dedup {
            on.push("--unsafe-no-dedup");
        }
        if self.unsafe_auto_commit.is_some() {
            on.push("--unsafe-auto-commit");
        }
        on
    }

    /// Refuses an unsafe arm unless the user `insists`.
    pub fn check(&self, insists: bool) -> Result<(), UnsafeRefused> {
        match self.unsafe_flags().first() {
            Some(flag) if !insists => Err(UnsafeRefused(flag)),
            _ => Ok(()),
        }
    }

    /// The id the store decides a delivered request under: its own (the
    /// store dedups by it), or with `--unsafe-no-dedup` a new one each time.
    pub fn store_id(&self, request_id: Uuid) -> Uuid {
        if self.unsafe_no_dedup {
            Uuid::new_v4()
        } else {
            request_id
        }
    }

    /// Consumer properties the arms add over the issuer's own (applied last).
    pub fn consumer_props(&self) -> Vec<(String, String)> {
        match self.unsafe_auto_commit {
            None => Vec::new(),
            Some(interval) => vec![
                ("enable.auto.commit".into(), "true".into()),
                // Stored when poll hands a record out, not when it is decided:
                // the commit can run ahead of the decisions.
                ("enable.auto.offset.store".into(), "true".into()),
                (
                    "auto.commit.interval.ms".into(),
                    interval.as_millis().max(1).to_string(),
                ),
            ],
        }
    }

    /// Sleeps the simulated cost of `records` records (nothing by default).
    pub fn simulate_work(&self, records: usize) {
        if !self.work_per_record.is_zero() && records > 0 {
            std::thread::sleep(self.work_per_record.saturating_mul(records as u32));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_changes_nothing() {
        let a = Arms::default();
        let id = Uuid::now_v7();
        assert_eq!(a.store_id(id), id);
        assert!(a.consumer_props().is_empty());
        assert!(a.check(false).is_ok());
    }

    #[test]
    fn an_unsafe_arm_is_refused_unless_insisted_on_and_really_switches() {
        let a = Arms {
            unsafe_no_dedup: true,
            ..Arms::default()
        };
        let e = a.check(false).unwrap_err();
        assert!(e.to_string().contains("--i-know-this-is-unsafe"), "{e}");
        assert!(a.check(true).is_ok());
        let id = Uuid::now_v7();
        assert_ne!(a.store_id(id), id, "a redelivery gets a new id");
        let b = Arms {
            unsafe_auto_commit: Some(Duration::from_millis(100)),
            ..Arms::default()
        };
        assert_eq!(b.check(false).unwrap_err().0, "--unsafe-auto-commit");
        let props = b.consumer_props();
        assert!(props.contains(&("enable.auto.commit".into(), "true".into())));
        assert!(props.contains(&("auto.commit.interval.ms".into(), "100".into())));
    }
}
