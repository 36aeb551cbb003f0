//! Label selectors (equality and set-based) and field selectors.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::labels::Labels;
use crate::object::DynamicObject;
use crate::validation;

/// One condition on a label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// `key=value`: the label is present with this value.
    Equals(String, String),
    /// `key!=value`: the label is absent or has another value.
    NotEquals(String, String),
    /// `key in (a,b)`: the label is present with one of the values.
    In(String, BTreeSet<String>),
    /// `key notin (a,b)`: the label is absent or has none of the values.
    NotIn(String, BTreeSet<String>),
    /// `key`: the label is present.
    Exists(String),
    /// `!key`: the label is absent.
    DoesNotExist(String),
}

impl Requirement {
    /// The label key this requirement looks at.
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    /// True when `labels` satisfy this requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// Selects objects by their labels: every requirement must hold. The empty selector selects
/// everything.
///
/// Parses from the familiar text form and serializes in the structured form used in specs:
/// ```
/// use orch_core::{LabelSelector, Labels};
///
/// let s: LabelSelector = "app=web, tier in (front,edge), !canary".parse().unwrap();
/// let labels = Labels::from([("app", "web"), ("tier", "edge")]);
/// assert!(s.matches(&labels));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// The selector that matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// A selector from requirements, each checked for valid keys and values.
    pub fn new(requirements: Vec<Requirement>) -> Result<Self> {
        let s = LabelSelector { requirements };
        s.validate("selector")?;
        Ok(s)
    }

    /// A selector requiring every given label to be equal.
    pub fn from_labels<K: Into<String>, V: Into<String>>(labels: impl IntoIterator<Item = (K, V)>) -> Self {
        LabelSelector {
            requirements: labels.into_iter().map(|(k, v)| Requirement::Equals(k.into(), v.into())).collect(),
        }
    }

    /// Adds a requirement (builder style).
    pub fn and(mut self, r: Requirement) -> Self {
        self.requirements.push(r);
        self
    }

    /// The requirements, all of which must hold.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// True for the selector that matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// True when `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Checks keys and values, reporting errors under `field`.
    pub fn validate(&self, field: &str) -> Result<()> {
        let mut v = validation::Validator::new();
        for (i, r) in self.requirements.iter().enumerate() {
            v.check_with(|| format!("{field}[{i}].key"), validation::qualified_name(r.key()));
            match r {
                Requirement::Equals(_, val) | Requirement::NotEquals(_, val) => {
                    v.check_with(|| format!("{field}[{i}].values"), validation::label_value(val))
                }
                Requirement::In(_, vs) | Requirement::NotIn(_, vs) => {
                    if vs.is_empty() {
                        v.reject(format!("{field}[{i}].values"), "must not be empty for in/notin");
                    }
                    for val in vs {
                        v.check_with(|| format!("{field}[{i}].values"), validation::label_value(val));
                    }
                }
                Requirement::Exists(_) | Requirement::DoesNotExist(_) => {}
            }
        }
        v.finish().map_err(|source| Error::Invalid { kind: "LabelSelector".into(), source })
    }

    /// Parses the text form: comma-separated `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
    /// `k notin (a,b)`, `k`, `!k`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid("LabelSelector", "selector", reason);
        let mut requirements = Vec::new();
        let mut rest = text.trim();
        while !rest.is_empty() {
            // A term ends at a comma outside parentheses.
            let mut depth = 0i32;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let term = rest[..end].trim();
            rest = rest.get(end + 1..).unwrap_or("").trim();
            if term.is_empty() {
                return Err(bad(format!("empty term in {text:?}")));
            }
            requirements.push(parse_term(term).map_err(bad)?);
        }
        Self::new(requirements)
    }
}

