//! The Redis store: every decision is one Lua script (`decide.lua`), and a
//! whole consumer batch, however many events it spans, is one pipelined round
//! trip.
//!
//! Key layout, all hash-tagged by event so one event lives on one Redis
//! Cluster slot and different events can spread over a cluster:
//!
//! | key                       | type   | holds |
//! |---------------------------|--------|-------|
//! | `cr:{E}:event`            | hash   | stock, remaining, per_user_limit, generation, seq, claim_window (µs), released, claimed, dedup_since (µs, Redis's clock), layout |
//! | `cr:{E}:holders`          | hash   | user id → coupons held now |
//! | `cr:{E}:coupons`          | hash   | rank → request id ‖ user id, the coupons out now |
//! | `cr:{E}:holds`            | hash   | request id → `state\|rank\|until\|ended_at\|end_seq\|user id` (events with holds) |
//! | `cr:{E}:due`              | zset   | request ids still held, scored by deadline (the expiry sweep's list) |
//! | `cr:{E}:dedup`            | hash   | request id → `generation\|code\|rank\|decided_at\|seq\|user id`: the dedup records written since `dedup_since` |
//! | `cr:{E}:dedup:old`        | hash   | the dedup records of the window before |
//! | `cr:{E}:req:<request id>` | string | a dedup record as an earlier version kept it (one key each, expiring after the retention): read, never written, see below |
//! | `cr:{E}:confirmed`        | zset   | ranges `lo-hi` of logged decision numbers of the current generation: their outcomes are in the log (score `lo`; added only while the event has the generation they were decided in) |
//! | `cr:{E}:free_ranks`       | zset   | ranks below the highest issued that no coupon out holds: returned by a hold's end, or found unused by a recovery (lowest given out first). The list `cr:{E}:free` an earlier version kept them in is moved into it by the next decision (and deleted by a definition or a restore) |
//! | `cr:{E}:claimed`          | string | the highest generation claimed for a definition (applied or not) |
//! | `cr:events`               | set    | every event id (for lookups by request id alone) |
//! | `cr:epoch`                | string | the epoch marker; absent = never held state or lost it, `lost:<epoch>` = came back behind; either way, recover first (`cr:{cr}:epoch` on a cluster) |
//! | `cr:recovery`             | string | the recovery lock (`cr:{cr}:recovery` on a cluster) |
//! | `cr:{T}:slot-epoch`       | string | on a cluster only: the epoch marker of the slot tag `T` hashes to, as the scripts of that slot's events check it |
//!
//! An event with stock buckets (K > 1, [`super::buckets`]) keeps every key
//! above except `cr:events` once per bucket: bucket 0 under `{E}`, bucket
//! `b` under `{E#b}`, each with its own stock, counters and numbering, and
//! `buckets` (K) and `bucket` (b) in its event hash (absent when K = 1: the
//! unbucketed layout is unchanged). A decide call routes each request and
//! action by user to its bucket (one `EVALSHA` per bucket in the same
//! pipeline) and passes the K it routed by; the script decides nothing if
//! the bucket holds another K (`{-3, K}`: the event was redefined), so a
//! bucket count remembered by this handle is safe to reuse. Lookups by
//! request id (status, holds) ask every bucket; marks of logged decisions go
//! to the bucket each number belongs to.
//!
//! ## Dedup records: two hashes per event, turned over by the retention
//!
//! A decision's dedup record is a field of `cr:{E}:dedup`. Once that hash is
//! one retention `R` old (by Redis's own clock, `TIME`, as `SET EX` kept
//! the records before), the decide script renames it `cr:{E}:dedup:old`,
//! dropping the `old` one before it, all of whose records are at least `R`
//! old; each hash also expires `R` after its last write. So a record lives
//! at least `R` (the rule: keep it ≥ the requests topic's retention) and at
//! most about `2R`, and a batch costs one `HMGET` per hash and one `HSET`,
//! not a `GET` and a `SET EX` per request (docs/BENCHMARKS.md, issuer). A
//! definition drops both hashes (records of another generation are void
//! anyway); a restore writes the log's records into `cr:{E}:dedup`.
//!
//! **An earlier version's records** (`cr:{E}:req:<id>`, one string key
//! each) are still **read, not migrated**: an event whose hash has no
//! `layout` 2 (defined by an earlier version and not defined or restored
//! since) may hold them, so its decide calls pass those keys and the script
//! looks a request up there when the hashes do not have it; new records go
//! to the hashes. The store learns from each reply which events have
//! layout 2 and stops passing the keys for them (a call that finds it
//! wrong decides nothing and answers [`StoreError::Unavailable`]: the
//! batch is retried). The next definition or restore of the event (a
//! restore purges the old keys by `SCAN`) gives it layout 2. Running
//! earlier and later versions side by side against one store is not
//! supported: an earlier issuer would write records the later one does
//! not read.
//!
//! ## A server that comes back behind
//!
//! A redis-server restarted from an older snapshot (RDB or AOF not synced
//! on every write), or a replica promoted before it caught up, still holds
//! `cr:epoch`: its data looks whole, but the last decisions are missing, so
//! it would sell their stock and ranks again. What such a server has always
//! lost is its **script cache** (Redis ≥ 7 neither persists nor replicates
//! it). So every script that decides or changes an event's state is
//! **bound to the epoch**: its text names the epoch, it checks in the same
//! atomic step that the store still holds that epoch (so nothing is decided
//! while a rebuild, which marks the store `lost:` first, is under way), and
//! it is loaded only by the recovery that writes that epoch, *before*
//! writing it. A call that
//! finds its script missing while the server still holds that epoch has
//! found a server that restarted or failed over since the epoch was
//! vouched for: it decides nothing, marks the store `lost:<epoch>`, and
//! reports [`StoreError::Lost`]; the store is then rebuilt from the log
//! behind the fence like a store that came back empty, stale dedup records
//! included ([`Store::restore`] replaces an event's every key). The cost: a
//! restart that lost nothing (AOF with `appendfsync always`) or a
//! `SCRIPT FLUSH` is rebuilt too, which is safe and takes the fence plus a
//! read of the log. Redis 7 or newer is required (checked at connect): an
//! older one replicated and replayed its scripts.
//!
//! ## On a Redis Cluster (`redis+cluster://host:port,…`)
//!
//! A script may touch one slot only, so the epoch is kept **per slot**:
//! besides the store's marker `cr:{cr}:epoch` (and the lock
//! `cr:{cr}:recovery`, one hash tag so the fenced script checks both), every
//! one of the 16,384 slots has a marker `cr:{T}:slot-epoch`, `T` a tag that
//! hashes to that slot. An event's bound scripts check the marker of their
//! event's slot; a missing script is judged, as above, by the markers of
//! the slots the call touched: a slot that holds the very epoch, or none
//! while the store holds one, lost its node's data or scripts (a replica
//! promoted behind, a restarted master), and is marked lost with the store.
//! The rebuild stays whole-store: [`Store::begin_rebuild`] marks the store,
//! then every slot (over the old epoch the slots of the masters that did
//! not fail still hold); the restore's writes of an event are fenced by its
//! slot's marker (refused once it holds an epoch) in the same atomic step,
//! and by the lock checked before each round trip (the lock is on another
//! slot: a recoverer whose lock lapses between that check and its write can
//! still write, but only into slots with no epoch yet, and after its own
//! fence, so what it writes is what the log held); [`Store::set_epoch`]
//! loads the bound scripts on every master, writes every slot, then the
//! store's marker. The cost: a rebuild writes 16,384 markers twice (about
//! 32 round trips), and a failover of one master rebuilds every event.
//! A pipeline is split by slot ([`crate::redis_conn`]): a node that lost
//! its scripts refuses its own calls only, the others' run but their
//! replies are not returned (the caller retries: a replay, or a rebuild).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use std::collections::HashMap;
use std::sync::OnceLock;

use async_trait::async_trait;
use redis::cluster_routing::Slot;
use redis::{Pipeline, RedisError};
use uuid::Uuid;

use super::buckets;
use super::{
    hold_state_code, hold_state_from_code, result_from_code, seq_ranges, seq_ranges_by, verb_code,
    BatchVerdict, Coupon, Decision, Defined, DueHold, EventBatch, EventSnapshot, EventSpec,
    EventState, Hold, HoldEnd, HoldStatus, Ledger, LoggedDecisions, Store, StoreError,
    MAX_LOGGED_RANGE,
};
use crate::redis_conn::{ConnectError, RedisConn};
use crate::wire::{DecisionResult, HoldState};

/// The decide script, see its header for the contract.
pub const DECIDE_LUA: &str = include_str!("decide.lua");

