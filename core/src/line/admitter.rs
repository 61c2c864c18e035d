//! The admitter: lets a room's line in at the pace its policy allows.
//!
//! Every tick it frees slots whose admission ran out and admits the next
//! tickets in join order ([`Line::admit`]), as many as the room's free slots
//! (`max_active`) and a token bucket filled at `rate_per_sec` allow: its
//! own, and the room's in the backend, which every admitter of the room
//! (one per api process with Redis) draws from, so the room as a whole
//! admits at most `rate_per_sec`. The
//! rate is slowed while the issuers lag: with `slow_above_lag` = L and a
//! measured lag of N > L records, the bucket fills at `rate × L / N`
//! (without a rate, each round admits at most `L / N` of its usual count),
//! so the line does not pour people onto a pipeline that cannot keep up.
//! The lag is measured ([`LagProbe`]), never guessed: for Kafka it is the
//! issuers' consumer-group lag on the requests topic ([`GroupLag`]).
//!
//! It also measures the admission rate it holds, once a second, while
//! people are waiting, and records it with the room: the estimated wait
//! every ticket is shown is computed from that figure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{burst, Line, RoomPolicy};
use crate::kafka::KafkaSettings;
use crate::wire::now_micros;

/// How often the admitter runs a round.
pub const TICK: Duration = Duration::from_millis(50);

/// How often the admitter re-reads the policy, measures its rate and asks
/// for the lag.
pub const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// Admissions one round may ask for when no rate bounds it (the room's
/// free slots bound it further).
pub const MAX_PER_ROUND: u32 = 2_000;

/// Where the pipeline's lag comes from.
#[async_trait]
pub trait LagProbe: Send + Sync + 'static {
    /// Records accepted but not yet decided, or `None` when unknown now.
    async fn lag(&self) -> Option<u64>;
}

/// The issuers' consumer-group lag on the requests topic: the sum over its
/// partitions of the high watermark minus the group's committed offset.
pub struct GroupLag {
    consumer: Arc<BaseConsumer>,
    topic: String,
    group: String,
}

impl GroupLag {
    /// A probe of `group`'s lag on `topic`.
    pub fn new(kafka: &KafkaSettings, group: &str, topic: &str) -> Result<Self, String> {
        let consumer: BaseConsumer = kafka
            .client_config_with("couponrush-line-lag", |c| {
                c.set("group.id", group).set("enable.auto.commit", "false");
            })
            .create()
            .map_err(|e| format!("cannot create the lag probe's client: {e}"))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            topic: topic.to_string(),
            group: group.to_string(),
        })
    }

    fn measure(consumer: &BaseConsumer, topic: &str) -> Option<u64> {
        let timeout = Duration::from_secs(2);
        let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let partitions = md.topics().first()?.partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let committed = consumer.committed_offsets(tpl, timeout).ok()?;
        let mut lag = 0u64;
        for p in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, timeout).ok()?;
            let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                // Nothing committed yet: everything since the start waits.
                _ => low,
            };
            lag += (high - at).max(0) as u64;
        }
        Some(lag)
    }
}

#[async_trait]
impl LagProbe for GroupLag {
    async fn lag(&self) -> Option<u64> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let lag = tokio::task::spawn_blocking(move || Self::measure(&consumer, &topic))
            .await
            .ok()
            .flatten();
        if lag.is_none() {
            tracing::debug!(group = %self.group, "issuer lag unknown this time");
        }
        lag
    }
}

/// What one admitter saw, shared with whoever shows it (the api's stats
/// route): read with [`AdmitterGauges::snapshot`].
#[derive(Debug, Default)]
pub struct AdmitterGauges {
    lag: AtomicU64,
    lag_known: AtomicU64,
    effective_rate_milli: AtomicU64,
    measured_rate_milli: AtomicU64,
    slowed_rounds: AtomicU64,
}

/// A reading of [`AdmitterGauges`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GaugeReading {
    /// Issuer lag measured last (records), if known.
    pub lag: Option<u64>,
    /// The rate the bucket fills at now, after slowing for the lag.
    pub effective_rate: Option<f64>,
    /// The admission rate measured last.
    pub measured_rate: f64,
    /// Measurements at which admission was slowed for the lag.
    pub slowed: u64,
}

impl AdmitterGauges {
    /// The current reading.
    pub fn snapshot(&self) -> GaugeReading {
        let rate = self.effective_rate_milli.load(Ordering::Relaxed);
        GaugeReading {
            lag: (self.lag_known.load(Ordering::Relaxed) == 1)
                .then(|| self.lag.load(Ordering::Relaxed)),
            effective_rate: (rate != u64::MAX).then_some(rate as f64 / 1000.0),
            measured_rate: self.measured_rate_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            slowed: self.slowed_rounds.load(Ordering::Relaxed),
        }
    }
}

/// How much a lag of `lag` records slows admission under `policy`: 1.0 is
/// full speed.
pub fn lag_factor(policy: &RoomPolicy, lag: Option<u64>) -> f64 {
    match (policy.slow_above_lag, lag) {
        (Some(limit), Some(lag)) if lag > limit => (limit as f64 / lag as f64).max(0.01),
        _ => 1.0,
    }
}

/// Admits one room's line until shut down.
pub struct Admitter {
    line: Arc<dyn Line>,
    event_id: String,
    lag: Option<Arc<dyn LagProbe>>,
    gauges: Arc<AdmitterGauges>,
}

