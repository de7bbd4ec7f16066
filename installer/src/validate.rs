//! `meshtel validate`: WasmPlugin and TrafficExtension YAML checked as Istio would check it.

use std::path::Path;

use serde_json::Value;

use crate::model::{TrafficExtension, WasmModule, WasmPlugin, EXTENSIONS_API};
use crate::rules::{self, Problem};
use crate::schema::CrdSchemas;
use crate::yaml::yaml_documents;

/// What validating one stream found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// WasmPlugin and TrafficExtension resources checked.
    pub checked: usize,
    /// One line per problem: `FILE: KIND NAMESPACE/NAME: PATH: REASON`.
    pub errors: Vec<String>,
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        Problem::new(if path.is_empty() { ".".into() } else { path }, e.into_inner().to_string())
    })
}

/// Whether a module is meshtel's, so that its pluginConfig is checked with meshtel's parser: by
/// meshtel's labels, its image name, or the shape of its pluginConfig (a `collector` section
/// naming a `cluster`, which every meshtel config has), whatever the image is called.
fn is_meshtel(labels: &std::collections::BTreeMap<String, String>, module: &WasmModule) -> bool {
    let shaped = module.plugin_config.as_ref().and_then(|c| c.pointer("/collector/cluster")).is_some();
    labels.get("app.kubernetes.io/name").is_some_and(|n| n == "meshtel") || module.url.contains("meshtel") || shaped
}

fn check_plugin_config(module: &WasmModule, at: &str, problems: &mut Vec<Problem>) {
    let config = module.plugin_config.clone().unwrap_or(Value::Object(Default::default()));
    let bytes = serde_json::to_vec(&config).unwrap_or_default();
    match meshtel_filter::config::parse(&bytes) {
        Ok(_) => {
            for (field, reason) in crate::cel::problems(&config) {
                problems.push(Problem::new(format!("{at}.pluginConfig.{field}"), reason));
            }
        }
        Err(e) => problems.push(Problem::new(format!("{at}.pluginConfig.{}", e.field), e.reason)),
    }
    check_role(module, at, problems);
}

/// The module is the network filter under `pluginName: meshtel-tcp` and the HTTP filter under
/// any other: a mismatch with `type` loads a filter that counts nothing.
fn check_role(module: &WasmModule, at: &str, problems: &mut Vec<Problem>) {
    let network = module.plugin_type.as_deref() == Some("NETWORK");
    let tcp_root = module.plugin_name.as_deref() == Some(crate::render::TCP_PLUGIN_NAME);
    match (network, tcp_root) {
        (true, false) => problems.push(Problem::new(
            format!("{at}.pluginName"),
            format!("a NETWORK meshtel plugin must be pluginName {}: under any other the module is the HTTP filter and counts nothing (meshtel render --tcp)", crate::render::TCP_PLUGIN_NAME),
        )),
        (false, true) => problems.push(Problem::new(
            format!("{at}.type"),
            format!("pluginName {} is meshtel's network filter: type must be NETWORK", crate::render::TCP_PLUGIN_NAME),
        )),
        _ => {}
    }
}

/// Check every WasmPlugin and TrafficExtension in a YAML stream named `file`.
pub fn validate_text(file: &str, text: &str, schemas: Option<&CrdSchemas>) -> Report {
    let mut report = Report::default();
    let docs = match yaml_documents(text) {
        Ok(d) => d,
        Err(e) => {
            report.errors.push(format!("{file}: {e}"));
            return report;
        }
    };
    for doc in docs {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        if kind != "WasmPlugin" && kind != "TrafficExtension" {
            continue;
        }
        report.checked += 1;
        let meta =
            |key: &str| doc.pointer(&format!("/metadata/{key}")).and_then(Value::as_str).unwrap_or("?").to_string();
        let who = format!("{kind} {}/{}", meta("namespace"), meta("name"));
        let mut problems = Vec::new();
        if doc.get("apiVersion").and_then(Value::as_str) != Some(EXTENSIONS_API) {
            problems.push(Problem::new("apiVersion", format!("must be {EXTENSIONS_API}")));
        }
        if kind == "WasmPlugin" {
            match typed::<WasmPlugin>(&doc) {
                Ok(p) => {
                    problems.extend(rules::check_wasm_plugin(&p));
                    if is_meshtel(&p.metadata.labels, &p.spec.module) {
                        check_plugin_config(&p.spec.module, "spec", &mut problems);
                    }
                }
                Err(p) => problems.push(p),
            }
        } else {
            match typed::<TrafficExtension>(&doc) {
                Ok(t) => {
                    problems.extend(rules::check_traffic_extension(&t));
                    if let Some(w) = t.spec.wasm.as_ref().filter(|w| is_meshtel(&t.metadata.labels, w)) {
                        check_plugin_config(w, "spec.wasm", &mut problems);
                    }
                }
                Err(p) => problems.push(p),
            }
        }
        if let Some(schemas) = schemas {
            match schemas.check(&doc) {
                Some(found) => problems.extend(found),
                None => problems.push(Problem::new("kind", "no CRD for this apiVersion and kind in --crds")),
            }
        }
        report.errors.extend(problems.iter().map(|p| format!("{file}: {who}: {p}")));
    }
    report
}

/// Check files; `Err` carries every problem line.
pub fn validate_files(files: &[impl AsRef<Path>], crds: Option<&Path>) -> Result<usize, Vec<String>> {
    let schemas = match crds {
        Some(p) => Some(CrdSchemas::load(p).map_err(|e| vec![e])?),
        None => None,
    };
    let mut checked = 0;
    let mut errors = Vec::new();
    for f in files {
        let f = f.as_ref();
        match std::fs::read_to_string(f) {
            Ok(text) => {
                let r = validate_text(&f.display().to_string(), &text, schemas.as_ref());
                checked += r.checked;
                errors.extend(r.errors);
            }
            Err(e) => errors.push(format!("{}: cannot read: {e}", f.display())),
        }
    }
    if errors.is_empty() {
        Ok(checked)
    } else {
        Err(errors)
    }
}
