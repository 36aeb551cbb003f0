//! The volume binder on the memory store: a claim waits for its first consumer, then gets a
//! volume on that consumer's node; a claim no node can hold says why; a deleted claim stays while
//! workloads use it, then its volume is deleted or released as its policy says; a bound claim
//! whose volume vanished turns `Lost`.

use std::sync::Arc;
use std::time::Duration;

use orch_controllers::VolumeBinder;
use orch_controllers::volumes::BOUND_CONDITION;
use orch_core::kinds::{
    AccessMode, CLAIM_PROTECTION_FINALIZER, ClaimPhase, Node, NodeStorage, PersistentVolume, ReclaimPolicy,
    VOLUME_PROTECTION_FINALIZER, VOLUME_RECLAIM_FINALIZER, Volume, VolumeClaim, VolumePhase, VolumeSource, Workload,
    find_condition, volume_name_for_claim,
};
use orch_core::testkit::wait_until;
use orch_core::{Api, DeleteOptions, Manager, Object, ObjectMeta, Quantity, Store};
use orch_store::MemoryStore;

const LIMIT: Duration = Duration::from_secs(10);

fn gib(n: i64) -> Quantity {
    format!("{n}Gi").parse().unwrap()
}

struct Plane {
    claims: Api<VolumeClaim>,
    volumes: Api<PersistentVolume>,
    workloads: Api<Workload>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start() -> Plane {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let nodes: Api<Node> = Api::all(store.clone());
    for (name, room) in [("n1", 10), ("n2", 20)] {
        let mut n = Object::new(ObjectMeta::named(name), Node::default());
        n.status.storage = vec![NodeStorage {
            volume_class: "local".into(),
            capacity: gib(room),
            access_modes: vec![AccessMode::ReadWriteOnce],
        }];
        nodes.create(&n).await.unwrap();
    }
    let mut manager = Manager::new(store.clone());
    manager.add(VolumeBinder::builder());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(manager.run(async {
        let _ = stopped.await;
    }));
    Plane {
        claims: Api::namespaced(store.clone(), "default"),
        volumes: Api::all(store.clone()),
        workloads: Api::namespaced(store, "default"),
        stop: Some(stop),
    }
}

fn claim(name: &str, size: i64, class: &str, policy: ReclaimPolicy) -> Object<VolumeClaim> {
    let spec =
        VolumeClaim { size: gib(size), volume_class: class.into(), reclaim_policy: policy, ..Default::default() };
    Object::new(ObjectMeta::namespaced("default", name), spec)
}

fn user(name: &str, claim: &str, node: Option<&str>) -> Object<Workload> {
    let mut w = Workload::command("main", &["sleep", "1"]);
    w.volumes = vec![Volume { name: "data".into(), source: VolumeSource::Claim { claim_name: claim.into() } }];
    w.node_name = node.map(str::to_string);
    Object::new(ObjectMeta::namespaced("default", name), w)
}

impl Plane {
    async fn bound_condition(&self, name: &str, reason: &str) -> String {
        wait_until(&format!("claim {name} says {reason}"), LIMIT, async || {
            let c = self.claims.get(name).await.ok()?;
            let cond = find_condition(&c.status.conditions, BOUND_CONDITION)?;
            (cond.reason == reason).then(|| cond.message.clone())
        })
        .await
    }

    async fn bound(&self, name: &str) -> (Object<VolumeClaim>, Object<PersistentVolume>) {
        let c = wait_until(&format!("claim {name} is bound"), LIMIT, async || {
            let c = self.claims.get(name).await.ok()?;
            (c.status.phase == ClaimPhase::Bound).then_some(c)
        })
        .await;
        let pv = self.volumes.get(c.status.volume_name.as_deref().unwrap()).await.unwrap();
        (c, pv)
    }

