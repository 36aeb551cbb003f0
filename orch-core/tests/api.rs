//! Typed access through `Api<K>` on the in-memory store: validation, patching, scopes, watches.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use orch_core::kinds::{Node, Workload};
use orch_core::{
    Api, DeleteOptions, DeleteOutcome, Deleted, DynamicObject, Error, Event, LeaseId, LeaseInfo, ListParams,
    ListRequest, ListResponse, Object, ObjectKey, ObjectMeta, RawJson, Resource, Scope, Store, Validator, WatchRequest,
    WatchStream, WriteOptions,
};
use orch_store::MemoryStore;
use serde::{Deserialize, Serialize};
use serde_json::json;

fn store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Echo {
    message: String,
    replicas: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EchoStatus {
    ready: i32,
}

impl Resource for Echo {
    const KIND: &'static str = "Echo";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = EchoStatus;
    fn validate(&self, v: &mut Validator) {
        v.check(self.replicas >= 0, || "spec.replicas".into(), "must be >= 0");
    }
}

fn echo(name: &str, replicas: i32) -> Object<Echo> {
    Object::new(ObjectMeta::named(name), Echo { message: "hi".into(), replicas })
}

#[tokio::test]
async fn user_defined_kinds_are_validated_and_typed() {
    let api: Api<Echo> = Api::namespaced(store(), "default");
    let e = api.create(&echo("bad", -1)).await.unwrap_err();
    assert_eq!(e.to_string(), "invalid Echo: spec.replicas: must be >= 0");
    let created = api.create(&echo("good", 2)).await.unwrap();
    assert_eq!(created.metadata.namespace, "default");
    assert_eq!(created.spec.replicas, 2);
    let mut status = created.clone();
    status.status.ready = 2;
    let s = api.replace_status(&status).await.unwrap();
    assert_eq!(api.get("good").await.unwrap().status.ready, 2);
    assert_eq!(s.metadata.generation, 1);
    assert!(api.get_opt("missing").await.unwrap().is_none());
}

#[tokio::test]
async fn merge_patch_retries_on_conflict_unless_pinned() {
    let api: Api<Echo> = Api::namespaced(store(), "default");
    let created = api.create(&echo("p", 1)).await.unwrap();
    let patched = api.patch("p", &json!({"spec": {"replicas": 5}, "metadata": {"labels": {"a": "b"}}})).await.unwrap();
    assert_eq!(patched.spec.replicas, 5);
    assert_eq!(patched.spec.message, "hi");
    assert_eq!(patched.metadata.labels["a"], "b");
    assert_eq!(patched.metadata.generation, 2);
    // A patch pinned to an old resource version fails instead of retrying.
    let pinned = json!({"metadata": {"resourceVersion": created.metadata.resource_version}, "spec": {"replicas": 9}});
    assert!(api.patch("p", &pinned).await.unwrap_err().is_conflict());
    // A patch that makes the object invalid is refused, naming the field.
    let e = api.patch("p", &json!({"spec": {"replicas": -3}})).await.unwrap_err();
    assert!(e.to_string().contains("spec.replicas"), "{e}");
    let e = api.patch("p", &json!({"spec": {"replicas": "many"}})).await.unwrap_err();
    assert!(e.is_invalid(), "{e}");
    let st = api.patch_status("p", &json!({"status": {"ready": 4}})).await.unwrap();
    assert_eq!(st.status.ready, 4);
    assert_eq!(st.spec.replicas, 5);
    assert_eq!(api.get("p").await.unwrap().spec.replicas, 5);
}

#[tokio::test]
async fn scopes_are_enforced() {
    let s = store();
    let nodes: Api<Node> = Api::all(s.clone());
    let mut n = Object::new(ObjectMeta::named("n1"), Node::default());
    nodes.create(&n).await.unwrap();
    n.metadata.namespace = "default".into();
    let e = nodes.create(&n).await.unwrap_err();
    assert!(e.to_string().contains("metadata.namespace"), "{e}");
    let all: Api<Workload> = Api::all(s.clone());
    let w = Object::new(ObjectMeta::named("w"), Workload::command("main", &["/bin/true"]));
    assert!(all.create(&w).await.unwrap_err().to_string().contains("metadata.namespace"));
    let ns: Api<Workload> = Api::namespaced(s.clone(), "team-a");
    ns.create(&w).await.unwrap();
    let other: Api<Workload> = Api::namespaced(s, "team-b");
    other.create(&w).await.unwrap();
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 2);
    assert_eq!(ns.list(&ListParams::default()).await.unwrap().items.len(), 1);
    let mut wrong = w.clone();
    wrong.metadata.namespace = "team-b".into();
    assert!(ns.create(&wrong).await.unwrap_err().to_string().contains("does not match"));
}

