//! Subcommands and what they share: logging, metrics, health endpoints, signals, output.

/// Prints to standard output; when the reader has gone (`orch get ... | head -1`), the command
/// ends quietly with success instead of failing on a broken pipe.
macro_rules! out {
    ($($t:tt)*) => { $crate::cmd::write_out(format_args!($($t)*)) };
}

/// [`out!`] with a newline.
macro_rules! outln {
    () => { $crate::cmd::write_out(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cmd::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

mod agent;
mod apply;
mod certs;
mod client;
mod config;
mod delete;
mod describe;
mod exec;
mod get;
mod logs;
mod net;
mod nodes;
mod rollout;
mod server;
mod token;

use std::net::SocketAddr;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

/// orch: a container orchestrator's control plane, node agent and command line.
#[derive(Debug, Parser)]
#[command(
    name = "orch",
    version,
    about,
    after_help = "Examples:
  orch server --data-dir /var/lib/orch                                         # a control plane (https)
  orch --ca ca.crt agent --server https://10.0.0.1:7440 --join-token \"$JOIN\"   # a node
  orch apply -f examples/manifests/web.yaml
  orch get deployments
  orch rollout status deployment/web"
)]
pub(crate) struct Cli {
    /// Log filter (`info`, `orch_store=debug,info`…); `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub(crate) log: String,
    #[command(flatten)]
    conn: client::ConnArgs,
    #[command(subcommand)]
    command: Command,
}

/// Ends the command with this exit code and no further message (what it had to say is
/// printed already).
#[derive(Debug)]
pub(crate) struct Exit(pub(crate) u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for Exit {}

impl Cli {
    /// Whether the command serves (server, agent) rather than talks to a server: only those
    /// log to standard error by default.
    pub(crate) fn is_daemon(&self) -> bool {
        matches!(self.command, Command::Server(_) | Command::Agent(_))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a control plane: the API server, the scheduler, the node lifecycle controller, the
    /// workload controllers and the garbage collector.
    Server(server::ServerArgs),
    /// Runs a node agent against a control plane.
    Agent(agent::AgentArgs),
    /// Manages the bearer tokens of a server's users and its nodes' join tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Issues client certificates of a server's cluster CA, and revokes them.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Manages nodes' credentials.
    #[command(subcommand)]
    Node(certs::NodeCommand),
    /// Creates or updates the objects that files describe.
    Apply(apply::ApplyArgs),
    /// Shows what `apply` would change.
    Diff(apply::DiffArgs),
    /// Lists objects as tables, YAML, JSON or names; `-w` follows changes.
    Get(get::GetArgs),
    /// Shows one object in detail: spec, status, conditions, events, why it is pending.
    Describe(describe::DescribeArgs),
    /// Deletes objects.
    Delete(delete::DeleteArgs),
    /// Prints a workload's output (its node's agent reads it; the server relays it).
    Logs(logs::LogsArgs),
    /// Runs a command in a workload's container and prints its output (not interactive).
    Exec(exec::ExecArgs),
    /// Follows, lists, undoes, pauses, resumes and restarts deployments' rollouts.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Sets the replicas of a deployment (or anything with `spec.replicas`).
    Scale(rollout::ScaleArgs),
    /// Marks a node unschedulable: nothing new is placed on it.
    Cordon(nodes::NodeArgs),
    /// Marks a node schedulable again.
    Uncordon(nodes::NodeArgs),
    /// Cordons a node and evicts its workloads (but those of daemon sets), waiting until they
    /// are gone.
    Drain(nodes::DrainArgs),
    /// Shows nodes' requested resources against what they can allocate (requests, not
    /// measured use: orch has no metrics pipeline).
    #[command(subcommand)]
    Top(nodes::TopCommand),
    /// Manages the contexts of the config file.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Prints a shell completion script.
    #[command(after_help = "Examples:
  orch completion bash > /etc/bash_completion.d/orch
  orch completion zsh > \"${fpath[1]}/_orch\"
  orch completion fish > ~/.config/fish/completions/orch.fish")]
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Writes to standard output, ending the process quietly once nobody reads it.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("orch: cannot write the output: {e}");
        std::process::exit(1);
    }
}

pub(crate) fn init_logging(filter: &str) {
    // hickory-server logs every DNS query at `info`: quiet unless asked for by name.
    let filter = if filter.contains("hickory") { filter.to_string() } else { format!("{filter},hickory_server=warn") };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

pub(crate) async fn run(cli: Cli) -> Result<(), BoxError> {
    let conn = &cli.conn;
    match cli.command {
        Command::Server(args) => server::run(args).await,
        Command::Agent(args) => agent::run(args, conn.ca.clone()).await,
        Command::Token(cmd) => token::run(conn, cmd).await,
        Command::Certs(cmd) => certs::certs(conn, cmd).await,
        Command::Node(cmd) => certs::node(conn, cmd).await,
        Command::Apply(args) => apply::apply(conn, args).await,
        Command::Diff(args) => apply::diff(conn, args).await,
        Command::Get(args) => get::run(conn, args).await,
        Command::Describe(args) => describe::run(conn, args).await,
        Command::Delete(args) => delete::run(conn, args).await,
        Command::Logs(args) => logs::run(conn, args).await,
        Command::Exec(args) => exec::run(conn, args).await,
        Command::Rollout(cmd) => rollout::run(conn, cmd).await,
        Command::Scale(args) => rollout::scale(conn, args).await,
        Command::Cordon(args) => nodes::cordon(conn, args, true).await,
        Command::Uncordon(args) => nodes::cordon(conn, args, false).await,
        Command::Drain(args) => nodes::drain(conn, args).await,
        Command::Top(cmd) => nodes::top(conn, cmd).await,
        Command::Config(cmd) => config::run(conn, cmd),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "orch", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
    }
}

/// Installs the Prometheus recorder behind the `metrics` facade every crate of orch writes to.
pub(crate) fn metrics() -> Result<PrometheusHandle, BoxError> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

/// `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz` (`ready` says
/// whether it is ready: caches synced, store reached).
pub(crate) fn ops_routes(metrics: PrometheusHandle, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
                }
            }),
        )
}

/// Serves `app` on `addr` until `stop` turns true.
pub(crate) async fn serve_ops(addr: SocketAddr, app: Router, mut stop: watch::Receiver<bool>) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// Turns true on SIGTERM or SIGINT (Ctrl-C).
pub(crate) fn on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => futures::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        }
        tx.send_replace(true);
    });
    rx
}

/// Resolves once `stop` is true.
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// This machine's name, for node and replica identities.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_ascii_lowercase())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "orch".into())
}

/// Reads a port range written `first-last` (as the `--port-range` flags take it).
pub(crate) fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected first-last, e.g. 20000-29999"))?;
    let port = |p: &str| {
        p.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("{s:?}: {p:?} is not a port (1-65535)"))
    };
    let (a, b) = (port(a)?, port(b)?);
    if a > b {
        return Err(format!("{s:?}: the first port is above the last"));
    }
    Ok(a..=b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_ranges_parse_or_say_why_not() {
        assert_eq!(super::parse_port_range("20000-29999"), Ok(20000..=29999));
        assert!(super::parse_port_range("20000").unwrap_err().contains("first-last"));
        assert!(super::parse_port_range("0-10").unwrap_err().contains("not a port"));
        assert!(super::parse_port_range("10-70000").unwrap_err().contains("not a port"));
        assert!(super::parse_port_range("30-20").unwrap_err().contains("above the last"));
    }
}
