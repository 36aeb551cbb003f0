//! The store conformance suite: every point of the store contract as a named case, plus a model
//! check that runs random operation sequences against the store and a simple sequential model.
//!
//! Run it through [`store_conformance!`](crate::store_conformance) or call [`run_case`] /
//! [`run_all`] directly.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, LocalBoxFuture};
use futures::{FutureExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

use crate::{
    DeleteOptions, DeleteOutcome, DynamicObject, Error, FieldSelector, Guard, LabelSelector, ListRequest, ObjectKey,
    ObjectMeta, RawJson, Requirement, Selection, Store, WatchEvent, WatchRequest, WatchStream, WriteOptions,
};

mod model;
use model::model_check;

/// Makes a fresh, empty store for one case.
pub type Factory = Arc<dyn Fn() -> BoxFuture<'static, Arc<dyn Store>> + Send + Sync>;

type CaseFn = fn(Factory) -> LocalBoxFuture<'static, ()>;

/// Longest a case waits for something that should happen promptly (an event, a lease expiry).
const PATIENCE: Duration = Duration::from_secs(20);

macro_rules! make_cases {
    (() $($name:ident),* $(,)?) => {
        /// Every case of the suite, by name.
        pub const CASES: &[(&str, CaseFn)] = &[$((stringify!($name), |f| $name(f).boxed_local())),*];
    };
}

/// Hands the list of case names to `$callback!{ (args) name, name, … }`: the one list that both
/// [`CASES`] and [`store_conformance!`](crate::store_conformance) are built from.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_cases {
    ($callback:path, ($($args:tt)*)) => {
        $callback! { ($($args)*)
            create_then_get,
            create_existing_fails,
            revisions_only_go_up,
            update_is_compare_and_swap,
            update_many_checks_each_precondition_on_its_own,
            update_without_change_writes_nothing,
            update_missing_fails,
            status_and_spec_are_separate,
            delete_removes_and_checks_version,
            delete_with_a_uid_spares_another_object_at_the_key,
            finalizers_hold_deletion,
            delete_propagation_marks_with_its_finalizer,
            keys_are_isolated_by_kind_and_namespace,
            list_filters_by_selectors,
            list_and_watch_refuse_invalid_selectors,
            list_pages_are_pinned_to_first_revision,
            list_at_compacted_revision_fails,
            watch_delivers_history_in_order,
            watch_resumes_without_gap_or_duplicate,
            watch_reports_selector_transitions,
            watch_sees_concurrent_writes_once_in_order,
            watch_from_compacted_revision_fails,
            watch_sends_progress,
            watch_ends_with_an_error_when_the_store_is_dropped,
            slow_watcher_does_not_stall_writers,
            watcher_that_falls_behind_is_told_and_recovers,
            compaction_rejects_future_revision,
            concurrent_cas_has_one_winner_per_round,
            lease_expiry_deletes_attached_objects,
            lease_keep_alive_and_revoke,
            guard_fences_writes,
            bad_input_is_refused_without_change,
            model_check
        }
    };
}

__store_cases!(make_cases, ());

/// Runs one named case on stores from `builder`, in a fresh tokio runtime (current-thread with a
/// paused clock when `paused_time`, so lease and progress timing cost no wall time).
///
/// # Panics
/// When the case fails (that is the test failing), or when no case has that name.
pub fn run_case<F, Fut, S>(name: &str, builder: F, paused_time: bool)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = S> + Send + 'static,
    S: Store,
{
    let case = CASES.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no store case named {name}")).1;
    let builder = Arc::new(builder);
    let factory: Factory = Arc::new(move || {
        let b = builder.clone();
        async move { Arc::new(b().await) as Arc<dyn Store> }.boxed()
    });
    let rt = if paused_time {
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    }
    .expect("a tokio runtime for the case");
    rt.block_on(case(factory));
}

/// Runs every case in turn (see [`run_case`]).
pub fn run_all<F, Fut, S>(builder: F, paused_time: bool)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = S> + Send + 'static,
    S: Store,
{
    for (name, _) in CASES {
        run_case(name, builder.clone(), paused_time);
    }
}

