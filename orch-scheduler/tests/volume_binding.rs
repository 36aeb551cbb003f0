//! Volume binding: a workload goes where its claim's data lives, a pending claim goes where its
//! class has room, workloads sharing a pending claim follow the first, and a workload that
//! cannot go anywhere says why. A property test checks that no single-node claim is ever used
//! from two nodes and that no node's storage is overcommitted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use orch_core::kinds::{
    AccessMode, ClaimPhase, Node, NodeStorage, PersistentVolume, ResourceRequirements, Taint, TaintEffect, Volume,
    VolumeClaim, VolumeSource, Workload, find_condition,
};
use orch_core::testkit::wait_until;
use orch_core::{Api, Cache, Object, ObjectMeta, Quantity, Store};
use orch_scheduler::{
    Framework, OutcomeKind, Profile, SCHEDULED_CONDITION, SchedulerConfig, SchedulerService, SchedulingCore,
};
use orch_store::MemoryStore;
use proptest::prelude::*;

fn gib(n: i64) -> Quantity {
    format!("{n}Gi").parse().unwrap()
}

fn node(name: &str, cpu: i64, local: Option<i64>) -> Object<Node> {
    let mut n = Object::new(ObjectMeta::named(name), Node::default());
    n.status.allocatable.insert("cpu".into(), Quantity::from_units(cpu));
    n.status.allocatable.insert("memory".into(), "8Gi".parse().unwrap());
    if let Some(g) = local {
        n.status.storage = vec![NodeStorage {
            volume_class: "local".into(),
            capacity: gib(g),
            access_modes: vec![AccessMode::ReadWriteOnce],
        }];
    }
    n
}

fn claim(name: &str, size_gib: i64, class: &str) -> Object<VolumeClaim> {
    let spec = VolumeClaim { size: gib(size_gib), volume_class: class.into(), ..Default::default() };
    Object::new(ObjectMeta::namespaced("default", name), spec)
}

fn user(name: &str, cpu: &str, claims: &[&str]) -> Object<Workload> {
    let mut w = Workload::command("main", &["sleep", "1"]);
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), cpu.parse().unwrap());
    w.containers[0].resources = ResourceRequirements { requests, limits: BTreeMap::new() };
    w.volumes = claims
        .iter()
        .map(|c| Volume { name: format!("v-{c}"), source: VolumeSource::Claim { claim_name: c.to_string() } })
        .collect();
    Object::new(ObjectMeta::namespaced("default", name), w)
}

