//! A stateful set of a small database-like program whose data outlives its workloads: each
//! replica keeps a counter of its starts on its own volume.
//!
//! A control plane (memory store, the scheduler with volume binding, the volume binder, the
//! stateful set controller, the garbage collector) and two node agents running real processes
//! (each providing local volumes under its data root) run in this process. The "database" is this
//! program itself, started by the agent with the argument `counter`: it adds one to the number in
//! `count` in its volume (`ORCH_VOLUME_DATA`, its working directory too) and runs until stopped.
//! The example:
//!
//! - declares the stateful set `db` of two replicas with a claim template `data`: `db-0` starts
//!   first, `db-1` once `db-0` is ready; each gets its claim (`data-db-0`, `data-db-1`), provided on
//!   the node the scheduler chose for it;
//! - deletes `db-0`: it comes back under the same name, on its volume's node, and counts 2;
//! - rolls the set to version 2 (from the highest ordinal down): every replica counts one more;
//! - scales to one replica and back: `db-1`'s claim was kept, and its count goes on;
//! - deletes the set and the claims: `data-db-0`'s volume (policy `Delete`) goes with its data,
//!   `data-db-1`'s (set to `Retain`) stays `Released` with the data.
//!
//! It fails if a count is not what it should be.
//!
//! `cargo run -p orch-examples --example stateful`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orch_controllers::{GarbageCollector, StatefulSetController, VolumeBinder};
use orch_core::kinds::{
    ClaimPhase, EnvVar, PersistentVolume, Phase, ReclaimPolicy, StatefulSet, VolumeClaim, VolumeClaimTemplate,
    VolumePhase, Workload,
};
use orch_core::{Api, DeleteOptions, Manager, Object, ObjectMeta, Runtime, Store};
use orch_runtime::{Agent, AgentConfig, LocalVolumes, ProcessRuntime};
use orch_scheduler::{Profile, SchedulerService};
use orch_store::MemoryStore;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The "database": counts its starts in `count` in its volume, then runs until stopped.
fn counter() -> Result<(), Error> {
    let dir = std::env::var("ORCH_VOLUME_DATA")?;
    let file = Path::new(&dir).join("count");
    let n: u64 = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0) + 1;
    // Written aside and renamed: a crash never leaves half a number.
    std::fs::write(file.with_extension("new"), format!("{n}\n"))?;
    std::fs::rename(file.with_extension("new"), &file)?;
    let version = std::env::var("VERSION").unwrap_or_default();
    println!("start {n} of version {version} in {}", std::env::current_dir()?.display());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The set: `replicas` replicas of version `version`, each with a 64Mi claim `data`.
fn db(replicas: u32, version: &str) -> Result<Object<StatefulSet>, Error> {
    let me = std::env::current_exe()?.to_string_lossy().into_owned();
    let mut w = Workload::command("db", &[&me, "counter"]);
    w.containers[0].env = vec![EnvVar { name: "VERSION".into(), value: version.into() }];
    // It runs inside its volume.
    w.containers[0].working_dir = Some("$(ORCH_VOLUME_DATA)".into());
    let mut set = StatefulSet::new("db", replicas, w);
    set.volume_claim_templates = vec![VolumeClaimTemplate {
        name: "data".into(),
        spec: VolumeClaim { size: "64Mi".parse()?, volume_class: "local".into(), ..Default::default() },
    }];
    Ok(Object::new(ObjectMeta::namespaced("default", "db"), set))
}

struct Cluster {
    workloads: Api<Workload>,
    claims: Api<VolumeClaim>,
    volumes: Api<PersistentVolume>,
    sets: Api<StatefulSet>,
    /// Each node's data root.
    roots: Vec<(String, PathBuf)>,
}

impl Cluster {
    /// Where the data of claim `claim` is: its volume's directory on its node.
    async fn data_of(&self, claim: &str) -> Result<PathBuf, Error> {
        let c = self.claims.get(claim).await?;
        let volume = c.status.volume_name.ok_or("the claim is not bound")?;
        let pv = self.volumes.get(&volume).await?;
        let node = pv.spec.node_name.ok_or("the volume lives on no node")?;
        let root = &self.roots.iter().find(|(n, _)| *n == node).ok_or("an unknown node")?.1;
        Ok(root.join("local-volumes").join(&volume).join("data"))
    }

