//! `coupon-lab experiment <name>` and `coupon-lab experiments`: the Kafka
//! field note the project grew from (docs/LAB.md), one rule at a time, run
//! both ways. Each experiment runs the same drop with the safe arm (what
//! couponrush does) and its unsafe twin (an `--unsafe-…` issuer switch, or
//! the step the rule says not to skip), and prints a short table: the note's
//! claim, both arms' figures, and whether the measured direction matches the
//! claim. Each also writes `<out>/<name>.json` (and an SVG where a picture
//! says more).
//!
//! Every experiment starts its own deployment (embedded mock cluster, a
//! private redis-server when members run as processes), so it needs nothing
//! installed and touches nothing shared.
//!
//! # Layout
//! - [`Finding`]: one experiment's result: claim, arms, figures, verdict.
//! - [`no_dedup`] (3): at-least-once needs idempotency.
//! - [`auto_commit`] (1): auto-commit loses messages.
//! - [`commit_mode`] (2): synchronous or asynchronous manual commits.
//! - [`hot_key`] (4): one key is one hot partition and one busy instance.
//! - [`payload`] (5): zero vs full payload.
//! - [`rebalance`] (7): eager vs cooperative rebalancing.
//! - [`retention`] (9): retention deletes, consumed or not (on tansu).
//! - [`dlq`] (8): a DLQ lets failures be fixed and processed again; the
//!   `coupon-lab dlq redrive` command.

pub mod auto_commit;
pub mod commit_mode;
pub mod dlq;
pub mod hot_key;
pub mod no_dedup;
pub mod payload;
pub mod rebalance;
pub mod retention;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use couponrush_core::wire::now_micros;
use couponrush_loadgen::report::Report;
use couponrush_loadgen::Verdict;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use couponrush_core::kafka::KafkaSettings;
use couponrush_core::Partitioner;
use couponrush_issuer::experiment::Arms;
use couponrush_loadgen::drive::{LoadModel, LoadPlan};
use couponrush_loadgen::measure::audit::EventTerms;
use couponrush_loadgen::population::{Population, UserDist};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::deployment::{Deployment, DropSpec, KafkaChoice, LivePage, Members, Spec, StoreChoice};
use crate::LabError;
use couponrush_loadgen::dashboard::DashboardArgs;

/// The experiments built so far, by the number of the rule in docs/LAB.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Name {
    /// 1: auto-commit (offsets stored at poll) vs manual commit, an issuer SIGKILLed mid-drop.
    AutoCommit,
    /// 2: --commit sync vs async: decided/s, and replays after an issuer is SIGKILLed.
    CommitMode,
    /// 3: the store deciding every delivery again (no dedup) vs dedup by request id.
    NoDedup,
    /// 4: --partitioner event vs spread with 1, 2 and 4 issuers doing real work per record.
    HotKey,
    /// 5: zero payload vs a full snapshot of the event in every record.
    Payload,
    /// 7: an issuer joins and leaves mid-drop, eager (range,roundrobin) vs cooperative-sticky.
    Rebalance,
    /// 8: requests for an event not created yet go to the DLQ, then are redriven.
    DlqRedrive,
    /// 9: a topic with a 2 s retention vs 7 days on tansu: what a late consumer group finds.
    Retention,
}

impl Name {
    /// Every experiment built, by rule: the order `experiments` runs them in.
    pub const ALL: [Name; 8] = [
        Name::AutoCommit,
        Name::CommitMode,
        Name::NoDedup,
        Name::HotKey,
        Name::Payload,
        Name::Rebalance,
        Name::DlqRedrive,
        Name::Retention,
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            Name::AutoCommit => "auto-commit",
            Name::CommitMode => "commit-mode",
            Name::NoDedup => "no-dedup",
            Name::HotKey => "hot-key",
            Name::DlqRedrive => "dlq-redrive",
            Name::Rebalance => "rebalance",
            Name::Retention => "retention",
            Name::Payload => "payload",
        }
    }
}

