//! Boolean flags read from the environment accept the spellings shells and CI
//! use (`1`, `0`, `yes`, `true`, empty). CI sets `LOADGEN_QUIET=1`; a strict
//! `true|false` parser once refused it and failed the quick start.
//!
//! One test per process: it sets environment variables.

use clap::Parser;
use couponrush_lab::{Cli, Command};

fn demo_quiet(value: &str) -> bool {
    std::env::set_var("LOADGEN_QUIET", value);
    let cli = Cli::try_parse_from(["coupon-lab", "demo"])
        .unwrap_or_else(|e| panic!("LOADGEN_QUIET={value:?} refused: {e}"));
    match cli.command {
        Command::Demo(args) => args.output.quiet,
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn boolean_env_flags_take_shell_spellings() {
    for on in ["1", "true", "yes", "on"] {
        assert!(demo_quiet(on), "LOADGEN_QUIET={on} should be on");
    }
    for off in ["0", "false", "no", "off", ""] {
        assert!(!demo_quiet(off), "LOADGEN_QUIET={off:?} should be off");
    }
    std::env::remove_var("LOADGEN_QUIET");
    // The flag itself still works, and its absence means off.
    let parse = |args: &[&str]| match Cli::try_parse_from(args).expect("parses").command {
        Command::Demo(args) => args.output.quiet,
        other => panic!("parsed as {other:?}"),
    };
    assert!(parse(&["coupon-lab", "demo", "--quiet"]));
    assert!(!parse(&["coupon-lab", "demo"]));
}
