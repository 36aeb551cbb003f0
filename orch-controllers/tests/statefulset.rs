//! The stateful set controller on the memory and embedded stores in virtual time, mostly with the
//! workloads' readiness written by the test (no agent runs them, so the test decides when each
//! replica is ready): ordered start, `minReadySeconds`, stable names, a claim per replica kept on
//! scale down and after the set is gone, partitioned rolling update from the highest ordinal,
//! a replica below the partition recreated on the old revision when no replica runs it any more,
//! parallel start, `OnDelete`, a claim being deleted, a restarted controller, and bad input
//! refused. Two more: on simulated nodes (agents, probes, the scheduler), ordered start and the
//! highest-first update checked at every watch event; and with the scheduler's volume binding and
//! the volume binder, a replica deleted comes back on the node its data lives on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{BACKENDS, Backend};
use orch_controllers::{GarbageCollector, StatefulSetController};
use orch_core::kinds::{
    AccessMode, Condition, ConditionStatus, EnvVar, ORDINAL_LABEL, Phase, PodManagementPolicy, ReclaimPolicy,
    StatefulRollingUpdate, StatefulSet, StatefulSetUpdate, TEMPLATE_HASH_LABEL, VolumeClaim, VolumeClaimTemplate,
    VolumeMount, VolumeSource, Workload, find_condition, set_condition, stateful_set_condition,
};
use orch_core::store::DeleteOptions;
use orch_core::{Api, Clock, ListParams, Manager, Object, ObjectMeta, Store, Timestamp, TokioClock, testkit};

const LIMIT: Duration = Duration::from_secs(600);
/// Long enough for the controller to act many times over: what has not happened by then waits.
const SETTLE: Duration = Duration::from_secs(30);

struct Plane {
    store: Arc<dyn Store>,
    clock: Arc<TokioClock>,
    task: tokio::task::JoinHandle<orch_core::Result<()>>,
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Plane {
    async fn start(backend: Backend, name: &str) -> Plane {
        let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
        let store = common::store(backend, name, clock.clone());
        let task = Plane::manager(&store, &clock);
        Plane { store, clock, task }
    }

    fn manager(store: &Arc<dyn Store>, clock: &Arc<TokioClock>) -> tokio::task::JoinHandle<orch_core::Result<()>> {
        let mut manager = Manager::new(store.clone()).with_clock(clock.clone());
        manager.add(StatefulSetController::builder());
        manager.add(GarbageCollector::builtin());
        tokio::spawn(manager.run(std::future::pending()))
    }

    /// Stops the controllers and starts fresh ones (empty caches, nothing remembered).
    async fn restart(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.task = Plane::manager(&self.store, &self.clock);
    }

    fn sets(&self) -> Api<StatefulSet> {
        Api::namespaced(self.store.clone(), "default")
    }

    fn workloads(&self) -> Api<Workload> {
        Api::namespaced(self.store.clone(), "default")
    }

    fn claims(&self) -> Api<VolumeClaim> {
        Api::namespaced(self.store.clone(), "default")
    }

    /// The workloads that exist, by name, sorted.
    async fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .workloads()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|w| w.metadata.name)
            .collect();
        names.sort();
        names
    }

    async fn wait_names(&self, want: &[&str]) {
        testkit::wait_until(&format!("workloads {want:?}"), LIMIT, async || (self.names().await == want).then_some(()))
            .await;
    }

    async fn claim_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .claims()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| c.metadata.name)
            .collect();
        names.sort();
        names
    }

    /// Marks a workload running and ready (long ago), as an agent would once its probe passes.
    async fn ready(&self, name: &str) {
        self.ready_since(name, Timestamp(1)).await;
    }

    /// Marks a workload running and ready since `since`.
    async fn ready_since(&self, name: &str, since: Timestamp) {
        let w = self.workloads().get(name).await.unwrap();
        let mut status = w.status.clone();
        status.phase = Phase::Running;
        set_condition(&mut status.conditions, Condition::new("Ready", ConditionStatus::True, "Test"), since);
        self.workloads().write_status(&w.metadata, &status).await.unwrap();
    }

    /// Waits for `name` to exist and marks it ready.
    async fn appear_and_ready(&self, name: &str) -> Object<Workload> {
        let w = testkit::wait_until(&format!("workload {name}"), LIMIT, async || {
            self.workloads().get(name).await.ok().filter(|w| !w.metadata.is_being_deleted())
        })
        .await;
        self.ready(name).await;
        w
    }

    async fn set(&self, f: impl Fn(&mut StatefulSet)) {
        self.sets()
            .retry_on_conflict("db", |s| {
                f(&mut s.spec);
                Ok(())
            })
            .await
            .unwrap();
    }

    async fn hash(&self, name: &str) -> String {
        let w = self.workloads().get(name).await.unwrap();
        w.metadata.labels.get(TEMPLATE_HASH_LABEL).cloned().unwrap_or_default()
    }

    async fn uid(&self, name: &str) -> String {
        self.workloads().get(name).await.unwrap().metadata.uid
    }
}

