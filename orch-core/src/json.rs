//! [`RawJson`]: JSON kept as canonical text, the form in which stores hold specs and statuses.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod canonical;

/// A document that could not be encoded or decoded; it becomes
/// [`Error::Serialization`](crate::Error::Serialization) through `?`.
///
/// A decode error names the field that did not decode (`spec.containers[0].cpu: invalid
/// quantity ...`), as well as serde's message and position.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {}{source}", field_prefix(.path))]
pub struct JsonError {
    /// What was being encoded or decoded.
    pub what: String,
    /// The path of the field that failed, such as `spec.containers[0].resources.requests.cpu`;
    /// empty when the document itself is at fault (not JSON, not an object) or when encoding.
    pub path: String,
    /// The serde error.
    #[source]
    pub source: serde_json::Error,
}

/// Deserializes a sequence into a vector only as large as it holds (`deserialize_with`).
/// serde's own `Vec` starts at four slots when the format gives no length, as JSON never does:
/// a workload's one container would take four containers' room (1.6 KB, 0.4 KB of it used) in
/// every cache that holds the workload.
pub(crate) fn exact_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Exact<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Exact<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // A length the input claims is trusted only up to 1 MiB of room.
            let claimed = seq.size_hint().unwrap_or(0).min((1 << 20) / std::mem::size_of::<T>().max(1));
            let mut items = Vec::with_capacity(claimed);
            while let Some(item) = seq.next_element()? {
                if items.len() == items.capacity() {
                    items.reserve_exact(items.len().max(1));
                }
                items.push(item);
            }
            items.shrink_to_fit();
            Ok(items)
        }
    }
    d.deserialize_seq(Exact(std::marker::PhantomData))
}

/// `path: `, or nothing for an empty path: how errors put the field before the reason.
pub(crate) fn field_prefix(path: &str) -> String {
    if path.is_empty() { String::new() } else { format!("{path}: ") }
}

impl JsonError {
    /// Names the document this error is about: `what` becomes `object` (such as `Workload
    /// default/web`) and the path is put under `part` (such as `spec`), so the error reads as
    /// `cannot decode Workload default/web: spec.containers[0].name: ...`.
    pub fn within(mut self, object: impl fmt::Display, part: &str) -> Self {
        self.what = object.to_string();
        self.path = match self.path.as_str() {
            "" => part.to_string(),
            p if p.starts_with('[') => format!("{part}{p}"),
            p => format!("{part}.{p}"),
        };
        self
    }
}

/// The error of a failed decode of `text` as `T`, with the path of the field at fault.
///
/// Decoding is hot (every cache decodes every object), so the happy path decodes without
/// tracking; only a failure pays for a second decode that records where it went wrong.
#[cold]
fn decode_error<T: DeserializeOwned>(text: &str, source: serde_json::Error) -> JsonError {
    let mut de = serde_json::Deserializer::from_str(text);
    let path = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(e) => e.path().to_string(),
        Ok(_) => String::new(),
    };
    // The path of the document itself prints as ".".
    let path = if path == "." { String::new() } else { path };
    JsonError { what: std::any::type_name::<T>().into(), path, source }
}

/// A JSON document kept as canonical text (compact, object keys sorted) and shared by reference.
///
/// Stores hold spec and status this way: an object costs about its encoded size in memory, a
/// clone is a reference-count bump, and typed access decodes straight from the text. Because the
/// text is canonical, equality is a byte comparison and still semantic: the same document with
/// keys in another order is the same text.
#[derive(Clone)]
pub struct RawJson(Arc<str>);

/// Writes `v` as compact JSON with every object's keys in sorted order.
fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

/// Scalars (and keys) have exactly one compact form; serde_json writes it.
fn write_scalar<T: Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) {
    // Writing a string, number, bool or null into memory cannot fail.
    let _ = serde_json::to_writer(out, v);
}

/// Whether `text`, already known to be valid JSON, is exactly what [`write_canonical`] would
/// write for it: no spaces, every object's keys strictly ascending, integers only, strings
/// escaped the way serde_json escapes them. It may answer `false` for canonical text it does
/// not bother to prove (keys with escapes, `\u` escapes, fractions, exponents, very long
/// integers); the caller then canonicalizes the slow way. It never answers `true` wrongly.
fn is_canonical(text: &str) -> bool {
    let mut c = Canonical { bytes: text.as_bytes(), at: 0 };
    c.value(0) && c.at == c.bytes.len()
}