fn parse_set(s: &str) -> Result<BTreeSet<String>, String> {
    let s = s.trim();
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised list, found {s:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(k.trim().into(), v.trim().into()));
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or("").trim();
    let rest = words.next().unwrap_or("").trim();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key.into()));
    }
    if let Some(set) = rest.strip_prefix("notin") {
        return Ok(Requirement::NotIn(key.into(), parse_set(set)?));
    }
    if let Some(set) = rest.strip_prefix("in") {
        return Ok(Requirement::In(key.into(), parse_set(set)?));
    }
    Err(format!("cannot parse {term:?}: expected =, !=, in, notin or a bare key"))
}

impl std::str::FromStr for LabelSelector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        LabelSelector::parse(s)
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The structured form of a label selector, as written in specs.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SelectorForm {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    match_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    match_expressions: Vec<ExpressionForm>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExpressionForm {
    key: String,
    operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    values: Vec<String>,
}

impl Serialize for LabelSelector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut form = SelectorForm::default();
        for r in &self.requirements {
            let (key, operator, values): (&str, &str, Vec<String>) = match r {
                Requirement::Equals(k, v) if !form.match_labels.contains_key(k) => {
                    form.match_labels.insert(k.clone(), v.clone());
                    continue;
                }
                Requirement::Equals(k, v) => (k, "In", vec![v.clone()]),
                Requirement::NotEquals(k, v) => (k, "NotIn", vec![v.clone()]),
                Requirement::In(k, vs) => (k, "In", vs.iter().cloned().collect()),
                Requirement::NotIn(k, vs) => (k, "NotIn", vs.iter().cloned().collect()),
                Requirement::Exists(k) => (k, "Exists", vec![]),
                Requirement::DoesNotExist(k) => (k, "DoesNotExist", vec![]),
            };
            form.match_expressions.push(ExpressionForm { key: key.into(), operator: operator.into(), values });
        }
        form.serialize(s)
    }
}

impl<'de> Deserialize<'de> for LabelSelector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let form = SelectorForm::deserialize(d)?;
        let mut requirements: Vec<Requirement> =
            form.match_labels.into_iter().map(|(k, v)| Requirement::Equals(k, v)).collect();
        for e in form.match_expressions {
            let set: BTreeSet<String> = e.values.into_iter().collect();
            requirements.push(match e.operator.as_str() {
                "In" => Requirement::In(e.key, set),
                "NotIn" => Requirement::NotIn(e.key, set),
                "Exists" => Requirement::Exists(e.key),
                "DoesNotExist" => Requirement::DoesNotExist(e.key),
                other => {
                    return Err(D::Error::custom(format!(
                        "matchExpressions.operator: unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    )));
                }
            });
        }
        Ok(LabelSelector { requirements })
    }
}

/// One condition on a field: `path=value` or `path!=value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldRequirement {
    /// Dotted path: `metadata.name`, `metadata.namespace`, or any path under `spec.` / `status.`.
    pub path: String,
    /// The value compared against; a missing field reads as the empty string.
    pub value: String,
    /// True for `!=`.
    pub negated: bool,
}

