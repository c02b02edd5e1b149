//! The paths a request can take from the client node to nginx on the server node, each brought
//! up and torn down on the same test hosts: direct, meshd in either mode, and two mTLS proxy
//! pairs with iptables REDIRECT (stunnel4 and HAProxy), all TLS 1.3 with the same P-256
//! certificates from the mesh CA. The `-pods` paths run the client and nginx in a pod on each
//! node instead (own network namespace and cgroup, announced to meshd through its CNI plugin
//! as a runtime does; see `testhosts::handpods`), compared with pod-to-pod direct.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use meshd::identity::{ca::Issuer, svid, SpiffeId};
use testhosts::{
    handpods::{cni, hand_pod, route_pod_subnets, start_pods_meshd, HandPod},
    MeshCa, Meshd, Process, TestNet, WorkloadSpec,
};

pub const NGINX_PORT: u16 = 8080;
/// nginx's HTTP/2 (prior knowledge, h2c) port.
pub const NGINX_H2_PORT: u16 = 8081;
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    MeshdIptables,
    MeshdEbpf,
    /// meshd in ebpf mode with the sk_msg loopback bypass.
    MeshdEbpfSkMsg,
    /// meshd-ebpf with nginx's ports declared `http` and `grpc` and an AuthorizationPolicy
    /// deciding every request (default deny, GET allowed for the client, a DENY on a path).
    MeshdEbpfL7,
    Stunnel,
    Haproxy,
    /// Pod to pod, no proxy.
    DirectPods,
    MeshdIptablesPods,
    MeshdEbpfPods,
    /// meshd-ebpf-pods with 9 / 99 more (idle) pods on each node: the cost of pod count.
    MeshdEbpfPods10,
    MeshdEbpfPods100,
}

impl PathKind {
    pub const ALL: [PathKind; 12] = [
        PathKind::Direct,
        PathKind::MeshdIptables,
        PathKind::MeshdEbpf,
        PathKind::MeshdEbpfSkMsg,
        PathKind::MeshdEbpfL7,
        PathKind::Stunnel,
        PathKind::Haproxy,
        PathKind::DirectPods,
        PathKind::MeshdIptablesPods,
        PathKind::MeshdEbpfPods,
        PathKind::MeshdEbpfPods10,
        PathKind::MeshdEbpfPods100,
    ];

    /// Whether the client and nginx run in pods rather than in the nodes' namespaces.
    pub fn in_pods(self) -> bool {
        self == PathKind::DirectPods || self.meshes_pods()
    }

    fn meshes_pods(self) -> bool {
        matches!(
            self,
            PathKind::MeshdIptablesPods
                | PathKind::MeshdEbpfPods
                | PathKind::MeshdEbpfPods10
                | PathKind::MeshdEbpfPods100
        )
    }

    /// Idle pods meshd serves on each node besides the measured ones.
    pub fn idle_pods(self) -> usize {
        match self {
            PathKind::MeshdEbpfPods10 => 9,
            PathKind::MeshdEbpfPods100 => 99,
            _ => 0,
        }
    }

    /// The path this one's ratios are taken against: direct between the same endpoints.
    pub fn baseline(self) -> PathKind {
        if self.in_pods() {
            PathKind::DirectPods
        } else {
            PathKind::Direct
        }
    }

    /// Whether `scenario` runs on this path: the pairs redirect only the HTTP/1.1 port (no
    /// HTTP/2); the pod-count paths measure keep-alive only.
    pub fn runs(self, scenario: &str) -> bool {
        match self {
            PathKind::Stunnel | PathKind::Haproxy => scenario != "h2-keep-alive",
            PathKind::MeshdEbpfPods10 | PathKind::MeshdEbpfPods100 => scenario == "keep-alive",
            _ => true,
        }
    }

    fn meshd_mode(self) -> &'static str {
        match self {
            PathKind::MeshdIptables | PathKind::MeshdIptablesPods => "iptables",
            _ => "ebpf",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::MeshdIptables => "meshd-iptables",
            PathKind::MeshdEbpf => "meshd-ebpf",
            PathKind::MeshdEbpfSkMsg => "meshd-ebpf-skmsg",
            PathKind::MeshdEbpfL7 => "meshd-ebpf-l7",
            PathKind::Stunnel => "stunnel4-pair",
            PathKind::Haproxy => "haproxy-pair",
            PathKind::DirectPods => "direct-pods",
            PathKind::MeshdIptablesPods => "meshd-iptables-pods",
            PathKind::MeshdEbpfPods => "meshd-ebpf-pods",
            PathKind::MeshdEbpfPods10 => "meshd-ebpf-10pods",
            PathKind::MeshdEbpfPods100 => "meshd-ebpf-100pods",
        }
    }
}

