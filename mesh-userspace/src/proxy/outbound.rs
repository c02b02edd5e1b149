//! Outbound (:15001): connections the interception steered away from where the application
//! sent them. Ask the interception where they were going and who sent them; destinations in
//! the mesh go through an HBONE tunnel carrying the sender's SVID, others follow the egress
//! setting (plaintext passthrough or refusal).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use tokio::net::TcpStream;

use super::{labels, relay_plaintext, reset, Access, Context, Scope};
use crate::{
    identity::SpiffeId,
    intercept::Origin,
    metrics::{
        istio::{Party, TcpLabels},
        Direction,
    },
    tunnel::{
        self,
        pool::{ClientIdentity, Opened, Pool, TunnelError},
    },
};

pub async fn handle(app: TcpStream, ctx: Arc<Context>, scope: Scope) {
    let origin = match ctx.interception.outbound_origin(&app, &scope) {
        Ok(o) => o,
        Err(e) => {
            ctx.metrics
                .reject(Direction::Outbound, "no_original_destination");
            crate::warn_throttled!("no_original_destination", error = %e, "outbound connection without an original destination: closed");
            return;
        }
    };
    let dst = origin.dst;
    if mesh_common::ports::ALL.contains(&dst.port()) && ctx.local_addrs.contains(*dst.ip()) {
        // Forwarding to ourselves would loop; interception never steers these ports.
        ctx.metrics.reject(Direction::Outbound, "loop");
        crate::warn_throttled!("loop", %dst, "outbound connection to meshd's own port: closed");
        return;
    }
    if ctx.in_mesh(*dst.ip()) {
        return through_tunnel(app, origin, &ctx, &scope).await;
    }
    let workload = origin.workload.as_deref();
    let decision = (ctx.egress_policies)
        .decide(ctx.egress, workload, dst, &app)
        .await;
    if let Err(by) = decision {
        ctx.metrics.reject(Direction::Outbound, "egress_denied");
        crate::warn_throttled!("egress_denied", %dst, workload = %super::workload_name(workload), by,
            "destination outside the mesh not allowed by egress policy: reset");
        reset(&app);
        return;
    }
    let source = workload.map_or_else(Party::unknown, |w| w.party.clone());
    let istio = TcpLabels::new("source", &source, &Party::unknown(), "tcp", false);
    let labels = labels(&ctx, Direction::Outbound, "plaintext");
    let mut access = Access::begin(&ctx, labels, dst, None, istio);
    access.workload = origin.workload;
    relay_plaintext(&ctx, app, access, None, &scope).await;
}

async fn through_tunnel(mut app: TcpStream, origin: Origin, ctx: &Context, scope: &Scope) {
    let tunnels = match &scope.pod {
        Some(pod) => pod.tunnels.as_ref().map(|(c, p)| (c, p)),
        None => ctx.tunnels.as_ref().and_then(|t| {
            let client = t.clients.get(&origin.workload.as_ref()?.name)?;
            Some((client, &t.pool))
        }),
    };
    let Some((client, pool)) = tunnels else {
        // No identity to speak for it: sending it in plaintext would break the mesh's promise.
        ctx.metrics.reject(Direction::Outbound, "no_identity");
        crate::warn_throttled!("no_identity", dst = %origin.dst, "sender is not a configured workload: no SVID to tunnel with; refused");
        reset(&app);
        return;
    };
    let service = ctx.registry.service(origin.dst);
    let candidates = candidates(ctx, origin.dst, service.as_deref());
    let (opened, (target, expected)) = open_first(pool, client, &candidates).await;
    let source = (origin.workload.as_deref()).map_or_else(Party::unknown, |w| w.party.clone());
    let destination = expected
        .as_ref()
        .map_or_else(Party::unknown, Party::from_principal);
    let mut istio = TcpLabels::new("source", &source, &destination, "tcp", true);
    if let Some(s) = &service {
        istio.set_service(&s.name, &s.namespace);
    }
    let labels = labels(ctx, Direction::Outbound, "hbone");
    let mut access = Access::begin(ctx, labels, origin.dst, app.peer_addr().ok(), istio);
    access.workload = origin.workload.clone();
    access.service = service.map(|s| (s, target));
    access.server_check = if expected.is_some() {
        "verified"
    } else {
        "unknown_destination_identity"
    };
    ctx.metrics.server_identity(access.server_check);
    let result = match opened {
        Ok(o) => {
            let _lease = o.lease;
            access.peer = Some(o.server);
            access.trace_id = Some(o.trace_id);
            let body = tunnel::pool::response_body(o.response);
            let counts = (&access.meter.request, &access.meter.response);
            tunnel::bridge(&mut app, o.send, body, counts).await
        }
        Err(e) => Err(std::io::Error::other(e)),
    };
    if let Err(e) = &result {
        // A broken tunnel resets the application: a clean FIN could pass a truncated response
        // off as complete.
        let tunnel_error = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<TunnelError>());
        let reason = tunnel_error.map_or("tunnel_stream_error", TunnelError::reason);
        ctx.metrics.reject(Direction::Outbound, reason);
        access.flags = tunnel_error.map_or("UC", TunnelError::response_flag);
        crate::warn_throttled!(reason, dst = %origin.dst, error = %e, reason,
            "tunnel failed; resetting the application's connection");
        reset(&app);
    }
    access.finish(ctx, result);
}

/// Where a connection to `dst` may go, in order, with the identity each must prove: a Service
/// address's endpoints in turn (one that cannot be reached or does not prove its identity is
/// skipped: nothing of the application's has been sent yet), else `dst` itself.
fn candidates(
    ctx: &Context,
    dst: SocketAddrV4,
    service: Option<&crate::registry::ServiceTarget>,
) -> Vec<(SocketAddrV4, Option<SpiffeId>)> {
    match service {
        Some(s) => (ctx.registry.endpoints_in_turn(s).into_iter())
            .map(|e| (e.addr, Some(e.spiffe_id)))
            .collect(),
        None => vec![(dst, ctx.registry.expected(dst))],
    }
}

/// Opens a stream to the first of `candidates` that answers as expected; with none, the error
/// of the last one tried (a Service without endpoints: `NoEndpoints`).
async fn open_first(
    pool: &Pool,
    client: &ClientIdentity,
    candidates: &[(SocketAddrV4, Option<SpiffeId>)],
) -> (
    Result<Opened, TunnelError>,
    (SocketAddrV4, Option<SpiffeId>),
) {
    let mut last = (
        Err(TunnelError::NoEndpoints),
        (SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), None),
    );
    for (target, expected) in candidates {
        let opened = pool
            .open(client, *target.ip(), *target, expected.clone())
            .await;
        let skip = matches!(
            &opened,
            Err(TunnelError::Connect(_) | TunnelError::Handshake(..))
        );
        if skip && candidates.len() > 1 {
            tracing::info!(%target, error = %opened.as_ref().err().map_or(String::new(), |e| e.to_string()),
                "service endpoint skipped: trying the next");
        }
        last = (opened, (*target, expected.clone()));
        if !skip {
            break;
        }
    }
    last
}
