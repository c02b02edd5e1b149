//! Identity through the CA service instead of node intermediates: `meshd ca serve` on a test
//! node beside a real etcd (authentication on); two nodes whose meshd hold only a node
//! credential (a leaf that cannot sign) get their pods' SVIDs by signing request, so pod to pod
//! works across nodes. A node asking for the identity of a workload the registry places on
//! another node is refused; a node intermediate is not accepted as a credential; and a
//! certificate "signed" with a node credential does not verify (openssl), where one signed with
//! a node intermediate does (the control that shows the check can fail).

use std::{path::Path, process::Command, time::Duration};

use testhosts::{
    etcd::{Etcd, ROOT},
    handpods::{cni, cni_labelled, hand_pod, pods_config, route_pod_subnets, run_in_pod, HandPod},
    in_ci, meshd_bin, require_privileges, require_tools, sibling_binary, MeshCa, Meshd, Process,
    TestNet, WorkloadSpec,
};

const WAIT: Duration = Duration::from_secs(30);
const CA: &str = "198.18.0.3:15012";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders-1";
const CHECKOUT: WorkloadSpec = WorkloadSpec {
    name: "checkout",
    ports: &[],
};

fn meshd_cmd(args: &[&str]) -> (bool, String) {
    let out = Command::new(meshd_bin()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `meshd ca request ID` from `node` with the given credential files.
fn request(net: &TestNet, node: usize, dir: &Path, id: &str, cred: &str) -> Result<String, String> {
    let bin = meshd_bin().display().to_string();
    let d = dir.display();
    let (cert, key, root) = (
        format!("{d}/{cred}.crt"),
        format!("{d}/{cred}.key"),
        format!("{d}/root.crt"),
    );
    let out = format!("{d}/requested-{node}");
    let argv = [
        bin.as_str(),
        "ca",
        "request",
        id,
        "--ca",
        CA,
        "--cert",
        &cert,
        "--key",
        &key,
        "--bundle",
        &root,
        "--out",
        &out,
    ];
    net.exec(node, &argv).map_err(|e| format!("{e:#}"))
}

/// The pods config for `node`, its identity coming from the CA service with its credential.
fn config(net: &TestNet, ca: &MeshCa, etcd: &Etcd, node: usize, ttl: &str) -> (String, String) {
    let (config, socket) = pods_config(net, ca, node, "");
    let d = ca.dir.display();
    let config = config
        .replace(
            &format!("{d}/n{node}.crt"),
            &format!("{d}/n{node}-credential.crt"),
        )
        .replace(
            &format!("{d}/n{node}.key"),
            &format!("{d}/n{node}-credential.key"),
        )
        .replace(
            "  svid_ttl: 1h\n",
            &format!("  svid_ttl: {ttl}\n  ca_service: {{address: {CA}}}\n"),
        );
    assert!(config.contains("ca_service"), "{config}");
    (
        format!("{config}{}", etcd.config(&format!("n{node}"), "5s")),
        socket,
    )
}

fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Two meshd nodes holding node credentials only, etcd (auth on) and the CA service on node
/// 2, pod `web` on node 0 and `orders-1` (echo on :7000) on node 1. Bind every field: one a
/// pattern leaves out is dropped (a process killed) at once.
struct Mesh {
    net: TestNet,
    ca: MeshCa,
    etcd: Etcd,
    service: Process,
    meshd: Vec<Meshd>,
    web: HandPod,
    orders: HandPod,
    _server: Process,
}

/// `meshd ca serve` on node 2 from `dir`, trusting `trust` for node credentials.
fn start_service(net: &TestNet, etcd: &Etcd, dir: &str, trust: &str) -> Process {
    let bin = meshd_bin().display().to_string();
    let password = etcd.password_file("meshd-ca").display().to_string();
    let serve = [
        bin.as_str(),
        "ca",
        "serve",
        "--dir",
        dir,
        "--listen",
        CA,
        "--etcd",
        &etcd.endpoint,
        "--etcd-user",
        "meshd-ca",
        "--etcd-password-file",
        &password,
        "--max-ttl",
        "1h",
        "--trust",
        trust,
    ];
    let mut service = net.host_process(2, &serve).unwrap();
    service
        .expect_line_containing("CA service ready", WAIT)
        .unwrap();
    service
}

fn mesh(svid_ttl: &str) -> Mesh {
    let net = TestNet::new(3).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let dir = ca.dir.display().to_string();
    for node in ["n0", "n1"] {
        let (ok, out) = meshd_cmd(&["ca", "node-credential", node, "--dir", &dir]);
        assert!(ok, "{out}");
    }
    route_pod_subnets(&net);
    let mut etcd = Etcd::start(&net, 2).unwrap();
    etcd.enable_auth(&net, &["n0", "n1", "meshd-ca"]).unwrap();
    let service = start_service(&net, &etcd, &dir, &format!("{dir}/root.crt"));
    let mut meshd = Vec::new();
    let mut sockets = Vec::new();
    for node in 0..2 {
        let (config, socket) = config(&net, &ca, &etcd, node, svid_ttl);
        // Node 0 also runs a host workload, registered at the node's address: its SVID too
        // comes from the CA service, at start-up.
        let (host, config) = match node {
            0 => (
                &[CHECKOUT][..],
                format!("{config}    advertise_address: 198.18.0.1\n"),
            ),
            _ => (&[][..], config),
        };
        meshd.push(net.start_meshd_with(node, "ebpf", host, &config).unwrap());
        sockets.push(socket);
    }
    let web = hand_pod(&net, 0, 0);
    let (ok, out) = cni("ADD", &web, "web", &sockets[0]);
    assert!(ok, "ADD web: {out}");
    let orders = hand_pod(&net, 1, 0);
    let (ok, out) = cni_labelled("ADD", &orders, "orders-1", "app:orders", &sockets[1]);
    assert!(ok, "ADD orders-1: {out}");
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let mut server = run_in_pod(&orders, &[&tool, "echo-server", "0.0.0.0:7000"]);
    server.expect_line("ready", WAIT).unwrap();
    // The pods are served once their SVIDs are signed (until then they fail closed).
    for m in &mut meshd {
        wait_log(m, "pod identity known; serving it", 1);
    }
    Mesh {
        net,
        ca,
        etcd,
        service,
        meshd,
        web,
        orders,
        _server: server,
    }
}

fn tools_or_skip() -> bool {
    if let Err(e) = require_tools(&["etcd", "etcdctl", "openssl"]) {
        assert!(!in_ci(), "the CA service test cannot run under CI: {e}");
        eprintln!("skipping: {e}");
        return false;
    }
    true
}

#[test]
fn the_ca_service_signs_only_what_the_registry_places_on_the_asking_node() {
    require_privileges!();
    if !tools_or_skip() {
        return;
    }
    let Mesh {
        net,
        ca,
        mut service,
        mut meshd,
        web,
        orders,
        etcd: _etcd,
        _server,
    } = mesh("1h");
    let tool = sibling_binary("testhosts-tool").display().to_string();

    // Pod to pod with SVIDs the CA service signed for each node.
    let target = format!("{}:7000", orders.ip);
    let mut client = run_in_pod(
        &web,
        &[&tool, "client", &target, "2000", "1", "CA-SERVICE-MARKER"],
    );
    let (status, out) = client.wait_output(WAIT).unwrap();
    assert!(status.success(), "web -> orders-1: {out}");
    let line = &meshd[0]
        .wait_access(&["direction=outbound", &target], 1)
        .unwrap()[0];
    assert!(
        line.contains(&format!("peer={ORDERS}")) && line.contains("server_check=verified"),
        "{line}"
    );
    let line = &meshd[1]
        .wait_access(&["direction=inbound", "transport=hbone"], 1)
        .unwrap()[0];
    assert!(line.contains(&format!("peer={WEB}")), "{line}");
    assert_signed(&mut service);

    // Node 1 asks for web's identity, which the registry places on node 0: refused.
    let refused = request(&net, 1, &ca.dir, WEB, "n1-credential");
    let why = refused.expect_err("node 1 must not get web's SVID");
    assert!(why.contains("places no workload"), "{why}");
    service
        .expect_line_containing("certificate request refused", WAIT)
        .unwrap();
    // Its own workload's identity it may have (the refusal above is specific).
    request(&net, 1, &ca.dir, ORDERS, "n1-credential").unwrap();
    // A node intermediate (CA:true) is not a credential.
    let refused = request(&net, 1, &ca.dir, ORDERS, "n1");
    assert!(
        refused.is_err(),
        "a node intermediate was accepted as a credential"
    );

    credential_cannot_sign(&ca.dir);
}

/// A full root rotation under load, through the registry and the CA service: the new root
/// added to the registry's bundle (every node trusts both), the CA service replaced by one
/// signing from the new root (SVIDs of 4 s are re-signed within seconds), the old root
/// removed from the bundle; not one request fails.
#[test]
fn a_root_rotation_through_the_registry_fails_no_request() {
    require_privileges!();
    if !tools_or_skip() {
        return;
    }
    let mut m = mesh("4s");
    let (net, etcd) = (&m.net, &m.etcd);
    let new_ca = std::env::temp_dir().join(format!("{}-ca2", net.id()));
    let new_dir = new_ca.display().to_string();
    let (ok, out) = meshd_cmd(&["ca", "init", "--dir", &new_dir]);
    assert!(ok, "{out}");
    let root = |dir: &Path| std::fs::read_to_string(dir.join("root.crt")).unwrap();
    let put = |key: &str, pem: &str| etcd.ctl(net, Some(ROOT), &["put", "--", key, pem]).unwrap();
    put("/meshd/bundle/r1", &root(&m.ca.dir));
    wait_roots(&mut m.meshd, 1);

    let tool = sibling_binary("testhosts-tool").display().to_string();
    let target = format!("{}:7000", m.orders.ip);
    let mut load = run_in_pod(&m.web, &[&tool, "loop", &target, "30"]);
    std::thread::sleep(Duration::from_secs(3));
    put("/meshd/bundle/r2", &root(&new_ca));
    wait_roots(&mut m.meshd, 2);
    let old_root = format!("{}/root.crt", m.ca.dir.display());
    // The old CA service stops before the new one takes its address.
    m.service.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = m.service.wait_output(WAIT);
    m.service = start_service(net, etcd, &new_dir, &old_root);
    for id in [WEB, ORDERS] {
        m.service.expect_line_containing(id, WAIT).unwrap();
    }
    // Every SVID in use (4 s) is now from the new root.
    std::thread::sleep(Duration::from_secs(6));
    etcd.ctl(net, Some(ROOT), &["del", "/meshd/bundle/r1"])
        .unwrap();
    wait_roots(&mut m.meshd, 3);
    let (status, out) = load.wait_output(Duration::from_secs(90)).unwrap();
    let summary = out
        .lines()
        .find(|l| l.starts_with("loop ok"))
        .unwrap_or_default();
    println!("root rotation under load: {summary}");
    assert!(status.success() && summary.ends_with("failed 0"), "{out}");
    let dump = admin_dump(net, 1);
    let roots = dump["trust_bundle"]["roots"].as_array().unwrap().clone();
    assert_eq!(roots.len(), 1, "only the new root is trusted: {roots:?}");
    let _ = std::fs::remove_dir_all(&new_ca);
}

/// Waits until every meshd has logged `n` registry bundle updates.
fn wait_roots(meshd: &mut [Meshd], n: usize) {
    for m in meshd.iter_mut() {
        wait_log(m, "trust bundle from the registry", n);
    }
}

/// Waits until `m` has logged `n` lines containing `needle`.
fn wait_log(m: &mut Meshd, needle: &str, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let lines = m.process.output_so_far();
        let seen = lines.iter().filter(|l| l.contains(needle)).count();
        if seen >= n {
            return;
        }
        let now = std::time::Instant::now();
        assert!(
            now < deadline,
            "{seen} of {n} {needle:?}:\n{}",
            lines.join("\n")
        );
        let _ = m.process.next_line(Duration::from_millis(200));
    }
}

fn admin_dump(net: &TestNet, node: usize) -> serde_json::Value {
    let dump = net
        .http_get(node, "http://127.0.0.1:15000/config_dump")
        .unwrap();
    serde_json::from_str(&dump).unwrap()
}

/// The CA service's log names each SVID it signed and for which node.
fn assert_signed(service: &mut Process) {
    let log = service.output_so_far().join("\n");
    let node0 = "spiffe://cluster.local/ns/meshd-system/sa/n0";
    let checkout = "spiffe://cluster.local/ns/default/sa/checkout";
    for (node, id) in [("n0", WEB), ("n1", ORDERS), ("n0", node0), ("n0", checkout)] {
        let signed = (log.lines()).any(|l| {
            l.contains("certificate signed")
                && l.contains(&format!("node={node}"))
                && l.contains(id)
        });
        assert!(signed, "the CA service signed {id} for {node}:\n{log}");
    }
}

/// openssl signs a leaf with the node credential and with the node intermediate: only the
/// second verifies against the root.
fn credential_cannot_sign(dir: &Path) {
    std::fs::write(dir.join("san.ext"), format!("subjectAltName=URI:{WEB}\n")).unwrap();
    // Arguments without spaces: one string, split.
    let run = |args: &str| openssl(dir, &args.split_whitespace().collect::<Vec<_>>());
    let (ok, out) = run(
        "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                         -keyout forged.key -subj /CN=forged -out forged.csr",
    );
    assert!(ok, "{out}");
    for (signer, signed) in [
        ("n1-credential", "by-credential.crt"),
        ("n1", "by-intermediate.crt"),
    ] {
        let (ok, out) = run(&format!(
            "x509 -req -in forged.csr -CA {signer}.crt -CAkey {signer}.key -CAcreateserial \
             -days 1 -extfile san.ext -out {signed}"
        ));
        assert!(ok, "openssl x509 -req with {signer}: {out}");
    }
    let (ok, out) = run("verify -CAfile root.crt -untrusted n1-credential.crt by-credential.crt");
    assert!(
        !ok,
        "a certificate signed with a node credential verified: {out}"
    );
    let (ok, out) = run("verify -CAfile root.crt -untrusted n1.crt by-intermediate.crt");
    assert!(
        ok,
        "control: a certificate signed by a node intermediate verifies: {out}"
    );
}
