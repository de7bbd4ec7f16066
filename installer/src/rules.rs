//! The checks Istio applies to WasmPlugin and TrafficExtension beyond the OpenAPI schema (the CEL
//! rules of its CRDs) and the schema constraints that matter, on the typed model.

use std::fmt;

use crate::model::*;

/// One thing wrong with a resource: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path in the resource, e.g. `spec.sha256`.
    pub path: String,
    /// Why it is refused.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn one_of(problems: &mut Vec<Problem>, path: &str, value: Option<&String>, allowed: &[&str]) {
    if let Some(v) = value {
        if !allowed.contains(&v.as_str()) {
            problems.push(Problem::new(path, format!("must be one of {}, got {v:?}", allowed.join(", "))));
        }
    }
}

/// Whether `s` is a DNS-1123 subdomain (Kubernetes object names).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `s` is a valid Kubernetes label value.
pub fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && (s.is_empty()
            || (s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && s.as_bytes()[0].is_ascii_alphanumeric()
                && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()))
}

/// Whether `s` is a valid Kubernetes label key (`[prefix/]name`).
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

/// Whether `s` is a SHA-256 digest: 64 lower-case hex characters.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Check object metadata.
pub fn check_metadata(m: &Metadata, problems: &mut Vec<Problem>) {
    if !is_dns_subdomain(&m.name) {
        problems.push(Problem::new("metadata.name", format!("must be a lower-case DNS name, got {:?}", m.name)));
    }
    if let Some(ns) = &m.namespace {
        if !is_dns_subdomain(ns) || ns.contains('.') || ns.len() > 63 {
            problems.push(Problem::new("metadata.namespace", format!("must be a DNS label, got {ns:?}")));
        }
    }
}

fn check_selector(sel: &Selector, path: &str, problems: &mut Vec<Problem>) {
    for (k, v) in &sel.match_labels {
        let at = format!("{path}.matchLabels.{k}");
        if k.is_empty() {
            problems.push(Problem::new(&at, "key must not be empty"));
        } else if k.contains('*') {
            problems.push(Problem::new(&at, "wildcard not allowed in label key match"));
        } else if !is_label_key(k) {
            problems.push(Problem::new(&at, "not a valid label key"));
        }
        if v.contains('*') {
            problems.push(Problem::new(&at, "wildcard not allowed in label value match"));
        } else if !is_label_value(v) {
            problems.push(Problem::new(
                &at,
                format!("not a valid label value (at most 63 characters of [A-Za-z0-9-_.]), got {v:?}"),
            ));
        }
    }
}

fn check_target_ref(t: &TargetRef, path: &str, problems: &mut Vec<Problem>) {
    if t.kind.is_empty() {
        problems.push(Problem::new(format!("{path}.kind"), "is required"));
    } else if !t.kind.as_bytes()[0].is_ascii_alphabetic()
        || !t.kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        problems.push(Problem::new(format!("{path}.kind"), format!("not a valid kind: {:?}", t.kind)));
    }
    if t.name.is_empty() || t.name.len() > 253 {
        problems.push(Problem::new(format!("{path}.name"), "is required (at most 253 characters)"));
    }
    if let Some(g) = &t.group {
        if !g.is_empty() && !is_dns_subdomain(g) {
            problems.push(Problem::new(format!("{path}.group"), format!("not a valid API group: {g:?}")));
        }
    }
    if t.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
        problems
            .push(Problem::new(format!("{path}.namespace"), "cross namespace referencing is not currently supported"));
    }
}

