//! Types and constants shared by the eBPF programs (`mesh-ebpf`) and the userspace proxy
//! (`meshd`). Everything here is `#[repr(C)]` plain data: the kernel side writes it into maps,
//! the userspace side reads it back, so both must agree on the layout byte for byte.
//! With the `user` feature the types implement `aya::Pod` so they can be map keys and values.
#![no_std]

/// The ports meshd listens on. Istio's numbers, so operators recognise them.
pub mod ports {
    /// Outbound capture: steered application connections arrive here (loopback).
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext capture.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound HBONE (HTTP/2 CONNECT over mTLS).
    pub const INBOUND_HBONE: u16 = 15008;
    /// Admin endpoint (loopback).
    pub const ADMIN: u16 = 15000;
    /// Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// Readiness probe.
    pub const READINESS: u16 = 15021;
    /// Every port meshd owns; capture never applies to them.
    pub const ALL: [u16; 6] = [
        OUTBOUND,
        INBOUND_PLAINTEXT,
        INBOUND_HBONE,
        ADMIN,
        METRICS,
        READINESS,
    ];
}

/// 127.0.0.6 in host byte order: meshd delivers to local workloads from this source so that
/// neither capture path takes its own deliveries again (Istio uses the same address).
pub const DELIVERY_SOURCE_IP: u32 = 0x7f00_0006;

/// Names of the maps and programs in the eBPF object; the loader finds them by these names.
pub mod names {
    pub const MAP_CONFIG: &str = "MESH_CONFIG";
    pub const MAP_ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const MAP_ORIG_DST_BY_TUPLE: &str = "ORIG_DST_BY_TUPLE";
    pub const MAP_EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const MAP_EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    pub const MAP_INBOUND_PORTS: &str = "INBOUND_PORTS";
    pub const MAP_INBOUND_LISTENER: &str = "INBOUND_LISTENER";
    pub const MAP_COUNTERS: &str = "MESH_COUNTERS";
    pub const PROG_CONNECT4: &str = "mesh_connect4";
    pub const PROG_CONNECT6: &str = "mesh_connect6";
    pub const PROG_SOCKOPS: &str = "mesh_sockops";
    pub const PROG_SOCKOPS_BYPASS: &str = "mesh_sockops_bypass";
    pub const PROG_GETPEERNAME4: &str = "mesh_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "mesh_getpeername6";
    pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";
    pub const MAP_BYPASS_SOCKETS: &str = "BYPASS_SOCKETS";
    pub const MAP_BYPASS_TCP_ONLY: &str = "BYPASS_TCP_ONLY";
    pub const PROG_SK_MSG: &str = "mesh_sk_msg";
    pub const PROG_CONNECT4_PODS: &str = "mesh_connect4_pods";
    pub const PROG_CONNECT6_PODS: &str = "mesh_connect6_pods";
    pub const PROG_SK_LOOKUP_PODS: &str = "mesh_sk_lookup_pods";
    pub const MAP_POD_NETNS: &str = "POD_NETNS";
    pub const MAP_POD_LISTENERS: &str = "POD_LISTENERS";
}

/// Capacity of the original-destination maps (LRU: the oldest entries go first when full).
pub const ORIG_DST_MAP_ENTRIES: u32 = 65_536;
/// Capacity of the exclusion maps.
pub const EXCLUSION_MAP_ENTRIES: u32 = 256;
/// Capacity of the per-pod maps (pods meshd serves on one node).
pub const POD_MAP_ENTRIES: u32 = 4_096;
/// Capacity of the loopback-bypass socket map: two sockets per proxied local hop. A socket that
/// finds it full simply keeps using TCP.
pub const BYPASS_MAP_ENTRIES: u32 = 65_536;

/// Runtime settings the userspace loader writes into `MESH_CONFIG[0]` before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// Where steered connections go, host byte order (normally 15001).
    pub outbound_port: u16,
    pub _pad: u16,
    /// Sockets carrying this mark are never steered (meshd marks its own upstream sockets).
    pub proxy_mark: u32,
    /// Sockets of this uid are never steered; `u32::MAX` disables the check.
    pub proxy_uid: u32,
    /// Non-zero once userspace has filled the settings; until then the programs steer nothing.
    pub enabled: u32,
    /// Non-zero: sockops puts both ends of each app<->meshd loopback hop into the bypass
    /// sockhash, where the sk_msg program moves their bytes without the TCP stack.
    pub bypass: u32,
}

/// The original destination of a steered connection and the cgroup of the workload that made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address in network byte order, as `bpf_sock_addr.user_ip4` holds it.
    pub ip: u32,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: u16,
    /// cgroup v2 id of the connecting workload.
    pub cgroup_id: u64,
}

/// Per pod in ebpf mode: what the pod-side programs need to know about a pod's network
/// namespace, by its cookie. Present = the pod is in the mesh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodNetns {
    /// The pod's IPv4 address (network byte order).
    pub ip: u32,
    pub _pad: u32,
}

/// The application end of a steered loopback connection: what meshd's `accept()` reports as the
/// peer, in the network namespace the connection lives in (every pod has its own 127.0.0.1, so
/// the same ip:port can be open in two pods at once). IP in network byte order, port in host
/// byte order, `netns` the namespace's cookie (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
    pub netns: u64,
}

/// One end of a local TCP connection as the socket itself sees it, in the form both sockops and
/// sk_msg read from their contexts: addresses in network byte order, ports in host byte order.
/// The other end of the same connection has the mirrored tuple ([`SockTuple::peer`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub local_ip: u32,
    pub remote_ip: u32,
    pub local_port: u32,
    pub remote_port: u32,
    /// The connection's network namespace cookie: loopback tuples repeat across pods.
    pub netns: u64,
}

impl SockTuple {
    /// The tuple the socket at the other end of this connection has.
    pub const fn peer(&self) -> SockTuple {
        SockTuple {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            netns: self.netns,
        }
    }
}

/// Indices into the `MESH_COUNTERS` per-CPU array.
pub mod counters {
    /// connect4 steered a connection to the proxy.
    pub const STEERED: u32 = 0;
    /// connect4 left a connection alone because it matched an exclusion.
    pub const EXCLUDED: u32 = 1;
    /// connect4 could not record the original destination (map full or error): not steered.
    pub const RECORD_FAILED: u32 = 2;
    /// sockops moved a record to its 4-tuple key.
    pub const REKEYED: u32 = 3;
    /// sk_lookup handed an inbound connection to the :15006 listener.
    pub const INBOUND_CAPTURED: u32 = 4;
    /// sockops put a loopback socket into the bypass sockhash.
    pub const BYPASS_SOCKETS: u32 = 5;
    /// sk_msg found no peer socket for a connection's first bytes: that connection keeps TCP.
    pub const BYPASS_FALLBACK: u32 = 6;
    /// sk_lookup in a meshed pod found no :15006 of meshd (meshd is down): connection refused.
    pub const INBOUND_REFUSED: u32 = 7;
    /// sk_lookup dropped an inbound IPv6 connection to a captured port (meshd proxies IPv4).
    pub const INBOUND_V6_REFUSED: u32 = 8;
    pub const COUNT: u32 = 9;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are #[repr(C)], Copy, and have explicit padding fields, so every byte
    // pattern is a valid value and no uninitialised padding is read.
    unsafe impl aya::Pod for super::MeshConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockTuple {}
    unsafe impl aya::Pod for super::PodNetns {}
}