/// The rules of the field note not yet made experiments (see docs/LAB.md).
pub const NOT_BUILT: &[&str] = &[
    "6 partitions added mid-drop",
    "10 replication keeps acknowledged records",
];

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Size {
    /// A few hundred requests: what the direction tests run.
    Small,
    /// A few thousand requests: the figures in docs/LAB.md.
    Full,
}

/// Options every experiment takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Seed of the load (users, retries).
    #[arg(long, env = "EXPERIMENT_SEED", default_value_t = 1)]
    pub seed: u64,
    /// small (the CI direction tests' size) or full.
    #[arg(long, env = "EXPERIMENT_SIZE", value_enum, default_value = "full")]
    pub size: Size,
    /// Where the JSON (and SVG) results and the members' logs go.
    #[arg(long, env = "EXPERIMENT_OUT", default_value = "couponrush-experiments")]
    pub out: PathBuf,
    /// The live page the arms' drops feed, opened from `--dashboard`.
    #[arg(skip)]
    pub page: Option<LivePage>,
}

/// `coupon-lab experiment <name>`.
#[derive(Debug, Clone, Args)]
pub struct ExperimentArgs {
    /// Which experiment.
    #[arg(value_enum)]
    pub name: Name,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: Common,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub live: DashboardArgs,
}

/// `coupon-lab experiments`: every experiment built, one after the other.
#[derive(Debug, Clone, Args)]
pub struct ExperimentsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: Common,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub live: DashboardArgs,
}

/// One arm's figures, in column order.
#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    /// What this arm does, e.g. `dedup (safe)`.
    pub name: String,
    /// Figures by column.
    pub figures: Vec<(String, f64)>,
}

