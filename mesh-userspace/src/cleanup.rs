//! `meshd cleanup`: remove what a meshd that did not stop cleanly (kill -9, crash) left behind.
//! meshd pins every link and map it creates under one bpffs directory, so removing that
//! directory detaches its programs; iptables chains are found by their MESH_ names.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Directory name under the bpffs mount that holds everything meshd pins.
pub const PIN_DIR_NAME: &str = "meshd";

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

/// Every pinned object and directory under `dir` (none when it does not exist).
pub fn pins(dir: &Path) -> Result<std::collections::HashSet<PathBuf>> {
    let mut all = Vec::new();
    if dir.exists() {
        collect(dir, &mut all)?;
    }
    Ok(all.into_iter().collect())
}

/// Removes what was pinned under `dir` since [`pins`] returned `before` (deepest first).
pub fn remove_pins_added(dir: &Path, before: &std::collections::HashSet<PathBuf>) -> Result<()> {
    let mut added: Vec<PathBuf> = pins(dir)?.difference(before).cloned().collect();
    added.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in added {
        let removed = match path.is_dir() {
            true => std::fs::remove_dir(&path),
            false => std::fs::remove_file(&path),
        };
        removed.with_context(|| format!("remove {}", path.display()))?;
    }
    if before.is_empty() && dir.exists() {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
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

/// Runs `meshd cleanup`: pinned links and maps under `pin_dir` (default `<bpffs>/meshd`), and
/// meshd's iptables chains in this network namespace. Reports what it removed.
pub fn run(pin_dir: Option<PathBuf>, state_dir: Option<PathBuf>) -> Result<()> {
    let dir = pin_dir.unwrap_or_else(crate::config::default_pin_dir);
    let removed = remove_pins(&dir)?;
    for path in &removed {
        println!("removed {}", path.display());
    }
    println!(
        "{} pinned objects removed from {}",
        removed.len(),
        dir.display()
    );
    let state_dir = state_dir.unwrap_or_else(crate::config::default_state_dir);
    match iptables_fallback::Iptables::detect() {
        Ok(ipt) => {
            let n = ipt.remove().context("remove meshd's iptables rules")?;
            println!("{n} iptables chains and jumps removed");
            remove_pod_rules(&ipt, &state_dir)?;
        }
        Err(e) => println!("iptables not usable here ({e}): no rules to remove"),
    }
    let record = crate::sys::reserved_ports_record(&state_dir)?;
    let released = crate::sys::release_reserved_ports(&record)?;
    println!("{} reserved ports released {released:?}", released.len());
    Ok(())
}

/// Rules meshd put inside the pods it recorded (`pods.state_dir/pods.json`) that still exist.
fn remove_pod_rules(ipt: &iptables_fallback::Iptables, state_dir: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(state_dir.join("pods.json")) else {
        return Ok(());
    };
    let pods: Vec<crate::inpod::protocol::PodInfo> = serde_json::from_str(&text)?;
    for pod in pods.iter().filter(|p| p.netns.exists()) {
        let n = ipt.in_netns(&pod.netns).remove()?;
        println!("pod {}: {n} iptables chains and jumps removed", pod.name);
    }
    Ok(())
}
