//! Workloads in the configuration: their cgroups found on this machine, their ports checked
//! (never meshd's own, never one another's).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{err, ConfigError, PortConfig, Protocol};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Defaults to the workload name.
    #[serde(default)]
    pub service_account: Option<String>,
    /// The workload's cgroup, relative to the cgroup v2 mount (a leading `/` is allowed).
    pub cgroup: PathBuf,
    /// Ports the workload serves; new inbound connections to them are captured. `8080` or
    /// `{port: 8080, protocol: http}`: on `http` (HTTP/1.1) and `grpc` (HTTP/2 with prior
    /// knowledge) ports authorization policy decides each request; `tcp` (the default) each
    /// connection.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// Labels AuthorizationPolicy selectors match (`selector.matchLabels`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// ebpf mode: this workload's local hops to meshd use the sk_msg bypass (default:
    /// `proxy.sk_msg_bypass`). Turn it on for event-driven workloads (non-blocking sockets).
    #[serde(default)]
    pub sk_msg_bypass: Option<bool>,
}

fn default_namespace() -> String {
    "default".into()
}

/// A workload as meshd runs it: the config entry with its cgroup found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Absolute path of the cgroup directory.
    pub cgroup_path: PathBuf,
    /// The same cgroup relative to the cgroup v2 root, with a leading `/` (as iptables' cgroup
    /// match names it).
    pub cgroup: PathBuf,
    /// cgroup v2 id (the directory's inode number), what eBPF programs report.
    pub cgroup_id: u64,
    pub ports: Vec<u16>,
    /// Ports that are not plain TCP (policy decides their requests).
    pub protocols: BTreeMap<u16, Protocol>,
    /// What AuthorizationPolicy selectors match.
    pub labels: BTreeMap<String, String>,
    /// Its sockets to and from meshd go through the sk_msg bypass (ebpf mode).
    pub sk_msg_bypass: bool,
    /// How telemetry names it (set once the trust domain is known).
    pub party: crate::metrics::istio::Party,
}

impl Workload {
    pub fn protocol(&self, port: u16) -> Protocol {
        self.protocols.get(&port).copied().unwrap_or_default()
    }
}

/// A cgroup v2 directory below the root (never the root itself), with its metadata.
pub(super) fn cgroup_dir(
    cgroup_root: &Path,
    cgroup: &Path,
    field: &str,
) -> Result<(PathBuf, std::fs::Metadata), ConfigError> {
    let relative = cgroup.strip_prefix("/").unwrap_or(cgroup);
    if relative.as_os_str().is_empty() {
        return Err(err(
            field,
            "is the cgroup root: meshd attaches only to workload cgroups below it",
        ));
    }
    if relative.components().any(|c| c.as_os_str() == "..") {
        return Err(err(field, "must not contain `..`"));
    }
    let cgroup_path = cgroup_root.join(relative);
    let meta = std::fs::metadata(&cgroup_path).map_err(|e| {
        let reason = format!("{} does not exist ({e})", cgroup_path.display());
        err(field, reason)
    })?;
    if !meta.is_dir() || !cgroup_path.join("cgroup.procs").exists() {
        let reason = format!("{} is not a cgroup v2 directory", cgroup_path.display());
        return Err(err(field, reason));
    }
    Ok((cgroup_path, meta))
}

impl WorkloadConfig {
    pub(super) fn resolve(
        &self,
        cgroup_root: &Path,
        field: &dyn Fn(&str) -> String,
    ) -> Result<Workload, ConfigError> {
        let (cgroup_path, meta) = cgroup_dir(cgroup_root, &self.cgroup, &field("cgroup"))?;
        for (j, port) in self.ports.iter().map(PortConfig::port).enumerate() {
            if port == 0 || mesh_common::ports::ALL.contains(&port) {
                let reason = format!("{port} is not a workload port (0 or one of meshd's own)");
                return Err(err(field(&format!("ports[{j}]")), reason));
            }
        }
        Ok(Workload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone().unwrap_or(self.name.clone()),
            cgroup_id: std::os::linux::fs::MetadataExt::st_ino(&meta),
            cgroup: Path::new("/").join(self.cgroup.strip_prefix("/").unwrap_or(&self.cgroup)),
            cgroup_path,
            ports: self.ports.iter().map(PortConfig::port).collect(),
            protocols: (self.ports.iter())
                .filter(|p| p.protocol() != Protocol::Tcp)
                .map(|p| (p.port(), p.protocol()))
                .collect(),
            labels: self.labels.clone(),
            sk_msg_bypass: false,
            party: crate::metrics::istio::Party::unknown(),
        })
    }
}

/// Two workloads of the node's namespace serving one port: an inbound connection to it could
/// not be told apart (pods, each in its own namespace, may share ports).
pub(super) fn check_distinct_ports(workloads: &[Workload]) -> Result<(), ConfigError> {
    let mut owner: HashMap<u16, &str> = HashMap::new();
    for (i, w) in workloads.iter().enumerate() {
        for (j, port) in w.ports.iter().enumerate() {
            if let Some(other) = owner.insert(*port, &w.name).filter(|o| *o != w.name) {
                let reason = format!(
                    "port {port} is also served by workload {other:?}: inbound connections to it \
                     could not be told apart (give each workload its own ports)"
                );
                return Err(err(format!("workloads[{i}].ports[{j}]"), reason));
            }
        }
    }
    Ok(())
}
