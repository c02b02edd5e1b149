//! Filter tests over in-process `duplex` pipes: a client on one end, a fake upstream on the other.
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::request::Parts;
use http::Method;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::{filter, MAX_HEAD};
use crate::l7::{Exchange, RequestGate, Verdict, DENIED_BODY};

const FORBIDDEN: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\n\
content-type: text/plain\r\nconnection: close\r\n\r\nRBAC: access denied";

/// Records every head; denies paths under `/admin` and the `DELETE` method.
#[derive(Default)]
struct FakeGate {
    heads: Mutex<Vec<Parts>>,
    rejected: Mutex<Vec<&'static str>>,
    /// "METHOD PATH STATUS" of each completed request.
    completed: Mutex<Vec<String>>,
}

impl RequestGate for FakeGate {
    fn decide(&self, head: &Parts) -> Verdict {
        self.heads.lock().unwrap().push(head.clone());
        if head.uri.path().starts_with("/admin") || head.method == Method::DELETE {
            Verdict::Deny
        } else {
            Verdict::Allow
        }
    }

    fn rejected(&self, reason: &'static str) {
        self.rejected.lock().unwrap().push(reason);
    }

    fn completed(&self, e: &Exchange<'_>) {
        let line = format!("{} {} {}", e.method, e.path, e.status);
        self.completed.lock().unwrap().push(line);
    }
}

impl FakeGate {
    fn paths(&self) -> Vec<String> {
        let heads = self.heads.lock().unwrap();
        heads.iter().map(|h| h.uri.path().to_owned()).collect()
    }

    fn rejections(&self) -> Vec<&'static str> {
        self.rejected.lock().unwrap().clone()
    }
}

struct Harness {
    client: DuplexStream,
    server: DuplexStream,
    gate: Arc<FakeGate>,
    filter: JoinHandle<io::Result<(u64, u64)>>,
}

fn start() -> Harness {
    let (client, downstream) = duplex(1 << 20);
    let (upstream, server) = duplex(1 << 20);
    let gate = Arc::new(FakeGate::default());
    let shared = Arc::clone(&gate);
    let filter = tokio::spawn(async move { filter(downstream, upstream, &*shared).await });
    Harness {
        client,
        server,
        gate,
        filter,
    }
}

/// Fails the test instead of hanging.
async fn within<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), test)
        .await
        .expect("test timed out")
}

async fn read_n(stream: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).await.unwrap();
    buf
}

async fn read_all(stream: &mut DuplexStream) -> Vec<u8> {
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    buf
}

/// Sends `request` and checks upstream sees it unchanged, then answers `response` and checks
/// the client sees it unchanged.
async fn exchange(h: &mut Harness, request: &[u8], response: &[u8]) {
    h.client.write_all(request).await.unwrap();
    assert_eq!(read_n(&mut h.server, request.len()).await, request);
    h.server.write_all(response).await.unwrap();
    assert_eq!(read_n(&mut h.client, response.len()).await, response);
}

/// Closes both ends cleanly and returns the filter's byte counts.
async fn finish(mut h: Harness) -> (u64, u64) {
    h.client.shutdown().await.unwrap();
    assert!(read_all(&mut h.server).await.is_empty());
    h.server.shutdown().await.unwrap();
    assert!(read_all(&mut h.client).await.is_empty());
    h.filter.await.unwrap().unwrap()
}

/// Sends `request` and expects a 400 with `reason`, nothing upstream and no decision.
async fn expect_rejected(request: &[u8], reason: &str) {
    let mut h = start();
    h.client.write_all(request).await.unwrap();
    let answer = read_all(&mut h.client).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );
    assert!(read_all(&mut h.server).await.is_empty());
    assert_eq!(h.gate.rejections(), vec![reason]);
    assert!(h.gate.paths().is_empty());
    h.filter.await.unwrap().unwrap();
}

