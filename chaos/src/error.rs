//! What stops a scenario before it has a row, saying what to do. A scenario
//! that oversold or lost something is not an error: it is a failed row
//! (exit 1); these are exit 2.

use couponrush_lab::deployment::DeploymentError;
use couponrush_lab::LabError;

/// Why a scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The deployment did not start (is tansu installed? `scripts/dev-up --install-only`).
    #[error(transparent)]
    Deployment(#[from] DeploymentError),
    /// The lab could not run the drop.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The instrument could not run the drop.
    #[error(transparent)]
    Instrument(#[from] couponrush_loadgen::Error),
    /// A step of the scenario (injecting a fault, reading the store) failed.
    #[error("a scenario step failed: {0}")]
    Step(String),
    /// A helper task died (a bug: please report it).
    #[error("an internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<String> for ChaosError {
    fn from(s: String) -> Self {
        ChaosError::Step(s)
    }
}

impl From<&str> for ChaosError {
    fn from(s: &str) -> Self {
        ChaosError::Step(s.to_string())
    }
}
