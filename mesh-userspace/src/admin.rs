//! The small HTTP endpoints: Prometheus metrics on :15020 (`/metrics`) and readiness on :15021
//! (`/healthz/ready`). One request per connection, GET only; anything else gets a 4xx.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{intercept::Interception, metrics::Metrics};

const MAX_REQUEST: usize = 8 * 1024;

#[derive(Clone)]
pub enum Endpoint {
    /// The registry, and the interception whose kernel-side figures are read at each scrape.
    Metrics(Arc<Metrics>, Arc<dyn Interception>),
    Ready,
}

pub async fn serve(listener: TcpListener, endpoint: Endpoint) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(conn, endpoint)).await;
        });
    }
}

async fn answer(mut conn: TcpStream, endpoint: Endpoint) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return respond(&mut conn, "431 Request Header Fields Too Large", "").await;
        }
        let n = conn.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut conn, "405 Method Not Allowed", "").await;
    }
    match (&endpoint, path) {
        (Endpoint::Metrics(m, interception), "/metrics") => {
            m.refresh_kernel(interception.as_ref());
            respond(&mut conn, "200 OK", &m.render()).await
        }
        (Endpoint::Ready, "/healthz/ready") => respond(&mut conn, "200 OK", "ready\n").await,
        _ => respond(&mut conn, "404 Not Found", "").await,
    }
}

async fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}
