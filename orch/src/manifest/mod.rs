//! Manifests: objects written as YAML (several documents per file, separated by `---`) or JSON,
//! in the shape the API serves them:
//!
//! ```yaml
//! apiVersion: orch.dev/v1
//! kind: Deployment
//! metadata: {name: web, namespace: default, labels: {app: web}}
//! spec:
//!   replicas: 3
//!   ...
//! status: {...}   # optional
//! ```
//!
//! Decoding is strict: an unknown field is an error with the closest known name as a
//! suggestion, and every error (broken YAML, a duplicate key, a value of the wrong type, a bad
//! quantity, a field the kind's own validation refuses) names the file, line, column and field
//! path:
//!
//! ```text
//! web.yaml:12:18: spec.template.spec.containers[0].resources.requests.cpu: invalid quantity "1.5.5": more than one decimal point
//! web.yaml:6:3: unknown field `replica` in spec; did you mean `replicas`?
//! ```
//!
//! YAML is read with [serde-saphyr](https://docs.rs/serde-saphyr): it is maintained (unlike
//! `serde_yaml`), never panics on hostile input, refuses duplicate keys, bounds nesting depth and
//! node counts (so a deeply nested or alias-bomb file is an error, not a crash), and reports the
//! line and column of every node, which is what lets each error point at its field. JSON is
//! read by the same parser (a JSON document is YAML 1.2), so both give the same errors.
//!
//! Every built-in kind is known to [`Manifests::builtin`]; an application adds its own with
//! [`Manifests::register`].
//!
//! ```
//! use orch::manifest::Manifests;
//!
//! let text = "apiVersion: orch.dev/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replica: 3\n";
//! let err = Manifests::builtin().namespace("default").read_str("web.yaml", text).unwrap_err();
//! assert_eq!(err.to_string(), "web.yaml:5:3: unknown field `replica` in spec; did you mean `replicas`?");
//! ```

mod de;
mod tree;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use orch_core::kinds::{
    DaemonSet, Deployment, EndpointSlice, Event, Job, Node, NodeLease, PersistentVolume, ReplicaSet, Service,
    StatefulSet, VolumeClaim, Workflow, Workload,
};
use orch_core::{DynamicObject, Error, Object, ObjectMeta, RawJson, Resource, Scope};

use de::{DeError, decode, suggest};
use tree::{Pos, Value};

/// The `apiVersion` of every orch kind: orch serves one group (`orch.dev`) at one version
/// (`v1`), in manifests, on the API and in stored objects alike.
pub use orch_core::API_VERSION;

/// The largest file [`Manifests`] reads (8 MiB): a manifest larger than that is a mistake.
pub const MAX_FILE_BYTES: usize = 8 << 20;

/// One error in a manifest, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The file (`-` for standard input).
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The field path (`spec.replicas`), empty when the error is about the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
    self_placed: bool,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.field.is_empty() || self.self_placed {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

/// Every error found in a set of manifests (at least one). Its `Display` is one error a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

/// A decoded object and where its document starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The object, its spec (and status, when the document has one) checked by its kind.
    pub object: DynamicObject,
    /// The file it came from.
    pub file: String,
    /// The line its document starts on.
    pub line: u64,
    /// What the document itself says, before defaults are filled in: `metadata.labels`,
    /// `metadata.annotations` and `spec` as written (what a three-way apply merges).
    pub written: serde_json::Value,
}

/// What decoding one document needs to know.
struct Doc<'a> {
    file: &'a str,
    root: &'a tree::Node,
    namespace: Option<&'a str>,
}

impl Doc<'_> {
    fn error(&self, pos: Pos, field: impl Into<String>, message: impl Into<String>) -> ManifestError {
        ManifestError {
            file: self.file.to_string(),
            line: pos.line,
            column: pos.column,
            field: field.into(),
            message: message.into(),
            self_placed: false,
        }
    }

    fn de_error(&self, e: DeError) -> ManifestError {
        let pos = e.pos.unwrap_or(self.root.pos);
        ManifestError {
            file: self.file.to_string(),
            line: pos.line,
            column: pos.column,
            field: e.path.unwrap_or_default(),
            message: e.message,
            self_placed: e.self_placed,
        }
    }
}

type DecodeFn = fn(&Doc<'_>) -> Result<DynamicObject, Vec<ManifestError>>;
type CanonicalFn = fn(&serde_json::Value) -> Result<serde_json::Value, String>;

#[derive(Clone, Copy)]
struct KindEntry {
    scope: Scope,
    canonical: Option<CanonicalFn>,
    /// `None`: known by name only (see [`Manifests::register_untyped`]).
    decode: Option<DecodeFn>,
}

/// Reads manifests of the kinds it knows.
#[derive(Clone)]
pub struct Manifests {
    kinds: BTreeMap<String, KindEntry>,
    namespace: Option<String>,
}

impl fmt::Debug for Manifests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifests").field("kinds", &self.kinds.keys()).field("namespace", &self.namespace).finish()
    }
}

