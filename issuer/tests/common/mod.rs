//! Helpers shared by the issuer's integration tests: reading outcomes back.

#![allow(dead_code)]

use std::time::Duration;

use couponrush_core::Outcome;
use couponrush_harness::TopicReader;

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
