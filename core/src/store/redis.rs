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
//! | `cr:{E}:confirmed`        | zset   | ranges `lo-hi` of logged decision numbers of the current generation: their outcomes are in the log (score `lo`; added only while the event has the generation they were decided in) |
//! | `cr:{E}:free`             | list   | ranks a recovery found unused below the highest (given out first) |
//! | `cr:{E}:claimed`          | string | the highest generation claimed for a definition (applied or not) |
//! | `cr:events`               | set    | every event id (for lookups by request id alone) |
//! | `cr:epoch`                | string | the epoch marker; absent = state lost, recover first |
//! | `cr:recovery`             | string | the recovery lock |

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, RedisError};
use uuid::Uuid;

use super::{
    result_from_code, seq_ranges, BatchVerdict, Coupon, Decision, Defined, EventBatch,
    EventSnapshot, EventSpec, EventState, Ledger, LoggedDecisions, Store, StoreError,
    MAX_LOGGED_RANGE,
};
use crate::wire::DecisionResult;

/// The decide script, see its header for the contract.
pub const DECIDE_LUA: &str = include_str!("decide.lua");

/// Defines an event if the definition is the newest: new generation, full
/// stock, no holders, the decision numbering (and its logged marks)
/// restarted.
///
/// KEYS[1..5] the event, holders, coupons, logged and free keys, KEYS[6]
/// the highest claimed generation; ARGV[1] stock, ARGV[2] per-user limit,
/// ARGV[3] the generation (0: claim the next one, for a definition without
/// the log). Applied only if the generation is above the one held. Returns
/// {existed, applied, generation, stock, remaining, per_user_limit}, the
/// last four as the event is now.
const DEFINE_LUA: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
local held = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local generation = tonumber(ARGV[3])
if generation == 0 then
  generation = math.max(held, tonumber(redis.call('GET', KEYS[6]) or '0')) + 1
  redis.call('SET', KEYS[6], generation)
end
local applied = 0
if generation > held then
  redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'remaining', ARGV[1], 'per_user_limit', ARGV[2], 'generation', generation, 'seq', 0)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  applied = 1
end
local s = redis.call('HMGET', KEYS[1], 'generation', 'stock', 'remaining', 'per_user_limit')
return {existed, applied, tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), tonumber(s[4])}
";

/// Claims the next generation of an event: above the one held (KEYS[1])
/// and every one claimed before (KEYS[2]).
const CLAIM_LUA: &str = r"
local held = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local generation = math.max(held, tonumber(redis.call('GET', KEYS[2]) or '0')) + 1
redis.call('SET', KEYS[2], generation)
return generation
";

/// Marks decision numbers of one event logged, only if the event still has
/// the generation they were decided in. KEYS[1] the event, KEYS[2] its
/// logged ranges; ARGV[1] the generation, then score and member of each
/// range (`lo`, `lo-hi`). Returns 1 when marked, 0 when the generation is
/// gone.
const MARK_LOGGED_LUA: &str = r"
if tonumber(redis.call('HGET', KEYS[1], 'generation')) ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[2], unpack(ARGV, 2))
return 1
";

/// Ranges per [`MARK_LOGGED_LUA`] call (two arguments each: fits Lua's stack).
const MARK_LOGGED_RANGES_PER_CALL: usize = 1000;

/// Releases the recovery lock only if the caller holds it.
const UNLOCK_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Extends the recovery lock only if the caller holds it.
const EXTEND_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Runs recovery writes only if, in the same atomic step, the caller holds
/// the recovery lock and the store has no epoch yet. Returns 1 when the
/// writes ran, 0 when the lock is someone else's (or expired), -1 when the
/// epoch is set (a rebuild already finished).
///
/// KEYS[1] the recovery lock, KEYS[2] the epoch marker; ARGV[1] the owner,
/// then the commands, each as its argument count followed by the command
/// and its arguments. (The written keys are not declared: like the epoch
/// and the lock, recovery assumes one Redis server.)
const FENCED_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
";

