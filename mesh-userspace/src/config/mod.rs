//! meshd's configuration file (YAML): the node's workloads (who they are, which cgroup holds
//! them, which ports they serve) and what interception leaves alone. Every mistake is reported
//! with the field it is in and what is wrong with it.

use std::{
    collections::HashSet,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::Deserialize;

pub mod mesh;
mod ports;
mod workload;

pub use ports::{PortConfig, PortSpec, Protocol};
pub use workload::{Workload, WorkloadConfig};

pub use mesh::{
    de_duration, parse_duration, Egress, IdentitySettings, MeshSettings, MtlsMode, PeerAuth,
};

/// A configuration error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    #[serde(default)]
    pub exclude: Exclude,
    #[serde(default)]
    pub proxy: ProxySettings,
    /// Without it meshd has no identity and forwards in plaintext (interception only).
    #[serde(default)]
    pub identity: Option<mesh::IdentityConfig>,
    #[serde(default)]
    pub mesh: mesh::MeshNetworks,
    #[serde(default)]
    pub peer_authentication: Vec<mesh::PeerAuthenticationDoc>,
    /// Pods: workloads in their own network namespaces, announced by the `meshd-cni` plugin.
    #[serde(default)]
    pub pods: Option<PodSettings>,
    /// AuthorizationPolicy files or directories (Istio's security.istio.io v1/v1beta1 shape).
    /// Changes are picked up live (inotify, SIGHUP); without any, every verified peer may reach
    /// every workload port.
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// Abuse limits at the inbound edge (off unless set): `per_source` (caller identity) and
    /// `per_workload`, each with `max_connections`, `connections_per_second`, `burst`.
    #[serde(default)]
    pub limits: crate::proxy::limits::LimitsConfig,
    /// Which destinations outside the mesh each workload may reach; workloads none selects
    /// follow `mesh.egress`.
    #[serde(default)]
    pub egress_policies: Vec<crate::proxy::egress::EgressPolicyConfig>,
    /// Limits of the :15008 listener (HTTP/2 and TLS), each with a default.
    #[serde(default)]
    pub hbone: crate::tunnel::limits::HboneLimits,
    /// Where meshd learns about the rest of the mesh (other nodes' workloads, Services) and
    /// publishes its own: `registry.etcd`.
    #[serde(default)]
    pub registry: RegistryConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    #[serde(default)]
    pub etcd: Option<crate::registry::etcd::EtcdConfig>,
}

impl RegistryConfig {
    fn validate(
        self,
        has_identity: bool,
    ) -> Result<Option<crate::registry::etcd::EtcdSettings>, ConfigError> {
        let Some(etcd) = self.etcd else {
            return Ok(None);
        };
        if !has_identity {
            let why = "needs an identity section (the node name it registers under)";
            return Err(err("registry.etcd", why));
        }
        etcd.validate()
            .map(Some)
            .map_err(|r| err("registry.etcd", r))
    }
}

/// How meshd serves pods (each in its own network namespace).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSettings {
    /// The unix socket the CNI plugin (`meshd-cni`) talks to.
    #[serde(default = "default_cni_socket")]
    pub cni_socket: PathBuf,
    /// Where meshd records the pods it serves, to re-adopt them after a restart.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// ebpf mode: the cgroup (relative to the cgroup v2 mount) below which the container
    /// runtime puts pods, e.g. `kubepods.slice` or podman's `libpod_parent`. meshd attaches its
    /// connect programs there once; they steer only sockets in the network namespace of a pod
    /// meshd serves, so pods outside the mesh and host-network processes are untouched.
    #[serde(default)]
    pub cgroup_parent: Option<PathBuf>,
    /// Namespaces whose pods stay outside the mesh (the CNI plugin lets them start untouched).
    #[serde(default)]
    pub excluded_namespaces: Vec<String>,
    /// On podman hosts without Kubernetes: the podman command line (e.g. with `--root`) meshd
    /// runs to read each pod's labels and annotations (`meshd.io/namespace`,
    /// `meshd.io/service-account`). Without it, identity comes from the CNI arguments.
    #[serde(default)]
    pub podman: Option<Vec<String>>,
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from("/run/meshd/cni.sock")
}

pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/meshd")
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclude {
    /// Destination ports never intercepted.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Destination CIDRs never intercepted.
    #[serde(default)]
    pub cidrs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// SO_MARK on meshd's own upstream sockets; both modes skip sockets carrying it.
    #[serde(default = "default_mark")]
    pub mark: u32,
    /// A uid whose sockets are never intercepted (meshd's, when it runs as a dedicated user).
    #[serde(default)]
    pub uid: Option<u32>,
    /// bpffs directory for meshd's pinned links and maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Where meshd keeps what outlives one process: the handover socket a restarted meshd
    /// takes the listeners from, the record of reserved ports (`pods.state_dir` when pods are
    /// served).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Threads serving connections. 1 (default): one event loop, no cross-thread wake-ups, for
    /// nodes where meshd shares few cores with the workloads. More threads pay off when meshd
    /// has cores to itself (the benchmark has no multi-worker path: measure on your node).
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    /// `--mode=ebpf`: move bytes between applications and meshd on this node with sk_msg
    /// (socket to socket, no TCP stack on the loopback hop; the gain is the README table's
    /// meshd-ebpf-skmsg path against meshd-ebpf). The default of every workload's `sk_msg_bypass`. Needs meshd in a cgroup of its own (not the root), where it attaches sockops
    /// for its own sockets. Off by default: an application socket in a sockmap has the
    /// kernel's tcp_bpf receive path, where a *blocking* read can fail with EAGAIN when the
    /// socket is woken without data (e.g. another thread half-closes it). Event-driven
    /// applications (non-blocking sockets: Go, Java NIO, Node, nginx, tokio) are unaffected.
    #[serde(default)]
    pub sk_msg_bypass: bool,
}

fn default_worker_threads() -> usize {
    1
}

fn default_mark() -> u32 {
    0x539
}

/// `/sys/fs/bpf/meshd`.
pub fn default_pin_dir() -> PathBuf {
    PathBuf::from(crate::sys::BPFFS_MOUNT).join(crate::cleanup::PIN_DIR_NAME)
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            mark: default_mark(),
            uid: None,
            pin_dir: default_pin_dir(),
            state_dir: default_state_dir(),
            worker_threads: default_worker_threads(),
            sk_msg_bypass: false,
        }
    }
}

/// An IPv4 network, `a.b.c.d/len`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR (a.b.c.d/len)"))?;
        let prefix: u8 = match prefix.parse() {
            Ok(p) if p <= 32 => p,
            _ => return Err(format!("{s:?}: prefix length must be 0..=32")),
        };
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(format!(
                "{s:?} has host bits set; did you mean {network}/{prefix}?"
            ));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl Ipv4Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Validated {
    pub workloads: Vec<Workload>,
    pub excluded_ports: Vec<u16>,
    pub excluded_cidrs: Vec<Ipv4Cidr>,
    pub proxy: ProxySettings,
    pub identity: Option<IdentitySettings>,
    pub mesh: MeshSettings,
    pub peer_auth: PeerAuth,
    pub pods: Option<ValidPods>,
    pub policies: Vec<PathBuf>,
    pub limits: crate::proxy::limits::LimitsConfig,
    pub egress_policies: Vec<crate::proxy::egress::EgressPolicyConfig>,
    pub hbone: crate::tunnel::limits::HboneLimits,
    pub etcd: Option<crate::registry::etcd::EtcdSettings>,
}

/// [`PodSettings`] with the cgroup parent found on this machine.
#[derive(Debug, Clone)]
pub struct ValidPods {
    pub settings: PodSettings,
    pub cgroup_parent: Option<PathBuf>,
}

