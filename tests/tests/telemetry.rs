//! Operating meshd: Istio's standard metrics read as Prometheus reads them (a text-format
//! parser), with bytes counted while a connection is still open; the admin API's config dump,
//! run-time log level and `meshd status`; readiness that turns 503 while meshd drains, and a
//! connection open at SIGTERM that is still served until it finishes; the /graph page in
//! headless Chromium.

use std::time::Duration;

use testhosts::{
    meshd_bin,
    policy::{self, start_db_mesh, PolicyDir, POLICY_HEAD},
    require_privileges, start_checkout_orders, MeshCa, Meshd, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);

/// A client that holds one connection to the echo server: 100,000 bytes, a pause, 200,000
/// more, a pause, then it closes. Prints each phase once its echo is back.
const HOLDING_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7000), timeout=30)
def exchange(n):
    s.sendall(b"x" * n)
    got = 0
    while got < n:
        more = s.recv(65536)
        if not more:
            raise SystemExit("closed after %d of %d" % (got, n))
        got += len(more)
for phase, n in [("one", 100000), ("two", 200000)]:
    exchange(n)
    print("phase", phase, flush=True)
    time.sleep(float(sys.argv[2]))
s.close()
print("done", flush=True)
"#;

/// GET on meshd's admin or health endpoints inside `node`: "STATUS BODY".
fn get(net: &TestNet, node: usize, url: &str) -> String {
    let script = "import sys, urllib.request as u, urllib.error as e\n\
                  try:\n    r = u.urlopen(sys.argv[1], timeout=10); print(r.status, r.read().decode())\n\
                  except e.HTTPError as x:\n    print(x.code, x.read().decode())";
    net.exec(node, &["python3", "-c", script, url]).unwrap()
}

fn post(net: &TestNet, node: usize, url: &str) -> String {
    let script = "import sys, urllib.request as u\n\
                  r = u.urlopen(u.Request(sys.argv[1], data=b'', method='POST'), timeout=10)\n\
                  print(r.status, r.read().decode())";
    net.exec(node, &["python3", "-c", script, url]).unwrap()
}

