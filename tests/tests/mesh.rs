//! The mesh end to end: workload to workload across nodes inside mTLS (HBONE), in both
//! interception modes; nothing readable on the wire; the receiving side names the sender's
//! SPIFFE ID; pooled tunnels; STRICT refuses plaintext around the mesh.

use std::{path::Path, time::Duration};

use nix::sys::signal::Signal;
use testhosts::{
    require_privileges, sibling_binary, start_checkout_orders, MeshCa, Meshd, Process, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);
const MARKER: &str = "MESHD-MARKER-7f3a9c";

fn tool() -> String {
    sibling_binary("testhosts-tool").display().to_string()
}

/// Captures node 0's link (in the hub namespace) until dropped/stopped.
fn capture(net: &TestNet, file: &Path) -> Process {
    let hub = format!("{}-hub", net.id());
    let argv = [
        "ip", "netns", "exec", &hub, "tcpdump", "-i", "vn0", "-U", "-s", "0", "-w",
    ];
    let mut argv: Vec<&str> = argv.to_vec();
    let file = file.to_str().unwrap();
    argv.extend([file, "tcp"]);
    let mut p = net.host_process(0, &argv).unwrap();
    p.expect_line_containing("listening on", WAIT).unwrap();
    p
}

fn captured_marker(mut tcpdump: Process, file: &Path) -> bool {
    // tcpdump writes what it has seen a moment later: wait until the file stops growing.
    let size = || std::fs::metadata(file).map_or(0, |m| m.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = 0;
    while std::time::Instant::now() < deadline && (size() <= 24 || size() != last) {
        last = size();
        std::thread::sleep(Duration::from_millis(200));
    }
    tcpdump.signal(Signal::SIGINT).unwrap();
    let (_, log) = tcpdump.wait_output(WAIT).unwrap();
    let bytes = std::fs::read(file).unwrap();
    let _ = std::fs::remove_file(file);
    assert!(
        bytes.len() > 24,
        "capture is empty, the check could not fail:\n{log}"
    );
    bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes())
}

fn run(net: &TestNet, node: usize, workload: Option<&str>, argv: &[&str]) -> (bool, String) {
    let mut p = match workload {
        Some(w) => net.workload(node, w, argv).unwrap(),
        None => net.host_process(node, argv).unwrap(),
    };
    let (status, out) = p.wait_output(WAIT).unwrap();
    (status.success(), out)
}

fn metric(meshd: &Meshd, net: &TestNet, node: usize, series: &str) -> u64 {
    let text = meshd.metrics(net, node).unwrap();
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn workloads_talk_through_mtls_and_nothing_readable_crosses_the_wire() {
    require_privileges!();
    for mode in ["ebpf", "iptables"] {
        // Node 2 runs no meshd: it is the client that tries to go around the mesh.
        let net = TestNet::new(3).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        let tool = tool();
        let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
        let target = format!("{}:7000", net.node(1).addr);
        let pcap = std::env::temp_dir().join(format!("{}.pcap", net.id()));
        let send = [tool.as_str(), "client", &target, "5000", "1", MARKER];

        // Without the mesh the marker is on the wire: the capture can see it.
        let tcpdump = capture(&net, &pcap);
        let (ok, out) = run(&net, 0, Some("checkout"), &send);
        assert!(ok, "{out}");
        assert!(
            captured_marker(tcpdump, &pcap),
            "{mode}: control capture misses the marker"
        );

        let (mut a, mut b) = start_checkout_orders(&net, &ca, mode, "24h").unwrap();
        let tcpdump = capture(&net, &pcap);
        let (ok, out) = run(&net, 0, Some("checkout"), &send);
        assert!(ok, "{mode}: {out}");
        assert!(
            !captured_marker(tcpdump, &pcap),
            "{mode}: marker crossed the wire in plaintext"
        );

        let peer = "peer=spiffe://cluster.local/ns/default/sa/checkout";
        b.wait_access(
            &[
                "direction=inbound",
                "transport=hbone",
                peer,
                "workload=default/orders",
            ],
            1,
        )
        .unwrap();
        a.wait_access(
            &[
                "direction=outbound",
                "transport=hbone",
                "workload=default/checkout",
            ],
            1,
        )
        .unwrap();

        // Connection-per-request traffic rides the pooled tunnel: one handshake.
        let (ok, out) = run(
            &net,
            0,
            Some("checkout"),
            &[&tool, "client", &target, "100", "50"],
        );
        assert!(ok, "{mode}: {out}");
        let (ok, out) = run(&net, 0, Some("checkout"), &[&tool, "loop", &target, "2"]);
        assert!(ok && out.contains("failed 0"), "{mode}: {out}");
        let conns = r#"meshd_connections_total{direction="outbound""#;
        let handshakes = r#"meshd_tls_handshakes_total{direction="outbound",result="ok"}"#;
        let (c, h) = (metric(&a, &net, 0, conns), metric(&a, &net, 0, handshakes));
        assert!(c >= 52 && h == 1, "{mode}: {c} connections, {h} handshakes");

        // A CONNECT the peer refuses (no workload serves :7999 there) resets the application.
        let refused_port = format!("{}:7999", net.node(1).addr);
        let (ok, out) = run(
            &net,
            0,
            Some("checkout"),
            &[&tool, "client", &refused_port, "10", "1"],
        );
        assert!(!ok, "{mode}: a refused tunnel looked like a success: {out}");
        let tunnel_refused =
            r#"meshd_connections_rejected_total{direction="outbound",reason="tunnel_refused"}"#;
        assert!(
            metric(&a, &net, 0, tunnel_refused) >= 1,
            "{mode}: client {out}\nmetrics:\n{}\nlog:\n{}",
            a.metrics(&net, 0).unwrap_or_default(),
            a.process.output_so_far().join("\n")
        );

        // STRICT: plaintext to the workload port around the mesh is refused at :15006.
        let (ok, out) = run(&net, 2, None, &[&tool, "client", &target, "10", "1"]);
        assert!(!ok, "{mode}: plaintext reached a STRICT workload: {out}");
        let refused = r#"meshd_connections_rejected_total{direction="inbound",reason="plaintext_refused_strict"}"#;
        assert!(metric(&b, &net, 1, refused) >= 1, "{mode}");
    }
}
