//! Interception: how an application's connection reaches meshd and how meshd learns where it
//! wanted to go. Two modes, one question answered for the proxy above this line.

use std::fmt;

/// The eBPF object compiled from `mesh-ebpf` by build.rs, embedded in the binary.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// How connections are steered into meshd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// cgroup/connect4 + sockops + sk_lookup programs; no iptables rule anywhere.
    Ebpf,
    /// nat REDIRECT rules, original destination from SO_ORIGINAL_DST.
    Iptables,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        })
    }
}

/// What the operator asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    Ebpf,
    Iptables,
    /// ebpf when `meshd doctor`'s probe passes, otherwise iptables.
    Auto,
}
