//! [`Api<K>`]: typed, validated access to one kind over any [`Store`].

use std::marker::PhantomData;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

use crate::backoff::{Attempts, Backoff};
use crate::error::{Error, Result};
use crate::meta::ObjectMeta;
use crate::object::{DynamicObject, Object, ObjectKey, Resource, Scope};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    DeleteOptions, DeleteOutcome, Guard, ListRequest, Selection, Store, WatchEvent, WatchRequest, WriteOptions,
};

/// How many times a patch re-reads and retries after losing a compare-and-swap race.
const PATCH_ATTEMPTS: usize = 16;

/// Attempts of [`Api::retry_on_conflict`], and the wait before the first retry (doubled before
/// each next one): a few quick tries, as client-go's `RetryOnConflict` makes.
const CONFLICT_ATTEMPTS: u32 = 5;
const CONFLICT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);

/// Typed access to the objects of kind `K`, in one namespace or across all of them.
///
/// Writes are validated first (`K::validate` plus metadata rules), so an invalid object never
/// reaches the store: the error names each bad field.
///
/// ```no_run
/// # async fn demo(store: std::sync::Arc<dyn orch_core::Store>) -> orch_core::Result<()> {
/// use orch_core::{Api, Object, ObjectMeta, kinds::Node};
/// let nodes: Api<Node> = Api::all(store);
/// let n = nodes.create(&Object::new(ObjectMeta::named("node-1"), Node::default())).await?;
/// assert_eq!(n.metadata.generation, 1);
/// # Ok(()) }
/// ```
pub struct Api<K> {
    store: Arc<dyn Store>,
    namespace: Option<String>,
    /// Attached to every write: the fencing token of the leader this Api acts for.
    guard: Option<Guard>,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Api<K> {
    fn clone(&self) -> Self {
        Api {
            store: self.store.clone(),
            namespace: self.namespace.clone(),
            guard: self.guard.clone(),
            _kind: PhantomData,
        }
    }
}

impl<K> std::fmt::Debug for Api<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("kind", &std::any::type_name::<K>()).field("namespace", &self.namespace).finish()
    }
}

/// Which objects a typed list or watch covers, beyond kind and namespace.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// Label conditions.
    pub labels: LabelSelector,
    /// Field conditions.
    pub fields: FieldSelector,
    /// At most this many items per page.
    pub limit: Option<usize>,
    /// The previous page's continue token.
    pub continue_token: Option<String>,
}

/// One page of typed objects.
#[derive(Debug, Clone)]
pub struct ObjectList<K: Resource> {
    /// The objects.
    pub items: Vec<Object<K>>,
    /// The revision the page reflects.
    pub revision: u64,
    /// Token for the next page, if any.
    pub continue_token: Option<String>,
}

/// A typed watch event.
#[derive(Debug, Clone)]
pub enum Event<K: Resource> {
    /// Created, or started matching.
    Added(Object<K>),
    /// Changed.
    Modified(Object<K>),
    /// Deleted, or stopped matching.
    Deleted(Object<K>),
    /// Everything up to this revision has been delivered.
    Progress(u64),
}

/// What a typed delete did.
#[derive(Debug, Clone)]
pub enum Deleted<K: Resource> {
    /// The object is gone; its last state.
    Gone(Object<K>),
    /// Finalizers hold it back; it is marked for deletion.
    Pending(Object<K>),
}

impl<K: Resource> Api<K> {
    /// Access to the objects of one namespace (for namespaced kinds).
    pub fn namespaced(store: Arc<dyn Store>, namespace: impl Into<String>) -> Self {
        Api { store, namespace: Some(namespace.into()), guard: None, _kind: PhantomData }
    }

    /// Access to cluster-scoped objects, or to every namespace of a namespaced kind (reads only
    /// unless the object names its namespace).
    pub fn all(store: Arc<dyn Store>) -> Self {
        Api { store, namespace: None, guard: None, _kind: PhantomData }
    }

    /// Makes every write through this Api carry `guard` (a leader's fencing token), so the store
    /// refuses them with `PreconditionFailed` once the guard no longer holds.
    pub fn fenced(mut self, guard: Option<Guard>) -> Self {
        self.guard = guard;
        self
    }

    /// The fencing token every write through this Api carries, if any.
    pub fn guard(&self) -> Option<&Guard> {
        self.guard.as_ref()
    }

