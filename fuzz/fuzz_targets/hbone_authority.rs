//! The CONNECT of an HBONE stream (:15008), as a peer controls it: `:authority` bytes as h2
//! reads them into a URI, a whole request target, then `connect_target`, which picks the
//! address to dial, and `authority::target`, which tells the forms apart; and the same bytes
//! as the `Forwarded` and `traceparent` values meshd reads. No panic; an accepted target reads
//! one way only (the address dialled is the authority's host and port as logged); an accepted
//! `Forwarded` address or `traceparent` survives meshd's own serialisation unchanged.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use http::{
    uri::{Authority, Parts, Uri},
    HeaderValue,
};
use libfuzzer_sys::fuzz_target;
use meshd::tunnel::{
    authority::{self, Target},
    forwarded,
    server::connect_target,
    traceparent::TraceParent,
};

fn check(uri: &Uri, target: Option<SocketAddrV4>) {
    let form = authority::target(uri);
    assert_eq!(
        target,
        if let Target::V4(a) = form {
            Some(a)
        } else {
            None
        }
    );
    if let Target::V6(addr) = form {
        let authority = uri.authority().expect("a target comes from an authority");
        assert_eq!(authority.port_u16(), Some(addr.port()), "{authority}");
    }
    let Some(addr) = target else {
        return;
    };
    let authority = uri.authority().expect("a target comes from an authority");
    assert_eq!(authority.port_u16(), Some(addr.port()), "{authority}");
    let host = authority.host().parse::<Ipv4Addr>().ok();
    assert_eq!(host, Some(*addr.ip()), "{authority}");
}

fn headers(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    if let Ok(Some(ip)) = forwarded::source(&value) {
        assert_eq!(forwarded::source(&forwarded::header(ip)), Ok(Some(ip)));
    }
    if let Ok(t) = TraceParent::parse(&value) {
        assert_eq!(TraceParent::parse(&t.header()), Ok(t));
    }
}

fuzz_target!(|data: &[u8]| {
    // h2 builds a CONNECT request's URI from `:authority` alone.
    if let Ok(authority) = Authority::try_from(data) {
        let _ = (authority.host(), authority.port_u16());
        let mut parts = Parts::default();
        parts.authority = Some(authority);
        if let Ok(uri) = Uri::from_parts(parts) {
            check(&uri, connect_target(&uri));
        }
    }
    // A request target as a whole (absolute form, authority form).
    if let Ok(uri) = Uri::try_from(data) {
        check(&uri, connect_target(&uri));
    }
    headers(data);
});
