//! The Kafka waiting room: one single-partition topic per room, the field
//! note's simple ordering. A join is a record (acknowledged by every
//! in-sync replica before the client hears its place); its position is its
//! offset (offset 0 is the room record that opened the room), so the line's
//! order *is* the partition's order and needs no other sequencing. The admitter consumes the partition in offset order
//! ([`Line::admit`]) and decides each record with the room's ticket table
//! ([`super::table::Table`]): admitted, or skipped because it lapsed or
//! left.
//!
//! ## Durable rooms, fail closed
//! Opening a room writes a room record (its policy) to the room's
//! partition before the open is answered; the admitter passes it like any
//! record that is not a join (a policy changed later takes one position
//! that nobody holds). A process asked about a room it does not
//! hold (another process opened it, or this one restarted) reads the
//! partition back (the latest room record is the policy, every join is a
//! waiting ticket) before it answers: a room whose topic exists but cannot
//! be read is [`LineError::Unavailable`] (the api's 503), never "no room",
//! so the issue gate never opens for want of a policy.
//!
//! ## The catch
//! The partition holds the order; the tickets' liveness (last poll) and
//! admissions live in the table of the process that serves the room: with
//! this backend one api process serves a room (route a room's requests to
//! one process; two serving one room would each admit at its pace). A
//! process that restarts reads its table back from the partition: every
//! ticket is waiting again with a fresh lifetime (nobody lapses for the
//! restart; see `table`), and admissions made before it are forgotten (an
//! admitted user's token is refused at the gate; they are admitted again
//! in their turn). People ahead (`position - head`)
//! include tickets that left or lapsed until the admitter passes them: an
//! offset cannot be un-written. Redis's sorted set can, at the price of the
//! order living in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use uuid::Uuid;

use super::table::{Reached, Table};
use super::{
    Admission, AdmitRound, Line, LineError, RoomPolicy, RoomStats, Ticket, TicketStatus,
    MAX_WAITING,
};
use crate::kafka::{acknowledged, ensure_topics, KafkaSettings, TopicError};
use crate::topics::TopicSpec;
use crate::wire::now_micros;

/// Records one admission round reads at most (bounds the round's time when
/// many lapsed tickets are at the head).
pub const MAX_SCAN_PER_ROUND: u32 = 5_000;

/// How long a round waits for a join record this process produced and
/// knows is there (the consumer trails the producer by a fetch).
pub const CATCH_UP: Duration = Duration::from_secs(3);

/// Retention of a room's topic: a line lasts hours, not weeks.
pub const ROOM_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long reading a room back from its partition may take; past it the
/// room is unavailable (retry), not missing.
pub const READ_BACK: Duration = Duration::from_secs(10);

/// The record that opens a room or changes its policy.
#[derive(Debug, Serialize, Deserialize)]
struct RoomRecord {
    room_policy: RoomPolicy,
}

/// A room as read back from its partition.
#[derive(Default)]
struct ReadBack {
    policy: Option<RoomPolicy>,
    joins: Vec<(u64, JoinRecord)>,
    /// The partition's end offset when read.
    end: u64,
}

/// A join record.
#[derive(Debug, Serialize, Deserialize)]
struct JoinRecord {
    ticket_id: Uuid,
    user_id: String,
    joined_at: u64,
}

struct Room {
    topic: String,
    table: Mutex<Table>,
    /// Joins of this process in flight, so one key's concurrent joins
    /// produce one record.
    joining: Mutex<HashMap<Uuid, Arc<OnceCell<u64>>>>,
    reader: tokio::sync::Mutex<StreamConsumer>,
    /// Highest position this process produced.
    produced: AtomicU64,
    rate: Mutex<f64>,
}

/// The Kafka backend of [`Line`].
pub struct KafkaLine {
    kafka: KafkaSettings,
    prefix: String,
    replication: i32,
    producer: FutureProducer,
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    /// One read-back at a time, so a room is read back once.
    reading: tokio::sync::Mutex<()>,
}

fn unavailable(detail: impl std::fmt::Display) -> LineError {
    LineError::Unavailable {
        backend: "kafka",
        detail: detail.to_string(),
    }
}

impl KafkaLine {
    /// A line on `kafka` whose rooms are topics `<prefix>.<event>` with
    /// `replication` replicas (created when missing; on librdkafka's mock
    /// cluster, which cannot create topics, create them first).
    pub fn new(kafka: &KafkaSettings, prefix: &str, replication: i32) -> Result<Self, LineError> {
        let producer: FutureProducer = kafka
            .producer_config("couponrush-line", 100_000)
            .create()
            .map_err(unavailable)?;
        Ok(Self {
            kafka: kafka.clone(),
            prefix: prefix.to_string(),
            replication,
            producer,
            rooms: Mutex::new(HashMap::new()),
            reading: tokio::sync::Mutex::new(()),
        })
    }

