//! Which rustls crypto provider meshd uses is decided here, by measurement: full TLS 1.3
//! handshakes with P-256 certificates and client auth (what a new pooled HBONE connection
//! costs), and bulk AES-128-GCM records (what every byte through a tunnel costs), in memory,
//! for aws-lc-rs and ring.
//!
//! cargo run --release -p mesh-benches --bin tls-providers

use std::{
    io::{Read, Write},
    sync::Arc,
    time::Instant,
};

use anyhow::Result;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
};

const HANDSHAKES: u32 = 300;
const BULK_BYTES: usize = 256 << 20;

struct Pki {
    ca: CertificateDer<'static>,
    server: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
}

fn pki() -> Result<Pki> {
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = rcgen::KeyPair::generate_for(alg)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| -> Result<_> {
        let key = rcgen::KeyPair::generate_for(alg)?;
        let cert =
            rcgen::CertificateParams::new(vec![name.to_string()])?.signed_by(&key, &issuer)?;
        Ok((
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
    };
    Ok(Pki {
        ca: ca_cert.der().clone(),
        server: leaf("server")?,
        client: leaf("client")?,
    })
}

fn configs(
    provider: Arc<CryptoProvider>,
    pki: &Pki,
) -> Result<(Arc<ClientConfig>, Arc<ServerConfig>)> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone())?;
    let roots = Arc::new(roots);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pki.server.0.clone(),
            PrivateKeyDer::Pkcs8(pki.server.1.clone_key()),
        )?;
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            pki.client.0.clone(),
            PrivateKeyDer::Pkcs8(pki.client.1.clone_key()),
        )?;
    client.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(client), Arc::new(server)))
}

/// Moves TLS records between the two ends until neither has anything to send.
fn pump(c: &mut ClientConnection, s: &mut ServerConnection) -> Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut moved = false;
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf)?;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd)?;
                s.process_new_packets()?;
            }
            moved = true;
        }
        while s.wants_write() {
            buf.clear();
            s.write_tls(&mut buf)?;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                c.process_new_packets()?;
            }
            moved = true;
        }
        if !moved {
            return Ok(());
        }
    }
}

fn connect(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> Result<(ClientConnection, ServerConnection)> {
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("server")?)?;
    let mut s = ServerConnection::new(server.clone())?;
    pump(&mut c, &mut s)?;
    anyhow::ensure!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake did not finish"
    );
    Ok((c, s))
}

fn main() -> Result<()> {
    let pki = pki()?;
    let providers: [(&str, CryptoProvider); 2] = [
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
        ("ring", rustls::crypto::ring::default_provider()),
    ];
    println!("| provider | full mTLS handshakes/s (P-256, TLS 1.3) | bulk AES-128-GCM MB/s |");
    println!("|---|---|---|");
    for (name, provider) in providers {
        let (client, server) = configs(Arc::new(provider), &pki)?;
        let started = Instant::now();
        for _ in 0..HANDSHAKES {
            connect(&client, &server)?;
        }
        let per_sec = f64::from(HANDSHAKES) / started.elapsed().as_secs_f64();
        let (mut c, mut s) = connect(&client, &server)?;
        let chunk = vec![0x5au8; 16 << 10];
        let mut sink = vec![0u8; 64 << 10];
        let started = Instant::now();
        let mut moved = 0;
        while moved < BULK_BYTES {
            c.writer().write_all(&chunk)?;
            pump(&mut c, &mut s)?;
            let mut reader = s.reader();
            while let Ok(n) = reader.read(&mut sink) {
                if n == 0 {
                    break;
                }
                moved += n;
            }
        }
        let mbps = moved as f64 / started.elapsed().as_secs_f64() / 1e6;
        println!("| {name} | {per_sec:.0} | {mbps:.0} |");
    }
    Ok(())
}
