//! Who is at a destination address, and which identity must answer there: the one place the
//! proxy asks "which SPIFFE ID may the server at this address present" and "which workloads
//! stand behind this Service address". One interface, fed by sources:
//! - the static config (`mesh.identities`: addresses with their identities);
//! - the pods this meshd serves itself (and its host workloads, when it advertises an address);
//! - a shared source (`registry.etcd`, [`etcd`]): every node's workloads and the mesh's Services,
//!   watched live; this node's own workloads are published there under a lease.
//!
//! Anything else is unknown: the client then accepts any SVID of the trust domain, and says so
//! in the access log and in `meshd_server_identity`.

pub mod etcd;
pub mod record;

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
};

pub use record::{Endpoint, ServiceRecord, ServiceTarget, WorkloadRecord};

use crate::identity::SpiffeId;

/// What a shared source knows, by its keys (etcd keys; Kubernetes object names).
#[derive(Debug, Default)]
struct Remote {
    workloads: HashMap<String, (WorkloadRecord, i64)>,
    services: HashMap<String, ServiceRecord>,
    /// Trust bundle roots (PEM) by key.
    roots: BTreeMap<String, String>,
}

/// The lookups built from [`Remote`] after each change (changes are rare, lookups are per
/// connection).
#[derive(Debug, Default)]
struct Index {
    /// Workloads at an address, newest registration first.
    workloads: HashMap<Ipv4Addr, Vec<Arc<WorkloadRecord>>>,
    services: HashMap<SocketAddrV4, Arc<ServiceTarget>>,
    /// The addresses of `services`, for the per-connection "is this in the mesh" question.
    service_ips: std::collections::HashSet<Ipv4Addr>,
}