fn db(replicas: u32) -> StatefulSet {
    let mut w = Workload::command("main", &["/bin/db", "--data", "/data"]);
    w.containers[0].env = vec![EnvVar { name: "VERSION".into(), value: "1".into() }];
    w.containers[0].volume_mounts =
        vec![VolumeMount { name: "data".into(), mount_path: "/data".into(), read_only: false }];
    let mut s = StatefulSet::new("db", replicas, w);
    s.volume_claim_templates = vec![VolumeClaimTemplate {
        name: "data".into(),
        spec: VolumeClaim {
            size: "1Gi".parse().unwrap(),
            access_mode: AccessMode::ReadWriteOnce,
            volume_class: "local".into(),
            reclaim_policy: ReclaimPolicy::Retain,
        },
    }];
    s
}

fn version(s: &mut StatefulSet, v: &str) {
    s.template.spec.containers[0].env[0].value = v.into();
}

async fn create(plane: &Plane, spec: StatefulSet) -> Object<StatefulSet> {
    plane.sets().create(&Object::new(ObjectMeta::named("db"), spec)).await.unwrap()
}

async fn updated_message(plane: &Plane) -> String {
    let s = plane.sets().get("db").await.unwrap();
    find_condition(&s.status.conditions, stateful_set_condition::UPDATED).map(|c| c.message.clone()).unwrap_or_default()
}

async fn updated_reason(plane: &Plane) -> String {
    let s = plane.sets().get("db").await.unwrap();
    find_condition(&s.status.conditions, stateful_set_condition::UPDATED).map(|c| c.reason.clone()).unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn ordered_start_creates_each_replica_with_its_claim_once_the_one_before_is_ready() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "sts-ordered").await;
        let set = create(&plane, db(3)).await;
        plane.wait_names(&["db-0"]).await;
        tokio::time::sleep(SETTLE).await;
        assert_eq!(plane.names().await, ["db-0"], "db-1 waits for db-0 to be ready ({backend:?})");
        assert_eq!(plane.claim_names().await, ["data-db-0"]);
        let message = updated_message(&plane).await;
        assert!(message.ends_with("waiting for db-0 to be available"), "{message}");

        let w = plane.workloads().get("db-0").await.unwrap();
        assert_eq!(
            w.spec.volumes.iter().find(|v| v.name == "data").map(|v| &v.source),
            Some(&VolumeSource::Claim { claim_name: "data-db-0".into() }),
            "the template's claim volume names the replica's claim"
        );
        assert_eq!(w.metadata.labels.get("app").map(String::as_str), Some("db"));
        assert_eq!(w.metadata.labels.get(ORDINAL_LABEL).map(String::as_str), Some("0"));
        assert_eq!(w.metadata.labels.get(TEMPLATE_HASH_LABEL), Some(&set.spec.template.hash()));
        assert_eq!(w.metadata.controller_owner().map(|o| o.uid.clone()), Some(set.metadata.uid.clone()));
        let claim = plane.claims().get("data-db-0").await.unwrap();
        assert!(claim.metadata.owner_references.is_empty(), "claims are not owned by the set");
        assert_eq!(claim.spec.size, "1Gi".parse().unwrap());
        assert!(claim.metadata.create_revision < w.metadata.create_revision, "the claim comes first");

        plane.ready("db-0").await;
        plane.wait_names(&["db-0", "db-1"]).await;
        tokio::time::sleep(SETTLE).await;
        assert_eq!(plane.names().await, ["db-0", "db-1"], "db-2 waits for db-1 ({backend:?})");
        plane.ready("db-1").await;
        plane.appear_and_ready("db-2").await;
        assert_eq!(plane.claim_names().await, ["data-db-0", "data-db-1", "data-db-2"]);
        let done = testkit::wait_until("status of 3 ready replicas", LIMIT, async || {
            let s = plane.sets().get("db").await.ok()?;
            (s.status.ready_replicas == 3).then_some(s)
        })
        .await;
        assert_eq!(done.status.replicas, 3);
        assert_eq!(done.status.available_replicas, 3);
        assert_eq!(done.status.updated_replicas, 3);
        assert_eq!(done.status.current_revision, done.status.update_revision);
        assert_eq!(done.status.update_revision, format!("db-{}", set.spec.template.hash()));
        assert_eq!(updated_reason(&plane).await, "RolloutComplete");
    }
}

