//! The mesh parts of the configuration: the node's identity (trust domain, node intermediate,
//! trust bundle, SVID lifetime, revocation), which destinations are in the mesh, and
//! PeerAuthentication policies shaped like Istio's, so users can bring what they have.

use std::{collections::BTreeMap, collections::HashMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{err, ConfigError, Ipv4Cidr};
use crate::{identity::SpiffeId, tls::verify::Revocation};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub trust_domain: String,
    /// This node's name: its HBONE server identity is spiffe://<td>/ns/meshd-system/sa/<node>.
    pub node_name: String,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    /// PEM files of trusted roots (several, for root rotation).
    pub trust_bundle: Vec<PathBuf>,
    /// SVID lifetime: `24h`, `30m`, `10s`, `500ms`.
    #[serde(default = "default_ttl")]
    pub svid_ttl: String,
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// The CA service (`meshd ca serve`) at `address` signs this node's SVIDs; `node_cert` and
    /// `node_key` are then the node credential (`meshd ca node-credential`, a leaf that cannot
    /// sign). Without it they are a node intermediate and meshd mints SVIDs itself (the
    /// single-node shortcut).
    #[serde(default)]
    pub ca_service: Option<CaServiceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaServiceConfig {
    pub address: std::net::SocketAddrV4,
}

fn default_ttl() -> String {
    "24h".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    #[serde(default)]
    pub serials: Vec<String>,
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Destinations outside the mesh are reached directly, in plaintext.
    #[default]
    Passthrough,
    /// Destinations outside the mesh are refused.
    Deny,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshNetworks {
    /// Destinations in these CIDRs are reached through HBONE at `<destination ip>:15008`.
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub egress: Egress,
    /// Known workload addresses and the identity that must answer there (the static source of
    /// the registry: e.g. pods on other nodes). Tunnels to other addresses accept any SVID of
    /// the trust domain.
    #[serde(default)]
    pub identities: Vec<KnownIdentity>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownIdentity {
    pub address: std::net::Ipv4Addr,
    pub spiffe_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Unset,
    Strict,
    Permissive,
    Disable,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Mtls {
    pub mode: MtlsMode,
}

/// `kind: PeerAuthentication` (security.istio.io) as far as meshd implements it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthenticationDoc {
    #[serde(rename = "apiVersion", default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: Option<String>,
    /// Absent or the root namespace (`istio-system`): the policy is mesh-wide.
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    #[serde(rename = "portLevelMtls", default)]
    pub port_level_mtls: BTreeMap<u16, Mtls>,
}

/// The identity settings, validated.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub trust_domain: String,
    pub node_id: SpiffeId,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub trust_bundle: Vec<PathBuf>,
    pub svid_ttl: Duration,
    pub revocation: Revocation,
    pub ca_service: Option<std::net::SocketAddrV4>,
}

impl IdentityConfig {
    pub fn validate(&self) -> Result<IdentitySettings, ConfigError> {
        let node_id = crate::identity::node_id(&self.trust_domain, &self.node_name)
            .map_err(|e| err("identity", e.to_string()))?;
        for (field, path) in [
            ("identity.node_cert", &self.node_cert),
            ("identity.node_key", &self.node_key),
        ] {
            if !path.is_file() {
                return Err(err(
                    field,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if self.trust_bundle.is_empty() {
            return Err(err(
                "identity.trust_bundle",
                "needs at least one root certificate file",
            ));
        }
        for (i, path) in self.trust_bundle.iter().enumerate() {
            if !path.is_file() {
                let reason = format!("{} is not a readable file", path.display());
                return Err(err(format!("identity.trust_bundle[{i}]"), reason));
            }
        }
        let svid_ttl = parse_duration(&self.svid_ttl).map_err(|r| err("identity.svid_ttl", r))?;
        if svid_ttl < Duration::from_secs(1) {
            return Err(err("identity.svid_ttl", "must be at least 1s"));
        }
        // SVIDs are minted with it: an end date X.509 cannot hold is refused here, not at mint.
        crate::identity::ca::not_after(std::time::SystemTime::now(), svid_ttl)
            .map_err(|e| err("identity.svid_ttl", e.to_string()))?;
        for (i, id) in self.revocation.spiffe_ids.iter().enumerate() {
            id.parse::<SpiffeId>().map_err(|e| {
                err(
                    format!("identity.revocation.spiffe_ids[{i}]"),
                    e.to_string(),
                )
            })?;
        }
        for (i, serial) in self.revocation.serials.iter().enumerate() {
            if serial.is_empty() || !serial.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
                let reason = format!("{serial:?} is not a hex serial number");
                return Err(err(format!("identity.revocation.serials[{i}]"), reason));
            }
        }
        Ok(IdentitySettings {
            trust_domain: self.trust_domain.clone(),
            node_id,
            node_cert: self.node_cert.clone(),
            node_key: self.node_key.clone(),
            trust_bundle: self.trust_bundle.clone(),
            svid_ttl,
            revocation: Revocation {
                spiffe_ids: self.revocation.spiffe_ids.clone(),
                serials: self.revocation.serials.clone(),
                crl_files: self.revocation.crls.clone(),
            },
            ca_service: self.ca_service.as_ref().map(|c| c.address),
        })
    }
}

/// A config field holding a duration string ([`parse_duration`]).
pub fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// `500ms`, `10s`, `30m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 24h, 30m, 10s"))?;
    let unit_secs = |secs: u64| Duration::from_secs(n.saturating_mul(secs));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(unit_secs(1)),
        "m" => Ok(unit_secs(60)),
        "h" => Ok(unit_secs(3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

/// Which mTLS mode applies to plaintext arriving for a workload port.
#[derive(Debug, Clone, Default)]
pub struct PeerAuth {
    mesh_wide: Option<Policy>,
    by_namespace: HashMap<String, Policy>,
}

#[derive(Debug, Clone)]
struct Policy {
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
}

/// The Istio root namespace: policies there apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

impl PeerAuth {
    pub fn from_docs(docs: &[PeerAuthenticationDoc]) -> Result<PeerAuth, ConfigError> {
        let mut out = PeerAuth::default();
        for (i, doc) in docs.iter().enumerate() {
            let field = |f: &str| format!("peer_authentication[{i}].{f}");
            if doc
                .kind
                .as_deref()
                .is_some_and(|k| k != "PeerAuthentication")
            {
                return Err(err(field("kind"), "must be PeerAuthentication"));
            }
            if doc.spec.selector.is_some() {
                let reason = "workload selectors are not supported; scope by namespace";
                return Err(err(field("spec.selector"), reason));
            }
            let policy = Policy {
                mode: doc.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode),
                ports: doc
                    .spec
                    .port_level_mtls
                    .iter()
                    .map(|(p, m)| (*p, m.mode))
                    .collect(),
            };
            match doc.metadata.namespace.as_deref() {
                None | Some(ROOT_NAMESPACE) if out.mesh_wide.is_some() => {
                    return Err(err(field("metadata"), "a second mesh-wide policy"));
                }
                None | Some(ROOT_NAMESPACE) => out.mesh_wide = Some(policy),
                Some(ns) if out.by_namespace.contains_key(ns) => {
                    return Err(err(
                        field("metadata.namespace"),
                        format!("a second policy for {ns}"),
                    ));
                }
                Some(ns) => {
                    out.by_namespace.insert(ns.to_string(), policy);
                }
            }
        }
        Ok(out)
    }

    /// The mode for `port` of a workload in `namespace`: the namespace policy's port level,
    /// then its default, then the mesh-wide policy's, then STRICT.
    pub fn mode(&self, namespace: &str, port: u16) -> MtlsMode {
        let scopes = [self.by_namespace.get(namespace), self.mesh_wide.as_ref()];
        for policy in scopes.into_iter().flatten() {
            if let Some(mode) = policy.ports.get(&port).filter(|m| **m != MtlsMode::Unset) {
                return *mode;
            }
            if policy.mode != MtlsMode::Unset {
                return policy.mode;
            }
        }
        MtlsMode::Strict
    }
}

/// Mesh membership of destinations.
#[derive(Debug, Clone, Default)]
pub struct MeshSettings {
    pub networks: Vec<Ipv4Cidr>,
    pub egress: Egress,
    pub identities: std::collections::HashMap<std::net::Ipv4Addr, SpiffeId>,
}

impl MeshNetworks {
    pub fn validate(&self) -> Result<MeshSettings, ConfigError> {
        let networks = (self.networks.iter().enumerate())
            .map(|(i, c)| c.parse().map_err(|r| err(format!("mesh.networks[{i}]"), r)))
            .collect::<Result<Vec<Ipv4Cidr>, _>>()?;
        let mut identities = std::collections::HashMap::new();
        for (i, k) in self.identities.iter().enumerate() {
            let id: SpiffeId = k
                .spiffe_id
                .parse()
                .map_err(|e| err(format!("mesh.identities[{i}].spiffe_id"), format!("{e}")))?;
            if identities.insert(k.address, id).is_some() {
                let reason = format!("{} is listed twice", k.address);
                return Err(err(format!("mesh.identities[{i}].address"), reason));
            }
        }
        Ok(MeshSettings {
            networks,
            egress: self.egress,
            identities,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<PeerAuthenticationDoc> {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn port_level_then_namespace_then_mesh_wide_then_strict() {
        let auth = PeerAuth::from_docs(&docs(
            "- metadata: {namespace: istio-system}\n  spec: {mtls: {mode: PERMISSIVE}}\n\
             - metadata: {namespace: shop}\n  spec:\n    mtls: {mode: STRICT}\n    \
               portLevelMtls: {8080: {mode: PERMISSIVE}}\n",
        ))
        .unwrap();
        assert_eq!(auth.mode("shop", 8080), MtlsMode::Permissive);
        assert_eq!(auth.mode("shop", 9090), MtlsMode::Strict);
        assert_eq!(auth.mode("other", 9090), MtlsMode::Permissive);
        assert_eq!(PeerAuth::default().mode("any", 1), MtlsMode::Strict);
    }

    #[test]
    fn unsupported_or_conflicting_policies_are_rejected() {
        let selector = docs("- spec: {selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}\n");
        let e = PeerAuth::from_docs(&selector).unwrap_err();
        assert_eq!(e.field, "peer_authentication[0].spec.selector");
        let twice = docs("- spec: {mtls: {mode: STRICT}}\n- spec: {mtls: {mode: PERMISSIVE}}\n");
        assert!(PeerAuth::from_docs(&twice)
            .unwrap_err()
            .reason
            .contains("second mesh-wide"));
    }

    /// Found with the config fuzz target (fuzz/fuzz_targets/config_yaml.rs, which mints an SVID
    /// with an accepted TTL): a TTL this long was accepted, then minting panicked (overflow
    /// adding duration to date). Its input is in fuzz/corpus/config_yaml/.
    #[test]
    fn an_svid_ttl_past_the_year_9999_is_refused() {
        let identity = |ttl: &str| -> IdentityConfig {
            let files = "node_cert: /proc/self/status, node_key: /proc/self/status";
            serde_yaml_ng::from_str(&format!(
                "{{trust_domain: td, node_name: n, {files}, trust_bundle: [/proc/self/status], \
                 svid_ttl: {ttl}}}"
            ))
            .unwrap()
        };
        assert!(identity("87600h").validate().is_ok());
        for ttl in [
            "99999999999h",
            "18446744073709551615s",
            "18446744073709551615ms",
        ] {
            let e = identity(ttl).validate().unwrap_err();
            assert_eq!(e.field, "identity.svid_ttl");
            assert!(
                e.reason.contains("after the year 9999"),
                "{ttl}: {}",
                e.reason
            );
        }
    }

    #[test]
    fn durations_parse_with_units_only() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("1d").is_err());
    }
}
