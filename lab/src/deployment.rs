//! One deployment of couponrush, started and stopped as one: a Kafka, a
//! store, the api and N issuers. The demo, the sweep, the benches, the fault
//! suite and the integration tests all start theirs here, so there is one
//! way to wire the pipeline.
//!
//! The members run either as tasks in this process ([`Members::InProcess`]:
//! quick to start, what the demo and sweeps use) or as `coupon-api` and
//! `coupon-issuer` child processes of this build ([`Members::Processes`]:
//! what the fault suite kills, restarts and scales). Private brokers and
//! stores (the mock cluster, tansu, a redis-server) live as long as the
//! deployment; external ones are only used, on fresh topic names, so each
//! deployment starts from empty topics and a fresh consumer group.
//!
//! The processes a deployment starts for itself never read the user's
//! environment: an exported `ADMIN_TOKEN` or `KAFKA_OPTS` is meant for the
//! user's own processes, not for this private one, whose clients would not
//! know it. Everything is passed explicitly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use couponrush_core::kafka::{ensure_topics, KafkaSettings};
use couponrush_core::producer::RequestProducer;
use couponrush_core::store::memory::MemoryStore;
use couponrush_core::store::redis::RedisStore;
use couponrush_core::store::{Store, DEFAULT_DEDUP_RETENTION};
use couponrush_core::{Partitioner, Topics};
use couponrush_harness::{
    free_port, wait_for_port, MockKafka, Proc, RedisServer, Tansu, TansuStorage,
};
use couponrush_issuer::experiment::Arms;
use couponrush_issuer::{Probe, Totals};
use couponrush_loadgen::dashboard::{Dashboard, DashboardArgs};
use couponrush_loadgen::drive::holders::HoldPlan;
use couponrush_loadgen::drive::http::Endpoint;
use couponrush_loadgen::drive::LoadPlan;
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::report::Report;
use couponrush_loadgen::run::{run_drop_with_holds, DropRun, Via};

use crate::LabError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Which Kafka.
#[derive(Debug, Clone)]
pub enum KafkaChoice {
    /// librdkafka's mock cluster in this process with this many brokers
    /// (replication = brokers, at most 3); children reach it over TCP.
    Embedded(i32),
    /// A private tansu on a free loopback port, stopped with the deployment.
    Tansu(TansuStorage),
    /// Brokers someone else runs.
    External(KafkaSettings),
}

/// The store a lab command's `--redis` flag chose: that Redis, or the
/// in-memory store.
pub fn store_choice(redis: Option<&str>) -> StoreChoice {
    redis.map_or(StoreChoice::Memory, |url| {
        StoreChoice::Redis(url.to_string())
    })
}

impl KafkaChoice {
    /// `brokers` if given, else an embedded cluster of `embedded` brokers.
    pub fn brokers_or_embedded(brokers: Option<&str>, embedded: i32) -> Self {
        match brokers {
            Some(b) => KafkaChoice::External(KafkaSettings::new(b)),
            None => KafkaChoice::Embedded(embedded),
        }
    }
}

/// Which store.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// The in-memory store (members in this process only).
    Memory,
    /// A Redis someone else runs.
    Redis(String),
    /// A private redis-server on a free loopback port, stopped with the
    /// deployment; with an append-only file when `aof`.
    PrivateRedis {
        /// Keep an append-only file (survives a restart).
        aof: bool,
    },
}

/// How the api and the issuers run.
#[derive(Debug, Clone)]
pub enum Members {
    /// Tasks in this process.
    InProcess,
    /// Child processes of this build's binaries, with their logs in the
    /// deployment's directory.
    Processes {
        /// Extra flags for `coupon-api`.
        api_args: Vec<String>,
        /// Extra flags for every `coupon-issuer`.
        issuer_args: Vec<String>,
    },
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The Kafka.
    pub kafka: KafkaChoice,
    /// The store.
    pub store: StoreChoice,
    /// How the members run.
    pub members: Members,
    /// Logs and data of private components and child processes (needed for
    /// tansu, a private redis-server and child processes).
    pub dir: Option<PathBuf>,
    /// Request partitions.
    pub partitions: i32,
    /// Issuer instances.
    pub issuers: usize,
    /// Partitioning strategy of the api.
    pub partitioner: Partitioner,
    /// Records per issuer batch.
    pub batch_size: usize,
    /// Extra librdkafka properties for every member.
    pub kafka_opts: Vec<(String, String)>,
    /// Start the api (false for bench-issuer, which produces directly).
    pub with_api: bool,
    /// Start the issuers now (false: call [`Deployment::start_issuers`] later).
    pub start_issuers: bool,
}