    /// Waits until replica `name` runs (a new incarnation when `not_uid` is given) and its count
    /// is `count`; answers its node.
    async fn runs_with(&self, name: &str, not_uid: Option<&str>, count: u64) -> Result<(String, String), Error> {
        let w = wait_for(&format!("{name} running"), async || {
            let w = self.workloads.get(name).await.ok()?;
            (w.status.phase == Phase::Running && Some(w.metadata.uid.as_str()) != not_uid).then_some(w)
        })
        .await?;
        let file = self.data_of(&format!("data-{name}")).await?.join("count");
        let seen = wait_for(&format!("{name} counting {count}"), async || {
            let n: u64 = std::fs::read_to_string(&file).ok()?.trim().parse().ok()?;
            (n >= count).then_some(n)
        })
        .await?;
        if seen != count {
            return Err(format!("{name} counted {seen} starts, expected {count}").into());
        }
        let node = w.spec.node_name.unwrap_or_default();
        println!("  {name} on {node}: {count} starts");
        Ok((node, w.metadata.uid))
    }
}

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> Result<T, Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    if std::env::args().nth(1).as_deref() == Some("counter") {
        return counter();
    }
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut manager = Manager::new(store.clone());
    manager.add(SchedulerService::with_volumes(Profile::default_profile(), manager.cache(), manager.cache()));
    manager.add(VolumeBinder::builder());
    manager.add(StatefulSetController::builder());
    manager.add(GarbageCollector::builtin());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let plane = tokio::spawn(manager.run(until_stopped(stopped.clone())));

    let base = std::env::temp_dir().join(format!("orch-stateful-{}", std::process::id()));
    let mut roots = Vec::new();
    let mut agents = Vec::new();
    for name in ["node-1", "node-2"] {
        let root = base.join(name);
        let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(root.join("instances"))?);
        let mut config = AgentConfig::new(name);
        config.data_root = root.join("data");
        config.local_storage = Some("1Gi".parse()?);
        roots.push((name.to_string(), config.data_root.clone()));
        let agent = Agent::new(config, store.clone(), runtime);
        agents.push(tokio::spawn(agent.run(until_stopped(stopped.clone()), true)));
    }
    let c = Cluster {
        workloads: Api::namespaced(store.clone(), "default"),
        claims: Api::namespaced(store.clone(), "default"),
        volumes: Api::all(store.clone()),
        sets: Api::namespaced(store.clone(), "default"),
        roots,
    };

    let result = async {
        println!("The stateful set db, two replicas of version 1, a 64Mi volume each:");
        c.sets.create(&db(2, "1")?).await?;
        let (node0, uid0) = c.runs_with("db-0", None, 1).await?;
        let (_, uid1) = c.runs_with("db-1", None, 1).await?;

        println!("db-0 deleted: it comes back with its data, on its volume's node:");
        c.workloads.delete("db-0", &DeleteOptions::default()).await?;
        let (again, uid0) = c.runs_with("db-0", Some(&uid0), 2).await?;
        if again != node0 {
            return Err(format!("db-0 moved from {node0} to {again}, away from its data").into());
        }

        println!("Rolled to version 2, from the highest ordinal down:");
        c.sets
            .retry_on_conflict("db", |s| {
                s.spec.template.spec.containers[0].env[0].value = "2".into();
                Ok(())
            })
            .await?;
        let (_, uid1) = c.runs_with("db-1", Some(&uid1), 2).await?;
        c.runs_with("db-0", Some(&uid0), 3).await?;

        println!("Scaled to one replica and back: db-1's claim was kept:");
        c.sets
            .retry_on_conflict("db", |s| {
                s.spec.replicas = 1;
                Ok(())
            })
            .await?;
        wait_for("db-1 gone", async || c.workloads.get_opt("db-1").await.ok()?.is_none().then_some(())).await?;
        let kept = c.claims.get("data-db-1").await?;
        if kept.status.phase != ClaimPhase::Bound {
            return Err("data-db-1 is no longer bound".into());
        }
        c.sets
            .retry_on_conflict("db", |s| {
                s.spec.replicas = 2;
                Ok(())
            })
            .await?;
        c.runs_with("db-1", Some(&uid1), 3).await?;

        println!("The set deleted, then its claims: data-db-0 with its data, data-db-1 kept (Retain):");
        let data0 = c.data_of("data-db-0").await?;
        let data1 = c.data_of("data-db-1").await?;
        // A volume's own policy decides; set on the volume, as an operator keeps a volume's data.
        let pv1 = c.claims.get("data-db-1").await?.status.volume_name.unwrap_or_default();
        c.volumes
            .retry_on_conflict(&pv1, |pv| {
                pv.spec.reclaim_policy = ReclaimPolicy::Retain;
                Ok(())
            })
            .await?;
        c.sets.delete("db", &DeleteOptions::default()).await?;
        wait_for("the replicas gone", async || {
            let left = c.workloads.list(&Default::default()).await.ok()?.items.len();
            (left == 0).then_some(())
        })
        .await?;
        c.claims.delete("data-db-0", &DeleteOptions::default()).await?;
        c.claims.delete("data-db-1", &DeleteOptions::default()).await?;
        wait_for("data-db-0's data deleted", async || (!data0.exists()).then_some(())).await?;
        println!("  data-db-0: volume and data deleted");
        wait_for("data-db-1's volume released", async || {
            let pv = c.volumes.get(&pv1).await.ok()?;
            (pv.status.phase == VolumePhase::Released).then_some(())
        })
        .await?;
        let count = std::fs::read_to_string(data1.join("count"))?;
        println!("  data-db-1: volume {pv1} Released, its data kept (count {})", count.trim());
        Ok::<(), Error>(())
    }
    .await;

    stop.send_replace(true);
    plane.await??;
    for a in agents {
        a.await??;
    }
    // Where sizes are enforced each local volume is a loop-mounted file system: unmounted
    // before its directory goes.
    for name in ["node-1", "node-2"] {
        LocalVolumes::unmount_all(base.join(name).join("data").join("local-volumes")).await?;
    }
    let _ = std::fs::remove_dir_all(&base);
    result?;
    println!("Every replica found its data.");
    Ok(())
}