    /// The guard a write carries: the Api's fencing token, or the caller's, never one replacing
    /// the other (that would let a fenced Api write without its leader's token).
    fn guard_for(&self, requested: Option<&Guard>) -> Result<Option<Guard>> {
        match (&self.guard, requested) {
            (Some(mine), Some(theirs)) if mine != theirs => Err(Error::invalid(
                K::KIND,
                "guard",
                "this Api is fenced by a leader's token; it cannot carry a second guard",
            )),
            (Some(mine), _) => Ok(Some(mine.clone())),
            (None, theirs) => Ok(theirs.cloned()),
        }
    }

    fn write_options(&self, opts: &WriteOptions) -> Result<WriteOptions> {
        Ok(WriteOptions { guard: self.guard_for(opts.guard.as_ref())? })
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn key(&self, name: &str) -> Result<ObjectKey> {
        let ns = match (K::SCOPE, &self.namespace) {
            (Scope::Cluster, _) => String::new(),
            (Scope::Namespaced, Some(ns)) => ns.clone(),
            (Scope::Namespaced, None) => {
                return Err(Error::invalid(
                    K::KIND,
                    "metadata.namespace",
                    "required: use Api::namespaced for a namespaced kind",
                ));
            }
        };
        Ok(ObjectKey::new(K::KIND, ns, name))
    }

    /// Fills in the namespace from the Api and checks the object belongs here.
    fn place(&self, obj: &Object<K>) -> Result<Object<K>> {
        let mut obj = obj.clone();
        self.place_meta(&mut obj.metadata)?;
        obj.validate()?;
        Ok(obj)
    }

    /// Puts the metadata in this Api's namespace, or refuses it when it names another.
    fn place_meta(&self, meta: &mut ObjectMeta) -> Result<()> {
        match K::SCOPE {
            Scope::Cluster => {
                if !meta.namespace.is_empty() {
                    return Err(Error::invalid(
                        K::KIND,
                        "metadata.namespace",
                        "must be empty for a cluster-scoped kind",
                    ));
                }
            }
            Scope::Namespaced => match (&self.namespace, meta.namespace.is_empty()) {
                (Some(ns), true) => meta.namespace = ns.clone(),
                (Some(ns), false) if *ns != meta.namespace => {
                    return Err(Error::invalid(
                        K::KIND,
                        "metadata.namespace",
                        format!("{:?} does not match the Api's namespace {ns:?}", meta.namespace),
                    ));
                }
                (None, true) => {
                    return Err(Error::invalid(K::KIND, "metadata.namespace", "required for a namespaced kind"));
                }
                _ => {}
            },
        }
        Ok(())
    }

    fn selection(&self, p: &ListParams) -> Selection {
        Selection {
            kind: K::KIND.to_string(),
            namespace: self.namespace.clone().filter(|_| K::SCOPE == Scope::Namespaced),
            labels: p.labels.clone(),
            fields: p.fields.clone(),
        }
    }

    /// Reads one object.
    pub async fn get(&self, name: &str) -> Result<Object<K>> {
        Object::from_dynamic(&*self.store.get(&self.key(name)?).await?)
    }

    /// Reads one object, `None` if it does not exist.
    pub async fn get_opt(&self, name: &str) -> Result<Option<Object<K>>> {
        match self.get(name).await {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lists objects (one page when `limit` is set).
    ///
    /// Fails when any listed object does not decode as `K`, with an error naming that object
    /// (kind, namespace, name) and the field at fault; [`list_lenient`](Api::list_lenient) returns
    /// the others instead.
    pub async fn list(&self, params: &ListParams) -> Result<ObjectList<K>> {
        let page = self.list_raw(params).await?;
        Ok(ObjectList {
            items: page.items.iter().map(|o| Object::from_dynamic(o)).collect::<Result<_>>()?,
            revision: page.revision,
            continue_token: page.continue_token,
        })
    }

    /// Lists objects like [`list`](Api::list), but an object that does not decode as `K` (written
    /// by another program, or by an older version of this one) does not fail the whole list: the
    /// objects that decode are returned, and beside them each one that does not, with its error.
    ///
    /// ```no_run
    /// # async fn demo(api: orch_core::Api<orch_core::kinds::Workload>) -> orch_core::Result<()> {
    /// let (list, bad) = api.list_lenient(&Default::default()).await?;
    /// for (key, error) in &bad {
    ///     eprintln!("skipping {key}: {error}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_lenient(&self, params: &ListParams) -> Result<(ObjectList<K>, Vec<(ObjectKey, Error)>)> {
        let page = self.list_raw(params).await?;
        let mut items = Vec::with_capacity(page.items.len());
        let mut failed = Vec::new();
        for o in &page.items {
            match Object::from_dynamic(o) {
                Ok(obj) => items.push(obj),
                Err(e) => failed.push((o.key(), e)),
            }
        }
        Ok((ObjectList { items, revision: page.revision, continue_token: page.continue_token }, failed))
    }

    async fn list_raw(&self, params: &ListParams) -> Result<crate::store::ListResponse> {
        let req = ListRequest {
            selection: self.selection(params),
            limit: params.limit,
            continue_token: params.continue_token.clone(),
            revision: None,
        };
        self.store.list(&req).await
    }

    /// Creates an object after validating it.
    pub async fn create(&self, obj: &Object<K>) -> Result<Object<K>> {
        let obj = self.place(obj)?;
        Object::from_dynamic(
            &*self.store.create(obj.to_dynamic()?, &self.write_options(&WriteOptions::default())?).await?,
        )
    }

    /// Replaces metadata and spec (compare-and-swap on `metadata.resource_version`).
    pub async fn replace(&self, obj: &Object<K>) -> Result<Object<K>> {
        self.replace_with(obj, &WriteOptions::default()).await
    }

    /// [`replace`](Api::replace) with a guard.
    pub async fn replace_with(&self, obj: &Object<K>, opts: &WriteOptions) -> Result<Object<K>> {
        let obj = self.place(obj)?;
        Object::from_dynamic(&*self.store.update(obj.to_dynamic()?, &self.write_options(opts)?).await?)
    }

    /// Replaces the status (compare-and-swap on `metadata.resource_version`).
    pub async fn replace_status(&self, obj: &Object<K>) -> Result<Object<K>> {
        self.replace_status_with(obj, &WriteOptions::default()).await
    }

    /// Writes `status` onto the object `metadata` names, compare-and-swap on its resource
    /// version, and returns the stored metadata (the new resource version). What an agent
    /// reporting thousands of statuses needs: unlike [`replace_status`](Api::replace_status),
    /// nothing but the status is encoded and nothing is decoded.
    pub async fn write_status(&self, metadata: &ObjectMeta, status: &K::Status) -> Result<ObjectMeta> {
        let mut placed = metadata.clone();
        self.place_meta(&mut placed)?;
        let obj = DynamicObject {
            kind: K::KIND.to_string(),
            metadata: placed,
            spec: crate::json::RawJson::null(),
            status: crate::json::RawJson::encode(status)?,
        };
        Ok(self.store.update_status(obj, &self.write_options(&WriteOptions::default())?).await?.metadata.clone())
    }

    /// [`replace_status`](Api::replace_status) with a guard.
    pub async fn replace_status_with(&self, obj: &Object<K>, opts: &WriteOptions) -> Result<Object<K>> {
        let obj = self.place(obj)?;
        Object::from_dynamic(&*self.store.update_status(obj.to_dynamic()?, &self.write_options(opts)?).await?)
    }

    /// Reads the object, lets `mutate` change it, and replaces it; when another writer got in
    /// between (`Conflict`), reads it again and retries, waiting a little longer each time, as
    /// client-go's `RetryOnConflict` does. `mutate` runs on the fresh object at every attempt, so
    /// it must derive its change from what it is given. After a few attempts the last
    /// `Conflict` is returned; any other error (including one from `mutate`) at once.
    ///
    /// Only metadata and spec are written (as [`replace`](Api::replace)); a status change made
    /// by `mutate` is not kept.
    ///
    /// ```no_run
    /// # async fn demo(api: orch_core::Api<orch_core::kinds::Node>) -> orch_core::Result<()> {
    /// api.retry_on_conflict("node-1", |node| {
    ///     node.metadata.labels.insert("zone", "eu-1");
    ///     Ok(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn retry_on_conflict<F>(&self, name: &str, mut mutate: F) -> Result<Object<K>>
    where
        F: FnMut(&mut Object<K>) -> Result<()>,
    {
        let mut retries = Attempts::new(Backoff::new(CONFLICT_BACKOFF, CONFLICT_BACKOFF * 8).full_jitter());
        loop {
            let mut obj = self.get(name).await?;
            mutate(&mut obj)?;
            match self.replace(&obj).await {
                Err(e) if e.is_conflict() && retries.failures() + 1 < CONFLICT_ATTEMPTS => {
                    tokio::time::sleep(retries.fail()).await;
                }
                other => return other,
            }
        }
    }

    /// Patches `{metadata, spec}`: a JSON merge patch (RFC 7386: a `serde_json::Value`) or a
    /// JSON patch (RFC 6902: a [`json_patch::Patch`]), see [`Patch`].
    ///
    /// Without a new `metadata.resourceVersion` in the patch it re-reads and retries when another
    /// writer got in first; with it, a moved object fails with `Conflict`.
    pub async fn patch(&self, name: &str, patch: impl Into<Patch>) -> Result<Object<K>> {
        self.patch_part(name, &patch.into(), false).await
    }

    /// Patches `{status}` (a merge patch's keys other than `status` are ignored; a JSON patch
    /// may only change paths under `/status`).
    pub async fn patch_status(&self, name: &str, patch: impl Into<Patch>) -> Result<Object<K>> {
        self.patch_part(name, &patch.into(), true).await
    }

    async fn patch_part(&self, name: &str, patch: &Patch, status: bool) -> Result<Object<K>> {
        let parts: &[&str] = if status { &["status"] } else { &["metadata", "spec"] };
        patch.check(K::KIND, parts)?;
        let pinned = patch.pins_resource_version();
        let key = self.key(name)?;
        let mut last_conflict = None;
        for _ in 0..PATCH_ATTEMPTS {
            let current = self.store.get(&key).await?;
            // Patch the stored JSON, not the typed form, so fields this program's `K` does not
            // know (written by a newer client) survive the patch.
            let mut doc = serde_json::to_value(&*current).map_err(|source| Error::Serialization {
                what: key.to_string(),
                path: String::new(),
                source,
            })?;
            patch.apply(&mut doc, parts, K::KIND)?;
            let merged: crate::object::DynamicObject = serde_json::from_value(doc)
                .map_err(|e| Error::invalid(K::KIND, "patch", format!("result is not an object: {e}")))?;
            if merged.key() != key {
                return Err(Error::invalid(K::KIND, "patch.metadata", "name and namespace cannot be patched"));
            }
            // The typed form checks the result: it must decode and validate.
            let typed = Object::<K>::from_dynamic(&merged)
                .map_err(|e| Error::invalid(K::KIND, "patch", format!("result does not decode: {e}")))?;
            typed.validate()?;
            let opts = self.write_options(&WriteOptions::default())?;
            let result = if status {
                self.store.update_status(merged, &opts).await
            } else {
                self.store.update(merged, &opts).await
            };
            match result {
                Err(e) if e.is_conflict() && !pinned => last_conflict = Some(e),
                other => return Object::from_dynamic(&*other?),
            }
        }
        Err(last_conflict.unwrap_or_else(|| Error::invalid(K::KIND, "patch", "gave up")))
    }

    /// Deletes an object (or marks it, while finalizers remain).
    pub async fn delete(&self, name: &str, opts: &DeleteOptions) -> Result<Deleted<K>> {
        let opts = DeleteOptions {
            resource_version: opts.resource_version,
            uid: opts.uid.clone(),
            guard: self.guard_for(opts.guard.as_ref())?,
            propagation: opts.propagation,
        };
        Ok(match self.store.delete(&self.key(name)?, &opts).await? {
            DeleteOutcome::Deleted(o) => Deleted::Gone(Object::from_dynamic(&o)?),
            DeleteOutcome::Pending(o) => Deleted::Pending(Object::from_dynamic(&o)?),
        })
    }

    /// Watches changes from `from_revision` (inclusive), or from now.
    pub async fn watch(
        &self,
        params: &ListParams,
        from_revision: Option<u64>,
    ) -> Result<BoxStream<'static, Result<Event<K>>>> {
        let req = WatchRequest { selection: self.selection(params), from_revision, progress_interval: None };
        let stream = self.store.watch(&req).await?;
        Ok(stream
            .map(|item| {
                item.and_then(|e| {
                    Ok(match e {
                        WatchEvent::Added(o) => Event::Added(Object::from_dynamic(&o)?),
                        WatchEvent::Modified(o) => Event::Modified(Object::from_dynamic(&o)?),
                        WatchEvent::Deleted(o) => Event::Deleted(Object::from_dynamic(&o)?),
                        WatchEvent::Progress(r) => Event::Progress(r),
                    })
                })
            })
            .boxed())
    }
}

/// A change to an object, as [`Api::patch`] and [`Api::patch_status`] take it.
#[derive(Debug, Clone, PartialEq)]
pub enum Patch {
    /// A JSON merge patch (RFC 7386) of `{metadata, spec}` or `{status}`: objects merge key by
    /// key, `null` removes a key, anything else (arrays too) replaces.
    Merge(Value),
    /// A JSON patch (RFC 6902): `add`, `remove`, `replace`, `move`, `copy` and `test`
    /// operations on paths of the whole object (`/spec/replicas`, `/metadata/labels/app`),
    /// applied in order, all or none. Paths outside the parts a call may write are refused
    /// (a `test` may read any path).
    Json(json_patch::Patch),
}

impl From<Value> for Patch {
    fn from(v: Value) -> Self {
        Patch::Merge(v)
    }
}

impl From<&Value> for Patch {
    fn from(v: &Value) -> Self {
        Patch::Merge(v.clone())
    }
}

impl From<json_patch::Patch> for Patch {
    fn from(p: json_patch::Patch) -> Self {
        Patch::Json(p)
    }
}

impl Patch {
    /// Each operation of a JSON patch as `(op, path, from)`.
    fn operations(ops: &json_patch::Patch) -> Vec<(String, String, Option<String>)> {
        ops.0
            .iter()
            .map(|op| {
                let v = serde_json::to_value(op).unwrap_or(Value::Null);
                let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
                (text("op").unwrap_or_default(), text("path").unwrap_or_default(), text("from"))
            })
            .collect()
    }

