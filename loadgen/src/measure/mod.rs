//! The measurements, as pure functions over what was sent and seen.
//!
//! - [`latency`]: HDR histograms, merged, serialised.
//! - [`skew`]: how far decision order strays from arrival order.
//! - [`audit`]: oversold, double issued, lost, phantom, cross-checked.

pub mod audit;
pub mod latency;
pub mod skew;
