//! What every command that talks to an API server shares: the config file and its contexts,
//! the connection, the names of kinds (from the server's discovery), and how output looks
//! (tables, ages, colours only on a terminal).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use orch_core::{DynamicObject, Store, Timestamp};
use orch_store::api::RemoteStore;
use serde::{Deserialize, Serialize};

use super::BoxError;

/// Connection flags, accepted by every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ConnArgs {
    /// The context of the config file to use (default: its current context). The config file
    /// is `$ORCH_CONFIG`, by default `~/.config/orch/config.yaml` (see `orch config`).
    #[arg(long, global = true, env = "ORCH_CONTEXT")]
    pub(crate) context: Option<String>,
    /// The API server (`https://host:7440`), overriding the context's (give it before the
    /// command: `orch --server URL get nodes`).
    #[arg(long, env = "ORCH_SERVER")]
    pub(crate) server: Option<String>,
    /// The cluster CA's certificate (the server's `<data-dir>/ca.crt`), overriding the
    /// context's: an https server whose certificate it did not sign is refused.
    #[arg(long, global = true, env = "ORCH_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// A client certificate (PEM) to authenticate with, instead of a token (`orch certs
    /// issue` makes one); its key is the file beside it ending in `.key`, or `--key`.
    #[arg(long, global = true, env = "ORCH_CERT")]
    pub(crate) cert: Option<PathBuf>,
    /// The client certificate's key (default: `--cert` with `.key` for `.crt`).
    #[arg(long, global = true, env = "ORCH_KEY", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// The bearer token, overriding the context's.
    #[arg(long, global = true, env = "ORCH_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// The namespace, overriding the context's (default `default`).
    #[arg(short = 'n', long, global = true)]
    pub(crate) namespace: Option<String>,
}

/// The config file: contexts, each a server, a token and a namespace.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Config {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current_context: Option<String>,
    #[serde(default)]
    pub(crate) contexts: Vec<Context>,
}

/// One cluster and who to be there.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Context {
    pub(crate) name: String,
    pub(crate) server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) namespace: Option<String>,
    /// The file of the cluster CA's certificate, trusted for an https server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca: Option<String>,
    /// The file of a client certificate to present (its key beside it, `.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cert: Option<String>,
}

/// `ORCH_CONFIG`, or `$XDG_CONFIG_HOME/orch/config.yaml`, or `~/.config/orch/config.yaml`.
pub(crate) fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ORCH_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("orch").join("config.yaml")
}

impl Config {
    /// Reads the config file; a missing file is an empty config.
    pub(crate) fn load() -> Result<Config, BoxError> {
        let path = config_path();
        match std::fs::read_to_string(&path) {
            Ok(text) if text.trim().is_empty() => Ok(Config::default()),
            Ok(text) => serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()).into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display()).into()),
        }
    }

    /// Writes the config file (only its owner may read it: it holds tokens).
    pub(crate) fn save(&self) -> Result<(), BoxError> {
        let path = config_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let text = serde_saphyr::to_string(self).map_err(|e| format!("cannot write the config: {e}"))?;
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        Ok(())
    }

    pub(crate) fn find(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }
}

/// Refuses a server URL and CA that cannot work together: https needs the CA to trust, plain
/// http has no use for one.
pub(crate) fn check_server(server: &str, ca: Option<&str>, context: &str) -> Result<(), BoxError> {
    if server.starts_with("https://") {
        if ca.is_none() {
            let context = if context.starts_with('(') { "NAME" } else { context };
            return Err(format!(
                "server {server:?}: https needs the cluster CA to trust: give --ca FILE (the server's <data-dir>/ca.crt) or set the context's (`orch config set-context {context} --ca FILE`)"
            )
            .into());
        }
        return Ok(());
    }
    if !server.starts_with("http://") {
        return Err(
            format!("server {server:?}: must be an https:// or http:// URL such as https://127.0.0.1:7440").into()
        );
    }
    if ca.is_some() {
        return Err(format!(
            "context {context:?}: `ca` is set, but the server {server:?} is plain http (started with --insecure-http): use its https:// URL"
        )
        .into());
    }
    Ok(())
}

/// Reads a file the connection needs, saying which and why not.
pub(crate) fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>, BoxError> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()).into())
}

/// The key file beside a certificate file: `alice.crt` -> `alice.key`.
pub(crate) fn key_beside(cert: &std::path::Path) -> PathBuf {
    cert.with_extension("key")
}

/// A connection to a server, with the namespace commands work in.
pub(crate) struct Client {
    pub(crate) remote: RemoteStore,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) namespace: String,
    kinds: Vec<KindName>,
}

/// How the server names one kind (its discovery entry).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KindName {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) singular_name: String,
    pub(crate) namespaced: bool,
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) short_names: Vec<String>,
}

