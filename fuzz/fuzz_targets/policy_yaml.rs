//! AuthorizationPolicy files: YAML parsing and compilation, then every compiled policy decides
//! a plaintext connection, an mTLS connection and an HTTP request for a workload it selects.
//! Errors are fine, panics are not.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use meshd::policy::{doc, Attrs, Http, PolicySet, Target, Unknown};

fn decide_all(set: &PolicySet, target: &Target) {
    let mut headers = HeaderMap::new();
    headers.insert("x-token", HeaderValue::from_static("admin"));
    let http = Http {
        method: "GET",
        path: "/admin/users",
        host: Some("shop.example:8080"),
        headers: &headers,
    };
    let peers = [
        (None, IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
        (
            Some("cluster.local/ns/shop/sa/web"),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)),
        ),
    ];
    for (principal, source_ip) in peers {
        for http in [None, Some(&http)] {
            let attrs = Attrs {
                principal,
                namespace: principal.map(|_| "shop"),
                source_ip,
                destination_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
                destination_port: 8080,
                http,
            };
            for unknown in [Unknown::AsTcp, Unknown::Defer] {
                let _ = set.decide(target, &attrs, unknown);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = doc::parse(text, Path::new("fuzz.yaml")) else {
        return;
    };
    let targets: Vec<(String, BTreeMap<String, String>)> = (policies.iter())
        .map(|p| (p.namespace.clone(), p.selector.clone().unwrap_or_default()))
        .collect();
    let set = PolicySet::new(policies);
    for (namespace, labels) in &targets {
        decide_all(&set, &Target { namespace, labels });
    }
});
