//! The embedded certificate authority: `meshd ca init` makes a root, `meshd ca issue-node`
//! makes a node intermediate signed by it, and meshd mints its workloads' SVIDs from the node
//! intermediate ([`Issuer`]). ECDSA P-256 throughout; private keys are written 0600 and never
//! over an existing file.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;

pub const ROOT_CERT: &str = "root.crt";
pub const ROOT_KEY: &str = "root.key";
/// Root lifetime.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `meshd ca init`: a new root in `dir`.
pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for name in [ROOT_CERT, ROOT_KEY] {
        if dir.join(name).exists() {
            bail!(
                "{} exists: refusing to overwrite a CA",
                dir.join(name).display()
            );
        }
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(&format!("meshd root {trust_domain}"), 1, ROOT_TTL)?;
    let cert = params.self_signed(&key)?;
    write_new(&dir.join(ROOT_KEY), &key.serialize_pem(), 0o600)?;
    write_new(&dir.join(ROOT_CERT), &cert.pem(), 0o644)?;
    Ok(dir.join(ROOT_CERT))
}

/// `meshd ca issue-node NODE`: a node intermediate signed by the root in `dir`, written as
/// `<dir>/<node>.crt` and `<dir>/<node>.key`. The single-node shortcut: whoever holds it can
/// sign any identity of the trust domain; meshes of several nodes use the CA service and
/// [`issue_node_credential`].
pub fn issue_node(dir: &Path, node: &str, ttl: Duration) -> Result<(PathBuf, PathBuf)> {
    check_node_name(node)?;
    let root = Issuer::load(&dir.join(ROOT_CERT), &dir.join(ROOT_KEY))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(&format!("meshd node {node}"), 0, ttl)?;
    let cert = params.signed_by(&key, &root.issuer)?;
    let (cert_path, key_path) = (
        dir.join(format!("{node}.crt")),
        dir.join(format!("{node}.key")),
    );
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// `meshd ca node-credential NODE`: what a node shows the CA service, signed by the root in
/// `dir`: a leaf (CA:false, client authentication only) naming the node's identity
/// `spiffe://<td>/ns/meshd-system/sa/<node>`, written as `<dir>/<node>-credential.crt|.key`.
/// It cannot sign anything.
pub fn issue_node_credential(
    dir: &Path,
    node: &str,
    trust_domain: &str,
    ttl: Duration,
) -> Result<(PathBuf, PathBuf)> {
    check_node_name(node)?;
    let id = super::node_id(trust_domain, node)?;
    let root = Issuer::load(&dir.join(ROOT_CERT), &dir.join(ROOT_KEY))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let now = SystemTime::now();
    let mut params =
        super::svid::leaf_params(&id, now - Duration::from_secs(60), not_after(now, ttl)?)?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &root.issuer)?;
    let (cert_path, key_path) = (
        dir.join(format!("{node}-credential.crt")),
        dir.join(format!("{node}-credential.key")),
    );
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

fn check_node_name(node: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if node.is_empty() || !node.chars().all(ok) || node.starts_with('.') {
        bail!("node name {node:?}: use letters, digits, '-', '.', '_'");
    }
    Ok(())
}

/// The signing certificate and key of an imported CA (`meshd ca import`), in a CA directory.
pub const IMPORTED_CERT: &str = "ca.crt";
pub const IMPORTED_KEY: &str = "ca.key";

/// What the CA service signs with in `dir`: an imported CA when there is one, else the root.
pub fn signing_files(dir: &Path) -> (PathBuf, PathBuf) {
    match dir.join(IMPORTED_CERT).exists() {
        true => (dir.join(IMPORTED_CERT), dir.join(IMPORTED_KEY)),
        false => (dir.join(ROOT_CERT), dir.join(ROOT_KEY)),
    }
}

/// `meshd ca import`: an existing CA into `dir`, from Istio's plug-in CA layout (`ca-cert.pem`,
/// `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`) or a PEM pair with its root. Written as
/// `ca.crt` (the signing certificate, then the chain up to but without the root), `ca.key`
/// (0600) and `root.crt`; checked first by signing a certificate and verifying it against the
/// root. A mesh that shares the root (an Istio mesh, say) then trusts meshd's SVIDs.
pub fn import(
    dir: &Path,
    cert: &Path,
    key: &Path,
    root: &Path,
    chain: Option<&Path>,
    trust_domain: &str,
) -> Result<()> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
    let roots = crate::tls::certs_from_pem(&read(root)?)?;
    let mut certs = crate::tls::certs_from_pem(&read(cert)?)?;
    if let Some(chain) = chain {
        certs.extend(crate::tls::certs_from_pem(&read(chain)?)?);
    }
    let mut ordered: Vec<CertificateDer<'static>> = Vec::new();
    for c in certs {
        if !roots.contains(&c) && !ordered.contains(&c) {
            ordered.push(c);
        }
    }
    anyhow::ensure!(
        !ordered.is_empty(),
        "{}: no signing certificate",
        cert.display()
    );
    std::fs::create_dir_all(dir)?;
    let staged = dir.join(".import");
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged)?;
    let cert_pem: String = ordered.iter().map(crate::tls::pem_cert).collect();
    let root_pem: String = roots.iter().map(crate::tls::pem_cert).collect();
    write_new(&staged.join(IMPORTED_KEY), &read(key)?, 0o600)?;
    write_new(&staged.join(IMPORTED_CERT), &cert_pem, 0o644)?;
    write_new(&staged.join(ROOT_CERT), &root_pem, 0o644)?;
    let checked = check_import(&staged, trust_domain);
    if checked.is_ok() {
        for name in [IMPORTED_KEY, IMPORTED_CERT, ROOT_CERT] {
            if dir.join(name).exists() {
                let _ = std::fs::remove_dir_all(&staged);
                bail!(
                    "{} exists: refusing to overwrite a CA",
                    dir.join(name).display()
                );
            }
        }
        for name in [IMPORTED_KEY, IMPORTED_CERT, ROOT_CERT] {
            std::fs::rename(staged.join(name), dir.join(name))?;
        }
    }
    let _ = std::fs::remove_dir_all(&staged);
    checked
}

