//! Objects as applications see them ([`Object<K>`]), the [`Resource`] trait a kind implements,
//! and, re-exported here, the forms a store keeps ([`DynamicObject`], [`RawJson`]).

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::dynamic::{API_VERSION, DynamicObject, ObjectKey};
use crate::error::{Error, Result};
pub use crate::json::{JsonError, RawJson};
use crate::meta::ObjectMeta;
use crate::validation::Validator;

/// Computes the index values of one object (a cache keeps the objects under each value it
/// returns): how [`Resource::indexers`] declares a kind's own indexes.
pub type Indexer<K> = Arc<dyn Fn(&Object<K>) -> Vec<String> + Send + Sync>;

/// Whether objects of a kind live in a namespace or at cluster scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Objects live in a namespace (workloads, services).
    Namespaced,
    /// Objects are cluster-wide (nodes).
    Cluster,
}

/// A kind of object: implement it on your spec type to get typed, validated access through
/// [`Api`](crate::Api), just like the built-in [`Node`](crate::kinds::Node) and
/// [`Workload`](crate::kinds::Workload).
///
/// ```
/// use orch_core::{Resource, Scope, Validator};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// struct Echo { message: String, replicas: i32 }
///
/// #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
/// struct EchoStatus { ready: i32 }
///
/// impl Resource for Echo {
///     const KIND: &'static str = "Echo";
///     const SCOPE: Scope = Scope::Namespaced;
///     type Status = EchoStatus;
///     fn validate(&self, v: &mut Validator) {
///         v.check(self.replicas >= 0, || "spec.replicas".into(), "must be >= 0");
///     }
/// }
/// ```
pub trait Resource: Serialize + DeserializeOwned + Clone + fmt::Debug + PartialEq + Send + Sync + 'static {
    /// The kind's name, e.g. `Workload`; unique among the kinds of one store.
    const KIND: &'static str;
    /// Namespaced or cluster-scoped.
    const SCOPE: Scope;
    /// The observed state written by controllers and agents.
    type Status: Serialize + DeserializeOwned + Clone + Default + fmt::Debug + PartialEq + Send + Sync + 'static;

    /// Checks the spec; report each bad field under its path starting at `spec.`.
    fn validate(&self, v: &mut Validator) {
        let _ = v;
    }

    /// Checks what the spec implies for the object's own metadata (names derived from
    /// `metadata.name`, say); report each bad field under its full path (`metadata.name`,
    /// `spec.…`). [`Object::validate`] calls it after [`validate`](Resource::validate), on every
    /// typed write and on what admission checks; nothing by default.
    fn validate_with_metadata(&self, meta: &ObjectMeta, v: &mut Validator) {
        let _ = (meta, v);
    }

    /// Checks the status; report each bad field under its path starting at `status.`.
    fn validate_status(status: &Self::Status, v: &mut Validator) {
        let _ = (status, v);
    }

    /// Indexes every cache of this kind keeps, beyond the label and owner indexes (for
    /// example workloads by node).
    fn indexers() -> Vec<(String, Indexer<Self>)> {
        Vec::new()
    }
}

/// A typed object: metadata, the spec `K` and its status.
///
/// Its serialized form is the API's: `apiVersion` ([`API_VERSION`]), `kind` (`K::KIND`),
/// `metadata`, `spec`, `status`. Reading refuses another version or kind, and accepts neither
/// (the form without them).
#[derive(Debug, Clone, PartialEq)]
pub struct Object<K: Resource> {
    /// Identity, labels, revisions and deletion state.
    pub metadata: ObjectMeta,
    /// Desired state.
    pub spec: K,
    /// Observed state.
    pub status: K::Status,
}

impl<K: Resource> Serialize for Object<K> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase", bound = "")]
        struct Out<'a, K: Resource> {
            api_version: &'static str,
            kind: &'static str,
            metadata: &'a ObjectMeta,
            spec: &'a K,
            status: &'a K::Status,
        }
        Out::<K> {
            api_version: API_VERSION,
            kind: K::KIND,
            metadata: &self.metadata,
            spec: &self.spec,
            status: &self.status,
        }
        .serialize(s)
    }
}

