//! Inbound plaintext (:15006): new connections from outside to a workload port, captured by
//! sk_lookup (ebpf) or PREROUTING REDIRECT (iptables). Delivered to the workload from
//! 127.0.0.6, which neither capture path takes again. (mTLS peers arrive on :15008 instead.)

use std::sync::Arc;

use mesh_common::DELIVERY_SOURCE_IP;
use tokio::net::TcpStream;

use super::{Context, Forward};
use crate::metrics::Direction;

pub async fn handle(app: TcpStream, ctx: Arc<Context>) {
    let dst = match ctx.interception.inbound_dst(&app) {
        Ok(d) => d,
        Err(e) => {
            ctx.metrics
                .reject(Direction::Inbound, "no_original_destination");
            tracing::warn!(error = %e, "inbound connection without a destination: closed");
            return;
        }
    };
    let Some(workload) = ctx.inbound.get(&dst.port()).cloned() else {
        // Someone dialled :15006 itself, or a port no workload serves.
        ctx.metrics
            .reject(Direction::Inbound, "not_a_workload_port");
        tracing::warn!(%dst, "inbound connection to a port no local workload serves: closed");
        return;
    };
    let forward = Forward {
        direction: Direction::Inbound,
        app,
        dst,
        source: Some(DELIVERY_SOURCE_IP.into()),
        workload: Some(workload),
    };
    forward.run(&ctx).await;
}
