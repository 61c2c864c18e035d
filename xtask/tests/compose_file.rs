//! `docker-compose.yml`, checked against the binaries it runs, with no Docker
//! engine.
//!
//! A misspelt variable in a compose file fails silently: the binary falls back
//! to its default and the deployment runs with a setting nobody chose. So the
//! command of every service that runs a couponrush binary is parsed by that
//! binary's own clap definition, with each variable the service sets turned
//! into the flag that reads it; a variable no flag reads is an error, and so is
//! a value the flag cannot parse. The infrastructure is checked for what
//! couponrush's guarantees rest on: three brokers that replicate every record
//! three times and acknowledge on two, a Redis that fsyncs every decision, and
//! the five topics created with explicit retention.
//!
//! Compose interpolation is resolved as with nothing set on the host
//! (`${X:-d}` is `d`), and the test process's own environment is kept out of
//! parsing (clap's `env` is stripped before parsing): `scripts/test` exports
//! `KAFKA_BROKERS`, which must not change the verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, CommandFactory, FromArgMatches};
use couponrush_core::topics::{self, Topics};
use serde_norway::Value;

/// The file under test (rebuilt into the test whenever it changes).
const COMPOSE: &str = include_str!("../../docker-compose.yml");

/// Variables read by a library rather than by a flag.
const LIBRARY_ENV: &[&str] = &["RUST_LOG"];

/// Settings every broker must have: they are what lets one broker fail
/// without losing an acknowledged record or stopping writes.
const BROKER_SETTINGS: &[(&str, &str)] = &[
    ("KAFKA_PROCESS_ROLES", "broker,controller"),
    ("KAFKA_DEFAULT_REPLICATION_FACTOR", "3"),
    ("KAFKA_MIN_INSYNC_REPLICAS", "2"),
    ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3"),
    ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "3"),
    ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false"),
];

// ---------------------------------------------------------------- the file

/// The compose file with merge keys (`<<`) applied, as Compose does.
fn load(text: &str) -> Value {
    let mut doc: Value = serde_norway::from_str(text).expect("docker-compose.yml is not YAML");
    doc.apply_merge()
        .expect("docker-compose.yml has a bad merge key");
    doc
}

/// The services, in file order.
fn services(doc: &Value) -> Vec<(&str, &Value)> {
    doc.get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has no services")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service names are strings"), v))
        .collect()
}

/// A scalar as the string Compose would pass on.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A list of strings (`command`, `entrypoint`, `healthcheck.test`), or the
/// reason it is not one.
fn string_list(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .map(|i| scalar(i).ok_or_else(|| format!("{i:?} is not a string")))
            .collect(),
        Value::String(s) => Err(format!(
            "`{s}` is a string: use the list form, so it is checked exactly as Docker passes it"
        )),
        other => Err(format!("{other:?} is not a list")),
    }
}

/// The variables a service sets, as written (`None`: passed through from the
/// host). Both the mapping and the `KEY=value` list forms.
fn environment(service: &Value) -> Result<Vec<(String, Option<String>)>, String> {
    match service.get("environment") {
        None => Ok(Vec::new()),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let key = k.as_str().ok_or("a variable name is not a string")?;
                match v {
                    Value::Null => Ok((key.to_string(), None)),
                    v => scalar(v)
                        .map(|s| (key.to_string(), Some(s)))
                        .ok_or_else(|| format!("{key} is not a scalar")),
                }
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| {
                let s = i.as_str().ok_or("an environment entry is not a string")?;
                Ok(match s.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (s.to_string(), None),
                })
            })
            .collect(),
        Some(other) => Err(format!("environment is {other:?}")),
    }
}

/// One variable's resolved value, if the service sets it.
fn env_value(service: &Value, name: &str) -> Option<String> {
    environment(service)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v)
        .and_then(|v| interpolate(&v).ok())
}

/// Resolves Compose interpolation as `docker compose` does with nothing set on
/// the host: `${X:-d}` and `${X-d}` become `d`, `${X:+r}` becomes nothing, and
/// `$$` becomes `$`. A variable without a default is an error: the file's
/// meaning would depend on the host.
fn interpolate(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in `{s}`"))?;
            let expr = &r[..end];
            rest = &r[end + 1..];
            let name_len = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_len);
            if let Some(default) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
                out.push_str(default);
            } else if !(op.starts_with(":+") || op.starts_with('+')) {
                return Err(format!(
                    "`{s}` uses ${{{name}}} without a default: give it one (${{{name}:-...}})"
                ));
            }
        } else if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return Err(format!(
                "`{s}` uses ${rest} without a default: write ${{NAME:-...}}"
            ));
        } else {
            out.push('$');
        }
    }
    out.push_str(rest);
    Ok(out)
}

