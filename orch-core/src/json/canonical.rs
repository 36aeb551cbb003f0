//! Canonical JSON written straight from a typed value.
//!
//! [`RawJson::encode`](super::RawJson::encode) is on every write path (a create, a bind, every
//! status an agent reports), and building a `serde_json::Value` tree first, a map node and a
//! string per field, costs more than the writing. This serializer writes the canonical text
//! directly: sequences in place, each object's members into a scratch buffer that is then
//! copied out in key order. What it does not cover (128-bit integers, map keys that are not
//! strings or integers) it declines with [`Declined`], and the caller takes the tree path,
//! which gives the same text or the proper error.

use std::fmt;

use serde::Serialize;
use serde::ser::{self, Impossible};

use super::{is_canonical, write_canonical, write_scalar};

/// The name serde_json gives the struct a `RawValue` serializes as.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// This serializer does not handle the value; the tree path does.
#[derive(Debug)]
pub(super) struct Declined;

impl fmt::Display for Declined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not handled by the direct canonical writer")
    }
}

impl std::error::Error for Declined {}

impl ser::Error for Declined {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Declined
    }
}

/// Appends `value` to `out` as canonical JSON (compact, every object's keys sorted, the last
/// of equal keys kept), byte for byte what the tree path writes. On `Err` `out` holds a
/// partial document: the caller discards it.
pub(super) fn write<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), Declined> {
    value.serialize(Writer { out })
}

type Done = Result<(), Declined>;

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

/// A scalar exactly as the tree path writes it: through `serde_json::Value` (which turns
/// non-finite floats into `null`, and floats into their shortest round-trip form).
fn via_value<T: Serialize>(out: &mut Vec<u8>, v: T) -> Done {
    let value = serde_json::to_value(v).map_err(|_| Declined)?;
    write_scalar(&value, out);
    Ok(())
}

/// An integer: its decimal digits, as serde_json writes it.
fn integer(out: &mut Vec<u8>, v: impl fmt::Display) -> Done {
    use std::io::Write;
    // Writing into memory cannot fail.
    let _ = write!(out, "{v}");
    Ok(())
}

impl<'a> ser::Serializer for Writer<'a> {
    type Ok = ();
    type Error = Declined;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = Seq<'a>;
    type SerializeTupleStruct = Seq<'a>;
    type SerializeTupleVariant = Seq<'a>;
    type SerializeMap = Members<'a>;
    type SerializeStruct = Members<'a>;
    type SerializeStructVariant = Members<'a>;

    fn serialize_bool(self, v: bool) -> Done {
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Done {
        integer(self.out, v)
    }
    fn serialize_i16(self, v: i16) -> Done {
        integer(self.out, v)
    }
    fn serialize_i32(self, v: i32) -> Done {
        integer(self.out, v)
    }
    fn serialize_i64(self, v: i64) -> Done {
        integer(self.out, v)
    }
    fn serialize_u8(self, v: u8) -> Done {
        integer(self.out, v)
    }
    fn serialize_u16(self, v: u16) -> Done {
        integer(self.out, v)
    }
    fn serialize_u32(self, v: u32) -> Done {
        integer(self.out, v)
    }
    fn serialize_u64(self, v: u64) -> Done {
        integer(self.out, v)
    }
    fn serialize_i128(self, _v: i128) -> Done {
        Err(Declined)
    }
    fn serialize_u128(self, _v: u128) -> Done {
        Err(Declined)
    }
    fn serialize_f32(self, v: f32) -> Done {
        via_value(self.out, v)
    }
    fn serialize_f64(self, v: f64) -> Done {
        via_value(self.out, v)
    }
    fn serialize_char(self, v: char) -> Done {
        write_scalar(v.encode_utf8(&mut [0; 4]), self.out);
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Done {
        write_scalar(v, self.out);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Done {
        self.out.push(b'[');
        for (i, b) in v.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            integer(self.out, b)?;
        }
        self.out.push(b']');
        Ok(())
    }
    fn serialize_none(self) -> Done {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Done {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Done {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Done {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Done {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Done {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Done {
        self.out.push(b'{');
        write_scalar(variant, self.out);
        self.out.push(b':');
        value.serialize(Writer { out: &mut *self.out })?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Seq<'a>, Declined> {
        self.out.push(b'[');
        Ok(Seq { out: self.out, first: true, close: b"]" })
    }
    fn serialize_tuple(self, len: usize) -> Result<Seq<'a>, Declined> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Seq<'a>, Declined> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Seq<'a>, Declined> {
        self.out.push(b'{');
        write_scalar(variant, self.out);
        self.out.extend_from_slice(b":[");
        Ok(Seq { out: self.out, first: true, close: b"]}" })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Members<'a>, Declined> {
        Ok(Members::new(self.out, b"", false))
    }
    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Members<'a>, Declined> {
        Ok(Members::new(self.out, b"", name == RAW_VALUE_TOKEN))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Members<'a>, Declined> {
        self.out.push(b'{');
        write_scalar(variant, self.out);
        self.out.push(b':');
        Ok(Members::new(self.out, b"}", false))
    }
}

/// The elements of an array, written in place.
struct Seq<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    close: &'static [u8],
}

impl Seq<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        value.serialize(Writer { out: &mut *self.out })
    }
    fn finish(self) -> Done {
        self.out.extend_from_slice(self.close);
        Ok(())
    }
}

impl ser::SerializeSeq for Seq<'_> {
    type Ok = ();
    type Error = Declined;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        self.element(value)
    }
    fn end(self) -> Done {
        self.finish()
    }
}

impl ser::SerializeTuple for Seq<'_> {
    type Ok = ();
    type Error = Declined;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        self.element(value)
    }
    fn end(self) -> Done {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for Seq<'_> {
    type Ok = ();
    type Error = Declined;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        self.element(value)
    }
    fn end(self) -> Done {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for Seq<'_> {
    type Ok = ();
    type Error = Declined;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        self.element(value)
    }
    fn end(self) -> Done {
        self.finish()
    }
}

