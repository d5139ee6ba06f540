//! Map key/value layouts shared by the tollgate TC programs (kernel) and their loader (user space).
//!
//! Why a crate of its own: a type that crosses the kernel/user boundary must be defined once, or
//! the two sides silently disagree about a field offset. Every type here is `#[repr(C)]`, has no
//! implicit padding (explicit `_pad` fields, checked by the size assertions at the bottom), and is
//! `Copy`, so it can be written into a BPF map byte for byte. The crate is `no_std` because the
//! eBPF program links it for `bpfel-unknown-none`; the `user` feature adds the `aya::Pod`
//! implementations the loader needs.
//!
//! Conventions: ports are in **host** byte order in keys and events (the program converts), IP
//! addresses are 16 bytes in network order with IPv4 in the first four bytes and `family`
//! telling which.
#![no_std]

pub mod packet;

/// Names of the maps in the eBPF object; the loader looks them up (and pins them) by these names.
pub mod map_names {
    /// IPv4 prefix → identity (LPM trie).
    pub const IPCACHE_V4: &str = "TG_IPCACHE_V4";
    /// IPv6 prefix → identity (LPM trie).
    pub const IPCACHE_V6: &str = "TG_IPCACHE_V6";
    /// ifindex → endpoint.
    pub const ENDPOINTS: &str = "TG_ENDPOINTS";
    /// (endpoint, remote identity, port, protocol, direction) → verdict.
    pub const POLICY: &str = "TG_POLICY";
    /// Connection tracking (LRU).
    pub const CT: &str = "TG_CT";
    /// Per-CPU counters indexed by [`crate::counter`].
    pub const COUNTERS: &str = "TG_COUNTERS";
    /// Ring buffer of [`crate::DropEvent`]s.
    pub const EVENTS: &str = "TG_EVENTS";
    /// Single-entry array holding the [`crate::Config`].
    pub const CONFIG: &str = "TG_CONFIG";
    /// Every map, in a stable order (for status output and pin clean-up).
    pub const ALL: [&str; 8] = [
        IPCACHE_V4, IPCACHE_V6, ENDPOINTS, POLICY, CT, COUNTERS, EVENTS, CONFIG,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// Attached to TC ingress of an endpoint's host-side veth: packets the endpoint sends.
    pub const FROM_ENDPOINT: &str = "tollgate_from_endpoint";
    /// Attached to TC egress of an endpoint's host-side veth: packets delivered to the endpoint.
    pub const TO_ENDPOINT: &str = "tollgate_to_endpoint";
}

/// Map capacities (also the figures `status` reports as "max").
pub mod capacity {
    /// IPv4 ipcache prefixes.
    pub const IPCACHE_V4: u32 = 65_536;
    /// IPv6 ipcache prefixes.
    pub const IPCACHE_V6: u32 = 65_536;
    /// Endpoints per node.
    pub const ENDPOINTS: u32 = 4_096;
    /// Policy entries per node.
    pub const POLICY: u32 = 262_144;
    /// Tracked connections.
    pub const CT: u32 = 262_144;
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
}

/// Policy verdicts (the `verdict` byte of [`PolicyValue`] and [`CtValue`]).
pub mod verdict {
    /// Pass the flow.
    pub const ALLOW: u8 = 1;
    /// Drop the flow and emit a [`crate::DropEvent`].
    pub const DENY: u8 = 2;
    /// Hand the flow to the proxy's transparent listener on `proxy_port`.
    pub const REDIRECT: u8 = 3;
    /// Pass the flow but emit an event, as if it had been denied (policy in audit mode).
    pub const AUDIT: u8 = 4;
}

/// Direction of a policy entry, from the endpoint's point of view.
pub mod direction {
    /// Traffic arriving at the endpoint.
    pub const INGRESS: u8 = 0;
    /// Traffic the endpoint sends.
    pub const EGRESS: u8 = 1;
}

/// IP protocol numbers used in keys; `ANY` is the wildcard.
pub mod proto {
    /// Wildcard: any protocol (only with port 0).
    pub const ANY: u8 = 0;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Reserved identities (Cilium's numbers) and the wildcard.
pub mod identity {
    /// Wildcard in a policy key: any remote identity.
    pub const ANY: u32 = 0;
    /// The node itself.
    pub const HOST: u32 = 1;
    /// Anything the ipcache does not know.
    pub const WORLD: u32 = 2;
}

/// Why a packet was dropped (or, for `AUDIT`, would have been).
pub mod reason {
    /// An explicit deny entry matched.
    pub const POLICY_DENY: u8 = 1;
    /// The direction is enforced and no entry allows the flow (default deny).
    pub const NO_POLICY: u8 = 2;
    /// A redirect verdict found no proxy listener: fail closed.
    pub const PROXY_UNAVAILABLE: u8 = 3;
    /// Audit mode: the flow passed but would have been denied.
    pub const AUDIT: u8 = 4;
}

/// Slots of the per-CPU counter array.
pub mod counter {
    /// New flows allowed by policy.
    pub const ALLOWED: u32 = 0;
    /// Packets passed because the connection tracker knew the flow.
    pub const CT_HIT: u32 = 1;
    /// Packets dropped by policy (deny entry or default deny).
    pub const DENIED: u32 = 2;
    /// Packets handed to the proxy.
    pub const REDIRECTED: u32 = 3;
    /// Packets passed in audit mode.
    pub const AUDITED: u32 = 4;
    /// Packets dropped because the proxy listener was missing.
    pub const PROXY_UNAVAILABLE: u32 = 5;
    /// Packets passed without a verdict (not IP, not from a known endpoint, fragments).
    pub const UNTRACKED: u32 = 6;
    /// Number of slots.
    pub const COUNT: u32 = 7;
    /// Slot names, indexed by slot.
    pub const NAMES: [&str; COUNT as usize] = [
        "allowed",
        "ct_hit",
        "denied",
        "redirected",
        "audited",
        "proxy_unavailable",
        "untracked",
    ];
}

/// Flags of [`EndpointInfo`].
pub mod endpoint_flags {
    /// Ingress is default-deny: only policy entries let traffic in.
    pub const ENFORCE_INGRESS: u32 = 1;
    /// Egress is default-deny.
    pub const ENFORCE_EGRESS: u32 = 2;
}

/// Address families in [`CtKey`] and [`DropEvent`].
pub mod family {
    /// IPv4.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// Value of the endpoints map (key: ifindex of the endpoint's host-side interface, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// Endpoint id, the first field of every [`PolicyKey`] of this endpoint.
    pub endpoint_id: u32,
    /// The endpoint's own security identity (reported in events).
    pub identity: u32,
    /// [`endpoint_flags`].
    pub flags: u32,
}

/// Key of the policy map. Wildcards are explicit values (`identity::ANY`, port 0 with
/// `proto::ANY`), so the program resolves a packet with four exact lookups, never a scan.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyKey {
    /// Endpoint the entry belongs to.
    pub endpoint_id: u32,
    /// Remote identity, or [`identity::ANY`].
    pub remote_identity: u32,
    /// Destination port (host order), or 0 for any.
    pub port: u16,
    /// [`proto`] number; [`proto::ANY`] only with port 0.
    pub protocol: u8,
    /// [`direction`].
    pub direction: u8,
}

/// Value of the policy map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValue {
    /// [`verdict`].
    pub verdict: u8,
    /// Explicit padding, zero.
    pub _pad: u8,
    /// Proxy listener port for [`verdict::REDIRECT`] (host order), else 0.
    pub proxy_port: u16,
}

/// Key of the connection-tracking map: the flow as the endpoint sees it — its own side and the
/// remote side, whichever of them opened it — plus the endpoint. Both directions of a flow have
/// the same key, so one lookup answers a packet and its replies; [`CtValue::direction`] tells
/// which direction opened (and was judged for) the flow. Keeping the endpoint in the key means a
/// flow between two local endpoints is judged by both endpoints' policies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    /// The endpoint's address (source of what it sends, destination of what it receives).
    pub endpoint_addr: [u8; 16],
    /// The remote side's address.
    pub remote_addr: [u8; 16],
    /// Endpoint whose policy admitted the flow.
    pub endpoint_id: u32,
    /// The endpoint's port (host order).
    pub endpoint_port: u16,
    /// The remote side's port (host order).
    pub remote_port: u16,
    /// IP protocol.
    pub protocol: u8,
    /// [`family`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 2],
}

