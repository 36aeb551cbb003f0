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
/// # Text form
/// Kubernetes' label selector syntax: requirements separated by commas, each one of
///
/// | text | requirement |
/// |---|---|
/// | `key` | the label is present |
/// | `!key` | the label is absent |
/// | `key=value`, `key==value` | present with this value (`key=` for the empty value) |
/// | `key!=value` | absent, or another value |
/// | `key in (v1,v2)` | present with one of the values |
/// | `key notin (v1,v2)` | absent, or none of the values |
///
/// Keys are qualified names (`app`, `example.com/tier`), values label values (up to 63
/// letters, digits, `-`, `_`, `.`, starting and ending with a letter or digit). Whitespace
/// around keys, operators, values, parentheses and commas is ignored.
///
/// Commas between requirements separate requirements, never an empty one: the empty text
/// selects everything, and a stray comma (`,a`, `a,`, `a,,b`) is refused. Inside a list, as
/// in Kubernetes, commas separate values, and a value may be empty as it may after `=`:
/// `a in (b,,c)` is `b`, the empty value and `c`, and `a in ()` is the empty value alone. An
/// error names the byte offset of the first character that does not fit and why.
/// [`to_string`](ToString::to_string) gives text that parses back to an equal selector.
///
/// # Structured form
/// Serde reads and writes the form used in specs, `matchLabels` (a map of key to value) and
/// `matchExpressions` (a list of `{key, operator, values}` with operator `In`, `NotIn`,
/// `Exists` or `DoesNotExist`), checked by the same rules: `In` and `NotIn` need at least one
/// value (the empty value counts, as it does in `a in ()`),
/// `Exists` and `DoesNotExist` take none. Errors name the field (`matchExpressions[0].values`).
///
/// A selector built in code ([`from_labels`](Self::from_labels), [`and`](Self::and)) is not
/// checked until [`validate`](Self::validate); stores check every selector they are given.
///
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

    /// Checks keys and values, reporting errors under `field` (`{field}[i].key`,
    /// `{field}[i].values`): keys must be qualified names, values label values, and `in` /
    /// `notin` need at least one value, none of them empty (see [`LabelSelector`]).
    pub fn validate(&self, field: &str) -> Result<()> {
        let mut v = validation::Validator::new();
        for (i, r) in self.requirements.iter().enumerate() {
            check_requirement(r, &mut v, || format!("{field}[{i}].key"), || format!("{field}[{i}].values"));
        }
        v.finish().map_err(|source| Error::Invalid { kind: "LabelSelector".into(), source })
    }

    /// Parses the text form (see [`LabelSelector`] for the grammar). An error names the byte
    /// offset of the first character that does not fit, and why.
    pub fn parse(text: &str) -> Result<Self> {
        let mut c = Cursor::new(text, "LabelSelector");
        let mut requirements = Vec::new();
        c.skip_ws();
        if c.at_end() {
            return Ok(Self::everything());
        }
        loop {
            requirements.push(parse_requirement(&mut c)?);
            c.skip_ws();
            if c.at_end() {
                break;
            }
            if !c.eat(",") {
                return Err(c.fail(c.pos, "expected ',' or the end"));
            }
            c.skip_ws();
        }
        Ok(LabelSelector { requirements })
    }
}

/// Checks one requirement: a qualified-name key, label values, and a set of values exactly when
/// the operator takes one.
fn check_requirement(
    r: &Requirement,
    v: &mut validation::Validator,
    key_field: impl FnOnce() -> String,
    values_field: impl Fn() -> String,
) {
    v.check_with(key_field, validation::qualified_name(r.key()));
    match r {
        Requirement::Equals(_, val) | Requirement::NotEquals(_, val) => {
            v.check_with(&values_field, validation::label_value(val))
        }
        Requirement::In(_, vs) | Requirement::NotIn(_, vs) => {
            if vs.is_empty() {
                v.reject(values_field(), "must not be empty for in/notin");
            }
            for val in vs {
                v.check_with(&values_field, validation::label_value(val));
            }
        }
        Requirement::Exists(_) | Requirement::DoesNotExist(_) => {}
    }
}

