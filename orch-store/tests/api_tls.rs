//! TLS: `RemoteStore` over https trusting the cluster CA; a server of another CA refused with
//! an error that says so; client certificates (`CN` = user, `O` = groups) authorized by their
//! groups; a client certificate of another CA refused at the handshake.

use std::sync::Arc;
use std::time::Duration;

use orch_core::{DynamicObject, ObjectKey, ObjectMeta, Store, WriteOptions};
use orch_store::MemoryStore;
use orch_store::api::auth::READERS;
use orch_store::api::{ApiServer, Authorizer, ClusterCa, Issued, RemoteStore, Rule, RunningServer, Tokens};

fn thing(ns: &str, name: &str) -> DynamicObject {
    DynamicObject::new("Thing", ObjectMeta::namespaced(ns, name))
}

/// A CA, and a server over a memory store with its certificate for 127.0.0.1.
async fn server(
    ca: &ClusterCa,
    builder: impl FnOnce(orch_store::api::ApiServerBuilder) -> orch_store::api::ApiServerBuilder,
) -> RunningServer {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cert = ca.server_certificate(&["127.0.0.1".into(), "localhost".into()]).unwrap();
    let tls = ca.server_config(&cert).unwrap();
    let api = builder(ApiServer::builder(store)).build();
    api.spawn_tls("127.0.0.1:0".parse().unwrap(), tls).await.unwrap()
}

fn client(running: &RunningServer, ca: &ClusterCa, identity: Option<&Issued>) -> RemoteStore {
    let mut b = RemoteStore::builder(running.url()).ca_pem(ca.cert_pem()).reconnect_for(Duration::from_millis(100));
    if let Some(id) = identity {
        b = b.client_identity(id.cert_pem.clone(), id.key_pem.clone().unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn a_remote_store_over_https_trusting_the_cluster_ca_reads_and_writes() {
    let ca = ClusterCa::generate("cluster").unwrap();
    let running = server(&ca, |b| b).await;
    assert!(running.url().starts_with("https://"), "{}", running.url());
    let remote = client(&running, &ca, None);
    let created = remote.create(thing("ns", "a"), &WriteOptions::default()).await.unwrap();
    let got = remote.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap();
    assert_eq!(got.metadata.uid, created.metadata.uid);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_server_whose_certificate_another_ca_signed_is_refused_saying_why() {
    let ca = ClusterCa::generate("cluster").unwrap();
    let other = ClusterCa::generate("someone else").unwrap();
    let running = server(&ca, |b| b).await;
    let remote = client(&running, &other, None);
    let e = remote.current_revision().await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("not trusted") && text.contains("CA"), "{text}");
    running.shutdown().await.unwrap();
}

#[test]
fn https_needs_a_ca_and_http_refuses_one() {
    let e = RemoteStore::builder("https://127.0.0.1:1").build().unwrap_err();
    assert!(e.to_string().contains("ca"), "{e}");
    let ca = ClusterCa::generate("cluster").unwrap();
    let e = RemoteStore::builder("http://127.0.0.1:1").ca_pem(ca.cert_pem()).build().unwrap_err();
    assert!(e.to_string().contains("https"), "{e}");
    let e = RemoteStore::builder("https://127.0.0.1:1").ca_pem("not pem").build().unwrap_err();
    assert!(e.to_string().contains("ca"), "{e}");
}

#[tokio::test]
async fn a_user_certificate_is_authorized_by_its_groups() {
    let ca = ClusterCa::generate("cluster").unwrap();
    let rules = Authorizer::with_builtin_roles().rule(Rule {
        subjects: vec!["group:team-a".into()],
        namespaces: vec!["team-a".into()],
        ..Rule::default()
    });
    let running = server(&ca, |b| b.authentication(Tokens::new()).authorization(rules)).await;
    let hour = Duration::from_secs(3600);
    let alice = ca.client_certificate("alice", &["team-a"], hour).unwrap();
    let viewer = ca.client_certificate("viewer", &[READERS], hour).unwrap();

    let as_alice = client(&running, &ca, Some(&alice));
    as_alice.create(thing("team-a", "mine"), &WriteOptions::default()).await.unwrap();
    let e = as_alice.create(thing("team-b", "theirs"), &WriteOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("\"alice\" cannot create Thing"), "{e}");

    let as_viewer = client(&running, &ca, Some(&viewer));
    let got = as_viewer.get(&ObjectKey::new("Thing", "team-a", "mine")).await.unwrap();
    assert_eq!(got.metadata.name, "mine");
    let e = as_viewer.create(thing("team-a", "no"), &WriteOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("\"viewer\" cannot create"), "{e}");

    // Without a certificate or a token: anonymous, and nothing is allowed.
    let anonymous = client(&running, &ca, None);
    let e = anonymous.get(&ObjectKey::new("Thing", "team-a", "mine")).await.unwrap_err();
    assert!(e.to_string().contains("system:anonymous"), "{e}");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_certificate_of_another_ca_is_refused_at_the_handshake() {
    let ca = ClusterCa::generate("cluster").unwrap();
    let other = ClusterCa::generate("someone else").unwrap();
    let running =
        server(&ca, |b| b.authentication(Tokens::new()).authorization(Authorizer::with_builtin_roles())).await;
    let forged = other.client_certificate("root", &["system:admins"], Duration::from_secs(3600)).unwrap();
    let remote = client(&running, &ca, Some(&forged));
    let e = remote.create(thing("ns", "x"), &WriteOptions::default()).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("refused the TLS handshake"), "{text}");
    running.shutdown().await.unwrap();
}
