//! One connection to Redis: a single server (`redis://…`) or a Redis
//! Cluster (`redis+cluster://host:port,host:port,…`, every listed node a
//! seed), for the store and the waiting line alike.
//!
//! A cluster runs a pipeline on one slot only, so [`RedisConn`] splits a
//! pipeline by the slot of each command's key, sends the parts at once and
//! puts the replies back in order; a command without a key (`SCRIPT LOAD`,
//! `PING`, `INFO`) goes alone, routed by the cluster client, except
//! `SCRIPT LOAD`, sent to every master and never to a replica (the store
//! sees a failover by the promoted replica's missing scripts). What stays atomic is what Redis makes atomic: one
//! command or one script call, on one slot. A transaction
//! (`pipe().atomic()`) must keep to one slot.
//!
//! A quirk of the cluster client, worked around here: a transaction the
//! old master of its slot refuses after a failover (every command
//! `MOVED`, the transaction aborted) does not make it re-read the slot
//! map, as one command's `MOVED` does; a connection that sends only
//! transactions (the api's status lookups) would be refused for ever.
//! [`transaction_on_cluster`] sends one keyed command to the slot (whose
//! `MOVED` does re-read the map) and the transaction again.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::{try_join_all, BoxFuture, FutureExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, Slot};
use redis::{Arg, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

/// The URL scheme of a Redis Cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// A single server's connection, or a cluster's.
#[derive(Clone)]
pub enum RedisConn {
    /// One server (reconnects on its own).
    Single(ConnectionManager),
    /// A Redis Cluster (follows redirects and failovers on its own).
    Cluster(ClusterConnection),
}

/// Why a Redis URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not one this program understands.
    #[error(
        "bad Redis URL {url:?}: {why} (use redis://host:port/db for one server, or \
         redis+cluster://host:port,host:port,… for a Redis Cluster)"
    )]
    Invalid {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Nothing answered.
    #[error("cannot reach Redis at {url}: {source} (is redis-server running? see scripts/dev-up)")]
    Unreachable {
        /// The URL as given.
        url: String,
        /// The client's error.
        source: RedisError,
    },
}

/// The seeds of a `redis+cluster://[user:password@]host:port,host:port,…`
/// URL, as `redis://` URLs; `None` for any other URL.
pub fn cluster_seeds(url: &str) -> Option<Result<Vec<String>, String>> {
    let rest = url.strip_prefix(CLUSTER_SCHEME)?;
    let rest = rest.trim_end_matches('/');
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    if hosts.contains('/') || hosts.contains('?') {
        return Some(Err(
            "a cluster has one database and no options: give host:port pairs only".into(),
        ));
    }
    let seeds: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{auth}{h}"))
        .collect();
    if seeds.is_empty() {
        return Some(Err("no host:port given".into()));
    }
    Some(Ok(seeds))
}

impl RedisConn {
    /// Connects to `url`: `redis://…` (one server) or `redis+cluster://…`.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let invalid = |why: String| ConnectError::Invalid {
            url: url.to_string(),
            why,
        };
        let unreachable = |source| ConnectError::Unreachable {
            url: url.to_string(),
            source,
        };
        match cluster_seeds(url) {
            Some(seeds) => {
                let seeds = seeds.map_err(invalid)?;
                let client = ClusterClientBuilder::new(seeds)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(5))
                    .retries(3)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                let conn = client.get_async_connection().await.map_err(unreachable)?;
                Ok(Self::Cluster(conn))
            }
            None => {
                let client = redis::Client::open(url).map_err(|e| invalid(e.to_string()))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                let conn = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(unreachable)?;
                Ok(Self::Single(conn))
            }
        }
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs a pipeline of commands on the master that serves `key`'s slot
    /// (one server: on it), e.g. a `SCAN` of the keys of one hash tag.
    pub async fn query_on_slot_of<T: redis::FromRedisValue>(
        &self,
        key: &str,
        pipe: &Pipeline,
    ) -> Result<T, RedisError> {
        match self {
            Self::Single(c) => pipe.query_async(&mut c.clone()).await,
            Self::Cluster(c) => {
                use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
                let values = c
                    .clone()
                    .route_pipeline(pipe.clone(), 0, pipe.len(), route)
                    .await?;
                redis::from_redis_value(Value::Array(values)).map_err(Into::into)
            }
        }
    }
}

/// The key a command is routed by: the first key of an `EVAL`/`EVALSHA`
/// with keys, else the first argument of a command that has one; `None`
/// for commands without a key.
/// True for `SCRIPT LOAD`.
fn is_script_load(cmd: &Cmd) -> bool {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        Arg::Simple(b) => Some(b.to_ascii_uppercase()),
        _ => None,
    });
    args.next().as_deref() == Some(b"SCRIPT") && args.next().as_deref() == Some(b"LOAD")
}

