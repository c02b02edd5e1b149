//! Inbound plaintext (:15006): new connections from outside to a workload port, captured by
//! sk_lookup (ebpf) or PREROUTING REDIRECT (iptables). PeerAuthentication decides: STRICT
//! refuses them (mTLS peers come through :15008), PERMISSIVE forwards them with a warning.
//! Deliveries come from 127.0.0.6, which neither capture path takes again.

use std::sync::Arc;

use mesh_common::DELIVERY_SOURCE_IP;
use tokio::net::TcpStream;

use super::{
    authz::{Admission, Downstream, Guard},
    labels, relay_plaintext, reset, Access, Context, Scope,
};
use crate::{
    config::MtlsMode,
    metrics::{istio::Party, Direction},
};

pub async fn handle(app: TcpStream, ctx: Arc<Context>, scope: Scope) {
    let dst = match ctx.interception.inbound_dst(&app) {
        Ok(d) => d,
        Err(e) => {
            ctx.metrics
                .reject(Direction::Inbound, "no_original_destination");
            crate::warn_throttled!("no_original_destination", error = %e, "inbound connection without a destination: closed");
            return;
        }
    };
    let Some(workload) = ctx.inbound_workload(&scope, dst) else {
        // Someone dialled :15006 itself, or a port no workload serves.
        ctx.metrics
            .reject(Direction::Inbound, "not_a_workload_port");
        crate::warn_throttled!("not_a_workload_port", %dst, "inbound connection to a port no local workload serves: closed");
        return;
    };
    let src = app.peer_addr().ok();
    match ctx.peer_auth.mode(&workload.namespace, dst.port()) {
        MtlsMode::Strict | MtlsMode::Unset => {
            ctx.metrics
                .reject(Direction::Inbound, "plaintext_refused_strict");
            crate::warn_throttled!("strict", %dst, src = ?src, workload = %workload.name,
                "plaintext connection refused: PeerAuthentication is STRICT");
            return;
        }
        MtlsMode::Permissive => {
            crate::warn_throttled!("permissive", %dst, src = ?src, workload = %workload.name,
                "plaintext connection forwarded: PeerAuthentication is PERMISSIVE");
        }
        MtlsMode::Disable => {}
    }
    let source_ip = src.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |s| s.ip());
    let source = Arc::new(Party::unknown());
    let guard = Guard::new(ctx.clone(), workload.clone(), dst, None, source_ip, source);
    let Some(_permits) = guard.limits() else {
        reset(&app);
        return;
    };
    let admission = guard.admit();
    if let Admission::Refuse = admission {
        reset(&app);
        return;
    }
    let labels = labels(&ctx, Direction::Inbound, "plaintext");
    let mut access = Access::begin(&ctx, labels, dst, src, guard.istio());
    access.workload = Some(workload);
    if let Admission::DenyRequests(decision) = admission {
        let downstream = Downstream::Tcp(app);
        let result = guard
            .deny_requests(decision, downstream, &access.meter)
            .await;
        return access.finish(&ctx, result);
    }
    let delivery = Some((DELIVERY_SOURCE_IP.into(), guard));
    relay_plaintext(&ctx, app, access, delivery, &scope).await;
}
