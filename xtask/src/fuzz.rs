//! `cargo xtask fuzz`: meshd's parsers of untrusted input under libFuzzer (cargo-fuzz). The
//! targets live in `fuzz/` (a workspace of its own, built with sanitizers by the toolchain that
//! builds eBPF: nightly, or stable + RUSTC_BOOTSTRAP=1). Each target starts from its committed
//! seeds in `fuzz/corpus/<target>/` and grows a working corpus in `fuzz/target/corpus/<target>/`
//! (git-ignored, kept between runs). A crash, a panic or an input slower than [`INPUT_TIMEOUT`]
//! fails the run; libFuzzer leaves the input in `fuzz/artifacts/<target>/`.

use std::path::Path;

use anyhow::{Context, Result};

use crate::{cmd, setup};

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &[
    "spiffe_id",
    "hbone_authority",
    "config_yaml",
    "policy_yaml",
    "http1_head",
    "http1_filter",
    "cert_identity",
    "registry_record",
];

/// Seconds per target within `cargo xtask test`.
pub const TEST_SECS: u32 = 10;
/// Seconds per target of `cargo xtask fuzz` without `--secs`.
pub const DEFAULT_SECS: u32 = 300;
/// Seconds one input may take before libFuzzer calls it a hang (inputs are at most 4 KiB).
const INPUT_TIMEOUT: u32 = 10;
/// libFuzzer's memory limit per target process.
const RSS_LIMIT_MB: u32 = 2048;

/// Builds every target once, then runs `targets` (all when empty) `secs` seconds each.
pub fn run(secs: u32, targets: &[String]) -> Result<()> {
    let chosen: Vec<&str> = match targets {
        [] => TARGETS.to_vec(),
        some => some.iter().map(String::as_str).collect(),
    };
    if let Some(unknown) = chosen.iter().find(|t| !TARGETS.contains(t)) {
        anyhow::bail!(
            "no fuzz target {unknown:?}; targets: {}",
            TARGETS.join(", ")
        );
    }
    cmd::status(cargo_fuzz(&["build"]))?;
    let root = std::env::current_dir()?;
    for target in chosen {
        run_one(&root, target, secs)?;
    }
    println!("xtask: fuzz: no crash ({secs} s per target)");
    Ok(())
}

fn run_one(root: &Path, target: &str, secs: u32) -> Result<()> {
    let work = root.join("fuzz/target/corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let seeds = root.join("fuzz/corpus").join(target);
    let (work, seeds) = (work.to_string_lossy(), seeds.to_string_lossy());
    let limits = [
        format!("-max_total_time={secs}"),
        format!("-timeout={INPUT_TIMEOUT}"),
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
    ];
    // New inputs go to the first corpus directory: the seeds stay as committed.
    let mut args = vec!["run", target, &work, &seeds, "--"];
    args.extend(limits.iter().map(String::as_str));
    cmd::status(cargo_fuzz(&args)).with_context(|| {
        format!(
            "fuzz target {target} failed: the input is in fuzz/artifacts/{target}/; replay it with \
             `rustup run nightly cargo fuzz run {target} fuzz/artifacts/{target}/<file>`, then add \
             it as a regression test next to the code"
        )
    })
}

/// `cargo fuzz ARGS` under the eBPF toolchain (sanitizer flags need nightly or bootstrap).
fn cargo_fuzz(args: &[&str]) -> std::process::Command {
    let toolchain = setup::ebpf_toolchain();
    let mut c = cmd::command("rustup");
    c.args(["run", toolchain.name, "cargo", "fuzz"]).args(args);
    // fuzz/ builds in fuzz/target (its own toolchain and flags: nothing to share with target/).
    c.env_remove("CARGO_TARGET_DIR");
    if toolchain.bootstrap {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    c
}