fn canonical_spec<K: Resource>(spec: &serde_json::Value) -> Result<serde_json::Value, String> {
    let typed: K = serde_json::from_value(spec.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn decode_kind<K: Resource>(doc: &Doc<'_>) -> Result<DynamicObject, Vec<ManifestError>> {
    let mut errors = Vec::new();
    let mut metadata: ObjectMeta = match doc.root.get("metadata") {
        Some(m) => decode(m, "metadata").map_err(|e| vec![doc.de_error(e)])?,
        None => {
            return Err(vec![doc.error(doc.root.pos, "metadata", "missing: every object needs metadata.name")]);
        }
    };
    if K::SCOPE == Scope::Namespaced
        && metadata.namespace.is_empty()
        && let Some(ns) = doc.namespace
    {
        metadata.namespace = ns.to_string();
    }
    let empty = tree::Node { value: Value::Map(Vec::new()), pos: doc.root.pos };
    let spec_node = doc.root.get("spec").unwrap_or(&empty);
    let spec: K = decode(spec_node, "spec").map_err(|e| vec![doc.de_error(e)])?;
    let status_node = doc.root.get("status").filter(|s| s.value != Value::Null);
    let status: K::Status = match status_node {
        Some(s) => decode(s, "status").map_err(|e| vec![doc.de_error(e)])?,
        None => K::Status::default(),
    };
    let object = Object::<K> { metadata, spec, status };
    if let Err(Error::Invalid { source, .. }) = object.validate() {
        for e in source.errors {
            errors.push(doc.error(doc.root.locate(&e.field), e.field, e.reason));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut dynamic = object.to_dynamic().map_err(|e| vec![doc.error(doc.root.pos, "", e.to_string())])?;
    if status_node.is_none() {
        dynamic.status = RawJson::null();
    }
    Ok(dynamic)
}

impl Manifests {
    /// No kinds: add them with [`register`](Self::register).
    pub fn empty() -> Self {
        Manifests { kinds: BTreeMap::new(), namespace: None }
    }

    /// Every built-in kind: Node, NodeLease, Workload, Deployment, ReplicaSet, DaemonSet,
    /// StatefulSet, Job, Workflow, Event, Service, EndpointSlice, VolumeClaim, PersistentVolume.
    pub fn builtin() -> Self {
        let mut m = Manifests::empty();
        m.register::<Node>()
            .register::<NodeLease>()
            .register::<Workload>()
            .register::<Deployment>()
            .register::<ReplicaSet>()
            .register::<DaemonSet>()
            .register::<StatefulSet>()
            .register::<Job>()
            .register::<Workflow>()
            .register::<Event>()
            .register::<Service>()
            .register::<EndpointSlice>()
            .register::<VolumeClaim>()
            .register::<PersistentVolume>();
        m
    }

    /// Adds a kind (an application's own, for instance); its spec and status are decoded as
    /// `K` and `K::Status` and checked by `K::validate`.
    pub fn register<K: Resource>(&mut self) -> &mut Self {
        self.kinds.insert(
            K::KIND.to_string(),
            KindEntry { scope: K::SCOPE, decode: Some(decode_kind::<K>), canonical: Some(canonical_spec::<K>) },
        );
        self
    }

    /// Adds a kind known only by its name and scope (one a server serves that this program
    /// has no type for): its metadata is checked here, its spec and status are taken as any
    /// JSON and left to the server to check. A kind already registered is kept as it is.
    pub fn register_untyped(&mut self, kind: &str, scope: Scope) -> &mut Self {
        self.kinds.entry(kind.to_string()).or_insert(KindEntry { scope, decode: None, canonical: None });
        self
    }

    /// The namespace given to a namespaced object whose manifest names none (builder style).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    /// The kinds it knows, by name.
    pub fn kinds(&self) -> impl Iterator<Item = &str> + '_ {
        self.kinds.keys().map(String::as_str)
    }

    /// A spec of `kind` with every default filled in, as the server would store it (`spec`
    /// itself for a kind known only by name); an error when it is not a spec of that kind.
    pub fn canonical_spec(&self, kind: &str, spec: &serde_json::Value) -> Result<serde_json::Value, String> {
        match self.kinds.get(kind).and_then(|k| k.canonical) {
            Some(f) => f(spec),
            None => Ok(spec.clone()),
        }
    }

    /// Whether a known kind is namespaced (`None` for an unknown kind).
    pub fn is_namespaced(&self, kind: &str) -> Option<bool> {
        self.kinds.get(kind).map(|k| k.scope == Scope::Namespaced)
    }

    /// Reads every document of `text`; `file` names it in errors. Either every document
    /// decodes, or the answer is every error found (the documents are all checked).
    pub fn read_str(&self, file: &str, text: &str) -> Result<Vec<Manifest>, ManifestErrors> {
        // Parsing and decoding recurse once per level of nesting (at most 64 levels): a thread
        // with a stack sized for that keeps a deep file from overflowing a small caller stack
        // (a test thread has 2 MiB; debug builds use large frames).
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("orch-manifest".into())
                .stack_size(64 << 20)
                .spawn_scoped(s, || self.read_str_here(file, text))
                .map_or_else(
                    |_| self.read_str_here(file, text),
                    |h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                )
        })
    }

    fn read_str_here(&self, file: &str, text: &str) -> Result<Vec<Manifest>, ManifestErrors> {
        let err = |pos: Option<Pos>, message: String| {
            let pos = pos.unwrap_or_default();
            ManifestErrors(vec![ManifestError {
                file: file.to_string(),
                line: pos.line,
                column: pos.column,
                field: String::new(),
                message,
                self_placed: false,
            }])
        };
        if text.len() > MAX_FILE_BYTES {
            return Err(err(
                None,
                format!("{} bytes is too large for a manifest (at most {MAX_FILE_BYTES})", text.len()),
            ));
        }
        let docs = tree::parse(text).map_err(|e| err(e.pos, e.message))?;
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for root in &docs {
            let doc = Doc { file, root, namespace: self.namespace.as_deref() };
            match self.decode_doc(&doc) {
                Ok(object) => {
                    let written = written(root);
                    out.push(Manifest { object, file: file.to_string(), line: root.pos.line, written })
                }
                Err(e) => errors.extend(e),
            }
        }
        if errors.is_empty() { Ok(out) } else { Err(ManifestErrors(errors)) }
    }

    fn decode_doc(&self, doc: &Doc<'_>) -> Result<DynamicObject, Vec<ManifestError>> {
        let Value::Map(entries) = &doc.root.value else {
            return Err(vec![doc.error(
                doc.root.pos,
                "",
                format!(
                    "expected an object (a mapping with apiVersion, kind, metadata, spec), found {}",
                    doc.root.what()
                ),
            )]);
        };
        const TOP: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
        for (k, _) in entries {
            if !TOP.contains(&k.name.as_str()) {
                return Err(vec![doc.de_error(de::unknown_field(&k.name, "", TOP, k.pos, k.name.clone()))]);
            }
        }
        let text = |key: &str| -> Result<&str, ManifestError> {
            match doc.root.get(key) {
                None => Err(doc.error(doc.root.pos, key, "missing")),
                Some(tree::Node { value: Value::Str(s), .. }) => Ok(s),
                Some(n) => Err(doc.error(n.pos, key, format!("expected a string, found {}", n.what()))),
            }
        };
        let api_version = text("apiVersion").map_err(|mut e| {
            e.message = format!("{}; orch's kinds are served as {API_VERSION}", e.message);
            vec![e]
        })?;
        if api_version != API_VERSION {
            let pos = doc.root.get("apiVersion").map_or(doc.root.pos, |n| n.pos);
            return Err(vec![doc.error(
                pos,
                "apiVersion",
                format!("{api_version:?} is not served; the versions that exist: {API_VERSION}"),
            )]);
        }
        let kind = text("kind").map_err(|e| vec![e])?;
        let Some(entry) = self.kinds.get(kind) else {
            let pos = doc.root.get("kind").map_or(doc.root.pos, |n| n.pos);
            let message = match suggest(kind, self.kinds.keys().map(String::as_str)) {
                Some(s) => format!("unknown kind {kind:?}; did you mean {s:?}?"),
                None => format!(
                    "unknown kind {kind:?}; the kinds are {}",
                    self.kinds.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                ),
            };
            return Err(vec![doc.error(pos, "kind", message)]);
        };
        match entry.decode {
            Some(decode) => decode(doc),
            None => decode_untyped(doc, entry.scope == Scope::Namespaced),
        }
    }

    /// Reads a file, or every `.yaml`, `.yml` and `.json` file of a directory (sorted by name,
    /// not recursing), or standard input for `-`.
    pub fn read_path(&self, path: &Path) -> Result<Vec<Manifest>, ManifestErrors> {
        let io = |p: &Path, e: std::io::Error| {
            ManifestErrors(vec![ManifestError {
                file: p.display().to_string(),
                line: 0,
                column: 0,
                field: String::new(),
                message: format!("cannot read: {e}"),
                self_placed: false,
            }])
        };
        if path == Path::new("-") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin().lock().take(MAX_FILE_BYTES as u64 + 1), &mut text)
                .map_err(|e| io(path, e))?;
            return self.read_str("-", &text);
        }
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect();
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for f in files {
            let len = std::fs::metadata(&f).map_err(|e| io(&f, e))?.len();
            let name = f.display().to_string();
            if len > MAX_FILE_BYTES as u64 {
                errors.push(ManifestError {
                    file: name,
                    line: 0,
                    column: 0,
                    field: String::new(),
                    message: format!("{len} bytes is too large for a manifest (at most {MAX_FILE_BYTES})"),
                    self_placed: false,
                });
                continue;
            }
            let text = std::fs::read_to_string(&f).map_err(|e| io(&f, e))?;
            match self.read_str(&name, &text) {
                Ok(m) => out.extend(m),
                Err(e) => errors.extend(e.0),
            }
        }
        if errors.is_empty() { Ok(out) } else { Err(ManifestErrors(errors)) }
    }
}

