//! HBONE: application bytes carried in HTTP/2 CONNECT streams over mutual TLS, as Istio
//! ambient speaks it. `pool.rs` is the client side (one pooled connection per source identity
//! and peer node, one stream per application connection), `server.rs` the :15008 listener.
//! `bridge` copies between an application socket and a stream, with half-close both ways:
//! END_STREAM is the application's FIN. The CONNECT's other fields: `authority.rs` (what
//! `:authority` names), `forwarded.rs` and `traceparent.rs` (the original source and the trace,
//! sent on every stream and, on the server, believed only as far as the access line).

pub mod authority;
pub mod baggage;
pub mod forwarded;
pub mod limits;
pub mod pool;
pub mod server;
pub mod traceparent;

use std::{future::poll_fn, io};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::{tcp::ReadHalf, TcpStream},
};

/// Flow-control windows and frame size, as the reference peer advertises them: large enough
/// that one stream is not throttled by round trips on a fast link.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 1 << 20;
/// How much of the application's data one read takes: small for request/response traffic,
/// doubling while reads fill the buffer (a bulk stream), up to the maximum. 64 KiB -> 256 KiB
/// reads took a bulk stream from 906 to 969-1015 MB/s.
const READ_MIN: usize = 16 << 10;
const READ_MAX: usize = 256 << 10;

/// Why a header a peer sent was ignored (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not the header's grammar (or not an address where one must be).
    Malformed,
    /// Longer than meshd reads.
    Oversized,
}

impl Ignored {
    pub fn reason(self) -> &'static str {
        match self {
            Ignored::Malformed => "malformed",
            Ignored::Oversized => "oversized",
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Copies `tcp` <-> (`send`, the stream `recv` resolves to) until both directions end;
/// returns bytes (tcp->stream, stream->tcp), and adds them to `counts` (tcp->stream,
/// stream->tcp) as they flow. `recv` may still be pending (the client side sends before the
/// peer's 200 arrives); if it fails, so does the bridge.
pub async fn bridge(
    tcp: &mut TcpStream,
    send: SendStream<Bytes>,
    recv: impl std::future::Future<Output = io::Result<RecvStream>>,
    counts: (&Counter, &Counter),
) -> io::Result<(u64, u64)> {
    let (mut rd, mut wr) = tcp.split();
    let from_peer = async {
        let recv = recv.await?;
        from_stream(recv, &mut wr, counts.1).await
    };
    let up = to_stream(&mut rd, send, counts.0);
    tokio::pin!(up, from_peer);
    tokio::select! {
        sent = &mut up => match sent {
            Ok(sent) => Ok((sent, from_peer.await?)),
            // A stream the peer refused is reset right after its answer: report the answer
            // (it comes first on the connection), not the reset.
            Err(e) => match tokio::time::timeout(PEER_VERDICT_GRACE, &mut from_peer).await {
                Ok(Err(verdict)) => Err(verdict),
                _ => Err(e),
            },
        },
        received = &mut from_peer => {
            let received = received?;
            Ok((up.await?, received))
        }
    }
}

/// How long a failed send waits for the peer's own account of the failure.
const PEER_VERDICT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Application bytes into the stream. A read buffer exists only while the socket has data:
/// the task waits for readability first and allocates then, so an idle connection (most of
/// them, most of the time) holds no buffer.
async fn to_stream(
    rd: &mut ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    count: &Counter,
) -> io::Result<u64> {
    let mut want = READ_MIN;
    let mut total = 0u64;
    loop {
        rd.readable().await?;
        let mut buf = BytesMut::with_capacity(want);
        let n = match rd.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        want = if n >= want {
            (want * 2).min(READ_MAX)
        } else {
            READ_MIN
        };
        let mut data = buf.freeze();
        total += data.len() as u64;
        count.inc_by(data.len() as u64);
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?
                .map_err(h2_io)?;
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false).map_err(h2_io)?;
        }
    }
}

async fn from_stream(
    mut recv: RecvStream,
    wr: &mut (impl AsyncWrite + Unpin),
    count: &Counter,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        wr.write_all(&chunk).await?;
        total += chunk.len() as u64;
        count.inc_by(chunk.len() as u64);
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    wr.shutdown().await?;
    Ok(total)
}
