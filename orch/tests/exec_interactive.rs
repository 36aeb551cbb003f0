//! `orch exec -i`/`-t`, the real binary against a real `orch server` (https, users with client
//! certificates) and a real agent (process runtime): standard input streamed to the command and
//! its end closing the command's, output as it is written, the exit code and standard error
//! passed through, a terminal for `-t`, and the right to update the workload required.

#![cfg(feature = "cli")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, free_port, orch};

struct Cluster {
    dir: PathBuf,
    _server: Proc,
    _agent: Proc,
    /// The connection flags of a user of `system:admins`.
    admin: Vec<String>,
    /// Those of a user of `system:readers`.
    reader: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `orch` with nothing from the caller's environment.
fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orch"));
    c.args(args)
        .env("ORCH_CONFIG", "/nonexistent/config.yaml")
        .env_remove("ORCH_CONTEXT")
        .env_remove("ORCH_SERVER")
        .env_remove("ORCH_TOKEN")
        .env_remove("RUST_LOG");
    c
}

fn ok(args: &[&str]) -> String {
    let out = command(args).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "orch {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A server, an agent with one workload `w` running `sleep`, an admin and a reader.
fn cluster(tag: &str) -> Cluster {
    let dir = std::env::temp_dir().join(format!("orch-exec-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("server");
    let data_s = data.to_str().unwrap().to_string();
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let server =
        orch(&["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", &data_s], &dir.join("server.log"));
    let ca = data.join("ca.crt");
    wait_for("the server creates its CA", || ca.exists().then_some(()));
    let ca_s = ca.to_str().unwrap().to_string();
    let user = |name: &str, group: &str| {
        let out = dir.join(name);
        ok(&[
            "certs",
            "issue",
            "--data-dir",
            &data_s,
            "--user",
            name,
            "--group",
            group,
            "--out",
            out.to_str().unwrap(),
        ]);
        let cert = out.join(format!("{name}.crt")).to_str().unwrap().to_string();
        vec!["--server".to_string(), url.clone(), "--ca".to_string(), ca_s.clone(), "--cert".to_string(), cert]
    };
    let admin = user("admin", "system:admins");
    let reader = user("reader", "system:readers");
    let join = ok(&["token", "create", "--data-dir", &data_s, "--join", "--ttl", "10m"]).trim().to_string();
    let node_dir = dir.join("node-1");
    let agent = orch(
        &[
            "agent",
            "--server",
            &url,
            "--ca",
            &ca_s,
            "--join-token",
            &join,
            "--name",
            "node-1",
            "--data-dir",
            node_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &dir.join("node-1.log"),
    );
    let manifest = dir.join("w.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: orch.dev/v1\nkind: Workload\nmetadata:\n  name: w\nspec:\n  containers:\n  - name: main\n    command: [sleep, '3600']\n",
    )
    .unwrap();
    let cluster = Cluster { dir, _server: server, _agent: agent, admin, reader };
    let as_admin = |args: &[&str]| -> Vec<String> {
        cluster.admin.iter().cloned().chain(args.iter().map(|a| a.to_string())).collect()
    };
    wait_for("the workload is applied", || {
        let args = as_admin(&["apply", "-f", manifest.to_str().unwrap()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        command(&args).stdin(Stdio::null()).output().unwrap().status.success().then_some(())
    });
    wait_for("the workload runs", || {
        let args = as_admin(&["get", "wl", "w", "-o", "json"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = command(&args).stdin(Stdio::null()).output().unwrap();
        let w: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (w["status"]["phase"] == "Running").then_some(())
    });
    cluster
}

/// Runs `orch` as `who` with `args`, `input` on its standard input (then its end).
fn exec(who: &[String], args: &[&str], input: &[u8]) -> Output {
    let mut child = spawn(who, args);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn spawn(who: &[String], args: &[&str]) -> Child {
    let all: Vec<&str> = who.iter().map(String::as_str).chain(args.iter().copied()).collect();
    command(&all).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exec_i_and_t_stream_a_session_with_the_command() {
    let c = cluster("session");

    // -i: standard input reaches the command, and its end is the command's end of input.
    let out = exec(&c.admin, &["exec", "-i", "w", "--", "cat"], b"a\nb\n");
    assert_eq!((out.status.code(), text(&out.stdout), text(&out.stderr)), (Some(0), "a\nb\n".into(), "".into()));

    // The exit code is orch's, and standard error stays standard error.
    let script = "cat >/dev/null; echo out; echo err >&2; exit 7";
    let out = exec(&c.admin, &["exec", "-i", "workload/w", "-c", "main", "--", "sh", "-c", script], b"ignored");
    assert_eq!((out.status.code(), text(&out.stdout), text(&out.stderr)), (Some(7), "out\n".into(), "err\n".into()));

    // Output comes as it is written: the first line arrives while the command still waits for
    // more input, which only this test can give it.
    let mut child = spawn(&c.admin, &["exec", "-i", "w", "--", "sh", "-c", "echo first; read x; echo second-$x"]);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "first\n");
    assert!(child.try_wait().unwrap().is_none(), "the command is still running");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "second-go\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // -t with no terminal on orch's side: a warning, and the command gets a terminal all the
    // same (of the default size; a terminal ends its lines with CR LF).
    let script = "test -t 0 && test -t 1 && test -t 2 && echo on-a-tty; stty size";
    let out = exec(&c.admin, &["exec", "-i", "-t", "w", "--", "sh", "-c", script], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("on-a-tty\r\n24 80\r\n"), "{:?}", text(&out.stdout));
    assert!(text(&out.stderr).contains("warning: -t: standard input is not a terminal"), "{}", text(&out.stderr));
    // What is piped in is typed on that terminal; its end is the end-of-file character.
    let out = exec(&c.admin, &["exec", "-i", "-t", "w", "--", "sh", "-c", "cat; echo after-eof; exit 3"], b"typed\n");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("typed\r\n") && text(&out.stdout).contains("after-eof\r\n"), "{:?}", out);
    // -t alone: a terminal and no input.
    let out = exec(&c.admin, &["exec", "-t", "w", "--", "sh", "-c", "test -t 1 && echo on-a-tty"], b"");
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "on-a-tty\r\n".into()));

    // On a terminal of orch's own: raw for the session (what is typed goes to the command's
    // terminal as it is) and restored after it, its size given, resizes (SIGWINCH) followed.
    on_a_terminal(&c.admin);

    // Refusals come back as messages, before anything runs: a reader may not run commands, a
    // program must exist, a container must be the workload's.
    let out = exec(&c.reader, &["exec", "-i", "w", "--", "true"], b"");
    let e = text(&out.stderr);
    assert!(out.status.code() == Some(1) && e.contains("needs the right to update it") && e.contains("403"), "{e}");
    let out = exec(&c.admin, &["exec", "-i", "w", "--", "/no/such/program"], b"");
    let e = text(&out.stderr);
    assert!(out.status.code() == Some(1) && e.contains("cannot run \"/no/such/program\" in main"), "{e}");
    let out = exec(&c.admin, &["exec", "-i", "w", "-c", "other", "--", "true"], b"");
    let e = text(&out.stderr);
    assert!(out.status.code() == Some(1) && e.contains("has no container \"other\""), "{e}");

    // Without -i/-t, exec is what it was: output once the command ends, no input.
    let all: Vec<&str> =
        c.admin.iter().map(String::as_str).chain(["exec", "w", "--", "sh", "-c", "cat; echo done"]).collect();
    let out = command(&all).stdin(Stdio::piped()).output().unwrap();
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "done\n".into()));
}

/// `orch exec -i -t` with a pseudo-terminal of the test's as orch's standard streams.
fn on_a_terminal(who: &[String]) {
    use nix::sys::termios::{LocalFlags, tcgetattr};
    let size = nix::pty::Winsize { ws_row: 30, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(&size, None).unwrap();
    let cooked = tcgetattr(&pty.slave).unwrap();
    assert!(cooked.local_flags.contains(LocalFlags::ICANON));
    // The command waits for the resize (it polls its terminal's size), then for a second line.
    let script = "stty size; read x; while [ \"$(stty size)\" != '40 120' ]; do sleep 0.1; done; \
                  echo resized; read y; echo got-$x-$y";
    let all: Vec<&str> =
        who.iter().map(String::as_str).chain(["exec", "-i", "-t", "w", "--", "sh", "-c", script]).collect();
    let mut child = command(&all)
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()))
        .spawn()
        .unwrap();
    // The master is read on a thread: a read that never returns must not hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut until = |pattern: &str| {
        while !text(&seen).contains(pattern) {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(bytes) => seen.extend(bytes),
                Err(_) => panic!("no {pattern:?} on the terminal: {:?}", text(&seen)),
            }
        }
    };
    until("30 100\r\n");
    let raw = tcgetattr(&pty.slave).unwrap();
    assert!(!raw.local_flags.contains(LocalFlags::ICANON) && !raw.local_flags.contains(LocalFlags::ECHO), "raw");
    let mut keys = std::fs::File::from(pty.master.try_clone().unwrap());
    // Enter is a carriage return in raw mode; the command's terminal makes it a line's end.
    keys.write_all(b"a\r").unwrap();
    let resized = rustix::termios::Winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(&pty.master, resized).unwrap();
    // The terminal is not orch's controlling one here, so the signal comes from the test.
    let orch_pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(orch_pid, nix::sys::signal::Signal::SIGWINCH).unwrap();
    until("resized\r\n");
    keys.write_all(b"b\r").unwrap();
    until("got-a-b\r\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let restored = tcgetattr(&pty.slave).unwrap();
    assert_eq!(restored.local_flags, cooked.local_flags, "the terminal is restored");
}
