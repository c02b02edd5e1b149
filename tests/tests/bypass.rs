//! The sk_msg loopback bypass (`proxy.sk_msg_bypass: true`, ebpf mode): bytes between
//! applications and meshd on a node go socket to socket. Across the mesh they still arrive
//! intact and in order, both ways, with half-close; both ends of every local hop (app <->
//! :15001 on the client node, 127.0.0.6 <-> workload on the server node) enter the sockhash.

use std::time::Duration;

use testhosts::{
    bpftool, require_privileges, sibling_binary, start_checkout_orders, start_checkout_orders_with,
    MeshCa, Meshd, TestNet, WorkloadSpec,
};

const WAIT: Duration = Duration::from_secs(60);

fn event(meshd: &Meshd, net: &TestNet, node: usize, name: &str) -> u64 {
    let series = format!("meshd_bpf_events{{event=\"{name}\"}} ");
    let text = meshd.metrics(net, node).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn bypass_carries_bytes_intact_and_in_order_across_the_mesh() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    let (a, b) =
        start_checkout_orders_with(&net, &ca, "ebpf", "24h", "  sk_msg_bypass: true\n").unwrap();
    let target = format!("{}:7000", net.node(1).addr);
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let mut connections = 0;
    // One byte, 1 MiB each on 4 connections at once, 64 connections at once.
    for (bytes, conns) in [(1, 1), (1 << 20, 4), (1000, 64)] {
        let argv = [
            tool.as_str(),
            "client-nonblocking",
            &target,
            &bytes.to_string(),
            &conns.to_string(),
        ];
        let mut p = net.workload(0, "checkout", &argv).unwrap();
        let (status, out) = p.wait_output(WAIT).unwrap();
        assert!(status.success(), "{bytes} B x {conns}: {out}");
        assert!(out.contains(&format!("ok {conns} {bytes}")), "{out}");
        connections += conns as u64;
    }
    // meshd's own cgroup (the node's host cgroup here) carries sockops while meshd runs.
    let own = net.cgroup().join("host-n0");
    assert!(
        attached(&own).contains("mesh_sockops"),
        "{}",
        attached(&own)
    );
    for (meshd, node) in [(&a, 0), (&b, 1)] {
        let sockets = event(meshd, &net, node, "bypass_sockets");
        let kept = event(meshd, &net, node, "bypass_kept_on_tcp");
        eprintln!("node {node}: {sockets} sockets, {kept} kept on TCP, {connections} connections");
        // Both ends of each connection's local hop; a connection whose first bytes beat its
        // peer into the map stays on TCP (counted), which must stay the exception.
        assert!(
            sockets >= 2 * connections,
            "node {node}: {sockets} sockets for {connections} connections"
        );
        assert!(
            kept * 4 < connections,
            "node {node}: {kept} of {connections} connections kept on TCP"
        );
    }
    // Its link is not pinned: it goes with meshd, even a killed one.
    let mut a = a;
    a.process.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = a.process.wait_output(WAIT);
    assert!(!attached(&own).contains("mesh_"), "{}", attached(&own));
}

fn attached(cgroup: &std::path::Path) -> String {
    bpftool(&["cgroup", "show", cgroup.to_str().unwrap()])
}

/// Per workload: an event-driven workload opts in while a workload with blocking threads (the
/// kind the kernel's sockmap receive path can answer EAGAIN: one thread blocked in read while
/// another half-closes) keeps plain TCP on the same node, and both work.
#[test]
fn a_workload_opts_in_while_another_keeps_tcp() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    let client = [
        WorkloadSpec {
            name: "checkout",
            ports: &[],
        },
        WorkloadSpec {
            name: "legacy",
            ports: &[],
        },
    ];
    let server = [WorkloadSpec {
        name: "orders",
        ports: &[7000],
    }];
    let mut config = net
        .meshd_config(0, &client, &ca.config(0, "24h", &[]))
        .unwrap();
    let opt_in = "- name: checkout\n";
    assert!(config.contains(opt_in), "{config}");
    config = config.replace(opt_in, "- name: checkout\n  sk_msg_bypass: true\n");
    let mut a = net.spawn_meshd(0, "ebpf", &config).unwrap();
    a.process
        .expect_line_containing("meshd ready", WAIT)
        .unwrap();
    let _b = net
        .start_meshd_with(1, "ebpf", &server, &ca.config(1, "24h", &[]))
        .unwrap();
    let target = format!("{}:7000", net.node(1).addr);
    let tool = sibling_binary("testhosts-tool").display().to_string();
    for (workload, mode) in [("checkout", "client-nonblocking"), ("legacy", "client")] {
        let argv = [tool.as_str(), mode, &target, "100000", "8"];
        let mut p = net.workload(0, workload, &argv).unwrap();
        let (status, out) = p.wait_output(WAIT).unwrap();
        assert!(status.success(), "{workload}: {out}");
        assert!(out.contains("ok 8 100000"), "{out}");
    }
    // checkout's 8 sockets and meshd's 16 accepted ones; legacy's stay out, so meshd's ends of
    // those 8 connections find no peer and keep TCP.
    let sockets = event(&a, &net, 0, "bypass_sockets");
    let kept = event(&a, &net, 0, "bypass_kept_on_tcp");
    assert_eq!(sockets, 24, "{}", a.process.output_so_far().join("\n"));
    assert!((8..12).contains(&kept), "{kept} connections kept on TCP");
}

#[test]
fn without_the_switch_no_socket_enters_the_bypass() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    let (a, _b) = start_checkout_orders(&net, &ca, "ebpf", "24h").unwrap();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let target = format!("{}:7000", net.node(1).addr);
    let argv = [tool.as_str(), "client", &target, "1000", "8"];
    let mut p = net.workload(0, "checkout", &argv).unwrap();
    let (status, out) = p.wait_output(WAIT).unwrap();
    assert!(status.success(), "{out}");
    assert!(event(&a, &net, 0, "steered") >= 8);
    assert_eq!(event(&a, &net, 0, "bypass_sockets"), 0);
}
