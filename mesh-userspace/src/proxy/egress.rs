//! Egress policy: which destinations outside the mesh each workload may reach. Policies select
//! workloads as AuthorizationPolicy does (namespace, `selector` labels); a workload that some
//! policy selects reaches only what one of their rules allows (CIDRs, ports, and host names
//! where the connection carries one: the TLS SNI or the HTTP `Host`), anything else is reset and
//! counted. Workloads no policy selects, and senders meshd cannot tie to a workload, follow
//! `mesh.egress`. This is the seeds' compromised-workload case: it must not reach an
//! attacker's host.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use serde::Deserialize;
use tokio::net::TcpStream;

use crate::{
    config::{Egress, Ipv4Cidr, Workload},
    policy::{matcher::Pattern, rule::strip_port},
};

/// How long meshd waits for a client's first bytes when a rule needs its host name.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(2);
/// The most it reads ahead to find the name (a ClientHello or a request head).
const SNIFF_MAX: usize = 16 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicyConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels the workload must carry; absent: every workload of the namespace.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// Destinations allowed; an empty list allows nothing.
    #[serde(default)]
    pub allow: Vec<EgressRuleConfig>,
}

fn default_namespace() -> String {
    "default".into()
}

/// One allowed destination: every field that is set has to match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRuleConfig {
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// `api.example.com`, `*.example.com`: matched against the TLS SNI or HTTP Host.
    #[serde(default)]
    pub hosts: Vec<String>,
}

struct Rule {
    cidrs: Vec<Ipv4Cidr>,
    ports: Vec<u16>,
    hosts: Vec<Pattern>,
}

struct Policy {
    name: String,
    namespace: String,
    selector: Option<BTreeMap<String, String>>,
    rules: Vec<Rule>,
}

/// Every egress policy, validated.
#[derive(Default)]
pub struct EgressPolicies {
    policies: Vec<Policy>,
}

impl EgressPolicies {
    pub fn new(configs: &[EgressPolicyConfig]) -> Result<EgressPolicies, String> {
        let mut policies = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let mut rules = Vec::new();
            for (j, r) in c.allow.iter().enumerate() {
                let at = |f: &str, k: usize| format!("egress_policies[{i}].allow[{j}].{f}[{k}]");
                let cidrs = (r.cidrs.iter().enumerate())
                    .map(|(k, s)| {
                        s.parse::<Ipv4Cidr>()
                            .map_err(|e| format!("{}: {e}", at("cidrs", k)))
                    })
                    .collect::<Result<_, _>>()?;
                let hosts = (r.hosts.iter().enumerate())
                    .map(|(k, h)| {
                        Pattern::parse(h)
                            .map(Pattern::lowercase)
                            .map_err(|e| format!("{}: {e}", at("hosts", k)))
                    })
                    .collect::<Result<_, _>>()?;
                if let Some(k) = r.ports.iter().position(|p| *p == 0) {
                    return Err(format!("{}: 0 is not a port", at("ports", k)));
                }
                rules.push(Rule {
                    cidrs,
                    ports: r.ports.clone(),
                    hosts,
                });
            }
            policies.push(Policy {
                name: format!("{}/{}", c.namespace, c.name),
                namespace: c.namespace.clone(),
                selector: c.selector.clone(),
                rules,
            });
        }
        Ok(EgressPolicies { policies })
    }

    fn selecting<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies.iter().filter(move |p| {
            p.namespace == w.namespace
                && (p.selector.iter().flatten()).all(|(k, v)| w.labels.get(k) == Some(v))
        })
    }

    /// Decides a connection from `workload` to `dst` outside the mesh; `app` is read ahead
    /// (peeked, not consumed) only when a rule needs the host name. `Err` names the policy
    /// that refused it, or `mesh.egress` when the default did.
    pub async fn decide(
        &self,
        default: Egress,
        workload: Option<&Workload>,
        dst: SocketAddrV4,
        app: &TcpStream,
    ) -> Result<(), String> {
        let selecting: Vec<&Policy> = workload
            .map(|w| self.selecting(w).collect())
            .unwrap_or_default();
        if selecting.is_empty() {
            return match default {
                Egress::Passthrough => Ok(()),
                Egress::Deny => Err("mesh.egress".into()),
            };
        }
        let candidates: Vec<&Rule> = (selecting.iter().flat_map(|p| &p.rules))
            .filter(|r| r.cidrs.is_empty() || r.cidrs.iter().any(|c| c.contains(*dst.ip())))
            .filter(|r| r.ports.is_empty() || r.ports.contains(&dst.port()))
            .collect();
        let refused = || {
            Err(selecting
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(","))
        };
        if candidates.iter().any(|r| r.hosts.is_empty()) {
            return Ok(());
        }
        if candidates.is_empty() {
            return refused();
        }
        let Some(name) = sniff(app).await else {
            return refused();
        };
        let name = name.to_ascii_lowercase();
        if candidates
            .iter()
            .any(|r| r.hosts.iter().any(|h| h.matches(&name)))
        {
            Ok(())
        } else {
            refused()
        }
    }
}

