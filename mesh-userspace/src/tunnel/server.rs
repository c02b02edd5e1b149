//! Inbound HBONE (:15008). Bytes that are not a TLS handshake are refused before rustls sees
//! them; the handshake requires a client SVID of our trust domain (TLS 1.3 only); then each
//! HTTP/2 CONNECT stream is checked — a local workload's IPv4 address and port, never loopback,
//! another host or meshd's own ports; an IPv6 or hostname authority is refused as something
//! meshd cannot deliver (501) — dialled from 127.0.0.6, answered 200, and bridged.
//! Every refusal has a reason that is logged and counted, and the listener keeps serving. The
//! peer's `Forwarded: for=` and `traceparent` are read strictly and recorded in the access
//! line only (malformed: ignored and counted).

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use mesh_common::{ports, DELIVERY_SOURCE_IP};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use super::{
    authority::{self, Target},
    forwarded,
    limits::{Handshakes, Slot},
    traceparent::{TraceId, TraceParent},
    CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW,
};
use crate::{
    handover::Phase,
    metrics::{istio::Party, Direction},
    proxy::{
        authz::{Admission, Downstream, Guard},
        dial, labels, Access, Context, Scope,
    },
    tls::{
        config::handshake_failure_reason,
        verify::{identity_of, PeerIdentity},
    },
};

/// Serves one :15008 listener: the node's (node SVID, host workloads) or a pod's (the pod's own
/// SVID, that pod only). At most `hbone.max_pending_handshakes` connections are in their TLS
/// handshake at once: a new one evicts the oldest (closed and counted, `handshake_evicted`).
pub async fn serve(
    listener: Arc<TcpListener>,
    ctx: Arc<Context>,
    tls: Arc<ServerConfig>,
    scope: Scope,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Handshakes::new(ctx.hbone.max_pending_handshakes);
    let draining = ctx.sockets.clone();
    let draining = draining.reached(Phase::Draining);
    tokio::pin!(draining);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut draining => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let (slot, _) = handshakes.enter();
                let _ = tcp.set_nodelay(true);
                let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
                let conn = connection(tcp, peer, ctx, (acceptor, slot), scope.clone());
                tokio::spawn(conn);
            }
            Err(e) => {
                crate::warn_throttled!("accept", error = %e, "accept on :15008 failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the first bytes say, before any TLS parsing: a TLS handshake record starts with 0x16.
fn classify_preface(bytes: &[u8]) -> Option<&'static str> {
    const HTTP: [&[u8]; 6] = [b"GET ", b"POST", b"PUT ", b"HEAD", b"CONN", b"PRI "];
    match bytes.first() {
        Some(0x16) => None,
        _ if HTTP.iter().any(|m| bytes.starts_with(m)) => Some("plaintext_http"),
        _ => Some("not_tls"),
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    (acceptor, mut slot): (TlsAcceptor, Slot),
    scope: Scope,
) {
    let limits = ctx.hbone;
    let timeout = limits.handshake_timeout;
    let refuse = |reason: &'static str, detail: String| {
        ctx.metrics.handshake(Direction::Inbound, reason);
        crate::warn_throttled!(reason, %peer, reason, detail, "HBONE connection refused");
    };
    let handshake = tokio::select! {
        tls = tls_handshake(tcp, &acceptor, timeout) => tls,
        _ = &mut slot.evicted => Err(("handshake_evicted", "a newer connection took its place".into())),
    };
    let tls = match handshake {
        Ok(Some(tls)) => tls,
        Ok(None) => return,
        Err((reason, detail)) => return refuse(reason, detail),
    };
    let peer_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| identity_of(leaf).ok());
    let Some(peer_id) = peer_id else {
        return refuse(
            "no_client_cert",
            "verified handshake without a readable SVID".into(),
        );
    };
    ctx.metrics.handshake(Direction::Inbound, "ok");
    drop(slot);
    tracing::debug!(%peer, peer_id = %peer_id.id, serial = %peer_id.serial, "HBONE connection");
    let h2 = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .handshake::<_, Bytes>(tls);
    let h2 = match tokio::time::timeout(timeout, h2).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => return refuse("h2_handshake_failed", e.to_string()),
        Err(_) => return refuse("handshake_timeout", "no HTTP/2 preface".into()),
    };
    // What policy calls the peer, made once per connection rather than per stream.
    let principal: Arc<str> = crate::policy::principal_of(&peer_id.id).into();
    let source = Arc::new(Party::from_principal(&peer_id.id));
    let caller = Caller {
        peer,
        who: Arc::new(peer_id),
        principal,
        source,
        streams: Arc::default(),
    };
    serve_streams(h2, caller, &ctx, &scope).await;
}

