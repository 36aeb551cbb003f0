//! [`DockerRuntime`]: workloads as containers on a Docker Engine, over its HTTP API (feature
//! `docker`).
//!
//! - **Connection.** `DOCKER_HOST` or the local socket, or [`DockerConfig::host`]; the API
//!   version is negotiated with the daemon on first use (never pinned), so Engine 20.10 (API 1.41)
//!   and newer all work.
//! - **Containers.** One per instance, named `orch_<node>_<instance id>` and labelled with
//!   `orch.dev/managed-by=orch`, `orch.dev/node`, `orch.dev/instance`, `orch.dev/handle-version`
//!   (see [`labels`]) beside the spec's own labels (the agent adds `orch.dev/namespace` and
//!   `orch.dev/workload`). With [`DockerConfig::dns`], containers get the cluster DNS server and
//!   their namespace's search domains. Command
//!   and args replace the image's entry point and CMD, as in Kubernetes; env, working directory,
//!   exposed and host ports, memory and CPU limits are applied. A mount of a volume that the spec
//!   resolves to a host directory is a bind mount; any other mount gets a fresh volume of the
//!   instance, removed with it. Unlike `docker run -w`, a working directory that does not exist
//!   in the image is refused rather than created empty. Containers run under the Engine's init
//!   (`--init`) by default, so the stop signal reaches a shell's children and zombies are reaped.
//! - **Stop.** The image's stop signal (SIGTERM unless it sets one), up to the grace period,
//!   then SIGKILL; stopping a stopped or vanished container succeeds.
//! - **Status and exit.** Read from the Engine, so they survive the agent: exit code, OOM kill,
//!   start and finish times. Logs come from the Engine's log driver (`json-file` or `local`),
//!   stdout and stderr apart; the daemon rotates them (`log-opts`), so `rotate_logs` does nothing.
//! - **Recovery.** Handles hold the container id; `recover` and `list` find containers by label,
//!   and a container whose labels do not name this node and instance is never taken for it. A
//!   container with our node label that no handle has referred to for
//!   [`DockerConfig::orphan_grace`] (nothing adopted it after an agent restart) is removed.
//! - **Images.** A local image is used as it is; a missing one fails the start with
//!   [`DockerError::ImageNotFound`] naming it, unless [`DockerConfig::pull`] allows a pull.
//! - **Named volumes.** [`DockerVolumes`] provides orch volumes as Docker named volumes on the
//!   node's engine; the agent hands their directory to this runtime as a host path, which it
//!   bind-mounts like any other.
//! - **Errors.** Daemon down, permission denied on the socket, a missing image, a host port in
//!   use: a [`RuntimeError::Unavailable`] whose message says what to do and whose source is a
//!   [`DockerError`] ([`DockerError::of`]). Bad specs: `InvalidSpec` naming the field.

mod error;
mod exec;
mod image;
mod spec;
mod volumes;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ExecConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use orch_core::Timestamp;
use orch_core::runtime::{
    Capabilities, ExecSession, ExecStreamOptions, ExitStatus, Handle, InstanceSpec, InstanceState, LogLine, LogOptions,
    LogStream, Runtime, RuntimeError,
};
use serde::{Deserialize, Serialize};

pub use error::DockerError;
pub use image::busybox_rootfs;
pub use volumes::DockerVolumes;

const NAME: &str = "docker";
const HANDLE_VERSION: u32 = 1;

/// The labels this runtime puts on its containers (and on the volumes it makes for them), and
/// those [`DockerVolumes`] puts on its named volumes.
pub mod labels {
    /// Marks what orch made; its value is [`MANAGED_BY_VALUE`].
    pub const MANAGED_BY: &str = "orch.dev/managed-by";
    /// The value of [`MANAGED_BY`].
    pub const MANAGED_BY_VALUE: &str = "orch";
    /// The node (runtime) the container belongs to.
    pub const NODE: &str = "orch.dev/node";
    /// The instance id from the spec.
    pub const INSTANCE: &str = "orch.dev/instance";
    /// The format version of the handle the container can be found by.
    pub const HANDLE_VERSION: &str = "orch.dev/handle-version";
    /// On a per-instance volume: the workload's volume name.
    pub const VOLUME: &str = "orch.dev/volume";
    /// On a container made only to look into an image (never started, removed at once).
    pub const LOOK: &str = "orch.dev/look";
    /// On a named volume of [`DockerVolumes`](super::DockerVolumes): the orch volume it holds
    /// (the `PersistentVolume`'s name). Its node is in [`NODE`].
    pub const PROVIDED_VOLUME: &str = "orch.dev/provided-volume";
    /// On a named volume of [`DockerVolumes`](super::DockerVolumes): its size in bytes.
    pub const CAPACITY: &str = "orch.dev/capacity";
    /// On a named volume of [`DockerVolumes`](super::DockerVolumes): its access mode
    /// (`ReadWriteOnce`).
    pub const ACCESS_MODE: &str = "orch.dev/access-mode";
}

/// Whether a start may pull an image the node does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Never: a missing image fails the start with [`DockerError::ImageNotFound`].
    #[default]
    Never,
    /// Pull it when it is missing (needs a registry the daemon can reach).
    IfMissing,
}

