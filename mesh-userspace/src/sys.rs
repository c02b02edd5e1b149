//! Small facts about the host that several stages need: which filesystems the kernel offers,
//! where cgroup v2 and bpffs are mounted (mounting them when absent), and a throwaway network
//! namespace for probes that must not touch the node's own network state.

use std::{
    fs,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// Where meshd mounts cgroup v2 on machines that have none mounted.
pub const CGROUP2_FALLBACK_MOUNT: &str = "/run/meshd/cgroup2";
/// bpffs: the conventional place, mounted by meshd when absent.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// One line of /proc/self/mountinfo, the fields meshd cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// Parses mountinfo text: `id parent maj:min root mountpoint opts [optional...] - fstype src`.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

pub fn mounts() -> Vec<Mount> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The first mount point of a filesystem type, if any.
pub fn mount_of(fstype: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|m| m.fstype == fstype)
        .map(|m| m.mount_point)
}

/// Whether the kernel offers a filesystem type (/proc/filesystems).
pub fn filesystem_supported(fstype: &str) -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some(fstype))
        })
        .unwrap_or(false)
}

/// The cgroup v2 mount, mounting one at [`CGROUP2_FALLBACK_MOUNT`] when the machine has none.
pub fn ensure_cgroup2() -> Result<PathBuf> {
    ensure_mounted("cgroup2", Path::new(CGROUP2_FALLBACK_MOUNT))
}

/// The cgroup v2 directory this process runs in, or `None` when that is the root of the
/// hierarchy (nothing may be attached there on meshd's behalf: it would reach every process).
pub fn own_cgroup() -> Result<Option<PathBuf>> {
    let text = fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("/proc/self/cgroup has no cgroup v2 entry")?;
    let relative = relative.trim_start_matches('/');
    if relative.is_empty() {
        return Ok(None);
    }
    Ok(Some(ensure_cgroup2()?.join(relative)))
}

/// The bpffs mount, mounting one at [`BPFFS_MOUNT`] when the machine has none.
pub fn ensure_bpffs() -> Result<PathBuf> {
    ensure_mounted("bpf", Path::new(BPFFS_MOUNT))
}

fn ensure_mounted(fstype: &str, fallback: &Path) -> Result<PathBuf> {
    if let Some(found) = mount_of(fstype) {
        return Ok(found);
    }
    if !filesystem_supported(fstype) {
        bail!("the kernel does not offer the {fstype} filesystem");
    }
    fs::create_dir_all(fallback).with_context(|| format!("create {}", fallback.display()))?;
    nix::mount::mount(
        Some(fstype),
        fallback,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount {fstype} at {} (needs root)", fallback.display()))?;
    tracing::info!(fstype, path = %fallback.display(), "mounted");
    Ok(fallback.to_path_buf())
}

/// Raises the open-file soft limit to the hard limit: every proxied connection holds two
/// sockets, and the default soft limit (1024) would cap meshd near 500 connections.
pub fn raise_fd_limit() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds `ports` to this network namespace's reserved ports, so no outgoing connection takes one
/// of meshd's listening ports as its ephemeral port (seen under connection-per-request load,
/// where meshd then could not start: "address in use"). Keeps what was reserved already, and
/// records the ports it added in `record` ([`reserved_ports_record`]) for
/// [`release_reserved_ports`]; returns the list now in force.
pub fn reserve_ports(ports: &[u16], record: &Path) -> Result<String> {
    let current = fs::read_to_string(RESERVED_PORTS).context("read ip_local_reserved_ports")?;
    let (merged, added) = merge_port_list(current.trim(), ports);
    if !added.is_empty() {
        if let Some(dir) = record.parent() {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let list: Vec<String> = added.iter().map(u16::to_string).collect();
        fs::write(record, list.join(",")).with_context(|| format!("write {}", record.display()))?;
    }
    fs::write(RESERVED_PORTS, &merged).context("write ip_local_reserved_ports")?;
    Ok(merged)
}

/// Where the ports meshd reserved in this network namespace are recorded: under `state_dir`,
/// named after the namespace (meshd's of different namespaces share a state directory).
pub fn reserved_ports_record(state_dir: &Path) -> Result<PathBuf> {
    let ns = fs::metadata("/proc/thread-self/ns/net").context("this thread's network namespace")?;
    let ino = std::os::linux::fs::MetadataExt::st_ino(&ns);
    Ok(state_dir.join(format!("reserved-ports.{ino}")))
}

/// Takes back the ports [`reserve_ports`] recorded in `record` (the rest of the list stays as
/// the operator had it) and removes the record; the ports released.
pub fn release_reserved_ports(record: &Path) -> Result<Vec<u16>> {
    let Ok(text) = fs::read_to_string(record) else {
        return Ok(Vec::new());
    };
    let ours: Vec<u16> = text
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let current = fs::read_to_string(RESERVED_PORTS).context("read ip_local_reserved_ports")?;
    let kept = without_ports(&current, &ours);
    // An empty write is refused (EINVAL); a newline clears the list.
    fs::write(RESERVED_PORTS, format!("{kept}\n")).context("write ip_local_reserved_ports")?;
    fs::remove_file(record).with_context(|| format!("remove {}", record.display()))?;
    Ok(ours)
}

/// A sysctl port list (the kernel writes it back as ranges: "15000-15001,15006") without
/// `ports`, in the same form.
fn without_ports(list: &str, ports: &[u16]) -> String {
    let mut set = std::collections::BTreeSet::new();
    for item in list
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
            set.extend(a..=b);
        }
    }
    for p in ports {
        set.remove(p);
    }
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for p in set {
        match runs.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(p) => *end = p,
            _ => runs.push((p, p)),
        }
    }
    let item = |(a, b): (u16, u16)| {
        if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        }
    };
    runs.into_iter().map(item).collect::<Vec<_>>().join(",")
}

