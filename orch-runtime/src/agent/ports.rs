//! Host ports for the workloads of one node.
//!
//! Every container port gets a host port: the one its spec fixes (`hostPort`), or one from the
//! agent's range. A workload holds its ports from its first start until it is gone from the node
//! (so a restarted container listens where its endpoints already point). The allocation is
//! written to `<data_root>/ports/` before anything starts with it, and read back when the agent
//! starts again, so a port is never lost nor handed out twice across an agent restart; the
//! workloads' statuses fill in what the files do not hold (a node whose data root was wiped).
//!
//! What the program is told (`PORT_<NAME>`, `HOST_PORT_<NAME>`, `PORT`, `ORCH_ADDRESS`) is
//! [`env`]'s business.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use orch_core::ObjectRef;
use orch_core::kinds::{EnvVar, PortStatus, Protocol, Workload};
use serde::{Deserialize, Serialize};

/// What one workload holds, as written to its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Held {
    namespace: String,
    name: String,
    /// The uid tag of the workload the ports were given to (a workload re-created under the
    /// same name gets new ones).
    uid_tag: String,
    ports: Vec<PortStatus>,
}

#[derive(Debug, Default)]
struct State {
    /// Every host port held on the node, by holder.
    owner: HashMap<u16, ObjectRef>,
    held: HashMap<ObjectRef, Held>,
    /// Where the next search starts, so a freed port is not handed out again at once.
    cursor: u16,
}

/// The node's host ports and who holds them.
#[derive(Debug)]
pub(super) struct Ports {
    range: RangeInclusive<u16>,
    address: IpAddr,
    dir: PathBuf,
    state: Mutex<State>,
}

fn same_port(a: &PortStatus, b: &PortStatus) -> bool {
    a.container == b.container && a.container_port == b.container_port && a.protocol == b.protocol
}

impl Ports {
    pub(super) fn new(range: RangeInclusive<u16>, address: IpAddr, data_root: &Path) -> Self {
        let cursor = *range.start();
        Ports {
            range,
            address,
            dir: data_root.join("ports"),
            state: Mutex::new(State { cursor, ..Default::default() }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(&self, key: &ObjectRef) -> PathBuf {
        self.dir.join(format!("{}.{}.json", key.namespace, key.name))
    }

    /// Reads back what an earlier run of the agent allocated; returns the holders (each needs a
    /// sync: its workload may be gone).
    pub(super) fn load(&self) -> Vec<ObjectRef> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut keys = Vec::new();
        let mut state = self.lock();
        for entry in entries.flatten() {
            let held: Held = match std::fs::read(entry.path()).map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(h)) => h,
                _ => {
                    tracing::warn!(path = %entry.path().display(), "skipping an unreadable port allocation");
                    continue;
                }
            };
            if let Some(bad) = held.ports.iter().find(|p| !u16::try_from(p.host_port).is_ok_and(|p| p != 0)) {
                tracing::warn!(
                    path = %entry.path().display(),
                    host_port = bad.host_port,
                    "skipping a port allocation whose host port is not a port (1-65535)"
                );
                continue;
            }
            let key = ObjectRef::new(&held.namespace, &held.name);
            for p in &held.ports {
                if let Ok(port) = u16::try_from(p.host_port) {
                    state.owner.insert(port, key.clone());
                }
            }
            state.held.insert(key.clone(), held);
            keys.push(key);
        }
        keys
    }

    /// Takes over ports a workload's status reports when no file holds them (a wiped data
    /// root): ports held by another workload are left to it.
    pub(super) fn adopt_status(&self, key: &ObjectRef, uid_tag: &str, ports: &[PortStatus]) {
        let mut state = self.lock();
        if ports.is_empty() || state.held.contains_key(key) {
            return;
        }
        let mut kept = Vec::new();
        for p in ports {
            let Ok(port) = u16::try_from(p.host_port) else { continue };
            if state.owner.get(&port).is_none_or(|o| o == key) {
                state.owner.insert(port, key.clone());
                kept.push(p.clone());
            }
        }
        let held = Held {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid_tag: uid_tag.to_string(),
            ports: kept,
        };
        self.persist(&held);
        state.held.insert(key.clone(), held);
    }

