//! The service traffic of the `orch` binary: `orch server --dns-listen` answers for services,
//! and `orch agent` (node proxy on by default) carries connections to a service's cluster
//! address to its ready endpoint. The services and slices are written through the API as the
//! endpoints controller would write them.

#![cfg(feature = "cli")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use orch::core::kinds::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, SERVICE_NAME_LABEL, Service, ServicePort,
};
use orch::core::{Api, Object, ObjectMeta, Store};
use orch::store::api::RemoteStore;

use common::{free_port, orch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn ask_dns(server: SocketAddr, name: &str) -> Option<Message> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    let mut q = Message::query();
    q.metadata.id = 42;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    sock.send_to(&q.to_vec().unwrap(), server).await.ok()?;
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    Message::from_vec(&buf[..n]).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_dns_and_the_agent_proxies_a_service() {
    let dir = std::env::temp_dir().join(format!("orch-services-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (api_port, dns_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{api_port}");
    let dns: SocketAddr = format!("127.0.0.1:{dns_port}").parse().unwrap();
    let server = orch(
        &[
            "server",
            "--insecure-http",
            "--listen",
            &format!("127.0.0.1:{api_port}"),
            "--data-dir",
            dir.join("server").to_str().unwrap(),
            "--dns-listen",
            &dns.to_string(),
        ],
        &dir.join("server.log"),
    );
    let agent = orch(
        &["agent", "--server", &url, "--name", "node-1", "--data-dir", dir.join("node-1").to_str().unwrap()],
        &dir.join("node-1.log"),
    );

    // A real server for the endpoint: answers each connection with a greeting.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            let _ = s.write_all(b"hello from the endpoint").await;
        }
    });

    let store: Arc<dyn Store> = Arc::new(RemoteStore::builder(url.clone()).build().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.current_revision().await.is_err() {
        assert!(Instant::now() < deadline, "the server starts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let services: Api<Service> = Api::namespaced(store.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(store.clone(), "default");
    let spec = Service { ports: vec![ServicePort::tcp(8080)], ..Default::default() };
    services.create(&Object::new(ObjectMeta::namespaced("default", "hello"), spec)).await.unwrap();
    // The server's endpoints controller gives the service its cluster address; the service has
    // no selector, so its slices are the application's (this test's) to write.
    let address = loop {
        if let Some(a) = services.get("hello").await.unwrap().status.cluster_address {
            break a;
        }
        assert!(Instant::now() < deadline, "the endpoints controller allocates a cluster address");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let endpoint = Endpoint {
        addresses: vec!["127.0.0.1".into()],
        ports: vec![EndpointPort { port: u32::from(backend_port), ..Default::default() }],
        conditions: EndpointConditions { ready: true, serving: true, terminating: false },
        ..Default::default()
    };
    let meta = ObjectMeta::namespaced("default", "hello-1").with_label(SERVICE_NAME_LABEL, "hello");
    slices
        .create(&Object::new(meta, EndpointSlice { service: "hello".into(), endpoints: vec![endpoint] }))
        .await
        .unwrap();

    // The server's DNS answers the name with the cluster address.
    loop {
        if let Some(m) = ask_dns(dns, "hello.default.svc.cluster.local.").await
            && m.metadata.response_code == ResponseCode::NoError
            && m.answers.iter().any(|r| matches!(&r.data, RData::A(a) if a.0.to_string() == address))
        {
            break;
        }
        assert!(Instant::now() < deadline, "DNS answers hello.default.svc.cluster.local");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = ask_dns(dns, "nope.default.svc.cluster.local.").await.expect("an answer");
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // The agent's proxy carries a connection to the cluster address to the endpoint.
    loop {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(format!("{address}:8080")))
                .await
        {
            let mut got = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut got)).await;
            if got == "hello from the endpoint" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the agent's proxy serves {address}:8080");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopped before their directories go.
    drop(agent);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
