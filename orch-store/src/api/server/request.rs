//! What a request names: its path (a collection, an object, or one of orch's own endpoints) and
//! the query parameters the server reads.

use super::*;

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// A collection (`namespace` `None`: every namespace, or a cluster-scoped kind).
    Collection { kind: String, namespace: Option<String> },
    /// One object, or its status.
    Object { key: ObjectKey, status: bool },
    /// `/orch/v1/revision`.
    Revision,
    /// `/orch/v1/compact`.
    Compact,
    /// `/orch/v1/leases`.
    Leases,
    /// `/orch/v1/leases/{id}`.
    Lease(u64),
    /// `/orch/v1/batch/update`.
    BatchUpdate,
    /// `/orch/v1/join`: a node's join token and signing request.
    Join,
    /// `/orch/v1/certificates/renew`: a node's new signing request.
    Renew,
}

fn not_found(path: &str) -> Status {
    Status::failure(404, "NotFound", format!("the server has no resource at {path}"))
}

pub(super) fn parse_target(kinds: &Kinds, path: &str) -> Result<Target, Status> {
    if let Some(rest) = path.strip_prefix(wire::ORCH_PREFIX) {
        return match rest {
            "/revision" => Ok(Target::Revision),
            "/compact" => Ok(Target::Compact),
            "/leases" => Ok(Target::Leases),
            "/batch/update" => Ok(Target::BatchUpdate),
            "/join" => Ok(Target::Join),
            "/certificates/renew" => Ok(Target::Renew),
            _ => match rest.strip_prefix("/leases/") {
                Some(id) => id
                    .parse()
                    .map(Target::Lease)
                    .map_err(|_| Status::bad_request(format!("lease id must be a number, not {id:?}"))),
                None => Err(not_found(path)),
            },
        };
    }
    let Some(rest) = path.strip_prefix(wire::GROUP_PREFIX).and_then(|r| r.strip_prefix('/')) else {
        return Err(not_found(path));
    };
    let mut segs = Vec::new();
    for s in rest.split('/') {
        segs.push(decode_segment(s).ok_or_else(|| Status::bad_request(format!("path segment {s:?} is not UTF-8")))?);
    }
    let (namespace, segs) = match segs.as_slice() {
        [ns_word, ns, rest @ ..] if ns_word == "namespaces" && !rest.is_empty() => (Some(ns.clone()), rest.to_vec()),
        _ => (None, segs),
    };
    let (resource, name, status) = match segs.as_slice() {
        [r] => (r.clone(), None, false),
        [r, n] => (r.clone(), Some(n.clone()), false),
        [r, n, sub] if sub == "status" => (r.clone(), Some(n.clone()), true),
        _ => return Err(not_found(path)),
    };
    if resource.is_empty() {
        return Err(not_found(path));
    }
    if let Some(info) = kinds.lookup(&resource) {
        let ns_given = namespace.is_some();
        if !info.namespaced && ns_given {
            return Err(not_found(path));
        }
        if info.namespaced && name.is_some() && !ns_given {
            return Err(Status::failure(
                404,
                "NotFound",
                format!("{} is namespaced: name it under /namespaces/{{namespace}}/", info.kind),
            ));
        }
    }
    let kind = kinds.resolve(&resource);
    Ok(match name {
        None => Target::Collection { kind, namespace },
        Some(name) => Target::Object { key: ObjectKey::new(kind, namespace.unwrap_or_default(), name), status },
    })
}

/// The query parameters the server reads; others are ignored, as Kubernetes does.
#[derive(Debug, Default)]
pub(super) struct Query {
    pub(super) label_selector: Option<String>,
    pub(super) field_selector: Option<String>,
    pub(super) limit: Option<usize>,
    pub(super) continue_token: Option<String>,
    pub(super) resource_version: Option<String>,
    pub(super) resource_version_match: Option<String>,
    pub(super) watch: bool,
    pub(super) allow_bookmarks: bool,
    pub(super) progress_interval: Option<Duration>,
    pub(super) timeout: Option<Duration>,
    pub(super) dry_run: bool,
    pub(super) guard: Option<Guard>,
}

fn bool_param(name: &str, v: &str) -> Result<bool, Status> {
    match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(Status::bad_request(format!("query parameter {name}: must be true or false, not {v:?}"))),
    }
}

fn number_param(name: &str, v: &str) -> Result<u64, Status> {
    v.parse().map_err(|_| Status::bad_request(format!("query parameter {name}: must be a whole number, not {v:?}")))
}

/// Reads `Kind/namespace/name@resourceVersion` (the namespace may be empty).
fn parse_guard(v: &str) -> Result<Guard, Status> {
    let bad =
        || Status::bad_request(format!("query parameter guard: expected kind/namespace/name@revision, not {v:?}"));
    let (path, rv) = v.rsplit_once('@').ok_or_else(bad)?;
    let mut parts = path.splitn(3, '/');
    let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    Ok(Guard { key: ObjectKey::new(kind, ns, name), resource_version: rv.parse().map_err(|_| bad())? })
}

