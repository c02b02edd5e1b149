//! Pods made the lowest-level way a runtime makes them, for the runtime-free pod tests: a
//! network namespace joined to its node by a veth (198.19.<node>.<k+2>), a cgroup below the
//! node's pods parent, and the CNI plugin called with the environment and chained
//! configuration a runtime passes. Real podman pods are in `pods.rs`; both feed the same meshd.

use std::{path::PathBuf, process::Command};

use crate::{sibling_binary, MeshCa, Meshd, Process, TestNet, TestNode};

/// A pod made by hand as a runtime would: its own netns joined to the node by a veth, address
/// 198.19.<node>.<k+2>, a cgroup below the node's pods parent.
#[derive(Clone)]
pub struct HandPod {
    pub node: TestNode,
    pub netns: String,
    pub ip: String,
    pub cgroup: PathBuf,
    pub id: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn pods_parent(net: &TestNet, node: usize) -> PathBuf {
    let p = net.cgroup().join(format!("pods-n{node}"));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Routes for pod subnets: every node reaches 198.19.<m>.0/24 through node m.
pub fn route_pod_subnets(net: &TestNet) {
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

pub fn hand_pod(net: &TestNet, node: usize, k: usize) -> HandPod {
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

/// Runs `meshd-cni COMMAND` as a runtime does (env + chained conf on stdin); the pod's labels
/// are `app: <name>`.
pub fn cni(command: &str, pod: &HandPod, name: &str, socket: &str) -> (bool, String) {
    cni_labelled(command, pod, name, &format!("app:{name}"), socket)
}

/// [`cni`] with the pod's labels (`k:v,k:v`).
pub fn cni_labelled(
    command: &str,
    pod: &HandPod,
    name: &str,
    labels: &str,
    socket: &str,
) -> (bool, String) {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "pods", "type": "meshd-cni", "meshd_socket": socket,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": format!("{}/24", pod.ip)}]},
    });
    let mut child = Command::new(sibling_binary("meshd-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.id)
        .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_SERVICE_ACCOUNT={name};MESHD_LABELS={labels}"))
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

pub fn run_in_pod(pod: &HandPod, argv: &[&str]) -> Process {
    Process::spawn(&pod.node, &pod.cgroup, argv).unwrap()
}

/// The config meshd needs on `node` to serve pods (CNI socket and state in the temp dir, named
/// after the net), with `mesh_extra` lines added to its `mesh:` section; and the socket path.
pub fn pods_config(net: &TestNet, ca: &MeshCa, node: usize, mesh_extra: &str) -> (String, String) {
    let parent = pods_parent(net, node);
    let mount = meshd::sys::ensure_cgroup2().unwrap();
    let rel = parent.strip_prefix(&mount).unwrap().display().to_string();
    pods_config_with(net, ca, node, mesh_extra, &rel, "")
}

/// [`pods_config`] with the pods' cgroup parent (relative to the cgroup v2 root) and more
/// lines for the `pods:` section.
pub fn pods_config_with(
    net: &TestNet,
    ca: &MeshCa,
    node: usize,
    mesh_extra: &str,
    cgroup_parent: &str,
    pods_extra: &str,
) -> (String, String) {
    let state = std::env::temp_dir().join(format!("{}-n{node}-state", net.id()));
    let socket = state.join("cni.sock").display().to_string();
    let config = format!(
        "{}{mesh_extra}pods:\n  cni_socket: {socket}\n  state_dir: {}\n  \
         cgroup_parent: /{cgroup_parent}\n{pods_extra}",
        ca.config(node, "1h", &[]),
        state.display()
    );
    (config, socket)
}

/// meshd on `node` serving pods; see [`pods_config`].
pub fn start_pods_meshd(
    net: &TestNet,
    ca: &MeshCa,
    node: usize,
    mode: &str,
    mesh_extra: &str,
) -> (Meshd, String) {
    let (config, socket) = pods_config(net, ca, node, mesh_extra);
    let meshd = net.start_meshd_with(node, mode, &[], &config).unwrap();
    (meshd, socket)
}

/// Checks one pod-to-pod tunnel in both meshd's access logs: the server side names the client
/// pod's SPIFFE ID and IP, the client side the server's SPIFFE ID. Returns the client side's
/// first outbound HBONE line for further checks.
pub fn assert_pod_tunnel(
    client: &mut Meshd,
    server: &mut Meshd,
    (client_id, client_ip): (&str, &str),
    server_id: &str,
    mode: &str,
) -> String {
    let inbound = server
        .wait_access(&["direction=inbound", "transport=hbone"], 3)
        .unwrap();
    assert!(
        inbound[0].contains(&format!("peer={client_id}")),
        "{mode}: {inbound:?}"
    );
    assert!(
        inbound[0].contains(&format!("src={client_ip}:")),
        "{mode}: the client pod's own address as source: {inbound:?}"
    );
    assert!(
        inbound[0].contains(&format!("forwarded_for={client_ip} ")),
        "{mode}: the client pod's address in Forwarded: {inbound:?}"
    );
    let outbound = client
        .wait_access(&["direction=outbound", "transport=hbone"], 3)
        .unwrap();
    assert!(
        outbound[0].contains(&format!("peer={server_id}")),
        "{mode}: {outbound:?}"
    );
    outbound[0].clone()
}

/// Both meshd's output so far, for an assertion message.
pub fn logs(a: &mut Meshd, b: &mut Meshd) -> String {
    let (a, b) = (a.process.output_so_far(), b.process.output_so_far());
    format!("node 0:\n{}\nnode 1:\n{}", a.join("\n"), b.join("\n"))
}
