//! `orch token create`, `list`, `revoke`: bearer tokens for users (kept in the store through the
//! API, or in the server's token file), and short-lived join tokens for nodes; only their hashes
//! are kept.

use std::io::Write;
use std::path::PathBuf;

use orch_core::{Clock, SystemClock};
use orch_store::api::bearer;
use orch_store::api::{JoinTokens, Tokens};

use super::BoxError;
use super::client::{Client, ConnArgs};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Creates a token and prints it (only once: only its hash is kept). A user's token is kept
    /// in the store through the API (as an admin: the connection flags or the current context),
    /// accepted by every server replica at once and until revoked or expired; with
    /// `--data-dir`, it goes to `<data-dir>/tokens` instead, read when the server starts (how
    /// the first admin gets a token). A join token (`--join`) goes to `<data-dir>/join-tokens`,
    /// read at each join, good for any number of nodes until it expires.
    #[command(after_help = "Examples:
  orch token create --data-dir /var/lib/orch --user alice --group system:admins   # the first admin, before the server starts
  orch token create --user bob --group system:readers --ttl 30d                   # through the API, as an admin
  orch token create --data-dir /var/lib/orch --join --ttl 1h          # for `orch agent --join-token`
  orch token create --user node-1 --group system:nodes   # a node of an --insecure-http server")]
    Create {
        /// The server's data directory: write the token there instead of the store.
        #[arg(long, required_if_eq("join", "true"))]
        data_dir: Option<PathBuf>,
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
        /// How long the token is good (`30m`, `1h`, `7d`): a join token 1h unless given; a
        /// user's token kept in the store for good unless given (not with `--data-dir`).
        #[arg(long, value_parser = super::server::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Lists the tokens kept in the store: id, user, groups, expiry (never the tokens).
    #[command(after_help = "Example:\n  orch token list")]
    List,
    /// Revokes tokens kept in the store: refused from the next request on (other server
    /// replicas see it within milliseconds), and the watches opened with them end. (A token of the data directory's file is
    /// revoked by removing its line and restarting the server.)
    #[command(after_help = "Examples:
  orch token revoke 3f9c0a...      # by the id `orch token list` shows
  orch token revoke --user bob     # every token of a user")]
    Revoke {
        /// The token's id (or the token itself).
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        id: Option<String>,
        /// Every token of this user.
        #[arg(long)]
        user: Option<String>,
    },
}

pub(crate) async fn run(conn: &ConnArgs, cmd: TokenCommand) -> Result<(), BoxError> {
    match cmd {
        TokenCommand::Create { data_dir: Some(data_dir), join: true, ttl, .. } => {
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", data_dir.display()))?;
            let expiry = SystemClock.now().plus(ttl.unwrap_or(std::time::Duration::from_secs(3600)));
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
        TokenCommand::Create { join: true, .. } => Err("--join: give the server's --data-dir".into()),
        TokenCommand::Create { data_dir, user, group, ttl, .. } => {
            let user = user.unwrap_or_default();
            if user.is_empty() || user.contains(char::is_whitespace) {
                return Err(format!("--user: {user:?} must be one word").into());
            }
            let Some(data_dir) = data_dir else {
                let client = Client::connect(conn).await?;
                let now = SystemClock.now();
                let made = bearer::create_token(&*client.store, &user, &group, ttl.map(|t| now.plus(t)), now).await?;
                eprintln!("token id {}", made.id);
                println!("{}", made.token);
                return Ok(());
            };
            if ttl.is_some() {
                return Err(
                    "--ttl: a token of the data directory's file does not expire; keep it in the store (no --data-dir)"
                        .into(),
                );
            }
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", data_dir.display()))?;
            let groups: Vec<&str> = group.iter().map(String::as_str).collect();
            let (token, line) = Tokens::generate(&user, &groups);
            append(&data_dir.join("tokens"), &line)?;
            println!("{token}");
            Ok(())
        }
        TokenCommand::List => {
            let client = Client::connect(conn).await?;
            let mut tokens = bearer::list_tokens(&*client.store).await?;
            tokens.sort_by(|a, b| (&a.1.user, &a.0).cmp(&(&b.1.user, &b.0)));
            if tokens.is_empty() {
                outln!("no token is kept in the store");
                return Ok(());
            }
            outln!("ID                                USER  GROUPS  EXPIRES");
            for (id, t) in tokens {
                let groups = if t.groups.is_empty() { "-".to_string() } else { t.groups.join(",") };
                let expires = t.expires.map_or("never".to_string(), |at| at.to_jiff().to_string());
                outln!("{id}  {}  {groups}  {expires}", t.user);
            }
            Ok(())
        }
        TokenCommand::Revoke { id, user } => {
            let client = Client::connect(conn).await?;
            match (id, user) {
                (Some(id), _) => {
                    if bearer::revoke_token(&*client.store, &id).await? {
                        outln!("revoked token {}", if id.starts_with("orch-") { bearer::token_id(&id) } else { id });
                        Ok(())
                    } else {
                        Err(format!("no token {id:?} is kept in the store (`orch token list` shows them)").into())
                    }
                }
                (None, Some(user)) => {
                    let ids = bearer::revoke_user(&*client.store, &user).await?;
                    if ids.is_empty() {
                        outln!("user {user:?} has no token kept in the store");
                    } else {
                        outln!("revoked {} token(s) of user {user:?}: {}", ids.len(), ids.join(", "));
                    }
                    Ok(())
                }
                (None, None) => Err("name the token (its id) or --user".into()),
            }
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
