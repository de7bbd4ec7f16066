//! OTLP/gRPC in real Envoy: `collector.protocol: grpc` sends the same export requests through
//! `dispatch_grpc_call` to a tonic receiver, and gRPC statuses get the OTLP retry rules.

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::{Answer, Collector, ReceivedLog, ReceivedSpan};
use meshtel_tests::mesh::{Sidecar, SidecarSpec};
use meshtel_tests::metrics::{series, total};
use meshtel_tests::request;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn sidecar(collector: &Collector, config: Value) -> (App, Sidecar) {
    let app = App::start(Behavior::Echo);
    let mut c = collector.protocol_config();
    meshtel_tests::mesh::merge(
        &mut c,
        json!({"logs": {"enabled": true}, "metrics": {"export_interval_ms": 1000}, "export": {"max_batch": 5}}),
    );
    meshtel_tests::mesh::merge(&mut c, config);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.endpoint()).config(c).start();
    (app, sidecar)
}

/// Send the same mix through a sidecar; every request must be answered at once.
fn drive(sidecar: &Sidecar) {
    for (i, path) in ["/a", "/status/404", "/b?q=1", "/status/503", "/grpc/0"].iter().enumerate() {
        let started = Instant::now();
        let id = format!("id-{i}");
        request(&format!("http://127.0.0.1:{}{path}", sidecar.inbound), &[("x-request-id", &id)]).expect("an answer");
        assert!(started.elapsed() < Duration::from_secs(1), "{path} took {:?}", started.elapsed());
    }
}

/// What must be the same whichever protocol carried it: everything but ids, times and the
/// ports of the per-test app and proxy.
const PER_RUN: [&str; 5] = ["server.port", "upstream_host", "upstream_cluster", "duration", "http.response.body.size"];

fn stable(attributes: &[KeyValue]) -> BTreeMap<&str, String> {
    attributes
        .iter()
        .filter(|kv| !PER_RUN.contains(&kv.key.as_str()))
        .map(|kv| (kv.key.as_str(), format!("{:?}", kv.value)))
        .collect()
}

fn span_content(s: &ReceivedSpan) -> String {
    let attrs = stable(&s.span.attributes);
    format!("{} {} {:?} {attrs:?} {:?}", s.span.name, s.span.kind, s.span.status, s.service())
}

fn log_content(l: &ReceivedLog) -> String {
    format!("{} {} {:?}", l.record.severity_number, l.record.event_name, stable(&l.record.attributes))
}

fn sorted<T>(items: &[T], f: impl Fn(&T) -> String) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(f).collect();
    v.sort();
    v
}

#[test]
fn grpc_delivers_what_http_delivers() {
    let mut received = Vec::new();
    for collector in [Collector::start(), Collector::start_grpc()] {
        let (_app, sidecar) = sidecar(&collector, json!({}));
        drive(&sidecar);
        let spans = collector.wait_for_spans(5, WAIT);
        let logs = collector.wait_for_logs(5, WAIT);
        let points = collector.wait_for_points(WAIT, |p| total(p, "istio_requests_total", |_| true) == 5);
        let metrics: Vec<String> = series(&points, "istio_requests_total")
            .iter()
            .map(|p| format!("{:?} = {}", p.labels, p.value))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let paths: Vec<String> = collector.requests().into_iter().map(|(path, ct)| format!("{path} {ct}")).collect();
        let expected_ct = if collector.grpc { "application/grpc" } else { "application/x-protobuf" };
        assert!(paths.iter().all(|p| p.ends_with(expected_ct)), "{paths:?}");
        for (s, l) in spans.iter().zip(&logs) {
            assert_eq!(s.span.trace_id.len(), 16);
            assert_eq!(l.record.trace_id.len(), 16);
        }
        let by_span: std::collections::HashSet<String> = spans.iter().map(|s| s.span_id()).collect();
        assert!(logs.iter().all(|l| by_span.contains(&l.span_id())), "every log has its span");
        received.push((sorted(&spans, span_content), sorted(&logs, log_content), metrics));
    }
    let (http, grpc) = (&received[0], &received[1]);
    assert_eq!(http.0, grpc.0, "spans");
    assert_eq!(http.1, grpc.1, "logs");
    assert_eq!(http.2, grpc.2, "istio_requests_total series");
}

fn wait_stat(sidecar: &Sidecar, name: &str, ok: impl Fn(u64) -> bool) -> u64 {
    sidecar.envoy.wait_meshtel_stat(name, WAIT, ok)
}

#[test]
fn unavailable_is_retried_until_delivered() {
    {
        let code = 14;
        let collector = Collector::start_grpc();
        collector.answer_with(Answer::Grpc(code));
        let (_app, sidecar) = sidecar(&collector, json!({"export": {"max_retries": 10}}));
        drive(&sidecar);
        wait_stat(&sidecar, "export_retries", |v| v >= 1);
        wait_stat(&sidecar, "log_export_failures", |v| v >= 1);
        collector.answer_with(Answer::Ok);
        assert_eq!(collector.wait_for_spans(5, Duration::from_secs(20)).len(), 5, "status {code}: delivered on retry");
        assert_eq!(collector.wait_for_logs(5, Duration::from_secs(20)).len(), 5, "status {code}");
        assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.spans_failed"), 0);
        let log = sidecar.envoy.log();
        assert!(log.contains(&format!("/v1/traces: export failing: collector answered gRPC status {code}")), "{log}");
    }
}

