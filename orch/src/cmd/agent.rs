//! `orch agent`: a node, speaking to a control plane through `RemoteStore`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orch_core::{Clock, Labels, Runtime, Store, SystemClock};
use orch_runtime::{Agent, AgentConfig};
use orch_store::api::pki::{self, CertificateIdentity};
use orch_store::api::{AgentServerCert, RemoteStore, ca_digest, discover_ca, split_join_token};
use tokio::sync::watch;

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
#[command(after_help = "Joining an https server: the agent presents the join token (`orch token create
--join` on the server) once, with a signing request for a key it makes, and keeps the node
certificate it gets in <data-dir>/pki (node.crt, node.key); it authenticates with it from then
on, renews it at two thirds of its life, and needs no token to restart. The token pins the
cluster CA (`.sha256-<digest>` at its end): the agent trusts the CA the server sends only if it
matches, and keeps it in <data-dir>/pki/ca.crt; `--ca` (the server's ca.crt) may be given
instead, and must then be the pinned one. Against a plain http server (--insecure-http) the token
is a bearer token (`orch token create --group system:nodes`).

Examples:
  orch agent --server https://10.0.0.1:7440 --join-token \"$JOIN_TOKEN\" --listen 0.0.0.0:7441
  orch --ca ca.crt agent --server https://10.0.0.1:7440 --name node-2 --labels zone=b --runtime docker")]
pub(crate) struct AgentArgs {
    /// The control plane's API (`https://host:7440`).
    #[arg(long)]
    server: String,
    /// The join token this node presents once to get its certificate (over plain http: the
    /// bearer token it presents with every call).
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
            let mut config = orch_runtime::DockerConfig::new(node);
            // Containers find services by name through the cluster DNS, when they can reach it.
            config.dns = args.dns.for_containers();
            let docker = orch_runtime::DockerRuntime::new(config).map_err(|e| format!("docker runtime: {e}"))?;
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

/// Where the node keeps its certificate and key.
fn pki_dir(args: &AgentArgs) -> PathBuf {
    args.data_dir.join("pki")
}

/// The node's certificate and key from an earlier join, if they are still good for this node.
fn stored_identity(dir: &Path, node: &str) -> Option<(String, String)> {
    let cert = std::fs::read_to_string(dir.join("node.crt")).ok()?;
    let key = std::fs::read_to_string(dir.join("node.key")).ok()?;
    let id = CertificateIdentity::from_pem(&cert).ok()?;
    let fresh = id.not_after > SystemClock.now();
    (fresh && id.node() == Some(node)).then_some((cert, key))
}

#[derive(serde::Deserialize)]
struct SignedAnswer {
    certificate: String,
}

/// Presents the join token once, with a signing request for a new key; keeps what comes back.
async fn join(server: &RemoteStore, dir: &Path, node: &str, token: &str) -> Result<(String, String), orch_core::Error> {
    let (csr, key) = pki::node_csr(node)?;
    let body = serde_json::json!({"token": token, "node": node, "csr": csr});
    let answer = server.raw("POST", "/orch/v1/join", Some(body.to_string().into_bytes())).await?;
    let signed: SignedAnswer = serde_json::from_slice(&answer).map_err(|e| orch_core::Error::Unavailable {
        message: "the server's join answer cannot be read".into(),
        source: Some(Box::new(e)),
    })?;
    pki::write_pair(dir, "node", &signed.certificate, &key)?;
    Ok((signed.certificate, key))
}

/// Renews the node's certificate over its authenticated connection, then presents the new one.
async fn renew(
    store: &RemoteStore,
    served: &AgentServerCert,
    dir: &Path,
    node: &str,
) -> Result<CertificateIdentity, orch_core::Error> {
    let (csr, key) = pki::node_csr(node)?;
    let body = serde_json::json!({"csr": csr});
    let answer = store.raw("POST", "/orch/v1/certificates/renew", Some(body.to_string().into_bytes())).await?;
    let signed: SignedAnswer = serde_json::from_slice(&answer).map_err(|e| orch_core::Error::Unavailable {
        message: "the server's renewal answer cannot be read".into(),
        source: Some(Box::new(e)),
    })?;
    pki::write_pair(dir, "node", &signed.certificate, &key)?;
    store.set_client_identity(signed.certificate.as_bytes(), key.as_bytes())?;
    served.replace(&signed.certificate, &key)?;
    CertificateIdentity::from_pem(&signed.certificate)
}