/// An SVID signed by the staged CA must verify against the staged root.
fn check_import(dir: &Path, trust_domain: &str) -> Result<()> {
    let issuer = Issuer::load(&dir.join(IMPORTED_CERT), &dir.join(IMPORTED_KEY))
        .context("the key does not belong to a CA certificate")?;
    let id = super::SpiffeId::new(trust_domain, "meshd-system", "import-check")?;
    let svid = super::svid::mint(&issuer, &id, Duration::from_secs(60))?;
    let bundle = crate::tls::verify::TrustBundle::load(
        trust_domain,
        &[dir.join(ROOT_CERT)],
        &Default::default(),
    )?;
    let chain = crate::tls::certs_from_pem(&svid.chain_pem)?;
    let now = rustls_pki_types::UnixTime::now();
    bundle
        .verify(&chain[0], &chain[1..], now, webpki::KeyUsage::client_auth())
        .map_err(|e| {
            anyhow::anyhow!("a certificate signed by it does not verify against the root: {e}")
        })?;
    Ok(())
}

fn ca_params(common_name: &str, path_len: u8, ttl: Duration) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial().into());
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = not_after(now, ttl)?.into();
    Ok(params)
}

/// The end of a certificate's validity `ttl` after `now`: an error, not an overflow panic, past
/// the last time X.509 (GeneralizedTime) and rcgen's dates can hold, 9999-12-31T23:59:59Z.
pub fn not_after(now: SystemTime, ttl: Duration) -> Result<SystemTime> {
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    let fits = |t: &SystemTime| (t.duration_since(SystemTime::UNIX_EPOCH)).is_ok_and(|d| d <= LAST);
    (now.checked_add(ttl).filter(fits))
        .with_context(|| format!("a validity of {ttl:?} from now ends after the year 9999"))
}

