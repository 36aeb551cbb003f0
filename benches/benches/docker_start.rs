//! Start-to-running latency of a container on the Docker Engine beside a process of the process
//! runtime, measured in the same run.
//!
//! `cargo bench -p orch-benches --bench docker_start`
//!
//! Criterion times each sample: one `start` call plus the `status` calls until the instance
//! reports `Running`, one instance at a time (50 samples each, sequentially): a
//! container of a locally imported busybox image (`/bin/busybox` from Debian's busybox-static)
//! running `sleep 30`, and `/bin/sleep 30` as a process. Instances are removed between samples,
//! outside the timing. At the end, the median, p99 and max of every timed start (of about 50 the
//! p99 is the slowest one).
//! Without a reachable engine (or busybox) the Docker column is skipped with a note.

use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};

use orch_core::kinds::Container;
use orch_core::runtime::{InstanceSpec, InstanceState, Runtime};
use orch_runtime::ProcessRuntime;
use orch_runtime::docker::{DockerConfig, DockerRuntime, busybox_rootfs};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn spec(id: String, image: Option<String>, command: &[&str]) -> InstanceSpec {
    InstanceSpec {
        id,
        container: Container {
            name: "main".into(),
            image,
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        volumes: Vec::new(),
        labels: Default::default(),
    }
}

/// One start-to-running: `start`, then `status` until `Running`; the instance is removed after,
/// outside the timing.
async fn start_to_running(runtime: &dyn Runtime, spec: &InstanceSpec) -> Duration {
    let began = Instant::now();
    let h = runtime.start(spec).await.expect("start");
    while !matches!(runtime.status(&h).await.expect("status"), InstanceState::Running { .. }) {
        tokio::task::yield_now().await;
    }
    let took = began.elapsed();
    runtime.remove(&h).await.expect("remove");
    took
}

fn report(what: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        return;
    }
    samples.sort();
    println!(
        "  {what:9} start-to-running: median {:>9.2?}  p99 {:>9.2?}  max {:>9.2?}  ({} starts)",
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples[samples.len() - 1],
        samples.len()
    );
}

/// Times `n` starts of `runtime` (one per criterion sample, after criterion's warm-up), keeping
/// every sample for the percentiles.
fn bench_runtime(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    n: usize,
    runtime: &dyn Runtime,
    make: impl Fn(usize) -> InstanceSpec,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    let mut next = 0;
    let mut g = c.benchmark_group("docker_start");
    g.sampling_mode(SamplingMode::Flat).sample_size(n).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_millis(1));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let spec = make(next);
                next += 1;
                let t = rt.block_on(start_to_running(runtime, &spec));
                samples.push(t);
                took += t;
            }
            took
        })
    });
    g.finish();
    samples
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = if std::env::args().any(|a| a == "--test") { 10 } else { 50 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let root = std::env::temp_dir().join(format!("orch-bench-docker-start-{}", std::process::id()));
    let process = ProcessRuntime::new(&root).expect("runtime root");
    let mut process_samples =
        bench_runtime(&mut c, &rt, "process", n, &process, |i| spec(format!("p-{i}"), None, &["/bin/sleep", "30"]));

    let mut docker_samples = Vec::new();
    let mut api = String::new();
    let busybox = std::path::Path::new("/bin/busybox");
    let docker = match busybox_rootfs(busybox) {
        Err(e) => {
            println!("docker: skipped ({e})");
            None
        }
        Ok(rootfs) => {
            let mut config = DockerConfig::new(format!("bench-{}", std::process::id()));
            config.orphan_grace = None;
            match rt.block_on(DockerRuntime::connect(config)) {
                Ok(d) => Some((d, rootfs)),
                Err(e) => {
                    println!("docker: skipped ({e})");
                    None
                }
            }
        }
    };
    if let Some((docker, rootfs)) = docker {
        let image = format!("orch-bench-busybox:{}", std::process::id());
        rt.block_on(docker.import_image(&image, rootfs)).expect("import the bench image");
        docker_samples = bench_runtime(&mut c, &rt, "docker", n, &docker, |i| {
            spec(format!("d-{i}"), Some(image.clone()), &["/bin/sleep", "30"])
        });
        rt.block_on(async {
            for h in docker.list().await.unwrap_or_default() {
                let _ = docker.remove(&h).await;
            }
            docker.remove_image(&image, true).await.expect("remove the bench image");
            api = docker.api_version().await.unwrap_or_else(|e| e.to_string());
        });
    }
    c.final_summary();
    let _ = std::fs::remove_dir_all(&root);
    println!("\ndocker_start: one instance at a time, every start criterion timed (its warm-up included)");
    report("process", &mut process_samples);
    report("docker", &mut docker_samples);
    if !api.is_empty() {
        println!("  engine API {api}");
    }
}
