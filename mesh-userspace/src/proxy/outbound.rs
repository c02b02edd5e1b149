//! Outbound (:15001): connections the interception steered away from where the application
//! sent them. Ask the interception where they were going and who sent them, then forward.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::{Context, Forward};
use crate::metrics::Direction;

pub async fn handle(app: TcpStream, ctx: Arc<Context>) {
    let origin = match ctx.interception.outbound_origin(&app) {
        Ok(o) => o,
        Err(e) => {
            ctx.metrics
                .reject(Direction::Outbound, "no_original_destination");
            tracing::warn!(error = %e, "outbound connection without an original destination: closed");
            return;
        }
    };
    if mesh_common::ports::ALL.contains(&origin.dst.port()) && is_local(origin.dst) {
        // Forwarding to ourselves would loop; interception never steers these ports.
        ctx.metrics.reject(Direction::Outbound, "loop");
        tracing::warn!(dst = %origin.dst, "outbound connection to meshd's own port: closed");
        return;
    }
    let forward = Forward {
        direction: Direction::Outbound,
        app,
        dst: origin.dst,
        source: None,
        workload: origin.workload,
    };
    forward.run(&ctx).await;
}

/// Loopback, or an address of this host (binding to it succeeds).
fn is_local(addr: std::net::SocketAddrV4) -> bool {
    addr.ip().is_loopback() || std::net::TcpListener::bind((*addr.ip(), 0)).is_ok()
}
