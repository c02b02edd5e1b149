//! The mesh beyond one node: three meshd and a real etcd (Debian's etcd-server, authentication
//! on, one user per node that may write only its own part) on a fourth test node. Pods on every
//! node register themselves; a pod on node 0 reaches a pod on node 1 by its IP, verified against
//! the identity the registry gives, and a Service address that resolves to pods on nodes 1 and
//! 2 (both get traffic). A registration that names the wrong identity for an address makes the
//! connection fail; etcd killed, meshd serves from what it knew and says so; etcd back, what
//! changed meanwhile arrives; a pod moved to another node is known within a second of its ADD;
//! a node whose meshd dies vanishes when its lease ends.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use testhosts::{
    etcd::{Etcd, ROOT},
    handpods::{cni, cni_labelled, hand_pod, pods_config, route_pod_subnets, run_in_pod, HandPod},
    in_ci, require_privileges, require_tools, sibling_binary, MeshCa, Meshd, Process, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);
const VIP: &str = "198.18.100.1:80";
const SERVICE: &str = r#"{"name":"orders","namespace":"shop","address":"198.18.100.1","ports":[{"port":80,"target_port":7000}],"selector":{"app":"orders"}}"#;
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn tool() -> String {
    sibling_binary("testhosts-tool").display().to_string()
}

/// GET `url` inside `node`.
fn admin(net: &TestNet, node: usize, url: &str) -> String {
    net.http_get(node, url).unwrap()
}

/// The addresses node's registry holds from the shared source, and its Service endpoints.
fn registry(net: &TestNet, node: usize) -> (Vec<String>, Vec<String>) {
    let dump: Value =
        serde_json::from_str(&admin(net, node, "http://127.0.0.1:15000/config_dump")).unwrap();
    let reg = &dump["registry"];
    let shared = (reg["shared"].as_array().unwrap().iter())
        .map(|w| {
            format!(
                "{} {}",
                w["address"].as_str().unwrap(),
                w["spiffe_id"].as_str().unwrap()
            )
        })
        .collect();
    let endpoints = (reg["services"].as_array().unwrap().iter())
        .flat_map(|s| s["endpoints"].as_array().unwrap().clone())
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    (shared, endpoints)
}

