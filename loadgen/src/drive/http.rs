//! The api as a target: one HTTP/1.1 keep-alive connection per worker,
//! reconnected after an error. Also the admin calls that set up an event.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use uuid::Uuid;

use super::{Sent, Target, TargetFactory};
use crate::Error;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Where the api is.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Resolved address.
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub authority: String,
}

impl Endpoint {
    /// Parses `http://host:port` (https is not supported: put a TLS proxy in front).
    pub async fn parse(url: &str) -> Result<Self, Error> {
        let bad = |problem: String| Error::BadTarget {
            url: url.to_string(),
            problem,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| bad(format!("not a URL ({e})")))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is supported".into()));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| bad("no host".into()))?
            .to_string();
        let with_port = if uri.port().is_some() {
            authority.clone()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| bad(format!("cannot resolve {with_port} ({e})")))?
            .next()
            .ok_or_else(|| bad(format!("{with_port} resolves to nothing")))?;
        Ok(Self { addr, authority })
    }
}

/// One connection to the api.
pub struct HttpTarget {
    endpoint: Endpoint,
    timeout: Duration,
    /// The request timeout's timer, kept across requests and moved only
    /// when it would fire too early (see [`HttpTarget::watchdog`]).
    watchdog: Option<Pin<Box<Sleep>>>,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// The Host header, built once.
    host: HeaderValue,
    /// `(event, uri)` of the last send: every send of a run hits one event.
    issue_uri: Option<(String, Uri)>,
}

impl HttpTarget {
    async fn connection(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.endpoint.addr)
                .await
                .map_err(|_| "connect".to_string())?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|_| "connect".to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("set above"))
    }

    /// Sends one request; returns the status and body.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = path
            .parse()
            .map_err(|e| format!("bad path {path:?}: {e}"))?;
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(v).map_err(|e| e.to_string())?;
            req.headers_mut().insert(name, value);
        }
        self.exchange(req).await
    }

    /// The timer that ends the exchange starting now (once connected):
    /// one per connection, set to `timeout` plus a tenth of it and moved
    /// only once it would fire before `timeout` from now, so a request
    /// times out after `timeout` to 1.1 × `timeout` and the timer is
    /// re-armed about ten times per `timeout` rather than for every request
    /// (arming one per request was a cost of the generator's hot path that
    /// oha does not pay).
    fn watchdog(&mut self) -> Pin<Box<Sleep>> {
        let now = Instant::now();
        let mut sleep = self
            .watchdog
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(now)));
        if sleep.deadline() < now + self.timeout {
            sleep.as_mut().reset(now + self.timeout + self.timeout / 10);
        }
        sleep
    }

    /// Sends a prepared request (Host and Content-Type are added here).
    async fn exchange(
        &mut self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let headers = req.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // Connecting is not bounded by the timeout (as before the shared
        // timer): the exchange gets its whole timeout once connected.
        self.connection().await?;
        let mut watchdog = self.watchdog();
        let sender = self.sender.as_mut().expect("connected above");
        let exchange = async {
            // Not ready: the connection closed before anything was sent.
            sender.ready().await.map_err(|_| "connect".to_string())?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| "io".to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|_| "io".to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let answer = tokio::select! {
            biased;
            r = exchange => Some(r),
            () = watchdog.as_mut() => None,
        };
        self.watchdog = Some(watchdog);
        match answer {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            None => {
                self.sender = None;
                Err("timeout".into())
            }
        }
    }
}

/// A substring searcher built once (building one per search costs more
/// than the search).
type Finder = std::sync::LazyLock<memchr::memmem::Finder<'static>>;

