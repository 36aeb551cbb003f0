//! The in-process resolver over a real memory store: lookups by name, watches, and changes that
//! touch only their own service.

mod net_support;

use std::net::SocketAddr;

use orch_core::kinds::EndpointConditions;
use orch_runtime::net::ResolvedService;
use tokio::time::timeout;

use net_support::*;

fn addrs(s: &ResolvedService, port: &str) -> Vec<SocketAddr> {
    let mut v = s.addresses(port);
    v.sort();
    v
}

#[tokio::test]
async fn resolve_gives_the_cluster_address_ports_and_ready_endpoints_of_every_slice() {
    let c = Cluster::new().await;
    let mut watch = c.resolver.watch("web.default");
    c.service("web", service_spec(&[("http", 80), ("admin", 81)]), Some("127.64.0.9")).await;
    c.slice("web", "web-a", vec![endpoint("127.0.0.1", &[("http", 8080), ("admin", 8081)], true)]).await;
    let terminating = EndpointConditions { ready: false, serving: true, terminating: true };
    c.slice(
        "web",
        "web-b",
        vec![
            endpoint("127.0.0.2", &[("http", 9080), ("admin", 9081)], true),
            endpoint("127.0.0.3", &[("http", 7080)], false),
            endpoint_with("127.0.0.4", &[("http", 6080)], Default::default(), terminating),
        ],
    )
    .await;
    let web = timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.endpoints.len() == 4)))
        .await
        .expect("the watch sees both slices")
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(web.cluster_address, Some("127.64.0.9".parse().unwrap()));
    assert_eq!(web.ports.iter().map(|p| (p.name.as_str(), p.port)).collect::<Vec<_>>(), [("http", 80), ("admin", 81)]);
    assert_eq!(addrs(&web, "http"), ["127.0.0.1:8080".parse().unwrap(), "127.0.0.2:9080".parse().unwrap()]);
    assert_eq!(addrs(&web, "admin"), ["127.0.0.1:8081".parse().unwrap(), "127.0.0.2:9081".parse().unwrap()]);
    // Every spelling of the name finds the same service.
    for name in ["web.default", "web", "web.default.svc.cluster.local."] {
        assert_eq!(c.resolver.resolve(name).as_deref(), Some(&*web), "{name}");
    }
    assert!(c.resolver.resolve("web.other").is_none());
}

#[tokio::test]
async fn a_watch_follows_endpoints_turning_unready_and_the_service_going_away() {
    let c = Cluster::new().await;
    c.service("api", service_spec(&[("", 80)]), Some("127.64.0.10")).await;
    c.slice(
        "api",
        "api-1",
        vec![endpoint("127.0.0.1", &[("", 8000)], true), endpoint("127.0.0.2", &[("", 8000)], true)],
    )
    .await;
    let mut watch = c.resolver.watch("api");
    timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.addresses("").len() == 2))).await.unwrap().unwrap();

    c.slice(
        "api",
        "api-1",
        vec![endpoint("127.0.0.1", &[("", 8000)], true), endpoint("127.0.0.2", &[("", 8000)], false)],
    )
    .await;
    let now = timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.addresses("").len() == 1)))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(now.addresses(""), ["127.0.0.1:8000".parse::<SocketAddr>().unwrap()]);

    c.delete_slice("api-1").await;
    timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.endpoints.is_empty()))).await.unwrap().unwrap();
    c.delete_service("api").await;
    timeout(LIMIT, watch.wait_for(|s| s.is_none())).await.expect("the watch hears the service is gone").unwrap();
    assert!(c.resolver.resolve("api").is_none());
}

#[tokio::test]
async fn a_slice_change_publishes_its_own_service_only() {
    let c = Cluster::new().await;
    for i in 0..20 {
        let name = format!("s{i}");
        c.service(&name, service_spec(&[("", 80)]), Some(&format!("127.64.1.{i}"))).await;
        c.slice(&name, &format!("{name}-a"), vec![endpoint("127.0.0.1", &[("", 9000 + i)], true)]).await;
    }
    let mut watch = c.resolver.watch("s19");
    timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| !s.endpoints.is_empty()))).await.unwrap().unwrap();

    let (all, mut changes) = c.resolver.subscribe();
    assert_eq!(all.len(), 20);
    let before = c.resolver.changes();
    c.slice("s7", "s7-a", vec![endpoint("127.0.0.2", &[("", 9007)], true)]).await;
    let change = timeout(LIMIT, changes.recv()).await.unwrap().unwrap();
    assert_eq!(change.service.name, "s7");
    assert_eq!(change.current.unwrap().addresses(""), ["127.0.0.2:9007".parse::<SocketAddr>().unwrap()]);
    assert_eq!(c.resolver.changes(), before + 1, "one slice change, one service published");

    // A status write that changes nothing a client sees (counts) publishes nothing.
    let mut s3 = c.services.get("s3").await.unwrap();
    s3.status.ready_endpoints = 1;
    s3.status.endpoints = 1;
    c.services.replace_status(&s3).await.unwrap();
    c.slice("s8", "s8-a", vec![endpoint("127.0.0.3", &[("", 9008)], true)]).await;
    let next = timeout(LIMIT, changes.recv()).await.unwrap().unwrap();
    assert_eq!(next.service.name, "s8", "the count-only status write of s3 was not published");
}

#[tokio::test]
async fn slices_that_arrive_before_their_service_are_merged_when_it_comes() {
    let c = Cluster::new().await;
    c.slice("late", "late-a", vec![endpoint("127.0.0.5", &[("", 5000)], true)]).await;
    let mut watch = c.resolver.watch("late");
    c.service("late", service_spec(&[("", 80)]), Some("127.64.0.11")).await;
    let s = timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.cluster_address.is_some())))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(s.addresses(""), ["127.0.0.5:5000".parse::<SocketAddr>().unwrap()]);
}
