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
        let path = self.request.as_ref().map(|r| normalize_path(&r.path));
        let http = self.request.as_ref().map(|r| Http {
            method: &r.method,
            path: path.as_deref().unwrap_or("/"),
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

/// The path policy decides on, normalized as Istio's strictest setting
/// (`DECODE_AND_MERGE_SLASHES`) does, so that `//admin`, `/public/../admin`, `/%61dmin` or
/// `/a%2Fb` cannot slip past a rule written for `/admin` or `/a/b`: percent-encoded unreserved
/// characters and encoded slashes and backslashes are decoded, backslashes become slashes,
/// repeated slashes merge, and `.` and `..` segments are resolved (RFC 3986 5.2.4). The
/// request is forwarded as sent; only the decision uses this form.
pub fn normalize_path(path: &str) -> String {
    let decoded = decode_safe(path_only(path)).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = format!("/{}", segments.join("/"));
    if trailing && !segments.is_empty() {
        out.push('/');
    }
    out
}

/// Decodes `%XX` where XX is an unreserved character, `/` or `\\`; other escapes stay.
fn decode_safe(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        let value = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
        match value {
            Some(c)
                if bytes[i] == b'%' && (c.is_ascii_alphanumeric() || b"-._~/\\".contains(&c)) =>
            {
                out.push(c);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

    #[test]
    fn paths_are_decided_in_their_normal_form() {
        for (raw, normal) in [
            ("/admin/x", "/admin/x"),
            ("//admin//x", "/admin/x"),
            ("/public/../admin/x", "/admin/x"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/%61dmin/", "/admin/"),
            ("/a%2Fb", "/a/b"),
            ("/a%5cb\\c", "/a/b/c"),
            ("/../../etc", "/etc"),
            ("/a/./b/.", "/a/b/"),
            ("/x?y=/../admin", "/x"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("", "/"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
    }
}
