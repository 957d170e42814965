//! The data that GitHub Actions expressions work on: contexts, event payloads, matrix
//! values, outputs.
//!
//! GitHub's model, not JSON's: numbers are `f64`, objects keep their insertion order
//! and are looked up case-insensitively (`github.EVENT_NAME` is `github.event_name`),
//! and every value has a string form (`null` is `''`, an object is `Object`).

use std::fmt;

use indexmap::IndexMap;

/// A value of the expression language.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// `null`; also what a missing property reads as.
    #[default]
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Every number is a double, as in GitHub's evaluator.
    Number(f64),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object, in insertion order.
    Object(Object),
}

/// An object: insertion-ordered, keys compared case-insensitively on lookup.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object(IndexMap<String, Value>);

impl Object {
    /// An empty object.
    pub fn new() -> Self {
        Object(IndexMap::new())
    }

    /// The value under `key`, compared case-insensitively (an exact match wins).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).or_else(|| {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })
    }

    /// Sets `key`, replacing a key that differs only in case (keeping its position).
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        if let Some(existing) = self
            .0
            .keys()
            .find(|k| k.eq_ignore_ascii_case(&key))
            .cloned()
        {
            if existing != key {
                if let Some(i) = self.0.get_index_of(&existing) {
                    self.0.shift_remove(&existing);
                    self.0.shift_insert(i, key, value);
                    return;
                }
            }
        }
        self.0.insert(key, value);
    }

    /// Removes `key` (case-insensitively).
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let found = self
            .0
            .keys()
            .find(|k| k.eq_ignore_ascii_case(key))
            .cloned()?;
        self.0.shift_remove(&found)
    }

    /// Keys and values in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter()
    }

    /// Values in order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.0.values()
    }

    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No keys?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, Value)> for Object {
    fn from_iter<T: IntoIterator<Item = (String, Value)>>(iter: T) -> Self {
        let mut o = Object::new();
        for (k, v) in iter {
            o.insert(k, v);
        }
        o
    }
}

impl<'a> IntoIterator for &'a Object {
    type Item = (&'a String, &'a Value);
    type IntoIter = indexmap::map::Iter<'a, String, Value>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Value {
    /// A string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    /// GitHub's truthiness: `false`, `0`, `-0`, `NaN`, `''` and `null` are false;
    /// everything else (arrays and objects included, even empty) is true.
    pub fn truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => *n != 0.0 && !n.is_nan(),
            Value::String(s) => !s.is_empty(),
            Value::Array(_) | Value::Object(_) => true,
        }
    }

    /// Property access: an object's key (case-insensitive), else `None`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(o) => o.get(key),
            _ => None,
        }
    }

    /// The object, if this is one.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// GitHub's string form (what `${{ }}` interpolation inserts): `null` is `''`,
    /// numbers as GitHub prints them, arrays and objects `Array` / `Object`.
    pub fn to_display_string(&self) -> String {
        self.to_string()
    }

    /// GitHub's `toJSON`: pretty-printed with two-space indentation.
    pub fn to_json_pretty(&self) -> String {
        // Through our own Serialize, which keeps key order (serde_json's map sorts).
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The value as JSON. Integral numbers become JSON integers; NaN and the
    /// infinities, which JSON cannot hold, become `null`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(n) => number_to_json(*n),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
            Value::Object(o) => {
                serde_json::Value::Object(o.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }

    /// Parses JSON text (GitHub's `fromJSON`).
    pub fn from_json_str(text: &str) -> Result<Value, serde_json::Error> {
        // serde_json's own map is sorted; go through a visitor-free ordered parse by
        // deserializing into our type directly.
        serde_json::from_str::<OrderedJson>(text).map(|o| o.0)
    }
}

fn number_to_json(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        serde_json::Value::Number(serde_json::Number::from(n as i64))
    } else {
        serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

/// GitHub's number formatting: integers without a fraction, otherwise the shortest
/// form that round-trips after rounding to 15 decimals; `Infinity`, `-Infinity`, `NaN`.
pub fn format_number(n: f64) -> String {
    if n.is_nan() {
        return "NaN".into();
    }
    if n.is_infinite() {
        return if n > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let rounded: f64 = format!("{n:.15}").parse().unwrap_or(n);
    if rounded.fract() == 0.0 && rounded.abs() < 1e21 {
        format!("{}", rounded as i128)
    } else {
        format!("{rounded}")
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Number(n) => f.write_str(&format_number(*n)),
            Value::String(s) => f.write_str(s),
            Value::Array(_) => f.write_str("Array"),
            Value::Object(_) => f.write_str("Object"),
        }
    }
}

impl From<&serde_json::Value> for Value {
    fn from(v: &serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(a) => Value::Array(a.iter().map(Value::from).collect()),
            serde_json::Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), Value::from(v))).collect())
            }
        }
    }
}

impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        Value::from(&v)
    }
}

