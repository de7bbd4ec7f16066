//! Istio's standard metrics end to end: requests through real Envoy running meshtel, OTLP
//! metrics decoded at the receiver and checked series by series.

use std::thread;
use std::time::Duration;

use meshtel_tests::app::{App, Behavior, PEER_METADATA_REQUEST};
use meshtel_tests::collector::Collector;
use meshtel_tests::mesh::{gateway, plugin_config, SidecarSpec};
use meshtel_tests::metrics::{exponential_index, exponential_series, peer_metadata, series, total, Point};
use meshtel_tests::{free_port, request};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);
const REQUESTS: &str = "istio_requests_total";

fn metrics_config(extra: serde_json::Value) -> serde_json::Value {
    let mut config = json!({"metrics": {"export_interval_ms": 1000}});
    meshtel_tests::mesh::merge(&mut config, extra);
    config
}

fn send(port: u16, path: &str, headers: &[(&str, &str)]) -> u16 {
    request(&format!("http://127.0.0.1:{port}{path}"), headers).expect("an answer").0
}

fn one(points: &[Point], metric: &str, filter: impl Fn(&Point) -> bool) -> Point {
    let matching: Vec<Point> = series(points, metric).into_iter().filter(|p| filter(p)).collect();
    assert_eq!(matching.len(), 1, "one {metric} series expected, got {matching:#?}");
    matching.into_iter().next().unwrap()
}

#[test]
fn inbound_mix_is_counted_per_label_set_with_istio_labels() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port).config(metrics_config(json!({}))).start();
    let from_front = peer_metadata("front", "ns-front");
    for _ in 0..5 {
        assert_eq!(send(sidecar.inbound, "/ok", &[("x-envoy-peer-metadata", &from_front)]), 200);
    }
    for _ in 0..3 {
        assert_eq!(send(sidecar.inbound, "/status/404", &[]), 404);
    }
    for _ in 0..2 {
        assert_eq!(send(sidecar.inbound, "/status/503", &[("x-envoy-peer-metadata", "%%%not-base64")]), 503);
    }
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 10);

    let ok = one(&points, REQUESTS, |p| p.label("response_code") == "200");
    assert_eq!(ok.value, 5);
    for (label, want) in [
        ("reporter", "destination"),
        ("source_workload", "front-v1"),
        ("source_workload_namespace", "ns-front"),
        ("source_app", "front"),
        ("source_version", "v1"),
        ("source_canonical_service", "front"),
        ("source_canonical_revision", "v1"),
        ("source_cluster", "Kubernetes"),
        ("source_principal", "unknown"),
        ("destination_workload", "a-v1"),
        ("destination_workload_namespace", "ns-a"),
        ("destination_app", "a"),
        ("destination_version", "v1"),
        ("destination_canonical_service", "a"),
        ("destination_canonical_revision", "v1"),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "a.ns-a.svc.cluster.local"),
        ("destination_service_name", "a"),
        ("destination_service_namespace", "ns-a"),
        ("destination_principal", "unknown"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
        ("grpc_response_status", ""),
        ("connection_security_policy", "none"),
    ] {
        assert_eq!(ok.label(label), want, "{label}");
    }
    assert_eq!(ok.labels.len(), 25, "Istio's full label set");

    let not_found = one(&points, REQUESTS, |p| p.label("response_code") == "404");
    assert_eq!(not_found.value, 3);
    assert_eq!(not_found.label("source_workload"), "unknown");
    assert_eq!(not_found.label("source_canonical_revision"), "latest");
    let unavailable = one(&points, REQUESTS, |p| p.label("response_code") == "503");
    assert_eq!(unavailable.value, 2);
    assert_eq!(unavailable.label("source_workload"), "unknown", "malformed peer metadata degrades to unknown");

    for metric in ["istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"] {
        let h = one(&points, metric, |p| p.label("response_code") == "200");
        assert_eq!(h.value, 5, "{metric}: one observation per request");
        assert_eq!(h.buckets.iter().sum::<u64>(), 5, "{metric}: buckets add up to the count");
        assert_eq!(h.bounds.len(), 19, "{metric}: Istio's bucket bounds");
        assert!(h.sum > 0.0, "{metric}: a positive sum");
    }
    let bytes = one(&points, "istio_request_bytes", |p| p.label("response_code") == "200");
    assert!(bytes.sum / 5.0 > 50.0 && bytes.sum / 5.0 < 2_000.0, "wire bytes with headers: {}", bytes.sum);
    let duration = one(&points, "istio_request_duration_milliseconds", |p| p.label("response_code") == "200");
    assert_eq!(duration.unit, "ms");
    assert_eq!(bytes.unit, "By");
}

