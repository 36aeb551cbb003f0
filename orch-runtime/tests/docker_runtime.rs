//! What the Docker runtime does beyond the conformance suite, on the real engine: the API
//! version, labels, ports, mounts, limits and OOM kills, exec, typed errors (missing image,
//! port in use, no daemon), and removal of orphaned containers. Skipped with a note where no
//! engine answers (see `docker_support`).

#![cfg(feature = "docker")]

mod docker_support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use docker_support::{Scope, skip};
use futures::StreamExt;
use orch_core::kinds::{Container, ContainerPort, VolumeMount};
use orch_core::runtime::{HostVolume, InstanceSpec, InstanceState, LogOptions, Runtime, RuntimeError};
use orch_runtime::{DockerConfig, DockerError, DockerRuntime};

/// Longest a test waits for what the engine must do (a port answering, a file appearing, orphans
/// going): long enough that a loaded machine never reaches it, so only a wrong behaviour does.
const PATIENCE: Duration = Duration::from_secs(60);

fn sh(scope: &Scope, id: &str, script: &str) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        container: Container {
            name: "main".into(),
            image: Some(scope.image.clone()),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            ..Default::default()
        },
        volumes: Vec::new(),
        labels: [("orch.dev/workload", "web")].into(),
    }
}

fn container_of(h: &orch_core::Handle) -> String {
    h.data["container"].as_str().unwrap().to_string()
}

