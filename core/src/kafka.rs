//! Kafka client settings shared by every process, and topic administration.
//!
//! Producers are idempotent with `acks=all`: a record the broker acknowledged
//! is on every in-sync replica (on a 3-broker cluster with
//! `min.insync.replicas=2`, it survives the loss of any one broker), and
//! librdkafka's retries never write it twice or out of order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::DeliveryFuture;
use rdkafka::types::RDKafkaErrorCode;

use crate::topics::TopicSpec;

/// Connection settings for one Kafka cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Extra librdkafka properties (`--kafka-opt key=value`), applied last so a
    /// user can override anything, e.g. `security.protocol`.
    pub extra: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Settings for `brokers` with no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            extra: Vec::new(),
        }
    }

    /// A client config: brokers and a client id, nothing else set, then the
    /// extras.
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        self.client_config_with(client_id, |_| {})
    }

    /// A client config: brokers and a client id, then the settings of the
    /// client's role (`role`), then the extras. This is the one place the
    /// extras are applied, always last, so `--kafka-opt` overrides anything.
    pub fn client_config_with(
        &self,
        client_id: &str,
        role: impl FnOnce(&mut ClientConfig),
    ) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            // Loopback brokers in tests resolve `localhost` to ::1 first.
            .set("broker.address.family", "any");
        role(&mut cfg);
        for (k, v) in &self.extra {
            cfg.set(k, v);
        }
        cfg
    }

    /// An idempotent `acks=all` producer config whose local queue holds at
    /// most `queue_messages` records: a full queue is an error the caller
    /// turns into backpressure, never unbounded memory.
    pub fn producer_config(&self, client_id: &str, queue_messages: usize) -> ClientConfig {
        self.producer_config_with(client_id, queue_messages, |_| {})
    }

    /// [`KafkaSettings::producer_config`], with the caller's own settings
    /// (`role`) over the producer defaults and under the extras.
    pub fn producer_config_with(
        &self,
        client_id: &str,
        queue_messages: usize,
        role: impl FnOnce(&mut ClientConfig),
    ) -> ClientConfig {
        self.client_config_with(client_id, |cfg| {
            cfg.set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "2")
                // Records wait for acks: send requests at once, not after Nagle.
                .set("socket.nagle.disable", "true")
                .set("batch.num.messages", "10000")
                .set("queue.buffering.max.messages", queue_messages.to_string())
                .set("queue.buffering.max.kbytes", "262144")
                .set("message.timeout.ms", "30000")
                .set("request.timeout.ms", "10000");
            role(cfg);
        })
    }
}

/// librdkafka looks for timed-out messages once a second and may still send
/// one that has just timed out, allowing it 100 ms (`rd_kafka_ProduceRequest`
/// in rdkafka_request.c): how much later than its message timeout a record
/// can leave the client.
pub const TIMEOUT_SCAN_SLACK: Duration = Duration::from_millis(1100);

/// How late a record handed to a producer can still be appended to the log,
/// read from the producer's **effective** configuration (defaults, role,
/// then every `--kafka-opt`), not from the flags that meant to set it.
///
/// librdkafka gives up on a record `message.timeout.ms` after it was
/// enqueued (linger included), may still send it up to
/// [`TIMEOUT_SCAN_SLACK`] later, and a produce request on the wire may be
/// appended by the broker up to `request.timeout.ms` after that. Linger is
/// counted once more to be safe. The bound holds while the broker answers
/// within its request timeout; only a transactional producer fences what a
/// slower broker appends later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryBound {
    /// The message timeout and the property that set it (`message.timeout.ms`
    /// or its alias `delivery.timeout.ms`; the larger if both are set, since
    /// librdkafka would apply them in no fixed order).
    pub message_timeout: (&'static str, Duration),
    /// `request.timeout.ms`: how long the broker may take to answer.
    pub request_timeout: Duration,
    /// The linger and the property that set it (`linger.ms` or its alias
    /// `queue.buffering.max.ms`).
    pub linger: (&'static str, Duration),
}

/// Why a producer configuration has no delivery bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnboundedDelivery {
    /// librdkafka reads a message timeout of 0 as "never give up".
    #[error("{key}=0 means no timeout: a record could reach the log at any time; set {key} to a number of milliseconds")]
    NoTimeout {
        /// The property.
        key: &'static str,
    },
    /// A value librdkafka would not read as milliseconds either.
    #[error("{key}={value:?} is not a number of milliseconds")]
    NotMillis {
        /// The property.
        key: &'static str,
        /// Its value.
        value: String,
    },
}