/// The TLS handshake, after a look at the first bytes (not TLS: refused before rustls sees
/// them); `None` when the peer closed without a byte.
async fn tls_handshake(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    timeout: Duration,
) -> Result<Option<TlsStream<TcpStream>>, (&'static str, String)> {
    let mut first = [0u8; 4];
    match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {
            if let Some(reason) = classify_preface(&first[..n]) {
                return Err((reason, format!("first bytes {:02x?}", &first[..n])));
            }
        }
        Ok(Ok(_)) => return Ok(None),
        Ok(Err(e)) => return Err(("handshake_io_error", e.to_string())),
        Err(_) => return Err(("handshake_timeout", "no bytes".into())),
    }
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(Some(tls)),
        Ok(Err(e)) => Err((handshake_failure_reason(&e), e.to_string())),
        Err(_) => Err(("handshake_timeout", "handshake did not finish".into())),
    }
}

/// Per connection: streams accepted, those the peer reset before meshd answered them, and the
/// last `baggage` seen with the caller it named (one connection usually carries one workload).
#[derive(Default)]
struct StreamCounts {
    accepted: AtomicU64,
    premature_resets: AtomicU64,
    baggage: std::sync::Mutex<Option<(http::HeaderValue, Arc<Party>)>>,
}

/// The caller of one stream: named by its `baggage` when that checks out against the verified
/// certificate ([`super::baggage`]), else by the certificate alone.
fn source_of(
    request: &Request<h2::RecvStream>,
    verified: &Arc<Party>,
    counts: &StreamCounts,
    ctx: &Context,
) -> Arc<Party> {
    let Some(baggage) = request.headers().get("baggage") else {
        return verified.clone();
    };
    let mut last = counts.baggage.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, party)) = last.as_ref().filter(|(v, _)| v == baggage) {
        return party.clone();
    }
    let named = ctx.peer_names.party(baggage, verified);
    let party = named.map_or_else(|| verified.clone(), Arc::new);
    *last = Some((baggage.clone(), party.clone()));
    party
}

/// A connection has abused HTTP/2 reset (CVE-2023-44487) once it opened this many streams and
/// reset more than half of them before their answer.
const PREMATURE_RESET_MIN_STREAMS: u64 = 100;

/// Accepts CONNECT streams until the peer goes, a limit ends the connection (counted as an
/// inbound rejection `hbone_<h2 reason>`), the peer resets most of its streams before their
/// answer (GOAWAY ENHANCE_YOUR_CALM, `hbone_rapid_reset`), or no stream has been open for
/// `idle_timeout` (GOAWAY; streams in flight finish).
async fn serve_streams(
    mut h2: h2::server::Connection<TlsStream<TcpStream>, Bytes>,
    caller: Caller,
    ctx: &Arc<Context>,
    scope: &Scope,
) {
    let idle = ctx.hbone.idle_timeout;
    let period = idle.min(Duration::from_secs(1));
    let check = tokio::time::sleep(period);
    tokio::pin!(check);
    let mut idle_since = Some(tokio::time::Instant::now());
    let mut closing = false;
    let counts = caller.streams.clone();
    let draining = ctx.sockets.reached(Phase::Draining);
    tokio::pin!(draining);
    loop {
        let stream = tokio::select! {
            stream = h2.accept() => stream,
            // meshd stops: GOAWAY, so the peer opens its next streams to the successor; the
            // streams in flight finish (up to the drain timeout).
            _ = &mut draining, if !closing => {
                h2.graceful_shutdown();
                closing = true;
                continue;
            }
            _ = &mut check, if !closing => {
                let now = tokio::time::Instant::now();
                check.as_mut().reset(now + period);
                let since = *idle_since.get_or_insert(now);
                // Every stream task holds a clone of the counts: one left (here) means none runs.
                if Arc::strong_count(&counts) > 2 {
                    idle_since = None;
                } else if now.duration_since(since) >= idle {
                    tracing::debug!(peer = %caller.peer, "HBONE connection idle: closing");
                    h2.graceful_shutdown();
                    closing = true;
                }
                continue;
            }
        };
        match stream {
            Some(Ok((request, respond))) => {
                idle_since = None;
                let accepted = counts.accepted.fetch_add(1, Relaxed) + 1;
                let premature = counts.premature_resets.load(Relaxed);
                if !closing && accepted >= PREMATURE_RESET_MIN_STREAMS && premature * 2 > accepted {
                    ctx.metrics.reject(Direction::Inbound, "hbone_rapid_reset");
                    crate::warn_throttled!("rapid_reset", peer = %caller.peer,
                        peer_id = %caller.who.id, accepted, premature,
                        "HBONE connection closed: the peer resets most streams before their answer");
                    h2.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    closing = true;
                }
                let (caller, ctx, scope) = (caller.clone(), ctx.clone(), scope.clone());
                tokio::spawn(stream_task(request, respond, caller, ctx, scope));
            }
            Some(Err(e)) => {
                let reason = h2_reason(&e);
                ctx.metrics.reject(Direction::Inbound, reason);
                crate::warn_throttled!(reason, peer = %caller.peer, peer_id = %caller.who.id,
                    error = %e, "HBONE connection ended by an HTTP/2 error");
                break;
            }
            None => break,
        }
    }
}

