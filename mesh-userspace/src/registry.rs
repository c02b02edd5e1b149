//! Who is at a destination address, and which identity must answer there. The one place the
//! proxy asks "which SPIFFE ID may the server at this address present". Sources today: the
//! static config (`mesh.workloads`: addresses with their identities, e.g. other nodes' pods) and
//! the pods this meshd serves itself. Anything else is unknown: the client then accepts any SVID
//! of the trust domain, and says so in the access log and in `meshd_server_identity`. The etcd
//! and Kubernetes sources plug in behind the same questions.

use std::{collections::HashMap, net::Ipv4Addr, sync::RwLock};

use crate::identity::SpiffeId;

#[derive(Debug, Default)]
pub struct Registry {
    configured: HashMap<Ipv4Addr, SpiffeId>,
    local_pods: RwLock<HashMap<Ipv4Addr, SpiffeId>>,
}

impl Registry {
    pub fn new(configured: HashMap<Ipv4Addr, SpiffeId>) -> Registry {
        Registry {
            configured,
            local_pods: RwLock::default(),
        }
    }

    /// The identity that must answer at `ip`, when meshd knows it.
    pub fn expected(&self, ip: Ipv4Addr) -> Option<SpiffeId> {
        let pods = self.local_pods.read().unwrap_or_else(|p| p.into_inner());
        pods.get(&ip).or_else(|| self.configured.get(&ip)).cloned()
    }

    pub fn add_local_pod(&self, ip: Ipv4Addr, id: SpiffeId) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        pods.insert(ip, id);
    }

    pub fn remove_local_pod(&self, ip: Ipv4Addr) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        pods.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_pods_answer_before_the_config_and_others_are_unknown() {
        let ip = Ipv4Addr::new(198, 19, 1, 2);
        let configured = SpiffeId::new("td", "ns", "old").unwrap();
        let reg = Registry::new(HashMap::from([(ip, configured.clone())]));
        assert_eq!(reg.expected(ip), Some(configured.clone()));
        let pod = SpiffeId::new("td", "ns", "new").unwrap();
        reg.add_local_pod(ip, pod.clone());
        assert_eq!(reg.expected(ip), Some(pod));
        reg.remove_local_pod(ip);
        assert_eq!(reg.expected(ip), Some(configured));
        assert_eq!(reg.expected(Ipv4Addr::new(198, 19, 9, 9)), None);
    }
}
