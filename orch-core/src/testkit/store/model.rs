//! The suite's model check: random sequences of operations on a key space of three names, run
//! against the store and a simple sequential model, which must agree on every answer.

use super::*;

/// One operation of the model check, on a key space of three names.
#[derive(Debug, Clone)]
enum Op {
    Create { name: u8, label: u8, spec: u8, finalizers: u8 },
    Update { name: u8, stale: bool, label: u8, spec: u8, finalizers: u8 },
    UpdateStatus { name: u8, stale: bool, status: u8 },
    Delete { name: u8, stale: Option<bool> },
    Get { name: u8 },
    List { label: Option<u8> },
    Compact { back: u8 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let name = 0..3u8;
    prop_oneof![
        3 => (name.clone(), 0..2u8, 0..3u8, 0..3u8).prop_map(|(name, label, spec, finalizers)| Op::Create { name, label, spec, finalizers }),
        4 => (name.clone(), proptest::bool::weighted(0.2), 0..2u8, 0..3u8, 0..3u8)
            .prop_map(|(name, stale, label, spec, finalizers)| Op::Update { name, stale, label, spec, finalizers }),
        2 => (name.clone(), proptest::bool::weighted(0.2), 0..3u8).prop_map(|(name, stale, status)| Op::UpdateStatus { name, stale, status }),
        2 => (name.clone(), proptest::option::of(proptest::bool::ANY)).prop_map(|(name, stale)| Op::Delete { name, stale }),
        1 => name.clone().prop_map(|name| Op::Get { name }),
        1 => proptest::option::of(0..2u8).prop_map(|label| Op::List { label }),
        1 => (0..4u8).prop_map(|back| Op::Compact { back }),
    ]
}

const FINALIZERS: [&str; 2] = ["model.orch.dev/a", "model.orch.dev/b"];

#[derive(Debug, Clone, PartialEq)]
struct ModelObj {
    rv: u64,
    generation: u64,
    version: u64,
    label: u8,
    spec: u8,
    status: Option<u8>,
    finalizers: u8,
    deleting: bool,
}

#[derive(Default)]
struct Model {
    objects: BTreeMap<u8, ModelObj>,
    /// (event type, name, the body: the object's new state, or its last for `Deleted`) in order.
    events: Vec<(&'static str, String, ModelObj)>,
    last_rev: u64,
    /// Revisions written so far, to pick compaction points from.
    written: Vec<u64>,
    floor: u64,
}

fn model_name(n: u8) -> String {
    format!("m{n}")
}

fn model_object(name: u8, label: u8, spec: u8, finalizers: u8) -> DynamicObject {
    let mut o = thing(&model_name(name), serde_json::json!({ "v": spec }));
    o.metadata.labels.insert("l", label.to_string());
    o.metadata.finalizers = FINALIZERS[..finalizers as usize].iter().map(|s| s.to_string()).collect();
    o
}

/// What one operation returned, reduced to what the model predicts.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(u64),
    Pending(u64),
    Gone(u64),
    Found(Option<u64>),
    Listed(Vec<(String, u64)>),
    Err(&'static str),
}

impl Model {
    /// Checks that a write the model expects got a fresh revision, then records it.
    fn advance(&mut self, rev: u64) -> Result<u64, String> {
        if rev <= self.last_rev {
            return Err(format!("revision {rev} is not after {}", self.last_rev));
        }
        self.last_rev = rev;
        self.written.push(rev);
        Ok(rev)
    }
}

async fn run_model(store: Arc<dyn Store>, ops: &[Op]) -> Result<(), String> {
    let mut m = Model { last_rev: store.current_revision().await.map_err(|e| e.to_string())?, ..Default::default() };
    let start = m.last_rev + 1;
    m.floor = 0;
    for (i, op) in ops.iter().enumerate() {
        let ctx = |msg: String| format!("op #{i} {op:?}: {msg}");
        match op {
            Op::Create { name, label, spec, finalizers } => {
                let got = store.create(model_object(*name, *label, *spec, *finalizers), &w()).await;
                let outcome = match &got {
                    Ok(o) => Outcome::Ok(o.metadata.resource_version),
                    Err(e) => Outcome::Err(e.code()),
                };
                if m.objects.contains_key(name) {
                    if outcome != Outcome::Err("AlreadyExists") {
                        return Err(ctx(format!("expected AlreadyExists, got {outcome:?}")));
                    }
                } else {
                    let Outcome::Ok(rev) = outcome else {
                        return Err(ctx(format!("expected success, got {outcome:?}")));
                    };
                    let rev = m.advance(rev).map_err(ctx)?;
                    let o = got.unwrap();
                    if (o.metadata.generation, o.metadata.version) != (1, 1) {
                        return Err(ctx("generation and version must start at 1".into()));
                    }
                    m.objects.insert(
                        *name,
                        ModelObj {
                            rv: rev,
                            generation: 1,
                            version: 1,
                            label: *label,
                            spec: *spec,
                            status: None,
                            finalizers: *finalizers,
                            deleting: false,
                        },
                    );
                    m.events.push(("Added", model_name(*name), m.objects[name].clone()));
                }
            }
            Op::Update { name, stale, label, spec, finalizers } => {
                let cur = m.objects.get(name).cloned();
                let rv = cur.as_ref().map_or(1, |c| if *stale { c.rv - 1 } else { c.rv });
                let mut obj = model_object(*name, *label, *spec, *finalizers);
                obj.metadata.resource_version = rv;
                let got = store.update(obj, &w()).await;
                let outcome = match &got {
                    Ok(o) => Outcome::Ok(o.metadata.resource_version),
                    Err(e) => Outcome::Err(e.code()),
                };
                let Some(cur) = cur else {
                    if outcome != Outcome::Err("NotFound") {
                        return Err(ctx(format!("expected NotFound, got {outcome:?}")));
                    }
                    continue;
                };
                let expected_err = if *stale {
                    Some("Conflict")
                } else if cur.deleting && *finalizers > cur.finalizers {
                    Some("Invalid")
                } else {
                    None
                };
                if let Some(code) = expected_err {
                    if outcome != Outcome::Err(code) {
                        return Err(ctx(format!("expected {code}, got {outcome:?}")));
                    }
                    continue;
                }
                let Outcome::Ok(rev) = outcome else { return Err(ctx(format!("expected success, got {outcome:?}"))) };
                if cur.label == *label && cur.spec == *spec && cur.finalizers == *finalizers {
                    if rev != cur.rv {
                        return Err(ctx(format!("a no-op update must keep revision {}, got {rev}", cur.rv)));
                    }
                    continue;
                }
                let rev = m.advance(rev).map_err(ctx)?;
                let o = got.unwrap();
                // Removing the last finalizer deletes the object as it was last stored.
                let removing = cur.deleting && *finalizers == 0;
                let generation = if removing { cur.generation } else { cur.generation + u64::from(cur.spec != *spec) };
                if o.metadata.generation != generation || o.metadata.version != cur.version + 1 {
                    return Err(ctx(format!(
                        "expected generation {generation} version {}, got {} {}",
                        cur.version + 1,
                        o.metadata.generation,
                        o.metadata.version
                    )));
                }
                if removing {
                    m.objects.remove(name);
                    m.events.push(("Deleted", model_name(*name), ModelObj { rv: rev, ..cur }));
                } else {
                    m.objects.insert(
                        *name,
                        ModelObj {
                            rv: rev,
                            generation,
                            version: cur.version + 1,
                            label: *label,
                            spec: *spec,
                            finalizers: *finalizers,
                            ..cur
                        },
                    );
                    m.events.push(("Modified", model_name(*name), m.objects[name].clone()));
                }
            }
            Op::UpdateStatus { name, stale, status } => {
                let cur = m.objects.get(name).cloned();
                let rv = cur.as_ref().map_or(1, |c| if *stale { c.rv - 1 } else { c.rv });
                let mut obj = model_object(*name, 0, 0, 0);
                obj.metadata.resource_version = rv;
                obj.status = RawJson::from_value(&serde_json::json!({ "s": status }));
                let outcome = match store.update_status(obj, &w()).await {
                    Ok(o) => Outcome::Ok(o.metadata.resource_version),
                    Err(e) => Outcome::Err(e.code()),
                };
                let Some(cur) = cur else {
                    if outcome != Outcome::Err("NotFound") {
                        return Err(ctx(format!("expected NotFound, got {outcome:?}")));
                    }
                    continue;
                };
                if *stale {
                    if outcome != Outcome::Err("Conflict") {
                        return Err(ctx(format!("expected Conflict, got {outcome:?}")));
                    }
                    continue;
                }
                let Outcome::Ok(rev) = outcome else { return Err(ctx(format!("expected success, got {outcome:?}"))) };
                if cur.status == Some(*status) {
                    if rev != cur.rv {
                        return Err(ctx("a no-op status update must keep the revision".into()));
                    }
                    continue;
                }
                let rev = m.advance(rev).map_err(ctx)?;
                m.objects.insert(*name, ModelObj { rv: rev, version: cur.version + 1, status: Some(*status), ..cur });
                m.events.push(("Modified", model_name(*name), m.objects[name].clone()));
            }
            Op::Delete { name, stale } => {
                let cur = m.objects.get(name).cloned();
                let rv = match (stale, &cur) {
                    (Some(true), Some(c)) => Some(c.rv - 1),
                    (Some(false), Some(c)) => Some(c.rv),
                    (Some(_), None) => Some(1),
                    (None, _) => None,
                };
                let got = store
                    .delete(&key(&model_name(*name)), &DeleteOptions { resource_version: rv, ..Default::default() })
                    .await;
                let outcome = match &got {
                    Ok(DeleteOutcome::Deleted(o)) => Outcome::Gone(o.metadata.resource_version),
                    Ok(DeleteOutcome::Pending(o)) => Outcome::Pending(o.metadata.resource_version),
                    Err(e) => Outcome::Err(e.code()),
                };
                let Some(cur) = cur else {
                    if outcome != Outcome::Err("NotFound") {
                        return Err(ctx(format!("expected NotFound, got {outcome:?}")));
                    }
                    continue;
                };
                if *stale == Some(true) {
                    if outcome != Outcome::Err("Conflict") {
                        return Err(ctx(format!("expected Conflict, got {outcome:?}")));
                    }
                    continue;
                }
                if cur.finalizers == 0 {
                    let Outcome::Gone(rev) = outcome else {
                        return Err(ctx(format!("expected Deleted, got {outcome:?}")));
                    };
                    let rev = m.advance(rev).map_err(ctx)?;
                    m.objects.remove(name);
                    m.events.push(("Deleted", model_name(*name), ModelObj { rv: rev, ..cur }));
                } else if cur.deleting {
                    if outcome != Outcome::Pending(cur.rv) {
                        return Err(ctx(format!("a repeated delete must change nothing, got {outcome:?}")));
                    }
                } else {
                    let Outcome::Pending(rev) = outcome else {
                        return Err(ctx(format!("expected Pending, got {outcome:?}")));
                    };
                    let rev = m.advance(rev).map_err(ctx)?;
                    m.objects.insert(*name, ModelObj { rv: rev, version: cur.version + 1, deleting: true, ..cur });
                    m.events.push(("Modified", model_name(*name), m.objects[name].clone()));
                }
            }
            Op::Get { name } => {
                let outcome = match store.get(&key(&model_name(*name))).await {
                    Ok(o) => Outcome::Found(Some(o.metadata.resource_version)),
                    Err(e) if e.is_not_found() => Outcome::Found(None),
                    Err(e) => Outcome::Err(e.code()),
                };
                let expected = Outcome::Found(m.objects.get(name).map(|o| o.rv));
                if outcome != expected {
                    return Err(ctx(format!("expected {expected:?}, got {outcome:?}")));
                }
            }
            Op::List { label } => {
                let mut sel = things();
                if let Some(l) = label {
                    sel = sel.with_labels(LabelSelector::from_labels([("l", l.to_string())]));
                }
                let outcome = match store.list(&ListRequest::new(sel)).await {
                    Ok(page) => Outcome::Listed(
                        page.items.iter().map(|o| (o.metadata.name.clone(), o.metadata.resource_version)).collect(),
                    ),
                    Err(e) => Outcome::Err(e.code()),
                };
                let expected = Outcome::Listed(
                    m.objects
                        .iter()
                        .filter(|(_, o)| label.is_none_or(|l| o.label == l))
                        .map(|(n, o)| (model_name(*n), o.rv))
                        .collect(),
                );
                if outcome != expected {
                    return Err(ctx(format!("expected {expected:?}, got {outcome:?}")));
                }
            }
            Op::Compact { back } => {
                let Some(&rev) = m.written.iter().rev().nth(*back as usize) else { continue };
                store.compact(rev).await.map_err(|e| ctx(e.to_string()))?;
                m.floor = m.floor.max(rev);
            }
        }
    }
    // Every object's full state matches.
    for (name, o) in &m.objects {
        let got = store.get(&key(&model_name(*name))).await.map_err(|e| format!("final get m{name}: {e}"))?;
        let actual = model_view(&got);
        if actual != *o {
            return Err(format!("final state of m{name}: expected {o:?}, got {actual:?}"));
        }
    }
    // The event stream from the oldest revision still available equals the model's, bodies
    // included. A `Deleted` body is the last state at the deletion's revision; its version and
    // deletion mark are the backend's own.
    let from = start.max(m.floor);
    let expected: Vec<_> = m.events.iter().filter(|e| e.2.rv >= from).cloned().collect();
    let mut watch =
        store.watch(&WatchRequest::from(things(), from)).await.map_err(|e| format!("watch from {from}: {e}"))?;
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match tokio::time::timeout(PATIENCE, watch.next()).await {
            Ok(Some(Ok(WatchEvent::Progress(_)))) => {}
            Ok(Some(Ok(e))) => {
                let (kind, name, _) = describe(&e);
                let mut body = model_view(e.object().expect("not a progress event"));
                if kind == "Deleted" {
                    let want = &expected[got.len()].2;
                    (body.version, body.deleting) = (want.version, want.deleting);
                }
                got.push((kind, name, body));
            }
            other => return Err(format!("watch from {from} stopped after {got:?}: {other:?}")),
        }
    }
    if got != expected {
        return Err(format!("event stream differs:\nexpected {expected:?}\ngot      {got:?}"));
    }
    Ok(())
}

/// An object as the model sees it.
fn model_view(got: &DynamicObject) -> ModelObj {
    let mm = &got.metadata;
    let status = if got.status.is_null() { None } else { got.status.to_value()["s"].as_u64().map(|s| s as u8) };
    ModelObj {
        rv: mm.resource_version,
        generation: mm.generation,
        version: mm.version,
        label: mm.labels.get("l").and_then(|l| l.parse().ok()).unwrap_or(255),
        spec: got.spec.to_value()["v"].as_u64().unwrap_or(255) as u8,
        status,
        finalizers: mm.finalizers.len() as u8,
        deleting: mm.deletion_timestamp.is_some(),
    }
}

/// Random operation sequences against the store and the model, through proptest: 256 cases
/// (`ORCH_MODEL_CASES` to change), a failing sequence shrunk to a minimal one and its seed kept in
/// `proptest-regressions/store_model.txt` under the running test's package, rerun first next
/// time. Each sequence runs on a fresh store in a fresh runtime of the case's own flavour.
pub(super) async fn model_check(f: Factory) {
    let cases = std::env::var("ORCH_MODEL_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    let paused = tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread;
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/store_model.txt"))),
        ..Config::default()
    };
    // proptest drives the cases synchronously, so it runs on a thread of its own, away from this
    // runtime; each case blocks on a runtime of its own.
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut runner = TestRunner::new(config);
                runner.run(&proptest::collection::vec(op_strategy(), 1..40), |ops| {
                    let rt = if paused {
                        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()
                    } else {
                        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
                    }
                    .expect("a tokio runtime for the case");
                    let f = f.clone();
                    rt.block_on(async move { run_model(f().await, &ops).await }).map_err(TestCaseError::fail)
                })
            })
            .join()
            .expect("the model check's thread")
    });
    if let Err(e) = outcome {
        panic!("store disagrees with the model: {e}");
    }
}
