//! User-space half of tollgate's kernel datapath: loads the TC programs built from
//! `redirector-ebpf/ebpf`, pins their maps and links under `/sys/fs/bpf/tollgate/`, attaches
//! them to endpoint interfaces, and gives the agent a typed API for the maps.
//!
//! Why pinning everywhere: enforcement must survive an agent restart. Maps are pinned by name
//! (a restarted loader reuses them, so the ipcache, policy and connection tracker are not
//! flushed) and the TCX links are pinned per interface and direction (a restarted loader swaps
//! the program inside the existing link atomically with `bpf_link_update`, so no packet ever
//! sees an interface without a program and established flows keep their verdicts).
//!
//! Only the agent writes maps (DESIGN.md §2); `status()` is read-only and needs no loaded
//! [`Datapath`], so `tollgate datapath status` can run beside a live agent.

mod error;
mod events;
mod routing;
mod status;

use std::{
    collections::HashMap as StdHashMap,
    ffi::CString,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
    util::KernelVersion,
};
pub use error::DatapathError;
pub use events::{DropRecord, EventReader};
use ipnet::IpNet;
pub use routing::RedirectRouting;
pub use status::{Attachment, CounterStatus, MapStatus, Status, status};
pub use tollgate_datapath_common as common;
use tollgate_datapath_common::{
    Config, CtKey, EndpointInfo, PolicyKey, PolicyValue, map_names, program_names, proto, verdict,
};

/// The eBPF object, built by `build.rs` (aya-build, nightly, bpf-linker).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate-datapath"));

/// Default pin directory (DESIGN.md §5).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/tollgate";

/// How to load the datapath.
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// Directory on a bpffs where maps (`<root>/<MAP>`) and links (`<root>/links/…`) are pinned.
    pub pin_root: PathBuf,
    /// Datapath configuration written to the config map.
    pub config: Config,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            config: Config::default(),
        }
    }
}

/// Which way an attached program looks at an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// TC ingress of the host-side veth: what the endpoint sends (its egress policy).
    FromEndpoint,
    /// TC egress of the host-side veth: what is delivered to the endpoint (its ingress policy).
    ToEndpoint,
}

impl Hook {
    pub(crate) const ALL: [Self; 2] = [Self::FromEndpoint, Self::ToEndpoint];

    const fn program(self) -> &'static str {
        match self {
            Self::FromEndpoint => program_names::FROM_ENDPOINT,
            Self::ToEndpoint => program_names::TO_ENDPOINT,
        }
    }

    pub(crate) const fn tc(self) -> TcAttachType {
        match self {
            Self::FromEndpoint => TcAttachType::Ingress,
            Self::ToEndpoint => TcAttachType::Egress,
        }
    }

    /// Suffix of the pinned link's file name.
    pub const fn suffix(self) -> &'static str {
        match self {
            Self::FromEndpoint => "ingress",
            Self::ToEndpoint => "egress",
        }
    }
}

/// Path of the pinned link of `hook` on `ifname`: `<root>/links/<ifname>@<hook>`. bpffs
/// refuses dots in names, so a dot of the interface name (VLANs) is written as `:`, a
/// character interface names cannot hold (reversible).
pub fn link_pin_path(pin_root: &Path, ifname: &str, hook: Hook) -> PathBuf {
    pin_root
        .join("links")
        .join(format!("{}@{}", ifname.replace('.', ":"), hook.suffix()))
}

/// Inverse of [`link_pin_path`]'s file name: the interface and hook.
pub fn parse_link_pin_name(file: &str) -> Option<(String, Hook)> {
    let (ifname, suffix) = file.rsplit_once('@')?;
    let hook = Hook::ALL.into_iter().find(|h| h.suffix() == suffix)?;
    Some((ifname.replace(':', "."), hook))
}

/// One policy entry the agent writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEntry {
    /// The key (endpoint, remote identity, port, protocol, direction).
    pub key: PolicyKey,
    /// The verdict.
    pub value: PolicyValue,
}

impl PolicyEntry {
    /// Checks the entry's invariants, so a bad entry is refused with a reason instead of being
    /// written and silently never matching.
    pub fn validate(&self) -> Result<(), DatapathError> {
        let k = &self.key;
        let v = &self.value;
        let invalid = |detail: String| Err(DatapathError::InvalidEntry { detail });
        if k.direction > 1 {
            return invalid(format!(
                "direction {} is neither 0 (ingress) nor 1 (egress)",
                k.direction
            ));
        }
        if k.protocol == proto::ANY && k.port != 0 {
            return invalid(format!(
                "port {} with protocol ANY: a port needs a protocol",
                k.port
            ));
        }
        match v.verdict {
            verdict::ALLOW | verdict::DENY | verdict::AUDIT if v.proxy_port == 0 => Ok(()),
            verdict::ALLOW | verdict::DENY | verdict::AUDIT => invalid(format!(
                "proxy port {} on a verdict that is not a redirect",
                v.proxy_port
            )),
            verdict::REDIRECT if v.proxy_port != 0 => Ok(()),
            verdict::REDIRECT => invalid("redirect without a proxy port".to_owned()),
            other => invalid(format!("unknown verdict {other}")),
        }
    }
}