/// `current` (a sysctl port list like "22,8000-8100") with `ports` added; which were added.
fn merge_port_list(current: &str, ports: &[u16]) -> (String, Vec<u16>) {
    let mut items: Vec<String> = current
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let covered = |p: u16, items: &[String]| {
        items.iter().any(|item| match item.split_once('-') {
            Some((a, b)) => {
                a.parse::<u16>().is_ok_and(|a| a <= p) && b.parse::<u16>().is_ok_and(|b| p <= b)
            }
            None => item.parse::<u16>() == Ok(p),
        })
    };
    let mut added = Vec::new();
    for p in ports {
        if !covered(*p, &items) {
            items.push(p.to_string());
            added.push(*p);
        }
    }
    (items.join(","), added)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `f` on a thread that lives in a new, empty network namespace; the namespace disappears
/// with the thread, so whatever `f` (or a process it starts) changes there touches nothing else.
pub fn in_scratch_netns<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET): cannot create a network namespace")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

fn bpf_map_elem<K, V>(
    cmd: libc::c_long,
    map: BorrowedFd,
    key: &K,
    value: *mut V,
) -> Result<(), std::io::Error> {
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as u64,
        flags: 0,
    };
    // No safe helper: aya 0.14's HashMap has get and remove but no lookup-and-delete (its
    // syscall wrapper is pub(crate), public only as Queue/Stack::pop), and this has a bare fd.
    // SAFETY: attr points at a valid bpf_attr prefix for this command; key and value point at
    // buffers of the map's key and value sizes (the caller's types match the map's layout).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads and removes one entry of a BPF hash map in one syscall (kernel >= 5.14; older kernels
/// get a lookup then a delete). `K` and `V` must be the map's key and value layouts.
pub fn bpf_map_take<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd,
    key: &K,
) -> Result<V, std::io::Error> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    match bpf_map_elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key, value.as_mut_ptr()) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => {
            bpf_map_elem(BPF_MAP_LOOKUP_ELEM, map, key, value.as_mut_ptr())?;
            let _ = bpf_map_elem(BPF_MAP_DELETE_ELEM, map, key, std::ptr::null_mut::<V>());
        }
        Err(e) => return Err(e),
    }
    // No safe helper: aya::Pod promises any bytes are valid but gives no safe constructor.
    // SAFETY: the kernel filled the value; V is plain data valid for any bytes (aya::Pod).
    Ok(unsafe { value.assume_init() })
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn bpf_syscall<A>(cmd: libc::c_long, attr: &A) -> Result<libc::c_long, std::io::Error> {
    // No safe helper: aya 0.14 keeps BPF_OBJ_GET's fd private (PinnedLink::from_pin gives an
    // FdLink with no AsFd) and its BPF_LINK_UPDATE is pub(crate), used only by XDP and tc.
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd` (the callers' repr(C) structs).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const A,
            std::mem::size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned BPF object (a link left by an earlier meshd) by its bpffs path.
pub fn bpf_obj_get(path: &Path) -> Result<std::os::fd::OwnedFd, std::io::Error> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf_syscall(BPF_OBJ_GET, &attr)?;
    // No safe helper: the raw bpf() syscall above returns a bare descriptor number.
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// Swaps the program behind a link in one step (BPF_LINK_UPDATE): the hook never runs without
/// a program, so a restarted meshd takes over an earlier one's links without a gap.
pub fn bpf_link_update(link: BorrowedFd, program: BorrowedFd) -> Result<(), std::io::Error> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf_syscall(BPF_LINK_UPDATE, &attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_cgroup2_and_unescapes_spaces() {
        let text = "30 23 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    41 23 0:40 / /mnt/with\\040space rw shared:1 - bpf bpf rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[0].fstype, "cgroup2");
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].fstype, "bpf");
    }

    #[test]
    fn reserved_ports_are_merged_without_duplicates() {
        let merged = |current, ports: &[u16]| merge_port_list(current, ports);
        assert_eq!(
            merged("", &[15001, 15006]),
            ("15001,15006".into(), vec![15001, 15006])
        );
        assert_eq!(
            merged("22,15000-15010", &[15001, 15020]),
            ("22,15000-15010,15020".into(), vec![15020])
        );
        assert_eq!(merged("15020", &[15020]), ("15020".into(), vec![]));
    }

    #[test]
    fn released_ports_leave_the_operators_ranges() {
        let kernel = "22,15000-15001,15006,15008,15020-15021,30000-30002";
        let ours = [15000, 15001, 15006, 15008, 15020, 15021];
        assert_eq!(without_ports(kernel, &ours), "22,30000-30002");
        assert_eq!(without_ports("15000-15010", &[15001]), "15000,15002-15010");
        assert_eq!(without_ports("", &ours), "");
    }

    #[test]
    fn mountinfo_skips_malformed_lines() {
        assert!(parse_mountinfo("garbage\n\n1 2 3").is_empty());
    }
}
