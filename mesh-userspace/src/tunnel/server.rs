//! Inbound HBONE (:15008). Bytes that are not a TLS handshake are refused before rustls sees
//! them; the handshake requires a client SVID of our trust domain (TLS 1.3 only); then each
//! HTTP/2 CONNECT stream is checked — a local workload's address and port, never loopback,
//! another host or meshd's own ports — dialled from 127.0.0.6, answered 200, and bridged.
//! Every refusal has a reason that is logged and counted, and the listener keeps serving.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use mesh_common::{ports, DELIVERY_SOURCE_IP};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use crate::{
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

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Serves one :15008 listener: the node's (node SVID, host workloads) or a pod's (the pod's own
/// SVID, that pod only).
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, tls: Arc<ServerConfig>, scope: Scope) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let conn = connection(tcp, peer, ctx.clone(), acceptor.clone(), scope.clone());
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
    acceptor: TlsAcceptor,
    scope: Scope,
) {
    let refuse = |reason: &'static str, detail: String| {
        ctx.metrics.handshake(Direction::Inbound, reason);
        crate::warn_throttled!(reason, %peer, reason, detail, "HBONE connection refused");
    };
    let mut first = [0u8; 4];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {
            if let Some(reason) = classify_preface(&first[..n]) {
                return refuse(reason, format!("first bytes {:02x?}", &first[..n]));
            }
        }
        Ok(Ok(_)) => return,
        Ok(Err(e)) => return refuse("handshake_io_error", e.to_string()),
        Err(_) => return refuse("handshake_timeout", "no bytes".into()),
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refuse(handshake_failure_reason(&e), e.to_string()),
        Err(_) => return refuse("handshake_timeout", "handshake did not finish".into()),
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
    tracing::debug!(%peer, peer_id = %peer_id.id, serial = %peer_id.serial, "HBONE connection");
    let h2 = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .handshake::<_, Bytes>(tls)
        .await;
    let mut h2 = match h2 {
        Ok(h2) => h2,
        Err(e) => return refuse("h2_handshake_failed", e.to_string()),
    };
    // What policy calls the peer, made once per connection rather than per stream.
    let principal: Arc<str> = crate::policy::principal_of(&peer_id.id).into();
    let source = Arc::new(Party::from_principal(&peer_id.id));
    let who = Arc::new(peer_id);
    while let Some(stream) = h2.accept().await {
        match stream {
            Ok((request, respond)) => {
                let caller = Caller {
                    peer,
                    who: who.clone(),
                    principal: principal.clone(),
                    source: source.clone(),
                };
                tokio::spawn(stream_task(
                    request,
                    respond,
                    caller,
                    ctx.clone(),
                    scope.clone(),
                ));
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "HBONE connection ended");
                break;
            }
        }
    }
}

/// Who opened a stream: the connection's address and verified identity.
struct Caller {
    peer: SocketAddr,
    who: Arc<PeerIdentity>,
    /// `who` as policy names principals.
    principal: Arc<str>,
    /// `who` as telemetry names it.
    source: Arc<Party>,
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
    let target: SocketAddrV4 = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or((StatusCode::BAD_REQUEST, "bad_authority"))?;
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
    } = caller;
    let answer = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("static response");
        respond.send_response(response, true)
    };
    let (target, workload) = match check_target(&ctx, &scope, &request) {
        Ok(t) => t,
        Err((status, reason)) => {
            ctx.metrics.reject(Direction::Inbound, reason);
            crate::warn_throttled!(reason, %peer, peer_id = %who.id, uri = %request.uri(), reason, %status,
                "HBONE CONNECT refused");
            let _ = answer(&mut respond, status);
            return;
        }
    };
    let guard = Guard::new(
        ctx.clone(),
        workload.clone(),
        target,
        Some(principal),
        peer.ip(),
        source,
    );
    let Some(_permits) = guard.limits() else {
        let _ = answer(&mut respond, StatusCode::TOO_MANY_REQUESTS);
        return;
    };
    let refused = match guard.admit() {
        Admission::Dial => None,
        Admission::Refuse => {
            let _ = answer(&mut respond, StatusCode::FORBIDDEN);
            return;
        }
        Admission::DenyRequests(decision) => Some(decision),
    };
    let labels = labels(&ctx, Direction::Inbound, "hbone");
    let mut access = Access::begin(&ctx, labels, target, Some(peer), guard.istio());
    access.workload = Some(workload);
    access.peer = Some(who);
    if let Some(decision) = refused {
        let result = match respond.send_response(ok(), false) {
            Ok(send) => {
                let downstream = Downstream::Hbone(send, request.into_body());
                guard
                    .deny_requests(decision, downstream, &access.meter)
                    .await
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        return access.finish(&ctx, result);
    }
    let source = Some(DELIVERY_SOURCE_IP.into());
    let upstream = match dial(target, ctx.mark, source, scope.netns()).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics
                .reject(Direction::Inbound, "upstream_connect_failed");
            access.flags = "UF";
            let _ = answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            access.finish(&ctx, Err(e));
            return;
        }
    };
    let result = match respond.send_response(ok(), false) {
        Ok(send) => {
            let downstream = Downstream::Hbone(send, request.into_body());
            guard.carry(downstream, upstream, &access.meter).await
        }
        Err(e) => Err(std::io::Error::other(e)),
    };
    access.finish(&ctx, result);
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
