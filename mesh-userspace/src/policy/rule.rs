//! A compiled AuthorizationPolicy rule and its evaluation against one connection or request.
//!
//! A connection decided before any request is seen has no HTTP attributes; a rule that needs
//! them (methods, paths, hosts, `request.headers`) then evaluates to [`Tri::Unknown`], and the
//! caller says what that means: on a TCP port Istio's rule (an ALLOW rule with HTTP fields never
//! matches, a DENY rule applies as if they were absent), on an HTTP or gRPC port "decide each
//! request".

use std::net::IpAddr;

use http::HeaderMap;

use super::matcher::{Field, IpBlock, Pattern};

/// What a connection or request is, as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    /// The caller's identity in Istio's form, `<trust-domain>/ns/<ns>/sa/<sa>` (no scheme);
    /// `None` for plaintext.
    pub principal: Option<&'a str>,
    /// The caller's namespace (from its identity).
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// Present once a request head has been read.
    pub http: Option<&'a Http<'a>>,
}

/// The request attributes HTTP rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// `Host` or `:authority`, as sent.
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// A three-valued match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    No,
    Yes,
    /// Depends on HTTP attributes that are not known yet.
    Unknown,
}

impl Tri {
    fn and(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::No, _) | (_, Tri::No) => Tri::No,
            (Tri::Yes, Tri::Yes) => Tri::Yes,
            _ => Tri::Unknown,
        }
    }

    fn or(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::Yes, _) | (_, Tri::Yes) => Tri::Yes,
            (Tri::No, Tri::No) => Tri::No,
            _ => Tri::Unknown,
        }
    }

    fn from_bool(b: bool) -> Tri {
        if b {
            Tri::Yes
        } else {
            Tri::No
        }
    }

    /// OR over a list, where an empty list matches (a rule without `from` is any source).
    fn any<T>(items: &[T], eval: impl Fn(&T) -> Tri) -> Tri {
        if items.is_empty() {
            return Tri::Yes;
        }
        items.iter().fold(Tri::No, |acc, i| acc.or(eval(i)))
    }
}

/// `from.source`.
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub principals: Field<Pattern>,
    pub namespaces: Field<Pattern>,
    pub ip_blocks: Field<IpBlock>,
}

/// `to.operation`.
#[derive(Debug, Clone, Default)]
pub struct Operation {
    pub hosts: Field<Pattern>,
    pub ports: Field<u16>,
    pub methods: Field<Pattern>,
    pub paths: Field<Pattern>,
}

/// One `when` condition.
#[derive(Debug, Clone)]
pub enum Condition {
    SourceIp(Field<IpBlock>),
    SourcePrincipal(Field<Pattern>),
    SourceNamespace(Field<Pattern>),
    DestinationIp(Field<IpBlock>),
    DestinationPort(Field<u16>),
    /// `request.headers[name]`, the name in lower case.
    RequestHeader(http::HeaderName, Field<Pattern>),
}

#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Source {
    fn eval(&self, a: &Attrs) -> Tri {
        Tri::from_bool(
            self.principals.matches(a.principal)
                && self.namespaces.matches(a.namespace)
                && self.ip_blocks.matches(a.source_ip),
        )
    }
}

impl Operation {
    fn needs_http(&self) -> bool {
        !(self.hosts.is_empty() && self.methods.is_empty() && self.paths.is_empty())
    }

    fn eval(&self, a: &Attrs) -> Tri {
        if !self.ports.matches(a.destination_port) {
            return Tri::No;
        }
        if !self.needs_http() {
            return Tri::Yes;
        }
        let Some(http) = a.http else {
            return Tri::Unknown;
        };
        let host_ok = self.hosts.is_empty() || {
            let host = http.host.map(str::to_ascii_lowercase);
            let bare = host.as_deref().map(strip_port);
            self.hosts.check(|p| {
                host.as_deref().is_some_and(|h| p.matches(h)) || bare.is_some_and(|h| p.matches(h))
            })
        };
        Tri::from_bool(
            host_ok
                && self.methods.matches(Some(http.method))
                && self.paths.matches(Some(http.path)),
        )
    }
}

/// `example.com:8080` -> `example.com` (IPv6 literals keep their brackets).
pub(crate) fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl Condition {
    fn eval(&self, a: &Attrs) -> Tri {
        let yes = match self {
            Condition::SourceIp(f) => f.matches(a.source_ip),
            Condition::SourcePrincipal(f) => f.matches(a.principal),
            Condition::SourceNamespace(f) => f.matches(a.namespace),
            Condition::DestinationIp(f) => f.matches(a.destination_ip),
            Condition::DestinationPort(f) => f.matches(a.destination_port),
            Condition::RequestHeader(name, f) => {
                let Some(http) = a.http else {
                    return Tri::Unknown;
                };
                let value = http.headers.get(name).and_then(|v| v.to_str().ok());
                f.matches(value)
            }
        };
        Tri::from_bool(yes)
    }
}

impl Rule {
    pub fn eval(&self, a: &Attrs) -> Tri {
        let when = self.when.iter().fold(Tri::Yes, |acc, c| acc.and(c.eval(a)));
        Tri::any(&self.from, |s| s.eval(a))
            .and(Tri::any(&self.to, |o| o.eval(a)))
            .and(when)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(http: Option<&'a Http<'a>>) -> Attrs<'a> {
        Attrs {
            principal: Some("cluster.local/ns/foo/sa/sleep"),
            namespace: Some("foo"),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 8000,
            http,
        }
    }

    fn get_rule() -> Rule {
        Rule {
            to: vec![Operation {
                methods: Field {
                    values: vec![Pattern::Exact("GET".into())],
                    not_values: vec![],
                },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn http_fields_are_unknown_until_a_request_is_read() {
        assert_eq!(get_rule().eval(&attrs(None)), Tri::Unknown);
        let headers = HeaderMap::new();
        let get = Http {
            method: "GET",
            path: "/",
            host: Some("Httpbin.Foo:8000"),
            headers: &headers,
        };
        assert_eq!(get_rule().eval(&attrs(Some(&get))), Tri::Yes);
        let post = Http {
            method: "POST",
            ..get
        };
        assert_eq!(get_rule().eval(&attrs(Some(&post))), Tri::No);
    }

    #[test]
    fn an_empty_rule_matches_everything_and_a_failed_source_beats_unknown() {
        assert_eq!(Rule::default().eval(&attrs(None)), Tri::Yes);
        let mut rule = get_rule();
        rule.from = vec![Source {
            namespaces: Field {
                values: vec![Pattern::Exact("bar".into())],
                not_values: vec![],
            },
            ..Default::default()
        }];
        assert_eq!(rule.eval(&attrs(None)), Tri::No);
    }

    #[test]
    fn hosts_match_with_or_without_the_port_and_without_case() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
