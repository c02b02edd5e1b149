//! Tests for the gRPC filter: an in-process client, the filter and a fake upstream gRPC server,
//! connected by `tokio::io::duplex` pairs.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use http::request::Parts;
use http::Method;
use tokio::io::DuplexStream;

const MIB: usize = 1024 * 1024;
const FORBIDDEN: &str = "/pkg.Svc/Forbidden";
const ALLOWED: &str = "/pkg.Svc/Allowed";
/// The fake upstream answers this path with a response head and then RST_STREAM.
const RESETS: &str = "/pkg.Svc/Resets";
/// The fake upstream answers this path with a response head and never reads the request body.
const STALLS: &str = "/pkg.Svc/Stalls";
/// The fake upstream drops its whole connection when it sees this path.
const CRASHES: &str = "/pkg.Svc/Crashes";

/// Denies [`FORBIDDEN`], allows everything else, counts decisions.
#[derive(Default)]
struct DenyForbidden {
    decisions: AtomicUsize,
    /// (path, status, grpc-status) of each completed call.
    completed: Mutex<Vec<(String, u16, Option<u8>)>>,
}

impl RequestGate for DenyForbidden {
    fn decide(&self, head: &Parts) -> Verdict {
        self.decisions.fetch_add(1, Ordering::SeqCst);
        assert_eq!(head.uri.authority().map(|a| a.as_str()), Some("svc.test"));
        if head.uri.path() == FORBIDDEN {
            Verdict::Deny
        } else {
            Verdict::Allow
        }
    }

    fn rejected(&self, _reason: &'static str) {}

    fn completed(&self, e: &Exchange<'_>) {
        let call = (e.path.to_string(), e.status, e.grpc_status);
        self.completed.lock().unwrap().push(call);
    }
}

/// What the fake upstream saw: paths of opened streams and "reset <path>" events.
type Log = Arc<Mutex<Vec<String>>>;

struct Harness {
    client: SendRequest<Bytes>,
    log: Log,
    gate: Arc<DenyForbidden>,
    filter: JoinHandle<io::Result<()>>,
}

/// Client -> filter -> fake upstream, all in process.
async fn harness() -> Harness {
    let (client_io, down) = tokio::io::duplex(64 * 1024);
    let (up, server_io) = tokio::io::duplex(64 * 1024);
    let log = Log::default();
    tokio::spawn(fake_upstream(server_io, log.clone()));
    let gate = Arc::new(DenyForbidden::default());
    let filter = tokio::spawn(filter(down, up, gate.clone()));
    let (client, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);
    Harness {
        client,
        log,
        gate,
        filter,
    }
}

/// A gRPC-shaped server: echoes the request body as response DATA, then `grpc-status: 0`.
async fn fake_upstream(io: DuplexStream, log: Log) {
    let mut conn = h2::server::handshake(io).await.unwrap();
    while let Some(Ok((req, respond))) = conn.accept().await {
        log.lock().unwrap().push(req.uri().path().to_owned());
        if req.uri().path() == CRASHES {
            return;
        }
        tokio::spawn(echo(req, respond, log.clone()));
    }
}

async fn echo(req: Request<RecvStream>, mut respond: SendResponse<Bytes>, log: Log) {
    let path = req.uri().path().to_owned();
    let mut body = req.into_body();
    let mut send = respond.send_response(grpc_response(), false).unwrap();
    if path == RESETS {
        return send.send_reset(Reason::INTERNAL_ERROR);
    }
    if path == STALLS {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return drop((body, send));
    }
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else {
            log.lock().unwrap().push(format!("reset {path}"));
            return;
        };
        let n = chunk.len();
        if send_all(&mut send, chunk).await.is_err() {
            return;
        }
        body.flow_control().release_capacity(n).unwrap();
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let _ = send.send_trailers(trailers);
}

fn grpc_response() -> Response<()> {
    Response::builder()
        .status(200)
        .header(CONTENT_TYPE, "application/grpc")
        .body(())
        .unwrap()
}

fn grpc_request(path: &str) -> Request<()> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://svc.test{path}"))
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers")
        .body(())
        .unwrap()
}

/// Sends `data` within the stream's granted capacity.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = poll_fn(|cx| {
            if send.capacity() > 0 {
                return Poll::Ready(Some(Ok(send.capacity())));
            }
            send.poll_capacity(cx)
        })
        .await
        .expect("stream closed")?;
        send.send_data(data.split_to(granted.min(data.len())), false)?;
    }
    Ok(())
}

/// A complete response as the client saw it.
struct Reply {
    head: response::Parts,
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
}

