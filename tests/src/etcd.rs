//! A real etcd (Debian's etcd-server) on a test node, for the registry tests: started with its
//! data in the temp dir, authentication on (a root user, and one user per meshd node whose role
//! may write only below `/meshd/nodes/<node>/` and read the rest of `/meshd/`), killed and
//! restarted on the same data, removed with the handle.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};

use crate::{Process, TestNet};

pub const ROOT: &str = "root:registry-root-pw";

pub struct Etcd {
    pub node: usize,
    pub process: Option<Process>,
    pub data_dir: PathBuf,
    /// Where each node's password file is (`<dir>/<node>.pw`).
    pub secrets: PathBuf,
    pub endpoint: String,
    /// Authentication is on: etcdctl needs a user even for the health check.
    pub auth: bool,
}

impl Etcd {
    /// etcd on `node` (client port 2379 on the node's address), healthy.
    pub fn start(net: &TestNet, node: usize) -> Result<Etcd> {
        let base = std::env::temp_dir().join(format!("{}-etcd", net.id()));
        let mut etcd = Etcd {
            node,
            process: None,
            data_dir: base.join("data"),
            secrets: base.join("secrets"),
            endpoint: format!("http://{}:2379", net.node(node).addr),
            auth: false,
        };
        std::fs::create_dir_all(&etcd.secrets)?;
        etcd.run(net)?;
        Ok(etcd)
    }

    /// (Re)starts the server on its data directory and waits until it answers.
    pub fn run(&mut self, net: &TestNet) -> Result<()> {
        let peer = "http://127.0.0.1:2380";
        let data = self.data_dir.display().to_string();
        let cluster = format!("e0={peer}");
        let argv = [
            "etcd",
            "--name",
            "e0",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &self.endpoint,
            "--advertise-client-urls",
            &self.endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            &cluster,
        ];
        self.process = Some(net.host_process(self.node, &argv)?);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let user = self.auth.then_some(ROOT);
            match self.ctl(net, user, &["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => {
                    let log = self.process.as_mut().map(|p| p.output_so_far().join("\n"));
                    return Err(e).context(format!("etcd log:\n{}", log.unwrap_or_default()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// SIGKILL: the server is gone, its data stays.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// `etcdctl ARGS` as `user` (`name:password`; none before authentication is on).
    pub fn ctl(&self, net: &TestNet, user: Option<&str>, args: &[&str]) -> Result<String> {
        let mut argv = vec!["etcdctl", "--endpoints", &self.endpoint];
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

    /// The `registry:` config section for meshd on `node`.
    pub fn config(&self, node: &str, lease_ttl: &str) -> String {
        format!(
            "registry:\n  etcd:\n    endpoints: [{}]\n    username: {node}\n    \
             password_file: {}\n    lease_ttl: {lease_ttl}\n",
            self.endpoint,
            self.password_file(node).display()
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.process = None;
        if let Some(base) = self.data_dir.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}
