//! Cluster addresses and node ports, each unique in the cluster.
//!
//! The controller's memory of who holds what is rebuilt from the services' statuses when it
//! starts (oldest service first), so allocations survive a restart of the controller. A holder
//! that no longer exists (its service was deleted, or deleted and created again under the same
//! name) loses its hold the next time someone needs the address or port.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

/// A block of IPv4 addresses written as a CIDR (`127.64.0.0/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    first: u32,
    size: u32,
}

impl AddressRange {
    /// Parses `a.b.c.d/len` (len 8-30), refusing anything else with the reason.
    pub fn parse(cidr: &str) -> Result<Self, String> {
        let (addr, len) = cidr.split_once('/').ok_or_else(|| format!("{cidr:?}: expected a.b.c.d/len"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{cidr:?}: {addr:?} is not an IPv4 address"))?;
        let len: u32 = len.parse().map_err(|_| format!("{cidr:?}: {len:?} is not a prefix length"))?;
        if !(8..=30).contains(&len) {
            return Err(format!("{cidr:?}: the prefix length must be 8-30 (is {len})"));
        }
        let mask = u32::MAX << (32 - len);
        let base = u32::from(addr);
        if base & !mask != 0 {
            return Err(format!("{cidr:?}: host bits are set (the block starts at {})", Ipv4Addr::from(base & mask)));
        }
        // The block's first (network) and last (broadcast) addresses are never handed out.
        Ok(AddressRange { first: base + 1, size: (1u32 << (32 - len)) - 2 })
    }

    fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.first + i)
    }
}

impl Default for AddressRange {
    fn default() -> Self {
        AddressRange::parse(super::DEFAULT_CLUSTER_RANGE).expect("the default range parses")
    }
}

/// Who holds something: a service's key and uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Holder {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) uid: String,
}

/// What the controller knows is taken.
#[derive(Debug, Default)]
pub(super) struct Allocations {
    pub(super) loaded: bool,
    addresses: HashMap<Ipv4Addr, Holder>,
    node_ports: HashMap<u16, Holder>,
    /// What each holder was given (entries may since have gone to another holder: the maps
    /// above decide), so a release looks at its own entries only.
    given: HashMap<(String, String), (Vec<Ipv4Addr>, Vec<u16>)>,
    address_cursor: u32,
    port_cursor: u16,
}