#[tokio::test]
async fn keep_alive_requests_pass_byte_for_byte_and_are_counted() {
    within(async {
        let mut h = start();
        let req1 = b"GET /one HTTP/1.1\r\nhOsT: a\r\nX-Odd:  spaced  \r\n\r\n";
        let resp1 = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Odd:  x \r\n\r\none";
        let req2 = b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        let resp2 = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n";
        exchange(&mut h, req1, resp1).await;
        exchange(&mut h, req2, resp2).await;
        assert_eq!(h.gate.paths(), ["/one", "/two"]);
        let up = (req1.len() + req2.len()) as u64;
        let down = (resp1.len() + resp2.len()) as u64;
        assert_eq!(finish(h).await, (up, down));
    })
    .await;
}

#[tokio::test]
async fn pipelined_denied_request_answered_after_earlier_response() {
    within(async {
        let mut h = start();
        let req1 = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let req2 = b"GET /admin/x HTTP/1.1\r\nHost: a\r\n\r\n";
        h.client
            .write_all(&[&req1[..], req2].concat())
            .await
            .unwrap();
        assert_eq!(read_n(&mut h.server, req1.len()).await, req1);
        // A late response still comes before the 403.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let resp1 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        h.server.write_all(resp1).await.unwrap();
        let answer = read_all(&mut h.client).await;
        assert_eq!(answer, [&resp1[..], FORBIDDEN].concat());
        assert!(answer.ends_with(DENIED_BODY.as_bytes()));
        assert!(
            read_all(&mut h.server).await.is_empty(),
            "denied request went upstream"
        );
        assert_eq!(h.gate.paths(), ["/ok", "/admin/x"]);
        let counts = h.filter.await.unwrap().unwrap();
        assert_eq!(counts, (req1.len() as u64, answer.len() as u64));
        let mut completed = h.gate.completed.lock().unwrap().clone();
        completed.sort();
        assert_eq!(completed, ["GET /admin/x 403", "GET /ok 200"]);
    })
    .await;
}

