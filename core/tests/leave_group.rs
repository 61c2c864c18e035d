//! A stopping member leaves its group before its consumer is closed
//! (`kafka::leave_group`, the workaround for librdkafka#4884): once it
//! returns, nothing is assigned to the member, its partitions go to the
//! member that stays, and dropping the consumer has no rebalance to answer.

use std::time::{Duration, Instant};

use couponrush_core::kafka::{leave_group, KafkaSettings};
use couponrush_harness::MockKafka;
use rdkafka::consumer::{BaseConsumer, Consumer};

const TOPIC: &str = "leave";
const PARTITIONS: usize = 4;

fn member(brokers: &str) -> BaseConsumer {
    let consumer: BaseConsumer = KafkaSettings::new(brokers)
        .client_config("leave")
        .set("group.id", "leave-group")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    consumer
}

fn assigned(consumer: &BaseConsumer) -> usize {
    consumer.assignment().unwrap().count()
}

/// Polls both members until `done` holds of their assignments (or 30 s).
fn poll_until(a: &BaseConsumer, b: &BaseConsumer, done: impl Fn(usize, usize) -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let _ = a.poll(Duration::from_millis(50));
        let _ = b.poll(Duration::from_millis(50));
        if done(assigned(a), assigned(b)) {
            return true;
        }
    }
    false
}

#[test]
fn a_member_that_left_has_nothing_assigned_and_its_partitions_move() {
    let mock = MockKafka::start(1).unwrap();
    mock.create_topic(TOPIC, PARTITIONS as i32, 1).unwrap();
    let (leaving, staying) = (member(&mock.brokers()), member(&mock.brokers()));
    assert!(
        poll_until(&leaving, &staying, |a, b| a > 0
            && b > 0
            && a + b == PARTITIONS),
        "both members get partitions"
    );

    // The member that stays keeps polling meanwhile, so the group can
    // rebalance.
    let left = std::thread::scope(|s| {
        let leaver = s.spawn(|| leave_group(&leaving, Duration::from_secs(20)));
        while !leaver.is_finished() {
            let _ = staying.poll(Duration::from_millis(50));
        }
        leaver.join().unwrap()
    });
    assert!(left, "left with nothing assigned within the bound");
    assert_eq!(assigned(&leaving), 0);
    // Closing now has nothing to revoke.
    drop(leaving);
    let until = Instant::now() + Duration::from_secs(30);
    while assigned(&staying) < PARTITIONS && Instant::now() < until {
        let _ = staying.poll(Duration::from_millis(50));
    }
    assert_eq!(
        assigned(&staying),
        PARTITIONS,
        "the partitions moved to the member that stayed"
    );
}
