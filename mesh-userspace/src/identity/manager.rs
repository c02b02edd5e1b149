//! Keeps an SVID per local identity: minted at start, renewed at half life, published through
//! `tokio::sync::watch`. The node intermediate is re-read from disk at every renewal, so an
//! operator rotates it by replacing the files. When a renewal fails the current certificate
//! stays in use while it is valid; the failure is logged and counted, and retried.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use tokio::sync::watch;

use super::{ca::Issuer, svid, SpiffeId, Svid};
use crate::metrics::Metrics;

/// The namespace of node identities (what meshd's :15008 presents).
pub const NODE_NAMESPACE: &str = "meshd-system";

/// The identity a node's meshd presents as an HBONE server.
pub fn node_id(trust_domain: &str, node: &str) -> Result<SpiffeId, super::SpiffeError> {
    SpiffeId::new(trust_domain, NODE_NAMESPACE, node)
}

#[derive(Debug, Clone)]
pub struct IssuerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where SVIDs come from.
#[derive(Clone)]
pub enum Signer {
    /// The single-node shortcut: minted here from a node intermediate on disk (re-read at
    /// every signing, so an operator rotates it by replacing the files).
    Local(IssuerFiles),
    /// The CA service: a signing request over mutual TLS with the node credential.
    Remote(Arc<super::ca_client::CaClient>),
}

impl Signer {
    pub async fn sign(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid> {
        match self {
            Signer::Local(files) => {
                let issuer =
                    Issuer::load(&files.cert, &files.key).context("load the node intermediate")?;
                svid::mint(&issuer, id, ttl).with_context(|| format!("mint SVID for {id}"))
            }
            Signer::Remote(ca) => ca.sign(id, ttl).await,
        }
    }
}

pub struct IdentityManager {
    certs: std::sync::Mutex<BTreeMap<SpiffeId, watch::Receiver<Arc<Svid>>>>,
    /// Identities given at start (the node's, host workloads'): never released.
    fixed: std::collections::BTreeSet<SpiffeId>,
    signer: Signer,
    ttl: Duration,
    metrics: Arc<Metrics>,
}

impl IdentityManager {
    /// Mints an SVID for each id now (failure is fatal: nothing could be served) and starts
    /// a renewal task per id.
    pub async fn start(
        signer: Signer,
        ttl: Duration,
        ids: Vec<SpiffeId>,
        metrics: Arc<Metrics>,
    ) -> Result<IdentityManager> {
        let manager = IdentityManager {
            certs: Default::default(),
            fixed: ids.iter().cloned().collect(),
            signer,
            ttl,
            metrics,
        };
        for id in ids {
            manager.ensure(&id).await?;
        }
        Ok(manager)
    }

    /// The current SVID of every identity held.
    pub fn svids(&self) -> Vec<Arc<Svid>> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        certs.values().map(|rx| rx.borrow().clone()).collect()
    }

    /// The live SVID channel of an identity.
    pub fn watch(&self, id: &SpiffeId) -> Option<watch::Receiver<Arc<Svid>>> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        certs.get(id).cloned()
    }

    /// The SVID channel of `id`, minting it (and starting its renewal) the first time: pods
    /// bring identities while meshd runs.
    pub async fn ensure(&self, id: &SpiffeId) -> Result<watch::Receiver<Arc<Svid>>> {
        if let Some(rx) = self.watch(id) {
            return Ok(rx);
        }
        let svid = self.signer.sign(id, self.ttl).await?;
        tracing::info!(%id, serial = %svid.serial, "SVID issued");
        let (tx, rx) = watch::channel(Arc::new(svid));
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        let rx = certs.entry(id.clone()).or_insert(rx).clone();
        tokio::spawn(renew(
            tx,
            self.signer.clone(),
            self.ttl,
            self.metrics.clone(),
        ));
        Ok(rx)
    }

    /// Forgets an identity no local workload holds any more (its last pod was deleted): its
    /// renewal task ends at the next renewal once the pod's listeners and pools are gone.
    /// Identities given at start stay.
    pub fn release(&self, id: &SpiffeId) {
        if self.fixed.contains(id) {
            return;
        }
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if certs.remove(id).is_some() {
            tracing::info!(%id, "identity released: no local workload holds it");
        }
    }
}

async fn renew(tx: watch::Sender<Arc<Svid>>, signer: Signer, ttl: Duration, metrics: Arc<Metrics>) {
    let retry = (ttl / 10).clamp(Duration::from_millis(200), Duration::from_secs(30));
    let mut next = tx.borrow().renew_at();
    loop {
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        if tx.is_closed() {
            return;
        }
        let id = tx.borrow().id.clone();
        let minted = signer.sign(&id, ttl).await;
        match minted {
            Ok(svid) => {
                tracing::info!(%id, serial = %svid.serial, "SVID renewed");
                metrics.svid_renewal("ok");
                next = svid.renew_at();
                tx.send_replace(Arc::new(svid));
            }
            Err(e) => {
                metrics.svid_renewal("failed");
                let current = tx.borrow().clone();
                let valid = current.not_after > SystemTime::now();
                tracing::warn!(%id, error = %format!("{e:#}"), keeping = %current.serial,
                    still_valid = valid, "SVID renewal failed; keeping the current certificate");
                next = SystemTime::now() + retry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca;

    #[tokio::test]
    async fn a_released_pod_identity_is_forgotten_and_fixed_ones_stay() {
        let dir = std::env::temp_dir().join(format!("meshd-idm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca::init(&dir, "cluster.local").unwrap();
        ca::issue_node(&dir, "n", Duration::from_secs(3600)).unwrap();
        let issuer = IssuerFiles {
            cert: dir.join("n.crt"),
            key: dir.join("n.key"),
        };
        let node = SpiffeId::new("cluster.local", "meshd-system", "n").unwrap();
        let pod = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        let ttl = Duration::from_secs(3600);
        let signer = Signer::Local(issuer);
        let m = IdentityManager::start(signer, ttl, vec![node.clone()], Default::default());
        let m = m.await.unwrap();
        let first = m.ensure(&pod).await.unwrap().borrow().serial.clone();
        m.release(&pod);
        m.release(&node);
        assert!(m.watch(&pod).is_none() && m.watch(&node).is_some());
        let again = m.ensure(&pod).await.unwrap().borrow().serial.clone();
        assert_ne!(first, again, "a new pod of the identity gets a fresh SVID");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