#[test]
fn duration_exemplars_name_spans_the_collector_received() {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let config = metrics_config(json!({"traces": {"sampling_ratio": 0.5}}));
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port).config(config).concurrency(2).start();
    for i in 0..40 {
        assert_eq!(send(sidecar.inbound, &format!("/e/{i}"), &[]), 200);
    }
    collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 40);
    thread::sleep(Duration::from_millis(1500));
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let exemplars: Vec<(String, String)> = collector
        .metric_exports()
        .iter()
        .flat_map(|e| e.resource_metrics.iter())
        .flat_map(|r| r.scope_metrics.iter())
        .flat_map(|s| s.metrics.iter())
        .filter(|m| m.name == "istio_request_duration_milliseconds")
        .filter_map(|m| match &m.data {
            Some(Data::Histogram(h)) => Some(h.data_points.clone()),
            _ => None,
        })
        .flatten()
        .flat_map(|p| p.exemplars)
        .map(|e| (hex(&e.trace_id), hex(&e.span_id)))
        .collect();
    assert!(!exemplars.is_empty(), "the duration histogram carries exemplars");
    let spans: Vec<(String, String)> = collector.spans().iter().map(|s| (s.trace_id(), s.span_id())).collect();
    for e in &exemplars {
        assert!(spans.contains(e), "exemplar {e:?} names a span the collector got (sampled requests only)");
    }
}

#[test]
fn failing_upstream_sets_response_flags() {
    let collector = Collector::start();
    let sidecar =
        SidecarSpec::new("down", "ns-a", free_port(), collector.port).config(metrics_config(json!({}))).start();
    for _ in 0..3 {
        assert_eq!(send(sidecar.inbound, "/", &[]), 503);
    }
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 3);
    let p = one(&points, REQUESTS, |_| true);
    assert_eq!((p.label("response_code"), p.label("response_flags")), ("503", "UF"));
}

#[test]
fn outbound_and_gateway_report_source_with_the_destination_resolved() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", free_port(), collector.port)
        .upstream("b.ns-b.svc.cluster.local", app.port)
        .config(metrics_config(json!({})))
        .start();
    // The upstream answers with its peer metadata header (as an Istio sidecar would) ...
    let as_c = peer_metadata("c", "ns-c");
    for _ in 0..4 {
        assert_eq!(send(sidecar.outbound, "/x", &[(PEER_METADATA_REQUEST, &as_c)]), 200);
    }
    // ... or not: the endpoint's Istio metadata names the workload.
    for _ in 0..2 {
        assert_eq!(send(sidecar.outbound, "/x", &[]), 200);
    }
    let gw = gateway("b.ns-b.svc.cluster.local", app.port, collector.port, plugin_config(metrics_config(json!({}))));
    assert_eq!(send(gw.port, "/gw", &[]), 200);

    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 7);
    let by_header = one(&points, REQUESTS, |p| p.label("destination_workload") == "c-v1");
    assert_eq!(by_header.value, 4);
    assert_eq!(by_header.label("reporter"), "source");
    assert_eq!(by_header.label("destination_workload_namespace"), "ns-c");
    assert_eq!(by_header.label("source_workload"), "a-v1");
    assert_eq!(by_header.label("source_canonical_service"), "a");
    assert_eq!(by_header.label("destination_service"), "b.ns-b.svc.cluster.local");
    assert_eq!(by_header.label("connection_security_policy"), "unknown");
    let by_endpoint =
        one(&points, REQUESTS, |p| p.label("destination_workload") == "b-v1" && p.label("source_workload") == "a-v1");
    assert_eq!(by_endpoint.value, 2);
    assert_eq!(by_endpoint.label("destination_canonical_service"), "b");
    assert_eq!(by_endpoint.label("destination_workload_namespace"), "ns-b");
    let from_gw = one(&points, REQUESTS, |p| p.label("source_workload") == "istio-ingressgateway");
    assert_eq!(from_gw.value, 1);
    assert_eq!(from_gw.label("reporter"), "source");
    assert_eq!(from_gw.label("source_workload_namespace"), "istio-system");
    assert_eq!(from_gw.label("destination_workload"), "b-v1");
    assert_eq!(from_gw.label("destination_service_name"), "b");
}

