//! `meshd run`: take the listening sockets of a meshd already running in this namespace (a
//! restart without a gap, [`crate::handover`]) or bind them (a taken port fails before anything
//! is attached), answer health and admin requests at once (not ready while starting), install
//! the interception (taking over what an earlier meshd pinned), serve until SIGTERM/SIGINT,
//! `/quitquitquit` or a successor that serves; then drain: not ready, no new connections, the
//! open ones given up to the drain timeout. Interception stays: until the next meshd serves,
//! connections fail closed; `meshd cleanup` removes it.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_common::ports;
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
};

use crate::{
    admin::{self, dump::View, Port, State},
    config::{IdentitySettings, Validated},
    handover::{Phase, Sockets},
    identity::{ca_client::CaClient, IdentityManager, IssuerFiles, Signer, SpiffeId},
    inpod::manager::{PodIdentity, PodManager},
    intercept::{ebpf, iptables, Interception, Mode},
    metrics::Metrics,
    policy::reload::Live,
    proxy::{self, inbound, outbound, Context, Scope, Tunnels},
    registry::{self, Registry},
    tls::{self, verify::TrustBundle},
    tunnel::{
        self,
        pool::{ClientIdentity, Pool},
    },
};

/// How often the interception's state (map fill levels, rules) is logged.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// A listening socket of meshd's own namespace: handed over by the running meshd, or bound.
fn listen(sockets: &Sockets, name: &str, ip: Ipv4Addr, port: u16) -> Result<Arc<TcpListener>> {
    sockets.tcp(name, || {
        let addr = SocketAddr::new(ip.into(), port);
        std::net::TcpListener::bind(addr).with_context(|| {
            format!("cannot listen on {addr}: is another program using port {port}?")
        })
    })
}

/// How `meshd run` stops (command-line flags).
#[derive(Debug, Clone, Copy)]
pub struct Stopping {
    /// Open connections get this long to finish.
    pub drain_timeout: Duration,
    /// After a successor took over (and not asked to stop), wait for SIGTERM/SIGINT instead
    /// of exiting (`--wait-after-handover`).
    pub wait_after_handover: bool,
}

