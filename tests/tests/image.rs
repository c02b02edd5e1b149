//! meshd's container image (`cargo xtask image`, deploy/Containerfile): the same packaging, of
//! this build's meshd and meshd-cni, into a podman store of the test's own (its own
//! containers.conf, root and run root, and a cgroup parent of its own, all removed on every exit
//! path); the image runs `meshd doctor` under podman with no network (unprivileged it finds the
//! bpf syscall denied; privileged, as the DaemonSet runs it, ebpf mode can run) and has no
//! shell.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use testhosts::{meshd_bin, require_privileges, sibling_binary};

fn tools() -> Result<(), String> {
    if !meshd::sys::is_root() {
        return Err("needs root (rootful podman)".into());
    }
    testhosts::require_tools(&["podman", "runc", "conmon", "ldd"]).map_err(|e| e.to_string())
}

/// A podman store made by `xtask image --store`: removed with everything podman left in it.
struct Store(PathBuf);

/// The test's own name: its store directory and its containers' cgroup parent.
fn own_name() -> String {
    format!("meshd-image-{}", std::process::id())
}

impl Store {
    fn new() -> Store {
        let store = Store(std::env::temp_dir().join(own_name()));
        store.remove();
        store
    }

    /// `podman run --rm` of the image, with no network, in the test's cgroup parent.
    fn run(&self, options: &[&str], image: &str, args: &[&str]) -> Output {
        let parent = format!("--cgroup-parent=/{}", own_name());
        let mut c = self.podman();
        c.args(["run", "--rm", "--network", "none", &parent])
            .args(options)
            .arg(image)
            .args(args);
        c.output().expect("run podman")
    }

    /// podman with the store's configuration (the layout `xtask image` writes).
    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.0.join("containers.conf"))
            .env("TMPDIR", self.0.join("tmp"))
            .arg("--root")
            .arg(self.0.join("root"))
            .arg("--runroot")
            .arg(self.0.join("runroot"));
        c
    }

    fn remove(&self) {
        if self.0.join("containers.conf").exists() {
            let _ = self.podman().args(["rm", "-fa"]).output();
            let _ = self.podman().args(["rmi", "-fa"]).output();
        }
        testhosts::podman::unmount_below(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
        // The containers' (and conmon's) cgroups, in every hierarchy, deepest first.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                remove_cgroup_tree(&h.path().join(own_name()));
            }
        }
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

impl Drop for Store {
    fn drop(&mut self) {
        self.remove();
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `xtask image` packaging the binaries in `bin_dir`; the image's name and the size line.
fn build_image(store: &Store, bin_dir: &Path) -> (String, String) {
    let out = Command::new(sibling_binary("xtask"))
        .arg("image")
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--store")
        .arg(&store.0)
        .output()
        .expect("run xtask image");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let line = log
        .lines()
        .find(|l| l.starts_with("xtask image: localhost/meshd:") && l.contains(" MB "))
        .unwrap_or_else(|| panic!("no size line:\n{log}"))
        .to_string();
    let name = line
        .trim_start_matches("xtask image: ")
        .split(": ")
        .next()
        .unwrap()
        .to_string();
    (name, line)
}

#[test]
fn the_image_runs_meshd_doctor_under_podman() {
    require_privileges!(tools());
    let store = Store::new();
    let bin_dir = meshd_bin().parent().unwrap().to_path_buf();
    let (name, size) = build_image(&store, &bin_dir);
    eprintln!("figure: {size}");
    let version = Command::new(meshd_bin()).arg("version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout)
        .trim()
        .replace("meshd ", "");
    assert_eq!(name, format!("localhost/meshd:{version}"));

    // Unprivileged, doctor finds the bpf syscall denied (and exits 1: no mode can run); what
    // counts is that meshd ran in the image and probed every capability.
    let report = text(&store.run(&[], &name, &["doctor"]));
    for id in meshd::doctor::check_ids() {
        assert!(
            report.contains(&format!(" {id} ")),
            "doctor did not report {id}:\n{report}"
        );
    }
    assert!(report.contains("MISSING bpf-syscall"), "{report}");
    assert!(report.contains("auto picks: "), "{report}");
    eprintln!("meshd doctor in the image, unprivileged:\n{report}");
    // Privileged, as the DaemonSet runs it: ebpf mode can run (iptables cannot: no iptables
    // in the image).
    let privileged = store.run(&["--privileged"], &name, &["doctor"]);
    let report = text(&privileged);
    assert!(privileged.status.success(), "{report}");
    assert!(report.contains("mode ebpf    : can run"), "{report}");
    assert!(report.contains("auto picks: ebpf"), "{report}");

    let shell = store.run(&["--entrypoint", "/bin/sh"], &name, &["-c", "true"]);
    assert!(
        !shell.status.success(),
        "the image has a shell: {}",
        text(&shell)
    );
    // The CNI plugin install-cni copies to the node: it runs and answers the runtime's VERSION.
    let plugin = [
        "--env",
        "CNI_COMMAND=VERSION",
        "--entrypoint",
        "/usr/local/bin/meshd-cni",
    ];
    let cni = store.run(&plugin, &name, &[]);
    assert!(
        cni.status.success() && text(&cni).contains("supportedVersions"),
        "meshd-cni did not run: {}",
        text(&cni)
    );
}