// ------------------------------------------------------- the couponrush binaries

/// A couponrush binary, known by its program name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binary {
    Api,
    Issuer,
    Loadgen,
    Notifier,
    Lab,
}

impl Binary {
    fn from_program(program: &str) -> Option<Self> {
        match program {
            "coupon-api" => Some(Self::Api),
            "coupon-issuer" => Some(Self::Issuer),
            "coupon-loadgen" => Some(Self::Loadgen),
            "coupon-notifier" => Some(Self::Notifier),
            "coupon-lab" => Some(Self::Lab),
            _ => None,
        }
    }

    fn program(self) -> &'static str {
        match self {
            Self::Api => "coupon-api",
            Self::Issuer => "coupon-issuer",
            Self::Loadgen => "coupon-loadgen",
            Self::Notifier => "coupon-notifier",
            Self::Lab => "coupon-lab",
        }
    }

    fn command(self) -> clap::Command {
        match self {
            Self::Api => couponrush_api::Cli::command(),
            Self::Issuer => couponrush_issuer::Cli::command(),
            Self::Loadgen => couponrush_loadgen::Cli::command(),
            Self::Notifier => couponrush_notifier::Cli::command(),
            Self::Lab => couponrush_lab::Cli::command(),
        }
    }

    /// Turns matches into the binary's own `Cli` (what `try_parse_from`
    /// does after matching), and reads back where it will connect.
    fn resolve(self, matches: &ArgMatches) -> Result<Resolved, String> {
        let err = |e: clap::Error| clap_message(&e);
        Ok(match self {
            Self::Api => {
                let cli = couponrush_api::Cli::from_arg_matches(matches).map_err(err)?;
                let config = cli.config();
                let refusal = (config.admin_token.is_none() && !config.listen.ip().is_loopback())
                    .then(|| {
                        format!(
                            "coupon-api would refuse to start: it listens on {} without ADMIN_TOKEN",
                            config.listen
                        )
                    });
                Resolved {
                    brokers: Some(cli.kafka.brokers),
                    redis: Some(cli.store.redis_url),
                    refusal,
                }
            }
            Self::Issuer => {
                let cli = couponrush_issuer::Cli::from_arg_matches(matches).map_err(err)?;
                Resolved {
                    brokers: Some(cli.kafka.brokers),
                    redis: Some(cli.store.redis_url),
                    refusal: None,
                }
            }
            Self::Loadgen => {
                let cli = couponrush_loadgen::Cli::from_arg_matches(matches).map_err(err)?;
                match cli.command {
                    couponrush_loadgen::Command::Run(args) => Resolved {
                        brokers: Some(args.kafka.brokers),
                        redis: args.redis,
                        refusal: None,
                    },
                    _ => Resolved {
                        brokers: None,
                        redis: None,
                        refusal: None,
                    },
                }
            }
            Self::Notifier => {
                let cli = couponrush_notifier::Cli::from_arg_matches(matches).map_err(err)?;
                Resolved {
                    brokers: Some(cli.kafka.brokers),
                    redis: None,
                    refusal: None,
                }
            }
            Self::Lab => {
                couponrush_lab::Cli::from_arg_matches(matches).map_err(err)?;
                Resolved {
                    brokers: None,
                    redis: None,
                    refusal: None,
                }
            }
        })
    }
}

/// What a parsed command line connects to, and whether it would start.
#[derive(Debug)]
struct Resolved {
    brokers: Option<String>,
    redis: Option<String>,
    refusal: Option<String>,
}

/// A couponrush service whose command and environment parsed.
#[derive(Debug)]
struct Parsed {
    binary: Binary,
    resolved: Resolved,
}

/// `cmd` with every `env = ...` removed (recursively), so that parsing sees
/// only what the service passes, not the test process's environment.
fn without_env(cmd: clap::Command) -> clap::Command {
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(|a| a.env(None));
    for name in subcommands {
        cmd = cmd.mut_subcommand(name, without_env);
    }
    cmd
}

/// The arguments (with an `env`) that a command line reads at each level:
/// level 0 is the program, level k the k-th subcommand on `path`.
fn env_readers(cmd: &clap::Command, path: &[String]) -> Vec<BTreeMap<String, Arg>> {
    let mut levels = Vec::new();
    let mut at = cmd;
    for depth in 0..=path.len() {
        levels.push(
            at.get_arguments()
                .filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a.clone())))
                .collect(),
        );
        if let Some(name) = path.get(depth) {
            at = at
                .find_subcommand(name)
                .expect("clap matched this subcommand");
        }
    }
    levels
}

