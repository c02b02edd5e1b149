//! HTTP/1.1 message framing for the relay: how long a body is (`Content-Length`, chunked, until
//! close) and the buffered reader / counting writer that move bytes through unchanged.
use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of one read from either side.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// Longest chunk-size line (size plus extensions) accepted.
pub(super) const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Longest trailer section (after the last chunk) accepted.
pub(super) const MAX_TRAILERS: usize = 64 * 1024;

/// How the body that follows a message head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    /// No body: the next byte starts the next message.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: chunks, a last chunk, trailers.
    Chunked,
    /// Everything until the sender closes (responses only).
    UntilClose,
}

/// The framing headers of one message head, before deciding what they mean.
#[derive(Debug, Default)]
pub(super) struct Framing {
    /// The single value every `Content-Length` agrees on; `Err` when they differ or are invalid.
    length: Option<Result<u64, ()>>,
    /// Codings listed across all `Transfer-Encoding` headers, in order, lower-cased.
    codings: Vec<String>,
}

impl Framing {
    /// Collects `Content-Length` and `Transfer-Encoding` from parsed headers.
    pub(super) fn from_headers(headers: &[httparse::Header<'_>]) -> Self {
        let mut framing = Framing::default();
        for header in headers {
            if header.name.eq_ignore_ascii_case("content-length") {
                framing.add_length(header.value);
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                let value = String::from_utf8_lossy(header.value).to_ascii_lowercase();
                let codings = value.split(',').map(str::trim).filter(|c| !c.is_empty());
                framing.codings.extend(codings.map(str::to_owned));
            }
        }
        framing
    }

    fn add_length(&mut self, value: &[u8]) {
        for item in value.split(|b| *b == b',') {
            let item = item.trim_ascii();
            let parsed = parse_decimal(item).ok_or(());
            self.length = Some(match (self.length, parsed) {
                (None, new) => new,
                (Some(Ok(old)), Ok(new)) if old == new => Ok(old),
                _ => Err(()),
            });
        }
    }

    /// Whether `chunked` is the last coding, and the only `chunked` in the list.
    fn chunked_last(&self) -> bool {
        let chunked = self.codings.iter().filter(|c| *c == "chunked").count();
        chunked == 1 && self.codings.last().is_some_and(|c| c == "chunked")
    }

    /// Request body framing; `Err` for anything a smuggler could exploit: both `Content-Length`
    /// and `Transfer-Encoding`, invalid or disagreeing lengths, or a last coding other than
    /// `chunked`.
    pub(super) fn request_body(&self) -> Result<Body, ()> {
        match (&self.length, self.codings.is_empty()) {
            (Some(_), false) => Err(()),
            (None, false) if self.chunked_last() => Ok(Body::Chunked),
            (None, false) => Err(()),
            (Some(Ok(0)), true) | (None, true) => Ok(Body::Empty),
            (Some(Ok(n)), true) => Ok(Body::Length(*n)),
            (Some(Err(())), true) => Err(()),
        }
    }

    /// Response body framing for a response that may carry one (RFC 9112 section 6.3).
    pub(super) fn response_body(&self) -> Result<Body, ()> {
        match (&self.length, self.codings.is_empty()) {
            (_, false) if self.chunked_last() => Ok(Body::Chunked),
            (_, false) => Ok(Body::UntilClose),
            (Some(Ok(0)), true) => Ok(Body::Empty),
            (Some(Ok(n)), true) => Ok(Body::Length(*n)),
            (Some(Err(())), true) => Err(()),
            (None, true) => Ok(Body::UntilClose),
        }
    }
}

/// Parses a non-empty run of ASCII digits.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An error for a peer that broke the framing mid-message.
pub(super) fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A write half that counts what it wrote.
pub(super) struct Out<W> {
    io: W,
    /// Bytes written so far.
    pub(super) sent: u64,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    pub(super) fn new(io: W) -> Self {
        Out { io, sent: 0 }
    }

    /// Writes all of `bytes`.
    pub(super) async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// Flushes and shuts the write side down (half-close); a peer already gone is not an error.
    pub(super) async fn shutdown(&mut self) -> io::Result<()> {
        match self.io.shutdown().await {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }
}

/// A read half with the bytes read but not yet consumed.
pub(super) struct Inbound<R> {
    io: R,
    /// Read, not yet consumed.
    pub(super) buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    pub(super) fn new(io: R) -> Self {
        Inbound {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Reads once more into the buffer; `Ok(0)` at end of stream. Cancel safe.
    pub(super) async fn fill(&mut self) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        self.io.read_buf(&mut self.buf).await
    }

    /// Forwards the first `n` buffered bytes and consumes them.
    pub(super) async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Out<W>,
        n: usize,
    ) -> io::Result<()> {
        out.write(&self.buf[..n]).await?;
        self.buf.advance(n);
        Ok(())
    }

