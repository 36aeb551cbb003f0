//! Metadata every object carries: identity, labels, revisions, ownership and deletion state.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::validation::{self, Validator};

/// Id of a store lease (see [`Store::grant_lease`](crate::Store::grant_lease)).
pub type LeaseId = u64;

/// Metadata of an object. The store owns the fields marked "set by the store": whatever a caller
/// puts there is replaced on write.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    /// Unique within kind and namespace; a DNS-1123 subdomain.
    pub name: String,
    /// Empty for cluster-scoped kinds (such as `Node`); a DNS-1123 label otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Set by the store on create: unique across the object's whole history, so a re-created
    /// object with the same name is told apart from its predecessor.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Identifying key/value pairs that selectors match on.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Free-form key/value pairs for tools; not selectable.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub annotations: Labels,
    /// Set by the store: the revision of the last write (the compare-and-swap token for updates
    /// and deletes).
    #[serde(skip_serializing_if = "is_zero")]
    pub resource_version: u64,
    /// Set by the store: the revision at which the object was created.
    #[serde(skip_serializing_if = "is_zero")]
    pub create_revision: u64,
    /// Set by the store: number of writes since creation (1 after create).
    #[serde(skip_serializing_if = "is_zero")]
    pub version: u64,
    /// Set by the store: starts at 1 and grows by one each time the spec changes (never on
    /// status or metadata changes), so controllers can tell which spec they have acted on.
    #[serde(skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Set by the store on create.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Timestamp>,
    /// Set by the store when a delete is asked for while finalizers remain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Timestamp>,
    /// Objects this one belongs to; a collector deletes it when its controlling owner is gone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    /// Cleanup that must happen before the object disappears: while any remain, a delete only
    /// sets `deletion_timestamp`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    /// A lease the object is attached to: when the lease expires or is revoked, the object is
    /// deleted (finalizers do not hold it back).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseId>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl ObjectMeta {
    /// Metadata with just a name (for cluster-scoped kinds).
    pub fn named(name: impl Into<String>) -> Self {
        ObjectMeta { name: name.into(), ..Default::default() }
    }

    /// Metadata with a namespace and a name.
    pub fn namespaced(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectMeta { name: name.into(), namespace: namespace.into(), ..Default::default() }
    }

    /// Adds a label (builder style).
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// True once a delete has been asked for and finalizers hold the object back.
    pub fn is_being_deleted(&self) -> bool {
        self.deletion_timestamp.is_some()
    }

    /// The owner reference marked `controller`, if any.
    pub fn controller_owner(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller)
    }

    /// Checks the caller-settable fields; `namespaced` says whether the kind needs a namespace.
    pub fn validate(&self, namespaced: bool, v: &mut Validator) {
        v.check_with(|| "metadata.name".into(), validation::dns1123_subdomain(&self.name));
        if namespaced {
            v.check_with(|| "metadata.namespace".into(), validation::dns1123_label(&self.namespace));
        } else if !self.namespace.is_empty() {
            v.reject("metadata.namespace", "must be empty for a cluster-scoped kind");
        }
        for (k, val) in &self.labels {
            v.check_with(|| format!("metadata.labels[{k:?}]"), validation::qualified_name(k));
            v.check_with(|| format!("metadata.labels[{k:?}]"), validation::label_value(val));
        }
        let mut annotation_bytes = 0;
        for (k, val) in &self.annotations {
            v.check_with(|| format!("metadata.annotations[{k:?}]"), validation::qualified_name(k));
            annotation_bytes += k.len() + val.len();
        }
        if annotation_bytes > 256 * 1024 {
            v.reject(
                "metadata.annotations",
                format!("total size must be at most 256 KiB (is {annotation_bytes} bytes)"),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, f) in self.finalizers.iter().enumerate() {
            v.check_with(|| format!("metadata.finalizers[{i}]"), validation::qualified_name(f));
            if !seen.insert(f) {
                v.reject(format!("metadata.finalizers[{i}]"), format!("duplicate finalizer {f:?}"));
            }
        }
        let mut controllers = 0;
        for (i, o) in self.owner_references.iter().enumerate() {
            if o.kind.is_empty() {
                v.reject(format!("metadata.ownerReferences[{i}].kind"), "must not be empty");
            }
            v.check_with(|| format!("metadata.ownerReferences[{i}].name"), validation::dns1123_subdomain(&o.name));
            if o.uid.is_empty() {
                v.reject(format!("metadata.ownerReferences[{i}].uid"), "must not be empty");
            }
            controllers += usize::from(o.controller);
        }
        if controllers > 1 {
            v.reject("metadata.ownerReferences", "at most one owner may be the controller");
        }
    }
}

/// A link from an object to the object that owns it (always in the same namespace, or
/// cluster-scoped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OwnerReference {
    /// Kind of the owner.
    pub kind: String,
    /// Name of the owner.
    pub name: String,
    /// Uid of the owner, so a re-created owner of the same name is not mistaken for it.
    pub uid: String,
    /// True for the one owner that manages this object.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub controller: bool,
    /// When true, a foreground deletion of the owner waits for this object to go first.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub block_owner_deletion: bool,
}

