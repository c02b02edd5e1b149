//! The whole HTTP/1.1 filter over in-memory pipes: the input up to the first 0xFF byte is what
//! the caller sends, the rest what the workload answers (each side then closes). Bodies
//! (lengths, chunks, trailers), pipelining, 100-continue, upgrades and local 400/403 answers all
//! run; the clock is paused, so head timeouts fire at once instead of hanging. No panic, no
//! hang, and the byte counts the filter reports are the bytes each side received.
#![no_main]

use std::sync::OnceLock;

use http::request::Parts;
use libfuzzer_sys::fuzz_target;
use meshd::l7::{http1, Exchange, RequestGate, Verdict};
use tokio::io::{duplex, split, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Denies paths under `/admin`, allows the rest.
struct Gate;

impl RequestGate for Gate {
    fn decide(&self, head: &Parts) -> Verdict {
        match head.uri.path().starts_with("/admin") {
            true => Verdict::Deny,
            false => Verdict::Allow,
        }
    }
    fn rejected(&self, _reason: &'static str) {}
    fn completed(&self, _exchange: &Exchange<'_>) {}
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

/// Writes `sent` then closes, while reading everything the other side sends.
async fn peer<S: AsyncRead + AsyncWrite>(stream: S, sent: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = split(stream);
    let send = async {
        // The filter may close first (a refused request): not an error here.
        let _ = write.write_all(sent).await;
        let _ = write.shutdown().await;
    };
    let mut got = Vec::new();
    let receive = read.read_to_end(&mut got);
    let ((), _) = tokio::join!(send, receive);
    got
}

fuzz_target!(|data: &[u8]| {
    let split_at = data.iter().position(|b| *b == 0xff).unwrap_or(data.len());
    let request = &data[..split_at];
    let response = data.get(split_at + 1..).unwrap_or_default();
    runtime().block_on(async {
        let (client, downstream) = duplex(64 * 1024);
        let (upstream, workload) = duplex(64 * 1024);
        let (relayed, to_workload, to_client) = tokio::join!(
            http1::filter(downstream, upstream, &Gate),
            peer(workload, response),
            peer(client, request),
        );
        if let Ok((up, down)) = relayed {
            assert_eq!(up, to_workload.len() as u64, "bytes sent upstream");
            assert_eq!(down, to_client.len() as u64, "bytes sent downstream");
        }
    });
});
