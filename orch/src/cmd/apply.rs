//! `orch apply` and `orch diff`: make the cluster say what the files say.
//!
//! Apply is three-way, as kubectl's: each object keeps what it was last applied with (the
//! `orch.dev/last-applied` annotation), so a field the files stop naming is removed, while a
//! field nobody wrote in a file (replicas set by `orch scale`, `paused` set by `orch rollout
//! pause`) is left as it is.

use std::collections::BTreeSet;
use std::path::PathBuf;

use orch::manifest::{Manifest, Manifests, to_value};
use orch_core::{DeleteOptions, DynamicObject, ListRequest, ObjectKey, RawJson, Selection, WriteOptions};
use orch_store::api::wire;
use serde_json::Value;

use super::BoxError;
use super::client::{Client, ConnArgs, display_name};

/// The annotation holding what an object was last applied with.
pub(crate) const LAST_APPLIED: &str = "orch.dev/last-applied";

/// Where a dry run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DryRun {
    /// Nothing is sent: the files are read and checked here only.
    Client,
    /// The server checks every write (validation, admission) and stores nothing.
    Server,
    /// No dry run.
    None,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch apply -f web.yaml
  orch apply -f examples/manifests/            # every .yaml, .yml and .json file
  cat web.yaml | orch apply -f -
  orch apply -f web.yaml --dry-run=server      # checked by the server, nothing stored
  orch apply -f deploy/ --prune -l app=web     # also delete what the files no longer name")]
