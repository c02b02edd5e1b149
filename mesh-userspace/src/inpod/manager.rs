//! Each pod's life in meshd: ADD makes its listeners inside its network namespace, has the
//! interception capture it and serves it; DEL removes all of it; the pods served are recorded in
//! `pods.state_dir` so that a restarted meshd re-adopts the ones that still exist (their capture
//! stayed in place meanwhile, so their connections failed rather than leaving in plaintext).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use mesh_common::ports;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    metadata::{MetadataSource, PodMeta},
    netns::Netns,
    protocol::{PodInfo, DATAPLANE_MODE_LABEL},
};
use crate::{
    config::{PodSettings, Workload},
    identity::{IdentityManager, SpiffeId},
    intercept::{PodCapture, PodNet},
    proxy::{self, inbound, outbound, Context, PodScope, Scope},
    registry::WorkloadRecord,
    tls::{self, verify::TrustBundle},
    tunnel::{
        self,
        pool::{ClientIdentity, Pool},
    },
};

/// What pods need from meshd's identity: minting per pod, the bundle, the trust domain.
pub struct PodIdentity {
    pub manager: Arc<IdentityManager>,
    pub bundle: Arc<TrustBundle>,
    pub trust_domain: String,
}

/// A pod's HBONE client identity and its pool.
type PodTunnels = (Arc<ClientIdentity>, Pool);

/// One pod meshd serves.
struct Served {
    info: PodInfo,
    tasks: Vec<JoinHandle<()>>,
    capture: Arc<dyn PodCapture>,
}

impl Drop for Served {
    fn drop(&mut self) {
        // The listeners go with their tasks: nothing of the pod keeps being served.
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct PodManager {
    ctx: Arc<Context>,
    identity: Option<Arc<PodIdentity>>,
    source: Arc<MetadataSource>,
    settings: PodSettings,
    pods: tokio::sync::Mutex<HashMap<String, Served>>,
}

impl PodManager {
    pub fn new(ctx: Arc<Context>, identity: Option<PodIdentity>, settings: PodSettings) -> Self {
        let source = match &settings.podman {
            Some(argv) => MetadataSource::Podman(argv.clone()),
            None => MetadataSource::CniArgs,
        };
        PodManager {
            ctx,
            identity: identity.map(Arc::new),
            source: Arc::new(source),
            settings,
            pods: Default::default(),
        }
    }

    /// The pods served now, as the runtime described them.
    pub async fn served(&self) -> Vec<PodInfo> {
        let pods = self.pods.lock().await;
        let mut list: Vec<PodInfo> = pods.values().map(|p| p.info.clone()).collect();
        list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        list
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.ctx.metrics
    }

    fn state_file(&self) -> PathBuf {
        self.settings.state_dir.join("pods.json")
    }

    /// Whether a pod belongs in the mesh (not by its namespace or its dataplane-mode label).
    pub fn in_mesh(&self, info: &PodInfo) -> bool {
        let excluded = self.settings.excluded_namespaces.contains(&info.namespace);
        let opted_out = info
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .is_some_and(|v| v == "none");
        !excluded && !opted_out
    }

    /// ADD: serves the pod; returns whether it is meshed. Repeating an ADD is harmless.
    pub async fn add(&self, info: PodInfo) -> Result<bool> {
        if !self.in_mesh(&info) {
            tracing::info!(pod = %info.name, namespace = %info.namespace, "pod outside the mesh: left untouched");
            return Ok(false);
        }
        let mut pods = self.pods.lock().await;
        if pods.get(&info.container_id).is_some_and(|s| s.info == info) {
            return Ok(true);
        }
        if let Some(old) = pods.remove(&info.container_id) {
            old.capture.remove()?;
        }
        let served = self.serve(info.clone()).await?;
        pods.insert(info.container_id.clone(), served);
        self.ctx.metrics.pods.set(pods.len() as i64);
        self.persist(&pods)?;
        tracing::info!(pod = %info.name, namespace = %info.namespace, ip = %info.ip,
            netns = %info.netns.display(), "pod captured and served from inside its namespace");
        Ok(true)
    }

    /// DEL: removes the pod's capture, listeners and identity entry. Unknown pods are fine.
    pub async fn del(&self, container_id: &str) -> Result<()> {
        let mut pods = self.pods.lock().await;
        let Some(served) = pods.remove(container_id) else {
            return Ok(());
        };
        served.capture.remove()?;
        let unheld = self.ctx.registry.remove_local(served.info.ip);
        if let (Some(id), Some(identity)) = (unheld, &self.identity) {
            identity.manager.release(&id);
        }
        tracing::info!(pod = %served.info.name, "pod removed");
        drop(served);
        self.ctx.metrics.pods.set(pods.len() as i64);
        self.persist(&pods)
    }

    /// CHECK: the pod is served and its namespace still the one it was added with.
    pub async fn check(&self, container_id: &str) -> Result<()> {
        let pods = self.pods.lock().await;
        let served = pods
            .get(container_id)
            .with_context(|| format!("meshd does not serve pod {container_id}"))?;
        anyhow::ensure!(
            served.tasks.iter().all(|t| !t.is_finished()),
            "pod {container_id}: a listener stopped"
        );
        Ok(())
    }

    /// After a restart: serves again every recorded pod whose namespace still exists.
    pub async fn readopt(&self) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(self.state_file()) else {
            return Ok(());
        };
        let recorded: Vec<PodInfo> = serde_json::from_str(&text)
            .with_context(|| format!("read {}", self.state_file().display()))?;
        for info in recorded {
            let name = info.name.clone();
            if !info.netns.exists() {
                tracing::info!(pod = %name, "recorded pod is gone; not re-adopted");
                continue;
            }
            match self.add(info).await {
                Ok(_) => self.ctx.metrics.pod_event("readopt", "ok"),
                Err(e) => {
                    self.ctx.metrics.pod_event("readopt", "failed");
                    tracing::warn!(pod = %name, error = %format!("{e:#}"), "cannot re-adopt pod");
                }
            }
        }
        Ok(())
    }

    fn persist(&self, pods: &HashMap<String, Served>) -> Result<()> {
        let list: Vec<&PodInfo> = pods.values().map(|s| &s.info).collect();
        std::fs::create_dir_all(&self.settings.state_dir)?;
        let tmp = self.state_file().with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)?;
        std::fs::rename(&tmp, self.state_file()).context("record the pods meshd serves")
    }

