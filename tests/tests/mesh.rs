//! The mesh end to end: workload to workload across nodes inside mTLS (HBONE), in both
//! interception modes; nothing readable on the wire; the receiving side names the sender's
//! SPIFFE ID, the original source (`Forwarded`) and the trace id (`traceparent`, new for each
//! stream); pooled tunnels; STRICT refuses plaintext around the mesh.

use std::time::Duration;

use testhosts::{
    require_privileges, sibling_binary, start_checkout_orders, Capture, MeshCa, Meshd, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);
const MARKER: &str = "MESHD-MARKER-7f3a9c";

fn tool() -> String {
    sibling_binary("testhosts-tool").display().to_string()
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

/// Each access line has a trace id (the `traceparent` of its CONNECT), none repeated: every
/// stream starts a trace of its own.
fn assert_traced(lines: &[String], mode: &str) {
    let ids: std::collections::HashSet<&str> = (lines.iter())
        .map(|l| l.split("trace_id=").nth(1).unwrap_or("-"))
        .map(|v| v.split(' ').next().unwrap_or("-"))
        .collect();
    assert_eq!(ids.len(), lines.len(), "{mode}: a trace id repeats");
    let hex = |id: &&str| id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit());
    assert!(ids.iter().all(hex), "{mode}: without a trace id: {lines:?}");
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
        let send = [tool.as_str(), "client", &target, "5000", "1", MARKER];

        // Without the mesh the marker is on the wire: the capture can see it.
        let tcpdump = Capture::start(&net, 0).unwrap();
        let (ok, out) = run(&net, 0, Some("checkout"), &send);
        assert!(ok, "{out}");
        assert!(
            tcpdump.saw(MARKER).unwrap(),
            "{mode}: control capture misses the marker"
        );

        let (mut a, mut b) = start_checkout_orders(&net, &ca, mode, "24h").unwrap();
        let tcpdump = Capture::start(&net, 0).unwrap();
        let (ok, out) = run(&net, 0, Some("checkout"), &send);
        assert!(ok, "{mode}: {out}");
        assert!(
            !tcpdump.saw(MARKER).unwrap(),
            "{mode}: marker crossed the wire in plaintext"
        );

        let from = format!("forwarded_for={}", net.node(0).addr);
        let inbound = ["direction=inbound", "transport=hbone", &from];
        let peer = "peer=spiffe://cluster.local/ns/default/sa/checkout";
        let first = b
            .wait_access(
                &[&inbound[..], &[peer, "workload=default/orders"]].concat(),
                1,
            )
            .unwrap();
        assert_traced(&first, mode);
        a.wait_access(
            &[
                "direction=outbound",
                "transport=hbone",
                "workload=default/checkout",
            ],
            1,
        )
        .unwrap();

        pooled(&net, (&a, &mut b), &target, &inbound, mode);
        refusals(&net, (&mut a, &b), &target, mode);
    }
}

/// Connection-per-request traffic rides the pooled tunnel: one handshake; each connection a
/// stream with a trace of its own.
fn pooled(net: &TestNet, (a, b): (&Meshd, &mut Meshd), target: &str, inbound: &[&str], mode: &str) {
    let tool = tool();
    let (ok, out) = run(
        net,
        0,
        Some("checkout"),
        &[&tool, "client", target, "100", "50"],
    );
    assert!(ok, "{mode}: {out}");
    let (ok, out) = run(net, 0, Some("checkout"), &[&tool, "loop", target, "2"]);
    assert!(ok && out.contains("failed 0"), "{mode}: {out}");
    let conns = r#"meshd_connections_total{direction="outbound""#;
    let handshakes = r#"meshd_tls_handshakes_total{direction="outbound",result="ok"}"#;
    let (c, h) = (metric(a, net, 0, conns), metric(a, net, 0, handshakes));
    assert!(c >= 52 && h == 1, "{mode}: {c} connections, {h} handshakes");
    assert_traced(&b.wait_access(inbound, 52).unwrap(), mode);
}

/// A CONNECT the peer refuses resets the application; STRICT refuses plaintext around the mesh.
fn refusals(net: &TestNet, (a, b): (&mut Meshd, &Meshd), target: &str, mode: &str) {
    let tool = tool();
    // A CONNECT the peer refuses (no workload serves :7999 there) resets the application.
    let refused_port = format!("{}:7999", net.node(1).addr);
    let (ok, out) = run(
        net,
        0,
        Some("checkout"),
        &[&tool, "client", &refused_port, "10", "1"],
    );
    assert!(!ok, "{mode}: a refused tunnel looked like a success: {out}");
    let tunnel_refused =
        r#"meshd_connections_rejected_total{direction="outbound",reason="tunnel_refused"}"#;
    assert!(
        metric(a, net, 0, tunnel_refused) >= 1,
        "{mode}: client {out}\nmetrics:\n{}\nlog:\n{}",
        a.metrics(net, 0).unwrap_or_default(),
        a.process.output_so_far().join("\n")
    );

    // STRICT: plaintext to the workload port around the mesh is refused at :15006.
    let (ok, out) = run(net, 2, None, &[&tool, "client", target, "10", "1"]);
    assert!(!ok, "{mode}: plaintext reached a STRICT workload: {out}");
    let refused = r#"meshd_connections_rejected_total{direction="inbound",reason="plaintext_refused_strict"}"#;
    assert!(metric(b, net, 1, refused) >= 1, "{mode}");
}
