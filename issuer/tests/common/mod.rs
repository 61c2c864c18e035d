//! Helpers shared by the issuer's integration tests: running an issuer
//! until its outcomes are in, reading outcomes back, a store with hooks.

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::store::Store;
use couponrush_core::Outcome;
use couponrush_harness::TopicReader;
use tokio_util::sync::CancellationToken;

/// A reader of `topic` from the beginning.
pub fn reader(brokers: &str, topic: &str) -> TopicReader {
    TopicReader::new(brokers, topic).expect("the topic can be read")
}

/// Reads outcomes until `done` says so or `timeout` passes.
pub fn read_outcomes(
    reader: &TopicReader,
    all: &mut Vec<Outcome>,
    timeout: Duration,
    done: impl Fn(&[Outcome]) -> bool,
) {
    reader.read_until(
        all,
        timeout,
        |r| Outcome::parse(&r.payload).expect("outcomes parse"),
        done,
    );
}

/// Runs an issuer with `config` on `store` until the outcomes read back
/// from `brokers` satisfy `done` (or `timeout` passes), stops it (it must
/// stop cleanly), and returns the outcomes.
pub async fn issue_until(
    config: couponrush_issuer::Config,
    brokers: &str,
    store: Arc<dyn Store>,
    timeout: Duration,
    done: impl Fn(&[Outcome]) -> bool,
) -> Vec<Outcome> {
    let reader = reader(brokers, &config.topics.outcomes);
    let stop = CancellationToken::new();
    let issuer = tokio::spawn(couponrush_issuer::run_issuer(config, store, stop.clone()));
    let mut outcomes = Vec::new();
    read_outcomes(&reader, &mut outcomes, timeout, done);
    stop.cancel();
    issuer.await.unwrap().unwrap();
    outcomes
}

/// Whether `outcomes` hold decisions of at least `n` different requests.
pub fn decided_at_least(n: usize) -> impl Fn(&[Outcome]) -> bool {
    move |outcomes| {
        outcomes
            .iter()
            .map(|o| o.request_id)
            .collect::<HashSet<_>>()
            .len()
            >= n
    }
}

#[allow(unused_imports)]
pub use hooked::{Hooked, Hooks};

/// A store that is the in-memory store with some calls intercepted: tests
/// plant a fault or watch the calls the issuer makes.
mod hooked {
    use std::time::Duration;

    use async_trait::async_trait;
    use couponrush_core::store::memory::MemoryStore;
    use couponrush_core::store::{
        BatchVerdict, Decision, Defined, DueHold, EventBatch, EventSnapshot, EventSpec, EventState,
        HoldStatus, Ledger, LoggedDecisions, Store, StoreError,
    };
    use uuid::Uuid;

    /// The intercepted calls; each defaults to the in-memory store's own.
    #[async_trait]
    pub trait Hooks: Send + Sync + 'static {
        async fn decide(
            &self,
            inner: &MemoryStore,
            b: &[EventBatch],
            now: u64,
        ) -> Result<Vec<BatchVerdict>, StoreError> {
            inner.decide(b, now).await
        }
        async fn mark_logged(
            &self,
            inner: &MemoryStore,
            b: &[LoggedDecisions],
        ) -> Result<(), StoreError> {
            inner.mark_logged(b).await
        }
    }

    /// [`MemoryStore`] with `H`'s calls intercepted.
    pub struct Hooked<H> {
        pub inner: MemoryStore,
        pub hooks: H,
    }

    impl<H> Hooked<H> {
        pub fn new(hooks: H) -> Self {
            Self {
                inner: MemoryStore::default(),
                hooks,
            }
        }
    }

    #[async_trait]
    impl<H: Hooks> Store for Hooked<H> {
        fn kind(&self) -> &'static str {
            "hooked"
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn put_event(
            &self,
            e: &str,
            spec: EventSpec,
        ) -> Result<(EventState, bool), StoreError> {
            self.inner.put_event(e, spec).await
        }
        async fn claim_generation(&self, e: &str) -> Result<u64, StoreError> {
            self.inner.claim_generation(e).await
        }
        async fn define_event(
            &self,
            e: &str,
            spec: EventSpec,
            g: u64,
        ) -> Result<Defined, StoreError> {
            self.inner.define_event(e, spec, g).await
        }
        async fn event(&self, e: &str) -> Result<Option<EventState>, StoreError> {
            self.inner.event(e).await
        }
        async fn decide(
            &self,
            b: &[EventBatch],
            now: u64,
        ) -> Result<Vec<BatchVerdict>, StoreError> {
            self.hooks.decide(&self.inner, b, now).await
        }
        async fn decision(&self, e: &str, id: Uuid) -> Result<Option<Decision>, StoreError> {
            self.inner.decision(e, id).await
        }
        async fn find_decision(&self, id: Uuid) -> Result<Option<(String, Decision)>, StoreError> {
            self.inner.find_decision(id).await
        }
        async fn ledger(&self, e: &str) -> Result<Option<Ledger>, StoreError> {
            self.inner.ledger(e).await
        }
        async fn hold(&self, e: &str, id: Uuid) -> Result<Option<HoldStatus>, StoreError> {
            self.inner.hold(e, id).await
        }
        async fn due_holds(&self, now: u64, limit: usize) -> Result<Vec<DueHold>, StoreError> {
            self.inner.due_holds(now, limit).await
        }
        async fn mark_logged(&self, b: &[LoggedDecisions]) -> Result<(), StoreError> {
            self.hooks.mark_logged(&self.inner, b).await
        }
        async fn epoch(&self) -> Result<Option<String>, StoreError> {
            self.inner.epoch().await
        }
        async fn begin_rebuild(&self, owner: &str) -> Result<(), StoreError> {
            self.inner.begin_rebuild(owner).await
        }
        async fn set_epoch(&self, epoch: &str, owner: &str) -> Result<(), StoreError> {
            self.inner.set_epoch(epoch, owner).await
        }
        async fn try_lock_recovery(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
            self.inner.try_lock_recovery(owner, ttl).await
        }
        async fn extend_recovery_lock(
            &self,
            owner: &str,
            ttl: Duration,
        ) -> Result<bool, StoreError> {
            self.inner.extend_recovery_lock(owner, ttl).await
        }
        async fn unlock_recovery(&self, owner: &str) -> Result<(), StoreError> {
            self.inner.unlock_recovery(owner).await
        }
        async fn restore(
            &self,
            s: &EventSnapshot,
            r: Duration,
            owner: &str,
        ) -> Result<(), StoreError> {
            self.inner.restore(s, r, owner).await
        }
    }
}