/// The subcommands a match took, outermost first.
fn subcommand_path(matches: &ArgMatches) -> (Vec<String>, Vec<&ArgMatches>) {
    let (mut path, mut levels) = (Vec::new(), vec![matches]);
    let mut at = matches;
    while let Some((name, sub)) = at.subcommand() {
        path.push(name.to_string());
        levels.push(sub);
        at = sub;
    }
    (path, levels)
}

/// A clap error on one line, without the usage text.
fn clap_message(e: &clap::Error) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !(l.is_empty() || l.starts_with("Usage:") || l.starts_with("For more")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The flag a variable stands for, or why it cannot be one.
fn as_flag(arg: &Arg, name: &str, value: &str) -> Result<Option<String>, String> {
    let long = arg
        .get_long()
        .ok_or_else(|| format!("{name} is read by an argument without a --long name"))?;
    if arg.get_action().takes_values() {
        return Ok(Some(format!("--{long}={value}")));
    }
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(Some(format!("--{long}"))),
        "false" | "0" | "no" | "off" | "" => Ok(None),
        _ => Err(format!("{name}={value} is not a boolean (true or false)")),
    }
}

/// Parses one couponrush service the way its container would start: the
/// command line, plus each variable turned into the flag that reads it.
fn parse_service(name: &str, service: &Value) -> Result<Option<Parsed>, Vec<String>> {
    let fail = |msg: String| vec![format!("service `{name}`: {msg}")];
    let Some(command) = service.get("command") else {
        return match service.get("build") {
            Some(_) => Err(fail(
                "is built from this repo but sets no command: give it `coupon-api`, \
                 `coupon-issuer` or `coupon-loadgen ...` explicitly"
                    .into(),
            )),
            None => Ok(None),
        };
    };
    let argv = string_list(command).map_err(|e| fail(format!("command: {e}")))?;
    let Some(binary) = argv.first().and_then(|p| Binary::from_program(p)) else {
        return match service.get("build") {
            Some(_) => Err(fail(format!(
                "is built from this repo but runs {:?}, not a couponrush binary",
                argv.first()
            ))),
            None => Ok(None),
        };
    };
    if service.get("entrypoint").is_some() {
        return Err(fail(
            "sets an entrypoint: the command would not be what runs".into(),
        ));
    }
    if service.get("env_file").is_some() {
        return Err(fail(
            "uses env_file, which this check cannot see: set variables in `environment`".into(),
        ));
    }
    let argv: Vec<String> = argv
        .iter()
        .map(|a| interpolate(a))
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("command: {e}")))?;
    let program = argv[0].clone();
    let cmd = without_env(binary.command());

    // Which subcommand runs decides which variables are read.
    let matches = cmd.clone().try_get_matches_from(&argv).map_err(|e| {
        fail(format!(
            "`{}` does not parse: {}",
            argv.join(" "),
            clap_message(&e)
        ))
    })?;
    let (path, level_matches) = subcommand_path(&matches);
    let readers = env_readers(&binary.command(), &path);
    let shown = std::iter::once(program.clone())
        .chain(path.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");

    let env = environment(service).map_err(|e| fail(format!("environment: {e}")))?;
    let mut problems = Vec::new();
    let mut flags: Vec<Vec<String>> = vec![Vec::new(); readers.len()];
    for (var, value) in env {
        if LIBRARY_ENV.contains(&var.as_str()) {
            continue;
        }
        let Some((level, arg)) = readers
            .iter()
            .enumerate()
            .find_map(|(l, r)| r.get(&var).map(|a| (l, a)))
        else {
            let known: BTreeSet<&String> = readers.iter().flat_map(|r| r.keys()).collect();
            problems.push(format!(
                "service `{name}`: sets {var}, which `{shown}` does not read (it reads {})",
                known
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        };
        let Some(value) = value else { continue };
        let value = match interpolate(&value) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("service `{name}`: {var}: {e}"));
                continue;
            }
        };
        // The command line wins over the environment, as in clap.
        if level_matches[level].value_source(arg.get_id().as_str())
            == Some(ValueSource::CommandLine)
        {
            continue;
        }
        match as_flag(arg, &var, &value) {
            Ok(Some(flag)) => flags[level].push(flag),
            Ok(None) => {}
            Err(e) => problems.push(format!("service `{name}`: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    // The full command line: each level's flags right after its subcommand.
    let mut full = vec![program];
    full.extend(flags[0].iter().cloned());
    let mut args = argv[1..].iter();
    for (depth, sub) in path.iter().enumerate() {
        for a in args.by_ref() {
            full.push(a.clone());
            if a == sub {
                break;
            }
        }
        full.extend(flags[depth + 1].iter().cloned());
    }
    full.extend(args.cloned());
    let matches = cmd.try_get_matches_from(&full).map_err(|e| {
        fail(format!(
            "with its environment, `{}` does not parse: {}",
            full.join(" "),
            clap_message(&e)
        ))
    })?;
    let resolved = binary.resolve(&matches).map_err(fail)?;
    if let Some(refusal) = &resolved.refusal {
        return Err(fail(refusal.clone()));
    }
    Ok(Some(Parsed { binary, resolved }))
}

/// Every couponrush service, parsed; or every problem found.
fn couponrush_services(doc: &Value) -> Result<Vec<(String, Parsed)>, Vec<String>> {
    let (mut parsed, mut problems) = (Vec::new(), Vec::new());
    for (name, service) in services(doc) {
        match parse_service(name, service) {
            Ok(Some(p)) => parsed.push((name.to_string(), p)),
            Ok(None) => {}
            Err(mut e) => problems.append(&mut e),
        }
    }
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems)
    }
}

// ------------------------------------------------------------- the infrastructure

/// The broker services: those with the broker role.
fn brokers(doc: &Value) -> Vec<(&str, &Value)> {
    services(doc)
        .into_iter()
        .filter(|(_, s)| {
            env_value(s, "KAFKA_PROCESS_ROLES").is_some_and(|r| r.split(',').any(|r| r == "broker"))
        })
        .collect()
}

fn check_brokers(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let brokers = brokers(doc);
    if brokers.len() != 3 {
        problems.push(format!(
            "{} Kafka brokers ({:?}); replication 3 with min.insync.replicas 2 needs 3",
            brokers.len(),
            brokers.iter().map(|(n, _)| n).collect::<Vec<_>>()
        ));
    }
    let mut node_ids = BTreeMap::new();
    let mut cluster_ids = BTreeSet::new();
    let mut voters = BTreeSet::new();
    for (name, broker) in &brokers {
        for (key, want) in BROKER_SETTINGS {
            let got = env_value(broker, key);
            if got.as_deref() != Some(want) {
                problems.push(format!(
                    "service `{name}`: {key} is {got:?}, must be {want:?}"
                ));
            }
        }
        match env_value(broker, "KAFKA_NODE_ID") {
            Some(id) => {
                if let Some(other) = node_ids.insert(id.clone(), *name) {
                    problems.push(format!(
                        "service `{name}`: KAFKA_NODE_ID {id} is also `{other}`'s"
                    ));
                }
            }
            None => problems.push(format!("service `{name}`: no KAFKA_NODE_ID")),
        }
        cluster_ids.insert(env_value(broker, "CLUSTER_ID"));
        voters.insert(env_value(broker, "KAFKA_CONTROLLER_QUORUM_VOTERS"));
        let advertised = env_value(broker, "KAFKA_ADVERTISED_LISTENERS").unwrap_or_default();
        if !advertised.contains(&format!("//{name}:")) {
            problems.push(format!(
                "service `{name}`: advertises {advertised:?}, not its own service name"
            ));
        }
        if broker.get("healthcheck").is_none() {
            problems.push(format!(
                "service `{name}`: no healthcheck (kafka-init waits for it)"
            ));
        }
        if broker.get("volumes").is_none() {
            problems.push(format!(
                "service `{name}`: no volume: its log is lost with the container"
            ));
        }
    }
    if cluster_ids.len() != 1 || cluster_ids.contains(&None) {
        problems.push(format!(
            "the brokers must share one CLUSTER_ID, have {cluster_ids:?}"
        ));
    }
    if voters.len() != 1 {
        problems.push(format!(
            "the brokers disagree on KAFKA_CONTROLLER_QUORUM_VOTERS: {voters:?}"
        ));
    }
    if let Some(Some(list)) = voters.first() {
        let listed: BTreeMap<String, String> = list
            .split(',')
            .filter_map(|v| {
                let (id, addr) = v.split_once('@')?;
                Some((id.to_string(), addr.split(':').next()?.to_string()))
            })
            .collect();
        let expected: BTreeMap<String, String> = node_ids
            .iter()
            .map(|(id, name)| (id.clone(), name.to_string()))
            .collect();
        if listed != expected {
            problems.push(format!(
                "KAFKA_CONTROLLER_QUORUM_VOTERS {list:?} does not name every broker by its node id"
            ));
        }
    }
    problems
}

fn check_redis(doc: &Value) -> Vec<String> {
    let redis: Vec<_> = services(doc)
        .into_iter()
        .filter(|(_, s)| {
            s.get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| i.starts_with("redis:"))
        })
        .collect();
    let [(name, redis)] = redis.as_slice() else {
        return vec![format!("want one redis service, have {}", redis.len())];
    };
    let Some(command) = redis.get("command") else {
        return vec![format!(
            "service `{name}`: no command, so no AOF: decisions live in memory only"
        )];
    };
    let argv = match string_list(command) {
        Ok(a) => a,
        Err(e) => return vec![format!("service `{name}`: command: {e}")],
    };
    let option = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .map(String::as_str)
    };
    let mut problems = Vec::new();
    if option("--appendonly") != Some("yes") {
        problems.push(format!(
            "service `{name}`: needs `--appendonly yes`: without the AOF a restart forgets decisions"
        ));
    }
    if option("--appendfsync") != Some("always") {
        problems.push(format!(
            "service `{name}`: needs `--appendfsync always`: an acknowledged decision must survive a crash"
        ));
    }
    if redis.get("volumes").is_none() {
        problems.push(format!(
            "service `{name}`: no volume: the AOF is lost with the container"
        ));
    }
    if redis.get("healthcheck").is_none() {
        problems.push(format!(
            "service `{name}`: no healthcheck (the api and issuers wait for it)"
        ));
    }
    problems
}

