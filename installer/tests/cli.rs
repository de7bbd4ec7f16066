//! The CLI as users meet it: help, refusals with one clear message, validate's findings, package.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn meshtel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshtel")).args(args).output().expect("run meshtel")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A temporary directory removed when the test ends.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("meshtel-cli-").tempdir().unwrap()
}

#[test]
fn help_lists_commands_and_options() {
    let o = meshtel(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for word in ["render", "validate", "package"] {
        assert!(help.contains(word), "{help}");
    }
    let o = meshtel(&["render", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--namespace",
        "--gateway",
        "--workload-label",
        "--mesh-wide",
        "--collector",
        "--sampling",
        "--fail-strategy",
        "--api",
        "--config",
        "Examples:",
    ] {
        assert!(help.contains(flag), "render --help lacks {flag}:\n{help}");
    }
    assert!(meshtel(&["validate", "--help"]).status.success());
    assert!(meshtel(&["package", "--help"]).status.success());
}

#[test]
fn bad_input_exits_nonzero_with_one_message_and_writes_nothing() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let out = dir.join("out.yaml");
    let out_s = out.to_str().unwrap();
    for (args, expect) in [
        (vec!["render"], "choose where meshtel runs"),
        (vec!["render", "--gateway", "--namespace", "shop"], "--gateway cannot be combined"),
        (vec!["render", "--mesh-wide", "--namespace", "shop"], "--mesh-wide cannot be combined"),
        (vec!["render", "--workload-label", "novalue"], "expected KEY=VALUE"),
        (vec!["render", "--workload-label", "bad key=x"], "not a valid label key"),
        (vec!["render", "--namespace", "shop", "--collector", "otel.obs"], "expected HOST:PORT"),
        (vec!["render", "--namespace", "shop", "--collector", "otel.obs:99999"], "not a port number"),
        (vec!["render", "--namespace", "shop", "--sampling", "1.5"], "must be between 0 and 1, got 1.5"),
        (
            vec!["render", "--namespace", "shop", "--wasm-url", "https://x/m.wasm", "--wasm-file", "/nonexistent.wasm"],
            "cannot read /nonexistent.wasm",
        ),
        (
            vec!["render", "--namespace", "shop", "--wasm-file", "/etc/hostname"],
            "--wasm-file pins a module served at --wasm-url",
        ),
        (vec!["render", "--namespace", "shop", "--sha256", "xyz"], "expected 64 lower-case hex"),
        (vec!["render", "--namespace", "Shop"], "not a valid namespace name"),
        (vec!["render", "--gateway-name", "gw", "--namespace", "shop"], "need --gateway"),
    ] {
        let mut full = args.clone();
        full.extend(["-o", out_s]);
        let o = meshtel(&full);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = stderr(&o);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(err.trim().starts_with("error:"), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?} wrote to stdout");
        assert!(!out.exists(), "{args:?} wrote {out_s}");
    }
}

#[test]
fn render_writes_the_output_file() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let out = dir.join("meshtel.yaml");
    let o = meshtel(&["render", "--namespace", "shop", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read_to_string(&out).unwrap().contains("kind: WasmPlugin"));
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn validate_names_file_resource_field_and_reason() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let bad = write(
        dir,
        "bad.yaml",
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: tracing, namespace: shop, labels: {app.kubernetes.io/name: meshtel}}
spec:
  url: ftp://example.com/m.wasm
  sha256: ABCDEF
  selector: {matchLabels: {app: web}}
  targetRefs: [{kind: Gateway, name: gw}]
  failStrategy: FAIL_SOMETIMES
  vmConfig: {env: [{name: KEY, valueFrom: HOST, value: leaked}]}
  pluginConfig: {collector: {cluster: "outbound|4318||otel.obs.svc.cluster.local"}, traces: {sampling_ratio: 2}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: typo, namespace: shop}
spec:
  url: oci://r/x:1
  pluginConfg: {}
"#,
    );
    let o = meshtel(&["validate", &bad]);
    assert!(!o.status.success());
    let err = stderr(&o);
    for expect in [
        "WasmPlugin shop/tracing: spec.url: url must have schema one of [http, https, file, oci]",
        "WasmPlugin shop/tracing: spec.sha256: must be 64 lower-case hex characters",
        "WasmPlugin shop/tracing: spec: only one of targetRefs or selector can be set",
        "WasmPlugin shop/tracing: spec.failStrategy: must be one of FAIL_CLOSE, FAIL_OPEN, FAIL_RELOAD",
        "WasmPlugin shop/tracing: spec.vmConfig.env[0]: value may only be set when valueFrom is INLINE",
        "WasmPlugin shop/tracing: spec.pluginConfig.traces.sampling_ratio: must be between 0 and 1, got 2",
        "WasmPlugin shop/typo: spec: unknown field `pluginConfg`",
    ] {
        assert!(err.contains(&format!("{bad}: {expect}")), "missing {expect:?} in:\n{err}");
    }
    assert!(!err.contains("ConfigMap"), "other kinds are skipped");
}

