//! Services across real processes: `orch server` with its endpoints controller (cluster address
//! range and slice size from its flags) and its DNS server, and two `orch agent` nodes on one
//! machine with their own addresses (127.0.0.2, 127.0.0.3), port ranges and node proxies. A
//! service's endpoints are the workloads' node addresses and host ports, and a real HTTP request
//! to each answers there; each node's proxy reaches the other node's workload through a node
//! port; the service's name resolves to its cluster address, where both nodes' workloads answer;
//! a node's token may read services and slices but not write them; a workload whose readiness
//! probe starts failing gets no new connection from the proxy, and a deleted workload's name
//! leaves DNS.

#![cfg(feature = "cli")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::op::ResponseCode;
use orch::core::kinds::{EndpointSlice, Node, PortTarget, Service, ServicePort, Workload};
use orch::core::{Api, ListParams, Object, ObjectMeta, Store};
use orch::store::api::RemoteStore;

use common::{eventually, orch, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free range of `n` ports on `address`.
fn free_range(address: &str, n: u16) -> String {
    loop {
        let first = std::net::TcpListener::bind((address, 0)).unwrap().local_addr().unwrap().port();
        let Some(last) = first.checked_add(n - 1) else { continue };
        if (first..=last).all(|p| std::net::TcpListener::bind((address, p)).is_ok()) {
            return format!("{first}-{last}");
        }
    }
}

async fn get(address: &str, port: u32) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect((address, port as u16)).await.ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body.rsplit("\r\n\r\n").next()?.trim().to_string())
}

