//! The api's open connections: each one closed once it has sat a client
//! timeout with no request in flight and none started (an idle kept-alive
//! connection, or a client that sends half a request head and stalls:
//! slowloris), and all of them drained at shutdown (a request in flight
//! gets its answer, then its connection closes; one that never started a
//! request closes at once).
//!
//! The guarantee is kept by one reaper task, not by a timer per request.
//! hyper's header-read timeout, which this replaces, allocates and arms a
//! timer for every request on a kept-alive connection (the wait for the
//! next head) and reads the clock for it, and hyper_util's graceful watch
//! polls a channel on every wake of every connection: under callgrind,
//! replacing the two took 1,900 instructions off each request of the issue
//! route (docs/BENCHMARKS.md, section 2). Here a request costs two counter
//! increments, and a wake an atomic load and a waker registration.
//!
//! - **Idle for a timeout, then closed.** The reaper visits every open
//!   connection 8 times per timeout. A connection it finds with nothing in
//!   flight is idle from that visit on, unless a request starts before the
//!   next; once idle for a whole timeout it is told to close. So an idle
//!   connection closes between one timeout and a quarter more after it went
//!   idle (one visit to see it idle, one to see the timeout passed), never
//!   before; a kept-alive connection whose requests come less than a
//!   timeout apart is never closed.
//! - **A request that started is never cut by the reaper.** The counters
//!   change only on the connection's own task, inside its poll; the task
//!   closes on the reaper's order only if they still read what the reaper
//!   saw, and otherwise drops the order.
//! - **What "in flight" covers.** A request is finished once its handler
//!   answered, before hyper writes the answer out: a client that does not
//!   read an answer for a timeout (only `/metrics` is large enough to fill
//!   a socket's buffer) has its connection closed, which also guards
//!   against slow readers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

/// Visits by the reaper per timeout.
const VISITS_PER_TIMEOUT: u32 = 8;

/// What a connection is told to do, in rising order: a later order never
/// lowers an earlier one but [`REAP`], which the connection drops itself
/// when a request started since.
const SERVE: u8 = 0;
/// Close if still as the reaper saw it: idle.
const REAP: u8 = 1;
/// Finish what is in flight, then close.
const DRAIN: u8 = 2;
/// Close now.
const CLOSE: u8 = 3;

/// Not idle (the reaper's `idle_since`); no order given (`close_at`).
const NONE: u64 = u64::MAX;

/// Every open connection, reaped when idle and drained at shutdown.
pub struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    /// Every open connection, and the order a new one starts with (a
    /// connection opened during a drain drains too); one lock for both.
    open: Mutex<Open>,
    next_id: AtomicU64,
    /// Notified when the last connection closes.
    emptied: Notify,
    /// What the reaper's clock counts from.
    epoch: Instant,
}

struct Open {
    conns: HashMap<u64, Arc<Conn>>,
    order: u8,
}

/// One connection's counters and orders, shared by its task, its service
/// and the reaper.
struct Conn {
    /// Requests started and finished: changed only on the connection's
    /// task, inside its poll.
    started: AtomicU64,
    finished: AtomicU64,
    order: AtomicU8,
    /// `started` when the reaper gave [`REAP`].
    close_at: AtomicU64,
    waker: AtomicWaker,
    /// The reaper's own memory: `started` at its last visit (0 before the
    /// first: a new connection is idle until its first request starts),
    /// and since when (ns from the epoch) it has found the connection idle.
    seen: AtomicU64,
    idle_since: AtomicU64,
}

/// What a connection's task does before it polls the connection.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Serve,
    Drain,
    Close,
}

