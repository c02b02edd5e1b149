//! HTTP/1.1 filter: relays one downstream connection to its upstream workload, asking the
//! [`RequestGate`] about every request head before any byte of that request goes upstream.
//!
//! Requests and responses are forwarded byte for byte; heads are parsed (never re-serialised) only
//! to find where each message ends. The request side and the response side run concurrently; the
//! request side tells the response side, in request order, what to expect next (a response, or a
//! locally generated 403/400 to write once every earlier response has been delivered).
mod framing;
#[cfg(test)]
mod tests;

use std::io;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, Scheme, Uri};
use http::{Method, Version};
use tokio::io::{split, AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use self::framing::{invalid, Body, Framing, Inbound, Out};
use super::{Exchange, RequestGate, Verdict};

/// Largest request or response head accepted, request line and headers included.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 100;
/// Requests forwarded whose responses have not started yet, before reading more requests waits.
const MAX_IN_FLIGHT: usize = 32;

/// Written downstream for a denied request, after every earlier response.
const FORBIDDEN: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\n\
content-type: text/plain\r\nconnection: close\r\n\r\nRBAC: access denied";
/// Written downstream for a request head that cannot be served.
const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\n\
content-type: text/plain\r\nconnection: close\r\n\r\nBad Request";

/// [`RequestGate::rejected`] reason: the head does not parse as HTTP/1.x.
const MALFORMED: &str = "malformed_head";
/// [`RequestGate::rejected`] reason: over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields.
const TOO_LARGE: &str = "head_too_large";
/// [`RequestGate::rejected`] reason: ambiguous body framing (request smuggling defence).
const BAD_FRAMING: &str = "bad_framing";
/// [`RequestGate::rejected`] reason: a head begun but not finished within [`HEAD_TIMEOUT`].
const HEAD_TIMED_OUT: &str = "head_timeout";
/// How long a request head may take from its first byte to its last (slow-header clients).
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Written downstream for a head that did not arrive in time.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 15\r\n\
content-type: text/plain\r\nconnection: close\r\n\r\nRequest Timeout";

/// Relays HTTP/1.1 between `downstream` (the caller) and `upstream` (the workload) until both
/// directions are done, asking `gate` about each request head first. A denied request is answered
/// `403` and a request head that cannot be served `400` (after `gate.rejected`), in both cases
/// once every earlier response has been delivered, and the connection closes. An accepted
/// upgrade (`101`) or `CONNECT` (`2xx`) turns the rest of the connection into a plain byte copy.
///
/// Returns the bytes sent upstream and the bytes sent downstream (locally generated answers
/// included).
pub async fn filter<D, U>(
    downstream: D,
    upstream: U,
    gate: &dyn RequestGate,
) -> io::Result<(u64, u64)>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (down_read, down_write) = split(downstream);
    let (up_read, up_write) = split(upstream);
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let requests = relay_requests(Inbound::new(down_read), Out::new(up_write), gate, tx);
    let responses = relay_responses(Inbound::new(up_read), Out::new(down_write), rx, gate);
    tokio::try_join!(requests, responses)
}

