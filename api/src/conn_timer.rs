//! The timer hyper uses for one connection's header-read timeout: every
//! sleep hyper asks for shares one tokio timer, moved only when it would
//! fire after the deadline it now guards.
//!
//! hyper arms its header-read timeout ([`crate::CLIENT_TIMEOUT`], the
//! slowloris guard) for every request on a kept-alive connection and drops
//! it once the head is read; with hyper-util's `TokioTimer` each one is a
//! tokio timer registered and removed again, per request. Here a
//! connection's timer stays registered: a later request's deadline is later
//! than the one it is armed for, so it fires early, finds the deadline not
//! reached and is moved on, about once per timeout per connection instead
//! of once per request.
//!
//! **The guarantee kept:** a sleep never completes before its deadline, and
//! it completes once its deadline has passed (the shared timer is never
//! armed later than the deadline of the sleep that polls it).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// One connection's timer: give each connection its own (a clone shares
/// the timer). The tokio timer keeps one waker, the last poller's: the
/// sleeps of one timer must be polled by one task, as hyper polls a
/// connection's.
#[derive(Clone, Default)]
pub struct ConnTimer {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    /// The tokio timer, armed for `armed`.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: Option<Instant>,
    /// Times the tokio timer was (re)armed.
    arms: u64,
}

impl ConnTimer {
    /// A timer of its own.
    pub fn new() -> Self {
        Self::default()
    }

    /// Times the underlying tokio timer was armed (for tests).
    pub fn arms(&self) -> u64 {
        self.lock().arms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(ConnSleep {
            deadline,
            timer: self.clone(),
        })
    }
}

/// One sleep of a [`ConnTimer`].
struct ConnSleep {
    deadline: Instant,
    timer: ConnTimer,
}

impl Sleep for ConnSleep {}

impl Future for ConnSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if now >= self.deadline {
            return Poll::Ready(());
        }
        let mut shared = self.timer.lock();
        let shared = &mut *shared;
        // Armed for a moment already past (it fired, or will at once) or
        // after this deadline: armed for this deadline. Armed for a moment
        // still ahead and not after it: left, it fires early and this is
        // polled again.
        if shared
            .armed
            .is_none_or(|at| at <= now || at > self.deadline)
        {
            let at = tokio::time::Instant::from_std(self.deadline);
            match &mut shared.sleep {
                Some(sleep) => sleep.as_mut().reset(at),
                None => shared.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            shared.armed = Some(self.deadline);
            shared.arms += 1;
        }
        let sleep = shared.sleep.as_mut().expect("armed above or before");
        match sleep.as_mut().poll(cx) {
            // The shared timer fired: this deadline may not have come yet
            // (it was armed for an earlier one); polled again at once.
            Poll::Ready(()) => {
                if Instant::now() >= self.deadline {
                    Poll::Ready(())
                } else {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `sleep` once; true if it completed.
    fn poll_once(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        sleep.as_mut().poll(&mut cx).is_ready()
    }

    #[tokio::test]
    async fn sleeps_of_one_connection_share_one_registration_and_none_ends_early() {
        let timer = ConnTimer::new();
        // A kept-alive connection: each request's head arms the timeout,
        // the head arrives, the sleep is dropped; the next one's deadline
        // is later.
        for _ in 0..100 {
            let mut sleep = timer.sleep(Duration::from_secs(30));
            assert!(!poll_once(&mut sleep));
        }
        assert_eq!(timer.arms(), 1, "one registration for 100 requests");

        // A deadline earlier than the armed one re-arms (never late)...
        let started = Instant::now();
        let short = Duration::from_millis(60);
        timer.sleep(short).await;
        assert!(
            started.elapsed() >= short,
            "ended early: {:?}",
            started.elapsed()
        );
        assert_eq!(timer.arms(), 2);

        // ...and one later than an armed moment that passed re-arms too,
        // and still ends on time, not before.
        let started = Instant::now();
        let first = timer.sleep(Duration::from_millis(40));
        let second = timer.sleep(Duration::from_millis(120));
        first.await;
        assert!(started.elapsed() >= Duration::from_millis(40));
        second.await;
        assert!(
            started.elapsed() >= Duration::from_millis(120),
            "ended early: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connections_do_not_share_a_timer() {
        let (a, b) = (ConnTimer::new(), ConnTimer::new());
        let mut sa = a.sleep(Duration::from_secs(30));
        let mut sb = b.sleep(Duration::from_secs(30));
        assert!(!poll_once(&mut sa) && !poll_once(&mut sb));
        assert_eq!((a.arms(), b.arms()), (1, 1));
    }
}
