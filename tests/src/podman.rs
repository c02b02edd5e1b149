//! Real pods for the tests: Kubernetes Pod YAML run by podman (`podman kube play`, runc, the
//! containernetworking bridge and host-local plugins) inside a test node. Each node gets its own
//! podman storage root, run root and CNI configuration (a bridge on 198.19.<node>.0/24, never
//! another range; routes between nodes come from `handpods::route_pod_subnets`), all in a temp
//! directory named after the net, and podman runs in the node's network namespace through
//! `nsenter --net` (not `ip netns exec`, which remounts /sys and hides the cgroup hierarchies).
//! podman puts each pod's cgroup at `/libpod_parent/<pod id>` below the cgroup v2 root (kube
//! play has no cgroup-parent option): that is the `pods.cgroup_parent` meshd is given. Pods are
//! removed, overlay mounts unmounted and directories deleted when the `Podman` is dropped.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{process::Process, sibling_binary, TestNet};

/// The CNI network every test pod joins.
pub const NETWORK: &str = "meshnet";
/// Where podman puts pods' cgroups, relative to the cgroup v2 root.
pub const CGROUP_PARENT: &str = "libpod_parent";
const IMAGE: &str = "localhost/meshtest-tools:1";

/// podman for one test node.
pub struct Podman {
    dir: PathBuf,
    netns: String,
    /// Kept for nodes' processes that run podman (exec): their host cgroup.
    net_cgroup: PathBuf,
    node: crate::TestNode,
}

/// A pod podman runs.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub pod_id: String,
    pub infra_id: String,
    pub ip: Ipv4Addr,
    pub yaml: PathBuf,
}