impl Spec {
    /// Members in this process over `kafka` and `store`, one api, `issuers`
    /// issuers, batches of 2,000: what the demo and sweeps start.
    pub fn in_process(
        kafka: KafkaChoice,
        store: StoreChoice,
        partitions: i32,
        issuers: usize,
    ) -> Self {
        Spec {
            kafka,
            store,
            members: Members::InProcess,
            dir: None,
            partitions,
            issuers,
            partitioner: Partitioner::Spread,
            batch_size: 2000,
            kafka_opts: Vec::new(),
            with_api: true,
            start_issuers: true,
        }
    }
}

/// A drop to run through a deployment.
#[derive(Debug, Clone)]
pub struct DropSpec {
    /// The load.
    pub plan: LoadPlan,
    /// Stock and limit.
    pub terms: EventTerms,
    /// Buckets the event's stock is split over (1: none).
    pub stock_buckets: u32,
    /// Wait for the last decisions this long.
    pub drain_timeout: Duration,
    /// The admin token the event is set up with (when the api wants one).
    pub admin_token: Option<String>,
    /// Show a progress bar.
    pub progress: bool,
    /// Keep raw data in the report.
    pub keep_raw: bool,
    /// Settings for the report.
    pub config: serde_json::Value,
    /// The live page that shows the drop as it happens, if one is open.
    pub live: Option<LivePage>,
    /// For an event with holds: how long a winner's hold lasts and what the
    /// winners do with it (claim, cancel, never claim). Needs the api.
    pub holds: Option<HoldPlan>,
}

/// A live page (`--dashboard`) drops feed: one page follows a demo's, a
/// sweep's or an experiment's drops one after another, each from its start.
#[derive(Clone)]
pub struct LivePage(pub Arc<Dashboard>);

impl std::fmt::Debug for LivePage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LivePage({})", self.0.url())
    }
}

impl LivePage {
    /// Opens the page `args` ask for (its URL printed, a tab waited for as
    /// `--dashboard-wait` asks), if any.
    pub async fn open(
        args: &DashboardArgs,
        cancel: &CancellationToken,
    ) -> Result<Option<LivePage>, LabError> {
        let page = args.start(cancel).await?.map(|d| LivePage(Arc::new(d)));
        // Ctrl-C while waiting for a tab ends the command, not the wait.
        if cancel.is_cancelled() {
            if let Some(page) = page {
                page.close(args, cancel).await;
            }
            return Err(LabError::Cancelled);
        }
        Ok(page)
    }

    /// After the last drop: keeps the final page up for the linger `args`
    /// ask for, then stops serving.
    pub async fn close(self, args: &DashboardArgs, cancel: &CancellationToken) {
        self.0.linger(args.dashboard_linger, cancel).await;
        if let Some(d) = Arc::into_inner(self.0) {
            d.stop().await;
        }
    }
}

/// Why a deployment could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    /// A component did not start; the message says which and why.
    #[error("{0}")]
    Start(String),
    /// The spec asks for something that cannot work.
    #[error("{0}")]
    Spec(&'static str),
}

fn start_err(what: &str) -> impl Fn(std::io::Error) -> DeploymentError + '_ {
    move |e| DeploymentError::Start(format!("cannot start {what}: {e}"))
}

/// The broker a deployment uses.
pub enum Broker {
    /// The mock cluster of this process (faults can be injected).
    Mock(MockKafka),
    /// A private tansu process (can be killed and restarted).
    Tansu(Tansu),
    /// Someone else's brokers.
    External,
}

/// An api or issuer.
enum Member<T> {
    Task {
        handle: JoinHandle<T>,
        stop: CancellationToken,
    },
    Process(Proc),
}

type IssuerTask = Result<Totals, couponrush_issuer::IssuerError>;

/// See [`Deployment::tune_issuers`].
type IssuerTune = Arc<dyn Fn(&mut couponrush_issuer::Config) + Send + Sync>;

