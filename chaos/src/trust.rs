//! Scenarios for the holes a review found in the guarantee (issue 10): a key
//! reused by another user, racing admin `PUT`s before a store loss, and a
//! recovery whose lock expires while it works. Each runs beside a normal
//! audited drop and adds its own checks to the row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use couponrush_core::recovery::read_events;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{Store, DEFAULT_DEDUP_RETENTION};
use couponrush_core::wire::now_micros;
use couponrush_core::DecisionResult;
use couponrush_loadgen::drive::http::{put_event, Endpoint, HttpFactory};
use couponrush_loadgen::drive::TargetFactory;
use hyper::{Method, StatusCode};
use uuid::Uuid;

use super::{
    fraction, longest_wait, lose_redis, plain_offer, rig, sleep_until_load, spec, start_drop,
    ChaosError, Dims, Row, Scenario,
};
use crate::rig::BrokerKind;

/// What the status endpoint said about one request.
struct Told {
    user: String,
    id: Uuid,
    result: DecisionResult,
    rank: Option<u32>,
}

/// Sends an issue request for `user` with `key`; the request id the 202
/// names.
pub(super) async fn issue(
    http: &mut couponrush_loadgen::drive::http::HttpTarget,
    event: &str,
    user: &str,
    key: Uuid,
) -> Option<Uuid> {
    match http
        .call(
            Method::POST,
            &format!("/v1/events/{event}/issue"),
            &[("idempotency-key", key.to_string())],
            format!("{{\"user_id\":\"{user}\"}}").into(),
        )
        .await
    {
        Ok((StatusCode::ACCEPTED, body)) => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["request_id"]
                    .as_str()
                    .and_then(|s| Uuid::try_parse(s).ok())
            }),
        _ => None,
    }
}

