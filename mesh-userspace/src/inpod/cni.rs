//! The `meshd-cni` plugin: chained after the node's network plugin in the CNI conflist. ADD
//! reads the pod's namespace, names (CNI_ARGS) and address (prevResult), asks meshd to capture
//! the pod and answers the runtime only then; if meshd cannot be reached, ADD fails and the
//! runtime does not start the pod (fail closed). DEL asks meshd to remove the pod (and succeeds
//! when meshd is down: a restarted meshd does not re-adopt pods whose namespace is gone).
//! CHECK asks meshd whether it still serves the pod. CNI spec versions 0.4.0 and 1.0.0.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{json, Value};

use super::protocol::{PodInfo, Reply, Request};

pub const SUPPORTED_VERSIONS: [&str; 2] = ["0.4.0", "1.0.0"];
/// The plugin's `type` in the conflist.
pub const PLUGIN_TYPE: &str = "meshd-cni";
/// How long ADD waits for meshd (capture of one pod takes milliseconds).
const MESHD_TIMEOUT: Duration = Duration::from_secs(20);

/// A CNI error: the code and message the runtime shows.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object CNI expects on stdout.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The plugin's environment, as the runtime sets it.
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    /// `K=V;K=V` pairs (K8S_POD_NAME, K8S_POD_NAMESPACE, K8S_POD_UID ...).
    pub args: String,
}

impl Env {
    pub fn from_process() -> Env {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }

    fn arg(&self, key: &str) -> Option<String> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

/// Runs one CNI command: `conf` is the stdin JSON. Returns what to print on success.
pub fn run(env: &Env, conf: &Value) -> Result<Value, CniError> {
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    if env.command == "VERSION" {
        return Ok(json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}));
    }
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(1, "incompatible CNI version", version));
    }
    let socket = socket_of(conf);
    match env.command.as_str() {
        "ADD" => {
            let prev = conf.get("prevResult").cloned().ok_or_else(|| {
                CniError::new(
                    7,
                    "meshd-cni must be chained after a network plugin",
                    "no prevResult",
                )
            })?;
            let info = pod_info(env, &prev)?;
            let reply = ask(&socket, &Request::Add(info))?;
            reply_ok(reply)?;
            // A chained plugin passes the previous result on, in the conf's version.
            let mut result = prev;
            result["cniVersion"] = json!(version);
            Ok(result)
        }
        "DEL" => {
            let request = Request::Del {
                container_id: env.container_id.clone(),
            };
            if let Err(e) = ask(&socket, &request).and_then(reply_ok) {
                eprintln!(
                    "meshd-cni: DEL: {} ({}); the pod goes anyway",
                    e.msg, e.details
                );
            }
            Ok(Value::Null)
        }
        "CHECK" => {
            let request = Request::Check {
                container_id: env.container_id.clone(),
            };
            ask(&socket, &request).and_then(reply_ok)?;
            Ok(Value::Null)
        }
        other => Err(CniError::new(4, "unknown CNI_COMMAND", other)),
    }
}

fn reply_ok(reply: Reply) -> Result<(), CniError> {
    match reply.ok {
        true => Ok(()),
        false => Err(CniError::new(
            999,
            "meshd refused the pod",
            reply.error.unwrap_or_default(),
        )),
    }
}

/// meshd's socket: the plugin's `meshd_socket` setting, or meshd's default.
fn socket_of(conf: &Value) -> PathBuf {
    conf["meshd_socket"]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/meshd/cni.sock"))
}

/// The pod as ADD describes it. Its service account and labels come from the runtime's args
/// when it passes them (`K8S_POD_SERVICE_ACCOUNT`, `MESHD_LABELS=k:v,k:v`); Kubernetes passes
/// neither, and the registry's Kubernetes source will fill them in.
pub fn pod_info(env: &Env, prev: &Value) -> Result<PodInfo, CniError> {
    if env.netns.is_empty() || env.container_id.is_empty() {
        return Err(CniError::new(
            4,
            "CNI_NETNS and CNI_CONTAINERID are required",
            "",
        ));
    }
    let ip = first_ipv4(prev)
        .ok_or_else(|| CniError::new(7, "no IPv4 address in prevResult", prev.to_string()))?;
    let labels: BTreeMap<String, String> = env
        .arg("MESHD_LABELS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(PodInfo {
        container_id: env.container_id.clone(),
        netns: PathBuf::from(&env.netns),
        name: env.arg("K8S_POD_NAME").unwrap_or(env.container_id.clone()),
        namespace: env.arg("K8S_POD_NAMESPACE").unwrap_or("default".into()),
        uid: env.arg("K8S_POD_UID"),
        ip,
        service_account: env.arg("K8S_POD_SERVICE_ACCOUNT"),
        labels,
    })
}

/// The first IPv4 address of a CNI result (`ips[].address`, `a.b.c.d/len`).
fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr = ip["address"].as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

/// One request/reply with meshd.
fn ask(socket: &Path, request: &Request) -> Result<Reply, CniError> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            11,
            "meshd is not reachable: the pod is not started unprotected",
            format!("{}: {e}", socket.display()),
        )
    };
    let mut conn = UnixStream::connect(socket).map_err(unreachable)?;
    conn.set_read_timeout(Some(MESHD_TIMEOUT))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(request).expect("requests serialise");
    line.push(b'\n');
    conn.write_all(&line).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(unreachable)?;
    serde_json::from_str(&answer)
        .map_err(|e| CniError::new(999, "meshd's reply is not understood", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "abc".into(),
            netns: "/run/netns/pod".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;MESHD_LABELS=app:web"
                .into(),
        }
    }

    #[test]
    fn add_reads_names_and_the_address_from_args_and_prev_result() {
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "198.19.0.7/24"}]});
        let info = pod_info(&env("ADD"), &prev).unwrap();
        assert_eq!(info.name, "web");
        assert_eq!(info.namespace, "shop");
        assert_eq!(info.ip, Ipv4Addr::new(198, 19, 0, 7));
        assert_eq!(info.labels.get("app").map(String::as_str), Some("web"));
        assert!(pod_info(&env("ADD"), &json!({"ips": []})).is_err());
    }

    #[test]
    fn version_is_answered_and_unknown_versions_refused() {
        let out = run(&env("VERSION"), &json!({"cniVersion": "1.0.0"})).unwrap();
        assert_eq!(out["supportedVersions"], json!(SUPPORTED_VERSIONS));
        let e = run(&env("ADD"), &json!({"cniVersion": "0.2.0"})).unwrap_err();
        assert_eq!(e.code, 1);
    }

    #[test]
    fn add_without_meshd_fails_closed_and_del_succeeds() {
        let conf = json!({"cniVersion": "1.0.0", "meshd_socket": "/nonexistent/meshd.sock",
            "prevResult": {"ips": [{"address": "198.19.0.7/24"}]}});
        assert_eq!(run(&env("ADD"), &conf).unwrap_err().code, 11);
        assert!(run(&env("DEL"), &conf).is_ok());
        assert!(run(&env("CHECK"), &conf).is_err());
    }
}
