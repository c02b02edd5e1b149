//! Pods announced through the CNI plugin exactly as a runtime calls it, in namespaces the test
//! makes itself (`testhosts::handpods`; real podman pods are in `pods.rs`). meshd serves each pod
//! from inside its namespace in both modes: pod IP to pod IP through mTLS with per-pod
//! identities, nothing readable on the wire, colliding in-pod tuples kept apart, a server with
//! the wrong identity refused, ADD failing closed and pods re-adopted across a meshd SIGKILL.

use std::time::Duration;

use nix::sys::signal::Signal;
use testhosts::{
    handpods::{
        assert_pod_tunnel, cni, hand_pod, logs, pods_config, route_pod_subnets, run_in_pod,
        start_pods_meshd,
    },
    policy::{PolicyDir, POLICY_HEAD},
    require_privileges, sibling_binary, Capture, MeshCa, Meshd, TestNet, WorkloadSpec,
};

const WAIT: Duration = Duration::from_secs(30);
const MARKER: &str = "MESHD-POD-MARKER-5c1e";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn tool() -> String {
    sibling_binary("testhosts-tool").display().to_string()
}

fn metric(meshd: &Meshd, net: &TestNet, node: usize, series: &str) -> u64 {
    let text = meshd.metrics(net, node).unwrap();
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn pods_reach_pods_on_other_nodes_through_mtls_with_their_own_identities() {
    require_privileges!();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        route_pod_subnets(&net);
        let (a, b) = (hand_pod(&net, 0, 0), hand_pod(&net, 1, 0));
        let tool = tool();
        let mut server = run_in_pod(&b, &[&tool, "echo-server", "0.0.0.0:7000"]);
        server.expect_line("ready", WAIT).unwrap();
        let target = format!("{}:7000", b.ip);
        let send = [tool.as_str(), "client", &target, "3000", "3", MARKER];

        // Before the pods are meshed the marker crosses in plaintext: the capture can see it.
        let capture = Capture::start(&net, 0).unwrap();
        let (status, out) = run_in_pod(&a, &send).wait_output(WAIT).unwrap();
        assert!(status.success(), "{mode}: {out}");
        assert!(
            capture.saw(MARKER).unwrap(),
            "{mode}: control capture misses the marker"
        );

        // Node 0 knows which identity answers at B; it also serves a host workload.
        let known = format!(
            "  identities:\n  - {{address: {}, spiffe_id: \"{DB}\"}}\n",
            b.ip
        );
        let (config, s0) = pods_config(&net, &ca, 0, &known);
        let host = [WorkloadSpec {
            name: "checkout",
            ports: &[],
        }];
        let mut m0 = net.start_meshd_with(0, mode, &host, &config).unwrap();
        let (mut m1, s1) = start_pods_meshd(&net, &ca, 1, mode, "");
        for (pod, name, socket) in [(&a, "web", &s0), (&b, "db", &s1)] {
            let (ok, out) = cni("ADD", pod, name, socket);
            assert!(ok, "{mode}: ADD {name}: {out}");
        }
        let capture = Capture::start(&net, 0).unwrap();
        let (status, out) = run_in_pod(&a, &send).wait_output(WAIT).unwrap();
        assert!(
            status.success(),
            "{mode}: {out}\n{}",
            logs(&mut m0, &mut m1)
        );
        assert!(
            out.contains(&format!("peer {target}")),
            "{mode}: getpeername: {out}"
        );
        assert!(
            !capture.saw(MARKER).unwrap(),
            "{mode}: marker crossed in plaintext"
        );

        let outbound = assert_pod_tunnel(&mut m0, &mut m1, (WEB, &a.ip), DB, mode);
        assert!(
            outbound.contains("server_check=verified"),
            "{mode}: {outbound:?}"
        );

        // The host workload on node 0 reaches the pod in the same run.
        let mut host_client = net
            .workload(0, "checkout", &[&tool, "client", &target, "100", "1"])
            .unwrap();
        let (status, out) = host_client.wait_output(WAIT).unwrap();
        assert!(status.success(), "{mode}: host workload to pod: {out}");
        m1.wait_access(
            &[
                "direction=inbound",
                "peer=spiffe://cluster.local/ns/default/sa/checkout",
            ],
            1,
        )
        .unwrap();

        // An independent HBONE client sees B's own SVID at B's :15008, not a node certificate.
        let probe = hbone_probe(&net, &ca, &b.ip);
        assert!(
            probe.contains(&format!("server-id {DB}")),
            "{mode}: {probe}"
        );

        pod_deletion_leaves_nothing(&net, mode, &a, &s0, &m0);
    }
}

