//! `orch server`: the API server over the embedded store (or etcd), with the scheduler, the node
//! lifecycle controller, the workload controllers, the endpoints controller and the garbage
//! collector in a manager that elects a leader among replicas.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orch_controllers::{
    DaemonSetController, DeploymentController, EndpointsConfig, EndpointsController, GarbageCollector, JobController,
    NodeLifecycle, ReplicaSetController, StatefulSetController, VolumeBinder, WorkflowController,
};
use orch_core::controller::leader::LeaderElectionConfig;
use orch_core::{Manager, Store};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::api::auth::{ADMINS, READERS};
use orch_store::api::{ApiServer, AuditLog, Authorizer, ClusterCa, Limits, NodeJoin, Tokens};

use super::{BoxError, host_name, metrics, on_signal, ops_routes, serve_ops, stopped};

#[derive(Debug, clap::Args)]
#[command(after_help = "Serves https: on first start it creates the cluster CA in its data directory
(ca.crt, and ca.key readable by its owner only) and signs its own certificate with it at each
start, for the listen address, localhost, this host's name and every --tls-san. Clients trust
ca.crt (`orch --ca`); agents join with `orch token create --join`; users get certificates with
`orch certs issue` or tokens with `orch token create`.

Examples:
  orch server --data-dir /var/lib/orch --listen 0.0.0.0:7440 --tls-san cp.example.org,10.0.0.1
  orch server --etcd http://10.0.0.1:2379,http://10.0.0.2:2379 --name cp-1    # replicated (copy ca.crt and ca.key to each)
  orch server --insecure-http                                                 # plain http: tests, loopback")]
pub(crate) struct ServerArgs {
    /// Address the API listens on (HTTP/1.1 and HTTP/2).
    #[arg(long, default_value = "127.0.0.1:7440")]
    listen: SocketAddr,
    /// Serve plain http instead of https: no CA, no client certificates, no node join; tokens
    /// travel in clear. For tests and loopback only.
    #[arg(long)]
    insecure_http: bool,
    /// More names and addresses for the server's certificate (comma-separated), as clients
    /// reach it.
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// How long a node certificate is valid; agents renew theirs at two thirds of it
    /// (`30s`, `10m`, `24h`).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    node_cert_validity: Duration,
    /// Address of /metrics, /healthz and /readyz (also served on the API address).
    #[arg(long)]
    ops_listen: Option<SocketAddr>,
    /// Directory of the embedded store (`store.redb`); ignored with `--etcd`.
    #[arg(long, default_value = "orch-data")]
    data_dir: PathBuf,
    /// etcd endpoints, comma-separated: the state lives there, and replicas elect a leader.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix in etcd (several clusters can share one etcd).
    #[arg(long, default_value = "orch")]
    etcd_prefix: String,
    /// This replica's name in the leader election.
    #[arg(long)]
    name: Option<String>,
    /// Requests per second each client may make (no limit when unset).
    #[arg(long)]
    client_rate: Option<f64>,
    /// Requests each client may have in flight.
    #[arg(long, default_value_t = 512)]
    client_in_flight: usize,
    /// Watches each client may hold.
    #[arg(long, default_value_t = 20_000)]
    client_watches: usize,
    /// The block services' cluster addresses come from (IPv4 CIDR). The default lies in
    /// 127/8, which every Linux node answers on without setup, but which containers on a
    /// Docker bridge network cannot reach (it is their own loopback); a block outside it
    /// (`10.96.0.0/16`) is reached from them too, through node proxies that make each address
    /// local (CAP_NET_ADMIN).
    #[arg(long, default_value = orch_controllers::endpoints::DEFAULT_CLUSTER_RANGE, value_parser = parse_cidr)]
    cluster_address_range: orch_controllers::endpoints::AddressRange,
    /// The range node ports come from, `first-last`.
    #[arg(long, default_value = "30000-32767", value_parser = super::parse_port_range)]
    node_port_range: std::ops::RangeInclusive<u16>,
    /// The most endpoints one endpoint slice holds.
    #[arg(long, default_value_t = orch_core::kinds::DEFAULT_ENDPOINTS_PER_SLICE, value_parser = parse_per_slice)]
    endpoints_per_slice: usize,
    #[command(flatten)]
    dns: super::net::DnsArgs,
}

