//! `orch agent`: a node, speaking to a control plane through `RemoteStore`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use orch_core::{Labels, Runtime, Store};
use orch_runtime::{Agent, AgentConfig};
use orch_store::api::RemoteStore;

use super::{BoxError, host_name, metrics, on_signal, ops_routes, serve_ops, stopped};

/// Which runtime runs the node's workloads.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RuntimeKind {
    /// Plain processes on this machine.
    Process,
    /// Containers of the local Docker Engine (needs orch built with `docker`).
    Docker,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch agent --server http://10.0.0.1:7440 --join-token \"$NODE_TOKEN\" --listen 0.0.0.0:7441
  orch agent --server http://127.0.0.1:7440 --name node-2 --labels zone=b --runtime docker")]
pub(crate) struct AgentArgs {
    /// The control plane's API (`http://host:7440`).
    #[arg(long)]
    server: String,
    /// The token this node presents to the control plane.
    #[arg(long, env = "ORCH_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Which runtime runs the workloads.
    #[arg(long, value_enum, default_value = "process")]
    runtime: RuntimeKind,
    /// The node's name (default: this machine's host name).
    #[arg(long)]
    name: Option<String>,
    /// Node labels, `key=value`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Where the agent keeps its workloads' files.
    #[arg(long, default_value = "orch-agent")]
    data_dir: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long)]
    ops_listen: Option<SocketAddr>,
    /// Address of the node's API (workloads' logs, for `orch logs`); none when unset. The
    /// agent publishes it on its node for the server to reach.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The URL the server reaches the node's API at (default: the `--listen` address, or the
    /// node's `--address` with its port when listening on every interface).
    #[arg(long, requires = "listen")]
    advertise: Option<String>,
    /// Stop every workload of the node when the agent stops (otherwise the next agent adopts
    /// them).
    #[arg(long)]
    drain: bool,
    /// The address other nodes reach this node's workloads at (reported in the node's status and
    /// in its services' endpoints; the programs find it in `ORCH_ADDRESS`).
    #[arg(long, default_value = "127.0.0.1")]
    address: std::net::IpAddr,
    /// The host ports given to container ports that do not fix one, `first-last` (programs
    /// find theirs in `PORT_<NAME>`).
    #[arg(long, default_value = "20000-29999", value_parser = super::parse_port_range)]
    port_range: std::ops::RangeInclusive<u16>,
    /// Seconds a deleted workload with ports keeps running, terminating in its services'
    /// endpoints, before it is stopped (when its spec does not say).
    #[arg(long, default_value_t = 2)]
    pre_stop_delay: u64,
    /// Room for the node's `local` volumes (under `<data-dir>/data/local-volumes`), a byte
    /// quantity such as `10Gi`; advertised in the node's `status.storage`. Default: the free
    /// space of the data directory's file system when the agent starts.
    #[arg(long, value_parser = parse_local_storage)]
    local_storage: Option<orch_core::Quantity>,
    /// Whether the sizes of `local` volumes are enforced (each a loop-mounted ext4 image):
    /// `auto` where loop mounts work (else only accounted, saying why in the log), `required`
    /// (the agent does not start without them), `off` (only accounted).
    #[arg(long, default_value = "auto", value_name = "auto|required|off")]
    local_storage_enforce: orch_runtime::Enforcement,
    /// With `--runtime docker`: also provide the volume class `docker` (Docker named volumes on
    /// the node's engine, consumers recorded under `<data-dir>/data/docker-volumes`) with this
    /// much room (`50Gi`). Without it the node provides no `docker` class.
    #[arg(long, value_parser = parse_local_storage)]
    docker_storage: Option<orch_core::Quantity>,
    #[command(flatten)]
    proxy: super::net::ProxyArgs,
    #[command(flatten)]
    dns: super::net::DnsArgs,
}

/// A whole, non-negative number of bytes (`10Gi`, `500Mi`, `1000000`).
fn parse_local_storage(s: &str) -> Result<orch_core::Quantity, String> {
    let q: orch_core::Quantity = s.parse().map_err(|e: orch_core::quantity::QuantityError| e.to_string())?;
    if q.is_negative() || q.nanos() % 1_000_000_000 != 0 {
        return Err(format!("{s:?}: must be a whole number of bytes >= 0, such as 10Gi"));
    }
    Ok(q)
}

/// A volume class the node provides besides `local`, and its provider.
type Provider = (String, Arc<dyn orch_core::VolumeProvider>);

/// The node's runtime, and the volume provider that comes with it (`docker` on the Docker
/// runtime, when `--docker-storage` gives its room).
async fn runtime(args: &AgentArgs, node: &str) -> Result<(Arc<dyn Runtime>, Option<Provider>), BoxError> {
    match args.runtime {
        RuntimeKind::Process => Ok((
            Arc::new(
                orch_runtime::ProcessRuntime::new(args.data_dir.join("instances"))
                    .map_err(|e| format!("process runtime under {}: {e}", args.data_dir.display()))?,
            ),
            None,
        )),
        #[cfg(feature = "docker")]
        RuntimeKind::Docker => {
            let docker = orch_runtime::DockerRuntime::new(orch_runtime::DockerConfig::new(node))
                .map_err(|e| format!("docker runtime: {e}"))?;
            let provider = match args.docker_storage {
                Some(room) => {
                    let state = args.data_dir.join("data").join("docker-volumes");
                    let volumes = orch_runtime::DockerVolumes::open(docker.clone(), state, room)
                        .await
                        .map_err(|e| format!("--docker-storage: docker volumes: {e}"))?;
                    Some(("docker".to_string(), Arc::new(volumes) as Arc<dyn orch_core::VolumeProvider>))
                }
                None => None,
            };
            Ok((Arc::new(docker), provider))
        }
        #[cfg(not(feature = "docker"))]
        RuntimeKind::Docker => {
            let _ = node;
            Err("--runtime docker needs orch built with the `docker` feature".into())
        }
    }
}

