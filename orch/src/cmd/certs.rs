//! `orch certs issue`: a client certificate of the cluster CA for a user; `orch node revoke`:
//! shuts a node's certificates out.

use std::path::PathBuf;

use orch_store::api::ClusterCa;
use orch_store::api::pki;

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
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum NodeCommand {
    /// Revokes every certificate issued to a node: each server replica refuses them from the
    /// next request on (the record is in the store). The node may join again with a new join
    /// token.
    #[command(after_help = "Example:\n  orch node revoke node-3")]
    Revoke {
        /// The node.
        name: String,
    },
}

pub(crate) fn issue(cmd: CertsCommand) -> Result<(), BoxError> {
    let CertsCommand::Issue { data_dir, user, group, out, validity } = cmd;
    let ca = ClusterCa::load(&data_dir).map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?;
    let groups: Vec<&str> = group.iter().map(String::as_str).collect();
    let issued = ca.client_certificate(&user, &groups, validity)?;
    let key = issued.key_pem.as_deref().expect("the CA made the key");
    let (cert_path, key_path) = pki::write_pair(&out, &user, &issued.cert_pem, key)?;
    std::fs::write(out.join("ca.crt"), ca.cert_pem()).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    outln!("{}", cert_path.display());
    outln!("{}", key_path.display());
    outln!("{}", out.join("ca.crt").display());
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
