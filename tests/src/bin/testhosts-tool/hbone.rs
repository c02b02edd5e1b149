//! A minimal HBONE client for probing meshd's :15008 from a test node: any client certificate
//! (or none), no verification of the server (the server's checks are what is under test).

use std::sync::Arc;

use bytes::Bytes;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn config(identity: Option<(&str, &str)>) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{cert}: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

pub fn run(
    addr: &str,
    authority: &str,
    identity: Option<(&str, &str)>,
    headers: &[&str],
) -> Result<(), String> {
    let config = config(identity)?;
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority);
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or(format!("not NAME: VALUE: {header}"))?;
        request = request.header(name.trim(), value.trim_start());
    }
    let request = request.body(()).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        match connect(addr, request, config).await {
            Ok(line) => println!("{line}"),
            Err(e) => println!("tls-error {e}"),
        }
    });
    Ok(())
}

async fn connect(
    addr: &str,
    request: http::Request<()>,
    config: rustls::ClientConfig,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("meshd").expect("static name");
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| meshd::tls::verify::identity_of(leaf).ok())
        .map_or("none".to_string(), |p| p.id.to_string());
    println!("server-id {server}");
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let (response, mut stream) = send
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    let response = response
        .await
        .map_err(|e| format!("after handshake: {e}"))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Ok(format!("status {status}"));
    }
    stream
        .send_data(Bytes::from_static(b"ping"), true)
        .map_err(|e| e.to_string())?;
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    let echoed = if got == b"ping" {
        "echo ok"
    } else {
        "echo differs"
    };
    Ok(format!("status {status}\n{echoed}"))
}
