//! The proxy: accept loops for the outbound (:15001) and inbound plaintext (:15006) listeners,
//! and the relay both share: dial the destination from a marked socket (so neither mode
//! intercepts meshd's own connections), copy both ways with half-close, and write one access
//! log line per connection.

pub mod inbound;
pub mod outbound;

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{
    config::Workload,
    intercept::Interception,
    metrics::{BytesLabels, ConnLabels, Direction, Metrics},
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
    /// may reach.
    pub inbound: HashMap<u16, Arc<Workload>>,
}

/// Accepts forever, one task per connection. Accept errors (fd exhaustion) are logged and
/// retried after a pause rather than ending the loop.
pub async fn accept_loop<F, Fut>(listener: TcpListener, ctx: Arc<Context>, handle: F)
where
    F: Fn(TcpStream, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(handle(conn, ctx.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Dials `dst` from a socket carrying `mark`, optionally from `source`.
pub async fn dial(dst: SocketAddrV4, mark: u32, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    socket2::SockRef::from(&sock).set_mark(mark)?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst.into()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One accepted connection on its way to `dst`.
pub struct Forward {
    pub direction: Direction,
    pub app: TcpStream,
    pub dst: SocketAddrV4,
    pub source: Option<Ipv4Addr>,
    pub workload: Option<Arc<Workload>>,
}

impl Forward {
    /// Dials, relays until both sides are done, counts, and logs the access line.
    pub async fn run(mut self, ctx: &Context) {
        let started = Instant::now();
        let peer = self.app.peer_addr().ok();
        let labels = ConnLabels {
            direction: self.direction,
            mode: ctx.interception.mode().to_string(),
        };
        let mut upstream = match dial(self.dst, ctx.mark, self.source).await {
            Ok(s) => s,
            Err(e) => {
                ctx.metrics
                    .reject(self.direction, "upstream_connect_failed");
                tracing::warn!(direction = %self.direction, dst = %self.dst, error = %e,
                    "cannot reach the destination; resetting the application's connection");
                // Linger 0: the application sees a reset, as if it had dialled and failed itself.
                let _ = socket2::SockRef::from(&self.app).set_linger(Some(Duration::ZERO));
                return;
            }
        };
        let _ = self.app.set_nodelay(true);
        ctx.metrics.connections.get_or_create(&labels).inc();
        let active = ctx.metrics.active.get_or_create(&labels).clone();
        active.inc();
        let result = tokio::io::copy_bidirectional(&mut self.app, &mut upstream).await;
        active.dec();
        let (sent, received) = result.as_ref().map_or((0, 0), |r| *r);
        for (way, n) in [("sent", sent), ("received", received)] {
            let l = BytesLabels {
                direction: self.direction,
                way,
            };
            ctx.metrics.bytes.get_or_create(&l).inc_by(n);
        }
        tracing::info!(
            target: "access",
            direction = %self.direction,
            mode = %labels.mode,
            workload = %workload_name(self.workload.as_deref()),
            src = %peer.map_or("?".into(), |p| p.to_string()),
            dst = %self.dst,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            error = %result.err().map_or(String::new(), |e| e.to_string()),
            "connection"
        );
    }
}

/// `namespace/name`, or `unknown` when the sender is not a configured workload.
pub fn workload_name(w: Option<&Workload>) -> String {
    w.map_or("unknown".into(), |w| format!("{}/{}", w.namespace, w.name))
}
