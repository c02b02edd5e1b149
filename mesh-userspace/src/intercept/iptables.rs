//! `--mode=iptables`: nat REDIRECT rules (the `iptables-fallback` crate) send outbound TCP to
//! :15001 and inbound TCP for workload ports to :15006. The original destination comes from
//! SO_ORIGINAL_DST; the sending workload from the cgroup of the application's end of the
//! connection, which sock_diag reports by 4-tuple (`sock_diag.rs`).

use std::{net::SocketAddrV4, path::Path, sync::Arc};

use anyhow::{Context, Result};
use iptables_fallback::{Iptables, RuleSpec};
use mesh_common::{ports, DELIVERY_SOURCE_IP};
use procfs::process::{FDTarget, Process};
use tokio::net::TcpStream;

use super::{
    orig_dst::original_dst, sock_diag, v4, Interception, Mode, Origin, OriginError, PodCapture,
    PodNet, Workloads,
};
use crate::{
    config::{Validated, Workload},
    proxy::Scope,
};

pub struct IptablesInterception {
    iptables: Iptables,
    workloads: Workloads,
    /// The node's rule set; a pod's differs only in capturing every inbound port.
    spec: RuleSpec,
}

/// A pod's rules, inside its namespace (the node's tables are not touched).
struct PodRules {
    iptables: Iptables,
}

impl PodCapture for PodRules {
    fn remove(&self) -> Result<()> {
        self.iptables.remove()?;
        Ok(())
    }
}

/// The rule set a configuration asks for.
pub fn rule_spec(cfg: &Validated) -> RuleSpec {
    RuleSpec {
        outbound_port: ports::OUTBOUND,
        inbound_port: ports::INBOUND_PLAINTEXT,
        proxy_mark: cfg.proxy.mark,
        proxy_uid: cfg.proxy.uid,
        proxy_ports: ports::ALL.to_vec(),
        excluded_ports: cfg.excluded_ports.clone(),
        excluded_cidrs: cfg.excluded_cidrs.iter().map(|c| c.to_string()).collect(),
        inbound_ports: cfg.inbound_ports(),
        outbound_cgroups: Some(
            (cfg.workloads.iter())
                .map(|w| w.cgroup.display().to_string())
                .collect(),
        ),
        inbound_all_ports: false,
        delivery_source: DELIVERY_SOURCE_IP.into(),
    }
}

/// Applies the rule set in this network namespace (replacing any earlier copy) and verifies it.
pub fn install(cfg: &Validated) -> Result<IptablesInterception> {
    let iptables = Iptables::detect()?;
    let spec = rule_spec(cfg);
    if cfg.workloads.is_empty() {
        // Only pods: the node's own processes (kubelet, sshd) are none of meshd's business.
        iptables
            .remove()
            .context("remove meshd's earlier node rules")?;
        tracing::info!("no host workloads: the node's tables are left untouched");
    } else {
        iptables
            .apply(&spec)
            .context("install meshd's iptables rules")?;
        tracing::info!(
            backend = iptables.backend.name(),
            "iptables rules applied and verified"
        );
    }
    Ok(IptablesInterception {
        iptables,
        workloads: Workloads::new(&cfg.workloads),
        spec,
    })
}

impl IptablesInterception {
    /// The workload whose process owns the application end `app` -> `dst`: the socket's cgroup
    /// from sock_diag, or on kernels that do not report it (before 5.7) the workload process
    /// holding the socket's inode.
    fn owner(&self, app: SocketAddrV4, dst: SocketAddrV4) -> Option<Arc<Workload>> {
        let found = sock_diag::owner(app, dst).ok().flatten()?;
        if let Some(id) = found.cgroup_id {
            return self.workloads.by_cgroup_id(id);
        }
        let inode = u64::from(found.inode);
        self.workloads
            .iter()
            .find(|w| cgroup_holds_socket(&w.cgroup_path, inode))
            .cloned()
    }
}

/// Whether a process in `cgroup` (not its descendants) has socket `inode` open.
fn cgroup_holds_socket(cgroup: &Path, inode: u64) -> bool {
    let pids = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    pids.lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter_map(|pid| Process::new(pid).ok()?.fd().ok())
        .any(|mut fds| {
            fds.any(|fd| fd.is_ok_and(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode)))
        })
}

impl Interception for IptablesInterception {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn outbound_origin(&self, conn: &TcpStream, scope: &Scope) -> Result<Origin, OriginError> {
        let peer = conn.peer_addr()?;
        // The socket lives in the pod's namespace: its conntrack entry is the pod's.
        let dst = original_dst(conn).map_err(|_| OriginError::NoRecord(peer))?;
        let workload = match &scope.pod {
            Some(pod) => Some(pod.workload.clone()),
            None => self.owner(v4(peer)?, dst),
        };
        Ok(Origin { dst, workload })
    }

    fn capture_pod(&self, pod: &PodNet<'_>) -> Result<Box<dyn PodCapture>> {
        let iptables = self.iptables.in_netns(&pod.netns.path);
        let spec = RuleSpec {
            inbound_ports: Vec::new(),
            outbound_cgroups: None,
            inbound_all_ports: true,
            ..self.spec.clone()
        };
        // One restore transaction replaces whatever an earlier meshd left: never a gap.
        iptables
            .apply(&spec)
            .with_context(|| format!("iptables rules in pod {}", pod.id))?;
        Ok(Box::new(PodRules { iptables }))
    }

    fn inbound_dst(&self, conn: &TcpStream) -> Result<SocketAddrV4, OriginError> {
        let peer = conn.peer_addr()?;
        original_dst(conn).map_err(|_| OriginError::NoRecord(peer))
    }

    fn status(&self) -> String {
        if self.workloads.iter().next().is_none() {
            return "no host workloads: node rules not installed (pods carry their own)".into();
        }
        match self.iptables.present() {
            Ok(true) => format!("iptables rules present ({})", self.iptables.backend.name()),
            Ok(false) => "iptables rules MISSING: someone removed them".into(),
            Err(e) => format!("iptables rules unknown: {e}"),
        }
    }
}