impl DeliveryBound {
    /// The bound of `cfg`, a producer configuration as it will be created;
    /// librdkafka's defaults stand in for properties it does not set.
    pub fn of(cfg: &ClientConfig) -> Result<Self, UnboundedDelivery> {
        let millis =
            |key: &'static str| -> Result<Option<(&'static str, Duration)>, UnboundedDelivery> {
                let Some(value) = cfg.get(key) else {
                    return Ok(None);
                };
                match value.trim().parse::<f64>() {
                    Ok(ms) if ms.is_finite() && ms >= 0.0 => {
                        Ok(Some((key, Duration::from_secs_f64(ms / 1000.0))))
                    }
                    _ => Err(UnboundedDelivery::NotMillis {
                        key,
                        value: value.to_string(),
                    }),
                }
            };
        let larger = |keys: [&'static str; 2],
                      default: Duration|
         -> Result<(&'static str, Duration), UnboundedDelivery> {
            let mut found = None;
            for key in keys {
                if let Some((key, d)) = millis(key)? {
                    if found.is_none_or(|(_, f)| d > f) {
                        found = Some((key, d));
                    }
                }
            }
            Ok(found.unwrap_or((keys[0], default)))
        };
        for key in ["message.timeout.ms", "delivery.timeout.ms"] {
            if millis(key)?.is_some_and(|(_, d)| d.is_zero()) {
                return Err(UnboundedDelivery::NoTimeout { key });
            }
        }
        Ok(Self {
            message_timeout: larger(
                ["message.timeout.ms", "delivery.timeout.ms"],
                Duration::from_secs(300),
            )?,
            request_timeout: millis("request.timeout.ms")?
                .map_or(Duration::from_secs(30), |(_, d)| d),
            linger: larger(
                ["linger.ms", "queue.buffering.max.ms"],
                Duration::from_millis(5),
            )?,
        })
    }

    /// The latest a record can be appended, counted from its enqueueing.
    pub fn total(&self) -> Duration {
        self.message_timeout.1 + TIMEOUT_SCAN_SLACK + self.request_timeout + self.linger.1
    }
}

impl std::fmt::Display for DeliveryBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "{:?} ({} {} + librdkafka's timeout scan {} + request.timeout.ms {} + {} {})",
            self.total(),
            self.message_timeout.0,
            ms(self.message_timeout.1),
            ms(TIMEOUT_SCAN_SLACK),
            ms(self.request_timeout),
            self.linger.0,
            ms(self.linger.1),
        )
    }
}

/// Waits for the broker's answer about one produced record: `Ok` with where
/// it landed once acknowledged (on every in-sync replica, with `acks=all`),
/// else why not. A future whose producer went away is
/// [`KafkaError::Canceled`]. The one reading of a librdkafka delivery.
pub async fn acknowledged(delivery: DeliveryFuture) -> Result<Delivery, KafkaError> {
    match delivery.await {
        Ok(Ok(delivered)) => Ok(delivered),
        Ok(Err((e, _record))) => Err(e),
        Err(_canceled) => Err(KafkaError::Canceled),
    }
}

/// Waits for every delivery of `pending`, then answers `Ok` if the broker
/// acknowledged them all, else the first error in send order. Never returns
/// while a record is still in flight, so a caller that retries after an
/// error does not race its own earlier sends.
pub async fn all_acknowledged(
    pending: impl IntoIterator<Item = DeliveryFuture>,
) -> Result<(), KafkaError> {
    for acked in join_all(pending.into_iter().map(acknowledged)).await {
        acked?;
    }
    Ok(())
}

/// Parses `key=value` into a librdkafka property (for `--kafka-opt`).
pub fn parse_kafka_opt(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!(
            "expected a librdkafka property as key=value, got {s:?}"
        )),
    }
}

/// Why topic setup failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The admin client could not be created or the broker did not answer.
    #[error(
        "cannot administer topics on {brokers}: {source} (is the broker up? see scripts/dev-up)"
    )]
    Admin {
        /// The brokers tried.
        brokers: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The broker refused to create a topic.
    #[error("cannot create topic {topic}: {code}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's error.
        code: RDKafkaErrorCode,
    },
    /// A topic is missing from the cluster's metadata.
    #[error("topic {0} does not exist; create it or start the api with --topic-partitions N")]
    Missing(String),
}

