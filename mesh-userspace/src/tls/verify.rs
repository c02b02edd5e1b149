//! Verifying a peer's SVID: the chain must lead to a root of the trust bundle (several roots are
//! allowed, for rotation), be valid now, not be revoked (CRLs, denied serials, denied SPIFFE
//! IDs), and the leaf must carry exactly one SPIFFE ID (one `spiffe:` URI SAN; URIs of other
//! schemes are ignored), of our trust domain. DNS names play no part. Each failure has a reason
//! of its own, which becomes a metric label.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, RwLock},
};

use anyhow::{Context, Result};
use rustls_pki_types::{
    pem::PemObject, CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime,
};
use webpki::{
    EndEntityCert, KeyUsage, OwnedCertRevocationList, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{serial_hex, SpiffeError, SpiffeId};

/// Why a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("certificate expired")]
    Expired,
    #[error("certificate not valid yet")]
    NotYetValid,
    #[error("certificate not issued by a root of the trust bundle")]
    UnknownCa,
    #[error("certificate revoked: {0}")]
    Revoked(String),
    #[error("SPIFFE ID {0} is not in trust domain {1}")]
    WrongTrustDomain(String, String),
    #[error("peer is {got}, expected {want}")]
    UnexpectedIdentity { want: String, got: String },
    #[error("{0}")]
    BadSpiffeId(#[from] SpiffeError),
    #[error("certificate must carry exactly one SPIFFE ID (spiffe: URI SAN), found {0}")]
    UriSanCount(usize),
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

impl VerifyError {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::UnknownCa => "unknown_ca",
            VerifyError::Revoked(_) => "revoked",
            VerifyError::WrongTrustDomain(..) => "wrong_trust_domain",
            VerifyError::UnexpectedIdentity { .. } => "unexpected_identity",
            VerifyError::BadSpiffeId(_) | VerifyError::UriSanCount(_) => "bad_spiffe_id",
            VerifyError::Invalid(_) => "invalid_certificate",
        }
    }
}

/// What a verified peer certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    pub serial: String,
}

/// Revocation inputs, as configured.
#[derive(Debug, Clone, Default)]
pub struct Revocation {
    pub spiffe_ids: Vec<String>,
    /// Hex serial numbers (any case, optional colons).
    pub serials: Vec<String>,
    pub crl_files: Vec<std::path::PathBuf>,
}

/// A root of the trust bundle, as the admin API shows it.
#[derive(Debug, Clone)]
pub struct RootSummary {
    pub subject: String,
    /// Lowercase hex.
    pub serial: String,
    pub not_after: std::time::SystemTime,
}

impl RootSummary {
    fn of(der: &CertificateDer<'_>) -> Option<RootSummary> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let not_after = cert.validity().not_after.timestamp();
        Some(RootSummary {
            subject: cert.subject().to_string(),
            serial: crate::identity::serial_hex(cert.raw_serial()),
            not_after: std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(not_after.max(0) as u64),
        })
    }
}

pub struct TrustBundle {
    trust_domain: String,
    /// The roots of the configured files: the bootstrap.
    files: Arc<Roots>,
    /// The roots the registry distributes (`<prefix>/bundle/`): when it holds any, they are the
    /// bundle, so a root added or removed there reaches every node without a restart.
    registry: RwLock<Option<Arc<Roots>>>,
    crls: Vec<webpki::CertRevocationList<'static>>,
    denied_ids: HashSet<String>,
    denied_serials: HashSet<String>,
}

/// A set of trusted roots.
#[derive(Default)]
pub struct Roots {
    anchors: Vec<TrustAnchor<'static>>,
    summaries: Vec<RootSummary>,
}

impl Roots {
    /// Every certificate of `pem` (several roots may share a file).
    fn add_pem(&mut self, pem: &str, origin: &str) -> Result<()> {
        for cert in super::certs_from_pem(pem).with_context(|| origin.to_string())? {
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .with_context(|| format!("{origin}: not a usable root"))?;
            self.anchors.push(anchor.to_owned());
            self.summaries.extend(RootSummary::of(&cert));
        }
        Ok(())
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TrustBundle({}, {} roots)",
            self.trust_domain,
            self.current().anchors.len()
        )
    }
}