/// Renews the certificate when two thirds of its remaining life have passed, until `stop`.
async fn keep_renewed(
    store: RemoteStore,
    served: Arc<AgentServerCert>,
    dir: PathBuf,
    node: String,
    mut current: CertificateIdentity,
    mut stop: watch::Receiver<bool>,
) {
    // After a failure, wait longer each time (a server away, or this node revoked).
    let mut backoff = Duration::from_millis(200);
    loop {
        let now = SystemClock.now();
        let left = current.not_after.since(now);
        let wait = left * 2 / 3;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match renew(&store, &served, &dir, &node).await {
            Ok(id) => {
                tracing::info!(serial = %id.serial, expires = %id.not_after.to_jiff(), "renewed the node certificate");
                current = id;
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot renew the node certificate");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The connection to the control plane with the node's credentials: over https its node
/// certificate (joining first when it has none), kept renewed; over plain http the token.
async fn connect(
    args: &AgentArgs,
    ca: Option<&Path>,
    node: &str,
    stop: &watch::Receiver<bool>,
) -> Result<(RemoteStore, Option<Vec<u8>>, Option<Arc<AgentServerCert>>), BoxError> {
    if !args.server.starts_with("https://") {
        if ca.is_some() {
            return Err(format!("--ca: the server {} is plain http; use its https:// URL", args.server).into());
        }
        let mut remote = RemoteStore::builder(args.server.clone());
        if let Some(t) = &args.join_token {
            remote = remote.bearer_token(t.clone());
        }
        return Ok((remote.build()?, None, None));
    }
    let dir = pki_dir(args);
    let (token, pin) = match args.join_token.as_deref() {
        Some(t) => {
            let (secret, pin) = split_join_token(t).map_err(|e| format!("--join-token: {e}"))?;
            (Some(secret), pin)
        }
        None => (None, None),
    };
    let ca_pem = cluster_ca(args, ca, &dir, pin.as_deref(), stop).await?;
    // A certificate from an earlier join, unless the server refuses it (revoked) and there is a
    // join token to join again with.
    let mut stored = stored_identity(&dir, node);
    if let (Some((cert, key)), Some(_)) = (&stored, token) {
        let probe = RemoteStore::builder(args.server.clone())
            .ca_pem(ca_pem.clone())
            .client_identity(cert.clone(), key.clone())
            .reconnect_for(Duration::ZERO)
            .build()?;
        if let Err(e) = probe.current_revision().await
            && e.to_string().contains("401")
        {
            tracing::warn!(error = %e, "the server refuses the node certificate of an earlier join; joining again");
            stored = None;
        }
    }
    let (cert, key) = match stored {
        Some(found) => {
            tracing::info!(path = %dir.display(), "using the node certificate from an earlier join");
            found
        }
        None => {
            let token = token.ok_or_else(|| {
                format!(
                    "node {node} has no certificate in {} yet: give --join-token (`orch token create --join` on the server)",
                    dir.display()
                )
            })?;
            let anonymous = RemoteStore::builder(args.server.clone()).ca_pem(ca_pem.clone()).build()?;
            // The control plane may be starting too: try a while; a refused token is final.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                match join(&anonymous, &dir, node, token).await {
                    Ok(pair) => {
                        tracing::info!(node = %node, "joined: got a node certificate");
                        break pair;
                    }
                    Err(e) if e.to_string().contains("401") || e.to_string().contains("400") => {
                        return Err(format!("cannot join {}: {e}", args.server).into());
                    }
                    Err(e) if tokio::time::Instant::now() < deadline && !*stop.borrow() => {
                        tracing::warn!(server = %args.server, error = %e, "cannot join yet; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(format!("cannot join {}: {e}", args.server).into()),
                }
            }
        }
    };
    let current = CertificateIdentity::from_pem(&cert)?;
    // The node's API (logs, exec) is served with the same certificate, renewed with it.
    let served = AgentServerCert::new(&cert, &key)?;
    let remote = RemoteStore::builder(args.server.clone()).ca_pem(ca_pem.clone()).client_identity(cert, key).build()?;
    tokio::spawn(keep_renewed(remote.clone(), served.clone(), dir, node.to_string(), current, stop.clone()));
    Ok((remote, Some(ca_pem), Some(served)))
}

/// The cluster CA to trust (PEM): `--ca`, which must be the CA the join token pins if it pins
/// one; else the CA the pinned token finds on the server (kept in `<pki>/ca.crt` for later
/// starts); else the one kept from an earlier join.
async fn cluster_ca(
    args: &AgentArgs,
    ca: Option<&Path>,
    dir: &Path,
    pin: Option<&str>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<u8>, BoxError> {
    let kept = dir.join("ca.crt");
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| format!("--ca {}: {e}", path.display()))?;
        if let Some(pin) = pin
            && ca_digest(&pem).map_err(|e| format!("--ca {}: {e}", path.display()))? != pin
        {
            return Err(format!("--ca {}: not the CA the join token pins (sha256 {pin})", path.display()).into());
        }
        return Ok(pem);
    }
    if let Some(pin) = pin {
        // The control plane may be starting too: try a while; a CA that does not match is final.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let pem = loop {
            match discover_ca(&args.server, pin).await {
                Ok(pem) => break pem,
                Err(e @ orch_core::Error::Unavailable { .. })
                    if tokio::time::Instant::now() < deadline && !*stop.borrow() =>
                {
                    tracing::warn!(server = %args.server, error = %e, "cannot reach the server for its CA yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(format!("--join-token: {e}").into()),
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::write(&kept, &pem).map_err(|e| format!("cannot keep the cluster CA in {}: {e}", kept.display()))?;
        tracing::info!(path = %kept.display(), sha256 = %pin, "trusting the cluster CA the join token pins");
        return Ok(pem.into_bytes());
    }
    std::fs::read(&kept).map_err(|_| {
        format!(
            "--ca: the server {} is https: give the cluster CA's certificate (its ca.crt), or a join token that pins \
             it (`orch token create --join`)",
            args.server
        )
        .into()
    })
}

pub(crate) async fn run(args: AgentArgs, ca: Option<PathBuf>) -> Result<(), BoxError> {
    if args.docker_storage.is_some() && !matches!(args.runtime, RuntimeKind::Docker) {
        return Err("--docker-storage: Docker volumes need --runtime docker".into());
    }
    let prometheus = metrics()?;
    let stop = on_signal();
    let node = args.name.clone().unwrap_or_else(host_name);
    let (remote, ca_pem, served) = connect(&args, ca.as_deref(), &node, &stop).await?;
    let store: Arc<dyn Store> = Arc::new(remote);
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
    let api_task =
        match args.listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("--listen: cannot listen on {addr}: {e}"))?;
                let bound = listener.local_addr()?;
                // Listening on every interface: the server reaches it at the node's `--address`.
                // Over https when the node has a certificate (it joined an https server).
                let scheme = if served.is_some() { "https" } else { "http" };
                let url = args.advertise.clone().unwrap_or_else(|| {
                    let ip = if bound.ip().is_unspecified() { args.address } else { bound.ip() };
                    format!("{scheme}://{}", std::net::SocketAddr::new(ip, bound.port()))
                });
                let app = super::logs::agent_routes(
                    node.clone(),
                    args.server.clone(),
                    ca_pem.clone(),
                    store.clone(),
                    runtime.clone(),
                    config.data_root.clone(),
                )?;
                tokio::spawn(super::logs::publish_address(store.clone(), node.clone(), url.clone()));
                tracing::info!(%url, "serving the node's API (logs, exec)");
                let stop = stop.clone();
                match &served {
                    Some(served) => {
                        let tls = served.server_config()?;
                        Some(tokio::spawn(orch_store::api::serve_tls(listener, app, tls, stopped(stop))))
                    }
                    None => Some(tokio::spawn(async move {
                        axum::serve(listener, app).with_graceful_shutdown(stopped(stop)).await
                    })),
                }
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