#[tokio::test(start_paused = true)]
async fn ordered_start_waits_for_min_ready_seconds() {
    let plane = Plane::start(Backend::Memory, "sts-min-ready").await;
    let mut spec = db(2);
    spec.min_ready_seconds = 60;
    create(&plane, spec).await;
    plane.wait_names(&["db-0"]).await;
    let since = plane.clock.now();
    plane.ready_since("db-0", since).await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(plane.names().await, ["db-0"], "ready, not yet available: db-1 waits");
    let s = plane.sets().get("db").await.unwrap();
    assert_eq!((s.status.ready_replicas, s.status.available_replicas), (1, 0));
    plane.wait_names(&["db-0", "db-1"]).await;
    let w = plane.workloads().get("db-1").await.unwrap();
    let waited = w.metadata.creation_timestamp.unwrap().since(since);
    assert!(waited >= Duration::from_secs(60), "created {waited:?} after db-0 was ready");
}

#[tokio::test(start_paused = true)]
async fn a_deleted_or_failed_replica_comes_back_under_its_name_with_its_claim() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "sts-stable").await;
        create(&plane, db(3)).await;
        for name in ["db-0", "db-1", "db-2"] {
            plane.appear_and_ready(name).await;
        }
        let claim_uid = plane.claims().get("data-db-1").await.unwrap().metadata.uid;
        let old = plane.uid("db-1").await;
        plane.workloads().delete("db-1", &DeleteOptions::default()).await.unwrap();
        let back = testkit::wait_until("db-1 created again", LIMIT, async || {
            plane.workloads().get("db-1").await.ok().filter(|w| w.metadata.uid != old)
        })
        .await;
        assert_eq!(
            back.spec.volumes.iter().find(|v| v.name == "data").map(|v| &v.source),
            Some(&VolumeSource::Claim { claim_name: "data-db-1".into() })
        );
        assert_eq!(plane.claims().get("data-db-1").await.unwrap().metadata.uid, claim_uid, "the same claim, kept");
        plane.ready("db-1").await;

        let failed_uid = plane.uid("db-2").await;
        let w = plane.workloads().get("db-2").await.unwrap();
        let mut status = w.status.clone();
        status.phase = Phase::Failed;
        plane.workloads().write_status(&w.metadata, &status).await.unwrap();
        testkit::wait_until("db-2 created again after failing", LIMIT, async || {
            plane.workloads().get("db-2").await.ok().filter(|w| w.metadata.uid != failed_uid)
        })
        .await;
        assert_eq!(plane.names().await, ["db-0", "db-1", "db-2"], "({backend:?})");
        assert_eq!(plane.claim_names().await, ["data-db-0", "data-db-1", "data-db-2"]);
        let events: Api<orch_core::kinds::Event> = Api::namespaced(plane.store.clone(), "default");
        let events = events.list(&ListParams::default()).await.unwrap().items;
        assert!(
            events.iter().any(|e| e.spec.reason == "RecreatingFailedWorkload" && e.spec.message.contains("db-2")),
            "a warning says db-2 failed and comes back"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_controller_keeps_every_replica_and_claim() {
    for backend in BACKENDS {
        let mut plane = Plane::start(backend, "sts-restart").await;
        create(&plane, db(2)).await;
        for name in ["db-0", "db-1"] {
            plane.appear_and_ready(name).await;
        }
        let uids: Vec<String> = futures::future::join_all(["db-0", "db-1"].map(|n| plane.uid(n))).await;
        let claims = plane.claim_names().await;
        plane.restart().await;
        plane.set(|s| s.replicas = 3).await;
        plane.appear_and_ready("db-2").await;
        let after: Vec<String> = futures::future::join_all(["db-0", "db-1"].map(|n| plane.uid(n))).await;
        assert_eq!(after, uids, "the same workloads, adopted by name ({backend:?})");
        assert_eq!(plane.claim_names().await, [claims, vec!["data-db-2".to_string()]].concat());
    }
}

#[tokio::test(start_paused = true)]
async fn scale_down_goes_from_the_highest_one_at_a_time_and_keeps_the_claims() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "sts-scale-down").await;
        create(&plane, db(3)).await;
        for name in ["db-0", "db-1", "db-2"] {
            plane.appear_and_ready(name).await;
        }
        // A finalizer holds db-2 while it stops, as an agent's pre-stop delay would.
        plane
            .workloads()
            .retry_on_conflict("db-2", |w| {
                w.metadata.finalizers.push("test.orch.dev/hold".into());
                Ok(())
            })
            .await
            .unwrap();
        plane.set(|s| s.replicas = 1).await;
        testkit::wait_until("db-2 terminating", LIMIT, async || {
            plane.workloads().get("db-2").await.ok().filter(|w| w.metadata.is_being_deleted())
        })
        .await;
        tokio::time::sleep(SETTLE).await;
        let db1 = plane.workloads().get("db-1").await.unwrap();
        assert!(!db1.metadata.is_being_deleted(), "db-1 waits until db-2 is gone ({backend:?})");
        let message = updated_message(&plane).await;
        assert!(message.ends_with("waiting for db-2 to be gone"), "{message}");
        plane
            .workloads()
            .retry_on_conflict("db-2", |w| {
                w.metadata.finalizers.clear();
                Ok(())
            })
            .await
            .unwrap();
        plane.wait_names(&["db-0"]).await;
        assert_eq!(plane.claim_names().await, ["data-db-0", "data-db-1", "data-db-2"], "claims are kept");

        // Scaling up again brings db-1 back on its old claim.
        let claim_uid = plane.claims().get("data-db-1").await.unwrap().metadata.uid;
        plane.set(|s| s.replicas = 2).await;
        plane.appear_and_ready("db-1").await;
        assert_eq!(plane.claims().get("data-db-1").await.unwrap().metadata.uid, claim_uid);

        // Deleting the set takes its workloads (garbage collection) but not its claims.
        plane.sets().delete("db", &DeleteOptions::default()).await.unwrap();
        plane.wait_names(&[]).await;
        assert_eq!(plane.claim_names().await, ["data-db-0", "data-db-1", "data-db-2"], "({backend:?})");
    }
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_rolling_update_replaces_only_the_ordinals_above_it_highest_first() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "sts-partition").await;
        let mut spec = db(4);
        spec.update_strategy = StatefulSetUpdate::RollingUpdate(StatefulRollingUpdate { partition: 2 });
        let v1 = create(&plane, spec).await.spec.template.hash();
        for name in ["db-0", "db-1", "db-2", "db-3"] {
            plane.appear_and_ready(name).await;
        }
        let before: Vec<String> = futures::future::join_all(["db-0", "db-1", "db-2"].map(|n| plane.uid(n))).await;
        plane.set(|s| version(s, "2")).await;
        let v2 = plane.sets().get("db").await.unwrap().spec.template.hash();
        assert_ne!(v1, v2);

        // db-3 first; db-2 keeps running the old revision until the new db-3 is ready.
        testkit::wait_until("db-3 on the new revision", LIMIT, async || {
            plane.workloads().get("db-3").await.ok().filter(|w| w.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(&v2))
        })
        .await;
        tokio::time::sleep(SETTLE).await;
        assert_eq!(plane.uid("db-2").await, before[2], "db-2 waits for db-3 ({backend:?})");
        assert_eq!(plane.hash("db-2").await, v1);
        assert_eq!(updated_reason(&plane).await, "RollingUpdate");
        plane.ready("db-3").await;
        testkit::wait_until("db-2 on the new revision", LIMIT, async || {
            plane.workloads().get("db-2").await.ok().filter(|w| w.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(&v2))
        })
        .await;
        plane.ready("db-2").await;
        let s = testkit::wait_until("partitioned status", LIMIT, async || {
            let s = plane.sets().get("db").await.ok()?;
            (s.status.updated_replicas == 2 && s.status.ready_replicas == 4).then_some(s)
        })
        .await;
        tokio::time::sleep(SETTLE).await;
        assert_eq!(plane.uid("db-0").await, before[0], "below the partition: untouched");
        assert_eq!(plane.uid("db-1").await, before[1]);
        assert_eq!(s.status.current_replicas, 2);
        assert_eq!(s.status.current_revision, format!("db-{v1}"));
        assert_eq!(s.status.update_revision, format!("db-{v2}"));
        assert_eq!(updated_reason(&plane).await, "PartitionedUpdate");

        // A replica below the partition that is deleted comes back on the current revision.
        plane.workloads().delete("db-1", &DeleteOptions::default()).await.unwrap();
        let back = testkit::wait_until("db-1 back", LIMIT, async || {
            plane.workloads().get("db-1").await.ok().filter(|w| w.metadata.uid != before[1])
        })
        .await;
        assert_eq!(back.metadata.labels.get(TEMPLATE_HASH_LABEL), Some(&v1), "({backend:?})");
        assert_eq!(back.spec.containers[0].env[0].value, "1");
        assert_eq!(
            back.spec.volumes.iter().find(|v| v.name == "data").map(|v| &v.source),
            Some(&VolumeSource::Claim { claim_name: "data-db-1".into() }),
            "the current revision, with its own claim"
        );
        assert_eq!(back.metadata.labels.get(ORDINAL_LABEL).map(String::as_str), Some("1"));
        plane.ready("db-1").await;

        // Partition 0: the rest follow, db-1 before db-0, and the revision becomes current.
        plane
            .set(|s| s.update_strategy = StatefulSetUpdate::RollingUpdate(StatefulRollingUpdate { partition: 0 }))
            .await;
        testkit::wait_until("db-1 on the new revision", LIMIT, async || {
            plane.workloads().get("db-1").await.ok().filter(|w| w.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(&v2))
        })
        .await;
        assert_eq!(plane.hash("db-0").await, v1, "db-0 waits for db-1 ({backend:?})");
        plane.ready("db-1").await;
        testkit::wait_until("db-0 on the new revision", LIMIT, async || {
            plane.workloads().get("db-0").await.ok().filter(|w| w.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(&v2))
        })
        .await;
        plane.ready("db-0").await;
        let s = testkit::wait_until("rollout complete", LIMIT, async || {
            let s = plane.sets().get("db").await.ok()?;
            (s.status.current_revision == s.status.update_revision && s.status.ready_replicas == 4).then_some(s)
        })
        .await;
        assert_eq!(s.status.current_replicas, 4);
        assert_eq!(plane.claim_names().await, ["data-db-0", "data-db-1", "data-db-2", "data-db-3"]);
    }
}