/// Defines an event if the definition is the newest: new generation, full
/// stock, no holders, the decision numbering (and its logged marks)
/// restarted.
///
/// KEYS[1..5] the event, holders, coupons, logged and free ranks keys,
/// KEYS[6] the highest claimed generation, KEYS[7..9] the holds, due and
/// (old) free list keys, KEYS[10..11] the dedup hashes; ARGV[1] stock, ARGV[2] per-user limit, ARGV[3] the
/// generation (0: claim the next one, for a definition without the log),
/// ARGV[4] the claim window (µs), ARGV[5] the event's bucket count K and
/// ARGV[6] this bucket's index (the fields are kept only when K > 1, see
/// [`super::buckets`]). Applied only if the generation is above
/// the one held. Returns {existed, applied, generation, stock, remaining,
/// per_user_limit, claim_window, released, claimed}, all but the first two
/// as the event is now. The event gets layout 2: no dedup record of it is a
/// string key (those of earlier generations are void).
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
  redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'remaining', ARGV[1], 'per_user_limit', ARGV[2], 'generation', generation, 'seq', 0, 'claim_window', ARGV[4], 'released', 0, 'claimed', 0, 'layout', 2)
  redis.call('HDEL', KEYS[1], 'dedup_since')
  if ARGV[5] == '1' then
    redis.call('HDEL', KEYS[1], 'buckets', 'bucket')
  else
    redis.call('HSET', KEYS[1], 'buckets', ARGV[5], 'bucket', ARGV[6])
  end
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11])
  applied = 1
end
local s = redis.call('HMGET', KEYS[1], 'generation', 'stock', 'remaining', 'per_user_limit', 'claim_window', 'released', 'claimed')
return {existed, applied, tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), tonumber(s[4]), tonumber(s[5] or '0'), tonumber(s[6] or '0'), tonumber(s[7] or '0')}
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
/// the recovery lock and the store has no epoch yet (none, or a `lost:`
/// marker). Returns 1 when the
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
local epoch = redis.call('GET', KEYS[2])
if epoch and string.sub(epoch, 1, 5) ~= 'lost:' then
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

/// [`FENCED_LUA`] for one slot of a Redis Cluster: runs the writes only if
/// the slot's epoch marker (KEYS[1]) holds no epoch (none, or a `lost:`
/// marker). ARGV as [`FENCED_LUA`]'s (the owner is checked apart, see
/// [`RedisStore::fenced`]). Returns 1 when the writes ran, -1 when the slot
/// has its epoch.
const SLOT_FENCED_LUA: &str = r"
local epoch = redis.call('GET', KEYS[1])
if epoch and string.sub(epoch, 1, 5) ~= 'lost:' then
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

/// Marks the store lost (`lost:<epoch>`) if it still holds the epoch
/// ARGV[1]: the server restarted or failed over since that epoch's scripts
/// were loaded. KEYS[1] the epoch marker.
const FORGET_EPOCH_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'lost:' .. ARGV[1])
  return 1
end
return 0
";

/// The prefix of an epoch marker that says the store came back behind, or
/// is being rebuilt.
const LOST_PREFIX: &str = "lost:";

/// The error a bound script answers when the store holds another epoch.
const EPOCH_MISMATCH: &str = "EPOCHMISMATCH";

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
/// The epoch marker (one server).
const EPOCH_KEY: &str = "cr:epoch";
/// The recovery lock (one server).
const RECOVERY_KEY: &str = "cr:recovery";
/// The epoch marker and the recovery lock on a Redis Cluster: one hash
/// tag, so the fenced script can check both.
const CLUSTER_EPOCH_KEY: &str = "cr:{cr}:epoch";
const CLUSTER_RECOVERY_KEY: &str = "cr:{cr}:recovery";
/// Slots of a Redis Cluster.
const SLOTS: usize = 16384;
/// Slot markers written per round trip by a rebuild.
const SLOT_MARKERS_PER_ROUND_TRIP: usize = 1024;

/// A hash tag for every slot of a Redis Cluster (the smallest decimal
/// number that hashes there), found once.
fn slot_tags() -> &'static HashMap<Slot, String> {
    static TAGS: OnceLock<HashMap<Slot, String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = HashMap::with_capacity(SLOTS);
        let mut n: u64 = 0;
        while tags.len() < SLOTS {
            let tag = n.to_string();
            tags.entry(Slot::for_key(&tag)).or_insert(tag);
            n += 1;
        }
        tags
    })
}

/// The epoch marker of the slot `key` hashes to, on a Redis Cluster.
fn slot_epoch_key(key: &str) -> String {
    slot_marker(&slot_tags()[&Slot::for_key(key)])
}

fn slot_marker(tag: &str) -> String {
    format!("cr:{{{tag}}}:slot-epoch")
}

fn event_key(event: &str) -> String {
    format!("cr:{{{event}}}:event")
}
fn holders_key(event: &str) -> String {
    format!("cr:{{{event}}}:holders")
}
fn coupons_key(event: &str) -> String {
    format!("cr:{{{event}}}:coupons")
}
fn dedup_key(event: &str) -> String {
    format!("cr:{{{event}}}:dedup")
}
fn old_dedup_key(event: &str) -> String {
    format!("cr:{{{event}}}:dedup:old")
}
/// A dedup record as an earlier version kept it (read, never written; see
/// the module doc).
fn legacy_record_key(event: &str, request_id: &Uuid) -> String {
    format!("{}{request_id}", legacy_record_key_prefix(event))
}
fn legacy_record_key_prefix(event: &str) -> String {
    format!("cr:{{{event}}}:req:")
}
/// `s` with Redis glob metacharacters escaped, for `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
/// The event's logged decision numbers. The key keeps its first name
/// (`confirmed`) so stored data stays readable.
fn logged_key(event: &str) -> String {
    format!("cr:{{{event}}}:confirmed")
}
fn free_key(event: &str) -> String {
    format!("cr:{{{event}}}:free_ranks")
}
/// The list of free ranks [`free_key`] replaced: moved into it by the
/// decide script on first sight, so a store upgraded in place never issues
/// a rank its earlier recovery left free as a new one.
fn old_free_key(event: &str) -> String {
    format!("cr:{{{event}}}:free")
}
fn holds_key(event: &str) -> String {
    format!("cr:{{{event}}}:holds")
}
fn due_key(event: &str) -> String {
    format!("cr:{{{event}}}:due")
}

/// Encodes a hold as the script writes it.
fn encode_hold(h: &Hold) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}",
        hold_state_code(h.state),
        h.rank,
        h.until,
        h.ended_at,
        h.end_seq,
        h.user_id
    )
}