/// Generates one `#[test]` per store conformance case.
///
/// `$builder` is an expression evaluated (awaited, if `async`) inside each case's runtime to make
/// a fresh store; `paused_time` picks a paused current-thread runtime (for in-process stores) or
/// a real-time multi-thread one (for stores behind a network).
///
/// ```no_run
/// orch_core::store_conformance!(async { orch_store::MemoryStore::new() }, paused_time = true);
/// ```
#[macro_export]
macro_rules! store_conformance {
    (async $builder:block, paused_time = $paused:expr) => {
        $crate::__store_cases!($crate::__store_case_tests, ((async move || $builder), $paused));
    };
    ($builder:expr, paused_time = $paused:expr) => {
        $crate::__store_cases!($crate::__store_case_tests, ((async move || $builder), $paused));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_case_tests {
    (($builder:expr, $paused:expr) $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $crate::testkit::store::run_case(stringify!($name), $builder, $paused);
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

const KIND: &str = "Thing";
const NS: &str = "suite";

fn thing(name: &str, spec: serde_json::Value) -> DynamicObject {
    DynamicObject::new(KIND, ObjectMeta::namespaced(NS, name)).with_spec(RawJson::from_value(&spec))
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new(KIND, NS, name)
}

fn w() -> WriteOptions {
    WriteOptions::default()
}

fn things() -> Selection {
    Selection::kind(KIND).in_namespace(NS)
}

async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(PATIENCE, stream.next()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended early"),
        Err(_) => panic!("no watch event within {PATIENCE:?}"),
    }
}

/// The next event that is not a progress notification.
async fn next_change(stream: &mut WatchStream) -> WatchEvent {
    loop {
        match next_event(stream).await {
            WatchEvent::Progress(_) => continue,
            e => return e,
        }
    }
}

fn describe(e: &WatchEvent) -> (&'static str, String, u64) {
    match e {
        WatchEvent::Added(o) => ("Added", o.metadata.name.clone(), o.metadata.resource_version),
        WatchEvent::Modified(o) => ("Modified", o.metadata.name.clone(), o.metadata.resource_version),
        WatchEvent::Deleted(o) => ("Deleted", o.metadata.name.clone(), o.metadata.resource_version),
        WatchEvent::Progress(r) => ("Progress", String::new(), *r),
    }
}

/// Asserts that `got` is a `kind` event whose body is exactly `want`: the object, its
/// revision and every other field.
#[track_caller]
fn assert_event(got: &WatchEvent, kind: &str, want: &DynamicObject) {
    let Some(body) = got.object() else { panic!("expected {kind} of {}, got {got:?}", want.metadata.name) };
    assert_eq!(describe(got).0, kind, "event type for {}: {got:?}", want.metadata.name);
    assert_eq!(**body, *want, "{kind} event body of {}", want.metadata.name);
}

async fn eventually_gone(store: &dyn Store, k: &ObjectKey) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match store.get(k).await {
            Err(e) if e.is_not_found() => return,
            Err(e) => panic!("get {k} failed: {e}"),
            Ok(_) if tokio::time::Instant::now() > deadline => panic!("{k} still exists after {PATIENCE:?}"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

async fn create_then_get(f: Factory) {
    let s = f().await;
    let before = s.current_revision().await.unwrap();
    let mut input = thing("a", serde_json::json!({"size": 1}));
    input.metadata.labels.insert("app", "web");
    input.metadata.uid = "caller-chosen".into();
    input.metadata.generation = 42;
    let c = s.create(input, &w()).await.unwrap();
    let m = &c.metadata;
    assert!(m.resource_version > before, "create must get a new revision");
    assert_eq!(m.create_revision, m.resource_version);
    assert_eq!((m.generation, m.version), (1, 1));
    assert!(!m.uid.is_empty() && m.uid != "caller-chosen", "the store sets the uid");
    assert!(m.creation_timestamp.is_some());
    assert!(m.deletion_timestamp.is_none());
    assert_eq!(s.current_revision().await.unwrap(), m.resource_version);
    let g = s.get(&key("a")).await.unwrap();
    assert_eq!(*g, *c);
    assert_eq!(g.spec.to_value(), serde_json::json!({"size": 1}));
    assert_eq!(g.metadata.labels["app"], "web");
    assert!(s.get(&key("b")).await.unwrap_err().is_not_found());
}

async fn create_existing_fails(f: Factory) {
    let s = f().await;
    s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    let rev = s.current_revision().await.unwrap();
    let e = s.create(thing("a", serde_json::json!(2)), &w()).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(ref k) if *k == key("a")), "{e}");
    assert_eq!(s.current_revision().await.unwrap(), rev, "a failed create must not bump the revision");
    assert_eq!(s.get(&key("a")).await.unwrap().spec.to_value(), serde_json::json!(1));
}

async fn revisions_only_go_up(f: Factory) {
    let s = f().await;
    let mut last = s.current_revision().await.unwrap();
    for i in 0..20 {
        let c = s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap();
        assert!(c.metadata.resource_version > last);
        last = c.metadata.resource_version;
        let mut next = (*c).clone();
        next.spec = RawJson::from_value(&serde_json::json!(i + 100));
        let u = s.update(next, &w()).await.unwrap();
        assert!(u.metadata.resource_version > last);
        last = u.metadata.resource_version;
    }
    assert!(s.current_revision().await.unwrap() >= last);
}

async fn update_is_compare_and_swap(f: Factory) {
    let s = f().await;
    let c = s.create(thing("a", serde_json::json!({"v": 1})), &w()).await.unwrap();
    let mut next = (*c).clone();
    next.spec = RawJson::from_value(&serde_json::json!({"v": 2}));
    let u = s.update(next.clone(), &w()).await.unwrap();
    assert!(u.metadata.resource_version > c.metadata.resource_version);
    assert_eq!((u.metadata.generation, u.metadata.version), (2, 2));
    assert_eq!(u.metadata.uid, c.metadata.uid);
    assert_eq!(u.metadata.create_revision, c.metadata.create_revision);
    assert_eq!(u.metadata.creation_timestamp, c.metadata.creation_timestamp);

    // The same stale write again: refused, with the current object attached.
    next.spec = RawJson::from_value(&serde_json::json!({"v": 3}));
    match s.update(next, &w()).await.unwrap_err() {
        Error::Conflict { expected, current: Some(cur), .. } => {
            assert_eq!(expected, c.metadata.resource_version);
            assert_eq!(*cur, *u);
        }
        e => panic!("expected Conflict, got {e}"),
    }
    assert_eq!(s.get(&key("a")).await.unwrap().spec.to_value(), serde_json::json!({"v": 2}), "no stale overwrite");

    // A label change moves the resource version but not the generation.
    let mut relabel = (*u).clone();
    relabel.metadata.labels.insert("tier", "db");
    let l = s.update(relabel, &w()).await.unwrap();
    assert_eq!(l.metadata.generation, 2);
    assert_eq!(l.metadata.version, 3);
    assert!(l.metadata.resource_version > u.metadata.resource_version);
}

async fn update_many_checks_each_precondition_on_its_own(f: Factory) {
    let s = f().await;
    let mut created = Vec::new();
    for name in ["m0", "m1", "m2", "m3"] {
        created.push(s.create(thing(name, serde_json::json!({"v": 0})), &w()).await.unwrap());
    }
    let from = s.current_revision().await.unwrap() + 1;
    let mut watch = s
        .watch(&WatchRequest { selection: things(), from_revision: Some(from), progress_interval: None })
        .await
        .unwrap();
    // m1 moves on behind the caller's back: its update must conflict, the others land.
    let mut moved = (*created[1]).clone();
    moved.spec = RawJson::from_value(&serde_json::json!({"v": 9}));
    let moved = s.update(moved, &w()).await.unwrap();
    let updates: Vec<DynamicObject> = created
        .iter()
        .map(|c| {
            let mut next = (**c).clone();
            next.spec = RawJson::from_value(&serde_json::json!({"v": 1}));
            next
        })
        .collect();
    let results = s.update_many(updates, &w()).await;
    assert_eq!(results.len(), 4, "one result per object, in order");
    match &results[1] {
        Err(Error::Conflict { current: Some(cur), .. }) => assert_eq!(**cur, *moved),
        other => panic!("m1: expected Conflict with the current object, got {other:?}"),
    }
    let mut revisions = Vec::new();
    for (i, r) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
        let o = r.as_ref().unwrap_or_else(|e| panic!("m{i}: {e}"));
        assert_eq!(o.metadata.name, format!("m{i}"));
        assert_eq!(o.spec.to_value(), serde_json::json!({"v": 1}));
        revisions.push(o.metadata.resource_version);
    }
    let unique: std::collections::BTreeSet<u64> = revisions.iter().copied().collect();
    assert_eq!(unique.len(), 3, "each update has its own revision: {revisions:?}");
    assert_eq!(s.get(&key("m1")).await.unwrap().spec.to_value(), serde_json::json!({"v": 9}), "no stale overwrite");
    // Four events after `from`: m1's own update, then the three of the batch in revision order,
    // each with the body the batch returned.
    assert_event(&next_event(&mut watch).await, "Modified", &moved);
    let mut batch: Vec<&Arc<DynamicObject>> = [0usize, 2, 3].iter().map(|&i| results[i].as_ref().unwrap()).collect();
    batch.sort_by_key(|o| o.metadata.resource_version);
    for want in batch {
        assert_event(&next_event(&mut watch).await, "Modified", want);
    }
}

async fn update_without_change_writes_nothing(f: Factory) {
    let s = f().await;
    let c = s.create(thing("a", serde_json::json!({"v": 1, "w": 2})), &w()).await.unwrap();
    let mut watch = s.watch(&WatchRequest::from(things(), c.metadata.resource_version + 1)).await.unwrap();
    let mut same = (*c).clone();
    same.spec = RawJson::parse(r#"{ "w": 2, "v": 1 }"#).unwrap();
    let u = s.update(same, &w()).await.unwrap();
    assert_eq!(u.metadata.resource_version, c.metadata.resource_version, "a no-op update is not a write");
    let st = s.update_status((*c).clone(), &w()).await.unwrap();
    assert_eq!(st.metadata.resource_version, c.metadata.resource_version, "a no-op status update is not a write");
    assert_eq!(s.current_revision().await.unwrap(), c.metadata.resource_version);
    // The next event the watch sees is a real change, not the no-ops.
    let mut real = (*c).clone();
    real.spec = RawJson::from_value(&serde_json::json!(0));
    let r = s.update(real, &w()).await.unwrap();
    assert_event(&next_change(&mut watch).await, "Modified", &r);
}

async fn update_missing_fails(f: Factory) {
    let s = f().await;
    let mut ghost = thing("ghost", serde_json::json!(1));
    ghost.metadata.resource_version = 1;
    assert!(s.update(ghost.clone(), &w()).await.unwrap_err().is_not_found());
    assert!(s.update_status(ghost, &w()).await.unwrap_err().is_not_found());
    assert!(s.delete(&key("ghost"), &DeleteOptions::default()).await.unwrap_err().is_not_found());
}

async fn status_and_spec_are_separate(f: Factory) {
    let s = f().await;
    let c = s.create(thing("a", serde_json::json!({"want": 3})), &w()).await.unwrap();
    // A status write that also carries a different spec changes only the status.
    let mut st = (*c).clone();
    st.spec = RawJson::from_value(&serde_json::json!({"want": 99}));
    st.status = RawJson::from_value(&serde_json::json!({"have": 1}));
    st.metadata.labels.insert("sneaky", "1");
    let a = s.update_status(st, &w()).await.unwrap();
    assert_eq!(a.spec.to_value(), serde_json::json!({"want": 3}));
    assert_eq!(a.status.to_value(), serde_json::json!({"have": 1}));
    assert!(a.metadata.labels.is_empty());
    assert_eq!(a.metadata.generation, 1, "status writes never bump the generation");
    // A spec write that carries a stale status keeps the stored status.
    let mut sp = (*a).clone();
    sp.spec = RawJson::from_value(&serde_json::json!({"want": 4}));
    sp.status = RawJson::from_value(&serde_json::json!({"have": 0}));
    let b = s.update(sp, &w()).await.unwrap();
    assert_eq!(b.spec.to_value(), serde_json::json!({"want": 4}));
    assert_eq!(b.status.to_value(), serde_json::json!({"have": 1}));
    assert_eq!(b.metadata.generation, 2);
    // Status writes are compare-and-swap too.
    let mut stale = (*a).clone();
    stale.status = RawJson::from_value(&serde_json::json!({"have": 7}));
    assert!(s.update_status(stale, &w()).await.unwrap_err().is_conflict());
}

async fn delete_with_a_uid_spares_another_object_at_the_key(f: Factory) {
    let s = f().await;
    let first = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    s.delete(&key("a"), &DeleteOptions::default()).await.unwrap();
    let second = s.create(thing("a", serde_json::json!(2)), &w()).await.unwrap();
    // A delete meant for the first object finds it gone, and leaves the second as it is.
    let meant = DeleteOptions { uid: Some(first.metadata.uid.clone()), ..Default::default() };
    assert!(s.delete(&key("a"), &meant).await.unwrap_err().is_not_found());
    let kept = s.get(&key("a")).await.unwrap();
    assert_eq!(
        (kept.metadata.uid.as_str(), kept.metadata.resource_version),
        (second.metadata.uid.as_str(), second.metadata.resource_version)
    );
    // With both preconditions, each is checked.
    let stale = DeleteOptions {
        uid: Some(second.metadata.uid.clone()),
        resource_version: Some(second.metadata.resource_version + 1000),
        ..Default::default()
    };
    assert!(s.delete(&key("a"), &stale).await.unwrap_err().is_conflict());
    let exact = DeleteOptions { uid: Some(second.metadata.uid.clone()), ..Default::default() };
    assert!(matches!(s.delete(&key("a"), &exact).await.unwrap(), DeleteOutcome::Deleted(_)));
    assert!(s.get(&key("a")).await.unwrap_err().is_not_found());
}

async fn delete_removes_and_checks_version(f: Factory) {
    let s = f().await;
    let c = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    let mut watch = s.watch(&WatchRequest::from(things(), c.metadata.resource_version + 1)).await.unwrap();
    let stale = DeleteOptions { resource_version: Some(c.metadata.resource_version + 1000), ..Default::default() };
    assert!(s.delete(&key("a"), &stale).await.unwrap_err().is_conflict());
    assert!(s.get(&key("a")).await.is_ok(), "a refused delete leaves the object");
    let exact = DeleteOptions { resource_version: Some(c.metadata.resource_version), ..Default::default() };
    let DeleteOutcome::Deleted(last) = s.delete(&key("a"), &exact).await.unwrap() else { panic!("expected Deleted") };
    assert!(last.metadata.resource_version > c.metadata.resource_version, "the deletion has its own revision");
    assert!(s.get(&key("a")).await.unwrap_err().is_not_found());
    assert!(s.delete(&key("a"), &DeleteOptions::default()).await.unwrap_err().is_not_found());
    assert_event(&next_change(&mut watch).await, "Deleted", &last);
    // The name can be used again, by a new object with a new uid.
    let again = s.create(thing("a", serde_json::json!(2)), &w()).await.unwrap();
    assert_ne!(again.metadata.uid, c.metadata.uid);
}

async fn finalizers_hold_deletion(f: Factory) {
    let s = f().await;
    let mut o = thing("a", serde_json::json!(1));
    o.metadata.finalizers = vec!["orch.dev/cleanup".into(), "orch.dev/backup".into()];
    let c = s.create(o, &w()).await.unwrap();
    let mut watch = s.watch(&WatchRequest::from(things(), c.metadata.resource_version + 1)).await.unwrap();

    let DeleteOutcome::Pending(marked) = s.delete(&key("a"), &DeleteOptions::default()).await.unwrap() else {
        panic!("an object with finalizers must not disappear at once")
    };
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(marked.metadata.resource_version > c.metadata.resource_version);
    assert_event(&next_change(&mut watch).await, "Modified", &marked);

    // Deleting again changes nothing.
    let DeleteOutcome::Pending(again) = s.delete(&key("a"), &DeleteOptions::default()).await.unwrap() else { panic!() };
    assert_eq!(again.metadata.resource_version, marked.metadata.resource_version);

    // No new finalizers on an object being deleted.
    let mut add = (*marked).clone();
    add.metadata.finalizers.push("orch.dev/late".into());
    let e = s.update(add, &w()).await.unwrap_err();
    assert!(e.is_invalid() && e.to_string().contains("metadata.finalizers"), "{e}");

    // Removing one keeps it; removing the last deletes it.
    let mut one = (*marked).clone();
    one.metadata.finalizers = vec!["orch.dev/backup".into()];
    let kept = s.update(one, &w()).await.unwrap();
    assert!(s.get(&key("a")).await.unwrap().metadata.deletion_timestamp.is_some());
    assert_event(&next_change(&mut watch).await, "Modified", &kept);
    let mut none = (*kept).clone();
    none.metadata.finalizers.clear();
    let last = s.update(none, &w()).await.unwrap();
    assert!(s.get(&key("a")).await.unwrap_err().is_not_found());
    assert_event(&next_change(&mut watch).await, "Deleted", &last);
}

async fn delete_propagation_marks_with_its_finalizer(f: Factory) {
    use crate::store::{FOREGROUND_FINALIZER, ORPHAN_FINALIZER, Propagation};
    let s = f().await;
    for (name, propagation, finalizer) in
        [("fg", Propagation::Foreground, FOREGROUND_FINALIZER), ("or", Propagation::Orphan, ORPHAN_FINALIZER)]
    {
        let mut o = thing(name, serde_json::json!(1));
        o.metadata.finalizers = vec!["orch.dev/mine".into()];
        let c = s.create(o, &w()).await.unwrap();
        let opts = DeleteOptions::default().propagation(propagation);
        let DeleteOutcome::Pending(marked) = s.delete(&key(name), &opts).await.unwrap() else {
            panic!("a {propagation:?} delete marks the object")
        };
        assert_eq!(marked.metadata.finalizers, vec!["orch.dev/mine".to_string(), finalizer.to_string()]);
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert_eq!(marked.metadata.resource_version, c.metadata.resource_version + 1, "one write");
        let stored = s.get(&key(name)).await.unwrap();
        assert_eq!(stored.metadata.finalizers, marked.metadata.finalizers);
        // Again, with another propagation: nothing changes.
        let DeleteOutcome::Pending(again) = s.delete(&key(name), &DeleteOptions::default()).await.unwrap() else {
            panic!()
        };
        assert_eq!(again.metadata.resource_version, marked.metadata.resource_version);
    }
    // Without finalizers of its own, a foreground delete still only marks.
    s.create(thing("bare", serde_json::json!(1)), &w()).await.unwrap();
    let opts = DeleteOptions::default().propagation(Propagation::Foreground);
    let DeleteOutcome::Pending(marked) = s.delete(&key("bare"), &opts).await.unwrap() else { panic!() };
    assert_eq!(marked.metadata.finalizers, vec![FOREGROUND_FINALIZER.to_string()]);
    // A background delete removes at once.
    s.create(thing("bg", serde_json::json!(1)), &w()).await.unwrap();
    assert!(matches!(s.delete(&key("bg"), &DeleteOptions::default()).await.unwrap(), DeleteOutcome::Deleted(_)));
}

async fn keys_are_isolated_by_kind_and_namespace(f: Factory) {
    let s = f().await;
    let a = s.create(thing("x", serde_json::json!("suite")), &w()).await.unwrap();
    let mut other_ns = thing("x", serde_json::json!("other"));
    other_ns.metadata.namespace = "other".into();
    s.create(other_ns, &w()).await.unwrap();
    let other_kind = DynamicObject::new("Gadget", ObjectMeta::namespaced(NS, "x"));
    s.create(other_kind, &w()).await.unwrap();
    let cluster = DynamicObject::new(KIND, ObjectMeta::named("x"));
    s.create(cluster, &w()).await.unwrap();
    assert_eq!(*s.get(&key("x")).await.unwrap(), *a);
    assert_eq!(s.get(&ObjectKey::new(KIND, "other", "x")).await.unwrap().spec.to_value(), serde_json::json!("other"));
    let all = s.list(&ListRequest::new(Selection::kind(KIND))).await.unwrap();
    let keys: Vec<_> = all.items.iter().map(|o| (o.metadata.namespace.clone(), o.metadata.name.clone())).collect();
    assert_eq!(keys, vec![("".into(), "x".into()), ("other".into(), "x".into()), ("suite".into(), "x".into())]);
    let gadgets = s.list(&ListRequest::new(Selection::kind("Gadget"))).await.unwrap();
    assert_eq!(gadgets.items.len(), 1);
}

async fn list_filters_by_selectors(f: Factory) {
    let s = f().await;
    for (name, app, node) in [("a", "web", "n1"), ("b", "web", "n2"), ("c", "db", "n1"), ("d", "", "n2")] {
        let mut o = thing(name, serde_json::json!({"nodeName": node}));
        if !app.is_empty() {
            o.metadata.labels.insert("app", app);
        }
        s.create(o, &w()).await.unwrap();
    }
    let names = |items: &[Arc<DynamicObject>]| items.iter().map(|o| o.metadata.name.clone()).collect::<Vec<_>>();
    let all = s.list(&ListRequest::new(things())).await.unwrap();
    assert_eq!(names(&all.items), ["a", "b", "c", "d"]);
    assert_eq!(all.revision, s.current_revision().await.unwrap());
    assert!(all.continue_token.is_none());
    let web = s.list(&ListRequest::new(things().with_labels(LabelSelector::parse("app=web").unwrap()))).await.unwrap();
    assert_eq!(names(&web.items), ["a", "b"]);
    let not_web =
        s.list(&ListRequest::new(things().with_labels(LabelSelector::parse("app!=web").unwrap()))).await.unwrap();
    assert_eq!(names(&not_web.items), ["c", "d"]);
    let set = LabelSelector::parse("app in (web,db),app notin (db)").unwrap();
    assert_eq!(names(&s.list(&ListRequest::new(things().with_labels(set))).await.unwrap().items), ["a", "b"]);
    let none = s.list(&ListRequest::new(things().with_labels(LabelSelector::parse("!app").unwrap()))).await.unwrap();
    assert_eq!(names(&none.items), ["d"]);
    let n1 = s
        .list(&ListRequest::new(things().with_fields(FieldSelector::parse("spec.nodeName=n1").unwrap())))
        .await
        .unwrap();
    assert_eq!(names(&n1.items), ["a", "c"]);
    let both = things()
        .with_labels(LabelSelector::parse("app=web").unwrap())
        .with_fields(FieldSelector::parse("spec.nodeName=n2").unwrap());
    assert_eq!(names(&s.list(&ListRequest::new(both)).await.unwrap().items), ["b"]);
}

/// Selectors built in code skip the checks of the text and serde forms; a store must refuse an
/// invalid one, naming it, rather than answer that nothing matches.
async fn list_and_watch_refuse_invalid_selectors(f: Factory) {
    let s = f().await;
    let mut o = thing("a", serde_json::json!({"nodeName": "n1"}));
    o.metadata.labels.insert("app", "web");
    s.create(o, &w()).await.unwrap();
    let cases = [
        (
            things().with_labels(LabelSelector::everything().and(Requirement::In("app".into(), BTreeSet::new()))),
            "selection.labels[0].values",
        ),
        (things().with_labels(LabelSelector::from_labels([("bad key", "web")])), "selection.labels[0].key"),
        (things().with_labels(LabelSelector::from_labels([("app", "not ok!")])), "selection.labels[0].values"),
        (things().with_fields(FieldSelector::equals("spec.node/Name", "n1")), "selector[0].path"),
        (things().with_fields(FieldSelector::equals("spec.nodeName", "n 1")), "selector[0].value"),
    ];
    for (selection, field) in cases {
        let e = s.list(&ListRequest::new(selection.clone())).await.expect_err(field);
        assert!(e.is_invalid() && e.to_string().contains(field), "list should name {field}: {e}");
        match s.watch(&WatchRequest::from(selection, 1)).await {
            Err(e) => assert!(e.is_invalid() && e.to_string().contains(field), "watch should name {field}: {e}"),
            Ok(_) => panic!("a watch with an invalid selector ({field}) was accepted"),
        }
    }
}

async fn list_pages_are_pinned_to_first_revision(f: Factory) {
    let s = f().await;
    for i in 0..10 {
        s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap();
    }
    let snapshot = s.list(&ListRequest::new(things())).await.unwrap();
    let mut page = s.list(&ListRequest::new(things()).limit(3)).await.unwrap();
    assert_eq!(page.revision, snapshot.revision);
    let mut seen: Vec<Arc<DynamicObject>> = page.items.clone();
    let mut round = 0;
    while let Some(token) = page.continue_token.clone() {
        // Churn between pages: a later page must not show any of it.
        s.create(thing(&format!("o{round}x"), serde_json::json!("new")), &w()).await.unwrap();
        let victim = format!("o{}", 9 - round);
        if let Ok(cur) = s.get(&key(&victim)).await {
            let mut m = (*cur).clone();
            m.spec = RawJson::from_value(&serde_json::json!("changed"));
            s.update(m, &w()).await.unwrap();
        }
        s.delete(&key(&format!("o{}", 8 - round)), &DeleteOptions::default()).await.ok();
        round += 1;
        page =
            s.list(&ListRequest { continue_token: Some(token), ..ListRequest::new(things()).limit(3) }).await.unwrap();
        assert_eq!(page.revision, snapshot.revision, "every page is read at the first page's revision");
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().cloned());
    }
    assert_eq!(seen, snapshot.items, "the pages together are exactly the snapshot");
}

async fn list_at_compacted_revision_fails(f: Factory) {
    let s = f().await;
    for i in 0..6 {
        s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap();
    }
    let first = s.list(&ListRequest::new(things()).limit(2)).await.unwrap();
    let token = first.continue_token.clone().expect("more pages");
    let at_first = first.revision;
    s.delete(&key("o5"), &DeleteOptions::default()).await.unwrap();
    // An old revision is still readable before compaction...
    let old = s.list(&ListRequest { revision: Some(at_first), ..ListRequest::new(things()) }).await.unwrap();
    assert_eq!(old.items.len(), 6);
    assert_eq!(old.revision, at_first);
    // ...and not after.
    let now = s.current_revision().await.unwrap();
    s.compact(now).await.unwrap();
    let e =
        s.list(&ListRequest { continue_token: Some(token), ..ListRequest::new(things()).limit(2) }).await.unwrap_err();
    assert!(e.is_compacted(), "{e}");
    let e = s.list(&ListRequest { revision: Some(at_first), ..ListRequest::new(things()) }).await.unwrap_err();
    assert!(e.is_compacted(), "{e}");
    // The current state is untouched by compaction.
    assert_eq!(s.list(&ListRequest::new(things())).await.unwrap().items.len(), 5);
}

async fn watch_delivers_history_in_order(f: Factory) {
    let s = f().await;
    let a = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    let mut m = (*a).clone();
    m.spec = RawJson::from_value(&serde_json::json!(2));
    let a2 = s.update(m, &w()).await.unwrap();
    let b = s.create(thing("b", serde_json::json!(1)), &w()).await.unwrap();
    let DeleteOutcome::Deleted(a3) = s.delete(&key("a"), &DeleteOptions::default()).await.unwrap() else { panic!() };
    let expected = [("Added", &a), ("Modified", &a2), ("Added", &b), ("Deleted", &a3)];
    let mut watch = s.watch(&WatchRequest::from(things(), a.metadata.resource_version)).await.unwrap();
    for (kind, want) in expected {
        assert_event(&next_change(&mut watch).await, kind, want);
    }
    // From a later revision (inclusive) it starts there.
    let mut watch = s.watch(&WatchRequest::from(things(), b.metadata.resource_version)).await.unwrap();
    assert_event(&next_change(&mut watch).await, "Added", &b);
    // Live events follow the history.
    let c = s.create(thing("c", serde_json::json!(1)), &w()).await.unwrap();
    assert_event(&next_change(&mut watch).await, "Deleted", &a3);
    assert_event(&next_change(&mut watch).await, "Added", &c);
}

async fn watch_resumes_without_gap_or_duplicate(f: Factory) {
    let s = f().await;
    let start = s.current_revision().await.unwrap() + 1;
    let mut written = Vec::new();
    for i in 0..10 {
        written.push(s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap());
    }
    let mut watch = s.watch(&WatchRequest::from(things(), start)).await.unwrap();
    for want in &written[..4] {
        assert_event(&next_change(&mut watch).await, "Added", want);
    }
    drop(watch);
    for i in 10..13 {
        written.push(s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap());
    }
    let mut watch = s.watch(&WatchRequest::from(things(), written[3].metadata.resource_version + 1)).await.unwrap();
    for want in &written[4..] {
        assert_event(&next_change(&mut watch).await, "Added", want);
    }
}

async fn watch_reports_selector_transitions(f: Factory) {
    let s = f().await;
    let start = s.current_revision().await.unwrap() + 1;
    let sel = things().with_labels(LabelSelector::parse("app=web").unwrap());
    let mut watch = s.watch(&WatchRequest::from(sel, start)).await.unwrap();
    let plain = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    let mut labeled = (*plain).clone();
    labeled.metadata.labels.insert("app", "web");
    let in_ = s.update(labeled, &w()).await.unwrap();
    let mut changed = (*in_).clone();
    changed.spec = RawJson::from_value(&serde_json::json!(2));
    let still = s.update(changed, &w()).await.unwrap();
    let mut unlabeled = (*still).clone();
    unlabeled.metadata.labels.clear();
    let out = s.update(unlabeled, &w()).await.unwrap();
    let mut relabeled = (*out).clone();
    relabeled.metadata.labels.insert("app", "web");
    let back = s.update(relabeled, &w()).await.unwrap();
    // Each event carries the state the write made: the one that left the selection is
    // `Deleted` with the object as it left (no label, the revision of that write).
    for (kind, want) in [("Added", &in_), ("Modified", &still), ("Deleted", &out), ("Added", &back)] {
        assert_event(&next_change(&mut watch).await, kind, want);
    }
}

async fn watch_sees_concurrent_writes_once_in_order(f: Factory) {
    let s = f().await;
    let start = s.current_revision().await.unwrap() + 1;
    let mut watch = s.watch(&WatchRequest::from(things(), start)).await.unwrap();
    let writers = 8;
    let per = 25;
    let mut tasks = Vec::new();
    for t in 0..writers {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..per {
                let name = format!("w{t}-{}", i % 5);
                let ack = match s.get(&key(&name)).await {
                    Ok(cur) => {
                        let mut next = (*cur).clone();
                        next.spec = RawJson::from_value(&serde_json::json!(i));
                        ("Modified", s.update(next, &WriteOptions::default()).await.unwrap())
                    }
                    Err(_) => {
                        ("Added", s.create(thing(&name, serde_json::json!(i)), &WriteOptions::default()).await.unwrap())
                    }
                };
                written.push(ack);
                tokio::task::yield_now().await;
            }
            written
        }));
    }
    // Every acknowledged write, by revision: the watch must show each once, in revision order,
    // with the body the write returned.
    let mut acknowledged = BTreeMap::new();
    for t in tasks {
        for (kind, o) in t.await.unwrap() {
            assert!(acknowledged.insert(o.metadata.resource_version, (kind, o)).is_none(), "two writes, one revision");
        }
    }
    for (kind, want) in acknowledged.values() {
        assert_event(&next_change(&mut watch).await, kind, want);
    }
}

