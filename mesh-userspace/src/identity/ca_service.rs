//! `meshd ca serve`: the CA as a service, so that no node holds a key that can sign. A node's
//! meshd authenticates with its node credential (a leaf certificate, CA:false, naming
//! `spiffe://<td>/ns/meshd-system/sa/<node>`) over mutual TLS and sends a certificate signing
//! request; the workload key never leaves the node. The service signs only:
//! - the node's own identity (its HBONE server certificate), and
//! - identities the registry places on that node: a workload record below
//!   `<prefix>/nodes/<node>/workloads/` in etcd with that SPIFFE ID (the node's meshd publishes
//!   its pods there before asking; the service waits briefly for a registration in flight).
//!
//! Anything else is refused, logged and counted. The certificate it signs has its own
//! parameters (one URI SAN, not a CA, a lifetime capped by `--max-ttl`), whatever the request
//! asked for. Several replicas may serve from the same CA files. The wire protocol is one
//! HTTP/1.1 request per connection: `POST /v1/sign` with `{"csr": PEM, "ttl_seconds": N}`,
//! answered `200 {"chain": PEM}` (leaf, then the CA's chain) or `4xx {"error": "..."}`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use rcgen::{CertificateSigningRequestParams, SanType};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::{watch, Mutex, Semaphore},
};
use tokio_rustls::TlsAcceptor;

use super::{ca::Issuer, svid, SpiffeId, NODE_NAMESPACE};
use crate::{registry::etcd::EtcdConfig, tls::verify::TrustBundle};

/// The service account of the CA service's own identity (what nodes expect it to present).
pub const CA_SERVICE_ACCOUNT: &str = "meshd-ca";
/// Its own certificate's lifetime (renewed at half life).
const SERVER_TTL: Duration = Duration::from_secs(24 * 3600);
/// Requests larger than this are refused (a CSR is well under 1 KiB).
pub const MAX_BODY: usize = 64 * 1024;
const MAX_HEAD: usize = 8 * 1024;
/// Handshake and request together.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for its workload's registration to appear.
const PLACEMENT_WAIT: Duration = Duration::from_secs(5);
const MAX_IN_FLIGHT: usize = 256;
pub const ALPN: &[u8] = b"http/1.1";

pub fn ca_id(trust_domain: &str) -> Result<SpiffeId> {
    Ok(SpiffeId::new(
        trust_domain,
        NODE_NAMESPACE,
        CA_SERVICE_ACCOUNT,
    )?)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    pub csr: String,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

pub struct Settings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Roots node credentials must chain to.
    pub bundle: Vec<PathBuf>,
    pub trust_domain: String,
    pub listen: SocketAddr,
    pub max_ttl: Duration,
    pub etcd: EtcdConfig,
}

struct Service {
    issuer: Issuer,
    trust_domain: String,
    max_ttl: Duration,
    placement: Placement,
}

/// Serves until the process ends.
pub async fn serve(settings: Settings) -> Result<()> {
    let issuer =
        Issuer::load(&settings.cert, &settings.key).context("the CA's certificate and key")?;
    let td = &settings.trust_domain;
    let bundle = Arc::new(TrustBundle::load(
        td,
        &settings.bundle,
        &Default::default(),
    )?);
    let own = svid::mint(&issuer, &ca_id(td)?, SERVER_TTL)?;
    let (tx, rx) = watch::channel(Arc::new(own));
    let mut tls = (*crate::tls::config::server_config(bundle, rx)?).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listen on {}", settings.listen))?;
    let service = Arc::new(Service {
        issuer,
        trust_domain: td.clone(),
        max_ttl: settings.max_ttl,
        placement: Placement::new(settings.etcd),
    });
    tokio::spawn(renew_own(tx, service.clone()));
    tracing::info!(listen = %settings.listen, id = %ca_id(td)?, "CA service ready");
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let (tcp, from) = listener.accept().await?;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%from, "CA service busy: connection closed");
            continue;
        };
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let stream = acceptor.accept(tcp).await.context("TLS handshake")?;
                let node = node_of(&stream)?;
                service.answer(stream, &node).await
            });
            match answered.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%from, error = %format!("{e:#}"), "CA request failed"),
                Err(_) => tracing::warn!(%from, "CA request timed out"),
            }
            drop(permit);
        });
    }
}

async fn renew_own(tx: watch::Sender<Arc<svid::Svid>>, service: Arc<Service>) {
    loop {
        let wait = (tx.borrow().renew_at().duration_since(SystemTime::now())).unwrap_or_default();
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
        match ca_id(&service.trust_domain)
            .and_then(|id| svid::mint(&service.issuer, &id, SERVER_TTL))
        {
            Ok(own) => {
                tx.send_replace(Arc::new(own));
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot renew the CA service's own certificate")
            }
        }
    }
}

/// The node a verified client certificate names (`.../ns/meshd-system/sa/<node>`).
fn node_of<S>(stream: &tokio_rustls::server::TlsStream<S>) -> Result<String> {
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .context("no client certificate")?;
    let leaf = certs.first().context("no client certificate")?;
    let peer = crate::tls::verify::identity_of(leaf)?;
    if peer.id.namespace != NODE_NAMESPACE || peer.id.service_account == CA_SERVICE_ACCOUNT {
        bail!("{} is not a node credential", peer.id);
    }
    Ok(peer.id.service_account)
}

