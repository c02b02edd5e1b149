//! Authorization policy end to end, the sidecar article's three services: `www` and `auth` on
//! node 0, `db` (HTTP on :8080, declared `protocol: http`) on node 1, STRICT mTLS, default
//! deny. www may GET and POST db, auth may not (it dials db's address directly: there is no
//! other way in), a DENY beats the ALLOW, AUDIT logs and allows; then live reload: a broken file
//! leaves the old policy in force, and removing the ALLOW closes the open connection it covered; SIGHUP reloads too.

use std::time::{Duration, Instant};

use testhosts::{
    policy::{self, start_db_mesh, PolicyDir, POLICY_HEAD as HEAD},
    require_privileges, MeshCa, Meshd, Process, TestNet,
};

const WAIT: Duration = Duration::from_secs(30);

/// A keep-alive client: one GET, then it waits for the server side to close and prints when.
const HOLDING_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8080), timeout=30)
s.sendall(b"GET /held HTTP/1.1\r\nHost: db\r\n\r\n")
got = b""
while not got.endswith(b"db GET /held 0"):
    more = s.recv(4096)
    if not more:
        break
    got += more
print("response", got.split(b"\r\n")[0].decode(), flush=True)
print("open", flush=True)
try:
    data = s.recv(4096)
except OSError as e:
    data = b""
print("closed %.3f %r" % (time.time(), data[:40]), flush=True)
"#;

fn www_to_db(principal: &str) -> String {
    format!(
        "{HEAD}metadata: {{name: www-to-db, namespace: default}}\nspec:\n  \
         selector: {{matchLabels: {{app: db}}}}\n  action: ALLOW\n  rules:\n  \
         - from: [{{source: {{principals: [\"cluster.local/ns/default/sa/{principal}\"]}}}}]\n    \
           to: [{{operation: {{methods: [GET, POST]}}}}]\n"
    )
}

/// The policies: default deny, www may GET and POST db, no one reaches /admin/, POSTs audited.
fn policies(net: &TestNet) -> PolicyDir {
    let dir = PolicyDir::new(net).unwrap();
    dir.put(
        "00-default-deny.yaml",
        &format!("{HEAD}metadata: {{name: allow-nothing, namespace: default}}\nspec: {{}}\n"),
    );
    dir.put("10-www-to-db.yaml", &www_to_db("www"));
    dir.put("20-no-admin.yaml", &format!(
            "{HEAD}metadata: {{name: no-admin, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: db}}}}\n  \
             action: DENY\n  rules: [{{to: [{{operation: {{paths: [\"/admin/*\"]}}}}]}}]\n"));
    dir.put("30-audit-posts.yaml", &format!(
            "{HEAD}metadata: {{name: audit-posts, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: db}}}}\n  \
             action: AUDIT\n  rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}]\n"));
    dir
}

/// `curl` from `workload` on node 0: the status code and body of each request.
fn curl(net: &TestNet, workload: &str, args: &[&str]) -> String {
    policy::curl(net, Some(workload), args)
}

/// The three services up: db's server, meshd on both nodes, the policies. Fields drop in
/// order: meshd and the server stop before the test net goes.
struct Scene {
    b: Meshd,
    _a: Meshd,
    _db: Process,
    dir: PolicyDir,
    _ca: MeshCa,
    net: TestNet,
}

