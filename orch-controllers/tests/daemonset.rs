//! The daemon set controller: one workload per matching node (node selector, tolerations),
//! following nodes as they come and go, and a rolling update within its bound on simulated
//! nodes (memory and embedded stores).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use orch_controllers::DaemonSetController;
use orch_core::kinds::{
    DaemonSet, Node, Taint, TaintEffect, Toleration, TolerationOperator, Workload, WorkloadTemplate,
};
use orch_core::{Api, LabelSelector, ListParams, Manager, Object, ObjectMeta, Store, Timestamp, TokioClock, testkit};

const LIMIT: Duration = Duration::from_secs(3600);

fn logs(spec: Workload) -> DaemonSet {
    DaemonSet {
        selector: LabelSelector::from_labels([("app", "logs")]),
        template: WorkloadTemplate::new([("app", "logs")].into(), spec),
        ..Default::default()
    }
}

async fn placed(store: &Arc<dyn Store>) -> Vec<String> {
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut nodes: Vec<String> =
        api.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|w| w.spec.node_name).collect();
    nodes.sort();
    nodes
}

async fn wait_placed(store: &Arc<dyn Store>, want: &[&str]) {
    testkit::wait_until(&format!("workloads on {want:?}"), LIMIT, async || (placed(store).await == want).then_some(()))
        .await;
}

#[tokio::test(start_paused = true)]
async fn one_workload_per_matching_node_following_nodes() {
    for backend in BACKENDS {
        let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
        let store = common::store(backend, "ds-nodes", clock.clone());
        let nodes: Api<Node> = Api::all(store.clone());
        let node =
            |name: &str, role: &str| Object::new(ObjectMeta::named(name).with_label("role", role), Node::default());
        nodes.create(&node("a", "edge")).await.unwrap();
        nodes.create(&node("b", "core")).await.unwrap();
        let mut tainted = node("c", "edge");
        tainted.spec.taints = vec![Taint {
            key: "dedicated".into(),
            value: "ingress".into(),
            effect: TaintEffect::NoSchedule,
            time_added: None,
        }];
        nodes.create(&tainted).await.unwrap();
        let mut manager = Manager::new(store.clone()).with_clock(clock);
        manager.add(DaemonSetController::builder());
        let running = tokio::spawn(manager.run(std::future::pending()));
        let mut spec = Workload::command("agent", &["ship-logs"]);
        spec.node_selector.insert("role", "edge");
        let api: Api<DaemonSet> = Api::namespaced(store.clone(), "default");
        api.create(&Object::new(ObjectMeta::named("logs"), logs(spec))).await.unwrap();
        wait_placed(&store, &["a"]).await;
        // Tolerating the taint admits the tainted node.
        api.retry_on_conflict("logs", |d| {
            d.spec.template.spec.tolerations = vec![Toleration {
                key: "dedicated".into(),
                operator: TolerationOperator::Exists,
                ..Default::default()
            }];
            Ok(())
        })
        .await
        .unwrap();
        wait_placed(&store, &["a", "c"]).await;
        // A node that joins gets one; one that leaves loses it.
        nodes.create(&node("d", "edge")).await.unwrap();
        wait_placed(&store, &["a", "c", "d"]).await;
        nodes.delete("a", &Default::default()).await.unwrap();
        wait_placed(&store, &["c", "d"]).await;
        let ds = testkit::wait_until("status", LIMIT, async || {
            let d = api.get("logs").await.ok()?;
            (d.status.desired_number_scheduled == 2 && d.status.current_number_scheduled == 2).then_some(d)
        })
        .await;
        assert_eq!(ds.status.number_misscheduled, 0, "({backend:?})");
        running.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_template_change_rolls_out_node_by_node() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "ds-rolling", 4, vec![with(DaemonSetController::builder)]).await;
        let api: Api<DaemonSet> = Api::namespaced(plane.store.clone(), "default");
        api.create(&Object::new(ObjectMeta::named("logs"), logs(service("1")))).await.unwrap();
        let ready = async |version: &str| {
            testkit::wait_until(&format!("version {version} ready on every node"), LIMIT, async || {
                let ws = plane.workloads().list(&ListParams::default()).await.ok()?.items;
                let ok =
                    ws.len() == 4 && ws.iter().all(|w| is_ready(w) && w.spec.containers[0].env[0].value == version);
                ok.then_some(())
            })
            .await
        };
        ready("1").await;
        let watcher = watch_workloads(plane.store.clone()).await;
        api.retry_on_conflict("logs", |d| {
            d.spec.template.spec = sim(service("2"), "SIM_START_DELAY", "3");
            Ok(())
        })
        .await
        .unwrap();
        ready("2").await;
        let seen = watcher.take();
        assert!(seen.events >= 8, "{seen:?}");
        assert!(seen.min_ready >= 3, "at most one node without a ready workload: {seen:?} ({backend:?})");
        assert!(seen.max_total <= 4, "never two on a node: {seen:?}");
        let mut nodes = placed(&plane.store).await;
        nodes.dedup();
        assert_eq!(nodes.len(), 4);
    }
}
