//! `meshd run`: bind every listener first (a taken port fails before anything is attached),
//! install the interception, serve until SIGTERM/SIGINT, then remove the interception.

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
    admin::{self, Endpoint},
    config::Validated,
    intercept::{ebpf, iptables, Interception, Mode},
    metrics::Metrics,
    proxy::{self, inbound, outbound, Context},
};

/// How often the interception's state (map fill levels, rules) is logged.
const STATUS_EVERY: Duration = Duration::from_secs(30);

fn listen(ip: Ipv4Addr, port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::new(ip.into(), port);
    let std = std::net::TcpListener::bind(addr).with_context(|| {
        format!("cannot listen on {addr}: is another meshd (or another program) using port {port}?")
    })?;
    std.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std)?)
}

pub async fn run(mode: Mode, cfg: Validated) -> Result<()> {
    let outbound_listener = listen(Ipv4Addr::LOCALHOST, ports::OUTBOUND)?;
    let inbound_listener = listen(Ipv4Addr::UNSPECIFIED, ports::INBOUND_PLAINTEXT)?;
    let metrics_listener = listen(Ipv4Addr::UNSPECIFIED, ports::METRICS)?;
    let ready_listener = listen(Ipv4Addr::UNSPECIFIED, ports::READINESS)?;

    let interception: Arc<dyn Interception> = match mode {
        Mode::Ebpf => Arc::new(ebpf::install(&cfg, &inbound_listener)?),
        Mode::Iptables => Arc::new(iptables::install(&cfg)?),
    };
    let metrics = Arc::new(Metrics::default());
    let mut inbound_workloads = HashMap::new();
    for w in &cfg.workloads {
        for port in &w.ports {
            inbound_workloads.insert(*port, Arc::new(w.clone()));
        }
    }
    let ctx = Arc::new(Context {
        interception: interception.clone(),
        metrics: metrics.clone(),
        mark: cfg.proxy.mark,
        inbound: inbound_workloads,
    });
    let workloads: Vec<&str> = cfg.workloads.iter().map(|w| w.name.as_str()).collect();
    tracing::info!(%mode, workloads = ?workloads, inbound_ports = ?cfg.inbound_ports(),
        "meshd ready");

    let served = tokio::select! {
        _ = proxy::accept_loop(outbound_listener, ctx.clone(), outbound::handle) => Ok(()),
        _ = proxy::accept_loop(inbound_listener, ctx.clone(), inbound::handle) => Ok(()),
        _ = admin::serve(metrics_listener, Endpoint::Metrics(metrics.clone())) => Ok(()),
        _ = admin::serve(ready_listener, Endpoint::Ready) => Ok(()),
        _ = log_status(interception.as_ref(), &metrics) => Ok(()),
        stop = stop_signal() => stop,
    };
    tracing::info!(status = %interception.status(), "stopping");
    interception.uninstall().context("remove interception")?;
    tracing::info!("meshd stopped; interception removed");
    served
}

async fn log_status(interception: &dyn Interception, metrics: &Metrics) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tick.tick().await;
        for (map, entries) in interception.map_entries() {
            let labels = crate::metrics::MapLabels { map };
            metrics
                .bpf_map_entries
                .get_or_create(&labels)
                .set(entries as i64);
        }
        tracing::info!(status = %interception.status(), "interception");
    }
}

async fn stop_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
    Ok(())
}
