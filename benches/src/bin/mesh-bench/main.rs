//! `cargo xtask bench`: the mode-comparison benchmark. Two test nodes; nginx on the server
//! node; the load generator in a workload cgroup on the client node (for the `-pods` paths:
//! both in a pod on their node). Every path (direct, meshd iptables, meshd ebpf, stunnel4
//! pair, HAProxy pair, and pod to pod direct and through meshd) runs on the same hosts in the
//! same run, alternating path after path for each round, each with a warm-up. Load comes from
//! wrk (closed loop, bulk), h2load (HTTP/2) and the project's event-driven loadgen (fixed
//! rate), whose capacity is checked against wrk on the direct path. For every scenario the
//! CPU time the path's proxies spent is read from /proc. Writes JSON, a markdown table and an
//! SVG plot to the output directory, and meshd's RSS idle and with 1,000 and 10,000 open
//! connections.
//!
//! mesh-bench [--short] [--out DIR] [--only PATH-OR-SCENARIO ...]

mod cost;
mod gen;
mod paths;
mod plot;
mod report;

use std::path::PathBuf;

use anyhow::{Context, Result};
use gen::Client;
use paths::PathKind;
use report::{Record, Rss, RunInfo};
use serde_json::Value;
use testhosts::{privileges, MeshCa, TestNet};

struct Plan {
    /// `--only NAME` (repeatable): run only these paths and scenarios.
    only: Vec<String>,
    rounds: usize,
    warmup: u64,
    secs: u64,
}

/// The scenarios, in the order they run on each path.
#[derive(Clone, Copy)]
enum Scenario {
    KeepAlive(u64),
    ConnPerRequest,
    Open,
    Bulk,
    H2,
}

/// Many connections last: a proxy still working off their backlog must not slow the others.
const SCENARIOS: [(&str, Scenario); 7] = [
    ("keep-alive", Scenario::KeepAlive(16)),
    ("conn-per-request", Scenario::ConnPerRequest),
    ("open-1000rps", Scenario::Open),
    ("bulk", Scenario::Bulk),
    ("h2-keep-alive", Scenario::H2),
    ("keep-alive-256", Scenario::KeepAlive(256)),
    ("keep-alive-1000", Scenario::KeepAlive(1000)),
];
/// The scenarios' names, in order.
pub fn scenario_names() -> [&'static str; 7] {
    SCENARIOS.map(|(name, _)| name)
}
/// The open-loop rate and the connections it is spread over.
const OPEN_RATE: u64 = 1000;
const OPEN_CONNS: u64 = 16;

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
    // wrk and meshd with 10,000 connections: every child inherits the raised limit.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
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
    let plan = Plan {
        only,
        rounds: if short { 3 } else { 5 },
        warmup: 1,
        secs: if short { 1 } else { 5 },
    };
    let info = RunInfo::collect(short, plan.rounds)?;
    let net = TestNet::new(2)?;
    let ca = MeshCa::new(&net)?;
    let dir = std::env::temp_dir().join(format!("{}-bench", net.id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&net, &ca, &dir, &plan);
    let _ = std::fs::remove_dir_all(&dir);
    let (records, rss) = result?;
    report::write(&out, &info, &records, &rss)?;
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
    let all_paths = PathKind::ALL.map(PathKind::name);
    let wanted: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(|k| plan.wants(k.name(), &all_paths))
        .collect();
    let idle = wanted.iter().map(|k| k.idle_pods()).max().unwrap_or(0);
    let pods = paths::Pods::new(net, idle);
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
    let script = gen::write_wrk_script(dir)?;
    let mut records = Vec::new();
    let mut rss = Rss::default();
    for round in 0..plan.rounds {
        for &kind in &wanted {
            eprintln!("mesh-bench: round {round}, path {}", kind.name());
            let mut running = paths::up(kind, net, ca, dir, &pods)
                .with_context(|| format!("bring up {}", kind.name()))?;
            let (host, pod) = if kind.in_pods() {
                (pods.server.ip.clone(), Some(&pods.client))
            } else {
                (net.node(1).addr.to_string(), None)
            };
            let client = Client { net, pod };
            let idle_rss = running.client_meshd().map(|m| vm_rss(m.process.pid()));
            let target = Target {
                addr: format!("{host}:{}", paths::NGINX_PORT),
                h2: format!("http://{host}:{}/", paths::NGINX_H2_PORT),
                script: &script,
            };
            // A path that cannot even warm up is marked failed in every scenario of this round.
            let warmup = gen::wrk(client, &script, &target.url("/"), 16, plan.warmup, false);
            for (name, scenario) in SCENARIOS
                .into_iter()
                .filter(|(s, _)| plan.wants(s, &scenario_names()))
            {
                if !kind.runs(name) {
                    continue;
                }
                let measured = match &warmup {
                    Ok(_) => measure(client, &target, scenario, plan.secs, &running),
                    Err(e) => Err(anyhow::anyhow!("warm-up failed: {e:#}")),
                };
                let value = measured.unwrap_or_else(|e| {
                    // A path that breaks under a scenario is a result, not a reason to stop.
                    eprintln!("mesh-bench: {} {name}: {e:#}", kind.name());
                    serde_json::json!({ "errors": 1, "failure": format!("{e:#}") })
                });
                records.push(Record {
                    path: kind.name(),
                    scenario: name,
                    round,
                    value,
                });
            }
            if kind == PathKind::Direct {
                records.push(agreement(client, &target, plan.secs, round)?);
            }
            if kind == PathKind::MeshdEbpf && round == 0 && warmup.is_ok() {
                rss = cost::rss_under_load(client, &target.url("/"), &script, &mut running)?;
                rss.idle_kib = idle_rss.unwrap_or(0);
            }
        }
    }
    Ok((records, rss))
}