async fn collect(resp: Response<RecvStream>) -> Reply {
    let (head, mut body) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap();
    Reply {
        head,
        data,
        trailers,
    }
}

/// One unary-style call: sends `body` with END_STREAM and collects the reply.
async fn call(client: &SendRequest<Bytes>, path: &str, body: &'static [u8]) -> Reply {
    let mut client = client.clone().ready().await.unwrap();
    let (resp_fut, mut send) = client.send_request(grpc_request(path), false).unwrap();
    send.send_data(Bytes::from_static(body), true).unwrap();
    collect(resp_fut.await.unwrap()).await
}

fn grpc_status(headers: Option<&HeaderMap>) -> Option<&str> {
    headers?.get("grpc-status")?.to_str().ok()
}

fn assert_echoed(reply: &Reply, body: &[u8]) {
    assert_eq!(reply.head.status, 200);
    assert_eq!(reply.data, body);
    assert_eq!(grpc_status(reply.trailers.as_ref()), Some("0"));
}

/// Waits (bounded) until the upstream log contains `entry`.
async fn wait_for_log(log: &Log, entry: &str) {
    for _ in 0..200 {
        if log.lock().unwrap().iter().any(|e| e == entry) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("upstream never logged {entry:?}: {:?}", log.lock().unwrap());
}

#[tokio::test]
async fn allow_deny_allow_on_one_connection() {
    let h = harness().await;
    assert_echoed(&call(&h.client, ALLOWED, b"first").await, b"first");

    let denied = call(&h.client, FORBIDDEN, b"secret").await;
    assert_eq!(denied.head.status, 200);
    assert_eq!(grpc_status(Some(&denied.head.headers)), Some("7"));
    assert_eq!(
        denied.head.headers["grpc-message"].to_str().unwrap(),
        DENIED_BODY
    );
    assert_eq!(
        denied.head.headers[CONTENT_TYPE].to_str().unwrap(),
        "application/grpc"
    );
    assert!(denied.data.is_empty(), "trailers-only: no DATA");
    assert!(
        denied.trailers.is_none(),
        "trailers-only: no trailers frame"
    );

    assert_echoed(&call(&h.client, ALLOWED, b"second").await, b"second");
    assert_eq!(*h.log.lock().unwrap(), vec![ALLOWED, ALLOWED]);
    assert_eq!(h.gate.decisions.load(Ordering::SeqCst), 3);
    let completed = h.gate.completed.lock().unwrap().clone();
    let call = |path: &str, grpc| (path.to_string(), 200, Some(grpc));
    assert_eq!(
        completed,
        [call(ALLOWED, 0), call(FORBIDDEN, 7), call(ALLOWED, 0)]
    );
}

#[tokio::test]
async fn twenty_concurrent_streams() {
    let h = harness().await;
    let bodies: Vec<&'static [u8]> = (0..20)
        .map(|i| -> &'static [u8] { format!("message number {i}").leak().as_bytes() })
        .collect();
    let calls: Vec<_> = bodies
        .iter()
        .map(|&body| {
            let client = h.client.clone();
            tokio::spawn(async move { (body, call(&client, ALLOWED, body).await) })
        })
        .collect();
    for task in calls {
        let (body, reply) = task.await.unwrap();
        assert_echoed(&reply, body);
    }
    assert_eq!(h.log.lock().unwrap().len(), 20);
}

#[tokio::test]
async fn four_mib_streamed_with_flow_control() {
    let h = harness().await;
    let payload: Bytes = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    let mut client = h.client.clone().ready().await.unwrap();
    let (resp_fut, mut send) = client.send_request(grpc_request(ALLOWED), false).unwrap();
    let upload = payload.clone();
    let sender = tokio::spawn(async move {
        for start in (0..upload.len()).step_by(64 * 1024) {
            let end = (start + 64 * 1024).min(upload.len());
            send_all(&mut send, upload.slice(start..end)).await.unwrap();
        }
        send.send_data(Bytes::new(), true).unwrap();
    });
    let reply = collect(resp_fut.await.unwrap()).await;
    sender.await.unwrap();
    assert_eq!(reply.data.len(), payload.len());
    assert!(reply.data == payload, "echoed bytes differ");
    assert_eq!(grpc_status(reply.trailers.as_ref()), Some("0"));
}

#[tokio::test]
async fn client_reset_cancels_upstream_but_not_connection() {
    let h = harness().await;
    let mut client = h.client.clone().ready().await.unwrap();
    let (resp_fut, mut send) = client.send_request(grpc_request(ALLOWED), false).unwrap();
    send.send_data(Bytes::from_static(b"hello"), false).unwrap();
    let mut body = resp_fut.await.unwrap().into_body();
    assert_eq!(body.data().await.unwrap().unwrap(), "hello");
    send.send_reset(Reason::CANCEL);
    wait_for_log(&h.log, &format!("reset {ALLOWED}")).await;

    assert_echoed(&call(&h.client, ALLOWED, b"after").await, b"after");
}

#[tokio::test]
async fn upstream_reset_reaches_client() {
    let h = harness().await;
    let mut client = h.client.clone().ready().await.unwrap();
    let (resp_fut, _send) = client.send_request(grpc_request(RESETS), false).unwrap();
    let err = match resp_fut.await {
        Err(e) => e,
        Ok(resp) => resp.into_body().data().await.unwrap().unwrap_err(),
    };
    assert_eq!(err.reason(), Some(Reason::INTERNAL_ERROR));
    assert_echoed(&call(&h.client, ALLOWED, b"still up").await, b"still up");
}

#[tokio::test]
async fn filter_returns_when_client_goes_away() {
    let h = harness().await;
    assert_echoed(&call(&h.client, ALLOWED, b"bye").await, b"bye");
    drop(h.client);
    let result = tokio::time::timeout(Duration::from_secs(5), h.filter).await;
    result.expect("filter did not finish").unwrap().unwrap();
}

#[tokio::test]
async fn dead_upstream_at_handshake_fails_downstream() {
    let (client_io, down) = tokio::io::duplex(64 * 1024);
    let (up, server_io) = tokio::io::duplex(64 * 1024);
    drop(server_io);
    let gate: Arc<dyn RequestGate> = Arc::new(DenyForbidden::default());
    let filter = tokio::spawn(filter(down, up, gate));
    let (client, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);
    let outcome = tokio::time::timeout(Duration::from_secs(5), async move {
        let mut client = client.ready().await?;
        let (resp_fut, _send) = client.send_request(grpc_request(ALLOWED), true)?;
        resp_fut.await
    })
    .await
    .expect("downstream stream hung after upstream failure");
    assert!(outcome.is_err(), "expected RST or GOAWAY");
    let _ = tokio::time::timeout(Duration::from_secs(5), filter).await;
}

#[tokio::test]
async fn slow_upstream_bounds_what_the_client_may_send() {
    let h = harness().await;
    let mut client = h.client.clone().ready().await.unwrap();
    let (resp_fut, mut send) = client.send_request(grpc_request(STALLS), false).unwrap();
    let resp = resp_fut.await.unwrap();
    assert_eq!(resp.status(), 200);
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..64 {
            send_all(&mut send, Bytes::from(vec![0u8; 64 * 1024]))
                .await
                .unwrap();
            counter.fetch_add(64 * 1024, Ordering::SeqCst);
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let accepted = sent.load(Ordering::SeqCst);
    assert!(accepted < 512 * 1024, "proxy buffered {accepted} bytes");
    assert!(!sender.is_finished());
    sender.abort();
}

#[tokio::test]
async fn non_grpc_request_is_gated_and_proxied() {
    let h = harness().await;
    let mut client = h.client.clone().ready().await.unwrap();
    let req = Request::builder()
        .method(Method::GET)
        .uri("http://svc.test/healthz")
        .body(())
        .unwrap();
    let (resp_fut, _send) = client.send_request(req, true).unwrap();
    let reply = collect(resp_fut.await.unwrap()).await;
    assert_echoed(&reply, b"");
    assert_eq!(h.gate.decisions.load(Ordering::SeqCst), 1);
    assert_eq!(*h.log.lock().unwrap(), vec!["/healthz"]);
}

#[tokio::test]
async fn upstream_crash_mid_connection_fails_streams_and_ends_filter() {
    let h = harness().await;
    assert_echoed(&call(&h.client, ALLOWED, b"before").await, b"before");
    let limit = Duration::from_secs(5);
    let mut client = h.client.clone().ready().await.unwrap();
    let (resp_fut, _send) = client.send_request(grpc_request(CRASHES), true).unwrap();
    let crashed = tokio::time::timeout(limit, resp_fut).await;
    assert!(crashed.expect("stream hung").is_err());

    let later = tokio::time::timeout(limit, async {
        let mut client = h.client.clone().ready().await?;
        let (resp_fut, _send) = client.send_request(grpc_request(ALLOWED), true)?;
        resp_fut.await
    });
    assert!(later.await.expect("new stream hung").is_err());
    let finished = tokio::time::timeout(limit, h.filter).await;
    finished.expect("filter did not finish").unwrap().unwrap();
}
