//! Workload SVIDs: short-lived X.509 certificates whose one URI SAN is the workload's SPIFFE
//! ID, minted from the node intermediate.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{ca::Issuer, SpiffeId};

/// Allowance for clocks that run a little behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

pub struct Svid {
    pub id: SpiffeId,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub issued_at: SystemTime,
    pub certified: Arc<CertifiedKey>,
    /// PEM forms, for tools and tests that need files.
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .finish()
    }
}

impl Svid {
    /// When renewal is due: half-way from issuance to expiry (not from `not_before`, which is
    /// back-dated for clock skew).
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

/// An SVID for `id` valid for `ttl` from now.
pub fn mint(issuer: &Issuer, id: &SpiffeId, ttl: Duration) -> Result<Svid> {
    let now = SystemTime::now();
    mint_valid(
        issuer,
        id,
        now - CLOCK_SKEW,
        super::ca::not_after(now, ttl)?,
    )
}

/// An SVID with an explicit validity window (tests make expired and future ones with it).
pub fn mint_valid(
    issuer: &Issuer,
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<Svid> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = leaf_params(id, not_before, not_after)?.signed_by(&key, &issuer.issuer)?;
    let chain_pem = format!("{}{}", cert.pem(), issuer.chain_pem());
    from_chain(id, &chain_pem, &key)
}

/// The certificate of an SVID for `id`: its one URI SAN, not a CA, a digital signature key for
/// server and client authentication, a random serial. The CA service signs requests with these
/// parameters, whatever the request asked for.
pub fn leaf_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(super::ca::random_serial().into());
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// An SVID from a PEM chain (the leaf first) and the key it was issued for: the leaf must name
/// `id` and hold that key's public half.
pub fn from_chain(id: &SpiffeId, chain_pem: &str, key: &KeyPair) -> Result<Svid> {
    let chain = crate::tls::certs_from_pem(chain_pem)?;
    let leaf = chain.first().context("an empty certificate chain")?;
    let peer = crate::tls::verify::identity_of(leaf)?;
    anyhow::ensure!(
        peer.id == *id,
        "the certificate names {}, not {id}",
        peer.id
    );
    let (_, cert) = X509Certificate::from_der(leaf)?;
    anyhow::ensure!(
        cert.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(key).as_slice(),
        "the certificate is not for this key"
    );
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(key_der)?;
    Ok(Svid {
        id: id.clone(),
        serial: peer.serial,
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
        issued_at: SystemTime::now(),
        certified: Arc::new(CertifiedKey::new(chain, signing)),
        chain_pem: chain_pem.to_string(),
        key_pem: key.serialize_pem(),
    })
}