/// A wall-clock instant, in milliseconds since the Unix epoch (UTC).
///
/// Its serialized form is an RFC 3339 string in UTC with milliseconds
/// (`"2026-11-25T17:57:45.123Z"`), as Kubernetes clients expect; reading also accepts any RFC
/// 3339 offset (converted to UTC, below a millisecond truncated) and the integer form
/// (milliseconds) that earlier stores wrote. Calendar work goes through `jiff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn as_millis(&self) -> i64 {
        self.0
    }

    /// This instant moved forward by `d`.
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.as_millis().min(i64::MAX as u128) as i64))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// The same instant as a `jiff` timestamp (clamped to jiff's range, years -9999 to 9999).
    pub fn to_jiff(self) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(self.0).unwrap_or(if self.0 < 0 {
            jiff::Timestamp::MIN
        } else {
            jiff::Timestamp::MAX
        })
    }

    /// Parses RFC 3339 text (any offset; `Z` for UTC).
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, jiff::Error> {
        text.parse::<jiff::Timestamp>().map(Timestamp::from)
    }
}

impl From<jiff::Timestamp> for Timestamp {
    fn from(t: jiff::Timestamp) -> Self {
        Timestamp(t.as_millisecond())
    }
}

/// Prints RFC 3339 in UTC with exactly three fractional digits.
const RFC3339_MILLIS: jiff::fmt::temporal::DateTimePrinter =
    jiff::fmt::temporal::DateTimePrinter::new().precision(Some(3));

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with milliseconds, e.g. `2026-11-25T17:57:45.123Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&RFC3339_MILLIS.timestamp_to_string(&self.to_jiff()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp such as \"2026-11-25T17:57:45.123Z\" (or milliseconds since 1970)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(|e| E::custom(format!("{v:?} is not an RFC 3339 timestamp: {e}")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Timestamp, E> {
                Ok(Timestamp(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Timestamp, E> {
                i64::try_from(v).map(Timestamp).map_err(|_| E::custom(format!("{v} ms is past the year 292 million")))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Source of wall-clock timestamps. Inject one to make timestamps follow virtual time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from(jiff::Timestamp::now())
    }
}

/// A wall clock that advances with `tokio::time`, so a paused test or simulation runtime moves
/// timestamps along with its virtual time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `base` now and advancing with `tokio::time::Instant`.
    pub fn starting_at(base: Timestamp) -> Self {
        TokioClock { base, start: tokio::time::Instant::now() }
    }

    /// A clock reading the system's time now and advancing with `tokio::time`: real time on a
    /// normal runtime, virtual time on a paused one. What a [`Manager`](crate::Manager) and the
    /// components it runs use unless they are given another.
    pub fn from_system_time() -> Self {
        TokioClock::starting_at(SystemClock.now())
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base.plus(self.start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_prints_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp(1_795_629_465_123).to_string(), "2026-11-25T17:57:45.123Z");
        assert_eq!(Timestamp(951_782_400_000).to_string(), "2000-02-29T00:00:00.000Z");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn metadata_validation_names_fields() {
        let mut m = ObjectMeta::namespaced("default", "Web_1");
        m.labels.insert("app", "-bad");
        m.finalizers = vec!["orch.dev/x".into(), "orch.dev/x".into()];
        m.owner_references =
            vec![OwnerReference { kind: String::new(), name: "a".into(), uid: "u".into(), ..Default::default() }];
        let mut v = Validator::new();
        m.validate(true, &mut v);
        let e = v.finish().unwrap_err();
        assert!(e.has_field("metadata.name"), "{e}");
        assert!(e.has_field("metadata.labels[\"app\"]"), "{e}");
        assert!(e.has_field("metadata.finalizers[1]"), "{e}");
        assert!(e.has_field("metadata.ownerReferences[0].kind"), "{e}");

        let mut v = Validator::new();
        ObjectMeta::namespaced("default", "node-1").validate(false, &mut v);
        assert!(v.finish().unwrap_err().has_field("metadata.namespace"));
    }

    #[test]
    fn timestamps_serialize_as_rfc3339_and_read_every_form() {
        let t = Timestamp(1_795_629_465_123);
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"2026-11-25T17:57:45.123Z\"");
        let back: Timestamp = serde_json::from_str("\"2026-11-25T17:57:45.123Z\"").unwrap();
        assert_eq!(back, t);
        let stored: Timestamp = serde_json::from_str("1795629465123").unwrap();
        assert_eq!(stored, t, "the integer form earlier stores wrote still reads");
        let offset: Timestamp = serde_json::from_str("\"2026-11-25T18:57:45.123456+01:00\"").unwrap();
        assert_eq!(offset, t, "any offset, in UTC; below a millisecond truncated");
        let e = serde_json::from_str::<Timestamp>("\"yesterday\"").unwrap_err().to_string();
        assert!(e.contains("\"yesterday\" is not an RFC 3339 timestamp"), "{e}");
        assert!(serde_json::from_str::<Timestamp>("true").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_virtual_time() {
        let c = TokioClock::starting_at(Timestamp(1000));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.now(), Timestamp(6000));
    }
}