/// The service creating topics with `kafka-topics.sh --create`, and its
/// script, one command per line.
fn topic_init(doc: &Value) -> Option<(&str, &Value, Vec<String>)> {
    services(doc).into_iter().find_map(|(name, s)| {
        let mut text = String::new();
        for key in ["entrypoint", "command"] {
            match s.get(key) {
                Some(Value::Sequence(items)) => {
                    for i in items.iter().filter_map(Value::as_str) {
                        let _ = writeln!(text, "{i}");
                    }
                }
                Some(Value::String(t)) => {
                    let _ = writeln!(text, "{t}");
                }
                _ => {}
            }
        }
        let text = text.replace("\\\n", " ");
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("--create"))
            .map(str::to_string)
            .collect();
        (text.contains("kafka-topics.sh") && !lines.is_empty()).then_some((name, s, lines))
    })
}

/// The whitespace-separated words of a shell line, unquoted.
fn words(line: &str) -> Vec<String> {
    line.split_whitespace()
        .map(|w| w.trim_matches(|c| c == '"' || c == '\'').to_string())
        .collect()
}

fn check_topics(doc: &Value) -> Vec<String> {
    let Some((name, init, lines)) = topic_init(doc) else {
        return vec!["no service creates the topics with kafka-topics.sh --create".into()];
    };
    let mut problems = Vec::new();
    // The specs the binaries would create, with this file's replication.
    let specs = Topics::default().specs(8, 3);
    let names: BTreeSet<&str> = [
        topics::REQUESTS,
        topics::OUTCOMES,
        topics::DLQ,
        topics::EVENTS,
        topics::CHECKPOINTS,
        topics::COMPENSATIONS,
    ]
    .into();
    assert_eq!(
        names,
        specs.iter().map(|s| s.name.as_str()).collect(),
        "core's specs and constants disagree"
    );
    for spec in &specs {
        let Some(line) = lines
            .iter()
            .map(|l| words(l))
            .find(|w| w.windows(2).any(|p| p[0] == "--topic" && p[1] == spec.name))
        else {
            problems.push(format!("service `{name}`: does not create {}", spec.name));
            continue;
        };
        let option = |flag: &str| {
            line.windows(2)
                .filter(|p| p[0] == flag)
                .map(|p| p[1].clone())
                .collect::<Vec<_>>()
        };
        if !line.iter().any(|w| w == "--if-not-exists") {
            problems.push(format!(
                "service `{name}`: {} lacks --if-not-exists: a second `up` would fail",
                spec.name
            ));
        }
        if option("--replication-factor") != ["3"] {
            problems.push(format!(
                "service `{name}`: {} needs --replication-factor 3",
                spec.name
            ));
        }
        let configs: BTreeMap<String, String> = option("--config")
            .iter()
            .filter_map(|c| c.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (key, want) in &spec.configs {
            if configs.get(key) != Some(want) {
                problems.push(format!(
                    "service `{name}`: {} has {key}={:?}, core/src/topics.rs says {want}",
                    spec.name,
                    configs.get(key)
                ));
            }
        }
        let compacted = configs.get("cleanup.policy").map(String::as_str) == Some("compact");
        for key in ["retention.ms", "retention.bytes"] {
            if !compacted && !configs.contains_key(key) {
                problems.push(format!(
                    "service `{name}`: {} has no explicit {key}",
                    spec.name
                ));
            }
        }
    }
    match env_value(init, "COUPON_PARTITIONS").map(|p| p.parse::<u32>()) {
        Some(Ok(n)) if n > 0 => {}
        other => problems.push(format!(
            "service `{name}`: COUPON_PARTITIONS must default to a positive count, is {other:?}"
        )),
    }
    problems
}

/// `depends_on` with its conditions (the short list form means "started").
fn depends_on(service: &Value) -> BTreeMap<String, String> {
    match service.get("depends_on") {
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|s| (s.to_string(), "service_started".to_string()))
            .collect(),
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(k, v)| {
                let condition = v
                    .get("condition")
                    .and_then(Value::as_str)
                    .unwrap_or("service_started");
                Some((k.as_str()?.to_string(), condition.to_string()))
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// What the couponrush services need from the rest of the file: the right
/// brokers and store, a start after the topics exist, a readiness check on
/// the api, and issuers that can be scaled.
fn check_wiring(doc: &Value, parsed: &[(String, Parsed)]) -> Vec<String> {
    let mut problems = Vec::new();
    let broker_names: BTreeSet<String> = brokers(doc).iter().map(|(n, _)| n.to_string()).collect();
    let redis_names: BTreeSet<&str> = services(doc)
        .into_iter()
        .filter(|(_, s)| {
            s.get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| i.starts_with("redis:"))
        })
        .map(|(n, _)| n)
        .collect();
    let init = topic_init(doc).map(|(n, _, _)| n.to_string());
    let all = services(doc);
    let service = |name: &str| all.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);

    for (name, p) in parsed {
        let s = service(name).expect("parsed from this file");
        if let Some(brokers) = &p.resolved.brokers {
            let hosts: BTreeSet<String> = brokers
                .split(',')
                .map(|b| b.split(':').next().unwrap_or_default().to_string())
                .collect();
            if hosts != broker_names {
                problems.push(format!(
                    "service `{name}`: brokers are {brokers:?}, not the broker services {broker_names:?}"
                ));
            }
        }
        match &p.resolved.redis {
            Some(url) => {
                let host = url
                    .trim_start_matches("redis://")
                    .split([':', '/'])
                    .next()
                    .unwrap_or_default();
                if !redis_names.contains(host) {
                    problems.push(format!(
                        "service `{name}`: store is {url:?}, not the redis service {redis_names:?}"
                    ));
                }
            }
            None if p.binary == Binary::Loadgen && p.resolved.brokers.is_some() => {
                problems.push(format!(
                    "service `{name}`: sets no LOADGEN_REDIS_URL, so the drop is not audited against the store"
                ));
            }
            None => {}
        }
        if matches!(p.binary, Binary::Api | Binary::Issuer) {
            let deps = depends_on(s);
            let want_init = init.as_deref().unwrap_or("<topic init>");
            if deps.get(want_init).map(String::as_str) != Some("service_completed_successfully") {
                problems.push(format!(
                    "service `{name}`: must depend on `{want_init}` with condition service_completed_successfully (the api reads the partition count at start)"
                ));
            }
            for redis in &redis_names {
                if deps.get(*redis).map(String::as_str) != Some("service_healthy") {
                    problems.push(format!(
                        "service `{name}`: must depend on `{redis}` with condition service_healthy"
                    ));
                }
            }
        }
        match p.binary {
            Binary::Api => {
                let test = s
                    .get("healthcheck")
                    .and_then(|h| h.get("test"))
                    .map(string_list);
                match test {
                    Some(Ok(t)) if t.join(" ").contains("/readyz") => {}
                    _ => problems.push(format!(
                        "service `{name}`: needs a healthcheck on /readyz (the load generator waits for it)"
                    )),
                }
            }
            Binary::Issuer => {
                if s.get("container_name").is_some() {
                    problems.push(format!(
                        "service `{name}`: container_name makes `--scale {name}=N` impossible"
                    ));
                }
                for port in s
                    .get("ports")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                {
                    let fixed = match port {
                        Value::Mapping(m) => m.get("published").is_some(),
                        other => scalar(other).is_some_and(|p| p.contains(':')),
                    };
                    if fixed {
                        problems.push(format!(
                            "service `{name}`: publishes a fixed host port ({port:?}): a second replica could not bind it"
                        ));
                    }
                }
            }
            Binary::Loadgen | Binary::Notifier | Binary::Lab => {}
        }
    }
    if let Some(init) = &init {
        let deps = service(init).map(depends_on).unwrap_or_default();
        for broker in &broker_names {
            if deps.get(broker).map(String::as_str) != Some("service_healthy") {
                problems.push(format!(
                    "service `{init}`: must depend on `{broker}` with condition service_healthy"
                ));
            }
        }
    }
    for binary in [Binary::Api, Binary::Issuer] {
        if !parsed.iter().any(|(_, p)| p.binary == binary) {
            problems.push(format!("no service runs {}", binary.program()));
        }
    }
    problems
}

/// Everything wrong with a compose file, each naming its service.
fn check(doc: &Value) -> Vec<String> {
    let mut problems = match couponrush_services(doc) {
        Ok(parsed) => check_wiring(doc, &parsed),
        Err(problems) => problems,
    };
    problems.extend(check_brokers(doc));
    problems.extend(check_redis(doc));
    problems.extend(check_topics(doc));
    problems
}

/// The problems as a failure message.
fn report(problems: &[String]) -> String {
    format!("docker-compose.yml:\n  - {}", problems.join("\n  - "))
}

fn assert_clean(problems: Vec<String>) {
    assert!(problems.is_empty(), "{}", report(&problems));
}

/// `COMPOSE` with `from` replaced (which must occur), checked.
fn check_edited(from: &str, to: &str) -> Vec<String> {
    assert!(
        COMPOSE.contains(from),
        "the edit {from:?} no longer applies"
    );
    check(&load(&COMPOSE.replacen(from, to, 1)))
}

fn assert_flags(problems: &[String], needles: &[&str]) {
    assert!(
        problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n))),
        "expected a problem mentioning {needles:?}, got {problems:#?}"
    );
}

