//! W3C Trace Context `traceparent` on an HBONE CONNECT: `00-<trace-id>-<parent-id>-<flags>`.
//! meshd sends a fresh one on every stream (a random 16-byte trace id and 8-byte parent id),
//! flags `00` (not sampled) as Istio's ztunnel does (src/proxy.rs `TraceParent::new`): meshd
//! records no spans, so it asks no tracer downstream to. The server reads the peer's strictly
//! (lowercase hex, ids not all zero, version `ff` invalid, exact length for version 00, bounded
//! length for later versions) and puts its trace id in the access line; an invalid one is
//! ignored, never an error for the stream.

use std::fmt;

use http::HeaderValue;

use super::Ignored;

/// Longest value read. Version 00 is exactly [`V00_LEN`]; later versions may append fields.
pub const MAX_LEN: usize = 256;
const V00_LEN: usize = 55;

/// A trace id: 16 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    parent_id: u64,
    flags: u8,
}

impl TraceParent {
    /// A new trace: random ids, not sampled.
    pub fn random() -> TraceParent {
        let nonzero_u128 = || loop {
            let v = rand::random::<u128>();
            if v != 0 {
                return v;
            }
        };
        let nonzero_u64 = || loop {
            let v = rand::random::<u64>();
            if v != 0 {
                return v;
            }
        };
        TraceParent {
            trace_id: TraceId(nonzero_u128()),
            parent_id: nonzero_u64(),
            flags: 0,
        }
    }

    pub fn header(&self) -> HeaderValue {
        let value = format!(
            "00-{}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        );
        HeaderValue::from_str(&value).expect("hex digits and dashes")
    }

    /// A peer's `traceparent`, checked as the W3C recommendation says a receiver must.
    pub fn parse(value: &HeaderValue) -> Result<TraceParent, Ignored> {
        let b = value.as_bytes();
        if b.len() > MAX_LEN {
            return Err(Ignored::Oversized);
        }
        let version = hex(b.get(..2)).ok_or(Ignored::Malformed)? as u8;
        let length_ok = match version {
            0xff => false,
            0 => b.len() == V00_LEN,
            // A later version: the fields of version 00 come first; anything after them starts
            // with a dash.
            _ => b.len() == V00_LEN || (b.len() > V00_LEN && b[V00_LEN] == b'-'),
        };
        let dashes = [2, 35, 52].iter().all(|&i| b.get(i) == Some(&b'-'));
        if !length_ok || !dashes {
            return Err(Ignored::Malformed);
        }
        let trace_id = hex(b.get(3..35)).ok_or(Ignored::Malformed)?;
        let parent_id = hex(b.get(36..52)).ok_or(Ignored::Malformed)? as u64;
        let flags = hex(b.get(53..55)).ok_or(Ignored::Malformed)? as u8;
        if trace_id == 0 || parent_id == 0 {
            return Err(Ignored::Malformed);
        }
        Ok(TraceParent {
            trace_id: TraceId(trace_id),
            parent_id,
            flags,
        })
    }
}

/// Lowercase hex digits only (no sign, no uppercase: the recommendation allows neither).
fn hex(digits: Option<&[u8]>) -> Option<u128> {
    let digits = digits?;
    if digits.is_empty()
        || !digits
            .iter()
            .all(|d| matches!(d, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<TraceParent, Ignored> {
        TraceParent::parse(&HeaderValue::from_str(s).unwrap())
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn what_meshd_sends_is_valid_unsampled_and_new_each_time() {
        let (a, b) = (TraceParent::random(), TraceParent::random());
        assert_ne!(a.trace_id, b.trace_id);
        let text = a.header();
        let text = text.to_str().unwrap();
        assert_eq!(text.len(), 55);
        assert!(text.starts_with("00-") && text.ends_with("-00"), "{text}");
        assert_eq!(parse(text), Ok(a));
        assert_eq!(a.trace_id.to_string().len(), 32);
    }

    #[test]
    fn valid_values_are_read() {
        let t = parse(VALID).unwrap();
        assert_eq!(t.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!((t.parent_id, t.flags), (0x00f067aa0ba902b7, 1));
        // ztunnel's own: flags 00.
        assert!(parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").is_ok());
        // A later version: read as version 00, with whatever follows after a dash.
        assert!(parse(&format!("01{}-extra", &VALID[2..])).is_ok());
        assert!(parse(&format!("cc{}", &VALID[2..])).is_ok());
    }

    #[test]
    fn invalid_values_are_refused() {
        let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zero_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        let upper = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        let plus = "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let version_ff = format!("ff{}", &VALID[2..]);
        let v00_longer = format!("{VALID}-extra");
        let later_no_dash = format!("01{}x", &VALID[2..]);
        let short = &VALID[..54];
        let bad_sep = VALID.replace("-00f0", "_00f0");
        for bad in [
            zero_trace,
            zero_parent,
            upper,
            plus,
            &version_ff,
            &v00_longer,
            &later_no_dash,
            short,
            &bad_sep,
            "",
            "garbage",
            "0",
        ] {
            assert_eq!(parse(bad), Err(Ignored::Malformed), "{bad}");
        }
        let long = format!("01{}-{}", &VALID[2..], "a".repeat(MAX_LEN));
        assert_eq!(parse(&long), Err(Ignored::Oversized));
    }
}