/// The A record of `name` from the DNS server at `server`.
async fn ask_dns(server: std::net::SocketAddr, name: &str) -> Option<std::net::Ipv4Addr> {
    use hickory_resolver::proto::op::{Message, Query};
    use hickory_resolver::proto::rr::{Name, RData, RecordType};
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    let mut query = Message::query();
    query.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    sock.send_to(&query.to_vec().ok()?, server).await.ok()?;
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    let answer = Message::from_vec(&buf[..n]).ok()?;
    answer.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// The response code and A records for `name` from the DNS server at `server`.
async fn dns_answer(server: std::net::SocketAddr, name: &str) -> Option<(ResponseCode, Vec<std::net::Ipv4Addr>)> {
    use hickory_resolver::proto::op::{Message, Query};
    use hickory_resolver::proto::rr::{Name, RData, RecordType};
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    let mut query = Message::query();
    query.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    sock.send_to(&query.to_vec().ok()?, server).await.ok()?;
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    let answer = Message::from_vec(&buf[..n]).ok()?;
    let a = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Some((answer.metadata.response_code, a))
}

/// The host port of `node`'s endpoint among `found`.
fn found_port(found: &[(String, u32, String)], node: &str) -> u32 {
    found.iter().find(|(_, _, n)| n == node).map(|(_, p, _)| *p).expect("an endpoint on the node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_machine_reach_each_others_services() {
    let dir = std::env::temp_dir().join(format!("orch-services-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("server");
    let admin = token(&data, "alice", "system:admins");
    let node_tokens: Vec<String> =
        ["node-1", "node-2"].iter().map(|n| token(&data, &format!("system:node:{n}"), "system:nodes")).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let dns_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dns: std::net::SocketAddr = format!("127.0.0.1:{dns_port}").parse().unwrap();
    let server = orch(
        &[
            "server",
            "--insecure-http",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--cluster-address-range",
            "127.66.0.0/24",
            "--endpoints-per-slice",
            "1",
            "--dns-listen",
            &dns.to_string(),
        ],
        &dir.join("server.log"),
    );
    let mut agents = Vec::new();
    for ((node, address), t) in [("node-1", "127.0.0.2"), ("node-2", "127.0.0.3")].into_iter().zip(&node_tokens) {
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
                "--address",
                address,
                "--port-range",
                &free_range(address, 4),
                "--drain",
                // Each node's proxy serves node ports on its own address only.
                "--node-port-addresses",
                address,
            ],
            &dir.join(format!("{node}.log")),
        ));
    }
    let store: Arc<dyn Store> = Arc::new(RemoteStore::builder(url.clone()).bearer_token(admin).build().unwrap());
    let nodes: Api<Node> = Api::all(store.clone());
    let addresses = eventually("both nodes register", async || {
        let list = nodes.list(&ListParams::default()).await.ok()?;
        let mut a: Vec<String> =
            list.items.iter().filter_map(|n| n.status.addresses.first().map(|a| a.address.clone())).collect();
        a.sort();
        (a.len() == 2).then_some(a)
    })
    .await;
    assert_eq!(addresses, ["127.0.0.2", "127.0.0.3"], "each node reports its --address");

    // A busybox HTTP server per node, on the address and port it is given.
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
    // Each serves `ready` (its readiness probe's path) from a directory the test can reach.
    for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
        let www = dir.join(format!("www-{node}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("ready"), "yes").unwrap();
        let script = format!(
            r#"d={}; echo "$ORCH_ADDRESS" > "$d/index.html"; exec /bin/busybox httpd -f -p "$ORCH_ADDRESS:$PORT_HTTP" -h "$d""#,
            www.display()
        );
        let mut w = Workload::command("main", &["/bin/sh", "-c", &script]);
        w.containers[0].ports = vec![orch::core::kinds::ContainerPort {
            name: Some("http".into()),
            container_port: 80,
            ..Default::default()
        }];
        // Ready while the agent's probe gets `/ready` at the node's address and its host port.
        w.containers[0].readiness_probe = Some(
            serde_json::from_value(serde_json::json!({
                "action": {"http": {"path": "/ready", "port": 80}},
                "periodSeconds": 1,
                "failureThreshold": 1
            }))
            .unwrap(),
        );
        w.node_name = Some(node.into());
        workloads
            .create(&Object::new(
                ObjectMeta::named(format!("web-{i}")).with_label("app", "web").with_label("node", node),
                w,
            ))
            .await
            .unwrap();
    }
    let services: Api<Service> = Api::namespaced(store.clone(), "default");
    let svc = Service::selecting(&[("app", "web")], vec![ServicePort::to_named(80, "http")]);
    services.create(&Object::new(ObjectMeta::named("web"), svc)).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(store.clone(), "default");
    let found = eventually("two ready endpoints, one per slice", async || {
        let list = slices.list(&ListParams::default()).await.ok()?.items;
        let ready: Vec<_> = list.iter().flat_map(|s| &s.spec.endpoints).filter(|e| e.conditions.ready).collect();
        (list.len() == 2 && ready.len() == 2).then(|| {
            ready.iter().map(|e| (e.addresses[0].clone(), e.ports[0].port, e.node_name.clone())).collect::<Vec<_>>()
        })
    })
    .await;
    for (address, port, node) in &found {
        assert_eq!(address, if node == "node-1" { "127.0.0.2" } else { "127.0.0.3" });
        assert_eq!(get(address, *port).await.as_deref(), Some(address.as_str()), "the endpoint answers there");
    }
    let svc = services.get("web").await.unwrap();
    let cluster: std::net::Ipv4Addr = svc.status.cluster_address.as_deref().unwrap().parse().unwrap();
    assert_eq!(cluster.octets()[..3], [127, 66, 0], "from --cluster-address-range");

    // A node reads services and slices (its proxy needs them) and writes neither.
    let node_store: Arc<dyn Store> =
        Arc::new(RemoteStore::builder(url).bearer_token(node_tokens[0].clone()).build().unwrap());
    let as_node: Api<EndpointSlice> = Api::namespaced(node_store.clone(), "default");
    assert_eq!(as_node.list(&ListParams::default()).await.unwrap().items.len(), 2);
    let e = Api::<Service>::namespaced(node_store, "default")
        .create(&Object::new(ObjectMeta::named("sneaky"), Service { headless: true, ..Default::default() }))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    // Each node's proxy reaches the other node's workload: a node-port service per node,
    // asked at the other node's address.
    for (node, other) in [("node-1", "127.0.0.3"), ("node-2", "127.0.0.2")] {
        let svc = Service {
            selector: [("app".to_string(), "web".to_string()), ("node".to_string(), node.to_string())].into(),
            ports: vec![ServicePort {
                port: 80,
                target_port: Some(PortTarget::Name("http".into())),
                ..Default::default()
            }],
            type_: orch::core::kinds::ServiceType::NodePort,
            ..Default::default()
        };
        services.create(&Object::new(ObjectMeta::named(format!("on-{node}")), svc)).await.unwrap();
        let node_port = eventually("a node port", async || {
            services.get(&format!("on-{node}")).await.ok()?.status.node_ports.get("").copied()
        })
        .await;
        let serving = if node == "node-1" { "127.0.0.2" } else { "127.0.0.3" };
        let got = eventually(&format!("{other}:{node_port} reaches {node}"), async || {
            get(other, node_port).await.filter(|page| page == serving)
        })
        .await;
        assert_eq!(got, serving);
    }

    // By name: the server's DNS gives the cluster address, and a proxy carries connections to
    // it to both nodes' workloads.
    let name = "web.default.svc.cluster.local.";
    let resolved = eventually("DNS answers the service's name", async || ask_dns(dns, name).await).await;
    assert_eq!(resolved, cluster, "the name resolves to the cluster address");
    let mut answered = std::collections::BTreeSet::new();
    eventually("both nodes answer at the cluster address", async || {
        answered.insert(get(&cluster.to_string(), 80).await?);
        (answered.len() == 2).then_some(())
    })
    .await;
    assert_eq!(answered.into_iter().collect::<Vec<_>>(), ["127.0.0.2", "127.0.0.3"]);

    // Each workload has a name under a headless service.
    let peers = Service {
        selector: [("app".to_string(), "web".to_string())].into(),
        ports: vec![ServicePort { port: 80, target_port: Some(PortTarget::Name("http".into())), ..Default::default() }],
        headless: true,
        ..Default::default()
    };
    services.create(&Object::new(ObjectMeta::named("peers"), peers)).await.unwrap();
    for (name, address) in [("web-0", "127.0.0.2"), ("web-1", "127.0.0.3")] {
        let named = eventually(&format!("{name}'s name"), async || {
            let (code, a) = dns_answer(dns, &format!("{name}.peers.default.svc.cluster.local.")).await?;
            (code == ResponseCode::NoError && !a.is_empty()).then_some(a)
        })
        .await;
        assert_eq!(named, [address.parse::<std::net::Ipv4Addr>().unwrap()]);
    }

    // web-0's readiness probe starts failing (its program runs on): its endpoint turns unready and
    // the proxy sends it no new connection.
    std::fs::remove_file(dir.join("www-node-1").join("ready")).unwrap();
    eventually("web-0 unready in its slice", async || {
        let list = slices.list(&ListParams::default()).await.ok()?.items;
        let mut web = list.iter().filter(|s| s.spec.service == "web").flat_map(|s| &s.spec.endpoints);
        web.any(|e| e.workload == "web-0" && !e.conditions.ready).then_some(())
    })
    .await;
    eventually("the proxy leaves web-0 out", async || {
        for _ in 0..20 {
            if get(&cluster.to_string(), 80).await.as_deref() != Some("127.0.0.3") {
                return None;
            }
        }
        Some(())
    })
    .await;
    for _ in 0..40 {
        assert_eq!(get(&cluster.to_string(), 80).await.as_deref(), Some("127.0.0.3"), "no new connection to web-0");
    }
    assert_eq!(get("127.0.0.2", found_port(&found, "node-1")).await.as_deref(), Some("127.0.0.2"), "web-0 still runs");

    // web-1 is deleted: its name goes.
    workloads.delete("web-1", &orch::core::DeleteOptions::default()).await.unwrap();
    eventually("web-1's name gone", async || {
        let (code, _) = dns_answer(dns, "web-1.peers.default.svc.cluster.local.").await?;
        (code == ResponseCode::NXDomain).then_some(())
    })
    .await;
    // Stop the processes before their directories go, so none is left unable to stop.
    drop(agents);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
