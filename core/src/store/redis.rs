//! The Redis store: every decision is one Lua script (`decide.lua`), and a
//! whole consumer batch, however many events it spans, is one pipelined round
//! trip.
//!
//! Key layout, all hash-tagged by event so one event lives on one Redis
//! Cluster slot and different events can spread over a cluster:
//!
//! | key                       | type   | holds |
//! |---------------------------|--------|-------|
//! | `cr:{E}:event`            | hash   | stock, remaining, per_user_limit, generation, seq |
//! | `cr:{E}:holders`          | hash   | user id → coupons held |
//! | `cr:{E}:coupons`          | hash   | rank → request id ‖ user id |
//! | `cr:{E}:req:<request id>` | string | the decision, expiring after the dedup retention |
//! | `cr:events`               | set    | every event id (for lookups by request id alone) |

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, RedisError};
use uuid::Uuid;

use super::{
    result_from_code, BatchVerdict, Coupon, Decision, EventBatch, EventSpec, EventState, Ledger,
    Store, StoreError,
};
use crate::wire::DecisionResult;

/// The decide script, see its header for the contract.
pub const DECIDE_LUA: &str = include_str!("decide.lua");

/// Creates or resets an event: new generation, full stock, no holders.
const PUT_EVENT_LUA: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
local generation = redis.call('HINCRBY', KEYS[1], 'generation', 1)
redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'remaining', ARGV[1], 'per_user_limit', ARGV[2], 'seq', 0)
redis.call('DEL', KEYS[2], KEYS[3])
return {existed, generation}
";

/// Requests per script call: one call holds Redis for well under a
/// millisecond, so other clients (the api's status lookups) are not starved.
pub const MAX_REQUESTS_PER_CALL: usize = 512;

/// The set of all event ids.
const EVENTS_KEY: &str = "cr:events";

fn event_key(event: &str) -> String {
    format!("cr:{{{event}}}:event")
}
fn holders_key(event: &str) -> String {
    format!("cr:{{{event}}}:holders")
}
fn coupons_key(event: &str) -> String {
    format!("cr:{{{event}}}:coupons")
}
fn request_key(event: &str, request_id: &Uuid) -> String {
    format!("cr:{{{event}}}:req:{request_id}")
}

/// A [`Store`] backed by one Redis server (or a Cluster-compatible proxy).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    decide_sha: String,
    put_sha: String,
    dedup_retention_secs: u64,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) and loads the scripts.
    pub async fn connect(url: &str, dedup_retention: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Invalid(format!("bad Redis URL {url:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| unavailable(url, e))?;
        let store = Self {
            conn,
            decide_sha: redis::Script::new(DECIDE_LUA).get_hash().to_string(),
            put_sha: redis::Script::new(PUT_EVENT_LUA).get_hash().to_string(),
            dedup_retention_secs: dedup_retention.as_secs().max(1),
        };
        store.load_scripts().await?;
        Ok(store)
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(DECIDE_LUA);
        pipe.cmd("SCRIPT").arg("LOAD").arg(PUT_EVENT_LUA);
        let _: (String, String) = pipe.query_async(&mut conn).await.map_err(map_err)?;
        Ok(())
    }

    /// Runs a pipeline of EVALSHA calls, reloading the scripts once if Redis
    /// lost them (a restart or `SCRIPT FLUSH`). Rerunning is safe: decisions
    /// are idempotent by request id.
    async fn query_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match pipe.query_async(&mut conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.load_scripts().await?;
                pipe.query_async(&mut conn).await.map_err(map_err)
            }
            other => other.map_err(map_err),
        }
    }
}

fn unavailable(url: &str, e: RedisError) -> StoreError {
    StoreError::Unavailable(format!(
        "cannot reach Redis at {url}: {e} (is redis-server running? see scripts/dev-up)"
    ))
}

