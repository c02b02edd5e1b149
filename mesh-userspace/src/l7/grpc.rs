//! Per-stream decisions on gRPC ports (HTTP/2 with prior knowledge).
//!
//! [`filter`] terminates the downstream HTTP/2 connection, asks the [`RequestGate`] about every
//! stream's request head and either proxies the stream to a single upstream HTTP/2 connection or
//! answers it locally with a trailers-only gRPC `PERMISSION_DENIED`. A denied stream never reaches
//! the upstream; the connection and its other streams carry on.
//!
//! Each stream is proxied by its own task. Data moves in both directions with flow control
//! respected end to end: bytes received on one side are released (window updates) only once the
//! other side has granted capacity for them, so at most one window's worth is held per direction.
//! RST_STREAM is propagated both ways.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, TE};
use http::{request, response, Request, Response, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::h2io::{h2_to_io, poll_send_capacity, reason_of};
use super::{Exchange, RequestGate, Verdict, DENIED_BODY};

/// Concurrent streams the downstream client may open (SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest request or response header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// How long the upstream connection may take to close after the downstream one ended (its
/// streams are finished by then; a server that keeps the connection open after the GOAWAY is
/// not waited for longer, so the connection's access line is not held back).
pub const UPSTREAM_DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
/// gRPC status code `PERMISSION_DENIED`.
pub const GRPC_PERMISSION_DENIED: &str = "7";

/// Headers that are specific to one HTTP/1 connection and must not be forwarded.
const CONNECTION_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Filters one downstream gRPC connection onto one upstream connection.
///
/// Returns when the downstream connection has ended. Errors are those of the downstream
/// connection (or of the initial upstream handshake); upstream failures after that are reported
/// to the client as stream resets and a GOAWAY.
pub async fn filter<D, U>(downstream: D, upstream: U, gate: Arc<dyn RequestGate>) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::Builder::new()
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(upstream)
        .await
        .map_err(h2_to_io)?;
    let mut upstream = Upstream {
        task: Some(tokio::spawn(conn)),
    };
    let server = h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(downstream)
        .await;
    let result = match server {
        Ok(server) => serve(server, client, &mut upstream, gate).await,
        Err(e) => Err(h2_to_io(e)),
    };
    upstream.close().await;
    result
}

/// Accepts downstream streams until the downstream connection ends, one task per stream.
///
/// Once the upstream connection has ended, the downstream one is shut down; an I/O error while
/// it closes (the client hanging up after the GOAWAY) is then expected and not reported.
async fn serve<D>(
    mut server: h2::server::Connection<D, Bytes>,
    client: SendRequest<Bytes>,
    upstream: &mut Upstream,
    gate: Arc<dyn RequestGate>,
) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let mut shutting_down = false;
    loop {
        tokio::select! {
            accepted = server.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    tokio::spawn(serve_stream(req, respond, client.clone(), gate.clone()));
                }
                Some(Err(e)) if shutting_down && e.is_io() => {
                    tracing::debug!(error = %e, "downstream closed during shutdown");
                    return Ok(());
                }
                Some(Err(e)) => return Err(h2_to_io(e)),
                None => return Ok(()),
            },
            clean = upstream.ended() => {
                shutting_down = true;
                shut_down_downstream(&mut server, clean);
            }
        }
    }
}

/// Tells the downstream client that the upstream connection has gone.
fn shut_down_downstream<D>(server: &mut h2::server::Connection<D, Bytes>, clean: bool)
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    if clean {
        tracing::debug!("upstream gRPC connection closed; draining downstream");
        server.graceful_shutdown();
    } else {
        tracing::debug!("upstream gRPC connection failed; closing downstream");
        server.abrupt_shutdown(Reason::INTERNAL_ERROR);
    }
}

/// The task driving the upstream HTTP/2 connection.
struct Upstream {
    /// `None` once the task has finished and been awaited.
    task: Option<JoinHandle<Result<(), h2::Error>>>,
}

impl Upstream {
    /// Waits for the upstream connection to end (forever if it already has); true if clean.
    async fn ended(&mut self) -> bool {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = task.await;
        self.task = None;
        if let Ok(Err(e)) = &outcome {
            tracing::debug!(error = %e, "upstream gRPC connection error");
        }
        matches!(outcome, Ok(Ok(())))
    }

