//! Nodes over TLS: joining with a short-lived join token for a node certificate; renewing it
//! over the authenticated connection; an expired or revoked certificate refused; the node
//! authorizer's matrix (a node writes only its own node, lease and bound workloads' status, and
//! uses only the store leases granted to it);
//! no token or key in the logs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use orch_core::kinds::{NODE_LEASE_NAMESPACE, Node, NodeLease, PersistentVolume, Phase, Workload};
use orch_core::{Api, Clock, Object, ObjectMeta, Store, SystemClock, Timestamp};
use orch_store::MemoryStore;
use orch_store::api::auth::ADMINS;
use orch_store::api::pki::{self, CertificateIdentity};
use orch_store::api::{
    ApiServer, AuditLog, Authorizer, ClusterCa, JoinTokens, Limits, NodeJoin, RemoteStore, RunningServer, Tokens,
    UserInfo,
};
use serde_json::json;

const JOIN: &str = "orchjoin-0123456789abcdef0123456789abcdef";
const STALE_JOIN: &str = "orchjoin-stale-00000000000000000000000000";
const ADMIN: &str = "admin-token-0123456789";

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Cluster {
    ca: Arc<ClusterCa>,
    running: RunningServer,
    audit: Buffer,
}

impl Cluster {
    async fn start(validity: Duration) -> Cluster {
        let ca = Arc::new(ClusterCa::generate("cluster").unwrap());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let now = SystemClock.now();
        let joins = JoinTokens::new()
            .with(JOIN, now.plus(Duration::from_secs(3600)))
            .with(STALE_JOIN, Timestamp(now.as_millis() - 1000));
        let tokens = Tokens::new().with(ADMIN, UserInfo { name: "root".into(), groups: vec![ADMINS.into()] });
        let audit = Buffer::default();
        let api = ApiServer::builder(store)
            .authentication(tokens)
            .authorization(Authorizer::with_builtin_roles())
            .audit(AuditLog::writer(audit.clone()))
            .limits(Limits { revocation_check_interval: Duration::from_millis(200), ..Limits::default() })
            .node_join(NodeJoin::new(ca.clone()).tokens(joins).validity(validity))
            .build();
        let cert = ca.server_certificate(&["127.0.0.1".into()]).unwrap();
        let running = api.spawn_tls("127.0.0.1:0".parse().unwrap(), ca.server_config(&cert).unwrap()).await.unwrap();
        Cluster { ca, running, audit }
    }

    fn anonymous(&self) -> RemoteStore {
        RemoteStore::builder(self.running.url()).ca_pem(self.ca.cert_pem()).build().unwrap()
    }

    fn admin(&self) -> RemoteStore {
        RemoteStore::builder(self.running.url()).ca_pem(self.ca.cert_pem()).bearer_token(ADMIN).build().unwrap()
    }

    fn with_identity(&self, cert: &str, key: &str) -> RemoteStore {
        RemoteStore::builder(self.running.url())
            .ca_pem(self.ca.cert_pem())
            .client_identity(cert, key)
            .reconnect_for(Duration::from_millis(100))
            .build()
            .unwrap()
    }

    /// Joins as `node`: the node's store, its certificate and key.
    async fn join(&self, node: &str) -> (RemoteStore, String, String) {
        let (cert, key) = join_with(&self.anonymous(), node, JOIN).await.unwrap();
        (self.with_identity(&cert, &key), cert, key)
    }
}

async fn join_with(server: &RemoteStore, node: &str, token: &str) -> Result<(String, String), orch_core::Error> {
    let (csr, key) = pki::node_csr(node).unwrap();
    let body = json!({"token": token, "node": node, "csr": csr}).to_string().into_bytes();
    let answer = server.raw("POST", "/orch/v1/join", Some(body)).await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    Ok((answer["certificate"].as_str().unwrap().to_string(), key))
}

async fn renew(store: &RemoteStore, node: &str) -> Result<(String, String), orch_core::Error> {
    let (csr, key) = pki::node_csr(node).unwrap();
    let body = json!({"csr": csr}).to_string().into_bytes();
    let answer = store.raw("POST", "/orch/v1/certificates/renew", Some(body)).await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    Ok((answer["certificate"].as_str().unwrap().to_string(), key))
}

