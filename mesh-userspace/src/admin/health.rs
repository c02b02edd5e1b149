//! Readiness that tells the truth: meshd is ready only once its listeners are up, interception
//! is installed for every local workload and every local identity holds a certificate that is
//! valid now; it is not ready while starting and while draining, and says why.

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, OnceLock,
    },
    time::SystemTime,
};

use crate::identity::{IdentityManager, Svid};

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

#[derive(Default)]
pub struct Health {
    phase: AtomicU8,
    /// Set once the SVIDs are minted (when meshd has an identity).
    identity: OnceLock<Arc<IdentityManager>>,
}

impl Health {
    pub fn set_identity(&self, manager: Arc<IdentityManager>) {
        let _ = self.identity.set(manager);
    }

    /// The current SVID of every local identity (none without an identity).
    pub fn svids(&self) -> Vec<Arc<Svid>> {
        self.identity.get().map(|m| m.svids()).unwrap_or_default()
    }

    /// Listeners bound and interception installed: serving.
    pub fn serving(&self) {
        self.phase.store(SERVING, Ordering::Release);
    }

    /// Stopping: no new connections, the open ones finish.
    pub fn draining(&self) {
        self.phase.store(DRAINING, Ordering::Release);
    }

    /// `Ok` when ready; otherwise why not.
    pub fn ready(&self) -> Result<(), String> {
        match self.phase.load(Ordering::Acquire) {
            STARTING => return Err("starting: interception is not installed yet".into()),
            DRAINING => return Err("draining: meshd is stopping".into()),
            _ => {}
        }
        let now = SystemTime::now();
        for svid in self.svids() {
            if svid.not_after <= now {
                return Err(format!("the certificate of {} has expired", svid.id));
            }
            if svid.not_before > now {
                return Err(format!("the certificate of {} is not valid yet", svid.id));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving() {
        let health = Health::default();
        assert!(health.ready().unwrap_err().starts_with("starting"));
        health.serving();
        assert_eq!(health.ready(), Ok(()));
        health.draining();
        assert!(health.ready().unwrap_err().starts_with("draining"));
    }
}