/// Waits until `check` holds for node's registry; how long it took.
fn wait_registry(
    net: &TestNet,
    node: usize,
    what: &str,
    check: impl Fn(&[String], &[String]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let (shared, endpoints) = registry(net, node);
        if check(&shared, &endpoints) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: node {node} registry: {shared:?} {endpoints:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One connection from `pod` to `target` carrying `payload`; whether it was echoed.
fn connect(pod: &HandPod, target: &str) -> (bool, String) {
    let tool = tool();
    let mut client = run_in_pod(
        pod,
        &[&tool, "client", target, "2000", "1", "REGISTRY-MARKER"],
    );
    let (status, out) = client.wait_output(WAIT).unwrap();
    (status.success(), out)
}

/// A pod on `node` labelled `app`, announced to that node's meshd, serving an echo on :7000.
fn orders_pod(
    net: &TestNet,
    node: usize,
    k: usize,
    name: &str,
    socket: &str,
) -> (HandPod, Process) {
    let pod = hand_pod(net, node, k);
    let (ok, out) = cni_labelled("ADD", &pod, name, "app:orders", socket);
    assert!(ok, "ADD {name}: {out}");
    let tool = tool();
    let mut server = run_in_pod(&pod, &[&tool, "echo-server", "0.0.0.0:7000"]);
    server.expect_line("ready", WAIT).unwrap();
    (pod, server)
}

/// meshd on nodes 0..n serving pods, registered in `etcd` with a lease of `lease`; their CNI
/// sockets.
fn start_nodes(
    net: &TestNet,
    ca: &MeshCa,
    etcd: &Etcd,
    n: usize,
    mode: &str,
    lease: &str,
) -> (Vec<Meshd>, Vec<String>) {
    let mut meshd = Vec::new();
    let mut sockets = Vec::new();
    for node in 0..n {
        let (config, socket) = pods_config(net, ca, node, "");
        let config = format!("{config}{}", etcd.config(&format!("n{node}"), lease));
        meshd.push(net.start_meshd_with(node, mode, &[], &config).unwrap());
        sockets.push(socket);
    }
    (meshd, sockets)
}

fn endpoint_of(line: &str) -> &str {
    field(line, "endpoint=")
}

/// The value of `name` (`key=`) in an access line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let at = line
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len();
    line[at..].split_whitespace().next().unwrap()
}

#[test]
fn pods_on_three_nodes_find_each_other_and_services_through_etcd() {
    require_privileges!();
    if let Err(e) = require_tools(&["etcd", "etcdctl"]) {
        assert!(!in_ci(), "the registry test cannot run under CI: {e}");
        eprintln!("skipping: {e}");
        return;
    }
    for mode in ["ebpf", "iptables"] {
        println!("== {mode}");
        three_nodes_and_etcd(mode);
    }
}

fn three_nodes_and_etcd(mode: &str) {
    let net = TestNet::new(4).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    route_pod_subnets(&net);
    let mut etcd = Etcd::start(&net, 3).unwrap();
    etcd.enable_auth(&net, &["n0", "n1", "n2"]).unwrap();
    etcd.ctl(
        &net,
        Some(ROOT),
        &["put", "/meshd/services/shop/orders", SERVICE],
    )
    .unwrap();
    // A node's user writes only below its own part.
    let forged = ["put", "/meshd/nodes/n2/workloads/shop/x", "{}"];
    let refused = etcd.ctl(&net, Some(&etcd.user("n1")), &forged);
    let why = refused
        .map_err(|e| format!("{e:#}"))
        .expect_err("n1 wrote n2's part");
    assert!(why.contains("permission denied"), "{why}");

    let (mut meshd, sockets) = start_nodes(&net, &ca, &etcd, 3, mode, "3s");
    let web = hand_pod(&net, 0, 0);
    let (ok, out) = cni("ADD", &web, "web", &sockets[0]);
    assert!(ok, "ADD web: {out}");
    let (b1, _s1) = orders_pod(&net, 1, 0, "orders-1", &sockets[1]);
    let (_b2, _s2) = orders_pod(&net, 2, 0, "orders-2", &sockets[2]);
    let b1_target = format!("{}:7000", b1.ip);
    wait_registry(&net, 0, "both orders pods known", |_, endpoints| {
        endpoints.len() == 2
    });

    // By pod IP: verified against the identity node 1 registered; node 1 names the caller.
    let (ok, out) = connect(&web, &b1_target);
    assert!(ok, "web -> orders-1 by IP: {out}");
    let out_line = &meshd[0]
        .wait_access(&["direction=outbound", &b1_target], 1)
        .unwrap()[0];
    assert!(
        out_line.contains("peer=spiffe://cluster.local/ns/shop/sa/orders-1"),
        "{out_line}"
    );
    assert!(out_line.contains("server_check=verified"), "{out_line}");
    let in_line = &meshd[1]
        .wait_access(&["direction=inbound", "transport=hbone"], 1)
        .unwrap()[0];
    assert!(in_line.contains(&format!("peer={WEB}")), "{in_line}");
    // Both sides name the stream by the same W3C trace id (the CONNECT's traceparent).
    let trace = |line: &str| field(line, "trace_id=").to_string();
    assert_eq!(trace(out_line), trace(in_line), "{out_line}\n{in_line}");
    assert_eq!(trace(out_line).len(), 32, "{out_line}");

    // By Service address: both nodes' pods get connections, each verified.
    for _ in 0..6 {
        let (ok, out) = connect(&web, VIP);
        assert!(ok, "web -> orders Service: {out}");
    }
    let lines = meshd[0].wait_access(&["service=shop/orders"], 6).unwrap();
    let mut endpoints: Vec<&str> = lines.iter().map(|l| endpoint_of(l)).collect();
    endpoints.sort();
    endpoints.dedup();
    assert_eq!(
        endpoints,
        ["198.19.1.2:7000", "198.19.2.2:7000"],
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| l.contains("server_check=verified")),
        "{lines:#?}"
    );

    wrong_identity_is_refused(&net, &etcd, &mut meshd[0], &web, &b1_target);
    let b3 = etcd_outage(&net, &mut etcd, &mut meshd[0], &web, &sockets[1]);
    moved_pod_is_known_within_a_second(&net, &b1, &sockets);
    dead_node_vanishes_with_its_lease(&net, &mut meshd, &web, &b3);
}

/// A registration naming another identity for orders-1's address (newer than node 1's): the
/// connection fails (orders-1 cannot prove that identity); removed, it works again.
fn wrong_identity_is_refused(
    net: &TestNet,
    etcd: &Etcd,
    m0: &mut Meshd,
    web: &HandPod,
    target: &str,
) {
    let rogue = r#"{"name":"fake","namespace":"shop","node":"rogue","address":"198.19.1.2","spiffe_id":"spiffe://cluster.local/ns/shop/sa/fake"}"#;
    let key = "/meshd/nodes/rogue/workloads/shop/fake";
    etcd.ctl(net, Some(ROOT), &["put", key, rogue]).unwrap();
    wait_registry(net, 0, "the rogue registration", |shared, _| {
        shared.iter().any(|s| s.ends_with("/sa/fake"))
    });
    let (ok, out) = connect(web, target);
    assert!(
        !ok,
        "a server that cannot prove the registered identity must be refused: {out}"
    );
    m0.wait_access(&["direction=outbound", target, "unexpected_identity"], 1)
        .unwrap_or_else(|e| {
            let lines = m0.process.output_so_far();
            assert!(
                lines.iter().any(|l| l.contains("unexpected_identity")),
                "{e:#}"
            );
            Vec::new()
        });
    etcd.ctl(net, Some(ROOT), &["del", key]).unwrap();
    wait_registry(net, 0, "the rogue registration gone", |shared, _| {
        !shared.iter().any(|s| s.ends_with("/sa/fake"))
    });
    let (ok, out) = connect(web, target);
    assert!(ok, "after the rogue registration is gone: {out}");
}

/// etcd killed: connections by IP and by Service keep working from the last known state and
/// readiness says so; a pod added meanwhile on node 1 reaches node 0 once etcd is back.
fn etcd_outage(
    net: &TestNet,
    etcd: &mut Etcd,
    m0: &mut Meshd,
    web: &HandPod,
    socket1: &str,
) -> HandPod {
    etcd.kill();
    let start = Instant::now();
    loop {
        let ready = admin(net, 0, "http://127.0.0.1:15021/healthz/ready");
        if ready.contains("registry: etcd unreachable") {
            assert!(ready.starts_with("ready"), "{ready}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "readiness never mentioned etcd: {ready}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for target in ["198.19.1.2:7000", VIP] {
        let (ok, out) = connect(web, target);
        assert!(ok, "{target} with etcd down: {out}");
    }
    let metrics = m0.metrics(net, 0).unwrap();
    assert!(
        metrics.contains("meshd_registry_connected{source=\"etcd\"} 0"),
        "{metrics}"
    );
    let (b3, server) = orders_pod(net, 1, 1, "orders-3", socket1);
    std::mem::forget(server); // serves until the net goes (its cgroup is the net's)
    etcd.run(net).unwrap();
    wait_registry(net, 0, "orders-3 after etcd's return", |_, endpoints| {
        endpoints.iter().any(|e| e == "198.19.1.3:7000")
    });
    let ready = admin(net, 0, "http://127.0.0.1:15021/healthz/ready");
    assert_eq!(ready.trim(), "ready");
    let watching: Vec<String> = (m0.process.output_so_far().into_iter())
        .filter(|l| l.contains("etcd connected and watching"))
        .collect();
    assert!(watching.len() >= 2, "{watching:?}");
    assert!(
        !watching.last().unwrap().contains("revision=0"),
        "resumed from its revision: {watching:?}"
    );
    b3
}

/// orders-1 deleted on node 1 and created again on node 2: node 0 knows the new address within
/// a second of the ADD, and forgets the old one.
fn moved_pod_is_known_within_a_second(net: &TestNet, b1: &HandPod, sockets: &[String]) {
    let (ok, out) = cni("DEL", b1, "orders-1", &sockets[1]);
    assert!(ok, "DEL orders-1: {out}");
    let moved = hand_pod(net, 2, 1);
    let (ok, out) = cni_labelled("ADD", &moved, "orders-1", "app:orders", &sockets[2]);
    assert!(ok, "ADD orders-1 on node 2: {out}");
    let took = wait_registry(net, 0, "orders-1 at its new address", |shared, _| {
        shared
            .iter()
            .any(|s| s.starts_with(&format!("{} ", moved.ip)))
            && !shared.iter().any(|s| s.starts_with("198.19.1.2 "))
    });
    println!(
        "orders-1 moved to node 2: known on node 0 {} ms after its ADD",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

/// Node 2's meshd killed: its pods leave node 0's registry when the lease (3 s) ends, and the
/// Service goes to node 1 only.
fn dead_node_vanishes_with_its_lease(
    net: &TestNet,
    meshd: &mut [Meshd],
    web: &HandPod,
    b3: &HandPod,
) {
    meshd[2].process.signal(Signal::SIGKILL).unwrap();
    let took = wait_registry(net, 0, "node 2's pods gone", |shared, _| {
        !shared.iter().any(|s| s.starts_with("198.19.2."))
    });
    println!(
        "node 2's meshd killed: its pods left node 0's registry after {} ms",
        took.as_millis()
    );
    let service_lines = |m: &mut Meshd| -> Vec<String> {
        (m.access_lines().into_iter())
            .filter(|l| l.contains("service=shop/orders"))
            .collect()
    };
    let before = service_lines(&mut meshd[0]).len();
    for _ in 0..4 {
        let (ok, out) = connect(web, VIP);
        assert!(ok, "Service with node 2 gone: {out}");
    }
    meshd[0]
        .wait_access(&["service=shop/orders"], before + 4)
        .unwrap();
    let b3_endpoint = format!("{}:7000", b3.ip);
    for line in &service_lines(&mut meshd[0])[before..] {
        assert_eq!(endpoint_of(line), b3_endpoint, "{line}");
    }
}

/// The registry on an etcd cluster of three members over TLS: with any one member killed in
/// turn, a pod added meanwhile still reaches the other node.
#[test]
fn a_three_member_etcd_cluster_over_tls_survives_the_loss_of_any_member() {
    require_privileges!();
    if let Err(e) = require_tools(&["etcd", "etcdctl", "openssl"]) {
        assert!(
            !in_ci(),
            "the registry cluster test cannot run under CI: {e}"
        );
        eprintln!("skipping: {e}");
        return;
    }
    let net = TestNet::new(3).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    route_pod_subnets(&net);
    let mut etcd = Etcd::cluster(&net, 2, 3, true).unwrap();
    etcd.enable_auth(&net, &["n0", "n1"]).unwrap();
    let (mut meshd, sockets) = start_nodes(&net, &ca, &etcd, 2, "ebpf", "5s");
    let web = hand_pod(&net, 0, 0);
    let (ok, out) = cni("ADD", &web, "web", &sockets[0]);
    assert!(ok, "ADD web: {out}");
    let mut servers = Vec::new();
    for member in 0..3 {
        etcd.kill_member(member);
        let name = format!("orders-{member}");
        let (pod, server) = orders_pod(&net, 1, member, &name, &sockets[1]);
        servers.push(server);
        let ip = pod.ip.clone();
        let what = format!("{name} with member {member} down");
        wait_registry(&net, 0, &what, |shared, _| {
            shared.iter().any(|s| s.starts_with(&format!("{ip} ")))
        });
        let (ok, out) = connect(&web, &format!("{ip}:7000"));
        assert!(ok, "web -> {name} with member {member} down: {out}");
        etcd.run(&net).unwrap();
    }
    let lines = meshd[0]
        .wait_access(&["direction=outbound", "server_check=verified"], 3)
        .unwrap();
    assert_eq!(lines.len(), 3, "{lines:#?}");
}
