//! The cluster DNS server, queried over real UDP (and TCP) on loopback by a stock resolver
//! (hickory-resolver) and by raw packets: names follow the endpoint slices, SRV gives ports,
//! unknown names get NXDOMAIN, other names are refused or forwarded, malformed packets get
//! FORMERR and the server goes on.
#![cfg(feature = "dns")]

mod net_support;

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::{Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use orch_core::kinds::Service;
use orch_runtime::net::dns::{DnsConfig, DnsServer};
use tokio::sync::watch;
use tokio::time::timeout;

use net_support::*;

struct Dns {
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn start_dns(c: &Cluster, configure: impl FnOnce(&mut DnsConfig)) -> Dns {
    let mut config = DnsConfig::new("127.0.0.1:0".parse().unwrap());
    configure(&mut config);
    let server = DnsServer::bind(config, c.resolver.clone()).await.unwrap();
    let addr = server.local_addr();
    let (stop, mut rx) = watch::channel(false);
    tokio::spawn(server.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    Dns { addr, _stop: stop }
}

/// A stock resolver asking only `server`, with no cache (every lookup reaches the server).
fn stock_resolver(server: SocketAddr, tcp: bool) -> hickory_resolver::TokioResolver {
    let mut ns = if tcp { NameServerConfig::tcp(server.ip()) } else { NameServerConfig::udp(server.ip()) };
    for c in &mut ns.connections {
        c.port = server.port();
    }
    let config = ResolverConfig::from_name_servers(vec![ns]);
    let mut builder = hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default());
    builder.options_mut().cache_size = 0;
    builder.options_mut().attempts = 1;
    builder.build().unwrap()
}

/// The addresses a stock resolver gets for `name`, or `None` for NXDOMAIN.
async fn lookup(server: SocketAddr, name: &str, rtype: RecordType) -> Option<Vec<IpAddr>> {
    match stock_resolver(server, false).lookup(name, rtype).await {
        Ok(l) => {
            let mut v: Vec<IpAddr> = l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
            v.sort();
            Some(v)
        }
        Err(e) if e.is_nx_domain() => None,
        Err(e) if e.is_no_records_found() => Some(Vec::new()),
        Err(e) => panic!("lookup {name}: {e}"),
    }
}

/// Asks until the answer for `name` is `expect` (the server follows the store a moment later).
async fn answers(server: SocketAddr, name: &str, rtype: RecordType, expect: Option<&[&str]>) {
    let expect: Option<Vec<IpAddr>> = expect.map(|v| {
        let mut v: Vec<IpAddr> = v.iter().map(|a| a.parse().unwrap()).collect();
        v.sort();
        v
    });
    let mut last = None;
    let found = timeout(LIMIT, async {
        loop {
            let got = lookup(server, name, rtype).await;
            if got == expect {
                return;
            }
            last = Some(got);
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(found.is_ok(), "{name} {rtype}: wanted {expect:?}, last answer {last:?}");
}

/// One raw query over UDP; the parsed answer.
async fn raw(server: SocketAddr, packet: &[u8]) -> Message {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    sock.send(packet).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(LIMIT, sock.recv(&mut buf)).await.expect("the server answers").unwrap();
    Message::from_vec(&buf[..n]).expect("a well-formed answer")
}

fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

fn headless(ports: &[(&str, u16)]) -> Service {
    Service { headless: true, ..service_spec(ports) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_appear_and_disappear_with_services_and_endpoints() {
    let c = Cluster::new().await;
    let dns = start_dns(&c, |_| {}).await;
    let web = "web.default.svc.cluster.local.";
    answers(dns.addr, web, RecordType::A, None).await;

    c.service("web", service_spec(&[("http", 80)]), Some("127.64.0.7")).await;
    answers(dns.addr, web, RecordType::A, Some(&["127.64.0.7"])).await;
    // A cluster address is IPv4: the name exists, with no AAAA record.
    answers(dns.addr, web, RecordType::AAAA, Some(&[])).await;

    // A headless service answers with its ready endpoints, and each by its own name.
    c.service("db", headless(&[("pg", 5432)]), None).await;
    let mut e0 = endpoint("10.1.0.1", &[("pg", 5432)], true);
    e0.hostname = "db-0".into();
    let mut e1 = endpoint("10.1.0.2", &[("pg", 5432)], true);
    e1.hostname = "db-1".into();
    let unready = endpoint("10.1.0.3", &[("pg", 5432)], false);
    let v6 = endpoint("fd00::5", &[("pg", 5432)], true);
    c.slice("db", "db-a", vec![e0.clone(), e1.clone(), unready]).await;
    c.slice("db", "db-b", vec![v6]).await;
    let db = "db.default.svc.cluster.local.";
    answers(dns.addr, db, RecordType::A, Some(&["10.1.0.1", "10.1.0.2"])).await;
    answers(dns.addr, db, RecordType::AAAA, Some(&["fd00::5"])).await;
    answers(dns.addr, "db-1.db.default.svc.cluster.local.", RecordType::A, Some(&["10.1.0.2"])).await;
    answers(dns.addr, "fd00--5.db.default.svc.cluster.local.", RecordType::AAAA, Some(&["fd00::5"])).await;

    // db-1 turns unready: it leaves both names.
    e1.conditions.ready = false;
    c.slice("db", "db-a", vec![e0, e1]).await;
    answers(dns.addr, db, RecordType::A, Some(&["10.1.0.1"])).await;
    answers(dns.addr, "db-1.db.default.svc.cluster.local.", RecordType::A, None).await;

    c.delete_service("web").await;
    answers(dns.addr, web, RecordType::A, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_the_ports() {
    let c = Cluster::new().await;
    let dns = start_dns(&c, |_| {}).await;
    c.service("web", service_spec(&[("http", 80), ("admin", 9000)]), Some("127.64.0.8")).await;
    c.service("db", headless(&[("pg", 5432)]), None).await;
    let mut e0 = endpoint("10.1.0.1", &[("pg", 15432)], true);
    e0.hostname = "db-0".into();
    c.slice("db", "db-a", vec![e0, endpoint("10.1.0.2", &[("pg", 25432)], true)]).await;
    let mut watch = c.resolver.watch("db");
    timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.endpoints.len() == 2))).await.unwrap().unwrap();

    let resolver = stock_resolver(dns.addr, false);
    let srv = |l: &hickory_resolver::lookup::Lookup| {
        let mut v: Vec<(u16, String)> = l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.port, s.target.to_string())),
                _ => None,
            })
            .collect();
        v.sort();
        v
    };
    let admin = resolver.lookup("_admin._tcp.web.default.svc.cluster.local.", RecordType::SRV).await.unwrap();
    assert_eq!(srv(&admin), [(9000, "web.default.svc.cluster.local.".to_string())]);
    // The target's address comes along.
    assert!(admin.additionals().iter().any(|r| matches!(&r.data, RData::A(a) if a.0.to_string() == "127.64.0.8")));

    let pg = resolver.lookup("_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV).await.unwrap();
    assert_eq!(
        srv(&pg),
        [
            (15432, "db-0.db.default.svc.cluster.local.".to_string()),
            (25432, "10-1-0-2.db.default.svc.cluster.local.".to_string())
        ]
    );
    // The targets resolve.
    answers(dns.addr, "10-1-0-2.db.default.svc.cluster.local.", RecordType::A, Some(&["10.1.0.2"])).await;
    // A port the service does not have, or the wrong protocol: no such name.
    for name in ["_nope._tcp.web.default.svc.cluster.local.", "_http._udp.web.default.svc.cluster.local."] {
        let e = resolver.lookup(name, RecordType::SRV).await.unwrap_err();
        assert!(e.is_nx_domain(), "{name}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_get_nxdomain_and_other_names_are_refused_or_forwarded() {
    let c = Cluster::new().await;
    let dns = start_dns(&c, |cfg| cfg.ttl = 3).await;
    for name in ["nope.default.svc.cluster.local.", "web.cluster.local.", "a.b.c.d.e.f.svc.cluster.local."] {
        let m = raw(dns.addr, &query(7, name, RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.metadata.authoritative);
        // The SOA tells resolvers how long to remember the miss: the configured TTL.
        let soa = m.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(s) => Some(s.minimum),
            _ => None,
        });
        assert_eq!(soa, Some(3), "{name}");
    }
    // The domain's own levels exist but hold nothing.
    let m = raw(dns.addr, &query(8, "default.svc.cluster.local.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());

    // No upstream: names outside the domain are refused.
    let m = raw(dns.addr, &query(9, "example.com.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert_eq!(m.metadata.id, 9);

    // With an upstream (another orch DNS server, for domain example.test), they are forwarded.
    let upstream_cluster = Cluster::new().await;
    upstream_cluster.service("api", service_spec(&[("", 80)]), Some("127.64.9.9")).await;
    let upstream = start_dns(&upstream_cluster, |cfg| cfg.cluster_domain = "example.test".into()).await;
    let fwd = start_dns(&c, |cfg| cfg.upstreams = vec![upstream.addr]).await;
    answers(fwd.addr, "api.default.svc.example.test.", RecordType::A, Some(&["127.64.9.9"])).await;
    let m = raw(fwd.addr, &query(10, "nope.default.svc.example.test.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "the upstream's NXDOMAIN comes back");
    assert_eq!(m.metadata.id, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_formerr_and_the_server_keeps_answering() {
    let c = Cluster::new().await;
    c.service("web", service_spec(&[("", 80)]), Some("127.64.0.9")).await;
    let mut watch = c.resolver.watch("web");
    timeout(LIMIT, watch.wait_for(|s| s.is_some())).await.unwrap().unwrap();
    let dns = start_dns(&c, |_| {}).await;

    // A header that promises a question, and no question.
    let mut truncated = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    let m = raw(dns.addr, &truncated).await;
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A question whose name runs past the end of the packet.
    truncated.extend_from_slice(&[0x3f, b'a', b'b']);
    truncated[1] = 0x35;
    let m = raw(dns.addr, &truncated).await;
    assert_eq!((m.metadata.id, m.metadata.response_code), (0x1235, ResponseCode::FormErr));
    // Garbage after a valid header, and two questions in one query.
    let mut garbage = query(0x1236, "web.default.svc.cluster.local.", RecordType::A);
    garbage.truncate(20);
    garbage.extend_from_slice(&[0xff; 40]);
    let m = raw(dns.addr, &garbage).await;
    assert_eq!((m.metadata.id, m.metadata.response_code), (0x1236, ResponseCode::FormErr));
    let mut two = Message::query();
    two.metadata.id = 0x1237;
    two.add_query(Query::query(Name::from_ascii("web.default.svc.cluster.local.").unwrap(), RecordType::A));
    two.add_query(Query::query(Name::from_ascii("db.default.svc.cluster.local.").unwrap(), RecordType::A));
    let m = raw(dns.addr, &two.to_vec().unwrap()).await;
    assert_eq!((m.metadata.id, m.metadata.response_code), (0x1237, ResponseCode::FormErr));
    // Shorter than a header: nothing to answer to, and nothing breaks.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&[1, 2, 3], dns.addr).await.unwrap();

    // Still answering, over UDP and TCP.
    answers(dns.addr, "web.default.svc.cluster.local.", RecordType::A, Some(&["127.64.0.9"])).await;
    let over_tcp =
        stock_resolver(dns.addr, true).lookup("web.default.svc.cluster.local.", RecordType::A).await.unwrap();
    assert!(over_tcp.answers().iter().any(|r| matches!(&r.data, RData::A(a) if a.0.to_string() == "127.64.0.9")));
    let answers_ttl: Vec<u32> = over_tcp.answers().iter().map(|r| r.ttl).collect();
    assert!(answers_ttl.iter().all(|t| *t <= orch_runtime::net::dns::DEFAULT_TTL), "short TTLs: {answers_ttl:?}");
}

#[tokio::test]
async fn a_bad_cluster_domain_is_refused_naming_the_setting() {
    let c = Cluster::new().await;
    let mut config = DnsConfig::new("127.0.0.1:0".parse().unwrap());
    config.cluster_domain = "bad..name".into();
    let err = DnsServer::bind(config, c.resolver.clone()).await.unwrap_err();
    assert!(err.to_string().starts_with("cluster_domain:"), "{err}");
}

/// One raw query over TCP; the parsed answer.
async fn raw_tcp(server: SocketAddr, packet: &[u8]) -> Message {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    timeout(LIMIT, s.read_exact(&mut len)).await.expect("the server answers").unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).expect("a well-formed answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_answer_too_big_for_udp_comes_whole_over_tcp() {
    // The upstream: a headless service with 60 ready endpoints (about 1 KiB of A records, more
    // than a UDP answer without EDNS may carry).
    let upstream_cluster = Cluster::new().await;
    upstream_cluster.service("big", headless(&[("", 80)]), None).await;
    let eps = (1..=60).map(|i| endpoint(&format!("10.9.0.{i}"), &[("", 80)], true)).collect();
    upstream_cluster.slice("big", "big-a", eps).await;
    let mut watch = upstream_cluster.resolver.watch("big");
    timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.endpoints.len() == 60))).await.unwrap().unwrap();
    let upstream = start_dns(&upstream_cluster, |cfg| cfg.cluster_domain = "example.test".into()).await;

    let c = Cluster::new().await;
    let fwd = start_dns(&c, |cfg| cfg.upstreams = vec![upstream.addr]).await;
    let q = query(11, "big.default.svc.example.test.", RecordType::A);
    let over_udp = raw(fwd.addr, &q).await;
    assert!(over_udp.metadata.truncation, "a UDP answer says it is cut short");
    let over_tcp = raw_tcp(fwd.addr, &q).await;
    assert_eq!(over_tcp.metadata.response_code, ResponseCode::NoError);
    assert!(!over_tcp.metadata.truncation);
    assert_eq!(over_tcp.answers.len(), 60, "every record, over TCP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_udp_answer_larger_than_4096_bytes_comes_back_whole() {
    // The upstream: a headless service with 400 ready endpoints (about 6.4 KiB of A records).
    let upstream_cluster = Cluster::new().await;
    upstream_cluster.service("huge", headless(&[("", 80)]), None).await;
    let eps = (0..400).map(|i| endpoint(&format!("10.9.{}.{}", i / 200, 1 + i % 200), &[("", 80)], true)).collect();
    upstream_cluster.slice("huge", "huge-a", eps).await;
    let mut watch = upstream_cluster.resolver.watch("huge");
    timeout(LIMIT, watch.wait_for(|s| s.as_ref().is_some_and(|s| s.endpoints.len() == 400))).await.unwrap().unwrap();
    let upstream = start_dns(&upstream_cluster, |cfg| cfg.cluster_domain = "example.test".into()).await;

    let c = Cluster::new().await;
    let fwd = start_dns(&c, |cfg| cfg.upstreams = vec![upstream.addr]).await;
    // A client that takes UDP answers of up to 16 KiB (EDNS), passed on to the upstream.
    let mut m = Message::query();
    m.metadata.id = 12;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii("huge.default.svc.example.test.").unwrap(), RecordType::A));
    let mut edns = hickory_resolver::proto::op::Edns::new();
    edns.set_max_payload(16384);
    m.set_edns(edns);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(fwd.addr).await.unwrap();
    sock.send(&m.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = timeout(LIMIT, sock.recv(&mut buf)).await.expect("the server answers").unwrap();
    assert!(n > 4096, "one datagram larger than 4096 bytes: {n}");
    let answer = Message::from_vec(&buf[..n]).expect("a well-formed answer");
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError, "not SERVFAIL");
    assert!(!answer.metadata.truncation);
    assert_eq!(answer.answers.len(), 400, "every record, over UDP");
}
