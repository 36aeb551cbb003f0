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
use orch_store::api::{ApiServer, AuditLog, Authorizer, Limits, Rule, Tokens};

use super::{BoxError, host_name, metrics, on_signal, ops_routes, serve_ops, stopped};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch server --data-dir /var/lib/orch --listen 0.0.0.0:7440
  orch server --etcd http://10.0.0.1:2379,http://10.0.0.2:2379 --name cp-1    # replicated")]
pub(crate) struct ServerArgs {
    /// Address the API listens on (HTTP/1.1 and HTTP/2).
    #[arg(long, default_value = "127.0.0.1:7440")]
    listen: SocketAddr,
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
    /// 127/8, which every Linux node answers on without setup.
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
    let tokens_file = args.data_dir.join("tokens");
    if tokens_file.exists() {
        let tokens = Tokens::load(&tokens_file)?;
        // Agents (group system:nodes) may work on nodes, their leases and workloads; every other
        // user gets what the built-in roles give its groups; anonymous clients nothing.
        let rules = Authorizer::with_builtin_roles()
            .rule(Rule {
                subjects: vec!["group:system:nodes".into()],
                kinds: vec!["Node".into(), "NodeLease".into(), "Workload".into(), "Lease".into(), "Revision".into()],
                ..Rule::default()
            })
            // Their node proxies and DNS servers read services and where they are served.
            .rule(Rule {
                subjects: vec!["group:system:nodes".into()],
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                kinds: vec!["Service".into(), "EndpointSlice".into()],
                ..Rule::default()
            });
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
    let logs = super::logs::relay_routes(args.listen, store.clone());
    let app = api.router().merge(ops.clone()).merge(logs).into_make_service_with_connect_info::<SocketAddr>();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    // Small answers go out at once (Nagle's delay would add tens of milliseconds).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tracing::info!(addr = %args.listen, replica = %identity, "API server listening");
    let ops_task = args.ops_listen.map(|addr| tokio::spawn(serve_ops(addr, ops, stop.clone())));

    let net = super::net::start(None, &args.dns, store.clone(), stop.clone()).await?;
    let stop_for_api = stop.clone();
    let plane = tokio::spawn(manager.run(stopped(stop.clone())));
    let closer = api.clone();
    let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
        stopped(stop_for_api).await;
        // Open watches end now; calls in flight finish.
        closer.close();
    });
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