/// What the first bytes tell about the destination's name.
#[derive(Debug, PartialEq, Eq)]
enum Name {
    Found(String),
    /// The bytes so far are a prefix of a ClientHello or request head.
    NeedMore,
    /// Neither TLS with SNI nor HTTP with a Host.
    None,
}

/// Peeks at the client's first bytes until they name the host (TLS SNI, HTTP Host), they
/// cannot, or [`SNIFF_TIMEOUT`] passes.
async fn sniff(app: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; SNIFF_MAX];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, app.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        match name_in(&buf[..n]) {
            Name::Found(name) => return Some(name),
            Name::None => return None,
            Name::NeedMore if n == SNIFF_MAX => return None,
            // peek returns what is buffered at once; wait a little for the rest.
            Name::NeedMore => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

fn name_in(bytes: &[u8]) -> Name {
    if bytes.first() == Some(&0x16) {
        return sni(bytes);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"));
            match host.and_then(|h| std::str::from_utf8(h.value).ok()) {
                Some(h) => Name::Found(strip_port(h.trim()).to_string()),
                None => Name::None,
            }
        }
        Ok(httparse::Status::Partial) => Name::NeedMore,
        Err(_) => Name::None,
    }
}

/// The server name of a TLS ClientHello (in its first record).
fn sni(bytes: &[u8]) -> Name {
    let Some(len) = bytes
        .get(3..5)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return Name::NeedMore;
    };
    let Some(record) = bytes.get(5..5 + len) else {
        return Name::NeedMore;
    };
    match server_name(record) {
        Some(name) => Name::Found(name),
        None => Name::None,
    }
}

/// Walks a handshake message to the server_name extension.
fn server_name(record: &[u8]) -> Option<String> {
    let mut r = Reader(record);
    (r.u8()? == 1).then_some(())?; // ClientHello
    r.skip(3 + 2 + 32)?; // length, version, random
    let session = r.u8()?;
    r.skip(usize::from(session))?;
    let suites = r.u16()?;
    r.skip(usize::from(suites))?;
    let compression = r.u8()?;
    r.skip(usize::from(compression))?;
    let ext_len = usize::from(r.u16()?);
    let mut extensions = Reader(r.take(ext_len)?);
    while let (Some(kind), Some(len)) = (extensions.u16(), extensions.u16()) {
        let data = extensions.take(usize::from(len))?;
        if kind == 0 {
            let mut list = Reader(data);
            let list_len = usize::from(list.u16()?);
            let mut names = Reader(list.take(list_len)?);
            while let Some(name_type) = names.u8() {
                let name_len = usize::from(names.u16()?);
                let name = names.take(name_len)?;
                if name_type == 0 {
                    return String::from_utf8(name.to_vec()).ok();
                }
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello naming `host`.
    fn client_hello(host: &str) -> Vec<u8> {
        let name = host.as_bytes();
        let mut sni = vec![0u8, 0];
        let list_len = (name.len() + 3) as u16;
        sni.extend((list_len + 2).to_be_bytes());
        sni.extend(list_len.to_be_bytes());
        sni.push(0);
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend((sni.len() as u16).to_be_bytes());
        body.extend(&sni);
        let mut hs = vec![1, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(body);
        let mut record = vec![0x16, 3, 1];
        record.extend((hs.len() as u16).to_be_bytes());
        record.extend(hs);
        record
    }

    #[test]
    fn names_come_from_sni_or_host() {
        let hello = client_hello("api.example.com");
        assert_eq!(name_in(&hello), Name::Found("api.example.com".into()));
        assert_eq!(name_in(&hello[..20]), Name::NeedMore);
        let get = b"GET / HTTP/1.1\r\nHost: Evil.example:8080\r\n\r\n";
        assert_eq!(name_in(get), Name::Found("Evil.example".into()));
        assert_eq!(name_in(&get[..20]), Name::NeedMore);
        assert_eq!(name_in(b"SSH-2.0-OpenSSH\r\n"), Name::None);
        assert_eq!(name_in(b"GET / HTTP/1.1\r\n\r\n"), Name::None);
    }

    #[test]
    fn bad_rules_are_refused_with_their_field() {
        let bad = |rule: EgressRuleConfig| {
            let c = EgressPolicyConfig {
                name: "x".into(),
                namespace: "default".into(),
                selector: None,
                allow: vec![rule],
            };
            EgressPolicies::new(&[c]).err().unwrap()
        };
        let cidr = bad(EgressRuleConfig {
            cidrs: vec!["10.0.0.0/40".into()],
            ..Default::default()
        });
        assert!(
            cidr.starts_with("egress_policies[0].allow[0].cidrs[0]"),
            "{cidr}"
        );
        let host = bad(EgressRuleConfig {
            hosts: vec!["a*b".into()],
            ..Default::default()
        });
        assert!(
            host.starts_with("egress_policies[0].allow[0].hosts[0]"),
            "{host}"
        );
    }
}