/// Check the attachment fields shared by both kinds.
pub fn check_attachment(
    selector: Option<&Selector>,
    target_ref: Option<&TargetRef>,
    target_refs: Option<&Vec<TargetRef>>,
    problems: &mut Vec<Problem>,
) {
    let set = usize::from(selector.is_some()) + usize::from(target_ref.is_some()) + usize::from(target_refs.is_some());
    if set > 1 {
        problems.push(Problem::new("spec", "only one of targetRefs or selector can be set"));
    }
    if let Some(s) = selector {
        check_selector(s, "spec.selector", problems);
        check_selector_reaches(s, problems);
    }
    if let Some(t) = target_ref {
        check_target_ref(t, "spec.targetRef", problems);
    }
    if let Some(refs) = target_refs {
        if refs.len() > 16 {
            problems.push(Problem::new("spec.targetRefs", format!("at most 16 entries, got {}", refs.len())));
        }
        for (i, t) in refs.iter().enumerate() {
            check_target_ref(t, &format!("spec.targetRefs[{i}]"), problems);
            check_gateway_class(t, &format!("spec.targetRefs[{i}]"), problems);
        }
    }
}

/// The label Istio puts on every waypoint pod (istio/istio
/// `manifests/charts/istio-control/istio-discovery/files/waypoint.yaml`).
const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";

/// A selector aimed at waypoint pods attaches to nothing: Istio applies WasmPlugins to a
/// waypoint only through `targetRefs` (istio/istio `pilot/pkg/model/policyattachment.go`).
fn check_selector_reaches(sel: &Selector, problems: &mut Vec<Problem>) {
    if sel.match_labels.get(GATEWAY_CLASS_LABEL).is_some_and(|v| v == crate::render::WAYPOINT_GATEWAY_CLASS) {
        problems.push(Problem::new(
            format!("spec.selector.matchLabels.{GATEWAY_CLASS_LABEL}"),
            "Istio never applies a selector to a waypoint; attach it with targetRefs: kind Gateway (meshtel render --waypoint NAME --namespace NS), kind Service (--service) or GatewayClass istio-waypoint (--all-waypoints)",
        ));
    }
}

/// The only GatewayClass Istio attaches WasmPlugins to is its waypoints'.
fn check_gateway_class(t: &TargetRef, path: &str, problems: &mut Vec<Problem>) {
    if t.kind == "GatewayClass" && t.name != crate::render::WAYPOINT_GATEWAY_CLASS {
        problems.push(Problem::new(
            format!("{path}.name"),
            format!("Istio attaches to GatewayClass {} only, got {:?}", crate::render::WAYPOINT_GATEWAY_CLASS, t.name),
        ));
    }
}

/// Check traffic selectors.
pub fn check_match(traffic: Option<&Vec<TrafficSelector>>, problems: &mut Vec<Problem>) {
    for (i, m) in traffic.into_iter().flatten().enumerate() {
        one_of(problems, &format!("spec.match[{i}].mode"), m.mode.as_ref(), MATCH_MODES);
        for (j, p) in m.ports.iter().enumerate() {
            if !(1..=65535).contains(&p.number) {
                problems.push(Problem::new(
                    format!("spec.match[{i}].ports[{j}].number"),
                    format!("must be between 1 and 65535, got {}", p.number),
                ));
            }
        }
    }
}

/// Check `priority` fits an int32.
pub fn check_priority(priority: Option<i64>, problems: &mut Vec<Problem>) {
    if let Some(p) = priority {
        if i32::try_from(p).is_err() {
            problems.push(Problem::new("spec.priority", format!("must fit a 32-bit integer, got {p}")));
        }
    }
}