/// A loaded datapath: programs in the kernel, maps pinned, links pinned per interface.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    pin_root: PathBuf,
    links: StdHashMap<(String, Hook), PinnedLink>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Fails with a precise message when the kernel or the machine lacks what the datapath needs.
fn preflight(pin_root: &Path) -> Result<(), DatapathError> {
    let version = KernelVersion::current().map_err(|e| DatapathError::MissingKernelFeature {
        what: "kernel version",
        hint: format!("cannot read it ({e})"),
    })?;
    if version < KernelVersion::new(6, 6, 0) {
        return Err(DatapathError::MissingKernelFeature {
            what: "TCX links (Linux >= 6.6)",
            hint: format!(
                "this kernel is {version:?}; pinned, atomically replaceable TC links need 6.6"
            ),
        });
    }
    let parent = pin_root.parent().unwrap_or(pin_root);
    if !is_bpffs(parent) {
        return Err(DatapathError::MissingKernelFeature {
            what: "BPF filesystem",
            hint: format!(
                "{} is not a bpffs: mount -t bpf bpf {}",
                parent.display(),
                parent.display()
            ),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libcs"
    )]
    let magic = st.f_type as i64;
    rc == 0 && magic == BPF_FS_MAGIC
}

/// ifindex of `ifname`, or a precise error.
pub fn ifindex(ifname: &str) -> Result<u32, DatapathError> {
    let c = CString::new(ifname).map_err(|_| DatapathError::NoSuchInterface(ifname.to_owned()))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(DatapathError::NoSuchInterface(ifname.to_owned()))
    } else {
        Ok(idx)
    }
}