/// A deployment's processes, by role ([`Deployment::pids`]).
#[derive(Debug, Clone, Default)]
pub struct Pids {
    /// `coupon-api`.
    pub api: Option<u32>,
    /// Every running `coupon-issuer`.
    pub issuers: Vec<u32>,
    /// The private tansu.
    pub broker: Option<u32>,
    /// The private redis-server.
    pub redis: Option<u32>,
}

/// A running deployment. Dropping it kills what it started; [`Deployment::stop`]
/// stops it cleanly.
pub struct Deployment {
    /// Kafka settings to reach it.
    pub kafka: KafkaSettings,
    /// Its topics (fresh names on external brokers).
    pub topics: Topics,
    /// A client of the store.
    pub store: Arc<dyn Store>,
    /// Logs and data.
    pub dir: PathBuf,
    /// Each issuer slot's Prometheus address (child processes only).
    pub issuer_metrics: Vec<SocketAddr>,
    api_addr: Option<SocketAddr>,
    api: Option<Member<std::io::Result<()>>>,
    issuers: Vec<Option<Member<IssuerTask>>>,
    /// `coupon-notifier` processes, by slot.
    notifiers: Vec<Option<Proc>>,
    probes: Vec<Option<Probe>>,
    spec: Spec,
    group: String,
    /// Experiment switches for the issuers started from now on.
    arms: Arms,
    /// Changes to the configuration of in-process issuers started from now
    /// on (processes take flags instead).
    tune: Option<IssuerTune>,
    shutdown: CancellationToken,
    /// The private redis-server, if one was started; dropped after the
    /// members.
    pub redis: Option<RedisServer>,
    /// Dropped last, so the cluster outlives its clients. [`Deployment::stop`]
    /// waits for in-process members to finish; a deployment merely dropped
    /// (an early error) tells them to stop but does not wait, so their last
    /// commit may fail against a cluster already gone (replays, nothing lost).
    pub broker: Broker,
}

impl Deployment {
    /// Starts the broker and store if private, creates the topics, and starts
    /// the api and (unless deferred) the issuers.
    pub async fn start(spec: Spec) -> Result<Self, DeploymentError> {
        let run = Uuid::new_v4().simple().to_string();
        let needs_dir = !matches!(
            spec.kafka,
            KafkaChoice::Embedded(_) | KafkaChoice::External(_)
        ) || matches!(spec.store, StoreChoice::PrivateRedis { .. })
            || matches!(spec.members, Members::Processes { .. });
        let dir = match (&spec.dir, needs_dir) {
            (Some(d), _) => d.clone(),
            (None, false) => std::env::temp_dir().join(format!("couponrush-{run}")),
            (None, true) => {
                return Err(DeploymentError::Spec(
                    "tansu, a private redis-server and child processes need a directory for their logs and data",
                ))
            }
        };
        if needs_dir {
            std::fs::create_dir_all(&dir).map_err(start_err("the deployment's directory"))?;
        }
        let in_process = matches!(spec.members, Members::InProcess);

        let (broker, mut kafka, topics) = match spec.kafka.clone() {
            KafkaChoice::Embedded(brokers) => {
                let mock = tokio::task::spawn_blocking(move || MockKafka::start(brokers))
                    .await
                    .map_err(|e| DeploymentError::Start(e.to_string()))?
                    .map_err(start_err("the embedded Kafka"))?;
                let topics = Topics::default();
                for t in topics.specs(spec.partitions, brokers.min(3)) {
                    mock.create_topic(&t.name, t.partitions, t.replication)
                        .map_err(|e| {
                            DeploymentError::Start(format!("cannot create {}: {e}", t.name))
                        })?;
                }
                let kafka = KafkaSettings::new(mock.brokers());
                (Broker::Mock(mock), kafka, topics)
            }
            KafkaChoice::Tansu(storage) => {
                let log = dir.join("tansu.log");
                let tansu = tokio::task::spawn_blocking(move || Tansu::start(storage, Some(log)))
                    .await
                    .map_err(|e| DeploymentError::Start(e.to_string()))?
                    .map_err(start_err("tansu"))?;
                let kafka = KafkaSettings::new(tansu.brokers());
                let topics = Topics::default();
                ensure_topics(
                    &kafka,
                    &topics.specs(spec.partitions, 1),
                    Duration::from_secs(20),
                )
                .await
                .map_err(|e| DeploymentError::Start(e.to_string()))?;
                (Broker::Tansu(tansu), kafka, topics)
            }
            KafkaChoice::External(kafka) => {
                // Fresh topic names per deployment: a partition count cannot
                // shrink, and deleting topics is slow and racy on some brokers.
                let topics = Topics::suffixed(&run.to_string());
                ensure_topics(
                    &kafka,
                    &topics.specs(spec.partitions, 1),
                    Duration::from_secs(20),
                )
                .await
                .map_err(|e| DeploymentError::Start(e.to_string()))?;
                (Broker::External, kafka, topics)
            }
        };
        kafka.extra.extend(spec.kafka_opts.iter().cloned());

        let (store, redis): (Arc<dyn Store>, Option<RedisServer>) = match &spec.store {
            StoreChoice::Memory if !in_process => {
                return Err(DeploymentError::Spec(
                    "child processes cannot share the in-memory store: use a Redis",
                ))
            }
            StoreChoice::Memory => (Arc::new(MemoryStore::default()), None),
            StoreChoice::Redis(url) => (redis_store(url).await?, None),
            StoreChoice::PrivateRedis { aof } => {
                let (redis_dir, aof) = (dir.join("redis"), *aof);
                let server =
                    tokio::task::spawn_blocking(move || RedisServer::start(&redis_dir, aof))
                        .await
                        .map_err(|e| DeploymentError::Start(e.to_string()))?
                        .map_err(start_err("redis-server"))?;
                (redis_store(&server.url()).await?, Some(server))
            }
        };

        let mut d = Deployment {
            kafka,
            topics,
            store,
            redis,
            dir,
            issuer_metrics: Vec::new(),
            api_addr: None,
            api: None,
            issuers: Vec::new(),
            notifiers: Vec::new(),
            probes: Vec::new(),
            group: format!("coupon-issuer-{run}"),
            arms: Arms::default(),
            tune: None,
            shutdown: CancellationToken::new(),
            broker,
            spec,
        };
        if d.spec.with_api {
            d.start_api().await?;
        }
        if d.spec.start_issuers {
            d.start_issuers()?;
        }
        Ok(d)
    }

