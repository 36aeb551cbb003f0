//! Start-to-running latency of a container on the Docker Engine beside a process of the process
//! runtime, measured in the same run.
//!
//! `cargo bench -p orch-benches --bench docker_start`
//!
//! Each sample is one `start` call plus the `status` calls until the instance reports
//! `Running`, for one instance at a time (50 each, sequentially, after 3 warm-up starts): a
//! container of a locally imported busybox image (`/bin/busybox` from Debian's busybox-static)
//! running `sleep 30`, and `/bin/sleep 30` as a process. Instances are removed between samples,
//! outside the timing. Reports median, p99 and max (of 50 samples the p99 is the slowest one).
//! Without a reachable engine (or busybox) the Docker column is skipped with a note.

use std::time::{Duration, Instant};

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

/// `n` start-to-running samples (after `warmup` unmeasured ones).
async fn measure(
    runtime: &dyn Runtime,
    n: usize,
    warmup: usize,
    make: impl Fn(usize) -> InstanceSpec,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let spec = make(i);
        let began = Instant::now();
        let h = runtime.start(&spec).await.expect("start");
        while !matches!(runtime.status(&h).await.expect("status"), InstanceState::Running { .. }) {
            tokio::task::yield_now().await;
        }
        let took = began.elapsed();
        if i >= warmup {
            samples.push(took);
        }
        runtime.remove(&h).await.expect("remove");
    }
    samples.sort();
    samples
}

fn report(what: &str, samples: &[Duration]) {
    println!(
        "  {what:9} start-to-running: median {:>9.2?}  p99 {:>9.2?}  max {:>9.2?}  ({} starts)",
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples[samples.len() - 1],
        samples.len()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--test");
    let (n, warmup) = if quick { (3, 1) } else { (50, 3) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let root = std::env::temp_dir().join(format!("orch-bench-docker-start-{}", std::process::id()));
    let process = ProcessRuntime::new(&root).expect("runtime root");
    println!("docker_start: one instance at a time, {n} samples each");
    rt.block_on(async {
        let samples = measure(&process, n, warmup, |i| spec(format!("p-{i}"), None, &["/bin/sleep", "30"])).await;
        report("process", &samples);

        let busybox = std::path::Path::new("/bin/busybox");
        let rootfs = match busybox_rootfs(busybox) {
            Ok(rootfs) => rootfs,
            Err(e) => {
                println!("  docker: skipped ({e})");
                return;
            }
        };
        let mut config = DockerConfig::new(format!("bench-{}", std::process::id()));
        config.orphan_grace = None;
        let docker = match DockerRuntime::connect(config).await {
            Ok(d) => d,
            Err(e) => {
                println!("  docker: skipped ({e})");
                return;
            }
        };
        let image = format!("orch-bench-busybox:{}", std::process::id());
        docker.import_image(&image, rootfs).await.expect("import the bench image");
        let samples =
            measure(&docker, n, warmup, |i| spec(format!("d-{i}"), Some(image.clone()), &["/bin/sleep", "30"])).await;
        report("docker", &samples);
        for h in docker.list().await.unwrap_or_default() {
            let _ = docker.remove(&h).await;
        }
        docker.remove_image(&image, true).await.expect("remove the bench image");
        println!("  engine API {}", docker.api_version().await.unwrap_or_else(|e| e.to_string()));
    });
    let _ = std::fs::remove_dir_all(&root);
}