/// Where a path's requests go.
pub struct Target<'a> {
    pub addr: String,
    pub h2: String,
    pub script: &'a str,
}

impl Target<'_> {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// One scenario on a path, with the CPU its proxies spent meanwhile.
fn measure(
    client: Client,
    target: &Target,
    scenario: Scenario,
    secs: u64,
    running: &paths::Running,
) -> Result<Value> {
    let meter = cost::Meter::start(running);
    let mut value = match scenario {
        Scenario::KeepAlive(conns) => {
            gen::wrk(client, target.script, &target.url("/"), conns, secs, false)?
        }
        Scenario::ConnPerRequest => {
            gen::wrk(client, target.script, &target.url("/"), 16, secs, true)?
        }
        Scenario::Open => gen::loadgen(client, &target.addr, Some(OPEN_RATE), OPEN_CONNS, secs)?,
        Scenario::Bulk => gen::wrk(client, target.script, &target.url("/bulk"), 1, secs, false)?,
        Scenario::H2 => gen::h2load(client, &target.h2, 4, 32, secs)?,
    };
    meter.finish(&mut value);
    Ok(value)
}

/// The open-loop generator's capacity against wrk's on the direct path, same round, same
/// connections: its figures count only if it keeps up (within 10%).
fn agreement(client: Client, target: &Target, secs: u64, round: usize) -> Result<Record> {
    let wrk = gen::wrk(client, target.script, &target.url("/"), 16, secs, false)?;
    let own = gen::loadgen(client, &target.addr, None, 16, secs)?;
    let (w, o) = (
        wrk["rps"].as_f64().unwrap_or(0.0),
        own["rps"].as_f64().unwrap_or(0.0),
    );
    Ok(Record {
        path: PathKind::Direct.name(),
        scenario: report::AGREEMENT,
        round,
        value: serde_json::json!({"rps": o, "wrk_rps": w, "ratio": o / w,
            "errors": own["errors"].as_f64().unwrap_or(0.0) + wrk["errors"].as_f64().unwrap_or(0.0)}),
    })
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

/// VmRSS of a process, in KiB.
pub fn vm_rss(pid: i32) -> u64 {
    testhosts::vm_rss_kib(pid)
}