impl Datapath {
    /// Loads the programs, reusing the maps already pinned under `opts.pin_root` (a restart)
    /// or pinning fresh ones (a first start), and writes the configuration.
    pub fn load(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        preflight(&opts.pin_root)?;
        let links_dir = opts.pin_root.join("links");
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&opts.pin_root)
            .load(OBJECT)
            .map_err(DatapathError::Load)?;
        for name in [program_names::FROM_ENDPOINT, program_names::TO_ENDPOINT] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingObject { name })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut dp = Self {
            ebpf,
            pin_root: opts.pin_root.clone(),
            links: StdHashMap::new(),
        };
        dp.set_config(&opts.config)?;
        Ok(dp)
    }

    /// The pin directory.
    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// Writes the datapath configuration.
    pub fn set_config(&mut self, config: &Config) -> Result<(), DatapathError> {
        let name = map_names::CONFIG;
        let mut map: Array<&mut MapData, Config> = self.map(name)?;
        map.set(0, config, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingObject { name })?
            .try_into()
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Attaches both programs to `ifname` (an endpoint's host-side interface, or the uplink).
    /// When a pinned link already exists (a previous loader attached it), the program inside
    /// it is replaced atomically: traffic never sees the interface without a program.
    pub fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        ifindex(ifname)?;
        for hook in Hook::ALL {
            let path = link_pin_path(&self.pin_root, ifname, hook);
            let name = hook.program();
            let attach_err = |source| DatapathError::Attach {
                ifname: ifname.to_owned(),
                hook: hook.suffix(),
                source,
            };
            let link_err = |source| DatapathError::Link {
                ifname: ifname.to_owned(),
                hook: hook.suffix(),
                source,
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingObject { name })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            match PinnedLink::from_pin(&path) {
                Ok(old) => {
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(old)).map_err(link_err)?;
                    let id = prog.attach_to_link(link).map_err(attach_err)?;
                    // The pin keeps the link alive; hand the fd back to the kernel.
                    drop(prog.take_link(id).map_err(attach_err)?);
                    let again = PinnedLink::from_pin(&path).map_err(link_err)?;
                    self.links.insert((ifname.to_owned(), hook), again);
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    let id = prog
                        .attach_with_options(
                            ifname,
                            hook.tc(),
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(attach_err)?;
                    let link = prog.take_link(id).map_err(attach_err)?;
                    let fd: FdLink = link.try_into().map_err(link_err)?;
                    let pinned = fd.pin(&path).map_err(|source| DatapathError::Pin {
                        path: path.clone(),
                        source,
                    })?;
                    self.links.insert((ifname.to_owned(), hook), pinned);
                }
                Err(e) => return Err(link_err(e)),
            }
        }
        Ok(())
    }

    /// Detaches both programs from `ifname` and removes the pinned links. Detaching an
    /// interface that has no program is not an error (idempotent).
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        detach_pinned(&self.pin_root, ifname)?;
        for hook in Hook::ALL {
            self.links.remove(&(ifname.to_owned(), hook));
        }
        Ok(())
    }

    /// Registers (or updates) the endpoint behind interface `ifname`.
    pub fn upsert_endpoint(
        &mut self,
        ifname: &str,
        info: EndpointInfo,
    ) -> Result<(), DatapathError> {
        let idx = ifindex(ifname)?;
        let name = map_names::ENDPOINTS;
        let mut map: HashMap<&mut MapData, u32, EndpointInfo> = self.map(name)?;
        map.insert(idx, info, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// The endpoint registered behind interface index `ifindex`, if any.
    pub fn endpoint(&mut self, ifindex: u32) -> Result<Option<EndpointInfo>, DatapathError> {
        let name = map_names::ENDPOINTS;
        let map: HashMap<&mut MapData, u32, EndpointInfo> = self.map(name)?;
        match map.get(&ifindex, 0) {
            Ok(info) => Ok(Some(info)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map { name, source }),
        }
    }

    /// Removes the endpoint behind interface index `ifindex`.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let name = map_names::ENDPOINTS;
        let mut map: HashMap<&mut MapData, u32, EndpointInfo> = self.map(name)?;
        ignore_missing(map.remove(&ifindex)).map_err(|source| DatapathError::Map { name, source })
    }

    /// Maps prefixes to identities (longest prefix wins in the kernel).
    pub fn upsert_ipcache(&mut self, entries: &[(IpNet, u32)]) -> Result<(), DatapathError> {
        for (net, id) in entries {
            match net {
                IpNet::V4(n) => {
                    let name = map_names::IPCACHE_V4;
                    let mut map: LpmTrie<&mut MapData, [u8; 4], u32> = self.map(name)?;
                    let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                    map.insert(&key, id, 0)
                        .map_err(|source| DatapathError::Map { name, source })?;
                }
                IpNet::V6(n) => {
                    let name = map_names::IPCACHE_V6;
                    let mut map: LpmTrie<&mut MapData, [u8; 16], u32> = self.map(name)?;
                    let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                    map.insert(&key, id, 0)
                        .map_err(|source| DatapathError::Map { name, source })?;
                }
            }
        }
        Ok(())
    }

    /// Removes prefixes from the ipcache; absent ones are ignored.
    pub fn remove_ipcache(&mut self, nets: &[IpNet]) -> Result<(), DatapathError> {
        for net in nets {
            match net {
                IpNet::V4(n) => {
                    let name = map_names::IPCACHE_V4;
                    let mut map: LpmTrie<&mut MapData, [u8; 4], u32> = self.map(name)?;
                    let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                    ignore_missing(map.remove(&key))
                        .map_err(|source| DatapathError::Map { name, source })?;
                }
                IpNet::V6(n) => {
                    let name = map_names::IPCACHE_V6;
                    let mut map: LpmTrie<&mut MapData, [u8; 16], u32> = self.map(name)?;
                    let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                    ignore_missing(map.remove(&key))
                        .map_err(|source| DatapathError::Map { name, source })?;
                }
            }
        }
        Ok(())
    }

    /// Writes a batch of policy entries. Every entry is validated before the first write, so
    /// a bad batch changes nothing.
    pub fn upsert_policy(&mut self, entries: &[PolicyEntry]) -> Result<(), DatapathError> {
        entries.iter().try_for_each(PolicyEntry::validate)?;
        let name = map_names::POLICY;
        let mut map: HashMap<&mut MapData, PolicyKey, PolicyValue> = self.map(name)?;
        for e in entries {
            map.insert(e.key, e.value, 0)
                .map_err(|source| DatapathError::Map { name, source })?;
        }
        Ok(())
    }

    /// Removes policy entries; absent ones are ignored.
    pub fn remove_policy(&mut self, keys: &[PolicyKey]) -> Result<(), DatapathError> {
        let name = map_names::POLICY;
        let mut map: HashMap<&mut MapData, PolicyKey, PolicyValue> = self.map(name)?;
        for k in keys {
            ignore_missing(map.remove(k)).map_err(|source| DatapathError::Map { name, source })?;
        }
        Ok(())
    }

    /// Forgets every tracked flow of `endpoint_id`, so its next packets are judged by the
    /// current policy (call after revoking an allow, to cut flows that are already open).
    pub fn flush_flows(&mut self, endpoint_id: u32) -> Result<usize, DatapathError> {
        let name = map_names::CT;
        let mut map: HashMap<&mut MapData, CtKey, tollgate_datapath_common::CtValue> =
            self.map(name)?;
        let doomed: Vec<CtKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.endpoint_id == endpoint_id)
            .collect();
        for k in &doomed {
            ignore_missing(map.remove(k)).map_err(|source| DatapathError::Map { name, source })?;
        }
        Ok(doomed.len())
    }

    /// Takes the drop-event ring buffer (once; later calls fail with `MissingObject`).
    pub fn take_events(&mut self) -> Result<EventReader, DatapathError> {
        let name = map_names::EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingObject { name })?;
        EventReader::from_map(map)
    }

    /// Installs the policy routing that delivers redirected (marked) packets locally.
    pub fn install_redirect_routing(&self, routing: &RedirectRouting) -> Result<(), DatapathError> {
        routing.install()
    }
}

