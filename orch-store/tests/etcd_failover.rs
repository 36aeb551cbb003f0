//! A replicated control plane on etcd: three Manager replicas, each its own OS process (this
//! test binary run again with `ORCH_FAILOVER_REPLICA` set), elect a leader through a store lease.
//! The leader is killed with `SIGKILL` (or frozen with `SIGSTOP`); a standby takes over within
//! the lease's time to live, and the store refuses every write that carries the old leader's
//! fencing token. The in-process variant on the memory store is
//! `controller::standby_takes_over_when_the_leader_dies_and_the_old_leader_is_fenced`.
//!
//! Without an `etcd` binary on `PATH` the tests say they are skipped and return (with
//! `ORCH_REQUIRE_ETCD` set, as CI does, they fail instead).

#![cfg(feature = "etcd")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch_core::controller::leader::{LOCK_KIND, LeaderElectionConfig};
use orch_core::testkit::wait_until;
use orch_core::{
    Action, Api, Context, Controller, ControllerBuilder, DeleteOptions, Error, Guard, Manager, Object, ObjectKey,
    ObjectMeta, Resource, Scope, Store, WriteOptions,
};
use orch_store::EtcdStore;
use orch_store::etcd::LocalEtcd;
use serde::{Deserialize, Serialize};

const REPLICA: &str = "ORCH_FAILOVER_REPLICA";
const ENDPOINTS: &str = "ORCH_FAILOVER_ENDPOINTS";
const PREFIX: &str = "ORCH_FAILOVER_PREFIX";
const PARENT: &str = "ORCH_FAILOVER_PARENT";
const LOG: &str = "ORCH_FAILOVER_LOG";

const LEASE_TTL: Duration = Duration::from_secs(3);
const NS: &str = "orch-system";
const LOCK: &str = "controllers";

/// The object the leader tends: its status names the leader and the token it wrote under.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Duty {
    note: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct DutyStatus {
    leader: String,
    token: u64,
}

impl Resource for Duty {
    const KIND: &'static str = "Duty";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = DutyStatus;
}

/// Stamps the duty with this replica's name and fencing token, through the fenced Api.
struct Steward {
    identity: String,
    log: Arc<std::sync::Mutex<std::fs::File>>,
    /// The fencing token it last wrote under, kept for a late write (see `late_write`).
    held: Arc<std::sync::Mutex<Option<Guard>>>,
}

impl Steward {
    fn say(&self, line: &str) {
        let mut f = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(f, "{line}");
    }
}

#[async_trait::async_trait]
impl Controller for Steward {
    type Kind = Duty;
    type Error = Error;

