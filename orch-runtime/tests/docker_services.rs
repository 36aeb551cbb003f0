//! Services from inside containers on the Docker Engine's default bridge network: a container
//! finds a service by its short name (the search domains of its namespace) through the cluster
//! DNS server and reaches it at its cluster address through the node proxy. Both listen on addresses outside `127.0.0.0/8` that
//! they make local on this machine (the container's gateway), as `orch agent --runtime docker`
//! does with `--dns-listen` and a server's `--cluster-address-range` such as `10.96.0.0/16`.
//!
//! Needs the engine (skipped with a note without one, unless `ORCH_REQUIRE_DOCKER=1`) and
//! `CAP_NET_ADMIN` for the routes (likewise, unless `ORCH_REQUIRE_NET_ADMIN=1`).

#![cfg(all(feature = "docker", feature = "dns"))]

mod docker_support;
mod net_support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use docker_support::{Scope, skip};
use net_support::{Cluster, EchoServer, LIMIT, endpoint, may_route, service_spec};
use orch_core::Runtime;
use orch_core::kinds::Container;
use orch_core::runtime::InstanceSpec;
use orch_runtime::net::dns::{DnsConfig, DnsServer};
use orch_runtime::net::{NodeProxy, ProxyConfig};
use orch_runtime::{ContainerDns, DockerRuntime};
use tokio::sync::watch;

/// This process's own addresses outside 127/8: the service's and the DNS server's.
fn addresses() -> (IpAddr, IpAddr) {
    let n = std::process::id() % 250;
    (format!("10.99.{n}.1").parse().unwrap(), format!("10.99.{n}.53").parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_on_the_bridge_finds_a_service_by_name_and_reaches_it_through_the_proxy() {
    let test = "a_container_on_the_bridge_finds_a_service_by_name_and_reaches_it_through_the_proxy";
    if skip(test) || !may_route(test) {
        return;
    }
    let (service_ip, dns_ip) = addresses();
    let c = Cluster::new().await;
    let server = EchoServer::start("web-0").await;
    c.service("web", service_spec(&[("http", 8080)]), Some(&service_ip.to_string())).await;
    c.slice("web", "web-1", vec![endpoint("127.0.0.1", &[("http", server.addr.port())], true)]).await;

    let (stop, rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let proxy = NodeProxy::new(ProxyConfig::default(), c.resolver.clone());
    let status = proxy.status();
    let proxy_task = tokio::spawn(proxy.run(stopped(rx.clone())));
    let dns = DnsServer::bind(DnsConfig::new(SocketAddr::new(dns_ip, 53)), c.resolver.clone())
        .await
        .expect("the DNS server makes its address local and listens there");
    let dns_task = tokio::spawn(dns.run(stopped(rx)));
    let front = orch_runtime::net::Frontend {
        addr: SocketAddr::new(service_ip, 8080),
        protocol: orch_core::kinds::Protocol::TCP,
    };
    tokio::time::timeout(LIMIT, async {
        let mut status = status.clone();
        while status.endpoints(front).is_none_or(|e| e.is_empty()) {
            status.changed().await;
        }
    })
    .await
    .expect("the proxy serves the cluster address");

    // A container of the workload's namespace, on the default bridge, told of the cluster DNS.
    let scope = Scope::new("bridge-services");
    let mut config = scope.config();
    config.dns = Some(ContainerDns { servers: vec![dns_ip], cluster_domain: "cluster.local".into() });
    let rt = DockerRuntime::connect(config).await.unwrap();
    let spec = InstanceSpec {
        id: "client".into(),
        container: Container {
            name: "main".into(),
            image: Some(scope.image.clone()),
            command: vec!["/bin/sh".into(), "-c".into(), "sleep 300".into()],
            ..Default::default()
        },
        volumes: Vec::new(),
        labels: [("orch.dev/namespace", "default"), ("orch.dev/workload", "client")].into(),
    };
    let h = rt.start(&spec).await.unwrap();
    let run = |script: String| {
        let (rt, h) = (&rt, &h);
        async move {
            let cmd = vec!["/bin/sh".to_string(), "-c".to_string(), script];
            let out = rt.exec_output(h, &cmd, Duration::from_secs(20)).await.unwrap();
            (out.exit_code, String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let (_, resolv) = run("cat /etc/resolv.conf".into()).await;
    assert!(resolv.contains(&format!("nameserver {dns_ip}")), "{resolv}");
    assert!(resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"), "{resolv}");

    // By its short name, through the search domains, as from a pod of the namespace.
    // (busybox asks A and AAAA under each search domain and exits 1 when any comes back empty:
    // what counts is the answer it found.)
    let (_, answer) = run("nslookup web".into()).await;
    assert!(
        answer.contains("Name:\tweb.default.svc.cluster.local") && answer.contains(&format!("Address: {service_ip}")),
        "the short name through the namespace's search domain: {answer}"
    );
    let (code, answer) = run("nslookup -type=a web.default.svc.cluster.local".into()).await;
    assert_eq!(code, 0, "{answer}");
    assert!(answer.contains(&format!("Address: {service_ip}")), "the cluster address: {answer}");
    let (code, answer) = run("nslookup nothing-here.default.svc.cluster.local".into()).await;
    assert_ne!(code, 0, "an unknown service is not found: {answer}");

    // To the cluster address from the bridge: the proxy on this machine carries it to the
    // endpoint on this machine's loopback.
    let (code, answer) = run(format!("printf 'hi\\n' | nc -w 5 {service_ip} 8080")).await;
    assert_eq!((code, answer.as_str()), (0, "web-0\nweb-0:hi\n"), "through the proxy");
    assert!(server.accepted() >= 1);

    rt.stop(&h, Duration::from_secs(5)).await.unwrap();
    rt.remove(&h).await.unwrap();
    stop.send_replace(true);
    proxy_task.await.unwrap();
    dns_task.await.unwrap().unwrap();
    // Both addresses are no longer this machine's.
    for ip in [service_ip, dns_ip] {
        let err = std::net::UdpSocket::bind((ip, 0)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrNotAvailable, "{ip} still local");
    }
}