pub(super) fn parse_query(raw: Option<&str>, limits: &Limits) -> Result<Query, Status> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| Status::bad_request(format!("query string: {e}")))?;
    let mut q = Query::default();
    for (k, v) in pairs {
        match k.as_str() {
            "labelSelector" | "fieldSelector" => {
                if v.len() > limits.max_selector_bytes {
                    return Err(Status::bad_request(format!(
                        "query parameter {k}: {} bytes, more than the limit of {}",
                        v.len(),
                        limits.max_selector_bytes
                    )));
                }
                if k == "labelSelector" { q.label_selector = Some(v) } else { q.field_selector = Some(v) }
            }
            "limit" => {
                let n = number_param(&k, &v)?;
                // Kubernetes reads 0 as "no limit".
                q.limit = (n > 0).then_some(n as usize);
            }
            "orchLimit" => q.limit = Some(number_param(&k, &v)? as usize),
            "continue" => q.continue_token = (!v.is_empty()).then_some(v),
            "resourceVersion" => q.resource_version = Some(v),
            "resourceVersionMatch" => q.resource_version_match = Some(v),
            "watch" => q.watch = bool_param(&k, &v)?,
            "allowWatchBookmarks" => q.allow_bookmarks = bool_param(&k, &v)?,
            "progressIntervalMs" => q.progress_interval = Some(Duration::from_millis(number_param(&k, &v)?.max(1))),
            "timeoutSeconds" => q.timeout = Some(Duration::from_secs(number_param(&k, &v)?)),
            "timeout" => {}
            "dryRun" => q.dry_run = v == "All" || bool_param(&k, &v).unwrap_or(false),
            "guard" => q.guard = Some(parse_guard(&v)?),
            _ => {}
        }
    }
    Ok(q)
}

pub(super) fn selection(kind: &str, namespace: Option<&str>, q: &Query) -> Result<Selection, Status> {
    let mut sel = Selection::kind(kind);
    sel.namespace = namespace.map(str::to_string);
    if let Some(text) = &q.label_selector {
        sel.labels = LabelSelector::parse(text).map_err(|e| Status::from_error(&e))?;
    }
    if let Some(text) = &q.field_selector {
        sel.fields = FieldSelector::parse(text).map_err(|e| Status::from_error(&e))?;
    }
    Ok(sel)
}

pub(super) fn revision_param(q: &Query) -> Result<Option<u64>, Status> {
    match q.resource_version.as_deref() {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            Status::bad_request(format!("query parameter resourceVersion: must be a revision, not {v:?}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections_objects_and_status() {
        let kinds = Kinds::default();
        assert_eq!(
            parse_target(&kinds, "/apis/orch.dev/v1/namespaces/team-a/workloads").unwrap(),
            Target::Collection { kind: "Workload".into(), namespace: Some("team-a".into()) }
        );
        assert_eq!(
            parse_target(&kinds, "/apis/orch.dev/v1/namespaces/team-a/wl/web/status").unwrap(),
            Target::Object { key: ObjectKey::new("Workload", "team-a", "web"), status: true }
        );
        assert_eq!(
            parse_target(&kinds, "/apis/orch.dev/v1/nodes/n1").unwrap(),
            Target::Object { key: ObjectKey::new("Node", "", "n1"), status: false }
        );
        assert_eq!(
            parse_target(&kinds, "/apis/orch.dev/v1/namespaces/x/Thing%20y").unwrap(),
            Target::Collection { kind: "Thing y".into(), namespace: Some("x".into()) }
        );
        assert_eq!(parse_target(&kinds, "/apis/orch.dev/v1/namespaces/x/nodes").unwrap_err().code, 404);
        assert_eq!(parse_target(&kinds, "/apis/orch.dev/v1/workloads/web").unwrap_err().code, 404);
        assert_eq!(parse_target(&kinds, "/apis/orch.dev/v1/a/b/c/d").unwrap_err().code, 404);
        assert_eq!(parse_target(&kinds, "/orch/v1/leases/12").unwrap(), Target::Lease(12));
        assert_eq!(parse_target(&kinds, "/orch/v1/leases/x").unwrap_err().code, 400);
    }

    #[test]
    fn query_parameters_are_checked_by_name() {
        let limits = Limits::default();
        let e = parse_query(Some("limit=ten"), &limits).unwrap_err();
        assert!(e.message.contains("limit"), "{}", e.message);
        let e = parse_query(Some("watch=maybe"), &limits).unwrap_err();
        assert!(e.message.contains("watch"), "{}", e.message);
        let e = parse_query(Some("guard=nonsense"), &limits).unwrap_err();
        assert!(e.message.contains("guard"), "{}", e.message);
        let big = format!("labelSelector={}", "a".repeat(limits.max_selector_bytes + 1));
        let e = parse_query(Some(&big), &limits).unwrap_err();
        assert!(e.message.contains("labelSelector"), "{}", e.message);
        let q = parse_query(Some("guard=Lock%2Fns%2Fl%407&limit=0&dryRun=All"), &limits).unwrap();
        assert_eq!(q.guard, Some(Guard { key: ObjectKey::new("Lock", "ns", "l"), resource_version: 7 }));
        assert_eq!(q.limit, None);
        assert!(q.dry_run);
    }
}
