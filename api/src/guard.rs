//! What every request passes through once, before its route: a bound on
//! the requests in flight across every route (beyond it, a 503 with
//! `Retry-After`, counted as shed), a body that must arrive within
//! [`crate::CLIENT_TIMEOUT`] (a 408 otherwise: slow clients, slowloris), a
//! panic in a handler turned into a 503 (logged, never a dropped
//! connection), and the request counter by route and status.
//!
//! One tower layer, [`GuardLayer`], instead of the six tower layers it
//! replaces (a load shedder, a concurrency limit and its error handler, a
//! panic catcher, a metrics middleware, a body timeout): under load each
//! layer's future and per-request clone showed in a profile of the issue
//! route, and together they were most of the CPU per request the api spent
//! beyond the same contract without them (docs/BENCHMARKS.md, section 2).
//! It is written as a service with its own future rather than with
//! `axum::middleware::from_fn`, which clones the inner service, boxes an
//! async block and a `Next` for every request (about 1.9 µs of the issue
//! route's CPU in a profile). It wraps the whole router ([`crate::app`]),
//! not each route: `Router::layer` wraps every route in a boxed `Route` of
//! its own, cloned for every request (about 1,200 instructions a request
//! under callgrind). Wherever it is given, its clones share one semaphore,
//! so the bound is one bound (a concurrency-limit layer keeps one per
//! clone).

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures::future::CatchUnwind;
use futures::FutureExt;
use http_body_util::Limited;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::AppError;

/// The layer: a service (the api's router, or each route of a router it
/// is given to) wrapped in a [`GuardService`], every clone sharing one
/// bound.
#[derive(Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
}