/// A pod on each node: the client's on node 0, nginx's on node 1; and idle pods on both.
pub struct Pods {
    pub client: HandPod,
    pub server: HandPod,
    idle: [Vec<HandPod>; 2],
}

impl Pods {
    pub fn new(net: &TestNet, idle_per_node: usize) -> Pods {
        route_pod_subnets(net);
        let idle = |node| {
            (1..=idle_per_node)
                .map(|k| hand_pod(net, node, k))
                .collect()
        };
        Pods {
            client: hand_pod(net, 0, 0),
            server: hand_pod(net, 1, 0),
            idle: [idle(0), idle(1)],
        }
    }
}

/// A path that is up; dropping it tears it down.
pub struct Running {
    pub meshd: Vec<Meshd>,
    pub processes: Vec<Process>,
    redirect: Option<String>,
    net_id: String,
    /// Pods announced to meshd (pod, name, CNI socket): deleted (CNI DEL) before meshd stops,
    /// as a runtime would, so that nothing of this path stays in the pods.
    announced: Vec<(HandPod, String, String)>,
}

impl Running {
    /// meshd on the client node, if this path has one.
    pub fn client_meshd(&self) -> Option<&Meshd> {
        self.meshd.first()
    }

    /// The path's proxies: both meshd, or both peers of a pair.
    pub fn proxy_pids(&self) -> Vec<i32> {
        let meshd = self.meshd.iter().map(|m| m.process.pid());
        meshd
            .chain(self.processes.iter().map(Process::pid))
            .collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for (pod, name, socket) in self.announced.drain(..) {
            let (ok, out) = cni("DEL", &pod, &name, &socket);
            if !ok {
                eprintln!("mesh-bench: CNI DEL of {name}: {out}");
            }
        }
        // A stopped meshd leaves its interception (fail closed); the next path must not find it.
        for meshd in &mut self.meshd {
            if let Err(e) = meshd.uninstall() {
                eprintln!("mesh-bench: uninstalling meshd: {e:#}");
            }
        }
        if let Some(rule) = self.redirect.take() {
            let ns = format!("{}-n0", self.net_id);
            let mut args = vec![
                "netns", "exec", &ns, "iptables", "-w", "5", "-t", "nat", "-D",
            ];
            args.extend(rule.split(' '));
            let _ = std::process::Command::new("ip").args(&args).status();
        }
    }
}

pub fn up(kind: PathKind, net: &TestNet, ca: &MeshCa, dir: &Path, pods: &Pods) -> Result<Running> {
    let mut running = Running {
        meshd: Vec::new(),
        processes: Vec::new(),
        redirect: None,
        net_id: net.id().to_string(),
        announced: Vec::new(),
    };
    match kind {
        PathKind::Direct | PathKind::DirectPods => {}
        PathKind::MeshdIptablesPods
        | PathKind::MeshdEbpfPods
        | PathKind::MeshdEbpfPods10
        | PathKind::MeshdEbpfPods100 => {
            for (node, pod, name) in [(0, &pods.client, "client"), (1, &pods.server, "nginx")] {
                let (meshd, socket) = start_pods_meshd(net, ca, node, kind.meshd_mode(), "");
                running.meshd.push(meshd);
                let idle = pods.idle[node].iter().take(kind.idle_pods());
                let named = idle.enumerate().map(|(k, p)| (p, format!("idle-{k}")));
                for (pod, name) in std::iter::once((pod, name.to_string())).chain(named) {
                    let (ok, out) = cni("ADD", pod, &name, &socket);
                    anyhow::ensure!(ok, "CNI ADD of {name}: {out}");
                    running.announced.push((pod.clone(), name, socket.clone()));
                }
            }
        }
        PathKind::MeshdIptables | PathKind::MeshdEbpf | PathKind::MeshdEbpfSkMsg => {
            let mode = kind.meshd_mode();
            let bypass = format!("  sk_msg_bypass: {}\n", kind == PathKind::MeshdEbpfSkMsg);
            let client = [WorkloadSpec {
                name: "client",
                ports: &[],
            }];
            let server = [WorkloadSpec {
                name: "nginx",
                ports: &[NGINX_PORT, NGINX_H2_PORT],
            }];
            running.meshd.push(net.start_meshd_with(
                0,
                mode,
                &client,
                &(bypass.clone() + &ca.config(0, "24h", &[])),
            )?);
            running.meshd.push(net.start_meshd_with(
                1,
                mode,
                &server,
                &(bypass + &ca.config(1, "24h", &[])),
            )?);
        }
        PathKind::MeshdEbpfL7 => {
            let client = [WorkloadSpec {
                name: "client",
                ports: &[],
            }];
            running.meshd.push(net.start_meshd_with(
                0,
                "ebpf",
                &client,
                &ca.config(0, "24h", &[]),
            )?);
            running.meshd.push(l7_server(net, ca, dir)?);
        }
        PathKind::Stunnel => {
            let root = peer_certs(ca, dir)?;
            running.processes.push(stunnel(net, 1, dir, &root, false)?);
            running.processes.push(stunnel(net, 0, dir, &root, true)?);
            running.redirect = Some(redirect(net, 15101)?);
        }
        PathKind::Haproxy => {
            let root = peer_certs(ca, dir)?;
            running.processes.push(haproxy(net, 1, dir, &root, false)?);
            running.processes.push(haproxy(net, 0, dir, &root, true)?);
            running.redirect = Some(redirect(net, 15201)?);
        }
    }
    Ok(running)
}

