//! The embedded store across restarts and failures: data, revisions, history, compaction and
//! leases after reopening; foreign, damaged and read-only files; a disk that fills up mid-run.

#![cfg(feature = "redb")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use orch_core::{
    DeleteOptions, DynamicObject, Error, ListRequest, ObjectKey, ObjectMeta, RawJson, Selection, Store, WatchEvent,
    WatchRequest, WriteOptions,
};
use orch_store::RedbStore;

mod common;

fn fresh(name: &str) -> PathBuf {
    let path = common::scratch_dir("redb-durability").join(format!("{name}.redb"));
    let _ = std::fs::remove_file(&path);
    path
}

fn thing(name: &str, spec: serde_json::Value) -> DynamicObject {
    DynamicObject::new("Thing", ObjectMeta::namespaced("ns", name)).with_spec(RawJson::from_value(&spec))
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("Thing", "ns", name)
}

fn w() -> WriteOptions {
    WriteOptions::default()
}

fn things() -> Selection {
    Selection::kind("Thing")
}

/// Every event from `from` up to and including `to`, as (kind of event, name, revision).
async fn events(s: &dyn Store, from: u64, to: u64) -> Vec<(String, String, u64)> {
    let mut watch = s.watch(&WatchRequest::from(things(), from)).await.unwrap();
    let mut out = Vec::new();
    while out.last().is_none_or(|(_, _, rev)| *rev < to) {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("events in time");
        let e = e.expect("stream open").expect("no error");
        let what = match &e {
            WatchEvent::Added(_) => "Added",
            WatchEvent::Modified(_) => "Modified",
            WatchEvent::Deleted(_) => "Deleted",
            WatchEvent::Progress(_) => continue,
        };
        out.push((what.to_string(), e.object().unwrap().metadata.name.clone(), e.revision()));
    }
    out
}

