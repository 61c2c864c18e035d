//! The Redis waiting room: a counter and a sorted set per room.
//!
//! A join takes the next value of the room's counter as its position and
//! adds the ticket to the room's sorted set with that score, so the people
//! ahead are its `ZRANK` (O(log n)); the admitter pops the lowest scores.
//! Every transition is one Lua call (`line.lua`), atomic in Redis, so any
//! number of api processes may join, poll and gate one room, and the
//! admission round (expire, count free slots, pop, admit) cannot interleave
//! with another.
//!
//! Keys of a room share the hash tag `{E}`: `cr:line:{E}:room` (policy,
//! counters, measured rate), `cr:line:{E}:wait` (waiting tickets by
//! position), `cr:line:{E}:active` (admitted tickets by deadline) and
//! `cr:line:{E}:t:<ticket>` (one ticket, kept for [`TICKET_KEEP`]).

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use uuid::Uuid;

use crate::redis_conn::{ConnectError, RedisConn};

use super::{
    Admission, AdmitRound, Line, LineError, RoomPolicy, RoomStats, Ticket, TicketState,
    TicketStatus, MAX_WAITING,
};

/// The scripts, split on their `--! name` lines.
pub const LINE_LUA: &str = include_str!("line.lua");

/// How long a ticket's record is kept after it joined.
pub const TICKET_KEEP: Duration = Duration::from_secs(24 * 3600);

/// Waiting tickets one admission round looks at, at most: bounds the time
/// one Lua call holds Redis when many lapsed tickets are at the head.
pub const MAX_SCAN_PER_ROUND: u32 = 5_000;

fn script(name: &str) -> Script {
    let marker = format!("--! {name}\n");
    let start = LINE_LUA
        .find(&marker)
        .unwrap_or_else(|| panic!("line.lua has a {name} script"))
        + marker.len();
    let rest = &LINE_LUA[start..];
    let end = rest.find("--! ").unwrap_or(rest.len());
    Script::new(&rest[..end])
}

/// The Redis backend of [`Line`].
#[derive(Clone)]
pub struct RedisLine {
    conn: RedisConn,
    join: Script,
    poll: Script,
    finish: Script,
    admit: Script,
}

fn unavailable(e: redis::RedisError) -> LineError {
    LineError::Unavailable {
        backend: "redis",
        detail: e.to_string(),
    }
}

fn room_key(event: &str) -> String {
    format!("cr:line:{{{event}}}:room")
}
fn wait_key(event: &str) -> String {
    format!("cr:line:{{{event}}}:wait")
}
fn active_key(event: &str) -> String {
    format!("cr:line:{{{event}}}:active")
}
fn ticket_prefix(event: &str) -> String {
    format!("cr:line:{{{event}}}:t:")
}
fn ticket_key(event: &str, ticket: Uuid) -> String {
    format!("{}{}", ticket_prefix(event), ticket.simple())
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or(0)
}

fn opt_num(s: &str) -> Option<u64> {
    s.parse().ok()
}

impl RedisLine {
    /// Connects to `url` (`redis://host:port/db`, or
    /// `redis+cluster://host:port,…`: a room's keys share its hash tag, so
    /// every script call stays on one slot).
    pub async fn connect(url: &str) -> Result<Self, LineError> {
        let conn = RedisConn::connect(url).await.map_err(|e| match e {
            ConnectError::Invalid { .. } => LineError::Invalid(e.to_string()),
            ConnectError::Unreachable { source, .. } => unavailable(source),
        })?;
        Ok(Self {
            conn,
            join: script("join"),
            poll: script("poll"),
            finish: script("finish"),
            admit: script("admit"),
        })
    }

    async fn poll_or_leave(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
        leave: bool,
    ) -> Result<Option<TicketStatus>, LineError> {
        let mut conn = self.conn.clone();
        let r: Vec<String> = self
            .poll
            .key(room_key(event_id))
            .key(wait_key(event_id))
            .key(active_key(event_id))
            .key(ticket_key(event_id, ticket_id))
            .arg(ticket_id.simple().to_string())
            .arg(user_id)
            .arg(now)
            .arg(if leave { "0" } else { "1" })
            .arg(if leave { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if r.first().map(String::as_str) == Some("none") {
            return Ok(None);
        }
        let state = TicketState::parse(&r[0]).ok_or_else(|| LineError::Unavailable {
            backend: "redis",
            detail: format!("unknown ticket state {:?}", r[0]),
        })?;
        Ok(Some(TicketStatus {
            ticket_id,
            position: num(&r[1]),
            state,
            ahead: num(&r[2]),
            admitted_at: opt_num(&r[3]),
            admit_deadline: opt_num(&r[4]),
        }))
    }
}

#[async_trait]
impl Line for RedisLine {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn open(&self, event_id: &str, policy: &RoomPolicy) -> Result<(), LineError> {
        policy.validate().map_err(LineError::Invalid)?;
        let json = serde_json::to_string(policy).expect("a policy serializes");
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("HSET")
            .arg(room_key(event_id))
            .arg("policy")
            .arg(json)
            .arg("max_active")
            .arg(policy.max_active.map(|m| m.to_string()).unwrap_or_default())
            .arg("ttl_us")
            .arg(policy.ticket_ttl.as_micros() as u64)
            .arg("window_us")
            .arg(policy.admission_window.as_micros() as u64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn policy(&self, event_id: &str) -> Result<Option<RoomPolicy>, LineError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = redis::cmd("HGET")
            .arg(room_key(event_id))
            .arg("policy")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| LineError::Unavailable {
                backend: "redis",
                detail: format!("the room's policy does not parse: {e}"),
            })
        })
        .transpose()
    }

