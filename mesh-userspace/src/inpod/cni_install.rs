//! `meshd install-cni` / `uninstall-cni`: chain `meshd-cni` after the node's network plugin in
//! its existing conflist (the DaemonSet's init step) and copy the plugin binary into the CNI bin
//! directory. Idempotent; uninstall removes only the entry and binary install added.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::cni::PLUGIN_TYPE;

/// The node's conflist: the first `*.conflist` in the directory, by name (as runtimes pick).
fn conflist(conf_dir: &Path) -> Result<PathBuf> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("read {}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    match lists.into_iter().next() {
        Some(p) => Ok(p),
        None => bail!(
            "no *.conflist in {}: install the node's network plugin first",
            conf_dir.display()
        ),
    }
}

fn plugins<'a>(doc: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>> {
    doc["plugins"]
        .as_array_mut()
        .with_context(|| format!("{}: no \"plugins\" list", path.display()))
}

fn write_atomically(path: &Path, doc: &Value) -> Result<()> {
    let tmp = path.with_extension("conflist.meshd-tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(doc)?)?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

/// Adds the plugin (last in the chain) and its binary. Returns the conflist edited.
pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    plugin_bin: &Path,
    socket: &Path,
) -> Result<PathBuf> {
    let path = conflist(conf_dir)?;
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    std::fs::create_dir_all(bin_dir)?;
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = target.with_extension("meshd-tmp");
    std::fs::copy(plugin_bin, &tmp)
        .with_context(|| format!("copy {} to {}", plugin_bin.display(), bin_dir.display()))?;
    std::fs::rename(&tmp, &target)?;
    let list = plugins(&mut doc, &path)?;
    list.retain(|p| p["type"] != PLUGIN_TYPE);
    list.push(json!({"type": PLUGIN_TYPE, "meshd_socket": socket}));
    write_atomically(&path, &doc)?;
    Ok(path)
}

/// Removes the plugin entry and binary (nothing else). Returns whether anything was removed.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<bool> {
    let mut removed = std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)).is_ok();
    let Ok(path) = conflist(conf_dir) else {
        return Ok(removed);
    };
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let list = plugins(&mut doc, &path)?;
    let before = list.len();
    list.retain(|p| p["type"] != PLUGIN_TYPE);
    if list.len() != before {
        write_atomically(&path, &doc)?;
        removed = true;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_chains_once_and_uninstall_restores_the_conflist() {
        let dir = std::env::temp_dir().join(format!("meshd-cni-test-{}", std::process::id()));
        let (conf, bin) = (dir.join("conf"), dir.join("bin"));
        std::fs::create_dir_all(&conf).unwrap();
        let original = json!({"cniVersion": "1.0.0", "name": "pods",
            "plugins": [{"type": "bridge", "bridge": "cni0"}]});
        let list = conf.join("10-pods.conflist");
        std::fs::write(&list, serde_json::to_vec_pretty(&original).unwrap()).unwrap();
        let exe = std::env::current_exe().unwrap();
        let socket = Path::new("/run/meshd/cni.sock");
        install(&conf, &bin, &exe, socket).unwrap();
        install(&conf, &bin, &exe, socket).unwrap();
        let doc: Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
        let types: Vec<&str> = doc["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", PLUGIN_TYPE]);
        assert!(bin.join(PLUGIN_TYPE).exists());
        assert!(uninstall(&conf, &bin).unwrap());
        let doc: Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
        assert_eq!(doc, original);
        assert!(!uninstall(&conf, &bin).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