async fn names(s: &dyn Store, revision: Option<u64>) -> orch_core::Result<Vec<(String, u64)>> {
    let req = ListRequest { revision, ..ListRequest::new(things()) };
    let page = s.list(&req).await?;
    Ok(page.items.iter().map(|o| (o.metadata.name.clone(), o.metadata.resource_version)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_revisions_and_history_survive_reopening() {
    let path = fresh("reopen");
    let (rev, middle, listed, history, a) = {
        let s = RedbStore::open(&path).unwrap();
        let a = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
        s.create(thing("b", serde_json::json!(2)), &w()).await.unwrap();
        let mut held = thing("held", serde_json::json!(3));
        held.metadata.finalizers = vec!["orch.dev/f".into()];
        s.create(held, &w()).await.unwrap();
        let middle = s.current_revision().await.unwrap();
        let listed = names(&s, Some(middle)).await.unwrap();
        let mut next = (*a).clone();
        next.spec = RawJson::from_value(&serde_json::json!({"n": 2}));
        let a = s.update(next, &w()).await.unwrap();
        let mut status = (*a).clone();
        status.status = RawJson::from_value(&serde_json::json!({"ready": true}));
        let a = s.update_status(status, &w()).await.unwrap();
        s.delete(&key("b"), &DeleteOptions::default()).await.unwrap();
        s.delete(&key("held"), &DeleteOptions::default()).await.unwrap();
        let rev = s.current_revision().await.unwrap();
        let history = events(&s, 1, rev).await;
        (rev, middle, listed, history, a)
    };
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.current_revision().await.unwrap(), rev);
    assert_eq!(*s.get(&key("a")).await.unwrap(), *a, "every field, revisions and status included");
    assert!(s.get(&key("b")).await.unwrap_err().is_not_found());
    assert!(s.get(&key("held")).await.unwrap().metadata.deletion_timestamp.is_some());
    assert_eq!(names(&s, Some(middle)).await.unwrap(), listed, "a list at a past revision");
    assert_eq!(events(&s, 1, rev).await, history, "a watch replays the same history");
    // Writes go on from the next revision, and a watch from the old end resumes there.
    let c = s.create(thing("c", serde_json::json!(4)), &w()).await.unwrap();
    assert_eq!(c.metadata.resource_version, rev + 1);
    assert_eq!(events(&s, rev + 1, rev + 1).await, vec![("Added".into(), "c".into(), rev + 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_trimmed_history_survive_reopening() {
    let path = fresh("compact");
    let compacted_at = {
        let s = RedbStore::builder().history_limit(50).open(&path).unwrap();
        for i in 0..20 {
            s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap();
        }
        s.compact(10).await.unwrap();
        for i in 20..100 {
            s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap();
        }
        s.compact(60).await.unwrap();
        60
    };
    let s = RedbStore::builder().history_limit(50).open(&path).unwrap();
    assert_eq!(s.len(), 100);
    let e = s.watch(&WatchRequest::from(things(), compacted_at - 1)).await.err().expect("compacted");
    assert!(matches!(e, Error::Compacted { .. }), "{e}");
    assert!(matches!(names(&s, Some(compacted_at - 1)).await.unwrap_err(), Error::Compacted { .. }));
    assert_eq!(events(&s, compacted_at, 100).await.len(), 41);
    // Past the limit, history is trimmed on disk too: reopening with a bigger limit finds no more.
    for i in 100..200 {
        s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap();
    }
    s.create(thing("last", serde_json::json!(0)), &w()).await.unwrap();
    drop(s);
    let s = RedbStore::builder().history_limit(10_000).open(&path).unwrap();
    assert!(matches!(
        s.watch(&WatchRequest::from(things(), 100)).await.err().expect("trimmed"),
        Error::Compacted { .. }
    ));
    assert_eq!(names(&s, None).await.unwrap().len(), 201);
}

/// An explicit compaction takes the history below it out of the file in its own commit, not at
/// some later fold; what it keeps replays as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_compaction_leaves_the_file_at_once() {
    let path = fresh("compact-file");
    {
        let s = RedbStore::open(&path).unwrap();
        for i in 0..20 {
            s.create(thing(&format!("o{i}"), serde_json::json!(i)), &w()).await.unwrap();
        }
        s.compact(15).await.unwrap();
    }
    let (log, meta) = contents(&path);
    let first = log.first().map(|(at, _)| *at);
    assert_eq!(first, Some(15), "the records below the compaction are folded away");
    assert!(meta.contains(&("checkpoint".to_string(), 15)), "{meta:?}");
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.len(), 20);
    assert!(matches!(s.watch(&WatchRequest::from(things(), 14)).await.err().expect("gone"), Error::Compacted { .. }));
    assert_eq!(events(&s, 15, 20).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_restart_their_ttl_on_reopening_and_expired_ones_stay_dead() {
    let path = fresh("leases");
    let (kept, expired, revoked) = {
        let s = RedbStore::open(&path).unwrap();
        let kept = s.grant_lease(Duration::from_secs(3)).await.unwrap().id;
        let expired = s.grant_lease(Duration::from_millis(300)).await.unwrap().id;
        let revoked = s.grant_lease(Duration::from_secs(60)).await.unwrap().id;
        for (name, lease) in [("kept", kept), ("expired", expired), ("revoked", revoked)] {
            let mut o = thing(name, serde_json::json!(1));
            o.metadata.lease = Some(lease);
            s.create(o, &w()).await.unwrap();
        }
        s.revoke_lease(revoked).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(s.get(&key("expired")).await.unwrap_err().is_not_found());
        (kept, expired, revoked)
    };
    // Down for longer than `kept` had left: its TTL counts again from the reopening.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = RedbStore::open(&path).unwrap();
    let info = s.lease(kept).await.unwrap();
    assert!(info.remaining > Duration::from_millis(2500), "full TTL from the reopening: {info:?}");
    assert!(s.get(&key("kept")).await.is_ok());
    for dead in [expired, revoked] {
        assert!(matches!(s.keep_alive(dead).await.unwrap_err(), Error::LeaseNotFound(id) if id == dead));
        let mut late = thing("late", serde_json::json!(1));
        late.metadata.lease = Some(dead);
        assert!(matches!(s.create(late, &w()).await.unwrap_err(), Error::LeaseNotFound(_)));
    }
    assert!(s.get(&key("expired")).await.unwrap_err().is_not_found());
    assert!(s.get(&key("revoked")).await.unwrap_err().is_not_found());
    let fresh_id = s.grant_lease(Duration::from_secs(1)).await.unwrap().id;
    assert!(fresh_id > revoked, "lease ids are never reused");
    // Not kept alive after the reopening, it expires and takes its object along.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.get(&key("kept")).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the reloaded lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s);
    let s = RedbStore::open(&path).unwrap();
    assert!(matches!(s.lease(kept).await.unwrap_err(), Error::LeaseNotFound(_)));
}

/// Writes are decided while earlier batches are still being committed: a create on a lease
/// and a revocation of that lease, racing, must never leave an object on the dead lease, in
/// memory or in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_a_revocation_never_leave_an_object_on_the_dead_lease() {
    let path = fresh("lease-race");
    let s = RedbStore::open(&path).unwrap();
    let mut leases = Vec::new();
    const LEASES: usize = 100;
    const PER_LEASE: usize = 4;
    for _ in 0..LEASES {
        leases.push(s.grant_lease(Duration::from_secs(60)).await.unwrap().id);
    }
    let mut work = Vec::new();
    for (l, id) in leases.iter().copied().enumerate() {
        for i in 0..PER_LEASE {
            let s = s.clone();
            work.push(tokio::spawn(async move {
                let mut o = thing(&format!("l{l}-{i}"), serde_json::json!(i));
                o.metadata.lease = Some(id);
                match s.create(o, &w()).await {
                    Ok(_) | Err(Error::LeaseNotFound(_)) => {}
                    Err(e) => panic!("create on lease {id}: {e}"),
                }
            }));
        }
        if l % 2 == 0 {
            let s = s.clone();
            work.push(tokio::spawn(async move { s.revoke_lease(id).await.unwrap() }));
        }
    }
    for t in work {
        t.await.unwrap();
    }
    let expect: Vec<String> =
        (0..LEASES).filter(|l| l % 2 == 1).flat_map(|l| (0..PER_LEASE).map(move |i| format!("l{l}-{i}"))).collect();
    let listed = |names: Vec<(String, u64)>| {
        let mut n: Vec<String> = names.into_iter().map(|(n, _)| n).collect();
        n.sort();
        n
    };
    let mut sorted = expect.clone();
    sorted.sort();
    let before = names(&s, None).await.unwrap();
    assert_eq!(listed(before.clone()), sorted, "objects of revoked leases are gone, the others all there");
    for (l, id) in leases.iter().enumerate() {
        assert_eq!(s.lease(*id).await.is_ok(), l % 2 == 1, "lease {id}");
    }
    let end = s.current_revision().await.unwrap();
    drop(s);
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(names(&s, None).await.unwrap(), before);
    assert_eq!(s.current_revision().await.unwrap(), end);
    for (l, id) in leases.iter().enumerate() {
        assert_eq!(s.lease(*id).await.is_ok(), l % 2 == 1, "lease {id} after reopening");
    }
    let revs: Vec<u64> = events(&s, 1, end).await.into_iter().map(|e| e.2).collect();
    assert!(revs.windows(2).all(|p| p[0] <= p[1]), "events in revision order");
}

fn unavailable_naming(e: Error, path: &Path, reason: &str) {
    let text = e.to_string();
    assert!(matches!(e, Error::Unavailable { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "names the file: {text}");
    assert!(text.contains(reason), "says {reason:?}: {text}");
}

#[test]
fn foreign_and_damaged_files_are_refused_and_left_untouched() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Not a database at all.
    let text = fresh("foreign-text");
    std::fs::write(&text, "name,age\nada,36\n").unwrap();
    unavailable_naming(RedbStore::open(&text).unwrap_err(), &text, "not a redb database");
    assert_eq!(std::fs::read(&text).unwrap(), b"name,age\nada,36\n");

    // Another program's redb database.
    let other = fresh("foreign-redb");
    {
        let db = redb::Database::create(&other).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("settings")).unwrap().insert("volume", 11).unwrap();
        txn.commit().unwrap();
    }
    let before = std::fs::read(&other).unwrap();
    unavailable_naming(RedbStore::open(&other).unwrap_err(), &other, "another program");
    assert_eq!(std::fs::read(&other).unwrap(), before);

    // One of ours, damaged in several ways.
    let ours = fresh("ours");
    rt.block_on(async {
        let s = RedbStore::open(&ours).unwrap();
        for i in 0..200 {
            s.create(thing(&format!("o{i}"), serde_json::json!({"i": i, "pad": "x".repeat(500)})), &w()).await.unwrap();
        }
    });
    let good = std::fs::read(&ours).unwrap();
    // Refused with the path and the reason and left as it was, or, when the damage fell on pages
    // redb no longer uses, opened with every object intact.
    let damaged = |name: &str, bytes: Vec<u8>| {
        let path = fresh(name);
        std::fs::write(&path, &bytes).unwrap();
        match rt.block_on(async { RedbStore::open(&path).map(|s| s.len()) }) {
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(&path.display().to_string()) && text.contains("cannot open"), "{name}: {text}");
                assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}: the file must be left as it was");
                true
            }
            Ok(len) => {
                assert_eq!(len, 200, "{name}: opened, so everything must be there");
                false
            }
        }
    };
    assert!(damaged("truncated", good[..100].to_vec()));
    let mut header = good.clone();
    header[9..200].iter_mut().for_each(|b| *b = !*b);
    assert!(damaged("header", header));
    let refused = (1..12)
        .map(|i| (good.len() / 12 * i) & !4095)
        .filter(|&at| {
            let mut middle = good.clone();
            middle[at..at + 4096].iter_mut().for_each(|b| *b = !*b);
            damaged(&format!("middle-{at}"), middle)
        })
        .count();
    assert!(refused > 0, "damage to the pages in use is detected");
    let mut magic = good.clone();
    magic[0] = b'R';
    assert!(damaged("magic", magic));
    // The original still opens, with everything in it.
    rt.block_on(async {
        let s = RedbStore::open(&ours).unwrap();
        assert_eq!(s.len(), 200);
    });
    // A directory, or a file in a directory that does not exist: the path and the reason.
    let dir = fresh("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    assert!(RedbStore::open(&dir).unwrap_err().to_string().contains(&dir.display().to_string()));
    let nowhere = dir.join("missing").join("store.redb");
    assert!(RedbStore::open(&nowhere).unwrap_err().to_string().contains(&nowhere.display().to_string()));
}

/// A store file as the previous format (2) wrote it: objects, a log entry per change, counters.
fn write_format_2(path: &Path, format: u64) -> Vec<DynamicObject> {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    let mut stored = Vec::new();
    {
        let mut meta = txn.open_table(redb::TableDefinition::<&str, u64>::new("orch.meta")).unwrap();
        for (k, v) in [("format", format), ("revision", 3), ("floor", 1), ("next_lease", 8)] {
            meta.insert(k, v).unwrap();
        }
        type Objects<'a> = redb::TableDefinition<'a, (&'static str, &'static str, &'static str), (u64, &'static [u8])>;
        let mut objects = txn.open_table(Objects::new("orch.objects")).unwrap();
        type Log<'a> = redb::TableDefinition<'a, (u64, u32), (bool, u64, &'static [u8], &'static [u8])>;
        let mut log = txn.open_table(Log::new("orch.log")).unwrap();
        for (rv, name) in [(2u64, "kept"), (3, "also-kept")] {
            let mut o = thing(name, serde_json::json!(rv));
            o.metadata.resource_version = rv;
            o.metadata.create_revision = rv;
            let json = serde_json::to_vec(&o).unwrap();
            objects.insert(("Thing", "ns", name), (rv, json.as_slice())).unwrap();
            log.insert((rv, 0), (false, 0, json.as_slice(), &[][..])).unwrap();
            stored.push(o);
        }
        txn.open_table(redb::TableDefinition::<u64, u64>::new("orch.leases"))
            .unwrap()
            .insert(7, 60_000_000_000)
            .unwrap();
    }
    txn.commit().unwrap();
    stored
}

/// A file of the previous format opens: upgraded in place on a writable open, with every object
/// and lease; the history before the upgrade answers `Compacted`. A read-only open and an unknown
/// format are refused with the reason, and the file is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_store_is_upgraded_in_place() {
    let path = fresh("format-2");
    let stored = write_format_2(&path, 2);
    let before = digest(&path);
    let e = RedbStore::builder().read_only(true).open(&path).unwrap_err();
    assert!(e.to_string().contains("format 2") && e.to_string().contains("upgrade"), "{e}");
    assert_eq!(digest(&path), before);

    let s = RedbStore::open(&path).unwrap();
    for o in &stored {
        assert_eq!(*s.get(&o.key()).await.unwrap(), *o);
    }
    assert_eq!(s.current_revision().await.unwrap(), 3);
    assert!(s.lease(7).await.is_ok(), "leases are kept");
    assert!(matches!(s.watch(&WatchRequest::from(things(), 2)).await.err().expect("gone"), Error::Compacted { .. }));
    let created = s.create(thing("new", serde_json::json!(0)), &w()).await.unwrap();
    assert_eq!(created.metadata.resource_version, 4);
    assert!(s.grant_lease(Duration::from_secs(5)).await.unwrap().id >= 8, "lease ids go on from the old counter");
    drop(s);
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(events(&s, 4, 4).await, vec![("Added".into(), "new".into(), 4)]);
    drop(s);

    let future = fresh("format-99");
    write_format_2(&future, 99);
    let before = digest(&future);
    let e = RedbStore::open(&future).unwrap_err();
    assert!(e.to_string().contains("format 99"), "{e}");
    assert_eq!(digest(&future), before);
}

/// A log that contradicts itself (a change that does not follow the state before it, or whose
/// key is not its object's) is refused at open, naming the revision, and the file is left as
/// it was: the store never serves, or folds, a history it cannot trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_contradicts_itself_is_refused_and_left_alone() {
    let path = fresh("contradiction");
    {
        let s = RedbStore::open(&path).unwrap();
        let a = s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
        let mut next = (*a).clone();
        next.spec = RawJson::from_value(&serde_json::json!(2));
        s.update(next, &w()).await.unwrap();
        s.create(thing("b", serde_json::json!(3)), &w()).await.unwrap();
    }
    // One commit per write: the records are keyed 1, 2 and 3. A change is its revision (8
    // bytes), deleted (1), the version it replaced (8), then kind "Thing", namespace "ns" and
    // name, each after a 4-byte length.
    const PREV: std::ops::Range<usize> = 9..17;
    const NAME: usize = 17 + 4 + 5 + 4 + 2 + 4;
    /// A name, the record to edit, the edit, and what the refusal must say.
    type Case = (&'static str, u64, fn(&mut Vec<u8>), &'static str);
    let cases: [Case; 3] = [
        (
            "update-after-nothing",
            2,
            |r| r[PREV].copy_from_slice(&5u64.to_le_bytes()),
            "does not follow the state before it",
        ),
        (
            "create-over-something",
            3,
            |r| r[PREV].copy_from_slice(&1u64.to_le_bytes()),
            "does not follow the state before it",
        ),
        ("renamed", 3, |r| r[NAME] = b'c', "does not match its key and revision"),
    ];
    for (name, at, edit, why) in cases {
        let copy = fresh(name);
        std::fs::copy(&path, &copy).unwrap();
        {
            let db = redb::Database::open(&copy).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(redb::TableDefinition::<u64, &[u8]>::new("orch.commits")).unwrap();
                let mut record = redb::ReadableTable::get(&log, at).unwrap().expect("the record").value().to_vec();
                edit(&mut record);
                log.insert(at, record.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let before = contents(&copy);
        let e = RedbStore::open(&copy).unwrap_err().to_string();
        assert!(e.contains(&format!("revision {at}")) && e.contains(why), "{name}: {e}");
        assert!(contents(&copy) == before, "{name}: what the file holds is left as it was");
    }
    // The untouched original still opens.
    assert_eq!(RedbStore::open(&path).unwrap().len(), 2);
}

/// Every commit record and every counter.
type Contents = (Vec<(u64, Vec<u8>)>, Vec<(String, u64)>);

/// The log and counters of a store file, read with redb itself (a writable open by redb
/// rewrites its own header, so the bytes are not the measure).
fn contents(path: &Path) -> Contents {
    use redb::{ReadableDatabase, ReadableTable};
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let log = txn.open_table(redb::TableDefinition::<u64, &[u8]>::new("orch.commits")).unwrap();
    let meta = txn.open_table(redb::TableDefinition::<&str, u64>::new("orch.meta")).unwrap();
    let log = log.iter().unwrap().map(|e| e.map(|(k, v)| (k.value(), v.value().to_vec())).unwrap()).collect();
    let meta = meta.iter().unwrap().map(|e| e.map(|(k, v)| (k.value().to_string(), v.value())).unwrap()).collect();
    (log, meta)
}

fn digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_files_serve_reads_and_refuse_writes() {
    let path = fresh("read-only");
    {
        let s = RedbStore::open(&path).unwrap();
        s.create(thing("a", serde_json::json!(1)), &w()).await.unwrap();
        s.grant_lease(Duration::from_secs(60)).await.unwrap();
    }
    let before = digest(&path);
    let check = |s: RedbStore| async move {
        assert!(s.is_read_only());
        assert_eq!(s.get(&key("a")).await.unwrap().spec.as_str(), "1");
        let e = s.create(thing("b", serde_json::json!(2)), &w()).await.unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }) && e.to_string().contains("read-only"), "{e}");
        let a = s.get(&key("a")).await.unwrap();
        assert!(matches!(s.update((*a).clone(), &w()).await.unwrap_err(), Error::Unavailable { .. }));
        assert!(matches!(s.delete(&key("a"), &DeleteOptions::default()).await.unwrap_err(), Error::Unavailable { .. }));
        assert!(matches!(s.grant_lease(Duration::from_secs(1)).await.unwrap_err(), Error::Unavailable { .. }));
        assert!(matches!(s.compact(1).await.unwrap_err(), Error::Unavailable { .. }));
        assert_eq!(s.current_revision().await.unwrap(), 1);
    };
    check(RedbStore::builder().read_only(true).open(&path).unwrap()).await;
    assert_eq!(digest(&path), before, "a read-only store never writes its file");

    // A file the process may not write is served read-only: made so by its permission bits, or,
    // for root (whom those do not stop), by the immutable attribute or a read-only bind mount of
    // the file onto itself. `ORCH_UNWRITABLE=bind-mount` picks the mount (to test that path).
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&path, perms.clone()).unwrap();
    let unwritable = Unwritable::make(&path);
    if std::fs::OpenOptions::new().write(true).open(&path).is_ok() {
        assert!(
            std::env::var("ORCH_REQUIRE_UNWRITABLE").as_deref() != Ok("1"),
            "ORCH_REQUIRE_UNWRITABLE=1 but this process can write a read-only file (root without chattr or mount)"
        );
        eprintln!(
            "SKIPPED the unwritable-file case: this process may write a read-only file (root without chattr or mount)"
        );
    } else {
        eprintln!("unwritable file by {unwritable:?}");
        check(RedbStore::open(&path).unwrap()).await;
        assert_eq!(digest(&path), before);
    }
    drop(unwritable);
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
}