#[test]
fn validate_knows_meshtels_config_by_its_shape_and_refuses_waypoint_selectors() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let f = write(
        dir,
        "renamed.yaml",
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: telemetry, namespace: shop}
spec:
  url: oci://registry.example.com/platform/otel-filter:1
  selector: {matchLabels: {gateway.networking.k8s.io/gateway-class-name: istio-waypoint}}
  pluginConfig: {collector: {cluster: "outbound|4318||otel.obs.svc.cluster.local"}, metrics: {max_series: 0}}
"#,
    );
    let o = meshtel(&["validate", &f]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("spec.pluginConfig.metrics.max_series"), "meshtel's config, whatever the image: {err}");
    assert!(err.contains("never applies a selector to a waypoint"), "{err}");
}

#[test]
fn waypoint_modes_need_their_namespace() {
    for (args, expect) in [
        (&["render", "--waypoint", "wp"][..], "--waypoint needs exactly one --namespace"),
        (
            &["render", "--service", "s", "--namespace", "a", "--namespace", "b"][..],
            "--service needs exactly one --namespace",
        ),
        (&["render", "--all-waypoints", "--namespace", "a"][..], "root namespace"),
        (&["render", "--waypoint", "wp", "--gateway", "--namespace", "a"][..], "exclude each other"),
    ] {
        let o = meshtel(args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(expect), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn validate_with_crds_checks_the_openapi_schema() {
    let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio/crd-all.gen.yaml");
    let tmp = temp_dir();
    let dir = tmp.path();
    let f = write(
        dir,
        "schema.yaml",
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p, namespace: shop}\nspec:\n  url: oci://r/x:1\n  priority: high\n  match: [{ports: [{number: 0}]}]\n",
    );
    let o = meshtel(&["validate", "--crds", crds.to_str().unwrap(), &f]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("WasmPlugin shop/p: spec.priority: invalid type"), "{err}");
    let good = write(dir, "good.yaml", "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p, namespace: shop}\nspec:\n  url: oci://r/x:1\n");
    let o = meshtel(&["validate", "--crds", crds.to_str().unwrap(), &good]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok: 1 resource(s) valid");
}

#[test]
fn validate_and_render_refuse_a_cel_syntax_error_with_its_position() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let bad = write(
        dir,
        "filter.yaml",
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: meshtel, namespace: shop}
spec:
  url: oci://r/meshtel-filter:1
  pluginConfig:
    collector: {cluster: "outbound|4318||otel.obs.svc.cluster.local"}
    logs: {enabled: true, filter: "response.code >>= 400"}
"#,
    );
    let o = meshtel(&["validate", &bad]);
    assert!(!o.status.success());
    let want = "spec.pluginConfig.logs.filter: not a CEL expression: line 1, column 16: Syntax error";
    assert!(stderr(&o).contains(want), "{}", stderr(&o));
    let good = bad.replace("filter.yaml", "good.yaml");
    std::fs::write(&good, std::fs::read_to_string(&bad).unwrap().replace(">>=", ">=")).unwrap();
    assert!(meshtel(&["validate", &good]).status.success(), "{}", stderr(&meshtel(&["validate", &good])));

    let config =
        write(dir, "config.yaml", "pluginConfig: {logs: {enabled: true, filter: \"request.headers['x' ==\"}}\n");
    let o = meshtel(&["render", "--namespace", "shop", "--config", &config]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pluginConfig: logs.filter: not a CEL expression: line 1"), "{}", stderr(&o));
}
