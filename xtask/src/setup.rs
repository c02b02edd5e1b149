//! `cargo xtask setup`: bring a fresh Debian machine of this kind to where meshd builds and
//! every test runs. Idempotent: each step checks first and says whether it installs or skips.
//! Verified steps are in the shared TOOLCHAIN.md.

use anyhow::{bail, Context, Result};

use crate::cmd;

/// Debian packages and why each is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links against LLVM 22 (rustc's LLVM)",
    ),
    ("libpolly-22-dev", "bpf-linker's LLVM link line"),
    ("libzstd-dev", "bpf-linker's LLVM link line"),
    ("zlib1g-dev", "bpf-linker's LLVM link line"),
    ("libxml2-dev", "bpf-linker's LLVM link line"),
    (
        "g++",
        "libFuzzer (the fuzz step's engine, built by libfuzzer-sys) is C++",
    ),
    ("iptables", "--mode=iptables and its tests"),
    ("iproute2", "test hosts: network namespaces and veth links"),
    ("util-linux", "setpriv used by tests"),
    ("bpftool", "tests check which programs are attached"),
    (
        "tcpdump",
        "the mesh test checks that no plaintext crosses the wire",
    ),
    (
        "openssl",
        "the TLS 1.2 client the HBONE listener must refuse",
    ),
    ("curl", "the HTTP client of the authorization policy tests"),
    (
        "python3",
        "small helpers in tests (metrics fetch, port squatter)",
    ),
    ("nginx", "the benchmark's HTTP server"),
    ("wrk", "the benchmark's closed-loop HTTP/1.1 load generator"),
    (
        "nghttp2-client",
        "h2load, the benchmark's HTTP/2 load generator",
    ),
    ("stunnel4", "the benchmark's stunnel mTLS pair"),
    ("haproxy", "the benchmark's HAProxy mTLS pair"),
    ("linux-perf", "cargo xtask profile samples meshd with perf"),
    (
        "podman",
        "the pod tests run Kubernetes Pod YAML (podman kube play)",
    ),
    ("runc", "podman's OCI runtime in the pod tests"),
    (
        "containernetworking-plugins",
        "the pod tests' CNI network (bridge, host-local) that meshd-cni chains onto",
    ),
    ("catatonit", "podman's pod infra container init"),
    ("busybox-static", "the pod tests' container image"),
    (
        "chromium",
        "the admin /graph page is checked in headless Chromium",
    ),
    (
        "etcd-server",
        "the registry tests run a real etcd (with auth) on a test host",
    ),
    (
        "etcd-client",
        "etcdctl: the registry tests set up users, roles and services",
    ),
    (
        "protobuf-compiler",
        "protoc: etcd-client's build script compiles etcd's gRPC protos",
    ),
];

/// cargo-fuzz release the fuzz step was verified with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// bpf-linker release known to build against LLVM 22 on Rust 1.95.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Which toolchain builds the eBPF crate (it needs `-Z build-std`).
pub struct Toolchain {
    pub name: &'static str,
    /// Stable needs RUSTC_BOOTSTRAP=1 for `-Z` flags.
    pub bootstrap: bool,
}

