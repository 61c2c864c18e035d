//! A deployment of real processes for the chaos suite: a broker (tansu, or
//! librdkafka's mock cluster in this process, reached over TCP), a private
//! redis-server, and `coupon-api` and `coupon-issuer` as child processes
//! that can be killed, restarted, scaled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use couponrush_core::Topics;
use couponrush_harness::{
    free_port, wait_for_port, MockKafka, Proc, RedisServer, Tansu, TansuStorage,
};

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// tansu, in memory.
    TansuMemory,
    /// tansu on sqlite: survives SIGKILL.
    TansuSqlite,
    /// librdkafka's mock cluster (3 brokers), for injected faults.
    Mock,
}

/// The running broker.
pub enum Kafka {
    /// A tansu process.
    Tansu(Tansu),
    /// The mock cluster.
    Mock(MockKafka),
}

/// What to start.
#[derive(Debug, Clone)]
pub struct RigSpec {
    /// The broker.
    pub broker: Broker,
    /// Request partitions.
    pub partitions: i32,
    /// Issuers started at once.
    pub issuers: usize,
    /// Extra flags for the api.
    pub api_args: Vec<String>,
    /// Redis with an append-only file.
    pub redis_aof: bool,
    /// Extra librdkafka properties for the api and the issuers.
    pub kafka_opts: Vec<String>,
}

/// Where our binaries are: beside this executable (a release or debug build
/// of the workspace), or one directory up (a test binary in `deps/`).
pub fn binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        if let Some(d) = &dir {
            let candidate = d.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    Err(format!(
        "cannot find {name} beside {}; build the workspace first (cargo build --workspace)",
        exe.display()
    ))
}