#[tokio::test(start_paused = true)]
async fn below_the_partition_a_replica_keeps_the_current_revision_when_no_replica_runs_it() {
    for backend in BACKENDS {
        let mut plane = Plane::start(backend, "sts-partition-alone").await;
        let mut spec = db(1);
        spec.update_strategy = StatefulSetUpdate::RollingUpdate(StatefulRollingUpdate { partition: 1 });
        let v1 = create(&plane, spec).await.spec.template;
        let old = plane.appear_and_ready("db-0").await.metadata.uid;
        let s = testkit::wait_until("the current template recorded", LIMIT, async || {
            plane.sets().get("db").await.ok().filter(|s| s.status.current_template.is_some())
        })
        .await;
        assert_eq!(s.status.current_template.as_ref(), Some(&v1), "({backend:?})");
        assert_eq!(s.status.current_revision, format!("db-{}", v1.hash()));

        plane.set(|s| version(s, "2")).await;
        testkit::wait_until("the set saw the change", LIMIT, async || {
            (updated_reason(&plane).await == "PartitionedUpdate").then_some(())
        })
        .await;
        // A status without the template (as an earlier controller wrote it) gets it back from
        // the replica that runs the current revision.
        loop {
            let s = plane.sets().get("db").await.unwrap();
            let mut status = s.status.clone();
            status.current_template = None;
            match plane.sets().write_status(&s.metadata, &status).await {
                Ok(_) => break,
                Err(e) if e.is_conflict() => {}
                Err(e) => panic!("{e}"),
            }
        }
        testkit::wait_until("the current template recorded again", LIMIT, async || {
            plane.sets().get("db").await.ok().filter(|s| s.status.current_template.as_ref() == Some(&v1))
        })
        .await;
        // Fresh controllers remember nothing: the old template comes from the set's status.
        plane.restart().await;
        // db-0 is the only replica: once it is gone, none runs the current revision.
        plane.workloads().delete("db-0", &DeleteOptions::default()).await.unwrap();
        let back = testkit::wait_until("db-0 back", LIMIT, async || {
            plane.workloads().get("db-0").await.ok().filter(|w| w.metadata.uid != old)
        })
        .await;
        assert_eq!(back.metadata.labels.get(TEMPLATE_HASH_LABEL), Some(&v1.hash()), "({backend:?})");
        assert_eq!(back.spec.containers[0].env[0].value, "1", "the old template's spec");
        assert_eq!(back.spec.containers[0].command, v1.spec.containers[0].command);
        assert_eq!(
            back.spec.volumes.iter().find(|v| v.name == "data").map(|v| &v.source),
            Some(&VolumeSource::Claim { claim_name: "data-db-0".into() })
        );
        assert_eq!(back.metadata.labels.get(ORDINAL_LABEL).map(String::as_str), Some("0"));
        assert_eq!(back.metadata.labels.get("app").map(String::as_str), Some("db"));
        plane.ready("db-0").await;

        // Scaling up: db-1 is at the partition and gets the new revision; db-0 keeps the old.
        plane.set(|s| s.replicas = 2).await;
        let db1 = plane.appear_and_ready("db-1").await;
        let v2 = plane.sets().get("db").await.unwrap().spec.template.hash();
        assert_eq!(db1.metadata.labels.get(TEMPLATE_HASH_LABEL), Some(&v2));
        assert_eq!(db1.spec.containers[0].env[0].value, "2");
        let s = testkit::wait_until("two ready replicas", LIMIT, async || {
            plane.sets().get("db").await.ok().filter(|s| s.status.ready_replicas == 2)
        })
        .await;
        assert_eq!(s.status.current_revision, format!("db-{}", v1.hash()), "({backend:?})");
        assert_eq!(s.status.current_template.as_ref(), Some(&v1));
        assert_eq!((s.status.current_replicas, s.status.updated_replicas), (1, 1));
        assert_eq!(plane.hash("db-0").await, v1.hash());
    }
}

