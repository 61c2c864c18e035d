//! Hostile HTTP: malformed and hostile requests written byte by byte over
//! raw TCP (so they can be invalid HTTP too), to prove the api answers every
//! one with a 4xx, never a 5xx, and survives. Each case is a pure function of
//! (seed, index), so a failing case can be replayed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// What the fuzz saw.
#[derive(Debug, Default, Clone)]
pub struct FuzzReport {
    /// Requests written.
    pub sent: u64,
    /// Answers by status class and code (`400`, `404`, `202`...), plus
    /// `closed` (the server closed without answering: invalid HTTP) and
    /// `timeout`.
    pub answers: BTreeMap<String, u64>,
    /// 5xx answers (must be 0).
    pub server_errors: u64,
    /// The first few 5xx cases, for replay: (index, first bytes).
    pub examples: Vec<(u64, String)>,
}

/// One hostile request: raw bytes, and whether to stall half-way.
pub struct Case {
    /// Bytes to write.
    pub bytes: Vec<u8>,
    /// Write the first half, wait, then the rest (a slow client).
    pub slow: bool,
    /// The body is shorter than declared: the client closes its side after it.
    pub truncated: bool,
}

const ODD_STRINGS: [&str; 12] = [
    "",
    " ",
    "\u{202e}evil",
    "\u{200b}",
    "🎟️🎟️🎟️",
    "a\u{0}b",
    "a\nb",
    "\\\"",
    "%00",
    "../../etc/passwd",
    "<script>",
    "𝓤𝓷𝓲𝓬𝓸𝓭𝓮",
];

fn pick<'a, T>(rng: &mut SmallRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn random_bytes(rng: &mut SmallRng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.random()).collect()
}

/// The `index`-th case of `seed`, aimed at `event` (which exists).
pub fn case(seed: u64, index: u64, event: &str) -> Case {
    let mut rng = SmallRng::seed_from_u64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let user = (*pick(&mut rng, &ODD_STRINGS)).to_string();
    let json_user = serde_json::to_string(&user).expect("a string");
    let bodies: Vec<Vec<u8>> = vec![
        format!("{{\"user_id\":{json_user}}}").into_bytes(),
        b"{\"user_id\":".to_vec(),
        b"{\"user_id\":12}".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"{\"user_id\":\"a\",\"stock\":1000000}".to_vec(),
        random_bytes(&mut rng, 64),
        vec![b'{'; 5000],
        format!("{{\"user_id\":\"{}\"}}", "x".repeat(200)).into_bytes(),
        vec![0xff, 0xfe, 0xfd],
        b"{\"user_id\":\"\\ud800\"}".to_vec(),
    ];
    let body = pick(&mut rng, &bodies).clone();
    let paths = [
        format!("/v1/events/{event}/issue"),
        "/v1/events/no-such-event/issue".to_string(),
        "/v1/events/%7B%7D/issue".to_string(),
        format!("/v1/events/{}/issue", "e".repeat(300)),
        "/v1/events//issue".to_string(),
        "/v1/requests/not-a-uuid".to_string(),
        format!("/v1/requests/{}", Uuid::from_u128(rng.random())),
        format!("/v1/events/{event}"),
        "/../../etc/passwd".to_string(),
        "/v1/events/%ff%fe/issue".to_string(),
    ];
    let path = pick(&mut rng, &paths).clone();
    let method = *pick(
        &mut rng,
        &[
            "POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "BREW",
        ],
    );
    let ctype = *pick(
        &mut rng,
        &[
            "application/json",
            "application/json",
            "text/plain",
            "application/xml",
            "",
            "application/json; charset=latin1",
        ],
    );
    let key = match rng.random_range(0..5) {
        0 => Some("not-a-uuid".to_string()),
        1 => Some(Uuid::from_u128(rng.random()).to_string()),
        2 => Some("🎟️".to_string()),
        _ => None,
    };
    let kind = rng.random_range(0..20);
    let bytes = match kind {
        // Not HTTP at all.
        0 => random_bytes(&mut rng, 200),
        // A request line and nothing else, then the connection closes.
        1 => format!("{method} {path} HTTP/1.1\r\n").into_bytes(),
        // A Content-Length that lies (longer than the body): a truncated body.
        2 => {
            let mut b = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len() + 50
            )
            .into_bytes();
            b.extend_from_slice(&body);
            b
        }
        // A huge declared body.
        3 => format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n{{"
        )
        .into_bytes(),
        // Garbage headers.
        4 => format!("POST {path} HTTP/1.1\r\nHost: x\r\n\u{0}bad: \u{1}\r\n\r\n").into_bytes(),
        // Chunked with a broken chunk.
        5 => format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
        )
        .into_bytes(),
        // A well-formed request with hostile parts.
        _ => {
            let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
            if !ctype.is_empty() {
                head.push_str(&format!("Content-Type: {ctype}\r\n"));
            }
            if let Some(k) = &key {
                head.push_str(&format!("Idempotency-Key: {k}\r\n"));
            }
            head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
            let mut b = head.into_bytes();
            b.extend_from_slice(&body);
            b
        }
    };
    Case {
        bytes,
        slow: rng.random_range(0..200) == 0,
        truncated: (1..=3).contains(&kind),
    }
}

