//! tollgate's TC datapath: L3/L4 identity enforcement and transparent redirect to the proxy.
//!
//! Two classifiers share one set of maps (layouts in `tollgate-datapath-common`):
//! `tollgate_from_endpoint` runs on TC ingress of an endpoint's host-side veth (what the endpoint
//! sends: its egress policy) and `tollgate_to_endpoint` on TC egress of the same interface (what
//! is delivered to it: its ingress policy).
//!
//! Per packet the cost is bounded and independent of the policy size: one endpoint lookup, one
//! connection-tracking lookup (both directions of a flow share one entry), and for the first
//! packet of a flow one LPM lookup plus four exact policy lookups (exact, any-port,
//! any-identity, any-both), deny winning over everything. The first packet's verdict is stored
//! in the LRU connection tracker so the rest of the flow, and its replies, follow it; a
//! redirected flow stays redirected for its lifetime. Headers are read straight from the skb's
//! linear data (bounds-checked), with `bpf_skb_load_bytes` only for bytes outside it.
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
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_sk_assign, bpf_sk_lookup_udp,
        bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use tollgate_datapath_common::{
    Config, Counter, CtKey, CtValue, DropEvent, EndpointInfo, PROXY_UPSTREAM_MARK,
    PROXY_UPSTREAM_MARK_MASK, PolicyKey, PolicyValue, capacity, counter, direction, endpoint_flags,
    family, identity,
    packet::{self, Bytes, Headers, words_to_bytes},
    proto, reason, verdict,
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

const NS_PER_SEC: u64 = 1_000_000_000;

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

/// The packet as [`packet::parse`] reads it: bytes in the skb's linear data are read directly
/// (one bounds check against `data_end`, which is what the verifier needs to see), anything
/// else with `bpf_skb_load_bytes`. On a veth the headers are nearly always linear; when they are
/// not (a paged skb, e.g. from a packet socket with a virtio-net header), the helper reads the
/// same bytes from the pages, and fails exactly when the packet is too short, so a non-linear
/// packet is judged the same as a linear one.
struct Skb<'a>(&'a TcContext);

impl Bytes for Skb<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let start = self.0.data();
        let end = self.0.data_end();
        // At least two bytes: for one, LLVM turns `p + 1 <= end` into `p < end`, from which
        // the verifier learns no range at offset 0. A one-byte field in the last linear byte
        // then takes the helper, which reads it all the same.
        let need = if N < 2 { 2 } else { N };
        if start + off + need <= end {
            // SAFETY: `[start + off, start + off + N)` lies inside the linear packet data
            // (checked just above); `[u8; N]` has no alignment requirement.
            Some(unsafe { ((start + off) as *const [u8; N]).read() })
        } else {
            self.0.load::<[u8; N]>(off).ok()
        }
    }
}

#[inline(never)]
fn parse(ctx: &TcContext) -> Option<Headers> {
    packet::parse(&Skb(ctx))
}

fn ipcache(fam: u8, addr: &[u32; 4]) -> u32 {
    let id = if fam == family::V4 {
        IPCACHE_V4.get(Key::new(32, addr[0].to_ne_bytes())).copied()
    } else {
        IPCACHE_V6.get(Key::new(128, words_to_bytes(addr))).copied()
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
fn decide(ep: &EndpointInfo, remote: u32, p: &Headers, dir: u8) -> (u8, u16, u8) {
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
fn emit(ctx: &TcContext, p: &Headers, ep: &EndpointInfo, why: &Why) {
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
            saddr: p.saddr_bytes(),
            daddr: p.daddr_bytes(),
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
    // The coarse clock (the last tick) is plenty for timeouts of seconds and, unlike
    // `bpf_ktime_get_ns`, reads no clock source.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    // 1. A flow this endpoint opened or that was opened to it, in either direction: one entry
    //    keyed by (endpoint side, remote side) answers the flow's packets and its replies.
    let (ep_addr, remote_addr, ep_port, remote_port) = if dir == direction::EGRESS {
        (&p.saddr, &p.daddr, p.sport, p.dport)
    } else {
        (&p.daddr, &p.saddr, p.dport, p.sport)
    };
    let key = CtKey {
        endpoint_addr: words_to_bytes(ep_addr),
        remote_addr: words_to_bytes(remote_addr),
        endpoint_id: ep.endpoint_id,
        endpoint_port: ep_port,
        remote_port,
        protocol: p.protocol,
        family: p.family,
        _pad: [0; 2],
    };
    if let Some(ct) = ct_lookup(&key, now, &cfg) {
        count(counter::CT_HIT, len);
        // Packets in the direction that opened the flow follow its verdict; the other
        // direction carries its replies, which pass.
        if ct.direction == dir && ct.verdict == verdict::REDIRECT && dir == direction::EGRESS {
            return redirect(ctx, &p, &ep, &cfg, ct.proxy_port);
        }
        return TC_ACT_OK as i32;
    }

    // 2. A new flow: the proxy's own upstream connection (already judged by it, with both
    //    sides' policies) or judged here by policy.
    let remote = ipcache(p.family, remote_addr);
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
                direction: dir,
                proxy_port,
                _pad2: 0,
            };
            // A full LRU evicts the oldest flow; an error here only costs a re-evaluation.
            // An expired entry of the flow (either direction) is overwritten: the flow was
            // judged again, in the direction of this packet.
            let _ = CT.insert(&key, &entry, 0);
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

fn tuple_of(p: &Headers, daddr: &[u32; 4], dport: u16) -> bpf_sock_tuple {
    // SAFETY: all-zero is a valid tuple.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    if p.family == family::V4 {
        t.__bindgen_anon_1.ipv4.saddr = p.saddr[0];
        t.__bindgen_anon_1.ipv4.daddr = daddr[0];
        t.__bindgen_anon_1.ipv4.sport = p.sport.to_be();
        t.__bindgen_anon_1.ipv4.dport = dport.to_be();
    } else {
        t.__bindgen_anon_1.ipv6.saddr = p.saddr;
        t.__bindgen_anon_1.ipv6.daddr = *daddr;
        t.__bindgen_anon_1.ipv6.sport = p.sport.to_be();
        t.__bindgen_anon_1.ipv6.dport = dport.to_be();
    }
    t
}

/// Size of the tuple for the packet's family. Computed right at each helper call (never kept in
/// a variable across code) so that the verifier sees a constant on each branch.
#[inline(always)]
fn tuple_size(p: &Headers) -> u32 {
    if p.family == family::V4 { 12 } else { 36 }
}

/// Hands the packet to the proxy: the flow's own socket when the proxy already accepted it,
/// else the transparent listener on `proxy_port`.
#[inline(never)]
fn redirect(ctx: &TcContext, p: &Headers, ep: &EndpointInfo, cfg: &Config, proxy_port: u16) -> i32 {
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
        let mut proxy = [0u32; 4];
        if p.family == family::V4 {
            proxy[0] = u32::from_ne_bytes(cfg.proxy_v4);
        } else {
            let b = &cfg.proxy_v6;
            let mut i = 0;
            while i < 4 {
                proxy[i] = u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
                i += 1;
            }
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
    count(counter::REDIRECTED, ctx.len());
    TC_ACT_OK as i32
}

fn proxy_unavailable(ctx: &TcContext, p: &Headers, ep: &EndpointInfo) -> i32 {
    count(counter::PROXY_UNAVAILABLE, ctx.len());
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
