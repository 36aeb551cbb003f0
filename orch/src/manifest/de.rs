//! A strict serde `Deserializer` over a located tree: an unknown field is an error (with the
//! closest known name as a suggestion), and every error carries the field path and the
//! position of the node it is about.
//!
//! Structs tell a deserializer their field names (`deserialize_struct`), which is how unknown
//! fields are found without a schema. Two serde shapes buffer their input and so are not seen
//! field by field: internally tagged enums (`#[serde(tag = "type")]`) and untagged ones. Their
//! mappings are noted while decoding, and checked afterwards against the decoded value written
//! back out: a key that is not there was not read, so it is unknown.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use super::tree::{Key, Node, Pos, Segment, Value, join_key, segments};

/// Mappings a type read without naming its fields (`deserialize_any`: internally tagged and
/// untagged enums buffer their input that way), checked against the decoded value afterwards.
/// Each is its path and its keys with where they are written.
type AnyMaps = Rc<RefCell<Vec<(String, Vec<(String, Pos)>)>>>;

/// A decoding error: what went wrong, at which field and where.
#[derive(Debug)]
pub(crate) struct DeError {
    pub(crate) message: String,
    pub(crate) path: Option<String>,
    pub(crate) pos: Option<Pos>,
    /// The message names the place itself (`unknown field `x` in spec`).
    pub(crate) self_placed: bool,
}

impl DeError {
    /// Fills in the place when the error does not have one yet (the innermost node wins).
    fn at(mut self, path: &str, pos: Pos) -> Self {
        if self.pos.is_none() {
            self.path = Some(path.to_string());
            self.pos = Some(pos);
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError { message: msg.to_string(), path: None, pos: None, self_placed: false }
    }
}

/// The known name closest to `unknown`, if one is close enough to be a likely typo.
pub(crate) fn suggest<'a>(unknown: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = unknown.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (strsim::levenshtein(&lower, &k.to_ascii_lowercase()), k))
        .filter(|(d, k)| *d <= (k.len().max(unknown.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// `unknown field `replica` in spec; did you mean `replicas`?`
pub(crate) fn unknown_field(name: &str, within: &str, known: &[&str], pos: Pos, path: String) -> DeError {
    let place = if within.is_empty() { "the object".to_string() } else { within.to_string() };
    let message = match suggest(name, known.iter().copied()) {
        Some(s) => format!("unknown field `{name}` in {place}; did you mean `{s}`?"),
        None if known.is_empty() => format!("unknown field `{name}` in {place}: it takes no fields"),
        None => format!(
            "unknown field `{name}` in {place}; the fields are {}",
            known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        ),
    };
    DeError { message, path: Some(path), pos: Some(pos), self_placed: true }
}

/// Deserializes one node found at `path`.
pub(crate) struct NodeDe<'a> {
    pub(crate) node: &'a Node,
    pub(crate) path: String,
    any: AnyMaps,
}

impl<'a> NodeDe<'a> {
    fn visit_any<V: Visitor<'a>>(self, visitor: V, record: bool) -> Result<V::Value, DeError> {
        let path = self.path.clone();
        let any = self.any.clone();
        let r = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::I64(n) => visitor.visit_i64(*n),
            Value::U64(n) => visitor.visit_u64(*n),
            Value::F64(n) => visitor.visit_f64(*n),
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqDe { items: items.iter().enumerate(), path, any }),
            Value::Map(entries) => {
                if record {
                    let keys = entries.iter().map(|(k, _)| (k.name.clone(), k.pos)).collect();
                    any.borrow_mut().push((path.clone(), keys));
                }
                visitor.visit_map(MapDe { entries: entries.iter(), value: None, key_path: String::new(), path, any })
            }
        };
        self.wrap(r)
    }

    fn wrap<T>(&self, r: Result<T, DeError>) -> Result<T, DeError> {
        r.map_err(|e| e.at(&self.path, self.node.pos))
    }
}

struct MapDe<'a> {
    entries: std::slice::Iter<'a, (Key, Node)>,
    value: Option<&'a Node>,
    key_path: String,
    path: String,
    any: AnyMaps,
}

impl<'de> de::MapAccess<'de> for MapDe<'de> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        match self.entries.next() {
            None => Ok(None),
            Some((k, v)) => {
                self.value = Some(v);
                self.key_path = join_key(&self.path, &k.name);
                let key: de::value::StrDeserializer<'_, DeError> = k.name.as_str().into_deserializer();
                seed.deserialize(key).map(Some).map_err(|e| e.at(&self.key_path, k.pos))
            }
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let node = self.value.take().ok_or_else(|| de::Error::custom("a value without a key"))?;
        seed.deserialize(NodeDe { node, path: std::mem::take(&mut self.key_path), any: self.any.clone() })
    }
}

