//! `cargo xtask bench`: the mode-comparison benchmark. Two test nodes; nginx on the server
//! node; the load generator in a workload cgroup on the client node (for the `-pods` paths:
//! both in a pod on their node). Every path (direct, meshd iptables, meshd ebpf, stunnel4
//! pair, HAProxy pair, and pod to pod direct and through meshd) runs on the same hosts in the
//! same run,
//! alternating path after path for each round, each with a warm-up. Writes JSON, a markdown
//! table and an SVG plot to the output directory, and meshd's RSS idle and with 1,000 open
//! connections.
//!
//! mesh-bench [--short] [--out DIR] [--only PATH-OR-SCENARIO ...]

mod paths;
mod report;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use paths::PathKind;
use report::{Record, Rss};
use serde_json::Value;
use testhosts::{handpods::HandPod, privileges, sibling_binary, MeshCa, Process, TestNet};

struct Plan {
    /// `--only NAME` (repeatable): run only these paths and scenarios.
    only: Vec<String>,
    rounds: usize,
    warmup: u64,
    closed: u64,
    cpr: u64,
    open: u64,
    bulk: u64,
}

const SCENARIOS: [&str; 4] = ["keep-alive", "conn-per-request", "open-1000rps", "bulk"];

impl Plan {
    /// Whether `name`, one of `all` (the paths, or the scenarios), is to run: yes unless
    /// `--only` names some of `all` and not this one.
    fn wants(&self, name: &str, all: &[&str]) -> bool {
        let named: Vec<&String> = self
            .only
            .iter()
            .filter(|o| all.contains(&o.as_str()))
            .collect();
        named.is_empty() || named.iter().any(|o| *o == name)
    }
}

fn main() -> Result<()> {
    privileges()
        .map_err(anyhow::Error::msg)
        .context("the benchmark creates test hosts")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let short = args.iter().any(|a| a == "--short");
    let only: Vec<String> = (args.windows(2))
        .filter(|w| w[0] == "--only")
        .map(|w| w[1].clone())
        .collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from("bench"), PathBuf::from);
    let plan = if short {
        Plan {
            only: only.clone(),
            rounds: 1,
            warmup: 1,
            closed: 2,
            cpr: 1,
            open: 2,
            bulk: 1,
        }
    } else {
        Plan {
            only,
            rounds: 2,
            warmup: 2,
            closed: 10,
            cpr: 5,
            open: 10,
            bulk: 5,
        }
    };
    let net = TestNet::new(2)?;
    let ca = MeshCa::new(&net)?;
    let dir = std::env::temp_dir().join(format!("{}-bench", net.id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&net, &ca, &dir, &plan);
    let _ = std::fs::remove_dir_all(&dir);
    let (records, rss) = result?;
    report::write(&out, &records, &rss, short)?;
    println!("{}", std::fs::read_to_string(out.join("results.md"))?);
    Ok(())
}

