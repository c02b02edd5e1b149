//! Pods announced through the CNI plugin as a runtime calls it, with network namespaces the test
//! makes itself (the runtime-free half of the pod tests; `pods.rs` runs real podman pods):
//! meshd serves each pod from inside its namespace, in both modes, and ADD fails closed when
//! meshd is not there.

use std::{path::PathBuf, process::Command, time::Duration};

use testhosts::{
    meshd_bin, require_privileges, sibling_binary, MeshCa, Meshd, Process, TestNet, TestNode,
};

const WAIT: Duration = Duration::from_secs(30);

/// A pod made by hand as a runtime would: its own netns joined to the node by a veth, address
/// 198.19.<node>.<k+2>, a cgroup below the node's pods parent.
struct HandPod {
    node: TestNode,
    netns: String,
    ip: String,
    cgroup: PathBuf,
    id: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pods_parent(net: &TestNet, node: usize) -> PathBuf {
    let p = net.cgroup().join(format!("pods-n{node}"));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Routes for pod subnets: every node reaches 198.19.<m>.0/24 through node m.
fn route_pod_subnets(net: &TestNet) {
    for n in net.nodes() {
        ip(&[
            "netns",
            "exec",
            &n.netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        for m in net.nodes().iter().filter(|m| m.index != n.index) {
            let subnet = format!("198.19.{}.0/24", m.index);
            ip(&[
                "-n",
                &n.netns,
                "route",
                "add",
                &subnet,
                "via",
                &m.addr.to_string(),
            ]);
        }
    }
}

fn hand_pod(net: &TestNet, node: usize, k: usize) -> HandPod {
    let n = net.node(node).clone();
    let netns = format!("{}-p{k}", n.netns);
    ip(&["netns", "add", &netns]);
    let veth = format!("p{k}");
    ip(&[
        "-n", &n.netns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
        &netns,
    ]);
    let gw = format!("198.19.{node}.1");
    let addr = format!("198.19.{node}.{}", k + 2);
    ip(&[
        "-n",
        &n.netns,
        "addr",
        "add",
        &format!("{gw}/32"),
        "dev",
        &veth,
    ]);
    ip(&["-n", &n.netns, "link", "set", &veth, "up"]);
    ip(&[
        "-n",
        &n.netns,
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        &veth,
    ]);
    ip(&[
        "-n",
        &netns,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &netns, "link", "set", "eth0", "up"]);
    ip(&["-n", &netns, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &netns,
        "route",
        "add",
        &format!("{gw}/32"),
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n", &netns, "route", "add", "default", "via", &gw, "dev", "eth0",
    ]);
    let node_of_pod = TestNode {
        netns: netns.clone(),
        ..n.clone()
    };
    HandPod {
        cgroup: pods_parent(net, node).join(format!("p{k}")),
        id: format!("{netns}-sandbox"),
        node: node_of_pod,
        netns,
        ip: addr,
    }
}

/// Runs `meshd-cni COMMAND` as a runtime does (env + chained conf on stdin).
fn cni(command: &str, pod: &HandPod, name: &str, socket: &str) -> (bool, String) {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "pods", "type": "meshd-cni", "meshd_socket": socket,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": format!("{}/24", pod.ip)}]},
    });
    let mut child = Command::new(sibling_binary("meshd-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.id)
        .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_SERVICE_ACCOUNT={name}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn run_in_pod(pod: &HandPod, argv: &[&str]) -> Process {
    Process::spawn_in(&pod.node, &pod.cgroup, argv).unwrap()
}

fn start_meshd(net: &TestNet, ca: &MeshCa, node: usize, mode: &str) -> (Meshd, String) {
    let parent = pods_parent(net, node);
    let mount = meshd::sys::ensure_cgroup2().unwrap();
    let rel = parent.strip_prefix(&mount).unwrap().display().to_string();
    let state = std::env::temp_dir().join(format!("{}-n{node}-state", net.id()));
    let socket = state.join("cni.sock").display().to_string();
    let extra = format!(
        "{}pods:\n  cni_socket: {socket}\n  state_dir: {}\n  cgroup_parent: /{rel}\n",
        ca.config(node, "1h", &[]),
        state.display()
    );
    let meshd = net.start_meshd_with(node, mode, &[], &extra).unwrap();
    (meshd, socket)
}

#[test]
fn pods_reach_pods_on_other_nodes_through_mtls_with_their_own_identities() {
    require_privileges!();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        route_pod_subnets(&net);
        let (mut m0, s0) = start_meshd(&net, &ca, 0, mode);
        let (mut m1, s1) = start_meshd(&net, &ca, 1, mode);
        let a = hand_pod(&net, 0, 0);
        let b = hand_pod(&net, 1, 0);
        let (ok, out) = cni("ADD", &a, "web", &s0);
        assert!(ok, "{mode}: ADD a: {out}");
        let (ok, out) = cni("ADD", &b, "db", &s1);
        assert!(ok, "{mode}: ADD b: {out}");
        let tool = sibling_binary("testhosts-tool").display().to_string();
        let mut server = run_in_pod(&b, &[&tool, "echo-server", "0.0.0.0:7000"]);
        server.expect_line("ready", WAIT).unwrap();
        let target = format!("{}:7000", b.ip);
        let mut client = run_in_pod(&a, &[&tool, "client", &target, "1000", "3"]);
        let (status, out) = client.wait_output(WAIT).unwrap();
        assert!(
            status.success(),
            "{mode}: {out}\nnode0:\n{}\nnode1:\n{}",
            m0.process.output_so_far().join("\n"),
            m1.process.output_so_far().join("\n")
        );
        assert!(out.contains(&format!("peer {target}")), "{mode}: {out}");
        let lines = m1
            .wait_access(&["direction=inbound", "transport=hbone"], 3)
            .unwrap();
        assert!(
            lines[0].contains("peer=spiffe://cluster.local/ns/shop/sa/web"),
            "{mode}: {lines:?}"
        );
        assert!(
            lines[0].contains(&format!("src={}:", a.ip)),
            "{mode}: source is the pod IP: {lines:?}"
        );
        let lines = m0
            .wait_access(&["direction=outbound", "transport=hbone"], 3)
            .unwrap();
        assert!(
            lines[0].contains("peer=spiffe://cluster.local/ns/shop/sa/db"),
            "{mode}: {lines:?}"
        );
        let (ok, out) = cni("DEL", &a, "web", &s0);
        assert!(ok, "{mode}: DEL: {out}");
        let _ = meshd_bin();
    }
}
