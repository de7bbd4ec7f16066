//! The collector misbehaves; requests never notice. Each fault of the matrix costs telemetry only,
//! is counted in meshtel's stats, logged once per state change, and telemetry resumes after it.

use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::{Answer, Collector};
use meshtel_tests::mesh::{Sidecar, SidecarSpec};
use meshtel_tests::metrics::total;
use meshtel_tests::request;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn sidecar(collector_port: u16, extra: Value) -> (App, Sidecar) {
    let app = App::start(Behavior::Echo);
    let mut config =
        json!({"export": {"max_batch": 5, "flush_interval_ms": 100}, "metrics": {"export_interval_ms": 1000}});
    meshtel_tests::mesh::merge(&mut config, extra);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector_port).config(config).start();
    (app, sidecar)
}

/// Send `n` requests; each must be answered 200 within a second, as without meshtel.
fn drive(sidecar: &Sidecar, n: usize) {
    for i in 0..n {
        let started = Instant::now();
        let (status, body) = request(&format!("http://127.0.0.1:{}/req/{i}", sidecar.inbound), &[]).expect("an answer");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("/req/{i}")), "the app's own answer: {body}");
        assert!(started.elapsed() < Duration::from_secs(1), "request {i} took {:?}", started.elapsed());
    }
}

fn wait_stat(sidecar: &Sidecar, name: &str, ok: impl Fn(u64) -> bool) -> u64 {
    sidecar.envoy.wait_meshtel_stat(name, WAIT, ok)
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn permanent_failure(code: u16) {
    let collector = Collector::start();
    collector.answer_with(Answer::Status(code));
    let (_app, sidecar) = sidecar(collector.port, json!({}));
    drive(&sidecar, 20);
    wait_stat(&sidecar, "spans_failed", |v| v == 20);
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.export_retries"), 0, "{code} is not retried");
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.spans_exported"), 0);

    collector.answer_with(Answer::Ok);
    drive(&sidecar, 5);
    assert_eq!(collector.wait_for_spans(5, WAIT).len(), 5, "spans resume");
    collector.wait_for_points(WAIT, |p| total(p, "istio_requests_total", |_| true) == 25);
    wait_stat(&sidecar, "spans_exported", |v| v == 5);
    // Recovery is logged once no call failed for a settling spell (filter/src/episode.rs).
    let log = sidecar.envoy.wait_log("/v1/traces: export recovered: ", WAIT);
    assert_eq!(count(&log, &format!("/v1/traces: export failing: collector answered {code}")), 1, "{log}");
    assert_eq!(count(&log, "/v1/traces: export recovered: "), 1, "{log}");
    assert!(log.contains(", 20 items lost"), "the recovery line says what the outage cost:\n{log}");
}

#[test]
fn collector_500_costs_the_batch_not_the_requests() {
    permanent_failure(500);
}

#[test]
fn collector_400_costs_the_batch_not_the_requests() {
    permanent_failure(400);
}

#[test]
fn collector_503_with_retry_after_is_retried_and_delivered() {
    let collector = Collector::start();
    collector.answer_with(Answer::RetryAfter(503, 1));
    let (_app, sidecar) = sidecar(collector.port, json!({"metrics": {"enabled": false}}));
    drive(&sidecar, 5);
    wait_stat(&sidecar, "export_retries", |v| v >= 1);
    collector.answer_with(Answer::Ok);
    assert_eq!(collector.wait_for_spans(5, WAIT).len(), 5, "the retried batch arrives");
    wait_stat(&sidecar, "spans_exported", |v| v == 5);
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.spans_failed"), 0);
}

#[test]
fn failures_and_retries_are_counted_per_signal() {
    let collector = Collector::start();
    collector.answer_with(Answer::RetryAfter(503, 1));
    let (_app, sidecar) = sidecar(collector.port, json!({"logs": {"enabled": true}}));
    drive(&sidecar, 5);
    for signal in ["export", "metric_export", "log_export"] {
        wait_stat(&sidecar, &format!("{signal}_retries"), |v| v >= 1);
        assert!(sidecar.envoy.stat(&format!("wasmcustom.meshtel.{signal}_failures")) >= 1, "{signal}");
    }
    collector.answer_with(Answer::Ok);
    wait_stat(&sidecar, "spans_exported", |v| v == 5);
    wait_stat(&sidecar, "logs_exported", |v| v == 5);
    collector.wait_for_points(WAIT, |p| total(p, "istio_requests_total", |_| true) == 5);
}

#[test]
fn collector_429_is_retried_within_the_budget_then_dropped() {
    let collector = Collector::start();
    collector.answer_with(Answer::Status(429));
    let (_app, sidecar) = sidecar(collector.port, json!({"metrics": {"enabled": false}, "export": {"max_retries": 2}}));
    drive(&sidecar, 5);
    wait_stat(&sidecar, "spans_failed", |v| v == 5);
    // One batch: the first call and two retries (after 1 s and 2 s), never more.
    thread::sleep(Duration::from_millis(3_000));
    assert_eq!(collector.requests().len(), 3, "{:?}", collector.requests());
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.export_retries"), 2);
    assert_eq!(count(&sidecar.envoy.log(), "export failing: collector answered 429"), 1);
}

#[test]
fn garbage_200_answers_count_as_exported() {
    let collector = Collector::start();
    collector.answer_with(Answer::Garbage);
    let (_app, sidecar) = sidecar(collector.port, json!({"metrics": {"enabled": false}}));
    drive(&sidecar, 10);
    wait_stat(&sidecar, "spans_exported", |v| v == 10);
    assert_eq!(collector.wait_for_spans(10, WAIT).len(), 10);
}

#[test]
fn partial_success_counts_the_rejected_spans() {
    let collector = Collector::start();
    collector.answer_with(Answer::PartialSuccess(2));
    let (_app, sidecar) = sidecar(collector.port, json!({"metrics": {"enabled": false}}));
    drive(&sidecar, 5);
    wait_stat(&sidecar, "spans_failed", |v| v == 2);
    wait_stat(&sidecar, "spans_exported", |v| v == 3);
    let log = sidecar.envoy.log();
    assert_eq!(count(&log, "/v1/traces: the collector refused 2 of 5 items (OTLP partial success)"), 1, "{log}");
}

#[test]
fn slow_collector_times_out_without_slowing_requests() {
    let collector = Collector::start();
    collector.answer_with(Answer::DelayMs(3_000));
    let (_app, sidecar) = sidecar(
        collector.port,
        json!({"collector": {"timeout_ms": 200}, "metrics": {"enabled": false}, "export": {"max_retries": 0}}),
    );
    drive(&sidecar, 10);
    wait_stat(&sidecar, "spans_failed", |v| v == 10);
    // Envoy ends the call with its own 504 when collector.timeout_ms passes.
    let log = sidecar.envoy.log();
    assert_eq!(count(&log, "export failing: collector answered 504"), 1, "{log}");
}

#[test]
fn missing_collector_cluster_is_counted_and_logged_once() {
    let collector = Collector::start();
    let (_app, sidecar) = sidecar(
        collector.port,
        json!({"collector": {"cluster": "outbound|4318||nowhere.observability.svc.cluster.local"}, "export": {"max_retries": 1}}),
    );
    drive(&sidecar, 10);
    wait_stat(&sidecar, "spans_failed", |v| v == 10);
    let log = sidecar.envoy.log();
    assert_eq!(count(&log, "/v1/traces: export failing: the proxy refused the call to cluster"), 1, "{log}");
    assert!(collector.requests().is_empty());
}
