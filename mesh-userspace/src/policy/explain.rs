//! `meshd policy check` and `meshd policy explain`: the policy files validated offline, and one
//! decision explained (the policies that apply, the one that decided, its file, line and rule).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use http::{HeaderName, HeaderValue};

use super::{
    doc,
    query::{Query, RequestQuery},
    Action, PolicySet, Target, Verdict,
};
use crate::config::{Config, Protocol};

/// `meshd policy check PATH...`: loads every file; prints what it found or the first error.
pub fn check(paths: &[PathBuf]) -> Result<()> {
    let policies = doc::load(paths)?;
    for p in &policies {
        let rules = p.rules.len();
        println!("{}  {:?}  {}  rules: {rules}", p.origin, p.action, p.id());
    }
    println!("{} policies, all valid", policies.len());
    Ok(())
}

/// What `meshd policy explain` is asked.
#[derive(Debug, Clone, clap::Args)]
pub struct Question {
    /// Policy files or directories (default: the configuration's `policies`).
    #[arg(long = "policy")]
    pub policies: Vec<PathBuf>,
    /// meshd's configuration: workloads (namespace, labels, port protocols) and policies.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The caller's SPIFFE ID (spiffe://td/ns/X/sa/Y) or principal; omit for plaintext.
    #[arg(long)]
    pub from: Option<String>,
    /// The caller's address.
    #[arg(long, default_value = "10.0.0.1")]
    pub source_ip: IpAddr,
    /// The destination: a workload of --config by NAME, or NAMESPACE/NAME.
    #[arg(long)]
    pub to: String,
    /// Extra workload label KEY=VALUE (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// The destination port.
    #[arg(long)]
    pub port: u16,
    /// HTTP method (with --path/--header: a request; without them: a TCP connection).
    #[arg(long)]
    pub method: Option<String>,
    /// Request path (a query string is accepted; rules see the path without it).
    #[arg(long)]
    pub path: Option<String>,
    /// Request header NAME=VALUE (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
}

/// The destination workload: namespace, labels and the port's protocol.
fn destination(
    q: &Question,
    config: Option<&Config>,
) -> Result<(String, BTreeMap<String, String>, Protocol)> {
    let (ns, name) = match q.to.split_once('/') {
        Some((ns, name)) => (Some(ns.to_string()), name),
        None => (None, q.to.as_str()),
    };
    let configured = config.and_then(|c| {
        c.workloads
            .iter()
            .find(|w| w.name == name && ns.as_ref().is_none_or(|n| *n == w.namespace))
    });
    let (namespace, mut labels, protocol) = match configured {
        Some(w) => {
            let port = w.ports.iter().find(|p| p.port() == q.port);
            (
                w.namespace.clone(),
                w.labels.clone(),
                port.map_or(Protocol::Tcp, |p| p.protocol()),
            )
        }
        None if config.is_some() && ns.is_none() => {
            bail!("no workload {name:?} in the configuration")
        }
        None => (
            ns.unwrap_or_else(|| "default".into()),
            BTreeMap::new(),
            Protocol::Tcp,
        ),
    };
    for l in &q.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: not KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok((namespace, labels, protocol))
}

fn request(q: &Question) -> Result<Option<RequestQuery>> {
    if q.method.is_none() && q.path.is_none() && q.headers.is_empty() {
        return Ok(None);
    }
    let mut headers = http::HeaderMap::new();
    for h in &q.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("--header {h:?}: not NAME=VALUE"))?;
        let name =
            HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).context("--header name")?;
        headers.append(name, HeaderValue::from_str(v).context("--header value")?);
    }
    Ok(Some(RequestQuery {
        method: q.method.clone().unwrap_or_else(|| "GET".into()),
        path: q.path.clone().unwrap_or_else(|| "/".into()),
        host: headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(String::from),
        headers,
    }))
}

/// `meshd policy explain`: prints the decision and what made it.
pub fn explain(q: &Question) -> Result<()> {
    let config: Option<Config> = match &q.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            Some(
                serde_yaml_ng::from_str(&text)
                    .with_context(|| format!("parse {}", path.display()))?,
            )
        }
        None => None,
    };
    let mut paths = q.policies.clone();
    if paths.is_empty() {
        paths = config
            .as_ref()
            .map(|c| c.policies.clone())
            .unwrap_or_default();
    }
    let set = PolicySet::new(doc::load(&paths)?);
    let (namespace, labels, protocol) = destination(q, config.as_ref())?;
    let query = Query {
        principal: q.from.clone(),
        source_ip: q.source_ip,
        namespace,
        labels,
        port: q.port,
        request: request(q)?,
    };
    if query.request.is_some() && protocol == Protocol::Tcp && config.is_some() {
        println!("note: port {} is declared tcp: meshd decides its connections, not requests; a request here is what an http/grpc port would see", q.port);
    }
    let target = Target {
        namespace: &query.namespace,
        labels: &query.labels,
    };
    println!(
        "to {}/{:?} port {}",
        query.namespace, query.labels, query.port
    );
    for p in set.applicable(&target) {
        println!("  applies: {} {:?} ({})", p.id(), p.action, p.origin);
    }
    let d = query.decide(&set);
    let verdict = match d.verdict {
        Verdict::Allow => "ALLOW",
        Verdict::Deny => "DENY",
        Verdict::PerRequest => "PER-REQUEST",
    };
    println!("decision: {verdict} ({})", d.reason);
    if let (Some(p), Some(rule)) = (&d.policy, d.rule) {
        println!("by: {} {:?} rule {rule} at {}", p.id(), p.action, p.origin);
    }
    for a in d.audited.iter().filter(|a| a.action == Action::Audit) {
        println!("audited by: {} ({})", a.id(), a.origin);
    }
    Ok(())
}
