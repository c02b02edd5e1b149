//! What the registry holds: workloads (an address, the ports served there, the SPIFFE ID that
//! must answer, the node, labels) and Services (an address and ports, a label selector over the
//! workloads of their namespace, as Kubernetes Services select pods). The JSON shape is what
//! the etcd source stores; every record a source gives is checked before it is believed.

use std::{collections::BTreeMap, net::Ipv4Addr, net::SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

/// Names in records: Kubernetes-shaped (DNS labels and subdomains), bounded.
const MAX_NAME: usize = 253;
const MAX_LABELS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRecord {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub address: Ipv4Addr,
    /// Ports served at `address`; empty: every port (a pod has its address to itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(with = "spiffe_text")]
    pub spiffe_id: SpiffeId,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl WorkloadRecord {
    pub fn serves(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    pub name: String,
    pub namespace: String,
    pub address: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Workloads of the Service's namespace whose labels include all of these.
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The workloads' port (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
}

/// One workload behind a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    pub spiffe_id: SpiffeId,
    pub workload: String,
    pub node: String,
}

/// A Service port and the endpoints behind it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTarget {
    pub name: String,
    pub namespace: String,
    pub endpoints: Vec<Endpoint>,
}

/// The endpoints of one Service port among `workloads` (sorted, so every node tries them in
/// the same order before round robin spreads them).
pub fn resolve<'a>(
    service: &ServiceRecord,
    port: &ServicePort,
    workloads: impl Iterator<Item = &'a WorkloadRecord>,
) -> ServiceTarget {
    let target = port.target_port.unwrap_or(port.port);
    let mut endpoints: Vec<Endpoint> = workloads
        .filter(|w| w.namespace == service.namespace && w.serves(target))
        .filter(|w| (service.selector.iter()).all(|(k, v)| w.labels.get(k) == Some(v)))
        .map(|w| Endpoint {
            addr: SocketAddrV4::new(w.address, target),
            spiffe_id: w.spiffe_id.clone(),
            workload: w.name.clone(),
            node: w.node.clone(),
        })
        .collect();
    endpoints.sort_by_key(|e| e.addr);
    endpoints.dedup_by_key(|e| e.addr);
    ServiceTarget {
        name: service.name.clone(),
        namespace: service.namespace.clone(),
        endpoints,
    }
}

/// Why a record was not believed (the label of `meshd_registry_updates_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not valid JSON for its kind")]
    Malformed,
    #[error("a name or label is empty, too long or not Kubernetes-shaped")]
    BadName,
    #[error("a Service without ports or with port 0, or an empty selector")]
    BadService,
    #[error("the record's node is not the node its key is under")]
    WrongNode,
    #[error("not a PEM certificate that can be a root")]
    BadRoot,
}

impl Rejected {
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "rejected_malformed",
            Rejected::BadName => "rejected_bad_name",
            Rejected::BadService => "rejected_bad_service",
            Rejected::WrongNode => "rejected_wrong_node",
            Rejected::BadRoot => "rejected_bad_root",
        }
    }
}

/// A workload record from bytes a source gave, registered under `node`'s part of the source.
pub fn parse_workload(bytes: &[u8], node: &str) -> Result<WorkloadRecord, Rejected> {
    let record: WorkloadRecord = serde_json::from_slice(bytes).map_err(|_| Rejected::Malformed)?;
    let names = [&record.name, &record.namespace, &record.node];
    if !names.iter().all(|n| k8s_name(n)) || !labels_ok(&record.labels) {
        return Err(Rejected::BadName);
    }
    if record.node != node {
        return Err(Rejected::WrongNode);
    }
    Ok(record)
}

pub fn parse_service(bytes: &[u8]) -> Result<ServiceRecord, Rejected> {
    let record: ServiceRecord = serde_json::from_slice(bytes).map_err(|_| Rejected::Malformed)?;
    if !k8s_name(&record.name) || !k8s_name(&record.namespace) || !labels_ok(&record.selector) {
        return Err(Rejected::BadName);
    }
    let port_zero = (record.ports.iter()).any(|p| p.port == 0 || p.target_port == Some(0));
    if record.ports.is_empty() || port_zero || record.selector.is_empty() {
        return Err(Rejected::BadService);
    }
    Ok(record)
}

/// A trust bundle root: PEM holding certificates that can each be a trust anchor.
pub fn parse_root(bytes: &[u8]) -> Result<String, Rejected> {
    let pem = std::str::from_utf8(bytes).map_err(|_| Rejected::BadRoot)?;
    let certs = crate::tls::certs_from_pem(pem).map_err(|_| Rejected::BadRoot)?;
    let usable = (certs.iter()).all(|c| webpki::anchor_from_trusted_cert(c).is_ok());
    if certs.is_empty() || !usable {
        return Err(Rejected::BadRoot);
    }
    Ok(pem.to_string())
}

/// A DNS subdomain as Kubernetes names objects: lower-case alphanumerics, '-' and '.', starting
/// and ending alphanumeric.
pub fn k8s_name(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= MAX_NAME
        && edge(s.chars().next())
        && edge(s.chars().last())
        && (s.chars()).all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn labels_ok(labels: &BTreeMap<String, String>) -> bool {
    let value_ok = |v: &str| {
        v.len() <= 63
            && (v.chars()).all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= MAX_NAME
            && (k.chars()).all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    labels.len() <= MAX_LABELS && labels.iter().all(|(k, v)| key_ok(k) && value_ok(v))
}

mod spiffe_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::identity::SpiffeId;

    pub fn serialize<S: Serializer>(id: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SpiffeId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}
