//! TCP: accept, pick an endpoint, connect (another endpoint if refused), copy both ways until
//! either side closes or the endpoint's grace period runs out.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::ProxyConfig;
use super::balance::{Pool, pick};

/// Buffer per direction of a proxied connection.
const COPY_BUFFER: usize = 64 * 1024;

/// How many proxied TCP connections are open on the whole proxy (its [`run`](super::NodeProxy::run)
/// waits for them when it stops).
pub(super) type OpenConnections = Arc<tokio::sync::watch::Sender<usize>>;

/// Counts one connection in [`OpenConnections`] while alive.
struct Counted(OpenConnections);

impl Counted {
    fn new(open: OpenConnections) -> Self {
        open.send_modify(|n| *n += 1);
        Counted(open)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

pub(super) async fn serve(listener: TcpListener, pool: Arc<Pool>, config: Arc<ProxyConfig>, open: OpenConnections) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: pause, so a busy loop does not spin.
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (counted, pool, config) = (Counted::new(open.clone()), pool.clone(), config.clone());
        tokio::spawn(async move {
            connection(client, peer, pool, config).await;
            drop(counted);
        });
    }
}

async fn connection(mut client: TcpStream, peer: SocketAddr, pool: Arc<Pool>, config: Arc<ProxyConfig>) {
    let _ = client.set_nodelay(true);
    let backends = pool.snapshot();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let attempts = config.connect_attempts.max(1);
    let (mut upstream, backend, guard) = loop {
        let Some(backend) = pick(&backends, &tried) else {
            metrics::counter!("orch_proxy_connections_total", "protocol" => "tcp", "result" => "no_endpoint")
                .increment(1);
            tracing::debug!(%peer, tried = tried.len(), "no endpoint to take the connection; closing it");
            return;
        };
        let guard = backend.hold();
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(s)) => break (s, backend, guard),
            Ok(Err(e)) => {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    backend.mark_refused();
                }
                tracing::debug!(endpoint = %backend.addr, error = %e, "connect failed; trying another endpoint")
            }
            Err(_) => tracing::debug!(endpoint = %backend.addr, "connect timed out; trying another endpoint"),
        }
        drop(guard);
        metrics::counter!("orch_proxy_connect_retries_total", "protocol" => "tcp").increment(1);
        tried.push(backend.addr);
        if tried.len() >= attempts {
            metrics::counter!("orch_proxy_connections_total", "protocol" => "tcp", "result" => "connect_failed")
                .increment(1);
            return;
        }
    };
    metrics::counter!("orch_proxy_connections_total", "protocol" => "tcp", "result" => "proxied").increment(1);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER) => {}
        _ = backend.drained(config.grace) => {
            tracing::debug!(endpoint = %backend.addr, %peer, "grace period over; closing the connection");
        }
    }
    drop(guard);
}
