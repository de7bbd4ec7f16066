//! Telemetry scopes: the settings of a mesh's narrower Telemetry resources (a namespace's, a
//! workload selector's) carried in one `pluginConfig`, each proxy applying to itself those that
//! match its namespace and labels, in order, as istiod merges them for it (istio/istio
//! `pilot/pkg/model/telemetry.go`: `applicableTelemetries` takes the root namespace's, the
//! proxy's namespace's, then every matching selector's in creation order; `mergeMetrics` appends
//! overrides; `Tracing` replaces each field that is set, `customTags` as a whole; `mergeLogs`
//! replaces `disabled` and the filter).
//!
//! Why in the proxy: every WasmPlugin that selects a proxy runs in it, and a selector cannot
//! exclude, so a namespace's meshtel and a workload's would both run. One plugin whose proxies
//! pick their own settings runs once everywhere.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::config::fields::Fields;
use crate::config::ConfigError;

/// Most scopes in one `pluginConfig`.
pub const MAX_SCOPES: usize = 256;

/// The settings a scope may carry, per section: what Istio's Telemetry API sets.
const SETTINGS: [(&str, &[&str]); 3] = [
    ("traces", &["enabled", "sampling_ratio", "custom_tags"]),
    ("metrics", &["overrides"]),
    ("logs", &["enabled", "filter"]),
];

/// One scope: where it applies and its settings.
struct Scope<'a> {
    namespace: String,
    selector: BTreeMap<String, String>,
    settings: &'a Map<String, Value>,
}

/// Read and check the `scopes` of `doc` (absent: none).
fn read(doc: &Value) -> Result<Vec<Scope<'_>>, ConfigError> {
    if !doc.is_object() {
        return Ok(Vec::new());
    }
    let f = top(doc)?;
    let entries = f.objects("scopes", &["namespace", "selector", "traces", "metrics", "logs"])?;
    if entries.len() > MAX_SCOPES {
        return Err(ConfigError::new("scopes", format!("at most {MAX_SCOPES} scopes")));
    }
    let mut out = Vec::new();
    for (i, s) in entries.iter().enumerate() {
        let namespace = s.string("namespace")?.filter(|n| !n.is_empty());
        let namespace = namespace.ok_or_else(|| ConfigError::new(&s.path("namespace"), "is required"))?;
        for (section, known) in SETTINGS {
            s.object(section, known)?;
        }
        let Some(Value::Object(settings)) = doc.pointer(&format!("/scopes/{i}")) else {
            return Err(ConfigError::new(&format!("scopes[{i}]"), "is not an object"));
        };
        out.push(Scope { namespace, selector: s.string_map("selector")?, settings });
    }
    Ok(out)
}

/// The document's top level, knowing only `scopes` (the rest is [`crate::config`]'s).
fn top(doc: &Value) -> Result<Fields<'_>, ConfigError> {
    let known: Vec<&str> = doc.as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
    Fields::new("", doc, &known)
}

/// Apply `scope`'s settings to `base`: each setting replaces the one before, but
/// `metrics.overrides`, which are appended (later overrides win, per tag).
fn apply(base: &mut Value, scope: &Map<String, Value>) {
    for (section, known) in SETTINGS {
        let Some(Value::Object(settings)) = scope.get(section) else { continue };
        if !base.get(section).is_some_and(Value::is_object) {
            base[section] = Value::Object(Map::new());
        }
        for name in known {
            let Some(value) = settings.get(*name) else { continue };
            let into = &mut base[section][*name];
            match (section, *name, into.as_array_mut(), value.as_array()) {
                ("metrics", "overrides", Some(before), Some(more)) => before.extend(more.iter().cloned()),
                _ => *into = value.clone(),
            }
        }
    }
}