    async fn gone<K: orch_core::Resource>(&self, api: &Api<K>, name: &str) {
        wait_until(&format!("{} {name} is gone", K::KIND), LIMIT, async || {
            api.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_claim_waits_for_its_first_consumer_and_gets_a_volume_on_its_node() {
    let p = start().await;
    p.claims.create(&claim("data", 5, "local", ReclaimPolicy::Delete)).await.unwrap();
    let msg = p.bound_condition("data", "WaitForFirstConsumer").await;
    assert!(msg.contains("first workload"), "{msg}");
    let c = p.claims.get("data").await.unwrap();
    assert!(c.metadata.finalizers.contains(&CLAIM_PROTECTION_FINALIZER.to_string()));
    assert!(p.volumes.list(&Default::default()).await.unwrap().items.is_empty(), "nothing provided yet");

    // A workload not yet scheduled provides nothing; once bound to n2 the volume lives there.
    p.workloads.create(&user("db", "data", None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.claims.get("data").await.unwrap().status.phase, ClaimPhase::Pending);
    p.workloads
        .retry_on_conflict("db", |w| {
            w.spec.node_name = Some("n2".into());
            Ok(())
        })
        .await
        .unwrap();
    let (c, pv) = p.bound("data").await;
    assert_eq!(pv.metadata.name, volume_name_for_claim(&c.metadata.uid));
    assert_eq!(pv.spec.node_name.as_deref(), Some("n2"));
    assert_eq!(pv.spec.capacity, gib(5));
    assert_eq!(pv.spec.access_modes, vec![AccessMode::ReadWriteOnce]);
    assert_eq!(pv.spec.claim_ref.as_ref().unwrap().uid, c.metadata.uid);
    assert_eq!(pv.status.phase, VolumePhase::Bound);
    assert_eq!(
        pv.metadata.finalizers,
        vec![VOLUME_RECLAIM_FINALIZER.to_string(), VOLUME_PROTECTION_FINALIZER.to_string()]
    );
    assert!(find_condition(&c.status.conditions, BOUND_CONDITION).unwrap().message.contains("on node n2"));
}

#[tokio::test]
async fn a_claim_no_node_can_hold_says_why() {
    let p = start().await;
    p.claims.create(&claim("fast", 1, "fast", ReclaimPolicy::Delete)).await.unwrap();
    let msg = p.bound_condition("fast", "UnknownVolumeClass").await;
    assert!(msg.contains("no node provides volume class \"fast\""), "{msg}");
    p.claims.create(&claim("huge", 21, "local", ReclaimPolicy::Delete)).await.unwrap();
    let msg = p.bound_condition("huge", "TooLarge").await;
    assert!(msg.contains("the most is 20Gi"), "{msg}");
    let mut shared = claim("shared", 1, "local", ReclaimPolicy::Delete);
    shared.spec.access_mode = AccessMode::ReadWriteMany;
    p.claims.create(&shared).await.unwrap();
    let msg = p.bound_condition("shared", "UnsupportedAccessMode").await;
    assert!(msg.contains("volume class \"local\" does not offer ReadWriteMany"), "{msg}");
}

#[tokio::test]
async fn a_deleted_claim_waits_for_its_workloads_then_deletes_its_volume() {
    let p = start().await;
    p.claims.create(&claim("data", 1, "local", ReclaimPolicy::Delete)).await.unwrap();
    p.workloads.create(&user("db", "data", Some("n1"))).await.unwrap();
    let (_, pv) = p.bound("data").await;
    p.claims.delete("data", &DeleteOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = p.claims.get("data").await.unwrap();
    assert!(held.metadata.is_being_deleted(), "the claim stays while db uses it");
    assert!(!p.volumes.get(&pv.metadata.name).await.unwrap().metadata.is_being_deleted());

    p.workloads.delete("db", &DeleteOptions::default()).await.unwrap();
    p.gone(&p.claims, "data").await;
    // The volume is being deleted; its node's agent deletes the data and lets it go.
    let pv = wait_until("the volume is being deleted, no longer protected", LIMIT, async || {
        let pv = p.volumes.get(&pv.metadata.name).await.ok()?;
        (pv.metadata.is_being_deleted() && pv.metadata.finalizers == [VOLUME_RECLAIM_FINALIZER]).then_some(pv)
    })
    .await;
    p.volumes
        .retry_on_conflict(&pv.metadata.name, |v| {
            v.metadata.finalizers.retain(|f| f != VOLUME_RECLAIM_FINALIZER);
            Ok(())
        })
        .await
        .unwrap();
    p.gone(&p.volumes, &pv.metadata.name).await;
}

#[tokio::test]
async fn a_retained_volume_outlives_its_claim_released() {
    let p = start().await;
    p.claims.create(&claim("keep", 1, "local", ReclaimPolicy::Retain)).await.unwrap();
    p.workloads.create(&user("db", "keep", Some("n1"))).await.unwrap();
    let (_, pv) = p.bound("keep").await;
    assert_eq!(pv.spec.reclaim_policy, ReclaimPolicy::Retain);
    p.workloads.delete("db", &DeleteOptions::default()).await.unwrap();
    p.claims.delete("keep", &DeleteOptions::default()).await.unwrap();
    p.gone(&p.claims, "keep").await;
    let pv = wait_until("the volume is released", LIMIT, async || {
        let pv = p.volumes.get(&pv.metadata.name).await.ok()?;
        (pv.status.phase == VolumePhase::Released).then_some(pv)
    })
    .await;
    assert!(!pv.metadata.is_being_deleted(), "a retained volume is kept");
    assert_eq!(pv.metadata.finalizers, [VOLUME_RECLAIM_FINALIZER], "no longer protected: an operator may delete it");
    assert_eq!(pv.spec.claim_ref.as_ref().unwrap().name, "keep", "it still says whose data it holds");
}

#[tokio::test]
async fn a_bound_volume_deleted_by_hand_waits_for_its_claim_and_a_vanished_one_is_lost() {
    let p = start().await;
    p.claims.create(&claim("data", 1, "local", ReclaimPolicy::Delete)).await.unwrap();
    p.workloads.create(&user("db", "data", Some("n1"))).await.unwrap();
    let (_, pv) = p.bound("data").await;
    // Deleted by hand while bound: protected, it stays (and so does the data) while the claim does.
    p.volumes.delete(&pv.metadata.name, &DeleteOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = p.volumes.get(&pv.metadata.name).await.unwrap();
    assert!(held.metadata.finalizers.contains(&VOLUME_PROTECTION_FINALIZER.to_string()), "{:?}", held.metadata);
    assert_eq!(p.claims.get("data").await.unwrap().status.phase, ClaimPhase::Bound);

    // Gone all the same (its finalizers forced away): the claim is lost.
    p.volumes
        .retry_on_conflict(&pv.metadata.name, |v| {
            v.metadata.finalizers.clear();
            Ok(())
        })
        .await
        .unwrap();
    p.gone(&p.volumes, &pv.metadata.name).await;
    let msg = p.bound_condition("data", "VolumeLost").await;
    assert!(msg.contains("the data is lost"), "{msg}");
    assert_eq!(p.claims.get("data").await.unwrap().status.phase, ClaimPhase::Lost);
}

#[tokio::test]
async fn a_claim_deleted_before_it_was_marked_bound_still_reclaims_its_volume() {
    let p = start().await;
    let c = p.claims.create(&claim("data", 1, "local", ReclaimPolicy::Delete)).await.unwrap();
    // The volume exists (provided), the claim does not say so yet: its status lags.
    let name = volume_name_for_claim(&c.metadata.uid);
    let mut meta = ObjectMeta::named(name.as_str());
    meta.finalizers = vec![VOLUME_RECLAIM_FINALIZER.into(), VOLUME_PROTECTION_FINALIZER.into()];
    let spec = PersistentVolume {
        capacity: gib(1),
        access_modes: vec![AccessMode::ReadWriteOnce],
        volume_class: "local".into(),
        node_name: Some("n1".into()),
        claim_ref: Some(orch_core::kinds::ClaimReference {
            namespace: "default".into(),
            name: "data".into(),
            uid: c.metadata.uid.clone(),
        }),
        ..Default::default()
    };
    p.volumes.create(&Object::new(meta, spec)).await.unwrap();
    wait_until("the claim is protected", LIMIT, async || {
        let c = p.claims.get("data").await.ok()?;
        c.metadata.finalizers.contains(&CLAIM_PROTECTION_FINALIZER.to_string()).then_some(())
    })
    .await;
    p.claims.delete("data", &DeleteOptions::default()).await.unwrap();
    p.gone(&p.claims, "data").await;
    wait_until("its volume is being deleted", LIMIT, async || {
        let pv = p.volumes.get(&name).await.ok()?;
        (pv.metadata.is_being_deleted() && pv.metadata.finalizers == [VOLUME_RECLAIM_FINALIZER]).then_some(())
    })
    .await;
}