async fn one(addr: SocketAddr, case: &Case) -> String {
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|_| "connect".to_string())?;
        if case.slow {
            let half = case.bytes.len() / 2;
            s.write_all(&case.bytes[..half])
                .await
                .map_err(|_| "closed".to_string())?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(&case.bytes[half..])
                .await
                .map_err(|_| "closed".to_string())?;
        } else {
            s.write_all(&case.bytes)
                .await
                .map_err(|_| "closed".to_string())?;
        }
        if case.truncated {
            // The client gives up half-way through its body.
            let _ = s.shutdown().await;
        }
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            match s.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let line = String::from_utf8_lossy(&buf[..got]).to_string();
        Ok::<_, String>(match line.split(' ').nth(1) {
            Some(code) if line.starts_with("HTTP/1.") && code.len() == 3 => code.to_string(),
            _ => "closed".to_string(),
        })
    };
    match tokio::time::timeout(Duration::from_secs(15), exchange).await {
        Ok(Ok(code)) => code,
        Ok(Err(kind)) => kind,
        Err(_) => "timeout".into(),
    }
}

/// Sends `count` cases at `concurrency`, bounded by `deadline`.
pub async fn fuzz(
    addr: SocketAddr,
    event: &str,
    seed: u64,
    count: u64,
    concurrency: usize,
    deadline: Duration,
) -> FuzzReport {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let until = Instant::now() + deadline;
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, event) = (next.clone(), event.to_string());
        tasks.push(tokio::spawn(async move {
            let mut r = FuzzReport::default();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count || Instant::now() > until {
                    break;
                }
                let c = case(seed, i, &event);
                let code = one(addr, &c).await;
                r.sent += 1;
                if code.starts_with('5') {
                    r.server_errors += 1;
                    if r.examples.len() < 5 {
                        r.examples.push((
                            i,
                            String::from_utf8_lossy(&c.bytes[..c.bytes.len().min(120)])
                                .into_owned(),
                        ));
                    }
                }
                *r.answers.entry(code).or_default() += 1;
            }
            r
        }));
    }
    let mut total = FuzzReport::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.sent += r.sent;
            total.server_errors += r.server_errors;
            total.examples.extend(r.examples);
            for (k, v) in r.answers {
                *total.answers.entry(k).or_default() += v;
            }
        }
    }
    total
}

/// Opens `n` connections that send a request's first bytes and then stall
/// (slowloris); returns how many the server closed within `wait`.
pub async fn slowloris(addr: SocketAddr, n: usize, wait: Duration) -> usize {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else { return false };
            let head = if i % 2 == 0 {
                // Headers never finish.
                "POST /v1/events/x/issue HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_string()
            } else {
                // Headers finish, the body never does.
                "POST /v1/events/x/issue HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"us".to_string()
            };
            if s.write_all(head.as_bytes()).await.is_err() {
                return true;
            }
            let mut buf = [0u8; 256];
            // Closed (0 bytes) or answered (a 408): either way, not held forever.
            tokio::time::timeout(wait, s.read(&mut buf)).await.is_ok()
        }));
    }
    let mut closed = 0;
    for t in tasks {
        if matches!(t.await, Ok(true)) {
            closed += 1;
        }
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_reproducible_and_varied() {
        let a = case(7, 42, "e");
        let b = case(7, 42, "e");
        assert_eq!(a.bytes, b.bytes);
        let distinct: std::collections::HashSet<Vec<u8>> =
            (0..500).map(|i| case(7, i, "e").bytes).collect();
        assert!(distinct.len() > 400, "{} distinct of 500", distinct.len());
        let http = (0..500)
            .filter(|i| case(7, *i, "e").bytes.starts_with(b"POST "))
            .count();
        assert!(
            http > 100,
            "mostly well-formed enough to reach the handlers: {http}"
        );
    }
}