    /// Gives the upstream connection a bounded time to close, then stops it.
    async fn close(mut self) {
        let Some(mut task) = self.task.take() else {
            return;
        };
        if tokio::time::timeout(UPSTREAM_DRAIN_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Decides on one downstream stream and proxies or denies it.
async fn serve_stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    client: SendRequest<Bytes>,
    gate: Arc<dyn RequestGate>,
) {
    let (parts, body) = req.into_parts();
    let decided = std::time::Instant::now();
    let (method, uri) = (parts.method.clone(), parts.uri.clone());
    let completed = |status, grpc_status, denied| {
        gate.completed(&Exchange {
            method: method.as_str(),
            path: uri.path(),
            status,
            grpc_status,
            denied,
            elapsed: decided.elapsed(),
        })
    };
    if gate.decide(&parts) == Verdict::Deny {
        tracing::debug!(path = parts.uri.path(), "gRPC request denied");
        deny(&mut respond);
        completed(200, Some(7), true);
        return;
    }
    let end = body.is_end_stream();
    let Some((resp_fut, up_send)) = open_upstream(client, parts, end, &mut respond).await else {
        return;
    };
    if let Some((status, grpc_status)) = proxy_exchange(body, respond, up_send, resp_fut).await {
        completed(status, grpc_status, false);
    }
}

/// Answers a denied stream trailers-only with gRPC `PERMISSION_DENIED`.
///
/// Dropping the request body afterwards makes h2 reset the stream with NO_ERROR if the client is
/// still sending, as RFC 9113 §8.1 asks of a server that responds early.
fn deny(respond: &mut SendResponse<Bytes>) {
    let mut resp = Response::new(());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(
        "grpc-status",
        HeaderValue::from_static(GRPC_PERMISSION_DENIED),
    );
    headers.insert("grpc-message", HeaderValue::from_static(DENIED_BODY));
    if let Err(e) = respond.send_response(resp, true) {
        tracing::debug!(error = %e, "could not send gRPC denial");
    }
}

/// Opens the upstream stream for an allowed request; resets the downstream stream on failure.
async fn open_upstream(
    client: SendRequest<Bytes>,
    parts: request::Parts,
    end: bool,
    respond: &mut SendResponse<Bytes>,
) -> Option<(ResponseFuture, SendStream<Bytes>)> {
    let ready = tokio::select! {
        ready = client.ready() => ready,
        // The client gave up while the upstream had no stream slot free.
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return None,
    };
    let opened = ready.and_then(|mut client| client.send_request(upstream_request(parts), end));
    match opened {
        Ok(pair) => Some(pair),
        Err(e) => {
            tracing::debug!(error = %e, "could not open upstream gRPC stream");
            let reason = if e.is_go_away() || e.is_io() {
                Reason::REFUSED_STREAM
            } else {
                Reason::INTERNAL_ERROR
            };
            respond.send_reset(reason);
            None
        }
    }
}

/// The request head to send upstream.
fn upstream_request(mut parts: request::Parts) -> Request<()> {
    strip_connection_headers(&mut parts.headers);
    if parts.uri.scheme().is_none() {
        // No :scheme/:authority downstream: h2 only accepts a path-only URI from an HTTP/1.1
        // request and then sends `:scheme http` with the path.
        parts.version = Version::HTTP_11;
    }
    Request::from_parts(parts, ())
}

/// The response head to send downstream.
fn downstream_response(mut parts: response::Parts) -> Response<()> {
    strip_connection_headers(&mut parts.headers);
    Response::from_parts(parts, ())
}

/// Removes connection-specific header fields (RFC 9113 §8.2.2).
fn strip_connection_headers(headers: &mut HeaderMap) {
    for name in CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// Proxies one allowed exchange: request body up, response head and body down. Returns the
/// response's status and its `grpc-status` (from the head of a trailers-only response, else
/// from the trailers) once a response head went downstream.
async fn proxy_exchange(
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
    up_send: SendStream<Bytes>,
    mut resp_fut: ResponseFuture,
) -> Option<(u16, Option<u8>)> {
    let end = body.is_end_stream();
    let mut request = Pump::new(body, up_send, Dir::Request, end);
    let head = poll_fn(|cx| poll_head(cx, &mut request, &mut respond, &mut resp_fut)).await;
    let head = match head {
        Ok(head) => head,
        Err(Fault::Downstream) => {
            request.send.send_reset(Reason::CANCEL);
            return None;
        }
        Err(Fault::Upstream(reason)) => {
            respond.send_reset(reason);
            return None;
        }
    };
    let (parts, up_body) = head.into_parts();
    let status = parts.status.as_u16();
    let head_grpc_status = super::grpc_status(parts.headers.get("grpc-status"));
    let end = up_body.is_end_stream();
    let down_send = match respond.send_response(downstream_response(parts), end) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(error = %e, "could not forward gRPC response head");
            request.send.send_reset(Reason::CANCEL);
            return None;
        }
    };
    let mut response = Pump::new(up_body, down_send, Dir::Response, end);
    let outcome = poll_fn(|cx| poll_both(cx, &mut request, &mut response)).await;
    match outcome {
        Ok(()) => {}
        Err(Fault::Downstream) => request.send.send_reset(Reason::CANCEL),
        Err(Fault::Upstream(reason)) => response.send.send_reset(reason),
    }
    Some((status, head_grpc_status.or(response.grpc_status)))
}

/// Forwards the request body while waiting for the upstream response head.
fn poll_head(
    cx: &mut Context<'_>,
    request: &mut Pump,
    respond: &mut SendResponse<Bytes>,
    resp_fut: &mut ResponseFuture,
) -> Poll<Result<Response<RecvStream>, Fault>> {
    if let Poll::Ready(Err(fault)) = request.poll(cx) {
        return Poll::Ready(Err(fault));
    }
    if respond.poll_reset(cx).is_ready() {
        return Poll::Ready(Err(Fault::Downstream));
    }
    Pin::new(resp_fut)
        .poll(cx)
        .map_err(|e| Fault::Upstream(reason_of(&e)))
}

/// Forwards both bodies; done when the response is complete (or either side fails).
fn poll_both(
    cx: &mut Context<'_>,
    request: &mut Pump,
    response: &mut Pump,
) -> Poll<Result<(), Fault>> {
    if let Poll::Ready(Err(fault)) = request.poll(cx) {
        return Poll::Ready(Err(fault));
    }
    response.poll(cx)
}

/// Which way a [`Pump`] moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Downstream client to upstream server.
    Request,
    /// Upstream server to downstream client.
    Response,
}