struct Cluster {
    store: Arc<dyn Store>,
    nodes: Api<Node>,
    claims: Api<VolumeClaim>,
    volumes: Api<PersistentVolume>,
    workloads: Api<Workload>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Cluster {
    fn new() -> Cluster {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        Cluster {
            nodes: Api::all(store.clone()),
            claims: Api::namespaced(store.clone(), "default"),
            volumes: Api::all(store.clone()),
            workloads: Api::namespaced(store.clone(), "default"),
            store,
            stop: None,
        }
    }

    /// Starts the scheduler with volume binding; unschedulable workloads are retried only on
    /// events, never by the periodic flush, so a wake-up proves the event reached them.
    fn start(&mut self) {
        let claims = Cache::<VolumeClaim>::spawn(self.store.clone(), Default::default());
        let volumes = Cache::<PersistentVolume>::spawn(self.store.clone(), Default::default());
        let config = SchedulerConfig {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            unschedulable_flush: Duration::from_secs(3600),
            ..SchedulerConfig::default()
        };
        let svc = SchedulerService::with_volumes(Profile::default_profile(), claims, volumes).config(config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(svc.run(self.store.clone(), async {
            let _ = stopped.await;
        }));
        self.stop = Some(stop);
    }

    async fn bound_claim(&self, name: &str, size_gib: i64, on: &str) {
        let c = self.claims.create(&claim(name, size_gib, "local")).await.unwrap();
        let pv_name = format!("pv-{name}");
        let spec = PersistentVolume {
            capacity: gib(size_gib),
            access_modes: vec![AccessMode::ReadWriteOnce],
            volume_class: "local".into(),
            node_name: Some(on.into()),
            ..Default::default()
        };
        self.volumes.create(&Object::new(ObjectMeta::named(pv_name.as_str()), spec)).await.unwrap();
        let mut status = c.status.clone();
        status.phase = ClaimPhase::Bound;
        status.volume_name = Some(pv_name);
        self.claims.write_status(&c.metadata, &status).await.unwrap();
    }

    async fn node_of(&self, name: &str) -> String {
        wait_until(&format!("{name} is bound"), Duration::from_secs(10), async || {
            self.workloads.get(name).await.ok()?.spec.node_name
        })
        .await
    }

    /// The `Scheduled=False` message of a workload that waits.
    async fn why_waiting(&self, name: &str, contains: &str) -> String {
        wait_until(&format!("{name} waits saying {contains:?}"), Duration::from_secs(10), async || {
            let w = self.workloads.get(name).await.ok()?;
            let c = find_condition(&w.status.conditions, SCHEDULED_CONDITION)?;
            c.message.contains(contains).then(|| c.message.clone())
        })
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[tokio::test]
async fn a_bound_claim_pins_its_workloads_to_the_volume_node_and_says_why_they_wait() {
    let mut c = Cluster::new();
    for n in ["n1", "n2", "n3"] {
        c.nodes.create(&node(n, 2, Some(10))).await.unwrap();
    }
    c.bound_claim("data", 1, "n2").await;
    c.start();
    c.workloads.create(&user("first", "1", &["data"])).await.unwrap();
    assert_eq!(c.node_of("first").await, "n2");

    // n2 is full: the next user waits, though n1 and n3 are free.
    c.workloads.create(&user("second", "2", &["data"])).await.unwrap();
    let msg = c.why_waiting("second", "lives on node n2").await;
    assert!(msg.starts_with("0/3 nodes fit"), "{msg}");
    assert!(msg.contains("2 volume claim \"data\" lives on node n2"), "{msg}");
    assert!(msg.contains("1 insufficient cpu"), "{msg}");

    // n2 stops answering: the workload waits for it, and says so.
    c.nodes
        .retry_on_conflict("n2", |n| {
            n.spec.taints.push(Taint {
                key: "node.orch.dev/unreachable".into(),
                value: String::new(),
                effect: TaintEffect::NoExecute,
                time_added: None,
            });
            Ok(())
        })
        .await
        .unwrap();
    c.workloads.create(&user("third", "100m", &["data"])).await.unwrap();
    let msg = c.why_waiting("third", "(not ready)").await;
    assert_eq!(msg, "0/3 nodes fit: volume claim \"data\" lives on node n2 (not ready)");
}

#[tokio::test]
async fn pending_claims_go_where_their_class_has_room_and_later_users_follow_the_first() {
    let mut c = Cluster::new();
    c.nodes.create(&node("a", 8, Some(10))).await.unwrap();
    c.nodes.create(&node("b", 8, Some(10))).await.unwrap();
    c.nodes.create(&node("plain", 8, None)).await.unwrap();
    for name in ["c1", "c2"] {
        c.claims.create(&claim(name, 6, "local")).await.unwrap();
    }
    c.claims.create(&claim("big", 11, "local")).await.unwrap();
    c.claims.create(&claim("fast", 1, "fast")).await.unwrap();
    c.start();
    c.workloads.create(&user("w1", "100m", &["c1"])).await.unwrap();
    let first = c.node_of("w1").await;
    c.workloads.create(&user("w2", "100m", &["c2"])).await.unwrap();
    let second = c.node_of("w2").await;
    assert!(["a", "b"].contains(&first.as_str()) && ["a", "b"].contains(&second.as_str()));
    assert_ne!(first, second, "6Gi + 6Gi do not fit one node's 10Gi");
    for i in 0..4 {
        let name = format!("c1-user-{i}");
        c.workloads.create(&user(&name, "100m", &["c1"])).await.unwrap();
        assert_eq!(c.node_of(&name).await, first, "every user of c1 follows the first");
    }
    // c1 on one node and c2 on the other: a workload needing both fits nowhere.
    c.workloads.create(&user("both", "100m", &["c1", "c2"])).await.unwrap();
    let msg = c.why_waiting("both", "no node has both").await;
    assert!(msg.contains("in use on node"), "{msg}");

    c.workloads.create(&user("too-big", "100m", &["big"])).await.unwrap();
    let msg = c.why_waiting("too-big", "not enough \"local\" storage").await;
    assert!(msg.contains("1 no volume class \"local\""), "the node without storage is named: {msg}");
    c.workloads.create(&user("unknown-class", "100m", &["fast"])).await.unwrap();
    c.why_waiting("unknown-class", "3 no volume class \"fast\"").await;
}

#[tokio::test]
async fn a_missing_claim_keeps_the_workload_waiting_until_the_claim_appears() {
    let mut c = Cluster::new();
    c.nodes.create(&node("n1", 2, Some(10))).await.unwrap();
    c.start();
    c.workloads.create(&user("w", "100m", &["later"])).await.unwrap();
    let msg = c.why_waiting("w", "not found").await;
    assert_eq!(msg, "0/1 nodes fit: volume claim \"later\" not found");
    // Nothing about nodes or workloads changes: only the claim's arrival can wake it (the
    // periodic retry is an hour away).
    c.claims.create(&claim("later", 1, "local")).await.unwrap();
    assert_eq!(c.node_of("w").await, "n1");
}

/// One step of the property test: a workload using some of the claims.
#[derive(Debug, Clone)]
struct Step {
    claims: Vec<usize>,
    cpu_milli: i64,
}

/// Where a claim starts: pending, bound to a volume on node `n`, or pending with its volume
/// already provided on node `n` (its status not written yet).
#[derive(Debug, Clone, Copy)]
enum Start {
    Pending,
    Bound(usize),
    Provided(usize),
}

fn steps() -> impl Strategy<Value = (Vec<i64>, Vec<(i64, Start)>, Vec<Step>)> {
    (
        proptest::collection::vec(prop_oneof![Just(0i64), 4i64..12], 1..5),
        proptest::collection::vec(
            (
                1i64..6,
                prop_oneof![
                    Just(Start::Pending),
                    (0usize..5).prop_map(Start::Bound),
                    (0usize..5).prop_map(Start::Provided)
                ],
            ),
            1..6,
        ),
        proptest::collection::vec(
            (proptest::collection::vec(0usize..6, 0..3), 100i64..1500)
                .prop_map(|(claims, cpu_milli)| Step { claims, cpu_milli }),
            1..25,
        ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the nodes, claims (pending, bound, or with a volume provided already) and
    /// workloads: every claim's users are on one node, the one its volume is on when it has one,
    /// and the pending claims placed on a node never add up to more than its room for their class
    /// left by the volumes there.
    #[test]
    fn a_claim_is_never_used_from_two_nodes_and_no_node_is_overcommitted(
        (node_room, claims_at, steps) in steps()
    ) {
        let claim_sizes: Vec<i64> = claims_at.iter().map(|(g, _)| *g).collect();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            let claims_api: Api<VolumeClaim> = Api::namespaced(store.clone(), "default");
            let volumes_api: Api<PersistentVolume> = Api::all(store.clone());
            let mut sizes = HashMap::new();
            // Claims with a volume: the node it lives on. Room each node's volumes take.
            let mut lives_on: HashMap<String, String> = HashMap::new();
            let mut volume_room: HashMap<String, i64> = HashMap::new();
            for (i, (g, start)) in claims_at.iter().enumerate() {
                let name = format!("c{i}");
                let c = claims_api.create(&claim(&name, *g, "local")).await.unwrap();
                sizes.insert(name.clone(), *g);
                let (Start::Bound(n) | Start::Provided(n)) = *start else { continue };
                let node = format!("n{}", n % node_room.len());
                let pv_name = orch_core::kinds::volume_name_for_claim(&c.metadata.uid);
                let spec = PersistentVolume {
                    capacity: gib(*g),
                    access_modes: vec![AccessMode::ReadWriteOnce],
                    volume_class: "local".into(),
                    node_name: Some(node.clone()),
                    ..Default::default()
                };
                volumes_api.create(&Object::new(ObjectMeta::named(pv_name.as_str()), spec)).await.unwrap();
                if let Start::Bound(_) = start {
                    let mut status = c.status.clone();
                    status.phase = ClaimPhase::Bound;
                    status.volume_name = Some(pv_name);
                    claims_api.write_status(&c.metadata, &status).await.unwrap();
                }
                *volume_room.entry(node.clone()).or_default() += *g;
                lives_on.insert(name, node);
            }
            let claims = Cache::<VolumeClaim>::spawn(store.clone(), Default::default());
            let volumes = Cache::<PersistentVolume>::spawn(store.clone(), Default::default());
            claims.ready().await;
            volumes.ready().await;
            let profile = Profile::default_profile().with(orch_scheduler::plugins::VolumeBinding::new(claims, volumes), 0);
            let mut core = SchedulingCore::new(Framework::new(profile));
            let mut room = HashMap::new();
            for (i, g) in node_room.iter().enumerate() {
                let name = format!("n{i}");
                core.upsert_node(&node(&name, 4, (*g > 0).then_some(*g)));
                room.insert(name, *g);
            }
            for (i, s) in steps.iter().enumerate() {
                let names: Vec<String> = s.claims.iter().filter(|c| **c < claim_sizes.len()).map(|c| format!("c{c}")).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                core.upsert_workload(Arc::new(user(&format!("w{i}"), &format!("{}m", s.cpu_milli), &refs)));
                for o in core.run_until_idle() {
                    if let OutcomeKind::Bound(_) = o.kind {
                        core.bound(&o.workload.key);
                    }
                }
            }
            let mut claim_nodes: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
            for p in core.snapshot().placed_workloads() {
                for c in &p.info.claims {
                    claim_nodes.entry(c.clone()).or_default().insert(p.placement.node_name.to_string());
                }
            }
            let mut used: HashMap<String, i64> = HashMap::new();
            for (claim, nodes) in &claim_nodes {
                prop_assert_eq!(nodes.len(), 1, "claim {} used from {:?}", claim, nodes);
                let n = nodes.iter().next().unwrap();
                match lives_on.get(claim) {
                    Some(home) => prop_assert_eq!(n, home, "claim {} used away from its volume", claim),
                    None => *used.entry(n.clone()).or_default() += sizes[claim],
                }
            }
            for (n, u) in used {
                let taken = volume_room.get(&n).copied().unwrap_or(0);
                prop_assert!(
                    u + taken <= room[&n],
                    "node {} holds {}Gi of pending claims beside {}Gi of volumes in {}Gi", n, u, taken, room[&n]
                );
            }
            Ok(())
        })?;
    }
}
