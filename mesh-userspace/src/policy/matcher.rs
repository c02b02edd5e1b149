//! The value matchers of an AuthorizationPolicy rule, as Istio documents them: strings match
//! exactly, by prefix (`abc*`), by suffix (`*abc`) or anything non-empty (`*`); IP blocks are
//! CIDRs or single addresses; ports are numbers. A field with values matches if any value
//! matches; its `not` twin matches if none does. A rule's fields all have to match.

use std::net::IpAddr;

/// One string pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any value, but a value has to be there (e.g. an authenticated principal).
    Present,
}

impl Pattern {
    /// Parses `abc`, `abc*`, `*abc` or `*`; a `*` anywhere else is an error, as in Istio.
    pub fn parse(value: &str) -> Result<Pattern, String> {
        let pattern = if value == "*" {
            Pattern::Present
        } else if let Some(prefix) = value.strip_suffix('*') {
            Pattern::Prefix(prefix.to_string())
        } else if let Some(suffix) = value.strip_prefix('*') {
            Pattern::Suffix(suffix.to_string())
        } else {
            Pattern::Exact(value.to_string())
        };
        let inner = match &pattern {
            Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) => s.as_str(),
            Pattern::Present => "",
        };
        if inner.contains('*') {
            return Err(format!(
                "{value:?}: `*` is allowed only alone, at the start or at the end"
            ));
        }
        Ok(pattern)
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            Pattern::Present => !value.is_empty(),
        }
    }

    /// The same pattern in lower case (hosts compare without case).
    pub fn lowercase(self) -> Pattern {
        match self {
            Pattern::Exact(s) => Pattern::Exact(s.to_ascii_lowercase()),
            Pattern::Prefix(s) => Pattern::Prefix(s.to_ascii_lowercase()),
            Pattern::Suffix(s) => Pattern::Suffix(s.to_ascii_lowercase()),
            Pattern::Present => Pattern::Present,
        }
    }
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32` or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub fn parse(value: &str) -> Result<IpBlock, String> {
        let bad = |why: &str| format!("{value:?}: {why}");
        let (addr, prefix) = match value.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (value, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad("bad prefix length"))?,
            None => max,
        };
        Ok(IpBlock { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(n.to_bits().into(), a.to_bits().into(), 32, self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => masked(n.to_bits(), a.to_bits(), 128, self.prefix),
            _ => false,
        }
    }
}

fn masked(network: u128, addr: u128, width: u32, prefix: u8) -> bool {
    let shift = width - u32::from(prefix);
    if shift >= 128 {
        return true;
    }
    (network >> shift) == (addr >> shift)
}

/// Values and their negation for one attribute: `principals`/`notPrincipals` and the like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// Whether `hit` (does one value match the attribute?) satisfies the field. An absent
    /// attribute matches no value, so it fails `values` and passes `not_values`.
    pub fn check(&self, hit: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&hit)) && !self.not_values.iter().any(hit)
    }
}

impl Field<Pattern> {
    pub fn matches(&self, value: Option<&str>) -> bool {
        self.check(|p| value.is_some_and(|v| p.matches(v)))
    }
}

impl Field<IpBlock> {
    pub fn matches(&self, ip: IpAddr) -> bool {
        self.check(|b| b.contains(ip))
    }
}

impl Field<u16> {
    pub fn matches(&self, port: u16) -> bool {
        self.check(|p| *p == port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_istio_documents() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("/api/*").matches("/api/v1"));
        assert!(p("/api/*").matches("/api/"));
        assert!(!p("/api/*").matches("/api"));
        assert!(p("*.example.com").matches("www.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(p("*").matches("x"));
        assert!(!p("*").matches(""));
        assert!(p("GET").matches("GET"));
        assert!(!p("GET").matches("get"));
        assert!(Pattern::parse("/a/*/b").is_err());
        assert!(Pattern::parse("**").is_err());
    }

    #[test]
    fn ip_blocks_cover_their_networks_only() {
        let b = |s| IpBlock::parse(s).unwrap();
        assert!(b("10.0.0.0/8").contains("10.9.8.7".parse().unwrap()));
        assert!(!b("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(b("1.2.3.4").contains("1.2.3.4".parse().unwrap()));
        assert!(!b("1.2.3.4").contains("1.2.3.5".parse().unwrap()));
        assert!(b("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
        assert!(b("10.0.0.0/8").contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(b("2001:db8::/32").contains("2001:db8::1".parse().unwrap()));
        assert!(!b("2001:db8::/32").contains("10.0.0.1".parse().unwrap()));
        assert!(IpBlock::parse("10.0.0.0/33").is_err());
        assert!(IpBlock::parse("example.com").is_err());
    }

    #[test]
    fn absent_attributes_fail_values_and_pass_not_values() {
        let field = Field {
            values: vec![Pattern::Present],
            not_values: vec![],
        };
        assert!(!field.matches(None));
        let not = Field {
            values: vec![],
            not_values: vec![Pattern::Present],
        };
        assert!(not.matches(None));
        assert!(!not.matches(Some("cluster.local/ns/a/sa/b")));
    }
}