    /// The URL of the Redis store (child processes need one).
    pub fn redis_url(&self) -> Result<String, DeploymentError> {
        match (&self.spec.store, &self.redis) {
            (StoreChoice::Redis(url), _) => Ok(url.clone()),
            (_, Some(server)) => Ok(server.url()),
            _ => Err(DeploymentError::Spec("child processes need a Redis store")),
        }
    }

    fn kafka_opt_args(&self) -> Vec<String> {
        self.kafka
            .extra
            .iter()
            .flat_map(|(k, v)| ["--kafka-opt".to_string(), format!("{k}={v}")])
            .collect()
    }

    async fn start_api(&mut self) -> Result<(), DeploymentError> {
        match self.spec.members.clone() {
            Members::InProcess => {
                let mut config = couponrush_api::Config::local(&self.kafka.brokers);
                config.kafka = self.kafka.clone();
                config.topics = self.topics.clone();
                config.partitioner = self.spec.partitioner;
                config.max_in_flight = 50_000;
                let api = couponrush_api::Api::bind(config, self.store.clone(), None)
                    .await
                    .map_err(|e| DeploymentError::Start(format!("cannot start the api: {e}")))?;
                self.api_addr = Some(api.local_addr());
                let stop = self.shutdown.child_token();
                self.api = Some(Member::Task {
                    handle: tokio::spawn(api.serve(stop.clone())),
                    stop,
                });
            }
            Members::Processes { api_args, .. } => {
                let port = free_port();
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                let mut cmd = our_binary("coupon-api")?;
                cmd.args([
                    "--listen",
                    &addr.to_string(),
                    "--brokers",
                    &self.kafka.brokers,
                ])
                .args(["--redis", &self.redis_url()?])
                .args(["--partitioner", &self.spec.partitioner.to_string()])
                .args(self.kafka_opt_args())
                .args(&api_args)
                .env("RUST_LOG", couponrush_harness::child_log());
                let log = self.dir.join("api.log");
                let proc =
                    Proc::spawn("coupon-api", cmd, Some(&log)).map_err(start_err("coupon-api"))?;
                self.api = Some(Member::Process(proc));
                tokio::task::spawn_blocking(move || wait_for_port(port, Duration::from_secs(30)))
                    .await
                    .map_err(|e| DeploymentError::Start(e.to_string()))?
                    .map_err(|e| {
                        DeploymentError::Start(format!(
                            "the api did not start: {e} (see {})",
                            log.display()
                        ))
                    })?;
                self.api_addr = Some(addr);
            }
        }
        Ok(())
    }

