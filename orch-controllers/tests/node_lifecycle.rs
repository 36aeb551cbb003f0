//! The node lifecycle controller on a paused clock: a lapsed heartbeat marks the node, the
//! eviction timeout evicts its workloads, evictions are rate-limited and pause when most nodes
//! look down, and a returning heartbeat clears the mark.

use std::sync::Arc;
use std::time::Duration;

use orch_controllers::node_lifecycle::{DISRUPTION_CONDITION, NodeLifecycle, NodeLifecycleConfig, UNREACHABLE_TAINT};
use orch_core::kinds::{
    Condition, ConditionStatus, Event, EventType, Node, Phase, Workload, find_condition, set_condition,
};
use orch_core::kinds::{NODE_LEASE_NAMESPACE, NodeLease};
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Store, Timestamp, TokioClock};
use orch_store::MemoryStore;

const TTL: Duration = Duration::from_secs(40);

struct Cluster {
    store: Arc<dyn Store>,
    nodes: Api<Node>,
    workloads: Api<Workload>,
}

impl Cluster {
    async fn new(nodes: &[&str]) -> Self {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let api: Api<Node> = Api::all(store.clone());
        for name in nodes {
            let n = api.create(&Object::new(ObjectMeta::named(*name), Node::default())).await.unwrap();
            let mut s = n.clone();
            set_condition(
                &mut s.status.conditions,
                Condition::new("Ready", ConditionStatus::True, "AgentReady"),
                Timestamp(0),
            );
            api.replace_status(&s).await.unwrap();
        }
        Cluster { workloads: Api::namespaced(store.clone(), "default"), nodes: api, store }
    }

    /// A heartbeat for `node`, renewed until the returned task is aborted.
    async fn heartbeat(&self, node: &str) -> tokio::task::JoinHandle<()> {
        let lease = self.store.grant_lease(TTL).await.unwrap();
        let mut meta = ObjectMeta::named(node);
        meta.lease = Some(lease.id);
        Api::<NodeLease>::namespaced(self.store.clone(), NODE_LEASE_NAMESPACE)
            .create(&Object::new(meta, NodeLease { holder: node.into() }))
            .await
            .unwrap();
        let store = self.store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if store.keep_alive(lease.id).await.is_err() {
                    return;
                }
            }
        })
    }

    async fn workload_on(&self, name: &str, node: &str) {
        let mut w = Workload::command("main", &["/bin/sleep", "1"]);
        w.node_name = Some(node.into());
        self.workloads.create(&Object::new(ObjectMeta::named(name), w)).await.unwrap();
    }

    async fn names(&self) -> Vec<String> {
        self.workloads.list(&ListParams::default()).await.unwrap().items.into_iter().map(|w| w.metadata.name).collect()
    }

    async fn unreachable(&self, node: &str) -> bool {
        let n = self.nodes.get(node).await.unwrap();
        n.spec.taints.iter().any(|t| t.key == UNREACHABLE_TAINT)
            && find_condition(&n.status.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::Unknown)
    }

    fn start(&self, config: NodeLifecycleConfig) -> tokio::sync::oneshot::Sender<()> {
        let mut manager = Manager::new(self.store.clone());
        let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
        manager.add(NodeLifecycle::new(config, clock).into_builder());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(manager.run(async move {
            let _ = rx.await;
        }));
        tx
    }
}

fn config() -> NodeLifecycleConfig {
    NodeLifecycleConfig { startup_grace: Duration::from_secs(5), ..Default::default() }
}

