//! The node side of the CA service ([`super::ca_service`]): a fresh key per SVID, a signing
//! request for the one SPIFFE ID, sent over mutual TLS with the node credential to a server
//! that must prove it is the CA service of the trust domain. The returned chain is checked
//! against the key and the ID before it is used.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use tokio::{io::AsyncWriteExt, sync::watch};
use tokio_rustls::TlsConnector;

use super::{
    ca_service::{self, SignRequest},
    svid, SpiffeId, Svid,
};
use crate::tls::verify::TrustBundle;

const TIMEOUT: Duration = Duration::from_secs(15);

pub struct CaClient {
    address: SocketAddr,
    connector: TlsConnector,
    mark: u32,
}

impl CaClient {
    /// `credential`: the node credential (cert chain and key files); `bundle`: the roots the
    /// CA service's certificate must chain to.
    pub fn new(
        address: SocketAddr,
        credential: (&Path, &Path),
        bundle: Arc<TrustBundle>,
        mark: u32,
    ) -> Result<CaClient> {
        let own = load(credential.0, credential.1).context("the node credential")?;
        let expected = ca_service::ca_id(bundle.trust_domain())?;
        let (_keep, rx) = watch::channel(Arc::new(own));
        let mut config = (*crate::tls::config::client_config(bundle, rx, Some(expected))?).clone();
        config.alpn_protocols = vec![ca_service::ALPN.to_vec()];
        Ok(CaClient {
            address,
            connector: TlsConnector::from(Arc::new(config)),
            mark,
        })
    }

    /// An SVID for `id` living `ttl` (or less, as the CA service allows).
    pub async fn sign(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let request = SignRequest {
            csr,
            ttl_seconds: Some(ttl.as_secs()),
        };
        let body = serde_json::to_string(&request)?;
        let (status, answer) = tokio::time::timeout(TIMEOUT, self.post(&body))
            .await
            .with_context(|| {
                format!("the CA service at {} did not answer in time", self.address)
            })??;
        let answer: serde_json::Value = serde_json::from_slice(&answer)
            .with_context(|| format!("the CA service answered {status} with no JSON"))?;
        if status != 200 {
            let why = answer["error"].as_str().unwrap_or("no reason given");
            bail!("the CA service refused {id} ({status}): {why}");
        }
        let chain = answer["chain"].as_str().context("no chain in the answer")?;
        svid::from_chain(id, chain, &key).context("the CA service's answer")
    }

    async fn post(&self, body: &str) -> Result<(u16, Vec<u8>)> {
        let SocketAddr::V4(v4) = self.address else {
            bail!("the CA service address must be IPv4");
        };
        let tcp = crate::proxy::dial(v4, self.mark, None, None)
            .await
            .with_context(|| format!("connect to the CA service at {}", self.address))?;
        let name = rustls::pki_types::ServerName::try_from("meshd-ca")?.to_owned();
        let mut tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("TLS with the CA service")?;
        let head = format!(
            "POST /v1/sign HTTP/1.1\r\nHost: meshd-ca\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body.as_bytes()).await?;
        tls.flush().await?;
        let (head_len, mut buf) = ca_service::read_head(&mut tls).await?;
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        response.parse(&buf[..head_len])?;
        let status = response.code.context("no status")?;
        let length = ca_service::content_length(response.headers)?;
        ca_service::read_body(&mut tls, &mut buf, head_len, length).await?;
        Ok((status, buf[head_len..head_len + length].to_vec()))
    }
}

/// A certificate chain and key from PEM files, as an [`Svid`] (the node credential).
pub fn load(cert: &Path, key: &Path) -> Result<Svid> {
    let chain =
        std::fs::read_to_string(cert).with_context(|| format!("read {}", cert.display()))?;
    let key_pem =
        std::fs::read_to_string(key).with_context(|| format!("read {}", key.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{}: not a PEM private key", key.display()))?;
    let first = crate::tls::certs_from_pem(&chain)?;
    let leaf = first
        .first()
        .with_context(|| format!("{}: no certificate", cert.display()))?;
    let id = crate::tls::verify::identity_of(leaf)?.id;
    svid::from_chain(&id, &chain, &key)
}