/// How a [`DockerRuntime`] reaches its daemon and runs containers. Start from
/// [`DockerConfig::new`] and change fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DockerConfig {
    /// The node this runtime serves: labels its containers and names them, so several nodes (or
    /// test runs) can share one daemon. 1-63 of `a-z`, `0-9`, `-`, `.`.
    pub node: String,
    /// The daemon's address (`unix:///var/run/docker.sock`, `tcp://host:2375`); `None` for
    /// `DOCKER_HOST` or the local socket.
    pub host: Option<String>,
    /// Whether missing images are pulled.
    pub pull: PullPolicy,
    /// Run the Engine's init as PID 1 (`--init`): signals reach the workload even when it is a
    /// shell, and zombies are reaped.
    pub init: bool,
    /// The network to attach containers to (`None`: the daemon's default bridge).
    pub network: Option<String>,
    /// How long a container with this node's label may go unclaimed by any handle before it is
    /// removed (`None`: never). Runtimes made for one-off inspection of a node the agent serves
    /// should turn it off.
    pub orphan_grace: Option<Duration>,
    /// The timeout of one request to the daemon (streams such as `wait` and `logs` excepted).
    pub request_timeout: Duration,
    /// The cluster DNS server containers use (`None`: the daemon's default, the host's
    /// resolvers). See [`ContainerDns`].
    pub dns: Option<ContainerDns>,
}

/// How containers find services by name: the cluster DNS server as their only name server, and
/// the cluster's search domains, so that `web` (a service in the workload's own namespace),
/// `web.other` and `web.other.svc` resolve as they do in a Kubernetes pod (`ndots:5`).
///
/// A resolver configuration cannot name a port, so the server must answer on port 53, and at an
/// address a container reaches: on a bridge network, not `127.0.0.0/8` (the container's own
/// loopback) but, for instance, an address made local on the node (`10.97.0.10`, which the DNS
/// server's `local_route` setting makes local). Names outside the cluster domain go to the
/// server's upstreams. The workload's namespace comes from the instance's `orch.dev/namespace`
/// label, which the agent sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDns {
    /// The name servers (the cluster DNS server's address).
    pub servers: Vec<std::net::IpAddr>,
    /// The cluster domain (`cluster.local`).
    pub cluster_domain: String,
}

impl DockerConfig {
    /// Defaults for `node`: the local daemon, no pulls, init on, orphans removed after 2 minutes.
    pub fn new(node: impl Into<String>) -> Self {
        DockerConfig {
            node: node.into(),
            host: None,
            pull: PullPolicy::Never,
            init: true,
            network: None,
            orphan_grace: Some(Duration::from_secs(120)),
            request_timeout: Duration::from_secs(60),
            dns: None,
        }
    }

    /// Where the daemon is looked for, for messages.
    fn address(&self) -> String {
        self.host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
    }
}

/// What a handle's `data` holds for this backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DockerData {
    /// The container's full id.
    container: String,
}

/// Runs instances as containers on a Docker Engine. Cheap to clone; clones share the
/// connection.
///
/// ```no_run
/// use std::sync::Arc;
/// use orch_runtime::docker::{DockerConfig, DockerRuntime, PullPolicy};
///
/// # async fn run(store: Arc<dyn orch_core::Store>) -> Result<(), Box<dyn std::error::Error>> {
/// let mut config = DockerConfig::new("node-1"); // DOCKER_HOST, else the local socket
/// config.pull = PullPolicy::Never; // the default: local images only
/// let runtime: Arc<dyn orch_core::Runtime> = Arc::new(DockerRuntime::connect(config).await?);
/// let agent = orch_runtime::Agent::new(orch_runtime::AgentConfig::new("node-1"), store, runtime);
/// agent.run(std::future::pending(), true).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    config: DockerConfig,
    address: String,
    client: tokio::sync::OnceCell<Connected>,
    /// Instance ids a handle has referred to in this runtime's life: these are not orphans.
    claimed: Mutex<HashSet<String>>,
    /// Containers found unclaimed by the orphan sweep, by container id, and since when.
    unclaimed: Mutex<HashMap<String, Instant>>,
    /// Container addresses on their network, for probes (`address` cannot ask the daemon).
    addresses: Mutex<HashMap<String, IpAddr>>,
    /// Working directories known to exist, by image id.
    known_dirs: Mutex<HashSet<(String, String)>>,
}

