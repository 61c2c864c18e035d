//! Latency histograms: HDR, in microseconds, merged (never averaged), and
//! serialised compactly so reports from several load generators merge
//! exactly.

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded: one hour, in µs (larger values are clamped).
pub const MAX_MICROS: u64 = 3_600_000_000;

/// A new latency histogram (1 µs to 1 h, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid bounds")
}

/// Records `micros`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, micros: u64) {
    h.saturating_record(micros.clamp(1, MAX_MICROS));
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// 99.99th percentile.
    pub p9999: f64,
    /// Largest value.
    pub max: f64,
    /// Mean (for reference only; percentiles are what count).
    pub mean: f64,
}

/// Summarises `h` in milliseconds.
pub fn summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    LatencySummary {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        p9999: ms(h.value_at_quantile(0.9999)),
        max: ms(h.max()),
        mean: h.mean() / 1000.0,
    }
}

/// Serialises a histogram (HDR V2 + deflate, base64).
pub fn encode(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .expect("serialising to memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Reverses [`encode`].
pub fn decode(s: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram does not decode: {e:?}"))?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_equal_the_histogram_of_the_union() {
        let (mut a, mut b, mut union) = (histogram(), histogram(), histogram());
        for v in 1..5000u64 {
            let x = v * 37 % 100_000 + 1;
            if v % 3 == 0 {
                record(&mut a, x);
            } else {
                record(&mut b, x);
            }
            record(&mut union, x);
        }
        let mut merged = decode(&encode(&a)).unwrap();
        merged.add(decode(&encode(&b)).unwrap()).unwrap();
        assert_eq!(merged, union);
        assert_eq!(summary(&merged), summary(&union));
    }

    #[test]
    fn summaries_are_in_milliseconds_and_clamped() {
        let mut h = histogram();
        for _ in 0..99 {
            record(&mut h, 1_000);
        }
        record(&mut h, u64::MAX);
        let s = summary(&h);
        assert_eq!(s.count, 100);
        assert!((s.p50 - 1.0).abs() < 0.01, "{s:?}");
        assert!(s.max >= 3_599_000.0, "clamped to an hour: {s:?}");
        assert!(decode("not base64!").is_err());
    }
}
