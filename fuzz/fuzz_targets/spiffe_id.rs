//! SPIFFE ID parsing (peer certificates' URI SAN, config, policies): no panic, and an accepted
//! ID has exactly one reading: it prints back byte for byte as sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = text.parse::<SpiffeId>() else {
        return;
    };
    assert_eq!(
        id.to_string(),
        text,
        "an accepted ID must print back as sent"
    );
    let again = SpiffeId::new(&id.trust_domain, &id.namespace, &id.service_account);
    assert_eq!(
        again.as_ref(),
        Ok(&id),
        "SpiffeId::new must agree with parse"
    );
    let principal = meshd::policy::principal_of(&id);
    assert_eq!(Some(principal.as_str()), text.strip_prefix("spiffe://"));
});
