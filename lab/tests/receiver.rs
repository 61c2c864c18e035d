//! The webhook receiver over real HTTP on loopback: it counts deliveries by
//! `Idempotency-Key`, answers a duplicate 2xx without counting it as a new
//! coupon, and fails or stalls when told to through `POST /control`.

use std::time::{Duration, Instant};

use couponrush_lab::receiver::{Receiver, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request on its own connection; (status, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let key = key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

async fn stats(addr: std::net::SocketAddr) -> Stats {
    let (status, body) = http(addr, "GET", "/stats", None, "").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

const COUPON: &str = r#"{"event_id":"e","request_id":"r","user_id":"u","issued_rank":1,"generation":1,"state":"issued","decided_at":1}"#;

#[tokio::test]
async fn the_receiver_counts_deliveries_by_key_and_acknowledges_duplicates() {
    let r = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let a = r.addr();
    assert_eq!(
        http(a, "POST", "/webhook", Some("e:1:a"), COUPON).await.0,
        200
    );
    assert_eq!(
        http(a, "POST", "/webhook", Some("e:1:a"), COUPON).await.0,
        200
    );
    assert_eq!(
        http(a, "POST", "/webhook", Some("e:1:b"), COUPON).await.0,
        200
    );
    assert_eq!(http(a, "POST", "/webhook", None, COUPON).await.0, 400);
    assert_eq!(
        http(a, "POST", "/webhook", Some("e:1:c"), "nope").await.0,
        400
    );
    let s = stats(a).await;
    assert_eq!(
        (
            s.received,
            s.acknowledged,
            s.unique_keys,
            s.duplicates,
            s.rejected,
            s.refused
        ),
        (5, 3, 2, 1, 2, 0),
        "{s:?}"
    );
    assert_eq!(s, r.stats(), "the handle and GET /stats agree");
    assert_eq!(r.counts()["e:1:a"], 2);
    assert_eq!(r.body("e:1:b").unwrap()["state"], "issued");
    assert!(r.body("e:1:c").is_none());
}

#[tokio::test]
async fn told_to_fail_it_refuses_deliveries_until_the_time_is_up() {
    let r = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let a = r.addr();
    let (status, body) = http(a, "POST", "/control", None, r#"{"fail_for_ms":400}"#).await;
    assert_eq!(status, 200);
    assert!(body.contains("failing_for_ms"), "{body}");
    assert_eq!(http(a, "POST", "/webhook", Some("k"), COUPON).await.0, 503);
    assert!(stats(a).await.failing_for_ms > 0);
    // Back once the time is up (waited for, not assumed).
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats(a).await.failing_for_ms > 0 {
        assert!(Instant::now() < deadline, "still failing after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http(a, "POST", "/webhook", Some("k"), COUPON).await.0, 200);
    let s = stats(a).await;
    assert_eq!((s.refused, s.unique_keys, s.duplicates), (1, 1, 0), "{s:?}");
    // A control body that is not one is refused, saying what is expected.
    let (status, body) = http(a, "POST", "/control", None, "fail please").await;
    assert_eq!(status, 400);
    assert!(body.contains("fail_for_ms"), "{body}");
    // And told to stop failing at once.
    r.fail_for(Duration::from_secs(3600));
    assert_eq!(http(a, "POST", "/webhook", Some("k2"), COUPON).await.0, 503);
    http(a, "POST", "/control", None, r#"{"fail_for_ms":0}"#).await;
    assert_eq!(http(a, "POST", "/webhook", Some("k2"), COUPON).await.0, 200);
}

#[tokio::test]
async fn told_to_stall_it_acts_on_a_delivery_before_answering_late() {
    let r = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let a = r.addr();
    http(a, "POST", "/control", None, r#"{"stall_ms":2000}"#).await;
    assert_eq!(stats(a).await.stall_ms, 2000);
    // The client gives up long before the answer...
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        http(a, "POST", "/webhook", Some("slow"), COUPON),
    )
    .await;
    assert!(gave_up.is_err(), "the answer waits for the stall");
    // ...but the endpoint has the coupon: its retry is a duplicate.
    assert_eq!(r.counts().get("slow"), Some(&1));
    r.stall(Duration::ZERO);
    assert_eq!(
        http(a, "POST", "/webhook", Some("slow"), COUPON).await.0,
        200
    );
    let s = r.stats();
    assert_eq!((s.unique_keys, s.duplicates), (1, 1), "{s:?}");
}