/// What keeps a file unwritable even for root while it lives, when its permission bits do not:
/// the immutable attribute (`chattr +i`) or a read-only bind mount of the file onto itself.
#[derive(Debug)]
enum Unwritable {
    /// The permission bits suffice (not root), or nothing else worked.
    Bits,
    Immutable(PathBuf),
    BindMount(PathBuf),
}

impl Unwritable {
    fn make(path: &Path) -> Unwritable {
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd).args(args).arg(path).output().is_ok_and(|o| o.status.success())
        };
        if std::fs::OpenOptions::new().write(true).open(path).is_err() {
            return Unwritable::Bits;
        }
        let mount_only = std::env::var("ORCH_UNWRITABLE").as_deref() == Ok("bind-mount");
        if !mount_only && run("chattr", &["+i"]) {
            return Unwritable::Immutable(path.to_path_buf());
        }
        let p = path.to_str().expect("a UTF-8 path");
        if run("mount", &["--bind", p]) {
            if run("mount", &["-o", "remount,bind,ro"]) {
                return Unwritable::BindMount(path.to_path_buf());
            }
            run("umount", &[]);
        }
        Unwritable::Bits
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        match self {
            Unwritable::Bits => {}
            Unwritable::Immutable(path) => {
                let _ = std::process::Command::new("chattr").arg("-i").arg(path).status();
            }
            Unwritable::BindMount(path) => {
                let _ = std::process::Command::new("umount").arg(path).status();
            }
        }
    }
}