/// A member's key: a struct's field names are static, a map's keys are made.
enum Key {
    Static(&'static str),
    Owned(String),
}

impl Key {
    fn as_str(&self) -> &str {
        match self {
            Key::Static(s) => s,
            Key::Owned(s) => s,
        }
    }
}

/// The members of an object: each value is written to `scratch` as it comes, and the object is
/// written to `out` in key order at the end.
struct Members<'a> {
    out: &'a mut Vec<u8>,
    scratch: Vec<u8>,
    /// Key, and where its value lies in `scratch`.
    entries: Vec<(Key, usize, usize)>,
    /// A map's key, waiting for its value.
    key: Option<Key>,
    /// Written after the closing brace (the one a struct variant opened).
    close: &'static [u8],
    /// A `RawValue`: its one member is the JSON text itself.
    raw: bool,
}

impl<'a> Members<'a> {
    fn new(out: &'a mut Vec<u8>, close: &'static [u8], raw: bool) -> Self {
        Members { out, scratch: Vec::new(), entries: Vec::new(), key: None, close, raw }
    }

    fn member<T: Serialize + ?Sized>(&mut self, key: Key, value: &T) -> Done {
        let start = self.scratch.len();
        value.serialize(Writer { out: &mut self.scratch })?;
        self.entries.push((key, start, self.scratch.len()));
        Ok(())
    }

    fn finish(mut self) -> Done {
        if self.raw {
            // The member was written as a JSON string holding the document's text.
            let [(_, start, end)] = self.entries.as_slice() else { return Err(Declined) };
            let quoted = std::str::from_utf8(&self.scratch[*start..*end]).map_err(|_| Declined)?;
            let text: String = serde_json::from_str(quoted).map_err(|_| Declined)?;
            if is_canonical(&text) {
                self.out.extend_from_slice(text.as_bytes());
            } else {
                let value: serde_json::Value = serde_json::from_str(&text).map_err(|_| Declined)?;
                write_canonical(&value, self.out);
            }
            return Ok(());
        }
        // Stable: of equal keys the last written comes last, and is the one kept.
        self.entries.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        self.out.push(b'{');
        let mut first = true;
        for (i, (key, start, end)) in self.entries.iter().enumerate() {
            if self.entries.get(i + 1).is_some_and(|next| next.0.as_str() == key.as_str()) {
                continue;
            }
            if !first {
                self.out.push(b',');
            }
            first = false;
            write_scalar(key.as_str(), self.out);
            self.out.push(b':');
            self.out.extend_from_slice(&self.scratch[*start..*end]);
        }
        self.out.push(b'}');
        self.out.extend_from_slice(self.close);
        Ok(())
    }
}

