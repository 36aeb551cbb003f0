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

/// The `apiVersion` every orch object carries in its serialized form: orch serves its kinds as
/// one group (`orch.dev`) at one version (`v1`), so stored objects, the API and manifests all
/// read `apiVersion: orch.dev/v1`.
pub const API_VERSION: &str = "orch.dev/v1";

/// Checks a serialized object's `apiVersion` (absent is accepted: objects written before it
/// was part of the form).
pub(crate) fn check_api_version<E: serde::de::Error>(v: Option<&str>) -> Result<(), E> {
    match v {
        None => Ok(()),
        Some(v) if v == API_VERSION => Ok(()),
        Some(v) => Err(E::custom(format!("apiVersion {v:?} is not served; the versions that exist: {API_VERSION}"))),
    }
}

/// An object of any kind, with spec and status as JSON: what a [`Store`](crate::Store) keeps.
///
/// Its serialized form starts with `apiVersion: orch.dev/v1` ([`API_VERSION`]); reading
/// refuses another version and accepts none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicObject {
    /// The kind, e.g. `Workload`.
    pub kind: String,
    /// Identity, labels, revisions and deletion state.
    pub metadata: ObjectMeta,
    /// Desired state, written by `update`.
    pub spec: RawJson,
    /// Observed state, written by `update_status`.
    pub status: RawJson,
}

impl Serialize for DynamicObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            api_version: &'static str,
            kind: &'a str,
            metadata: &'a ObjectMeta,
            spec: &'a RawJson,
            status: &'a RawJson,
        }
        Out {
            api_version: API_VERSION,
            kind: &self.kind,
            metadata: &self.metadata,
            spec: &self.spec,
            status: &self.status,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for DynamicObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct In {
            #[serde(default)]
            api_version: Option<String>,
            kind: String,
            metadata: ObjectMeta,
            #[serde(default)]
            spec: RawJson,
            #[serde(default)]
            status: RawJson,
        }
        let i = In::deserialize(d)?;
        check_api_version::<D::Error>(i.api_version.as_deref())?;
        Ok(DynamicObject { kind: i.kind, metadata: i.metadata, spec: i.spec, status: i.status })
    }
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
            r#"{"apiVersion":"orch.dev/v1","kind":"Thing","metadata":{"name":"x","namespace":"ns"},"spec":{"size":3},"status":null}"#
        );
        let back: DynamicObject = serde_json::from_str(&text).unwrap();
        assert_eq!(back, o);
        // Written before apiVersion was part of the form: still read.
        let old: DynamicObject =
            serde_json::from_str(r#"{"kind":"Thing","metadata":{"name":"x","namespace":"ns"},"spec":{"size":3}}"#)
                .unwrap();
        assert_eq!(old, o);
        let e = serde_json::from_str::<DynamicObject>(&text.replace("orch.dev/v1", "apps/v1")).unwrap_err().to_string();
        assert!(e.contains("apiVersion \"apps/v1\" is not served; the versions that exist: orch.dev/v1"), "{e}");
    }
}
