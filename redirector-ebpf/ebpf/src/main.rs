//! tollgate's TC datapath: L3/L4 identity enforcement and transparent redirect to the proxy.
//!
//! Two classifiers share one set of maps (layouts in `tollgate-datapath-common`):
//! `tollgate_from_endpoint` runs on TC ingress of an endpoint's host-side veth (what the endpoint
//! sends: its egress policy) and `tollgate_to_endpoint` on TC egress of the same interface (what
//! is delivered to it: its ingress policy).
//!
//! Per packet the cost is bounded and independent of the policy size: one endpoint lookup, at
//! most two connection-tracking lookups, and for the first packet of a flow one LPM lookup plus
//! four exact policy lookups (exact, any-port, any-identity, any-both), deny winning over
//! everything. The first packet's verdict is stored in the LRU connection tracker so the rest of
//! the flow, and its replies, follow it; a redirected flow stays redirected for its lifetime.
//!
//! Redirect is `bpf_sk_assign` of the proxy's transparent listener (found with
//! `bpf_skc_lookup_tcp` / `bpf_sk_lookup_udp`) plus a mark that the loader's policy-routing rule
//! turns into local delivery, so the proxy's accepted socket keeps the original destination.
//! A redirect that finds no listener drops (fail closed) and reports `PROXY_UNAVAILABLE`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple,
    },
    helpers::{
        bpf_ktime_get_ns, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use tollgate_datapath_common::{
    Config, Counter, CtKey, CtValue, DropEvent, EndpointInfo, PROXY_UPSTREAM_MARK,
    PROXY_UPSTREAM_MARK_MASK, PolicyKey, PolicyValue, capacity, counter, direction, endpoint_flags,
    family, identity, proto, reason, verdict,
};

#[map(name = "TG_IPCACHE_V4")]
static IPCACHE_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(capacity::IPCACHE_V4, 0);
#[map(name = "TG_IPCACHE_V6")]
static IPCACHE_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(capacity::IPCACHE_V6, 0);
#[map(name = "TG_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);
#[map(name = "TG_POLICY")]
static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(capacity::POLICY, 0);
#[map(name = "TG_CT")]
static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CT, 0);
#[map(name = "TG_COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(counter::COUNT, 0);
#[map(name = "TG_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);
#[map(name = "TG_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const NS_PER_SEC: u64 = 1_000_000_000;
const MAX_IPV6_EXT: usize = 4;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;

/// The L3/L4 facts of one packet.
struct Packet {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    protocol: u8,
    family: u8,
    /// skb length, for the byte counters.
    len: u32,
}

#[classifier]
pub fn tollgate_from_endpoint(ctx: TcContext) -> i32 {
    handle(&ctx, direction::EGRESS)
}

#[classifier]
pub fn tollgate_to_endpoint(ctx: TcContext) -> i32 {
    handle(&ctx, direction::INGRESS)
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel handed to the program.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn count(slot: u32, bytes: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

#[inline(never)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut p = Packet {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        protocol: 0,
        family: 0,
        len: ctx.len(),
    };
    let l4: usize;
    let mut first_fragment = true;
    // Each header is read with one load: every `ctx.load` is a helper call, and on the
    // throughput path they are most of the program's cost.
    if eth_proto == ETH_P_IP {
        let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
        p.protocol = ip[9];
        p.saddr[..4].copy_from_slice(&ip[12..16]);
        p.daddr[..4].copy_from_slice(&ip[16..20]);
        p.family = family::V4;
        l4 = ETH_HLEN + ihl;
    } else if eth_proto == ETH_P_IPV6 {
        let ip: [u8; 40] = ctx.load(ETH_HLEN).ok()?;
        p.saddr.copy_from_slice(&ip[8..24]);
        p.daddr.copy_from_slice(&ip[24..40]);
        p.family = family::V6;
        let mut next: u8 = ip[6];
        let mut off = ETH_HLEN + 40;
        // Walk (a bounded number of) extension headers to the transport header.
        let mut i = 0;
        while i < MAX_IPV6_EXT {
            match next {
                IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                    let hdr: [u8; 2] = ctx.load(off).ok()?;
                    next = hdr[0];
                    off += (usize::from(hdr[1]) + 1) * 8;
                }
                IPV6_FRAGMENT => {
                    let hdr: [u8; 4] = ctx.load(off).ok()?;
                    next = hdr[0];
                    first_fragment = u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 == 0;
                    off += 8;
                }
                _ => break,
            }
            i += 1;
        }
        p.protocol = next;
        l4 = off;
    } else {
        return None;
    }
    if p.protocol == proto::ICMPV6 {
        // Neighbour discovery and multicast listener messages are the link working, not flows:
        // without them no IPv6 flow could be allowed at all.
        let icmp_type: u8 = ctx.load(l4).ok()?;
        if (130..=137).contains(&icmp_type) || icmp_type == 143 {
            return None;
        }
    }
    if first_fragment && (p.protocol == proto::TCP || p.protocol == proto::UDP) {
        let ports: [u8; 4] = ctx.load(l4).ok()?;
        p.sport = u16::from_be_bytes([ports[0], ports[1]]);
        p.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some(p)
}

