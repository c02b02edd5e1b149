//! What a [`crate::TestNet`] leaves on the machine, found by its id: network namespaces named
//! `<id>-*`, the cgroup `<cgroup2>/<id>` with everything below it, and the bpffs directory
//! `<bpffs>/<id>`. The same lookup serves cleanup on drop, the check that cleanup worked, and
//! the sweep of what a killed test run left behind.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::net::{run_ip, PREFIX};

const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Clone, Default)]
pub struct Footprint {
    pub netns: Vec<String>,
    pub cgroup: Option<PathBuf>,
    /// Every cgroup directory below (and including) `cgroup`, deepest first.
    pub cgroups: Vec<PathBuf>,
    pub pids: Vec<i32>,
    pub pin_dir: Option<PathBuf>,
    /// Files and directories named after the id in the temp dir (configs, captures, state).
    pub temp_files: Vec<PathBuf>,
}

impl Footprint {
    /// Finds everything named after `id` that exists now.
    pub fn of_id(id: &str) -> Footprint {
        let ns_prefix = format!("{id}-");
        let netns = list_dir(Path::new(NETNS_DIR))
            .into_iter()
            .filter(|n| n.starts_with(&ns_prefix))
            .collect();
        let cgroup = meshd::sys::mount_of("cgroup2").map(|m| m.join(id));
        let pin_dir = meshd::sys::mount_of("bpf").map(|m| m.join(id));
        let temp = std::env::temp_dir();
        let temp_files = list_dir(&temp)
            .into_iter()
            .filter(|n| n.starts_with(&ns_prefix))
            .map(|n| temp.join(n))
            .collect();
        let mut fp = Footprint {
            netns,
            cgroup: cgroup.clone(),
            pin_dir,
            temp_files,
            ..Default::default()
        };
        if let Some(root) = cgroup.filter(|c| c.exists()) {
            walk_cgroups(&root, &mut fp.cgroups);
            fp.pids = fp.cgroups.iter().flat_map(|c| cgroup_pids(c)).collect();
        }
        fp
    }

    /// Kills every process, then removes cgroups, namespaces (their veths and iptables rules go
    /// with them) and pinned objects. Missing pieces are not errors; the first failure is.
    pub fn remove(&self) -> Result<()> {
        let mut first_error = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                eprintln!("testhosts cleanup: {e:#}");
                first_error.get_or_insert(e);
            }
        };
        if let Some(root) = self.cgroup.as_ref().filter(|c| c.exists()) {
            note(kill_cgroup(root));
            let mut live = Vec::new();
            walk_cgroups(root, &mut live);
            for dir in live {
                note(fs::remove_dir(&dir).with_context(|| format!("rmdir {}", dir.display())));
            }
        }
        for ns in &self.netns {
            if Path::new(NETNS_DIR).join(ns).exists() {
                note(run_ip(&["netns", "del", ns]));
            }
        }
        if let Some(dir) = self.pin_dir.as_ref().filter(|d| d.exists()) {
            note(fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display())));
        }
        for path in &self.temp_files {
            let removed = match path.is_dir() {
                true => fs::remove_dir_all(path),
                false => fs::remove_file(path),
            };
            note(removed.with_context(|| format!("remove {}", path.display())));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// What of this footprint still exists, one line each; empty when all is gone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for ns in &self.netns {
            if Path::new(NETNS_DIR).join(ns).exists() {
                left.push(format!("network namespace {ns}"));
            }
        }
        for dir in self.cgroups.iter().filter(|d| d.exists()) {
            left.push(format!("cgroup {}", dir.display()));
        }
        for pid in self.pids.iter().filter(|p| process_alive(**p)) {
            left.push(format!("process {pid}"));
        }
        if let Some(dir) = self.pin_dir.as_ref().filter(|d| d.exists()) {
            left.push(format!("bpffs directory {}", dir.display()));
        }
        left
    }
}

/// Removes what earlier runs left when they were killed before their cleanup could run: any
/// harness object whose owning test process no longer exists.
pub fn sweep_stale() {
    let mut ids: Vec<String> = Vec::new();
    let mut dirs = vec![PathBuf::from(NETNS_DIR)];
    dirs.extend(meshd::sys::mount_of("cgroup2"));
    dirs.extend(meshd::sys::mount_of("bpf"));
    for dir in dirs {
        for name in list_dir(&dir) {
            if let Some(id) = stale_id(&name) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    }
    for id in ids {
        eprintln!("testhosts: removing {id}, left by a test run that is gone");
        let _ = Footprint::of_id(&id).remove();
    }
}

/// `meshtest-<pid>-<seq>[-...]` of a pid that is not running -> `meshtest-<pid>-<seq>`.
fn stale_id(name: &str) -> Option<String> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid: i32 = parts.next()?.parse().ok()?;
    let seq: u32 = parts.next()?.parse().ok()?;
    let alive = Path::new("/proc").join(pid.to_string()).exists();
    (!alive).then(|| format!("{PREFIX}{pid}-{seq}"))
}

fn kill_cgroup(root: &Path) -> Result<()> {
    let kill_file = root.join("cgroup.kill");
    if kill_file.exists() {
        fs::write(&kill_file, "1").with_context(|| format!("write {}", kill_file.display()))?;
    } else {
        let mut all = Vec::new();
        walk_cgroups(root, &mut all);
        for pid in all.iter().flat_map(|c| cgroup_pids(c)) {
            // SAFETY: kill has no memory-safety preconditions; these pids are in our cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = root.join("cgroup.events");
    while fs::read_to_string(&events).is_ok_and(|e| e.contains("populated 1")) {
        if Instant::now() > deadline {
            anyhow::bail!("processes in {} did not exit within 10 s", root.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Every cgroup directory at and below `dir`, children before parents.
fn walk_cgroups(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk_cgroups(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Running and not a zombie.
pub fn process_alive(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, Some(s) if s != "Z" && s != "X")
}

fn list_dir(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_are_parsed_from_names_and_live_owners_are_kept() {
        let me = std::process::id();
        assert_eq!(
            stale_id(&format!("{PREFIX}{me}-3-n0")),
            None,
            "own process is alive"
        );
        let dead = i32::MAX - 7;
        let expect = format!("{PREFIX}{dead}-3");
        assert_eq!(
            stale_id(&format!("{PREFIX}{dead}-3-hub")),
            Some(expect.clone())
        );
        assert_eq!(stale_id(&expect), Some(expect.clone()));
        assert_eq!(stale_id("other-1-2"), None);
        assert_eq!(stale_id(&format!("{PREFIX}x-1")), None);
    }
}
