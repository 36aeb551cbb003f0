//! What the cluster zone answers: pure lookups in the resolver, no I/O.
//!
//! Names (under `<cluster domain>`):
//! - `<service>.<namespace>.svc`: A/AAAA with the cluster address, or for a headless service
//!   every ready endpoint's addresses;
//! - `<endpoint>.<service>.<namespace>.svc` (headless services): that endpoint's addresses, where
//!   `<endpoint>` is its hostname or, without one, its address with dashes (`10-0-0-7`);
//! - `_<port>._<tcp|udp>.<service>.<namespace>.svc`: SRV with the port (and the target's
//!   addresses in the additional section);
//! - the domain itself, `svc` and `<namespace>.svc` exist but hold nothing;
//! - anything else in the domain does not exist (NXDOMAIN).

use std::net::IpAddr;

use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use orch_core::ObjectRef;
use orch_core::kinds::Protocol;

use crate::net::resolver::{ResolvedEndpoint, ResolvedService, Resolver};

/// The zone's name and answers' lifetime.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    /// `cluster.local.`, lowercase.
    pub(crate) origin: Name,
    /// Labels of the origin (for matching without allocating).
    pub(crate) labels: usize,
    pub(crate) ttl: u32,
}

/// The answer to one question.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    /// NXDOMAIN when false.
    pub(crate) exists: bool,
    pub(crate) answers: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
}

impl Zone {
    pub(crate) fn new(domain: &str, ttl: u32) -> Result<Self, String> {
        let domain = domain.trim_end_matches('.');
        if domain.is_empty() {
            return Err("must not be empty".into());
        }
        let mut origin = Name::from_ascii(domain).map_err(|e| format!("{domain:?} is not a DNS name: {e}"))?;
        origin.set_fqdn(true);
        let origin = origin.to_lowercase();
        Ok(Zone { labels: origin.num_labels() as usize, origin, ttl })
    }

    /// Whether `name` is in the zone.
    pub(crate) fn contains(&self, name: &Name) -> bool {
        self.origin.zone_of(name)
    }

