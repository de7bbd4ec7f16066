//! `meshtel render --from-istio-telemetry`: a mesh's Istio Telemetry resources carried over to
//! meshtel's pluginConfig, scope by scope, merged as istiod merges them, with every field that
//! cannot be carried named and explained.
//!
//! Istio's rules, from istio/istio `pilot/pkg/model/telemetry.go` (and the proto's comments):
//! - the root namespace's resource without `selector` or `targetRefs` applies mesh-wide, a
//!   namespace's to that namespace, one with a `selector` to the matching workloads of its
//!   namespace; of several namespace-wide ones in one namespace only the oldest counts
//!   (`namespaceWideTelemetryConfig`, resources sorted by creation time, then name);
//! - a proxy gets the root's, its namespace's, then each matching selector's in creation order
//!   (`applicableTelemetries`); metric overrides accumulate, tracing and logging fields replace.
//!
//! The mesh-wide settings become the pluginConfig's own; the others become its `scopes`, which
//! each proxy applies to itself (see `meshtel_filter::config::scopes`): one meshtel runs per proxy.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::rules::Problem;
use crate::schema::CrdSchemas;

/// The Telemetry API group.
pub const TELEMETRY_GROUP: &str = "telemetry.istio.io";
/// The label Istio's gateway deployment controller puts on a Gateway API gateway's pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// One Telemetry resource as read.
#[derive(Debug, Clone)]
struct Telemetry {
    name: String,
    namespace: String,
    created: String,
    spec: Value,
    doc: Value,
}

impl Telemetry {
    fn id(&self) -> String {
        format!("Telemetry {}/{}", self.namespace, self.name)
    }
}

/// What a set of Telemetry resources comes to.
#[derive(Debug, Default)]
pub struct CarriedOver {
    /// Settings of every proxy: pluginConfig sections (`traces`, `metrics`, `logs`).
    pub mesh: Map<String, Value>,
    /// The narrower settings, in the order proxies apply them (`scopes`).
    pub scopes: Vec<Value>,
    /// Every field not carried over, and why.
    pub notes: Vec<String>,
    /// The Telemetry resources read (for `--disable-istio-telemetry`), in their scope order.
    resources: Vec<Value>,
    /// Whether one applied mesh-wide.
    has_mesh_wide: bool,
}

/// Read Telemetry resources from YAML (documents, or `kubectl get -o yaml`'s `List`); other
/// kinds are skipped with a note. Each is checked as Istio's API server and istiod would check
/// it, against `crds` when given.
pub fn read(text: &str, root_namespace: &str, crds: Option<&CrdSchemas>) -> Result<CarriedOver, String> {
    let mut notes = Vec::new();
    let mut telemetries = Vec::new();
    for (i, doc) in crate::yaml::yaml_documents(text)?.into_iter().enumerate() {
        let items = match doc.get("kind").and_then(Value::as_str) {
            Some("List") => doc.get("items").and_then(Value::as_array).cloned().unwrap_or_default(),
            _ => vec![doc],
        };
        for item in items {
            let api = item.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
            let kind = item.get("kind").and_then(Value::as_str).unwrap_or_default();
            if kind != "Telemetry" || !api.starts_with(&format!("{TELEMETRY_GROUP}/")) {
                notes.push(format!("document {}: {api} {kind} is not a Telemetry resource: skipped", i + 1));
                continue;
            }
            telemetries.push(check(&item, crds)?);
        }
    }
    carry_over(telemetries, root_namespace, notes)
}

/// Check one resource: the CRD's schema, then istiod's validation (`ValidateTelemetry` in
/// istio/istio `pkg/config/validation/validation.go`).
fn check(doc: &Value, crds: Option<&CrdSchemas>) -> Result<Telemetry, String> {
    let meta = |k: &str| doc.pointer(&format!("/metadata/{k}")).and_then(Value::as_str).unwrap_or_default();
    let name = meta("name").to_string();
    let namespace = if meta("namespace").is_empty() { "default" } else { meta("namespace") }.to_string();
    let id = format!("Telemetry {namespace}/{name}");
    let refuse = |problems: Vec<Problem>| {
        let lines: Vec<String> = problems.iter().map(|p| format!("{id}: {}: {}", p.path, p.message)).collect();
        Err(lines.join("\n"))
    };
    if name.is_empty() {
        return Err(format!("{id}: metadata.name: is required"));
    }
    if let Some(problems) = crds.and_then(|c| c.check(doc)).filter(|p| !p.is_empty()) {
        return refuse(problems);
    }
    let spec = doc.get("spec").cloned().unwrap_or_else(|| json!({}));
    let problems = istiod_problems(&spec);
    if !problems.is_empty() {
        return refuse(problems);
    }
    Ok(Telemetry { name, namespace, created: meta("creationTimestamp").to_string(), spec, doc: doc.clone() })
}