    /// Refuses a patch that is not an object (merge) or writes outside `parts` (JSON).
    fn check(&self, kind: &str, parts: &[&str]) -> Result<()> {
        match self {
            Patch::Merge(v) if !v.is_object() => Err(Error::invalid(kind, "patch", "must be a JSON object")),
            Patch::Merge(_) => Ok(()),
            Patch::Json(ops) => {
                let under =
                    |path: &str| parts.iter().any(|p| path == format!("/{p}") || path.starts_with(&format!("/{p}/")));
                for (i, (op, path, from)) in Patch::operations(ops).into_iter().enumerate() {
                    if op != "test" && !under(&path) {
                        return Err(Error::invalid(
                            kind,
                            format!("patch[{i}].path"),
                            format!("{op} of {path:?}: this call may only change {}", parts.join(" and ")),
                        ));
                    }
                    if let Some(from) = from.filter(|f| op == "move" && !under(f)) {
                        return Err(Error::invalid(
                            kind,
                            format!("patch[{i}].from"),
                            format!("move from {from:?}: this call may only change {}", parts.join(" and ")),
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether the patch sets the resource version the write must find (then a moved object
    /// fails with `Conflict` instead of being re-read).
    fn pins_resource_version(&self) -> bool {
        match self {
            Patch::Merge(v) => v.pointer("/metadata/resourceVersion").is_some(),
            Patch::Json(ops) => {
                Patch::operations(ops).iter().any(|(op, path, _)| op != "test" && path == "/metadata/resourceVersion")
            }
        }
    }

    /// Applies the patch to the stored object's JSON.
    fn apply(&self, doc: &mut Value, parts: &[&str], kind: &str) -> Result<()> {
        match self {
            Patch::Merge(patch) => {
                for part in parts {
                    if let Some(p) = patch.get(*part) {
                        json_patch::merge(&mut doc[*part], p);
                    }
                }
                Ok(())
            }
            Patch::Json(ops) => json_patch::patch(doc, ops)
                .map_err(|e| Error::invalid(kind, format!("patch[{}]", e.operation), format!("{}", e.kind))),
        }
    }
}

/// Applies a JSON merge patch (RFC 7386) to `target`: objects merge key by key, `null` removes a
/// key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "h": [1]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "h": [2, 3], "n": {"x": 1}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "h": [2, 3], "n": {"x": 1}}));
        let mut scalar = json!(1);
        merge_patch(&mut scalar, &json!({"k": null}));
        assert_eq!(scalar, json!({}));
    }
}
