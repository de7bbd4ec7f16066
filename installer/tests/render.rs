//! Rendered resources are accepted by Istio's CRD schemas and rules, carry a pluginConfig the

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! filter accepts, and match the checked-in manifests and snapshots.

use std::path::PathBuf;
use std::process::Command;

use meshtel::schema::CrdSchemas;
use meshtel::validate::validate_text;
use meshtel::yaml::yaml_documents;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Istio's CRD bundle, read from `../shared/istio` beside the repository.
fn istio_crds() -> CrdSchemas {
    let path = repo().join("../shared/istio/crd-all.gen.yaml");
    CrdSchemas::load(&path).unwrap_or_else(|e| panic!("Istio's CRDs are needed at {}: {e}", path.display()))
}

fn render(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshtel")).arg("render").args(args).output().expect("run meshtel");
    assert!(out.status.success(), "meshtel render {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 YAML")
}

/// Every resource validates against Istio's schemas (all kinds) and meshtel's rules.
fn assert_valid(yaml: &str, crds: &CrdSchemas) -> Vec<Value> {
    let docs = yaml_documents(yaml).expect("YAML");
    for doc in &docs {
        let problems = crds.check(doc).unwrap_or_else(|| panic!("no CRD for {}", doc["kind"]));
        assert!(problems.is_empty(), "{}: {problems:?}\n{yaml}", doc["kind"]);
    }
    let report = validate_text("rendered", yaml, Some(crds));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    docs
}

fn plugin_config(doc: &Value) -> &Value {
    doc.pointer("/spec/pluginConfig").or_else(|| doc.pointer("/spec/wasm/pluginConfig")).expect("a pluginConfig")
}

const MODES: &[&[&str]] = &[
    &["--namespace", "shop", "--namespace", "web"],
    &["--gateway"],
    &["--gateway", "--gateway-name", "public", "--gateway-namespace", "edge"],
    &["--workload-label", "meshtel.io/trace=enabled"],
    &["--workload-label", "app=checkout", "--namespace", "shop"],
    &["--mesh-wide"],
    &["--waypoint", "waypoint", "--namespace", "shop"],
    &["--service", "reviews", "--namespace", "shop"],
    &["--all-waypoints"],
];

#[test]
fn waypoint_modes_attach_by_target_refs_only() {
    // istio/istio pilot/pkg/model/policyattachment.go: a waypoint takes a WasmPlugin only by
    // targetRefs: its Gateway, a Service it serves (in the Service's namespace), or the
    // istio-waypoint GatewayClass from the root namespace.
    let cases: [(&[&str], &str, &str, &str, &str); 3] = [
        (&["--waypoint", "wp", "--namespace", "shop"], "shop", "gateway.networking.k8s.io", "Gateway", "wp"),
        (&["--service", "reviews", "--namespace", "shop"], "shop", "", "Service", "reviews"),
        (&["--all-waypoints"], "istio-system", "gateway.networking.k8s.io", "GatewayClass", "istio-waypoint"),
    ];
    for (args, ns, group, kind, name) in cases {
        let docs = yaml_documents(&render(args)).unwrap();
        let plugin = &docs[0];
        assert_eq!(plugin["metadata"]["namespace"], ns, "{args:?}");
        assert!(plugin["spec"].get("selector").is_none(), "{args:?}");
        assert!(plugin["spec"].get("match").is_none(), "ports never match a waypoint's HTTP chains: {args:?}");
        let target = &plugin["spec"]["targetRefs"][0];
        assert_eq!(
            (target["group"].as_str().unwrap_or(""), target["kind"].as_str(), target["name"].as_str()),
            (group, Some(kind), Some(name))
        );
    }
}

