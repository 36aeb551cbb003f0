//! Bearer tokens kept in the store (`api::bearer`): an admin makes one through the API and it
//! works at once, with the user's groups deciding what it may do; the store holds its hash, not
//! the token; revoking it refuses its next request and ends the watch opened with it, no restart;
//! an expired token is refused; only admins make tokens; bad input names the field.

mod common;

use std::sync::Arc;
use std::time::Duration;

use orch_core::{
    Clock, DynamicObject, ObjectKey, ObjectMeta, Selection, Store, SystemClock, WatchRequest, WriteOptions,
};
use orch_store::MemoryStore;
use orch_store::api::admission::UserInfo;
use orch_store::api::auth::{ADMINS, READERS};
use orch_store::api::bearer::{self, BEARER_TOKEN_KIND};
use orch_store::api::{ApiServer, Authorizer, Limits, RemoteStore, Rule, RunningServer, Tokens};

const ADMIN_TOKEN: &str = "the-admin-token-from-the-file";

fn thing(ns: &str, name: &str) -> DynamicObject {
    DynamicObject::new("Thing", ObjectMeta::namespaced(ns, name))
}

async fn server() -> RunningServer {
    replica(Arc::new(MemoryStore::new())).await
}

/// A server over `store`: several over one store are replicas of one control plane.
async fn replica(store: Arc<dyn Store>) -> RunningServer {
    let tokens = Tokens::new().with(ADMIN_TOKEN, UserInfo { name: "root".into(), groups: vec![ADMINS.into()] });
    let limits = Limits { revocation_check_interval: Duration::from_millis(200), ..Limits::default() };
    ApiServer::builder(store)
        .authentication(tokens)
        .authorization(Authorizer::with_builtin_roles())
        .limits(limits)
        .build()
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn client(running: &RunningServer, token: &str) -> RemoteStore {
    RemoteStore::builder(running.url()).bearer_token(token).reconnect_for(Duration::from_millis(100)).build().unwrap()
}

fn is_unauthorized(e: &orch_core::Error) -> bool {
    e.to_string().contains("the bearer token is not valid")
}

#[tokio::test]
async fn a_token_made_through_the_api_works_at_once_and_revoking_it_shuts_it_out_and_ends_its_watch() {
    let running = server().await;
    let admin = client(&running, ADMIN_TOKEN);
    admin.create(thing("ns", "a"), &WriteOptions::default()).await.unwrap();
    let now = SystemClock.now();
    let made = bearer::create_token(&admin, "bob", &[READERS.to_string()], None, now).await.unwrap();
    assert_eq!(made.id, bearer::token_id(&made.token));

    // At once, with the reader's rights and no more.
    let bob = client(&running, &made.token);
    bob.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap();
    let e = bob.create(thing("ns", "b"), &WriteOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("bob") && e.to_string().contains("cannot create Thing"), "{e}");
    let e = bearer::create_token(&bob, "bob", &[ADMINS.to_string()], None, now).await.unwrap_err();
    assert!(e.to_string().contains("cannot create BearerToken"), "a reader makes no token: {e}");
    let e = bearer::list_tokens(&bob).await.unwrap_err();
    assert!(e.to_string().contains("cannot list BearerToken"), "the read-only role leaves tokens out: {e}");

    // The store keeps its hash under its id, never the token.
    let stored = admin.get(&ObjectKey::new(BEARER_TOKEN_KIND, "", &made.id)).await.unwrap();
    let text = serde_json::to_string(&stored.spec).unwrap();
    assert!(!text.contains(&made.token) && text.contains(&made.id), "{text}");
    let listed = bearer::list_tokens(&admin).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0.as_str(), listed[0].1.user.as_str()), (made.id.as_str(), "bob"));

    let req = WatchRequest { selection: Selection::kind("Thing"), from_revision: None, progress_interval: None };
    let mut watch = bob.watch(&req).await.unwrap();

    assert!(bearer::revoke_token(&admin, &made.id).await.unwrap());
    assert!(!bearer::revoke_token(&admin, &made.id).await.unwrap(), "once");
    // Refused as soon as the server's cache of tokens has the deletion (its watch event).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match bob.get(&ObjectKey::new("Thing", "ns", "a")).await {
            Err(e) if is_unauthorized(&e) => break,
            other => assert!(std::time::Instant::now() < deadline, "still accepted: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The watch opened with it ends (its reconnection is refused).
    let end = common::watch_end(&mut watch, Duration::from_secs(20)).await;
    if let Some(e) = end {
        assert!(e.contains("not valid"), "{e}");
    }
    // The file's token is not touched.
    admin.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap();
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn expired_tokens_are_refused_and_dropped_and_a_users_tokens_go_together() {
    let running = server().await;
    let admin = client(&running, ADMIN_TOKEN);
    admin.create(thing("ns", "a"), &WriteOptions::default()).await.unwrap();
    let now = SystemClock.now();
    let brief =
        bearer::create_token(&admin, "carol", &[READERS.into()], Some(now.plus(Duration::from_millis(1500))), now)
            .await
            .unwrap();
    let carol = client(&running, &brief.token);
    carol.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let e = carol.get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap_err();
    assert!(is_unauthorized(&e), "expired: {e}");
    // The next token made drops it.
    let now = SystemClock.now();
    let first = bearer::create_token(&admin, "dave", &[READERS.into()], None, now).await.unwrap();
    let second = bearer::create_token(&admin, "dave", &[], None, now).await.unwrap();
    let ids: Vec<String> = bearer::list_tokens(&admin).await.unwrap().into_iter().map(|(id, _)| id).collect();
    assert!(!ids.contains(&brief.id) && ids.len() == 2, "{ids:?}");

    let mut revoked = bearer::revoke_user(&admin, "dave").await.unwrap();
    revoked.sort();
    let mut expected = vec![first.id, second.id];
    expected.sort();
    assert_eq!(revoked, expected);
    for t in [&first.token, &second.token] {
        let e = client(&running, t).get(&ObjectKey::new("Thing", "ns", "a")).await.unwrap_err();
        assert!(is_unauthorized(&e), "{e}");
    }
    assert!(bearer::revoke_user(&admin, "dave").await.unwrap().is_empty());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_tokens_and_ids_are_refused_naming_the_field() {
    let running = server().await;
    let admin = client(&running, ADMIN_TOKEN);
    let now = SystemClock.now();
    let e = bearer::create_token(&admin, "two words", &[], None, now).await.unwrap_err().to_string();
    assert!(e.contains("spec.user") && e.contains("spaces"), "{e}");
    let e = bearer::create_token(&admin, "erin", &["a,b".into()], None, now).await.unwrap_err().to_string();
    assert!(e.contains("spec.groups[0]"), "{e}");
    let past = Some(now.plus(Duration::ZERO));
    let e = bearer::create_token(&admin, "erin", &[], past, now).await.unwrap_err().to_string();
    assert!(e.contains("spec.expires") && e.contains("not in the future"), "{e}");
    let e = bearer::revoke_token(&admin, "not-an-id").await.unwrap_err().to_string();
    assert!(e.contains("id") && e.contains("neither a token id"), "{e}");
    // A random token is refused as the file's unknown tokens are.
    let e = client(&running, "orch-0000").current_revision().await.unwrap_err();
    assert!(is_unauthorized(&e), "{e}");
    assert!(bearer::list_tokens(&admin).await.unwrap().is_empty(), "nothing half-made");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn replicas_over_one_store_accept_a_new_token_at_once_and_the_revoking_one_refuses_it_at_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (a, b) = (replica(store.clone()).await, replica(store).await);
    let admin_a = client(&a, ADMIN_TOKEN);
    admin_a.create(thing("ns", "x"), &WriteOptions::default()).await.unwrap();
    let now = SystemClock.now();
    // Each replica's caches are started and listed (a stored token was looked up there).
    let warm = bearer::create_token(&admin_a, "warm", &[READERS.into()], None, now).await.unwrap();
    for r in [&a, &b] {
        client(r, &warm.token).get(&ObjectKey::new("Thing", "ns", "x")).await.unwrap();
    }

    // Made on one replica, good on the other at once (its cache may not have it yet: the store
    // is asked).
    let made = bearer::create_token(&admin_a, "erin", &[READERS.into()], None, now).await.unwrap();
    client(&b, &made.token).get(&ObjectKey::new("Thing", "ns", "x")).await.unwrap();
    client(&a, &made.token).get(&ObjectKey::new("Thing", "ns", "x")).await.unwrap();

    // Revoked on one replica: refused there on the very next request; on the other as soon as
    // its watch has the deletion.
    assert!(bearer::revoke_token(&admin_a, &made.id).await.unwrap());
    let e = client(&a, &made.token).get(&ObjectKey::new("Thing", "ns", "x")).await.unwrap_err();
    assert!(is_unauthorized(&e), "the revoking replica: {e}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client(&b, &made.token).get(&ObjectKey::new("Thing", "ns", "x")).await {
            Err(e) if is_unauthorized(&e) => break,
            other => assert!(std::time::Instant::now() < deadline, "still accepted: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A rule that lets a group write tokens lets its members make their own, not tokens that are
/// someone else's or carry a group they lack: that takes `system:admins`. Token objects written
/// straight through the API (not by `create_token`) are checked by the server.
#[tokio::test]
async fn writing_tokens_never_gives_more_than_the_writer_has() {
    let tokens = Tokens::new()
        .with(ADMIN_TOKEN, UserInfo { name: "root".into(), groups: vec![ADMINS.into()] })
        .with("carols-token", UserInfo { name: "carol".into(), groups: vec!["issuers".into()] });
    let issuers = Rule {
        subjects: vec!["group:issuers".into()],
        kinds: vec![BEARER_TOKEN_KIND.into()],
        verbs: vec!["create".into(), "update".into(), "patch".into(), "get".into(), "list".into(), "delete".into()],
        ..Rule::default()
    };
    let running = ApiServer::builder(Arc::new(MemoryStore::new()))
        .authentication(tokens)
        .authorization(Authorizer::with_builtin_roles().rule(issuers))
        .build()
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (admin, carol) = (client(&running, ADMIN_TOKEN), client(&running, "carols-token"));
    let now = SystemClock.now();

    let e = bearer::create_token(&carol, "root", &[ADMINS.to_string()], None, now).await.unwrap_err().to_string();
    assert!(e.contains("spec.user") && e.contains("only members of system:admins"), "{e}");
    let e = bearer::create_token(&carol, "carol", &[ADMINS.to_string()], None, now).await.unwrap_err().to_string();
    assert!(e.contains("spec.groups[0]") && e.contains("not in this group"), "{e}");
    assert!(bearer::list_tokens(&admin).await.unwrap().is_empty(), "nothing made");

    // Her own token, with her own group, works.
    let own = bearer::create_token(&carol, "carol", &["issuers".to_string()], None, now).await.unwrap();
    assert_eq!(bearer::list_tokens(&client(&running, &own.token)).await.unwrap().len(), 1, "it authenticates her");
    // Nor can she turn it into someone else's.
    let key = ObjectKey::new(BEARER_TOKEN_KIND, "", &own.id);
    let mut stored = (*carol.get(&key).await.unwrap()).clone();
    let mut spec: bearer::BearerToken = stored.spec.decode().unwrap();
    spec.user = "root".into();
    stored.spec = orch_core::RawJson::encode(&spec).unwrap();
    let e = carol.update(stored, &WriteOptions::default()).await.unwrap_err().to_string();
    assert!(e.contains("spec.user"), "{e}");
    assert_eq!(bearer::list_tokens(&admin).await.unwrap()[0].1.user, "carol", "unchanged");

    // An admin makes anyone's; a token object that is not a token is refused, naming the field.
    bearer::create_token(&admin, "dave", &[READERS.to_string()], None, now).await.unwrap();
    let bad = DynamicObject::new(BEARER_TOKEN_KIND, ObjectMeta::named("0123456789abcdef0123456789abcdef"))
        .with_spec(orch_core::RawJson::parse(r#"{"user":"eve","sha256":"nope"}"#).unwrap());
    let e = admin.create(bad, &WriteOptions::default()).await.unwrap_err().to_string();
    assert!(e.contains("spec.sha256") && e.contains("64 lowercase hex digits"), "{e}");
    assert_eq!(bearer::list_tokens(&admin).await.unwrap().len(), 2);
    running.shutdown().await.unwrap();
}