    async fn reconcile(&self, duty: Arc<Object<Duty>>, ctx: &Context) -> Result<Action, Error> {
        let token = ctx.guard().map_or(0, |g| g.resource_version);
        if let Some(g) = ctx.guard() {
            *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(g.clone());
        }
        if duty.status.leader != self.identity || duty.status.token != token {
            let mut next = (*duty).clone();
            next.status = DutyStatus { leader: self.identity.clone(), token };
            match ctx.api::<Duty>(&duty.metadata.namespace).replace_status(&next).await {
                Ok(_) => self.say(&format!("WROTE {} {token}", self.identity)),
                Err(e @ Error::PreconditionFailed { .. }) => {
                    self.say(&format!("FENCED {} {token}: {e}", self.identity));
                    return Ok(Action::RequeueAfter(Duration::from_millis(200)));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Action::RequeueAfter(Duration::from_millis(200)))
    }
}

/// The file whose appearance makes replica `identity` write the duty once more with the last
/// token it held as leader: a write that was under way when a pause struck, landing after it.
fn poke_path(log: &Path, identity: &str) -> PathBuf {
    log.with_extension(format!("poke-{identity}"))
}

/// Waits for the poke file, then writes the duty's status with the token the replica last
/// held, and logs whether the store took it (`LATE-WROTE`) or refused it (`LATE-FENCED`).
async fn late_write(store: Arc<dyn Store>, steward: Steward) {
    let poke = poke_path(Path::new(&std::env::var(LOG).unwrap_or_default()), &steward.identity);
    while !poke.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let guard = steward.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let token = guard.as_ref().map_or(0, |g| g.resource_version);
    let api: Api<Duty> = Api::namespaced(store, "default");
    let line = match api.get("duty").await {
        Ok(mut duty) => {
            duty.status = DutyStatus { leader: steward.identity.clone(), token };
            match api.fenced(guard).replace_status(&duty).await {
                Ok(_) => format!("LATE-WROTE {} {token}", steward.identity),
                Err(Error::PreconditionFailed { .. }) => format!("LATE-FENCED {} {token}", steward.identity),
                Err(e) => format!("LATE-ERROR {} {token}: {e}", steward.identity),
            }
        }
        Err(e) => format!("LATE-ERROR {} {token}: {e}", steward.identity),
    };
    steward.say(&line);
}

/// The replica's life, in a child process: run a Manager until the test process is gone.
async fn run_replica(identity: String) -> ! {
    let endpoints: Vec<String> = std::env::var(ENDPOINTS).unwrap_or_default().split(',').map(String::from).collect();
    let prefix = std::env::var(PREFIX).unwrap_or_default();
    let parent: u32 = std::env::var(PARENT).ok().and_then(|p| p.parse().ok()).unwrap_or(0);
    let log_path = std::env::var(LOG).unwrap_or_default();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).expect("replica log");
    let log = Arc::new(std::sync::Mutex::new(log));
    {
        let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(endpoints, prefix).await.expect("connect"));
        let config = LeaderElectionConfig {
            lease_ttl: LEASE_TTL,
            retry_period: Duration::from_millis(200),
            ..LeaderElectionConfig::new(NS, LOCK, &identity)
        };
        let mut manager = Manager::new(store.clone()).with_leader_election(config);
        let held = Arc::new(std::sync::Mutex::new(None));
        let steward = Steward { identity: identity.clone(), log: log.clone(), held: held.clone() };
        steward.say(&format!("STARTED {identity} pid {}", std::process::id()));
        manager.add(ControllerBuilder::new("steward", steward));
        let late = Steward { identity: identity.clone(), log: log.clone(), held: held.clone() };
        tokio::spawn(late_write(store.clone(), late));
        let mut leadership = manager.leadership();
        let say = Steward { identity: identity.clone(), log, held };
        tokio::spawn(async move {
            while leadership.changed().await.is_ok() {
                let now = leadership.borrow().clone();
                say.say(&format!("LEADERSHIP {identity} {now:?}"));
            }
        });
        let parent_gone = async move {
            while std::os::unix::process::parent_id() == parent {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let _ = manager.run(parent_gone).await;
    }
    std::process::exit(0)
}

struct Replica {
    identity: String,
    child: Child,
}

fn spawn_replica(test: &str, identity: &str, etcd: &LocalEtcd, prefix: &str, log: &Path) -> Replica {
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(REPLICA, identity)
        .env(ENDPOINTS, etcd.endpoints().join(","))
        .env(PREFIX, prefix)
        .env(PARENT, std::process::id().to_string())
        .env(LOG, log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a replica");
    Replica { identity: identity.to_string(), child }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// The lock as it is now: (holder, fencing token).
async fn lock_holder(store: &EtcdStore) -> Option<(String, u64)> {
    let lock = store.get(&ObjectKey::new(LOCK_KIND, NS, LOCK)).await.ok()?;
    let holder = lock.spec.to_value()["holderIdentity"].as_str()?.to_string();
    Some((holder, lock.metadata.resource_version))
}

/// Everything one test needs: etcd, a store for checking, the replicas and their log.
struct Plane {
    _etcd: LocalEtcd,
    store: EtcdStore,
    duties: Api<Duty>,
    replicas: Vec<Replica>,
    log: PathBuf,
}

impl Drop for Plane {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
        for r in &self.replicas {
            let _ = std::fs::remove_file(poke_path(&self.log, &r.identity));
        }
    }
}

/// Starts etcd, the duty and three replicas; returns once one leads and has stamped the duty.
async fn start_plane(test: &str) -> Option<(Plane, String, u64)> {
    if !LocalEtcd::available_for_test() {
        return None;
    }
    let etcd = LocalEtcd::start().unwrap();
    etcd.wait_ready(Duration::from_secs(20)).await.unwrap();
    let prefix = format!("failover-{test}");
    let store = EtcdStore::connect(etcd.endpoints(), &prefix).await.unwrap();
    let duties: Api<Duty> = Api::namespaced(Arc::new(store.clone()), "default");
    duties.create(&Object::new(ObjectMeta::named("duty"), Duty { note: "tend me".into() })).await.unwrap();
    let log = std::env::temp_dir().join(format!("orch-failover-{}-{test}.log", std::process::id()));
    let replicas = ["a", "b", "c"].iter().map(|id| spawn_replica(test, id, &etcd, &prefix, &log)).collect();
    let plane = Plane { _etcd: etcd, store, duties, replicas, log };
    let (leader, token) = wait_until("a leader to stamp the duty", Duration::from_secs(30), async || {
        let (holder, token) = lock_holder(&plane.store).await?;
        let duty = plane.duties.get("duty").await.ok()?;
        (duty.status.leader == holder && duty.status.token == token).then_some((holder, token))
    })
    .await;
    Some((plane, leader, token))
}

/// After the leader `old` (token `old_token`) stopped at `since`: a standby takes over once
/// the lease has run out (not before), stamps the duty with a new token, and the old token
/// opens nothing any more.
async fn check_takeover(plane: &Plane, old: &str, old_token: u64, since: Instant) -> (String, u64) {
    // A generous deadline, so a loaded machine cannot fail it; a standby that never takes over
    // still does.
    let (new, new_token) = wait_until("a standby to take the lock", LEASE_TTL * 10, async || {
        lock_holder(&plane.store).await.filter(|(_, token)| *token != old_token)
    })
    .await;
    let took = since.elapsed();
    eprintln!("takeover by {new} {took:?} after the leader {old} stopped (lease TTL {LEASE_TTL:?})");
    assert_ne!(new, old);
    assert!(new_token > old_token, "a new fencing token");
    // The old leader renewed its lease at most one retry period (200 ms) before it stopped, so
    // the lease held for at least the TTL less that: a takeover sooner would have taken a lock
    // that was still held. Load only makes the takeover later, so this bound holds on any machine.
    assert!(
        took >= LEASE_TTL - Duration::from_millis(500),
        "the lock was taken {took:?} after the leader stopped, before its lease ran out"
    );
    wait_until("the new leader to stamp the duty", Duration::from_secs(10), async || {
        let duty = plane.duties.get("duty").await.ok()?;
        (duty.status.leader == new && duty.status.token == new_token).then_some(())
    })
    .await;

    // Every kind of write with the deposed leader's token is refused.
    let old_guard = Guard { key: ObjectKey::new(LOCK_KIND, NS, LOCK), resource_version: old_token };
    let fenced = WriteOptions { guard: Some(old_guard.clone()) };
    let rev = plane.store.current_revision().await.unwrap();
    let mut duty = plane.duties.get("duty").await.unwrap();
    duty.status = DutyStatus { leader: old.to_string(), token: old_token };
    let e = plane.duties.replace_status_with(&duty, &fenced).await.unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed { .. }), "{e}");
    duty.spec.note = "overwritten by the deposed leader".into();
    let e = plane.duties.clone().fenced(Some(old_guard.clone())).replace(&duty).await.unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed { .. }), "{e}");
    let e = plane
        .duties
        .clone()
        .fenced(Some(old_guard.clone()))
        .create(&Object::new(ObjectMeta::named("stray"), Duty::default()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed { .. }), "{e}");
    let del = DeleteOptions { guard: Some(old_guard), ..Default::default() };
    let e = plane.duties.delete("duty", &del).await.unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed { .. }), "{e}");
    assert_eq!(plane.store.current_revision().await.unwrap(), rev, "fenced writes change nothing");
    let now = plane.duties.get("duty").await.unwrap();
    assert_eq!((now.status.leader.as_str(), now.status.token), (new.as_str(), new_token));
    (new, new_token)
}