/// Commands per fenced script call (a call holds Redis briefly), calls per
/// round trip, and arguments per command (a command fits Lua's stack).
const FENCED_COMMANDS_PER_CALL: usize = 256;
const FENCED_CALLS_PER_ROUND_TRIP: usize = 16;
const FENCED_ARGS_PER_COMMAND: usize = 1000;

/// Requests per script call: one call holds Redis for well under a
/// millisecond, so other clients (the api's status lookups) are not starved.
pub const MAX_REQUESTS_PER_CALL: usize = 512;

/// The set of all event ids.
const EVENTS_KEY: &str = "cr:events";
/// The epoch marker.
const EPOCH_KEY: &str = "cr:epoch";
/// The recovery lock.
const RECOVERY_KEY: &str = "cr:recovery";

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
/// The event's logged decision numbers. The key keeps its first name
/// (`confirmed`) so stored data stays readable.
fn logged_key(event: &str) -> String {
    format!("cr:{{{event}}}:confirmed")
}
fn free_key(event: &str) -> String {
    format!("cr:{{{event}}}:free")
}
fn claimed_key(event: &str) -> String {
    format!("cr:{{{event}}}:claimed")
}

/// Encodes a dedup record as the script writes it (whether it is logged is
/// kept apart, in the event's ranges under [`logged_key`]).
fn encode_record(generation: u64, d: &Decision, user_id: &str) -> String {
    let code = match d.result {
        DecisionResult::Issued => 1,
        DecisionResult::SoldOut => 2,
        DecisionResult::LimitReached => 3,
        DecisionResult::Duplicate => 4,
    };
    format!(
        "{generation}|{code}|{}|{}|{}|{user_id}",
        d.issued_rank.unwrap_or(0),
        d.decided_at,
        d.seq
    )
}

/// Parses a dedup record `generation|code|rank|decided_at|seq|user_id` into
/// its generation and decision (marked as a replay, not yet logged).
fn parse_record(record: &str) -> Option<(u64, Decision)> {
    let mut parts = record.splitn(6, '|');
    let generation: u64 = parts.next()?.parse().ok()?;
    let code: i64 = parts.next()?.parse().ok()?;
    let rank: u32 = parts.next()?.parse().ok()?;
    let decided_at: u64 = parts.next()?.parse().ok()?;
    let seq: u64 = parts.next()?.parse().ok()?;
    let result = result_from_code(code)?;
    Some((
        generation,
        Decision {
            result,
            issued_rank: (result == DecisionResult::Issued).then_some(rank),
            decided_at,
            replay: true,
            seq,
            logged: false,
        },
    ))
}

/// Whether `seq` falls in one of `ranges` (`lo-hi` members).
fn covered(seq: u64, ranges: &[String]) -> bool {
    ranges.iter().any(|r| {
        r.split_once('-')
            .and_then(|(lo, hi)| Some((lo.parse::<u64>().ok()?, hi.parse::<u64>().ok()?)))
            .is_some_and(|(lo, hi)| lo <= seq && seq <= hi)
    })
}

