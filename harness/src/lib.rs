//! # couponrush-harness
//!
//! Real components on free loopback ports, for integration tests, the chaos
//! suite and the embedded demo. Nothing here is a mock of Redis or Kafka:
//!
//! - [`Tansu`]: a Kafka-protocol broker (the pinned `tansu` binary that
//!   `scripts/dev-up` installs), in memory or on sqlite (survives SIGKILL).
//! - [`RedisServer`]: a private `redis-server`, for tests that stop, kill or
//!   wipe it; most tests share the one at `REDIS_URL` instead.
//! - [`RedisCluster`]: a real Redis Cluster (three masters with a replica
//!   each, made by `redis-cli --cluster create`), whose masters can be
//!   killed, paused or failed over.
//! - [`MockKafka`]: librdkafka's in-process mock cluster (several brokers,
//!   replication, fault injection), owned by a thread of its own so it can be
//!   shared and driven from any task.
//! - [`Proc`]: one of our binaries (or any program) as a child process that
//!   can be sent SIGTERM or SIGKILL.
//! - [`TopicReader`]: a whole topic read back from its beginning, headers
//!   included, for tests that check what reached the log.
//!
//! Every child is killed when its handle is dropped, so a failing test leaves
//! nothing running.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

mod redis_cluster;
mod topic_reader;

pub use redis_cluster::{ClusterNode, RedisCluster};
pub use topic_reader::{Raw, TopicReader};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// The pinned tansu version (keep in step with `scripts/dev-up`).
pub const TANSU_VERSION: &str = "0.6.0";

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
///
/// Chosen below the kernel's ephemeral range: a port the kernel hands out
/// for `bind(0)` is also what it hands out to outgoing connections, so
/// between this call and the server's bind, any client in any test (a
/// librdkafka connection, say) could take it. Below the range only another
/// explicit bind can, and each process walks the range from its own start.
pub fn free_port() -> u16 {
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let (ephemeral_low, _) = ephemeral_range();
    let top = u32::from(ephemeral_low.max(2048)) - 1;
    let bottom = 1024.max(top.saturating_sub(15_000));
    let span = top - bottom + 1;
    if CURSOR.load(Ordering::Relaxed) == u32::MAX {
        let seed = std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
        let _ =
            CURSOR.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let port = bottom + CURSOR.fetch_add(1, Ordering::Relaxed) % span;
        let port = port as u16;
        // Probe by connecting, not by binding: a probe listener could be
        // inherited by a process another thread forks at that moment and
        // hold the port past the probe.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        match TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return port,
            _ => continue,
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface accepts binds")
}

/// The kernel's range for ephemeral ports (`ip_local_port_range`), or
/// Linux's default.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing listens on 127.0.0.1:{port} after {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Builds this checkout's binaries (`coupon-api`, `coupon-issuer`,
/// `coupon-loadgen`, `coupon-notifier`, …) that a test spawns, as `cargo
/// test --workspace` builds them: `cargo test -p <one package>` alone would
/// not rebuild them. Under `scripts/test` it is a no-op.
///
/// Not `cargo build -p …` of the binaries: cargo unifies features over the
/// packages it is asked for, so that build differs from the workspace's
/// test build, recompiled the binaries and their dependencies in every
/// `scripts/test` (minutes; once it filled the disk here), and replaced the
/// binaries another test lane was starting.
pub fn build_workspace_binaries() {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--locked", "--no-run", "--quiet"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building the workspace's binaries (cargo test --workspace --no-run) failed"
    );
}

/// The log filter of the processes a test or the lab starts: `info`, or
/// `COUPONRUSH_CHILD_LOG` when set (for example `info,librdkafka=debug`
/// with `--kafka-opt debug=cgrp,fetch`). Not `RUST_LOG`: that one is the
/// test's own, and tansu would log gigabytes under a global debug.
pub fn child_log() -> String {
    std::env::var("COUPONRUSH_CHILD_LOG").unwrap_or_else(|_| "info".into())
}

/// The shared Redis of the dev and CI machines (`REDIS_URL`).
pub fn shared_redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Where the tansu binary is: `TANSU_BIN`, else the cache `scripts/dev-up` fills.
pub fn tansu_binary() -> io::Result<PathBuf> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cache = std::env::var("COUPONRUSH_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cache/couponrush")))
        .map_err(|_| io::Error::other("neither COUPONRUSH_CACHE nor HOME is set"))?;
    let bin = cache.join(format!("tansu-{TANSU_VERSION}/bin/tansu"));
    if bin.exists() {
        Ok(bin)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no tansu at {}; run scripts/dev-up --install-only (or set TANSU_BIN)",
                bin.display()
            ),
        ))
    }
}

