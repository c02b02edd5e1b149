//! Authorization at the inbound edge: every connection to a local workload (HBONE at :15008,
//! PERMISSIVE plaintext at :15006) is decided before its destination is dialled; on ports the
//! workload declares `http` or `grpc` each request is decided again by the L7 filters; and a
//! policy reload decides every open connection again, closing those it no longer allows.

use std::{
    net::{IpAddr, SocketAddrV4},
    sync::Arc,
};

use bytes::Bytes;
use http::request::Parts;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use prometheus_client::metrics::counter::Counter;

use super::{counted::Counted, limits::Permit, Context};
use crate::{
    config::{Protocol, Workload},
    l7::{self, h2io::H2Io, RequestGate},
    metrics::{
        istio::{Meter, Party, RequestMeter, TcpLabels},
        Direction, PolicyLabels,
    },
    policy::{
        query::namespace_of, query::normalize_path, Attrs, Decision, Http, Target, Unknown, Verdict,
    },
    tunnel,
};

/// One inbound connection as policy sees it.
#[derive(Clone)]
pub struct Guard {
    ctx: Arc<Context>,
    workload: Arc<Workload>,
    dst: SocketAddrV4,
    /// The caller's principal (`td/ns/X/sa/Y`), `None` for plaintext.
    principal: Option<Arc<str>>,
    source_ip: IpAddr,
    /// The caller as telemetry names it.
    source: Arc<Party>,
}

/// What the connection-level decision lets happen.
pub enum Admission {
    /// Dial the workload and carry the connection.
    Dial,
    /// A TCP port: refuse the connection.
    Refuse,
    /// An L7 port: answer its requests as denied, without dialling.
    DenyRequests(Decision),
}

/// Where the caller's bytes come from.
pub enum Downstream {
    /// An HBONE CONNECT stream.
    Hbone(h2::SendStream<Bytes>, h2::RecvStream),
    /// A plaintext connection (PERMISSIVE).
    Tcp(TcpStream),
}

impl Guard {
    pub fn new(
        ctx: Arc<Context>,
        workload: Arc<Workload>,
        dst: SocketAddrV4,
        principal: Option<Arc<str>>,
        source_ip: IpAddr,
        source: Arc<Party>,
    ) -> Guard {
        Guard {
            ctx,
            workload,
            dst,
            principal,
            source_ip,
            source,
        }
    }

    /// The connection's Istio labels (reported by the destination side: this meshd).
    pub fn istio(&self) -> TcpLabels {
        let protocol = self.protocol().as_str();
        let mtls = self.principal.is_some();
        TcpLabels::new(
            "destination",
            &self.source,
            &self.workload.party,
            protocol,
            mtls,
        )
    }

    /// A connection refused before it was carried: counted opened and closed with `flags`.
    fn refused(&self, flags: &'static str) {
        self.ctx.metrics.istio.refused(self.istio(), flags);
    }

    fn protocol(&self) -> Protocol {
        self.workload.protocol(self.dst.port())
    }

    /// Decides the connection (or, with `http`, one request) under the policy in force.
    fn decide(&self, http: Option<&Http>) -> Decision {
        let set = self.ctx.policy.current();
        let principal = self.principal.as_deref();
        let attrs = Attrs {
            principal,
            namespace: principal.and_then(namespace_of),
            source_ip: self.source_ip,
            destination_ip: IpAddr::V4(*self.dst.ip()),
            destination_port: self.dst.port(),
            http,
        };
        let target = Target {
            namespace: &self.workload.namespace,
            labels: &self.workload.labels,
        };
        let unknown = match self.protocol() {
            Protocol::Tcp => Unknown::AsTcp,
            Protocol::Http | Protocol::Grpc => Unknown::Defer,
        };
        set.decide(&target, &attrs, unknown)
    }