impl Arm {
    /// An arm named `name` with `figures`.
    pub fn new(name: impl Into<String>, figures: &[(&str, f64)]) -> Self {
        Arm {
            name: name.into(),
            figures: figures.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    /// The figure in column `name` (NaN if there is none).
    pub fn get(&self, name: &str) -> f64 {
        self.figures
            .iter()
            .find(|(k, _)| k == name)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

/// One experiment's result.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Its command-line name.
    pub experiment: Name,
    /// The rule's number in docs/LAB.md.
    pub rule: u8,
    /// The field note's sentence, in Korean.
    pub claim_ko: &'static str,
    /// The claim, in English.
    pub claim: &'static str,
    /// Seed and size.
    pub seed: u64,
    /// Run size.
    pub size: Size,
    /// The arms, safe first.
    pub arms: Vec<Arm>,
    /// True when the measured direction matches the claim.
    pub matches: bool,
    /// Why (which figure shows it).
    pub verdict: String,
    /// Remarks: what was not measured, what surprised.
    pub notes: Vec<String>,
    /// Data of this experiment beyond the table (e.g. a time series).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl Finding {
    /// The human table.
    pub fn text(&self) -> String {
        let mut out = format!(
            "experiment {} (rule {}): {}\n  the note     \"{}\"\n",
            self.experiment.as_str(),
            self.rule,
            self.claim,
            self.claim_ko
        );
        let columns: Vec<&str> = self
            .arms
            .first()
            .map(|a| a.figures.iter().map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default();
        let width = self
            .arms
            .iter()
            .map(|a| a.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let col = |c: &str| c.len().max(9);
        out.push_str(&format!("  {:<width$}", "arm"));
        for c in &columns {
            out.push_str(&format!("  {:>w$}", c, w = col(c)));
        }
        out.push('\n');
        for a in &self.arms {
            out.push_str(&format!("  {:<width$}", a.name));
            for c in &columns {
                out.push_str(&format!("  {:>w$}", fmt_figure(a.get(c)), w = col(c)));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "  verdict      {}: {}\n",
            if self.matches {
                "AS CLAIMED"
            } else {
                "NOT AS CLAIMED"
            },
            self.verdict
        ));
        for n in &self.notes {
            out.push_str(&format!("  note         {n}\n"));
        }
        out
    }

    /// Writes `<out>/<name>.json`.
    pub fn write_json(&self, out: &Path) -> Result<PathBuf, LabError> {
        let path = out.join(format!("{}.json", self.experiment.as_str()));
        let json = serde_json::to_vec_pretty(self).expect("a finding always serializes");
        write(&path, &json)?;
        Ok(path)
    }
}

/// Writes `bytes` to `path`, creating its directory.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), LabError> {
    let err = |source| LabError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(path, bytes).map_err(err)
}

fn fmt_figure(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Runs one experiment.
pub async fn run(
    name: Name,
    common: &Common,
    cancel: CancellationToken,
) -> Result<Finding, LabError> {
    match name {
        Name::NoDedup => no_dedup::run(common, cancel).await,
        Name::AutoCommit => auto_commit::run(common, cancel).await,
        Name::CommitMode => commit_mode::run(common, cancel).await,
        Name::HotKey => hot_key::run(common, cancel).await,
        Name::DlqRedrive => dlq::run(common, cancel).await,
        Name::Rebalance => rebalance::run(common, cancel).await,
        Name::Retention => retention::run(common, cancel).await,
        Name::Payload => payload::run(common, cancel).await,
    }
}

/// `coupon-lab experiment <name>`: runs it, prints the table, writes JSON.
pub async fn experiment(
    mut args: ExperimentArgs,
    cancel: CancellationToken,
) -> Result<Verdict, LabError> {
    args.common.page = LivePage::open(&args.live, &cancel).await?;
    let f = run(args.name, &args.common, cancel.clone()).await;
    if let Some(page) = args.common.page.take() {
        page.close(&args.live, &cancel).await;
    }
    report(&f?, &args.common.out)
}

/// `coupon-lab experiments`: every experiment built, in turn.
pub async fn experiments(
    mut args: ExperimentsArgs,
    cancel: CancellationToken,
) -> Result<Verdict, LabError> {
    // One page follows every arm's drop of every experiment, in turn.
    args.common.page = LivePage::open(&args.live, &cancel).await?;
    let mut verdict = Verdict::Pass;
    let mut summary = Vec::new();
    let mut not_run = Vec::new();
    for name in Name::ALL {
        if cancel.is_cancelled() {
            return Err(LabError::Cancelled);
        }
        // One experiment that cannot run (no tansu for `retention`, say)
        // does not stop the others; it is reported at the end.
        match run(name, &args.common, cancel.clone()).await {
            Ok(f) => {
                if report(&f, &args.common.out)? == Verdict::Fail {
                    verdict = Verdict::Fail;
                }
                summary.push(format!(
                    "  {:<12} rule {:<2} {}",
                    name.as_str(),
                    f.rule,
                    if f.matches {
                        "AS CLAIMED"
                    } else {
                        "NOT AS CLAIMED"
                    }
                ));
            }
            Err(LabError::Cancelled) => return Err(LabError::Cancelled),
            Err(e) => {
                println!("experiment {} could not run: {e}", name.as_str());
                summary.push(format!("  {:<12} could not run: {e}", name.as_str()));
                not_run.push(name.as_str());
            }
        }
        println!();
    }
    println!("summary\n{}", summary.join("\n"));
    println!("not built yet (docs/LAB.md): {}", NOT_BUILT.join("; "));
    if let Some(page) = args.common.page.take() {
        page.close(&args.live, &cancel).await;
    }
    if !not_run.is_empty() {
        return Err(LabError::Experiment(format!(
            "{} could not run (see above)",
            not_run.join(", ")
        )));
    }
    Ok(verdict)
}

fn report(f: &Finding, out: &Path) -> Result<Verdict, LabError> {
    print!("{}", f.text());
    let path = f.write_json(out)?;
    println!("  written      {}", path.display());
    Ok(if f.matches {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

/// A directory for one arm's deployment (logs, redis data), emptied first.
pub(crate) fn arm_dir(common: &Common, experiment: Name, arm: &str) -> PathBuf {
    let dir =
        common
            .out
            .join("runs")
            .join(format!("{}-{arm}-{}", experiment.as_str(), now_micros()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Waits until the store has issued at least `n` coupons of `event`, or
/// `timeout` passes (false), or the drop ended.
pub(crate) async fn wait_issued(
    d: &Deployment,
    event: &str,
    n: u32,
    timeout: Duration,
    drop_done: impl Fn() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline && !drop_done() {
        if let Ok(Some(state)) = d.store.event(event).await {
            if state.issued() >= n {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The figures of a drop's report every experiment shows.
pub(crate) fn audit_figures(r: &Report) -> Vec<(&'static str, f64)> {
    vec![
        ("accepted", r.accepted as f64),
        ("decided", r.decided as f64),
        ("replays", r.replays as f64),
        ("lost", r.lost as f64),
        ("double", r.double_issued as f64),
        ("oversold", r.oversold as f64),
    ]
}

/// A drop through the api of a deployment whose members run as processes
/// (so an issuer can be SIGKILLed), over the embedded mock cluster and a
/// private redis-server, with every issuer given `arms`.
#[derive(Debug, Clone)]
pub(crate) struct KilledDrop {
    /// The issuers' experiment switches.
    pub arms: Arms,
    /// Logical requests (a burst).
    pub requests: u64,
    /// Distinct users.
    pub users: u64,
    /// Client retries with the same key.
    pub retry_ratio: f64,
    /// Stock and limit.
    pub terms: EventTerms,
    /// Issuers in the group.
    pub issuers: usize,
    /// More `coupon-issuer` flags (e.g. `--commit async`).
    pub issuer_args: Vec<String>,
    /// When to SIGKILL issuer 0 (then a new issuer is started).
    pub kill: Kill,
    /// Records per issuer batch.
    pub batch_size: usize,
    /// How long to wait for the last decisions.
    pub drain: Duration,
}

/// When a [`KilledDrop`] kills issuer 0.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kill {
    /// No kill: the drop runs undisturbed.
    Never,
    /// Once this many coupons are issued.
    AfterIssued(u32),
    /// Once this many coupons are issued *and* the group's committed offsets
    /// are ahead of the decisions (a commit covers records not decided yet:
    /// what auto-commit does); after `wait` without that, regardless. Exact
    /// with one issuer, whose every decision is an issued coupon.
    CommitAhead {
        /// Coupons issued first.
        issued: u32,
        /// How long to wait for the commit to run ahead.
        wait: Duration,
    },
}

/// What a [`KilledDrop`] measured.
pub struct KilledRun {
    /// The drop's report.
    pub report: Report,
    /// The kill happened mid-drop (for [`Kill::CommitAhead`]: with the
    /// commit ahead of the decisions).
    pub condition: bool,
    /// Offset commits by mode (`sync`, `async`, `revoke`) of the issuers
    /// alive at the end (the killed one's are gone with it).
    pub commits: BTreeMap<&'static str, f64>,
}

/// Runs a [`KilledDrop`].
pub(crate) async fn killed_drop(
    common: &Common,
    experiment: Name,
    arm: &str,
    k: KilledDrop,
    cancel: CancellationToken,
) -> Result<KilledRun, LabError> {
    let dir = arm_dir(common, experiment, arm);
    let mut d = Deployment::start(Spec {
        kafka: KafkaChoice::Embedded(3),
        store: StoreChoice::PrivateRedis { aof: false },
        members: Members::Processes {
            api_args: Vec::new(),
            // A killed member's partitions move after its session expires:
            // short, so the drop goes on soon after the kill.
            issuer_args: ["--session-timeout", "3s"]
                .iter()
                .map(|s| s.to_string())
                .chain(k.issuer_args.iter().cloned())
                .collect(),
        },
        dir: Some(dir),
        partitions: 4,
        issuers: k.issuers,
        partitioner: Partitioner::Spread,
        batch_size: k.batch_size,
        kafka_opts: Vec::new(),
        with_api: true,
        start_issuers: false,
    })
    .await?;
    d.set_issuer_arms(k.arms);
    d.start_issuers()?;
    if !d.wait_assigned(Duration::from_secs(60)).await {
        return Err(LabError::NotAssigned(Duration::from_secs(60)));
    }
    let event = format!("exp-{}-{arm}-{}", experiment.as_str(), now_micros());
    let drop = d
        .start_drop(
            DropSpec {
                plan: LoadPlan {
                    event_id: event.clone(),
                    model: LoadModel::Burst,
                    requests: k.requests,
                    duration: Duration::from_secs(60),
                    connections: 64,
                    population: Population::new(
                        k.users,
                        UserDist::Uniform,
                        k.retry_ratio,
                        common.seed,
                    ),
                },
                terms: k.terms,
                drain_timeout: k.drain,
                admin_token: None,
                progress: false,
                keep_raw: false,
                config: serde_json::json!({
                    "experiment": experiment.as_str(),
                    "arm": arm,
                    "seed": common.seed,
                }),
                live: common.page.clone(),
                holds: None,
                stock_buckets: 1,
            },
            false,
            cancel,
        )
        .await?;
    let done = || drop.is_finished();
    let killed_mid_drop = match k.kill {
        Kill::Never => false,
        Kill::AfterIssued(n) => wait_issued(&d, &event, n, Duration::from_secs(120), done).await,
        Kill::CommitAhead { issued, wait } => {
            wait_issued(&d, &event, issued, Duration::from_secs(120), done).await
                && freeze_when_commit_ahead(&mut d, &event, wait).await
        }
    };
    if !matches!(k.kill, Kill::Never) {
        d.kill_issuer(0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        d.add_issuer()?;
    }
    let report = drop.await?;
    let mut commits = BTreeMap::new();
    for mode in ["sync", "async", "revoke"] {
        let prefix = format!("couponrush_issuer_commits_total{{mode=\"{mode}\"}}");
        commits.insert(mode, d.issuer_metric(&prefix).await);
    }
    d.stop().await;
    Ok(KilledRun {
        report: report?,
        condition: killed_mid_drop,
        commits,
    })
}

/// Waits until issuer 0, frozen (`SIGSTOP`), is found with its group's
/// committed offsets ahead of the store's decisions: it has committed more
/// records than the store has issued coupons of `event` (only a commit that
/// ran ahead of the decisions can do that, when every decision is an issued
/// coupon and there is one issuer). Frozen, neither figure can move, so a
/// kill now loses exactly the records committed and never decided; returns
/// true with the issuer still frozen (for the kill). Otherwise it thaws the
/// issuer and looks again, until `wait` passes (false, thawed).
///
/// Looking while it runs is not exact: the issuer may finish its batch
/// between the look and the kill, and a kill after that loses nothing (CI
/// once saw this: a "commit ahead" 20 ms arm that lost 0).
async fn freeze_when_commit_ahead(d: &mut Deployment, event: &str, wait: Duration) -> bool {
    let (kafka, group, topic) = (
        d.kafka.clone(),
        d.group_id().to_string(),
        d.topics.requests.clone(),
    );
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if !d.freeze_issuer(0, true) {
            return false;
        }
        // A store call or a commit already on the wire lands first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (k, g, t) = (kafka.clone(), group.clone(), topic.clone());
        let committed = tokio::task::spawn_blocking(move || committed_records(&k, &g, &t))
            .await
            .ok()
            .flatten();
        let issued = match d.store.event(event).await {
            Ok(Some(state)) => Some(u64::from(state.issued())),
            _ => None,
        };
        if let (Some(c), Some(i)) = (committed, issued) {
            if c > i {
                return true;
            }
        }
        d.freeze_issuer(0, false);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    false
}

/// Records of `topic` the consumer group `group` has committed past (from
/// offset 0: the lab's topics are fresh). Asks the coordinator without
/// joining the group.
fn committed_records(kafka: &KafkaSettings, group: &str, topic: &str) -> Option<u64> {
    let timeout = Duration::from_secs(5);
    let consumer: BaseConsumer = kafka
        .client_config("coupon-lab-commit-watch")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .ok()?;
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout).ok()?;
    Some(
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) if o > 0 => o as u64,
                _ => 0,
            })
            .sum(),
    )
}