/// Value of the connection-tracking map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns()` of the last packet in either direction (refreshed at most
    /// once a second).
    pub last_seen_ns: u64,
    /// Verdict given to the flow's first packet; later packets in that direction get the same
    /// one, packets in the other direction are its replies and pass.
    pub verdict: u8,
    /// [`direction`] of the policy that admitted the flow: [`direction::EGRESS`] when the
    /// endpoint opened it, [`direction::INGRESS`] when it was opened toward the endpoint.
    pub direction: u8,
    /// Proxy port when the verdict is a redirect.
    pub proxy_port: u16,
    /// Explicit padding, zero.
    pub _pad2: u32,
}

/// A packet the datapath dropped (or passed in audit mode), sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (monotonic, boot-relative).
    pub timestamp_ns: u64,
    /// Source address.
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Identity of the source.
    pub src_identity: u32,
    /// Identity of the destination.
    pub dst_identity: u32,
    /// Endpoint whose policy decided.
    pub endpoint_id: u32,
    /// Interface the program ran on.
    pub ifindex: u32,
    /// Source port (host order; 0 for protocols without ports).
    pub sport: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// IP protocol.
    pub protocol: u8,
    /// [`family`].
    pub family: u8,
    /// [`direction`] of the policy that decided.
    pub direction: u8,
    /// [`reason`].
    pub reason: u8,
}