/// Parses a hold `state|rank|until|ended_at|end_seq|user_id`.
fn parse_hold(request_id: Uuid, record: &str) -> Option<Hold> {
    let mut parts = record.splitn(6, '|');
    let state = hold_state_from_code(parts.next()?.parse().ok()?)?;
    let rank = parts.next()?.parse().ok()?;
    let until = parts.next()?.parse().ok()?;
    let ended_at = parts.next()?.parse().ok()?;
    let end_seq = parts.next()?.parse().ok()?;
    let user_id = parts.next()?.to_string();
    Some(Hold {
        request_id,
        user_id,
        rank,
        until,
        state,
        ended_at,
        end_seq,
    })
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

/// The scripts that decide or change an event's state, bound to the epoch
/// that vouched for the state they act on (see the module doc).
#[derive(Debug)]
struct Bound {
    /// The epoch (`None`: the store has none yet; only a store that never
    /// held state runs these, see [`RedisStore::query_bound`]).
    epoch: Option<String>,
    decide: String,
    define: String,
    claim: String,
    mark_logged: String,
}

impl Bound {
    const SCRIPTS: [&'static str; 4] = [DECIDE_LUA, DEFINE_LUA, CLAIM_LUA, MARK_LOGGED_LUA];

    /// Each script's text as bound to `epoch`: its name in a comment (so
    /// each epoch has scripts of its own, which a restarted or promoted
    /// server has lost), then a check, in the same atomic step as the
    /// script's work, that the store holds that epoch (none: no epoch at
    /// all) — so nothing is decided while the store is being rebuilt
    /// (marked `lost:`) or after it was. The caller appends the epoch key
    /// to KEYS and [`Bound::tag`] to ARGV; the check takes both off.
    fn texts(epoch: Option<&str>) -> [String; 4] {
        let tag = epoch.unwrap_or("(none)");
        Self::SCRIPTS.map(|body| {
            format!(
                "-- couponrush: bound to epoch {tag}\n\
                 local epoch_held = redis.call('GET', table.remove(KEYS)) or ''\n\
                 if epoch_held ~= table.remove(ARGV) then\n\
                 \x20 return redis.error_reply('{EPOCH_MISMATCH} the store holds epoch ' .. epoch_held)\n\
                 end\n{body}"
            )
        })
    }

    /// The epoch the scripts check for ("" for none).
    fn tag(&self) -> &str {
        self.epoch.as_deref().unwrap_or("")
    }

    fn new(epoch: Option<String>) -> Self {
        let [decide, define, claim, mark_logged] =
            Self::texts(epoch.as_deref()).map(|t| redis::Script::new(&t).get_hash().to_string());
        Self {
            epoch,
            decide,
            define,
            claim,
            mark_logged,
        }
    }
}

/// A [`Store`] backed by one Redis server or a Redis Cluster.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    bound: Arc<RwLock<Arc<Bound>>>,
    unlock_sha: String,
    extend_sha: String,
    fenced_sha: String,
    slot_fenced_sha: String,
    dedup_retention_secs: u64,
    /// Events known to have layout 2 (no dedup record as a string key), so
    /// their decide calls need not pass those keys (see the module doc).
    layout2: Arc<Mutex<HashSet<String>>>,
    /// Bucket counts of events with K > 1 as last read (bounded like
    /// `layout2`); an event not in it is read. A stale count decides
    /// nothing: the script checks it (see [`super::buckets`]).
    bucket_counts: Arc<Mutex<HashMap<String, u32>>>,
}

/// Events remembered in [`RedisStore`]'s `layout2` at most: forgetting one
/// costs a decide call that passes the old keys, and it is learnt again.
const LAYOUT2_REMEMBERED: usize = 4096;

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`, or
    /// `redis+cluster://host:port,…` for a Redis Cluster) and loads the
    /// scripts.
    pub async fn connect(url: &str, dedup_retention: Duration) -> Result<Self, StoreError> {
        let conn = RedisConn::connect(url).await.map_err(|e| match e {
            ConnectError::Invalid { .. } => StoreError::Invalid(e.to_string()),
            ConnectError::Unreachable { .. } => StoreError::Unavailable(e.to_string()),
        })?;
        let sha = |s: &str| redis::Script::new(s).get_hash().to_string();
        let store = Self {
            conn,
            bound: Arc::new(RwLock::new(Arc::new(Bound::new(None)))),
            unlock_sha: sha(UNLOCK_LUA),
            extend_sha: sha(EXTEND_LUA),
            fenced_sha: sha(FENCED_LUA),
            slot_fenced_sha: sha(SLOT_FENCED_LUA),
            dedup_retention_secs: dedup_retention.as_secs().max(1),
            layout2: Arc::default(),
            bucket_counts: Arc::default(),
        };
        store.require_redis_7().await?;
        store.load_scripts().await?;
        Ok(store)
    }

    /// Refuses a Redis older than 7: before 7, a replica got the primary's
    /// scripts and an AOF restart replayed them, so a store that came back
    /// behind would keep its scripts and go unnoticed (see the module doc).
    async fn require_redis_7(&self) -> Result<(), StoreError> {
        // One server answers a text; a cluster, a text per master.
        let (info,): (redis::Value,) = self.query(redis::pipe().cmd("INFO").arg("server")).await?;
        let infos: Vec<String> = match redis::from_redis_value::<String>(info.clone()) {
            Ok(one) => vec![one],
            Err(_) => redis::from_redis_value::<HashMap<String, String>>(info)
                .map_err(|e| StoreError::Protocol(format!("INFO server: {e}")))?
                .into_values()
                .collect(),
        };
        for info in infos {
            let version = info
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .map(str::trim)
                .unwrap_or("unknown")
                .to_string();
            match version
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
            {
                Some(major) if major >= 7 => {}
                _ => {
                    return Err(StoreError::Invalid(format!(
                        "Redis {version} is too old: couponrush needs Redis 7 or newer, whose script \
                         cache is neither persisted nor replicated (that is how a store that came back \
                         behind its log is noticed); upgrade the server"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The store's epoch marker.
    fn epoch_key(&self) -> &'static str {
        if self.conn.is_cluster() {
            CLUSTER_EPOCH_KEY
        } else {
            EPOCH_KEY
        }
    }

    /// The recovery lock.
    fn recovery_key(&self) -> &'static str {
        if self.conn.is_cluster() {
            CLUSTER_RECOVERY_KEY
        } else {
            RECOVERY_KEY
        }
    }

    /// The epoch marker the scripts of `event` check: the store's on one
    /// server, its slot's on a cluster (see the module doc).
    fn epoch_key_of(&self, event: &str) -> String {
        if self.conn.is_cluster() {
            slot_epoch_key(&event_key(event))
        } else {
            EPOCH_KEY.to_string()
        }
    }

    /// Loads the scripts that are not bound to an epoch (the recovery's).
    async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for script in [UNLOCK_LUA, EXTEND_LUA, FENCED_LUA, SLOT_FENCED_LUA] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await.map_err(map_err)?;
        Ok(())
    }

    /// Loads the scripts bound to `epoch`: by the recovery that is about to
    /// write it, or (`None`) by anyone while the store has no epoch at all.
    async fn load_bound(&self, epoch: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for text in Bound::texts(epoch) {
            pipe.cmd("SCRIPT").arg("LOAD").arg(text);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await.map_err(map_err)?;
        Ok(())
    }

    /// Runs a pipeline of EVALSHA calls of the unbound scripts, reloading
    /// them once if Redis lost them (a restart or `SCRIPT FLUSH`).
    async fn query_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match pipe.query_async(&mut conn).await {
            Err(e) if answered(&e, "NOSCRIPT") => {
                self.load_scripts().await?;
                pipe.query_async(&mut conn).await.map_err(map_err)
            }
            other => other.map_err(map_err),
        }
    }

    /// Runs the pipeline `build` makes of the scripts bound to the store's
    /// epoch. A missing script means the server lost its script cache:
    /// - it holds another epoch (a recovery since): bind to it, run again;
    /// - it holds none (it never held state, or lost it all): the unbound
    ///   scripts are loaded and run (on a store that lost its state every
    ///   event is unknown, which sends the caller to the recovery);
    /// - it holds the very epoch the scripts are bound to: it restarted or
    ///   failed over since that epoch was written, and may be behind the
    ///   log. It is marked `lost:` and nothing is run ([`StoreError::Lost`]).
    ///
    /// On one server, a pipeline refused for a missing script ran none of
    /// its scripts. On a cluster the epoch is read from the slots of
    /// `events` (the events the pipeline's scripts act on), and a node that
    /// lost its scripts refused its own calls only: the other nodes' ran,
    /// but the caller is answered an error and sees none of their replies
    /// (their decisions are replayed, or rebuilt from the log).
    async fn query_bound<T: redis::FromRedisValue>(
        &self,
        events: &[&str],
        build: impl Fn(&Bound) -> Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let mut bound = self.bound.read().expect("bound scripts lock").clone();
        for _ in 0..3 {
            let noscript = match build(&bound).query_async(&mut conn).await {
                Err(e) if answered(&e, "NOSCRIPT") => true,
                Err(e) if answered(&e, EPOCH_MISMATCH) => false,
                other => return other.map_err(map_err),
            };
            let held = if self.conn.is_cluster() {
                self.held_by_slots(events).await?
            } else {
                self.raw_epoch().await?
            };
            match held {
                Some(e) if e.starts_with(LOST_PREFIX) => {
                    return Err(StoreError::Lost(format!(
                        "the store is marked {e:?}: it will be rebuilt from the log"
                    )))
                }
                // The epoch changed back between the script and this read:
                // run again.
                Some(e) if !noscript && bound.epoch.as_deref() == Some(e.as_str()) => {}
                Some(e) if bound.epoch.as_deref() == Some(e.as_str()) => {
                    let marked = self.forget_epoch(&e, events).await?;
                    tracing::error!(
                        epoch = %e,
                        marked,
                        "the Redis server lost the scripts of its epoch: it restarted or failed over and may be behind the log; marked lost, to be rebuilt from the log"
                    );
                    return Err(StoreError::Lost(format!(
                        "the server still holds epoch {e} but not its scripts (a restart or a failover since): it will be rebuilt from the log"
                    )));
                }
                Some(e) => bound = Arc::new(Bound::new(Some(e))),
                None => {
                    self.load_bound(None).await?;
                    bound = Arc::new(Bound::new(None));
                }
            }
            *self.bound.write().expect("bound scripts lock") = bound.clone();
        }
        Err(StoreError::Unavailable(
            "the store's epoch changed three times during one call; retrying".into(),
        ))
    }

    /// The epoch marker as stored (a `lost:` marker included).
    async fn raw_epoch(&self) -> Result<Option<String>, StoreError> {
        let (epoch,): (Option<String>,) = self
            .query(redis::pipe().cmd("GET").arg(self.epoch_key()))
            .await?;
        Ok(epoch)
    }

    /// Marks `epoch` lost where it is still held: the store's marker, and
    /// on a cluster the markers of the slots of `events` too. True when
    /// the store's marker was changed.
    async fn forget_epoch(&self, epoch: &str, events: &[&str]) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(FORGET_EPOCH_LUA)
            .arg(1)
            .arg(self.epoch_key())
            .arg(epoch);
        if self.conn.is_cluster() {
            for ev in events {
                pipe.cmd("EVAL")
                    .arg(FORGET_EPOCH_LUA)
                    .arg(1)
                    .arg(self.epoch_key_of(ev))
                    .arg(epoch)
                    .ignore();
            }
        }
        let (marked,): (i64,) = self.query(&pipe).await?;
        Ok(marked == 1)
    }

    /// On a cluster, the epoch the slots of `events` hold, as
    /// [`RedisStore::raw_epoch`] says it for one server:
    /// - a slot marked `lost:`, or a slot without a marker while the store
    ///   holds an epoch (its node lost data: a replica promoted before it
    ///   got the marker), is the store lost (the store's marker is marked
    ///   lost too, so the next [`Store::epoch`] sends everyone to the
    ///   recovery);
    /// - slots that all hold one epoch hold that one; slots that hold
    ///   different ones are being written by a recovery: retry.
    async fn held_by_slots(&self, events: &[&str]) -> Result<Option<String>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.epoch_key());
        for ev in events {
            pipe.cmd("GET").arg(self.epoch_key_of(ev));
        }
        let markers: Vec<Option<String>> = self.query(&pipe).await?;
        let (store, slots) = markers.split_first().expect("the store's marker was read");
        let store_epoch = store.clone().filter(|e| !e.starts_with(LOST_PREFIX));
        if let Some(lost) = slots.iter().flatten().find(|e| e.starts_with(LOST_PREFIX)) {
            if let Some(e) = &store_epoch {
                self.forget_epoch(e, &[]).await?;
            }
            return Ok(Some(lost.clone()));
        }
        if let (Some(e), true) = (&store_epoch, slots.iter().any(Option::is_none)) {
            self.forget_epoch(e, &[]).await?;
            tracing::error!(
                epoch = %e,
                "a slot of the Redis Cluster holds no epoch marker while the store holds one: its node lost data (a failover to a replica that never had it); marked lost, to be rebuilt from the log"
            );
            return Ok(Some(format!("{LOST_PREFIX}{e}")));
        }
        let mut held = slots.iter().flatten();
        match held.next() {
            None => Ok(store.clone().filter(|e| e.starts_with(LOST_PREFIX))),
            Some(first) if held.all(|e| e == first) => Ok(Some(first.clone())),
            Some(_) => Err(StoreError::Unavailable(
                "the cluster's slots hold different epochs: a recovery is writing them; retrying"
                    .into(),
            )),
        }
    }

    /// Deletes every dedup record of `event` an earlier version kept as a
    /// string key (stale ones included), in fenced calls (the restore
    /// deletes the hashes). Recovery only: a rebuild marks the store `lost:` first
    /// ([`Store::begin_rebuild`]) and every deciding script checks the
    /// epoch, so no record appears while this scans.
    async fn purge_records(&self, event: &str, owner: &str) -> Result<(), StoreError> {
        let pattern = format!("{}*", glob_escape(&legacy_record_key_prefix(event)));
        let mut cursor: u64 = 0;
        loop {
            // On a cluster, the SCAN runs on the master of the event's slot.
            let ((next, keys),): ((u64, Vec<String>),) = self
                .conn
                .query_on_slot_of(
                    &event_key(event),
                    redis::pipe()
                        .cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await
                .map_err(map_err)?;
            let deletes: Vec<Vec<String>> = keys
                .chunks(FENCED_ARGS_PER_COMMAND)
                .map(|chunk| command("DEL", chunk.iter().cloned()))
                .collect();
            self.fenced(owner, Some(event), &deletes).await?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await.map_err(map_err)
    }

    /// Runs [`DEFINE_LUA`] (`generation` 0: claim the next one) on every
    /// bucket of the event, bucket 0 last. With K > 1 the generation is
    /// claimed first (bucket 0 keeps the claims), so every bucket gets the
    /// same one. The buckets are defined one script call each (a cluster has
    /// no atomic step over several slots): a decision that meets two
    /// generations, or buckets of which some are defined and some not,
    /// decides nothing and is retried. Buckets a smaller K leaves behind are
    /// told the new K, so a caller still routing by the old one is refused
    /// there (and re-reads it) instead of deciding in a void bucket.
    async fn define(
        &self,
        event_id: &str,
        spec: EventSpec,
        generation: u64,
    ) -> Result<Defined, StoreError> {
        spec.validate().map_err(StoreError::Invalid)?;
        let k = spec.stock_buckets;
        let generation = if k > 1 && generation == 0 {
            self.claim_generation(event_id).await?
        } else {
            generation
        };
        let (old_k,): (Option<u32>,) = self
            .query(
                redis::pipe()
                    .cmd("HGET")
                    .arg(event_key(event_id))
                    .arg("buckets"),
            )
            .await?;
        let old_k = old_k.unwrap_or(1);
        let tags: Vec<String> = (0..k)
            .map(|b| buckets::tag(event_id, b).into_owned())
            .collect();
        // Bucket 0 last, in a round trip of its own: it is what makes the
        // event known (the api's check, `event`), so no request is accepted
        // for a bucket not yet defined, and a definition that fails half-way
        // leaves the event unknown (or at its old generation), never half
        // known.
        let mut replies: Vec<Vec<i64>> = Vec::with_capacity(tags.len());
        if k > 1 {
            let rest: Vec<Vec<i64>> = self
                .define_buckets(event_id, spec, generation, &tags, 1..k)
                .await?;
            let first: Vec<Vec<i64>> = self
                .define_buckets(event_id, spec, generation, &tags, 0..1)
                .await?;
            replies.extend(first);
            replies.extend(rest);
        } else {
            replies = self
                .define_buckets(event_id, spec, generation, &tags, 0..k)
                .await?;
        }
        let mut states = Vec::with_capacity(replies.len());
        let mut first = None;
        for reply in replies {
            let [existed, applied, generation, stock, remaining, limit, window, released, claimed] =
                reply[..]
            else {
                return Err(StoreError::Protocol(format!(
                    "define reply of {} integers",
                    reply.len()
                )));
            };
            first.get_or_insert((existed, applied));
            states.push(EventState {
                event_id: event_id.to_string(),
                stock: stock as u32,
                per_user_limit: limit as u32,
                remaining: remaining as u32,
                generation: generation as u64,
                claim_window_us: window as u64,
                released: released as u32,
                claimed: claimed as u32,
                stock_buckets: k,
            });
        }
        let (existed, applied) = first.unwrap_or((0, 0));
        if states.iter().any(|s| s.generation != states[0].generation) {
            // Another definition raced this one over the buckets.
            self.forget_buckets(event_id);
            return Err(StoreError::Unavailable(format!(
                "event {event_id}: another definition is being applied to its buckets; retry"
            )));
        }
        let mut state = buckets::sum_states(states)
            .ok_or_else(|| StoreError::Protocol("no define reply".into()))?;
        if applied == 1 {
            if old_k > k {
                let mut pipe = redis::pipe();
                for b in k..old_k {
                    pipe.cmd("HSET")
                        .arg(event_key(&buckets::tag(event_id, b)))
                        .arg("buckets")
                        .arg(k)
                        .ignore();
                }
                self.query::<()>(&pipe).await?;
            }
            self.remember_buckets(event_id, k);
        } else {
            // A newer definition is live: its bucket count is bucket 0's.
            self.forget_buckets(event_id);
            if let Some(live) = self.event(event_id).await? {
                state = live;
            }
        }
        Ok(Defined {
            state,
            applied: applied == 1,
            created: applied == 1 && existed == 0,
        })
    }

    /// Runs [`DEFINE_LUA`] on the buckets `which` of the event (one script
    /// call each, in one round trip) and adds it to the events set.
    async fn define_buckets(
        &self,
        event_id: &str,
        spec: EventSpec,
        generation: u64,
        tags: &[String],
        which: std::ops::Range<u32>,
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        let k = spec.stock_buckets;
        let mine: Vec<(u32, &String)> = which.map(|b| (b, &tags[b as usize])).collect();
        let tag_refs: Vec<&str> = mine.iter().map(|(_, t)| t.as_str()).collect();
        self.query_bound(&tag_refs, |b| {
            let mut pipe = redis::pipe();
            for &(bucket, ev) in &mine {
                pipe.cmd("EVALSHA")
                    .arg(&b.define)
                    .arg(12)
                    .arg(event_key(ev))
                    .arg(holders_key(ev))
                    .arg(coupons_key(ev))
                    .arg(logged_key(ev))
                    .arg(free_key(ev))
                    .arg(claimed_key(ev))
                    .arg(holds_key(ev))
                    .arg(due_key(ev))
                    .arg(old_free_key(ev))
                    .arg(dedup_key(ev))
                    .arg(old_dedup_key(ev))
                    .arg(self.epoch_key_of(ev))
                    .arg(buckets::bucket_stock(spec.stock, k, bucket))
                    .arg(spec.per_user_limit)
                    .arg(generation)
                    .arg(spec.claim_window_us)
                    .arg(k)
                    .arg(bucket)
                    .arg(b.tag());
            }
            pipe.cmd("SADD").arg(EVENTS_KEY).arg(event_id).ignore();
            pipe
        })
        .await
    }

    /// Runs `commands` (each a command and its arguments) through the
    /// fenced script, refusing them all unless `owner` holds the recovery
    /// lock and the store has no epoch. Commands run in order, in calls of
    /// [`FENCED_COMMANDS_PER_CALL`], each call fenced on its own: once the
    /// fence fails, every later call fails too.
    ///
    /// On a cluster, commands on the keys of `event` (all on its slot) are
    /// fenced by the slot's epoch marker, in the same atomic step, and by
    /// the lock, checked before each round trip (the lock is on another
    /// slot); `None`: commands on the store's own keys (its marker and
    /// lock), fenced by both atomically as on one server.
    async fn fenced(
        &self,
        owner: &str,
        event: Option<&str>,
        commands: &[Vec<String>],
    ) -> Result<(), StoreError> {
        let slot = event.filter(|_| self.conn.is_cluster());
        for calls in commands.chunks(FENCED_COMMANDS_PER_CALL * FENCED_CALLS_PER_ROUND_TRIP) {
            let mut pipe = redis::pipe();
            if let Some(ev) = slot {
                self.check_lock(owner).await?;
                for call in calls.chunks(FENCED_COMMANDS_PER_CALL) {
                    let cmd = pipe
                        .cmd("EVALSHA")
                        .arg(&self.slot_fenced_sha)
                        .arg(1)
                        .arg(self.epoch_key_of(ev))
                        .arg(owner);
                    for c in call {
                        cmd.arg(c.len()).arg(c);
                    }
                }
            } else {
                for call in calls.chunks(FENCED_COMMANDS_PER_CALL) {
                    let cmd = pipe
                        .cmd("EVALSHA")
                        .arg(&self.fenced_sha)
                        .arg(2)
                        .arg(self.recovery_key())
                        .arg(self.epoch_key())
                        .arg(owner);
                    for c in call {
                        cmd.arg(c.len()).arg(c);
                    }
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

    /// Refuses ([`StoreError::Fenced`]) unless `owner` holds the recovery
    /// lock.
    async fn check_lock(&self, owner: &str) -> Result<(), StoreError> {
        let (holder,): (Option<String>,) = self
            .query(redis::pipe().cmd("GET").arg(self.recovery_key()))
            .await?;
        if holder.as_deref() == Some(owner) {
            Ok(())
        } else {
            Err(StoreError::Fenced(format!(
                "{owner} no longer holds the recovery lock"
            )))
        }
    }

    /// On a cluster, sets every slot's epoch marker to `value`,
    /// [`SLOT_MARKERS_PER_ROUND_TRIP`] slots at a time, the lock checked
    /// before each round trip. An epoch is fenced per slot as
    /// [`RedisStore::fenced`] says (refused where a slot holds one); a
    /// `lost:` marker is written over whatever a slot holds: after a
    /// failover the slots of the masters that did not fail still hold the
    /// old epoch, and marking a slot lost only stops deciding there (a
    /// stray mark sends everyone to a recovery, see
    /// [`RedisStore::held_by_slots`]), it never lets a stale state decide.
    async fn set_slot_markers(&self, owner: &str, value: &str) -> Result<(), StoreError> {
        let mut tags: Vec<&String> = slot_tags().values().collect();
        tags.sort();
        for chunk in tags.chunks(SLOT_MARKERS_PER_ROUND_TRIP) {
            self.check_lock(owner).await?;
            let mut pipe = redis::pipe();
            if value.starts_with(LOST_PREFIX) {
                for tag in chunk {
                    pipe.cmd("SET").arg(slot_marker(tag)).arg(value).ignore();
                }
                self.query::<()>(&pipe).await?;
                continue;
            }
            for tag in chunk {
                let marker = slot_marker(tag);
                pipe.cmd("EVALSHA")
                    .arg(&self.slot_fenced_sha)
                    .arg(1)
                    .arg(&marker)
                    .arg(owner)
                    .arg(3)
                    .arg("SET")
                    .arg(&marker)
                    .arg(value);
            }
            let replies: Vec<i64> = self.query_scripts(&pipe).await?;
            if replies.iter().any(|r| *r != 1) {
                return Err(StoreError::Fenced(
                    "a slot of the cluster already has its epoch: another process finished the rebuild"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Remembers that `event` has `k` buckets (bounded: forgetting costs a
    /// read).
    fn remember_buckets(&self, event: &str, k: u32) {
        let mut counts = self.bucket_counts.lock().expect("bucket counts lock");
        if counts.get(event) != Some(&k) {
            if counts.len() >= LAYOUT2_REMEMBERED {
                counts.clear();
            }
            counts.insert(event.to_string(), k);
        }
    }

    fn forget_buckets(&self, event: &str) {
        self.bucket_counts
            .lock()
            .expect("bucket counts lock")
            .remove(event);
    }

    /// The bucket count of each event (1 for an unknown one): remembered,
    /// or read in one round trip for those not remembered. An unknown event's
    /// 1 is not remembered: it may yet be defined with more.
    async fn bucket_counts(&self, events: &[&str]) -> Result<Vec<u32>, StoreError> {
        let mut counts: Vec<Option<u32>> = {
            let known = self.bucket_counts.lock().expect("bucket counts lock");
            events.iter().map(|e| known.get(*e).copied()).collect()
        };
        let missing: Vec<usize> = (0..events.len()).filter(|i| counts[*i].is_none()).collect();
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for i in &missing {
                pipe.cmd("HMGET")
                    .arg(event_key(events[*i]))
                    .arg("stock")
                    .arg("buckets");
            }
            let read: Vec<(Option<u32>, Option<u32>)> = self.query(&pipe).await?;
            for (i, (stock, k)) in missing.into_iter().zip(read) {
                let k = k.unwrap_or(1).max(1);
                if stock.is_some() {
                    self.remember_buckets(events[i], k);
                }
                counts[i] = Some(k);
            }
        }
        Ok(counts.into_iter().map(|k| k.unwrap_or(1)).collect())
    }

    /// The hash tags of every bucket of `event`, bucket 0 first.
    async fn tags_of(&self, event: &str) -> Result<Vec<String>, StoreError> {
        let k = self.bucket_counts(&[event]).await?[0];
        Ok((0..k)
            .map(|b| buckets::tag(event, b).into_owned())
            .collect())
    }

    /// The hash tags of every bucket of every one of `events`, each with
    /// its event.
    async fn tags_of_all<'a>(
        &self,
        events: &'a [String],
    ) -> Result<Vec<(&'a str, String)>, StoreError> {
        let refs: Vec<&str> = events.iter().map(String::as_str).collect();
        let counts = self.bucket_counts(&refs).await?;
        Ok(refs
            .into_iter()
            .zip(counts)
            .flat_map(|(e, k)| (0..k).map(move |b| (e, buckets::tag(e, b).into_owned())))
            .collect())
    }

    /// Remembers that `event` has layout 2 (bounded: forgetting costs one
    /// call that passes the old keys).
    fn learn_layout2(&self, event: &str) {
        let mut layout2 = self.layout2.lock().expect("layout lock");
        if !layout2.contains(event) {
            if layout2.len() >= LAYOUT2_REMEMBERED {
                layout2.clear();
            }
            layout2.insert(event.to_string());
        }
    }

    /// The dedup record of `request_id`, if any, with the event's
    /// generation: one atomic read of the event, both hashes and the old
    /// key (newest first).
    async fn record(
        &self,
        event_id: &str,
        request_id: &Uuid,
    ) -> Result<(Option<u64>, Option<String>), StoreError> {
        let id = request_id.to_string();
        let (generation, current, old, legacy): (
            Option<u64>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = self
            .query(
                redis::pipe()
                    .atomic()
                    .cmd("HGET")
                    .arg(event_key(event_id))
                    .arg("generation")
                    .cmd("HGET")
                    .arg(dedup_key(event_id))
                    .arg(&id)
                    .cmd("HGET")
                    .arg(old_dedup_key(event_id))
                    .arg(&id)
                    .cmd("GET")
                    .arg(legacy_record_key(event_id, request_id)),
            )
            .await?;
        Ok((generation, current.or(old).or(legacy)))
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
    /// One bucket's ledger (`tag` the bucket's), read atomically.
    async fn bucket_ledger(&self, event_id: &str, tag: &str) -> Result<Option<Ledger>, StoreError> {
        let (fields, coupons, holders, free, holds): LedgerReply = self
            .query(
                redis::pipe()
                    .atomic()
                    .cmd("HMGET")
                    .arg(event_key(tag))
                    .arg(&STATE_FIELDS)
                    .cmd("HGETALL")
                    .arg(coupons_key(tag))
                    .cmd("HGETALL")
                    .arg(holders_key(tag))
                    .cmd("ZRANGE")
                    .arg(free_key(tag))
                    .arg(0)
                    .arg(-1)
                    .cmd("HGETALL")
                    .arg(holds_key(tag)),
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
        let mut holds = holds
            .into_iter()
            .map(|(id, value)| {
                Uuid::parse_str(&id)
                    .ok()
                    .and_then(|id| parse_hold(id, &value))
                    .ok_or_else(|| {
                        StoreError::Protocol(format!("hold {id} of {event_id}: {value:?}"))
                    })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        holds.sort_by_key(|h| h.request_id);
        Ok(Some(Ledger {
            state,
            coupons,
            holders,
            free_ranks: free,
            holds,
        }))
    }

    /// Decides batches of one bucket each (`event_id` the bucket's tag),
    /// routed with the bucket count given with each, in one round trip.
    async fn decide_units(
        &self,
        units: &[(Cow<'_, EventBatch>, u32)],
        now_micros: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError> {
        let batches: Vec<&EventBatch> = units.iter().map(|(b, _)| b.as_ref()).collect();
        // One EVALSHA per call of one event (its actions, then its requests,
        // MAX_REQUESTS_PER_CALL items per call: a batch of that size or less
        // is one atomic step); the whole batch is one pipeline.
        let calls_per_batch: Vec<Vec<(usize, usize, usize, usize)>> =
            batches.iter().map(|b| calls(b)).collect();
        if calls_per_batch.iter().all(Vec::is_empty) {
            return Ok(batches
                .iter()
                .map(|_| BatchVerdict::Decided {
                    generation: 0,
                    decisions: Vec::new(),
                    holds: Vec::new(),
                    claim_window_us: 0,
                })
                .collect());
        }
        // The old keys of the dedup records are passed for every event not
        // known to have layout 2 (see the module doc).
        let legacy: Vec<bool> = {
            let layout2 = self.layout2.lock().expect("layout lock");
            batches
                .iter()
                .map(|b| !layout2.contains(&b.event_id))
                .collect()
        };
        let build = |b: &Bound| {
            let mut pipe = redis::pipe();
            for (((batch, calls), &legacy), (_, k)) in
                batches.iter().zip(&calls_per_batch).zip(&legacy).zip(units)
            {
                let ev = &batch.event_id;
                for &(a0, a1, r0, r1) in calls {
                    let actions = &batch.actions[a0..a1];
                    let requests = &batch.requests[r0..r1];
                    let cmd = pipe
                        .cmd("EVALSHA")
                        .arg(&b.decide)
                        .arg(10 + if legacy { requests.len() } else { 0 })
                        .arg(event_key(ev))
                        .arg(holders_key(ev))
                        .arg(coupons_key(ev))
                        .arg(free_key(ev))
                        .arg(holds_key(ev))
                        .arg(due_key(ev))
                        .arg(old_free_key(ev))
                        .arg(dedup_key(ev))
                        .arg(old_dedup_key(ev));
                    if legacy {
                        for p in requests {
                            cmd.arg(legacy_record_key(ev, &p.request_id));
                        }
                    }
                    cmd.arg(self.epoch_key_of(ev));
                    cmd.arg(now_micros)
                        .arg(self.dedup_retention_secs)
                        .arg(actions.len())
                        .arg(u8::from(legacy))
                        .arg(*k);
                    for a in actions {
                        cmd.arg(a.request_id.to_string())
                            .arg(&a.user_id)
                            .arg(verb_code(a.verb))
                            .arg(a.at);
                    }
                    for p in requests {
                        cmd.arg(p.request_id.to_string()).arg(&p.user_id);
                    }
                    cmd.arg(b.tag());
                }
            }
            pipe
        };
        let events: Vec<&str> = batches.iter().map(|b| b.event_id.as_str()).collect();
        let replies: Vec<Vec<i64>> = self.query_bound(&events, build).await?;
        let mut replies = replies.into_iter();
        let mut verdicts = Vec::with_capacity(batches.len());
        let mut layout_wrong = None;
        let mut redefined = None;
        for (batch, calls) in batches.iter().zip(&calls_per_batch) {
            let mut decisions = Vec::with_capacity(batch.requests.len());
            let mut holds = Vec::with_capacity(batch.actions.len());
            let mut unknown = false;
            let mut generation = 0;
            let mut claim_window_us = 0;
            for _ in calls {
                let reply = replies
                    .next()
                    .ok_or_else(|| StoreError::Protocol("missing script reply".into()))?;
                if reply.first() == Some(&-1) {
                    unknown = true;
                    continue;
                }
                if reply.first() == Some(&-3) {
                    redefined = Some(buckets::event_of(&batch.event_id).to_string());
                    continue;
                }
                if reply.first() == Some(&-2) {
                    layout_wrong = Some(batch.event_id.clone());
                    continue;
                }
                let bad =
                    || StoreError::Protocol(format!("decide reply of {} integers", reply.len()));
                let [g, window, m, layout, rest @ ..] = &reply[..] else {
                    return Err(bad());
                };
                if *layout >= 2 {
                    self.learn_layout2(&batch.event_id);
                }
                let m = usize::try_from(*m).map_err(|_| bad())?;
                if rest.len() % 5 != 0 || rest.len() / 5 < m {
                    return Err(bad());
                }
                generation = *g as u64;
                claim_window_us = *window as u64;
                let (ends, decided) = rest.split_at(m * 5);
                for e in ends.chunks_exact(5) {
                    holds.push(match e[0] {
                        0 => None,
                        code => Some(HoldEnd {
                            state: hold_state_from_code(code).ok_or_else(|| {
                                StoreError::Protocol(format!("hold state code {code}"))
                            })?,
                            rank: e[1] as u32,
                            decided_at: e[2] as u64,
                            replay: e[3] == 1,
                            seq: e[4] as u64,
                        }),
                    });
                }
                for d in decided.chunks_exact(5) {
                    let result = result_from_code(d[0])
                        .ok_or_else(|| StoreError::Protocol(format!("result code {}", d[0])))?;
                    decisions.push(Decision {
                        result,
                        issued_rank: (result == DecisionResult::Issued).then_some(d[1] as u32),
                        decided_at: d[2] as u64,
                        replay: d[3] == 1,
                        seq: d[4] as u64,
                        logged: false,
                    });
                }
            }
            verdicts.push(if unknown {
                BatchVerdict::UnknownEvent
            } else {
                BatchVerdict::Decided {
                    generation,
                    decisions,
                    holds,
                    claim_window_us,
                }
            });
        }
        if let Some(event) = redefined {
            // Routed by a bucket count the event no longer has: that bucket
            // decided nothing; the others' calls ran and are replayed.
            self.forget_buckets(&event);
            return Err(StoreError::Unavailable(format!(
                "event {event} was redefined with another bucket count: its requests were routed \
                 by the old one, so nothing of it was decided; retry"
            )));
        }
        if let Some(event) = layout_wrong {
            // Only a store written by another version gets here; the calls
            // of the other events ran, so a retry replays them.
            self.layout2.lock().expect("layout lock").remove(&event);
            return Err(StoreError::Unavailable(format!(
                "event {event} may keep dedup records as an earlier version did: nothing of it \
                 was decided; retry (its old keys are passed from now on)"
            )));
        }
        Ok(verdicts)
    }
}

/// One bucket's ledger as read: the event hash's state fields, coupons,
/// holders, free ranks and holds.
type LedgerReply = (
    Vec<Option<String>>,
    Vec<(u32, String)>,
    Vec<(String, u32)>,
    Vec<u32>,
    Vec<(String, String)>,
);

/// Whether Redis answered the error `code`, alone or inside a pipeline's
/// failure (which wraps the commands' own errors).
fn answered(e: &RedisError, code: &str) -> bool {
    e.code() == Some(code) || e.to_string().contains(code)
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

const STATE_FIELDS: [&str; 8] = [
    "stock",
    "remaining",
    "per_user_limit",
    "generation",
    "claim_window",
    "released",
    "claimed",
    "buckets",
];

fn parse_state(
    event_id: &str,
    fields: &[Option<String>],
) -> Result<Option<EventState>, StoreError> {
    let [stock, remaining, limit, generation, window, released, claimed, buckets] = fields else {
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
        claim_window_us: num("claim_window", window)?,
        released: num("released", released)? as u32,
        claimed: num("claimed", claimed)? as u32,
        stock_buckets: buckets
            .as_deref()
            .map_or(Ok(1), |_| num("buckets", buckets))? as u32,
    }))
}

/// The decision in `record` if it belongs to `generation`.
fn current(record: &str, generation: u64) -> Option<Decision> {
    parse_record(record).and_then(|(g, d)| (g == generation).then_some(d))
}

/// The script calls of one event's batch: ranges of its actions and of its
/// requests, `(a0, a1, r0, r1)`, actions first, at most
/// [`MAX_REQUESTS_PER_CALL`] items per call.
fn calls(batch: &EventBatch) -> Vec<(usize, usize, usize, usize)> {
    let (na, nr) = (batch.actions.len(), batch.requests.len());
    let total = na + nr;
    (0..total)
        .step_by(MAX_REQUESTS_PER_CALL)
        .map(|start| {
            let end = (start + MAX_REQUESTS_PER_CALL).min(total);
            (
                start.min(na),
                end.min(na),
                start.saturating_sub(na),
                end.saturating_sub(na),
            )
        })
        .collect()
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
            .query_bound(&[event_id], |b| {
                let mut pipe = redis::pipe();
                pipe.cmd("EVALSHA")
                    .arg(&b.claim)
                    .arg(3)
                    .arg(event_key(event_id))
                    .arg(claimed_key(event_id))
                    .arg(self.epoch_key_of(event_id))
                    .arg(b.tag());
                pipe
            })
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

    /// A bucketed event's counters are its buckets' summed.
    async fn event(&self, event_id: &str) -> Result<Option<EventState>, StoreError> {
        let (fields,): (Vec<Option<String>>,) = self
            .query(
                redis::pipe()
                    .cmd("HMGET")
                    .arg(event_key(event_id))
                    .arg(&STATE_FIELDS),
            )
            .await?;
        let Some(first) = parse_state(event_id, &fields)? else {
            return Ok(None);
        };
        let k = first.buckets();
        self.remember_buckets(event_id, k);
        if k == 1 {
            return Ok(Some(first));
        }
        let mut pipe = redis::pipe();
        for b in 1..k {
            pipe.cmd("HMGET")
                .arg(event_key(&buckets::tag(event_id, b)))
                .arg(&STATE_FIELDS);
        }
        let rest: Vec<Vec<Option<String>>> = self.query(&pipe).await?;
        let mut states = vec![first];
        for fields in rest {
            states.extend(parse_state(event_id, &fields)?);
        }
        // A sum over buckets of two definitions (one being applied) would be
        // neither; `restate` would publish it to the log.
        if states.len() != k as usize
            || states
                .iter()
                .any(|s| s.generation != states[0].generation || s.buckets() != k)
        {
            self.forget_buckets(event_id);
            return Err(StoreError::Unavailable(format!(
                "event {event_id}: a definition is being applied to its buckets; retry"
            )));
        }
        Ok(buckets::sum_states(states))
    }

    /// A bucketed event's batch is split by user into one share per bucket
    /// (one script call each, in the same pipeline) and merged back.
    async fn decide(
        &self,
        batches: &[EventBatch],
        now_micros: u64,
    ) -> Result<Vec<BatchVerdict>, StoreError> {
        let events: Vec<&str> = batches.iter().map(|b| b.event_id.as_str()).collect();
        let counts = self.bucket_counts(&events).await?;
        let mut units: Vec<(Cow<'_, EventBatch>, u32)> = Vec::with_capacity(batches.len());
        let mut plans: Vec<Option<Vec<buckets::Share>>> = Vec::with_capacity(batches.len());
        for (batch, &k) in batches.iter().zip(&counts) {
            if k == 1 {
                units.push((Cow::Borrowed(batch), 1));
                plans.push(None);
                continue;
            }
            let shares = buckets::split(batch, k);
            for share in &shares {
                let mut unit = share.batch.clone();
                unit.event_id = buckets::tag(&batch.event_id, share.bucket).into_owned();
                units.push((Cow::Owned(unit), k));
            }
            plans.push(Some(shares));
        }
        let mut verdicts = self.decide_units(&units, now_micros).await?.into_iter();
        let mut out = Vec::with_capacity(batches.len());
        for (batch, plan) in batches.iter().zip(plans) {
            let Some(shares) = plan else {
                out.push(
                    verdicts
                        .next()
                        .ok_or_else(|| StoreError::Protocol("missing verdict".into()))?,
                );
                continue;
            };
            let mine: Vec<BatchVerdict> = verdicts.by_ref().take(shares.len()).collect();
            out.push(
                buckets::merge(&shares, mine, batch.actions.len(), batch.requests.len()).map_err(
                    |e| {
                        StoreError::Unavailable(format!(
                            "event {}: {e}; nothing to retract (decisions of an older generation \
                             are void, the others are replayed), retry",
                            batch.event_id
                        ))
                    },
                )?,
            );
        }
        Ok(out)
    }

    async fn decision(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<Decision>, StoreError> {
        // The request's user, and so its bucket, is not known: the bucket
        // holding its record is found first (one round trip), then read
        // atomically as an unbucketed event is.
        let tags = self.tags_of(event_id).await?;
        let tag = if tags.len() == 1 {
            tags[0].as_str()
        } else {
            let id = request_id.to_string();
            let mut pipe = redis::pipe();
            for t in &tags {
                pipe.cmd("HEXISTS").arg(dedup_key(t)).arg(&id);
                pipe.cmd("HEXISTS").arg(old_dedup_key(t)).arg(&id);
            }
            let found: Vec<bool> = self.query(&pipe).await?;
            match found.chunks(2).position(|f| f[0] || f[1]) {
                Some(b) => tags[b].as_str(),
                None => {
                    // Not found: perhaps in a bucket a remembered count is
                    // short of (redefined elsewhere); the next lookup reads it.
                    self.forget_buckets(event_id);
                    return Ok(None);
                }
            }
        };
        let (generation, record) = self.record(tag, &request_id).await?;
        match (generation, record) {
            (Some(g), Some(r)) => match current(&r, g) {
                Some(d) => Ok(Some(self.with_logged_mark(tag, d).await?)),
                None => Ok(None),
            },
            (_, None) => {
                // As above: the next lookup reads the bucket count again.
                self.forget_buckets(event_id);
                Ok(None)
            }
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
        let id = request_id.to_string();
        let tagged = self.tags_of_all(&events).await?;
        for chunk in tagged.chunks(256) {
            // Per event, as in `record`: the current hash before the old one,
            // so a turnover in between moves the record where it is read next.
            let mut pipe = redis::pipe();
            for (_, ev) in chunk {
                pipe.cmd("HGET").arg(event_key(ev)).arg("generation");
                pipe.cmd("HGET").arg(dedup_key(ev)).arg(&id);
                pipe.cmd("HGET").arg(old_dedup_key(ev)).arg(&id);
                pipe.cmd("GET").arg(legacy_record_key(ev, &request_id));
            }
            let replies: Vec<Option<String>> = self.query(&pipe).await?;
            for ((event, ev), four) in chunk.iter().zip(replies.chunks_exact(4)) {
                let record = four[1].as_ref().or(four[2].as_ref()).or(four[3].as_ref());
                if let (Some(g), Some(r)) = (&four[0], record) {
                    if let Some(d) = current(r, g.parse().unwrap_or(0)) {
                        return Ok(Some((
                            event.to_string(),
                            self.with_logged_mark(ev, d).await?,
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    /// A bucketed event's ledger is its buckets' merged (each read
    /// atomically; a drop still running may move between the reads).
    async fn ledger(&self, event_id: &str) -> Result<Option<Ledger>, StoreError> {
        let mut ledgers = Vec::new();
        for tag in self.tags_of(event_id).await? {
            match self.bucket_ledger(event_id, &tag).await? {
                Some(l) => ledgers.push(l),
                None if ledgers.is_empty() => return Ok(None),
                None => {}
            }
        }
        Ok(buckets::merge_ledgers(ledgers))
    }

    async fn hold(
        &self,
        event_id: &str,
        request_id: Uuid,
    ) -> Result<Option<HoldStatus>, StoreError> {
        let tags = self.tags_of(event_id).await?;
        let mut pipe = redis::pipe();
        for t in &tags {
            pipe.cmd("HGET")
                .arg(holds_key(t))
                .arg(request_id.to_string());
        }
        let records: Vec<Option<String>> = self.query(&pipe).await?;
        let Some((tag, record)) = tags
            .iter()
            .zip(records)
            .find_map(|(t, r)| Some((t.as_str(), r?)))
        else {
            return Ok(None);
        };
        let hold = parse_hold(request_id, &record).ok_or_else(|| {
            StoreError::Protocol(format!("hold {request_id} of {event_id}: {record:?}"))
        })?;
        let end_logged = if hold.end_seq == 0 {
            true
        } else {
            let (ranges,): (Vec<String>,) = self
                .query(
                    redis::pipe()
                        .cmd("ZRANGEBYSCORE")
                        .arg(logged_key(tag))
                        .arg(hold.end_seq.saturating_sub(MAX_LOGGED_RANGE))
                        .arg(hold.end_seq),
                )
                .await?;
            covered(hold.end_seq, &ranges)
        };
        Ok(Some(HoldStatus { hold, end_logged }))
    }

    async fn due_holds(&self, now: u64, limit: usize) -> Result<Vec<DueHold>, StoreError> {
        let (events,): (Vec<String>,) = self
            .query(redis::pipe().cmd("SMEMBERS").arg(EVENTS_KEY))
            .await?;
        let tagged = self.tags_of_all(&events).await?;
        let mut due = Vec::new();
        for chunk in tagged.chunks(256) {
            if due.len() >= limit {
                break;
            }
            let mut pipe = redis::pipe();
            for (_, ev) in chunk {
                pipe.cmd("ZRANGEBYSCORE")
                    .arg(due_key(ev))
                    .arg("-inf")
                    .arg(now)
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit);
            }
            let replies: Vec<Vec<(String, f64)>> = self.query(&pipe).await?;
            for ((event, ev), ids) in chunk.iter().zip(replies) {
                let ids: Vec<(String, u64)> = ids
                    .into_iter()
                    .take(limit - due.len())
                    .map(|(id, until)| (id, until as u64))
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let (records,): (Vec<Option<String>>,) = self
                    .query(
                        redis::pipe()
                            .cmd("HMGET")
                            .arg(holds_key(ev))
                            .arg(ids.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()),
                    )
                    .await?;
                for ((id, until), record) in ids.into_iter().zip(records) {
                    let Some(hold) = Uuid::parse_str(&id)
                        .ok()
                        .zip(record)
                        .and_then(|(id, r)| parse_hold(id, &r))
                    else {
                        continue;
                    };
                    if hold.state == HoldState::Held {
                        due.push(DueHold {
                            event_id: event.to_string(),
                            request_id: hold.request_id,
                            user_id: hold.user_id,
                            until,
                        });
                    }
                }
                if due.len() >= limit {
                    break;
                }
            }
        }
        Ok(due)
    }

    /// A bucketed event's numbers are marked in the bucket each belongs to
    /// (a number says its bucket, see [`buckets::owner`]).
    async fn mark_logged(&self, batches: &[LoggedDecisions]) -> Result<(), StoreError> {
        let names: Vec<&str> = batches.iter().map(|b| b.event_id.as_str()).collect();
        let counts = self.bucket_counts(&names).await?;
        let mut ranges: Vec<(String, u64, Vec<(u64, u64)>)> = Vec::new();
        for (batch, k) in batches.iter().zip(counts) {
            let seqs = batch.decisions.iter().map(|(_, seq)| *seq);
            if k == 1 {
                ranges.push((batch.event_id.clone(), batch.generation, seq_ranges(seqs)));
                continue;
            }
            let mut by_bucket: Vec<Vec<u64>> = vec![Vec::new(); k as usize];
            for seq in seqs.filter(|s| *s > 0) {
                by_bucket[buckets::owner(seq, k) as usize].push(seq);
            }
            for (b, seqs) in (0u32..).zip(by_bucket) {
                ranges.push((
                    buckets::tag(&batch.event_id, b).into_owned(),
                    batch.generation,
                    seq_ranges_by(seqs, u64::from(k)),
                ));
            }
        }
        ranges.retain(|(_, _, r)| !r.is_empty());
        if ranges.is_empty() {
            return Ok(());
        }
        let events: Vec<&str> = ranges.iter().map(|(t, _, _)| t.as_str()).collect();
        let () = self
            .query_bound(&events, |b| {
                let mut pipe = redis::pipe();
                for (ev, generation, ranges) in &ranges {
                    for chunk in ranges.chunks(MARK_LOGGED_RANGES_PER_CALL) {
                        let cmd = pipe
                            .cmd("EVALSHA")
                            .arg(&b.mark_logged)
                            .arg(3)
                            .arg(event_key(ev))
                            .arg(logged_key(ev))
                            .arg(self.epoch_key_of(ev))
                            .arg(generation);
                        for (lo, hi) in chunk {
                            cmd.arg(lo).arg(format!("{lo}-{hi}"));
                        }
                        cmd.arg(b.tag());
                        cmd.ignore();
                    }
                }
                pipe
            })
            .await?;
        Ok(())
    }

    async fn epoch(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .raw_epoch()
            .await?
            .filter(|e| !e.starts_with(LOST_PREFIX)))
    }

    /// On a cluster, every slot's marker is marked too (after the
    /// store's), so no script decides anything in any slot from then on.
    async fn begin_rebuild(&self, owner: &str) -> Result<(), StoreError> {
        let marker = format!("{LOST_PREFIX}rebuilding by {owner}");
        self.fenced(
            owner,
            None,
            &[command(
                "SET",
                [self.epoch_key().to_string(), marker.clone()],
            )],
        )
        .await?;
        if self.conn.is_cluster() {
            self.set_slot_markers(owner, &marker).await?;
        }
        Ok(())
    }

    /// Loads the scripts bound to `epoch` first, then writes it: a server
    /// that holds the epoch without its scripts has lost them since.
    async fn set_epoch(&self, epoch: &str, owner: &str) -> Result<(), StoreError> {
        if epoch.starts_with(LOST_PREFIX) {
            return Err(StoreError::Invalid(format!(
                "an epoch may not start with {LOST_PREFIX:?}"
            )));
        }
        self.load_bound(Some(epoch)).await?;
        // On a cluster the slots first, the store's marker last: whoever
        // sees the store's epoch finds every slot holding it.
        if self.conn.is_cluster() {
            self.set_slot_markers(owner, epoch).await?;
        }
        self.fenced(owner, None, &[command("SET", [self.epoch_key(), epoch])])
            .await?;
        *self.bound.write().expect("bound scripts lock") =
            Arc::new(Bound::new(Some(epoch.to_string())));
        Ok(())
    }

    async fn try_lock_recovery(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (reply,): (Option<String>,) = self
            .query(
                redis::pipe()
                    .cmd("SET")
                    .arg(self.recovery_key())
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
                    .arg(self.recovery_key())
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
                    .arg(self.recovery_key())
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
        let event_id = &snap.state.event_id;
        let k = snap.state.buckets();
        // Every key of a bucket under the bucket's own tag.
        let ev = &buckets::tag(event_id, snap.bucket).into_owned();
        let ttl = retention.as_secs().max(1).to_string();
        // A store that came back behind holds records the log does not:
        // they must not be replayed.
        self.purge_records(ev, owner).await?;
        let mut commands = vec![command(
            "DEL",
            [
                event_key(ev),
                holders_key(ev),
                coupons_key(ev),
                logged_key(ev),
                free_key(ev),
                old_free_key(ev),
                holds_key(ev),
                due_key(ev),
                dedup_key(ev),
                old_dedup_key(ev),
            ],
        )];
        let per = FENCED_ARGS_PER_COMMAND / 2;
        for chunk in snap.free_ranks.chunks(per) {
            commands.push(command(
                "ZADD",
                std::iter::once(free_key(ev))
                    .chain(chunk.iter().flat_map(|r| [r.to_string(), r.to_string()])),
            ));
        }
        for chunk in snap.holds.chunks(per) {
            commands.push(command(
                "HSET",
                std::iter::once(holds_key(ev)).chain(
                    chunk
                        .iter()
                        .flat_map(|h| [h.request_id.to_string(), encode_hold(h)]),
                ),
            ));
        }
        let held: Vec<&Hold> = snap
            .holds
            .iter()
            .filter(|h| h.state == HoldState::Held)
            .collect();
        for chunk in held.chunks(per) {
            commands.push(command(
                "ZADD",
                std::iter::once(due_key(ev)).chain(
                    chunk
                        .iter()
                        .flat_map(|h| [h.until.to_string(), h.request_id.to_string()]),
                ),
            ));
        }
        // Every restored decision and hold end is in the log: logged.
        let ranges = seq_ranges_by(
            snap.decided
                .iter()
                .map(|d| d.decision.seq)
                .chain(snap.holds.iter().map(|h| h.end_seq)),
            u64::from(k),
        );
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
        // The log's records in the current hash, which lives the retention
        // from now (its window starts at the event's next decision).
        for chunk in snap.decided.chunks(per) {
            commands.push(command(
                "HSET",
                std::iter::once(dedup_key(ev)).chain(chunk.iter().flat_map(|d| {
                    [
                        d.request_id.to_string(),
                        encode_record(snap.state.generation, &d.decision, &d.user_id),
                    ]
                })),
            ));
        }
        if !snap.decided.is_empty() {
            commands.push(command("EXPIRE", [dedup_key(ev), ttl]));
        }
        // A generation the log holds is never claimed again, even if the
        // store came back behind the claim.
        let (claimed,): (Option<u64>,) = self
            .query(redis::pipe().cmd("GET").arg(claimed_key(ev)))
            .await?;
        if claimed.unwrap_or(0) < snap.state.generation {
            commands.push(command(
                "SET",
                [claimed_key(ev), snap.state.generation.to_string()],
            ));
        }
        // The event hash last: until it exists, the event is unknown and
        // nothing is decided against a half-restored state.
        let s = &snap.state;
        if k > 1 {
            commands.push(command(
                "HSET",
                [
                    event_key(ev),
                    "buckets".into(),
                    k.to_string(),
                    "bucket".into(),
                    snap.bucket.to_string(),
                ],
            ));
        }
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
                "claim_window".into(),
                s.claim_window_us.to_string(),
                "released".into(),
                s.released.to_string(),
                "claimed".into(),
                s.claimed.to_string(),
                "layout".into(),
                "2".into(),
            ],
        ));
        if self.conn.is_cluster() {
            // The set of events is on a slot of its own: added to once the
            // event is restored (an id in it that is not restored is only
            // looked up in vain).
            self.fenced(owner, Some(ev), &commands).await?;
            let () = self
                .query(
                    redis::pipe()
                        .cmd("SADD")
                        .arg(EVENTS_KEY)
                        .arg(event_id)
                        .ignore(),
                )
                .await?;
        } else {
            commands.push(command("SADD", [EVENTS_KEY.to_string(), event_id.clone()]));
            self.fenced(owner, Some(ev), &commands).await?;
        }
        self.remember_buckets(event_id, k);
        Ok(())
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
