//! The endpoints controller at scale (criterion): 10,000 services of 10 workloads each (100,000
//! endpoints) on the memory store. One iteration flips one workload's readiness (a status write,
//! as its node agent would make) and waits for the watch event of the one slice that changes:
//! the time from an endpoint's change to its slice written, which is what proxies and DNS servers
//! then read. The p50 and p99 of all iterations are printed after the run.
//!
//! `cargo bench -p orch-benches --bench endpoints` (`-- --test` for a quick smoke run with
//! 1,000 services)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use futures::StreamExt;
use orch_controllers::{EndpointsConfig, EndpointsController};
use orch_core::kinds::{
    Condition, ConditionStatus, EndpointSlice, Phase, PortStatus, PortTarget, Service, ServicePort, Workload,
    set_condition,
};
use orch_core::{Api, Event, ListParams, Manager, Object, ObjectMeta, Store, Timestamp};
use orch_store::MemoryStore;

const PER_SERVICE: usize = 10;

fn services() -> usize {
    if std::env::args().any(|a| a == "--test") { 1_000 } else { 10_000 }
}

static SAMPLES: Mutex<Vec<Duration>> = Mutex::new(Vec::new());

fn ready_status(w: &Object<Workload>, port: u32, ready: bool) -> orch_core::kinds::WorkloadStatus {
    let mut status = w.status.clone();
    status.phase = Phase::Running;
    status.address = "127.0.0.1".into();
    status.ports = vec![PortStatus {
        container: "main".into(),
        name: Some("http".into()),
        container_port: 8080,
        host_port: port,
        ..Default::default()
    }];
    let s = if ready { ConditionStatus::True } else { ConditionStatus::False };
    set_condition(&mut status.conditions, Condition::new("Ready", s, "Bench"), Timestamp(1));
    status
}

fn endpoints(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let n = services();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (stop, running) = rt.block_on(async {
        let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
        let svcs: Api<Service> = Api::namespaced(store.clone(), "default");
        for s in 0..n {
            for i in 0..PER_SERVICE {
                let mut w = Workload::command("main", &["serve"]);
                w.node_name = Some(format!("node-{}", i % 100));
                let meta = ObjectMeta::named(format!("svc-{s}-{i}")).with_label("app", format!("svc-{s}"));
                let created = workloads.create(&Object::new(meta, w)).await.expect("create");
                let port = 20_000 + (s * PER_SERVICE + i) as u32 % 10_000;
                workloads.write_status(&created.metadata, &ready_status(&created, port, true)).await.expect("status");
            }
            let svc = Service {
                selector: [("app".to_string(), format!("svc-{s}"))].into(),
                ports: vec![ServicePort {
                    port: 80,
                    target_port: Some(PortTarget::Name("http".into())),
                    ..Default::default()
                }],
                ..Default::default()
            };
            svcs.create(&Object::new(ObjectMeta::named(format!("svc-{s}")), svc)).await.expect("service");
        }
        let mut manager = Manager::new(store.clone());
        manager.add(EndpointsController::builder(EndpointsConfig::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(manager.run(async move {
            let _ = stopped.await;
        }));
        // Every service sliced and its status reported (the last write of a reconcile) before
        // anything is measured: the controller is idle.
        let began = Instant::now();
        loop {
            let list = svcs.list(&ListParams::default()).await.expect("list");
            if list.items.iter().filter(|s| s.status.endpoints as usize == PER_SERVICE).count() == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("endpoints: {n} services, {} endpoints sliced in {:.1?}", n * PER_SERVICE, began.elapsed());
        // The echoes of those writes (each service's own status and slice events) are reconciled
        // too, finding nothing to do; the measurement starts once they are through.
        tokio::time::sleep(Duration::from_secs(if n > 1_000 { 5 } else { 1 })).await;
        (stop, running)
    });
    let mut g = c.benchmark_group("endpoints");
    g.sample_size(20);
    let label = format!("readiness_change_to_slice_written_{}k_endpoints", n * PER_SERVICE / 1000);
    let mut next = 0usize;
    g.bench_function(label, |b| {
        b.iter_custom(|iters| {
            let store = store.clone();
            rt.block_on(async {
                let workloads: Api<Workload> = Api::namespaced(store.clone(), "default");
                let slices: Api<EndpointSlice> = Api::namespaced(store.clone(), "default");
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A different service each time, spread over the keyspace.
                    let s = (next * 7919) % n;
                    next += 1;
                    let name = format!("svc-{s}-{}", next % PER_SERVICE);
                    let w = workloads.get(&name).await.expect("get");
                    let ready = !w.status.conditions.iter().any(|c| c.status == ConditionStatus::True);
                    let port = w.status.ports[0].host_port;
                    let from = store.current_revision().await.expect("revision");
                    let mut events = slices.watch(&ListParams::default(), Some(from + 1)).await.expect("watch");
                    let start = Instant::now();
                    workloads.write_status(&w.metadata, &ready_status(&w, port, ready)).await.expect("flip");
                    while let Some(e) = events.next().await {
                        if let Ok(Event::Modified(slice)) = e
                            && slice.spec.endpoints.iter().any(|e| e.workload == name && e.conditions.ready == ready)
                        {
                            break;
                        }
                    }
                    let took = start.elapsed();
                    SAMPLES.lock().expect("samples").push(took);
                    if std::env::var("ENDPOINTS_TRACE").is_ok() {
                        eprintln!("flip {name} -> {ready}: {took:?}");
                    }
                    total += took;
                }
                total
            })
        })
    });
    g.finish();
    let _ = stop.send(());
    rt.block_on(running).expect("manager").expect("run");
    let mut all = SAMPLES.lock().expect("samples").clone();
    all.sort();
    if !all.is_empty() {
        let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
        eprintln!(
            "endpoints: readiness change to slice written over {} changes: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            all.len(),
            at(0.5),
            at(0.99),
            all[all.len() - 1]
        );
    }
}

#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group! {
        name = benches;
        config = Criterion::default().measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(1));
        targets = endpoints
    }
}
criterion::criterion_main!(group::benches);
