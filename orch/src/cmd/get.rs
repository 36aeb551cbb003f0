//! `orch get`: tables per kind (the columns people look for), `-o yaml|json|name|wide`,
//! selectors, all namespaces, and `-w` to watch.

use futures::StreamExt;
use orch::manifest::{to_value, to_yaml};
use orch_core::{
    DynamicObject, FieldSelector, LabelSelector, ListRequest, ObjectKey, Selection, WatchEvent, WatchRequest,
};
use serde_json::Value;

use super::BoxError;
use super::client::{Client, ConnArgs, age, split_targets, table};

/// Output formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// A table with the usual columns.
    Table,
    /// A table with more columns.
    Wide,
    /// YAML manifests (`---` between objects).
    Yaml,
    /// JSON: an object, or a list of them.
    Json,
    /// `kind/name`, one a line.
    Name,
    /// Fields picked by a template, as kubectl's `-o jsonpath=`.
    JsonPath(JsonPath),
}

/// Reads `-o`: `table`, `wide`, `yaml`, `json`, `name` or `jsonpath=TEMPLATE`.
fn parse_output(s: &str) -> Result<Output, String> {
    Ok(match s {
        "table" => Output::Table,
        "wide" => Output::Wide,
        "yaml" => Output::Yaml,
        "json" => Output::Json,
        "name" => Output::Name,
        _ => match s.strip_prefix("jsonpath=") {
            Some(t) => Output::JsonPath(JsonPath::parse(t)?),
            None => {
                return Err(format!(
                    "{s:?} is not an output format (table, wide, yaml, json, name, jsonpath=TEMPLATE)"
                ));
            }
        },
    })
}

/// A subset of kubectl's JSONPath templates: text, and fields in braces (`{.status.phase}`,
/// `{.items[0].metadata.name}`, `{.items[*].metadata.name}`, `{"\n"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonPath(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Path(Vec<Step>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Field(String),
    Index(usize),
    All,
}

impl JsonPath {
    fn parse(template: &str) -> Result<JsonPath, String> {
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("jsonpath {template:?}: a `{{` is not closed"))?;
            let expr = rest[open + 1..open + close].trim();
            rest = &rest[open + close + 1..];
            if let Some(lit) = expr.strip_prefix('"').and_then(|e| e.strip_suffix('"')) {
                pieces.push(Piece::Text(lit.replace("\\n", "\n").replace("\\t", "\t")));
                continue;
            }
            let path = expr.strip_prefix('.').unwrap_or(expr);
            let mut steps = Vec::new();
            for part in path.split('.').filter(|p| !p.is_empty()) {
                let (field, mut tail) = match part.find('[') {
                    Some(i) => (&part[..i], &part[i..]),
                    None => (part, ""),
                };
                if !field.is_empty() {
                    steps.push(Step::Field(field.to_string()));
                }
                while let Some(t) = tail.strip_prefix('[') {
                    let end = t.find(']').ok_or_else(|| format!("jsonpath {template:?}: a `[` is not closed"))?;
                    let inner = &t[..end];
                    steps.push(if inner == "*" {
                        Step::All
                    } else {
                        Step::Index(
                            inner.parse().map_err(|_| {
                                format!("jsonpath {template:?}: [{inner}] is not an index (a number or *)")
                            })?,
                        )
                    });
                    tail = &t[end + 1..];
                }
                if !tail.is_empty() {
                    return Err(format!("jsonpath {template:?}: cannot read {part:?}"));
                }
            }
            pieces.push(Piece::Path(steps));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(JsonPath(pieces))
    }

    /// The template filled from `v`: each path's values joined by spaces; a missing field is
    /// empty, as kubectl prints it.
    fn render(&self, v: &Value) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Path(steps) => {
                    let mut at = vec![v];
                    for step in steps {
                        at = at
                            .into_iter()
                            .flat_map(|x| -> Vec<&Value> {
                                match step {
                                    Step::Field(f) => x.get(f).into_iter().collect(),
                                    Step::Index(i) => x.get(*i).into_iter().collect(),
                                    Step::All => x.as_array().map(|a| a.iter().collect()).unwrap_or_default(),
                                }
                            })
                            .collect();
                    }
                    let texts: Vec<String> = at
                        .into_iter()
                        .map(|x| match x {
                            Value::String(s) => s.clone(),
                            Value::Null => String::new(),
                            other => other.to_string(),
                        })
                        .collect();
                    out.push_str(&texts.join(" "));
                }
            }
        }
        out
    }
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch get deployments                  # or deploy, deployment, Deployment
  orch get deploy web -o yaml
  orch get workloads -l app=web -o wide
  orch get wl --field-selector spec.nodeName=node-1 -A
  orch get nodes
  orch get deploy -w                    # print changes as they happen (Ctrl-C to stop)")]