/// A position in selector text, for the parsers of both selectors: every error names the byte
/// offset of the first character that does not fit.
struct Cursor<'a> {
    text: &'a str,
    pos: usize,
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str, kind: &'static str) -> Self {
        Cursor { text, pos: 0, kind }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn at_end(&self) -> bool {
        self.pos == self.text.len()
    }

    fn eat(&mut self, s: &str) -> bool {
        let ok = self.text[self.pos..].starts_with(s);
        if ok {
            self.pos += s.len();
        }
        ok
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += self.peek().map_or(0, char::len_utf8);
        }
    }

    /// Moves past characters while `ok`, returning where the run started and the run.
    fn take_while(&mut self, ok: impl Fn(char) -> bool) -> (usize, &'a str) {
        let start = self.pos;
        while let Some(c) = self.peek().filter(|&c| ok(c)) {
            self.pos += c.len_utf8();
        }
        (start, &self.text[start..self.pos])
    }

    /// What is at `at`, for messages.
    fn found(&self, at: usize) -> String {
        match self.text[at..].chars().next() {
            None => "the end".into(),
            Some(c) => format!("{c:?}"),
        }
    }

    /// An `Invalid` error naming the byte offset `at`, what is there, and `reason`.
    fn fail(&self, at: usize, reason: impl fmt::Display) -> Error {
        Error::invalid(self.kind, "selector", format!("at byte {at} ({}) of {:?}: {reason}", self.found(at), self.text))
    }
}

/// A key or value token: Kubernetes' identifier, anything up to whitespace or `!=,()`.
fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '!' | '=' | ',' | '(' | ')')
}

fn parse_key(c: &mut Cursor<'_>) -> Result<String> {
    let (at, key) = c.take_while(is_word_char);
    if key.is_empty() {
        return Err(c.fail(at, "expected a label key"));
    }
    validation::qualified_name(key).map_err(|why| c.fail(at, format!("label key: {why}")))?;
    Ok(key.to_string())
}

/// A label value, possibly empty when what follows may end it (`a=,b`, `a in (b,,c)`).
fn parse_value(c: &mut Cursor<'_>, ends: &[Option<char>]) -> Result<String> {
    c.skip_ws();
    let (at, value) = c.take_while(is_word_char);
    if value.is_empty() && !ends.contains(&c.peek()) {
        return Err(c.fail(at, "expected a label value"));
    }
    validation::label_value(value).map_err(|why| c.fail(at, format!("label value: {why}")))?;
    Ok(value.to_string())
}

fn parse_set(c: &mut Cursor<'_>) -> Result<BTreeSet<String>> {
    c.skip_ws();
    if !c.eat("(") {
        return Err(c.fail(c.pos, "expected '(' and a list of values"));
    }
    let mut set = BTreeSet::new();
    loop {
        set.insert(parse_value(c, &[Some(','), Some(')')])?);
        c.skip_ws();
        if c.eat(")") {
            return Ok(set);
        }
        if !c.eat(",") {
            return Err(c.fail(c.pos, "expected ',' or ')'"));
        }
    }
}