use std::io::Read as _;

/// `metadata.labels`, `metadata.annotations` and `spec` as a document writes them.
fn written(root: &tree::Node) -> serde_json::Value {
    let part = |node: Option<&tree::Node>, path: &str| -> serde_json::Value {
        node.and_then(|n| decode::<serde_json::Value>(n, path).ok()).unwrap_or(serde_json::Value::Null)
    };
    let meta = root.get("metadata");
    let mut out = serde_json::json!({
        "metadata": {
            "labels": part(meta.and_then(|m| m.get("labels")), "metadata.labels"),
            "annotations": part(meta.and_then(|m| m.get("annotations")), "metadata.annotations"),
        },
        "spec": part(root.get("spec"), "spec"),
    });
    for key in ["labels", "annotations"] {
        if out["metadata"][key].is_null() {
            out["metadata"][key] = serde_json::json!({});
        }
    }
    if out["spec"].is_null() {
        out["spec"] = serde_json::json!({});
    }
    out
}

/// The name in `known` closest to `unknown`, when one is close enough to be a likely typo (for
/// "did you mean" hints).
pub fn suggest_name<'a>(unknown: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    suggest(unknown, known)
}

/// Decodes a kind the reader knows only by name (an application's kind that a server
/// serves): metadata strictly, spec and status as any JSON, left for the server to check.
fn decode_untyped(doc: &Doc<'_>, namespaced: bool) -> Result<DynamicObject, Vec<ManifestError>> {
    let kind = match doc.root.get("kind").map(|n| &n.value) {
        Some(Value::Str(s)) => s.clone(),
        _ => String::new(),
    };
    let mut metadata: ObjectMeta = match doc.root.get("metadata") {
        Some(m) => decode(m, "metadata").map_err(|e| vec![doc.de_error(e)])?,
        None => return Err(vec![doc.error(doc.root.pos, "metadata", "missing: every object needs metadata.name")]),
    };
    if namespaced
        && metadata.namespace.is_empty()
        && let Some(ns) = doc.namespace
    {
        metadata.namespace = ns.to_string();
    }
    let mut v = orch_core::Validator::new();
    metadata.validate(namespaced, &mut v);
    if let Err(e) = v.finish() {
        return Err(e.errors.into_iter().map(|e| doc.error(doc.root.locate(&e.field), e.field, e.reason)).collect());
    }
    let part = |key: &str| -> Result<RawJson, Vec<ManifestError>> {
        match doc.root.get(key) {
            None => Ok(RawJson::null()),
            Some(n) => {
                let v: serde_json::Value = decode(n, key).map_err(|e| vec![doc.de_error(e)])?;
                Ok(RawJson::from_value(&v))
            }
        }
    };
    Ok(DynamicObject { kind, metadata, spec: part("spec")?, status: part("status")? })
}

/// An object in its manifest form (`apiVersion`, `kind`, `metadata`, `spec`, `status`; a null
/// spec or status left out), as JSON.
pub fn to_value(obj: &DynamicObject) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("apiVersion".into(), API_VERSION.into());
    map.insert("kind".into(), obj.kind.clone().into());
    map.insert("metadata".into(), serde_json::to_value(&obj.metadata).unwrap_or_default());
    if !obj.spec.is_null() {
        map.insert("spec".into(), obj.spec.to_value());
    }
    if !obj.status.is_null() {
        map.insert("status".into(), obj.status.to_value());
    }
    serde_json::Value::Object(map)
}

/// Objects as one YAML stream, `---` between documents.
pub fn to_yaml(objs: &[DynamicObject]) -> String {
    let values: Vec<serde_json::Value> = objs.iter().map(to_value).collect();
    let mut out = String::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        // A JSON value always serializes.
        out.push_str(&serde_saphyr::to_string(v).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_version_is_the_one_the_server_serves() {
        #[cfg(feature = "api")]
        assert_eq!(API_VERSION, orch_store::api::wire::API_VERSION);
        assert_eq!(API_VERSION, "orch.dev/v1");
    }
}
