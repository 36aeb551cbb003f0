//! Crash safety of the embedded store: a child process (this test binary again, running
//! `crash_child`) writes under load with many concurrent writers and is killed with SIGKILL at a
//! random moment, several times over the same file. After each kill the file is reopened and:
//! every acknowledged write is there, no unacknowledged write is half there (each writer's state
//! is exactly its acknowledged operations, or those plus the one it had in flight), revisions
//! are gap-free, and a watch from a revision before the crash resumes and goes on live.

#![cfg(all(feature = "redb", unix))]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use orch_core::{
    DeleteOptions, DynamicObject, ObjectKey, ObjectMeta, RawJson, Selection, Store, WatchEvent, WatchRequest,
    WriteOptions,
};
use orch_store::RedbStore;

const WRITERS: usize = 32;
const ROUNDS: usize = 6;
const DIR_VAR: &str = "ORCH_REDB_CRASH_DIR";
const ROUND_VAR: &str = "ORCH_REDB_CRASH_ROUND";

/// One writer's operations, in order: create `n`; after every fourth create, set the counter to
/// it; after every eighth, delete the create four back. Writers touch disjoint keys, so each
/// writer's state depends only on how many of its operations were applied.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    /// Create the writer's counter (first round only).
    Counter,
    Create(u64),
    Set(u64),
    Delete(u64),
}

fn ops(round: usize) -> impl Iterator<Item = Op> {
    let first = (round == 0).then_some(Op::Counter);
    first.into_iter().chain((0..).flat_map(|n| {
        let mut v = vec![Op::Create(n)];
        if n % 4 == 3 {
            v.push(Op::Set(n));
        }
        if n % 8 == 7 {
            v.push(Op::Delete(n - 4));
        }
        v
    }))
}

fn name(round: usize, writer: usize, n: u64) -> String {
    format!("r{round}-w{writer:02}-{n:06}")
}

fn counter(writer: usize) -> String {
    format!("counter-w{writer:02}")
}

fn spec(round: usize, n: u64) -> RawJson {
    RawJson::from_value(&serde_json::json!({ "round": round, "n": n, "pad": "x".repeat(1000) }))
}

fn obj(name: &str, spec: RawJson) -> DynamicObject {
    DynamicObject::new("Thing", ObjectMeta::namespaced("crash", name)).with_spec(spec)
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("Thing", "crash", name)
}

/// The child: writes until it is killed, printing `ack <writer> <op index> <revision>` once a
/// write is acknowledged (and so durable).
#[test]
#[ignore = "the child process of crash_kill_reopen_verify; does nothing when run on its own"]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else { return };
    let round: usize = std::env::var(ROUND_VAR).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = RedbStore::builder().history_limit(10_000_000).open(Path::new(&dir).join("store.redb")).unwrap();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let s = store.clone();
                tokio::spawn(async move {
                    for (i, op) in ops(round).enumerate() {
                        let rev = match op {
                            Op::Counter => s.create(obj(&counter(w), spec(round, 0)), &WriteOptions::default()).await,
                            Op::Create(n) => {
                                s.create(obj(&name(round, w, n), spec(round, n)), &WriteOptions::default()).await
                            }
                            Op::Set(n) => {
                                let mut c = (*s.get(&key(&counter(w))).await.unwrap()).clone();
                                c.spec = spec(round, n);
                                s.update(c, &WriteOptions::default()).await
                            }
                            Op::Delete(n) => s
                                .delete(&key(&name(round, w, n)), &DeleteOptions::default())
                                .await
                                .map(|d| d.object().clone()),
                        }
                        .unwrap()
                        .metadata
                        .resource_version;
                        println!("ack {w} {i} {rev}");
                    }
                })
            })
            .collect();
        futures::future::join_all(tasks).await;
    });
}

/// What one writer's keys hold after its first `k` operations of `round`, given the counter
/// before the round.
fn model(
    round: usize,
    writer: usize,
    k: usize,
    counter_before: Option<(usize, u64)>,
) -> BTreeMap<String, (usize, u64)> {
    let mut state = BTreeMap::new();
    if let Some(c) = counter_before {
        state.insert(counter(writer), c);
    }
    for op in ops(round).take(k) {
        match op {
            Op::Counter => {
                state.insert(counter(writer), (round, 0));
            }
            Op::Create(n) => {
                state.insert(name(round, writer, n), (round, n));
            }
            Op::Set(n) => {
                state.insert(counter(writer), (round, n));
            }
            Op::Delete(n) => {
                state.remove(&name(round, writer, n));
            }
        }
    }
    state
}

