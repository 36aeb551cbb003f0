//! Service traffic beside `orch agent` and `orch server`: the node proxy and the cluster DNS
//! server, both answering from one resolver over the store.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use orch_core::Store;
use orch_runtime::net::dns::{DnsConfig, DnsServer};
use orch_runtime::net::{NodeProxy, ProxyConfig, Resolver};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{BoxError, stopped};

/// The cluster DNS server's settings (agent and server).
#[derive(Debug, clap::Args)]
pub(crate) struct DnsArgs {
    /// Serve cluster DNS on this address, UDP and TCP (e.g. `127.0.0.1:5353`); off when unset.
    /// An address this machine does not have is made local (a route on `lo`, which takes
    /// CAP_NET_ADMIN). On an agent with `--runtime docker`, an address outside 127/8 at port 53
    /// (`10.97.0.10:53`) is also given to its containers as their name server.
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// The domain the DNS server answers for.
    #[arg(long, default_value = orch_runtime::net::dns::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// DNS servers asked for names outside the cluster domain, comma-separated (`ip` or
    /// `ip:port`); without any, such names are refused.
    #[arg(long, value_delimiter = ',', value_parser = upstream)]
    dns_upstreams: Vec<SocketAddr>,
    /// TTL of DNS answers, in seconds.
    #[arg(long, default_value_t = orch_runtime::net::dns::DEFAULT_TTL)]
    dns_ttl: u32,
}

/// The node proxy's settings (agent).
#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    /// Do not run the node proxy (services' cluster addresses and node ports are then not served
    /// on this node).
    #[arg(long)]
    no_proxy: bool,
    /// Addresses node ports listen on, comma-separated (default: the node's `--address`;
    /// `0.0.0.0` for every address of the machine).
    #[arg(long, value_delimiter = ',')]
    node_port_addresses: Vec<IpAddr>,
    /// Seconds open connections to an endpoint that left may go on.
    #[arg(long, default_value_t = 30)]
    proxy_grace: u64,
}

fn upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is not an address (ip or ip:port)"))
}

#[cfg(feature = "docker")]
impl DnsArgs {
    /// The cluster DNS server as containers on a bridge network can use it: `--dns-listen` when
    /// it is on port 53 at an address outside `127.0.0.0/8` (made local on the node, which is
    /// their gateway); otherwise none, with a warning when there is a server they cannot use.
    pub(crate) fn for_containers(&self) -> Option<orch_runtime::ContainerDns> {
        let addr = self.dns_listen?;
        if addr.port() != 53 || addr.ip().is_loopback() || addr.ip().is_unspecified() {
            tracing::warn!(
                %addr,
                "containers cannot use this cluster DNS address (it must be port 53 at one address outside 127.0.0.0/8, e.g. --dns-listen 10.97.0.10:53); they get the Docker daemon's resolvers"
            );
            return None;
        }
        Some(orch_runtime::ContainerDns { servers: vec![addr.ip()], cluster_domain: self.cluster_domain.clone() })
    }
}

impl ProxyArgs {
    fn config(&self, node_address: IpAddr) -> Option<ProxyConfig> {
        if self.no_proxy {
            return None;
        }
        let node_addresses =
            if self.node_port_addresses.is_empty() { vec![node_address] } else { self.node_port_addresses.clone() };
        Some(ProxyConfig { grace: Duration::from_secs(self.proxy_grace), node_addresses, ..Default::default() })
    }
}

/// The running parts; [`Net::wait`] after the stop.
pub(crate) struct Net(Vec<JoinHandle<Result<(), BoxError>>>);

/// Starts what the flags ask for (the proxy when `proxy` is given, with the node's address,
/// DNS with `--dns-listen`).
/// A DNS address that cannot be bound is an error now; a service port the proxy cannot bind is
/// reported by the proxy and is not.
pub(crate) async fn start(
    proxy: Option<(&ProxyArgs, IpAddr)>,
    dns: &DnsArgs,
    store: Arc<dyn Store>,
    stop: watch::Receiver<bool>,
) -> Result<Net, BoxError> {
    let proxy = proxy.and_then(|(args, node)| args.config(node));
    if proxy.is_none() && dns.dns_listen.is_none() {
        return Ok(Net(Vec::new()));
    }
    let resolver = Resolver::from_store(store);
    let mut tasks = Vec::new();
    if let Some(addr) = dns.dns_listen {
        let mut config = DnsConfig::new(addr);
        config.cluster_domain = dns.cluster_domain.clone();
        config.upstreams = dns.dns_upstreams.clone();
        config.ttl = dns.dns_ttl;
        let server = DnsServer::bind(config, resolver.clone()).await.map_err(|e| format!("--dns-listen: {e}"))?;
        tracing::info!(addr = %server.local_addr(), domain = %dns.cluster_domain, "cluster DNS listening");
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move { server.run(stopped(stop)).await.map_err(BoxError::from) }));
    }
    if let Some(config) = proxy {
        tracing::info!(node_ports_on = ?config.node_addresses, "node proxy starting");
        let proxy = NodeProxy::new(config, resolver);
        tasks.push(tokio::spawn(async move {
            proxy.run(stopped(stop)).await;
            Ok(())
        }));
    }
    Ok(Net(tasks))
}

impl Net {
    /// Waits for every part to stop.
    pub(crate) async fn wait(self) -> Result<(), BoxError> {
        for t in self.0 {
            t.await??;
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "docker"))]
mod tests {
    use super::*;

    #[test]
    fn containers_get_the_cluster_dns_only_where_a_bridge_can_reach_it() {
        let args = |listen: Option<&str>| DnsArgs {
            dns_listen: listen.map(|l| l.parse().unwrap()),
            cluster_domain: "corp.local".into(),
            dns_upstreams: Vec::new(),
            dns_ttl: 5,
        };
        let given = args(Some("10.97.0.10:53")).for_containers().expect("port 53 outside 127/8");
        assert_eq!(given.servers, ["10.97.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(given.cluster_domain, "corp.local");
        assert_eq!(args(None).for_containers(), None);
        assert_eq!(args(Some("127.0.0.1:53")).for_containers(), None, "the container's own loopback");
        assert_eq!(args(Some("10.97.0.10:5353")).for_containers(), None, "resolv.conf names no port");
        assert_eq!(args(Some("0.0.0.0:53")).for_containers(), None, "no one address to give");
    }
}
