//! Which cgroup owns a socket, asked of the kernel by 4-tuple over NETLINK_SOCK_DIAG: one
//! exact lookup, however many sockets the node has. (Reading /proc/net/tcp and scanning
//! processes' fds costs time in proportion to every socket and TIME_WAIT entry on the node:
//! measured at 46 connections/s under connection-per-request load.)

use std::{io, net::SocketAddrV4, os::fd::AsRawFd};

use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;
const HEADER: usize = 16;
/// struct inet_diag_msg.
const DIAG_MSG: usize = 72;

/// What the kernel knows of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub inode: u32,
    /// cgroup v2 id, when the kernel reports it (5.7+).
    pub cgroup_id: Option<u64>,
}

/// Looks up the TCP socket `local` -> `remote` (IPv4, or an IPv6 socket using v4-mapped
/// addresses). `Ok(None)` when there is no such socket.
pub fn owner(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<Option<SocketOwner>> {
    for family in [libc::AF_INET, libc::AF_INET6] {
        if let Some(found) = query(family as u8, local, remote)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

fn addr_words(family: u8, addr: &SocketAddrV4) -> [u8; 16] {
    let mut out = [0u8; 16];
    if family == libc::AF_INET as u8 {
        out[..4].copy_from_slice(&addr.ip().octets());
    } else {
        out.copy_from_slice(&addr.ip().to_ipv6_mapped().octets());
    }
    out
}

/// nlmsghdr + inet_diag_req_v2 for an exact lookup.
fn request(family: u8, local: SocketAddrV4, remote: SocketAddrV4) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + 56);
    m.extend_from_slice(&((HEADER + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    m.extend_from_slice(&addr_words(family, &local));
    m.extend_from_slice(&addr_words(family, &remote));
    m.extend_from_slice(&0u32.to_ne_bytes()); // interface
    m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    m
}

fn query(family: u8, local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<Option<SocketOwner>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    // The kernel is the destination: an unbound, unconnected netlink socket sends to pid 0.
    send(
        fd.as_raw_fd(),
        &request(family, local, remote),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 1024];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    parse(&buf[..n])
}

fn parse(reply: &[u8]) -> io::Result<Option<SocketOwner>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag reply");
    let kind = u16::from_ne_bytes(reply.get(4..6).ok_or_else(bad)?.try_into().unwrap());
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(reply.get(16..20).ok_or_else(bad)?.try_into().unwrap());
        return match -errno {
            libc::ENOENT => Ok(None),
            code => Err(io::Error::from_raw_os_error(code)),
        };
    }
    let msg = reply.get(HEADER..HEADER + DIAG_MSG).ok_or_else(bad)?;
    let inode = u32::from_ne_bytes(msg[68..72].try_into().unwrap());
    let mut cgroup_id = None;
    let mut attrs = &reply[HEADER + DIAG_MSG..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup_id = Some(u64::from_ne_bytes(attrs[4..12].try_into().unwrap()));
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    Ok(Some(SocketOwner { inode, cgroup_id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_socket_and_its_cgroup() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let v4 = |a| super::super::v4(a).unwrap();
        let (local, remote) = (
            v4(client.local_addr().unwrap()),
            v4(client.peer_addr().unwrap()),
        );
        let found = owner(local, remote).unwrap().expect("the socket exists");
        assert_ne!(found.inode, 0);
        let missing = owner(SocketAddrV4::new([127, 0, 0, 1].into(), 1), remote).unwrap();
        assert_eq!(missing, None);
        // The cgroup id (reported since Linux 5.7) is this process's cgroup v2 directory inode.
        let id = found
            .cgroup_id
            .expect("the kernel reports the socket's cgroup id");
        if let Some(mount) = crate::sys::mount_of("cgroup2") {
            let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
            let path = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            let dir = mount.join(path.trim_start_matches('/'));
            let ino = std::os::linux::fs::MetadataExt::st_ino(&std::fs::metadata(dir).unwrap());
            assert_eq!(id, ino);
        }
    }
}
