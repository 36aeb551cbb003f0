//! `orch delete`: objects by name, by selector or by file, with the cascade choice.

use std::path::PathBuf;

use orch_core::{DeleteOptions, DeleteOutcome, LabelSelector, ListRequest, ObjectKey, Propagation, Selection};

use super::BoxError;
use super::client::{Client, ConnArgs, display_name, split_targets};

/// What happens to the objects a deleted object owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Cascade {
    /// The object goes now; the garbage collector deletes what it owned afterwards.
    Background,
    /// What it owns goes first; the object goes last.
    Foreground,
    /// What it owned stays, without an owner.
    Orphan,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch delete deployment web
  orch delete deploy/web deploy/api
  orch delete workloads -l app=web
  orch delete -f web.yaml
  orch delete deploy web --cascade=orphan    # keep its revisions and workloads")]
pub(crate) struct DeleteArgs {
    /// A kind, then names (or `kind/name`).
    targets: Vec<String>,
    /// Delete what these files name.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Delete every object of the kind whose labels match.
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// What happens to what the objects own.
    #[arg(long, value_enum, default_value = "background")]
    cascade: Cascade,
    /// Succeed when an object is not there.
    #[arg(long)]
    ignore_not_found: bool,
}

pub(crate) async fn run(conn: &ConnArgs, args: DeleteArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let mut keys: Vec<ObjectKey> = Vec::new();
    if !args.files.is_empty() {
        keys.extend(super::apply::read_files(&client, &args.files)?.into_iter().map(|m| m.object.key()));
    }
    if !args.targets.is_empty() {
        let (word, names) = split_targets(&args.targets)?;
        let kind = client.kind(&word)?.clone();
        let ns = client.ns_for(&kind.kind);
        if names.is_empty() {
            let Some(sel) = &args.selector else {
                return Err(format!("name the {} to delete, or select them with -l", kind.name).into());
            };
            let labels = LabelSelector::parse(sel).map_err(|e| format!("-l {sel:?}: {e}"))?;
            let mut s = Selection::kind(&kind.kind).with_labels(labels);
            if kind.namespaced {
                s = s.in_namespace(ns.clone());
            }
            keys.extend(client.store.list(&ListRequest::new(s)).await?.items.iter().map(|o| o.key()));
        } else {
            keys.extend(names.iter().map(|n| ObjectKey::new(&kind.kind, &ns, n)));
        }
    }
    if keys.is_empty() && args.targets.is_empty() && args.files.is_empty() {
        return Err("name what to delete: `orch delete KIND NAME`, `-l selector` or `-f FILE`".into());
    }
    let propagation = match args.cascade {
        Cascade::Background => Propagation::Background,
        Cascade::Foreground => Propagation::Foreground,
        Cascade::Orphan => Propagation::Orphan,
    };
    let mut missing = 0;
    for key in keys {
        let label = format!("{}/{}", key.kind.to_ascii_lowercase(), key.name);
        match client.store.delete(&key, &DeleteOptions::default().propagation(propagation)).await {
            Ok(DeleteOutcome::Deleted(o)) => outln!("{} deleted", display_name(&o)),
            Ok(DeleteOutcome::Pending(o)) => {
                outln!("{} deleting (waiting for finalizers: {})", display_name(&o), o.metadata.finalizers.join(", "))
            }
            Err(e) if e.is_not_found() && args.ignore_not_found => {}
            Err(e) if e.is_not_found() => {
                eprintln!("orch: {label} not found");
                missing += 1;
            }
            Err(e) => return Err(format!("{label}: {e}").into()),
        }
    }
    if missing > 0 { Err(Box::new(super::Exit(1))) } else { Ok(()) }
}
