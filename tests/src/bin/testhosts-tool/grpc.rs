//! A minimal gRPC server and client over HTTP/2 with prior knowledge (h2, no TLS), enough to
//! exercise per-call decisions on a `protocol: grpc` port: unary calls whose request and
//! response are one length-prefixed message each.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::{server::SendResponse, RecvStream};
use http::{HeaderMap, HeaderValue, Request, Response};

/// How long one call may take before the client gives up on the connection.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// One gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, payload.
fn frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(0);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.freeze()
}

/// The payload of the one message in `body`, if `body` is exactly one whole message.
fn unframe(body: &[u8]) -> Option<&[u8]> {
    let (head, rest) = body.split_at_checked(5)?;
    let len = u32::from_be_bytes(head[1..5].try_into().ok()?) as usize;
    (head[0] == 0 && rest.len() == len).then_some(rest)
}

/// Reads a whole body, releasing flow-control capacity as it goes.
async fn read_body(body: &mut RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    Ok(got)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// `grpc-server ADDR`: answers every gRPC call with its path and payload, `PATH:PAYLOAD`.
pub fn server(addr: &str) -> Result<(), String> {
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        println!("ready {local}");
        loop {
            let (tcp, peer) = listener.accept().await.map_err(|e| e.to_string())?;
            println!("accepted {peer}");
            tokio::spawn(async move {
                if let Err(e) = serve_connection(tcp).await {
                    println!("connection from {peer} failed: {e}");
                }
            });
        }
    })
}

async fn serve_connection(tcp: tokio::net::TcpStream) -> Result<(), h2::Error> {
    let mut conn = h2::server::handshake(tcp).await?;
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = accepted?;
        tokio::spawn(async move {
            let path = req.uri().path().to_string();
            if let Err(e) = serve_call(req, respond).await {
                println!("call {path} failed: {e}");
            }
        });
    }
    Ok(())
}

async fn serve_call(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let request = read_body(&mut body).await?;
    println!("call {path}");
    if parts.method != http::Method::POST || !is_grpc(&parts.headers) {
        let resp = Response::builder().status(415).body(()).expect("static");
        respond.send_response(resp, true)?;
        return Ok(());
    }
    let resp = Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(())
        .expect("static");
    let mut send = respond.send_response(resp, false)?;
    let mut trailers = HeaderMap::new();
    match unframe(&request) {
        Some(payload) => {
            let mut echo = format!("{path}:").into_bytes();
            echo.extend_from_slice(payload);
            send.send_data(frame(&echo), false)?;
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
        }
        None => {
            // INTERNAL: the request was not one well-formed message.
            trailers.insert("grpc-status", HeaderValue::from_static("13"));
        }
    }
    send.send_trailers(trailers)
}

/// `grpc-client ADDR PATH...`: one connection, one unary call per path in turn.
pub fn client(addr: &str, paths: &[&str]) -> Result<(), String> {
    runtime()?.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let connections = 1;
        let (send, conn) = h2::client::handshake(tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let driver = tokio::spawn(conn);
        for path in paths {
            let line = tokio::time::timeout(CALL_TIMEOUT, call(send.clone(), addr, path))
                .await
                .map_err(|_| format!("{path}: no answer within {CALL_TIMEOUT:?}"))?
                .map_err(|e| format!("{path}: {e}"))?;
            println!("{line}");
        }
        if driver.is_finished() {
            return Err(format!("connection ended: {:?}", driver.await));
        }
        println!("connections={connections}");
        Ok(())
    })
}

/// One unary call; its result line `PATH status=N grpc-status=S body=B`.
async fn call(
    send: h2::client::SendRequest<Bytes>,
    addr: &str,
    path: &str,
) -> Result<String, h2::Error> {
    let mut send = send.ready().await?;
    let request = Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .expect("valid request");
    let (response, mut stream) = send.send_request(request, false)?;
    stream.send_data(frame(b"hi"), true)?;
    let response = response.await?;
    let status = response.status().as_u16();
    // A trailers-only answer carries grpc-status in its headers.
    let mut grpc_status = response.headers().get("grpc-status").cloned();
    let mut body = response.into_body();
    let data = read_body(&mut body).await?;
    if let Some(trailers) = body.trailers().await? {
        grpc_status = trailers.get("grpc-status").cloned().or(grpc_status);
    }
    let grpc_status = grpc_status
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body = match unframe(&data) {
        Some(payload) => String::from_utf8_lossy(payload).into_owned(),
        None if data.is_empty() => "-".to_string(),
        None => format!("unframed:{}", String::from_utf8_lossy(&data)),
    };
    Ok(format!(
        "{path} status={status} grpc-status={grpc_status} body={body}"
    ))
}