impl Admitter {
    /// An admitter of `event_id`'s room; `lag` slows it (see the module doc).
    pub fn new(line: Arc<dyn Line>, event_id: &str, lag: Option<Arc<dyn LagProbe>>) -> Self {
        Self {
            line,
            event_id: event_id.to_string(),
            lag,
            gauges: Arc::new(AdmitterGauges::default()),
        }
    }

    /// Its gauges.
    pub fn gauges(&self) -> Arc<AdmitterGauges> {
        self.gauges.clone()
    }

    /// Runs rounds every [`TICK`] until `shutdown`. Errors are logged and
    /// retried on the next tick: a backend that is down admits nobody, and
    /// nobody is skipped for it: the first round after a gap longer than
    /// the ticket ttl resumes the room, and lapses are measured from then
    /// (the tickets' polls failed too).
    pub async fn run(self, shutdown: CancellationToken) {
        let event = self.event_id.as_str();
        let mut policy: Option<RoomPolicy> = None;
        let mut tokens = 0.0f64;
        let mut last = Instant::now();
        let mut measured_at = Instant::now() - MEASURE_EVERY;
        let mut window_admitted = 0u64;
        let mut window_start = Instant::now();
        let mut measured = 0.0f64;
        let mut was_waiting = false;
        let mut lag: Option<u64> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if measured_at.elapsed() >= MEASURE_EVERY {
                measured_at = Instant::now();
                match self.line.policy(event).await {
                    Ok(Some(p)) => policy = Some(p),
                    Ok(None) => policy = None,
                    Err(e) => tracing::warn!(event, error = %e, "admitter cannot read the policy"),
                }
                if let Some(probe) = &self.lag {
                    lag = probe.lag().await;
                }
                self.gauges.lag.store(lag.unwrap_or(0), Ordering::Relaxed);
                self.gauges
                    .lag_known
                    .store(lag.is_some() as u64, Ordering::Relaxed);
                // The rate is measured over windows people waited through
                // from start to end: an empty line, or one that filled
                // halfway through the window, says nothing about how fast
                // it moves (a burst's first estimates were 2-4 times too
                // long when the window before the burst counted).
                // The window runs from one measurement to the next (a
                // second at least): every admission counted in it was
                // made between the two.
                let secs = measured_at.duration_since(window_start).as_secs_f64();
                let waiting = match self.line.stats(event).await {
                    Ok(s) => s.waiting > 0,
                    Err(_) => false,
                };
                let whole = std::mem::replace(&mut was_waiting, waiting) && waiting;
                if whole && secs > 0.0 && (window_admitted > 0 || measured > 0.0) {
                    let now_rate = window_admitted as f64 / secs;
                    measured = if measured == 0.0 {
                        now_rate
                    } else {
                        0.5 * measured + 0.5 * now_rate
                    };
                    self.gauges
                        .measured_rate_milli
                        .store((measured * 1000.0) as u64, Ordering::Relaxed);
                    if let Err(e) = self.line.record_rate(event, measured).await {
                        tracing::warn!(event, error = %e, "cannot record the admission rate");
                    }
                }
                window_admitted = 0;
                window_start = measured_at;
            }
            let Some(p) = policy else { continue };
            let factor = lag_factor(&p, lag);
            if factor < 1.0 && measured_at.elapsed() < TICK {
                self.gauges.slowed_rounds.fetch_add(1, Ordering::Relaxed);
            }
            let dt = last.elapsed().as_secs_f64();
            last = Instant::now();
            let rate = p.rate_per_sec.map(|r| r * factor);
            let max = match rate {
                Some(rate) => {
                    self.gauges
                        .effective_rate_milli
                        .store((rate * 1000.0) as u64, Ordering::Relaxed);
                    // This admitter's own bucket; the room's (in the
                    // backend, shared by every admitter) bounds them all.
                    tokens = (tokens + rate * dt).min(burst(rate));
                    tokens.floor() as u32
                }
                None => {
                    self.gauges
                        .effective_rate_milli
                        .store(u64::MAX, Ordering::Relaxed);
                    ((MAX_PER_ROUND as f64 * factor).ceil() as u32).max(1)
                }
            };
            // A round runs even when it may admit nobody: it frees slots,
            // and a room whose rounds stop for longer than the ticket ttl
            // takes its next round as a resumption (nobody lapses for it).
            match self.line.admit(event, now_micros(), max, rate).await {
                Ok(round) => {
                    let n = round.admitted.len() as u64;
                    tokens -= n as f64;
                    window_admitted += n;
                    metrics::counter!("couponrush_line_admitted_total").increment(n);
                    metrics::counter!("couponrush_line_lapsed_total").increment(round.lapsed);
                    metrics::counter!("couponrush_line_admission_expired_total")
                        .increment(round.expired);
                }
                Err(e) => tracing::warn!(event, error = %e, "admission round failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_slows_in_proportion_to_the_lag_beyond_the_limit() {
        let p = RoomPolicy {
            max_active: None,
            rate_per_sec: Some(100.0),
            ticket_ttl: Duration::from_secs(10),
            admission_window: Duration::from_secs(10),
            slow_above_lag: Some(1_000),
        };
        assert_eq!(lag_factor(&p, Some(500)), 1.0);
        assert_eq!(lag_factor(&p, None), 1.0);
        assert_eq!(lag_factor(&p, Some(4_000)), 0.25);
        let ignore = RoomPolicy {
            slow_above_lag: None,
            ..p
        };
        assert_eq!(lag_factor(&ignore, Some(1_000_000)), 1.0);
    }
}
