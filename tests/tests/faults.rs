//! Faults on the path: the peer node's meshd dies in the middle of a stream (the application
//! on this node sees its connection end, not hang; new connections fail while the peer is gone,
//! never delivered around the mesh; the pool reconnects once the peer is back), and the local
//! meshd is killed under load (connections fail closed: not one application byte on the wire
//! in plaintext).

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

/// meshd on the sending node gets SIGKILL while a client makes connection after connection:
/// the connections before it succeed, the ones after it fail, and the capture never sees the
/// client's marker (its interception stays and steers to a dead listener).
#[test]
fn sigkill_under_load_fails_closed() {
    require_privileges!();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
        let (mut a, _b) = testhosts::start_checkout_orders(&net, &ca, mode, "24h").unwrap();
        let tool = sibling_binary("testhosts-tool").display().to_string();
        let target = format!("{}:7000", net.node(1).addr);
        let tcpdump = Capture::start(&net, 0).unwrap();
        let argv = [tool.as_str(), "loop", &target, "4", MARKER];
        let mut load = net.workload(0, "checkout", &argv).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        a.process.signal(Signal::SIGKILL).unwrap();
        let _ = a.process.wait_output(WAIT);
        let (_, out) = load.wait_output(WAIT).unwrap();
        let summary = out
            .lines()
            .find(|l| l.starts_with("loop ok"))
            .unwrap_or_default();
        let count = |word: &str| -> u64 {
            let at = summary.split_whitespace().skip_while(|w| *w != word).nth(1);
            at.and_then(|n| n.parse().ok()).unwrap_or(0)
        };
        assert!(
            count("ok") > 0,
            "{mode}: nothing went through before the kill: {out}"
        );
        assert!(
            count("failed") > 0,
            "{mode}: connections still succeeded after the kill: {out}"
        );
        let plaintext = tcpdump.saw(MARKER).unwrap();
        assert!(
            !plaintext,
            "{mode}: the marker crossed in plaintext after meshd died"
        );
        eprintln!("figure: {mode}: meshd SIGKILLed under load: {summary}");
    }
}
