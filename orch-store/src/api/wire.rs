//! What travels between the API server and its clients: objects, lists, watch events and errors
//! in the Kubernetes API's JSON shapes, and the paths that name them.
//!
//! Objects keep their orch form (`kind`, `metadata`, `spec`, `status`) with `apiVersion:
//! orch.dev/v1` added and `metadata.resourceVersion` written as a string, as Kubernetes clients
//! expect; orch's own revision fields (`createRevision`, `version`, `lease`) travel beside it.
//! Errors are Kubernetes `Status` objects whose `details` also carry what an orch [`Error`] needs
//! to be rebuilt on the other side exactly (`details.orchCode`, the current object of a conflict,
//! the revisions of a compaction, every field error as a cause).

use std::sync::Arc;

use orch_core::validation::FieldError;
use orch_core::{
    DynamicObject, Error, Labels, LeaseId, ObjectKey, ObjectMeta, OwnerReference, RawJson, Timestamp, ValidationError,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Deserializer, Serialize};

/// The API group orch's kinds are served under.
pub const GROUP: &str = "orch.dev";
/// The version of that group.
pub const VERSION: &str = "v1";
/// `apiVersion` of every orch object on the wire (the one every serialized object carries).
pub const API_VERSION: &str = orch_core::API_VERSION;
/// Prefix of the group's paths.
pub const GROUP_PREFIX: &str = "/apis/orch.dev/v1";
/// Prefix of orch's own calls that have no Kubernetes equivalent (revision, compaction, leases,
/// batched updates).
pub const ORCH_PREFIX: &str = "/orch/v1";

/// Characters escaped in a path segment: everything but letters, digits and `-._~`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Escapes one path segment.
pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Unescapes one path segment; `None` when it is not UTF-8 once unescaped.
pub fn decode_segment(s: &str) -> Option<String> {
    percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned())
}

/// Escapes a query value.
pub fn encode_query(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The path of a collection: `/apis/orch.dev/v1[/namespaces/{ns}]/{resource}`. The resource is
/// the kind's name as it is (the server also accepts the registered plural, see
/// [`Kinds`](super::Kinds)).
pub fn collection_path(kind: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !ns.is_empty() => {
            format!("{GROUP_PREFIX}/namespaces/{}/{}", encode_segment(ns), encode_segment(kind))
        }
        _ => format!("{GROUP_PREFIX}/{}", encode_segment(kind)),
    }
}

/// The path of one object.
pub fn object_path(key: &ObjectKey) -> String {
    format!("{}/{}", collection_path(&key.kind, Some(&key.namespace)), encode_segment(&key.name))
}

// ---------------------------------------------------------------------------------------------
// Objects

/// Written even when 0: a write conditioned on version 0 (which never matches a stored object)
/// must not read as an unconditional one, which is what a missing version means.
fn rv_string(rv: u64) -> String {
    rv.to_string()
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// `metadata` as it is written on the wire.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MetaOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    namespace: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    uid: &'a str,
    #[serde(skip_serializing_if = "Labels::is_empty")]
    labels: &'a Labels,
    #[serde(skip_serializing_if = "Labels::is_empty")]
    annotations: &'a Labels,
    #[serde(skip_serializing_if = "String::is_empty")]
    resource_version: String,
    #[serde(skip_serializing_if = "is_zero")]
    create_revision: u64,
    #[serde(skip_serializing_if = "is_zero")]
    version: u64,
    #[serde(skip_serializing_if = "is_zero")]
    generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    creation_timestamp: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deletion_timestamp: Option<Timestamp>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    owner_references: &'a [OwnerReference],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    finalizers: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseId>,
}

impl<'a> MetaOut<'a> {
    fn of(m: &'a ObjectMeta) -> Self {
        MetaOut {
            name: &m.name,
            namespace: &m.namespace,
            uid: &m.uid,
            labels: &m.labels,
            annotations: &m.annotations,
            resource_version: rv_string(m.resource_version),
            create_revision: m.create_revision,
            version: m.version,
            generation: m.generation,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            owner_references: &m.owner_references,
            finalizers: &m.finalizers,
            lease: m.lease,
        }
    }
}