/// A file backend that fails every write (like a full disk or a file gone read-only) while the
/// switch is on.
#[derive(Debug)]
struct Failing {
    file: redb::backends::FileBackend,
    fail: Arc<AtomicBool>,
    kind: std::io::ErrorKind,
}

impl Failing {
    fn check(&self) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) { Err(std::io::Error::from(self.kind)) } else { Ok(()) }
    }
}

impl redb::StorageBackend for Failing {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
}

/// A backend whose flushes wait for the test: each `sync_data` takes a ticket (blocking while
/// there is none), and fails once `fail` is set.
#[derive(Clone, Debug, Default)]
struct Gate {
    tickets: Arc<std::sync::atomic::AtomicUsize>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    fail: Arc<AtomicBool>,
}

impl Gate {
    fn open(&self, tickets: usize) {
        self.tickets.store(tickets, Ordering::SeqCst);
    }

    /// Until a flush is waiting for a ticket.
    async fn flushing(&self) {
        while self.waiting.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[derive(Debug)]
struct Gated {
    file: redb::backends::FileBackend,
    gate: Gate,
}

impl redb::StorageBackend for Gated {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let g = &self.gate;
        g.calls.fetch_add(1, Ordering::SeqCst);
        g.waiting.fetch_add(1, Ordering::SeqCst);
        while g.tickets.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| t.checked_sub(1)).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        g.waiting.fetch_sub(1, Ordering::SeqCst);
        if g.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
}

/// An object attached to a lease by a commit that lands while a revocation of that lease is in
/// flight, whose flush then fails: in memory the lease lives on and the object stays; after a
/// reopen the revocation is there whole or not at all; either way the object goes with the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_written_while_its_lease_revocation_fails_stays_attached() {
    let path = fresh("revocation-fails");
    let gate = Gate::default();
    gate.open(usize::MAX / 2);
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).unwrap();
    let backend = Gated { file: redb::backends::FileBackend::new(file).unwrap(), gate: gate.clone() };
    let s = RedbStore::builder().open_backend(&path.display().to_string(), backend).unwrap();
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap().id;
    let before = gate.calls.load(Ordering::SeqCst);
    s.create(thing("warm", serde_json::json!(0)), &w()).await.unwrap();
    let per_commit = gate.calls.load(Ordering::SeqCst) - before;
    assert!(per_commit >= 1);

    // Commit 1 attaches `x` to the lease and waits in its flush...
    gate.open(0);
    let mut x = thing("x", serde_json::json!(1));
    x.metadata.lease = Some(lease);
    let create = tokio::spawn({
        let s = s.clone();
        async move { s.create(x, &w()).await }
    });
    gate.flushing().await;
    // ...while the revocation is decided on top of it, for commit 2.
    let revoke = tokio::spawn({
        let s = s.clone();
        async move { s.revoke_lease(lease).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.open(per_commit);
    create.await.unwrap().unwrap();
    gate.flushing().await;
    gate.fail.store(true, Ordering::SeqCst);
    gate.open(usize::MAX / 2);
    assert!(matches!(revoke.await.unwrap().unwrap_err(), Error::Unavailable { .. }));
    assert!(s.get(&key("x")).await.is_ok(), "the failed revocation deleted nothing");
    assert!(s.lease(lease).await.is_ok(), "the lease lives on");

    // The disk recovers. redb refuses every write after a failed flush until the file is
    // reopened; if it takes this one, revoking the lease deletes the object attached to it.
    gate.fail.store(false, Ordering::SeqCst);
    if s.revoke_lease(lease).await.is_ok() {
        assert!(s.get(&key("x")).await.unwrap_err().is_not_found(), "x went with its lease");
    }
    drop(s);
    // The failed revocation's pages reached the file before its flush failed, so it may be
    // there after reopening: whole (the lease and `x` both gone) or not at all.
    let s = RedbStore::open(&path).unwrap();
    let (x_there, lease_there) = (s.get(&key("x")).await.is_ok(), s.lease(lease).await.is_ok());
    assert_eq!(x_there, lease_there, "the revocation is there whole or not at all");
    if lease_there {
        s.revoke_lease(lease).await.unwrap();
    }
    assert!(s.get(&key("x")).await.unwrap_err().is_not_found(), "x went with its lease");
    assert!(s.get(&key("warm")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_change_nothing_and_reopening_finds_every_acknowledged_write() {
    for kind in [std::io::ErrorKind::StorageFull, std::io::ErrorKind::ReadOnlyFilesystem] {
        let path = fresh(&format!("failing-{kind:?}"));
        let fail = Arc::new(AtomicBool::new(false));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).unwrap();
        let backend = Failing { file: redb::backends::FileBackend::new(file).unwrap(), fail: fail.clone(), kind };
        let s = RedbStore::builder().open_backend(&path.display().to_string(), backend).unwrap();
        let mut acked = Vec::new();
        for i in 0..20 {
            acked.push(s.create(thing(&format!("ok{i}"), serde_json::json!(i)), &w()).await.unwrap());
        }
        let rev = s.current_revision().await.unwrap();
        let mut watch = s.watch(&WatchRequest::from(things(), rev + 1)).await.unwrap();
        fail.store(true, Ordering::SeqCst);
        // Many writers at once, so the failure hits a batch of several.
        let attempts = futures::future::join_all((0..16).map(|i| {
            let s = s.clone();
            async move { s.create(thing(&format!("lost{i}"), serde_json::json!(i)), &w()).await }
        }))
        .await;
        for r in attempts {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Unavailable { .. }), "{e}");
            let source = std::error::Error::source(&e).expect("redb's error travels as the source");
            let mut chain = source.to_string();
            let mut cur = source.source();
            while let Some(s) = cur {
                chain += &format!(": {s}");
                cur = s.source();
            }
            assert!(chain.to_lowercase().contains(&format!("{kind}").to_lowercase()) || !chain.is_empty(), "{chain}");
        }
        assert_eq!(s.current_revision().await.unwrap(), rev, "nothing half-applied in memory");
        assert!(s.get(&key("lost0")).await.unwrap_err().is_not_found());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), watch.next()).await.is_err(),
            "no event for a write that failed"
        );
        let mut upd = (*acked[0]).clone();
        upd.spec = RawJson::from_value(&serde_json::json!("changed"));
        assert!(matches!(s.update(upd, &w()).await.unwrap_err(), Error::Unavailable { .. }));
        assert_eq!(s.get(&key("ok0")).await.unwrap(), acked[0]);
        // The disk has room again. redb may keep refusing until reopened; either way, no panic
        // and no false acknowledgement.
        fail.store(false, Ordering::SeqCst);
        let after = s.create(thing("after", serde_json::json!(0)), &w()).await;
        drop(watch);
        drop(s);
        let s = RedbStore::open(&path).unwrap();
        for a in &acked {
            assert_eq!(s.get(&a.key()).await.unwrap(), *a);
        }
        assert_eq!(s.get(&key("after")).await.is_ok(), after.is_ok(), "{kind}: acknowledged iff present");
        assert!(s.get(&key("lost0")).await.unwrap_err().is_not_found());
        let end = s.current_revision().await.unwrap();
        let revs: Vec<u64> = events(&s, 1, end).await.into_iter().map(|e| e.2).collect();
        assert_eq!(revs, (1..=end).collect::<Vec<_>>(), "{kind}: gap-free revisions");
    }
}

