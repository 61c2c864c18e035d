//! One contract, two backends: every test here runs against the Redis line
//! (the shared redis-server at `REDIS_URL`, and a local Redis Cluster shared
//! by this binary's tests) and the Kafka line (librdkafka's
//! mock cluster, a topic per room), and states an invariant of
//! `couponrush_core::line` (the Kafka line also against a real tansu 0.6
//! broker, which creates the room's topic itself): positions strictly
//! increase in join order, no
//! ticket is admitted twice, none is skipped unless it lapsed or left, at
//! most `max_active` are admitted at once, and nobody sees another user's
//! ticket. Time is passed in (µs), so lapses and expiries are exact.
//!
//! The order check [`violations`] is itself tested against a line with a
//! planted fault (one that swaps two admissions and admits one twice), so a
//! green run means the check looked.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use couponrush_core::kafka::KafkaSettings;
use couponrush_core::line::kafka::KafkaLine;
use couponrush_core::line::redis::RedisLine;
use couponrush_core::line::{
    Admission, AdmitRound, Line, LineError, RoomPolicy, RoomStats, Ticket, TicketState,
    TicketStatus,
};
use couponrush_harness::{MockKafka, RedisCluster, Tansu, TansuStorage};
use uuid::Uuid;

const T0: u64 = 1_800_000_000_000_000;
const SEC: u64 = 1_000_000;

fn policy(max_active: Option<u32>) -> RoomPolicy {
    RoomPolicy {
        max_active,
        // The admitter's pace; these tests call admit themselves.
        rate_per_sec: Some(100.0),
        ticket_ttl: Duration::from_secs(2),
        admission_window: Duration::from_secs(10),
        slow_above_lag: None,
    }
}

/// A backend under test with an opened room.
struct Room {
    line: Arc<dyn Line>,
    event: String,
    _mock: Option<MockKafka>,
    _tansu: Option<Tansu>,
    _cluster: Option<Arc<RedisCluster>>,
}

async fn room(kind: &str, policy: RoomPolicy) -> Room {
    let event = format!("lc-{kind}-{}", Uuid::new_v4().simple());
    let (mut tansu, mut cluster) = (None, None);
    let (line, mock): (Arc<dyn Line>, _) = match kind {
        "redis" => (
            Arc::new(
                RedisLine::connect(&couponrush_harness::shared_redis_url())
                    .await
                    .expect("the shared redis-server at REDIS_URL is up"),
            ),
            None,
        ),
        "cluster" => {
            let shared = tokio::task::spawn_blocking(RedisCluster::shared)
                .await
                .unwrap()
                .expect("redis-server and redis-cli on the PATH");
            let line = RedisLine::connect(&shared.url())
                .await
                .expect("the line connects to the cluster");
            cluster = Some(shared);
            (Arc::new(line) as Arc<dyn Line>, None)
        }
        "tansu" => {
            let broker = Tansu::start(TansuStorage::Memory, None)
                .expect("tansu must be installed: run scripts/dev-up --install-only");
            let line =
                KafkaLine::new(&KafkaSettings::new(broker.brokers()), "t.line", 1).expect("line");
            tansu = Some(broker);
            (Arc::new(line) as Arc<dyn Line>, None)
        }
        _ => {
            let mock = MockKafka::start(1).expect("mock cluster");
            let line =
                KafkaLine::new(&KafkaSettings::new(mock.brokers()), "t.line", 1).expect("line");
            // The mock cluster cannot create topics: the harness does.
            mock.create_topic(&line.topic(&event), 1, 1)
                .expect("room topic");
            (Arc::new(line), Some(mock))
        }
    };
    line.open(&event, &policy).await.expect("open the room");
    Room {
        line,
        event,
        _mock: mock,
        _tansu: tansu,
        _cluster: cluster,
    }
}

impl Room {
    async fn join(&self, user: &str, at: u64) -> Ticket {
        self.line
            .join(&self.event, user, Uuid::new_v4(), at)
            .await
            .expect("join")
    }
    async fn poll(&self, user: &str, t: Uuid, at: u64) -> Option<TicketStatus> {
        self.line
            .poll(&self.event, user, t, at)
            .await
            .expect("poll")
    }
    async fn admit(&self, at: u64, max: u32) -> AdmitRound {
        self.line
            .admit(&self.event, at, max, None)
            .await
            .expect("admit")
    }
    async fn stats(&self) -> RoomStats {
        self.line.stats(&self.event).await.expect("stats")
    }
}

