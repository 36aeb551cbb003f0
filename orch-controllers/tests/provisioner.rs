//! The node provisioner: workloads that fit nowhere get nodes of the pool they fit, launched as
//! agents on the simulated runtime, and run there; nodes that stay empty go back; a node that
//! never registers is given up; a pass never asks twice for the same need.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_controllers::Provisioner;
use orch_controllers::ProvisionerConfig;
use orch_controllers::provisioner::{LAUNCHING_ANNOTATION, PassReport};
use orch_core::kinds::{Condition, ConditionStatus, Node, Phase, ResourceRequirements, Resources, Workload};
use orch_core::provider::NodePool;
use orch_core::provider::NodeProvider;
use orch_core::provider::POOL_LABEL;
use orch_core::testkit::wait_until;
use orch_core::{Api, ListParams, Manager, Object, ObjectMeta, Quantity, Store};
use orch_runtime::LocalNodes;
use orch_runtime::SimCluster;
use orch_scheduler::Profile;
use orch_scheduler::SchedulerService;
use orch_scheduler::{SCHEDULED_CONDITION, SchedulerConfig};
use orch_store::MemoryStore;

fn shape(cpu: &str, memory: &str) -> Resources {
    let mut r = Resources::new();
    r.insert("cpu".into(), cpu.parse().unwrap());
    r.insert("memory".into(), memory.parse().unwrap());
    r.insert("pods".into(), Quantity::from_units(20));
    r
}

fn workload(name: &str, cpu: &str) -> Object<Workload> {
    let mut w = Workload::command("main", &["sim"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), cpu.parse().unwrap());
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    Object::new(ObjectMeta::named(name), w)
}

/// As the scheduler leaves a workload it could not place.
fn unschedulable(mut w: Object<Workload>) -> Object<Workload> {
    w.status.conditions.push(Condition::new(SCHEDULED_CONDITION, ConditionStatus::False, "Unschedulable"));
    w
}

async fn pool_nodes(nodes: &Api<Node>, pool: &str) -> Vec<Object<Node>> {
    let all = nodes.list(&ListParams::default()).await.unwrap().items;
    all.into_iter().filter(|n| n.metadata.labels.get(POOL_LABEL).map(String::as_str) == Some(pool)).collect()
}

