//! meshd's lifecycle on a node: a clean stop (SIGTERM) and a crash (kill -9) both leave the
//! interception failing closed, and `meshd cleanup` then leaves no program, link, pinned object,
//! rule or reserved port behind; misconfiguration
//! stops it at start with a message that names the problem.

use std::{path::Path, process::Command, time::Duration};

use nix::sys::signal::Signal;
use testhosts::{bpftool, meshd_bin, require_privileges, Meshd, TestNet, WorkloadSpec};

const WAIT: Duration = Duration::from_secs(30);
const MODES: [&str; 2] = ["ebpf", "iptables"];
const ORDERS: [WorkloadSpec; 1] = [WorkloadSpec {
    name: "orders",
    ports: &[7000],
}];

/// Everything meshd may have installed for this node, described; empty when nothing is left.
fn installed(net: &TestNet, meshd: &Meshd) -> Vec<String> {
    let mut left = Vec::new();
    let pins = std::fs::read_dir(&meshd.pin_dir)
        .map(|d| d.count())
        .unwrap_or(0);
    if pins > 0 {
        left.push(format!(
            "{pins} pinned objects in {}",
            meshd.pin_dir.display()
        ));
    }
    let cgroup = net.cgroup().join("orders");
    let attached = bpftool(&["cgroup", "show", cgroup.to_str().unwrap()]);
    if attached.contains("mesh_") {
        left.push(format!("programs on the workload cgroup: {attached}"));
    }
    let netns_ino = std::fs::metadata(net.node(0).netns_path()).unwrap();
    let ino = std::os::linux::fs::MetadataExt::st_ino(&netns_ino);
    let links = bpftool(&["link", "show"]);
    if links.contains(&format!("netns_ino {ino}")) {
        left.push(format!("a link on the node's network namespace: {links}"));
    }
    let nat = net.exec(0, &["iptables-save", "-t", "nat"]).unwrap();
    let filter6 = net.exec(0, &["ip6tables-save", "-t", "filter"]).unwrap();
    if nat.contains("MESH") || filter6.contains("MESH6") {
        left.push(format!("iptables rules: {nat}{filter6}"));
    }
    // The node's namespace starts with no reserved port; meshd reserves its own.
    let reserved = net
        .exec(0, &["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
        .unwrap();
    if !reserved.trim().is_empty() {
        left.push(format!("reserved ports: {}", reserved.trim()));
    }
    left
}

/// Runs `meshd cleanup` in node 0 and expects nothing of meshd's to be left.
fn cleanup_removes_everything(net: &TestNet, meshd: &mut Meshd, mode: &str) {
    let out = meshd.uninstall().unwrap();
    assert_eq!(installed(net, meshd), Vec::<String>::new(), "{mode}: {out}");
}

/// SIGTERM drains and exits, leaving the interception for the next meshd (a plaintext client
/// is refused meanwhile); `meshd cleanup` is what removes it.
#[test]
fn sigterm_leaves_interception_failing_closed_and_cleanup_removes_it() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(2).unwrap();
        let _server = net.echo_server(0, Some("orders"), "0.0.0.0:7000").unwrap();
        let mut meshd = net.start_meshd(0, mode, &ORDERS).unwrap();
        let running = installed(&net, &meshd);
        // ebpf: pins, cgroup programs, the netns link; iptables: the rules; both: reserved ports.
        let expected = if mode == "ebpf" { 4 } else { 2 };
        assert_eq!(running.len(), expected, "{mode}: {running:#?}");
        meshd.process.signal(Signal::SIGTERM).unwrap();
        let (status, log) = meshd.process.wait_output(WAIT).unwrap();
        assert!(status.success(), "{mode}: {log}");
        assert!(log.contains("interception left in place"), "{mode}: {log}");
        assert_eq!(installed(&net, &meshd).len(), expected, "{mode}");
        let tool = testhosts::sibling_binary("testhosts-tool");
        let target = format!("{}:7000", net.node(0).addr);
        let around = net.exec(1, &[tool.to_str().unwrap(), "client", &target, "100", "1"]);
        assert!(
            around.is_err(),
            "{mode}: served around a stopped meshd: {around:?}"
        );
        cleanup_removes_everything(&net, &mut meshd, mode);
    }
}

#[test]
fn kill_9_then_cleanup_removes_everything() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(2).unwrap();
        let mut meshd = net.start_meshd(0, mode, &ORDERS).unwrap();
        meshd.process.signal(Signal::SIGKILL).unwrap();
        let _ = meshd.process.wait_output(WAIT);
        // A crashed meshd leaves its interception in place: connections fail rather than
        // bypass the mesh.
        assert!(
            !installed(&net, &meshd).is_empty(),
            "{mode}: nothing left after kill -9?"
        );
        cleanup_removes_everything(&net, &mut meshd, mode);
    }
}

/// Starts meshd with `config` and expects it to exit non-zero naming `problem`.
fn expect_start_failure(net: &TestNet, mode: &str, config: &str, problem: &str) {
    let mut meshd = net.spawn_meshd(0, mode, config).unwrap();
    let (status, log) = meshd.process.wait_output(WAIT).unwrap();
    assert!(
        !status.success(),
        "{mode}: meshd started with a bad config:\n{log}"
    );
    assert!(
        log.contains(problem),
        "{mode}: wanted {problem:?} in:\n{log}"
    );
    assert_eq!(
        installed(net, &meshd),
        Vec::<String>::new(),
        "{mode}: left state behind"
    );
}