    /// The experiment switches (`couponrush_issuer::experiment`) of every
    /// issuer started from now on (start the deployment with
    /// `start_issuers: false` to give them to all). Unsafe arms are passed
    /// to child processes with `--i-know-this-is-unsafe`: the lab insists.
    pub fn set_issuer_arms(&mut self, arms: Arms) {
        self.arms = arms;
    }

    /// Changes the configuration of every in-process issuer started from
    /// now on (e.g. its assignment strategy or session timeout); issuer
    /// processes take `Members::Processes`' flags instead.
    pub fn tune_issuers(
        &mut self,
        tune: impl Fn(&mut couponrush_issuer::Config) + Send + Sync + 'static,
    ) {
        self.tune = Some(Arc::new(tune));
    }

    /// The experiment switches as `coupon-issuer` flags.
    fn arm_args(&self) -> Vec<String> {
        let a = &self.arms;
        let mut args = Vec::new();
        if !a.work_per_record.is_zero() {
            args.push("--work-per-record".to_string());
            args.push(format!("{}us", a.work_per_record.as_micros()));
        }
        if a.unsafe_no_dedup {
            args.push("--unsafe-no-dedup".to_string());
        }
        if let Some(interval) = a.unsafe_auto_commit {
            args.push("--unsafe-auto-commit".to_string());
            args.push(format!("{}ms", interval.as_millis()));
        }
        if !a.unsafe_flags().is_empty() {
            args.push("--i-know-this-is-unsafe".to_string());
        }
        args
    }

    /// The consumer group of the issuers.
    pub fn group_id(&self) -> &str {
        &self.group
    }

    /// Starts the configured issuers (once).
    pub fn start_issuers(&mut self) -> Result<(), DeploymentError> {
        if !self.issuers.is_empty() {
            return Ok(());
        }
        for _ in 0..self.spec.issuers {
            self.add_issuer()?;
        }
        Ok(())
    }

    /// Starts one more issuer in the group; returns its slot.
    pub fn add_issuer(&mut self) -> Result<usize, DeploymentError> {
        let n = self.issuers.len();
        let client_id = format!("{}-{n}", self.group);
        match self.spec.members.clone() {
            Members::InProcess => {
                let mut config = couponrush_issuer::Config::local(&self.kafka.brokers);
                config.kafka = self.kafka.clone();
                config.topics = self.topics.clone();
                config.group_id = self.group.clone();
                config.client_id = client_id;
                config.batch_size = self.spec.batch_size;
                config.arms = self.arms;
                if let Some(tune) = &self.tune {
                    tune(&mut config);
                }
                let probe = Probe::default();
                let stop = self.shutdown.child_token();
                let handle = tokio::spawn(couponrush_issuer::run_issuer_probed(
                    config,
                    self.store.clone(),
                    stop.clone(),
                    probe.clone(),
                ));
                self.issuers.push(Some(Member::Task { handle, stop }));
                self.probes.push(Some(probe));
            }
            Members::Processes { issuer_args, .. } => {
                let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
                let mut cmd = our_binary("coupon-issuer")?;
                cmd.args([
                    "--brokers",
                    &self.kafka.brokers,
                    "--redis",
                    &self.redis_url()?,
                ])
                .args(["--metrics-listen", &metrics.to_string()])
                .args(["--group-id", &self.group, "--client-id", &client_id])
                .args(["--batch-size", &self.spec.batch_size.to_string()])
                .args(self.kafka_opt_args())
                .args(&issuer_args)
                .args(self.arm_args())
                .env("RUST_LOG", couponrush_harness::child_log());
                let name = format!("issuer-{n}");
                let log = self.dir.join(format!("{name}.log"));
                let proc =
                    Proc::spawn(&name, cmd, Some(&log)).map_err(start_err("coupon-issuer"))?;
                self.issuers.push(Some(Member::Process(proc)));
                self.issuer_metrics.push(metrics);
                self.probes.push(None);
            }
        }
        Ok(n)
    }

