//! A real etcd (Debian's etcd-server) on a test node, for the registry tests: started with its
//! data in the temp dir, authentication on (a root user, and one user per meshd node whose role
//! may write only below `/meshd/nodes/<node>/` and read the rest of `/meshd/`), killed and
//! restarted on the same data, removed with the handle. Several members and TLS (certificates
//! from openssl) for the cluster test.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{Process, TestNet};

pub const ROOT: &str = "root:registry-root-pw";

pub struct Etcd {
    pub node: usize,
    /// One process per member (`None`: killed).
    members: Vec<Option<Process>>,
    base: PathBuf,
    /// Where each node's password file is (`<dir>/<node>.pw`).
    pub secrets: PathBuf,
    /// The first member's client URL.
    pub endpoint: String,
    /// Every member's client URL.
    pub endpoints: Vec<String>,
    /// Authentication is on: etcdctl needs a user even for the health check.
    pub auth: bool,
    /// With TLS: the CA that signed the members' certificates.
    pub tls_ca: Option<PathBuf>,
}

impl Etcd {
    /// One etcd member on `node` (client port 2379 on the node's address, plain HTTP), healthy.
    pub fn start(net: &TestNet, node: usize) -> Result<Etcd> {
        Etcd::cluster(net, node, 1, false)
    }

    /// `members` etcd members on `node` (client ports 2379, 2389, ...), over TLS with
    /// certificates from a CA of their own when `tls`, healthy.
    pub fn cluster(net: &TestNet, node: usize, members: usize, tls: bool) -> Result<Etcd> {
        let base = std::env::temp_dir().join(format!("{}-etcd", net.id()));
        let addr = net.node(node).addr;
        let scheme = if tls { "https" } else { "http" };
        let endpoints: Vec<String> = (0..members)
            .map(|i| format!("{scheme}://{addr}:{}", 2379 + 10 * i))
            .collect();
        let mut etcd = Etcd {
            node,
            members: (0..members).map(|_| None).collect(),
            secrets: base.join("secrets"),
            base,
            endpoint: endpoints[0].clone(),
            endpoints,
            auth: false,
            tls_ca: None,
        };
        std::fs::create_dir_all(&etcd.secrets)?;
        if tls {
            etcd.tls_ca = Some(tls_certs(&etcd.secrets, &addr.to_string())?);
        }
        etcd.run(net)?;
        Ok(etcd)
    }

