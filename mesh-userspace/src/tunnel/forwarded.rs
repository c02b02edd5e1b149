//! `Forwarded` (RFC 7239) on an HBONE CONNECT: the original source of the connection. meshd
//! sends `for=<ip>` (IPv6 quoted: `for="[v6]"`); Istio's ztunnel sends `for="<ip>:<port>"`,
//! sometimes with `;host=<service>`. The server reads the `for` of the first element (the hop
//! nearest the client) with the RFC's grammar, strictly: a value that does not parse, or is
//! longer than [`MAX_LEN`], is ignored as a whole. What it names is the peer's claim: it goes in
//! the access line, never in a metric label or an authorization decision.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::HeaderValue;

use super::Ignored;

/// Longest `Forwarded` value read. One hop's element as ztunnel writes it, with a service
/// hostname, stays well under this; a longer one is not worth parsing.
pub const MAX_LEN: usize = 512;

/// The value meshd sends: `for=192.0.2.1`, `for="[2001:db8::1]"`.
pub fn header(source: IpAddr) -> HeaderValue {
    let value = match source {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    HeaderValue::from_str(&value).expect("an address is a valid header value")
}

/// The original source a `Forwarded` value names: `Ok(None)` when its first element has no
/// `for` or names no address (`unknown`, an obfuscated `_name`).
pub fn source(value: &HeaderValue) -> Result<Option<IpAddr>, Ignored> {
    let bytes = value.as_bytes();
    if bytes.len() > MAX_LEN {
        return Err(Ignored::Oversized);
    }
    let mut cursor = Cursor { s: bytes, i: 0 };
    // The first element that is not empty (RFC 9110 §5.6.1: empty list elements are ignored).
    let mut first = None;
    loop {
        let start = cursor.i;
        let node = cursor.element()?;
        if cursor.i > start {
            first.get_or_insert(node);
        }
        cursor.ows();
        if cursor.at_end() {
            break;
        }
        if !cursor.eat(b',') {
            return Err(Ignored::Malformed);
        }
        cursor.ows();
    }
    match first.flatten() {
        Some(text) => node(&text),
        None => Ok(None),
    }
}

/// RFC 7239 §6: `nodename [ ":" node-port ]`, an address or `unknown` or `_obfuscated`.
fn node(text: &str) -> Result<Option<IpAddr>, Ignored> {
    let (name, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']').ok_or(Ignored::Malformed)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(Ignored::Malformed)?),
            };
            let ip = v6.parse::<Ipv6Addr>().map_err(|_| Ignored::Malformed)?;
            (Some(IpAddr::V6(ip)), port)
        }
        None => {
            let (name, port) = match text.split_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (text, None),
            };
            let ip = if name.eq_ignore_ascii_case("unknown") || is_obfuscated(name) {
                None
            } else {
                Some(IpAddr::V4(
                    name.parse::<Ipv4Addr>().map_err(|_| Ignored::Malformed)?,
                ))
            };
            (ip, port)
        }
    };
    match port {
        None => Ok(name),
        Some(p) if is_obfuscated(p) || (p.len() <= 5 && p.parse::<u16>().is_ok()) => Ok(name),
        Some(_) => Err(Ignored::Malformed),
    }
}