fn ipcache(fam: u8, addr: &[u8; 16]) -> u32 {
    let id = if fam == family::V4 {
        let a = [addr[0], addr[1], addr[2], addr[3]];
        IPCACHE_V4.get(Key::new(32, a)).copied()
    } else {
        IPCACHE_V6.get(Key::new(128, *addr)).copied()
    };
    id.unwrap_or(identity::WORLD)
}

/// Rank of a non-deny verdict: the most telling one wins among the matching entries.
#[inline(always)]
fn rank(v: u8) -> u8 {
    match v {
        verdict::REDIRECT => 3,
        verdict::ALLOW => 2,
        verdict::AUDIT => 1,
        _ => 0,
    }
}

/// Resolves (endpoint, remote, port, proto, dir) with four exact lookups. Returns the verdict,
/// the proxy port, and the drop reason when the verdict is a deny.
#[inline(never)]
fn decide(ep: &EndpointInfo, remote: u32, p: &Packet, dir: u8) -> (u8, u16, u8) {
    let keys = [
        (remote, p.dport, p.protocol),
        (remote, 0, proto::ANY),
        (identity::ANY, p.dport, p.protocol),
        (identity::ANY, 0, proto::ANY),
    ];
    let mut best = PolicyValue::default();
    for (remote_identity, port, protocol) in keys {
        let key = PolicyKey {
            endpoint_id: ep.endpoint_id,
            remote_identity,
            port,
            protocol,
            direction: dir,
        };
        // SAFETY: the value is copied out before any map update.
        if let Some(v) = unsafe { POLICY.get(&key) } {
            if v.verdict == verdict::DENY {
                return (verdict::DENY, 0, reason::POLICY_DENY);
            }
            if rank(v.verdict) > rank(best.verdict) {
                best = *v;
            }
        }
    }
    if best.verdict != 0 {
        return (best.verdict, best.proxy_port, 0);
    }
    let enforced = if dir == direction::INGRESS {
        endpoint_flags::ENFORCE_INGRESS
    } else {
        endpoint_flags::ENFORCE_EGRESS
    };
    if ep.flags & enforced != 0 {
        (verdict::DENY, 0, reason::NO_POLICY)
    } else {
        (verdict::ALLOW, 0, 0)
    }
}

/// Remote identity, direction and reason of an event, bundled because BPF calls take at most
/// five arguments.
#[derive(Clone, Copy)]
struct Why {
    remote: u32,
    dir: u8,
    reason: u8,
}

#[inline(never)]
fn emit(ctx: &TcContext, p: &Packet, ep: &EndpointInfo, why: &Why) {
    let Why {
        remote,
        dir,
        reason: why,
    } = *why;
    let (src_identity, dst_identity) = if dir == direction::EGRESS {
        (ep.identity, remote)
    } else {
        (remote, ep.identity)
    };
    if let Some(mut slot) = EVENTS.reserve::<DropEvent>(0) {
        slot.write(DropEvent {
            // SAFETY: helper without preconditions.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            saddr: p.saddr,
            daddr: p.daddr,
            src_identity,
            dst_identity,
            endpoint_id: ep.endpoint_id,
            ifindex: ifindex(ctx),
            sport: p.sport,
            dport: p.dport,
            protocol: p.protocol,
            family: p.family,
            direction: dir,
            reason: why,
        });
        slot.submit(0);
    }
}

fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or(Config {
        redirect_mark: 0x0B00_0000,
        udp_timeout_secs: 30,
        tcp_timeout_secs: 6 * 3600,
        proxy_v4: [127, 0, 0, 1],
        proxy_v6: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    })
}

fn timeout_ns(cfg: &Config, protocol: u8) -> u64 {
    let secs = if protocol == proto::TCP {
        cfg.tcp_timeout_secs
    } else {
        cfg.udp_timeout_secs
    };
    u64::from(secs) * NS_PER_SEC
}

/// How stale `last_seen_ns` may get before a packet refreshes it. Writing it on every packet
/// would bounce the entry's cache line between the CPUs that carry the two directions of a
/// flow; timeouts are seconds to hours, so a one-second granularity loses nothing.
const CT_REFRESH_NS: u64 = NS_PER_SEC;