/// Mints a client SVID and asks B's :15008 from node 0 who it is.
fn hbone_probe(net: &TestNet, ca: &MeshCa, pod_ip: &str) -> String {
    use meshd::identity::{ca as mesh_ca, svid, SpiffeId};
    let issuer = mesh_ca::Issuer::load(&ca.dir.join("n0.crt"), &ca.dir.join("n0.key")).unwrap();
    let id = SpiffeId::new("cluster.local", "shop", "probe").unwrap();
    let minted = svid::mint(&issuer, &id, Duration::from_secs(3600)).unwrap();
    let (crt, key) = (ca.dir.join("probe.crt"), ca.dir.join("probe.key"));
    std::fs::write(&crt, minted.chain_pem).unwrap();
    std::fs::write(&key, minted.key_pem).unwrap();
    let addr = format!("{pod_ip}:15008");
    let authority = format!("{pod_ip}:7000");
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    let tool = tool();
    net.exec(0, &[&tool, "hbone", &addr, &authority, &crt, &key])
        .unwrap()
}

/// BPF links attached to the pod's network namespace (sk_lookup), as bpftool lists them.
fn netns_links(pod: &testhosts::handpods::HandPod) -> usize {
    use std::os::linux::fs::MetadataExt;
    let ino = std::fs::metadata(format!("/run/netns/{}", pod.netns))
        .unwrap()
        .st_ino();
    let links: serde_json::Value =
        serde_json::from_str(&testhosts::bpftool(&["-j", "link", "show"])).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["type"] == "netns" && l["netns_ino"] == ino)
        .count()
}

/// DEL: the pod's listeners, rules, map entries and programs are gone.
fn pod_deletion_leaves_nothing(
    net: &TestNet,
    mode: &str,
    pod: &testhosts::handpods::HandPod,
    socket: &str,
    meshd: &Meshd,
) {
    let pod_maps = "meshd_bpf_map_entries{map=\"POD_NETNS\"}";
    let (_, listening) = run_in_pod(pod, &["ss", "-Hltn"]).wait_output(WAIT).unwrap();
    for port in [":15001", ":15006", ":15008"] {
        assert!(
            listening.contains(port),
            "{mode}: {port} not open in the pod: {listening}"
        );
    }
    if mode == "ebpf" {
        assert_eq!(
            metric(meshd, net, 0, pod_maps),
            1,
            "{mode}: the pod's netns entry"
        );
        assert_eq!(netns_links(pod), 1, "{mode}: the pod's sk_lookup link");
    }
    let (ok, out) = cni("DEL", pod, "web", socket);
    assert!(ok, "{mode}: DEL: {out}");
    let (_, listening) = run_in_pod(pod, &["ss", "-Hltn"]).wait_output(WAIT).unwrap();
    for port in [":15001", ":15006", ":15008"] {
        assert!(
            !listening.contains(port),
            "{mode}: {port} still open in the pod: {listening}"
        );
    }
    let (_, nat) = run_in_pod(pod, &["iptables-save", "-t", "nat"])
        .wait_output(WAIT)
        .unwrap();
    assert!(
        !nat.contains("MESH_"),
        "{mode}: rules left in the pod: {nat}"
    );
    let pins = net.pin_dir().unwrap().join("n0/pods");
    let left: Vec<_> = std::fs::read_dir(&pins).map_or(Vec::new(), |d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("sk_lookup"))
            .collect()
    });
    assert!(left.is_empty(), "{mode}: pod links still pinned: {left:?}");
    assert_eq!(
        netns_links(pod),
        0,
        "{mode}: a link left on the pod's netns"
    );
    assert_eq!(
        metric(meshd, net, 0, pod_maps),
        0,
        "{mode}: netns entry left"
    );
}