#[test]
fn every_mode_and_api_validates_against_istio_crds() {
    let crds = istio_crds();
    for mode in MODES {
        for api in ["wasmplugin", "trafficextension"] {
            let mut args = mode.to_vec();
            args.extend(["--api", api, "--disable-istio-tracing"]);
            let docs = assert_valid(&render(&args), &crds);
            let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
            assert!(kinds.contains(&"Telemetry"), "{kinds:?}");
        }
    }
    let docs = assert_valid(
        &render(&["--mesh-wide", "--collector", "otlp.example.com:4318", "--collector-service-entry"]),
        &crds,
    );
    assert_eq!(docs.last().unwrap()["kind"], "ServiceEntry");
}

#[test]
fn tcp_adds_the_network_filter_beside_the_http_one_in_every_mode() {
    let crds = istio_crds();
    for mode in MODES {
        for api in ["wasmplugin", "trafficextension"] {
            let mut args = mode.to_vec();
            args.extend(["--api", api, "--tcp", "--metrics"]);
            let docs = assert_valid(&render(&args), &crds);
            let module = |d: &Value| d.get("spec").map(|s| s.get("wasm").unwrap_or(s).clone()).unwrap();
            let (http, tcp): (Vec<&Value>, Vec<&Value>) = docs.iter().partition(|d| module(d)["type"] == "HTTP");
            assert_eq!(http.len(), tcp.len(), "{args:?}: one network filter per HTTP one");
            for (h, t) in http.iter().zip(&tcp) {
                let m = module(t);
                assert_eq!((m["type"].as_str(), m["pluginName"].as_str()), (Some("NETWORK"), Some("meshtel-tcp")));
                assert_eq!(t["metadata"]["name"], "meshtel-tcp", "{args:?}");
                assert_eq!(t["metadata"]["namespace"], h["metadata"]["namespace"]);
                for attachment in ["selector", "targetRefs"] {
                    assert_eq!(t["spec"].get(attachment), h["spec"].get(attachment), "{args:?}: the same workloads");
                }
                assert_eq!(m["pluginConfig"], module(h)["pluginConfig"]);
            }
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_meshtel"))
        .args(["render", "--namespace", "shop", "--tcp", "--no-metrics"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tcp records Istio's TCP metrics"));
}

#[test]
fn the_image_pull_secret_goes_on_every_resource_in_its_own_namespace() {
    let crds = istio_crds();
    for mode in MODES {
        for api in ["wasmplugin", "trafficextension"] {
            let mut args = mode.to_vec();
            let image = "oci://registry.example.com/platform/meshtel-filter:0.1.0";
            args.extend(["--api", api, "--image", image, "--image-pull-secret", "meshtel-pull"]);
            let docs = assert_valid(&render(&args), &crds);
            let modules: Vec<Value> = docs
                .iter()
                .filter_map(|d| d.get("spec").map(|s| s.get("wasm").unwrap_or(s).clone()))
                .filter(|m| m.get("url").is_some())
                .collect();
            assert!(!modules.is_empty(), "{args:?}");
            for m in modules {
                assert_eq!((m["imagePullSecret"].as_str(), m["url"].as_str()), (Some("meshtel-pull"), Some(image)));
            }
        }
    }
    for (args, expect) in [
        (vec!["--namespace", "shop", "--image-pull-secret", "Bad_Name"], "not a valid Secret name"),
        (
            vec!["--namespace", "shop", "--wasm-url", "https://x/m.wasm", "--image-pull-secret", "s"],
            "--image-pull-secret is for an oci:// image",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_meshtel")).arg("render").args(&args).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect), "{args:?}");
    }
}

#[test]
fn validate_refuses_a_network_plugin_that_would_run_as_the_http_filter() {
    let yaml = render(&["--namespace", "shop", "--tcp"]);
    let swapped = yaml.replace("pluginName: meshtel-tcp", "pluginName: other");
    let report = validate_text("swapped", &swapped, None);
    assert!(
        report.errors.iter().any(|e| e.contains("spec.pluginName") && e.contains("must be pluginName meshtel-tcp")),
        "{:?}",
        report.errors
    );
    let http_typed = yaml.replace("type: NETWORK", "type: HTTP");
    let report = validate_text("http", &http_typed, None);
    assert!(
        report.errors.iter().any(|e| e.contains("spec.type") && e.contains("type must be NETWORK")),
        "{:?}",
        report.errors
    );
}

#[test]
fn rendered_plugin_config_is_what_the_filter_accepts() {
    let yaml = render(&["--namespace", "shop", "--collector", "otel.obs:4317", "--sampling", "0.25", "--no-metrics"]);
    let docs = yaml_documents(&yaml).unwrap();
    let pc = plugin_config(&docs[0]);
    let config = meshtel_filter::config::parse(&serde_json::to_vec(pc).unwrap()).expect("accepted by the filter");
    assert_eq!(config.collector.cluster, "outbound|4317||otel.obs.svc.cluster.local");
    assert_eq!(config.collector.authority, "otel.obs.svc.cluster.local:4317");
    assert_eq!(config.traces.sampling_ratio, 0.25);
    assert!(config.traces.enabled && !config.metrics.enabled);
}

#[test]
fn the_collector_port_picks_the_protocol_unless_told() {
    let protocol = |args: &[&str]| {
        let docs = yaml_documents(&render(args)).unwrap();
        let config = meshtel_filter::config::parse(&serde_json::to_vec(plugin_config(&docs[0])).unwrap()).unwrap();
        config.collector.protocol
    };
    use meshtel_filter::config::Protocol;
    assert_eq!(protocol(&["--mesh-wide", "--collector", "otel.obs:4317"]), Protocol::Grpc);
    assert_eq!(protocol(&["--mesh-wide", "--collector", "otel.obs:4318"]), Protocol::Http);
    assert_eq!(protocol(&["--mesh-wide"]), Protocol::Http, "the default collector is OTLP/HTTP on 4318");
    assert_eq!(
        protocol(&["--mesh-wide", "--collector", "otel.obs:4317", "--collector-protocol", "http"]),
        Protocol::Http
    );
    assert_eq!(
        protocol(&["--mesh-wide", "--collector", "otel.obs:9000", "--collector-protocol", "grpc"]),
        Protocol::Grpc
    );
    let crds = istio_crds();
    let docs = assert_valid(
        &render(&["--mesh-wide", "--collector", "otlp.example.com:4317", "--collector-service-entry"]),
        &crds,
    );
    assert_eq!(docs.last().unwrap()["spec"]["ports"][0]["protocol"], "GRPC");
}

#[test]
fn logs_flag_turns_on_access_logs() {
    use meshtel_filter::config::LogMode;
    let logs = |args: &[&str]| {
        let docs = yaml_documents(&render(args)).unwrap();
        meshtel_filter::config::parse(&serde_json::to_vec(plugin_config(&docs[0])).unwrap()).unwrap().logs
    };
    assert!(!logs(&["--mesh-wide"]).enabled, "off by default");
    let errors = logs(&["--mesh-wide", "--logs", "errors"]);
    assert!(errors.enabled && errors.mode == LogMode::Errors);
    assert_eq!(logs(&["--mesh-wide", "--logs", "all"]).mode, LogMode::All);
    assert!(!logs(&["--mesh-wide", "--logs", "off"]).enabled);
}

#[test]
fn modes_attach_as_documented() {
    let docs = yaml_documents(&render(&["--namespace", "shop", "--namespace", "web", "--no-tcp"])).unwrap();
    assert_eq!(docs.len(), 2);
    assert!(docs.iter().all(|d| d["spec"].get("selector").is_none()));
    assert_eq!(docs[1]["metadata"]["namespace"], "web");
    // The network filter for TCP metrics comes with the HTTP one wherever metrics are on.
    let with_tcp = yaml_documents(&render(&["--namespace", "shop", "--namespace", "web"])).unwrap();
    let names: Vec<(&str, &str)> = with_tcp
        .iter()
        .map(|d| (d["metadata"]["namespace"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("shop", "meshtel"), ("shop", "meshtel-tcp"), ("web", "meshtel"), ("web", "meshtel-tcp")]);
    assert_eq!(yaml_documents(&render(&["--gateway"])).unwrap().len(), 1, "a gateway traces only: no TCP");
    let gw = &yaml_documents(&render(&["--gateway"])).unwrap()[0];
    assert_eq!(gw["spec"]["selector"]["matchLabels"]["istio"], "ingressgateway");
    assert_eq!(gw["metadata"]["namespace"], "istio-system");
    assert_eq!(plugin_config(gw)["metrics"]["enabled"], false, "a gateway traces only by default");
    let gw = &yaml_documents(&render(&["--gateway", "--metrics"])).unwrap()[0];
    assert_eq!(plugin_config(gw)["metrics"]["enabled"], true);
    let named = &yaml_documents(&render(&["--gateway", "--gateway-name", "public"])).unwrap()[0];
    assert_eq!(named["spec"]["targetRefs"][0]["kind"], "Gateway");
    assert_eq!(named["spec"]["targetRefs"][0]["group"], "gateway.networking.k8s.io");
    let label = &yaml_documents(&render(&["--workload-label", "meshtel.io/trace=enabled"])).unwrap()[0];
    assert_eq!(label["metadata"]["namespace"], "istio-system", "mesh-wide by label lives in the root namespace");
    assert_eq!(label["spec"]["selector"]["matchLabels"]["meshtel.io/trace"], "enabled");
    let te = &yaml_documents(&render(&["--mesh-wide", "--api", "trafficextension"])).unwrap()[0];
    assert_eq!(te["kind"], "TrafficExtension");
    assert_eq!(te["spec"]["wasm"]["failStrategy"], "FAIL_OPEN");
}

#[test]
fn config_file_sets_plugin_config_and_options() {
    let dir = tempfile::Builder::new().prefix("meshtel-config-").tempdir().unwrap();
    let file = dir.path().join("meshtel.yaml");
    std::fs::write(
        &file,
        "namespace: [shop]\nsampling: 0.5\nfail-strategy: FAIL_RELOAD\npluginConfig:\n  traces:\n    propagation: [b3]\n  export:\n    max_batch: 64\n",
    )
    .unwrap();
    let yaml = render(&["--config", file.to_str().unwrap(), "--sampling", "0.2"]);
    let docs = yaml_documents(&yaml).unwrap();
    let pc = plugin_config(&docs[0]);
    assert_eq!(pc["traces"]["sampling_ratio"], 0.2, "flags win over the file");
    assert_eq!(pc["traces"]["propagation"][0], "b3");
    assert_eq!(pc["export"]["max_batch"], 64);
    assert_eq!(docs[0]["spec"]["failStrategy"], "FAIL_RELOAD");
    assert_valid(&yaml, &istio_crds());
}

#[test]
fn snapshots_of_the_rendered_modes() {
    insta::assert_snapshot!("namespace", render(&["--namespace", "shop"]));
    insta::assert_snapshot!(
        "gateway_api",
        render(&["--gateway", "--gateway-name", "public", "--disable-istio-tracing"])
    );
    insta::assert_snapshot!(
        "workload_label_traffic_extension",
        render(&[
            "--workload-label",
            "meshtel.io/trace=enabled",
            "--api",
            "trafficextension",
            "--collector-header-from-env",
            "x-api-key=OTEL_API_KEY"
        ])
    );
}

#[test]
fn checked_in_manifests_match_what_the_installer_renders() {
    let dir = repo().join("wasm-plugins");
    let list = std::fs::read_to_string(dir.join("manifests.txt")).unwrap();
    let mut seen = 0;
    for line in list.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let file = parts.next().unwrap();
        let args: Vec<&str> = parts.collect();
        let want = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert_eq!(want, render(&args), "wasm-plugins/{file} is stale: run `make manifests`");
        assert_valid(&want, &istio_crds());
        seen += 1;
    }
    assert_eq!(seen, 4, "namespace, gateway, workload-label and waypoint manifests");
}
