//! meshd's kernel side. Each program is one hook doing one job; the maps it touches are declared
//! beside it. Layouts of keys and values come from `mesh-common`.
//!
//! - `mesh_connect4` (cgroup/connect4): steer a workload's outbound TCP connect to the proxy's
//!   :15001 and remember where it wanted to go, keyed by socket cookie.
//! - `mesh_sockops` (sockops): once the steered connection is established, copy the record to
//!   the key the proxy can compute from `accept()` (the app socket's local ip:port); drop the
//!   cookie record when the socket closes.
//! - `mesh_connect6` (cgroup/connect6): the same for IPv6 sockets dialling v4-mapped
//!   addresses; native IPv6 is left alone.
//! - `mesh_getpeername4`/`6` (cgroup/getpeername4/6): the application sees its original peer.
//! - `mesh_sk_lookup` (sk_lookup): new inbound connections to captured ports go to :15006.
//! - Pods (each in its own network namespace, served by meshd from inside it):
//!   `mesh_connect4_pods`/`6` sit on the container runtime's pod cgroup parent and steer only
//!   sockets whose network namespace is a meshed pod's (`POD_NETNS`, keyed by netns cookie), to
//!   that pod's own 127.0.0.1:15001; `mesh_sk_lookup_pods` (attached to each pod's namespace)
//!   hands every new inbound connection to the pod's address to the pod's :15006
//!   (`POD_LISTENERS`, keyed by the pod's IP). Record keys carry the netns cookie, since every
//!   pod has its own 127.0.0.1.
//! - `mesh_sk_msg` (sk_msg on `BYPASS_SOCKETS`): the loopback hops between applications and
//!   meshd (app <-> :15001, meshd's 127.0.0.6 deliveries <-> workload) skip the TCP stack:
//!   `mesh_sockops_bypass` (on opted-in workload cgroups and meshd's own) puts both ends in the
//!   sockhash when they are established, and each `sendmsg` lands directly in the other end's
//!   receive queue.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use mesh_common::{
    counters, ports, MeshConfig, OrigDst, PodNetns, SockKey, SockTuple, BYPASS_MAP_ENTRIES,
    DELIVERY_SOURCE_IP, EXCLUSION_MAP_ENTRIES, ORIG_DST_MAP_ENTRIES, POD_MAP_ENTRIES,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
const LOOPBACK_V4: u32 = 0x7f00_0001;
/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[map]
static MESH_CONFIG: Array<MeshConfig> = Array::with_max_entries(1, 0);
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(ORIG_DST_MAP_ENTRIES, 0);
#[map]
static ORIG_DST_BY_TUPLE: LruHashMap<SockKey, OrigDst> =
    LruHashMap::with_max_entries(ORIG_DST_MAP_ENTRIES, 0);
/// Destination ports (host byte order) that are never steered.
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(EXCLUSION_MAP_ENTRIES, 0);
/// Destination CIDRs (address bytes in network order) that are never steered.
#[map]
static EXCLUDED_CIDRS: LpmTrie<u32, u8> =
    LpmTrie::with_max_entries(EXCLUSION_MAP_ENTRIES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
/// Local ports (host byte order) whose new inbound connections are captured.
#[map]
static INBOUND_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(EXCLUSION_MAP_ENTRIES, 0);
/// Slot 0 holds meshd's :15006 listening socket.
#[map]
static INBOUND_LISTENER: SockMap = SockMap::with_max_entries(1, 0);
/// Both ends of every loopback hop the bypass serves, by the tuple each end sees.
#[map]
static BYPASS_SOCKETS: SockHash<SockTuple> = SockHash::with_max_entries(BYPASS_MAP_ENTRIES, 0);
/// Connections whose first bytes went through TCP (their peer was not in `BYPASS_SOCKETS` yet):
/// they stay on TCP, since bytes redirected later would overtake bytes still in the TCP queue.
#[map]
static BYPASS_TCP_ONLY: LruHashMap<SockTuple, u8> =
    LruHashMap::with_max_entries(BYPASS_MAP_ENTRIES, 0);
/// Meshed pods' network namespaces, by netns cookie.
#[map]
static POD_NETNS: HashMap<u64, PodNetns> = HashMap::with_max_entries(POD_MAP_ENTRIES, 0);
/// Each meshed pod's :15006 listening socket, by the pod's IPv4 address (network byte order).
#[map]
static POD_LISTENERS: SockHash<u32> = SockHash::with_max_entries(POD_MAP_ENTRIES, 0);
#[map]
static MESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = MESH_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect4(&ctx)
}

