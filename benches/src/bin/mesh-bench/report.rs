//! Results: the raw records as JSON, a markdown table and an SVG plot. Reduction: for each path
//! and scenario, the round with the median rate (an odd number of rounds) and every field of the
//! row from that round, with the rate's min-max over all rounds beside it; ratios are to direct
//! between the same endpoints (node to node, or pod to pod). Errors (socket errors and non-2xx
//! responses) of any round mark the row; they are never averaged away.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{paths::PathKind, scenario_names};

/// The record name of the open-loop generator's capacity check against wrk.
pub const AGREEMENT: &str = "loadgen-vs-wrk";

pub struct Record {
    pub path: &'static str,
    pub scenario: &'static str,
    pub round: usize,
    pub value: Value,
}

#[derive(Default)]
pub struct Rss {
    pub idle_kib: u64,
    /// `{connections, rss_kib, wrk}` per load.
    pub samples: Vec<Value>,
}

/// What the figures were made with.
pub struct RunInfo {
    pub short: bool,
    pub rounds: usize,
    pub machine: String,
    pub date: String,
    pub meshd: String,
    pub meshd_sha256: String,
}

impl RunInfo {
    pub fn collect(short: bool, rounds: usize) -> Result<RunInfo> {
        let meshd = testhosts::sibling_binary("meshd");
        let out = std::process::Command::new("sha256sum")
            .arg(&meshd)
            .output()?;
        let hash = String::from_utf8_lossy(&out.stdout);
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()?;
        Ok(RunInfo {
            short,
            rounds,
            machine: machine(),
            date: String::from_utf8_lossy(&date.stdout).trim().to_string(),
            meshd: meshd.display().to_string(),
            meshd_sha256: hash
                .split_whitespace()
                .next()
                .context("sha256sum of meshd")?
                .to_string(),
        })
    }
}

fn machine() -> String {
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname.map_or("?".into(), |u| u.release().to_string_lossy().into_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {kernel}, {cpus} CPUs")
}

/// One path and scenario reduced over its rounds.
pub struct Row<'a> {
    /// The round with the median of `key`.
    pub median: &'a Value,
    pub min: f64,
    pub max: f64,
    /// Errors over all rounds.
    pub errors: f64,
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k)?.as_f64()
}

/// The median round of (path, scenario) by `key`, or None when it did not run.
pub fn reduce<'a>(records: &'a [Record], path: &str, scenario: &str, key: &str) -> Option<Row<'a>> {
    let mut rounds: Vec<&Value> = records
        .iter()
        .filter(|r| r.path == path && r.scenario == scenario)
        .map(|r| &r.value)
        .collect();
    if rounds.is_empty() {
        return None;
    }
    let value = |v: &Value| f(v, key).unwrap_or(0.0);
    rounds.sort_by(|a, b| value(a).total_cmp(&value(b)));
    Some(Row {
        median: rounds[rounds.len() / 2],
        min: value(rounds[0]),
        max: value(rounds[rounds.len() - 1]),
        errors: rounds.iter().map(|v| f(v, "errors").unwrap_or(0.0)).sum(),
    })
}

fn ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// Whether the open-loop generator kept up with wrk on the direct path (median round).
fn agreement(records: &[Record]) -> (Option<f64>, bool) {
    let row = reduce(records, PathKind::Direct.name(), AGREEMENT, "ratio");
    let ratio = row.and_then(|r| f(r.median, "ratio"));
    (ratio, ratio.is_some_and(|r| (0.9..=1.1).contains(&r)))
}