async fn inspect(h: &orch_core::Handle) -> bollard::models::ContainerInspectResponse {
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    docker.inspect_container(&container_of(h), None).await.unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

async fn stdout(rt: &DockerRuntime, h: &orch_core::Handle) -> Vec<String> {
    rt.logs(h, LogOptions::default()).await.unwrap().map(|l| l.line).collect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_version_is_negotiated_and_labels_identify_the_instance() {
    if skip("the_api_version_is_negotiated_and_labels_identify_the_instance") {
        return;
    }
    let scope = Scope::new("labels");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let daemon = bollard::Docker::connect_with_defaults().unwrap().version().await.unwrap();
    let agreed = rt.api_version().await.unwrap();
    let ours = bollard::API_DEFAULT_VERSION;
    let newest = format!("{}.{}", ours.major_version, ours.minor_version);
    let theirs = daemon.api_version.unwrap();
    // Never pinned: the daemon's version when it is older than the client's, else the client's.
    let parse = |v: &str| -> (u32, u32) {
        let (a, b) = v.split_once('.').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    };
    assert_eq!(agreed, if parse(&theirs) < parse(&newest) { theirs } else { newest });

    let h = rt.start(&sh(&scope, "default.web.main.abc-0", "sleep 60")).await.unwrap();
    let found = inspect(&h).await;
    let labels = found.config.unwrap().labels.unwrap();
    assert_eq!(labels["orch.dev/node"], scope.node);
    assert_eq!(labels["orch.dev/instance"], "default.web.main.abc-0");
    assert_eq!(labels["orch.dev/handle-version"], h.version.to_string());
    assert_eq!(labels["orch.dev/workload"], "web");
    assert_eq!(found.name.unwrap(), format!("/orch_{}_default.web.main.abc-0", scope.node));
    // Another node's runtime on the same daemon neither lists nor finds it.
    let other = DockerRuntime::new(DockerConfig::new(format!("{}-other", scope.node))).unwrap();
    assert!(other.list().await.unwrap().is_empty());
    assert!(matches!(other.status(&h).await.unwrap_err(), RuntimeError::NotFound(_)));
    assert_eq!(other.recover(&h).await.unwrap(), InstanceState::Lost);
    rt.remove(&h).await.unwrap();
    rt.remove(&h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_typed_error_that_names_it() {
    if skip("a_missing_image_is_a_typed_error_that_names_it") {
        return;
    }
    let scope = Scope::new("missing-image");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let mut spec = sh(&scope, "ghost", "true");
    spec.container.image = Some("orch-no-such-image:never".into());
    let e = rt.start(&spec).await.unwrap_err();
    assert!(
        matches!(DockerError::of(&e), Some(DockerError::ImageNotFound { image }) if image == "orch-no-such-image:never"),
        "{e}"
    );
    assert!(e.to_string().contains("orch-no-such-image:never") && e.to_string().contains("docker load"), "{e}");
    assert!(rt.list().await.unwrap().is_empty(), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_is_a_typed_error_that_says_what_to_do() {
    // Needs no engine: it points at one that is not there.
    let dir = std::env::temp_dir().join(format!("orch-no-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.sock");
    let mut config = DockerConfig::new("nowhere");
    config.host = Some(format!("unix://{}", missing.display()));
    let e = DockerRuntime::connect(config.clone()).await.unwrap_err();
    assert!(matches!(DockerError::of(&e), Some(DockerError::DaemonNotRunning { .. })), "{e}");
    assert!(e.to_string().contains("start it"), "{e}");
    // A socket file nobody listens on (a daemon that died).
    let dead = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    config.host = Some(format!("unix://{}", dead.display()));
    let rt = DockerRuntime::new(config).unwrap();
    let e = rt.list().await.unwrap_err();
    assert!(matches!(DockerError::of(&e), Some(DockerError::DaemonNotRunning { .. })), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ports_are_published_and_a_taken_one_is_a_typed_error() {
    if skip("host_ports_are_published_and_a_taken_one_is_a_typed_error") {
        return;
    }
    let scope = Scope::new("ports");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let port = free_port();
    let mut web = sh(&scope, "web", "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www");
    web.container.ports =
        vec![ContainerPort { container_port: 8080, host_port: Some(u32::from(port)), ..Default::default() }];
    let h = rt.start(&web).await.unwrap();
    let get = |addr: std::net::SocketAddr| {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.contains("hello").then_some(())
    };
    let deadline = Instant::now() + PATIENCE;
    while get(([127, 0, 0, 1], port).into()).is_none() {
        assert!(Instant::now() < deadline, "the published port never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Probes reach the container at its own address too.
    let addr = rt.address(&h);
    assert!(!addr.is_loopback(), "a bridge address: {addr}");
    assert!(get((addr, 8080).into()).is_some(), "reachable at {addr}:8080");

    // The same host port again: taken.
    let mut second = web.clone();
    second.id = "web-2".into();
    let e = rt.start(&second).await.unwrap_err();
    assert!(
        matches!(DockerError::of(&e), Some(DockerError::PortInUse { port: p, .. }) if *p == u32::from(port)),
        "{e}"
    );
    assert!(e.to_string().contains(&port.to_string()), "{e}");
    // Held by a host process, not a container: also taken.
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let held_port = held.local_addr().unwrap().port();
    let mut third = sh(&scope, "web-3", "sleep 60");
    third.container.ports =
        vec![ContainerPort { container_port: 80, host_port: Some(u32::from(held_port)), ..Default::default() }];
    let e = rt.start(&third).await.unwrap_err();
    assert!(matches!(DockerError::of(&e), Some(DockerError::PortInUse { .. })), "{e}");
    let ids: Vec<String> = rt.list().await.unwrap().into_iter().map(|h| h.id).collect();
    assert_eq!(ids, ["web"], "failed starts leave no container");
    rt.remove(&h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_and_per_instance_volumes_are_mounted() {
    if skip("host_paths_and_per_instance_volumes_are_mounted") {
        return;
    }
    let scope = Scope::new("mounts");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let host = std::env::temp_dir().join(format!("orch-docker-mount-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&host);
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("in.txt"), "from the host\n").unwrap();
    let mut spec = sh(
        &scope,
        "mounter",
        "cat /host/in.txt; echo from-container > /host/out.txt; echo kept > /scratch/f; cat /scratch/f; \
         touch /ro/x 2>/dev/null && echo writable || echo read-only",
    );
    spec.volumes = vec![
        HostVolume { name: "host".into(), host_path: host.clone() },
        HostVolume { name: "ro".into(), host_path: host.clone() },
    ];
    spec.container.volume_mounts = vec![
        VolumeMount { name: "host".into(), mount_path: "/host".into(), read_only: false },
        VolumeMount { name: "scratch".into(), mount_path: "/scratch".into(), read_only: false },
        VolumeMount { name: "ro".into(), mount_path: "/ro".into(), read_only: true },
    ];
    let h = rt.start(&spec).await.unwrap();
    assert!(rt.wait(&h).await.unwrap().success());
    assert_eq!(stdout(&rt, &h).await, ["from the host", "kept", "read-only"]);
    assert_eq!(std::fs::read_to_string(host.join("out.txt")).unwrap(), "from-container\n");
    // The per-instance volume carries our labels and goes with the instance.
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![format!("orch.dev/node={}", scope.node), "orch.dev/instance=mounter".to_string()],
    )]);
    let list = |f: std::collections::HashMap<String, Vec<String>>| {
        let docker = docker.clone();
        async move {
            let o = bollard::query_parameters::ListVolumesOptionsBuilder::default().filters(&f).build();
            docker.list_volumes(Some(o)).await.unwrap().volumes.unwrap_or_default()
        }
    };
    let volumes = list(filters.clone()).await;
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    assert_eq!(volumes[0].labels["orch.dev/volume"], "scratch");
    rt.remove(&h).await.unwrap();
    assert!(list(filters).await.is_empty(), "removed with the instance");

    // A host path that does not exist is refused, naming it.
    let mut bad = sh(&scope, "bad-mount", "true");
    bad.volumes = vec![HostVolume { name: "x".into(), host_path: "/no/such/orch/dir".into() }];
    bad.container.volume_mounts = vec![VolumeMount { name: "x".into(), mount_path: "/x".into(), read_only: false }];
    let e = rt.start(&bad).await.unwrap_err();
    assert!(matches!(&e, RuntimeError::InvalidSpec { field, .. } if field == "volumes[0].hostPath"), "{e}");
    let _ = std::fs::remove_dir_all(&host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_and_an_oom_kill_is_reported() {
    if skip("limits_are_enforced_and_an_oom_kill_is_reported") {
        return;
    }
    let scope = Scope::new("limits");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    // dd allocates its 64 MiB block at once: far over a 16 MiB limit.
    let mut hog = sh(&scope, "hog", "dd if=/dev/zero of=/dev/null bs=64M count=4");
    hog.container.resources.limits.insert("memory".into(), "16Mi".parse().unwrap());
    hog.container.resources.limits.insert("cpu".into(), "250m".parse().unwrap());
    let h = rt.start(&hog).await.unwrap();
    let host = inspect(&h).await.host_config.unwrap();
    assert_eq!((host.memory, host.nano_cpus), (Some(16 << 20), Some(250_000_000)));
    let exit = rt.wait(&h).await.unwrap();
    assert!(exit.oom_killed && !exit.success(), "{exit:?}");
    assert!(matches!(rt.status(&h).await.unwrap(), InstanceState::Exited(e) if e.oom_killed));
    // The same within its limit runs to the end.
    let mut fine = sh(&scope, "fine", "dd if=/dev/zero of=/dev/null bs=1M count=4");
    fine.container.resources.limits.insert("memory".into(), "16Mi".parse().unwrap());
    let h = rt.start(&fine).await.unwrap();
    let exit = rt.wait(&h).await.unwrap();
    assert!(exit.success() && !exit.oom_killed, "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_inside_the_container() {
    if skip("exec_runs_inside_the_container") {
        return;
    }
    let scope = Scope::new("exec");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let h = rt.start(&sh(&scope, "probed", "touch /tmp/alive; sleep 60")).await.unwrap();
    let cmd = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
    let deadline = Instant::now() + PATIENCE;
    while rt.exec(&h, &cmd("test -f /tmp/alive"), Duration::from_secs(5)).await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "the file never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rt.exec(&h, &cmd("exit 4"), Duration::from_secs(5)).await.unwrap(), 4);
    assert_eq!(rt.exec(&h, &cmd("sleep 30"), Duration::from_millis(300)).await.unwrap(), -1, "timed out");
    // With its output: both streams and the exit code.
    let out = rt
        .exec_output(&h, &cmd("cat /tmp/alive; echo out; echo err >&2; exit 5"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((out.exit_code, out.stdout.as_slice(), out.stderr.as_slice()), (5, &b"out\n"[..], &b"err\n"[..]));
    let out = rt.exec_output(&h, &cmd("sleep 30"), Duration::from_millis(300)).await.unwrap();
    assert!(out.timed_out && out.exit_code == -1, "{out:?}");
    rt.stop(&h, Duration::from_secs(5)).await.unwrap();
}

/// Reads `r` into `seen` until `pattern` has appeared in all that was read so far.
async fn read_until(r: &mut (impl tokio::io::AsyncRead + Unpin), seen: &mut Vec<u8>, pattern: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(seen).contains(pattern) {
        let n = tokio::time::timeout(PATIENCE, r.read(&mut buf)).await.expect("output in time").unwrap();
        assert!(n > 0, "the stream ended before {pattern:?}: {:?}", String::from_utf8_lossy(seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_attaches_input_output_and_a_terminal() {
    use orch_core::runtime::{ExecStreamOptions, TerminalSize};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if skip("exec_stream_attaches_input_output_and_a_terminal") {
        return;
    }
    let scope = Scope::new("exec-stream");
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let h = rt.start(&sh(&scope, "attached", "sleep 60")).await.unwrap();
    let cmd = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
    // Pipes: each line comes back while the command waits for the next; stderr apart.
    let options = ExecStreamOptions { stdin: true, tty: None };
    let mut s =
        rt.exec_stream(&h, &cmd("while read l; do echo got-$l; echo err-$l >&2; done; exit 3"), options).await.unwrap();
    let (mut stdin, mut stderr) = (s.stdin.take().unwrap(), s.stderr.take().unwrap());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    stdin.write_all(b"a\n").await.unwrap();
    read_until(&mut s.stdout, &mut out, "got-a\n").await;
    read_until(&mut stderr, &mut err, "err-a\n").await;
    assert_eq!((out.as_slice(), err.as_slice()), (&b"got-a\n"[..], &b"err-a\n"[..]));
    stdin.shutdown().await.unwrap();
    let mut rest = String::new();
    s.stdout.read_to_string(&mut rest).await.unwrap();
    assert_eq!((rest.as_str(), s.exit.await.unwrap()), ("", 3));

    // The Engine's terminal, sized, resized, and ended by the end-of-file character.
    let options = ExecStreamOptions { stdin: true, tty: Some(TerminalSize { rows: 33, cols: 101 }) };
    let script = "test -t 0 && test -t 1 && echo on-a-tty; read l; stty size; cat; echo after-eof; exit 5";
    let mut s = rt.exec_stream(&h, &cmd(script), options).await.unwrap();
    assert!(s.stderr.is_none(), "one terminal, one stream");
    let mut stdin = s.stdin.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut s.stdout, &mut seen, "on-a-tty\r\n").await;
    (s.resize.as_mut().unwrap())(TerminalSize { rows: 40, cols: 120 }).await.unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    read_until(&mut s.stdout, &mut seen, "40 120\r\n").await;
    stdin.write_all(b"typed\n").await.unwrap();
    read_until(&mut s.stdout, &mut seen, "typed\r\ntyped\r\n").await;
    stdin.shutdown().await.unwrap();
    let mut rest = String::new();
    s.stdout.read_to_string(&mut rest).await.unwrap();
    assert!(rest.contains("after-eof"), "{rest:?}");
    assert_eq!(s.exit.await.unwrap(), 5);
    rt.stop(&h, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_containers_are_removed_after_the_grace_period() {
    if skip("unclaimed_containers_are_removed_after_the_grace_period") {
        return;
    }
    let scope = Scope::new("orphans");
    let before = DockerRuntime::connect(scope.config()).await.unwrap();
    let kept = before.start(&sh(&scope, "kept", "sleep 60")).await.unwrap();
    let stray = before.start(&sh(&scope, "stray", "sleep 60")).await.unwrap();
    let done = before.start(&sh(&scope, "done", "true")).await.unwrap();
    before.wait(&done).await.unwrap();
    drop(before);
    // A restarted agent's runtime: it adopts one instance; the other two are orphans.
    let mut config = scope.config();
    config.orphan_grace = Some(Duration::from_secs(1));
    let after = DockerRuntime::connect(config).await.unwrap();
    assert!(matches!(after.recover(&kept).await.unwrap(), InstanceState::Running { .. }));
    assert_eq!(after.remove_orphans().await.unwrap(), Vec::<String>::new(), "not before the grace period");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ids: Vec<String> = after.list().await.unwrap().into_iter().map(|h| h.id).collect();
        if ids == ["kept"] {
            break;
        }
        assert!(Instant::now() < deadline, "orphans not removed: {ids:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(after.recover(&stray).await.unwrap(), InstanceState::Lost);
    assert!(
        matches!(after.status(&kept).await.unwrap(), InstanceState::Running { .. }),
        "the adopted one is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_fails_clearly() {
    if skip("a_missing_program_fails_clearly") {
        return;
    }
    let scope = Scope::new("missing-program");
    // Under the Engine's init (the default) the instance runs and fails as a shell would.
    let rt = DockerRuntime::connect(scope.config()).await.unwrap();
    let mut spec = sh(&scope, "ghost", "");
    spec.container.command = vec!["/no/such/program".into()];
    let h = rt.start(&spec).await.unwrap();
    assert_eq!(rt.wait(&h).await.unwrap().code, Some(127));
    // Without it the Engine refuses the start: a spec error naming the command.
    let mut config = scope.config();
    config.init = false;
    let bare = DockerRuntime::connect(config).await.unwrap();
    spec.id = "ghost-2".into();
    let e = bare.start(&spec).await.unwrap_err();
    assert!(matches!(&e, RuntimeError::InvalidSpec { field, .. } if field == "container.command[0]"), "{e}");
    assert!(e.to_string().contains("/no/such/program"), "{e}");
    let ids: Vec<String> = bare.list().await.unwrap().into_iter().map(|h| h.id).collect();
    assert_eq!(ids, ["ghost"], "the refused start left nothing behind");
}
