//! Every error the api can answer, as one enum with one JSON shape:
//! `{"error": "<code>", "message": "<what was wrong and what to do>"}`.
//!
//! Client mistakes are 4xx. Overload and an unreachable broker or store are
//! 503 with `Retry-After`: the request was not accepted, nothing was lost, and
//! retrying with the same `Idempotency-Key` is always safe. One 503 is
//! different, and says so: `unacknowledged` ([`AppError::InDoubt`]) means the
//! request reached the broker and its acknowledgement did not come back in
//! time, so it *may* have been written and decided. Its body carries the
//! client's own request id and status URL; a retry with the same
//! `Idempotency-Key` is the same request (decided at most once), so retrying
//! settles it. Internal details (error chains, addresses) go to the log,
//! never to the client.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An error answer.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed (bad JSON, bad header, bad path).
    #[error("{message}")]
    BadRequest {
        /// Stable code, e.g. `invalid_json`.
        code: &'static str,
        /// What was wrong.
        message: String,
    },
    /// A body or parameter axum rejected, with axum's status (400, 413, 415, 422).
    #[error("{message}")]
    Rejected {
        /// The status axum chose.
        status: StatusCode,
        /// What was wrong.
        message: String,
    },
    /// Well-formed but invalid values.
    #[error("{0}")]
    Unprocessable(String),
    /// No such event (or route).
    #[error("{0}")]
    NotFound(String),
    /// Admin route without a valid token.
    #[error("admin routes need 'Authorization: Bearer <ADMIN_TOKEN>'")]
    Unauthorized,
    /// Someone else's resource (a hold of another user): nothing about it
    /// is revealed.
    #[error("{0}")]
    Forbidden(String),
    /// The resource is in a state that refuses the request (a claim after
    /// the hold expired), with a code saying which.
    #[error("{message}")]
    Conflict {
        /// Stable code, e.g. `hold_expired`.
        code: &'static str,
        /// What happened and what to do.
        message: String,
    },
    /// Too much load right now; nothing was accepted.
    #[error("{0}")]
    Overloaded(String),
    /// A dependency (broker, store) is unreachable; nothing was accepted.
    #[error("{0}")]
    Unavailable(String),
    /// Sent to the broker, not acknowledged in time: the request may have
    /// been written. Never "refused": the client is told its request id.
    #[error("{message}")]
    InDoubt {
        /// The client's own request (its key scoped by event and user).
        request_id: uuid::Uuid,
        /// Where its decision will show, if it was written.
        status_url: String,
        /// What happened and what to do.
        message: String,
    },
}

impl AppError {
    /// A 400 with a code and message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            AppError::Rejected { status, .. } => (
                *status,
                match status.as_u16() {
                    408 => "request_timeout",
                    413 => "body_too_large",
                    415 => "unsupported_media_type",
                    422 => "invalid_body",
                    _ => "bad_request",
                },
            ),
            AppError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AppError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            AppError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            AppError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::InDoubt { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unacknowledged"),
        }
    }
}

/// Seconds a client should wait after a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut body = json!({ "error": code, "message": self.to_string() });
        if let AppError::InDoubt {
            request_id,
            status_url,
            ..
        } = &self
        {
            body["request_id"] = json!(request_id);
            body["status_url"] = json!(status_url);
        }
        let body = Json(body);
        let mut resp = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<JsonRejection> for AppError {
    fn from(r: JsonRejection) -> Self {
        // A body that did not arrive in time (a slow or stalled client) is a
        // 408, not a malformed body. axum only exposes it as text.
        if r.body_text().contains(crate::guard::BODY_TIMEOUT) {
            return AppError::Rejected {
                status: StatusCode::REQUEST_TIMEOUT,
                message: format!(
                    "the request body did not arrive within {:?}",
                    crate::CLIENT_TIMEOUT
                ),
            };
        }
        let status = r.status();
        let message = match &r {
            JsonRejection::MissingJsonContentType(_) => {
                "expected a JSON body with 'Content-Type: application/json'".to_string()
            }
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
                format!("body exceeds {} bytes", crate::MAX_BODY_BYTES)
            }
            _ => r.body_text(),
        };
        AppError::Rejected { status, message }
    }
}

impl From<PathRejection> for AppError {
    fn from(r: PathRejection) -> Self {
        AppError::bad_request("invalid_path", r.body_text())
    }
}

impl From<QueryRejection> for AppError {
    fn from(r: QueryRejection) -> Self {
        AppError::bad_request("invalid_query", r.body_text())
    }
}
