//! What a CONNECT's `:authority` names. meshd delivers to IPv4 addresses only (its workloads,
//! pods and listeners are IPv4; `proxy::dial` takes an IPv4 address), so an IPv6 literal or a
//! hostname is a well-formed request meshd cannot serve (answered 501, with a reason of its
//! own), unlike bytes that are no authority at all (400). Istio's ztunnel sends `ip:port` for
//! workloads (IPv6 bracketed) and `hostname:port` when it targets a Service by name (through
//! a waypoint or an east-west gateway); it resolves the latter to a local endpoint itself
//! (src/proxy/inbound.rs `find_inbound_upstream`).

use std::net::{SocketAddrV4, SocketAddrV6};

/// The kinds of `:authority` a CONNECT may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `a.b.c.d:port`: the one kind meshd delivers.
    V4(SocketAddrV4),
    /// `[v6]:port`
    V6(SocketAddrV6),
    /// `name:port`, a DNS name (RFC 1123 labels).
    Hostname,
    /// Anything else: no authority, no port, user info, a malformed address.
    Invalid,
}

/// Reads `uri`'s authority. Untrusted input: fuzzed by `fuzz/fuzz_targets/hbone_authority.rs`
/// (through `server::connect_target`).
pub fn target(uri: &http::Uri) -> Target {
    let Some(authority) = uri.authority() else {
        return Target::Invalid;
    };
    let text = authority.as_str();
    if let Ok(v4) = text.parse::<SocketAddrV4>() {
        return Target::V4(v4);
    }
    if text.starts_with('[') {
        return text.parse().map_or(Target::Invalid, Target::V6);
    }
    match text.rsplit_once(':') {
        Some((host, port)) if is_hostname(host) && is_port(port) => Target::Hostname,
        _ => Target::Invalid,
    }
}

fn is_port(s: &str) -> bool {
    (1..=5).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok()
}

/// RFC 1123 host name: labels of 1-63 letters, digits and inner hyphens, 253 bytes at most, the
/// last label not all digits (so `1.2.3` or `1.2.3.4.5` is not a name but a bad address).
fn is_hostname(s: &str) -> bool {
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_is_numeric = s
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (1..=253).contains(&s.len()) && s.split('.').all(label) && !last_is_numeric
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(authority: &str) -> Target {
        let mut parts = http::uri::Parts::default();
        parts.authority = Some(authority.parse().unwrap());
        target(&http::Uri::from_parts(parts).unwrap())
    }

    #[test]
    fn the_forms_are_told_apart() {
        assert_eq!(
            of("10.0.0.9:8080"),
            Target::V4("10.0.0.9:8080".parse().unwrap())
        );
        assert_eq!(
            of("[2001:db8::1]:80"),
            Target::V6("[2001:db8::1]:80".parse().unwrap())
        );
        assert_eq!(
            of("[::ffff:10.0.0.9]:80"),
            Target::V6("[::ffff:10.0.0.9]:80".parse().unwrap())
        );
        for name in [
            "reviews.default.svc.cluster.local:9080",
            "localhost:80",
            "a-b.c1:1",
            "x:65535",
        ] {
            assert_eq!(of(name), Target::Hostname, "{name}");
        }
        for bad in [
            "10.0.0.9",          // no port
            "10.0.0.9:",         // empty port
            "10.0.0.9:65536",    // not a port
            "010.0.0.9:80",      // a leading zero is no address and no name
            "1.2.3.4.5:80",      // all-numeric last label: a bad address, not a name
            "[2001:db8::1]",     // no port
            "[2001:db8::zz]:80", // not IPv6
            "user@10.0.0.9:80",  // user info
            "-bad.example:80",   // label starting with '-'
            "under_score.example:80",
            "a..b:80",
            "host:+80",
        ] {
            assert_eq!(of(bad), Target::Invalid, "{bad}");
        }
        let long = format!("{}.example:80", "a".repeat(64));
        assert_eq!(of(&long), Target::Invalid);
        let mut no_authority = http::uri::Parts::default();
        no_authority.path_and_query = Some("/".parse().unwrap());
        let uri = http::Uri::from_parts(no_authority).unwrap();
        assert_eq!(target(&uri), Target::Invalid);
    }
}