async fn watch_from_compacted_revision_fails(f: Factory) {
    let s = f().await;
    let a = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    let mut last = a.clone();
    for i in 0..3 {
        last = s.create(thing(&format!("b{i}"), serde_json::json!(i)), &w()).await.unwrap();
    }
    let now = s.current_revision().await.unwrap();
    assert_eq!(now, last.metadata.resource_version);
    s.compact(now).await.unwrap();
    s.compact(a.metadata.resource_version).await.unwrap(); // compacting backwards is a no-op
    match s.watch(&WatchRequest::from(things(), a.metadata.resource_version)).await {
        Err(e) => assert!(e.is_compacted(), "{e}"),
        Ok(mut stream) => match tokio::time::timeout(PATIENCE, stream.next()).await {
            Ok(Some(Err(e))) => assert!(e.is_compacted(), "{e}"),
            other => panic!("expected Compacted, got {other:?}"),
        },
    }
    // From the compaction point on, the watch works.
    let mut ok = s.watch(&WatchRequest::from(things(), now)).await.unwrap();
    assert_event(&next_change(&mut ok).await, "Added", &last);
}

async fn watch_sends_progress(f: Factory) {
    let s = f().await;
    let mut req = WatchRequest::from(things(), s.current_revision().await.unwrap() + 1);
    req.progress_interval = Some(Duration::from_secs(1));
    let mut watch = s.watch(&req).await.unwrap();
    // Writes of another kind only: the watch sees no events but must learn the store moved on.
    let g = s.create(DynamicObject::new("Gadget", ObjectMeta::namespaced(NS, "g")), &w()).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match next_event(&mut watch).await {
            WatchEvent::Progress(r) if r >= g.metadata.resource_version => break,
            WatchEvent::Progress(_) if tokio::time::Instant::now() < deadline => continue,
            other => panic!("expected progress past {}, got {other:?}", g.metadata.resource_version),
        }
    }
    // A progress revision is a safe place to resume: nothing is skipped after it.
    let t = s.create(thing("t", serde_json::json!(1)), &w()).await.unwrap();
    assert_event(&next_change(&mut watch).await, "Added", &t);
}

