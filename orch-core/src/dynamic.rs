//! Objects as the store sees them: [`ObjectKey`] and [`DynamicObject`], spec and status as JSON.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::json::RawJson;
use crate::meta::ObjectMeta;

/// Identifies one object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// The kind, e.g. `Workload`.
    pub kind: String,
    /// The namespace, empty for cluster-scoped kinds.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its three parts.
    pub fn new(kind: impl Into<String>, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey { kind: kind.into(), namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// An object of any kind, with spec and status as JSON: what a [`Store`](crate::Store) keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DynamicObject {
    /// The kind, e.g. `Workload`.
    pub kind: String,
    /// Identity, labels, revisions and deletion state.
    pub metadata: ObjectMeta,
    /// Desired state, written by `update`.
    #[serde(default)]
    pub spec: RawJson,
    /// Observed state, written by `update_status`.
    #[serde(default)]
    pub status: RawJson,
}

impl DynamicObject {
    /// An object with the given kind and metadata, a `null` spec and a `null` status.
    pub fn new(kind: impl Into<String>, metadata: ObjectMeta) -> Self {
        DynamicObject { kind: kind.into(), metadata, spec: RawJson::null(), status: RawJson::null() }
    }

    /// Sets the spec (builder style).
    pub fn with_spec(mut self, spec: RawJson) -> Self {
        self.spec = spec;
        self
    }

    /// The key naming this object.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.kind, &self.metadata.namespace, &self.metadata.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_object_serde_keeps_raw_parts() {
        let mut o = DynamicObject::new("Thing", ObjectMeta::namespaced("ns", "x"));
        o.spec = RawJson::parse(r#"{"size":3}"#).unwrap();
        let text = serde_json::to_string(&o).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"Thing","metadata":{"name":"x","namespace":"ns"},"spec":{"size":3},"status":null}"#
        );
        let back: DynamicObject = serde_json::from_str(&text).unwrap();
        assert_eq!(back, o);
    }
}
