//! Controllers report through the `metrics` facade: reconcile counts and outcomes, retries,
//! durations, queue adds and depth, cache sizes. (A test binary of its own: the recorder is
//! process-wide.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use orch_core::kinds::Node;
use orch_core::{Action, Api, Context, Controller, ControllerBuilder, Error, Manager, Object, ObjectMeta, Store};
use orch_store::MemoryStore;

struct FailOnce(AtomicUsize);

#[async_trait::async_trait]
impl Controller for FailOnce {
    type Kind = Node;
    type Error = Error;
    async fn reconcile(&self, _node: Arc<Object<Node>>, _ctx: &Context) -> Result<Action, Error> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(Error::Unavailable { message: "first call fails".into(), source: None });
        }
        Ok(Action::Done)
    }
}

#[tokio::test(start_paused = true)]
async fn controllers_report_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder in this process");

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let nodes: Api<Node> = Api::all(store.clone());
    for i in 0..3 {
        nodes.create(&Object::new(ObjectMeta::named(format!("n{i}")), Node::default())).await.unwrap();
    }
    let mut manager = Manager::new(store);
    manager.add(ControllerBuilder::new("metered", FailOnce(AtomicUsize::new(0))));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(manager.run(async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_secs(10)).await;
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();

    let mut found = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let k = key.key();
        let labels: Vec<String> = k.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        let name = format!("{}{{{}}}", k.name(), labels.join(","));
        let v = match value {
            DebugValue::Counter(c) => c as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        };
        found.insert(name, v);
    }
    let get = |name: &str| found.get(name).copied().unwrap_or_else(|| panic!("no metric {name} in {found:#?}"));
    assert_eq!(get("orch_reconciles_total{controller=metered,result=ok}"), 3.0);
    assert_eq!(get("orch_reconciles_total{controller=metered,result=error}"), 1.0);
    assert_eq!(get("orch_reconcile_retries_total{controller=metered}"), 1.0);
    assert_eq!(get("orch_reconcile_duration_seconds{controller=metered}"), 4.0, "one sample per reconcile");
    assert!(get("orch_queue_adds_total{queue=metered}") >= 4.0);
    assert_eq!(get("orch_queue_depth{queue=metered}"), 0.0);
    assert_eq!(get("orch_cache_objects{kind=Node}"), 3.0);
}
