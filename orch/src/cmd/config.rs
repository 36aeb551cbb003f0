//! `orch config`: the contexts of the config file (`ORCH_CONFIG`, default
//! `~/.config/orch/config.yaml`).

use super::BoxError;
use super::client::{Config, ConnArgs, Context, check_server, config_path, table};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Adds a context or changes one (only the fields given).
    /// (`--token`, `--ca`, `--cert` and `--namespace` set the context's token, CA file, client
    /// certificate file and namespace.)
    #[command(after_help = "Examples:
  orch config set-context local --server https://127.0.0.1:7440 --ca orch-data/ca.crt --namespace default
  orch config set-context prod --server https://10.0.0.5:7440 --ca prod-ca.crt --token \"$(cat prod.token)\"
  orch config set-context alice --server https://10.0.0.5:7440 --ca prod-ca.crt --cert alice/alice.crt")]
    SetContext {
        /// The context's name.
        name: String,
        /// The API server (`http://host:7440`).
        #[arg(long = "server")]
        server_url: Option<String>,
    },
    /// Makes a context the one used when none is named.
    #[command(after_help = "Example:\n  orch config use-context prod")]
    UseContext {
        /// The context's name.
        name: String,
    },
    /// Lists the contexts, the current one marked.
    #[command(after_help = "Example:\n  orch config get-contexts")]
    GetContexts,
    /// Prints the current context's name.
    #[command(after_help = "Example:\n  orch config current-context")]
    CurrentContext,
    /// Removes a context.
    #[command(after_help = "Example:\n  orch config delete-context old")]
    DeleteContext {
        /// The context's name.
        name: String,
    },
    /// Prints the config file (tokens hidden).
    #[command(after_help = "Example:\n  orch config view")]
    View,
}

pub(crate) fn run(conn: &ConnArgs, cmd: ConfigCommand) -> Result<(), BoxError> {
    let mut config = Config::load()?;
    match cmd {
        ConfigCommand::SetContext { name, server_url } => {
            let server_url = server_url.or_else(|| conn.server.clone());
            let (token_value, ns) = (conn.token.clone(), conn.namespace.clone());
            let absolute = |p: &std::path::Path| -> Result<String, BoxError> {
                let p = std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))?;
                if !p.exists() {
                    return Err(format!("{}: no such file", p.display()).into());
                }
                Ok(p.to_string_lossy().into_owned())
            };
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(format!("context name {name:?} must be one word").into());
            }
            let existing = config.contexts.iter().position(|c| c.name == name);
            let mut ctx = existing.map(|i| config.contexts[i].clone()).unwrap_or(Context {
                name: name.clone(),
                server: String::new(),
                ..Context::default()
            });
            if let Some(s) = server_url {
                ctx.server = s;
            }
            if let Some(ca) = &conn.ca {
                ctx.ca = Some(absolute(ca)?);
            }
            if let Some(cert) = &conn.cert {
                ctx.cert = Some(absolute(cert)?);
            }
            if ctx.server.is_empty() {
                return Err(format!("context {name:?} is new: give its --server").into());
            }
            check_server(&ctx.server, ctx.ca.as_deref(), &name)?;
            if let Some(t) = token_value {
                ctx.token = Some(t);
            }
            if let Some(n) = ns {
                ctx.namespace = Some(n);
            }
            match existing {
                Some(i) => config.contexts[i] = ctx,
                None => config.contexts.push(ctx),
            }
            if config.current_context.is_none() {
                config.current_context = Some(name.clone());
            }
            config.save()?;
            outln!(
                "context {name:?} {} in {}",
                if existing.is_some() { "changed" } else { "added" },
                config_path().display()
            );
        }
        ConfigCommand::UseContext { name } => {
            if config.find(&name).is_none() {
                return Err(format!("no context {name:?} in {}", config_path().display()).into());
            }
            config.current_context = Some(name.clone());
            config.save()?;
            outln!("switched to context {name:?}");
        }
        ConfigCommand::GetContexts => {
            let rows: Vec<Vec<String>> = config
                .contexts
                .iter()
                .map(|c| {
                    let mark = if config.current_context.as_deref() == Some(c.name.as_str()) { "*" } else { "" };
                    vec![
                        mark.into(),
                        c.name.clone(),
                        c.server.clone(),
                        c.namespace.clone().unwrap_or_else(|| "default".into()),
                        match (&c.token, &c.cert) {
                            (_, Some(_)) => "certificate".into(),
                            (Some(_), None) => "token".into(),
                            (None, None) => "none".into(),
                        },
                    ]
                })
                .collect();
            out!("{}", table(&["CURRENT", "NAME", "SERVER", "NAMESPACE", "AUTH"], &rows, true));
        }
        ConfigCommand::CurrentContext => match &config.current_context {
            Some(c) => outln!("{c}"),
            None => return Err(format!("no current context in {}", config_path().display()).into()),
        },
        ConfigCommand::DeleteContext { name } => {
            let before = config.contexts.len();
            config.contexts.retain(|c| c.name != name);
            if config.contexts.len() == before {
                return Err(format!("no context {name:?} in {}", config_path().display()).into());
            }
            if config.current_context.as_deref() == Some(name.as_str()) {
                config.current_context = None;
            }
            config.save()?;
            outln!("context {name:?} deleted");
        }
        ConfigCommand::View => {
            for c in &mut config.contexts {
                if c.token.is_some() {
                    c.token = Some("REDACTED".into());
                }
            }
            out!("{}", serde_saphyr::to_string(&config).map_err(|e| e.to_string())?);
        }
    }
    Ok(())
}
