//! What the Docker tests share: whether an engine is there, a small local image, and a node of
//! their own on the daemon that is emptied when the test ends, even when it fails.
//!
//! The image is a statically linked busybox imported as `orch-test-busybox:<pid>` (no
//! registry: `apt-get install busybox-static`); the tests of one process share it and the last
//! one to finish removes it. Where no engine answers (or busybox is missing) each test says it
//! is skipped and returns, unless `ORCH_REQUIRE_DOCKER=1` (as in CI), which turns that into a
//! failure.

#![allow(dead_code, unreachable_pub)] // each test file uses part of it

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
};
use orch_runtime::{DockerConfig, DockerRuntime};

/// Set to `1` where the Docker tests must run (CI): a missing engine then fails them.
pub const REQUIRE: &str = "ORCH_REQUIRE_DOCKER";
const BUSYBOX: &str = "/bin/busybox";
const REPO: &str = "orch-test-busybox";

/// Runs `f` to completion on a thread and runtime of its own: usable from plain code, from
/// `Drop`, and from inside another runtime.
pub fn side<T: Send + 'static, F: Future<Output = T> + 'static>(f: impl FnOnce() -> F + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(f())
    })
    .join()
    .expect("the side thread panicked")
}

fn quiet(node: &str) -> DockerConfig {
    let mut config = DockerConfig::new(node);
    config.orphan_grace = None;
    config
}

/// Why the Docker tests cannot run here, if they cannot.
fn unavailable() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        if !Path::new(BUSYBOX).exists() {
            return Some(format!("{BUSYBOX} is missing (apt-get install busybox-static)"));
        }
        side(|| async {
            match DockerRuntime::connect(quiet("probe")).await {
                Ok(_) => None,
                Err(e) => Some(format!("no Docker engine: {e}")),
            }
        })
    })
    .as_deref()
}

/// True (after saying so) when the Docker tests cannot run here; panics instead where they
/// are required.
pub fn skip(test: &str) -> bool {
    let Some(why) = unavailable() else { return false };
    if std::env::var(REQUIRE).is_ok_and(|v| v == "1") {
        panic!("{test}: the Docker tests are required here ({REQUIRE}=1) but cannot run: {why}");
    }
    eprintln!("skipped {test}: {why}");
    true
}

/// The test image of this process.
pub fn image() -> String {
    format!("{REPO}:{}", std::process::id())
}

static IMAGE_USERS: Mutex<usize> = Mutex::new(0);

fn hold_image() {
    let mut users = IMAGE_USERS.lock().unwrap_or_else(|e| e.into_inner());
    if *users == 0 {
        side(|| async {
            let rt = DockerRuntime::connect(quiet("image")).await.expect("engine");
            remove_leftovers(&rt).await;
            let rootfs = orch_runtime::docker::busybox_rootfs(Path::new(BUSYBOX)).expect("busybox root filesystem");
            rt.import_image(&image(), rootfs).await.expect("import the test image");
        });
    }
    *users += 1;
}

fn release_image() {
    let mut users = IMAGE_USERS.lock().unwrap_or_else(|e| e.into_inner());
    *users -= 1;
    if *users == 0 {
        side(|| async {
            let rt = DockerRuntime::connect(quiet("image")).await.expect("engine");
            if let Err(e) = rt.remove_image(&image(), true).await {
                eprintln!("could not remove the test image {}: {e}", image());
            }
        });
    }
}

/// Images and containers of test (and bench) processes that died without cleaning up (killed,
/// aborted): their pid is gone and they are over an hour old (a run in another pid namespace
/// sharing the daemon is never that long).
async fn remove_leftovers(rt: &DockerRuntime) {
    let docker = bollard::Docker::connect_with_defaults().expect("client");
    let dead = |pid: &str| pid.parse::<u32>().is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let old = |created: i64| now - created > 3600;
    if let Ok(images) = docker.list_images(None::<bollard::query_parameters::ListImagesOptions>).await {
        for tag in images.iter().filter(|i| old(i.created)).flat_map(|i| i.repo_tags.iter()) {
            let pid = tag.strip_prefix(&format!("{REPO}:")).or_else(|| tag.strip_prefix("orch-bench-busybox:"));
            if let Some(pid) = pid
                && dead(pid)
            {
                let _ = rt.remove_image(tag, true).await;
            }
        }
    }
    let filters = HashMap::from([("label".to_string(), vec!["orch.dev/managed-by=orch".to_string()])]);
    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    for c in docker.list_containers(Some(options)).await.unwrap_or_default() {
        if !old(c.created.unwrap_or(now)) {
            continue;
        }
        let node = c.labels.as_ref().and_then(|l| l.get("orch.dev/node")).cloned().unwrap_or_default();
        let pid = node.strip_prefix("bench-").or_else(|| node.strip_prefix('t').and_then(|n| n.split('-').next()));
        let pid = pid.unwrap_or("");
        if dead(pid) {
            let rm = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
            let _ = docker.remove_container(c.id.as_deref().unwrap_or_default(), Some(rm)).await;
        }
    }
}

/// A test's own node on the daemon, holding the test image. Dropping it removes every
/// container and volume labelled for the node, then the image if no other test holds it.
#[derive(Debug)]
pub struct Scope {
    /// The node name: `t<pid>-<test>-<n>`.
    pub node: String,
    /// The test image.
    pub image: String,
}

impl Scope {
    /// A fresh node for test `test`.
    pub fn new(test: &str) -> Scope {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        hold_image();
        let short: String = test.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(36).collect();
        let node = format!("t{}-{short}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        Scope { node: node.to_ascii_lowercase(), image: image() }
    }

    /// A runtime configuration for this node, with no orphan sweep (tests that want one set it).
    pub fn config(&self) -> DockerConfig {
        quiet(&self.node)
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let node = self.node.clone();
        let left = side(move || async move {
            let Ok(docker) = bollard::Docker::connect_with_defaults() else { return 0 };
            let label = format!("orch.dev/node={node}");
            let filters = HashMap::from([("label".to_string(), vec![label])]);
            let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
            let mut removed = 0;
            for c in docker.list_containers(Some(options)).await.unwrap_or_default() {
                let rm = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
                if docker.remove_container(c.id.as_deref().unwrap_or_default(), Some(rm)).await.is_ok() {
                    removed += 1;
                }
            }
            let options = ListVolumesOptionsBuilder::default().filters(&filters).build();
            if let Ok(listed) = docker.list_volumes(Some(options)).await {
                for v in listed.volumes.unwrap_or_default() {
                    let _ = docker.remove_volume(&v.name, None::<bollard::query_parameters::RemoveVolumeOptions>).await;
                }
            }
            removed
        });
        if left > 0 && !std::thread::panicking() {
            eprintln!("{}: removed {left} container(s) the test left behind", self.node);
        }
        release_image();
    }
}