/// Why HTTP/2 ended a connection, as a bounded label.
fn h2_reason(e: &h2::Error) -> &'static str {
    match e.reason() {
        _ if e.is_io() => "hbone_io_error",
        Some(h2::Reason::ENHANCE_YOUR_CALM) => "hbone_enhance_your_calm",
        Some(h2::Reason::PROTOCOL_ERROR) => "hbone_protocol_error",
        Some(h2::Reason::FRAME_SIZE_ERROR) => "hbone_frame_size_error",
        Some(h2::Reason::COMPRESSION_ERROR) => "hbone_compression_error",
        Some(h2::Reason::FLOW_CONTROL_ERROR) => "hbone_flow_control_error",
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL) => "hbone_peer_closed",
        _ => "hbone_h2_error",
    }
}

/// Who opened a stream: the connection's address and verified identity.
#[derive(Clone)]
struct Caller {
    peer: SocketAddr,
    who: Arc<PeerIdentity>,
    /// `who` as policy names principals.
    principal: Arc<str>,
    /// `who` as telemetry names it.
    source: Arc<Party>,
    /// The connection's stream counts (every stream task holds a clone).
    streams: Arc<StreamCounts>,
}

/// Why a CONNECT is refused, with its status.
fn check_target(
    ctx: &Context,
    scope: &Scope,
    request: &Request<h2::RecvStream>,
) -> Result<(SocketAddrV4, Arc<crate::config::Workload>), (StatusCode, &'static str)> {
    if request.method() != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "not_connect"));
    }
    let target = match authority::target(request.uri()) {
        Target::V4(target) => target,
        // Well-formed, but nothing meshd can deliver to (see `authority`).
        Target::V6(_) => return Err((StatusCode::NOT_IMPLEMENTED, "authority_ipv6")),
        Target::Hostname => return Err((StatusCode::NOT_IMPLEMENTED, "authority_hostname")),
        Target::Invalid => return Err((StatusCode::BAD_REQUEST, "bad_authority")),
    };
    if ports::ALL.contains(&target.port()) {
        return Err((StatusCode::FORBIDDEN, "meshd_port"));
    }
    let ip = *target.ip();
    let refused = (StatusCode::FORBIDDEN, "not_local_workload");
    let workload = ctx.inbound_workload(scope, target).ok_or(refused)?;
    let local = scope.pod.is_some() || ctx.local_addrs.contains(ip);
    if ip.is_loopback() || ip.is_unspecified() || !local {
        return Err(refused);
    }
    Ok((target, workload))
}

/// The address a CONNECT request names: its authority, exactly `a.b.c.d:port` (no name, no
/// IPv6, no user info). Untrusted input: fuzzed by `fuzz/fuzz_targets/hbone_authority.rs`.
pub fn connect_target(uri: &http::Uri) -> Option<SocketAddrV4> {
    match authority::target(uri) {
        Target::V4(target) => Some(target),
        _ => None,
    }
}

/// What the peer claims about a stream: the original source (`Forwarded: for=`) and the trace
/// id (`traceparent`). A header that is repeated where it must not be, malformed or too long is
/// ignored and counted (`meshd_hbone_headers_ignored_total{header,reason}`).
fn claims(headers: &http::HeaderMap, ctx: &Context) -> (Option<std::net::IpAddr>, Option<TraceId>) {
    fn ignored<T>(ctx: &Context, header: &'static str, why: super::Ignored) -> Option<T> {
        ctx.metrics.header_ignored(header, why.reason());
        None
    }
    // Several `Forwarded` fields are one list: its first element is in the first field.
    let source = headers
        .get(http::header::FORWARDED)
        .and_then(|v| forwarded::source(v).unwrap_or_else(|why| ignored(ctx, "forwarded", why)));
    let mut traceparents = headers.get_all("traceparent").iter();
    let trace = match (traceparents.next(), traceparents.next()) {
        (None, _) => None,
        (Some(v), None) => TraceParent::parse(v)
            .map_or_else(|why| ignored(ctx, "traceparent", why), |t| Some(t.trace_id)),
        (Some(_), Some(_)) => ignored(ctx, "traceparent", super::Ignored::Malformed),
    };
    (source, trace)
}