fn drive(port: u16, threads: usize, per_thread: usize) {
    let handles: Vec<_> = (0..threads)
        .map(|_| thread::spawn(move || (0..per_thread).filter(|_| send(port, "/load", &[]) == 200).count()))
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, threads * per_thread);
}

fn totals_add_up(temporality: &str) {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .concurrency(4)
        .config(metrics_config(json!({"metrics": {"temporality": temporality}})))
        .start();
    let (threads, per_thread) = (8, 250);
    drive(sidecar.inbound, threads, per_thread);
    let sent = (threads * per_thread) as u64;
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) >= sent);
    assert_eq!(total(&points, REQUESTS, |_| true), sent);
    // Wait two more export intervals: the total must not move past what was sent.
    thread::sleep(Duration::from_millis(2_500));
    let points = collector.points();
    assert_eq!(total(&points, REQUESTS, |_| true), sent);
    let instances: std::collections::HashSet<&str> = points.iter().map(|p| p.instance.as_str()).collect();
    assert_eq!(instances.len(), 1, "one exporter per proxy");
    assert!(points.iter().all(|p| p.cumulative == (temporality == "cumulative")));
    let requests_series = series(&points, REQUESTS);
    assert_eq!(requests_series.len(), 1, "{requests_series:#?}");
    let durations = one(&points, "istio_request_duration_milliseconds", |_| true);
    assert_eq!(durations.value, sent);
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.metric_requests_recorded"), sent);
}

#[test]
fn four_workers_cumulative_totals_equal_requests_sent() {
    totals_add_up("cumulative");
}

#[test]
fn four_workers_delta_totals_equal_requests_sent() {
    totals_add_up("delta");
}