impl Client {
    /// Connects as the flags and the config say, and reads the server's kinds.
    pub(crate) async fn connect(args: &ConnArgs) -> Result<Client, BoxError> {
        let config = Config::load()?;
        let context = match &args.context {
            Some(name) => Some(config.find(name).ok_or_else(|| {
                let names: Vec<&str> = config.contexts.iter().map(|c| c.name.as_str()).collect();
                format!(
                    "no context {name:?} in {} (contexts: {})",
                    config_path().display(),
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                )
            })?),
            None => config.current_context.as_deref().and_then(|n| config.find(n)),
        };
        let server = args
            .server
            .clone()
            .or_else(|| context.map(|c| c.server.clone()))
            .unwrap_or_else(|| "https://127.0.0.1:7440".into());
        let context_name = context.map_or("(flags)", |c| c.name.as_str());
        let ca = args.ca.clone().or_else(|| context.and_then(|c| c.ca.as_ref().map(PathBuf::from)));
        check_server(&server, ca.as_deref().and_then(|p| p.to_str()), context_name)?;
        let cert = args.cert.clone().or_else(|| context.and_then(|c| c.cert.as_ref().map(PathBuf::from)));
        let token = args.token.clone().or_else(|| context.and_then(|c| c.token.clone()));
        let namespace = args
            .namespace
            .clone()
            .or_else(|| context.and_then(|c| c.namespace.clone()))
            .unwrap_or_else(|| "default".into());
        let mut b = RemoteStore::builder(server.clone()).reconnect_for(std::time::Duration::from_secs(5));
        if let Some(t) = &token {
            b = b.bearer_token(t.clone());
        }
        if let Some(ca) = &ca {
            b = b.ca_pem(read_pem(ca, "--ca")?);
        }
        if let Some(cert) = &cert {
            let key = args.key.clone().unwrap_or_else(|| key_beside(cert));
            b = b.client_identity(read_pem(cert, "--cert")?, read_pem(&key, "--key")?);
        }
        let remote = b.build()?;
        #[derive(Deserialize)]
        struct List {
            resources: Vec<KindName>,
        }
        let body = remote
            .raw("GET", "/apis/orch.dev/v1", None)
            .await
            .map_err(|e| format!("cannot reach the API server at {server}: {e}"))?;
        let list: List = serde_json::from_slice(&body)?;
        let kinds = list.resources.into_iter().filter(|k| !k.name.contains('/')).collect();
        Ok(Client { store: Arc::new(remote.clone()), remote, namespace, kinds })
    }

    /// The kind a user's word names: plural, singular, short name or kind (any case).
    pub(crate) fn kind(&self, word: &str) -> Result<&KindName, BoxError> {
        let w = word.to_ascii_lowercase();
        self.kinds
            .iter()
            .find(|k| {
                k.name == w || k.singular_name == w || k.kind.to_ascii_lowercase() == w || k.short_names.contains(&w)
            })
            .ok_or_else(|| {
                let names: Vec<&str> = self.kinds.iter().map(|k| k.name.as_str()).collect();
                let hint = orch::manifest::suggest_name(&w, names.iter().copied())
                    .map(|s| format!("; did you mean {s:?}?"))
                    .unwrap_or_else(|| format!(" (the server serves: {})", names.join(", ")));
                format!("the server has no kind {word:?}{hint}").into()
            })
    }

    /// Every kind the server serves.
    pub(crate) fn kinds(&self) -> &[KindName] {
        &self.kinds
    }

    /// Whether a kind is namespaced (true for a kind the server does not list).
    pub(crate) fn namespaced(&self, kind: &str) -> bool {
        self.kinds.iter().find(|k| k.kind == kind).is_none_or(|k| k.namespaced)
    }

    /// The namespace for a kind: the client's for namespaced kinds, none for cluster ones.
    pub(crate) fn ns_for(&self, kind: &str) -> String {
        if self.namespaced(kind) { self.namespace.clone() } else { String::new() }
    }
}

/// Splits `kind/name` or (`kind`, `name`) arguments into a kind word and names.
pub(crate) fn split_targets(args: &[String]) -> Result<(String, Vec<String>), BoxError> {
    let Some(first) = args.first() else {
        return Err("name a kind (and names): `deployment web` or `deployment/web`".into());
    };
    if let Some((kind, name)) = first.split_once('/') {
        let mut names = vec![name.to_string()];
        for a in &args[1..] {
            let (k, n) = a.split_once('/').ok_or_else(|| format!("{a:?}: write every target as kind/name"))?;
            if k != kind {
                return Err(format!("{a:?}: one kind at a time ({kind} first)").into());
            }
            names.push(n.to_string());
        }
        return Ok((kind.to_string(), names));
    }
    Ok((first.clone(), args[1..].to_vec()))
}

/// `deployment/web`: how commands name an object in what they print.
pub(crate) fn display_name(obj: &DynamicObject) -> String {
    format!("{}/{}", obj.kind.to_ascii_lowercase(), obj.metadata.name)
}

/// Age as kubectl prints it: `45s`, `12m`, `3h`, `5d`.
pub(crate) fn age(since: Option<Timestamp>) -> String {
    let Some(t) = since else { return "<unknown>".into() };
    let now = orch_core::Clock::now(&orch_core::SystemClock);
    let s = now.since(t).as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Whether output may carry colours: a terminal, and `NO_COLOR` unset.
pub(crate) fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Text in bold (on a terminal).
pub(crate) fn bold(s: &str) -> String {
    if colour() { format!("\x1b[1m{s}\x1b[0m") } else { s.to_string() }
}

/// Text in yellow (on a terminal), for warnings.
pub(crate) fn yellow(s: &str) -> String {
    if colour() { format!("\x1b[33m{s}\x1b[0m") } else { s.to_string() }
}

/// Rows as aligned columns, three spaces apart, as kubectl prints them.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>], with_header: bool) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = String::new();
    if with_header {
        out.push_str(&line(header.to_vec()));
    }
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `a=b,c=d`, or `<none>`.
pub(crate) fn map_text(m: &BTreeMap<String, String>) -> String {
    if m.is_empty() { "<none>".into() } else { m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",") }
}
