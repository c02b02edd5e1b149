//! The proxy: accept loops for the outbound (:15001) and inbound plaintext (:15006) listeners,
//! dialling from a marked socket (so neither interception mode captures meshd's own
//! connections), the plaintext relay, and the access record every connection ends with: one
//! log line, counters and the active gauge.

pub mod authz;
pub mod counted;
pub mod egress;
pub mod inbound;
pub mod limits;
pub mod outbound;

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{
    config::{Egress, Ipv4Cidr, PeerAuth, Workload},
    inpod::netns::Netns,
    intercept::Interception,
    metrics::{
        istio::{Meter, TcpLabels},
        BytesLabels, ConnLabels, Direction, Metrics,
    },
    registry::Registry,
    tls::verify::PeerIdentity,
    tunnel::pool::{ClientIdentity, Pool},
};

/// How long dialling a destination may take before the application's connection is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler needs.
pub struct Context {
    pub interception: Arc<dyn Interception>,
    pub metrics: Arc<Metrics>,
    /// SO_MARK on meshd's own upstream sockets.
    pub mark: u32,
    /// Local workloads by the ports they serve: the only destinations inbound connections
    /// (plaintext or HBONE) may reach.
    pub inbound: HashMap<u16, Arc<Workload>>,
    pub peer_auth: PeerAuth,
    /// Destinations reached through HBONE.
    pub mesh_networks: Vec<Ipv4Cidr>,
    pub egress: Egress,
    /// Per-workload egress rules (over `egress` for the workloads they select).
    pub egress_policies: egress::EgressPolicies,
    /// Present when meshd has an identity.
    pub tunnels: Option<Tunnels>,
    pub local_addrs: LocalAddrs,
    /// Which identity must answer at a destination address.
    pub registry: Arc<Registry>,
    /// Abuse limits per caller identity and per destination workload.
    pub limits: limits::Limits,
    /// The authorization policy in force (reloaded live).
    pub policy: Arc<crate::policy::reload::Live>,
    /// Limits of the :15008 listeners.
    pub hbone: crate::tunnel::limits::HboneLimits,
    /// Source workload names peers' `baggage` gave (bounded).
    pub peer_names: crate::tunnel::baggage::Accepted,
    /// The listening sockets and where meshd is in its life (serving, draining, handed over).
    pub sockets: Arc<crate::handover::Sockets>,
}

/// Where a listener serves: meshd's own network namespace (host workloads, `pod: None`) or one
/// pod, from sockets meshd made inside the pod's namespace.
#[derive(Clone, Default)]
pub struct Scope {
    pub pod: Option<Arc<PodScope>>,
}

/// One pod as the proxy stages see it.
pub struct PodScope {
    /// The pod as a workload (name, namespace, service account).
    pub workload: Arc<Workload>,
    pub netns: Arc<Netns>,
    pub ip: Ipv4Addr,
    /// Its HBONE client identity and pool (dialling from inside the pod), when meshd has an
    /// identity.
    pub tunnels: Option<(Arc<ClientIdentity>, Pool)>,
}

impl Scope {
    pub fn netns(&self) -> Option<&Netns> {
        self.pod.as_ref().map(|p| &*p.netns)
    }
}

pub struct Tunnels {
    pub pool: Pool,
    /// Each local workload's client identity, by workload name.
    pub clients: HashMap<String, Arc<ClientIdentity>>,
}

impl Context {
    /// Destinations reached through HBONE: the mesh networks, and any address the registry
    /// knows (a workload or a Service).
    pub fn in_mesh(&self, ip: Ipv4Addr) -> bool {
        self.mesh_networks.iter().any(|n| n.contains(ip)) || self.registry.knows(ip)
    }

    /// The local workload an inbound connection to `dst` is for: in a pod, the pod itself (every
    /// port of its address); in the node's namespace, the workload serving that port.
    pub fn inbound_workload(&self, scope: &Scope, dst: SocketAddrV4) -> Option<Arc<Workload>> {
        match &scope.pod {
            Some(pod) => (*dst.ip() == pod.ip && !mesh_common::ports::ALL.contains(&dst.port()))
                .then(|| pod.workload.clone()),
            None => self.inbound.get(&dst.port()).cloned(),
        }
    }
}