/// `metrics.histograms: both` through 4 workers: Istio's series as always, and exponential
/// series whose merged counts equal the requests and whose buckets hold each request's duration
/// (every request is sampled, and a span's end minus start is the duration meshtel records).
fn exponential_histograms_add_up(temporality: &str) {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let config = json!({"metrics": {"temporality": temporality, "histograms": "both"}});
    let sidecar =
        SidecarSpec::new("a", "ns-a", app.port, collector.port).concurrency(4).config(metrics_config(config)).start();
    // Durations from well under a millisecond to ~80 ms: the histograms downscale to fit.
    let port = sidecar.inbound;
    let handles: Vec<_> = (0..8)
        .map(|t| {
            thread::spawn(move || {
                (0..60).filter(|i| send(port, &format!("/delay/{}", (t * i) % 80), &[]) == 200).count()
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let sent = ok as u64;
    assert_eq!(sent, 480);
    const EXPONENTIAL: &str = "istio_request_duration_exponential_milliseconds";
    collector
        .wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) >= sent && total(p, EXPONENTIAL, |_| true) >= sent);
    // Two more export intervals: nothing may move past what was sent.
    thread::sleep(Duration::from_millis(2_500));
    let points = collector.points();
    assert_eq!(total(&points, REQUESTS, |_| true), sent);
    assert_eq!(
        one(&points, "istio_request_duration_milliseconds", |_| true).value,
        sent,
        "Istio's histogram as always"
    );
    assert_eq!(one(&points, "istio_request_duration_milliseconds", |_| true).bounds.len(), 19);
    for name in [EXPONENTIAL, "istio_request_exponential_bytes", "istio_response_exponential_bytes"] {
        let p = one(&points, name, |_| true);
        assert_eq!(p.value, sent, "{name}: every request once");
        assert!(p.cumulative == (temporality == "cumulative"));
    }
    let exp = exponential_series(&points, EXPONENTIAL);
    assert_eq!(exp.len(), 1);
    let (_, scale, zeros, buckets) = &exp[0];
    assert!(*scale < 20, "downscaled from the finest scale: {scale}");
    assert!(buckets.len() <= 160);
    let spans = collector.spans();
    assert_eq!(spans.len() as u64, sent);
    let mut expected: std::collections::BTreeMap<i32, u64> = Default::default();
    let mut expected_zeros = 0;
    for s in &spans {
        let ms = (s.span.end_time_unix_nano - s.span.start_time_unix_nano) as f64 / 1e6;
        match ms > 0.0 {
            true => *expected.entry(exponential_index(ms, *scale)).or_default() += 1,
            false => expected_zeros += 1,
        }
    }
    assert_eq!((buckets, *zeros), (&expected, expected_zeros), "each duration in the bucket that holds it");
}

#[test]
fn four_workers_exponential_histograms_cumulative() {
    exponential_histograms_add_up("cumulative");
}

#[test]
fn four_workers_exponential_histograms_delta() {
    exponential_histograms_add_up("delta");
}

#[test]
fn cardinality_cap_folds_new_peers_into_the_overflow_series() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .config(metrics_config(json!({"metrics": {"max_series": 5}})))
        .start();
    for i in 0..40 {
        let md = peer_metadata(&format!("peer{i}"), "ns-peers");
        assert_eq!(send(sidecar.inbound, "/", &[("x-envoy-peer-metadata", &md)]), 200);
    }
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 40);
    let all = series(&points, REQUESTS);
    assert_eq!(all.len(), 6, "5 series plus the overflow series");
    let overflow = one(&points, REQUESTS, |p| p.label("otel.metric.overflow") == "true");
    assert_eq!(overflow.value, 35);
    assert_eq!(overflow.labels.len(), 1);
    let deadline = std::time::Instant::now() + WAIT;
    while sidecar.envoy.stat("wasmcustom.meshtel.metric_overflow") < 35 {
        assert!(std::time::Instant::now() < deadline, "overflow not counted in meshtel's stats");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.metric_overflow"), 35);
}

/// 2,000 distinct callers, twice each, from 8 client threads through a 4-worker sidecar.
fn two_thousand_peers(max_series: usize) -> (Vec<Point>, u64) {
    const PEERS: usize = 2000;
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .concurrency(4)
        .config(metrics_config(json!({"metrics": {"max_series": max_series}})))
        .start();
    let port = sidecar.inbound;
    let handles: Vec<_> = (0..8)
        .map(|t| {
            thread::spawn(move || {
                let peers: Vec<String> = (t * PEERS / 8..(t + 1) * PEERS / 8)
                    .map(|i| peer_metadata(&format!("peer{i}"), "ns-peers"))
                    .collect();
                let sends = (0..2).flat_map(|_| peers.iter());
                sends.filter(|md| send(port, "/", &[("x-envoy-peer-metadata", md)]) == 200).count()
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let sent = 2 * PEERS as u64;
    assert_eq!(ok as u64, sent);
    let points = collector.wait_for_points(Duration::from_secs(30), |p| total(p, REQUESTS, |_| true) == sent);
    (series(&points, REQUESTS), sent)
}

#[test]
fn two_thousand_peers_through_four_workers_get_exact_totals_per_series() {
    let (all, sent) = two_thousand_peers(2500);
    assert_eq!(all.len(), 2000, "one series per caller");
    assert!(all.iter().all(|p| p.value == 2), "{:?}", all.iter().find(|p| p.value != 2));
    assert_eq!(all.iter().map(|p| p.value).sum::<u64>(), sent);
    let workloads: std::collections::HashSet<&str> = all.iter().map(|p| p.label("source_workload")).collect();
    assert_eq!(workloads.len(), 2000);
}

#[test]
fn two_thousand_peers_over_the_cap_fold_into_the_overflow_series() {
    let (all, sent) = two_thousand_peers(1500);
    assert_eq!(all.iter().map(|p| p.value).sum::<u64>(), sent, "nothing lost");
    let overflow: Vec<&Point> = all.iter().filter(|p| p.label("otel.metric.overflow") == "true").collect();
    assert_eq!(overflow.len(), 1);
    assert!(overflow[0].value >= 2 * 500, "at least the 500 callers past the cap: {}", overflow[0].value);
    assert_eq!(all.len(), 1501, "the cap's series plus the overflow series");
}

#[test]
fn metrics_disabled_exports_traces_only() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .config(metrics_config(json!({"metrics": {"enabled": false}})))
        .start();
    for _ in 0..5 {
        assert_eq!(send(sidecar.inbound, "/", &[]), 200);
    }
    collector.wait_for_spans(5, WAIT);
    thread::sleep(Duration::from_millis(2_500));
    assert!(collector.metric_exports().is_empty());
    assert!(collector.requests().iter().all(|(path, _)| path == "/v1/traces"));
}

#[test]
fn traces_disabled_exports_metrics_and_leaves_headers_alone() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .config(metrics_config(json!({"traces": {"enabled": false}})))
        .start();
    let (status, body) = request(&format!("http://127.0.0.1:{}/", sidecar.inbound), &[]).unwrap();
    assert_eq!(status, 200);
    assert!(!body.contains("traceparent"), "{body}");
    collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 1);
    assert!(collector.spans().is_empty());
}

#[test]
fn mtls_peers_are_identified_by_their_spiffe_principal() {
    let collector = Collector::start();
    let ca = meshtel_tests::tls::MeshCa::new();
    let gateway_id = ca.issue("istio-system", "istio-ingressgateway-service-account");
    let a_id = ca.issue("ns-a", "a");
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .mtls(a_id.clone())
        .config(metrics_config(json!({})))
        .start();
    let gw = meshtel_tests::mesh::gateway_with(
        "a.ns-a.svc.cluster.local",
        sidecar.inbound,
        collector.port,
        plugin_config(metrics_config(json!({}))),
        Some(gateway_id.clone()),
        false,
    );
    for _ in 0..3 {
        assert_eq!(send(gw.port, "/secure", &[]), 200);
    }
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 6);
    let inbound = one(&points, REQUESTS, |p| p.label("reporter") == "destination");
    assert_eq!(inbound.value, 3);
    assert_eq!(inbound.label("source_principal"), gateway_id.spiffe_id);
    assert_eq!(inbound.label("source_workload_namespace"), "istio-system", "namespace from the principal");
    assert_eq!(inbound.label("source_workload"), "unknown", "a principal names no workload");
    assert_eq!(inbound.label("destination_principal"), a_id.spiffe_id);
    assert_eq!(inbound.label("connection_security_policy"), "mutual_tls");
    let outbound = one(&points, REQUESTS, |p| p.label("reporter") == "source");
    assert_eq!(outbound.label("source_principal"), gateway_id.spiffe_id);
    assert_eq!(outbound.label("destination_principal"), a_id.spiffe_id);
    assert_eq!(outbound.label("destination_workload"), "a-v1");
}

#[test]
fn grpc_requests_carry_protocol_and_status() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port).config(metrics_config(json!({}))).start();
    let grpc = [("content-type", "application/grpc")];
    for _ in 0..2 {
        assert_eq!(send(sidecar.inbound, "/grpc/0", &grpc), 200);
    }
    assert_eq!(send(sidecar.inbound, "/grpc/14", &grpc), 200);
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 3);
    let ok = one(&points, REQUESTS, |p| p.label("grpc_response_status") == "0");
    assert_eq!((ok.value, ok.label("request_protocol")), (2, "grpc"));
    let unavailable = one(&points, REQUESTS, |p| p.label("grpc_response_status") == "14");
    assert_eq!((unavailable.value, unavailable.label("response_code")), (1, "200"));
}

