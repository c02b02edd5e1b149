//! `--mode=ebpf`: load meshd's eBPF object, fill its settings maps, attach connect4,
//! getpeername4 and sockops to every workload cgroup and sk_lookup to this network namespace.
//! Every link is pinned under the pin directory: if meshd dies, steered connections keep
//! arriving at its (closed) port and fail instead of leaving the node in plaintext, until
//! `meshd cleanup` or the next start removes them.
//!
//! Workloads with `sk_msg_bypass` (per workload, default `proxy.sk_msg_bypass`, off) get the
//! sockops variant that also puts both ends of each local hop (app <-> :15001, 127.0.0.6 <->
//! workload) into a sockhash whose sk_msg program moves bytes socket to socket. meshd's own ends
//! are seen by that variant attached to meshd's own cgroup, with a link that is not pinned: it
//! goes when meshd exits.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, SockMap},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps,
    },
    Ebpf,
};
use mesh_common::{counters, names, ports, MeshConfig, OrigDst, PodNetns, SockKey, SockTuple};
use tokio::net::TcpStream;

use super::{v4, Interception, Mode, Origin, OriginError, PodCapture, PodNet, Workloads};
use crate::{config::Validated, proxy::Scope};

/// Pins for pods live here, apart from the node's: they outlive a meshd that stops, so pods
/// fail closed until the next meshd takes their links over.
const PODS_PIN_DIR: &str = "pods";
/// The maps shared with the next meshd ([`super::load_object_sharing_maps`]).
const MAPS_PIN_DIR: &str = "maps";

pub struct EbpfInterception {
    /// Keeps the programs and maps loaded for as long as meshd runs (and holds the pods'
    /// sk_lookup program, attached per pod).
    bpf: Mutex<Ebpf>,
    by_tuple: HashMap<MapData, SockKey, OrigDst>,
    /// The same map, for BPF_MAP_LOOKUP_AND_DELETE_ELEM (aya does not offer it on hash maps).
    by_tuple_fd: OwnedFd,
    by_cookie: HashMap<MapData, u64, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    workloads: Workloads,
    bypass: Bypass,
    /// Cookie of meshd's own network namespace (host workloads' record keys).
    home_netns: u64,
    pods: Option<PodMaps>,
}

/// What pod capture needs after start-up: the per-pod maps and the sk_lookup program.
type PodNetnsMap = std::sync::Arc<Mutex<HashMap<MapData, u64, PodNetns>>>;

struct PodMaps {
    netns: PodNetnsMap,
    listeners: Mutex<SockHash<MapData, u32>>,
    pin_dir: PathBuf,
}

/// The eBPF programs' counters, by the event name metrics and logs use.
const KERNEL_EVENTS: [(&str, u32); 8] = [
    ("steered", counters::STEERED),
    ("excluded", counters::EXCLUDED),
    ("record_failed", counters::RECORD_FAILED),
    ("inbound_captured", counters::INBOUND_CAPTURED),
    ("bypass_sockets", counters::BYPASS_SOCKETS),
    ("bypass_kept_on_tcp", counters::BYPASS_FALLBACK),
    ("inbound_refused_meshd_down", counters::INBOUND_REFUSED),
    ("inbound_ipv6_refused", counters::INBOUND_V6_REFUSED),
];

/// Whether the sk_msg loopback bypass runs, and what it holds.
enum Bypass {
    Off(String),
    /// sockops on meshd's own cgroup (`None` when that is a workload cgroup, already covered).
    On {
        /// Held, never read: dropping it detaches the program.
        _own_link: Option<FdLink>,
    },
}

/// Loads, configures and attaches everything; `inbound_listener` is the :15006 socket that
/// sk_lookup hands captured connections to. Links and maps an earlier meshd pinned are taken
/// over. A failure half-way removes only what this start pinned: a meshd that still runs (this
/// one was to succeed it) or the capture a dead one left stays in place.
pub fn install(cfg: &Validated, inbound_listener: &impl AsRawFd) -> Result<EbpfInterception> {
    crate::sys::ensure_bpffs()?;
    let before = crate::cleanup::pins(&cfg.proxy.pin_dir)?;
    attach_all(cfg, inbound_listener).inspect_err(|_| {
        let _ = crate::cleanup::remove_pins_added(&cfg.proxy.pin_dir, &before);
    })
}

