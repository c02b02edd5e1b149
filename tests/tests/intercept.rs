//! Transparent interception end to end, in both modes: a workload on node 0 talks to a server
//! on node 1 by its address and meshd sits in between without the application noticing; a
//! client on node 1 reaching a workload port on node 0 arrives through :15006.

use std::time::Duration;

use testhosts::{require_privileges, sibling_binary, Meshd, TestNet, WorkloadSpec};

const WAIT: Duration = Duration::from_secs(30);
const MODES: [&str; 2] = ["ebpf", "iptables"];

fn tool() -> String {
    sibling_binary("testhosts-tool").display().to_string()
}

/// Runs a client workload and returns its output; fails the test if the echo check failed.
fn run_client(
    net: &TestNet,
    node: usize,
    cgroup: Option<&str>,
    target: &str,
    bytes: usize,
    conns: usize,
) -> String {
    let tool = tool();
    let (bytes, conns) = (bytes.to_string(), conns.to_string());
    let argv = [tool.as_str(), "client", target, &bytes, &conns];
    let mut client = match cgroup {
        Some(name) => net.workload(node, name, &argv).unwrap(),
        None => net.host_process(node, &argv).unwrap(),
    };
    let (status, out) = client.wait_output(WAIT).unwrap();
    assert!(
        status.success(),
        "client {target} {bytes}x{conns} failed:\n{out}"
    );
    assert!(out.contains(&format!("ok {conns} {bytes}")), "{out}");
    out
}

fn echo_server(net: &TestNet, node: usize, workload: Option<&str>) -> testhosts::Process {
    net.echo_server(node, workload, "0.0.0.0:7000").unwrap()
}

fn checkout(net: &TestNet, mode: &str) -> Meshd {
    let spec = [WorkloadSpec {
        name: "checkout",
        ports: &[],
    }];
    net.start_meshd(0, mode, &spec).unwrap()
}

#[test]
fn outbound_bytes_arrive_intact_through_meshd_in_both_modes() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(2).unwrap();
        let _server = echo_server(&net, 1, None);
        let mut meshd = checkout(&net, mode);
        let target = format!("{}:7000", net.node(1).addr);
        // An IPv6 socket dialling the v4-mapped address is steered like an IPv4 one.
        let mapped = format!("[::ffff:{}]:7000", net.node(1).addr);
        let runs = [
            (&target, 1, 1),
            (&target, 1 << 20, 1),
            (&target, 4096, 64),
            (&mapped, 999, 1),
        ];
        for (dst, bytes, conns) in runs {
            let out = run_client(&net, 0, Some("checkout"), dst, bytes, conns);
            // The application's getpeername() sees where it connected, not 127.0.0.1:15001.
            assert!(out.contains(&format!("peer {dst}")), "{mode}: {out}");
        }
        let dst = format!("dst={target}");
        let needles = ["direction=outbound", "workload=default/checkout", &dst];
        let lines = meshd.wait_access(&needles, 67).unwrap();
        let mode_field = format!("mode={mode}");
        assert!(
            lines.iter().all(|l| l.contains(&mode_field)),
            "{mode}: {lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("bytes_sent=1048576")),
            "{mode}"
        );
        assert!(
            lines.iter().any(|l| l.contains("bytes_sent=999")),
            "{mode}: v4-mapped"
        );
        // Exactly the 67 client connections: meshd's own upstream dials were not captured again.
        let all = meshd.access_lines();
        assert_eq!(all.len(), 67, "{mode}: {all:?}");
        let metrics = meshd.metrics(&net, 0).unwrap();
        let counter = format!(
            "meshd_connections_total{{direction=\"outbound\",mode=\"{mode}\",transport=\"plaintext\"}} 67"
        );
        assert!(metrics.contains(&counter), "{mode}: {metrics}");
        // meshd's ports are kept out of the node's ephemeral range.
        let reserved = net.exec(0, &["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]);
        assert!(reserved.unwrap().contains("15001"), "{mode}");
        if mode == "ebpf" {
            let fill = "meshd_bpf_map_entries{map=\"ORIG_DST_BY_TUPLE\"}";
            assert!(
                metrics.contains(fill),
                "map fill level is reported: {metrics}"
            );
        }
    }
}

