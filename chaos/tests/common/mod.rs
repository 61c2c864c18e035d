//! Helpers shared by the load generator's integration tests.

/// Builds this checkout's `coupon-api`, `coupon-issuer` and
/// `coupon-loadgen`, which the tests spawn (`cargo test -p couponrush-chaos`
/// alone would not rebuild them).
pub fn build_binaries() {
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "couponrush-api",
            "-p",
            "couponrush-issuer",
            "-p",
            "couponrush-loadgen",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building coupon-api, coupon-issuer and coupon-loadgen failed"
    );
}