impl Conn {
    fn tell(&self, order: u8) {
        self.order.fetch_max(order, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The order given, as it stands now. Called only by the connection's
    /// task, between polls of the connection: the counters, which only
    /// that task changes, hold still.
    fn step(&self) -> Step {
        let started = self.started.load(Ordering::Relaxed);
        match self.order.load(Ordering::Acquire) {
            SERVE => Step::Serve,
            REAP => {
                if started == self.close_at.load(Ordering::Acquire)
                    && started == self.finished.load(Ordering::Relaxed)
                {
                    return Step::Close;
                }
                // A request started after the reaper looked: not idle.
                let _ =
                    self.order
                        .compare_exchange(REAP, SERVE, Ordering::AcqRel, Ordering::Acquire);
                Step::Serve
            }
            // A connection that never started a request has nothing to
            // finish (hyper would wait for its first request to end).
            DRAIN if started == 0 => Step::Close,
            DRAIN => Step::Drain,
            _ => Step::Close,
        }
    }
}

impl Connections {
    /// No connection yet; a reaper closes those idle for `timeout`. The
    /// reaper stops by itself when the `Connections` and every connection
    /// are gone.
    pub fn new(timeout: Duration) -> Self {
        let shared = Arc::new(Shared {
            open: Mutex::new(Open {
                conns: HashMap::new(),
                order: SERVE,
            }),
            next_id: AtomicU64::new(0),
            emptied: Notify::new(),
            epoch: Instant::now(),
        });
        tokio::spawn(reap(Arc::downgrade(&shared), timeout));
        Self { shared }
    }

    /// Registers a new connection; its service and its task come from the
    /// returned [`Tracked`].
    pub fn open(&self) -> Tracked {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut open = self.shared.lock();
        let conn = Arc::new(Conn {
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            order: AtomicU8::new(open.order),
            close_at: AtomicU64::new(NONE),
            waker: AtomicWaker::new(),
            seen: AtomicU64::new(0),
            idle_since: AtomicU64::new(NONE),
        });
        open.conns.insert(id, conn.clone());
        drop(open);
        Tracked {
            shared: self.shared.clone(),
            id,
            conn,
        }
    }

    /// Open connections now.
    pub fn len(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests in flight now, over every connection.
    pub fn in_flight(&self) -> u64 {
        self.shared
            .lock()
            .conns
            .values()
            .map(|c| {
                let finished = c.finished.load(Ordering::Acquire);
                c.started.load(Ordering::Acquire).saturating_sub(finished)
            })
            .sum()
    }

    /// Tells every connection, and any opened from now on, to finish what
    /// it has in flight and close, and waits up to `within` for all of
    /// them; those still open then are closed at once. True when every
    /// connection finished in time.
    pub async fn drain(&self, within: Duration) -> bool {
        let drained = async {
            loop {
                let emptied = self.shared.emptied.notified();
                tokio::pin!(emptied);
                emptied.as_mut().enable();
                {
                    let mut open = self.shared.lock();
                    open.order = open.order.max(DRAIN);
                    if open.conns.is_empty() {
                        return;
                    }
                    for conn in open.conns.values() {
                        conn.tell(DRAIN);
                    }
                }
                emptied.await;
            }
        };
        if tokio::time::timeout(within, drained).await.is_ok() {
            return true;
        }
        let mut open = self.shared.lock();
        open.order = CLOSE;
        for conn in open.conns.values() {
            conn.tell(CLOSE);
        }
        false
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Visits every open connection [`VISITS_PER_TIMEOUT`] times per
/// `timeout`, and tells those idle for a whole timeout to close.
async fn reap(shared: Weak<Shared>, timeout: Duration) {
    let mut visits = tokio::time::interval(timeout / VISITS_PER_TIMEOUT);
    visits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
    loop {
        visits.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let open = shared.lock();
        // An idle span is never overstated: it starts at a clock read after
        // the counters that showed it, and ends at one read before them.
        let clock = || u64::try_from(shared.epoch.elapsed().as_nanos()).unwrap_or(NONE - 1);
        let now = clock();
        for conn in open.conns.values() {
            let finished = conn.finished.load(Ordering::Acquire);
            let started = conn.started.load(Ordering::Acquire);
            let seen = conn.seen.swap(started, Ordering::Relaxed);
            if started != finished {
                conn.idle_since.store(NONE, Ordering::Relaxed);
                continue;
            }
            let since = conn.idle_since.load(Ordering::Relaxed);
            if since == NONE || seen != started {
                // Nothing in flight now; a request may have come and gone
                // since the last visit. Idle from here: a request that
                // starts later changes `started` before the next visit.
                conn.idle_since.store(clock(), Ordering::Relaxed);
            } else if now.saturating_sub(since) >= timeout {
                conn.close_at.store(started, Ordering::Release);
                conn.tell(REAP);
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
        open.conns.remove(&self.id);
        if open.conns.is_empty() {
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
        let conn = &this.tracked.conn;
        // Registered before the order is read: an order given after the
        // read wakes this task.
        conn.waker.register(cx.waker());
        match conn.step() {
            Step::Serve => {}
            Step::Drain => {
                if !this.draining {
                    this.draining = true;
                    this.connection.as_mut().graceful_shutdown();
                }
            }
            Step::Close => return Poll::Ready(()),
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
        // Idle from some moment after this one.
        let idle_since = Instant::now();
        get(&mut idle, "/").await;
        assert!(read_answer(&mut idle).await.starts_with("HTTP/1.1 200"));
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

    fn conn(started: u64, finished: u64, order: u8, close_at: u64) -> Conn {
        Conn {
            started: AtomicU64::new(started),
            finished: AtomicU64::new(finished),
            order: AtomicU8::new(order),
            close_at: AtomicU64::new(close_at),
            waker: AtomicWaker::new(),
            seen: AtomicU64::new(0),
            idle_since: AtomicU64::new(NONE),
        }
    }

    /// The reaper's order races a new request: it saw 3 requests started
    /// and finished, and told the connection to close; a fourth started
    /// before the connection's task read the order. That request is not
    /// cut: the order is dropped.
    #[test]
    fn a_reap_order_that_a_request_overtook_is_dropped() {
        let c = conn(4, 3, REAP, 3);
        assert_eq!(c.step(), Step::Serve);
        assert_eq!(
            c.order.load(Ordering::Relaxed),
            SERVE,
            "the stale order is gone"
        );
        // Started and finished since: still not what the reaper saw.
        let c = conn(4, 4, REAP, 3);
        assert_eq!(c.step(), Step::Serve);
        // As the reaper saw it: closed.
        assert_eq!(conn(3, 3, REAP, 3).step(), Step::Close);
        // A drain is not dropped that way, and a close never.
        let c = conn(4, 3, DRAIN, 3);
        assert_eq!(c.step(), Step::Drain);
        assert_eq!(c.order.load(Ordering::Relaxed), DRAIN);
        assert_eq!(conn(4, 3, CLOSE, 3).step(), Step::Close);
        // A drained connection that never started a request closes now.
        assert_eq!(conn(0, 0, DRAIN, NONE).step(), Step::Close);
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
            tokio::time::sleep(TIMEOUT / 4).await;
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
        // Connected, and nothing sent yet; or half a head.
        let mut fresh = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
        while connections.in_flight() < 1 || connections.len() < 4 {
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
        let (_, closed) = until_closed(&mut fresh, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "so is one that never sent a request");
        let (_, closed) = until_closed(&mut half, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "and one that sent half of its first");
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
