//! Prometheus metrics (served on :15020 at /metrics): Istio's standard metrics
//! ([`istio`]) and meshd's own (`meshd_*`). Every connection meshd handles and every one it
//! refuses is counted here, with the reason.

pub mod istio;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    pub mode: &'static str,
    /// `hbone` (mTLS tunnel) or `plaintext`.
    pub transport: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub direction: Direction,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    /// `sent` (application to destination) or `received`.
    pub way: &'static str,
}

/// `result` is `ok` or the reason of the failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub istio: istio::Istio,
    /// Seconds until each local identity's SVID expires (set at each scrape).
    pub certificate_expiry: Family<IdentityLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `meshd_build_info`: version and interception mode.
    pub build: Family<BuildLabels, Gauge>,
    /// Connections open now, whatever their labels (what draining waits for).
    open: std::sync::atomic::AtomicI64,
    pub connections: Family<ConnLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub active: Family<ConnLabels, Gauge>,
    pub bpf_map_entries: Family<MapLabels, Gauge>,
    pub bpf_events: Family<EventLabels, Gauge>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub svid_renewals: Family<ResultLabels, Counter>,
    pub server_identity: Family<ResultLabels, Counter>,
    pub pod_events: Family<PodEventLabels, Counter>,
    pub pods: Gauge,
    pub policy_decisions: Family<PolicyLabels, Counter>,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub policy_last_reload_failed: Gauge,
    pub policies: Gauge,
    pub registry_connected: Family<SourceLabels, Gauge>,
    pub registry_updates: Family<SourceResultLabels, Counter>,
    pub registry_entries: Family<KindLabels, Gauge>,
    pub hbone_headers_ignored: Family<HeaderLabels, Counter>,
}

/// A CONNECT header a peer sent and meshd ignored (`forwarded`, `traceparent`), and why
/// (`malformed`, `oversized`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeaderLabels {
    pub header: &'static str,
    pub reason: &'static str,
}

/// A registry source (`etcd`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceResultLabels {
    pub source: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// One authorization decision: `allow` or `deny`, the deciding policy (`ns/name`, or `-` when
/// none did), the reason (`allowed_by_policy`, `no_policy`, `denied_by_policy`,
/// `no_allow_match`, `revoked` for an open connection a reload no longer allows), and the layer
/// (`l4` per connection, `http` or `grpc` per request).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub decision: &'static str,
    pub policy: String,
    pub reason: &'static str,
    pub layer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub spiffe_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodEventLabels {
    pub op: &'static str,
    pub result: &'static str,
}

/// `registry.register(NAME, HELP, METRIC.clone())` for each `NAME, HELP => METRIC;`.
macro_rules! register_all {
    ($registry:ident: $($name:literal, $help:literal => $metric:expr;)*) => {
        $( $registry.register($name, $help, $metric.clone()); )*
    };
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let istio = istio::Istio::register(&mut root);
        let registry = root.sub_registry_with_prefix("meshd");
        let m = Metrics {
            istio,
            certificate_expiry: Family::default(),
            build: Family::default(),
            open: Default::default(),
            connections: Family::default(),
            rejected: Family::default(),
            bytes: Family::default(),
            active: Family::default(),
            bpf_map_entries: Family::default(),
            bpf_events: Family::default(),
            tls_handshakes: Family::default(),
            svid_renewals: Family::default(),
            server_identity: Family::default(),
            pod_events: Family::default(),
            pods: Gauge::default(),
            policy_decisions: Family::default(),
            policy_reloads: Family::default(),
            policy_last_reload_failed: Gauge::default(),
            policies: Gauge::default(),
            registry_connected: Family::default(),
            registry_updates: Family::default(),
            registry_entries: Family::default(),
            hbone_headers_ignored: Family::default(),
            registry: Registry::default(),
        };
        register_all!(registry:
            "connections",
            "Connections proxied, by direction and interception mode" => m.connections;
            "connections_rejected", "Connections refused, by direction and reason" => m.rejected;
            "bytes", "Bytes relayed" => m.bytes;
            "active_connections", "Connections open now" => m.active;
            "bpf_map_entries",
            "Entries in meshd's BPF maps (capacity is fixed; LRU evicts at the limit)" => m.bpf_map_entries;
            "bpf_events",
            "Events counted by meshd's eBPF programs since start (steered, excluded, \
             record_failed, inbound_captured, bypass_sockets, bypass_kept_on_tcp)" => m.bpf_events;
            "tls_handshakes",
            "mTLS handshakes, by direction and result (ok or the reason of the failure)" => m.tls_handshakes;
            "svid_renewals", "SVID renewals, by result" => m.svid_renewals;
            "server_identity",
            "Outbound tunnels by how the server's identity was checked: verified (against the \
             identity expected at the destination) or unknown_destination_identity (trust \
             domain only)" => m.server_identity;
            "pod_events",
            "Pod requests from the CNI plugin (add, del, check) and re-adoptions, by result" => m.pod_events;
            "pods", "Pods meshd serves now" => m.pods;
            "policy_decisions",
            "Authorization decisions, by decision, deciding policy, reason and layer" => m.policy_decisions;
            "policy_reloads",
            "Authorization policy reloads, by result (ok, rejected)" => m.policy_reloads;
            "policy_last_reload_failed",
            "1 when the last policy reload was rejected (the previous policy is in force)" => m.policy_last_reload_failed;
            "policies", "Authorization policies in force" => m.policies;
            "registry_connected",
            "1 while the registry source is connected and watching; 0 while meshd serves from \
             the last state it knew" => m.registry_connected;
            "registry_updates",
            "Registry updates from a source, by result (listed, applied, rejected_<reason>)" => m.registry_updates;
            "registry_entries",
            "Workloads and Services the shared registry source holds now" => m.registry_entries;
            "hbone_headers_ignored",
            "HBONE CONNECT headers a peer sent that meshd ignored, by header (forwarded, \
             traceparent) and reason (malformed, oversized)" => m.hbone_headers_ignored;
            "build_info", "1, labelled with meshd's version and interception mode" => m.build;
            "certificate_expiry_seconds",
            "Seconds until the SVID of each local identity expires (renewed at half life)" => m.certificate_expiry;
        );
        Metrics {
            registry: root,
            ..m
        }
    }
}

