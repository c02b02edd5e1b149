//! meshd's nat rule set. Its own chains hang off OUTPUT (outbound capture) and PREROUTING
//! (inbound capture), so removing meshd is deleting two jumps and four chains:
//!
//! - `MESH_OUTPUT`: RETURN for meshd's own sockets (mark, uid), loopback destinations, meshd's
//!   ports and configured exclusions; the rest, from the workload cgroups (or from every process,
//!   in a pod's namespace), to `MESH_REDIRECT` (REDIRECT to :15001).
//! - `MESH_INBOUND`: RETURN for meshd's deliveries (source 127.0.0.6); connections to
//!   workload ports to `MESH_IN_REDIRECT` (REDIRECT to :15006).
//!
//! Every change is one `iptables-restore --noflush` transaction: applied whole or not at all.

use std::{
    io::Write,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use crate::Backend;

pub const CHAINS: [&str; 4] = [
    "MESH_OUTPUT",
    "MESH_REDIRECT",
    "MESH_INBOUND",
    "MESH_IN_REDIRECT",
];
/// Built-in chain -> meshd chain it jumps to.
const JUMPS: [(&str, &str); 2] = [("OUTPUT", "MESH_OUTPUT"), ("PREROUTING", "MESH_INBOUND")];
/// The multiport match takes at most 15 ports.
const MULTIPORT_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("rules applied but not as rendered: {0}")]
    Verify(String),
}

/// What to capture and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_mark: u32,
    pub proxy_uid: Option<u32>,
    /// meshd's own ports: never redirected.
    pub proxy_ports: Vec<u16>,
    pub excluded_ports: Vec<u16>,
    /// `a.b.c.d/len`, already validated.
    pub excluded_cidrs: Vec<String>,
    /// Outbound capture only for sockets of processes in these cgroups (paths relative to the
    /// cgroup v2 root; descendants included, by the kernel's cgroup match), so the node's other
    /// processes (kubelet, sshd) are never captured; `None`: every process (a pod's namespace,
    /// where every process is the pod's).
    pub outbound_cgroups: Option<Vec<String>>,
    /// Workload ports whose new inbound connections are captured.
    pub inbound_ports: Vec<u16>,
    /// Capture every inbound TCP port except meshd's own (a pod's namespace, where everything
    /// that arrives is for the pod), instead of `inbound_ports`.
    pub inbound_all_ports: bool,
    /// Source of meshd's deliveries to local workloads, never captured again.
    pub delivery_source: Ipv4Addr,
}

impl RuleSpec {
    /// The rules of meshd's chains, as `(chain, match-and-target)` in order.
    pub fn chain_rules(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![(
            "MESH_OUTPUT",
            format!("-m mark --mark {:#x} -j RETURN", self.proxy_mark),
        )];
        if let Some(uid) = self.proxy_uid {
            out.push((
                "MESH_OUTPUT",
                format!("-m owner --uid-owner {uid} -j RETURN"),
            ));
        }
        out.push(("MESH_OUTPUT", "-d 127.0.0.0/8 -j RETURN".into()));
        let mut skip_ports = self.proxy_ports.clone();
        skip_ports.extend(&self.excluded_ports);
        for group in port_groups(&skip_ports) {
            out.push((
                "MESH_OUTPUT",
                format!("-p tcp -m multiport --dports {group} -j RETURN"),
            ));
        }
        for cidr in &self.excluded_cidrs {
            out.push(("MESH_OUTPUT", format!("-d {cidr} -j RETURN")));
        }
        match &self.outbound_cgroups {
            None => out.push(("MESH_OUTPUT", "-p tcp -j MESH_REDIRECT".into())),
            Some(paths) => out.extend(paths.iter().map(|p| {
                let rule = format!("-p tcp -m cgroup --path {p:?} -j MESH_REDIRECT");
                ("MESH_OUTPUT", rule)
            })),
        }
        let to = self.outbound_port;
        out.push((
            "MESH_REDIRECT",
            format!("-p tcp -j REDIRECT --to-ports {to}"),
        ));
        let src = self.delivery_source;
        out.push(("MESH_INBOUND", format!("-s {src}/32 -j RETURN")));
        if self.inbound_all_ports {
            for group in port_groups(&self.proxy_ports) {
                let rule = format!("-p tcp -m multiport --dports {group} -j RETURN");
                out.push(("MESH_INBOUND", rule));
            }
            out.push(("MESH_INBOUND", "-p tcp -j MESH_IN_REDIRECT".into()));
        }
        for group in port_groups(&self.inbound_ports) {
            let rule = format!("-p tcp -m multiport --dports {group} -j MESH_IN_REDIRECT");
            out.push(("MESH_INBOUND", rule));
        }
        let to = self.inbound_port;
        out.push((
            "MESH_IN_REDIRECT",
            format!("-p tcp -j REDIRECT --to-ports {to}"),
        ));
        out
    }

