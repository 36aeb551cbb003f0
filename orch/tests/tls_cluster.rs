//! The secure way to run a cluster, as the README does it: `orch server` serving https with the
//! CA it creates; an admin with a client certificate from `orch certs issue`; a user's
//! certificate revoked with `orch certs revoke`; an agent joining
//! with a join token from `orch token create --join` (which pins the CA: a token alone is
//! enough, a forged pin or another CA is refused), renewing its short-lived node certificate
//! and running a workload past the first one's expiry; `orch node revoke` shutting it out; no
//! token or key in any log.

#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch::core::kinds::{Node, Phase, Workload};
use orch::core::{Api, ListParams, Object, ObjectMeta, Store};
use orch::store::api::RemoteStore;
use orch::store::api::pki::CertificateIdentity;

use common::{eventually, free_port, orch};

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_orch"))
        .args(args)
        .env("ORCH_CONFIG", "/nonexistent/config.yaml")
        .output()
        .unwrap();
    assert!(out.status.success(), "orch {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn serial(path: &Path) -> String {
    CertificateIdentity::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_renew_and_are_revoked_over_tls() {
    let dir = std::env::temp_dir().join(format!("orch-tls-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("server");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let data_s = data.to_str().unwrap();
    let _server = orch(
        &["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", data_s, "--node-cert-validity", "3s"],
        &dir.join("server.log"),
    );
    let ca = data.join("ca.crt");
    eventually("the server creates its CA", async || ca.exists().then_some(())).await;
    let ca_s = ca.to_str().unwrap();
    let key_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(data.join("ca.key")).unwrap().permissions());
    assert_eq!(key_mode & 0o777, 0o600);

    // An admin with a client certificate; a join token for the node.
    let admin_dir = dir.join("admin");
    run(&[
        "certs",
        "issue",
        "--data-dir",
        data_s,
        "--user",
        "admin",
        "--group",
        "system:admins",
        "--out",
        admin_dir.to_str().unwrap(),
    ]);
    let join = run(&["token", "create", "--data-dir", data_s, "--join", "--ttl", "10m"]).trim().to_string();
    assert!(join.starts_with("orchjoin-"), "{join}");
    // The token pins the cluster CA.
    let digest = orch::store::api::ca_digest(&std::fs::read(&ca).unwrap()).unwrap();
    assert!(join.ends_with(&format!(".sha256-{digest}")), "{join}");
    let node_dir = dir.join("node-1");
    let agent_command = |join: &str, ca: Option<&str>| {
        let mut args: Vec<String> = ["agent", "--server", &url, "--join-token", join, "--name", "node-1"]
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(["--data-dir", node_dir.to_str().unwrap(), "--drain", "--listen", "127.0.0.1:0"].map(String::from));
        if let Some(ca) = ca {
            args.extend(["--ca".to_string(), ca.to_string()]);
        }
        args
    };
    let agent_args = |join: &str, ca: Option<&str>, log: &str| {
        let args = agent_command(join, ca);
        orch(&args.iter().map(String::as_str).collect::<Vec<_>>(), &dir.join(log))
    };

    // A token pinning another CA, or a `--ca` that is not the pinned one: refused before joining.
    let refused = |join: &str, ca: Option<&str>| {
        let out = Command::new(env!("CARGO_BIN_EXE_orch"))
            .args(agent_command(join, ca))
            .env("ORCH_CONFIG", "/nonexistent/config.yaml")
            .output()
            .unwrap();
        assert!(!out.status.success(), "an agent with a wrong pin must not start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let forged = format!("{}.sha256-{}", join.split_once(".sha256-").unwrap().0, "0".repeat(64));
    let e = refused(&forged, None);
    assert!(e.contains("no certificate the server sent is the CA the join token pins"), "{e}");
    let other_ca = dir.join("other-ca.crt");
    std::fs::write(&other_ca, std::fs::read_to_string(admin_dir.join("admin.crt")).unwrap()).unwrap();
    let e = refused(&join, Some(other_ca.to_str().unwrap()));
    assert!(e.contains("not the CA the join token pins"), "{e}");
    assert!(!node_dir.join("pki/node.crt").exists(), "nothing joined");

    let agent = agent_args(&join, Some(ca_s), "node-1.log");

    let admin_cert = std::fs::read(admin_dir.join("admin.crt")).unwrap();
    let admin_key = std::fs::read(admin_dir.join("admin.key")).unwrap();
    let admin: Arc<dyn Store> = Arc::new(
        RemoteStore::builder(url.clone())
            .ca_pem(std::fs::read(&ca).unwrap())
            .client_identity(admin_cert, admin_key)
            .build()
            .unwrap(),
    );
    let nodes: Api<Node> = Api::all(admin.clone());
    eventually("the node registers", async || {
        nodes.list(&ListParams::default()).await.ok().filter(|l| l.items.len() == 1).map(|_| ())
    })
    .await;
    // The command line with the CA and the admin's certificate.
    let listed =
        run(&["--server", &url, "--ca", ca_s, "--cert", admin_dir.join("admin.crt").to_str().unwrap(), "get", "nodes"]);
    assert!(listed.contains("node-1"), "{listed}");

    // A user's certificate, revoked from the command line: refused from the next request on.
    let alice_dir = dir.join("alice");
    let issued = run(&[
        "certs",
        "issue",
        "--data-dir",
        data_s,
        "--user",
        "alice",
        "--group",
        "system:readers",
        "--out",
        alice_dir.to_str().unwrap(),
    ]);
    let alice_crt = alice_dir.join("alice.crt");
    let alice_serial = serial(&alice_crt);
    assert!(issued.contains(&format!("serial {alice_serial}")), "{issued}");
    let as_alice = ["--server", &url, "--ca", ca_s, "--cert", alice_crt.to_str().unwrap()];
    assert!(run(&[&as_alice[..], &["get", "nodes"]].concat()).contains("node-1"));
    let admin_crt = admin_dir.join("admin.crt");
    let admin_args = ["--server", &url, "--ca", ca_s, "--cert", admin_crt.to_str().unwrap()];
    let out = run(&[&admin_args[..], &["certs", "revoke", alice_crt.to_str().unwrap()]].concat());
    assert!(out.contains("revoked") && out.contains(&alice_serial), "{out}");
    let refused_alice = Command::new(env!("CARGO_BIN_EXE_orch"))
        .args(as_alice)
        .args(["get", "nodes"])
        .env("ORCH_CONFIG", "/nonexistent/config.yaml")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&refused_alice.stderr);
    assert!(!refused_alice.status.success() && e.contains("revoked"), "{e}");
    let listed = run(&[&admin_args[..], &["certs", "revoked"]].concat());
    assert!(listed.contains(&alice_serial) && listed.contains("alice"), "{listed}");

    // The node renews its certificate (valid 3 s) at two thirds of its life, and keeps working
    // after the first one has expired.
    let node_cert = node_dir.join("pki/node.crt");
    let first = serial(&node_cert);
    let joined = Instant::now();
    // Past the first certificate's expiry, with a newer one in place.
    eventually("a renewal past the first certificate's expiry", async || {
        let now = serial(&node_cert);
        (now != first && joined.elapsed() > Duration::from_secs(4)).then_some(now)
    })
    .await;
    let workloads: Api<Workload> = Api::namespaced(admin.clone(), "default");
    workloads
        .create(&Object::new(
            ObjectMeta::named("late"),
            Workload::command("main", &["sh", "-c", "echo hello from late; sleep 300"]),
        ))
        .await
        .unwrap();
    eventually("the workload runs on the renewed certificate", async || {
        workloads.get("late").await.ok().filter(|w| w.status.phase == Phase::Running).map(|_| ())
    })
    .await;

    // Logs and exec through the server, as a user with a client certificate. The server reaches
    // the agent over https, taking only node-1's certificate (its first one has expired by now:
    // the agent serves the renewed one).
    let node = nodes.get("node-1").await.unwrap();
    let agent_api = node.metadata.annotations.get("orch.dev/agent-api").cloned().unwrap_or_default();
    assert!(agent_api.starts_with("https://127.0.0.1:"), "{agent_api}");
    let as_admin = ["--server", &url, "--ca", ca_s, "--cert", admin_crt.to_str().unwrap()];
    let logs = eventually("the workload's output", async || {
        let out = Command::new(env!("CARGO_BIN_EXE_orch")).args(as_admin).args(["logs", "late"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("hello from late").then_some(text)
    })
    .await;
    assert!(logs.contains("hello from late"), "{logs}");
    let said = run(&[&as_admin[..], &["exec", "late", "--", "echo", "hi"]].concat());
    assert_eq!(said.trim(), "hi");

    // Revoked: the node's certificate is refused from the next request on.
    let out = run(&[
        "--server",
        &url,
        "--ca",
        ca_s,
        "--cert",
        admin_dir.join("admin.crt").to_str().unwrap(),
        "node",
        "revoke",
        "node-1",
    ]);
    assert!(out.contains("revoked"), "{out}");
    let as_node: Arc<dyn Store> = Arc::new(
        RemoteStore::builder(url.clone())
            .ca_pem(std::fs::read(&ca).unwrap())
            .client_identity(std::fs::read(&node_cert).unwrap(), std::fs::read(node_dir.join("pki/node.key")).unwrap())
            .build()
            .unwrap(),
    );
    let e = as_node.current_revision().await.unwrap_err().to_string();
    assert!(e.contains("revoked"), "{e}");

    // Restarted with a new join token, the agent finds its certificate refused (revoked) or
    // expired (it lives 3 s here) and joins again.
    drop(agent);
    let join2 = run(&["token", "create", "--data-dir", data_s, "--join", "--ttl", "10m"]).trim().to_string();
    let revoked_serial = serial(&node_cert);
    // This time with the token alone: the agent finds the CA it pins on the server.
    std::fs::remove_file(node_dir.join("pki/ca.crt")).ok();
    let agent = agent_args(&join2, None, "node-1-again.log");
    eventually("a new certificate", async || (serial(&node_cert) != revoked_serial).then_some(())).await;
    eventually("the node works again", async || {
        let again: Arc<dyn Store> = Arc::new(
            RemoteStore::builder(url.clone())
                .ca_pem(std::fs::read(&ca).unwrap())
                .client_identity(
                    std::fs::read(&node_cert).unwrap(),
                    std::fs::read(node_dir.join("pki/node.key")).unwrap(),
                )
                .build()
                .unwrap(),
        );
        again.current_revision().await.ok()
    })
    .await;

    drop(agent);
    let logs: String = ["server.log", "node-1.log", "node-1-again.log"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();
    let again = std::fs::read_to_string(dir.join("node-1-again.log")).unwrap();
    assert!(again.contains("joined: got a node certificate"), "{again}");
    assert!(again.contains("trusting the cluster CA the join token pins"), "{again}");
    assert_eq!(std::fs::read(node_dir.join("pki/ca.crt")).unwrap(), std::fs::read(&ca).unwrap(), "the CA is kept");
    assert!(!logs.contains(&join2), "the join token appears in a log");
    assert!(logs.contains("renewed the node certificate"), "{logs}");
    assert!(!logs.contains(&join), "the join token appears in a log");
    assert!(!logs.contains("PRIVATE KEY"), "a key appears in a log");
    let _ = std::fs::remove_dir_all(&dir);
}