/// `accepted_at` from a `202` body, without a full JSON parse (the hot path
/// of the generator: it must be cheaper than the server it measures).
fn accepted_at(body: &[u8]) -> Option<u64> {
    const FIELD: &[u8] = b"\"accepted_at\":";
    static FIND: Finder = Finder::new(|| memchr::memmem::Finder::new(FIELD));
    let at = FIND.find(body)? + FIELD.len();
    let digits: &[u8] = &body[at..];
    let digits = &digits[digits
        .iter()
        .take_while(|b| b.is_ascii_whitespace())
        .count()..];
    let end = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Whether a `503` body is the api's `unacknowledged`: the request reached
/// the broker and may have been written.
pub(crate) fn in_doubt(body: &[u8]) -> bool {
    static FIND: Finder =
        Finder::new(|| memchr::memmem::Finder::new(b"\"error\":\"unacknowledged\""));
    FIND.find(body).is_some()
}

/// The `request_id` of a `202` (or `503 unacknowledged`) body, read without
/// a JSON parser.
fn request_id(body: &[u8]) -> Option<Uuid> {
    const FIELD: &[u8] = b"\"request_id\":\"";
    static FIND: Finder = Finder::new(|| memchr::memmem::Finder::new(FIELD));
    let at = FIND.find(body)? + FIELD.len();
    Uuid::try_parse_ascii(body.get(at..at + 36)?).ok()
}

impl Target for HttpTarget {
    async fn send(&mut self, event: &str, user: &str, key: Uuid) -> Sent {
        let mut body = Vec::with_capacity(user.len() + 16);
        body.extend_from_slice(b"{\"user_id\":");
        serde_json::to_writer(&mut body, user).expect("a string serialises");
        body.push(b'}');
        if self.issue_uri.as_ref().is_none_or(|(e, _)| e != event) {
            let uri = format!("/v1/events/{event}/issue")
                .parse()
                .unwrap_or_default();
            self.issue_uri = Some((event.to_string(), uri));
        }
        let uri = self
            .issue_uri
            .as_ref()
            .map(|(_, u)| u.clone())
            .unwrap_or_default();
        let mut buf = Uuid::encode_buffer();
        let id = key.hyphenated().encode_lower(&mut buf);
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        if let Ok(v) = HeaderValue::from_str(id) {
            req.headers_mut().insert(IDEMPOTENCY_KEY, v);
        }
        match self.exchange(req).await {
            Ok((StatusCode::ACCEPTED, body)) => match (accepted_at(&body), request_id(&body)) {
                (Some(accepted_at), Some(request_id)) => Sent::Accepted {
                    accepted_at,
                    request_id,
                },
                _ => Sent::Failed("202_unparsable".into()),
            },
            Ok((StatusCode::SERVICE_UNAVAILABLE, body)) if in_doubt(&body) => {
                match request_id(&body) {
                    Some(request_id) => Sent::InDoubt {
                        kind: "503".into(),
                        request_id,
                    },
                    None => Sent::Failed("503".into()),
                }
            }
            Ok((status, _)) => Sent::Failed(status.as_u16().to_string()),
            // Never connected: never sent.
            Err(kind) if kind == "connect" => Sent::Failed(kind),
            // Sent, and the answer lost: the api may have accepted it,
            // under the id the key stands for.
            Err(kind) => Sent::InDoubt {
                kind,
                request_id: couponrush_core::request_id::from_key(event, user, key),
            },
        }
    }
}

/// Makes [`HttpTarget`]s for one endpoint.
pub struct HttpFactory {
    /// The api.
    pub endpoint: Endpoint,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl TargetFactory for HttpFactory {
    type T = HttpTarget;
    fn make(&self) -> HttpTarget {
        HttpTarget {
            host: HeaderValue::from_str(&self.endpoint.authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            endpoint: self.endpoint.clone(),
            timeout: self.timeout,
            watchdog: None,
            sender: None,
            issue_uri: None,
        }
    }
}

/// Keep-alive connections to the api shared by many tasks, at most `n` in
/// use at once (the rest wait for a permit: backpressure, not a queue).
pub struct Pool {
    factory: HttpFactory,
    idle: std::sync::Mutex<Vec<HttpTarget>>,
    permits: tokio::sync::Semaphore,
}

impl Pool {
    /// A pool of at most `n` connections (at least 1) made by `factory`.
    pub fn new(factory: HttpFactory, n: usize) -> Self {
        Self {
            factory,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(n.max(1)),
        }
    }

    /// Sends one request on an idle connection (or a new one).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        let _permit = self.permits.acquire().await.map_err(|_| "closed")?;
        let mut t = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| self.factory.make());
        let r = t.call(method, path, headers, body).await;
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        r
    }
}

/// The event as the api describes it. The counters beyond stock and limit
/// are read when the api shows them (an older api may not).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct EventInfo {
    /// Coupons at the start.
    pub stock: u32,
    /// Coupons per user.
    pub per_user_limit: u32,
    /// Coupons left now (a coupon given back counts again).
    #[serde(default)]
    pub remaining: Option<u32>,
    /// The claim window of an event with holds, ms (absent or 0: none).
    #[serde(default)]
    pub claim_window_ms: Option<u64>,
    /// Every `issued` decision so far, re-issues included, as the api counts.
    #[serde(default)]
    pub issued_total: Option<u64>,
    /// Holds given back so far (cancelled or expired), as the api counts.
    #[serde(default)]
    pub released: Option<u64>,
    /// Holds claimed so far, as the api counts.
    #[serde(default)]
    pub claimed: Option<u64>,
    /// Holds waiting for their claim now, as the api counts.
    #[serde(default)]
    pub held: Option<u64>,
}

