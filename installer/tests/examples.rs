//! Everything in examples/ is what it claims: YAML that parses, WasmPlugins Istio accepts with a
//! pluginConfig the filter accepts, collector configs whose pipelines hold together and carry no
//! credentials, and README commands that reproduce the files beside them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

use meshtel::schema::CrdSchemas;
use meshtel::validate::validate_text;
use meshtel::yaml::yaml_documents;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

fn all(ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    files(&repo().join("examples"), ext, &mut out);
    out.sort();
    out
}

/// Check an OpenTelemetry Collector config: an OTLP/HTTP receiver on 4318, traces and metrics
/// pipelines whose components are all defined, and credentials only from the environment.
fn check_collector_config(name: &str, config: &Value) {
    let http = config.pointer("/receivers/otlp/protocols/http/endpoint").and_then(Value::as_str);
    assert!(http.is_some_and(|e| e.ends_with(":4318")), "{name}: no OTLP/HTTP receiver on 4318");
    let defined = |kind: &str, id: &str| config.get(kind).and_then(|k| k.get(id)).is_some();
    for signal in ["traces", "metrics"] {
        let pipeline = config
            .pointer(&format!("/service/pipelines/{signal}"))
            .unwrap_or_else(|| panic!("{name}: no {signal} pipeline"));
        for (role, kinds) in [
            ("receivers", ["receivers", "connectors"]),
            ("processors", ["processors", "processors"]),
            ("exporters", ["exporters", "connectors"]),
        ] {
            for id in pipeline.get(role).and_then(Value::as_array).into_iter().flatten() {
                let id = id.as_str().unwrap();
                assert!(kinds.iter().any(|k| defined(k, id)), "{name}: {signal} pipeline uses undefined {role} {id}");
            }
        }
    }
    fn secrets(v: &Value, path: &str, name: &str) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| secrets(v, &format!("{path}.{k}"), name)),
            Value::String(s) => {
                let key = path.rsplit('.').next().unwrap_or_default().to_ascii_lowercase();
                if ["key", "api_key", "authorization", "token", "password"].contains(&key.as_str()) {
                    assert!(s.contains("${env:"), "{name}: {path} must come from the environment, not inline");
                }
            }
            _ => {}
        }
    }
    secrets(config, "", name);
}

#[test]
fn every_example_yaml_is_valid() {
    let crds = CrdSchemas::load(&repo().join("../shared/istio/crd-all.gen.yaml")).unwrap();
    let yamls = all("yaml");
    assert!(yamls.len() >= 10, "{yamls:?}");
    let (mut plugins, mut collectors) = (0, 0);
    for path in yamls {
        let name = path.strip_prefix(repo()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = yaml_documents(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let report = validate_text(&name, &text, Some(&crds));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        plugins += report.checked;
        for doc in &docs {
            if let Some(problems) = crds.check(doc) {
                assert!(problems.is_empty(), "{name}: {} {problems:?}", doc["kind"]);
            }
            if let Some(config) = doc.pointer("/data/collector.yaml").and_then(Value::as_str) {
                let parsed = yaml_documents(config).unwrap_or_else(|e| panic!("{name}: collector.yaml: {e}"));
                check_collector_config(&name, &parsed[0]);
                collectors += 1;
            }
        }
    }
    assert_eq!(plugins, 7, "one WasmPlugin per deployment mode, and the TCP network filter where metrics are on");
    assert_eq!(collectors, 5, "the base collector and four backends");
}

#[test]
fn readme_render_commands_reproduce_the_files_beside_them() {
    let mut run = 0;
    let mut readmes = all("md");
    readmes.push(repo().join("README.md"));
    for readme in readmes {
        // A command continued over several lines (`\` at the end) is one line.
        let text = std::fs::read_to_string(&readme).unwrap().replace("\\\n", " ");
        for line in text.lines() {
            let Some(command) = line.trim().strip_prefix("meshtel render ") else { continue };
            let (args, target) = match command.split_once(" > ") {
                Some((args, target)) => (args, Some(target.trim())),
                None => (command.split(" | ").next().unwrap(), None),
            };
            // Input files are named from the repository's root.
            let out = Command::new(env!("CARGO_BIN_EXE_meshtel"))
                .current_dir(repo())
                .arg("render")
                .args(args.split_whitespace())
                .output()
                .unwrap();
            assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
            if let Some(target) = target {
                let want = std::fs::read_to_string(repo().join(target)).unwrap_or_else(|e| panic!("{target}: {e}"));
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    want,
                    "{target} is not what `meshtel render {args}` renders"
                );
            }
            run += 1;
        }
    }
    assert!(run >= 7, "only {run} render commands found");
}
