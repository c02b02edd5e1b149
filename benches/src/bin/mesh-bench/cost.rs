//! What a path costs beside its speed: the CPU time its proxies (both meshd, or both peers of a
//! pair) spend over a scenario, from /proc/PID/stat (user + system, all threads), per request
//! and, at the open-loop rate, as vCPU per 1,000 rps per proxy (the figure Istio publishes for
//! ztunnel); and meshd's RSS idle and with 1,000 and 10,000 open connections (wrk through it).

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::{gen, paths::Running, report::Rss, vm_rss};

/// CPU seconds a process has used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    fields.iter().sum::<u64>() as f64 / ticks
}

/// The proxies' CPU counters at the start of a scenario.
pub struct Meter {
    start: Vec<(i32, f64)>,
    client_meshd: Option<i32>,
}

impl Meter {
    pub fn start(running: &Running) -> Meter {
        Meter {
            start: running
                .proxy_pids()
                .into_iter()
                .map(|pid| (pid, cpu_seconds(pid)))
                .collect(),
            client_meshd: running.client_meshd().map(|m| m.process.pid()),
        }
    }

    /// Adds `proxy_cpu_s`, `cpu_us_per_req` (all proxies together),
    /// `vcpu_per_1k_rps_per_proxy` and the client meshd's RSS after the run to a scenario's
    /// result (nothing for a path without proxies).
    pub fn finish(self, value: &mut Value) {
        if self.start.is_empty() {
            return;
        }
        let cpu: f64 = self
            .start
            .iter()
            .map(|(pid, before)| cpu_seconds(*pid) - before)
            .sum();
        let n = |k: &str| value[k].as_f64().unwrap_or(0.0);
        let (requests, seconds) = (n("requests"), n("seconds"));
        if let Value::Object(map) = value {
            map.insert("proxy_cpu_s".into(), json!(cpu));
            if let Some(pid) = self.client_meshd {
                map.insert("client_meshd_rss_kib".into(), json!(vm_rss(pid)));
            }
            if requests > 0.0 && seconds > 0.0 {
                let rps = requests / seconds;
                let per_proxy = cpu / seconds / self.start.len() as f64;
                map.insert("cpu_us_per_req".into(), json!(cpu * 1e6 / requests));
                map.insert(
                    "vcpu_per_1k_rps_per_proxy".into(),
                    json!(per_proxy / (rps / 1000.0)),
                );
            }
        }
    }
}

/// meshd's (client node) RSS while wrk holds 1,000 and 10,000 connections open through it,
/// sampled once the connections are established (the idle figure is taken at path start).
pub fn rss_under_load(
    client: gen::Client,
    url: &str,
    script: &str,
    running: &mut Running,
) -> Result<Rss> {
    let Some(pid) = running.client_meshd().map(|m| m.process.pid()) else {
        return Ok(Rss::default());
    };
    let mut rss = Rss::default();
    for conns in [1000u64, 10_000] {
        let (c, secs) = (format!("-c{conns}"), 12u64);
        let d = format!("-d{secs}s");
        let argv = ["wrk", "-t1", &c, &d, "--timeout", "10s", "-s", script, url];
        let mut p = client.spawn(&argv)?;
        std::thread::sleep(Duration::from_secs(8));
        let kib = vm_rss(pid);
        let (status, out) = p.wait_output(Duration::from_secs(secs + 60))?;
        if !status.success() {
            // A load meshd could not carry is a result: the report shows it.
            let tail: Vec<&str> = out.lines().rev().take(3).collect();
            eprintln!(
                "mesh-bench: wrk {c} through meshd failed: {}",
                tail.join(" | ")
            );
            let failure = format!("wrk exited {status}");
            rss.samples
                .push(json!({"connections": conns, "rss_kib": kib, "failure": failure}));
            continue;
        }
        let summary: Value = out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        rss.samples
            .push(json!({"connections": conns, "rss_kib": kib, "wrk": summary}));
        report_warnings(running, &c);
    }
    Ok(rss)
}

/// What the path's meshd warned about during a load (why wrk saw errors, if it did).
fn report_warnings(running: &mut Running, load: &str) {
    for (i, meshd) in running.meshd.iter_mut().enumerate() {
        let warnings: Vec<String> = (meshd.process.output_so_far().into_iter())
            .filter(|l| l.contains(" WARN "))
            .collect();
        if let Some(first) = warnings.first() {
            eprintln!(
                "mesh-bench: wrk {load}: meshd {i} logged {} warnings, the first: {first}",
                warnings.len()
            );
        }
    }
}
