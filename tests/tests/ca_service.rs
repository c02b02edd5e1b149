//! Identity through the CA service instead of node intermediates: `meshd ca serve` on a test
//! node beside a real etcd (authentication on); two nodes whose meshd hold only a node
//! credential (a leaf that cannot sign) get their pods' SVIDs by signing request, so pod to pod
//! works across nodes. A node asking for the identity of a workload the registry places on
//! another node is refused; a node intermediate is not accepted as a credential; and a
//! certificate "signed" with a node credential does not verify (openssl), where one signed with
//! a node intermediate does (the control that shows the check can fail).

use std::{path::Path, process::Command, time::Duration};

use testhosts::{
    etcd::Etcd,
    handpods::{cni, cni_labelled, hand_pod, pods_config, route_pod_subnets, run_in_pod},
    in_ci, meshd_bin, require_privileges, require_tools, sibling_binary, MeshCa, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);
const CA: &str = "198.18.0.3:15012";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders-1";

fn meshd(args: &[&str]) -> (bool, String) {
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
fn config(net: &TestNet, ca: &MeshCa, etcd: &Etcd, node: usize) -> (String, String) {
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
            &format!("  svid_ttl: 1h\n  ca_service: {{address: {CA}}}\n"),
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

#[test]
fn the_ca_service_signs_only_what_the_registry_places_on_the_asking_node() {
    require_privileges!();
    if let Err(e) = require_tools(&["etcd", "etcdctl", "openssl"]) {
        assert!(!in_ci(), "the CA service test cannot run under CI: {e}");
        eprintln!("skipping: {e}");
        return;
    }
    let net = TestNet::new(3).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let dir = ca.dir.display().to_string();
    for node in ["n0", "n1"] {
        let (ok, out) = meshd(&["ca", "node-credential", node, "--dir", &dir]);
        assert!(ok, "{out}");
    }
    route_pod_subnets(&net);
    let mut etcd = Etcd::start(&net, 2).unwrap();
    etcd.enable_auth(&net, &["n0", "n1", "meshd-ca"]).unwrap();
    let bin = meshd_bin().display().to_string();
    let password = etcd.password_file("meshd-ca").display().to_string();
    let serve = [
        bin.as_str(),
        "ca",
        "serve",
        "--dir",
        &dir,
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
    ];
    let mut service = net.host_process(2, &serve).unwrap();
    service
        .expect_line_containing("CA service ready", WAIT)
        .unwrap();

    let (mut m0, mut m1, s0, s1);
    {
        let (c0, sock0) = config(&net, &ca, &etcd, 0);
        let (c1, sock1) = config(&net, &ca, &etcd, 1);
        m0 = net.start_meshd_with(0, "ebpf", &[], &c0).unwrap();
        m1 = net.start_meshd_with(1, "ebpf", &[], &c1).unwrap();
        (s0, s1) = (sock0, sock1);
    }
    let web = hand_pod(&net, 0, 0);
    let (ok, out) = cni("ADD", &web, "web", &s0);
    assert!(ok, "ADD web: {out}");
    let orders = hand_pod(&net, 1, 0);
    let (ok, out) = cni_labelled("ADD", &orders, "orders-1", "app:orders", &s1);
    assert!(ok, "ADD orders-1: {out}");
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let mut server = run_in_pod(&orders, &[&tool, "echo-server", "0.0.0.0:7000"]);
    server.expect_line("ready", WAIT).unwrap();

    // Pod to pod with SVIDs the CA service signed for each node.
    let target = format!("{}:7000", orders.ip);
    let mut client = run_in_pod(
        &web,
        &[&tool, "client", &target, "2000", "1", "CA-SERVICE-MARKER"],
    );
    let (status, out) = client.wait_output(WAIT).unwrap();
    assert!(status.success(), "web -> orders-1: {out}");
    let line = &m0.wait_access(&["direction=outbound", &target], 1).unwrap()[0];
    assert!(
        line.contains(&format!("peer={ORDERS}")) && line.contains("server_check=verified"),
        "{line}"
    );
    let line = &m1
        .wait_access(&["direction=inbound", "transport=hbone"], 1)
        .unwrap()[0];
    assert!(line.contains(&format!("peer={WEB}")), "{line}");
    let log = service.output_so_far().join("\n");
    for (node, id) in [
        ("n0", WEB),
        ("n1", ORDERS),
        ("n0", "spiffe://cluster.local/ns/meshd-system/sa/n0"),
    ] {
        let signed = log.lines().any(|l| {
            l.contains("certificate signed")
                && l.contains(&format!("node={node}"))
                && l.contains(id)
        });
        assert!(signed, "the CA service signed {id} for {node}:\n{log}");
    }

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
    drop((m0, m1));
}

/// openssl signs a leaf with the node credential and with the node intermediate: only the
/// second verifies against the root.
fn credential_cannot_sign(dir: &Path) {
    std::fs::write(dir.join("san.ext"), format!("subjectAltName=URI:{WEB}\n")).unwrap();
    let (ok, out) = openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "forged.key",
            "-subj",
            "/CN=forged",
            "-out",
            "forged.csr",
        ],
    );
    assert!(ok, "{out}");
    for (signer, out_file) in [
        ("n1-credential", "by-credential.crt"),
        ("n1", "by-intermediate.crt"),
    ] {
        let (ca_cert, ca_key) = (format!("{signer}.crt"), format!("{signer}.key"));
        let (ok, out) = openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "forged.csr",
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "san.ext",
                "-out",
                out_file,
            ],
        );
        assert!(ok, "openssl x509 -req with {signer}: {out}");
    }
    let verify = |untrusted: &str, leaf: &str| {
        openssl(
            dir,
            &[
                "verify",
                "-CAfile",
                "root.crt",
                "-untrusted",
                untrusted,
                leaf,
            ],
        )
    };
    let (ok, out) = verify("n1-credential.crt", "by-credential.crt");
    assert!(
        !ok,
        "a certificate signed with a node credential verified: {out}"
    );
    let (ok, out) = verify("n1.crt", "by-intermediate.crt");
    assert!(
        ok,
        "control: a certificate signed by a node intermediate verifies: {out}"
    );
}