struct Connected {
    docker: Docker,
    cpus: Option<i64>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("node", &self.inner.config.node)
            .field("address", &self.inner.address)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DockerRuntime {
    /// A runtime for `config`. Does not contact the daemon: the first call does (and negotiates
    /// the API version); use [`DockerRuntime::connect`] to fail early instead.
    pub fn new(config: DockerConfig) -> Result<Self, RuntimeError> {
        let node = &config.node;
        let ok = !node.is_empty()
            && node.len() <= 63
            && node.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            && node.as_bytes()[0].is_ascii_alphanumeric();
        if !ok {
            return Err(RuntimeError::invalid(
                "node",
                format!("{node:?} must be 1-63 of a-z, 0-9, '-', '.', starting with a letter or digit"),
            ));
        }
        if config.request_timeout.is_zero() {
            return Err(RuntimeError::invalid("requestTimeout", "must be more than zero"));
        }
        if config.orphan_grace.is_some_and(|g| g.is_zero()) {
            return Err(RuntimeError::invalid("orphanGrace", "must be more than zero (None turns removal off)"));
        }
        let address = config.address();
        Ok(DockerRuntime {
            inner: Arc::new(Inner {
                config,
                address,
                client: tokio::sync::OnceCell::new(),
                claimed: Mutex::default(),
                unclaimed: Mutex::default(),
                addresses: Mutex::default(),
                known_dirs: Mutex::default(),
            }),
        })
    }

    /// A runtime for `config`, once the daemon has answered and the API version is agreed.
    pub async fn connect(config: DockerConfig) -> Result<Self, RuntimeError> {
        let runtime = DockerRuntime::new(config)?;
        runtime.connected().await?;
        Ok(runtime)
    }

    /// The API version agreed with the daemon (e.g. `1.41` with Engine 20.10).
    pub async fn api_version(&self) -> Result<String, RuntimeError> {
        let v = self.connected().await?.docker.client_version();
        Ok(format!("{}.{}", v.major_version, v.minor_version))
    }

    /// The node this runtime serves.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// The name of the container of instance `id`.
    pub fn container_name(&self, id: &str) -> String {
        format!("orch_{}_{id}", self.inner.config.node)
    }

    /// The client, connected and version-negotiated on first use (retried on the next call
    /// if the daemon was not there). Starts the orphan sweep once connected.
    async fn connected(&self) -> Result<&Connected, RuntimeError> {
        let inner = &self.inner;
        let mut fresh = false;
        let c = inner
            .client
            .get_or_try_init(|| async {
                let address = &inner.address;
                let docker = match &inner.config.host {
                    Some(host) => Docker::connect_with_host(host),
                    None => Docker::connect_with_defaults(),
                }
                .map_err(|e| DockerError::classify(address, "connect", e))?
                .with_timeout(inner.config.request_timeout);
                let docker = docker
                    .negotiate_version()
                    .await
                    .map_err(|e| DockerError::classify(address, "agree on an API version", e))?;
                let info = docker.info().await.map_err(|e| DockerError::classify(address, "describe itself", e))?;
                fresh = true;
                Ok::<_, RuntimeError>(Connected { docker, cpus: info.ncpu })
            })
            .await?;
        if fresh && let Some(grace) = inner.config.orphan_grace {
            tokio::spawn(sweep_orphans_forever(Arc::downgrade(&self.inner), grace));
        }
        Ok(c)
    }

    async fn docker(&self) -> Result<&Docker, RuntimeError> {
        Ok(&self.connected().await?.docker)
    }

    fn api_error(&self, action: impl Into<String>, e: bollard::errors::Error) -> RuntimeError {
        DockerError::classify(&self.inner.address, action, e).into()
    }

    fn claim(&self, id: &str) {
        lock(&self.inner.claimed).insert(id.to_string());
    }

    /// The container a handle names, checked to be this node's container of that instance.
    async fn find(&self, handle: &Handle) -> Result<(String, ContainerInspectResponse), RuntimeError> {
        let bad = |reason: String| RuntimeError::BadHandle { id: handle.id.clone(), runtime: NAME.into(), reason };
        if handle.runtime != NAME {
            return Err(bad(format!("it was made by the {} runtime", handle.runtime)));
        }
        if handle.version != HANDLE_VERSION {
            return Err(bad(format!("unknown handle version {}", handle.version)));
        }
        orch_core::runtime::check_instance_id(&handle.id).map_err(|e| bad(e.to_string()))?;
        let data: DockerData = serde_json::from_value(handle.data.clone()).map_err(|e| bad(e.to_string()))?;
        // The id goes into request paths: only hex.
        if !(12..=64).contains(&data.container.len()) || !data.container.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(format!("{:?} is not a container id", data.container)));
        }
        let docker = self.docker().await?;
        let found = match docker.inspect_container(&data.container, None).await {
            Ok(found) => found,
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404) => {
                return Err(RuntimeError::NotFound(handle.id.clone()));
            }
            Err(e) => return Err(self.api_error(format!("inspect the container of {}", handle.id), e)),
        };
        let labels = found.config.as_ref().and_then(|c| c.labels.as_ref());
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        if label(labels::MANAGED_BY) != Some(labels::MANAGED_BY_VALUE)
            || label(labels::NODE) != Some(self.inner.config.node.as_str())
            || label(labels::INSTANCE) != Some(handle.id.as_str())
        {
            // Another container (another node's, or another instance's): not this one.
            return Err(RuntimeError::NotFound(handle.id.clone()));
        }
        self.claim(&handle.id);
        self.remember_address(&handle.id, &found);
        Ok((data.container, found))
    }

    fn remember_address(&self, id: &str, found: &ContainerInspectResponse) {
        let ip = found
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .and_then(|nets| nets.values().find_map(|e| e.ip_address.as_deref()?.parse::<IpAddr>().ok()));
        let mut addresses = lock(&self.inner.addresses);
        match ip {
            Some(ip) => addresses.insert(id.to_string(), ip),
            None => addresses.remove(id),
        };
    }

    async fn inspect(&self, container: &str, id: &str) -> Result<ContainerInspectResponse, RuntimeError> {
        match self.docker().await?.inspect_container(container, None).await {
            Ok(found) => Ok(found),
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404) => Err(RuntimeError::NotFound(id.to_string())),
            Err(e) => Err(self.api_error(format!("inspect the container of {id}"), e)),
        }
    }

    /// Waits until the container is not running and returns how it ended.
    async fn wait_exit(&self, container: &str, id: &str) -> Result<ExitStatus, RuntimeError> {
        loop {
            let found = self.inspect(container, id).await?;
            if let InstanceState::Exited(exit) = state_of(&found) {
                return Ok(exit);
            }
            let options = WaitContainerOptionsBuilder::default().condition("not-running").build();
            let mut waiting = self.docker().await?.wait_container(container, Some(options));
            // The answer carries the exit code, but the Engine's record (inspect) also has the
            // OOM flag and the finish time: the loop reads that.
            let mut failed = false;
            while let Some(item) = waiting.next().await {
                failed |=
                    matches!(&item, Err(e) if !matches!(e, bollard::errors::Error::DockerContainerWaitError { .. }));
            }
            if failed {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Sends `signal`; a container that is not running (any more) is not an error.
    async fn signal(&self, container: &str, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let options = KillContainerOptionsBuilder::default().signal(signal).build();
        match self.docker().await?.kill_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404 || s == 409) => Ok(()),
            Err(e) => Err(self.api_error(format!("send {signal} to {id}"), e)),
        }
    }

    /// Creates the container, pulling the image first if it is missing and pulls are allowed.
    async fn create(&self, spec: &InstanceSpec) -> Result<String, RuntimeError> {
        let c = self.connected().await?;
        let body = spec::create_body(&self.inner.config, spec, c.cpus)?;
        let image = body.image.clone().unwrap_or_default();
        let name = self.container_name(&spec.id);
        let mut pulled = false;
        loop {
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            let e = match c.docker.create_container(Some(options), body.clone()).await {
                Ok(created) => return Ok(created.id),
                Err(e) => e,
            };
            match error::answer(&e) {
                Some((404, _)) if !pulled && self.inner.config.pull == PullPolicy::IfMissing => {
                    self.pull(&image).await?;
                    pulled = true;
                }
                Some((404, _)) => return Err(DockerError::ImageNotFound { image }.into()),
                Some((409, _)) => {
                    return Err(RuntimeError::invalid(
                        "id",
                        format!("{} is already in use on node {}", spec.id, self.node()),
                    ));
                }
                Some((400, message)) if message.contains("reference format") => {
                    return Err(RuntimeError::invalid("container.image", format!("{image:?}: {message}")));
                }
                Some((400, message)) if message.contains("bind source path does not exist") => {
                    let field = spec
                        .volumes
                        .iter()
                        .position(|v| message.contains(&*v.host_path.to_string_lossy()))
                        .map_or("volumes".to_string(), |i| format!("volumes[{i}].hostPath"));
                    return Err(RuntimeError::invalid(field, message.to_string()));
                }
                _ => return Err(self.api_error(format!("create the container of {}", spec.id), e)),
            }
        }
    }

    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        let options = CreateImageOptionsBuilder::default().from_image(image).build();
        let mut progress = self.docker().await?.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            if let Err(source) = step {
                return Err(DockerError::PullFailed { image: image.to_string(), source }.into());
            }
        }
        Ok(())
    }

    /// Removes a container and the volumes made for it; a container already gone is fine.
    async fn remove_container(&self, container: &str, id: &str) -> Result<(), RuntimeError> {
        let docker = self.docker().await?.clone();
        self.remove_container_with(&docker, container, id).await
    }

    // The `_with` functions take the client rather than connecting, so that the orphan sweep,
    // which `connected` starts, does not call back into it.
    async fn remove_container_with(&self, docker: &Docker, container: &str, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match docker.remove_container(container, Some(options)).await {
            Ok(()) => {}
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404) => {}
            // "removal already in progress": someone else removes it.
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 409) => {}
            Err(e) => return Err(self.api_error(format!("remove the container of {id}"), e)),
        }
        lock(&self.inner.addresses).remove(id);
        Ok(())
    }

    /// One orphan sweep: removes containers labelled for this node that no handle has referred
    /// to for the orphan grace period (counted from when a sweep first saw them unclaimed).
    /// Returns the ids of the removed instances (or container ids, where the instance label is
    /// unreadable). Runs by itself every few seconds when [`DockerConfig::orphan_grace`] is set.
    pub async fn remove_orphans(&self) -> Result<Vec<String>, RuntimeError> {
        let docker = self.docker().await?.clone();
        self.remove_orphans_with(&docker).await
    }

    async fn remove_orphans_with(&self, docker: &Docker) -> Result<Vec<String>, RuntimeError> {
        let Some(grace) = self.inner.config.orphan_grace else { return Ok(Vec::new()) };
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let found = self.our_containers_with(docker).await?;
            let claimed = lock(&self.inner.claimed);
            let mut unclaimed = lock(&self.inner.unclaimed);
            let mut seen = HashSet::new();
            for (container, labels) in found {
                let id = labels.get(labels::INSTANCE).cloned();
                if id.as_ref().is_some_and(|id| claimed.contains(id)) {
                    continue;
                }
                seen.insert(container.clone());
                let since = *unclaimed.entry(container.clone()).or_insert(now);
                if now.duration_since(since) >= grace {
                    due.push((container, id));
                }
            }
            unclaimed.retain(|c, _| seen.contains(c));
        }
        let mut removed = Vec::new();
        for (container, id) in due {
            // Claimed since the listing (an agent adopted it just now): keep it.
            if id.as_ref().is_some_and(|id| lock(&self.inner.claimed).contains(id)) {
                continue;
            }
            let name = id.unwrap_or_else(|| container.clone());
            tracing::info!(node = %self.node(), instance = %name, "removing an orphaned container");
            self.remove_container_with(docker, &container, &name).await?;
            lock(&self.inner.unclaimed).remove(&container);
            removed.push(name);
        }
        Ok(removed)
    }

    /// Every container labelled for this node: its id and labels.
    async fn our_containers(&self) -> Result<Vec<(String, HashMap<String, String>)>, RuntimeError> {
        let docker = self.docker().await?.clone();
        self.our_containers_with(&docker).await
    }

    async fn our_containers_with(
        &self,
        docker: &Docker,
    ) -> Result<Vec<(String, HashMap<String, String>)>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
                format!("{}={}", labels::NODE, self.inner.config.node),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let listed = docker.list_containers(Some(options)).await.map_err(|e| self.api_error("list containers", e))?;
        Ok(listed.into_iter().filter_map(|c| Some((c.id?, c.labels.unwrap_or_default()))).collect())
    }

    /// Fails with `InvalidSpec` when the working directory exists neither in the image nor
    /// under a mount: the Engine would create it empty and run there. Looks in a container made
    /// for the purpose (the Engine creates the directory when the real one is created) and
    /// remembers, per image id, the directories it found.
    async fn check_working_dir(&self, spec: &InstanceSpec) -> Result<(), RuntimeError> {
        let c = &spec.container;
        let Some(dir) = c.working_dir.as_deref() else { return Ok(()) };
        let under = |mount: &str| {
            let mount = mount.trim_end_matches('/');
            dir == mount || dir.strip_prefix(mount).is_some_and(|rest| rest.starts_with('/'))
        };
        if c.volume_mounts.iter().any(|m| under(&m.mount_path)) {
            return Ok(());
        }
        let Some(image) = c.image.as_deref() else { return Ok(()) };
        let docker = self.docker().await?;
        let image_id = match docker.inspect_image(image).await {
            Ok(found) => found.id.unwrap_or_else(|| image.to_string()),
            // Missing (or badly named): creating the container says so properly.
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404 || s == 400) => return Ok(()),
            Err(e) => return Err(self.api_error(format!("inspect image {image}"), e)),
        };
        let key = (image_id.clone(), dir.to_string());
        if lock(&self.inner.known_dirs).contains(&key) {
            return Ok(());
        }
        let look = ContainerCreateBody {
            image: Some(image_id),
            // Never started: the entry point only has to be there.
            entrypoint: Some(vec!["orch-look".into()]),
            labels: Some(HashMap::from([
                (labels::MANAGED_BY.to_string(), labels::MANAGED_BY_VALUE.to_string()),
                (labels::NODE.to_string(), self.inner.config.node.clone()),
                (labels::LOOK.to_string(), "true".to_string()),
            ])),
            ..Default::default()
        };
        let created = docker
            .create_container(None, look)
            .await
            .map_err(|e| self.api_error(format!("look into image {image}"), e))?;
        let options = bollard::query_parameters::ContainerArchiveInfoOptionsBuilder::default().path(dir).build();
        let found = docker.get_container_archive_info(&created.id, Some(options)).await;
        self.remove_container(&created.id, &spec.id).await?;
        match found {
            Ok(_) => {
                lock(&self.inner.known_dirs).insert(key);
                Ok(())
            }
            Err(e) if error::answer(&e).is_some_and(|(s, _)| s == 404) => Err(RuntimeError::invalid(
                "container.workingDir",
                format!("{dir} does not exist in image {image} (nor under a mount)"),
            )),
            Err(e) => Err(self.api_error(format!("look for the working directory of {}", spec.id), e)),
        }
    }
}

