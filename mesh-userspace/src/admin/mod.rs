//! meshd's small HTTP endpoints, one request per connection:
//! - :15020 `/metrics`: Prometheus text (Istio's standard metrics and meshd's own);
//! - :15021 `/healthz/ready` (200 only when [`health::Health`] says so, else 503 with the
//!   reason) and `/healthz/live` (200 while the process serves);
//! - 127.0.0.1:15000, the admin API: `/config_dump` (JSON), `/logging` (GET: the filter in
//!   force; POST `?level=SPEC`: a new tracing filter at run time), `POST /quitquitquit` (stop,
//!   draining as SIGTERM does), `/graph` (a live service graph page) and `/graph.json` (its
//!   edges), and the readiness and metrics paths.
//!
//! Anything else gets a 4xx; a request that does not arrive within 5 s is dropped.

pub mod dump;
pub mod graph;
pub mod health;
pub mod status;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use crate::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;

/// What the endpoints read, shared by the three listeners.
pub struct State {
    pub metrics: Arc<Metrics>,
    pub health: health::Health,
    /// Set once meshd serves.
    pub view: OnceLock<dump::View>,
    /// Notified by `/quitquitquit`.
    pub quit: Notify,
}

impl State {
    pub fn new(metrics: Arc<Metrics>) -> Arc<State> {
        Arc::new(State {
            metrics,
            health: health::Health::default(),
            view: OnceLock::new(),
            quit: Notify::new(),
        })
    }
}

/// Which listener a request came to: each answers its own paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Metrics,
    Health,
    Admin,
}

/// Answers on `listener` until a successor meshd serves (while draining, health still says so).
pub async fn serve(
    listener: Arc<TcpListener>,
    state: Arc<State>,
    port: Port,
    sockets: Arc<crate::handover::Sockets>,
) {
    let handed_over = sockets.reached(crate::handover::Phase::HandedOver);
    tokio::pin!(handed_over);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut handed_over => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((conn, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(conn, &state, port)).await;
        });
    }
}

/// One answer: status line, content type, body.
type Reply = (&'static str, &'static str, String);

const TEXT: &str = "text/plain; charset=utf-8";
/// What prometheus-client writes: OpenMetrics text (counters end in `_total`, `# EOF`).
const PROMETHEUS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=utf-8";

async fn answer(mut conn: TcpStream, state: &State, port: Port) -> std::io::Result<()> {
    let Some(head) = read_head(&mut conn).await? else {
        return respond(
            &mut conn,
            ("431 Request Header Fields Too Large", TEXT, String::new()),
        )
        .await;
    };
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let reply = route(state, port, method, path, query).await;
    respond(&mut conn, reply).await
}

/// The request head, or `None` when it is over [`MAX_REQUEST`].
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return Ok(None);
        }
        let n = conn.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    Ok(Some(String::from_utf8_lossy(&buf[..len]).into_owned()))
}

async fn route(state: &State, port: Port, method: &str, path: &str, query: &str) -> Reply {
    let ok = |kind, body| ("200 OK", kind, body);
    match (port, method, path) {
        (Port::Metrics | Port::Admin, "GET", "/metrics" | "/stats/prometheus") => {
            ok(PROMETHEUS, metrics(state))
        }
        (_, "GET", "/healthz/ready") => match state.health.ready() {
            // Serving from the last known registry state is still serving: say so, stay ready.
            Ok(()) => match state.view.get().and_then(|v| v.ctx.registry.trouble()) {
                Some(trouble) => ok(TEXT, format!("ready; registry: {trouble}\n")),
                None => ok(TEXT, "ready\n".into()),
            },
            Err(why) => (
                "503 Service Unavailable",
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        (Port::Health | Port::Admin, "GET", "/healthz/live") => ok(TEXT, "live\n".into()),
        (Port::Admin, "GET", "/config_dump") => {
            let dump = dump::config_dump(state).await;
            ok(JSON, format!("{dump:#}\n"))
        }
        (Port::Admin, "GET", "/logging") => ok(TEXT, format!("{}\n", crate::logging::filter())),
        (Port::Admin, "GET", "/graph") => ok(HTML, graph::PAGE.into()),
        (Port::Admin, "GET", "/graph.json") => ok(JSON, graph::edges(&metrics(state)).to_string()),
        (Port::Admin, "POST", "/logging") => logging(query),
        (Port::Admin, "POST", "/quitquitquit") => {
            state.quit.notify_one();
            ok(TEXT, "stopping\n".into())
        }
        (Port::Admin, _, "/logging" | "/quitquitquit" | "/config_dump") => {
            ("405 Method Not Allowed", TEXT, String::new())
        }
        (_, "GET", _) => ("404 Not Found", TEXT, String::new()),
        _ => ("405 Method Not Allowed", TEXT, String::new()),
    }
}

/// Fresh figures for a scrape: kernel-side counts and certificate lifetimes.
fn metrics(state: &State) -> String {
    let m = &state.metrics;
    if let Some(view) = state.view.get() {
        m.refresh_kernel(view.ctx.interception.as_ref());
    }
    m.refresh_certificates(&state.health.svids());
    m.render()
}

/// `POST /logging?level=SPEC`: SPEC is a tracing filter (`debug`, `info,meshd::proxy=trace`).
fn logging(query: &str) -> Reply {
    let level = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("level="))
        .map(percent_decode);
    let Some(level) = level else {
        return (
            "400 Bad Request",
            TEXT,
            "usage: POST /logging?level=SPEC\n".into(),
        );
    };
    match crate::logging::set_filter(&level) {
        Ok(()) => {
            tracing::info!(filter = %level, "log filter changed through the admin API");
            ("200 OK", TEXT, format!("{level}\n"))
        }
        Err(e) => ("400 Bad Request", TEXT, format!("{e}\n")),
    }
}

/// `%XX` escapes and `+` as space, as a query string carries them; bad escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| {
            let h = std::str::from_utf8(h).ok()?;
            u8::from_str_radix(h, 16).ok()
        });
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn respond(conn: &mut TcpStream, (status, kind, body): Reply) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("info%2Cmeshd%3Ddebug"), "info,meshd=debug");
        assert_eq!(percent_decode("a+b%zz"), "a b%zz");
    }

    #[tokio::test]
    async fn each_port_answers_its_own_paths() {
        let state = State::new(Arc::new(Metrics::default()));
        let status = |r: Reply| r.0;
        let ready = route(&state, Port::Health, "GET", "/healthz/ready", "").await;
        assert_eq!(ready.0, "503 Service Unavailable");
        assert!(ready.2.contains("starting"));
        state.health.serving();
        let ready = route(&state, Port::Health, "GET", "/healthz/ready", "").await;
        assert_eq!(status(ready), "200 OK");
        let dump = route(&state, Port::Health, "GET", "/config_dump", "").await;
        assert_eq!(status(dump), "404 Not Found");
        let dump = route(&state, Port::Admin, "GET", "/config_dump", "").await;
        let json: serde_json::Value = serde_json::from_str(&dump.2).unwrap();
        assert_eq!(json["ready"], true);
        let quit = route(&state, Port::Admin, "GET", "/quitquitquit", "").await;
        assert_eq!(status(quit), "405 Method Not Allowed");
        state.metrics.build_info("ebpf");
        let scrape = route(&state, Port::Metrics, "GET", "/metrics", "").await;
        assert!(
            scrape.2.contains("meshd_build_info{version="),
            "{}",
            scrape.2
        );
    }
}
