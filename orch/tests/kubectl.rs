//! The stock `kubectl` against a running `orch server`: discovery, apply, get (table and JSON),
//! watch, describe, delete, raw reads, and a refused invalid object showing its field errors;
//! then the server stops cleanly on SIGTERM.
//!
//! Without `kubectl` on `PATH` the test says it is skipped (with `ORCH_REQUIRE_KUBECTL` set, as
//! CI does, it fails instead).

#![cfg(feature = "cli")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_server(dir: &Path, log: &Path) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_orch"))
        .args(["server", "--insecure-http", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start orch server");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "orch server did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    Server { child, url }
}

fn kubectl(server: &Server, args: &[&str]) -> Output {
    Command::new("kubectl").arg("--server").arg(&server.url).args(args).output().expect("run kubectl")
}

fn ok(server: &Server, args: &[&str]) -> String {
    let out = kubectl(server, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kubectl {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

const WEB: &str = "apiVersion: orch.dev/v1
kind: Workload
metadata:
  name: web
  namespace: default
  labels: {app: web}
spec:
  containers:
  - name: main
    command: [sleep, '1000']
";

#[test]
fn kubectl_works_against_orch_server() {
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        assert!(std::env::var_os("ORCH_REQUIRE_KUBECTL").is_none(), "kubectl is required but not installed");
        eprintln!("skipped: kubectl is not installed (apt-get install kubernetes-client)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("orch-kubectl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("server.log");
    let mut server = start_server(&dir.join("data"), &log);

    // Discovery.
    let resources = ok(&server, &["api-resources"]);
    let wl = resources.lines().find(|l| l.starts_with("workloads")).expect("workloads in api-resources");
    assert!(wl.contains(" wl ") && wl.contains("orch.dev/v1") && wl.contains("true"), "{wl}");
    assert!(resources.lines().any(|l| l.starts_with("nodes") && l.contains("false")), "{resources}");
    let raw = ok(&server, &["get", "--raw", "/apis/orch.dev/v1"]);
    assert!(raw.contains("\"APIResourceList\""), "{raw}");

    // A watch opened before the changes it should see.
    let mut watch = Command::new("kubectl")
        .args([
            "--server",
            &server.url,
            "get",
            "workloads",
            "-n",
            "default",
            "-w",
            "--output-watch-events",
            "--no-headers",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // Apply, then apply a change.
    let manifest = dir.join("web.yaml");
    std::fs::write(&manifest, WEB).unwrap();
    let out = ok(&server, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("workload.orch.dev/web created"), "{out}");
    std::fs::write(&manifest, WEB.replace("'1000'", "'2000'")).unwrap();
    let out = ok(&server, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("workload.orch.dev/web configured"), "{out}");

    // Get: a table, JSON, a short name, all namespaces, describe.
    let table = ok(&server, &["get", "workloads", "-n", "default"]);
    assert!(table.starts_with("NAME") && table.lines().nth(1).unwrap().starts_with("web "), "{table}");
    let json: serde_json::Value = serde_json::from_str(&ok(&server, &["get", "wl", "web", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "Workload");
    assert_eq!(json["spec"]["containers"][0]["command"], serde_json::json!(["sleep", "2000"]));
    let all = ok(&server, &["get", "wl", "-A", "-l", "app=web"]);
    assert!(all.lines().any(|l| l.starts_with("default") && l.contains("web")), "{all}");
    let described = ok(&server, &["describe", "wl", "web"]);
    assert!(described.contains("Name:") && described.contains("web"), "{described}");

    // An invalid object: refused, naming every field.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: orch.dev/v1\nkind: Workload\nmetadata: {name: Bad_Name, namespace: default}\nspec: {containers: []}\n").unwrap();
    let out = kubectl(&server, &["apply", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is invalid") && err.contains("metadata.name") && err.contains("spec.containers"), "{err}");

    // Delete.
    let out = ok(&server, &["delete", "wl", "web", "-n", "default"]);
    assert!(out.contains("deleted"), "{out}");
    let out = kubectl(&server, &["get", "wl", "web"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"));

    // The watch saw the create, the change and the delete, in order.
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // (The scheduler's status writes are changes too: any number of MODIFIED in between.)
    let mut seen = Vec::new();
    while seen.last().is_none_or(|l: &String| !l.starts_with("DELETED")) {
        let line = lines.next().expect("a watch line").unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        seen.push(format!("{} {}", words[0], words.get(1).unwrap_or(&"")));
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(seen.first().map(String::as_str), Some("ADDED web"), "{seen:?}");
    assert!(seen.len() >= 3 && seen[1..seen.len() - 1].iter().all(|l| l == "MODIFIED web"), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("DELETED web"));

    // SIGTERM: the server stops by itself, successfully.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("stopped"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
