//! Authorization policy in tests: a policy directory of a test net (removed on drop), the
//! two-node client/server mesh with the server's policies, and metric sums.

use std::path::PathBuf;

use anyhow::Result;

use crate::{MeshCa, Meshd, Process, TestNet};

/// The head of every AuthorizationPolicy document.
pub const POLICY_HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

/// `python3 -c HTTP_SERVER NAME`: an HTTP/1.1 server on :8080 (keep-alive) that answers every
/// method with `NAME METHOD PATH BODYLEN`, and prints `ready` once listening.
pub const HTTP_SERVER: &str = r#"
import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        out = ("%s %s %s %d" % (name, self.command, self.path, len(body))).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_DELETE = do_PUT = answer
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H)
print("ready", flush=True)
s.serve_forever()
"#;

/// A directory of policy files for one test net.
pub struct PolicyDir(pub PathBuf);

impl PolicyDir {
    pub fn new(net: &TestNet) -> Result<PolicyDir> {
        let dir = std::env::temp_dir().join(format!("{}-policies", net.id()));
        std::fs::create_dir_all(&dir)?;
        Ok(PolicyDir(dir))
    }

    /// Writes `name` as editors and ConfigMaps do: a new file renamed over the old.
    pub fn put(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.0.join(name)).unwrap();
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// meshd on node 0 for the client workloads `clients` (no ports), and on node 1 for the
/// workload `server` (`body`: its ports and labels) under the policies of `dir` (and
/// `server_extra`, top-level config lines); both in ebpf mode with SVIDs of `ca`.
pub fn start_policy_mesh(
    net: &TestNet,
    ca: &MeshCa,
    clients: &[&str],
    server: (&str, &str),
    dir: &PolicyDir,
    server_extra: &str,
) -> Result<(Meshd, Meshd)> {
    start_policy_mesh_in("ebpf", net, ca, clients, server, (dir, server_extra))
}

/// [`start_policy_mesh`] in interception `mode` (`ebpf`, `iptables`, `auto`).
pub fn start_policy_mesh_in(
    mode: &str,
    net: &TestNet,
    ca: &MeshCa,
    clients: &[&str],
    server: (&str, &str),
    (dir, server_extra): (&PolicyDir, &str),
) -> Result<(Meshd, Meshd)> {
    let mut entries = String::new();
    for name in clients {
        entries.push_str(&net.workload_yaml(name, "  ports: []\n")?);
    }
    let client = net.meshd_config_yaml(0, &entries, &ca.config(0, "24h", &[]))?;
    let workload = net.workload_yaml(server.0, server.1)?;
    let extra = format!(
        "{}policies: [{}]\n{server_extra}",
        ca.config(1, "24h", &[]),
        dir.0.display()
    );
    let config = net.meshd_config_yaml(1, &workload, &extra)?;
    let a = net.start_meshd_config(0, mode, &client)?;
    let b = net.start_meshd_config(1, mode, &config)?;
    Ok((a, b))
}

/// The HTTP server `db` ([`HTTP_SERVER`] on node 1, port 8080 declared `protocol: http`, labels
/// app=db, version=v1) once it is ready, and meshd on both nodes as [`start_policy_mesh`] starts
/// them for `clients`.
pub fn start_db_mesh(
    net: &TestNet,
    ca: &MeshCa,
    clients: &[&str],
    dir: &PolicyDir,
    server_extra: &str,
) -> Result<(Process, Meshd, Meshd)> {
    let mut db = net.workload(1, "db", &["python3", "-c", HTTP_SERVER, "db"])?;
    db.expect_line("ready", std::time::Duration::from_secs(30))?;
    let ports = "  ports: [{port: 8080, protocol: http}]\n  labels: {app: db, version: v1}\n";
    let (a, b) = start_policy_mesh(net, ca, clients, ("db", ports), dir, server_extra)?;
    Ok((db, a, b))
}

/// `curl ARGS` (10 s at most, the status code appended as ` [CODE]`) run by `workload` on node
/// 0, or by a process of node 0 outside any workload (not intercepted) when `None`.
pub fn curl(net: &TestNet, workload: Option<&str>, args: &[&str]) -> String {
    let mut argv = vec!["curl", "-sS", "--max-time", "10", "-w", " [%{http_code}]\n"];
    argv.extend_from_slice(args);
    let process = match workload {
        Some(w) => net.workload(0, w, &argv),
        None => net.host_process(0, &argv),
    };
    let wait = std::time::Duration::from_secs(30);
    process
        .and_then(|mut p| p.wait_output(wait))
        .map_or_else(|e| format!("curl failed: {e:#}"), |(_, out)| out)
}

impl Meshd {
    /// The sum of meshd's metric samples whose line contains every one of `needles`.
    pub fn metric_sum(&self, net: &TestNet, node: usize, needles: &[&str]) -> f64 {
        let text = self.metrics(net, node).unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}