pub(crate) struct GetArgs {
    /// A kind, then names (or `kind/name`).
    #[arg(required = true)]
    targets: Vec<String>,
    /// Output format: table, wide, yaml, json, name, or jsonpath=TEMPLATE (`{.status.phase}`).
    #[arg(short = 'o', long, value_parser = parse_output, default_value = "table")]
    output: Output,
    /// Only objects whose labels match (`app=web,tier!=db`).
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Only objects whose fields match (`spec.nodeName=node-1,status.phase=Running`).
    #[arg(long)]
    field_selector: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// After listing, print every change until interrupted.
    #[arg(short = 'w', long)]
    watch: bool,
    /// Leave the header out of tables.
    #[arg(long)]
    no_headers: bool,
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

/// Column names and the cells of one object, per kind.
pub(crate) fn columns(kind: &str, wide: bool) -> Vec<&'static str> {
    let mut c: Vec<&'static str> = match kind {
        "Deployment" => vec!["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "ReplicaSet" => vec!["NAME", "DESIRED", "CURRENT", "READY", "AGE"],
        "DaemonSet" => vec!["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "StatefulSet" => vec!["NAME", "READY", "AGE"],
        "Workload" => vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "Node" => vec!["NAME", "STATUS", "AGE"],
        "Job" => vec!["NAME", "STATUS", "COMPLETIONS", "AGE"],
        "Workflow" => vec!["NAME", "STATUS", "AGE"],
        "Service" => vec!["NAME", "TYPE", "CLUSTER-ADDRESS", "PORT(S)", "ENDPOINTS", "AGE"],
        "EndpointSlice" => vec!["NAME", "SERVICE", "ENDPOINTS", "AGE"],
        "VolumeClaim" => vec!["NAME", "STATUS", "VOLUME", "SIZE", "ACCESS MODE", "CLASS", "AGE"],
        "PersistentVolume" => {
            vec!["NAME", "CAPACITY", "ACCESS MODES", "RECLAIM POLICY", "STATUS", "CLAIM", "NODE", "AGE"]
        }
        "Event" => vec!["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
        _ => vec!["NAME", "AGE"],
    };
    if wide {
        match kind {
            "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" => {
                c.extend(["CONTAINERS", "COMMAND", "SELECTOR"])
            }
            "Workload" => c.extend(["NODE", "REASON"]),
            "Node" => c.extend(["CPU", "MEMORY", "VERSION"]),
            _ => {}
        }
    }
    c
}

fn containers(spec: &Value) -> (String, String) {
    let list = spec["template"]["spec"]["containers"].as_array().cloned().unwrap_or_default();
    let names = list.iter().map(|c| s(&c["name"])).collect::<Vec<_>>().join(",");
    let cmds = list
        .iter()
        .map(|c| {
            c["image"].as_str().map(str::to_string).unwrap_or_else(|| {
                c["command"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(" ")).unwrap_or_default()
            })
        })
        .collect::<Vec<_>>()
        .join(",");
    (names, cmds)
}

fn selector_text(spec: &Value) -> String {
    spec["selector"]["matchLabels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

pub(crate) fn row(obj: &DynamicObject, wide: bool) -> Vec<String> {
    let spec = obj.spec.to_value();
    let status = obj.status.to_value();
    let name = obj.metadata.name.clone();
    let created = age(obj.metadata.creation_timestamp);
    let mut r = match obj.kind.as_str() {
        "Deployment" => vec![
            name,
            format!("{}/{}", n(&status["readyReplicas"]), n(&spec["replicas"])),
            n(&status["updatedReplicas"]).to_string(),
            n(&status["availableReplicas"]).to_string(),
            created,
        ],
        "ReplicaSet" => vec![
            name,
            n(&spec["replicas"]).to_string(),
            n(&status["replicas"]).to_string(),
            n(&status["readyReplicas"]).to_string(),
            created,
        ],
        "DaemonSet" => vec![
            name,
            n(&status["desiredNumberScheduled"]).to_string(),
            n(&status["currentNumberScheduled"]).to_string(),
            n(&status["numberReady"]).to_string(),
            n(&status["updatedNumberScheduled"]).to_string(),
            n(&status["numberAvailable"]).to_string(),
            created,
        ],
        "StatefulSet" => {
            vec![name, format!("{}/{}", n(&status["readyReplicas"]), spec["replicas"].as_u64().unwrap_or(1)), created]
        }
        "Workload" => {
            let total = spec["containers"].as_array().map_or(0, Vec::len);
            let ready =
                status["containerStatuses"].as_array().map_or(0, |a| a.iter().filter(|c| c["ready"] == true).count());
            let phase =
                if obj.metadata.deletion_timestamp.is_some() { "Terminating".to_string() } else { s(&status["phase"]) };
            let phase = if phase.is_empty() { "Pending".into() } else { phase };
            // A container waiting (crash loop, image pull...) says why, as kubectl shows it.
            let waiting = status["containerStatuses"].as_array().and_then(|a| {
                a.iter().find_map(|c| c["state"]["waiting"]["reason"].as_str().filter(|r| !r.is_empty()))
            });
            let phase = match waiting {
                Some(r) if obj.metadata.deletion_timestamp.is_none() => r.split(':').next().unwrap_or(r).to_string(),
                _ => phase,
            };
            vec![name, format!("{ready}/{total}"), phase, n(&status["restartCount"]).to_string(), created]
        }
        "Node" => {
            let ready = condition(&status, "Ready").map(|c| c["status"] == "True").unwrap_or(false);
            let mut st = if ready { "Ready".to_string() } else { "NotReady".to_string() };
            if spec["unschedulable"] == true {
                st.push_str(",SchedulingDisabled");
            }
            vec![name, st, created]
        }
        "Job" => {
            let st = ["Complete", "Failed"]
                .iter()
                .find(|t| condition(&status, t).is_some_and(|c| c["status"] == "True"))
                .map_or(if n(&status["active"]) > 0 { "Running" } else { "Pending" }, |t| t);
            vec![
                name,
                st.to_string(),
                format!("{}/{}", n(&status["succeeded"]), spec["completions"].as_u64().unwrap_or(1)),
                created,
            ]
        }
        "Workflow" => {
            let phase = s(&status["phase"]);
            vec![name, if phase.is_empty() { "Pending".into() } else { phase }, created]
        }
        "Service" => {
            let ports = spec["ports"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            let proto = p["protocol"].as_str().unwrap_or("TCP");
                            match p["nodePort"].as_u64() {
                                Some(np) => format!("{}:{np}/{proto}", n(&p["port"])),
                                None => format!("{}/{proto}", n(&p["port"])),
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let addr = status["clusterAddress"].as_str().unwrap_or(if spec["headless"] == true {
                "None"
            } else {
                "<pending>"
            });
            let ty = spec["type"].as_str().unwrap_or("ClusterInternal").to_string();
            vec![name, ty, addr.to_string(), ports, n(&status["readyEndpoints"]).to_string(), created]
        }
        "EndpointSlice" => {
            let svc = obj.metadata.labels.get(orch_core::kinds::SERVICE_NAME_LABEL).cloned().unwrap_or_default();
            let eps = spec["endpoints"].as_array().map_or(0, Vec::len);
            vec![name, svc, eps.to_string(), created]
        }
        "VolumeClaim" => {
            let phase = status["phase"].as_str().unwrap_or("Pending");
            let phase = if obj.metadata.deletion_timestamp.is_some() { "Terminating" } else { phase };
            vec![
                name,
                phase.to_string(),
                status["volumeName"].as_str().unwrap_or("").to_string(),
                s(&spec["size"]),
                spec["accessMode"].as_str().unwrap_or("ReadWriteOnce").to_string(),
                s(&spec["volumeClass"]),
                created,
            ]
        }
        "PersistentVolume" => {
            let modes = spec["accessModes"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            let claim = &spec["claimRef"];
            let claim = if claim.is_object() {
                format!("{}/{}", s(&claim["namespace"]), s(&claim["name"]))
            } else {
                String::new()
            };
            vec![
                name,
                s(&spec["capacity"]),
                modes,
                spec["reclaimPolicy"].as_str().unwrap_or("Delete").to_string(),
                status["phase"].as_str().unwrap_or("Available").to_string(),
                claim,
                s(&spec["nodeName"]),
                created,
            ]
        }
        "Event" => {
            let io = &spec["involvedObject"];
            let last = spec["lastTimestamp"].as_str().and_then(|t| orch_core::Timestamp::parse_rfc3339(t).ok());
            vec![
                age(last.or(obj.metadata.creation_timestamp)),
                s(&spec["type"]),
                s(&spec["reason"]),
                format!("{}/{}", s(&io["kind"]).to_ascii_lowercase(), s(&io["name"])),
                s(&spec["message"]),
            ]
        }
        _ => vec![name, created],
    };
    if wide {
        match obj.kind.as_str() {
            "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" => {
                let (names, cmds) = containers(&spec);
                r.extend([names, cmds, selector_text(&spec)]);
            }
            "Workload" => r.extend([spec["nodeName"].as_str().unwrap_or("<none>").to_string(), s(&status["reason"])]),
            "Node" => r.extend([
                s(&status["allocatable"]["cpu"]),
                s(&status["allocatable"]["memory"]),
                obj.metadata.labels.get("orch.dev/version").cloned().unwrap_or_default(),
            ]),
            _ => {}
        }
    }
    r
}

fn rows_text(objs: &[DynamicObject], kind: &str, wide: bool, all_ns: bool, header: bool) -> String {
    let mut cols = columns(kind, wide);
    let mut rows: Vec<Vec<String>> = objs.iter().map(|o| row(o, wide)).collect();
    if all_ns {
        cols.insert(0, "NAMESPACE");
        for (r, o) in rows.iter_mut().zip(objs) {
            r.insert(0, o.metadata.namespace.clone());
        }
    }
    table(&cols, &rows, header)
}

pub(crate) async fn run(conn: &ConnArgs, args: GetArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let (word, names) = split_targets(&args.targets)?;
    let kind = client.kind(&word)?.clone();
    let ns = if kind.namespaced && !args.all_namespaces { Some(client.namespace.clone()) } else { None };
    let labels: LabelSelector = match &args.selector {
        Some(t) => LabelSelector::parse(t).map_err(|e| format!("-l {t:?}: {e}"))?,
        None => LabelSelector::default(),
    };
    let fields: FieldSelector = match &args.field_selector {
        Some(t) => FieldSelector::parse(t).map_err(|e| format!("--field-selector {t:?}: {e}"))?,
        None => FieldSelector::default(),
    };
    let mut sel = Selection::kind(&kind.kind).with_labels(labels).with_fields(fields);
    if let Some(ns) = &ns {
        sel = sel.in_namespace(ns.clone());
    }
    let (objs, revision) = if names.is_empty() {
        let list = client.store.list(&ListRequest::new(sel.clone())).await?;
        let mut items: Vec<DynamicObject> = list.items.iter().map(|o| (**o).clone()).collect();
        items.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
        (items, list.revision)
    } else {
        let mut items = Vec::new();
        for name in &names {
            let key = ObjectKey::new(&kind.kind, ns.clone().unwrap_or_default(), name);
            items.push((*client.store.get(&key).await?).clone());
        }
        (items, client.store.current_revision().await?)
    };
    let wide = args.output == Output::Wide;
    let all_ns = args.all_namespaces && kind.namespaced;
    match &args.output {
        Output::Table | Output::Wide => {
            if objs.is_empty() && !args.watch {
                match &ns {
                    Some(ns) => eprintln!("No {} found in namespace {ns}.", kind.name),
                    None => eprintln!("No {} found.", kind.name),
                }
            } else {
                out!("{}", rows_text(&objs, &kind.kind, wide, all_ns, !args.no_headers));
            }
        }
        Output::Yaml => {
            if !objs.is_empty() {
                out!("{}", to_yaml(&objs));
            }
        }
        Output::Json => {
            let v = if names.len() == 1 {
                to_value(&objs[0])
            } else {
                serde_json::json!({"apiVersion": "orch.dev/v1", "kind": format!("{}List", kind.kind), "items": objs.iter().map(to_value).collect::<Vec<_>>()})
            };
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Name => {
            for o in &objs {
                outln!("{}/{}", o.kind.to_ascii_lowercase(), o.metadata.name);
            }
        }
        Output::JsonPath(t) => {
            // One named object is the template's root; otherwise the list is, as with kubectl.
            let v = if names.len() == 1 {
                to_value(&objs[0])
            } else {
                serde_json::json!({"kind": format!("{}List", kind.kind), "items": objs.iter().map(to_value).collect::<Vec<_>>()})
            };
            out!("{}", t.render(&v));
        }
    }
    if !args.watch {
        return Ok(());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut stream = client.store.watch(&WatchRequest::from(sel, revision + 1)).await?;
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        let (obj, deleted) = match &ev {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => (o, false),
            WatchEvent::Deleted(o) => (o, true),
            _ => continue,
        };
        if !names.is_empty() && !names.contains(&obj.metadata.name) {
            continue;
        }
        match &args.output {
            Output::Table | Output::Wide => {
                let mut text = rows_text(std::slice::from_ref(obj), &kind.kind, wide, all_ns, false);
                if deleted {
                    text = text.trim_end().to_string() + "   (deleted)\n";
                }
                out!("{text}");
            }
            Output::Yaml => out!("---\n{}", to_yaml(std::slice::from_ref(obj))),
            Output::Json => outln!("{}", serde_json::to_string(&to_value(obj))?),
            Output::Name => outln!("{}/{}", obj.kind.to_ascii_lowercase(), obj.metadata.name),
            Output::JsonPath(t) => outln!("{}", t.render(&to_value(obj))),
        }
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(v: serde_json::Value) -> DynamicObject {
        orch_core::RawJson::from_value(&v).decode().unwrap()
    }

    #[test]
    fn jsonpath_picks_fields_indexes_and_every_item() {
        let v = serde_json::json!({"items": [
            {"metadata": {"name": "a"}, "status": {"phase": "Running", "n": 2}},
            {"metadata": {"name": "b"}, "status": {}}
        ]});
        let t = |s: &str| JsonPath::parse(s).unwrap().render(&v);
        assert_eq!(t("{.items[*].metadata.name}"), "a b");
        assert_eq!(t("{.items[0].status.phase}/{.items[0].status.n}{\"\\n\"}"), "Running/2\n");
        assert_eq!(t("x{.items[1].status.phase}y"), "xy", "a missing field is empty");
        assert!(JsonPath::parse("{.items[x]}").unwrap_err().contains("is not an index"));
        assert!(JsonPath::parse("{.status").unwrap_err().contains("not closed"));
        assert!(parse_output("xml").unwrap_err().contains("jsonpath=TEMPLATE"));
    }

    #[test]
    fn claims_and_volumes_show_their_binding() {
        let claim = dynamic(serde_json::json!({
            "kind": "VolumeClaim",
            "metadata": {"name": "data-db-0", "namespace": "default"},
            "spec": {"size": "1Gi", "volumeClass": "local"},
            "status": {"phase": "Bound", "volumeName": "pvc-1"}
        }));
        assert_eq!(columns("VolumeClaim", false).len(), row(&claim, false).len());
        assert_eq!(row(&claim, false)[..6], ["data-db-0", "Bound", "pvc-1", "1Gi", "ReadWriteOnce", "local"]);
        let pv = dynamic(serde_json::json!({
            "kind": "PersistentVolume",
            "metadata": {"name": "pvc-1"},
            "spec": {"capacity": "1Gi", "accessModes": ["ReadWriteOnce"], "volumeClass": "local",
                     "reclaimPolicy": "Retain", "nodeName": "n1",
                     "claimRef": {"namespace": "default", "name": "data-db-0"}},
            "status": {"phase": "Released"}
        }));
        assert_eq!(columns("PersistentVolume", false).len(), row(&pv, false).len());
        assert_eq!(
            row(&pv, false)[..7],
            ["pvc-1", "1Gi", "ReadWriteOnce", "Retain", "Released", "default/data-db-0", "n1"]
        );
    }
}
