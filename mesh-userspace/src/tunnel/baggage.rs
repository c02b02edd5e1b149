//! The source workload on an HBONE CONNECT, as Istio's ztunnel carries it: a W3C `baggage`
//! header (`k8s.namespace.name=NS,k8s.deployment.name=NAME,service.name=APP`). The client sends
//! its workload's; the server believes only what the verified certificate allows: the namespace
//! must be the peer principal's, names must look like Kubernetes names, and the distinct names
//! it ever accepts are capped, so a peer cannot grow metric labels without bound. What fails
//! any check is ignored (the caller stays known by its principal only).

use std::{collections::HashSet, sync::Mutex};

use http::HeaderValue;

use crate::{config::Workload, metrics::istio::Party};

/// Distinct (namespace, workload, app) triples accepted from peers over meshd's life.
const MAX_NAMES: usize = 4096;

/// The `baggage` value a local workload's CONNECTs carry.
pub fn of(w: &Workload) -> Option<HeaderValue> {
    let value = format!(
        "k8s.namespace.name={},k8s.deployment.name={},service.name={}",
        w.namespace, w.name, w.party.app
    );
    HeaderValue::from_str(&value).ok()
}

/// Names accepted from peers so far (bounded by [`MAX_NAMES`]).
#[derive(Default)]
pub struct Accepted {
    seen: Mutex<HashSet<(String, String, String)>>,
}

impl Accepted {
    /// The caller as `baggage` names it, if it checks out against the verified `principal`
    /// (`verified` is the caller known by its certificate alone).
    pub fn party(&self, baggage: &HeaderValue, verified: &Party) -> Option<Party> {
        let text = baggage.to_str().ok()?;
        let mut namespace = None;
        let mut workload = None;
        let mut app = None;
        for member in text.split(',') {
            let (key, value) = member.split_once('=')?;
            let value = value.split(';').next()?.trim();
            match key.trim() {
                "k8s.namespace.name" => namespace = Some(value),
                "service.name" => app = Some(value),
                k if k.starts_with("k8s.") && k.ends_with(".name") && k != "k8s.cluster.name" => {
                    workload = Some(value)
                }
                _ => {}
            }
        }
        let (namespace, workload) = (namespace?, workload?);
        let app = app.unwrap_or(workload);
        if namespace != &*verified.namespace || ![workload, app].iter().all(|n| is_name(n)) {
            return None;
        }
        let key = (namespace.to_string(), workload.to_string(), app.to_string());
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&key) {
            if seen.len() >= MAX_NAMES {
                return None;
            }
            seen.insert(key);
        }
        Some(Party {
            workload: workload.into(),
            app: app.into(),
            ..verified.clone()
        })
    }
}

/// A Kubernetes object name: 1-253 characters of lowercase letters, digits, `-` and `.`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    fn verified(ns: &str) -> Party {
        Party::from_principal(&SpiffeId::new("td", ns, "web").unwrap())
    }

    #[test]
    fn baggage_is_believed_only_within_the_verified_namespace() {
        let accepted = Accepted::default();
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        let good = v("k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web-app");
        let party = accepted.party(&good, &verified("shop")).unwrap();
        assert_eq!((&*party.workload, &*party.app), ("web", "web-app"));
        assert_eq!(&*party.principal, "spiffe://td/ns/shop/sa/web");
        assert!(
            accepted.party(&good, &verified("other")).is_none(),
            "another namespace"
        );
        let shouty = v("k8s.namespace.name=shop,k8s.deployment.name=WEB");
        assert!(
            accepted.party(&shouty, &verified("shop")).is_none(),
            "not a k8s name"
        );
        assert!(accepted.party(&v("garbage"), &verified("shop")).is_none());
        let pod = v("k8s.namespace.name=shop,k8s.pod.name=web-1");
        assert_eq!(
            &*accepted.party(&pod, &verified("shop")).unwrap().app,
            "web-1"
        );
    }

    #[test]
    fn distinct_names_are_capped() {
        let accepted = Accepted::default();
        let shop = verified("shop");
        for i in 0..MAX_NAMES {
            let b = HeaderValue::from_str(&format!("k8s.namespace.name=shop,k8s.pod.name=p{i}"));
            assert!(accepted.party(&b.unwrap(), &shop).is_some());
        }
        let one_more = HeaderValue::from_static("k8s.namespace.name=shop,k8s.pod.name=extra");
        assert!(accepted.party(&one_more, &shop).is_none());
        let again = HeaderValue::from_static("k8s.namespace.name=shop,k8s.pod.name=p1");
        assert!(
            accepted.party(&again, &shop).is_some(),
            "known names still count"
        );
    }
}
