//! The `orch` command: `orch server` runs a control plane (the API server over the embedded
//! store or etcd, the scheduler, the node lifecycle controller, the workload controllers and the
//! garbage collector), `orch agent` runs a node against it, and the other commands (`apply`,
//! `get`, `describe`, `rollout`...) drive a control plane through its API.

mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    // The command line logs only warnings unless asked: its output is for people and scripts.
    let default_filter = if cli.is_daemon() || cli.log != "info" { cli.log.clone() } else { "warn".into() };
    cmd::init_logging(&default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("orch: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cmd::run(cli));
    // Everything that had to finish has: do not wait for idle blocking threads.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(cmd::Exit(code)) = e.downcast_ref::<cmd::Exit>() {
                return std::process::ExitCode::from(*code);
            }
            eprintln!("orch: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
