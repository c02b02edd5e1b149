//! A peer's certificate as the SPIFFE verifier reads it (`identity_of`: the one URI SAN and the
//! serial): arbitrary DER bytes, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let _ = meshd::tls::verify::identity_of(&CertificateDer::from(data));
});
