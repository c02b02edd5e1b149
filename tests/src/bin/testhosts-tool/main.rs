//! Network roles the end-to-end tests run inside test hosts. Plain std networking on purpose:
//! it is the "application that changes nothing".
//!
//! testhosts-tool echo-server ADDR        print `ready ADDR`, echo every connection; when the
//!                                        client half-closes, finish writing and close too
//! testhosts-tool client ADDR BYTES CONNS [MARKER]
//!                                        open CONNS connections at once, send BYTES each
//!                                        (MARKER repeated, if given), half-close, read the echo
//!                                        back and compare; print `peer ADDR` (getpeername) and
//!                                        `ok CONNS BYTES`; `BIND_PORT=N` binds local port N
//!                                        first
//! testhosts-tool client-nonblocking ADDR BYTES CONNS
//!                                        the same with non-blocking sockets and readiness
//!                                        (tokio), as event-driven applications do
//! testhosts-tool loop ADDR SECONDS       one connection after another for SECONDS, 100 bytes
//!                                        echoed on each; print `loop ok N failed M`
//! testhosts-tool keepalive ADDR CONNS SECONDS MARKER
//!                                        CONNS persistent connections, request after request
//!                                        (echoed), closed-between-requests retried; print
//!                                        `keepalive ok N failed M reconnected R` (keepalive.rs)
//! testhosts-tool echo-server-async ADDR / hold ADDR N SECONDS
//!                                        tens of thousands of idle connections (hold.rs)
//! testhosts-tool raw ADDR TEXT|random    send bytes, print `closed` when the peer closes
//! testhosts-tool hbone ADDR AUTHORITY [CERT KEY ['NAME: VALUE'...]]
//!                                        mTLS (TLS 1.3, ALPN h2) to ADDR with the given client
//!                                        SVID, CONNECT AUTHORITY with these extra headers; print
//!                                        `server-id SPIFFE_ID` (the server's URI SAN), `status N`
//!                                        and, on 200, `echo ok` after a round trip; `tls-error
//!                                        ...` on failure
//! testhosts-tool grpc-server ADDR        HTTP/2 prior knowledge; print `ready ADDR`; answer every
//!                                        gRPC call (one message) with `PATH:PAYLOAD` and
//!                                        grpc-status 0
//! testhosts-tool grpc-client ADDR PATH...
//!                                        one HTTP/2 connection, one unary call ("hi") per PATH in
//!                                        turn: print `PATH status=N grpc-status=S body=B` each,
//!                                        then `connections=1`; exit 1 on a transport failure

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    thread,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["echo-server", addr] => echo_server(addr),
        ["client", addr, bytes, conns] => {
            client(addr, parse(bytes), parse(conns), None, one_connection)
        }
        ["client", addr, bytes, conns, marker] => client(
            addr,
            parse(bytes),
            parse(conns),
            Some(marker.as_bytes()),
            one_connection,
        ),
        ["client-nonblocking", addr, bytes, conns] => client(
            addr,
            parse(bytes),
            parse(conns),
            None,
            one_connection_nonblocking,
        ),
        ["loop", addr, secs] => repeat(addr, parse(secs), b""),
        ["loop", addr, secs, marker] => repeat(addr, parse(secs), marker.as_bytes()),
        ["keepalive", addr, conns, secs, marker] => {
            keepalive::run(addr, parse(conns), parse(secs) as u64, marker)
        }
        ["echo-server-async", addr] => hold::echo_server(addr),
        ["hold", addr, n, secs] => hold::hold(addr, parse(n), parse(secs) as u64),
        ["raw", addr, what] => raw(addr, what),
        ["hbone", addr, authority] => hbone::run(addr, authority, None, &[]),
        ["hbone", addr, authority, cert, key, headers @ ..] => {
            hbone::run(addr, authority, Some((cert, key)), headers)
        }
        ["rapid-reset", addr, authority, cert, key, n] => {
            abuse::rapid_reset(addr, authority, (cert, key), parse(n))
        }
        ["hbone-idle", addr, cert, key, secs] => abuse::idle(addr, (cert, key), parse(secs) as u64),
        ["half-hellos", addr, n, secs] => abuse::half_hellos(addr, parse(n), parse(secs) as u64),
        ["grpc-server", addr] => grpc::server(addr),
        ["grpc-client", addr, paths @ ..] if !paths.is_empty() => grpc::client(addr, paths),
        _ => Err("usage: see the top of testhosts-tool.rs".to_string()),
    };
    if let Err(e) = result {
        eprintln!("testhosts-tool: {e}");
        std::process::exit(1);
    }
}