fn parse_requirement(c: &mut Cursor<'_>) -> Result<Requirement> {
    if c.eat("!") {
        c.skip_ws();
        return Ok(Requirement::DoesNotExist(parse_key(c)?));
    }
    let key = parse_key(c)?;
    c.skip_ws();
    if c.eat("!=") {
        return Ok(Requirement::NotEquals(key, parse_value(c, &[None, Some(',')])?));
    }
    if c.eat("==") || c.eat("=") {
        return Ok(Requirement::Equals(key, parse_value(c, &[None, Some(',')])?));
    }
    if matches!(c.peek(), None | Some(',')) {
        return Ok(Requirement::Exists(key));
    }
    let (at, word) = c.take_while(is_word_char);
    match word {
        "in" => Ok(Requirement::In(key, parse_set(c)?)),
        "notin" => Ok(Requirement::NotIn(key, parse_set(c)?)),
        _ => Err(c.fail(at, "expected '=', '==', '!=', 'in', 'notin', ',' or the end after the key")),
    }
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
    /// Reads the structured form, checked as strictly as the text form: keys must be qualified
    /// names, values label values, `In` / `NotIn` need a non-empty list of non-empty values and
    /// `Exists` / `DoesNotExist` none. Errors name the field (`matchExpressions[0].values`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let form = SelectorForm::deserialize(d)?;
        let mut v = validation::Validator::new();
        let mut requirements = Vec::with_capacity(form.match_labels.len() + form.match_expressions.len());
        for (k, val) in form.match_labels {
            let r = Requirement::Equals(k, val);
            check_requirement(&r, &mut v, || "matchLabels".into(), || format!("matchLabels.{}", r.key()));
            requirements.push(r);
        }
        for (i, e) in form.match_expressions.into_iter().enumerate() {
            let values_field = || format!("matchExpressions[{i}].values");
            let has_values = !e.values.is_empty();
            let set: BTreeSet<String> = e.values.into_iter().collect();
            let r = match e.operator.as_str() {
                "In" => Requirement::In(e.key, set),
                "NotIn" => Requirement::NotIn(e.key, set),
                "Exists" | "DoesNotExist" => {
                    if has_values {
                        v.reject(values_field(), format!("must be empty for {}", e.operator));
                    }
                    if e.operator == "Exists" { Requirement::Exists(e.key) } else { Requirement::DoesNotExist(e.key) }
                }
                other => {
                    v.reject(
                        format!("matchExpressions[{i}].operator"),
                        format!("unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"),
                    );
                    continue;
                }
            };
            check_requirement(&r, &mut v, || format!("matchExpressions[{i}].key"), values_field);
            requirements.push(r);
        }
        v.finish().map_err(D::Error::custom)?;
        Ok(LabelSelector { requirements })
    }
}

/// One condition on a field: `path=value` or `path!=value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldRequirement {
    /// Dotted path: `metadata.name`, `metadata.namespace`, or a path under `spec.` / `status.`
    /// (segments of letters, digits, `_` and `-`).
    pub path: String,
    /// The value compared against; a missing field reads as the empty string. No whitespace or
    /// control characters.
    pub value: String,
    /// True for `!=`.
    pub negated: bool,
}

/// Selects objects by field values, e.g. `spec.nodeName=node-7` for the workloads of one node.
/// The empty selector selects everything.
///
/// # Text form
/// Kubernetes' field selector syntax: terms separated by commas, each `path=value`,
/// `path==value` (the same) or `path!=value`.
///
/// - A path is `metadata.name`, `metadata.namespace`, or a dotted path under `spec.` or
///   `status.` (`spec.nodeName`, `status.phase`): segments of ASCII letters, digits, `_` and
///   `-`, none empty. A segment names an object key (or an array index) in the JSON of the
///   spec or status; a
///   number, boolean or `null` there compares as its JSON text, a missing field as `""`.
/// - A value is any text without whitespace or control characters, possibly empty
///   (`status.phase=` matches a missing phase). `,`, `=` and `\` in a value are written `\,`,
///   `\=` and `\\`, as in Kubernetes; any other backslash, or an unescaped `=`, is refused.
/// - Whitespace is allowed around terms, nowhere else. The empty text selects everything; a
///   stray comma (`,a=b`, `a=b,`) is refused.
///
/// An error names the byte offset of the first character that does not fit, and why.
/// [`to_string`](ToString::to_string) escapes values, so it parses back to an equal selector.
///
/// ```
/// use orch_core::FieldSelector;
///
/// let s = FieldSelector::parse("spec.nodeName=node-7,status.phase!=Failed").unwrap();
/// assert_eq!(s.to_string().parse::<FieldSelector>().unwrap(), s);
/// let e = FieldSelector::parse("spec.a b=1").unwrap_err();
/// assert!(e.to_string().contains("at byte 6"), "{e}");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

/// Why `path` cannot be selected on, if it cannot: the byte offset in it and the reason.
fn check_field_path(path: &str) -> Result<(), (usize, &'static str)> {
    let mut at = 0;
    for segment in path.split('.') {
        if segment.is_empty() {
            return Err((at, "empty path segment"));
        }
        if let Some(i) = segment.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')) {
            return Err((at + i, "a path segment holds only letters, digits, '_' and '-'"));
        }
        at += segment.len() + 1;
    }
    let selectable = matches!(path, "metadata.name" | "metadata.namespace")
        || path.strip_prefix("spec.").or_else(|| path.strip_prefix("status.")).is_some();
    if !selectable {
        return Err((0, "not selectable: use metadata.name, metadata.namespace, or a path under spec. or status."));
    }
    Ok(())
}

