//! YAML (and JSON, which YAML 1.2 reads as it is) into a tree that remembers where each node
//! and each key came from, so every later error can name its line and column.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A position in a file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub(crate) line: u64,
    pub(crate) column: u64,
}

/// A value of a document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in the order written, each with its own position.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Key {
    pub(crate) name: String,
    pub(crate) pos: Pos,
}

/// A value and where it is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) value: Value,
    pub(crate) pos: Pos,
}

impl Node {
    /// The value of `key` in a mapping.
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// What the value is, for "expected a mapping, found a string" messages.
    pub(crate) fn what(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::I64(_) | Value::U64(_) | Value::F64(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a sequence",
            Value::Map(_) => "a mapping",
        }
    }

    /// The node a field path names (`spec.containers[0].image`, `metadata.labels["app"]`),
    /// or the deepest node on the way when the path goes further than the document.
    pub(crate) fn locate(&self, path: &str) -> Pos {
        let mut node = self;
        let mut pos = self.pos;
        for seg in segments(path) {
            let next = match (&node.value, &seg) {
                (Value::Map(entries), Segment::Key(k)) => entries.iter().find(|(key, _)| &key.name == k),
                (Value::Seq(items), Segment::Index(i)) => {
                    pos = items.get(*i).map_or(pos, |n| n.pos);
                    match items.get(*i) {
                        Some(n) => {
                            node = n;
                            continue;
                        }
                        None => return pos,
                    }
                }
                _ => None,
            };
            match next {
                Some((k, v)) => {
                    // A scalar is shown at its value; a collection at its key.
                    pos = if matches!(v.value, Value::Map(_) | Value::Seq(_)) { k.pos } else { v.pos };
                    node = v;
                }
                None => return pos,
            }
        }
        pos
    }
}

/// One step of a field path.
#[derive(Debug, PartialEq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// Splits a field path into keys and indexes: `a.b[0]["x.y"]`.
pub(crate) fn segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut chars = path.chars().peekable();
    let mut cur = String::new();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                if !cur.is_empty() {
                    out.push(Segment::Key(std::mem::take(&mut cur)));
                }
            }
            '[' => {
                if !cur.is_empty() {
                    out.push(Segment::Key(std::mem::take(&mut cur)));
                }
                if chars.peek() == Some(&'"') {
                    chars.next();
                    let mut key = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => key.extend(chars.next()),
                            '"' => break,
                            c => key.push(c),
                        }
                    }
                    out.push(Segment::Key(key));
                    let _ = chars.next(); // ']'
                } else {
                    let mut digits = String::new();
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                        digits.push(c);
                    }
                    match digits.parse() {
                        Ok(i) => out.push(Segment::Index(i)),
                        Err(_) => out.push(Segment::Key(digits)),
                    }
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(Segment::Key(cur));
    }
    out
}

/// Appends a key to a field path: `.name` when it reads as a name, `["key"]` otherwise.
pub(crate) fn join_key(path: &str, key: &str) -> String {
    let plain = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{key:?}]"),
    }
}

fn pos_of(l: &serde_saphyr::Location) -> Pos {
    Pos { line: l.line(), column: l.column() }
}

/// Reads one node with serde-saphyr, keeping positions through `Spanned`.
struct Raw(Value);

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw(if v >= 0 { Value::U64(v as u64) } else { Value::I64(v) }))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw(Value::U64(v)))
    }
    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Raw, E> {
        if let Ok(v) = i64::try_from(v) {
            return self.visit_i64(v);
        }
        u64::try_from(v).map(|v| Raw(Value::U64(v))).map_err(|_| E::custom(format!("{v} is out of range")))
    }
    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Raw, E> {
        u64::try_from(v).map(|v| Raw(Value::U64(v))).map_err(|_| E::custom(format!("{v} is out of range")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw(Value::F64(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw(Value::Str(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw(Value::Str(v)))
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Raw, E> {
        String::from_utf8(v.to_vec()).map(|s| Raw(Value::Str(s))).map_err(|_| E::custom("binary data is not UTF-8"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
        let mut out = Vec::new();
        while let Some(n) = a.next_element::<Spanned<Raw>>()? {
            out.push(Node { pos: pos_of(&n.referenced), value: n.value.0 });
        }
        Ok(Raw(Value::Seq(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
        let mut out: Vec<(Key, Node)> = Vec::new();
        while let Some(k) = a.next_key::<Spanned<String>>()? {
            let v: Spanned<Raw> = a.next_value()?;
            out.push((
                Key { name: k.value, pos: pos_of(&k.referenced) },
                Node { pos: pos_of(&v.referenced), value: v.value.0 },
            ));
        }
        Ok(Raw(Value::Map(out)))
    }
}

/// Why a file is not YAML, and where.
#[derive(Debug)]
pub(crate) struct SyntaxError {
    pub(crate) pos: Option<Pos>,
    pub(crate) message: String,
}

/// Parses every document of `text` (empty documents are skipped). Duplicate keys are errors;
/// nesting deeper than 64 and more than 250,000 nodes are refused (serde-saphyr's budget), so a
/// hostile file cannot exhaust the stack or the memory.
pub(crate) fn parse(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.with_snippet = false;
    match serde_saphyr::from_multiple_with_options::<Spanned<Raw>>(text, options) {
        Ok(docs) => Ok(docs.into_iter().map(|d| Node { pos: pos_of(&d.referenced), value: d.value.0 }).collect()),
        Err(e) => {
            let pos = e.location().map(|l| pos_of(&l)).filter(|p| p.line > 0);
            let mut message = e.to_string();
            // The position is given in front, as for every other error.
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            if let Some(rest) = message.strip_prefix("budget breached: Depth") {
                message = format!("nested deeper than 64 levels{}", rest.split('}').nth(1).unwrap_or(""));
            } else if message == "recursion limit exceeded" {
                message = "nested deeper than 64 levels".into();
            } else if message.starts_with("budget breached") {
                message = format!("too large: {message}");
            } else if let Some(i) = message.find(", set DuplicateKeyPolicy") {
                message.truncate(i);
            }
            Err(SyntaxError { pos, message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_keys_and_indexes() {
        assert_eq!(
            segments(r#"spec.containers[0].env["A.B"].value"#),
            vec![
                Segment::Key("spec".into()),
                Segment::Key("containers".into()),
                Segment::Index(0),
                Segment::Key("env".into()),
                Segment::Key("A.B".into()),
                Segment::Key("value".into())
            ]
        );
        assert_eq!(
            join_key("metadata.labels", "app.kubernetes.io/name"),
            r#"metadata.labels["app.kubernetes.io/name"]"#
        );
        assert_eq!(join_key("", "spec"), "spec");
    }

    #[test]
    fn nodes_remember_where_they_are() {
        let docs = parse("a:\n  b: [1, x]\n---\nc: 1\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].locate("a.b[1]"), Pos { line: 2, column: 10 });
        assert_eq!(docs[0].locate("a.b"), Pos { line: 2, column: 3 });
        assert_eq!(docs[0].locate("a.zzz.y"), Pos { line: 1, column: 1 });
    }
}
