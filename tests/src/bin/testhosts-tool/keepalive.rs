//! `keepalive ADDR CONNS SECONDS MARKER`: CONNS persistent connections to an echo server, each
//! sending request after request (MARKER + 100 bytes) and reading its exact echo, for SECONDS.
//! A connection the far side closes between two requests, before any byte of the answer, is
//! opened again and the request sent again (as HTTP clients retry an idempotent request on a
//! reused keep-alive connection): counted as `reconnected`, not failed. Anything else is a
//! failure: a connection that cannot be opened, a reset or close in the middle of an answer,
//! an answer that is not the echo. Prints `keepalive ok N failed M reconnected R`.

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    reconnected: AtomicU64,
}

/// How one request went.
enum Outcome {
    Echoed,
    /// Closed or reset before the first byte of the answer.
    ClosedBefore(String),
    Failed(String),
}

pub fn run(addr: &str, conns: usize, secs: u64, marker: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counts = Counts::default();
    std::thread::scope(|s| {
        for c in 0..conns {
            let counts = &counts;
            s.spawn(move || connection(addr, c, marker.as_bytes(), deadline, counts));
        }
    });
    println!(
        "keepalive ok {} failed {} reconnected {}",
        counts.ok.load(Relaxed),
        counts.failed.load(Relaxed),
        counts.reconnected.load(Relaxed)
    );
    Ok(())
}

fn connection(addr: &str, c: usize, marker: &[u8], deadline: Instant, counts: &Counts) {
    let mut stream: Option<TcpStream> = None;
    let mut i = 0u64;
    while Instant::now() < deadline {
        let conn = match stream.take() {
            Some(s) => Some((s, true)),
            None => match TcpStream::connect(addr) {
                Ok(s) => Some((s, false)),
                Err(e) => {
                    counts.failed.fetch_add(1, Relaxed);
                    eprintln!("conn {c}: connect failed: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                    None
                }
            },
        };
        let Some((mut s, reused)) = conn else {
            continue;
        };
        i += 1;
        let request = [
            marker,
            format!(" conn {c} request {i} ").as_bytes(),
            &[b'x'; 100],
        ]
        .concat();
        match exchange(&mut s, &request) {
            Outcome::Echoed => {
                counts.ok.fetch_add(1, Relaxed);
                stream = Some(s);
            }
            Outcome::ClosedBefore(why) if reused => {
                counts.reconnected.fetch_add(1, Relaxed);
                eprintln!("conn {c}: closed between requests ({why}): reconnecting");
                i -= 1;
            }
            Outcome::ClosedBefore(why) | Outcome::Failed(why) => {
                counts.failed.fetch_add(1, Relaxed);
                eprintln!("conn {c}: request {i} failed: {why}");
            }
        }
    }
}

fn exchange(s: &mut TcpStream, request: &[u8]) -> Outcome {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if let Err(e) = s.write_all(request) {
        return Outcome::ClosedBefore(format!("write: {e}"));
    }
    let mut answer = vec![0u8; request.len()];
    let mut got = 0;
    while got < answer.len() {
        match s.read(&mut answer[got..]) {
            Ok(0) if got == 0 => return Outcome::ClosedBefore("closed".into()),
            Ok(0) => return Outcome::Failed(format!("closed after {got} bytes of the answer")),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if got == 0 && e.kind() != ErrorKind::WouldBlock => {
                return Outcome::ClosedBefore(format!("read: {e}"))
            }
            Err(e) => return Outcome::Failed(format!("read after {got} bytes: {e}")),
        }
    }
    if answer != request {
        return Outcome::Failed("the answer is not the echo".into());
    }
    Outcome::Echoed
}
