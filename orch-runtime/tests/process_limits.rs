//! Memory and CPU limits of the process runtime, enforced by the kernel through control groups.
//!
//! Where the host gives no writable cgroup file system these tests say so and are skipped;
//! `ORCH_REQUIRE_CGROUPS=1` (set by `.ci/run`) makes that a failure instead.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orch_core::kinds::Container;
use orch_core::runtime::{InstanceSpec, InstanceState, Runtime};
use orch_core::testkit::{eventually, wait_until};
use orch_runtime::ProcessRuntime;
use orch_runtime::cgroup::LimitSupport;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn runtime() -> Option<ProcessRuntime> {
    let root: PathBuf = std::env::temp_dir().join(format!(
        "orch-limits-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&root);
    let rt = ProcessRuntime::new(&root).expect("runtime root");
    if let LimitSupport::Unsupported(reason) = rt.limit_support() {
        assert!(
            std::env::var("ORCH_REQUIRE_CGROUPS").as_deref() != Ok("1"),
            "ORCH_REQUIRE_CGROUPS=1 but limits cannot be enforced here: {reason}"
        );
        eprintln!("SKIPPED: limits are not enforced on this host: {reason}");
        return None;
    }
    assert!(rt.capabilities().resource_limits, "the capability follows the support");
    Some(rt)
}

fn spec(id: &str, script: &str, limits: &[(&str, &str)]) -> InstanceSpec {
    let mut c = Container {
        name: "main".into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    for (k, v) in limits {
        c.resources.limits.insert((*k).into(), v.parse().expect("quantity"));
    }
    InstanceSpec { id: id.into(), container: c, volumes: Vec::new(), labels: Default::default() }
}

/// CPU seconds (user + system) a live process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process is alive");
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).map(|v| v.parse().expect("ticks")).collect();
    // Clock ticks are 1/100 s on Linux.
    (f[0] + f[1]) as f64 / 100.0
}

/// Kills the instance's process group when the test ends, passed or not, so a failed assertion
/// never leaves a spinning process behind.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0 as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

fn pid_of(handle: &orch_core::runtime::Handle) -> u32 {
    handle.data["pid"].as_u64().expect("pid in the handle") as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_over_its_memory_limit_is_oom_killed_and_says_so() {
    let Some(rt) = runtime() else { return };
    // `tail` keeps the whole newline-free input as one line: 256 MiB against a 32 MiB limit.
    let h = rt
        .start(&spec("hog", "head -c 268435456 /dev/zero | tail > /dev/null", &[("memory", "32Mi")]))
        .await
        .expect("start");
    let _kill = KillOnDrop(pid_of(&h));
    let exit = tokio::time::timeout(Duration::from_secs(60), rt.wait(&h)).await.expect("ends").expect("wait");
    assert!(exit.oom_killed, "the kernel's OOM killer ended it: {exit:?}");
    assert!(!exit.success(), "{exit:?}");
    // The same program without a limit runs to completion.
    let free = rt.start(&spec("free", "head -c 67108864 /dev/zero | tail > /dev/null", &[])).await.expect("start");
    let exit = tokio::time::timeout(Duration::from_secs(60), rt.wait(&free)).await.expect("ends").expect("wait");
    assert!(exit.success() && !exit.oom_killed, "{exit:?}");
    for h in [h, free] {
        rt.remove(&h).await.expect("remove");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_process_gets_no_more_cpu_than_its_limit() {
    let Some(rt) = runtime() else { return };
    let h = rt.start(&spec("spin", "while :; do :; done", &[("cpu", "100m")])).await.expect("start");
    let pid = pid_of(&h);
    let _kill = KillOnDrop(pid);
    // It works: it gets to 0.2 CPU seconds (a generous deadline, so a loaded machine cannot fail
    // this), and not faster than its limit lets it. 0.1 CPU a second makes 0.2 s take at least
    // 2 s, less one quota period's burst and the 10 ms tick of the count: 1.7 s is a floor no
    // load can break (load only slows it down), and an unlimited spinner gets there in 0.2 s.
    let started = std::time::Instant::now();
    let before = cpu_seconds(pid);
    wait_until("the spinning process to have used 0.2 CPU seconds", Duration::from_secs(60), async || {
        cpu_seconds(pid) - before >= 0.2
    })
    .await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1_700), "0.2 CPU seconds in {took:?}: faster than a 100m limit allows");
    let groups = rt.limit_support().groups_of("spin");
    assert!(groups.iter().all(|g| g.is_dir()), "the instance's groups exist while it runs: {groups:?}");
    rt.stop(&h, Duration::ZERO).await.expect("stop");
    rt.remove(&h).await.expect("remove");
    assert!(groups.iter().all(|g| !g.exists()), "remove takes the instance's groups away: {groups:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_itself_runs_inside_its_group() {
    let Some(rt) = runtime() else { return };
    let mut sleep = spec("inside", "", &[("memory", "64Mi"), ("cpu", "500m")]);
    sleep.container.command = vec!["sleep".into(), "30".into()];
    let h = rt.start(&sleep).await.expect("start");
    assert!(matches!(rt.status(&h).await.expect("status"), InstanceState::Running { .. }));
    // `sleep` only runs once the shell before it has joined every group; wait for it.
    let pid = pid_of(&h);
    let _kill = KillOnDrop(pid);
    let groups = rt.limit_support().groups_of("inside");
    let runs_sleep = || std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep");
    eventually(Duration::from_secs(5), "the program started", runs_sleep).await;
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its groups");
    for g in &groups {
        let suffix =
            format!("{}/inside", g.parent().and_then(|p| p.file_name()).expect("runtime group").to_string_lossy());
        assert!(own.lines().any(|l| l.ends_with(&suffix)), "{suffix} not in {own}");
    }
    rt.remove(&h).await.expect("remove");
    assert!(groups.iter().all(|g| !g.exists()), "no group left: {groups:?}");
    let base = groups[0].parent().expect("runtime group");
    assert!(!base.exists(), "the runtime's own group goes with its last instance: {}", base.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limits_and_missing_programs_are_refused_before_anything_runs() {
    let Some(rt) = runtime() else { return };
    let e = rt.start(&spec("tiny", "true", &[("memory", "100Ki")])).await.expect_err("refused");
    assert!(e.to_string().contains("container.resources.limits.memory"), "{e}");
    let e = rt.start(&spec("slow", "true", &[("cpu", "1m")])).await.expect_err("refused");
    assert!(e.to_string().contains("container.resources.limits.cpu"), "{e}");
    let mut missing = spec("missing", "", &[("memory", "64Mi")]);
    missing.container.command = vec!["no-such-program-here".into()];
    let e = rt.start(&missing).await.expect_err("refused");
    assert!(e.to_string().contains("container.command[0]"), "{e}");
    assert!(rt.list().await.expect("list").is_empty(), "nothing was left behind");
    for id in ["tiny", "slow", "missing"] {
        assert!(rt.limit_support().groups_of(id).iter().all(|g| !g.exists()), "no group left for {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reaches_a_process_that_left_the_process_group() {
    let Some(rt) = runtime() else { return };
    // A child in a session (and process group) of its own, writing its pid for the test; the
    // leader waits. Killing the process group alone would leave the child running.
    let h = rt
        .start(&spec("escape", "setsid sh -c 'echo $$ > escaped.pid; exec sleep 300' & wait", &[("memory", "64Mi")]))
        .await
        .expect("start");
    let _kill = KillOnDrop(pid_of(&h));
    let groups = rt.limit_support().groups_of("escape");
    let escaped = wait_until("the escaped sleep runs in the instance's group", Duration::from_secs(5), async || {
        let members: Vec<String> = groups
            .iter()
            .filter_map(|g| std::fs::read_to_string(g.join("cgroup.procs")).ok())
            .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
            .collect();
        members
            .iter()
            .filter_map(|p| p.trim().parse::<i32>().ok())
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep"))
    })
    .await;
    let _kill_escaped = KillOnDrop(escaped as u32);
    let leader_group = pid_of(&h) as i32;
    let its_group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(escaped))).expect("pgid").as_raw();
    assert_ne!(its_group, leader_group, "it left the instance's process group");
    rt.stop(&h, Duration::from_secs(5)).await.expect("stop");
    assert!(
        std::fs::read_to_string(format!("/proc/{escaped}/stat")).map_or(true, |s| s.contains(") Z")),
        "the escaped process is gone after stop"
    );
    rt.remove(&h).await.expect("remove");
    assert!(groups.iter().all(|g| !g.exists()), "no group left: {groups:?}");
}
