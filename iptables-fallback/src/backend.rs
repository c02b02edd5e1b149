//! iptables comes in two backends with one command-line syntax: the legacy x_tables one and the
//! nf_tables one. Rules applied through one are invisible to the other, so meshd must use the
//! one the node's `iptables` command points at.

use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("`iptables` not found: install the iptables package ({0})")]
    NotInstalled(std::io::Error),
    #[error("`iptables --version` printed something unexpected: {0:?}")]
    Unrecognised(String),
}

impl Backend {
    /// Asks `iptables --version`, which names its backend: `iptables v1.8.9 (nf_tables)` or
    /// `iptables v1.8.9 (legacy)`.
    pub fn detect() -> Result<Backend, BackendError> {
        let out = Command::new("iptables")
            .arg("--version")
            .output()
            .map_err(BackendError::NotInstalled)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Self::from_version_output(&text).ok_or(BackendError::Unrecognised(text))
    }

    pub fn from_version_output(text: &str) -> Option<Backend> {
        if !text.starts_with("iptables v") {
            return None;
        }
        if text.contains("(nf_tables)") {
            Some(Backend::Nft)
        } else {
            // iptables before 1.8 printed no backend at all, and those are all legacy.
            Some(Backend::Legacy)
        }
    }

    /// The `iptables` command of this backend.
    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
        }
    }

    /// The `iptables-restore` command of this backend.
    pub fn restore(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            Backend::Nft => "iptables-nft-restore",
        }
    }

    /// The `iptables-save` command of this backend.
    pub fn save(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            Backend::Nft => "iptables-nft-save",
        }
    }

    /// `ip6tables-restore` of this backend.
    pub fn restore6(self) -> &'static str {
        match self {
            Backend::Legacy => "ip6tables-legacy-restore",
            Backend::Nft => "ip6tables-nft-restore",
        }
    }

    /// `ip6tables-save` of this backend.
    pub fn save6(self) -> &'static str {
        match self {
            Backend::Legacy => "ip6tables-legacy-save",
            Backend::Nft => "ip6tables-nft-save",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nf_tables",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_is_read_from_version_line() {
        let nft = Backend::from_version_output("iptables v1.8.9 (nf_tables)\n");
        assert_eq!(nft, Some(Backend::Nft));
        let legacy = Backend::from_version_output("iptables v1.8.9 (legacy)\n");
        assert_eq!(legacy, Some(Backend::Legacy));
        assert_eq!(
            Backend::from_version_output("iptables v1.6.1\n"),
            Some(Backend::Legacy)
        );
        assert_eq!(Backend::from_version_output("bash: iptables"), None);
    }
}
