//! The limits of meshd's :15008 listener: what one peer connection may hold and how long it may
//! take. Each is a config key (`hbone:`) with a default; each refusal is counted
//! (`meshd_tls_handshakes_total{result=...}` for handshakes, `meshd_connections_rejected_total
//! {reason="hbone_*"}` for what ends an established connection).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::oneshot;

use crate::config::{de_duration, ConfigError};

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HboneLimits {
    /// CONNECT streams open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a peer's stream over it is refused (REFUSED_STREAM). Per-caller totals: `limits:`.
    pub max_concurrent_streams: u32,
    /// Largest request header block accepted, in bytes (a CONNECT head is ~100 bytes); a larger
    /// one ends the stream, an endless one (CONTINUATION flood) the connection.
    pub max_header_list_size: u32,
    /// Streams a peer may open and reset before meshd accepts them (HTTP/2 rapid reset,
    /// CVE-2023-44487); past it the connection gets GOAWAY (ENHANCE_YOUR_CALM).
    pub max_pending_accept_reset_streams: usize,
    /// Streams meshd may reset for a peer's protocol errors before it ends the connection.
    pub max_local_error_reset_streams: usize,
    /// TLS handshakes in progress at once on this listener. A new connection over it evicts the
    /// oldest handshake still pending (`result="handshake_evicted"`): a half-open flood holds
    /// bounded memory, and a well-behaved peer, whose handshake takes milliseconds, still gets
    /// through.
    pub max_pending_handshakes: usize,
    /// From accept to a finished TLS handshake (slowloris).
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// A connection with no stream open for this long is closed with GOAWAY.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
}

impl Default for HboneLimits {
    fn default() -> Self {
        HboneLimits {
            max_concurrent_streams: 1024,
            max_header_list_size: 16 << 10,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            max_pending_handshakes: 512,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

impl HboneLimits {
    pub fn validate(self) -> Result<HboneLimits, ConfigError> {
        let positive = [
            (
                "max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
            ("max_header_list_size", self.max_header_list_size as usize),
            ("max_pending_handshakes", self.max_pending_handshakes),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(crate::config::err(
                    format!("hbone.{field}"),
                    "must be at least 1",
                ));
            }
        }
        for (field, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(crate::config::err(
                    format!("hbone.{field}"),
                    "must be at least 100ms",
                ));
            }
        }
        Ok(self)
    }
}

/// The TLS handshakes in progress on one listener, oldest first; at most `cap`.
pub struct Handshakes {
    cap: usize,
    pending: Mutex<(u64, BTreeMap<u64, oneshot::Sender<()>>)>,
}

/// One handshake's place; leaving it (drop) frees the place.
pub struct Slot {
    owner: Arc<Handshakes>,
    id: u64,
    /// Fires when a newer connection evicted this handshake.
    pub evicted: oneshot::Receiver<()>,
}

impl Handshakes {
    pub fn new(cap: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            cap,
            pending: Mutex::new((0, BTreeMap::new())),
        })
    }

    /// A place for a new handshake, evicting the oldest pending one when all are taken;
    /// whether one was evicted.
    pub fn enter(self: &Arc<Self>) -> (Slot, bool) {
        let mut guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (next, pending) = &mut *guard;
        let mut evicted = false;
        if pending.len() >= self.cap {
            if let Some((_, oldest)) = pending.pop_first() {
                evicted = oldest.send(()).is_ok();
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = *next;
        *next += 1;
        pending.insert(id, tx);
        let slot = Slot {
            owner: self.clone(),
            id,
            evicted: rx,
        };
        (slot, evicted)
    }

    fn leave(&self, id: u64) {
        let mut guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.remove(&id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_pending_handshake_is_evicted() {
        let slots = Handshakes::new(2);
        let (mut a, _) = slots.enter();
        let (b, _) = slots.enter();
        let (_c, evicted) = slots.enter();
        assert!(evicted);
        assert!(a.evicted.try_recv().is_ok(), "the oldest goes");
        drop(b);
        let (_d, evicted) = slots.enter();
        assert!(!evicted, "a freed place is reused without eviction");
    }
}