/// Looks a flow up in the tracker, refreshing it when it is live. Expired entries are ignored
/// (the flow is judged again and the entry overwritten).
fn ct_lookup(key: &CtKey, now: u64, cfg: &Config) -> Option<CtValue> {
    let v = CT.get_ptr_mut(key)?;
    // SAFETY: pointer into the map value, valid for the program's run.
    unsafe {
        let idle = now.saturating_sub((*v).last_seen_ns);
        if idle > timeout_ns(cfg, key.protocol) {
            return None;
        }
        if idle > CT_REFRESH_NS {
            (*v).last_seen_ns = now;
        }
        Some(*v)
    }
}

fn handle(ctx: &TcContext, dir: u8) -> i32 {
    let len = ctx.len();
    // SAFETY: the value is copied out immediately.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ifindex(ctx)) }).copied() else {
        count(counter::UNTRACKED, len);
        return TC_ACT_OK as i32;
    };
    let Some(p) = parse(ctx) else {
        count(counter::UNTRACKED, len);
        return TC_ACT_OK as i32;
    };
    let cfg = config();
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // 1. A flow this endpoint opened (or was opened to it) in this direction.
    let fwd = CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        endpoint_id: ep.endpoint_id,
        sport: p.sport,
        dport: p.dport,
        protocol: p.protocol,
        family: p.family,
        direction: dir,
        _pad: 0,
    };
    if let Some(ct) = ct_lookup(&fwd, now, &cfg) {
        count(counter::CT_HIT, len);
        if ct.verdict == verdict::REDIRECT && dir == direction::EGRESS {
            return redirect(ctx, &p, &ep, &cfg, ct.proxy_port);
        }
        return TC_ACT_OK as i32;
    }
    // 2. A reply of a flow admitted in the other direction.
    let rev = CtKey {
        saddr: p.daddr,
        daddr: p.saddr,
        endpoint_id: ep.endpoint_id,
        sport: p.dport,
        dport: p.sport,
        protocol: p.protocol,
        family: p.family,
        direction: dir ^ 1,
        _pad: 0,
    };
    if ct_lookup(&rev, now, &cfg).is_some() {
        count(counter::CT_HIT, len);
        return TC_ACT_OK as i32;
    }

    // 3. A new flow: the proxy's own upstream connection (already judged by it, with both
    //    sides' policies) or judged here by policy.
    let remote = if dir == direction::EGRESS {
        ipcache(p.family, &p.daddr)
    } else {
        ipcache(p.family, &p.saddr)
    };
    let (mut v, proxy_port, why) = if dir == direction::INGRESS
        && mark(ctx) & PROXY_UPSTREAM_MARK_MASK == PROXY_UPSTREAM_MARK
    {
        (verdict::ALLOW, 0, 0)
    } else {
        decide(&ep, remote, &p, dir)
    };
    if v == verdict::REDIRECT && p.protocol != proto::TCP && p.protocol != proto::UDP {
        // Only TCP and UDP have a proxy; an L3-wide redirect entry admits the rest.
        v = verdict::ALLOW;
    }
    if v == verdict::REDIRECT && dir == direction::INGRESS {
        // `bpf_sk_assign` works only on TC ingress: on the way *to* an endpoint the proxy must
        // already be in the path, which it marks. Anything else is refused (fail closed).
        if mark(ctx) & cfg.redirect_mark == cfg.redirect_mark && cfg.redirect_mark != 0 {
            v = verdict::ALLOW;
        } else {
            count(counter::PROXY_UNAVAILABLE, len);
            emit(
                ctx,
                &p,
                &ep,
                &Why {
                    remote,
                    dir,
                    reason: reason::PROXY_UNAVAILABLE,
                },
            );
            return TC_ACT_SHOT as i32;
        }
    }
    match v {
        verdict::DENY => {
            count(counter::DENIED, len);
            emit(
                ctx,
                &p,
                &ep,
                &Why {
                    remote,
                    dir,
                    reason: why,
                },
            );
            TC_ACT_SHOT as i32
        }
        _ => {
            let entry = CtValue {
                last_seen_ns: now,
                verdict: v,
                _pad: 0,
                proxy_port,
                _pad2: 0,
            };
            // A full LRU evicts the oldest flow; an error here only costs a re-evaluation.
            let _ = CT.insert(&fwd, &entry, 0);
            match v {
                verdict::REDIRECT => redirect(ctx, &p, &ep, &cfg, proxy_port),
                verdict::AUDIT => {
                    count(counter::AUDITED, len);
                    emit(
                        ctx,
                        &p,
                        &ep,
                        &Why {
                            remote,
                            dir,
                            reason: reason::AUDIT,
                        },
                    );
                    TC_ACT_OK as i32
                }
                _ => {
                    count(counter::ALLOWED, len);
                    TC_ACT_OK as i32
                }
            }
        }
    }
}