/// A watch never ends silently: when its store goes away (the case holds the only handle the
/// builder made), it delivers what it had, then ends with `Unavailable`.
async fn watch_ends_with_an_error_when_the_store_is_dropped(f: Factory) {
    let s = f().await;
    let c = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    let from = c.metadata.resource_version;
    let mut watch = s.watch(&WatchRequest::from(things(), from)).await.unwrap();
    let mut quiet = s
        .watch(&WatchRequest {
            progress_interval: Some(Duration::from_secs(1)),
            ..WatchRequest::from(things(), from + 1)
        })
        .await
        .unwrap();
    assert_event(&next_change(&mut watch).await, "Added", &c);
    drop(s);
    for stream in [&mut watch, &mut quiet] {
        loop {
            match tokio::time::timeout(PATIENCE, stream.next()).await {
                Ok(Some(Ok(WatchEvent::Progress(_)))) => continue,
                Ok(Some(Err(Error::Unavailable { .. }))) => break,
                Ok(other) => panic!("expected Unavailable once the store is dropped, got {other:?}"),
                Err(_) => panic!("the watch did not end within {PATIENCE:?} of its store being dropped"),
            }
        }
        let end = tokio::time::timeout(PATIENCE, stream.next()).await.expect("the stream ends");
        assert!(end.is_none(), "the stream ends after its error: {end:?}");
    }
}

