//! Probes: startup, readiness and liveness checks (exec, HTTP GET, TCP connect) that the agent
//! runs for every runtime, and what they conclude about an instance ([`Health`]).

use std::sync::Arc;
use std::time::Duration;

use orch_core::ObjectRef;
use orch_core::controller::queue::WorkQueue;
use orch_core::kinds::{Container, Probe, ProbeAction};
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

/// Runs one probe once; true on success.
async fn probe_once(runtime: &dyn Runtime, handle: &Handle, probe: &Probe) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let addr = runtime.address(handle);
    let attempt = async {
        match &probe.action {
            ProbeAction::Exec { command } => runtime.exec(handle, command, timeout).await.is_ok_and(|code| code == 0),
            ProbeAction::Tcp { port } => {
                let Ok(port) = u16::try_from(*port) else { return false };
                tokio::net::TcpStream::connect((addr, port)).await.is_ok()
            }
            ProbeAction::Http { path, port } => {
                let Ok(port) = u16::try_from(*port) else { return false };
                let Ok(mut conn) = tokio::net::TcpStream::connect((addr, port)).await else { return false };
                let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: orch-agent\r\n\r\n");
                if conn.write_all(request.as_bytes()).await.is_err() {
                    return false;
                }
                let mut head = [0u8; 64];
                let Ok(n) = conn.read(&mut head).await else { return false };
                // "HTTP/1.x NNN ...": 2xx and 3xx are healthy.
                let text = String::from_utf8_lossy(&head[..n]);
                text.split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u16>().ok())
                    .is_some_and(|c| (200..400).contains(&c))
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(false)
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
        let initial = Health::initial(container);
        self.health.lock().unwrap_or_else(|e| e.into_inner()).insert(handle.id.clone(), initial);
        for (kind, probe) in probes {
            let (this, key, handle, queue) = (self.clone(), key.clone(), handle.clone(), queue.clone());
            let slot = (key.clone(), container.name.clone());
            tokio::spawn(async move {
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
                    if probe_once(&*this.runtime, &handle, &probe).await {
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