    /// The topic of `event_id`'s room.
    pub fn topic(&self, event_id: &str) -> String {
        format!("{}.{event_id}", self.prefix)
    }

    fn room(&self, event_id: &str) -> Result<Arc<Room>, LineError> {
        self.rooms
            .lock()
            .expect("not poisoned")
            .get(event_id)
            .cloned()
            .ok_or_else(|| LineError::NoRoom(event_id.to_string()))
    }

    /// Joins of `event_id`'s room in flight at this process (each holds an
    /// entry until its record is acknowledged or failed).
    pub fn joins_in_flight(&self, event_id: &str) -> usize {
        self.room(event_id)
            .map_or(0, |r| r.joining.lock().expect("not poisoned").len())
    }

    /// The room this process serves, read back from its partition when it
    /// is not in memory yet (opened elsewhere, or before a restart).
    async fn served(&self, event_id: &str) -> Result<Arc<Room>, LineError> {
        if let Ok(room) = self.room(event_id) {
            return Ok(room);
        }
        self.read_back(event_id, None)
            .await?
            .ok_or_else(|| LineError::NoRoom(event_id.to_string()))
    }

    /// Reads the room of `event_id` back from its partition into memory;
    /// `policy` (an open) overrides the recorded one. `None` when the room
    /// was never opened.
    async fn read_back(
        &self,
        event_id: &str,
        policy: Option<RoomPolicy>,
    ) -> Result<Option<Arc<Room>>, LineError> {
        let _one = self.reading.lock().await;
        if let Ok(room) = self.room(event_id) {
            if let Some(p) = policy {
                room.table.lock().expect("not poisoned").policy = p;
            }
            return Ok(Some(room));
        }
        let topic = self.topic(event_id);
        let (kafka, t) = (self.kafka.clone(), topic.clone());
        let back = tokio::task::spawn_blocking(move || read_partition(&kafka, &t, READ_BACK))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        let Some(policy) = policy.or(back.policy) else {
            return Ok(None);
        };
        let consumer: StreamConsumer = self
            .kafka
            .client_config_with("couponrush-line-admitter", |c| {
                // Never committed: the position is the table's head, and
                // a restarted process reads the line again from the start.
                c.set("group.id", format!("couponrush-line-{}", Uuid::new_v4()))
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false")
                    .set("fetch.wait.max.ms", "10");
            })
            .create()
            .map_err(unavailable)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(unavailable)?;
        consumer.assign(&tpl).map_err(unavailable)?;
        // Every ticket read back waits again with a fresh lifetime: its
        // polls failed while the room was away.
        let now = now_micros();
        let mut table = Table::new(policy);
        table.resume(now);
        for (position, j) in &back.joins {
            table.insert_seen(
                j.ticket_id,
                &j.user_id,
                *position,
                j.joined_at,
                j.joined_at.max(now),
            );
        }
        // The records up to the end offset exist: the first rounds wait
        // for them instead of taking an empty fetch for an empty line.
        // (tansu 0.6 may report an end offset a batch short: the rest are
        // read by the rounds after.)
        let room = Arc::new(Room {
            topic,
            table: Mutex::new(table),
            joining: Mutex::new(HashMap::new()),
            reader: tokio::sync::Mutex::new(consumer),
            produced: AtomicU64::new(back.end.saturating_sub(1)),
            rate: Mutex::new(0.0),
        });
        Ok(Some(
            self.rooms
                .lock()
                .expect("not poisoned")
                .entry(event_id.to_string())
                .or_insert(room)
                .clone(),
        ))
    }

