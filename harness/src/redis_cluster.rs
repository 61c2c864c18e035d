//! A real Redis Cluster on loopback ports: three masters with a replica
//! each, made by `redis-cli --cluster create`, every server killed on drop.
//!
//! The servers keep nothing on disk (`--save ''`, no AOF): a master that
//! fails over hands its slots to its replica with whatever that replica
//! had received, which is how a store comes back behind on a cluster. To
//! make a replica truly behind, [`RedisCluster::cut_replica`] freezes it
//! (SIGSTOP) and has its master drop the replication link: the writes that
//! follow reach the master only.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{free_port, wait_for_port, Proc};

/// How long a node may be unreachable before the others mark it failed.
const NODE_TIMEOUT_MS: u64 = 2_000;

/// The longest one `redis-cli` call may take: a frozen (SIGSTOPped) node
/// accepts a connection and never answers, and `WAIT` takes up to 5 s.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest `redis-cli --cluster create` may take (it waits for the
/// nodes to agree on the configuration, with no bound of its own).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// One server of the cluster as `CLUSTER NODES` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its loopback port.
    pub port: u16,
    /// Its node id.
    pub id: String,
    /// The id of its master, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges it serves, for a master.
    pub slots: Vec<(u16, u16)>,
    /// Whether the cluster marks it failed.
    pub failed: bool,
}

/// A Redis Cluster of three masters with a replica each.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<(u16, Proc)>,
    /// The ports of killed nodes, held until the cluster is dropped (see
    /// [`RedisCluster::kill`]).
    held: Vec<HeldPort>,
}