impl GuardLayer {
    /// At most `max_in_flight` requests in flight across every route.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> GuardService<S> {
        GuardService {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// A service behind the guard.
#[derive(Clone)]
pub struct GuardService<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

/// The route labels of `couponrush_api_requests_total`.
const ROUTES: [&str; 12] = [
    "/v1/events/{event_id}/issue",
    "/v1/events/{event_id}",
    "/v1/events/{event_id}/requests/{request_id}",
    "/v1/requests/{request_id}",
    "/v1/events/{event_id}/requests/{request_id}/claim",
    "/v1/events/{event_id}/requests/{request_id}/cancel",
    "/v1/events/{event_id}/line",
    "/v1/events/{event_id}/line/{ticket_id}",
    "/healthz",
    "/readyz",
    "/metrics",
    "unmatched",
];

/// The status labels of `couponrush_api_requests_total`.
const STATUSES: [&str; 17] = [
    "200", "201", "202", "400", "401", "403", "404", "405", "409", "408", "413", "415", "422",
    "503", "4xx", "5xx", "1xx-3xx",
];

/// One counter handle per (route, status), registered with the recorder on
/// first use and kept: `counter!` with labels builds its key and looks it up
/// in the registry on every call, which showed in a profile of the issue
/// route under load. The process's recorder must be installed before the
/// first request (`run` does); a counter first used without one stays a
/// no-op.
static REQUEST_COUNTERS: [[OnceLock<metrics::Counter>; STATUSES.len()]; ROUTES.len()] =
    [const { [const { OnceLock::new() }; STATUSES.len()] }; ROUTES.len()];

/// What a body that did not arrive in time fails with; the JSON
/// extractor's rejection carries it as text, which [`crate::error`] maps
/// to a 408.
pub const BODY_TIMEOUT: &str = "the request body was not received within the designated timeout";

#[derive(Debug)]
struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(BODY_TIMEOUT)
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that must have arrived whole within `timeout` of the
/// first time it was not there, and be at most a limit long (a 413
/// otherwise, as axum's `DefaultBodyLimit` gives; done here, it costs no
/// request extension and no layer). One deadline for the body, not one per
/// frame, so a client dripping a byte at a time cannot hold a connection
/// and a permit for the body's length times the timeout (slowloris). The
/// body is polled first and the timer armed only when it is not there yet,
/// so a small body that came with its headers (nearly every request) never
/// touches the timer wheel; `tower_http`'s `TimeoutBody` arms one for every
/// request, and re-arms it per frame.
pub struct DeadlineBody {
    inner: Limited<Body>,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DeadlineBody {
    /// `inner`, due whole within `timeout` and at most `limit` bytes long.
    pub fn new(inner: Body, timeout: Duration, limit: usize) -> Self {
        Self {
            inner: Limited::new(inner, limit),
            timeout,
            sleep: None,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame),
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> tower::Service<axum::http::Request<B>> for GuardService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    /// Bound, then run the route with its body on a deadline and its panics
    /// caught; the future counts the answer.
    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let route = route_of(req.uri().path());
        match self.permits.clone().try_acquire_owned() {
            Err(_) => GuardFuture {
                inner: None,
                permit: None,
                route,
                shed: true,
            },
            Ok(permit) => {
                let req = req.map(|b| {
                    Body::new(DeadlineBody::new(
                        Body::new(b),
                        crate::CLIENT_TIMEOUT,
                        crate::MAX_BODY_BYTES,
                    ))
                });
                // An axum `Route`'s `call` only makes its future: the
                // handler runs when that is polled, inside `catch_unwind`.
                GuardFuture {
                    inner: Some(AssertUnwindSafe(self.inner.call(req)).catch_unwind()),
                    permit: Some(permit),
                    route,
                    shed: false,
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A guarded request: shed (no route to run), or running with its
    /// permit until the route's answer is ready.
    pub struct GuardFuture<F> {
        #[pin]
        inner: Option<CatchUnwind<AssertUnwindSafe<F>>>,
        permit: Option<OwnedSemaphorePermit>,
        route: usize,
        shed: bool,
    }
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let resp = match this.inner.as_mut().as_pin_mut() {
            Some(inner) => {
                let resp = match ready!(inner.poll(cx)) {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        tracing::error!("a handler panicked");
                        AppError::Unavailable("internal fault; retry shortly".into())
                            .into_response()
                    }
                };
                this.inner.set(None);
                resp
            }
            None if *this.shed => {
                *this.shed = false;
                metrics::counter!("couponrush_api_shed_total", "reason" => "concurrency")
                    .increment(1);
                AppError::Overloaded("too many concurrent requests; retry after a second".into())
                    .into_response()
            }
            None => panic!("a GuardFuture polled after it completed"),
        };
        drop(this.permit.take());
        count(*this.route, resp.status().as_u16());
        Poll::Ready(Ok(resp))
    }
}

/// The route label of a request path: the pattern of [`ROUTES`] it
/// matches as axum's router would (a `{param}` is one segment, which may
/// be empty but for the last),
/// "unmatched" when none does. The guard wraps the whole router, so it
/// matches the path itself instead of reading axum's `MatchedPath` (which
/// only a layer inside the router sees, at the cost of a boxed `Route`
/// wrapper per request); a test holds the two equal for every route.
fn route_of(path: &str) -> usize {
    ROUTES[..ROUTES.len() - 1]
        .iter()
        .position(|pattern| matches(pattern, path))
        .unwrap_or(ROUTES.len() - 1)
}

/// Whether `path` is an instance of `pattern`, byte by byte (`str::split`
/// cost the issue route about 1,100 instructions a request).
fn matches(pattern: &str, path: &str) -> bool {
    let (pattern, path) = (pattern.as_bytes(), path.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < pattern.len() {
        if pattern[i] == b'{' {
            while i < pattern.len() && pattern[i] != b'/' {
                i += 1;
            }
            let start = j;
            while j < path.len() && path[j] != b'/' {
                j += 1;
            }
            // As axum's matcher: a parameter may be empty, but not at the end.
            if j == start && i == pattern.len() {
                return false;
            }
        } else if j < path.len() && pattern[i] == path[j] {
            i += 1;
            j += 1;
        } else {
            return false;
        }
    }
    j == path.len()
}

/// The route patterns the request counter knows (every route of
/// [`crate::router`]; a route added there must be added to [`ROUTES`], or
/// its requests are counted as "unmatched").
pub fn route_patterns() -> &'static [&'static str] {
    &ROUTES[..ROUTES.len() - 1]
}

/// The label [`route_of`] gives `path`, as the request counter shows it.
pub fn route_label(path: &str) -> &'static str {
    ROUTES[route_of(path)]
}

/// Counts one answer by route and status.
fn count(route: usize, status: u16) {
    let status = match status {
        200 => 0,
        201 => 1,
        202 => 2,
        400 => 3,
        401 => 4,
        403 => 5,
        404 => 6,
        405 => 7,
        409 => 8,
        408 => 9,
        413 => 10,
        415 => 11,
        422 => 12,
        503 => 13,
        s if (400..500).contains(&s) => 14,
        s if s >= 500 => 15,
        _ => 16,
    };
    REQUEST_COUNTERS[route][status]
        .get_or_init(|| {
            metrics::counter!(
                "couponrush_api_requests_total",
                "route" => ROUTES[route],
                "status" => STATUSES[status]
            )
        })
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_that_stalls_fails_with_the_timeout_and_one_that_is_there_arms_no_timer() {
        let stalled =
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let mut body = DeadlineBody::new(stalled, Duration::from_millis(50), 1024);
        let err = body
            .frame()
            .await
            .expect("a frame or an error")
            .expect_err("a stalled body times out");
        assert_eq!(err.to_string(), BODY_TIMEOUT);

        let mut body = DeadlineBody::new(Body::from("{}"), Duration::from_millis(50), 1024);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "{}");
        assert!(body.sleep.is_none(), "a body already there needs no timer");
    }

    #[tokio::test]
    async fn a_body_dripped_a_frame_at_a_time_fails_at_one_deadline_for_the_whole_body() {
        // Each frame comes well within the timeout, the whole body does not.
        let drip = futures::stream::unfold(0, |i| async move {
            if i == 40 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), i + 1))
        });
        let mut body = DeadlineBody::new(Body::from_stream(drip), Duration::from_millis(200), 1024);
        let mut frames = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break e,
                None => panic!("the whole body was read over 40 x 20 ms past a 200 ms deadline"),
            }
        };
        assert_eq!(err.to_string(), BODY_TIMEOUT);
        assert!(frames < 40, "{frames} frames");
    }

    mod middleware {
        use super::*;
        use axum::http::StatusCode;
        use axum::routing::get;
        use axum::Router;
        use tokio::sync::Notify;
        use tower::ServiceExt;

        fn app(bound: usize, release: Arc<Notify>) -> Router {
            Router::new()
                .route(
                    "/slow",
                    get(move || async move {
                        release.notified().await;
                        "slow"
                    }),
                )
                .route("/fast", get(|| async { "fast" }))
                .route(
                    "/panics",
                    get(|| async {
                        if true {
                            panic!("a planted fault");
                        }
                        "never"
                    }),
                )
                .layer(GuardLayer::new(bound))
        }

        async fn get_status(app: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
            let resp = app
                .clone()
                .oneshot(Request::get(uri).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&bytes).unwrap_or_default())
        }

        #[tokio::test]
        async fn the_bound_is_one_bound_across_every_route() {
            let release = Arc::new(Notify::new());
            let app = app(1, release.clone());
            let held = tokio::spawn({
                let app = app.clone();
                async move { get_status(&app, "/slow").await }
            });
            // The slow request holds the only permit; another route is shed.
            let mut shed = None;
            for _ in 0..200 {
                let (status, json) = get_status(&app, "/fast").await;
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    shed = Some(json);
                    break;
                }
                tokio::task::yield_now().await;
            }
            let json = shed.expect("a request on another route is shed while the bound is held");
            assert_eq!(json["error"], "overloaded");
            release.notify_one();
            assert_eq!(held.await.unwrap().0, StatusCode::OK);
            assert_eq!(
                get_status(&app, "/fast").await.0,
                StatusCode::OK,
                "the permit is back"
            );
        }

        #[tokio::test]
        async fn a_request_dropped_before_its_answer_gives_its_permit_back() {
            let app = app(1, Arc::new(Notify::new()));
            // The client goes away while the only permit is held: the
            // request's future is dropped, never completed.
            let gone =
                tokio::time::timeout(Duration::from_millis(100), get_status(&app, "/slow")).await;
            assert!(gone.is_err(), "the slow route waits until released");
            assert_eq!(
                get_status(&app, "/fast").await.0,
                StatusCode::OK,
                "the dropped request's permit is back"
            );
        }

        #[tokio::test]
        async fn a_panicking_handler_is_a_503_and_the_permit_comes_back() {
            let app = app(1, Arc::new(Notify::new()));
            let (status, json) = get_status(&app, "/panics").await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(json["error"], "unavailable");
            assert!(
                !json["message"].as_str().unwrap().contains("planted"),
                "no internals"
            );
            assert_eq!(get_status(&app, "/fast").await.0, StatusCode::OK);
        }
    }
}
