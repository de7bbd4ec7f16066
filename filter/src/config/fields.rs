//! Reading a JSON document field by field, naming each field by its path in errors
//! (`traces.propagation[0]: unknown variant ...`). The pluginConfig is read with this instead of
//! serde's derived deserializers, which together with serde_path_to_error for the paths were the
//! largest part of the Wasm module (~60 KB; see BENCHMARKS.md). JSON itself is parsed by serde_json.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::error::ConfigError;
use crate::quote::{name as quoted_name, quote};

/// Longest CEL expression taken.
pub const MAX_EXPRESSION_LEN: usize = 4096;

/// The fields of one JSON object, at `path` in the document.
pub(crate) struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// The object `value` at `path` (empty for the document), whose fields may only be `known`.
    pub fn new(path: &str, value: &'a Value, known: &[&str]) -> Result<Self, ConfigError> {
        let map = value.as_object().ok_or_else(|| invalid_type(path, value, "a JSON object"))?;
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ConfigError::new(
                &join(path, unknown),
                format!("unknown field `{}`, expected {}", quoted_name(unknown), one_of(known)),
            ));
        }
        Ok(Self { path: path.to_string(), map })
    }

    /// The path of field `name`.
    pub fn path(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// Field `name`; `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// The object in field `name`, whose fields may only be `known`.
    pub fn object(&self, name: &str, known: &[&str]) -> Result<Option<Fields<'a>>, ConfigError> {
        self.get(name).map(|v| Fields::new(&self.path(name), v, known)).transpose()
    }

    /// The object in field `name` whose keys are data, not field names (any key goes).
    pub fn map(&self, name: &str) -> Result<Option<Fields<'a>>, ConfigError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let path = self.path(name);
        let map = v.as_object().ok_or_else(|| invalid_type(&path, v, "a JSON object"))?;
        Ok(Some(Fields { path, map }))
    }

    /// Every key and value, in the document's order.
    pub fn entries(&self) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.map.iter()
    }

    /// A boolean, `default` when absent.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        self.read(name, default, "a boolean", Value::as_bool)
    }

    /// A boolean, `None` when absent.
    pub fn optional_bool(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        self.get(name).map(|v| v.as_bool().ok_or_else(|| invalid_type(&self.path(name), v, "a boolean"))).transpose()
    }

    /// An array of objects whose fields may only be `known`, empty when absent.
    pub fn objects(&self, name: &str, known: &[&str]) -> Result<Vec<Fields<'a>>, ConfigError> {
        let Some(v) = self.get(name) else {
            return Ok(Vec::new());
        };
        let path = self.path(name);
        let items = v.as_array().ok_or_else(|| invalid_type(&path, v, "an array of objects"))?;
        items.iter().enumerate().map(|(i, v)| Fields::new(&format!("{path}[{i}]"), v, known)).collect()
    }

    /// A non-negative integer, `default` when absent.
    pub fn u64(&self, name: &str, default: u64) -> Result<u64, ConfigError> {
        self.read(name, default, "a non-negative integer", Value::as_u64)
    }

    /// A number, `default` when absent.
    pub fn f64(&self, name: &str, default: f64) -> Result<f64, ConfigError> {
        self.read(name, default, "a number", Value::as_f64)
    }

    /// A string, if present.
    pub fn string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        self.get(name)
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| invalid_type(&self.path(name), v, "a string")))
            .transpose()
    }

    /// An array of strings, empty when absent.
    pub fn strings(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        self.array(name, "an array of strings", |path, v| {
            v.as_str().map(str::to_string).ok_or_else(|| invalid_type(path, v, "a string"))
        })
    }

    /// An object of string values, empty when absent.
    pub fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let Some(v) = self.get(name) else {
            return Ok(BTreeMap::new());
        };
        let path = self.path(name);
        let map = v.as_object().ok_or_else(|| invalid_type(&path, v, "an object of strings"))?;
        map.iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => Ok((k.clone(), s.to_string())),
                None => Err(invalid_type(&join(&path, k), v, "a string")),
            })
            .collect()
    }

    /// One of `variants` by name, `default` when absent.
    pub fn variant<T: Copy>(&self, name: &str, variants: &[(&str, T)], default: T) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => pick(&self.path(name), v, variants),
        }
    }

    /// An array of `variants` by name, `default` when absent.
    pub fn variants<T: Copy>(
        &self,
        name: &str,
        variants: &[(&str, T)],
        default: Vec<T>,
    ) -> Result<Vec<T>, ConfigError> {
        if self.get(name).is_none() {
            return Ok(default);
        }
        self.array(name, "an array of strings", |path, v| pick(path, v, variants))
    }

    fn read<T>(
        &self,
        name: &str,
        default: T,
        expected: &str,
        get: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => get(v).ok_or_else(|| invalid_type(&self.path(name), v, expected)),
        }
    }

    fn array<T>(
        &self,
        name: &str,
        expected: &str,
        item: impl Fn(&str, &Value) -> Result<T, ConfigError>,
    ) -> Result<Vec<T>, ConfigError> {
        let Some(v) = self.get(name) else {
            return Ok(Vec::new());
        };
        let path = self.path(name);
        let items = v.as_array().ok_or_else(|| invalid_type(&path, v, expected))?;
        items.iter().enumerate().map(|(i, v)| item(&format!("{path}[{i}]"), v)).collect()
    }
}