fn attach_all(cfg: &Validated, inbound_listener: &impl AsRawFd) -> Result<EbpfInterception> {
    let pin_dir = cfg.proxy.pin_dir.clone();
    std::fs::create_dir_all(&pin_dir).with_context(|| format!("create {}", pin_dir.display()))?;
    let mut bpf = super::load_object_sharing_maps(&pin_dir.join(MAPS_PIN_DIR))
        .context("load meshd's eBPF object")?;
    for prog in [names::PROG_SOCKOPS, names::PROG_SOCKOPS_BYPASS] {
        program::<SockOps>(&mut bpf, prog)?
            .load()
            .with_context(|| format!("load {prog}"))?;
    }
    let wanted = cfg.workloads.iter().any(|w| w.sk_msg_bypass);
    let bypass = if wanted {
        enable_bypass(&mut bpf, cfg).unwrap_or_else(|e| Bypass::Off(format!("{e:#}")))
    } else {
        Bypass::Off("no workload has sk_msg_bypass".into())
    };
    if let Bypass::Off(why) = &bypass {
        if wanted {
            tracing::warn!(reason = %why, "sk_msg loopback bypass off");
        }
    }
    let bypass_on = matches!(bypass, Bypass::On { .. });
    fill_settings(&mut bpf, cfg, inbound_listener, bypass_on)?;
    let mut links = NodeLinks {
        pin_dir: pin_dir.clone(),
        wanted: Vec::new(),
    };
    attach_workloads(&mut bpf, cfg, bypass_on, &mut links)?;
    let lookup: &mut SkLookup = program(&mut bpf, names::PROG_SK_LOOKUP)?;
    lookup.load().context("load sk_lookup")?;
    let fd = lookup.fd()?.as_fd().try_clone_to_owned()?;
    links.link("netns_sk_lookup".into(), fd.as_fd(), || {
        let netns = File::open("/proc/self/ns/net").context("open this network namespace")?;
        let id = lookup
            .attach(netns)
            .context("attach sk_lookup to this network namespace")?;
        Ok(FdLink::from(lookup.take_link(id)?))
    })?;
    links.finish()?;

    let by_tuple_map = take_map(&mut bpf, names::MAP_ORIG_DST_BY_TUPLE)?;
    let by_tuple_fd = match &by_tuple_map {
        aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data) => {
            data.fd().as_fd().try_clone_to_owned()?
        }
        other => anyhow::bail!("{} is a {other:?}", names::MAP_ORIG_DST_BY_TUPLE),
    };
    let by_tuple = HashMap::try_from(by_tuple_map)?;
    let by_cookie = HashMap::try_from(take_map(&mut bpf, names::MAP_ORIG_DST_BY_COOKIE)?)?;
    let counters = PerCpuArray::try_from(take_map(&mut bpf, names::MAP_COUNTERS)?)?;
    let pods = match cfg.pods.as_ref().and_then(|p| p.cgroup_parent.as_deref()) {
        Some(parent) => Some(attach_pods_parent(&mut bpf, parent, &pin_dir)?),
        None => None,
    };
    Ok(EbpfInterception {
        home_netns: crate::inpod::netns::home_cookie()?,
        pods,
        bpf: Mutex::new(bpf),
        by_tuple,
        by_tuple_fd,
        by_cookie,
        counters,
        workloads: Workloads::new(&cfg.workloads),
        bypass,
    })
}

/// The node's links, each pinned under its name in the pin directory. A link an earlier meshd
/// pinned under the same name gets this run's program swapped in (no moment without capture);
/// pins nobody wants any more go at the end.
struct NodeLinks {
    pin_dir: PathBuf,
    wanted: Vec<String>,
}

