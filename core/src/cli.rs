//! Command-line flags shared by every binary, so `--brokers`, `--redis` and
//! the topic names mean the same thing everywhere. Each flag also reads an
//! environment variable (shown in `--help`); binaries flatten these groups
//! into their own CLI and turn them into plain settings structs.

use std::time::Duration;

use clap::builder::FalseyValueParser;
use clap::{Args, Parser};

use crate::kafka::{parse_kafka_opt, KafkaSettings};
use crate::topics::Topics;

/// Parses a human duration: `250ms`, `10s`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}: use e.g. 250ms, 10s, 5m, 7d"))
}

/// Parses `args` as `T`'s command line with every environment fallback
/// switched off: only the flags given and the defaults count.
///
/// For the processes a demo, a lab run or a test starts for itself: the
/// user's environment (an exported `ADMIN_TOKEN`, `KAFKA_OPTS`, a topic
/// name) configures the user's own processes, never the private deployment
/// whose clients know nothing of it. Panics on flags `T` refuses (a bug in
/// the caller, not user input).
pub fn parse_ignoring_env<T: Parser>(args: &[&str]) -> T {
    let matches = T::command()
        .mut_args(|a| a.env(None::<&str>))
        .try_get_matches_from(args)
        .and_then(|m| T::from_arg_matches(&m));
    match matches {
        Ok(t) => t,
        Err(e) => panic!("{args:?} is not a valid command line: {e}"),
    }
}

/// Where the Kafka cluster is.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(
        long = "brokers",
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Extra librdkafka property, key=value; repeat the flag, or separate with ';' in the env var.
    #[arg(long = "kafka-opt", env = "KAFKA_OPTS", value_delimiter = ';', value_parser = parse_kafka_opt)]
    pub kafka_opt: Vec<(String, String)>,
}

impl KafkaArgs {
    /// The settings these flags describe.
    pub fn settings(&self) -> KafkaSettings {
        KafkaSettings {
            brokers: self.brokers.clone(),
            extra: self.kafka_opt.clone(),
        }
    }
}

/// Topic names.
#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    /// Topic the api writes requests to.
    #[arg(long, env = "REQUESTS_TOPIC", default_value = crate::topics::REQUESTS)]
    pub requests_topic: String,
    /// Topic the issuers write decisions to (the durable ledger).
    #[arg(long, env = "OUTCOMES_TOPIC", default_value = crate::topics::OUTCOMES)]
    pub outcomes_topic: String,
    /// Dead-letter topic for records that cannot be decided.
    #[arg(long, env = "DLQ_TOPIC", default_value = crate::topics::DLQ)]
    pub dlq_topic: String,
    /// Compacted topic of event definitions (for rebuilding a lost store).
    #[arg(long, env = "EVENTS_TOPIC", default_value = crate::topics::EVENTS)]
    pub events_topic: String,
    /// Compacted topic of ledger checkpoints (a rebuild reads the latest and
    /// the outcomes after it).
    #[arg(long, env = "CHECKPOINTS_TOPIC", default_value = crate::topics::CHECKPOINTS)]
    pub checkpoints_topic: String,
    /// Topic of actions on held coupons (claim, cancel, expire), decided by
    /// the issuers beside the requests.
    #[arg(long, env = "COMPENSATIONS_TOPIC", default_value = crate::topics::COMPENSATIONS)]
    pub compensations_topic: String,
}

impl TopicArgs {
    /// The topic names these flags describe.
    pub fn topics(&self) -> Topics {
        Topics {
            requests: self.requests_topic.clone(),
            outcomes: self.outcomes_topic.clone(),
            dlq: self.dlq_topic.clone(),
            events: self.events_topic.clone(),
            checkpoints: self.checkpoints_topic.clone(),
            compensations: self.compensations_topic.clone(),
        }
    }
}

/// Where the store is.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Redis URL of the coupon store: redis://host:port/db for one server,
    /// redis+cluster://host:port,host:port,… for a Redis Cluster.
    #[arg(
        long = "redis",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// How long a decided request id is remembered for deduplication; keep it
    /// at least as long as the requests topic's retention (7d by default).
    #[arg(long, env = "DEDUP_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub dedup_retention: Duration,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log JSON lines instead of text (the filter is RUST_LOG, default info).
    #[arg(long, env = "LOG_JSON", value_parser = FalseyValueParser::new())]
    pub log_json: bool,
}