/// What is wrong with `admitted` (in admission order) given the tickets'
/// positions and which ones may be skipped: an admission out of join order,
/// a ticket admitted twice, or one skipped that was not allowed to be.
fn violations(
    joined: &[(Uuid, u64)],
    skippable: &HashSet<Uuid>,
    admitted: &[Admission],
) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for w in admitted.windows(2) {
        if w[1].position <= w[0].position {
            out.push(format!(
                "position {} admitted after {}",
                w[1].position, w[0].position
            ));
        }
    }
    for a in admitted {
        if !seen.insert(a.ticket_id) {
            out.push(format!("ticket at {} admitted twice", a.position));
        }
    }
    for (t, pos) in joined {
        if !seen.contains(t) && !skippable.contains(t) {
            out.push(format!(
                "ticket at {pos} skipped but neither lapsed nor left"
            ));
        }
    }
    out
}

async fn positions_strictly_increase_in_join_order(kind: &str) {
    let r = room(kind, policy(None)).await;
    let mut last = 0;
    for i in 0..25u64 {
        let t = r.join(&format!("u{i}"), T0 + i).await;
        assert!(t.created);
        assert!(t.position > last, "{kind}: {} after {last}", t.position);
        assert_eq!(t.ahead, i, "{kind}: people ahead of the {i}th");
        last = t.position;
    }
    assert_eq!(r.stats().await.joined, 25);
}

async fn joining_again_with_the_same_key_is_the_same_ticket(kind: &str) {
    let r = room(kind, policy(None)).await;
    r.join("first", T0).await;
    let ticket = Uuid::new_v4();
    let joins = (0..8).map(|_| {
        let (line, event) = (r.line.clone(), r.event.clone());
        tokio::spawn(async move { line.join(&event, "alice", ticket, T0 + 1).await })
    });
    let tickets: Vec<Ticket> = futures::future::join_all(joins)
        .await
        .into_iter()
        .map(|j| j.expect("task").expect("join"))
        .collect();
    let positions: HashSet<u64> = tickets.iter().map(|t| t.position).collect();
    assert_eq!(positions.len(), 1, "{kind}: {tickets:?}");
    assert_eq!(tickets.iter().filter(|t| t.created).count(), 1, "{kind}");
    assert_eq!(r.stats().await.joined, 2, "{kind}");
    // The same key from another user is not handed alice's ticket.
    let other = r.line.join(&r.event, "mallory", ticket, T0 + 2).await;
    assert!(
        matches!(other, Err(LineError::Invalid(_))),
        "{kind}: {other:?}"
    );
}

async fn admission_follows_join_order_and_never_admits_twice(kind: &str) {
    let r = room(kind, policy(None)).await;
    let mut joined = Vec::new();
    for i in 0..30u64 {
        let t = r.join(&format!("u{i}"), T0 + i).await;
        joined.push((t.ticket_id, t.position));
    }
    let mut admitted = Vec::new();
    for _ in 0..6 {
        admitted.extend(r.admit(T0 + SEC, 7).await.admitted);
    }
    assert_eq!(admitted.len(), 30, "{kind}");
    assert_eq!(
        violations(&joined, &HashSet::new(), &admitted),
        Vec::<String>::new()
    );
    assert!(r.admit(T0 + SEC, 7).await.admitted.is_empty(), "{kind}");
    let (t, _) = joined[3];
    let s = r.poll("u3", t, T0 + SEC).await.expect("own ticket");
    assert_eq!(s.state, TicketState::Admitted);
    assert_eq!(s.admit_deadline, Some(T0 + SEC + 10 * SEC));
}