pub(crate) struct ApplyArgs {
    /// A file, a directory of them, or `-` for standard input (repeatable).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Check without changing anything: `client` (here only) or `server`.
    #[arg(long, value_enum, default_value = "none", default_missing_value = "client", num_args = 0..=1, require_equals = true)]
    dry_run: DryRun,
    /// Delete objects that were applied before, match `-l`, and that the files no longer name.
    #[arg(long, requires = "selector")]
    prune: bool,
    /// The label selector of the set `--prune` works on (`app=web`).
    #[arg(short = 'l', long)]
    selector: Option<String>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch diff -f web.yaml        # exit code 0: no change, 1: changes (shown), 2: error")]
pub(crate) struct DiffArgs {
    /// A file, a directory of them, or `-` for standard input.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
}

/// Reads the files with every kind the server serves (built-in ones strictly).
pub(crate) fn read_files(client: &Client, files: &[PathBuf]) -> Result<Vec<Manifest>, BoxError> {
    let mut m = Manifests::builtin().namespace(client.namespace.clone());
    for k in client.kinds() {
        let scope = if k.namespaced { orch_core::Scope::Namespaced } else { orch_core::Scope::Cluster };
        m.register_untyped(&k.kind, scope);
    }
    let mut out = Vec::new();
    for f in files {
        out.extend(m.read_path(f)?);
    }
    Ok(out)
}

/// Three-way merge: `new` wins, keys in `last` but not in `new` go, the rest of `live` stays.
fn merge3(live: &Value, last: Option<&Value>, new: &Value) -> Value {
    match (live, new) {
        (Value::Object(l), Value::Object(n)) => {
            let mut out = l.clone();
            for (k, nv) in n {
                let merged = merge3(l.get(k).unwrap_or(&Value::Null), last.and_then(|x| x.get(k)), nv);
                out.insert(k.clone(), merged);
            }
            if let Some(Value::Object(prev)) = last {
                for k in prev.keys() {
                    if !n.contains_key(k) {
                        out.remove(k);
                    }
                }
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

fn labels_value(l: &orch_core::Labels) -> Value {
    serde_json::to_value(l).unwrap_or_else(|_| Value::Object(Default::default()))
}

/// What applying `m` over `live` gives (`None`: create `m` as it is).
fn merged(m: &Manifest, live: Option<&DynamicObject>) -> Result<DynamicObject, BoxError> {
    let mut obj = m.object.clone();
    let last_applied = serde_json::to_string(&m.written)?;
    let Some(live) = live else {
        obj.metadata.annotations.insert(LAST_APPLIED, last_applied);
        return Ok(obj);
    };
    let last: Option<Value> = live.metadata.annotations.get(LAST_APPLIED).and_then(|t| serde_json::from_str(t).ok());
    let mut out = live.clone();
    let spec = merge3(&live.spec.to_value(), last.as_ref().map(|l| &l["spec"]), &m.written["spec"]);
    let manifests = Manifests::builtin();
    let spec = manifests.canonical_spec(&obj.kind, &spec).map_err(|e| {
        format!("{}: {}: merged with the live object, the spec does not read: {e}", m.file, display_name(&obj))
    })?;
    out.spec = RawJson::from_value(&spec);
    for key in ["labels", "annotations"] {
        let live_map = labels_value(if key == "labels" { &live.metadata.labels } else { &live.metadata.annotations });
        let merged = merge3(&live_map, last.as_ref().map(|l| &l["metadata"][key]), &m.written["metadata"][key]);
        let map: orch_core::Labels = serde_json::from_value(merged)?;
        if key == "labels" {
            out.metadata.labels = map;
        } else {
            out.metadata.annotations = map;
        }
    }
    out.metadata.annotations.insert(LAST_APPLIED, last_applied);
    // The status is the controllers'; an update of the spec leaves it alone.
    Ok(out)
}

enum Outcome {
    Created,
    Configured,
    Unchanged,
}

async fn apply_one(client: &Client, m: &Manifest, dry: DryRun) -> Result<Outcome, BoxError> {
    let key = m.object.key();
    // Controllers write the status often: a conflict means "read again and merge again".
    for _attempt in 0..10 {
        let live = match client.store.get(&key).await {
            Ok(o) => Some(o),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let obj = merged(m, live.as_deref())?;
        let mut to_write = obj.clone();
        to_write.status = RawJson::null();
        match (live, dry) {
            (None, DryRun::Client) => return Ok(Outcome::Created),
            (None, DryRun::Server) => {
                let path = format!("{}?dryRun=All", wire::collection_path(&key.kind, Some(&key.namespace)));
                client.remote.raw("POST", &path, Some(wire::object_json(&to_write).into_bytes())).await?;
                return Ok(Outcome::Created);
            }
            (None, DryRun::None) => match client.store.create(to_write, &WriteOptions::default()).await {
                Ok(_) => return Ok(Outcome::Created),
                Err(orch_core::Error::AlreadyExists(_)) => continue,
                Err(e) => return Err(e.into()),
            },
            (Some(live), _) => {
                if obj.spec == live.spec
                    && obj.metadata.labels == live.metadata.labels
                    && obj.metadata.annotations == live.metadata.annotations
                {
                    return Ok(Outcome::Unchanged);
                }
                match dry {
                    DryRun::Client => return Ok(Outcome::Configured),
                    DryRun::Server => {
                        let path = format!("{}?dryRun=All", wire::object_path(&key));
                        match client.remote.raw("PUT", &path, Some(wire::object_json(&obj).into_bytes())).await {
                            Ok(_) => return Ok(Outcome::Configured),
                            Err(e) if e.is_conflict() => continue,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    DryRun::None => match client.store.update(obj, &WriteOptions::default()).await {
                        Ok(_) => return Ok(Outcome::Configured),
                        Err(e) if e.is_conflict() => continue,
                        Err(e) => return Err(e.into()),
                    },
                }
            }
        }
    }
    Err(format!("{}: it kept changing under the apply (10 conflicts); try again", display_name(&m.object)).into())
}

fn dry_suffix(dry: DryRun) -> &'static str {
    match dry {
        DryRun::Client => " (dry run)",
        DryRun::Server => " (server dry run)",
        DryRun::None => "",
    }
}

pub(crate) async fn apply(conn: &ConnArgs, args: ApplyArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let manifests = read_files(&client, &args.files)?;
    let mut failed = 0;
    let mut applied = BTreeSet::new();
    for m in &manifests {
        applied.insert(m.object.key());
        match apply_one(&client, m, args.dry_run).await {
            Ok(o) => {
                let word = match o {
                    Outcome::Created => "created",
                    Outcome::Configured => "configured",
                    Outcome::Unchanged => "unchanged",
                };
                outln!("{} {word}{}", display_name(&m.object), dry_suffix(args.dry_run));
            }
            Err(e) => {
                failed += 1;
                eprintln!("orch: {}:{}: {}: {e}", m.file, m.line, display_name(&m.object));
            }
        }
    }
    if args.prune && failed == 0 {
        let selector = args.selector.as_deref().unwrap_or_default();
        prune(&client, selector, &applied, args.dry_run).await?;
    }
    if failed > 0 {
        return Err(format!("{failed} of {} objects were not applied", manifests.len()).into());
    }
    Ok(())
}

/// Deletes what was applied before (it has the annotation), matches `selector`, and is not in
/// `applied`; in the namespaces the files touch (or the client's).
async fn prune(client: &Client, selector: &str, applied: &BTreeSet<ObjectKey>, dry: DryRun) -> Result<(), BoxError> {
    let labels: orch_core::LabelSelector =
        orch_core::LabelSelector::parse(selector).map_err(|e| format!("-l {selector:?}: {e}"))?;
    let mut namespaces: BTreeSet<String> =
        applied.iter().map(|k| k.namespace.clone()).filter(|n| !n.is_empty()).collect();
    if namespaces.is_empty() {
        namespaces.insert(client.namespace.clone());
    }
    for k in client.kinds() {
        let scopes: Vec<Option<String>> =
            if k.namespaced { namespaces.iter().cloned().map(Some).collect() } else { vec![None] };
        for ns in scopes {
            let mut sel = Selection::kind(&k.kind).with_labels(labels.clone());
            if let Some(ns) = ns {
                sel = sel.in_namespace(ns);
            }
            let list = client.store.list(&ListRequest::new(sel)).await?;
            for obj in list.items {
                if !obj.metadata.annotations.contains_key(LAST_APPLIED) || applied.contains(&obj.key()) {
                    continue;
                }
                if dry == DryRun::None {
                    match client.store.delete(&obj.key(), &DeleteOptions::default()).await {
                        Ok(_) => {}
                        Err(e) if e.is_not_found() => continue,
                        Err(e) => return Err(e.into()),
                    }
                } else if dry == DryRun::Server {
                    let path = format!("{}?dryRun=All", wire::object_path(&obj.key()));
                    client.remote.raw("DELETE", &path, None).await?;
                }
                outln!("{} pruned{}", display_name(&obj), dry_suffix(dry));
            }
        }
    }
    Ok(())
}

/// The parts of an object a diff shows.
fn diff_view(obj: &DynamicObject) -> String {
    let mut v = to_value(obj);
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.retain(|k, _| matches!(k.as_str(), "name" | "namespace" | "labels" | "annotations"));
        if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove(LAST_APPLIED);
            if a.is_empty() {
                m.remove("annotations");
            }
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    serde_saphyr::to_string(&v).unwrap_or_default()
}

/// A line diff (longest common subsequence), `-` old, `+` new, ` ` both.
pub(crate) fn line_diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!("  {}", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", a[i]));
            i += 1;
        } else {
            out.push(format!("+ {}", b[j]));
            j += 1;
        }
    }
    out
}

pub(crate) async fn diff(conn: &ConnArgs, args: DiffArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let manifests = read_files(&client, &args.files)?;
    let mut changed = false;
    for m in &manifests {
        let live = match client.store.get(&m.object.key()).await {
            Ok(o) => Some(o),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let next = merged(m, live.as_deref())?;
        let old = live.as_deref().map(diff_view).unwrap_or_default();
        let new = diff_view(&next);
        if old == new {
            continue;
        }
        changed = true;
        let what = if live.is_some() { "changed" } else { "new" };
        outln!("--- {} ({what})", display_name(&m.object));
        for line in line_diff(&old, &new) {
            outln!("{line}");
        }
    }
    if changed { Err(Box::new(super::Exit(1))) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_three_way_merge_removes_what_the_files_dropped_and_keeps_what_nobody_wrote() {
        let live = json!({"replicas": 5, "paused": true, "template": {"a": 1, "b": 2}, "old": 1});
        let last = json!({"replicas": 3, "template": {"a": 1, "b": 2}, "old": 1});
        let new = json!({"replicas": 3, "template": {"a": 9}});
        let got = merge3(&live, Some(&last), &new);
        assert_eq!(got, json!({"replicas": 3, "paused": true, "template": {"a": 9}}));
        // Without a record of the last apply, nothing is removed.
        assert_eq!(merge3(&live, None, &json!({"replicas": 1}))["old"], 1);
    }

    #[test]
    fn a_line_diff_shows_removals_before_additions() {
        let d = line_diff("a\nb\nc\n", "a\nx\nc\nd\n");
        assert_eq!(d, ["  a", "- b", "+ x", "  c", "+ d"]);
    }
}
