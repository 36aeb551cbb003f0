//! A cluster of processes, as the README starts one: `orch server` with tokens, two `orch agent`
//! nodes joining with node tokens, workloads created by a user through `RemoteStore`, running
//! on both nodes; a read-only user and a forged token refused. Then SIGTERM stops them all.

#![cfg(feature = "cli")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use orch::core::kinds::{Phase, Workload};
use orch::core::{Api, ListParams, Object, ObjectMeta, Store};
use orch::store::api::RemoteStore;

use common::{orch, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_and_two_agents_run_a_users_workloads() {
    let dir = std::env::temp_dir().join(format!("orch-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("server");
    let admin = token(&data, "alice", "system:admins");
    let reader = token(&data, "bob", "system:readers");
    // Tokens are read when the server starts: all of them first.
    let node_tokens: Vec<String> =
        ["node-1", "node-2"].iter().map(|n| token(&data, &format!("system:node:{n}"), "system:nodes")).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let _server = orch(
        &["server", "--insecure-http", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", data.to_str().unwrap()],
        &dir.join("server.log"),
    );
    let mut agents = Vec::new();
    for (node, t) in ["node-1", "node-2"].into_iter().zip(&node_tokens) {
        let node_dir = dir.join(node);
        agents.push(orch(
            &[
                "agent",
                "--server",
                &url,
                "--join-token",
                t,
                "--name",
                node,
                "--data-dir",
                node_dir.to_str().unwrap(),
                "--drain",
            ],
            &dir.join(format!("{node}.log")),
        ));
    }
    let store: Arc<dyn Store> =
        Arc::new(RemoteStore::builder(url.clone()).bearer_token(admin.clone()).build().unwrap());
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(60);
    let nodes: Api<orch::core::kinds::Node> = Api::all(store.clone());
    loop {
        if let Ok(list) = nodes.list(&ListParams::default()).await
            && list.items.len() == 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "both nodes register");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..4 {
        let mut w = Workload::command("main", &["sleep", "300"]);
        w.containers[0].resources.requests.insert("cpu".into(), "500m".parse().unwrap());
        workloads.create(&Object::new(ObjectMeta::named(format!("web-{i}")), w)).await.unwrap();
    }
    let on = loop {
        let list = workloads.list(&ListParams::default()).await.unwrap();
        if list.items.iter().all(|w| w.status.phase == Phase::Running) {
            break list
                .items
                .iter()
                .map(|w| w.spec.node_name.clone().unwrap())
                .collect::<std::collections::BTreeSet<_>>();
        }
        assert!(
            Instant::now() < deadline,
            "all four run: {:?}",
            list.items.iter().map(|w| (&w.metadata.name, &w.status.phase)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(on.len(), 2, "the workloads are spread over both nodes: {on:?}");

    // A read-only user reads and cannot write; a forged token gets nothing.
    let read_only: Arc<dyn Store> = Arc::new(RemoteStore::builder(url.clone()).bearer_token(reader).build().unwrap());
    let ro: Api<Workload> = Api::namespaced(read_only, "default");
    assert_eq!(ro.list(&ListParams::default()).await.unwrap().items.len(), 4);
    let e = ro.delete("web-0", &Default::default()).await.unwrap_err();
    assert!(e.to_string().contains("403") && e.to_string().contains("cannot delete"), "{e}");
    let forged: Arc<dyn Store> = Arc::new(RemoteStore::builder(url).bearer_token("orch-forged").build().unwrap());
    let e = forged.current_revision().await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");

    drop(agents);
    let logs: String = ["server.log", "node-1.log", "node-2.log"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();
    assert!(!logs.contains(&admin), "a token appears in a log");
    let _ = std::fs::remove_dir_all(&dir);
}
