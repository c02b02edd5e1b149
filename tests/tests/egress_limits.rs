//! Egress policy and abuse limits end to end. Egress: a workload an egress policy selects
//! reaches only the destinations outside the mesh its rules allow (by address and port, or by
//! the host name its connection carries), a workload no policy selects follows `mesh.egress`.
//! Limits: a caller over its concurrent-connection limit is refused at the receiving meshd and
//! served again once a connection of its closes.

use std::time::Duration;

use testhosts::{
    policy::HTTP_SERVER, require_privileges, sibling_binary, start_checkout_orders_with, MeshCa,
    TestNet,
};

const WAIT: Duration = Duration::from_secs(30);

fn run(net: &TestNet, workload: &str, argv: &[&str]) -> (bool, String) {
    let mut p = net.workload(0, workload, argv).unwrap();
    let (status, out) = p.wait_output(WAIT).unwrap();
    (status.success(), out)
}

#[test]
fn egress_policy_allows_listed_destinations_only() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let _echo_a = net.echo_server(1, None, "0.0.0.0:7000").unwrap();
    let _echo_b = net.echo_server(1, None, "0.0.0.0:7001").unwrap();
    let mut http = net
        .host_process(1, &["python3", "-c", HTTP_SERVER, "outside"])
        .unwrap();
    http.expect_line("ready", WAIT).unwrap();
    let outside = net.node(1).addr.to_string();
    let workloads = [
        net.workload_yaml("www", "  ports: []\n  labels: {app: www}\n")
            .unwrap(),
        net.workload_yaml("batch", "  ports: []\n  labels: {app: batch}\n")
            .unwrap(),
    ]
    .concat();
    // No identity: node 1 is outside the mesh, every destination goes the egress way.
    let extra = format!(
        "egress_policies:\n- name: www-egress\n  selector: {{app: www}}\n  allow:\n  \
         - {{cidrs: [{outside}/32], ports: [7000]}}\n  - {{hosts: [api.good.test, \"*.trusted.test\"], ports: [8080]}}\n"
    );
    let config = net.meshd_config_yaml(0, &workloads, &extra).unwrap();
    let meshd = net.start_meshd_config(0, "ebpf", &config).unwrap();

    let echo = |workload: &str, port: u16| {
        let target = format!("{outside}:{port}");
        run(&net, workload, &[&tool, "client", &target, "100", "1"])
    };
    let (ok, out) = echo("www", 7000);
    assert!(ok, "allowed by address and port: {out}");
    let (ok, out) = echo("www", 7001);
    assert!(
        !ok,
        "www reached a port its egress policy does not list: {out}"
    );
    let (ok, out) = echo("batch", 7001);
    assert!(
        ok,
        "batch is selected by no policy: mesh.egress (passthrough) applies: {out}"
    );

    let url = format!("http://{outside}:8080/");
    let curl = |host: &str| {
        let header = format!("Host: {host}");
        run(
            &net,
            "www",
            &["curl", "-sS", "--max-time", "10", "-H", &header, &url],
        )
    };
    for host in ["api.good.test", "x.trusted.test", "API.GOOD.TEST:8080"] {
        let (ok, out) = curl(host);
        assert!(ok && out.contains("outside"), "{host}: {out}");
    }
    for host in [
        "attacker.test",
        "trusted.test",
        "api.good.test.attacker.test",
    ] {
        let (ok, out) = curl(host);
        assert!(!ok && !out.contains("outside"), "{host} reached: {out}");
    }
    let denied = r#"meshd_connections_rejected_total{direction="outbound",reason="egress_denied"}"#;
    assert!(meshd.metric_sum(&net, 0, &[denied]) >= 4.0);
}

/// Holds connections to the echo workload: three at once, then a fourth after closing one.
const HOLDER: &str = r#"
import socket, sys, time
addr = (sys.argv[1], 7000)
def echo(s, msg):
    try:
        s.sendall(msg)
        return s.recv(16)
    except OSError:
        return b"reset"
held = []
for i in range(3):
    s = socket.create_connection(addr, timeout=5)
    print(i, echo(s, b"x%d" % i), flush=True)
    held.append(s)
held[0].close()
time.sleep(0.5)
s = socket.create_connection(addr, timeout=5)
print(3, echo(s, b"x3"), flush=True)
"#;

#[test]
fn a_caller_over_its_connection_limit_is_refused_then_served_again() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    // Both meshd get the limit (a top-level key after `proxy:`); only the receiving side sees
    // inbound connections.
    let limits = "limits:\n  per_source:\n    max_connections: 2\n";
    let (_a, b) = start_checkout_orders_with(&net, &ca, "ebpf", "24h", limits).unwrap();
    let target = net.node(1).addr.to_string();
    let (ok, out) = run(&net, "checkout", &["python3", "-c", HOLDER, &target]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["0 b'x0'", "1 b'x1'", "2 b'reset'", "3 b'x3'"],
        "{out}"
    );
    let refused =
        r#"meshd_connections_rejected_total{direction="inbound",reason="source_connection_limit"}"#;
    assert_eq!(b.metric_sum(&net, 1, &[refused]), 1.0);
}
