//! Workload identity: SPIFFE IDs, the embedded CA, SVIDs, and the manager that keeps every
//! local workload's SVID fresh and publishes it on a `watch` channel, so a rotation is one
//! `borrow()` away for every new handshake and established connections are never touched.

pub mod ca;
pub mod ca_client;
pub mod ca_service;
mod manager;
mod spiffe;
pub mod svid;

pub use manager::{node_id, IdentityManager, IssuerFiles, Signer, NODE_NAMESPACE};
pub use spiffe::{SpiffeError, SpiffeId};
pub use svid::Svid;

/// A certificate serial as lowercase hex without leading zero bytes, the same whether it came
/// from the bytes we generated or from a parsed certificate.
pub fn serial_hex(bytes: &[u8]) -> String {
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[first..].iter().map(|b| format!("{b:02x}")).collect()
}