impl NodeLinks {
    fn link(
        &mut self,
        name: String,
        program: std::os::fd::BorrowedFd<'_>,
        attach: impl FnOnce() -> Result<FdLink>,
    ) -> Result<()> {
        take_over_or_attach(&self.pin_dir.join(&name), program, attach)?;
        self.wanted.push(name);
        Ok(())
    }

    /// Removes the pins of an earlier meshd that this configuration does not want (a workload
    /// that left the config). The pods' directory is not the node's.
    fn finish(self) -> Result<()> {
        for entry in std::fs::read_dir(&self.pin_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_file() && !self.wanted.contains(&name) {
                std::fs::remove_file(entry.path())?;
                tracing::info!(pin = %name, "removed a link this configuration no longer wants");
            }
        }
        Ok(())
    }
}

/// connect/getpeername/sockops on every workload cgroup.
fn attach_workloads(
    bpf: &mut Ebpf,
    cfg: &Validated,
    bypass_on: bool,
    links: &mut NodeLinks,
) -> Result<()> {
    let sock_addr_programs = [
        names::PROG_CONNECT4,
        names::PROG_CONNECT6,
        names::PROG_GETPEERNAME4,
        names::PROG_GETPEERNAME6,
    ];
    for prog in sock_addr_programs {
        let p: &mut CgroupSockAddr = program(bpf, prog)?;
        p.load().with_context(|| format!("load {prog}"))?;
        let fd = p.fd()?.as_fd().try_clone_to_owned()?;
        for w in &cfg.workloads {
            links.link(format!("{}_{prog}", w.name), fd.as_fd(), || {
                p.attach_link(cgroup_fd(&w.cgroup_path)?)
            })?;
        }
    }
    for w in &cfg.workloads {
        let prog = if bypass_on && w.sk_msg_bypass {
            names::PROG_SOCKOPS_BYPASS
        } else {
            names::PROG_SOCKOPS
        };
        let sockops: &mut SockOps = program(bpf, prog)?;
        let fd = sockops.fd()?.as_fd().try_clone_to_owned()?;
        links.link(format!("{}_sockops", w.name), fd.as_fd(), || {
            sockops.attach_link(cgroup_fd(&w.cgroup_path)?)
        })?;
    }
    Ok(())
}

/// Attaches (or takes over from an earlier meshd) the connect, getpeername and sockops programs
/// on the runtime's pod cgroup parent. They act only on sockets in a meshed pod's namespace.
fn attach_pods_parent(bpf: &mut Ebpf, parent: &Path, pin_dir: &Path) -> Result<PodMaps> {
    let pods_dir = pin_dir.join(PODS_PIN_DIR);
    std::fs::create_dir_all(&pods_dir)?;
    for prog in [names::PROG_CONNECT4_PODS, names::PROG_CONNECT6_PODS] {
        program::<CgroupSockAddr>(bpf, prog)?
            .load()
            .with_context(|| format!("load {prog}"))?;
    }
    let sock_addr = [
        names::PROG_CONNECT4_PODS,
        names::PROG_CONNECT6_PODS,
        names::PROG_GETPEERNAME4,
        names::PROG_GETPEERNAME6,
    ];
    for prog in sock_addr {
        let p: &mut CgroupSockAddr = program(bpf, prog)?;
        let fd = p.fd()?.as_fd().try_clone_to_owned()?;
        take_over_or_attach(&pods_dir.join(format!("parent_{prog}")), fd.as_fd(), || {
            p.attach_link(cgroup_fd(parent)?)
        })?;
    }
    let sockops: &mut SockOps = program(bpf, names::PROG_SOCKOPS)?;
    let fd = sockops.fd()?.as_fd().try_clone_to_owned()?;
    take_over_or_attach(&pods_dir.join("parent_sockops"), fd.as_fd(), || {
        sockops.attach_link(cgroup_fd(parent)?)
    })?;
    program::<SkLookup>(bpf, names::PROG_SK_LOOKUP_PODS)?
        .load()
        .context("load the pods' sk_lookup")?;
    let netns = HashMap::try_from(take_map(bpf, names::MAP_POD_NETNS)?)?;
    let listeners = SockHash::try_from(take_map(bpf, names::MAP_POD_LISTENERS)?)?;
    tracing::info!(parent = %parent.display(), "pod programs attached to the runtime's cgroup parent");
    Ok(PodMaps {
        netns: std::sync::Arc::new(Mutex::new(netns)),
        listeners: Mutex::new(listeners),
        pin_dir: pods_dir,
    })
}

