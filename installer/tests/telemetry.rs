//! `meshtel render --from-istio-telemetry` on the Telemetry examples of Istio's documentation
//! and on a realistic multi-scope set: what each carries over, what it says it cannot, and
//! that everything rendered is valid under Istio's CRDs and meshtel's own parser.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

use meshtel::cli::RenderArgs;
use meshtel::options::render_options;
use meshtel::render::{resources, RenderOptions};
use meshtel::schema::CrdSchemas;
use serde_json::{json, Value};

fn crds_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio/crd-all.gen.yaml")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/telemetry").join(name)
}

/// The realistic multi-scope set: examples/istio-telemetry/telemetry.yaml.
fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/istio-telemetry/telemetry.yaml")
}

/// Render from `path` mesh-wide with Istio's telemetry turned off beside it.
fn render_from(path: &Path) -> Result<(RenderOptions, Vec<Value>), String> {
    let args = RenderArgs {
        from_istio_telemetry: Some(path.to_path_buf()),
        crds: Some(crds_path()),
        disable_istio_telemetry: true,
        ..Default::default()
    };
    let opts = render_options(&args)?;
    let rendered = resources(&opts)?;
    Ok((opts, rendered))
}

/// Every resource valid under Istio's CRDs, and every meshtel pluginConfig under meshtel's parser.
fn assert_valid(rendered: &[Value], schemas: &CrdSchemas) {
    for r in rendered {
        let problems = schemas.check(r).expect("a CRD for every kind rendered");
        assert!(problems.is_empty(), "{problems:?} in {r:#}");
        if let Some(config) = r.pointer("/spec/pluginConfig") {
            meshtel_filter::config::parse(&serde_json::to_vec(config).unwrap()).expect("meshtel takes it");
        }
    }
}

