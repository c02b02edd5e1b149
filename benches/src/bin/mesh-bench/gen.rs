//! The load generators, run where the path's client lives (the client workload cgroup of node
//! 0, or the client pod): wrk (Debian) for the closed-loop HTTP/1.1 scenarios and the bulk
//! download, h2load (Debian nghttp2-client) for HTTP/2 with many streams on few connections,
//! and the project's event-driven `loadgen` for the fixed-rate scenario. Each returns one JSON
//! object with the same field names: generator, requests, seconds, rps, errors (socket errors
//! plus responses that are not 2xx), socket_errors, non2xx, and where the generator reports
//! them p50/p90/p99/p999_ms, mean_ms, mbps.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use testhosts::{handpods::HandPod, sibling_binary, Process, TestNet};

/// wrk's summary as JSON, printed by its `done` hook. wrk counts a response with status > 399
/// in `errors.status`; connections per request come from `Connection: close` (wrk reconnects).
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"status":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout,
    e.status, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean))
end
"#;

/// Where the load generator runs.
#[derive(Clone, Copy)]
pub struct Client<'a> {
    pub net: &'a TestNet,
    pub pod: Option<&'a HandPod>,
}

impl Client<'_> {
    pub fn spawn(&self, argv: &[&str]) -> Result<Process> {
        match self.pod {
            Some(pod) => Process::spawn_in(&pod.node, &pod.cgroup, argv),
            None => self.net.workload(0, "client", argv),
        }
    }

    fn output(&self, argv: &[&str], secs: u64) -> Result<String> {
        let mut p = self.spawn(argv)?;
        let (status, out) = p.wait_output(Duration::from_secs(secs + 60))?;
        anyhow::ensure!(status.success(), "{argv:?} failed: {out}");
        Ok(out)
    }
}

pub fn write_wrk_script(dir: &Path) -> Result<String> {
    let path = dir.join("wrk-json.lua");
    std::fs::write(&path, WRK_SCRIPT)?;
    Ok(path.display().to_string())
}

/// wrk with `conns` connections for `secs`; `close` sends `Connection: close` (a connection
/// per request); `path` is `/` or `/bulk`.
pub fn wrk(
    client: Client,
    script: &str,
    url: &str,
    conns: u64,
    secs: u64,
    close: bool,
) -> Result<Value> {
    let (c, d) = (format!("-c{conns}"), format!("-d{secs}s"));
    let mut argv = vec!["wrk", "-t1", &c, &d, "--timeout", "10s", "-s", script];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(url);
    let out = client.output(&argv, secs)?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no summary from wrk: {out}"))?;
    let w: Value = serde_json::from_str(line)?;
    let n = |k: &str| w[k].as_f64().unwrap_or(0.0);
    let seconds = n("duration_us") / 1e6;
    // wrk does not count requests still in flight at the end: none completed is a failure.
    anyhow::ensure!(
        n("requests") > 0.0,
        "wrk completed no request in {secs}s: {out}"
    );
    let socket_errors = n("connect") + n("read") + n("write") + n("timeout");
    let ms = |k: &str| n(k) / 1000.0;
    Ok(json!({
        "generator": "wrk",
        "requests": n("requests"),
        "seconds": seconds,
        "rps": n("requests") / seconds,
        "mbps": n("bytes") / seconds / 1e6,
        "socket_errors": socket_errors,
        "socket_errors_by_kind": {"connect": n("connect"), "read": n("read"), "write": n("write"),
            "timeout": n("timeout")},
        "non2xx": n("status"),
        "errors": socket_errors + n("status"),
        "p50_ms": ms("p50_us"), "p90_ms": ms("p90_us"), "p99_ms": ms("p99_us"),
        "p999_ms": ms("p999_us"), "mean_ms": ms("mean_us"),
    }))
}

/// h2load (HTTP/2 prior knowledge) with `conns` connections of `streams` concurrent streams.
pub fn h2load(client: Client, url: &str, conns: u64, streams: u64, secs: u64) -> Result<Value> {
    let (c, m, d) = (conns.to_string(), streams.to_string(), secs.to_string());
    let argv = ["h2load", "-c", &c, "-m", &m, "-D", &d, url];
    let out = client.output(&argv, secs)?;
    parse_h2load(&out).with_context(|| format!("h2load output: {out}"))
}

fn parse_h2load(out: &str) -> Option<Value> {
    let line = |prefix: &str| out.lines().find(|l| l.trim_start().starts_with(prefix));
    let nums = |l: &str| -> Vec<f64> {
        l.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    // finished in 5.00s, 12345.67 req/s, 1.23MB/s
    let finished = nums(line("finished in")?);
    // requests: T total, S started, D done, OK succeeded, F failed, E errored, TO timeout
    let r = nums(line("requests:")?);
    // status codes: A 2xx, B 3xx, C 4xx, D 5xx (the unit digits are numbers too: A 2 B 3 C 4 D 5)
    let s = nums(line("status codes:")?);
    // time for request:  min  max  mean  sd  +/- sd   (with units)
    let mean_ms = line("time for request:").and_then(|l| l.split_whitespace().nth(5).map(ms));
    // h2load: `failed` includes `errored` (network, RST_STREAM) and 4xx/5xx responses.
    let (succeeded, failed, errored, timeout) = (*r.get(3)?, *r.get(4)?, *r.get(5)?, *r.get(6)?);
    let seconds = *finished.first()?;
    Some(json!({
        "generator": "h2load",
        "requests": succeeded,
        "seconds": seconds,
        "rps": succeeded / seconds,
        "socket_errors": errored + timeout,
        "non2xx": s.get(4)? + s.get(6)?,
        "errors": failed + timeout,
        "mean_ms": mean_ms,
    }))
}

/// "1.23ms" / "456us" / "1.02s" in milliseconds.
fn ms(v: &str) -> f64 {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => num / 1000.0,
        "s" => num * 1000.0,
        _ => num,
    }
}

/// The project's loadgen: `closed` (CONNS back to back) or `open` at `rate`.
pub fn loadgen(
    client: Client,
    target: &str,
    rate: Option<u64>,
    conns: u64,
    secs: u64,
) -> Result<Value> {
    let bin = sibling_binary("loadgen").display().to_string();
    let (c, d) = (conns.to_string(), secs.to_string());
    let r = rate.map(|r| r.to_string());
    let mut argv = vec![bin.as_str()];
    match &r {
        Some(r) => argv.extend(["open", target, r.as_str(), &c, &d]),
        None => argv.extend(["closed", target, &c, &d]),
    }
    let out = client.output(&argv, secs)?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON from loadgen")?;
    Ok(serde_json::from_str(line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_summary_is_read_with_its_errors() {
        let out = "finished in 5.00s, 12345.67 req/s, 1.23MB/s\n\
            requests: 61730 total, 61760 started, 61730 done, 61720 succeeded, 10 failed, 0 errored, 0 timeout\n\
            status codes: 61720 2xx, 0 3xx, 10 4xx, 0 5xx\n\
            time for request:      123us      4.56ms      1.23ms    456us    70.00%\n";
        let v = parse_h2load(out).unwrap();
        assert_eq!(v["rps"], 61720.0 / 5.0);
        assert_eq!(v["non2xx"], 10.0);
        assert_eq!(v["errors"], 10.0);
        assert_eq!(v["mean_ms"], 1.23);
    }
}
