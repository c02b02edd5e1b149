//! Who a pod is — namespace, service account, labels — from where its runtime keeps that.
//! Kubernetes runtimes pass the namespace in CNI_ARGS and the API has the rest (the registry's
//! Kubernetes source). podman passes only the pod's name, and its `kube play` keeps the Pod
//! YAML's `metadata.labels` (as pod labels) and `metadata.annotations` (on each container) but
//! drops `metadata.namespace` and `spec.serviceAccountName`; meshd reads them back with
//! `podman pod inspect` / `podman inspect`, the namespace and service account from the
//! annotations `meshd.io/namespace` and `meshd.io/service-account`. podman holds its lock while
//! it runs the CNI chain, so this happens after ADD returned: the pod is already captured, its
//! connections wait in meshd's listen queues until the identity is known.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::protocol::PodInfo;
use crate::config::Protocol;

pub const NAMESPACE_ANNOTATION: &str = "meshd.io/namespace";
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "meshd.io/service-account";
/// Ports that are not plain TCP: `"8080/http,50051/grpc"` (policy decides their requests).
pub const PORTS_ANNOTATION: &str = "meshd.io/ports";
/// How long podman may keep its lock (setting the pod up) before the pod is given up.
const PODMAN_DEADLINE: Duration = Duration::from_secs(60);
const PODMAN_CALL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub protocols: BTreeMap<u16, Protocol>,
}

/// Where the pod's metadata comes from.
#[derive(Debug, Clone)]
pub enum MetadataSource {
    /// What the CNI call carried (K8S_POD_NAMESPACE, K8S_POD_SERVICE_ACCOUNT, MESHD_LABELS).
    CniArgs,
    /// `podman` as this command line runs it (e.g. with --root/--runroot).
    Podman(Vec<String>),
}

impl MetadataSource {
    pub async fn resolve(&self, info: &PodInfo) -> Result<PodMeta> {
        let from_cni = PodMeta {
            namespace: info.namespace.clone(),
            service_account: info.service_account.clone().unwrap_or("default".into()),
            labels: info.labels.clone(),
            protocols: BTreeMap::new(),
        };
        match self {
            MetadataSource::CniArgs => Ok(from_cni),
            MetadataSource::Podman(argv) => podman(argv, &info.name, from_cni).await,
        }
    }
}

async fn podman(argv: &[String], pod: &str, base: PodMeta) -> Result<PodMeta> {
    let deadline = tokio::time::Instant::now() + PODMAN_DEADLINE;
    let inspect = loop {
        match run(argv, &["pod", "inspect", pod]).await {
            Ok(v) => break v,
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context(format!("podman pod inspect {pod}")))
            }
            // Busy (the runtime still holds its lock) or not there yet: ask again.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let inspect = first(&inspect);
    let labels = string_map(&inspect["Labels"]);
    let ids: Vec<String> = (inspect["Containers"].as_array().into_iter().flatten())
        .filter_map(|c| c["Id"].as_str().map(String::from))
        .collect();
    let mut annotations = BTreeMap::new();
    if !ids.is_empty() {
        let mut args = vec!["inspect"];
        args.extend(ids.iter().map(String::as_str));
        for c in run(argv, &args).await?.as_array().into_iter().flatten() {
            annotations.extend(string_map(&c["Config"]["Annotations"]));
        }
    }
    Ok(meta_from(base, labels, &annotations))
}

/// The pod's identity from podman's view of it, over what the CNI call carried.
fn meta_from(
    base: PodMeta,
    labels: BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> PodMeta {
    let mut all = base.labels;
    all.extend(labels);
    PodMeta {
        namespace: annotations
            .get(NAMESPACE_ANNOTATION)
            .cloned()
            .unwrap_or(base.namespace),
        service_account: annotations
            .get(SERVICE_ACCOUNT_ANNOTATION)
            .cloned()
            .unwrap_or(base.service_account),
        labels: all,
        protocols: annotations
            .get(PORTS_ANNOTATION)
            .map(|a| port_protocols(a))
            .unwrap_or_default(),
    }
}

/// Reads `meshd.io/ports`. A malformed entry is logged and left out: its port stays plain TCP,
/// where HTTP-only ALLOW rules never match, so a typo denies rather than opens.
pub fn port_protocols(annotation: &str) -> BTreeMap<u16, Protocol> {
    let mut out = BTreeMap::new();
    for entry in annotation
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let parsed = entry.split_once('/').and_then(|(port, proto)| {
            let port = port.trim().parse::<u16>().ok().filter(|p| *p != 0)?;
            Some((port, proto.trim().parse::<Protocol>().ok()?))
        });
        match parsed {
            Some((port, proto)) => {
                out.insert(port, proto);
            }
            None => tracing::warn!(
                annotation = PORTS_ANNOTATION,
                entry,
                "not PORT/PROTOCOL (tcp, http, grpc); the entry is ignored"
            ),
        }
    }
    out
}

fn first(v: &Value) -> &Value {
    v.as_array().and_then(|a| a.first()).unwrap_or(v)
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    (v.as_object().into_iter().flatten())
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

async fn run(argv: &[String], args: &[&str]) -> Result<Value> {
    let (program, prefix) = argv.split_first().context("pods.podman is empty")?;
    let out = tokio::process::Command::new(program)
        .args(prefix)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PODMAN_CALL, out)
        .await
        .context("podman did not answer")??;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_name_the_identity_and_labels_merge() {
        let base = PodMeta {
            namespace: "default".into(),
            service_account: "default".into(),
            labels: BTreeMap::from([("from".into(), "cni".into())]),
            protocols: BTreeMap::new(),
        };
        let labels = BTreeMap::from([("app".into(), "web".into())]);
        let annotations = BTreeMap::from([
            (NAMESPACE_ANNOTATION.to_string(), "shop".to_string()),
            (SERVICE_ACCOUNT_ANNOTATION.to_string(), "web".to_string()),
            (
                PORTS_ANNOTATION.to_string(),
                "8080/http, 9000/grpc,x/http,1/ftp".to_string(),
            ),
        ]);
        let meta = meta_from(base.clone(), labels, &annotations);
        assert_eq!(
            (meta.namespace.as_str(), meta.service_account.as_str()),
            ("shop", "web")
        );
        assert_eq!(meta.labels.len(), 2);
        let expected = BTreeMap::from([(8080, Protocol::Http), (9000, Protocol::Grpc)]);
        assert_eq!(meta.protocols, expected);
        let plain = meta_from(base, BTreeMap::new(), &BTreeMap::new());
        assert_eq!(plain.namespace, "default");
    }

    #[test]
    fn podman_json_is_read_whether_an_object_or_a_list() {
        let obj: Value = serde_json::json!({"Labels": {"app": "web"}});
        let list = serde_json::json!([{"Labels": {"app": "web"}}]);
        assert_eq!(
            string_map(&first(&obj)["Labels"]),
            string_map(&first(&list)["Labels"])
        );
    }
}