async fn only_lapsed_or_left_tickets_are_skipped(kind: &str) {
    let r = room(kind, policy(None)).await;
    let mut joined = Vec::new();
    for i in 0..12u64 {
        let t = r.join(&format!("u{i}"), T0).await;
        joined.push((t.ticket_id, t.position));
    }
    // Everyone but 2, 5 and 9 keeps polling; 7 then leaves.
    let abandon: HashSet<usize> = [2, 5, 9].into();
    for step in 1..=3u64 {
        for (i, (t, _)) in joined.iter().enumerate() {
            if !abandon.contains(&i) {
                let s = r.poll(&format!("u{i}"), *t, T0 + step * SEC).await;
                assert_eq!(s.expect("own").state, TicketState::Waiting);
            }
        }
    }
    let left = r
        .line
        .leave(&r.event, "u7", joined[7].0, T0 + 3 * SEC)
        .await
        .expect("leave")
        .expect("own");
    assert_eq!(left.state, TicketState::Left);
    // 9 polls once, too late: it lapsed already.
    let late = r.poll("u9", joined[9].0, T0 + 3 * SEC).await.expect("own");
    assert_eq!(late.state, TicketState::Lapsed);
    let round = r.admit(T0 + 3 * SEC + 1, 100).await;
    let skippable: HashSet<Uuid> = [2, 5, 7, 9].iter().map(|&i| joined[i].0).collect();
    assert_eq!(
        violations(&joined, &skippable, &round.admitted),
        Vec::<String>::new(),
        "{kind}"
    );
    assert_eq!(round.admitted.len(), 8, "{kind}");
    let s = r.stats().await;
    assert_eq!((s.lapsed, s.left, s.admitted), (3, 1, 8), "{kind}: {s:?}");
    let gone = r.poll("u2", joined[2].0, T0 + 4 * SEC).await.expect("own");
    assert_eq!(gone.state, TicketState::Lapsed, "{kind}");
}

async fn nobody_lapses_for_a_gap_in_the_admission_rounds(kind: &str) {
    let r = room(kind, policy(None)).await;
    let mut joined = Vec::new();
    for i in 0..3u64 {
        let t = r.join(&format!("u{i}"), T0).await;
        joined.push((t.ticket_id, t.position));
    }
    let first = r.admit(T0, 0).await;
    assert!(first.admitted.is_empty(), "{kind}");
    // The rounds (and the tickets' polls) stop for five times the ttl: an
    // outage of the backend or of every admitter. Nobody lapses for it.
    let round = r.admit(T0 + 10 * SEC, 100).await;
    assert_eq!(round.lapsed, 0, "{kind}: {round:?}");
    assert_eq!(
        violations(&joined, &HashSet::new(), &round.admitted),
        Vec::<String>::new(),
        "{kind}"
    );
    assert_eq!(round.admitted.len(), 3, "{kind}");
    // The grace is for the gap only: with rounds going on, a ticket not
    // polled within its ttl lapses.
    let late = r.join("u9", T0 + 10 * SEC).await;
    for s in 11..=13u64 {
        r.admit(T0 + s * SEC, 0).await;
    }
    let round = r.admit(T0 + 13 * SEC + 1, 100).await;
    assert_eq!((round.lapsed, round.admitted.len()), (1, 0), "{kind}");
    let s = r
        .poll("u9", late.ticket_id, T0 + 14 * SEC)
        .await
        .expect("own");
    assert_eq!(s.state, TicketState::Lapsed, "{kind}");
}

async fn admissions_hold_the_rate_however_many_admitters_ask(kind: &str) {
    let long_lived = RoomPolicy {
        ticket_ttl: Duration::from_secs(60),
        ..policy(None)
    };
    let r = room(kind, long_lived).await;
    for i in 0..80u64 {
        r.join(&format!("u{i}"), T0).await;
    }
    // Two admitters (api processes) each ask for 100 every 100 ms at
    // 10/s: the room's bucket (2 saved up at most) holds them together.
    let mut admitted = 0;
    for step in 0..=50u64 {
        for _ in 0..2 {
            let round = r
                .line
                .admit(&r.event, T0 + step * SEC / 10, 100, Some(10.0))
                .await
                .expect("admit");
            admitted += round.admitted.len();
        }
    }
    // 2 at first, then 10 a second for 5 s.
    assert!((50..=52).contains(&admitted), "{kind}: {admitted} admitted");
    // Without a rate, the round is bounded by `max` (and the slots) only.
    let round = r.admit(T0 + 5 * SEC, 10).await;
    assert_eq!(round.admitted.len(), 10, "{kind}");
}

