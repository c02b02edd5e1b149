//! Tests for [`H2Io`] over an in-process HTTP/2 connection.

use super::*;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

/// A CONNECT stream seen from both ends.
struct Tunnel {
    client: H2Io,
    server: H2Io,
}

/// Opens one CONNECT stream over a fresh in-process HTTP/2 connection.
async fn tunnel() -> Tunnel {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.unwrap();
        let (req, respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        (req, respond)
    });
    let (send_req, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);
    let mut send_req = send_req.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("example.test:443")
        .body(())
        .unwrap();
    let (resp_fut, client_send) = send_req.send_request(req, false).unwrap();
    let (req, respond) = server_task.await.unwrap();
    let server = accept_connect(req, respond);
    let resp = resp_fut.await.unwrap();
    assert_eq!(resp.status(), 200);
    Tunnel {
        client: H2Io::new(client_send, resp.into_body()),
        server,
    }
}

/// Answers a CONNECT request with 200 and wraps the stream.
fn accept_connect(req: Request<RecvStream>, mut respond: SendResponse<Bytes>) -> H2Io {
    assert_eq!(req.method(), Method::CONNECT);
    let resp = Response::builder().status(200).body(()).unwrap();
    let send = respond.send_response(resp, false).unwrap();
    H2Io::new(send, req.into_body())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test]
async fn one_mib_both_ways_with_eof() {
    let Tunnel { client, server } = tunnel().await;
    let to_server = pattern(MIB, 7);
    let to_client = pattern(MIB, 99);

    let expect_at_server = to_server.clone();
    let reply = to_client.clone();
    let server_task = tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(server);
        let writer = tokio::spawn(async move {
            let mut src: &[u8] = &reply;
            tokio::io::copy(&mut src, &mut wr).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expect_at_server, "server received the client's bytes");
        writer.await.unwrap();
    });

    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        let mut src: &[u8] = &to_server;
        let n = tokio::io::copy(&mut src, &mut wr).await.unwrap();
        assert_eq!(n as usize, MIB);
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, to_client, "client received the server's bytes");
    writer.await.unwrap();
    server_task.await.unwrap();
}

#[tokio::test]
async fn eof_propagates_each_direction_independently() {
    let Tunnel {
        mut client,
        mut server,
    } = tunnel().await;
    client.write_all(b"ping").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping");

    // The other direction is still open after the client's half-close.
    server.write_all(b"pong").await.unwrap();
    server.shutdown().await.unwrap();
    // A second shutdown is a no-op.
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"pong");
}

#[tokio::test]
async fn cancel_reset_reads_as_eof_and_fails_writes() {
    let Tunnel { mut client, server } = tunnel().await;
    let H2Io { mut send, .. } = server;
    send.send_reset(Reason::CANCEL);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty());
    let err = client.write_all(b"late").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn error_reset_is_a_read_error() {
    let Tunnel { mut client, server } = tunnel().await;
    let H2Io { mut send, .. } = server;
    send.send_reset(Reason::INTERNAL_ERROR);
    let mut got = Vec::new();
    let err = client.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}
