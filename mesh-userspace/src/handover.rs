//! Restarts without a gap: a new meshd takes the listening sockets of the one it replaces.
//!
//! Every listener meshd serves (the node's :15001/:15006/:15008, the metrics, health and admin
//! ports, the CNI socket, each pod's listeners inside the pod) is made through [`Sockets`] under
//! a stable name. A running meshd answers on `state_dir/handover.<netns inode>.sock` (a
//! SOCK_SEQPACKET unix socket, root only): a successor that connects sends `take`, receives every
//! live listener with its name (SCM_RIGHTS), sets itself up around them (the same sockets: their
//! queues, sk_lookup's and the pods' socket maps keep pointing at them) and sends `serving`. Only
//! then does the predecessor stop accepting, and drain. A successor that goes away before
//! `serving` changes nothing: the predecessor keeps serving.
//!
//! Connections arriving meanwhile are never refused: both processes accept from the same queues
//! until `serving`, and the queues hold what arrives while neither accepts.

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use nix::{
    errno::Errno,
    sys::{
        socket::{
            self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags,
            SockFlag, SockType, UnixAddr,
        },
        time::TimeVal,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where meshd is in its life; only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Stopping (SIGTERM, `/quitquitquit`): no new connections are accepted; the listening
    /// sockets stay open for a successor until meshd exits.
    Draining,
    /// A successor serves the listeners: this meshd accepts nothing any more, admin included.
    HandedOver,
}

/// Sockets handed over in one message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 64;
/// How long a successor may take between receiving the sockets and serving them.
const SUCCESSOR_SETUP: Duration = Duration::from_secs(120);
/// How long one step of the exchange may take otherwise.
const STEP: Duration = Duration::from_secs(10);

/// One message of the predecessor: names of the sockets it carries, in order.
#[derive(Serialize, Deserialize)]
struct Batch {
    names: Vec<String>,
    done: bool,
}

type Live = Weak<dyn AsFd + Send + Sync>;

/// The listening sockets of this meshd, by name; those a predecessor handed over until used.
pub struct Sockets {
    inherited: Mutex<HashMap<String, OwnedFd>>,
    live: Mutex<Vec<(String, Live)>>,
    /// The connection to the predecessor, until `serving` is sent on it.
    predecessor: Mutex<Option<OwnedFd>>,
    phase: watch::Sender<Phase>,
    path: PathBuf,
    /// The inode of the socket file this meshd bound (a successor replaces the file).
    bound: Mutex<Option<u64>>,
    /// Every live listener, once draining: kept open (with what queues on them) for a
    /// successor after the accept loops that owned them end, until this meshd exits.
    held: Mutex<Vec<Arc<dyn AsFd + Send + Sync>>>,
}

impl Sockets {
    /// Takes the listeners of a meshd running in this network namespace, if there is one.
    pub fn start(state_dir: &Path) -> Result<Arc<Sockets>> {
        let path = socket_path(state_dir)?;
        let (predecessor, inherited) = match receive(&path)? {
            Some((conn, sockets)) => {
                let names: Vec<&String> = sockets.keys().collect();
                tracing::info!(sockets = ?names, "took the listening sockets of the running meshd");
                (Some(conn), sockets)
            }
            None => (None, HashMap::new()),
        };
        Ok(Arc::new(Sockets {
            inherited: Mutex::new(inherited),
            live: Mutex::default(),
            predecessor: Mutex::new(predecessor),
            phase: watch::Sender::new(Phase::Serving),
            path,
            bound: Mutex::default(),
            held: Mutex::default(),
        }))
    }

    /// Whether a running meshd handed its sockets to this one.
    pub fn has_predecessor(&self) -> bool {
        lock(&self.predecessor).is_some()
    }

    /// The TCP listener called `name`: the predecessor's if it handed one over, else `make`'s.
    pub fn tcp(
        &self,
        name: &str,
        make: impl FnOnce() -> Result<std::net::TcpListener>,
    ) -> Result<Arc<tokio::net::TcpListener>> {
        let std = match self.take(name) {
            Some(fd) => std::net::TcpListener::from(fd),
            None => make()?,
        };
        std.set_nonblocking(true)?;
        let listener = Arc::new(tokio::net::TcpListener::from_std(std)?);
        self.register(name, listener.clone());
        Ok(listener)
    }

    /// The unix listener called `name` (the CNI socket), like [`Sockets::tcp`].
    pub fn unix(
        &self,
        name: &str,
        make: impl FnOnce() -> Result<std::os::unix::net::UnixListener>,
    ) -> Result<Arc<tokio::net::UnixListener>> {
        let std = match self.take(name) {
            Some(fd) => std::os::unix::net::UnixListener::from(fd),
            None => make()?,
        };
        std.set_nonblocking(true)?;
        let listener = Arc::new(tokio::net::UnixListener::from_std(std)?);
        self.register(name, listener.clone());
        Ok(listener)
    }

    fn take(&self, name: &str) -> Option<OwnedFd> {
        lock(&self.inherited).remove(name)
    }

    fn register(&self, name: &str, socket: Arc<dyn AsFd + Send + Sync>) {
        let mut live = lock(&self.live);
        live.retain(|(n, s)| n != name && s.strong_count() > 0);
        live.push((name.to_string(), Arc::downgrade(&socket)));
    }

    /// This meshd serves: the predecessor (if any) stops accepting and drains; sockets it
    /// handed over that this configuration does not use are closed; from now on this meshd hands
    /// its own sockets to a successor.
    pub fn serving(self: &Arc<Self>) -> Result<()> {
        if let Some(conn) = lock(&self.predecessor).take() {
            send(&conn, b"serving", &[]).context("tell the previous meshd to stop accepting")?;
        }
        let unused: Vec<String> = lock(&self.inherited).drain().map(|(n, _)| n).collect();
        if !unused.is_empty() {
            tracing::info!(sockets = ?unused, "closed handed-over sockets this meshd does not serve");
        }
        let listener = bind(&self.path)?;
        *lock(&self.bound) = Some(inode(&self.path)?);
        let me = self.clone();
        std::thread::Builder::new()
            .name("meshd-handover".into())
            .spawn(move || me.answer_successors(listener))?;
        Ok(())
    }

    /// Removes this meshd's handover socket file at exit, unless a successor replaced it.
    pub fn close(&self) {
        if lock(&self.bound).is_some_and(|ours| inode(&self.path).ok() == Some(ours)) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves to `phase` (never back). Draining holds every live listener first, so the loops
    /// that stop accepting on this change do not close them.
    pub fn enter(&self, phase: Phase) {
        if phase >= Phase::Draining && self.phase() < Phase::Draining {
            let live = self.live().into_iter().map(|(_, s)| s).collect();
            *lock(&self.held) = live;
        }
        self.phase.send_if_modified(|now| {
            let later = phase > *now;
            if later {
                *now = phase;
            }
            later
        });
    }

    /// Resolves once meshd has reached `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|now| *now >= phase).await;
    }

    /// Every live listener with its name, as strong references.
    fn live(&self) -> Vec<(String, Arc<dyn AsFd + Send + Sync>)> {
        lock(&self.live)
            .iter()
            .filter_map(|(n, s)| Some((n.clone(), s.upgrade()?)))
            .collect()
    }

    fn answer_successors(&self, listener: OwnedFd) {
        let listener = socket2::Socket::from(listener);
        loop {
            let conn = match listener.accept() {
                Ok((conn, _)) => OwnedFd::from(conn),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "handover socket failed; no successor can take over");
                    return;
                }
            };
            if let Err(e) = self.hand_over(&conn) {
                tracing::warn!(error = %format!("{e:#}"), "handover to a new meshd failed; still serving");
            }
        }
    }

    /// One successor: check it is root, send every live listener, wait for `serving`.
    fn hand_over(&self, conn: &OwnedFd) -> Result<()> {
        let cred = socket::getsockopt(conn, sockopt::PeerCredentials)?;
        if cred.uid() != nix::unistd::geteuid().as_raw() {
            bail!(
                "refused a handover to uid {} (pid {})",
                cred.uid(),
                cred.pid()
            );
        }
        if self.phase() == Phase::HandedOver {
            bail!("already handed over to another meshd");
        }
        timeout(conn, STEP)?;
        let mut buf = [0u8; 16];
        let (n, _) = recv(conn, &mut buf)?;
        if &buf[..n] != b"take" {
            bail!(
                "unexpected request {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        let live = self.live();
        let mut chunks = live.chunks(FDS_PER_MESSAGE).peekable();
        if chunks.peek().is_none() {
            send_batch(conn, &[], true)?;
        }
        while let Some(chunk) = chunks.next() {
            send_batch(conn, chunk, chunks.peek().is_none())?;
        }
        tracing::info!(
            sockets = live.len(),
            pid = cred.pid(),
            "listening sockets handed to a new meshd"
        );
        timeout(conn, SUCCESSOR_SETUP)?;
        match recv(conn, &mut buf) {
            Ok((n, _)) if &buf[..n] == b"serving" => {
                tracing::info!("the new meshd serves: no longer accepting, draining");
                self.enter(Phase::HandedOver);
                Ok(())
            }
            Ok((0, _)) => bail!("the new meshd went away before serving"),
            Ok((n, _)) => bail!("unexpected answer {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => Err(e).context("waiting for the new meshd to serve"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The handover socket of this network namespace (meshd's of several namespaces may share a
/// state directory; each namespace's listeners are its own).
fn socket_path(state_dir: &Path) -> Result<PathBuf> {
    let ns = std::fs::metadata("/proc/thread-self/ns/net").context("this network namespace")?;
    let ino = std::os::linux::fs::MetadataExt::st_ino(&ns);
    Ok(state_dir.join(format!("handover.{ino}.sock")))
}

fn inode(path: &Path) -> Result<u64> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    Ok(std::os::linux::fs::MetadataExt::st_ino(&meta))
}

fn seqpacket() -> Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Listens on `path`, replacing a predecessor's socket file (its own listener lives on,
/// unreachable, until it exits).
fn bind(path: &Path) -> Result<OwnedFd> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let fd = seqpacket()?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)
        .with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    socket::listen(&fd, Backlog::new(4)?)?;
    Ok(fd)
}

/// The predecessor's connection and sockets, or `None` when no meshd answers at `path`.
fn receive(path: &Path) -> Result<Option<(OwnedFd, HashMap<String, OwnedFd>)>> {
    let conn = seqpacket()?;
    match socket::connect(conn.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => {}
        // No socket file, or one a dead meshd left: nobody to take over from.
        Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("connect to {}", path.display())),
    }
    timeout(&conn, STEP)?;
    send(&conn, b"take", &[])?;
    let mut sockets = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, fds) = recv(&conn, &mut buf)?;
        if n == 0 {
            bail!("the running meshd closed the handover before sending its sockets");
        }
        let batch: Batch = serde_json::from_slice(&buf[..n]).context("handover message")?;
        if batch.names.len() != fds.len() {
            bail!("{} names for {} sockets", batch.names.len(), fds.len());
        }
        sockets.extend(batch.names.into_iter().zip(fds));
        if batch.done {
            return Ok(Some((conn, sockets)));
        }
    }
}