/// A cursor for [`is_canonical`].
struct Canonical<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Canonical<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let ok = self.peek() == Some(b);
        self.at += usize::from(ok);
        ok
    }

    fn value(&mut self, depth: usize) -> bool {
        // serde_json refuses deeper documents anyway; this only bounds the recursion.
        if depth > 128 {
            return false;
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().is_some(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.integer(),
            _ => false,
        }
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let ok = self.bytes[self.at..].starts_with(word);
        self.at += word.len();
        ok
    }

    /// An integer as serde_json prints it: no leading zero, no `-0`, and within `u64` (or
    /// `i64` when negative), as serde_json reads anything beyond as a float.
    fn integer(&mut self) -> bool {
        let start = self.at;
        let negative = self.eat(b'-');
        let first = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        // ASCII digits and an optional sign: valid UTF-8.
        let text = std::str::from_utf8(&self.bytes[start..self.at]).unwrap_or("");
        let plain = match &self.bytes[first..self.at] {
            [] => false,
            [b'0'] => !negative,
            [b'0', ..] => false,
            _ if negative => text.parse::<i64>().is_ok(),
            _ => text.parse::<u64>().is_ok(),
        };
        plain && !matches!(self.peek(), Some(b'.' | b'e' | b'E'))
    }

    /// A string, returning its text as written when it has no escapes at all (`Some(None)`
    /// when it has only the escapes serde_json itself writes), `None` when it is not canonical.
    fn string(&mut self) -> Option<Option<&'a [u8]>> {
        self.at += 1;
        let start = self.at;
        let mut escaped = false;
        loop {
            self.skip_plain();
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    // serde_json writes these short escapes; `\u` only for other control
                    // characters, which this check leaves to the slow path.
                    match self.bytes.get(self.at + 1)? {
                        b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 2,
                        _ => return None,
                    }
                }
                _ => self.at += 1,
            }
        }
        let text = &self.bytes[start..self.at];
        self.at += 1;
        Some((!escaped).then_some(text))
    }

    /// Moves past string bytes that are neither a quote nor a backslash, eight at a time.
    fn skip_plain(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGHS: u64 = 0x8080_8080_8080_8080;
        // Nonzero when some byte of `v` is zero (exact for the lowest such byte, which is all
        // the scan needs: it stops at the first word holding a quote or backslash).
        let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
        while let Some(word) = self.bytes.get(self.at..self.at + 8) {
            let v = u64::from_le_bytes(word.try_into().unwrap_or([b'"'; 8]));
            if has_zero(v ^ (ONES * u64::from(b'"'))) | has_zero(v ^ (ONES * u64::from(b'\\'))) != 0 {
                break;
            }
            self.at += 8;
        }
        while self.peek().is_some_and(|b| b != b'"' && b != b'\\') {
            self.at += 1;
        }
    }

    fn object(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b'}') {
            return true;
        }
        let mut last: Option<&[u8]> = None;
        loop {
            if self.peek() != Some(b'"') {
                return false;
            }
            // Keys with escapes are compared unescaped by the slow path.
            let Some(Some(key)) = self.string() else { return false };
            if last.is_some_and(|last| last >= key) {
                return false;
            }
            last = Some(key);
            if !self.eat(b':') || !self.value(depth + 1) {
                return false;
            }
            if self.eat(b'}') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    fn array(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b']') {
            return true;
        }
        loop {
            if !self.value(depth + 1) {
                return false;
            }
            if self.eat(b']') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }
}

impl RawJson {
    /// The JSON `null`.
    pub fn null() -> Self {
        RawJson(Arc::from("null"))
    }

    /// The empty JSON object `{}`.
    pub fn empty_object() -> Self {
        RawJson(Arc::from("{}"))
    }