impl Validated {
    /// Every port some workload serves (what inbound capture takes).
    pub fn inbound_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .workloads
            .iter()
            .flat_map(|w| w.ports.clone())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// Reads and validates a config file; cgroup paths are resolved under `cgroup_root`.
pub fn load(path: &Path, cgroup_root: &Path) -> Result<Validated, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err("file", format!("cannot read {}: {e}", path.display())))?;
    parse(&text, cgroup_root)
}

pub fn parse(text: &str, cgroup_root: &Path) -> Result<Validated, ConfigError> {
    let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "document".into());
        err(at, e.to_string())
    })?;
    config.validate(cgroup_root)
}

impl Config {
    pub fn validate(self, cgroup_root: &Path) -> Result<Validated, ConfigError> {
        let mut workloads = Vec::new();
        let mut names = HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let field = |f: &str| format!("workloads[{i}].{f}");
            if w.name.is_empty() {
                return Err(err(field("name"), "must not be empty"));
            }
            if !names.insert(&w.name) {
                return Err(err(field("name"), format!("{:?} is used twice", w.name)));
            }
            let mut workload = w.resolve(cgroup_root, &field)?;
            workload.sk_msg_bypass = w.sk_msg_bypass.unwrap_or(self.proxy.sk_msg_bypass);
            workloads.push(workload);
        }
        workload::check_distinct_ports(&workloads)?;
        for (i, port) in self.exclude.ports.iter().enumerate() {
            if *port == 0 {
                return Err(err(format!("exclude.ports[{i}]"), "port 0 is not a port"));
            }
        }
        let excluded_cidrs = (self.exclude.cidrs.iter().enumerate())
            .map(|(i, c)| c.parse().map_err(|r| err(format!("exclude.cidrs[{i}]"), r)))
            .collect::<Result<Vec<Ipv4Cidr>, _>>()?;
        if self.proxy.worker_threads == 0 {
            return Err(err("proxy.worker_threads", "must be at least 1"));
        }
        if self.proxy.mark == 0 {
            return Err(err(
                "proxy.mark",
                "must not be 0 (unmarked sockets carry 0)",
            ));
        }
        let limits = [
            ("limits.per_source", &self.limits.per_source),
            ("limits.per_workload", &self.limits.per_workload),
        ];
        for (field, limit) in limits {
            limit.validate().map_err(|reason| err(field, reason))?;
        }
        crate::proxy::egress::EgressPolicies::new(&self.egress_policies)
            .map_err(|reason| err("egress_policies", reason))?;
        let identity = self.identity.as_ref().map(|i| i.validate()).transpose()?;
        let mesh = self.mesh.validate()?;
        let trust_domain = identity.as_ref().map(|i| i.trust_domain.as_str());
        for w in &mut workloads {
            w.party = crate::metrics::istio::Party::of(w, trust_domain);
        }
        let etcd = self.registry.validate(identity.is_some())?;
        if identity.is_none() && !mesh.networks.is_empty() {
            return Err(err(
                "mesh.networks",
                "needs an identity section (mTLS needs certificates)",
            ));
        }
        Ok(Validated {
            workloads,
            excluded_ports: self.exclude.ports,
            excluded_cidrs,
            proxy: self.proxy,
            identity,
            mesh,
            peer_auth: mesh::PeerAuth::from_docs(&self.peer_authentication)?,
            pods: self.pods.map(|p| p.validate(cgroup_root)).transpose()?,
            policies: self.policies,
            limits: self.limits,
            egress_policies: self.egress_policies,
            hbone: self.hbone.validate()?,
            etcd,
        })
    }
}