async fn admitted_at_once_stay_within_max_active(kind: &str) {
    let r = room(kind, policy(Some(3))).await;
    let mut joined = Vec::new();
    for i in 0..6u64 {
        let t = r.join(&format!("u{i}"), T0).await;
        joined.push((t.ticket_id, t.position));
    }
    let first = r.admit(T0 + 1, 100).await;
    assert_eq!(first.admitted.len(), 3, "{kind}");
    assert_eq!(first.active, 3);
    assert!(r.admit(T0 + 2, 100).await.admitted.is_empty(), "{kind}");
    // One acts: its slot goes to the next in line.
    assert!(r
        .line
        .finish(&r.event, "u0", joined[0].0, T0 + 3)
        .await
        .unwrap());
    assert!(!r
        .line
        .finish(&r.event, "u0", joined[0].0, T0 + 3)
        .await
        .unwrap());
    let next = r.admit(T0 + 4, 100).await;
    assert_eq!(next.admitted.len(), 1, "{kind}");
    assert_eq!(next.admitted[0].position, joined[3].1);
    // Past the window the others lose their slots; the rest come in. Polls
    // keep the waiting ones alive meanwhile.
    for (i, (t, _)) in joined.iter().enumerate().skip(4) {
        r.poll(&format!("u{i}"), *t, T0 + SEC).await;
    }
    // The admitter's rounds go on meanwhile (a pause longer than the ttl
    // would be a resumption: nobody would lapse).
    for s in 1..=10 {
        r.admit(T0 + s * SEC, 0).await;
    }
    let later = r.admit(T0 + 10 * SEC + 5, 100).await;
    assert_eq!(later.expired, 3, "{kind}: {later:?}");
    assert_eq!(later.lapsed, 2, "{kind}: polled at T0+1s, ttl 2s");
    let s = r.stats().await;
    assert_eq!((s.done, s.admission_expired), (1, 3), "{kind}: {s:?}");
    let expired = r.poll("u1", joined[1].0, T0 + 11 * SEC).await.unwrap();
    assert_eq!(expired.state, TicketState::AdmissionExpired);
}