/// An object as it is written on the wire.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectOut<'a> {
    api_version: &'static str,
    kind: &'a str,
    metadata: MetaOut<'a>,
    #[serde(skip_serializing_if = "RawJson::is_null")]
    spec: &'a RawJson,
    #[serde(skip_serializing_if = "RawJson::is_null")]
    status: &'a RawJson,
}

/// Serializes an object in its wire form (see the module docs).
pub struct WireObject<'a>(pub &'a DynamicObject);

impl Serialize for WireObject<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ObjectOut {
            api_version: API_VERSION,
            kind: &self.0.kind,
            metadata: MetaOut::of(&self.0.metadata),
            spec: &self.0.spec,
            status: &self.0.status,
        }
        .serialize(s)
    }
}

/// An object in its wire form as JSON text.
pub fn object_json(obj: &DynamicObject) -> String {
    serde_json::to_string(&WireObject(obj)).expect("an object always serializes")
}

/// A resource version as Kubernetes writes it (a string) or as orch's own form does (a number).
fn de_rv<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(de_rv_opt(d)?.unwrap_or(0))
}

/// A resource version, `None` when absent or empty (an unconditional write).
fn de_rv_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Rv {
        Num(u64),
        Text(String),
    }
    match Option::<Rv>::deserialize(d)? {
        None => Ok(None),
        Some(Rv::Num(n)) => Ok(Some(n)),
        Some(Rv::Text(t)) if t.is_empty() => Ok(None),
        Some(Rv::Text(t)) => t
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("resourceVersion must be a decimal revision, not {t:?}"))),
    }
}

/// `metadata` as it is read from the wire; fields orch does not keep (Kubernetes'
/// `managedFields`, `selfLink`…) are ignored, as kube-apiserver drops what it does not know.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct MetaIn {
    name: String,
    namespace: String,
    uid: String,
    labels: Labels,
    annotations: Labels,
    #[serde(deserialize_with = "de_rv_opt")]
    resource_version: Option<u64>,
    create_revision: u64,
    version: u64,
    generation: u64,
    creation_timestamp: Option<Timestamp>,
    deletion_timestamp: Option<Timestamp>,
    owner_references: Vec<OwnerReference>,
    finalizers: Vec<String>,
    lease: Option<LeaseId>,
}

/// An object as it is read from the wire.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectIn {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: MetaIn,
    #[serde(default)]
    spec: Option<RawJson>,
    #[serde(default)]
    status: Option<RawJson>,
}

/// Why a body is not an object: the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The field at fault (`metadata.resourceVersion`), empty for the document as a whole.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() { f.write_str(&self.reason) } else { write!(f, "{}: {}", self.field, self.reason) }
    }
}

fn decode_error(e: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let field = if path == "." { String::new() } else { path };
    DecodeError { field, reason: inner.to_string() }
}

/// Reads an object from its wire form. `kind` is what the path names: a body that names another
/// kind (or another `apiVersion` than orch's) is refused; a body without `kind` takes it.
pub fn decode_object(body: &[u8], kind: Option<&str>) -> Result<DynamicObject, DecodeError> {
    decode_object_versioned(body, kind).map(|(o, _)| o)
}

/// [`decode_object`], also saying whether the body named a resource version (`None`: absent or
/// empty, which Kubernetes reads as an unconditional write).
pub fn decode_object_versioned(body: &[u8], kind: Option<&str>) -> Result<(DynamicObject, Option<u64>), DecodeError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let obj: ObjectIn = serde_path_to_error::deserialize(de).map_err(decode_error)?;
    if let Some(v) = &obj.api_version
        && v != API_VERSION
    {
        return Err(DecodeError { field: "apiVersion".into(), reason: format!("must be {API_VERSION}, not {v:?}") });
    }
    let kind = match (obj.kind, kind) {
        (Some(k), Some(path)) if k != path => {
            return Err(DecodeError { field: "kind".into(), reason: format!("is {k:?} but the path names {path:?}") });
        }
        (Some(k), _) => k,
        (None, Some(path)) => path.to_string(),
        (None, None) => return Err(DecodeError { field: "kind".into(), reason: "is required".into() }),
    };
    let m = obj.metadata;
    let version = m.resource_version;
    let obj = DynamicObject {
        kind,
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            labels: m.labels,
            annotations: m.annotations,
            resource_version: m.resource_version.unwrap_or(0),
            create_revision: m.create_revision,
            version: m.version,
            generation: m.generation,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            owner_references: m.owner_references,
            finalizers: m.finalizers,
            lease: m.lease,
        },
        spec: obj.spec.unwrap_or_else(RawJson::null),
        status: obj.status.unwrap_or_else(RawJson::null),
    };
    Ok((obj, version))
}

