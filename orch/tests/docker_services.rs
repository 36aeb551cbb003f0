//! Services for containers, with the real binaries and the real Docker Engine: `orch server`
//! hands out cluster addresses from a block outside 127/8, and `orch agent --runtime docker
//! --dns-listen <address>:53` runs the workloads as containers on the default bridge network.
//! From inside a client container, the service is found by its short name through the node's
//! cluster DNS and answers at its cluster address through the node's proxy, both on addresses
//! the agent made local on the machine (the containers' gateway).
//!
//! Needs the engine and a static busybox (skipped with a note without them, unless
//! `ORCH_REQUIRE_DOCKER=1`) and `CAP_NET_ADMIN` for the routes (likewise, unless
//! `ORCH_REQUIRE_NET_ADMIN=1`).

#![cfg(all(feature = "cli", feature = "docker"))]

mod common;

use std::process::Command;
use std::sync::Arc;

use orch::core::kinds::{ContainerPort, Node, Service, ServicePort, Workload};
use orch::core::{Api, Object, ObjectMeta, Store};
use orch::runtime::net::LocalRoute;
use orch::runtime::{DockerConfig, DockerRuntime};
use orch::store::api::RemoteStore;

use common::{eventually, free_port, orch, token};

/// Why this test cannot run here, if it cannot (panics instead where CI requires it).
async fn unavailable(image: &str) -> Option<String> {
    let require = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
    let why = if let Err(e) = LocalRoute::add("10.98.255.254".parse().unwrap()) {
        if require("ORCH_REQUIRE_NET_ADMIN") {
            panic!("routes are required here (ORCH_REQUIRE_NET_ADMIN=1) but cannot be added: {e}");
        }
        format!("cannot add a local route ({e}); it takes CAP_NET_ADMIN")
    } else {
        let imported = async {
            let rt = DockerRuntime::connect(DockerConfig::new("probe")).await.map_err(|e| e.to_string())?;
            let rootfs = orch::runtime::docker::busybox_rootfs(std::path::Path::new("/bin/busybox"))
                .map_err(|e| e.to_string())?;
            rt.import_image(image, rootfs).await.map_err(|e| e.to_string())
        };
        match imported.await {
            Ok(()) => return None,
            Err(e) if require("ORCH_REQUIRE_DOCKER") => {
                panic!("the Docker tests are required here (ORCH_REQUIRE_DOCKER=1) but cannot run: {e}")
            }
            Err(e) => format!("no Docker engine or busybox: {e}"),
        }
    };
    Some(why)
}

/// Runs `docker` with `args`: its exit code and output.
fn docker(args: &[&str]) -> (i32, String) {
    let out = Command::new("docker").args(args).output().expect("the docker command");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Removes this test's containers and image when it ends, passed or failed.
struct Cleanup {
    node: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (_, ids) = docker(&["ps", "-aq", "--filter", &format!("label=orch.dev/node={}", self.node)]);
        for id in ids.split_whitespace() {
            docker(&["rm", "-f", "-v", id]);
        }
        docker(&["rmi", "-f", &self.image]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_on_a_bridge_find_a_service_by_name_and_reach_it() {
    let pid = std::process::id();
    let image = format!("orch-test-busybox-cli:{pid}");
    if let Some(why) = unavailable(&image).await {
        eprintln!("skipped containers_on_a_bridge_find_a_service_by_name_and_reach_it: {why}");
        return;
    }
    let node = format!("dk{pid}");
    let _cleanup = Cleanup { node: node.clone(), image: image.clone() };
    let block = pid % 250;
    let range = format!("10.96.{block}.0/24");
    let dns_address = format!("10.97.{block}.10");

    let dir = std::env::temp_dir().join(format!("orch-docker-services-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("server");
    let admin = token(&data, "alice", "system:admins");
    let node_token = token(&data, &format!("system:node:{node}"), "system:nodes");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let data_arg = data.to_str().unwrap().to_string();
    let server = orch(
        &["server", "--insecure-http", "--listen", &listen, "--data-dir", &data_arg, "--cluster-address-range", &range],
        &dir.join("server.log"),
    );
    let node_dir = dir.join(&node);
    let dns_listen = format!("{dns_address}:53");
    let agent = orch(
        &[
            "agent",
            "--server",
            &url,
            "--join-token",
            &node_token,
            "--name",
            &node,
            "--runtime",
            "docker",
            "--data-dir",
            node_dir.to_str().unwrap(),
            "--dns-listen",
            &dns_listen,
            "--drain",
        ],
        &dir.join("agent.log"),
    );
    let store: Arc<dyn Store> = Arc::new(RemoteStore::builder(url.clone()).bearer_token(admin).build().unwrap());

    let nodes: Api<Node> = Api::all(store.clone());
    eventually("the node registers", async || nodes.get(&node).await.ok()).await;

    // A web server in a container, behind a service; and a client container beside it.
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    let web = "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 80 -h /www";
    let mut w = Workload::command("main", &["/bin/sh", "-c", web]);
    w.containers[0].image = Some(image.clone());
    w.containers[0].ports = vec![ContainerPort { name: Some("http".into()), container_port: 80, ..Default::default() }];
    w.node_name = Some(node.clone());
    workloads.create(&Object::new(ObjectMeta::named("web-0").with_label("app", "web"), w)).await.unwrap();
    let mut client = Workload::command("main", &["/bin/sh", "-c", "exec sleep 600"]);
    client.containers[0].image = Some(image.clone());
    client.node_name = Some(node.clone());
    workloads.create(&Object::new(ObjectMeta::named("client"), client)).await.unwrap();
    let services: Api<Service> = Api::namespaced(store.clone(), "default");
    let svc = Service::selecting(&[("app", "web")], vec![ServicePort::to_named(80, "http")]);
    services.create(&Object::new(ObjectMeta::named("web"), svc)).await.unwrap();
    let cluster =
        eventually("a cluster address from the block", async || services.get("web").await.ok()?.status.cluster_address)
            .await;
    assert!(cluster.starts_with(&format!("10.96.{block}.")), "{cluster}");

    let container = eventually("the client container runs", async || {
        let (_, id) = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=orch.dev/node={node}"),
            "--filter",
            "label=orch.dev/workload=client",
        ]);
        let id = id.trim().to_string();
        (!id.is_empty()).then_some(id)
    })
    .await;
    let exec = |script: String| docker(&["exec", &container, "/bin/sh", "-c", &script]);
    let (_, resolv) = exec("cat /etc/resolv.conf".into());
    assert!(resolv.contains(&format!("nameserver {dns_address}")), "{resolv}");

    // By its short name, through the namespace's search domain and the node's DNS.
    let answer = eventually("the short name resolves in the container", async || {
        let (_, out) = exec("nslookup -type=a web".into());
        out.contains(&format!("Address: {cluster}")).then_some(out)
    })
    .await;
    assert!(answer.contains("web.default.svc.cluster.local"), "{answer}");
    // At the cluster address, through the node proxy, to the web container's published port.
    let page = eventually("the service answers at its cluster address", async || {
        let (code, out) = exec(format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {cluster} 80"));
        (code == 0 && out.contains("hello-from-web")).then_some(out)
    })
    .await;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");

    drop(agent);
    drop(server);
    // The agent's routes went with it.
    for ip in [cluster.as_str(), dns_address.as_str()] {
        let err = std::net::UdpSocket::bind((ip, 0)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrNotAvailable, "{ip} is still local");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