/// What to create an event with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSetup {
    /// Coupons.
    pub stock: u32,
    /// Coupons per user.
    pub per_user_limit: u32,
    /// With holds: each issued coupon is held this long for its claim.
    pub claim_window: Option<Duration>,
    /// Buckets the stock is split over (1: none; not sent, so an api that
    /// predates buckets still takes the request).
    pub stock_buckets: u32,
}

/// Creates or resets `event` through the api's admin route.
pub async fn put_event(
    endpoint: &Endpoint,
    event: &str,
    stock: u32,
    per_user_limit: u32,
    admin_token: Option<&str>,
) -> Result<EventInfo, Error> {
    define_event(
        endpoint,
        event,
        EventSetup {
            stock,
            per_user_limit,
            claim_window: None,
            stock_buckets: 1,
        },
        admin_token,
    )
    .await
}

/// Creates or resets `event` as `setup` says, through the api's admin route.
pub async fn define_event(
    endpoint: &Endpoint,
    event: &str,
    setup: EventSetup,
    admin_token: Option<&str>,
) -> Result<EventInfo, Error> {
    let mut t = HttpFactory {
        endpoint: endpoint.clone(),
        timeout: Duration::from_secs(10),
    }
    .make();
    let mut headers = Vec::new();
    if let Some(token) = admin_token {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    let mut body =
        serde_json::json!({ "stock": setup.stock, "per_user_limit": setup.per_user_limit });
    if let Some(window) = setup.claim_window {
        body["claim_window_ms"] = serde_json::json!(window.as_millis() as u64);
    }
    if setup.stock_buckets > 1 {
        body["stock_buckets"] = serde_json::json!(setup.stock_buckets);
    }
    let (status, body) = t
        .call(
            Method::PUT,
            &format!("/v1/events/{event}"),
            &headers,
            Bytes::from(body.to_string()),
        )
        .await
        .map_err(|kind| unreachable_api(endpoint, kind))?;
    let what = format!("setting up event {event}");
    if !status.is_success() {
        let hint = if status == StatusCode::UNAUTHORIZED {
            " (pass the api's admin token with --admin-token or ADMIN_TOKEN)"
        } else {
            ""
        };
        return Err(refused(what, status, &body, hint));
    }
    let info = event_body(what, &body)?;
    if setup.claim_window.is_some_and(|w| !w.is_zero()) && info.claim_window_ms.unwrap_or(0) == 0 {
        return Err(Error::NoHolds(event.to_string()));
    }
    Ok(info)
}

fn unreachable_api(endpoint: &Endpoint, kind: String) -> Error {
    Error::ApiUnreachable {
        authority: endpoint.authority.clone(),
        kind,
    }
}

fn refused(what: String, status: StatusCode, body: &[u8], hint: &'static str) -> Error {
    Error::ApiRefused {
        what,
        status: status.as_u16(),
        body: String::from_utf8_lossy(body).into_owned(),
        hint,
    }
}

fn event_body(what: String, body: &[u8]) -> Result<EventInfo, Error> {
    serde_json::from_slice(body).map_err(|e| Error::ApiBody {
        what,
        problem: e.to_string(),
    })
}

/// Reads `event` through the api.
pub async fn get_event(endpoint: &Endpoint, event: &str) -> Result<EventInfo, Error> {
    let mut t = HttpFactory {
        endpoint: endpoint.clone(),
        timeout: Duration::from_secs(10),
    }
    .make();
    let (status, body) = t
        .call(
            Method::GET,
            &format!("/v1/events/{event}"),
            &[],
            Bytes::new(),
        )
        .await
        .map_err(|kind| unreachable_api(endpoint, kind))?;
    let what = format!("reading event {event}");
    if status == StatusCode::NOT_FOUND {
        return Err(Error::NoSuchEvent(event.to_string()));
    }
    if status != StatusCode::OK {
        return Err(refused(what, status, &body, ""));
    }
    event_body(what, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_at_is_read_from_a_202_body() {
        let body = br#"{"request_id":"x","accepted_at":1795763447481825,"status_url":"/v1"}"#;
        assert_eq!(accepted_at(body), Some(1_795_763_447_481_825));
        assert_eq!(accepted_at(br#"{"accepted_at": 42}"#), Some(42));
        assert_eq!(accepted_at(br#"{"request_id":"x"}"#), None);
        assert_eq!(accepted_at(br#"{"accepted_at":"no"}"#), None);
    }

    /// The watchdog kept across requests never cuts a request short: a
    /// request answered at once leaves it armed; the next, sent a while
    /// later to a server that never answers, still waits its whole timeout
    /// (the timer, armed for the first, would fire sooner); so do two more
    /// after it fired; and a live server is answered again after that.
    #[tokio::test]
    async fn every_request_gets_its_whole_timeout_from_the_shared_watchdog() {
        let app = axum::Router::new().route(
            "/v1/events/{event}/issue",
            axum::routing::post(|| async {
                (
                    StatusCode::ACCEPTED,
                    r#"{"request_id":"0190d6a0-7c3e-7b2a-9e1f-3c4d5e6f7a8b","accepted_at":7}"#,
                )
            }),
        );
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(live, app).await });
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let endpoint = |addr: SocketAddr| Endpoint {
            addr,
            authority: addr.to_string(),
        };
        let timeout = Duration::from_millis(300);
        let mut t = HttpFactory {
            endpoint: endpoint(live_addr),
            timeout,
        }
        .make();
        let accepted = |sent: &Sent| matches!(sent, Sent::Accepted { accepted_at: 7, .. });
        let sent = t.send("e", "u", Uuid::now_v7()).await;
        assert!(accepted(&sent), "{sent:?}");

        tokio::time::sleep(timeout / 3).await;
        t.endpoint = endpoint(silent_addr);
        t.sender = None;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let sent = t.send("e", "u", Uuid::now_v7()).await;
            let took = started.elapsed();
            assert!(
                matches!(&sent, Sent::InDoubt { kind, .. } if kind == "timeout"),
                "{sent:?}"
            );
            assert!(took >= timeout, "cut short after {took:?}");
            assert!(took < timeout * 10, "the watchdog never fired ({took:?})");
        }

        t.endpoint = endpoint(live_addr);
        t.sender = None;
        for _ in 0..3 {
            let sent = t.send("e", "u", Uuid::now_v7()).await;
            assert!(accepted(&sent), "{sent:?}");
        }
    }

    #[test]
    fn the_request_id_is_read_from_a_202_body() {
        let body = br#"{"request_id":"0190d6a0-7c3e-7b2a-9e1f-3c4d5e6f7a8b","accepted_at":1}"#;
        assert_eq!(
            request_id(body),
            Uuid::try_parse("0190d6a0-7c3e-7b2a-9e1f-3c4d5e6f7a8b").ok()
        );
        assert_eq!(request_id(br#"{"request_id":"x"}"#), None);
        assert_eq!(request_id(br#"{"accepted_at":1}"#), None);
    }
}
