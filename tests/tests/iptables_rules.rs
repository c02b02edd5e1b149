//! meshd's iptables rule set against the real iptables, in a scratch network namespace: applied
//! atomically and verified, applied twice without duplicates, removed completely.

use std::{net::Ipv4Addr, process::Command};

use iptables_fallback::{Iptables, RuleSpec};
use testhosts::require_privileges;

fn spec(inbound_ports: Vec<u16>) -> RuleSpec {
    RuleSpec {
        outbound_port: 15001,
        inbound_port: 15006,
        proxy_mark: 0x539,
        proxy_uid: Some(1337),
        proxy_ports: mesh_common::ports::ALL.to_vec(),
        excluded_ports: vec![22],
        excluded_cidrs: vec!["10.0.0.0/8".into()],
        inbound_ports,
        outbound_cgroups: None,
        inbound_all_ports: false,
        delivery_source: Ipv4Addr::new(127, 0, 0, 6),
    }
}

fn nat_table(ipt: &Iptables) -> String {
    let out = Command::new(ipt.backend.save())
        .args(["-t", "nat"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rules_apply_idempotently_and_remove_completely() {
    require_privileges!();
    let ok = meshd::sys::in_scratch_netns(|| {
        let ipt = Iptables::detect()?;
        ipt.apply(&spec(vec![8080]))?;
        let first = nat_table(&ipt);
        assert!(first.contains("--to-ports 15001"), "{first}");
        assert!(first.contains("--to-ports 15006"), "{first}");
        // A second apply (a restart, or a config change) replaces, never duplicates.
        ipt.apply(&spec(vec![8080, 9090]))?;
        let second = nat_table(&ipt);
        assert_eq!(second.matches("-j MESH_OUTPUT").count(), 1, "{second}");
        assert_eq!(second.matches("-j MESH_INBOUND").count(), 1, "{second}");
        assert!(second.contains("8080,9090"), "{second}");
        assert!(ipt.present()?);
        assert!(ipt.remove()? > 0);
        let after = nat_table(&ipt);
        assert!(!after.contains("MESH"), "{after}");
        assert_eq!(ipt.remove()?, 0, "removing twice is a no-op");
        Ok(())
    });
    ok.unwrap();
}