    /// The SOA record of negative answers (its minimum is the TTL of a cached miss).
    pub(crate) fn soa(&self, serial: u32) -> Record {
        let ns = Name::from_ascii("ns.dns")
            .and_then(|n| n.append_domain(&self.origin))
            .unwrap_or_else(|_| self.origin.clone());
        let mbox = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&self.origin))
            .unwrap_or_else(|_| self.origin.clone());
        let ttl = self.ttl as i32;
        Record::from_rdata(
            self.origin.clone(),
            self.ttl,
            RData::SOA(SOA::new(ns, mbox, serial, ttl, ttl, ttl, self.ttl)),
        )
    }

    fn name(&self, labels: &[&str]) -> Option<Name> {
        Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?.append_domain(&self.origin).ok()
    }

    fn address_records(&self, name: &Name, addrs: impl Iterator<Item = IpAddr>, qtype: RecordType) -> Vec<Record> {
        addrs
            .filter_map(|a| match (a, qtype) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(v6))),
                _ => None,
            })
            .map(|rd| Record::from_rdata(name.clone(), self.ttl, rd))
            .collect()
    }

    /// Answers `qtype` for `name` (which must be in the zone).
    pub(crate) fn answer(&self, resolver: &Resolver, name: &Name, qtype: RecordType) -> Answer {
        let name = name.to_lowercase();
        let total = name.num_labels() as usize;
        let rel: Vec<String> = name
            .iter()
            .take(total.saturating_sub(self.labels))
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let rel: Vec<&str> = rel.iter().map(String::as_str).collect();
        let mut out = Answer { exists: true, ..Default::default() };
        match rel.as_slice() {
            [] => {
                if qtype == RecordType::SOA {
                    out.answers.push(self.soa(resolver.changes() as u32));
                }
            }
            ["svc"] | [_, "svc"] => {}
            [svc, ns, "svc"] => {
                let Some(s) = resolver.get(&ObjectRef::new(*ns, *svc)) else { return Answer::default() };
                if matches!(qtype, RecordType::A | RecordType::AAAA) {
                    out.answers = self.address_records(&name, service_addresses(&s), qtype);
                }
            }
            [_, _, _, "svc"] if rel[0].starts_with('_') => return Answer::default(),
            [ep, svc, ns, "svc"] => {
                let Some(s) = resolver.get(&ObjectRef::new(*ns, *svc)) else { return Answer::default() };
                if !s.headless {
                    return Answer::default();
                }
                let found: Vec<&ResolvedEndpoint> = s.ready_endpoints().filter(|e| endpoint_label(e) == *ep).collect();
                if found.is_empty() {
                    return Answer::default();
                }
                if matches!(qtype, RecordType::A | RecordType::AAAA) {
                    let addrs = found.iter().flat_map(|e| e.addresses.iter().copied());
                    out.answers = self.address_records(&name, addrs, qtype);
                }
            }
            [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
                let protocol = match &proto[1..] {
                    "tcp" => Protocol::TCP,
                    "udp" => Protocol::UDP,
                    _ => return Answer::default(),
                };
                let Some(s) = resolver.get(&ObjectRef::new(*ns, *svc)) else { return Answer::default() };
                let port_name = &port[1..];
                if port_name.is_empty() {
                    return Answer::default();
                }
                let Some(p) = s.ports.iter().find(|p| p.name == port_name && p.protocol == protocol) else {
                    return Answer::default();
                };
                if qtype != RecordType::SRV {
                    return out;
                }
                self.srv(&s, &p.name, p.port, &name, &mut out);
            }
            _ => return Answer::default(),
        }
        out
    }

    fn srv(&self, s: &ResolvedService, port_name: &str, port: u16, name: &Name, out: &mut Answer) {
        let Some(service_name) = self.name(&[&s.name, &s.namespace, "svc"]) else { return };
        if !s.headless {
            if s.cluster_address.is_none() {
                return;
            }
            out.answers.push(Record::from_rdata(
                name.clone(),
                self.ttl,
                RData::SRV(SRV::new(0, 100, port, service_name.clone())),
            ));
            for t in [RecordType::A, RecordType::AAAA] {
                out.additionals.extend(self.address_records(&service_name, service_addresses(s), t));
            }
            return;
        }
        let ready: Vec<&ResolvedEndpoint> = s.ready_endpoints().filter(|e| e.port(port_name).is_some()).collect();
        let weight = (100 / ready.len().max(1)).max(1) as u16;
        for e in ready {
            let label = endpoint_label(e);
            let Some(target) = self.name(&[&label, &s.name, &s.namespace, "svc"]) else { continue };
            let Some(ep_port) = e.port(port_name) else { continue };
            out.answers.push(Record::from_rdata(
                name.clone(),
                self.ttl,
                RData::SRV(SRV::new(0, weight, ep_port, target.clone())),
            ));
            for t in [RecordType::A, RecordType::AAAA] {
                out.additionals.extend(self.address_records(&target, e.addresses.iter().copied(), t));
            }
        }
    }
}

/// A service's own addresses: its cluster address, or for a headless one its ready endpoints'.
fn service_addresses(s: &ResolvedService) -> Box<dyn Iterator<Item = IpAddr> + '_> {
    if s.headless {
        Box::new(s.ready_endpoints().flat_map(|e| e.addresses.iter().copied()))
    } else {
        Box::new(s.cluster_address.into_iter())
    }
}

/// The DNS label of an endpoint of a headless service: its hostname, or its address with dashes.
pub(crate) fn endpoint_label(e: &ResolvedEndpoint) -> String {
    if !e.hostname.is_empty() {
        return e.hostname.to_ascii_lowercase();
    }
    match e.addresses.first() {
        Some(a) => a.to_string().replace(['.', ':'], "-"),
        None => String::new(),
    }
}
