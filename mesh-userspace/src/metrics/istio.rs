//! Istio's standard metrics, with Istio's names and labels, so dashboards and tools written for
//! Istio (its Grafana dashboards, Kiali) read meshd unchanged: TCP connections opened and
//! closed and bytes each way for every connection, requests and their durations on ports with L7
//! policy. Bytes are counted as they flow (every chunk relayed), not when a connection closes,
//! so a long stream shows in every scrape of its life.
//!
//! Label values come from configuration and verified identities only (workload names, their
//! namespaces, SPIFFE IDs): never from an address, a port or a header, so their number is
//! bounded by the mesh's size, not by its traffic.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// `unknown`, as Istio spells a label value it cannot know.
pub const UNKNOWN: &str = "unknown";

/// [`UNKNOWN`], shared rather than allocated per connection.
fn unknown() -> Arc<str> {
    static SHARED: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| UNKNOWN.into());
    SHARED.clone()
}

/// One side of a connection as telemetry names it. Made once per workload (and per verified
/// peer identity), shared by every connection of it.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Party {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    /// SPIFFE ID (`spiffe://td/ns/N/sa/S`) or `unknown`.
    pub principal: Arc<str>,
    /// The `app` label (Istio's canonical service falls back to it), or `unknown`.
    pub app: Arc<str>,
}

impl Party {
    /// A party nothing is known of (plaintext callers, failed handshakes).
    pub fn unknown() -> Party {
        let u = unknown();
        Party {
            workload: u.clone(),
            namespace: u.clone(),
            principal: u.clone(),
            app: u,
        }
    }

    /// A local workload: its name and namespace, its principal when meshd has a trust domain,
    /// and its canonical service as Istio derives it from labels (`service.istio.io/
    /// canonical-name`, `app.kubernetes.io/name`, `app`, else the workload's name).
    pub fn of(w: &crate::config::Workload, trust_domain: Option<&str>) -> Party {
        let id = trust_domain.and_then(|td| {
            crate::identity::SpiffeId::new(td, &w.namespace, &w.service_account).ok()
        });
        let principal = id.map_or(unknown(), |id| id.to_string().into());
        let app = [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|k| w.labels.get(*k))
        .unwrap_or(&w.name);
        Party {
            workload: w.name.as_str().into(),
            namespace: w.namespace.as_str().into(),
            principal,
            app: app.as_str().into(),
        }
    }

    /// A peer known by its verified SPIFFE ID only: its namespace and principal, no workload.
    pub fn from_principal(id: &crate::identity::SpiffeId) -> Party {
        Party {
            namespace: id.namespace.as_str().into(),
            principal: id.to_string().into(),
            ..Party::unknown()
        }
    }
}

/// Labels of the TCP metrics (`istio_tcp_*`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the client side's proxy: outbound) or `destination` (inbound).
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    /// `tcp`, `http` or `grpc`.
    pub request_protocol: &'static str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// `-`, or Envoy's flag for how the connection failed (`UF` upstream connect failure, `UC`
    /// upstream connection terminated, `NR` no route, `RBAC` denied by policy, `UO` over a limit).
    pub response_flags: &'static str,
}

impl TcpLabels {
    pub fn new(
        reporter: &'static str,
        source: &Party,
        destination: &Party,
        request_protocol: &'static str,
        mtls: bool,
    ) -> TcpLabels {
        TcpLabels {
            reporter,
            source_workload: source.workload.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: source.principal.clone(),
            source_app: source.app.clone(),
            source_canonical_service: source.app.clone(),
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: destination.principal.clone(),
            destination_app: destination.app.clone(),
            destination_canonical_service: destination.app.clone(),
            // Services come with the registry (Kubernetes Services, etcd): until then unknown.
            destination_service: unknown(),
            destination_service_name: unknown(),
            destination_service_namespace: destination.namespace.clone(),
            request_protocol,
            connection_security_policy: if mtls { "mutual_tls" } else { "none" },
            response_flags: "-",
        }
    }
}

impl TcpLabels {
    /// The Service a connection was addressed to (`name.namespace.svc.cluster.local`, as
    /// Istio names it; names come from the registry, so they are bounded).
    pub fn set_service(&mut self, name: &str, namespace: &str) {
        self.destination_service = format!("{name}.{namespace}.svc.cluster.local").into();
        self.destination_service_name = name.into();
        self.destination_service_namespace = namespace.into();
    }
}

/// Labels of the request metrics: the connection's, with the response code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub tcp: TcpLabels,
    pub response_code: u16,
    /// gRPC: the call's `grpc-status` (`7` when policy denied it); `-` when there is none.
    pub grpc_response_status: &'static str,
}

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 18] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0,
];

#[derive(Clone)]
pub struct Istio {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    /// Bytes toward the caller (responses): `istio_tcp_sent_bytes_total`.
    pub sent: Family<TcpLabels, Counter>,
    /// Bytes from the caller (requests): `istio_tcp_received_bytes_total`.
    pub received: Family<TcpLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Istio {
    pub fn register(registry: &mut Registry) -> Istio {
        let istio = Istio {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS_MS)),
        };
        let tcp = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                &istio.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                &istio.closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent toward the caller (responses), counted as they flow",
                &istio.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the caller (requests), counted as they flow",
                &istio.received,
            ),
        ];
        for (name, help, family) in tcp {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "istio_requests",
            "Requests on ports with L7 policy, by response code",
            istio.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's head to its response's head, on ports with L7 policy",
            istio.duration.clone(),
        );
        istio
    }

    /// The request counter and duration histogram of one outcome (`status`, gRPC status,
    /// `flags`) on a connection labelled `tcp`. Looked up once per outcome and connection:
    /// the label set is long to hash.
    pub fn request_meter(
        &self,
        tcp: &TcpLabels,
        status: u16,
        grpc: Option<u8>,
        flags: &'static str,
    ) -> RequestMeter {
        const CODES: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        let mut tcp = tcp.clone();
        tcp.response_flags = flags;
        let grpc_response_status = grpc.and_then(|c| CODES.get(c as usize)).copied();
        let labels = RequestLabels {
            tcp,
            response_code: status,
            grpc_response_status: grpc_response_status.unwrap_or("-"),
        };
        RequestMeter {
            count: self.requests.get_or_create_owned(&labels),
            duration: self.duration.get_or_create_owned(&labels),
        }
    }

    /// A connection refused before it was carried (a policy denial, a limit): opened and
    /// closed at once, the close with `flags`.
    pub fn refused(&self, mut labels: TcpLabels, flags: &'static str) {
        self.opened.get_or_create(&labels).inc();
        labels.response_flags = flags;
        self.closed.get_or_create(&labels).inc();
    }

    /// Counts a connection opened and hands out its live byte counters.
    pub fn open(&self, labels: TcpLabels) -> Meter {
        self.opened.get_or_create(&labels).inc();
        Meter {
            request: self.received.get_or_create_owned(&labels),
            response: self.sent.get_or_create_owned(&labels),
            labels,
        }
    }
}

/// One request outcome's metrics (shared with the families).
#[derive(Clone, Debug)]
pub struct RequestMeter {
    pub count: Counter,
    pub duration: Histogram,
}

impl RequestMeter {
    pub fn record(&self, elapsed: std::time::Duration) {
        self.count.inc();
        self.duration.observe(elapsed.as_secs_f64() * 1000.0);
    }
}

/// One connection's byte counters (shared with the families: adding here is counting there).
#[derive(Clone, Debug)]
pub struct Meter {
    /// Caller to destination.
    pub request: Counter,
    /// Destination to caller.
    pub response: Counter,
    pub labels: TcpLabels,
}
