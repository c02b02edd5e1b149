//! Test nodes: one network namespace per node, each with an `eth0` veth whose other end sits on
//! a bridge in a hub namespace, so every node reaches every other on 198.18.0.0/24 (and on
//! 2001:2::/64). Nothing is
//! created in the machine's own namespace, so concurrent tests cannot collide.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};

use crate::{footprint::Footprint, process::Process};

/// Prefix of every name the harness gives to namespaces, cgroups and pin directories.
pub const PREFIX: &str = "meshtest-";

static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone)]
pub struct TestNode {
    pub index: usize,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    pub addr: Ipv4Addr,
    /// IPv6 address from the benchmarking range 2001:2::/48 (RFC 5180).
    pub addr6: Ipv6Addr,
}

impl TestNode {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

pub struct TestNet {
    id: String,
    hub: String,
    nodes: Vec<TestNode>,
    /// This net's cgroup: every process it starts lives below it.
    cgroup: PathBuf,
}

impl TestNet {
    /// Creates `count` nodes, 198.18.0.1 upwards. Partial failures clean up what was made.
    pub fn new(count: usize) -> Result<TestNet> {
        crate::footprint::sweep_stale();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let cgroup_root = meshd::sys::ensure_cgroup2()?;
        let mut net = TestNet {
            hub: format!("{id}-hub"),
            cgroup: cgroup_root.join(&id),
            id,
            nodes: Vec::new(),
        };
        std::fs::create_dir(&net.cgroup)
            .with_context(|| format!("create cgroup {}", net.cgroup.display()))?;
        add_netns(&net.hub)?;
        ip(&net.hub, &["link", "add", "br0", "type", "bridge"])?;
        ip(&net.hub, &["link", "set", "br0", "up"])?;
        for index in 0..count {
            net.add_node(index)?;
        }
        Ok(net)
    }

    fn add_node(&mut self, index: usize) -> Result<()> {
        let node = TestNode {
            index,
            netns: format!("{}-n{index}", self.id),
            addr: Ipv4Addr::new(198, 18, 0, index as u8 + 1),
            addr6: Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, index as u16 + 1),
        };
        add_netns(&node.netns)?;
        self.nodes.push(node.clone());
        let hub_end = format!("vn{index}");
        let link = [
            "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0",
        ];
        let mut args = link.to_vec();
        args.extend(["netns", node.netns.as_str()]);
        ip(&self.hub, &args)?;
        ip(&self.hub, &["link", "set", &hub_end, "master", "br0", "up"])?;
        let cidr = format!("{}/24", node.addr);
        ip(&node.netns, &["addr", "add", &cidr, "dev", "eth0"])?;
        let cidr6 = format!("{}/64", node.addr6);
        ip(
            &node.netns,
            &["addr", "add", &cidr6, "dev", "eth0", "nodad"],
        )?;
        ip(&node.netns, &["link", "set", "eth0", "up"])?;
        ip(&node.netns, &["link", "set", "lo", "up"])
    }

    /// The name every object of this net carries.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn node(&self, index: usize) -> &TestNode {
        &self.nodes[index]
    }

    pub fn nodes(&self) -> &[TestNode] {
        &self.nodes
    }

    /// The cgroup every process of this net lives under.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Starts a workload: `argv` in its own child cgroup `name`, in `node`'s namespace.
    pub fn workload(&self, node: usize, name: &str, argv: &[&str]) -> Result<Process> {
        Process::spawn(self.node(node), &self.cgroup.join(name), argv)
    }

    /// Starts a process in `node` that is not a workload (a server, meshd itself): it lives in
    /// the node's `host` cgroup, which no workload program is attached to.
    pub fn host_process(&self, node: usize, argv: &[&str]) -> Result<Process> {
        let host = self.cgroup.join(format!("host-n{node}"));
        Process::spawn(self.node(node), &host, argv)
    }

    /// Runs a command to completion in `node`'s namespace (e.g. `iptables-save`).
    pub fn exec(&self, node: usize, argv: &[&str]) -> Result<String> {
        let mut p = self.host_process(node, argv)?;
        let (status, out) = p.wait_output(std::time::Duration::from_secs(20))?;
        if !status.success() {
            bail!("{argv:?} in node {node} failed ({status}): {out}");
        }
        Ok(out)
    }

    /// A bpffs directory for this net's pinned objects, removed with the net.
    pub fn pin_dir(&self) -> Result<PathBuf> {
        let dir = meshd::sys::ensure_bpffs()?.join(&self.id);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Everything this net has made so far, to check later that it is all gone.
    pub fn footprint(&self) -> Footprint {
        Footprint::of_id(&self.id)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let footprint = self.footprint();
        if let Err(e) = footprint.remove() {
            eprintln!("testhosts: cleanup of {} incomplete: {e:#}", self.id);
        }
    }
}

fn add_netns(name: &str) -> Result<()> {
    run_ip(&["netns", "add", name])
}

/// `ip -n NETNS args...`
pub(crate) fn ip(netns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", netns];
    full.extend(args);
    run_ip(&full)
}

pub(crate) fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
