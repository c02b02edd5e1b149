//! A byte stream over one HTTP/2 stream.
//!
//! meshd's inbound HBONE server receives one HTTP/2 `CONNECT` stream per tunnelled TCP
//! connection. [`H2Io`] turns the stream's two halves ([`SendStream`] and [`RecvStream`]) into a
//! plain [`AsyncRead`] + [`AsyncWrite`] so that the rest of the proxy can treat it like a socket.
//!
//! Flow control is respected both ways: received bytes are released to the peer only once they
//! have been handed to the reader, and writes only send what the peer has granted.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest number of bytes a single `poll_write` sends as one DATA frame batch.
pub const MAX_WRITE: usize = 64 * 1024;

/// An HTTP/2 stream used as a bidirectional byte stream.
#[derive(Debug)]
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet handed to the reader (their capacity is not yet released).
    buf: Bytes,
    /// The peer finished its side (END_STREAM, or a graceful reset).
    read_eof: bool,
    /// END_STREAM has been sent.
    shut_down: bool,
}

impl H2Io {
    /// Wraps the two halves of an established HTTP/2 stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Io {
            send,
            recv,
            buf: Bytes::new(),
            read_eof: false,
            shut_down: false,
        }
    }

    /// Copies buffered bytes into `out` and releases their flow-control capacity.
    fn drain_into(&mut self, out: &mut ReadBuf<'_>) {
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        // Fails only if the stream is already gone; nothing to give back then.
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.buf.is_empty() {
                this.drain_into(out);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.buf = data,
                None => this.read_eof = true,
                Some(Err(e)) if is_graceful_reset(&e) => this.read_eof = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Poll::Ready(reset) = this.send.poll_reset(cx) {
            return Poll::Ready(Err(broken_pipe(reset.ok())));
        }
        let want = buf.len().min(MAX_WRITE);
        this.send.reserve_capacity(want);
        let granted = match ready!(poll_send_capacity(&mut this.send, cx)) {
            Ok(granted) => granted,
            Err(reason) => return Poll::Ready(Err(broken_pipe(Some(reason)))),
        };
        let n = granted.min(want);
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(|e| broken_pipe(e.reason()))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames from its connection task; there is nothing to flush here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut_down {
            this.shut_down = true;
            this.send
                .send_data(Bytes::new(), true)
                .map_err(|e| broken_pipe(e.reason()))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Waits until `send` has capacity (after `reserve_capacity`) and returns it.
///
/// Fails with the stream's reset reason (or `STREAM_CLOSED`) once the stream can no longer send.
pub(crate) fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<usize, Reason>> {
    loop {
        let capacity = send.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Poll::Ready(Err(reason_of(&e))),
            None => {
                let reason = match send.poll_reset(cx) {
                    Poll::Ready(Ok(reason)) => reason,
                    _ => Reason::STREAM_CLOSED,
                };
                return Poll::Ready(Err(reason));
            }
        }
    }
}

/// The reason carried by an h2 error; `INTERNAL_ERROR` for I/O and library errors.
pub(crate) fn reason_of(e: &h2::Error) -> Reason {
    e.reason().unwrap_or(Reason::INTERNAL_ERROR)
}

/// A peer reset that means "no more data", not failure.
fn is_graceful_reset(e: &h2::Error) -> bool {
    e.is_reset() && matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

/// Converts an h2 error into an I/O error, keeping the underlying I/O error where there is one.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 i/o error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// The error a write reports once the stream cannot carry data any more.
fn broken_pipe(reason: Option<Reason>) -> io::Error {
    let msg = match reason {
        Some(reason) => format!("HTTP/2 stream closed: {reason}"),
        None => "HTTP/2 stream closed".to_owned(),
    };
    io::Error::new(io::ErrorKind::BrokenPipe, msg)
}

#[cfg(test)]
#[path = "h2io_tests.rs"]
mod tests;
