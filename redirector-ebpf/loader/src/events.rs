//! Drop events from the kernel's ring buffer, decoded into records user space can print.
use std::{fmt, net::IpAddr};

use aya::maps::{Map, MapData, RingBuf};
use tollgate_datapath_common::{DropEvent, direction, map_names, reason};

use crate::{DatapathError, addr_of};

/// Reads [`DropEvent`]s from the ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl fmt::Debug for EventReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventReader").finish_non_exhaustive()
    }
}

/// A decoded drop event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropRecord {
    /// The raw event.
    pub raw: DropEvent,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
}

impl DropRecord {
    /// Name of the drop reason.
    pub const fn reason_name(&self) -> &'static str {
        match self.raw.reason {
            reason::POLICY_DENY => "policy-deny",
            reason::NO_POLICY => "no-policy",
            reason::PROXY_UNAVAILABLE => "proxy-unavailable",
            reason::AUDIT => "audit",
            _ => "unknown",
        }
    }
}

impl fmt::Display for DropRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.raw;
        let dir = if e.direction == direction::INGRESS {
            "ingress"
        } else {
            "egress"
        };
        write!(
            f,
            "{} {dir} endpoint={} proto={} {}:{} (identity {}) -> {}:{} (identity {})",
            self.reason_name(),
            e.endpoint_id,
            e.protocol,
            self.src,
            e.sport,
            e.src_identity,
            self.dst,
            e.dport,
            e.dst_identity
        )
    }
}

impl EventReader {
    pub(crate) fn from_map(map: Map) -> Result<Self, DatapathError> {
        let name = map_names::EVENTS;
        let ring = RingBuf::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { ring })
    }

    /// Opens the ring buffer pinned under `pin_root` (for a reader beside the agent).
    pub fn open_pinned(pin_root: &std::path::Path) -> Result<Self, DatapathError> {
        let name = map_names::EVENTS;
        let data = MapData::from_pin(pin_root.join(name))
            .map_err(|source| DatapathError::Map { name, source })?;
        let map = Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })?;
        Self::from_map(map)
    }

    /// Returns every event currently in the ring (non-blocking).
    pub fn drain(&mut self) -> Vec<DropRecord> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(raw) = decode(&item) {
                out.push(raw);
            }
        }
        out
    }
}

/// Decodes one ring-buffer record; a record of the wrong size (a mismatched object) is skipped.
fn decode(bytes: &[u8]) -> Option<DropRecord> {
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return None;
    }
    // SAFETY: the length was checked, `DropEvent` is plain old data (any bit pattern is valid),
    // and `read_unaligned` makes no alignment assumption.
    let raw: DropEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(DropRecord {
        src: addr_of(raw.family, &raw.saddr),
        dst: addr_of(raw.family, &raw.daddr),
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_records_are_skipped_not_misread() {
        assert!(decode(&[0u8; 10]).is_none());
    }

    #[test]
    fn records_decode_and_print_with_identities() {
        let mut raw = DropEvent {
            family: 4,
            protocol: 6,
            sport: 40000,
            dport: 80,
            src_identity: 100,
            dst_identity: 200,
            endpoint_id: 7,
            reason: reason::NO_POLICY,
            direction: direction::INGRESS,
            ..Default::default()
        };
        raw.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        // SAFETY: viewing a POD value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw as *const DropEvent).cast::<u8>(),
                size_of::<DropEvent>(),
            )
        };
        let rec = decode(bytes).unwrap();
        assert_eq!(
            rec.to_string(),
            "no-policy ingress endpoint=7 proto=6 10.0.0.1:40000 (identity 100) -> 10.0.0.2:80 (identity 200)"
        );
    }
}
