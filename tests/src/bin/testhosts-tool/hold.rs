//! Many idle connections, event-driven (tokio, one thread):
//!
//! `echo-server-async ADDR`: echo every connection (any number of them); prints `ready ADDR`.
//! `hold ADDR N SECONDS`: open N connections (256 connecting at a time, `HOLD_CONNECTING`
//! overrides: 10000 opens them all at once), one byte echoed on
//! each so every one is established end to end; print `held OK FAILED`; keep them open and
//! idle for SECONDS; close them all and print `closed`.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Connections being opened at once.
const CONNECTING: usize = 256;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    raise_fd_limit()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// The soft limit on open files up to the hard one: tens of thousands of sockets.
fn raise_fd_limit() -> Result<(), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| e.to_string())
}

pub fn echo_server(addr: &str) -> Result<(), String> {
    runtime()?.block_on(async {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        println!(
            "ready {}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

pub fn hold(addr: &str, n: usize, secs: u64) -> Result<(), String> {
    runtime()?.block_on(async {
        let mut failed = 0u64;
        let mut held = Vec::with_capacity(n);
        let mut pending = tokio::task::JoinSet::new();
        let connecting = std::env::var("HOLD_CONNECTING")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CONNECTING);
        for i in 0..n {
            if pending.len() >= connecting {
                collect(pending.join_next().await, &mut held, &mut failed);
            }
            pending.spawn(open(addr.to_string(), i));
        }
        while let Some(done) = pending.join_next().await {
            collect(Some(done), &mut held, &mut failed);
        }
        println!("held {} {failed}", held.len());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        drop(held);
        println!("closed");
        Ok(())
    })
}

type Opened = Result<TcpStream, String>;

fn collect(
    done: Option<Result<Opened, tokio::task::JoinError>>,
    held: &mut Vec<TcpStream>,
    failed: &mut u64,
) {
    match done {
        Some(Ok(Ok(stream))) => held.push(stream),
        Some(Ok(Err(e))) => {
            *failed += 1;
            if *failed <= 5 {
                eprintln!("{e}");
            }
        }
        _ => *failed += 1,
    }
}

async fn open(addr: String, i: usize) -> Opened {
    let mut s = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connection {i}: connect: {e}"))?;
    s.write_all(b"x")
        .await
        .map_err(|e| format!("connection {i}: write: {e}"))?;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut byte)).await;
    match read {
        Ok(Ok(_)) if byte == *b"x" => Ok(s),
        Ok(Ok(_)) => Err(format!("connection {i}: not the echo")),
        Ok(Err(e)) => Err(format!("connection {i}: read: {e}")),
        Err(_) => Err(format!("connection {i}: no echo within 20 s")),
    }
}
