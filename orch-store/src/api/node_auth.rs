//! The node authorizer (Kubernetes' node authorization with its node restriction): what a
//! client in `system:nodes`, as `system:node:<name>`, may do. It may write its own `Node` and
//! `NodeLease`, the workloads bound to it (their status, and their metadata such as the
//! agent's finalizer, never their spec), the metadata of the volumes on it (the reclaim
//! finalizer), events, and the store leases granted to it; it may read what an agent reads (nodes, node leases,
//! workloads, services, endpoint slices, events, volume claims and volumes). Everything else is
//! denied; the server's rules may still allow more.

use orch_core::{DynamicObject, Error, LeaseId, ObjectKey, ObjectMeta, RawJson, Store, WriteOptions};
use serde_json::Value;

use super::auth::Access;

/// Kinds an agent reads (its node, the workloads, what its proxy, DNS and volumes need).
const READ_KINDS: &[&str] = &[
    "Node",
    "NodeLease",
    "Workload",
    "Service",
    "EndpointSlice",
    "Event",
    "VolumeClaim",
    "PersistentVolume",
    "Revision",
    "Lease",
];

/// The namespace of node leases (`orch_core::kinds::NODE_LEASE_NAMESPACE`).
const LEASE_NAMESPACE: &str = orch_core::kinds::NODE_LEASE_NAMESPACE;

/// What the node authorizer says before it has seen the request's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeDecision {
    /// Allowed.
    Allow,
    /// Denied, and why.
    Deny(String),
    /// Allowed when the object created is named after the node.
    CreateOwn,
    /// Allowed when the stored object (a workload, or a volume) is bound to the node
    /// (`spec.nodeName`) and, unless `status`, the request leaves its spec as it is.
    BoundToNode {
        /// A write of the status subresource.
        status: bool,
    },
    /// Allowed when the store lease was granted to the node.
    OwnLease,
}

/// The kind of the records of which node was granted a store lease: cluster-scoped, named by
/// the lease's id, attached to the lease (so they go with it).
pub(crate) const LEASE_OWNER_KIND: &str = "StoreLeaseOwner";

fn owner_key(lease: LeaseId) -> ObjectKey {
    ObjectKey::new(LEASE_OWNER_KIND, "", lease.to_string())
}

/// Records that `node` was granted `lease`.
pub(crate) async fn record_lease_owner(store: &dyn Store, lease: LeaseId, node: &str) -> Result<(), Error> {
    let mut meta = ObjectMeta::named(lease.to_string());
    meta.lease = Some(lease);
    let spec = RawJson::encode(&serde_json::json!({ "node": node })).map_err(|e| e.within(owner_key(lease), "spec"))?;
    store.create(DynamicObject::new(LEASE_OWNER_KIND, meta).with_spec(spec), &WriteOptions::default()).await.map(|_| ())
}

/// Whether `lease` was granted to `node`; `Err` says why not.
pub(crate) async fn check_lease(store: &dyn Store, node: &str, lease: LeaseId) -> Result<(), String> {
    let owner = match store.get(&owner_key(lease)).await {
        Ok(record) => record.spec.decode::<Value>().ok().and_then(|v| v.get("node")?.as_str().map(str::to_string)),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(format!("cannot read the owner of lease {lease}: {e}")),
    };
    match owner {
        Some(owner) if owner == node => Ok(()),
        _ => Err(format!("node {node:?} may only use the store leases granted to it, not lease {lease}")),
    }
}

/// Whether every store lease a write's body attaches its object to ([`leases_in`]) was granted
/// to `node`; `Err` says why not.
pub(crate) async fn check_body_leases(store: &dyn Store, node: &str, body: &[u8]) -> Result<(), String> {
    for lease in leases_in(body)? {
        check_lease(store, node, lease).await?;
    }
    Ok(())
}