/// The sum of the samples of `metric` whose labels include every `(name, value)` of `labels`,
/// from a scrape parsed as Prometheus would parse it.
fn sum(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn scrape(meshd: &Meshd, net: &TestNet, node: usize) -> prometheus_parse::Scrape {
    let text = meshd.metrics(net, node).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the scrape parses as Prometheus text")
}

const CHECKOUT: &str = "spiffe://cluster.local/ns/default/sa/checkout";

#[test]
fn istio_metrics_count_bytes_while_a_connection_is_open() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    let (a, b) = start_checkout_orders(&net, &ca, "ebpf", "24h").unwrap();
    let target = net.node(1).addr.to_string();
    let argv = ["python3", "-c", HOLDING_CLIENT, &target, "3"];
    let mut client = net.workload(0, "checkout", &argv).unwrap();

    let outbound = [
        ("reporter", "source"),
        ("source_workload", "checkout"),
        ("source_principal", CHECKOUT),
        ("connection_security_policy", "mutual_tls"),
    ];
    let inbound = [
        ("reporter", "destination"),
        // Named by the baggage of the CONNECT, believed within the verified namespace.
        ("source_workload", "checkout"),
        ("source_principal", CHECKOUT),
        ("destination_workload", "orders"),
        ("destination_workload_namespace", "default"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/orders",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    client.expect_line("phase one", WAIT).unwrap();
    let first = (scrape(&a, &net, 0), scrape(&b, &net, 1));
    let received = "istio_tcp_received_bytes_total";
    assert!(sum(&first.0, received, &outbound) >= 100_000.0);
    assert!(sum(&first.1, received, &inbound) >= 100_000.0);
    assert!(sum(&first.1, "istio_tcp_sent_bytes_total", &inbound) >= 100_000.0);
    assert_eq!(
        sum(&first.0, "istio_tcp_connections_opened_total", &outbound),
        1.0
    );
    assert_eq!(
        sum(&first.0, "istio_tcp_connections_closed_total", &outbound),
        0.0
    );

    client.expect_line("phase two", WAIT).unwrap();
    // Still the same open connection, and its counters moved.
    let second = (scrape(&a, &net, 0), scrape(&b, &net, 1));
    assert!(sum(&second.0, received, &outbound) >= 300_000.0);
    assert!(sum(&second.1, received, &inbound) >= 300_000.0);
    assert_eq!(
        sum(&second.1, "istio_tcp_connections_closed_total", &inbound),
        0.0
    );
    client.expect_line("done", WAIT).unwrap();

    let deadline = std::time::Instant::now() + WAIT;
    while sum(
        &scrape(&b, &net, 1),
        "istio_tcp_connections_closed_total",
        &inbound,
    ) < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the close is never counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = scrape(&a, &net, 0);
    let expiry = sum(
        &last,
        "meshd_certificate_expiry_seconds",
        &[("spiffe_id", CHECKOUT)],
    );
    assert!(
        expiry > 23.0 * 3600.0 && expiry <= 24.0 * 3600.0,
        "{expiry}"
    );
    assert_eq!(sum(&last, "meshd_build_info", &[("mode", "ebpf")]), 1.0);
}

#[test]
fn admin_api_dumps_config_changes_log_level_and_drains_on_sigterm() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000").unwrap();
    let (mut a, _b) = start_checkout_orders(&net, &ca, "ebpf", "24h").unwrap();

    let dump = get(&net, 0, "http://127.0.0.1:15000/config_dump");
    let json: serde_json::Value = serde_json::from_str(dump.strip_prefix("200 ").unwrap()).unwrap();
    assert_eq!(json["mode"], "ebpf");
    assert_eq!(json["ready"], true);
    assert_eq!(json["workloads"][0]["workload"]["spiffe_id"], CHECKOUT);
    let certs = json["certificates"].as_array().unwrap();
    let mine = certs.iter().find(|c| c["spiffe_id"] == CHECKOUT).unwrap();
    assert!(mine["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(mine["not_after"].as_u64().unwrap() > mine["not_before"].as_u64().unwrap());
    assert!(json["trust_bundle"]["roots"]
        .as_array()
        .is_some_and(|r| r.len() == 1));

    // The admin API is on loopback only: not reachable at the node's address.
    let addr = net.node(0).addr;
    let from_outside = net.exec(1, &["python3", "-c", &format!(
        "import socket\ntry:\n    socket.create_connection(('{addr}', 15000), timeout=3); print('open')\nexcept OSError: print('refused')"
    )]);
    assert_eq!(from_outside.unwrap().trim(), "refused");

    // The log filter changes at run time: debug lines appear for the next connection.
    assert!(post(&net, 0, "http://127.0.0.1:15000/logging?level=debug").starts_with("200 debug"));
    assert!(get(&net, 0, "http://127.0.0.1:15000/logging").starts_with("200 debug"));
    let target = net.node(1).addr.to_string();
    let quick = ["python3", "-c", HOLDING_CLIENT, &target, "0"];
    let (ok, out) = net
        .workload(0, "checkout", &quick)
        .unwrap()
        .wait_output(WAIT)
        .unwrap();
    assert!(ok.success(), "{out}");
    a.process.expect_line_containing("DEBUG", WAIT).unwrap();
    let bad = get(&net, 0, "http://127.0.0.1:15000/logging?level=debug");
    assert!(bad.starts_with("200"), "GET never changes the level: {bad}");

    let status = net
        .exec(0, &[&meshd_bin().display().to_string(), "status"])
        .unwrap();
    assert!(
        status.contains("ready: yes") && status.contains(CHECKOUT),
        "{status}"
    );

    // Drain: a connection open at SIGTERM is served to its end; readiness says draining.
    assert!(get(&net, 0, "http://127.0.0.1:15021/healthz/ready").starts_with("200"));
    let held = ["python3", "-c", HOLDING_CLIENT, &target, "1"];
    let mut client = net.workload(0, "checkout", &held).unwrap();
    client.expect_line("phase one", WAIT).unwrap();
    a.process.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    a.process.expect_line_containing("draining", WAIT).unwrap();
    let ready = get(&net, 0, "http://127.0.0.1:15021/healthz/ready");
    assert!(ready.starts_with("503 not ready: draining"), "{ready}");
    client.expect_line("phase two", WAIT).unwrap();
    client.expect_line("done", WAIT).unwrap();
    let (exit, log) = a.process.wait_output(WAIT).unwrap();
    assert!(exit.success(), "{log}");
    assert!(log.contains("drained"), "{log}");
}

/// The /graph page in headless Chromium: it draws the edges the test made (www to db over mTLS,
/// auth to db denied by policy), read back from the page's DOM; a screenshot is kept in
/// `target/tmp/graph.png`.
#[test]
fn graph_page_in_headless_chromium_shows_the_edges_and_denials() {
    require_privileges!();
    require_privileges!(testhosts::require_tools(&["chromium", "curl"]).map_err(|e| e.to_string()));
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let dir = PolicyDir::new(&net).unwrap();
    dir.put(
        "www-to-db.yaml",
        &format!(
            "{POLICY_HEAD}metadata: {{name: www-to-db, namespace: default}}\nspec:\n  \
             selector: {{matchLabels: {{app: db}}}}\n  action: ALLOW\n  rules:\n  \
             - from: [{{source: {{principals: [cluster.local/ns/default/sa/www]}}}}]\n"
        ),
    );
    let (_db, _a, _b) = start_db_mesh(&net, &ca, &["www", "auth"], &dir, "").unwrap();
    let url = format!("http://{}:8080/items", net.node(1).addr);
    for (who, expect) in [("www", "[200]"), ("auth", "[403]")] {
        let out = policy::curl(&net, Some(who), &[&url]);
        assert!(out.trim_end().ends_with(expect), "{who}: {out}");
    }

    let profile = format!("/tmp/{}-chromium", net.id());
    let chromium = |extra: &[&str]| {
        let mut argv = vec![
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
        ];
        let data = format!("--user-data-dir={profile}");
        argv.push(&data);
        argv.extend_from_slice(extra);
        argv.push("http://127.0.0.1:15000/graph");
        let out = net.exec(1, &argv);
        out.unwrap()
    };
    let dom = chromium(&["--dump-dom"]);
    let shot = format!("{}/graph.png", env!("CARGO_TARGET_TMPDIR"));
    chromium(&[&format!("--screenshot={shot}"), "--window-size=1000,900"]);
    let _ = std::fs::remove_dir_all(&profile);

    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page never loaded /graph.json:\n{dom}"
    );
    let row = |source: &str| {
        let start = dom
            .find(&format!("<tr class=\"edge\" data-source=\"{source}\""))
            .unwrap_or_else(|| panic!("no edge from {source} in the page:\n{dom}"));
        let end = start + dom[start..].find("</tr>").unwrap();
        dom[start..end].to_string()
    };
    let www = row("default/www");
    assert!(
        www.contains("data-destination=\"default/db\"") && www.contains("data-mtls=\"true\""),
        "{www}"
    );
    assert!(!www.contains("num denied"), "www was never denied: {www}");
    let auth = row("default/auth");
    assert!(
        auth.contains("<td class=\"num denied\">1</td>"),
        "auth's request was denied: {auth}"
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
}