/// On the runtime's pod cgroup parent: only sockets in a meshed pod's namespace are steered
/// (to the pod's own loopback, where meshd listens from inside the pod).
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4_pods(ctx: SockAddrContext) -> i32 {
    if !in_meshed_pod(ctx.as_ptr()) {
        return ALLOW;
    }
    connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6_pods(ctx: SockAddrContext) -> i32 {
    if !in_meshed_pod(ctx.as_ptr()) {
        return ALLOW;
    }
    connect6(&ctx)
}

#[inline(always)]
fn in_meshed_pod(ctx: *mut core::ffi::c_void) -> bool {
    // SAFETY: helper on the program's own context; map lookup with a plain-data key.
    let netns = unsafe { bpf_get_netns_cookie(ctx) };
    unsafe { POD_NETNS.get(netns) }.is_some()
}

#[inline(always)]
fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    match steer(ctx, sa, sa.user_ip4) {
        Steer::Leave => ALLOW,
        Steer::Reject => REJECT,
        Steer::ToProxy(port) => {
            sa.user_ip4 = LOOPBACK_V4.to_be();
            sa.user_port = port;
            ALLOW
        }
    }
}

/// IPv6 sockets reaching IPv4 peers through v4-mapped addresses (`::ffff:a.b.c.d`) are steered
/// like connect4's; native IPv6 destinations are left alone (not meshed yet).
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    connect6(&ctx)
}

#[inline(always)]
fn connect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    if !is_v4_mapped(ip6) {
        return ALLOW;
    }
    match steer(ctx, sa, ip6[3]) {
        Steer::Leave => ALLOW,
        Steer::Reject => REJECT,
        Steer::ToProxy(port) => {
            sa.user_ip6[3] = LOOPBACK_V4.to_be();
            sa.user_port = port;
            ALLOW
        }
    }
}

#[inline(always)]
fn is_v4_mapped(ip6: [u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffff_u32.to_be()
}

enum Steer {
    Leave,
    Reject,
    /// Rewrite the destination to loopback and this port (network byte order, as user_port).
    ToProxy(u32),
}

/// The decision for a TCP connect to IPv4 `ip` (network byte order) and `sa.user_port`; when
/// steering, the original destination is recorded under the socket's cookie.
#[inline(always)]
fn steer(ctx: &SockAddrContext, sa: &bpf_sock_addr, ip: u32) -> Steer {
    let Some(cfg) = MESH_CONFIG.get(0) else {
        return Steer::Leave;
    };
    if cfg.enabled == 0 || sa.protocol != IPPROTO_TCP || sa.type_ != SOCK_STREAM {
        return Steer::Leave;
    }
    let port = u16::from_be(sa.user_port as u16);
    if is_excluded(sa, cfg, ip, port) {
        count(counters::EXCLUDED);
        return Steer::Leave;
    }
    let orig = OrigDst {
        ip,
        port,
        _pad: 0,
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    // SAFETY: the context pointer is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record the proxy could not tell where to go: refusing the connect is safer
        // than letting it leave the node in plaintext around the mesh.
        count(counters::RECORD_FAILED);
        return Steer::Reject;
    }
    count(counters::STEERED);
    Steer::ToProxy(u32::from(cfg.outbound_port.to_be()))
}

/// Loopback, meshd's own ports, configured ports and CIDRs, and meshd's own sockets (by mark or
/// uid: a second guard, meshd does not run in a workload cgroup) are left alone.
#[inline(always)]
fn is_excluded(sa: &bpf_sock_addr, cfg: &MeshConfig, ip: u32, port: u16) -> bool {
    if u32::from_be(ip) >> 24 == 127 || ports::ALL.contains(&port) {
        return true;
    }
    // SAFETY: map lookups with plain-data keys.
    if unsafe { EXCLUDED_PORTS.get(port) }.is_some() {
        return true;
    }
    if EXCLUDED_CIDRS.get(Key::new(32, ip)).is_some() {
        return true;
    }
    // SAFETY: the union holds the socket pointer for sock_addr programs.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if !sk.is_null() && cfg.proxy_mark != 0 && unsafe { (*sk).mark } == cfg.proxy_mark {
        return true;
    }
    let uid = bpf_get_current_uid_gid() as u32;
    cfg.proxy_uid != u32::MAX && uid == cfg.proxy_uid
}