pub(crate) async fn run(args: AgentArgs) -> Result<(), BoxError> {
    if args.docker_storage.is_some() && !matches!(args.runtime, RuntimeKind::Docker) {
        return Err("--docker-storage: Docker volumes need --runtime docker".into());
    }
    let prometheus = metrics()?;
    let stop = on_signal();
    let node = args.name.clone().unwrap_or_else(host_name);
    let mut remote = RemoteStore::builder(args.server.clone());
    if let Some(t) = &args.join_token {
        remote = remote.bearer_token(t.clone());
    }
    let store: Arc<dyn Store> = Arc::new(remote.build()?);
    // The control plane may be starting too: wait for it a while, then give up saying why.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match store.current_revision().await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline && !*stop.borrow() => {
                tracing::warn!(server = %args.server, error = %e, "control plane not reachable yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cannot reach the control plane at {}: {e}", args.server).into()),
        }
    }

    let mut config = AgentConfig::new(node.clone());
    let mut labels = Labels::new();
    for l in &args.labels {
        let (k, v) = l.split_once('=').ok_or_else(|| format!("--labels: {l:?} is not key=value"))?;
        labels.insert(k, v);
    }
    config.labels = labels;
    config.data_root = args.data_dir.join("data");
    config.address = args.address;
    config.port_range = args.port_range.clone();
    config.pre_stop_delay = std::time::Duration::from_secs(args.pre_stop_delay);
    config.local_storage = args.local_storage;
    config.local_storage_enforcement = args.local_storage_enforce;
    let (runtime, provider) = runtime(&args, &node).await?;

    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let ops_task =
        args.ops_listen.map(|addr| tokio::spawn(serve_ops(addr, ops_routes(prometheus, ready), stop.clone())));
    let api_task = match args.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--listen: cannot listen on {addr}: {e}"))?;
            let bound = listener.local_addr()?;
            // Listening on every interface: the server reaches it at the node's `--address`.
            let url = args.advertise.clone().unwrap_or_else(|| {
                let ip = if bound.ip().is_unspecified() { args.address } else { bound.ip() };
                format!("http://{}", std::net::SocketAddr::new(ip, bound.port()))
            });
            let app = super::logs::agent_routes(
                node.clone(),
                args.server.clone(),
                store.clone(),
                runtime.clone(),
                config.data_root.clone(),
            )?;
            tokio::spawn(super::logs::publish_address(store.clone(), node.clone(), url.clone()));
            tracing::info!(%url, "serving the node's API (logs)");
            let stop = stop.clone();
            Some(tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped(stop)).await }))
        }
        None => None,
    };
    tracing::info!(node = %node, server = %args.server, runtime = ?args.runtime, "agent starting");
    let net = super::net::start(Some((&args.proxy, args.address)), &args.dns, store.clone(), stop.clone()).await?;
    ready_tx.send_replace(true);
    let mut agent = Agent::new(config, store, runtime);
    if let Some((class, provider)) = provider {
        agent = agent.with_volume_provider(class, provider);
    }
    agent.run(stopped(stop.clone()), args.drain).await?;
    net.wait().await?;
    if let Some(t) = ops_task {
        t.await??;
    }
    if let Some(t) = api_task {
        // Followed logs end when their instances stop; do not wait for slow readers.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_storage_is_a_whole_number_of_bytes() {
        assert_eq!(super::parse_local_storage("10Gi").unwrap(), orch_core::Quantity::from_bytes(10 << 30));
        assert!(super::parse_local_storage("-1Gi").unwrap_err().contains("whole number of bytes >= 0"));
        assert!(super::parse_local_storage("1.5").unwrap_err().contains("whole number of bytes"));
        assert!(super::parse_local_storage("ten").unwrap_err().contains("invalid quantity"));
    }

    #[test]
    fn local_storage_enforce_is_auto_unless_told() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            agent: super::AgentArgs,
        }
        let parse =
            |extra: &[&str]| Cli::try_parse_from([&["orch", "--server", "http://127.0.0.1:7440"], extra].concat());
        let enforce = |extra: &[&str]| parse(extra).map(|c| c.agent.local_storage_enforce);
        assert_eq!(enforce(&[]).unwrap(), orch_runtime::Enforcement::Auto);
        assert_eq!(enforce(&["--local-storage-enforce", "required"]).unwrap(), orch_runtime::Enforcement::Required);
        assert_eq!(enforce(&["--local-storage-enforce", "off"]).unwrap(), orch_runtime::Enforcement::Off);
        let err = parse(&["--local-storage-enforce", "maybe"]).err().unwrap().to_string();
        assert!(err.contains("must be auto, required or off"), "{err}");
    }
}
