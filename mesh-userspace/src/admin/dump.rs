//! `/config_dump`: what this meshd is doing, as JSON: mode, readiness, workloads with their
//! identities and interception state, pods, peer authentication, policies, certificates and the
//! trust bundle.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use super::State;
use crate::{
    config::{Validated, Workload},
    identity::Svid,
    inpod::manager::PodManager,
    proxy::Context,
    tls::verify::TrustBundle,
};

/// What the dump reads once meshd serves.
pub struct View {
    pub ctx: Arc<Context>,
    pub cfg: Validated,
    pub pods: Option<Arc<PodManager>>,
    pub bundle: Option<Arc<TrustBundle>>,
}

pub async fn config_dump(state: &State) -> Value {
    let ready = state.health.ready();
    let mut dump = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": ready.is_ok(),
        "not_ready_reason": ready.err(),
        "log_filter": crate::logging::filter(),
    });
    let certificates: Vec<Value> = state.health.svids().iter().map(|s| svid(s)).collect();
    dump["certificates"] = certificates.into();
    let Some(view) = state.view.get() else {
        return dump;
    };
    let ctx = &view.ctx;
    let interception = ctx.interception.status();
    dump["mode"] = ctx.interception.mode().as_str().into();
    dump["interception"] = interception.clone().into();
    dump["workloads"] = (view.cfg.workloads.iter())
        .map(|w| json!({"workload": workload(w), "cgroup": w.cgroup_path, "interception": "installed"}))
        .collect::<Vec<_>>()
        .into();
    dump["pods"] = match &view.pods {
        Some(pods) => pods.served().await.iter().map(|p| json!(p)).collect(),
        None => Vec::new(),
    }
    .into();
    dump["peer_authentication"] = format!("{:?}", ctx.peer_auth).into();
    dump["mesh"] = json!({
        "networks": view.cfg.mesh.networks.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "egress": format!("{:?}", ctx.egress),
    });
    dump["registry"] = ctx.registry.dump();
    let policies = ctx.policy.current();
    dump["policies"] = (policies.iter())
        .map(|p| {
            json!({"id": p.id(), "action": format!("{:?}", p.action), "rules": p.rules.len(),
            "file": p.origin.file, "line": p.origin.line})
        })
        .collect::<Vec<_>>()
        .into();
    if let Some(bundle) = &view.bundle {
        dump["trust_bundle"] = json!({
            "trust_domain": bundle.trust_domain(),
            "roots": bundle.roots().iter().map(|r| json!({
                "subject": r.subject, "serial": r.serial, "not_after": unix(r.not_after),
            })).collect::<Vec<_>>(),
        });
    }
    dump
}

fn workload(w: &Workload) -> Value {
    let ports: Vec<Value> = (w.ports.iter().chain(w.protocols.keys()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|p| json!({"port": p, "protocol": w.protocol(*p).as_str()}))
        .collect();
    json!({
        "name": w.name,
        "namespace": w.namespace,
        "service_account": w.service_account,
        "spiffe_id": &*w.party.principal,
        "labels": w.labels,
        "ports": ports,
    })
}

fn svid(s: &Svid) -> Value {
    let left = s.not_after.duration_since(SystemTime::now());
    json!({
        "spiffe_id": s.id.to_string(),
        "serial": s.serial,
        "not_before": unix(s.not_before),
        "not_after": unix(s.not_after),
        "expires_in_seconds": left.map_or(0, |d| d.as_secs()),
    })
}

/// Seconds since the epoch.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
