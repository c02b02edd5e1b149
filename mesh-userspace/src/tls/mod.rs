//! TLS for the mesh: one crypto provider (aws-lc-rs, TLS 1.3 only, AES-GCM suites, X25519 and
//! P-256), SPIFFE-aware certificate verification (`verify.rs`), and the client and server
//! configurations whose certificates follow the identity manager's rotations (`config.rs`).

pub mod config;
pub mod verify;

use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{pem::PemObject, CertificateDer};

/// The crypto provider every meshd TLS configuration uses. aws-lc-rs: rustls's default, FIPS
/// capable, and the faster of the two for P-256 signatures and AES-GCM on x86_64 (see
/// ARCHITECTURE.md, "crypto provider").
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::{self as p, cipher_suite, kx_group};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                ],
                kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
                ..p::default_provider()
            })
        })
        .clone()
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("not PEM certificates")
}

/// A DER certificate as PEM.
pub fn pem_cert(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