#[tokio::test(start_paused = true)]
async fn parallel_starts_and_stops_every_replica_at_once() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "sts-parallel").await;
        let mut spec = db(3);
        spec.pod_management_policy = PodManagementPolicy::Parallel;
        create(&plane, spec).await;
        plane.wait_names(&["db-0", "db-1", "db-2"]).await;
        let list = plane.workloads().list(&ListParams::default()).await.unwrap().items;
        assert!(list.iter().all(|w| w.status.phase == Phase::Pending), "none was ready: none waited ({backend:?})");
        assert_eq!(plane.claim_names().await, ["data-db-0", "data-db-1", "data-db-2"]);
        plane.set(|s| s.replicas = 0).await;
        plane.wait_names(&[]).await;
        assert_eq!(plane.claim_names().await.len(), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn on_delete_replaces_only_what_the_user_deletes() {
    for backend in BACKENDS {
        let plane = Plane::start(backend, "sts-on-delete").await;
        let mut spec = db(3);
        spec.update_strategy = StatefulSetUpdate::OnDelete;
        let v1 = create(&plane, spec).await.spec.template.hash();
        for name in ["db-0", "db-1", "db-2"] {
            plane.appear_and_ready(name).await;
        }
        plane.set(|s| version(s, "2")).await;
        let v2 = plane.sets().get("db").await.unwrap().spec.template.hash();
        testkit::wait_until("the set saw the change", LIMIT, async || {
            (updated_reason(&plane).await == "WaitingForDeletes").then_some(())
        })
        .await;
        tokio::time::sleep(SETTLE).await;
        for name in ["db-0", "db-1", "db-2"] {
            assert_eq!(plane.hash(name).await, v1, "{name} is not replaced by itself ({backend:?})");
        }
        plane.workloads().delete("db-1", &DeleteOptions::default()).await.unwrap();
        testkit::wait_until("db-1 on the new revision", LIMIT, async || {
            plane.workloads().get("db-1").await.ok().filter(|w| w.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(&v2))
        })
        .await;
        assert_eq!(plane.hash("db-0").await, v1);
        assert_eq!(plane.hash("db-2").await, v1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_claim_being_deleted_holds_its_replica_back_with_a_reason() {
    let plane = Plane::start(Backend::Memory, "sts-claim-terminating").await;
    // A leftover claim of replica 0, held by a finalizer while it is deleted.
    let mut meta = ObjectMeta::named("data-db-0");
    meta.finalizers.push("test.orch.dev/hold".into());
    plane.claims().create(&Object::new(meta, db(1).volume_claim_templates[0].spec.clone())).await.unwrap();
    plane.claims().delete("data-db-0", &DeleteOptions::default()).await.unwrap();
    create(&plane, db(1)).await;
    let s = testkit::wait_until("ReplicaFailure", LIMIT, async || {
        let s = plane.sets().get("db").await.ok()?;
        find_condition(&s.status.conditions, stateful_set_condition::REPLICA_FAILURE).cloned()
    })
    .await;
    assert_eq!(s.reason, "ClaimTerminating");
    assert!(s.message.contains("data-db-0"), "{}", s.message);
    assert!(plane.names().await.is_empty(), "db-0 does not start on a claim being deleted");
    plane
        .claims()
        .retry_on_conflict("data-db-0", |c| {
            c.metadata.finalizers.clear();
            Ok(())
        })
        .await
        .unwrap();
    plane.wait_names(&["db-0"]).await;
    let claim = plane.claims().get("data-db-0").await.unwrap();
    assert!(!claim.metadata.is_being_deleted(), "a fresh claim");
    let set = testkit::wait_until("condition cleared", LIMIT, async || {
        let s = plane.sets().get("db").await.ok()?;
        find_condition(&s.status.conditions, stateful_set_condition::REPLICA_FAILURE).is_none().then_some(s)
    })
    .await;
    assert_eq!(set.status.replicas, 1);
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_refused_naming_each_field() {
    let plane = Plane::start(Backend::Memory, "sts-bad").await;
    let mut spec = db(2);
    spec.replicas = orch_core::kinds::MAX_REPLICAS + 1;
    spec.selector = orch_core::LabelSelector::from_labels([("app", "other")]);
    spec.volume_claim_templates[0].spec.volume_class = String::new();
    spec.volume_claim_templates.push(spec.volume_claim_templates[0].clone());
    spec.template
        .spec
        .volumes
        .push(orch_core::kinds::Volume { name: "data".into(), source: VolumeSource::EmptyDir { size_limit: None } });
    let e = plane.sets().create(&Object::new(ObjectMeta::named("db"), spec)).await.unwrap_err();
    let text = e.to_string();
    for field in [
        "spec.replicas: must be at most 100000",
        "spec.template.metadata.labels: must match spec.selector",
        "spec.volumeClaimTemplates[0].spec.volumeClass",
        "spec.volumeClaimTemplates[1].name: duplicate claim template name \"data\"",
        "spec.template.spec.volumes[0].name",
    ] {
        assert!(text.contains(field), "{field} not in {text}");
    }
    assert!(plane.sets().list(&ListParams::default()).await.unwrap().items.is_empty());
}

/// What a watcher of every workload saw, in store order: each creation and deletion, with the
/// state of the other replicas at that revision (name -> (template hash, ready)).
#[derive(Debug, Default)]
struct Journal {
    state: std::collections::BTreeMap<String, (String, bool)>,
    created: Vec<String>,
    deleted: Vec<String>,
    problems: Vec<String>,
}

async fn journal(store: Arc<dyn Store>, hash_of_new: Arc<std::sync::Mutex<String>>) -> Arc<std::sync::Mutex<Journal>> {
    use futures::StreamExt;
    let api: Api<Workload> = Api::namespaced(store, "default");
    let listed = api.list(&ListParams::default()).await.unwrap();
    let mut stream = api.watch(&ListParams::default(), Some(listed.revision + 1)).await.unwrap();
    let out: Arc<std::sync::Mutex<Journal>> = Arc::default();
    let j = out.clone();
    tokio::spawn(async move {
        while let Some(Ok(e)) = stream.next().await {
            let mut guard = j.lock().unwrap();
            let j = &mut *guard;
            match e {
                orch_core::Event::Added(w) | orch_core::Event::Modified(w) => {
                    let name = w.metadata.name.clone();
                    let i = orch_controllers::statefulset::ordinal_of("db", &name).unwrap();
                    if !j.state.contains_key(&name) {
                        // Ordered start: every replica below is ready.
                        for k in 0..i {
                            if !j.state.get(&format!("db-{k}")).is_some_and(|s| s.1) {
                                let msg = format!("{name} created before db-{k} was ready");
                                j.problems.push(msg);
                            }
                        }
                        j.created.push(name.clone());
                    }
                    let hash = w.metadata.labels.get(TEMPLATE_HASH_LABEL).cloned().unwrap_or_default();
                    let ready = common::is_ready(&w) && !w.metadata.is_being_deleted();
                    j.state.insert(name, (hash, ready));
                }
                orch_core::Event::Deleted(w) => {
                    let name = w.metadata.name.clone();
                    let i = orch_controllers::statefulset::ordinal_of("db", &name).unwrap();
                    // Rolling update: every replica above runs the new template and is ready.
                    let new = hash_of_new.lock().unwrap().clone();
                    for (other, (hash, ready)) in &j.state {
                        let k = orch_controllers::statefulset::ordinal_of("db", other).unwrap();
                        if k > i && (*hash != new || !ready) {
                            let msg = format!("{name} replaced while {other} was {hash} (ready: {ready})");
                            j.problems.push(msg);
                        }
                    }
                    j.state.remove(&name);
                    j.deleted.push(name);
                }
                orch_core::Event::Progress(_) => {}
            }
        }
    });
    out
}

#[tokio::test(start_paused = true)]
async fn on_simulated_nodes_replicas_start_in_order_and_update_from_the_top() {
    for backend in BACKENDS {
        let plane =
            common::Plane::start(backend, "sts-sim", 2, vec![common::with(StatefulSetController::builder)]).await;
        let sets: Api<StatefulSet> = Api::namespaced(plane.store.clone(), "default");
        let spec = StatefulSet::new("db", 3, common::sim(common::service("1"), "SIM_START_DELAY", "2"));
        let new_hash = Arc::new(std::sync::Mutex::new(spec.template.hash()));
        let seen = journal(plane.store.clone(), new_hash.clone()).await;
        sets.create(&Object::new(ObjectMeta::named("db"), spec)).await.unwrap();
        let all_ready = async |version: &str| {
            testkit::wait_until(&format!("3 replicas of version {version} ready"), LIMIT, async || {
                let ws = plane.workloads().list(&ListParams::default()).await.ok()?.items;
                let ok = ws.len() == 3
                    && ws.iter().all(|w| common::is_ready(w) && w.spec.containers[0].env[0].value == version);
                ok.then_some(())
            })
            .await
        };
        all_ready("1").await;
        assert_eq!(seen.lock().unwrap().created, ["db-0", "db-1", "db-2"], "({backend:?})");

        let v2 = common::sim(common::service("2"), "SIM_START_DELAY", "2");
        let mut t = sets.get("db").await.unwrap().spec.template;
        t.spec = v2.clone();
        *new_hash.lock().unwrap() = t.hash();
        sets.retry_on_conflict("db", |s| {
            s.spec.template.spec = v2.clone();
            Ok(())
        })
        .await
        .unwrap();
        all_ready("2").await;
        let j = seen.lock().unwrap();
        assert_eq!(j.deleted, ["db-2", "db-1", "db-0"], "highest first ({backend:?})");
        assert_eq!(j.created, ["db-0", "db-1", "db-2", "db-2", "db-1", "db-0"]);
        assert!(j.problems.is_empty(), "{:?} ({backend:?})", j.problems);
    }
}

#[tokio::test(start_paused = true)]
async fn with_the_scheduler_and_the_binder_a_replica_comes_back_where_its_data_is() {
    use orch_core::kinds::{Node, NodeStorage, PersistentVolume};
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_800_000_000_000)));
    let store = common::store(Backend::Memory, "sts-binding", clock.clone());
    let nodes: Api<Node> = Api::all(store.clone());
    for name in ["n1", "n2", "n3"] {
        let mut n = Object::new(ObjectMeta::named(name), Node::default());
        n.status.allocatable =
            [("cpu", "8"), ("memory", "8Gi"), ("pods", "110")].map(|(k, v)| (k.to_string(), v.parse().unwrap())).into();
        n.status.storage = vec![NodeStorage {
            volume_class: "local".into(),
            capacity: "10Gi".parse().unwrap(),
            access_modes: vec![AccessMode::ReadWriteOnce],
        }];
        nodes.create(&n).await.unwrap();
    }
    let mut manager = Manager::new(store.clone()).with_clock(clock.clone());
    manager.add(orch_scheduler::SchedulerService::with_volumes(
        orch_scheduler::Profile::default_profile(),
        manager.cache(),
        manager.cache(),
    ));
    manager.add(orch_controllers::VolumeBinder::builder());
    manager.add(StatefulSetController::builder());
    manager.add(GarbageCollector::builtin());
    let plane = Plane { store: store.clone(), clock, task: tokio::spawn(manager.run(std::future::pending())) };
    let volumes: Api<PersistentVolume> = Api::all(store);
    create(&plane, db(2)).await;

    // Each replica is placed, and its claim gets a volume on that replica's node.
    let mut homes = Vec::new();
    for i in 0..2 {
        let name = format!("db-{i}");
        let w = testkit::wait_until(&format!("{name} placed"), LIMIT, async || {
            plane.workloads().get(&name).await.ok().filter(|w| w.spec.node_name.is_some())
        })
        .await;
        let node = w.spec.node_name.clone().unwrap();
        let pv = testkit::wait_until(&format!("data-{name} bound"), LIMIT, async || {
            let c = plane.claims().get(&format!("data-{name}")).await.ok()?;
            volumes.get(c.status.volume_name.as_deref()?).await.ok()
        })
        .await;
        assert_eq!(pv.spec.node_name.as_deref(), Some(node.as_str()), "the data lives where {name} runs");
        plane.ready(&name).await;
        homes.push(node);
    }

    // Deleted, each comes back under its name on the node of its data, though that node is now
    // the busiest (the scheduler would otherwise prefer another).
    for (i, home) in homes.iter().enumerate() {
        let name = format!("db-{i}");
        let mut hog = Workload::command("main", &["hog"]);
        hog.node_name = Some(home.clone());
        hog.containers[0].resources.requests.insert("cpu".into(), "7".parse().unwrap());
        plane.workloads().create(&Object::new(ObjectMeta::named(format!("hog-{i}")), hog)).await.unwrap();
        let old = plane.uid(&name).await;
        plane.workloads().delete(&name, &DeleteOptions::default()).await.unwrap();
        let back = testkit::wait_until(&format!("{name} placed again"), LIMIT, async || {
            plane.workloads().get(&name).await.ok().filter(|w| w.metadata.uid != old && w.spec.node_name.is_some())
        })
        .await;
        assert_eq!(back.spec.node_name.as_ref(), Some(home), "{name} follows its data");
        plane.ready(&name).await;
    }
    assert_eq!(volumes.list(&ListParams::default()).await.unwrap().items.len(), 2, "no volume made twice");
}