#[test]
fn a_process_outside_the_workload_cgroups_is_not_steered() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let _server = echo_server(&net, 1, None);
    let mut meshd = checkout(&net, "ebpf");
    let target = format!("{}:7000", net.node(1).addr);
    run_client(&net, 0, None, &target, 1000, 3);
    run_client(&net, 0, Some("checkout"), &target, 1000, 1);
    meshd
        .wait_access(&["workload=default/checkout"], 1)
        .unwrap();
    assert_eq!(meshd.access_lines().len(), 1, "{:?}", meshd.access_lines());
}

#[test]
fn excluded_ports_and_cidrs_are_not_intercepted_in_both_modes() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(3).unwrap();
        let tool = tool();
        let mut servers = Vec::new();
        for (node, port) in [(1, "7000"), (1, "7001"), (2, "7000")] {
            let listen = format!("0.0.0.0:{port}");
            let mut s = net
                .host_process(node, &[&tool, "echo-server", &listen])
                .unwrap();
            s.expect_line("ready", WAIT).unwrap();
            servers.push(s);
        }
        let spec = [WorkloadSpec {
            name: "checkout",
            ports: &[],
        }];
        let extra = format!(
            "exclude:\n  ports: [7001]\n  cidrs: [{}/32]\n",
            net.node(2).addr
        );
        let mut meshd = net.start_meshd_with(0, mode, &spec, &extra).unwrap();
        let (b, c) = (net.node(1).addr, net.node(2).addr);
        for target in [
            format!("{b}:7001"),
            format!("{c}:7000"),
            format!("{b}:7000"),
        ] {
            run_client(&net, 0, Some("checkout"), &target, 100, 1);
        }
        let lines = meshd.wait_access(&[&format!("dst={b}:7000")], 1).unwrap();
        assert_eq!(
            meshd.access_lines(),
            lines,
            "{mode}: only the non-excluded one is proxied"
        );
    }
}

#[test]
fn native_ipv6_traffic_still_flows_unsteered() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let tool = tool();
    let mut server = net
        .host_process(1, &[&tool, "echo-server", "[::]:7000"])
        .unwrap();
    server.expect_line("ready", WAIT).unwrap();
    let mut meshd = checkout(&net, "ebpf");
    let target = format!("[{}]:7000", net.node(1).addr6);
    let out = run_client(&net, 0, Some("checkout"), &target, 5000, 2);
    assert!(out.contains(&format!("peer {target}")), "{out}");
    assert!(
        meshd.access_lines().is_empty(),
        "{:?}",
        meshd.access_lines()
    );
}

#[test]
fn inbound_connections_to_a_workload_port_arrive_via_15006_in_both_modes() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(2).unwrap();
        let mut server = echo_server(&net, 0, Some("orders"));
        let spec = [WorkloadSpec {
            name: "orders",
            ports: &[7000],
        }];
        // Plaintext from outside the mesh is only forwarded when PERMISSIVE.
        let permissive = "peer_authentication:\n- spec: {mtls: {mode: PERMISSIVE}}\n";
        let mut meshd = net.start_meshd_with(0, mode, &spec, permissive).unwrap();
        let target = format!("{}:7000", net.node(0).addr);
        run_client(&net, 1, None, &target, 100_000, 8);
        let needles = [
            "direction=inbound",
            "workload=default/orders",
            &format!("dst={target}"),
        ];
        meshd.wait_access(&needles, 8).unwrap();
        // meshd delivered them, from its delivery address.
        let accepted = server.output_so_far();
        let via_meshd = accepted
            .iter()
            .filter(|l| l.starts_with("accepted 127.0.0.6:"))
            .count();
        assert_eq!(via_meshd, 8, "{mode}: {accepted:?}");
    }
}