impl TrustBundle {
    /// Roots from PEM files (each may hold several), CRLs from PEM or DER files.
    pub fn load(
        trust_domain: &str,
        root_files: &[impl AsRef<Path>],
        revocation: &Revocation,
    ) -> Result<Self> {
        let mut files = Roots::default();
        for file in root_files {
            let file = file.as_ref();
            let pem = std::fs::read_to_string(file)
                .with_context(|| format!("read {}", file.display()))?;
            files.add_pem(&pem, &file.display().to_string())?;
        }
        anyhow::ensure!(
            !files.anchors.is_empty(),
            "the trust bundle holds no root certificate"
        );
        let crls = revocation
            .crl_files
            .iter()
            .map(|f| load_crl(f))
            .collect::<Result<Vec<_>>>()?;
        Ok(TrustBundle {
            trust_domain: trust_domain.to_string(),
            files: Arc::new(files),
            registry: RwLock::new(None),
            crls,
            denied_ids: revocation.spiffe_ids.iter().cloned().collect(),
            denied_serials: revocation
                .serials
                .iter()
                .map(|s| normalise_serial(s))
                .collect(),
        })
    }

    /// The roots in force, for display.
    pub fn roots(&self) -> Vec<RootSummary> {
        self.current().summaries.clone()
    }

    fn current(&self) -> Arc<Roots> {
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner());
        registry.clone().unwrap_or_else(|| self.files.clone())
    }

    /// The roots the registry distributes (PEM, one entry per key); none: back to the files.
    /// An entry that is not a usable root is an error and changes nothing.
    pub fn set_registry_roots(&self, pems: &[(String, String)]) -> Result<usize> {
        let mut roots = Roots::default();
        for (key, pem) in pems {
            roots.add_pem(pem, key)?;
        }
        let count = roots.anchors.len();
        let new = (count > 0).then(|| Arc::new(roots));
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(count)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Verifies a peer chain for `usage` (server or client auth) at `now`.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<PeerIdentity, VerifyError> {
        let cert =
            EndEntityCert::try_from(end_entity).map_err(|e| VerifyError::Invalid(e.to_string()))?;
        let crl_refs: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Allow)
                .build()
        });
        let algs = super::provider().signature_verification_algorithms.all;
        let roots = self.current();
        cert.verify_for_usage(
            algs,
            &roots.anchors,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(chain_error)?;
        let peer = identity_of(end_entity)?;
        if self.denied_ids.contains(&peer.id.to_string()) {
            return Err(VerifyError::Revoked(format!(
                "SPIFFE ID {} is denied",
                peer.id
            )));
        }
        if self.denied_serials.contains(&peer.serial) {
            return Err(VerifyError::Revoked(format!(
                "serial {} is denied",
                peer.serial
            )));
        }
        if peer.id.trust_domain != self.trust_domain {
            return Err(VerifyError::WrongTrustDomain(
                peer.id.to_string(),
                self.trust_domain.clone(),
            ));
        }
        Ok(peer)
    }
}

fn chain_error(e: webpki::Error) -> VerifyError {
    match e {
        webpki::Error::CertExpired { .. } => VerifyError::Expired,
        webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid,
        // A chain whose names match a root but whose signatures do not (another CA with the
        // same subject) is as foreign as one whose names match nothing.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            VerifyError::UnknownCa
        }
        webpki::Error::CertRevoked => VerifyError::Revoked("listed in a CRL".into()),
        other => VerifyError::Invalid(format!("{other:?}")),
    }
}

/// The SPIFFE ID and serial of a certificate. Other URI SANs may stand beside the SPIFFE ID
/// (as Istio's ztunnel allows), but only one `spiffe:` URI: a certificate naming two SPIFFE
/// identities would leave open which one the peer is (the X.509-SVID standard allows one).
pub fn identity_of(der: &CertificateDer<'_>) -> Result<PeerIdentity, VerifyError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| VerifyError::Invalid(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| VerifyError::Invalid(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|s| s.value.general_names.iter())
        .into_iter()
        .flatten()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .filter(|u| {
            u.get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:"))
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(VerifyError::UriSanCount(uris.len()));
    };
    Ok(PeerIdentity {
        id: uri.parse()?,
        serial: serial_hex(cert.raw_serial()),
    })
}

fn normalise_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_lowercase();
    let trimmed = hex.trim_start_matches('0');
    // serial_hex keeps whole bytes: an odd digit count gets its leading zero back.
    if trimmed.len() % 2 == 1 {
        format!("0{trimmed}")
    } else {
        trimmed.to_string()
    }
}

fn load_crl(path: &Path) -> Result<webpki::CertRevocationList<'static>> {
    let bytes = std::fs::read(path).with_context(|| format!("read CRL {}", path.display()))?;
    let der = match CertificateRevocationListDer::from_pem_slice(&bytes) {
        Ok(der) => der.as_ref().to_vec(),
        Err(_) => bytes,
    };
    let crl = OwnedCertRevocationList::from_der(&der)
        .map_err(|e| anyhow::anyhow!("{}: not a CRL ({e:?})", path.display()))?;
    Ok(crl.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_however_they_are_written() {
        assert_eq!(normalise_serial("00:0A:bc"), "0abc");
        assert_eq!(normalise_serial("0abc"), "0abc");
        assert_eq!(serial_hex(&[0, 0x0a, 0xbc]), "0abc");
    }
}

