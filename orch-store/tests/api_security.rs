//! Authentication and authorization: the matrix of verbs and kinds for an admin, a read-only
//! user, a user with a namespace rule and an anonymous client; a bad token refused; the audit
//! log of every decision, with no token in it.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use orch_core::Store;
use orch_store::MemoryStore;
use orch_store::api::auth::{ADMINS, READERS};
use orch_store::api::{ApiServer, AuditLog, Authorizer, Rule, Tokens, UserInfo};
use serde_json::{Value, json};
use tower::ServiceExt;

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "reader-token-0123456789";
const TEAM: &str = "team-token-0123456789";

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn app(audit: Shared) -> Router {
    let user = |name: &str, group: &str| UserInfo { name: name.into(), groups: vec![group.into()] };
    let tokens = Tokens::new()
        .with(ADMIN, user("root", ADMINS))
        .with(READER, user("viewer", READERS))
        .with(TEAM, user("alice", "team-a"));
    let rules = Authorizer::with_builtin_roles().rule(Rule {
        subjects: vec!["group:team-a".into()],
        namespaces: vec!["team-a".into()],
        ..Rule::default()
    });
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    ApiServer::builder(store)
        .authentication(tokens)
        .authorization(rules)
        .audit(AuditLog::writer(audit))
        .build()
        .router()
}

async fn call(
    app: &Router,
    token: Option<&str>,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri).header("content-type", "application/merge-patch+json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let code = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn workload(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "orch.dev/v1", "kind": "Workload", "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [{"name": "main", "command": ["sleep", "1"]}]}})
}

/// Every verb on a namespace's workloads, by who, and whether it is allowed.
async fn verbs(app: &Router, token: Option<&str>, ns: &str, n: usize) -> Vec<(&'static str, StatusCode)> {
    let base = format!("/apis/orch.dev/v1/namespaces/{ns}/workloads");
    let name = format!("w{n}");
    let one = format!("{base}/{name}");
    vec![
        ("create", call(app, token, Method::POST, &base, Some(workload(ns, &name))).await.0),
        ("get", call(app, token, Method::GET, &one, None).await.0),
        ("list", call(app, token, Method::GET, &base, None).await.0),
        ("patch", call(app, token, Method::PATCH, &one, Some(json!({"metadata": {"labels": {"x": "y"}}}))).await.0),
        ("delete", call(app, token, Method::DELETE, &one, None).await.0),
    ]
}

#[tokio::test]
async fn each_subject_gets_what_its_rules_allow_and_nothing_else() {
    let audit = Shared::default();
    let app = app(audit.clone());
    // The admin can do everything (the reader's reads below need objects to exist).
    call(
        &app,
        Some(ADMIN),
        Method::POST,
        "/apis/orch.dev/v1/namespaces/team-a/workloads",
        Some(workload("team-a", "seed")),
    )
    .await;
    let admin = verbs(&app, Some(ADMIN), "team-b", 0).await;
    assert!(admin.iter().all(|(_, c)| c.is_success()), "{admin:?}");
    // The read-only user reads, and is refused every write.
    let (code, _) =
        call(&app, Some(READER), Method::GET, "/apis/orch.dev/v1/namespaces/team-a/workloads/seed", None).await;
    assert_eq!(code, StatusCode::OK);
    for (verb, code) in verbs(&app, Some(READER), "team-a", 1).await {
        let expected = if matches!(verb, "get") {
            StatusCode::NOT_FOUND
        } else if verb == "list" {
            StatusCode::OK
        } else {
            StatusCode::FORBIDDEN
        };
        assert_eq!(code, expected, "reader {verb}");
    }
    // A team's user does everything in its namespace, nothing in another.
    assert!(verbs(&app, Some(TEAM), "team-a", 2).await.iter().all(|(_, c)| c.is_success()));
    assert!(verbs(&app, Some(TEAM), "team-b", 3).await.iter().all(|(_, c)| *c == StatusCode::FORBIDDEN));
    let (code, st) = call(&app, Some(TEAM), Method::GET, "/apis/orch.dev/v1/nodes", None).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(st["message"].as_str().unwrap().contains("cannot list Node"), "{st}");
    // Anonymous: denied by default.
    assert!(verbs(&app, None, "team-a", 4).await.iter().all(|(_, c)| *c == StatusCode::FORBIDDEN));
    let (code, _) = call(&app, None, Method::GET, "/orch/v1/revision", None).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    // A token the server does not know: 401, whatever it asks.
    let (code, st) = call(&app, Some("forged-token"), Method::GET, "/apis/orch.dev/v1/nodes", None).await;
    assert_eq!((code, st["reason"].clone()), (StatusCode::UNAUTHORIZED, json!("Unauthorized")));

    // The audit log: one JSON line per decision, with who, what and the verdict; no token.
    let text = String::from_utf8(audit.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["user"] == "viewer" && l["verb"] == "delete" && l["allowed"] == false));
    assert!(
        lines.iter().any(|l| l["user"] == "alice"
            && l["namespace"] == "team-a"
            && l["verb"] == "create"
            && l["allowed"] == true)
    );
    assert!(lines.iter().any(|l| l["user"] == "system:anonymous" && l["allowed"] == false));
    for secret in [ADMIN, READER, TEAM, "forged-token"] {
        assert!(!text.contains(secret), "the audit log holds a token");
    }
}

#[test]
fn token_files_hold_hashes_not_tokens() {
    let (token, line) = Tokens::generate("alice", &["team-a", READERS]);
    assert!(!line.contains(&token), "{line}");
    let tokens = Tokens::parse(&format!("# users\n{line}\n")).unwrap();
    let user = tokens.authenticate(&token).expect("the token authenticates");
    assert_eq!(user.name, "alice");
    assert_eq!(user.groups, vec!["team-a".to_string(), READERS.to_string()]);
    assert!(tokens.authenticate("orch-wrong").is_none());
    let e = Tokens::parse("nothex alice").unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
}
