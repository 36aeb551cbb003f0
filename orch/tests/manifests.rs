//! Manifest decoding: good files read, every file of the bad corpus gives its exact error
//! (`tests/manifests/bad/NAME.*` next to `NAME.expected`; `ORCH_BLESS=1` rewrites them), hostile
//! input is an error and never a panic, and any object written as YAML reads back equal.

#![cfg(feature = "manifest")]

use std::path::Path;

use orch::core::kinds::{Container, Deployment, Workload};
use orch::core::{Labels, Object, ObjectMeta};
use orch::manifest::{Manifests, to_yaml};
use proptest::prelude::*;

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests")
}

#[test]
fn good_manifests_read_in_yaml_and_json() {
    let m = Manifests::builtin().namespace("default");
    let web = m.read_path(&corpus().join("good/web.yaml")).unwrap();
    assert_eq!(web.len(), 2);
    assert_eq!((web[0].object.kind.as_str(), web[0].line), ("Deployment", 2));
    assert_eq!(web[0].object.metadata.namespace, "default", "the default namespace is filled in");
    let d: Object<Deployment> = Object::from_dynamic(&web[0].object).unwrap();
    assert_eq!(d.spec.replicas, 3);
    assert_eq!(d.spec.template.spec.containers[0].resources.requests["cpu"].to_string(), "250m");
    assert!(web[0].object.status.is_null(), "no status in the file, none in the object");
    assert_eq!(web[1].object.kind, "Service");
    let node = m.read_path(&corpus().join("good/node.json")).unwrap();
    assert_eq!(node[0].object.metadata.namespace, "", "a cluster-scoped kind gets no namespace");
    assert_eq!(node[0].object.status.to_value()["capacity"]["memory"], "8Gi");
    // A directory reads its files in name order.
    let all = m.read_path(&corpus().join("good")).unwrap();
    assert_eq!(all.iter().map(|m| m.object.kind.as_str()).collect::<Vec<_>>(), ["Node", "Deployment", "Service"]);
}