/// On the paused clock: the passes, the launches and the emptiness timers all run in virtual
/// time, so the "no node for what fits no pool" window is the same six passes on any machine.
#[tokio::test(start_paused = true)]
async fn workloads_that_fit_nowhere_get_nodes_of_their_pool_and_empty_nodes_go_back() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cluster = SimCluster::new();
    let sim = cluster.clone();
    let provider = Arc::new(LocalNodes::new(store.clone(), move |name| Arc::new(sim.node(name))));
    let pools = vec![
        NodePool::new("small", shape("2", "4Gi"), 3).empty_after(Duration::from_millis(300)),
        NodePool::new("big", shape("8", "16Gi"), 1).empty_after(Duration::from_millis(300)),
    ];
    let fast = ProvisionerConfig { interval: Duration::from_millis(50), ..Default::default() };
    let scheduler = SchedulerConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..SchedulerConfig::default()
    };
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::new(Profile::default_profile()).config(scheduler));
    manager.add(Provisioner::new(pools, provider.clone()).config(fast));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(manager.run(async {
        let _ = stopped.await;
    }));

    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let nodes: Api<Node> = Api::all(store.clone());
    for i in 0..5 {
        api.create(&workload(&format!("w{i}"), "1")).await.unwrap();
    }
    api.create(&workload("six", "6")).await.unwrap();
    api.create(&workload("huge", "100")).await.unwrap();
    wait_until("every workload that fits some pool running", Duration::from_secs(20), || async {
        let list = api.list(&ListParams::default()).await.unwrap().items;
        list.iter().filter(|w| w.metadata.name != "huge").all(|w| w.status.phase == Phase::Running)
    })
    .await;
    // Six CPUs fit only the big pool, whose one node is bound its workload before it opens, so
    // no small workload takes it first; the 1-CPU ones fill the big node's rest and 2-CPU nodes
    // (how many depends on how many the scheduler had marked by each pass).
    let small = pool_nodes(&nodes, "small").await;
    let big = pool_nodes(&nodes, "big").await;
    assert!((1..=3).contains(&small.len()) && big.len() == 1, "nodes: {:?}", provider.running());
    for n in small.iter().chain(&big) {
        assert!(!n.spec.unschedulable && !n.metadata.annotations.contains_key(LAUNCHING_ANNOTATION), "{n:?}");
        assert_eq!(n.spec.provider_id.as_deref(), Some(format!("local://{}", n.metadata.name).as_str()));
    }
    let six = api.get("six").await.unwrap();
    assert!(big.iter().any(|n| six.spec.node_name.as_deref() == Some(n.metadata.name.as_str())));
    // Nothing fits 100 CPUs: it waits, and no node was asked for it.
    let huge = api.get("huge").await.unwrap();
    assert!(huge.spec.node_name.is_none());
    let before = provider.running();
    // Six provisioner passes (virtual time).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = provider.running();
    assert!(after.iter().all(|n| before.contains(n)), "no node for what fits no pool: {before:?} then {after:?}");

    // Empty nodes go back once they have stayed empty.
    for w in api.list(&ListParams::default()).await.unwrap().items {
        api.delete(&w.metadata.name, &Default::default()).await.unwrap();
    }
    wait_until("every provisioned node given back", Duration::from_secs(20), || async {
        nodes.list(&ListParams::default()).await.unwrap().items.is_empty() && provider.running().is_empty()
    })
    .await;
    assert_eq!(cluster.instance_count(), 0, "drained");
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// A provider that records what it is asked and launches nothing.
#[derive(Default)]
struct Recorder {
    launched: Mutex<Vec<String>>,
    terminated: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl NodeProvider for Recorder {
    async fn launch(&self, name: &str, _pool: &NodePool) -> Result<String, orch_core::provider::ProviderError> {
        self.launched.lock().unwrap().push(name.to_string());
        Ok(format!("rec://{name}"))
    }
    async fn terminate(&self, name: &str, _pool: &NodePool) -> Result<(), orch_core::provider::ProviderError> {
        self.terminated.lock().unwrap().push(name.to_string());
        Ok(())
    }
}

/// One pass on the store as it is.
async fn pass(p: &mut Provisioner, store: &Arc<dyn Store>) -> PassReport {
    let nodes: Api<Node> = Api::all(store.clone());
    let workloads: Api<Workload> = Api::all(store.clone());
    let nodes: Vec<_> = nodes.list(&ListParams::default()).await.unwrap().items.into_iter().map(Arc::new).collect();
    let workloads: Vec<_> =
        workloads.list(&ListParams::default()).await.unwrap().items.into_iter().map(Arc::new).collect();
    p.pass(store, None, &nodes, &workloads).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_node_that_never_registers_is_given_up_and_asked_for_again() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let recorder = Arc::new(Recorder::default());
    let config = ProvisionerConfig { launch_timeout: Duration::from_millis(200), ..Default::default() };
    let mut p = Provisioner::new(vec![NodePool::new("small", shape("2", "4Gi"), 5)], recorder.clone()).config(config);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&unschedulable(workload("w", "1"))).await.unwrap();
    let first = pass(&mut p, &store).await;
    assert_eq!(first.launched.len(), 1);
    let nodes: Api<Node> = Api::all(store.clone());
    let node = nodes.get(&first.launched[0]).await.unwrap();
    assert!(node.spec.unschedulable && node.metadata.annotations.contains_key(LAUNCHING_ANNOTATION));
    assert_eq!(node.spec.provider_id.as_deref(), Some(format!("rec://{}", first.launched[0]).as_str()));
    // Before the timeout, the launching node counts: nothing more is asked for.
    assert_eq!(pass(&mut p, &store).await, PassReport::default());
    // Just before the timeout (virtual time): still waited for.
    tokio::time::sleep(Duration::from_millis(199)).await;
    assert_eq!(pass(&mut p, &store).await, PassReport::default());
    tokio::time::sleep(Duration::from_millis(1)).await;
    let later = pass(&mut p, &store).await;
    assert_eq!(later.removed, first.launched, "given up");
    assert_eq!(*recorder.terminated.lock().unwrap(), first.launched);
    assert!(nodes.get(&first.launched[0]).await.unwrap_err().is_not_found());
    assert_eq!(later.launched.len(), 1, "the workload still waits: another node is asked for");
    assert_ne!(later.launched, first.launched);

    // Its agent registers: the workload is bound there, the node is opened for scheduling, and
    // nothing more is asked for.
    let mut node = nodes.get(&later.launched[0]).await.unwrap();
    node.status.allocatable = shape("2", "4Gi");
    node.status.conditions.push(Condition::new("Ready", ConditionStatus::True, "AgentReady"));
    nodes.replace_status(&node).await.unwrap();
    let opened = pass(&mut p, &store).await;
    assert_eq!((opened.registered, opened.launched.len()), (later.launched.clone(), 0));
    let node = nodes.get(&later.launched[0]).await.unwrap();
    assert!(!node.spec.unschedulable && !node.metadata.annotations.contains_key(LAUNCHING_ANNOTATION));
    // The workload it was asked for was bound there before it opened.
    assert_eq!(api.get("w").await.unwrap().spec.node_name, Some(later.launched[0].clone()));
}