async fn a_ticket_is_shown_only_to_its_user(kind: &str) {
    let r = room(kind, policy(None)).await;
    let t = r.join("alice", T0).await;
    assert!(r.poll("bob", t.ticket_id, T0 + 1).await.is_none(), "{kind}");
    assert!(r
        .line
        .leave(&r.event, "bob", t.ticket_id, T0 + 1)
        .await
        .unwrap()
        .is_none());
    r.admit(T0 + 2, 1).await;
    assert!(!r
        .line
        .finish(&r.event, "bob", t.ticket_id, T0 + 3)
        .await
        .unwrap());
    assert_eq!(
        r.poll("alice", t.ticket_id, T0 + 3).await.unwrap().state,
        TicketState::Admitted
    );
    let none = r
        .line
        .join("no-room-here", "alice", Uuid::new_v4(), T0)
        .await;
    assert!(
        matches!(none, Err(LineError::NoRoom(_))),
        "{kind}: {none:?}"
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(#[tokio::test] async fn $name() { super::$name("redis").await })*
        }
        mod redis_cluster {
            $(#[tokio::test] async fn $name() { super::$name("cluster").await })*
        }
        mod kafka {
            $(#[tokio::test] async fn $name() { super::$name("kafka").await })*
        }
        mod kafka_on_tansu {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
              async fn $name() { super::$name("tansu").await })*
        }
    };
}

conformance!(
    positions_strictly_increase_in_join_order,
    joining_again_with_the_same_key_is_the_same_ticket,
    admission_follows_join_order_and_never_admits_twice,
    only_lapsed_or_left_tickets_are_skipped,
    nobody_lapses_for_a_gap_in_the_admission_rounds,
    admissions_hold_the_rate_however_many_admitters_ask,
    admitted_at_once_stay_within_max_active,
    a_ticket_is_shown_only_to_its_user,
);

/// A line with a planted fault: it swaps the first two admissions of its
/// first round, admits the first one again in the next, and drops a ticket.
struct Faulty {
    inner: Arc<dyn Line>,
    rounds: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Line for Faulty {
    fn kind(&self) -> &'static str {
        "faulty"
    }
    async fn open(&self, e: &str, p: &RoomPolicy) -> Result<(), LineError> {
        self.inner.open(e, p).await
    }
    async fn policy(&self, e: &str) -> Result<Option<RoomPolicy>, LineError> {
        self.inner.policy(e).await
    }
    async fn join(&self, e: &str, u: &str, t: Uuid, now: u64) -> Result<Ticket, LineError> {
        self.inner.join(e, u, t, now).await
    }
    async fn poll(
        &self,
        e: &str,
        u: &str,
        t: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError> {
        self.inner.poll(e, u, t, now).await
    }
    async fn leave(
        &self,
        e: &str,
        u: &str,
        t: Uuid,
        now: u64,
    ) -> Result<Option<TicketStatus>, LineError> {
        self.inner.leave(e, u, t, now).await
    }
    async fn finish(&self, e: &str, u: &str, t: Uuid, now: u64) -> Result<bool, LineError> {
        self.inner.finish(e, u, t, now).await
    }
    async fn admit(
        &self,
        e: &str,
        now: u64,
        max: u32,
        rate: Option<f64>,
    ) -> Result<AdmitRound, LineError> {
        let mut r = self.inner.admit(e, now, max, rate).await?;
        match self
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        {
            0 => {
                r.admitted.swap(0, 1);
                r.admitted.pop();
            }
            1 => r.admitted.push(Admission {
                ticket_id: r.admitted[0].ticket_id,
                position: u64::MAX,
            }),
            _ => {}
        }
        Ok(r)
    }
    async fn record_rate(&self, e: &str, r: f64) -> Result<(), LineError> {
        self.inner.record_rate(e, r).await
    }
    async fn stats(&self, e: &str) -> Result<RoomStats, LineError> {
        self.inner.stats(e).await
    }
}

#[tokio::test]
async fn the_order_check_catches_a_planted_reorder_double_admission_and_skip() {
    let r = room("redis", policy(None)).await;
    let faulty = Faulty {
        inner: r.line.clone(),
        rounds: 0.into(),
    };
    let mut joined = Vec::new();
    for i in 0..6u64 {
        let t = r.join(&format!("u{i}"), T0).await;
        joined.push((t.ticket_id, t.position));
    }
    let mut admitted = faulty
        .admit(&r.event, T0 + 1, 3, None)
        .await
        .unwrap()
        .admitted;
    admitted.extend(
        faulty
            .admit(&r.event, T0 + 1, 3, None)
            .await
            .unwrap()
            .admitted,
    );
    let found = violations(&joined, &HashSet::new(), &admitted);
    assert!(
        found.iter().any(|v| v.contains("admitted after")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|v| v.contains("admitted twice")),
        "{found:?}"
    );
    assert!(found.iter().any(|v| v.contains("skipped")), "{found:?}");
}

/// The Kafka line keeps its order in the partition: a process that opens the
/// room again (a restart) reads the line from the start and admits in the
/// same order, tickets polled since keep their place, and a ticket not
/// polled within its lifetime lapses.
#[tokio::test]
async fn a_reopened_kafka_room_reads_its_line_back_in_order() {
    let mock = MockKafka::start(1).expect("mock cluster");
    let kafka = KafkaSettings::new(mock.brokers());
    let event = format!("lc-reopen-{}", Uuid::new_v4().simple());
    let first = KafkaLine::new(&kafka, "t.line", 1).unwrap();
    mock.create_topic(&first.topic(&event), 1, 1).unwrap();
    first.open(&event, &policy(None)).await.unwrap();
    let mut joined = Vec::new();
    for i in 0..6u64 {
        let t = first
            .join(&event, &format!("u{i}"), Uuid::new_v4(), T0 + i)
            .await
            .unwrap();
        joined.push((t.ticket_id, t.position));
    }
    drop(first);
    let again = KafkaLine::new(&kafka, "t.line", 1).unwrap();
    again.open(&event, &policy(None)).await.unwrap();
    // Within the tickets' lifetime (2 s) of their joins: everyone is in.
    let round = again.admit(&event, T0 + SEC, 4, None).await.unwrap();
    let rest = again.admit(&event, T0 + SEC, 4, None).await.unwrap();
    let admitted: Vec<Admission> = round.admitted.into_iter().chain(rest.admitted).collect();
    assert_eq!(
        violations(&joined, &HashSet::new(), &admitted),
        Vec::<String>::new()
    );
    assert_eq!(admitted.len(), 6);
    let s = again
        .poll(&event, "u5", joined[5].0, T0 + SEC)
        .await
        .unwrap()
        .expect("read back with its user");
    assert_eq!((s.state, s.position), (TicketState::Admitted, joined[5].1));
    assert!(again
        .poll(&event, "someone-else", joined[5].0, T0 + SEC)
        .await
        .unwrap()
        .is_none());
}

/// A restarted Kafka room (or another process) reads the room back from
/// its partition on first use, with no open: its policy, and every ticket
/// waiting with a fresh lifetime, so tickets of a line older than the ttl
/// are polled and admitted, not lapsed.
#[tokio::test]
async fn a_restarted_kafka_room_skips_nobody_for_the_restart() {
    let mock = MockKafka::start(1).expect("mock cluster");
    let kafka = KafkaSettings::new(mock.brokers());
    let event = format!("lc-restart-{}", Uuid::new_v4().simple());
    let first = KafkaLine::new(&kafka, "t.line", 1).unwrap();
    mock.create_topic(&first.topic(&event), 1, 1).unwrap();
    let p = RoomPolicy {
        ticket_ttl: Duration::from_secs(30),
        ..policy(None)
    };
    first.open(&event, &p).await.unwrap();
    // Joined two minutes ago, four times the ttl.
    let then = couponrush_core::wire::now_micros() - 120 * SEC;
    let mut joined = Vec::new();
    for i in 0..4u64 {
        let t = first
            .join(&event, &format!("u{i}"), Uuid::new_v4(), then + i)
            .await
            .unwrap();
        joined.push((t.ticket_id, t.position));
    }
    drop(first);
    let again = KafkaLine::new(&kafka, "t.line", 1).unwrap();
    assert_eq!(again.policy(&event).await.unwrap(), Some(p));
    let now = couponrush_core::wire::now_micros();
    let s = again
        .poll(&event, "u3", joined[3].0, now)
        .await
        .unwrap()
        .expect("read back with its user");
    assert_eq!((s.state, s.position), (TicketState::Waiting, joined[3].1));
    let round = again.admit(&event, now, 10, None).await.unwrap();
    assert_eq!(round.lapsed, 0, "{round:?}");
    assert_eq!(
        violations(&joined, &HashSet::new(), &round.admitted),
        Vec::<String>::new()
    );
    assert_eq!(round.admitted.len(), 4);
}

/// The Kafka room's table is bounded: a ticket that ended (here: done) is
/// forgotten once the longer of the ttl and the admission window passed;
/// waiting ones stay.
#[tokio::test]
async fn a_kafka_room_forgets_ended_tickets_after_the_window() {
    let r = room("kafka", policy(None)).await;
    let done = r.join("u0", T0).await;
    let waiting = r.join("u1", T0).await;
    let round = r.admit(T0, 1).await;
    assert_eq!(round.admitted.len(), 1);
    assert!(r
        .line
        .finish(&r.event, "u0", done.ticket_id, T0 + SEC)
        .await
        .unwrap());
    // Rounds and polls go on past the 10 s window.
    for s in 2..=13u64 {
        r.poll("u1", waiting.ticket_id, T0 + s * SEC).await;
        r.admit(T0 + s * SEC, 0).await;
    }
    assert!(
        r.poll("u0", done.ticket_id, T0 + 13 * SEC).await.is_none(),
        "an ended ticket is forgotten after the window"
    );
    let s = r.poll("u1", waiting.ticket_id, T0 + 13 * SEC).await;
    assert_eq!(s.expect("kept").state, TicketState::Waiting);
    assert_eq!(r.stats().await.done, 1, "the counters keep it");
}

/// A join whose record the broker never acknowledges leaves nothing behind.
#[tokio::test]
async fn a_failed_kafka_join_leaves_no_entry_behind() {
    let mock = MockKafka::start(1).expect("mock cluster");
    let mut kafka = KafkaSettings::new(mock.brokers());
    kafka
        .extra
        .push(("message.timeout.ms".into(), "500".into()));
    let event = format!("lc-fail-{}", Uuid::new_v4().simple());
    let line = KafkaLine::new(&kafka, "t.line", 1).unwrap();
    mock.create_topic(&line.topic(&event), 1, 1).unwrap();
    line.open(&event, &policy(None)).await.unwrap();
    mock.inject(couponrush_harness::Fault::BrokerDown(1))
        .unwrap();
    let err = line.join(&event, "u0", Uuid::new_v4(), T0).await;
    assert!(matches!(err, Err(LineError::Unavailable { .. })), "{err:?}");
    assert_eq!(line.joins_in_flight(&event), 0);
}