    /// Encodes any serializable value.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, JsonError> {
        let mut out = Vec::with_capacity(256);
        if canonical::write(value, &mut out).is_ok() {
            // Only UTF-8 is written: keys and strings come from `str`s, the rest is ASCII.
            if let Ok(text) = std::str::from_utf8(&out) {
                return Ok(RawJson(Arc::from(text)));
            }
        }
        serde_json::to_value(value).map(|v| Self::from_value(&v)).map_err(|source| JsonError {
            what: std::any::type_name::<T>().into(),
            path: String::new(),
            source,
        })
    }

    /// Parses JSON text, refusing anything that is not valid JSON.
    pub fn parse(text: &str) -> Result<Self, JsonError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|source| JsonError {
            what: "raw JSON".into(),
            path: String::new(),
            source,
        })?;
        Ok(Self::from_value(&v))
    }

    /// Encodes a JSON value.
    pub fn from_value(value: &serde_json::Value) -> Self {
        let mut out = Vec::new();
        write_canonical(value, &mut out);
        // serde_json writes only UTF-8.
        RawJson(Arc::from(String::from_utf8_lossy(&out)))
    }

    /// Decodes into a typed value. An error names the path of the field at fault
    /// ([`JsonError::path`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, JsonError> {
        serde_json::from_str(&self.0).map_err(|source| decode_error::<T>(&self.0, source))
    }

    /// Decodes into a JSON value.
    pub fn to_value(&self) -> serde_json::Value {
        // The text is always valid JSON: every constructor goes through serde_json.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `null`.
    pub fn is_null(&self) -> bool {
        &*self.0 == "null"
    }

    /// Bytes of text held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for empty text (never the case for a well-formed document).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for RawJson {
    fn default() -> Self {
        RawJson::null()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        // Canonical text: equal documents are equal bytes.
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for RawJson {}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Input may come in any key order or spacing: store it canonically. Text that already
        // is canonical (everything a store wrote) is kept as it is, without building a tree.
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        if is_canonical(raw.get()) {
            return Ok(RawJson(Arc::from(raw.get())));
        }
        let value: serde_json::Value = serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?;
        Ok(RawJson::from_value(&value))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn raw_json_is_canonical() {
        let a = RawJson::parse(r#"{ "z": {"b": 1, "a": [true, null, "x\"y"]}, "a": 1.5 }"#).unwrap();
        assert_eq!(a.as_str(), r#"{"a":1.5,"z":{"a":[true,null,"x\"y"],"b":1}}"#);
        let typed = RawJson::encode(&serde_json::json!({"b": 2, "a": 1})).unwrap();
        assert_eq!(typed.as_str(), r#"{"a":1,"b":2}"#);
        let back: RawJson = serde_json::from_str(r#"{"b": 2,  "a": 1}"#).unwrap();
        assert_eq!(back.as_str(), typed.as_str());
    }

    #[test]
    fn only_canonical_text_takes_the_fast_path() {
        for text in [
            r#"{"a":1,"b":[true,null,"x\"y"]}"#,
            "-12",
            "0",
            "18446744073709551615",
            "-9223372036854775808",
            r#""\n\t""#,
            "[]",
            "{}",
            r#"{"":{}}"#,
        ] {
            assert!(is_canonical(text), "{text} is canonical");
        }
        for text in [
            r#"{"b":1,"a":2}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a": 1}"#,
            " 1",
            "-0",
            "007",
            "1.0",
            "1e3",
            "98765432109876543210",
            "-9223372036854775809",
            r#""\u00e9""#,
            r#""\/""#,
            r#"{"\n":1}"#,
            "tru",
        ] {
            assert!(!is_canonical(text), "{text} is not proven canonical");
        }
    }

    /// Any JSON document: strings with quotes, escapes, control and non-ASCII characters,
    /// integers at the edges, fractions, nested arrays and objects.
    pub(super) fn any_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let text = || proptest::string::string_regex("[a-c\"\\\\/\n\u{1}\u{7f}é😀 ]{0,4}").unwrap();
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(text(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// `v` as JSON text with every object's keys in reverse order.
    fn reversed(v: &serde_json::Value) -> String {
        use serde_json::Value;
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let parts: Vec<String> = keys
                    .into_iter()
                    .rev()
                    .map(|k| format!("{}:{}", serde_json::to_string(k).unwrap(), reversed(&map[k])))
                    .collect();
                format!("{{{}}}", parts.join(","))
            }
            Value::Array(items) => format!("[{}]", items.iter().map(reversed).collect::<Vec<_>>().join(",")),
            scalar => scalar.to_string(),
        }
    }

    proptest! {
        /// However a document is written (compact, pretty, keys in any order), reading it gives
        /// the one canonical text; canonical text reads back as itself, and plain documents
        /// (no fractions, no escapes in keys) are recognised as canonical without a rebuild.
        #[test]
        fn every_spelling_reads_as_the_canonical_text(v in any_json()) {
            let canonical = RawJson::from_value(&v);
            for text in [serde_json::to_string(&v).unwrap(), serde_json::to_string_pretty(&v).unwrap(), reversed(&v)] {
                let read: RawJson = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(read.as_str(), canonical.as_str(), "read from {}", text);
            }
            let again: RawJson = serde_json::from_str(canonical.as_str()).unwrap();
            prop_assert_eq!(again.as_str(), canonical.as_str());
            let plain = !canonical.as_str().contains(['.', 'e', 'E']) && !canonical.as_str().contains("\\u");
            if plain && !has_escaped_key(&v) && is_canonical(canonical.as_str()) != plain {
                prop_assert!(false, "{} was not recognised as canonical", canonical);
            }
        }
    }

    fn has_escaped_key(v: &serde_json::Value) -> bool {
        use serde_json::Value;
        match v {
            Value::Object(map) => {
                map.iter().any(|(k, v)| serde_json::to_string(k).unwrap().contains('\\') || has_escaped_key(v))
            }
            Value::Array(items) => items.iter().any(has_escaped_key),
            _ => false,
        }
    }

    #[test]
    fn decode_errors_name_the_field_path() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Limits {
            cpu: crate::Quantity,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Spec {
            items: Vec<Limits>,
        }
        let doc = RawJson::parse(r#"{"items":[{"cpu":"1"},{"cpu":"1x"}]}"#).unwrap();
        let e = doc.decode::<Spec>().unwrap_err();
        assert_eq!(e.path, "items[1].cpu");
        let e = e.within("Thing ns/a", "spec");
        assert_eq!(e.path, "spec.items[1].cpu");
        let text = e.to_string();
        assert!(text.starts_with("cannot decode Thing ns/a: spec.items[1].cpu: invalid quantity \"1x\""), "{text}");
        // The document itself at fault: no path beyond the part.
        let e = RawJson::parse("true").unwrap().decode::<Spec>().unwrap_err();
        assert_eq!(e.path, "");
        assert_eq!(e.within("Thing ns/a", "spec").path, "spec");
        let e = RawJson::parse(r#"[1,"x"]"#).unwrap().decode::<Vec<u32>>().unwrap_err().within("T a", "status");
        assert_eq!(e.path, "status[1]");
    }

    #[test]
    fn exact_vectors_hold_no_spare_room_and_their_errors_name_the_item() {
        #[derive(Debug, serde::Deserialize)]
        struct Spec {
            #[serde(deserialize_with = "super::exact_vec")]
            items: Vec<crate::Quantity>,
        }
        for n in [0usize, 1, 3, 5, 9] {
            let items: Vec<String> = (0..n).map(|i| format!("\"{i}m\"")).collect();
            let doc = RawJson::parse(&format!(r#"{{"items":[{}]}}"#, items.join(","))).unwrap();
            let spec = doc.decode::<Spec>().unwrap();
            assert_eq!(spec.items.len(), n);
            assert_eq!(spec.items.capacity(), n, "{n} items");
            if let Some(last) = spec.items.last() {
                assert_eq!(*last, format!("{}m", n - 1).parse().unwrap(), "in order");
            }
        }
        let e = RawJson::parse(r#"{"items":["1","2","1x"]}"#).unwrap().decode::<Spec>().unwrap_err();
        assert_eq!(e.path, "items[2]");
        let e = RawJson::parse(r#"{"items":{"a":"1"}}"#).unwrap().decode::<Spec>().unwrap_err();
        assert_eq!(e.path, "items");
        assert!(e.to_string().contains("a sequence"), "{e}");
    }

    #[test]
    fn raw_json_equality_is_semantic() {
        let a = RawJson::parse(r#"{"a":1,"b":[1,2]}"#).unwrap();
        let b = RawJson::parse(r#"{ "b": [1, 2], "a": 1 }"#).unwrap();
        let c = RawJson::parse(r#"{"a":2,"b":[1,2]}"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(RawJson::parse("{nope").is_err());
    }
}
