//! The benchmark's open-loop load generator: plain HTTP/1.1, an application that knows nothing
//! of the mesh, event-driven (one tokio thread, no thread per connection, like wrk -t1). The
//! closed-loop scenarios use wrk; this one exists for what wrk cannot do, a fixed request rate,
//! and `mesh-bench` checks on the direct path that its closed mode reaches wrk's rate (within
//! 10%), so that it is not the bottleneck. Prints one JSON object with its results.
//!
//! loadgen closed ADDR CONNS SECS        N keep-alive connections, back to back
//! loadgen open ADDR RATE CONNS SECS     fixed request rate over CONNS keep-alive connections
//!
//! Open loop: each connection has a schedule (intended start times, RATE/CONNS apart, the
//! connections' schedules spread evenly). A request whose connection was still busy at its
//! intended start is timed from that start, so a stall of the path is counted in full (no
//! coordinated omission); a request sent on an idle connection is timed from when it was sent,
//! so the generator's own timer granularity (1 ms in tokio) is not counted as the path's.
//! Responses other than 2xx and socket errors are errors.

use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let n = |s: &str| {
        s.parse::<u64>()
            .unwrap_or_else(|_| panic!("not a number: {s}"))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (scenario, outcome) = match a.as_slice() {
        ["closed", addr, conns, secs] => {
            ("closed", rt.block_on(run(addr, None, n(conns), n(secs))))
        }
        ["open", addr, rate, conns, secs] => (
            "open",
            rt.block_on(run(addr, Some(n(rate)), n(conns), n(secs))),
        ),
        _ => {
            eprintln!("usage: see the top of loadgen.rs");
            std::process::exit(2);
        }
    };
    report(scenario, outcome);
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    socket_errors: u64,
    non2xx: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.socket_errors += other.socket_errors;
        self.non2xx += other.non2xx;
        match (&mut self.hist, other.hist) {
            (Some(h), Some(o)) => h.add(o).expect("same bounds"),
            (None, o) => self.hist = o,
            _ => {}
        }
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// One request/response on an open connection: `Ok(status)`, `Err` on any I/O or framing
/// problem.
async fn exchange(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    stream.write_all(REQUEST).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        if buf.len() >= end + 4 + len {
            return Ok(status);
        }
    }
}

async fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Runs CONNS connections until SECS have passed: back to back, or at `rate` in total.
async fn run(addr: &str, rate: Option<u64>, conns: u64, secs: u64) -> (Tally, Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r as f64));
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.to_string();
            // Spread the connections' schedules evenly over one interval.
            let first = interval.map(|iv| started + iv.mul_f64(i as f64 / conns as f64));
            tokio::spawn(connection(addr, first, interval, deadline))
        })
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        total.merge(t.await.expect("connection task"));
    }
    (total, started.elapsed())
}

async fn connection(
    addr: String,
    first: Option<Instant>,
    interval: Option<Duration>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally {
        hist: Some(new_hist()),
        ..Tally::default()
    };
    let mut buf = Vec::new();
    let mut conn = None;
    let mut intended = first;
    let mut idle_since = Instant::now();
    loop {
        let start = match intended {
            Some(at) => {
                tokio::time::sleep_until(at).await;
                if idle_since <= at {
                    Instant::now()
                } else {
                    at
                }
            }
            None => Instant::now(),
        };
        if start >= deadline {
            break;
        }
        if conn.is_none() {
            conn = connect(&addr).await.ok();
        }
        let result = match conn.as_mut() {
            Some(c) => exchange(c, &mut buf).await,
            None => Err(std::io::ErrorKind::NotConnected.into()),
        };
        match result {
            Ok(status) if (200..300).contains(&status) => {
                let us = start.elapsed().as_micros() as u64;
                let _ = tally.hist.as_mut().expect("hist").record(us.max(1));
            }
            Ok(_) => tally.non2xx += 1,
            Err(_) => {
                tally.socket_errors += 1;
                conn = None;
            }
        }
        idle_since = Instant::now();
        intended = intended.zip(interval).map(|(at, iv)| at + iv);
    }
    tally
}

fn report(scenario: &str, (t, elapsed): (Tally, Duration)) {
    let h = t.hist.unwrap_or_else(new_hist);
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "generator": "loadgen",
            "scenario": scenario,
            "requests": h.len(),
            "socket_errors": t.socket_errors,
            "non2xx": t.non2xx,
            "errors": t.socket_errors + t.non2xx,
            "seconds": elapsed.as_secs_f64(),
            "rps": h.len() as f64 / elapsed.as_secs_f64(),
            "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": h.max() as f64 / 1000.0,
        })
    );
}