    /// Captures the pod now (listeners inside it, interception), then learns who it is and
    /// serves it: until then its connections wait in the listen queues.
    async fn serve(&self, info: PodInfo) -> Result<Served> {
        let netns = Arc::new(
            Netns::open(&info.netns)
                .with_context(|| format!("open the pod's namespace {}", info.netns.display()))?,
        );
        let listen = |ip: Ipv4Addr, port: u16| {
            let name = format!("pod/{}/{port}", info.container_id);
            self.ctx.sockets.tcp(&name, || listen_in(&netns, ip, port))
        };
        let listeners = Listeners {
            outbound: listen(Ipv4Addr::LOCALHOST, ports::OUTBOUND)?,
            inbound: listen(Ipv4Addr::UNSPECIFIED, ports::INBOUND_PLAINTEXT)?,
            hbone: match self.identity {
                Some(_) => Some(listen(Ipv4Addr::UNSPECIFIED, ports::INBOUND_HBONE)?),
                None => None,
            },
        };
        let pod = PodNet {
            id: &info.container_id,
            netns: &netns,
            ip: info.ip,
            inbound_listener: listeners.inbound.as_fd(),
        };
        let capture: Arc<dyn PodCapture> = Arc::from(self.ctx.interception.capture_pod(&pod)?);
        let server = PodServer {
            ctx: self.ctx.clone(),
            identity: self.identity.clone(),
            source: self.source.clone(),
            excluded: self.settings.excluded_namespaces.clone(),
            capture: capture.clone(),
        };
        let task = tokio::spawn(server.run(info.clone(), netns, listeners));
        Ok(Served {
            info,
            tasks: vec![task],
            capture,
        })
    }
}

/// A pod's listening sockets, made inside its namespace.
struct Listeners {
    outbound: Arc<TcpListener>,
    inbound: Arc<TcpListener>,
    hbone: Option<Arc<TcpListener>>,
}

/// What serving one pod needs, owned by the pod's task.
struct PodServer {
    ctx: Arc<Context>,
    identity: Option<Arc<PodIdentity>>,
    source: Arc<MetadataSource>,
    excluded: Vec<String>,
    capture: Arc<dyn PodCapture>,
}

