//! Network roles the end-to-end tests run inside test hosts. Plain std networking on purpose:
//! it is the "application that changes nothing".
//!
//! testhosts-tool echo-server ADDR        print `ready ADDR`, echo every connection; when the
//!                                        client half-closes, finish writing and close too
//! testhosts-tool client ADDR BYTES CONNS open CONNS connections at once, send BYTES each,
//!                                        half-close, read the echo back and compare; print
//!                                        `peer ADDR` (getpeername) and `ok CONNS BYTES`

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
        ["client", addr, bytes, conns] => client(addr, parse(bytes), parse(conns)),
        _ => Err("usage: echo-server ADDR | client ADDR BYTES CONNS".to_string()),
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

fn client(addr: &str, bytes: usize, conns: usize) -> Result<(), String> {
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.to_string();
            thread::spawn(move || one_connection(&addr, bytes, i))
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

fn one_connection(addr: &str, bytes: usize, seed: usize) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?.to_string();
    let sent = payload(bytes, seed);
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
    if got != sent {
        return Err(format!(
            "echo from {addr} differs: sent {} bytes, got {}",
            sent.len(),
            got.len()
        ));
    }
    Ok(peer)
}
