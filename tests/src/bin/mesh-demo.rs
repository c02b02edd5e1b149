//! The README's main job: a small mesh on this machine. Three test nodes in network namespaces;
//! meshd on two of them (mode from the first argument, default auto); a workload on node 0 talks
//! to a workload on node 1 through mTLS; another workload of node 0, with a valid identity the
//! workload's AuthorizationPolicy does not name, is refused; node 2, outside the mesh, tries
//! plaintext and is refused; the Istio-named metrics and the service graph show it all.
//! Everything is removed at the end.

use std::time::Duration;

use anyhow::{Context, Result};
use testhosts::{
    policy::{start_policy_mesh_in, PolicyDir, POLICY_HEAD},
    privileges, sibling_binary, MeshCa, Meshd, Process, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    privileges()
        .map_err(anyhow::Error::msg)
        .context("the demo creates network namespaces")?;
    let mode = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    let net = TestNet::new(3)?;
    let ca = MeshCa::new(&net)?;
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let (a, b, c) = (net.node(0).addr, net.node(1).addr, net.node(2).addr);
    println!("== test nodes: n0 {a} (workload checkout), n1 {b} (workload orders :7000), n2 {c} (outside the mesh)");
    let _server = net.echo_server(1, Some("orders"), "0.0.0.0:7000")?;
    let policy = format!(
        "{POLICY_HEAD}metadata: {{name: orders-from-checkout, namespace: default}}\nspec:\n  \
         selector: {{matchLabels: {{app: orders}}}}\n  \
         rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/checkout]}}}}]}}]\n"
    );
    let dir = PolicyDir::new(&net)?;
    dir.put("orders.yaml", &policy);
    println!(
        "== AuthorizationPolicy on orders: only cluster.local/ns/default/sa/checkout may connect"
    );
    let orders = ("orders", "  ports: [7000]\n  labels: {app: orders}\n");
    let clients = ["checkout", "intruder"];
    let (mut m0, mut m1) = start_policy_mesh_in(&mode, &net, &ca, &clients, orders, (&dir, ""))?;
    let picked = m0
        .process
        .output_so_far()
        .into_iter()
        .find(|l| l.contains("meshd ready"));
    println!(
        "== meshd on n0 and n1 (--mode={mode}): {}",
        picked.unwrap_or_default().trim()
    );

    let target = format!("{b}:7000");
    println!(
        "\n== checkout on n0 connects to {target}, 20 connections of 10 KiB, echoed and compared"
    );
    let mut run = net.workload(0, "checkout", &[&tool, "client", &target, "10240", "20"])?;
    let (status, out) = run.wait_output(WAIT)?;
    println!("{out}");
    anyhow::ensure!(status.success(), "the request through the mesh failed");
    show(
        "n0 (sender) access log, first line",
        &mut m0,
        "direction=outbound",
        20,
    )?;
    show(
        "n1 (receiver) access log, first line: the peer is checkout's SPIFFE ID",
        &mut m1,
        "transport=hbone",
        20,
    )?;
    println!("\n== n1 metrics, Istio's standard names (a few labels of each shown)");
    for line in m1.metrics(&net, 1)?.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            || l.starts_with("istio_tcp_received_bytes_total{")
    }) {
        println!("  {}", brief(line));
    }

    println!(
        "\n== intruder on n0 (its own valid SVID, not named by the policy) connects to {target}"
    );
    let intruder = net.workload(0, "intruder", &[&tool, "client", &target, "100", "1"])?;
    refused(intruder, &mut m1, "denied by authorization policy")?;
    for line in
        (m1.metrics(&net, 1)?.lines()).filter(|l| l.starts_with("meshd_policy_decisions_total{"))
    {
        println!("  {line}");
    }

    println!("\n== n2 (no meshd) tries plaintext to {target}: PeerAuthentication is STRICT");
    let outsider = net.host_process(2, &[&tool, "client", &target, "100", "1"])?;
    refused(outsider, &mut m1, "plaintext connection refused")?;
    println!(
        "\n== n1's service graph (admin API, 127.0.0.1:15000/graph in n1's namespace; \
         on a real node: ssh -L 15000:127.0.0.1:15000 NODE, then http://127.0.0.1:15000/graph)"
    );
    let script = "import urllib.request as u;\
                  print(u.urlopen('http://127.0.0.1:15000/graph.json').read().decode())";
    let graph: serde_json::Value = serde_json::from_str(&net.exec(1, &["python3", "-c", script])?)?;
    for e in graph["edges"].as_array().into_iter().flatten() {
        let security = if e["mtls"] == true {
            "mTLS"
        } else {
            "plaintext"
        };
        println!(
            "  {} -> {}  {security}  connections {}  denied {}",
            e["source"].as_str().unwrap_or("?"),
            e["destination"].as_str().unwrap_or("?"),
            e["opened"],
            e["denied"]
        );
    }
    println!("\n== done; namespaces, cgroups, links and rules are removed now");
    Ok(())
}

/// Shows how a client that must be refused fared, and the line of the receiving meshd that
/// says why (containing `why`).
fn refused(mut client: Process, receiver: &mut Meshd, why: &str) -> Result<()> {
    let (status, out) = client.wait_output(WAIT)?;
    let outcome = if status.success() {
        "SUCCEEDED (unexpected)"
    } else {
        "refused"
    };
    let last = out.lines().last().unwrap_or_default();
    println!("  client {outcome}: {last}");
    let line = receiver.process.expect_line_containing(why, WAIT)?;
    println!("  n1 meshd: {}", line.trim());
    Ok(())
}

/// A metric line with only the labels that tell the story.
fn brief(line: &str) -> String {
    const KEEP: [&str; 5] = [
        "reporter=",
        "source_principal=",
        "destination_workload=",
        "connection_security_policy=",
        "response_flags=",
    ];
    let Some((name, rest)) = line.split_once('{') else {
        return line.to_string();
    };
    let (labels, value) = rest.rsplit_once("} ").unwrap_or((rest, ""));
    let kept: Vec<&str> = (labels.split(','))
        .filter(|l| KEEP.iter().any(|k| l.starts_with(k)))
        .collect();
    format!("{name}{{{}}} {value}", kept.join(","))
}

fn show(title: &str, meshd: &mut Meshd, needle: &str, count: usize) -> Result<()> {
    let lines = meshd.wait_access(&[needle], count)?;
    println!(
        "\n== {title} ({} lines)\n  {}",
        lines.len(),
        lines[0].trim()
    );
    Ok(())
}