fn run(
    net: &TestNet,
    ca: &MeshCa,
    dir: &std::path::Path,
    plan: &Plan,
) -> Result<(Vec<Record>, Rss)> {
    let _nginx = paths::nginx(net, dir, None)?;
    let pods = paths::Pods::new(net);
    let _pod_nginx = paths::nginx(net, dir, Some(&pods.server))?;
    let namespaces = [
        &net.node(0).netns,
        &net.node(1).netns,
        &pods.client.netns,
        &pods.server.netns,
    ];
    for netns in namespaces {
        tune(netns)?;
    }
    let mut records = Vec::new();
    let mut rss = Rss::default();
    for round in 0..plan.rounds {
        for kind in PathKind::ALL
            .into_iter()
            .filter(|k| plan.wants(k.name(), &PathKind::ALL.map(PathKind::name)))
        {
            eprintln!("mesh-bench: round {round}, path {}", kind.name());
            let mut running = paths::up(kind, net, ca, dir, &pods)
                .with_context(|| format!("bring up {}", kind.name()))?;
            let (target, client) = if kind.in_pods() {
                (&pods.server.ip, Some(&pods.client))
            } else {
                (&net.node(1).addr.to_string(), None)
            };
            let target = format!("{target}:{}", paths::NGINX_PORT);
            if kind == PathKind::MeshdEbpf && round == 0 {
                rss.idle_kib = running
                    .client_meshd()
                    .map(|m| vm_rss(m.process.pid()))
                    .unwrap_or(0);
            }
            loadgen(
                net,
                client,
                &["closed", &target, "16", &plan.warmup.to_string()],
            )?;
            let scenarios: [(&str, Vec<String>); 4] = [
                (
                    "keep-alive",
                    vec![
                        "closed".into(),
                        target.clone(),
                        "16".into(),
                        plan.closed.to_string(),
                    ],
                ),
                (
                    "conn-per-request",
                    vec![
                        "cpr".into(),
                        target.clone(),
                        "16".into(),
                        plan.cpr.to_string(),
                    ],
                ),
                (
                    "open-1000rps",
                    vec![
                        "open".into(),
                        target.clone(),
                        "1000".into(),
                        "16".into(),
                        plan.open.to_string(),
                    ],
                ),
                (
                    "bulk",
                    vec!["bulk".into(), target.clone(), plan.bulk.to_string()],
                ),
            ];
            for (scenario, argv) in scenarios
                .into_iter()
                .filter(|(s, _)| plan.wants(s, &SCENARIOS))
            {
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                // A path that breaks under a scenario is a result, not a reason to stop.
                let value = loadgen(net, client, &argv).unwrap_or_else(|e| {
                    eprintln!("mesh-bench: {} {scenario}: {e:#}", kind.name());
                    for p in &mut running.processes {
                        let out = p.output_so_far();
                        let tail = out.len().saturating_sub(5);
                        eprintln!("  {:?}: {}", p.argv, out[tail..].join("\n    "));
                    }
                    serde_json::json!({ "error": format!("{e:#}") })
                });
                records.push(Record {
                    path: kind.name(),
                    scenario,
                    round,
                    value,
                });
            }
            if kind == PathKind::MeshdEbpf && round == 0 {
                rss.with_1000_kib = hold_1000(net, &target, &running)?;
            }
        }
    }
    Ok((records, rss))
}

/// The same TCP settings in every namespace a path's endpoints live in (nodes and pods; both
/// are namespaced sysctls a pod may set).
fn tune(netns: &str) -> Result<()> {
    let settings = [
        // Connection-per-request runs through tens of thousands of ports a second...
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
        // ...but none of the proxies' listening ports (meshd 15000-15021, the peers 151xx-152xx).
        "net.ipv4.ip_local_reserved_ports=15000-15300",
    ];
    for setting in settings {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "sysctl", "-qw", setting])
            .status()?
            .success();
        anyhow::ensure!(ok, "sysctl {setting} in {netns} failed");
    }
    Ok(())
}

/// Runs the load generator in the client workload (or in the client's pod) and returns its
/// JSON result.
fn loadgen(net: &TestNet, pod: Option<&HandPod>, args: &[&str]) -> Result<Value> {
    let bin = sibling_binary("loadgen").display().to_string();
    let mut argv = vec![bin.as_str()];
    argv.extend(args);
    let mut p = match pod {
        Some(pod) => Process::spawn_in(&pod.node, &pod.cgroup, &argv)?,
        None => net.workload(0, "client", &argv)?,
    };
    let (status, out) = p.wait_output(Duration::from_secs(120))?;
    anyhow::ensure!(status.success(), "loadgen {args:?} failed: {out}");
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON from loadgen")?;
    Ok(serde_json::from_str(line)?)
}

/// meshd's RSS on the client node while 1,000 application connections are open through it.
fn hold_1000(net: &TestNet, target: &str, running: &paths::Running) -> Result<u64> {
    let bin = sibling_binary("loadgen").display().to_string();
    let mut p = net.workload(0, "client", &[&bin, "hold", target, "1000", "3"])?;
    p.expect_line("holding", Duration::from_secs(60))?;
    let kib = running
        .client_meshd()
        .map(|m| vm_rss(m.process.pid()))
        .unwrap_or(0);
    let _ = p.wait_output(Duration::from_secs(30));
    Ok(kib)
}

/// VmRSS of a process, in KiB.
fn vm_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:"));
    line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}