/// What the store holds for one writer in `round` (its objects of that round and its counter).
async fn actual(s: &RedbStore, round: usize, writer: usize, upto: u64) -> BTreeMap<String, (usize, u64)> {
    let mut out = BTreeMap::new();
    let mut names: Vec<String> = (0..=upto).map(|n| name(round, writer, n)).collect();
    names.push(counter(writer));
    for n in names {
        if let Ok(o) = s.get(&key(&n)).await {
            let v = o.spec.to_value();
            assert_eq!(v["pad"].as_str().map(str::len), Some(1000), "{n} is complete");
            out.insert(n, (v["round"].as_u64().unwrap() as usize, v["n"].as_u64().unwrap()));
        }
    }
    out
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Runs the child for one round and kills it; returns each writer's acknowledged operations as
/// (op index, revision), in order.
fn run_child(dir: &Path, round: usize, rng: &mut Rng) -> Vec<Vec<(usize, u64)>> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, dir)
        .env(ROUND_VAR, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match out.read_until(b'\n', &mut buf) {
                    // A line cut by the kill has no newline: it was never a complete ack.
                    Ok(n) if n > 0 && buf.ends_with(b"\n") => {
                        lines.lock().unwrap().push(String::from_utf8_lossy(&buf).trim().to_string())
                    }
                    _ => break,
                }
            }
        })
    };
    // Kill at a random moment once writes are flowing.
    let want = 50 + rng.below(2000) as usize;
    let start = Instant::now();
    while lines.lock().unwrap().len() < want && start.elapsed() < Duration::from_secs(60) {
        assert!(child.try_wait().unwrap().is_none(), "the child exited early");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(rng.below(40)));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL, not exited: {status:?}");
    reader.join().unwrap();
    let mut acks = vec![Vec::new(); WRITERS];
    for line in lines.lock().unwrap().iter() {
        // The harness may print "test crash_child ... " on the same line as the first ack.
        let Some(at) = line.find("ack ") else { continue };
        let mut parts = line[at..].split(' ').skip(1);
        let mut num = || parts.next().unwrap().parse::<u64>().unwrap();
        let (w, i, rev) = (num() as usize, num() as usize, num());
        acks[w].push((i, rev));
    }
    acks
}

#[test]
fn crash_kill_reopen_verify() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("redb-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut counters: HashMap<usize, (usize, u64)> = HashMap::new();
    let mut round_start = 1;
    for round in 0..ROUNDS {
        let acks = run_child(&dir, round, &mut rng);
        let total: usize = acks.iter().map(Vec::len).sum();
        rt.block_on(async {
            let s = RedbStore::builder().history_limit(10_000_000).open(dir.join("store.redb")).unwrap();
            let current = s.current_revision().await.unwrap();
            let mut applied = 0;
            for (w, acked) in acks.iter().enumerate() {
                assert!(acked.iter().enumerate().all(|(j, (i, _))| *i == j), "writer {w}: acks in order");
                let k = acked.len();
                let upto = (k as u64) + 2;
                let got = actual(&s, round, w, upto).await;
                let before = counters.get(&w).copied();
                // Exactly the acknowledged operations, or those plus the one in flight.
                let with_acked = model(round, w, k, before);
                let with_next = model(round, w, k + 1, before);
                assert!(
                    got == with_acked || got == with_next,
                    "round {round} writer {w}: {k} acknowledged operations, store holds {got:?}"
                );
                applied += k + usize::from(got != with_acked);
                // Creates are never modified: the object carries the acknowledged revision.
                for (op, (_, rev)) in ops(round).zip(acked) {
                    assert!(*rev <= current);
                    if let Op::Create(n) = op
                        && let Ok(o) = s.get(&key(&name(round, w, n))).await
                    {
                        assert_eq!(o.metadata.resource_version, *rev);
                    }
                }
                if let Some(c) = got.get(&counter(w)) {
                    counters.insert(w, *c);
                }
            }
            assert_eq!(current - round_start + 1, applied as u64, "round {round}: one revision per applied write");
            // Gap-free revisions, and a watch from before the crash resumes and goes on live.
            let mut watch = s.watch(&WatchRequest::from(Selection::kind("Thing"), round_start)).await.unwrap();
            let mut expect = round_start;
            while expect <= current {
                let e = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
                if let WatchEvent::Progress(_) = e {
                    continue;
                }
                assert_eq!(e.revision(), expect, "round {round}: revisions without a gap");
                expect += 1;
            }
            let probe =
                s.create(obj(&format!("probe-{round}"), RawJson::null()), &WriteOptions::default()).await.unwrap();
            assert_eq!(probe.metadata.resource_version, current + 1);
            let e = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
            assert!(matches!(e, WatchEvent::Added(o) if o.metadata.resource_version == current + 1));
            eprintln!("round {round}: {total} acknowledged, {applied} applied, revision {current}");
            round_start = current + 2;
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}