/// Fails launches while its switch is on.
#[derive(Default)]
struct Flaky {
    failing: std::sync::atomic::AtomicBool,
    attempts: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl NodeProvider for Flaky {
    async fn launch(&self, name: &str, _pool: &NodePool) -> Result<String, orch_core::provider::ProviderError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.attempts.fetch_add(1, SeqCst);
        if self.failing.load(SeqCst) {
            return Err(orch_core::provider::ProviderError::new("no capacity in the zone"));
        }
        Ok(format!("flaky://{name}"))
    }
    async fn terminate(&self, _name: &str, _pool: &NodePool) -> Result<(), orch_core::provider::ProviderError> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_pool_whose_launch_fails_is_passed_over_for_a_while() {
    use std::sync::atomic::Ordering::SeqCst;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let flaky = Arc::new(Flaky::default());
    flaky.failing.store(true, SeqCst);
    let config = ProvisionerConfig { launch_backoff: Duration::from_millis(300), ..Default::default() };
    let mut p = Provisioner::new(vec![NodePool::new("small", shape("2", "4Gi"), 5)], flaky.clone()).config(config);
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    api.create(&unschedulable(workload("w", "1"))).await.unwrap();
    let first = pass(&mut p, &store).await;
    assert_eq!((first.failed.len(), first.launched.len()), (1, 0));
    let nodes: Api<Node> = Api::all(store.clone());
    assert!(nodes.list(&ListParams::default()).await.unwrap().items.is_empty(), "the failed node is deleted again");
    // Right after: the pool is passed over, nothing is tried.
    let second = pass(&mut p, &store).await;
    assert_eq!((second.failed.len(), second.launched.len(), second.unprovisionable), (0, 0, 1));
    assert_eq!(flaky.attempts.load(SeqCst), 1);
    // The zone back but the backoff not over (virtual time): still passed over.
    flaky.failing.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(299)).await;
    let waiting = pass(&mut p, &store).await;
    assert_eq!((waiting.launched.len(), waiting.unprovisionable), (0, 1));
    assert_eq!(flaky.attempts.load(SeqCst), 1);
    // The backoff over: the launch goes through.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let third = pass(&mut p, &store).await;
    assert_eq!((third.failed.len(), third.launched.len()), (0, 1));
    assert_eq!(flaky.attempts.load(SeqCst), 2);
}

