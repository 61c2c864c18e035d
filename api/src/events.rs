//! Which events exist, remembered briefly so the issue path does not ask the
//! store on every request.
//!
//! An event that exists is remembered for [`KNOWN_TTL`], one that does not
//! for [`UNKNOWN_TTL`] (so a just-created event is seen within a second by
//! every api instance). The map is bounded: when full it is cleared, which
//! costs a few store lookups and never memory. Keys are hashed with
//! foldhash, seeded per process, instead of std's SipHash, which showed in
//! a profile of the issue route. foldhash claims only minimal resistance to
//! crafted colliding keys; the bound caps what such a flood can slow down
//! to 10,000 entries, cleared when full.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use couponrush_core::store::{Store, StoreError};

/// How long an existing event is remembered.
pub const KNOWN_TTL: Duration = Duration::from_secs(30);
/// How long a missing event is remembered.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(1);
/// At most this many events are remembered.
pub const CAPACITY: usize = 10_000;

/// A bounded, expiring cache of event existence in front of the store.
pub struct EventCache {
    store: Arc<dyn Store>,
    entries: RwLock<HashMap<String, (bool, Instant), foldhash::fast::RandomState>>,
}

impl EventCache {
    /// An empty cache over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            entries: RwLock::new(HashMap::default()),
        }
    }

    /// Whether `event_id` exists, from the cache or the store.
    pub async fn exists(&self, event_id: &str) -> Result<bool, StoreError> {
        let now = Instant::now();
        if let Some(&(exists, at)) = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(event_id)
        {
            let ttl = if exists { KNOWN_TTL } else { UNKNOWN_TTL };
            if now.duration_since(at) < ttl {
                return Ok(exists);
            }
        }
        let exists = self.store.event(event_id).await?.is_some();
        self.remember(event_id, exists);
        Ok(exists)
    }

    /// Records what the caller just learnt (an admin created the event).
    pub fn remember(&self, event_id: &str, exists: bool) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAPACITY && !entries.contains_key(event_id) {
            entries.clear();
        }
        entries.insert(event_id.to_string(), (exists, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use couponrush_core::store::memory::MemoryStore;
    use couponrush_core::store::EventSpec;

    #[tokio::test]
    async fn unknown_events_are_rechecked_and_the_cache_stays_bounded() {
        let store = Arc::new(MemoryStore::default());
        let cache = EventCache::new(store.clone());
        assert!(!cache.exists("e").await.unwrap());
        store
            .put_event(
                "e",
                EventSpec {
                    stock: 1,
                    per_user_limit: 1,
                    claim_window_us: 0,
                    stock_buckets: 1,
                },
            )
            .await
            .unwrap();
        // Still remembered as missing until the short TTL passes...
        assert!(!cache.exists("e").await.unwrap());
        cache.remember("e", true);
        assert!(cache.exists("e").await.unwrap());
        for i in 0..CAPACITY + 10 {
            cache.remember(&format!("x{i}"), false);
        }
        assert!(cache.entries.read().unwrap().len() <= CAPACITY);
    }
}
