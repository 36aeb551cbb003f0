//! A small control plane on the in-memory store: nodes register, workloads are declared, and a
//! watch-driven placement loop binds each workload to the node with the most free CPU that fits
//! it, or marks it unschedulable with the reason, and retries when capacity frees up.
//!
//! Run it with `cargo run --release -p orch-examples --example control-plane`.
//!
//! (The node agent and runtimes that start the bound workloads come with the runtime work; this
//! example stops at placement.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use orch_core::kinds::{Condition, ConditionStatus, Node, Workload, resource, set_condition};
use orch_core::{Api, Clock, DeleteOptions, Event, ListParams, Object, ObjectMeta, Quantity, Store, SystemClock};
use orch_store::MemoryStore;

fn node(name: &str, cpu: &str, memory: &str) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(name).with_label("zone", "local"), Node::default());
    for (k, v) in [(resource::CPU, cpu), (resource::MEMORY, memory)] {
        let q: Quantity = v.parse().expect("a valid quantity");
        n.status.capacity.insert(k.into(), q);
        n.status.allocatable.insert(k.into(), q);
    }
    n
}

fn workload(name: &str, cpu: &str, memory: &str) -> Object<Workload> {
    let mut w = Workload::command("main", &["/bin/sleep", "3600"]);
    w.containers[0].resources.requests.insert(resource::CPU.into(), cpu.parse().expect("cpu"));
    w.containers[0].resources.requests.insert(resource::MEMORY.into(), memory.parse().expect("memory"));
    Object::new(ObjectMeta::named(name).with_label("app", "demo"), w)
}

/// Free allocatable resources per node, from the nodes and the workloads already bound.
fn free_resources(
    nodes: &[Object<Node>],
    workloads: &[Object<Workload>],
) -> BTreeMap<String, BTreeMap<String, Quantity>> {
    let mut free: BTreeMap<_, _> =
        nodes.iter().map(|n| (n.metadata.name.clone(), n.status.allocatable.clone())).collect();
    for w in workloads {
        if let Some(node) = w.spec.node_name.as_ref().and_then(|n| free.get_mut(n)) {
            for (res, q) in w.spec.requests() {
                let left = node.entry(res).or_default();
                *left = *left - q;
            }
        }
    }
    free
}

/// One pass of the placement loop: bind every pending workload that fits somewhere.
async fn place_pending(nodes: &Api<Node>, workloads: &Api<Workload>) -> orch_core::Result<()> {
    let node_list = nodes.list(&ListParams::default()).await?.items;
    let all = workloads.list(&ListParams::default()).await?.items;
    let mut free = free_resources(&node_list, &all);
    for w in all.into_iter().filter(|w| w.spec.node_name.is_none() && !w.metadata.is_being_deleted()) {
        let wants = w.spec.requests();
        let fits = |left: &BTreeMap<String, Quantity>| wants.iter().all(|(r, q)| left.get(r).is_some_and(|l| l >= q));
        let best = free
            .iter()
            .filter(|(_, left)| fits(left))
            .max_by_key(|(_, left)| left.get(resource::CPU).copied().unwrap_or_default())
            .map(|(name, _)| name.clone());
        match best {
            Some(node_name) => {
                let mut bound = w.clone();
                bound.spec.node_name = Some(node_name.clone());
                match workloads.replace(&bound).await {
                    Ok(b) => {
                        let left = free.get_mut(&node_name).expect("chosen from this map");
                        for (r, q) in &wants {
                            let l = left.entry(r.clone()).or_default();
                            *l = *l - *q;
                        }
                        let mut status = b.clone();
                        set_condition(
                            &mut status.status.conditions,
                            Condition::new("Scheduled", ConditionStatus::True, "Bound"),
                            SystemClock.now(),
                        );
                        workloads.replace_status(&status).await?;
                        println!("  bound {:<8} -> {node_name} (rev {})", w.metadata.name, b.metadata.resource_version);
                    }
                    // Someone changed it meanwhile: the watch brings the new version round again.
                    Err(e) if e.is_conflict() => {}
                    Err(e) => return Err(e),
                }
            }
            None => {
                let short: Vec<String> = wants
                    .iter()
                    .filter(|(r, q)| free.values().all(|left| left.get(*r).is_none_or(|l| l < *q)))
                    .map(|(r, _)| format!("insufficient {r}"))
                    .collect();
                let message = format!("0/{} nodes fit: {}", free.len(), short.join(", "));
                let mut status = w.clone();
                let mut c = Condition::new("Scheduled", ConditionStatus::False, "Unschedulable");
                c.message = message.clone();
                set_condition(&mut status.status.conditions, c, SystemClock.now());
                if status.status != w.status {
                    workloads.replace_status(&status).await?;
                    println!("  pending {:<6} {message}", w.metadata.name);
                }
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> orch_core::Result<()> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let nodes: Api<Node> = Api::all(store.clone());
    let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");

    println!("registering nodes");
    for n in [node("node-a", "4", "8Gi"), node("node-b", "2", "4Gi"), node("node-c", "2", "4Gi")] {
        let n = nodes.create(&n).await?;
        println!(
            "  node {} (cpu {}, memory {})",
            n.metadata.name, n.status.capacity["cpu"], n.status.capacity["memory"]
        );
    }

    // The placement loop: react to every workload event, re-evaluating pending work.
    let loop_api = (nodes.clone(), workloads.clone());
    let mut events = workloads.watch(&ListParams::default(), None).await?;
    let placer = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event? {
                Event::Added(_) | Event::Deleted(_) => place_pending(&loop_api.0, &loop_api.1).await?,
                Event::Modified(_) | Event::Progress(_) => {}
            }
        }
        Ok::<_, orch_core::Error>(())
    });

    println!("declaring workloads");
    for (name, cpu, mem) in
        [("web-1", "1500m", "1Gi"), ("web-2", "1500m", "1Gi"), ("db", "2", "3Gi"), ("batch", "3", "2Gi")]
    {
        workloads.create(&workload(name, cpu, mem)).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("bad input is refused with the field and the reason:");
    let mut bad = workload("huge", "-1", "1Gi");
    bad.spec.containers[0].ports.push(orch_core::kinds::ContainerPort { container_port: 70000, ..Default::default() });
    if let Err(e) = workloads.create(&bad).await {
        println!("  {e}");
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("deleting web-1 frees 1500m cpu on node-a; batch still needs 3 cpus on one node");
    workloads.delete("web-1", &DeleteOptions::default()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("deleting web-2 empties node-a; the pending batch fits there now");
    workloads.delete("web-2", &DeleteOptions::default()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    println!("final placement (store revision {}):", store.current_revision().await?);
    for w in workloads.list(&ListParams::default()).await?.items {
        let cond = w.status.conditions.iter().find(|c| c.type_ == "Scheduled");
        println!(
            "  {:<8} node={:<7} scheduled={:?}",
            w.metadata.name,
            w.spec.node_name.as_deref().unwrap_or("-"),
            cond.map(|c| c.status)
        );
    }
    placer.abort();
    Ok(())
}