impl Metrics {
    pub fn reject(&self, direction: Direction, reason: &'static str) {
        self.rejected
            .get_or_create(&RejectLabels { direction, reason })
            .inc();
    }

    pub fn header_ignored(&self, header: &'static str, reason: &'static str) {
        let labels = HeaderLabels { header, reason };
        self.hbone_headers_ignored.get_or_create(&labels).inc();
    }

    pub fn handshake(&self, direction: Direction, result: &'static str) {
        let labels = HandshakeLabels { direction, result };
        self.tls_handshakes.get_or_create(&labels).inc();
    }

    pub fn server_identity(&self, result: &'static str) {
        self.server_identity
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn pod_event(&self, op: &'static str, result: &'static str) {
        self.pod_events
            .get_or_create(&PodEventLabels { op, result })
            .inc();
    }

    pub fn svid_renewal(&self, result: &'static str) {
        self.svid_renewals
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn policy_decision(&self, labels: PolicyLabels) {
        self.policy_decisions.get_or_create(&labels).inc();
    }

    /// `meshd_build_info{version,mode} 1`, once the interception mode is known.
    pub fn registry_connected(&self, source: &'static str, up: bool) {
        let gauge = self
            .registry_connected
            .get_or_create(&SourceLabels { source });
        gauge.set(i64::from(up));
    }

    pub fn registry_update(&self, source: &'static str, result: &'static str) {
        let labels = SourceResultLabels { source, result };
        self.registry_updates.get_or_create(&labels).inc();
    }

    pub fn registry_entries(&self, workloads: usize, services: usize) {
        for (kind, n) in [("workload", workloads), ("service", services)] {
            let gauge = self.registry_entries.get_or_create(&KindLabels { kind });
            gauge.set(n as i64);
        }
    }

    pub fn build_info(&self, mode: &'static str) {
        let version = env!("CARGO_PKG_VERSION");
        self.build
            .get_or_create(&BuildLabels { version, mode })
            .set(1);
    }

    pub fn policy_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        self.policy_last_reload_failed.set(i64::from(!ok));
    }

    /// Prometheus text exposition.
    /// Reads the figures interception keeps in the kernel (map fill, eBPF event counts) into
    /// their gauges; called at each scrape, so they are as fresh as the scrape.
    pub fn refresh_kernel(&self, interception: &dyn crate::intercept::Interception) {
        for (map, entries) in interception.map_entries() {
            let labels = MapLabels { map };
            self.bpf_map_entries
                .get_or_create(&labels)
                .set(entries as i64);
        }
        for (event, count) in interception.kernel_events() {
            let labels = EventLabels { event };
            self.bpf_events.get_or_create(&labels).set(count as i64);
        }
    }

    /// Sets `meshd_certificate_expiry_seconds` from the SVIDs held now; identities no longer
    /// held (pods gone) leave the family.
    pub fn refresh_certificates(&self, svids: &[std::sync::Arc<crate::identity::Svid>]) {
        self.certificate_expiry.clear();
        let now = std::time::SystemTime::now();
        for s in svids {
            let left = match s.not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            let labels = IdentityLabels {
                spiffe_id: s.id.to_string(),
            };
            self.certificate_expiry.get_or_create(&labels).set(left);
        }
    }

    /// A connection opened (`+1`) or closed (`-1`).
    pub fn connection_open(&self, delta: i64) {
        self.open
            .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn open_connections(&self) -> i64 {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