    /// (Re)starts every member that is not running, on its data directory, and waits until
    /// the running members answer.
    pub fn run(&mut self, net: &TestNet) -> Result<()> {
        let peers: Vec<String> = (0..self.members.len())
            .map(|i| format!("e{i}=http://127.0.0.1:{}", 2380 + 10 * i))
            .collect();
        let cluster = peers.join(",");
        for i in 0..self.members.len() {
            if self.members[i].is_none() {
                let argv = self.member_argv(i, &cluster);
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                self.members[i] = Some(net.host_process(self.node, &argv)?);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let user = self.auth.then_some(ROOT);
            match self.ctl(net, user, &["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => {
                    let log = (self.members.iter_mut().flatten())
                        .map(|p| p.output_so_far().join("\n"))
                        .collect::<Vec<_>>();
                    return Err(e).context(format!("etcd log:\n{}", log.join("\n")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn member_argv(&self, i: usize, cluster: &str) -> Vec<String> {
        let peer = format!("http://127.0.0.1:{}", 2380 + 10 * i);
        let data = self.base.join(format!("data-e{i}")).display().to_string();
        let mut argv: Vec<String> = [
            "etcd",
            "--name",
            &format!("e{i}"),
            "--data-dir",
            &data,
            "--listen-client-urls",
            &self.endpoints[i],
            "--advertise-client-urls",
            &self.endpoints[i],
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            cluster,
        ]
        .map(String::from)
        .to_vec();
        if self.tls_ca.is_some() {
            let file = |name: &str| self.secrets.join(name).display().to_string();
            argv.extend([
                "--cert-file".into(),
                file("etcd.crt"),
                "--key-file".into(),
                file("etcd.key"),
            ]);
        }
        argv
    }

    /// SIGKILL every member: the servers are gone, their data stays.
    pub fn kill(&mut self) {
        for m in &mut self.members {
            *m = None;
        }
    }

    /// SIGKILL one member.
    pub fn kill_member(&mut self, i: usize) {
        self.members[i] = None;
    }

    /// `etcdctl ARGS` against the running members as `user` (`name:password`; none before
    /// authentication is on).
    pub fn ctl(&self, net: &TestNet, user: Option<&str>, args: &[&str]) -> Result<String> {
        let running: Vec<&str> = (self.endpoints.iter().zip(&self.members))
            .filter(|(_, p)| p.is_some())
            .map(|(e, _)| e.as_str())
            .collect();
        let endpoints = running.join(",");
        let mut argv = vec!["etcdctl", "--endpoints", &endpoints];
        let ca = self.tls_ca.as_ref().map(|c| c.display().to_string());
        if let Some(ca) = &ca {
            argv.extend(["--cacert", ca]);
        }
        if let Some(user) = user {
            argv.extend(["--user", user]);
        }
        argv.extend(args);
        net.exec(self.node, &argv)
    }

    /// Turns authentication on with a user per node (`nodes`: their names); returns nothing,
    /// writes each node's password to [`Etcd::password_file`].
    pub fn enable_auth(&mut self, net: &TestNet, nodes: &[&str]) -> Result<()> {
        let (_, root_pw) = ROOT.split_once(':').unwrap();
        let ctl = |args: &[&str]| self.ctl(net, None, args);
        ctl(&["user", "add", "root", "--new-user-password", root_pw])?;
        ctl(&["user", "grant-role", "root", "root"])?;
        for node in nodes {
            let role = format!("node-{node}");
            let mine = format!("/meshd/nodes/{node}/");
            let password = format!("pw-{node}-{}", std::process::id());
            ctl(&["role", "add", &role])?;
            ctl(&[
                "role",
                "grant-permission",
                &role,
                "--prefix=true",
                "readwrite",
                &mine,
            ])?;
            ctl(&[
                "role",
                "grant-permission",
                &role,
                "--prefix=true",
                "read",
                "/meshd/",
            ])?;
            ctl(&["user", "add", node, "--new-user-password", &password])?;
            ctl(&["user", "grant-role", node, &role])?;
            std::fs::write(self.password_file(node), password)?;
        }
        ctl(&["auth", "enable"])?;
        self.auth = true;
        Ok(())
    }

    pub fn password_file(&self, node: &str) -> PathBuf {
        self.secrets.join(format!("{node}.pw"))
    }

    /// `user:password` of a node's etcd user.
    pub fn user(&self, node: &str) -> String {
        let pw = std::fs::read_to_string(self.password_file(node)).unwrap_or_default();
        format!("{node}:{pw}")
    }

    /// The `registry:` config section for meshd on `node`: every member, TLS when on.
    pub fn config(&self, node: &str, lease_ttl: &str) -> String {
        let tls = self.tls_ca.as_ref().map_or(String::new(), |ca| {
            format!("    tls: {{ca: {}}}\n", ca.display())
        });
        format!(
            "registry:\n  etcd:\n    endpoints: [{}]\n    username: {node}\n    \
             password_file: {}\n    lease_ttl: {lease_ttl}\n{tls}",
            self.endpoints.join(", "),
            self.password_file(node).display()
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A CA and a server certificate for `ip` (both usages: members talk TLS to each other's
/// clients too), made with openssl in `dir`; the CA certificate's path.
fn tls_certs(dir: &Path, ip: &str) -> Result<PathBuf> {
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=etcd test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ];
    ca.extend(ec);
    run(&ca)?;
    let mut csr = vec![
        "req", "-subj", "/CN=etcd", "-keyout", "etcd.key", "-out", "etcd.csr",
    ];
    csr.extend(ec);
    run(&csr)?;
    let ext =
        format!("subjectAltName=IP:{ip},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n");
    std::fs::write(dir.join("etcd.ext"), ext)?;
    run(&[
        "x509",
        "-req",
        "-in",
        "etcd.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "etcd.ext",
        "-out",
        "etcd.crt",
    ])?;
    Ok(dir.join("ca.crt"))
}