/// Whether a scope applies to a proxy in `namespace` with `labels`.
fn matches(scope: &Scope, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    scope.namespace == namespace && scope.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `doc` without its scopes, and each scope applied alone to it (to check them all), or, for a
/// proxy, the scopes that match it applied in order.
pub struct Resolved {
    /// The document for this proxy: the base with its matching scopes applied.
    pub doc: Value,
    /// Each scope applied alone to the base, for checking, with its position.
    pub each: Vec<(usize, Value)>,
}

/// Resolve the scopes of `doc` for a proxy in `namespace` with `labels` (`None`: no proxy, only
/// checking).
pub fn resolve(mut doc: Value, proxy: Option<(&str, &BTreeMap<String, String>)>) -> Result<Resolved, ConfigError> {
    let (each, matching) = {
        let scopes = read(&doc)?;
        let mut base = doc.clone();
        if let Some(m) = base.as_object_mut() {
            m.remove("scopes");
        }
        let each = scopes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut alone = base.clone();
                apply(&mut alone, s.settings);
                (i, alone)
            })
            .collect();
        let matching: Vec<Map<String, Value>> = match proxy {
            Some((namespace, labels)) => {
                scopes.iter().filter(|s| matches(s, namespace, labels)).map(|s| s.settings.clone()).collect()
            }
            None => Vec::new(),
        };
        (each, matching)
    };
    if let Some(m) = doc.as_object_mut() {
        m.remove("scopes");
    }
    for settings in &matching {
        apply(&mut doc, settings);
    }
    Ok(Resolved { doc, each })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn doc() -> Value {
        json!({
            "collector": {"cluster": "outbound|4318||c"},
            "traces": {"sampling_ratio": 1.0, "custom_tags": {"a": {"literal": {"value": "1"}}}},
            "metrics": {"overrides": [{"tag_overrides": {"x": {"value": "'root'"}}}]},
            "scopes": [
                {"namespace": "shop", "traces": {"sampling_ratio": 0.5}, "logs": {"enabled": true},
                 "metrics": {"overrides": [{"tag_overrides": {"x": {"value": "'shop'"}}}]}},
                {"namespace": "shop", "selector": {"app": "cart"}, "traces": {"custom_tags": {"b": {"literal": {"value": "2"}}}},
                 "logs": {"filter": "response.code >= 400"}},
                {"namespace": "other", "traces": {"enabled": false}},
            ],
        })
    }

    #[test]
    fn a_proxy_applies_the_scopes_that_match_it_in_order_as_istiod_merges() {
        let cart = resolve(doc(), Some(("shop", &labels(&[("app", "cart"), ("v", "1")])))).unwrap().doc;
        assert_eq!(cart["traces"]["sampling_ratio"], json!(0.5), "the namespace's");
        assert_eq!(cart["traces"]["custom_tags"], json!({"b": {"literal": {"value": "2"}}}), "replaced whole");
        assert_eq!(cart["logs"], json!({"enabled": true, "filter": "response.code >= 400"}));
        let overrides = cart["metrics"]["overrides"].as_array().unwrap();
        assert_eq!(overrides.len(), 2, "appended: the later wins per tag");
        assert!(cart.get("scopes").is_none());
        let web = resolve(doc(), Some(("shop", &labels(&[("app", "web")])))).unwrap().doc;
        assert_eq!(web["traces"]["custom_tags"], json!({"a": {"literal": {"value": "1"}}}));
        assert!(web["logs"].get("filter").is_none());
        let elsewhere = resolve(doc(), Some(("default", &labels(&[])))).unwrap().doc;
        let mut base = doc();
        base.as_object_mut().unwrap().remove("scopes");
        assert_eq!(elsewhere, base, "no scope matches: the mesh's settings");
    }

    #[test]
    fn each_scope_is_checked_alone_and_bad_ones_are_refused_with_the_field() {
        let checked = resolve(doc(), None).unwrap();
        assert_eq!(checked.each.len(), 3);
        assert_eq!(checked.each[2].1["traces"]["enabled"], json!(false));
        for (scopes, expected) in [
            (json!([{"traces": {}}]), "scopes[0].namespace: is required"),
            (json!([{"namespace": "a", "export": {}}]), "scopes[0].export: unknown field"),
            (
                json!([{"namespace": "a", "traces": {"span_name": "method"}}]),
                "scopes[0].traces.span_name: unknown field",
            ),
            (json!([{"namespace": "a", "selector": {"app": 1}}]), "scopes[0].selector.app"),
            (json!({"namespace": "a"}), "scopes: invalid type"),
        ] {
            let mut d = doc();
            d["scopes"] = scopes;
            let err = resolve(d, None).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
