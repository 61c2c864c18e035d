//! The api's open connections: each one closed once it has sat a client
//! timeout with no request in flight and no new one started (an idle
//! kept-alive connection, or a client that sends half a request head and
//! stalls: slowloris), and all of them drained at shutdown (a request in
//! flight gets its answer, then the connection closes).
//!
//! The guarantee is kept by one reaper task, not by a timer per request.
//! hyper's header-read timeout, which this replaces, allocates and arms a
//! timer for every request on a kept-alive connection (the wait for the
//! next head) and reads the clock for it, and hyper_util's graceful
//! watch polls a channel on every wake of every connection; under
//! callgrind the two cost the issue route about N instructions a request
//! (docs/BENCHMARKS.md, section 2). Here a request costs two counter
//! increments, and a wake an atomic flag read and a waker registration.
//! The reaper visits every open connection four times per timeout: a
//! connection seen idle (the same requests started, none in flight) at
//! five visits in a row, a timeout apart from the first to the last, is
//! closed. So an idle connection closes between one timeout and a quarter
//! more after it went idle, and a kept-alive connection whose requests
//! come less than a timeout apart is never closed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

/// Visits by the reaper per timeout.
const VISITS_PER_TIMEOUT: u32 = 4;

/// What a connection is told to do.
const SERVE: u8 = 0;
const DRAIN: u8 = 1;
const CLOSE: u8 = 2;

/// Every open connection, reaped when idle and drained at shutdown.
pub struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Notified when the last connection closes.
    emptied: Notify,
    /// Set once [`Connections::drain`] started: every later connection
    /// is told to drain too.
    draining: AtomicU8,
}

/// One connection's counters and orders, shared by its task, its service
/// and the reaper.
struct Conn {
    started: AtomicU64,
    finished: AtomicU64,
    order: AtomicU8,
    waker: AtomicWaker,
    /// The reaper's own memory: `started` at its last visit (`u64::MAX`
    /// before the first), and the visits in a row it found the
    /// connection idle.
    seen: AtomicU64,
    idle_visits: AtomicU64,
}

impl Conn {
    fn tell(&self, order: u8) {
        self.order.fetch_max(order, Ordering::AcqRel);
        self.waker.wake();
    }
}

impl Connections {
    /// No connection yet; a reaper closes those idle for `timeout`. The
    /// reaper stops by itself when the `Connections` and every connection
    /// are gone.
    pub fn new(timeout: Duration) -> Self {
        let shared = Arc::new(Shared {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            emptied: Notify::new(),
            draining: AtomicU8::new(SERVE),
        });
        tokio::spawn(reap(Arc::downgrade(&shared), timeout));
        Self { shared }
    }

