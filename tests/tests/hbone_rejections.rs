//! Every way a peer can fail meshd's :15008 is refused with a reason of its own — in the log and
//! as a metric label — and meshd keeps serving the next, valid, peer. The checks on :15008 do
//! not depend on the interception mode, so this runs in one (ebpf). The CONNECT headers a peer
//! adds (`Forwarded`, `traceparent`, as ztunnel writes them) reach the access line; malformed
//! ones are ignored and counted, and the stream is carried all the same.

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
        self.hbone_with(authority, cert, &[])
    }

    /// With extra CONNECT headers (`NAME: VALUE`; only with a certificate).
    fn hbone_with(
        &self,
        authority: &str,
        cert: Option<&(String, String)>,
        headers: &[&str],
    ) -> String {
        let mut argv = vec![self.tool.as_str(), "hbone", &self.addr, authority];
        if let Some((crt, key)) = cert {
            argv.extend([crt.as_str(), key.as_str()]);
            argv.extend(headers);
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

/// Client certificates, each wrong in one way (and one good), written under the CA's directory.
struct Certs {
    good: (String, String),
    expired: (String, String),
    future: (String, String),
    other_td: (String, String),
    revoked: (String, String),
    other_ca: (String, String),
}

impl Certs {
    fn mint(dir: &Path) -> Certs {
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
        Certs {
            good,
            expired,
            future,
            other_td,
            revoked: revoked_cert,
            other_ca,
        }
    }
}

/// Handshakes that must fail, each counted under its own reason.
fn bad_handshakes_are_refused(probe: &Probe, meshd: &Meshd, certs: &Certs, workload: &str) {
    let net = probe.net;
    let tool = probe.tool.as_str();
    let handshake = |reason: &str| {
        format!("meshd_tls_handshakes_total{{direction=\"inbound\",result=\"{reason}\"}}")
    };
    for (cert, reason) in [
        (Some(&certs.expired), "expired"),
        (Some(&certs.future), "not_yet_valid"),
        (Some(&certs.other_ca), "unknown_ca"),
        (Some(&certs.other_td), "wrong_trust_domain"),
        (Some(&certs.revoked), "revoked"),
        (None, "no_client_cert"),
    ] {
        let out = probe.hbone(workload, cert);
        assert!(!out.contains("status 200"), "{reason}: got through: {out}");
        assert_eq!(
            counter(meshd, net, &handshake(reason)),
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
        counter(meshd, net, &handshake("tls_version")),
        1,
        "TLS 1.2: {out}"
    );
    probe.run(&[
        tool,
        "raw",
        &probe.addr,
        "GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
    ]);
    assert_eq!(counter(meshd, net, &handshake("plaintext_http")), 1);
    probe.run(&[tool, "raw", &probe.addr, "random"]);
    assert_eq!(counter(meshd, net, &handshake("not_tls")), 1);
}

/// meshd on node 0 serving `orders` on :7000, with one SPIFFE ID denied.
fn start_meshd(net: &TestNet, ca_files: &MeshCa) -> Meshd {
    let spec = [WorkloadSpec {
        name: "orders",
        ports: &[7000],
    }];
    let revoked = "spiffe://cluster.local/ns/default/sa/revoked";
    let identity = ca_files.config(0, "24h", &[revoked]);
    net.start_meshd_with(0, "ebpf", &spec, &identity).unwrap()
}

#[test]
fn every_bad_peer_is_refused_with_its_own_reason_and_meshd_keeps_serving() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca_files = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(0, Some("orders"), "0.0.0.0:7000").unwrap();
    let mut meshd = start_meshd(&net, &ca_files);

    let certs = Certs::mint(&ca_files.dir);
    let node0 = net.node(0).addr;
    let probe = Probe {
        net: &net,
        tool: sibling_binary("testhosts-tool").display().to_string(),
        addr: format!("{node0}:15008"),
    };
    let workload = format!("{node0}:7000");
    let refused = |reason: &str| {
        format!("meshd_connections_rejected_total{{direction=\"inbound\",reason=\"{reason}\"}}")
    };
    bad_handshakes_are_refused(&probe, &meshd, &certs, &workload);

    let elsewhere = format!("{}:7000", net.node(1).addr);
    for (authority, reason) in [
        (elsewhere.as_str(), "not_local_workload"),
        ("127.0.0.1:7000", "not_local_workload"),
        (&format!("{node0}:15000"), "meshd_port"),
        (&format!("{node0}:15008"), "meshd_port"),
    ] {
        let out = probe.hbone(authority, Some(&certs.good));
        assert!(out.contains("status 403"), "{authority}: {out}");
        assert!(
            counter(&meshd, &net, &refused(reason)) >= 1,
            "{authority}: {reason}"
        );
    }

    undeliverable_authorities_are_refused(&probe, &meshd, &certs.good);

    // And after all that, a good peer still gets through.
    let out = probe.hbone(&workload, Some(&certs.good));
    assert!(
        out.contains("status 200") && out.contains("echo ok"),
        "{out}"
    );
    let peer = "peer=spiffe://cluster.local/ns/default/sa/checkout";
    meshd.wait_access(&["transport=hbone", peer], 1).unwrap();
    claimed_headers_reach_the_access_line(&probe, &mut meshd, &workload, &certs.good);
    let log = meshd.process.output_so_far().join("\n");
    for reason in ["expired", "unknown_ca", "revoked", "not_tls", "meshd_port"] {
        assert!(
            log.contains(&format!("reason=\"{reason}\""))
                || log.contains(&format!("reason={reason}")),
            "{reason} not logged"
        );
    }
}

/// Well-formed authorities meshd cannot deliver to: 501, each with its reason; bytes that are
/// no authority: 400.
fn undeliverable_authorities_are_refused(probe: &Probe, meshd: &Meshd, cert: &(String, String)) {
    for (authority, status, reason) in [
        (
            "orders.default.svc.cluster.local:7000",
            501,
            "authority_hostname",
        ),
        ("[2001:db8::1]:7000", 501, "authority_ipv6"),
        ("1.2.3.4.5:7000", 400, "bad_authority"),
    ] {
        let out = probe.hbone(authority, Some(cert));
        assert!(
            out.contains(&format!("status {status}")),
            "{authority}: {out}"
        );
        let series = format!(
            "meshd_connections_rejected_total{{direction=\"inbound\",reason=\"{reason}\"}}"
        );
        assert_eq!(counter(meshd, probe.net, &series), 1, "{authority}");
    }
}

/// `Forwarded` and `traceparent` as ztunnel sends them, an IPv6 source, then malformed and
/// oversized ones: the stream is carried every time; what checks out is in the access line,
/// the rest is counted.
fn claimed_headers_reach_the_access_line(
    probe: &Probe,
    meshd: &mut Meshd,
    workload: &str,
    cert: &(String, String),
) {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let ztunnel_like = [
        r#"forwarded: for="198.18.0.77:4711";host=orders.default.svc.cluster.local"#,
        &format!("traceparent: 00-{trace}-00f067aa0ba902b7-00"),
    ];
    let v6 = [r#"forwarded: for="[2001:db8::7]""#];
    let long = format!(
        "traceparent: 00-{trace}-00f067aa0ba902b7-00{}",
        "-x".repeat(200)
    );
    let bad = ["forwarded: for=[::1]", &long];
    for headers in [&ztunnel_like[..], &v6, &bad] {
        let out = probe.hbone_with(workload, Some(cert), headers);
        assert!(out.contains("echo ok"), "{headers:?}: {out}");
    }
    let hbone = "transport=hbone";
    let trace_needle = format!("trace_id={trace}");
    meshd
        .wait_access(&[hbone, "forwarded_for=198.18.0.77", &trace_needle], 1)
        .unwrap();
    meshd
        .wait_access(&[hbone, "forwarded_for=2001:db8::7", "trace_id=-"], 1)
        .unwrap();
    // The plain good probe before, and the malformed one.
    meshd
        .wait_access(&[hbone, "forwarded_for=- trace_id=-"], 2)
        .unwrap();
    let ignored = |header: &str, reason: &str| {
        let series =
            format!("meshd_hbone_headers_ignored_total{{header=\"{header}\",reason=\"{reason}\"}}");
        counter(meshd, probe.net, &series)
    };
    assert_eq!(ignored("forwarded", "malformed"), 1);
    assert_eq!(ignored("traceparent", "oversized"), 1);
}