impl<'de, K: Resource> Deserialize<'de> for Object<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", bound = "")]
        struct In<K: Resource> {
            #[serde(default)]
            api_version: Option<String>,
            #[serde(default)]
            kind: Option<String>,
            #[serde(default)]
            metadata: ObjectMeta,
            spec: K,
            #[serde(default)]
            status: K::Status,
        }
        let i = In::<K>::deserialize(d)?;
        crate::dynamic::check_api_version::<D::Error>(i.api_version.as_deref())?;
        if let Some(kind) = i.kind.filter(|k| k != K::KIND) {
            return Err(serde::de::Error::custom(format!("kind {kind:?} is not {:?}", K::KIND)));
        }
        Ok(Object { metadata: i.metadata, spec: i.spec, status: i.status })
    }
}

impl<K: Resource> Object<K> {
    /// A new object with default status.
    pub fn new(metadata: ObjectMeta, spec: K) -> Self {
        Object { metadata, spec, status: K::Status::default() }
    }

    /// The key naming this object.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(K::KIND, &self.metadata.namespace, &self.metadata.name)
    }

    /// Checks metadata, spec and status, naming every bad field.
    pub fn validate(&self) -> Result<()> {
        let mut v = Validator::new();
        self.metadata.validate(K::SCOPE == Scope::Namespaced, &mut v);
        self.spec.validate(&mut v);
        self.spec.validate_with_metadata(&self.metadata, &mut v);
        K::validate_status(&self.status, &mut v);
        v.finish().map_err(|source| Error::Invalid { kind: K::KIND.into(), source })
    }

    /// Converts into the store's form.
    pub fn to_dynamic(&self) -> Result<DynamicObject> {
        Ok(DynamicObject {
            kind: K::KIND.to_string(),
            metadata: self.metadata.clone(),
            spec: RawJson::encode(&self.spec)?,
            status: RawJson::encode(&self.status)?,
        })
    }

    /// Converts from the store's form, refusing an object of another kind.
    ///
    /// A spec or status that does not decode fails with `Serialization` naming the object
    /// (kind, namespace, name) and the field: `cannot decode Workload default/web:
    /// spec.containers[0].resources.requests.cpu: invalid quantity ...`.
    pub fn from_dynamic(obj: &DynamicObject) -> Result<Self> {
        if obj.kind != K::KIND {
            return Err(Error::invalid(K::KIND, "kind", format!("expected {}, found {}", K::KIND, obj.kind)));
        }
        let spec = obj.spec.decode().map_err(|e| e.within(obj.key(), "spec"))?;
        let status = if obj.status.is_null() {
            K::Status::default()
        } else {
            obj.status.decode().map_err(|e| e.within(obj.key(), "status"))?
        };
        Ok(Object { metadata: obj.metadata.clone(), spec, status })
    }

    /// An owner reference pointing at this object, marked as its controller.
    pub fn controller_ref(&self) -> crate::meta::OwnerReference {
        crate::meta::OwnerReference {
            kind: K::KIND.into(),
            name: self.metadata.name.clone(),
            uid: self.metadata.uid.clone(),
            controller: true,
            block_owner_deletion: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Workload;

    #[test]
    fn a_typed_object_serializes_with_its_api_version_and_kind_and_checks_them_on_read() {
        let w = Object::new(ObjectMeta::namespaced("ns", "web"), Workload::command("main", &["sleep", "1"]));
        let v = serde_json::to_value(&w).unwrap();
        assert_eq!((v["apiVersion"].as_str(), v["kind"].as_str()), (Some(API_VERSION), Some("Workload")));
        let back: Object<Workload> = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, w);
        let mut other = v.clone();
        other["apiVersion"] = "apps/v1".into();
        let e = serde_json::from_value::<Object<Workload>>(other).unwrap_err().to_string();
        assert!(e.contains("the versions that exist: orch.dev/v1"), "{e}");
        let mut other = v.clone();
        other["kind"] = "Node".into();
        assert!(
            serde_json::from_value::<Object<Workload>>(other).unwrap_err().to_string().contains("is not \"Workload\"")
        );
        let mut bare = v;
        bare.as_object_mut().unwrap().retain(|k, _| k != "apiVersion" && k != "kind");
        assert_eq!(serde_json::from_value::<Object<Workload>>(bare).unwrap(), w, "the form without them reads too");
    }
}
