//! The kinds an API server names in discovery: plural, singular and short names, and scope.

use orch_core::kinds::{
    DaemonSet, Deployment, EndpointSlice, Event, Job, Node, NodeLease, PersistentVolume, ReplicaSet, Service,
    StatefulSet, VolumeClaim, Workflow, Workload,
};
use orch_core::{Resource, Scope};
use serde_json::{Value, json};

use super::wire::{API_VERSION, GROUP, VERSION};

/// How one kind is named in paths and discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindInfo {
    /// The kind (`Workload`).
    pub kind: String,
    /// The path segment (`workloads`).
    pub plural: String,
    /// The singular name (`workload`).
    pub singular: String,
    /// Short names (`wl`).
    pub short_names: Vec<String>,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
}

impl KindInfo {
    /// A kind named the usual way: plural and singular are the lower-cased kind plus `s`.
    pub fn new(kind: &str, scope: Scope) -> Self {
        let singular = kind.to_ascii_lowercase();
        KindInfo {
            kind: kind.into(),
            plural: format!("{singular}s"),
            singular,
            short_names: Vec::new(),
            namespaced: scope == Scope::Namespaced,
        }
    }

    /// The kind of a [`Resource`] type.
    pub fn of<K: Resource>() -> Self {
        KindInfo::new(K::KIND, K::SCOPE)
    }

    /// Adds short names (builder style).
    pub fn short_names(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// The kinds a server lists in discovery. A path may name a kind by its plural, singular or
/// short name, or by the kind's own name: kinds that are not registered are still served under
/// their own name (`/apis/orch.dev/v1/namespaces/ns/Thing`), as the store accepts any kind; they
/// only do not appear in discovery.
#[derive(Debug, Clone)]
pub struct Kinds {
    kinds: Vec<KindInfo>,
}

impl Default for Kinds {
    /// orch's built-in kinds: `Node` (cluster-scoped, `no`), `Workload` (`wl`), `NodeLease`,
    /// `Deployment` (`deploy`), `ReplicaSet` (`rs`), `DaemonSet` (`ds`), `StatefulSet` (`sts`), `Job`,
    /// `Workflow` (`wf`),
    /// `Event` (`ev`), `Service` (`svc`), `EndpointSlice`, `VolumeClaim` (`vc`, `pvc`) and
    /// `PersistentVolume` (cluster-scoped, `pv`, `vol`).
    fn default() -> Self {
        Kinds {
            kinds: vec![
                KindInfo::of::<Node>().short_names(&["no"]),
                KindInfo::of::<Workload>().short_names(&["wl"]),
                KindInfo::of::<NodeLease>(),
                KindInfo::of::<Deployment>().short_names(&["deploy"]),
                KindInfo::of::<ReplicaSet>().short_names(&["rs"]),
                KindInfo::of::<DaemonSet>().short_names(&["ds"]),
                KindInfo::of::<StatefulSet>().short_names(&["sts"]),
                KindInfo::of::<Job>(),
                KindInfo::of::<Workflow>().short_names(&["wf"]),
                KindInfo::of::<Event>().short_names(&["ev"]),
                KindInfo::of::<Service>().short_names(&["svc"]),
                KindInfo::of::<EndpointSlice>(),
                KindInfo::of::<VolumeClaim>().short_names(&["vc", "pvc"]),
                KindInfo::of::<PersistentVolume>().short_names(&["pv", "vol"]),
            ],
        }
    }
}

impl Kinds {
    /// No kinds at all.
    pub fn empty() -> Self {
        Kinds { kinds: Vec::new() }
    }

    /// Registers a kind (replacing one of the same name).
    pub fn register(&mut self, info: KindInfo) {
        self.kinds.retain(|k| k.kind != info.kind);
        self.kinds.push(info);
    }

    /// Every registered kind.
    pub fn all(&self) -> &[KindInfo] {
        &self.kinds
    }

    /// The registered kind a path segment names, if any.
    pub fn lookup(&self, segment: &str) -> Option<&KindInfo> {
        self.kinds.iter().find(|k| {
            k.plural == segment
                || k.kind == segment
                || k.singular == segment
                || k.short_names.iter().any(|s| s == segment)
        })
    }

    /// The kind a path segment names: a registered one, or the segment itself.
    pub fn resolve(&self, segment: &str) -> String {
        self.lookup(segment).map_or_else(|| segment.to_string(), |k| k.kind.clone())
    }

    /// `GET /openapi/v3/apis/orch.dev/v1`: an OpenAPI 3 document with every kind's paths and
    /// the `fieldValidation` parameter (which tells kubectl the server validates writes), and an
    /// open schema per kind (orch publishes none: the server checks every write itself).
    pub fn openapi_group(&self) -> Value {
        let mut paths = serde_json::Map::new();
        let mut schemas = serde_json::Map::new();
        let field_validation = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string"}});
        for k in &self.kinds {
            let base = if k.namespaced {
                format!("/apis/{API_VERSION}/namespaces/{{namespace}}/{}", k.plural)
            } else {
                format!("/apis/{API_VERSION}/{}", k.plural)
            };
            let op = json!({
                "parameters": [field_validation],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-group-version-kind": {"group": GROUP, "version": VERSION, "kind": k.kind},
            });
            paths.insert(base.clone(), json!({"post": op}));
            paths.insert(format!("{base}/{{name}}"), json!({"put": op, "patch": op}));
            schemas.insert(
                format!("dev.orch.v1.{}", k.kind),
                json!({
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                    "x-kubernetes-group-version-kind": [{"group": GROUP, "version": VERSION, "kind": k.kind}],
                }),
            );
        }
        json!({
            "openapi": "3.0.0",
            "info": {"title": "orch", "version": VERSION},
            "paths": paths,
            "components": {"schemas": schemas},
        })
    }

    /// `GET /apis/orch.dev/v1`: an `APIResourceList`.
    pub fn resource_list(&self) -> Value {
        let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
        let mut resources = Vec::new();
        for k in &self.kinds {
            resources.push(json!({
                "name": k.plural,
                "singularName": k.singular,
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": verbs,
                "shortNames": k.short_names,
            }));
            resources.push(json!({
                "name": format!("{}/status", k.plural),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION, "resources": resources})
    }
}

/// `GET /openapi/v3`: where the group's OpenAPI document is.
pub fn openapi_root() -> Value {
    json!({"paths": {"apis/orch.dev/v1": {"serverRelativeURL": "/openapi/v3/apis/orch.dev/v1"}}})
}

/// `GET /apis`: an `APIGroupList` with orch's group.
pub fn group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]})
}

/// `GET /apis/orch.dev`: the `APIGroup`.
pub fn group() -> Value {
    let version = json!({"groupVersion": API_VERSION, "version": VERSION});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [version], "preferredVersion": version})
}

/// `GET /api`: the core group's versions. orch serves no kinds of the core group, so it names
/// none (a listed `v1` with no resources makes `kubectl api-resources` fail).
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": [], "serverAddressByClientCIDRs": []})
}

/// `GET /api/v1`: an empty resource list.
pub fn core_resources() -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": []})
}
