//! Who sends what: the user of each logical request, and whether the client
//! retries it with the same `Idempotency-Key`.
//!
//! Every choice is a pure function of `(seed, request index)`, so a run is
//! reproducible and workers need no shared random state.

use std::fmt;
use std::str::FromStr;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

/// How users are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum UserDist {
    /// Every user equally likely.
    Uniform,
    /// A few users send most requests (exponent S > 0): bots and refreshers.
    Zipf(f64),
}

impl fmt::Display for UserDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserDist::Uniform => f.write_str("uniform"),
            UserDist::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

impl FromStr for UserDist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(UserDist::Uniform),
            _ => match s.strip_prefix("zipf:").map(str::parse::<f64>) {
                Some(Ok(x)) if x > 0.0 && x.is_finite() => Ok(UserDist::Zipf(x)),
                _ => Err(format!(
                    "unknown user distribution {s:?}: use uniform or zipf:S (S > 0)"
                )),
            },
        }
    }
}

impl From<UserDist> for String {
    fn from(d: UserDist) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for UserDist {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// How a client retries one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Sent once.
    None,
    /// Sent again after the first answer, with the same key.
    Sequential,
    /// Sent twice at the same time, with the same key.
    Concurrent,
}

/// The user population and the retry behaviour of one run.
#[derive(Debug, Clone)]
pub struct Population {
    users: u64,
    dist: UserDist,
    retry_ratio: f64,
    seed: u64,
    zipf: Option<Zipf<f64>>,
}

impl Population {
    /// `users` users (at least 1) drawn by `dist`; a `retry_ratio` fraction of
    /// requests is retried (half sequentially, half concurrently).
    pub fn new(users: u64, dist: UserDist, retry_ratio: f64, seed: u64) -> Self {
        let users = users.max(1);
        let zipf = match dist {
            UserDist::Zipf(s) => Some(Zipf::new(users as f64, s).expect("validated exponent")),
            UserDist::Uniform => None,
        };
        Self {
            users,
            dist,
            retry_ratio: retry_ratio.clamp(0.0, 1.0),
            seed,
            zipf,
        }
    }

    fn rng(&self, index: u64) -> SmallRng {
        SmallRng::seed_from_u64(self.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The user id of request `index`.
    pub fn user(&self, index: u64) -> String {
        let mut rng = self.rng(index);
        let k = match &self.zipf {
            Some(z) => z.sample(&mut rng) as u64 - 1,
            None => rng.random_range(0..self.users),
        };
        format!("user-{k}")
    }

    /// Whether and how request `index` is retried.
    pub fn retry(&self, index: u64) -> Retry {
        let mut rng = self.rng(index ^ 0x5151);
        if rng.random::<f64>() >= self.retry_ratio {
            Retry::None
        } else if rng.random::<bool>() {
            Retry::Sequential
        } else {
            Retry::Concurrent
        }
    }

    /// The distribution, for reports.
    pub fn dist(&self) -> UserDist {
        self.dist
    }

    /// The number of users.
    pub fn users(&self) -> u64 {
        self.users
    }

    /// The fraction of requests retried.
    pub fn retry_ratio(&self) -> f64 {
        self.retry_ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn choices_are_reproducible_and_bounded() {
        let p = Population::new(100, UserDist::Uniform, 0.1, 42);
        assert_eq!(
            p.user(7),
            Population::new(100, UserDist::Uniform, 0.1, 42).user(7)
        );
        for i in 0..1000 {
            let n: u64 = p.user(i).trim_start_matches("user-").parse().unwrap();
            assert!(n < 100);
        }
    }

    #[test]
    fn retry_ratio_is_respected_and_split() {
        let p = Population::new(10, UserDist::Uniform, 0.1, 1);
        let mut kinds: HashMap<&str, u32> = HashMap::new();
        for i in 0..20_000 {
            let k = match p.retry(i) {
                Retry::None => "none",
                Retry::Sequential => "seq",
                Retry::Concurrent => "conc",
            };
            *kinds.entry(k).or_default() += 1;
        }
        let retried = kinds["seq"] + kinds["conc"];
        assert!((1_700..2_300).contains(&retried), "{kinds:?}");
        assert!(kinds["seq"] > 700 && kinds["conc"] > 700, "{kinds:?}");
        assert_eq!(
            Population::new(10, UserDist::Uniform, 0.0, 1).retry(3),
            Retry::None
        );
    }

    #[test]
    fn zipf_concentrates_on_few_users() {
        let p = Population::new(10_000, "zipf:1.2".parse().unwrap(), 0.0, 3);
        let top = (0..10_000).filter(|i| p.user(*i) == "user-0").count();
        assert!(top > 1000, "user-0 drew {top} of 10000");
        assert!("zipf:0".parse::<UserDist>().is_err());
        assert_eq!(
            "zipf:1.5".parse::<UserDist>().unwrap().to_string(),
            "zipf:1.5"
        );
    }
}