impl Scene {
    fn new() -> Scene {
        let net = TestNet::new(2).unwrap();
        let ca = MeshCa::new(&net).unwrap();
        let dir = policies(&net);
        let (db, a, b) = start_db_mesh(&net, &ca, &["www", "auth"], &dir, "").unwrap();
        Scene {
            b,
            _a: a,
            _db: db,
            dir,
            _ca: ca,
            net,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:8080{path}", self.net.node(1).addr)
    }
}

const DENIED: &str = "RBAC: access denied [403]";

#[test]
fn www_reaches_db_auth_is_denied_and_reloads_take_effect_at_once() {
    require_privileges!();
    let mut s = Scene::new();
    method_path_matrix(&mut s);
    audit_and_counts(&mut s);
    a_broken_file_keeps_the_old_policy(&mut s);
    removing_an_allow_closes_its_connections(&mut s);
    sighup_reloads(&mut s);
}

/// The method/path matrix, as the article and the policies above have it; keep-alive.
fn method_path_matrix(s: &mut Scene) {
    let denied = DENIED;
    let matrix: [(&str, &str, &str, &str); 11] = [
        ("www", "GET", "/items", "db GET /items 0 [200]"),
        ("www", "POST", "/items", "db POST /items 5 [200]"),
        (
            "www",
            "GET",
            "/items?next=/admin/x",
            "db GET /items?next=/admin/x 0 [200]",
        ),
        ("www", "DELETE", "/items/1", denied),
        ("www", "PUT", "/items/1", denied),
        ("www", "GET", "/admin/users", denied),
        // The DENY holds for every spelling of the path (decided on its normal form).
        ("www", "GET", "//admin/users", denied),
        ("www", "GET", "/items/../admin/users", denied),
        ("www", "GET", "/%61dmin/users", denied),
        ("auth", "GET", "/items", denied),
        ("auth", "POST", "/items", denied),
    ];
    for (who, method, path, expected) in matrix {
        let target = s.url(path);
        let mut args = vec!["--path-as-is", "-X", method, target.as_str()];
        if method == "POST" {
            args.extend(["--data-binary", "hello"]);
        }
        let out = curl(&s.net, who, &args);
        assert_eq!(
            out.trim(),
            expected,
            "{who} {method} {path}; meshd log:\n{}",
            s.b.process.output_so_far().join("\n")
        );
    }
    // Keep-alive: a denial answers 403 and closes; curl's next request opens a new connection.
    let each = ["-sS", "-w", " [%{http_code}]\n"];
    let (a, b2, c) = (s.url("/a"), s.url("/b"), s.url("/c"));
    let mut args = vec![a.as_str(), "--next"];
    args.extend(each.iter().chain(&["-X", "DELETE", b2.as_str(), "--next"]));
    args.extend(each.iter().chain(&[c.as_str()]));
    let out = curl(&s.net, "www", &args);
    assert_eq!(
        out.trim(),
        format!("db GET /a 0 [200]\n{denied}\ndb GET /c 0 [200]")
    );
}

/// AUDIT logged the POST and changed nothing; decisions are counted by policy and reason.
fn audit_and_counts(s: &mut Scene) {
    s.b.process.expect_line_containing("AUDIT", WAIT).unwrap();
    assert!(s
        .b
        .process
        .output_so_far()
        .iter()
        .any(|l| l.contains("AUDIT") && l.contains("default/audit-posts")));
    let denied_by = |policy: &str, reason: &str| {
        s.b.metric_sum(
            &s.net,
            1,
            &[
                "meshd_policy_decisions_total",
                "decision=\"deny\"",
                &format!("policy=\"{policy}\""),
                &format!("reason=\"{reason}\""),
            ],
        )
    };
    assert!(denied_by("default/no-admin", "denied_by_policy") >= 1.0);
    assert!(denied_by("-", "no_allow_match") >= 4.0);
}

/// A broken file is rejected whole: the old policy stays in force and a metric says so.
fn a_broken_file_keeps_the_old_policy(s: &mut Scene) {
    std::fs::write(s.dir.0.join("10-www-to-db.yaml"), "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{to: [{operation: {method: [GET]}}]}]}\n").unwrap();
    s.b.process
        .expect_line_containing("reload rejected", WAIT)
        .unwrap();
    let log = s.b.process.output_so_far().join("\n");
    assert!(
        log.contains("10-www-to-db.yaml:4: spec.rules[0].to[0].operation: unknown field `method`"),
        "{log}"
    );
    assert_eq!(
        s.b.metric_sum(&s.net, 1, &["meshd_policy_last_reload_failed"]),
        1.0
    );
    assert_eq!(
        curl(&s.net, "www", &[&s.url("/still")]).trim(),
        "db GET /still 0 [200]"
    );
    assert_eq!(curl(&s.net, "auth", &[&s.url("/still")]).trim(), DENIED);
}

/// The good file back, then an open keep-alive connection of www's; removing its ALLOW closes
/// it within a second.
fn removing_an_allow_closes_its_connections(s: &mut Scene) {
    s.dir.put("10-www-to-db.yaml", &www_to_db("www"));
    s.b.process
        .expect_line_containing("authorization policy reloaded", WAIT)
        .unwrap();
    let target = s.net.node(1).addr.to_string();
    let mut held = s
        .net
        .workload(0, "www", &["python3", "-c", HOLDING_CLIENT, &target])
        .unwrap();
    let first = held.expect_line_containing("response", WAIT).unwrap();
    assert!(first.contains("200"), "{first}");
    held.expect_line("open", WAIT).unwrap();
    let revoked_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = Instant::now();
    s.dir.put("10-www-to-db.yaml", &www_to_db("someone-else"));
    let closed = held
        .expect_line_containing("closed", Duration::from_secs(5))
        .unwrap();
    let at: f64 = closed.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(closed.ends_with("b''") && at >= revoked_at, "{closed}");
    assert!(
        at - revoked_at < 1.0 && started.elapsed() < Duration::from_secs(2),
        "closed {:.3}s after the reload: {closed}",
        at - revoked_at
    );
    let revoked = &["meshd_policy_decisions_total", "reason=\"revoked\""];
    assert!(
        s.b.metric_sum(&s.net, 1, revoked) >= 1.0,
        "{}\n{}",
        s.b.metrics(&s.net, 1).unwrap(),
        s.b.process.output_so_far().join("\n")
    );
    assert_eq!(curl(&s.net, "www", &[&s.url("/after")]).trim(), DENIED);
}

/// SIGHUP reloads too (and does not stop meshd).
fn sighup_reloads(s: &mut Scene) {
    s.dir.put("10-www-to-db.yaml", &www_to_db("www"));
    s.b.process
        .expect_line_containing("authorization policy reloaded", WAIT)
        .unwrap();
    s.b.process
        .signal(nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    s.b.process
        .expect_line_containing("SIGHUP: reloading", WAIT)
        .unwrap();
    s.b.process
        .expect_line_containing("authorization policy reloaded", WAIT)
        .unwrap();
    assert_eq!(
        curl(&s.net, "www", &[&s.url("/hup")]).trim(),
        "db GET /hup 0 [200]"
    );
}

#[test]
fn permissive_plaintext_is_decided_without_an_identity() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let ca = MeshCa::new(&net).unwrap();
    let dir = PolicyDir::new(&net).unwrap();
    let nothing =
        format!("{HEAD}metadata: {{name: allow-nothing, namespace: default}}\nspec: {{}}\n");
    dir.put("00-default-deny.yaml", &nothing);
    // Plaintext has no principal: only its address can be named.
    let client = net.node(0).addr;
    dir.put("10-plaintext-reads.yaml", &format!(
        "{HEAD}metadata: {{name: plaintext-reads, namespace: default}}\nspec:\n  \
         selector: {{matchLabels: {{app: db}}}}\n  rules:\n  \
         - from: [{{source: {{ipBlocks: [\"{client}/32\"]}}}}]\n    to: [{{operation: {{methods: [GET]}}}}]\n"
    ));
    let permissive = "peer_authentication:\n- spec: {mtls: {mode: PERMISSIVE}}\n";
    let (_db, _a, b) = start_db_mesh(&net, &ca, &["www"], &dir, permissive).unwrap();
    // A process of node 0 outside any workload: not intercepted, it arrives in plaintext.
    let url = format!("http://{}:8080/x", net.node(1).addr);
    let plain = |method: &str| policy::curl(&net, None, &["-X", method, &url]);
    assert_eq!(plain("GET").trim(), "db GET /x 0 [200]");
    assert_eq!(plain("DELETE").trim(), "RBAC: access denied [403]");
    let http_denials = [
        "meshd_policy_decisions_total",
        "decision=\"deny\"",
        "layer=\"http\"",
    ];
    assert!(b.metric_sum(&net, 1, &http_denials) >= 1.0);
}
