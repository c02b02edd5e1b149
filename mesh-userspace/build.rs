//! Compiles the eBPF programs (`mesh-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! OUT_DIR, where `intercept::ebpf` embeds it. The object is always built from source.
//!
//! eBPF needs `-Z build-std=core`: the `nightly` toolchain when the machine has it, otherwise
//! stable with RUSTC_BOOTSTRAP=1 (both need `rust-src`; `cargo xtask setup` installs it).
//! `MESHD_EBPF_TOOLCHAIN` overrides the choice.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    for watched in ["mesh-ebpf/src", "mesh-ebpf/Cargo.toml", "mesh-common/src"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    println!("cargo:rerun-if-env-changed=MESHD_EBPF_TOOLCHAIN");

    let toolchain = env::var("MESHD_EBPF_TOOLCHAIN").unwrap_or_else(|_| pick_toolchain());
    let target_dir = workspace.join("target").join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&workspace)
        .args(["run", &toolchain, "cargo", "build", "--release", "--locked"])
        .args(["--package", "mesh-ebpf", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir);
    // The outer cargo's settings (clippy's wrapper, host rustflags, its toolchain) must not leak
    // into the eBPF build.
    for (key, _) in env::vars() {
        let inherited = key.starts_with("CARGO") || key.starts_with("RUST");
        if inherited && !matches!(key.as_str(), "CARGO_HOME" | "RUSTUP_HOME") {
            cmd.env_remove(&key);
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    );
    if toolchain != "nightly" {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run rustup to build the eBPF programs ({e}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building mesh-ebpf with toolchain {toolchain} failed (see above). \
             Missing bpf-linker or rust-src? Run `cargo xtask setup`."
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/mesh-ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("mesh-ebpf.o");
    std::fs::copy(&object, &out)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", object.display(), out.display()));
}

/// `nightly` when rustup has it, else the default toolchain with RUSTC_BOOTSTRAP.
fn pick_toolchain() -> String {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if nightly { "nightly" } else { "stable" }.to_string()
}
