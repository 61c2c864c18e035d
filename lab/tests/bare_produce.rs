//! `coupon-lab bare --produce`, the baseline the api's throughput is
//! measured against, keeps the api's contract and nothing else: a `202` is
//! sent only once the broker acknowledged the record (so the record is on
//! the requests topic), and a broker that is gone gets a `503`, never a
//! `202`. A baseline that answered before the ack would flatter itself and
//! make the api look slow for keeping its promise.

use std::net::SocketAddr;
use std::time::Duration;

use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::{IssueRequest, Topics};
use couponrush_harness::{Tansu, TansuStorage, TopicReader};
use couponrush_lab::bench::{bare_app, BareArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One issue request on its own connection; (status, body).
async fn issue(addr: SocketAddr, user: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = format!(r#"{{"user_id":"{user}"}}"#);
    let req = format!(
        "POST /v1/events/e1/issue HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_produce_answers_202_only_after_the_brokers_ack() {
    let mut tansu = tokio::task::spawn_blocking(|| Tansu::start(TansuStorage::Memory, None))
        .await
        .unwrap()
        .expect("tansu starts (scripts/dev-up installs it)");
    let brokers = tansu.brokers();
    let topics = Topics::default();
    ensure_topics(
        &KafkaSettings::new(&brokers),
        &topics.specs(2, 1),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let app = bare_app(&BareArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        produce: true,
        brokers: brokers.clone(),
        requests_topic: topics.requests.clone(),
        produce_timeout: Some(Duration::from_secs(2)),
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Acknowledged: the 202's request is the record on the topic.
    let (status, body) = issue(addr, "alice").await;
    assert_eq!(status, 202, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = answer["request_id"].as_str().unwrap().to_string();
    let on_topic = tokio::task::spawn_blocking(move || {
        let reader = TopicReader::new(&brokers, &topics.requests).unwrap();
        let mut seen: Vec<IssueRequest> = Vec::new();
        reader.read_until(
            &mut seen,
            Duration::from_secs(20),
            |r| IssueRequest::parse(&r.payload).unwrap(),
            |s| !s.is_empty(),
        );
        seen
    })
    .await
    .unwrap();
    assert_eq!(on_topic.len(), 1);
    assert_eq!(on_topic[0].request_id.to_string(), id);
    assert_eq!(on_topic[0].user_id, "alice");

    // No broker, no ack: a 503 that says to retry, not a 202.
    tansu.kill();
    let (status, body) = issue(addr, "bob").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("retry"), "{body}");

    // A malformed body is the client's mistake, as at the api.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/events/e1/issue HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 422"), "{out}");
}
