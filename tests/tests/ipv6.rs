//! STRICT holds over IPv6: meshd proxies IPv4, so a new inbound IPv6 connection to a captured
//! workload port is refused (ebpf: sk_lookup drops it; iptables: ip6tables resets it), never
//! delivered in plaintext. The same client reaches the workload over IPv6 without the mesh, and
//! the capture sees its marker then, so the check can fail.

use std::time::Duration;

use testhosts::{require_privileges, sibling_binary, Capture, OrdersNet};

const MARKER: &str = "IPV6-STRICT-MARKER-93d0";
const WAIT: Duration = Duration::from_secs(30);

/// Connects to [argv 1]:7000 (3 s at most), sends the marker, expects its echo.
const ATTEMPT: &str = "import socket,sys\n\
s = socket.create_connection((sys.argv[1], 7000), timeout=3)\n\
s.sendall(b'IPV6-STRICT-MARKER-93d0')\n\
assert s.recv(100), 'no echo'\n\
print('echoed')";

#[test]
fn ipv6_strict_not_bypassed() {
    require_privileges!();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    for mode in ["ebpf", "iptables"] {
        // Dual stack: the workload accepts IPv4 and IPv6 on :7000.
        let on = OrdersNet::new("[::]:7000").unwrap();
        let net = &on.net;
        let v6 = format!("[{}]:7000", net.node(1).addr6);
        let client = [tool.as_str(), "client", &v6, "100", "1", MARKER];
        let control = Capture::start(net, 0).unwrap();
        net.exec(0, &client).unwrap();
        assert!(
            control.saw(MARKER).unwrap(),
            "{mode}: control missed the marker"
        );

        let (mut a, b) = on.start_mesh(mode).unwrap();
        let tcpdump = Capture::start(net, 0).unwrap();
        // ebpf mode drops the SYN (the client times out), iptables mode resets it.
        let addr6 = net.node(1).addr6.to_string();
        let attempt = ["python3", "-c", ATTEMPT, &addr6];
        let around = net.exec(0, &attempt);
        assert!(
            around.is_err(),
            "{mode}: served over IPv6 around the mesh: {around:?}"
        );
        let mut from_workload = net.workload(0, "checkout", &attempt).unwrap();
        let (status, out) = from_workload.wait_output(WAIT).unwrap();
        assert!(
            !status.success(),
            "{mode}: the workload reached it over IPv6: {out}"
        );
        // IPv4 through the mesh still works.
        let meshed = [tool.as_str(), "client", &on.target, "100", "1", MARKER];
        let (status, out) = net
            .workload(0, "checkout", &meshed)
            .unwrap()
            .wait_output(WAIT)
            .unwrap();
        assert!(status.success(), "{mode}: {out}");
        a.wait_access(&["direction=outbound", "transport=hbone"], 1)
            .unwrap();
        assert!(
            !tcpdump.saw(MARKER).unwrap(),
            "{mode}: the marker crossed in plaintext"
        );
        if mode == "ebpf" {
            let metrics = b.metrics(net, 1).unwrap();
            let line = metrics
                .lines()
                .find(|l| l.starts_with("meshd_bpf_events{event=\"inbound_ipv6_refused\"}"))
                .unwrap_or_default()
                .to_string();
            let n: f64 = line
                .split_whitespace()
                .last()
                .unwrap_or("0")
                .parse()
                .unwrap();
            assert!(n >= 2.0, "{mode}: refusals not counted: {line:?}");
        }
    }
}
