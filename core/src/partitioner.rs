//! Partitioning strategies: how requests are spread over `coupon.requests`.
//!
//! This is the seed's central trade-off. Kafka orders records only within a
//! partition, and a partition is read by one consumer of a group at a time:
//!
//! | strategy    | record key                 | order                        | throughput |
//! |-------------|----------------------------|------------------------------|------------|
//! | `event`     | event id                   | strict first-come order      | one partition, one issuer |
//! | `user`      | user id                    | per user                     | all partitions |
//! | `spread`    | request id                 | soft: per partition only     | all partitions, even |
//! | `buckets:K` | event id + `#` + seq mod K | soft, over K partitions      | K partitions |
//!
//! The partition is computed here, not by librdkafka, so placement is a pure
//! function that tests can pin: keyed strategies use Kafka's own murmur2 hash
//! (a Java producer with the same key picks the same partition), `buckets:K`
//! takes K consecutive partitions starting at the event's hashed home.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::wire::IssueRequest;

/// How the api chooses a request's key and partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Partitioner {
    /// One key per event: strict first-come order on one hot partition.
    Event,
    /// Key by user: a user's requests stay in order.
    User,
    /// Key by request id: even spread, soft ordering.
    #[default]
    Spread,
    /// Key by event and a rotating bucket: soft ordering over K partitions.
    Buckets(u32),
}

impl Partitioner {
    /// The record key for `req`, the `seq`-th request this producer sends.
    pub fn key(&self, req: &IssueRequest, seq: u64) -> String {
        match self {
            Partitioner::Event => req.event_id.clone(),
            Partitioner::User => req.user_id.clone(),
            Partitioner::Spread => req.request_id.to_string(),
            Partitioner::Buckets(k) => format!("{}#{}", req.event_id, seq % u64::from(*k)),
        }
    }

    /// The partition of `req` among `partitions` (which must be at least 1).
    pub fn partition(&self, req: &IssueRequest, seq: u64, partitions: i32) -> i32 {
        let p = partitions.max(1) as u32;
        let slot = match self {
            Partitioner::Event => positive_murmur2(req.event_id.as_bytes()) % p,
            Partitioner::User => positive_murmur2(req.user_id.as_bytes()) % p,
            Partitioner::Spread => positive_murmur2(req.request_id.as_bytes()) % p,
            Partitioner::Buckets(k) => {
                let home = positive_murmur2(req.event_id.as_bytes()) % p;
                let bucket = (seq % u64::from(*k)) as u32;
                (home + bucket % p) % p
            }
        };
        slot as i32
    }

    /// How many partitions this strategy can use for one event at most.
    pub fn max_partitions_per_event(&self, partitions: i32) -> i32 {
        match self {
            Partitioner::Event => 1,
            Partitioner::Buckets(k) => (*k as i32).min(partitions),
            Partitioner::User | Partitioner::Spread => partitions,
        }
    }
}

impl fmt::Display for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Partitioner::Event => f.write_str("event"),
            Partitioner::User => f.write_str("user"),
            Partitioner::Spread => f.write_str("spread"),
            Partitioner::Buckets(k) => write!(f, "buckets:{k}"),
        }
    }
}

impl FromStr for Partitioner {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "event" => Ok(Partitioner::Event),
            "user" => Ok(Partitioner::User),
            "spread" => Ok(Partitioner::Spread),
            _ => match s.strip_prefix("buckets:").map(str::parse::<u32>) {
                Some(Ok(k)) if k >= 1 => Ok(Partitioner::Buckets(k)),
                _ => Err(format!(
                    "unknown partitioner {s:?}: use event, user, spread or buckets:K (K >= 1)"
                )),
            },
        }
    }
}

impl From<Partitioner> for String {
    fn from(p: Partitioner) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for Partitioner {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Kafka's `toPositive(murmur2(key))`, the basis of its keyed placement.
pub fn positive_murmur2(data: &[u8]) -> u32 {
    (murmur2(data) & 0x7fff_ffff) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use uuid::Uuid;

    fn req(event: &str, user: &str) -> IssueRequest {
        IssueRequest::new(Uuid::now_v7(), event.into(), user.into(), 0)
    }

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn parses_and_prints_every_strategy() {
        for s in ["event", "user", "spread", "buckets:4"] {
            assert_eq!(s.parse::<Partitioner>().unwrap().to_string(), s);
        }
        assert!("buckets:0".parse::<Partitioner>().is_err());
        assert!("buckets:x".parse::<Partitioner>().is_err());
        assert!("round-robin".parse::<Partitioner>().is_err());
    }

    #[test]
    fn event_strategy_puts_one_event_on_one_partition() {
        let parts: HashSet<i32> = (0..1000)
            .map(|i| Partitioner::Event.partition(&req("drop", &format!("u{i}")), i, 8))
            .collect();
        assert_eq!(parts.len(), 1);
        let expected = (positive_murmur2(b"drop") % 8) as i32;
        assert_eq!(parts.into_iter().next(), Some(expected));
    }

    #[test]
    fn user_strategy_keeps_a_user_on_one_partition() {
        let p = Partitioner::User;
        let first = p.partition(&req("drop", "alice"), 0, 8);
        for seq in 1..100 {
            assert_eq!(p.partition(&req("drop", "alice"), seq, 8), first);
        }
    }

    #[test]
    fn spread_strategy_is_even() {
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            counts[Partitioner::Spread.partition(&req("drop", "u"), i, 8) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn buckets_use_exactly_k_consecutive_partitions() {
        let p = Partitioner::Buckets(3);
        let home = (positive_murmur2(b"drop") % 8) as i32;
        let parts: Vec<i32> = (0..6)
            .map(|s| p.partition(&req("drop", "u"), s, 8))
            .collect();
        let expected: Vec<i32> = (0..6).map(|s| (home + s % 3) % 8).collect();
        assert_eq!(parts, expected);
        assert_eq!(p.key(&req("drop", "u"), 4), "drop#1");
        // More buckets than partitions wrap around and cover every partition.
        let all: HashSet<i32> = (0..64)
            .map(|s| Partitioner::Buckets(16).partition(&req("drop", "u"), s, 4))
            .collect();
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn serde_uses_the_flag_spelling() {
        let json = serde_json::to_string(&Partitioner::Buckets(4)).unwrap();
        assert_eq!(json, "\"buckets:4\"");
        assert_eq!(
            serde_json::from_str::<Partitioner>(&json).unwrap(),
            Partitioner::Buckets(4)
        );
    }
}