/// Runs [`DockerRuntime::remove_orphans`] every few seconds until the runtime is dropped.
async fn sweep_orphans_forever(inner: Weak<Inner>, grace: Duration) {
    let every = (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let Some(docker) = inner.client.get().map(|c| c.docker.clone()) else { continue };
        let runtime = DockerRuntime { inner };
        if let Err(e) = runtime.remove_orphans_with(&docker).await {
            tracing::warn!(node = %runtime.node(), error = %e, "orphan sweep failed");
        }
    }
}

/// Splits the Engine's log frames into lines, per stream (a frame may hold several lines or
/// part of one); a last line without a line break is kept.
fn lines(
    frames: impl Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send + 'static,
) -> impl Stream<Item = LogLine> + Send {
    struct State<S> {
        frames: S,
        partial: [Vec<u8>; 2],
        ready: VecDeque<LogLine>,
        done: bool,
    }
    fn text(bytes: &[u8]) -> String {
        let line = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        String::from_utf8_lossy(line).into_owned()
    }
    let state =
        State { frames: Box::pin(frames), partial: [Vec::new(), Vec::new()], ready: VecDeque::new(), done: false };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(line) = s.ready.pop_front() {
                return Some((line, s));
            }
            if s.done {
                return None;
            }
            match s.frames.next().await {
                Some(Ok(frame)) => {
                    let (i, stream, bytes) = match frame {
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            (0, LogStream::Stdout, message)
                        }
                        LogOutput::StdErr { message } => (1, LogStream::Stderr, message),
                        LogOutput::StdIn { .. } => continue,
                    };
                    let buf = &mut s.partial[i];
                    buf.extend_from_slice(&bytes);
                    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                        let rest = buf.split_off(end + 1);
                        s.ready.push_back(LogLine { stream, line: text(&buf[..end]) });
                        *buf = rest;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading container logs failed");
                    s.done = true;
                }
                None => s.done = true,
            }
            if s.done {
                for (i, stream) in [(0, LogStream::Stdout), (1, LogStream::Stderr)] {
                    if !s.partial[i].is_empty() {
                        let rest = std::mem::take(&mut s.partial[i]);
                        s.ready.push_back(LogLine { stream, line: text(&rest) });
                    }
                }
            }
        }
    })
}