fn send_batch(
    conn: &OwnedFd,
    chunk: &[(String, Arc<dyn AsFd + Send + Sync>)],
    done: bool,
) -> Result<()> {
    let batch = Batch {
        names: chunk.iter().map(|(n, _)| n.clone()).collect(),
        done,
    };
    let fds: Vec<RawFd> = chunk.iter().map(|(_, s)| s.as_fd().as_raw_fd()).collect();
    send(conn, &serde_json::to_vec(&batch)?, &fds)
}

fn send(conn: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// One message and the descriptors it carried.
fn recv(conn: &OwnedFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // No safe helper: nix 0.30's ScmRights hands over bare RawFds, not OwnedFds.
            // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        bail!("handover message truncated");
    }
    Ok((msg.bytes, fds))
}

fn timeout(conn: &OwnedFd, limit: Duration) -> Result<()> {
    let tv = TimeVal::new(limit.as_secs() as _, 0);
    socket::setsockopt(conn, sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two `Sockets` in one process: the second takes the first's listener (the same socket:
    /// a connection queued before the handover is accepted after it), and the first learns it
    /// has been handed over only once the second serves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_takes_the_same_listening_socket() {
        let dir = std::env::temp_dir().join(format!("meshd-handover-{}", std::process::id()));
        let old = Sockets::start(&dir).unwrap();
        assert!(!old.has_predecessor());
        let listener = old
            .tcp("node/test", || {
                Ok(std::net::TcpListener::bind("127.0.0.1:0")?)
            })
            .unwrap();
        let addr = listener.local_addr().unwrap();
        old.serving().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();

        let new = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || Sockets::start(&dir).unwrap()
        })
        .await
        .unwrap();
        assert!(new.has_predecessor());
        assert_eq!(
            old.phase(),
            Phase::Serving,
            "not before the successor serves"
        );
        let taken = new
            .tcp("node/test", || bail!("must be handed over, not made"))
            .unwrap();
        assert_eq!(taken.local_addr().unwrap(), addr);
        new.serving().unwrap();
        tokio::time::timeout(Duration::from_secs(5), old.reached(Phase::HandedOver))
            .await
            .expect("the old meshd learns it was handed over");
        drop(listener);
        let (conn, _) = taken.accept().await.unwrap();
        assert_eq!(conn.peer_addr().unwrap(), queued.local_addr().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