/// Selects objects by field values, e.g. `spec.nodeName=node-7` for the workloads of one node.
/// The empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// The selector that matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Requires `path` to equal `value`.
    pub fn equals(path: impl Into<String>, value: impl Into<String>) -> Self {
        Self::everything().and(FieldRequirement { path: path.into(), value: value.into(), negated: false })
    }

    /// Adds a requirement (builder style).
    pub fn and(mut self, r: FieldRequirement) -> Self {
        self.requirements.push(r);
        self
    }

    /// The requirements, all of which must hold.
    pub fn requirements(&self) -> &[FieldRequirement] {
        &self.requirements
    }

    /// True for the selector that matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parses `path=value,path!=value`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut s = FieldSelector::default();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, value, negated) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, v, false)
            } else {
                return Err(Error::invalid(
                    "FieldSelector",
                    "selector",
                    format!("{term:?} must be path=value or path!=value"),
                ));
            };
            s.requirements.push(FieldRequirement { path: path.trim().into(), value: value.trim().into(), negated });
        }
        s.validate()?;
        Ok(s)
    }

    /// Checks that every path names a selectable field.
    pub fn validate(&self) -> Result<()> {
        for r in &self.requirements {
            let ok = matches!(r.path.as_str(), "metadata.name" | "metadata.namespace")
                || (r.path.starts_with("spec.") || r.path.starts_with("status."))
                    && r.path.split('.').all(|p| !p.is_empty());
            if !ok {
                return Err(Error::invalid(
                    "FieldSelector",
                    "selector",
                    format!(
                        "{:?} is not selectable: use metadata.name, metadata.namespace, or a path under spec. or status.",
                        r.path
                    ),
                ));
            }
        }
        Ok(())
    }

    /// True when the object satisfies every requirement.
    pub fn matches(&self, obj: &DynamicObject) -> bool {
        if self.requirements.is_empty() {
            return true;
        }
        let mut spec = None;
        let mut status = None;
        self.requirements.iter().all(|r| {
            let actual = match r.path.as_str() {
                "metadata.name" => obj.metadata.name.clone(),
                "metadata.namespace" => obj.metadata.namespace.clone(),
                path => {
                    let (doc, rest) = if let Some(rest) = path.strip_prefix("spec.") {
                        (spec.get_or_insert_with(|| obj.spec.to_value()), rest)
                    } else if let Some(rest) = path.strip_prefix("status.") {
                        (status.get_or_insert_with(|| obj.status.to_value()), rest)
                    } else {
                        return false;
                    };
                    let pointer = format!("/{}", rest.replace('.', "/"));
                    match doc.pointer(&pointer) {
                        None | Some(serde_json::Value::Null) => String::new(),
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                    }
                }
            };
            (actual == r.value) != r.negated
        })
    }
}

impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}{}{}", r.path, if r.negated { "!=" } else { "=" }, r.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ObjectMeta;
    use crate::object::RawJson;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn set_based_semantics() {
        let s = LabelSelector::parse("app=web,env!=prod,tier in (a, b),zone notin (z1),gpu,!canary").unwrap();
        assert_eq!(s.requirements().len(), 6);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("gpu", ""), ("canary", "1")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("gpu", ""), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("gpu", ""), ("zone", "z1")])));
        assert!(LabelSelector::everything().matches(&labels(&[])));
        assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn bad_selectors_are_refused() {
        assert!(LabelSelector::parse("app in (").is_err());
        assert!(LabelSelector::parse("Bad Key=1").is_err());
        assert!(LabelSelector::parse("a,,b").is_err());
        assert!(LabelSelector::parse("x in ()").is_err());
        assert!(FieldSelector::parse("spec..x=1").is_err());
        assert!(FieldSelector::parse("metadata.labels=1").is_err());
        assert!(FieldSelector::parse("novalue").is_err());
    }

    #[test]
    fn structured_form_round_trips() {
        let s = LabelSelector::parse("app=web,tier in (a,b),!canary").unwrap();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["matchLabels"]["app"], "web");
        let back: LabelSelector = serde_json::from_value(json).unwrap();
        assert!(back.matches(&labels(&[("app", "web"), ("tier", "b")])));
        assert!(!back.matches(&labels(&[("app", "web"), ("tier", "c")])));
        let err = serde_json::from_str::<LabelSelector>(r#"{"matchExpressions":[{"key":"a","operator":"Near"}]}"#);
        assert!(err.unwrap_err().to_string().contains("unknown operator"));
    }

    #[test]
    fn field_selector_reads_spec_paths() {
        let mut o = DynamicObject::new("Workload", ObjectMeta::namespaced("ns", "w"));
        o.spec = RawJson::parse(r#"{"nodeName":"n1","priority":5}"#).unwrap();
        assert!(FieldSelector::parse("spec.nodeName=n1").unwrap().matches(&o));
        assert!(FieldSelector::parse("spec.priority=5,metadata.name=w").unwrap().matches(&o));
        assert!(!FieldSelector::parse("spec.nodeName!=n1").unwrap().matches(&o));
        assert!(FieldSelector::parse("status.phase=").unwrap().matches(&o));
    }
}
