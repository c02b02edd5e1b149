//! SVIDs rotated every two seconds (4 s lifetime, renewed at half life) under a minute of
//! connection-per-request traffic: no request fails, and the receiving side sees the sender's
//! new serial numbers. A renewal that fails keeps the current certificate in use.

use std::{collections::BTreeSet, time::Duration};

use testhosts::{require_privileges, sibling_binary, start_checkout_orders, MeshCa, TestNet};

const WAIT: Duration = Duration::from_secs(120);

#[test]
fn certificates_rotate_under_load_without_a_failed_request() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    let (mut a, mut b) = start_checkout_orders(&net, &ca, "ebpf", "4s").unwrap();
    let target = format!("{}:7000", net.node(1).addr);

    let mut load = net
        .workload(0, "checkout", &[&tool, "loop", &target, "60"])
        .unwrap();
    let (status, out) = load.wait_output(WAIT).unwrap();
    assert!(status.success(), "{out}");
    let summary = out
        .lines()
        .find(|l| l.starts_with("loop ok"))
        .unwrap_or_default();
    let ok: u64 = summary
        .split(' ')
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ok > 100 && summary.ends_with("failed 0"), "{out}");

    let peer = "peer=spiffe://cluster.local/ns/default/sa/checkout";
    let lines = b
        .wait_access(&["transport=hbone", peer], ok as usize)
        .unwrap();
    let serials: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.split("peer_serial=").nth(1)?.split(' ').next())
        .collect();
    assert!(
        serials.len() >= 10,
        "peer saw {} serials in a minute: {serials:?}",
        serials.len()
    );
    let renewed = a
        .process
        .output_so_far()
        .iter()
        .filter(|l| l.contains("SVID renewed"))
        .count();
    assert!(renewed >= 20, "{renewed} renewals on the client node");

    // A renewal that fails (the node intermediate's key is unreadable) keeps the current
    // certificate: traffic goes on, the failure is logged and counted.
    let key = ca.dir.join("n0.key");
    let original = std::fs::read(&key).unwrap();
    std::fs::write(&key, "not a key").unwrap();
    a.process
        .expect_line_containing("SVID renewal failed; keeping the current certificate", WAIT)
        .unwrap();
    let mut during = net
        .workload(0, "checkout", &[&tool, "client", &target, "100", "4"])
        .unwrap();
    let (status, out) = during.wait_output(WAIT).unwrap();
    std::fs::write(&key, original).unwrap();
    assert!(status.success(), "{out}");
    let metrics = a.metrics(&net, 0).unwrap();
    assert!(
        metrics.contains("meshd_svid_renewals_total{result=\"failed\"}"),
        "{metrics}"
    );
}