pub async fn run(mode: Mode, cfg: Validated, stopping: Stopping) -> Result<()> {
    crate::inpod::netns::remember_home().context("open meshd's own network namespace")?;
    let state_dir = (cfg.pods.as_ref()).map_or(cfg.proxy.state_dir.clone(), |p| {
        p.settings.state_dir.clone()
    });
    let sockets = Sockets::start(&state_dir).context("take over from the running meshd")?;
    let mut reserved = ReservedPorts::reserve(&state_dir)?;
    let (outbound_listener, inbound_listener, hbone_listener) = node_listeners(&sockets, &cfg)?;
    let metrics = Arc::new(Metrics::default());
    let state = State::new(metrics.clone());
    serve_admin(&sockets, &state)?;
    // Before anything is installed: a broken policy file stops start-up cleanly.
    let policy = Arc::new(Live::load(cfg.policies.clone()).context("authorization policy")?);
    metrics.policies.set(policy.current().len() as i64);
    // Published before any SVID is asked for: the CA service signs only what the registry
    // places on this node.
    let registry = Arc::new(Registry::new(cfg.mesh.identities.clone()));
    let _source = registry::etcd::spawn(&cfg, &registry, &metrics);
    let (tunnels, hbone_tls, pod_identity) = match &cfg.identity {
        Some(identity) => {
            let (tunnels, tls, pods) = start_identity(identity, &cfg, &metrics).await?;
            state.health.set_identity(pods.manager.clone());
            (Some(tunnels), Some(tls), Some(pods))
        }
        None => (None, None, None),
    };

    let bundle = pod_identity.as_ref().map(|p| p.bundle.clone());
    let interception = install(mode, &cfg, &inbound_listener).await?;
    // From here on interception outlives this process: the ports stay reserved with it.
    reserved.keep();
    let ctx = Arc::new(Context {
        interception: interception.clone(),
        metrics: metrics.clone(),
        mark: cfg.proxy.mark,
        inbound: inbound_by_port(&cfg),
        peer_auth: cfg.peer_auth.clone(),
        mesh_networks: cfg.mesh.networks.clone(),
        egress: cfg.mesh.egress,
        tunnels,
        local_addrs: Default::default(),
        registry,
        policy: policy.clone(),
        limits: proxy::limits::Limits::new(&cfg.limits),
        egress_policies: proxy::egress::EgressPolicies::new(&cfg.egress_policies)
            .map_err(|e| anyhow::anyhow!(e))?,
        hbone: cfg.hbone,
        peer_names: Default::default(),
        sockets: sockets.clone(),
    });
    let cni = start_pods(&cfg, &ctx, pod_identity, &sockets).await?;
    let view = View {
        ctx: ctx.clone(),
        cfg: cfg.clone(),
        pods: cni.as_ref().map(|(_, m)| m.clone()),
        bundle,
    };
    let _ = state.view.set(view);
    metrics.build_info(mode.as_str());
    // Start-up (the capability probe, loading and verifying programs, parsing certificates)
    // frees more than it keeps; hand those pages back so the resident size is what serving needs.
    // No safe helper: neither libc nor nix wraps glibc malloc_trim safely.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    let workloads: Vec<&str> = cfg.workloads.iter().map(|w| w.name.as_str()).collect();
    let took_over = sockets.has_predecessor();
    sockets.serving().context("serve the handover socket")?;
    state.health.serving();
    tracing::info!(%mode, workloads = ?workloads, inbound_ports = ?cfg.inbound_ports(),
        took_over, "meshd ready");

    // Registered once, before serving, so a signal that arrives while draining is not lost.
    let mut signals = StopSignals::new()?;
    let served = tokio::select! {
        _ = proxy::accept_loop(outbound_listener.clone(), ctx.clone(), Scope::default(), outbound::handle) => Ok(()),
        _ = proxy::accept_loop(inbound_listener.clone(), ctx.clone(), Scope::default(), inbound::handle) => Ok(()),
        _ = serve_cni(cni, &sockets) => Ok(()),
        _ = serve_hbone(hbone_listener.clone(), ctx.clone(), hbone_tls) => Ok(()),
        _ = log_status(interception.as_ref()) => Ok(()),
        _ = registry::follow_roots(&ctx.registry, state.view.get().and_then(|v| v.bundle.clone())) => Ok(()),
        _ = trim_memory() => Ok(()),
        watch = policy.clone().watch(metrics.clone()) => watch.context("watching the policy files"),
        stop = signals.recv() => stop,
        _ = state.quit.notified() => {
            tracing::info!("shutting down: /quitquitquit");
            Ok(())
        }
        _ = sockets.reached(Phase::Draining) => Ok(()),
    };
    // Whether a successor ended serving, read from the phase and not from the branch that
    // won: the accept loops end at the same moment, and select! picks among ready branches
    // at random.
    let asked_to_stop = sockets.phase() < Phase::Draining;
    // No new connection is accepted from here on; the listening sockets stay open (connections
    // queue on them) for a successor, which can still take them over while this one drains.
    sockets.enter(Phase::Draining);
    state.health.draining();
    drain(&metrics, stopping.drain_timeout).await;
    tracing::info!(status = %interception.status(), "stopping");
    sockets.close();
    let wait = stopping.wait_after_handover && !asked_to_stop;
    stopped(sockets.phase(), wait, &mut signals).await?;
    served
}

/// Says how this meshd stopped; after a handover with `wait`, waits for SIGTERM/SIGINT: a
/// supervisor that restarts an exited process (the kubelet, for a DaemonSet's pod) would
/// otherwise start it again beside its successor, and take the sockets back.
async fn stopped(phase: Phase, wait: bool, signals: &mut StopSignals) -> Result<()> {
    match phase {
        Phase::HandedOver if wait => {
            tracing::info!(
                "meshd stopped; the new meshd serves; waiting for SIGTERM (--wait-after-handover)"
            );
            signals.recv().await
        }
        Phase::HandedOver => {
            tracing::info!("meshd stopped; the new meshd serves");
            Ok(())
        }
        _ => {
            tracing::info!(
                "meshd stopped; interception left in place: connections fail closed until the \
                 next meshd serves (`meshd cleanup` removes it)"
            );
            Ok(())
        }
    }
}

type Listener = Arc<tokio::net::TcpListener>;