    /// The whole rule set as `iptables-restore` input for a table without meshd's rules:
    /// what `meshd iptables --dry-run` prints.
    pub fn render(&self) -> String {
        restore_text(&[], self)
    }
}

/// Ports as comma-separated groups that fit one multiport match.
pub(crate) fn port_groups(ports: &[u16]) -> Vec<String> {
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
        .chunks(MULTIPORT_MAX)
        .map(|c| c.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
        .collect()
}

/// One restore transaction: declare meshd's chains (which empties any earlier copy), delete
/// `old_jumps` (saved `-A` lines), fill the chains, and add the jumps.
fn restore_text(old_jumps: &[String], spec: &RuleSpec) -> String {
    let mut t = String::from("*nat\n");
    for chain in CHAINS {
        t.push_str(&format!(":{chain} - [0:0]\n"));
    }
    t.push_str(&removal_lines(old_jumps, &[]));
    for (chain, rule) in spec.chain_rules() {
        t.push_str(&format!("-A {chain} {rule}\n"));
    }
    for (builtin, chain) in JUMPS {
        t.push_str(&format!("-A {builtin} -p tcp -j {chain}\n"));
    }
    t.push_str("COMMIT\n");
    t
}

fn removal_lines(old_jumps: &[String], old_chains: &[&str]) -> String {
    let mut t = String::new();
    for jump in old_jumps {
        t.push_str(&format!("-D{}\n", &jump[2..]));
    }
    for chain in old_chains {
        t.push_str(&format!("-F {chain}\n-X {chain}\n"));
    }
    t
}

/// meshd's rules in the nat table of the current network namespace, or of the namespace at
/// `netns` (a pod's: commands run through `nsenter --net`).
#[derive(Debug, Clone)]
pub struct Iptables {
    pub backend: Backend,
    pub netns: Option<std::path::PathBuf>,
}

impl Iptables {
    pub fn detect() -> Result<Iptables, crate::BackendError> {
        Ok(Iptables {
            backend: Backend::detect()?,
            netns: None,
        })
    }

    /// The same backend, working in the network namespace at `path`.
    pub fn in_netns(&self, path: &std::path::Path) -> Iptables {
        Iptables {
            backend: self.backend,
            netns: Some(path.to_path_buf()),
        }
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(program);
                c
            }
        }
    }

    /// Installs the rule set, replacing any earlier copy, in one transaction, then verifies it.
    /// Also refuses new inbound IPv6 connections to what it captures ([`crate::guard6`]).
    pub fn apply(&self, spec: &RuleSpec) -> Result<(), Error> {
        self.apply_guard6(spec)?;
        let saved = self.save()?;
        let (jumps, _) = existing(&saved);
        self.restore(&restore_text(&jumps, spec))?;
        self.verify(spec)
    }

    /// Checks that the table holds exactly the rendered rules and each jump once.
    pub fn verify(&self, spec: &RuleSpec) -> Result<(), Error> {
        let saved = self.save()?;
        let rules = spec.chain_rules();
        for chain in CHAINS {
            let want = rules.iter().filter(|(c, _)| *c == chain).count();
            let got = count_rules(&saved, chain, None);
            if want != got {
                return Err(Error::Verify(format!(
                    "{chain} has {got} rules, want {want}"
                )));
            }
        }
        for (builtin, chain) in JUMPS {
            let got = count_rules(&saved, builtin, Some(chain));
            if got != 1 {
                return Err(Error::Verify(format!(
                    "{builtin} jumps to {chain} {got} times"
                )));
            }
        }
        Ok(())
    }

    /// Removes every meshd jump and chain; returns how many objects went. Idempotent.
    pub fn remove(&self) -> Result<usize, Error> {
        let saved = self.save()?;
        let (jumps, chains) = existing(&saved);
        let mut removed = self.remove_guard6()?;
        if jumps.is_empty() && chains.is_empty() {
            return Ok(removed);
        }
        let text = format!("*nat\n{}COMMIT\n", removal_lines(&jumps, &chains));
        self.restore(&text)?;
        removed += jumps.len() + chains.len();
        Ok(removed)
    }

    /// Whether any meshd chain or jump is present.
    pub fn present(&self) -> Result<bool, Error> {
        let (jumps, chains) = existing(&self.save()?);
        Ok(!jumps.is_empty() || !chains.is_empty())
    }

    fn save(&self) -> Result<String, Error> {
        self.save_table(self.backend.save(), "nat")
    }

    /// `program -t table` (an iptables-save or ip6tables-save)'s output.
    pub(crate) fn save_table(&self, program: &str, table: &str) -> Result<String, Error> {
        let command = format!("{program} -t {table}");
        let out = self
            .command(program)
            .args(["-t", table])
            .output()
            .map_err(|source| Error::Spawn {
                command: command.clone(),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(Error::Failed { command, stderr });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn restore(&self, text: &str) -> Result<(), Error> {
        self.restore_with(self.backend.restore(), text)
    }

    /// One `program --noflush` transaction (an iptables-restore or ip6tables-restore).
    pub(crate) fn restore_with(&self, program: &str, text: &str) -> Result<(), Error> {
        let command = format!("{program} --noflush --wait 10");
        let spawn_err = |source| Error::Spawn {
            command: command.clone(),
            source,
        };
        let mut child = self
            .command(program)
            .args(["--noflush", "--wait", "10"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(text.as_bytes()).map_err(spawn_err)?;
        drop(stdin);
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(Error::Failed { command, stderr });
        }
        Ok(())
    }
}

/// meshd's jump lines (as saved) and chains present in `iptables-save -t nat` output.
fn existing(saved: &str) -> (Vec<String>, Vec<&'static str>) {
    let jumps = saved
        .lines()
        .filter(|l| {
            JUMPS.iter().any(|(builtin, chain)| {
                l.starts_with(&format!("-A {builtin} ")) && l.ends_with(&format!("-j {chain}"))
            })
        })
        .map(str::to_string)
        .collect();
    let chains = CHAINS
        .into_iter()
        .filter(|c| saved.lines().any(|l| l.starts_with(&format!(":{c} "))))
        .collect();
    (jumps, chains)
}

/// Rules in `chain`, optionally only those jumping to `target`.
fn count_rules(saved: &str, chain: &str, target: Option<&str>) -> usize {
    let prefix = format!("-A {chain} ");
    saved
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| target.is_none_or(|t| l.ends_with(&format!("-j {t}"))))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RuleSpec {
        RuleSpec {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_mark: 0x539,
            proxy_uid: Some(1337),
            proxy_ports: vec![15001, 15006, 15008],
            excluded_ports: vec![22],
            excluded_cidrs: vec!["10.0.0.0/8".into()],
            inbound_ports: vec![8080, 9090],
            outbound_cgroups: None,
            inbound_all_ports: false,
            delivery_source: Ipv4Addr::new(127, 0, 0, 6),
        }
    }

    #[test]
    fn rendered_rules_return_before_they_redirect() {
        let text = spec().render();
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle}\n{text}"))
        };
        assert!(pos("--mark 0x539 -j RETURN") < pos("-j MESH_REDIRECT"));
        assert!(pos("--uid-owner 1337 -j RETURN") < pos("-j MESH_REDIRECT"));
        assert!(pos("--dports 22,15001,15006,15008 -j RETURN") < pos("-j MESH_REDIRECT"));
        assert!(pos("-d 10.0.0.0/8 -j RETURN") < pos("-j MESH_REDIRECT"));
        assert!(pos("-s 127.0.0.6/32 -j RETURN") < pos("--dports 8080,9090 -j MESH_IN_REDIRECT"));
        assert!(text.contains("-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(text.contains("-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(text.starts_with("*nat\n") && text.ends_with("COMMIT\n"));
    }

    #[test]
    fn outbound_capture_is_limited_to_the_workload_cgroups() {
        let scoped = RuleSpec {
            outbound_cgroups: Some(vec!["/k8s/checkout".into(), "/k8s/orders".into()]),
            ..spec()
        };
        let text = scoped.render();
        assert!(text
            .contains("-A MESH_OUTPUT -p tcp -m cgroup --path \"/k8s/checkout\" -j MESH_REDIRECT"));
        assert!(text
            .contains("-A MESH_OUTPUT -p tcp -m cgroup --path \"/k8s/orders\" -j MESH_REDIRECT"));
        assert!(
            !text.contains("-A MESH_OUTPUT -p tcp -j MESH_REDIRECT"),
            "{text}"
        );
    }

    #[test]
    fn many_ports_are_split_into_multiport_sized_groups() {
        let ports: Vec<u16> = (1000..1040).collect();
        let groups = port_groups(&ports);
        assert_eq!(groups.len(), 3);
        assert!(groups.iter().all(|g| g.split(',').count() <= MULTIPORT_MAX));
    }

    #[test]
    fn existing_jumps_and_chains_are_found_in_saved_output() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:MESH_OUTPUT - [0:0]\n\
                     -A OUTPUT -p tcp -j MESH_OUTPUT\n-A OUTPUT -p tcp -j MESH_OUTPUT\n\
                     -A OUTPUT -p udp -j OTHER\nCOMMIT\n";
        let (jumps, chains) = existing(saved);
        assert_eq!(jumps.len(), 2);
        assert_eq!(chains, vec!["MESH_OUTPUT"]);
        let removal = removal_lines(&jumps, &chains);
        assert!(removal.starts_with("-D OUTPUT -p tcp -j MESH_OUTPUT\n"));
        assert!(removal.ends_with("-F MESH_OUTPUT\n-X MESH_OUTPUT\n"));
    }
}
