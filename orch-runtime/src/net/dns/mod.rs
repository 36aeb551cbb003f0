//! The cluster DNS server, on `hickory-server`: names of services and their endpoints under the
//! cluster domain, answered from a [`Resolver`], with short TTLs.
//!
//! | name | A / AAAA | SRV |
//! |---|---|---|
//! | `<service>.<namespace>.svc.<domain>` | the cluster address; for a headless service every ready endpoint | |
//! | `<endpoint>.<service>.<namespace>.svc.<domain>` | that endpoint (headless services; `<endpoint>` is its hostname, or its address with dashes) | |
//! | `_<port>._<tcp\|udp>.<service>.<namespace>.svc.<domain>` | | the port: the service name and port, or each ready endpoint and its port (headless) |
//!
//! Other names in the domain get NXDOMAIN (with the zone's SOA, so resolvers cache the miss for
//! the TTL only). Names outside it go to the configured upstreams over UDP (and over TCP when
//! the UDP answer was truncated), or get REFUSED when there are none. A packet that does not parse gets FORMERR (one shorter than a DNS header gets
//! nothing: it has no id to answer to); the server goes on.
//!
//! ```no_run
//! # async fn demo(resolver: orch_runtime::net::Resolver) -> Result<(), orch_runtime::net::dns::DnsError> {
//! use orch_runtime::net::dns::{DnsConfig, DnsServer};
//!
//! let mut config = DnsConfig::new("127.0.0.1:5353".parse().unwrap());
//! config.upstreams = vec!["127.0.0.53:53".parse().unwrap()];
//! let server = DnsServer::bind(config, resolver).await?;
//! println!("answering on {}", server.local_addr());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

mod answer;
mod forward;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use self::answer::Zone;
use super::resolver::Resolver;

/// The cluster domain unless configured otherwise.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The TTL of answers unless configured otherwise, in seconds: short, because endpoints move.
pub const DEFAULT_TTL: u32 = 5;

/// How the DNS server is set up.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where it listens, on UDP and (with `tcp`) TCP at the same address. Port 0 picks one.
    pub listen: SocketAddr,
    /// Also serve TCP (default true).
    pub tcp: bool,
    /// The zone it answers for (default `cluster.local`).
    pub cluster_domain: String,
    /// TTL of its answers and of cached misses, in seconds (default 5).
    pub ttl: u32,
    /// Servers asked for names outside the cluster domain, in order; empty: such names are
    /// refused.
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream may take before the next is asked (default 2 s).
    pub upstream_timeout: Duration,
    /// How long a TCP client may stay idle (default 10 s).
    pub tcp_timeout: Duration,
    /// When `listen` is an IPv4 address outside `127.0.0.0/8`, hold it local to this machine (a
    /// [`LocalRoute`](super::LocalRoute) on the loopback interface, removed when the server is
    /// dropped): how a cluster DNS address such as `10.97.0.10:53` is served to containers on a
    /// Docker bridge network (default on; takes `CAP_NET_ADMIN`, without which only the
    /// machine's own addresses can be bound).
    pub local_route: bool,
}

impl DnsConfig {
    /// Defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        DnsConfig {
            listen,
            tcp: true,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            ttl: DEFAULT_TTL,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            tcp_timeout: Duration::from_secs(10),
            local_route: true,
        }
    }
}

/// Why the DNS server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A setting is wrong.
    #[error("{field}: {reason}")]
    Config {
        /// Which setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr} ({protocol})")]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The server's sockets failed while it ran.
    #[error("DNS server failed")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A bound DNS server; [`run`](Self::run) serves until stopped.
pub struct DnsServer {
    server: Server<Handler>,
    local_addr: SocketAddr,
    /// The route that made the address local, if the server made one (removed on drop).
    route: Option<super::LocalRoute>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .field("local_route", &self.route.as_ref().map(super::LocalRoute::addr))
            .finish()
    }
}

impl DnsServer {
    /// Binds the configured address (UDP, and TCP at the same port) and prepares to answer from
    /// `resolver`.
    pub async fn bind(config: DnsConfig, resolver: Resolver) -> Result<Self, DnsError> {
        let zone = Zone::new(&config.cluster_domain, config.ttl)
            .map_err(|reason| DnsError::Config { field: "cluster_domain", reason })?;
        // An IPv4 address outside 127/8 is made local first (one a killed run left is taken
        // over); where that fails the bind is still tried: it may be one of the machine's own.
        let ip = config.listen.ip();
        let routable = config.local_route && ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified();
        let (route, refused) = match routable {
            true => match super::LocalRoute::add(ip) {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            },
            false => (None, None),
        };
        let (udp, local_addr, tcp) = match (bind_both(config.listen, config.tcp).await, refused) {
            (Err(DnsError::Bind { source, .. }), Some(why))
                if source.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                return Err(DnsError::Config {
                    field: "listen",
                    reason: format!(
                        "{ip} is not an address of this machine and making it local failed: {why} (takes CAP_NET_ADMIN)"
                    ),
                });
            }
            (bound, _) => bound?,
        };
        let handler = Handler {
            resolver,
            zone,
            forward: forward::Forwarder::new(config.upstreams.clone(), config.upstream_timeout),
        };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        if let Some(tcp) = tcp {
            server.register_listener(tcp, config.tcp_timeout, 64 * 1024);
        }
        Ok(DnsServer { server, local_addr, route })
    }

    /// Where it answers (the real port when the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Answers until `stop` resolves, then finishes the queries under way.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), DnsError> {
        let token = self.server.shutdown_token().clone();
        let mut stop = std::pin::pin!(stop);
        tokio::select! {
            r = self.server.block_until_done() => return r.map_err(|e| DnsError::Serve(Box::new(e))),
            _ = &mut stop => {}
        }
        token.cancel();
        self.server.shutdown_gracefully().await.map_err(|e| DnsError::Serve(Box::new(e)))
    }
}