fn map_err(e: RedisError) -> StoreError {
    use redis::ErrorKind;
    match e.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => StoreError::Protocol(e.to_string()),
        ErrorKind::InvalidClientConfig | ErrorKind::AuthenticationFailed => {
            StoreError::Invalid(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn parse_state(
    event_id: &str,
    fields: &[Option<String>],
) -> Result<Option<EventState>, StoreError> {
    let [stock, remaining, limit, generation] = fields else {
        return Err(StoreError::Protocol(
            "event hash reply of wrong length".into(),
        ));
    };
    let Some(stock) = stock else {
        return Ok(None);
    };
    let num = |name: &str, v: &Option<String>| -> Result<u64, StoreError> {
        v.as_deref()
            .unwrap_or("0")
            .parse::<u64>()
            .map_err(|_| StoreError::Protocol(format!("event {event_id}: bad {name} {v:?}")))
    };
    Ok(Some(EventState {
        event_id: event_id.to_string(),
        stock: num("stock", &Some(stock.clone()))? as u32,
        remaining: num("remaining", remaining)? as u32,
        per_user_limit: num("per_user_limit", limit)? as u32,
        generation: num("generation", generation)?,
    }))
}

/// Parses a dedup record `generation|code|rank|decided_at|seq|user_id`.
fn parse_decision(record: &str, generation: u64) -> Option<Decision> {
    let mut parts = record.splitn(6, '|');
    let g: u64 = parts.next()?.parse().ok()?;
    let code: i64 = parts.next()?.parse().ok()?;
    let rank: u32 = parts.next()?.parse().ok()?;
    let at: u64 = parts.next()?.parse().ok()?;
    let seq: u64 = parts.next()?.parse().ok()?;
    if g != generation {
        return None;
    }
    let result = result_from_code(code)?;
    Some(Decision {
        result,
        issued_rank: (result == DecisionResult::Issued).then_some(rank),
        decided_at: at,
        replay: true,
        seq,
    })
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn put_event(
        &self,
        event_id: &str,
        spec: EventSpec,
    ) -> Result<(EventState, bool), StoreError> {
        spec.validate().map_err(StoreError::Invalid)?;
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(&self.put_sha)
            .arg(3)
            .arg(event_key(event_id))
            .arg(holders_key(event_id))
            .arg(coupons_key(event_id))
            .arg(spec.stock)
            .arg(spec.per_user_limit);
        pipe.cmd("SADD").arg(EVENTS_KEY).arg(event_id).ignore();
        let ((existed, generation),): ((i64, u64),) = self.query_scripts(&pipe).await?;
        Ok((
            EventState {
                event_id: event_id.to_string(),
                stock: spec.stock,
                per_user_limit: spec.per_user_limit,
                remaining: spec.stock,
                generation,
            },
            existed == 0,
        ))
    }

    async fn event(&self, event_id: &str) -> Result<Option<EventState>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(event_key(event_id))
            .arg(&["stock", "remaining", "per_user_limit", "generation"])
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        parse_state(event_id, &fields)
    }

    async fn decide(
        &self,
        batches: &[EventBatch],
        now_micros: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError> {
        // One EVALSHA per chunk of one event; the whole batch is one pipeline.
        let mut pipe = redis::pipe();
        let mut chunks_per_batch = Vec::with_capacity(batches.len());
        for batch in batches {
            let chunks = batch.requests.chunks(MAX_REQUESTS_PER_CALL);
            chunks_per_batch.push(chunks.len());
            for chunk in chunks {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(&self.decide_sha)
                    .arg(3 + chunk.len())
                    .arg(event_key(&batch.event_id))
                    .arg(holders_key(&batch.event_id))
                    .arg(coupons_key(&batch.event_id));
                for p in chunk {
                    cmd.arg(request_key(&batch.event_id, &p.request_id));
                }
                cmd.arg(now_micros).arg(self.dedup_retention_secs);
                for p in chunk {
                    cmd.arg(p.request_id.to_string()).arg(&p.user_id);
                }
            }
        }
        if pipe.is_empty() {
            return Ok(batches
                .iter()
                .map(|_| BatchVerdict::Decided(vec![]))
                .collect());
        }
        let replies: Vec<Vec<i64>> = self.query_scripts(&pipe).await?;
        let mut replies = replies.into_iter();
        let mut verdicts = Vec::with_capacity(batches.len());
        for (batch, chunks) in batches.iter().zip(chunks_per_batch) {
            let mut decisions = Vec::with_capacity(batch.requests.len());
            let mut unknown = false;
            for _ in 0..chunks {
                let reply = replies
                    .next()
                    .ok_or_else(|| StoreError::Protocol("missing script reply".into()))?;
                if reply.first() == Some(&-1) {
                    unknown = true;
                    continue;
                }
                if reply.len() % 5 != 0 {
                    return Err(StoreError::Protocol(format!(
                        "decide reply of {} integers",
                        reply.len()
                    )));
                }
                for d in reply.chunks_exact(5) {
                    let result = result_from_code(d[0])
                        .ok_or_else(|| StoreError::Protocol(format!("result code {}", d[0])))?;
                    decisions.push(Decision {
                        result,
                        issued_rank: (result == DecisionResult::Issued).then_some(d[1] as u32),
                        decided_at: d[2] as u64,
                        replay: d[3] == 1,
                        seq: d[4] as u64,
                    });
                }
            }
            verdicts.push(if unknown {
                BatchVerdict::UnknownEvent
            } else {
                BatchVerdict::Decided(decisions)
            });
        }
        Ok(verdicts)
    }

    async fn decision(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<Decision>, StoreError> {
        let mut conn = self.conn.clone();
        let (generation, record): (Option<u64>, Option<String>) = redis::pipe()
            .cmd("HGET")
            .arg(event_key(event_id))
            .arg("generation")
            .cmd("GET")
            .arg(request_key(event_id, &request_id))
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(match (generation, record) {
            (Some(g), Some(r)) => parse_decision(&r, g),
            _ => None,
        })
    }

    async fn find_decision(
        &self,
        request_id: Uuid,
    ) -> Result<Option<(String, Decision)>, StoreError> {
        let mut conn = self.conn.clone();
        let events: Vec<String> = redis::cmd("SMEMBERS")
            .arg(EVENTS_KEY)
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        for chunk in events.chunks(256) {
            let mut pipe = redis::pipe();
            for ev in chunk {
                pipe.cmd("HGET").arg(event_key(ev)).arg("generation");
                pipe.cmd("GET").arg(request_key(ev, &request_id));
            }
            let replies: Vec<Option<String>> =
                pipe.query_async(&mut conn).await.map_err(map_err)?;
            for (ev, pair) in chunk.iter().zip(replies.chunks_exact(2)) {
                if let (Some(g), Some(r)) = (&pair[0], &pair[1]) {
                    let g = g.parse().unwrap_or(0);
                    if let Some(d) = parse_decision(r, g) {
                        return Ok(Some((ev.clone(), d)));
                    }
                }
            }
        }
        Ok(None)
    }

    async fn ledger(&self, event_id: &str) -> Result<Option<Ledger>, StoreError> {
        let mut conn = self.conn.clone();
        let (fields, coupons, holders): (
            Vec<Option<String>>,
            Vec<(u32, String)>,
            Vec<(String, u32)>,
        ) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(event_key(event_id))
            .arg(&["stock", "remaining", "per_user_limit", "generation"])
            .cmd("HGETALL")
            .arg(coupons_key(event_id))
            .cmd("HGETALL")
            .arg(holders_key(event_id))
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let Some(state) = parse_state(event_id, &fields)? else {
            return Ok(None);
        };
        let mut coupons = coupons
            .into_iter()
            .map(|(rank, value)| {
                let (id, user) = value.split_at_checked(36).ok_or_else(|| {
                    StoreError::Protocol(format!("coupon {rank} of {event_id}: {value:?}"))
                })?;
                let request_id = Uuid::parse_str(id).map_err(|_| {
                    StoreError::Protocol(format!("coupon {rank} of {event_id}: {value:?}"))
                })?;
                Ok(Coupon {
                    rank,
                    request_id,
                    user_id: user.to_string(),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        coupons.sort_by_key(|c| c.rank);
        let mut holders = holders;
        holders.sort();
        Ok(Some(Ledger {
            state,
            coupons,
            holders,
        }))
    }
}