// ------------------------------------------------------------------- the file's tests

#[test]
fn every_couponrush_service_runs_a_command_line_its_binary_accepts() {
    let doc = load(COMPOSE);
    let parsed = couponrush_services(&doc).unwrap_or_else(|p| panic!("{}", report(&p)));
    let programs: BTreeSet<&str> = parsed.iter().map(|(_, p)| p.binary.program()).collect();
    assert_eq!(
        programs,
        [
            "coupon-api",
            "coupon-issuer",
            "coupon-lab",
            "coupon-loadgen",
            "coupon-notifier"
        ]
        .into()
    );
    assert_clean(check_wiring(&doc, &parsed));
}

#[test]
fn three_brokers_replicate_every_record_three_times_and_acknowledge_on_two() {
    assert_clean(check_brokers(&load(COMPOSE)));
}

#[test]
fn redis_fsyncs_every_decision_before_answering() {
    assert_clean(check_redis(&load(COMPOSE)));
}

#[test]
fn init_creates_every_topic_with_the_retention_core_specifies() {
    assert_clean(check_topics(&load(COMPOSE)));
}

// ---------------------------------------------------- the check itself can fail

const SMALL: &str = r#"
services:
  kafka-1:
    image: apache/kafka:3.9.1
    environment: {KAFKA_PROCESS_ROLES: "broker,controller"}
  api:
    build: .
    command: ["coupon-api", "--listen", "0.0.0.0:8080"]
    environment:
      ADMIN_TOKEN: ${ADMIN_TOKEN:-change-me}
      KAFKA_BROKERS: kafka-1:9092
  issuer:
    build: .
    command: ["coupon-issuer"]
    environment:
      - KAFKA_BROKERS=kafka-1:9092
      - METRICS_LISTEN=0.0.0.0:9100
  loadgen:
    build: .
    command: ["coupon-loadgen", "run", "--stock", "10"]
    environment:
      LOADGEN_TARGET: http://api:8080
      KAFKA_BROKERS: kafka-1:9092
      LOADGEN_QUIET: "true"
