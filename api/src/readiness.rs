//! Whether the store is ready to decide, and if not, why.
//!
//! A store without its epoch marker is one of two things. A **new** store
//! never held state: the log holds no event definition, and the store is set
//! up in the time it takes to read that empty topic. A **lost** store held
//! state and lost it: the log holds definitions, and the store is rebuilt
//! from the log behind the fence (see `couponrush_core::recovery`). Both wait
//! for the same [`Recovery`]; only the second deserves an alarm. The api tells
//! them apart the way the recovery does (by reading the events topic), so a
//! new deployment's first requests wait the moment its store takes to be set
//! up instead of being told that state was lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::recovery::{read_events, Recovery};
use tokio::sync::watch;

/// How long a request waits for a new store to be set up before it is
/// answered 503: setting one up reads the empty events topic twice (here and
/// in the recovery), each read ending after a quiet second.
pub const NEW_STORE_WAIT: Duration = Duration::from_secs(10);

/// What the api knows about its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    /// Not known yet: being checked, or the check failed (and is retried by
    /// the next request that needs the store).
    Checking,
    /// A new store that never held state, being set up.
    New,
    /// A store that lost its state, being rebuilt from the log.
    Rebuilding,
    /// It has its epoch marker.
    Ready,
}

/// Makes the store ready (once at a time) and tells how far it got.
pub struct Readiness {
    recovery: Recovery,
    state: watch::Sender<StoreState>,
    running: AtomicBool,
}

impl Readiness {
    /// Readiness through `recovery`; nothing runs until [`Readiness::start`].
    pub fn new(recovery: Recovery) -> Arc<Self> {
        Arc::new(Self {
            recovery,
            state: watch::Sender::new(StoreState::Checking),
            running: AtomicBool::new(false),
        })
    }

    /// What is known now.
    pub fn state(&self) -> StoreState {
        *self.state.borrow()
    }

    /// Starts making the store ready in the background, unless that is
    /// already under way.
    pub fn start(self: &Arc<Self>) {
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        // Before the task runs: a waiter must not read the last run's Ready.
        self.state.send_replace(StoreState::Checking);
        let me = self.clone();
        tokio::spawn(async move {
            let state = me.run().await;
            me.state.send_replace(state);
            me.running.store(false, Ordering::SeqCst);
        });
    }

    async fn run(&self) -> StoreState {
        let recovery = &self.recovery;
        match recovery.store.epoch().await {
            Ok(Some(_)) => return StoreState::Ready,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the store is unreachable");
                return StoreState::Checking;
            }
        }
        let (kafka, topic) = (recovery.kafka.clone(), recovery.topics.events.clone());
        let defined = tokio::task::spawn_blocking(move || read_events(&kafka, &topic)).await;
        match defined {
            Ok(Ok(events)) if events.is_empty() => {
                tracing::info!("a new store: setting it up");
                self.state.send_replace(StoreState::New);
            }
            Ok(Ok(events)) => {
                tracing::warn!(
                    events = events.len(),
                    "the store lost its state; it is rebuilt from the log"
                );
                self.state.send_replace(StoreState::Rebuilding);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the event definitions"),
            Err(e) => tracing::warn!(error = %e, "reading the event definitions failed"),
        }
        match recovery.ensure_ready(Duration::from_secs(3600)).await {
            Ok(_) => StoreState::Ready,
            Err(e) => {
                tracing::warn!(error = %e, "the store is not ready");
                StoreState::Checking
            }
        }
    }

    /// For a store found without its epoch marker: starts making it ready,
    /// waits up to `wait` while it may be new, and answers what is known
    /// then. A store being rebuilt is answered at once: that takes the fence.
    pub async fn wait(self: &Arc<Self>, wait: Duration) -> StoreState {
        self.start();
        let mut rx = self.state.subscribe();
        let settled = |s: &StoreState| matches!(s, StoreState::Ready | StoreState::Rebuilding);
        let _ = tokio::time::timeout(wait, rx.wait_for(settled)).await;
        let now = *rx.borrow();
        now
    }
}
