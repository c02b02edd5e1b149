//! The L7 filter's HTTP/1.1 head parsers (request heads from callers, response heads from
//! workloads) and the path normalisation policy decides on. No panic; a complete head lies
//! within the buffer and the size limit; a normalised path has no `//`, `.` or `..` segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::l7::http1::{fuzz_parse_request, fuzz_parse_response, MAX_HEAD};
use meshd::policy::query::normalize_path;

fn check_path(path: &str) {
    let normal = normalize_path(path);
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    assert!(
        !normal.contains("//") && !normal.contains('\\'),
        "{path:?} -> {normal:?}"
    );
    let dots = normal.split('/').any(|s| s == "." || s == "..");
    assert!(!dots, "{path:?} -> {normal:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((len, parts))) = fuzz_parse_request(data) {
        assert!(len <= data.len() && len <= MAX_HEAD);
        check_path(parts.uri.path());
        let _ = (parts.uri.authority(), parts.uri.query());
    }
    if let Ok(Some((len, _status))) = fuzz_parse_response(data) {
        assert!(len <= data.len());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_path(text);
    }
});