    /// Kills an issuer without a chance to commit or leave the group
    /// (SIGKILL). An issuer in this process cannot be killed so: its loop
    /// runs on a thread of its own, which is told to stop (it finishes its
    /// batch, commits and leaves), so kill faults need child processes.
    pub fn kill_issuer(&mut self, slot: usize) {
        match self.issuers.get_mut(slot).and_then(Option::take) {
            Some(Member::Process(mut p)) => p.kill(),
            Some(Member::Task { handle, stop }) => {
                stop.cancel();
                handle.abort();
            }
            None => {}
        }
    }

    /// Starts a `coupon-notifier` process that hands every final coupon of
    /// this deployment's ledger to `webhook`, in a consumer group of its own
    /// (the same for every notifier of the deployment, so a restarted one
    /// resumes from what the last one committed); `args` are more flags.
    /// Returns its slot.
    pub fn start_notifier(
        &mut self,
        webhook: &str,
        args: &[String],
    ) -> Result<usize, DeploymentError> {
        let n = self.notifiers.len();
        let mut cmd = our_binary("coupon-notifier")?;
        cmd.args(["--brokers", &self.kafka.brokers, "--webhook", webhook])
            .args(["--outcomes-topic", &self.topics.outcomes])
            .args(["--group-id", &format!("{}-notifier", self.group)])
            .args(["--client-id", &format!("{}-notifier-{n}", self.group)])
            .args(self.kafka_opt_args())
            .args(args)
            .env("RUST_LOG", couponrush_harness::child_log());
        let name = format!("notifier-{n}");
        let log = self.dir.join(format!("{name}.log"));
        let proc = Proc::spawn(&name, cmd, Some(&log)).map_err(start_err("coupon-notifier"))?;
        self.notifiers.push(Some(proc));
        Ok(n)
    }