#[tokio::test]
async fn chunked_body_with_extensions_and_trailers_passes_exactly() {
    within(async {
        let mut h = start();
        let alphabet = b"abcdefghijklmnopqrstuvwxyz";
        let request = [
            &b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"5;name=\"v\";x\r\nhello\r\n1A\r\n",
            alphabet,
            b"\r\n0;last\r\nX-Sum: 1\r\nX-Other: two\r\n\r\n",
            b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n",
        ]
        .concat();
        for piece in request.chunks(7) {
            h.client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(read_n(&mut h.server, request.len()).await, request);
        let response =
            b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        h.server.write_all(response).await.unwrap();
        assert_eq!(read_n(&mut h.client, response.len()).await, response);
        assert_eq!(h.gate.paths(), ["/up", "/after"]);
        finish(h).await;
    })
    .await;
}

#[tokio::test]
async fn content_length_body_then_denied_method() {
    within(async {
        let mut h = start();
        let head = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n";
        h.client.write_all(head).await.unwrap();
        h.client.write_all(b"01234").await.unwrap();
        tokio::task::yield_now().await;
        h.client
            .write_all(b"56789DELETE /y HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let forwarded = [&head[..], b"0123456789"].concat();
        assert_eq!(read_n(&mut h.server, forwarded.len()).await, forwarded);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        h.server.write_all(resp).await.unwrap();
        assert_eq!(
            read_all(&mut h.client).await,
            [&resp[..], FORBIDDEN].concat()
        );
        assert!(read_all(&mut h.server).await.is_empty());
        h.filter.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn ambiguous_framing_is_rejected() {
    within(async {
        let cases: [&[u8]; 5] = [
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
        ];
        for case in cases {
            expect_rejected(case, "bad_framing").await;
        }
    })
    .await;
}

#[tokio::test]
async fn oversize_head_is_rejected() {
    within(async {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.resize(MAX_HEAD + 4096, b'a');
        expect_rejected(&big, "head_too_large").await;
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=super::MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        expect_rejected(&many, "head_too_large").await;
    })
    .await;
}

#[tokio::test]
async fn garbage_is_rejected() {
    within(async {
        expect_rejected(b"\x00\x01 garbage\r\n\r\n", "malformed_head").await;
        expect_rejected(
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "malformed_head",
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn expect_continue_allowed_relays_interim_response() {
    within(async {
        let mut h = start();
        let head = b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        exchange(&mut h, head, cont).await;
        exchange(&mut h, b"data", b"").await;
        let created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        h.server.write_all(created).await.unwrap();
        h.client.write_all(b"DELETE /z HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        // The 100 did not complete the response: the 403 waits for the 201.
        assert_eq!(read_all(&mut h.client).await, [&created[..], FORBIDDEN].concat());
        h.filter.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn expect_continue_denied_gets_403_without_100() {
    within(async {
        let mut h = start();
        let head =
            b"POST /admin HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        h.client.write_all(head).await.unwrap();
        assert_eq!(read_all(&mut h.client).await, FORBIDDEN);
        assert!(read_all(&mut h.server).await.is_empty());
        h.filter.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn websocket_upgrade_switches_to_byte_copy() {
    within(async {
        let mut h = start();
        let req = b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi";
        exchange(&mut h, req, resp).await;
        // Would be denied (and is not HTTP at all) if it were still parsed.
        let frames = b"DELETE /admin HTTP/1.1\r\n\r\n\x00\xff\x88";
        exchange(&mut h, frames, b"\x00 garbage \xff").await;
        assert_eq!(h.gate.paths(), ["/chat"]);
        let up = (req.len() + frames.len()) as u64;
        assert_eq!(finish(h).await.0, up);
    })
    .await;
}

#[tokio::test]
async fn refused_upgrade_continues_as_http() {
    within(async {
        let mut h = start();
        let req =
            b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let resp = b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno";
        exchange(&mut h, req, resp).await;
        h.client
            .write_all(b"GET /admin HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_all(&mut h.client).await, FORBIDDEN);
        h.filter.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn connect_tunnel_after_2xx() {
    within(async {
        let mut h = start();
        let req = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n";
        exchange(&mut h, req, b"HTTP/1.1 200 Connection Established\r\n\r\n").await;
        exchange(&mut h, b"GET /admin HTTP/1.1\r\n\r\n", b"\x00\x01").await;
        let head = h.gate.heads.lock().unwrap()[0].clone();
        assert_eq!(head.uri.authority().unwrap().as_str(), "db.internal:5432");
        finish(h).await;
    })
    .await;
}

#[tokio::test]
async fn head_response_has_no_body_despite_content_length() {
    within(async {
        let mut h = start();
        let req = b"HEAD /file HTTP/1.1\r\nHost: a\r\n\r\nDELETE /file HTTP/1.1\r\nHost: a\r\n\r\n";
        h.client.write_all(req).await.unwrap();
        let head_len = req.len() / 2 - 2;
        assert_eq!(read_n(&mut h.server, head_len).await, &req[..head_len]);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        h.server.write_all(resp).await.unwrap();
        assert_eq!(
            read_all(&mut h.client).await,
            [&resp[..], FORBIDDEN].concat()
        );
        h.filter.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn response_until_close() {
    within(async {
        let mut h = start();
        let req = b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n";
        h.client.write_all(req).await.unwrap();
        assert_eq!(read_n(&mut h.server, req.len()).await, req);
        h.server
            .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ")
            .await
            .unwrap();
        h.server.write_all(b"part two").await.unwrap();
        h.server.shutdown().await.unwrap();
        let answer = read_all(&mut h.client).await;
        assert_eq!(
            answer,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, part two"
        );
        h.client.shutdown().await.unwrap();
        let (up, down) = h.filter.await.unwrap().unwrap();
        assert_eq!((up, down), (req.len() as u64, answer.len() as u64));
    })
    .await;
}

#[tokio::test]
async fn host_header_is_the_uri_authority() {
    within(async {
        let mut h = start();
        let req = b"GET /a/b?c=1 HTTP/1.1\r\nHost: example.com:8080\r\nX-Id: 7\r\n\r\n";
        exchange(&mut h, req, b"HTTP/1.1 204 No Content\r\n\r\n").await;
        exchange(
            &mut h,
            b"GET /plain HTTP/1.0\r\n\r\n",
            b"HTTP/1.0 304 Not Modified\r\n\r\n",
        )
        .await;
        // A target starting with `//` is a path (not a scheme-relative authority).
        let slashes = b"GET //admin/x HTTP/1.1\r\nHost: a\r\n\r\n";
        exchange(&mut h, slashes, b"HTTP/1.1 204 No Content\r\n\r\n").await;
        {
            let heads = h.gate.heads.lock().unwrap();
            let head = &heads[0];
            assert_eq!(head.method, Method::GET);
            assert_eq!(head.version, http::Version::HTTP_11);
            assert_eq!(head.uri.authority().unwrap().as_str(), "example.com:8080");
            assert_eq!(head.uri.path_and_query().unwrap().as_str(), "/a/b?c=1");
            assert_eq!(head.headers["x-id"], "7");
            assert_eq!(head.headers["host"], "example.com:8080");
            assert_eq!(heads[1].uri.authority(), None);
            assert_eq!(heads[1].version, http::Version::HTTP_10);
            assert_eq!(heads[2].uri.path(), "//admin/x");
            assert_eq!(heads[2].uri.authority().unwrap().as_str(), "a");
        }
        finish(h).await;
    })
    .await;
}

#[tokio::test]
async fn downstream_half_close_still_gets_response() {
    within(async {
        let mut h = start();
        let req = b"POST /last HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
        h.client.write_all(req).await.unwrap();
        h.client.shutdown().await.unwrap();
        // Upstream sees the request, then end of stream, and can still answer.
        assert_eq!(read_all(&mut h.server).await, req);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbye!";
        h.server.write_all(resp).await.unwrap();
        h.server.shutdown().await.unwrap();
        assert_eq!(read_all(&mut h.client).await, resp);
        let counts = h.filter.await.unwrap().unwrap();
        assert_eq!(counts, (req.len() as u64, resp.len() as u64));
    })
    .await;
}

#[tokio::test]
async fn bad_request_waits_for_earlier_response() {
    within(async {
        let mut h = start();
        let req = b"GET /fine HTTP/1.1\r\nHost: a\r\n\r\n";
        h.client
            .write_all(&[&req[..], b"NOT HTTP\x00\r\n\r\n"].concat())
            .await
            .unwrap();
        assert_eq!(read_n(&mut h.server, req.len()).await, req);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        h.server.write_all(resp).await.unwrap();
        let answer = read_all(&mut h.client).await;
        assert!(answer.starts_with(resp), "{answer:?}");
        assert!(answer[resp.len()..].starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        assert_eq!(h.gate.rejections(), ["malformed_head"]);
        h.filter.await.unwrap().unwrap();
    })
    .await;
}

/// A head that starts but never finishes gets 408 after [`super::HEAD_TIMEOUT`], counted.
#[tokio::test(start_paused = true)]
async fn a_slow_head_times_out_with_408() {
    let mut h = start();
    h.client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    tokio::time::sleep(super::HEAD_TIMEOUT + Duration::from_secs(1)).await;
    let answer = String::from_utf8(read_all(&mut h.client).await).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert_eq!(*h.gate.rejected.lock().unwrap(), ["head_timeout"]);
    assert!(
        h.gate.paths().is_empty(),
        "nothing was decided or forwarded"
    );
}