/// Polls the status of `id` until decided (or 60 s).
pub(super) async fn decided(
    http: &mut couponrush_loadgen::drive::http::HttpTarget,
    event: &str,
    id: Uuid,
) -> Option<(DecisionResult, Option<u32>)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok((StatusCode::OK, body)) = http
            .call(
                Method::GET,
                &format!("/v1/events/{event}/requests/{id}"),
                &[],
                Default::default(),
            )
            .await
        {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["status"] == "decided" {
                let result = serde_json::from_value(v["decision"]["result"].clone()).ok()?;
                let rank = v["decision"]["issued_rank"].as_u64().map(|r| r as u32);
                return Some((result, rank));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// `reused-key`: beside the drop, pairs of users send the **same**
/// `Idempotency-Key` to a small event. Each must be handed its own request
/// id, and every status answer must be the asker's own decision: an
/// `issued, rank r` answer is checked against the coupon the store holds at
/// rank r (its request and its user).
pub(super) async fn reused_key(
    seed: u64,
    dims: Dims,
    dir: &std::path::Path,
) -> Result<Row, ChaosError> {
    let rig = rig(spec(BrokerKind::TansuMemory, 2), dir).await?;
    let endpoint = Endpoint::parse(&rig.api_url()).await?;
    let small = format!("reused-{}", Uuid::new_v4().simple());
    let pairs = 120u32;
    put_event(&endpoint, &small, pairs / 2, 1, None).await?;
    let (drop, _) = start_drop(&rig, dims, plain_offer(seed)).await?;
    let mut http = HttpFactory {
        endpoint: endpoint.clone(),
        timeout: Duration::from_secs(5),
    }
    .make();
    let mut handed_same = 0u64;
    let mut sent = Vec::new();
    for i in 0..pairs {
        let key = Uuid::now_v7();
        let mut users = [format!("first-{i}"), format!("second-{i}")];
        if fraction(seed * 1000 + u64::from(i)) < 0.5 {
            users.swap(0, 1);
        }
        let a = issue(&mut http, &small, &users[0], key).await;
        let b = issue(&mut http, &small, &users[1], key).await;
        if let (Some(a), Some(b)) = (a, b) {
            handed_same += u64::from(a == b);
            sent.push((users[0].clone(), a));
            sent.push((users[1].clone(), b));
        }
    }
    let mut told = Vec::new();
    for (user, id) in sent {
        if let Some((result, rank)) = decided(&mut http, &small, id).await {
            told.push(Told {
                user,
                id,
                result,
                rank,
            });
        }
    }
    let report = drop.await.map_err(|e| e.to_string())??;
    let mut row = Row::from_report(Scenario::ReusedKey, seed, &report, dir);
    let store = RedisStore::connect(&rig.redis_url()?, DEFAULT_DEDUP_RETENTION)
        .await
        .map_err(|e| e.to_string())?;
    let ledger = store
        .ledger(&small)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the small event is gone")?;
    let holder: HashMap<u32, (Uuid, &str)> = ledger
        .coupons
        .iter()
        .map(|c| (c.rank, (c.request_id, c.user_id.as_str())))
        .collect();
    let issued = told
        .iter()
        .filter(|t| t.result == DecisionResult::Issued)
        .count();
    let wrong_user = told
        .iter()
        .filter(|t| t.result == DecisionResult::Issued)
        .filter(|t| t.rank.and_then(|r| holder.get(&r)) != Some(&(t.id, t.user.as_str())))
        .count();
    row.notes.push(format!(
        "{pairs} key pairs: {} status answers, {issued} issued, {wrong_user} wrong-user statuses, \
         {handed_same} pairs handed one id",
        told.len()
    ));
    row.check(
        handed_same == 0,
        "two users with one key get two request ids",
    );
    row.check(
        wrong_user == 0,
        "every status answer is the asker's own decision",
    );
    row.check(
        told.len() as u32 == pairs * 2,
        format!(
            "every request of the pairs was decided ({} of {})",
            told.len(),
            pairs * 2
        ),
    );
    row.check(
        issued as u32 == pairs / 2,
        "the small event sold out exactly",
    );
    Ok(row)
}

/// The event definitions the log holds, by event (latest generation).
async fn logged_definitions(
    rig: &couponrush_lab::deployment::Deployment,
) -> Result<HashMap<String, (u32, u64)>, ChaosError> {
    let (kafka, topic) = (rig.kafka.clone(), rig.topics.events.clone());
    let defs = tokio::task::spawn_blocking(move || read_events(&kafka, &topic))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(defs
        .into_iter()
        .map(|(k, v)| (k, (v.stock, v.generation)))
        .collect())
}

/// `racing-put`: eight `PUT`s of one event race (each with another stock);
/// store and log must agree on the winner (the highest generation), before
/// and after the store is lost mid-drop and rebuilt from the log.
pub(super) async fn racing_put(
    seed: u64,
    dims: Dims,
    fault_at: f64,
    dir: &std::path::Path,
) -> Result<Row, ChaosError> {
    let mut rig = rig(spec(BrokerKind::TansuMemory, 2), dir).await?;
    let endpoint = Endpoint::parse(&rig.api_url()).await?;
    let raced = format!("raced-{}", Uuid::new_v4().simple());
    let puts: Vec<_> = (0..8u32)
        .map(|i| {
            let (endpoint, raced) = (endpoint.clone(), raced.clone());
            tokio::spawn(async move { put_event(&endpoint, &raced, 100 + i, 1, None).await })
        })
        .collect();
    let mut answered = 0;
    for p in puts {
        if matches!(p.await, Ok(Ok(_))) {
            answered += 1;
        }
    }
    let store = RedisStore::connect(&rig.redis_url()?, DEFAULT_DEDUP_RETENTION)
        .await
        .map_err(|e| e.to_string())?;
    let in_store = |s: Option<couponrush_core::store::EventState>| {
        s.map(|s| (s.stock, s.generation, s.remaining))
    };
    let before = in_store(store.event(&raced).await.map_err(|e| e.to_string())?);
    let logged_before = logged_definitions(&rig).await?.get(&raced).copied();

    let (drop, started) = start_drop(&rig, dims, plain_offer(seed)).await?;
    sleep_until_load(started, fault_at).await;
    let fault = now_micros();
    lose_redis(&mut rig).await?;
    let report = drop.await.map_err(|e| e.to_string())??;
    let mut row = Row::from_report(Scenario::RacingPut, seed, &report, dir);
    row.fault_at_s = Some(fault_at);
    row.recover_s = longest_wait(&report, fault);
    let store = RedisStore::connect(&rig.redis_url()?, DEFAULT_DEDUP_RETENTION)
        .await
        .map_err(|e| e.to_string())?;
    let after = in_store(store.event(&raced).await.map_err(|e| e.to_string())?);
    let logged = logged_before.map(|(stock, generation)| (stock, generation, stock));
    row.notes.push(format!(
        "{answered} of 8 racing PUTs answered; log {logged_before:?}, store before the loss \
         {before:?}, after the rebuild {after:?}"
    ));
    row.check(answered == 8, "every racing PUT was answered");
    row.check(
        logged.is_some() && before == logged,
        "before the loss, the store holds the log's winning definition",
    );
    row.check(
        after == logged,
        "after the rebuild, the store holds the log's winning definition",
    );
    Ok(row)
}

/// The pid of the process that holds the recovery lock as `owner`: the
/// api names itself `coupon-api-<host>-<pid>-<random>`; an issuer is found
/// by the `--client-id` on its command line.
fn recoverer_pid(owner: &str) -> Option<i32> {
    if owner.starts_with("coupon-api-") {
        return owner.rsplit('-').nth(1)?.parse().ok();
    }
    let needle = format!("--client-id\0{owner}\0");
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("coupon-issuer") && cmdline.contains(&needle)).then_some(pid)
    })
}

