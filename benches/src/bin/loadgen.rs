//! The benchmark's load generator: plain HTTP/1.1 over std sockets, an application that knows
//! nothing of the mesh. It runs inside a workload cgroup of the client test node and prints one
//! JSON object with its results.
//!
//! loadgen closed ADDR CONNS SECS        N keep-alive connections, back to back
//! loadgen cpr ADDR CONNS SECS           a new connection for every request
//! loadgen open ADDR RATE CONNS SECS     fixed request rate; latency counted from each request's
//!                                       intended start, so a stall is not hidden (no coordinated
//!                                       omission)
//! loadgen bulk ADDR SECS                one connection downloading /bulk; reports MB/s
//! loadgen hold ADDR CONNS SECS          open CONNS keep-alive connections, one request each,
//!                                       print `holding`, keep them open for SECS

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

fn main() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let n = |s: &str| {
        s.parse::<u64>()
            .unwrap_or_else(|_| panic!("not a number: {s}"))
    };
    match a.as_slice() {
        ["closed", addr, conns, secs] => {
            report("closed", run_threads(addr, n(conns), n(secs), false))
        }
        ["cpr", addr, conns, secs] => report("cpr", run_threads(addr, n(conns), n(secs), true)),
        ["open", addr, rate, conns, secs] => {
            report("open", open_loop(addr, n(rate), n(conns), n(secs)))
        }
        ["bulk", addr, secs] => bulk(addr, n(secs)),
        ["hold", addr, conns, secs] => hold(addr, n(conns), n(secs)),
        _ => {
            eprintln!("usage: see the top of loadgen.rs");
            std::process::exit(2);
        }
    }
}

struct Outcome {
    hist: Histogram<u64>,
    errors: u64,
    elapsed: Duration,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// One request/response on an open connection; `Err` on any I/O or protocol problem.
fn exchange(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    stream.write_all(REQUEST)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(());
            }
        }
    }
}

fn run_threads(addr: &str, conns: u64, secs: u64, new_connection_each: bool) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let barrier = Arc::new(Barrier::new(conns as usize));
    let started = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (addr, barrier) = (addr.to_string(), barrier.clone());
            thread::spawn(move || {
                let (mut hist, mut errors, mut buf) = (new_hist(), 0u64, Vec::new());
                let mut conn: Option<TcpStream> = None;
                barrier.wait();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    if conn.is_none() || new_connection_each {
                        conn = TcpStream::connect(&addr).ok();
                        if let Some(c) = &conn {
                            let _ = c.set_nodelay(true);
                        }
                    }
                    let ok = conn.as_mut().is_some_and(|c| exchange(c, &mut buf).is_ok());
                    if ok {
                        let _ = hist.record(t0.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                        conn = None;
                    }
                }
                (hist, errors)
            })
        })
        .collect();
    merge(workers, started)
}

fn merge(workers: Vec<thread::JoinHandle<(Histogram<u64>, u64)>>, started: Instant) -> Outcome {
    let mut out = Outcome {
        hist: new_hist(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for w in workers {
        let (h, e) = w.join().expect("worker");
        out.hist.add(h).expect("same bounds");
        out.errors += e;
    }
    out.elapsed = started.elapsed();
    out
}

fn open_loop(addr: &str, rate: u64, conns: u64, secs: u64) -> Outcome {
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.to_string();
            thread::spawn(move || {
                let (mut hist, mut errors, mut buf) = (new_hist(), 0u64, Vec::new());
                let mut conn = TcpStream::connect(&addr).ok();
                if let Some(c) = &conn {
                    let _ = c.set_nodelay(true);
                }
                // Spread the connections' schedules evenly over one interval.
                let mut intended = started + interval.mul_f64(i as f64 / conns as f64);
                while intended < deadline {
                    if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let ok = conn.as_mut().is_some_and(|c| exchange(c, &mut buf).is_ok());
                    if ok {
                        let _ = hist.record(intended.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                        conn = TcpStream::connect(&addr).ok();
                    }
                    intended += interval;
                }
                (hist, errors)
            })
        })
        .collect();
    merge(workers, started)
}

fn report(scenario: &str, o: Outcome) {
    let h = &o.hist;
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    let quantiles = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999];
    println!(
        "{}",
        serde_json::json!({
            "scenario": scenario,
            "requests": h.len(),
            "errors": o.errors,
            "rps": h.len() as f64 / o.elapsed.as_secs_f64(),
            "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": h.max() as f64 / 1000.0,
            "histogram_ms": quantiles.map(|p| [p, q(p)]),
        })
    );
}

fn bulk(addr: &str, secs: u64) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut total = 0u64;
    let mut chunk = vec![0u8; 1 << 20];
    while Instant::now() < deadline {
        stream
            .write_all(b"GET /bulk HTTP/1.1\r\nHost: bench\r\n\r\n")
            .expect("write");
        let mut head = Vec::new();
        let mut body_left: Option<u64> = None;
        while body_left != Some(0) {
            let n = stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed mid-transfer");
            match body_left {
                Some(left) => body_left = Some(left.saturating_sub(n as u64)),
                None => {
                    head.extend_from_slice(&chunk[..n]);
                    if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                        let len: u64 = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .expect("content-length");
                        body_left = Some(len.saturating_sub((head.len() - end - 4) as u64));
                    }
                }
            }
            total += n as u64;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"scenario": "bulk", "bytes": total, "mbps": total as f64 / secs / 1e6})
    );
}

fn hold(addr: &str, conns: u64, secs: u64) {
    let mut open = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..conns {
        let mut c = TcpStream::connect(addr).expect("connect");
        exchange(&mut c, &mut buf).expect("exchange");
        open.push(c);
    }
    println!("holding {}", open.len());
    std::io::stdout().flush().ok();
    thread::sleep(Duration::from_secs(secs));
}
