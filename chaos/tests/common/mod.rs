//! Helpers shared by the load generator's integration tests.

/// Builds this checkout's `coupon-api`, `coupon-issuer`, `coupon-loadgen`
/// and `coupon-notifier`, which the tests spawn: see
/// [`couponrush_harness::build_workspace_binaries`].
pub fn build_binaries() {
    couponrush_harness::build_workspace_binaries();
}