/// `90s`, `10m`, `24h`, `7d`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 90s, 10m, 24h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    if secs == 0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(Duration::from_secs(secs))
}

/// The names the server's certificate carries: the listen address (loopback when it listens
/// on every interface), localhost, this host's name, and `--tls-san`.
fn server_names(args: &ServerArgs) -> Vec<String> {
    let mut names = Vec::new();
    let ip = args.listen.ip();
    if ip.is_unspecified() {
        names.push("127.0.0.1".to_string());
    } else {
        names.push(ip.to_string());
    }
    names.push("localhost".into());
    names.push(host_name());
    names.extend(args.tls_san.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
}

fn parse_per_slice(s: &str) -> Result<usize, String> {
    s.parse::<usize>().ok().filter(|n| (1..=10_000).contains(n)).ok_or_else(|| format!("{s:?}: must be 1-10000"))
}

fn parse_cidr(s: &str) -> Result<orch_controllers::endpoints::AddressRange, String> {
    orch_controllers::endpoints::AddressRange::parse(s)
}

async fn open_store(args: &ServerArgs) -> Result<Arc<dyn Store>, BoxError> {
    if !args.etcd.is_empty() {
        #[cfg(feature = "etcd")]
        {
            let store = orch_store::EtcdStore::connect(args.etcd.clone(), args.etcd_prefix.clone())
                .await
                .map_err(|e| format!("cannot reach etcd at {}: {e}", args.etcd.join(",")))?;
            tracing::info!(endpoints = %args.etcd.join(","), prefix = %args.etcd_prefix, "store: etcd");
            return Ok(Arc::new(store));
        }
        #[cfg(not(feature = "etcd"))]
        return Err("--etcd needs orch built with the `etcd` feature".into());
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("cannot create the data directory {}: {e}", args.data_dir.display()))?;
    let path = args.data_dir.join("store.redb");
    let store = orch_store::RedbStore::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "store: embedded");
    Ok(Arc::new(store))
}

