//! A pod's network namespace as meshd holds it: an open fd (the namespace lives as long as
//! meshd keeps it, even if the runtime's bind mount goes), its cookie (what eBPF programs see
//! through `bpf_get_netns_cookie`), and "run this inside it": the calling thread enters the pod's
//! namespace with setns, runs a short synchronous closure (create a socket, bind, listen) and
//! returns to meshd's own namespace. A socket stays in the namespace it was created in, so
//! meshd's single event loop can serve sockets of every pod.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{setns, CloneFlags};

/// meshd's own namespace, opened before any thread moves.
static HOME: OnceLock<File> = OnceLock::new();

/// Opens meshd's own network namespace once; call at start-up, before any `Netns::run`.
pub fn remember_home() -> io::Result<()> {
    if HOME.get().is_none() {
        let file = File::open("/proc/thread-self/ns/net")?;
        let _ = HOME.set(file);
    }
    Ok(())
}

#[derive(Debug)]
pub struct Netns {
    file: File,
    pub path: PathBuf,
    pub cookie: u64,
    pub inode: u64,
}

impl Netns {
    /// Opens a namespace by path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Netns> {
        remember_home()?;
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let mut ns = Netns {
            file,
            path: path.to_path_buf(),
            cookie: 0,
            inode: meta.ino(),
        };
        if ns.inode == HOME.get().expect("remembered").metadata()?.ino() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is meshd's own network namespace, not a pod's",
                    path.display()
                ),
            ));
        }
        ns.cookie = ns.run(|| {
            cookie_of(&socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                None,
            )?)
        })?;
        Ok(ns)
    }

    /// The open namespace (for attaching programs to it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on this thread inside the namespace, then returns to meshd's own. If the return
    /// fails the thread would keep serving from the wrong namespace: meshd aborts instead.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = HOME
            .get()
            .ok_or_else(|| io::Error::other("home netns not remembered"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("meshd: cannot return to its own network namespace ({e}); aborting");
            std::process::abort();
        }
        result
    }
}

/// The namespace cookie of the namespace `sock` lives in (`SO_NETNS_COOKIE`, Linux 5.14+).
pub fn cookie_of(sock: &impl AsFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // No safe helper: nix 0.30 has no SO_NETNS_COOKIE sockopt and socket2 0.6 no getter for it.
    // SAFETY: `cookie` and `len` are valid for the size passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cookie of meshd's own namespace.
pub fn home_cookie() -> io::Result<u64> {
    cookie_of(&socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        None,
    )?)
}
