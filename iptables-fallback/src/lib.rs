//! The iptables interception path (`--mode=iptables`), for kernels where the eBPF programs
//! cannot attach. This crate owns everything that touches iptables: which backend the machine
//! uses (legacy or nf_tables), rendering meshd's rule set, applying it atomically with
//! `iptables-restore`, checking what was applied, and removing it.

mod backend;
mod guard6;
mod rules;

pub use backend::{Backend, BackendError};
pub use guard6::{guard6_rules, CHAIN6};
pub use rules::{Error, Iptables, RuleSpec, CHAINS};