fn signal(pid: i32, sig: &str) -> Result<(), ChaosError> {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid} failed").into())
    }
}

/// `slow-recovery`: the store is lost mid-drop; the issuer that takes the
/// recovery lock is frozen (SIGSTOP) past the lock's lifetime, so another
/// one rebuilds the store and deciding goes on; then it is thawed. Its
/// rebuild must write nothing over the newer store (it stops, having lost
/// the lock), and the drop's audit must be clean.
pub(super) async fn slow_recovery(
    seed: u64,
    dims: Dims,
    fault_at: f64,
    dir: &std::path::Path,
) -> Result<Row, ChaosError> {
    let mut rig = rig(spec(BrokerKind::TansuMemory, 2), dir).await?;
    let (drop, started) = start_drop(&rig, dims, plain_offer(seed)).await?;
    sleep_until_load(started, fault_at).await;
    let fault = now_micros();
    lose_redis(&mut rig).await?;
    // Whoever takes the lock first is frozen while it waits out the fence.
    let client = redis::Client::open(rig.redis_url()?).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let owner = loop {
        let owner: Option<String> = redis::cmd("GET")
            .arg("cr:recovery")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(o) = owner {
            break o;
        }
        if Instant::now() > deadline {
            return Err("no issuer took the recovery lock within 30 s"
                .to_string()
                .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let pid = recoverer_pid(&owner).ok_or(format!("no process for recoverer {owner}"))?;
    signal(pid, "-STOP")?;
    let frozen = couponrush_core::recovery::LOCK_TTL + Duration::from_secs(8);
    tokio::time::sleep(frozen).await;
    signal(pid, "-CONT")?;
    let report = drop.await.map_err(|e| e.to_string())??;
    let mut row = Row::from_report(Scenario::SlowRecovery, seed, &report, dir);
    row.fault_at_s = Some(fault_at);
    row.recover_s = longest_wait(&report, fault);
    let logs: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    // A rebuild of a lost store (not a first start): the fence waited out,
    // then the recovery finished.
    let rebuilt: usize = logs
        .iter()
        .map(|log| {
            let mut fenced = false;
            log.lines()
                .filter(|line| {
                    if line.contains("waiting out the fence, then rebuilding") {
                        fenced = true;
                    } else if fenced && line.contains("store recovered from the log") {
                        fenced = false;
                        return true;
                    }
                    false
                })
                .count()
        })
        .sum();
    let stopped = logs
        .iter()
        .filter(|l| l.contains("lost the recovery lock while recovering"))
        .count();
    row.notes.push(format!(
        "recoverer {owner} frozen {frozen:?}; {rebuilt} rebuild(s) finished, {stopped} recoverer(s) \
         stopped on a lost lock"
    ));
    row.check(rebuilt >= 1, "another process rebuilt the store");
    row.check(
        stopped >= 1,
        "the frozen recoverer stopped without writing once thawed",
    );
    let _ = rig.running_issuers();
    Ok(row)
}