    /// Kills a notifier (SIGKILL): nothing committed or drained.
    pub fn kill_notifier(&mut self, slot: usize) {
        if let Some(mut p) = self.notifiers.get_mut(slot).and_then(Option::take) {
            p.kill();
        }
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) an issuer process: every
    /// thread stops where it is, timers included, so what it has committed
    /// and decided stands still while it is looked at. False for an issuer
    /// that is not a running process.
    pub fn freeze_issuer(&mut self, slot: usize, frozen: bool) -> bool {
        let Some(Some(Member::Process(p))) = self.issuers.get_mut(slot) else {
            return false;
        };
        let Some(pid) = p.pid() else {
            return false;
        };
        std::process::Command::new("kill")
            .args([if frozen { "-STOP" } else { "-CONT" }, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops an issuer cleanly (finish the batch, commit, leave) and returns
    /// its exit code (0 for a task that ended well); None if it did not
    /// stop cleanly.
    pub async fn stop_issuer(&mut self, slot: usize) -> Option<i32> {
        match self.issuers.get_mut(slot).and_then(Option::take)? {
            Member::Process(mut p) => {
                tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(30)))
                    .await
                    .ok()
                    .flatten()
            }
            Member::Task { handle, stop } => {
                stop.cancel();
                matches!(handle.await, Ok(Ok(_))).then_some(0)
            }
        }
    }

    /// Issuers running now.
    pub fn running_issuers(&mut self) -> usize {
        self.issuers
            .iter_mut()
            .filter_map(Option::as_mut)
            .map(|m| match m {
                Member::Process(p) => p.is_running(),
                Member::Task { handle, .. } => !handle.is_finished(),
            })
            .filter(|running| *running)
            .count()
    }

    /// Waits until the issuers' group owns every request partition and, when
    /// there are at least as many partitions as issuers, every issuer owns
    /// one (so a measurement starts with deciding, not with a rebalance when
    /// the last member joins). False on timeout.
    pub async fn wait_assigned(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let counts = self.assigned().await;
            let total: usize = counts.iter().sum();
            let each = self.spec.partitions as usize >= counts.len();
            if total == self.spec.partitions as usize && (!each || counts.iter().all(|&c| c > 0)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Partitions each running issuer owns now (a process's from its
    /// `couponrush_issuer_assigned_partitions` metric).
    async fn assigned(&self) -> Vec<usize> {
        let mut counts = Vec::new();
        for (slot, member) in self.issuers.iter().enumerate() {
            match (member, &self.probes[slot]) {
                (Some(Member::Task { .. }), Some(probe)) => counts.push(probe.assigned()),
                (Some(Member::Process(_)), _) => {
                    let addr = self.issuer_metrics[slot];
                    let n = tokio::task::spawn_blocking(move || scrape_assigned(addr))
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                    counts.push(n);
                }
                _ => {}
            }
        }
        counts
    }

    /// The sum, over the issuer processes running now, of the metric
    /// samples whose line starts with `prefix` (e.g.
    /// `couponrush_issuer_commits_total{mode="async"}`); 0 for in-process
    /// issuers, which export no metrics of their own.
    pub async fn issuer_metric(&mut self, prefix: &str) -> f64 {
        let mut total = 0.0;
        for slot in 0..self.issuers.len() {
            let running = match &mut self.issuers[slot] {
                Some(Member::Process(p)) => p.is_running(),
                _ => false,
            };
            if running {
                let (addr, prefix) = (self.issuer_metrics[slot], prefix.to_string());
                total += tokio::task::spawn_blocking(move || scrape_sum(addr, &prefix))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0.0);
            }
        }
        total
    }

    /// Partitions each running issuer owns now (in-process issuers from
    /// their probe, processes from their metrics).
    pub async fn assigned_partitions(&self) -> Vec<usize> {
        self.assigned().await
    }

    /// The api's address.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// The api's base URL (empty when no api runs).
    pub fn api_url(&self) -> String {
        self.api_addr
            .map(|a| format!("http://{a}"))
            .unwrap_or_default()
    }

    /// The process ids of what this deployment runs as processes, by role
    /// (a member running as a task here has none; so has someone else's
    /// broker or Redis).
    pub fn pids(&self) -> Pids {
        let process = |m: &Option<Member<_>>| match m {
            Some(Member::Process(p)) => p.pid(),
            _ => None,
        };
        Pids {
            api: process(&self.api),
            issuers: self
                .issuers
                .iter()
                .filter_map(|m| match m {
                    Some(Member::Process(p)) => p.pid(),
                    _ => None,
                })
                .collect(),
            broker: match &self.broker {
                Broker::Tansu(t) => t.pid(),
                _ => None,
            },
            redis: self.redis.as_ref().and_then(RedisServer::pid),
        }
    }

    /// Resident memory of the api process, in KiB (0 for a task or unknown).
    pub fn api_rss_kib(&self) -> u64 {
        match &self.api {
            Some(Member::Process(p)) => p.pid().map_or(0, rss_kib),
            _ => 0,
        }
    }

    /// Whether the api is alive.
    pub fn api_alive(&mut self) -> bool {
        match &mut self.api {
            Some(Member::Process(p)) => p.is_running(),
            Some(Member::Task { handle, .. }) => !handle.is_finished(),
            None => false,
        }
    }

    /// The private redis-server (the fault suite kills and restarts it).
    pub fn private_redis(&mut self) -> Result<&mut RedisServer, DeploymentError> {
        self.redis.as_mut().ok_or(DeploymentError::Spec(
            "this deployment has no private redis-server",
        ))
    }

    /// Starts an audited drop as a task: the event is set up with the drop's
    /// terms, requests enter through the api (or straight to the requests
    /// topic with `direct`, as the api would, measuring Kafka, the issuers
    /// and the store without the HTTP stage), and the store is audited.
    pub async fn start_drop(
        &self,
        d: DropSpec,
        direct: bool,
        cancel: CancellationToken,
    ) -> Result<JoinHandle<Result<Report, couponrush_loadgen::Error>>, LabError> {
        let via = if direct {
            let producer = RequestProducer::new(
                &self.kafka,
                self.topics.requests.clone(),
                self.spec.partitioner,
                self.spec.partitions,
                1_000_000,
            )?;
            Via::Direct {
                producer: Arc::new(producer),
            }
        } else {
            let api = self.api_addr.ok_or(LabError::NoApi)?;
            Via::Http {
                endpoint: Endpoint::parse(&format!("http://{api}")).await?,
                admin_token: d.admin_token,
                timeout: Duration::from_secs(30),
            }
        };
        let run = DropRun {
            via,
            kafka: self.kafka.clone(),
            topics: self.topics.clone(),
            store: Some(self.store.clone()),
            setup: true,
            stock_buckets: d.stock_buckets,
            terms: d.terms,
            plan: d.plan,
            drain_timeout: d.drain_timeout,
            progress: d.progress,
            keep_raw: d.keep_raw,
            config: d.config,
            observe: true,
        };
        let (live, holds) = (d.live, d.holds);
        Ok(tokio::spawn(async move {
            run_drop_with_holds(run, holds, live.as_ref().map(|l| &*l.0), cancel).await
        }))
    }

    /// Runs an audited drop through the api (see [`Deployment::start_drop`]).
    pub async fn drop_through_api(
        &self,
        d: DropSpec,
        cancel: CancellationToken,
    ) -> Result<Report, LabError> {
        let task = self.start_drop(d, false, cancel).await?;
        Ok(task.await??)
    }

    /// Runs an audited drop produced straight to the requests topic (see
    /// [`Deployment::start_drop`]).
    pub async fn drop_direct(
        &self,
        d: DropSpec,
        cancel: CancellationToken,
    ) -> Result<Report, LabError> {
        let task = self.start_drop(d, true, cancel).await?;
        Ok(task.await??)
    }

    /// Stops everything cleanly (issuers finish their batch, commit and
    /// leave; the api drains) and returns what each in-process issuer did.
    pub async fn stop(mut self) -> Vec<Totals> {
        self.shutdown.cancel();
        for mut p in std::mem::take(&mut self.notifiers).into_iter().flatten() {
            let _ = tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(30))).await;
        }
        let mut totals = Vec::new();
        for member in std::mem::take(&mut self.issuers).into_iter().flatten() {
            match member {
                Member::Task { handle, .. } => {
                    if let Ok(Ok(t)) = handle.await {
                        totals.push(t);
                    }
                }
                Member::Process(mut p) => {
                    let _ =
                        tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(30)))
                            .await;
                }
            }
        }
        match self.api.take() {
            Some(Member::Task { handle, .. }) => {
                let _ = handle.await;
            }
            Some(Member::Process(mut p)) => {
                let _ =
                    tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(30))).await;
            }
            None => {}
        }
        totals
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // Tasks stop with the token; child processes are killed by their
        // own drop. A temporary directory nobody asked for is removed.
        self.shutdown.cancel();
        if self.spec.dir.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Opens the Redis store at `url`.
