//! meshd inside a test node: writes its configuration (workload cgroups of this net, a pin
//! directory of this net) and starts it as a host process, waiting for its readiness line.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};

use crate::{meshd_bin, process::Process, TestNet};

/// A workload as the test declares it to meshd.
#[derive(Clone, Copy)]
pub struct WorkloadSpec<'a> {
    pub name: &'a str,
    pub ports: &'a [u16],
}

pub struct Meshd {
    pub process: Process,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    /// The state directory its config names (handover socket, reserved-port record).
    pub state_dir: PathBuf,
    /// The network namespace (name) of its node.
    pub netns: String,
}

impl Meshd {
    /// Uninstalls meshd the operator's way: SIGTERM (if it still runs), then `meshd cleanup`
    /// in its node, which removes the interception a stopped meshd leaves; cleanup's output.
    pub fn uninstall(&mut self) -> Result<String> {
        if self
            .process
            .signal(nix::sys::signal::Signal::SIGTERM)
            .is_ok()
        {
            let _ = self.process.wait_output(Duration::from_secs(30));
        }
        // nsenter, not `ip netns exec`: that remounts /sys, hiding the bpffs pins.
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(meshd_bin())
            .arg("cleanup")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "meshd cleanup: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }
}

impl Meshd {
    /// Access log lines so far (one per finished connection).
    pub fn access_lines(&mut self) -> Vec<String> {
        let lines = self.process.output_so_far();
        lines
            .into_iter()
            .filter(|l| l.contains("access:"))
            .collect()
    }

    /// Waits until `count` access lines containing all of `needles` have been logged.
    pub fn wait_access(&mut self, needles: &[&str], count: usize) -> Result<Vec<String>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let matching: Vec<String> = self
                .access_lines()
                .into_iter()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .collect();
            if matching.len() >= count {
                return Ok(matching);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                anyhow::bail!(
                    "{} of {count} access lines with {needles:?}; log:\n{}",
                    matching.len(),
                    self.process.output_so_far().join("\n")
                );
            }
            let _ = self.process.next_line(left.min(Duration::from_millis(200)));
        }
    }
}

impl Meshd {
    /// meshd's Prometheus metrics, fetched from inside its node.
    pub fn metrics(&self, net: &TestNet, node: usize) -> Result<String> {
        net.http_get(node, "http://127.0.0.1:15020/metrics")
    }
}

