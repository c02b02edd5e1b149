use std::collections::BTreeMap;

use super::*;
use crate::registry::record::{parse_root, parse_service, parse_workload, Rejected, ServicePort};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("td", "shop", sa).unwrap()
}

fn workload(name: &str, node: &str, ip: [u8; 4], labels: &[(&str, &str)]) -> WorkloadRecord {
    WorkloadRecord {
        name: name.into(),
        namespace: "shop".into(),
        node: node.into(),
        address: Ipv4Addr::from(ip),
        ports: Vec::new(),
        spiffe_id: id(name),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// A full listing of `workloads` (key, record, revision) and `services`.
fn listing(
    workloads: Vec<(String, WorkloadRecord, i64)>,
    services: Vec<(String, ServiceRecord)>,
) -> Vec<Change> {
    let w = workloads
        .into_iter()
        .map(|(k, r, rev)| Change::Workload(k, Some((r, rev))));
    let s = services
        .into_iter()
        .map(|(k, r)| Change::Service(k, Some(r)));
    w.chain(s).collect()
}

fn service(selector: &[(&str, &str)]) -> ServiceRecord {
    ServiceRecord {
        name: "orders".into(),
        namespace: "shop".into(),
        address: Ipv4Addr::new(198, 18, 100, 1),
        ports: vec![ServicePort {
            port: 80,
            target_port: Some(8080),
        }],
        selector: selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn local_pods_answer_before_the_shared_source_and_the_config() {
    let ip = Ipv4Addr::new(198, 19, 1, 2);
    let dst = SocketAddrV4::new(ip, 80);
    let reg = Registry::new(HashMap::from([(ip, id("configured"))]));
    assert_eq!(reg.expected(dst), Some(id("configured")));
    let shared = workload("shared", "n1", [198, 19, 1, 2], &[]);
    reg.replace_shared(listing(vec![("k".into(), shared, 5)], vec![]));
    assert_eq!(reg.expected(dst), Some(id("shared")));
    reg.add_local(workload("local", "n0", [198, 19, 1, 2], &[]));
    assert_eq!(reg.expected(dst), Some(id("local")));
    assert_eq!(reg.remove_local(ip), Some(id("local")));
    assert_eq!(reg.expected(dst), Some(id("shared")));
    let elsewhere = SocketAddrV4::new(Ipv4Addr::new(198, 19, 9, 9), 80);
    assert_eq!(reg.expected(elsewhere), None);
}

#[test]
fn an_identity_is_unheld_only_when_its_last_local_workload_goes() {
    let reg = Registry::new(HashMap::new());
    let mut a = workload("web", "n0", [198, 19, 1, 2], &[]);
    reg.add_local(a.clone());
    a.address = Ipv4Addr::new(198, 19, 1, 3);
    reg.add_local(a);
    assert_eq!(reg.remove_local(Ipv4Addr::new(198, 19, 1, 2)), None);
    assert_eq!(
        reg.remove_local(Ipv4Addr::new(198, 19, 1, 3)),
        Some(id("web"))
    );
    assert_eq!(reg.remove_local(Ipv4Addr::new(198, 19, 1, 3)), None);
}

#[test]
fn host_workloads_share_an_address_and_are_told_apart_by_port() {
    let reg = Registry::new(HashMap::new());
    let mut a = workload("a", "n1", [198, 18, 0, 2], &[]);
    a.ports = vec![8080];
    let mut b = workload("b", "n1", [198, 18, 0, 2], &[]);
    b.ports = vec![9090];
    reg.replace_shared(listing(
        vec![("a".into(), a, 1), ("b".into(), b, 2)],
        vec![],
    ));
    let at = |port| reg.expected(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), port));
    assert_eq!(at(8080), Some(id("a")));
    assert_eq!(at(9090), Some(id("b")));
    assert_eq!(at(7070), None);
}

#[test]
fn the_newest_registration_of_an_address_wins() {
    let reg = Registry::new(HashMap::new());
    let old = workload("old", "n1", [198, 19, 1, 2], &[]);
    let new = workload("new", "n2", [198, 19, 1, 2], &[]);
    reg.replace_shared(listing(
        vec![("x".into(), new, 9), ("y".into(), old, 3)],
        vec![],
    ));
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 2), 1);
    assert_eq!(reg.expected(dst), Some(id("new")));
    reg.apply_shared(vec![Change::Workload("x".into(), None)]);
    assert_eq!(reg.expected(dst), Some(id("old")));
}