/// Creates each topic of `specs` that does not exist yet, with its
/// `min.insync.replicas` ([`TopicSpec::min_insync_replicas`]); existing topics
/// are left as they are. Returns the names of the topics created.
pub async fn ensure_topics(
    kafka: &KafkaSettings,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<Vec<String>, TopicError> {
    let admin_err = |source| TopicError::Admin {
        brokers: kafka.brokers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config("couponrush-admin")
        .create()
        .map_err(admin_err)?;
    // NewTopic borrows its config values: they live here.
    let min_insync: Vec<Option<String>> = specs
        .iter()
        .map(|s| s.min_insync_replicas().map(|n| n.to_string()))
        .collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&min_insync)
        .map(|(s, min_insync)| {
            let mut t = NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(s.replication),
            );
            for (k, v) in &s.configs {
                t = t.set(k, v);
            }
            if let Some(n) = min_insync {
                t = t.set("min.insync.replicas", n);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let results = admin
        .create_topics(new_topics.iter(), &opts)
        .await
        .map_err(admin_err)?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    Ok(created)
}

/// Deletes topics, ignoring ones that do not exist.
pub async fn delete_topics(
    kafka: &KafkaSettings,
    names: &[&str],
    timeout: Duration,
) -> Result<(), TopicError> {
    let admin_err = |source| TopicError::Admin {
        brokers: kafka.brokers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config("couponrush-admin")
        .create()
        .map_err(admin_err)?;
    let opts = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let results = admin.delete_topics(names, &opts).await.map_err(admin_err)?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    Ok(())
}

/// Partition counts of `topics`, from one metadata request. Blocking: call it
/// from a blocking thread.
pub fn partition_counts(
    kafka: &KafkaSettings,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, i32>, TopicError> {
    let admin_err = |source| TopicError::Admin {
        brokers: kafka.brokers.clone(),
        source,
    };
    let client: BaseConsumer = kafka
        .client_config("couponrush-metadata")
        .create()
        .map_err(admin_err)?;
    let mut counts = HashMap::new();
    for topic in topics {
        let md = client
            .fetch_metadata(Some(topic), timeout)
            .map_err(admin_err)?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == *topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0)
            .ok_or_else(|| TopicError::Missing(topic.to_string()))?;
        counts.insert(topic.to_string(), n);
    }
    Ok(counts)
}

/// Leaves the consumer group *before* the consumer is dropped: pauses what
/// is assigned (nothing more is handed out, so nothing more can be stored
/// as consumed, even by an auto-storing consumer), unsubscribes, then polls,
/// serving the rebalance callbacks, for at least [`LEAVE_SETTLE`] and until
/// nothing is assigned. It gives up after `within` (a callback it serves may
/// itself take longer). True if the member left with nothing assigned.
///
/// Why not just drop it: librdkafka 2.12 can hang for good in
/// `rd_kafka_assign` when a rebalance is answered while the consumer is
/// closing (confluentinc/librdkafka#4884, open). Seen here once, in
/// `lab/tests/buckets.rs`: an in-process issuer's drop, polling the close
/// queue, answered a revoke and never returned. Unsubscribing queues the
/// revoke (an empty one for a member that owns nothing, under the eager
/// protocol) before it returns, and a rebalance the application had not
/// answered yet is still queued too: the polls here answer both, so the
/// drop closes a consumer with no rebalance left to answer.
pub fn leave_group<C: ConsumerContext>(consumer: &BaseConsumer<C>, within: Duration) -> bool {
    if let Ok(assigned) = consumer.assignment() {
        let _ = consumer.pause(&assigned);
    }
    consumer.unsubscribe();
    let start = Instant::now();
    loop {
        // Polled first: the queued rebalance is answered even when nothing
        // is assigned.
        let _ = consumer.poll(Duration::from_millis(50));
        if start.elapsed() < LEAVE_SETTLE {
            continue;
        }
        match consumer.assignment() {
            Ok(a) if a.count() == 0 => return true,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "leaving the group: the assignment is unknown");
                return false;
            }
        }
        if start.elapsed() >= within {
            tracing::warn!(
                ?within,
                "leaving the group: partitions still assigned; closing anyway"
            );
            return false;
        }
    }
}

/// How long [`leave_group`] polls at least, answering what unsubscribing
/// queued.
pub const LEAVE_SETTLE: Duration = Duration::from_millis(200);

/// Sets the gauge `metric` (labels `topic`, `partition`) to each partition's
/// consumer lag in a librdkafka statistics report: what a consumer's
/// `ClientContext::stats` does with `statistics.interval.ms` set.
pub fn record_consumer_lag(stats: &rdkafka::Statistics, metric: &'static str) {
    for topic in stats.topics.values() {
        for p in topic.partitions.values() {
            if p.partition >= 0 && p.consumer_lag >= 0 {
                metrics::gauge!(
                    metric,
                    "topic" => topic.topic.clone(),
                    "partition" => p.partition.to_string()
                )
                .set(p.consumer_lag as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_opts_parse() {
        assert_eq!(
            parse_kafka_opt("security.protocol=SSL").unwrap(),
            ("security.protocol".into(), "SSL".into())
        );
        assert!(parse_kafka_opt("novalue").is_err());
        assert!(parse_kafka_opt("=x").is_err());
    }

    #[test]
    fn extras_override_defaults() {
        let mut k = KafkaSettings::new("127.0.0.1:9");
        k.extra.push(("linger.ms".into(), "50".into()));
        assert_eq!(k.producer_config("t", 10).get("linger.ms"), Some("50"));
        assert_eq!(k.producer_config("t", 10).get("acks"), Some("all"));
    }

    #[test]
    fn the_delivery_bound_is_read_from_the_effective_configuration() {
        let mut k = KafkaSettings::new("127.0.0.1:9");
        let bound = DeliveryBound::of(&k.producer_config("t", 10)).unwrap();
        assert_eq!(
            bound.message_timeout,
            ("message.timeout.ms", Duration::from_secs(30))
        );
        assert_eq!(bound.request_timeout, Duration::from_secs(10));
        assert_eq!(bound.linger, ("linger.ms", Duration::from_millis(2)));
        assert_eq!(
            bound.total(),
            Duration::from_millis(30_000 + 1_100 + 10_000 + 2)
        );

        k.extra.push(("delivery.timeout.ms".into(), "45000".into()));
        k.extra
            .push(("queue.buffering.max.ms".into(), "7.5".into()));
        k.extra.push(("request.timeout.ms".into(), "500".into()));
        let bound = DeliveryBound::of(&k.producer_config("t", 10)).unwrap();
        assert_eq!(
            bound.message_timeout,
            ("delivery.timeout.ms", Duration::from_secs(45)),
            "of two aliases, the larger: librdkafka applies them in no fixed order"
        );
        assert_eq!(bound.request_timeout, Duration::from_millis(500));
        assert_eq!(
            bound.linger,
            ("queue.buffering.max.ms", Duration::from_micros(7500))
        );
        let shown = bound.to_string();
        for part in [
            "delivery.timeout.ms 45000",
            "request.timeout.ms 500",
            "queue.buffering.max.ms 7.5",
        ] {
            assert!(shown.contains(part), "{shown}");
        }

        let unset = DeliveryBound::of(&ClientConfig::new()).unwrap();
        assert_eq!(
            unset.total(),
            Duration::from_millis(300_000 + 1_100 + 30_000 + 5),
            "librdkafka's defaults"
        );
    }

    #[test]
    fn a_producer_that_never_gives_up_has_no_delivery_bound() {
        let mut k = KafkaSettings::new("127.0.0.1:9");
        k.extra.push(("delivery.timeout.ms".into(), "0".into()));
        assert_eq!(
            DeliveryBound::of(&k.producer_config("t", 10)),
            Err(UnboundedDelivery::NoTimeout {
                key: "delivery.timeout.ms"
            })
        );
        let mut k = KafkaSettings::new("127.0.0.1:9");
        k.extra.push(("request.timeout.ms".into(), "10s".into()));
        assert!(matches!(
            DeliveryBound::of(&k.producer_config("t", 10)),
            Err(UnboundedDelivery::NotMillis {
                key: "request.timeout.ms",
                ..
            })
        ));
    }

    #[test]
    fn a_role_overrides_defaults_and_extras_override_a_role() {
        let mut k = KafkaSettings::new("127.0.0.1:9");
        k.extra.push(("message.timeout.ms".into(), "7".into()));
        let role = |cfg: &mut ClientConfig| {
            cfg.set("message.timeout.ms", "5").set("linger.ms", "9");
        };
        let cfg = k.producer_config_with("t", 10, role);
        assert_eq!(
            cfg.get("linger.ms"),
            Some("9"),
            "the role over the defaults"
        );
        assert_eq!(cfg.get("message.timeout.ms"), Some("7"), "the extras last");
        let cfg = k.client_config_with("t", |cfg| {
            cfg.set("group.id", "g");
        });
        assert_eq!(cfg.get("group.id"), Some("g"));
        assert_eq!(cfg.get("message.timeout.ms"), Some("7"));
    }
}