    /// Makes at least `n` bytes available; end of stream before that is an error.
    async fn need(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Forwards exactly `n` bytes, buffered first, then as they arrive.
    pub(super) async fn relay_exact<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Out<W>,
        mut n: u64,
    ) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() {
                self.need(1).await?;
            }
            let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
            self.forward(out, take).await?;
            n -= take as u64;
        }
        Ok(())
    }

    /// Forwards everything up to end of stream.
    pub(super) async fn relay_to_eof<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Out<W>,
    ) -> io::Result<()> {
        loop {
            if !self.buf.is_empty() {
                self.forward(out, self.buf.len()).await?;
            }
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }

    /// Forwards a message: its head (`head` bytes, buffered) and its body. A fixed-length body's
    /// buffered part leaves with the head in one write (one segment, one HTTP/2 DATA frame).
    pub(super) async fn relay_message<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Out<W>,
        head: usize,
        body: Body,
    ) -> io::Result<()> {
        let Body::Length(n) = body else {
            self.forward(out, head).await?;
            return self.relay_body(out, body).await;
        };
        let buffered = (self.buf.len() - head) as u64;
        let with_head = n.min(buffered);
        self.forward(out, head + with_head as usize).await?;
        self.relay_exact(out, n - with_head).await
    }

    /// Forwards one body with the given framing.
    pub(super) async fn relay_body<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Out<W>,
        body: Body,
    ) -> io::Result<()> {
        match body {
            Body::Empty => Ok(()),
            Body::Length(n) => self.relay_exact(out, n).await,
            Body::Chunked => self.relay_chunked(out).await,
            Body::UntilClose => self.relay_to_eof(out).await,
        }
    }

    /// Forwards a chunked body byte for byte: every chunk with its size line and extensions, the
    /// last chunk, then the trailer section up to its empty line.
    async fn relay_chunked<W: AsyncWrite + Unpin>(&mut self, out: &mut Out<W>) -> io::Result<()> {
        loop {
            let (line, size) = self.chunk_size_line().await?;
            self.forward(out, line).await?;
            if size == 0 {
                return self.relay_trailers(out).await;
            }
            self.relay_exact(out, size).await?;
            self.need(2).await?;
            if &self.buf[..2] != b"\r\n" {
                return Err(invalid("chunk data not followed by CRLF"));
            }
            self.forward(out, 2).await?;
        }
    }

    /// Waits for a complete chunk-size line; returns its length (with CRLF) and the chunk size.
    async fn chunk_size_line(&mut self) -> io::Result<(usize, u64)> {
        loop {
            if self.buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                return Err(invalid("chunk size is not hexadecimal"));
            }
            match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((len, size))) => {
                    let text = &self.buf[..len - 2];
                    if text.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
                        return Err(invalid("control byte in chunk extension"));
                    }
                    return Ok((len, size));
                }
                Ok(httparse::Status::Partial) if self.buf.len() <= MAX_CHUNK_LINE => {
                    let wanted = self.buf.len() + 1;
                    self.need(wanted).await?;
                }
                _ => return Err(invalid("bad chunk size line")),
            }
        }
    }

    /// Forwards trailer fields up to and including the empty line that ends the body.
    async fn relay_trailers<W: AsyncWrite + Unpin>(&mut self, out: &mut Out<W>) -> io::Result<()> {
        let mut total = 0;
        loop {
            let line = match self.buf.windows(2).position(|w| w == b"\r\n") {
                Some(end) => end + 2,
                None if self.buf.len() + total > MAX_TRAILERS => {
                    return Err(invalid("trailer section too large"));
                }
                None => {
                    let wanted = self.buf.len() + 1;
                    self.need(wanted).await?;
                    continue;
                }
            };
            if self.buf[..line - 2]
                .iter()
                .any(|b| *b == b'\n' || *b == b'\r')
            {
                return Err(invalid("bare line break in trailers"));
            }
            total += line;
            self.forward(out, line).await?;
            if line == 2 {
                return Ok(());
            }
        }
    }
}
