//! The SVG plot: one panel per scenario, a bar per path (rate of its median round, MB/s for
//! bulk) with its p99 beside it, colours by kind of path (legend on top), and a red mark on any
//! path with errors in some round.

use std::fmt::Write as _;

use crate::{
    paths::PathKind,
    report::{reduce, Record},
    scenario_names,
};

const ROW: f64 = 16.0;
const LEFT: f64 = 170.0;
const BAR: f64 = 330.0;

fn colour(kind: PathKind) -> &'static str {
    match kind {
        PathKind::Direct | PathKind::DirectPods => "#999999",
        PathKind::Stunnel | PathKind::Haproxy => "#ee7733",
        _ => "#4477aa",
    }
}

pub fn svg(records: &[Record]) -> String {
    let panels: Vec<&str> = scenario_names()
        .iter()
        .copied()
        .filter(|s| records.iter().any(|r| r.scenario == *s))
        .collect();
    let panel_h = 30.0 + PathKind::ALL.len() as f64 * ROW;
    let (w, h) = (760.0, 70.0 + panels.len() as f64 * panel_h);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n");
    let _ = writeln!(s, "<text x=\"10\" y=\"18\" font-size=\"14\">rate of the median round per path and scenario (p99 in ms beside it)</text>");
    for (i, (label, c)) in [
        ("no proxy", "#999999"),
        ("meshd", "#4477aa"),
        ("other mTLS proxy pair", "#ee7733"),
    ]
    .iter()
    .enumerate()
    {
        let x = 10.0 + i as f64 * 170.0;
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"30\" width=\"12\" height=\"12\" fill=\"{c}\"/><text x=\"{}\" y=\"40\">{label}</text>", x + 16.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"520\" y=\"40\" fill=\"#cc3311\">⚠ errors in some round</text>"
    );
    for (p, scenario) in panels.iter().enumerate() {
        let top = 60.0 + p as f64 * panel_h;
        let key = if *scenario == "bulk" { "mbps" } else { "rps" };
        let unit = if key == "mbps" { "MB/s" } else { "rps" };
        let _ = writeln!(s, "<text x=\"10\" y=\"{:.0}\" font-size=\"12\" font-weight=\"bold\">{scenario} ({unit})</text>", top + 12.0);
        let rows: Vec<_> = PathKind::ALL
            .iter()
            .filter_map(|k| Some((*k, reduce(records, k.name(), scenario, key)?)))
            .collect();
        let max = rows
            .iter()
            .filter_map(|(_, r)| r.median.get(key)?.as_f64())
            .fold(1.0, f64::max);
        for (i, (kind, row)) in rows.iter().enumerate() {
            let y = top + 20.0 + i as f64 * ROW;
            let v = row.median.get(key).and_then(|v| v.as_f64()).unwrap_or(0.0);
            let len = v / max * BAR;
            let p99 = row.median.get("p99_ms").and_then(|v| v.as_f64());
            let p99 = p99.map_or(String::new(), |p| format!(", p99 {p:.2}"));
            let _ = writeln!(s, "<text x=\"10\" y=\"{:.0}\">{}</text><rect x=\"{LEFT}\" y=\"{y:.0}\" width=\"{len:.1}\" height=\"{:.0}\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\">{v:.0}{p99}</text>",
                y + 11.0, kind.name(), ROW - 3.0, colour(*kind), LEFT + len + 4.0, y + 11.0);
            if row.errors > 0.0 {
                let _ = writeln!(
                    s,
                    "<text x=\"{:.0}\" y=\"{:.0}\" fill=\"#cc3311\">⚠ {} errors</text>",
                    LEFT + BAR + 130.0,
                    y + 11.0,
                    row.errors
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}