impl PodSettings {
    fn validate(self, cgroup_root: &Path) -> Result<ValidPods, ConfigError> {
        let cgroup_parent = match &self.cgroup_parent {
            None => None,
            Some(parent) => {
                Some(workload::cgroup_dir(cgroup_root, parent, "pods.cgroup_parent")?.0)
            }
        };
        Ok(ValidPods {
            settings: self,
            cgroup_parent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempdir::Dir {
        tempdir::Dir::new()
    }

    /// A fake cgroup root: directories with a `cgroup.procs` file.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let n = N.fetch_add(1, Ordering::SeqCst);
                let p = std::env::temp_dir().join(format!("meshd-cfg-{}-{n}", std::process::id()));
                std::fs::create_dir_all(p.join("app")).unwrap();
                std::fs::write(p.join("app/cgroup.procs"), "").unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_complete_config_is_accepted_with_defaults_filled() {
        let r = root();
        let text = "workloads:\n- name: checkout\n  cgroup: /app\n  ports: [8080]\n\
                    exclude:\n  ports: [22]\n  cidrs: [10.0.0.0/8]\n";
        let v = parse(text, &r.0).unwrap();
        assert_eq!(v.workloads[0].service_account, "checkout");
        assert_eq!(v.workloads[0].namespace, "default");
        assert_eq!(v.workloads[0].cgroup_path, r.0.join("app"));
        assert_eq!(v.excluded_cidrs[0].to_string(), "10.0.0.0/8");
        assert_eq!(v.inbound_ports(), vec![8080]);
        assert_eq!(v.proxy.mark, 0x539);
    }

    #[test]
    fn each_mistake_names_its_field() {
        let r = root();
        let cases = [
            (
                "workloads:\n- name: a\n  cgroup: /missing\n",
                "workloads[0].cgroup",
                "does not exist",
            ),
            (
                "workloads:\n- name: a\n  cgroup: /\n",
                "workloads[0].cgroup",
                "cgroup root",
            ),
            (
                "workloads:\n- name: a\n  cgroup: /app/../..\n",
                "workloads[0].cgroup",
                "..",
            ),
            (
                "exclude:\n  cidrs: [10.0.0.1/8]\n",
                "exclude.cidrs[0]",
                "did you mean 10.0.0.0/8",
            ),
            (
                "exclude:\n  cidrs: [banana]\n",
                "exclude.cidrs[0]",
                "not an IPv4 CIDR",
            ),
            (
                "hbone:\n  max_pending_handshakes: 0\n",
                "hbone.max_pending_handshakes",
                "at least 1",
            ),
            (
                "hbone:\n  idle_timeout: 10ms\n",
                "hbone.idle_timeout",
                "at least 100ms",
            ),
            (
                "exclude:\n  cidrs: [10.0.0.0/33]\n",
                "exclude.cidrs[0]",
                "prefix length",
            ),
            (
                "workloads:\n- name: a\n  cgroup: /app\n  ports: [15001]\n",
                "ports[0]",
                "meshd's own",
            ),
            (
                "workloads:\n- {name: a, cgroup: /app}\n- {name: a, cgroup: /app}\n",
                "workloads[1].name",
                "twice",
            ),
            ("proxy:\n  mark: 0\n", "proxy.mark", "must not be 0"),
            (
                "proxy:\n  worker_threads: 0\n",
                "proxy.worker_threads",
                "at least 1",
            ),
            ("workload: []\n", "line 1", "unknown field"),
            ("exclude:\n  ports: [70000]\n", "line 2", "invalid value"),
        ];
        for (text, field, reason) in cases {
            let e = parse(text, &r.0).unwrap_err();
            assert!(e.field.contains(field), "{text:?}: field {:?}", e.field);
            assert!(e.to_string().contains(reason), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../../examples/meshd.yaml");
        let config: Config = serde_yaml_ng::from_str(text).expect("examples/meshd.yaml");
        assert_eq!(config.workloads[0].ports[1].protocol(), Protocol::Http);
        assert_eq!(config.workloads[0].labels["app"], "checkout");
        crate::proxy::egress::EgressPolicies::new(&config.egress_policies).unwrap();
        config.limits.per_source.validate().unwrap();
    }

    #[test]
    fn cidr_contains_its_addresses_only() {
        let c: Ipv4Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(198, 19, 255, 1)));
        assert!(!c.contains(Ipv4Addr::new(198, 20, 0, 1)));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