impl From<&serde_yaml_ng::Value> for Value {
    /// YAML as GitHub reads a workflow: scalars keep their type, mapping keys become
    /// strings, tags are dropped.
    fn from(v: &serde_yaml_ng::Value) -> Self {
        use serde_yaml_ng::Value as Y;
        match v {
            Y::Null => Value::Null,
            Y::Bool(b) => Value::Bool(*b),
            Y::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
            Y::String(s) => Value::String(s.clone()),
            Y::Sequence(s) => Value::Array(s.iter().map(Value::from).collect()),
            Y::Mapping(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (yaml_key(k), Value::from(v)))
                    .collect(),
            ),
            Y::Tagged(t) => Value::from(&t.value),
        }
    }
}

fn yaml_key(k: &serde_yaml_ng::Value) -> String {
    match k {
        serde_yaml_ng::Value::String(s) => s.clone(),
        other => Value::from(other).to_string(),
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(n: f64) -> Self {
        Value::Number(n)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<Object> for Value {
    fn from(o: Object) -> Self {
        Value::Object(o)
    }
}

impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(n) => number_to_json(*n).serialize(s),
            Value::String(v) => s.serialize_str(v),
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Object(o) => {
                let mut map = s.serialize_map(Some(o.len()))?;
                for (k, v) in o {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <OrderedJson as serde::Deserialize>::deserialize(d).map(|o| o.0)
    }
}

/// Deserializes any self-describing format into a [`Value`], keeping key order.
struct OrderedJson(Value);

impl<'de> serde::Deserialize<'de> for OrderedJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedJson;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_unit<E>(self) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::Null))
            }
            fn visit_none<E>(self) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::Null))
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<OrderedJson, D::Error> {
                <OrderedJson as serde::Deserialize>::deserialize(d)
            }
            fn visit_bool<E>(self, b: bool) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::Bool(b)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::Number(n as f64)))
            }
            fn visit_u64<E>(self, n: u64) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::Number(n as f64)))
            }
            fn visit_f64<E>(self, n: f64) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::Number(n)))
            }
            fn visit_str<E>(self, s: &str) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::String(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<OrderedJson, E> {
                Ok(OrderedJson(Value::String(s)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OrderedJson, A::Error> {
                let mut out = Vec::new();
                while let Some(OrderedJson(v)) = seq.next_element()? {
                    out.push(v);
                }
                Ok(OrderedJson(Value::Array(out)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<OrderedJson, A::Error> {
                let mut out = Object::new();
                while let Some((k, OrderedJson(v))) = map.next_entry::<String, OrderedJson>()? {
                    out.insert(k, v);
                }
                Ok(OrderedJson(Value::Object(out)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_keep_order_and_look_up_case_insensitively() {
        let v = Value::from_json_str(r#"{"b": 1, "A": {"x": [true, null]}, "c": "s"}"#).unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(o.keys().collect::<Vec<_>>(), ["b", "A", "c"]);
        assert_eq!(
            v.get("a").and_then(|a| a.get("X")),
            Some(&Value::Array(vec![Value::Bool(true), Value::Null]))
        );
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"b":1,"A":{"x":[true,null]},"c":"s"}"#
        );
    }

    #[test]
    fn insert_replaces_a_key_that_differs_in_case_in_place() {
        let mut o = Object::new();
        o.insert("Foo", Value::from(1.0));
        o.insert("bar", Value::from(2.0));
        o.insert("FOO", Value::from(3.0));
        assert_eq!(o.keys().collect::<Vec<_>>(), ["FOO", "bar"]);
        assert_eq!(o.get("foo"), Some(&Value::Number(3.0)));
        assert_eq!(o.remove("foo"), Some(Value::Number(3.0)));
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn string_forms_follow_github() {
        for (v, s) in [
            (Value::Null, ""),
            (Value::Bool(true), "true"),
            (Value::Number(3.0), "3"),
            (Value::Number(-0.5), "-0.5"),
            (Value::Number(0.1 + 0.2), "0.3"),
            (Value::Number(f64::INFINITY), "Infinity"),
            (Value::Number(f64::NAN), "NaN"),
            (Value::Array(vec![]), "Array"),
            (Value::Object(Object::new()), "Object"),
        ] {
            assert_eq!(v.to_string(), s, "{v:?}");
        }
    }

    #[test]
    fn truthiness_follows_github() {
        for (v, t) in [
            (Value::Null, false),
            (Value::Bool(false), false),
            (Value::Number(0.0), false),
            (Value::Number(f64::NAN), false),
            (Value::str(""), false),
            (Value::str("0"), true),
            (Value::Array(vec![]), true),
            (Value::Object(Object::new()), true),
        ] {
            assert_eq!(v.truthy(), t, "{v:?}");
        }
    }

    #[test]
    fn yaml_scalars_keep_their_type() {
        let y: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("{os: [ubuntu, debian], node: 18, exp: false, 1: x}").unwrap();
        let v = Value::from(&y);
        assert_eq!(v.get("node"), Some(&Value::Number(18.0)));
        assert_eq!(v.get("exp"), Some(&Value::Bool(false)));
        assert_eq!(v.get("1"), Some(&Value::str("x")));
        assert_eq!(v.to_json_pretty().lines().next(), Some("{"));
    }
}
