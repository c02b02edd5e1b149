//! The wire format between `meshd-cni` and meshd: one JSON request line, one JSON reply line,
//! over meshd's unix socket (`pods.cni_socket`).

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// What the runtime tells us about a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// The runtime's id for the pod's sandbox (CNI_CONTAINERID): the key of everything meshd
    /// makes for the pod.
    pub container_id: String,
    /// The pod's network namespace (CNI_NETNS).
    pub netns: PathBuf,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub uid: Option<String>,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A request from the CNI plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Add(PodInfo),
    Del { container_id: String },
    Check { container_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// ADD: whether meshd captured the pod (`false`: outside the mesh by namespace or label).
    #[serde(default)]
    pub meshed: bool,
    #[serde(default)]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(meshed: bool) -> Reply {
        Reply {
            ok: true,
            meshed,
            error: None,
        }
    }

    pub fn failed(error: String) -> Reply {
        Reply {
            ok: false,
            meshed: false,
            error: Some(error),
        }
    }
}

/// Longest request line meshd reads.
pub const MAX_LINE: usize = 64 * 1024;

/// The label that keeps a pod out of the mesh (Istio ambient's spelling).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let add = Request::Add(PodInfo {
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            name: "web".into(),
            namespace: "shop".into(),
            uid: None,
            ip: Ipv4Addr::new(198, 19, 0, 2),
            service_account: Some("web".into()),
            labels: BTreeMap::from([("app".into(), "web".into())]),
        });
        let text = serde_json::to_string(&add).unwrap();
        assert!(text.starts_with(r#"{"op":"add""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), add);
        let del: Request = serde_json::from_str(r#"{"op":"del","container_id":"c1"}"#).unwrap();
        assert_eq!(
            del,
            Request::Del {
                container_id: "c1".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"nuke"}"#).is_err());
    }
}