/// A link pinned at `pin` by an earlier meshd gets `program` swapped in atomically
/// (BPF_LINK_UPDATE: the hook is never without a program); otherwise `attach` and pin.
fn take_over_or_attach(
    pin: &Path,
    program: std::os::fd::BorrowedFd<'_>,
    attach: impl FnOnce() -> Result<FdLink>,
) -> Result<()> {
    if pin.exists() {
        let link =
            crate::sys::bpf_obj_get(pin).with_context(|| format!("open {}", pin.display()))?;
        crate::sys::bpf_link_update(link.as_fd(), program)
            .with_context(|| format!("take over {}", pin.display()))?;
        tracing::info!(pin = %pin.display(), "took over a link pinned by an earlier meshd");
        return Ok(());
    }
    let link = attach()?;
    link.pin(pin)
        .with_context(|| format!("pin {}", pin.display()))?;
    Ok(())
}

/// Attaches sk_msg to the bypass sockhash and sockops to meshd's own cgroup, so that meshd's
/// ends of local hops enter the sockhash the moment they are established (before the first
/// byte: a socket added later could see redirected bytes overtake ones already queued).
fn enable_bypass(bpf: &mut Ebpf, cfg: &Validated) -> Result<Bypass> {
    let Some(own) = crate::sys::own_cgroup()? else {
        return Ok(Bypass::Off(
            "meshd runs in the root cgroup, where nothing may be attached on its behalf".into(),
        ));
    };
    let hash: SockHash<_, SockTuple> = SockHash::try_from(map(bpf, names::MAP_BYPASS_SOCKETS)?)?;
    let hash_fd = hash.fd().try_clone()?;
    let msg: &mut SkMsg = program(bpf, names::PROG_SK_MSG)?;
    msg.load().context("load sk_msg")?;
    msg.attach(&hash_fd)
        .context("attach sk_msg to the bypass sockhash")?;
    let same = |p: &Path| std::fs::canonicalize(p).ok();
    if let Some(w) = cfg
        .workloads
        .iter()
        .find(|w| same(&w.cgroup_path) == same(&own))
    {
        // That workload's sockops is already attached to meshd's cgroup.
        return Ok(if w.sk_msg_bypass {
            Bypass::On { _own_link: None }
        } else {
            Bypass::Off(format!("meshd runs in workload {}'s cgroup", w.name))
        });
    }
    let sockops: &mut SockOps = program(bpf, names::PROG_SOCKOPS_BYPASS)?;
    let link = sockops
        .attach_link(cgroup_fd(&own)?)
        .with_context(|| format!("attach sockops to meshd's cgroup {}", own.display()))?;
    Ok(Bypass::On {
        _own_link: Some(link),
    })
}

/// Attaching to a workload cgroup as a bpf link the caller owns (and pins).
trait CgroupLink {
    fn attach_link(&mut self, cgroup: File) -> Result<FdLink>;
}

impl CgroupLink for CgroupSockAddr {
    fn attach_link(&mut self, cgroup: File) -> Result<FdLink> {
        let id = self.attach(cgroup, CgroupAttachMode::Single)?;
        Ok(FdLink::try_from(self.take_link(id)?)?)
    }
}

impl CgroupLink for SockOps {
    fn attach_link(&mut self, cgroup: File) -> Result<FdLink> {
        let id = self.attach(cgroup, CgroupAttachMode::Single)?;
        Ok(FdLink::try_from(self.take_link(id)?)?)
    }
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = bpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    Ok(p.try_into()?)
}

