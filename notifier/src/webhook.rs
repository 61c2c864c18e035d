//! The endpoint: one `POST` per final coupon, retried by the
//! [`RetryPolicy`] until the endpoint acknowledges it or the attempts run
//! out.
//!
//! What the endpoint's answer means:
//! - **2xx**: acknowledged. The endpoint has the coupon (or had it already:
//!   it dedups by `Idempotency-Key` and answers 2xx again).
//! - **408, 425, 429, 5xx, a connection error, no answer within
//!   `--request-timeout`**: not now. Retried after a pause (a `Retry-After`
//!   in seconds is honoured).
//! - **any other status** (400, 404, 422, …): the endpoint refuses this
//!   body and would refuse it again: dead-lettered at once, not retried.
//!
//! A request that timed out may still have been acted on by the endpoint:
//! the retry then arrives as a duplicate at the wire, which the key makes
//! harmless.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::notice::Notice;
use crate::retry::RetryPolicy;

/// The header carrying a delivery's key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Most bytes of an answer's body read (and thrown away) to keep the
/// connection reusable.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A `--webhook` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Not a URL.
    #[error("--webhook {url:?} is not a URL ({reason}); pass e.g. http://127.0.0.1:9000/coupons")]
    NotAUrl {
        /// What was given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A scheme this build cannot speak.
    #[error(
        "--webhook {0:?}: only http:// is supported (this build has no TLS client); \
         put a TLS-terminating proxy on loopback in front of an https endpoint"
    )]
    Scheme(String),
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx.
    Acknowledged(StatusCode),
    /// Worth another try, after at least `retry_after` if the endpoint said so.
    NotNow {
        /// The status, or the error.
        reason: Failure,
        /// The endpoint's `Retry-After`, in whole seconds.
        retry_after: Option<Duration>,
    },
    /// The endpoint refuses this body: no retry.
    Refused(StatusCode),
}

/// Why an attempt was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint answered with this status.
    Status(StatusCode),
    /// No answer within the request timeout.
    Timeout,
    /// The connection failed (refused, reset, …).
    Connection(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(s) => write!(f, "HTTP {}", s.as_u16()),
            Failure::Timeout => f.write_str("no answer within the request timeout"),
            Failure::Connection(e) => write!(f, "connection error: {e}"),
        }
    }
}

/// How a delivery ended, all attempts counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The endpoint acknowledged it.
    Acknowledged {
        /// Attempts made (1 = at once).
        attempts: u32,
    },
    /// The endpoint never acknowledged it: dead-letter it.
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// `exhausted` (attempts ran out) or `refused` (a status not worth
        /// retrying).
        code: &'static str,
        /// The last attempt's failure.
        last: Failure,
    },
    /// Cancelled (revoke or shutdown) before either: nothing is known, the
    /// record stays uncommitted and is delivered again by its next reader.
    Abandoned {
        /// Attempts made.
        attempts: u32,
    },
}

/// The webhook endpoint and its HTTP client (pooled keep-alive connections).
pub struct Webhook {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    timeout: Duration,
}

impl Webhook {
    /// A client for `url` (http only) whose attempts each get `timeout`,
    /// keeping up to `connections` idle connections.
    pub fn new(url: &str, timeout: Duration, connections: usize) -> Result<Self, WebhookError> {
        let uri: Uri =
            url.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| WebhookError::NotAUrl {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(WebhookError::Scheme(url.to_string())),
            None => {
                return Err(WebhookError::NotAUrl {
                    url: url.to_string(),
                    reason: "no scheme".into(),
                })
            }
        }
        if uri.host().is_none() {
            return Err(WebhookError::NotAUrl {
                url: url.to_string(),
                reason: "no host".into(),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            uri,
            timeout,
        })
    }

    /// One `POST` of `notice`.
    pub async fn post(&self, notice: &Notice) -> Attempt {
        let key = notice.idempotency_key();
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(IDEMPOTENCY_KEY, key)
            .body(Full::new(Bytes::from(notice.to_body())))
            .expect("a notice is always a valid request");
        let answer = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read the (small) body so the connection goes back to the pool.
            let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
        })
        .await;
        match answer {
            Err(_) => Attempt::NotNow {
                reason: Failure::Timeout,
                retry_after: None,
            },
            Ok(Err(e)) => Attempt::NotNow {
                reason: Failure::Connection(error_chain(&e)),
                retry_after: None,
            },
            Ok(Ok((status, _))) if status.is_success() => Attempt::Acknowledged(status),
            Ok(Ok((status, retry_after))) if worth_retrying(status) => Attempt::NotNow {
                reason: Failure::Status(status),
                retry_after,
            },
            Ok(Ok((status, _))) => Attempt::Refused(status),
        }
    }

    /// Posts `notice` until the endpoint acknowledges it, refuses it, the
    /// attempts of `policy` run out, or `cancel` fires.
    pub async fn deliver(
        &self,
        notice: &Notice,
        policy: &RetryPolicy,
        cancel: &CancellationToken,
    ) -> Delivery {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            if cancel.is_cancelled() {
                return Delivery::Abandoned { attempts };
            }
            attempts += 1;
            let attempt = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Delivery::Abandoned { attempts },
                a = self.post(notice) => a,
            };
            let (last, retry_after) = match attempt {
                Attempt::Acknowledged(_) => {
                    metrics::histogram!("couponrush_notifier_delivery_seconds")
                        .record(started.elapsed());
                    return Delivery::Acknowledged { attempts };
                }
                Attempt::Refused(status) => {
                    return Delivery::GaveUp {
                        attempts,
                        code: "refused",
                        last: Failure::Status(status),
                    }
                }
                Attempt::NotNow {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            if attempts >= policy.max_attempts.max(1) {
                return Delivery::GaveUp {
                    attempts,
                    code: "exhausted",
                    last,
                };
            }
            let pause = policy.pause(attempts, retry_after, &mut rand::rng());
            metrics::counter!("couponrush_notifier_retries_total").increment(1);
            tracing::debug!(key = %notice.idempotency_key(), attempts, %last, ?pause, "delivery not acknowledged; retrying");
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Delivery::Abandoned { attempts },
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Statuses that say "not now" rather than "never".
fn worth_retrying(status: StatusCode) -> bool {
    status.is_server_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        )
}

/// An error and its sources, on one line ("connection refused" hides two
/// levels down in hyper's errors).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_with_a_host_are_accepted() {
        let t = Duration::from_secs(1);
        assert!(Webhook::new("http://127.0.0.1:9/hook", t, 1).is_ok());
        assert!(matches!(
            Webhook::new("https://example.invalid/hook", t, 1),
            Err(WebhookError::Scheme(_))
        ));
        assert!(matches!(
            Webhook::new("127.0.0.1:9", t, 1),
            Err(WebhookError::NotAUrl { .. })
        ));
        assert!(matches!(
            Webhook::new("not a url", t, 1),
            Err(WebhookError::NotAUrl { .. })
        ));
    }

    #[test]
    fn server_trouble_is_retried_and_a_refusal_is_not() {
        for s in [500, 502, 503, 504, 408, 425, 429] {
            assert!(worth_retrying(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 404, 409, 410, 413, 422] {
            assert!(!worth_retrying(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