/// The instance state in an inspect answer.
fn state_of(found: &ContainerInspectResponse) -> InstanceState {
    let Some(state) = &found.state else { return InstanceState::Lost };
    let time = |t: &Option<String>| t.as_deref().and_then(parse_time);
    match state.status {
        Some(
            ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::PAUSED | ContainerStateStatusEnum::RESTARTING,
        ) => InstanceState::Running { started_at: time(&state.started_at).unwrap_or(Timestamp(0)) },
        _ if state.running == Some(true) => {
            InstanceState::Running { started_at: time(&state.started_at).unwrap_or(Timestamp(0)) }
        }
        _ => InstanceState::Exited(ExitStatus {
            // A container that never ran (created only) has no exit code.
            code: match state.status {
                Some(ContainerStateStatusEnum::CREATED) => None,
                _ => state.exit_code.map(|c| c as i32),
            },
            signal: None,
            oom_killed: state.oom_killed.unwrap_or(false),
            finished_at: time(&state.finished_at)
                .or_else(|| found.created.as_ref().and_then(|c| parse_time(&c.to_string())))
                .unwrap_or(Timestamp(0)),
        }),
    }
}

/// Parses the Engine's RFC 3339 times (`2026-11-25T21:30:00.123456789Z`) to milliseconds;
/// `None` for the zero time (`0001-01-01T00:00:00Z`) and anything unreadable.
fn parse_time(text: &str) -> Option<Timestamp> {
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    if y < 1970 || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // The offset: `Z`, or `+hh:mm` / `-hh:mm` after the seconds.
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (c, sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60))
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, s): (i64, i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let millis: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days since 1970-01-01 in the proleptic Gregorian calendar.
    let (yy, mm) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    Some(Timestamp(secs * 1000 + millis))
}

