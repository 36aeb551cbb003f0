//! Service traffic on a node: the in-process [`Resolver`], the [`NodeProxy`], and (feature
//! `dns`) the cluster DNS server [`dns::DnsServer`].
//!
//! All three read the same thing: the `Service` and `EndpointSlice` objects of the store,
//! merged by a [`Resolver`] from shared caches. The endpoints controller (in `orch-controllers`)
//! writes the slices and allocates cluster addresses and node ports; these parts only read.
//!
//! ```no_run
//! # #[cfg(feature = "dns")]
//! # async fn demo(store: std::sync::Arc<dyn orch_core::Store>) -> Result<(), Box<dyn std::error::Error>> {
//! use orch_runtime::net::{NodeProxy, ProxyConfig, Resolver};
//! use orch_runtime::net::dns::{DnsConfig, DnsServer};
//!
//! let resolver = Resolver::from_store(store);
//! let dns = DnsServer::bind(DnsConfig::new("127.0.0.1:5353".parse()?), resolver.clone()).await?;
//! let proxy = NodeProxy::new(ProxyConfig::default(), resolver.clone());
//! let stop = async { let _ = tokio::signal::ctrl_c().await; };
//! let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
//! let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move { let _ = rx.wait_for(|s| *s).await; };
//! let dns_task = tokio::spawn(dns.run(stopped(stop_rx.clone())));
//! let proxy_task = tokio::spawn(proxy.run(stopped(stop_rx)));
//! stop.await;
//! stop_tx.send_replace(true);
//! dns_task.await??;
//! proxy_task.await?;
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub mod dns;
pub mod proxy;
pub mod resolver;
pub mod route;

pub use proxy::{BindFailure, Frontend, NodeProxy, ProxyConfig, ProxyStatus};
pub use resolver::{ResolvedEndpoint, ResolvedEndpointPort, ResolvedPort, ResolvedService, Resolver, ServiceChange};
pub use route::LocalRoute;