/// Answers a CONNECT with `status` and ends the stream.
fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("static response");
    let _ = respond.send_response(response, true);
}

/// One CONNECT: its target checked, then limits and the connection-level policy decision;
/// refused with its status, or carried by [`deliver`].
async fn stream_task(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    caller: Caller,
    ctx: Arc<Context>,
    scope: Scope,
) {
    let Caller {
        peer,
        who,
        principal,
        source,
        streams,
    } = caller;
    let (target, workload) = match check_target(&ctx, &scope, &request) {
        Ok(t) => t,
        Err((status, reason)) => {
            ctx.metrics.reject(Direction::Inbound, reason);
            crate::warn_throttled!(reason, %peer, peer_id = %who.id, uri = %request.uri(), reason, %status,
                "HBONE CONNECT refused");
            return answer(&mut respond, status);
        }
    };
    // A stream its caller already reset (HTTP/2 rapid reset) is not worth a dial.
    if reset_by_caller(&mut respond, &ctx, &streams) {
        return;
    }
    let source = source_of(&request, &source, &streams, &ctx);
    let guard = Guard::new(
        ctx.clone(),
        workload.clone(),
        target,
        Some(principal),
        peer.ip(),
        source,
    );
    let Some(_permits) = guard.limits() else {
        return answer(&mut respond, StatusCode::TOO_MANY_REQUESTS);
    };
    let refused = match guard.admit() {
        Admission::Dial => None,
        Admission::Refuse => return answer(&mut respond, StatusCode::FORBIDDEN),
        Admission::DenyRequests(decision) => Some(decision),
    };
    let labels = labels(&ctx, Direction::Inbound, "hbone");
    let mut access = Access::begin(&ctx, labels, target, Some(peer), guard.istio());
    access.workload = Some(workload);
    access.peer = Some(who);
    (access.forwarded_for, access.trace_id) = claims(request.headers(), &ctx);
    let stream = (request, respond);
    let result = deliver(
        stream,
        (guard, refused),
        &mut access,
        (&ctx, &scope, &streams),
    )
    .await;
    access.finish(&ctx, result);
}

/// An admitted CONNECT: on a port whose requests policy refuses, answered 200 and its requests
/// denied without a dial; otherwise the workload dialled from 127.0.0.6 (503 when it cannot be
/// reached), 200, and the stream carried as policy allows.
async fn deliver(
    (request, mut respond): (Request<h2::RecvStream>, SendResponse<Bytes>),
    (guard, refused): (Guard, Option<crate::policy::Decision>),
    access: &mut Access,
    (ctx, scope, streams): (&Context, &Scope, &StreamCounts),
) -> std::io::Result<(u64, u64)> {
    if let Some(decision) = refused {
        let send = respond
            .send_response(ok(), false)
            .map_err(std::io::Error::other)?;
        let downstream = Downstream::Hbone(send, request.into_body());
        return guard
            .deny_requests(decision, downstream, &access.meter)
            .await;
    }
    let source = Some(DELIVERY_SOURCE_IP.into());
    let upstream = match dial(access.dst, ctx.mark, source, scope.netns()).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics
                .reject(Direction::Inbound, "upstream_connect_failed");
            access.flags = "UF";
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return Err(e);
        }
    };
    if reset_by_caller(&mut respond, ctx, streams) {
        return Err(std::io::Error::other("reset by the caller"));
    }
    match respond.send_response(ok(), false) {
        Ok(send) => {
            let downstream = Downstream::Hbone(send, request.into_body());
            guard.carry(downstream, upstream, &access.meter).await
        }
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// Whether the caller has reset the stream before meshd answered it (counted per connection:
/// a peer that does this to most streams is ended, see [`serve_streams`]).
fn reset_by_caller(
    respond: &mut SendResponse<Bytes>,
    ctx: &Context,
    counts: &StreamCounts,
) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let reset = respond.poll_reset(&mut cx).is_ready();
    if reset {
        ctx.metrics
            .reject(Direction::Inbound, "reset_before_answer");
        counts.premature_resets.fetch_add(1, Relaxed);
    }
    reset
}

/// The answer to a CONNECT that is carried.
fn ok() -> Response<()> {
    Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("static response")
}

#[cfg(test)]
mod tests {
    use super::classify_preface;

    #[test]
    fn non_tls_prefaces_are_told_apart() {
        assert_eq!(classify_preface(&[0x16, 3, 1, 0]), None);
        assert_eq!(classify_preface(b"GET "), Some("plaintext_http"));
        assert_eq!(classify_preface(b"PRI "), Some("plaintext_http"));
        assert_eq!(classify_preface(&[0xde, 0xad, 0xbe, 0xef]), Some("not_tls"));
    }
}
