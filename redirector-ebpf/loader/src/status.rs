//! Read-only status of the datapath, from what is pinned under the pin root: attached programs,
//! map fill levels and counters. Backs `tollgate datapath status`; needs no loaded [`crate::Datapath`].
use std::{fmt, path::Path};

use aya::{
    maps::{Map, MapData, MapError, PerCpuArray},
    programs::SchedClassifier,
};
use tollgate_datapath_common::{Counter, counter, map_names};

use crate::DatapathError;

/// One attached program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Interface.
    pub ifname: String,
    /// `ingress` or `egress`.
    pub hook: String,
    /// Programs the kernel reports on that hook (name and id), in run order.
    pub programs: Vec<(String, u32)>,
}

/// Fill level of one map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapStatus {
    /// Map name.
    pub name: &'static str,
    /// Entries present (`None` for maps that have no countable entries, like the ring buffer).
    pub entries: Option<usize>,
    /// Capacity (entries, or bytes for the ring buffer).
    pub max_entries: u32,
}

/// One counter, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterStatus {
    /// Slot name.
    pub name: &'static str,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// The whole status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Pin root read.
    pub pin_root: String,
    /// Attached programs, by interface and hook.
    pub attachments: Vec<Attachment>,
    /// Maps.
    pub maps: Vec<MapStatus>,
    /// Counters.
    pub counters: Vec<CounterStatus>,
}

fn open(pin_root: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let err = |source: MapError| DatapathError::Map { name, source };
    let data = MapData::from_pin(pin_root.join(name)).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

fn count_entries(name: &str, map: &Map) -> Option<usize> {
    use aya::maps::{HashMap, LpmTrie};
    use tollgate_datapath_common::{CtKey, CtValue, EndpointInfo, PolicyKey, PolicyValue};
    match name {
        map_names::ENDPOINTS => HashMap::<_, u32, EndpointInfo>::try_from(map)
            .ok()
            .map(|m| m.keys().count()),
        map_names::POLICY => HashMap::<_, PolicyKey, PolicyValue>::try_from(map)
            .ok()
            .map(|m| m.keys().count()),
        map_names::CT => HashMap::<_, CtKey, CtValue>::try_from(map)
            .ok()
            .map(|m| m.keys().count()),
        map_names::IPCACHE_V4 => LpmTrie::<_, [u8; 4], u32>::try_from(map)
            .ok()
            .map(|m| m.keys().count()),
        map_names::IPCACHE_V6 => LpmTrie::<_, [u8; 16], u32>::try_from(map)
            .ok()
            .map(|m| m.keys().count()),
        _ => None,
    }
}

/// Reads the status of the datapath pinned under `pin_root`.
pub fn status(pin_root: &Path) -> Result<Status, DatapathError> {
    let mut attachments = Vec::new();
    let links = pin_root.join("links");
    if let Ok(dir) = std::fs::read_dir(&links) {
        let mut names: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for file in names {
            let Some((ifname, hook)) = crate::parse_link_pin_name(&file) else {
                continue;
            };
            let programs = SchedClassifier::query_tcx(&ifname, hook.tc())
                .map(|(_, progs)| {
                    progs
                        .iter()
                        .map(|p| (p.name_as_str().unwrap_or("?").to_owned(), p.id()))
                        .collect()
                })
                .unwrap_or_default();
            attachments.push(Attachment {
                ifname,
                hook: hook.suffix().to_owned(),
                programs,
            });
        }
    }
    let mut maps = Vec::new();
    for name in map_names::ALL {
        let map = open(pin_root, name)?;
        let max_entries = match &map {
            Map::RingBuf(m)
            | Map::HashMap(m)
            | Map::LruHashMap(m)
            | Map::LpmTrie(m)
            | Map::Array(m)
            | Map::PerCpuArray(m) => m.info().map(|i| i.max_entries()).unwrap_or(0),
            _ => 0,
        };
        maps.push(MapStatus {
            name,
            entries: count_entries(name, &map),
            max_entries,
        });
    }
    let name = map_names::COUNTERS;
    let map = open(pin_root, name)?;
    let per_cpu: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
    let mut counters = Vec::new();
    for (slot, cname) in (0..counter::COUNT).zip(counter::NAMES) {
        let values = per_cpu
            .get(&slot, 0)
            .map_err(|source| DatapathError::Map { name, source })?;
        counters.push(CounterStatus {
            name: cname,
            packets: values.iter().map(|c| c.packets).sum(),
            bytes: values.iter().map(|c| c.bytes).sum(),
        });
    }
    Ok(Status {
        pin_root: pin_root.display().to_string(),
        attachments,
        maps,
        counters,
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "datapath pinned at {}", self.pin_root)?;
        writeln!(f, "attached programs:")?;
        if self.attachments.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for a in &self.attachments {
            let progs: Vec<String> = a
                .programs
                .iter()
                .map(|(n, id)| format!("{n}#{id}"))
                .collect();
            writeln!(f, "  {:<16} {:<8} {}", a.ifname, a.hook, progs.join(", "))?;
        }
        writeln!(f, "maps:")?;
        for m in &self.maps {
            match m.entries {
                Some(n) => writeln!(f, "  {:<16} {n:>8} / {}", m.name, m.max_entries)?,
                None => writeln!(f, "  {:<16} {:>8} / {}", m.name, "-", m.max_entries)?,
            }
        }
        writeln!(f, "counters:")?;
        for c in &self.counters {
            writeln!(
                f,
                "  {:<18} {:>12} packets {:>14} bytes",
                c.name, c.packets, c.bytes
            )?;
        }
        Ok(())
    }
}