/// The store leases a write's body attaches its object to (`metadata.lease`, also as a merge
/// patch or through JSON patch operations); `Err` for a JSON patch that copies or moves a value
/// into it (what it would be is not in the body).
pub(crate) fn leases_in(body: &[u8]) -> Result<Vec<LeaseId>, String> {
    // An object or a merge patch (every write of an agent): read its `metadata.lease` alone,
    // skipping the rest, rather than build the whole document.
    #[derive(serde::Deserialize)]
    struct Attached {
        #[serde(default)]
        metadata: Option<MetaLease>,
    }
    #[derive(serde::Deserialize)]
    struct MetaLease {
        #[serde(default)]
        lease: Option<LeaseId>,
    }
    if body.trim_ascii_start().first() == Some(&b'{')
        && let Ok(attached) = serde_json::from_slice::<Attached>(body)
    {
        return Ok(attached.metadata.and_then(|m| m.lease).into_iter().collect());
    }
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let lease_of = |v: Option<&Value>| v.and_then(|m| m.get("lease")).and_then(Value::as_u64);
    let mut found = Vec::new();
    match &doc {
        Value::Object(m) => found.extend(lease_of(m.get("metadata"))),
        Value::Array(ops) => {
            for op in ops {
                let (path, value) = (op.get("path").and_then(Value::as_str).unwrap_or(""), op.get("value"));
                let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
                let into_lease = path == "/metadata/lease" || path == "/metadata" || path.is_empty() || path == "/";
                if !into_lease || matches!(kind, "remove" | "test") {
                    continue;
                }
                if matches!(kind, "copy" | "move") {
                    return Err(format!("a node may not {kind} a value into {path:?} (it may hold a store lease)"));
                }
                match path {
                    "/metadata/lease" => found.extend(value.and_then(Value::as_u64)),
                    "/metadata" => found.extend(lease_of(value)),
                    _ => found.extend(lease_of(value.and_then(|v| v.get("metadata")))),
                }
            }
        }
        _ => {}
    }
    Ok(found)
}

/// Decides from the request alone. `node` is the node the client is (`None`: a member of
/// `system:nodes` not named `system:node:<name>`).
pub(crate) fn decide(node: Option<&str>, access: &Access<'_>, status: bool) -> NodeDecision {
    let Some(node) = node else {
        return NodeDecision::Deny("a member of system:nodes must be named system:node:<node name>".into());
    };
    let deny = || {
        let what = if access.name.is_empty() { String::new() } else { format!(" {:?}", access.name) };
        NodeDecision::Deny(format!("node {node:?} may not {} {}{what}", access.verb, access.kind))
    };
    let write = matches!(access.verb, "update" | "patch");
    match (access.kind, access.verb) {
        (kind, "get" | "list" | "watch") if READ_KINDS.contains(&kind) => NodeDecision::Allow,
        ("Node", "create") => NodeDecision::CreateOwn,
        ("Node", _) if write && access.name == node => NodeDecision::Allow,
        ("NodeLease", "create") if access.namespace == LEASE_NAMESPACE => NodeDecision::CreateOwn,
        ("NodeLease", _)
            if (write || access.verb == "delete") && access.namespace == LEASE_NAMESPACE && access.name == node =>
        {
            NodeDecision::Allow
        }
        ("Workload", _) if write && !access.name.is_empty() => NodeDecision::BoundToNode { status },
        // The agent removes its reclaim finalizer from the volumes on its node.
        ("PersistentVolume", _) if write && !status && !access.name.is_empty() => {
            NodeDecision::BoundToNode { status: false }
        }
        ("Event", "create" | "update" | "patch") => NodeDecision::Allow,
        // Store leases carry a node's heartbeat and its events' lifetime: a node grants its
        // own (the server records it as their owner), and keeps alive and revokes only those.
        ("Lease", "create") => NodeDecision::Allow,
        ("Lease", "update" | "delete") => NodeDecision::OwnLease,
        _ => deny(),
    }
}

