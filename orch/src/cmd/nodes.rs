//! `orch cordon`, `orch uncordon`, `orch drain` and `orch top nodes`.

use std::time::Duration;

use orch_core::kinds::{Node, Phase, Workload};
use orch_core::{Api, DeleteOptions, FieldSelector, ListParams, ListRequest, Object, Quantity, Selection};

use super::BoxError;
use super::client::{Client, ConnArgs, table};

#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  orch cordon node-1")]
pub(crate) struct NodeArgs {
    /// The node's name.
    node: String,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch drain node-1
  orch drain node-1 --force --timeout 2m    # also evict workloads no controller replaces")]
pub(crate) struct DrainArgs {
    /// The node's name.
    node: String,
    /// Also evict workloads that no controller owns (they are not replaced elsewhere).
    #[arg(long)]
    force: bool,
    /// Give up after this many seconds of waiting for the evicted workloads to go.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TopCommand {
    /// Each node's resources requested by the workloads placed on it, against what it can
    /// allocate. orch has no metrics pipeline: these are the scheduler's figures (requests),
    /// not measured use.
    #[command(after_help = "Example:\n  orch top nodes")]
    Nodes,
}

async fn set_unschedulable(client: &Client, node: &str, value: bool) -> Result<bool, BoxError> {
    let api: Api<Node> = Api::all(client.store.clone());
    let n = api.get(node).await?;
    if n.spec.unschedulable == value {
        return Ok(false);
    }
    api.retry_on_conflict(node, |n| {
        n.spec.unschedulable = value;
        Ok(())
    })
    .await?;
    Ok(true)
}

pub(crate) async fn cordon(conn: &ConnArgs, args: NodeArgs, value: bool) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let changed = set_unschedulable(&client, &args.node, value).await?;
    let word = if value { "cordoned" } else { "uncordoned" };
    if changed {
        outln!("node/{} {word}", args.node);
    } else {
        outln!("node/{} already {word}", args.node);
    }
    Ok(())
}

fn on_node(node: &str) -> Selection {
    Selection::kind("Workload").with_fields(FieldSelector::equals("spec.nodeName", node))
}

/// Workloads a drain evicts: not finished, not owned by a daemon set (those run on every node
/// by design and would come straight back).
fn evictable(w: &orch_core::DynamicObject) -> bool {
    let finished = matches!(w.status.to_value()["phase"].as_str(), Some("Succeeded" | "Failed"));
    !finished && w.metadata.controller_owner().is_none_or(|o| o.kind != "DaemonSet")
}

pub(crate) async fn drain(conn: &ConnArgs, args: DrainArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let api: Api<Node> = Api::all(client.store.clone());
    api.get(&args.node).await?;
    let list = client.store.list(&ListRequest::new(on_node(&args.node))).await?;
    let targets: Vec<_> = list.items.iter().filter(|w| evictable(w)).cloned().collect();
    let unowned: Vec<String> = targets
        .iter()
        .filter(|w| w.metadata.controller_owner().is_none())
        .map(|w| format!("{}/{}", w.metadata.namespace, w.metadata.name))
        .collect();
    if !unowned.is_empty() && !args.force {
        return Err(format!(
            "node/{}: these workloads have no controller to replace them elsewhere: {} (use --force to evict them anyway)",
            args.node,
            unowned.join(", ")
        )
        .into());
    }
    if set_unschedulable(&client, &args.node, true).await? {
        outln!("node/{} cordoned", args.node);
    }
    for w in &targets {
        match client.store.delete(&w.key(), &DeleteOptions::default()).await {
            Ok(_) => outln!("evicting workload/{} ({})", w.metadata.name, w.metadata.namespace),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let left: Vec<String> = client
            .store
            .list(&ListRequest::new(on_node(&args.node)))
            .await?
            .items
            .iter()
            .filter(|w| evictable(w))
            .map(|w| w.metadata.name.clone())
            .collect();
        if left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "node/{}: {} workloads still there after {}s: {}",
                args.node,
                left.len(),
                args.timeout,
                left.join(", ")
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    outln!("node/{} drained", args.node);
    Ok(())
}

fn pct(used: &Quantity, of: Option<&Quantity>) -> String {
    match of {
        Some(total) if total.nanos() > 0 => format!("{}%", used.nanos() * 100 / total.nanos()),
        _ => "-".into(),
    }
}

pub(crate) async fn top(conn: &ConnArgs, _cmd: TopCommand) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let nodes: Api<Node> = Api::all(client.store.clone());
    let mut nodes = nodes.list(&ListParams::default()).await?.items;
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let workloads: Api<Workload> = Api::all(client.store.clone());
    let all: Vec<Object<Workload>> = workloads.list(&ListParams::default()).await?.items;
    let mut rows = Vec::new();
    for n in &nodes {
        let mut cpu = Quantity::default();
        let mut mem = Quantity::default();
        for w in all.iter().filter(|w| {
            w.spec.node_name.as_deref() == Some(n.metadata.name.as_str())
                && !matches!(w.status.phase, Phase::Succeeded | Phase::Failed)
        }) {
            for c in &w.spec.containers {
                if let Some(q) = c.resources.requests.get("cpu") {
                    cpu = cpu + *q;
                }
                if let Some(q) = c.resources.requests.get("memory") {
                    mem = mem + *q;
                }
            }
        }
        let alloc = &n.status.allocatable;
        rows.push(vec![
            n.metadata.name.clone(),
            cpu.to_string(),
            alloc.get("cpu").map(|q| q.to_string()).unwrap_or_else(|| "-".into()),
            pct(&cpu, alloc.get("cpu")),
            mem.to_string(),
            alloc.get("memory").map(|q| q.to_string()).unwrap_or_else(|| "-".into()),
            pct(&mem, alloc.get("memory")),
        ]);
    }
    out!(
        "{}",
        table(
            &[
                "NAME",
                "CPU(REQUESTS)",
                "CPU(ALLOCATABLE)",
                "CPU%",
                "MEMORY(REQUESTS)",
                "MEMORY(ALLOCATABLE)",
                "MEMORY%"
            ],
            &rows,
            true
        )
    );
    Ok(())
}
