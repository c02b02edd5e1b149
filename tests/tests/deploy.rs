//! deploy/kubernetes: the manifests validate against Kubernetes' own schemas (kubernetes-validate,
//! strict: an unknown field is an error; no API server runs here) and a manifest with a mistake
//! is rejected, so the check can fail; the kustomization lists every manifest; the ConfigMap's
//! meshd.yaml is a config meshd's own parser accepts; and the DaemonSet agrees with that config
//! (paths mounted from the host where the config points), with meshd's flags and with the surge
//! update meshd's handover is built for.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml_ng::Value;
use testhosts::{meshd_bin, require_privileges};

/// Kubernetes releases the manifests are checked against (kubernetes-validate bundles both).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every manifest: the kustomization's resources and the uninstall Job.
fn manifests() -> Vec<PathBuf> {
    let dir = kubernetes_dir();
    let mut files: Vec<PathBuf> = [dir.clone(), dir.join("uninstall")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
}

fn validator() -> Result<(), String> {
    let ok = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if ok.is_ok_and(|o| o.status.success()) {
        Ok(())
    } else {
        Err("needs kubernetes-validate (PyPI): run `cargo xtask setup`".into())
    }
}

/// kubernetes-validate --strict; `Err` with its report when it fails or warns (a kind it has no
/// schema for is only a warning to it, and would go unchecked).
fn validate(files: &[PathBuf], version: &str) -> Result<String, String> {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let clean = !report.contains("WARN") && !report.contains("ERROR");
    if out.status.success() && clean {
        Ok(report)
    } else {
        Err(report)
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    require_privileges!(validator());
    let expected = [
        "namespace/meshd-system",
        "serviceaccount/meshd",
        "clusterrole/meshd",
        "clusterrolebinding/meshd",
        "configmap/meshd-config",
        "configmap/meshd-policies",
        "daemonset/meshd",
        "job/meshd-cleanup-node_name",
    ];
    for version in KUBERNETES_VERSIONS {
        let report = validate(&manifests(), version).unwrap_or_else(|r| panic!("{version}:\n{r}"));
        let lower = report.to_lowercase();
        for resource in expected {
            assert!(
                lower.contains(&format!("passed for resource {resource} ")),
                "{version}: {resource} not validated:\n{report}"
            );
        }
        eprintln!("{version}: {} manifests valid", expected.len());
    }
}

#[test]
fn a_manifest_with_a_mistake_is_rejected() {
    require_privileges!(validator());
    let daemonset = std::fs::read_to_string(kubernetes_dir().join("daemonset.yaml")).unwrap();
    let mistakes = [
        ("a misspelt field", "privileged: true", "privilegd: true"),
        (
            "a wrong type",
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: soon",
        ),
        ("a misspelt kind", "kind: DaemonSet", "kind: DeamonSet"),
        ("a missing image", "image: localhost/meshd", "imageName: x"),
    ];
    let path =
        std::env::temp_dir().join(format!("meshd-deploy-{}-broken.yaml", std::process::id()));
    for (what, from, to) in mistakes {
        assert!(
            daemonset.contains(from),
            "{what}: {from:?} not in the DaemonSet"
        );
        std::fs::write(&path, daemonset.replacen(from, to, 1)).unwrap();
        let verdict = validate(std::slice::from_ref(&path), KUBERNETES_VERSIONS[0]);
        let _ = std::fs::remove_file(&path);
        assert!(verdict.is_err(), "{what} was accepted: {verdict:?}");
    }
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let dir = kubernetes_dir();
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut listed: Vec<String> = doc["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut files: Vec<String> = manifests()
        .iter()
        .filter(|p| p.parent().unwrap().ends_with("kubernetes"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(listed, files);
}

/// Every YAML document of a manifest file.
fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(kubernetes_dir().join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn object(file: &str, kind: &str, name: &str) -> Value {
    let found = documents(file)
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name);
    found.unwrap_or_else(|| panic!("{file}: no {kind} {name}"))
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("meshd-deploy-{}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The ConfigMap's meshd.yaml through meshd's parser and validation, on a stand-in node: a
/// cgroup root with the kubelet's `kubepods.slice`, and the operator's /etc/meshd/node files
/// (validation checks that they are files; their content is read when meshd runs).
fn parse_config(text: &str, dir: &TempDir) -> Result<meshd::config::Validated, String> {
    let node = dir.0.join("node");
    std::fs::create_dir_all(&node).unwrap();
    for file in ["node.crt", "node.key", "root.crt"] {
        std::fs::write(node.join(file), "stand-in\n").unwrap();
    }
    let cgroup_root = dir.0.join("cgroup");
    std::fs::create_dir_all(cgroup_root.join("kubepods.slice")).unwrap();
    std::fs::write(cgroup_root.join("kubepods.slice/cgroup.procs"), "").unwrap();
    let text = text.replace("/etc/meshd/node/", &format!("{}/", node.display()));
    meshd::config::parse(&text, &cgroup_root).map_err(|e| e.to_string())
}

fn configmap_text() -> String {
    let configmap = object("configmap.yaml", "ConfigMap", "meshd-config");
    let text = configmap["data"]["meshd.yaml"]
        .as_str()
        .expect("data.meshd.yaml");
    assert!(text.contains("/etc/meshd/node/node.crt"), "{text}");
    text.to_string()
}

#[test]
fn the_configmap_holds_a_config_meshd_accepts() {
    let dir = TempDir::new("config");
    let text = configmap_text();
    let cfg = parse_config(&text, &dir).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let pods = cfg.pods.as_ref().expect("a pods: section");
    assert_eq!(pods.settings.cni_socket, Path::new("/run/meshd/cni.sock"));
    assert_eq!(pods.settings.state_dir, cfg.proxy.state_dir);
    assert_eq!(
        pods.cgroup_parent.as_deref(),
        Some(dir.0.join("cgroup/kubepods.slice").as_path())
    );
    assert!(cfg.workloads.is_empty() && !cfg.mesh.networks.is_empty());
    let identity = cfg.identity.as_ref().expect("an identity: section");
    assert_eq!(
        identity.node_id.to_string(),
        "spiffe://cluster.local/ns/meshd-system/sa/meshd",
        "every node presents the DaemonSet's service account"
    );
    assert_eq!(
        cfg.peer_auth.mode("shop", 8080),
        meshd::config::MtlsMode::Permissive
    );
    // The parse is strict: the same text with one key misspelt is refused.
    let typo = text.replacen("cni_socket:", "cni_sockt:", 1);
    let refused = parse_config(&typo, &dir).expect_err("a misspelt key was accepted");
    assert!(refused.contains("cni_sockt"), "{refused}");
}

/// `--flag=value` arguments as a map (flags without a value map to "").
fn flags(argv: &Value) -> BTreeMap<String, String> {
    let words = argv.as_sequence().expect("a list of arguments");
    words
        .iter()
        .filter_map(|w| w.as_str()?.strip_prefix("--"))
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (format!("--{k}"), v.to_string()),
            None => (format!("--{w}"), String::new()),
        })
        .collect()
}

/// Whether `meshd SUBCOMMAND --help` documents `flag`.
fn meshd_has_flag(subcommand: &str, flag: &str) -> bool {
    let out = Command::new(meshd_bin())
        .args([subcommand, "--help"])
        .output()
        .expect("run meshd");
    String::from_utf8_lossy(&out.stdout).contains(flag)
}

/// The host path a container path lies on (hostPath mounts at the same path only), or the
/// ConfigMap it comes from.
fn source_of(pod: &Value, container: &Value, path: &Path) -> Option<String> {
    let mounts = container["volumeMounts"].as_sequence()?;
    let mount = mounts
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())?;
    let volumes = pod["volumes"].as_sequence()?;
    let volume = volumes.iter().find(|v| v["name"] == mount["name"])?;
    if let Some(host) = volume["hostPath"]["path"].as_str() {
        return (host == mount["mountPath"].as_str()?).then(|| format!("host {host}"));
    }
    Some(format!(
        "configmap {}",
        volume["configMap"]["name"].as_str()?
    ))
}

/// The DaemonSet's pod spec.
fn daemonset_pod() -> Value {
    let ds = object("daemonset.yaml", "DaemonSet", "meshd");
    let update = &ds["spec"]["updateStrategy"];
    assert_eq!(update["type"], "RollingUpdate");
    assert_eq!(update["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(update["rollingUpdate"]["maxUnavailable"], 0);
    ds["spec"]["template"]["spec"].clone()
}

#[test]
fn the_daemonset_surges_and_runs_meshd_with_its_real_flags() {
    let pod = daemonset_pod();
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    let meshd = &pod["containers"][0];
    assert!(
        meshd["ports"].is_null(),
        "hostPorts would block the surge pod"
    );
    assert_eq!(meshd["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    assert_eq!(meshd["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(meshd["livenessProbe"]["httpGet"]["path"], "/healthz/live");

    let args = flags(&meshd["args"]);
    assert_eq!(meshd["args"][0], "run");
    for flag in args.keys() {
        assert!(meshd_has_flag("run", flag), "meshd run has no {flag}");
    }
    assert!(args.contains_key("--wait-after-handover"), "{args:?}");
    let drain = meshd::config::parse_duration(&args["--drain-timeout"]).unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > drain.as_secs(), "grace {grace}s, drain {drain:?}");

    let install = &pod["initContainers"][0];
    assert_eq!(install["command"][1], "install-cni");
    for flag in flags(&install["command"]).keys() {
        assert!(meshd_has_flag("install-cni", flag), "no {flag}");
    }
}

#[test]
fn the_daemonset_mounts_what_the_config_points_at() {
    let dir = TempDir::new("daemonset");
    let cfg = parse_config(&configmap_text(), &dir).unwrap();
    let pod = daemonset_pod();
    let meshd = &pod["containers"][0];
    let config = flags(&meshd["args"])["--config"].clone();
    assert_eq!(
        source_of(&pod, meshd, Path::new(&config)).as_deref(),
        Some("configmap meshd-config")
    );
    let identity = cfg.identity.as_ref().unwrap();
    let node_files = Path::new("/etc/meshd/node").join(identity.node_cert.file_name().unwrap());
    let pods = &cfg.pods.as_ref().unwrap().settings;
    let on_host = [
        cfg.proxy.pin_dir.as_path(),
        cfg.proxy.state_dir.as_path(),
        pods.cni_socket.as_path(),
        pods.state_dir.as_path(),
        node_files.as_path(),
        Path::new("/sys/fs/cgroup/kubepods.slice"),
    ];
    for path in on_host {
        let source = source_of(&pod, meshd, path);
        assert!(
            source.as_ref().is_some_and(|s| s.starts_with("host ")),
            "{} is not on a hostPath at the same path: {source:?}",
            path.display()
        );
    }
    assert_eq!(
        source_of(&pod, meshd, &cfg.policies[0]).as_deref(),
        Some("configmap meshd-policies")
    );
    // meshd-cni, on the host, dials the socket meshd binds.
    let install = flags(&pod["initContainers"][0]["command"]);
    assert_eq!(Path::new(&install["--socket"]), pods.cni_socket);
}