/// The node's proxy listeners: outbound :15001, inbound :15006 and (with an identity) HBONE
/// :15008, taken from the running meshd or bound.
fn node_listeners(
    sockets: &Sockets,
    cfg: &Validated,
) -> Result<(Listener, Listener, Option<Listener>)> {
    let outbound = listen(
        sockets,
        "node/outbound",
        Ipv4Addr::LOCALHOST,
        ports::OUTBOUND,
    )?;
    let inbound = listen(
        sockets,
        "node/inbound",
        Ipv4Addr::UNSPECIFIED,
        ports::INBOUND_PLAINTEXT,
    )?;
    let hbone = match cfg.identity {
        Some(_) => Some(listen(
            sockets,
            "node/hbone",
            Ipv4Addr::UNSPECIFIED,
            ports::INBOUND_HBONE,
        )?),
        None => None,
    };
    Ok((outbound, inbound, hbone))
}

/// Metrics :15020, health :15021 and the admin API on 127.0.0.1:15000, answering at once.
fn serve_admin(sockets: &Arc<Sockets>, state: &Arc<State>) -> Result<()> {
    let endpoints = [
        (Ipv4Addr::UNSPECIFIED, ports::METRICS, Port::Metrics),
        (Ipv4Addr::UNSPECIFIED, ports::READINESS, Port::Health),
        (Ipv4Addr::LOCALHOST, ports::ADMIN, Port::Admin),
    ];
    for (ip, port, which) in endpoints {
        let listener = listen(sockets, &format!("node/{which:?}"), ip, port)?;
        tokio::spawn(admin::serve(
            listener,
            state.clone(),
            which,
            sockets.clone(),
        ));
    }
    Ok(())
}

/// Installs interception. Loading and verifying programs (or applying rules) blocks for a
/// while: off the event loop, so health and admin answer meanwhile (503, starting).
async fn install(mode: Mode, cfg: &Validated, inbound: &Listener) -> Result<Arc<dyn Interception>> {
    let (cfg, inbound) = (cfg.clone(), inbound.clone());
    let install = move || -> Result<Arc<dyn Interception>> {
        Ok(match mode {
            Mode::Ebpf => Arc::new(ebpf::install(&cfg, &*inbound)?),
            Mode::Iptables => Arc::new(iptables::install(&cfg)?),
        })
    };
    tokio::task::spawn_blocking(install)
        .await
        .context("installing interception")?
}

/// Local workloads by the ports they serve.
fn inbound_by_port(cfg: &Validated) -> HashMap<u16, Arc<crate::config::Workload>> {
    let mut by_port = HashMap::new();
    for w in &cfg.workloads {
        for port in &w.ports {
            by_port.insert(*port, Arc::new(w.clone()));
        }
    }
    by_port
}

/// Pods (`pods:`): the manager, with the pods an earlier meshd recorded served again before
/// anything new is taken, and the CNI socket.
async fn start_pods(
    cfg: &Validated,
    ctx: &Arc<Context>,
    identity: Option<PodIdentity>,
    sockets: &Sockets,
) -> Result<Option<(Arc<tokio::net::UnixListener>, Arc<PodManager>)>> {
    let Some(pods) = &cfg.pods else {
        return Ok(None);
    };
    let manager = Arc::new(PodManager::new(
        ctx.clone(),
        identity,
        pods.settings.clone(),
    ));
    manager.readopt().await?;
    let path = &pods.settings.cni_socket;
    let socket = sockets.unix("node/cni", || crate::inpod::server::bind(path))?;
    Ok(Some((socket, manager)))
}

/// The ports this meshd added to the namespace's reserved ports (recorded in a file): given
/// back if start-up fails before interception is installed; after that they stay reserved with
/// the interception, and `meshd cleanup` gives them back.
struct ReservedPorts {
    record: std::path::PathBuf,
    kept: bool,
}