pub fn markdown(info: &RunInfo, records: &[Record], rss: &Rss) -> String {
    let mut t = String::new();
    let mode = if info.short {
        "short run (CI smoke)"
    } else {
        "full run"
    };
    let _ = writeln!(
        t,
        "{}; {}; {mode}, {} rounds, paths alternating; meshd `{}` sha256 `{}`.\n\
         Each row is the round with the median rate (all its fields from that round), with the \
         rate's min-max over the rounds; ⚠ marks errors (socket errors, non-2xx) in any round.\n",
        info.machine,
        info.date,
        info.rounds,
        info.meshd,
        &info.meshd_sha256[..16.min(info.meshd_sha256.len())]
    );
    let (agree, valid) = agreement(records);
    let _ = writeln!(
        t,
        "Load generators: wrk (keep-alive, conn-per-request, bulk), h2load (h2-keep-alive: 4 \
         connections x 32 streams), loadgen (open-1000rps: {} rps over 16 connections). loadgen's \
         capacity vs wrk on the direct path: {} -> {}.\n",
        crate::OPEN_RATE,
        agree.map_or("not measured".into(), |r| format!("{r:.2}x")),
        if valid {
            "valid"
        } else {
            "**INVALID: the open-loop figures are not to be trusted**"
        }
    );
    let _ = writeln!(t, "| path | scenario | rps | rps min-max | rps vs direct | p50 ms | p99 ms | p99.9 ms | p99 vs direct | mean ms | proxy CPU µs/req | vCPU per 1k rps per proxy | errors |");
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for scenario in scenario_names().iter().filter(|s| **s != "bulk") {
        for kind in PathKind::ALL {
            let Some(row) = reduce(records, kind.name(), scenario, "rps") else {
                continue;
            };
            let base = reduce(records, kind.baseline().name(), scenario, "rps");
            let m = |k: &str| f(row.median, k);
            let b = |k: &str| base.as_ref().and_then(|r| f(r.median, k));
            let mark = if row.errors > 0.0 { " ⚠" } else { "" };
            let _ = writeln!(
                t,
                "| {}{mark} | {scenario} | {} | {:.0}-{:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {}{mark} |",
                kind.name(),
                cell(m("rps"), 0),
                row.min,
                row.max,
                ratio(m("rps"), b("rps")),
                cell(m("p50_ms"), 3),
                cell(m("p99_ms"), 3),
                cell(m("p999_ms"), 3),
                ratio(m("p99_ms"), b("p99_ms")),
                cell(m("mean_ms"), 3),
                cell(m("cpu_us_per_req"), 1),
                cell(m("vcpu_per_1k_rps_per_proxy"), 3),
                row.errors,
            );
        }
    }
    let _ = writeln!(
        t,
        "\n| path | bulk single stream MB/s | min-max | vs direct | proxy CPU µs per MB | errors |\n|---|---|---|---|---|---|"
    );
    for kind in PathKind::ALL {
        let Some(row) = reduce(records, kind.name(), "bulk", "mbps") else {
            continue;
        };
        let base = reduce(records, kind.baseline().name(), "bulk", "mbps");
        let v = f(row.median, "mbps");
        let per_mb = f(row.median, "proxy_cpu_s")
            .zip(v.zip(f(row.median, "seconds")))
            .map(|(cpu, (mbps, secs))| cpu * 1e6 / (mbps * secs));
        let mark = if row.errors > 0.0 { " ⚠" } else { "" };
        let _ = writeln!(
            t,
            "| {}{mark} | {} | {:.0}-{:.0} | {} | {} | {} |",
            kind.name(),
            cell(v, 0),
            row.min,
            row.max,
            ratio(v, base.and_then(|b| f(b.median, "mbps"))),
            cell(per_mb, 0),
            row.errors
        );
    }
    pods_per_node(&mut t, records);
    l7_cost(&mut t, records);
    let samples: Vec<String> = rss
        .samples
        .iter()
        .map(|s| {
            if let Some(failure) = s["failure"].as_str() {
                let mb = s["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
                return format!(
                    "{mb:.1} MB with {} connections (FAILED: {failure})",
                    s["connections"]
                );
            }
            format!(
                "{:.1} MB with {} connections (wrk errors {})",
                s["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                s["connections"],
                s["wrk"]["connect"].as_f64().unwrap_or(0.0)
                    + s["wrk"]["read"].as_f64().unwrap_or(0.0)
                    + s["wrk"]["timeout"].as_f64().unwrap_or(0.0)
                    + s["wrk"]["status"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    if !samples.is_empty() {
        let _ = writeln!(
            t,
            "\nmeshd (ebpf, client node) RSS: {:.1} MB idle; {}.",
            rss.idle_kib as f64 / 1024.0,
            samples.join("; ")
        );
    }
    t
}

/// What per-request policy costs: meshd-ebpf-l7 against meshd-ebpf, the same path without it.
fn l7_cost(t: &mut String, records: &[Record]) {
    let mut parts = Vec::new();
    for scenario in scenario_names() {
        let rps = |path| reduce(records, path, scenario, "rps").and_then(|r| f(r.median, "rps"));
        if let (Some(l7), Some(base)) = (rps("meshd-ebpf-l7"), rps("meshd-ebpf")) {
            parts.push(format!("{scenario} {:.2}x", l7 / base));
        }
    }
    if !parts.is_empty() {
        let _ = writeln!(
            t,
            "\nL7 policy on (meshd-ebpf-l7: every request decided by AuthorizationPolicy) vs \
             meshd-ebpf, rps: {}.",
            parts.join(", ")
        );
    }
}

/// Keep-alive through meshd-ebpf with 1, 10 and 100 pods served on each node.
fn pods_per_node(t: &mut String, records: &[Record]) {
    let kinds = [
        (1, PathKind::MeshdEbpfPods),
        (10, PathKind::MeshdEbpfPods10),
        (100, PathKind::MeshdEbpfPods100),
    ];
    let rows: Vec<_> = kinds
        .iter()
        .filter_map(|(n, k)| Some((n, reduce(records, k.name(), "keep-alive", "rps")?)))
        .collect();
    if rows.len() < 2 {
        return;
    }
    let _ = writeln!(
        t,
        "\n| pods per node (meshd-ebpf) | keep-alive rps | min-max | p99 ms | client meshd RSS MB | errors |\n|---|---|---|---|---|---|"
    );
    for (n, row) in rows {
        let m = |k: &str| f(row.median, k);
        let _ = writeln!(
            t,
            "| {n} | {} | {:.0}-{:.0} | {} | {} | {} |",
            cell(m("rps"), 0),
            row.min,
            row.max,
            cell(m("p99_ms"), 3),
            cell(m("client_meshd_rss_kib").map(|k| k / 1024.0), 1),
            row.errors
        );
    }
}

pub fn write(dir: &Path, info: &RunInfo, records: &[Record], rss: &Rss) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let raw: Vec<Value> = records
        .iter()
        .map(|r| json!({"path": r.path, "scenario": r.scenario, "round": r.round, "result": r.value}))
        .collect();
    let (agree, valid) = agreement(records);
    let doc = json!({
        "machine": info.machine,
        "date": info.date,
        "short": info.short,
        "rounds": info.rounds,
        "meshd": {"path": info.meshd, "sha256": info.meshd_sha256},
        "loadgen_vs_wrk": {"ratio": agree, "valid": valid},
        "records": raw,
        "meshd_rss_kib": {"idle": rss.idle_kib, "under_load": rss.samples},
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    std::fs::write(dir.join("results.md"), markdown(info, records, rss))?;
    std::fs::write(dir.join("results.svg"), crate::plot::svg(records))?;
    Ok(())
}
