//! TLS: `RemoteStore` over https trusting the cluster CA; a server of another CA refused with
//! an error that says so; client certificates (`CN` = user, `O` = groups) authorized by their
//! groups; a client certificate of another CA refused at the handshake.

mod common;

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

#[tokio::test]
async fn a_revoked_user_certificate_is_refused_and_its_open_watch_ends() {
    use orch_store::api::Limits;
    use orch_store::api::revocation::{self, Revocation};

    let ca = ClusterCa::generate("cluster").unwrap();
    let limits = Limits { revocation_check_interval: Duration::from_millis(200), ..Limits::default() };
    let running =
        server(&ca, |b| b.authentication(Tokens::new()).authorization(Authorizer::with_builtin_roles()).limits(limits))
            .await;
    let hour = Duration::from_secs(3600);
    let admin_cert = ca.client_certificate("root", &["system:admins"], hour).unwrap();
    let alice_cert = ca.client_certificate("alice", &["system:admins"], hour).unwrap();
    let (admin, alice) = (client(&running, &ca, Some(&admin_cert)), client(&running, &ca, Some(&alice_cert)));
    alice.create(thing("ns", "a"), &WriteOptions::default()).await.unwrap();
    let req = orch_core::WatchRequest {
        selection: orch_core::Selection::kind("Thing"),
        from_revision: None,
        progress_interval: None,
    };
    let mut watch = alice.watch(&req).await.unwrap();

    // Revoked by its serial in the form tools print it (upper case, colons).
    let printed = alice_cert.serial.as_bytes().chunks(2).map(|p| std::str::from_utf8(p).unwrap().to_uppercase());
    let printed: Vec<String> = printed.collect();
    let revocation = Revocation { user: Some("alice".into()), not_after: None };
    assert!(revocation::revoke_certificate(&admin, &printed.join(":"), revocation.clone()).await.unwrap());
    assert!(!revocation::revoke_certificate(&admin, &alice_cert.serial, revocation).await.unwrap(), "once");
    let e = alice.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap_err().to_string();
    assert!(e.contains("revoked") && e.contains(&alice_cert.serial), "{e}");
    // The same user with another certificate, and other users, are not affected.
    let alice_again = ca.client_certificate("alice", &["system:admins"], hour).unwrap();
    client(&running, &ca, Some(&alice_again)).get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap();
    admin.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap();
    let listed = revocation::revoked_certificates(&admin).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0.as_str(), listed[0].1.user.as_deref()), (alice_cert.serial.as_str(), Some("alice")));

    // The watch opened before ends; its reconnection is refused.
    let end = common::watch_end(&mut watch, Duration::from_secs(20)).await;
    if let Some(e) = end {
        assert!(e.contains("revoked"), "{e}");
    }

    // Only admins revoke; a node's certificate is revoked with its node; a bad serial is refused.
    let reader_cert = ca.client_certificate("viewer", &[READERS], hour).unwrap();
    let reader = client(&running, &ca, Some(&reader_cert));
    let r = Revocation { user: None, not_after: None };
    let e = revocation::revoke_certificate(&reader, &admin_cert.serial, r.clone()).await.unwrap_err().to_string();
    assert!(e.contains("cannot create CertificateRevocation"), "{e}");
    let node = Revocation { user: Some("system:node:n1".into()), not_after: None };
    let e = revocation::revoke_certificate(&admin, "0a1b", node).await.unwrap_err().to_string();
    assert!(e.contains("orch node revoke n1"), "{e}");
    let e = revocation::revoke_certificate(&admin, "0a:zz", r).await.unwrap_err().to_string();
    assert!(e.contains("serial") && e.contains("'z' is not a hexadecimal digit"), "{e}");
    admin.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap();
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn revocations_of_expired_certificates_are_dropped() {
    use orch_store::api::revocation::{self, Revocation};
    let store = MemoryStore::new();
    let now = orch_core::Clock::now(&orch_core::SystemClock);
    let past = Revocation { user: Some("old".into()), not_after: Some(now.as_millis() - 1_000) };
    let future = Revocation { user: Some("new".into()), not_after: Some(now.as_millis() + 3_600_000) };
    let forever = Revocation { user: None, not_after: None };
    assert!(revocation::revoke_certificate(&store, "01", past).await.unwrap());
    assert!(revocation::revoke_certificate(&store, "02", future).await.unwrap());
    assert!(revocation::revoke_certificate(&store, "3", forever).await.unwrap());
    let serials: Vec<String> =
        revocation::revoked_certificates(&store).await.unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(serials, ["02", "03"], "the expired one is dropped; an odd digit count gets its leading zero");
    let later = orch_core::Timestamp(now.as_millis() + 7_200_000);
    assert_eq!(revocation::drop_expired(&store, later).await.unwrap(), 1);
    assert_eq!(revocation::revoked_certificates(&store).await.unwrap().len(), 1, "kept until deleted");
}
