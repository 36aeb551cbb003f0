//! Bad input never panics the server and is answered with a 4xx `Status` whose message names the
//! problem: the request decoder over 100,000 random bodies, and the whole router over random
//! requests (methods, paths, query strings, content types, bodies).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use orch_store::MemoryStore;
use orch_store::api::{ApiServer, wire};
use proptest::prelude::*;
use tower::ServiceExt;

/// Bodies near the shape of an object: JSON with the right keys and wrong values, truncated or
/// corrupted text, and plain noise.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("null".to_string()),
        Just("1".to_string()),
        Just("\"x\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        "[a-z0-9\"{}:,]{0,12}".prop_map(|s| s),
    ];
    let field = prop_oneof![
        Just("apiVersion"),
        Just("kind"),
        Just("metadata"),
        Just("spec"),
        Just("status"),
        Just("metadata\":{\"resourceVersion"),
        Just("metadata\":{\"labels"),
        Just("metadata\":{\"name"),
        Just("metadata\":{\"creationTimestamp"),
        Just("metadata\":{\"ownerReferences"),
    ];
    let object = proptest::collection::vec((field, value), 0..5).prop_map(|fields| {
        let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let mut text = format!("{{{}}}", inner.join(","));
        // Close the braces an inner `metadata":{` opened.
        let open = text.matches('{').count().saturating_sub(text.matches('}').count());
        text.push_str(&"}".repeat(open));
        text.into_bytes()
    });
    prop_oneof![
        4 => object,
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => (proptest::collection::vec(any::<u8>(), 0..64), 0usize..64).prop_map(|(mut b, cut)| {
            b.truncate(cut);
            b
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_object_decoder_refuses_with_a_reason_and_never_panics(bytes in body()) {
        match wire::decode_object(&bytes, Some("Thing")) {
            Ok(obj) => prop_assert_eq!(obj.kind, "Thing"),
            Err(e) => prop_assert!(!e.reason.is_empty()),
        }
    }
}

fn request() -> impl Strategy<Value = (Method, String, &'static str, Vec<u8>)> {
    let method = prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE)
    ];
    let segment = prop_oneof![
        Just("namespaces".to_string()),
        Just("ns".to_string()),
        Just("workloads".to_string()),
        Just("nodes".to_string()),
        Just("Thing".to_string()),
        Just("status".to_string()),
        Just("%ff%fe".to_string()),
        "[a-zA-Z0-9%._-]{0,8}",
    ];
    let path = (
        prop_oneof![Just("/apis/orch.dev/v1"), Just("/orch/v1"), Just("/orch/v1/leases"), Just("/api")],
        proptest::collection::vec(segment, 0..5),
    )
        .prop_map(
            |(prefix, segs)| if segs.is_empty() { prefix.to_string() } else { format!("{prefix}/{}", segs.join("/")) },
        );
    let query = prop_oneof![
        Just(String::new()),
        Just("?watch=maybe".to_string()),
        Just("?limit=-1".to_string()),
        Just("?labelSelector=a%20in%20(".to_string()),
        Just("?fieldSelector=spec.x%3D%3D%3D".to_string()),
        Just("?continue=garbage".to_string()),
        Just("?resourceVersion=abc".to_string()),
        Just("?resourceVersion=99999&resourceVersionMatch=Exact".to_string()),
        Just("?guard=x".to_string()),
        Just("?dryRun=All".to_string()),
        "\\?[a-zA-Z=&%0-9]{0,16}",
    ];
    let content_type = prop_oneof![
        Just("application/json"),
        Just("application/merge-patch+json"),
        Just("application/json-patch+json"),
        Just("text/plain"),
    ];
    (method, (path, query).prop_map(|(p, q)| format!("{p}{q}")), content_type, body())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_requests_get_a_status_never_a_panic_or_a_server_error((method, uri, ct, body) in request()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let app = ApiServer::new(Arc::new(MemoryStore::new())).router();
            let Ok(req) = Request::builder().method(method.clone()).uri(&uri).header("content-type", ct).body(Body::from(body)) else {
                return Ok(()); // not a URI at all: the HTTP layer refuses it before us
            };
            let resp = app.oneshot(req).await.unwrap();
            let code = resp.status();
            let is_watch = uri.contains("watch=") && code.is_success();
            let bytes = if is_watch { Default::default() } else { resp.into_body().collect().await.unwrap().to_bytes() };
            prop_assert!(!code.is_server_error(), "{method} {uri} answered {code}: {}", String::from_utf8_lossy(&bytes));
            if code.is_client_error() {
                let status: wire::Status = serde_json::from_slice(&bytes)
                    .map_err(|e| TestCaseError::fail(format!("{method} {uri}: {code} without a Status ({e}): {}", String::from_utf8_lossy(&bytes))))?;
                prop_assert!(!status.message.is_empty());
                prop_assert_eq!(status.code, code.as_u16());
            }
            Ok(())
        })?;
    }
}