#[cfg(test)]
mod bundle_tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::identity::{ca, svid};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A root + node intermediate in a fresh temporary directory.
    fn pki(name: &str) -> (std::path::PathBuf, ca::Issuer) {
        let dir = std::env::temp_dir().join(format!("meshd-verify-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca::init(&dir, "cluster.local").unwrap();
        ca::issue_node(&dir, "n", HOUR).unwrap();
        let issuer = ca::Issuer::load(&dir.join("n.crt"), &dir.join("n.key")).unwrap();
        (dir, issuer)
    }

    fn check(bundle: &TrustBundle, s: &svid::Svid) -> Result<PeerIdentity, VerifyError> {
        let chain = s.certified.cert.clone();
        let now = UnixTime::now();
        bundle.verify(&chain[0], &chain[1..], now, KeyUsage::client_auth())
    }

    #[test]
    fn two_roots_are_both_trusted_and_denied_serials_are_refused() {
        let (old_dir, old) = pki("old");
        let (new_dir, new) = pki("new");
        let id = SpiffeId::new("cluster.local", "shop", "checkout").unwrap();
        let (from_old, from_new) = (
            svid::mint(&old, &id, HOUR).unwrap(),
            svid::mint(&new, &id, HOUR).unwrap(),
        );
        let roots = [old_dir.join("root.crt"), new_dir.join("root.crt")];
        let bundle = TrustBundle::load("cluster.local", &roots, &Revocation::default()).unwrap();
        assert_eq!(check(&bundle, &from_old).unwrap().id, id);
        assert_eq!(check(&bundle, &from_new).unwrap().serial, from_new.serial);

        let deny = Revocation {
            serials: vec![from_new.serial.to_uppercase()],
            ..Revocation::default()
        };
        let bundle = TrustBundle::load("cluster.local", &roots, &deny).unwrap();
        assert!(check(&bundle, &from_old).is_ok());
        assert_eq!(check(&bundle, &from_new).unwrap_err().reason(), "revoked");

        let only_old =
            TrustBundle::load("cluster.local", &roots[..1], &Revocation::default()).unwrap();
        assert_eq!(
            check(&only_old, &from_new).unwrap_err().reason(),
            "unknown_ca"
        );
        let now = SystemTime::now();
        let expired = svid::mint_valid(&old, &id, now - 2 * HOUR, now - HOUR).unwrap();
        assert_eq!(check(&only_old, &expired).unwrap_err().reason(), "expired");
        for dir in [old_dir, new_dir] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// A client certificate with these URI SANs, from `issuer`: the leaf and the issuer.
    fn leaf(issuer: &ca::Issuer, uris: &[&str]) -> Vec<CertificateDer<'static>> {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = (uris.iter())
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer.issuer).unwrap();
        vec![cert.der().clone(), issuer.cert.clone()]
    }

    #[test]
    fn other_uri_sans_may_stand_beside_exactly_one_spiffe_id_of_the_trust_domain() {
        let (dir, issuer) = pki("sans");
        let bundle = TrustBundle::load(
            "cluster.local",
            &[dir.join("root.crt")],
            &Revocation::default(),
        )
        .unwrap();
        let verify = |uris: &[&str]| {
            let chain = leaf(&issuer, uris);
            let now = UnixTime::now();
            bundle.verify(&chain[0], &chain[1..], now, KeyUsage::client_auth())
        };
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        for uris in [
            vec![web],
            vec![web, "https://example.com/id/web"],
            vec!["urn:example:web", web, "https://example.com/"],
        ] {
            let got = verify(&uris).map(|p| p.id.to_string());
            assert_eq!(got.as_deref(), Ok(web), "{uris:?}");
        }
        for (uris, reason) in [
            // Two SPIFFE identities: which one is the peer?
            (
                vec![web, "spiffe://cluster.local/ns/shop/sa/admin"],
                "bad_spiffe_id",
            ),
            (
                vec![web, "spiffe://other.td/ns/shop/sa/web"],
                "bad_spiffe_id",
            ),
            (
                vec![web, "SPIFFE://cluster.local/ns/shop/sa/web"],
                "bad_spiffe_id",
            ),
            (vec!["https://example.com/"], "bad_spiffe_id"),
            (
                vec!["spiffe://cluster.local/not/istio", "https://x/"],
                "bad_spiffe_id",
            ),
            (
                vec!["spiffe://other.td/ns/shop/sa/web", "https://x/"],
                "wrong_trust_domain",
            ),
        ] {
            let got = verify(&uris).map(|p| p.id.to_string());
            assert_eq!(got.map_err(|e| e.reason()), Err(reason), "{uris:?}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
