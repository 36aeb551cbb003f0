//! The API server as a Kubernetes client sees it: paths, shapes, status codes, limits; and
//! `RemoteStore` watches across a server restart.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use futures::StreamExt;
use http_body_util::BodyExt;
use orch_core::{DynamicObject, ObjectMeta, RawJson, Selection, Store, WatchEvent, WatchRequest, WriteOptions};
use orch_store::MemoryStore;
use orch_store::api::{ApiServer, Limits, RemoteStore};
use serde_json::{Value, json};
use tower::ServiceExt;

mod common;

fn router(store: Arc<dyn Store>) -> Router {
    ApiServer::new(store).router()
}

async fn call(app: &Router, method: Method, uri: &str, body: Option<Value>, content_type: &str) -> (StatusCode, Value) {
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let req = Request::builder().method(method).uri(uri).header("content-type", content_type).body(body).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let code = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (code, value)
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    call(app, Method::GET, uri, None, "application/json").await
}

fn workload(name: &str) -> Value {
    json!({
        "apiVersion": "orch.dev/v1", "kind": "Workload",
        "metadata": {"name": name, "namespace": "team-a", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "main", "command": ["sleep", "1000"]}]},
    })
}

const WORKLOADS: &str = "/apis/orch.dev/v1/namespaces/team-a/workloads";

#[tokio::test]
async fn discovery_names_the_group_kinds_verbs_and_short_names() {
    let app = router(Arc::new(MemoryStore::new()));
    let (code, groups) = get(&app, "/apis").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(groups["groups"][0]["name"], "orch.dev");
    assert_eq!(groups["groups"][0]["preferredVersion"]["groupVersion"], "orch.dev/v1");
    let (_, list) = get(&app, "/apis/orch.dev/v1").await;
    let resources = list["resources"].as_array().unwrap();
    let wl = resources.iter().find(|r| r["name"] == "workloads").expect("workloads listed");
    assert_eq!(wl["kind"], "Workload");
    assert_eq!(wl["namespaced"], true);
    assert_eq!(wl["shortNames"], json!(["wl"]));
    assert!(wl["verbs"].as_array().unwrap().iter().any(|v| v == "watch"));
    let nodes = resources.iter().find(|r| r["name"] == "nodes").expect("nodes listed");
    assert_eq!(nodes["namespaced"], false);
    assert!(resources.iter().any(|r| r["name"] == "workloads/status"));
    let (code, core) = get(&app, "/api").await;
    assert_eq!((code, core["kind"].clone()), (StatusCode::OK, json!("APIVersions")));
}

