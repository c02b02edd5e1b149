//! The individual probes behind `meshd doctor`. Each answers one question about this kernel
//! with a real attempt, never by reading version numbers.

use std::{path::Path, process::Command};

use aya::programs::Program;
use iptables_fallback::Backend;
use mesh_common::names;

use super::{Check, Outcome, BOTH, EBPF, INFO, IPTABLES};
use crate::{intercept::Mode, sys};

pub struct Probe {
    pub id: &'static str,
    pub needed_by: &'static [Mode],
}

const fn p(id: &'static str, needed_by: &'static [Mode]) -> Probe {
    Probe { id, needed_by }
}

/// Every check, in report order.
pub const ALL: &[Probe] = &[
    p("kernel", INFO),
    p("root", BOTH),
    p("cgroup-v2", EBPF),
    p("bpf-syscall", EBPF),
    p("btf", INFO),
    p("bpffs", EBPF),
    p("prog-connect4", EBPF),
    p("prog-connect6", EBPF),
    p("prog-getpeername4", EBPF),
    p("prog-getpeername6", EBPF),
    p("prog-sockops", EBPF),
    p("prog-sk-lookup", EBPF),
    // The loopback bypass is an acceleration: without it ebpf mode runs on TCP.
    p("prog-sockops-bypass", INFO),
    p("prog-sk-msg", INFO),
    p("iptables", IPTABLES),
    p("iptables-nat", IPTABLES),
    p("iptables-owner", IPTABLES),
    p("iptables-redirect", IPTABLES),
];

/// The eBPF programs meshd ships, by the check that loads each.
const PROGRAMS: [(&str, &str); 8] = [
    ("prog-connect4", names::PROG_CONNECT4),
    ("prog-connect6", names::PROG_CONNECT6),
    ("prog-getpeername4", names::PROG_GETPEERNAME4),
    ("prog-getpeername6", names::PROG_GETPEERNAME6),
    ("prog-sockops", names::PROG_SOCKOPS),
    ("prog-sk-lookup", names::PROG_SK_LOOKUP),
    ("prog-sockops-bypass", names::PROG_SOCKOPS_BYPASS),
    ("prog-sk-msg", names::PROG_SK_MSG),
];

pub fn run_all(assume_missing: &[String]) -> Vec<Check> {
    let mut found: Vec<(&str, Outcome)> = vec![
        ("kernel", kernel()),
        ("root", root()),
        (
            "cgroup-v2",
            filesystem("cgroup2", sys::CGROUP2_FALLBACK_MOUNT),
        ),
        ("bpf-syscall", bpf_syscall()),
        ("btf", btf()),
        ("bpffs", filesystem("bpf", sys::BPFFS_MOUNT)),
    ];
    found.extend(programs());
    found.extend(iptables());
    ALL.iter()
        .map(|probe| {
            let outcome = if assume_missing.iter().any(|a| a == probe.id) {
                Outcome::Missing("assumed missing (--assume-missing / MESHD_ASSUME_MISSING)".into())
            } else {
                found
                    .iter()
                    .find(|(id, _)| *id == probe.id)
                    .map(|(_, o)| o.clone())
                    .unwrap_or_else(|| Outcome::Missing("no probe ran".into()))
            };
            Check {
                id: probe.id,
                needed_by: probe.needed_by,
                outcome,
            }
        })
        .collect()
}

fn kernel() -> Outcome {
    match nix::sys::utsname::uname() {
        Ok(u) => Outcome::Present(format!(
            "Linux {} {}",
            u.release().to_string_lossy(),
            u.machine().to_string_lossy()
        )),
        Err(e) => Outcome::Missing(format!("uname failed: {e}")),
    }
}

fn root() -> Outcome {
    if sys::is_root() {
        Outcome::Present("euid 0".into())
    } else {
        Outcome::Missing("meshd needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF)".into())
    }
}

fn filesystem(fstype: &str, fallback: &str) -> Outcome {
    match sys::mount_of(fstype) {
        Some(at) => Outcome::Present(format!("mounted at {}", at.display())),
        None if sys::filesystem_supported(fstype) => Outcome::Present(format!(
            "supported, not mounted: meshd mounts it at {fallback}"
        )),
        None => Outcome::Missing(format!("the kernel has no {fstype} filesystem")),
    }
}