    async fn join(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Ticket, LineError> {
        let mut conn = self.conn.clone();
        let r: Vec<String> = self
            .join
            .key(room_key(event_id))
            .key(wait_key(event_id))
            .key(ticket_key(event_id, ticket_id))
            .arg(ticket_id.simple().to_string())
            .arg(user_id)
            .arg(now)
            .arg(MAX_WAITING)
            .arg(TICKET_KEEP.as_secs())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match r.first().map(String::as_str) {
            Some("no_room") => Err(LineError::NoRoom(event_id.to_string())),
            Some("full") => Err(LineError::Full(event_id.to_string())),
            Some("not_yours") => Err(LineError::Invalid(
                "that ticket key belongs to another user; use a fresh key".into(),
            )),
            Some(kind @ ("created" | "exists")) => Ok(Ticket {
                ticket_id,
                position: num(&r[1]),
                ahead: num(&r[2]),
                joined_at: num(&r[3]),
                created: kind == "created",
            }),
            other => Err(LineError::Unavailable {
                backend: "redis",
                detail: format!("unexpected join answer {other:?}"),
            }),
        }
    }

    async fn poll(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError> {
        self.poll_or_leave(event_id, user_id, ticket_id, now, false)
            .await
    }

    async fn leave(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError> {
        self.poll_or_leave(event_id, user_id, ticket_id, now, true)
            .await
    }

    async fn finish(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        _now: u64,
    ) -> Result<bool, LineError> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .finish
            .key(room_key(event_id))
            .key(active_key(event_id))
            .key(ticket_key(event_id, ticket_id))
            .arg(ticket_id.simple().to_string())
            .arg(user_id)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn admit(
        &self,
        event_id: &str,
        now: u64,
        max: u32,
        rate: Option<f64>,
    ) -> Result<AdmitRound, LineError> {
        let mut conn = self.conn.clone();
        let r: Vec<String> = self
            .admit
            .key(room_key(event_id))
            .key(wait_key(event_id))
            .key(active_key(event_id))
            .arg(now)
            .arg(max)
            .arg(ticket_prefix(event_id))
            .arg(MAX_SCAN_PER_ROUND.max(max))
            .arg(rate.map(|r| r.to_string()).unwrap_or_default())
            .arg(
                rate.map(|r| super::burst(r).to_string())
                    .unwrap_or_default(),
            )
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if r.first().map(String::as_str) != Some("ok") {
            return Err(LineError::NoRoom(event_id.to_string()));
        }
        let admitted = r[5..]
            .chunks(2)
            .filter_map(|c| {
                Some(Admission {
                    ticket_id: Uuid::parse_str(&c[0]).ok()?,
                    position: num(c.get(1)?),
                })
            })
            .collect();
        Ok(AdmitRound {
            admitted,
            expired: num(&r[1]),
            lapsed: num(&r[2]),
            left: num(&r[3]),
            active: num(&r[4]),
        })
    }

    async fn record_rate(&self, event_id: &str, per_sec: f64) -> Result<(), LineError> {
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("HSET")
            .arg(room_key(event_id))
            .arg("rate")
            .arg(per_sec)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn stats(&self, event_id: &str) -> Result<RoomStats, LineError> {
        let mut conn = self.conn.clone();
        let (fields, waiting, active): (Vec<Option<String>>, u64, u64) = redis::pipe()
            .cmd("HMGET")
            .arg(room_key(event_id))
            .arg(&[
                "joined",
                "admitted",
                "done",
                "lapsed",
                "left",
                "admission_expired",
                "rate",
            ])
            .cmd("ZCARD")
            .arg(wait_key(event_id))
            .cmd("ZCARD")
            .arg(active_key(event_id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let n = |i: usize| fields[i].as_deref().map_or(0, num);
        Ok(RoomStats {
            joined: n(0),
            admitted: n(1),
            done: n(2),
            lapsed: n(3),
            left: n(4),
            admission_expired: n(5),
            active,
            waiting,
            measured_rate: fields[6]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0),
        })
    }
}