fn pick<T: Copy>(path: &str, v: &Value, variants: &[(&str, T)]) -> Result<T, ConfigError> {
    let s = v.as_str().ok_or_else(|| invalid_type(path, v, "a string"))?;
    variants.iter().find(|(n, _)| *n == s).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
        ConfigError::new(path, format!("unknown variant `{}`, expected {}", quoted_name(s), one_of(&names)))
    })
}

fn join(path: &str, name: &str) -> String {
    // An empty key still needs a visible name, and a long one is cut.
    let name = quoted_name(name);
    if path.is_empty() {
        name
    } else {
        format!("{path}.{name}")
    }
}

fn one_of(names: &[&str]) -> String {
    let mut text = String::from("one of ");
    for (i, n) in names.iter().enumerate() {
        text += if i == 0 { "`" } else { ", `" };
        text += n;
        text += "`";
    }
    text
}

fn invalid_type(path: &str, v: &Value, expected: &str) -> ConfigError {
    let got = match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string {}", quote(s)),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    let path = if path.is_empty() { "." } else { path };
    ConfigError::new(path, format!("invalid type: {got}, expected {expected}"))
}

/// Whether `value` can be sent as a header value (no line breaks, no NUL).
pub(crate) fn is_header_value(value: &str) -> bool {
    !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// Whether `name` is a lower-case HTTP header name (RFC 9110 token characters).
pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A CEL expression as configured: not blank, at most [`MAX_EXPRESSION_LEN`] bytes. Its syntax
/// is the proxy's to judge (`expr_create`), at configure time.
pub(crate) fn expression(field: &str, expr: Option<String>) -> Result<Option<String>, ConfigError> {
    match expr {
        Some(e) if e.trim().is_empty() => Err(ConfigError::new(field, "is an empty expression")),
        Some(e) if e.len() > MAX_EXPRESSION_LEN => {
            Err(ConfigError::new(field, format!("is {} bytes, at most {MAX_EXPRESSION_LEN}: {}", e.len(), quote(&e))))
        }
        e => Ok(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_fields_with_defaults_and_names_bad_ones_by_path() {
        let doc = json!({"a": {"on": true, "n": 3, "x": 0.5, "s": "v", "list": ["p", "q"], "map": {"k": "v"},
                               "mode": "b", "modes": ["a", "b"], "nothing": null}});
        let root = Fields::new("", &doc, &["a"]).unwrap();
        let known = ["on", "n", "x", "s", "list", "map", "mode", "modes", "nothing"];
        let a = root.object("a", &known).unwrap().unwrap();
        assert!(a.bool("on", false).unwrap() && a.bool("nothing", true).unwrap());
        assert_eq!((a.u64("n", 0).unwrap(), a.f64("x", 0.0).unwrap(), a.f64("n", 0.0).unwrap()), (3, 0.5, 3.0));
        assert_eq!(a.string("s").unwrap().as_deref(), Some("v"));
        assert_eq!(a.strings("list").unwrap(), ["p", "q"]);
        assert_eq!(a.string_map("map").unwrap()["k"], "v");
        let v = [("a", 1), ("b", 2)];
        assert_eq!((a.variant("mode", &v, 0).unwrap(), a.variant("absent", &v, 9).unwrap()), (2, 9));
        assert_eq!(a.variants("modes", &v, vec![]).unwrap(), [1, 2]);
        let err = |r: Result<u64, ConfigError>| r.unwrap_err().to_string();
        assert_eq!(err(a.u64("s", 0)), "a.s: invalid type: string \"v\", expected a non-negative integer");
        assert_eq!(err(a.u64("x", 0)), "a.x: invalid type: number `0.5`, expected a non-negative integer");
        assert_eq!(
            a.variants("list", &v, vec![]).unwrap_err().to_string(),
            "a.list[0]: unknown variant `p`, expected one of `a`, `b`"
        );
        let unknown = Fields::new("", &json!({"b": 1}), &["a"]).err().unwrap().to_string();
        assert_eq!(unknown, "b: unknown field `b`, expected one of `a`");
        let nested = root.object("a", &["on"]).err().unwrap().to_string();
        assert!(nested.starts_with("a.list: unknown field `list`"), "{nested}");
        assert_eq!(
            Fields::new("", &json!([1]), &[]).err().unwrap().to_string(),
            ".: invalid type: an array, expected a JSON object"
        );
        // Found by fuzzing: an empty key must still be named.
        let empty = Fields::new("", &json!({"": {}}), &["a"]).err().unwrap();
        assert_eq!(empty.to_string(), "\"\": unknown field `\"\"`, expected one of `a`");
        let nested = Fields::new("a", &json!({"": 1}), &[]).err().unwrap();
        assert_eq!(nested.field, "a.\"\"");
    }
}