/// A child process killed on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `log` (or inherited).
    pub fn spawn(name: &str, mut cmd: Command, log: Option<&Path>) -> io::Result<Self> {
        match log {
            Some(path) => {
                let f = std::fs::File::create(path)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// The child's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no chance to commit, flush or leave the group.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            tracing::info!(name = %self.name, "killed");
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit (SIGKILL after).
    /// Returns the exit code of a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                tracing::warn!(name = %self.name, "did not stop after SIGTERM; killing");
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How tansu stores its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TansuStorage {
    /// In memory: fastest, lost with the process.
    Memory,
    /// In a sqlite file: survives SIGKILL and restart.
    Sqlite(PathBuf),
}

/// The index tansu 0.6.0's sqlite schema lacks (`header` has none).
pub const TANSU_HEADER_INDEX: &str = "couponrush_header_by_record";

/// Works around a tansu 0.6.0 quirk of its sqlite engine: its `header`
/// table has no index, and a fetch looks up each record's headers with a
/// query that scans that table whole. Every outcome carries a header
/// (`x-issuer`), so each outcome read costs a scan of every outcome's header
/// written so far: reading the outcomes is quadratic. At the fault suite's
/// full size (40,000 outcomes) tansu then spends a whole core on fetches,
/// its produce and heartbeat answers time out, and after `broker-kill`'s
/// restart the drop stalled for 100 s or for good (docs/RELIABILITY.md,
/// broker quirk 6). Adds the index on the broker's file (idempotent, so a
/// restart on the same file finds it there); Apache Kafka has no such table.
fn index_headers(db: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The schema is written by tansu as it starts: wait for the table.
        let made = rusqlite::Connection::open(db).and_then(|c| {
            c.busy_timeout(Duration::from_secs(10))?;
            c.execute_batch(&format!(
                "CREATE INDEX IF NOT EXISTS {TANSU_HEADER_INDEX} ON header (topition, offset_id)"
            ))
        });
        match made {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "tansu's header table is not there yet");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(io::Error::other(format!(
                    "cannot index tansu's header table in {}: {e}",
                    db.display()
                )))
            }
        }
    }
}

/// A tansu broker on a free loopback port.
pub struct Tansu {
    port: u16,
    storage: TansuStorage,
    log: Option<PathBuf>,
    proc: Proc,
}

impl Tansu {
    /// Starts tansu with `storage` on a free port and waits until it accepts
    /// connections. `log` receives its output.
    pub fn start(storage: TansuStorage, log: Option<PathBuf>) -> io::Result<Self> {
        let port = free_port();
        let proc = Self::spawn(port, &storage, log.as_deref())?;
        Ok(Self {
            port,
            storage,
            log,
            proc,
        })
    }

    fn spawn(port: u16, storage: &TansuStorage, log: Option<&Path>) -> io::Result<Proc> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(tansu_binary()?);
        // tansu resolves a sqlite path against its working directory, even
        // an absolute one: run it in the file's directory, name the file.
        let engine = match storage {
            TansuStorage::Memory => "memory://tansu/".to_string(),
            TansuStorage::Sqlite(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                    cmd.current_dir(dir);
                }
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "tansu.db".into());
                format!("sqlite://{name}")
            }
        };
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", &engine]);
        let proc = Proc::spawn("tansu", cmd, log)?;
        wait_for_port(port, Duration::from_secs(20))?;
        if let TansuStorage::Sqlite(p) = storage {
            index_headers(p)?;
        }
        Ok(proc)
    }

    /// `bootstrap.servers` for this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL the broker.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Starts the broker again on the same port and storage.
    pub fn restart(&mut self) -> io::Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(self.port, &self.storage, self.log.as_deref())?;
        Ok(())
    }
}

/// A private redis-server on a free loopback port.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    appendonly: bool,
    replica_of: Option<u16>,
    proc: Proc,
}

impl RedisServer {
    /// Starts redis-server in `dir` (its AOF lives there when `appendonly`).
    pub fn start(dir: &Path, appendonly: bool) -> io::Result<Self> {
        let port = free_port();
        std::fs::create_dir_all(dir)?;
        let proc = Self::spawn(port, dir, appendonly, None)?;
        Ok(Self {
            port,
            dir: dir.to_path_buf(),
            appendonly,
            replica_of: None,
            proc,
        })
    }

    /// Starts a replica of this server in `dir` (a directory of its own),
    /// on another free port. Promote it with `REPLICAOF NO ONE`, as a
    /// failover does.
    pub fn start_replica(&self, dir: &Path) -> io::Result<Self> {
        let port = free_port();
        std::fs::create_dir_all(dir)?;
        let proc = Self::spawn(port, dir, self.appendonly, Some(self.port))?;
        Ok(Self {
            port,
            dir: dir.to_path_buf(),
            appendonly: self.appendonly,
            replica_of: Some(self.port),
            proc,
        })
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn spawn(port: u16, dir: &Path, appendonly: bool, replica_of: Option<u16>) -> io::Result<Proc> {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
        ])
        .args(["--appendonly", if appendonly { "yes" } else { "no" }])
        .args(["--appendfsync", "always"])
        .arg("--dir")
        .arg(dir);
        if let Some(master) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let proc = Proc::spawn("redis-server", cmd, Some(&dir.join("redis.log")))?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok(proc)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same port; with `wipe`, its files are deleted
    /// first, so it comes back empty (a lost store). Without, it loads what
    /// it last wrote: its AOF, or the snapshot of its last `SAVE`, so it
    /// can come back behind (a stale store).
    pub fn restart(&mut self, wipe: bool) -> io::Result<()> {
        self.proc.kill();
        if wipe {
            for entry in std::fs::read_dir(&self.dir)? {
                let p = entry?.path();
                if p.file_name().is_some_and(|n| n != "redis.log") {
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p)?;
                    } else {
                        std::fs::remove_file(&p)?;
                    }
                }
            }
        }
        self.proc = Self::spawn(self.port, &self.dir, self.appendonly, self.replica_of)?;
        Ok(())
    }
}