#[derive(Debug)]
pub struct Registry {
    configured: HashMap<Ipv4Addr, SpiffeId>,
    /// This node's own workloads (pods it serves, advertised host workloads), by address.
    local: RwLock<BTreeMap<Ipv4Addr, WorkloadRecord>>,
    /// Bumped whenever `local` changes: the shared source republishes.
    local_changed: tokio::sync::watch::Sender<u64>,
    remote: RwLock<Remote>,
    index: RwLock<Arc<Index>>,
    /// Round robin over a Service's endpoints.
    next: AtomicUsize,
    /// What is wrong with the shared source now (readiness detail), with when it began.
    trouble: RwLock<Option<(String, std::time::SystemTime)>>,
    /// Bumped whenever the shared trust bundle roots change.
    roots_changed: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    pub fn new(configured: HashMap<Ipv4Addr, SpiffeId>) -> Registry {
        Registry {
            configured,
            local: RwLock::default(),
            local_changed: tokio::sync::watch::channel(0).0,
            remote: RwLock::default(),
            index: RwLock::default(),
            next: AtomicUsize::new(0),
            trouble: RwLock::default(),
            roots_changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// The identity that must answer at `dst`, when meshd knows it: this node's own pods first,
    /// then the shared source (the newest registration at the address that serves the port),
    /// then the static config.
    pub fn expected(&self, dst: SocketAddrV4) -> Option<SpiffeId> {
        let ip = *dst.ip();
        if let Some(local) = read(&self.local).get(&ip).filter(|r| r.serves(dst.port())) {
            return Some(local.spiffe_id.clone());
        }
        let index = self.index();
        let shared = index.workloads.get(&ip).into_iter().flatten();
        if let Some(found) = shared.into_iter().find(|r| r.serves(dst.port())) {
            return Some(found.spiffe_id.clone());
        }
        self.configured.get(&ip).cloned()
    }

    /// The Service at `dst`, when `dst` is a Service address and port.
    pub fn service(&self, dst: SocketAddrV4) -> Option<Arc<ServiceTarget>> {
        self.index().services.get(&dst).cloned()
    }

    /// Whether meshd knows a workload or a Service at `ip` (such destinations are in the mesh
    /// whatever `mesh.networks` says).
    pub fn knows(&self, ip: Ipv4Addr) -> bool {
        let index = self.index();
        index.workloads.contains_key(&ip) || index.service_ips.contains(&ip)
    }

    /// The endpoints of `service` in the order to try them: round robin over calls.
    pub fn endpoints_in_turn(&self, service: &ServiceTarget) -> Vec<Endpoint> {
        let n = service.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| service.endpoints[(start + i) % n].clone())
            .collect()
    }

    /// A pod this meshd serves (or a host workload it advertises).
    pub fn add_local(&self, record: WorkloadRecord) {
        write(&self.local).insert(record.address, record);
        self.local_changed.send_modify(|v| *v += 1);
    }

    /// Removes a local workload; returns its identity when no other local workload holds it.
    pub fn remove_local(&self, ip: Ipv4Addr) -> Option<SpiffeId> {
        let mut local = write(&self.local);
        let gone = local.remove(&ip)?;
        self.local_changed.send_modify(|v| *v += 1);
        let held = local
            .values()
            .any(|other| other.spiffe_id == gone.spiffe_id);
        (!held).then_some(gone.spiffe_id)
    }

    pub fn local_records(&self) -> Vec<WorkloadRecord> {
        read(&self.local).values().cloned().collect()
    }

    pub fn watch_local(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local_changed.subscribe()
    }

    /// Replaces everything the shared source said (a full listing).
    pub fn replace_shared(&self, changes: Vec<Change>) {
        let roots = std::mem::take(&mut write(&self.remote).roots);
        *write(&self.remote) = Remote::default();
        self.apply_shared(changes);
        if read(&self.remote).roots != roots {
            self.roots_changed.send_modify(|v| *v += 1);
        }
    }

    /// Applies a batch of changes from the shared source.
    pub fn apply_shared(&self, changes: Vec<Change>) {
        let mut remote = write(&self.remote);
        let roots_before = remote.roots.len();
        let mut roots_touched = false;
        for change in changes {
            match change {
                Change::Workload(key, Some((record, rev))) => {
                    remote.workloads.insert(key, (record, rev));
                }
                Change::Workload(key, None) => {
                    remote.workloads.remove(&key);
                }
                Change::Service(key, Some(record)) => {
                    remote.services.insert(key, record);
                }
                Change::Service(key, None) => {
                    remote.services.remove(&key);
                }
                Change::Root(key, pem) => {
                    roots_touched = true;
                    match pem {
                        Some(pem) => remote.roots.insert(key, pem),
                        None => remote.roots.remove(&key),
                    };
                }
            }
        }
        self.reindex(&remote);
        if roots_touched || remote.roots.len() != roots_before {
            self.roots_changed.send_modify(|v| *v += 1);
        }
    }

    /// The trust bundle roots the shared source holds (key, PEM).
    pub fn roots(&self) -> Vec<(String, String)> {
        let remote = read(&self.remote);
        remote
            .roots
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn watch_roots(&self) -> tokio::sync::watch::Receiver<u64> {
        self.roots_changed.subscribe()
    }

    /// How many workloads and Services the shared source holds now.
    pub fn shared_counts(&self) -> (usize, usize) {
        let remote = read(&self.remote);
        (remote.workloads.len(), remote.services.len())
    }

    /// The shared source's state: `None` when it is connected and up to date.
    pub fn set_trouble(&self, trouble: Option<String>) {
        let mut current = write(&self.trouble);
        match trouble {
            None => *current = None,
            Some(why) => {
                let since = current
                    .as_ref()
                    .map_or_else(std::time::SystemTime::now, |c| c.1);
                *current = Some((why, since));
            }
        }
    }

    /// What is wrong with the shared source, and for how long (readiness detail).
    pub fn trouble(&self) -> Option<String> {
        let current = read(&self.trouble);
        let (why, since) = current.as_ref()?;
        let secs = since.elapsed().unwrap_or_default().as_secs();
        Some(format!("{why} (for {secs}s)"))
    }

    /// The registry as `/config_dump` shows it: local and shared workloads, Services with
    /// their endpoints now, and the shared source's trouble.
    pub fn dump(&self) -> serde_json::Value {
        let index = self.index();
        let shared: Vec<&WorkloadRecord> =
            (index.workloads.values().flatten()).map(|r| &**r).collect();
        let services: Vec<serde_json::Value> = (index.services.iter())
            .map(|(addr, s)| {
                let endpoints: Vec<String> =
                    s.endpoints.iter().map(|e| e.addr.to_string()).collect();
                serde_json::json!({"service": format!("{}/{}", s.namespace, s.name),
                    "address": addr.to_string(), "endpoints": endpoints})
            })
            .collect();
        serde_json::json!({
            "local": self.local_records(),
            "shared": shared,
            "services": services,
            "trouble": self.trouble(),
        })
    }

    fn reindex(&self, remote: &Remote) {
        let mut by_rev: Vec<&(WorkloadRecord, i64)> = remote.workloads.values().collect();
        by_rev.sort_by_key(|(_, rev)| std::cmp::Reverse(*rev));
        let mut workloads: HashMap<Ipv4Addr, Vec<Arc<WorkloadRecord>>> = HashMap::new();
        for (record, _) in by_rev {
            let entry = workloads.entry(record.address).or_default();
            entry.push(Arc::new(record.clone()));
        }
        let mut services = HashMap::new();
        for service in remote.services.values() {
            for port in &service.ports {
                let target =
                    record::resolve(service, port, remote.workloads.values().map(|(r, _)| r));
                services.insert(
                    SocketAddrV4::new(service.address, port.port),
                    Arc::new(target),
                );
            }
        }
        let service_ips = services.keys().map(|s: &SocketAddrV4| *s.ip()).collect();
        *write(&self.index) = Arc::new(Index {
            workloads,
            services,
            service_ips,
        });
    }

    fn index(&self) -> Arc<Index> {
        read(&self.index).clone()
    }
}

/// One change a shared source reports: the record under a key, or its removal.
#[derive(Debug)]
pub enum Change {
    Workload(String, Option<(WorkloadRecord, i64)>),
    Service(String, Option<ServiceRecord>),
    /// A trust bundle root (PEM).
    Root(String, Option<String>),
}

/// Applies the registry's trust bundle roots to the bundle every handshake verifies with: while
/// the registry holds any, they are the roots; otherwise the configured files. Runs for ever.
pub async fn follow_roots(
    registry: &Registry,
    bundle: Option<Arc<crate::tls::verify::TrustBundle>>,
) {
    let Some(bundle) = bundle else {
        return std::future::pending().await;
    };
    let mut changed = registry.watch_roots();
    loop {
        changed.borrow_and_update();
        let roots = registry.roots();
        let keys: Vec<&str> = roots.iter().map(|r| r.0.as_str()).collect();
        match bundle.set_registry_roots(&roots) {
            Ok(0) => tracing::info!("trust bundle: the registry holds no roots; the files apply"),
            Ok(n) => tracing::info!(roots = n, ?keys, "trust bundle from the registry"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"),
                "the registry's trust bundle is not usable; keeping the current one"),
        }
        if changed.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