impl PodServer {
    async fn run(self, info: PodInfo, netns: Arc<Netns>, listeners: Listeners) {
        let meta = match self.source.resolve(&info).await {
            Ok(m) => m,
            Err(e) => {
                // Dropping the listeners resets what waited: fail closed.
                self.ctx.metrics.pod_event("identity", "failed");
                tracing::warn!(pod = %info.name, error = %format!("{e:#}"),
                    "cannot learn who the pod is; its connections are refused");
                return;
            }
        };
        if self.excluded.contains(&meta.namespace)
            || meta
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .is_some_and(|v| v == "none")
        {
            tracing::info!(pod = %info.name, namespace = %meta.namespace,
                "pod outside the mesh by its metadata: capture removed");
            let _ = self.capture.remove();
            return;
        }
        let mut workload = pod_workload(&info, &meta);
        let trust_domain = self.identity.as_ref().map(|i| i.trust_domain.as_str());
        workload.party = crate::metrics::istio::Party::of(&workload, trust_domain);
        let workload = Arc::new(workload);
        let tunnels = match &self.identity {
            Some(id) => match self.pod_tls(id, &workload, &netns, &info).await {
                Ok(t) => Some(t),
                Err(e) => {
                    self.ctx.registry.remove_local(info.ip);
                    self.ctx.metrics.pod_event("identity", "failed");
                    tracing::warn!(pod = %info.name, error = %format!("{e:#}"), "no SVID for the pod");
                    return;
                }
            },
            None => None,
        };
        self.ctx.metrics.pod_event("identity", "ok");
        tracing::info!(pod = %info.name, namespace = %workload.namespace,
            service_account = %workload.service_account, "pod identity known; serving it");
        let (pod_tunnels, server_tls) = tunnels.map_or((None, None), |(t, s)| (Some(t), Some(s)));
        let scope = Scope {
            pod: Some(Arc::new(PodScope {
                workload,
                netns,
                ip: info.ip,
                tunnels: pod_tunnels,
            })),
        };
        serve_listeners(&self.ctx, scope, listeners, server_tls).await;
    }

    /// The pod's SVID: its HBONE client identity (tunnels leave from inside the pod) and the
    /// :15008 server configuration presenting it.
    async fn pod_tls(
        &self,
        id: &PodIdentity,
        workload: &Workload,
        netns: &Arc<Netns>,
        info: &PodInfo,
    ) -> Result<(PodTunnels, Arc<rustls::ServerConfig>)> {
        let spiffe = SpiffeId::new(
            &id.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )?;
        // Registered before the SVID is asked for: the CA service signs only identities the
        // registry places on this node.
        self.ctx.registry.add_local(WorkloadRecord {
            name: info.name.clone(),
            namespace: workload.namespace.clone(),
            // The registry source fills in its node name.
            node: String::new(),
            address: info.ip,
            ports: Vec::new(),
            spiffe_id: spiffe.clone(),
            labels: workload.labels.clone(),
        });
        let svid = id.manager.ensure(&spiffe).await?;
        let server = tls::config::server_config(id.bundle.clone(), svid.clone())?;
        let client = ClientIdentity::new(spiffe, svid, id.bundle.clone()).for_workload(workload);
        let client = Arc::new(client);
        let pool = Pool::new(self.ctx.mark, self.ctx.metrics.clone(), Some(netns.clone()));
        Ok(((client, pool), server))
    }
}

async fn serve_listeners(
    ctx: &Arc<Context>,
    scope: Scope,
    listeners: Listeners,
    server_tls: Option<Arc<rustls::ServerConfig>>,
) {
    let outbound = proxy::accept_loop(
        listeners.outbound,
        ctx.clone(),
        scope.clone(),
        outbound::handle,
    );
    let inbound = proxy::accept_loop(
        listeners.inbound,
        ctx.clone(),
        scope.clone(),
        inbound::handle,
    );
    let hbone = async {
        match (listeners.hbone, server_tls) {
            (Some(l), Some(tls)) => tunnel::server::serve(l, ctx.clone(), tls, scope.clone()).await,
            _ => std::future::pending().await,
        }
    };
    tokio::join!(outbound, inbound, hbone);
}

/// Connections a pod may make before meshd knows who it is (they wait, accepted by the kernel).
const LISTEN_BACKLOG: i32 = 1024;

/// A listener made inside the pod's namespace (served from meshd's event loop).
fn listen_in(netns: &Netns, ip: Ipv4Addr, port: u16) -> Result<std::net::TcpListener> {
    let addr = SocketAddr::new(ip.into(), port);
    let std = netns
        .run(|| {
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM.nonblocking(),
                Some(socket2::Protocol::TCP),
            )?;
            sock.set_reuse_address(true)?;
            sock.bind(&addr.into())?;
            sock.listen(LISTEN_BACKLOG)?;
            Ok(std::net::TcpListener::from(sock))
        })
        .with_context(|| format!("listen on {addr} inside {}", netns.path.display()))?;
    Ok(std)
}

/// The pod as the proxy stages see a workload.
fn pod_workload(info: &PodInfo, meta: &PodMeta) -> Workload {
    Workload {
        name: info.name.clone(),
        namespace: meta.namespace.clone(),
        service_account: meta.service_account.clone(),
        cgroup_path: PathBuf::new(),
        cgroup: PathBuf::new(),
        cgroup_id: 0,
        ports: Vec::new(),
        protocols: meta.protocols.clone(),
        labels: meta.labels.clone(),
        sk_msg_bypass: false,
        party: crate::metrics::istio::Party::unknown(),
    }
}