// ---------------------------------------------------------------------------------------------
// Lists and watch events

/// `metadata` of a list.
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    /// The revision the list was read at.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// The token of the next page.
    #[serde(default, rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

/// A list as the server writes it: `{apiVersion, kind: XList, metadata, items}`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListOut<'a> {
    /// Always orch's group.
    pub api_version: &'static str,
    /// `{Kind}List`.
    pub kind: String,
    /// Revision and continue token.
    pub metadata: ListMeta,
    /// The objects.
    pub items: Vec<WireObject<'a>>,
}

/// A list as a client reads it.
#[derive(Deserialize)]
pub struct ListIn {
    /// Revision and continue token.
    #[serde(default)]
    pub metadata: ListMeta,
    /// The objects, still in their wire form.
    #[serde(default)]
    pub items: Vec<Box<serde_json::value::RawValue>>,
}

/// One line of a watch stream: `{"type": "ADDED", "object": {...}}`.
#[derive(Deserialize)]
pub struct WatchLineIn {
    /// `ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` or `ERROR`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The object, a bookmark's stub or a `Status`.
    pub object: Box<serde_json::value::RawValue>,
}

/// The stub object a `BOOKMARK` carries: only `kind`, `apiVersion` and
/// `metadata.resourceVersion`.
pub fn bookmark_json(kind: &str, revision: u64) -> String {
    serde_json::json!({
        "type": "BOOKMARK",
        "object": {"apiVersion": API_VERSION, "kind": kind, "metadata": {"resourceVersion": revision.to_string()}},
    })
    .to_string()
}

/// Reads the revision of a `BOOKMARK`'s stub.
pub fn bookmark_revision(object: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Stub {
        metadata: Rev,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Rev {
        #[serde(deserialize_with = "de_rv", default)]
        resource_version: u64,
    }
    serde_json::from_str::<Stub>(object).ok().map(|s| s.metadata.resource_version)
}

// ---------------------------------------------------------------------------------------------
// Errors as `Status`

/// A Kubernetes `Status` object: how every failed call is answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Always `Status`.
    pub kind: String,
    /// Always `v1`.
    pub api_version: String,
    /// `Failure` (orch answers success with the object itself).
    pub status: String,
    /// What went wrong, in words.
    pub message: String,
    /// Kubernetes' machine-readable reason (`NotFound`, `Conflict`, `Invalid`, `Expired`…).
    pub reason: String,
    /// What the error is about.
    #[serde(default)]
    pub details: StatusDetails,
    /// The HTTP status code.
    pub code: u16,
}

/// `details` of a [`Status`]: Kubernetes' fields, then orch's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusDetails {
    /// The object's name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The group (`orch.dev`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The kind.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// One cause per refused field.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
    /// When to try again, for `429` and `503`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// orch's error variant (`Error::code`), so a client rebuilds the same error.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub orch_code: String,
    /// The object's namespace.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// A conflict's current object (absent when it has been deleted since).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<Box<serde_json::value::RawValue>>,
    /// The resource version a conflict or failed guard expected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    /// The revision a compacted or future read asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<u64>,
    /// The oldest revision still available (compacted), or the current one (future).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// A missing lease's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
    /// A decode failure's field path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A cause of a `Status`: one refused field.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusCause {
    /// `FieldValueInvalid` for field errors.
    pub reason: String,
    /// Why the field was refused.
    pub message: String,
    /// The field's path (`spec.replicas`).
    pub field: String,
}

impl Status {
    /// A failure with a code, a reason and a message.
    pub fn failure(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Status {
            kind: "Status".into(),
            api_version: "v1".into(),
            status: "Failure".into(),
            message: message.into(),
            reason: reason.into(),
            details: StatusDetails::default(),
            code,
        }
    }

