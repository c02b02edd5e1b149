//! Abusive peers on meshd's :15008, each bounded in count and time: HTTP/2 rapid reset
//! (CVE-2023-44487), a flood of half-open TLS handshakes, an idle tunnel. meshd ends each abuse,
//! counts it, keeps its memory bounded (and hands it back afterwards), and serves a
//! well-behaved peer meanwhile. Figures are printed as `figure:` lines.

use std::time::{Duration, Instant};

use testhosts::{require_privileges, sibling_binary, vm_rss_kib, MeshCa, Meshd, TestNet, ORDERS};

const WAIT: Duration = Duration::from_secs(60);

/// The limits under test, small enough to hit quickly.
const LIMITS: &str = "hbone:\n  max_pending_handshakes: 64\n  handshake_timeout: 3s\n  \
                      idle_timeout: 2s\n";

struct Scene {
    meshd: Meshd,
    ca: MeshCa,
    _server: testhosts::Process,
    net: TestNet,
    tool: String,
    hbone: String,
    workload: String,
}

impl Scene {
    fn new() -> Scene {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        let server = net.echo_server(0, Some("orders"), "0.0.0.0:7000").unwrap();
        let extra = format!("{}{LIMITS}", ca.config(0, "24h", &[]));
        let meshd = net.start_meshd_with(0, "ebpf", &ORDERS, &extra).unwrap();
        let node0 = net.node(0).addr;
        Scene {
            meshd,
            ca,
            _server: server,
            tool: sibling_binary("testhosts-tool").display().to_string(),
            hbone: format!("{node0}:15008"),
            workload: format!("{node0}:7000"),
            net,
        }
    }

    /// `testhosts-tool ARGS` on node 1, to completion.
    fn tool(&self, args: &[&str]) -> String {
        let mut argv = vec![self.tool.as_str()];
        argv.extend_from_slice(args);
        let mut p = self.net.host_process(1, &argv).unwrap();
        p.wait_output(WAIT).unwrap().1
    }

    /// A well-behaved peer: one CONNECT to the workload, echoed.
    fn good_peer_served(&self, cert: &(String, String)) -> bool {
        let out = self.tool(&["hbone", &self.hbone, &self.workload, &cert.0, &cert.1]);
        out.contains("status 200") && out.contains("echo ok")
    }

    fn rss(&self) -> u64 {
        vm_rss_kib(self.meshd.process.pid())
    }

    fn rejected(&self, reason: &str) -> f64 {
        let series = format!("reason=\"{reason}\"");
        self.meshd
            .metric_sum(&self.net, 0, &["meshd_connections_rejected_total", &series])
    }

    fn handshakes(&self, result: &str) -> f64 {
        let series = format!("result=\"{result}\"");
        self.meshd
            .metric_sum(&self.net, 0, &["meshd_tls_handshakes_total", &series])
    }

    /// Waits for meshd's RSS to come back within twice `idle` (memory trimming runs every
    /// 10 s); the RSS it settled at.
    fn settles_near(&self, idle: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.rss();
            if now <= 2 * idle || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn h2_rapid_reset_bounded() {
    require_privileges!();
    let s = Scene::new();
    let good = s.ca.client_svid(1, "good", "checkout").unwrap();
    assert!(s.good_peer_served(&good));
    let idle = s.rss();
    let dialled_before = s
        .meshd
        .metric_sum(&s.net, 0, &["meshd_connections_total", "hbone"]);
    let started = Instant::now();
    let out = s.tool(&[
        "rapid-reset",
        &s.hbone,
        &s.workload,
        &good.0,
        &good.1,
        "20000",
    ]);
    let peak = s.rss();
    assert!(out.contains("rapid-reset sent"), "{out}");
    let sent: u64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(
        sent < 20000 && out.contains("GOAWAY error code 0xb"),
        "meshd let the resets go on (0xb: ENHANCE_YOUR_CALM): {out}"
    );
    let counted = s.rejected("hbone_enhance_your_calm") + s.rejected("hbone_rapid_reset");
    assert!(counted >= 1.0, "the GOAWAY is counted");
    let dialled = s
        .meshd
        .metric_sum(&s.net, 0, &["meshd_connections_total", "hbone"]);
    assert!(
        dialled - dialled_before <= 100.0,
        "reset streams made meshd dial the workload {} times",
        dialled - dialled_before
    );
    assert!(
        s.good_peer_served(&good),
        "a good peer is served right after"
    );
    let after = s.settles_near(idle);
    eprintln!(
        "figure: h2 rapid reset: {sent} resets before GOAWAY in {} ms; workload dials {}; \
         meshd RSS idle {idle} KiB, after the attack {peak} KiB, settled {after} KiB",
        started.elapsed().as_millis(),
        dialled - dialled_before
    );
    assert!(
        after <= 2 * idle,
        "RSS {after} KiB stays above twice idle {idle} KiB"
    );
}

#[test]
fn half_open_handshake_flood_bounded_and_idle_tunnels_closed() {
    require_privileges!();
    let s = Scene::new();
    let good = s.ca.client_svid(1, "good", "checkout").unwrap();
    let idle = s.rss();
    // 2,000 connections that never finish a ClientHello, held 5 s.
    let mut flood = s
        .net
        .host_process(1, &[&s.tool, "half-hellos", &s.hbone, "2000", "5"])
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let during = s.rss();
    let served = s.good_peer_served(&good);
    let (_, out) = flood.wait_output(WAIT).unwrap();
    assert!(served, "a good peer is served during the flood");
    assert!(
        out.contains("opened 2000") && out.contains("closed by meshd 2000"),
        "every half-open connection is closed by meshd (evicted or timed out): {out}"
    );
    let evicted = s.handshakes("handshake_evicted");
    let timed_out = s.handshakes("handshake_timeout");
    assert!(
        evicted >= 1900.0,
        "the cap of 64 evicts the oldest: {evicted}"
    );
    let after = s.settles_near(idle);
    eprintln!(
        "figure: half-open flood of 2000: {evicted} evicted, {timed_out} timed out; meshd RSS \
         idle {idle} KiB, during {during} KiB, settled {after} KiB; good peer served: {served}"
    );
    assert!(
        during < idle + 32 * 1024,
        "RSS during the flood: {during} KiB"
    );
    assert!(
        after <= 2 * idle,
        "RSS {after} KiB stays above twice idle {idle} KiB"
    );

    // An HBONE connection with no stream is closed after idle_timeout (2s).
    let out = s.tool(&["hbone-idle", &s.hbone, &good.0, &good.1, "20"]);
    let ms: u64 = out
        .strip_prefix("idle closed by meshd after ")
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the idle tunnel is never closed: {out}"));
    assert!((1500..10_000).contains(&ms), "closed after {ms} ms");
}