/// What the response side does next, in request order.
enum Pending {
    /// An allowed request went upstream: relay its response.
    Response(Expected),
    /// Write [`FORBIDDEN`] and close.
    Deny,
    /// Write this answer ([`BAD_REQUEST`], [`REQUEST_TIMEOUT`]) and close.
    Reject(&'static [u8]),
}

/// What the response side needs to know about a forwarded request to frame its response.
struct Expected {
    /// `HEAD`: the response has no body whatever its headers say.
    head: bool,
    /// `CONNECT`: a `2xx` response switches to a tunnel.
    connect: bool,
    /// Upgrade or `CONNECT`: told whether the server switched protocols.
    switched: Option<oneshot::Sender<bool>>,
    /// The request, for [`RequestGate::completed`].
    method: Method,
    uri: Uri,
    decided: std::time::Instant,
}

/// One parsed request head, still in the inbound buffer.
struct RequestHead {
    /// Length of the head in the buffer.
    len: usize,
    /// What the gate sees.
    parts: Parts,
    /// How the request body is delimited.
    body: Body,
    /// `Connection: upgrade` with `Upgrade`, or `CONNECT`.
    upgrade: bool,
}

/// The result of waiting for a request head.
enum ReadHead {
    Head(Box<RequestHead>),
    /// Cannot be served: the reason for [`RequestGate::rejected`].
    Bad(&'static str),
    /// Downstream closed between requests.
    Eof,
}

/// How relaying one response ended.
enum Outcome {
    /// Complete; the connection goes on.
    Done,
    /// Protocols switched: copy bytes until end of stream.
    Switched,
    /// Upstream closed.
    Closed,
}

/// Request side: reads request heads, asks the gate, forwards allowed requests with their bodies.
async fn relay_requests<R, W>(
    mut inbound: Inbound<R>,
    mut out: Out<W>,
    gate: &dyn RequestGate,
    tx: mpsc::Sender<Pending>,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let head = match read_request(&mut inbound).await? {
            ReadHead::Head(head) => head,
            ReadHead::Eof => {
                out.shutdown().await?;
                return Ok(out.sent);
            }
            ReadHead::Bad(reason) => {
                debug!(reason, "http1: rejecting request head");
                gate.rejected(reason);
                let answer = match reason {
                    HEAD_TIMED_OUT => REQUEST_TIMEOUT,
                    _ => BAD_REQUEST,
                };
                let _ = tx.send(Pending::Reject(answer)).await;
                return Ok(out.sent);
            }
        };
        let decided = std::time::Instant::now();
        if gate.decide(&head.parts) == Verdict::Deny {
            debug!(method = %head.parts.method, uri = %head.parts.uri, "http1: request denied");
            gate.completed(&Exchange {
                method: head.parts.method.as_str(),
                path: head.parts.uri.path(),
                status: 403,
                grpc_status: None,
                denied: true,
                elapsed: decided.elapsed(),
            });
            let _ = tx.send(Pending::Deny).await;
            return Ok(out.sent);
        }
        let (switched, switch_rx) = if head.upgrade {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let expected = Expected {
            head: head.parts.method == Method::HEAD,
            connect: head.parts.method == Method::CONNECT,
            switched,
            method: head.parts.method.clone(),
            uri: head.parts.uri.clone(),
            decided,
        };
        if tx.send(Pending::Response(expected)).await.is_err() {
            return Ok(out.sent);
        }
        inbound.relay_message(&mut out, head.len, head.body).await?;
        if let Some(switch_rx) = switch_rx {
            match switch_rx.await {
                Ok(false) => {}
                Ok(true) => return tunnel(&mut inbound, &mut out).await,
                Err(_) => return Ok(out.sent),
            }
        }
    }
}

/// Copies the rest of a switched connection, then half-closes.
async fn tunnel<R, W>(inbound: &mut Inbound<R>, out: &mut Out<W>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    inbound.relay_to_eof(out).await?;
    out.shutdown().await?;
    Ok(out.sent)
}

/// Response side: relays responses in request order and writes the local 403/400 answers.
async fn relay_responses<R, W>(
    mut inbound: Inbound<R>,
    mut out: Out<W>,
    mut rx: mpsc::Receiver<Pending>,
    gate: &dyn RequestGate,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let answer = match next_pending(&mut inbound, &mut rx).await? {
            None => return tunnel(&mut inbound, &mut out).await,
            Some(Pending::Deny) => FORBIDDEN,
            Some(Pending::Reject(answer)) => answer,
            Some(Pending::Response(expected)) => {
                match relay_response(&mut inbound, &mut out, expected, gate).await? {
                    Outcome::Done => continue,
                    Outcome::Switched | Outcome::Closed => {
                        return tunnel(&mut inbound, &mut out).await
                    }
                }
            }
        };
        out.write(answer).await?;
        out.shutdown().await?;
        return Ok(out.sent);
    }
}

/// Waits for the next [`Pending`] while watching upstream. `None` once no request will follow
/// (the request side is done) or upstream closed with nothing queued.
async fn next_pending<R: AsyncRead + Unpin>(
    inbound: &mut Inbound<R>,
    rx: &mut mpsc::Receiver<Pending>,
) -> io::Result<Option<Pending>> {
    loop {
        tokio::select! {
            biased;
            next = rx.recv() => return Ok(next),
            read = inbound.fill() => {
                if read? == 0 {
                    return Ok(rx.try_recv().ok());
                }
                if inbound.buf.len() > MAX_HEAD {
                    return Err(invalid("unsolicited data from upstream"));
                }
            }
        }
    }
}

/// Relays the response to one request: any `1xx` heads, then the final head and its body.
async fn relay_response<R, W>(
    inbound: &mut Inbound<R>,
    out: &mut Out<W>,
    expected: Expected,
    gate: &dyn RequestGate,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Expected {
        head,
        connect,
        mut switched,
        method,
        uri,
        decided,
    } = expected;
    loop {
        let Some((len, status, body)) = read_response(inbound).await? else {
            return Ok(Outcome::Closed);
        };
        if status >= 200 || (status == 101 && switched.is_some()) {
            gate.completed(&Exchange {
                method: method.as_str(),
                path: uri.path(),
                status,
                grpc_status: None,
                denied: false,
                elapsed: decided.elapsed(),
            });
        }
        let accepted = match status {
            101 => switched.is_some(),
            200..=299 => connect,
            _ => false,
        };
        if accepted {
            inbound.forward(out, len).await?;
            if let Some(tx) = switched.take() {
                let _ = tx.send(true);
            }
            return Ok(Outcome::Switched);
        }
        if (100..200).contains(&status) {
            inbound.forward(out, len).await?;
            continue;
        }
        let body = match head || status == 204 || status == 304 {
            true => Body::Empty,
            false => body,
        };
        inbound.relay_message(out, len, body).await?;
        if let Some(tx) = switched {
            let _ = tx.send(false);
        }
        return Ok(match body {
            Body::UntilClose => Outcome::Closed,
            _ => Outcome::Done,
        });
    }
}

/// Waits for a complete request head in the buffer, at most [`HEAD_TIMEOUT`] from its first
/// byte (waiting between requests is not limited here).
async fn read_request<R: AsyncRead + Unpin>(inbound: &mut Inbound<R>) -> io::Result<ReadHead> {
    let mut deadline = None;
    loop {
        match parse_request(&inbound.buf) {
            Ok(Some(head)) => return Ok(ReadHead::Head(Box::new(head))),
            Err(reason) => return Ok(ReadHead::Bad(reason)),
            Ok(None) if inbound.buf.len() > MAX_HEAD => return Ok(ReadHead::Bad(TOO_LARGE)),
            Ok(None) => {}
        }
        if !inbound.buf.is_empty() {
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + HEAD_TIMEOUT);
        }
        let read = match deadline {
            Some(at) => match tokio::time::timeout_at(at, inbound.fill()).await {
                Ok(read) => read?,
                Err(_) => return Ok(ReadHead::Bad(HEAD_TIMED_OUT)),
            },
            None => inbound.fill().await?,
        };
        if read == 0 {
            return Ok(match inbound.buf.is_empty() {
                true => ReadHead::Eof,
                false => ReadHead::Bad(MALFORMED),
            });
        }
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete, `Err(reason)` when
/// it cannot be served.
fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(_) => return Err(MALFORMED),
    };
    if len > MAX_HEAD {
        return Err(TOO_LARGE);
    }
    let parts = head_parts(&request)?;
    let body = Framing::from_headers(request.headers)
        .request_body()
        .map_err(|()| BAD_FRAMING)?;
    let upgrade = parts.method == Method::CONNECT || wants_upgrade(&parts.headers);
    Ok(Some(RequestHead {
        len,
        parts,
        body,
        upgrade,
    }))
}

