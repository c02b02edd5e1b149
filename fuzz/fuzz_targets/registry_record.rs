//! Registry records from etcd (written by other nodes and operators) and certificate requests
//! to the CA service: no panic; an accepted workload or Service record survives a round trip
//! through its JSON form unchanged; a Service resolves against an accepted workload without
//! panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::registry::record::{parse_root, parse_service, parse_workload, resolve};

fuzz_target!(|data: &[u8]| {
    let _ = parse_root(data);
    let _ = serde_json::from_slice::<meshd::identity::ca_service::SignRequest>(data);
    let workload = parse_workload(data, "n1");
    if let Ok(w) = &workload {
        let again = serde_json::to_vec(w).unwrap();
        assert_eq!(parse_workload(&again, "n1").as_ref(), Ok(w), "round trip");
    }
    if let Ok(service) = parse_service(data) {
        let again = serde_json::to_vec(&service).unwrap();
        assert_eq!(parse_service(&again).as_ref(), Ok(&service), "round trip");
        let workloads: Vec<_> = workload.into_iter().collect();
        for port in &service.ports {
            let target = resolve(&service, port, workloads.iter());
            assert!(target.endpoints.len() <= workloads.len());
        }
    }
});
