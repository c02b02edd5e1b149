//! Interception: how an application's connection reaches meshd and how meshd learns where it
//! wanted to go and which workload made it. Two modes answer that one question behind the
//! [`Interception`] trait; nothing above this module knows which mode runs.

pub mod ebpf;
pub mod iptables;
mod orig_dst;
pub mod sock_diag;

use std::{
    collections::HashMap,
    fmt,
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use mesh_common::names;

use tokio::net::TcpStream;

use crate::{config::Workload, inpod::netns::Netns, proxy::Scope};

/// What interception needs to capture one pod: its namespace, address and the :15006 socket
/// meshd made inside it.
pub struct PodNet<'a> {
    /// The pod's name in pins and logs (unique on the node: the container id).
    pub id: &'a str,
    pub netns: &'a Netns,
    pub ip: std::net::Ipv4Addr,
    pub inbound_listener: std::os::fd::BorrowedFd<'a>,
}

/// One pod's capture; `remove` takes it away (the pod was deleted).
pub trait PodCapture: Send + Sync {
    fn remove(&self) -> anyhow::Result<()>;
}

/// The eBPF object compiled from `mesh-ebpf` by build.rs, embedded in the binary.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// Loads meshd's eBPF object. Without kernel BTF: the programs use no CO-RE relocations, and
/// parsing /sys/kernel/btf/vmlinux costs megabytes of resident memory for nothing.
pub fn load_object() -> Result<aya::Ebpf, aya::EbpfError> {
    aya::EbpfLoader::new().btf(None).load(EBPF_OBJECT)
}

/// The maps a restarted meshd shares with the one before it (pinned under `pin_dir/maps`): the
/// original destinations of connections steered but not yet accepted, the pods' gates and
/// listeners, the settings and the kernel counters. Swapping programs into pinned links keeps
/// every hook working; sharing these keeps every connection's state.
const SHARED_MAPS: [&str; 10] = [
    names::MAP_CONFIG,
    names::MAP_ORIG_DST_BY_COOKIE,
    names::MAP_ORIG_DST_BY_TUPLE,
    names::MAP_EXCLUDED_PORTS,
    names::MAP_EXCLUDED_CIDRS,
    names::MAP_INBOUND_PORTS,
    names::MAP_INBOUND_LISTENER,
    names::MAP_COUNTERS,
    names::MAP_POD_NETNS,
    names::MAP_POD_LISTENERS,
];