    /// Writes the room record (acknowledged).
    async fn record_room(&self, topic: &str, policy: &RoomPolicy) -> Result<(), LineError> {
        let value = serde_json::to_vec(&RoomRecord {
            room_policy: *policy,
        })
        .expect("a room record serializes");
        let record = FutureRecord::to(topic)
            .partition(0)
            .key("room")
            .payload(&value);
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| unavailable(e))?;
        acknowledged(delivery).await.map_err(unavailable)?;
        Ok(())
    }

    async fn ensure_topic(&self, topic: &str) -> Result<(), LineError> {
        let (kafka, t) = (self.kafka.clone(), topic.to_string());
        let exists = tokio::task::spawn_blocking(move || {
            crate::kafka::partition_counts(&kafka, &[&t], Duration::from_secs(5))
                .map(|c| c.get(&t).copied().unwrap_or(0) > 0)
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if exists {
            return Ok(());
        }
        let spec = TopicSpec {
            name: topic.to_string(),
            partitions: 1,
            replication: self.replication,
            configs: vec![
                (
                    "retention.ms".into(),
                    ROOM_RETENTION.as_millis().to_string(),
                ),
                ("cleanup.policy".into(), "delete".into()),
            ],
        };
        ensure_topics(&self.kafka, &[spec], Duration::from_secs(10))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl Line for KafkaLine {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn open(&self, event_id: &str, policy: &RoomPolicy) -> Result<(), LineError> {
        policy.validate().map_err(LineError::Invalid)?;
        let topic = self.topic(event_id);
        if self.room(event_id).is_err() {
            self.ensure_topic(&topic).await?;
        }
        // Durable before it is answered: any process (or this one after a
        // restart) finds the room in its partition.
        self.record_room(&topic, policy).await?;
        self.read_back(event_id, Some(*policy)).await?;
        Ok(())
    }

    async fn policy(&self, event_id: &str) -> Result<Option<RoomPolicy>, LineError> {
        if let Ok(room) = self.room(event_id) {
            return Ok(Some(room.table.lock().expect("not poisoned").policy));
        }
        Ok(self
            .read_back(event_id, None)
            .await?
            .map(|r| r.table.lock().expect("not poisoned").policy))
    }

    async fn join(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Ticket, LineError> {
        let room = self.served(event_id).await?;
        let existing = |room: &Room| -> Result<Option<Ticket>, LineError> {
            let table = room.table.lock().expect("not poisoned");
            match table.get(&ticket_id) {
                Some(e) if e.user_id != user_id => Err(LineError::Invalid(
                    "that ticket key belongs to another user; use a fresh key".into(),
                )),
                Some(e) => Ok(Some(Ticket {
                    ticket_id,
                    position: e.position,
                    ahead: e.position.saturating_sub(table.head),
                    joined_at: e.joined_at,
                    created: false,
                })),
                None if table.stats(0.0).waiting >= MAX_WAITING => {
                    Err(LineError::Full(event_id.to_string()))
                }
                None => Ok(None),
            }
        };
        if let Some(t) = existing(&room)? {
            return Ok(t);
        }
        let cell = room
            .joining
            .lock()
            .expect("not poisoned")
            .entry(ticket_id)
            .or_default()
            .clone();
        let mut produced_here = false;
        let produced = cell
            .get_or_try_init(|| async {
                produced_here = true;
                let value = serde_json::to_vec(&JoinRecord {
                    ticket_id,
                    user_id: user_id.to_string(),
                    joined_at: now,
                })
                .expect("a join record serializes");
                let key = ticket_id.simple().to_string();
                let record = FutureRecord::to(&room.topic)
                    .partition(0)
                    .key(&key)
                    .payload(&value);
                let delivery = self
                    .producer
                    .send_result(record)
                    .map_err(|(e, _)| unavailable(e))?;
                let d = acknowledged(delivery).await.map_err(unavailable)?;
                Ok::<u64, LineError>(d.offset as u64)
            })
            .await
            .copied();
        let position = match produced {
            Ok(p) => p,
            Err(e) => {
                // The next join with this key tries again, from a fresh
                // entry (none is left behind).
                room.joining
                    .lock()
                    .expect("not poisoned")
                    .remove(&ticket_id);
                return Err(e);
            }
        };
        room.produced.fetch_max(position, Ordering::SeqCst);
        room.table
            .lock()
            .expect("not poisoned")
            .insert(ticket_id, user_id, position, now);
        room.joining
            .lock()
            .expect("not poisoned")
            .remove(&ticket_id);
        let table = room.table.lock().expect("not poisoned");
        // The admitter may have read the record (and inserted the ticket)
        // before this join heard its ack: either way, one entry. The join
        // that produced the entry's record created the ticket; one that
        // waited for that join did not, whoever inserted first (a waiter
        // can beat the producer to the table: two "created" answers were
        // seen on tansu).
        let e = table
            .get(&ticket_id)
            .expect("inserted above or by the admitter");
        Ok(Ticket {
            ticket_id,
            position: e.position,
            ahead: e.position.saturating_sub(table.head),
            joined_at: e.joined_at,
            created: produced_here && e.position == position,
        })
    }

    async fn poll(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError> {
        let room = self.served(event_id).await?;
        let mut table = room.table.lock().expect("not poisoned");
        Ok(table.poll(user_id, ticket_id, now))
    }

    async fn leave(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError> {
        let room = self.served(event_id).await?;
        let mut table = room.table.lock().expect("not poisoned");
        Ok(table.leave(user_id, ticket_id, now))
    }

    async fn finish(
        &self,
        event_id: &str,
        user_id: &str,
        ticket_id: Uuid,
        now: u64,
    ) -> Result<bool, LineError> {
        let room = self.served(event_id).await?;
        let mut table = room.table.lock().expect("not poisoned");
        Ok(table.finish(user_id, ticket_id, now))
    }

    async fn admit(
        &self,
        event_id: &str,
        now: u64,
        max: u32,
        rate: Option<f64>,
    ) -> Result<AdmitRound, LineError> {
        let room = self.served(event_id).await?;
        // One round at a time: the consumer's position is the line's head.
        let reader = room.reader.lock().await;
        let (mut want, expired) = {
            let mut table = room.table.lock().expect("not poisoned");
            table.round(now);
            let expired = table.expire(now);
            let allowed = table.rate_allows(now, rate);
            ((max as u64).min(table.free_slots()).min(allowed), expired)
        };
        let mut round = AdmitRound {
            expired,
            ..AdmitRound::default()
        };
        let mut scanned = 0;
        while want > 0 && scanned < MAX_SCAN_PER_ROUND.max(max) {
            let head = room.table.lock().expect("not poisoned").head;
            // A record this process produced is there: wait for it. Past
            // those, take only what is already fetched.
            let wait = if head <= room.produced.load(Ordering::SeqCst) {
                CATCH_UP
            } else {
                Duration::from_millis(2)
            };
            let msg = match tokio::time::timeout(wait, reader.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(unavailable(e)),
                Ok(Ok(m)) => m,
            };
            scanned += 1;
            let position = msg.offset() as u64;
            let Some(rec) = msg
                .payload()
                .and_then(|p| serde_json::from_slice::<JoinRecord>(p).ok())
            else {
                // Not a join record: nobody's place; pass it.
                let mut table = room.table.lock().expect("not poisoned");
                table.head = table.head.max(position + 1);
                continue;
            };
            let mut table = room.table.lock().expect("not poisoned");
            table.insert(rec.ticket_id, &rec.user_id, position, rec.joined_at);
            match table.reach(rec.ticket_id, position, now) {
                Reached::Admitted => {
                    want -= 1;
                    round.admitted.push(Admission {
                        ticket_id: rec.ticket_id,
                        position,
                    });
                }
                Reached::Lapsed => round.lapsed += 1,
                Reached::Gone => round.left += 1,
                Reached::NotInLine => {}
            }
        }
        let mut table = room.table.lock().expect("not poisoned");
        table.spend(round.admitted.len() as u64);
        round.active = table.active();
        drop(table);
        Ok(round)
    }

    async fn record_rate(&self, event_id: &str, per_sec: f64) -> Result<(), LineError> {
        *self
            .served(event_id)
            .await?
            .rate
            .lock()
            .expect("not poisoned") = per_sec;
        Ok(())
    }

    async fn stats(&self, event_id: &str) -> Result<RoomStats, LineError> {
        let room = self.served(event_id).await?;
        let rate = *room.rate.lock().expect("not poisoned");
        let stats = room.table.lock().expect("not poisoned").stats(rate);
        Ok(stats)
    }
}

/// Reads `topic`'s partition from its start to its end offset: the latest
/// room record and every join. An empty default when the topic does not
/// exist; an error when it cannot be read within `timeout`.
fn read_partition(
    kafka: &KafkaSettings,
    topic: &str,
    timeout: Duration,
) -> Result<ReadBack, String> {
    use rdkafka::consumer::BaseConsumer;
    let deadline = std::time::Instant::now() + timeout;
    match crate::kafka::partition_counts(kafka, &[topic], Duration::from_secs(5)) {
        Ok(_) => {}
        Err(TopicError::Missing(_)) => return Ok(ReadBack::default()),
        Err(e) => return Err(e.to_string()),
    }
    let client: BaseConsumer = kafka
        .client_config_with("couponrush-line-read-back", |c| {
            c.set("group.id", format!("couponrush-line-{}", Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false");
        })
        .create()
        .map_err(|e| e.to_string())?;
    let (low, high) = client
        .fetch_watermarks(topic, 0, Duration::from_secs(5))
        .map_err(|e| format!("cannot read the end offset of {topic}: {e}"))?;
    let mut back = ReadBack {
        end: high.max(0) as u64,
        ..ReadBack::default()
    };
    if high <= low {
        return Ok(back);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))
        .map_err(|e| e.to_string())?;
    client.assign(&tpl).map_err(|e| e.to_string())?;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!(
                "could not read the line of {topic} back within {timeout:?}"
            ));
        }
        let Some(msg) = client.poll(left.min(Duration::from_millis(200))) else {
            continue;
        };
        let msg = msg.map_err(|e| e.to_string())?;
        let payload = msg.payload().unwrap_or_default();
        if let Ok(j) = serde_json::from_slice::<JoinRecord>(payload) {
            back.joins.push((msg.offset() as u64, j));
        } else if let Ok(r) = serde_json::from_slice::<RoomRecord>(payload) {
            back.policy = Some(r.room_policy);
        }
        if msg.offset() + 1 >= high {
            return Ok(back);
        }
    }
}