async fn slow_watcher_does_not_stall_writers(f: Factory) {
    let s = f().await;
    let start = s.current_revision().await.unwrap() + 1;
    // This watcher reads nothing until every write is done.
    let mut idle = s.watch(&WatchRequest::from(things(), start)).await.unwrap();
    let mut fast = s.watch(&WatchRequest::from(things(), start)).await.unwrap();
    let n = 2_000;
    let writes = async {
        let mut written = Vec::new();
        for i in 0..n {
            written.push(s.create(thing(&format!("o{i:04}"), serde_json::json!(i)), &w()).await.unwrap());
        }
        written
    };
    let written = tokio::time::timeout(PATIENCE, writes).await.expect("writes must not wait for an idle watcher");
    for want in &written {
        assert_event(&next_change(&mut fast).await, "Added", want);
    }
    // The idle watcher then reads everything, in order, or (had the store's own bound on history
    // left it behind) a gap-free start followed by `Compacted`.
    // The idle watcher then reads every event, in order: 2,000 events are well within every
    // store's history.
    let expected: Vec<_> = written.iter().map(|o| ("Added", o.clone())).collect();
    assert_eq!(read_until_told(&mut idle, &expected).await, None, "an idle watcher within the history misses nothing");
}

/// Reads `stream` while it matches `expected` (type and body, in order). Returns `None` when it
/// delivered all of them, or `Some(count)` when it ended with `Compacted` after `count` of them:
/// a watcher that fell behind is told, never silently skipped past an event.
async fn read_until_told(stream: &mut WatchStream, expected: &[(&str, Arc<DynamicObject>)]) -> Option<usize> {
    let mut seen = 0;
    while seen < expected.len() {
        match tokio::time::timeout(PATIENCE, stream.next()).await {
            Ok(Some(Ok(WatchEvent::Progress(_)))) => {}
            Ok(Some(Ok(e))) => {
                let (kind, want) = &expected[seen];
                assert_event(&e, kind, want);
                seen += 1;
            }
            Ok(Some(Err(e))) => {
                assert!(e.is_compacted(), "a watcher that fell behind is told with Compacted, got {e}");
                let end = tokio::time::timeout(PATIENCE, stream.next()).await.expect("the stream ends");
                assert!(end.is_none(), "the stream ends after Compacted: {end:?}");
                return Some(seen);
            }
            Ok(None) => panic!("the watch ended silently after {seen} of {} events", expected.len()),
            Err(_) => panic!("neither event {seen} nor Compacted within {PATIENCE:?}"),
        }
    }
    None
}