#[test]
fn a_service_resolves_to_the_selected_workloads_of_its_namespace_in_turn() {
    let reg = Registry::new(HashMap::new());
    let b1 = workload("b1", "n1", [198, 19, 1, 2], &[("app", "orders")]);
    let b2 = workload(
        "b2",
        "n2",
        [198, 19, 2, 2],
        &[("app", "orders"), ("v", "2")],
    );
    let other = workload("c", "n2", [198, 19, 2, 3], &[("app", "other")]);
    let mut foreign = workload("d", "n2", [198, 19, 2, 4], &[("app", "orders")]);
    foreign.namespace = "elsewhere".into();
    let all = [b1, b2, other, foreign];
    let listed = all
        .iter()
        .enumerate()
        .map(|(i, w)| (i.to_string(), w.clone(), i as i64));
    reg.replace_shared(listing(
        listed.collect(),
        vec![("s".into(), service(&[("app", "orders")]))],
    ));
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1), 80);
    assert!(reg.knows(*vip.ip()));
    assert_eq!(reg.service(SocketAddrV4::new(*vip.ip(), 81)), None);
    let target = reg.service(vip).unwrap();
    let addrs: Vec<String> = target
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(addrs, ["198.19.1.2:8080", "198.19.2.2:8080"]);
    let first: Vec<SocketAddrV4> = (0..4)
        .map(|_| reg.endpoints_in_turn(&target)[0].addr)
        .collect();
    assert_ne!(first[0], first[1], "round robin");
    assert_eq!(first[0], first[2]);
    // The endpoint leaves: the Service follows.
    reg.apply_shared(vec![Change::Workload("0".into(), None)]);
    assert_eq!(reg.service(vip).unwrap().endpoints.len(), 1);
}

#[test]
fn records_from_a_source_are_checked_before_they_are_believed() {
    let good = serde_json::to_vec(&workload("b", "n1", [198, 19, 1, 2], &[])).unwrap();
    assert!(parse_workload(&good, "n1").is_ok());
    assert_eq!(parse_workload(&good, "n2"), Err(Rejected::WrongNode));
    assert_eq!(parse_workload(b"{", "n1"), Err(Rejected::Malformed));
    let bad_id = String::from_utf8(good.clone())
        .unwrap()
        .replace("spiffe://", "http://");
    assert_eq!(
        parse_workload(bad_id.as_bytes(), "n1"),
        Err(Rejected::Malformed)
    );
    let mut shouting = workload("B", "n1", [198, 19, 1, 2], &[]);
    shouting.name = "B".into();
    let shouting = serde_json::to_vec(&shouting).unwrap();
    assert_eq!(parse_workload(&shouting, "n1"), Err(Rejected::BadName));
    let svc = serde_json::to_vec(&service(&[("app", "orders")])).unwrap();
    assert!(parse_service(&svc).is_ok());
    let everything = serde_json::to_vec(&service(&[])).unwrap();
    assert_eq!(parse_service(&everything), Err(Rejected::BadService));
    let unknown_field =
        br#"{"name":"a","namespace":"b","address":"1.2.3.4","ports":[],"selector":{},"x":1}"#;
    assert_eq!(parse_service(unknown_field), Err(Rejected::Malformed));
    let _: BTreeMap<String, String> = BTreeMap::new();
}

#[test]
fn trouble_is_reported_with_its_age_until_cleared() {
    let reg = Registry::new(HashMap::new());
    assert_eq!(reg.trouble(), None);
    reg.set_trouble(Some("etcd unreachable".into()));
    assert!(reg.trouble().unwrap().starts_with("etcd unreachable (for "));
    reg.set_trouble(None);
    assert_eq!(reg.trouble(), None);
}

#[test]
fn roots_from_the_shared_source_are_announced_when_they_change() {
    let reg = Registry::new(HashMap::new());
    let mut seen = reg.watch_roots();
    seen.borrow_and_update();
    reg.apply_shared(vec![Change::Root(
        "/meshd/bundle/r2".into(),
        Some("PEM".into()),
    )]);
    assert!(seen.has_changed().unwrap());
    assert_eq!(
        reg.roots(),
        [("/meshd/bundle/r2".to_string(), "PEM".to_string())]
    );
    seen.borrow_and_update();
    reg.replace_shared(vec![Change::Root(
        "/meshd/bundle/r2".into(),
        Some("PEM".into()),
    )]);
    reg.apply_shared(vec![Change::Root("/meshd/bundle/r2".into(), None)]);
    assert!(seen.has_changed().unwrap());
    assert!(reg.roots().is_empty());
    assert_eq!(parse_root(b"not a certificate"), Err(Rejected::BadRoot));
}
