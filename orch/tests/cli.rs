//! The `orch` command line, the real binary against a real `orch server` with two real agents
//! (process runtime): every command, its output (insta snapshots of tables and error messages,
//! ages and generated names normalised) and its exit code. One cluster serves the whole file;
//! the cluster test runs its steps in order, the other tests need no server.

#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use orch::manifest::Manifests;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli")
}

/// Runs `orch` with a config file of its own and nothing from the caller's environment.
struct Cli {
    config: PathBuf,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_orch"));
        c.args(args)
            .env("ORCH_CONFIG", &self.config)
            .env_remove("ORCH_CONTEXT")
            .env_remove("ORCH_SERVER")
            .env_remove("ORCH_TOKEN")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        let out: Output = self.cmd(args).output().expect("run orch");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed; answers its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "orch {args:?} failed:\n{}{}", r.stdout, r.stderr);
        r.stdout
    }

    /// Runs a command that must fail with `code`; answers its standard error.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let r = self.run(args);
        assert_eq!(r.code, code, "orch {args:?}: exit code\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        r.stderr
    }

    /// Retries `args` until `check` holds on its output.
    fn until(&self, args: &[&str], what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.run(args);
            if r.code == 0 && check(&r.stdout) {
                return r.stdout;
            }
            assert!(Instant::now() < deadline, "{what}: orch {args:?} still says:\n{}{}", r.stdout, r.stderr);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Generated names, ages and times replaced by placeholders, and the table re-aligned (cells
/// are separated by runs of two or more spaces).
fn normalise(text: &str) -> String {
    let hash = regex_lite(text);
    let rows: Vec<Vec<String>> = hash
        .lines()
        .map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect())
        .collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    // A line of one cell (a title) does not set the widths.
    for r in rows.iter().filter(|r| r.len() > 1) {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(&format!("{c:<w$}   ", w = widths[i]));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Replaces what differs between runs, word by word (no regex crate needed).
fn regex_lite(text: &str) -> String {
    let word = |w: &str| -> String {
        let trimmed = w.trim_end_matches(',');
        let tail = &w[trimmed.len()..];
        // Ages: 5s, 12m, 3h, 2d.
        if trimmed.len() >= 2
            && trimmed[..trimmed.len() - 1].chars().all(|c| c.is_ascii_digit())
            && trimmed.ends_with(['s', 'm', 'h', 'd'])
        {
            return format!("<age>{tail}");
        }
        // Generated names: <name>-<10 hash chars>[-<5 chars>].
        let parts: Vec<&str> = trimmed.split('-').collect();
        if let Some(i) =
            parts.iter().position(|p| p.len() == 10 && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
            && i > 0
        {
            {
                let mut s = parts[..i].join("-");
                s.push_str("-<hash>");
                if parts.len() > i + 1 {
                    s.push_str("-<id>");
                }
                return format!("{s}{tail}");
            }
        }
        // Timestamps.
        if trimmed.len() >= 20 && trimmed.as_bytes()[4] == b'-' && trimmed.contains('T') && trimmed.ends_with('Z') {
            return format!("<time>{tail}");
        }
        w.to_string()
    };
    text.lines()
        .map(|l| {
            let mut out = String::new();
            let mut cur = String::new();
            for ch in l.chars() {
                if ch == ' ' {
                    if !cur.is_empty() {
                        out.push_str(&word(&cur));
                        cur.clear();
                    }
                    out.push(' ');
                } else {
                    cur.push(ch);
                }
            }
            if !cur.is_empty() {
                out.push_str(&word(&cur));
            }
            out + "\n"
        })
        .collect()
}

fn token(orch: &Cli, data: &Path, user: &str, group: &str) -> String {
    orch.ok(&["token", "create", "--data-dir", data.to_str().unwrap(), "--user", user, "--group", group])
        .trim()
        .to_string()
}

struct Cluster {
    _procs: Vec<Proc>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self._procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_cluster(orch: &Cli, dir: &Path) -> (Cluster, String, String, String) {
    let data = dir.join("server");
    let admin = token(orch, &data, "alice", "system:admins");
    let reader = token(orch, &data, "bob", "system:readers");
    let nodes: Vec<String> =
        ["node-1", "node-2"].iter().map(|n| token(orch, &data, &format!("system:node:{n}"), "system:nodes")).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let mut procs = vec![Proc(
        orch.cmd(&[
            "server",
            "--insecure-http",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(log("server.log"))
        .spawn()
        .unwrap(),
    )];
    for (node, t) in ["node-1", "node-2"].iter().zip(&nodes) {
        let node_dir = dir.join(node);
        procs.push(Proc(
            orch.cmd(&[
                "agent",
                "--server",
                &url,
                "--join-token",
                t,
                "--name",
                node,
                "--drain",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&node_dir)
            .stdout(Stdio::null())
            .stderr(log(&format!("{node}.log")))
            .spawn()
            .unwrap(),
        ));
    }
    (Cluster { _procs: procs, dir: dir.to_path_buf() }, url, admin, reader)
}

#[test]
fn every_command_against_a_real_cluster() {
    let dir = std::env::temp_dir().join(format!("orch-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let orch = Cli { config: dir.join("config.yaml") };
    let (_cluster, url, admin, reader_token) = start_cluster(&orch, &dir);
    let f = |name: &str| files().join(name).to_str().unwrap().to_string();

    // A context with the admin's token; the CLI finds the server through it.
    let out =
        orch.ok(&["config", "set-context", "test", "--server", &url, "--token", &admin, "--namespace", "default"]);
    assert!(out.starts_with("context \"test\" added"), "{out}");
    let nodes = orch.until(&["get", "nodes"], "both nodes ready", |o| o.matches(" Ready ").count() == 2);
    insta::assert_snapshot!("get_nodes", normalise(&nodes));
    // With a forged token the server refuses, and says so.
    let e = orch.fails(&["--token", "orch-forged", "get", "nodes"], 1);
    assert!(e.contains("401"), "{e}");

    // Apply: created, then unchanged; dry runs change nothing.
    insta::assert_snapshot!("apply_created", orch.ok(&["apply", "-f", &f("web.yaml")]));
    assert_eq!(orch.ok(&["apply", "-f", &f("web.yaml")]), "deployment/web unchanged\n");
    let changed = std::fs::read_to_string(f("web.yaml")).unwrap().replace("memory: 32Mi", "memory: 48Mi");
    let v2 = dir.join("web-v2.yaml");
    std::fs::write(&v2, &changed).unwrap();
    let v2 = v2.to_str().unwrap();
    assert_eq!(orch.ok(&["apply", "-f", v2, "--dry-run=server"]), "deployment/web configured (server dry run)\n");
    assert_eq!(orch.ok(&["apply", "-f", v2, "--dry-run"]), "deployment/web configured (dry run)\n");

    // rollout status follows the first rollout to its end; in a pipe, one line per change.
    let status = orch.ok(&["rollout", "status", "deployment/web", "--timeout", "60s"]);
    assert!(status.ends_with("deployment \"web\" successfully rolled out\n"), "{status}");
    let table = orch.until(&["get", "deploy"], "three ready", |o| o.contains("3/3"));
    insta::assert_snapshot!("get_deployments", normalise(&table));
    let wl = orch.ok(&["get", "wl", "-l", "app=web", "-o", "wide"]);
    assert_eq!(wl.lines().count(), 4, "{wl}");
    insta::assert_snapshot!(
        "get_workloads_wide",
        normalise(&wl).lines().map(|l| l.replace("node-2", "node-1")).collect::<Vec<_>>().join("\n")
    );
    let on_1 = orch.ok(&["get", "wl", "--field-selector", "spec.nodeName=node-1", "-o", "name"]);
    let on_2 = orch.ok(&["get", "wl", "--field-selector", "spec.nodeName=node-2", "-o", "name"]);
    assert_eq!(on_1.lines().count() + on_2.lines().count(), 3, "{on_1}{on_2}");
    assert!(orch.ok(&["get", "deploy", "-A"]).starts_with("NAMESPACE   NAME"));

    // -o yaml reads back as a manifest of the same object; -o json is the API's shape.
    let yaml = orch.ok(&["get", "deploy", "web", "-o", "yaml"]);
    let back = Manifests::builtin().read_str("get.yaml", &yaml).unwrap();
    assert_eq!(back[0].object.metadata.name, "web");
    let json: serde_json::Value = serde_json::from_str(&orch.ok(&["get", "deployment/web", "-o", "json"])).unwrap();
    assert_eq!((json["apiVersion"].as_str(), json["kind"].as_str()), (Some("orch.dev/v1"), Some("Deployment")));
    assert_eq!(orch.ok(&["get", "deploy", "-o", "name"]), "deployment/web\n");

    // A service: its table shows the cluster address the endpoints controller gives it.
    assert_eq!(orch.ok(&["apply", "-f", &f("web-svc.yaml")]), "service/web created\n");
    let svc = orch.until(&["get", "svc"], "a cluster address", |o| o.contains("127.64."));
    let header: Vec<&str> = svc.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TYPE", "CLUSTER-ADDRESS", "PORT(S)", "ENDPOINTS", "AGE"]);
    assert!(
        svc.lines().nth(1).unwrap().split_whitespace().collect::<Vec<_>>()[..4]
            .join(" ")
            .starts_with("web ClusterInternal 127.64."),
        "{svc}"
    );
    let described = orch.ok(&["describe", "svc", "web"]);
    assert!(described.lines().any(|l| l.contains("clusterAddress:") && l.contains("127.64.")), "{described}");
    assert_eq!(orch.ok(&["delete", "svc", "web"]), "service/web deleted\n");

    // describe: identity, conditions, revisions, events.
    let described = orch.ok(&["describe", "deploy", "web"]);
    for part in ["Name:         web", "Conditions:", "Available", "Revisions:", "Events:"] {
        assert!(described.contains(part), "{part} in:\n{described}");
    }

    // diff: exit 1 and the change; 0 when nothing would change.
    let r = orch.run(&["diff", "-f", v2]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("-             memory: 32Mi\n+             memory: 48Mi"), "{}", r.stdout);
    assert_eq!(orch.ok(&["diff", "-f", &f("web.yaml")]), "");

    // A watch sees a scale as it happens.
    let mut watch = orch.cmd(&["get", "deploy", "web", "-w", "--no-headers"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    // The watch lists first: scale only once that line is out, or the list already shows the scale.
    let mut seen = vec![lines.next().unwrap().unwrap()];
    assert_eq!(orch.ok(&["scale", "deploy/web", "--replicas", "4"]), "deployment/web scaled to 4\n");
    for line in lines {
        let line = line.unwrap();
        let done = line.contains("4/4");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen.first().is_some_and(|l| l.starts_with("web ") && l.contains("3/3")), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains("/4 ")), "the watch printed the new replicas: {seen:?}");
    // Apply keeps a scale the files do not speak of... but this file names replicas: 3.
    assert_eq!(orch.ok(&["apply", "-f", &f("web.yaml")]), "deployment/web configured\n");
    orch.ok(&["rollout", "status", "deploy/web"]);

    // A new revision, its history, an undo.
    assert_eq!(orch.ok(&["apply", "-f", v2]), "deployment/web configured\n");
    let status = orch.ok(&["rollout", "status", "deploy", "web"]);
    assert!(
        status.contains("new replicas have been updated") && status.ends_with("successfully rolled out\n"),
        "{status}"
    );
    insta::assert_snapshot!("rollout_history", normalise(&orch.ok(&["rollout", "history", "deploy/web"])));
    assert_eq!(orch.ok(&["rollout", "undo", "deploy/web"]), "deployment/web rolled back to revision 1\n");
    orch.ok(&["rollout", "status", "deploy/web"]);
    insta::assert_snapshot!("rollout_history_after_undo", normalise(&orch.ok(&["rollout", "history", "deploy/web"])));
    assert_eq!(
        orch.ok(&["rollout", "undo", "deploy/web", "--to-revision", "2"]),
        "deployment/web rolled back to revision 2\n"
    );
    let e = orch.fails(&["rollout", "undo", "deploy/web", "--to-revision", "9"], 1);
    insta::assert_snapshot!("rollout_undo_missing_revision", e);
    orch.ok(&["rollout", "status", "deploy/web"]);

    // On a terminal (a pseudo-terminal from `script`), rollout status draws a progress bar
    // instead of printing lines.
    if Command::new("script").arg("--version").output().is_ok() {
        orch.ok(&["rollout", "restart", "deploy/web"]);
        let line = format!("{} rollout status deploy/web --timeout 60s", env!("CARGO_BIN_EXE_orch"));
        let out = Command::new("script")
            .args(["-qefc", &line, "/dev/null"])
            .env("ORCH_CONFIG", &orch.config)
            .env("TERM", "xterm")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let tty = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{tty}");
        assert!(tty.contains("successfully rolled out"), "{tty}");
        assert!(tty.contains("[") && tty.contains("/3"), "a bar with its count: {tty:?}");
        assert!(
            !tty.contains(
                "Waiting for deployment \"web\" rollout to finish: 0 out of 3 new replicas have been updated...\r\n"
            ),
            "no plain lines on a terminal: {tty:?}"
        );
        // Colours on a terminal, unless NO_COLOR is set.
        let describe = |no_colour: bool| {
            let line = format!("{} describe deploy web", env!("CARGO_BIN_EXE_orch"));
            let mut c = Command::new("script");
            c.args(["-qefc", &line, "/dev/null"]).env("ORCH_CONFIG", &orch.config).stdin(Stdio::null());
            if no_colour {
                c.env("NO_COLOR", "1");
            } else {
                c.env_remove("NO_COLOR");
            }
            String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
        };
        assert!(describe(false).contains("\x1b[1mName:"), "bold headings on a terminal");
        let plain = describe(true);
        assert!(plain.contains("Name:") && !plain.contains('\x1b'), "NO_COLOR: {plain:?}");
    } else {
        eprintln!("skipped the terminal check: `script` (util-linux) is not installed");
    }

    // Pause, restart (held while paused), resume.
    assert_eq!(orch.ok(&["rollout", "pause", "deploy/web"]), "deployment/web paused\n");
    let e = orch.fails(&["rollout", "status", "deploy/web"], 1);
    assert!(e.contains("is paused"), "{e}");
    assert_eq!(orch.ok(&["rollout", "restart", "deploy/web"]), "deployment/web restarted\n");
    assert_eq!(orch.ok(&["rollout", "resume", "deploy/web"]), "deployment/web resumed\n");
    orch.ok(&["rollout", "status", "deploy/web"]);
    let history = orch.ok(&["rollout", "history", "deploy/web"]);
    assert!(history.lines().any(|l| l.starts_with("6*")), "the restarts made revisions 5 and 6:\n{history}");

    // A rollout that cannot progress: rollout status fails (for CI), and describe says why
    // the new workload is pending.
    orch.ok(&["apply", "-f", &f("stuck.yaml")]);
    orch.ok(&["rollout", "status", "deploy/stuck", "--timeout", "60s"]);
    let stuck = std::fs::read_to_string(f("stuck.yaml")).unwrap().replace("cpu: 10m", "cpu: \"64\"");
    let stuck_v2 = dir.join("stuck-v2.yaml");
    std::fs::write(&stuck_v2, stuck).unwrap();
    orch.ok(&["apply", "-f", stuck_v2.to_str().unwrap()]);
    let started = Instant::now();
    let e = orch.fails(&["rollout", "status", "deploy/stuck", "--timeout", "60s"], 1);
    assert!(e.contains("deployment \"stuck\" exceeded its progress deadline"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(50), "it failed on the deadline, not the timeout");
    // One that rolls itself back: rollout status fails too, saying so.
    orch.ok(&["apply", "-f", &f("auto.yaml")]);
    orch.ok(&["rollout", "status", "deploy/auto", "--timeout", "60s"]);
    let auto = std::fs::read_to_string(f("auto.yaml")).unwrap().replace("cpu: 10m", "cpu: \"64\"");
    let auto_v2 = dir.join("auto-v2.yaml");
    std::fs::write(&auto_v2, auto).unwrap();
    orch.ok(&["apply", "-f", auto_v2.to_str().unwrap()]);
    let e = orch.fails(&["rollout", "status", "deploy/auto", "--timeout", "60s"], 1);
    assert!(e.contains("deployment \"auto\" rolled itself back (ProgressDeadlineExceeded)"), "{e}");
    orch.ok(&["delete", "deploy", "auto"]);
    let pending = orch.ok(&["get", "wl", "-l", "app=stuck", "--field-selector", "status.phase=Pending", "-o", "name"]);
    let pending = pending.lines().next().expect("a pending workload").trim_start_matches("workload/").to_string();
    let described = orch.ok(&["describe", "wl", &pending]);
    assert!(described.contains("Pending:") && described.contains("not scheduled"), "{described}");

    // A workload that keeps failing shows why in its STATUS column.
    assert_eq!(orch.ok(&["apply", "-f", &f("crash.yaml")]), "workload/crash created\n");
    let crash = orch.until(&["get", "wl", "crash"], "the crash loop shows", |o| o.contains("CrashLoopBackOff"));
    insta::assert_snapshot!("get_crash_looping_workload", normalise(&crash));
    assert_eq!(orch.ok(&["delete", "-f", &f("crash.yaml")]), "workload/crash deleted\n");

    // Logs, through the server from the node's agent: the current instance, the previous one
    // (kept by the agent when a changed spec replaced it), followed, and refused to a stranger.
    orch.ok(&["apply", "-f", &f("talk.yaml")]);
    let logs = orch.until(&["logs", "talk"], "the workload talks", |o| o.contains("hello"));
    assert_eq!(logs, "talk v1 says hello\nto stderr\n");
    assert_eq!(orch.ok(&["logs", "workload/talk", "--tail", "0"]), "", "the last 0 lines of each stream");
    let e = orch.fails(&["logs", "talk", "--previous"], 1);
    assert_eq!(
        e,
        "orch: container main of workload default/talk has no previous instance on node ".to_string()
            + e.trim_end().rsplit(' ').next().unwrap()
            + "\n"
    );
    let v2 = std::fs::read_to_string(f("talk.yaml")).unwrap().replace("talk v1", "talk v2");
    let talk_v2 = dir.join("talk-v2.yaml");
    std::fs::write(&talk_v2, v2).unwrap();
    orch.ok(&["apply", "-f", talk_v2.to_str().unwrap()]);
    orch.until(&["logs", "talk"], "the new instance talks", |o| o.contains("talk v2"));
    assert_eq!(orch.ok(&["logs", "talk", "--previous"]), "talk v1 says hello\nto stderr\n");
    let mut follow = orch.cmd(&["logs", "talk", "-f"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(follow.stdout.take().unwrap()), &mut first).unwrap();
    assert_eq!(first, "talk v2 says hello\n");
    assert!(follow.try_wait().unwrap().is_none(), "-f keeps following a running instance");
    let _ = follow.kill();
    let _ = follow.wait();
    let e = orch.fails(&["--token", "orch-forged", "logs", "talk"], 1);
    assert!(e.contains("401"), "{e}");
    insta::assert_snapshot!("error_logs_no_container", orch.fails(&["logs", "talk", "-c", "other"], 1));
    // An agent answers only on a ticket from the server, never to a caller straight.
    let node = orch.ok(&["get", "wl", "talk", "-o", "json"]);
    let node: serde_json::Value = serde_json::from_str(&node).unwrap();
    let node = node["spec"]["nodeName"].as_str().unwrap().to_string();
    let node: serde_json::Value = serde_json::from_str(&orch.ok(&["get", "node", &node, "-o", "json"])).unwrap();
    let agent =
        node["metadata"]["annotations"]["orch.dev/agent-api"].as_str().expect("the agent's address").to_string();
    let ask_agent = |header: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(agent.trim_start_matches("http://")).unwrap();
        let req = format!("GET /logs/default/talk HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    let answer = ask_agent(&format!("Authorization: Bearer {admin}"));
    assert!(answer.starts_with("HTTP/1.1 401") && !answer.contains("hello"), "{answer}");
    let answer = ask_agent("x-orch-log-ticket: 0123456789abcdef");
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("no such log ticket"), "{answer}");
    // Exec: the output and the exit code of a command run in the container (in its
    // directory: it sees the files the instance wrote); a reader may read logs but not exec.
    let out = orch.run(&["exec", "talk", "--", "sh", "-c", "echo in-$PPID-dir; ls; echo warn >&2; exit 7"]);
    assert_eq!(out.code, 7, "the command's exit code: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("in-") && out.stdout.contains("stdout.log"), "{}", out.stdout);
    assert_eq!(out.stderr, "warn\n");
    assert_eq!(orch.ok(&["exec", "workload/talk", "-c", "main", "--", "echo", "hi"]), "hi\n");
    let e = orch.fails(&["exec", "talk", "--timeout", "1", "--", "sleep", "30"], 1);
    assert_eq!(e, "orch: the command did not finish within 1s: it was killed\n");
    assert!(orch.ok(&["--token", &reader_token, "logs", "talk"]).contains("talk v2"), "a reader reads logs");
    let e = orch.fails(&["--token", &reader_token, "exec", "talk", "--", "true"], 1);
    assert!(e.contains("needs the right to update it") && e.contains("403"), "{e}");
    let e = orch.fails(&["exec", "talk", "--", "/no/such/program"], 1);
    assert!(e.contains("cannot run \"/no/such/program\" in main"), "{e}");
    // Interactive (-i), over plain http with a token: the input reaches the command.
    let mut child = orch.cmd(&["exec", "-i", "talk", "--", "sh", "-c", "cat; exit 4"]);
    let mut child = child.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"typed\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(4), "typed\n"));
    orch.ok(&["delete", "wl", "talk"]);

    // A daemon set: one workload a node, which a drain leaves in place.
    assert_eq!(orch.ok(&["apply", "-f", &f("agents.yaml")]), "daemonset/agents created\n");
    orch.until(&["get", "wl", "-l", "app=agents"], "a daemon workload on each node", |o| {
        o.matches("Running").count() == 2
    });
    insta::assert_snapshot!(
        "get_daemonsets",
        normalise(&orch.until(&["get", "ds"], "the daemon set counts them", |o| {
            o.lines().nth(1).is_some_and(|l| l.split_whitespace().skip(1).take(5).all(|n| n == "2"))
        }))
    );

    // Nodes: cordon, top, drain, uncordon.
    assert_eq!(orch.ok(&["cordon", "node-2"]), "node/node-2 cordoned\n");
    assert!(orch.ok(&["get", "nodes"]).contains("Ready,SchedulingDisabled"));
    let top = orch.ok(&["top", "nodes"]);
    assert!(top.starts_with("NAME     CPU(REQUESTS)") && top.lines().count() == 3, "{top}");
    let drained = orch.ok(&["drain", "node-2", "--timeout", "60"]);
    assert!(drained.ends_with("node/node-2 drained\n"), "{drained}");
    let left = orch.ok(&["get", "wl", "--field-selector", "spec.nodeName=node-2", "-o", "name"]);
    assert_eq!(left.lines().count(), 1, "only the daemon set's workload stays: {left}");
    assert!(left.starts_with("workload/agents-"), "{left}");
    assert_eq!(orch.ok(&["delete", "ds", "agents"]), "daemonset/agents deleted\n");
    assert_eq!(orch.ok(&["uncordon", "node-2"]), "node/node-2 uncordoned\n");
    assert_eq!(orch.ok(&["uncordon", "node-2"]), "node/node-2 already uncordoned\n");

    // A stateful set: replicas with stable names, started in order.
    assert_eq!(orch.ok(&["apply", "-f", &f("counter.yaml")]), "statefulset/counter created\n");
    orch.until(&["get", "wl", "-l", "app=counter"], "both replicas run", |o| {
        o.contains("counter-0") && o.contains("counter-1") && o.matches("Running").count() == 2
    });
    insta::assert_snapshot!(
        "get_statefulsets",
        normalise(&orch.until(&["get", "sts"], "the stateful set counts them", |o| o.contains("2/2")))
    );
    assert_eq!(orch.ok(&["delete", "sts", "counter"]), "statefulset/counter deleted\n");
    orch.until(&["get", "wl", "-l", "app=counter", "-o", "name"], "its workloads go with it", str::is_empty);

    // Prune: what was applied before with the set's label and is no longer in the files goes.
    orch.ok(&["apply", "-f", &f("extra.yaml")]);
    let out = orch.ok(&["apply", "-f", &f("web.yaml"), "--prune", "-l", "set=cli-test", "--dry-run=server"]);
    assert!(out.contains("deployment/extra pruned (server dry run)"), "{out}");
    let out = orch.ok(&["apply", "-f", &f("web.yaml"), "--prune", "-l", "set=cli-test"]);
    insta::assert_snapshot!("apply_prune", out);
    orch.fails(&["get", "deploy", "extra"], 1);

    // Delete with each cascade.
    let out = orch.ok(&["delete", "deploy", "stuck", "--cascade=orphan"]);
    assert!(out.starts_with("deployment/stuck deleting (waiting for finalizers: "), "{out}");
    let r = orch.run(&["get", "deploy", "stuck"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while orch.run(&["get", "deploy", "stuck"]).code == 0 {
        assert!(Instant::now() < deadline, "the orphaning delete finishes: {}", r.stdout);
        std::thread::sleep(Duration::from_millis(100));
    }
    let orphans = orch.ok(&["get", "rs", "-l", "app=stuck", "-o", "name"]);
    assert_eq!(orphans.lines().count(), 2, "the orphaned revisions stay: {orphans}");
    orch.ok(&["delete", "rs", "-l", "app=stuck", "--cascade=foreground"]);
    orch.until(&["get", "wl", "-l", "app=stuck", "-o", "name"], "the revisions' workloads go", str::is_empty);
    assert_eq!(orch.ok(&["delete", "-f", &f("web.yaml")]), "deployment/web deleted\n");
    orch.until(&["get", "wl", "-o", "name"], "the garbage collector removes the workloads", str::is_empty);

    // Errors: precise, with the exit code.
    insta::assert_snapshot!("error_unknown_kind", orch.fails(&["get", "deploymnet"], 1));
    insta::assert_snapshot!("error_not_found", orch.fails(&["get", "deploy", "nothing"], 1));
    insta::assert_snapshot!("error_delete_not_found", orch.fails(&["delete", "deploy", "nothing"], 1));
    insta::assert_snapshot!("error_bad_manifest", orch.fails(&["apply", "-f", &f("bad.yaml")], 1).replace(&f(""), ""));
    let e = orch.fails(&["get", "deploy", "-l", "app in (x"], 1);
    assert!(e.starts_with("orch: -l \"app in (x\""), "{e}");

    // Tokens kept in the store: made through the API by the admin, good at once, listed without
    // the secret, revoked with no restart.
    let made = orch.run(&["token", "create", "--user", "carol", "--group", "system:readers", "--ttl", "1h"]);
    assert_eq!(made.code, 0, "{}", made.stderr);
    let carol = made.stdout.trim().to_string();
    let id = made.stderr.trim().strip_prefix("token id ").expect("the id on stderr").to_string();
    assert!(orch.ok(&["get", "nodes", "--token", &carol]).contains("node-1"));
    let e = orch.fails(&["delete", "deploy", "nothing", "--token", &carol], 1);
    assert!(e.contains("cannot delete"), "a reader: {e}");
    let listed = orch.ok(&["token", "list"]);
    assert!(listed.contains(&id) && listed.contains("carol") && listed.contains("system:readers"), "{listed}");
    assert!(!listed.contains(&carol), "the secret is not kept: {listed}");
    let e = orch.fails(&["token", "list", "--token", &carol], 1);
    assert!(e.contains("cannot list BearerToken") || e.contains("Forbidden"), "{e}");
    assert_eq!(orch.ok(&["token", "revoke", &id]), format!("revoked token {id}\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = orch.run(&["get", "nodes", "--token", &carol]);
        if r.code == 1 && r.stderr.contains("the bearer token is not valid") {
            break;
        }
        assert!(Instant::now() < deadline, "the revoked token still works: {}{}", r.stdout, r.stderr);
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = orch.fails(&["token", "revoke", &id], 1);
    assert!(e.contains("no token") && e.contains("orch token list"), "{e}");
    assert!(orch.ok(&["token", "revoke", "--user", "nobody"]).contains("has no token"));
}

#[test]
fn contexts_are_chosen_by_flag_environment_or_config() {
    let dir = std::env::temp_dir().join(format!("orch-cli-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let orch = Cli { config: dir.join("sub/config.yaml") };
    orch.ok(&["config", "set-context", "a", "--server", "http://127.0.0.1:1", "--namespace", "team-a"]);
    orch.ok(&["config", "set-context", "b", "--server", "http://127.0.0.1:2", "--token", "secret"]);
    assert_eq!(orch.ok(&["config", "current-context"]), "a\n");
    assert_eq!(orch.ok(&["config", "use-context", "b"]), "switched to context \"b\"\n");
    insta::assert_snapshot!("config_get_contexts", orch.ok(&["config", "get-contexts"]));
    let view = orch.ok(&["config", "view"]);
    assert!(view.contains("REDACTED") && !view.contains("secret"), "{view}");
    // Which server a command reaches tells which context it used.
    let e = orch.fails(&["get", "nodes"], 1);
    assert!(e.contains("http://127.0.0.1:2"), "{e}");
    let e = orch.fails(&["--context", "a", "get", "nodes"], 1);
    assert!(e.contains("http://127.0.0.1:1"), "{e}");
    let r = orch.cmd(&["get", "nodes"]).env("ORCH_CONTEXT", "a").output().unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains("http://127.0.0.1:1"));
    insta::assert_snapshot!(
        "error_unknown_context",
        orch.fails(&["--context", "c", "get", "nodes"], 1).replace(dir.to_str().unwrap(), "<dir>")
    );
    // An https server needs the CA to trust; a CA for a plain http server is refused, not
    // ignored; a CA file that is not there is named.
    insta::assert_snapshot!("error_https", orch.fails(&["--server", "https://10.0.0.1:7440", "get", "nodes"], 1));
    let e = orch.fails(&["--server", "https://10.0.0.1:7440", "--ca", "/nonexistent/ca.crt", "get", "nodes"], 1);
    assert!(e.contains("--ca /nonexistent/ca.crt"), "{e}");
    let text = std::fs::read_to_string(dir.join("sub/config.yaml"))
        .unwrap()
        .replace("name: a\n", "name: a\n  ca: /etc/orch/ca.pem\n");
    let text = if text.contains("ca:") { text } else { text.replace("- name: a", "- name: a\n  ca: /etc/orch/ca.pem") };
    std::fs::write(dir.join("sub/config.yaml"), text).unwrap();
    insta::assert_snapshot!("error_ca", orch.fails(&["--context", "a", "get", "nodes"], 1));
    assert_eq!(orch.ok(&["config", "delete-context", "b"]), "context \"b\" deleted\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_command_has_help_with_an_example_and_completions_exist() {
    let orch = Cli { config: std::env::temp_dir().join("orch-cli-none.yaml") };
    let commands: &[&[&str]] = &[
        &[],
        &["server"],
        &["agent"],
        &["token", "create"],
        &["certs", "issue"],
        &["certs", "revoke"],
        &["certs", "revoked"],
        &["node", "revoke"],
        &["apply"],
        &["diff"],
        &["get"],
        &["describe"],
        &["delete"],
        &["logs"],
        &["exec"],
        &["rollout", "status"],
        &["rollout", "history"],
        &["rollout", "undo"],
        &["rollout", "pause"],
        &["rollout", "resume"],
        &["rollout", "restart"],
        &["scale"],
        &["cordon"],
        &["uncordon"],
        &["drain"],
        &["top", "nodes"],
        &["config", "set-context"],
        &["config", "use-context"],
        &["config", "get-contexts"],
        &["config", "current-context"],
        &["config", "delete-context"],
        &["config", "view"],
        &["completion"],
    ];
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let help = orch.ok(&args);
        assert!(help.contains("Example"), "orch {c:?} --help has no example:\n{help}");
    }
    assert!(orch.ok(&["top", "nodes", "--help"]).contains("no metrics pipeline"));
    // A reader that goes away early (`| head`) ends the command quietly, with success.
    let mut child = orch.cmd(&["completion", "bash"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 10];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    for shell in ["bash", "zsh", "fish"] {
        let script = orch.ok(&["completion", shell]);
        assert!(script.contains("rollout") && script.len() > 1000, "{shell}");
    }
}
