//! The CONNECT target of an HBONE stream (:15008): `:authority` bytes as h2 reads them into a
//! URI, a whole request target, then `connect_target`, which picks the address to dial. No
//! panic, and an accepted target reads one way only: the address dialled is the authority's
//! host and port as logged.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use http::uri::{Authority, Parts, Uri};
use libfuzzer_sys::fuzz_target;
use meshd::tunnel::server::connect_target;

fn check(uri: &Uri, target: Option<SocketAddrV4>) {
    let Some(addr) = target else {
        return;
    };
    let authority = uri.authority().expect("a target comes from an authority");
    assert_eq!(authority.port_u16(), Some(addr.port()), "{authority}");
    let host = authority.host().parse::<Ipv4Addr>().ok();
    assert_eq!(host, Some(*addr.ip()), "{authority}");
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
});