/// The suite's objects as a typed resource, for a cache.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct Thing(serde_json::Value);

impl crate::Resource for Thing {
    const KIND: &'static str = KIND;
    const SCOPE: crate::Scope = crate::Scope::Namespaced;
    type Status = serde_json::Value;
}

/// A watcher that falls behind: the history it has not read is compacted away while it sleeps.
/// It is told (`Compacted`, after a gap-free start) unless the store had already handed it
/// every event; listing again and watching from the list's revision then misses nothing, and a
/// cache that fell behind the same way recovers by itself, without resurrecting what was
/// deleted in the gap.
async fn watcher_that_falls_behind_is_told_and_recovers(f: Factory) {
    let s = f().await;
    let start = s.current_revision().await.unwrap() + 1;
    let mut slow = s.watch(&WatchRequest::from(things(), start)).await.unwrap();
    let cache = crate::cache::Cache::<Thing>::spawn(s.clone(), crate::cache::CacheConfig::default());
    tokio::time::timeout(PATIENCE, cache.ready()).await.expect("the cache lists within the patience");
    let n = 300;
    let mut written: Vec<(&str, Arc<DynamicObject>)> = Vec::new();
    for i in 0..n {
        written.push(("Added", s.create(thing(&format!("o{i:04}"), serde_json::json!(i)), &w()).await.unwrap()));
    }
    for i in (0..n).step_by(10) {
        let DeleteOutcome::Deleted(last) =
            s.delete(&key(&format!("o{i:04}")), &DeleteOptions::default()).await.unwrap()
        else {
            panic!("o{i:04} has no finalizers")
        };
        written.push(("Deleted", last));
    }
    let now = s.current_revision().await.unwrap();
    s.compact(now).await.unwrap();

    let told = read_until_told(&mut slow, &written).await;
    eprintln!(
        "slow watcher: {}",
        match told {
            Some(seen) => format!("told Compacted after {seen} of {} events", written.len()),
            None => "had every event before the compaction".into(),
        }
    );

    // Recovery: the list is exactly what survived, and a watch from its revision on misses
    // nothing after it.
    let alive: Vec<Arc<DynamicObject>> = written
        .iter()
        .filter(|(kind, o)| {
            *kind == "Added" && !written.iter().any(|(k, d)| *k == "Deleted" && d.metadata.name == o.metadata.name)
        })
        .map(|(_, o)| o.clone())
        .collect();
    let page = s.list(&ListRequest::new(things())).await.unwrap();
    assert_eq!(page.items, alive, "the relist holds every survivor as written");
    let mut again = s.watch(&WatchRequest::from(things(), page.revision + 1)).await.unwrap();
    let late = s.create(thing("late", serde_json::json!("late")), &w()).await.unwrap();
    assert_event(&next_change(&mut again).await, "Added", &late);

    // The cache reaches the same state: every survivor at its revision, nothing deleted.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let cached = cache.list();
        let matches = cached.len() == alive.len() + 1
            && alive.iter().chain([&late]).all(|o| {
                cache.get(&crate::cache::ObjectRef::new(NS, &o.metadata.name)).is_some_and(|c| {
                    c.metadata.resource_version == o.metadata.resource_version && c.spec.0 == o.spec.to_value()
                })
            });
        if matches {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache did not recover within {PATIENCE:?}: {} objects, expected {}",
            cached.len(),
            alive.len() + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn compaction_rejects_future_revision(f: Factory) {
    let s = f().await;
    s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
    let now = s.current_revision().await.unwrap();
    let e = s.compact(now + 10).await.unwrap_err();
    assert!(matches!(e, Error::FutureRevision { .. }), "{e}");
    let e = s.list(&ListRequest { revision: Some(now + 10), ..ListRequest::new(things()) }).await.unwrap_err();
    assert!(matches!(e, Error::FutureRevision { .. }), "{e}");
    assert_eq!(s.get(&key("a")).await.unwrap().spec.to_value(), serde_json::json!(1));
}

async fn concurrent_cas_has_one_winner_per_round(f: Factory) {
    let s = f().await;
    s.create(thing("counter", serde_json::json!(0)), &w()).await.unwrap();
    let rounds = 20;
    let racers = 8;
    for round in 0..rounds {
        let cur = s.get(&key("counter")).await.unwrap();
        let mut tasks = Vec::new();
        for r in 0..racers {
            let s = s.clone();
            let mut next = (*cur).clone();
            next.spec = RawJson::from_value(&serde_json::json!({"round": round, "winner": r}));
            tasks.push(tokio::spawn(async move { s.update(next, &WriteOptions::default()).await }));
        }
        let mut winners = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => winners += 1,
                Err(e) => assert!(e.is_conflict(), "losers must see Conflict, got {e}"),
            }
        }
        assert_eq!(winners, 1, "round {round}: exactly one racer wins");
    }
    // No lost update: a counter incremented with retries by many tasks reaches the exact total.
    let mut tasks = Vec::new();
    for _ in 0..racers {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let cur = s.get(&key("counter")).await.unwrap();
                    let n = cur.spec.to_value().get("n").and_then(|v| v.as_u64()).unwrap_or(0);
                    let mut next = (*cur).clone();
                    next.spec = RawJson::from_value(&serde_json::json!({"n": n + 1}));
                    match s.update(next, &WriteOptions::default()).await {
                        Ok(_) => break,
                        Err(e) if e.is_conflict() => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = s.get(&key("counter")).await.unwrap();
    assert_eq!(end.spec.to_value()["n"], serde_json::json!(racers * 10));
}

async fn lease_expiry_deletes_attached_objects(f: Factory) {
    let s = f().await;
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    assert_eq!(lease.ttl, Duration::from_secs(2));
    let mut created = Vec::new();
    for name in ["l1", "l2"] {
        let mut o = thing(name, serde_json::json!({"name": name}));
        o.metadata.lease = Some(lease.id);
        o.metadata.finalizers = vec!["orch.dev/ignored-by-leases".into()];
        created.push(s.create(o, &w()).await.unwrap());
    }
    let keep = s.create(thing("keep", serde_json::json!(1)), &w()).await.unwrap();
    let mut watch = s.watch(&WatchRequest::from(things(), keep.metadata.resource_version + 1)).await.unwrap();
    eventually_gone(&*s, &key("l1")).await;
    eventually_gone(&*s, &key("l2")).await;
    assert!(s.get(&key("keep")).await.is_ok());
    let a = next_change(&mut watch).await;
    let b = next_change(&mut watch).await;
    assert_eq!((describe(&a).0, describe(&b).0), ("Deleted", "Deleted"));
    assert_eq!(a.revision(), b.revision(), "keys of one lease go in one revision");
    assert!(a.revision() > keep.metadata.resource_version);
    let names: HashSet<String> = [&a, &b].iter().map(|e| describe(e).1).collect();
    assert_eq!(names, HashSet::from(["l1".to_string(), "l2".to_string()]));
    // Each body is the object's last state, at the deletion's revision.
    for e in [&a, &b] {
        let body = e.object().unwrap();
        let was = created.iter().find(|c| c.metadata.name == body.metadata.name).unwrap();
        assert_eq!(
            (&body.metadata.uid, body.metadata.lease, &body.metadata.finalizers, body.spec.to_value()),
            (&was.metadata.uid, Some(lease.id), &was.metadata.finalizers, was.spec.to_value()),
            "the last state of {}",
            was.metadata.name
        );
    }
    // An expired lease never comes back.
    assert!(matches!(s.keep_alive(lease.id).await.unwrap_err(), Error::LeaseNotFound(id) if id == lease.id));
    let mut late = thing("late", serde_json::json!(1));
    late.metadata.lease = Some(lease.id);
    assert!(matches!(s.create(late, &w()).await.unwrap_err(), Error::LeaseNotFound(_)));
}

async fn lease_keep_alive_and_revoke(f: Factory) {
    let s = f().await;
    let lease = s.grant_lease(Duration::from_secs(3)).await.unwrap();
    let mut o = thing("held", serde_json::json!(1));
    o.metadata.lease = Some(lease.id);
    s.create(o, &w()).await.unwrap();
    // Kept alive across several TTLs, the object stays.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let info = s.keep_alive(lease.id).await.unwrap();
        assert!(info.remaining > Duration::from_secs(1) && info.remaining <= Duration::from_secs(3));
    }
    assert!(s.get(&key("held")).await.is_ok());
    assert_eq!(s.lease(lease.id).await.unwrap().id, lease.id);
    // Detaching the object from the lease keeps it when the lease goes.
    let mut other = thing("detached", serde_json::json!(1));
    other.metadata.lease = Some(lease.id);
    let d = s.create(other, &w()).await.unwrap();
    let mut detach = (*d).clone();
    detach.metadata.lease = None;
    s.update(detach, &w()).await.unwrap();
    s.revoke_lease(lease.id).await.unwrap();
    eventually_gone(&*s, &key("held")).await;
    assert!(s.get(&key("detached")).await.is_ok());
    assert!(matches!(s.revoke_lease(lease.id).await.unwrap_err(), Error::LeaseNotFound(_)));
    assert!(matches!(s.lease(lease.id).await.unwrap_err(), Error::LeaseNotFound(_)));
}

async fn guard_fences_writes(f: Factory) {
    let s = f().await;
    let lock = s.create(thing("leader-lock", serde_json::json!({"holder": "a"})), &w()).await.unwrap();
    let guard = Guard { key: key("leader-lock"), resource_version: lock.metadata.resource_version };
    let fenced = WriteOptions { guard: Some(guard.clone()) };
    let ok = s.create(thing("work", serde_json::json!(1)), &fenced).await.unwrap();
    // Another holder takes the lock: the old token stops working for every kind of write.
    let mut taken = (*lock).clone();
    taken.spec = RawJson::from_value(&serde_json::json!({"holder": "b"}));
    s.update(taken, &w()).await.unwrap();
    let rev = s.current_revision().await.unwrap();
    let e = s.create(thing("work2", serde_json::json!(1)), &fenced).await.unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed { .. }), "{e}");
    let mut upd = (*ok).clone();
    upd.spec = RawJson::from_value(&serde_json::json!(2));
    assert!(matches!(s.update(upd.clone(), &fenced).await.unwrap_err(), Error::PreconditionFailed { .. }));
    assert!(matches!(s.update_status(upd, &fenced).await.unwrap_err(), Error::PreconditionFailed { .. }));
    let del = DeleteOptions { guard: Some(guard), ..Default::default() };
    assert!(matches!(s.delete(&key("work"), &del).await.unwrap_err(), Error::PreconditionFailed { .. }));
    assert_eq!(s.current_revision().await.unwrap(), rev, "fenced writes change nothing");
    assert!(s.get(&key("work2")).await.unwrap_err().is_not_found());
}

