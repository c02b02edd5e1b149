//! The HBONE client: pooled mTLS + HTTP/2 connections per (source identity, peer node), one
//! CONNECT stream per application connection. Reusing a connection is what makes a new
//! application connection cheap: no handshake, one HEADERS frame. A connection carries as many
//! streams at once as its peer allows (`max_concurrent_streams`); beyond that the next one is
//! opened beside it, so thousands of long-lived application connections never wait for a free
//! stream. A pooled connection made with a certificate that has since rotated takes no new
//! streams (its open streams finish on it), so the peer sees the new certificate from the next
//! connection on. Each CONNECT carries, besides `baggage`, `Forwarded: for=` the address the
//! application's connection comes from (the node's or the pod's: the tunnel's own source, which
//! is the address the application would have used on that route) and a fresh `traceparent`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use h2::{
    client::{ResponseFuture, SendRequest},
    RecvStream, SendStream,
};
use rustls::{pki_types::ServerName, ClientConfig};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use super::{traceparent::TraceParent, CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use crate::{
    identity::{SpiffeId, Svid},
    inpod::netns::Netns,
    metrics::{Direction, Metrics},
    tls::{
        config::{client_config, handshake_failure_reason},
        verify::{identity_of, PeerIdentity, TrustBundle},
    },
};

/// A local identity able to open tunnels.
pub struct ClientIdentity {
    pub id: SpiffeId,
    pub svid: watch::Receiver<Arc<Svid>>,
    bundle: Arc<TrustBundle>,
    /// Client configurations by the server identity they insist on (`None`: any SVID of the
    /// trust domain).
    configs: Mutex<HashMap<Option<SpiffeId>, Arc<ClientConfig>>>,
    /// The `baggage` its CONNECTs carry: the sending workload's names ([`super::baggage`]).
    baggage: Option<http::HeaderValue>,
}

impl ClientIdentity {
    pub fn new(
        id: SpiffeId,
        svid: watch::Receiver<Arc<Svid>>,
        bundle: Arc<TrustBundle>,
    ) -> ClientIdentity {
        ClientIdentity {
            id,
            svid,
            bundle,
            configs: Mutex::default(),
            baggage: None,
        }
    }

    /// Its CONNECTs name `workload` as their source.
    pub fn for_workload(mut self, workload: &crate::config::Workload) -> ClientIdentity {
        self.baggage = super::baggage::of(workload);
        self
    }

    /// The configuration whose verifier accepts only `expected` (or any SVID of the trust
    /// domain when `None`).
    fn config(&self, expected: &Option<SpiffeId>) -> Result<Arc<ClientConfig>, TunnelError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(expected) {
            return Ok(c.clone());
        }
        let config = client_config(self.bundle.clone(), self.svid.clone(), expected.clone())
            .map_err(|e| TunnelError::Config(format!("{e:#}")))?;
        configs.insert(expected.clone(), config.clone());
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the peer's :15008: {0}")]
    Connect(std::io::Error),
    #[error("mTLS handshake with the peer failed ({0}): {1}")]
    Handshake(&'static str, std::io::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("the peer refused the CONNECT: {0}")]
    Refused(http::StatusCode),
    #[error("client TLS configuration: {0}")]
    Config(String),
    #[error("the Service has no endpoints")]
    NoEndpoints,
}

impl TunnelError {
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Connect(_) => "tunnel_connect_failed",
            TunnelError::Handshake("unexpected_identity", _) => "unexpected_identity",
            TunnelError::Handshake(..) => "tunnel_handshake_failed",
            TunnelError::Config(_) => "tunnel_config",
            TunnelError::H2(_) => "tunnel_h2_error",
            TunnelError::Refused(_) => "tunnel_refused",
            TunnelError::NoEndpoints => "no_endpoints",
        }
    }

    /// Envoy's response flag for it: `UF` the peer could not be reached or verified, `RBAC`
    /// its policy refused the stream (403; Istio's ztunnel answers 401), `UO` a limit did
    /// (429), `UC` the stream broke.
    pub fn response_flag(&self) -> &'static str {
        use http::StatusCode as S;
        match self {
            TunnelError::Connect(_) | TunnelError::Handshake(..) | TunnelError::Config(_) => "UF",
            TunnelError::Refused(S::FORBIDDEN | S::UNAUTHORIZED) => "RBAC",
            TunnelError::Refused(S::TOO_MANY_REQUESTS) => "UO",
            TunnelError::Refused(_) | TunnelError::NoEndpoints => "NR",
            TunnelError::H2(_) => "UC",
        }
    }
}