/// 16 random bytes, top bit clear so the DER integer is positive.
pub fn random_serial() -> Vec<u8> {
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    serial.to_vec()
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {} (refusing to overwrite)", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// A CA that signs: its certificate and key, loaded from PEM files.
pub struct Issuer {
    pub(crate) issuer: rcgen::Issuer<'static, KeyPair>,
    /// The issuer's own certificate, sent after the leaf in every chain it signs.
    pub cert: CertificateDer<'static>,
    /// Certificates between the issuer and its root (an imported intermediate's chain), sent
    /// after it: the rest of the issuer's certificate file.
    pub chain: Vec<CertificateDer<'static>>,
}

impl Issuer {
    /// PEM of what follows a leaf it signed: its certificate and its chain.
    pub fn chain_pem(&self) -> String {
        let all = std::iter::once(&self.cert).chain(&self.chain);
        all.map(crate::tls::pem_cert).collect()
    }
}

impl Issuer {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Issuer> {
        let cert_pem = std::fs::read_to_string(cert_path)
            .with_context(|| format!("read {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(key_path)
            .with_context(|| format!("read {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a PEM private key", key_path.display()))?;
        let mut certs = crate::tls::certs_from_pem(&cert_pem)
            .with_context(|| format!("{}", cert_path.display()))?
            .into_iter();
        let cert =
            (certs.next()).with_context(|| format!("{}: no certificate", cert_path.display()))?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert, key)
            .with_context(|| format!("{}: not a usable CA certificate", cert_path.display()))?;
        Ok(Issuer {
            issuer,
            cert,
            chain: certs.collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found with the config fuzz target (fuzz/fuzz_targets/config_yaml.rs): SVID minting, and
    /// `meshd ca issue-node --ttl` likewise, panicked (overflow adding duration to date) for a
    /// validity past the year 9999; both are errors now.
    #[test]
    fn a_validity_past_the_year_9999_is_an_error_not_a_panic() {
        let (hour, huge) = (
            Duration::from_secs(3600),
            Duration::from_secs(99_999_999_999 * 3600),
        );
        let now = SystemTime::now();
        assert!(not_after(now, hour).is_ok());
        for ttl in [huge, Duration::MAX] {
            assert!(not_after(now, ttl).is_err(), "{ttl:?}");
        }
        let dir = std::env::temp_dir().join(format!("meshd-ca-ttl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir, "cluster.local").unwrap();
        let e = issue_node(&dir, "n", huge).unwrap_err();
        assert!(e.to_string().contains("year 9999"), "{e}");
        let (cert, key) = issue_node(&dir, "n", hour).unwrap();
        let issuer = Issuer::load(&cert, &key).unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        for ttl in [huge, Duration::MAX] {
            assert!(crate::identity::svid::mint(&issuer, &id, ttl).is_err());
        }
        assert!(crate::identity::svid::mint(&issuer, &id, hour).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Istio's plug-in CA layout in `dir`: root -> mid -> ca (the signing CA).
    fn istio_layout(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let hour = Duration::from_secs(3600);
        let key = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let (root_key, mid_key, ca_key) = (key(), key(), key());
        let root = ca_params("istio root", 2, hour).unwrap();
        let root = root.self_signed(&root_key).unwrap();
        let root_issuer = rcgen::Issuer::from_ca_cert_der(root.der(), root_key).unwrap();
        let mid = ca_params("istio mid", 1, hour).unwrap();
        let mid = mid.signed_by(&mid_key, &root_issuer).unwrap();
        let mid_issuer = rcgen::Issuer::from_ca_cert_der(mid.der(), mid_key).unwrap();
        let ca = ca_params("istio ca", 0, hour).unwrap();
        let ca = ca.signed_by(&ca_key, &mid_issuer).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("ca-cert.pem", ca.pem());
        write("ca-key.pem", ca_key.serialize_pem());
        write("root-cert.pem", root.pem());
        let chain = format!("{}{}{}", ca.pem(), mid.pem(), root.pem());
        write("cert-chain.pem", chain);
    }

    /// Istio's plug-in CA layout with a chain of two intermediates: imported, the CA service's
    /// signing files are the imported ones, an SVID carries both intermediates and verifies
    /// against the root; a key of another CA is refused and leaves nothing behind.
    #[test]
    fn an_istio_plug_in_ca_is_imported_and_signs_verifiable_chains() {
        let base = std::env::temp_dir().join(format!("meshd-ca-import-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let istio = base.join("istio");
        istio_layout(&istio);
        let hour = Duration::from_secs(3600);
        let f = |name: &str| istio.join(name);
        let (cert, key, root_file, chain) = (
            f("ca-cert.pem"),
            f("ca-key.pem"),
            f("root-cert.pem"),
            f("cert-chain.pem"),
        );

        // A key that is not the certificate's: refused, nothing written.
        let wrong = base.join("wrong.key");
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&wrong, other.serialize_pem()).unwrap();
        let target = base.join("meshd-ca");
        assert!(import(
            &target,
            &cert,
            &wrong,
            &root_file,
            Some(&chain),
            "cluster.local"
        )
        .is_err());
        assert!(!target.join(IMPORTED_CERT).exists() && !target.join(ROOT_CERT).exists());

        import(
            &target,
            &cert,
            &key,
            &root_file,
            Some(&chain),
            "cluster.local",
        )
        .unwrap();
        let (c, k) = signing_files(&target);
        assert_eq!(c, target.join(IMPORTED_CERT));
        let issuer = Issuer::load(&c, &k).unwrap();
        assert_eq!(
            issuer.chain.len(),
            1,
            "the middle intermediate, not the root"
        );
        let id = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let svid = crate::identity::svid::mint(&issuer, &id, hour).unwrap();
        let sent = crate::tls::certs_from_pem(&svid.chain_pem).unwrap();
        assert_eq!(sent.len(), 3, "leaf, the signing CA, the middle one");
        let bundle = crate::tls::verify::TrustBundle::load(
            "cluster.local",
            &[target.join(ROOT_CERT)],
            &Default::default(),
        )
        .unwrap();
        let usage = webpki::KeyUsage::server_auth();
        bundle
            .verify(
                &sent[0],
                &sent[1..],
                rustls_pki_types::UnixTime::now(),
                usage,
            )
            .unwrap();
        // Never over an existing CA.
        assert!(import(
            &target,
            &cert,
            &key,
            &root_file,
            Some(&chain),
            "cluster.local"
        )
        .is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