async fn bad_input_is_refused_without_change(f: Factory) {
    let s = f().await;
    let good = s.create(thing("good", serde_json::json!(1)), &w()).await.unwrap();
    let rev = s.current_revision().await.unwrap();
    let field_error = |e: Error, field: &str| {
        assert!(e.is_invalid(), "expected Invalid for {field}, got {e}");
        assert!(e.to_string().contains(field), "error should name {field}: {e}");
    };
    field_error(s.create(thing("Bad_Name", serde_json::json!(1)), &w()).await.unwrap_err(), "metadata.name");
    field_error(s.create(thing("", serde_json::json!(1)), &w()).await.unwrap_err(), "metadata.name");
    let mut bad_ns = thing("x", serde_json::json!(1));
    bad_ns.metadata.namespace = "-ns".into();
    field_error(s.create(bad_ns, &w()).await.unwrap_err(), "metadata.namespace");
    let mut bad_label = thing("x", serde_json::json!(1));
    bad_label.metadata.labels.insert("ok", "not ok!");
    field_error(s.create(bad_label, &w()).await.unwrap_err(), "metadata.labels");
    let bad_kind = DynamicObject::new("bad kind", ObjectMeta::namespaced(NS, "x"));
    field_error(s.create(bad_kind, &w()).await.unwrap_err(), "kind");
    let mut bad_update = (*good).clone();
    bad_update.metadata.finalizers = vec!["no good".into()];
    field_error(s.update(bad_update, &w()).await.unwrap_err(), "metadata.finalizers[0]");
    let token = ListRequest { continue_token: Some("garbage".into()), ..ListRequest::new(things()) };
    field_error(s.list(&token).await.unwrap_err(), "continue");
    field_error(s.list(&ListRequest::new(things()).limit(0)).await.unwrap_err(), "limit");
    field_error(s.grant_lease(Duration::ZERO).await.unwrap_err(), "ttl");
    assert_eq!(s.current_revision().await.unwrap(), rev, "refused writes change nothing");
    assert_eq!(*s.get(&key("good")).await.unwrap(), *good);
}