    /// Counts and logs a decision; whether it lets the connection or request through.
    fn record(&self, d: &Decision, layer: &'static str, request: Option<&Http>) -> bool {
        let allowed = d.verdict != Verdict::Deny;
        for audit in &d.audited {
            tracing::info!(policy = %audit.id(), workload = %self.workload.name, dst = %self.dst,
                principal = self.principal.as_deref().unwrap_or("-"), layer,
                method = request.map_or("-", |r| r.method), path = request.map_or("-", |r| r.path),
                allowed, "AUDIT");
        }
        self.ctx.metrics.policy_decision(PolicyLabels {
            decision: if allowed { "allow" } else { "deny" },
            policy: d.policy_id(),
            reason: d.reason,
            layer,
        });
        if !allowed {
            crate::warn_throttled!(d.reason, policy = %d.policy_id(), rule = ?d.rule, reason = d.reason,
                workload = %self.workload.name, dst = %self.dst, src = %self.source_ip,
                principal = self.principal.as_deref().unwrap_or("-"), layer,
                method = request.map_or("-", |r| r.method), path = request.map_or("-", |r| r.path),
                "denied by authorization policy");
        }
        allowed
    }

    /// Slots under the abuse limits (held until the connection ends); `None`, counted, when a
    /// limit refuses it.
    pub fn limits(&self) -> Option<Vec<Permit>> {
        let limits = &self.ctx.limits;
        if limits.source.is_none() && limits.workload.is_none() {
            return Some(Vec::new());
        }
        let source = match &self.principal {
            Some(p) => p.to_string(),
            None => self.source_ip.to_string(),
        };
        let workload = format!("{}/{}", self.workload.namespace, self.workload.name);
        match limits.acquire(&source, &workload) {
            Ok(permits) => Some(permits),
            Err(reason) => {
                self.ctx.metrics.reject(Direction::Inbound, reason);
                self.refused("UO");
                None
            }
        }
    }

    /// The connection-level decision, before the destination is dialled; a refusal is also
    /// counted among the inbound rejections (`policy_denied`).
    pub fn admit(&self) -> Admission {
        let d = self.decide(None);
        if self.record(&d, "l4", None) {
            return Admission::Dial;
        }
        self.ctx.metrics.reject(Direction::Inbound, "policy_denied");
        if self.protocol() == Protocol::Tcp {
            self.refused("RBAC");
            Admission::Refuse
        } else {
            Admission::DenyRequests(d)
        }
    }

    /// A connection to an L7 port that policy refuses: nothing is dialled; each request is
    /// answered as a denied request is (HTTP 403 `RBAC: access denied`, gRPC status 7), which is
    /// what callers of an HTTP service expect rather than a reset.
    pub async fn deny_requests(
        self,
        decision: Decision,
        downstream: Downstream,
        meter: &Meter,
    ) -> std::io::Result<(u64, u64)> {
        // The filters get an upstream that never answers (and is never written to).
        let (upstream, _held) = tokio::io::duplex(64);
        let layer = Layer {
            name: self.protocol().as_str(),
            guard: self,
            refused: Some(decision),
            meter: meter.clone(),
            outcomes: Default::default(),
        };
        let (_, to_caller) = layer.filter(downstream, upstream).await?;
        Ok((0, to_caller))
    }

    /// Carries an admitted connection: a byte copy on TCP ports, the HTTP/1.1 or gRPC filter
    /// on L7 ports, until it ends or a reload no longer allows it. Returns the bytes sent to the
    /// workload and to the caller.
    pub async fn carry(
        self,
        downstream: Downstream,
        upstream: TcpStream,
        meter: &Meter,
    ) -> std::io::Result<(u64, u64)> {
        let mut changes = self.ctx.policy.tx.subscribe();
        let work = self.serve(downstream, upstream, meter);
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return work.await;
                    }
                    let mut d = self.decide(None);
                    if d.verdict == Verdict::Deny {
                        d.reason = "revoked";
                        self.record(&d, "l4", None);
                        return Err(std::io::Error::other("closed: the reloaded policy no longer allows this connection"));
                    }
                }
            }
        }
    }

    async fn serve(
        &self,
        downstream: Downstream,
        mut upstream: TcpStream,
        meter: &Meter,
    ) -> std::io::Result<(u64, u64)> {
        match (self.protocol(), downstream) {
            (Protocol::Tcp, Downstream::Hbone(send, recv)) => {
                let ready = std::future::ready(Ok(recv));
                let counts = (&meter.response, &meter.request);
                let (to_peer, to_workload) =
                    tunnel::bridge(&mut upstream, send, ready, counts).await?;
                Ok((to_workload, to_peer))
            }
            (Protocol::Tcp, Downstream::Tcp(mut app)) => {
                super::copy_counted(&mut app, &mut upstream, meter).await
            }
            (protocol, downstream) => {
                let layer = Layer {
                    guard: self.clone(),
                    name: protocol.as_str(),
                    refused: None,
                    meter: meter.clone(),
                    outcomes: Default::default(),
                };
                layer.filter(downstream, upstream).await
            }
        }
    }
}

