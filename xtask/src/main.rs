//! `cargo xtask`: the project's own commands. `setup` installs what a fresh machine lacks,
//! `build` compiles the eBPF programs and meshd, `test` runs every test (what CI runs), `demo`
//! is the README's main job (`meshd doctor` and a two-node mesh on test hosts), `fuzz` runs the
//! parsers of untrusted input under libFuzzer, `image` packages meshd in a container image.

mod cmd;
mod fuzz;
mod image;
mod profile;
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
    /// Install what this machine lacks (apt packages, rust-src, bpf-linker, cargo-fuzz).
    /// Idempotent.
    Setup,
    /// Build the eBPF object and meshd (release) with the object embedded.
    Build,
    /// Build meshd as `build` does, then its container image `localhost/meshd:<version>`
    /// (FROM scratch: meshd, meshd-cni and their shared libraries) with podman under a
    /// configuration and storage of its own (--store); prints the image's size.
    Image {
        /// Package the meshd and meshd-cni already built in this directory instead of
        /// building the release ones (the image test packages its own build this way).
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// podman's configuration and storage for the image (containers.conf, root/,
        /// runroot/); never the machine's.
        #[arg(long, default_value = "target/podman")]
        store: std::path::PathBuf,
    },
    /// Set up, check formatting and lints, build, run every test (privileged ones too), then
    /// every fuzz target for 10 s and the benchmark's short mode.
    Test {
        /// Passed to the test binaries, e.g. a test-name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fuzz meshd's parsers of untrusted input (cargo-fuzz, fuzz/): each target for --secs
    /// seconds; fails on the first crash (its input is left in fuzz/artifacts/TARGET/).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECS)]
        secs: u32,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// The mode-comparison benchmark (direct, meshd iptables/ebpf, stunnel4 and HAProxy pairs).
    Bench {
        /// A few seconds per path: keeps the benchmark working (CI runs this).
        #[arg(long)]
        short: bool,
    },
    /// Profile meshd under one benchmark path and scenario: perf samples, a flame graph
    /// (bench/flamegraph-PATH-SCENARIO.svg) and the top of the profile (bench/profile-*.txt).
    Profile {
        #[arg(long, default_value = "meshd-ebpf")]
        path: String,
        #[arg(long, default_value = "keep-alive")]
        scenario: String,
        /// Seconds of sampling (the scenario runs 10 s a round, 2 rounds).
        #[arg(long, default_value_t = 5)]
        seconds: u32,
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
        Task::Image { bin_dir, store } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => {
                    build()?;
                    "target/release".into()
                }
            };
            image::build(&image::Request { bin_dir, store }).map(|_| ())
        }
        Task::Test { args } => test(&args),
        Task::Demo { mode } => demo(&mode),
        Task::Bench { short } => bench(short),
        Task::Fuzz { secs, targets } => {
            setup::run()?;
            fuzz::run(secs, &targets)
        }
        Task::Profile {
            path,
            scenario,
            seconds,
        } => {
            build_release_bins()?;
            profile::run(&profile::Request {
                path: &path,
                scenario: &scenario,
                seconds,
            })
        }
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
    cmd::run("cargo", &test_args)?;
    if args.is_empty() {
        // Bounded: a regression in a parser of untrusted input shows, a long hunt it is not.
        fuzz::run(fuzz::TEST_SECS, &[])?;
        // Keeps the benchmark working: a few seconds per path.
        bench(true)?;
    }
    Ok(())
}

fn lint() -> Result<()> {
    cmd::run("cargo", &["fmt", "--all", "--", "--check"])?;
    // The fuzz crate is a workspace of its own.
    let fuzz_fmt = ["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"];
    cmd::run("cargo", &fuzz_fmt)?;
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
    build_release_bins()?;
    cmd::run("target/release/meshd", &["doctor"])?;
    cmd::run("target/release/mesh-demo", &[mode])
}

/// Setup, then release builds of meshd, the test-host tools and the benchmark binaries.
/// Release builds: meshd exactly as `cargo xtask build` makes it (its package alone, so no
/// feature unification with the test and bench crates can change it: the benchmark measures
/// the binary users run), then the test-host tools and the benchmark binaries.
fn build_release_bins() -> Result<()> {
    build()?;
    let packages = ["mesh-tests", "mesh-benches"];
    let mut args = vec!["build", "--release", "--bins"];
    for p in packages {
        args.extend(["--package", p]);
    }
    cmd::run("cargo", &args)
}

/// Runs the benchmark; a full run also refreshes the copy in README.md.
fn bench(short: bool) -> Result<()> {
    build_release_bins()?;
    let out = if short { "target/bench-short" } else { "bench" };
    let mut args = vec!["--out", out];
    if short {
        args.push("--short");
    }
    // Without a backtrace an error is the last thing printed, where a truncated CI log shows it.
    let mut run = cmd::command("target/release/mesh-bench");
    run.args(&args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0");
    cmd::status(run)?;
    if !short {
        readme_table(&std::fs::read_to_string("bench/results.md")?)?;
    }
    Ok(())
}

/// Replaces the README's benchmark section (between its markers) with `table`.
fn readme_table(table: &str) -> Result<()> {
    const BEGIN: &str = "<!-- bench:begin -->";
    const END: &str = "<!-- bench:end -->";
    let readme = std::fs::read_to_string("README.md")?;
    let (Some(a), Some(b)) = (readme.find(BEGIN), readme.find(END)) else {
        anyhow::bail!("README.md lacks the {BEGIN} / {END} markers");
    };
    let updated = format!(
        "{}{BEGIN}\n{table}\n![latency and throughput per path](bench/results.svg)\n{}",
        &readme[..a],
        &readme[b..]
    );
    std::fs::write("README.md", updated)?;
    println!("xtask: README.md benchmark section updated");
    Ok(())
}
