//! Kafka as a target (`--direct`): requests are produced to the requests
//! topic exactly as the api would (same record, same partitioner, idempotent
//! `acks=all`), isolating the issuers from HTTP.

use std::sync::Arc;

use couponrush_core::producer::{ProduceError, RequestProducer};
use couponrush_core::wire::now_micros;
use couponrush_core::IssueRequest;
use uuid::Uuid;

use super::{Sent, Target, TargetFactory};

/// A shared producer; every worker's target is a handle to it.
#[derive(Clone)]
pub struct DirectTarget {
    producer: Arc<RequestProducer>,
}

impl Target for DirectTarget {
    async fn send(&mut self, event: &str, user: &str, key: Uuid) -> Sent {
        let req = IssueRequest::new(key, event.to_string(), user.to_string(), now_micros());
        match self.producer.send(&req).await {
            Ok(_) => Sent::Accepted {
                accepted_at: req.accepted_at,
                request_id: req.request_id,
            },
            Err(ProduceError::QueueFull) => Sent::Failed("queue_full".into()),
            Err(ProduceError::NotSent(_)) => Sent::Failed("broker".into()),
            Err(ProduceError::Unacknowledged(_)) => Sent::InDoubt {
                kind: "unacknowledged".into(),
                request_id: req.request_id,
            },
        }
    }
}

/// Hands out [`DirectTarget`]s over one producer.
pub struct DirectFactory {
    /// The producer.
    pub producer: Arc<RequestProducer>,
}

impl TargetFactory for DirectFactory {
    type T = DirectTarget;
    fn make(&self) -> DirectTarget {
        DirectTarget {
            producer: self.producer.clone(),
        }
    }
}
