//! Layer 7: per-request decisions on ports a workload declares as HTTP (`http1`, HTTP/1.1) or
//! gRPC (`grpc`, HTTP/2 with prior knowledge). The filters sit between the caller's bytes (an
//! HBONE CONNECT stream, or a plaintext connection under PERMISSIVE) and the connection meshd
//! dialled to the workload; they ask a [`RequestGate`] about every request head before any byte
//! of it reaches the workload. Allowed requests pass byte for byte.

pub mod grpc;
pub mod h2io;
pub mod http1;

use http::request::Parts;

/// What the gate says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Decides requests for one connection (policy, counting and logging live behind it).
pub trait RequestGate: Send + Sync {
    /// Called once per request head (method, URI, headers; `Host` or `:authority` in the URI's
    /// authority where the request carries one), before any byte of the request goes upstream.
    fn decide(&self, head: &Parts) -> Verdict;
    /// A request head that cannot be served: malformed or over the size limit. The filter has
    /// answered 400 and closes the connection.
    fn rejected(&self, reason: &'static str);
}

/// The body of every denial, as Istio's proxies answer it.
pub const DENIED_BODY: &str = "RBAC: access denied";