/// Hostile `metrics.overrides`: an UPSERT whose value is whatever a client sends (a 30 KB
/// header, new each request) is cut to 256 bytes and capped by `max_series`, with every
/// request answered and counted; an expression nested past Envoy's CEL parser (recursion limit
/// 250, cel-cpp `parser/options.h`) is refused at configure time, and the configuration before
/// it keeps serving.
#[test]
fn hostile_overrides_cost_telemetry_detail_never_traffic_or_unbounded_memory() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let upsert =
        json!({"overrides": [{"tag_overrides": {"x": {"value": "request.headers['x-big']"}}}], "max_series": 3});
    let (mut proxy, inbound, _) = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .config(metrics_config(json!({"metrics": upsert})))
        .proxy();
    proxy.ecds = true;
    let envoy = meshtel_tests::envoy::Envoy::start(&proxy);
    for i in 0..10 {
        let big = format!("{i}{}", "y".repeat(30_000));
        assert_eq!(send(inbound, "/", &[("x-big", &big)]), 200);
    }
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 10);
    let all = series(&points, REQUESTS);
    assert_eq!(all.len(), 4, "three series and the overflow one: {}", all.len());
    for p in all.iter().filter(|p| !p.labels.contains_key("otel.metric.overflow")) {
        assert_eq!(p.label("x").len(), 256, "cut to 256 bytes");
    }
    let nested = format!("{}1{}", "(".repeat(300), ")".repeat(300));
    let refused = json!({"overrides": [{"tag_overrides": {"x": {"value": format!("string({nested})")}}}]});
    let config = plugin_config(metrics_config(json!({"metrics": refused})));
    assert!(!envoy.push_plugin(&meshtel_tests::envoy::wasm_path(), &config), "refused");
    assert!(
        envoy.log().contains("metrics.overrides[0].tag_overrides.x.value: the proxy cannot compile"),
        "{}",
        envoy.log()
    );
    assert_eq!(send(inbound, "/", &[("x-big", "after")]), 200, "the configuration before serves");
    collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 11);
}

