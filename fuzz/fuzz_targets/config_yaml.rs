//! meshd's config file: YAML parsing and validation, then what meshd does first with an
//! accepted identity section (mint the node's SVIDs with `svid_ttl`). Errors are fine, panics
//! are not: a value validation accepts must not crash meshd later. The cgroup root is a scratch
//! directory holding cgroup-like directories (`/mesh`, `/mesh/checkout`), so workloads and pods
//! can pass validation and what follows is reached too.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshd::identity::{ca, ca::Issuer, svid};

fn cgroup_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join("meshd-fuzz-cgroups");
        for cgroup in ["mesh", "mesh/checkout"].map(|c| root.join(c)) {
            std::fs::create_dir_all(&cgroup).expect("scratch cgroup directory");
            std::fs::write(cgroup.join("cgroup.procs"), "").expect("scratch cgroup.procs");
        }
        root
    })
}

/// A node CA made once (`meshd ca init` + `issue-node`), as the node certificate would be.
fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("meshd-fuzz-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca::init(&dir, "cluster.local").expect("root CA");
        let hour = Duration::from_secs(3600);
        let (cert, key) = ca::issue_node(&dir, "fuzz", hour).expect("node CA");
        let issuer = Issuer::load(&cert, &key).expect("node CA loads");
        let _ = std::fs::remove_dir_all(&dir);
        issuer
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = meshd::config::parse(text, cgroup_root()) else {
        return;
    };
    if let Some(identity) = &config.identity {
        let _ = svid::mint(issuer(), &identity.node_id, identity.svid_ttl);
    }
});
