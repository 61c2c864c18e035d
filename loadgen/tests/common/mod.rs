//! Helpers shared by the load generator's integration tests.

/// Builds this checkout's `coupon-api` and `coupon-issuer`, which the tests
/// spawn (`cargo test -p couponrush-loadgen` alone would not rebuild them).
pub fn build_binaries() {
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "couponrush-api",
            "-p",
            "couponrush-issuer",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building coupon-api and coupon-issuer failed"
    );
}
