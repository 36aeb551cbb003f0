use serde::{Deserialize, Serialize};

use crate::meta::Timestamp;
use crate::object::{Object, Resource, Scope};
use crate::validation::{self, Validator};

/// Longest message an event keeps, in bytes.
pub const EVENT_MESSAGE_LIMIT: usize = 1024;

/// Something that happened to an object, told to people: why a rollout stopped, why a workload
/// was evicted. Events are written by an [`events::Recorder`](crate::events::Recorder), which
/// folds repeats into one event (`count`, `last_timestamp`), rate-limits them per object and
/// lets them expire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Event {
    /// The object it is about.
    pub involved_object: ObjectReference,
    /// `Normal` for the expected course of things, `Warning` for what someone should look at.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// A CamelCase reason for machines, e.g. `ScalingRevision`.
    pub reason: String,
    /// A sentence for people (at most [`EVENT_MESSAGE_LIMIT`] bytes).
    pub message: String,
    /// How many times it happened (at least 1).
    pub count: u32,
    /// When it first happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_timestamp: Option<Timestamp>,
    /// When it last happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_timestamp: Option<Timestamp>,
    /// The component that saw it, e.g. `deployment-controller`.
    pub source: String,
}

/// Whether an event is routine or needs attention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// The expected course of things.
    #[default]
    Normal,
    /// Something went wrong or may need attention.
    Warning,
}

/// Names one object of any kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectReference {
    /// Its kind.
    pub kind: String,
    /// Its namespace (empty for a cluster-scoped kind).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid, so an object re-created under the same name is told apart.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

impl ObjectReference {
    /// A reference to `obj`.
    pub fn of<K: Resource>(obj: &Object<K>) -> Self {
        ObjectReference {
            kind: K::KIND.into(),
            namespace: obj.metadata.namespace.clone(),
            name: obj.metadata.name.clone(),
            uid: obj.metadata.uid.clone(),
        }
    }
}

/// True for a non-empty CamelCase word of ASCII letters and digits starting with a capital.
pub(crate) fn is_camel_case(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

impl Resource for Event {
    const KIND: &'static str = "Event";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = ();

    fn validate(&self, v: &mut Validator) {
        let o = &self.involved_object;
        if o.kind.is_empty() {
            v.reject("spec.involvedObject.kind", "must not be empty");
        }
        v.check_with(|| "spec.involvedObject.name".into(), validation::dns1123_subdomain(&o.name));
        if !o.namespace.is_empty() {
            v.check_with(|| "spec.involvedObject.namespace".into(), validation::dns1123_label(&o.namespace));
        }
        if !is_camel_case(&self.reason) {
            v.reject("spec.reason", format!("must be a CamelCase word such as ScalingRevision (is {:?})", self.reason));
        }
        if self.message.len() > EVENT_MESSAGE_LIMIT {
            v.reject(
                "spec.message",
                format!("must be at most {EVENT_MESSAGE_LIMIT} bytes (is {})", self.message.len()),
            );
        }
        if self.count == 0 {
            v.reject("spec.count", "must be >= 1");
        }
        if let (Some(first), Some(last)) = (self.first_timestamp, self.last_timestamp)
            && last < first
        {
            v.reject("spec.lastTimestamp", format!("must not be before firstTimestamp ({last} < {first})"));
        }
        if self.source.is_empty() {
            v.reject("spec.source", "must name the component that recorded it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ObjectMeta;

    #[test]
    fn event_validation_names_every_field() {
        let e = Event {
            involved_object: ObjectReference { kind: String::new(), name: "Bad_Name".into(), ..Default::default() },
            reason: "not camel".into(),
            message: "x".repeat(EVENT_MESSAGE_LIMIT + 1),
            count: 0,
            first_timestamp: Some(Timestamp(10)),
            last_timestamp: Some(Timestamp(5)),
            ..Default::default()
        };
        let err = Object::new(ObjectMeta::namespaced("default", "e"), e).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &err else { panic!("{err}") };
        for field in [
            "spec.involvedObject.kind",
            "spec.involvedObject.name",
            "spec.reason",
            "spec.message",
            "spec.count",
            "spec.lastTimestamp",
            "spec.source",
        ] {
            assert!(source.has_field(field), "missing {field} in {err}");
        }
    }

    #[test]
    fn camel_case_reasons() {
        assert!(is_camel_case("ProgressDeadlineExceeded"));
        assert!(is_camel_case("Scaled2"));
        assert!(!is_camel_case(""));
        assert!(!is_camel_case("lower"));
        assert!(!is_camel_case("With Space"));
    }
}
