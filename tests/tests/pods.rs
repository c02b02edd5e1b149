//! Real pods: Kubernetes Pod YAML run by podman (`kube play`, runc, the CNI bridge plugin) on two
//! test nodes, meshd chained into the node's CNI configuration by `meshd install-cni`, exactly as
//! the DaemonSet does on a node. Identity comes from where podman keeps it (the pod's
//! `meshd.io/namespace` and `meshd.io/service-account` annotations, read with `podman pod
//! inspect`), not from the test. Both modes; a capture shows the marker in plaintext before the
//! pods are meshed and never after; a SIGKILLed meshd leaves its pod's connections failing, not
//! leaving in plaintext, and keeps new pods from starting.

use std::time::Duration;

use nix::sys::signal::Signal;
use testhosts::{
    handpods::{assert_pod_tunnel, logs, pods_config_with, route_pod_subnets},
    in_ci,
    podman::{pod_yaml, Pod, Podman, CGROUP_PARENT},
    require_privileges, require_tools, sibling_binary, Capture, MeshCa, Meshd, TestNet,
};

const WAIT: Duration = Duration::from_secs(60);
const MARKER: &str = "MESHD-PODMAN-MARKER-91d3";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const TOOL: &str = "/bin/testhosts-tool";

/// A pod with one long-running container `app` (commands run in it with `podman exec`).
fn play(podman: &Podman, name: &str, sa: &str) -> anyhow::Result<Pod> {
    let yaml = pod_yaml(
        name,
        "shop",
        sa,
        &[("app", name)],
        &[("app", &["/bin/sleep", "3600"])],
    );
    podman.play(name, &yaml)
}

/// Runs the client in `pod` against `target`, sending `payload`; its exit status and output.
fn client(podman: &Podman, pod: &Pod, target: &str, payload: &str) -> (bool, String) {
    let container = format!("{}-app", pod.name);
    let argv = [TOOL, "client", target, "3000", "3", payload];
    let (status, out) = podman
        .exec(&container, &argv)
        .unwrap()
        .wait_output(WAIT)
        .unwrap();
    (status.success(), out)
}

/// meshd for `node`, reading pods' metadata through that node's podman, chained into its CNI
/// configuration.
fn start_meshd(net: &TestNet, ca: &MeshCa, podman: &Podman, node: usize, mode: &str) -> Meshd {
    let argv: Vec<String> = podman.argv().iter().map(|a| format!("\"{a}\"")).collect();
    let extra = format!("  podman: [{}]\n", argv.join(", "));
    let (config, socket) = pods_config_with(net, ca, node, "", CGROUP_PARENT, &extra);
    let meshd = net.start_meshd_with(node, mode, &[], &config).unwrap();
    let conf_dir = podman.conf_dir().display().to_string();
    let bin_dir = podman.cni_bin_dir().display().to_string();
    let meshd_bin = sibling_binary("meshd").display().to_string();
    let install = [
        meshd_bin.as_str(),
        "install-cni",
        "--conf-dir",
        &conf_dir,
        "--bin-dir",
        &bin_dir,
        "--socket",
        &socket,
    ];
    let out = std::process::Command::new(install[0])
        .args(&install[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-cni: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    meshd
}

#[test]
fn podman_pods_are_meshed_with_the_identity_in_their_metadata() {
    require_privileges!();
    if let Err(e) = require_tools(&["podman", "runc", "catatonit", "busybox"]) {
        assert!(!in_ci(), "podman pods cannot run under CI: {e}");
        eprintln!("skipping: {e}");
        return;
    }
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        route_pod_subnets(&net);
        let (p0, p1) = (Podman::new(&net, 0).unwrap(), Podman::new(&net, 1).unwrap());

        // Unmeshed pods: the marker crosses the wire in plaintext, so the capture can see it.
        let plain_db = play(&p1, "plaindb", "db").unwrap();
        let mut server = p1
            .exec("plaindb-app", &[TOOL, "echo-server", "0.0.0.0:7000"])
            .unwrap();
        server.expect_line("ready", WAIT).unwrap();
        let plain_web = play(&p0, "plainweb", "web").unwrap();
        let capture = Capture::start(&net, 0).unwrap();
        let (ok, out) = client(&p0, &plain_web, &format!("{}:7000", plain_db.ip), MARKER);
        assert!(ok, "{mode}: unmeshed pods: {out}");
        assert!(
            capture.saw(MARKER).unwrap(),
            "{mode}: control capture misses the marker"
        );

        let mut m0 = start_meshd(&net, &ca, &p0, 0, mode);
        let mut m1 = start_meshd(&net, &ca, &p1, 1, mode);
        let db = play(&p1, "db", "db").unwrap();
        let mut server = p1
            .exec("db-app", &[TOOL, "echo-server", "0.0.0.0:7000"])
            .unwrap();
        server.expect_line("ready", WAIT).unwrap();
        let web = play(&p0, "web", "web").unwrap();
        let target = format!("{}:7000", db.ip);
        let capture = Capture::start(&net, 0).unwrap();
        let (ok, out) = client(&p0, &web, &target, MARKER);
        assert!(ok, "{mode}: {out}\n{}", logs(&mut m0, &mut m1));
        assert!(
            out.contains(&format!("peer {target}")),
            "{mode}: getpeername: {out}"
        );
        assert!(
            !capture.saw(MARKER).unwrap(),
            "{mode}: marker crossed in plaintext"
        );
        let web_ip = web.ip.to_string();
        assert_pod_tunnel(&mut m0, &mut m1, (WEB, &web_ip), DB, mode);

        // meshd gone on node 0: its pod's connections fail instead of leaving in plaintext, and
        // no new pod starts there unprotected.
        m0.process.signal(Signal::SIGKILL).unwrap();
        let capture = Capture::start(&net, 0).unwrap();
        let (ok, out) = client(&p0, &web, &target, MARKER);
        assert!(!ok, "{mode}: connected without meshd: {out}");
        // Traffic the capture must see (between the unmeshed pods, another payload), so that its
        // silence about the marker means something.
        let plain = format!("{}:7000", plain_db.ip);
        assert!(client(&p0, &plain_web, &plain, "UNMESHED").0);
        assert!(
            !capture.saw(MARKER).unwrap(),
            "{mode}: marker in plaintext after SIGKILL"
        );
        let refused = play(&p0, "late", "web");
        assert!(
            refused.is_err(),
            "{mode}: a pod started while meshd was down"
        );

        // Deleting a pod (CNI DEL through podman) while meshd runs leaves meshd serving.
        p1.down(&db).unwrap();
        let text = m1.metrics(&net, 1).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("meshd_pods ") && l.ends_with(" 0")),
            "{mode}: pod count after DEL: {text}"
        );
    }
}