pub fn ebpf_toolchain() -> Toolchain {
    if cmd::succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        Toolchain {
            name: "nightly",
            bootstrap: false,
        }
    } else {
        Toolchain {
            name: "stable",
            bootstrap: true,
        }
    }
}

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_components()?;
    bpf_linker()?;
    cargo_fuzz()?;
    kubernetes_validate()?;
    println!("xtask setup: everything is in place");
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn apt_packages() -> Result<()> {
    let names: Vec<&str> = APT_PACKAGES.iter().map(|(name, _)| *name).collect();
    let mut query = vec!["-W", "-f=${Package} ${db:Status-Status}\\n"];
    query.extend(&names);
    // dpkg-query exits 1 when a package is unknown but still lists the others.
    let listed = std::process::Command::new("dpkg-query")
        .args(&query)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let installed = |name: &str| listed.lines().any(|l| l == format!("{name} installed"));
    let missing: Vec<&str> = names.iter().copied().filter(|n| !installed(n)).collect();
    if missing.is_empty() {
        println!("xtask setup: apt packages: all {} present", names.len());
        return Ok(());
    }
    for (name, why) in APT_PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        println!("xtask setup: apt package {name} missing ({why}): installing");
    }
    if !is_root() {
        bail!(
            "installing apt packages needs root: run `sudo cargo xtask setup` (missing: {})",
            missing.join(" ")
        );
    }
    if !cmd::succeeds("apt-get", &["--version"]) {
        bail!(
            "apt-get not found: this setup supports Debian; install by hand: {}",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut c = cmd::command("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd::status(c).context("apt-get failed: are the Debian mirrors reachable from here?")
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

fn rust_components() -> Result<()> {
    let ebpf = ebpf_toolchain();
    if ebpf.bootstrap {
        println!("xtask setup: no nightly toolchain: eBPF builds with stable + RUSTC_BOOTSTRAP=1");
    }
    rustup_component(ebpf.name, "rust-src")?;
    rustup_component("stable", "clippy")?;
    rustup_component("stable", "rustfmt")
}

fn rustup_component(toolchain: &str, component: &str) -> Result<()> {
    let listed = cmd::output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", toolchain],
    )
    .context("rustup is needed to manage toolchain components")?;
    if listed.lines().any(|l| l.starts_with(component)) {
        println!("xtask setup: {component} ({toolchain}): present");
        return Ok(());
    }
    println!("xtask setup: {component} ({toolchain}): installing");
    cmd::run(
        "rustup",
        &["component", "add", component, "--toolchain", toolchain],
    )
    .context("rustup could not fetch the component: is static.rust-lang.org reachable?")
}

fn bpf_linker() -> Result<()> {
    if cmd::succeeds("bpf-linker", &["--version"]) {
        println!("xtask setup: bpf-linker: present");
        return Ok(());
    }
    println!("xtask setup: bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (minutes)");
    let mut c = cmd::command("cargo");
    c.env("LLVM_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"]);
    cmd::status(c).context("cargo install bpf-linker failed: is crates.io reachable?")
}

/// `cargo fuzz` for the fuzz step of `cargo xtask test` (libFuzzer itself is built from the
/// libfuzzer-sys crate: a C++ compiler is all it needs).
fn cargo_fuzz() -> Result<()> {
    if cmd::succeeds("cargo", &["fuzz", "--version"]) {
        println!("xtask setup: cargo-fuzz: present");
        return Ok(());
    }
    println!("xtask setup: cargo-fuzz {CARGO_FUZZ_VERSION}: installing (a minute or two)");
    let args = [
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ];
    cmd::run("cargo", &args).context("cargo install cargo-fuzz failed: is crates.io reachable?")
}

/// kubernetes-validate (PyPI) release the deploy test checks deploy/kubernetes with; it bundles
/// Kubernetes' schemas (1.25 to 1.37), so validating needs no network and no API server.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// `kubernetes-validate` for tests/tests/deploy.rs (the manifests' schema check).
fn kubernetes_validate() -> Result<()> {
    if cmd::succeeds("kubernetes-validate", &["--version"]) {
        println!("xtask setup: kubernetes-validate: present");
        return Ok(());
    }
    println!("xtask setup: kubernetes-validate {KUBERNETES_VALIDATE_VERSION}: installing (pip)");
    if !is_root() {
        bail!("installing kubernetes-validate needs root: run `sudo cargo xtask setup`");
    }
    let spec = format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
    cmd::run("pip", &["install", "--quiet", &spec])
        .context("pip install kubernetes-validate failed: is PyPI reachable?")?;
    // pyenv makes a command's shim when asked; harmless where there is no pyenv.
    let _ = cmd::succeeds("pyenv", &["rehash"]);
    if !cmd::succeeds("kubernetes-validate", &["--version"]) {
        bail!("kubernetes-validate installed but not on PATH");
    }
    Ok(())
}