#[tokio::test]
async fn invalid_workloads_never_reach_the_store() {
    let s = store();
    let api: Api<Workload> = Api::namespaced(s.clone(), "default");
    let mut w = Workload::command("main", &["/bin/sleep", "1"]);
    w.containers[0].resources.requests.insert("cpu".into(), "-1".parse().unwrap());
    let e = api.create(&Object::new(ObjectMeta::named("w"), w)).await.unwrap_err();
    assert!(e.to_string().contains("spec.containers[0].resources.requests.cpu: must be >= 0"), "{e}");
    assert_eq!(s.current_revision().await.unwrap(), 0);
}

#[tokio::test]
async fn typed_watch_and_delete() {
    let api: Api<Echo> = Api::namespaced(store(), "default");
    let mut watch = api.watch(&ListParams::default(), Some(1)).await.unwrap();
    let mut with_finalizer = echo("f", 1);
    with_finalizer.metadata.finalizers = vec!["orch.dev/wait".into()];
    api.create(&with_finalizer).await.unwrap();
    let Deleted::Pending(marked) = api.delete("f", &DeleteOptions::default()).await.unwrap() else { panic!() };
    assert!(marked.metadata.deletion_timestamp.is_some());
    let mut done = marked.clone();
    done.metadata.finalizers.clear();
    api.replace(&done).await.unwrap();
    let kinds: Vec<&str> = [watch.next().await, watch.next().await, watch.next().await]
        .into_iter()
        .map(|e| match e.unwrap().unwrap() {
            Event::Added(_) => "added",
            Event::Modified(_) => "modified",
            Event::Deleted(o) => {
                assert_eq!(o.spec.message, "hi");
                "deleted"
            }
            Event::Progress(_) => "progress",
        })
        .collect();
    assert_eq!(kinds, ["added", "modified", "deleted"]);
    assert!(api.get("f").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn a_fenced_api_cannot_be_given_another_guard() {
    use orch_core::{Guard, ObjectKey, WriteOptions};
    let s = store();
    let created = Api::<Echo>::namespaced(s.clone(), "default").create(&echo("f", 1)).await.unwrap();
    let leader = Guard { key: ObjectKey::new("LeaderLock", "sys", "l"), resource_version: 1 };
    let other = Guard { key: created.key(), resource_version: created.metadata.resource_version };
    let fenced: Api<Echo> = Api::namespaced(s, "default").fenced(Some(leader));
    let e = fenced.replace_with(&created, &WriteOptions { guard: Some(other.clone()) }).await.unwrap_err();
    assert!(e.is_invalid() && e.to_string().contains("guard"), "{e}");
    let d = orch_core::DeleteOptions { guard: Some(other), ..Default::default() };
    assert!(fenced.delete("f", &d).await.unwrap_err().is_invalid());
    // With only its own token it is fenced: the leader lock does not exist, so writes fail.
    let e = fenced.replace(&created).await.unwrap_err();
    assert!(matches!(e, orch_core::Error::PreconditionFailed { .. }), "{e}");
}

#[tokio::test]
async fn patch_keeps_fields_this_program_does_not_know() {
    let s = store();
    let raw = orch_core::DynamicObject::new("Echo", ObjectMeta::namespaced("default", "future"))
        .with_spec(orch_core::RawJson::parse(r#"{"message":"hi","replicas":1,"addedLater":true}"#).unwrap());
    s.create(raw, &Default::default()).await.unwrap();
    let api: Api<Echo> = Api::namespaced(s.clone(), "default");
    api.patch("future", &json!({"spec": {"replicas": 2}})).await.unwrap();
    let stored = s.get(&orch_core::ObjectKey::new("Echo", "default", "future")).await.unwrap();
    assert_eq!(stored.spec.to_value(), json!({"message": "hi", "replicas": 2, "addedLater": true}));
}

fn json_patch(ops: serde_json::Value) -> json_patch::Patch {
    serde_json::from_value(ops).expect("a JSON patch")
}

#[tokio::test]
async fn json_patch_changes_paths_of_the_object_and_refuses_what_the_call_may_not_write() {
    let api: Api<Echo> = Api::namespaced(store(), "default");
    api.create(&echo("j", 1)).await.unwrap();
    let patched = api
        .patch(
            "j",
            json_patch(json!([
                {"op": "test", "path": "/spec/message", "value": "hi"},
                {"op": "replace", "path": "/spec/replicas", "value": 3},
                {"op": "add", "path": "/metadata/labels", "value": {"tier": "web"}},
            ])),
        )
        .await
        .unwrap();
    assert_eq!((patched.spec.replicas, patched.metadata.labels["tier"].as_str()), (3, "web"));
    // A spec patch may not write the status; the refusal names the operation.
    let e = api.patch("j", json_patch(json!([{"op": "replace", "path": "/status/ready", "value": 9}]))).await;
    let e = e.unwrap_err().to_string();
    assert!(e.contains("patch[0].path") && e.contains("/status/ready"), "{e}");
    // A failed test leaves the object as it was, naming the operation.
    let e = api
        .patch(
            "j",
            json_patch(json!([
                {"op": "replace", "path": "/spec/replicas", "value": 7},
                {"op": "test", "path": "/spec/message", "value": "bye"},
            ])),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("patch[1]"), "{e}");
    assert_eq!(api.get("j").await.unwrap().spec.replicas, 3, "all operations or none");
    // The status through its own call.
    let st = api.patch_status("j", json_patch(json!([{"op": "add", "path": "/status/ready", "value": 2}]))).await;
    assert_eq!(st.unwrap().status.ready, 2);
    // Pinned to an old resource version: a conflict, not a retry.
    let stale = json_patch(json!([{"op": "replace", "path": "/metadata/resourceVersion", "value": 1}]));
    assert!(api.patch("j", stale).await.unwrap_err().is_conflict());
}

/// A spec that does not decode as a `Workload`: its cpu request is not a quantity.
fn malformed_workload(name: &str) -> DynamicObject {
    let mut spec = serde_json::to_value(Workload::command("main", &["/bin/true"])).unwrap();
    spec["containers"][0]["resources"] = json!({"requests": {"cpu": "lots"}});
    DynamicObject::new(Workload::KIND, ObjectMeta::namespaced("default", name)).with_spec(RawJson::from_value(&spec))
}

#[tokio::test]
async fn an_object_that_does_not_decode_is_named_and_lenient_lists_skip_it() {
    let store = store();
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    for name in ["a", "z"] {
        api.create(&Object::new(ObjectMeta::named(name), Workload::command("main", &["/bin/true"]))).await.unwrap();
    }
    store.create(malformed_workload("broken"), &WriteOptions::default()).await.unwrap();

    let e = api.list(&ListParams::default()).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("Workload default/broken"), "names kind, namespace and name: {text}");
    assert!(text.contains("spec.containers[0].resources.requests.cpu: invalid quantity \"lots\""), "{text}");
    match &e {
        Error::Serialization { what, path, .. } => {
            assert_eq!(what, "Workload default/broken");
            assert_eq!(path, "spec.containers[0].resources.requests.cpu");
        }
        other => panic!("expected Serialization, got {other}"),
    }
    let get = api.get("broken").await.unwrap_err().to_string();
    assert!(get.contains("Workload default/broken: spec.containers[0].resources.requests.cpu"), "{get}");

    let (list, bad) = api.list_lenient(&ListParams::default()).await.unwrap();
    let names: Vec<_> = list.items.iter().map(|o| o.metadata.name.as_str()).collect();
    assert_eq!(names, ["a", "z"]);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, ObjectKey::new(Workload::KIND, "default", "broken"));
    assert!(bad[0].1.to_string().contains("spec.containers[0].resources.requests.cpu"), "{}", bad[0].1);
}

/// A store where another writer changes the object just before each of the first `races`
/// updates, so that update loses the compare-and-swap.
#[derive(Debug)]
struct RacingStore {
    inner: MemoryStore,
    races: AtomicUsize,
}

#[async_trait::async_trait]
impl Store for RacingStore {
    async fn get(&self, key: &ObjectKey) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.get(key).await
    }
    async fn list(&self, req: &ListRequest) -> orch_core::Result<ListResponse> {
        self.inner.list(req).await
    }
    async fn create(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.create(obj, opts).await
    }
    async fn update(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        if self.races.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            let mut theirs = (*self.inner.get(&obj.key()).await?).clone();
            let count = theirs.metadata.labels.get("racer").map_or(0, |n| n.parse::<u32>().unwrap());
            theirs.metadata.labels.insert("racer", (count + 1).to_string());
            self.inner.update(theirs, &WriteOptions::default()).await?;
        }
        self.inner.update(obj, opts).await
    }
    async fn update_status(&self, obj: DynamicObject, opts: &WriteOptions) -> orch_core::Result<Arc<DynamicObject>> {
        self.inner.update_status(obj, opts).await
    }
    async fn delete(&self, key: &ObjectKey, opts: &DeleteOptions) -> orch_core::Result<DeleteOutcome> {
        self.inner.delete(key, opts).await
    }
    async fn watch(&self, req: &WatchRequest) -> orch_core::Result<WatchStream> {
        self.inner.watch(req).await
    }
    async fn current_revision(&self) -> orch_core::Result<u64> {
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: u64) -> orch_core::Result<()> {
        self.inner.compact(revision).await
    }
    async fn grant_lease(&self, ttl: Duration) -> orch_core::Result<LeaseInfo> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, id: LeaseId) -> orch_core::Result<LeaseInfo> {
        self.inner.keep_alive(id).await
    }
    async fn revoke_lease(&self, id: LeaseId) -> orch_core::Result<()> {
        self.inner.revoke_lease(id).await
    }
    async fn lease(&self, id: LeaseId) -> orch_core::Result<LeaseInfo> {
        self.inner.lease(id).await
    }
}

