//! The log phase's one evaluation in Envoy 1.40: meshtel's CEL queries compile and evaluate
//! there, the answer comes in the format `meshtel_filter::prefetch` reads, and a proxy that
//! refuses them gets the same telemetry fact by fact.

use std::time::Duration;

use meshtel_filter::config;
use meshtel_filter::headers::Headers;
use meshtel_filter::istio::node::NodeInfo;
use meshtel_filter::prefetch::{Fact, LogQueries, Query};
use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::{set_filter_state, trap_wasm_path, Envoy};
use meshtel_tests::mesh::SidecarSpec;
use meshtel_tests::metrics::{series, total, Point};
use meshtel_tests::{repo_root, request};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// Evaluate `expression` with the probe module in the log phase of one request to a sidecar's
/// inbound listener (answered by `direct_response` instead of the app when set); the elements of
/// the list Envoy returns, or `None` when it refused.
fn evaluate(expression: &str, direct_response: Option<u16>) -> Option<Vec<Vec<u8>>> {
    let app = App::start(Behavior::Echo);
    let probe = repo_root().join("target/wasm32-wasip1/release/meshtel_probe_filter.wasm");
    let mut spec = SidecarSpec::new("a", "ns-a", app.port, 1).module(probe, "FAIL_OPEN");
    spec.plugin_config = Some(json!({"kind": "cel", "n": 1, "arg": expression, "dump": true}));
    let (mut proxy, inbound, _) = spec.proxy();
    let listener = &mut proxy.listeners[0];
    listener.filters_before.push(set_filter_state(&[("io.istio.peer_principal", "spiffe://td/ns/b/sa/b")]));
    listener.direct_response = direct_response;
    let envoy = Envoy::start(&proxy);
    let (code, _) = request(&format!("http://127.0.0.1:{inbound}/x"), &[("content-type", "text/plain")]).unwrap();
    assert_eq!(code, direct_response.unwrap_or(200));
    let log = envoy.wait_log("cel result: ", Duration::from_secs(10));
    let hex = log.split("cel result: ").nth(1)?.split_whitespace().next()?;
    if hex == "refused" {
        return None;
    }
    let bytes: Vec<u8> = (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    let list = Headers::over(&bytes);
    let elements: Vec<Vec<u8>> = list
        .iter()
        .map(|(k, v)| {
            assert!(v.is_empty(), "a list element is a key with an empty value");
            k.to_vec()
        })
        .collect();
    assert_eq!(Some(elements.len()), list.declared(), "every element read");
    Some(elements)
}

fn u64_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_else(|_| panic!("8 bytes, got {bytes:?}")))
}

#[test]
fn envoy_answers_a_cel_list_with_each_element_as_get_property_gives_it() {
    let got = evaluate("[response.code, xds.cluster_name, connection.mtls, 'x' in request.headers]", None).unwrap();
    assert_eq!(u64_of(&got[0]), 200, "an integer: 8 bytes, little-endian");
    assert_eq!(got[1], b"inbound|8080||", "a string: its bytes");
    assert_eq!((got[2].as_slice(), got[3].as_slice()), (&[0u8][..], &[0u8][..]), "a boolean: one byte");
    // One absent attribute fails the whole evaluation: why every fact is guarded.
    assert_eq!(evaluate("[response.code, filter_state['absent']]", None), None);
}

fn queries(node_id: &str) -> LogQueries {
    let json = r#"{"collector":{"cluster":"outbound|4318||otel"},"logs":{"enabled":true},"traces":{"span_name":"method_route"}}"#;
    let node = NodeInfo { id: node_id.into(), ..Default::default() };
    LogQueries::new(&config::parse(json.as_bytes()).unwrap(), &node)
}

/// The facts an answer to `q` holds, and their values: a split query's answer starts with its
/// condition's value.
fn answered(q: &Query, mut got: Vec<Vec<u8>>) -> Vec<(Fact, Vec<u8>)> {
    let holds = match q.condition() {
        Some(_) => got.remove(0) == [1],
        None => true,
    };
    assert_eq!(got.len(), q.facts(holds).len());
    q.facts(holds).iter().copied().zip(got).collect()
}

fn value(answer: &[(Fact, Vec<u8>)], fact: Fact) -> &[u8] {
    &answer.iter().find(|(f, _)| *f == fact).unwrap_or_else(|| panic!("{fact:?} not in the answer")).1
}

