//! SO_ORIGINAL_DST: the destination a connection had before a nat REDIRECT rewrote it, as
//! netfilter's connection tracking remembers it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
};

/// From linux/netfilter_ipv4.h.
const SO_ORIGINAL_DST: libc::c_int = 80;

pub fn original_dst(sock: &impl AsRawFd) -> std::io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: addr and len are valid for writes of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}