fn is_field_value_char(c: char) -> bool {
    !c.is_whitespace() && !c.is_control()
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

    /// Parses the text form (see [`FieldSelector`] for the grammar).
    pub fn parse(text: &str) -> Result<Self> {
        let mut c = Cursor::new(text, "FieldSelector");
        let mut s = FieldSelector::default();
        c.skip_ws();
        if c.at_end() {
            return Ok(s);
        }
        loop {
            let (at, path) = c.take_while(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.'));
            if path.is_empty() {
                return Err(c.fail(at, "expected a field path"));
            }
            check_field_path(path).map_err(|(i, why)| c.fail(at + i, format!("field path {path:?}: {why}")))?;
            let negated = if c.eat("!=") {
                true
            } else if c.eat("==") || c.eat("=") {
                false
            } else {
                return Err(c.fail(c.pos, format!("expected '=', '==' or '!=' after the field path {path:?}")));
            };
            let mut value = String::new();
            while let Some(ch) = c.peek() {
                match ch {
                    ',' => break,
                    '\\' => {
                        let at = c.pos;
                        c.pos += 1;
                        match c.peek() {
                            Some(e @ (',' | '=' | '\\')) => {
                                value.push(e);
                                c.pos += 1;
                            }
                            _ => return Err(c.fail(at, "invalid escape: only \\, \\= and \\\\ are allowed in a value")),
                        }
                    }
                    '=' => return Err(c.fail(c.pos, "'=' in a value must be escaped as \\=")),
                    ch if is_field_value_char(ch) => {
                        value.push(ch);
                        c.pos += ch.len_utf8();
                    }
                    _ => break,
                }
            }
            s.requirements.push(FieldRequirement { path: path.to_string(), value, negated });
            c.skip_ws();
            if c.at_end() {
                return Ok(s);
            }
            if !c.eat(",") {
                return Err(c.fail(c.pos, "expected ',' or the end"));
            }
            c.skip_ws();
        }
    }

    /// Checks every requirement against the grammar of the text form (a selector built in code
    /// is not checked until this, or a store, checks it): errors name `selector[i].path` or
    /// `selector[i].value` and why.
    pub fn validate(&self) -> Result<()> {
        let mut v = validation::Validator::new();
        for (i, r) in self.requirements.iter().enumerate() {
            if let Err((at, why)) = check_field_path(&r.path) {
                v.reject(format!("selector[{i}].path"), format!("{:?} at byte {at}: {why}", r.path));
            }
            if let Some(bad) = r.value.chars().find(|&c| !is_field_value_char(c)) {
                v.reject(
                    format!("selector[{i}].value"),
                    format!("{:?} holds {bad:?}: no whitespace or control characters in a value", r.value),
                );
            }
        }
        v.finish().map_err(|source| Error::Invalid { kind: "FieldSelector".into(), source })
    }

    /// True when the object satisfies every requirement.
    pub fn matches(&self, obj: &DynamicObject) -> bool {
        self.requirements.iter().all(|r| (field_value(obj, &r.path) == r.value) != r.negated)
    }

    /// The value an equality requirement (`path=value`, not `!=`) asks `path` to have, if there
    /// is one: what a store's field index can answer directly.
    pub fn equality_on(&self, path: &str) -> Option<&str> {
        self.requirements.iter().find(|r| !r.negated && r.path == path).map(|r| r.value.as_str())
    }
}

/// The value a field selector compares for `path` in `obj`, as text: `metadata.name` and
/// `metadata.namespace`, or a dotted path into `spec` or `status` (a string as it is; a number
/// or boolean as JSON; a missing or `null` field as empty). Only the path is read: the rest of
/// the document is skipped without being built.
pub fn field_value(obj: &DynamicObject, path: &str) -> String {
    match path {
        "metadata.name" => obj.metadata.name.clone(),
        "metadata.namespace" => obj.metadata.namespace.clone(),
        path => {
            let (doc, rest) = if let Some(rest) = path.strip_prefix("spec.") {
                (&obj.spec, rest)
            } else if let Some(rest) = path.strip_prefix("status.") {
                (&obj.status, rest)
            } else {
                return String::new();
            };
            let segments: Vec<&str> = rest.split('.').collect();
            let mut de = serde_json::Deserializer::from_str(doc.as_str());
            match serde::de::DeserializeSeed::deserialize(Pick(&segments), &mut de) {
                Ok(None | Some(serde_json::Value::Null)) | Err(_) => String::new(),
                Ok(Some(serde_json::Value::String(s))) => s,
                Ok(Some(other)) => other.to_string(),
            }
        }
    }
}

/// Reads the value at a path of object keys, skipping everything else.
struct Pick<'p>(&'p [&'p str]);

impl<'de> serde::de::DeserializeSeed<'de> for Pick<'_> {
    type Value = Option<serde_json::Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        if self.0.is_empty() {
            return serde::Deserialize::deserialize(d).map(Some);
        }
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Pick<'_> {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0[0] && found.is_none() {
                found = map.next_value_seed(Pick(&self.0[1..]))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    // A path through anything but an object leads nowhere.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
}

impl std::str::FromStr for FieldSelector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        FieldSelector::parse(s)
    }
}

impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}{}", r.path, if r.negated { "!=" } else { "=" })?;
            for c in r.value.chars() {
                if matches!(c, ',' | '=' | '\\') {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_read_only_their_path_and_agree_with_a_full_parse() {
        let spec = serde_json::json!({
            "nodeName": "n1", "replicas": 3, "paused": false, "gone": null, "list": [1, {"a": 2}],
            "nested": {"deep": {"x": "y", "n": 1.5}}, "esc\\aped": "k"
        });
        let obj = DynamicObject::new("Thing", ObjectMeta::namespaced("ns", "t"))
            .with_spec(crate::json::RawJson::from_value(&spec));
        let full = |path: &str| -> String {
            let rest = path.strip_prefix("spec.").unwrap();
            match spec.pointer(&format!("/{}", rest.replace('.', "/"))) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            }
        };
        for path in [
            "spec.nodeName",
            "spec.replicas",
            "spec.paused",
            "spec.gone",
            "spec.list",
            "spec.list.a",
            "spec.nested.deep.x",
            "spec.nested.deep.n",
            "spec.nested",
            "spec.missing",
            "spec.nodeName.deeper",
        ] {
            assert_eq!(field_value(&obj, path), full(path), "{path}");
        }
        assert_eq!(field_value(&obj, "metadata.namespace"), "ns");
        assert_eq!(field_value(&obj, "status.phase"), "", "a null status has no fields");
        let sel: FieldSelector = "spec.nodeName=n1,spec.replicas!=4".parse().unwrap();
        assert!(sel.matches(&obj));
        assert_eq!(sel.equality_on("spec.nodeName"), Some("n1"));
        assert_eq!(sel.equality_on("spec.replicas"), None, "a != term is no equality");
    }
    use crate::meta::ObjectMeta;
    use crate::object::RawJson;
    use proptest::prelude::*;

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

    /// The byte offset an error names.
    fn offset(e: &Error) -> usize {
        let text = e.to_string();
        let at = text.find("at byte ").unwrap_or_else(|| panic!("no position in {text}")) + "at byte ".len();
        text[at..].split(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn label_selector_text_follows_the_kubernetes_grammar() {
        for (text, printed) in [
            ("", ""),
            ("  ", ""),
            ("a", "a"),
            (" !a ", "!a"),
            ("a=b", "a=b"),
            ("a==b", "a=b"),
            ("a = b , c != d", "a=b,c!=d"),
            ("a=", "a="),
            ("a=,b", "a=,b"),
            ("a!=", "a!="),
            ("a in (b, c)", "a in (b,c)"),
            ("a in(b)", "a in (b)"),
            ("example.com/tier notin ( x )", "example.com/tier notin (x)"),
            ("in in (in)", "in in (in)"),
            ("a in (b,,c)", "a in (,b,c)"),
            ("a in (b, )", "a in (,b)"),
            ("a notin ()", "a notin ()"),
        ] {
            let s = LabelSelector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(s.to_string(), printed, "{text:?}");
        }
        for (text, at) in [
            ("a,", 2),
            (",a", 0),
            ("a,,b", 2),
            ("a in (", 6),
            ("a in (b", 7),
            ("a in (=)", 6),
            ("a in (b c)", 8),
            ("a in b", 5),
            ("a b", 2),
            ("Bad Key=1", 4),
            ("-a=1", 0),
            ("a=-b", 2),
            ("a=x!=y", 3),
            ("a=b c", 4),
            ("a!b", 1),
            ("!", 1),
            ("!a=b", 2),
            ("a=(b)", 2),
        ] {
            let e = LabelSelector::parse(text).expect_err(text);
            assert!(e.is_invalid(), "{text:?}: {e}");
            assert_eq!(offset(&e), at, "{text:?}: {e}");
        }
        let e = LabelSelector::parse("app=web,tier=-x").unwrap_err();
        assert!(e.to_string().contains("label value"), "{e}");
    }

    #[test]
    fn field_selector_text_follows_the_kubernetes_grammar() {
        for (text, printed) in [
            ("", ""),
            ("spec.nodeName=n1", "spec.nodeName=n1"),
            (" spec.nodeName==n1 , status.phase!=Failed ", "spec.nodeName=n1,status.phase!=Failed"),
            ("status.phase=", "status.phase="),
            ("metadata.name=a\\,b\\=c\\\\d", "metadata.name=a\\,b\\=c\\\\d"),
            ("spec.a_b-c.d0=x!y", "spec.a_b-c.d0=x!y"),
        ] {
            let s = FieldSelector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(s.to_string(), printed, "{text:?}");
        }
        assert_eq!(FieldSelector::parse("metadata.name=a\\,b").unwrap().requirements()[0].value, "a,b");
        for (text, at) in [
            ("spec.a=x!=y", 9),
            ("spec.a b=1", 6),
            ("spec.a/b=1", 6),
            ("spec..x=1", 5),
            ("spec.=1", 5),
            ("metadata.labels=1", 0),
            ("spec=1", 0),
            ("novalue", 0),
            ("spec.novalue", 12),
            ("=1", 0),
            ("spec.a=1,", 9),
            (",spec.a=1", 0),
            ("spec.a=1,,spec.b=2", 9),
            ("spec.a=b c", 9),
            ("spec.a=\\x", 7),
            ("spec.a=x\\", 8),
            ("spec.a=1 spec.b=2", 9),
        ] {
            let e = FieldSelector::parse(text).expect_err(text);
            assert!(e.is_invalid(), "{text:?}: {e}");
            assert_eq!(offset(&e), at, "{text:?}: {e}");
        }
    }

    #[test]
    fn selectors_built_in_code_are_checked_by_validate() {
        let s = LabelSelector::everything().and(Requirement::In("app".into(), BTreeSet::new()));
        let e = s.validate("labels").unwrap_err();
        assert!(e.to_string().contains("labels[0].values: must not be empty"), "{e}");
        let s = LabelSelector::from_labels([("Bad Key", "x")]);
        assert!(s.validate("labels").unwrap_err().to_string().contains("labels[0].key"));
        let f = FieldSelector::equals("spec.a/b", "x y");
        let e = f.validate().unwrap_err().to_string();
        assert!(e.contains("selector[0].path") && e.contains("selector[0].value"), "{e}");
        assert!(FieldSelector::equals("spec.nodeName", "a,b=c").validate().is_ok());
    }

    #[test]
    fn the_structured_form_is_checked_like_the_text_form() {
        for (json, message) in [
            (r#"{"matchLabels":{"Bad Key":"x"}}"#, "matchLabels: "),
            (r#"{"matchLabels":{"app":"-x"}}"#, "matchLabels.app: "),
            (r#"{"matchExpressions":[{"key":"a","operator":"In"}]}"#, "matchExpressions[0].values: must not be empty"),
            (r#"{"matchExpressions":[{"key":"a","operator":"NotIn","values":[]}]}"#, "matchExpressions[0].values"),
            (r#"{"matchExpressions":[{"key":"a","operator":"In","values":["-"]}]}"#, "matchExpressions[0].values"),
            (r#"{"matchExpressions":[{"key":"a","operator":"Exists","values":["x"]}]}"#, "must be empty for Exists"),
            (r#"{"matchExpressions":[{"key":"a","operator":"DoesNotExist","values":["x"]}]}"#, "values"),
            (r#"{"matchExpressions":[{"key":"a b","operator":"Exists"}]}"#, "matchExpressions[0].key"),
            (
                r#"{"matchExpressions":[{"key":"a","operator":"Near"}]}"#,
                "matchExpressions[0].operator: unknown operator",
            ),
        ] {
            let e = serde_json::from_str::<LabelSelector>(json).expect_err(json).to_string();
            assert!(e.contains(message), "{json}: {e}");
        }
    }

    fn label_key() -> impl Strategy<Value = String> {
        "([a-z0-9]([a-z0-9.-]{0,8}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,8}[A-Za-z0-9])?"
            .prop_filter("a qualified name", |k| validation::qualified_name(k).is_ok())
    }

    fn label_value() -> impl Strategy<Value = String> {
        "([A-Za-z0-9]([A-Za-z0-9_.-]{0,8}[A-Za-z0-9])?)?"
    }

    fn requirement() -> impl Strategy<Value = Requirement> {
        let set = || proptest::collection::btree_set(label_value(), 1..4);
        prop_oneof![
            (label_key(), label_value()).prop_map(|(k, v)| Requirement::Equals(k, v)),
            (label_key(), label_value()).prop_map(|(k, v)| Requirement::NotEquals(k, v)),
            (label_key(), set()).prop_map(|(k, v)| Requirement::In(k, v)),
            (label_key(), set()).prop_map(|(k, v)| Requirement::NotIn(k, v)),
            label_key().prop_map(Requirement::Exists),
            label_key().prop_map(Requirement::DoesNotExist),
        ]
    }

    fn field_requirement() -> impl Strategy<Value = FieldRequirement> {
        let path = prop_oneof![
            Just("metadata.name".to_string()),
            Just("metadata.namespace".to_string()),
            "(spec|status)(\\.[A-Za-z0-9_-]{1,6}){1,3}",
        ];
        (path, "[^\\s\\p{Cc}]{0,8}", any::<bool>()).prop_map(|(path, value, negated)| FieldRequirement {
            path,
            value,
            negated,
        })
    }

    proptest! {
        /// Every valid label selector prints as text that parses back to it.
        #[test]
        fn label_selector_text_round_trips(reqs in proptest::collection::vec(requirement(), 0..5)) {
            let s = LabelSelector::new(reqs).unwrap();
            let text = s.to_string();
            prop_assert_eq!(LabelSelector::parse(&text).unwrap(), s.clone(), "{}", text);
            let json = serde_json::to_string(&s).unwrap();
            let back: LabelSelector = serde_json::from_str(&json).unwrap();
            prop_assert!(back.validate("s").is_ok());
            let json = serde_json::to_string(&back).unwrap();
            prop_assert_eq!(serde_json::from_str::<LabelSelector>(&json).unwrap(), back);
        }

        /// Every valid field selector (values with commas, `=` and backslashes included) prints
        /// as text that parses back to it.
        #[test]
        fn field_selector_text_round_trips(reqs in proptest::collection::vec(field_requirement(), 0..5)) {
            let s = reqs.into_iter().fold(FieldSelector::everything(), FieldSelector::and);
            prop_assert!(s.validate().is_ok());
            let text = s.to_string();
            prop_assert_eq!(FieldSelector::parse(&text).unwrap(), s.clone(), "{}", text);
        }

        /// Parsing never panics, and whatever parses prints as text that parses back to it.
        #[test]
        fn parsed_selectors_round_trip(text in "[a-z.!=,() \\\\]{0,16}") {
            if let Ok(s) = LabelSelector::parse(&text) {
                prop_assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
            }
            if let Ok(s) = FieldSelector::parse(&text) {
                prop_assert_eq!(FieldSelector::parse(&s.to_string()).unwrap(), s);
            }
        }
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