/// What an example comes to: its number, JSON pointers into the pluginConfig and their values,
/// notes that must be there, or the refusal.
type Expected = (usize, Vec<(&'static str, Value)>, Vec<&'static str>, Option<&'static str>);

/// The documents of the docs' fixture, each alone, with the number its comment gives it.
fn doc_examples() -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(fixture("istio-docs.yaml")).unwrap();
    text.split("\n---\n")
        .filter_map(|doc| {
            let n = doc.lines().find_map(|l| l.strip_prefix("# ")?.split_once(". ")?.0.parse().ok())?;
            Some((n, doc.to_string()))
        })
        .collect()
}

#[test]
fn every_example_of_istios_documentation_carries_over_or_is_refused_with_the_reason() {
    let schemas = CrdSchemas::load(&crds_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let examples = doc_examples();
    assert_eq!(examples.len(), 25);
    // What each comes to: a JSON pointer into the pluginConfig and its value, notes that must be
    // there, or the refusal.
    let sampling_10 = ("/traces/sampling_ratio", json!(0.1));
    let expected: Vec<Expected> = vec![
        (1, vec![sampling_10.clone()], vec![], None),
        (
            2,
            vec![("/scopes/0", json!({"namespace": "bar", "selector": {"service.istio.io/canonical-name": "foo"}, "traces": {"enabled": false}}))],
            vec![],
            None,
        ),
        (3, vec![], vec!["spec.tracing[0].match.mode: not carried over", "spec.tracing[0].providers"], None),
        (4, vec![sampling_10.clone(), ("/traces/custom_tags/my_new_foo_tag", json!({"literal": {"value": "foo"}}))], vec![], None),
        (5, vec![("/metrics/overrides", json!([{"match": {"metric": "ALL_METRICS", "mode": "SERVER"}, "disabled": true}]))], vec!["providers"], None),
        (
            6,
            vec![("/scopes/0/metrics/overrides/0/tag_overrides", json!({
                "request_host": {"operation": "UPSERT", "value": "request.host"},
                "request_method": {"operation": "UPSERT", "value": "request.method"}}))],
            vec![],
            None,
        ),
        (7, vec![("/scopes/0/metrics/overrides/3", json!({"match": {"metric": "RESPONSE_SIZE"}, "tag_overrides": {"response_code": {"operation": "REMOVE"}}}))], vec![], None),
        (8, vec![("/logs/enabled", json!(true))], vec!["spec.accessLogging[0].providers"], None),
        (9, vec![("/scopes/0", json!({"namespace": "foo", "logs": {"enabled": false}}))], vec![], None),
        (10, vec![("/scopes/0/selector", json!({"istio": "egressgateway"}))], vec!["spec.tracing[0].disableContextPropagation: not carried over"], None),
        (11, vec![("/metrics/overrides/0/tag_overrides", json!({"grpc_response_status": {"operation": "REMOVE"}}))], vec![], None),
        (12, vec![("/metrics/overrides/1/match", json!({"metric": "REQUEST_COUNT", "mode": "SERVER"}))], vec!["tagOverrides.destination_x: carried over, but `upstream_peer`"], None),
        (13, vec![("/metrics/overrides/0", json!({"match": {"metric": "REQUEST_COUNT", "mode": "CLIENT"}, "disabled": true}))], vec![], None),
        (14, vec![], vec!["spec.metrics[0].reportingInterval: not carried over"], None),
        (
            15,
            vec![("/scopes/0/namespace", json!("default")), ("/scopes/0/metrics/overrides/0/tag_overrides/destination_port/value", json!("string(destination.port)"))],
            vec![],
            None,
        ),
        // The page puts `mode` beside `match` instead of in it: the CRD refuses the field.
        (16, vec![], vec![], Some("spec.metrics.0.overrides.0: schema: Additional properties are not allowed ('mode' was unexpected)")),
        (17, vec![("/traces/custom_tags/cluster_id", json!({"environment": {"name": "ISTIO_META_CLUSTER_ID", "default_value": "Kubernetes"}}))], vec![], None),
        // The page's `<CLIENT-HEADER>` placeholder is no header name.
        (18, vec![], vec![], Some("traces.custom_tags.my_tag_header.header.name")),
        (19, vec![("/scopes/0/traces", json!({"sampling_ratio": 1.0, "custom_tags": {"my-attribute": {"literal": {"value": "default-value"}}}}))], vec![], None),
        (20, vec![("/scopes/0/traces/custom_tags/userId", json!({"header": {"name": "userid", "default_value": "unknown"}}))], vec![], None),
        (21, vec![("/scopes/0", json!({"namespace": "default", "selector": {"app": "sleep"}, "logs": {"enabled": false}}))], vec![], None),
        (22, vec![("/scopes/0/logs", json!({"enabled": false}))], vec!["spec.accessLogging[0].match.mode: not carried over"], None),
        (23, vec![("/scopes/0/logs", json!({"enabled": true, "filter": "response.code >= 500"}))], vec![], None),
        (24, vec![("/logs/filter", json!("response.code >= 400 || xds.cluster_name == 'BlackHoleCluster' ||  xds.cluster_name == 'PassthroughCluster' "))], vec![], None),
        (25, vec![("/scopes/0/logs", json!({"enabled": true}))], vec![], None),
    ];
    for ((n, doc), (m, values, notes, refused)) in examples.iter().zip(expected) {
        assert_eq!(*n, m);
        let path = dir.path().join(format!("{n}.yaml"));
        std::fs::write(&path, doc).unwrap();
        match (render_from(&path), refused) {
            (Err(e), Some(why)) => assert!(e.contains(why), "example {n}: {e}"),
            (Err(e), None) => panic!("example {n} refused: {e}"),
            (Ok(_), Some(why)) => panic!("example {n} should be refused: {why}"),
            (Ok((opts, rendered)), None) => {
                for (pointer, value) in values {
                    assert_eq!(opts.plugin_config.pointer(pointer), Some(&value), "example {n}: {pointer}");
                }
                for note in notes {
                    assert!(opts.notes.iter().any(|l| l.contains(note)), "example {n}: {note} in {:?}", opts.notes);
                }
                assert_valid(&rendered, &schemas);
            }
        }
    }
}

#[test]
fn a_multi_scope_mesh_carries_over_scope_by_scope_in_istiods_order() {
    let schemas = CrdSchemas::load(&crds_path()).unwrap();
    let (opts, rendered) = render_from(&example()).unwrap();
    let c = &opts.plugin_config;
    assert_eq!(c["traces"]["sampling_ratio"], json!(0.05));
    assert_eq!(c["logs"], json!({"enabled": true, "filter": "response.code >= 500"}));
    assert_eq!(c["metrics"]["overrides"][0]["tag_overrides"], json!({"request_protocol": {"operation": "REMOVE"}}));
    let scopes: Vec<Value> =
        c["scopes"].as_array().unwrap().iter().map(|s| json!([s["namespace"], s.get("selector")])).collect();
    assert_eq!(
        scopes,
        [
            json!(["shop", null]),
            json!(["shop", {"app": "cart"}]),
            json!(["istio-ingress", {"gateway.networking.k8s.io/gateway-name": "public"}]),
        ],
        "the namespace's first, then selectors and gateways by creation time"
    );
    assert_eq!(
        c["scopes"][0]["traces"]["custom_tags"]["tenant"],
        json!({"header": {"name": "x-tenant", "default_value": "none"}})
    );
    for why in [
        "Telemetry shop/shop-later: ignored, as istiod ignores it: Telemetry shop/shop-tracing is the older",
        "Telemetry shop/reviews-waypoint: targetRefs Service reviews: not carried over",
        "Telemetry istio-system/mesh-default: spec.tracing[0].providers: not carried over",
    ] {
        assert!(opts.notes.iter().any(|n| n.starts_with(why)), "{why}: {:#?}", opts.notes);
    }
    assert_valid(&rendered, &schemas);
    // One meshtel, mesh-wide; then each carried resource again, Istio's metrics and tracing off.
    let kinds: Vec<String> = rendered
        .iter()
        .map(|r| {
            format!(
                "{} {}/{}",
                r["kind"].as_str().unwrap(),
                r["metadata"]["namespace"].as_str().unwrap(),
                r["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "WasmPlugin istio-system/meshtel",
            "WasmPlugin istio-system/meshtel-tcp",
            "Telemetry istio-system/mesh-default",
            "Telemetry shop/shop-tracing",
            "Telemetry shop/cart-metrics",
            "Telemetry istio-ingress/ingress",
        ]
    );
    let shop = &rendered[3];
    assert_eq!(shop["spec"]["tracing"], json!([{"disableSpanReporting": true}]));
    assert_eq!(shop["spec"]["metrics"][0]["overrides"][0]["disabled"], json!(true));
    assert!(shop["metadata"].get("creationTimestamp").is_none() && rendered[2]["metadata"].get("uid").is_none());
    assert_eq!(rendered[5]["spec"]["accessLogging"], json!([{"disabled": true}]), "access logging stays Istio's");
}

#[test]
fn without_a_mesh_wide_resource_istios_defaults_are_turned_off_in_the_root_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns.yaml");
    std::fs::write(&path, "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: shop}\nspec:\n  tracing: [{randomSamplingPercentage: 20}]\n").unwrap();
    let (_, rendered) = render_from(&path).unwrap();
    let names: Vec<&str> = rendered.iter().filter_map(|r| r.pointer("/metadata/name")?.as_str()).collect();
    assert_eq!(names, ["meshtel", "meshtel-tcp", "meshtel-disable-istio-telemetry", "t"]);
    assert_eq!(rendered[2]["metadata"]["namespace"], json!("istio-system"));
    assert_valid(&rendered, &CrdSchemas::load(&crds_path()).unwrap());
}

#[test]
fn the_command_reads_stdin_and_says_what_it_did_not_carry_as_comments_and_on_stderr() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshtel"))
        .args(["render", "--from-istio-telemetry", "-", "--namespace", "shop"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = std::fs::read(example()).unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &input).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with(
            "# From Istio's Telemetry resources, not carried over or carried with a caveat:\n# - Telemetry"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("namespace: shop") && stdout.contains("scopes:"), "{stdout}");
    assert!(
        stderr.contains(
            "from Istio's Telemetry: Telemetry shop/reviews-waypoint: targetRefs Service reviews: not carried over"
        ),
        "{stderr}"
    );
    // A resource Istio would refuse is refused, naming it and the field.
    let bad = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: bad, namespace: shop}\nspec:\n  metrics:\n  - overrides:\n    - tagOverrides: {request_host: {operation: UPSERT}}\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshtel"))
        .args(["render", "--from-istio-telemetry", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "Telemetry shop/bad: spec.metrics[0].overrides[0].tagOverrides.request_host: UPSERT needs a value"
        ),
        "{err}"
    );
}
