//! `meshd doctor`: probe every kernel capability the two interception modes need, print what is
//! there and what is not, and decide which mode `--mode=auto` would run. `meshd run --mode=auto`
//! uses the same probe, so the two never disagree.
//!
//! Probes are real: eBPF programs are the ones meshd ships, loaded through the verifier;
//! iptables rules are applied in a scratch network namespace that vanishes afterwards.
//! `--assume-missing ID` (or `MESHD_ASSUME_MISSING=ID,ID`) reports a capability as absent
//! without probing it, to rehearse a kernel that lacks it.

mod probes;

use std::fmt::Write as _;

use crate::intercept::Mode;

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Present(String),
    Missing(String),
}

#[derive(Debug, Clone)]
pub struct Check {
    /// Stable identifier, accepted by `--assume-missing`.
    pub id: &'static str,
    /// The modes that cannot run without it; empty for information only.
    pub needed_by: &'static [Mode],
    pub outcome: Outcome,
}

impl Check {
    pub fn present(&self) -> bool {
        matches!(self.outcome, Outcome::Present(_))
    }
}

pub const EBPF: &[Mode] = &[Mode::Ebpf];
pub const IPTABLES: &[Mode] = &[Mode::Iptables];
pub const BOTH: &[Mode] = &[Mode::Ebpf, Mode::Iptables];
pub const INFO: &[Mode] = &[];

#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// The checks a mode needs that came out missing.
    pub fn missing_for(&self, mode: Mode) -> Vec<&Check> {
        let needs = |c: &&Check| c.needed_by.contains(&mode) && !c.present();
        self.checks.iter().filter(needs).collect()
    }

    /// ebpf if it can run, else iptables if it can, else why neither can.
    pub fn auto_mode(&self) -> Result<Mode, String> {
        for mode in [Mode::Ebpf, Mode::Iptables] {
            if self.missing_for(mode).is_empty() {
                return Ok(mode);
            }
        }
        Err(format!(
            "neither mode can run: ebpf lacks {}; iptables lacks {}",
            self.missing_ids(Mode::Ebpf),
            self.missing_ids(Mode::Iptables)
        ))
    }

    pub fn missing_ids(&self, mode: Mode) -> String {
        let ids: Vec<_> = self.missing_for(mode).iter().map(|c| c.id).collect();
        ids.join(", ")
    }

    /// The human report `meshd doctor` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let (mark, detail) = match &c.outcome {
                Outcome::Present(d) => ("ok     ", d),
                Outcome::Missing(d) => ("MISSING", d),
            };
            let needed: Vec<String> = c.needed_by.iter().map(|m| m.to_string()).collect();
            let needed = if needed.is_empty() {
                "info".to_string()
            } else {
                needed.join("+")
            };
            let _ = writeln!(out, "{mark} {:<22} [{needed:<13}] {detail}", c.id);
        }
        out.push('\n');
        for mode in [Mode::Ebpf, Mode::Iptables] {
            let missing = self.missing_ids(mode);
            let verdict = if missing.is_empty() {
                "can run".to_string()
            } else {
                format!("cannot run: missing {missing}")
            };
            let _ = writeln!(out, "mode {mode:<8}: {verdict}");
        }
        match self.auto_mode() {
            Ok(mode) => {
                let _ = writeln!(out, "auto picks: {mode}");
            }
            Err(why) => {
                let _ = writeln!(out, "auto picks: nothing ({why})");
            }
        }
        out
    }
}

/// Every check id, in the order the report lists them.
pub fn check_ids() -> Vec<&'static str> {
    probes::ALL.iter().map(|p| p.id).collect()
}

/// Runs every probe except the ones named in `assume_missing`, which are reported absent.
/// An unknown id is an error that lists the known ones.
pub fn probe(assume_missing: &[String]) -> Result<Report, String> {
    let known = check_ids();
    if let Some(bad) = assume_missing
        .iter()
        .find(|id| !known.contains(&id.as_str()))
    {
        return Err(format!(
            "--assume-missing {bad}: no such check; known checks: {}",
            known.join(", ")
        ));
    }
    Ok(Report {
        checks: probes::run_all(assume_missing),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &'static str, needed_by: &'static [Mode], ok: bool) -> Check {
        let outcome = if ok {
            Outcome::Present("yes".into())
        } else {
            Outcome::Missing("no".into())
        };
        Check {
            id,
            needed_by,
            outcome,
        }
    }

    #[test]
    fn auto_prefers_ebpf_and_falls_back_to_iptables() {
        let all = Report {
            checks: vec![check("a", EBPF, true), check("b", IPTABLES, true)],
        };
        assert_eq!(all.auto_mode(), Ok(Mode::Ebpf));
        let no_bpf = Report {
            checks: vec![check("a", EBPF, false), check("b", IPTABLES, true)],
        };
        assert_eq!(no_bpf.auto_mode(), Ok(Mode::Iptables));
        assert!(no_bpf.render().contains("cannot run: missing a"));
    }

    #[test]
    fn auto_explains_when_nothing_can_run() {
        let none = Report {
            checks: vec![check("root", BOTH, false), check("btf", INFO, false)],
        };
        let why = none.auto_mode().unwrap_err();
        assert!(why.contains("ebpf lacks root"), "{why}");
        assert!(
            !why.contains("btf"),
            "info-only checks never block a mode: {why}"
        );
    }

    #[test]
    fn unknown_assume_missing_id_is_rejected_with_the_known_ids() {
        let err = probe(&["no-such-thing".into()]).unwrap_err();
        assert!(
            err.contains("no-such-thing") && err.contains("bpf-syscall"),
            "{err}"
        );
    }
}