/// Loads meshd's eBPF object reusing the maps pinned in `dir` by an earlier meshd (creating and
/// pinning those that are not there). A pinned map whose shape differs from this build's (an
/// upgrade that changed it) is replaced by a new one, said in the log.
pub fn load_object_sharing_maps(dir: &Path) -> anyhow::Result<aya::Ebpf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let defs = aya_obj::Object::parse(EBPF_OBJECT)
        .context("parse meshd's eBPF object")?
        .maps;
    let pins: Vec<(&'static str, PathBuf)> =
        SHARED_MAPS.iter().map(|n| (*n, dir.join(n))).collect();
    for (name, pin) in pins.iter().filter(|(_, p)| p.exists()) {
        let def = defs
            .get(*name)
            .ok_or_else(|| anyhow::anyhow!("map {name} missing from the eBPF object"))?;
        let shape =
            |m: &aya_obj::Map| (m.map_type(), m.key_size(), m.value_size(), m.max_entries());
        let pinned = aya::maps::MapInfo::from_pin(pin).and_then(|i| {
            Ok((
                i.map_type()? as u32,
                i.key_size(),
                i.value_size(),
                i.max_entries(),
            ))
        });
        match pinned {
            Ok(found) if found == shape(def) => {}
            found => {
                tracing::warn!(map = name, ?found, wanted = ?shape(def),
                    "a pinned map of another shape (an earlier version?): replaced by a new one");
                std::fs::remove_file(pin).with_context(|| format!("remove {}", pin.display()))?;
            }
        }
    }
    let mut loader = aya::EbpfLoader::new();
    loader.btf(None);
    for (name, pin) in &pins {
        loader.map_pin_path(name, pin.as_path());
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// How connections are steered into meshd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// cgroup/connect4 + sockops + sk_lookup programs; no iptables rule anywhere.
    Ebpf,
    /// nat REDIRECT rules, original destination from SO_ORIGINAL_DST.
    Iptables,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What the operator asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    Ebpf,
    Iptables,
    /// ebpf when `meshd doctor`'s probe passes, otherwise iptables.
    Auto,
}

/// Where an intercepted outbound connection wanted to go, and who made it.
#[derive(Debug, Clone)]
pub struct Origin {
    pub dst: SocketAddrV4,
    /// `None` when the sender could not be tied to a configured workload.
    pub workload: Option<Arc<Workload>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("no original destination recorded for {0} (not an intercepted connection?)")]
    NoRecord(SocketAddr),
    #[error("IPv6 connection {0}: only IPv4 is intercepted")]
    NotIpv4(SocketAddr),
    #[error("reading the original destination: {0}")]
    Os(#[from] std::io::Error),
}

/// The one interface between the interception modes and the proxy.
pub trait Interception: Send + Sync {
    fn mode(&self) -> Mode;
    /// For a connection accepted on :15001 of `scope` (the node's or a pod's): where the
    /// application wanted to go, and which workload sent it.
    fn outbound_origin(&self, conn: &TcpStream, scope: &Scope) -> Result<Origin, OriginError>;
    /// For a connection accepted on :15006: the address its peer dialled.
    fn inbound_dst(&self, conn: &TcpStream) -> Result<SocketAddrV4, OriginError>;
    /// A line about the state interception keeps (map fill levels, rule counts) for the log.
    fn status(&self) -> String;
    /// Entries in each bounded map interception keeps, by map name.
    fn map_entries(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Cumulative event counts kept in the kernel (eBPF programs), by event name.
    fn kernel_events(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Captures one pod's traffic into the listeners meshd made inside it: outbound to its
    /// :15001, inbound to its :15006 (except :15008). Replaces a capture left by an earlier
    /// meshd for the same pod without a moment in which the pod is not captured.
    fn capture_pod(&self, pod: &PodNet<'_>) -> anyhow::Result<Box<dyn PodCapture>>;
}

/// The configured workloads, found by what each mode learns about a connection's sender: the
/// cgroup id of its socket. A process in a child cgroup of a workload's (a container below the
/// pod, a worker pool's own group) belongs to the nearest configured ancestor.
#[derive(Debug, Default)]
pub struct Workloads {
    by_cgroup_id: HashMap<u64, Arc<Workload>>,
    /// Other cgroup ids seen, with the workload above them (or none), found once each.
    below: std::sync::Mutex<HashMap<u64, Option<Arc<Workload>>>>,
}

/// How many cgroup ids outside the configured ones are remembered (then forgotten at once).
const BELOW_CACHED: usize = 4096;
/// How deep below a workload's cgroup its descendants are looked for.
const BELOW_DEPTH: usize = 8;

impl Workloads {
    pub fn new(list: &[Workload]) -> Workloads {
        let by_cgroup_id = list
            .iter()
            .map(|w| (w.cgroup_id, Arc::new(w.clone())))
            .collect();
        Workloads {
            by_cgroup_id,
            below: Default::default(),
        }
    }

    /// The workload whose cgroup is `id` or the nearest configured ancestor of cgroup `id`.
    pub fn by_cgroup_id(&self, id: u64) -> Option<Arc<Workload>> {
        if let Some(w) = self.by_cgroup_id.get(&id) {
            return Some(w.clone());
        }
        let lock = || self.below.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = lock().get(&id) {
            return found.clone();
        }
        // A cgroup's id never moves to another place in the tree: the answer is final.
        let found = (self.by_cgroup_id.values())
            .filter(|w| has_descendant(&w.cgroup_path, id, BELOW_DEPTH))
            .max_by_key(|w| w.cgroup_path.components().count())
            .cloned();
        let mut below = lock();
        if below.len() >= BELOW_CACHED {
            below.clear();
        }
        below.insert(id, found.clone());
        found
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_cgroup_id.values()
    }
}

/// Whether a cgroup directory below `dir` (at most `depth` levels) has id (inode) `id`.
fn has_descendant(dir: &Path, id: u64, depth: usize) -> bool {
    use std::os::unix::fs::DirEntryExt;
    let Some(depth) = depth.checked_sub(1) else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .any(|e| e.ino() == id || has_descendant(&e.path(), id, depth))
}

/// The IPv4 form of an address, or the error saying it is not one.
pub(crate) fn v4(addr: SocketAddr) -> Result<SocketAddrV4, OriginError> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => Ok(SocketAddrV4::new(ip, a.port())),
            None => Err(OriginError::NotIpv4(addr)),
        },
    }
}
