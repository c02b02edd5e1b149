//! The test-host harness. A [`TestNet`] is a set of nodes — network namespaces joined through a
//! bridge in a hub namespace, addresses from 198.18.0.0/15 — and the processes started in them:
//! workloads in child cgroups of the cgroup v2 mount, and plain host processes. Everything it
//! makes (namespaces, veths, cgroups, processes, pinned BPF objects, and with the namespaces
//! every iptables rule inside them) is removed when it is dropped, panics included, and a
//! later run sweeps what a killed run left.
//!
//! Privileged tests begin with [`require_privileges!`]: without root, cgroup v2 or `ip`, they
//! print why and pass locally, and fail under `CI=true` so a green CI never hides a skip.

mod capture;
pub mod etcd;
mod footprint;
pub mod handpods;
mod mesh;
mod net;
pub mod podman;
pub mod policy;
mod process;

pub use capture::Capture;
pub use footprint::Footprint;
pub use mesh::{
    loop_counts, start_checkout_orders, start_checkout_orders_with, MeshCa, Meshd, OrdersNet,
    WorkloadSpec, CHECKOUT, ORDERS,
};
pub use net::{TestNet, TestNode};
pub use process::{vm_rss_kib, Process};

use std::path::PathBuf;

/// Fails (with what to install) when one of `tools` is not on PATH.
pub fn require_tools(tools: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "missing {}: run `cargo xtask setup`",
        missing.join(", ")
    );
    Ok(())
}

/// Whether this run is CI, where a test that cannot run must fail instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// What a privileged test needs; `Err` says what is missing.
pub fn privileges() -> Result<(), String> {
    if !meshd::sys::is_root() {
        return Err("needs root (network namespaces, cgroups, BPF)".into());
    }
    let ip = std::process::Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        return Err("needs the `ip` command (iproute2): run `cargo xtask setup`".into());
    }
    if meshd::sys::mount_of("cgroup2").is_none() && !meshd::sys::filesystem_supported("cgroup2") {
        return Err("the kernel has no cgroup v2".into());
    }
    Ok(())
}

/// Skips (locally) or fails (under CI=true) a test whose requirement is not met.
#[macro_export]
macro_rules! require_privileges {
    () => {
        $crate::require_privileges!($crate::privileges())
    };
    ($check:expr) => {
        if let Err(why) = $check {
            if $crate::in_ci() {
                panic!("CI=true and this test cannot run: {why}");
            }
            eprintln!("SKIPPED (cannot run here): {why}");
            return;
        }
    };
}

/// The `meshd` binary of this build (`cargo xtask test` builds it before the tests run).
pub fn meshd_bin() -> PathBuf {
    sibling_binary("meshd")
}

/// A binary built into the same target directory as the running test.
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests through `cargo xtask test`",
        path.display()
    );
    path
}

/// `bpftool ARGS` output (what tests read to see which programs are attached).
pub fn bpftool(args: &[&str]) -> String {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool (cargo xtask setup)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