/// A fault to inject into the mock cluster.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Disconnect a broker and refuse new connections.
    BrokerDown(i32),
    /// Let it accept connections again.
    BrokerUp(i32),
    /// Move a partition's leadership to a broker.
    Leader {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// New leader.
        broker: i32,
    },
    /// The next requests of this kind fail with these errors, in order.
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
    /// Add round-trip delay to a broker (-1: all).
    Rtt(i32, Duration),
    /// Make a broker the coordinator of a consumer group (its commits).
    GroupCoordinator(String, i32),
}

enum MockCmd {
    CreateTopic(String, i32, i32, mpsc::Sender<Result<(), String>>),
    Fault(Fault, mpsc::Sender<Result<(), String>>),
}

/// librdkafka's mock cluster, owned by its own thread.
pub struct MockKafka {
    bootstrap: String,
    tx: Option<mpsc::Sender<MockCmd>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MockKafka {
    /// Starts a mock cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<MockCmd>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let thread = thread::Builder::new()
            .name("mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Runs until every sender is dropped.
                for cmd in rx {
                    match cmd {
                        MockCmd::CreateTopic(name, partitions, replication, reply) => {
                            let r = cluster
                                .create_topic(&name, partitions, replication)
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                        MockCmd::Fault(fault, reply) => {
                            let r = match fault {
                                Fault::BrokerDown(b) => cluster.broker_down(b),
                                Fault::BrokerUp(b) => cluster.broker_up(b),
                                Fault::Leader {
                                    topic,
                                    partition,
                                    broker,
                                } => cluster.partition_leader(&topic, partition, Some(broker)),
                                Fault::RequestErrors(key, errs) => {
                                    cluster.request_errors(key, &errs);
                                    Ok(())
                                }
                                Fault::Rtt(b, d) => cluster.broker_round_trip_time(b, d),
                                Fault::GroupCoordinator(group, b) => {
                                    cluster.coordinator(MockCoordinator::Group(group), b)
                                }
                            };
                            let _ = reply.send(r.map_err(|e| e.to_string()));
                        }
                    }
                }
            })?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| io::Error::other("mock cluster thread died"))?
            .map_err(io::Error::other)?;
        Ok(Self {
            bootstrap,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// `bootstrap.servers` of the mock cluster.
    pub fn brokers(&self) -> String {
        self.bootstrap.clone()
    }

    fn call(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<(), String>>) -> MockCmd,
    ) -> io::Result<()> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("present until drop")
            .send(make(reply_tx))
            .map_err(|_| io::Error::other("mock cluster thread died"))?;
        reply_rx
            .recv()
            .map_err(|_| io::Error::other("mock cluster thread died"))?
            .map_err(io::Error::other)
    }

    /// Creates a topic (the mock cluster does not implement CreateTopics).
    pub fn create_topic(&self, name: &str, partitions: i32, replication: i32) -> io::Result<()> {
        self.call(|r| MockCmd::CreateTopic(name.to_string(), partitions, replication, r))
    }

    /// Injects a fault.
    pub fn inject(&self, fault: Fault) -> io::Result<()> {
        self.call(|r| MockCmd::Fault(fault, r))
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_cluster_creates_topics_and_takes_faults() {
        let mock = MockKafka::start(3).unwrap();
        assert!(mock.brokers().contains("127.0.0.1") || mock.brokers().contains("localhost"));
        mock.create_topic("t", 4, 3).unwrap();
        mock.inject(Fault::BrokerDown(2)).unwrap();
        mock.inject(Fault::BrokerUp(2)).unwrap();
        mock.inject(Fault::Leader {
            topic: "t".into(),
            partition: 0,
            broker: 2,
        })
        .unwrap();
    }

    #[test]
    fn free_ports_are_bindable_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let p = free_port();
            assert!(!(low..=high).contains(&p), "{p} is in {low}..={high}");
            assert!(seen.insert(p), "{p} handed out twice");
            TcpListener::bind(("127.0.0.1", p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn killed_processes_stop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn("sleep", cmd, None).unwrap();
        assert!(p.is_running());
        p.kill();
        assert!(!p.is_running());
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn("sleep", cmd, None).unwrap();
        // sleep dies of SIGTERM (no exit code) well within the timeout.
        assert_eq!(p.terminate(Duration::from_secs(5)), None);
        assert!(!p.is_running());
    }
}