    /// Registers a new connection; its service and its task come from the
    /// returned [`Tracked`].
    pub fn open(&self) -> Tracked {
        let conn = Arc::new(Conn {
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            order: AtomicU8::new(self.shared.draining.load(Ordering::Acquire)),
            waker: AtomicWaker::new(),
            seen: AtomicU64::new(u64::MAX),
            idle_visits: AtomicU64::new(0),
        });
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn.clone());
        Tracked {
            shared: self.shared.clone(),
            id,
            conn,
        }
    }

    /// Open connections now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Requests in flight now, over every connection.
    pub fn in_flight(&self) -> u64 {
        self.lock()
            .values()
            .map(|c| c.started.load(Ordering::Acquire) - c.finished.load(Ordering::Acquire))
            .sum()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tells every connection to finish what it has in flight and close,
    /// and waits up to `within` for all of them; those still open then are
    /// closed at once. True when every connection finished in time.
    pub async fn drain(&self, within: Duration) -> bool {
        self.shared.draining.store(DRAIN, Ordering::Release);
        let drained = async {
            loop {
                let emptied = self.shared.emptied.notified();
                tokio::pin!(emptied);
                emptied.as_mut().enable();
                {
                    let open = self.lock();
                    if open.is_empty() {
                        return;
                    }
                    for conn in open.values() {
                        conn.tell(DRAIN);
                    }
                }
                emptied.await;
            }
        };
        if tokio::time::timeout(within, drained).await.is_ok() {
            return true;
        }
        self.shared.draining.store(CLOSE, Ordering::Release);
        for conn in self.lock().values() {
            conn.tell(CLOSE);
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.shared.lock()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Visits every open connection [`VISITS_PER_TIMEOUT`] times per
/// `timeout`, and closes those idle for a whole timeout.
async fn reap(shared: Weak<Shared>, timeout: Duration) {
    let mut visits = tokio::time::interval(timeout / VISITS_PER_TIMEOUT);
    visits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        visits.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for conn in shared.lock().values() {
            let started = conn.started.load(Ordering::Acquire);
            let finished = conn.finished.load(Ordering::Acquire);
            if started != finished || conn.seen.swap(started, Ordering::Relaxed) != started {
                conn.idle_visits.store(0, Ordering::Relaxed);
                continue;
            }
            let idle = conn.idle_visits.fetch_add(1, Ordering::Relaxed) + 1;
            if idle >= u64::from(VISITS_PER_TIMEOUT) {
                conn.tell(CLOSE);
            }
        }
    }
}

/// One registered connection: wraps its service (to count its requests)
/// and its connection future (to obey the reaper and the drain).
/// Dropping it (with its future) unregisters the connection.
pub struct Tracked {
    shared: Arc<Shared>,
    id: u64,
    conn: Arc<Conn>,
}

impl Tracked {
    /// `service`, counting the requests it starts and finishes on this
    /// connection.
    pub fn count<S>(&self, service: S) -> Counted<S> {
        Counted {
            inner: service,
            conn: self.conn.clone(),
        }
    }

    /// Runs `connection` until it ends, is drained or is closed.
    pub fn serve<C>(self, connection: C) -> Serving<C>
    where
        C: GracefulConnection,
    {
        Serving {
            connection: Box::pin(connection),
            draining: false,
            tracked: self,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut open = self.shared.lock();
        open.remove(&self.id);
        if open.is_empty() {
            self.shared.emptied.notify_waiters();
        }
    }
}

/// A connection's service, counting its requests.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S, R> hyper::service::Service<R> for Counted<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Finishing<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        self.conn.started.fetch_add(1, Ordering::AcqRel);
        Finishing {
            inner: self.inner.call(req),
            conn: self.conn.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request in flight; counted finished when answered or dropped.
    pub struct Finishing<F> {
        #[pin]
        inner: F,
        conn: Arc<Conn>,
    }

    impl<F> PinnedDrop for Finishing<F> {
        fn drop(this: Pin<&mut Self>) {
            this.conn.finished.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl<F: Future> Future for Finishing<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// A connection being served under the reaper's and the drain's orders.
pub struct Serving<C> {
    connection: Pin<Box<C>>,
    draining: bool,
    tracked: Tracked,
}

impl<C: GracefulConnection> Future for Serving<C> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Registered before the order is read: an order given after the
        // read wakes this task.
        this.tracked.conn.waker.register(cx.waker());
        match this.tracked.conn.order.load(Ordering::Acquire) {
            SERVE => {}
            DRAIN if !this.draining => {
                this.draining = true;
                this.connection.as_mut().graceful_shutdown();
            }
            DRAIN => {}
            _ => return Poll::Ready(()),
        }
        this.connection.as_mut().poll(cx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::time::Instant;

    use axum::body::Bytes;
    use http_body_util::Full;
    use hyper::{Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const TIMEOUT: Duration = Duration::from_millis(400);

    /// A server on loopback whose `/slow` answers once `release` is
    /// notified, and `/` at once; every connection tracked.
    async fn server(
        connections: Arc<Connections>,
        release: Arc<Notify>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let tracked = connections.open();
                let release = release.clone();
                let service = tracked.count(hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let release = release.clone();
                        async move {
                            if req.uri().path() == "/slow" {
                                release.notified().await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"done",
                            ))))
                        }
                    },
                ));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::spawn(tracked.serve(conn));
            }
        });
        (addr, accept)
    }

    async fn get(stream: &mut TcpStream, path: &str) {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
    }

    /// Reads until the peer closes; what came, and when it closed.
    async fn until_closed(stream: &mut TcpStream, within: Duration) -> (String, Option<Instant>) {
        let mut got = Vec::new();
        let read = tokio::time::timeout(within, async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return Instant::now(),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        (String::from_utf8_lossy(&got).into_owned(), read.ok())
    }

    async fn read_answer(stream: &mut TcpStream) -> String {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_head_and_an_idle_connection_close_after_the_timeout_and_a_slow_answer_does_not(
    ) {
        let connections = Arc::new(Connections::new(TIMEOUT));
        let release = Arc::new(Notify::new());
        let (addr, accept) = server(connections.clone(), release.clone()).await;

        let t0 = Instant::now();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        get(&mut idle, "/").await;
        assert!(read_answer(&mut idle).await.starts_with("HTTP/1.1 200"));
        let idle_since = Instant::now();
        // Its answer takes three timeouts: in flight, it stays open.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        get(&mut slow, "/slow").await;

        let (_, closed) = until_closed(&mut stalled, TIMEOUT * 4).await;
        let closed = closed.expect("the stalled connection is closed");
        assert!(closed - t0 >= TIMEOUT, "closed after {:?}", closed - t0);
        let (_, closed) = until_closed(&mut idle, TIMEOUT * 4).await;
        let closed = closed.expect("the idle connection is closed");
        assert!(
            closed - idle_since >= TIMEOUT,
            "closed after {:?}",
            closed - idle_since
        );

        tokio::time::sleep(TIMEOUT * 3 - t0.elapsed().min(TIMEOUT * 3)).await;
        release.notify_one();
        assert!(
            read_answer(&mut slow).await.ends_with("done"),
            "the slow answer came on its open connection"
        );
        accept.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_less_than_a_timeout_apart_keep_a_connection_open() {
        let connections = Arc::new(Connections::new(TIMEOUT));
        let (addr, accept) = server(connections.clone(), Arc::new(Notify::new())).await;
        let mut kept = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        while started.elapsed() < TIMEOUT * 4 {
            get(&mut kept, "/").await;
            assert!(read_answer(&mut kept).await.starts_with("HTTP/1.1 200"));
            tokio::time::sleep(TIMEOUT / 2).await;
        }
        assert_eq!(connections.len(), 1);
        accept.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_answers_what_is_in_flight_closes_the_rest_and_then_returns() {
        // A timeout far beyond the test: only the drain closes anything.
        let connections = Arc::new(Connections::new(Duration::from_secs(600)));
        let release = Arc::new(Notify::new());
        let (addr, accept) = server(connections.clone(), release.clone()).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        get(&mut idle, "/").await;
        assert!(read_answer(&mut idle).await.starts_with("HTTP/1.1 200"));
        let mut busy = TcpStream::connect(addr).await.unwrap();
        get(&mut busy, "/slow").await;
        while connections.in_flight() < 1 {
            tokio::task::yield_now().await;
        }
        accept.abort();

        let drain = tokio::spawn({
            let connections = connections.clone();
            async move { connections.drain(Duration::from_secs(10)).await }
        });
        let (_, closed) = until_closed(&mut idle, Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "the idle connection is closed by the drain"
        );
        assert!(
            !drain.is_finished(),
            "the drain waits for the answer in flight"
        );
        release.notify_one();
        let (answer, closed) = until_closed(&mut busy, Duration::from_secs(5)).await;
        assert!(
            answer.ends_with("done"),
            "the answer in flight came: {answer:?}"
        );
        assert!(closed.is_some(), "then its connection closed");
        assert!(drain.await.unwrap(), "every connection finished in time");
        assert!(connections.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_past_its_limit_closes_what_is_left() {
        let connections = Arc::new(Connections::new(Duration::from_secs(600)));
        let (addr, accept) = server(connections.clone(), Arc::new(Notify::new())).await;
        let mut busy = TcpStream::connect(addr).await.unwrap();
        get(&mut busy, "/slow").await;
        while connections.in_flight() < 1 {
            tokio::task::yield_now().await;
        }
        accept.abort();
        assert!(!connections.drain(Duration::from_millis(200)).await);
        let (answer, closed) = until_closed(&mut busy, Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "closed with its answer unsent: {answer:?}"
        );
        assert!(answer.is_empty());
    }
}