struct SeqDe<'a> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
    path: String,
    any: AnyMaps,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'de> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => {
                seed.deserialize(NodeDe { node, path: format!("{}[{i}]", self.path), any: self.any.clone() }).map(Some)
            }
        }
    }
}

struct EnumDe<'a> {
    variant: &'a Key,
    value: &'a Node,
    path: String,
    any: AnyMaps,
}

impl<'de> de::EnumAccess<'de> for EnumDe<'de> {
    type Error = DeError;
    type Variant = NodeDe<'de>;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, NodeDe<'de>), DeError> {
        let key: de::value::StrDeserializer<'_, DeError> = self.variant.name.as_str().into_deserializer();
        let v = seed.deserialize(key).map_err(|e| e.at(&self.path, self.variant.pos))?;
        Ok((v, NodeDe { node: self.value, path: join_key(&self.path, &self.variant.name), any: self.any.clone() }))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDe<'de> {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        match &self.node.value {
            Value::Null => Ok(()),
            _ => Err(<DeError as de::Error>::custom(format!("expected nothing, found {}", self.node.what()))
                .at(&self.path, self.node.pos)),
        }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

struct UnitOnly;

impl<'de> de::VariantAccess<'de> for UnitOnly {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, DeError> {
        Err(de::Error::custom("this variant needs a value: write it as a mapping `Variant: value`"))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom("this variant needs values: write it as a mapping `Variant: [...]`"))
    }
    fn struct_variant<V: Visitor<'de>>(self, _f: &'static [&'static str], _visitor: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom("this variant needs fields: write it as a mapping `Variant: {...}`"))
    }
}

struct UnitEnum<'a>(&'a str);

impl<'de> de::EnumAccess<'de> for UnitEnum<'de> {
    type Error = DeError;
    type Variant = UnitOnly;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, UnitOnly), DeError> {
        let key: de::value::StrDeserializer<'_, DeError> = self.0.into_deserializer();
        Ok((seed.deserialize(key)?, UnitOnly))
    }
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_any(visitor, true)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Null => {
                let r = visitor.visit_none();
                self.wrap(r)
            }
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            // `containers:` with nothing after it reads as an empty list, as in Kubernetes.
            Value::Null => {
                let r = visitor.visit_seq(SeqDe {
                    items: [].iter().enumerate(),
                    path: self.path.clone(),
                    any: self.any.clone(),
                });
                self.wrap(r)
            }
            _ => self.visit_any(visitor, false),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Null => {
                let r = visitor.visit_map(MapDe {
                    entries: [].iter(),
                    value: None,
                    key_path: String::new(),
                    path: self.path.clone(),
                    any: self.any.clone(),
                });
                self.wrap(r)
            }
            _ => self.visit_any(visitor, false),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if let Value::Map(entries) = &self.node.value {
            for (k, _) in entries {
                if !fields.contains(&k.name.as_str()) {
                    return Err(unknown_field(&k.name, &self.path, fields, k.pos, join_key(&self.path, &k.name)));
                }
            }
        }
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Str(s) => visitor.visit_enum(UnitEnum(s)),
            Value::Map(entries) if entries.len() == 1 => {
                let (variant, value) = &entries[0];
                visitor.visit_enum(EnumDe { variant, value, path: self.path.clone(), any: self.any.clone() })
            }
            _ => Err(<DeError as de::Error>::custom(format!(
                "expected a variant name or a mapping of one variant to its value, found {}",
                self.node.what()
            ))),
        };
        self.wrap(r)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_any(visitor, false)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit_struct tuple tuple_struct identifier ignored_any
    }
}

/// Decodes the node at `path` strictly (see the module docs).
pub(crate) fn decode<'a, T: serde::Deserialize<'a> + serde::Serialize>(
    node: &'a Node,
    path: &str,
) -> Result<T, DeError> {
    let any = AnyMaps::default();
    let value = T::deserialize(NodeDe { node, path: path.to_string(), any: any.clone() })?;
    let noted = any.take();
    if noted.is_empty() {
        return Ok(value);
    }
    // What was read, written back out: a noted mapping's key that is not there was not read.
    let Ok(out) = serde_json::to_value(&value) else { return Ok(value) };
    for (at, entries) in noted {
        let relative = at.strip_prefix(path).unwrap_or(&at);
        let mut here = Some(&out);
        for seg in segments(relative) {
            here = match seg {
                Segment::Key(k) => here.and_then(|v| v.get(&k)),
                Segment::Index(i) => here.and_then(|v| v.get(i)),
            };
        }
        let Some(serde_json::Value::Object(read)) = here else { continue };
        let known: Vec<&str> = read.keys().map(String::as_str).collect();
        for (k, pos) in entries {
            if !read.contains_key(&k) {
                return Err(unknown_field(&k, &at, &known, pos, join_key(&at, &k)));
            }
        }
    }
    Ok(value)
}