"#;

/// `SMALL` with `from` replaced (which must occur), its services parsed.
fn parse_small(from: &str, to: &str) -> Result<Vec<(String, Parsed)>, Vec<String>> {
    assert!(SMALL.contains(from), "the edit {from:?} does not apply");
    couponrush_services(&load(&SMALL.replacen(from, to, 1)))
}

#[test]
fn a_small_file_parses() {
    let parsed = parse_small("", "").expect("SMALL is valid");
    assert_eq!(parsed.len(), 3);
    let api = &parsed[0].1.resolved;
    assert_eq!(api.brokers.as_deref(), Some("kafka-1:9092"));
}

#[test]
fn rejects_a_variable_the_binary_does_not_read() {
    let problems = parse_small(
        "METRICS_LISTEN=0.0.0.0:9100",
        "METRICS_LISTEN=0.0.0.0:9100\n      - BOGUS_SETTING=1",
    )
    .unwrap_err();
    assert_flags(&problems, &["`issuer`", "BOGUS_SETTING", "coupon-issuer"]);
}

#[test]
fn rejects_a_flag_the_binary_does_not_have() {
    let problems =
        parse_small(r#""0.0.0.0:8080"]"#, r#""0.0.0.0:8080", "--bogus-flag"]"#).unwrap_err();
    assert_flags(&problems, &["`api`", "--bogus-flag"]);
}

#[test]
fn rejects_a_value_the_binary_cannot_parse() {
    let problems = parse_small(
        "METRICS_LISTEN=0.0.0.0:9100",
        "METRICS_LISTEN=0.0.0.0:9100\n      - BATCH_LINGER=soon",
    )
    .unwrap_err();
    assert_flags(&problems, &["`issuer`", "--batch-linger", "soon"]);
}

#[test]
fn rejects_a_variable_only_another_subcommand_reads() {
    let problems = parse_small("LOADGEN_QUIET: \"true\"", "DEMO_STOCK: \"10\"").unwrap_err();
    assert_flags(
        &problems,
        &["`loadgen`", "DEMO_STOCK", "coupon-loadgen run"],
    );
}

#[test]
fn rejects_an_api_on_all_interfaces_without_an_admin_token() {
    let problems = parse_small("ADMIN_TOKEN: ${ADMIN_TOKEN:-change-me}", "").unwrap_err();
    assert_flags(&problems, &["`api`", "refuse", "ADMIN_TOKEN"]);
}

#[test]
fn rejects_a_variable_without_a_default() {
    let problems = parse_small("${ADMIN_TOKEN:-change-me}", "${ADMIN_TOKEN}").unwrap_err();
    assert_flags(&problems, &["`api`", "ADMIN_TOKEN", "without a default"]);
}

#[test]
fn the_command_line_wins_over_the_environment() {
    let parsed = parse_small(
        r#""--stock", "10"]"#,
        r#""--stock", "10", "--brokers", "kafka-2:9092"]"#,
    )
    .expect("a flag and its variable together are what clap accepts");
    assert_eq!(
        parsed[2].1.resolved.brokers.as_deref(),
        Some("kafka-2:9092")
    );
}

#[test]
fn a_bogus_variable_and_flag_in_the_real_file_are_caught() {
    let problems = check_edited(
        "METRICS_LISTEN: 0.0.0.0:9100",
        "METRICS_LISTEN: 0.0.0.0:9100\n      ISSUER_BATCH: \"500\"",
    );
    assert_flags(&problems, &["`issuer`", "ISSUER_BATCH"]);
    let problems = check_edited(
        r#"["coupon-api", "--listen", "0.0.0.0:8080"]"#,
        r#"["coupon-api", "--listen", "0.0.0.0:8080", "--partitions", "8"]"#,
    );
    assert_flags(&problems, &["`api`", "--partitions"]);
}

#[test]
fn a_weakened_real_file_is_caught() {
    let problems = check_edited(
        "KAFKA_MIN_INSYNC_REPLICAS: \"2\"",
        "KAFKA_MIN_INSYNC_REPLICAS: \"1\"",
    );
    assert_flags(&problems, &["kafka-1", "KAFKA_MIN_INSYNC_REPLICAS"]);
    let problems = check_edited(
        "\"--appendfsync\", \"always\"",
        "\"--appendfsync\", \"everysec\"",
    );
    assert_flags(&problems, &["`redis`", "--appendfsync always"]);
    let problems = check_edited(" --config retention.bytes=1073741824", "");
    assert_flags(&problems, &["coupon.requests", "retention.bytes"]);
    let problems = check_edited(
        "  issuer:\n    <<: *couponrush\n",
        "  issuer:\n    <<: *couponrush\n    ports: [\"9100:9100\"]\n",
    );
    assert_flags(&problems, &["`issuer`", "fixed host port"]);
}

#[test]
fn interpolation_uses_defaults_as_with_nothing_set() {
    assert_eq!(interpolate("${A:-x}/${B-y}${C:+z}").unwrap(), "x/y");
    assert_eq!(interpolate("cost $$5").unwrap(), "cost $5");
    assert!(interpolate("${A}").is_err());
    assert!(interpolate("$A").is_err());
    assert!(interpolate("${A:?required}").is_err());
}