impl ReservedPorts {
    fn reserve(state_dir: &std::path::Path) -> Result<ReservedPorts> {
        let record = crate::sys::reserved_ports_record(state_dir)?;
        match crate::sys::reserve_ports(&ports::ALL, &record) {
            Ok(list) => {
                tracing::debug!(reserved = %list, "meshd's ports reserved from ephemeral use")
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot reserve meshd's ports"),
        }
        Ok(ReservedPorts {
            record,
            kept: false,
        })
    }

    fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for ReservedPorts {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Err(e) = crate::sys::release_reserved_ports(&self.record) {
            tracing::warn!(error = %format!("{e:#}"), "cannot release meshd's reserved ports");
        }
    }
}

/// Mints the local identities' SVIDs (and keeps them renewed), and builds the HBONE client
/// configuration of each workload and the :15008 server configuration.
async fn start_identity(
    settings: &IdentitySettings,
    cfg: &Validated,
    metrics: &Arc<Metrics>,
) -> Result<(Tunnels, Arc<rustls::ServerConfig>, PodIdentity)> {
    let td = &settings.trust_domain;
    let mut workload_ids = Vec::new();
    for w in &cfg.workloads {
        workload_ids.push((
            w.name.clone(),
            SpiffeId::new(td, &w.namespace, &w.service_account)?,
        ));
    }
    let mut ids: Vec<SpiffeId> = workload_ids.iter().map(|(_, id)| id.clone()).collect();
    ids.push(settings.node_id.clone());
    let bundle = Arc::new(TrustBundle::load(
        td,
        &settings.trust_bundle,
        &settings.revocation,
    )?);
    let signer = match settings.ca_service {
        None => Signer::Local(IssuerFiles {
            cert: settings.node_cert.clone(),
            key: settings.node_key.clone(),
        }),
        Some(address) => Signer::Remote(Arc::new(CaClient::new(
            address.into(),
            (&settings.node_cert, &settings.node_key),
            bundle.clone(),
            cfg.proxy.mark,
        )?)),
    };
    let manager = IdentityManager::start(signer, settings.svid_ttl, ids, metrics.clone());
    let manager = Arc::new(manager.await?);
    let mut clients = HashMap::new();
    // `workload_ids` follows `cfg.workloads`, one entry each.
    for ((name, id), workload) in workload_ids.into_iter().zip(&cfg.workloads) {
        let svid = manager.watch(&id).expect("minted above");
        let client = ClientIdentity::new(id, svid, bundle.clone()).for_workload(workload);
        clients.insert(name, Arc::new(client));
    }
    let node_svid = manager.watch(&settings.node_id).expect("minted above");
    let server = tls::config::server_config(bundle.clone(), node_svid)?;
    let tunnels = Tunnels {
        pool: Pool::new(cfg.proxy.mark, metrics.clone(), None),
        clients,
    };
    let pods = PodIdentity {
        manager,
        bundle,
        trust_domain: td.clone(),
    };
    Ok((tunnels, server, pods))
}

async fn serve_cni(
    cni: Option<(Arc<tokio::net::UnixListener>, Arc<PodManager>)>,
    sockets: &Sockets,
) {
    match cni {
        Some((socket, manager)) => tokio::select! {
            _ = crate::inpod::server::serve(socket, manager) => {}
            // ADDs arriving later wait on the socket for the next meshd.
            _ = sockets.reached(Phase::Draining) => {}
        },
        None => std::future::pending().await,
    }
}

async fn serve_hbone(
    listener: Option<Arc<TcpListener>>,
    ctx: Arc<Context>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    match (listener, tls) {
        (Some(listener), Some(tls)) => {
            tunnel::server::serve(listener, ctx, tls, Scope::default()).await
        }
        _ => std::future::pending().await,
    }
}

/// Waits until no connection is open, or `timeout`; says how many were cut.
async fn drain(metrics: &Metrics, timeout: Duration) {
    let open = || metrics.open_connections();
    let started = std::time::Instant::now();
    if open() > 0 {
        tracing::info!(
            open = open(),
            timeout_ms = timeout.as_millis() as u64,
            "draining: waiting for open connections to finish"
        );
    }
    while open() > 0 && started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match open() {
        0 => tracing::info!(took_ms = started.elapsed().as_millis() as u64, "drained"),
        n => tracing::warn!(
            open = n,
            "drain timeout: closing the connections still open"
        ),
    }
}

/// How often freed heap pages are handed back.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Hands freed heap pages back to the kernel every [`TRIM_EVERY`]: after a burst (a flood of
/// handshakes, thousands of connections) glibc would keep them, and the resident size would stay
/// at its peak after the burst is over.
async fn trim_memory() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    loop {
        tick.tick().await;
        // No safe helper: neither libc nor nix wraps glibc malloc_trim safely.
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe { libc::malloc_trim(0) };
    }
}

async fn log_status(interception: &dyn Interception) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tick.tick().await;
        tracing::info!(status = %interception.status(), "interception");
    }
}

/// SIGTERM and SIGINT, registered once: one received while nothing waits is kept for the next
/// `recv`.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> Result<()> {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        Ok(())
    }
}