    /// `400 BadRequest` naming the field at fault (a body or query that cannot be read).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Status::failure(400, "BadRequest", message)
    }

    /// `422 Invalid` for one request field (a query parameter, a body that is not an object).
    pub fn invalid_field(kind: &str, field: &str, reason: impl Into<String>) -> Self {
        Status::from_error(&Error::invalid(kind, field, reason))
    }

    /// The `Status` that carries an orch error: its HTTP code, Kubernetes' reason, and
    /// everything [`Status::into_error`] needs to rebuild it.
    pub fn from_error(e: &Error) -> Self {
        let key_details = |k: &ObjectKey| StatusDetails {
            name: k.name.clone(),
            group: GROUP.into(),
            kind: k.kind.clone(),
            namespace: k.namespace.clone(),
            ..Default::default()
        };
        let (code, reason, details) = match e {
            Error::NotFound(k) => (404, "NotFound", key_details(k)),
            Error::AlreadyExists(k) => (409, "AlreadyExists", key_details(k)),
            Error::Conflict { key, expected, current } => (
                409,
                "Conflict",
                StatusDetails {
                    expected: Some(*expected),
                    current: current.as_ref().map(|c| {
                        serde_json::value::RawValue::from_string(object_json(c)).expect("object JSON is valid")
                    }),
                    ..key_details(key)
                },
            ),
            Error::PreconditionFailed { key, expected } => {
                (412, "PreconditionFailed", StatusDetails { expected: Some(*expected), ..key_details(key) })
            }
            Error::Compacted { requested, compacted } => (
                410,
                "Expired",
                StatusDetails { requested: Some(*requested), revision: Some(*compacted), ..Default::default() },
            ),
            // Kubernetes waits for a revision ahead of it and answers 504 when it does not come;
            // orch's stores refuse it at once, so it is the caller's input at fault.
            Error::FutureRevision { requested, current } => (
                400,
                "BadRequest",
                StatusDetails {
                    requested: Some(*requested),
                    revision: Some(*current),
                    causes: vec![StatusCause {
                        reason: "ResourceVersionTooLarge".into(),
                        message: "Too large resource version".into(),
                        field: "resourceVersion".into(),
                    }],
                    ..Default::default()
                },
            ),
            Error::Invalid { kind, source } => (
                422,
                "Invalid",
                StatusDetails {
                    group: GROUP.into(),
                    kind: kind.clone(),
                    causes: source
                        .errors
                        .iter()
                        .map(|f| StatusCause {
                            reason: "FieldValueInvalid".into(),
                            message: f.reason.clone(),
                            field: f.field.clone(),
                        })
                        .collect(),
                    ..Default::default()
                },
            ),
            Error::LeaseNotFound(id) => {
                (404, "NotFound", StatusDetails { kind: "Lease".into(), lease: Some(*id), ..Default::default() })
            }
            Error::Serialization { what, path, .. } => (
                500,
                "InternalError",
                StatusDetails { name: what.clone(), path: Some(path.clone()), ..Default::default() },
            ),
            Error::Unavailable { .. } => {
                (503, "ServiceUnavailable", StatusDetails { retry_after_seconds: Some(1), ..Default::default() })
            }
            _ => (500, "InternalError", StatusDetails::default()),
        };
        let mut s = Status::failure(code, reason, e.to_string());
        s.details = StatusDetails { orch_code: e.code().into(), ..details };
        s
    }

    /// Rebuilds the orch error this `Status` carries; a `Status` that is not one of orch's
    /// (a limit, a refused credential, a proxy's answer) becomes `Unavailable` with its message.
    pub fn into_error(self) -> Error {
        let d = self.details;
        let key = || ObjectKey::new(d.kind.clone(), d.namespace.clone(), d.name.clone());
        match d.orch_code.as_str() {
            "NotFound" => Error::NotFound(key()),
            "AlreadyExists" => Error::AlreadyExists(key()),
            "Conflict" => {
                let current = match &d.current {
                    Some(raw) => match decode_object(raw.get().as_bytes(), None) {
                        Ok(o) => Some(Arc::new(o)),
                        Err(e) => return unavailable(format!("a conflict's current object is unreadable: {e}")),
                    },
                    None => None,
                };
                Error::Conflict { key: key(), expected: d.expected.unwrap_or(0), current }
            }
            "PreconditionFailed" => Error::PreconditionFailed { key: key(), expected: d.expected.unwrap_or(0) },
            "Compacted" => Error::Compacted { requested: d.requested.unwrap_or(0), compacted: d.revision.unwrap_or(0) },
            "FutureRevision" => {
                Error::FutureRevision { requested: d.requested.unwrap_or(0), current: d.revision.unwrap_or(0) }
            }
            "Invalid" => Error::Invalid {
                kind: d.kind.clone(),
                source: ValidationError {
                    errors: d
                        .causes
                        .iter()
                        .map(|c| FieldError { field: c.field.clone(), reason: c.message.clone() })
                        .collect(),
                },
            },
            "LeaseNotFound" => Error::LeaseNotFound(d.lease.unwrap_or(0)),
            "Serialization" => Error::Serialization {
                what: d.name.clone(),
                path: d.path.clone().unwrap_or_default(),
                source: <serde_json::Error as serde::de::Error>::custom(self.message),
            },
            _ => unavailable(format!("the server answered {} {}: {}", self.code, self.reason, self.message)),
        }
    }
}