#[test]
fn meshtels_queries_evaluate_in_envoy_for_every_proxy_kind_and_a_local_reply() {
    let code = Fact::Property(&["response", "code"]);
    let cluster = Fact::Property(&["xds", "cluster_name"]);
    for node in [
        "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local",
        "router~10.0.0.2~gw.istio-system~istio-system.svc.cluster.local",
        "waypoint~10.0.0.3~wp.ns~ns.svc.cluster.local",
    ] {
        let q = queries(node);
        let got = evaluate(&q.request.expression(), None).unwrap_or_else(|| panic!("{node}: refused"));
        let answer = answered(&q.request, got);
        assert_eq!(u64_of(value(&answer, code)), 200, "{node}");
        assert_eq!(value(&answer, cluster), b"inbound|8080||", "{node}");
        assert_eq!(u64_of(value(&answer, Fact::Present(&["response", "flags"]))), 0, "{node}");
        if !node.starts_with("sidecar") {
            // Absent: empty.
            assert_eq!(value(&answer, Fact::Property(&["filter_state", "upstream_peer"])), b"", "{node}");
        }
    }
    // A local reply: no upstream, no cluster (the sidecar's other list), and still one answer.
    let q = queries("sidecar~10.0.0.1~a.ns~ns.svc.cluster.local");
    let got = evaluate(&q.request.expression(), Some(403)).expect("an answer for a local reply");
    assert_eq!(got[0], [0], "not an inbound cluster");
    let answer = answered(&q.request, got);
    assert_eq!(u64_of(value(&answer, code)), 403);
    assert_eq!(value(&answer, cluster), b"");
    assert_eq!(value(&answer, Fact::Property(&["upstream", "address"])), b"");
    assert_eq!(value(&answer, Fact::Message(&["xds", "upstream_host_metadata"])), b"");
    let got = evaluate(&q.connection.expression(), None).expect("the connection's query");
    let answer = answered(&q.connection, got);
    let principal = Fact::Property(&["filter_state", "io.istio.peer_principal"]);
    assert_eq!(value(&answer, principal), b"spiffe://td/ns/b/sa/b");
    assert_eq!(value(&answer, Fact::Property(&["request", "protocol"])), b"HTTP/1.1");
    assert_eq!(value(&answer, Fact::Property(&["connection", "mtls"])), [0], "plaintext");
}

/// Traffic of every outcome through one sidecar; its `istio_requests_total` series.
fn requests_total(collector: &Collector, spec: SidecarSpec) -> (Vec<Point>, Envoy) {
    let sidecar = spec.start();
    let send = |path: &str| request(&format!("http://127.0.0.1:{}{path}", sidecar.inbound), &[]).unwrap().0;
    for (path, code) in [("/ok", 200), ("/status/404", 404), ("/status/503", 503), ("/ok", 200)] {
        assert_eq!(send(path), code);
    }
    let points = collector.wait_for_points(WAIT, |p| total(p, "istio_requests_total", |_| true) == 4);
    (series(&points, "istio_requests_total"), sidecar.envoy)
}

fn config(collector: &Collector) -> Value {
    let mut c = collector.protocol_config();
    meshtel_tests::mesh::merge(&mut c, json!({"metrics": {"export_interval_ms": 1000}}));
    c
}

#[test]
fn a_proxy_that_refuses_the_queries_gets_the_same_telemetry_and_says_so_once() {
    let app = App::start(Behavior::Echo);
    let collector = Collector::start();
    let spec = SidecarSpec::new("a", "ns-a", app.port, collector.endpoint()).config(config(&collector));
    let (with_cel, envoy) = requests_total(&collector, spec);
    assert_eq!(envoy.stat("wasmcustom.meshtel.cel_refused"), 0);
    assert_eq!(envoy.stat("wasmcustom.meshtel.cel_evaluations_failed"), 0);
    assert!(!envoy.log().contains("refused to compile"));
    drop(envoy);

    // The test build compiles a broken expression when told to: Envoy's own refusal.
    let collector = Collector::start();
    let spec = SidecarSpec::new("a", "ns-a", app.port, collector.endpoint())
        .config(config(&collector))
        .module(trap_wasm_path(), "FAIL_OPEN")
        .host_env("MESHTEL_TEST_REFUSE_CEL", "1");
    let (without, envoy) = requests_total(&collector, spec);
    let line = "the proxy refused to compile the log phase's CEL query";
    envoy.wait_log(line, WAIT);
    let configured = envoy.log().matches(" configured: service ").count();
    assert!(envoy.log().matches(line).count() <= configured, "once per configured root context");
    assert!(envoy.wait_meshtel_stat("cel_refused", WAIT, |n| n >= 1) >= 1);
    let labels = |points: &[Point]| {
        let mut all: Vec<_> = points.iter().map(|p| (p.labels.clone(), p.value)).collect();
        all.sort();
        all
    };
    assert_eq!(labels(&with_cel), labels(&without), "the same series, with the same counts");
}