fn node(name: &str) -> Object<Node> {
    Object::new(ObjectMeta::named(name), Node::default())
}

fn workload(name: &str, on: &str) -> Object<Workload> {
    let spec: Workload = serde_json::from_value(json!({
        "containers": [{"name": "main", "command": ["sleep", "1"]}],
        "nodeName": on,
    }))
    .unwrap();
    Object::new(ObjectMeta::namespaced("ns", name), spec)
}

fn store(r: &RemoteStore) -> Arc<dyn Store> {
    Arc::new(r.clone())
}

#[tokio::test]
async fn a_node_joins_with_a_join_token_and_then_uses_its_certificate() {
    let c = Cluster::start(Duration::from_secs(3600)).await;
    let (n1, cert, _) = c.join("n1").await;
    let id = CertificateIdentity::from_pem(&cert).unwrap();
    assert_eq!(id.user.name, "system:node:n1");
    assert_eq!(id.user.groups, vec![pki::NODES.to_string()]);
    let life = id.not_after.since(id.not_before);
    assert!(life <= Duration::from_secs(3600 + 120), "{life:?}");
    Api::<Node>::all(store(&n1)).create(&node("n1")).await.unwrap();
    // The server keeps the record of what it issued, for revocation.
    let record = c.admin().get(&orch_core::ObjectKey::new(pki::NODE_CERTIFICATE_KIND, "", "n1")).await.unwrap();
    assert!(record.spec.to_string().contains(&id.serial), "{}", record.spec);
    c.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_or_expired_join_token_is_refused() {
    let c = Cluster::start(Duration::from_secs(3600)).await;
    for token in ["orchjoin-guess", STALE_JOIN] {
        let e = join_with(&c.anonymous(), "n1", token).await.unwrap_err().to_string();
        assert!(e.contains("401") && e.contains("join token is not valid or has expired"), "{e}");
    }
    // A join token is no bearer token: it opens nothing else.
    let as_token = RemoteStore::builder(c.running.url()).ca_pem(c.ca.cert_pem()).bearer_token(JOIN).build().unwrap();
    let e = Api::<Node>::all(store(&as_token)).list(&Default::default()).await.unwrap_err().to_string();
    assert!(e.contains("bearer token is not valid"), "{e}");
    let (csr, _) = pki::node_csr("n1").unwrap();
    let body = json!({"token": JOIN, "node": "Not A Name", "csr": csr}).to_string().into_bytes();
    let e = c.anonymous().raw("POST", "/orch/v1/join", Some(body)).await.unwrap_err().to_string();
    assert!(e.contains("name") && e.contains("lower-case"), "{e}");
    c.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_renews_its_certificate_over_its_authenticated_connection() {
    let c = Cluster::start(Duration::from_secs(3600)).await;
    let (n1, first, _) = c.join("n1").await;
    let (cert, key) = renew(&n1, "n1").await.unwrap();
    let (old, new) = (CertificateIdentity::from_pem(&first).unwrap(), CertificateIdentity::from_pem(&cert).unwrap());
    assert_ne!(old.serial, new.serial);
    assert_eq!(new.user.name, "system:node:n1");
    n1.set_client_identity(cert.as_bytes(), key.as_bytes()).unwrap();
    Api::<Node>::all(store(&n1)).create(&node("n1")).await.unwrap();
    // Renewing needs a node's certificate: not anonymous, not a user's token.
    let e = renew(&c.anonymous(), "n1").await.unwrap_err().to_string();
    assert!(e.contains("403") && e.contains("only a node"), "{e}");
    let e = renew(&c.admin(), "n1").await.unwrap_err().to_string();
    assert!(e.contains("403"), "{e}");
    c.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_expired_node_certificate_is_refused() {
    let c = Cluster::start(Duration::from_secs(2)).await;
    let (n1, _, _) = c.join("n1").await;
    let nodes = Api::<Node>::all(store(&n1));
    nodes.create(&node("n1")).await.unwrap();
    let (csr, key) = pki::node_csr("n1").unwrap();
    let dead = c.ca.sign_node_csr(&csr, "n1", Duration::ZERO).unwrap();
    // The connection outlives the certificate: the next request on it is refused.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = nodes.get("n1").await.unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("expired"), "{e}");
    // A new connection with an expired one does not get past the handshake.
    let e = Api::<Node>::all(store(&c.with_identity(&dead.cert_pem, &key))).get("n1").await.unwrap_err().to_string();
    assert!(e.contains("refused the TLS handshake"), "{e}");
    c.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_revoked_node_certificate_is_refused_on_the_next_request() {
    let c = Cluster::start(Duration::from_secs(3600)).await;
    let (n1, cert, _) = c.join("n1").await;
    let (n2, _, _) = c.join("n2").await;
    let nodes = Api::<Node>::all(store(&n1));
    nodes.create(&node("n1")).await.unwrap();
    let serials = pki::revoke_node(&c.admin(), "n1").await.unwrap();
    assert_eq!(serials, vec![CertificateIdentity::from_pem(&cert).unwrap().serial]);
    let e = nodes.get("n1").await.unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("revoked"), "{e}");
    let e = renew(&n1, "n1").await.unwrap_err().to_string();
    assert!(e.contains("revoked"), "{e}");
    // Another node is not affected; the revoked one may join again with a join token.
    Api::<Node>::all(store(&n2)).create(&node("n2")).await.unwrap();
    let (again, _, _) = c.join("n1").await;
    Api::<Node>::all(store(&again)).get("n1").await.unwrap();
    // Nodes cannot read or write the records themselves.
    let e = again.get(&orch_core::ObjectKey::new(pki::NODE_CERTIFICATE_KIND, "", "n1")).await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    c.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_open_watch_of_a_revoked_node_ends() {
    let c = Cluster::start(Duration::from_secs(3600)).await;
    let (n1, _, _) = c.join("n1").await;
    let req = orch_core::WatchRequest {
        selection: orch_core::Selection::kind("Node"),
        from_revision: None,
        progress_interval: None,
    };
    let mut watch = n1.watch(&req).await.unwrap();
    Api::<Node>::all(store(&n1)).create(&node("n1")).await.unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert!(matches!(first, orch_core::WatchEvent::Added(_)), "{first:?}");
    pki::revoke_node(&c.admin(), "n1").await.unwrap();
    // The server ends the watch; its reconnection is refused.
    let end = common::watch_end(&mut watch, Duration::from_secs(20)).await;
    if let Some(e) = end {
        assert!(e.contains("revoked"), "{e}");
    }
    c.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_writes_only_its_own_node_lease_and_bound_workloads_status() {
    let c = Cluster::start(Duration::from_secs(3600)).await;
    let (n1, _, _) = c.join("n1").await;
    let (n2, _, _) = c.join("n2").await;
    let admin = store(&c.admin());
    Api::<Workload>::namespaced(admin.clone(), "ns").create(&workload("mine", "n1")).await.unwrap();
    Api::<Workload>::namespaced(admin.clone(), "ns").create(&workload("theirs", "n2")).await.unwrap();
    let denied = |r: Result<_, orch_core::Error>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what}: allowed")).to_string();
        assert!(e.contains("403"), "{what}: {e}");
    };

    // Its own node and lease: yes. Another's: no.
    let nodes = Api::<Node>::all(store(&n1));
    let mine = nodes.create(&node("n1")).await.unwrap();
    nodes.replace_status(&mine).await.unwrap();
    Api::<Node>::all(store(&n2)).create(&node("n2")).await.unwrap();
    let other = nodes.get("n2").await.unwrap();
    denied(nodes.replace_status(&other).await.map(|_| ()), "update another node's status");
    denied(nodes.replace(&other).await.map(|_| ()), "update another node");
    denied(nodes.create(&node("n3")).await.map(|_| ()), "create another node");
    denied(nodes.delete("n1", &Default::default()).await.map(|_| ()), "delete its own node");
    let leases = Api::<NodeLease>::namespaced(store(&n1), NODE_LEASE_NAMESPACE);
    let lease = |n: &str| Object::new(ObjectMeta::named(n), NodeLease { holder: n.into() });
    leases.create(&lease("n1")).await.unwrap();
    denied(leases.create(&lease("n2")).await.map(|_| ()), "create another node's lease");

    // Workloads: the status of those bound to it; their metadata, not their spec.
    let workloads = Api::<Workload>::namespaced(store(&n1), "ns");
    let mut w = workloads.get("mine").await.unwrap();
    w.status.phase = Phase::Running;
    workloads.replace_status(&w).await.unwrap();
    let mut w = workloads.get("mine").await.unwrap();
    w.metadata.finalizers.push("orch.dev/pre-stop".into());
    workloads.replace(&w).await.unwrap();
    let mut w = workloads.get("mine").await.unwrap();
    w.spec.containers[0].command = vec!["sh".into(), "-c".into(), "evil".into()];
    denied(workloads.replace(&w).await.map(|_| ()), "change a bound workload's spec");
    let mut w = workloads.get("mine").await.unwrap();
    w.spec.node_name = Some("n2".into());
    denied(workloads.replace(&w).await.map(|_| ()), "move a workload");
    let mut t = workloads.get("theirs").await.unwrap();
    t.status.phase = Phase::Failed;
    denied(workloads.replace_status(&t).await.map(|_| ()), "update another node's workload status");
    denied(workloads.create(&workload("new", "n1")).await.map(|_| ()), "create a workload");
    denied(workloads.delete("theirs", &Default::default()).await.map(|_| ()), "delete a workload");
    let patch = json!({"spec": {"nodeName": "n1"}}).to_string().into_bytes();
    let e = n1.raw("PATCH", "/apis/orch.dev/v1/namespaces/ns/workloads/theirs", Some(patch)).await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");

    // Volumes: the agent removes its reclaim finalizer from those on its node, nothing else.
    let pvs = Api::<PersistentVolume>::all(admin.clone());
    let pv = |name: &str, on: &str| {
        let spec: PersistentVolume = serde_json::from_value(json!({
            "capacity": "1Gi", "accessModes": ["ReadWriteOnce"], "volumeClass": "local", "nodeName": on,
        }))
        .unwrap();
        let mut meta = ObjectMeta::named(name);
        meta.finalizers.push("orch.dev/reclaim".into());
        Object::new(meta, spec)
    };
    pvs.create(&pv("pv-mine", "n1")).await.unwrap();
    pvs.create(&pv("pv-theirs", "n2")).await.unwrap();
    let node_pvs = Api::<PersistentVolume>::all(store(&n1));
    let mut v = node_pvs.get("pv-mine").await.unwrap();
    v.spec.capacity = "2Gi".parse().unwrap();
    denied(node_pvs.replace(&v).await.map(|_| ()), "grow a volume on its node");
    let mut v = node_pvs.get("pv-mine").await.unwrap();
    v.metadata.finalizers.clear();
    node_pvs.replace(&v).await.unwrap();
    let mut t = node_pvs.get("pv-theirs").await.unwrap();
    t.metadata.finalizers.clear();
    denied(node_pvs.replace(&t).await.map(|_| ()), "write another node's volume");
    denied(node_pvs.delete("pv-mine", &Default::default()).await.map(|_| ()), "delete a volume");

    // Reads an agent needs: yes; other kinds: no.
    assert_eq!(workloads.list(&Default::default()).await.unwrap().items.len(), 2);
    let e = n1.raw("GET", "/apis/orch.dev/v1/namespaces/ns/deployments", None).await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    let audit = c.audit.text();
    assert!(audit.contains("\"user\":\"system:node:n1\"") && audit.contains("\"allowed\":false"), "{audit}");
    c.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_uses_only_the_store_leases_granted_to_it() {
    let c = Cluster::start(Duration::from_secs(3600)).await;
    let (n1, _, _) = c.join("n1").await;
    let (n2, _, _) = c.join("n2").await;
    let admin = c.admin();
    let denied = |r: Result<(), orch_core::Error>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what}: allowed")).to_string();
        assert!(e.contains("403") && e.contains("store leases granted to it"), "{what}: {e}");
    };
    let ttl = Duration::from_secs(60);
    let l1 = n1.grant_lease(ttl).await.unwrap().id;
    let l2 = n2.grant_lease(ttl).await.unwrap().id;
    let by_admin = admin.grant_lease(ttl).await.unwrap().id;
    let leased = |n: &str, lease: u64| {
        let mut meta = ObjectMeta::named(n);
        meta.lease = Some(lease);
        Object::new(meta, NodeLease { holder: n.into() })
    };
    let mine = Api::<NodeLease>::namespaced(store(&n1), NODE_LEASE_NAMESPACE);
    let theirs = Api::<NodeLease>::namespaced(store(&n2), NODE_LEASE_NAMESPACE);

    // Its own lease: attach, keep alive. Another node's, or one an admin granted: no.
    mine.create(&leased("n1", l1)).await.unwrap();
    n1.keep_alive(l1).await.unwrap();
    denied(theirs.create(&leased("n2", l1)).await.map(|_| ()), "attach to another node's lease");
    denied(theirs.create(&leased("n2", by_admin)).await.map(|_| ()), "attach to an admin's lease");
    denied(n2.keep_alive(l1).await.map(|_| ()), "keep another node's lease alive");
    denied(n2.revoke_lease(l1).await, "revoke another node's lease");
    denied(n1.keep_alive(by_admin).await.map(|_| ()), "keep an admin's lease alive");
    theirs.create(&leased("n2", l2)).await.unwrap();
    // Nor through a patch, of either kind.
    let path = format!("/apis/orch.dev/v1/namespaces/{NODE_LEASE_NAMESPACE}/nodeleases/n2");
    let merge = json!({"metadata": {"lease": l1}}).to_string().into_bytes();
    denied(n2.raw("PATCH", &path, Some(merge)).await.map(|_| ()), "a merge patch onto another node's lease");
    let ops = json!([{"op": "replace", "path": "/metadata/lease", "value": l1}]).to_string().into_bytes();
    denied(n2.raw("PATCH", &path, Some(ops)).await.map(|_| ()), "a JSON patch onto another node's lease");
    let copy = json!([{"op": "copy", "from": "/metadata/name", "path": "/metadata/lease"}]).to_string().into_bytes();
    let e = n2.raw("PATCH", &path, Some(copy)).await.unwrap_err().to_string();
    assert!(e.contains("403") && e.contains("may not copy"), "{e}");

    // An admin may; the owner revokes its lease, and what was attached goes with it.
    admin.keep_alive(l1).await.unwrap();
    n1.revoke_lease(l1).await.unwrap();
    assert!(mine.get("n1").await.unwrap_err().is_not_found());
    assert_eq!(theirs.get("n2").await.unwrap().metadata.lease, Some(l2), "the others' are untouched");
    let record = orch_core::ObjectKey::new("StoreLeaseOwner", "", l1.to_string());
    assert!(admin.get(&record).await.unwrap_err().is_not_found(), "the owner record goes with the lease");
    c.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn no_token_or_key_appears_in_the_logs() {
    let logs = Buffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let c = Cluster::start(Duration::from_secs(3600)).await;
    let (n1, cert, key) = c.join("n1").await;
    Api::<Node>::all(store(&n1)).create(&node("n1")).await.unwrap();
    let _ = join_with(&c.anonymous(), "n2", "orchjoin-wrong-guess-123456").await.unwrap_err();
    Api::<Node>::all(store(&c.admin())).list(&Default::default()).await.unwrap();
    let bad =
        RemoteStore::builder(c.running.url()).ca_pem(c.ca.cert_pem()).bearer_token("bad-token-987654").build().unwrap();
    let _ = bad.current_revision().await.unwrap_err();
    let text = logs.text() + &c.audit.text() + &format!("{:?} {:?}", c.admin(), bad);
    assert!(text.contains("signed a node certificate"), "the capture holds the server's log: {text}");
    let key_body = key.lines().nth(1).unwrap();
    for secret in [JOIN, "orchjoin-wrong-guess-123456", ADMIN, "bad-token-987654", key_body, "PRIVATE KEY"] {
        assert!(!text.contains(secret), "{secret:?} is in the logs");
    }
    assert!(!cert.is_empty());
    c.running.shutdown().await.unwrap();
}