/// `"_" 1*( ALPHA / DIGIT / "." / "_" / "-")`
fn is_obfuscated(s: &str) -> bool {
    s.strip_prefix('_').is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        self.i += usize::from(hit);
        hit
    }

    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// `forwarded-element = [ pair ] *( ";" [ pair ] )`; returns its `for` value, if any (a
    /// second `for` in one element is malformed: which one would be the source?).
    fn element(&mut self) -> Result<Option<String>, Ignored> {
        let mut found = None;
        loop {
            if matches!(self.peek(), None | Some(b',' | b' ' | b'\t')) {
                return Ok(found);
            }
            if !self.eat(b';') {
                let (name, value) = self.pair()?;
                if name.eq_ignore_ascii_case("for") && found.replace(value).is_some() {
                    return Err(Ignored::Malformed);
                }
                if !matches!(self.peek(), None | Some(b';' | b',' | b' ' | b'\t')) {
                    return Err(Ignored::Malformed);
                }
            }
        }
    }

    /// `token "=" ( token / quoted-string )`
    fn pair(&mut self) -> Result<(String, String), Ignored> {
        let name = self.token().ok_or(Ignored::Malformed)?;
        if !self.eat(b'=') {
            return Err(Ignored::Malformed);
        }
        let value = match self.peek() {
            Some(b'"') => self.quoted()?,
            _ => self.token().ok_or(Ignored::Malformed)?,
        };
        Ok((name, value))
    }

    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    /// RFC 9110 `quoted-string`, unescaped.
    fn quoted(&mut self) -> Result<String, Ignored> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek().ok_or(Ignored::Malformed)? {
                b'"' => {
                    self.i += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                b'\\' => {
                    self.i += 1;
                    let b = self.peek().ok_or(Ignored::Malformed)?;
                    if !(b == b'\t' || b >= 0x20) || b == 0x7f {
                        return Err(Ignored::Malformed);
                    }
                    out.push(b);
                }
                b if b == b'\t' || (b >= 0x20 && b != 0x7f) => out.push(b),
                _ => return Err(Ignored::Malformed),
            }
            self.i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(s: &str) -> Result<Option<IpAddr>, Ignored> {
        source(&HeaderValue::from_str(s).unwrap())
    }

    fn ip(s: &str) -> Result<Option<IpAddr>, Ignored> {
        Ok(Some(s.parse().unwrap()))
    }

    #[test]
    fn what_meshd_sends_reads_back() {
        for addr in ["198.18.0.1", "2001:db8::7", "::1"] {
            let h = header(addr.parse().unwrap());
            assert_eq!(source(&h), ip(addr), "{h:?}");
        }
        assert_eq!(header("198.18.0.1".parse().unwrap()), "for=198.18.0.1");
        assert_eq!(
            header("2001:db8::7".parse().unwrap()),
            "for=\"[2001:db8::7]\""
        );
    }

    #[test]
    fn ztunnel_and_rfc_forms_are_read() {
        // As ztunnel writes it (src/proxy/outbound.rs build_forwarded): quoted, with the port.
        assert_eq!(read(r#"for="10.0.0.9:4711""#), ip("10.0.0.9"));
        assert_eq!(read(r#"for="[::1]:80""#), ip("::1"));
        let with_host = r#"for="10.0.0.9:4711";host=reviews.default.svc.cluster.local"#;
        assert_eq!(read(with_host), ip("10.0.0.9"));
        // RFC 7239 §4 and §7 examples.
        assert_eq!(read(r#"for="_gazonk""#), Ok(None));
        assert_eq!(
            read(r#"For="[2001:db8:cafe::17]:4711""#),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(
            read("for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(read("for=192.0.2.43, for=198.51.100.17"), ip("192.0.2.43"));
        assert_eq!(read("for=unknown"), Ok(None));
        assert_eq!(read("proto=https"), Ok(None));
        assert_eq!(read(", ,for=192.0.2.1,"), ip("192.0.2.1"), "empty elements");
        assert_eq!(read(r#"for="192.0.2.43:_hidden""#), ip("192.0.2.43"));
        assert_eq!(
            read(r#"host="a \"quoted\" name";for=192.0.2.1"#),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn garbage_is_refused_whole() {
        for bad in [
            "for=[::1]",               // ':' and '[' are not token characters: must be quoted
            "for=10.0.0.9:4711",       // likewise
            "for=\"10.0.0.9",          // unterminated quote
            "for=example.com",         // a name is not a node
            "for=\"[::1\"",            // unclosed bracket
            "for=\"[::1]4711\"",       // port without ':'
            "for=\"1.2.3.4:99999\"",   // not a port
            "for=\"[zz::1]\"",         // not IPv6
            "for=1.2.3.4;for=5.6.7.8", // two sources in one element
            "for=1.2.3.4 ;proto=http", // no whitespace inside an element
            "for=",
            "=1.2.3.4",
            "for=01.2.3.4",
            "garbage",
            "for=1.2.3.4, for=[::1]", // a later element is malformed: the whole value is
        ] {
            assert_eq!(read(bad), Err(Ignored::Malformed), "{bad}");
        }
        let long = format!("for=1.2.3.4;host=\"{}\"", "a".repeat(MAX_LEN));
        assert_eq!(read(&long), Err(Ignored::Oversized));
        let non_utf8 = HeaderValue::from_bytes(b"for=\"\xff\"").unwrap();
        assert_eq!(source(&non_utf8), Err(Ignored::Malformed));
    }
}