/// A [`Store`] backed by one Redis server (or a Cluster-compatible proxy).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    decide_sha: String,
    define_sha: String,
    claim_sha: String,
    mark_logged_sha: String,
    unlock_sha: String,
    extend_sha: String,
    fenced_sha: String,
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
        let sha = |s: &str| redis::Script::new(s).get_hash().to_string();
        let store = Self {
            conn,
            decide_sha: sha(DECIDE_LUA),
            define_sha: sha(DEFINE_LUA),
            claim_sha: sha(CLAIM_LUA),
            mark_logged_sha: sha(MARK_LOGGED_LUA),
            unlock_sha: sha(UNLOCK_LUA),
            extend_sha: sha(EXTEND_LUA),
            fenced_sha: sha(FENCED_LUA),
            dedup_retention_secs: dedup_retention.as_secs().max(1),
        };
        store.load_scripts().await?;
        Ok(store)
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for script in [
            DECIDE_LUA,
            DEFINE_LUA,
            CLAIM_LUA,
            MARK_LOGGED_LUA,
            UNLOCK_LUA,
            EXTEND_LUA,
            FENCED_LUA,
        ] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await.map_err(map_err)?;
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

    async fn query<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await.map_err(map_err)
    }

    /// Runs [`DEFINE_LUA`] (`generation` 0: claim the next one).
    async fn define(
        &self,
        event_id: &str,
        spec: EventSpec,
        generation: u64,
    ) -> Result<Defined, StoreError> {
        spec.validate().map_err(StoreError::Invalid)?;
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(&self.define_sha)
            .arg(6)
            .arg(event_key(event_id))
            .arg(holders_key(event_id))
            .arg(coupons_key(event_id))
            .arg(logged_key(event_id))
            .arg(free_key(event_id))
            .arg(claimed_key(event_id))
            .arg(spec.stock)
            .arg(spec.per_user_limit)
            .arg(generation);
        pipe.cmd("SADD").arg(EVENTS_KEY).arg(event_id).ignore();
        let (reply,): (Vec<i64>,) = self.query_scripts(&pipe).await?;
        let [existed, applied, generation, stock, remaining, limit] = reply[..] else {
            return Err(StoreError::Protocol(format!(
                "define reply of {} integers",
                reply.len()
            )));
        };
        Ok(Defined {
            state: EventState {
                event_id: event_id.to_string(),
                stock: stock as u32,
                per_user_limit: limit as u32,
                remaining: remaining as u32,
                generation: generation as u64,
            },
            applied: applied == 1,
            created: applied == 1 && existed == 0,
        })
    }

    /// Runs `commands` (each a command and its arguments) through the
    /// fenced script, refusing them all unless `owner` holds the recovery
    /// lock and the store has no epoch. Commands run in order, in calls of
    /// [`FENCED_COMMANDS_PER_CALL`], each call fenced on its own: once the
    /// fence fails, every later call fails too.
    async fn fenced(&self, owner: &str, commands: &[Vec<String>]) -> Result<(), StoreError> {
        for calls in commands.chunks(FENCED_COMMANDS_PER_CALL * FENCED_CALLS_PER_ROUND_TRIP) {
            let mut pipe = redis::pipe();
            for call in calls.chunks(FENCED_COMMANDS_PER_CALL) {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(&self.fenced_sha)
                    .arg(2)
                    .arg(RECOVERY_KEY)
                    .arg(EPOCH_KEY)
                    .arg(owner);
                for c in call {
                    cmd.arg(c.len()).arg(c);
                }
            }
            let replies: Vec<i64> = self.query_scripts(&pipe).await?;
            match replies.iter().find(|r| **r != 1) {
                None => {}
                Some(0) => {
                    return Err(StoreError::Fenced(format!(
                        "{owner} no longer holds the recovery lock"
                    )))
                }
                Some(_) => {
                    return Err(StoreError::Fenced(
                        "the store already has its epoch: another process finished the rebuild"
                            .into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Marks `d` logged if its number falls in a logged range (a range
    /// spans at most MAX_LOGGED_RANGE numbers, so only that far back).
    async fn with_logged_mark(
        &self,
        event_id: &str,
        mut d: Decision,
    ) -> Result<Decision, StoreError> {
        if d.seq == 0 {
            return Ok(d);
        }
        let (ranges,): (Vec<String>,) = self
            .query(
                redis::pipe()
                    .cmd("ZRANGEBYSCORE")
                    .arg(logged_key(event_id))
                    .arg(d.seq.saturating_sub(MAX_LOGGED_RANGE))
                    .arg(d.seq),
            )
            .await?;
        d.logged = covered(d.seq, &ranges);
        Ok(d)
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

const STATE_FIELDS: [&str; 4] = ["stock", "remaining", "per_user_limit", "generation"];

fn parse_state(
    event_id: &str,
    fields: &[Option<String>],
) -> Result<Option<EventState>, StoreError> {
    let [stock, remaining, limit, generation] = fields else {
        return Err(StoreError::Protocol(
            "event hash reply of wrong length".into(),
        ));
    };
    if stock.is_none() {
        return Ok(None);
    }
    let num = |name: &str, v: &Option<String>| -> Result<u64, StoreError> {
        v.as_deref()
            .unwrap_or("0")
            .parse::<u64>()
            .map_err(|_| StoreError::Protocol(format!("event {event_id}: bad {name} {v:?}")))
    };
    Ok(Some(EventState {
        event_id: event_id.to_string(),
        stock: num("stock", stock)? as u32,
        remaining: num("remaining", remaining)? as u32,
        per_user_limit: num("per_user_limit", limit)? as u32,
        generation: num("generation", generation)?,
    }))
}

/// The decision in `record` if it belongs to `generation`.
fn current(record: &str, generation: u64) -> Option<Decision> {
    parse_record(record).and_then(|(g, d)| (g == generation).then_some(d))
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: (String,) = self.query(redis::pipe().cmd("PING")).await?;
        Ok(())
    }

    async fn put_event(
        &self,
        event_id: &str,
        spec: EventSpec,
    ) -> Result<(EventState, bool), StoreError> {
        let d = self.define(event_id, spec, 0).await?;
        Ok((d.state, d.created))
    }

    async fn claim_generation(&self, event_id: &str) -> Result<u64, StoreError> {
        let (generation,): (u64,) = self
            .query_scripts(
                redis::pipe()
                    .cmd("EVALSHA")
                    .arg(&self.claim_sha)
                    .arg(2)
                    .arg(event_key(event_id))
                    .arg(claimed_key(event_id)),
            )
            .await?;
        Ok(generation)
    }

    async fn define_event(
        &self,
        event_id: &str,
        spec: EventSpec,
        generation: u64,
    ) -> Result<Defined, StoreError> {
        if generation == 0 {
            return Err(StoreError::Invalid("generations start at 1".into()));
        }
        self.define(event_id, spec, generation).await
    }

    async fn event(&self, event_id: &str) -> Result<Option<EventState>, StoreError> {
        let (fields,): (Vec<Option<String>>,) = self
            .query(
                redis::pipe()
                    .cmd("HMGET")
                    .arg(event_key(event_id))
                    .arg(&STATE_FIELDS),
            )
            .await?;
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
                    .arg(4 + chunk.len())
                    .arg(event_key(&batch.event_id))
                    .arg(holders_key(&batch.event_id))
                    .arg(coupons_key(&batch.event_id))
                    .arg(free_key(&batch.event_id));
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
            return Ok(Vec::new());
        }
        let replies: Vec<Vec<i64>> = self.query_scripts(&pipe).await?;
        let mut replies = replies.into_iter();
        let mut verdicts = Vec::with_capacity(batches.len());
        for (batch, chunks) in batches.iter().zip(chunks_per_batch) {
            let mut decisions = Vec::with_capacity(batch.requests.len());
            let mut unknown = false;
            let mut generation = 0;
            for _ in 0..chunks {
                let reply = replies
                    .next()
                    .ok_or_else(|| StoreError::Protocol("missing script reply".into()))?;
                match reply.split_first() {
                    Some((-1, _)) => unknown = true,
                    Some((g, rest)) if rest.len() % 5 == 0 => {
                        generation = *g as u64;
                        for d in rest.chunks_exact(5) {
                            let result = result_from_code(d[0]).ok_or_else(|| {
                                StoreError::Protocol(format!("result code {}", d[0]))
                            })?;
                            decisions.push(Decision {
                                result,
                                issued_rank: (result == DecisionResult::Issued)
                                    .then_some(d[1] as u32),
                                decided_at: d[2] as u64,
                                replay: d[3] == 1,
                                seq: d[4] as u64,
                                logged: false,
                            });
                        }
                    }
                    _ => {
                        return Err(StoreError::Protocol(format!(
                            "decide reply of {} integers",
                            reply.len()
                        )))
                    }
                }
            }
            verdicts.push(if unknown {
                BatchVerdict::UnknownEvent
            } else {
                BatchVerdict::Decided {
                    generation,
                    decisions,
                }
            });
        }
        Ok(verdicts)
    }

    async fn decision(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<Decision>, StoreError> {
        let (generation, record): (Option<u64>, Option<String>) = self
            .query(
                redis::pipe()
                    .cmd("HGET")
                    .arg(event_key(event_id))
                    .arg("generation")
                    .cmd("GET")
                    .arg(request_key(event_id, &request_id)),
            )
            .await?;
        match (generation, record) {
            (Some(g), Some(r)) => match current(&r, g) {
                Some(d) => Ok(Some(self.with_logged_mark(event_id, d).await?)),
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }

    async fn find_decision(
        &self,
        request_id: Uuid,
    ) -> Result<Option<(String, Decision)>, StoreError> {
        let (events,): (Vec<String>,) = self
            .query(redis::pipe().cmd("SMEMBERS").arg(EVENTS_KEY))
            .await?;
        for chunk in events.chunks(256) {
            let mut pipe = redis::pipe();
            for ev in chunk {
                pipe.cmd("HGET").arg(event_key(ev)).arg("generation");
                pipe.cmd("GET").arg(request_key(ev, &request_id));
            }
            let replies: Vec<Option<String>> = self.query(&pipe).await?;
            for (ev, pair) in chunk.iter().zip(replies.chunks_exact(2)) {
                if let (Some(g), Some(r)) = (&pair[0], &pair[1]) {
                    if let Some(d) = current(r, g.parse().unwrap_or(0)) {
                        return Ok(Some((ev.clone(), self.with_logged_mark(ev, d).await?)));
                    }
                }
            }
        }
        Ok(None)
    }

    async fn ledger(&self, event_id: &str) -> Result<Option<Ledger>, StoreError> {
        let (fields, coupons, holders): (
            Vec<Option<String>>,
            Vec<(u32, String)>,
            Vec<(String, u32)>,
        ) = self
            .query(
                redis::pipe()
                    .atomic()
                    .cmd("HMGET")
                    .arg(event_key(event_id))
                    .arg(&STATE_FIELDS)
                    .cmd("HGETALL")
                    .arg(coupons_key(event_id))
                    .cmd("HGETALL")
                    .arg(holders_key(event_id)),
            )
            .await?;
        let Some(state) = parse_state(event_id, &fields)? else {
            return Ok(None);
        };
        let mut coupons = coupons
            .into_iter()
            .map(|(rank, value)| {
                let bad =
                    || StoreError::Protocol(format!("coupon {rank} of {event_id}: {value:?}"));
                let (id, user) = value.split_at_checked(36).ok_or_else(bad)?;
                let request_id = Uuid::parse_str(id).map_err(|_| bad())?;
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

    async fn mark_logged(&self, batches: &[LoggedDecisions]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for batch in batches {
            let ranges = seq_ranges(batch.decisions.iter().map(|(_, seq)| *seq));
            for chunk in ranges.chunks(MARK_LOGGED_RANGES_PER_CALL) {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(&self.mark_logged_sha)
                    .arg(2)
                    .arg(event_key(&batch.event_id))
                    .arg(logged_key(&batch.event_id))
                    .arg(batch.generation);
                for (lo, hi) in chunk {
                    cmd.arg(lo).arg(format!("{lo}-{hi}"));
                }
                cmd.ignore();
            }
        }
        if pipe.is_empty() {
            return Ok(());
        }
        let () = self.query_scripts(&pipe).await?;
        Ok(())
    }

    async fn epoch(&self) -> Result<Option<String>, StoreError> {
        let (epoch,): (Option<String>,) =
            self.query(redis::pipe().cmd("GET").arg(EPOCH_KEY)).await?;
        Ok(epoch)
    }

    async fn set_epoch(&self, epoch: &str, owner: &str) -> Result<(), StoreError> {
        self.fenced(owner, &[command("SET", [EPOCH_KEY, epoch])])
            .await
    }

    async fn try_lock_recovery(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (reply,): (Option<String>,) = self
            .query(
                redis::pipe()
                    .cmd("SET")
                    .arg(RECOVERY_KEY)
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(reply.is_some())
    }

    async fn extend_recovery_lock(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (extended,): (i64,) = self
            .query_scripts(
                redis::pipe()
                    .cmd("EVALSHA")
                    .arg(&self.extend_sha)
                    .arg(1)
                    .arg(RECOVERY_KEY)
                    .arg(owner)
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(extended == 1)
    }

    async fn unlock_recovery(&self, owner: &str) -> Result<(), StoreError> {
        let () = self
            .query_scripts(
                redis::pipe()
                    .cmd("EVALSHA")
                    .arg(&self.unlock_sha)
                    .arg(1)
                    .arg(RECOVERY_KEY)
                    .arg(owner)
                    .ignore(),
            )
            .await?;
        Ok(())
    }

    async fn restore(
        &self,
        snap: &EventSnapshot,
        retention: Duration,
        owner: &str,
    ) -> Result<(), StoreError> {
        let ev = &snap.state.event_id;
        let ttl = retention.as_secs().max(1).to_string();
        let mut commands = vec![command(
            "DEL",
            [
                event_key(ev),
                holders_key(ev),
                coupons_key(ev),
                logged_key(ev),
                free_key(ev),
            ],
        )];
        let per = FENCED_ARGS_PER_COMMAND / 2;
        for chunk in snap.free_ranks.chunks(per) {
            commands.push(command(
                "RPUSH",
                std::iter::once(free_key(ev)).chain(chunk.iter().map(u32::to_string)),
            ));
        }
        // Every restored decision is in the log: logged.
        let ranges = seq_ranges(snap.decided.iter().map(|d| d.decision.seq));
        for chunk in ranges.chunks(per) {
            commands.push(command(
                "ZADD",
                std::iter::once(logged_key(ev)).chain(
                    chunk
                        .iter()
                        .flat_map(|(lo, hi)| [lo.to_string(), format!("{lo}-{hi}")]),
                ),
            ));
        }
        for chunk in snap.holders.chunks(per) {
            commands.push(command(
                "HSET",
                std::iter::once(holders_key(ev)).chain(
                    chunk
                        .iter()
                        .flat_map(|(user, n)| [user.clone(), n.to_string()]),
                ),
            ));
        }
        for chunk in snap.coupons.chunks(per) {
            commands.push(command(
                "HSET",
                std::iter::once(coupons_key(ev)).chain(
                    chunk.iter().flat_map(|c| {
                        [c.rank.to_string(), format!("{}{}", c.request_id, c.user_id)]
                    }),
                ),
            ));
        }
        for d in &snap.decided {
            commands.push(command(
                "SET",
                [
                    request_key(ev, &d.request_id),
                    encode_record(snap.state.generation, &d.decision, &d.user_id),
                    "EX".into(),
                    ttl.clone(),
                ],
            ));
        }
        // The event hash last: until it exists, the event is unknown and
        // nothing is decided against a half-restored state.
        let s = &snap.state;
        commands.push(command(
            "HSET",
            [
                event_key(ev),
                "stock".into(),
                s.stock.to_string(),
                "remaining".into(),
                s.remaining.to_string(),
                "per_user_limit".into(),
                s.per_user_limit.to_string(),
                "generation".into(),
                s.generation.to_string(),
                "seq".into(),
                snap.seq.to_string(),
            ],
        ));
        commands.push(command("SADD", [EVENTS_KEY.to_string(), ev.clone()]));
        self.fenced(owner, &commands).await
    }
}

/// A command and its arguments, for [`RedisStore::fenced`].
fn command<S: Into<String>>(name: &str, args: impl IntoIterator<Item = S>) -> Vec<String> {
    std::iter::once(name.to_string())
        .chain(args.into_iter().map(Into::into))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_separators_in_user_ids() {
        let d = Decision {
            result: DecisionResult::Issued,
            issued_rank: Some(7),
            decided_at: 123,
            replay: true,
            seq: 9,
            logged: false,
        };
        let rec = encode_record(4, &d, "a|b|c");
        assert_eq!(parse_record(&rec), Some((4, d)));
        assert_eq!(current(&rec, 5), None, "another generation");
        assert_eq!(parse_record("garbage"), None);
    }

    #[test]
    fn a_number_is_logged_only_inside_a_range() {
        let ranges = vec![
            "1-100".to_string(),
            "50-50".to_string(),
            "200-210".to_string(),
        ];
        assert!(
            covered(70, &ranges),
            "a later small range does not hide an earlier wide one"
        );
        assert!(covered(205, &ranges));
        assert!(!covered(150, &ranges));
        assert!(!covered(211, &["bad".to_string()]));
    }
}
