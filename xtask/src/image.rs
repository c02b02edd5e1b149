//! `cargo xtask image`: meshd's container image, `FROM scratch` (deploy/Containerfile): meshd and
//! meshd-cni in /usr/local/bin, the shared libraries `ldd` lists for them and the dynamic
//! loader, nothing else (no shell). podman builds it under a configuration of its own, never
//! the machine's (TOOLCHAIN.md items 9 and 10): `CONTAINERS_CONF` points at a file in the store
//! directory (runc, cgroupfs, ulimits this machine allows, no journald events), and the store
//! has its own `--root` and `--runroot`. The store's layout (`containers.conf`, `root/`,
//! `runroot/`) is what tests/tests/deploy.rs runs the image with.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::cmd;

/// The image's repository; the tag is meshd's version.
pub const REPOSITORY: &str = "localhost/meshd";
/// Where the binaries go in the image.
const BIN_DIR: &str = "usr/local/bin";
const BINARIES: [&str; 2] = ["meshd", "meshd-cni"];

/// What to package and where podman keeps the image.
pub struct Request {
    /// The directory holding meshd and meshd-cni (target/release after `cargo xtask build`).
    pub bin_dir: PathBuf,
    /// podman's configuration and storage for this image.
    pub store: PathBuf,
}

/// Builds the image; returns its name (`localhost/meshd:<version>`).
pub fn build(req: &Request) -> Result<String> {
    let version = version(&req.bin_dir)?;
    let name = format!("{REPOSITORY}:{version}");
    let store = absolute(&req.store)?;
    let podman = Podman::new(&store)?;
    let context = store.join("context");
    stage(&req.bin_dir, &context.join("rootfs"))?;
    let containerfile = cmd::workspace_root().join("deploy/Containerfile");
    let mut build = podman.command();
    build
        .args(["build", "--pull=never", "--layers=false", "--tag", &name])
        .arg(format!("--build-arg=VERSION={version}"))
        .arg("--file")
        .arg(&containerfile)
        .arg(&context);
    cmd::status(build)?;
    std::fs::remove_dir_all(&context)?;
    // The previous build's image, untagged now (only this store's).
    podman.output(&["image", "prune", "--force"])?;
    let size = podman.output(&["image", "inspect", "--format", "{{.Size}}", &name])?;
    let bytes: u64 = size.trim().parse().context("podman image inspect: size")?;
    println!(
        "xtask image: {name}: {:.1} MB ({bytes} bytes)",
        bytes as f64 / 1e6
    );
    println!(
        "xtask image: run it: CONTAINERS_CONF={conf} podman --root {root} --runroot {run} \
         run --rm --network none {name} doctor",
        conf = podman.conf.display(),
        root = store.join("root").display(),
        run = store.join("runroot").display(),
    );
    Ok(name)
}

/// meshd's own word for its version (`meshd version` prints `meshd X.Y.Z`).
fn version(bin_dir: &Path) -> Result<String> {
    let meshd = bin_dir.join("meshd");
    let out = cmd::output(&meshd.display().to_string(), &["version"])?;
    match out.trim().strip_prefix("meshd ") {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => bail!("`{} version` printed {out:?}", meshd.display()),
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(std::env::current_dir()?.join(path))
}

/// The image's file tree: the binaries (debug info stripped from the copies) and every shared
/// object they load, at the paths the loader looks for them.
fn stage(bin_dir: &Path, rootfs: &Path) -> Result<()> {
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs)?;
    }
    let bins = rootfs.join(BIN_DIR);
    std::fs::create_dir_all(&bins)?;
    let mut libraries = Vec::new();
    for name in BINARIES {
        let source = bin_dir.join(name);
        if !source.is_file() {
            bail!("{} is not built", source.display());
        }
        let target = bins.join(name);
        std::fs::copy(&source, &target)?;
        let strip = Command::new("strip")
            .arg("--strip-debug")
            .arg(&target)
            .status();
        if !strip.is_ok_and(|s| s.success()) {
            println!("xtask image: strip failed on {name}: copied with its debug info");
        }
        for lib in linked_libraries(&source)? {
            if !libraries.contains(&lib) {
                libraries.push(lib);
            }
        }
    }
    for lib in &libraries {
        let target = rootfs.join(lib.strip_prefix("/")?);
        std::fs::create_dir_all(target.parent().expect("a library path has a parent"))?;
        // The file itself, not a symlink: the image has nothing for a link to point at.
        std::fs::copy(lib, &target).with_context(|| format!("copy {}", lib.display()))?;
    }
    let listed: Vec<String> = libraries.iter().map(|l| l.display().to_string()).collect();
    println!("xtask image: with {}", listed.join(", "));
    Ok(())
}

/// The absolute paths `ldd` lists for `binary`: the libraries and the dynamic loader.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::output("ldd", &[&binary.display().to_string()])?;
    let libs: Vec<PathBuf> = out
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    if !libs
        .iter()
        .any(|l| l.to_string_lossy().contains("ld-linux"))
    {
        bail!(
            "ldd lists no dynamic loader for {}: {out}",
            binary.display()
        );
    }
    Ok(libs)
}

/// podman with the store's own configuration and storage.
struct Podman {
    conf: PathBuf,
    store: PathBuf,
}

impl Podman {
    /// Writes the store's containers.conf (never /etc/containers).
    fn new(store: &Path) -> Result<Podman> {
        for sub in ["root", "runroot", "tmp", "net.d"] {
            std::fs::create_dir_all(store.join(sub))?;
        }
        let conf = store.join("containers.conf");
        let text = format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n\
             tmp_dir = \"{s}/tmp\"\n\
             [network]\nnetwork_config_dir = \"{s}/net.d\"\n",
            s = store.display()
        );
        std::fs::write(&conf, text)?;
        Ok(Podman {
            conf,
            store: store.to_path_buf(),
        })
    }

    fn command(&self) -> Command {
        let mut c = cmd::command("podman");
        c.env("CONTAINERS_CONF", &self.conf)
            .env("TMPDIR", self.store.join("tmp"))
            .arg("--root")
            .arg(self.store.join("root"))
            .arg("--runroot")
            .arg(self.store.join("runroot"));
        c
    }

    fn output(&self, args: &[&str]) -> Result<String> {
        let mut c = self.command();
        c.args(args);
        cmd::output_of(c)
    }
}
