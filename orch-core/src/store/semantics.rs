//! The write rules every backend applies, written once.
//!
//! A backend checks the selectors of every list and watch with [`check_selection`]. For a
//! write, it looks up the current object, checks resource versions and guards under its own
//! atomicity (a lock, a transaction), asks these functions what the write means, then stamps the
//! revision and applies the resulting [`Plan`]. Keeping the rules here means the in-memory,
//! embedded and etcd stores cannot drift apart on generation bumps, finalizers or status
//! separation.

use crate::ObjectKey;
use crate::error::{Error, Result};
use crate::meta::{ObjectMeta, Timestamp};
use crate::object::DynamicObject;
use crate::store::{DeleteOptions, FOREGROUND_FINALIZER, ORPHAN_FINALIZER, Propagation, Selection};
use crate::validation::Validator;

/// What a write turns into.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Store this object; stamp `resource_version` (and on create `create_revision`) first.
    Put(DynamicObject),
    /// Remove the object; this is its final state, to stamp and send as the `Deleted` event.
    Remove(DynamicObject),
    /// The write changes nothing: keep the stored object, bump no revision, send no event.
    Unchanged,
}

/// Checks the kind name and the caller-settable metadata of any object.
pub fn validate(obj: &DynamicObject) -> Result<()> {
    let mut v = Validator::new();
    let kind_ok = !obj.kind.is_empty()
        && obj.kind.len() <= 63
        && obj.kind.as_bytes()[0].is_ascii_alphabetic()
        && obj.kind.bytes().all(|c| c.is_ascii_alphanumeric());
    v.check(kind_ok, || "kind".into(), "must be 1-63 letters and digits, starting with a letter");
    obj.metadata.validate(!obj.metadata.namespace.is_empty(), &mut v);
    v.finish().map_err(|source| Error::Invalid { kind: obj.kind.clone(), source })
}

/// Checks the selectors of a list or watch before a backend reads anything: a selector built in
/// code (a struct literal, [`LabelSelector::from_labels`](crate::LabelSelector::from_labels),
/// [`and`](crate::LabelSelector::and)) skips the checks of the text and serde forms, and one that
/// cannot be satisfied as written (`in` with no values, a key that is not a label key) would
/// otherwise answer an empty list, as if nothing matched.
///
/// Fails with `Invalid` naming the requirement (`selection.labels[0].values`,
/// `selector[0].path`) and why. Every backend calls this first in `list` and `watch`.
pub fn check_selection(sel: &Selection) -> Result<()> {
    sel.labels.validate("selection.labels")?;
    sel.fields.validate()
}

/// A fresh unique id for a new object.
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Prepares a create: validates and fills the fields the store owns (all but the revisions).
pub fn create(mut obj: DynamicObject, now: Timestamp) -> Result<DynamicObject> {
    validate(&obj)?;
    let m = &mut obj.metadata;
    m.uid = new_uid();
    m.creation_timestamp = Some(now);
    m.deletion_timestamp = None;
    m.generation = 1;
    m.version = 1;
    m.resource_version = 0;
    m.create_revision = 0;
    Ok(obj)
}

fn same_caller_metadata(a: &ObjectMeta, b: &ObjectMeta) -> bool {
    a.labels == b.labels
        && a.annotations == b.annotations
        && a.owner_references == b.owner_references
        && a.finalizers == b.finalizers
        && a.lease == b.lease
}

/// Spec fields of built-in kinds that cannot change once set, as JSON pointers into the spec:
/// a provided volume stays on its node, with its size, class, modes and claim; a claim keeps its
/// size, access mode and class (what its volume was provided with). Reclaim policies may change.
const IMMUTABLE: &[(&str, &[&str])] = &[
    ("PersistentVolume", &["/nodeName", "/capacity", "/accessModes", "/volumeClass", "/claimRef"]),
    ("VolumeClaim", &["/size", "/accessMode", "/volumeClass"]),
];