/// BPF_MAP_CREATE of a one-slot array: the smallest thing the bpf() syscall can do.
fn bpf_syscall() -> Outcome {
    use aya::maps::{Array, MapData, MapError};
    // Dropped at once: closing its only fd frees the map.
    match Array::<MapData, u32>::create(1, 0) {
        Ok(_) => Outcome::Present("bpf(BPF_MAP_CREATE) works".into()),
        Err(MapError::CreateError { io_error, .. }) => {
            Outcome::Missing(format!("bpf(BPF_MAP_CREATE) failed: {io_error}"))
        }
        Err(e) => Outcome::Missing(format!("bpf(BPF_MAP_CREATE) failed: {e}")),
    }
}

fn btf() -> Outcome {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        Outcome::Present(format!("kernel BTF at {}", path.display()))
    } else {
        Outcome::Missing("no /sys/kernel/btf/vmlinux (meshd's programs do not need CO-RE)".into())
    }
}

/// Loads meshd's own programs through the verifier, one check each.
fn programs() -> Vec<(&'static str, Outcome)> {
    let mut bpf = match crate::intercept::load_object() {
        Ok(bpf) => bpf,
        Err(e) => {
            let why = format!("loading meshd's eBPF object failed: {}", error_chain(&e));
            return PROGRAMS
                .iter()
                .map(|(id, _)| (*id, Outcome::Missing(why.clone())))
                .collect();
        }
    };
    PROGRAMS
        .iter()
        .map(|(id, name)| (*id, load_program(&mut bpf, name)))
        .collect()
}

fn load_program(bpf: &mut aya::Ebpf, name: &str) -> Outcome {
    let Some(program) = bpf.program_mut(name) else {
        return Outcome::Missing(format!("program {name} is not in the object"));
    };
    let section = program.prog_type();
    let loaded = match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        _ => return Outcome::Missing(format!("{name} has an unexpected type {section:?}")),
    };
    match loaded {
        Ok(()) => Outcome::Present(format!("{name} ({section:?}) passes the verifier")),
        Err(e) => Outcome::Missing(format!("{name} ({section:?}): {}", error_chain(&e))),
    }
}

/// An error and its sources on one line. A verifier log is cut to its last few lines, which
/// say what it rejected.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    let joined = parts.join(": ");
    // The verifier's statistics trail its verdict; keep the verdict.
    let stats = ["verification time", "stack depth", "processed "];
    let lines: Vec<&str> = (joined.lines())
        .filter(|l| !l.trim().is_empty() && !stats.iter().any(|s| l.starts_with(s)))
        .collect();
    let first = lines.first().copied().unwrap_or_default();
    if lines.len() <= 1 {
        return first.to_string();
    }
    let tail = &lines[lines.len().saturating_sub(3)..];
    format!("{first} … {}", tail.join(" | "))
}

/// The backend, then nat, owner match and REDIRECT, each tried in a scratch network namespace.
fn iptables() -> Vec<(&'static str, Outcome)> {
    let rule_checks = ["iptables-nat", "iptables-owner", "iptables-redirect"];
    let backend = match Backend::detect() {
        Ok(b) => b,
        Err(e) => {
            let mut out = vec![("iptables", Outcome::Missing(e.to_string()))];
            let why = "needs the iptables command";
            out.extend(rule_checks.map(|id| (id, Outcome::Missing(why.into()))));
            return out;
        }
    };
    let bin = backend.iptables();
    let detail = format!("{} backend ({bin})", backend.name());
    let mut out = vec![("iptables", Outcome::Present(detail))];
    let attempts: [&[&str]; 3] = [
        &["-t", "nat", "-S", "OUTPUT"],
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "owner",
            "--uid-owner",
            "0",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    ];
    let tried = sys::in_scratch_netns(move || Ok(attempts.map(|args| try_iptables(bin, args))));
    match tried {
        Ok(results) => out.extend(rule_checks.into_iter().zip(results)),
        Err(e) => {
            let why = format!("cannot probe in a scratch network namespace: {e:#}");
            out.extend(rule_checks.map(|id| (id, Outcome::Missing(why.clone()))));
        }
    }
    out
}

fn try_iptables(bin: &str, args: &[&str]) -> Outcome {
    let shown = format!("{bin} {}", args.join(" "));
    match Command::new(bin).arg("-w").arg("5").args(args).output() {
        Ok(o) if o.status.success() => Outcome::Present(format!("`{shown}` accepted")),
        Ok(o) => Outcome::Missing(format!(
            "`{shown}` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Outcome::Missing(format!("cannot run {bin}: {e}")),
    }
}