struct Pooled {
    send: SendRequest<Bytes>,
    /// Serial of the client certificate the connection was made with.
    serial: String,
    /// Who answered: the server's verified SVID.
    server: Arc<PeerIdentity>,
    /// Streams open on it now (each [`StreamLease`] counts one).
    streams: Arc<AtomicUsize>,
    /// Its streams' `Forwarded` value: the connection's own source address.
    forwarded: Option<http::HeaderValue>,
}

impl Pooled {
    /// Whether the peer lets it carry one more stream now.
    fn has_room(&self) -> bool {
        self.streams.load(Relaxed) < self.send.current_max_send_streams()
    }

    fn lease(&self) -> Leased {
        self.streams.fetch_add(1, Relaxed);
        Leased {
            send: self.send.clone(),
            server: self.server.clone(),
            lease: StreamLease(self.streams.clone()),
            forwarded: self.forwarded.clone(),
        }
    }
}

/// A place for one stream on a pooled connection.
struct Leased {
    send: SendRequest<Bytes>,
    server: Arc<PeerIdentity>,
    lease: StreamLease,
    forwarded: Option<http::HeaderValue>,
}

/// One stream's place on its connection, given back when dropped (the stream has ended).
pub struct StreamLease(Arc<AtomicUsize>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// Streams a new connection may carry before the peer's SETTINGS say how many it allows.
const INITIAL_MAX_STREAMS: usize = 100;

/// A pooled connection is shared only by streams of the same source identity, to the same peer
/// address, insisting on the same server identity.
type SlotKey = (SpiffeId, Ipv4Addr, Option<SpiffeId>);

/// An open CONNECT stream and who serves it.
pub struct Opened {
    pub send: SendStream<Bytes>,
    pub response: ResponseFuture,
    pub server: Arc<PeerIdentity>,
    /// Held for as long as the stream is used.
    pub lease: StreamLease,
    /// The trace id its `traceparent` carries.
    pub trace_id: super::traceparent::TraceId,
}

pub struct Pool {
    slots: Mutex<HashMap<SlotKey, Slot>>,
    mark: u32,
    metrics: Arc<Metrics>,
    /// Tunnels of a pod leave from inside its network namespace (source = the pod's IP).
    netns: Option<Arc<Netns>>,
}

impl Pool {
    pub fn new(mark: u32, metrics: Arc<Metrics>, netns: Option<Arc<Netns>>) -> Pool {
        Pool {
            slots: Mutex::new(HashMap::new()),
            mark,
            metrics,
            netns,
        }
    }

    /// Opens a CONNECT stream to `target` through `node`'s :15008 as `who`; the server must
    /// present `expected` when it is known.
    pub async fn open(
        &self,
        who: &ClientIdentity,
        node: Ipv4Addr,
        target: SocketAddrV4,
        expected: Option<SpiffeId>,
    ) -> Result<Opened, TunnelError> {
        let slot = self.slot((who.id.clone(), node, expected.clone()));
        let mut retried = false;
        loop {
            let leased = self.checkout(&slot, who, node, &expected).await?;
            let streams = leased.lease.0.clone();
            let trace = TraceParent::random();
            let headers = Headers {
                baggage: who.baggage.as_ref(),
                forwarded: leased.forwarded.as_ref(),
                traceparent: trace.header(),
            };
            match connect_stream(leased.send, target, headers)
                .await
                .map(|(send, response)| Opened {
                    send,
                    response,
                    server: leased.server,
                    lease: leased.lease,
                    trace_id: trace.trace_id,
                }) {
                // The pooled connection died (peer restarted, GOAWAY, idle close): one fresh
                // attempt on another.
                Err(TunnelError::H2(e)) if !retried => {
                    tracing::debug!(error = %e, %node, "pooled HBONE connection unusable; reconnecting");
                    (slot.lock().await).retain(|p| !Arc::ptr_eq(&p.streams, &streams));
                    retried = true;
                }
                other => return other,
            }
        }
    }

    fn slot(&self, key: SlotKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key).or_default().clone()
    }

    /// A pooled connection with room for a stream, or a new one if none has room or their
    /// certificate rotated. The slot stays locked while connecting, so concurrent first requests
    /// share one handshake.
    async fn checkout(
        &self,
        slot: &Slot,
        who: &ClientIdentity,
        node: Ipv4Addr,
        expected: &Option<SpiffeId>,
    ) -> Result<Leased, TunnelError> {
        let mut pooled = slot.lock().await;
        let serial = who.svid.borrow().serial.clone();
        // Rotated-out connections take no new streams; idle extras beyond the first go.
        pooled.retain(|p| p.serial == serial);
        let mut kept_idle = false;
        pooled.retain(|p| {
            let busy = p.streams.load(Relaxed) > 0;
            let keep = busy || !kept_idle;
            kept_idle |= !busy;
            keep
        });
        if let Some(p) = pooled.iter().find(|p| p.has_room()) {
            return Ok(p.lease());
        }
        let (send, server, source) = self.connect(who, node, expected).await?;
        let p = Pooled {
            send,
            serial,
            server,
            streams: Arc::default(),
            forwarded: source.map(super::forwarded::header),
        };
        let leased = p.lease();
        pooled.push(p);
        Ok(leased)
    }

    async fn connect(
        &self,
        who: &ClientIdentity,
        node: Ipv4Addr,
        expected: &Option<SpiffeId>,
    ) -> Result<
        (
            SendRequest<Bytes>,
            Arc<PeerIdentity>,
            Option<std::net::IpAddr>,
        ),
        TunnelError,
    > {
        let addr = SocketAddrV4::new(node, mesh_common::ports::INBOUND_HBONE);
        let tcp = crate::proxy::dial(addr, self.mark, None, self.netns.as_deref())
            .await
            .map_err(TunnelError::Connect)?;
        let source = tcp.local_addr().ok().map(|a| a.ip());
        let connector = TlsConnector::from(who.config(expected)?);
        let tls = match connector
            .connect(ServerName::IpAddress(node.into()), tcp)
            .await
        {
            Ok(tls) => tls,
            Err(e) => {
                let reason = handshake_failure_reason(&e);
                self.metrics.handshake(Direction::Outbound, reason);
                return Err(TunnelError::Handshake(reason, e));
            }
        };
        self.metrics.handshake(Direction::Outbound, "ok");
        let server = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| identity_of(leaf).ok())
            .ok_or_else(|| TunnelError::Config("verified server without a readable SVID".into()))?;
        let (send, conn) = h2::client::Builder::new()
            // Until the peer's SETTINGS arrive, assume the least RFC 9113 recommends peers allow
            // (h2's default is unlimited): a burst of new streams on a fresh connection would
            // otherwise pass the peer's limit and be refused. The SETTINGS raise it.
            .initial_max_send_streams(INITIAL_MAX_STREAMS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(tls)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %node, "HBONE connection ended");
            }
        });
        Ok((send, Arc::new(server), source))
    }
}

