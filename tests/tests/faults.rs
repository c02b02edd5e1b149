//! Faults on the path: the peer node's meshd dies in the middle of a stream (the application
//! on this node sees its connection end, not hang; new connections fail while the peer is gone,
//! never delivered around the mesh; the pool reconnects once the peer is back), and the local
//! meshd is killed under load (connections fail closed: not one application byte on the wire
//! in plaintext).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testhosts::{
    loop_counts, require_privileges, sibling_binary, start_checkout_orders, Capture, MeshCa,
    TestNet, ORDERS,
};

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
        let (_a, mut b) = start_checkout_orders(&net, &ca, mode, "24h").unwrap();
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
            .start_meshd_with(1, mode, &ORDERS, &ca.config(1, "24h", &[]))
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
        let (mut a, _b) = start_checkout_orders(&net, &ca, mode, "24h").unwrap();
        let tool = sibling_binary("testhosts-tool").display().to_string();
        let target = format!("{}:7000", net.node(1).addr);
        let tcpdump = Capture::start(&net, 0).unwrap();
        let argv = [tool.as_str(), "loop", &target, "4", MARKER];
        let mut load = net.workload(0, "checkout", &argv).unwrap();
        // The load is flowing once meshd has logged a few of its connections.
        a.wait_access(&["direction=outbound"], 10).unwrap();
        a.process.signal(Signal::SIGKILL).unwrap();
        let _ = a.process.wait_output(WAIT);
        let (_, out) = load.wait_output(WAIT).unwrap();
        let (ok, failed) = loop_counts(&out);
        assert!(
            ok > 0,
            "{mode}: nothing went through before the kill: {out}"
        );
        assert!(
            failed > 0,
            "{mode}: connections still succeeded after the kill: {out}"
        );
        let plaintext = tcpdump.saw(MARKER).unwrap();
        assert!(
            !plaintext,
            "{mode}: the marker crossed in plaintext after meshd died"
        );
        eprintln!("figure: {mode}: meshd SIGKILLed under load: loop ok {ok} failed {failed}");
    }
}