/// For workload cgroups whose sockets keep TCP to meshd.
#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    sockops(&ctx, false)
}

/// For workload cgroups using the sk_msg bypass, and for meshd's own cgroup.
#[sock_ops]
pub fn mesh_sockops_bypass(ctx: SockOpsContext) -> u32 {
    sockops(&ctx, true)
}

#[inline(always)]
fn sockops(ctx: &SockOpsContext, bypass: bool) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            rekey_established(ctx);
            if bypass {
                add_to_bypass(ctx);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB if bypass => add_to_bypass(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: the context pointer is a valid bpf_sock_ops.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_BY_COOKIE.remove(cookie);
            if bypass {
                let _ = BYPASS_TCP_ONLY.remove(ops_tuple(ctx));
            }
        }
        _ => {}
    }
    0
}

#[inline(always)]
fn rekey_established(ctx: &SockOpsContext) {
    // Only sockets connect4/connect6 steered have a record, and those all talk IPv4: a
    // dual-stack socket dialling a v4-mapped address keeps its IPv4 addresses in the same
    // kernel fields local_ip4 reads.
    // SAFETY: the context pointer is a valid bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let key = SockKey {
        ip: ctx.local_ip4(),
        port: ctx.local_port() as u16,
        _pad: 0,
        // SAFETY: helper on the program's own context.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    if ORIG_DST_BY_TUPLE.insert(key, orig, 0).is_ok() {
        count(counters::REKEYED);
    }
    // Ask for state callbacks so the cookie record goes when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// Puts an established socket into the bypass sockhash when it is one end of a hop meshd makes on