fn replica_index(plane: &Plane, identity: &str) -> usize {
    plane.replicas.iter().position(|r| r.identity == identity).expect("a known replica")
}

fn log_lines(plane: &Plane) -> Vec<String> {
    std::fs::read_to_string(&plane.log).unwrap_or_default().lines().map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_process_is_replaced_within_the_lease_and_fenced() {
    if let Ok(identity) = std::env::var(REPLICA) {
        run_replica(identity).await;
    }
    let Some((mut plane, leader, token)) =
        start_plane("a_killed_leader_process_is_replaced_within_the_lease_and_fenced").await
    else {
        return;
    };
    let i = replica_index(&plane, &leader);
    plane.replicas[i].child.kill().unwrap();
    let killed_at = Instant::now();
    plane.replicas[i].child.wait().unwrap();
    let (next, next_token) = check_takeover(&plane, &leader, token, killed_at).await;

    // And once more: the second leader dies too, the last replica takes over.
    let j = replica_index(&plane, &next);
    plane.replicas[j].child.kill().unwrap();
    let killed_at = Instant::now();
    let (last, _) = check_takeover(&plane, &next, next_token, killed_at).await;
    assert!(last != leader && last != next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_that_wakes_up_deposed_cannot_write() {
    if let Ok(identity) = std::env::var(REPLICA) {
        run_replica(identity).await;
    }
    let Some((plane, leader, token)) = start_plane("a_frozen_leader_that_wakes_up_deposed_cannot_write").await else {
        return;
    };
    // A stop-the-world pause longer than the lease: the leader does not know it was deposed.
    let pid = plane.replicas[replica_index(&plane, &leader)].child.id();
    signal(pid, "-STOP");
    let frozen_at = Instant::now();
    let (new, new_token) = check_takeover(&plane, &leader, token, frozen_at).await;
    // A write of the deposed leader's was under way when the pause struck: it lands after the
    // pause, with the old token, and must be refused, every run.
    std::fs::write(poke_path(&plane.log, &leader), b"").unwrap();
    signal(pid, "-CONT");
    let refused = format!("LATE-FENCED {leader} {token}");
    wait_until("the deposed leader's late write to be answered", Duration::from_secs(15), async || {
        log_lines(&plane).iter().any(|l| l.starts_with("LATE-") && l.contains(&format!(" {leader} "))).then_some(())
    })
    .await;
    let lines = log_lines(&plane);
    assert!(
        lines.contains(&refused),
        "the deposed leader's write with its old token was not refused:\n{}",
        lines.join("\n")
    );
    // It then notices the lost lease and steps down, and never wrote after the takeover.
    let stepped_down = format!("LEADERSHIP {leader} Standby");
    wait_until("the old leader to step down", Duration::from_secs(15), async || {
        log_lines(&plane).contains(&stepped_down).then_some(())
    })
    .await;
    let lines = log_lines(&plane);
    let wrote_late = format!("WROTE {leader} {token}");
    let woke = lines.iter().position(|l| l.starts_with(&format!("LEADERSHIP {new} Leading"))).unwrap_or(0);
    assert!(!lines[woke..].contains(&wrote_late), "the deposed leader wrote after the takeover:\n{}", lines.join("\n"));
    let duty = plane.duties.get("duty").await.unwrap();
    assert_eq!((duty.status.leader.as_str(), duty.status.token), (new.as_str(), new_token));
}