/// A command for one of our binaries that sees none of the user's
/// environment but what a process needs to run (`PATH`, `HOME`, temp dir,
/// backtraces): an exported `ADMIN_TOKEN` or `KAFKA_OPTS` is meant for the
/// user's own deployment, not for this private one, whose clients would not
/// know it. Everything the rig wants is passed as flags.
fn our_binary(name: &str) -> Result<Command, String> {
    let mut cmd = Command::new(binary(name)?);
    cmd.env_clear();
    for keep in ["PATH", "HOME", "TMPDIR", "RUST_BACKTRACE"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    Ok(cmd)
}

/// A running deployment.
pub struct Rig {
    /// Logs and data.
    pub dir: PathBuf,
    /// The broker.
    pub kafka: Kafka,
    /// Bootstrap servers.
    pub brokers: String,
    /// The store.
    pub redis: RedisServer,
    /// The api.
    pub api: Proc,
    /// Its address.
    pub api_addr: SocketAddr,
    /// Issuer slots (None: stopped).
    pub issuers: Vec<Option<Proc>>,
    /// Each issuer slot's Prometheus address.
    pub issuer_metrics: Vec<SocketAddr>,
    /// Topic names.
    pub topics: Topics,
    group: String,
    spawned: usize,
    kafka_opts: Vec<String>,
}

/// Issuer flags that keep fault recovery quick in a test: a short session
/// (a dead member is noticed in seconds) and a short fence.
const ISSUER_ARGS: [&str; 8] = [
    "--session-timeout",
    "6s",
    "--publish-timeout",
    "3s",
    "--recovery-fence",
    "5s",
    "--batch-size",
    "500",
];

impl Rig {
    /// Starts everything and waits until the api answers.
    pub async fn start(spec: &RigSpec, dir: &Path) -> Result<Rig, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let topics = Topics::default();
        let (kafka, brokers) = match spec.broker {
            Broker::TansuMemory | Broker::TansuSqlite => {
                let storage = if spec.broker == Broker::TansuSqlite {
                    TansuStorage::Sqlite(dir.join("tansu.db"))
                } else {
                    TansuStorage::Memory
                };
                let t = Tansu::start(storage, Some(dir.join("tansu.log")))
                    .map_err(|e| e.to_string())?;
                let b = t.brokers();
                (Kafka::Tansu(t), b)
            }
            Broker::Mock => {
                let m = MockKafka::start(3).map_err(|e| e.to_string())?;
                for t in topics.specs(spec.partitions, 3) {
                    m.create_topic(&t.name, t.partitions, t.replication)
                        .map_err(|e| e.to_string())?;
                }
                let b = m.brokers();
                (Kafka::Mock(m), b)
            }
        };
        let redis =
            RedisServer::start(&dir.join("redis"), spec.redis_aof).map_err(|e| e.to_string())?;
        let port = free_port();
        let api_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
        let mut cmd = our_binary("coupon-api")?;
        cmd.args([
            "--listen",
            &api_addr.to_string(),
            "--brokers",
            &brokers,
            "--redis",
            &redis.url(),
        ])
        .args(["--recovery-fence", "5s"])
        .args(&spec.api_args)
        .env("RUST_LOG", "info");
        if spec.broker != Broker::Mock {
            cmd.args(["--topic-partitions", &spec.partitions.to_string()]);
        }
        let api = Proc::spawn("coupon-api", cmd, Some(&dir.join("api.log")))
            .map_err(|e| e.to_string())?;
        wait_for_port(port, Duration::from_secs(30)).map_err(|e| {
            format!(
                "the api did not start: {e} (see {})",
                dir.join("api.log").display()
            )
        })?;
        let mut rig = Rig {
            dir: dir.to_path_buf(),
            kafka,
            brokers,
            redis,
            api,
            api_addr,
            issuers: Vec::new(),
            issuer_metrics: Vec::new(),
            topics,
            group: format!("chaos-{}", uuid::Uuid::new_v4().simple()),
            spawned: 0,
            kafka_opts: spec.kafka_opts.clone(),
        };
        for _ in 0..spec.issuers {
            rig.add_issuer()?;
        }
        Ok(rig)
    }

    /// Starts one more issuer; returns its slot.
    pub fn add_issuer(&mut self) -> Result<usize, String> {
        let n = self.spawned;
        self.spawned += 1;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let mut cmd = our_binary("coupon-issuer")?;
        cmd.args(["--brokers", &self.brokers, "--redis", &self.redis.url()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args([
                "--group-id",
                &self.group,
                "--client-id",
                &format!("issuer-{n}"),
            ])
            .args(ISSUER_ARGS)
            .env("RUST_LOG", "info");
        for opt in &self.kafka_opts {
            cmd.args(["--kafka-opt", opt]);
        }
        let p = Proc::spawn(
            &format!("issuer-{n}"),
            cmd,
            Some(&self.dir.join(format!("issuer-{n}.log"))),
        )
        .map_err(|e| e.to_string())?;
        self.issuers.push(Some(p));
        self.issuer_metrics.push(metrics);
        Ok(self.issuers.len() - 1)
    }

    /// SIGKILL an issuer (no commit, no leave).
    pub fn kill_issuer(&mut self, slot: usize) {
        if let Some(mut p) = self.issuers.get_mut(slot).and_then(Option::take) {
            p.kill();
        }
    }

    /// SIGTERM an issuer and wait for its clean exit (finish batch, commit, leave).
    pub fn stop_issuer(&mut self, slot: usize) -> Option<i32> {
        self.issuers
            .get_mut(slot)
            .and_then(Option::take)
            .and_then(|mut p| p.terminate(Duration::from_secs(30)))
    }

    /// Issuers running now.
    pub fn running_issuers(&mut self) -> usize {
        self.issuers
            .iter_mut()
            .filter_map(Option::as_mut)
            .map(|p| p.is_running())
            .filter(|running| *running)
            .count()
    }

    /// The api's base URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// Resident memory of the api, in KiB (0 if unknown).
    pub fn api_rss_kib(&self) -> u64 {
        self.api.pid().map_or(0, rss_kib)
    }

    /// Whether the api process is alive.
    pub fn api_alive(&mut self) -> bool {
        self.api.is_running()
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
