//! `cargo xtask profile`: where meshd spends its CPU under one benchmark scenario. Runs
//! `mesh-bench` for one path and scenario, samples both meshd processes with `perf record`
//! (call graphs) while the load runs, and writes a flame graph
//! (`bench/flamegraph-PATH-SCENARIO.svg`, with inferno) and the flat top of the profile
//! (`bench/profile-PATH-SCENARIO.txt`).

use std::{
    io::BufReader,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub struct Request<'a> {
    pub path: &'a str,
    pub scenario: &'a str,
    pub seconds: u32,
}

pub fn run(req: &Request) -> Result<()> {
    let work = Path::new("target/profile");
    std::fs::create_dir_all(work)?;
    let mut bench = Command::new("target/release/mesh-bench")
        .args(["--only", req.path, "--only", req.scenario, "--out"])
        .arg(work.join("bench"))
        .stdout(Stdio::null())
        .spawn()
        .context("start target/release/mesh-bench")?;
    let recorded = record(bench.id(), req, work);
    // The benchmark stops by itself once its scenario has run.
    let finished = bench.wait()?;
    recorded?;
    if !finished.success() {
        bail!("mesh-bench failed ({finished})");
    }
    report(req, work)
}

/// Waits for the benchmark's two meshd processes, lets the warm-up pass, then samples them.
fn record(bench_pid: u32, req: &Request, work: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let pids = loop {
        let pids = meshd_children(bench_pid);
        if pids.len() >= 2 {
            break pids;
        }
        if Instant::now() > deadline {
            bail!(
                "mesh-bench started no meshd for path {} within 120 s",
                req.path
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(3));
    let pid_list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let data = work.join("perf.data");
    let seconds = req.seconds.to_string();
    let status = Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &pid_list, "--", "sleep", &seconds])
        .stdout(Stdio::null())
        .status()
        .context("run perf (cargo xtask setup installs linux-perf)")?;
    if !status.success() {
        bail!("perf record failed ({status})");
    }
    Ok(())
}

/// meshd processes the benchmark started (its direct children running `meshd run`).
fn meshd_children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name: state, then the parent pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            ppid == Some(parent)
                && args.first().is_some_and(|a| a.ends_with(b"meshd"))
                && args.get(1) == Some(&&b"run"[..])
        })
        .collect()
}

fn report(req: &Request, work: &Path) -> Result<()> {
    let data = work.join("perf.data");
    let name = format!("{}-{}", req.path, req.scenario);
    let top = Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--sort",
            "dso,sym",
            "--stdio",
            "-g",
            "none",
        ])
        .arg("-i")
        .arg(&data)
        .output()
        .context("perf report")?;
    let top = String::from_utf8_lossy(&top.stdout);
    let lines: Vec<&str> = top.lines().filter(|l| l.contains('%')).take(40).collect();
    let text = format!(
        "perf, 999 Hz, both meshd processes, {} s of {} / {}\n\n{}\n",
        req.seconds,
        req.path,
        req.scenario,
        lines.join("\n")
    );
    std::fs::write(format!("bench/profile-{name}.txt"), &text)?;
    print!("{text}");

    let script = Command::new("perf")
        .arg("script")
        .arg("-i")
        .arg(&data)
        .output()
        .context("perf script")?;
    let mut folded = Vec::new();
    let mut options = inferno::collapse::perf::Options::default();
    options.include_pid = false;
    inferno::collapse::Collapse::collapse(
        &mut inferno::collapse::perf::Folder::from(options),
        BufReader::new(&script.stdout[..]),
        &mut folded,
    )
    .context("fold perf stacks")?;
    let svg_path = format!("bench/flamegraph-{name}.svg");
    let svg = std::fs::File::create(&svg_path)?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = format!("meshd, {} / {}", req.path, req.scenario);
    inferno::flamegraph::from_reader(&mut options, BufReader::new(&folded[..]), svg)
        .context("draw the flame graph")?;
    println!("xtask: wrote bench/profile-{name}.txt and {svg_path}");
    Ok(())
}