#[test]
fn pods_with_identical_in_pod_tuples_do_not_mix() {
    require_privileges!();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        route_pod_subnets(&net);
        let (web, api, b) = (
            hand_pod(&net, 0, 0),
            hand_pod(&net, 0, 1),
            hand_pod(&net, 1, 0),
        );
        let (mut m0, s0) = start_pods_meshd(&net, &ca, 0, mode, "");
        let (mut m1, s1) = start_pods_meshd(&net, &ca, 1, mode, "");
        for (pod, name, socket) in [(&web, "web", &s0), (&api, "api", &s0), (&b, "db", &s1)] {
            let (ok, out) = cni("ADD", pod, name, socket);
            assert!(ok, "{mode}: ADD {name}: {out}");
        }
        let tool = tool();
        let mut server = run_in_pod(&b, &[&tool, "echo-server", "0.0.0.0:7000"]);
        server.expect_line("ready", WAIT).unwrap();
        let target = format!("{}:7000", b.ip);
        // Both pods' applications connect from 127.0.0.1:40000 of their own namespace at once.
        let argv = [
            "env",
            "BIND_PORT=40000",
            &tool,
            "client",
            &target,
            "2000",
            "1",
        ];
        const ROUNDS: usize = 8;
        for round in 0..ROUNDS {
            let mut clients = [run_in_pod(&web, &argv), run_in_pod(&api, &argv)];
            for c in &mut clients {
                let (status, out) = c.wait_output(WAIT).unwrap();
                assert!(
                    status.success(),
                    "{mode} round {round}: {out}\n{}",
                    logs(&mut m0, &mut m1)
                );
            }
        }
        for (id, pod) in [(WEB, &web), ("spiffe://cluster.local/ns/shop/sa/api", &api)] {
            let peer = format!("peer={id}");
            let lines = m1
                .wait_access(&["direction=inbound", &peer], ROUNDS)
                .unwrap();
            let src = format!("src={}:", pod.ip);
            assert!(lines.iter().all(|l| l.contains(&src)), "{mode}: {lines:?}");
        }
    }
}

#[test]
fn a_server_presenting_another_identity_is_refused() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    route_pod_subnets(&net);
    let (a, b) = (hand_pod(&net, 0, 0), hand_pod(&net, 1, 0));
    let impostor = "spiffe://cluster.local/ns/shop/sa/payments";
    let known = format!(
        "  identities:\n  - {{address: {}, spiffe_id: \"{impostor}\"}}\n",
        b.ip
    );
    let (m0, s0) = start_pods_meshd(&net, &ca, 0, "ebpf", &known);
    let (_m1, s1) = start_pods_meshd(&net, &ca, 1, "ebpf", "");
    assert!(cni("ADD", &a, "web", &s0).0 && cni("ADD", &b, "db", &s1).0);
    let tool = tool();
    let mut server = run_in_pod(&b, &[&tool, "echo-server", "0.0.0.0:7000"]);
    server.expect_line("ready", WAIT).unwrap();
    let target = format!("{}:7000", b.ip);
    let (status, out) = run_in_pod(&a, &[&tool, "client", &target, "100", "1"])
        .wait_output(WAIT)
        .unwrap();
    assert!(
        !status.success(),
        "the connection to an impostor went through: {out}"
    );
    let refused =
        "meshd_connections_rejected_total{direction=\"outbound\",reason=\"unexpected_identity\"}";
    assert_eq!(metric(&m0, &net, 0, refused), 1);
}

