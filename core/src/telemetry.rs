//! Logging, metrics and shutdown: the plumbing every long-running process
//! shares.
//!
//! Logs are `tracing` events, quiet at `info` (one line per lifecycle step,
//! never per request); `RUST_LOG` overrides the filter. Metrics go through the
//! `metrics` facade to a Prometheus recorder that each binary exposes.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// The default log filter: our crates at info, the noisy ones at warn.
pub const DEFAULT_LOG_FILTER: &str = "info,rdkafka=warn,librdkafka=warn,hyper=warn,tower=warn";

/// Installs the global tracing subscriber (text, or JSON lines when `json`).
/// Safe to call more than once: later calls are ignored.
pub fn init_tracing(json: bool) {
    init_tracing_with(json, DEFAULT_LOG_FILTER);
}

/// Like [`init_tracing`], with another filter when `RUST_LOG` is unset.
pub fn init_tracing_with(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// How often a recorder without a listener drains its histograms.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Latency buckets (seconds) for every histogram: 50 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder refused its configuration (a bug in this build).
    #[error("cannot set up the metrics recorder: {0}")]
    Recorder(#[source] BuildError),
    /// The `/metrics` listener could not be started.
    #[error(
        "cannot serve metrics on {addr}: {source}; choose a free address with --metrics-listen"
    )]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: BuildError,
    },
}

/// Installs the global Prometheus recorder and returns its handle (render it
/// for `/metrics`). If `listen` is given, also serves `/metrics` there.
/// When a recorder is already installed (several components in one process,
/// as in the demo), returns `None` and metrics go to the first one.
pub fn install_metrics(
    listen: Option<SocketAddr>,
) -> Result<Option<PrometheusHandle>, MetricsError> {
    let builder = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(MetricsError::Recorder)?;
    match listen {
        Some(addr) => {
            let builder = builder.with_http_listener(addr);
            let (recorder, exporter) = builder
                .build()
                .map_err(|source| MetricsError::Listen { addr, source })?;
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                return Ok(None);
            }
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::warn!(error = ?e, "metrics listener stopped");
                }
            });
            Ok(Some(handle))
        }
        None => {
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                return Ok(None);
            }
            // Histograms keep every sample until they are drained: by a
            // render (a scrape) or by upkeep. Without a listener's upkeep
            // task, a process nobody scrapes would grow without bound.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(UPKEEP_EVERY);
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Ok(Some(handle))
        }
    }
}

/// A token cancelled on ctrl-c or SIGTERM: the one shutdown signal of a
/// process. Components take a child token, so tests cancel them directly.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        tracing::info!("shutdown signal received");
        cancel.cancel();
    });
    token
}

/// A name unique to this process among its replicas: `prefix-host-pid-xxxx`.
/// Containers all run as pid 1, so the host name and a random suffix keep
/// client ids and lock owners apart.
pub fn instance_id(prefix: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("{prefix}-{host}-{}-{suffix}", std::process::id())
}
