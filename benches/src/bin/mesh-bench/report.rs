//! Results: the raw records as JSON, a markdown table (each figure also as a ratio to direct
//! between the same endpoints: node to node, or pod to pod),
//! and an SVG plot (keep-alive rps per path; p50/p99 latency per path).

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde_json::{json, Value};

pub struct Record {
    pub path: &'static str,
    pub scenario: &'static str,
    pub round: usize,
    pub value: Value,
}

#[derive(Default)]
pub struct Rss {
    pub idle_kib: u64,
    pub with_1000_kib: u64,
}

use crate::paths::PathKind;

const SCENARIOS: [&str; 4] = ["keep-alive", "conn-per-request", "open-1000rps", "bulk"];

/// Median over rounds of one field for (path, scenario).
fn median(records: &[Record], path: &str, scenario: &str, field: &str) -> Option<f64> {
    let mut v: Vec<f64> = records
        .iter()
        .filter(|r| r.path == path && r.scenario == scenario)
        .filter_map(|r| r.value.get(field)?.as_f64())
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    (!v.is_empty()).then(|| v[v.len() / 2])
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

fn machine() -> String {
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname.map_or("?".into(), |u| u.release().to_string_lossy().into_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {kernel}, {cpus} CPUs")
}

pub fn markdown(records: &[Record], rss: &Rss, short: bool) -> String {
    let mut t = String::new();
    let mode = if short {
        "short run (CI smoke)"
    } else {
        "full run"
    };
    let _ = writeln!(t, "Machine: {}; {mode}; median of rounds.\n", machine());
    let _ = writeln!(t, "| path | scenario | rps | rps vs direct | p50 ms | p90 ms | p99 ms | p99 vs direct | p99.9 ms | errors |");
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    for scenario in SCENARIOS.iter().filter(|s| **s != "bulk") {
        for kind in PathKind::ALL {
            let path = kind.name();
            let m = |f: &str| median(records, path, scenario, f);
            let base = |f: &str| median(records, kind.baseline().name(), scenario, f);
            let _ = writeln!(
                t,
                "| {path} | {scenario} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(m("rps"), 0),
                ratio(m("rps"), base("rps")),
                cell(m("p50_ms"), 3),
                cell(m("p90_ms"), 3),
                cell(m("p99_ms"), 3),
                ratio(m("p99_ms"), base("p99_ms")),
                cell(m("p999_ms"), 3),
                cell(m("errors"), 0),
            );
        }
    }
    let _ = writeln!(
        t,
        "\n| path | bulk single stream MB/s | vs direct |\n|---|---|---|"
    );
    for kind in PathKind::ALL {
        let v = median(records, kind.name(), "bulk", "mbps");
        let base = median(records, kind.baseline().name(), "bulk", "mbps");
        let _ = writeln!(
            t,
            "| {} | {} | {} |",
            kind.name(),
            cell(v, 0),
            ratio(v, base)
        );
    }
    let _ = writeln!(
        t,
        "\nmeshd (ebpf, client node) RSS: {:.1} MB idle, {:.1} MB with 1,000 open connections.",
        rss.idle_kib as f64 / 1024.0,
        rss.with_1000_kib as f64 / 1024.0
    );
    t
}

pub fn svg(records: &[Record]) -> String {
    let paths = PathKind::ALL.map(PathKind::name);
    let (w, left, bar) = (760.0, 160.0, 22.0);
    let h = 50.0 + paths.len() as f64 * bar * 2.5;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    let _ = writeln!(s, "<text x=\"10\" y=\"18\" font-size=\"14\">keep-alive rps (left) and p50 / p99 latency ms (right), 16 connections</text>");
    let max_rps = paths
        .iter()
        .filter_map(|p| median(records, p, "keep-alive", "rps"))
        .fold(1.0, f64::max);
    let max_ms = paths
        .iter()
        .filter_map(|p| median(records, p, "keep-alive", "p99_ms"))
        .fold(0.001, f64::max);
    for (i, path) in paths.iter().enumerate() {
        let y = 40.0 + i as f64 * (bar * 2.5);
        let _ = writeln!(s, "<text x=\"10\" y=\"{:.0}\">{path}</text>", y + 15.0);
        let rps = median(records, path, "keep-alive", "rps").unwrap_or(0.0);
        let len = rps / max_rps * 260.0;
        let _ = writeln!(s, "<rect x=\"{left}\" y=\"{y:.0}\" width=\"{len:.1}\" height=\"{bar}\" fill=\"#4477aa\"/><text x=\"{:.0}\" y=\"{:.0}\">{rps:.0}</text>", left + len + 4.0, y + 15.0);
        for (j, (field, color)) in [("p50_ms", "#66ccee"), ("p99_ms", "#ee6677")]
            .iter()
            .enumerate()
        {
            let ms = median(records, path, "keep-alive", field).unwrap_or(0.0);
            let len = ms / max_ms * 200.0;
            let yy = y + j as f64 * bar / 2.0;
            let _ = writeln!(s, "<rect x=\"480\" y=\"{yy:.0}\" width=\"{len:.1}\" height=\"{:.0}\" fill=\"{color}\"/><text x=\"{:.0}\" y=\"{:.0}\" font-size=\"10\">{ms:.3}</text>", bar / 2.0, 484.0 + len, yy + 10.0);
        }
    }
    s.push_str("</svg>\n");
    s
}

pub fn write(dir: &Path, records: &[Record], rss: &Rss, short: bool) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let raw: Vec<Value> = records
        .iter()
        .map(|r| json!({"path": r.path, "scenario": r.scenario, "round": r.round, "result": r.value}))
        .collect();
    let doc = json!({
        "machine": machine(),
        "short": short,
        "records": raw,
        "meshd_rss_kib": {"idle": rss.idle_kib, "with_1000_connections": rss.with_1000_kib},
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    std::fs::write(dir.join("results.md"), markdown(records, rss, short))?;
    std::fs::write(dir.join("results.svg"), svg(records))?;
    Ok(())
}