/// UDP and (with `tcp`) TCP at the same address. With port 0, the port UDP got may be taken
/// for TCP: then both are tried again on another.
async fn bind_both(
    listen: SocketAddr,
    tcp: bool,
) -> Result<(tokio::net::UdpSocket, SocketAddr, Option<tokio::net::TcpListener>), DnsError> {
    let mut attempts = if listen.port() == 0 { 20 } else { 1 };
    loop {
        attempts -= 1;
        let udp = tokio::net::UdpSocket::bind(listen).await.map_err(|source| DnsError::Bind {
            addr: listen,
            protocol: "udp",
            source,
        })?;
        let local = udp.local_addr().map_err(|source| DnsError::Bind { addr: listen, protocol: "udp", source })?;
        if !tcp {
            return Ok((udp, local, None));
        }
        match tokio::net::TcpListener::bind(local).await {
            Ok(t) => return Ok((udp, local, Some(t))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts > 0 => continue,
            Err(source) => return Err(DnsError::Bind { addr: local, protocol: "tcp", source }),
        }
    }
}

struct Handler {
    resolver: Resolver,
    zone: Zone,
    forward: forward::Forwarder,
}

fn failed(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

impl Handler {
    async fn error<R: ResponseHandler>(&self, request: &Request, mut response: R, code: ResponseCode) -> ResponseInfo {
        metrics::counter!("orch_dns_responses_total", "rcode" => code.to_str()).increment(1);
        let builder = MessageResponseBuilder::new(&request.queries, None);
        let msg = builder.error_msg(&request.metadata, code);
        response.send_response(msg).await.unwrap_or_else(|_| failed(request, code))
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        if request.metadata.op_code != OpCode::Query {
            return self.error(request, response, ResponseCode::NotImp).await;
        }
        let queries = request.queries.queries();
        let [query] = queries else {
            return self.error(request, response, ResponseCode::FormErr).await;
        };
        let name = query.name().into();
        let edns = request.edns.as_ref().map(|e| {
            let mut out = hickory_server::proto::op::Edns::new();
            out.set_max_payload(e.max_payload().max(512));
            out
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        if !self.zone.contains(&name) {
            if self.forward.is_empty() {
                return self.error(request, response, ResponseCode::Refused).await;
            }
            return match self.forward.ask(request.as_slice()).await {
                Some(reply) => {
                    metadata.response_code = reply.metadata.response_code;
                    metadata.recursion_available = reply.metadata.recursion_available;
                    metadata.truncation = reply.metadata.truncation;
                    metrics::counter!("orch_dns_responses_total", "rcode" => "forwarded").increment(1);
                    let msg = builder.build(
                        metadata,
                        reply.answers.iter(),
                        reply.authorities.iter(),
                        std::iter::empty::<&Record>(),
                        reply
                            .additionals
                            .iter()
                            .filter(|r| r.record_type() != hickory_server::proto::rr::RecordType::OPT),
                    );
                    response.send_response(msg).await.unwrap_or_else(|_| failed(request, ResponseCode::ServFail))
                }
                None => self.error(request, response, ResponseCode::ServFail).await,
            };
        }
        let answer = self.zone.answer(&self.resolver, &name, query.query_type());
        metadata.authoritative = true;
        let soa;
        let soa_records: &[Record] = if answer.answers.is_empty() {
            soa = [self.zone.soa(self.resolver.changes() as u32)];
            &soa
        } else {
            &[]
        };
        if !answer.exists {
            metadata.response_code = ResponseCode::NXDomain;
        }
        metrics::counter!("orch_dns_responses_total", "rcode" => metadata.response_code.to_str()).increment(1);
        let msg = builder.build(
            metadata,
            answer.answers.iter(),
            std::iter::empty::<&Record>(),
            soa_records.iter(),
            answer.additionals.iter(),
        );
        response.send_response(msg).await.unwrap_or_else(|_| failed(request, ResponseCode::ServFail))
    }
}
