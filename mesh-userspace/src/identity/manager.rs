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

pub struct IdentityManager {
    certs: std::sync::Mutex<BTreeMap<SpiffeId, watch::Receiver<Arc<Svid>>>>,
    issuer: IssuerFiles,
    ttl: Duration,
    metrics: Arc<Metrics>,
}

impl IdentityManager {
    /// Mints an SVID for each id now (failure is fatal: nothing could be served) and starts
    /// a renewal task per id.
    pub fn start(
        issuer: IssuerFiles,
        ttl: Duration,
        ids: Vec<SpiffeId>,
        metrics: Arc<Metrics>,
    ) -> Result<IdentityManager> {
        let manager = IdentityManager {
            certs: Default::default(),
            issuer,
            ttl,
            metrics,
        };
        for id in ids {
            manager.ensure(&id)?;
        }
        Ok(manager)
    }

    /// The live SVID channel of an identity.
    pub fn watch(&self, id: &SpiffeId) -> Option<watch::Receiver<Arc<Svid>>> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        certs.get(id).cloned()
    }

    /// The SVID channel of `id`, minting it (and starting its renewal) the first time: pods
    /// bring identities while meshd runs.
    pub fn ensure(&self, id: &SpiffeId) -> Result<watch::Receiver<Arc<Svid>>> {
        if let Some(rx) = self.watch(id) {
            return Ok(rx);
        }
        let current = Issuer::load(&self.issuer.cert, &self.issuer.key)
            .context("load the node intermediate")?;
        let svid =
            svid::mint(&current, id, self.ttl).with_context(|| format!("mint SVID for {id}"))?;
        tracing::info!(%id, serial = %svid.serial, "SVID issued");
        let (tx, rx) = watch::channel(Arc::new(svid));
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        let rx = certs.entry(id.clone()).or_insert(rx).clone();
        tokio::spawn(renew(
            tx,
            self.issuer.clone(),
            self.ttl,
            self.metrics.clone(),
        ));
        Ok(rx)
    }
}

async fn renew(
    tx: watch::Sender<Arc<Svid>>,
    issuer: IssuerFiles,
    ttl: Duration,
    metrics: Arc<Metrics>,
) {
    let retry = (ttl / 10).clamp(Duration::from_millis(200), Duration::from_secs(30));
    let mut next = tx.borrow().renew_at();
    loop {
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        if tx.is_closed() {
            return;
        }
        let id = tx.borrow().id.clone();
        let minted = Issuer::load(&issuer.cert, &issuer.key).and_then(|i| svid::mint(&i, &id, ttl));
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