/// The per-request gate of one connection.
struct Layer {
    guard: Guard,
    name: &'static str,
    /// The connection is refused: every request is denied with this decision.
    refused: Option<Decision>,
    /// The connection's Istio counters.
    meter: Meter,
    /// The request metrics this connection has used, by outcome (status, gRPC status, flags):
    /// most connections see one or two, so a request costs a short scan, not a label hash.
    outcomes: std::sync::Mutex<Vec<(Outcome, RequestMeter)>>,
}

type Outcome = (u16, Option<u8>, &'static str);

impl Layer {
    async fn filter<U>(self, downstream: Downstream, upstream: U) -> std::io::Result<(u64, u64)>
    where
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match downstream {
            Downstream::Hbone(send, recv) => self.run(H2Io::new(send, recv), upstream).await,
            Downstream::Tcp(app) => self.run(app, upstream).await,
        }
    }

    async fn run<D, U>(self, downstream: D, upstream: U) -> std::io::Result<(u64, u64)>
    where
        D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let upstream = Counted::new(upstream, self.meter.request.clone());
        let downstream = Counted::new(downstream, self.meter.response.clone());
        if self.guard.protocol() == Protocol::Grpc {
            // The filter relays frames, not a byte stream: what is counted is the HTTP/2 bytes
            // written to the workload's connection and to the caller's.
            let (to_workload, to_caller) = (Counter::default(), Counter::default());
            let upstream = Counted::new(upstream, to_workload.clone());
            let downstream = Counted::new(downstream, to_caller.clone());
            let layer: Arc<dyn RequestGate> = Arc::new(self);
            l7::grpc::filter(downstream, upstream, layer).await?;
            return Ok((to_workload.get(), to_caller.get()));
        }
        l7::http1::filter(downstream, upstream, &self).await
    }
}

impl RequestGate for Layer {
    fn decide(&self, head: &Parts) -> l7::Verdict {
        let host = head.uri.authority().map(|a| a.as_str()).or_else(|| {
            head.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        let path = normalize_path(head.uri.path());
        let http = Http {
            method: head.method.as_str(),
            path: &path,
            host,
            headers: &head.headers,
        };
        let d = match &self.refused {
            Some(d) => d.clone(),
            None => self.guard.decide(Some(&http)),
        };
        if self.guard.record(&d, self.name, Some(&http)) {
            l7::Verdict::Allow
        } else {
            l7::Verdict::Deny
        }
    }

    fn rejected(&self, reason: &'static str) {
        self.guard.ctx.metrics.reject(Direction::Inbound, reason);
        crate::warn_throttled!(reason, workload = %self.guard.workload.name, dst = %self.guard.dst, reason,
            "request refused: 400");
    }

    /// Istio's request metrics and one access line per request.
    fn completed(&self, e: &l7::Exchange<'_>) {
        let flags = if e.denied { "RBAC" } else { "-" };
        let outcome = (e.status, e.grpc_status, flags);
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        match outcomes.iter().find(|(o, _)| *o == outcome) {
            Some((_, meter)) => meter.record(e.elapsed),
            None => {
                let istio = &self.guard.ctx.metrics.istio;
                let meter = istio.request_meter(&self.meter.labels, outcome.0, outcome.1, flags);
                meter.record(e.elapsed);
                outcomes.push((outcome, meter));
            }
        }
        drop(outcomes);
        tracing::info!(
            target: crate::logbuf::ACCESS_TARGET,
            layer = self.name,
            workload = %self.guard.workload.name,
            peer = self.guard.principal.as_deref().unwrap_or("-"),
            src = %self.guard.source_ip,
            dst = %self.guard.dst,
            method = e.method,
            path = e.path,
            status = e.status,
            grpc_status = e.grpc_status.map_or(-1, i32::from),
            response_flags = flags,
            duration_ms = e.elapsed.as_millis() as u64,
            "request"
        );
    }
}