/// Why something could not be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Conflict {
    /// `ClusterAddressConflict`, `NodePortConflict`, `ClusterAddressesExhausted`,
    /// `NodePortsExhausted`.
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl Allocations {
    /// Records what a service's status says it holds (at start-up); what another holds already
    /// is not taken over.
    pub(super) fn adopt(&mut self, holder: &Holder, address: Option<&str>, node_ports: &BTreeMap<String, u32>) {
        if let Some(a) = address.and_then(|a| a.parse::<Ipv4Addr>().ok())
            && !self.addresses.contains_key(&a)
        {
            self.claim_address(a, holder);
        }
        for p in node_ports.values().filter_map(|p| u16::try_from(*p).ok()) {
            if !self.node_ports.contains_key(&p) {
                self.claim_port(p, holder);
            }
        }
    }

    /// The cluster address of `holder`: the one its status names if it holds it, else a new
    /// one. `alive` says whether another holder still exists.
    pub(super) fn address(
        &mut self,
        holder: &Holder,
        current: Option<&str>,
        range: &AddressRange,
        alive: &dyn Fn(&Holder) -> bool,
    ) -> Result<(Ipv4Addr, Option<Conflict>), Conflict> {
        let mut conflict = None;
        if let Some(a) = current.and_then(|a| a.parse::<Ipv4Addr>().ok()) {
            match self.addresses.get(&a) {
                Some(h) if h == holder => return Ok((a, None)),
                Some(h) if alive(h) => {
                    conflict = Some(Conflict {
                        reason: "ClusterAddressConflict",
                        message: format!("{a} is held by service {}/{}; a new address was given", h.namespace, h.name),
                    })
                }
                _ => {
                    self.claim_address(a, holder);
                    return Ok((a, None));
                }
            }
        }
        for _ in 0..range.size {
            let a = range.nth(self.address_cursor % range.size);
            self.address_cursor = (self.address_cursor + 1) % range.size;
            let free = match self.addresses.get(&a) {
                None => true,
                Some(h) => h != holder && !alive(h),
            };
            if free {
                self.claim_address(a, holder);
                return Ok((a, conflict));
            }
        }
        Err(Conflict {
            reason: "ClusterAddressesExhausted",
            message: format!("no free cluster address in the range of {} addresses", range.size),
        })
    }

    /// Gives up everything `holder` holds (the service became headless, or is no node-port
    /// service any more) except what `keep` names.
    pub(super) fn release_except(&mut self, holder: &Holder, keep_address: Option<Ipv4Addr>, keep_ports: &[u16]) {
        let key = (holder.namespace.clone(), holder.name.clone());
        let Some((addresses, ports)) = self.given.get_mut(&key) else { return };
        let (addresses, ports) = (std::mem::take(addresses), std::mem::take(ports));
        let mut kept = (Vec::new(), Vec::new());
        for a in addresses {
            if self.addresses.get(&a) != Some(holder) {
                continue; // someone else's now
            }
            if Some(a) == keep_address {
                kept.0.push(a);
            } else {
                self.addresses.remove(&a);
            }
        }
        for p in ports {
            if self.node_ports.get(&p) != Some(holder) {
                continue;
            }
            if keep_ports.contains(&p) {
                kept.1.push(p);
            } else {
                self.node_ports.remove(&p);
            }
        }
        if kept.0.is_empty() && kept.1.is_empty() {
            self.given.remove(&key);
        } else {
            self.given.insert(key, kept);
        }
    }

    fn claim_address(&mut self, a: Ipv4Addr, holder: &Holder) {
        self.addresses.insert(a, holder.clone());
        let given = self.given.entry((holder.namespace.clone(), holder.name.clone())).or_default();
        if !given.0.contains(&a) {
            given.0.push(a);
        }
    }

    fn claim_port(&mut self, p: u16, holder: &Holder) {
        self.node_ports.insert(p, holder.clone());
        let given = self.given.entry((holder.namespace.clone(), holder.name.clone())).or_default();
        if !given.1.contains(&p) {
            given.1.push(p);
        }
    }

    /// The node port for one service port: `fixed` if the spec asks for it (a conflict when
    /// another live service holds it, refused when outside `range`), else the one it `had`
    /// (when still in `range`), else a new one from `range`. An empty `range` (start after
    /// end) gives nothing: a `NodePortRangeEmpty` conflict, never a panic.
    pub(super) fn node_port(
        &mut self,
        holder: &Holder,
        fixed: Option<u32>,
        had: Option<u32>,
        range: &RangeInclusive<u16>,
        alive: &dyn Fn(&Holder) -> bool,
    ) -> Result<u16, Conflict> {
        let take = |this: &mut Self, p: u16| -> Result<u16, Holder> {
            match this.node_ports.get(&p) {
                Some(h) if h != holder && alive(h) => Err(h.clone()),
                _ => {
                    this.claim_port(p, holder);
                    Ok(p)
                }
            }
        };
        let (lo, hi) = (*range.start(), *range.end());
        if lo > hi {
            return Err(Conflict {
                reason: "NodePortRangeEmpty",
                message: format!("the controller's node-port range {lo}-{hi} is empty"),
            });
        }
        if let Some(f) = fixed {
            if !(u32::from(lo)..=u32::from(hi)).contains(&f) {
                return Err(Conflict {
                    reason: "NodePortOutOfRange",
                    message: format!("nodePort {f} is outside the controller's node-port range {lo}-{hi}"),
                });
            }
            let p = u16::try_from(f)
                .map_err(|_| Conflict { reason: "NodePortConflict", message: format!("{f} is not a port") })?;
            return take(self, p).map_err(|h| Conflict {
                reason: "NodePortConflict",
                message: format!("node port {p} is held by service {}/{}", h.namespace, h.name),
            });
        }
        if let Some(p) = had.and_then(|p| u16::try_from(p).ok()).filter(|p| range.contains(p))
            && let Ok(p) = take(self, p)
        {
            return Ok(p);
        }
        let size = u32::from(hi - lo) + 1;
        let mut p = self.port_cursor.clamp(lo, hi);
        for _ in 0..size {
            let candidate = p;
            p = if p == hi { lo } else { p + 1 };
            let free = match self.node_ports.get(&candidate) {
                None => true,
                Some(h) => h != holder && !alive(h),
            };
            if free {
                self.port_cursor = p;
                self.claim_port(candidate, holder);
                return Ok(candidate);
            }
        }
        Err(Conflict { reason: "NodePortsExhausted", message: format!("no free node port in {lo}-{hi}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(name: &str) -> Holder {
        Holder { namespace: "default".into(), name: name.into(), uid: format!("uid-{name}") }
    }

    #[test]
    fn ranges_parse_or_say_why_not() {
        let r = AddressRange::parse("127.64.0.0/16").unwrap();
        assert_eq!((r.nth(0), r.size), (Ipv4Addr::new(127, 64, 0, 1), 65534));
        assert!(AddressRange::parse("127.64.0.1/16").unwrap_err().contains("host bits"));
        assert!(AddressRange::parse("127.64.0.0").unwrap_err().contains("a.b.c.d/len"));
        assert!(AddressRange::parse("127.64.0.0/31").unwrap_err().contains("8-30"));
    }

    #[test]
    fn addresses_are_unique_kept_and_reused_once_their_holder_is_gone() {
        let range = AddressRange::parse("10.0.0.0/30").unwrap(); // two usable addresses
        let mut a = Allocations::default();
        let (x, y, z) = (holder("x"), holder("y"), holder("z"));
        let all_alive = |_: &Holder| true;
        let (ax, _) = a.address(&x, None, &range, &all_alive).unwrap();
        let (ay, _) = a.address(&y, None, &range, &all_alive).unwrap();
        assert_ne!(ax, ay);
        assert_eq!(a.address(&x, Some(&ax.to_string()), &range, &all_alive).unwrap(), (ax, None));
        assert_eq!(a.address(&z, None, &range, &all_alive).unwrap_err().reason, "ClusterAddressesExhausted");
        // z claims x's address in its status: a conflict, and x keeps it.
        let err = a.address(&z, Some(&ax.to_string()), &range, &all_alive).unwrap_err();
        assert_eq!(err.reason, "ClusterAddressesExhausted");
        let x_gone = |h: &Holder| h.name != "x";
        let (az, conflict) = a.address(&z, None, &range, &x_gone).unwrap();
        assert_eq!((az, conflict), (ax, None), "x is gone: its address is free again");
    }

    #[test]
    fn node_ports_fixed_kept_or_allocated() {
        let mut a = Allocations::default();
        let (x, y) = (holder("x"), holder("y"));
        let alive = |_: &Holder| true;
        assert_eq!(a.node_port(&x, Some(30002), None, &(30000..=30002), &alive).unwrap(), 30002);
        let clash = a.node_port(&y, Some(30002), None, &(30000..=30002), &alive).unwrap_err();
        assert_eq!(clash.reason, "NodePortConflict");
        assert!(clash.message.contains("default/x"));
        assert_eq!(a.node_port(&y, None, None, &(30000..=30002), &alive).unwrap(), 30000);
        assert_eq!(a.node_port(&y, None, Some(30000), &(30000..=30002), &alive).unwrap(), 30000, "kept");
        assert_eq!(a.node_port(&x, None, None, &(30000..=30002), &alive).unwrap(), 30001);
        assert_eq!(a.node_port(&x, None, None, &(30000..=30002), &alive).unwrap_err().reason, "NodePortsExhausted");
    }

    #[test]
    fn node_ports_outside_the_range_or_from_an_empty_range_are_refused() {
        let mut a = Allocations::default();
        let x = holder("x");
        let alive = |_: &Holder| true;
        let out = a.node_port(&x, Some(30080), None, &(31000..=31001), &alive).unwrap_err();
        assert_eq!(out.reason, "NodePortOutOfRange");
        assert!(out.message.contains("30080") && out.message.contains("31000-31001"), "{}", out.message);
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 31001..=31000;
        let e = a.node_port(&x, None, None, &empty, &alive).unwrap_err();
        assert_eq!(e.reason, "NodePortRangeEmpty");
        assert!(e.message.contains("31001-31000"), "{}", e.message);
        assert_eq!(a.node_port(&x, None, Some(30080), &(31000..=31001), &alive).unwrap(), 31000, "had is out of range");
    }
}