/// Which side of an exchange failed, and so which side must be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The downstream stream was reset or its connection failed: cancel upstream.
    Downstream,
    /// The upstream stream was reset (with this reason) or its connection failed.
    Upstream(Reason),
}

/// Moves DATA and trailers from one stream to another, respecting flow control.
struct Pump {
    recv: RecvStream,
    send: SendStream<Bytes>,
    dir: Dir,
    /// Received but not yet forwarded; its capacity is released as it is forwarded.
    pending: Bytes,
    /// `recv` has no more DATA; trailers (or END_STREAM) remain to be forwarded.
    recv_ended: bool,
    /// END_STREAM has been forwarded (or the receiver asked us to stop sending).
    done: bool,
    /// The `grpc-status` of the trailers forwarded, when valid.
    grpc_status: Option<u8>,
}

impl Pump {
    /// A pump; `done` is true when the source stream ended with its headers.
    fn new(recv: RecvStream, send: SendStream<Bytes>, dir: Dir, done: bool) -> Self {
        Pump {
            recv,
            send,
            dir,
            pending: Bytes::new(),
            recv_ended: done,
            done,
            grpc_status: None,
        }
    }

    /// Forwards until the source is exhausted; `Ready(Ok)` once END_STREAM went out.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Fault>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if !self.pending.is_empty() {
                ready!(self.poll_forward(cx))?;
                continue;
            }
            if self.recv_ended {
                return self.poll_finish(cx);
            }
            if let Poll::Ready(reset) = self.send.poll_reset(cx) {
                return Poll::Ready(self.on_send_reset(reset));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(self.recv_fault(reason_of(&e)))),
                None => self.recv_ended = true,
            }
        }
    }

    /// Sends `pending` as capacity is granted, releasing receive capacity for what went out.
    fn poll_forward(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Fault>> {
        while !self.pending.is_empty() {
            self.send.reserve_capacity(self.pending.len());
            let granted = match ready!(poll_send_capacity(&mut self.send, cx)) {
                Ok(granted) => granted,
                Err(reason) => return Poll::Ready(Err(self.send_fault(reason))),
            };
            let chunk = self.pending.split_to(granted.min(self.pending.len()));
            let n = chunk.len();
            if let Err(e) = self.send.send_data(chunk, false) {
                return Poll::Ready(Err(self.send_fault(reason_of(&e))));
            }
            // Fails only if the source stream is gone, which its next poll reports.
            let _ = self.recv.flow_control().release_capacity(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Forwards trailers, or an empty END_STREAM DATA frame when there are none.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Fault>> {
        let sent = match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(mut trailers)) => {
                strip_connection_headers(&mut trailers);
                self.grpc_status = super::grpc_status(trailers.get("grpc-status"));
                self.send.send_trailers(trailers)
            }
            Ok(None) => self.send.send_data(Bytes::new(), true),
            Err(e) => return Poll::Ready(Err(self.recv_fault(reason_of(&e)))),
        };
        self.done = true;
        Poll::Ready(sent.map_err(|e| self.send_fault(reason_of(&e))))
    }

    /// The receiver reset its stream. NO_ERROR means "stop sending, I have answered": the pump
    /// is then done without failing the exchange.
    fn on_send_reset(&mut self, reset: Result<Reason, h2::Error>) -> Result<(), Fault> {
        let reason = reset.unwrap_or_else(|e| reason_of(&e));
        if reason == Reason::NO_ERROR {
            self.done = true;
            return Ok(());
        }
        Err(self.send_fault(reason))
    }

    /// A failure of the stream being written to.
    fn send_fault(&self, reason: Reason) -> Fault {
        match self.dir {
            Dir::Request => Fault::Upstream(reason),
            Dir::Response => Fault::Downstream,
        }
    }

    /// A failure of the stream being read from.
    fn recv_fault(&self, reason: Reason) -> Fault {
        match self.dir {
            Dir::Request => Fault::Downstream,
            Dir::Response => Fault::Upstream(reason),
        }
    }
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
mod tests;
