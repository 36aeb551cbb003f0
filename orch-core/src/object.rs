//! Objects as the store sees them ([`DynamicObject`]) and as applications see them ([`Object<K>`]).

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::meta::ObjectMeta;
use crate::validation::Validator;

/// A JSON document kept as canonical text (compact, object keys sorted) and shared by reference.
///
/// Stores hold spec and status this way: an object costs about its encoded size in memory, a
/// clone is a reference-count bump, and typed access decodes straight from the text. Because the
/// text is canonical, equality is a byte comparison and still semantic: the same document with
/// keys in another order is the same text.
#[derive(Clone)]
pub struct RawJson(Arc<str>);

/// Writes `v` as compact JSON with every object's keys in sorted order.
fn write_canonical(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(v: &serde_json::Value, out: &mut String) {
    // Scalars have exactly one compact form; serde_json writes it.
    out.push_str(&v.to_string());
}

impl RawJson {
    /// The JSON `null`.
    pub fn null() -> Self {
        RawJson(Arc::from("null"))
    }

    /// The empty JSON object `{}`.
    pub fn empty_object() -> Self {
        RawJson(Arc::from("{}"))
    }

    /// Encodes any serializable value.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        serde_json::to_value(value)
            .map(|v| Self::from_value(&v))
            .map_err(|source| Error::Serialization { what: std::any::type_name::<T>().into(), source })
    }

    /// Parses JSON text, refusing anything that is not valid JSON.
    pub fn parse(text: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|source| Error::Serialization { what: "raw JSON".into(), source })?;
        Ok(Self::from_value(&v))
    }

    /// Encodes a JSON value.
    pub fn from_value(value: &serde_json::Value) -> Self {
        let mut out = String::new();
        write_canonical(value, &mut out);
        RawJson(Arc::from(out))
    }

    /// Decodes into a typed value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.0)
            .map_err(|source| Error::Serialization { what: std::any::type_name::<T>().into(), source })
    }

    /// Decodes into a JSON value.
    pub fn to_value(&self) -> serde_json::Value {
        // The text is always valid JSON: every constructor goes through serde_json.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `null`.
    pub fn is_null(&self) -> bool {
        &*self.0 == "null"
    }

    /// Bytes of text held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for empty text (never the case for a well-formed document).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for RawJson {
    fn default() -> Self {
        RawJson::null()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        // Canonical text: equal documents are equal bytes.
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for RawJson {}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Input may come in any key order or spacing: store it canonically.
        let value = serde_json::Value::deserialize(d)?;
        Ok(RawJson::from_value(&value))
    }
}

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

    /// Checks the status; report each bad field under its path starting at `status.`.
    fn validate_status(status: &Self::Status, v: &mut Validator) {
        let _ = (status, v);
    }

    /// Indexes every cache of this kind keeps, beyond the label and owner indexes (for
    /// example workloads by node).
    fn indexers() -> Vec<(String, crate::cache::Indexer<Self>)> {
        Vec::new()
    }
}

/// A typed object: metadata, the spec `K` and its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Object<K: Resource> {
    /// Identity, labels, revisions and deletion state.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Desired state.
    pub spec: K,
    /// Observed state.
    #[serde(default)]
    pub status: K::Status,
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
    pub fn from_dynamic(obj: &DynamicObject) -> Result<Self> {
        if obj.kind != K::KIND {
            return Err(Error::invalid(K::KIND, "kind", format!("expected {}, found {}", K::KIND, obj.kind)));
        }
        let status = if obj.status.is_null() { K::Status::default() } else { obj.status.decode()? };
        Ok(Object { metadata: obj.metadata.clone(), spec: obj.spec.decode()?, status })
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

    #[test]
    fn raw_json_is_canonical() {
        let a = RawJson::parse(r#"{ "z": {"b": 1, "a": [true, null, "x\"y"]}, "a": 1.5 }"#).unwrap();
        assert_eq!(a.as_str(), r#"{"a":1.5,"z":{"a":[true,null,"x\"y"],"b":1}}"#);
        let typed = RawJson::encode(&serde_json::json!({"b": 2, "a": 1})).unwrap();
        assert_eq!(typed.as_str(), r#"{"a":1,"b":2}"#);
        let back: RawJson = serde_json::from_str(r#"{"b": 2,  "a": 1}"#).unwrap();
        assert_eq!(back.as_str(), typed.as_str());
    }

    #[test]
    fn raw_json_equality_is_semantic() {
        let a = RawJson::parse(r#"{"a":1,"b":[1,2]}"#).unwrap();
        let b = RawJson::parse(r#"{ "b": [1, 2], "a": 1 }"#).unwrap();
        let c = RawJson::parse(r#"{"a":2,"b":[1,2]}"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(RawJson::parse("{nope").is_err());
    }

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