#[test]
fn misconfiguration_stops_meshd_with_a_message_naming_the_problem() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(1).unwrap();
        let good = net.meshd_config(0, &ORDERS, "").unwrap();
        let missing = good.replace("/orders", "/no-such-cgroup");
        let problem = "config workloads[0].cgroup";
        expect_start_failure(&net, mode, &missing, problem);
        let bad_cidr = format!("{good}exclude:\n  cidrs: [10.1.2.3/8]\n");
        expect_start_failure(&net, mode, &bad_cidr, "config exclude.cidrs[0]");
        let billing = [
            ORDERS[0],
            WorkloadSpec {
                name: "billing",
                ports: &[7000],
            },
        ];
        let shared_port = net.meshd_config(0, &billing, "").unwrap();
        let problem =
            "config workloads[1].ports[0]: port 7000 is also served by workload \"orders\"";
        expect_start_failure(&net, mode, &shared_port, problem);
        let mut squatter = net
            .host_process(0, &["python3", "-c", SQUAT_15001])
            .unwrap();
        squatter.expect_line("listening", WAIT).unwrap();
        expect_start_failure(&net, mode, &good, "cannot listen on 127.0.0.1:15001");
    }
}

/// Holds 127.0.0.1:15001 open until killed.
const SQUAT_15001: &str = "import socket,time\n\
s=socket.socket(); s.bind(('127.0.0.1',15001)); s.listen()\n\
print('listening', flush=True)\ntime.sleep(600)";

#[test]
fn meshd_run_without_root_says_so() {
    require_privileges!();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(meshd_bin())
        .args(["run", "--mode=auto", "--config", "/nonexistent.yaml"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("needs root"), "{msg}");
    assert!(Path::new("/nonexistent.yaml").metadata().is_err());
}

/// A killed meshd leaves the workload's port captured: a client around the mesh is refused
/// (not served in plaintext), and the next meshd takes the pinned links over.
#[test]
fn sigkill_inbound_fails_closed_and_the_next_meshd_takes_over() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(2).unwrap();
        let _server = net.echo_server(0, Some("orders"), "0.0.0.0:7000").unwrap();
        let tool = testhosts::sibling_binary("testhosts-tool");
        let target = format!("{}:7000", net.node(0).addr);
        let client = [tool.to_str().unwrap(), "client", &target, "100", "1"];
        // Control: with no meshd at all the plaintext client is served.
        net.exec(1, &client).unwrap();
        let mut meshd = net.start_meshd(0, mode, &ORDERS).unwrap();
        meshd.process.signal(Signal::SIGKILL).unwrap();
        let _ = meshd.process.wait_output(WAIT);
        let around = net.exec(1, &client);
        assert!(
            around.is_err(),
            "{mode}: served around a dead meshd: {around:?}"
        );
        let mut next = net.start_meshd(0, mode, &ORDERS).unwrap();
        if mode == "ebpf" {
            let log = next.process.output_so_far().join("\n");
            assert!(log.contains("took over a link"), "{log}");
        }
    }
}

/// Polls the readiness endpoint every millisecond and prints each change of its answer
/// (`refused`, `503 <reason>`, `200 ...`) until it is 200.
const READINESS_POLLER: &str = r#"
import socket, time
last = None
deadline = time.time() + 25
while time.time() < deadline:
    try:
        s = socket.create_connection(("127.0.0.1", 15021), timeout=2)
        s.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        state = head.split(" ")[1] + " " + body.strip()
    except OSError:
        state = "refused"
    if state != last:
        print(state, flush=True)
        last = state
    if state.startswith("200"):
        break
    time.sleep(0.001)
"#;

/// Readiness is 503 (starting) from the moment meshd answers until its interception is
/// installed and its certificates exist, then 200; never 200 before.
#[test]
fn readiness_is_503_until_interception_and_certificates_exist() {
    require_privileges!();
    for mode in MODES {
        let net = TestNet::new(2).unwrap();
        let ca = testhosts::MeshCa::new(&net).unwrap();
        let mut poller = net
            .host_process(0, &["python3", "-c", READINESS_POLLER])
            .unwrap();
        // Polling before meshd starts (python takes longer to start than meshd to get ready).
        poller.expect_line("refused", WAIT).unwrap();
        let _meshd = net
            .start_meshd_with(0, mode, &ORDERS, &ca.config(0, "24h", &[]))
            .unwrap();
        let (_, seen) = poller.wait_output(WAIT).unwrap();
        let states: Vec<&str> = seen.lines().filter(|l| *l != "refused").collect();
        assert!(
            states.len() >= 2
                && states[0].starts_with("503 not ready: starting")
                && states.last().unwrap().starts_with("200"),
            "{mode}: readiness answers in order: {seen}"
        );
        assert_eq!(
            states.iter().filter(|s| s.starts_with("200")).count(),
            1,
            "{mode}: {seen}"
        );
        eprintln!("figure: {mode}: readiness answered {states:?}");
    }
}