#[test]
fn other_statuses_drop_the_batch_at_once() {
    // RESOURCE_EXHAUSTED too: the OTLP spec retries it only with a RetryInfo in the status
    // details, which a unary gRPC call through the ABI never shows.
    {
        let code = 8;
        let collector = Collector::start_grpc();
        collector.answer_with(Answer::Grpc(code));
        let (_app, sidecar) = sidecar(&collector, json!({}));
        drive(&sidecar);
        wait_stat(&sidecar, "spans_failed", |v| v == 5);
        assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.export_retries"), 0, "status {code} is not retried");
    }
    let collector = Collector::start_grpc();
    collector.answer_with(Answer::Grpc(3));
    let (_app, sidecar) = sidecar(&collector, json!({}));
    drive(&sidecar);
    wait_stat(&sidecar, "spans_failed", |v| v == 5);
    wait_stat(&sidecar, "logs_failed", |v| v == 5);
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.export_retries"), 0, "INVALID_ARGUMENT is not retried");
    collector.answer_with(Answer::Ok);
    drive(&sidecar);
    assert_eq!(collector.wait_for_spans(5, WAIT).len(), 5, "telemetry resumes");
    let log = sidecar.envoy.log();
    assert!(log.contains("collector answered gRPC status 3 (INVALID_ARGUMENT)"), "{log}");
}

#[test]
fn partial_success_over_grpc_is_counted() {
    let collector = Collector::start_grpc();
    collector.answer_with(Answer::PartialSuccess(2));
    let (_app, sidecar) = sidecar(&collector, json!({"metrics": {"enabled": false}}));
    drive(&sidecar);
    wait_stat(&sidecar, "spans_failed", |v| v == 2);
    wait_stat(&sidecar, "logs_failed", |v| v == 2);
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.spans_exported"), 3);
}

#[test]
fn collector_down_costs_telemetry_not_requests() {
    let port = meshtel_tests::free_port();
    let collector = Collector::start_grpc();
    let app = App::start(Behavior::Echo);
    let mut config = collector.protocol_config();
    meshtel_tests::mesh::merge(&mut config, json!({"logs": {"enabled": true}, "export": {"max_retries": 0}}));
    let endpoint = meshtel_tests::envoy::Endpoint { http2: true, ..meshtel_tests::envoy::Endpoint::from(port) };
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, endpoint).config(config).start();
    for _ in 0..4 {
        drive(&sidecar);
    }
    wait_stat(&sidecar, "spans_failed", |v| v == 20);
    wait_stat(&sidecar, "logs_failed", |v| v == 20);
    let log = sidecar.envoy.log();
    assert!(log.contains("export failing: collector answered gRPC status 14 (UNAVAILABLE)"), "{log}");
}

#[test]
fn collector_slower_than_the_timeout_costs_telemetry_not_requests() {
    let collector = Collector::start_grpc();
    collector.answer_with(Answer::DelayMs(1500));
    let (_app, sidecar) = sidecar(
        &collector,
        json!({"collector": {"timeout_ms": 300}, "export": {"max_retries": 0}, "metrics": {"enabled": false}}),
    );
    drive(&sidecar);
    wait_stat(&sidecar, "spans_failed", |v| v == 5);
    assert!(!collector.requests().is_empty(), "the calls reached the collector and timed out there");
    // Envoy ends a gRPC call at its timeout with UNAVAILABLE; retried like any UNAVAILABLE.
    let log = sidecar.envoy.log();
    assert!(log.contains("/v1/traces: export failing: collector answered gRPC status 14 (UNAVAILABLE)"), "{log}");
}

#[test]
fn two_workers_over_grpc_lose_nothing() {
    let collector = Collector::start_grpc();
    let app = App::start(Behavior::Echo);
    let mut config = collector.protocol_config();
    meshtel_tests::mesh::merge(
        &mut config,
        json!({"logs": {"enabled": true}, "export": {"max_batch": 16}, "metrics": {"export_interval_ms": 1000}}),
    );
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.endpoint()).concurrency(2).config(config).start();
    let url = format!("http://127.0.0.1:{}/load", sidecar.inbound);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || (0..50).filter(|_| request(&url, &[]).map(|r| r.0) == Some(200)).count())
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, 400);
    let spans = collector.wait_for_spans(ok, WAIT);
    let logs = collector.wait_for_logs(ok, WAIT);
    collector.wait_for_points(WAIT, |p| total(p, "istio_requests_total", |_| true) == 400);
    thread::sleep(Duration::from_millis(300));
    let span_ids: std::collections::HashSet<String> = collector.spans().iter().map(ReceivedSpan::span_id).collect();
    let log_ids: std::collections::HashSet<String> = collector.logs().iter().map(ReceivedLog::span_id).collect();
    assert_eq!((spans.len(), logs.len()), (collector.spans().len(), collector.logs().len()), "no duplicates later");
    assert_eq!((span_ids.len(), log_ids.len()), (400, 400));
    assert_eq!(span_ids, log_ids, "each log has its span");
}
