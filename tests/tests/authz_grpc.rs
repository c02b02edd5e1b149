//! Authorization policy per gRPC call: `greeter` (a gRPC server on :50051, declared
//! `protocol: grpc`) on node 1, `client` on node 0, STRICT mTLS. An ALLOW lets the client call
//! `/greet.Greeter/*`, a DENY takes `/greet.Greeter/Admin` back. On one HTTP/2 connection, Hello
//! is answered by greeter, Admin is answered by meshd with grpc-status 7 (PERMISSION_DENIED,
//! HTTP 200, trailers-only) and never reaches greeter, and the next Hello on the same connection
//! still works.

use std::time::Duration;

use testhosts::{
    policy::{start_policy_mesh, PolicyDir, POLICY_HEAD as HEAD},
    require_privileges, sibling_binary, MeshCa, Meshd, Process, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);

/// The policies: the client may call /greet.Greeter/*, a DENY takes Admin back.
fn policies(net: &TestNet) -> PolicyDir {
    let dir = PolicyDir::new(net).unwrap();
    let allow = format!(
        "{HEAD}metadata: {{name: client-to-greeter, namespace: default}}\nspec:\n  \
         selector: {{matchLabels: {{app: greeter}}}}\n  action: ALLOW\n  rules:\n  \
         - from: [{{source: {{principals: [\"cluster.local/ns/default/sa/client\"]}}}}]\n    \
           to: [{{operation: {{paths: [\"/greet.Greeter/*\"]}}}}]\n"
    );
    let deny = format!(
        "{HEAD}metadata: {{name: no-admin, namespace: default}}\nspec:\n  \
         selector: {{matchLabels: {{app: greeter}}}}\n  action: DENY\n  \
         rules: [{{to: [{{operation: {{paths: [\"/greet.Greeter/Admin\"]}}}}]}}]\n"
    );
    dir.put("10-client-to-greeter.yaml", &allow);
    dir.put("20-no-admin.yaml", &deny);
    dir
}

#[test]
fn grpc_calls_are_decided_one_by_one_on_one_connection() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let dir = policies(&net);
    let tool = sibling_binary("testhosts-tool").display().to_string();
    let mut greeter = net
        .workload(1, "greeter", &[&tool, "grpc-server", "0.0.0.0:50051"])
        .unwrap();
    greeter.expect_line("ready", WAIT).unwrap();
    let greeter_ports = "  ports: [{port: 50051, protocol: grpc}]\n  labels: {app: greeter}\n";
    let (mut a, mut b) = start_policy_mesh(
        &net,
        &ca,
        &["client", "stranger"],
        ("greeter", greeter_ports),
        &dir,
        "",
    )
    .unwrap();

    let target = format!("{}:50051", net.node(1).addr);
    let (hello, admin) = ("/greet.Greeter/Hello", "/greet.Greeter/Admin");
    let mut client = net
        .workload(
            0,
            "client",
            &[&tool, "grpc-client", &target, hello, admin, hello],
        )
        .unwrap();
    let (status, out) = client.wait_output(WAIT).unwrap();
    let logs = |a: &mut Meshd, b: &mut Meshd, greeter: &mut Process| {
        format!(
            "client meshd:\n{}\ngreeter meshd:\n{}\ngreeter:\n{}",
            a.process.output_so_far().join("\n"),
            b.process.output_so_far().join("\n"),
            greeter.output_so_far().join("\n")
        )
    };
    assert!(
        status.success(),
        "grpc-client failed ({status}):\n{out}\n{}",
        logs(&mut a, &mut b, &mut greeter)
    );
    let expected = [
        format!("{hello} status=200 grpc-status=0 body={hello}:hi"),
        format!("{admin} status=200 grpc-status=7 body=-"),
        format!("{hello} status=200 grpc-status=0 body={hello}:hi"),
        "connections=1".to_string(),
    ];
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        expected,
        "{}",
        logs(&mut a, &mut b, &mut greeter)
    );

    // The connection's access line counts the HTTP/2 bytes relayed both ways.
    let access = b
        .wait_access(&["direction=inbound", "workload=default/greeter"], 1)
        .unwrap();
    assert!(
        !access[0].contains("bytes_sent=0 ") && !access[0].contains("bytes_received=0 "),
        "{}",
        access[0]
    );

    // greeter saw the two Hellos on one connection, and never the Admin call (it would have
    // come between them).
    for _ in 0..2 {
        greeter.expect_line(&format!("call {hello}"), WAIT).unwrap();
    }
    let seen = greeter.output_so_far();
    let count = |prefix: &str| seen.iter().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count("accepted "), 1, "{seen:?}");
    assert_eq!(count(&format!("call {hello}")), 2, "{seen:?}");
    assert_eq!(count(&format!("call {admin}")), 0, "{seen:?}");

    // The denial is counted at the gRPC layer, against the DENY policy.
    let metrics = || b.metrics(&net, 1).unwrap();
    let deny = "decision=\"deny\"";
    assert_eq!(grpc_decisions(&b, &net, &[deny]), 1.0, "{}", metrics());
    let by_policy = [
        deny,
        "policy=\"default/no-admin\"",
        "reason=\"denied_by_policy\"",
    ];
    assert_eq!(grpc_decisions(&b, &net, &by_policy), 1.0, "{}", metrics());
    let allowed = ["decision=\"allow\""];
    assert_eq!(grpc_decisions(&b, &net, &allowed), 2.0, "{}", metrics());

    // A caller no ALLOW rule names is refused at the connection, before greeter is dialled;
    // its calls are answered as denied calls are.
    let mut stranger = net
        .workload(0, "stranger", &[&tool, "grpc-client", &target, hello])
        .unwrap();
    let (status, out) = stranger.wait_output(WAIT).unwrap();
    assert!(
        status.success(),
        "grpc-client failed ({status}):\n{out}\n{}",
        logs(&mut a, &mut b, &mut greeter)
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("{hello} status=200 grpc-status=7 body=-").as_str(),
            "connections=1"
        ],
        "{}",
        logs(&mut a, &mut b, &mut greeter)
    );
    let refused = grpc_decisions(
        &b,
        &net,
        &["decision=\"deny\"", "reason=\"no_allow_match\""],
    );
    assert_eq!(refused, 1.0, "{}", b.metrics(&net, 1).unwrap());
    assert_eq!(
        greeter
            .output_so_far()
            .iter()
            .filter(|l| l.starts_with("accepted "))
            .count(),
        1
    );
}

/// `meshd_policy_decisions_total` at the gRPC layer, for samples that also carry `more`.
fn grpc_decisions(meshd: &Meshd, net: &TestNet, more: &[&str]) -> f64 {
    let mut needles = vec!["meshd_policy_decisions_total", "layer=\"grpc\""];
    needles.extend_from_slice(more);
    meshd.metric_sum(net, 1, &needles)
}