/// Checks what [`decide`] left to the body and the stored object. `Err` is the reason of a
/// denial.
pub(crate) async fn check(
    store: &dyn Store,
    node: &str,
    decision: &NodeDecision,
    key: Option<&ObjectKey>,
    patch: bool,
    body: &[u8],
) -> Result<(), String> {
    match decision {
        NodeDecision::Allow => Ok(()),
        NodeDecision::Deny(why) => Err(why.clone()),
        // The server checks it with the lease's id (`check_lease`).
        NodeDecision::OwnLease => Err(format!("node {node:?} may only use the store leases granted to it")),
        NodeDecision::CreateOwn => {
            let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            match doc.pointer("/metadata/name").and_then(Value::as_str) {
                Some(name) if name == node => Ok(()),
                other => Err(format!("node {node:?} may only create its own object, not {:?}", other.unwrap_or(""))),
            }
        }
        NodeDecision::BoundToNode { status } => {
            let Some(key) = key else { return Err(format!("node {node:?} may only write named objects")) };
            let current = match store.get(key).await {
                Ok(obj) => obj,
                // Nothing to protect: the write itself answers that it is not found.
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(format!("cannot read {key} to check its node: {e}")),
            };
            let spec: Value = current.spec.decode().unwrap_or(Value::Null);
            let bound = spec.get("nodeName").and_then(Value::as_str);
            if bound != Some(node) {
                return Err(format!(
                    "node {node:?} may not write {key}: it is bound to {}",
                    bound.map_or_else(|| "no node".to_string(), |n| format!("node {n:?}"))
                ));
            }
            if *status {
                return Ok(());
            }
            let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let touches_spec = if patch {
                match &doc {
                    Value::Object(m) => m.contains_key("spec"),
                    Value::Array(ops) => ops.iter().any(|op| {
                        ["path", "from"].iter().any(|f| {
                            op.get(*f).and_then(Value::as_str).is_some_and(|p| p == "/spec" || p.starts_with("/spec/"))
                        })
                    }),
                    _ => true,
                }
            } else {
                doc.get("spec").cloned().unwrap_or(Value::Null) != spec
            };
            if touches_spec {
                return Err(format!("node {node:?} may change the status and metadata of {key}, not its spec"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leases_a_body_attaches_to_are_found_in_every_form() {
        let of = |v: serde_json::Value| leases_in(v.to_string().as_bytes());
        assert_eq!(of(serde_json::json!({"metadata": {"name": "x", "lease": 7}})), Ok(vec![7]));
        assert_eq!(of(serde_json::json!({"metadata": {"name": "x"}, "spec": {"lease": 9}})), Ok(vec![]));
        let ops = serde_json::json!([
            {"op": "add", "path": "/metadata/lease", "value": 1},
            {"op": "replace", "path": "/metadata", "value": {"lease": 2}},
            {"op": "replace", "path": "", "value": {"metadata": {"lease": 3}}},
            {"op": "remove", "path": "/metadata/lease"},
            {"op": "add", "path": "/spec/lease", "value": 4},
        ]);
        assert_eq!(of(ops), Ok(vec![1, 2, 3]));
        let moved = of(serde_json::json!([{"op": "move", "from": "/spec/x", "path": "/metadata/lease"}]));
        assert!(moved.unwrap_err().contains("may not move"));
        assert_eq!(leases_in(b"not json"), Ok(vec![]), "the decoder refuses it later");
    }

    fn access<'a>(verb: &'a str, kind: &'a str, namespace: &'a str, name: &'a str) -> Access<'a> {
        Access { verb, kind, namespace, name }
    }

    #[test]
    fn a_node_writes_only_its_own_node_and_lease() {
        let n = Some("n1");
        assert_eq!(decide(n, &access("update", "Node", "", "n1"), true), NodeDecision::Allow);
        assert!(matches!(decide(n, &access("update", "Node", "", "n2"), true), NodeDecision::Deny(_)));
        assert!(matches!(decide(n, &access("delete", "Node", "", "n1"), false), NodeDecision::Deny(_)));
        assert_eq!(decide(n, &access("create", "Node", "", ""), false), NodeDecision::CreateOwn);
        assert_eq!(decide(n, &access("delete", "NodeLease", LEASE_NAMESPACE, "n1"), false), NodeDecision::Allow);
        assert!(matches!(
            decide(n, &access("delete", "NodeLease", LEASE_NAMESPACE, "n2"), false),
            NodeDecision::Deny(_)
        ));
        assert!(matches!(decide(n, &access("create", "Workload", "ns", ""), false), NodeDecision::Deny(_)));
        assert!(matches!(decide(n, &access("delete", "Workload", "ns", "w"), false), NodeDecision::Deny(_)));
        assert_eq!(
            decide(n, &access("update", "PersistentVolume", "", "pv"), false),
            NodeDecision::BoundToNode { status: false }
        );
        assert!(matches!(decide(n, &access("update", "PersistentVolume", "", "pv"), true), NodeDecision::Deny(_)));
        assert!(matches!(decide(n, &access("delete", "PersistentVolume", "", "pv"), false), NodeDecision::Deny(_)));
        assert!(matches!(decide(n, &access("update", "VolumeClaim", "ns", "c"), false), NodeDecision::Deny(_)));
        assert!(matches!(decide(n, &access("get", "NodeCertificate", "", "n1"), false), NodeDecision::Deny(_)));
        assert!(matches!(decide(n, &access("list", "Deployment", "ns", ""), false), NodeDecision::Deny(_)));
        assert_eq!(decide(n, &access("watch", "Workload", "", ""), false), NodeDecision::Allow);
        let NodeDecision::Deny(why) = decide(None, &access("get", "Node", "", "n1"), false) else { panic!() };
        assert!(why.contains("system:node:"), "{why}");
    }
}
