//! Live policy: the set in force is published through a `watch` channel; a file change (inotify
//! on the directories that hold the policy paths, so editors' rename-over and ConfigMap symlink
//! swaps are seen) or SIGHUP reloads it. A reload that fails leaves the old set in force and is
//! logged with file, line and reason and counted; connections and requests subscribe to the
//! channel and are decided again when it changes.

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use super::{doc, PolicySet};
use crate::metrics::Metrics;

/// Events settle this long before a reload, so a burst of writes is read once.
const SETTLE: Duration = Duration::from_millis(100);

/// The policy in force and where it comes from.
pub struct Live {
    pub paths: Vec<PathBuf>,
    pub tx: watch::Sender<Arc<PolicySet>>,
}

impl Live {
    /// Loads `paths` (an error here stops start-up: meshd does not start without its policy).
    pub fn load(paths: Vec<PathBuf>) -> Result<Live, doc::PolicyError> {
        let set = PolicySet::new(doc::load(&paths)?);
        let (tx, _) = watch::channel(Arc::new(set));
        Ok(Live { paths, tx })
    }

    pub fn current(&self) -> Arc<PolicySet> {
        self.tx.borrow().clone()
    }

    /// Reads the files again; on success the new set is in force for every new decision.
    pub fn reload(&self, metrics: &Metrics) -> Result<usize, doc::PolicyError> {
        match doc::load(&self.paths) {
            Ok(policies) => {
                let count = policies.len();
                self.tx.send_replace(Arc::new(PolicySet::new(policies)));
                metrics.policy_reload(true);
                metrics.policies.set(count as i64);
                tracing::info!(policies = count, "authorization policy reloaded");
                Ok(count)
            }
            Err(e) => {
                metrics.policy_reload(false);
                tracing::error!(error = %e, "authorization policy reload rejected; the previous policy stays in force");
                Err(e)
            }
        }
    }

    /// Reloads on file changes and SIGHUP, forever. Without paths it only waits.
    pub async fn watch(self: Arc<Self>, metrics: Arc<Metrics>) -> anyhow::Result<()> {
        let mut hup = signal(SignalKind::hangup())?;
        let notify = Watcher::new(&self.paths)?;
        loop {
            tokio::select! {
                _ = hup.recv() => tracing::info!("SIGHUP: reloading authorization policy"),
                r = notify.changed() => r?,
            }
            tokio::time::sleep(SETTLE).await;
            notify.drain();
            let _ = self.reload(&metrics);
        }
    }
}

/// inotify on the directories of the policy paths (and the paths themselves when they are
/// directories).
struct Watcher {
    fd: AsyncFd<RawInotify>,
}

struct RawInotify(Inotify);

impl AsRawFd for RawInotify {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Watcher {
    fn new(paths: &[PathBuf]) -> anyhow::Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        for dir in watched_dirs(paths) {
            inotify
                .add_watch(&dir, flags)
                .map_err(|e| anyhow::anyhow!("watching {}: {e}", dir.display()))?;
        }
        // No safe helper: tokio 1.54's only non-deprecated AsyncFd constructor is the unsafe
        // `register` (`AsyncFd::new` is deprecated as unsound), even for AsFd owners like Inotify.
        // SAFETY: the Inotify owns its descriptor until it is dropped, which happens only with
        // the AsyncFd that holds it; `as_raw_fd` always returns that descriptor.
        let fd = unsafe { AsyncFd::register(RawInotify(inotify)) }?;
        Ok(Watcher { fd })
    }

    /// Waits for at least one event.
    async fn changed(&self) -> anyhow::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Discards events that arrived while settling.
    fn drain(&self) {
        while matches!(self.fd.get_ref().0.read_events(), Ok(e) if !e.is_empty()) {}
    }
}

fn watched_dirs(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in paths {
        if p.is_dir() {
            dirs.push(p.clone());
        }
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        dirs.push(parent.unwrap_or(Path::new(".")).to_path_buf());
    }
    dirs.sort();
    dirs.dedup();
    dirs
}
