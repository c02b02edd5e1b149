//! A decision asked in words rather than from a live connection: `meshd policy explain` and the
//! policy corpus tests. It goes through the same evaluation as connections and requests.

use std::{collections::BTreeMap, net::IpAddr};

use http::HeaderMap;

use super::{Attrs, Decision, Http, PolicySet, Target, Unknown};

/// One connection (no `request`) or request to a workload.
#[derive(Debug, Clone)]
pub struct Query {
    /// `td/ns/X/sa/Y` (a `spiffe://` prefix is accepted); `None` for plaintext.
    pub principal: Option<String>,
    pub source_ip: IpAddr,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub port: u16,
    pub request: Option<RequestQuery>,
}

#[derive(Debug, Clone, Default)]
pub struct RequestQuery {
    pub method: String,
    /// May carry a query string; rules see the path without it.
    pub path: String,
    pub host: Option<String>,
    pub headers: HeaderMap,
}

impl Query {
    pub fn decide(&self, set: &PolicySet) -> Decision {
        let principal = self
            .principal
            .as_deref()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let http = self.request.as_ref().map(|r| Http {
            method: &r.method,
            path: path_only(&r.path),
            host: r.host.as_deref(),
            headers: &r.headers,
        });
        let attrs = Attrs {
            principal,
            namespace: principal.and_then(namespace_of),
            source_ip: self.source_ip,
            destination_ip: IpAddr::from([0, 0, 0, 0]),
            destination_port: self.port,
            http: http.as_ref(),
        };
        let target = Target {
            namespace: &self.namespace,
            labels: &self.labels,
        };
        set.decide(&target, &attrs, Unknown::AsTcp)
    }
}

/// The path a rule sees: without `?query` (and `#fragment`).
pub fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// The namespace of a principal `td/ns/X/sa/Y`.
pub fn namespace_of(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    parts.next()?;
    (parts.next()? == "ns").then_some(())?;
    parts.next().filter(|ns| !ns.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_and_paths_are_read_as_rules_see_them() {
        assert_eq!(namespace_of("cluster.local/ns/foo/sa/bar"), Some("foo"));
        assert_eq!(namespace_of("cluster.local/sa/bar"), None);
        assert_eq!(path_only("/a/b?x=1#y"), "/a/b");
        assert_eq!(path_only("/a"), "/a");
    }
}