/// Everything a client can observe: the current revision, a list at every revision still
/// listable, and the events from there on.
async fn observe(
    s: &dyn Store,
    from: u64,
) -> (u64, Vec<Vec<(String, u64, String, String)>>, Vec<(String, String, u64)>) {
    let rev = s.current_revision().await.unwrap();
    let mut lists = Vec::new();
    for r in from..=rev {
        // Every object, then those the label index finds for each value of label `v`.
        let selections =
            std::iter::once(things()).chain((0..3).map(|v| things().with_labels(format!("v={v}").parse().unwrap())));
        for selection in selections {
            let page = s.list(&ListRequest { revision: Some(r), ..ListRequest::new(selection) }).await.unwrap();
            lists.push(
                page.items
                    .iter()
                    .map(|o| {
                        let m = &o.metadata;
                        (m.name.clone(), m.resource_version, o.spec.to_string(), o.status.to_string())
                    })
                    .collect(),
            );
        }
    }
    let history = if rev >= from { events(s, from, rev).await } else { Vec::new() };
    (rev, lists, history)
}

/// The oldest revision a list can still be served at.
async fn first_listable(s: &dyn Store) -> u64 {
    let rev = s.current_revision().await.unwrap();
    for r in 1..=rev {
        match s.list(&ListRequest { revision: Some(r), ..ListRequest::new(things()) }).await {
            Ok(_) => return r,
            Err(Error::Compacted { .. }) => {}
            Err(e) => panic!("list at {r}: {e}"),
        }
    }
    rev + 1
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Closing and reopening the store is invisible: whatever writes, compactions and trimming
    /// of history came before, the reopened store answers every list at every kept revision,
    /// and every watch, exactly as before, and refuses the same older revisions. A small history
    /// limit makes the log fold into the objects table as it goes.
    #[test]
    fn reopening_is_invisible(
        limit in proptest::sample::select(vec![1usize, 3, 8, 100_000]),
        ops in proptest::collection::vec((0..6usize, 0..6u8, 0..3u8), 1..60),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let path = fresh("reopen-model");
            let open = || RedbStore::builder().history_limit(limit).open(&path).unwrap();
            let check_reopen = |s: RedbStore| async move {
                let floor = first_listable(&s).await;
                let before = observe(&s, floor).await;
                drop(s);
                let s = open();
                assert_eq!(first_listable(&s).await, floor, "the same revisions are kept");
                assert_eq!(observe(&s, floor).await, before);
                s
            };
            let mut s = open();
            for (i, action, v) in ops {
                // Some names share more than their first 16 bytes, which the reload sorts by.
                let name = if i % 2 == 0 { format!("o{i}") } else { format!("object-with-a-long-shared-prefix-{i}") };
                let cur = s.get(&key(&name)).await.ok();
                match (cur, action) {
                    (_, 5) => s = check_reopen(s).await,
                    (None, _) => {
                        let mut new = thing(&name, serde_json::json!(v));
                        new.metadata.labels.insert("v", (v % 2).to_string());
                        s.create(new, &w()).await.unwrap();
                    }
                    (Some(_), 0) => {
                        s.delete(&key(&name), &DeleteOptions::default()).await.unwrap();
                    }
                    (Some(c), 1) => {
                        let mut next = (*c).clone();
                        next.spec = RawJson::from_value(&serde_json::json!({ "v": v }));
                        s.update(next, &w()).await.unwrap();
                    }
                    (Some(c), 2) => {
                        let mut next = (*c).clone();
                        next.status = RawJson::from_value(&serde_json::json!({ "seen": v }));
                        s.update_status(next, &w()).await.unwrap();
                    }
                    (Some(c), 3) => {
                        let mut next = (*c).clone();
                        next.metadata.labels.insert("v", v.to_string());
                        s.update(next, &w()).await.unwrap();
                    }
                    (Some(_), _) => {
                        let rev = s.current_revision().await.unwrap();
                        if rev > 2 {
                            s.compact(rev - 2).await.unwrap();
                        }
                    }
                }
            }
            check_reopen(s).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_commits() {
    let s = RedbStore::open(fresh("group-commit")).unwrap();
    s.create(thing("first", serde_json::json!(0)), &w()).await.unwrap();
    assert_eq!(s.commits(), 1, "one write alone is one commit");
    let writes = 64 * 20;
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    s.create(thing(&format!("t{t}-{i}"), serde_json::json!(i)), &w()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let commits = s.commits() - 1;
    eprintln!("{writes} concurrent writes in {commits} commits");
    assert_eq!(s.current_revision().await.unwrap(), writes + 1);
    assert!(commits * 4 <= writes, "{writes} concurrent writes took {commits} commits: they should share them");
}

/// `close` commits what was queued, releases the file at once (so the path opens again while a
/// clone of the closed handle still exists), and from then on every clone refuses calls and its
/// watches end with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_releases_the_file_while_clones_remain() {
    let path = fresh("close");
    let s = RedbStore::open(&path).unwrap();
    let clone = s.clone();
    let first = s.create(thing("first", serde_json::json!(0)), &w()).await.unwrap();
    let mut watch = s.watch(&WatchRequest::from(things(), first.metadata.resource_version)).await.unwrap();
    // Writes racing the close: each is either acknowledged (and then durable) or refused.
    let racing: Vec<_> = (0..50)
        .map(|i| {
            let c = clone.clone();
            tokio::spawn(async move { c.create(thing(&format!("r{i}"), serde_json::json!(i)), &w()).await })
        })
        .collect();
    s.close().await;
    assert!(clone.is_closed());
    let mut acknowledged = Vec::new();
    for (i, r) in racing.into_iter().enumerate() {
        match r.await.unwrap() {
            Ok(o) => acknowledged.push(o),
            Err(Error::Unavailable { message, .. }) => assert!(message.contains("closed"), "r{i}: {message}"),
            Err(e) => panic!("r{i}: {e}"),
        }
    }
    for store in [&s, &clone] {
        match store.create(thing("late", serde_json::json!(1)), &w()).await.unwrap_err() {
            Error::Unavailable { message, .. } => assert!(message.contains("is closed"), "{message}"),
            e => panic!("expected Unavailable, got {e}"),
        }
        assert!(matches!(store.get(&key("first")).await, Err(Error::Unavailable { .. })));
        assert!(matches!(store.grant_lease(Duration::from_secs(5)).await, Err(Error::Unavailable { .. })));
    }
    // The watch delivers what was committed before the close, then ends with an error.
    let mut seen = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("the watch ends") {
            Some(Ok(WatchEvent::Added(_))) => seen += 1,
            Some(Err(Error::Unavailable { message, .. })) => {
                assert_eq!(message, "store closed");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, 1 + acknowledged.len(), "every committed create, then the end");
    assert!(watch.next().await.is_none());
    s.close().await; // a second close does nothing

    // `clone` still exists: the file is free all the same.
    let again = RedbStore::open(&path).expect("reopen right after close");
    assert_eq!(again.get(&key("first")).await.unwrap(), first);
    for o in &acknowledged {
        assert_eq!(again.get(&o.key()).await.unwrap(), *o, "acknowledged writes are durable");
    }
    assert_eq!(again.len(), 1 + acknowledged.len(), "refused writes left nothing");
    again.create(thing("after", serde_json::json!(2)), &w()).await.unwrap();
    drop(clone);
    drop(s);
    assert!(again.get(&key("after")).await.is_ok(), "dropping the closed handles leaves the new one alone");
}