/// A killed node's port, kept: every connection to it is closed at once.
/// Clients still hold the node's address in their slot maps; were another
/// server (another test process's, whose free ports are not this
/// process's) to start on the port, a client would get its answers (a
/// plain redis-server answers nil, not MOVED, for a key it does not have)
/// instead of failing over to the slot's new master.
struct HeldPort {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HeldPort {
    fn hold(port: u16) -> io::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                // The killed process may not have released it yet.
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e),
            }
        };
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name(format!("held-port-{port}"))
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => drop(conn),
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HeldPort {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl RedisCluster {
    /// Starts six servers under `dir` (one directory each), joins them
    /// into a cluster with one replica per master, and waits until every
    /// node reports `cluster_state:ok` and each master has its replica.
    pub fn start(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut nodes = Vec::with_capacity(6);
        for _ in 0..6 {
            // The cluster bus gets a free port of its own (by default it
            // is the port + 10000, which may be in use or ephemeral).
            let (port, bus) = (free_port(), free_port());
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                // A replica may take over however long it was cut off: a
                // failover to a replica that is behind is what the tests need.
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--dir")
                .arg(&node_dir);
            let proc = Proc::spawn(
                "redis-server (cluster)",
                cmd,
                Some(&node_dir.join("redis.log")),
            )?;
            nodes.push((port, proc));
        }
        for (port, _) in &nodes {
            wait_for_port(*port, Duration::from_secs(10))?;
        }
        let cluster = Self {
            dir: dir.to_path_buf(),
            nodes,
            held: Vec::new(),
        };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for (port, _) in &cluster.nodes {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = output_within(create, CREATE_TIMEOUT)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster.wait_healthy(3, Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// A cluster shared by the tests of one test binary that run at once:
    /// started by the first, stopped when the last one drops it. For tests
    /// that neither kill nor fail over its nodes, nor take its recovery
    /// lock or epoch.
    pub fn shared() -> io::Result<Arc<Self>> {
        static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cluster) = shared.upgrade() {
            return Ok(cluster);
        }
        let dir = std::env::temp_dir().join(format!(
            "couponrush-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        let cluster = Arc::new(Self::start(&dir)?);
        *shared = Arc::downgrade(&cluster);
        Ok(cluster)
    }

    /// `redis+cluster://127.0.0.1:<port>,…`: every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The ports of the servers still running.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(p, _)| *p).collect()
    }

    /// Runs `redis-cli -p <port> <args>` and returns its output; an error
    /// after [`CLI_TIMEOUT`] if the node does not answer (it is frozen).
    pub fn cli(&self, port: u16, args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args);
        let out = output_within(cmd, CLI_TIMEOUT)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.starts_with("ERR") {
            return Err(io::Error::other(format!(
                "redis-cli -p {port} {args:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(text)
    }

    /// The cluster as a live node sees it.
    pub fn nodes(&self) -> io::Result<Vec<ClusterNode>> {
        let mut last = io::Error::other("no node of the cluster answers");
        for (port, _) in &self.nodes {
            match self.cli(*port, &["cluster", "nodes"]) {
                Ok(text) => return Ok(parse_nodes(&text)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The slot of `key` (its hash tag's).
    pub fn slot_of(&self, key: &str) -> io::Result<u16> {
        let port = self.nodes.first().map(|(p, _)| *p).unwrap_or(0);
        self.cli(port, &["cluster", "keyslot", key])?
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("cluster keyslot {key}: {e}")))
    }

    /// The port of the master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> io::Result<u16> {
        let slot = self.slot_of(key)?;
        self.nodes()?
            .into_iter()
            .find(|n| !n.failed && n.slots.iter().any(|(a, b)| *a <= slot && slot <= *b))
            .map(|n| n.port)
            .ok_or_else(|| io::Error::other(format!("no live master serves slot {slot}")))
    }

    /// The port of a replica of the master on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> io::Result<u16> {
        let nodes = self.nodes()?;
        let master = nodes
            .iter()
            .find(|n| n.port == master_port)
            .ok_or_else(|| io::Error::other(format!("no node on port {master_port}")))?;
        nodes
            .iter()
            .find(|n| n.master_id.as_deref() == Some(master.id.as_str()) && !n.failed)
            .map(|n| n.port)
            .ok_or_else(|| io::Error::other(format!("the master on {master_port} has no replica")))
    }

    /// Cuts the replica on `replica_port` off its master, so that writes
    /// from now on reach the master only: the replica is frozen (SIGSTOP,
    /// it cannot reconnect) and the master drops its replication link.
    /// [`RedisCluster::take_over`] later promotes it, behind.
    pub fn cut_replica(&self, replica_port: u16, master_port: u16) -> io::Result<()> {
        self.signal(replica_port, Signal::SIGSTOP)?;
        self.cli(master_port, &["client", "kill", "type", "replica"])?;
        Ok(())
    }

    /// Waits until the replicas of `master_port` have acknowledged every
    /// write the master took so far: each replica's acknowledged offset (in
    /// the master's `INFO replication`) reaches the master's replication
    /// offset as it was when called. (`WAIT` cannot tell: it waits for the
    /// writes of its own connection, and a fresh `redis-cli` has made none,
    /// so it answered at once with a replica still syncing, and a promoted
    /// one then had no event at all.)
    pub fn wait_replicated(&self, master_port: u16) -> io::Result<()> {
        self.wait_replicated_within(master_port, Duration::from_secs(60))
    }

    /// [`RedisCluster::wait_replicated`], giving up after `timeout`.
    pub fn wait_replicated_within(&self, master_port: u16, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let info = self.cli(master_port, &["info", "replication"])?;
        let target = replication_field(&info, "master_repl_offset").ok_or_else(|| {
            io::Error::other(format!("no master_repl_offset from {master_port}: {info}"))
        })?;
        loop {
            let info = self.cli(master_port, &["info", "replication"])?;
            let acked = replica_offsets(&info);
            if !acked.is_empty() && acked.iter().all(|o| *o >= target) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the replicas of {master_port} did not acknowledge offset {target} in \
                         {timeout:?} (acknowledged: {acked:?})"
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the server on `port`, and keeps its port until the cluster
    /// is dropped, closing every connection to it ([`HeldPort`]).
    pub fn kill(&mut self, port: u16) {
        if let Some((_, proc)) = self.nodes.iter_mut().find(|(p, _)| *p == port) {
            proc.kill();
            if let Ok(held) = HeldPort::hold(port) {
                self.held.push(held);
            }
        }
    }

    /// Thaws the replica on `replica_port` (if frozen) and makes it take
    /// its master's slots at once (`CLUSTER FAILOVER TAKEOVER`, no
    /// agreement with the master, which may be dead); waits until the
    /// cluster is whole again with it as a master.
    pub fn take_over(&self, replica_port: u16) -> io::Result<()> {
        self.signal(replica_port, Signal::SIGCONT)?;
        self.cli(replica_port, &["cluster", "failover", "takeover"])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let role = self.cli(replica_port, &["role"])?;
            let promoted = role.starts_with("master");
            if promoted && self.state_ok(replica_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the replica on {replica_port} did not take over in 30s: {}; {}",
                        if promoted {
                            "it is a master but its cluster_state is not ok".to_string()
                        } else {
                            format!("its role is still {:?}", role.lines().next().unwrap_or(""))
                        },
                        self.health().unwrap_or_else(|| "every node healthy".into())
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Freezes the server on `port` (SIGSTOP): it answers nothing, and a
    /// master still counts it as a connected replica until its timeout.
    pub fn freeze(&self, port: u16) -> io::Result<()> {
        self.signal(port, Signal::SIGSTOP)
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self, port: u16) -> io::Result<()> {
        self.signal(port, Signal::SIGCONT)
    }

    fn signal(&self, port: u16, signal: Signal) -> io::Result<()> {
        let pid = self
            .nodes
            .iter()
            .find(|(p, _)| *p == port)
            .and_then(|(_, proc)| proc.pid())
            .ok_or_else(|| io::Error::other(format!("no running server on {port}")))?;
        kill(Pid::from_raw(pid as i32), signal).map_err(io::Error::other)
    }

    fn state_ok(&self, port: u16) -> bool {
        self.cli(port, &["cluster", "info"])
            .is_ok_and(|info| info.lines().any(|l| l.trim() == "cluster_state:ok"))
    }

    /// Waits until every node says `cluster_state:ok` and `masters`
    /// masters each have a connected replica; on a timeout, says which
    /// node or master was not there yet.
    fn wait_healthy(&self, masters: usize, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let unhealthy = self.health().or_else(|| {
                let nodes = match self.nodes() {
                    Ok(nodes) => nodes,
                    // Not read is not healthy.
                    Err(e) => return Some(format!("CLUSTER NODES was not read: {e}")),
                };
                let ms: Vec<&ClusterNode> = nodes.iter().filter(|n| !n.slots.is_empty()).collect();
                let lonely: Vec<u16> = ms
                    .iter()
                    .filter(|m| {
                        !nodes
                            .iter()
                            .any(|n| n.master_id.as_deref() == Some(m.id.as_str()))
                    })
                    .map(|m| m.port)
                    .collect();
                (ms.len() != masters || !lonely.is_empty()).then(|| {
                    format!(
                        "{} masters serve slots (want {masters}); masters without a replica: {lonely:?}",
                        ms.len()
                    )
                })
            });
            let Some(why) = unhealthy else {
                return Ok(());
            };
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the cluster in {} did not become healthy in {timeout:?}: {why}",
                        self.dir.display()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// What is wrong with the running nodes, if anything: those not
    /// answering, not saying `cluster_state:ok`, or replicas whose link
    /// to their master is down.
    fn health(&self) -> Option<String> {
        let mut wrong = Vec::new();
        for (port, proc) in &self.nodes {
            if proc.pid().is_none() {
                continue; // killed on purpose
            }
            match self.cli(*port, &["cluster", "info"]) {
                Err(e) => wrong.push(format!("node {port} does not answer ({e})")),
                Ok(info) if !info.lines().any(|l| l.trim() == "cluster_state:ok") => {
                    let state = info
                        .lines()
                        .find(|l| {
                            l.starts_with("cluster_state") || l.starts_with("cluster_slots_ok")
                        })
                        .unwrap_or("no cluster_state")
                        .trim()
                        .to_string();
                    wrong.push(format!("node {port}: {state}"));
                }
                Ok(_) => {}
            }
            if let Ok(info) = self.cli(*port, &["info", "replication"]) {
                if info.contains("role:slave") && !info.contains("master_link_status:up") {
                    wrong.push(format!("replica {port}: link to its master not up"));
                }
            }
        }
        (!wrong.is_empty()).then(|| wrong.join("; "))
    }
}

/// Runs `cmd` to its end, or kills it after `timeout` (a bounded wait,
/// where `Command::output` would hang on a server that never answers).
fn output_within(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read the pipes aside, so a full pipe cannot stall the child.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish in {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, proc) in &mut self.nodes {
            proc.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <master> … <slots>…`.
fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = f[2];
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|x| (x, x)),
                })
                .collect();
            Some(ClusterNode {
                port,
                id: f[0].to_string(),
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                slots,
                failed: flags.contains("fail") && !flags.contains("fail?"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_does_not_finish_is_killed_at_its_timeout() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let err = output_within(cmd, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let mut cmd = Command::new("echo");
        cmd.arg("hello");
        let out = output_within(cmd, Duration::from_secs(10)).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
    }

    #[test]
    fn cluster_nodes_lines_are_parsed() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 12000
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 1426238316232 1426238316232 5 disconnected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].port, 30004);
        assert_eq!(
            nodes[0].master_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        assert_eq!(nodes[1].slots, vec![(5461, 10922)]);
        assert_eq!(nodes[2].slots, vec![(0, 5460), (12000, 12000)]);
        assert!(nodes[3].failed);
        assert!(!nodes[1].failed);
    }
}

/// A `name:value` field of `INFO` as a number.
fn replication_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// The acknowledged offsets of the online replicas in a master's
/// `INFO replication` (`slaveN:ip=…,port=…,state=online,offset=…,lag=…`).
fn replica_offsets(info: &str) -> Vec<u64> {
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
        .filter_map(|l| {
            l.split(',')
                .find_map(|kv| kv.strip_prefix("offset="))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

#[cfg(test)]
mod info_tests {
    use super::*;

    #[test]
    fn offsets_are_read_from_info_replication() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
                    slave0:ip=127.0.0.1,port=7001,state=online,offset=1234,lag=0\r\n\
                    slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
                    master_repl_offset:1300\r\n";
        assert_eq!(replication_field(info, "master_repl_offset"), Some(1300));
        assert_eq!(replica_offsets(info), vec![1234], "online replicas only");
    }
}