#[tokio::test(start_paused = true)]
async fn retry_on_conflict_rereads_until_its_change_lands_beside_the_racing_one() {
    let store = Arc::new(RacingStore { inner: MemoryStore::new(), races: AtomicUsize::new(0) });
    let api: Api<Echo> = Api::namespaced(store.clone(), "ns");
    api.create(&echo("e", 1)).await.unwrap();
    store.races.store(2, Ordering::SeqCst);
    let mut attempts = 0;
    let done = api
        .retry_on_conflict("e", |obj| {
            attempts += 1;
            obj.spec.replicas += 1;
            obj.metadata.labels.insert("mine", "yes");
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(attempts, 3, "two lost races, then success");
    assert_eq!(done.spec.replicas, 2, "the change applies once, to the fresh object");
    assert_eq!(done.metadata.labels.get("racer").map(String::as_str), Some("2"), "the racing writes are kept");
    assert_eq!(done.metadata.labels.get("mine").map(String::as_str), Some("yes"));
    assert_eq!(api.get("e").await.unwrap(), done);

    // A writer that always wins: a few attempts, then the conflict.
    store.races.store(usize::MAX, Ordering::SeqCst);
    let mut attempts = 0;
    let e = api
        .retry_on_conflict("e", |_| {
            attempts += 1;
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert_eq!(attempts, 5);
    // The closure's own error stops at once.
    let e = api.retry_on_conflict("e", |_| Err(Error::invalid("Echo", "spec", "no"))).await.unwrap_err();
    assert!(e.is_invalid(), "{e}");
    assert!(api.retry_on_conflict("missing", |_| Ok(())).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn write_status_writes_only_the_status_compare_and_swap() {
    let api: Api<Echo> = Api::namespaced(store(), "default");
    let created = api.create(&echo("s", 2)).await.unwrap();
    let meta = api.write_status(&created.metadata, &EchoStatus { ready: 2 }).await.unwrap();
    assert!(meta.resource_version > created.metadata.resource_version);
    let stored = api.get("s").await.unwrap();
    assert_eq!((stored.status.ready, stored.spec.replicas), (2, 2), "the status written, the spec as it was");
    assert_eq!(stored.metadata.resource_version, meta.resource_version);
    // The same (now stale) version again: a conflict, nothing written.
    assert!(api.write_status(&created.metadata, &EchoStatus { ready: 9 }).await.unwrap_err().is_conflict());
    assert_eq!(api.get("s").await.unwrap().status.ready, 2);
    let mut elsewhere = meta.clone();
    elsewhere.namespace = "other".into();
    let e = api.write_status(&elsewhere, &EchoStatus { ready: 1 }).await.unwrap_err();
    assert!(e.to_string().contains("metadata.namespace"), "{e}");
}