impl ser::SerializeMap for Members<'_> {
    type Ok = ();
    type Error = Declined;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Done {
        self.key = Some(Key::Owned(key.serialize(KeyWriter)?));
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        let key = self.key.take().ok_or(Declined)?;
        self.member(key, value)
    }
    fn end(self) -> Done {
        self.finish()
    }
}

impl ser::SerializeStruct for Members<'_> {
    type Ok = ();
    type Error = Declined;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Done {
        self.member(Key::Static(key), value)
    }
    fn end(self) -> Done {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Members<'_> {
    type Ok = ();
    type Error = Declined;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Done {
        self.member(Key::Static(key), value)
    }
    fn end(self) -> Done {
        self.finish()
    }
}

/// A map key as the tree path makes it: strings as they are, integers, booleans and unit
/// variants as their text; anything else is declined.
struct KeyWriter;

fn key_text(v: impl fmt::Display) -> Result<String, Declined> {
    Ok(v.to_string())
}

impl ser::Serializer for KeyWriter {
    type Ok = String;
    type Error = Declined;
    type SerializeSeq = Impossible<String, Declined>;
    type SerializeTuple = Impossible<String, Declined>;
    type SerializeTupleStruct = Impossible<String, Declined>;
    type SerializeTupleVariant = Impossible<String, Declined>;
    type SerializeMap = Impossible<String, Declined>;
    type SerializeStruct = Impossible<String, Declined>;
    type SerializeStructVariant = Impossible<String, Declined>;