fn take_map(bpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    bpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn cgroup_fd(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("open cgroup {}", path.display()))
}

fn fill_settings(
    bpf: &mut Ebpf,
    cfg: &Validated,
    inbound: &impl AsRawFd,
    bypass: bool,
) -> Result<()> {
    // The maps may hold an earlier meshd's settings: add this configuration's first, then drop
    // what it no longer lists, so that no port is left uncaptured in between.
    let mut excluded: HashMap<_, u16, u8> =
        HashMap::try_from(map(bpf, names::MAP_EXCLUDED_PORTS)?)?;
    sync_set(&mut excluded, cfg.excluded_ports.iter().copied())?;
    let mut cidrs: LpmTrie<_, u32, u8> = LpmTrie::try_from(map(bpf, names::MAP_EXCLUDED_CIDRS)?)?;
    let wanted: Vec<Key<u32>> = (cfg.excluded_cidrs.iter())
        .map(|c| Key::new(u32::from(c.prefix), ip_key(c.addr)))
        .collect();
    for key in &wanted {
        cidrs.insert(key, 1, 0)?;
    }
    let same =
        |a: &Key<u32>, b: &Key<u32>| (a.prefix_len(), a.data()) == (b.prefix_len(), b.data());
    let stale: Vec<Key<u32>> = (cidrs.keys().filter_map(Result::ok))
        .filter(|k| !wanted.iter().any(|w| same(w, k)))
        .collect();
    for key in stale {
        cidrs.remove(&key)?;
    }
    let mut inbound_ports: HashMap<_, u16, u8> =
        HashMap::try_from(map(bpf, names::MAP_INBOUND_PORTS)?)?;
    sync_set(&mut inbound_ports, cfg.inbound_ports())?;
    let mut listener = SockMap::try_from(map(bpf, names::MAP_INBOUND_LISTENER)?)?;
    listener
        .set(0, inbound, 0)
        .context("put the :15006 listener in the sockmap")?;
    let mut config: Array<_, MeshConfig> = Array::try_from(map(bpf, names::MAP_CONFIG)?)?;
    let settings = MeshConfig {
        outbound_port: ports::OUTBOUND,
        _pad: 0,
        proxy_mark: cfg.proxy.mark,
        proxy_uid: cfg.proxy.uid.unwrap_or(u32::MAX),
        enabled: 1,
        bypass: u32::from(bypass),
    };
    config.set(0, settings, 0)?;
    Ok(())
}

/// Makes the keys of a set-like map exactly `wanted`: additions first, removals after.
fn sync_set(
    set: &mut HashMap<&mut MapData, u16, u8>,
    wanted: impl IntoIterator<Item = u16>,
) -> Result<()> {
    let wanted: Vec<u16> = wanted.into_iter().collect();
    for port in &wanted {
        set.insert(port, 1, 0)?;
    }
    let stale: Vec<u16> = (set.keys().filter_map(Result::ok))
        .filter(|p| !wanted.contains(p))
        .collect();
    for port in stale {
        set.remove(&port)?;
    }
    Ok(())
}