/// Refuses a change of a field of [`IMMUTABLE`] that was set, naming each.
fn check_immutable(current: &DynamicObject, new: &DynamicObject) -> Result<()> {
    let Some((_, fields)) = IMMUTABLE.iter().find(|(k, _)| *k == new.kind) else { return Ok(()) };
    if current.spec == new.spec {
        return Ok(());
    }
    let (old, now) = (current.spec.to_value(), new.spec.to_value());
    let mut v = Validator::new();
    for f in *fields {
        let was = old.pointer(f).filter(|x| !x.is_null());
        if was.is_some() && was != now.pointer(f) {
            v.reject(format!("spec.{}", &f[1..]), "cannot change once set");
        }
    }
    v.finish().map_err(|source| Error::Invalid { kind: new.kind.clone(), source })
}

/// Prepares an update of metadata and spec (the resource version has already been checked).
pub fn update(current: &DynamicObject, new: DynamicObject) -> Result<Plan> {
    validate(&new)?;
    check_immutable(current, &new)?;
    if current.metadata.is_being_deleted()
        && let Some(added) = new.metadata.finalizers.iter().find(|f| !current.metadata.finalizers.contains(f))
    {
        return Err(Error::invalid(
            &new.kind,
            "metadata.finalizers",
            format!("cannot add finalizer {added:?} to an object that is being deleted"),
        ));
    }
    let spec_changed = current.spec != new.spec;
    if !spec_changed && same_caller_metadata(&current.metadata, &new.metadata) {
        return Ok(Plan::Unchanged);
    }
    let cm = &current.metadata;
    let mut out =
        DynamicObject { kind: new.kind, metadata: new.metadata, spec: new.spec, status: current.status.clone() };
    let m = &mut out.metadata;
    m.uid = cm.uid.clone();
    m.creation_timestamp = cm.creation_timestamp;
    m.deletion_timestamp = cm.deletion_timestamp;
    m.create_revision = cm.create_revision;
    m.generation = cm.generation + u64::from(spec_changed);
    m.version = cm.version + 1;
    if m.deletion_timestamp.is_some() && m.finalizers.is_empty() {
        // Removing the last finalizer deletes the object as it was last stored, like every other
        // deletion: the body of its `Deleted` event is that state at the deletion's revision
        // (etcd, for one, can only report the value it deletes).
        let mut last = current.clone();
        last.metadata.version += 1;
        Ok(Plan::Remove(last))
    } else {
        Ok(Plan::Put(out))
    }
}

/// Prepares a status update (the resource version has already been checked).
pub fn update_status(current: &DynamicObject, new: DynamicObject) -> Result<Plan> {
    if new.kind != current.kind {
        return Err(Error::invalid(&new.kind, "kind", format!("must be {}", current.kind)));
    }
    if new.status == current.status {
        return Ok(Plan::Unchanged);
    }
    let mut out = current.clone();
    out.status = new.status;
    out.metadata.version += 1;
    Ok(Plan::Put(out))
}

/// Checks a delete's uid precondition against the object at its key: another object there is
/// `NotFound` (the one meant is gone).
pub fn check_delete_uid(key: &ObjectKey, current: &DynamicObject, opts: &DeleteOptions) -> Result<()> {
    match &opts.uid {
        Some(uid) if *uid != current.metadata.uid => Err(Error::NotFound(key.clone())),
        _ => Ok(()),
    }
}

