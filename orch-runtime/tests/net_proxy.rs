//! The node proxy carrying real TCP and UDP traffic on loopback to real servers the test starts:
//! spreading over endpoints, skipping unready and refusing endpoints, draining with a grace
//! period, following services, reporting ports it cannot bind.

mod net_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use orch_core::kinds::{EndpointConditions, Protocol, ServicePort, ServiceType};
use orch_runtime::net::{Frontend, LocalRoute, NodeProxy, ProxyConfig, ProxyStatus};
use tokio::sync::watch;
use tokio::time::timeout;

use net_support::*;

struct Proxy {
    status: ProxyStatus,
    _stop: watch::Sender<bool>,
}

fn start(c: &Cluster, config: ProxyConfig) -> Proxy {
    let proxy = NodeProxy::new(config, c.resolver.clone());
    let status = proxy.status();
    let (stop, mut rx) = watch::channel(false);
    tokio::spawn(proxy.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    Proxy { status, _stop: stop }
}

fn config() -> ProxyConfig {
    ProxyConfig { node_addresses: vec!["127.0.0.1".parse().unwrap()], ..Default::default() }
}

fn tcp(addr: &str) -> Frontend {
    Frontend { addr: addr.parse().unwrap(), protocol: Protocol::TCP }
}

/// Waits until the proxy sends new connections at `f` to exactly `expect`.
async fn serving(status: &ProxyStatus, f: Frontend, expect: &[SocketAddr]) {
    let mut status = status.clone();
    let mut expect = expect.to_vec();
    expect.sort();
    timeout(LIMIT, async {
        loop {
            let mut now = status.endpoints(f).unwrap_or_default();
            now.sort();
            if status.endpoints(f).is_some() && now == expect {
                return;
            }
            status.changed().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("proxy never served {f:?} with {expect:?}: {:?}", status.endpoints(f)));
}

async fn not_listening(status: &ProxyStatus, f: Frontend) {
    let mut status = status.clone();
    timeout(LIMIT, async {
        while status.endpoints(f).is_some() {
            status.changed().await;
        }
    })
    .await
    .expect("listener closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_ready_endpoints_and_skip_one_that_turns_unready() {
    let c = Cluster::new().await;
    let servers = [EchoServer::start("a").await, EchoServer::start("b").await, EchoServer::start("c").await];
    let proxy = start(&c, config());
    c.service("web", service_spec(&[("http", 8080)]), Some("127.64.1.1")).await;
    let eps = |ready_b: bool| {
        servers.iter().map(|s| endpoint("127.0.0.1", &[("http", s.addr.port())], s.id != "b" || ready_b)).collect()
    };
    // One address, three ports: each server is its own endpoint.
    let mut all: Vec<_> = eps(true);
    for (e, s) in all.iter_mut().zip(&servers) {
        e.workload = s.id.clone();
    }
    c.slice("web", "web-1", all.clone()).await;
    let front = tcp("127.64.1.1:8080");
    serving(&proxy.status, front, &servers.iter().map(|s| s.addr).collect::<Vec<_>>()).await;

    // Held open, so power of two choices sees the load and spreads it.
    let mut held = Vec::new();
    let mut per: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let client = EchoClient::connect(front.addr).await.expect("proxied");
        *per.entry(client.server.clone()).or_default() += 1;
        held.push(client);
    }
    for s in &servers {
        assert!(per.get(&s.id).copied().unwrap_or(0) >= 5, "uneven spread over endpoints: {per:?}");
    }

    // b turns unready: from the moment the proxy has the change, b gets no new connection.
    let mut some_unready = all.clone();
    some_unready[1].conditions = EndpointConditions { ready: false, serving: false, terminating: false };
    c.slice("web", "web-1", some_unready).await;
    serving(&proxy.status, front, &[servers[0].addr, servers[2].addr]).await;
    let b_before = servers[1].accepted();
    for _ in 0..30 {
        let client = EchoClient::connect(front.addr).await.expect("proxied");
        assert_ne!(client.server, "b", "an unready endpoint got a new connection");
    }
    assert_eq!(servers[1].accepted(), b_before);
    // Connections b already had go on.
    for client in held.iter_mut().filter(|c| c.server == "b") {
        assert_eq!(client.ask("still").await.as_deref(), Some("b:still"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_another_endpoint() {
    let c = Cluster::new().await;
    let live = EchoServer::start("live").await;
    // A port nobody listens on: every connect there is refused.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = start(&c, config());
    c.service("flaky", service_spec(&[("", 8080)]), Some("127.64.2.1")).await;
    let mut dead = endpoint("127.0.0.1", &[("", dead_port)], true);
    dead.workload = "dead".into();
    c.slice("flaky", "flaky-1", vec![dead, endpoint("127.0.0.1", &[("", live.addr.port())], true)]).await;
    let front = tcp("127.64.2.1:8080");
    serving(&proxy.status, front, &[SocketAddr::from(([127, 0, 0, 1], dead_port)), live.addr]).await;
    for i in 0..20 {
        let client = EchoClient::connect(front.addr).await.unwrap_or_else(|| panic!("connection {i} was dropped"));
        assert_eq!(client.server, "live");
    }
    assert_eq!(live.accepted(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_finish_within_the_grace_period_after_their_endpoint_leaves() {
    let c = Cluster::new().await;
    let old = EchoServer::start("old").await;
    let new = EchoServer::start("new").await;
    let proxy = start(&c, ProxyConfig { grace: Duration::from_millis(500), ..config() });
    c.service("drain", service_spec(&[("", 8080)]), Some("127.64.3.1")).await;
    c.slice("drain", "drain-1", vec![endpoint("127.0.0.1", &[("", old.addr.port())], true)]).await;
    let front = tcp("127.64.3.1:8080");
    serving(&proxy.status, front, &[old.addr]).await;
    let mut open = EchoClient::connect(front.addr).await.unwrap();
    assert_eq!(open.server, "old");

    // old terminates, new takes over.
    let terminating = EndpointConditions { ready: false, serving: true, terminating: true };
    let mut leaving = endpoint("127.0.0.1", &[("", old.addr.port())], false);
    leaving.conditions = terminating;
    c.slice("drain", "drain-1", vec![leaving, endpoint("127.0.0.1", &[("", new.addr.port())], true)]).await;
    serving(&proxy.status, front, &[new.addr]).await;
    // The open connection still works inside the grace period…
    assert_eq!(open.ask("one more").await.as_deref(), Some("old:one more"));
    // …new connections go to the new endpoint…
    assert_eq!(EchoClient::connect(front.addr).await.unwrap().server, "new");
    // …and when the grace period is over the proxy closes the old one.
    open.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_endpoint_closes_the_connection_and_listeners_follow_the_service() {
    let c = Cluster::new().await;
    let proxy = start(&c, config());
    c.service("empty", service_spec(&[("", 8080)]), Some("127.64.4.1")).await;
    c.slice("empty", "empty-1", vec![endpoint("127.0.0.1", &[("", 1)], false)]).await;
    let front = tcp("127.64.4.1:8080");
    serving(&proxy.status, front, &[]).await;
    assert!(EchoClient::connect(front.addr).await.is_none(), "closed without a greeting");

    c.delete_service("empty").await;
    not_listening(&proxy.status, front).await;
    let refused = tokio::net::TcpStream::connect(front.addr).await;
    assert!(refused.is_err(), "nothing listens once the service is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_listen_on_the_node_addresses() {
    let c = Cluster::new().await;
    let server = EchoServer::start("np").await;
    let node_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = start(&c, config());
    let spec = orch_core::kinds::Service {
        ports: vec![ServicePort { port: 8080, node_port: Some(u32::from(node_port)), ..Default::default() }],
        type_: ServiceType::NodePort,
        ..Default::default()
    };
    c.service("np", spec, Some("127.64.5.1")).await;
    c.slice("np", "np-1", vec![endpoint("127.0.0.1", &[("", server.addr.port())], true)]).await;
    let at_node = Frontend { addr: SocketAddr::from(([127, 0, 0, 1], node_port)), protocol: Protocol::TCP };
    serving(&proxy.status, at_node, &[server.addr]).await;
    assert_eq!(EchoClient::connect(at_node.addr).await.unwrap().server, "np");
    assert_eq!(EchoClient::connect("127.64.5.1:8080".parse().unwrap()).await.unwrap().server, "np");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_cannot_be_bound_is_reported_and_the_rest_is_served() {
    let c = Cluster::new().await;
    let server = EchoServer::start("ok").await;
    // Another program holds the first service's address and port.
    let squatter = std::net::TcpListener::bind("127.64.6.1:8080").unwrap();
    let proxy = start(&c, config());
    c.service("taken", service_spec(&[("", 8080)]), Some("127.64.6.1")).await;
    c.service("fine", service_spec(&[("", 8080)]), Some("127.64.6.2")).await;
    c.slice("fine", "fine-1", vec![endpoint("127.0.0.1", &[("", server.addr.port())], true)]).await;
    serving(&proxy.status, tcp("127.64.6.2:8080"), &[server.addr]).await;
    let mut status = proxy.status.clone();
    let failure = timeout(LIMIT, async {
        loop {
            if let Some(f) = status.failed().into_iter().find(|f| f.service.name == "taken") {
                return f;
            }
            status.changed().await;
        }
    })
    .await
    .expect("the failure is reported");
    assert_eq!(failure.frontend, tcp("127.64.6.1:8080"));
    assert!(failure.reason.to_lowercase().contains("in use"), "{}", failure.reason);
    assert_eq!(EchoClient::connect("127.64.6.2:8080".parse().unwrap()).await.unwrap().server, "ok");
    drop(squatter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_reach_the_endpoints_and_come_back() {
    let c = Cluster::new().await;
    let mut servers = Vec::new();
    for id in ["u1", "u2"] {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let reply = format!("{id}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = sock.send_to(reply.as_bytes(), from).await;
            }
        });
        servers.push((addr, task));
    }
    let proxy = start(&c, config());
    let spec = orch_core::kinds::Service {
        ports: vec![ServicePort { name: "dns".into(), port: 8053, protocol: Protocol::UDP, ..Default::default() }],
        ..Default::default()
    };
    c.service("udp", spec, Some("127.64.7.1")).await;
    let eps = servers
        .iter()
        .map(|(a, _)| {
            let mut e = endpoint_with(
                "127.0.0.1",
                &[("dns", a.port())],
                Protocol::UDP,
                EndpointConditions { ready: true, serving: true, terminating: false },
            );
            e.workload = a.port().to_string();
            e
        })
        .collect();
    c.slice("udp", "udp-1", eps).await;
    let front = Frontend { addr: "127.64.7.1:8053".parse().unwrap(), protocol: Protocol::UDP };
    serving(&proxy.status, front, &servers.iter().map(|(a, _)| *a).collect::<Vec<_>>()).await;

    let mut seen = HashMap::<String, usize>::new();
    for i in 0..16 {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(front.addr).await.unwrap();
        let mut buf = [0u8; 1500];
        for j in 0..2 {
            client.send(format!("q{i}-{j}").as_bytes()).await.unwrap();
            let n = timeout(LIMIT, client.recv(&mut buf)).await.expect("a reply").unwrap();
            let reply = String::from_utf8_lossy(&buf[..n]).to_string();
            let (server, body) = reply.split_once(':').unwrap();
            assert_eq!(body, format!("q{i}-{j}"));
            *seen.entry(server.to_string()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 2, "both UDP endpoints got sessions: {seen:?}");
    for (_, t) in servers {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_endpoint_that_refuses_is_skipped_after_its_first_refusal() {
    let c = Cluster::new().await;
    let live = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = live.recv_from(&mut buf).await {
            let _ = live.send_to(&buf[..n], from).await;
        }
    });
    // A port nobody listens on: the kernel answers datagrams with "port unreachable".
    let dead_port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let proxy = start(&c, config());
    let spec = orch_core::kinds::Service {
        ports: vec![ServicePort { port: 8054, protocol: Protocol::UDP, ..Default::default() }],
        ..Default::default()
    };
    c.service("udpdead", spec, Some("127.64.8.1")).await;
    let ready = EndpointConditions { ready: true, serving: true, terminating: false };
    let mut dead = endpoint_with("127.0.0.1", &[("", dead_port)], Protocol::UDP, ready);
    dead.workload = "dead".into();
    let mut up = endpoint_with("127.0.0.1", &[("", live_addr.port())], Protocol::UDP, ready);
    up.workload = "live".into();
    c.slice("udpdead", "udpdead-1", vec![dead, up]).await;
    let front = Frontend { addr: "127.64.8.1:8054".parse().unwrap(), protocol: Protocol::UDP };
    serving(&proxy.status, front, &[SocketAddr::from(([127, 0, 0, 1], dead_port)), live_addr]).await;

    // Clients one after the other, each sending again when no answer comes (as DNS clients do).
    // Only a client whose session went to the dead endpoint before its first refusal needs a
    // second datagram: after that refusal the proxy sends new sessions elsewhere.
    let mut datagrams = 0;
    for i in 0..8 {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(front.addr).await.unwrap();
        let mut buf = [0u8; 64];
        let mut answered = false;
        for _ in 0..5 {
            datagrams += 1;
            client.send(format!("c{i}").as_bytes()).await.unwrap();
            if let Ok(Ok(n)) = timeout(Duration::from_millis(300), client.recv(&mut buf)).await {
                assert_eq!(&buf[..n], format!("c{i}").as_bytes());
                answered = true;
                break;
            }
        }
        assert!(answered, "client {i} got no answer");
    }
    assert!(datagrams <= 9, "the refusing endpoint kept getting sessions: {datagrams} datagrams for 8 answers");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_proxy_waits_for_open_connections_up_to_the_grace_period() {
    let c = Cluster::new().await;
    let server = EchoServer::start("s").await;
    c.service("stop", service_spec(&[("", 8080)]), Some("127.64.9.1")).await;
    c.slice("stop", "stop-1", vec![endpoint("127.0.0.1", &[("", server.addr.port())], true)]).await;
    let front = tcp("127.64.9.1:8080");
    let run = |grace: Duration| {
        let proxy = NodeProxy::new(ProxyConfig { grace, ..config() }, c.resolver.clone());
        let status = proxy.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        (status, stop, task)
    };

    // A long grace period: the proxy returns as soon as the last connection is closed.
    let (status, stop, mut task) = run(Duration::from_secs(60));
    serving(&status, front, &[server.addr]).await;
    let mut open = EchoClient::connect(front.addr).await.unwrap();
    stop.send(()).unwrap();
    not_listening(&status, front).await;
    assert_eq!(open.ask("still there").await.as_deref(), Some("s:still there"), "the open connection goes on");
    assert!(timeout(Duration::from_millis(300), &mut task).await.is_err(), "run waits for the open connection");
    drop(open);
    timeout(LIMIT, task).await.expect("run returns once the connection is closed").unwrap();

    // A short one: a connection that stays open is closed when it is over, and run returns.
    let (status, stop, task) = run(Duration::from_millis(500));
    serving(&status, front, &[server.addr]).await;
    let mut open = EchoClient::connect(front.addr).await.unwrap();
    stop.send(()).unwrap();
    timeout(LIMIT, task).await.expect("run returns after the grace period").unwrap();
    open.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_address_outside_loopback_is_made_local_while_it_is_served_and_no_longer() {
    if !may_route("a_cluster_address_outside_loopback_is_made_local_while_it_is_served_and_no_longer") {
        return;
    }
    // An address of this process's own, outside 127/8: the machine does not have it.
    let ip = format!("10.98.{}.1", std::process::id() % 250);
    let bindable = |port: u16| std::net::TcpListener::bind((ip.as_str(), port)).map(drop);
    assert_eq!(bindable(0).unwrap_err().kind(), std::io::ErrorKind::AddrNotAvailable);

    let c = Cluster::new().await;
    let server = EchoServer::start("a").await;
    let grace = Duration::from_millis(1500);
    let proxy = start(&c, ProxyConfig { grace, rebind_interval: Duration::from_millis(100), ..config() });
    c.service("wide", service_spec(&[("http", 8080), ("admin", 8081)]), Some(&ip)).await;
    c.slice("wide", "wide-1", vec![endpoint("127.0.0.1", &[("http", server.addr.port())], true)]).await;
    let front = tcp(&format!("{ip}:8080"));
    serving(&proxy.status, front, &[server.addr]).await;
    assert_eq!(proxy.status.routed(), [ip.parse::<std::net::IpAddr>().unwrap()], "one route for both ports");
    let mut client = EchoClient::connect(front.addr).await.expect("proxied through the routed address");
    assert_eq!(client.ask("hi").await.as_deref(), Some("a:hi"));

    // One port goes: the other still holds the route.
    let mut wide = c.services.get("wide").await.unwrap();
    wide.spec.ports.retain(|p| p.name == "http");
    c.services.replace(&wide).await.unwrap();
    not_listening(&proxy.status, tcp(&format!("{ip}:8081"))).await;
    assert_eq!(proxy.status.routed().len(), 1);
    assert!(EchoClient::connect(front.addr).await.is_some(), "the remaining port is served");

    // The service goes: its listeners at once; the route after the grace period, so the
    // connection still open to the address goes on meanwhile.
    c.delete_service("wide").await;
    let gone = std::time::Instant::now();
    not_listening(&proxy.status, front).await;
    assert_eq!(client.ask("still").await.as_deref(), Some("a:still"), "an open connection finishes its work");
    assert_eq!(proxy.status.routed().len(), 1, "kept for the grace period");
    timeout(LIMIT, async {
        while !proxy.status.routed().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the route goes after the grace period");
    assert!(gone.elapsed() >= grace, "not before the grace period: {:?}", gone.elapsed());
    assert_eq!(bindable(0).unwrap_err().kind(), std::io::ErrorKind::AddrNotAvailable, "the route was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_a_killed_proxy_left_is_taken_over_and_removed() {
    if !may_route("a_route_a_killed_proxy_left_is_taken_over_and_removed") {
        return;
    }
    let ip = format!("10.98.{}.3", std::process::id() % 250);
    // What a proxy killed while serving the address leaves behind.
    std::mem::forget(LocalRoute::add(ip.parse().unwrap()).unwrap());
    let bindable = |port: u16| std::net::TcpListener::bind((ip.as_str(), port)).map(drop);
    assert!(bindable(0).is_ok(), "the leftover route makes the address local");

    let c = Cluster::new().await;
    let proxy =
        start(&c, ProxyConfig { grace: Duration::ZERO, rebind_interval: Duration::from_millis(50), ..config() });
    c.service("left", service_spec(&[("", 8080)]), Some(&ip)).await;
    let front = tcp(&format!("{ip}:8080"));
    serving(&proxy.status, front, &[]).await;
    assert_eq!(proxy.status.routed().len(), 1, "the proxy holds the leftover route");
    c.delete_service("left").await;
    timeout(LIMIT, async {
        while bindable(0).is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the leftover route is removed with the service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_local_routes_an_address_the_machine_lacks_is_reported_not_served() {
    let c = Cluster::new().await;
    let proxy = start(&c, ProxyConfig { local_routes: false, ..config() });
    let ip = format!("10.98.{}.2", std::process::id() % 250);
    c.service("far", service_spec(&[("", 8080)]), Some(&ip)).await;
    let failed = timeout(LIMIT, async {
        let mut status = proxy.status.clone();
        loop {
            if let Some(f) = status.failed().into_iter().next() {
                return f;
            }
            status.changed().await;
        }
    })
    .await
    .expect("the port is reported");
    assert_eq!(failed.frontend, tcp(&format!("{ip}:8080")));
    assert!(failed.reason.contains("assign"), "{}", failed.reason);
    assert!(proxy.status.routed().is_empty());
}
