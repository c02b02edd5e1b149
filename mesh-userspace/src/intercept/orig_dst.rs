//! SO_ORIGINAL_DST: the destination a connection had before a nat REDIRECT rewrote it, as
//! netfilter's connection tracking remembers it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
};

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};

pub fn original_dst(sock: &impl AsFd) -> std::io::Result<SocketAddrV4> {
    let addr = getsockopt(sock, OriginalDst)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}
