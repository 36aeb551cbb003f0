//! `orch certs issue`: a client certificate of the cluster CA for a user; `orch certs revoke`
//! and `orch certs revoked`: shut a user's certificate out and list those shut out;
//! `orch node revoke`: shuts a node's certificates out.

use std::path::PathBuf;

use orch_store::api::pki;
use orch_store::api::revocation::{self, Revocation};
use orch_store::api::{CertificateIdentity, ClusterCa};

use super::BoxError;
use super::client::{Client, ConnArgs};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CertsCommand {
    /// Issues a client certificate for a user (`CN` = the user, `O` = the groups), signed by
    /// the cluster CA of a server's data directory; writes `<out>/<user>.crt` and
    /// `<out>/<user>.key` (readable by its owner only), and the CA as `<out>/ca.crt`.
    #[command(after_help = "Examples:
  orch certs issue --data-dir /var/lib/orch --user alice --group team-a --out alice/
  orch --ca alice/ca.crt --cert alice/alice.crt get workloads -n team-a")]
    Issue {
        /// The server's data directory (its `ca.crt` and `ca.key`).
        #[arg(long, default_value = "orch-data")]
        data_dir: PathBuf,
        /// The user (the certificate's `CN`).
        #[arg(long)]
        user: String,
        /// Groups (comma-separated; the certificate's `O`): `system:admins` may do everything,
        /// `system:readers` may read everything.
        #[arg(long, value_delimiter = ',')]
        group: Vec<String>,
        /// The directory to write to.
        #[arg(long)]
        out: PathBuf,
        /// How long it is valid (`30d`, `365d`).
        #[arg(long, default_value = "365d", value_parser = super::server::parse_duration)]
        validity: std::time::Duration,
    },
    /// Revokes a user's client certificate: every server replica refuses it from the next
    /// request on and ends the watches opened with it. Name the certificate by its file (the
    /// revocation is dropped once it expires) or by its serial (kept until deleted). A node's
    /// certificates are revoked with `orch node revoke`.
    #[command(after_help = "Examples:
  orch certs revoke alice/alice.crt
  orch certs revoke --serial 4f:1a:...:9c")]
    Revoke {
        /// The certificate's file (PEM).
        #[arg(value_name = "CERT_FILE", required_unless_present = "serial", conflicts_with = "serial")]
        file: Option<PathBuf>,
        /// The certificate's serial number, in hexadecimal (`0a1b...` or `0A:1B:...`).
        #[arg(long)]
        serial: Option<String>,
    },
    /// Lists the revoked client certificates: serial, user, and when the revocation is dropped.
    #[command(after_help = "Example:\n  orch certs revoked")]
    Revoked,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum NodeCommand {
    /// Revokes every certificate issued to a node: refused from the next request on (the record
    /// is in the store; other server replicas see it within milliseconds). The node may join again with a new join
    /// token.
    #[command(after_help = "Example:\n  orch node revoke node-3")]
    Revoke {
        /// The node.
        name: String,
    },
}

pub(crate) async fn certs(conn: &ConnArgs, cmd: CertsCommand) -> Result<(), BoxError> {
    match cmd {
        CertsCommand::Issue { data_dir, user, group, out, validity } => issue(data_dir, user, group, out, validity),
        CertsCommand::Revoke { file, serial } => revoke(conn, file, serial).await,
        CertsCommand::Revoked => revoked(conn).await,
    }
}

fn issue(
    data_dir: PathBuf,
    user: String,
    group: Vec<String>,
    out: PathBuf,
    validity: std::time::Duration,
) -> Result<(), BoxError> {
    let ca = ClusterCa::load(&data_dir).map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?;
    let groups: Vec<&str> = group.iter().map(String::as_str).collect();
    let issued = ca.client_certificate(&user, &groups, validity)?;
    let key = issued.key_pem.as_deref().expect("the CA made the key");
    let (cert_path, key_path) = pki::write_pair(&out, &user, &issued.cert_pem, key)?;
    std::fs::write(out.join("ca.crt"), ca.cert_pem()).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    outln!("{}", cert_path.display());
    outln!("{}", key_path.display());
    outln!("{}", out.join("ca.crt").display());
    outln!("serial {}", issued.serial);
    Ok(())
}

async fn revoke(conn: &ConnArgs, file: Option<PathBuf>, serial: Option<String>) -> Result<(), BoxError> {
    let (serial, record) = match (file, serial) {
        (Some(path), _) => {
            let pem = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let id = CertificateIdentity::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
            (id.serial, Revocation { user: Some(id.user.name), not_after: Some(id.not_after.as_millis()) })
        }
        (None, Some(serial)) => (serial, Revocation { user: None, not_after: None }),
        (None, None) => return Err("name the certificate: its file, or --serial".into()),
    };
    let client = Client::connect(conn).await?;
    let serial = revocation::normalize_serial(&serial)?;
    let who = record.user.as_deref().map(|u| format!(" of {u:?}")).unwrap_or_default();
    if revocation::revoke_certificate(&*client.store, &serial, record).await? {
        outln!("revoked the certificate{who} with serial {serial}");
    } else {
        outln!("the certificate{who} with serial {serial} was revoked already");
    }
    Ok(())
}

async fn revoked(conn: &ConnArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let list = revocation::revoked_certificates(&*client.store).await?;
    if list.is_empty() {
        outln!("no certificate is revoked");
        return Ok(());
    }
    let rows: Vec<[String; 3]> = list
        .into_iter()
        .map(|(serial, r)| {
            let until = match r.not_after {
                Some(ms) => orch_core::Timestamp(ms).to_string(),
                None => "kept until deleted".into(),
            };
            [serial, r.user.unwrap_or_else(|| "-".into()), until]
        })
        .collect();
    let width = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(6);
    let (w0, w1) = (width(0), width(1));
    outln!("{:w0$}  {:w1$}  DROPPED AT", "SERIAL", "USER");
    for [serial, user, until] in rows {
        outln!("{serial:w0$}  {user:w1$}  {until}");
    }
    Ok(())
}

pub(crate) async fn node(conn: &ConnArgs, cmd: NodeCommand) -> Result<(), BoxError> {
    let NodeCommand::Revoke { name } = cmd;
    pki::check_node_name(&name)?;
    let client = Client::connect(conn).await?;
    let serials = pki::revoke_node(&*client.store, &name).await?;
    if serials.is_empty() {
        outln!("node {name:?} has no live certificate; any it is issued later is not affected");
    } else {
        outln!("revoked {} certificate(s) of node {name:?}: {}", serials.len(), serials.join(", "));
    }
    Ok(())
}