pub(crate) async fn run(args: ServerArgs) -> Result<(), BoxError> {
    let prometheus = metrics()?;
    let stop = on_signal();
    let store = open_store(&args).await?;

    let identity = args.name.clone().unwrap_or_else(host_name);
    let mut manager = Manager::new(store.clone());
    if !args.etcd.is_empty() {
        manager =
            manager.with_leader_election(LeaderElectionConfig::new("orch-system", "control-plane", identity.clone()));
    }
    // The scheduler places workloads where their volume claims' data lives; the binder provides
    // each claim's volume on the node of its first workload and reclaims it when the claim goes.
    manager.add(SchedulerService::with_volumes(Profile::default_profile(), manager.cache(), manager.cache()));
    manager.add(VolumeBinder::builder());
    manager.add(NodeLifecycle::builder(Default::default()));
    // The workload controllers and the garbage collector of owner references.
    manager.add(DeploymentController::builder());
    manager.add(ReplicaSetController::builder());
    manager.add(DaemonSetController::builder());
    manager.add(StatefulSetController::builder());
    manager.add(JobController::builder());
    manager.add(WorkflowController::builder());
    manager.add(GarbageCollector::builtin());
    // Services: their endpoints, cluster addresses and node ports.
    manager.add(EndpointsController::builder(EndpointsConfig {
        endpoints_per_slice: args.endpoints_per_slice,
        cluster_range: args.cluster_address_range,
        node_port_range: args.node_port_range.clone(),
    }));
    let ready = manager.readiness();

    let limits = Limits {
        requests_per_second: args.client_rate,
        max_in_flight_per_client: args.client_in_flight,
        max_watches_per_client: args.client_watches,
        ..Limits::default()
    };
    let mut api = ApiServer::builder(store.clone()).limits(limits);
    // The cluster CA, when serving https: agents serve their API (logs, exec) with node
    // certificates it signed.
    let mut agent_ca: Option<Vec<u8>> = None;
    let tls = if args.insecure_http {
        tracing::warn!(
            "--insecure-http: serving plain http; tokens travel in clear and nodes cannot join with certificates"
        );
        None
    } else {
        let ca = ClusterCa::load_or_create(&args.data_dir)
            .map_err(|e| format!("the cluster CA in {}: {e}", args.data_dir.display()))?;
        let names = server_names(&args);
        let cert = ca.server_certificate(&names).map_err(|e| format!("the server certificate: {e}"))?;
        let config = ca.server_config(&cert)?;
        agent_ca = Some(ca.cert_pem().as_bytes().to_vec());
        tracing::info!(names = %names.join(","), ca = %args.data_dir.join("ca.crt").display(), "serving https");
        api = api.node_join(
            NodeJoin::new(Arc::new(ca))
                .tokens_file(args.data_dir.join("join-tokens"))
                .validity(args.node_cert_validity),
        );
        Some(config)
    };
    let tokens_file = args.data_dir.join("tokens");
    if tokens_file.exists() || tls.is_some() {
        let tokens = if tokens_file.exists() { Tokens::load(&tokens_file)? } else { Tokens::new() };
        // Agents (`system:node:<name>` in system:nodes) get what the node authorizer gives:
        // their own node and lease, the status of their workloads, what they read. Every other
        // user gets what the built-in roles give its groups; anonymous clients nothing.
        let rules = Authorizer::with_builtin_roles();
        let audit_path = args.data_dir.join("audit.log");
        let audit = AuditLog::file(&audit_path).map_err(|e| format!("cannot open {}: {e}", audit_path.display()))?;
        tracing::info!(tokens = %tokens_file.display(), audit = %audit_path.display(), admins = ADMINS, readers = READERS, "authentication and authorization on");
        api = api.authentication(tokens).authorization(rules).audit(audit);
    } else {
        tracing::warn!(
            "no tokens file in the data directory: every client may do everything (create one with `orch token create`)"
        );
    }
    let api = api.build();
    let ops = ops_routes(prometheus, ready.clone());
    // `orch logs` goes through the server to the workload's agent.
    let logs = super::logs::relay_routes(api.clone(), store.clone(), agent_ca);
    let router = api.router().merge(ops.clone()).merge(logs);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(addr = %args.listen, replica = %identity, "API server listening");
    let ops_task = args.ops_listen.map(|addr| tokio::spawn(serve_ops(addr, ops, stop.clone())));

    let net = super::net::start(None, &args.dns, store.clone(), stop.clone()).await?;
    let stop_for_api = stop.clone();
    let plane = tokio::spawn(manager.run(stopped(stop.clone())));
    let closer = api.clone();
    let shutdown = async move {
        stopped(stop_for_api).await;
        // Open watches end now; calls in flight finish.
        closer.close();
    };
    let serving: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match tls {
        Some(config) => Box::pin(orch_store::api::serve_tls(listener, router, config, shutdown)),
        None => {
            // Small answers go out at once (Nagle's delay would add tens of milliseconds).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let app = router.into_make_service_with_connect_info::<SocketAddr>();
            Box::pin(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await })
        }
    };
    // A call that hangs past the grace period does not hold the stop.
    let result = tokio::select! {
        r = serving => r.map_err(BoxError::from),
        _ = async { stopped(stop.clone()).await; tokio::time::sleep(Duration::from_secs(10)).await } => Ok(()),
    };
    match plane.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("control plane: {e}").into()),
        Err(e) => return Err(format!("control plane task: {e}").into()),
    }
    if let Some(t) = ops_task {
        t.await??;
    }
    net.wait().await?;
    tracing::info!("stopped");
    result
}