fn handle_for(id: &str, container: &str) -> Handle {
    Handle {
        runtime: NAME.into(),
        version: HANDLE_VERSION,
        id: id.to_string(),
        data: serde_json::to_value(DockerData { container: container.to_string() }).expect("plain data serializes"),
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            resource_limits: true,
            images: true,
            recover: true,
            exit_code_after_recover: true,
            log_files: false,
            published_ports: true,
        }
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<Handle, RuntimeError> {
        // Bad fields first (the create request checks them again, cheaply).
        spec::create_body(&self.inner.config, spec, None)?;
        self.check_working_dir(spec).await?;
        let container = self.create(spec).await?;
        // From here on a failure removes the container: never half-started.
        let undo = async |e: RuntimeError| {
            if let Err(cleanup) = self.remove_container(&container, &spec.id).await {
                tracing::warn!(instance = %spec.id, error = %cleanup, "could not remove a container that failed to start");
            }
            Err(e)
        };
        if let Err(e) = self.docker().await?.start_container(&container, None).await {
            let message = error::answer(&e).map(|(_, m)| m.to_string()).unwrap_or_default();
            let in_use = message.contains("address already in use") || message.contains("port is already allocated");
            let mut host_ports = spec.container.ports.iter().filter_map(|p| p.host_port);
            // The one the daemon names, else (a message worded otherwise) the first.
            let port = host_ports.clone().find(|p| message.contains(&format!(":{p}"))).or_else(|| host_ports.next());
            let e = match port {
                Some(port) if in_use => DockerError::PortInUse { port, source: e }.into(),
                // Without the Engine's init the runtime itself execs the command.
                _ if message.contains("executable file not found") || message.contains("no such file or directory") => {
                    let program = spec.container.command.first().or(spec.container.args.first());
                    RuntimeError::invalid(
                        "container.command[0]",
                        format!(
                            "cannot run {program:?} in image {:?}: {message}",
                            spec.container.image.as_deref().unwrap_or("")
                        ),
                    )
                }
                _ => self.api_error(format!("start the container of {}", spec.id), e),
            };
            return undo(e).await;
        }
        self.claim(&spec.id);
        if let Ok(found) = self.inspect(&container, &spec.id).await {
            self.remember_address(&spec.id, &found);
        }
        Ok(handle_for(&spec.id, &container))
    }

    async fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), RuntimeError> {
        let (container, found) = match self.find(handle).await {
            Ok(found) => found,
            // Gone already: nothing is left to stop.
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !matches!(state_of(&found), InstanceState::Running { .. }) {
            return Ok(());
        }
        let polite = found.config.as_ref().and_then(|c| c.stop_signal.clone()).unwrap_or_else(|| "SIGTERM".into());
        self.signal(&container, &handle.id, &polite).await?;
        if let Ok(done) = tokio::time::timeout(grace, self.wait_exit(&container, &handle.id)).await {
            return done.map(drop).or_else(|e| if matches!(e, RuntimeError::NotFound(_)) { Ok(()) } else { Err(e) });
        }
        self.signal(&container, &handle.id, "SIGKILL").await?;
        match tokio::time::timeout(Duration::from_secs(10), self.wait_exit(&container, &handle.id)).await {
            Ok(Ok(_) | Err(RuntimeError::NotFound(_))) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RuntimeError::Unavailable {
                message: format!("{} survived SIGKILL for 10 s (is the Docker daemon healthy?)", handle.id),
                source: None,
            }),
        }
    }

    async fn remove(&self, handle: &Handle) -> Result<(), RuntimeError> {
        let container = match self.find(handle).await {
            Ok((container, _)) => container,
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.remove_container(&container, &handle.id).await?;
        lock(&self.inner.claimed).remove(&handle.id);
        Ok(())
    }

    async fn status(&self, handle: &Handle) -> Result<InstanceState, RuntimeError> {
        let (_, found) = self.find(handle).await?;
        Ok(state_of(&found))
    }

    async fn wait(&self, handle: &Handle) -> Result<ExitStatus, RuntimeError> {
        let (container, found) = self.find(handle).await?;
        if let InstanceState::Exited(exit) = state_of(&found) {
            return Ok(exit);
        }
        self.wait_exit(&container, &handle.id).await
    }

    async fn list(&self) -> Result<Vec<Handle>, RuntimeError> {
        let mut handles = Vec::new();
        for (container, labels) in self.our_containers().await? {
            if labels.contains_key(labels::LOOK) {
                continue;
            }
            let id = labels.get(labels::INSTANCE);
            let version = labels.get(labels::HANDLE_VERSION);
            match (id, version) {
                (Some(id), Some(v))
                    if *v == HANDLE_VERSION.to_string() && orch_core::runtime::check_instance_id(id).is_ok() =>
                {
                    handles.push(handle_for(id, &container));
                }
                _ => {
                    tracing::warn!(container = %container, ?labels, "skipping a container whose labels this version cannot read")
                }
            }
        }
        handles.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(handles)
    }

    async fn logs(&self, handle: &Handle, options: LogOptions) -> Result<BoxStream<'static, LogLine>, RuntimeError> {
        let (container, _) = self.find(handle).await?;
        let docker = self.docker().await?.clone();
        let read = |follow: bool| {
            let query = LogsOptionsBuilder::default().stdout(true).stderr(true).follow(follow).tail("all").build();
            lines(docker.logs(&container, Some(query)))
        };
        let slot = |s: LogStream| usize::from(s == LogStream::Stderr);
        // The Engine's `tail` counts the two streams together (and filters by stream after), but
        // the contract counts each: read everything and keep each stream's last lines.
        Ok(match (options.tail, options.follow) {
            (None, follow) => read(follow).boxed(),
            (Some(n), false) => {
                let all: Vec<LogLine> = read(false).collect().await;
                let mut left = [0usize; 2];
                all.iter().for_each(|l| left[slot(l.stream)] += 1);
                let kept: Vec<LogLine> = all
                    .into_iter()
                    .filter(|l| {
                        let i = slot(l.stream);
                        left[i] -= 1;
                        left[i] < n
                    })
                    .collect();
                futures::stream::iter(kept).boxed()
            }
            (Some(n), true) => {
                // Count what is there now, then follow from the start skipping all but the
                // last `n` of those: lines written in between are neither lost nor doubled.
                let mut skip = read(false)
                    .fold([0usize; 2], |mut counts, l| async move {
                        counts[slot(l.stream)] += 1;
                        counts
                    })
                    .await
                    .map(|count| count.saturating_sub(n));
                read(true)
                    .filter(move |l| {
                        let i = slot(l.stream);
                        let keep = skip[i] == 0;
                        skip[i] = skip[i].saturating_sub(1);
                        futures::future::ready(keep)
                    })
                    .boxed()
            }
        })
    }

    async fn recover(&self, handle: &Handle) -> Result<InstanceState, RuntimeError> {
        match self.find(handle).await {
            Ok((_, found)) => Ok(state_of(&found)),
            Err(RuntimeError::NotFound(_)) => Ok(InstanceState::Lost),
            Err(e) => Err(e),
        }
    }

    async fn exec(&self, handle: &Handle, command: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let (container, _) = self.find(handle).await?;
        if command.first().is_none_or(String::is_empty) {
            return Err(RuntimeError::invalid("command", "must not be empty"));
        }
        let docker = self.docker().await?;
        let config = ExecConfig {
            cmd: Some(command.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let exec = docker
            .create_exec(&container, config)
            .await
            .map_err(|e| self.api_error(format!("exec in {}", handle.id), e))?;
        let run = async {
            match docker.start_exec(&exec.id, None).await {
                Ok(bollard::exec::StartExecResults::Attached { mut output, .. }) => {
                    while output.next().await.is_some() {}
                    Ok(())
                }
                Ok(bollard::exec::StartExecResults::Detached) => Ok(()),
                Err(e) => Err(self.api_error(format!("exec in {}", handle.id), e)),
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result?,
            // Timed out: a failed probe, as for the process runtime.
            Err(_) => return Ok(-1),
        }
        let done =
            docker.inspect_exec(&exec.id).await.map_err(|e| self.api_error(format!("exec in {}", handle.id), e))?;
        Ok(done.exit_code.map_or(-1, |c| c as i32))
    }

    async fn exec_output(
        &self,
        handle: &Handle,
        command: &[String],
        timeout: Duration,
    ) -> Result<orch_core::ExecOutput, RuntimeError> {
        let (container, _) = self.find(handle).await?;
        if command.first().is_none_or(String::is_empty) {
            return Err(RuntimeError::invalid("command", "must not be empty"));
        }
        let docker = self.docker().await?;
        let config = ExecConfig {
            cmd: Some(command.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let exec = docker
            .create_exec(&container, config)
            .await
            .map_err(|e| self.api_error(format!("exec in {}", handle.id), e))?;
        let limit = orch_core::runtime::EXEC_OUTPUT_LIMIT;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let run = async {
            match docker.start_exec(&exec.id, None).await {
                Ok(bollard::exec::StartExecResults::Attached { mut output, .. }) => {
                    while let Some(frame) = output.next().await {
                        let (buf, bytes) = match frame {
                            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                                (&mut stdout, message)
                            }
                            Ok(LogOutput::StdErr { message }) => (&mut stderr, message),
                            Ok(LogOutput::StdIn { .. }) => continue,
                            Err(e) => return Err(self.api_error(format!("exec in {}", handle.id), e)),
                        };
                        let room = limit.saturating_sub(buf.len());
                        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    }
                    Ok(())
                }
                Ok(bollard::exec::StartExecResults::Detached) => Ok(()),
                Err(e) => Err(self.api_error(format!("exec in {}", handle.id), e)),
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result?,
            // The Engine has no call that stops an exec: it goes on in the container.
            Err(_) => return Ok(orch_core::ExecOutput { exit_code: -1, timed_out: true, ..Default::default() }),
        }
        let done =
            docker.inspect_exec(&exec.id).await.map_err(|e| self.api_error(format!("exec in {}", handle.id), e))?;
        Ok(orch_core::ExecOutput {
            exit_code: done.exit_code.map_or(-1, |c| c as i32),
            stdout,
            stderr,
            timed_out: false,
        })
    }

    /// Runs the command with `docker exec`'s attach: the Engine's own terminal (`Tty`) when
    /// asked for one, resized with its resize call. A program missing from the image is reported
    /// the Engine's way, as output and exit code 126 or 127, as `docker exec` does.
    async fn exec_stream(
        &self,
        handle: &Handle,
        command: &[String],
        options: ExecStreamOptions,
    ) -> Result<ExecSession, RuntimeError> {
        self.exec_session(handle, command, options).await
    }

    /// The container's address on its network (recorded when it was started or last looked
    /// at); the loopback address when it has none (host networking).
    fn address(&self, handle: &Handle) -> IpAddr {
        lock(&self.inner.addresses).get(&handle.id).copied().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_times_parse_to_milliseconds() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(Timestamp(0)));
        assert_eq!(parse_time("2026-11-25T21:30:00.123456789Z"), Some(Timestamp(1_795_642_200_123)));
        assert_eq!(parse_time("2026-11-25T22:30:00.5+01:00"), Some(Timestamp(1_795_642_200_500)));
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), None, "the zero time means never");
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn bad_node_names_are_refused() {
        for node in ["", "Node", "a_b", "-a", &"x".repeat(64)] {
            let e = DockerRuntime::new(DockerConfig::new(node)).unwrap_err();
            assert!(matches!(e, RuntimeError::InvalidSpec { ref field, .. } if field == "node"), "{node:?}: {e}");
        }
        assert!(DockerRuntime::new(DockerConfig::new("node-1.zone")).is_ok());
    }

    #[tokio::test]
    async fn log_frames_become_lines_per_stream() {
        let frame = |out: bool, s: &str| {
            let message = s.as_bytes().to_vec().into();
            Ok(if out { LogOutput::StdOut { message } } else { LogOutput::StdErr { message } })
        };
        let frames = futures::stream::iter(vec![
            frame(true, "a\nb"),
            frame(false, "x\n"),
            frame(true, "c\r\n"),
            frame(true, "tail"),
        ]);
        let got: Vec<(LogStream, String)> = lines(frames).map(|l| (l.stream, l.line)).collect().await;
        let want = [
            (LogStream::Stdout, "a"),
            (LogStream::Stderr, "x"),
            (LogStream::Stdout, "bc"),
            (LogStream::Stdout, "tail"),
        ];
        assert_eq!(got, want.map(|(s, l)| (s, l.to_string())));
    }
}