/// Detaches both hooks of `ifname` by removing their pinned links (works without a loaded
/// [`Datapath`], e.g. from a clean-up path).
pub fn detach_pinned(pin_root: &Path, ifname: &str) -> Result<(), DatapathError> {
    for hook in Hook::ALL {
        let path = link_pin_path(pin_root, ifname, hook);
        match PinnedLink::from_pin(&path) {
            Ok(link) => {
                drop(link.unpin().map_err(io_err(&path))?);
            }
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::Link {
                    ifname: ifname.to_owned(),
                    hook: hook.suffix(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Removes every pinned map and link under `pin_root` (the datapath stops enforcing on every
/// interface). For uninstall and for tests.
pub fn unpin_all(pin_root: &Path) -> Result<(), DatapathError> {
    let links = pin_root.join("links");
    if let Ok(dir) = std::fs::read_dir(&links) {
        for e in dir.flatten() {
            std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
        }
        std::fs::remove_dir(&links).map_err(io_err(&links))?;
    }
    for name in map_names::ALL {
        let p = pin_root.join(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&p)(e)),
            _ => {}
        }
    }
    match std::fs::remove_dir(pin_root) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(pin_root)(e)),
        _ => Ok(()),
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Formats a 16-byte address of `family` as an [`IpAddr`].
pub fn addr_of(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == tollgate_datapath_common::family::V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, protocol: u8, v: u8, proxy_port: u16) -> PolicyEntry {
        PolicyEntry {
            key: PolicyKey {
                endpoint_id: 1,
                remote_identity: 100,
                port,
                protocol,
                direction: tollgate_datapath_common::direction::INGRESS,
            },
            value: PolicyValue {
                verdict: v,
                _pad: 0,
                proxy_port,
            },
        }
    }

    #[test]
    fn policy_entry_validation_refuses_inconsistent_entries_with_a_reason() {
        assert!(entry(80, proto::TCP, verdict::ALLOW, 0).validate().is_ok());
        assert!(entry(0, proto::ANY, verdict::DENY, 0).validate().is_ok());
        assert!(
            entry(53, proto::UDP, verdict::REDIRECT, 15053)
                .validate()
                .is_ok()
        );
        let msg = |e: PolicyEntry| e.validate().unwrap_err().to_string();
        assert!(msg(entry(80, proto::ANY, verdict::ALLOW, 0)).contains("a port needs a protocol"));
        assert!(msg(entry(80, proto::TCP, verdict::REDIRECT, 0)).contains("without a proxy port"));
        assert!(msg(entry(80, proto::TCP, verdict::ALLOW, 9)).contains("not a redirect"));
        assert!(msg(entry(80, proto::TCP, 9, 0)).contains("unknown verdict 9"));
    }

    #[test]
    fn link_pins_are_named_by_interface_and_hook() {
        let p = link_pin_path(Path::new("/sys/fs/bpf/tollgate"), "veth1", Hook::ToEndpoint);
        assert_eq!(p, Path::new("/sys/fs/bpf/tollgate/links/veth1@egress"));
        let vlan = link_pin_path(Path::new("/x"), "eth0.100", Hook::FromEndpoint);
        let name = vlan.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "eth0:100@ingress");
        assert_eq!(
            parse_link_pin_name(name),
            Some(("eth0.100".to_owned(), Hook::FromEndpoint))
        );
        assert_eq!(parse_link_pin_name("junk"), None);
    }

    #[test]
    fn addresses_render_by_family() {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(addr_of(4, &b).to_string(), "10.1.2.3");
        b[15] = 1;
        b[..4].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(addr_of(6, &b).to_string(), "::1");
    }
}