#[tokio::test(start_paused = true)]
async fn lapsed_heartbeat_marks_then_evicts_and_a_return_clears() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    let dying = c.heartbeat("n1").await;
    let _n2 = c.heartbeat("n2").await;
    let _n3 = c.heartbeat("n3").await;
    c.workload_on("a", "n1").await;
    c.workload_on("b", "n1").await;
    // b's agent put its pre-stop finalizer on it; with the agent gone, eviction removes it.
    c.workloads
        .retry_on_conflict("b", |w| {
            w.metadata.finalizers.push(orch_core::kinds::PRE_STOP_FINALIZER.into());
            Ok(())
        })
        .await
        .unwrap();
    c.workload_on("c", "n2").await;
    // This one accepts the unreachable taint: it is never evicted.
    let mut patient = Workload::command("main", &["/bin/sleep", "1"]);
    patient.node_name = Some("n1".into());
    patient.tolerations = vec![orch_core::kinds::Toleration {
        key: UNREACHABLE_TAINT.into(),
        operator: orch_core::kinds::TolerationOperator::Exists,
        ..Default::default()
    }];
    c.workloads.create(&Object::new(ObjectMeta::named("patient"), patient)).await.unwrap();
    let mut events = c.workloads.watch(&ListParams::default(), None).await.unwrap();
    let _stop = c.start(config());
    dying.abort(); // n1's agent dies: its lease runs out after the TTL

    tokio::time::sleep(TTL + Duration::from_secs(20)).await;
    assert!(c.unreachable("n1").await, "n1 is marked once its heartbeat lapsed");
    assert!(!c.unreachable("n2").await);
    // Its workloads are marked Unknown with the reason; the live node's are untouched.
    for name in ["a", "b", "patient"] {
        let w = c.workloads.get(name).await.unwrap();
        assert_eq!(w.status.phase, Phase::Unknown, "{name}");
        let ready = find_condition(&w.status.conditions, "Ready").unwrap();
        assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::Unknown, "NodeUnreachable"), "{name}");
        assert!(ready.message.contains("node n1 stopped reporting"), "{}", ready.message);
    }
    assert_ne!(c.workloads.get("c").await.unwrap().status.phase, Phase::Unknown, "n2 is alive");
    tokio::time::sleep(Duration::from_secs(230)).await;
    assert_eq!(c.names().await, ["a", "b", "c", "patient"], "nothing is evicted before the timeout");
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert_eq!(
        c.names().await,
        ["c", "patient"],
        "n1's workloads are evicted after the timeout, but not one that tolerates it"
    );
    // Each evicted workload's last state says why it went.
    let mut evicted = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut events)).await {
        if let orch_core::Event::Deleted(w) = e.unwrap() {
            let why = find_condition(&w.status.conditions, DISRUPTION_CONDITION).expect("a disruption condition");
            assert_eq!((why.status, why.reason.as_str()), (ConditionStatus::True, "NodeUnreachableEviction"));
            assert!(why.message.contains("node n1 stopped reporting"), "{}", why.message);
            evicted.push(w.metadata.name.clone());
        }
    }
    evicted.sort(); // a node's workloads go in no particular order
    assert_eq!(evicted, ["a", "b"]);

    // The agent comes back: the mark is cleared.
    let _back = c.heartbeat("n1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!c.unreachable("n1").await);
    let n1 = c.nodes.get("n1").await.unwrap();
    assert!(n1.spec.taints.is_empty());
    assert_eq!(find_condition(&n1.status.conditions, "Ready").unwrap().status, ConditionStatus::True);

    // Each step was recorded as an event about its object: the node marked and back, each
    // eviction with its reason.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recorded: Vec<(String, String, EventType, String)> = Api::<Event>::namespaced(c.store.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            (
                e.spec.involved_object.kind.clone(),
                e.spec.involved_object.name.clone(),
                e.spec.type_,
                e.spec.reason.clone(),
            )
        })
        .collect();
    for (kind, name, type_, reason) in [
        ("Node", "n1", EventType::Warning, "NodeNotReady"),
        ("Node", "n1", EventType::Normal, "NodeReady"),
        ("Workload", "a", EventType::Warning, "Evicted"),
        ("Workload", "b", EventType::Warning, "Evicted"),
    ] {
        assert!(
            recorded.iter().any(|r| (r.0.as_str(), r.1.as_str(), r.2, r.3.as_str()) == (kind, name, type_, reason)),
            "an event {reason} about {kind} {name}: {recorded:?}"
        );
    }
    assert!(!recorded.iter().any(|r| r.1 == "c" || r.1 == "patient"), "nothing about what stayed: {recorded:?}");
}

#[tokio::test(start_paused = true)]
async fn evictions_pause_when_most_nodes_look_down() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    let _n3 = c.heartbeat("n3").await;
    c.workload_on("a", "n1").await;
    c.workload_on("b", "n2").await;
    let _stop = c.start(config());
    // Two of three nodes never heartbeat: 67% down is above the 55% threshold.
    tokio::time::sleep(Duration::from_secs(900)).await;
    assert!(c.unreachable("n1").await && c.unreachable("n2").await);
    assert_eq!(c.names().await, ["a", "b"], "no eviction while most of the cluster looks down");
}

#[tokio::test(start_paused = true)]
async fn evictions_are_rate_limited() {
    let names = ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"];
    let c = Cluster::new(&names).await;
    let mut beats = Vec::new();
    for n in &names[3..] {
        beats.push(c.heartbeat(n).await);
    }
    for (i, n) in names[..3].iter().enumerate() {
        c.workload_on(&format!("w{i}"), n).await;
    }
    let _stop = c.start(NodeLifecycleConfig { evictions_per_second: 1.0 / 60.0, ..config() });
    // All three marked at about the same time; the timeout passes for all together.
    tokio::time::sleep(Duration::from_secs(5 + 10 + 300 + 5)).await;
    let first = c.names().await.len();
    assert_eq!(first, 2, "one node evicted at once");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(c.names().await.len(), 1, "the next one a minute later");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(c.names().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_builder_a_user_finds_first_runs_in_virtual_time() {
    let c = Cluster::new(&["n1", "n2"]).await;
    let dying = c.heartbeat("n1").await;
    let _n2 = c.heartbeat("n2").await;
    c.workload_on("a", "n1").await;
    c.workload_on("b", "n2").await;
    // No clock given anywhere: the manager's default follows the paused runtime.
    let mut manager = Manager::new(c.store.clone());
    manager.add(NodeLifecycle::builder(config()));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(manager.run(async move {
        let _ = stopped.await;
    }));
    dying.abort();
    // Lease TTL, then the default 5-minute eviction timeout, in virtual time.
    tokio::time::sleep(TTL + Duration::from_secs(20) + Duration::from_secs(330)).await;
    assert!(c.unreachable("n1").await);
    assert_eq!(c.names().await, ["b"], "a's node stopped reporting: a is evicted; b's node is alive");
}