#[tokio::test]
async fn create_get_list_in_kubernetes_shapes() {
    let app = router(Arc::new(MemoryStore::new()));
    for name in ["a", "b", "c"] {
        let (code, created) = call(&app, Method::POST, WORKLOADS, Some(workload(name)), "application/json").await;
        assert_eq!(code, StatusCode::CREATED, "{created}");
        assert_eq!(created["apiVersion"], "orch.dev/v1");
        assert!(created["metadata"]["resourceVersion"].is_string(), "{created}");
        assert!(!created["metadata"]["uid"].as_str().unwrap().is_empty());
    }
    let (code, one) = get(&app, &format!("{WORKLOADS}/b")).await;
    assert_eq!((code, one["metadata"]["name"].clone()), (StatusCode::OK, json!("b")));
    let (code, page) = get(&app, &format!("{WORKLOADS}?limit=2")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(page["kind"], "WorkloadList");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let rv = page["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let token = page["metadata"]["continue"].as_str().expect("a continue token").to_string();
    let (_, rest) =
        get(&app, &format!("{WORKLOADS}?limit=2&continue={}", orch_store::api::wire::encode_query(&token))).await;
    assert_eq!(rest["items"][0]["metadata"]["name"], "c");
    assert_eq!(rest["metadata"]["resourceVersion"], rv.as_str(), "pages share the first page's revision");
    assert!(rest["metadata"].get("continue").is_none());
    let (_, all) =
        get(&app, "/apis/orch.dev/v1/workloads?labelSelector=app%3Dweb&fieldSelector=metadata.name%3Da").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1);
    assert_eq!(all["items"][0]["metadata"]["name"], "a");
}

#[tokio::test]
async fn errors_are_status_objects_with_their_codes() {
    let store = Arc::new(MemoryStore::new());
    let app = router(store.clone());
    let (code, st) = get(&app, &format!("{WORKLOADS}/ghost")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(
        (st["kind"].clone(), st["reason"].clone(), st["code"].clone()),
        (json!("Status"), json!("NotFound"), json!(404))
    );
    let (_, created) = call(&app, Method::POST, WORKLOADS, Some(workload("a")), "application/json").await;
    let (code, st) = call(&app, Method::POST, WORKLOADS, Some(workload("a")), "application/json").await;
    assert_eq!((code, st["reason"].clone()), (StatusCode::CONFLICT, json!("AlreadyExists")));
    // A stale update: 409 carrying the current object.
    let mut stale = created.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let (_, _) = call(
        &app,
        Method::PATCH,
        &format!("{WORKLOADS}/a"),
        Some(json!({"metadata": {"labels": {"v": "2"}}})),
        "application/merge-patch+json",
    )
    .await;
    let (code, st) = call(&app, Method::PUT, &format!("{WORKLOADS}/a"), Some(stale), "application/json").await;
    assert_eq!((code, st["reason"].clone()), (StatusCode::CONFLICT, json!("Conflict")));
    assert_eq!(st["details"]["current"]["metadata"]["labels"]["v"], "2", "{st}");
    // An invalid workload: 422 with a cause per field.
    let mut bad = workload("Bad_Name");
    bad["spec"]["containers"] = json!([]);
    let (code, st) = call(&app, Method::POST, WORKLOADS, Some(bad), "application/json").await;
    assert_eq!((code, st["reason"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("Invalid")), "{st}");
    let fields: Vec<&str> =
        st["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert!(fields.contains(&"metadata.name") && fields.contains(&"spec.containers"), "{fields:?}");
    // A spec that does not decode names the field.
    let mut undecodable = workload("x");
    undecodable["spec"]["priority"] = json!("high");
    let (code, st) = call(&app, Method::POST, WORKLOADS, Some(undecodable), "application/json").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{st}");
    assert!(st["message"].as_str().unwrap().contains("priority"), "{st}");
    // A compacted revision: 410 Gone.
    let rev = store.current_revision().await.unwrap();
    store.compact(rev).await.unwrap();
    let (code, st) = get(&app, &format!("{WORKLOADS}?watch=true&resourceVersion=0")).await;
    assert_eq!((code, st["reason"].clone()), (StatusCode::GONE, json!("Expired")), "{st}");
    let (code, _) =
        call(&app, Method::PATCH, &format!("{WORKLOADS}/a"), Some(json!({})), "application/strategic-merge-patch+json")
            .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn merge_patch_dry_run_status_and_delete() {
    let store = Arc::new(MemoryStore::new());
    let app = router(store.clone());
    call(&app, Method::POST, WORKLOADS, Some(workload("a")), "application/json").await;
    let rev = store.current_revision().await.unwrap();
    let (code, dry) =
        call(&app, Method::POST, &format!("{WORKLOADS}?dryRun=All"), Some(workload("b")), "application/json").await;
    assert_eq!(code, StatusCode::CREATED, "{dry}");
    let (code, _) = call(
        &app,
        Method::PATCH,
        &format!("{WORKLOADS}/a?dryRun=All"),
        Some(json!({"spec": {"priority": 5}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(store.current_revision().await.unwrap(), rev, "dry runs write nothing");
    let (code, patched) = call(
        &app,
        Method::PATCH,
        &format!("{WORKLOADS}/a"),
        Some(json!({"spec": {"priority": 5}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!((code, patched["spec"]["priority"].clone()), (StatusCode::OK, json!(5)));
    assert_eq!(patched["spec"]["containers"][0]["name"], "main", "a merge patch keeps what it does not name");
    let (code, st) = call(
        &app,
        Method::PATCH,
        &format!("{WORKLOADS}/a/status"),
        Some(json!({"status": {"message": "hello"}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{st}");
    assert_eq!(st["status"]["message"], "hello");
    let pre = json!({"preconditions": {"resourceVersion": "1"}});
    let (code, st) = call(&app, Method::DELETE, &format!("{WORKLOADS}/a"), Some(pre), "application/json").await;
    assert_eq!(code, StatusCode::CONFLICT, "{st}");
    let (code, _) = call(
        &app,
        Method::DELETE,
        &format!("{WORKLOADS}/a"),
        Some(json!({"propagationPolicy": "Background"})),
        "application/json",
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(get(&app, &format!("{WORKLOADS}/a")).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn watch_is_a_stream_of_typed_events_with_bookmarks() {
    let store = Arc::new(MemoryStore::new());
    let app = router(store.clone());
    call(&app, Method::POST, WORKLOADS, Some(workload("before")), "application/json").await;
    let req = Request::get(format!("{WORKLOADS}?watch=true&allowWatchBookmarks=true&progressIntervalMs=50"))
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body().into_data_stream();
    call(&app, Method::POST, WORKLOADS, Some(workload("after")), "application/json").await;
    let mut text = String::new();
    let mut lines: Vec<Value> = Vec::new();
    while !lines.iter().any(|l| l["type"] == "BOOKMARK") || lines.len() < 3 {
        let chunk =
            tokio::time::timeout(Duration::from_secs(10), body.next()).await.expect("an event").unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(i) = text.find('\n') {
            lines.push(serde_json::from_str(&text[..i]).unwrap());
            text.drain(..=i);
        }
    }
    // Without a resourceVersion the current objects come first, as ADDED.
    assert_eq!(
        (lines[0]["type"].clone(), lines[0]["object"]["metadata"]["name"].clone()),
        (json!("ADDED"), json!("before"))
    );
    assert_eq!(
        (lines[1]["type"].clone(), lines[1]["object"]["metadata"]["name"].clone()),
        (json!("ADDED"), json!("after"))
    );
    let bookmark = lines.iter().find(|l| l["type"] == "BOOKMARK").unwrap();
    assert_eq!(bookmark["object"]["kind"], "Workload");
    assert!(bookmark["object"]["metadata"]["resourceVersion"].is_string());
}

#[tokio::test]
async fn limits_answer_4xx_naming_the_limit() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let limits = Limits {
        max_body_bytes: 4096,
        max_object_bytes: 1024,
        max_watches_per_client: 1,
        requests_per_second: Some(1.0),
        rate_burst: 4,
        ..Limits::default()
    };
    let app = ApiServer::builder(store).limits(limits).build().router();
    let mut big = workload("big");
    big["metadata"]["annotations"] = json!({"note": "x".repeat(8192)});
    let (code, st) = call(&app, Method::POST, WORKLOADS, Some(big), "application/json").await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(st["message"].as_str().unwrap().contains("4096"), "{st}");
    let mut large = workload("large");
    large["metadata"]["annotations"] = json!({"note": "x".repeat(2000)});
    let (code, st) = call(&app, Method::POST, WORKLOADS, Some(large), "application/json").await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(st["message"].as_str().unwrap().contains("limit of 1024"), "{st}");
    let watch = Request::get(format!("{WORKLOADS}?watch=true&resourceVersion=0")).body(Body::empty()).unwrap();
    let held = app.clone().oneshot(watch).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let (code, st) = get(&app, &format!("{WORKLOADS}?watch=true&resourceVersion=0")).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    assert!(st["message"].as_str().unwrap().contains("watches"), "{st}");
    drop(held);
    // Four requests spent the burst: the fifth is refused.
    let (code, st) = get(&app, WORKLOADS).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{st}");
    assert!(st["message"].as_str().unwrap().contains("requests per second"), "{st}");
}

/// A watch through `RemoteStore` outlives the server: stopped, restarted on the same port and
/// file, the stream goes on from where it was, with nothing lost or repeated.
#[test]
fn remote_watch_resumes_after_a_server_restart() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let path = common::scratch_dir("api-restart").join("store.redb");
        let open = || Arc::new(orch_store::RedbStore::open(&path).unwrap()) as Arc<dyn Store>;
        let thing = |i: u32| {
            DynamicObject::new("Thing", ObjectMeta::namespaced("ns", format!("t{i}")))
                .with_spec(RawJson::from_value(&json!(i)))
        };
        let store = open();
        let server = ApiServer::new(store.clone()).spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.addr;
        let remote = RemoteStore::new(server.url()).unwrap();
        let mut watch =
            remote.watch(&WatchRequest::from(Selection::kind("Thing").in_namespace("ns"), 1)).await.unwrap();
        for i in 0..5 {
            remote.create(thing(i), &WriteOptions::default()).await.unwrap();
        }
        for i in 0..5 {
            let e = watch.next().await.unwrap().unwrap();
            assert!(matches!(&e, WatchEvent::Added(o) if o.metadata.name == format!("t{i}")), "{e:?}");
        }
        server.shutdown().await.unwrap();
        drop(store);
        let store = open();
        for i in 5..8 {
            store.create(thing(i), &WriteOptions::default()).await.unwrap();
        }
        let server = ApiServer::new(store.clone()).spawn(addr).await.unwrap();
        for i in 8..10 {
            remote.create(thing(i), &WriteOptions::default()).await.unwrap();
        }
        for i in 5..10 {
            let e = tokio::time::timeout(Duration::from_secs(20), watch.next()).await.unwrap().unwrap().unwrap();
            assert!(matches!(&e, WatchEvent::Added(o) if o.metadata.name == format!("t{i}")), "{e:?}");
        }
        server.shutdown().await.unwrap();
    });
}

#[tokio::test]
async fn workload_controller_kinds_are_served_checked_and_deleted_as_asked() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let app = router(store.clone());
    let (_, list) = get(&app, "/apis/orch.dev/v1").await;
    let resources = list["resources"].as_array().unwrap();
    for (name, short) in [
        ("deployments", "deploy"),
        ("replicasets", "rs"),
        ("daemonsets", "ds"),
        ("statefulsets", "sts"),
        ("workflows", "wf"),
        ("events", "ev"),
    ] {
        let r = resources.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name} listed"));
        assert_eq!(r["shortNames"], json!([short]), "{name}");
    }
    assert!(resources.iter().any(|r| r["name"] == "jobs"));
    // A deployment whose spec does not decode is refused, naming the field.
    let deployments = "/apis/orch.dev/v1/namespaces/team-a/deployments";
    let bad = json!({
        "apiVersion": "orch.dev/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "team-a"},
        "spec": {"replicas": "three"},
    });
    let (code, st) = call(&app, Method::POST, deployments, Some(bad), "application/json").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{st}");
    assert!(st["message"].as_str().unwrap().contains("replicas"), "{st}");
    // A stateful set, posted under its short name, is checked like the others.
    let bad_set = json!({
        "apiVersion": "orch.dev/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "team-a"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "template": {"metadata": {"labels": {"app": "other"}},
                 "spec": {"containers": [{"name": "main", "command": ["db"]}]}}},
    });
    let (code, st) =
        call(&app, Method::POST, "/apis/orch.dev/v1/namespaces/team-a/sts", Some(bad_set), "application/json").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{st}");
    assert!(st["message"].as_str().unwrap().contains("spec.template.metadata.labels"), "{st}");
    // An orphaning delete reaches the store: the object is marked for the garbage collector.
    let (code, _) = call(&app, Method::POST, WORKLOADS, Some(workload("owner")), "application/json").await;
    assert_eq!(code, StatusCode::CREATED);
    let opts = json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Orphan"});
    let (code, marked) =
        call(&app, Method::DELETE, &format!("{WORKLOADS}/owner"), Some(opts), "application/json").await;
    assert_eq!(code, StatusCode::ACCEPTED, "{marked}");
    assert_eq!(marked["metadata"]["finalizers"], json!([orch_core::store::ORPHAN_FINALIZER]), "{marked}");
    let bad_policy = json!({"propagationPolicy": "Sideways"});
    let (code, st) =
        call(&app, Method::DELETE, &format!("{WORKLOADS}/owner"), Some(bad_policy), "application/json").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{st}");
}

#[tokio::test]
async fn volume_kinds_are_discoverable_by_short_name_and_checked() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let app = router(store.clone());
    let (_, list) = get(&app, "/apis/orch.dev/v1").await;
    let resources = list["resources"].as_array().unwrap();
    let claims = resources.iter().find(|r| r["name"] == "volumeclaims").expect("volumeclaims listed");
    assert_eq!((claims["shortNames"].clone(), claims["namespaced"].clone()), (json!(["vc", "pvc"]), json!(true)));
    let volumes = resources.iter().find(|r| r["name"] == "persistentvolumes").expect("persistentvolumes listed");
    assert_eq!((volumes["shortNames"].clone(), volumes["namespaced"].clone()), (json!(["pv", "vol"]), json!(false)));

    // A bad claim, posted under its short name, is refused naming each field.
    let bad = json!({
        "apiVersion": "orch.dev/v1", "kind": "VolumeClaim",
        "metadata": {"name": "data", "namespace": "team-a"},
        "spec": {"size": "0", "volumeClass": ""},
    });
    let (code, st) =
        call(&app, Method::POST, "/apis/orch.dev/v1/namespaces/team-a/pvc", Some(bad), "application/json").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{st}");
    let fields: Vec<&str> =
        st["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert!(fields.contains(&"spec.size") && fields.contains(&"spec.volumeClass"), "{fields:?}");
    let good = json!({
        "apiVersion": "orch.dev/v1", "kind": "VolumeClaim",
        "metadata": {"name": "data", "namespace": "team-a"},
        "spec": {"size": "1Gi", "volumeClass": "local", "accessMode": "ReadWriteOnce"},
    });
    let (code, st) =
        call(&app, Method::POST, "/apis/orch.dev/v1/namespaces/team-a/vc", Some(good), "application/json").await;
    assert_eq!(code, StatusCode::CREATED, "{st}");

    // A node-local volume offering many-node writes is refused; a status naming no volume for
    // a bound claim too.
    let bad_volume = json!({
        "apiVersion": "orch.dev/v1", "kind": "PersistentVolume",
        "metadata": {"name": "pv-1"},
        "spec": {"capacity": "1Gi", "volumeClass": "local", "nodeName": "n1", "accessModes": ["ReadWriteMany"]},
    });
    let (code, st) = call(&app, Method::POST, "/apis/orch.dev/v1/vol", Some(bad_volume), "application/json").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{st}");
    assert!(st["message"].as_str().unwrap().contains("spec.accessModes[0]"), "{st}");
    let bound = json!({"status": {"phase": "Bound"}});
    let (code, st) = call(
        &app,
        Method::PATCH,
        "/apis/orch.dev/v1/namespaces/team-a/volumeclaims/data/status",
        Some(bound),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{st}");
    assert!(st["message"].as_str().unwrap().contains("status.volumeName"), "{st}");
}