/// A mesh's Telemetry resources, carried over by `meshtel render --from-istio-telemetry`
/// (examples/istio-telemetry/telemetry.yaml), in real proxies: each applies the settings of
/// its own scope as istiod would merge them for it. The cart workload gets the mesh's REMOVE,
/// its own UPSERTs and its duration disabled; the web workload of the same namespace gets the
/// mesh's REMOVE only; both trace everything with the namespace's tag (customTags replace the
/// mesh's whole); a workload of another namespace logs only by the mesh's filter.
#[test]
fn carried_over_telemetry_resources_apply_per_proxy_by_scope() {
    let fixture = meshtel_tests::repo_root().join("examples/istio-telemetry/telemetry.yaml");
    let args = meshtel::cli::RenderArgs { from_istio_telemetry: Some(fixture), ..Default::default() };
    let mut config = meshtel::options::render_options(&args).expect("renders").plugin_config;
    meshtel_tests::mesh::merge(&mut config, plugin_config(metrics_config(json!({}))));
    let collector = Collector::start();
    let start = |app: &str, ns: &str| {
        let backend = App::start(Behavior::Echo);
        let sidecar = SidecarSpec {
            plugin_config: Some(config.clone()),
            ..SidecarSpec::new(app, ns, backend.port, collector.port)
        }
        .start();
        (backend, sidecar)
    };
    let (_a, cart) = start("cart", "shop");
    let (_b, web) = start("web", "shop");
    let (_c, api) = start("api", "default");
    for s in [&cart, &web] {
        for _ in 0..3 {
            assert_eq!(send(s.inbound, "/x", &[("x-tenant", "acme")]), 200);
        }
    }
    assert_eq!(send(api.inbound, "/ok", &[]), 200);
    assert_eq!(send(api.inbound, "/status/503", &[]), 503);
    let points = collector.wait_for_points(WAIT, |p| total(p, REQUESTS, |_| true) == 8);
    let of = |workload: &str, metric: &str| -> Vec<Point> {
        series(&points, metric).into_iter().filter(|p| p.label("destination_workload") == workload).collect()
    };
    let cart_requests = of("cart-v1", REQUESTS);
    assert_eq!(cart_requests.len(), 1);
    assert_eq!(cart_requests[0].label("request_host"), format!("127.0.0.1:{}", cart.inbound));
    assert_eq!(cart_requests[0].label("destination_port"), cart.inbound.to_string());
    assert!(of("cart-v1", "istio_request_duration_milliseconds").is_empty(), "cart's duration is disabled");
    assert_eq!(of("cart-v1", "istio_request_bytes").len(), 1);
    let web_requests = of("web-v1", REQUESTS);
    assert!(!web_requests[0].labels.contains_key("request_host"), "the selector is cart's");
    assert_eq!(of("web-v1", "istio_request_duration_milliseconds").len(), 1);
    for p in cart_requests.iter().chain(&web_requests) {
        assert!(!p.labels.contains_key("request_protocol"), "the mesh's REMOVE applies everywhere");
    }
    // The default namespace samples 5% of its two requests: only shop's spans are counted on.
    let deadline = std::time::Instant::now() + WAIT;
    let shop = loop {
        let in_shop = |s: &meshtel_tests::collector::ReceivedSpan| {
            s.resource_attr("k8s.namespace.name").as_deref() == Some("shop")
        };
        let shop: Vec<_> = collector.spans().into_iter().filter(in_shop).collect();
        if shop.len() >= 6 || std::time::Instant::now() > deadline {
            break shop;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shop.len(), 6, "shop samples every request");
    assert!(shop.iter().all(|s| s.attr("tenant").as_deref() == Some("acme")), "the namespace's tag");
    assert!(shop.iter().all(|s| s.attr("cluster_id").is_none()), "the mesh's tags replaced whole");
    let logs = collector.wait_for_logs(1, WAIT);
    thread::sleep(Duration::from_millis(500));
    let logs = if collector.logs().len() > logs.len() { collector.logs() } else { logs };
    let codes: Vec<Option<String>> = logs.iter().map(|l| l.attr("http.response.status_code")).collect();
    assert_eq!(codes, [Some("503".to_string())], "the mesh's log filter: response.code >= 500");
}