fn routing_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" => {
            let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            (keys > 0).then(|| args.get(3).map(|k| k.to_vec()))?
        }
        b"SCRIPT" | b"PING" | b"INFO" | b"CLUSTER" | b"CONFIG" | b"CLIENT" | b"SCAN"
        | b"DBSIZE" | b"FLUSHALL" | b"FLUSHDB" | b"TIME" | b"ROLE" => None,
        _ => args.get(1).map(|k| k.to_vec()),
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => {
                if pipeline.is_transaction() {
                    transaction_on_cluster(c.clone(), pipeline, offset, count)
                } else {
                    split_by_slot(c.clone(), pipeline)
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How many times a transaction refused with `MOVED` is sent again.
const MOVED_RETRIES: u32 = 3;

/// Runs a transaction (one slot) on a cluster; refused with `MOVED` (its
/// slot moved in a failover), the slot map is re-read by one keyed command
/// and the transaction sent again, at most [`MOVED_RETRIES`] times.
fn transaction_on_cluster(
    conn: ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> BoxFuture<'static, Result<Vec<Value>, RedisError>> {
    let pipeline = pipeline.clone();
    async move {
        let mut attempt = 0;
        loop {
            match conn
                .clone()
                .req_packed_commands(&pipeline, offset, count)
                .await
            {
                Err(e) if attempt < MOVED_RETRIES && refused_as_moved(&e) => {
                    attempt += 1;
                    if let Some(key) = pipeline.cmd_iter().find_map(routing_key) {
                        // Its own MOVED (followed) re-reads the slot map;
                        // its answer does not matter.
                        let _ = conn
                            .clone()
                            .req_packed_command(redis::cmd("EXISTS").arg(key))
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
                other => return other,
            }
        }
    }
    .boxed()
}

/// True when Redis refused a command, or a command of an aborted
/// transaction, with `MOVED`.
fn refused_as_moved(e: &RedisError) -> bool {
    let moved = ErrorKind::Server(ServerErrorKind::Moved);
    e.kind() == moved
        || e.clone().into_server_errors().is_some_and(|errs| {
            errs.iter()
                .any(|(_, s)| s.kind() == Some(ServerErrorKind::Moved))
        })
}

/// Runs `pipeline` on a cluster as one pipeline per slot (and keyless
/// commands alone), all at once; the replies in the pipeline's order.
fn split_by_slot(
    conn: ClusterConnection,
    pipeline: &Pipeline,
) -> BoxFuture<'static, Result<Vec<Value>, RedisError>> {
    let mut groups: Vec<(Option<Slot>, Pipeline, Vec<usize>)> = Vec::new();
    let mut by_slot: HashMap<Slot, usize> = HashMap::new();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let slot = routing_key(cmd).map(Slot::for_key);
        let group = match slot.and_then(|s| by_slot.get(&s)) {
            Some(g) => *g,
            None => {
                groups.push((slot, Pipeline::new(), Vec::new()));
                if let Some(s) = slot {
                    by_slot.insert(s, groups.len() - 1);
                }
                groups.len() - 1
            }
        };
        groups[group].1.add_command(cmd.clone());
        groups[group].2.push(i);
    }
    let total = pipeline.len();
    async move {
        let parts = groups.into_iter().map(|(slot, pipe, at)| {
            let mut conn = conn.clone();
            async move {
                let values = match slot {
                    Some(_) => conn.req_packed_commands(&pipe, 0, pipe.len()).await?,
                    None => {
                        let cmd = pipe.cmd_iter().next().expect("a keyless command alone");
                        if is_script_load(cmd) {
                            // Masters only: the cluster client would send it
                            // to every node, and a replica that held the
                            // store's scripts would, once promoted behind
                            // its master, decide on its stale copy unnoticed
                            // (a lost script cache is how a failover is seen).
                            let masters = RoutingInfo::MultiNode((
                                MultipleNodeRoutingInfo::AllMasters,
                                Some(ResponsePolicy::AllSucceeded),
                            ));
                            vec![conn.route_command(cmd.clone(), masters).await?]
                        } else {
                            vec![conn.req_packed_command(cmd).await?]
                        }
                    }
                };
                Ok::<_, RedisError>((at, values))
            }
        });
        let mut out = vec![Value::Nil; total];
        for (at, values) in try_join_all(parts).await? {
            for (i, v) in at.into_iter().zip(values) {
                out[i] = v;
            }
        }
        Ok(out)
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_list_their_seeds() {
        assert_eq!(cluster_seeds("redis://127.0.0.1:6379"), None);
        assert_eq!(
            cluster_seeds("redis+cluster://a:7000,b:7001")
                .unwrap()
                .unwrap(),
            ["redis://a:7000", "redis://b:7001"]
        );
        assert_eq!(
            cluster_seeds("redis+cluster://u:p@a:7000,b:7001/")
                .unwrap()
                .unwrap(),
            ["redis://u:p@a:7000", "redis://u:p@b:7001"]
        );
        assert!(cluster_seeds("redis+cluster://a:7000/2").unwrap().is_err());
        assert!(cluster_seeds("redis+cluster://").unwrap().is_err());
    }

    #[test]
    fn commands_are_routed_by_their_first_key() {
        let mut c = redis::cmd("EVALSHA");
        c.arg("abc").arg(2).arg("cr:{e}:event").arg("x");
        assert_eq!(routing_key(&c).as_deref(), Some(&b"cr:{e}:event"[..]));
        let mut c = redis::cmd("EVALSHA");
        c.arg("abc").arg(0);
        assert_eq!(routing_key(&c), None);
        let mut c = redis::cmd("HGET");
        c.arg("cr:{e}:event").arg("stock");
        assert_eq!(routing_key(&c).as_deref(), Some(&b"cr:{e}:event"[..]));
        let mut c = redis::cmd("SCRIPT");
        c.arg("LOAD").arg("return 1");
        assert_eq!(routing_key(&c), None);
    }
}