/// Per-CPU counter slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (skb length).
    pub bytes: u64,
}

/// Mark the proxy puts on the connections it opens toward destinations (`SO_MARK`). A packet
/// carrying it on its way *to* an endpoint is admitted without a policy lookup: the proxy has
/// judged the flow with both sides' policies. Only the bits of [`PROXY_UPSTREAM_MARK_MASK`]
/// count. Workloads cannot forge it: the kernel clears the mark when a packet leaves a network
/// namespace through a veth.
pub const PROXY_UPSTREAM_MARK: u32 = 0x0C00_0000;
/// The bits of the mark that [`PROXY_UPSTREAM_MARK`] occupies.
pub const PROXY_UPSTREAM_MARK_MASK: u32 = 0x0F00_0000;

/// Datapath configuration, index 0 of the config array, written by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Mark set on redirected packets; the loader's `ip rule fwmark` sends them to the local table.
    pub redirect_mark: u32,
    /// Idle time after which a UDP (and other connectionless) flow is judged again.
    pub udp_timeout_secs: u32,
    /// Idle time after which a TCP flow is judged again.
    pub tcp_timeout_secs: u32,
    /// IPv4 address the proxy's transparent listeners are bound to (network order bytes).
    pub proxy_v4: [u8; 4],
    /// IPv6 address the proxy's transparent listeners are bound to.
    pub proxy_v6: [u8; 16],
}

impl Default for Config {
    fn default() -> Self {
        Self {
            redirect_mark: 0x0B00_0000,
            udp_timeout_secs: 30,
            tcp_timeout_secs: 6 * 3600,
            proxy_v4: [127, 0, 0, 1],
            proxy_v6: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        }
    }
}

// The layouts must not have implicit padding: the kernel compares keys byte for byte.
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 12);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);
const _: () = assert!(core::mem::size_of::<CtKey>() == 44);
const _: () = assert!(core::mem::size_of::<CtValue>() == 16);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 64);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<Config>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays, and has
    // no implicit padding (asserted above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DropEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}