#[tokio::test]
async fn a_node_found_busy_while_being_given_back_is_opened_again() {
    use orch_controllers::provisioner::SCALING_DOWN_ANNOTATION;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let recorder = Arc::new(Recorder::default());
    let pool = NodePool::new("small", shape("2", "4Gi"), 5).empty_after(Duration::ZERO);
    let mut p = Provisioner::new(vec![pool], recorder.clone());
    let nodes: Api<Node> = Api::all(store.clone());
    // A node of the pool that a scale-down cordoned, on which a workload landed after all.
    let mut node = Object::new(ObjectMeta::named("small-a").with_label(POOL_LABEL, "small"), Node::default());
    node.spec.unschedulable = true;
    node.metadata.annotations.insert(SCALING_DOWN_ANNOTATION, "true");
    nodes.create(&node).await.unwrap();
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    let mut w = workload("w", "1");
    w.spec.node_name = Some("small-a".into());
    api.create(&w).await.unwrap();
    // An empty one of the same pool.
    nodes
        .create(&Object::new(ObjectMeta::named("small-b").with_label(POOL_LABEL, "small"), Node::default()))
        .await
        .unwrap();
    let report = pass(&mut p, &store).await;
    let a = nodes.get("small-a").await.unwrap();
    assert!(!a.spec.unschedulable && !a.metadata.annotations.contains_key(SCALING_DOWN_ANNOTATION), "{a:?}");
    assert_eq!(report.removed, ["small-b"], "the empty one goes back");
    assert_eq!(*recorder.terminated.lock().unwrap(), ["small-b"]);
    assert!(nodes.get("small-b").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn nodes_are_asked_for_only_for_workloads_their_pool_admits() {
    use orch_core::kinds::{Taint, TaintEffect, Toleration, TolerationOperator};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let recorder = Arc::new(Recorder::default());
    let gpu_only =
        Taint { key: "dedicated".into(), value: "gpu".into(), effect: TaintEffect::NoSchedule, time_added: None };
    let pools = vec![
        NodePool::new("tainted", shape("4", "8Gi"), 5).taint(gpu_only.clone()),
        NodePool::new("zoned", shape("4", "8Gi"), 5).label("zone", "b"),
    ];
    let mut p = Provisioner::new(pools, recorder.clone());
    let api: Api<Workload> = Api::namespaced(store.clone(), "default");
    // Tolerates the taint: the first pool takes it.
    let mut tolerant = workload("tolerant", "1");
    tolerant.spec.tolerations.push(Toleration {
        key: "dedicated".into(),
        operator: TolerationOperator::Equal,
        value: "gpu".into(),
        effect: Some(TaintEffect::NoSchedule),
        toleration_seconds: None,
    });
    api.create(&unschedulable(tolerant)).await.unwrap();
    // Asks for zone b: only the second pool's nodes carry it.
    let mut zoned = workload("zoned", "1");
    zoned.spec.node_selector.insert("zone", "b");
    api.create(&unschedulable(zoned)).await.unwrap();
    // Asks for zone c: no pool makes such nodes.
    let mut nowhere = workload("nowhere", "1");
    nowhere.spec.node_selector.insert("zone", "c");
    api.create(&unschedulable(nowhere)).await.unwrap();
    let report = pass(&mut p, &store).await;
    let pools: Vec<&str> = report.launched.iter().map(|n| n.split('-').next().unwrap()).collect();
    assert_eq!(pools, ["tainted", "zoned"], "{report:?}");
    assert_eq!(report.unprovisionable, 1);
}

mod packing {
    use super::*;
    use orch_core::kinds::{Taint, TaintEffect, Toleration, TolerationOperator};
    use proptest::prelude::*;

    /// A pool: CPUs, GiB of memory, node limit, whether its nodes carry the taint
    /// `dedicated=batch:NoSchedule`, and the zone label they carry, if any.
    type PoolCase = (u32, u32, usize, bool, Option<u8>);
    /// A workload: half CPUs, GiB of memory, whether it tolerates the taint, and the zone it
    /// asks for, if any.
    type WorkloadCase = (u32, u32, bool, Option<u8>);

    fn taint() -> Taint {
        Taint { key: "dedicated".into(), value: "batch".into(), effect: TaintEffect::NoSchedule, time_added: None }
    }

    fn zone(z: u8) -> String {
        format!("z{z}")
    }

    fn admits(pool: &PoolCase, w: &WorkloadCase) -> bool {
        let (cpu, mem, _, tainted, pool_zone) = *pool;
        let (half_cpus, gib, tolerates, wants) = *w;
        half_cpus <= cpu * 2 && gib <= mem && (!tainted || tolerates) && wants.is_none_or(|z| pool_zone == Some(z))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever the requests and pools (two resources, taints, zone labels): no pool goes
        /// past its limit, every node carries its pool's labels and taint, and once the nodes
        /// asked for register, the workloads the provisioner binds to each fit there, all
        /// resources counted, its taint tolerated and its zone the one asked for; no new node
        /// stays empty; every workload some pool admits is provided for when the limits cannot
        /// get in the way; and a second pass while they launch asks for nothing more.
        #[test]
        fn a_pass_packs_each_new_node_within_its_shape(
            requests in proptest::collection::vec((1u32..=8, 1u32..=8, any::<bool>(), proptest::option::of(0u8..2)), 1..24),
            pools in proptest::collection::vec((2u32..=8, 2u32..=16, 1usize..=30, any::<bool>(), proptest::option::of(0u8..2)), 1..4),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
                let recorder = Arc::new(Recorder::default());
                let node_pools: Vec<NodePool> = pools
                    .iter()
                    .enumerate()
                    .map(|(i, &(cpu, mem, max, tainted, z))| {
                        let mut pool = NodePool::new(format!("p{i}"), shape(&cpu.to_string(), &format!("{mem}Gi")), max);
                        if tainted {
                            pool = pool.taint(taint());
                        }
                        if let Some(z) = z {
                            pool = pool.label("zone", zone(z));
                        }
                        pool
                    })
                    .collect();
                let mut p = Provisioner::new(node_pools, recorder.clone());
                let api: Api<Workload> = Api::namespaced(store.clone(), "default");
                for (i, &(half_cpus, gib, tolerates, wants)) in requests.iter().enumerate() {
                    let mut w = workload(&format!("w{i}"), &format!("{}m", half_cpus * 500));
                    w.spec.containers[0].resources.requests.insert("memory".into(), format!("{gib}Gi").parse().unwrap());
                    if tolerates {
                        w.spec.tolerations.push(Toleration {
                            key: "dedicated".into(),
                            operator: TolerationOperator::Equal,
                            value: "batch".into(),
                            effect: Some(TaintEffect::NoSchedule),
                            toleration_seconds: None,
                        });
                    }
                    if let Some(z) = wants {
                        w.spec.node_selector.insert("zone", zone(z));
                    }
                    api.create(&unschedulable(w)).await.unwrap();
                }
                let report = pass(&mut p, &store).await;
                let nodes_api = Api::<Node>::all(store.clone());
                let nodes = nodes_api.list(&ListParams::default()).await.unwrap().items;
                assert_eq!(report.launched.len(), nodes.len());
                let pool_of = |n: &Object<Node>| -> usize {
                    n.metadata.labels.get(POOL_LABEL).unwrap()[1..].parse().unwrap()
                };
                for (i, pool) in pools.iter().enumerate() {
                    let n = nodes.iter().filter(|n| pool_of(n) == i).count();
                    assert!(n <= pool.2, "pool p{i}: {n} nodes, limit {}", pool.2);
                }
                for n in &nodes {
                    let (_, _, _, tainted, z) = pools[pool_of(n)];
                    assert_eq!(n.spec.taints, if tainted { vec![taint()] } else { vec![] }, "{}", n.metadata.name);
                    assert_eq!(n.metadata.labels.get("zone"), z.map(zone).as_ref(), "{}", n.metadata.name);
                }
                let again = pass(&mut p, &store).await;
                assert!(again.launched.is_empty(), "asked twice: {again:?}");

                // The nodes register with their pool's shape: the provisioner binds there what
                // it asked them for, then opens them.
                for n in &nodes {
                    let (cpu, mem, ..) = pools[pool_of(n)];
                    let mut node = nodes_api.get(&n.metadata.name).await.unwrap();
                    node.status.allocatable = shape(&cpu.to_string(), &format!("{mem}Gi"));
                    node.status.conditions.push(Condition::new("Ready", ConditionStatus::True, "AgentReady"));
                    nodes_api.replace_status(&node).await.unwrap();
                }
                let opened = pass(&mut p, &store).await;
                assert!(opened.launched.is_empty(), "asked for more once they registered: {opened:?}");
                let bound = api.list(&ListParams::default()).await.unwrap().items;
                for n in &nodes {
                    let i = pool_of(n);
                    let (cpu, mem, ..) = pools[i];
                    let here: Vec<usize> = bound
                        .iter()
                        .filter(|w| w.spec.node_name.as_deref() == Some(n.metadata.name.as_str()))
                        .map(|w| w.metadata.name[1..].parse().unwrap())
                        .collect();
                    assert!(!here.is_empty(), "{} (pool p{i}) was asked for with nothing to put on it", n.metadata.name);
                    let half_cpus: u32 = here.iter().map(|&w| requests[w].0).sum();
                    let gib: u32 = here.iter().map(|&w| requests[w].1).sum();
                    assert!(half_cpus <= cpu * 2 && gib <= mem && here.len() <= 20,
                        "{} (pool p{i}: {cpu} CPU, {mem} GiB) holds {here:?}: {} CPU, {gib} GiB", n.metadata.name, f64::from(half_cpus) / 2.0);
                    for &w in &here {
                        assert!(admits(&pools[i], &requests[w]), "w{w} {:?} bound to {} of pool p{i} {:?}", requests[w], n.metadata.name, pools[i]);
                    }
                }
                let admitted: Vec<usize> =
                    (0..requests.len()).filter(|&w| pools.iter().any(|p| admits(p, &requests[w]))).collect();
                assert!(report.unprovisionable >= requests.len() - admitted.len(), "{report:?}");
                for w in &bound {
                    let i: usize = w.metadata.name[1..].parse().unwrap();
                    assert!(w.spec.node_name.is_none() || admitted.contains(&i), "w{i} fits no pool yet was bound");
                }
                // When no pool's limit can get in the way, every workload some pool admits has
                // its node.
                if pools.iter().all(|p| p.2 >= requests.len()) {
                    assert_eq!(report.unprovisionable, requests.len() - admitted.len(), "{report:?}");
                    for &i in &admitted {
                        let w = bound.iter().find(|w| w.metadata.name == format!("w{i}")).unwrap();
                        assert!(w.spec.node_name.is_some(), "w{i} {:?} was not provided for", requests[i]);
                    }
                }
            });
        }
    }
}