/// Accepts until meshd drains, one task per connection. Accept errors (fd exhaustion) are
/// logged and retried after a pause rather than ending the loop.
pub async fn accept_loop<F, Fut>(
    listener: Arc<TcpListener>,
    ctx: Arc<Context>,
    scope: Scope,
    handle: F,
) where
    F: Fn(TcpStream, Arc<Context>, Scope) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let draining = ctx.sockets.clone();
    let draining = draining.reached(crate::handover::Phase::Draining);
    tokio::pin!(draining);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut draining => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((conn, _)) => {
                // Small writes (requests, responses) must leave at once, not wait for an ACK.
                let _ = conn.set_nodelay(true);
                tokio::spawn(handle(conn, ctx.clone(), scope.clone()));
            }
            Err(e) => {
                crate::warn_throttled!("accept", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Dials `dst` from a socket carrying `mark`, optionally from `source`, made inside `netns`
/// (a pod's) or in meshd's own namespace.
pub async fn dial(
    dst: SocketAddrV4,
    mark: u32,
    source: Option<Ipv4Addr>,
    netns: Option<&Netns>,
) -> io::Result<TcpStream> {
    let sock = match netns {
        None => TcpSocket::new_v4()?,
        Some(ns) => TcpSocket::from_std_stream(ns.run(|| {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM.nonblocking(),
                Some(socket2::Protocol::TCP),
            )?;
            Ok(std::net::TcpStream::from(s))
        })?),
    };
    socket2::SockRef::from(&sock).set_mark(mark)?;
    if let Some(ip) = source {
        // Choose the port at connect(), where only the full 4-tuple must be unique: bind(ip, 0)
        // alone wants a port no socket of that address holds, TIME_WAIT included, and under
        // connection-per-request load slowed deliveries to ~130 connections/s.
        bind_address_no_port(&sock)?;
        sock.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst.into()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn bind_address_no_port(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    Ok(setsockopt(sock, IpBindAddressNoPort, &true)?)
}

/// Closes an application connection with a reset, as if its own dial had failed.
pub fn reset(app: &TcpStream) {
    let _ = socket2::SockRef::from(app).set_linger(Some(Duration::ZERO));
}

/// One connection's record, from the moment it is established to its access log line.
pub struct Access {
    pub labels: ConnLabels,
    pub workload: Option<Arc<Workload>>,
    /// The verified identity of the sending workload (HBONE inbound).
    pub peer: Option<Arc<PeerIdentity>>,
    pub src: Option<SocketAddr>,
    pub dst: SocketAddrV4,
    /// Outbound HBONE: whether the server's identity was checked against the one expected at
    /// the destination (`verified`) or only against the trust domain.
    pub server_check: &'static str,
    /// Envoy's response flag when the connection fails (`-` otherwise), for
    /// `istio_tcp_connections_closed_total`.
    pub flags: &'static str,
    /// Its Istio counters: bytes are added to them as they flow.
    pub meter: Meter,
    /// Outbound to a Service address: the Service and the endpoint it went to.
    pub service: Option<(Arc<crate::registry::ServiceTarget>, SocketAddrV4)>,
    /// HBONE inbound: the original source the peer's `Forwarded: for=` names (its claim, for
    /// the log only).
    pub forwarded_for: Option<std::net::IpAddr>,
    /// HBONE: the trace id of the CONNECT's `traceparent`.
    pub trace_id: Option<crate::tunnel::traceparent::TraceId>,
    started: Instant,
    active: Gauge,
}

impl Access {
    pub fn begin(
        ctx: &Context,
        labels: ConnLabels,
        dst: SocketAddrV4,
        src: Option<SocketAddr>,
        istio: TcpLabels,
    ) -> Access {
        ctx.metrics.connections.get_or_create(&labels).inc();
        let active = ctx.metrics.active.get_or_create(&labels).clone();
        active.inc();
        ctx.metrics.connection_open(1);
        Access {
            labels,
            workload: None,
            peer: None,
            src,
            dst,
            server_check: "-",
            flags: "-",
            meter: ctx.metrics.istio.open(istio),
            service: None,
            forwarded_for: None,
            trace_id: None,
            started: Instant::now(),
            active,
        }
    }

    /// Counts the bytes and writes the access log line.
    pub fn finish(self, ctx: &Context, result: io::Result<(u64, u64)>) {
        self.active.dec();
        ctx.metrics.connection_open(-1);
        let mut closed = self.meter.labels;
        closed.response_flags = match (&result, self.flags) {
            (Err(_), "-") => "UC",
            (_, flags) => flags,
        };
        ctx.metrics.istio.closed.get_or_create(&closed).inc();
        let (sent, received) = result.as_ref().map_or((0, 0), |r| *r);
        for (way, n) in [("sent", sent), ("received", received)] {
            let direction = self.labels.direction;
            ctx.metrics
                .bytes
                .get_or_create(&BytesLabels { direction, way })
                .inc_by(n);
        }
        tracing::info!(
            target: crate::logbuf::ACCESS_TARGET,
            direction = %self.labels.direction,
            mode = %self.labels.mode,
            transport = %self.labels.transport,
            workload = %workload_name(self.workload.as_deref()),
            peer = %self.peer.as_ref().map_or("-".into(), |p| p.id.to_string()),
            peer_serial = %self.peer.as_ref().map_or("-", |p| p.serial.as_str()),
            src = %self.src.map_or("?".into(), |p| p.to_string()),
            dst = %self.dst,
            forwarded_for = %self.forwarded_for.map_or("-".into(), |ip| ip.to_string()),
            trace_id = %self.trace_id.map_or("-".into(), |t| t.to_string()),
            server_check = %self.server_check,
            service = %self.service.as_ref().map_or("-".into(), |(s, _)| format!("{}/{}", s.namespace, s.name)),
            endpoint = %self.service.as_ref().map_or("-".into(), |(_, e)| e.to_string()),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = %result.err().map_or(String::new(), |e| e.to_string()),
            "connection"
        );
    }
}

/// Plaintext: dial `dst` and copy both ways with half-close (inbound: as policy carries it).
pub async fn relay_plaintext(
    ctx: &Context,
    mut app: TcpStream,
    mut access: Access,
    delivery: Option<(Ipv4Addr, authz::Guard)>,
    scope: &Scope,
) {
    let (source, guard) = delivery.unzip();
    let mut upstream = match dial(access.dst, ctx.mark, source, scope.netns()).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics
                .reject(access.labels.direction, "upstream_connect_failed");
            access.flags = "UF";
            crate::warn_throttled!("upstream_connect_failed", direction = %access.labels.direction, dst = %access.dst, error = %e,
                "cannot reach the destination; resetting the application's connection");
            reset(&app);
            access.finish(ctx, Err(e));
            return;
        }
    };
    access.src = access.src.or(app.peer_addr().ok());
    let meter = &access.meter;
    let result = match guard {
        Some(guard) => {
            guard
                .carry(authz::Downstream::Tcp(app), upstream, meter)
                .await
        }
        None => copy_counted(&mut app, &mut upstream, meter).await,
    };
    access.finish(ctx, result);
}

/// A byte copy both ways with half-close, counting as it goes: bytes written to `caller` are
/// responses, bytes written to `destination` requests. Returns (requests, responses).
pub async fn copy_counted(
    caller: &mut TcpStream,
    destination: &mut TcpStream,
    meter: &Meter,
) -> io::Result<(u64, u64)> {
    let mut caller = counted::Counted::new(caller, meter.response.clone());
    let mut destination = counted::Counted::new(destination, meter.request.clone());
    tokio::io::copy_bidirectional(&mut caller, &mut destination).await
}

/// Labels for a connection of this meshd.
pub fn labels(ctx: &Context, direction: Direction, transport: &'static str) -> ConnLabels {
    ConnLabels {
        direction,
        mode: ctx.interception.mode().as_str(),
        transport,
    }
}

/// `namespace/name`, or `unknown` when the sender is not a configured workload.
pub fn workload_name(w: Option<&Workload>) -> String {
    w.map_or("unknown".into(), |w| format!("{}/{}", w.namespace, w.name))
}

/// How long a "this address is ours" answer is trusted: addresses come and go with pods.
const LOCAL_ADDR_TTL: Duration = Duration::from_secs(5);

/// This host's addresses as learnt by binding to them. Positive answers are kept for
/// [`LOCAL_ADDR_TTL`] (only real local addresses enter, so a peer cannot grow it); negative ones
/// are asked again each time. Saves a socket + bind + close on every HBONE CONNECT.
#[derive(Default)]
pub struct LocalAddrs {
    seen: std::sync::Mutex<HashMap<Ipv4Addr, Instant>>,
}

impl LocalAddrs {
    /// Loopback, or an address of this host.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        if ip.is_loopback() {
            return true;
        }
        let now = Instant::now();
        let lock = || self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if lock()
            .get(&ip)
            .is_some_and(|at| now.duration_since(*at) < LOCAL_ADDR_TTL)
        {
            return true;
        }
        let local = binds(ip);
        let mut seen = lock();
        if local {
            seen.insert(ip, now);
        } else {
            seen.remove(&ip);
        }
        local
    }
}

/// Whether a socket can bind to `ip` (it is an address of this host). No port is taken.
fn binds(ip: Ipv4Addr) -> bool {
    let Ok(sock) = TcpSocket::new_v4() else {
        return false;
    };
    bind_address_no_port(&sock).is_ok() && sock.bind(SocketAddr::new(ip.into(), 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_are_learnt_and_others_asked_again() {
        let addrs = LocalAddrs::default();
        assert!(addrs.contains(Ipv4Addr::LOCALHOST));
        // 192.0.2.0/24 is documentation space: never an address of this host.
        let foreign = Ipv4Addr::new(192, 0, 2, 1);
        assert!(!addrs.contains(foreign));
        assert!(!addrs.seen.lock().unwrap().contains_key(&foreign));
        // The wildcard binds on any host: learnt, then answered from the cache.
        assert!(addrs.contains(Ipv4Addr::UNSPECIFIED));
        assert!(addrs
            .seen
            .lock()
            .unwrap()
            .contains_key(&Ipv4Addr::UNSPECIFIED));
        assert!(addrs.contains(Ipv4Addr::UNSPECIFIED));
    }
}
