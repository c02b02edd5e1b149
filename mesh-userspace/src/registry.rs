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

    /// Removes a local pod; returns its identity when no other local pod holds it.
    pub fn remove_local_pod(&self, ip: Ipv4Addr) -> Option<SpiffeId> {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        let id = pods.remove(&ip)?;
        (!pods.values().any(|other| *other == id)).then_some(id)
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
        assert_eq!(reg.expected(ip), Some(pod.clone()));
        assert_eq!(reg.remove_local_pod(ip), Some(pod));
        assert_eq!(reg.expected(ip), Some(configured));
        assert_eq!(reg.expected(Ipv4Addr::new(198, 19, 9, 9)), None);
    }

    #[test]
    fn an_identity_is_unheld_only_when_its_last_pod_goes() {
        let (a, b) = (Ipv4Addr::new(198, 19, 1, 2), Ipv4Addr::new(198, 19, 1, 3));
        let web = SpiffeId::new("td", "shop", "web").unwrap();
        let reg = Registry::new(HashMap::new());
        reg.add_local_pod(a, web.clone());
        reg.add_local_pod(b, web.clone());
        assert_eq!(reg.remove_local_pod(a), None);
        assert_eq!(reg.remove_local_pod(b), Some(web));
        assert_eq!(reg.remove_local_pod(b), None);
    }
}
