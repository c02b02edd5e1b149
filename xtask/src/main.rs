//! `cargo xtask`: the project's own commands. `setup` installs what a fresh machine lacks,
//! `build` compiles the eBPF programs and meshd, `test` runs every test (what CI runs), `demo`
//! is the README's main job (`meshd doctor` and a two-node mesh on test hosts).

mod cmd;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (apt packages, rust-src, bpf-linker). Idempotent.
    Setup,
    /// Build the eBPF object and meshd (release) with the object embedded.
    Build,
    /// Set up, check formatting and lints, build, then run every test, privileged ones too.
    Test {
        /// Passed to the test binaries, e.g. a test-name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the main job: `meshd doctor`, then a two-node mesh on test hosts.
    Demo {
        /// Interception mode for the demo's meshd instances.
        #[arg(long, default_value = "auto")]
        mode: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = cmd::workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup::run(),
        Task::Build => build(),
        Task::Test { args } => test(&args),
        Task::Demo { mode } => demo(&mode),
    }
}

fn build() -> Result<()> {
    setup::run()?;
    cmd::run(
        "cargo",
        &["build", "--release", "--package", "mesh-userspace"],
    )?;
    println!("xtask: built target/release/meshd (eBPF object embedded)");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    lint()?;
    // Tests drive the meshd binary, so build it first.
    cmd::run("cargo", &["build", "--package", "mesh-userspace"])?;
    let mut test_args = vec!["test", "--", "--nocapture"];
    test_args.extend(args.iter().map(String::as_str));
    cmd::run("cargo", &test_args)
}

fn lint() -> Result<()> {
    cmd::run("cargo", &["fmt", "--all", "--", "--check"])?;
    cmd::run(
        "cargo",
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    let toolchain = setup::ebpf_toolchain();
    let mut ebpf = cmd::command("rustup");
    ebpf.args([
        "run",
        toolchain.name,
        "cargo",
        "clippy",
        "--package",
        "mesh-ebpf",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .args(["--target-dir", "target/ebpf", "--", "-D", "warnings"]);
    if toolchain.bootstrap {
        ebpf.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd::status(ebpf)
}

fn demo(mode: &str) -> Result<()> {
    setup::run()?;
    cmd::run(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "mesh-userspace",
            "--package",
            "mesh-tests",
            "--bins",
        ],
    )?;
    cmd::run("target/release/meshd", &["doctor"])?;
    cmd::run("target/release/mesh-demo", &[mode])
}