/// this node: an application's steered connection to :15001 (either end), or a delivery from
/// 127.0.0.6 to a workload (either end). Everything else keeps plain TCP.
#[inline(always)]
fn add_to_bypass(ctx: &SockOpsContext) {
    let Some(cfg) = MESH_CONFIG.get(0) else {
        return;
    };
    if cfg.bypass == 0 {
        return;
    }
    let tuple = ops_tuple(ctx);
    let loopback = LOOPBACK_V4.to_be();
    let delivery = DELIVERY_SOURCE_IP.to_be();
    let outbound = u32::from(cfg.outbound_port);
    let app_hop = (tuple.remote_ip == loopback && tuple.remote_port == outbound)
        || (tuple.local_ip == loopback && tuple.local_port == outbound);
    let delivery_hop = tuple.local_ip == delivery || tuple.remote_ip == delivery;
    if !app_hop && !delivery_hop {
        return;
    }
    // A recycled tuple starts afresh.
    let _ = BYPASS_TCP_ONLY.remove(tuple);
    // SAFETY: the context pointer is a valid bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    if BYPASS_SOCKETS
        .update(tuple, ops, u64::from(BPF_ANY))
        .is_ok()
    {
        count(counters::BYPASS_SOCKETS);
        // The close callback forgets the connection's TCP-only mark, if it gets one.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn ops_tuple(ctx: &SockOpsContext) -> SockTuple {
    // SAFETY: the context pointer is a valid bpf_sock_ops; fields are read once into locals.
    let ops = unsafe { &*ctx.ops };
    SockTuple {
        local_ip: ops.local_ip4,
        remote_ip: ops.remote_ip4,
        local_port: ops.local_port,
        remote_port: remote_port(ops.remote_port),
        // SAFETY: helper on the program's own context.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    }
}

/// A context's remote port in host byte order. The kernel exposes it in network byte order, in
/// the upper 16 bits on little-endian machines (older kernels: the lower 16).
#[inline(always)]
fn remote_port(raw: u32) -> u32 {
    let net = if raw > 0xffff { raw >> 16 } else { raw };
    u32::from(u16::from_be(net as u16))
}

/// Every `sendmsg` on a socket in the bypass map: hand the bytes straight to the receive queue of
/// the connection's other end when it is in the map too. A connection whose first bytes could not
/// be redirected stays on TCP for its whole life, so bytes never overtake each other.
#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel hands a valid sk_msg_md; fields are read once into locals.
    let md = unsafe { &*ctx.msg };
    let own = SockTuple {
        local_ip: md.local_ip4,
        remote_ip: md.remote_ip4,
        local_port: md.local_port,
        remote_port: remote_port(md.remote_port),
        // SAFETY: helper on the program's own context.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    // SAFETY: map lookup with a plain-data key.
    if unsafe { BYPASS_TCP_ONLY.get(own) }.is_some() {
        return SK_PASS;
    }
    let mut peer = own.peer();
    if BYPASS_SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
    {
        return SK_PASS;
    }
    if BYPASS_TCP_ONLY.insert(own, 1, 0).is_ok() {
        count(counters::BYPASS_FALLBACK);
    }
    SK_PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = recorded(&ctx) {
        // SAFETY: the context pointer is a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.ip;
        sa.user_port = u32::from(orig.port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = recorded(&ctx) {
        // SAFETY: the context pointer is a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6 = [0, 0, 0xffff_u32.to_be(), orig.ip];
        sa.user_port = u32::from(orig.port.to_be());
    }
    ALLOW
}

/// The original destination of a steered socket, while it is open.
#[inline(always)]
fn recorded(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the context pointer is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    unsafe { ORIG_DST_BY_COOKIE.get(cookie) }.copied()
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sk_lookup.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    if lk.family == AF_INET6 {
        // SAFETY: map lookup with a plain-data key.
        let captured = unsafe { INBOUND_PORTS.get(lk.local_port as u16) }.is_some();
        return if captured { refuse_v6() } else { SK_PASS };
    }
    if lk.family != AF_INET {
        return SK_PASS;
    }
    // meshd's own deliveries come from 127.0.0.6 and must reach the workload itself.
    if u32::from_be(lk.remote_ip4) == DELIVERY_SOURCE_IP {
        return SK_PASS;
    }
    let port = lk.local_port as u16;
    // SAFETY: map lookup with a plain-data key.
    if unsafe { INBOUND_PORTS.get(port) }.is_none() {
        return SK_PASS;
    }
    if INBOUND_LISTENER.redirect_sk_lookup(&ctx, 0, 0).is_ok() {
        count(counters::INBOUND_CAPTURED);
        return SK_PASS;
    }
    // A captured port and no :15006 to hand it to: meshd died (its link stays pinned). The
    // workload must not be reached around the mesh meanwhile.
    count(counters::INBOUND_REFUSED);
    SK_DROP
}

/// Attached to each meshed pod's network namespace: every new inbound TCP connection to the
/// pod's address, except to meshd's own ports (:15008 HBONE among them) and meshd's deliveries
/// from 127.0.0.6, goes to the pod's :15006 (STRICT refuses it there, PERMISSIVE forwards it).
#[sk_lookup]
pub fn mesh_sk_lookup_pods(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sk_lookup.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    if lk.family == AF_INET6 {
        // ::1, read word by word (ctx fields are loaded one u32 at a time).
        let ip = &lk.local_ip6;
        let loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1u32.to_be();
        return if loopback || ports::ALL.contains(&(lk.local_port as u16)) {
            SK_PASS
        } else {
            refuse_v6()
        };
    }
    if lk.family != AF_INET {
        return SK_PASS;
    }
    if u32::from_be(lk.remote_ip4) == DELIVERY_SOURCE_IP
        || ports::ALL.contains(&(lk.local_port as u16))
    {
        return SK_PASS;
    }
    if u32::from_be(lk.local_ip4) >> 24 == 127 {
        return SK_PASS;
    }
    if POD_LISTENERS
        .redirect_sk_lookup(&ctx, lk.local_ip4, 0)
        .is_ok()
    {
        count(counters::INBOUND_CAPTURED);
        return SK_PASS;
    }
    // This program is attached only to meshed pods' namespaces: no :15006 to hand the
    // connection to means meshd is gone, and the pod must not be reached around it.
    count(counters::INBOUND_REFUSED);
    SK_DROP
}

/// An inbound IPv6 TCP connection to what meshd captures: meshd proxies IPv4 only, so it is
/// dropped (the client sees it refused or time out) rather than delivered in plaintext.
fn refuse_v6() -> u32 {
    count(counters::INBOUND_V6_REFUSED);
    SK_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
