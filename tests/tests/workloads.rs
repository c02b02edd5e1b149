//! Which processes meshd captures and as which workload: a process in a child cgroup of a
//! configured workload's cgroup (a container below its pod's group, a worker pool in a group of
//! its own) is that workload, with its identity; the node's other processes (kubelet, sshd) are
//! never captured. Both modes.

use std::time::Duration;

use testhosts::{require_privileges, sibling_binary, OrdersNet};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_process_in_a_child_cgroup_belongs_to_its_workload() {
    require_privileges!();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    for mode in ["ebpf", "iptables"] {
        let on = OrdersNet::new("0.0.0.0:7000").unwrap();
        let (net, target) = (&on.net, &on.target);
        let (mut a, mut b) = on.start_mesh(mode).unwrap();
        let argv = [tool.as_str(), "client", target, "100", "1"];
        for cgroup in ["checkout/worker", "checkout/pool/worker-1"] {
            let (status, out) = net
                .workload(0, cgroup, &argv)
                .unwrap()
                .wait_output(WAIT)
                .unwrap();
            assert!(status.success(), "{mode}: {cgroup}: {out}");
        }
        // Both connections left as checkout, over mTLS with checkout's SVID.
        a.wait_access(
            &[
                "direction=outbound",
                "workload=default/checkout",
                "transport=hbone",
            ],
            2,
        )
        .unwrap();
        b.wait_access(&["direction=inbound", "peer=spiffe://", "/sa/checkout"], 2)
            .unwrap();
    }
}

/// A node process outside every workload cgroup connects as if meshd were not there (no access
/// line; it would otherwise be refused as a sender of no workload), while the workload beside it
/// is captured.
#[test]
fn only_configured_workloads_are_captured() {
    require_privileges!();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    for mode in ["ebpf", "iptables"] {
        let on = OrdersNet::new("0.0.0.0:7000").unwrap();
        let net = &on.net;
        let _other = net.echo_server(1, None, "0.0.0.0:7100").unwrap();
        let (mut a, _b) = on.start_mesh(mode).unwrap();
        let client = |port: u16| {
            let target = format!("{}:{port}", net.node(1).addr);
            [
                tool.clone(),
                "client".into(),
                target,
                "100".into(),
                "1".into(),
            ]
        };
        let node_process = client(7100);
        let argv: Vec<&str> = node_process.iter().map(String::as_str).collect();
        net.exec(0, &argv).unwrap();
        let workload = client(7000);
        let argv: Vec<&str> = workload.iter().map(String::as_str).collect();
        let (status, out) = net
            .workload(0, "checkout", &argv)
            .unwrap()
            .wait_output(WAIT)
            .unwrap();
        assert!(status.success(), "{mode}: {out}");
        a.wait_access(&["direction=outbound", "dst=198.18.0.2:7000"], 1)
            .unwrap();
        let lines = a.access_lines();
        assert!(
            !lines.iter().any(|l| l.contains(":7100")),
            "{mode}: the node process was captured: {lines:#?}"
        );
    }
}
