//! The README's flag reference is the binaries' own `--help`, so it cannot
//! drift: this test renders each help from the clap definitions and compares
//! it with the README. `UPDATE_README=1` rewrites the README instead.

use std::path::PathBuf;

use clap::{Command, CommandFactory};

fn plain(mut cmd: Command) -> Command {
    // Environment values of the machine running the test must not leak in.
    cmd = cmd.term_width(100).mut_args(|a| a.hide_env_values(true));
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in subs {
        cmd = cmd.mut_subcommand(name, |s| {
            s.term_width(100).mut_args(|a| a.hide_env_values(true))
        });
    }
    cmd
}

fn help(which: &str) -> String {
    let mut words = which.split(' ');
    let mut cmd = match words.next() {
        Some("coupon-api") => plain(couponrush_api::Cli::command()),
        Some("coupon-issuer") => plain(couponrush_issuer::Cli::command()),
        Some("coupon-notifier") => plain(couponrush_notifier::Cli::command()),
        Some("coupon-loadgen") => plain(couponrush_loadgen::Cli::command()),
        Some("coupon-lab") => plain(couponrush_lab::Cli::command()),
        Some("coupon-chaos") => plain(couponrush_chaos::Cli::command()),
        other => panic!("unknown binary {other:?}"),
    };
    cmd.build();
    let mut cmd = match words.next() {
        Some(sub) => cmd
            .find_subcommand(sub)
            .unwrap_or_else(|| panic!("no subcommand {sub}"))
            .clone(),
        None => cmd,
    };
    cmd.render_help().to_string().trim_end().to_string()
}

fn readme_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md")
}

/// The README with every `<!-- help:X -->` block replaced by X's help.
fn rendered(readme: &str) -> String {
    let mut out = String::new();
    let mut rest = readme;
    while let Some(start) = rest.find("<!-- help:") {
        let open_end = rest[start..].find("-->").expect("closed marker") + start + 3;
        let which = rest[start + "<!-- help:".len()..open_end - 3]
            .trim()
            .to_string();
        let close = rest[open_end..]
            .find("<!-- /help -->")
            .expect("a /help marker")
            + open_end;
        out.push_str(&rest[..open_end]);
        out.push_str(&format!(
            "\n```text\n$ {which} --help\n{}\n```\n",
            help(&which)
        ));
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

#[test]
fn readme_flag_reference_matches_the_binaries() {
    let path = readme_path();
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let expected = rendered(&readme);
    if std::env::var_os("UPDATE_README").is_some() {
        std::fs::write(&path, &expected).expect("write README.md");
        return;
    }
    assert!(
        readme == expected,
        "README.md's flag reference is out of date with the binaries' --help: \
         run `UPDATE_README=1 cargo test -p couponrush-xtask --test readme`"
    );
}

#[test]
fn every_binary_and_subcommand_is_documented() {
    let readme = std::fs::read_to_string(readme_path()).expect("README.md");
    for binary in [
        "coupon-api",
        "coupon-issuer",
        "coupon-notifier",
        "coupon-chaos",
    ] {
        assert!(
            readme.contains(&format!("<!-- help:{binary} -->")),
            "README has no flag reference for `{binary}`"
        );
    }
    for (binary, mut cmd) in [
        ("coupon-loadgen", couponrush_loadgen::Cli::command()),
        ("coupon-lab", couponrush_lab::Cli::command()),
    ] {
        cmd.build();
        for sub in cmd.get_subcommands().map(|s| s.get_name()) {
            if sub != "help" {
                assert!(
                    readme.contains(&format!("<!-- help:{binary} {sub} -->")),
                    "README has no flag reference for `{binary} {sub}`"
                );
            }
        }
    }
}

#[test]
fn the_quick_start_is_two_commands_demo_then_tests() {
    let readme = std::fs::read_to_string(readme_path()).expect("README.md");
    let start = readme
        .find("<!-- quickstart -->")
        .expect("quickstart marker");
    let end = readme.find("<!-- /quickstart -->").expect("quickstart end");
    let commands: Vec<&str> = readme[start..end]
        .lines()
        .filter(|l| !l.starts_with("<!--") && !l.starts_with("```") && !l.trim().is_empty())
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands[0].contains("coupon") && commands[0].contains("demo"));
    assert_eq!(commands[1], "scripts/test");
    // CI runs exactly these lines.
    let ci = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ci/run"))
        .expect(".ci/run");
    assert!(
        ci.contains("<!-- quickstart -->"),
        ".ci/run must run the README's quick start"
    );
}
