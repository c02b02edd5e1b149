//! IPv6 in iptables mode: meshd proxies IPv4 only, so a new inbound IPv6 TCP connection to what
//! it captures is refused (TCP reset) in the filter table rather than reaching the workload in
//! plaintext. One chain, `MESH6_INBOUND`, jumped to from INPUT; applied and removed with the
//! IPv4 rule set. Skipped where the kernel has no IPv6 at all (nothing to guard).

use crate::{
    rules::{port_groups, Error},
    Iptables, RuleSpec,
};

pub const CHAIN6: &str = "MESH6_INBOUND";
const JUMP6: &str = "-A INPUT -p tcp -j MESH6_INBOUND";

fn ipv6_available() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// The guard's rules: SYNs to the captured ports (all but meshd's own, in a pod) get a reset.
pub fn guard6_rules(spec: &RuleSpec) -> Vec<String> {
    let refuse = "--syn -j REJECT --reject-with tcp-reset";
    let mut out = Vec::new();
    if spec.inbound_all_ports {
        out.push("-d ::1/128 -j RETURN".to_string());
        for group in port_groups(&spec.proxy_ports) {
            out.push(format!("-p tcp -m multiport --dports {group} -j RETURN"));
        }
        out.push(format!("-p tcp {refuse}"));
    }
    for group in port_groups(&spec.inbound_ports) {
        out.push(format!("-p tcp -m multiport --dports {group} {refuse}"));
    }
    out
}

impl Iptables {
    /// Installs (or replaces) the IPv6 guard in one ip6tables-restore transaction.
    pub(crate) fn apply_guard6(&self, spec: &RuleSpec) -> Result<(), Error> {
        if !ipv6_available() {
            return Ok(());
        }
        let saved = self.save_table(self.backend.save6(), "filter")?;
        let mut text = format!("*filter\n:{CHAIN6} - [0:0]\n");
        for jump in saved.lines().filter(|l| *l == JUMP6) {
            text.push_str(&format!("-D{}\n", &jump[2..]));
        }
        for rule in guard6_rules(spec) {
            text.push_str(&format!("-A {CHAIN6} {rule}\n"));
        }
        text.push_str(&format!("{JUMP6}\nCOMMIT\n"));
        self.restore_with(self.backend.restore6(), &text)
    }

    /// Removes the IPv6 guard; how many objects went (chain and jumps).
    pub(crate) fn remove_guard6(&self) -> Result<usize, Error> {
        if !ipv6_available() {
            return Ok(0);
        }
        let saved = self.save_table(self.backend.save6(), "filter")?;
        let jumps = saved.lines().filter(|l| *l == JUMP6).count();
        let chain = saved.lines().any(|l| l.starts_with(&format!(":{CHAIN6} ")));
        if jumps == 0 && !chain {
            return Ok(0);
        }
        let mut text = String::from("*filter\n");
        text.push_str(&format!("-D{}\n", &JUMP6[2..]).repeat(jumps));
        if chain {
            text.push_str(&format!("-F {CHAIN6}\n-X {CHAIN6}\n"));
        }
        text.push_str("COMMIT\n");
        self.restore_with(self.backend.restore6(), &text)?;
        Ok(jumps + usize::from(chain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_guard_refuses_only_captured_ports_and_pod_guard_all_but_meshds() {
        let spec = RuleSpec {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_mark: 0x539,
            proxy_uid: None,
            proxy_ports: vec![15001, 15006, 15008],
            excluded_ports: vec![],
            excluded_cidrs: vec![],
            inbound_ports: vec![7000, 8080],
            outbound_cgroups: None,
            inbound_all_ports: false,
            delivery_source: std::net::Ipv4Addr::new(127, 0, 0, 6),
        };
        let node = guard6_rules(&spec);
        assert_eq!(
            node,
            ["-p tcp -m multiport --dports 7000,8080 --syn -j REJECT --reject-with tcp-reset"]
        );
        let pod = guard6_rules(&RuleSpec {
            inbound_ports: vec![],
            inbound_all_ports: true,
            ..spec
        });
        assert_eq!(pod[0], "-d ::1/128 -j RETURN");
        assert!(pod[1].contains("--dports 15001,15006,15008 -j RETURN"));
        assert_eq!(pod[2], "-p tcp --syn -j REJECT --reject-with tcp-reset");
    }
}
