//! `orch describe`: one object for people: identity, spec, status, conditions, recent events,
//! and for a workload that does not run, why.

use orch_core::{DynamicObject, ListRequest, ObjectKey, Selection};
use serde_json::Value;

use super::BoxError;
use super::client::{Client, ConnArgs, age, bold, map_text, split_targets, table, yellow};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch describe deployment web
  orch describe wl/web-7c9f-x2k4q      # a pending workload says why it waits
  orch describe node node-1")]
pub(crate) struct DescribeArgs {
    /// A kind, then names (or `kind/name`).
    #[arg(required = true)]
    targets: Vec<String>,
}

fn indent_yaml(v: &Value) -> String {
    let text = serde_saphyr::to_string(v).unwrap_or_default();
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn ts(v: &Value) -> String {
    v.as_str()
        .and_then(|t| orch_core::Timestamp::parse_rfc3339(t).ok())
        .map(|t| age(Some(t)))
        .unwrap_or_else(|| "-".into())
}

/// The events about an object, oldest first.
async fn events_of(client: &Client, obj: &DynamicObject) -> Result<Vec<DynamicObject>, BoxError> {
    let mut sel = Selection::kind("Event");
    let ns = if obj.metadata.namespace.is_empty() { "default".to_string() } else { obj.metadata.namespace.clone() };
    sel = sel.in_namespace(ns);
    let list = client.store.list(&ListRequest::new(sel)).await?;
    let mut evs: Vec<DynamicObject> = list
        .items
        .iter()
        .filter(|e| {
            let io = &e.spec.to_value()["involvedObject"];
            io["kind"] == obj.kind.as_str() && io["name"] == obj.metadata.name.as_str()
        })
        .map(|e| (**e).clone())
        .collect();
    evs.sort_by_key(|e| e.spec.to_value()["lastTimestamp"].as_str().unwrap_or_default().to_string());
    Ok(evs)
}

/// Why a workload is not running, from its conditions and status.
fn pending_reason(status: &Value) -> Option<String> {
    let phase = status["phase"].as_str().unwrap_or("Pending");
    if phase != "Pending" {
        return None;
    }
    let conds = status["conditions"].as_array().cloned().unwrap_or_default();
    if let Some(c) = conds.iter().find(|c| c["type"] == "Scheduled" && c["status"] != "True") {
        return Some(format!(
            "not scheduled: {} {}",
            c["reason"].as_str().unwrap_or(""),
            c["message"].as_str().unwrap_or("")
        ));
    }
    if conds.iter().all(|c| c["type"] != "Scheduled") {
        return Some("waiting for the scheduler to place it".into());
    }
    let msg = status["message"].as_str().unwrap_or_default();
    Some(if msg.is_empty() { "scheduled; waiting for its node to start it".into() } else { msg.to_string() })
}

pub(crate) async fn describe_one(client: &Client, obj: &DynamicObject) -> Result<String, BoxError> {
    let mut out = String::new();
    let m = &obj.metadata;
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{:<14}{v}\n", bold(&format!("{k}:"))));
    line(&mut out, "Name", m.name.clone());
    if !m.namespace.is_empty() {
        line(&mut out, "Namespace", m.namespace.clone());
    }
    line(&mut out, "Kind", obj.kind.clone());
    line(&mut out, "Labels", map_text(&m.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
    let annotations: std::collections::BTreeMap<String, String> = m
        .annotations
        .iter()
        .filter(|(k, _)| *k != super::apply::LAST_APPLIED)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    line(&mut out, "Annotations", map_text(&annotations));
    line(&mut out, "Created", m.creation_timestamp.map(|t| format!("{t} ({} ago)", age(Some(t)))).unwrap_or_default());
    if let Some(o) = m.controller_owner() {
        line(&mut out, "Controlled By", format!("{}/{}", o.kind.to_ascii_lowercase(), o.name));
    }
    if let Some(t) = m.deletion_timestamp {
        line(&mut out, "Deleting", format!("since {t}"));
    }
    let spec = obj.spec.to_value();
    let mut status = obj.status.to_value();
    if obj.kind == "Workload"
        && let Some(why) = pending_reason(&status)
    {
        line(&mut out, "Pending", yellow(&why));
    }
    if !spec.is_null() {
        out.push_str(&format!("{}\n{}", bold("Spec:"), indent_yaml(&spec)));
    }
    let conditions = status.as_object_mut().and_then(|o| o.remove("conditions"));
    if status.as_object().is_some_and(|o| !o.is_empty()) {
        out.push_str(&format!("{}\n{}", bold("Status:"), indent_yaml(&status)));
    }
    if let Some(Value::Array(cs)) = conditions {
        let rows: Vec<Vec<String>> = cs
            .iter()
            .map(|c| {
                vec![
                    c["type"].as_str().unwrap_or_default().into(),
                    c["status"].as_str().unwrap_or_default().into(),
                    c["reason"].as_str().unwrap_or_default().into(),
                    ts(&c["lastTransitionTime"]),
                    c["message"].as_str().unwrap_or_default().into(),
                ]
            })
            .collect();
        out.push_str(&format!("{}\n", bold("Conditions:")));
        for l in table(&["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], &rows, true).lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    if obj.kind == "Deployment" {
        let revisions = orch_controllers::deployment::history(client.store.clone(), &m.namespace, &m.name).await?;
        if !revisions.is_empty() {
            out.push_str(&format!("{}\n", bold("Revisions:")));
            let rows: Vec<Vec<String>> = revisions
                .iter()
                .map(|(n, rs)| {
                    vec![
                        n.to_string(),
                        rs.metadata.name.clone(),
                        format!("{}/{}", rs.status.ready_replicas, rs.spec.replicas),
                    ]
                })
                .collect();
            for l in table(&["REVISION", "NAME", "READY"], &rows, true).lines() {
                out.push_str(&format!("  {l}\n"));
            }
        }
        // Workloads of the deployment that do not run, and why.
        let sel = Selection::kind("Workload")
            .in_namespace(m.namespace.clone())
            .with_labels(serde_json::from_value(spec["selector"].clone()).unwrap_or_default());
        let list = client.store.list(&ListRequest::new(sel)).await?;
        let pending: Vec<String> = list
            .items
            .iter()
            .filter_map(|w| pending_reason(&w.status.to_value()).map(|why| format!("  {}: {why}\n", w.metadata.name)))
            .collect();
        if !pending.is_empty() {
            out.push_str(&format!("{}\n", bold("Pending workloads:")));
            out.extend(pending);
        }
    }
    let events = events_of(client, obj).await?;
    out.push_str(&bold("Events:"));
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        out.push('\n');
        let rows: Vec<Vec<String>> = events
            .iter()
            .rev()
            .take(20)
            .rev()
            .map(|e| {
                let s = e.spec.to_value();
                let ty = s["type"].as_str().unwrap_or_default().to_string();
                vec![
                    if ty == "Warning" { yellow(&ty) } else { ty },
                    s["reason"].as_str().unwrap_or_default().into(),
                    ts(&s["lastTimestamp"]),
                    s["count"].as_u64().unwrap_or(1).to_string(),
                    s["message"].as_str().unwrap_or_default().into(),
                ]
            })
            .collect();
        for l in table(&["TYPE", "REASON", "AGE", "COUNT", "MESSAGE"], &rows, true).lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    Ok(out)
}

pub(crate) async fn run(conn: &ConnArgs, args: DescribeArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let (word, names) = split_targets(&args.targets)?;
    let kind = client.kind(&word)?.clone();
    let ns = client.ns_for(&kind.kind);
    let objs: Vec<DynamicObject> = if names.is_empty() {
        let mut sel = Selection::kind(&kind.kind);
        if kind.namespaced {
            sel = sel.in_namespace(ns.clone());
        }
        client.store.list(&ListRequest::new(sel)).await?.items.iter().map(|o| (**o).clone()).collect()
    } else {
        let mut v = Vec::new();
        for n in &names {
            v.push((*client.store.get(&ObjectKey::new(&kind.kind, &ns, n)).await?).clone());
        }
        v
    };
    for (i, o) in objs.iter().enumerate() {
        if i > 0 {
            outln!();
        }
        out!("{}", describe_one(&client, o).await?);
    }
    Ok(())
}
