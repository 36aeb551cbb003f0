//! UDP: each client address gets a session with one endpoint (its own socket connected there);
//! replies go back through the service's socket. A session ends when idle, when its endpoint's
//! grace period runs out, or when its endpoint refuses; the next datagram starts a new one.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::ProxyConfig;
use super::balance::{Backend, Pool, pick};

/// Largest datagram carried.
const MAX_DATAGRAM: usize = 65_535;

struct Session {
    backend: Arc<Backend>,
    upstream: Arc<UdpSocket>,
    replies: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

pub(super) async fn serve(socket: UdpSocket, pool: Arc<Pool>, config: Arc<ProxyConfig>) {
    let socket = Arc::new(socket);
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // An ICMP error from an earlier reply to a client that went away: not ours to fix.
                tracing::debug!(error = %e, "proxy UDP receive failed");
                continue;
            }
        };
        let stale = sessions.get(&client).is_some_and(|s| s.replies.is_finished() || s.backend.is_draining());
        if stale {
            sessions.remove(&client);
        }
        if sessions.len() > 4096 {
            sessions.retain(|_, s| !s.replies.is_finished());
        }
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            // Not the entry API: opening a session awaits, and an entry cannot be held across it.
            #[allow(clippy::map_entry)]
            if !sessions.contains_key(&client) {
                let backends = pool.snapshot();
                let Some(backend) = pick(&backends, &tried) else {
                    metrics::counter!("orch_proxy_connections_total", "protocol" => "udp", "result" => "no_endpoint")
                        .increment(1);
                    break;
                };
                match open(&socket, client, backend.clone(), &config).await {
                    Ok(s) => {
                        metrics::counter!("orch_proxy_connections_total", "protocol" => "udp", "result" => "proxied")
                            .increment(1);
                        sessions.insert(client, s);
                    }
                    Err(e) => {
                        tracing::debug!(endpoint = %backend.addr, error = %e, "cannot open a UDP session");
                        tried.push(backend.addr);
                        continue;
                    }
                }
            }
            let Some(session) = sessions.get(&client) else { break };
            match session.upstream.send(&buf[..n]).await {
                Ok(_) => break,
                Err(e) => {
                    // Refused (an ICMP port unreachable from an earlier datagram): another endpoint.
                    tracing::debug!(endpoint = %session.backend.addr, error = %e, "UDP send failed; trying another endpoint");
                    tried.push(session.backend.addr);
                    sessions.remove(&client);
                    metrics::counter!("orch_proxy_connect_retries_total", "protocol" => "udp").increment(1);
                    if tried.len() >= config.connect_attempts.max(1) {
                        break;
                    }
                }
            }
        }
    }
}

async fn open(
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    backend: Arc<Backend>,
    config: &Arc<ProxyConfig>,
) -> std::io::Result<Session> {
    let local: SocketAddr =
        if backend.addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let upstream = Arc::new(UdpSocket::bind(local).await?);
    upstream.connect(backend.addr).await?;
    let replies = tokio::spawn({
        let (socket, upstream, backend, config) = (socket.clone(), upstream.clone(), backend.clone(), config.clone());
        async move {
            let _guard = backend.hold();
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                tokio::select! {
                    r = tokio::time::timeout(config.udp_idle_timeout, upstream.recv(&mut buf)) => match r {
                        Ok(Ok(n)) => {
                            let _ = socket.send_to(&buf[..n], client).await;
                        }
                        // Refused, or idle for too long: the session ends.
                        Ok(Err(_)) | Err(_) => return,
                    },
                    _ = backend.drained(config.grace) => return,
                }
            }
        }
    });
    Ok(Session { backend, upstream, replies })
}