impl Drop for Meshd {
    /// Stops meshd the way an operator would (SIGTERM): it drains and leaves its interception
    /// for a successor (the net's drop removes that); a meshd that does not stop in time is
    /// killed by the process handle.
    fn drop(&mut self) {
        if self
            .process
            .signal(nix::sys::signal::Signal::SIGTERM)
            .is_ok()
        {
            let _ = self.process.wait_output(Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

impl TestNet {
    /// The body of `GET url` from inside `node` (an HTTP error status's body too).
    pub fn http_get(&self, node: usize, url: &str) -> Result<String> {
        let script = "import sys, urllib.request as u, urllib.error as e\n\
                      try: print(u.urlopen(sys.argv[1]).read().decode())\n\
                      except e.HTTPError as x: print(x.read().decode())";
        self.exec(node, &["python3", "-c", script, url])
    }

    /// An echo server (testhosts-tool) listening on `listen` in `node`, in the workload cgroup
    /// `workload` (or the node's host cgroup), once it is ready.
    pub fn echo_server(
        &self,
        node: usize,
        workload: Option<&str>,
        listen: &str,
    ) -> Result<Process> {
        let tool = crate::sibling_binary("testhosts-tool")
            .display()
            .to_string();
        let argv = [tool.as_str(), "echo-server", listen];
        let mut server = match workload {
            Some(name) => self.workload(node, name, &argv)?,
            None => self.host_process(node, &argv)?,
        };
        server.expect_line("ready", Duration::from_secs(30))?;
        Ok(server)
    }

    /// The config meshd would get for these workloads on `node` (cgroups are created).
    pub fn meshd_config(
        &self,
        node: usize,
        workloads: &[WorkloadSpec],
        extra: &str,
    ) -> Result<String> {
        let mut entries = String::new();
        for w in workloads {
            entries.push_str(&self.workload_yaml(w.name, &format!("  ports: {:?}\n", w.ports))?);
        }
        self.meshd_config_yaml(node, &entries, extra)
    }

    /// One `workloads:` entry: its cgroup (created) and `body` (indented YAML lines: ports,
    /// labels...).
    pub fn workload_yaml(&self, name: &str, body: &str) -> Result<String> {
        let mount = meshd::sys::ensure_cgroup2()?;
        let cgroup = self.cgroup().join(name);
        std::fs::create_dir_all(&cgroup)?;
        let relative = cgroup.strip_prefix(&mount)?.display().to_string();
        Ok(format!("- name: {name}\n  cgroup: /{relative}\n{body}"))
    }

    /// A whole config from `workloads:` entries (see [`TestNet::workload_yaml`]) and `extra`.
    pub fn meshd_config_yaml(&self, node: usize, workloads: &str, extra: &str) -> Result<String> {
        let pin_dir = self.pin_dir()?.join(format!("n{node}"));
        Ok(format!(
            "workloads:\n{workloads}proxy:\n  pin_dir: {}\n  state_dir: {}\n{extra}",
            pin_dir.display(),
            self.state_dir(node).display()
        ))
    }

    /// meshd's state directory on `node` (handover socket, reserved-port record), removed with
    /// the net.
    pub fn state_dir(&self, node: usize) -> PathBuf {
        std::env::temp_dir().join(format!("{}-n{node}-state", self.id()))
    }

    /// Starts meshd on `node` in `mode` and waits until it is ready.
    pub fn start_meshd(
        &self,
        node: usize,
        mode: &str,
        workloads: &[WorkloadSpec],
    ) -> Result<Meshd> {
        self.start_meshd_with(node, mode, workloads, "")
    }

    /// Like [`TestNet::start_meshd`], with `extra` YAML appended to the config.
    pub fn start_meshd_with(
        &self,
        node: usize,
        mode: &str,
        workloads: &[WorkloadSpec],
        extra: &str,
    ) -> Result<Meshd> {
        let text = self.meshd_config(node, workloads, extra)?;
        self.start_meshd_config(node, mode, &text)
    }

    /// Starts meshd with a whole config text and waits until it is ready.
    pub fn start_meshd_config(&self, node: usize, mode: &str, text: &str) -> Result<Meshd> {
        let mut meshd = self.spawn_meshd(node, mode, text)?;
        meshd
            .process
            .expect_line_containing("meshd ready", Duration::from_secs(30))
            .with_context(|| format!("meshd log:\n{}", meshd.process.output_so_far().join("\n")))?;
        Ok(meshd)
    }

    /// Starts meshd with a given config text, without waiting (for tests that expect failure).
    pub fn spawn_meshd(&self, node: usize, mode: &str, config: &str) -> Result<Meshd> {
        let path = std::env::temp_dir().join(format!("{}-n{node}.yaml", self.id()));
        std::fs::write(&path, config)?;
        let pin_dir = self.pin_dir()?.join(format!("n{node}"));
        let bin = meshd_bin().display().to_string();
        let mode = format!("--mode={mode}");
        let cfg = path.display().to_string();
        let process = self.host_process(node, &[&bin, "run", &mode, "--config", &cfg])?;
        Ok(Meshd {
            process,
            config: path,
            pin_dir,
            state_dir: self.state_dir(node),
            netns: format!("{}-n{node}", self.id()),
        })
    }
}

/// The standard two-node mesh of the tests and the demo: meshd on node 0 for workload
/// `checkout` (a client) and on node 1 for workload `orders` serving :7000, SVIDs living `ttl`.
pub fn start_checkout_orders(
    net: &TestNet,
    ca: &MeshCa,
    mode: &str,
    ttl: &str,
) -> Result<(Meshd, Meshd)> {
    start_checkout_orders_with(net, ca, mode, ttl, "")
}

/// Like [`start_checkout_orders`], with `proxy_extra` YAML lines added to both meshd's `proxy:`
/// section (e.g. `"  sk_msg_bypass: true\n"`).
pub fn start_checkout_orders_with(
    net: &TestNet,
    ca: &MeshCa,
    mode: &str,
    ttl: &str,
    proxy_extra: &str,
) -> Result<(Meshd, Meshd)> {
    let config = |node| format!("{proxy_extra}{}", ca.config(node, ttl, &[]));
    let a = net.start_meshd_with(0, mode, &CHECKOUT, &config(0))?;
    let b = net.start_meshd_with(1, mode, &ORDERS, &config(1))?;
    Ok((a, b))
}

/// Two test nodes, a mesh CA and the standard mesh's `orders` echo server on node 1 (listening
/// on `listen`); meshd is not started yet.
pub struct OrdersNet {
    /// Dropped first (fields drop in order): the server before its net.
    pub server: Process,
    pub ca: MeshCa,
    pub net: TestNet,
    /// `orders`' IPv4 address and port 7000.
    pub target: String,
}

impl OrdersNet {
    pub fn new(listen: &str) -> Result<OrdersNet> {
        let net = TestNet::new(2)?;
        let ca = MeshCa::new(&net)?;
        let server = net.echo_server(1, Some("orders"), listen)?;
        let target = format!("{}:7000", net.node(1).addr);
        Ok(OrdersNet {
            server,
            ca,
            net,
            target,
        })
    }

    /// [`start_checkout_orders`] on this net, SVIDs living a day.
    pub fn start_mesh(&self, mode: &str) -> Result<(Meshd, Meshd)> {
        start_checkout_orders(&self.net, &self.ca, mode, "24h")
    }
}

/// The standard mesh's client workload on node 0.
pub const CHECKOUT: [WorkloadSpec; 1] = [WorkloadSpec {
    name: "checkout",
    ports: &[],
}];

/// The standard mesh's server workload on node 1 (its echo server listens on :7000).
pub const ORDERS: [WorkloadSpec; 1] = [WorkloadSpec {
    name: "orders",
    ports: &[7000],
}];

/// The (ok, failed) counts of `testhosts-tool loop`'s summary line in `out`.
pub fn loop_counts(out: &str) -> (u64, u64) {
    let summary = out
        .lines()
        .find(|l| l.starts_with("loop ok"))
        .unwrap_or_default();
    let count = |word: &str| {
        let at = summary.split_whitespace().skip_while(|w| *w != word).nth(1);
        at.and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    (count("ok"), count("failed"))
}

/// A mesh CA for a test net: a root and one node intermediate per node, made with `meshd ca`,
/// in a directory removed on drop.
pub struct MeshCa {
    pub dir: PathBuf,
}

impl MeshCa {
    pub fn new(net: &TestNet) -> Result<MeshCa> {
        let ca = MeshCa {
            dir: std::env::temp_dir().join(format!("{}-ca", net.id())),
        };
        let dir = ca.dir.display().to_string();
        let bin = meshd_bin();
        let run = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new(&bin).args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "meshd {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(&[
            "ca",
            "init",
            "--dir",
            &dir,
            "--trust-domain",
            "cluster.local",
        ])?;
        for node in net.nodes() {
            run(&[
                "ca",
                "issue-node",
                &format!("n{}", node.index),
                "--dir",
                &dir,
            ])?;
        }
        Ok(ca)
    }

    /// A client SVID for service account `sa` (namespace default) minted from node `node`'s
    /// intermediate, written as `<dir>/<name>.crt|.key`; their paths.
    pub fn client_svid(&self, node: usize, name: &str, sa: &str) -> Result<(String, String)> {
        use meshd::identity::{ca::Issuer, svid, SpiffeId};
        let (crt, key) = (
            self.dir.join(format!("n{node}.crt")),
            self.dir.join(format!("n{node}.key")),
        );
        let issuer = Issuer::load(&crt, &key)?;
        let id = SpiffeId::new("cluster.local", "default", sa)?;
        let minted = svid::mint(&issuer, &id, std::time::Duration::from_secs(3600))?;
        let (crt, key) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, minted.chain_pem)?;
        std::fs::write(&key, minted.key_pem)?;
        Ok((crt.display().to_string(), key.display().to_string()))
    }

    /// The `identity:` and `mesh:` config sections for `node`.
    pub fn config(&self, node: usize, svid_ttl: &str, revoked_ids: &[&str]) -> String {
        let d = self.dir.display();
        format!(
            "identity:\n  trust_domain: cluster.local\n  node_name: n{node}\n  \
             node_cert: {d}/n{node}.crt\n  node_key: {d}/n{node}.key\n  \
             trust_bundle: [{d}/root.crt]\n  svid_ttl: {svid_ttl}\n  \
             revocation:\n    spiffe_ids: {revoked_ids:?}\n\
             mesh:\n  networks: [198.18.0.0/15]\n"
        )
    }
}

impl Drop for MeshCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
