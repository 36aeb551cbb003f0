//! `orch token create`: a new bearer token for a user or a node; only its hash is kept.

use std::io::Write;
use std::path::PathBuf;

use orch_store::api::Tokens;

use super::BoxError;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Creates a token, adds its hash to `<data-dir>/tokens` and prints the token (only once:
    /// it is not kept). The server reads the file when it starts.
    #[command(after_help = "Examples:
  orch token create --data-dir /var/lib/orch --user alice --group system:admins
  orch token create --data-dir /var/lib/orch --user node-1 --group system:nodes")]
    Create {
        /// The server's data directory.
        #[arg(long, default_value = "orch-data")]
        data_dir: PathBuf,
        /// Who the token is for.
        #[arg(long)]
        user: String,
        /// Groups (comma-separated): `system:admins` may do everything, `system:readers` may read
        /// everything, `system:nodes` is for agents.
        #[arg(long, value_delimiter = ',')]
        group: Vec<String>,
    },
}

pub(crate) fn run(cmd: TokenCommand) -> Result<(), BoxError> {
    match cmd {
        TokenCommand::Create { data_dir, user, group } => {
            if user.is_empty() || user.contains(char::is_whitespace) {
                return Err(format!("--user: {user:?} must be one word").into());
            }
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", data_dir.display()))?;
            let groups: Vec<&str> = group.iter().map(String::as_str).collect();
            let (token, line) = Tokens::generate(&user, &groups);
            let path = data_dir.join("tokens");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            writeln!(f, "{line}").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("{token}");
            Ok(())
        }
    }
}
