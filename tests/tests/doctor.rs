//! `meshd doctor` on this machine: every capability present, ebpf picked; with one made
//! unavailable it says what is missing and falls back to iptables. Its iptables probes run in a
//! scratch namespace, so the machine's own rules are untouched.

use std::process::{Command, Output};

use testhosts::{meshd_bin, require_privileges};

fn meshd(args: &[&str], assume_missing: Option<&str>) -> Output {
    let mut cmd = Command::new(meshd_bin());
    cmd.args(args).env_remove("MESHD_ASSUME_MISSING");
    if let Some(ids) = assume_missing {
        cmd.env("MESHD_ASSUME_MISSING", ids);
    }
    cmd.output().expect("run meshd")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn host_nat_rules() -> String {
    let out = Command::new("iptables-save").args(["-t", "nat"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn doctor_finds_every_capability_and_picks_ebpf() {
    require_privileges!();
    let before = host_nat_rules();
    let out = meshd(&["doctor"], None);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(!report.contains("MISSING"), "{report}");
    for id in [
        "cgroup-v2",
        "bpf-syscall",
        "bpffs",
        "prog-connect4",
        "prog-sockops",
    ] {
        assert!(report.contains(&format!("ok      {id} ")), "{id}: {report}");
    }
    for id in [
        "prog-sk-lookup",
        "prog-sockops-bypass",
        "prog-sk-msg",
        "iptables-nat",
        "iptables-owner",
        "iptables-redirect",
    ] {
        assert!(report.contains(&format!("ok      {id} ")), "{id}: {report}");
    }
    assert!(report.contains("auto picks: ebpf"), "{report}");
    assert_eq!(
        host_nat_rules(),
        before,
        "doctor changed the machine's nat table"
    );
}

#[test]
fn doctor_explains_a_missing_bpf_capability_and_picks_iptables() {
    require_privileges!();
    let out = meshd(&["doctor"], Some("bpf-syscall,prog-sockops"));
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("MISSING bpf-syscall"), "{report}");
    assert!(
        report.contains("mode ebpf    : cannot run: missing bpf-syscall, prog-sockops"),
        "{report}"
    );
    assert!(report.contains("auto picks: iptables"), "{report}");
}

#[test]
fn doctor_fails_when_no_mode_can_run() {
    require_privileges!();
    let out = meshd(
        &["doctor", "--assume-missing", "bpffs,iptables-redirect"],
        None,
    );
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("neither mode can run"), "{report}");
    assert!(
        report.contains("iptables lacks iptables-redirect"),
        "{report}"
    );
}

#[test]
fn doctor_rejects_an_unknown_check_name() {
    let out = meshd(&["doctor", "--assume-missing", "warp-drive"], None);
    assert!(!out.status.success());
    assert!(text(&out).contains("no such check"), "{}", text(&out));
}

#[test]
fn forcing_a_mode_the_kernel_lacks_names_what_is_missing() {
    require_privileges!();
    let config = std::env::temp_dir().join(format!("meshd-doctor-{}.yaml", std::process::id()));
    std::fs::write(&config, "workloads: []\n").unwrap();
    let cfg = config.to_str().unwrap();
    let out = meshd(
        &["run", "--mode=ebpf", "--config", cfg],
        Some("prog-connect4"),
    );
    std::fs::remove_file(&config).unwrap();
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("--mode=ebpf cannot run here: missing prog-connect4"),
        "{msg}"
    );
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    require_privileges!();
    let out = meshd(&["--log-format=json", "--log=debug", "doctor"], None);
    assert!(out.status.success(), "{}", text(&out));
    let logs = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "doctor logged nothing at debug level");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    let version = meshd(&["version"], None);
    assert!(text(&version).starts_with("meshd "), "{}", text(&version));
}
