//! Faults on the path: the peer node's meshd dies in the middle of a stream. The application
//! on this node sees its connection end (not hang), new connections fail while the peer is
//! gone (never delivered around the mesh), and the pool reconnects once the peer is back.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testhosts::{require_privileges, sibling_binary, Capture, MeshCa, TestNet, WorkloadSpec};

const WAIT: Duration = Duration::from_secs(30);
/// Application bytes the packet capture looks for (`tests/tests/mesh.rs` shows the capture
/// sees it when the mesh is off).
const MARKER: &str = "MESHD-FAULT-MARKER-51c2";

/// Holds one connection to the echo server: an exchange, then it waits (up to 60 s) for the
/// connection to end and says how long that took.
const HOLDING_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7000), timeout=60)
s.sendall(b"x" * 1000)
got = 0
while got < 1000:
    got += len(s.recv(65536))
print("open", flush=True)
start = time.time()
try:
    while s.recv(65536):
        pass
    how = "closed"
except OSError as e:
    how = "reset" if e.errno == 104 else "error %s" % e
print("%s after %.2f s" % (how, time.time() - start), flush=True)
"#;

#[test]
fn peer_meshd_dies_mid_stream_then_the_pool_recovers() {
    require_privileges!();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
        let client = [WorkloadSpec {
            name: "checkout",
            ports: &[],
        }];
        let server = [WorkloadSpec {
            name: "orders",
            ports: &[7000],
        }];
        let _a = net
            .start_meshd_with(0, mode, &client, &ca.config(0, "24h", &[]))
            .unwrap();
        let mut b = net
            .start_meshd_with(1, mode, &server, &ca.config(1, "24h", &[]))
            .unwrap();
        let target = net.node(1).addr.to_string();
        let mut held = net
            .workload(0, "checkout", &["python3", "-c", HOLDING_CLIENT, &target])
            .unwrap();
        held.expect_line("open", WAIT).unwrap();

        b.process.signal(Signal::SIGKILL).unwrap();
        let _ = b.process.wait_output(WAIT);
        let ended = held.expect_line_containing(" after ", WAIT).unwrap();
        let secs: f64 = ended.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(
            secs < 5.0,
            "{mode}: the application's connection hung: {ended}"
        );

        // While the peer is gone: refused, not delivered in plaintext around the mesh.
        let tool = sibling_binary("testhosts-tool").display().to_string();
        let send = [
            tool.as_str(),
            "client",
            &format!("{target}:7000"),
            "100",
            "1",
            MARKER,
        ];
        let tcpdump = Capture::start(&net, 0).unwrap();
        let (status, out) = net
            .workload(0, "checkout", &send)
            .unwrap()
            .wait_output(WAIT)
            .unwrap();
        assert!(
            !status.success(),
            "{mode}: delivered without the peer's meshd: {out}"
        );
        let plaintext = tcpdump.saw(MARKER).unwrap();
        assert!(!plaintext, "{mode}: the marker crossed in plaintext");

        // The peer returns: the next connections go through a new tunnel.
        let _b = net
            .start_meshd_with(1, mode, &server, &ca.config(1, "24h", &[]))
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, out) = net
                .workload(0, "checkout", &send)
                .unwrap()
                .wait_output(WAIT)
                .unwrap();
            if status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "{mode}: never recovered: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("figure: {mode}: peer meshd killed: the held application connection {ended}");
    }
}
