//! SPIFFE IDs as meshd issues and accepts them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//! Parsing is strict: anything a lenient parser might normalise (case, dots, escapes, extra
//! segments, ports, queries) is rejected with the reason, because an ID that two parsers read
//! differently is an authorization bypass.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {id:?}: {reason}")]
pub struct SpiffeError {
    pub id: String,
    pub reason: &'static str,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(id: &str) -> Result<Self, SpiffeError> {
        let fail = |reason| SpiffeError {
            id: id.to_string(),
            reason,
        };
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or(fail("scheme must be spiffe://"))?;
        let (domain, path) = rest.split_once('/').ok_or(fail("no path"))?;
        check_trust_domain(domain).map_err(fail)?;
        let segments: Vec<&str> = path.split('/').collect();
        let [ns_key, ns, sa_key, sa] = segments.as_slice() else {
            return Err(fail("path must be /ns/<namespace>/sa/<service-account>"));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(fail("path must be /ns/<namespace>/sa/<service-account>"));
        }
        for segment in [ns, sa] {
            check_segment(segment).map_err(fail)?;
        }
        Ok(SpiffeId {
            trust_domain: domain.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

fn check_trust_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("empty trust domain");
    }
    if domain.len() > 255 {
        return Err("trust domain longer than 255 characters");
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if !domain.chars().all(ok) {
        return Err("trust domain may hold only lowercase letters, digits, '-', '.', '_'");
    }
    Ok(())
}

fn check_segment(segment: &str) -> Result<(), &'static str> {
    if segment.is_empty() {
        return Err("empty path segment");
    }
    if segment == "." || segment == ".." {
        return Err("'.' or '..' path segment");
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if !segment.chars().all(ok) {
        return Err("path segments may hold only letters, digits, '-', '.', '_'");
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_id_round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "checkout");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
    }

    #[test]
    fn everything_else_is_rejected_with_a_reason() {
        let bad = [
            ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
            ("https://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://Cluster.local/ns/a/sa/b", "lowercase"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "lowercase"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "lowercase"),
            ("spiffe://cluster.local/ns/a/sa/b/", "path must be"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "path must be"),
            ("spiffe://cluster.local/ns/a/svc/b", "path must be"),
            ("spiffe://cluster.local/ns//sa/b", "empty path segment"),
            ("spiffe://cluster.local/ns/../sa/b", "'..'"),
            ("spiffe://cluster.local/ns/a%2f/sa/b", "only letters"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "only letters"),
            ("spiffe://cluster.local/ns/a/sa/b#f", "only letters"),
        ];
        for (id, reason) in bad {
            let err = id.parse::<SpiffeId>().unwrap_err();
            assert!(err.reason.contains(reason), "{id}: {}", err.reason);
        }
    }
}