/// The headers of one CONNECT besides its authority.
struct Headers<'a> {
    baggage: Option<&'a http::HeaderValue>,
    forwarded: Option<&'a http::HeaderValue>,
    traceparent: http::HeaderValue,
}

/// Sends the CONNECT and returns at once: the application's bytes may follow the HEADERS
/// without waiting a round trip for the 200 (they travel inside the mTLS connection either way;
/// a refused stream's bytes are discarded by the peer). See [`response_body`].
async fn connect_stream(
    send: SendRequest<Bytes>,
    target: SocketAddrV4,
    headers: Headers<'_>,
) -> Result<(SendStream<Bytes>, ResponseFuture), TunnelError> {
    let mut send = send.ready().await?;
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .header("traceparent", headers.traceparent);
    if let Some(b) = headers.baggage {
        request = request.header("baggage", b);
    }
    if let Some(f) = headers.forwarded {
        request = request.header(http::header::FORWARDED, f);
    }
    let request = request
        .body(())
        .expect("an ip:port authority is a valid URI");
    let (response, stream) = send.send_request(request, false)?;
    Ok((stream, response))
}

/// The peer's answer to a CONNECT: its body stream on 200, else the refusal as an I/O error
/// carrying the [`TunnelError`].
pub async fn response_body(response: ResponseFuture) -> std::io::Result<RecvStream> {
    let response = response
        .await
        .map_err(|e| std::io::Error::other(TunnelError::H2(e)))?;
    if response.status() != http::StatusCode::OK {
        return Err(std::io::Error::other(TunnelError::Refused(
            response.status(),
        )));
    }
    Ok(response.into_body())
}

#[cfg(test)]
mod tests {
    use super::TunnelError;
    use http::StatusCode;

    #[test]
    fn refusals_map_to_envoy_flags() {
        for (status, flag) in [
            (StatusCode::FORBIDDEN, "RBAC"),
            (StatusCode::UNAUTHORIZED, "RBAC"), // ztunnel's policy denial
            (StatusCode::TOO_MANY_REQUESTS, "UO"),
            (StatusCode::NOT_IMPLEMENTED, "NR"),
            (StatusCode::SERVICE_UNAVAILABLE, "NR"),
        ] {
            assert_eq!(
                TunnelError::Refused(status).response_flag(),
                flag,
                "{status}"
            );
        }
    }
}