fn unavailable(message: String) -> Error {
    Error::Unavailable { message, source: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_with_a_string_resource_version() {
        let mut o = DynamicObject::new("Thing", ObjectMeta::namespaced("ns", "a").with_label("app", "web"));
        o.metadata.resource_version = 12;
        o.metadata.create_revision = 3;
        o.metadata.version = 4;
        o.metadata.lease = Some(9);
        o.spec = RawJson::parse(r#"{"x":1}"#).unwrap();
        let text = object_json(&o);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["metadata"]["resourceVersion"], "12");
        assert_eq!(decode_object(text.as_bytes(), Some("Thing")).unwrap(), o);
    }

    #[test]
    fn decoding_names_the_field_at_fault() {
        let e = decode_object(br#"{"metadata":{"resourceVersion":"x1"}}"#, Some("Thing")).unwrap_err();
        assert_eq!(e.field, "metadata.resourceVersion", "{e}");
        let e = decode_object(br#"{"kind":"Other"}"#, Some("Thing")).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = decode_object(br#"{"apiVersion":"v1"}"#, Some("Thing")).unwrap_err();
        assert_eq!(e.field, "apiVersion");
        let e = decode_object(br#"{"metadata":{"labels":{"a":1}}}"#, Some("Thing")).unwrap_err();
        assert_eq!(e.field, "metadata.labels.a", "{e}");
        let e = decode_object(b"{not json", Some("Thing")).unwrap_err();
        assert!(e.reason.contains("line 1"), "{e}");
    }

    #[test]
    fn every_store_error_survives_the_wire() {
        let mut cur = DynamicObject::new("Thing", ObjectMeta::namespaced("ns", "a"));
        cur.metadata.resource_version = 5;
        let errors = vec![
            Error::NotFound(ObjectKey::new("Thing", "ns", "a")),
            Error::AlreadyExists(ObjectKey::new("Node", "", "n")),
            Error::Conflict { key: cur.key(), expected: 3, current: Some(Arc::new(cur.clone())) },
            Error::Conflict { key: cur.key(), expected: 3, current: None },
            Error::PreconditionFailed { key: ObjectKey::new("Lock", "ns", "l"), expected: 7 },
            Error::Compacted { requested: 2, compacted: 10 },
            Error::FutureRevision { requested: 99, current: 10 },
            Error::Invalid {
                kind: "Thing".into(),
                source: ValidationError {
                    errors: vec![
                        FieldError { field: "metadata.name".into(), reason: "must not be empty".into() },
                        FieldError { field: "spec.replicas".into(), reason: "must be >= 0".into() },
                    ],
                },
            },
            Error::LeaseNotFound(42),
        ];
        for e in errors {
            let status = Status::from_error(&e);
            let text = serde_json::to_string(&status).unwrap();
            let back = serde_json::from_str::<Status>(&text).unwrap().into_error();
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(back.code(), e.code());
            if let (Error::Conflict { current: Some(a), .. }, Error::Conflict { current: Some(b), .. }) = (&e, &back) {
                assert_eq!(a, b);
            }
        }
    }
}