fn tuple_of(p: &Packet, daddr: &[u8; 16], dport: u16) -> bpf_sock_tuple {
    // SAFETY: all-zero is a valid tuple.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    if p.family == family::V4 {
        t.__bindgen_anon_1.ipv4.saddr =
            u32::from_ne_bytes([p.saddr[0], p.saddr[1], p.saddr[2], p.saddr[3]]);
        t.__bindgen_anon_1.ipv4.daddr =
            u32::from_ne_bytes([daddr[0], daddr[1], daddr[2], daddr[3]]);
        t.__bindgen_anon_1.ipv4.sport = p.sport.to_be();
        t.__bindgen_anon_1.ipv4.dport = dport.to_be();
        t
    } else {
        let mut s = [0u32; 4];
        let mut d = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            s[i] = u32::from_ne_bytes([
                p.saddr[4 * i],
                p.saddr[4 * i + 1],
                p.saddr[4 * i + 2],
                p.saddr[4 * i + 3],
            ]);
            d[i] = u32::from_ne_bytes([
                daddr[4 * i],
                daddr[4 * i + 1],
                daddr[4 * i + 2],
                daddr[4 * i + 3],
            ]);
            i += 1;
        }
        t.__bindgen_anon_1.ipv6.saddr = s;
        t.__bindgen_anon_1.ipv6.daddr = d;
        t.__bindgen_anon_1.ipv6.sport = p.sport.to_be();
        t.__bindgen_anon_1.ipv6.dport = dport.to_be();
        t
    }
}

/// Hands the packet to the proxy: the flow's own socket when the proxy already accepted it,
/// else the transparent listener on `proxy_port`.
/// Size of the tuple for the packet's family. Computed right at each helper call (never kept in
/// a variable across code) so that the verifier sees a constant on each branch.
#[inline(always)]
fn tuple_size(p: &Packet) -> u32 {
    if p.family == family::V4 { 12 } else { 36 }
}

#[inline(never)]
fn redirect(ctx: &TcContext, p: &Packet, ep: &EndpointInfo, cfg: &Config, proxy_port: u16) -> i32 {
    let skb = ctx.skb.skb.cast();
    let mut sk: *mut bpf_sock = core::ptr::null_mut();
    if p.protocol == proto::TCP {
        let mut t = tuple_of(p, &p.daddr, p.dport);
        // SAFETY: valid context and tuple; the returned reference is released below.
        let found = unsafe {
            bpf_skc_lookup_tcp(skb, &mut t, tuple_size(p), BPF_F_CURRENT_NETNS as u64, 0)
        };
        if !found.is_null() {
            // SAFETY: non-null socket reference from the lookup.
            if unsafe { (*found).state } != BPF_TCP_LISTEN {
                sk = found;
            } else {
                // SAFETY: releasing the reference we hold.
                unsafe { bpf_sk_release(found.cast()) };
            }
        }
    }
    if sk.is_null() {
        let mut proxy = [0u8; 16];
        if p.family == family::V4 {
            proxy[..4].copy_from_slice(&cfg.proxy_v4);
        } else {
            proxy = cfg.proxy_v6;
        }
        let mut t = tuple_of(p, &proxy, proxy_port);
        // SAFETY: as above.
        sk = unsafe {
            if p.protocol == proto::TCP {
                bpf_skc_lookup_tcp(skb, &mut t, tuple_size(p), BPF_F_CURRENT_NETNS as u64, 0)
            } else {
                bpf_sk_lookup_udp(skb, &mut t, tuple_size(p), BPF_F_CURRENT_NETNS as u64, 0)
            }
        };
        if sk.is_null() {
            return proxy_unavailable(ctx, p, ep);
        }
        // SAFETY: non-null socket reference.
        if p.protocol == proto::TCP && unsafe { (*sk).state } != BPF_TCP_LISTEN {
            // SAFETY: releasing the reference we hold.
            unsafe { bpf_sk_release(sk.cast()) };
            return proxy_unavailable(ctx, p, ep);
        }
    }
    // SAFETY: `sk` is a non-null reference we hold; released right after.
    let ret = unsafe {
        let r = bpf_sk_assign(skb, sk.cast(), 0);
        bpf_sk_release(sk.cast());
        r
    };
    if ret != 0 {
        return proxy_unavailable(ctx, p, ep);
    }
    ctx.set_mark(cfg.redirect_mark);
    count(counter::REDIRECTED, p.len);
    TC_ACT_OK as i32
}

fn proxy_unavailable(ctx: &TcContext, p: &Packet, ep: &EndpointInfo) -> i32 {
    count(counter::PROXY_UNAVAILABLE, p.len);
    let remote = ipcache(p.family, &p.daddr);
    let why = Why {
        remote,
        dir: direction::EGRESS,
        reason: reason::PROXY_UNAVAILABLE,
    };
    emit(ctx, p, ep, &why);
    TC_ACT_SHOT as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