impl Service {
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        node: &str,
    ) -> Result<()> {
        let (status, body) = match read_request(&mut stream).await {
            Err(e) => (400, serde_json::json!({"error": format!("{e:#}")})),
            Ok(request) => match self.sign(&request, node).await {
                Ok(chain) => (200, serde_json::json!({"chain": chain})),
                Err(Refusal(status, why)) => {
                    tracing::warn!(node = %node, reason = %why, "certificate request refused");
                    (status, serde_json::json!({"error": why}))
                }
            },
        };
        write_response(&mut stream, status, &body.to_string()).await
    }

    async fn sign(&self, request: &SignRequest, node: &str) -> Result<String, Refusal> {
        let csr = CertificateSigningRequestParams::from_pem(&request.csr)
            .map_err(|e| Refusal(400, format!("not a valid signed CSR: {e}")))?;
        let id = requested_id(&csr, &self.trust_domain).map_err(|why| Refusal(400, why))?;
        let own =
            super::node_id(&self.trust_domain, node).map_err(|e| Refusal(403, e.to_string()))?;
        if id != own
            && !self
                .placement
                .places(node, &id)
                .await
                .map_err(|e| Refusal(503, format!("{e:#}")))?
        {
            return Err(Refusal(
                403,
                format!("the registry places no workload with {id} on node {node}"),
            ));
        }
        let ttl = Duration::from_secs(request.ttl_seconds.unwrap_or(u64::MAX)).min(self.max_ttl);
        let now = SystemTime::now();
        let signed = (|| -> Result<String> {
            let not_after = super::ca::not_after(now, ttl)?;
            let params = svid::leaf_params(&id, now - Duration::from_secs(60), not_after)?;
            let to_sign = CertificateSigningRequestParams {
                params,
                public_key: csr.public_key,
            };
            let cert = to_sign.signed_by(&self.issuer.issuer)?;
            Ok(format!("{}{}", cert.pem(), self.issuer.chain_pem()))
        })();
        let chain = signed.map_err(|e| Refusal(500, format!("{e:#}")))?;
        tracing::info!(node = %node, %id, ttl_secs = ttl.as_secs(), "certificate signed");
        Ok(chain)
    }
}

/// A refusal: the HTTP status and why.
struct Refusal(u16, String);

/// The one SPIFFE ID a request may ask for: exactly one SAN, a URI of our trust domain.
fn requested_id(
    csr: &CertificateSigningRequestParams,
    trust_domain: &str,
) -> Result<SpiffeId, String> {
    let [SanType::URI(uri)] = csr.params.subject_alt_names.as_slice() else {
        return Err("the request must carry exactly one SAN, the SPIFFE ID".into());
    };
    let id: SpiffeId = uri.as_str().parse().map_err(|e| format!("{e}"))?;
    if id.trust_domain != trust_domain {
        return Err(format!("{id} is not of trust domain {trust_domain}"));
    }
    Ok(id)
}

/// Where the CA learns which workloads run on which node: etcd, read at request time.
struct Placement {
    config: EtcdConfig,
    client: Mutex<Option<etcd_client::Client>>,
}

impl Placement {
    fn new(config: EtcdConfig) -> Placement {
        Placement {
            config,
            client: Mutex::new(None),
        }
    }

    /// Whether a workload with `id` is registered on `node` (waiting briefly for one that is
    /// being registered).
    async fn places(&self, node: &str, id: &SpiffeId) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
        loop {
            if self.registered(node, id).await? {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn registered(&self, node: &str, id: &SpiffeId) -> Result<bool> {
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            *guard = Some(crate::registry::etcd::connect(&self.config).await?);
        }
        let client = guard.as_mut().expect("connected above");
        let prefix = format!("{}/nodes/{node}/workloads/", self.config.prefix);
        let options = etcd_client::GetOptions::new().with_prefix();
        let listed = match client.get(prefix, Some(options)).await {
            Ok(listed) => listed,
            Err(e) => {
                *guard = None;
                return Err(e).context("reading the registry");
            }
        };
        let records = listed
            .kvs()
            .iter()
            .filter_map(|kv| crate::registry::record::parse_workload(kv.value(), node).ok());
        Ok(records.into_iter().any(|r| r.spiffe_id == *id))
    }
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<SignRequest> {
    let (head_len, mut buf) = read_head(stream).await?;
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(&buf[..head_len])?;
    if request.method != Some("POST") || request.path != Some("/v1/sign") {
        bail!("only POST /v1/sign is served");
    }
    let length = content_length(request.headers)?;
    read_body(stream, &mut buf, head_len, length).await?;
    Ok(serde_json::from_slice(&buf[head_len..head_len + length])?)
}

/// Reads until the end of an HTTP head; the head's length and everything read so far.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(usize, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((end + 4, buf));
        }
        if buf.len() > MAX_HEAD {
            bail!("an HTTP head over {MAX_HEAD} bytes");
        }
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the connection ended inside the HTTP head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize> {
    let header = (headers.iter()).find(|h| h.name.eq_ignore_ascii_case("content-length"));
    let value = header.context("no Content-Length")?.value;
    let length: usize = std::str::from_utf8(value)?.trim().parse()?;
    if length > MAX_BODY {
        bail!("a body of {length} bytes (at most {MAX_BODY})");
    }
    Ok(length)
}

/// Reads until `buf` holds the head and `length` bytes of body.
pub async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: usize,
    length: usize,
) -> Result<()> {
    while buf.len() < head + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the connection ended inside the body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    body: &str,
) -> Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