    /// The host ports of `workload` (uid tag `uid_tag`): the ones it holds, and new ones for
    /// ports it did not have; ports it no longer declares are freed. Written to disk before it
    /// returns. Fails, naming the port, when the range is used up or a fixed host port is held by
    /// another workload on this node, and when the range is empty (start after end) and a port
    /// needs one from it.
    pub(super) fn assign(
        &self,
        key: &ObjectRef,
        uid_tag: &str,
        workload: &Workload,
    ) -> Result<Vec<PortStatus>, String> {
        let (lo, hi) = (*self.range.start(), *self.range.end());
        if lo > hi && workload.containers.iter().any(|c| c.ports.iter().any(|p| p.host_port.is_none())) {
            return Err(format!("the agent's port range {lo}-{hi} is empty (its start is after its end)"));
        }
        let mut state = self.lock();
        let previous = match state.held.get(key) {
            Some(h) if h.uid_tag == uid_tag => h.ports.clone(),
            _ => Vec::new(),
        };
        let mut next = Vec::new();
        let mut taken: Vec<u16> = Vec::new();
        let mut failure = None;
        'containers: for (ci, c) in workload.containers.iter().enumerate() {
            for (pi, p) in c.ports.iter().enumerate() {
                let mut status = PortStatus {
                    container: c.name.clone(),
                    name: p.name.clone(),
                    container_port: p.container_port,
                    host_port: 0,
                    protocol: p.protocol,
                };
                // A held port that is not a port (a damaged record) is not kept: a new one is given.
                let before = previous
                    .iter()
                    .find(|q| same_port(q, &status))
                    .and_then(|q| u16::try_from(q.host_port).ok())
                    .filter(|p| *p != 0);
                let field = format!("spec.containers[{ci}].ports[{pi}]");
                let port = match (p.host_port, before) {
                    (Some(fixed), _) => {
                        let Ok(fixed) = u16::try_from(fixed) else {
                            failure = Some(format!("{field}.hostPort: {fixed} is not a port"));
                            break 'containers;
                        };
                        match state.owner.get(&fixed) {
                            Some(o) if o != key => {
                                failure =
                                    Some(format!("{field}.hostPort: {fixed} is held by workload {o} on this node"));
                                break 'containers;
                            }
                            _ => fixed,
                        }
                    }
                    (None, Some(held)) => held,
                    (None, None) => match self.free_port(&mut state, &taken, p.protocol) {
                        Some(port) => port,
                        None => {
                            failure = Some(format!(
                                "{field}: no free host port in {}-{}",
                                self.range.start(),
                                self.range.end()
                            ));
                            break 'containers;
                        }
                    },
                };
                taken.push(port);
                status.host_port = u32::from(port);
                next.push(status);
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
        if next == previous && state.held.get(key).is_some_and(|h| h.uid_tag == uid_tag) {
            return Ok(next);
        }
        if next.is_empty() {
            // No ports (most workloads): nothing to hold, nothing to write.
            drop(state);
            self.release(key);
            return Ok(next);
        }
        // Free what is no longer held, then take the new set.
        state.owner.retain(|_, o| o != key);
        for &p in &taken {
            state.owner.insert(p, key.clone());
        }
        let held = Held {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid_tag: uid_tag.to_string(),
            ports: next.clone(),
        };
        self.persist(&held);
        state.held.insert(key.clone(), held);
        Ok(next)
    }

    /// What `key` holds now.
    pub(super) fn held(&self, key: &ObjectRef) -> Vec<PortStatus> {
        self.lock().held.get(key).map(|h| h.ports.clone()).unwrap_or_default()
    }

    /// Frees everything `key` holds (its workload is gone from the node).
    pub(super) fn release(&self, key: &ObjectRef) {
        let mut state = self.lock();
        if state.held.remove(key).is_some() {
            state.owner.retain(|_, o| o != key);
            let _ = std::fs::remove_file(self.file(key));
        }
    }

    fn persist(&self, held: &Held) {
        let key = ObjectRef::new(&held.namespace, &held.name);
        let write = std::fs::create_dir_all(&self.dir).and_then(|()| {
            let tmp = self.dir.join(format!(".{}.{}.tmp", held.namespace, held.name));
            std::fs::write(&tmp, serde_json::to_vec(held).expect("plain data serializes"))?;
            std::fs::rename(&tmp, self.file(&key))
        });
        if let Err(e) = write {
            // The workload statuses still carry the ports for the next run of the agent.
            tracing::warn!(workload = %key, error = %e, "cannot record a port allocation");
        }
    }

    /// The next port of the range that nobody on the node holds and that is free on the node's
    /// address (something outside the agent may listen there).
    fn free_port(&self, state: &mut State, taken: &[u16], protocol: Protocol) -> Option<u16> {
        let (lo, hi) = (*self.range.start(), *self.range.end());
        if lo > hi {
            return None;
        }
        let size = u32::from(hi - lo) + 1;
        let mut candidate = state.cursor.clamp(lo, hi);
        for _ in 0..size {
            let port = candidate;
            candidate = if candidate == hi { lo } else { candidate + 1 };
            if state.owner.contains_key(&port) || taken.contains(&port) || self.in_use(port, protocol) {
                continue;
            }
            state.cursor = candidate;
            return Some(port);
        }
        None
    }

    /// True when binding the port on the node's address fails because something holds it (an
    /// address this host does not have cannot be checked, and counts as free).
    fn in_use(&self, port: u16, protocol: Protocol) -> bool {
        let at = std::net::SocketAddr::new(self.address, port);
        let bound = match protocol {
            Protocol::TCP => std::net::TcpListener::bind(at).map(drop),
            Protocol::UDP => std::net::UdpSocket::bind(at).map(drop),
        };
        matches!(bound, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
    }
}

/// The variable name part for a port: its name upper-cased with `-` as `_`, or, when it has no
/// name, its container port number, followed by `_UDP` for a UDP port (TCP 53 is `53`, UDP 53 is
/// `53_UDP`: a port number may be listed once per protocol).
fn env_key(p: &PortStatus) -> String {
    match (&p.name, p.protocol) {
        (Some(n), _) => n.to_ascii_uppercase().replace('-', "_"),
        (None, Protocol::TCP) => p.container_port.to_string(),
        (None, Protocol::UDP) => format!("{}_UDP", p.container_port),
    }
}

/// What a container's program is told about the workload's ports (every container learns all of
/// them, as they share the node): `PORT_<NAME>` is where to listen (the host port when the
/// instance shares the node's network, the container port when the runtime publishes the host
/// port to it), `HOST_PORT_<NAME>` where others reach it on `ORCH_ADDRESS`; `PORT` is the
/// listening port of the container's own first port. An unnamed port is named by its container
/// port number (`PORT_8080`), with `_UDP` after it for a UDP port (`PORT_53_UDP`), so TCP and UDP
/// ports of one number get distinct variables.
pub(super) fn env(container: &str, ports: &[PortStatus], address: IpAddr, published: bool) -> Vec<EnvVar> {
    let var = |name: String, value: String| EnvVar { name, value };
    let listen = |p: &PortStatus| if published { p.container_port } else { p.host_port };
    let mut env = vec![var("ORCH_ADDRESS".into(), address.to_string())];
    if let Some(first) = ports.iter().find(|p| p.container == container) {
        env.push(var("PORT".into(), listen(first).to_string()));
    }
    for p in ports {
        env.push(var(format!("PORT_{}", env_key(p)), listen(p).to_string()));
        env.push(var(format!("HOST_PORT_{}", env_key(p)), p.host_port.to_string()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::kinds::ContainerPort;

    fn workload(ports: &[(Option<&str>, u32, Option<u32>)]) -> Workload {
        let mut w = Workload::command("main", &["x"]);
        w.containers[0].ports = ports
            .iter()
            .map(|(name, cp, hp)| ContainerPort {
                name: name.map(str::to_string),
                container_port: *cp,
                host_port: *hp,
                ..Default::default()
            })
            .collect();
        w
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("orch-ports-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    // An address this host does not have: no bind check interferes with the arithmetic.
    const NOWHERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn ports_are_unique_kept_across_restarts_of_the_agent_and_freed_with_the_workload() {
        let root = dir("unique");
        let ports = Ports::new(100..=102, NOWHERE, &root);
        let (a, b) = (ObjectRef::new("default", "a"), ObjectRef::new("default", "b"));
        let two = workload(&[(Some("http"), 80, None), (None, 81, None)]);
        let pa = ports.assign(&a, "ua", &two).unwrap();
        assert_eq!(pa.iter().map(|p| p.host_port).collect::<Vec<_>>(), vec![100, 101]);
        assert_eq!(ports.assign(&a, "ua", &two).unwrap(), pa, "a workload keeps its ports");
        let one = workload(&[(None, 80, None)]);
        assert_eq!(ports.assign(&b, "ub", &one).unwrap()[0].host_port, 102);
        let err = ports.assign(&ObjectRef::new("default", "c"), "uc", &one).unwrap_err();
        assert!(err.contains("spec.containers[0].ports[0]") && err.contains("no free host port"), "{err}");

        // A new agent over the same data root knows who holds what.
        let again = Ports::new(100..=102, NOWHERE, &root);
        let mut holders = again.load();
        holders.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(holders, vec![a.clone(), b.clone()]);
        assert_eq!(again.held(&a), pa);
        assert!(again.assign(&ObjectRef::new("default", "c"), "uc", &one).is_err(), "nothing handed out twice");
        again.release(&a);
        assert_eq!(again.assign(&ObjectRef::new("default", "c"), "uc", &one).unwrap()[0].host_port, 100);
        assert!(Ports::new(100..=102, NOWHERE, &root).load().iter().all(|k| k != &a), "released on disk too");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_recreated_workload_and_fixed_ports() {
        let root = dir("fixed");
        let ports = Ports::new(100..=110, NOWHERE, &root);
        let a = ObjectRef::new("default", "a");
        let w = workload(&[(None, 80, None), (Some("admin"), 90, Some(9090))]);
        let first = ports.assign(&a, "u1", &w).unwrap();
        assert_eq!(first[1].host_port, 9090, "a fixed host port is used as is");
        let second = ports.assign(&a, "u2", &w).unwrap();
        assert_ne!(first[0].host_port, second[0].host_port, "a new workload under the old name gets a new port");
        let clash = ports.assign(&ObjectRef::new("default", "b"), "u3", &workload(&[(None, 1, Some(9090))]));
        assert!(clash.unwrap_err().contains("9090 is held by workload default/a"));
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_port_in_use_on_the_node_is_skipped() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = holder.local_addr().unwrap().port();
        let root = dir("busy");
        let ports = Ports::new(busy..=busy.saturating_add(1), IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), &root);
        let got = ports.assign(&ObjectRef::new("default", "a"), "u", &workload(&[(None, 80, None)])).unwrap();
        assert_ne!(got[0].host_port, u32::from(busy));
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn the_environment_names_ports_by_name_or_number() {
        let ports = vec![
            PortStatus {
                container: "main".into(),
                name: Some("admin-api".into()),
                container_port: 90,
                host_port: 20001,
                protocol: Protocol::TCP,
            },
            PortStatus {
                container: "main".into(),
                name: None,
                container_port: 80,
                host_port: 20000,
                ..Default::default()
            },
        ];
        let get = |env: &[EnvVar], k: &str| env.iter().find(|e| e.name == k).map(|e| e.value.clone());
        let shared = env("main", &ports, NOWHERE, false);
        assert_eq!(get(&shared, "PORT_ADMIN_API").as_deref(), Some("20001"));
        assert_eq!(get(&shared, "PORT_80").as_deref(), Some("20000"));
        assert_eq!(get(&shared, "PORT").as_deref(), Some("20001"));
        assert_eq!(get(&shared, "ORCH_ADDRESS").as_deref(), Some("192.0.2.1"));
        let published = env("main", &ports, NOWHERE, true);
        assert_eq!(get(&published, "PORT_80").as_deref(), Some("80"), "listens on its container port");
        assert_eq!(get(&published, "HOST_PORT_80").as_deref(), Some("20000"));
    }

    #[test]
    fn unnamed_tcp_and_udp_ports_of_one_number_get_distinct_variables() {
        let port = |protocol, host_port| PortStatus {
            container: "dns".into(),
            name: None,
            container_port: 53,
            host_port,
            protocol,
        };
        let env = env("dns", &[port(Protocol::TCP, 20000), port(Protocol::UDP, 20001)], NOWHERE, false);
        let get = |k: &str| env.iter().filter(|e| e.name == k).map(|e| e.value.as_str()).collect::<Vec<_>>();
        assert_eq!(get("PORT_53"), vec!["20000"], "the TCP port");
        assert_eq!(get("PORT_53_UDP"), vec!["20001"]);
        assert_eq!(get("HOST_PORT_53_UDP"), vec!["20001"]);
        let mut names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all, "no variable twice: {names:?}");
    }

    #[test]
    fn an_empty_range_and_a_damaged_record_are_refused_without_a_panic() {
        let root = dir("damaged");
        #[allow(clippy::reversed_empty_ranges)]
        let empty = Ports::new(102..=100, NOWHERE, &root);
        let a = ObjectRef::new("default", "a");
        let err = empty.assign(&a, "ua", &workload(&[(None, 80, None)])).unwrap_err();
        assert!(err.contains("port range 102-100 is empty"), "{err}");
        assert_eq!(empty.assign(&a, "ua", &workload(&[(None, 80, Some(9090))])).unwrap()[0].host_port, 9090);

        // A record on disk whose host port does not fit in 16 bits is skipped, not wrapped.
        let ports = Ports::new(100..=102, NOWHERE, &root);
        let bad = Held {
            namespace: "default".into(),
            name: "b".into(),
            uid_tag: "ub".into(),
            ports: vec![PortStatus {
                container: "main".into(),
                container_port: 80,
                host_port: 65536 + 101,
                ..Default::default()
            }],
        };
        ports.persist(&bad);
        let again = Ports::new(100..=102, NOWHERE, &root);
        assert!(again.load().iter().all(|k| k.name != "b"), "the damaged record is not loaded");
        let b = ObjectRef::new("default", "b");
        let got = again.assign(&b, "ub", &workload(&[(None, 80, None)])).unwrap();
        assert_eq!(got[0].host_port, 100, "a new port from the range, not 65637 wrapped to 101: {got:?}");
        let _ = std::fs::remove_dir_all(root);
    }
}
