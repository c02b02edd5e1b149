//! Every way a peer can fail meshd's :15008 is refused with a reason of its own — in the log and
//! as a metric label — and meshd keeps serving the next, valid, peer. The checks on :15008 do
//! not depend on the interception mode, so this runs in one (ebpf).

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use meshd::identity::{ca, svid, SpiffeId};
use testhosts::{require_privileges, sibling_binary, MeshCa, Meshd, TestNet, WorkloadSpec};

const WAIT: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);

fn id(td: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, "default", sa).unwrap()
}

/// Writes `<dir>/<name>.crt|.key` for an SVID and returns their paths.
fn write(dir: &Path, name: &str, svid: svid::Svid) -> (String, String) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, svid.chain_pem).unwrap();
    std::fs::write(&key, svid.key_pem).unwrap();
    (crt.display().to_string(), key.display().to_string())
}

struct Probe<'a> {
    net: &'a TestNet,
    tool: String,
    addr: String,
}

impl Probe<'_> {
    fn run(&self, argv: &[&str]) -> String {
        let mut p = self.net.host_process(1, argv).unwrap();
        let (_, out) = p.wait_output(WAIT).unwrap();
        out
    }

    fn hbone(&self, authority: &str, cert: Option<&(String, String)>) -> String {
        let mut argv = vec![self.tool.as_str(), "hbone", &self.addr, authority];
        if let Some((crt, key)) = cert {
            argv.extend([crt.as_str(), key.as_str()]);
        }
        self.run(&argv)
    }
}

fn counter(meshd: &Meshd, net: &TestNet, series: &str) -> u64 {
    let text = meshd.metrics(net, 0).unwrap();
    let line = text.lines().find(|l| l.starts_with(series));
    line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn every_bad_peer_is_refused_with_its_own_reason_and_meshd_keeps_serving() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca_files = MeshCa::new(&net).unwrap();
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let _server = net.echo_server(0, Some("orders"), "0.0.0.0:7000").unwrap();
    let spec = [WorkloadSpec {
        name: "orders",
        ports: &[7000],
    }];
    let revoked = "spiffe://cluster.local/ns/default/sa/revoked";
    let identity = ca_files.config(0, "24h", &[revoked]);
    let mut meshd = net.start_meshd_with(0, "ebpf", &spec, &identity).unwrap();

    let dir = &ca_files.dir;
    let issuer = ca::Issuer::load(&dir.join("n1.crt"), &dir.join("n1.key")).unwrap();
    let now = SystemTime::now();
    let good = write(
        dir,
        "good",
        svid::mint(&issuer, &id("cluster.local", "checkout"), HOUR).unwrap(),
    );
    let checkout = id("cluster.local", "checkout");
    let expired = write(
        dir,
        "expired",
        svid::mint_valid(&issuer, &checkout, now - 2 * HOUR, now - HOUR).unwrap(),
    );
    let future = write(
        dir,
        "future",
        svid::mint_valid(&issuer, &checkout, now + HOUR, now + 2 * HOUR).unwrap(),
    );
    let other_td = write(
        dir,
        "other-td",
        svid::mint(&issuer, &id("evil.local", "checkout"), HOUR).unwrap(),
    );
    let revoked_cert = write(
        dir,
        "revoked",
        svid::mint(&issuer, &id("cluster.local", "revoked"), HOUR).unwrap(),
    );
    let other_dir = dir.join("other-ca");
    ca::init(&other_dir, "cluster.local").unwrap();
    ca::issue_node(&other_dir, "x", HOUR).unwrap();
    let other = ca::Issuer::load(&other_dir.join("x.crt"), &other_dir.join("x.key")).unwrap();
    let other_ca = write(
        dir,
        "other-ca",
        svid::mint(&other, &checkout, HOUR).unwrap(),
    );

    let node0 = net.node(0).addr;
    let probe = Probe {
        net: &net,
        tool: tool.clone(),
        addr: format!("{node0}:15008"),
    };
    let workload = format!("{node0}:7000");
    let handshake = |reason: &str| {
        format!("meshd_tls_handshakes_total{{direction=\"inbound\",result=\"{reason}\"}}")
    };
    let refused = |reason: &str| {
        format!("meshd_connections_rejected_total{{direction=\"inbound\",reason=\"{reason}\"}}")
    };

    for (cert, reason) in [
        (Some(&expired), "expired"),
        (Some(&future), "not_yet_valid"),
        (Some(&other_ca), "unknown_ca"),
        (Some(&other_td), "wrong_trust_domain"),
        (Some(&revoked_cert), "revoked"),
        (None, "no_client_cert"),
    ] {
        let out = probe.hbone(&workload, cert);
        assert!(!out.contains("status 200"), "{reason}: got through: {out}");
        assert_eq!(
            counter(&meshd, &net, &handshake(reason)),
            1,
            "{reason}: {out}"
        );
    }
    let openssl = [
        "openssl",
        "s_client",
        "-connect",
        probe.addr.as_str(),
        "-tls1_2",
    ];
    let out = probe.run(&["sh", "-c", &format!("{} </dev/null", openssl.join(" "))]);
    assert_eq!(
        counter(&meshd, &net, &handshake("tls_version")),
        1,
        "TLS 1.2: {out}"
    );
    probe.run(&[
        &tool,
        "raw",
        &probe.addr,
        "GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
    ]);
    assert_eq!(counter(&meshd, &net, &handshake("plaintext_http")), 1);
    probe.run(&[&tool, "raw", &probe.addr, "random"]);
    assert_eq!(counter(&meshd, &net, &handshake("not_tls")), 1);

    let elsewhere = format!("{}:7000", net.node(1).addr);
    for (authority, reason) in [
        (elsewhere.as_str(), "not_local_workload"),
        ("127.0.0.1:7000", "not_local_workload"),
        (&format!("{node0}:15000"), "meshd_port"),
        (&format!("{node0}:15008"), "meshd_port"),
    ] {
        let out = probe.hbone(authority, Some(&good));
        assert!(out.contains("status 403"), "{authority}: {out}");
        assert!(
            counter(&meshd, &net, &refused(reason)) >= 1,
            "{authority}: {reason}"
        );
    }

    // And after all that, a good peer still gets through.
    let out = probe.hbone(&workload, Some(&good));
    assert!(
        out.contains("status 200") && out.contains("echo ok"),
        "{out}"
    );
    let peer = "peer=spiffe://cluster.local/ns/default/sa/checkout";
    meshd.wait_access(&["transport=hbone", peer], 1).unwrap();
    let log = meshd.process.output_so_far().join("\n");
    for reason in ["expired", "unknown_ca", "revoked", "not_tls", "meshd_port"] {
        assert!(
            log.contains(&format!("reason=\"{reason}\""))
                || log.contains(&format!("reason={reason}")),
            "{reason} not logged"
        );
    }
}