#[test]
fn a_sigkilled_meshd_fails_closed_and_readopts_its_pods() {
    require_privileges!();
    for mode in ["ebpf", "iptables"] {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        route_pod_subnets(&net);
        let (a, b) = (hand_pod(&net, 0, 0), hand_pod(&net, 1, 0));
        let (config0, s0) = pods_config(&net, &ca, 0, "");
        let (config1, s1) = pods_config(&net, &ca, 1, "");
        let mut m0 = net.start_meshd_with(0, mode, &[], &config0).unwrap();
        let mut m1 = net.start_meshd_with(1, mode, &[], &config1).unwrap();
        assert!(cni("ADD", &a, "web", &s0).0 && cni("ADD", &b, "db", &s1).0);
        let tool = tool();
        let mut server = run_in_pod(&b, &[&tool, "echo-server", "0.0.0.0:7000"]);
        server.expect_line("ready", WAIT).unwrap();
        let target = format!("{}:7000", b.ip);
        let send = [tool.as_str(), "client", &target, "3000", "1", MARKER];
        let (status, out) = run_in_pod(&a, &send).wait_output(WAIT).unwrap();
        assert!(status.success(), "{mode}: {out}");

        let capture = Capture::start(&net, 0).unwrap();
        for m in [&mut m0, &mut m1] {
            m.process.signal(Signal::SIGKILL).unwrap();
            let _ = m.process.wait_output(WAIT);
        }
        // Outbound from the pod and inbound to the pod around the mesh: both refused.
        let (status, out) = run_in_pod(&a, &send).wait_output(WAIT).unwrap();
        assert!(
            !status.success(),
            "{mode}: pod A reached B while meshd was down: {out}"
        );
        let (ok, _) = (net.exec(0, &send).is_ok(), ());
        assert!(!ok, "{mode}: node 0 reached pod B around the dead meshd");
        // A new pod cannot start unprotected while meshd is away.
        let c = hand_pod(&net, 0, 1);
        let (ok, out) = cni("ADD", &c, "late", &s0);
        assert!(
            !ok && out.contains("not started unprotected"),
            "{mode}: {out}"
        );

        let _m0 = net.start_meshd_with(0, mode, &[], &config0).unwrap();
        let _m1 = net.start_meshd_with(1, mode, &[], &config1).unwrap();
        let (status, out) = run_in_pod(&a, &send).wait_output(WAIT).unwrap();
        assert!(status.success(), "{mode}: after re-adoption: {out}");
        assert!(
            !capture.saw(MARKER).unwrap(),
            "{mode}: marker crossed in plaintext"
        );
    }
}

/// Authorization policy selects pods by their labels (here from the CNI call) and names them by
/// their own SPIFFE IDs: of two pods on node 0, only `web` may reach pod `db` on node 1.
#[test]
fn pod_policy_selects_pods_by_label_and_callers_by_identity() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    route_pod_subnets(&net);
    let (web, other, db) = (
        hand_pod(&net, 0, 0),
        hand_pod(&net, 0, 1),
        hand_pod(&net, 1, 0),
    );
    let tool = tool();
    let mut server = run_in_pod(&db, &[&tool, "echo-server", "0.0.0.0:7000"]);
    server.expect_line("ready", WAIT).unwrap();
    let dir = PolicyDir::new(&net).unwrap();
    dir.put(
        "db.yaml",
        &format!(
            "{POLICY_HEAD}metadata: {{name: web-to-db, namespace: shop}}\nspec:\n  \
             selector: {{matchLabels: {{app: db}}}}\n  \
             rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/web]}}}}]}}]\n"
        ),
    );
    let (m0, s0) = start_pods_meshd(&net, &ca, 0, "ebpf", "");
    let (config, s1) = pods_config(&net, &ca, 1, "");
    let config = format!("{config}policies: [{}]\n", dir.0.display());
    let m1 = net.start_meshd_with(1, "ebpf", &[], &config).unwrap();
    for (pod, name, socket) in [(&web, "web", &s0), (&other, "other", &s0), (&db, "db", &s1)] {
        let (ok, out) = cni("ADD", pod, name, socket);
        assert!(ok, "ADD {name}: {out}");
    }
    let target = format!("{}:7000", db.ip);
    let send = [tool.as_str(), "client", &target, "100", "1"];
    let (ok, out) = run_in_pod(&web, &send).wait_output(WAIT).unwrap();
    assert!(ok.success(), "web -> db: {out}");
    let (ok, out) = run_in_pod(&other, &send).wait_output(WAIT).unwrap();
    assert!(!ok.success(), "other reached db: {out}");
    let denied = [
        "meshd_policy_decisions_total",
        "decision=\"deny\"",
        "reason=\"no_allow_match\"",
    ];
    assert_eq!(m1.metric_sum(&net, 1, &denied), 1.0);
    for (pod, name, socket) in [(&web, "web", &s0), (&other, "other", &s0), (&db, "db", &s1)] {
        let (ok, out) = cni("DEL", pod, name, socket);
        assert!(ok, "DEL {name}: {out}");
    }
    drop((m0, m1));
}
