//! Soak: a minute of mixed load through the mesh (connection after connection, plus
//! long-lived connections streaming) with zero errors, and meshd's memory and file descriptors
//! flat over it and back to their idle count afterwards. `MESHD_SOAK_SECS=600` runs the long
//! version.

use std::time::{Duration, Instant};

use testhosts::{
    loop_counts, require_privileges, sibling_binary, start_checkout_orders, vm_rss_kib, MeshCa,
    Meshd, TestNet,
};

const WAIT: Duration = Duration::from_secs(60);

/// Four long-lived connections, each echoing 64 KiB messages until the span (argv 2, seconds)
/// is over; prints the messages exchanged, or fails on the first short or wrong echo.
const STREAMER: &str = r#"
import socket, sys, threading, time
end = time.time() + float(sys.argv[2])
counts, errors = [], []
def stream(i):
    s = socket.create_connection((sys.argv[1], 7000), timeout=30)
    msg = bytes([i]) * 65536
    n = 0
    while time.time() < end:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            more = s.recv(len(msg) - len(got))
            if not more:
                errors.append("closed"); return
            got += more
        if got != msg:
            errors.append("wrong echo"); return
        n += 1
    counts.append(n)
threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print("streams", sum(counts), "errors", errors, flush=True)
sys.exit(1 if errors or len(counts) != 4 else 0)
"#;

fn fds(meshd: &Meshd) -> usize {
    let dir = format!("/proc/{}/fd", meshd.process.pid());
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn soak_short() {
    require_privileges!();
    let secs: u64 = std::env::var("MESHD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    let (a, b) = start_checkout_orders(&net, &ca, "ebpf", "24h").unwrap();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let target = format!("{}:7000", net.node(1).addr);
    // One connection first, so the pooled tunnel (kept open between loads) counts as idle.
    let warm_up = [tool.as_str(), "client", &target, "100", "1"];
    let (status, out) = net
        .workload(0, "checkout", &warm_up)
        .unwrap()
        .wait_output(WAIT)
        .unwrap();
    assert!(status.success(), "{out}");
    let idle = [
        (vm_rss_kib(a.process.pid()), fds(&a)),
        (vm_rss_kib(b.process.pid()), fds(&b)),
    ];

    let span = secs.to_string();
    let churn: Vec<_> = (0..2)
        .map(|_| {
            net.workload(0, "checkout", &[&tool, "loop", &target, &span])
                .unwrap()
        })
        .collect();
    let host = net.node(1).addr.to_string();
    let mut streams = net
        .workload(0, "checkout", &["python3", "-c", STREAMER, &host, &span])
        .unwrap();
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(5));
        samples.push((
            vm_rss_kib(a.process.pid()),
            fds(&a),
            vm_rss_kib(b.process.pid()),
            fds(&b),
        ));
    }
    let mut total = (0, 0);
    for mut c in churn {
        let (_, out) = c.wait_output(WAIT).unwrap();
        let (ok, failed) = loop_counts(&out);
        total.0 += ok;
        total.1 += failed;
        assert_eq!(failed, 0, "{out}");
    }
    let (status, streamed) = streams.wait_output(WAIT).unwrap();
    assert!(status.success(), "{streamed}");
    // Memory flat: the last sample within 20% (+2 MiB) of the one after warm-up.
    let warm = samples[1.min(samples.len() - 1)];
    let last = *samples.last().unwrap();
    for (side, w, l) in [("client", warm.0, last.0), ("server", warm.2, last.2)] {
        assert!(
            l <= w + w / 5 + 2048,
            "{side} meshd RSS grew from {w} to {l} KiB: {samples:?}"
        );
    }
    // Descriptors back to idle once the load is over (connections closed, nothing leaked).
    let deadline = Instant::now() + Duration::from_secs(15);
    while (fds(&a), fds(&b)) != (idle[0].1, idle[1].1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        (fds(&a), fds(&b)),
        (idle[0].1, idle[1].1),
        "descriptors left open: {samples:?}"
    );
    eprintln!(
        "figure: soak {secs} s: {} connections, {} failed; {}; RSS KiB client idle {} warm {} \
         last {}, server idle {} warm {} last {}; fds idle {:?}",
        total.0,
        total.1,
        streamed.trim(),
        idle[0].0,
        warm.0,
        last.0,
        idle[1].0,
        warm.2,
        last.2,
        (idle[0].1, idle[1].1)
    );
}

/// Connections held open through the mesh at once (`MESHD_IDLE_CONNS` overrides).
const IDLE_CONNS: usize = 10_000;
/// meshd's resident memory per held connection may not pass this (the bound the test sets).
const MAX_KIB_PER_CONN: u64 = 32;

/// Both meshd's resident memory in KiB, client side first.
fn rss(a: &Meshd, b: &Meshd) -> (u64, u64) {
    (vm_rss_kib(a.process.pid()), vm_rss_kib(b.process.pid()))
}

/// 10,000 idle connections through the mesh at once: every one established end to end, both
/// meshd's memory bounded per connection while they are held, and given back afterwards (within
/// 2x of the idle value within a minute).
#[test]
fn ten_thousand_idle_connections_bounded_and_memory_given_back() {
    require_privileges!();
    let conns: usize = std::env::var("MESHD_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(IDLE_CONNS);
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let argv = [tool.as_str(), "echo-server-async", "0.0.0.0:7000"];
    let mut server = net.workload(1, "orders", &argv).unwrap();
    server.expect_line("ready", WAIT).unwrap();
    let (a, b) = start_checkout_orders(&net, &ca, "ebpf", "24h").unwrap();
    let target = format!("{}:7000", net.node(1).addr);
    // One connection first: the pooled tunnel and start-up allocations are part of "idle".
    net.workload(0, "checkout", &[&tool, "hold", &target, "1", "0"])
        .unwrap()
        .wait_output(WAIT)
        .unwrap();
    std::thread::sleep(Duration::from_secs(11));
    let idle = rss(&a, &b);

    let n = conns.to_string();
    let mut holder = net
        .workload(0, "checkout", &[&tool, "hold", &target, &n, "3"])
        .unwrap();
    let held = holder.expect_line_containing("held", WAIT).unwrap();
    let peak = rss(&a, &b);
    assert_eq!(
        held.trim(),
        format!("held {conns} 0"),
        "every connection established"
    );
    let (_, out) = holder.wait_output(WAIT).unwrap();
    assert!(out.contains("closed"), "{out}");
    let bound = idle.0.max(idle.1) + conns as u64 * MAX_KIB_PER_CONN;
    assert!(
        peak.0 <= bound && peak.1 <= bound,
        "RSS with {conns} connections {peak:?} KiB over the bound {bound} (idle {idle:?})"
    );
    let started = Instant::now();
    let mut after = rss(&a, &b);
    while (after.0 > 2 * idle.0 || after.1 > 2 * idle.1) && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_secs(1));
        after = rss(&a, &b);
    }
    assert!(
        after.0 <= 2 * idle.0 && after.1 <= 2 * idle.1,
        "memory not given back: idle {idle:?}, after {after:?} KiB"
    );
    eprintln!(
        "figure: {conns} idle connections: RSS client/server meshd idle {idle:?} KiB, held \
         {peak:?} KiB ({:.1}/{:.1} KiB per connection), {} s after closing {after:?} KiB",
        (peak.0 - idle.0.min(peak.0)) as f64 / conns as f64,
        (peak.1 - idle.1.min(peak.1)) as f64 / conns as f64,
        started.elapsed().as_secs()
    );
}