/// Fuzzing entry point (`fuzz/fuzz_targets/http1_head.rs`): the request-head parser, with the
/// head's length and what the gate would see.
#[doc(hidden)]
pub fn fuzz_parse_request(buf: &[u8]) -> Result<Option<(usize, Parts)>, &'static str> {
    parse_request(buf).map(|head| head.map(|h| (h.len, h.parts)))
}

/// Fuzzing entry point: the response-head parser, with the head's length and status.
#[doc(hidden)]
pub fn fuzz_parse_response(buf: &[u8]) -> io::Result<Option<(usize, u16)>> {
    parse_response(buf).map(|head| head.map(|(len, status, _)| (len, status)))
}

/// Builds what the gate sees: method, URI (with `Host` as its authority), version, headers.
fn head_parts(request: &httparse::Request<'_, '_>) -> Result<Parts, &'static str> {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    let method = request.method.unwrap_or_default();
    parts.method = Method::from_bytes(method.as_bytes()).map_err(|_| MALFORMED)?;
    parts.version = match request.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut host = None;
    for field in request.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| MALFORMED)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| MALFORMED)?;
        if name == header::HOST {
            if host.is_some() {
                return Err(MALFORMED);
            }
            host = Some(value.clone());
        }
        parts.headers.append(name, value);
    }
    parts.uri = request_uri(request.path.unwrap_or_default(), host.as_ref())?;
    Ok(parts)
}

/// The request target as sent, with the `Host` value as authority (scheme `http`) when the
/// target has none of its own.
fn request_uri(target: &str, host: Option<&HeaderValue>) -> Result<Uri, &'static str> {
    let uri: Uri = target.parse().map_err(|_| MALFORMED)?;
    let host = match host {
        Some(host) if uri.authority().is_none() && !host.is_empty() => host,
        _ => return Ok(uri),
    };
    let authority = Authority::try_from(host.as_bytes()).map_err(|_| MALFORMED)?;
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    Ok(Uri::from_parts(parts).unwrap_or(uri))
}

/// `Connection: upgrade` together with an `Upgrade` header.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers.get_all(header::CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    connection_upgrade && headers.contains_key(header::UPGRADE)
}

/// Waits for a complete response head: its length, status and body framing (before the
/// request method and status are taken into account). `None` when upstream closed first.
async fn read_response<R: AsyncRead + Unpin>(
    inbound: &mut Inbound<R>,
) -> io::Result<Option<(usize, u16, Body)>> {
    loop {
        if let Some(head) = parse_response(&inbound.buf)? {
            return Ok(Some(head));
        }
        if inbound.buf.len() > MAX_HEAD {
            return Err(invalid("response head too large"));
        }
        if inbound.fill().await? == 0 {
            return Ok(None);
        }
    }
}

/// Parses a response head at the start of `buf`; `Ok(None)` while incomplete.
fn parse_response(buf: &[u8]) -> io::Result<Option<(usize, u16, Body)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let status = response.code.unwrap_or_default();
            let body = Framing::from_headers(response.headers)
                .response_body()
                .map_err(|()| invalid("bad response content-length"))?;
            Ok(Some((len, status, body)))
        }
        Err(_) => Err(invalid("malformed response head")),
    }
}
