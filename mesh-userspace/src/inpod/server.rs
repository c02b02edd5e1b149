//! meshd's end of the CNI conversation: a unix socket (`pods.cni_socket`, mode 0600) where
//! `meshd-cni` sends one request line and waits for the reply. ADD is answered only once the
//! pod's capture is in place, so the runtime starts the pod's containers already captured.
//! Malformed requests get an error reply, are counted, and the socket keeps serving.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::{
    manager::PodManager,
    protocol::{Reply, Request, MAX_LINE},
};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the socket (replacing a stale one left by an earlier meshd).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: Arc<UnixListener>, pods: Arc<PodManager>) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let pods = pods.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, &pods)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on the CNI socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(conn: UnixStream, pods: &PodManager) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_LINE as u64))
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handle(request, pods).await,
        Err(e) => {
            pods.metrics().pod_event("malformed", "refused");
            tracing::warn!(error = %e, "malformed request on the CNI socket");
            Reply::failed(format!("malformed request: {e}"))
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

async fn handle(request: Request, pods: &PodManager) -> Reply {
    let (op, result) = match request {
        Request::Add(info) => ("add", pods.add(info).await),
        Request::Del { container_id } => ("del", pods.del(&container_id).await.map(|_| true)),
        Request::Check { container_id } => ("check", pods.check(&container_id).await.map(|_| true)),
    };
    match result {
        Ok(meshed) => {
            pods.metrics().pod_event(op, "ok");
            Reply::ok(meshed)
        }
        Err(e) => {
            pods.metrics().pod_event(op, "failed");
            let error = format!("{e:#}");
            tracing::warn!(op, %error, "pod request failed");
            Reply::failed(error)
        }
    }
}