#[test]
fn every_bad_manifest_gives_its_precise_error() {
    let m = Manifests::builtin().namespace("default");
    let bless = std::env::var_os("ORCH_BLESS").is_some();
    let dir = corpus().join("bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "expected"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "the corpus is there");
    let mut failures = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        let got = match m.read_str(name, &text) {
            Ok(objs) => format!("accepted {} objects", objs.len()),
            Err(e) => e.to_string(),
        };
        let expected_path = f.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, format!("{got}\n")).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected.trim_end() != got {
            failures.push(format!("{name}:\n  expected: {}\n  got:      {got}", expected.trim_end()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn hostile_input_is_an_error_not_a_crash() {
    let m = Manifests::builtin();
    // Huge: past the size limit, refused before parsing.
    let huge = format!(
        "apiVersion: orch.dev/v1\nkind: Workload\nmetadata: {{name: x, annotations: {{a: \"{}\"}}}}\n",
        "x".repeat(9 << 20)
    );
    let e = m.read_str("huge.yaml", &huge).unwrap_err().to_string();
    assert!(e.starts_with("huge.yaml: 9437") && e.contains("too large for a manifest (at most 8388608)"), "{e}");
    // Deep nesting in block style, far past the limit.
    let mut deep = String::from("a:\n");
    for i in 1..300 {
        deep.push_str(&" ".repeat(i));
        deep.push_str("a:\n");
    }
    let e = m.read_str("deep.yaml", &deep).unwrap_err().to_string();
    assert!(e.contains("nested deeper than 64 levels"), "{e}");
    // An alias bomb.
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 { "a".to_string() } else { format!("l{}", i - 1) };
        bomb.push_str(&format!(
            "l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    assert!(m.read_str("bomb.yaml", &bomb).is_err());
    // Garbage of every sort: some error, never a panic.
    for text in ["\u{0}", "[", "{{{{", ": : :", "---\n---\n...", "!!binary AAAA", "a: !!int x", "\t- x"] {
        let _ = m.read_str("junk.yaml", text);
    }
    // Nothing at all is no objects.
    assert_eq!(m.read_str("empty.yaml", "").unwrap(), vec![]);
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,10}[a-z0-9]"
}

fn labels() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map("[a-z]{1,5}", "[a-z0-9]{0,5}", 0..3).prop_map(|m| m.into_iter().collect::<Labels>())
}

fn workload() -> impl Strategy<Value = Workload> {
    (
        proptest::collection::vec("[ -~]{1,12}", 1..4),
        proptest::option::of(0u32..64_000),
        proptest::option::of(0u64..1 << 40),
        any::<i32>(),
    )
        .prop_map(|(command, milli, bytes, priority)| {
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let mut w = Workload::command("main", &args);
            if let Some(m) = milli {
                w.containers[0].resources.requests.insert("cpu".into(), format!("{m}m").parse().unwrap());
            }
            if let Some(b) = bytes {
                w.containers[0].resources.limits.insert("memory".into(), b.to_string().parse().unwrap());
            }
            w.priority = priority;
            w.containers.push(Container { name: "side".into(), ..w.containers[0].clone() });
            w
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn objects_written_as_yaml_read_back_equal(
        n in name(), ns in name(), l in labels(), spec in workload(), replicas in 0u32..1000, paused: bool,
    ) {
        let mut meta = ObjectMeta::namespaced(ns.clone(), n.clone());
        meta.labels = l.clone();
        let w = Object::new(meta.clone(), spec.clone()).to_dynamic().unwrap();
        let mut d = Deployment::new(&n, replicas, spec);
        d.paused = paused;
        let d = Object::new(ObjectMeta { name: format!("{n}-d"), ..meta }, d).to_dynamic().unwrap();
        let text = to_yaml(&[w.clone(), d.clone()]);
        let back = Manifests::builtin().read_str("gen.yaml", &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(back.len(), 2);
        let mut w = w;
        w.status = orch::core::RawJson::null();
        let mut d = d;
        d.status = orch::core::RawJson::null();
        // Status written as its default comes back as that default.
        let mut got_w = back[0].object.clone();
        got_w.status = orch::core::RawJson::null();
        let mut got_d = back[1].object.clone();
        got_d.status = orch::core::RawJson::null();
        prop_assert_eq!(got_w, w, "{}", text);
        prop_assert_eq!(got_d, d, "{}", text);
    }
}

/// An application's own kind, as an operator would define it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Echo {
    message: String,
    #[serde(default)]
    replicas: u32,
}

impl orch::core::Resource for Echo {
    const KIND: &'static str = "Echo";
    const SCOPE: orch::core::Scope = orch::core::Scope::Namespaced;
    type Status = ();
    fn validate(&self, v: &mut orch::core::Validator) {
        v.check(self.replicas <= 10, || "spec.replicas".into(), "must be at most 10");
    }
}

#[test]
fn an_applications_kinds_read_strictly_once_registered() {
    let mut m = Manifests::builtin();
    let text = "apiVersion: orch.dev/v1\nkind: Echo\nmetadata: {name: hi, namespace: ns}\nspec:\n  message: hello\n  replicas: 11\n";
    let e = m.read_str("echo.yaml", text).unwrap_err().to_string();
    assert!(e.starts_with("echo.yaml:2:7: kind: unknown kind \"Echo\"; the kinds are DaemonSet, Deployment,"), "{e}");
    m.register::<Echo>();
    let e = m.read_str("echo.yaml", text).unwrap_err().to_string();
    assert_eq!(e, "echo.yaml:6:13: spec.replicas: must be at most 10", "the kind's own validation, located");
    let e = m.read_str("echo.yaml", &text.replace("message", "mesage")).unwrap_err().to_string();
    assert_eq!(e, "echo.yaml:5:3: unknown field `mesage` in spec; did you mean `message`?");
    let ok = m.read_str("echo.yaml", &text.replace("11", "2")).unwrap();
    assert_eq!(ok[0].object.spec.to_value(), serde_json::json!({"message": "hello", "replicas": 2}));
}

#[test]
fn a_kind_known_by_name_only_keeps_its_spec_as_written() {
    let mut m = Manifests::builtin();
    m.register_untyped("Thing", orch::core::Scope::Namespaced);
    let m = m.namespace("team");
    let text = "apiVersion: orch.dev/v1\nkind: Thing\nmetadata: {name: t}\nspec: {size: 3, tags: [a]}\n";
    let got = m.read_str("thing.yaml", text).unwrap();
    assert_eq!(got[0].object.metadata.namespace, "team");
    assert_eq!(got[0].object.spec.to_value(), serde_json::json!({"size": 3, "tags": ["a"]}));
    // Its metadata is still checked, and located.
    let e = m.read_str("thing.yaml", &text.replace("name: t", "name: T_1")).unwrap_err().to_string();
    assert!(e.starts_with("thing.yaml:3:18: metadata.name: \"T_1\""), "{e}");
}
