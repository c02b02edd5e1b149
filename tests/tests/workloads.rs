//! Which workload a connection belongs to: a process in a child cgroup of a configured
//! workload's cgroup (a container below its pod's group, a worker pool in a group of its own) is
//! that workload, with its identity, in both modes.

use std::time::Duration;

use testhosts::{require_privileges, sibling_binary, start_checkout_orders, MeshCa, TestNet};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_process_in_a_child_cgroup_belongs_to_its_workload() {
    require_privileges!();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
        let (mut a, mut b) = start_checkout_orders(&net, &ca, mode, "24h").unwrap();
        let target = format!("{}:7000", net.node(1).addr);
        let argv = [tool.as_str(), "client", &target, "100", "1"];
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
