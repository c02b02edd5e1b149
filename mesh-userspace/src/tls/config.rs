//! rustls configurations for HBONE. Both sides verify with [`TrustBundle`] (chain + SPIFFE ID,
//! no DNS names) and present the SVID currently published on a `watch` channel, so a rotated
//! certificate is used from the next handshake on. TLS 1.3 only; ALPN `h2`.

use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ResolvesServerCert,
    },
    sign::CertifiedKey,
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    PeerIncompatible, ServerConfig, SignatureScheme,
};
use tokio::sync::watch;

use super::verify::{TrustBundle, VerifyError};
use crate::identity::{SpiffeId, Svid};

const ALPN_H2: &[u8] = b"h2";

/// Presents whatever SVID the identity manager published last.
#[derive(Debug)]
struct CurrentSvid(watch::Receiver<Arc<Svid>>);

impl CurrentSvid {
    fn key(&self) -> Arc<CertifiedKey> {
        self.0.borrow().certified.clone()
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

fn rejected(e: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The signature checks both verifiers share: TLS 1.2 is never negotiated (refused if asked),
/// TLS 1.3 signatures are checked with the provider's algorithms.
macro_rules! tls13_only_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            msg: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = super::provider().signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(msg, cert, dss, &algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            super::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Client side: the server must hold an SVID of our trust domain (and be `expected`, if set).
#[derive(Debug)]
struct ServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: Option<SpiffeId>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let usage = webpki::KeyUsage::server_auth();
        let peer = self
            .bundle
            .verify(end_entity, intermediates, now, usage)
            .map_err(rejected)?;
        if let Some(want) = self.expected.as_ref().filter(|w| **w != peer.id) {
            let (want, got) = (want.to_string(), peer.id.to_string());
            return Err(rejected(VerifyError::UnexpectedIdentity { want, got }));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// Server side: a client certificate is required and must be an SVID of our trust domain.
#[derive(Debug)]
struct ClientVerifier {
    bundle: Arc<TrustBundle>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let usage = webpki::KeyUsage::client_auth();
        self.bundle
            .verify(end_entity, intermediates, now, usage)
            .map_err(rejected)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    tls13_only_signatures!();
}

/// The HBONE client configuration of one local identity.
pub fn client_config(
    bundle: Arc<TrustBundle>,
    svid: watch::Receiver<Arc<Svid>>,
    expected: Option<SpiffeId>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier { bundle, expected }))
        .with_client_cert_resolver(Arc::new(CurrentSvid(svid)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Every connection is a full handshake: a resumed session would carry the certificate
    // (and revocation verdict) of the connection it resumes, not the current one.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The HBONE server configuration (:15008), presenting the node's SVID.
pub fn server_config(
    bundle: Arc<TrustBundle>,
    svid: watch::Receiver<Arc<Svid>>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ClientVerifier { bundle }))
        .with_cert_resolver(Arc::new(CurrentSvid(svid)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A short stable label for why a handshake failed, for metrics and logs.
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof_during_handshake",
            std::io::ErrorKind::TimedOut => "handshake_timeout",
            _ => "handshake_io_error",
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner
            .downcast_ref::<VerifyError>()
            .map_or("invalid_certificate", VerifyError::reason),
        rustls::Error::InvalidCertificate(_) => "invalid_certificate",
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired) => {
            "tls_version"
        }
        rustls::Error::PeerIncompatible(_) => "incompatible_peer",
        rustls::Error::InvalidMessage(_) => "malformed_tls",
        rustls::Error::NoApplicationProtocol => "no_alpn_h2",
        _ => "handshake_failed",
    }
}