/// What istiod's validation refuses (warnings aside).
fn istiod_problems(spec: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    let set = ["selector", "targetRef", "targetRefs"].iter().filter(|k| spec.get(**k).is_some()).count();
    if set > 1 {
        out.push(Problem::new("spec", "only one of selector, targetRef and targetRefs may be set"));
    }
    for (i, m) in array(spec, "metrics").iter().enumerate() {
        for (j, o) in array(m, "overrides").iter().enumerate() {
            let tags = o.get("tagOverrides").and_then(Value::as_object).into_iter().flatten();
            for (name, t) in tags {
                let at = format!("spec.metrics[{i}].overrides[{j}].tagOverrides.{name}");
                let remove = t.get("operation").and_then(Value::as_str) == Some("REMOVE");
                match (remove, t.get("value").and_then(Value::as_str).filter(|v| !v.is_empty())) {
                    (false, None) => out.push(Problem::new(at, "UPSERT needs a value")),
                    (true, Some(_)) => out.push(Problem::new(at, "REMOVE takes no value")),
                    _ => {}
                }
            }
        }
    }
    for (i, t) in array(spec, "tracing").iter().enumerate() {
        if let Some(p) = t.get("randomSamplingPercentage").and_then(Value::as_f64) {
            if !(0.0..=100.0).contains(&p) {
                out.push(Problem::new(format!("spec.tracing[{i}].randomSamplingPercentage"), "must be in [0, 100]"));
            }
        }
    }
    for (i, l) in array(spec, "accessLogging").iter().enumerate() {
        if let Some(e) = l.pointer("/filter/expression").and_then(Value::as_str) {
            // istiod refuses a filter it cannot parse (`validation_istiod.go`).
            if let Err(why) = crate::cel::check(e) {
                out.push(Problem::new(format!("spec.accessLogging[{i}].filter.expression"), why));
            }
        }
    }
    out
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// Where a resource applies, as meshtel carries it.
enum Scope {
    MeshWide,
    Namespace,
    Selector(BTreeMap<String, String>),
}

fn scope_of(t: &Telemetry, root_namespace: &str, notes: &mut Vec<String>) -> Option<Scope> {
    let selector: Option<BTreeMap<String, String>> = t
        .spec
        .pointer("/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect());
    let refs: Vec<&Value> = t.spec.get("targetRef").into_iter().chain(array(&t.spec, "targetRefs")).collect();
    if !refs.is_empty() {
        let mut labels = BTreeMap::new();
        for r in &refs {
            let kind = r.get("kind").and_then(Value::as_str).unwrap_or_default();
            let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
            if kind != "Gateway" || !labels.is_empty() {
                notes.push(format!(
                    "{}: targetRefs {kind} {name}: not carried over: meshtel carries a Gateway target, by the `{GATEWAY_NAME_LABEL}` label of its pods; a waypoint's Service, ServiceEntry or GatewayClass is not known to the proxy from its own identity",
                    t.id()
                ));
                return None;
            }
            labels.insert(GATEWAY_NAME_LABEL.to_string(), name.to_string());
        }
        return Some(Scope::Selector(labels));
    }
    match selector.filter(|s| !s.is_empty()) {
        Some(s) => Some(Scope::Selector(s)),
        None if t.namespace == root_namespace => Some(Scope::MeshWide),
        None => Some(Scope::Namespace),
    }
}

/// The resources merged as istiod merges them, into meshtel's settings and scopes.
fn carry_over(mut all: Vec<Telemetry>, root_namespace: &str, mut notes: Vec<String>) -> Result<CarriedOver, String> {
    // istiod's order: creation time, then name, then namespace (`sortConfigByCreationTime`).
    all.sort_by(|a, b| (&a.created, &a.name, &a.namespace).cmp(&(&b.created, &b.name, &b.namespace)));
    let mut out = CarriedOver { notes: Vec::new(), ..Default::default() };
    let mut wide_seen: BTreeMap<String, String> = BTreeMap::new();
    let mut namespace_wide = Vec::new();
    let mut selected = Vec::new();
    for t in &all {
        let Some(scope) = scope_of(t, root_namespace, &mut notes) else { continue };
        if matches!(scope, Scope::MeshWide | Scope::Namespace) {
            if let Some(first) = wide_seen.get(&t.namespace) {
                notes.push(format!(
                    "{}: ignored, as istiod ignores it: {first} is the older namespace-wide Telemetry of {}",
                    t.id(),
                    t.namespace
                ));
                continue;
            }
            wide_seen.insert(t.namespace.clone(), t.id());
        }
        let settings = settings(t, &mut notes);
        match scope {
            Scope::MeshWide => {
                out.mesh = settings;
                out.has_mesh_wide = true;
                out.resources.insert(0, t.doc.clone());
            }
            Scope::Namespace => {
                namespace_wide.push(scope_value(&t.namespace, None, settings));
                out.resources.push(t.doc.clone());
            }
            Scope::Selector(labels) => {
                selected.push(scope_value(&t.namespace, Some(labels), settings));
                out.resources.push(t.doc.clone());
            }
        }
    }
    // A proxy applies its namespace's settings before any selector's.
    out.scopes = namespace_wide.into_iter().chain(selected).collect();
    if out.scopes.len() > meshtel_filter::config::scopes::MAX_SCOPES {
        return Err(format!(
            "{} narrower Telemetry scopes: meshtel carries at most {}",
            out.scopes.len(),
            meshtel_filter::config::scopes::MAX_SCOPES
        ));
    }
    out.notes = notes;
    Ok(out)
}

fn scope_value(namespace: &str, selector: Option<BTreeMap<String, String>>, settings: Map<String, Value>) -> Value {
    let mut scope = Map::new();
    scope.insert("namespace".into(), json!(namespace));
    if let Some(s) = selector {
        scope.insert("selector".into(), json!(s));
    }
    scope.extend(settings);
    Value::Object(scope)
}

/// One resource's settings, in pluginConfig sections; what does not carry over goes to `notes`.
fn settings(t: &Telemetry, notes: &mut Vec<String>) -> Map<String, Value> {
    let id = t.id();
    // `why` says whether the field is carried: "not carried over: ..." or "carried over, but ...".
    let mut note = |field: String, why: &str| notes.push(format!("{id}: {field}: {why}"));
    let mut traces = Map::new();
    let mut overrides = Vec::new();
    let mut logs = Map::new();
    for (i, m) in array(&t.spec, "metrics").iter().enumerate() {
        let at = format!("spec.metrics[{i}]");
        if m.get("providers").is_some() {
            note(format!("{at}.providers"), PROVIDERS);
        }
        if m.get("reportingInterval").is_some() {
            note(
                format!("{at}.reportingInterval"),
                "not carried over: meshtel reports open TCP connections at each export.flush_interval_ms",
            );
        }
        for (j, o) in array(m, "overrides").iter().enumerate() {
            if let Some(o) = metric_override(o, &format!("{at}.overrides[{j}]"), &mut note) {
                overrides.push(o);
            }
        }
    }
    for (i, tr) in array(&t.spec, "tracing").iter().enumerate() {
        let at = format!("spec.tracing[{i}]");
        providers_and_mode(tr, &at, "traces", &mut note);
        if let Some(p) = tr.get("randomSamplingPercentage").and_then(Value::as_f64) {
            traces.insert("sampling_ratio".into(), json!(p / 100.0));
        }
        if let Some(d) = tr.get("disableSpanReporting").and_then(Value::as_bool) {
            traces.insert("enabled".into(), json!(!d));
        }
        if let Some(tags) = tr.get("customTags").and_then(Value::as_object) {
            traces
                .insert("custom_tags".into(), Value::Object(custom_tags(tags, &format!("{at}.customTags"), &mut note)));
        }
        for field in ["useRequestIdForTraceSampling", "enableIstioTags", "disableContextPropagation"] {
            if tr.get(field).is_some() {
                note(format!("{at}.{field}"), "not carried over: meshtel has no such setting");
            }
        }
    }
    for (i, l) in array(&t.spec, "accessLogging").iter().enumerate() {
        let at = format!("spec.accessLogging[{i}]");
        providers_and_mode(l, &at, "logs", &mut note);
        let disabled = l.get("disabled").and_then(Value::as_bool).unwrap_or(false);
        logs.insert("enabled".into(), json!(!disabled));
        if let Some(e) = l.pointer("/filter/expression").and_then(Value::as_str) {
            logs.insert("filter".into(), json!(e));
        }
    }
    let mut out = Map::new();
    if !traces.is_empty() {
        out.insert("traces".into(), Value::Object(traces));
    }
    if !overrides.is_empty() {
        out.insert("metrics".into(), json!({"overrides": overrides}));
    }
    if !logs.is_empty() {
        out.insert("logs".into(), Value::Object(logs));
    }
    out
}

/// Note a tracing or logging entry's `providers` and a `match.mode` of one side: meshtel `does`
/// the same on both sides.
fn providers_and_mode(entry: &Value, at: &str, does: &str, note: &mut impl FnMut(String, &str)) {
    if entry.get("providers").is_some() {
        note(format!("{at}.providers"), PROVIDERS);
    }
    if let Some(mode) = entry.pointer("/match/mode").and_then(Value::as_str).filter(|m| *m != "CLIENT_AND_SERVER") {
        let why = format!(
            "not carried over: meshtel {does} both sides alike; these settings apply to both, not to {mode} alone"
        );
        note(format!("{at}.match.mode"), &why);
    }
}

const PROVIDERS: &str =
    "not carried over: meshtel exports to its own collector (--collector), whichever providers Istio names";

/// One `overrides[]` entry as `metrics.overrides` takes it; `None` when nothing carries over.
fn metric_override(o: &Value, at: &str, note: &mut impl FnMut(String, &str)) -> Option<Value> {
    if o.pointer("/match/customMetric").is_some() {
        note(format!("{at}.match.customMetric"), "not carried over: meshtel exports Istio's standard metrics only");
        return None;
    }
    let mut m = Map::new();
    if let Some(metric) = o.pointer("/match/metric") {
        m.insert("metric".into(), metric.clone());
    }
    if let Some(mode) = o.pointer("/match/mode") {
        m.insert("mode".into(), mode.clone());
    }
    let mut out = Map::new();
    if !m.is_empty() {
        out.insert("match".into(), Value::Object(m));
    }
    if let Some(d) = o.get("disabled") {
        out.insert("disabled".into(), d.clone());
    }
    let mut tags = Map::new();
    for (name, t) in o.get("tagOverrides").and_then(Value::as_object).into_iter().flatten() {
        match t.get("value").and_then(Value::as_str) {
            Some(value) if t.get("operation").and_then(Value::as_str) != Some("REMOVE") => {
                if let Err(why) = crate::cel::check(value) {
                    // Istio's stats filter drops a standard label whose expression does not parse
                    // and skips a new one (istio_stats.cc, the `dimensions` loop).
                    let standard = meshtel_filter::istio::labels::LABEL_NAMES.contains(&name.as_str());
                    note(
                        format!("{at}.tagOverrides.{name}"),
                        &format!(
                            "not carried over: {why}; Istio {} the label, and so does meshtel",
                            if standard { "drops" } else { "skips" }
                        ),
                    );
                    if standard {
                        tags.insert(name.clone(), json!({"operation": "REMOVE"}));
                    }
                    continue;
                }
                if uses_istio_peer_binding(value) {
                    note(
                        format!("{at}.tagOverrides.{name}"),
                        "carried over, but `upstream_peer` and `downstream_peer` are no attribute of Envoy's CEL (its top-level names are request, response, connection, upstream, source, destination, metadata, filter_state, upstream_filter_state and xds): the label is `unknown`; Istio's peer is at `filter_state.upstream_peer` and `filter_state.downstream_peer`",
                    );
                }
                tags.insert(name.clone(), json!({"operation": "UPSERT", "value": value}));
            }
            _ => {
                tags.insert(name.clone(), json!({"operation": "REMOVE"}));
            }
        }
    }
    if !tags.is_empty() {
        out.insert("tag_overrides".into(), Value::Object(tags));
    }
    Some(Value::Object(out))
}

/// Whether `expression` reads `upstream_peer` / `downstream_peer` as top-level names, as some of
/// Istio's examples do, rather than through `filter_state`.
fn uses_istio_peer_binding(expression: &str) -> bool {
    ["upstream_peer", "downstream_peer"].iter().any(|b| {
        expression.match_indices(b).any(|(at, _)| {
            let before = &expression[..at];
            !before.ends_with('.')
                && !before.ends_with('\'')
                && !before.ends_with('"')
                && !before.chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    })
}

fn custom_tags(tags: &Map<String, Value>, at: &str, note: &mut impl FnMut(String, &str)) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, tag) in tags {
        let default = |v: &Value| v.get("defaultValue").cloned();
        let carried = if let Some(l) = tag.get("literal") {
            Some(json!({"literal": {"value": l.get("value").cloned().unwrap_or(json!(""))}}))
        } else if let Some(e) = tag.get("environment") {
            let mut env = json!({"name": e.get("name").cloned().unwrap_or(json!(""))});
            if let Some(d) = default(e) {
                env["default_value"] = d;
            }
            Some(json!({"environment": env}))
        } else if let Some(h) = tag.get("header") {
            let name = h.get("name").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
            let mut header = json!({"name": name});
            if let Some(d) = default(h) {
                header["default_value"] = d;
            }
            Some(json!({"header": header}))
        } else {
            None
        };
        match carried {
            Some(c) => {
                out.insert(name.clone(), c);
            }
            None => note(format!("{at}.{name}"), "not carried over: only literal, environment and header tags are"),
        }
    }
    out
}

impl CarriedOver {
    /// Put the settings into `plugin_config`: the mesh-wide ones over its own, the narrower
    /// ones as its `scopes`.
    pub fn apply_to(&self, plugin_config: &mut Value) {
        for (section, settings) in &self.mesh {
            let Some(settings) = settings.as_object() else { continue };
            if !plugin_config.get(section).is_some_and(Value::is_object) {
                plugin_config[section] = json!({});
            }
            for (k, v) in settings {
                plugin_config[section][k] = v.clone();
            }
        }
        if !self.scopes.is_empty() {
            plugin_config["scopes"] = Value::Array(self.scopes.clone());
        }
    }

    /// Istio's own metrics and span reporting turned off where each resource applied, so that
    /// nothing is counted twice: each resource again, under its name (applying it replaces it),
    /// its metrics and tracing replaced; and, when none applied mesh-wide, one in the root
    /// namespace (Istio's defaults count and trace without any Telemetry).
    pub fn disabling_istio(&self, root_namespace: &str, labels: &BTreeMap<String, String>) -> Vec<Value> {
        let off = |spec: &mut Value| {
            spec["metrics"] = json!([{"overrides": [{"match": {"metric": "ALL_METRICS", "mode": "CLIENT_AND_SERVER"}, "disabled": true}]}]);
            spec["tracing"] = json!([{"disableSpanReporting": true}]);
        };
        let mut out = Vec::new();
        if !self.has_mesh_wide {
            let mut spec = json!({});
            off(&mut spec);
            out.push(json!({
                "apiVersion": "telemetry.istio.io/v1",
                "kind": "Telemetry",
                "metadata": {"name": "meshtel-disable-istio-telemetry", "namespace": root_namespace, "labels": labels},
                "spec": spec,
            }));
        }
        for doc in &self.resources {
            let mut d = doc.clone();
            if let Some(meta) = d.get_mut("metadata").and_then(Value::as_object_mut) {
                // What the API server set: `kubectl apply` refuses or ignores it.
                for k in ["uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"] {
                    meta.remove(k);
                }
                if let Some(Value::Object(a)) = meta.get_mut("annotations") {
                    a.remove("kubectl.kubernetes.io/last-applied-configuration");
                }
            }
            if let Some(m) = d.as_object_mut() {
                m.remove("status");
            }
            if !d.get("spec").is_some_and(Value::is_object) {
                d["spec"] = json!({});
            }
            off(&mut d["spec"]);
            out.push(d);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carried(yaml: &str) -> CarriedOver {
        read(yaml, "istio-system", None).unwrap()
    }

    #[test]
    fn scopes_follow_istiods_merge() {
        let c = carried(
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  tracing: [{randomSamplingPercentage: 10}]
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: b-workload, namespace: shop, creationTimestamp: "2026-03-01T00:00:00Z"}
spec:
  selector: {matchLabels: {app: cart}}
  tracing: [{disableSpanReporting: true}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: a-workload, namespace: shop, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  selector: {matchLabels: {app: cart}}
  accessLogging: [{filter: {expression: "response.code >= 400"}}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shop-newer, namespace: shop, creationTimestamp: "2026-05-01T00:00:00Z"}
spec:
  tracing: [{randomSamplingPercentage: 100}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shop-wide, namespace: shop, creationTimestamp: "2026-04-01T00:00:00Z"}
spec:
  tracing: [{randomSamplingPercentage: 50}]
"#,
        );
        assert_eq!(c.mesh["traces"], json!({"sampling_ratio": 0.1}));
        let order: Vec<Value> =
            c.scopes.iter().map(|s| json!([s["namespace"], s.get("selector"), s.get("traces")])).collect();
        assert_eq!(
            order,
            [
                json!(["shop", null, {"sampling_ratio": 0.5}]),
                json!(["shop", {"app": "cart"}, null]),
                json!(["shop", {"app": "cart"}, {"enabled": false}]),
            ],
            "the namespace's first, then selectors by creation time"
        );
        assert!(c.notes.iter().any(|n| n.contains("Telemetry shop/shop-newer: ignored")), "{:?}", c.notes);
    }
}
