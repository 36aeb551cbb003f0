//! `orch token create`: a new bearer token for a user, or a short-lived join token for nodes;
//! only their hashes are kept.

use std::io::Write;
use std::path::PathBuf;

use orch_core::{Clock, SystemClock};
use orch_store::api::{JoinTokens, Tokens};

use super::BoxError;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Creates a token, adds its hash to the server's data directory and prints the token
    /// (only once: it is not kept). A user's token goes to `<data-dir>/tokens`, read when the
    /// server starts; a join token (`--join`) to `<data-dir>/join-tokens`, read at each join,
    /// good for any number of nodes until it expires.
    #[command(after_help = "Examples:
  orch token create --data-dir /var/lib/orch --user alice --group system:admins
  orch token create --data-dir /var/lib/orch --join --ttl 1h          # for `orch agent --join-token`
  orch token create --data-dir /var/lib/orch --user node-1 --group system:nodes   # a node of an --insecure-http server")]
    Create {
        /// The server's data directory.
        #[arg(long, default_value = "orch-data")]
        data_dir: PathBuf,
        /// Who the token is for.
        #[arg(long, required_unless_present = "join", conflicts_with = "join")]
        user: Option<String>,
        /// Groups (comma-separated): `system:admins` may do everything, `system:readers` may read
        /// everything, `system:nodes` is for agents.
        #[arg(long, value_delimiter = ',', conflicts_with = "join")]
        group: Vec<String>,
        /// A join token for nodes: presented once by `orch agent --join-token` for a node
        /// certificate. It pins the cluster CA of the data directory (`.sha256-<digest>` at its
        /// end; the CA is made there if the server has not made it yet), so a node needs no
        /// `--ca`.
        #[arg(long)]
        join: bool,
        /// How long the join token is good (`30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h", requires = "join", value_parser = super::server::parse_duration)]
        ttl: std::time::Duration,
    },
}

pub(crate) fn run(cmd: TokenCommand) -> Result<(), BoxError> {
    match cmd {
        TokenCommand::Create { data_dir, join: true, ttl, .. } => {
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", data_dir.display()))?;
            let expiry = SystemClock.now().plus(ttl);
            let (token, line) = JoinTokens::generate(expiry);
            // Pinned to the cluster CA, made here now if the server has not made it yet.
            let ca = orch_store::api::ClusterCa::load_or_create(&data_dir)
                .map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?;
            let token = orch_store::api::pinned_join_token(&token, ca.cert_pem().as_bytes())?;
            append(&data_dir.join("join-tokens"), &line)?;
            eprintln!("expires at {}", expiry.to_jiff());
            println!("{token}");
            Ok(())
        }
        TokenCommand::Create { data_dir, user, group, .. } => {
            let user = user.unwrap_or_default();
            if user.is_empty() || user.contains(char::is_whitespace) {
                return Err(format!("--user: {user:?} must be one word").into());
            }
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", data_dir.display()))?;
            let groups: Vec<&str> = group.iter().map(String::as_str).collect();
            let (token, line) = Tokens::generate(&user, &groups);
            append(&data_dir.join("tokens"), &line)?;
            println!("{token}");
            Ok(())
        }
    }
}

/// Appends a line to a file only its owner may read.
fn append(path: &std::path::Path, line: &str) -> Result<(), BoxError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    writeln!(f, "{line}").map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}