fn parse(s: &str) -> usize {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

fn echo_server(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!(
        "ready {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            if let Ok(peer) = stream.peer_addr() {
                println!("accepted {peer}");
            }
            let mut read_half = stream.try_clone().expect("clone");
            let _ = std::io::copy(&mut read_half, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
    Ok(())
}

/// Deterministic, non-repeating-looking payload so a misordered byte is caught.
fn payload(len: usize, seed: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9u32 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// One echoed connection: sends the bytes, half-closes, reads the echo; returns (peer address,
/// bytes sent, bytes read back).
type OneConnection = fn(&str, Vec<u8>) -> Result<(String, Vec<u8>, Vec<u8>), String>;

fn client(
    addr: &str,
    bytes: usize,
    conns: usize,
    marker: Option<&[u8]>,
    one: OneConnection,
) -> Result<(), String> {
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.to_string();
            let data = match marker {
                Some(m) => m.iter().copied().cycle().take(bytes).collect(),
                None => payload(bytes, i),
            };
            thread::spawn(move || compare(&addr, one(&addr, data)?))
        })
        .collect();
    let mut peers = Vec::new();
    for w in workers {
        peers.push(
            w.join()
                .map_err(|_| "client thread panicked".to_string())??,
        );
    }
    peers.sort();
    peers.dedup();
    for p in peers {
        println!("peer {p}");
    }
    println!("ok {conns} {bytes}");
    Ok(())
}

/// Checks that what came back is what was sent; returns the peer address.
fn compare(addr: &str, (peer, sent, got): (String, Vec<u8>, Vec<u8>)) -> Result<String, String> {
    if got != sent {
        return Err(format!(
            "echo from {addr} differs: sent {} bytes, got {}",
            sent.len(),
            got.len()
        ));
    }
    Ok(peer)
}

fn one_connection_nonblocking(
    addr: &str,
    sent: Vec<u8>,
) -> Result<(String, Vec<u8>, Vec<u8>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let peer = stream.peer_addr().map_err(|e| e.to_string())?.to_string();
        let (mut reader, mut writer) = stream.into_split();
        let send = async {
            writer.write_all(&sent).await?;
            writer.shutdown().await
        };
        let mut got = Vec::with_capacity(sent.len());
        let (sent_result, read_result) = tokio::join!(send, reader.read_to_end(&mut got));
        read_result.map_err(|e| format!("read from {addr}: {e}"))?;
        sent_result.map_err(|e| format!("write to {addr}: {e}"))?;
        Ok((peer, sent, got))
    })
}

fn one_connection(addr: &str, sent: Vec<u8>) -> Result<(String, Vec<u8>, Vec<u8>), String> {
    let bytes = sent.len();
    let mut stream = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?.to_string();
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let send = thread::spawn(move || {
        writer.write_all(&sent)?;
        writer.shutdown(Shutdown::Write)?;
        Ok::<_, std::io::Error>(sent)
    });
    let mut got = Vec::with_capacity(bytes);
    stream
        .read_to_end(&mut got)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let sent = send
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| format!("write to {addr}: {e}"))?;
    Ok((peer, sent, got))
}

/// Connects to `addr`; with `BIND_PORT=N` in the environment, from local port N (tests make two
/// pods' connections have the very same in-pod tuple).
fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let Some(port) = std::env::var("BIND_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
    else {
        return TcpStream::connect(addr);
    };
    let dst: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::other(format!("{addr} is not ip:port")))?;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    sock.connect(&dst.into())?;
    Ok(sock.into())
}

/// Echoed connections one after another for `secs`, each payload starting with `marker`.
fn repeat(addr: &str, secs: usize, marker: &[u8]) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs as u64);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut i = 0;
    while std::time::Instant::now() < deadline {
        i += 1;
        let sent = [marker, &payload(100, i)].concat();
        match one_connection(addr, sent).and_then(|r| compare(addr, r)) {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                eprintln!("connection {i} failed: {e}");
            }
        }
    }
    println!("loop ok {ok} failed {failed}");
    Ok(())
}

fn raw(addr: &str, what: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let bytes = if what == "random" {
        payload(512, 7)
    } else {
        what.replace("\\r\\n", "\r\n").into_bytes()
    };
    let _ = stream.write_all(&bytes);
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
    println!("closed after {} bytes back", sink.len());
    Ok(())
}

mod abuse;
mod grpc;
mod hbone;
mod hold;
mod keepalive;