/// Prepares a delete: removal, or a deletion mark while finalizers remain. A foreground or
/// orphaning `propagation` adds its finalizer first (unless the object is already marked).
pub fn delete(current: &DynamicObject, now: Timestamp, propagation: Propagation) -> Plan {
    let mut out = current.clone();
    out.metadata.version += 1;
    let finalizer = match propagation {
        Propagation::Background => None,
        Propagation::Foreground => Some(FOREGROUND_FINALIZER),
        Propagation::Orphan => Some(ORPHAN_FINALIZER),
    };
    if current.metadata.is_being_deleted() {
        return if current.metadata.finalizers.is_empty() { Plan::Remove(out) } else { Plan::Unchanged };
    }
    if let Some(f) = finalizer
        && !out.metadata.finalizers.iter().any(|x| x == f)
    {
        out.metadata.finalizers.push(f.to_string());
    }
    if out.metadata.finalizers.is_empty() {
        Plan::Remove(out)
    } else {
        out.metadata.deletion_timestamp = Some(now);
        Plan::Put(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::RawJson;

    fn obj(spec: &str) -> DynamicObject {
        DynamicObject::new("Thing", ObjectMeta::namespaced("ns", "a")).with_spec(RawJson::parse(spec).unwrap())
    }

    #[test]
    fn a_provided_volume_keeps_its_node_size_and_claim_but_not_its_policy() {
        let pv = |spec: &str| {
            DynamicObject::new("PersistentVolume", ObjectMeta::named("pvc-1")).with_spec(RawJson::parse(spec).unwrap())
        };
        let cur = create(
            pv(r#"{"nodeName":"n1","capacity":"1Gi","claimRef":{"name":"c"},"reclaimPolicy":"Delete"}"#),
            Timestamp(5),
        )
        .unwrap();
        let moved = pv(r#"{"nodeName":"n2","capacity":"2Gi","claimRef":{"name":"c"},"reclaimPolicy":"Delete"}"#);
        let err = update(&cur, moved).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("spec.nodeName: cannot change once set"), "{msg}");
        assert!(msg.contains("spec.capacity: cannot change once set"), "{msg}");
        assert!(!msg.contains("claimRef"), "{msg}");
        let retained = pv(r#"{"nodeName":"n1","capacity":"1Gi","claimRef":{"name":"c"},"reclaimPolicy":"Retain"}"#);
        assert!(matches!(update(&cur, retained).unwrap(), Plan::Put(_)));
        // Unset fields may be set; other kinds have no such rule.
        let unset = create(pv(r#"{"capacity":"1Gi"}"#), Timestamp(5)).unwrap();
        assert!(matches!(update(&unset, pv(r#"{"capacity":"1Gi","nodeName":"n1"}"#)).unwrap(), Plan::Put(_)));
        let thing = create(obj(r#"{"nodeName":"n1"}"#), Timestamp(5)).unwrap();
        assert!(update(&thing, obj(r#"{"nodeName":"n2"}"#)).is_ok());
    }

    #[test]
    fn generation_moves_with_spec_only() {
        let cur = create(obj(r#"{"x":1}"#), Timestamp(5)).unwrap();
        assert_eq!(cur.metadata.generation, 1);
        let Plan::Put(next) = update(&cur, obj(r#"{"x":2}"#)).unwrap() else { panic!() };
        assert_eq!(next.metadata.generation, 2);
        assert_eq!(next.metadata.uid, cur.metadata.uid);
        let mut relabeled = obj(r#"{"x":1}"#);
        relabeled.metadata.labels.insert("a", "b");
        let Plan::Put(l) = update(&cur, relabeled).unwrap() else { panic!() };
        assert_eq!(l.metadata.generation, 1);
        assert_eq!(update(&cur, obj(r#"{ "x" : 1 }"#)).unwrap(), Plan::Unchanged);
    }

    #[test]
    fn status_update_keeps_spec() {
        let cur = create(obj(r#"{"x":1}"#), Timestamp(5)).unwrap();
        let mut new = obj(r#"{"x":99}"#);
        new.status = RawJson::parse(r#"{"ready":true}"#).unwrap();
        let Plan::Put(next) = update_status(&cur, new).unwrap() else { panic!() };
        assert_eq!(next.spec, cur.spec);
        assert_eq!(next.metadata.generation, 1);
        assert_eq!(next.status.as_str(), r#"{"ready":true}"#);
    }

    #[test]
    fn finalizers_hold_deletion() {
        let mut o = obj("{}");
        o.metadata.finalizers = vec!["orch.dev/f".into()];
        let cur = create(o, Timestamp(5)).unwrap();
        let Plan::Put(marked) = delete(&cur, Timestamp(9), Propagation::Background) else { panic!() };
        assert_eq!(marked.metadata.deletion_timestamp, Some(Timestamp(9)));
        assert_eq!(delete(&marked, Timestamp(10), Propagation::Orphan), Plan::Unchanged);
        let mut more = marked.clone();
        more.metadata.finalizers.push("orch.dev/g".into());
        assert!(update(&marked, more).unwrap_err().is_invalid());
        let mut done = marked.clone();
        done.metadata.finalizers.clear();
        assert!(matches!(update(&marked, done).unwrap(), Plan::Remove(_)));
    }

    #[test]
    fn bad_kind_is_named() {
        let e = create(DynamicObject::new("no-dash", ObjectMeta::named("a")), Timestamp(0)).unwrap_err();
        assert!(e.to_string().contains("kind: must be"), "{e}");
    }
}
