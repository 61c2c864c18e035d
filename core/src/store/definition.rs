//! Creating or resetting an event: the log first, then the store.
//!
//! The events topic is the source of truth a lost store is rebuilt from, so
//! the store never holds a definition the log lacks:
//!
//! 1. the store **claims** a generation above every one held or claimed
//!    before ([`Store::claim_generation`]), so two `PUT`s never share one;
//! 2. the definition, with that generation, is written to the events topic
//!    and acknowledged. If that fails, nothing else happens: the store keeps
//!    the definition the log has (a claimed generation is simply skipped);
//! 3. the store **applies** it only if it is newer than the one it holds
//!    ([`Store::define_event`]): of two racing `PUT`s, the higher generation
//!    wins in the store whatever order they arrive in, as it does in a
//!    rebuild (which takes the highest generation seen);
//! 4. the live definition is **restated** on the topic until what was
//!    restated is still live once acknowledged. The topic is compacted by
//!    key (the event id), which keeps the *last* record, not the highest
//!    generation: a racing `PUT`'s older record may land after the newer
//!    one. Every `PUT` ends with a restatement confirmed live, so the last
//!    record of the event is the store's definition.
//!
//! The catch: a record whose write reported a failure may still be appended
//! (a produce request already on the wire), and a process may die between
//! the acknowledgement and step 3. Such a definition is in the log but not
//! applied: a rebuild applies it (it is the newest), as the admin asked; a
//! retried `PUT` supersedes it.

use super::{EventSpec, EventState, Store, StoreError};
use crate::producer::{ProduceError, RequestProducer};
use crate::wire::{now_micros, EventRecord, WIRE_VERSION};

/// Restatements after which a `PUT` gives up making its event's last record
/// the live definition (each one is needed only because yet another `PUT`
/// of the same event applied meanwhile).
const MAX_RESTATEMENTS: usize = 8;

/// Why an event could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateEventError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The definition did not reach the log; the event is unchanged.
    #[error(transparent)]
    Log(#[from] ProduceError),
}

/// Creates or resets an event durably: its definition on the events topic
/// (acknowledged) first, then in the store (see the module doc). Returns the
/// event as it is now (the newer definition, if a racing `PUT` won) and
/// whether this call created it.
pub async fn create_event(
    store: &dyn Store,
    producer: &RequestProducer,
    events_topic: &str,
    event_id: &str,
    spec: EventSpec,
) -> Result<(EventState, bool), CreateEventError> {
    spec.validate().map_err(StoreError::Invalid)?;
    let generation = store.claim_generation(event_id).await?;
    producer
        .publish_event(events_topic, &record(event_id, spec, generation))
        .await?;
    let defined = store.define_event(event_id, spec, generation).await?;
    if !defined.applied {
        tracing::info!(
            event_id,
            generation,
            live = defined.state.generation,
            "a newer definition of the event is live; this one is superseded"
        );
    }
    let state = restate(store, producer, events_topic, defined.state).await;
    Ok((state, defined.created))
}

/// Writes `live` to the topic until it is still the store's definition once
/// acknowledged (step 4). A failure is logged, not returned: the definition
/// is applied and in the log already; only a racing `PUT` could have left an
/// older record after it.
async fn restate(
    store: &dyn Store,
    producer: &RequestProducer,
    events_topic: &str,
    mut live: EventState,
) -> EventState {
    for _ in 0..MAX_RESTATEMENTS {
        let record = record(&live.event_id, live.spec(), live.generation);
        if let Err(e) = producer.publish_event(events_topic, &record).await {
            tracing::warn!(
                event_id = live.event_id,
                error = %e,
                "could not restate the live definition; if a PUT raced this one, the event's last record on the topic may be an older one"
            );
            return live;
        }
        match store.event(&live.event_id).await {
            Ok(Some(now)) if now.generation != live.generation => live = now,
            Ok(_) => return live,
            Err(e) => {
                tracing::warn!(event_id = live.event_id, error = %e, "could not confirm the restated definition");
                return live;
            }
        }
    }
    tracing::warn!(
        event_id = live.event_id,
        "the event was redefined {MAX_RESTATEMENTS} times while this PUT restated it; the last PUT restates it"
    );
    live
}

fn record(event_id: &str, spec: EventSpec, generation: u64) -> EventRecord {
    EventRecord {
        v: WIRE_VERSION,
        event_id: event_id.to_string(),
        stock: spec.stock,
        per_user_limit: spec.per_user_limit,
        generation,
        written_at: now_micros(),
        claim_window_us: spec.claim_window_us,
        stock_buckets: spec.stock_buckets,
    }
}
