//! meshd's log writer (stderr). Access log lines — one per connection, the only log traffic that
//! grows with load — are gathered and written in batches: a write(2) per line cost ~5 % of
//! meshd's CPU under connection-per-request load (pipe writes waking the log reader). Every
//! other event is written at once, after whatever access lines are pending, so the order on
//! stderr is the order of the events. Pending lines are written when 32 KiB gather, every
//! 100 ms, before any other event, and by [`flush`] (meshd calls it when it stops).

use std::{
    io::{self, Write},
    sync::Mutex,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// The tracing target of access log lines.
pub const ACCESS_TARGET: &str = "access";
const BATCH_BYTES: usize = 32 * 1024;
const BATCH_EVERY: Duration = Duration::from_millis(100);

static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<u8>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes out pending access lines.
pub fn flush() {
    let mut buf = pending();
    write_out(&mut buf);
}

fn write_out(buf: &mut Vec<u8>) {
    if !buf.is_empty() {
        let _ = io::stderr().lock().write_all(buf);
        buf.clear();
    }
}

/// The `MakeWriter` for tracing-subscriber's fmt layer.
#[derive(Clone, Copy)]
pub struct Stderr;

impl Stderr {
    /// Starts the thread that writes pending lines every [`BATCH_EVERY`].
    pub fn start() -> Stderr {
        let _ = std::thread::Builder::new()
            .name("meshd-log".into())
            .spawn(|| loop {
                std::thread::sleep(BATCH_EVERY);
                flush();
            });
        Stderr
    }
}

/// One event's writer: appends the formatted event (tracing-subscriber writes it in one piece)
/// to the pending lines, which it holds locked, and writes them out when dropped unless the
/// event is an access line and the batch is not full.
pub struct EventWriter {
    pending: std::sync::MutexGuard<'static, Vec<u8>>,
    batched: bool,
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.batched || self.pending.len() >= BATCH_BYTES {
            write_out(&mut self.pending);
        }
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            pending: pending(),
            batched: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        EventWriter {
            pending: pending(),
            batched: meta.target() == ACCESS_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_wait_other_events_write_through_in_order() {
        let make = Stderr;
        let access = tracing::Metadata::new(
            "a",
            ACCESS_TARGET,
            tracing::Level::INFO,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        );
        {
            let mut w = make.make_writer_for(&access);
            w.write_all(b"access line\n").unwrap();
        }
        assert_eq!(pending().as_slice(), b"access line\n");
        {
            let mut w = make.make_writer();
            w.write_all(b"other\n").unwrap();
        }
        // The other event wrote the pending line before itself.
        assert!(pending().is_empty());
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unimplemented!()
        }
    }
}