    fn serialize_bool(self, v: bool) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_i8(self, v: i8) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_i16(self, v: i16) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_i32(self, v: i32) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_i64(self, v: i64) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_u8(self, v: u8) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_u16(self, v: u16) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_u32(self, v: u32) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_u64(self, v: u64) -> Result<String, Declined> {
        key_text(v)
    }
    fn serialize_f32(self, _v: f32) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_f64(self, _v: f64) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_char(self, v: char) -> Result<String, Declined> {
        Ok(v.to_string())
    }
    fn serialize_str(self, v: &str) -> Result<String, Declined> {
        Ok(v.to_owned())
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_none(self) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_unit(self) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, Declined> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<String, Declined> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, Declined> {
        Err(Declined)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Declined> {
        Err(Declined)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Declined> {
        Err(Declined)
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeTupleStruct, Declined> {
        Err(Declined)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Declined> {
        Err(Declined)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Declined> {
        Err(Declined)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeStruct, Declined> {
        Err(Declined)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Declined> {
        Err(Declined)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::de::DeserializeOwned;

    use super::*;
    use crate::json::RawJson;
    use crate::json::tests::any_json;

    /// The text the tree path writes for `value`.
    fn tree<T: Serialize + ?Sized>(value: &T) -> String {
        RawJson::from_value(&serde_json::to_value(value).unwrap()).as_str().to_owned()
    }

    fn direct<T: Serialize + ?Sized>(value: &T) -> String {
        let mut out = Vec::new();
        write(value, &mut out).expect("the direct writer handles it");
        String::from_utf8(out).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Any JSON document (escapes, non-ASCII, floats, nesting) is written byte for byte as
        /// the tree path writes it.
        #[test]
        fn any_document_is_written_as_the_tree_writes_it(v in any_json()) {
            prop_assert_eq!(direct(&v), tree(&v));
        }
    }

    /// Decodes `doc` as `T`, then checks both paths write the same text, and that the text
    /// holds every key in `expect` (so the document was understood, not mostly defaulted).
    fn typed<T: Serialize + DeserializeOwned>(doc: &str, expect: &[&str]) {
        let value: T = serde_json::from_str(doc).unwrap();
        let text = direct(&value);
        assert_eq!(text, tree(&value), "{}", std::any::type_name::<T>());
        for key in expect {
            assert!(text.contains(&format!("\"{key}\"")), "{key} missing from {text}");
        }
        assert_eq!(RawJson::encode(&value).unwrap().as_str(), text);
    }

    #[test]
    fn the_kinds_are_written_as_the_tree_writes_them() {
        typed::<crate::kinds::Workload>(
            r#"{"containers":[{"name":"main","image":"web:1","command":["serve"],"args":["--port","80"],
                "env":[{"name":"B","value":"2"},{"name":"A","value":"1"}],"workingDir":"/srv",
                "resources":{"requests":{"memory":"100Mi","cpu":"100m"},"limits":{"cpu":"1"}},
                "ports":[{"name":"http","containerPort":80}],
                "livenessProbe":{"action":{"http":{"path":"/healthz","port":80}},"periodSeconds":5},
                "readinessProbe":{"action":{"exec":{"command":["true"]}}}}],
              "restartPolicy":"Always","nodeName":"n1","nodeSelector":{"zone":"a","disk":"ssd"},
              "tolerations":[{"key":"k","operator":"Exists","effect":"NoExecute","tolerationSeconds":30}],
              "priority":-5,"terminationGracePeriodSeconds":10}"#,
            &["containers", "livenessProbe", "http", "exec", "nodeSelector", "tolerations", "workingDir", "priority"],
        );
        typed::<crate::kinds::WorkloadStatus>(
            r#"{"phase":"Running","restartCount":2,"startTime":"2026-12-08T01:02:03Z",
                "conditions":[{"type":"Ready","status":"True","reason":"Up","lastTransitionTime":"2026-12-08T01:02:03Z"}],
                "containerStatuses":[{"name":"main","state":{"running":{"started_at":"2026-12-08T01:02:03Z"}},"ready":true,"restartCount":2}],
                "address":"10.0.0.1","message":"fine \"quoted\" é"}"#,
            &["conditions", "containerStatuses", "running", "started_at", "address"],
        );
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    enum Shape {
        Unit,
        Newtype(u8),
        Pair(i32, String),
        Shaped { z: bool, a: Option<f32> },
    }

    #[derive(Serialize)]
    struct Model {
        zeta: Vec<Shape>,
        alpha: BTreeMap<u32, f64>,
        tuple: (i8, char),
        raw: RawJson,
        unit: (),
        floats: [f64; 4],
        small: f32,
        ends: (u64, i64),
        none: Option<bool>,
        #[serde(flatten)]
        extra: BTreeMap<String, serde_json::Value>,
    }

    /// Every shape of serde's data model: variants of each kind, integer map keys, tuples, raw
    /// JSON text (not canonical as given), unit, non-finite floats, an `f32`, the integer
    /// limits, and a flattened map that repeats a field's key (the last one written wins).
    #[test]
    fn every_shape_of_the_data_model_is_written_as_the_tree_writes_it() {
        let raw: RawJson = serde_json::from_str(r#"{ "b": [1, 2.5], "a": {"y": null, "x": "é"} }"#).unwrap();
        let model = Model {
            zeta: vec![
                Shape::Unit,
                Shape::Newtype(7),
                Shape::Pair(-1, "p".into()),
                Shape::Shaped { z: true, a: Some(0.1) },
            ],
            alpha: [(10, 1.5), (2, -0.0), (33, 1e300)].into_iter().collect(),
            tuple: (-8, '"'),
            raw,
            unit: (),
            floats: [f64::NAN, f64::INFINITY, 0.1, -2.0],
            small: 0.3,
            ends: (u64::MAX, i64::MIN),
            none: None,
            extra: [
                ("zeta".to_string(), serde_json::json!("replaced")),
                ("beta".into(), serde_json::json!({"k": [true]})),
            ]
            .into_iter()
            .collect(),
        };
        let text = direct(&model);
        assert_eq!(text, tree(&model));
        assert!(text.starts_with(r#"{"alpha":{"10":1.5,"2":-0.0,"33":1e+300},"beta":"#), "{text}");
        assert!(text.contains(r#""zeta":"replaced""#), "{text}");
        assert!(text.contains(r#""raw":{"a":{"x":"é","y":null},"b":[1,2.5]}"#), "{text}");
    }

    /// What the direct writer declines (128-bit integers, keys that are neither strings nor
    /// integers) still encodes, through the tree, or fails as the tree fails.
    #[test]
    fn what_is_declined_takes_the_tree_path() {
        let mut out = Vec::new();
        assert!(write(&(1u128 << 70), &mut out).is_err());
        assert!(RawJson::encode(&(1u128 << 70)).is_err(), "too big for the tree as well");
        assert_eq!(RawJson::encode(&5u128).unwrap().as_str(), "5");
        let float_keys: BTreeMap<String, BTreeMap<bool, u8>> =
            [("m".to_string(), [(true, 1), (false, 0)].into_iter().collect())].into_iter().collect();
        assert_eq!(RawJson::encode(&float_keys).unwrap().as_str(), tree(&float_keys));
    }
}
