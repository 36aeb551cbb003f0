//! Probes: startup, readiness and liveness checks (exec, HTTP GET, TCP connect) that the agent
//! runs for every runtime, and what they conclude about an instance ([`Health`]).

use std::sync::Arc;
use std::time::Duration;

use orch_core::ObjectRef;
use orch_core::controller::queue::WorkQueue;
use orch_core::kinds::{Container, PortStatus, Probe, ProbeAction, Protocol};
use orch_core::runtime::{Handle, InstanceState, Runtime};

use super::Agent;

/// What the probes of one instance last concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Health {
    /// The startup probe succeeded (or there is none): the other probes may run.
    pub(super) started: bool,
    /// Passing its readiness probe (or none).
    pub(super) ready: bool,
    /// Failed its liveness (or startup) probe: restart it.
    pub(super) failed: bool,
}

impl Health {
    /// Before any probe has run: started unless there is a startup probe, ready unless there is
    /// a readiness probe.
    pub(super) fn initial(container: &Container) -> Self {
        Health { started: container.startup_probe.is_none(), ready: container.readiness_probe.is_none(), failed: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// Where a probe's port is reached: the address, and the host port of each container port of
/// the container that has one (on runtimes sharing the node's network, the program listens on
/// its host port, so a probe of `containerPort` goes there).
#[derive(Debug, Clone)]
struct Target {
    address: std::net::IpAddr,
    host_ports: Vec<(u32, u32)>,
}

impl Target {
    /// The host ports a probe of `container` may reach: its TCP ports only (probes speak TCP; a
    /// UDP port of the same number has a host port of its own).
    fn tcp_host_ports(held: Vec<PortStatus>, container: &str) -> Vec<(u32, u32)> {
        held.into_iter()
            .filter(|p| p.container == container && p.protocol == Protocol::TCP)
            .map(|p| (p.container_port, p.host_port))
            .collect()
    }

    fn port(&self, port: u32) -> Option<u16> {
        let mapped = self.host_ports.iter().find(|(c, _)| *c == port).map_or(port, |(_, h)| *h);
        u16::try_from(mapped).ok()
    }
}

/// Runs one probe once; true on success.
async fn probe_once(runtime: &dyn Runtime, handle: &Handle, probe: &Probe, target: &Target) -> bool {
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let addr = target.address;
    let attempt = async {
        match &probe.action {
            ProbeAction::Exec { command } => runtime.exec(handle, command, timeout).await.is_ok_and(|code| code == 0),
            ProbeAction::Tcp { port } => {
                let Some(port) = target.port(*port) else { return false };
                tokio::net::TcpStream::connect((addr, port)).await.is_ok()
            }
            ProbeAction::Http { path, port } => {
                let Some(port) = target.port(*port) else { return false };
                http_get(addr, port, path).await.is_some_and(|status| (200..400).contains(&status))
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(false)
}

/// The status code of `GET path` on `addr:port` (HTTP/1.1 through hyper), or `None` when no
/// answer came (refused, reset, not HTTP).
async fn http_get(addr: std::net::IpAddr, port: u16, path: &str) -> Option<u16> {
    use http_body_util::Empty;
    use hyper::Request;
    use hyper::header::{CONNECTION, HOST, USER_AGENT};

    let stream = tokio::net::TcpStream::connect((addr, port)).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
    let request = Request::get(path)
        .header(HOST, format!("{addr}:{port}"))
        .header(USER_AGENT, "orch-agent")
        .header(CONNECTION, "close")
        .body(Empty::<bytes::Bytes>::new())
        .ok()?;
    // The connection is driven only until the answer's head is in; dropping it closes it. It may
    // also end first (the server closed after answering): the answer is still there then.
    let mut response = std::pin::pin!(sender.send_request(request));
    tokio::select! {
        biased;
        answer = &mut response => answer.ok().map(|r| r.status().as_u16()),
        _ = connection => response.await.ok().map(|r| r.status().as_u16()),
    }
}

impl Agent {
    /// Starts the probe loops of a running instance (if its container has probes).
    pub(super) fn watch_health(
        self: &Arc<Self>,
        key: &ObjectRef,
        container: &Container,
        handle: &Handle,
        queue: &WorkQueue<ObjectRef>,
    ) {
        let probes: Vec<(ProbeKind, Probe)> = [
            (ProbeKind::Startup, &container.startup_probe),
            (ProbeKind::Readiness, &container.readiness_probe),
            (ProbeKind::Liveness, &container.liveness_probe),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.clone().map(|p| (k, p)))
        .collect();
        let target = if self.runtime.capabilities().published_ports {
            Target { address: self.runtime.address(handle), host_ports: Vec::new() }
        } else {
            let host_ports = Target::tcp_host_ports(self.ports.held(key), &container.name);
            Target { address: self.config.address, host_ports }
        };
        let initial = Health::initial(container);
        self.health.lock().unwrap_or_else(|e| e.into_inner()).insert(handle.id.clone(), initial);
        for (kind, probe) in probes {
            let (this, key, handle, queue, target) =
                (self.clone(), key.clone(), handle.clone(), queue.clone(), target.clone());
            let slot = (key.clone(), container.name.clone());
            self.spawn(async move {
                tokio::time::sleep(Duration::from_secs(u64::from(probe.initial_delay_seconds))).await;
                let period = Duration::from_secs(u64::from(probe.period_seconds.max(1)));
                let (mut successes, mut failures) = (0u32, 0u32);
                loop {
                    let current = this
                        .instances
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&slot)
                        .map(|t| t.handle.id.clone());
                    let health = this.health.lock().unwrap_or_else(|e| e.into_inner()).get(&handle.id).copied();
                    let (Some(health), true) = (health, current.as_deref() == Some(handle.id.as_str())) else { return };
                    if queue.is_shut_down() || health.failed || (kind == ProbeKind::Startup && health.started) {
                        return;
                    }
                    if kind != ProbeKind::Startup && !health.started {
                        tokio::time::sleep(period).await;
                        continue;
                    }
                    // An instance that is no longer running needs no probing.
                    if !matches!(this.runtime.status(&handle).await, Ok(InstanceState::Running { .. })) {
                        return;
                    }
                    if probe_once(&*this.runtime, &handle, &probe, &target).await {
                        successes += 1;
                        failures = 0;
                    } else {
                        failures += 1;
                        successes = 0;
                    }
                    // Change only this probe's own field, under the lock: the other probes of
                    // the instance update theirs concurrently.
                    let changed = {
                        let mut all = this.health.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(h) = all.get_mut(&handle.id) else { return };
                        let before = *h;
                        match kind {
                            ProbeKind::Startup if successes >= 1 => h.started = true,
                            ProbeKind::Readiness if successes >= probe.success_threshold.max(1) => h.ready = true,
                            ProbeKind::Readiness if failures >= probe.failure_threshold.max(1) => h.ready = false,
                            ProbeKind::Startup | ProbeKind::Liveness if failures >= probe.failure_threshold.max(1) => {
                                h.failed = true
                            }
                            _ => {}
                        }
                        (*h != before).then_some(*h)
                    };
                    if let Some(now) = changed {
                        tracing::info!(workload = %key, instance = %handle.id, probe = ?kind, health = ?now, "probe result changed");
                        queue.add(key.clone());
                    }
                    tokio::time::sleep(period).await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server on loopback that answers every connection with `answer` (after reading the
    /// request head), or says nothing with `None`.
    async fn serve(answer: Option<&'static [u8]>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 1024];
                    let n = conn.read(&mut head).await.unwrap_or(0);
                    assert!(String::from_utf8_lossy(&head[..n]).starts_with("GET /healthz HTTP/1.1\r\n"));
                    match answer {
                        Some(bytes) => {
                            let _ = conn.write_all(bytes).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(3600)).await,
                    }
                });
            }
        });
        port
    }

    const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn http_get_reads_the_status_code() {
        let ok = serve(Some(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")).await;
        assert_eq!(http_get(LOCAL, ok, "/healthz").await, Some(204));
        let failing = serve(Some(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")).await;
        assert_eq!(http_get(LOCAL, failing, "/healthz").await, Some(503));
    }

    #[tokio::test]
    async fn http_get_gives_nothing_for_an_answer_that_is_not_http() {
        let garbage = serve(Some(b"SSH-2.0-OpenSSH_9.2\r\n")).await;
        assert_eq!(http_get(LOCAL, garbage, "/healthz").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_fails_the_probe_within_its_timeout() {
        let silent = serve(None).await;
        let within = tokio::time::timeout(Duration::from_secs(2), http_get(LOCAL, silent, "/healthz")).await;
        assert!(within.is_err(), "no answer: the probe's own timeout ends it");
    }

    #[test]
    fn a_probe_reaches_the_tcp_port_when_udp_has_the_same_number() {
        let port = |container: &str, protocol, host_port| PortStatus {
            container: container.into(),
            name: None,
            container_port: 53,
            host_port,
            protocol,
        };
        for held in [
            vec![port("dns", Protocol::UDP, 20001), port("dns", Protocol::TCP, 20002), port("other", Protocol::TCP, 9)],
            vec![port("dns", Protocol::TCP, 20002), port("dns", Protocol::UDP, 20001)],
        ] {
            let target = Target { address: LOCAL, host_ports: Target::tcp_host_ports(held, "dns") };
            assert_eq!(target.port(53), Some(20002));
        }
    }
}