/// Check the Wasm module fields; `at` is their path prefix (`spec` or `spec.wasm`).
pub fn check_module(m: &WasmModule, at: &str, problems: &mut Vec<Problem>) {
    if m.url.is_empty() {
        problems.push(Problem::new(format!("{at}.url"), "is required"));
    } else if let Some((scheme, _)) = m.url.split_once("://") {
        if !["http", "https", "oci", "file"].contains(&scheme) {
            problems.push(Problem::new(
                format!("{at}.url"),
                format!("url must have schema one of [http, https, file, oci], got {scheme:?}"),
            ));
        }
    }
    if let Some(sha) = m.sha256.as_deref().filter(|s| !s.is_empty() && !is_sha256(s)) {
        problems
            .push(Problem::new(format!("{at}.sha256"), format!("must be 64 lower-case hex characters, got {sha:?}")));
    }
    one_of(problems, &format!("{at}.failStrategy"), m.fail_strategy.as_ref(), FAIL_STRATEGIES);
    one_of(problems, &format!("{at}.imagePullPolicy"), m.image_pull_policy.as_ref(), PULL_POLICIES);
    one_of(problems, &format!("{at}.type"), m.plugin_type.as_ref(), PLUGIN_TYPES);
    if let Some(s) = &m.image_pull_secret {
        if s.is_empty() || s.len() > 253 {
            problems.push(Problem::new(format!("{at}.imagePullSecret"), "must be 1 to 253 characters"));
        }
    }
    if let Some(n) = &m.plugin_name {
        if n.is_empty() || n.len() > 256 {
            problems.push(Problem::new(format!("{at}.pluginName"), "must be 1 to 256 characters"));
        }
    }
    if let Some(vm) = &m.vm_config {
        if vm.env.len() > 256 {
            problems.push(Problem::new(format!("{at}.vmConfig.env"), "at most 256 entries"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, e) in vm.env.iter().enumerate() {
            let p = format!("{at}.vmConfig.env[{i}]");
            if e.name.is_empty() || e.name.len() > 256 {
                problems.push(Problem::new(format!("{p}.name"), "is required (at most 256 characters)"));
            } else if !seen.insert(e.name.as_str()) {
                problems.push(Problem::new(format!("{p}.name"), format!("duplicate variable {:?}", e.name)));
            }
            one_of(problems, &format!("{p}.valueFrom"), e.value_from.as_ref(), ENV_SOURCES);
            if e.value_from.as_deref() == Some("HOST") && e.value.is_some() {
                problems.push(Problem::new(&p, "value may only be set when valueFrom is INLINE"));
            }
            if e.value.as_ref().is_some_and(|v| v.len() > 2048) {
                problems.push(Problem::new(format!("{p}.value"), "at most 2048 characters"));
            }
        }
    }
}

/// Every check of a WasmPlugin (meshtel's pluginConfig excepted).
pub fn check_wasm_plugin(p: &WasmPlugin) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_metadata(&p.metadata, &mut problems);
    let s = &p.spec;
    check_attachment(s.selector.as_ref(), s.target_ref.as_ref(), s.target_refs.as_ref(), &mut problems);
    one_of(&mut problems, "spec.phase", s.phase.as_ref(), WASMPLUGIN_PHASES);
    check_priority(s.priority, &mut problems);
    check_match(s.traffic.as_ref(), &mut problems);
    check_module(&s.module, "spec", &mut problems);
    problems
}

/// Every check of a TrafficExtension (meshtel's pluginConfig excepted).
pub fn check_traffic_extension(t: &TrafficExtension) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_metadata(&t.metadata, &mut problems);
    let s = &t.spec;
    check_attachment(s.selector.as_ref(), None, s.target_refs.as_ref(), &mut problems);
    one_of(&mut problems, "spec.phase", s.phase.as_ref(), TRAFFICEXTENSION_PHASES);
    check_priority(s.priority, &mut problems);
    check_match(s.traffic.as_ref(), &mut problems);
    match (&s.wasm, &s.lua) {
        (Some(_), Some(_)) => problems.push(Problem::new("spec", "only one of wasm or lua can be set")),
        (Some(w), None) => check_module(w, "spec.wasm", &mut problems),
        _ => {}
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> WasmPlugin {
        Resource {
            api_version: EXTENSIONS_API.into(),
            kind: "WasmPlugin".into(),
            metadata: Metadata { name: "meshtel".into(), namespace: Some("shop".into()), ..Default::default() },
            spec: WasmPluginSpec {
                module: WasmModule { url: "oci://ghcr.io/meshtel/filter:1".into(), ..Default::default() },
                ..Default::default()
            },
        }
    }

    fn messages(p: &WasmPlugin) -> Vec<String> {
        check_wasm_plugin(p).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_plain_plugin_passes() {
        assert!(messages(&plugin()).is_empty());
    }

    #[test]
    fn refuses_selector_with_target_refs() {
        let mut p = plugin();
        p.spec.selector = Some(Selector::default());
        p.spec.target_refs = Some(vec![TargetRef { kind: "Gateway".into(), name: "gw".into(), ..Default::default() }]);
        assert_eq!(messages(&p), vec!["spec: only one of targetRefs or selector can be set"]);
    }

    #[test]
    fn refuses_bad_url_scheme_and_sha256() {
        let mut p = plugin();
        p.spec.module.url = "ftp://x/y.wasm".into();
        p.spec.module.sha256 = Some("ABC".into());
        let m = messages(&p);
        assert!(m[0].starts_with("spec.url: url must have schema one of [http, https, file, oci]"), "{m:?}");
        assert!(m[1].starts_with("spec.sha256: must be 64 lower-case hex characters"), "{m:?}");
        p.spec.module.url = "ghcr.io/meshtel/filter:1".into();
        p.spec.module.sha256 = Some("a".repeat(64));
        assert!(messages(&p).is_empty(), "no scheme means oci");
    }

    #[test]
    fn refuses_inline_value_with_host_env() {
        let mut p = plugin();
        p.spec.module.vm_config = Some(VmConfig {
            env: vec![EnvVar { name: "API_KEY".into(), value_from: Some("HOST".into()), value: Some("secret".into()) }],
        });
        assert_eq!(messages(&p), vec!["spec.vmConfig.env[0]: value may only be set when valueFrom is INLINE"]);
    }

    #[test]
    fn refuses_wildcards_enums_and_cross_namespace_refs() {
        let mut p = plugin();
        p.spec.selector = Some(Selector { match_labels: [("app".to_string(), "web*".to_string())].into() });
        p.spec.module.fail_strategy = Some("FAIL_SOFTLY".into());
        let m = messages(&p);
        assert!(
            m.contains(&"spec.selector.matchLabels.app: wildcard not allowed in label value match".to_string()),
            "{m:?}"
        );
        assert!(
            m.iter().any(|s| s.starts_with("spec.failStrategy: must be one of FAIL_CLOSE, FAIL_OPEN, FAIL_RELOAD")),
            "{m:?}"
        );
        let mut p = plugin();
        p.spec.target_refs = Some(vec![TargetRef {
            kind: "Gateway".into(),
            name: "gw".into(),
            namespace: Some("other".into()),
            ..Default::default()
        }]);
        assert_eq!(
            messages(&p),
            vec!["spec.targetRefs[0].namespace: cross namespace referencing is not currently supported"]
        );
    }

    #[test]
    fn refuses_selectors_aimed_at_waypoints_and_other_gateway_classes() {
        let mut p = plugin();
        p.spec.selector = Some(Selector {
            match_labels: [("gateway.networking.k8s.io/gateway-class-name".into(), "istio-waypoint".into())].into(),
        });
        let m = messages(&p);
        assert!(m.iter().any(|m| m.contains("never applies a selector to a waypoint")), "{m:?}");
        let mut p = plugin();
        p.spec.target_refs = Some(vec![TargetRef {
            group: Some("gateway.networking.k8s.io".into()),
            kind: "GatewayClass".into(),
            name: "istio".into(),
            namespace: None,
        }]);
        let m = messages(&p);
        assert!(m.iter().any(|m| m.contains("GatewayClass istio-waypoint only")), "{m:?}");
    }

    #[test]
    fn label_syntax() {
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(is_label_key("meshtel"));
        assert!(!is_label_key("bad key"));
        assert!(!is_label_key("/x"));
        assert!(is_label_value(""));
        assert!(!is_label_value("-x"));
        assert!(!is_label_value(&"a".repeat(64)));
    }
}
