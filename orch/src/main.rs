//! The `orch` command: `orch server` runs a control plane (the API server over the embedded
//! store or etcd, the scheduler, the node lifecycle controller, the workload controllers and the
//! garbage collector), `orch agent` runs a node
//! against it.

mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    cmd::init_logging(&cli.log);
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
            tracing::error!("{e}");
            eprintln!("orch: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
