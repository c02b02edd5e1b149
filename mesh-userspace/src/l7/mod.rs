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
    /// A decided request got its response head (the workload's, or meshd's own denial): for
    /// request telemetry and the per-request access line.
    fn completed(&self, exchange: &Exchange<'_>);
}

/// How one request ended.
#[derive(Debug)]
pub struct Exchange<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The response's HTTP status (403 for a denied HTTP request, 200 for a denied gRPC call).
    pub status: u16,
    /// gRPC: the call's `grpc-status` (0-16) when the response carried a valid one.
    pub grpc_status: Option<u8>,
    /// The answer is meshd's denial (policy), not the workload's.
    pub denied: bool,
    /// From the decision on the request head to the response head (denials: about zero).
    pub elapsed: std::time::Duration,
}

/// A `grpc-status` value as a status code: only the codes gRPC defines (0-16) count.
pub fn grpc_status(value: Option<&http::HeaderValue>) -> Option<u8> {
    let code: u8 = value?.to_str().ok()?.parse().ok()?;
    (code <= 16).then_some(code)
}

/// The body of every denial, as Istio's proxies answer it.
pub const DENIED_BODY: &str = "RBAC: access denied";
