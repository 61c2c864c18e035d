//! # couponrush-xtask
//!
//! Checks of the repository, not of a running system; they live in `tests/`:
//! - `readme`: the README's flag reference is each binary's own `--help`
//!   (`UPDATE_README=1 cargo test -p couponrush-xtask --test readme`
//!   rewrites it), every subcommand is documented, and the quick start is
//!   the two commands CI runs.
//! - `compose_file`: every command, flag and environment variable in
//!   docker-compose.yml is one its binary accepts.