async fn redis_store(url: &str) -> Result<Arc<dyn Store>, DeploymentError> {
    Ok(Arc::new(
        RedisStore::connect(url, DEFAULT_DEDUP_RETENTION)
            .await
            .map_err(|e| DeploymentError::Start(format!("cannot reach the store at {url}: {e}")))?,
    ))
}

/// Where our binaries are: beside this executable (a release or debug build
/// of the workspace), or one directory up (a test binary in `deps/`).
pub fn binary(name: &str) -> Result<PathBuf, DeploymentError> {
    let exe = std::env::current_exe().map_err(|e| DeploymentError::Start(e.to_string()))?;
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
    Err(DeploymentError::Start(format!(
        "cannot find {name} beside {}; build the workspace first (cargo build --workspace)",
        exe.display()
    )))
}

/// A command for one of our binaries that sees none of the user's
/// environment but what a process needs to run (`PATH`, `HOME`, temp dir,
/// backtraces); everything the deployment wants is passed as flags.
fn our_binary(name: &str) -> Result<Command, DeploymentError> {
    let mut cmd = Command::new(binary(name)?);
    cmd.env_clear();
    for keep in ["PATH", "HOME", "TMPDIR", "RUST_BACKTRACE"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    Ok(cmd)
}

/// `couponrush_issuer_assigned_partitions` from an issuer's metrics.
fn scrape_assigned(addr: SocketAddr) -> Option<usize> {
    scrape_sum(addr, "couponrush_issuer_assigned_partitions").map(|v| v as usize)
}

/// The sum of the samples of an issuer's metrics whose line starts with
/// `prefix` (a name, or a name with labels: `name{mode="sync"}`).
fn scrape_sum(addr: SocketAddr, prefix: &str) -> Option<f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let samples: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
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