/// The policy of the `meshd-ebpf-l7` path: nothing is allowed but the client's GETs, and a
/// DENY that every request is checked against.
const L7_POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
metadata: {name: allow-nothing, namespace: default}\nspec: {}\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
metadata: {name: client-reads, namespace: default}\nspec:\n  selector: {matchLabels: {app: nginx}}\n  \
rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]\n    \
to: [{operation: {methods: [GET], paths: [\"/*\"]}}]\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
metadata: {name: no-admin, namespace: default}\nspec:\n  selector: {matchLabels: {app: nginx}}\n  \
action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]\n";

/// meshd on the server node with nginx's ports under per-request policy.
fn l7_server(net: &TestNet, ca: &MeshCa, dir: &Path) -> Result<Meshd> {
    let policy = dir.join("l7-policy.yaml");
    std::fs::write(&policy, L7_POLICY)?;
    let ports = format!(
        "  ports: [{{port: {NGINX_PORT}, protocol: http}}, {{port: {NGINX_H2_PORT}, protocol: grpc}}]\n  labels: {{app: nginx}}\n"
    );
    let nginx = net.workload_yaml("nginx", &ports)?;
    let extra = format!(
        "{}policies: [{}]\n",
        ca.config(1, "24h", &[]),
        policy.display()
    );
    let config = net.meshd_config_yaml(1, &nginx, &extra)?;
    net.start_meshd_config(1, "ebpf", &config)
}

/// Sends the client node's connections to nginx into a local proxy port.
fn redirect(net: &TestNet, to: u16) -> Result<String> {
    let server = net.node(1).addr;
    let rule =
        format!("OUTPUT -p tcp -d {server}/32 --dport {NGINX_PORT} -j REDIRECT --to-ports {to}");
    let mut argv = vec!["iptables", "-w", "5", "-t", "nat", "-A"];
    argv.extend(rule.split(' '));
    net.exec(0, &argv)?;
    Ok(rule)
}

/// Writes client and server certificate files (chain + key, and HAProxy's combined PEM) and
/// returns the root certificate's path.
fn peer_certs(ca: &MeshCa, dir: &Path) -> Result<String> {
    for (node, role) in [(0, "client"), (1, "server")] {
        let issuer = Issuer::load(
            &ca.dir.join(format!("n{node}.crt")),
            &ca.dir.join(format!("n{node}.key")),
        )?;
        let id = SpiffeId::new("cluster.local", "bench", role)?;
        let s = svid::mint(&issuer, &id, Duration::from_secs(24 * 3600))?;
        std::fs::write(dir.join(format!("{role}.crt")), &s.chain_pem)?;
        std::fs::write(dir.join(format!("{role}.key")), &s.key_pem)?;
        std::fs::write(
            dir.join(format!("{role}.pem")),
            format!("{}{}", s.chain_pem, s.key_pem),
        )?;
    }
    Ok(ca.dir.join("root.crt").display().to_string())
}

fn stunnel(net: &TestNet, node: usize, dir: &Path, root: &str, client: bool) -> Result<Process> {
    let role = if client { "client" } else { "server" };
    let server = net.node(1).addr;
    let (accept, connect) = if client {
        ("127.0.0.1:15101".to_string(), format!("{server}:15108"))
    } else {
        (
            "0.0.0.0:15108".to_string(),
            format!("127.0.0.1:{NGINX_PORT}"),
        )
    };
    let d = dir.display();
    let conf = format!(
        "foreground = yes\npid =\nsyslog = no\n[{role}]\nclient = {}\naccept = {accept}\nconnect = {connect}\n\
         cert = {d}/{role}.crt\nkey = {d}/{role}.key\nCAfile = {}\nverifyChain = yes\n\
         sslVersionMin = TLSv1.3\n",
        if client { "yes" } else { "no" },
        root
    );
    let port = if client { 15101 } else { 15108 };
    run_peer(
        net,
        node,
        &dir.join(format!("stunnel-{role}.conf")),
        &conf,
        &["stunnel4"],
        port,
    )
}

fn haproxy(net: &TestNet, node: usize, dir: &Path, root: &str, client: bool) -> Result<Process> {
    let d = dir.display();
    let server = net.node(1).addr;
    let tls = format!("ca-file {} verify required ssl-min-ver TLSv1.3", root);
    let (bind, target) = if client {
        (
            "127.0.0.1:15201".to_string(),
            format!("{server}:15208 ssl crt {d}/client.pem {tls}"),
        )
    } else {
        (
            format!("0.0.0.0:15208 ssl crt {d}/server.pem {tls}"),
            format!("127.0.0.1:{NGINX_PORT}"),
        )
    };
    let conf = format!(
        "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  \
         timeout server 120s\nfrontend f\n  bind {bind}\n  default_backend b\nbackend b\n  server s {target}\n"
    );
    let role = if client { "client" } else { "server" };
    let port = if client { 15201 } else { 15208 };
    run_peer(
        net,
        node,
        &dir.join(format!("haproxy-{role}.cfg")),
        &conf,
        &["haproxy", "-db", "-f"],
        port,
    )
}

/// Writes a peer proxy's configuration to `path`, starts `argv` + `path` in `node` and waits
/// until it listens on `port`.
fn run_peer(
    net: &TestNet,
    node: usize,
    path: &Path,
    conf: &str,
    argv: &[&str],
    port: u16,
) -> Result<Process> {
    std::fs::write(path, conf)?;
    let path = path.display().to_string();
    let mut full = argv.to_vec();
    full.push(&path);
    let p = net.host_process(node, &full)?;
    wait_port(net, node, "127.0.0.1", port)?;
    Ok(p)
}

/// nginx on the server node, in the `nginx` workload cgroup or in `pod`: `/` is a small fixed
/// response, `/bulk` a 256 MiB file.
pub fn nginx(net: &TestNet, dir: &Path, pod: Option<&HandPod>) -> Result<Process> {
    let dir = &match pod {
        Some(pod) => dir.join(&pod.netns),
        None => dir.to_path_buf(),
    };
    std::fs::create_dir_all(dir)?;
    let bulk = dir.join("bulk.bin");
    std::fs::File::create(&bulk)?.set_len(256 << 20)?;
    let d = dir.display();
    std::fs::create_dir_all(dir.join("nginx-tmp"))?;
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         worker_rlimit_nofile 20000;\nevents {{ worker_connections 19000; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300;\n  \
         client_body_temp_path {d}/nginx-tmp;\n  proxy_temp_path {d}/nginx-tmp;\n  fastcgi_temp_path {d}/nginx-tmp;\n  \
         uwsgi_temp_path {d}/nginx-tmp;\n  scgi_temp_path {d}/nginx-tmp;\n  sendfile on;\n  \
         server {{\n    listen {NGINX_PORT};\n    listen {NGINX_H2_PORT} http2;\n    \
         location = / {{ return 200 \"hello from nginx\\n\"; }}\n    \
         location = /bulk {{ alias {d}/bulk.bin; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let argv = ["nginx", "-c", path.to_str().unwrap()];
    let (p, host) = match pod {
        Some(pod) => (
            Process::spawn_in(&pod.node, &pod.cgroup, &argv)?,
            &pod.ip[..],
        ),
        None => (net.workload(1, "nginx", &argv)?, "127.0.0.1"),
    };
    wait_port(net, 1, host, NGINX_PORT).context("nginx did not start")?;
    Ok(p)
}

/// Waits until `host:port` accepts connections from `node`.
fn wait_port(net: &TestNet, node: usize, host: &str, port: u16) -> Result<()> {
    let probe = format!("exec 3<>/dev/tcp/{host}/{port}");
    let deadline = std::time::Instant::now() + WAIT;
    while net.exec(node, &["bash", "-c", &probe]).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "nothing listens on :{port} in node {node}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