fn map<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    bpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// An address as the kernel stores it in `user_ip4` (network byte order in memory).
fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl Interception for EbpfInterception {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    fn outbound_origin(&self, conn: &TcpStream, scope: &Scope) -> Result<Origin, OriginError> {
        let peer = conn.peer_addr()?;
        let app = v4(peer)?;
        let key = SockKey {
            ip: ip_key(*app.ip()),
            port: app.port(),
            _pad: 0,
            netns: scope
                .pod
                .as_ref()
                .map_or(self.home_netns, |p| p.netns.cookie),
        };
        // Read once: the entry goes now rather than waiting for LRU eviction.
        let record: OrigDst = crate::sys::bpf_map_take(self.by_tuple_fd.as_fd(), &key)
            .map_err(|_| OriginError::NoRecord(peer))?;
        let ip = Ipv4Addr::from(record.ip.to_ne_bytes());
        let workload = match &scope.pod {
            Some(pod) => Some(pod.workload.clone()),
            None => self.workloads.by_cgroup_id(record.cgroup_id),
        };
        Ok(Origin {
            dst: SocketAddrV4::new(ip, record.port),
            workload,
        })
    }

    fn capture_pod(&self, pod: &PodNet<'_>) -> Result<Box<dyn PodCapture>> {
        let maps = self.pods.as_ref().ok_or_else(|| {
            anyhow!("ebpf mode serves pods only with pods.cgroup_parent set (where the runtime puts them)")
        })?;
        let ip = ip_key(pod.ip);
        maps.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip, pod.inbound_listener.as_raw_fd(), 0)
            .context("put the pod's :15006 in POD_LISTENERS")?;
        let pin = maps.pin_dir.join(format!("{}_sk_lookup", pod.id));
        {
            let mut bpf = self.bpf.lock().unwrap_or_else(|p| p.into_inner());
            let lookup: &mut SkLookup = program(&mut bpf, names::PROG_SK_LOOKUP_PODS)?;
            let fd = lookup.fd()?.as_fd().try_clone_to_owned()?;
            take_over_or_attach(&pin, fd.as_fd(), || {
                let id = lookup.attach(pod.netns.file().try_clone()?)?;
                Ok(FdLink::from(lookup.take_link(id)?))
            })?;
        }
        // Last: from here on the pod's sockets are steered (its listeners already exist).
        let entry = PodNetns { ip, _pad: 0 };
        maps.netns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod.netns.cookie, entry, 0)?;
        Ok(Box::new(PodEbpf {
            netns: maps.netns.clone(),
            cookie: pod.netns.cookie,
            pin,
        }))
    }

    fn inbound_dst(&self, conn: &TcpStream) -> Result<SocketAddrV4, OriginError> {
        // sk_lookup hands over the connection unchanged: its local address is what was dialled.
        v4(conn.local_addr()?)
    }

    fn map_entries(&self) -> Vec<(&'static str, u64)> {
        let tuple = self.by_tuple.keys().count();
        let cookie = self.by_cookie.keys().count();
        let mut fill = vec![
            (names::MAP_ORIG_DST_BY_COOKIE, cookie as u64),
            (names::MAP_ORIG_DST_BY_TUPLE, tuple as u64),
        ];
        if let Some(pods) = &self.pods {
            let netns = pods.netns.lock().unwrap_or_else(|p| p.into_inner());
            fill.push((names::MAP_POD_NETNS, netns.keys().count() as u64));
        }
        fill
    }

    fn kernel_events(&self) -> Vec<(&'static str, u64)> {
        let sum = |i: u32| {
            self.counters
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        KERNEL_EVENTS
            .iter()
            .map(|&(name, index)| (name, sum(index)))
            .collect()
    }

    fn status(&self) -> String {
        let fill = self.map_entries();
        let (cookie, tuple) = (fill[0].1, fill[1].1);
        let events = self
            .kernel_events()
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let bypass = match &self.bypass {
            Bypass::On { .. } => "on".to_string(),
            Bypass::Off(why) => format!("off ({why})"),
        };
        format!(
            "orig-dst maps: {cookie}/{cap} by cookie, {tuple}/{cap} by tuple; sk_msg bypass \
             {bypass}; events: {events}",
            cap = mesh_common::ORIG_DST_MAP_ENTRIES,
        )
    }
}

/// One pod's eBPF capture: its netns entry (which gates the parent's connect programs) and its
/// pinned sk_lookup link.
struct PodEbpf {
    netns: PodNetnsMap,
    cookie: u64,
    pin: PathBuf,
}

impl PodCapture for PodEbpf {
    fn remove(&self) -> Result<()> {
        // The gate first: the pod's new connections stop being steered before anything else goes.
        let _ = (self.netns.lock().unwrap_or_else(|p| p.into_inner())).remove(&self.cookie);
        if self.pin.exists() {
            let link = PinnedLink::from_pin(&self.pin)?;
            drop(link.unpin()?);
        }
        Ok(())
    }
}
