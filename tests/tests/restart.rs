//! Restarts without a gap: a new meshd started beside the running one takes its listening
//! sockets (handover), its pinned links and maps; the old one stops accepting once the new one
//! serves, gets SIGTERM (as a DaemonSet's surge update sends it), drains and exits, leaving the
//! interception to its successor. Both nodes are rolled, one after the other, under keep-alive
//! load and a connection-per-request loop: not one request fails and the packet capture never
//! sees the application's marker.

use std::time::Duration;

use nix::sys::signal::Signal;
use testhosts::{
    handpods::{cni, hand_pod, route_pod_subnets, run_in_pod, start_pods_meshd},
    loop_counts, require_privileges, sibling_binary, Capture, MeshCa, Meshd, OrdersNet, Process,
    TestNet,
};

const WAIT: Duration = Duration::from_secs(30);
const MARKER: &str = "ROLLING-RESTART-MARKER-5c1e";
/// Long enough for both rolls (each waits for the old meshd's 5 s drain).
const LOAD_SECS: &str = "18";

/// The (ok, failed, reconnected) counts of `testhosts-tool keepalive`'s summary line.
fn keepalive_counts(out: &str) -> (u64, u64, u64) {
    let line = out.lines().find(|l| l.starts_with("keepalive ok"));
    let words: Vec<&str> = line.unwrap_or_default().split_whitespace().collect();
    let n = |i: usize| words.get(i).and_then(|w| w.parse().ok()).unwrap_or(0);
    (n(2), n(4), n(6))
}

/// Starts a successor beside `old` on `node`, waits until it serves, then sends the old one
/// SIGTERM and waits for it to drain and exit. `sigterm_first`: the other order (as a stop then
/// start does): the old meshd drains, holding its listening sockets, and the successor started
/// meanwhile takes them.
fn roll(net: &TestNet, node: usize, mode: &str, old: &mut Meshd, sigterm_first: bool) -> Meshd {
    let config = std::fs::read_to_string(&old.config).unwrap();
    if sigterm_first {
        old.process.signal(Signal::SIGTERM).unwrap();
        old.process
            .expect_line_containing("shutting down", WAIT)
            .unwrap();
    }
    let mut new = net.start_meshd_config(node, mode, &config).unwrap();
    let log = new.process.output_so_far().join("\n");
    assert!(
        log.contains("took the listening sockets") && log.contains("took_over=true"),
        "{mode} node {node}: the new meshd did not take over:\n{log}"
    );
    if mode == "ebpf" {
        assert!(log.contains("took over a link"), "{log}");
        assert!(
            !log.contains("replaced by a new one"),
            "maps not shared:\n{log}"
        );
    }
    old.process
        .expect_line_containing("the new meshd serves", WAIT)
        .unwrap();
    if !sigterm_first {
        old.process.signal(Signal::SIGTERM).unwrap();
    }
    let (status, log) = old.process.wait_output(WAIT).unwrap();
    assert!(status.success(), "{mode} node {node}: {log}");
    assert!(
        log.contains("meshd stopped; the new meshd serves"),
        "{mode} node {node}: {log}"
    );
    new
}

/// Runs the keep-alive load and the connection loop from `client` (which starts a process where
/// the application runs) to `target`, rolls node 0's meshd (successor first) then node 1's
/// (SIGTERM first), and checks that no
/// request failed and the capture on node 0's link never saw the marker.
fn roll_both_under_load(
    net: &TestNet,
    (mode, what): (&str, &str),
    (mut a, mut b): (Meshd, Meshd),
    client: impl Fn(&[&str]) -> Process,
    target: &str,
) {
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let tcpdump = Capture::start(net, 0).unwrap();
    let mut keepalive = client(&[&tool, "keepalive", target, "8", LOAD_SECS, MARKER]);
    let mut per_request = client(&[&tool, "loop", target, LOAD_SECS, MARKER]);
    a.wait_access(&["direction=outbound"], 10).unwrap();

    let mut a2 = roll(net, 0, mode, &mut a, false);
    a2.wait_access(&["direction=outbound"], 10).unwrap();
    let mut b2 = roll(net, 1, mode, &mut b, true);
    b2.wait_access(&["direction=inbound"], 10).unwrap();

    let (_, kept) = keepalive.wait_output(WAIT).unwrap();
    let (_, looped) = per_request.wait_output(WAIT).unwrap();
    let (ok, failed, reconnected) = keepalive_counts(&kept);
    let (loop_ok, loop_failed) = loop_counts(&looped);
    assert!(ok > 100 && failed == 0, "{mode}: keep-alive load: {kept}");
    assert!(
        loop_ok > 100 && loop_failed == 0,
        "{mode}: connection loop: {looped}"
    );
    assert!(
        !tcpdump.saw(MARKER).unwrap(),
        "{mode}: the marker crossed in plaintext during the restarts"
    );
    eprintln!(
        "figure: {mode}, {what}: both nodes rolled under load: keep-alive ok {ok} failed {failed} \
         reconnected {reconnected}; connection per request ok {loop_ok} failed {loop_failed}"
    );
}

/// Host workloads (node namespace), both modes.
#[test]
fn rolling_restart_under_load_fails_no_request_and_leaks_no_plaintext() {
    require_privileges!();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    for mode in ["ebpf", "iptables"] {
        let on = OrdersNet::new("0.0.0.0:7000").unwrap();
        let (net, target) = (&on.net, &on.target);
        // Control: without the mesh the capture sees the marker, so the check can fail.
        let control = Capture::start(net, 0).unwrap();
        net.exec(0, &[&tool, "keepalive", target, "2", "1", MARKER])
            .unwrap();
        assert!(
            control.saw(MARKER).unwrap(),
            "control capture missed the marker"
        );

        let meshds = on.start_mesh(mode).unwrap();
        let client = |argv: &[&str]| net.workload(0, "checkout", argv).unwrap();
        roll_both_under_load(net, (mode, "host workloads"), meshds, client, target);
    }
}

/// Pods (their listeners live in the pods' namespaces and are handed over too), both modes.
#[test]
fn rolling_restart_of_pod_nodes_fails_no_request_and_leaks_no_plaintext() {
    require_privileges!();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        route_pod_subnets(&net);
        let (web, db) = (hand_pod(&net, 0, 0), hand_pod(&net, 1, 0));
        let (m0, s0) = start_pods_meshd(&net, &ca, 0, mode, "");
        let (m1, s1) = start_pods_meshd(&net, &ca, 1, mode, "");
        assert!(cni("ADD", &web, "web", &s0).0 && cni("ADD", &db, "db", &s1).0);
        let mut server = run_in_pod(&db, &[&tool, "echo-server", "0.0.0.0:7000"]);
        server.expect_line("ready", WAIT).unwrap();
        let target = format!("{}:7000", db.ip);
        let client = |argv: &[&str]| run_in_pod(&web, argv);
        roll_both_under_load(&net, (mode, "pods"), (m0, m1), client, &target);
    }
}