impl Podman {
    /// A podman of its own for `node`, with the test image imported.
    pub fn new(net: &TestNet, node: usize) -> Result<Podman> {
        crate::require_tools(&["podman", "runc", "catatonit", "busybox"])?;
        let dir = std::env::temp_dir().join(format!("{}-n{node}-podman", net.id()));
        for sub in ["net.d", "cnibin", "root", "runroot"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{d}/cnibin\", \"/usr/lib/cni\"]\n\
             network_config_dir = \"{d}/net.d\"\ndefault_network = \"{NETWORK}\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("containers.conf"), conf)?;
        let conflist = serde_json::json!({"cniVersion": "1.0.0", "name": NETWORK, "plugins": [
            {"type": "bridge", "bridge": "podbr0", "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("198.19.{node}.0/24")}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}}]});
        std::fs::write(dir.join("net.d/10-meshnet.conflist"), conflist.to_string())?;
        let mount = meshd::sys::ensure_cgroup2()?;
        std::fs::create_dir_all(mount.join(CGROUP_PARENT))?;
        let podman = Podman {
            dir,
            netns: net.node(node).netns.clone(),
            net_cgroup: net.cgroup().join(format!("host-n{node}")),
            node: net.node(node).clone(),
        };
        podman.import_image()?;
        Ok(podman)
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cnibin")
    }

    /// The podman command line meshd runs to read pods' metadata (`pods.podman`).
    pub fn argv(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "env".into(),
            format!("CONTAINERS_CONF={d}/containers.conf"),
            "podman".into(),
            "--root".into(),
            format!("{d}/root"),
            "--runroot".into(),
            format!("{d}/runroot"),
        ]
    }

    fn command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .args(self.argv());
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.command().args(args).output().context("run podman")?;
        if !out.status.success() {
            bail!(
                "podman {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The test image: static busybox and testhosts-tool (with the libraries it links).
    fn import_image(&self) -> Result<()> {
        let tar = image_tarball(&self.dir)?;
        self.run(&["import", tar.to_str().unwrap(), IMAGE])
            .map(|_| ())
    }

    /// Runs a Pod YAML (`kube play`); errors carry podman's stderr.
    pub fn play(&self, name: &str, yaml: &str) -> Result<Pod> {
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml)?;
        let net = format!("--network={NETWORK}");
        self.run(&["kube", "play", &net, path.to_str().unwrap()])?;
        let inspect: Value = serde_json::from_str(&self.run(&["pod", "inspect", name])?)?;
        let inspect = inspect
            .as_array()
            .and_then(|a| a.first())
            .unwrap_or(&inspect)
            .clone();
        let pod_id = inspect["Id"].as_str().unwrap_or_default().to_string();
        let infra_id = inspect["InfraContainerID"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let infra: Value = serde_json::from_str(&self.run(&["inspect", &infra_id])?)?;
        let ip = infra[0]["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("pod {name} has no address on {NETWORK}"))?;
        Ok(Pod {
            name: name.into(),
            pod_id,
            infra_id,
            ip,
            yaml: path,
        })
    }

    /// Starts `argv` in container `container` of a pod (`podman exec`: the pod's netns and
    /// cgroup); the process's output is podman's.
    pub fn exec(&self, container: &str, argv: &[&str]) -> Result<Process> {
        let mut full: Vec<String> =
            vec!["nsenter".into(), format!("--net=/run/netns/{}", self.netns)];
        full.extend(self.argv());
        full.extend(["exec".into(), container.into()]);
        full.extend(argv.iter().map(|s| s.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        Process::spawn(&self.node, &self.net_cgroup, &full)
    }

    /// Deletes a pod (the runtime calls the CNI DEL).
    pub fn down(&self, pod: &Pod) -> Result<()> {
        self.run(&["kube", "play", "--down", pod.yaml.to_str().unwrap()])?;
        remove_pod_cgroups(&pod.pod_id);
        Ok(())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // podman leaves pods' cgroups in the hierarchies it does not manage (unified, systemd).
        let pods = self
            .run(&["pod", "ps", "-q", "--no-trunc"])
            .unwrap_or_default();
        let _ = self.run(&["pod", "rm", "-fa"]);
        let _ = self.run(&["rm", "-fa"]);
        unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        for id in pods.split_whitespace() {
            remove_pod_cgroups(id);
        }
    }
}

/// Removes a pod's cgroup directories (deepest first) from every hierarchy, then the parent if
/// it is empty.
fn remove_pod_cgroups(pod_id: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let parent = h.path().join(CGROUP_PARENT);
        remove_cgroup_tree(&parent.join(pod_id));
        let _ = std::fs::remove_dir(&parent);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for c in children.flatten().filter(|c| c.path().is_dir()) {
            remove_cgroup_tree(&c.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Lazily unmounts every mount below `dir` (podman's overlays and its netns/shm mounts).
pub fn unmount_below(dir: &Path) {
    let prefix = dir.display().to_string();
    let mut points: Vec<PathBuf> = meshd::sys::mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.display().to_string().starts_with(&prefix))
        .collect();
    points.sort();
    for p in points.iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// A tarball with busybox and testhosts-tool, in `dir`.
fn image_tarball(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("image");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    for tool in ["sh", "sleep", "nc", "ss", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool))?;
    }
    let tool = sibling_binary("testhosts-tool");
    std::fs::copy(&tool, root.join("bin/testhosts-tool"))?;
    for lib in linked_libraries(&tool)? {
        let target = root.join(lib.strip_prefix("/")?);
        std::fs::create_dir_all(target.parent().unwrap())?;
        std::fs::copy(&lib, &target)?;
    }
    let tar = root.with_extension("tar");
    let ok = Command::new("tar")
        .args([
            "-C",
            root.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ])
        .status()?
        .success();
    std::fs::remove_dir_all(&root)?;
    anyhow::ensure!(ok, "tar of the test image failed");
    Ok(tar)
}

/// The shared libraries `ldd` lists for `binary` (absolute paths).
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(|w| std::fs::canonicalize(w).map(|_| PathBuf::from(w)))
        .collect::<std::io::Result<Vec<_>>>()?)
}

/// A Pod YAML with one container per `(name, argv)`, annotations carrying the identity podman
/// would otherwise drop (see meshd's `inpod::metadata`).
pub fn pod_yaml(
    name: &str,
    namespace: &str,
    service_account: &str,
    labels: &[(&str, &str)],
    containers: &[(&str, &[&str])],
) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let mut yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels:\n{labels}    meshtest: \"1\"\n  annotations:\n    meshd.io/namespace: {namespace}\n    \
         meshd.io/service-account: {service_account}\nspec:\n  serviceAccountName: \
         {service_account}\n  containers:\n"
    );
    for (c, argv) in containers {
        let argv: Vec<String> = argv.iter().map(|a| format!("\"{a}\"")).collect();
        yaml.push_str(&format!(
            "  - name: {c}\n    image: {IMAGE}\n    command: [{}]\n",
            argv.join(", ")
        ));
    }
    yaml
}
